"""PhysioNet records: AAMI classes, the inter-patient split, download through wfdb from a local mirror; training
examples of every lead and their per-lead augmentation."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from pipeline.analysis.aami import DS1, DS2, PACED
from pipeline.analysis.beats import fuse_leads
from pipeline.analysis.dsp import FilterSpec, Preprocessor
from pipeline.tools.records import download_records, ensure_records, load_record
from train.config import OptimConfig
from train.dataset import FramedRecord, frame_record, load_framed
from train.noise import FramedNoise, qrs_amplitude_mv
from train.trainer import fuse_rows, segment_batches


def test_record_100_aami_counts(physionet: Path) -> None:
    record = load_record(physionet / "mitdb", "100")
    assert record.fs == 360.0
    assert record.sig_name == "MLII"
    # MIT-BIH 100: 2239 normal beats, 33 A (S), 1 V (PhysioNet's record table).
    assert Counter(record.beat_classes.tolist()) == {"N": 2239, "S": 33, "V": 1}
    assert len(record.signal_mv) == 650000


def test_lead_choice_falls_back_to_first_lead(physionet: Path) -> None:
    assert load_record(physionet / "mitdb", "114", ["MLII"]).sig_name == "MLII"  # MLII is lead 1 in 114
    assert load_record(physionet / "mitdb", "114").sig_names == ("V5", "MLII")  # every lead, in the file's order
    assert load_record(physionet / "svdb", "800", ["MLII"]).sig_name == "ECG1"  # no MLII in the SVDB


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


# --- training examples: every lead, augmented lead by lead ---------------------------------------------------------

SEGMENT = 300  # frames (10 s) in the augmentation tests


@pytest.fixture(scope="module")
def framed_100(physionet: Path) -> FramedRecord:
    """The first 2 min of MIT-BIH 100 (MLII and V5), framed."""
    record = load_record(physionet / "mitdb", "100")
    short = dataclasses.replace(record, signals_mv=record.signals_mv[:, :360 * 120],
                                beat_samples=record.beat_samples[record.beat_samples < 360 * 120],
                                beat_classes=record.beat_classes[record.beat_samples < 360 * 120])
    return frame_record(short, ModelConfig(), FilterSpec(), 3)


def optim(**settings: object) -> OptimConfig:
    """Augmentation switched off but for `settings`."""
    return OptimConfig.model_validate({"amplitude_jitter": 0.0, "amplitude_scale_fraction": 0.0, "noise_fraction": 0.0,
                                       "lead_dropout": 0.0, **settings})


def same_segment(records: list[FramedRecord], copies: int, seed: int, settings: OptimConfig,
                 noise: list[FramedNoise] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch of `copies` of the first SEGMENT frames of each record, augmented independently: frames, labels,
    lead mask as numpy arrays."""
    plan = [np.array([(i, 0) for i in range(len(records))] * copies)]
    (frames, labels, mask), = segment_batches(records, plan, SEGMENT, settings, np.random.default_rng(seed), noise)
    return frames.numpy(), labels.numpy(), mask.numpy()


def test_framed_records_carry_every_lead_filtered_alone(physionet: Path, framed_100: FramedRecord) -> None:
    record = load_record(physionet / "mitdb", "100")
    assert framed_100.leads == ("MLII", "V5") and framed_100.frames.shape == (2, 120 * 30, 12)
    for i, x in enumerate(record.signals_mv):
        np.testing.assert_array_equal(framed_100.frames[i], Preprocessor(FilterSpec(), 360.0, 360.0, 12)(x)[:3600])
    whole = frame_record(record, ModelConfig(), FilterSpec(), 3)
    np.testing.assert_array_equal(framed_100.labels, whole.labels[:3600])  # one set of labels for every lead
    np.testing.assert_allclose(whole.qrs_mv, [qrs_amplitude_mv(record.only([0])), qrs_amplitude_mv(record.only([1]))])
    assert whole.qrs_mv[0] > whole.qrs_mv[1] > 0.3  # MLII's QRS is the larger one here
    only_v5, = load_framed(["mitdb/100"], physionet, ["V5"], ModelConfig(), FilterSpec(), 3)
    assert only_v5.name == "mitdb/100" and only_v5.leads == ("V5",)
    np.testing.assert_array_equal(only_v5.frames[0], whole.frames[1])


