"""Triton kernel for :func:`priorclip.kernels.pae_linear.pae_linear_reference`: a GEMM ``x @ weight.T`` whose epilogue
adds the bias, broadcasts each source row to ``rep`` output rows with a residual each, LayerNorms the row and applies
GELU, storing once in x's dtype (spec §8B.5-6: the PIR PAE blocks' QKV, merge + LN1, FFN1 + LN + GELU, FFN2 + LN2 and
CroSA's single-query merge).

A program owns a BLOCK_M tile of SOURCE rows of x and a BLOCK_N tile of columns; with LayerNorm one tile covers the
whole row (BLOCK_N = next_power_of_2(N)), so mean and variance come from registers. Accumulation is float32: IEEE
float32 products for float32 inputs (an fp32 engine then matches torch with TF32 off), tensor cores for half types.
Imports triton: only the fused path imports it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_SMEM_BUDGET = 128 * 1024  # bytes of pipelined x/weight tiles: leaves room for the epilogue's layout conversions
CONFIG_KEYS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")

# Alternatives for a benchmark sweep. GEMM tiles (no LayerNorm) name all five keys; LayerNorm tiles leave block_n
# out: it is always the whole row there. Use ``candidate_configs`` to get the list that applies.
CONFIGS: list[dict] = [
    dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
    dict(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=4),
    dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3),
]
LN_CONFIGS: list[dict] = [
    dict(block_m=16, block_k=16, num_warps=4, num_stages=3),
    dict(block_m=16, block_k=32, num_warps=8, num_stages=2),
    dict(block_m=32, block_k=32, num_warps=8, num_stages=3),
    dict(block_m=32, block_k=16, num_warps=4, num_stages=4),
    dict(block_m=64, block_k=16, num_warps=8, num_stages=2),
]


@triton.jit
def _pae_linear_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, lnw_ptr, lnb_ptr, out_ptr,
    M, N, K, rep, eps,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_LN: tl.constexpr, GELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 row indices: (M * rep) * N can pass 2**31 at large batch
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None] * K  # [BLOCK_M, 1]
    w_cols = w_ptr + rn[None, :].to(tl.int64) * K  # [1, BLOCK_N]: weight is [N, K], read as its transpose

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LN:
        lw = tl.load(lnw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        lb = tl.load(lnb_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    mask = m_ok[:, None] & n_ok[None, :]
    # source row m feeds output rows m*rep .. m*rep+rep-1 (rep = 1 without a residual): the GEMM is done once
    for j in range(rep):
        rows = (rm * rep + j)[:, None] * N + rn[None, :]
        h = acc
        if HAS_RES:
            h = acc + tl.load(r_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        if HAS_LN:
            # columns past N hold zeros but must not count in the mean or the variance
            mean = tl.sum(tl.where(n_ok[None, :], h, 0.0), axis=1) / N
            hc = tl.where(n_ok[None, :], h - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / N + eps)
            h = hc * rstd[:, None] * lw[None, :] + lb[None, :]
        if GELU:
            h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # erf form, as nn.GELU()
        tl.store(out_ptr + rows, h.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(m: int, n: int, k: int, dtype: torch.dtype, has_ln: bool) -> dict:
    """The tile for an [m, k] x [k, n] problem: with LayerNorm the whole row (BLOCK_N = next_power_of_2(n)) and a
    short BLOCK_M (32 up to 512 columns, 16 beyond), else 64 x 128 tiles (BLOCK_M shrunk for few rows). BLOCK_K and
    the pipeline depth are the largest that keep the staged x and weight tiles within the shared-memory budget."""
    if has_ln:
        bn = max(16, triton.next_power_of_2(n))
        bm = 32 if bn <= 512 else 16
        warps = 4 if bn <= 256 else 8
    else:
        bn = 128
        bm = max(16, min(64, triton.next_power_of_2(max(m, 1))))
        warps = 4
    esize = dtype.itemsize
    for bk, stages in ((64, 3), (32, 3), (64, 2), (32, 2), (16, 3), (16, 2), (16, 1)):
        if (bm + bn) * bk * esize * stages <= _SMEM_BUDGET:
            break
    return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def candidate_configs(n: int, has_ln: bool) -> list[dict]:
    """Full configs for a benchmark sweep of an n-column problem: ``CONFIGS`` without LayerNorm, ``LN_CONFIGS`` (with
    block_n = the whole row) with it."""
    if not has_ln:
        return [dict(c) for c in CONFIGS]
    return [dict(c, block_n=max(16, triton.next_power_of_2(n))) for c in LN_CONFIGS]


def _resolve_config(m: int, n: int, k: int, dtype: torch.dtype, has_ln: bool, config: dict | None) -> dict:
    cfg = default_config(m, n, k, dtype, has_ln)
    if config:
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"pae_linear config keys must be among {CONFIG_KEYS}, got {sorted(unknown)}")
        cfg.update(config)
    blocks = (cfg["block_m"], cfg["block_n"], cfg["block_k"])
    if any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"pae_linear tile sizes must be powers of 2 >= 16 (tl.dot), got {blocks}")
    if has_ln and cfg["block_n"] < n:
        raise ValueError(f"pae_linear with LayerNorm needs block_n >= N = {n} (one program per row), got "
                         f"{cfg['block_n']}")
    return cfg


def _launch(kernel, x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu, config=None):
    m, k = x.shape
    n = weight.shape[0]
    has_ln = ln_weight is not None
    out = torch.empty(m * rep, n, device=x.device, dtype=x.dtype)
    cfg = _resolve_config(m, n, k, x.dtype, has_ln, config)
    if out.numel() == 0:
        return out
    has_bias, has_res = bias is not None, residual is not None
    x, weight = x.contiguous(), weight.contiguous()
    # absent tensors still need a pointer argument: the constexpr flags keep the kernel from reading it
    bias = x if bias is None else bias.contiguous()
    residual = x if residual is None else residual.contiguous()
    lnw = x if ln_weight is None else ln_weight.contiguous()
    lnb = x if ln_bias is None else ln_bias.contiguous()
    # The interpreter's dot multiplies bfloat16 bit patterns as integers: there the operands go up to float32 first,
    # the same products (a bf16 x bf16 product is exact in float32) accumulated in float32, as the tensor cores do.
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]))
    kernel[grid](
        x, weight, bias, residual, lnw, lnb, out,
        m, n, k, rep, float(ln_eps),
        HAS_BIAS=has_bias, HAS_RES=has_res, HAS_LN=has_ln, GELU=bool(gelu),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32",  # only applies to fp32 operands
        UPCAST=upcast,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def pae_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, rep: int = 1, ln_weight: torch.Tensor | None = None,
                      ln_bias: torch.Tensor | None = None, ln_eps: float = 1e-5, gelu: bool = False,
                      config: dict | None = None) -> torch.Tensor:
    """The kernel with the reference's signature, launched directly (runs under ``TRITON_INTERPRET=1`` on CPU).

    ``config`` overrides the tile chosen by :func:`default_config` (keys ``CONFIG_KEYS``), for benchmark sweeps. No
    shape checks here: the dispatcher ``priorclip.kernels.pae_linear.pae_linear`` makes them.
    """
    return _launch(_pae_linear_kernel, x, weight, bias, residual, int(rep), ln_weight, ln_bias, ln_eps, gelu, config)


# ------------------------------------------------------------------------------------------- torch.library op


@torch.library.triton_op("priorclip::pae_linear", mutates_args=())
def _pae_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                   rep: int, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, ln_eps: float,
                   gelu: bool) -> torch.Tensor:
    # wrap_triton lets torch.compile / AOTInductor trace the launch and keep the kernel whole
    return _launch(torch.library.wrap_triton(_pae_linear_kernel), x, weight, bias, residual, rep, ln_weight, ln_bias,
                   ln_eps, gelu)


@_pae_linear_op.register_fake
def _(x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu):
    return x.new_empty(x.shape[0] * rep, weight.shape[0])


def pae_linear_op(x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu):
    """``torch.ops.priorclip.pae_linear``: [M * rep, N] in x's dtype."""
    return torch.ops.priorclip.pae_linear(x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu)
