"""Small runs of `ecgmon bench`: correctness only (every window answered, nothing dropped), never speed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from models import SHIPPED_MODEL
from pipeline.tools.bench import batch_memory_mb, environment, mqtt_costs, run_point, write_leads_report, write_report
from pipeline.tools.bench_core import run_core
from pipeline.tools.replay import load_signals


def test_small_benchmark_answers_every_window(physionet: Path, tmp_path: Path) -> None:
    point = run_point("batched", 50, 1.0, 6.0, ["mitdb/101", "mitdb/106"], physionet, SHIPPED_MODEL)
    assert point.sent == 50 * 6
    assert point.answered == point.sent
    assert point.dropped == 0
    assert point.daemon_cpu_s > 0 and point.rss_mb > 0 and point.batch_mean >= 1
    assert point.generator_late_p99_ms >= 0
    signals = load_signals(["mitdb/101", "mitdb/106"], physionet, ["1"])
    core = [run_core(30, signals, seconds=2, warmup_s=8, beats_every_s=every) for every in (0.0, 5.0)]
    for run in core:  # the stages add up to the whole, and every device holds state
        assert sum(run.stages_us_per_device_s.values()) == pytest.approx(run.us_per_device_s, rel=0.02)
        assert run.python_bytes_per_device > 0 and run.samples > 0
        assert 1 <= run.batch_mean < 30  # windows handed over at the live pace: batches of a few devices, not all
    figures = {"records": ["mitdb/101", "mitdb/106"], "points": [asdict(point) | {"ok": point.ok}],
               "capacity": {"batched": 50, "naive": 0},
               "core": [asdict(run) for run in core], "mqtt_us": mqtt_costs(rate=500, seconds=2),
               "batch_memory_mb": {"256": 1.0, "4096": 2.0}, "analysis_ceiling_device_s_per_cpu_s": {"1": 1.0},
               "state_bytes_per_device": 1, "environment": environment()}
    text = write_report(figures, tmp_path / "benchmarks.md", "ecgmon bench --devices 50")
    assert "| batched | 50 | 1 | 300 | 300 |" in text and "| **daemon core** |" in text
    assert (tmp_path / "benchmarks.json").exists()
    per_leads = {"leads": ["MLII"], "live": asdict(point) | {"ok": point.ok}, "core_us_per_device_s": 200.0,
                 "stages_us_per_device_s": core[0].stages_us_per_device_s, "analysis_device_s_per_cpu_s": 1.0}
    text = write_leads_report({"records": ["mitdb/101"], "devices": 50, "receive_us": 20.0, "1": per_leads,
                               "2": per_leads | {"leads": ["MLII", "V1"], "core_us_per_device_s": 250.0}},
                              tmp_path / "benchmarks.md", "ecgmon bench --leads")
    live_us = 1000 * point.cpu_ms_per_device_s
    assert f"| live daemon, CPU µs per device-second | {live_us:.0f} | {live_us:.0f} |" in text
    assert "50 in the core run (23 %)" in text and "| live: windows answered of sent | 300 of 300 |" in text


def test_the_batch_memory_probe_runs_the_analysis() -> None:
    """ONNX Runtime's buffers grow with the largest batch run: the probe runs the analysis in a fresh process."""
    assert batch_memory_mb(SHIPPED_MODEL, 64) > 0
