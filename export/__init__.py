"""ONNX / TensorRT / AOTInductor exporters (``priorclip.export``)."""
