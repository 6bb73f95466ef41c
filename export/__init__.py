"""Export of TDM students to ONNX and TensorRT engines, and their runtimes (`python -m export.trt`).

Imports tdm_train, never comfy; tensorrt and onnxruntime are imported inside functions so that
the pack imports on a CPU-only machine.
"""
