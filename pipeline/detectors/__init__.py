"""Rhythm and signal detectors beside the beat model: VF, AF, signal quality (logistic models)."""
