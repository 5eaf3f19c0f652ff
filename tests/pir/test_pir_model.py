"""The closed-domain PIR model: VIR and LCA against float64 re-derivations of spec §2B/§3 written here, ties in the
top-40, batch 1, the checkpoint layouts, the padding option and bad inputs.

The towers (Swin, BERT, ResNet) have their own reference tests; here their outputs are inputs of the re-derivation.
"""

from __future__ import annotations

import math

import pytest
import torch

from priorclip.checkpoint import read_checkpoint, save_checkpoint
from priorclip.errors import CheckpointError
from priorclip.layers.pae import descending_order
from priorclip.registry import create_model, get_config

TINY = "pir-tiny"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model(TINY).double().eval()
    # non-trivial BatchNorm statistics, so the prior's eval path is exercised
    for mod in m.conv_encoder.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _w(sd: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sd[prefix + ".weight"], sd[prefix + ".bias"]


def _linear(sd, prefix, x):
    w, b = _w(sd, prefix)
    return x @ w.T + b


def _layer_norm(sd, prefix, x, eps=1e-5):
    w, b = _w(sd, prefix)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _attention(sd, prefix, q, k, v, heads, key_pad=None):
    """MHAtt written out: per head softmax(q k^T / sqrt(d)) v, then the merge linear."""
    q, k, v = _linear(sd, prefix + ".linear_q", q), _linear(sd, prefix + ".linear_k", k), _linear(sd, prefix + ".linear_v", v)
    b, lq, d = q.shape
    dh = d // heads
    out = torch.empty_like(q)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
        if key_pad is not None:
            scores = scores.masked_fill(key_pad[:, None, :], -1e9)
        p = torch.exp(scores - scores.max(-1, keepdim=True).values)
        out[..., sl] = (p / p.sum(-1, keepdim=True)) @ v[..., sl]
    return _linear(sd, prefix + ".linear_merge", out)


def _ffn(sd, prefix, x):
    h = _linear(sd, prefix + ".0", x)
    h = _layer_norm(sd, prefix + ".1", h)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return _linear(sd, prefix + ".3", h)


def _mhsa(sd, prefix, x, heads, key_pad=None):
    x = _layer_norm(sd, prefix + ".norm1", x + _attention(sd, prefix + ".mhatt", x, x, x, heads, key_pad))
    return _layer_norm(sd, prefix + ".norm2", x + _ffn(sd, prefix + ".ffn", x))


def _crosa(sd, prefix, x, y, heads, key_pad=None):
    """Query from x; keys, values and the residual from y."""
    y = _layer_norm(sd, prefix + ".norm1", y + _attention(sd, prefix + ".mhatt_cross", x, y, y, heads, key_pad))
    return _layer_norm(sd, prefix + ".norm2", y + _ffn(sd, prefix + ".ffn", y))


def _normalise(x):
    return x / x.norm(dim=-1, keepdim=True)


def vir_reference(model, pixels, tokens=None):
    """Spec §2B: belief = softmax(<V_t, c>), the 40 most believed in belief order (ties: lower index first), two
    rounds of MHSA then CroSA with the mapped instruction as query, g_v + head_img(F2[:, 0])."""
    cfg, sd = model.cfg, model.state_dict()
    v = _linear(sd, "vision_proj", model.vision_encoder(pixels) if tokens is None else tokens)
    c = _linear(sd, "conv_proj", model.conv_encoder(pixels))  # [B, E]
    out, orders = [], []
    for b in range(v.shape[0]):
        s = (v[b] * c[b]).sum(-1)
        belief = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
        order = sorted(range(len(belief)), key=lambda t: (-float(belief[t]), t))
        orders.append(order)
        f = v[b, order[: cfg.filter_size]].unsqueeze(0)
        query = c[b].expand(1, cfg.filter_size, -1)
        for i in range(cfg.instru_num):
            s_att = _mhsa(sd, f"img_sa.{i}", f, cfg.pae_heads)
            f = _crosa(sd, f"img_ca.{i}", _linear(sd, f"mapping_img.{i}", query), s_att, cfg.pae_heads)
        out.append(v[b, 0] + _linear(sd, "head_img", f[0, 0]))
    return _normalise(torch.stack(out)), torch.tensor(orders)


def lca_reference(model, ids, mask_padding=False):
    """Spec §3: three cycles of MHSA then CroSA with the previous cycle, mapped, as query; g_t + head_txt(T3[:, 0])."""
    cfg, sd = model.cfg, model.state_dict()
    pad = ids == 0 if mask_padding else None
    t = _linear(sd, "text_proj", model.text_encoder(ids, attention_mask=None if pad is None else ~pad))
    local = t
    for i in range(cfg.cycle_num):
        s_att = _mhsa(sd, f"txt_sa.{i}", local, cfg.pae_heads, pad)
        local = _crosa(sd, f"txt_ca.{i}", _linear(sd, f"mapping_txt.{i}", local), s_att, cfg.pae_heads, pad)
    return _normalise(t[:, 0] + _linear(sd, "head_txt", local[:, 0]))


def _pixels(n, seed=1):
    s = get_config(TINY).vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ids(rows):
    n = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (n - len(r)) for r in rows])


