"""Open alarms after a restart: what subscribers see raised (the broker's retained open alarms) against the alarm
state the daemon restored, so that no alarm is cleared that nothing has judged again, and every alarm is eventually
cleared by its rule or still true."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.alarms.rules import ALARM_TYPES, DeviceAlarms

log = logging.getLogger(__name__)


def reconcile(open_docs: list[dict[str, Any]], alarms_of: dict[str, DeviceAlarms],
              new_alarms: Callable[[str, float], DeviceAlarms]) -> dict[str, float]:
    """Continue what the subscribers see open: a held alarm they saw cleared is forgotten; an open alarm the daemon
    holds no state for (raised after its last save, with no state file, or by a daemon before it) is adopted with
    its id, and stays open until its device's data clears it by its rule.

    Args:
        open_docs: the last message of each open alarm (docs/asyncapi.yaml, Alarm).
        alarms_of: the restored alarm state of each device; updated, and added to for devices known only from here.
        new_alarms: a device's alarm state from nothing, given its id and a signal time (s).

    Returns:
        For each device with an adopted alarm, the latest signal time of its alarms' messages (s, Unix time).
    """
    open_ids = {str(d.get("alarm_id")) for d in open_docs}
    held: set[str] = set()
    for alarms in alarms_of.values():
        alarms.keep_only(open_ids)
        held |= alarms.alarm_ids()
    adopted: dict[str, float] = {}
    for doc in open_docs:
        acknowledged = doc.get("acknowledged") if isinstance(doc.get("acknowledged"), dict) else None
        if str(doc.get("alarm_id")) in held:
            if acknowledged is not None and str(doc.get("device")) in alarms_of:
                alarms_of[str(doc["device"])].keep_acknowledgement(str(doc["alarm_id"]), acknowledged)
            continue
        try:
            device, alarm_type, time = str(doc["device"]), str(doc["type"]), float(doc["time"])
            raised = float(doc["evidence"]["raised_at"])
            if alarm_type not in ALARM_TYPES:
                raise ValueError(f"unknown type {alarm_type}")
        except (KeyError, TypeError, ValueError) as err:
            log.warning("ignored a malformed open alarm on the broker (%s): %.200r", err, doc)
            continue
        alarms = alarms_of.get(device) or alarms_of.setdefault(device, new_alarms(device, time))
        alarms.adopt(str(doc["alarm_id"]), alarm_type, raised, time, doc["evidence"], acknowledged)
        adopted[device] = max(time, adopted.get(device, time))
    log.info("open alarms on the broker: %d, continued from the state: %d, adopted: %d", len(open_docs),
             len(held & open_ids), len(open_docs) - len(held & open_ids))
    return adopted
