"""PIR tokenizer: pre_caption by hand, WordPiece ids against transformers' BertTokenizer, padding, vocab checksum.

The reference is transformers' ``BertTokenizer`` (the Rust ``tokenizers`` backend in transformers 5: an independent
implementation) over the same vocabulary; PIR's ids are ``[CLS]`` + its word pieces, cut to 47, with no ``[SEP]``.
"""

from __future__ import annotations

import gzip
import inspect
import json

import pytest
import torch

from priorclip import wordpiece
from priorclip.errors import DataError, PriorCLIPError
from priorclip.wordpiece import PIRTokenizer, pir_tokenizer, pre_caption

CONTEXT = 47
SEP_ID = 102

# Captions that exercise every rule of pre_caption and of BERT's basic tokenizer and WordPiece.
HARD_CASES = [
    "Café near the naïve façade in Zürich, São Paulo and Ångström",
    "北京 airport 机场有飞机 beside the𠀋river and 丽江",
    "what?!... wow!!! (really) ** ## ~~ ;; -- // ::",
    "2 planes at 10:30 on runway 09/27, 3.5km and 1st 2nd 100m 2020s",
    "a well-known state-of-the-art T-shaped building",
    "the river/lake boundary and/or roads",
    "the farmer's fields aren't green and the boys' bikes",
    "pneumonoultramicroscopicsilicovolcanoconiosis near the stadium",
    "x" * 100 + " and " + "y" * 101,
    "planes ✈️ and 😀 smiles 🛩 and 👨‍👩‍👧 family",
    "tab\tseparated\x00 null\x07bell zero\u200bwidth del\x7fete \ufffd replaced \x0bvt \x85nel",
    "  many   spaces \n\n new lines \t\t tabs  \u00a0\u00a0 nbsp \u2028 line sep ",
    "<PERSON> walks on the <person> beach with a <Person.>",
    "$100 + 50% of roads & 3^2 `quotes` [brackets] {braces} @at |pipe| \\back _under_ =eq",
    "“curly quotes” — em dash – en dash … ellipsis «guillemets» ¿inverted¡ §7 ©",
    "한국어 공항 ひらがな カタカナ مطار שדה हवाई अड्डा",  # Hangul and kana are not CJK-split; Devanagari has Mc
    "ΟΔΟΣ Σ σ ς and İstanbul ǅ ﬁne ＡＢＣ１２３",
    "[CLS] [SEP] [UNK] [MASK] [PAD] [unused0]",
    "a\u0301\u0302 \u0301\u0301 combining \u037e greek \u1fefvaria",
    " ".join(["antidisestablishmentarianism"] * 40),
    # The first character of each CJK block, between letters (U+2B820 is checked by hand below); U+A000 is not CJK.
    "".join(f"a{chr(cp)}" for cp in (0x4E00, 0x3400, 0x20000, 0x2A700, 0x2B740, 0xF900, 0x2F800, 0xA000)) + "a",
    "a plane😀 landed at the airport🛫 near qz😀x",  # a word whose start matches but whose end has no piece
    "a",
    "\t",
]
# After cleaning these are empty: the reference pre_caption raises ValueError, ours DataError.
EMPTY_AFTER_CLEANING = ["", "   ", "\n", "?!.,;:~*#()'\"", "- / -", " \n \t\n "]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_bytes(gzip.decompress(wordpiece.VOCAB_PATH.read_bytes()))
    return path


@pytest.fixture(scope="module")
def hf(vocab_file):
    transformers = pytest.importorskip("transformers")
    params = inspect.signature(transformers.BertTokenizer.__init__).parameters
    # transformers 5 takes the file as `vocab` and silently ignores `vocab_file` (falling back to a 5-token vocab).
    arg = {"vocab": str(vocab_file)} if "vocab" in params else {"vocab_file": str(vocab_file)}
    tok = transformers.BertTokenizer(**arg, do_lower_case=True)
    assert tok.vocab_size == 30522 and tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]"]) == [0, 100, 101]
    return tok


def hf_row(hf, text: str, clean: bool = True) -> list[int]:
    """PIR's unpadded id row by the reference: [CLS] + BERT word pieces of the cleaned caption, cut to 47."""
    return ([101] + hf.convert_tokens_to_ids(hf.tokenize(pre_caption(text) if clean else text)))[:CONTEXT]


