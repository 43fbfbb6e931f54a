"""From samples to beats: causal DSP, the ONNX model, beat picking, the beat stage's context, the batched
multi-device runner."""
