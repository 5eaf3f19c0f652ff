"""The load test's human-readable report: Markdown tables and a PNG (throughput and p99 against concurrency).

The JSON written by :mod:`priorclip.benchmarks.serve_load` is the record; this module only renders it, and renders a
partial one too (the report is rewritten after every step of a run).
"""

from __future__ import annotations

from pathlib import Path

COLORS = {"image": "tab:blue", "text": "tab:orange"}


def _f(v, digits: int = 1, suffix: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}{suffix}"
    return f"{v:.{digits}f}{suffix}"


def _table(head: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"] + ["| " + " | ".join(r) + " |"
                                                                                for r in rows]


def verdict_rows(doc: dict) -> list[list[str]]:
    rows = []
    for v in doc.get("verdicts") or []:
        if v["target"] == "saturation":
            measured = f"{_f(v['measured'])} req/s (c={v['concurrency']})"
            ref = f"{v['reference']}: {_f(v['reference_value'])}/s"
            ratio = f"{100 * v['ratio']:.0f} % (≥ {100 * v['limit']:.0f} %)"
        else:
            measured = f"p99 {_f(v['measured'])} ms (c=1)"
            ref = f"{v['reference']}: {_f(v['reference_value'], 2)} ms → limit {_f(v['limit'])} ms"
            ratio = "—" if v["ratio"] is None else f"{v['ratio']:.2f}x (≤ 2x)"
        rows.append([v["target"], v["kind"], measured, ref, ratio, f"**{v['verdict']}**"])
    return rows


def _decode_ms(stages: dict) -> float | None:
    """The report's decode column: decode + preprocess per item (tokenising for captions); results written before
    the service timed them apart carry only "decode", which then held both."""
    parts = [stages.get(k, {}).get("mean_ms") for k in ("decode", "preprocess")]
    return None if all(p is None for p in parts) else sum(p for p in parts if p is not None)


def run_rows(doc: dict) -> list[list[str]]:
    rows = []
    for r in doc.get("runs") or []:
        s, cpu = r["service"], r.get("cpu") or {}
        st = s["stages"]
        codes = ", ".join(f"{k}: {v}" for k, v in r["status_codes"].items())
        if r["transport_errors"]:
            codes += f", no response: {r['transport_errors']}"
        if r["stopped_at_time_limit"]:
            codes += " (stopped at the time limit)"
        cores = " / ".join(_f(cpu.get(k), 2) for k in ("hey_cores", "server_cores", "others_cores")) if cpu else "—"
        rows.append([r["kind"], str(r["concurrency"]), "on" if r["cached"] else "off", f"{r['ok']}/{r['requested']}",
                     _f(r["requests_per_s"]), _f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p99_ms"]), _f(r["max_ms"]),
                     codes, _f(s["mean_batch"], 2), _f(_decode_ms(st), 2), _f(st["queue_wait"]["mean_ms"]),
                     _f(st["encode"]["mean_ms"]), _f(s["server_mean_ms"]),
                     f"{s['cache_hits']}/{s['cache_hits'] + s['cache_misses']}", cores])
    return rows


def offline_lines(doc: dict) -> list[str]:
    off = doc.get("offline")
    if not off:
        return ["(not measured yet)"]
    rows = [[t["tower"], str(t["batch"]), str(t["tokens"] or "—"), str(t["iters"]), _f(t["p50_ms"], 2),
             _f(t["p90_ms"], 2), _f(t["items_per_s"])] for t in off["timings"]]
    lines = [f"`{off['engine']}`, built as the service builds it, timed by priorclip-bench's harness on the load's "
             "own image and caption (the caption repeated to fill a batch, as the service sees it):", ""]
    lines += _table(["tower", "batch", "tokens", "calls", "p50 ms", "p90 ms", "items/s"], rows)
    dec, tok, e2e = off["decode"], off["tokenize"], off.get("e2e")
    lines += ["", f"- JPEG decode + preprocess of the load's image, one thread: p50 {_f(dec['p50_ms'], 2)} ms, "
                  f"p90 {_f(dec['p90_ms'], 2)} ms; tokenising its caption: p50 {_f(tok['p50_ms'], 3)} ms"]
    if e2e:
        lines.append(f"- JPEG bytes → embeddings at batch {e2e['batch']} with {e2e['workers']} decode threads "
                     f"(priorclip-bench's end-to-end rate, {e2e['n_images']} images): {_f(e2e['images_per_s'])} "
                     "images/s")
    load = off.get("load") or {}
    if load.get("others_cpu_share") is not None:
        lines.append(f"- other processes used {100 * load['others_cpu_share']:.0f} % of the machine's CPU while the "
                     "offline points were timed")
    return lines


