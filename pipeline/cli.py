"""The `ecgmon` command. Training subcommands import torch lazily; the daemon never does."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.model import SHIPPED_MODEL

DEFAULT_PHYSIONET = Path("../shared/physionet")


def _overrides(pairs: list[str]) -> dict[str, object]:
    """`key.sub=value` pairs; values parsed as YAML (numbers, lists, null)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from train.config import ConfigError, load_train_config

    try:
        config = load_train_config(args.config, _overrides(args.set))
    except ConfigError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{args.config}: valid (hash {config.hash()})")
        return 0
    from train.trainer import train

    run_dir = train(config, resume=args.resume)
    print(f"checkpoints in {run_dir} (best.pt, last.pt), history in {run_dir / 'history.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from train.export import export_onnx

    metrics = json.loads(args.metrics.read_text())["gross"] if args.metrics else None
    if metrics is not None:
        metrics = {k: v for k, v in metrics.items() if k != "matrix"}
    info = export_onnx(args.checkpoint, args.out, metrics)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), version {info.version}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from train.evaluate import evaluate, format_summary

    report = evaluate(args.model, args.records, args.physionet_dir, args.lead, args.out, args.annotator,
                      args.window_s, args.history)
    print(format_summary(report))
    print(f"report, annotations and plots in {args.out}")
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    from train.build import build_model
    from train.evaluate import format_summary

    report = build_model(args.config, args.out, args.report_dir)
    print(format_summary(report))
    print(f"wrote {args.out}; report in {args.report_dir}")
    return 0


def cmd_compare_cells(args: argparse.Namespace) -> int:
    from train.compare_cells import compare_cells

    table = compare_cells(args.config, args.cells, args.out, args.minutes)
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecgmon", description="Streaming ECG arrhythmia monitor. "
                                     "Not a medical device.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train, "Train a beat model from PhysioNet records (needs the [train] extra).")
    p.add_argument("--config", type=Path, required=True, help="training config YAML (configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")

    p = add("export", cmd_export, "Export a checkpoint to ONNX with state inputs/outputs and metadata.")
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt of a run")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--metrics", type=Path, help="report.json of `ecgmon evaluate` on DS2, embedded as metadata")

    p = add("evaluate", cmd_evaluate, "Stream records through an ONNX model and score it after EC57.")
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="ONNX model (default: the shipped one)")
    p.add_argument("--records", nargs="+", default=["mitdb/DS2"],
                   help="db/record, mitdb/DS1, mitdb/DS2 or db/all (default mitdb/DS2)")
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET,
                   help="folder of WFDB databases; missing records are downloaded")
    p.add_argument("--lead", default="MLII", help="lead to use where present (else the first lead)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder")
    p.add_argument("--annotator", default="ecgm", help="WFDB annotator name of the written annotations")
    p.add_argument("--window-s", type=float, default=1.0, help="streaming window length (s)")
    p.add_argument("--history", type=Path, help="history.json of the training run, for training curves")

    p = add("build-model", cmd_build_model, "Train, export and evaluate in one go: the shipped model's recipe.")
    p.add_argument("--config", type=Path, default=Path("configs/train-lstm.yaml"))
    p.add_argument("--out", type=Path, default=SHIPPED_MODEL, help="ONNX file to write")
    p.add_argument("--report-dir", type=Path, default=Path("docs/model"), help="evaluation report and plots")

    p = add("compare-cells", cmd_compare_cells, "Train rnn, gru and lstm on the same budget and compare them.")
    p.add_argument("--config", type=Path, default=Path("configs/train-lstm.yaml"))
    p.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"], choices=["rnn", "gru", "lstm"])
    p.add_argument("--minutes", type=float, default=6.0, help="training wall-time budget per cell (min)")
    p.add_argument("--out", type=Path, default=Path("docs/cells"), help="folder for the write-up's figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
