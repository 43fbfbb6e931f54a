"""A small run of `ecgmon bench`: correctness only (every window answered, nothing dropped), never speed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from models import SHIPPED_MODEL
from pipeline.tools.bench import run_point, write_report


def test_small_benchmark_answers_every_window(physionet: Path, tmp_path: Path) -> None:
    point = run_point("batched", 50, 1.0, 10.0, ["mitdb/101", "mitdb/106"], physionet, SHIPPED_MODEL)
    assert point.sent == 50 * 10
    assert point.answered == point.sent
    assert point.dropped == 0
    assert point.daemon_cpu_s > 0 and point.rss_mb > 0 and point.batch_mean >= 1
    figures = {"points": [asdict(point) | {"ok": point.ok}], "capacity": {"batched": 50, "naive": 0},
               "analysis_ceiling_device_s_per_cpu_s": {"1": 1.0}, "state_bytes_per_device": 1,
               "environment": {"cpus": "2", "processor": "x", "machine": "x", "python": "3", "onnxruntime": "1",
                               "numpy": "2", "paho-mqtt": "2", "mosquitto": "mosquitto"}}
    text = write_report(figures, tmp_path / "benchmarks.md", "ecgmon bench --devices 50")
    assert "| batched | 50 | 1 | 500 | 500 |" in text
    assert point.generator_late_p99_ms >= 0
    assert (tmp_path / "benchmarks.json").exists()
