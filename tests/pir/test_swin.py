"""PIR's Swin image tower (priorclip.layers.swin) against a float64 re-derivation written here from the Swin paper and
spec §1B/§5B: patch embedding as a matmul over flattened patches, windows gathered by explicit index lists, the
cyclic shift as a modular index map, the shifted-window mask from "did the roll wrap this token round", the relative
bias read from the (2w-1)x(2w-1) grid by coordinate differences, patch merging by explicit 2x2 gathers, and the
final norm with the token mean prepended. Also the checkpoint layout of the full Swin-T, drop path, gradient
checkpointing, ONNX export with a dynamic batch, and the timm key map of benchmarks/gpu/swin_timm_parity.py."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from priorclip.config import SwinConfig
from priorclip.layers.swin import DropPath, SwinTransformer, relative_position_index, shifted_window_mask
from priorclip.registry import get_config

REPO = Path(__file__).resolve().parents[2]
TINY = get_config("pir-tiny").vision  # 56 px, patch 2: grids 28-14-7, window 7 (the last stage is one window)
SWIN_T = get_config("pir-swin-t-bert").vision


# ------------------------------------------------------------------------------------ float64 re-derivation


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ref_block(x, p, res, window, heads, shifted):
    """One Swin block on tokens [B, res*res, C] (token r*res + c), written window by window."""
    w = min(window, res)
    s = window // 2 if shifted and res > window else 0
    c = x.shape[-1]
    hd = c // heads
    table = p["attn.relative_position_bias_table"].reshape(2 * w - 1, 2 * w - 1, heads)  # [dy + w-1, dx + w-1, h]
    h = _ln(x, p["norm1.weight"], p["norm1.bias"])
    out = torch.zeros_like(x)
    for wy in range(res // w):
        for wx in range(res // w):
            cells = [(wy * w + a, wx * w + b) for a in range(w) for b in range(w)]  # positions in the shifted grid
            src = [((r + s) % res) * res + (q + s) % res for r, q in cells]  # the token the roll put there
            rows, cols = torch.tensor([r for r, _ in cells]), torch.tensor([q for _, q in cells])
            bias = table[rows[:, None] - rows[None, :] + w - 1, cols[:, None] - cols[None, :] + w - 1]  # [N, N, h]
            # Tokens the roll wrapped round (shifted position >= res - s) must not see unwrapped ones.
            wr, wc = (rows >= res - s) & (s > 0), (cols >= res - s) & (s > 0)
            apart = (wr[:, None] != wr[None, :]) | (wc[:, None] != wc[None, :])
            mask = torch.where(apart, -100.0, 0.0).to(x.dtype)
            t = h[:, src]  # [B, N, C]
            n = len(cells)
            qkv = t @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
            q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(t.shape[0], n, heads, hd).transpose(1, 2) for i in range(3))
            logits = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias.permute(2, 0, 1) + mask
            o = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(t.shape[0], n, c)
            out[:, src] = o @ p["attn.proj.weight"].T + p["attn.proj.bias"]  # back to the token's own place
    x = x + out
    m = _ln(x, p["norm2.weight"], p["norm2.bias"])
    m = _gelu(m @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x + m


def _ref_merge(x, p, res):
    """2x2 neighbourhoods: channels [(2i,2j), (2i+1,2j), (2i,2j+1), (2i+1,2j+1)], LayerNorm(4C), Linear 4C->2C."""
    idx = [[(2 * i + dr) * res + 2 * j + dc for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1))]
           for i in range(res // 2) for j in range(res // 2)]
    x = torch.stack([torch.cat([x[:, t] for t in group], dim=-1) for group in idx], dim=1)
    return _ln(x, p["norm.weight"], p["norm.bias"]) @ p["reduction.weight"].T


def _sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def reference_swin(sd: dict[str, torch.Tensor], cfg: SwinConfig, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, 1 + g*g, width] from the parameters alone (the module's buffers are not used)."""
    b, pz = pixels.shape[0], cfg.patch_size
    g = cfg.image_size // pz
    patches = pixels.reshape(b, 3, g, pz, g, pz).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * pz * pz)
    w = sd["patch_embed.proj.weight"]
    x = patches @ w.reshape(w.shape[0], -1).T + sd["patch_embed.proj.bias"]
    x = _ln(x, sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    res = g
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            x = _ref_block(x, _sub(sd, f"layers.{i}.blocks.{j}."), res, cfg.window_size, cfg.heads[i], j % 2 == 1)
        if i < len(cfg.depths) - 1:
            x = _ref_merge(x, _sub(sd, f"layers.{i}.downsample."), res)
            res //= 2
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def _randomised(cfg: SwinConfig, seed: int = 0) -> SwinTransformer:
    """Eval model with every parameter random and O(1)-effective (LN affine, biases, a large position bias), so a
    wrong index, region or order changes the output well above the tolerances."""
    torch.manual_seed(seed)
    model = SwinTransformer(cfg).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                prm.normal_(0.0, 1.0)
            elif prm.dim() == 1:
                prm.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(prm))
            else:
                prm.normal_(0.0, prm[0].numel() ** -0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    return _randomised(TINY)


def _meta_swin_t() -> SwinTransformer:
    with torch.device("meta"):  # shapes, names and counts without the init cost (the FLOP profiler builds so too)
        return SwinTransformer(SWIN_T).eval()


@pytest.fixture(scope="module")
def swin_t():
    return _meta_swin_t()


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_float64_rederivation(tiny, batch):
    x = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    model64 = copy.deepcopy(tiny).double()
    sd = {k: v for k, v in model64.state_dict().items() if not k.endswith(("relative_position_index", "attn_mask"))}
    ref = reference_swin(sd, TINY, x)
    with torch.no_grad():
        out64 = model64(x)
        out32 = tiny(x.float())
    assert out64.shape == (batch, 50, 64) and out32.dtype == torch.float32
    assert ref.abs().max() > 0.5  # O(1) tokens, so the bounds below are tight
    assert (out64 - ref).abs().max() <= 1e-10
    assert (out32.double() - ref).abs().max() <= 1e-4


def test_batch_items_are_independent(tiny):
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole = tiny(x)
        one = tiny(x[1:2])
    assert torch.allclose(whole[1:2], one, atol=1e-5)


def test_shift_matters(tiny):
    """Turning the shifted windows off (same weights) changes the output: the shift path is not dead code."""
    unshifted = copy.deepcopy(tiny)
    for stage in unshifted.layers:
        for block in stage.blocks:
            block.shift, block.attn_mask = 0, None
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (tiny(x) - unshifted(x)).abs().max() > 1e-2


def test_relative_position_index_hand_computed_and_by_coordinate_differences():
    # w=2, tokens (0,0) (0,1) (1,0) (1,1); table row = (dy + 1) * 3 + (dx + 1).
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    w = 7
    coords = [(r, c) for r in range(w) for c in range(w)]
    want = [[(ri - rj + w - 1) * (2 * w - 1) + (ci - cj + w - 1) for rj, cj in coords] for ri, ci in coords]
    got = relative_position_index(w)
    assert got.dtype == torch.int64 and got.tolist() == want


def test_shifted_window_mask_regions():
    m = shifted_window_mask(14, 7, 3)  # 2x2 windows of 7x7
    assert m.shape == (4, 49, 49) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, -100.0}  # -100 like the reference, not -inf
    assert (m[0] == 0).all()  # the top-left window holds no wrapped token
    # Bottom-right window: rows/cols 4..6 of the window (shifted positions >= 11) were wrapped round on that axis.
    region = [(a >= 4) * 2 + (b >= 4) for a in range(7) for b in range(7)]
    want = torch.tensor([[0.0 if ri == rj else -100.0 for rj in region] for ri in region])
    assert torch.equal(m[3], want)
    # Top-right window: only the column split exists.
    region = [b >= 4 for a in range(7) for b in range(7)]
    assert torch.equal(m[1], torch.tensor([[0.0 if ri == rj else -100.0 for rj in region] for ri in region]))


