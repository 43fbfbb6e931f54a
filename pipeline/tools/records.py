"""PhysioNet records (WFDB): names, download with wfdb, reading the ECG leads and the AAMI beats.

The one place that reads WFDB files: training, evaluation and replay all go through it. Needs wfdb,
never torch; the daemon itself does not import it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb
from numpy.typing import NDArray
from wfdb.io import download

from pipeline.analysis.aami import AAMI_CLASS_OF_SYMBOL, DS1, DS2
from pipeline.io.codec import Window

log = logging.getLogger(__name__)

PHYSIONET_INDEX_URL = "https://physionet.org/files/"

# Versions of the databases this project reads (PhysioNet paths are <db>/<version>).
DB_VERSIONS = {"mitdb": "1.0.0", "svdb": "1.0.0", "nstdb": "1.0.0", "cudb": "1.0.0", "challenge-2017": "1.0.0"}


# Lead names ECG databases use (PhysioNet's MIT-BIH, svdb, cudb, Challenge 2015/2017); other signals (ABP, PLETH,
# RESP...) are not ECG and are never read as leads.
ECG_LEAD_NAMES = frozenset({"I", "II", "III", "aVR", "aVL", "aVF", "V", "V1", "V2", "V3", "V4", "V5", "V6", "MLI",
                            "MLII", "MLIII", "MCL", "ECG", "ECG1", "ECG2", "ML5", "D3", "CM5", "CM2", "CM4"})


@dataclass(frozen=True)
class EcgRecord:
    """The ECG leads of a WFDB record, sampled together, with its reference beats.

    Attributes:
        name: record name, e.g. "100".
        signals_mv: the leads in mV, shape (n_leads, n_samples).
        fs: sampling rate (Hz).
        sig_names: each lead's name, e.g. ("MLII", "V1").
        beat_samples: reference beat positions (samples at fs), AAMI beats only.
        beat_classes: AAMI class letter of each reference beat ("N", "S", "V", "F", "Q").
        adc_gains: ADC units per mV of each lead.
        baselines: ADC value of 0 mV of each lead.
    """

    name: str
    signals_mv: NDArray[np.float64]
    fs: float
    sig_names: tuple[str, ...]
    beat_samples: NDArray[np.int64]
    beat_classes: NDArray[np.str_]
    adc_gains: tuple[float, ...] = (200.0,)
    baselines: tuple[int, ...] = (0,)

    @property
    def signal_mv(self) -> NDArray[np.float64]:
        """The first lead (mV): the one the single-lead detectors (VF, AF, signal quality) are trained on."""
        first: NDArray[np.float64] = self.signals_mv[0]
        return first

    @property
    def sig_name(self) -> str:
        """The first lead's name."""
        return self.sig_names[0]

    def only(self, leads: list[int]) -> EcgRecord:
        """The same record with only the leads at these indices (0-based), in this order."""
        return dataclasses.replace(self, signals_mv=self.signals_mv[leads],
                                   sig_names=tuple(self.sig_names[i] for i in leads),
                                   adc_gains=tuple(self.adc_gains[i] for i in leads),
                                   baselines=tuple(self.baselines[i] for i in leads))

    def window_count(self, window_s: float) -> int:
        """Windows of `window_s` (s) the record is streamed in, the last one possibly shorter."""
        return int(np.ceil(self.signals_mv.shape[1] / self.fs / window_s))

    def window(self, k: int, window_s: float) -> Window:
        """The k-th window of `window_s` (s) as the daemon decodes it (t0: s since the record's start)."""
        samples = self.signals_mv[:, round(k * window_s * self.fs):round((k + 1) * window_s * self.fs)]
        return Window(seq=k, t0=k * window_s, fs=self.fs, leads=self.sig_names, samples_mv=samples,
                      adc_gain=self.adc_gains, adc_baseline=tuple(float(b) for b in self.baselines))


def download_records(db: str, records: list[str] | None, dest: Path,
                     index_url: str = PHYSIONET_INDEX_URL) -> None:
    """Download WFDB records (header, signal and .atr files) of `db` into `dest` with wfdb.

    Args:
        db: PhysioNet database slug, e.g. "mitdb".
        records: record names, or None for every record listed in the database's RECORDS.
        dest: local folder, created if missing.
        index_url: PhysioNet files index (a local mirror in tests).
    """
    dest.mkdir(parents=True, exist_ok=True)
    download.set_db_index_url(index_url)
    try:
        pn_dir = f"{db}/{DB_VERSIONS.get(db, '1.0.0')}"

        def fetch(file_name: str) -> None:
            download.dl_pn_file((file_name, "", pn_dir, str(dest), False, False))

        if records is None:
            fetch("RECORDS")
            records = (dest / "RECORDS").read_text().split()
        for record in records:
            fetch(f"{record}.hea")
            header = wfdb.rdheader(str(dest / record))
            for file_name in sorted(set(header.file_name)):
                fetch(file_name)
            fetch(f"{record}.atr")
    finally:
        download.set_db_index_url(PHYSIONET_INDEX_URL)


