"""One command from a config to a shipped model: train, export, evaluate on the test records, embed metrics."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from train.config import load_train_config
from train.evaluate import evaluate
from train.export import export_onnx
from train.trainer import train

log = logging.getLogger(__name__)


def build_model(config_path: Path, out: Path, report_dir: Path) -> dict[str, Any]:
    """Train per `config_path`, export to `out` with the test-set (DS2) metrics in its metadata.

    The evaluation report, its plots and the training history go to `report_dir`.
    """
    config = load_train_config(config_path)
    run_dir = train(config)
    export_onnx(run_dir / "best.pt", out)
    report = evaluate(out, config.data.test_records, config.data.physionet_dir, config.data.leads,
                      report_dir, history=run_dir / "history.json")
    metrics = {k: v for k, v in report["gross"].items() if k != "matrix"}
    export_onnx(run_dir / "best.pt", out, metrics)
    shutil.copy(run_dir / "history.json", report_dir / "history.json")
    history = json.loads((run_dir / "history.json").read_text())
    report["training_minutes"] = history[-1]["elapsed_s"] / 60
    report["epochs"] = len(history)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2))
    log.info("shipped %s (%d bytes)", out, out.stat().st_size)
    return report
