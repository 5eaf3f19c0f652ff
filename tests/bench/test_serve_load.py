"""The service load test (benchmarks/serve_load.py): hey's CSV and the percentile and throughput maths against a
hand-computed case, the service's /metrics deltas against what was observed, the two verdicts at their boundaries,
the multipart body, the missing tool as one line, and a --quick run end to end (skipped without hey)."""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from priorclip.benchmarks import serve_load as sl
from priorclip.benchmarks import serve_load_stats as st
from priorclip.errors import DataError, PriorCLIPError

HEADER = ",".join(st.HEY_FIELDS)


def _row(seconds: float, status: int, offset: float) -> str:
    # hey writes every time with %4.4f
    return f"{seconds:4.4f},0.0001,0.0000,0.0000,{seconds:4.4f},0.0000,{status},{offset:4.4f}"


def _hand_csv() -> str:
    """100 OK responses of 1..100 ms, request k starting at (k-1)*10 ms; a 429 and two 503s, the last ending at
    1.25 s, after every OK one (the 100th ends at 0.99 + 0.100 = 1.09 s)."""
    rows = [_row(k / 1000, 200, (k - 1) * 0.01) for k in range(1, 101)]
    rows.insert(30, _row(0.001, 429, 0.3))
    rows.insert(50, _row(0.002, 503, 0.5))
    rows.append(_row(0.05, 503, 1.2))
    return HEADER + "\n" + "\n".join(rows) + "\n"


def test_hey_csv_throughput_and_percentiles_hand_computed():
    rows = st.parse_hey_csv(_hand_csv())
    assert len(rows) == 103
    s = st.summarize(rows, requested=105, interrupted=False)
    assert (s["ok"], s["responses"], s["transport_errors"]) == (100, 103, 2)
    assert s["status_codes"] == {"200": 100, "429": 1, "503": 2}
    assert s["wall_s"] == pytest.approx(1.25)  # first start 0.0, last end 1.2 + 0.05
    assert s["requests_per_s"] == pytest.approx(100 / 1.25)  # only the 200s count
    # linear interpolation over the sorted 200 latencies 1..100 ms: rank 0.5*99 = 49.5 -> 50.5; 0.9*99 = 89.1 ->
    # 90 + 0.1 = 90.1; 0.99*99 = 98.01 -> 99 + 0.01 = 99.01
    assert (s["p50_ms"], s["p90_ms"], s["p99_ms"]) == pytest.approx((50.5, 90.1, 99.01))
    assert s["mean_ms"] == pytest.approx(50.5) and s["max_ms"] == pytest.approx(100.0)
    # stopped at its time limit: hey dropped the requests in flight, so response-less ones cannot be counted
    s = st.summarize(rows, requested=105, interrupted=True)
    assert s["transport_errors"] is None and s["stopped_at_time_limit"] is True
    # fewer than 100 OK responses: p99 is not printed (priorclip-bench's rule), p90 is from 10
    few = st.summarize(st.parse_hey_csv(HEADER + "\n" + "\n".join(_row(k / 1000, 200, 0) for k in range(1, 51))),
                       50, False)
    assert few["p99_ms"] is None and few["p90_ms"] == pytest.approx(45.1)
    # nothing answered 200: no rate, no latency
    bad = st.summarize(st.parse_hey_csv(HEADER + "\n" + _row(0.01, 503, 0.0)), 1, False)
    assert bad["ok"] == 0 and bad["p50_ms"] is None and bad["requests_per_s"] == 0


@pytest.mark.parametrize("text,match", [
    ("", "not hey's CSV"),
    ("latency,status\n0.1,200\n", "not hey's CSV"),
    (HEADER + "\n0.1,0,0,0,0.1,0,200\n", "line 2 does not parse"),
    (HEADER + "\n" + _row(0.1, 200, 0) + "\nabc,0,0,0,0,0,200,0.1\n", "line 3 does not parse"),
    (HEADER + "\n" + _row(0.1, 200, 0).replace(",200,", ",OK,") + "\n", "line 2 does not parse"),
    (HEADER + "\n" + _row(0.1, 200, 0).replace(",200,", ",42,") + "\n", "line 2 is out of range"),
    (HEADER + "\n" + _row(0.1, 200, 0).replace("0.1000,0.0001", "-0.1000,0.0001") + "\n", "line 2 is out of range"),
])
def test_hey_csv_refuses_what_is_not_hey_output(text, match):
    with pytest.raises(DataError, match=match):
        st.parse_hey_csv(text)


