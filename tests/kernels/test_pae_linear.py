"""The PAE GEMM-with-epilogue kernel against a float64 computation of the same maths, with flash-attention's rule
(HOUSE_STYLE.md): kernel error <= 2 x the plain-torch reference's error at the same dtype + atol."""

from __future__ import annotations

import math

import pytest
import torch

from priorclip.kernels import pae_linear as pl

# fp32: a few float32 ulps of outputs ~4 after K=1024 sums; fp16: one ulp at 1 (outputs reach 4, where torch's
# error is already 2e-3); bf16: the rule's ~1e-2, one ulp at 1 (interpreter truncation gets its own slack below)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# The reference's own error must stay small, else the rule's yardstick would hide a broken kernel
REF_BOUND = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 8e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name: (M source rows, K, N, bias, residual, rep, LayerNorm, GELU, ln_eps). The first five are the engine's uses at
# the model's sizes (E=512, FFN 1024, N=40 image tokens, L=47 caption tokens); a non-default eps makes the kernel's
# use of it visible.
CASES = {
    "qkv 2x47": (94, 512, 1536, True, False, 1, False, False, 1e-5),
    "merge+res+ln1 1x40": (40, 512, 512, True, True, 1, True, False, 1e-5),
    "ffn1+ln+gelu 2x47": (94, 512, 1024, True, False, 1, True, True, 1e-5),
    "ffn2+res+ln2 1x40": (40, 1024, 512, True, True, 1, True, False, 1e-5),
    "crosa merge rep40 B2": (2, 512, 512, True, True, 40, True, False, 1e-5),
    "small bias": (5, 24, 40, True, False, 1, False, False, 1e-5),
    "small no bias": (5, 24, 40, False, False, 1, False, False, 1e-5),
    "small rep3 res+ln": (5, 24, 40, True, True, 3, True, False, 0.1),
    "small ln+gelu": (5, 24, 40, True, False, 1, True, True, 0.1),
    "small rep3 res+gelu": (5, 24, 40, False, True, 3, False, True, 1e-5),
    "one row ln+gelu": (1, 24, 40, True, False, 1, True, True, 1e-5),
}
SMALL = [k for k in CASES if k.startswith(("small", "one"))]


def _kernel():
    from priorclip.kernels.pae_linear_triton import pae_linear_triton

    return pae_linear_triton


