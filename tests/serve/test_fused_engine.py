"""The fused engine (priorclip.serve.fused) against the eager fp32 reference, on the tiny models on CPU.

Tolerances: fp32 embeddings are unit vectors and the fused engine only reorders floating-point work (folded BN,
channels_last, pruned rows, length buckets), so they must agree to 1e-5 (measured: ~2e-7); each helper is checked
to 1e-5 against the module it replaces, and each test also shows that the obvious mistake (no fold, the wrong row,
no mask) moves the result by far more than that.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from priorclip.encoder import Encoder, TorchEncoder
from priorclip.errors import PriorCLIPError
from priorclip.registry import create_model
from priorclip.serve.engines import BACKENDS, available_backends, create_engine
from priorclip.serve.fused import (AttnPoolWeights, BlockWeights, FoldedConv, FoldedResNet, FusedEncoder,
                                   block_forward, pruned_block)
from priorclip.tokenizer import tokenize
from tests.serve.conftest import randomise_bn

TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tiny):
    return TorchEncoder(tiny, "cpu", torch.float32)


@pytest.fixture(scope="module")
def fused(tiny):
    return FusedEncoder(tiny, "cpu", torch.float32)


@pytest.fixture(scope="module")
def pixels(tiny):
    torch.manual_seed(1)
    s = tiny.cfg.vision.image_size
    return torch.randn(5, 3, s, s)


CAPTIONS = ["farmland", "a red roof near a lake", "many buildings and some green trees are around a playground",
            " ".join(["bridge"] * 90)]  # the last one fills the whole context (truncated, EOT at 76)


@pytest.mark.parametrize("batch", [1, 5])
def test_images_match_the_fp32_reference(fused, ref, pixels, batch):
    x = pixels[:batch]
    emb, order = fused.encode_images_with_order(x)
    want, want_order = ref.encode_images_with_order(x)
    assert emb.dtype == torch.float32 and emb.shape == want.shape
    assert (emb - want).abs().max().item() <= TOL
    assert torch.equal(order, want_order)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(batch))
    assert torch.equal(fused.encode_images(x), emb)


def test_projection_before_the_gate_gives_the_same_images(tiny, ref, pixels):
    """project_in_kernel=False (a GEMM, then the gate on the projected token) is the same maths in another order."""
    enc = FusedEncoder(tiny, "cpu", torch.float32, project_in_kernel=False)
    emb, order = enc.encode_images_with_order(pixels)
    want, want_order = ref.encode_images_with_order(pixels)
    assert (emb - want).abs().max().item() <= TOL and torch.equal(order, want_order)


def test_fused_norms_is_the_same_maths(tiny, fused, pixels):
    """fused_norms=True regroups each residual add with the LayerNorm after it; off CUDA the add_layernorm reference
    runs the same ops in the same order, so the embeddings are bit-identical, images and texts."""
    enc = FusedEncoder(tiny, "cpu", torch.float32, fused_norms=True)
    a, oa = enc.encode_images_with_order(pixels)
    b, ob = fused.encode_images_with_order(pixels)
    assert torch.equal(a, b) and torch.equal(oa, ob)
    tokens = tokenize(CAPTIONS)
    assert torch.equal(enc.encode_texts(tokens), fused.encode_texts(tokens))


def test_texts_match_the_fp32_reference(fused, ref):
    tokens = tokenize(CAPTIONS)
    assert tokens.argmax(dim=1)[-1] == 76
    assert (fused.encode_texts(tokens) - ref.encode_texts(tokens)).abs().max().item() <= TOL
    short = tokens[:3]  # max EOT 12: bucket 16, tokens cut
    assert (fused.encode_texts(short) - ref.encode_texts(short)).abs().max().item() <= TOL
    narrow = tokens[:2, :9].to(torch.int32)  # max EOT 7 fits bucket 8; int32 ids, a width under the context
    assert (fused.encode_texts(narrow) - ref.encode_texts(narrow)).abs().max().item() <= TOL
    padded = tokenize(CAPTIONS[:2])[:, :6]  # EOT 5 < 6 columns < bucket 8: zero-padded up to the bucket
    assert (fused.encode_texts(padded) - ref.encode_texts(padded)).abs().max().item() <= TOL
    for edge in ("one two three four five six seven", " ".join(["road"] * 15)):  # EOT 8 / 16: the next bucket
        edge_tokens = tokenize([edge, "farmland"])
        assert int(edge_tokens.argmax(dim=1)[0]) in fused.text_buckets
        assert (fused.encode_texts(edge_tokens) - ref.encode_texts(edge_tokens)).abs().max().item() <= TOL


def test_model_without_prior_pools_cls():
    torch.manual_seed(2)
    model = create_model("clip-tiny")
    enc, ref = FusedEncoder(model, "cpu", torch.float32), TorchEncoder(model)
    x = torch.randn(3, 3, model.image_size, model.image_size)
    emb, order = enc.encode_images_with_order(x)
    assert order is None and enc.prior is None
    assert (emb - ref.encode_images(x)).abs().max().item() <= TOL
    tokens = tokenize(CAPTIONS[:3])
    assert (enc.encode_texts(tokens) - ref.encode_texts(tokens)).abs().max().item() <= TOL


def test_pruned_vit_block_is_row_0_of_the_full_block(tiny):
    torch.manual_seed(3)
    block = tiny.visual.transformer.resblocks[-1]
    p = BlockWeights.of(block, torch.device("cpu"), torch.float32)
    x = torch.randn(4, 18, tiny.cfg.vision.width)
    with torch.no_grad():
        full = block(x)
    assert (block_forward(x, p) - full).abs().max().item() <= TOL
    row0 = pruned_block(x, p)
    assert row0.shape == (4, x.shape[2])
    assert (row0 - full[:, 0]).abs().max().item() <= TOL
    assert (full[:, 1] - full[:, 0]).abs().max().item() > 100 * TOL  # the wrong row would be caught
    no_kv = block(x[:, :1])[:, 0].detach()  # keys/values from token 0 alone would be caught too
    assert (no_kv - full[:, 0]).abs().max().item() > 100 * TOL


def test_pruned_text_block_is_the_eot_row_of_the_causal_block(tiny):
    torch.manual_seed(4)
    block = tiny.transformer.resblocks[-1]
    p = BlockWeights.of(block, torch.device("cpu"), torch.float32)
    x = torch.randn(4, 16, tiny.cfg.text.width)  # rows after each EOT stand for padding
    eot = torch.tensor([0, 5, 15, 9])
    batch = torch.arange(4)
    with torch.no_grad():
        full = block(x, causal=True)
        unmasked = block(x, causal=False)
    assert (block_forward(x, p, causal=True) - full).abs().max().item() <= TOL
    rows = pruned_block(x, p, eot)
    assert (rows - full[batch, eot]).abs().max().item() <= TOL
    # rows after the EOT must be masked: without the mask the EOT rows (but the last) would change
    assert (unmasked[batch, eot] - full[batch, eot])[[0, 1, 3]].abs().amax(dim=1).min().item() > 100 * TOL


def test_bn_folding_matches_eval_conv_then_bn(tiny):
    net = tiny.res_visual
    torch.manual_seed(5)
    cpu = torch.device("cpu")
    blk = net.layer2[0]
    pairs = [(net.conv1, net.bn1, torch.randn(2, 3, 16, 16)),  # stride 2, padding 1
             (blk.conv2, blk.bn2, torch.randn(2, blk.conv2.in_channels, 8, 8)),  # 3x3 padding 1
             (blk.downsample[1], blk.downsample[2], torch.randn(2, blk.downsample[1].in_channels, 4, 4))]
    with torch.no_grad():
        for conv, bn, x in pairs:
            assert not bn.training
            want = bn(conv(x))
            got = FoldedConv.fold(conv, bn, cpu, torch.float32)(x.contiguous(memory_format=torch.channels_last))
            assert (got - want).abs().max().item() <= TOL * want.abs().max().item()
            assert (conv(x) - want).abs().max().item() > 0.05  # the BN statistics are not a no-op
        x = torch.randn(3, 3, tiny.image_size, tiny.image_size)
        want = net(x)
        got = FoldedResNet(net, cpu, torch.float32)(x)
        assert (got - want).abs().max().item() <= TOL * want.abs().max().item()


def _full_attention_pool(pool, x: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d: every query computed, row 0 kept (the reference's algorithm)."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + pool.positional_embedding
    hd = c // pool.num_heads
    q, k, v = (lin(t).view(b, -1, pool.num_heads, hd).transpose(1, 2)
               for lin in (pool.q_proj, pool.k_proj, pool.v_proj))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)  # [B, HW+1, C]
    return pool.c_proj(out)  # [B, HW+1, E]


def test_attention_pool_query_0_matches_the_full_pool(tiny):
    pool = tiny.res_visual.attnpool
    torch.manual_seed(6)
    side = tiny.image_size // 32
    x = torch.randn(3, pool.k_proj.in_features, side, side)
    with torch.no_grad():
        full = _full_attention_pool(pool, x)
    got = AttnPoolWeights.of(pool, torch.device("cpu"), torch.float32)(x.contiguous(memory_format=torch.channels_last))
    assert (got - full[:, 0]).abs().max().item() <= TOL
    assert (full[:, 1] - full[:, 0]).abs().max().item() > 100 * TOL


def test_bf16_engine_is_close_to_the_fp32_reference(tiny, ref, pixels):
    enc = FusedEncoder(tiny, "cpu", torch.bfloat16)
    assert enc.conv1.dtype == torch.bfloat16 and enc.prior.stem[0].weight.dtype == torch.bfloat16
    img = enc.encode_images(pixels)
    tokens = tokenize(CAPTIONS)
    txt = enc.encode_texts(tokens)
    assert img.dtype == txt.dtype == torch.float32
    assert F.cosine_similarity(img, ref.encode_images(pixels)).min().item() >= 0.99
    assert F.cosine_similarity(txt, ref.encode_texts(tokens)).min().item() >= 0.99


def test_the_callers_model_is_not_changed():
    torch.manual_seed(8)
    model = create_model("priorclip-tiny")
    randomise_bn(model)
    before = copy.deepcopy(model.state_dict())
    FusedEncoder(model, "cpu", torch.bfloat16)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_create_engine_registers_the_fused_backend(tiny, ref, pixels):
    assert "fused" in BACKENDS and available_backends("cpu")["fused"] is None
    eng = create_engine("fused", tiny, "fp32", "cpu", batch_buckets=(2, 4))
    assert isinstance(eng, Encoder) and isinstance(eng.inner, FusedEncoder)
    meta = eng.metadata()
    assert meta["backend"] == "fused" and meta["name"] == "fused/fp32" and meta["precision"] == "fp32"
    assert meta["cuda_graphs"] is False and meta["kernels"] == "reference" and not meta["fixed_text_length"]
    emb, order = eng.encode_images_with_order(pixels)  # 5 rows = 4 + 1 padded to 2
    want, want_order = ref.encode_images_with_order(pixels)
    assert (emb - want).abs().max().item() <= TOL and torch.equal(order, want_order)
    with pytest.raises(PriorCLIPError, match="does not run fp16 on cpu"):
        create_engine("fused", tiny, "fp16", "cpu")
    assert create_engine("fused", tiny, "bf16", "cpu").name == "fused/bf16"


@pytest.mark.parametrize("bad", [
    ("images", torch.randn(2, 3, 32, 32)),
    ("images", torch.randn(3, 64, 64)),
    ("images", torch.randn(2, 1, 64, 64)),
    ("texts", torch.ones(2, 78, dtype=torch.long)),
    ("texts", torch.ones(2, 10)),
    ("texts", torch.ones(10, dtype=torch.long)),
    ("texts", torch.ones(2, 0, dtype=torch.long)),
])
def test_bad_inputs_are_one_line_value_errors(fused, bad):
    kind, x = bad
    fn = fused.encode_images if kind == "images" else fused.encode_texts
    with pytest.raises(ValueError) as err:
        fn(x)
    assert "\n" not in str(err.value) and "expects" in str(err.value)


def test_empty_batches(fused):
    assert fused.encode_images(torch.randn(0, 3, 64, 64)).shape == (0, 32)
    assert fused.encode_texts(torch.ones(0, 77, dtype=torch.long)).shape == (0, 32)


def test_cuda_graph_bookkeeping_with_a_stand_in_for_torch_cuda(tiny, ref, pixels, fake_cuda_graphs):
    """No GPU here: torch.cuda's graph API is replaced by stand-ins that record calls, so the capture/replay path runs
    (one warm-up + capture per key, inputs copied into the static buffers, outputs returned as clones)."""
    log = fake_cuda_graphs
    enc = FusedEncoder(tiny, "cpu", torch.float32)
    enc._graphs.enabled, enc._graphs._pool = True, "pool"
    calls = []
    forward = enc._image_forward
    enc._image_forward = lambda x: calls.append(x.shape[0]) or forward(x)

    emb, order = enc.encode_images_with_order(pixels[:2])
    assert (log["captures"], log["replays"]) == (1, 1) and log["pools"] == ["pool"] and calls == [2] * 4  # 3 warm-ups on the side stream + capture
    want, want_order = ref.encode_images_with_order(pixels[:2])
    assert (emb - want).abs().max().item() <= TOL and torch.equal(order, want_order)
    _, static_in, static_out = enc._graphs._graphs[("image", 2)]
    assert emb.data_ptr() != static_out[0].data_ptr() and order.data_ptr() != static_out[1].data_ptr()
    enc.encode_images(pixels[2:4])  # same key: replayed, the new pixels copied into the static buffer
    assert (log["captures"], log["replays"]) == (1, 2) and len(calls) == 4
    assert torch.equal(static_in[0], pixels[2:4])
    enc.encode_texts(tokenize(CAPTIONS[:2]))
    enc.encode_texts(tokenize(CAPTIONS[2:]))  # another length bucket: another graph
    assert log["captures"] == 3 and set(enc._graphs._graphs) == {("image", 2), ("text", 2, 8), ("text", 2, 77)}
