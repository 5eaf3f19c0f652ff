"""The service's load-time self-test: embed the export's probes through the full serving path and compare them with
the fp32 reference embeddings made at export time (:mod:`priorclip.export.selftest`).

A wrong execution provider, a stale or corrupted engine, or a broken decoding/preprocessing path ranks subtly wrong
rather than crashing; this check makes it fail at start, with one log line naming the cosine, and the service stays
not-ready. The rule is the parity table's per-item floor (:data:`priorclip.parity.TOLERANCES`) on every probe, as the
export's parity report applies it: no average, so one broken path (one image mode, one caption length) is enough.
Measured on the tiny models (random weights, ONNX Runtime CPU): a correct engine's lowest probe cosine is 1 - 1e-13
(fp32), 1 - 4e-7 (fp16) and 0.9985 (int8, floor 0.99); swapped channels, no normalisation, other weights or PIR
captions padded into one batch give 0.90 or less.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from priorclip.errors import DataError

FAILURE_HINT = "wrong execution provider, stale engine or broken preprocessing — not ready"


@dataclass
class SelfTestReference:
    images: list[bytes]  # encoded probe images (PNG), exactly what the reference embedded
    captions: list[str]
    image_emb: np.ndarray  # [n, E] float32, fp32 torch reference
    text_emb: np.ndarray  # [m, E]
    source: str  # where it came from, for the log line and /readyz


@dataclass
class SelfTestResult:
    passed: bool
    image_min_cosine: float
    text_min_cosine: float
    threshold: float
    line: str  # the one line the service logs
    precision: str = ""
    image_cosines: list[float] = field(default_factory=list)  # per probe, in probe order
    text_cosines: list[float] = field(default_factory=list)


def load_reference(export_dir: str | Path) -> SelfTestReference | None:
    """The self-test reference an export carries; None for an export made before exports carried one.

    A listed file that is missing, unreadable, inconsistent or whose sha256 differs from the manifest's is a
    :class:`DataError` of one line (a tampered or half-copied export must not pass for a checked one).
    """
    from priorclip.checkpoint import file_sha256
    from priorclip.export.engines import read_manifest

    manifest = read_manifest(export_dir)
    entry = manifest.get("selftest")
    if not entry:
        return None
    if not isinstance(entry, dict):
        raise DataError(f"{export_dir}/manifest.json: 'selftest' is a {type(entry).__name__}, not an object; "
                        "re-export")
    path = Path(export_dir) / str(entry.get("file", ""))
    if not path.is_file():
        raise DataError(f"{path}: the self-test reference listed in the manifest is missing; re-export")
    sha = file_sha256(path)
    if sha != entry.get("sha256"):
        raise DataError(f"{path}: sha256 {sha[:16]}... differs from the manifest's {str(entry.get('sha256'))[:16]}... "
                        "(a modified or damaged export); re-export")
    try:
        with np.load(path, allow_pickle=False) as z:
            blob, lengths = z["image_bytes"], z["image_lengths"]
            captions = [str(c) for c in z["captions"]]
            image_emb, text_emb = z["image_emb"].astype(np.float32), z["text_emb"].astype(np.float32)
    except Exception as e:  # zip, npy-header and missing-key errors alike
        raise DataError(f"{path}: unreadable self-test reference ({type(e).__name__}: {e}); re-export") from None
    ends = np.cumsum(lengths)
    dim = manifest.get("model", {}).get("config", {}).get("embed_dim")
    if not lengths.size or not captions or int(ends[-1]) != blob.size or (lengths <= 0).any() \
            or lengths.size != entry.get("n_images") or len(captions) != entry.get("n_captions") \
            or image_emb.ndim != 2 or text_emb.ndim != 2 \
            or image_emb.shape[0] != lengths.size or text_emb.shape[0] != len(captions) \
            or (dim is not None and (image_emb.shape[1] != dim or text_emb.shape[1] != dim)):
        raise DataError(f"{path}: inconsistent self-test reference ({lengths.size} images / {image_emb.shape} "
                        f"embeddings, {len(captions)} captions / {text_emb.shape}); re-export")
    raw = blob.tobytes()
    images = [raw[e - n : e] for n, e in zip(lengths.tolist(), ends.tolist())]
    return SelfTestReference(images, captions, image_emb, text_emb, f"{path} ({entry.get('reference', '?')})")


def reference_from_model(model) -> SelfTestReference:
    """The probes embedded now by the fp32 torch reference of ``model`` (a CPU fp32 model, e.g.
    ``LoadedEngine.model``): for a service built from a model rather than an export."""
    from priorclip.export.selftest import REFERENCE, probe_inputs, reference_embeddings

    images, captions = probe_inputs()
    image_emb, text_emb = reference_embeddings(model, images, captions)
    return SelfTestReference(images, captions, image_emb, text_emb, f"{model.cfg.name} ({REFERENCE}, at start)")


def _row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ref * out).sum(axis=1) / den  # a zero or non-finite row gives NaN, which fails every comparison


def _embed(what: str, fn: Callable, inputs: list, ref: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The service's embeddings of the probes as [n, E] float64, or None and why not."""
    try:
        out = fn(inputs)
        out = np.asarray(out.detach().cpu().float() if hasattr(out, "detach") else out, dtype=np.float64)
    except Exception as e:  # the service's own path raised on a probe: a failed self-test, not a crash
        text = str(e).strip().splitlines()
        return None, f"embedding the probe {what} raised {type(e).__name__}" + (f": {text[0]}" if text else "")
    if out.shape != ref.shape:
        return None, f"the probe {what} came back as {tuple(out.shape)}, the reference is {tuple(ref.shape)}"
    return out, ""


