"""PIR's text tokenizer: X-VLM caption cleaning plus BERT-base-uncased WordPiece, ``[CLS]`` first and no ``[SEP]``.

The closed-domain PIR model (spec §3 step 1) cleans each caption with ``pre_caption`` and encodes it with X-VLM's
vendored ``BertTokenizer``, which prepends ``[CLS]`` but appends no ``[SEP]``. A batch is padded with ``[PAD]`` to its
longest row and cut to 47 ids, so a caption keeps at most 46 word pieces.

The vocabulary ``bert_vocab_uncased.txt.gz`` is Google's bert-base-uncased ``vocab.txt`` (Apache-2.0, see NOTICE),
shipped inside this package and checked against its sha256 when first read; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import unicodedata
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

import torch

from priorclip.errors import DataError, PriorCLIPError

VOCAB_PATH = resources.files("priorclip").joinpath("bert_vocab_uncased.txt.gz")
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"  # of the decompressed file
PAD_ID, UNK_ID, CLS_ID = 0, 100, 101
MAX_WORD_CHARS = 100  # longer words become [UNK] without being split, as in BERT

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACE_RUNS = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 30) -> str:
    """PIR's caption cleaning (X-VLM ``pre_caption``), quirks included.

    Lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces; ``<person>`` becomes ``person``;
    runs of two or more whitespace characters become one space (a lone tab or newline stays); trailing newlines,
    then leading and trailing spaces, are stripped; the text is cut to ``max_words`` space-separated words.
    A caption left empty raises :class:`DataError` (the reference raises ``ValueError`` there).
    """
    if not isinstance(text, str):
        raise TypeError(f"captions must be strings, got {type(text).__name__}")
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    out = _DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    out = _SPACE_RUNS.sub(" ", out).rstrip("\n").strip(" ")
    words = out.split(" ")
    if len(words) > max_words:
        out = " ".join(words[:max_words])
    if not out:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise DataError(f"caption {shown!r} is empty after cleaning (pre_caption)")
    return out


@lru_cache(maxsize=1)
def load_vocab() -> tuple[str, ...]:
    """The 30,522 word pieces in id order, read once and checked against the shipped file's sha256."""
    try:
        data = gzip.decompress(VOCAB_PATH.read_bytes())
    except (OSError, EOFError) as err:  # missing file, or not gzip (BadGzipFile is an OSError)
        raise PriorCLIPError(f"cannot read the BERT vocabulary {VOCAB_PATH}: {err}; reinstall priorclip") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise PriorCLIPError(
            f"BERT vocabulary {VOCAB_PATH} is corrupted (sha256 {digest[:16]}..., expected {VOCAB_SHA256[:16]}...); "
            "reinstall priorclip"
        )
    return tuple(data.decode("utf-8").split("\n")[:-1])  # one piece per line; the id is the line number


def _is_punctuation(ch: str) -> bool:
    # BERT counts every non-alphanumeric printable ASCII character ($, +, ^, ` ...) as punctuation, as well as the
    # Unicode P* categories.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    # The CJK Unified Ideographs blocks (not Hangul, Hiragana or Katakana, which are written with spaces).
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


@lru_cache(maxsize=65536)
def _normalise_char(ch: str) -> str:
    # Per character and cached: a caption corpus uses few distinct characters, and unicodedata calls dominate otherwise.
    if ch in " \t\n\r":
        return " "
    cat = unicodedata.category(ch)
    if ch == "\ufffd" or cat.startswith("C"):  # Cc (NUL included), Cf, Co, Cs, Cn
        return ""
    # Other whitespace (BERT: the Zs category) is left to str.split(), which splits on all of Zs, Zl and Zp.
    return f" {ch} " if _is_cjk(ord(ch)) else ch


def _normalise(text: str) -> str:
    """Drop NUL, U+FFFD and control characters; whitespace becomes a space; CJK characters get spaces around them."""
    return "".join(map(_normalise_char, text))


