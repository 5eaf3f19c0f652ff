"""Our CLIP BPE tokenizer against open_clip's SimpleTokenizer (token ids must be identical)."""

from __future__ import annotations

import pytest
import torch

from priorclip.tokenizer import ClipTokenizer, clip_tokenizer, tokenize

CAPTIONS = [
    "Many buildings and green trees are around a playground.",
    "Two bridges cross the river; boats are moored at the pier!",
    "  lots   of\twhite\nspace  ",
    "UPPER case, MiXeD case and numbers 12345 67.8%",
    "It's a plane's runway -- isn't it? (yes) [no] {maybe} #tag @user",
    "Café, naïve façade; São Paulo; Zürich; Ελληνικά; 北京机场; 東京タワー",
    "emoji 🛰️🌊🏙️ and symbols ©®™ ± × ÷ → ∞",
    "html &amp; entities &lt;b&gt; &#39;quoted&#39; &amp;amp;",
    "mojibake: cafÃ© and â€œsmart quotesâ€\x9d",
    "",
    "a",
    "!!!???...",
    "storage tanks" + " and storage tanks" * 40,  # far over 77 tokens
    "centre of the baseball field 3 ball diamonds; parking-lot/road/rail-way",
]


def test_matches_open_clip_ids(open_clip):
    ref = open_clip.tokenizer.SimpleTokenizer()
    ours = tokenize(CAPTIONS)
    want = ref(CAPTIONS)
    assert ours.dtype == torch.long and ours.shape == (len(CAPTIONS), 77)
    assert torch.equal(ours, want)
    for text in CAPTIONS:
        assert clip_tokenizer().encode(text) == ref.encode(text)


def test_special_tokens_and_truncation():
    tok = ClipTokenizer()
    assert tok.vocab_size == 49408 and tok.sot_token_id == 49406 and tok.eot_token_id == 49407
    ids = tok(["word " * 200])[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 0).all()  # cut to 77 with EOT forced in the last slot
    short = tok(["a plane"])[0]
    assert short[:4].tolist() == [49406, tok.encoder["a</w>"], tok.encoder["plane</w>"], 49407]
    assert (short[4:] == 0).all()
    assert tok([""])[0][:3].tolist() == [49406, 49407, 0]


def test_decode_round_trip():
    tok = clip_tokenizer()
    assert tok.decode(tok("Two boats, near a pier!")[0].tolist()) == "two boats , near a pier !"


def test_rejects_non_strings():
    with pytest.raises(TypeError):
        tokenize(["ok", None])
