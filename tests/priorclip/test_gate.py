"""The belief gate, prior token and pooling against a float64 re-derivation of spec §2A written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from priorclip import create_model
from priorclip.kernels.belief_gate import belief_gate, descending_order


def gate_f64(x: torch.Tensor, y: torch.Tensor, variant: str, belief32: bool = False) -> torch.Tensor:
    """Spec §2A.3-2A.5 with explicit loops: Python's stable sort on (-belief, index) gives lower-index-first ties.

    ``belief32`` rounds the logits and the softmax to float32 as the reference does for a float32 model: which
    entries underflow to exact zeros (and so tie) is part of the float32 contract.
    """
    x, y = x.double(), y.double()
    b, t, d = x.shape
    out = torch.empty(b, t, d, dtype=torch.float64)
    for i in range(b):
        s = [float(x[i, j] @ y[i, 0]) for j in range(t)]
        if belief32:
            belief = torch.softmax(torch.tensor(s, dtype=torch.float32), 0).tolist()
        else:
            m = max(s)
            e = [math.exp(v - m) for v in s]
            belief = [v / sum(e) for v in e]
        order = sorted(range(t), key=lambda j: -belief[j])  # stable: equal beliefs keep ascending index
        for r in range(t):
            g = belief[r] + 1.0 / math.sqrt(order[r] + 1) if variant == "belief+rank" else 2.0 * belief[r]
            out[i, r] = x[i, r] * g
        norm = out[i].norm(dim=0).clamp_min(1e-12)  # over tokens, per channel
        out[i] = out[i] / norm
    return out


def test_descending_order_breaks_ties_lower_index_first():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 4, (5, 50), generator=g).float()  # many ties
    got = descending_order(v)
    for row, order in zip(v.tolist(), got.tolist()):
        assert order == sorted(range(50), key=lambda j: -row[j])
    assert descending_order(torch.tensor([[0.2, 0.5, 0.2, 0.1]])).tolist() == [[1, 0, 2, 3]]


def test_rank_slot_semantics_hand_computed():
    """w is indexed by rank slot r but applied to token position r (the reference's literal behaviour)."""
    x = torch.tensor([[[1.0], [3.0], [2.0]]], dtype=torch.float64)  # T=3, D=1
    y = torch.tensor([[[1.0]]], dtype=torch.float64)
    belief = torch.softmax(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), 0)
    order = [1, 2, 0]  # token indices by descending belief
    w = torch.tensor([1 / math.sqrt(o + 1) for o in order], dtype=torch.float64)  # [1/sqrt2, 1/sqrt3, 1]
    gated = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64) * (belief + w)
    want = gated / gated.norm()
    got = belief_gate(x.float(), y.float())[0, :, 0].double()
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("variant", ["belief+rank", "2belief"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gate_matches_f64(variant, batch):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 50, 64, generator=g)
    y = 0.3 * torch.randn(batch, 1, 64, generator=g)
    got = belief_gate(x, y, variant)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got.double() - gate_f64(x, y, variant)).abs().max().item() < 1e-6
    # half inputs: float32 statistics and output, as dtype promotion gives the reference under autocast
    half = belief_gate(x.half(), y.half(), variant)
    assert half.dtype == torch.float32
    assert (half.double() - gate_f64(x.half(), y.half(), variant)).abs().max().item() < 1e-2


def test_gate_ties_from_softmax_underflow():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 50, 768, generator=g)
    y = 4.0 * torch.randn(2, 1, 768, generator=g)  # logit std ~110: most softmax entries underflow to exactly 0
    belief = torch.softmax(torch.matmul(x, y.transpose(1, 2)).squeeze(-1), dim=1)
    assert (belief == 0).sum(dim=1).min() >= 10  # the test really has ties
    want = gate_f64(x, y, "belief+rank", belief32=True)
    got = belief_gate(x, y)
    assert (got.double() - want).abs().max().item() < 1e-5
    # a wrong tie order (e.g. higher index first) moves the output far beyond that
    flipped = gate_f64(x.flip(1), y, "belief+rank", belief32=True).flip(1)
    assert (flipped - want).abs().max().item() > 1e-2


def test_gate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="belief_gate expects"):
        belief_gate(torch.randn(2, 50, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="unknown gate variant"):
        belief_gate(torch.randn(1, 5, 8), torch.randn(1, 1, 8), "nope")


def image_path_f64(model, pixels: torch.Tensor, belief32: bool = False) -> torch.Tensor:
    """encode_image re-derived step by step in float64 from the model's weights (spec §2A.1-2A.8)."""
    m = model.double()
    v = m.visual
    x = pixels.double()
    y = m.vision_proj_res(m.res_visual(x)).unsqueeze(1)  # A.1: prior token [B,1,D]
    stem = F.conv2d(x, v.conv1.weight, stride=v.conv1.stride).flatten(2).transpose(1, 2)  # A.2
    stem = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), stem], 1) + v.positional_embedding
    stem = F.layer_norm(stem, (stem.shape[-1],), v.ln_pre.weight, v.ln_pre.bias, v.ln_pre.eps)
    z = torch.cat([y, gate_f64(stem, y, m.cfg.gate, belief32)], dim=1)  # A.3-A.6: y gets no pos-emb and no ln_pre
    for blk in v.transformer.resblocks:  # A.7: pre-LN blocks, written out
        h = blk.ln_1(z)
        q, k, val = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        heads = blk.attn.heads
        sh = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        a = torch.softmax(sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads), -1) @ sh(val)
        z = z + blk.attn.out_proj(a.transpose(1, 2).reshape(z.shape))
        z = z + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(z))))
    pooled = v.ln_post(z)[:, 0]  # A.8: token 0 is the prior token
    return F.normalize(pooled @ v.proj, dim=-1)