@pytest.mark.parametrize("batch", [1, 3])
def test_vir_matches_float64_rederivation(model, batch):
    pixels = _pixels(batch)
    with torch.no_grad():
        emb, order = model.encode_image_with_order(pixels)
        ref, ref_order = vir_reference(model, pixels)
    assert emb.shape == (batch, model.cfg.embed_dim) and order.shape == (batch, 50)
    assert torch.equal(order, ref_order)
    assert (emb - ref).abs().max() < 1e-10


def test_vir_fp32_close_to_float64(model):
    pixels = _pixels(2)
    m32 = create_model(TINY).eval()
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert (m32.encode_image(pixels.float()).double() - vir_reference(model, pixels)[0]).abs().max() < 1e-5


def test_vir_ties_keep_lower_index_first(model, monkeypatch):
    """Beliefs that underflow to exactly 0 tie; which of them make the top 40 and in which order is the rule
    "lower index first" (CUDA's sort and a stable sort), never the CPU sort's arbitrary order."""
    pixels = _pixels(2, seed=3)
    with torch.no_grad():
        tokens = model.vision_encoder(pixels).clone()
        c = model.conv_proj(model.conv_encoder(pixels))  # [B, E]
        away = c @ model.vision_proj.weight  # direction in token space that lowers <vision_proj(t), c>
        away = away / away.norm(dim=-1, keepdim=True)
        # 20 tokens (10 of them above the cut at 40) pushed thousands of logits below the rest: softmax gives 0.0
        tokens[:, 30:50] -= 1e4 * away[:, None, :]
        monkeypatch.setattr(model.vision_encoder, "forward", lambda x: tokens)
        emb, order = model.encode_image_with_order(pixels)
        ref, ref_order = vir_reference(model, pixels, tokens)
    assert torch.equal(order, ref_order)
    assert (emb - ref).abs().max() < 1e-10
    with torch.no_grad():
        belief = (model.vision_proj(tokens) @ c.unsqueeze(-1)).squeeze(-1).float().softmax(-1)
    assert (belief[:, 30:50] == 0).all() and (belief[:, :30] > 0).all()
    assert order[:, 30:40].tolist() == [list(range(30, 40))] * 2  # the tied tokens kept are the lowest indices


def test_descending_order_is_stable_and_exact():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 50), generator=g).double()  # many exact ties
    scores[0] = 1.0  # all equal
    order = descending_order(scores)
    for row, o in zip(scores, order):
        assert o.tolist() == sorted(range(50), key=lambda t: (-float(row[t]), t))
    assert order[0].tolist() == list(range(50))
    assert descending_order(scores[:1]).shape == (1, 50)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_lca_matches_float64_rederivation(model, mask_padding, monkeypatch):
    monkeypatch.setattr(model, "cfg", model.cfg.replace(mask_padding=mask_padding))
    ids = _ids([[101, 2023, 2003, 1037, 3231], [101, 4937], [101, 2312, 2300, 2007, 3536, 2379, 1996, 2543]])
    with torch.no_grad():
        for batch in (ids[:1, :5], ids):
            assert (model.encode_text(batch) - lca_reference(model, batch, mask_padding)).abs().max() < 1e-10


def test_padding_is_attended_unless_masked(model, monkeypatch):
    """PIR's default: a caption's embedding depends on how far its batch pads it; with mask_padding it does not."""
    short = torch.tensor([[101, 2023, 2003]])
    padded = torch.tensor([[101, 2023, 2003, 0, 0, 0]])
    with torch.no_grad():
        assert (model.encode_text(short) - model.encode_text(padded)).abs().max() > 1e-4
        monkeypatch.setattr(model, "cfg", model.cfg.replace(mask_padding=True))
        assert (model.encode_text(short) - model.encode_text(padded)).abs().max() < 1e-10