def _split_punctuation(word: str) -> list[str]:
    """Each punctuation character becomes a word of its own; the runs between them stay whole."""
    parts: list[str] = []
    run = ""
    for ch in word:
        if _is_punctuation(ch):
            if run:
                parts.append(run)
                run = ""
            parts.append(ch)
        else:
            run += ch
    if run:
        parts.append(run)
    return parts


def _split_word(word: str) -> list[str]:
    """One whitespace-separated word -> BERT basic tokens: lower-cased, accents stripped, punctuation split off."""
    word = word.lower()
    if not word.isascii():  # accents: decompose (NFD), then drop the combining marks (Mn)
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
    return _split_punctuation(word)


class PIRTokenizer:
    """Captions -> ``[CLS]`` + WordPiece ids, ``[PAD]``-padded to the longest row of the call (spec §3 step 1).

    Special-token strings such as ``[SEP]`` in a caption are ordinary text: ``pre_caption`` lower-cases them anyway,
    and with ``clean=False`` they are split like any other word, so an id row never holds ``[SEP]`` (102).
    """

    def __init__(self, context_length: int = 47, clean: bool = True) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be at least 1 (the [CLS] slot), got {context_length}")
        self.context_length = context_length
        self.clean = clean
        self.pieces = load_vocab()
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)
        self.pad_id, self.unk_id, self.cls_id = PAD_ID, UNK_ID, CLS_ID
        self._cache: dict[str, list[int]] = {}

    def _wordpiece(self, token: str) -> list[int]:
        """Greedy longest-match-first split into vocabulary pieces; one [UNK] for the whole token if any part fails."""
        if len(token) > MAX_WORD_CHARS:
            return [self.unk_id]
        out: list[int] = []
        start = 0
        while start < len(token):
            prefix = "##" if start else ""
            for end in range(len(token), start, -1):
                piece_id = self.ids.get(prefix + token[start:end])
                if piece_id is not None:
                    break
            else:
                return [self.unk_id]
            out.append(piece_id)
            start = end
        return out

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = [i for token in _split_word(word) for i in self._wordpiece(token)]
            if len(self._cache) < 100_000:  # bounded: a stream of unique junk words must not grow it forever
                self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of one caption (cleaned first when ``clean``), without [CLS], not truncated."""
        if not isinstance(text, str):
            raise TypeError(f"captions must be strings, got {type(text).__name__}")
        if self.clean:
            text = pre_caption(text)
        return [i for word in _normalise(text).split() for i in self._word_ids(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an id row, [PAD] and [CLS] dropped and ``##`` continuations joined (lossy: case, accents)."""
        pieces = [self.pieces[int(i)] for i in ids if int(i) not in (self.pad_id, self.cls_id)]
        return " ".join(pieces).replace(" ##", "")

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, L]`` (int64): [CLS] + at most ``context_length - 1`` pieces, [PAD]-padded to the longest row.

        ``L = min(context_length, longest row)``; an empty list gives a ``[0, 1]`` tensor (the [CLS] column alone).
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [[self.cls_id, *self.encode(text)][: self.context_length] for text in texts]
        width = max(map(len, rows), default=1)
        padded = [row + [self.pad_id] * (width - len(row)) for row in rows]
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)  # reshape: [] -> [0, 1]


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] ids cut to the longest row, as this tokenizer pads a batch of just those captions (word pieces are never
    [PAD]=0; at least one column is kept). PIR attends to padding, so the width is part of its input."""
    if not tokens.numel():
        return tokens
    return tokens[:, : max(int((tokens != PAD_ID).sum(1).max()), 1)]


def pir_tokenizer(context_length: int = 47) -> PIRTokenizer:
    """The shared PIR tokenizer for a context length (with caption cleaning, as the reference)."""
    return _shared_tokenizer(context_length)  # one cache key however it is called: pir_tokenizer() is pir_tokenizer(47)


@lru_cache
def _shared_tokenizer(context_length: int) -> PIRTokenizer:
    return PIRTokenizer(context_length)
