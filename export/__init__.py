"""ONNX / TensorRT / AOTInductor exporters (``priorclip.export``): FP32, FP16 and calibrated INT8, with parity.

Public API::

    export_model(model, out_dir, format="onnx"|"trt"|"aoti", precision="fp32"|"fp16"|"int8", calib=None,
                 calib_method="minmax"|"percentile"|"entropy", max_batch=256, opset=OPSET, parity_set=None,
                 force=False, progress=True) -> ExportResult
    open_engine(export_dir, device="cpu"|"cuda", provider=None) -> Encoder (.name, .precision, .metadata)

The names load lazily, so ``priorclip-export`` can say in one line that the ``export`` extra is missing instead of
failing on an import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CalibrationSet": ".api",
    "ExportError": ".api",
    "ExportResult": ".api",
    "export_model": ".api",
    "open_engine": ".engines",
    "read_manifest": ".engines",
    "OPSET": ".onnx_export",
    "TOLERANCES": ".parity",
    "Tolerance": ".parity",
    "parity_report": ".parity",
    "export_triton_repo": ".triton_repo",
    "TritonOptions": ".triton_repo",
    "validate_repository": ".triton_validate",
}
REQUIRED = ("onnx", "onnxscript", "onnxruntime")

__all__ = sorted(_EXPORTS) + ["require_export_dependencies"]


def require_export_dependencies() -> None:
    """Raise a one-line :class:`PriorCLIPError` naming what to install when the export extra is missing."""
    from priorclip.errors import PriorCLIPError

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception:  # ImportError, or a broken install failing on its native libraries
            missing.append(name)
    if missing:
        raise PriorCLIPError(f"exporting needs {', '.join(missing)}: pip install 'priorclip[export]'")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
