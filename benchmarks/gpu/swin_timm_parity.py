"""Parity of PIR's Swin-T image tower (``priorclip.layers.swin``) with timm's ``swin_tiny_patch4_window7_224``.

    python benchmarks/gpu/swin_timm_parity.py --out DIR [--device cuda]

Needs timm (the GPU image has it). timm's random weights are copied into our model through :func:`timm_key_map`,
then, in fp32 with TF32 off, timm's ``forward_features`` (final-norm tokens; NHWC [B,7,7,768] since timm 0.9) is
compared with our tokens 1..49 and its token mean with our token 0, at batch 1 and 8. The window buffers timm
computes (``relative_position_index``, ``attn_mask``: not persistent in timm) are compared with ours too.
``swin-timm-parity.json`` gets the max abs differences, the versions and ``pass`` (every difference <= 1e-4).
Exit status: 0 pass, 1 fail, 2 cannot run (no timm, bad device).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

TOLERANCE = 1e-4
TIMM_MODEL = "swin_tiny_patch4_window7_224"
_BLOCK_PART = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|attn\.relative_position_bias_table"
_SAME_NAME = re.compile(
    r"patch_embed\.(proj|norm)\.(weight|bias)|norm\.(weight|bias)"
    rf"|layers\.\d+\.blocks\.\d+\.({_BLOCK_PART}|attn\.relative_position_index|attn_mask)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)")


def timm_key_map(timm_keys: Iterable[str]) -> dict[str, str]:
    """{timm name: our name} for every timm parameter/buffer name except the classifier ``head.*``.

    Block, patch-embed and final-norm names are the same in both. Patch merging differs by layout: timm >= 0.9 runs
    it at the START of stage i+1 (``layers.{i+1}.downsample``), Microsoft's code and ours at the END of stage i
    (``layers.{i}.downsample``, timm < 0.9 too); the layout is read off the names. ``layers_{i}`` (timm's feature
    wrappers) is read as ``layers.{i}``. An unknown name raises ValueError."""
    keys = [re.sub(r"^layers_(\d+)\.", r"layers.\1.", k) for k in timm_keys]
    stages = {int(m.group(1)) for k in keys if (m := _DOWNSAMPLE.fullmatch(k))}
    downsample_first = bool(stages) and 0 not in stages  # the first stage never merges at its start
    out: dict[str, str] = {}
    for original, k in zip(timm_keys, keys):
        if k.startswith("head."):
            continue
        if _SAME_NAME.fullmatch(k):
            out[original] = k
        elif m := _DOWNSAMPLE.fullmatch(k):
            stage = int(m.group(1)) - (1 if downsample_first else 0)
            out[original] = f"layers.{stage}.downsample.{m.group(2)}"
        else:
            raise ValueError(f"unknown timm Swin key {original!r}")
    return out


def _max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # timm's eager attention: the same ops as ours
    try:
        import timm
    except ImportError as e:
        why = "timm is not installed (pip install timm)" if e.name == "timm" else f"timm cannot be imported: {e}"
        print(f"Error: {why}; this parity check needs it", file=sys.stderr)
        return 2
    import torch

    from priorclip.cliutils import resolve_device, write_json
    from priorclip.errors import PriorCLIPError
    from priorclip.layers.swin import SwinTransformer
    from priorclip.provenance import git_revision
    from priorclip.registry import get_config

    try:
        device = resolve_device(a.device)
    except PriorCLIPError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(a.seed)

    ref = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0).eval()
    ours = SwinTransformer(get_config("pir-swin-t-bert").vision).eval()
    tensors = {**dict(ref.named_buffers()), **ref.state_dict()}
    mapping = timm_key_map(tensors)
    ours_sd = ours.state_dict()
    params = {n for n, _ in ours.named_parameters()}
    mapped = {v: tensors[k] for k, v in mapping.items()}
    missing, unknown = sorted(params - set(mapped)), sorted(set(mapped) - set(ours_sd))
    if missing or unknown:
        print(f"Error: key map incomplete: ours without timm {missing[:5]}, timm-only {unknown[:5]}", file=sys.stderr)
        return 1
    bad_shape = [k for k, v in mapped.items() if v.shape != ours_sd[k].shape]
    if bad_shape:
        print(f"Error: shape mismatch after the key map: {bad_shape[:5]}", file=sys.stderr)
        return 1
    ours.load_state_dict({**ours_sd, **{k: v for k, v in mapped.items() if k in params}}, strict=True)
    buffers = {k: _max_abs(v, ours_sd[k]) for k, v in mapped.items() if k not in params}
    buffer_diff = max(buffers.values(), default=0.0)

    ref, ours = ref.to(device), ours.to(device)
    gen = torch.Generator().manual_seed(a.seed)
    runs = {}
    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
            feats = ref.forward_features(x)
            feats = feats.reshape(batch, -1, feats.shape[-1])  # NHWC (timm >= 0.9) or [B, L, C]
            out = ours(x)
            runs[str(batch)] = {
                "tokens_max_abs_diff": _max_abs(out[:, 1:], feats),
                "cls_max_abs_diff": _max_abs(out[:, 0], feats.mean(dim=1)),
                "tokens_max_abs": float(feats.abs().max()),
                "shape": list(out.shape),
            }
    counts = {"ours": sum(p.numel() for p in ours.parameters()), "timm": sum(p.numel() for p in ref.parameters())}
    worst = max([buffer_diff] + [v for r in runs.values() for k, v in r.items() if k.endswith("diff")])
    passed = (worst <= TOLERANCE and counts["ours"] == counts["timm"]
              and all(r["shape"] == [int(b), 50, 768] for b, r in runs.items()))
    doc = {
        "what": f"priorclip.layers.swin.SwinTransformer vs timm {TIMM_MODEL} forward_features, fp32, TF32 off",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "timm_fused_attn": os.environ.get("TIMM_FUSED_ATTN"),
        "revision": os.environ.get("PRIORCLIP_GIT_REVISION") or git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/gpu/swin_timm_parity.py", *sys.argv[1:]]),
        "parameters": counts,
        "mapped_parameters": len(params),
        "buffers_compared": len(buffers),
        "buffers_max_abs_diff": buffer_diff,
        "batches": runs,
        "tolerance": TOLERANCE,
        "max_abs_diff": worst,
        "pass": passed,
    }
    path = write_json(a.out / "swin-timm-parity.json", doc)
    print(f"{'PASS' if passed else 'FAIL'}: max abs diff {worst:.3g} (tolerance {TOLERANCE:g}); wrote {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