@pytest.mark.parametrize("gate", ["belief+rank", "2belief"])
def test_image_path_matches_f64_rederivation(gate):
    torch.manual_seed(3)
    model = create_model("priorclip-tiny", gate=gate).double()
    pixels = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = image_path_f64(model, pixels)
        got = model.encode_image(pixels)
        single = model.encode_image(pixels[1:2])  # batch size 1 works and matches the batched row
    assert (got - want).abs().max().item() < 1e-10
    assert (single[0] - got[1]).abs().max().item() < 1e-10


def test_full_model_batch_one_with_ties():
    """The released layout at B=1, with a prior scaled so the belief softmax has exact zeros (ties)."""
    torch.manual_seed(5)
    model = create_model("priorclip-vit-b32")
    with torch.no_grad():
        model.vision_proj_res.weight.mul_(200.0)
        pixels = torch.randn(1, 3, 224, 224)
        y = model.prior_token(pixels)
        stem = model.visual.stem(pixels)
        belief = torch.softmax(torch.matmul(stem, y.transpose(1, 2)).squeeze(-1), 1)
        assert (belief == 0).sum() >= 10
        got = model.encode_image(pixels)
        want = image_path_f64(model, pixels.double(), belief32=True).float()
    assert got.shape == (1, 512)
    assert (got - want).abs().max().item() < 1e-5


def order_f64(model, pixels: torch.Tensor) -> list[list[int]]:
    """The belief order re-derived in float64 with Python's stable sort (ties lower index first)."""
    m = model.double()
    v = m.visual
    x = pixels.double()
    y = m.vision_proj_res(m.res_visual(x)).unsqueeze(1)
    stem = F.conv2d(x, v.conv1.weight, stride=v.conv1.stride).flatten(2).transpose(1, 2)
    stem = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), stem], 1) + v.positional_embedding
    stem = F.layer_norm(stem, (stem.shape[-1],), v.ln_pre.weight, v.ln_pre.bias, v.ln_pre.eps)
    s = (stem @ y.transpose(1, 2)).squeeze(-1)
    return [sorted(range(s.shape[1]), key=lambda j: -row[j]) for row in s.tolist()]


@pytest.mark.parametrize("batch", [1, 3])
def test_encode_image_with_order(batch):
    """The order the parity checks compare is the gate's own, and asking for it changes nothing else."""
    torch.manual_seed(11)
    model = create_model("priorclip-tiny").double()
    pixels = torch.randn(batch, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        emb, order = model.encode_image_with_order(pixels)
        plain = model.encode_image(pixels)
    assert order.dtype == torch.int64 and order.shape == (batch, model.cfg.vision.num_tokens)
    assert order.tolist() == order_f64(model, pixels)
    assert torch.equal(emb, plain)
    with pytest.raises(ValueError, match="encode_image expects"):
        model.encode_image_with_order(pixels[:, :, :32])


def test_no_order_without_a_ranking_gate():
    with torch.no_grad():
        for name, gate in (("clip-tiny", None), ("priorclip-tiny", "2belief")):
            model = create_model(name, **({"gate": gate} if gate else {}))
            emb, order = model.encode_image_with_order(torch.randn(2, 3, 64, 64))
            assert order is None and emb.shape == (2, model.cfg.embed_dim)


def test_empty_batches_embed_to_empty_results():
    m = create_model("priorclip-tiny").eval()
    s = m.image_size
    with torch.no_grad():
        assert m.encode_image(torch.zeros(0, 3, s, s)).shape == (0, m.cfg.embed_dim)
        assert m.encode_text(torch.zeros(0, 77, dtype=torch.long)).shape == (0, m.cfg.embed_dim)


def test_model_reference_path_is_stem_gate_reference_through_its_modules():
    """Off CUDA the model gates through its own modules (hooks fire, exported graphs keep their scopes), and that
    path is the kernels' reference, bit for bit."""
    from priorclip.kernels.belief_gate import stem_gate_reference

    m = create_model("priorclip-tiny").eval()
    px = torch.randn(3, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(4))
    fired = []
    hooks = [mod.register_forward_hook(lambda *_, n=name: fired.append(n))
             for name, mod in (("ln_pre", m.visual.ln_pre), ("vision_proj_res", m.vision_proj_res))]
    with torch.no_grad():
        r = m.res_visual(px)
        got, order = m.visual._gated_stem(px, None, r, m.vision_proj_res, "auto")
        v = m.visual
        want, want_order = stem_gate_reference(v.patch_tokens(px), v.class_embedding, v.positional_embedding,
                                               v.ln_pre.weight, v.ln_pre.bias, v.ln_pre.eps, r,
                                               m.vision_proj_res.weight, m.vision_proj_res.bias, m.cfg.gate)
    for h in hooks:
        h.remove()
    assert sorted(fired) == ["ln_pre", "vision_proj_res"]
    assert torch.equal(got, want) and torch.equal(order, want_order)
