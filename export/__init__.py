"""ONNX / TensorRT / AOTInductor exporters (``priorclip.export``): FP32, FP16 and calibrated INT8, with parity.

Public API::

    export_model(model, out_dir, format="onnx"|"trt"|"aoti", precision="fp32"|"fp16"|"int8", calib=None,
                 calib_method="minmax"|"percentile"|"entropy", max_batch=256, opset=OPSET, parity_set=None,
                 force=False, progress=True) -> ExportResult
    open_engine(export_dir, device="cpu"|"cuda", provider=None) -> Encoder (.name, .precision, .metadata)
"""

from .api import CalibrationSet, ExportError, ExportResult, export_model
from .engines import open_engine, read_manifest
from .onnx_export import OPSET
from .parity import TOLERANCES, Tolerance, parity_report

__all__ = [
    "OPSET",
    "TOLERANCES",
    "CalibrationSet",
    "ExportError",
    "ExportResult",
    "Tolerance",
    "export_model",
    "open_engine",
    "parity_report",
    "read_manifest",
]