def test_bad_inputs(model):
    s = model.image_size
    for bad in (torch.zeros(2, 3, s, s + 1), torch.zeros(3, s, s), torch.zeros(2, 1, s, s)):
        with pytest.raises(ValueError, match="encode_image expects pixels"):
            model.encode_image(bad.double())
    for bad in (torch.zeros(2, 48, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="encode_text expects"):
            model.encode_text(bad)


def test_full_config_layout():
    """Spec §5B: 905 state-dict entries and 184,642,492 parameters, split as the reference's modules."""
    with torch.device("meta"):
        m = create_model("pir-swin-t-bert")
    sd = m.state_dict()
    assert len(sd) == 905
    parts = {"vision_encoder.": 27_519_354, "text_encoder.": 108_891_648, "conv_encoder.": 23_508_032,
             "vision_proj.": 393_728, "text_proj.": 393_728, "conv_proj.": 1_049_088}
    for prefix, n in parts.items():
        assert sum(p.numel() for k, p in m.named_parameters() if k.startswith(prefix)) == n, prefix
    vir = sum(p.numel() for k, p in m.named_parameters() if k.startswith(("img_sa.", "img_ca.", "mapping_img.", "head_img.")))
    lca = sum(p.numel() for k, p in m.named_parameters() if k.startswith(("txt_sa.", "txt_ca.", "mapping_txt.", "head_txt.")))
    assert (vir, lca) == (9_207_296, 13_679_616)
    assert sum(p.numel() for p in m.parameters()) == 184_642_492
    assert sum(p.numel() for k, p in m.named_parameters() if k.startswith("img_sa.0.")) == 2_104_832
    # the prior is frozen as in the reference; everything else trains
    assert not any(p.requires_grad for p in m.conv_encoder.parameters())
    assert all(p.requires_grad for k, p in m.named_parameters() if not k.startswith("conv_encoder."))


def test_official_checkpoint_layout_loads_strictly(model, tmp_path, monkeypatch):
    """PIR-pytorch's checkpoint_best.pth: {"model": state dict, "config": its YAML settings, "optimizer": ...}.
    Without --model the layout is recognised and the recorded settings shape the config."""
    import priorclip.registry as registry

    sd = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint_best.pth"
    reference_settings = {"filter_size": 40, "instru_num": 2, "cycle_num": 3, "head": 2, "max_tokens": 47,
                          "embed_dim": 32, "batch_size_train": 128, "optimizer": {"opt": "adamW", "lr": 6e-5}}
    torch.save({"model": sd, "config": reference_settings, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 7}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.config is None and ckpt.extra["reference_config"]["filter_size"] == 40 and ckpt.extra["epoch"] == 7
    monkeypatch.setattr(registry, "DEFAULT_PIR_MODEL", TINY)
    loaded = create_model(checkpoint=path)
    assert loaded.cfg.name == TINY and loaded.cfg.family == "pir"
    pixels = _pixels(2).float()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), create_model(TINY, checkpoint=path).encode_image(pixels))
    # a recorded architecture setting that differs is taken from the file, and the strict load then says what differs
    torch.save({"model": sd, "config": {**reference_settings, "cycle_num": 2}}, path)
    with pytest.raises(CheckpointError, match=r"does not fit model 'pir-tiny'.*unexpected keys: .*txt_sa\.2"):
        create_model(checkpoint=path)
    del sd["temp2"]
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: temp2"):
        create_model(TINY, checkpoint=path)


def test_own_checkpoint_round_trip_keeps_the_family(model, tmp_path):
    m = create_model(TINY)
    for suffix in (".pt", ".safetensors"):
        path = save_checkpoint(m, tmp_path / f"pir{suffix}")
        again = create_model(checkpoint=path)
        assert again.cfg == m.cfg and type(again) is type(m)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_forward_returns_temperatures_and_trains(model):
    m = create_model(TINY).train()
    pixels, ids = _pixels(2).float(), _ids([[101, 2023, 2003], [101, 4937]])
    img, txt, temps = m(pixels, ids)
    assert img.shape == txt.shape == (2, 32) and temps.tolist() == pytest.approx([0.07, 0.07])
    (img.sum() + txt.sum() + temps.sum()).backward()
    assert m.temp.grad is not None and m.temp2.grad is not None
    assert all(p.grad is None for p in m.conv_encoder.parameters())  # frozen prior
    m2 = create_model(TINY).train()
    r0 = m2.conv_encoder[1].running_mean.clone()
    m2.encode_image(pixels)
    assert not torch.equal(r0, m2.conv_encoder[1].running_mean)  # BatchNorm still runs in train mode (reference)


def test_masked_attention_in_float16_gives_masked_keys_no_weight():
    """-1e9 overflows float16 (torch refuses the fill): half-precision scores are filled with -65504 instead, which
    gives masked keys exactly zero weight as -1e9 does in float32."""
    from priorclip.layers.pae import MHAtt

    torch.manual_seed(0)
    att = MHAtt(32, 2, 0.0).eval()
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    with torch.no_grad():
        want = att(x, x, x, pad)
        half = att.half()(x.half(), x.half(), x.half(), pad)
        x2 = x.clone()
        x2[0, 4:] = 50.0  # what a masked key holds never reaches the output
        assert torch.equal(att(x2.half(), x2.half(), x2.half(), pad)[0, :4], half[0, :4])
    assert (half.float() - want).abs().max() < 1e-2
