"""Our towers against open_clip's own implementations, with identical weights (fp32, max abs diff <= 1e-5).

open_clip 3.3's CLIP(ViT-B-32) shares our key names, so loading our state dict into it strictly is itself the proof
that the visual and text keys match the official layout; its ModifiedResNet (RN50 layout, output 512) does the same
for ``res_visual.*``.
"""

from __future__ import annotations

import pytest
import torch

from priorclip import create_model
from priorclip.tokenizer import tokenize

CAPTIONS = [
    "Many buildings and green trees are around a playground.",
    "a plane",
    "Two bridges cross the river; boats are moored at the pier!",
    "",
    " ".join(["dense residential area with roads"] * 20),  # longer than 77 tokens
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def pair(open_clip, open_clip_vit_b32_cfg):
    """Our priorclip-vit-b32 and open_clip's ViT-B-32 CLIP + RN50-layout ModifiedResNet sharing its weights."""
    torch.manual_seed(0)
    ours = create_model("priorclip-vit-b32")
    with torch.no_grad():  # make the BN statistics and bn3 weights non-trivial so the comparison has teeth
        for name, buf in ours.res_visual.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for name, p in ours.res_visual.named_parameters():
            if ".bn" in name or name.startswith("bn"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    sd = ours.state_dict()
    ref = open_clip.model.CLIP(**open_clip_vit_b32_cfg).eval()
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("res_visual.", "vision_proj_res."))}, strict=True)
    ref_res = open_clip.modified_resnet.ModifiedResNet(layers=[3, 4, 6, 3], output_dim=512, heads=32, image_size=224, width=64)
    ref_res.load_state_dict({k[len("res_visual."):]: v for k, v in sd.items() if k.startswith("res_visual.")}, strict=True)
    return ours, ref, ref_res.eval()


def test_state_dict_is_official_layout(pair):
    ours, ref, ref_res = pair
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    expected.update({f"res_visual.{k}": tuple(v.shape) for k, v in ref_res.state_dict().items()})
    expected["vision_proj_res.weight"] = (768, 512)
    expected["vision_proj_res.bias"] = (768,)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@torch.no_grad()
def test_vit_tower_without_gate_matches_open_clip(pair):
    ours, ref, _ = pair
    pixels = torch.randn(3, 3, 224, 224)
    got = ours.visual(pixels)  # no prior token: plain CLIP ViT, CLS pooling
    want = ref.visual(pixels)
    assert (got - want).abs().max().item() <= ATOL


@torch.no_grad()
def test_modified_resnet_matches_open_clip(pair):
    ours, _, ref_res = pair
    pixels = torch.randn(2, 3, 224, 224)
    got = ours.res_visual(pixels)
    want = ref_res(pixels)
    assert got.shape == (2, 512)
    assert (got - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item())


@torch.no_grad()
def test_text_tower_matches_open_clip(pair, open_clip):
    ours, ref, _ = pair
    tokens = open_clip.tokenizer.SimpleTokenizer()(CAPTIONS)
    got = ours.encode_text(tokens)  # trims to the batch's longest caption; open_clip runs all 77 positions
    want = ref.encode_text(tokens, normalize=True)
    assert (got - want).abs().max().item() <= ATOL
    ours.trim_text = False
    try:
        assert (ours.encode_text(tokens) - want).abs().max().item() <= ATOL
    finally:
        ours.trim_text = True


@torch.no_grad()
def test_clip_config_is_open_clip_vit_b32(open_clip, open_clip_vit_b32_cfg):
    """clip-vit-b32 (prior=None) is open_clip's ViT-B-32 end to end: same keys, same embeddings."""
    torch.manual_seed(1)
    ours = create_model("clip-vit-b32")
    ref = open_clip.model.CLIP(**open_clip_vit_b32_cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    assert (ours.encode_image(pixels) - ref.encode_image(pixels, normalize=True)).abs().max().item() <= ATOL
    tokens = tokenize(CAPTIONS[:2])
    assert (ours.encode_text(tokens) - ref.encode_text(tokens, normalize=True)).abs().max().item() <= ATOL