def test_plan_requests_bounds():
    assert st.plan_requests(10.0, 5.0, 1, 100, 5000) == 100  # 50 at the warm-up's rate: the floor wins
    assert st.plan_requests(100.0, 5.0, 1, 100, 5000) == 500
    assert st.plan_requests(10.0, 5.0, 64, 100, 5000) == 256  # 4 per connection
    assert st.plan_requests(1e6, 5.0, 4, 100, 5000) == 5000  # the count bound
    assert st.plan_requests(None, 5.0, 4, 100, 5000) == 100  # no rate measured
    assert st.plan_requests(1.0, 1.0, 16, 10, 8) == 16  # never fewer than the connections (hey refuses that)
    # a multiple of the connections: hey's c workers each send n // c, so 100 at c=3 would send 99
    assert st.plan_requests(10.0, 5.0, 3, 100, 5000) == 102
    assert st.plan_requests(10.0, 5.0, 3, 100, 100) == 99  # rounded down where rounding up would pass the bound


def test_metrics_delta_against_what_was_observed():
    """The service's own Metrics, rendered as Prometheus text before and after: the delta is exactly what was
    observed in between, whatever came before."""
    from priorclip.serve.metrics import Metrics

    m = Metrics()
    m.batch_size.labels("image").observe(8)  # before the run: must not count
    m.stage.labels("encode", "image").observe(9.0)
    m.cache.labels("image", "hit").inc(5)
    before = st.parse_metrics(m.render().decode())
    for size in (4, 4, 1):
        m.batch_size.labels("image").observe(size)
    m.batch_size.labels("text").observe(32)  # the other kind: not this run's
    for s in (0.1, 0.2):
        m.stage.labels("encode", "image").observe(s)
    for s in (0.001, 0.002, 0.003):
        m.stage.labels("decode", "image").observe(s)
    m.cache.labels("image", "miss").inc(9)
    m.errors.labels("/embed/images", "queue_full").inc(2)
    m.errors.labels("/embed/texts", "bad_request").inc()  # another route
    for s in (0.5, 1.5):
        m.latency.labels("/embed/images").observe(s)
    d = st.metrics_delta(before, st.parse_metrics(m.render().decode()), "image")
    assert d["batches"] == 3 and d["items"] == 9 and d["mean_batch"] == pytest.approx(3.0)
    assert d["batch_histogram"] == {"<=1": 1, "<=4": 2}
    assert d["stages"]["encode"] == {"count": 2, "mean_ms": pytest.approx(150.0)}
    assert d["stages"]["decode"]["mean_ms"] == pytest.approx(2.0)
    assert d["stages"]["preprocess"] == {"count": 0, "mean_ms": None}
    assert d["stages"]["queue_wait"] == {"count": 0, "mean_ms": None}
    assert (d["cache_hits"], d["cache_misses"]) == (0, 9)
    assert d["errors"] == {"queue_full": 2} and d["server_mean_ms"] == pytest.approx(1000.0)
    assert st.metrics_delta(before, before, "image")["mean_batch"] is None  # nothing ran


OFFLINE = {"image": {"b1_ms": 100.0, "decode_ms": 10.0, "max_batch": 8, "engine_items_per_s": 10.0,
                     "e2e_items_per_s": 8.0},
           "text": {"b1_ms": 20.0, "decode_ms": 0.5, "max_batch": 8, "engine_items_per_s": 100.0,
                    "e2e_items_per_s": None}}


def _run(kind, c, rps, p99=None, cached=False, ok=200):
    return {"kind": kind, "concurrency": c, "cached": cached, "requests_per_s": rps, "p99_ms": p99, "ok": ok}


