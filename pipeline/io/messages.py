"""Every message the daemon publishes, and the acknowledgement a central station sends it, built here: one function
per message of docs/asyncapi.yaml.

Times are Unix times (s): signal times (the sensor's clock) for beats and alarms, the daemon's clock
for the rest.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.alarms.rules import AlarmEvent


def beats(device: str, seq: int, t0: float, t1: float, model_version: str,
          found: list[tuple[float, str, float]]) -> dict[str, Any]:
    """Beats: the beats (R-peak time s, AAMI class, confidence 0-1) completed by the windows from `t0` to `t1`
    (s), the last of them window `seq`: one window, or several at the `output.beats_every_s` cadence."""
    return {"device": device, "seq": seq, "t0": t0, "t1": t1, "model_version": model_version,
            "beats": [{"time": round(t, 4), "class": c, "confidence": round(p, 3)} for t, c, p in found]}


def alarm(event: AlarmEvent) -> dict[str, Any]:
    """Alarm: one lifecycle event; `acknowledged` once staff acknowledged it (`ecgmon/acks/<device>`), else null."""
    return {"alarm_id": event.alarm_id, "device": event.device, "type": event.type, "kind": event.kind,
            "priority": event.priority, "state": event.state, "time": event.time, "message": event.message,
            "evidence": event.evidence, "acknowledged": event.acknowledged}


def ack(alarm_id: str, action: str, by: str) -> dict[str, Any]:
    """Ack: staff login `by` acknowledges (action "acknowledge") or silences ("silence") the open alarm `alarm_id`;
    decoded by `pipeline.io.codec.decode_ack`."""
    return {"alarm_id": alarm_id, "action": action, "by": by}


def rejection(device: str, reason: str, detail: str, now: float) -> dict[str, Any]:
    """Rejection: why a message of `device` (the topic's last level, cut to 100 characters) was rejected."""
    return {"device": device[:100], "reason": reason, "detail": detail, "time": now}


def status(state: str, model_version: str, degraded: bool, analysis_alive: bool, now: float,
           alarms_delayed: bool = False) -> dict[str, Any]:
    """Status: availability ("online" / "offline"), published by the daemon itself."""
    return {"state": state, "model_version": model_version, "time": now, "degraded": degraded,
            "analysis_alive": analysis_alive, "alarms_delayed": alarms_delayed}


def last_will() -> bytes:
    """Status as the broker publishes it when the daemon's connection dies."""
    return json.dumps({"state": "offline", "reason": "connection lost"}).encode()


def stats(model_version: str, active_streams: int, queue_windows: int, degraded: bool, analysis_alive: bool,
          counts: dict[str, int | float], now: float) -> dict[str, Any]:
    """Stats: the counters since start (`counts`) and the daemon's state now."""
    return {"time": now, "model_version": model_version, "active_streams": active_streams,
            "queue_windows": queue_windows, "degraded": degraded, "analysis_alive": analysis_alive, **counts}


class Throttle:
    """At most one message per key every `interval_s` (s); it forgets all keys when it holds `max_keys`."""

    def __init__(self, interval_s: float, max_keys: int = 100_000) -> None:
        self.interval_s, self.max_keys = interval_s, max_keys
        self._last: dict[str, float] = {}

    def allow(self, key: str, now: float) -> bool:
        """Whether a message for `key` may go out at `now` (s, monotonic); if so, it counts as sent."""
        if now - self._last.get(key, now - self.interval_s) < self.interval_s:
            return False
        if key not in self._last and len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True