def unpadded(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


# --- pre_caption, expected strings written by hand from the reference's rules -------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A Plane, parked (near) the run-way.", "a plane parked near the run way"),
        ("<PERSON> stands", "person stands"),  # lower-cased before the <person> replacement
        ("a <person.> walks", "a person walks"),  # punctuation deleted before the <person> replacement
        ("a <per-son> walks", "a <per son> walks"),  # hyphen replaced before it: no match
        ("two   spaces\n\nand\ttab", "two spaces and\ttab"),  # only runs of 2+ whitespace collapse
        ("ends with newline\n", "ends with newline"),
        ("  leading and trailing  ", "leading and trailing"),
        ("\t", "\t"),  # a lone tab survives: the reference does not raise here
        ("tab at end\t", "tab at end\t"),
        ("a-b/c", "a b c"),
        ("it's the farmers' land!", "its the farmers land"),
        ("a\u00a0\u00a0b c\u00a0d", "a b c\u00a0d"),  # \s is Unicode-aware
        ("Café [x] {y} <z> $5 & 50% @home", "café [x] {y} <z> $5 & 50% @home"),  # the rest is kept
    ],
)
def test_pre_caption_by_hand(text, expected):
    assert pre_caption(text) == expected


def test_pre_caption_truncates_to_max_words():
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)) == " ".join(words[:30])
    assert pre_caption(" ".join(words), max_words=5) == "w0 w1 w2 w3 w4"
    assert pre_caption("a\tb c d", max_words=1) == "a\tb"  # words are split on single spaces only
    assert pre_caption(" ".join(words[:30])) == " ".join(words[:30])


@pytest.mark.parametrize("text", EMPTY_AFTER_CLEANING)
def test_pre_caption_empty_raises(text):
    with pytest.raises(DataError, match="empty after cleaning"):
        pre_caption(text)


def test_pre_caption_bad_arguments():
    with pytest.raises(TypeError, match="strings"):
        pre_caption(None)
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("a b", max_words=0)


# --- WordPiece ids against transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", HARD_CASES)
def test_ids_match_bert_tokenizer(hf, text):
    tok = pir_tokenizer()
    ids = tok(text)
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert unpadded(ids[0]) == hf_row(hf, text)
    assert tok.encode(text) == hf.convert_tokens_to_ids(hf.tokenize(pre_caption(text)))


# Raw text (clean=False) differs from transformers 5's Rust tokenizer in two places, both kept as the reference (X-VLM's
# Python BertTokenizer) does them: str.lower() writes a word-final capital sigma as "ς" where Rust writes "σ", and
# "[CLS]"-style strings are plain text here but special tokens there. Both are checked by hand below, with a third
# difference that holds with cleaning too: Rust's CJK table starts that block at U+2B920, BERT's at U+2B820.
RAW_DIVERGENT = {"ΟΔΟΣ Σ σ ς and İstanbul ǅ ﬁne ＡＢＣ１２３", "[CLS] [SEP] [UNK] [MASK] [PAD] [unused0]"}


@pytest.mark.parametrize("text", [t for t in HARD_CASES if t not in RAW_DIVERGENT] + EMPTY_AFTER_CLEANING)
def test_raw_ids_match_bert_tokenizer(hf, text):
    tok = PIRTokenizer(clean=False)
    assert tok.encode(text) == hf.convert_tokens_to_ids(hf.tokenize(text))
    assert unpadded(tok(text)[0]) == hf_row(hf, text, clean=False)


def test_rust_divergences_by_hand(hf):
    tok = PIRTokenizer(clean=False)
    assert tok.encode("ΟΔΟΣ") == hf.convert_tokens_to_ids(["ο", "##δ", "##ος"])  # final sigma, as str.lower()
    assert tok.encode("[SEP] [UNK]") == hf.convert_tokens_to_ids(["[", "sep", "]", "[", "un", "##k", "]"])
    assert pir_tokenizer().encode("a\U0002b820a") == hf.convert_tokens_to_ids(["a", "[UNK]", "a"])


@pytest.mark.data
def test_every_dataset_caption_matches(hf, aid_rsicd):
    data = json.loads((aid_rsicd / "dataset_rsicd_aid.json").read_text())
    captions = [s["raw"] for image in data["images"] for s in image["sentences"]]
    assert len(captions) == 50_000
    tok = pir_tokenizer()
    kept, cleaned = [], []
    for c in captions:
        try:
            cleaned.append(pre_caption(c))
            kept.append(c)
        except DataError:
            with pytest.raises(DataError):  # the reference raises on these too: they cannot be tokenised
                tok([c])
    assert len(kept) >= 49_990
    unique = sorted(set(cleaned))  # the reference runs once per distinct caption (~15k): tokenisation is pure
    reference = dict(zip(unique, hf(unique, add_special_tokens=False)["input_ids"]))
    assert reference[unique[0]] == hf.convert_tokens_to_ids(hf.tokenize(unique[0]))
    rows = [([101] + reference[c])[:CONTEXT] for c in cleaned]
    width = max(map(len, rows))
    expected = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    ids = tok(kept)
    assert ids.shape == expected.shape
    mismatch = (ids != expected).any(dim=1).nonzero().flatten().tolist()
    assert not mismatch, f"{len(mismatch)} captions differ, first {kept[mismatch[0]]!r}"
    assert not (ids == SEP_ID).any()


