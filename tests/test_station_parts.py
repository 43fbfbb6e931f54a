"""The station's parts without a browser: staff logins, the wall's memory bound and review strips, and `ecgmon
station` as a process that stops on its signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.io.codec import encode_binary
from pipeline.tools.broker import LocalBroker
from pipeline.tools.station.config import load_station_config
from pipeline.tools.station.users import UsersError, read_users, set_user, verify
from pipeline.tools.station.wall import Wall
from tests.conftest import T0

REPO = Path(__file__).resolve().parent.parent


def window(seq: int, fs: float = 250.0) -> bytes:
    """One second of two leads: lead I is the sample index (in mV / 100), lead II its negative."""
    n = int(fs)
    adc = np.stack([np.arange(n), -np.arange(n)]).astype(np.int16)
    return encode_binary(seq, T0 + seq, fs, ["I", "II"], adc, [100.0, 100.0], [0, 0])


class TestUsers:
    def test_passwords_are_hashed_checked_and_replaced(self, tmp_path: Path) -> None:
        path = tmp_path / "users"
        set_user(path, "nurse-ana", "correct horse")
        set_user(path, "dr-bo", "battery staple")
        assert "correct horse" not in path.read_text() and path.stat().st_mode & 0o077 == 0
        users = read_users(path)
        assert verify(users, "nurse-ana", "correct horse") and not verify(users, "nurse-ana", "battery staple")
        assert not verify(users, "nobody", "correct horse")
        set_user(path, "nurse-ana", "a new password")
        assert verify(read_users(path), "nurse-ana", "a new password") and verify(read_users(path), "dr-bo",
                                                                                 "battery staple")

    @pytest.mark.parametrize(("name", "password"), [("bad name", "long enough"), ("ok", "short")])
    def test_bad_logins_are_refused(self, tmp_path: Path, name: str, password: str) -> None:
        with pytest.raises(UsersError):
            set_user(tmp_path / "users", name, password)
        assert not (tmp_path / "users").exists()

    def test_a_malformed_users_file_is_an_error(self, tmp_path: Path) -> None:
        (tmp_path / "users").write_text("nurse-ana:plaintext\n")
        with pytest.raises(UsersError, match="users:1"):
            read_users(tmp_path / "users")


class TestWall:
    def test_keeps_keep_s_of_ecg_and_cuts_review_strips_of_every_lead(self) -> None:
        updates: list[dict[str, Any]] = []
        wall = Wall(keep_s=20.0, silent_s=5.0, beds_file=None, publish=updates.append)
        for seq in range(60):
            wall.on_ecg("bed", window(seq))
        wall.on_beats("bed", {"beats": [{"time": T0 + s + 0.5, "class": "N"} for s in range(60)]})
        wall.on_alarm({"alarm_id": "bed/asystole/1", "device": "bed", "type": "asystole", "state": "raised",
                       "time": T0 + 55.0, "priority": "high", "message": "Asystole",
                       "evidence": {"raised_at": T0 + 55.0}, "acknowledged": None})
        strip = wall.review("bed/asystole/1")
        assert strip is not None and strip["leads"] == ["I", "II"] and strip["fs"] == 250.0
        samples = np.array(strip["samples"], dtype=float)
        assert samples.shape == (2, 5000)  # 20 s at 250 Hz
        np.testing.assert_allclose(samples[0, :250], np.arange(250) / 100, atol=0.01)  # from T0 + 45 s
        np.testing.assert_allclose(samples[1, :3750], -samples[0, :3750])
        assert np.isnan(samples[:, 3750:]).all()  # nothing after T0 + 60 s yet
        assert len(strip["beats"]) == 15
        old = wall.review("nothing")
        assert old is None
        wall.on_alarm({"alarm_id": "bed/asystole/0", "device": "bed", "type": "asystole", "state": "raised",
                       "time": T0 + 10.0, "priority": "high", "message": "Asystole",
                       "evidence": {"raised_at": T0 + 10.0}, "acknowledged": None})
        early = wall.review("bed/asystole/0")
        assert early is not None and np.isnan(np.array(early["samples"], dtype=float)).all()  # older than keep_s
        assert [u["type"] for u in updates].count("ecg") == 60

    def test_a_bed_without_ecg_for_silent_s_is_silent_until_it_comes_back(self) -> None:
        updates: list[dict[str, Any]] = []
        wall = Wall(keep_s=20.0, silent_s=5.0, beds_file=None, publish=updates.append)
        wall.on_ecg("bed", window(0))
        start = time.monotonic()
        wall.check_silent(start + 4.0)
        assert not wall.snapshot()["beds"][0]["silent"]
        wall.check_silent(start + 6.0)
        assert wall.snapshot()["beds"][0]["silent"] and updates[-1]["bed"]["silent"]
        wall.on_ecg("bed", window(1))
        assert not wall.snapshot()["beds"][0]["silent"]

    def test_bed_names_are_kept_in_the_beds_file(self, tmp_path: Path) -> None:
        beds = tmp_path / "beds.json"
        Wall(60.0, 5.0, beds, lambda u: None).rename("bed", "Bed 12", "Ana B.", 3)
        bed = Wall(60.0, 5.0, beds, lambda u: None)
        bed.on_ecg("bed", window(0))
        assert {k: bed.snapshot()["beds"][0][k] for k in ("label", "patient", "order")} == {
            "label": "Bed 12", "patient": "Ana B.", "order": 3}


def test_station_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    users = tmp_path / "users"
    set_user(users, "nurse-ana", "correct horse")
    with LocalBroker() as broker:
        config = tmp_path / "station.yaml"
        config.write_text(yaml.safe_dump({"port": 0, "users_file": str(users),
                                          "mqtt": {"host": broker.host, "port": broker.port, "username": None}}))
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "station", "--config", str(config)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert process.stdout is not None and process.stderr is not None
            line = process.stdout.readline()
            assert line.startswith("central station at http://127.0.0.1:"), line + process.stderr.read()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            process.kill()
            process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def test_an_unreachable_broker_stops_the_station_with_a_reason(tmp_path: Path) -> None:
    users = tmp_path / "users"
    set_user(users, "nurse-ana", "correct horse")
    config = tmp_path / "station.yaml"
    config.write_text(yaml.safe_dump({"port": 0, "users_file": str(users),
                                      "mqtt": {"host": "127.0.0.1", "port": 1, "username": None}}))
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "station", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1 and "station failed to start" in res.stderr


def test_the_station_config_keeps_its_own_client_id_and_login(tmp_path: Path) -> None:
    """A broker section in the file must not give the station the daemon's client id (each would throw the other
    off the broker)."""
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"host": "broker.example", "port": 8883}}))
    config = load_station_config(path)
    assert (config.mqtt.client_id, config.mqtt.username, config.mqtt.host) == (
        "ecgmon-station", "ecgmon-station", "broker.example")
    path.write_text(yaml.safe_dump({"mqtt": {"hots": "typo"}}))
    with pytest.raises(ConfigError, match="hots"):
        load_station_config(path)


def test_the_shipped_station_config_validates() -> None:
    config = load_station_config(REPO / "configs" / "station.yaml")
    assert config.mqtt.client_id == "ecgmon-station" and config.port == 8080
