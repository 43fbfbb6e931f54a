"""The beat network's config (config.py, no torch), its definition (network.py, needs torch) and the shipped model
(no torch needed to find it)."""

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent / "ecgmon-lstm.onnx"