def _probe_name(reference: SelfTestReference, tower: str, i: int) -> str:
    """Which probe, for the log line: a broken decoding path usually fails one image mode first."""
    if tower == "text":
        return f"caption {i + 1} {reference.captions[i][:40]!r}"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(reference.images[i])) as im:
            return f"image {i + 1} ({im.mode} {im.size[0]}x{im.size[1]})"
    except Exception:
        return f"image {i + 1}"


def run_selftest(reference: SelfTestReference, embed_images: Callable[[list[bytes]], np.ndarray],
                 embed_texts: Callable[[list[str]], np.ndarray], precision: str) -> SelfTestResult:
    """Embed the reference's probes with the service's own path (``embed_images``: encoded bytes -> [n, E];
    ``embed_texts``: captions -> [m, E]; each decodes, preprocesses and tokenises as the service does) and judge them.

    Passes when every probe's cosine to its reference embedding is at least ``precision``'s per-item floor
    (:data:`priorclip.parity.TOLERANCES`, the export parity report's). A callable that raises, returns the wrong
    shape, or non-finite values fails it (the cosine is then NaN); nothing here raises for a broken engine.
    """
    from priorclip.parity import TOLERANCES

    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(TOLERANCES)}")
    floor = TOLERANCES[precision].min_cosine
    fails: list[str] = []
    mins: dict[str, float] = {}
    cosines: dict[str, list[float]] = {}
    for tower, fn, inputs, ref in (("image", embed_images, reference.images, reference.image_emb),
                                   ("text", embed_texts, reference.captions, reference.text_emb)):
        out, why = _embed("images" if tower == "image" else "captions", fn, inputs, ref)
        if out is None:
            mins[tower], cosines[tower] = float("nan"), []
            fails.append(why)
            continue
        c = _row_cosines(ref, out)
        c = np.where(np.isfinite(c), c, np.nan)  # a non-finite or zero row: NaN, below every floor
        cosines[tower] = [float(v) for v in c]
        mins[tower] = float(np.min(c)) if c.size else 1.0
        if not mins[tower] >= floor:  # NaN fails too
            worst = _probe_name(reference, tower, int(np.argmin(np.nan_to_num(c, nan=-np.inf))))
            fails.append(f"{tower} cosine min {mins[tower]:.5f} < {floor} (worst: {worst}, "
                         f"{int((~(c >= floor)).sum())}/{c.size} below)")
    if fails:
        line = f"self-test FAILED ({precision}): {'; '.join(fails)}: {FAILURE_HINT} [reference {reference.source}]"
    else:
        line = (f"self-test passed: image cosine min {mins['image']:.5f}, text {mins['text']:.5f} ({precision} needs "
                f">= {floor}; {len(reference.images)} images, {len(reference.captions)} captions)")
    return SelfTestResult(not fails, mins["image"], mins["text"], floor, line, precision, cosines["image"],
                          cosines["text"])


def selftest_dict(result: SelfTestResult) -> dict:
    """The self-test as /readyz reports it (NaN, from a failed embedding, as null)."""
    num = lambda v: None if v != v else round(float(v), 6)  # noqa: E731
    return {"passed": result.passed, "precision": result.precision, "threshold": result.threshold,
            "image_min_cosine": num(result.image_min_cosine), "text_min_cosine": num(result.text_min_cosine),
            "image_cosines": [num(c) for c in result.image_cosines],
            "text_cosines": [num(c) for c in result.text_cosines], "line": result.line}