def _expected_swin_t_keys() -> list[str]:
    """The official checkpoint's vision_encoder.* key list (prefix removed), in order, from spec §1B/§5B."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    for i, depth in enumerate((2, 2, 6, 2)):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            keys += [b + "attn_mask"] if j % 2 and i < 3 else []
            keys += [b + n for n in ("norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                                     "attn.relative_position_index", "attn.qkv.weight", "attn.qkv.bias",
                                     "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
        if i < 3:
            keys += [f"layers.{i}.downsample.{n}" for n in ("reduction.weight", "norm.weight", "norm.bias")]
    return keys + ["norm.weight", "norm.bias"]


def test_swin_t_checkpoint_layout(swin_t):
    sd = swin_t.state_dict()
    assert sum(p.numel() for p in swin_t.parameters()) == 27_519_354  # spec §5B
    assert sum(k.endswith("relative_position_index") for k in sd) == 12
    assert sum(k.endswith("attn_mask") for k in sd) == 5
    assert list(sd) == _expected_swin_t_keys()
    assert [k for k in sd if k.startswith("layers.0.blocks.0.")][:3] == [
        "layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.norm1.bias",
        "layers.0.blocks.0.attn.relative_position_bias_table"]
    assert "layers.0.blocks.1.attn_mask" in sd and "layers.0.blocks.0.attn_mask" not in sd
    assert [i for i in range(4) if f"layers.{i}.downsample.reduction.weight" in sd] == [0, 1, 2]
    for i, (heads, n_windows) in enumerate(zip((3, 6, 12, 24), (64, 16, 4, 1))):
        assert sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape == (169, heads)
        index = sd[f"layers.{i}.blocks.1.attn.relative_position_index"]
        assert index.shape == (49, 49) and index.dtype == torch.int64
        if i < 3:
            assert sd[f"layers.{i}.blocks.1.attn_mask"].shape == (n_windows, 49, 49)
        dim = 96 * 2**i
        if i < 3:
            assert sd[f"layers.{i}.downsample.reduction.weight"].shape == (2 * dim, 4 * dim)
            assert sd[f"layers.{i}.downsample.norm.weight"].shape == (4 * dim,)
    # Stage 3 runs at 7x7 = one window: no shift there (spec: the full-grid rule).
    assert [b.shift for b in swin_t.layers[3].blocks] == [0, 0] and swin_t.layers[2].blocks[1].shift == 3
    _meta_swin_t().load_state_dict(sd, strict=True, assign=True)  # a strict load expects exactly these buffers


def test_swin_t_forward_batch1(swin_t):
    assert swin_t(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 50, 768)  # runs on meta (profiler)
    with torch.no_grad():
        out = SwinTransformer(SWIN_T).eval()(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 50, 768)
    assert torch.allclose(out[:, 0], out[:, 1:].mean(dim=1), atol=1e-6)  # token 0 is the patch-token mean


def test_drop_path_rates_are_linear_over_all_blocks(swin_t):
    rates = [b.drop_path.p for s in swin_t.layers for b in s.blocks]
    assert rates == pytest.approx(np.linspace(0.0, 0.1, 12).tolist())


def test_drop_path_is_per_sample_and_rescaled():
    dp = DropPath(0.25)
    x = torch.ones(4000, 5, 3)
    torch.manual_seed(0)
    y = dp.train()(x)
    per_sample = y.reshape(4000, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))  # whole samples, kept ones scaled
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(dp.eval()(x), x)


def test_drop_path_only_in_training():
    model = _randomised(dataclasses.replace(TINY, drop_path=0.5))
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eval_out = model(x)
        assert torch.equal(model(x), eval_out)
        torch.manual_seed(0)
        train_out = model.train()(x)
    assert (train_out - eval_out).abs().max() > 1e-3


def test_grad_checkpointing_gives_the_same_outputs_and_grads():
    cfg = dataclasses.replace(TINY, drop_path=0.3)
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    results, calls = [], []
    for ckpt in (False, True):
        model = _randomised(cfg).train()
        model.grad_checkpointing = ckpt
        block = model.layers[0].blocks[1]
        calls.append(0)
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        torch.manual_seed(5)  # the same drop-path draws; the recompute replays them (RNG state preserved)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls == [1, 2]  # with checkpointing the block runs again in the backward pass
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(g1, g2))


@pytest.mark.parametrize("bad", [(1, 3, 64, 64), (1, 1, 56, 56), (3, 56, 56), (1, 3, 56, 28)])
def test_wrong_input_shape_is_one_clear_error(tiny, bad):
    with pytest.raises(ValueError, match=r"expects float pixels \[B, 3, 56, 56\], got"):
        tiny(torch.zeros(bad))


def test_integer_pixels_rejected(tiny):
    with pytest.raises(ValueError, match="expects float pixels"):
        tiny(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


@pytest.mark.slow  # the whole PIR image graph, Swin included, is exported and checked in test_pir_export_bench.py
def test_onnx_export_dynamic_batch(tiny, tmp_path):
    """The repo's exporter (dynamo, opset 18, ``export.onnx_export``) with a symbolic batch; ORT at batch 1 and 3."""
    import onnx
    import onnxruntime as ort

    from priorclip.export.onnx_export import OPSET, _quiet_export

    path = tmp_path / "swin.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        _quiet_export(tiny, (torch.randn(2, 3, 56, 56),), path, "pixels", {0: batch}, OPSET, ["tokens"])
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.randn(b, 3, 56, 56, generator=torch.Generator().manual_seed(10 + b))
        got = session.run(None, {"pixels": x.numpy()})[0]
        with torch.no_grad():
            want = tiny(x).numpy()
        assert got.shape == (b, 50, 64)
        assert np.abs(got - want).max() <= 1e-5