def _inputs(case, dtype, device, seed=0) -> dict:
    m, k, n, bias, res, rep, ln, gelu, eps = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (std * torch.randn(*s, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    return dict(x=r(m, k), weight=r(n, k, std=k ** -0.5), bias=r(n, std=0.3) if bias else None,
                residual=r(m * rep, n) if res else None, rep=rep, ln_weight=1 + r(n, std=0.1) if ln else None,
                ln_bias=r(n, std=0.1) if ln else None, ln_eps=eps, gelu=gelu)


def _float64(x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu) -> torch.Tensor:
    """The maths in float64, written out here (not the reference's ops)."""
    h = x.double() @ weight.double().T
    if bias is not None:
        h = h + bias.double()
    h = h[torch.arange(h.shape[0] * rep, device=h.device) // rep]  # output row m*rep+j <- source row m
    if residual is not None:
        h = h + residual.double()
    if ln_weight is not None:
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + ln_eps) * ln_weight.double() + ln_bias.double()
    if gelu:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h


def _check(out, kw, dtype, device, label=""):
    want = _float64(**kw)
    ref = pl.pae_linear_reference(**kw)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == want.shape
    err, err_pt = (out.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
    print(f"{label} {dtype}: kernel {err:.3e} torch {err_pt:.3e}")
    slack = 0.0
    if device == "cpu" and dtype == torch.bfloat16:
        # the interpreter's numpy bf16 cast truncates (the GPU's rounds to nearest): one more unit in the last place
        slack = 2.0 ** (math.floor(math.log2(want.abs().max().item())) - 7)
    assert err_pt <= REF_BOUND[dtype]
    assert err <= 2 * err_pt + ATOL[dtype] + slack, (label, err, err_pt)
    return err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64(device, name, dtype):
    kw = _inputs(CASES[name], dtype, device, seed=len(name))
    _check(_kernel()(**kw), kw, dtype, device, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_config_override(device, dtype, monkeypatch):
    """Two different tiles (ragged in M, N and K for both) give results within tolerance; every benchmark
    candidate runs."""
    from priorclip.kernels import pae_linear_triton as plt

    launched = []  # the tile of each launch, to see that the override reaches the kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append({k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})
                return real[grid](*args, **meta)
            return launch

    real = plt._pae_linear_kernel
    monkeypatch.setattr(plt, "_pae_linear_kernel", Spy())
    run, candidate_configs = plt.pae_linear_triton, plt.candidate_configs
    gemm = _inputs((37, 40, 72, True, True, 2, False, True, 1e-5), dtype, device, seed=1)
    norm = _inputs((37, 40, 72, True, True, 2, True, False, 0.1), dtype, device, seed=2)
    for kw in (gemm, norm):
        has_ln = kw["ln_weight"] is not None
        tiles = [dict(block_m=16, block_k=16, num_warps=2, num_stages=1), dict(block_m=64, block_k=32, num_warps=8)]
        if not has_ln:
            tiles = [dict(t, block_n=bn) for t, bn in zip(tiles, (16, 64))]
        launched.clear()
        a, b = (run(**kw, config=t) for t in tiles)
        assert [d["BLOCK_M"] for d in launched] == [16, 64] and [d["BLOCK_K"] for d in launched] == [16, 32]
        assert [d["BLOCK_N"] for d in launched] == ([128, 128] if has_ln else [16, 64])
        _check(a, kw, dtype, device, f"tile {tiles[0]}")
        _check(b, kw, dtype, device, f"tile {tiles[1]}")
        if dtype == torch.float32:
            assert (a - b).abs().max() <= 1e-5  # only the K-sum order differs
    small = _inputs(CASES["small rep3 res+ln"], dtype, device)
    for cfg in candidate_configs(40, has_ln=True):
        _check(run(**small, config=cfg), small, dtype, device, str(cfg))
    small = _inputs(CASES["small bias"], dtype, device)
    for cfg in candidate_configs(40, has_ln=False):
        _check(run(**small, config=cfg), small, dtype, device, str(cfg))


def test_bad_configs_are_one_line():
    run = _kernel()
    kw = _inputs(CASES["small ln+gelu"], torch.float32, "cpu")
    for cfg, msg in ((dict(block_n=32), "block_n >= N"), (dict(block_k=8), "powers of 2"),
                     (dict(block_m=24), "powers of 2"), (dict(tile=3), "config keys")):
        with pytest.raises(ValueError, match=msg) as e:
            run(**kw, config=cfg)
        assert "\n" not in str(e.value)


def test_default_configs():
    from priorclip.kernels.pae_linear_triton import _SMEM_BUDGET, default_config

    for dtype in DTYPES:
        assert default_config(10240, 1024, 512, dtype, True)[("block_m")] == 16  # FFN1 + LN(1024)
        assert default_config(10240, 1024, 512, dtype, True)["block_n"] == 1024
        assert default_config(10240, 512, 512, dtype, True)["block_m"] == 32  # merge + LN1
        assert default_config(10240, 512, 512, dtype, True)["block_n"] == 512
        assert default_config(256, 2048, 512, dtype, True)["block_n"] == 2048
        for m, n, k, ln in ((10240, 1536, 512, False), (1, 40, 24, False), (1, 40, 24, True), (40, 512, 1024, True)):
            cfg = default_config(m, n, k, dtype, ln)
            bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
            assert min(bm, bn, bk) >= 16 and all(b & (b - 1) == 0 for b in (bm, bn, bk))
            assert (bm + bn) * bk * dtype.itemsize * cfg["num_stages"] <= _SMEM_BUDGET
    assert default_config(10240, 1536, 512, torch.float16, False) == dict(block_m=64, block_n=128, block_k=64,
                                                                           num_warps=4, num_stages=3)


def test_empty_rows(device):
    for name in ("qkv 2x47", "crosa merge rep40 B2"):
        m, k, n, *rest = CASES[name]
        kw = _inputs((0, k, n, *rest), torch.float16, device)
        assert _kernel()(**kw).shape == (0, n)
        assert pl.pae_linear(**kw).shape == (0, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dispatcher_off_cuda_is_the_reference(dtype):
    for name in SMALL:
        kw = _inputs(CASES[name], dtype, "cpu")
        ref = pl.pae_linear_reference(**kw)
        assert torch.equal(pl.pae_linear(**kw), ref)
        assert torch.equal(pl.pae_linear(**kw, kernels="reference"), ref)
    with pytest.raises(ValueError, match="kernels must be one of"):
        pl.pae_linear(**kw, kernels="triton")


def test_dispatcher_routes_to_the_op_where_it_fits(monkeypatch):
    """With the fused path allowed (as on CUDA), a row that fits goes through the op; LayerNorm over more than
    MAX_LN_N columns runs the reference."""
    from priorclip.kernels import pae_linear_triton as plt

    calls = []
    monkeypatch.setattr(pl, "fused_enabled", lambda *a, **k: True)
    monkeypatch.setattr(plt, "pae_linear_op", lambda *a: calls.append(a) or plt.pae_linear_triton(*a))
    kw = _inputs(CASES["small rep3 res+ln"], torch.float16, "cpu")
    assert torch.equal(pl.pae_linear(**kw), plt.pae_linear_triton(**kw)) and len(calls) == 1
    wide = _inputs((2, 16, pl.MAX_LN_N + 8, True, False, 1, True, False, 1e-5), torch.float16, "cpu")
    assert torch.equal(pl.pae_linear(**wide), pl.pae_linear_reference(**wide)) and len(calls) == 1
    wide_gemm = dict(wide, ln_weight=None, ln_bias=None)
    pl.pae_linear(**wide_gemm)
    assert len(calls) == 2  # no LayerNorm: any width is fine


def test_bad_inputs_are_one_line():
    kw = _inputs(CASES["small rep3 res+ln"], torch.float32, "cpu")
    x, w, b, res, lnw, lnb = kw["x"], kw["weight"], kw["bias"], kw["residual"], kw["ln_weight"], kw["ln_bias"]
    bad = [
        dict(kw, x=x[0]),  # x not 2-D
        dict(kw, weight=w[:, :-1]),  # K mismatch
        dict(kw, bias=b[:-1]),
        dict(kw, residual=res[:-1]),  # not M*rep rows
        dict(kw, residual=res[:, :-1]),
        dict(kw, rep=0),
        dict(kw, rep=3, residual=None),  # rep > 1 needs a residual
        dict(kw, ln_bias=None),  # LN weight without bias
        dict(kw, ln_weight=lnw[:-1], ln_bias=lnb[:-1]),
        dict(kw, bias=b.half()),  # dtype mismatch
        dict(kw, residual=res.double()),
        dict(kw, x=x.to(torch.int32), weight=w.to(torch.int32), bias=None, residual=None, rep=1, ln_weight=None,
             ln_bias=None),  # not floating
    ]
    for args in bad:
        with pytest.raises(ValueError, match="pae_linear expects") as e:
            pl.pae_linear(**args)
        assert "\n" not in str(e.value)


_OP_ARGS = ("x", "weight", "bias", "residual", "rep", "ln_weight", "ln_bias", "ln_eps", "gelu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: the interpreter is off (opcheck below runs)")
def test_op_on_cpu_matches_the_launcher():
    """The op through torch.library runs the same launch, and its fake gives the real output's shape and dtype (the
    interpreter cannot run opcheck's AOT-dispatch test, which hands the kernel fake tensors)."""
    run = _kernel()  # importing the module registers the op
    for name in ("small rep3 res+ln", "small no bias"):
        args = tuple(_inputs(CASES[name], torch.float16, "cpu")[k] for k in _OP_ARGS)
        assert torch.equal(torch.ops.priorclip.pae_linear(*args), run(*args))
        torch.library.opcheck(torch.ops.priorclip.pae_linear.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.gpu
def test_dispatcher_on_cuda_runs_the_kernel():
    kw = _inputs(CASES["crosa merge rep40 B2"], torch.float16, "cuda")
    assert torch.equal(pl.pae_linear(**kw), _kernel()(**kw))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qkv 2x47", "ffn1+ln+gelu 2x47", "crosa merge rep40 B2", "small no bias"])
def test_op_opcheck_on_cuda(name):
    _kernel()  # importing the module registers the op
    kw = _inputs(CASES[name], torch.bfloat16, "cuda")
    args = tuple(kw[k] for k in _OP_ARGS)
    torch.library.opcheck(torch.ops.priorclip.pae_linear.default, args)
