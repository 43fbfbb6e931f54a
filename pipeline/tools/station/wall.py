"""The bed wall's state: every bed's name, recent ECG, beats, heart rate and alarms, from the broker's messages.

Thread-safe: the MQTT network thread feeds it, the web server reads it. Each change is also turned into an update
for the browsers (a JSON-able dict) and handed to `publish`.

Memory is bounded per bed by `keep_s` of ECG (float16 mV, every lead, at the device's rate: 2 h of two leads at
360 Hz is 10.4 MB), its beats, and at most MAX_ALARMS alarm messages for the whole wall.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.io.codec import DecodeError, decode_window

log = logging.getLogger(__name__)

MAX_ALARMS = 5000  # alarm messages kept for the alarm list (the newest)
MAX_WINDOW_BYTES = 1 << 20
HR_BEATS = 8  # the heart rate is the median of the last HR_BEATS RR intervals
NO_RATE = ("ventricular_fibrillation", "asystole")  # while open, the wall shows no heart rate
REVIEW_S = (10.0, 10.0)  # a review strip: this long before and after the alarm (s)
RHYTHMS = (("ventricular_fibrillation", "VF"), ("asystole", "Asystole"), ("ventricular_tachycardia", "VT"),
           ("atrial_fibrillation", "AF"), ("extreme_bradycardia", "Brady"), ("extreme_tachycardia", "Tachy"),
           ("svt", "SVT"), ("ventricular_bigeminy", "Bigeminy"), ("ventricular_trigeminy", "Trigeminy"))
Publish = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Kept:
    """One window kept for review: start (s, Unix), rate (Hz), leads, samples (n_leads, n) in mV."""

    t0: float
    fs: float
    leads: tuple[str, ...]
    samples_mv: NDArray[np.float16]

    @property
    def end(self) -> float:
        return self.t0 + int(self.samples_mv.shape[1]) / self.fs


@dataclass
class Bed:
    """One device as the wall shows it."""

    device: str
    label: str
    patient: str = ""
    order: int = 0
    leads: list[str] = field(default_factory=list)
    fs: float = 0.0
    last_ecg: float | None = None  # when its last window arrived (s, monotonic)
    silent: bool = False
    windows: deque[Kept] = field(default_factory=deque)
    beats: deque[tuple[float, str]] = field(default_factory=deque)
    alarms: dict[str, dict[str, Any]] = field(default_factory=dict)  # open alarms by id: last message

    def heart_rate_bpm(self) -> float | None:
        """From the last beats; None without three, or while VF or asystole is open (no rate to count)."""
        times = [t for t, _ in itertools.islice(reversed(self.beats), HR_BEATS + 1)][::-1]
        if len(times) < 3 or any(a["type"] in NO_RATE for a in self.alarms.values()):
            return None
        return round(60.0 / float(np.median(np.diff(times))), 0)

    def rhythm(self) -> str:
        """The rhythm its open alarms name (the gravest first), else "Sinus" while beats come, else "—"."""
        types = {a["type"] for a in self.alarms.values()}
        for alarm_type, name in RHYTHMS:
            if alarm_type in types:
                return name
        return "Sinus" if self.beats and not self.silent else "—"

    def doc(self) -> dict[str, Any]:
        """What the page shows of it."""
        return {"device": self.device, "label": self.label, "patient": self.patient, "order": self.order,
                "leads": self.leads, "fs": self.fs, "silent": self.silent, "heart_rate_bpm": self.heart_rate_bpm(),
                "rhythm": self.rhythm(), "alarms": list(self.alarms.values())}


class Wall:
    """Every bed, and the alarm list; `publish(update)` receives each change for the browsers."""

    def __init__(self, keep_s: float, silent_s: float, beds_file: Path | None, publish: Publish) -> None:
        self.keep_s, self.silent_s, self._beds_file, self._publish = keep_s, silent_s, beds_file, publish
        self._lock = threading.Lock()
        self._beds: dict[str, Bed] = {}
        self._alarm_log: deque[dict[str, Any]] = deque(maxlen=MAX_ALARMS)
        self._names = self._read_names()
        self.rejected = 0  # ECG windows the station could not decode (the daemon rejects and reports them)

    # --- from the broker ---------------------------------------------------------------------------
    def on_ecg(self, device: str, payload: bytes) -> None:
        try:
            window = decode_window(payload, MAX_WINDOW_BYTES)
        except DecodeError:
            self.rejected += 1
            return
        with self._lock:
            bed = self._bed(device)
            changed = bed.silent or bed.leads != list(window.leads) or bed.fs != window.fs
            bed.leads, bed.fs, bed.last_ecg, bed.silent = list(window.leads), window.fs, time.monotonic(), False
            kept = Kept(window.t0, window.fs, window.leads, window.samples_mv.astype(np.float16))
            bed.windows.append(kept)
            while bed.windows and bed.windows[0].end < kept.end - self.keep_s:
                bed.windows.popleft()
            doc = bed.doc() if changed else None
        if doc is not None:
            self._publish({"type": "bed", "bed": doc})
        self._publish({"type": "ecg", "device": device, "t0": window.t0, "fs": window.fs, "leads": list(window.leads),
                       "samples_uv": np.round(window.samples_mv * 1000).astype(np.int32).tolist()})

    def on_beats(self, device: str, doc: dict[str, Any]) -> None:
        with self._lock:
            bed = self._bed(device)
            before = bed.heart_rate_bpm()
            bed.beats.extend((float(b["time"]), str(b["class"])) for b in doc.get("beats", []))
            while bed.beats and bed.beats[0][0] < bed.beats[-1][0] - self.keep_s:
                bed.beats.popleft()
            update = bed.doc() if bed.heart_rate_bpm() != before else None
        if update is not None:
            self._publish({"type": "bed", "bed": update})

    def on_alarm(self, doc: dict[str, Any], open_copy: bool = False) -> None:
        """An alarm event, or (`open_copy`) the last message of an alarm open before the station came."""
        device, alarm_id = str(doc.get("device", "")), str(doc.get("alarm_id", ""))
        if not device or not alarm_id:
            return
        with self._lock:
            bed = self._bed(device)
            if open_copy and alarm_id in bed.alarms:
                return
            if doc.get("state") == "cleared":
                bed.alarms.pop(alarm_id, None)
            else:
                bed.alarms[alarm_id] = doc
            self._alarm_log.append(doc)
            bed_doc = bed.doc()
        self._publish({"type": "alarm", "alarm": doc})
        self._publish({"type": "bed", "bed": bed_doc})

    def on_forgotten(self, device: str, alarm_type: str) -> None:
        """A retained open alarm emptied: closed while the station was away."""
        with self._lock:
            bed = self._beds.get(device)
            if bed is None:
                return
            gone = [i for i, a in bed.alarms.items() if a.get("type") == alarm_type]
            for alarm_id in gone:
                del bed.alarms[alarm_id]
            bed_doc = bed.doc()
        if gone:
            self._publish({"type": "bed", "bed": bed_doc})

    def check_silent(self, now: float) -> None:
        """Mark beds whose last window came more than `silent_s` before `now` (s, monotonic) as silent."""
        with self._lock:
            fallen = [b for b in self._beds.values()
                      if not b.silent and b.last_ecg is not None and now - b.last_ecg > self.silent_s]
            for bed in fallen:
                bed.silent = True
            docs = [b.doc() for b in fallen]
        for doc in docs:
            self._publish({"type": "bed", "bed": doc})

    # --- from the page -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"beds": [b.doc() for b in self._beds.values()], "alarms": list(self._alarm_log)}

    def rename(self, device: str, label: str, patient: str, order: int) -> None:
        """Name a bed (label, patient) and place it (`order`: lower first); kept in the beds file."""
        with self._lock:
            bed = self._bed(device)
            bed.label, bed.patient, bed.order = label[:40] or device, patient[:80], order
            self._names[device] = {"label": bed.label, "patient": bed.patient, "order": order}
            doc = bed.doc()
            self._write_names()
        self._publish({"type": "bed", "bed": doc})

    def review(self, alarm_id: str) -> dict[str, Any] | None:
        """Every lead's ECG from REVIEW_S before the alarm's raise to after it, and the beats in it; None if the
        station has no such alarm."""
        with self._lock:
            alarm = next((a for a in reversed(self._alarm_log) if a.get("alarm_id") == alarm_id), None)
            if alarm is None or str(alarm.get("device")) not in self._beds:
                return None
            bed = self._beds[str(alarm["device"])]
            at = float(alarm.get("evidence", {}).get("raised_at", alarm.get("time", 0.0)))
            start, end = at - REVIEW_S[0], at + REVIEW_S[1]
            windows = [w for w in bed.windows if w.t0 < end and w.end > start]
            beats = [(t, c) for t, c in bed.beats if start <= t <= end]
        strip = strip_of(windows, start, end)
        return {"alarm": alarm, "start": start, "end": end, "at": at, **strip,
                "beats": [{"time": t, "class": c} for t, c in beats]}

    # --- internals ----------------------------------------------------------------------------------
    def _bed(self, device: str) -> Bed:
        bed = self._beds.get(device)
        if bed is None:
            names = self._names.get(device, {})
            bed = Bed(device, str(names.get("label", device)), str(names.get("patient", "")),
                      int(names.get("order", len(self._beds))))
            self._beds[device] = bed
        return bed

    def _read_names(self) -> dict[str, dict[str, Any]]:
        if self._beds_file is None or not self._beds_file.exists():
            return {}
        try:
            names = json.loads(self._beds_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.error("cannot read the beds file %s (%s): beds start unnamed", self._beds_file, err)
            return {}
        return names if isinstance(names, dict) else {}

    def _write_names(self) -> None:
        if self._beds_file is None:
            return
        try:
            tmp = self._beds_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._names, indent=1))
            tmp.replace(self._beds_file)
        except OSError as err:
            log.error("cannot write the beds file %s: %s", self._beds_file, err)


def strip_of(windows: list[Kept], start: float, end: float) -> dict[str, Any]:
    """The samples of `windows` (one device, in order) from `start` to `end` (s) per lead, at the first window's rate
    and leads (mV, NaN where nothing arrived): {"fs", "leads", "t0", "samples"}."""
    if not windows:
        return {"fs": 0.0, "leads": [], "t0": start, "samples": []}
    fs, leads = windows[0].fs, list(windows[0].leads)
    n = max(round((end - start) * fs), 0)
    out: NDArray[np.float64] = np.full((len(leads), n), np.nan)
    for w in windows:
        if w.fs != fs or list(w.leads) != leads:
            continue
        first = round((w.t0 - start) * fs)
        lo, hi = max(first, 0), min(first + w.samples_mv.shape[1], n)
        if lo < hi:
            out[:, lo:hi] = w.samples_mv[:, lo - first:hi - first]
    samples = [[None if np.isnan(v) else round(float(v), 3) for v in lead] for lead in out]
    return {"fs": fs, "leads": leads, "t0": start, "samples": samples}
