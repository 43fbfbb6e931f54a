"""The `ecgmon` command. Training subcommands import torch lazily; the daemon never does."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import yaml

from models import SHIPPED_MODEL
from pipeline.config import ConfigError
from pipeline.io.mqtt import ConnectError, MqttClient, Topics
from pipeline.tools import DEFAULT_PHYSIONET_DIR


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
    from train.config import load_train_config

    config = load_train_config(args.config, _overrides(args.set))
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

    report = evaluate(args.model, args.records, args.physionet_dir, args.leads, args.out, args.annotator,
                      args.window_s, args.history, args.qrs_mv)
    print(format_summary(report))
    print(f"report, annotations and plots in {args.out}")
    return 0


def cmd_evaluate_noise(args: argparse.Namespace) -> int:
    from train.noise import evaluate_noise, format_noise

    for noise in args.noise:
        report = evaluate_noise(args.model, args.records, args.physionet_dir, args.leads, noise, args.snr, args.out,
                                args.window_s, None if args.noisy_leads is None else [i - 1 for i in args.noisy_leads])
        print(format_noise(report))
    print(f"reports in {args.out}")
    return 0


def cmd_evaluate_alarms(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from train.alarm_eval import evaluate_alarms, format_alarm_report

    alarms = load_config(args.config).alarms
    noise = (args.noise, args.snr) if args.noise else None
    report = evaluate_alarms(args.model, args.records, args.physionet_dir, args.leads, alarms, args.out,
                             args.window_s, pictures=not args.no_pictures, noise=noise, folds=args.folds,
                             qrs_mv=args.qrs_mv)
    print(format_alarm_report(report))
    print(f"report in {args.out / 'alarms.json'}")
    return 0


def cmd_train_vf(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from train.vf import train_vf

    report = train_vf(args.model, args.out, args.report_dir, args.physionet_dir, args.lead,
                      load_config(args.config).alarms, args.folds, args.max_false_per_hour, tuple(args.records))
    for t, scores in report["thresholds"].items():
        vf = scores["vf"]
        print(f"threshold {t}: VF episodes {vf['events_alarmed']}/{vf['events']} alarmed, time to alarm median "
              f"{vf['time_to_alarm_median_s']} s, 95th percentile {vf['time_to_alarm_p95_s']} s, "
              f"false VF alarms {vf['false_per_hour']:.2f}/h")
    print(f"chose threshold {report['threshold']}; wrote {args.out}; report in {args.report_dir / 'vf-cv.json'}")
    return 0


def cmd_train_quality(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from train.quality import format_quality_report, train_quality

    report = train_quality(args.model, args.out, args.report_dir, args.physionet_dir, args.lead,
                           load_config(args.config).alarms, args.folds, args.max_clean_flagged, tuple(args.records),
                           args.jobs)
    print(format_quality_report(report))
    print(f"chose threshold {report['threshold']}; wrote {args.out}; report in "
          f"{args.report_dir / 'quality-cv.json'}")
    return 0


def cmd_train_af(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from train.af import train_af

    report = train_af(args.model, args.out, args.report_dir, args.physionet_dir, args.lead,
                      load_config(args.config).alarms, args.folds, args.challenge_limit,
                      mitdb_specs=tuple(args.records))
    for t, f1 in report["thresholds"].items():
        print(f"threshold {t}: Challenge 2017 F1 N {f1['N']:.3f} A {f1['A']:.3f} O {f1['O']:.3f} ~ {f1['~']:.3f}, "
              f"score {f1['challenge_score']:.3f}")
    print(f"chose threshold {report['threshold']}; wrote {args.out}; report in {args.report_dir / 'af-cv.json'}")
    return 0


def cmd_train_rhythm(args: argparse.Namespace) -> int:
    from pipeline.config import load_config, validate_config
    from train.config import RhythmTrainConfig, apply_overrides
    from train.rhythm import format_rhythm_report, train_rhythm

    stage = validate_config(RhythmTrainConfig, apply_overrides({}, _overrides(args.set)), "--set")
    report = train_rhythm(args.model, args.out, args.report_dir, args.physionet_dir, load_config(args.config).alarms,
                          stage, args.folds, args.seeds, tuple(args.records))
    print(format_rhythm_report(report))
    print(f"wrote {args.out}; report in {args.report_dir / 'rhythm-cv.json'}")
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    from train.build import build_model
    from train.evaluate import format_summary

    report = build_model(args.config, args.out, args.report_dir)
    print(format_summary(report))
    print(f"wrote {args.out}; report in {args.report_dir}")
    return 0


def cmd_cross_validate(args: argparse.Namespace) -> int:
    from train.config import load_train_config
    from train.crossval import cross_validate, format_cv

    config = load_train_config(args.config, _overrides(args.set))
    print(format_cv(cross_validate(config, args.folds, args.seeds, args.out, args.jobs)))
    print(f"report in {args.out / 'cv.json'}")
    return 0


def cmd_train_beat_stage(args: argparse.Namespace) -> int:
    from pipeline.config import validate_config
    from train.beat_stage import build_beat_stage, format_beat_stage
    from train.config import BeatStageTrainConfig, apply_overrides

    config = validate_config(BeatStageTrainConfig, apply_overrides({}, _overrides(args.set)), "--set")
    report = build_beat_stage(args.cv_dir, args.model, args.out, args.report_dir, args.physionet_dir, args.leads,
                              config, args.cv_only)
    print(format_beat_stage(report))
    print(f"reports in {args.report_dir}" if args.cv_only else f"wrote {args.out}; reports in {args.report_dir}")
    return 0


def cmd_beat_stage_trials(args: argparse.Namespace) -> int:
    from pipeline.config import validate_config
    from train.beat_trials import format_trials, run_trials
    from train.config import BeatStageTrainConfig, apply_overrides

    config = validate_config(BeatStageTrainConfig, apply_overrides({}, _overrides(args.set)), "--set")
    print(format_trials(run_trials(args.cv_dir, args.physionet_dir, args.leads, config, args.out, args.jobs)))
    print(f"report in {args.out}")
    return 0


def cmd_compare_cells(args: argparse.Namespace) -> int:
    from train.compare_cells import compare_cells

    table = compare_cells(args.config, args.cells, args.out, args.epochs)
    print(table)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.process.serve import serve

    config = load_config(args.config)
    if args.check_config:
        print(f"{args.config or 'defaults'}: valid")
        return 0
    logging.getLogger().setLevel(config.log_level)
    return serve(config)


def cmd_station(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipeline.io.mqtt import ConnectError
    from pipeline.tools.station.app import Station
    from pipeline.tools.station.config import load_station_config
    from pipeline.tools.station.users import UsersError

    config = load_station_config(args.config)
    if args.check_config:
        print(f"{args.config or 'defaults'}: valid")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        station = Station(config)
        station.start()
    except (ConnectError, OSError, UsersError) as err:
        print(f"station failed to start: {err}", file=sys.stderr)
        return 1
    print(f"central station at {station.url} (broker {config.mqtt.host}:{config.mqtt.port})", flush=True)
    stop.wait()
    station.stop()
    return 0


def cmd_station_user(args: argparse.Namespace) -> int:
    import getpass

    from pipeline.tools.station.users import UsersError, set_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
    try:
        set_user(args.users_file, args.name, password)
    except UsersError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{args.name}: written to {args.users_file}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.tools.replay import ReplayPlan, load_signals, replay

    signals = load_signals(args.records, args.physionet_dir, args.leads)
    client = _connect(args.broker, "ecgmon-replay", args.mqtt_protocol)
    plan = ReplayPlan(devices=args.devices or len(signals), window_s=args.window_s, speed=args.speed,
                      duration_s=args.duration_s, encoding=args.encoding, offset_step_s=args.offset_step_s,
                      qos=args.qos)
    try:
        sent = replay(client, Topics(args.topic_prefix), signals, plan)
    finally:
        client.disconnect()
    print(f"published {sent} windows")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    import threading

    from pipeline.tools.alerts import AlarmPrinter

    client = _connect(args.broker, "ecgmon-alerts", args.mqtt_protocol)
    with (open(args.json_out, "a") if args.json_out else nullcontext()) as json_out:
        AlarmPrinter(sys.stdout, json_out).attach(client, Topics(args.topic_prefix))
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            client.disconnect()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.tools.bench import run_bench, write_report

    if args.leads:
        from pipeline.tools.bench import run_leads_bench, write_leads_report

        leads = run_leads_bench(args.records, args.physionet_dir, args.core_devices, args.duration_s)
        print(write_leads_report(leads, args.out, "ecgmon " + " ".join(sys.argv[1:])))
        return 0
    if args.station:
        from pipeline.tools.bench_station import run_station_bench, write_station_report

        figures = run_station_bench(args.station_beds, args.records, args.physionet_dir, 20.0, args.duration_s)
        print(write_station_report(figures, args.out, "ecgmon " + " ".join(sys.argv[1:])))
        return 0
    if args.cluster:
        from pipeline.tools.bench_cluster import checkpoint_cost, run_cluster_bench, write_cluster_report

        points, single = run_cluster_bench(args.devices, args.duration_s, args.records, args.physionet_dir)
        checkpoint = checkpoint_cost(args.records, args.physionet_dir)
        print(write_cluster_report(points, single, checkpoint, args.out, "ecgmon " + " ".join(sys.argv[1:])))
        return 0
    figures = run_bench(args.devices, args.naive_devices, args.windows_s, args.duration_s, args.records,
                        args.physionet_dir, core_devices=args.core_devices)
    command = "ecgmon " + " ".join(sys.argv[1:])
    print(write_report(figures, args.out, command))
    return 0


def cmd_rabbit_cluster(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipeline.tools.rabbit_cluster import RabbitCluster

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with RabbitCluster(args.nodes) as cluster:
        nodes = [f"{cluster.host}:{n.amqp_port}" for n in cluster.nodes]
        print(f"RabbitMQ cluster of {len(nodes)} on loopback (guest/guest); Ctrl-C stops it and removes its data")
        for n in cluster.nodes:
            print(f"  {n.name}: AMQP {cluster.host}:{n.amqp_port}, MQTT {cluster.host}:{n.mqtt_port}")
        print("daemon config (give each daemon its own mqtt.client_id): " + json.dumps(
            {"source": "rabbitmq", "rabbitmq": {"nodes": nodes}, "mqtt": {"client_id": "ecgmon-1"}}), flush=True)
        stop.wait()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.tools.demo import run_demo

    count = run_demo(args.records, args.physionet_dir, args.speed, args.duration_s, args.encoding, args.station_port,
                     args.screenshots)
    print(f"demo finished: {count} alarm events")
    return 0


def _connect(broker: str, client_id: str, protocol: str) -> MqttClient:
    host, _, port = broker.rpartition(":")
    client = MqttClient(host or "127.0.0.1", int(port), f"{client_id}-{os.getpid()}", protocol=protocol)
    try:
        client.connect()
    except ConnectError as err:
        raise SystemExit(str(err)) from err
    return client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecgmon", description="Streaming ECG arrhythmia monitor. "
                                     "Not a medical device.")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default INFO (WARNING for demo)")
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
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR,
                   help="folder of WFDB databases; missing records are downloaded")
    p.add_argument("--leads", nargs="+", help="leads to use, names (MLII) or 1-based numbers (2), those a record has "
                   "(default: every ECG lead of each record)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder")
    p.add_argument("--annotator", default="ecgm", help="WFDB annotator name of the written annotations")
    p.add_argument("--window-s", type=float, default=1.0, help="streaming window length (s)")
    p.add_argument("--history", type=Path, help="history.json of the training run, for training curves")
    p.add_argument("--qrs-mv", type=float, help="rescale each lead so that its median QRS peak-to-peak is this (mV): "
                   "small or large complexes")

    p = add("evaluate-noise", cmd_evaluate_noise, "Score a model on records with recorded noise added (nstdb "
            "bw/em/ma, their evaluation half) at several SNRs.")
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="ONNX model (default: the shipped one)")
    p.add_argument("--records", nargs="+", default=["mitdb/DS2"], help="db/record, mitdb/DS2, ... (default DS2)")
    p.add_argument("--noise", nargs="+", default=["em"], choices=["bw", "em", "ma"], help="nstdb noise records")
    p.add_argument("--snr", nargs="+", type=float, default=[24.0, 18.0, 12.0, 6.0, 0.0], help="SNRs (dB)")
    p.add_argument("--noisy-leads", nargs="+", type=int, help="1-based numbers of the leads that get the noise "
                   "(default: every lead)")
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR,
                   help="folder of WFDB databases; missing records are downloaded")
    p.add_argument("--leads", nargs="+", help="leads to use, names (MLII) or 1-based numbers (2), those a record has "
                   "(default: every ECG lead of each record)")
    p.add_argument("--out", type=Path, default=Path("runs/noise"), help="output folder (noise-<name>.json)")
    p.add_argument("--window-s", type=float, default=1.0, help="streaming window length (s)")

    p = add("evaluate-alarms", cmd_evaluate_alarms, "Run records offline through the daemon's analysis (DSP, model, "
            "beat picking, alarm rules) and score every alarm type against the reference annotations.")
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="ONNX model (default: the shipped one)")
    p.add_argument("--records", nargs="+", default=["mitdb/DS2", "cudb/all"],
                   help="db/record, mitdb/DS2, db/all (default mitdb/DS2 cudb/all)")
    p.add_argument("--config", type=Path, help="daemon config YAML whose `alarms` section to use (default: built-in)")
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR,
                   help="folder of WFDB databases; missing records are downloaded")
    p.add_argument("--leads", nargs="+", help="leads to use, names (MLII) or 1-based numbers (2), those a record has "
                   "(default: every ECG lead of each record)")
    p.add_argument("--out", type=Path, default=Path("runs/alarms"), help="output folder (alarms.json, timelines/, "
                   "strips/)")
    p.add_argument("--window-s", type=float, default=1.0, help="streaming window length (s)")
    p.add_argument("--no-pictures", action="store_true", help="write alarms.json only")
    p.add_argument("--noise", choices=["bw", "em", "ma"], help="add this nstdb noise (its evaluation half)")
    p.add_argument("--snr", type=float, default=6.0, help="SNR of the added noise (dB)")
    p.add_argument("--qrs-mv", type=float, help="before any noise, rescale each lead so that its median QRS "
                   "peak-to-peak is this (mV): small or large complexes")
    p.add_argument("--folds", type=int, default=0, help="Challenge 2015 records: also cross-validate (this many "
                   "folds by record, 5 seeds) the choice of which alarms use the second QRS detector")

    def add_detector_training(p: argparse.ArgumentParser, report: str, one_lead: bool = True) -> None:
        p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="model to add the detector to")
        p.add_argument("--out", type=Path, default=SHIPPED_MODEL, help="ONNX file to write")
        p.add_argument("--report-dir", type=Path, default=Path("docs/alarms"), help=f"where {report} goes")
        p.add_argument("--config", type=Path, help="daemon config YAML whose `alarms` section to use (default: "
                       "built-in)")
        p.add_argument("--folds", type=int, default=5, help="cross-validation folds")
        p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR,
                       help="folder of WFDB databases; missing records are downloaded")
        if one_lead:
            p.add_argument("--lead", default="MLII", help="lead to use where present (else the first lead)")

    p = add("train-vf", cmd_train_vf, "Fit the VF detector on cudb and MIT-BIH DS1, cross-validate its alarm by "
            "patient folds, choose its threshold, and write it into the model's metadata.")
    add_detector_training(p, "vf-cv.json")
    p.add_argument("--records", nargs="+", default=["cudb/all", "mitdb/DS1"],
                   help="records to train and cross-validate on (DS2 is refused)")
    p.add_argument("--max-false-per-hour", type=float, default=0.1,
                   help="the lowest threshold whose cross-validated false VF alarms per hour stay at or below this")

    p = add("train-quality", cmd_train_quality, "Fit the signal-quality detector on MIT-BIH DS1 clean and with nstdb "
            "noise, cross-validate it by patient folds, choose its threshold, and write it into the model's metadata.")
    add_detector_training(p, "quality-cv.json")
    p.add_argument("--records", nargs="+", default=["mitdb/DS1"],
                   help="records to train and cross-validate on (DS2 is refused)")
    p.add_argument("--max-clean-flagged", type=float, default=0.01,
                   help="the lowest threshold whose cross-validated share of clean windows flagged stays at or below "
                   "this")
    p.add_argument("--jobs", type=int, default=2, help="noise conditions run at once, each in a process of its own")

    p = add("train-af", cmd_train_af, "Fit the AF detector on the Challenge 2017 set and MIT-BIH DS1, score it by "
            "5-fold cross-validation with the Challenge's own score, and write it into the model's metadata.")
    add_detector_training(p, "af-cv.json")
    p.add_argument("--challenge-limit", type=int, help="use only the first N Challenge recordings (tests)")
    p.add_argument("--records", nargs="+", default=["mitdb/DS1"],
                   help="MIT-BIH records whose AF and other rhythm episodes train too (DS2 is refused)")

    p = add("train-rhythm", cmd_train_rhythm, "Train the rhythm stage (every lead of cudb, MIT-BIH DS1, the "
            "Challenge 2015 ICU alarms, nstdb noise), choose which ventricular alarms it raises and at which threshold "
            "by cross-validated alarm scores, and attach it to the model.")
    add_detector_training(p, "rhythm-cv.json", one_lead=False)
    p.add_argument("--records", nargs="+", default=["cudb/all", "mitdb/DS1", "challenge-2015/all"],
                   help="records to train and cross-validate on (DS2 is refused)")
    p.add_argument("--seeds", type=int, default=2, help="random deals of the records into folds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting, e.g. --set epochs=10 or model.hidden_size=16")

    p = add("build-model", cmd_build_model, "Train, export and evaluate in one go: the shipped model's recipe.")
    p.add_argument("--config", type=Path, default=Path("configs/train-lstm.yaml"))
    p.add_argument("--out", type=Path, default=SHIPPED_MODEL, help="ONNX file to write")
    p.add_argument("--report-dir", type=Path, default=Path("docs/model"), help="evaluation report and plots")

    p = add("cross-validate", cmd_cross_validate, "Patient-wise cross-validation of a training recipe on its "
            "training and validation records (DS2 never takes part), over several seeds.")
    p.add_argument("--config", type=Path, default=Path("configs/train-lstm.yaml"))
    p.add_argument("--folds", type=int, default=5, help="number of patient folds")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--out", type=Path, default=Path("runs/cv"), help="output folder (cv.json, runs/)")
    p.add_argument("--jobs", type=int, default=1, help="folds trained at once, each in a process of its own")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    p = add("train-beat-stage", cmd_train_beat_stage, "Train the beat-sequence stage on the out-of-fold beats of a "
            "cross-validation run, cross-validate both stages, attach it to a frame model and score DS2 once.")
    p.add_argument("--cv-dir", type=Path, default=Path("runs/cv"), help="--out of `ecgmon cross-validate`")
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="frame model to attach the stage to")
    p.add_argument("--out", type=Path, default=SHIPPED_MODEL, help="ONNX file to write")
    p.add_argument("--report-dir", type=Path, default=Path("docs/model/beat-stage"), help="cv.json and ds2/")
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR)
    p.add_argument("--leads", nargs="+", help="leads to use, names (MLII) or 1-based numbers (2), those a record has "
                   "(default: every ECG lead of each record)")
    p.add_argument("--cv-only", action="store_true", help="cross-validate only: no model written, DS2 not scored")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting, e.g. --set epochs=10 or model.hidden_size=16")

    p = add("beat-stage-trials", cmd_beat_stage_trials, "Cross-validate the beat stage with trial features added "
            "(train/beat_trials.py) on the out-of-fold beats of a cross-validation run; nothing is shipped.")
    p.add_argument("--cv-dir", type=Path, default=Path("runs/cv"), help="--out of `ecgmon cross-validate`")
    p.add_argument("--out", type=Path, default=Path("docs/model/beat-stage/feature-trials.json"))
    p.add_argument("--jobs", type=int, default=2, help="trials run at once, each in a process of its own")
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR)
    p.add_argument("--leads", nargs="+", help="leads to use, names (MLII) or 1-based numbers (2), those a record has "
                   "(default: every ECG lead of each record)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training setting")

    p = add("compare-cells", cmd_compare_cells, "Train rnn, gru and lstm for the same epochs; compare DS2 scores and "
                           "gradients over BPTT depth.")
    p.add_argument("--config", type=Path, default=Path("configs/train-lstm.yaml"))
    p.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"], choices=["rnn", "gru", "lstm"])
    p.add_argument("--epochs", type=int, default=12, help="training epochs per cell (the shared budget)")
    p.add_argument("--out", type=Path, default=Path("docs/cells"), help="folder for the write-up's figures")
    p = add("serve", cmd_serve, "Run the daemon: ECG windows in over MQTT, beats and alarms out.")
    p.add_argument("--config", type=Path, help="daemon config YAML (configs/daemon.yaml); defaults if omitted")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")

    p = add("station", cmd_station, "Serve the central station web page: every bed's ECG and alarms, acknowledge and "
            "silence, review strips (needs the [station] extra).")
    p.add_argument("--config", type=Path, help="station config YAML (configs/station.yaml); defaults if omitted")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")

    p = add("station-user", cmd_station_user, "Add a staff login to the station's users file, or change its password.")
    p.add_argument("name", help="the login (1-64 of A-Z a-z 0-9 _ . @ -)")
    p.add_argument("--users-file", type=Path, default=Path("/etc/ecgmon/station-users"))
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input's first line")

    def add_broker(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker host:port")
        p.add_argument("--topic-prefix", default="ecgmon")
        p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5",
                       help="3.1.1 for a RabbitMQ cluster's MQTT plugin")

    def add_records(p: argparse.ArgumentParser, default: list[str]) -> None:
        p.add_argument("--records", nargs="+", default=default, help="db/record, mitdb/DS2, ...")
        p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR)
        p.add_argument("--speed", type=float, default=1.0, help="1 = real time, 10 = ten times faster")
        p.add_argument("--duration-s", type=float, help="seconds of ECG to send (default: whole records)")
        p.add_argument("--encoding", choices=["binary", "json"], default="binary")

    p = add("replay", cmd_replay, "Publish PhysioNet records as live devices over MQTT.")
    add_broker(p)
    add_records(p, ["mitdb/200"])
    p.add_argument("--devices", type=int, help="number of devices (default: one per record)")
    p.add_argument("--window-s", type=float, default=1.0, help="window length (s), 0.25-10")
    p.add_argument("--leads", nargs="+", help="leads to send, names (MLII) or 1-based numbers (2), those a record "
                   "has (default: every ECG lead)")
    p.add_argument("--offset-step-s", type=float, default=0.0, help="start offset between devices (s)")
    p.add_argument("--qos", type=int, choices=[0, 1], default=1, help="MQTT QoS of the ECG windows")

    p = add("alerts", cmd_alerts, "Subscribe to alarms and print them as they happen.")
    add_broker(p)
    p.add_argument("--json-out", type=Path, help="also append each alarm as a JSON line to this file")

    p = add("bench", cmd_bench, "Measure live-device capacity, latency, CPU and memory; write docs/benchmarks.md.")
    p.add_argument("--devices", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    p.add_argument("--naive-devices", type=int, nargs="*", default=[100, 500, 1000])
    p.add_argument("--windows-s", type=float, nargs="*", default=[0.25, 5.0],
                   help="window lengths also measured at the batched capacity (1 s always is)")
    p.add_argument("--duration-s", type=float, default=60.0, help="sustained run per point (s)")
    p.add_argument("--records", nargs="+", default=["mitdb/DS1"])
    p.add_argument("--physionet-dir", type=Path, default=DEFAULT_PHYSIONET_DIR)
    p.add_argument("--core-devices", type=int, default=2000,
                   help="devices of the in-process daemon-core run (CPU by stage, memory by module)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--cluster", action="store_true", help="instead: --devices over 1, 2 and 3 daemons on a local "
                   "3-node RabbitMQ cluster, then 3 runs with a daemon killed and 3 with a node killed (its section "
                   "of --out only)")
    p.add_argument("--leads", action="store_true", help="instead: the live daemon and its core with 1 and with 2 "
                   "leads per device, --core-devices devices replaying --records (its section of --out only)")
    p.add_argument("--station", action="store_true", help="instead: --station-beds beds replaying --records on one "
                   "central station page in headless chromium, for --duration-s (its section of --out only)")
    p.add_argument("--station-beds", type=int, default=64)

    p = add("rabbit-cluster", cmd_rabbit_cluster, "Start a local RabbitMQ cluster on loopback ports (Debian's "
            "rabbitmq-server, MQTT and consistent-hash plugins) for trying daemons on it; runs until Ctrl-C.")
    p.add_argument("--nodes", type=int, default=3)

    p = add("demo", cmd_demo, "Local broker + daemon + shipped model + replayed PhysioNet records (ventricular "
            "ectopy, ventricular fibrillation, atrial fibrillation), one device each with every lead, the second "
            "lead coming off for 30 s; prints alarms and serves the central station's page.")
    add_records(p, ["mitdb/200", "cudb/cu01", "mitdb/201"])
    p.add_argument("--station-port", type=int, default=8080, help="the central station's page (any free port if busy)")
    p.add_argument("--screenshots", type=Path, help="at the end, photograph the station's bed wall and a review strip "
                   "into this folder (the README's: docs/station)")
    p.set_defaults(speed=10.0, duration_s=300.0, default_log_level="WARNING")  # the alarm lines are the output
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or getattr(args, "default_log_level", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