def test_verdicts_at_their_boundaries():
    runs = [_run("image", 1, 5.0, p99=220.0), _run("image", 16, 8.0), _run("image", 64, 7.0),
            _run("image", 64, 900.0, cached=True),  # the cache's rate is not the engine's: never the saturation point
            _run("text", 1, 30.0, p99=41.01), _run("text", 64, 79.0)]
    v = {(x["kind"], x["target"], x["reference"]): x for x in st.judge(runs, OFFLINE)}
    sat = v[("image", "saturation", "engine alone at batch 8")]
    assert sat["concurrency"] == 16 and sat["ratio"] == pytest.approx(0.8) and sat["verdict"] == "PASS"  # exactly 80 %
    assert v[("image", "saturation", "engine + decode at batch 8")]["ratio"] == pytest.approx(1.0)
    light = v[("image", "light load", "engine batch-1 + decode + preprocess")]
    assert light["limit"] == pytest.approx(220.0) and light["verdict"] == "PASS"  # 2 x (100 + 10), at the limit
    assert v[("text", "saturation", "engine alone at batch 8")]["verdict"] == "FAIL"  # 79 %
    assert v[("text", "light load", "engine batch-1 + tokenising")]["verdict"] == "FAIL"  # 41.01 > 2 x 20.5
    assert len(v) == 5  # text has no engine + decode figure
    reports = st.verdict_reports(st.judge(runs, OFFLINE))
    assert reports["text saturation (engine alone at batch 8)"]["passed"] is False
    assert "79 % of the offline" in reports["text saturation (engine alone at batch 8)"]["failures"][0]
    assert reports["image saturation (engine alone at batch 8)"] == {"passed": True, "failures": []}
    # p99 not printed (under 100 responses): no verdict either way; no concurrency-1 run: no light-load verdict
    few = st.judge([_run("image", 1, 5.0, p99=None, ok=40)], OFFLINE)
    assert [x["verdict"] for x in few if x["target"] == "light load"] == ["n/a"]
    assert "needs 100" in few[-1]["line"]
    assert not [x for x in st.judge([_run("text", 4, 50.0)], OFFLINE) if x["target"] == "light load"]
    assert st.judge([_run("text", 4, 50.0, cached=True)], OFFLINE) == []  # only cached runs: nothing to judge


def test_multipart_body_is_one_image_part():
    data = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    body = sl.multipart_body(data, "tile_1.jpg")
    msg = email.message_from_bytes(f"Content-Type: multipart/form-data; boundary={sl.BOUNDARY}\r\n\r\n".encode()
                                   + body)
    (part,) = msg.get_payload()
    assert part.get_payload(decode=True) == data and part.get_filename() == "tile_1.jpg"
    assert part.get_content_type() == "image/jpeg" and part.get_param("name", header="content-disposition") == "images"