def test_amplitude_scaling_puts_each_lead_s_qrs_in_range(framed_100: FramedRecord) -> None:
    frames, labels, mask = same_segment([framed_100], 400, 0, optim(amplitude_scale_fraction=1.0))
    clean = framed_100.frames[:, :SEGMENT]
    gain = (frames * clean).sum(axis=(2, 3)) / (clean**2).sum(axis=(1, 2))  # (segments, leads)
    np.testing.assert_allclose(frames, gain[:, :, None, None] * clean, rtol=1e-4, atol=1e-6)  # a gain, nothing else
    qrs = gain * framed_100.qrs_mv
    assert qrs.min() >= 0.1 * 0.999 and qrs.max() <= 5.0 * 1.001
    assert abs(np.median(qrs) - np.sqrt(0.1 * 5.0)) < 0.3  # log-uniform: the median at the geometric mean
    assert np.mean(qrs < 0.3) > 0.2 and np.mean(qrs > 2.0) > 0.15  # small and large QRS both drawn
    assert not np.allclose(gain[:, 0], gain[:, 1])  # each lead its own gain
    assert (labels == framed_100.labels[:SEGMENT]).all() and (mask == 1).all()
    frames, _, _ = same_segment([framed_100], 200, 0, optim(amplitude_jitter=0.2))
    jitter = (frames * clean).sum(axis=(2, 3)) / (clean**2).sum(axis=(1, 2))
    assert jitter.min() >= 0.8 and jitter.max() <= 1.2


def test_lead_dropout_keeps_one_lead_and_drops_each_at_the_configured_rate(framed_100: FramedRecord) -> None:
    single = dataclasses.replace(framed_100, leads=("MLII",), frames=framed_100.frames[:1],
                                 qrs_power_mv2=framed_100.qrs_power_mv2[:1])
    frames, _, mask = same_segment([framed_100, single], 2000, 1, optim(lead_dropout=0.3))
    two, one = mask[0::2], mask[1::2]
    assert (one == [1, 0]).all()  # a single lead is never dropped; the batch pads it to two leads
    assert (frames[1::2, 1] == 0).all()
    assert (two.sum(axis=1) >= 1).all()  # at least one lead of every segment kept
    expected = 0.3 - 0.3**2 / 2  # both drawn out (9 %): one of them, at random, stays
    np.testing.assert_allclose(1 - two.mean(axis=0), [expected, expected], atol=0.03)
    assert 0.44 < (two.sum(axis=1) == 2).mean() < 0.54  # 0.7 * 0.7 keep both
    _, _, none = same_segment([framed_100], 100, 1, optim())
    assert (none == 1).all()


def test_noise_is_drawn_for_each_lead_alone(framed_100: FramedRecord) -> None:
    rng = np.random.default_rng(2)
    noise = [FramedNoise("white", rng.normal(size=(10 * SEGMENT, 12)).astype(np.float32), 1.0)]
    clean, _, _ = same_segment([framed_100], 400, 3, optim())
    noisy, _, _ = same_segment([framed_100], 400, 3, optim(noise_fraction=0.5, noise_snr_db=(6.0, 6.0)), noise)
    added = noisy - clean
    has_noise = np.abs(added).max(axis=(2, 3)) > 0  # (segments, leads)
    assert 0.4 < has_noise.mean() < 0.6
    assert 0.4 < (has_noise.sum(axis=1) == 1).mean() < 0.6  # noise on one lead only: half the segments
    assert 0.15 < has_noise.all(axis=1).mean() < 0.35
    for lead in (0, 1):  # 6 dB below each lead's own QRS power, N as the Noise Stress Test defines it
        power = np.mean(added[has_noise[:, lead], lead] ** 2)
        expected = framed_100.qrs_power_mv2[lead] / 10**0.6 * np.mean(noise[0].frames ** 2)
        assert power == pytest.approx(expected, rel=0.05)


def test_fused_rows_are_the_daemon_s_lead_fusion() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(6), size=(5, 7)).astype(np.float32)  # 5 rows (leads run), 7 frames
    segment_of_row = np.array([0, 0, 1, 2, 2])
    fused = fuse_rows(torch.from_numpy(probs), torch.from_numpy(segment_of_row), 3).numpy()
    for segment in range(3):
        np.testing.assert_allclose(fused[segment], fuse_leads(probs[segment_of_row == segment],
                                                              np.ones((segment_of_row == segment).sum())),
                                   rtol=1e-6)
    np.testing.assert_allclose(fused.sum(axis=-1), 1.0, rtol=1e-6)
