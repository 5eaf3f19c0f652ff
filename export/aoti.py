"""AOTInductor packages (``torch._inductor.aoti_compile_and_package``): a compiled engine where TensorRT is absent.

Each tower is exported with ``torch.export`` (dynamic batch 1..max_batch; dynamic text length, as in the ONNX) and
compiled ahead of time for one device into a ``.pt2`` package; :class:`~.engines.AotiEngine` loads it with
``torch._inductor.aoti_load_package``. Precisions: fp32, and fp16 (weights and activations in half; the gate's
softmax, ranks and token-axis norm stay fp32 as the reference computes them). INT8 is ONNX/TensorRT only.

The image package returns ``(embeddings, belief_order)`` where the model's gate ranks (as the ONNX image graph
does, :func:`~.onnx_export.has_belief_order`), else the embeddings alone; the manifest's ``io`` says which.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import torch

from priorclip.errors import PriorCLIPError

from .onnx_export import MIN_TEXT_LEN, ImageEncoder, TextEncoder, example_inputs, reference_kernels


class _Half(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, cast_input: bool) -> None:
        super().__init__()
        self.inner = inner
        self.cast_input = cast_input

    def forward(self, x: torch.Tensor):
        out = self.inner(x.half() if self.cast_input else x)
        if isinstance(out, tuple):  # (embeddings, belief_order): only the float output goes back to fp32
            return tuple(o.float() if o.is_floating_point() else o for o in out)
        return out.float()


def export_aoti(model: torch.nn.Module, out_dir: Path, precision: str = "fp32", max_batch: int = 256,
                device: str = "cpu") -> dict[str, Path]:
    if precision not in ("fp32", "fp16"):
        raise PriorCLIPError(f"--format aoti supports --precision fp32 or fp16, not {precision} "
                             "(INT8 is for the ONNX/TensorRT formats)")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PriorCLIPError("--device cuda: no CUDA device is available here")
    from torch._inductor import aoti_compile_and_package

    model = copy.deepcopy(model).eval().to(dev)
    if precision == "fp16":
        model = model.half()
    pixels, tokens = (t.to(dev) for t in example_inputs(model))
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    length = torch.export.Dim("length", min=MIN_TEXT_LEN, max=model.cfg.text.context_length)
    img, txt = ImageEncoder(model), TextEncoder(model)
    if precision == "fp16":
        img, txt = _Half(img, True), _Half(txt, False)
    out_dir = Path(out_dir)
    paths = {"image": out_dir / "image_encoder.pt2", "text": out_dir / "text_encoder.pt2"}
    with reference_kernels(), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(img, (pixels,), dynamic_shapes={"x" if precision == "fp16" else "pixels": {0: batch}})
        aoti_compile_and_package(ep, package_path=str(paths["image"]))
        ep = torch.export.export(txt, (tokens,),
                                 dynamic_shapes={"x" if precision == "fp16" else "tokens": {0: batch, 1: length}})
        aoti_compile_and_package(ep, package_path=str(paths["text"]))
    return paths