# ------------------------------------------------------------------- benchmarks/gpu/swin_timm_parity.py


def _parity_script():
    spec = importlib.util.spec_from_file_location("swin_timm_parity", REPO / "benchmarks/gpu/swin_timm_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_TIMM_BLOCK = ["layers.1.blocks.1.norm1.weight", "layers.1.blocks.1.norm1.bias",
               "layers.1.blocks.1.attn.relative_position_bias_table", "layers.1.blocks.1.attn.relative_position_index",
               "layers.1.blocks.1.attn.qkv.weight", "layers.1.blocks.1.attn.qkv.bias",
               "layers.1.blocks.1.attn.proj.weight", "layers.1.blocks.1.attn.proj.bias",
               "layers.1.blocks.1.norm2.weight", "layers.1.blocks.1.norm2.bias", "layers.1.blocks.1.mlp.fc1.weight",
               "layers.1.blocks.1.mlp.fc1.bias", "layers.1.blocks.1.mlp.fc2.weight", "layers.1.blocks.1.mlp.fc2.bias",
               "layers.1.blocks.1.attn_mask"]


def test_timm_key_map_new_layout():
    """timm >= 0.9: PatchMerging opens stage i+1 (layers.{i+1}.downsample); ours closes stage i."""
    timm_keys = (["patch_embed.proj.weight", "patch_embed.norm.bias"] + _TIMM_BLOCK
                 + ["layers.1.downsample.norm.weight", "layers.1.downsample.norm.bias",
                    "layers.1.downsample.reduction.weight", "layers.3.downsample.reduction.weight",
                    "norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"])
    got = _parity_script().timm_key_map(timm_keys)
    want = {k: k for k in ["patch_embed.proj.weight", "patch_embed.norm.bias", *_TIMM_BLOCK, "norm.weight",
                           "norm.bias"]}
    want.update({"layers.1.downsample.norm.weight": "layers.0.downsample.norm.weight",
                 "layers.1.downsample.norm.bias": "layers.0.downsample.norm.bias",
                 "layers.1.downsample.reduction.weight": "layers.0.downsample.reduction.weight",
                 "layers.3.downsample.reduction.weight": "layers.2.downsample.reduction.weight"})
    assert got == want


