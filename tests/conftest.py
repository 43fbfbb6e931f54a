"""Shared fixtures: the real PhysioNet folder beside the repo, a tiny trained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PHYSIONET = Path(os.environ.get("ECGMON_PHYSIONET", REPO.parent / "shared" / "physionet"))


@pytest.fixture(scope="session")
def physionet() -> Path:
    if not (PHYSIONET / "mitdb" / "100.hea").exists():
        pytest.fail(f"PhysioNet data not found at {PHYSIONET} (set ECGMON_PHYSIONET)")
    return PHYSIONET
