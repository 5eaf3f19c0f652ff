"""VIR's hard belief filter: the Triton kernel against the plain-torch reference, and the reference against a float64
hand computation.

Both outputs are exact objects (token indices and bit copies of input rows), so there is no tolerance: the order
must equal the reference's and the kept rows must be bitwise equal, including on exact ties (equal logits, and
beliefs that underflow to exactly 0, both decided lower index first).
"""

from __future__ import annotations

import pytest
import torch

from priorclip.kernels import vir_filter as vf
from priorclip.layers.pae import descending_order

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, E, keep): the model's (50 tokens of 512, keep 40) at batch 1, narrow widths, T and E off the power-of-two
# grid (E = 200: a partial 128-chunk), keep = T, and the largest T the kernel takes (BLOCK_T 256).
SHAPES = [(1, 50, 512, 40), (3, 50, 32, 40), (2, 7, 16, 3), (5, 50, 64, 50), (2, 33, 200, 20), (2, 256, 16, 100)]


def _kernel():
    from priorclip.kernels.vir_filter_triton import vir_filter_triton

    return vir_filter_triton


def _random(b, t, e, dtype, device, seed, logit_std=3.0):
    """Gaussian tokens and an instruction scaled so the logits have std ``logit_std``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, t, e, generator=g).to(device=device, dtype=dtype)
    instr = (logit_std / e**0.5 * torch.randn(b, e, generator=g)).to(device=device, dtype=dtype)
    return tokens, instr


def _grid(b, t, e, dtype, device, seed, span=1):
    """Tokens on a 1/8 grid (|x| <= span) and an instruction on a 1/4 grid (|c| <= 1/2): every product and partial
    sum is exact in float32 (and the values in every dtype), so the float32 logits do not depend on summation order
    and equal rows give equal logits on every backend."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(-8 * span, 8 * span + 1, (b, t, e), generator=g) / 8
    instr = torch.randint(-2, 3, (b, e), generator=g) / 4
    return tokens.to(device=device, dtype=dtype), instr.to(device=device, dtype=dtype)


def _check(tokens, instr, keep):
    """Run kernel and reference; assert exact agreement; return the reference's (kept, order) on the CPU."""
    kept, order = _kernel()(tokens, instr, keep)
    want_kept, want_order = vf.vir_filter_reference(tokens, instr, keep)
    b, t, e = tokens.shape
    assert kept.shape == (b, keep, e) and kept.dtype == tokens.dtype
    assert order.shape == (b, t) and order.dtype == torch.int64
    assert torch.equal(order.cpu(), want_order.cpu())
    assert torch.equal(kept.cpu(), want_kept.cpu())  # bit copies of the input rows (no NaNs in these inputs)
    return want_kept.cpu(), want_order.cpu()


@pytest.mark.parametrize("logit_std", [3.0, 40.0])  # 40: many tail beliefs underflow to 0 and tie
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(device, shape, dtype, logit_std):
    b, t, e, keep = shape
    tokens, instr = _random(b, t, e, dtype, device, seed=t * e + b, logit_std=logit_std)
    _, order = _check(tokens, instr, keep)
    assert torch.equal(order.sort(dim=1).values, torch.arange(t).expand(b, t))  # a permutation per sample


def test_reference_against_float64_stable_sort():
    """The reference, independently: float64 logits and softmax, ``torch.sort(stable=True)``, on distinct beliefs."""
    tokens, instr = _random(4, 50, 512, torch.float32, "cpu", seed=11)
    kept, order = vf.vir_filter_reference(tokens, instr, 40)
    logits = torch.einsum("bte,be->bt", tokens.double(), instr.double())
    belief = torch.softmax(logits, dim=-1)
    # beliefs distinct by a factor exp(gap), far beyond float32 rounding, none underflowed: the order is well defined
    assert logits.sort(dim=-1).values.diff(dim=-1).min() > 1e-4 and belief.min() > 1e-30
    want = torch.sort(belief, dim=-1, stable=True, descending=True).indices
    assert torch.equal(order, want)
    assert torch.equal(kept, torch.stack([tokens[i, want[i, :40]] for i in range(4)]))


