"""The load test's arithmetic, apart from its processes: hey's per-request CSV, throughput and percentiles, the
service's ``/metrics`` before and after a run, issue 17's two verdicts, the warnings, and re-measuring what other
processes disturbed. Pure functions: :mod:`priorclip.benchmarks.serve_load` runs the load and calls them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from priorclip.errors import DataError

TARGET_SATURATION = 0.80  # service throughput / offline throughput at max batch
TARGET_LIGHT_P99 = 2.0  # p99 at concurrency 1 / (engine batch-1 latency + decode)
KINDS = ("image", "text")
ROUTES = {"image": "/embed/images", "text": "/embed/texts"}
HEY_FIELDS = ("response-time", "DNS+dialup", "DNS", "Request-write", "Response-delay", "Response-read", "status-code",
              "offset")


# ------------------------------------------------------------------------------------------------- hey's output


@dataclass
class HeyRows:
    """hey's per-request CSV: one row per response (transport errors have no row)."""

    seconds: np.ndarray  # response time
    status: np.ndarray  # HTTP status code
    offset: np.ndarray  # when the request started, seconds after hey started

    def __len__(self) -> int:
        return len(self.seconds)


def parse_hey_csv(text: str) -> HeyRows:
    """Parse ``hey -o csv`` output; raises :class:`DataError` naming the first line that does not fit."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != HEY_FIELDS:
        raise DataError(f"not hey's CSV: expected the header {','.join(HEY_FIELDS)}, got "
                        f"{lines[0][:120] if lines else 'nothing'!r}")
    secs, status, offset = [], [], []
    for i, ln in enumerate(lines[1:], 2):
        cells = ln.split(",")
        try:
            if len(cells) != len(HEY_FIELDS):
                raise ValueError
            s, code, off = float(cells[0]), int(cells[6]), float(cells[7])
        except ValueError:
            raise DataError(f"hey's CSV line {i} does not parse: {ln[:120]!r}") from None
        if not (s >= 0 and off >= 0 and 100 <= code <= 599):
            raise DataError(f"hey's CSV line {i} is out of range: {ln[:120]!r}")
        secs.append(s), status.append(code), offset.append(off)
    return HeyRows(np.asarray(secs, np.float64), np.asarray(status, np.int64), np.asarray(offset, np.float64))


def summarize(rows: HeyRows, requested: int, interrupted: bool) -> dict:
    """Throughput and latency of one run: requests/s = 200 responses / (first request's start to last response's
    end); percentiles over the 200 responses (:func:`~priorclip.benchmarks.harness.percentiles`: p90 from 10, p99 from
    100 of them); status codes; transport errors (requests sent without a response: unknown when stopped early, since
    hey drops the requests in flight)."""
    from priorclip.benchmarks.harness import percentiles

    ok = rows.status == 200
    n_ok = int(ok.sum())
    wall = float((rows.offset + rows.seconds).max() - rows.offset.min()) if len(rows) else 0.0
    out: dict[str, Any] = {
        "requested": requested, "responses": len(rows), "ok": n_ok,
        "status_codes": {str(k): int(v) for k, v in sorted(Counter(rows.status.tolist()).items())},
        "transport_errors": None if interrupted else requested - len(rows),
        "stopped_at_time_limit": interrupted, "wall_s": wall,
        "requests_per_s": n_ok / wall if wall > 0 else None,
        "p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None, "cv": None,
    }
    if n_ok:
        ms = rows.seconds[ok] * 1e3
        out.update(percentiles(ms), max_ms=float(ms.max()))
    return out


def plan_requests(rate: float | None, duration_s: float, concurrency: int, lo: int, hi: int) -> int:
    """Requests of a timed run: ``duration_s`` at the warm-up's rate, at least ``lo`` and 4 per connection, at most
    ``hi``; a multiple of the connections (each hey worker sends ``n // c``: any remainder would never be sent)."""
    n = math.ceil(rate * duration_s) if rate and rate > 0 else lo
    n = min(max(n, lo, 4 * concurrency), hi)
    up = math.ceil(n / concurrency) * concurrency
    return up if up <= hi else max(concurrency, n // concurrency * concurrency)


# --------------------------------------------------------------------------------------------------- /metrics

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric_value(m: dict[MetricKey, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_delta(before: dict[MetricKey, float], after: dict[MetricKey, float], kind: str) -> dict:
    """What one run did inside the service: the batches it formed (mean, histogram), each stage's mean time
    (decode, preprocess and queue wait per item, encode per batch), cache hits and misses, refusals by kind, the
    service's own request latency."""
    def d(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    batches, items = d("priorclip_batch_size_count", kind=kind), d("priorclip_batch_size_sum", kind=kind)
    cumulative = sorted(((float(dict(lab)["le"]), after[(n, lab)] - before.get((n, lab), 0.0))
                         for (n, lab) in after if n == "priorclip_batch_size_bucket" and dict(lab).get("kind") == kind))
    hist, below = {}, 0.0
    for le, c in cumulative:  # cumulative bucket counts -> batches per bucket, by upper bound
        if c - below > 0:
            hist["+Inf" if math.isinf(le) else f"<={le:g}"] = int(round(c - below))
        below = c
    stages = {}
    for stage in ("decode", "preprocess", "queue_wait", "encode"):
        n = d("priorclip_stage_seconds_count", stage=stage, kind=kind)
        stages[stage] = {"count": int(n), "mean_ms": 1e3 * d("priorclip_stage_seconds_sum", stage=stage, kind=kind) / n
                         if n else None}
    route = ROUTES[kind]
    n_req = d("priorclip_request_seconds_count", route=route)
    errors = {dict(lab)["kind"]: int(after[(n, lab)] - before.get((n, lab), 0.0)) for (n, lab) in after
              if n == "priorclip_errors_total" and dict(lab).get("route") == route}
    return {
        "batches": int(batches), "items": int(items), "mean_batch": items / batches if batches else None,
        "batch_histogram": hist, "stages": stages,
        "cache_hits": int(d("priorclip_cache_total", kind=kind, result="hit")),
        "cache_misses": int(d("priorclip_cache_total", kind=kind, result="miss")),
        "errors": {k: v for k, v in errors.items() if v},
        "server_mean_ms": 1e3 * d("priorclip_request_seconds_sum", route=route) / n_req if n_req else None,
    }


# ---------------------------------------------------------------------------------------------------- verdicts


def judge(runs: list[dict], offline: dict) -> list[dict]:
    """Issue 17's two targets per kind, from the cold (cache off) runs and the offline numbers.

    ``offline[kind]``: ``b1_ms`` (engine batch-1 p50), ``decode_ms`` (decode + preprocess of the image, or tokenising
    the caption, p50), ``max_batch`` and ``engine_items_per_s`` (engine alone at it), for images also
    ``e2e_items_per_s`` (JPEG bytes to embeddings at it, with the service's decode threads)."""
    out = []
    for kind in KINDS:
        off = offline.get(kind)
        cold = [r for r in runs if r["kind"] == kind and not r["cached"] and r.get("requests_per_s")]
        if not off or not cold:
            continue
        best = max(cold, key=lambda r: r["requests_per_s"])
        figures = [(f"engine alone at batch {off['max_batch']}", off.get("engine_items_per_s"))]
        if off.get("e2e_items_per_s"):
            figures.append((f"engine + decode at batch {off['max_batch']}", off["e2e_items_per_s"]))
        for what, ref in figures:
            if not ref:
                continue
            ratio = best["requests_per_s"] / ref
            out.append({
                "target": "saturation", "kind": kind, "reference": what, "reference_value": ref,
                "measured": best["requests_per_s"], "concurrency": best["concurrency"], "ratio": ratio,
                "limit": TARGET_SATURATION, "verdict": "PASS" if ratio >= TARGET_SATURATION else "FAIL",
                "line": f"{kind}: {best['requests_per_s']:.1f} req/s at concurrency {best['concurrency']} = "
                        f"{100 * ratio:.0f} % of the offline {what} ({ref:.1f}/s); target >= "
                        f"{100 * TARGET_SATURATION:.0f} %"})
        light = [r for r in cold if r["concurrency"] == 1]
        if light:
            r = light[0]
            budget = TARGET_LIGHT_P99 * (off["b1_ms"] + off["decode_ms"])
            p99 = r.get("p99_ms")
            what = "decode + preprocess" if kind == "image" else "tokenising"
            verdict = "n/a" if p99 is None else "PASS" if p99 <= budget else "FAIL"
            line = (f"{kind}: p99 at concurrency 1 = "
                    + (f"{p99:.1f} ms" if p99 is not None else f"not printed ({r['ok']} responses, p99 needs 100)")
                    + f"; limit 2 x (engine batch-1 {off['b1_ms']:.1f} ms + {what} {off['decode_ms']:.2f} ms) = "
                      f"{budget:.1f} ms")
            out.append({"target": "light load", "kind": kind, "reference": f"engine batch-1 + {what}",
                        "reference_value": off["b1_ms"] + off["decode_ms"], "measured": p99, "concurrency": 1,
                        "ratio": None if p99 is None else p99 / (off["b1_ms"] + off["decode_ms"]),
                        "limit": budget, "verdict": verdict, "line": line})
    return out


def warnings_for(doc: dict) -> list[str]:
    """What makes numbers of this run doubtful: the offline points' reliability (priorclip-bench's rules: other
    processes' CPU share, steal, timing spread), timed runs during which other processes took more than that share of
    the machine, runs cut at their time limit, and non-200 responses."""
    from priorclip.benchmarks.harness import OTHERS_CPU_SHARE_MAX

    out = list(((doc.get("offline") or {}).get("reliability") or {}).get("warnings") or [])
    out = [f"offline: {w}" for w in out]
    for r in doc.get("runs") or []:
        where = f"{r['kind']} at concurrency {r['concurrency']}{' (cache on)' if r['cached'] else ''}"
        cpu = r.get("cpu") or {}
        if disturbed(r):
            out.append(f"{where}: everything but hey and the server took {cpu['others_cores']:.2f} of the "
                       f"{cpu['cores']} cores during the timed run (threshold {100 * OTHERS_CPU_SHARE_MAX:.0f} %)")
        if r["stopped_at_time_limit"]:
            out.append(f"{where}: stopped at its time limit after {r['responses']} of {r['requested']} requests")
        bad = {k: v for k, v in r["status_codes"].items() if k != "200"}
        if bad or r["transport_errors"]:
            out.append(f"{where}: non-200 responses {bad or 'none'}, {r['transport_errors'] or 0} without a response")
    return out


def verdict_reports(verdicts: list[dict]) -> dict:
    """The verdicts in the GPU queue's ``reports`` shape (``passed``, ``failures``), so a step's note names a FAIL."""
    return {f"{v['kind']} {v['target']} ({v['reference']})": {
        "passed": None if v["verdict"] == "n/a" else v["verdict"] == "PASS",
        "failures": [] if v["verdict"] != "FAIL" else [v["line"]]} for v in verdicts}


def disturbance(run: dict) -> float:
    """Cores everything but hey and the server took during a timed run (0 where /proc is absent)."""
    return (run.get("cpu") or {}).get("others_cores") or 0.0


def disturbed(run: dict) -> bool:
    """Other processes took more than priorclip-bench's share of the machine (harness.OTHERS_CPU_SHARE_MAX)."""
    from priorclip.benchmarks.harness import OTHERS_CPU_SHARE_MAX

    cpu = run.get("cpu") or {}
    return disturbance(run) > OTHERS_CPU_SHARE_MAX * (cpu.get("cores") or 1)


def least_disturbed(measure: Callable[[], tuple[Any, float | None]], retries: int,
                    limit: float) -> tuple[Any, list[float | None]]:
    """``measure()`` -> (result, other processes' CPU share meanwhile); measured again, up to ``retries`` times,
    while the share is over ``limit``. Returns the least disturbed result and every attempt's share."""
    best, best_share, shares = None, None, []
    for _ in range(1 + retries):
        result, share = measure()
        shares.append(share)
        if best_share is None or (share or 0.0) < best_share:
            best, best_share = result, share or 0.0
        if (share or 0.0) <= limit:
            break
    return best, shares
