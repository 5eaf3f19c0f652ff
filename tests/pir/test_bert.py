"""PIR's BERT text tower against transformers' BertModel (eager attention, erf GELU, eps 1e-12), weights shared
through ``hf_bert_state_dict_to_ours`` from a hub-style state dict (``bert.`` prefix, gamma/beta, pooler, cls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from priorclip.errors import CheckpointError
from priorclip.layers.bert import BertEncoder, Fp32LayerNorm, hf_bert_state_dict_to_ours
from priorclip.registry import get_config

transformers = pytest.importorskip("transformers")

TINY = get_config("pir-tiny").text
FULL = get_config("pir-swin-t-bert").text
# Sequence length per config: the real 47-token context for the tiny tower, fewer tokens keep the 12-layer one quick.
LENGTH = {"tiny": TINY.context_length, "full": 24}


def _hf_model(cfg, std: float, seed: int):
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="eager",
    )
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Random biases and LayerNorm affines too, so a dropped bias or a gamma/beta swap shows.
            p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, std, generator=gen)
    return hf


def _hub_file(hf) -> dict[str, torch.Tensor]:
    """What an old ``bert-base-uncased/pytorch_model.bin`` looks like: prefixed, gamma/beta, pooler and MLM heads."""
    sd = {}
    for k, v in hf.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd["bert." + k] = v.clone()
    w = hf.config.hidden_size
    sd["bert.embeddings.position_ids"] = torch.arange(hf.config.max_position_embeddings)[None]
    sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"] = torch.zeros(w, w), torch.zeros(w)
    sd["cls.predictions.bias"] = torch.zeros(hf.config.vocab_size)
    sd["cls.predictions.transform.LayerNorm.gamma"] = torch.ones(w)
    return sd


def _pair(cfg, std: float, seed: int):
    hf = _hf_model(cfg, std, seed)
    ours = BertEncoder(cfg).eval()
    ours.load_state_dict(hf_bert_state_dict_to_ours(_hub_file(hf)), strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def tiny_pair():
    return _pair(TINY, std=0.1, seed=0)


@pytest.fixture(scope="module")
def full_pair():
    return _pair(FULL, std=0.02, seed=1)


def _ids(cfg, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask[b, length - 7 * b:] = 0  # row 0 unpadded, later rows progressively shorter
    return mask


@pytest.mark.parametrize("which", ["tiny", "full"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_transformers_without_mask(request, which, batch):
    hf, ours = request.getfixturevalue(f"{which}_pair")
    cfg = TINY if which == "tiny" else FULL
    ids = _ids(cfg, batch, LENGTH[which])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        got = ours(ids)
    assert got.shape == (batch, LENGTH[which], cfg.width)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("which, mask_dtype", [("tiny", torch.long), ("tiny", torch.bool), ("full", torch.long)])
def test_matches_transformers_with_padding_mask(request, which, mask_dtype):
    hf, ours = request.getfixturevalue(f"{which}_pair")
    cfg = TINY if which == "tiny" else FULL
    ids = _ids(cfg, 3, LENGTH[which], seed=1)
    mask = _padding_mask(3, LENGTH[which])
    ids = ids * mask  # [PAD] = 0 where masked, as a tokenizer writes it
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask.to(mask_dtype))
    assert (got - ref).abs().max().item() <= 1e-5


def test_padding_is_attended_without_mask_and_ignored_with_it(tiny_pair):
    _, ours = tiny_pair
    short = torch.tensor([[101, 2023, 2003, 1037, 3899]])
    padded = torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        base = ours(short)
        unmasked = ours(padded)[:, :5]
        masked = ours(padded, mask)[:, :5]
        masked_short = ours(short, torch.ones_like(short))
    assert (unmasked - base).abs().max().item() > 1e-3  # PIR behaviour: [PAD] changes the real tokens
    assert (masked - base).abs().max().item() <= 1e-6
    assert (masked_short - base).abs().max().item() <= 1e-6


def test_parameter_count_and_keys_of_the_full_config(full_pair):
    hf, ours = full_pair
    assert sum(p.numel() for p in ours.parameters()) == 108_891_648
    assert set(ours.state_dict()) == set(hf.state_dict())  # BertModel without pooler
    assert list(ours.buffers()) == []  # no position_ids buffer


def test_hub_key_map_without_prefix_and_with_modern_names(tiny_pair):
    hf, ours = tiny_pair
    modern = {k: v for k, v in hf.state_dict().items()}  # no "bert.", LayerNorm.weight/bias
    modern["pooler.dense.bias"] = torch.zeros(TINY.width)
    mapped = hf_bert_state_dict_to_ours(modern)
    assert set(mapped) == set(ours.state_dict())
    hub = hf_bert_state_dict_to_ours(_hub_file(hf))
    assert set(hub) == set(ours.state_dict())
    for k, v in hub.items():
        assert torch.equal(v, mapped[k]), k
    with pytest.raises(CheckpointError, match="no BERT weights"):
        hf_bert_state_dict_to_ours({"text_encoder.embeddings.word_embeddings.weight": torch.zeros(2, 2)})


def test_layer_norm_eps_is_inside_the_square_root():
    ln = Fp32LayerNorm(16, eps=1e-12)
    x = (1e-4 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))).double()
    x64 = x - x.mean(-1, keepdim=True)
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-12)
    assert (ln(x.float()).double() - ref).abs().max().item() <= 1e-4  # eps 1e-5 would shrink it by ~0.6


def test_layer_norm_computes_in_float32_and_returns_the_input_dtype(monkeypatch):
    seen = []
    real = F.layer_norm

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "layer_norm", spy)
    ln = Fp32LayerNorm(8, eps=1e-12).half()
    x = torch.full((2, 8), 3.0, dtype=torch.float16)  # zero variance: eps 1e-12 is 0 in fp16
    y = ln(x)
    assert seen == [torch.float32]
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all() and torch.equal(y, torch.zeros_like(y))


def test_runs_under_cpu_autocast(tiny_pair):
    _, ours = tiny_pair
    ids = _ids(TINY, 2, TINY.context_length)
    mask = _padding_mask(2, TINY.context_length)
    with torch.no_grad():
        ref = ours(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(ids, mask)
    assert torch.isfinite(got).all()
    assert (got.float() - ref).abs().max().item() < 0.25


@pytest.mark.parametrize("part", ["embeddings", "attention.self", "attention.output", "output"])
def test_dropout_acts_in_each_part_in_training_only(tiny_pair, part):
    _, ours = tiny_pair
    x, h = torch.randn(2, 10, TINY.width), torch.randn(2, 10, TINY.intermediate)
    layer = ours.encoder.layer[0]
    calls = {
        "embeddings": lambda: ours.embeddings(_ids(TINY, 2, 10)),
        "attention.self": lambda: layer.attention.self(x, None),  # dropout on the attention probabilities
        "attention.output": lambda: layer.attention.output(x, x),
        "output": lambda: layer.output(h, x),
    }
    try:
        ours.train()
        with torch.no_grad():
            a, b = calls[part](), calls[part]()
        assert not torch.equal(a, b)
    finally:
        ours.eval()
    with torch.no_grad():
        assert torch.equal(calls[part](), calls[part]())


@pytest.mark.parametrize(
    "ids, mask, match",
    [
        (torch.zeros(2, 5), None, "2-D int64/int32"),
        (torch.zeros(2, 5, dtype=torch.bool), None, "2-D int64/int32"),
        (torch.zeros(5, dtype=torch.long), None, "2-D int64/int32"),
        (torch.zeros(1, 2, 5, dtype=torch.long), None, "2-D int64/int32"),
        (torch.zeros(1, TINY.max_positions + 1, dtype=torch.long), None, "max_positions"),
        (torch.tensor([[101, TINY.vocab_size]]), None, r"token ids must be in \[0, 30522\)"),
        (torch.tensor([[-1, 5]]), None, "token ids must be in"),
        (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4), "attention_mask shape"),
    ],
)
def test_bad_inputs(tiny_pair, ids, mask, match):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match=match):
        ours(ids, mask)


def test_max_length_and_int32_ids_are_accepted(tiny_pair):
    _, ours = tiny_pair
    ids = _ids(TINY, 1, TINY.max_positions)
    with torch.no_grad():
        assert torch.equal(ours(ids.int()), ours(ids))