def test_reference_is_the_models_expression():
    """The reference is op for op what PIR's _image_features computed before the dispatcher (instr as [B, 1, E])."""
    for dtype in DTYPES:
        tokens, instr = _random(3, 50, 64, dtype, "cpu", seed=5, logit_std=20.0)
        v, c = tokens, instr.unsqueeze(1)
        belief = (v @ c.transpose(1, 2)).squeeze(-1).float().softmax(dim=-1)
        order = descending_order(belief)
        f = v.gather(1, order[:, :40].unsqueeze(-1).expand(-1, -1, v.shape[-1]))
        kept, got = vf.vir_filter_reference(tokens, instr, 40)
        assert torch.equal(got, order) and torch.equal(kept, f)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicated_rows_tie_lower_index_first(device, dtype):
    tokens, instr = _grid(3, 50, 64, dtype, device, seed=2)
    copies = {3: 17, 10: 40, 0: 49}  # row 17 = row 3, etc.
    for src, dst in copies.items():
        tokens[:, dst] = tokens[:, src]
    _, order = _check(tokens, instr, 40)
    belief = (tokens @ instr.unsqueeze(-1)).squeeze(-1).float().softmax(dim=-1).cpu().gather(1, order)
    step, index_step = belief.diff(dim=1), order.diff(dim=1)
    assert (step <= 0).all() and (index_step[step == 0] > 0).all()  # descending, equal beliefs by index
    pos = order.argsort(dim=1)
    for src, dst in copies.items():
        assert (pos[:, src] < pos[:, dst]).all()


