"""PhysioNet records: AAMI classes, the inter-patient split, download through wfdb from a local mirror."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.aami import DS1, DS2, PACED
from pipeline.tools.records import download_records, ensure_records, load_record


def test_record_100_aami_counts(physionet: Path) -> None:
    record = load_record(physionet / "mitdb", "100")
    assert record.fs == 360.0
    assert record.sig_name == "MLII"
    # MIT-BIH 100: 2239 normal beats, 33 A (S), 1 V (PhysioNet's record table).
    assert Counter(record.beat_classes.tolist()) == {"N": 2239, "S": 33, "V": 1}
    assert len(record.signal_mv) == 650000


def test_lead_choice_falls_back_to_first_lead(physionet: Path) -> None:
    assert load_record(physionet / "mitdb", "114").sig_name == "MLII"  # MLII is lead 1 in 114
    assert load_record(physionet / "svdb", "800").sig_name == "ECG1"  # no MLII in the SVDB


def test_inter_patient_split() -> None:
    assert len(DS1) == len(DS2) == 22
    assert not set(DS1) & set(DS2)
    assert not set(PACED) & (set(DS1) | set(DS2))


@pytest.fixture()
def mirror(physionet: Path, tmp_path: Path) -> Iterator[str]:
    """A local HTTP server laid out like PhysioNet's files index, serving two shared records."""
    root = tmp_path / "www"
    db = root / "mitdb" / "1.0.0"
    db.mkdir(parents=True)
    for name in ("100", "101"):
        for ext in ("hea", "dat", "atr"):
            shutil.copy(physionet / "mitdb" / f"{name}.{ext}", db)
    (db / "RECORDS").write_text("100\n101\n")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_from_mirror(mirror: str, physionet: Path, tmp_path: Path) -> None:
    dest = tmp_path / "mitdb"
    download_records("mitdb", None, dest, index_url=mirror)
    for name in ("100", "101"):
        for ext in ("hea", "dat", "atr"):
            assert sha256(dest / f"{name}.{ext}") == sha256(physionet / "mitdb" / f"{name}.{ext}")
    assert load_record(dest, "101").beat_samples.size > 1800


def test_ensure_records_fetches_only_missing(mirror: str, physionet: Path, tmp_path: Path) -> None:
    dest = tmp_path / "mitdb"
    ensure_records(dest, ["100"], "mitdb", index_url=mirror)
    assert (dest / "100.dat").exists() and not (dest / "101.dat").exists()
    (dest / "100.dat").write_bytes(b"")  # present files are not fetched again
    ensure_records(dest, ["100"], "mitdb", index_url=mirror)
    assert (dest / "100.dat").read_bytes() == b""
