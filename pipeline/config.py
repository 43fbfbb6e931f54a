"""Daemon configuration: strict YAML (unknown keys are errors) with environment overrides.

Any key can be overridden by an environment variable ``ECGMON_<SECTION>__<KEY>``, e.g.
``ECGMON_MQTT__PASSWORD`` or ``ECGMON_MQTT__HOST``: that is how secrets reach the daemon,
never through the committed file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from models import SHIPPED_MODEL

ENV_PREFIX = "ECGMON_"
FLAT_MV = 0.01  # a lead below this peak-to-peak (mV) in a window is flat (AlarmConfig.flat_mv; analysis/streams.py)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(Strict):
    """TLS to the broker; paths to PEM files."""

    ca_file: Path
    cert_file: Path | None = Field(None, description="client certificate, when the broker asks for one")
    key_file: Path | None = None

    def paho_options(self) -> dict[str, str | None]:
        """The arguments of paho's `tls_set`."""
        return {"ca_certs": str(self.ca_file), "certfile": str(self.cert_file) if self.cert_file else None,
                "keyfile": str(self.key_file) if self.key_file else None}


class MqttConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = "ecgmon-daemon"
    topic_prefix: str = Field("ecgmon", pattern=r"^[A-Za-z0-9_\-/]+$")
    username: str | None = None
    password: SecretStr | None = Field(None, description="from ECGMON_MQTT__PASSWORD, never the file")
    password_file: Path | None = Field(None, description="file holding the password (e.g. a systemd credential)")
    tls: TlsConfig | None = None
    keepalive_s: int = Field(30, ge=5)
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay; doubles up to max")
    reconnect_max_s: float = Field(30.0, gt=0)
    session_expiry_s: int = Field(3600, ge=0, description="persistent session kept this long by the broker (MQTT 5; "
                                  "with 3.1.1 any value > 0 asks for a persistent session the broker keeps by its "
                                  "own rules)")
    qos_in: int = Field(1, ge=0, le=1, description="QoS of the ECG subscription")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT version; 3.1.1 costs paho less per message "
                                            "(docs/benchmarks.md) but gives up the session expiry interval and the "
                                            "broker's reason codes")


    def secret(self) -> str | None:
        """The password: the environment's, else the password file's first line."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().splitlines()[0]
            except (OSError, IndexError) as err:
                raise ConfigError(f"mqtt.password_file: cannot read a password from {self.password_file}") from err
        return None


class ModelSection(Strict):
    path: Path = SHIPPED_MODEL
    intra_op_threads: int = Field(1, ge=1)
    inter_op_threads: int = Field(1, ge=1)


class StreamsConfig(Strict):
    max_message_bytes: int = Field(64_000, ge=1000, description="larger payloads are rejected")
    max_gap_s: float = Field(0.05, gt=0, description="t0 further than this from the expected time is a gap (s)")
    idle_evict_s: float = Field(120.0, gt=0, description="streams silent this long are forgotten (s)")
    queue_windows: int = Field(20_000, ge=1, description="bound of the inbound window queue")


class BatchingConfig(Strict):
    max_wait_ms: float = Field(20.0, ge=0, description="longest wait to fill a batch (ms)")
    max_batch: int = Field(256, ge=1, description="most windows in one model run: ONNX Runtime keeps ~100 KB per "
                           "window of its largest batch, and is no faster above 256 (docs/benchmarks.md)")


class OutputConfig(Strict):
    beats: bool = Field(True, description="publish per-beat results (QoS 0)")
    beats_every_s: float = Field(0.0, ge=0, le=60, description="0: one beats message per window; more: a device's "
                                 "beats gathered into one message per this much signal (s); alarms stay immediate")
    stats_interval_s: float = Field(10.0, gt=0)


SecondDetectorAlarm = Literal["asystole", "extreme_bradycardia", "extreme_tachycardia", "ventricular_tachycardia",
                             "ventricular_fibrillation"]
# Chosen by 5-fold cross-validation on the Challenge 2015 ICU alarms (docs/alarms): the asystole and extreme
# bradycardia checks are left out, they held back true alarms there (1 and 3) for few false ones (2 and 3).
RhythmStageAlarm = Literal["ventricular_tachycardia", "ventricular_fibrillation"]
# `ecgmon train-rhythm` chose both (docs/alarms/rhythm-cv.json); VT from the rhythm stage raised 27 false VT alarms
# in DS2's 11 h (2.1 false high-priority alarms per hour of normal rhythm, from 0.25), so it ships raising VF only.
RHYTHM_STAGE_DEFAULT: tuple[RhythmStageAlarm, ...] = ("ventricular_fibrillation",)
SECOND_DETECTOR_DEFAULT: tuple[SecondDetectorAlarm, ...] = (
    "extreme_tachycardia", "ventricular_tachycardia", "ventricular_fibrillation")


class AlarmConfig(Strict):
    """Alarm thresholds; defaults from bedside-monitor practice and PhysioNet/CinC 2015."""

    warmup_s: float = Field(10.0, ge=0, description="physiological alarms held back after a stream (re)starts (s)")
    asystole_s: float = Field(4.0, gt=0, description="no QRS for this long (s)")
    brady_bpm: float = Field(40.0, gt=0, description="extreme_bradycardia: the rate and 60 / the median RR over "
                             "brady_beats beats both below this (bpm)")
    brady_clear_bpm: float = Field(45.0, gt=0, description="extreme_bradycardia clears at or above this (bpm; "
                                   "hysteresis)")
    brady_hold_s: float = Field(5.0, ge=0, description="extreme_bradycardia clears once the rate has stayed at or "
                                "above brady_clear_bpm this long (s)")
    brady_beats: int = Field(5, ge=3)
    tachy_bpm: float = Field(140.0, gt=0)
    tachy_beats: int = Field(17, ge=2)
    vt_beats: int = Field(5, ge=3, description="consecutive V beats")
    vt_bpm: float = Field(100.0, gt=0)
    svt_beats: int = Field(5, ge=3, description="consecutive S beats")
    svt_bpm: float = Field(100.0, gt=0)
    bigeminy_cycles: int = Field(3, ge=2, description="consecutive N-V pairs")
    trigeminy_cycles: int = Field(3, ge=2, description="consecutive N-N-V triplets")
    pvc_per_min: float = Field(10.0, gt=0, description="V beats in the last minute")
    pvc_clear_per_min: float = Field(7.0, ge=0, description="pvc_burden clears at or below this (hysteresis)")
    update_interval_s: float = Field(10.0, ge=0, description="at most one 'updated' event per alarm this often (s)")
    event_hold_s: float = Field(30.0, gt=0, description="a pattern alarm clears this long after it was last seen")
    clear_after_beats: int = Field(5, ge=1, description="normal beats that clear a rate or run alarm")
    second_detector: list[SecondDetectorAlarm] = Field(
        default_factory=lambda: list(SECOND_DETECTOR_DEFAULT), description="high-priority alarms that take the second "
        "QRS detector (slope energy, every readable lead) into account: asystole ends at any complex it finds, extreme "
        "bradycardia must be slow with the complexes it found that the network missed, extreme tachycardia and VT "
        "count those complexes in their rate, VF is not raised while a lead without VF shows organized complexes")
    rhythm_stage: list[RhythmStageAlarm] = Field(
        default_factory=lambda: list(RHYTHM_STAGE_DEFAULT), description="ventricular alarms the rhythm stage (a model "
        "that has one: `pipeline.detectors.rhythm`) raises besides their usual rule: ventricular_tachycardia while it "
        "shows VT, ventricular_fibrillation while it shows VF (each after its own confirmation time)")
    rhythm_vt_confirm_s: float = Field(1.0, ge=0, description="ventricular_tachycardia from the rhythm stage: it shows "
                                       "VT without a break for this long (s; its threshold is in the model's metadata)")
    rhythm_vt_clear_s: float = Field(5.0, gt=0, description="ventricular_tachycardia raised by the rhythm stage clears "
                                     "this long after it last showed VT, once the beats show no V run (s)")
    vf_confirm_s: float = Field(1.0, ge=0, description="ventricular_fibrillation: the VF detector says VF without "
                                "a break for this long (s; its threshold is in the model's metadata)")
    vf_clear_s: float = Field(5.0, gt=0, description="ventricular_fibrillation clears this long after the "
                              "detector last said VF (s)")
    af_confirm_s: float = Field(30.0, ge=0, description="atrial_fibrillation: the AF detector says AF at every beat "
                                "for this long (s; its threshold is in the model's metadata)")
    af_clear_s: float = Field(30.0, gt=0, description="atrial_fibrillation clears this long after the detector "
                              "last said AF (s)")
    af_priority: Literal["high", "medium", "low"] = Field("medium", description="IEC 60601-1-8 priority of "
                                                          "atrial_fibrillation")
    signal_loss_s: float = Field(10.0, gt=0, description="no data for this long (s)")
    overload_hold_s: float = Field(10.0, ge=0, description="windows_dropped and the degraded status clear only "
                                   "after this long without a dropped window (s)")
    flat_mv: float = Field(FLAT_MV, gt=0, description="window peak-to-peak below this is a flat line / leads off")
    saturation_run_s: float = Field(0.04, gt=0, description="saturation: the signal sits at one value (within half an "
                                    "ADC step) at the window's maximum or minimum for this long (s) ...")
    saturation_min_mv: float = Field(1.0, gt=0, description="... that value at least this far from 0 mV; or any "
                                     "sample at the int16 limits of the binary format")
    saturation_unreadable_share: float = Field(0.25, gt=0, le=1, description="saturation holds back "
                                               "physiological alarms when this share of a window sits at a rail")
    lead_fault_clear_s: float = Field(10.0, gt=0, description="lead_fault clears this long after the last window "
                                      "with a faulty lead (s): a lead that is noisy on and off does not chatter")
    poor_signal_clear_s: float = Field(5.0, gt=0, description="poor_signal clears this long after the signal-quality "
                                       "detector last said unreadable (s; its threshold is in the model's metadata)")


class StateConfig(Strict):
    """Per-device state saved on shutdown and periodically, restored on start."""

    path: Path | None = Field(None, description="state file; null disables saving and restoring")
    save_interval_s: float = Field(10.0, gt=0, description="the state is saved this often, and the windows it "
                                   "covers then acknowledged to the broker: a daemon killed gets the windows since "
                                   "the last save again (s)")
    max_unsaved_windows: int = Field(20_000, ge=1, description="saved sooner when this many windows wait for a save "
                                     "(the broker holds them unacknowledged: keep below its in-flight limit)")
    max_age_s: float = Field(600.0, gt=0, description="an older state file is ignored (s)")


class MetricsConfig(Strict):
    port: int | None = Field(9464, ge=0, le=65535, description="Prometheus port; null disables, 0 picks one")
    host: str = "127.0.0.1"


class RabbitConfig(Strict):
    """The partitioned source and the AMQP sink on a RabbitMQ cluster (`source: rabbitmq`; pipeline/io/rabbit.py,
    pipeline/io/rabbit_sink.py)."""

    nodes: list[str] = Field(["127.0.0.1:5672"], min_length=1, description="the cluster's nodes, host:port (AMQP); "
                             "the daemon uses the first that answers and moves on when it goes")
    username: str = "guest"
    password: SecretStr = Field(SecretStr("guest"), description="from ECGMON_RABBITMQ__PASSWORD, never the file")
    partitions: int = Field(32, ge=1, le=1024, description="partition queues the devices are spread over: the same "
                            "for every daemon, and fixed once the queues exist")
    prefetch: int = Field(10_000, ge=2, description="windows a daemon may hold unacknowledged per partition: a "
                          "window is acknowledged once a checkpoint holds its effect, and a partition is "
                          "checkpointed early when half of this waits for one")
    checkpoint_s: float = Field(30.0, gt=0, description="how often each partition's device state is checkpointed to "
                                "the cluster for the daemon that takes it over (s): it replays the windows since, "
                                "without publishing again what was published; one is also taken on hand-off")
    tls: TlsConfig | None = Field(None, description="TLS to the nodes' AMQP listeners (deploy/rabbitmq/)")

    @field_validator("nodes")
    @classmethod
    def _host_port(cls, nodes: list[str]) -> list[str]:
        for node in nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{node!r} is not host:port")
        return nodes

    def addresses(self) -> list[tuple[str, int]]:
        return [(node.rpartition(":")[0], int(node.rpartition(":")[2])) for node in self.nodes]


class DaemonConfig(Strict):
    source: Literal["mqtt", "rabbitmq"] = Field("mqtt", description="where ECG windows come from and results go: "
                                                "the MQTT broker, or a RabbitMQ cluster (windows from its partition "
                                                "queues, results over AMQP; of `mqtt` only client_id and topic_prefix "
                                                "are used)")
    rabbitmq: RabbitConfig = RabbitConfig()
    mqtt: MqttConfig = MqttConfig()
    model: ModelSection = ModelSection()
    streams: StreamsConfig = StreamsConfig()
    batching: BatchingConfig = BatchingConfig()
    output: OutputConfig = OutputConfig()
    alarms: AlarmConfig = AlarmConfig()
    metrics: MetricsConfig = MetricsConfig()
    state: StateConfig = StateConfig()
    drain_timeout_s: float = Field(5.0, gt=0, description="longest wait for in-flight windows at shutdown")
    watchdog_s: float = Field(10.0, gt=0, description="analysis that has not turned for this long is reported "
                              "stalled (status, stats, metrics) (s)")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @model_validator(mode="after")
    def _loss_before_eviction(self) -> DaemonConfig:
        if self.alarms.signal_loss_s >= self.streams.idle_evict_s:
            raise ValueError("alarms.signal_loss_s must be shorter than streams.idle_evict_s: a silent device's "
                             "signal loss is raised before its state is forgotten")
        return self

    @model_validator(mode="after")
    def _one_state_store(self) -> DaemonConfig:
        if self.source == "rabbitmq" and self.state.path is not None:
            raise ValueError("state.path must be null with source: rabbitmq: there the device state moves between "
                             "daemons through the cluster's checkpoints (rabbitmq.checkpoint_s)")
        return self


class ConfigError(ValueError):
    """A config does not validate; the message names each bad key."""


M = TypeVar("M", bound=BaseModel)


def validate_config(model: type[M], raw: dict[str, Any], source: str) -> M:
    """`model` validated from `raw`, or ConfigError listing every bad key as dotted.path: problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from err


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ECGMON_<SECTION>__<KEY> variables onto the raw config (values parsed as YAML scalars)."""
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        *parents, leaf = name[len(ENV_PREFIX):].lower().split("__")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value if leaf == "password" else yaml.safe_load(value)
    return raw


def load_strict(model: type[M], path: Path | None, env: Mapping[str, str] | None = None) -> M:
    """`model` from the YAML file (or defaults when None) with environment overrides; raise ConfigError."""
    try:
        raw = (yaml.safe_load(path.read_text()) or {}) if path else {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_env(raw, os.environ if env is None else env)
    return validate_config(model, raw, str(path or "defaults"))


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> DaemonConfig:
    """The daemon's config from the YAML file (or defaults when None) with environment overrides; ConfigError."""
    return load_strict(DaemonConfig, path, env)