def _underflow_case(dtype, device):
    """Sample 0: three tokens with ordinary logits; every other token's logit is 190..270 below the max, DIFFERENT
    per token and rising with the index, so their beliefs are exactly 0 (tie, lower index first) while their logits
    say the opposite. Sample 1: every logit 200..260 below zero and distinct: the softmax (shift-invariant) still
    ranks them all, which a kernel that let its padded lanes (logit 0) into the max would not (all would underflow).
    """
    b, t, e = 2, 13, 24
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(b, t, e, generator=g)
    tokens[:, :, 0] = 0
    instr = torch.zeros(b, e)
    instr[:, 0] = 1  # logit = tokens[:, :, 0], exactly, in every dtype below
    normal = {5: 0.0, 9: -1.0, 2: -2.5}
    for i in range(t):
        tokens[0, i, 0] = normal.get(i, -280.0 + 6 * i)
    tokens[1, :, 0] = -200.0 - 5 * torch.arange(t).flip(0).float()  # distinct, rising with index
    return tokens.to(device=device, dtype=dtype), instr.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_underflowed_beliefs_tie_lower_index_first(device, dtype):
    tokens, instr = _underflow_case(dtype, device)
    keep = 6
    _, order = _check(tokens, instr, keep)
    zeros = [i for i in range(13) if i not in (5, 9, 2)]
    assert order[0].tolist() == [5, 9, 2] + zeros  # belief order, then the underflowed tokens by index
    assert order[1].tolist() == list(range(12, -1, -1))  # the whole sample ranked by logit
    logits = tokens[0, :, 0].float().cpu()
    assert (torch.softmax(logits, dim=0)[zeros] == 0).all()
    # the case separates a softmax ranking from a logits top-k: that would keep different tokens
    assert set(logits.topk(keep).indices.tolist()) != set(order[0, :keep].tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subnormal_beliefs_rank_by_value(device, dtype):
    """Logits 88..100 below the max give subnormal, nonzero, distinct beliefs: ranked by value (here the reverse of
    index order), not tied at 0 as an exp or divide that flushed subnormals to zero would make them. Logits 150
    below do tie at 0, after them, by index."""
    t = 20
    tokens = torch.randn(1, t, 8, generator=torch.Generator().manual_seed(1))
    instr = torch.zeros(1, 8)
    instr[0, 0] = 1
    tokens[0, :, 0] = torch.tensor([-100.0 + i for i in range(13)] + [-150.0] * 6 + [0.0])
    tokens, instr = tokens.to(device=device, dtype=dtype), instr.to(device=device, dtype=dtype)
    _, order = _check(tokens, instr, 16)
    belief = torch.softmax(tokens[0, :, 0].float().cpu(), dim=0)
    assert ((belief[:13] > 0) & (belief[:13] < torch.finfo(torch.float32).tiny)).all()
    assert order[0].tolist() == [19] + list(range(12, -1, -1)) + list(range(13, 19))


def _round_bf16_by_truncation(x: torch.Tensor) -> torch.Tensor:
    return (x.float().view(torch.int32) & -65536).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_logits_rounded_once_to_tokens_dtype(device, dtype):
    """Exact float32 logits (256 + std ~50 multiples of 1/32) large enough that rounding them to the half dtype
    merges distinct values into ties. The order depends on rounding once to nearest: unrounded logits (and, for
    bfloat16, truncated ones: the interpreter's cast) give a different order here. The instruction comes in float32
    (a mixed-precision caller): it is rounded to the tokens' dtype first, as the reference does."""
    tokens, instr = _grid(4, 50, 256, torch.float32, "cpu", seed=3, span=8)
    tokens[:, :, 0], instr[:, 0] = 64, 4  # a common offset of 256: the softmax ignores it, the rounding does not
    exact = torch.einsum("bte,be->bt", tokens.double(), instr.double()).float()  # exact: grid values
    tokens, instr = tokens.to(device=device, dtype=dtype), instr.to(device=device)
    _, order = _check(tokens, instr, 40)
    assert torch.equal(descending_order(exact.to(dtype).float().softmax(dim=-1)), order)
    wrongs = [exact] + ([_round_bf16_by_truncation(exact)] if dtype == torch.bfloat16 else [])
    for wrong in wrongs:
        assert not torch.equal(descending_order(wrong.softmax(dim=-1)), order)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_instruction_is_rounded_first(device, dtype):
    """A float32 instruction with half tokens (a mixed-precision caller): rounded to the tokens' dtype before the dot
    products, as the reference does; the logits sit near 256, where half-precision rounding makes many ties."""
    tokens, instr = _random(4, 256, 64, torch.float32, "cpu", seed=9, logit_std=3.0)
    tokens[:, :, 0], instr[:, 0] = 64, 4.01
    _check(tokens.to(device=device, dtype=dtype), instr.to(device), 40)


def test_empty_batch(device):
    tokens, instr = _random(0, 50, 64, torch.float16, device, seed=0)
    kept, order = _kernel()(tokens, instr, 40)
    assert kept.shape == (0, 40, 64) and order.shape == (0, 50) and order.dtype == torch.int64


def test_bad_inputs_are_one_line():
    tokens, instr = _random(2, 10, 8, torch.float32, "cpu", seed=0)
    bad = [(tokens[0], instr, 4), (tokens, instr[0], 4), (tokens, instr[:1], 4), (tokens, instr[:, :7], 4),
           (tokens, instr.unsqueeze(1), 4), (tokens, instr, 0), (tokens, instr, 11), (tokens, instr, 4.0),
           (tokens, instr, True), (tokens[:, :0], instr, 1)]
    for args in bad:
        with pytest.raises(ValueError, match="vir_filter expects") as e:
            vf.vir_filter(*args)
        assert "\n" not in str(e.value)
    vf.vir_filter(tokens, instr, 10)  # keep = T is valid


def test_dispatcher_off_cuda_is_the_reference():
    tokens, instr = _random(3, 50, 32, torch.bfloat16, "cpu", seed=4, logit_std=40.0)
    want = vf.vir_filter_reference(tokens, instr, 40)
    for kernels in ("auto", "reference"):
        got = vf.vir_filter(tokens, instr, 40, kernels=kernels)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_dispatcher_fused_path_and_fallback(monkeypatch):
    """The fused branch (forced on here: the op runs under the interpreter on CPU) and its silent fallback past
    T = 256."""
    import priorclip.kernels.vir_filter_triton as vt

    calls = []
    op = vt.vir_filter_op
    monkeypatch.setattr(vf, "fused_enabled", lambda *a, **k: True)
    monkeypatch.setattr(vt, "vir_filter_op", lambda *a: calls.append(a) or op(*a))
    for t, fused in ((50, True), (256, True), (257, False)):
        tokens, instr = _random(2, t, 8, torch.float16, "cpu", seed=t)
        got = vf.vir_filter(tokens, instr, 40)
        want = vf.vir_filter_reference(tokens, instr, 40)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (len(calls) == 1) == fused
        calls.clear()


@pytest.mark.gpu
def test_op_opcheck_on_cuda():
    tokens, instr = _random(8, 50, 512, torch.bfloat16, "cuda", seed=0, logit_std=40.0)
    torch.library.opcheck(torch.ops.priorclip.vir_filter.default, (tokens, instr, 40))
