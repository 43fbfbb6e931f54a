"""The README's first command, `ecgmon demo`, end to end as a process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_demo_prints_alarms(physionet: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--physionet-dir", str(physionet),
                          "--speed", "30"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert re.match(r"central station: http://127\.0\.0\.1:\d+/ \(login demo, password \S+\)$", lines[0]), lines[0]
    assert lines[1].startswith("daemon online")
    assert any("raised" in line and "mitdb-200" in line for line in lines)  # record 200 has ventricular ectopy
    # cu01 falls into ventricular fibrillation at 214 s; 201 starts in atrial fibrillation
    assert any("raised" in line and "cudb-cu01" in line and "fibrillation" in line.lower() for line in lines), lines
    assert any("raised" in line and "mitdb-201" in line and "atrial" in line.lower() for line in lines), lines
    # the second lead of 200 and 201 comes off from 40 to 70 s: its lead_fault is raised and cleared, and the
    # first lead carries on (the ectopy above is found throughout)
    for device in ("mitdb-200", "mitdb-201"):
        faults = [line for line in lines if device in line and "lead fault" in line.lower()]
        flat = next(i for i, line in enumerate(faults) if "raised" in line and "V1 flat" in line)
        assert any("cleared" in line for line in faults[flat + 1:]), lines
    assert lines[-1].startswith("demo finished:")


def test_shipped_daemon_config_validates() -> None:
    config = load_config(REPO / "configs" / "daemon.yaml", env={})
    assert config.mqtt.topic_prefix == "ecgmon" and config.alarms.asystole_s == 4.0


def test_every_subcommand_has_help() -> None:
    import pytest

    from pipeline.cli import build_parser, main

    usage = build_parser().format_usage()  # "usage: ecgmon [-h] [--log-level {DEBUG,...}] {train,export,...} ..."
    commands = re.findall(r"\{([a-z,-]+)\}", usage)[0].split(",")
    assert {"train", "evaluate", "export", "serve", "replay", "alerts", "bench", "demo"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
