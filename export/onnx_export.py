"""FP32 ONNX graphs of the image and text encoders (``torch.onnx.export``, dynamo exporter, pinned opset).

Decisions, each checked by a test in ``tests/export``:

* **Exporter.** torch 2.13's dynamo exporter (``dynamo=True``) keeps the batch axis symbolic through the whole
  image graph. The TorchScript exporter traced at batch 2 bakes the batch into the gate's reshapes: ONNX Runtime
  then gave 0.35-0.43 max abs error at batch 1 and 7 on ``priorclip-tiny`` (measured 2026-11-23), so it is not used.
* **Opset 18**, pinned (:data:`OPSET`): LayerNormalization is one op (so it can be kept in fp32 as one node),
  per-axis Q/DQ exist, and TensorRT 10 and ONNX Runtime >= 1.14 read all of it.
* **Dynamic axes.** Image: batch. Text: batch *and* length L in [2, context_length]. A dynamic L is exact: the
  mask is causal, so tokens after the EOT never reach it, and the graph pools the EOT row. Engines cut each batch
  to its longest caption (the reference model's ``trim_text``), about 4x less text compute on RS captions.
* **EOT position** is computed in the graph: ``ArgMax`` over the token ids (the EOT id 49407 is the largest id)
  then ``GatherND``, the reference's own pooling, so no second input can disagree with the tokens.
* **Belief sort.** The reference gate (``priorclip.kernels.belief_gate``) builds the rank order from pairwise comparisons,
  not ``torch.sort``, so the graph has no TopK and ties go lower-index-first in every backend.
* **Belief order output.** Where the gate ranks (a prior and the ``belief+rank`` formula) the image graph has a
  second output ``belief_order [batch, T] int64`` (token index at each rank slot, T = ViT tokens: 50 for B/32),
  the order the gate itself used, so parity checks can report rank flips of the engine, not of a re-derivation.
  Plain CLIP and the ``2belief`` gate have one output. Engines request it only when asked.
* **Fused kernels.** Export runs the model with the kernels' torch references (:func:`reference_kernels`).
* **PIR** (``cfg.family == "pir"``): the same two graphs and names. The text graph takes BERT ids ([CLS] first,
  [PAD]=0 after) with the same dynamic L in [2, 47] and pools row 0; PIR attends to its [PAD] tokens, so L is part
  of the input's meaning and engines never cut or pad it (the ids run as tokenised: chunks of 128, each padded to
  its longest caption). The image graph's ``belief_order [batch, 50]`` is VIR's belief ranking (its first
  ``filter_size`` = 40 tokens are kept), computed by the same pairwise rank count (:func:`priorclip.layers.pae.
  descending_order`), so ties go lower-index-first here too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from priorclip.config import FAMILY_PIR
from priorclip.cliutils import output_dir

from .graph import check_model

OPSET = 18
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "pixels", "tokens", "embeddings"
ORDER_OUTPUT = "belief_order"
MIN_TEXT_LEN = 2  # SOT + EOT ([CLS] + one word piece for PIR); also keeps torch.export from specialising the axis to 1


def has_belief_order(model: nn.Module) -> bool:
    """True when the model ranks image tokens by belief (PriorCLIP's ``belief+rank`` gate, PIR's VIR filter), i.e.
    it has an order to export."""
    return bool(getattr(model, "ranks_tokens", False))


def image_output_names(model: nn.Module) -> list[str]:
    return [OUTPUT, ORDER_OUTPUT] if has_belief_order(model) else [OUTPUT]


class ImageEncoder(nn.Module):
    """``pixels [B,3,S,S] float32 -> embeddings [B,E] float32`` (L2-normalised, the reference ``encode_image``),
    plus ``belief_order [B,T] int64`` where the model has a ranking gate (:func:`has_belief_order`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.with_order = has_belief_order(model)

    def forward(self, pixels: torch.Tensor):
        if not self.with_order:
            return self.model.encode_image(pixels).float()
        emb, order = self.model.encode_image_with_order(pixels)
        return emb.float(), order


class TextEncoder(nn.Module):
    """``tokens [B,L] int64 -> embeddings [B,E] float32``; EOT pooled at argmax(tokens) in the graph (PriorCLIP),
    [CLS] row 0 over every position, padding included (PIR)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens).float()


@contextlib.contextmanager
def reference_kernels():
    """Run the model on the kernels' plain-torch references (ONNX cannot see Triton kernels)."""
    try:
        from priorclip import kernels
    except ImportError:  # pragma: no cover
        kernels = None
    setter = getattr(kernels, "set_backend", None)
    getter = getattr(kernels, "get_backend", None)
    if setter is None or getter is None:
        yield
        return
    previous = getter()
    setter("torch")
    try:
        yield
    finally:
        setter(previous)


def example_inputs(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    pixels = torch.randn(batch, 3, s, s, generator=g)
    ctx = cfg.text.context_length
    tokens = torch.zeros(batch, ctx, dtype=torch.int64)
    if cfg.family == FAMILY_PIR:  # [CLS], word pieces, [PAD]=0 after
        tokens[:, 0] = 101
        tokens[:, 1:7] = torch.randint(1000, cfg.text.vocab_size, (batch, 6), generator=g)
        return pixels, tokens
    tokens[:, 0] = 49406
    tokens[:, 1:6] = torch.randint(1, 49000, (batch, 5), generator=g)
    tokens[:, 6] = 49407
    return pixels, tokens


def io_spec(model: nn.Module, max_batch: int) -> dict:
    """Inputs and outputs of both graphs, as written into the manifest."""
    cfg = model.cfg
    s, ctx, e = cfg.vision.image_size, cfg.text.context_length, cfg.embed_dim
    image_outputs = [{"name": OUTPUT, "dtype": "float32", "shape": ["batch", e], "l2_normalised": True}]
    if has_belief_order(model):
        image_outputs.append({"name": ORDER_OUTPUT, "dtype": "int64", "shape": ["batch", cfg.vision.num_tokens],
                              "meaning": "token index at each rank slot of the gate's belief sort (ties lower "
                                         "index first)"})
    return {
        "image": {
            "inputs": [{"name": IMAGE_INPUT, "dtype": "float32", "shape": ["batch", 3, s, s]}],
            "outputs": image_outputs,
        },
        "text": {
            "inputs": [{"name": TEXT_INPUT, "dtype": "int64", "shape": ["batch", "length"]}],
            "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": ["batch", e], "l2_normalised": True}],
            "length": {"min": MIN_TEXT_LEN, "max": ctx},
            **({"padding": "attended: feed ids padded as the reference pads them (chunks of 128, each to its "
                           "longest caption); never trim or re-pad"}
               if cfg.family == FAMILY_PIR and not cfg.mask_padding else
               {"pooling": "[CLS] row 0"} if cfg.family == FAMILY_PIR else
               {"eot": "computed in the graph: ArgMax over the token ids (EOT 49407 is the largest id), then "
                       "GatherND"}),
        },
        "batch": {"min": 1, "max": max_batch},
    }


