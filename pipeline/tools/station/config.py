"""The station's configuration: strict YAML (unknown keys are errors), `ECGMON_<SECTION>__<KEY>` overrides."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.config import MqttConfig, Strict, load_strict


class StationMqttConfig(MqttConfig):
    """The broker, as the daemon's `mqtt` section, with the station's own client id and login."""

    client_id: str = "ecgmon-station"
    username: str | None = "ecgmon-station"


class StationConfig(Strict):
    """Where the station listens, the broker it reads, its staff and beds files, what it keeps."""

    host: str = Field("127.0.0.1", description="address the web page is served on")
    port: int = Field(8080, ge=0, le=65535, description="its port (0: any free one)")
    mqtt: StationMqttConfig = StationMqttConfig()
    users_file: Path = Field(Path("/etc/ecgmon/station-users"), description="staff logins (`ecgmon station-user`)")
    beds_file: Path | None = Field(None, description="bed labels, patient names and order, written by the page "
                                   "(None: kept in memory)")
    keep_s: float = Field(7200.0, gt=0, le=86400, description="ECG, beats and alarms kept per bed for review (s)")
    silent_s: float = Field(10.0, gt=0, description="a bed without ECG for this long shows no signal (s); the "
                            "daemon's alarms.signal_loss_s")


def load_station_config(path: Path | None) -> StationConfig:
    """The YAML file (or defaults when None) with environment overrides; ConfigError if invalid."""
    return load_strict(StationConfig, path)
