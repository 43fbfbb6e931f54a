"""Open alarms after a restart: what subscribers saw raised (the broker's retained open alarms) against the
alarm state the daemon restored, so that every alarm raised is eventually cleared or still true."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.alarms import ALARM_TYPES, PRIORITIES, AlarmEvent, DeviceAlarms

log = logging.getLogger(__name__)

ORPHAN_REASON = "the daemon restarted without this alarm's state; re-evaluated from new data"


def reconcile(open_docs: list[dict[str, Any]], alarms_of: dict[str, DeviceAlarms],
              signal_time_of: Callable[[str], float]) -> list[AlarmEvent]:
    """The `cleared` events for open alarms the daemon holds no state for (raised after its last save, or
    on another daemon); a held alarm the subscribers saw cleared is forgotten, one they saw open goes on.

    Args:
        open_docs: the last message of each open alarm (docs/asyncapi.yaml, Alarm).
        alarms_of: the restored alarm state of each device; updated.
        signal_time_of: a device's current signal time (s, Unix time; 0 if unknown).
    """
    open_ids = {str(d.get("alarm_id")) for d in open_docs}
    held: set[str] = set()
    for alarms in alarms_of.values():
        alarms.keep_only(open_ids)
        held |= alarms.alarm_ids()
    events = [e for d in open_docs if str(d.get("alarm_id")) not in held
              if (e := clear_orphan(d, signal_time_of(str(d.get("device"))))) is not None]
    log.info("open alarms on the broker: %d, continued: %d, cleared: %d", len(open_docs), len(held & open_ids),
             len(events))
    return events


def clear_orphan(doc: dict[str, Any], now: float) -> AlarmEvent | None:
    """The `cleared` event (at `now`, s, or its raise time if later) of the open alarm whose last message is
    `doc`; None if `doc` is not an alarm of a known type."""
    try:
        alarm_type, raised = str(doc["type"]), float(doc["evidence"]["raised_at"])
        if alarm_type not in ALARM_TYPES:
            return None
        return AlarmEvent(str(doc["alarm_id"]), str(doc["device"]), alarm_type, "cleared", max(now, raised),
                          {"reason": ORPHAN_REASON, "raised_at": raised,
                           "model_version": doc["evidence"]["model_version"]},
                          doc["priority"] if doc.get("priority") in PRIORITIES else ALARM_TYPES[alarm_type][1])
    except (KeyError, TypeError, ValueError):
        return None
