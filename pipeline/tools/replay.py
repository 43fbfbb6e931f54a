"""Publish PhysioNet records as live devices: many devices, real time or faster, JSON or binary.

Reading WFDB records needs wfdb (`pipeline/tools/records.py`), never torch. Device i replays record
i mod n_records from offset (i * offset_step_s) mod its duration, so many devices from few
records are not in lockstep. Like a real sensor, a device publishes a window once its last
sample exists (at t0 + window length), and devices are spread evenly over the window
period rather than all publishing at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from numpy.typing import NDArray

from pipeline.io.codec import encode_binary, encode_json
from pipeline.io.mqtt import MqttClient, Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySignal:
    """A record's leads as ADC samples, (n_leads, n_samples): mV = (adc - baseline) / gain, per lead."""

    name: str
    fs: float
    leads: tuple[str, ...]
    adc: NDArray[np.int16]
    gain: tuple[float, ...]
    baseline: tuple[int, ...]

    @property
    def duration_s(self) -> float:
        return float(self.adc.shape[1] / self.fs)

    @property
    def samples_mv(self) -> NDArray[np.float64]:
        """The leads in mV, (n_leads, n_samples)."""
        mv: NDArray[np.float64] = (self.adc - np.array(self.baseline)[:, None]) / np.array(self.gain)[:, None]
        return mv


def load_signals(specs: list[str], physionet_dir: Path, leads: list[str] | None) -> list[ReplaySignal]:
    """Read records ("db/record", "mitdb/DS2", ...) as ADC samples, downloading when missing; `leads`: names or
    1-based numbers, those a record has (None: every ECG lead)."""
    from pipeline.tools.records import load_records  # wfdb only here

    out = []
    for name, r in load_records(specs, physionet_dir, leads):
        adc = np.round(r.signals_mv * np.array(r.adc_gains)[:, None] + np.array(r.baselines)[:, None])
        out.append(ReplaySignal(name.replace("/", "-"), r.fs, r.sig_names, adc.astype(np.int16), r.adc_gains,
                                r.baselines))
    return out


@dataclass(frozen=True)
class ReplayPlan:
    """What to publish. Times in seconds of ECG; `speed` 1 is real time."""

    devices: int = 1
    window_s: float = 1.0
    speed: float = 1.0
    duration_s: float | None = None
    encoding: str = "binary"
    offset_step_s: float = 0.0
    t0: float | None = None  # signal time of the first sample (default: now)
    device_prefix: str = ""
    qos: int = 1


def device_ids(signals: list[ReplaySignal], plan: ReplayPlan) -> list[str]:
    """Device i is named after its record, e.g. "mitdb-208" or "mitdb-208-0003" when devices repeat records."""
    if plan.devices <= len(signals):
        return [plan.device_prefix + s.name for s in signals[:plan.devices]]
    return [f"{plan.device_prefix}{signals[i % len(signals)].name}-{i:05d}" for i in range(plan.devices)]


def assign(signals: list[ReplaySignal], devices: int, offset_step_s: float) -> list[tuple[ReplaySignal, int]]:
    """Each device's record (device i replays record i mod len(signals)) and first sample: i * offset_step_s (s)
    into it, modulo its duration."""
    assigned = [signals[i % len(signals)] for i in range(devices)]
    return [(s, round(((i * offset_step_s) % s.duration_s) * s.fs)) for i, s in enumerate(assigned)]


def replay(client: MqttClient, topics: Topics, signals: list[ReplaySignal], plan: ReplayPlan,
           stop: threading.Event | None = None) -> int:
    """Publish windows for every device until the records (or duration_s) end; returns windows sent."""
    ids = device_ids(signals, plan)
    t0 = time.time() if plan.t0 is None else plan.t0
    started = time.monotonic()
    phases = [plan.window_s * i / plan.devices for i in range(plan.devices)]  # s of signal time
    assigned, offsets = zip(*assign(signals, plan.devices, plan.offset_step_s), strict=True)
    longest = max(s.duration_s for s in assigned)
    n_windows = int((plan.duration_s or longest) / plan.window_s)
    sent = 0
    lags: list[float] = []  # how late each window went out (s); the load generator's own delay
    unacknowledged: deque[paho.MQTTMessageInfo] = deque(maxlen=10_000)  # the last windows sent
    for k in range(n_windows):
        if stop is not None and stop.is_set():
            break
        for device, signal, offset, phase in zip(ids, assigned, offsets, phases, strict=True):
            a = offset + round(k * plan.window_s * signal.fs)
            b = offset + round((k + 1) * plan.window_s * signal.fs)
            if b > signal.adc.shape[1]:
                continue
            t_first = t0 + phase + k * plan.window_s
            wait = started + (t_first - t0 + plan.window_s) / plan.speed - time.monotonic()
            if wait > 0.001:
                time.sleep(wait)
            lags.append(-wait)
            encode = encode_binary if plan.encoding == "binary" else encode_json
            payload = encode(k, t_first, signal.fs, signal.leads, signal.adc[:, a:b], signal.gain, signal.baseline)
            unacknowledged.append(client.publish(topics.ecg(device), payload, qos=plan.qos))
            sent += 1
    if plan.qos:  # the broker has the windows (QoS 1) before the generator says it is done
        for info in unacknowledged:
            try:
                info.wait_for_publish(timeout=30)
            except (RuntimeError, ValueError) as err:  # sent while disconnected: paho resends it on reconnect
                log.warning("window %d not yet acknowledged: %s", info.mid, err)
    if lags:
        late = np.maximum(np.array(lags), 0.0)
        log.info("replay done: %d windows from %d devices; sent late by p50 %.0f ms, p99 %.0f ms, max %.0f ms",
                 sent, len(ids), 1000 * np.percentile(late, 50), 1000 * np.percentile(late, 99), 1000 * late.max())
    return sent
