"""The daemon's own CPU per device-second, by stage, and its memory per device, as the live daemon spends them.

The daemon runs in this process as `ecgmon serve` runs it (its worker thread, queue and batching, its MQTT sink
and paho client publishing every result to a local mosquitto, which drops them), with a source that hands it
binary windows of real MIT-BIH records (one per device per second, devices offset by 37 s of signal) at the pace
they arrive live: each second's windows spread evenly over a second, so that the worker forms the batches the
live daemon forms. What paho-mqtt costs to receive a window is measured apart
(`pipeline.tools.bench.mqtt_client_cost`).

Devices first run `warmup_s` of signal (handed over at once), so that every rule (the AF detector needs 33 beats)
is live; then `seconds` more are handed over at the live pace and the process CPU time until the last is
analysed, per device-second, is the figure. Meanwhile py-spy samples this process's threads from outside
(SAMPLE_HZ; it reads their stacks without the GIL, so Python code that never lets the GIL go is seen as often as
numpy or ONNX Runtime, which do) and each sample of the worker thread is charged to the innermost stage function on
its stack; each stage's share of the worker's samples times the worker's CPU time is its cost; paho's network
thread is read apart (/proc).
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import SHIPPED_MODEL
from pipeline.config import DaemonConfig
from pipeline.io.codec import encode_binary
from pipeline.io.mqtt import DEVICE_ID, encode_json
from pipeline.io.sources import Acknowledge, Deliver, Progress
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker
from pipeline.tools.replay import ReplaySignal, assign

# Innermost function on the worker's stack -> stage. Qualified names (co_qualname) of the daemon's code.
STAGES = {
    "decode_window": "decode (binary payload -> window)",
    "Admission.admit": "admission (sequence, gaps)",
    "PreprocessorBank.__call__": "DSP (filter, resample, frames)",
    "BeatModel.run": "frame stage (ONNX Runtime)",
    "pick_beats": "beat picking",
    "BeatStreams._beat_stage": "beat stage (context features, ONNX Runtime)",
    "BeatStreams._judge_signal": "VF and signal-quality detectors",
    "SignalCheck.batch": "signal check (flat, saturation)",
    "af_probabilities": "AF detector",
    "DeviceAlarms.on_window": "alarm rules",
    "Daemon._publish_beats": "beats messages (build, JSON)",
    "Daemon._emit": "alarm messages (build, JSON)",
    "Daemon._gather": "waiting for windows",
    "MqttClient.publish": "paho publish (worker side: packet, queue, wake-up)",
    "MqttClient.publish_tracked": "paho publish (worker side: packet, queue, wake-up)",
}
IDLE = STAGES["Daemon._gather"]
OTHER = "other (batching, state gather/scatter, metrics, Python glue)"
PAHO_THREAD = "paho network thread (send, wake-ups)"
# What would take each stage's time away (not measured: the next levers).
LEVERS = {
    "frame stage (ONNX Runtime)": "the network's own arithmetic: a smaller frame stage or int8 weights, chosen by "
                                  "cross-validated accuracy",
    "decode (binary payload -> window)": "decode a batch of payloads in one numpy call, on the source thread (the "
                                         "second core)",
    "VF and signal-quality detectors": "the second QRS detector steps complex by complex (one numpy pass per "
                                       "complex of the busiest lead in the batch): a compiled loop; judging the "
                                       "4 s every 2 s instead of every window would halve the rest, but changes "
                                       "alarm timing",
    "beat stage (context features, ONNX Runtime)": "one ONNX Runtime call per batch for all beats of a window (a "
                                                   "sequence input) instead of one per beat rank (the correlations "
                                                   "over every shift in one array operation were tried: slower at "
                                                   "these sizes, and not the same bits)",
    "alarm rules": "per-device alarm state in slot arrays and the rules vectorised over the batch",
    OTHER: "fewer Python objects per window (window, admission and beat records as arrays of the batch)",
    "AF detector": "each device's last 33 beats gathered from its alarm state into a row per window: beat times in "
                   "slot arrays of the batch instead",
    "DSP (filter, resample, frames)": "the filter already runs once per batch; the resampler and framer still run "
                                      "lead by lead in Python",
    "signal check (flat, saturation)": "computed from the int16 payload, before conversion to mV",
    "beats messages (build, JSON)": "`output.beats_every_s` (the second column)",
    "beat picking": "-",
    "hand-off (source thread: queue)": "-",
    "admission (sequence, gaps)": "-",
    "alarm messages (build, JSON)": "-",
    "paho publish (worker side: packet, queue, wake-up)": "fewer messages: `output.beats_every_s`, or a batch's "
                                                          "results in one message per partition of devices",
    PAHO_THREAD: "the same: paho's loop wakes and writes once per message published",
}
PAHO_LEVER = ("MQTT 3.1.1 (`mqtt.protocol`); beyond it paho's pure-Python packet handling: several devices' windows "
              "per message from a gateway, or a client in C")
SAMPLE_HZ = 200  # py-spy's samples per second
PACE_STEPS = 100  # hand-overs per second of signal at the live pace
OFFSET_STEP_S = 37.0  # signal between one device's start in a record and the next's (s), as `ecgmon bench` replays


class HandSource:
    """Hands the daemon payloads on demand (what paho's network thread does)."""

    def __init__(self) -> None:
        self.deliver: Deliver | None = None

    def start(self, deliver: Deliver, acknowledge: Acknowledge) -> None:
        """Hands windows only: the benchmark acknowledges no alarm."""
        self.deliver = deliver

    def proven_until(self, now: float) -> float:
        return now

    def stop(self) -> None:
        self.deliver = None

    def close(self) -> None:
        """Nothing to let go of."""


class EncodingSink:
    """Builds the bytes the MQTT sink would publish and drops them."""

    def __init__(self) -> None:
        self.published = 0

    def _send(self, doc: dict[str, Any]) -> None:
        encode_json(doc)
        self.published += 1

    beats = alarm = open_alarm = rejected = stats = status = _send

    def open_alarms(self) -> list[dict[str, Any]] | None:
        return []

    def forget_open_alarm(self, device: str, alarm_type: str) -> None:
        """Nothing kept."""

    def progress(self, done: dict[str, Progress]) -> None:
        """Nothing replays."""

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self, timeout_s: float) -> None:
        """Nothing to send."""

    def counts(self) -> dict[str, int | float]:
        return {"reconnects": 0}