def test_missing_hey_is_one_actionable_line(tmp_path):
    with pytest.raises(PriorCLIPError, match="apt-get install hey"):
        sl.find_hey(str(tmp_path / "no-hey"))
    r = CliRunner().invoke(sl.main, ["--hey", str(tmp_path / "no-hey"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "apt-get install hey" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing was started or written


HEY = shutil.which("hey")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-load")
    r = subprocess.run([sys.executable, "-m", "priorclip.benchmarks.serve_load", "--quick", "--concurrency", "2",
                        "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,) = out.glob("serve-load-*.json")
    return out, json.loads(js.read_text()), r


@pytest.mark.skipif(HEY is None, reason="hey is not installed (apt-get install hey)")
def test_quick_run_end_to_end(quick):
    out, doc, r = quick
    assert doc["schema"] == sl.SCHEMA and doc["status"] == "done" and not doc["errors"]
    assert {p.name for p in out.iterdir()} == {"serve-load-cpu-torch-fp32.json", "serve-load-cpu-torch-fp32.md",
                                                "serve-load-cpu-torch-fp32.png"}
    assert [(x["kind"], x["concurrency"], x["cached"]) for x in doc["runs"]] == [
        ("image", 2, False), ("image", 2, True), ("text", 2, False), ("text", 2, True)]
    for run in doc["runs"]:
        assert run["ok"] == run["requested"] >= 10 and run["status_codes"] == {"200": run["ok"]}
        assert run["transport_errors"] == 0 and run["requests_per_s"] > 0 and run["p50_ms"] > 0
        svc = run["service"]
        if run["cached"]:  # every request answered from the cache: the engine ran nothing
            assert svc["cache_hits"] == run["ok"] and svc["items"] == 0 and svc["mean_batch"] is None
        else:  # cache off: the engine embedded exactly one item per request of the timed run, none of another run
            assert svc["items"] == run["ok"] and svc["cache_hits"] == 0 and svc["mean_batch"] >= 1
            assert svc["stages"]["encode"]["count"] == svc["batches"]
            # per item: an image is decoded then preprocessed; a caption is only tokenised (its preprocess stage)
            assert svc["stages"]["preprocess"]["count"] == run["ok"]
            assert svc["stages"]["decode"]["count"] == (run["ok"] if run["kind"] == "image" else 0)
        assert run["cpu"]["hey_cores"] >= 0 and run["cpu"]["server_cores"] > 0
    off = doc["offline"]
    assert off["engine"] == "torch/fp32" and {t["batch"] for t in off["timings"]} == {1, 4}  # --max-batch of --quick
    assert off["image"]["engine_items_per_s"] > 0 and off["image"]["e2e_items_per_s"] > 0
    assert off["text"]["decode_ms"] == off["tokenize"]["p50_ms"] and off["image"]["decode_ms"] == off["decode"]["p50_ms"]
    assert {(v["kind"], v["target"]) for v in doc["verdicts"]} == {("image", "saturation"), ("text", "saturation")}
    assert doc["servers"]["cache_off"]["selftest"]["passed"] and "--cache-size 0" in doc["servers"]["cache_off"]["command"]
    env = doc["environment"]
    assert env["hey"]["sha256"] and env["git_revision"] and env["versions"]["fastapi"] and env["date_utc"]
    assert env["command"].startswith("python -m priorclip.benchmarks.serve_load --quick")
    md = (out / "serve-load-cpu-torch-fp32.md").read_text()
    assert "| image | 2 | off |" in md and "| text | 2 | on |" in md and "same body" in md
    assert "[PASS]" in r.stdout or "[FAIL]" in r.stdout


def test_warnings_name_disturbed_cut_and_refused_runs():
    def run(kind, c, others, stopped=False, codes=None, lost=0):
        return {"kind": kind, "concurrency": c, "cached": False, "stopped_at_time_limit": stopped, "responses": 90,
                "requested": 100, "status_codes": codes or {"200": 90}, "transport_errors": lost,
                "cpu": {"others_cores": others, "cores": 2}}

    doc = {"offline": {"reliability": {"warnings": ["other processes used 33 % of this machine's CPU"]}},
           "runs": [run("image", 1, 0.19), run("image", 4, 0.21), run("text", 4, 0.0, stopped=True),
                    run("text", 16, 0.0, codes={"200": 80, "429": 10}, lost=3)]}
    w = st.warnings_for(doc)
    assert w[0] == "offline: other processes used 33 % of this machine's CPU"
    assert len(w) == 4  # 0.19 of 2 cores is under the 10 % threshold, 0.21 is over
    assert w[1].startswith("image at concurrency 4: everything but hey and the server took 0.21 of the 2 cores")
    assert w[2] == "text at concurrency 4: stopped at its time limit after 90 of 100 requests"
    assert w[3] == "text at concurrency 16: non-200 responses {'429': 10}, 3 without a response"
    assert st.warnings_for({"runs": []}) == []


def test_least_disturbed_measures_again_and_keeps_the_quietest():
    shares = iter([0.5, 0.3, 0.4, 0.05, 0.0])
    calls = []

    def measure():
        calls.append(1)
        s = next(shares)
        return f"share {s}", s

    assert st.least_disturbed(measure, 2, 0.1) == ("share 0.3", [0.5, 0.3, 0.4])  # still disturbed: the quietest
    assert st.least_disturbed(measure, 2, 0.1) == ("share 0.05", [0.05])  # quiet at once: measured once
    assert len(calls) == 4
    assert st.least_disturbed(lambda: ("x", None), 0, 0.1) == ("x", [None])  # /proc unreadable: taken as it is
    quiet = {"cpu": {"others_cores": 0.2, "cores": 2}}
    assert not st.disturbed(quiet) and st.disturbed({"cpu": {"others_cores": 0.21, "cores": 2}})
    assert not st.disturbed({"cpu": None}) and st.disturbance({"cpu": None}) == 0.0
