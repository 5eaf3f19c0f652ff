"""Calibration thresholds shared by every quantiser (INT8 ONNX graphs, the fused engine's FP8 GEMMs): running
statistics of a tensor and the |x| threshold (amax) each method picks from them. numpy only, no onnx, so the
engines can import it without the export extra."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99
HIST_BINS = 2048


@dataclass
class TensorStats:
    amin: float = float("inf")
    amax: float = float("-inf")
    absmax: float = 0.0
    hist: np.ndarray | None = None


def abs_hist(a: np.ndarray, top: float) -> np.ndarray:
    """Histogram of |a| over [0, top] in HIST_BINS bins (values at ``top`` in the last bin, as np.histogram)."""
    idx = np.abs(a, dtype=np.float32).ravel()
    idx *= np.float32(HIST_BINS / top)
    idx = np.minimum(idx, HIST_BINS - 1, out=idx).astype(np.int32)
    return np.bincount(idx, minlength=HIST_BINS)[:HIST_BINS]


def percentile_amax(hist: np.ndarray, top: float, pct: float = PERCENTILE) -> float:
    cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
    idx = int(np.searchsorted(cdf, pct / 100.0))
    return float(min(idx + 1, len(hist)) * top / len(hist))


def entropy_amax(hist: np.ndarray, top: float, num_quant_bins: int = 128, start: int = 128, stride: int = 1) -> float:
    """TensorRT-style KL threshold: the clip bin i minimising KL(P_i || Q_i), Q_i = P_i squeezed to 128 bins."""
    bins = np.asarray(hist, dtype=np.float64).copy()
    if len(bins) < 2 or bins.sum() == 0:
        return float(top)
    bins[0] = bins[1]  # the zero bin (ReLU outputs, padding) would dominate the distribution
    edges = np.linspace(0.0, top, len(bins) + 1)
    best_i, best_kl = len(bins), np.inf
    suffix = np.concatenate([np.cumsum(bins[::-1])[::-1], [0.0]])  # suffix[i] = sum(bins[i:])
    for i in range(start, len(bins) + 1, stride):
        ref = bins[:i].copy()
        ref[-1] += suffix[i]  # outliers clipped into the last bin
        group = (np.arange(i) * num_quant_bins) // i  # which of the 128 quantised bins each fine bin falls in
        nz = bins[:i] != 0
        sums = np.bincount(group, weights=bins[:i], minlength=num_quant_bins)
        cnts = np.bincount(group, weights=nz.astype(np.float64), minlength=num_quant_bins)
        q = np.where(nz, sums[group] / np.maximum(cnts[group], 1), 0.0)
        p_sum, q_sum = ref.sum(), q.sum()
        if q_sum == 0 or p_sum == 0:
            continue
        p, qn = ref / p_sum, q / q_sum
        mask = p > 0
        if np.any(qn[mask] == 0):
            kl = np.inf
        else:
            kl = float(np.sum(p[mask] * np.log(p[mask] / qn[mask])))
        if kl <= best_kl:  # "<=": the last minimum wins, as TensorRT's calibrator picks it
            best_kl, best_i = kl, i
    return float(edges[best_i])


def choose_amax(s: TensorStats, method: str) -> float:
    if method == "minmax" or s.hist is None:
        amax = s.absmax
    elif method == "percentile":
        amax = percentile_amax(s.hist, s.absmax)
    elif method == "entropy":
        amax = entropy_amax(s.hist, s.absmax)
    else:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    return max(float(amax), 1e-8)