@dataclass(frozen=True)
class CoreFigures:
    """One run of the daemon core."""

    devices: int
    beats_every_s: float
    seconds: float
    us_per_device_s: float  # process CPU (worker, hand-off, sampler excluded) per device-second
    stages_us_per_device_s: dict[str, float]
    python_bytes_per_device: float  # Python and numpy allocations (tracemalloc) per device, steady state
    python_bytes_by_module: dict[str, float]  # ... by the module that allocated them
    samples: int  # py-spy's samples of the busy worker thread
    batch_mean: float  # windows per batch the worker formed while measured


def _stage_of(stack: list[str]) -> str:
    """The stage of a sampled stack (outermost first): its innermost function that names one."""
    for name in reversed(stack):
        stage = STAGES.get(name)
        if stage is not None:
            return stage
    return OTHER


def _profile(seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling this process's threads for `seconds` (raw stacks to `out`, idle samples left out)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--threads", "--nonblocking", "--format",
                             "raw", "--rate", str(SAMPLE_HZ), "--duration", str(seconds), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stage_counts(profile: Path, thread: threading.Thread) -> dict[str, int]:
    """Samples of `thread` per stage in a py-spy raw profile (lines `thread (tid): name;frame;...;frame count`,
    each frame `qualified.name (file:line)`)."""
    counts: dict[str, int] = {}
    prefix = f"thread ({thread.native_id})"
    for line in profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if frames[0].startswith(prefix):
            stage = _stage_of([frame.split(" (", 1)[0] for frame in frames[1:]])
            counts[stage] = counts.get(stage, 0) + int(n)
    return counts


def run_core(devices: int, signals: list[ReplaySignal], seconds: int = 20, warmup_s: int = 45,
             beats_every_s: float = 0.0, model: Path = SHIPPED_MODEL) -> CoreFigures:
    """`devices` devices through the daemon core, sending the records `signals` as `ecgmon replay` does (device i
    record i mod len(signals), OFFSET_STEP_S further into it; from its start again at its end): `warmup_s` of
    signal, then `seconds` measured at the live pace."""
    names = [f"bench-{i}" for i in range(devices)]
    assert all(DEVICE_ID.match(n) for n in names)
    assigned = assign(signals, devices, OFFSET_STEP_S)

    def second(k: int) -> list[bytes]:
        out = []
        for signal, offset in assigned:
            window, n = round(signal.fs), signal.adc.shape[1]
            a = (offset + k * window) % (n - window)
            out.append(encode_binary(k, 1_700_000_000.0 + k, signal.fs, signal.leads, signal.adc[:, a:a + window],
                                     signal.gain, signal.baseline))
        return out

    with LocalBroker() as broker:
        config = DaemonConfig.model_validate({
            "model": {"path": str(model)}, "metrics": {"port": None},
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": "bench-core"},
            "streams": {"queue_windows": devices * max(seconds, warmup_s) + 1, "idle_evict_s": 3600},
            "alarms": {"signal_loss_s": 3000}, "output": {"beats_every_s": beats_every_s}, "log_level": "WARNING"})
        source = HandSource()
        daemon = Daemon(config, source=source)  # its own MQTT sink and paho client
        logging.getLogger("pipeline").setLevel(logging.ERROR)  # not a log line per alarm of a thousand devices
        tracemalloc.start()
        if not daemon.start():
            raise RuntimeError("the daemon core did not start")
        try:
            before = tracemalloc.take_snapshot()
            _hand_over(daemon, source, names, [second(k) for k in range(warmup_s)], paced=False)
            time.sleep(0.3)  # the worker lets go of its last batch once it finds the queue empty
            gc.collect()
            grown = tracemalloc.take_snapshot().compare_to(before, "filename")
            tracemalloc.stop()
            by_module: dict[str, float] = {}
            for stat in grown:
                module = _module_of(stat.traceback[0].filename)
                by_module[module] = by_module.get(module, 0.0) + stat.size_diff / devices
            payloads = [second(k) for k in range(warmup_s, warmup_s + seconds)]
            worker = next(t for t in threading.enumerate() if t.name == "ecgmon-worker")
            paho_thread = next(t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-"))
            cpu, paho_cpu = time.process_time(), thread_cpu_s(paho_thread)
            batches_before = daemon.metrics.batch_size.totals()
            with tempfile.TemporaryDirectory() as tmp:
                spy = _profile(seconds, Path(tmp) / "profile.txt")
                hand_over_cpu = _hand_over(daemon, source, names, payloads, paced=True)
                total = time.process_time() - cpu
                _, spy_errors = spy.communicate()
                if spy.returncode != 0:
                    raise RuntimeError(f"py-spy could not sample this process: {spy_errors.decode()[-500:]}")
                counts = _stage_counts(Path(tmp) / "profile.txt", worker)
            paho_s = thread_cpu_s(paho_thread) - paho_cpu
            batches, windows = (after - before for after, before in zip(daemon.metrics.batch_size.totals(),
                                                                         batches_before, strict=True))
        finally:
            daemon.stop()
            logging.getLogger("pipeline").setLevel(logging.NOTSET)
    busy = {stage: n for stage, n in counts.items() if stage != IDLE} or {OTHER: 1}  # none sampled: all unknown
    worker_s = max(total - hand_over_cpu - paho_s, 0.0)
    per = 1e6 / (devices * seconds)
    stages = {stage: worker_s * n / sum(busy.values()) * per for stage, n in busy.items()}
    stages["hand-off (source thread: queue)"] = hand_over_cpu * per
    stages[PAHO_THREAD] = paho_s * per
    return CoreFigures(devices, beats_every_s, seconds, total * per, dict(sorted(stages.items())),
                       sum(by_module.values()), dict(sorted(by_module.items(), key=lambda kv: -kv[1])),
                       sum(busy.values()), windows / batches if batches else float("nan"))


def stat_cpu_s(stat: Path) -> float:
    """CPU time (s, user + system) so far of the process or thread whose /proc `stat` file this is."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def thread_cpu_s(thread: threading.Thread) -> float:
    """CPU time (s, user + system) of one of this process's threads so far."""
    return stat_cpu_s(Path(f"/proc/self/task/{thread.native_id}/stat"))


def _module_of(filename: str) -> str:
    """`pipeline/alarms/rules.py` for the daemon's files, else the package (numpy, onnxruntime, ...) or "other"."""
    parts = Path(filename).parts
    if "pipeline" in parts:
        return "/".join(parts[parts.index("pipeline"):])
    if "site-packages" in parts and parts.index("site-packages") + 1 < len(parts):
        return parts[parts.index("site-packages") + 1]
    return "other"


def _hand_over(daemon: Daemon, source: HandSource, names: list[str], payloads: list[list[bytes]], paced: bool
               ) -> float:
    """Deliver every payload (second by second, device by device; `paced`: each second's over a second of wall
    time, in PACE_STEPS steps) and wait until all are analysed; returns the CPU time of this thread spent
    delivering (s)."""
    assert source.deliver is not None
    done = daemon.stats().get("windows", 0) + sum(len(p) for p in payloads)
    cpu, start = time.thread_time(), time.monotonic()
    step = max(1, -(-len(names) // PACE_STEPS))
    for k, windows in enumerate(payloads):
        for first in range(0, len(names), step):
            if paced:
                time.sleep(max(0.0, start + k + first / len(names) - time.monotonic()))
            for name, payload in zip(names[first:first + step], windows[first:first + step], strict=True):
                source.deliver(name, payload, time.monotonic())
    spent = time.thread_time() - cpu
    while daemon.stats().get("windows", 0) < done:
        time.sleep(0.01)
    return spent


def stage_table(core: list[dict[str, Any]], mqtt_us: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The stage table (markdown) of core runs at several beats cadences (publishing over paho included), paho's
    cost to receive a window added per MQTT version; and the totals: daemon CPU µs per device-second by
    configuration (the core run publishes with the daemon's default, MQTT 5)."""
    stages = sorted({s for run in core for s in run["stages_us_per_device_s"]},
                    key=lambda s: -core[0]["stages_us_per_device_s"].get(s, 0.0))
    head = " | ".join("beats every window" if r["beats_every_s"] == 0 else f"beats every {r['beats_every_s']:g} s"
                      for r in core)
    lines = [f"| stage (µs of daemon CPU per device-second) | {head} | what would remove it |",
             "|---|" + "---|" * (len(core) + 1)]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{r['stages_us_per_device_s'].get(stage, 0.0):.1f}" for r in core)
                     + f" | {LEVERS.get(stage, '-')} |")
    lines.append("| **daemon core** | " + " | ".join(f"**{r['us_per_device_s']:.0f}**" for r in core) + " | |")
    lines.append("| batch size the worker formed (windows per model run, mean) | " + " | ".join(
        f"{r['batch_mean']:.0f}" for r in core) + " | |")
    totals: dict[str, float] = {}
    for protocol, cost in mqtt_us.items():
        for r in core:
            totals[_total_key(protocol, r["beats_every_s"])] = r["us_per_device_s"] + cost["receive_us"]
        lines.append(f"| paho-mqtt, MQTT {protocol}: receive a window (measured apart; publishing is in the core run) "
                     "| " + " | ".join(f"{cost['receive_us']:.0f}" for _ in core) + f" | {PAHO_LEVER} |")
    for protocol in mqtt_us:
        lines.append(f"| **total, MQTT {protocol}** | " + " | ".join(
            f"**{totals[_total_key(protocol, r['beats_every_s'])]:.0f}**" for r in core) + " | |")
    return "\n".join(lines), totals


def _total_key(protocol: str, beats_every_s: float) -> str:
    """"5/0": MQTT 5, beats every window; "3.1.1/5": MQTT 3.1.1, beats every 5 s."""
    return f"{protocol}/{beats_every_s:g}"


def memory_table(run: dict[str, Any], batch_memory_mb: dict[str, float], state_bytes: int) -> str:
    """Memory per device (steady state) by module, and the batch-dependent part."""
    lines = ["| allocated by | bytes per device |", "|---|---|"]
    for module, size in run["python_bytes_by_module"].items():
        if abs(size) >= 20:
            lines.append(f"| {module} | {size:.0f} |")
    lines.append(f"| **all (tracemalloc: Python objects and numpy arrays)** | "
                 f"**{run['python_bytes_per_device']:.0f}** |")
    lines.append(f"| of which the numpy slot arrays (recurrent states, picker, beat context, recent signal) | "
                 f"{state_bytes} |")
    batch = "; ".join(f"{mb:.0f} MB after batches of {b}" for b, mb in batch_memory_mb.items())
    return "\n".join(lines) + (
        f"\n\nNot per device but per batch: ONNX Runtime keeps buffers for the largest batch it has run ({batch}); "
        "`batching.max_batch` (256 by default) bounds it.\n\nWhat would reduce the per-device part: the beat "
        "context's 1.5 s look-back of float32 signal at 360 Hz (pipeline/analysis/beat_context.py) and the detectors' "
        "4 s at 90 Hz (pipeline/analysis/recent.py) as float16 (half their bytes; the signal would keep about 3 "
        "significant digits, so the features change and the DS2 report may: not tried); "
        "the per-device Python objects (pipeline/process/daemon.py, \"other\": dataclass instances) as slot arrays.")