def ensure_records(db_dir: Path, records: list[str], db: str | None = None,
                   index_url: str = PHYSIONET_INDEX_URL) -> None:
    """Download the `records` missing from `db_dir` (database slug defaults to the folder name)."""
    missing = [r for r in records if not (db_dir / f"{r}.hea").exists()]
    if missing:
        log.info("downloading %d records of %s into %s", len(missing), db or db_dir.name, db_dir)
        download_records(db or db_dir.name, missing, db_dir, index_url)


def list_records(db_dir: Path) -> list[str]:
    """Record names listed in the folder's RECORDS file."""
    return (db_dir / "RECORDS").read_text().split()


def pick_leads(sig_names: list[str], leads: list[str] | None) -> list[int]:
    """Indices of the leads to read: every ECG lead (`leads` None), or those of `leads` the record has, in that
    order, each a name ("MLII") or a 1-based signal number ("2"); the first ECG lead when it has none of them."""
    ecg = [i for i, name in enumerate(sig_names) if name in ECG_LEAD_NAMES] or [0]
    if leads is None:
        return ecg
    picked = [int(x) - 1 if x.isdigit() else sig_names.index(x) for x in leads
              if (x.isdigit() and 1 <= int(x) <= len(sig_names)) or x in sig_names]
    return list(dict.fromkeys(picked)) or ecg[:1]


def load_record(db_dir: Path, name: str, leads: list[str] | None = None) -> EcgRecord:
    """Read the ECG leads of a record and its AAMI beats (none for a record without an `atr` file).

    Args:
        db_dir: folder holding the WFDB files.
        name: record name.
        leads: the leads to read (`pick_leads`): None for every ECG lead.
    """
    path = str(db_dir / name)
    rec = wfdb.rdrecord(path, physical=True)
    channels = pick_leads(list(rec.sig_name), leads)
    if (db_dir / f"{name}.atr").exists():
        ann = wfdb.rdann(path, "atr")
        symbols, samples = np.asarray(ann.symbol), np.asarray(ann.sample, dtype=np.int64)
    else:  # a database without beat annotations (the Challenge 2015 and 2017 sets)
        symbols, samples = np.array([], dtype=np.str_), np.array([], dtype=np.int64)
    is_beat = np.isin(symbols, list(AAMI_CLASS_OF_SYMBOL))
    classes = np.asarray([AAMI_CLASS_OF_SYMBOL[s] for s in symbols[is_beat]], dtype=np.str_)
    signals_mv = np.nan_to_num(rec.p_signal[:, channels].T.astype(np.float64))
    return EcgRecord(name=name, signals_mv=signals_mv, fs=float(rec.fs),
                     sig_names=tuple(rec.sig_name[c] for c in channels), beat_samples=samples[is_beat],
                     beat_classes=classes, adc_gains=tuple(float(rec.adc_gain[c]) for c in channels),
                     baselines=tuple(int(rec.baseline[c]) for c in channels))


def load_rhythm(db_dir: Path, name: str, fs: float) -> tuple[NDArray[np.float64], list[str], list[str]]:
    """Every annotation of a record's `atr` file: times (s at `fs`), WFDB symbols, aux notes ("\\x00" stripped);
    empty for a record without one."""
    if not (db_dir / f"{name}.atr").exists():
        return np.array([]), [], []
    ann = wfdb.rdann(str(db_dir / name), "atr")
    notes = [(note or "").strip("\x00") for note in ann.aux_note]
    return np.asarray(ann.sample, dtype=np.float64) / fs, list(ann.symbol), notes


def resolve_records(specs: list[str], default_db: str = "mitdb") -> list[tuple[str, str]]:
    """Expand record specs into (db, record) pairs.

    A spec is "db/record", a bare MIT-BIH record name, "mitdb/DS1", "mitdb/DS2" or "db/all"
    (every record in the folder's RECORDS file; resolved by `expand_all`). Database names are
    lower-cased, as PhysioNet spells them.
    """
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        db, _, name = spec.strip().rpartition("/")
        db = (db or default_db).lower()
        if name == "DS1":
            pairs.extend((db, r) for r in DS1)
        elif name == "DS2":
            pairs.extend((db, r) for r in DS2)
        else:
            pairs.append((db, name))
    return pairs


def expand_all(pairs: list[tuple[str, str]], physionet_dir: Path) -> list[tuple[str, str]]:
    """Replace ("db", "all") by every record of that database folder."""
    out: list[tuple[str, str]] = []
    for db, name in pairs:
        out.extend((db, r) for r in list_records(physionet_dir / db)) if name == "all" else out.append((db, name))
    return out


def challenge_labels(db_dir: Path) -> dict[str, str]:
    """Record -> PhysioNet/CinC Challenge 2017 label (N normal, A AF, O other rhythm, ~ noisy) from REFERENCE.csv."""
    labels = {}
    for line in (db_dir / "REFERENCE.csv").read_text().split():
        record, _, label = line.partition(",")
        labels[record] = label
    return labels


def load_records(specs: list[str], physionet_dir: Path, leads: list[str] | None = None) -> list[tuple[str, EcgRecord]]:
    """("db/record", record) for every record named by `specs`, downloading the missing ones; `leads`: as
    `load_record`."""
    out = []
    for db, name in expand_all(resolve_records(specs), physionet_dir):
        ensure_records(physionet_dir / db, [name], db)
        out.append((f"{db}/{name}", load_record(physionet_dir / db, name, leads)))
    return out
