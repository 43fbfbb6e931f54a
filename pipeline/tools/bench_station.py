"""`ecgmon bench --station`: the central station with many beds on one page, measured.

A local broker, the daemon, `ecgmon station` as a process of its own, and PhysioNet records replayed in real time as
`beds` devices (every lead); one headless chromium page (Playwright, Debian's chromium) logged in to the bed wall.
After a warm-up, over `measure_s`: the page's frame rate and frame times (requestAnimationFrame, every tile's trace
drawn each frame), the CPU of every chromium process, and the station process's CPU per bed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import DaemonConfig, MetricsConfig, MqttConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.bench import STATION_HEADING, proc_cpu_s, write_section
from pipeline.tools.broker import LocalBroker
from pipeline.tools.replay import ReplayPlan, load_signals, replay
from pipeline.tools.station.shots import open_wall
from pipeline.tools.station.users import set_user

log = logging.getLogger(__name__)

USER, PASSWORD = "bench", "bench-password"


def cpu_s(pid: int) -> float:
    """`proc_cpu_s`, 0 for a process gone meanwhile (a chromium helper)."""
    try:
        return proc_cpu_s(pid)
    except OSError:
        return 0.0


def chromium_pids() -> list[int]:
    """Every running chromium process (the browser and its renderer, GPU and utility processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip().startswith("chrom"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def run_station_bench(beds: int, records: list[str], physionet_dir: Path, warmup_s: float,
                      measure_s: float) -> dict[str, Any]:
    """Figures of one run (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    signals = load_signals(records, physionet_dir, None)
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        users = Path(tmp) / "users"
        set_user(users, USER, PASSWORD)
        config = Path(tmp) / "station.yaml"
        config.write_text(yaml.safe_dump({"port": 0, "users_file": str(users),
                                          "mqtt": {"host": broker.host, "port": broker.port, "username": None}}))
        daemon = Daemon(DaemonConfig(mqtt=MqttConfig(host=broker.host, port=broker.port),
                                     metrics=MetricsConfig(port=None)))
        if not daemon.start():
            raise SystemExit("daemon failed to start")
        station = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "station",
                                    "--config", str(config)], stdout=subprocess.PIPE, text=True)
        publisher = MqttClient(broker.host, broker.port, "bench-station-replay")
        publisher.connect()
        stop = threading.Event()
        plan = ReplayPlan(devices=beds, duration_s=warmup_s + measure_s + 30.0, offset_step_s=37.0)
        replayer = threading.Thread(target=replay, args=(publisher, Topics("ecgmon"), signals, plan, stop))
        try:
            assert station.stdout is not None
            url = station.stdout.readline().split()[3]
            replayer.start()
            with sync_playwright() as p:
                browser, page = open_wall(p, url, USER, PASSWORD, 1920, 1080)
                page.wait_for_function(f"() => document.querySelectorAll('.tile[data-playhead]').length >= {beds}",
                                       timeout=120_000)
                time.sleep(warmup_s)  # a benchmark's warm-up: the measured interval is wall-clock time
                pids = chromium_pids()
                before = page.evaluate("() => ({...window.stationStats, frameMs: []})")
                page.evaluate("() => { window.stationStats.frameMs = []; }")
                browser_cpu, station_cpu, started = sum(cpu_s(p) for p in pids), cpu_s(station.pid), time.monotonic()
                time.sleep(measure_s)
                elapsed = time.monotonic() - started
                browser_cpu = sum(cpu_s(p) for p in pids) - browser_cpu
                station_cpu = cpu_s(station.pid) - station_cpu
                after = page.evaluate("() => window.stationStats")
                tiles = page.locator(".tile").count()
                browser.close()
        finally:
            stop.set()
            if replayer.is_alive():
                replayer.join()
            publisher.disconnect()
            station.terminate()
            station.wait(timeout=30)
            if station.stdout is not None:
                station.stdout.close()
            daemon.stop()
    frame_ms = np.array(after["frameMs"], dtype=float)
    return {"beds": beds, "tiles": tiles, "records": records, "measure_s": round(elapsed, 1),
            "frames_per_s": round((after["frames"] - before["frames"]) / elapsed, 1),
            "frame_ms_median": round(float(np.median(frame_ms)), 1),
            "frame_ms_p95": round(float(np.percentile(frame_ms, 95)), 1),
            "ecg_messages_per_s": round((after["ecgMessages"] - before["ecgMessages"]) / elapsed, 1),
            "browser_cpu_percent": round(100 * browser_cpu / elapsed, 1),
            "station_cpu_percent": round(100 * station_cpu / elapsed, 1),
            "station_cpu_ms_per_bed_s": round(1000 * station_cpu / elapsed / beds, 3)}


def write_station_report(figures: dict[str, Any], out: Path, command: str) -> str:
    """The station section of docs/benchmarks.md (and benchmarks-station.json); returns the section."""
    f = figures
    text = f"""{STATION_HEADING}

Generated by `{command}` (one run). A local mosquitto, the daemon, `ecgmon station` as a process of its own, and
{f['beds']} devices replaying {', '.join(f['records'])} in real time (every lead, 1 s windows); one headless chromium
page (1920 x 1080 px, Playwright, no GPU) showing all {f['tiles']} tiles, each sweeping its trace at 25 mm/s, with the
alarm list. Measured over {f['measure_s']} s after the page had every bed. One run on a shared 2-core machine.

| figure | value |
|---|---|
| page frame rate (requestAnimationFrame), frames per s | {f['frames_per_s']} |
| frame time, median / 95th percentile (ms) | {f['frame_ms_median']} / {f['frame_ms_p95']} |
| ECG updates drawn per s (one per bed per second) | {f['ecg_messages_per_s']} |
| browser CPU, every chromium process (% of one core) | {f['browser_cpu_percent']} |
| station process CPU (% of one core) | {f['station_cpu_percent']} |
| station CPU per bed (ms per bed-second) | {f['station_cpu_ms_per_bed_s']} |
"""
    write_section(out, STATION_HEADING, text)
    out.with_name("benchmarks-station.json").write_text(json.dumps(figures, indent=2))
    return text
