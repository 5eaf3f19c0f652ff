"""CLIP byte-level BPE tokenizer (49,408 tokens, context 77), matching open_clip's ``tokenize``.

The merges file ``bpe_simple_vocab_16e6.txt.gz`` ships inside this package (OpenAI CLIP / open_clip, MIT licence,
see NOTICE); nothing is downloaded.

Pipeline: ftfy fix + double HTML unescape, whitespace collapse, lower-case; split by CLIP's regex; bytes mapped to
printable unicode; BPE merges by rank; ``<start_of_text>`` ... ``<end_of_text>``, zero padded. Over-long sequences are
cut to the context length with the last slot forced to ``<end_of_text>``, so EOT pooling always finds a token.
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from importlib import resources
from typing import Iterable

import regex
import torch

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_N_MERGES = 49152 - 256 - 2


@lru_cache
def _byte_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters (GPT-2 / CLIP convention).

    Insertion order matters: the first 512 vocabulary entries are these characters in this order (printable bytes
    first, then the rest mapped above U+0100).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def _clean(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        raw = resources.files("priorclip").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        units = list(_byte_to_unicode().values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT."""
        byte_map = _byte_to_unicode()
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            word = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        inverse = {v: k for k, v in _byte_to_unicode().items()}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0, self.sot_token_id, self.eot_token_id))
        return bytearray(inverse[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids [N, context_length] (int64), zero padded, EOT kept on truncation."""
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"captions must be strings, got {type(text).__name__}")
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@lru_cache
def clip_tokenizer(context_length: int = 77) -> ClipTokenizer:
    """The shared tokenizer for a context length (building one reads the 49k merges: cached)."""
    return ClipTokenizer(context_length)


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Token ids ``[N, context_length]`` (int64), as ``open_clip.tokenize``."""
    return clip_tokenizer(context_length)(texts)