# --- batching, truncation, API -------------------------------------------------------------------------------------


def test_padding_is_longest_in_call(hf):
    tok = pir_tokenizer()
    ids = tok(["a", "b c d", "an airport"])
    a, bcd, airport = (hf_row(hf, t) for t in ("a", "b c d", "an airport"))
    assert ids.shape == (3, 4)
    assert ids.tolist() == [a + [0, 0], bcd, airport + [0]]
    assert tok("a").shape == (1, 2)
    assert torch.equal(tok("a plane"), tok(["a plane"]))
    assert torch.equal(tok(("a", "b c d")), ids[:2, :4])


def test_truncation_keeps_cls_and_46_pieces(hf):
    long = " ".join(["antidisestablishmentarianism"] * 20)  # 20 words, 6 pieces each
    assert len(hf.tokenize(pre_caption(long))) > 46
    tok = pir_tokenizer()
    ids = tok([long, "a"])
    assert ids.shape == (2, CONTEXT)
    assert ids[0].tolist() == [101] + hf.convert_tokens_to_ids(hf.tokenize(pre_caption(long)))[:46]
    assert not (ids == SEP_ID).any() and (ids[:, 0] == 101).all()
    short = PIRTokenizer(context_length=5)(["a b", long])
    assert short.shape == (2, 5) and short[1].tolist() == hf_row(hf, long)[:5]
    assert PIRTokenizer(context_length=1)([long, "a"]).tolist() == [[101], [101]]


def test_no_sep_anywhere():
    ids = pir_tokenizer()(HARD_CASES)
    assert not (ids == SEP_ID).any() and (ids[:, 0] == 101).all() and ids.shape[1] <= CONTEXT


def test_edge_batches_and_bad_inputs():
    tok = pir_tokenizer()
    empty = tok([])
    assert empty.shape == (0, 1) and empty.dtype == torch.long
    assert tok("\t").tolist() == [[101]]  # cleans to a lone tab, which has no word pieces
    assert PIRTokenizer(clean=False)(["", "a"]).tolist() == [[101, 0], [101, 1037]]
    with pytest.raises(TypeError, match="captions must be strings, got int"):
        tok(["a", 3])
    with pytest.raises(TypeError, match="got NoneType"):
        tok.encode(None)
    with pytest.raises(TypeError, match="captions must be strings, got bytes"):
        PIRTokenizer(clean=False)([b"a plane"])
    with pytest.raises(DataError, match="empty after cleaning"):
        tok(["a plane", "?!"])
    with pytest.raises(ValueError, match="context_length"):
        PIRTokenizer(context_length=0)


def test_api_and_cache(hf):
    tok = pir_tokenizer()
    assert tok is pir_tokenizer(47) and pir_tokenizer(20).context_length == 20
    assert (tok.vocab_size, tok.pad_id, tok.cls_id, tok.context_length, tok.clean) == (30522, 0, 101, 47, True)
    assert tok.pieces[tok.cls_id] == "[CLS]" and tok.pieces[tok.pad_id] == "[PAD]" and tok.pieces[100] == "[UNK]"
    assert tok.pieces == tuple(hf.convert_ids_to_tokens(list(range(30522))))
    assert wordpiece.load_vocab() is wordpiece.load_vocab()
    assert tok.decode(tok(["an unaffable plane", "a"])[1]) == "a"
    assert tok.decode(tok("an unaffable plane")[0]) == "an unaffable plane"


# --- vocabulary checksum -------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_vocab_cache():
    wordpiece.load_vocab.cache_clear()
    yield
    wordpiece.load_vocab.cache_clear()


def test_corrupted_vocab_is_one_clear_error(monkeypatch, tmp_path, fresh_vocab_cache):
    data = bytearray(gzip.decompress(wordpiece.VOCAB_PATH.read_bytes()))
    data[5000] ^= 0x01  # one flipped bit in one word piece
    bad = tmp_path / "bert_vocab_uncased.txt.gz"
    bad.write_bytes(gzip.compress(bytes(data)))
    monkeypatch.setattr(wordpiece, "VOCAB_PATH", bad)
    with pytest.raises(PriorCLIPError, match="corrupted .*reinstall"):
        PIRTokenizer()
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(PriorCLIPError, match="cannot read"):
        wordpiece.load_vocab()
    monkeypatch.setattr(wordpiece, "VOCAB_PATH", tmp_path / "missing.txt.gz")
    with pytest.raises(PriorCLIPError, match="cannot read"):
        wordpiece.load_vocab()
    data[5000] ^= 0x01  # restored: the same bytes, recompressed differently, load
    good = tmp_path / "good.txt.gz"
    good.write_bytes(gzip.compress(bytes(data), compresslevel=1))
    monkeypatch.setattr(wordpiece, "VOCAB_PATH", good)
    assert len(wordpiece.load_vocab()) == 30522