def test_timm_key_map_old_layout_and_feature_names():
    mod = _parity_script()
    old = ["layers.0.downsample.reduction.weight", "layers.2.downsample.norm.bias"]
    # timm < 0.9: already at the end of the stage; its classifier is a bare Linear ``head``.
    assert mod.timm_key_map(old + ["head.weight", "head.bias"]) == {k: k for k in old}
    assert mod.timm_key_map(["layers_1.blocks.0.mlp.fc1.weight", "layers_2.downsample.norm.weight"]) == {
        "layers_1.blocks.0.mlp.fc1.weight": "layers.1.blocks.0.mlp.fc1.weight",
        "layers_2.downsample.norm.weight": "layers.1.downsample.norm.weight"}
    with pytest.raises(ValueError, match="unknown timm Swin key 'layers.0.blocks.0.attn.q_bias'"):
        mod.timm_key_map(["layers.0.blocks.0.attn.q_bias"])


def test_timm_key_map_covers_every_parameter(swin_t):
    """Our names written in timm >= 0.9's layout map back onto exactly our state dict."""
    def to_timm(k: str) -> str:
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) + 1)
        return ".".join(parts)

    ours = list(swin_t.state_dict())
    got = _parity_script().timm_key_map([to_timm(k) for k in ours])
    assert sorted(got.values()) == sorted(ours)


def test_parity_script_without_timm_fails_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # an import of timm raises ImportError
    assert _parity_script().main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: timm is not installed") and "\n" not in err
    assert not any(tmp_path.iterdir())
