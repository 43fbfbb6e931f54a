"""Every outgoing message, as pipeline/io/messages.py builds it, validates against docs/asyncapi.yaml."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from pipeline.alarms.rules import AlarmEvent
from pipeline.io import messages
from tests.conftest import T0, validate

EVENT = AlarmEvent("bed/asystole/1767225604000", "bed", "asystole", "raised", T0 + 4,
                   {"seconds_without_qrs": 4.2, "raised_at": T0 + 4, "model_version": "m"}, "high")

EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("Beats", messages.beats("bed", 3, T0, T0 + 1, "m", [(T0 + 0.31, "N", 0.98), (T0 + 0.9, "V", 0.7)])),
    ("Beats", messages.beats("bed", 4, T0 + 1, T0 + 6, "m", [])),
    ("Alarm", messages.alarm(EVENT)),
    ("Alarm", messages.alarm(AlarmEvent("bed/ventricular_fibrillation/1", "bed", "ventricular_fibrillation", "raised",
                                        T0 + 9, {"vf_since": T0 + 8, "raised_at": T0 + 9, "model_version": "m"},
                                        "high"))),
    ("Alarm", messages.alarm(AlarmEvent("bed/atrial_fibrillation/1", "bed", "atrial_fibrillation", "updated", T0 + 60,
                                        {"p_af": 0.93, "heart_rate_bpm": 112.0, "beat_counts": {"N": 33},
                                         "span": [T0, T0 + 59], "raised_at": T0 + 40, "model_version": "m"},
                                        "medium", {"by": "nurse-ana", "at": T0 + 61.5, "silenced_until": T0 + 181.5}))),
    ("Ack", messages.ack("bed/atrial_fibrillation/1", "silence", "nurse-ana")),
    ("Rejection", messages.rejection("bed", "bad_t0", "t0 1.0 outside ...", T0)),
    ("Rejection", messages.rejection("x" * 300, "bad_device_id", "...", T0)),
    ("Status", messages.status("online", "m", degraded=False, analysis_alive=True, now=T0)),
    ("Status", json.loads(messages.last_will())),
    ("Stats", messages.stats("m", 3, 0, degraded=True, analysis_alive=False, counts={"windows": 9}, now=T0)),
]


@pytest.mark.parametrize(("schema", "doc"), EXAMPLES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(EXAMPLES)])
def test_each_message_matches_its_schema(schema: str, doc: dict[str, Any]) -> None:
    validate(doc, schema)


def test_a_message_that_breaks_its_schema_is_caught() -> None:
    doc = messages.beats("bed", 3, T0, T0 + 1, "m", [(T0, "X", 0.5)])  # no such AAMI class
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, "Beats")
    assert len(messages.rejection("x" * 300, "bad_device_id", "", T0)["device"]) == 100


def test_throttle_lets_one_message_per_key_through_per_interval() -> None:
    throttle = messages.Throttle(5.0, max_keys=2)
    assert [throttle.allow(k, t) for k, t in [("a", 0.0), ("a", 1.0), ("b", 1.0), ("a", 5.0), ("b", 5.5)]] == [
        True, False, True, True, False]
    assert throttle.allow("c", 6.0)  # a third key: the others are forgotten...
    assert throttle.allow("b", 6.1)  # ...so b may go again