def render_markdown(doc: dict, plot_name: str | None = None) -> str:
    env, cfg = doc["environment"], doc["config"]
    off = doc.get("offline") or {}
    title = f"# priorclip-serve under load: {cfg.get('model', '?')} `{off.get('engine', '?')}` on {env['device_name']}"
    lines = [title, ""]
    if doc["status"] != "done":
        lines += [f"**Status: {doc['status']}** — the tables hold what had run when this was written.", ""]
    lines += ["Issue 17's targets: at saturation the service delivers ≥ 80 % of the offline engine throughput; at light "
              "load (concurrency 1) its p99 stays within 2× the engine's batch-1 latency plus decode.", ""]
    vrows = verdict_rows(doc)
    lines += _table(["target", "kind", "service", "offline reference", "ratio", "verdict"], vrows, right_from=6) \
        if vrows else ["(no verdict yet)"]
    if doc.get("warnings"):
        lines += ["", "**Warnings** (numbers that may not be the service's or the engine's own):", ""]
        lines += [f"- {w}" for w in doc["warnings"]]
    if plot_name:
        lines += ["", f"![throughput and p99 against concurrency]({plot_name})"]
    lines += ["", "## Load (hey; one image or one caption per request)", ""]
    head = ["kind", "conc.", "cache", "ok/sent", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "status codes",
            "mean batch", "decode ms", "queue wait ms", "encode ms/batch", "server ms", "cache hits",
            "CPU cores hey / server / rest"]
    rows = run_rows(doc)
    lines += _table(head, rows, right_from=3) if rows else ["(no run yet)"]
    lines += ["", "req/s: 200 responses over the first request's start to the last response's end; percentiles over "
              "the 200 responses (hey's CSV; p90 from 10 of them, p99 from 100). mean batch, decode (per item: JPEG "
              "decode + preprocess, or tokenising), queue wait (per item) and encode (per engine call) from the "
              "service's /metrics before and after the run; server ms: the service's own mean request latency. CPU "
              "cores: CPU seconds / wall seconds of the timed run, from /proc (rest: every other process, this "
              "orchestrator and the idle second server)."]
    lines += ["", "## Offline (the same engine, no HTTP)", ""] + offline_lines(doc)
    inp = doc.get("inputs")
    if inp:
        im, cap = inp["image"], inp["caption"]
        lines += ["", "## Inputs", "",
                  f"- drawn from {inp['dataset']} ({inp['chosen_by']}): {inp['draw']}",
                  f"- image: `{Path(im['path']).name}` ({im['class']}, {im['width']}×{im['height']}, {im['bytes']:,} "
                  f"bytes: the median file size of the draw, {im['draw_bytes_min']:,}–{im['draw_bytes_max']:,})",
                  f"- caption: \"{cap['text']}\" ({cap['tokens']} tokens: the median of the draw, "
                  f"{cap['draw_tokens_min']}–{cap['draw_tokens_max']})",
                  "- hey sends the same body with every request, so the embedding cache is off (`--cache-size 0`) in "
                  "every run but the cached ones, and the engine embeds each request; the cached runs (a second "
                  "server, cache on) show what the cache saves when inputs repeat."]
    lines += ["", "## Run", ""]
    v = env["versions"]
    hey = env.get("hey") or {}
    lines += [f"- date (UTC): {env['date_utc']}; git revision: {env['git_revision']}",
              f"- command: `{env['command']}`",
              f"- device: {env['device']} — {env['device_name']}; CPU: {env['cpu']} ({env['cpu_count']} cores)",
              f"- versions: python {env['python']}, torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
              f"fastapi {v.get('fastapi')}, uvicorn {v.get('uvicorn')}, starlette {v.get('starlette')}, "
              f"pydantic {v.get('pydantic')}, python-multipart {v.get('python-multipart')}",
              f"- load tool: {hey.get('version') or 'hey (version unknown)'}, sha256 {str(hey.get('sha256'))[:16]}…",
              f"- service: max batch {cfg['max_batch']}, max wait {cfg['max_wait_ms']} ms, {cfg['decode_workers']} "
              f"decode threads, request timeout {cfg['request_timeout_s']} s; timed runs aim at {cfg['duration_s']} s "
              f"at the warm-up's rate ({cfg['min_requests']}–{cfg['max_requests']} requests, at most "
              f"{cfg['run_timeout_s']} s each), after an untimed warm-up at the same concurrency"]
    for name, s in (doc.get("servers") or {}).items():
        st = (s.get("selftest") or {}).get("line")
        lines.append(f"- server ({name.replace('_', ' ')}): `{s['command']}`; ready after {s['startup_s']} s"
                     + (f"; {st}" if st else ""))
    if doc.get("note"):
        lines.append(f"- note: {doc['note']}")
    notes = []
    if env["device"] == "cpu":
        notes.append(f"On this {env['cpu_count']}-core CPU, hey, the server's event loop and decode threads and the "
                     "engine's threads all share the same cores: the CPU columns say how much each took, and the "
                     "service's rates are for that shared machine, not the engine alone.")
    notes.append("A response-less request (hey's transport error: timeout, refused connection) has no CSV row: its "
                 "count is the requests sent minus the rows, unknown for a run stopped at its time limit (hey drops "
                 "the requests in flight; the next run starts after the service has finished them).")
    retried = [f"{r['kind']} c={r['concurrency']}{' cached' if r['cached'] else ''}"
               for r in doc.get("runs") or [] if len(r.get("attempts_others_cores") or []) > 1]
    retried += [f"offline {k} ({len(a)} attempts)" for k, a in (off.get("attempts_others_cpu_share") or {}).items()
                if len(a) > 1]
    if retried:
        notes.append("Measured again because other processes took over 10 % of the machine meanwhile (the least "
                     "disturbed attempt is shown; every attempt's share is in the JSON): " + ", ".join(retried) + ".")
    for k, e in (doc.get("errors") or {}).items():
        notes.append(f"**error** ({k}): {e}")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_plot(doc: dict, path: Path) -> Path | None:
    """Requests/s and p99 against concurrency per kind, the offline throughputs as horizontal lines and the light-load
    p99 limit at concurrency 1. None when matplotlib is absent or nothing has run yet."""
    runs = doc.get("runs") or []
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    off = doc.get("offline") or {}
    levels = sorted({r["concurrency"] for r in runs})
    for kind in ("image", "text"):
        cold = sorted((r for r in runs if r["kind"] == kind and not r["cached"]), key=lambda r: r["concurrency"])
        hot = [r for r in runs if r["kind"] == kind and r["cached"]]
        col = COLORS[kind]
        if cold:
            ax_t.plot([r["concurrency"] for r in cold], [r["requests_per_s"] or 0 for r in cold], "o-", color=col,
                      label=f"{kind}: service, cache off")
            pts = [(r["concurrency"], r["p99_ms"]) for r in cold if r["p99_ms"] is not None]
            if pts:
                ax_p.plot(*zip(*pts), "o-", color=col, label=f"{kind}: p99, cache off")
        for r in hot:
            ax_t.plot([r["concurrency"]], [r["requests_per_s"] or 0], "D", mfc="none", color=col,
                      label=f"{kind}: cache on")
            if r["p99_ms"] is not None:
                ax_p.plot([r["concurrency"]], [r["p99_ms"]], "D", mfc="none", color=col, label=f"{kind}: cache on")
        o = off.get(kind)
        if o:
            ax_t.axhline(o["engine_items_per_s"], color=col, ls="--", lw=1,
                         label=f"{kind}: engine alone, batch {o['max_batch']}")
            if o.get("e2e_items_per_s"):
                ax_t.axhline(o["e2e_items_per_s"], color=col, ls=":", lw=1, label=f"{kind}: engine + decode")
            limit = 2 * (o["b1_ms"] + o["decode_ms"])
            ax_p.plot([1], [limit], "_", ms=18, mew=2, color=col, label=f"{kind}: light-load limit")
    for ax, ylabel in ((ax_t, "requests/s (one item each)"), (ax_p, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency (hey -c)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = doc["environment"]
    fig.suptitle(f"priorclip-serve {off.get('engine', '')} on {env['device_name']} ({env['date_utc'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    from priorclip.cliutils import atomic_write

    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
