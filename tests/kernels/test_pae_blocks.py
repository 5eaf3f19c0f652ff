"""PIR's PAE blocks and chains through the kernels (priorclip.kernels.pae) against the model's own modules.

The modules (priorclip.layers.pae, the PIR model's VIR/LCA loops) are the reference; the composition folds the
mappings into the query projections, computes VIR's repeated query once, packs QKV/KV and prunes the last block to
row 0, so each of those is checked here: with the dispatchers (plain torch off CUDA) to float32 rounding, and with
the Triton kernels themselves (the interpreter on CPU, the GPU with ``-m gpu``) by flash-attention's rule against a
float64 run of the modules.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from priorclip.kernels import pae
from priorclip.layers.pae import MHSA, CroSA

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _randomise(m: nn.Module, seed: int) -> nn.Module:
    """Non-trivial LayerNorm affines and biases (the defaults 1/0 would hide swapped or dropped norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return m.eval()


def _blocks(e: int, heads: int, seed: int = 0):
    torch.manual_seed(seed)
    return (_randomise(MHSA(e, heads, 0.2), seed), _randomise(CroSA(e, heads, 0.2), seed + 1),
            _randomise(nn.Linear(e, e), seed + 2))


def _x(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("b,n,e,heads", [(1, 40, 512, 8), (3, 47, 512, 8), (2, 9, 64, 4)])
def test_dispatched_blocks_match_the_modules_in_fp32(b, n, e, heads):
    sa, ca, mapping = _blocks(e, heads)
    x, y, instr = _x(b, n, e, seed=1), _x(b, n, e, seed=2), _x(b, e, seed=3)
    ws, wc = pae.BlockWeights.of(sa, torch.device("cpu"), torch.float32), pae.BlockWeights.of(
        ca, torch.device("cpu"), torch.float32, mapping)
    with torch.no_grad():
        torch.testing.assert_close(pae.mhsa(x, ws), sa(x), rtol=0, atol=2e-5)
        want = ca(mapping(instr[:, None].expand(-1, n, -1)), y)  # VIR: every query row is the instruction
        torch.testing.assert_close(pae.crosa_single_query(instr, y, wc), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(pae.crosa_single_query(instr, y, wc, first_only=True), want[:, :1], rtol=0,
                                   atol=2e-5)
        want = ca(mapping(x), y)  # LCA: the previous representation, mapped, is the query
        torch.testing.assert_close(pae.crosa(x, y, wc), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(pae.crosa(x, y, wc, first_only=True), want[:, :1], rtol=0, atol=2e-5)


def test_key_mask_reaches_every_attention():
    sa, ca, mapping = _blocks(32, 2)
    x, y = _x(2, 7, 32, seed=4), _x(2, 7, 32, seed=5)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True
    dev = torch.device("cpu")
    ws, wc = pae.BlockWeights.of(sa, dev, torch.float32), pae.BlockWeights.of(ca, dev, torch.float32, mapping)
    with torch.no_grad():
        torch.testing.assert_close(pae.mhsa(x, ws, pad), sa(x, pad), rtol=0, atol=2e-5)
        torch.testing.assert_close(pae.crosa(x, y, wc, pad), ca(mapping(x), y, pad), rtol=0, atol=2e-5)
        assert not torch.allclose(pae.mhsa(x, ws, pad), sa(x), atol=1e-3)  # the mask matters in this case


def test_folded_query_projection_is_the_composition_in_float64():
    outer, inner = _randomise(nn.Linear(16, 16), 7), _randomise(nn.Linear(16, 16), 8)
    d = pae.Dense.folded(outer, inner, torch.device("cpu"), torch.float64)
    x = _x(5, 16, seed=9, dtype=torch.float64)
    want = nn.functional.linear(nn.functional.linear(x, inner.weight.double(), inner.bias.double()),
                                outer.weight.double(), outer.bias.double())
    torch.testing.assert_close(nn.functional.linear(x, d.weight, d.bias), want, rtol=0, atol=1e-12)


def test_crosa_needs_its_mapping():
    _, ca, _ = _blocks(16, 2)
    with pytest.raises(ValueError, match="needs the mapping"):
        pae.BlockWeights.of(ca, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b", [1, 2])
def test_triton_blocks_match_float64_modules(device, dtype, b):
    """The kernels' composition: error against float64 at most 2x the modules' own at the same dtype + atol."""
    e, heads, n = 32, 2, 10
    sa, ca, mapping = _blocks(e, heads, seed=b)
    x, y, instr = (_x(b, n, e, seed=11, device=device), _x(b, n, e, seed=12, device=device),
                   _x(b, e, seed=13, device=device))
    ops = pae.triton_ops()
    dev = torch.device(device)
    ws, wc = pae.BlockWeights.of(sa, dev, dtype), pae.BlockWeights.of(ca, dev, dtype, mapping)
    with torch.no_grad():
        cases = {
            "mhsa": (lambda: pae.mhsa(x.to(dtype), ws, ops=ops), lambda m, t: m[0](t(x))),
            "vir crosa": (lambda: pae.crosa_single_query(instr.to(dtype), y.to(dtype), wc, ops=ops),
                          lambda m, t: m[1](m[2](t(instr)[:, None].expand(-1, n, -1)), t(y))),
            "lca crosa": (lambda: pae.crosa(x.to(dtype), y.to(dtype), wc, first_only=True, ops=ops),
                          lambda m, t: m[1](m[2](t(x)), t(y))[:, :1]),
        }
        mods64 = [m.double().to(device) for m in _blocks(e, heads, seed=b)]
        mods = [m.to(device=device, dtype=dtype) for m in _blocks(e, heads, seed=b)]
        for name, (fused, module) in cases.items():
            want = module(mods64, lambda t: t.double())
            got, pt = fused(), module(mods, lambda t: t.to(dtype))
            assert got.dtype == dtype and got.shape == want.shape, name
            err, err_pt = (got.double() - want).abs().max().item(), (pt.double() - want).abs().max().item()
            print(f"{name} {dtype} b={b}: kernels {err:.2e} modules {err_pt:.2e}")
            assert err <= 2 * err_pt + ATOL[dtype], name


def _pir_tiny():
    from priorclip.pir import PIR
    from priorclip.registry import get_config

    torch.manual_seed(0)
    model = PIR(get_config("pir-tiny")).eval()
    for i, m in enumerate(list(model.img_sa) + list(model.img_ca) + list(model.txt_sa) + list(model.txt_ca)):
        _randomise(m, 3 + i)  # a seed each: blocks swapped or repeated would otherwise go unseen
    return model


def test_whole_vir_and_lca_chains_with_the_triton_kernels(device):
    """pir-tiny's VIR and LCA stacks (E 32, 2 heads) run by the kernels against the model's own loops (fp32)."""
    model = _pir_tiny().to(device)
    ops, dev = pae.triton_ops(), torch.device(device)
    v, instr = _x(2, 50, 32, seed=21, device=device), _x(2, 32, seed=22, device=device)
    v[1, 30] = v[1, 7]  # an exact tie in the belief: lower index first in both
    t = _x(2, 11, 32, seed=23, device=device)
    vir_w = pae.ChainWeights.of(model.img_sa, model.img_ca, model.mapping_img, dev, torch.float32)
    lca_w = pae.ChainWeights.of(model.txt_sa, model.txt_ca, model.mapping_txt, dev, torch.float32)
    with torch.no_grad():
        local, order = pae.vir(v, instr, vir_w, model.cfg.filter_size, ops=ops)
        belief = (v @ instr[:, :, None]).squeeze(-1).softmax(-1).double()
        want_order = torch.sort(belief, dim=-1, descending=True, stable=True).indices
        assert torch.equal(order, want_order)
        f = v.gather(1, want_order[:, :40, None].expand(-1, -1, 32))
        query = instr[:, None].expand(-1, 40, -1)
        for sa, ca, mapping in zip(model.img_sa, model.img_ca, model.mapping_img):
            f = ca(mapping(query), sa(f))
        torch.testing.assert_close(local, f[:, 0], rtol=0, atol=5e-5)
        local = t
        for sa, ca, mapping in zip(model.txt_sa, model.txt_ca, model.mapping_txt):
            local = ca(mapping(local), sa(local))
        torch.testing.assert_close(pae.lca(t, lca_w, ops=ops), local[:, 0], rtol=0, atol=5e-5)
