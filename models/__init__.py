"""The beat network's definition (network.py, needs torch) and the shipped model (no torch needed to find it)."""

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent / "ecgmon-lstm.onnx"
