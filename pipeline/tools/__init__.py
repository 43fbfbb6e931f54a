"""Operator tools beside the daemon: replay, alerts, demo, bench, a local broker, PhysioNet records."""

from pathlib import Path

DEFAULT_PHYSIONET_DIR = Path("../shared/physionet")  # beside the repository, as the project lays it out