def _quiet_export(module: nn.Module, args: tuple, path: Path, input_name: str, dynamic: dict, opset: int,
                  output_names: list[str]) -> None:
    buf = io.StringIO()
    # torch's own logging configuration gives its loggers explicit levels, so quieten each one, not just the parents.
    prefixes = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript")
    import torch.onnx._internal.exporter._registration  # noqa: F401  (registers its logger before we quieten it)

    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)] + list(prefixes)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[input_name],
                output_names=output_names,
                dynamic_shapes={input_name: dynamic},
                external_data=True,
                verbose=False,
            )
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx_fp32(model: nn.Module, out_dir: Path, opset: int = OPSET, max_batch: int = 256,
                     towers: tuple[str, ...] = ("image", "text")) -> dict[str, Path]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` (fp32) under ``out_dir`` and check them in full."""
    out_dir = Path(out_dir)
    with output_dir(out_dir):  # removed again if the export fails before writing there
        model = model.eval().float().cpu()
        pixels, tokens = example_inputs(model)
        batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
        length = torch.export.Dim("length", min=MIN_TEXT_LEN, max=model.cfg.text.context_length)
        paths: dict[str, Path] = {}
        with reference_kernels(), torch.no_grad():
            if "image" in towers:
                paths["image"] = out_dir / "image_encoder.onnx"
                _quiet_export(ImageEncoder(model), (pixels,), paths["image"], IMAGE_INPUT, {0: batch}, opset,
                              image_output_names(model))
            if "text" in towers:
                paths["text"] = out_dir / "text_encoder.onnx"
                _quiet_export(TextEncoder(model), (tokens,), paths["text"], TEXT_INPUT, {0: batch, 1: length}, opset,
                              [OUTPUT])
        for p in paths.values():
            check_model(p)
    return paths
