"""Timing harness pieces: timing, percentiles, FLOP counts, token batches, the end-to-end rate."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from priorclip.benchmarks import harness
from priorclip.profile import profile_config
from priorclip.registry import create_model, get_config
from priorclip.serve.engines import create_engine
from priorclip.transforms import EvalTransform


def test_time_calls_rotates_the_pool_after_warmup():
    seen = []
    pool = [torch.tensor(i) for i in range(3)]
    ms = harness.time_calls(lambda x: seen.append(int(x)), pool, warmup=2, iters=5, device=torch.device("cpu"))
    assert len(ms) == 5 and all(m >= 0 for m in ms)
    assert seen == [0, 1, 0, 1, 2, 0, 1]  # 2 warm-up calls, then 5 timed calls rotating over the pool


def test_percentiles_are_ordered():
    p = harness.percentiles([float(i) for i in range(1, 101)])
    assert p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] and p["mean_ms"] == pytest.approx(50.5)


@pytest.mark.parametrize("n, has_p90, has_p99", [(5, False, False), (9, False, False), (10, True, False),
                                                 (99, True, False), (100, True, True)])
def test_percentiles_need_enough_samples(n, has_p90, has_p99):
    p = harness.percentiles([1.0 + i for i in range(n)])
    assert (p["p90_ms"] is not None) == has_p90 and (p["p99_ms"] is not None) == has_p99


def test_suppressed_percentiles_print_as_a_dash():
    from priorclip.benchmarks.report import latency_rows

    row = {"backend": "torch", "precision": "fp32", "tower": "image", "batch": 1, "tokens": None, "iters": 9,
           **harness.percentiles([1.0] * 9), "others_cpu_share": None, "unsteady": False}
    cells = latency_rows({"timings": [row], "engines": []})[1][0]
    assert cells[4:8] == ["9", "1.00", "—", "—"]  # calls, p50, p90, p99


def test_latency_calls_are_synchronised_and_throughput_is_measured(monkeypatch):
    """The GPU path with a recording torch.cuda.synchronize (no CUDA touched): a sync after the warm-up and after
    every latency call, inside its timed span; the pipelined pass syncs only before and after its back-to-back calls.
    """
    events = []

    def fake_sync(device=None):
        events.append("sync")
        time.sleep(0.003)  # the device's pending work: a latency call must wait for it

    monkeypatch.setattr(torch.cuda, "synchronize", fake_sync)
    pool = [torch.zeros(1), torch.ones(1)]
    ms, seconds, calls, method = harness.measure_point(lambda x: events.append("call"), pool, 2, 5,
                                                       torch.device("cuda"))
    assert events == (["call"] * 2 + ["sync"]  # warm-up, then one sync before timing starts
                      + ["call", "sync"] * 5  # one sync per latency call
                      + ["sync"] + ["call"] * 5 + ["sync"])  # pipelined: calls == iters, one sync at the end
    assert len(ms) == 5 and all(m >= 3.0 for m in ms)  # the sync's wait is inside every latency sample
    assert calls == 5 and seconds >= 0.003 and "one sync at the end" in method

    # CPU: no synchronisation at all, and the latency calls themselves are the throughput measurement
    events.clear()
    ms, seconds, calls, method = harness.measure_point(lambda x: time.sleep(0.002), pool, 1, 4, torch.device("cpu"))
    assert "sync" not in events and len(ms) == 4 and all(m >= 2.0 for m in ms)
    assert calls == 4 and seconds == pytest.approx(sum(ms) / 1e3) and "latency calls" in method


def _fake_nvidia_smi(monkeypatch, apps: list[tuple[str, int, int]]):
    """nvidia-smi's CSV answers: one GPU (GPU-a, 80 % busy) and the given compute apps (gpu uuid, pid, MiB)."""
    def run(cmd, **kw):
        if cmd[1].startswith("--query-gpu="):
            out = "GPU-a, 80, 2000\nGPU-b, 0, 10\n"
        else:
            out = "".join(f"{u}, {pid}, {mib}\n" for u, pid, mib in apps)
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(harness.subprocess, "run", run)


def _gpu_warnings(reading: dict) -> list[str]:
    mon = harness.LoadMonitor(reader=lambda: None, gpu_reader=lambda: reading)
    with mon.window():
        pass
    return [w for w in harness.assess_reliability(mon.summary(), [])["warnings"] if "GPU" in w]


def test_read_gpu_tells_our_process_from_others_also_across_pid_namespaces(monkeypatch):
    me = os.getpid()
    host_me, host_other = me + 100_000, me + 100_001  # PIDs of another namespace: none is ours as we see it

    _fake_nvidia_smi(monkeypatch, [("GPU-a", me, 900)])  # only this process
    g = harness.read_gpu("GPU-a")
    assert g == {"util_pct": 80.0, "others": []} and not _gpu_warnings(g)

    _fake_nvidia_smi(monkeypatch, [("GPU-a", me, 900), ("GPU-a", 4242, 300), ("GPU-b", 77, 5)])  # + one other here
    g = harness.read_gpu("GPU-a")
    assert g["others"] == [{"pid": 4242, "used_mib": 300.0}] and not g.get("foreign_pids")  # GPU-b's not counted
    assert any("other processes ran on the GPU" in w and "pid 4242" in w for w in _gpu_warnings(g))

    # a container: nvidia-smi reports host PIDs, so the one process on our GPU is most likely this one
    _fake_nvidia_smi(monkeypatch, [("GPU-a", host_me, 900), ("GPU-b", 77, 5)])
    g = harness.read_gpu("GPU-a")
    assert g["others"] == [] and not _gpu_warnings(g)

    _fake_nvidia_smi(monkeypatch, [("GPU-a", host_me, 900), ("GPU-a", host_other, 300)])  # two: someone else too
    g = harness.read_gpu("GPU-a")
    assert g["foreign_pids"] and {o["pid"] for o in g["others"]} == {host_me, host_other}
    (w,) = _gpu_warnings(g)
    assert w.startswith("2 compute processes shared the GPU") and "another namespace" in w


def test_wide_spread_is_flagged_unsteady():
    steady = harness.percentiles([10.0, 10.1, 9.9, 10.0, 10.2, 10.0, 9.8, 10.1, 10.0, 10.0])
    noisy = harness.percentiles([10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 25.0, 30.0])
    assert not harness.is_unsteady(steady, 10) and harness.is_unsteady(noisy, 10)
    assert not harness.is_unsteady(harness.percentiles([1.0, 9.0]), 2)  # too few samples to judge
    rel = harness.assess_reliability({"measured": True, "others_cpu_share": 0.01, "steal_share": 0.0},
                                     [{"backend": "torch", "precision": "fp32", "tower": "image", "batch": 8,
                                       "unsteady": True}])
    assert not rel["reliable"] and rel["unsteady_points"] == ["torch/fp32 image b8"]
    busy_vm = harness.assess_reliability({"measured": True, "others_cpu_share": 0.0, "steal_share": 0.2}, [])
    assert not busy_vm["reliable"] and "steal" in busy_vm["warnings"][0]
    assert harness.assess_reliability({"measured": True, "others_cpu_share": 0.02, "steal_share": 0.0},
                                      [])["reliable"]


def test_gpu_processes_of_others_are_a_warning():
    mon = harness.LoadMonitor(reader=lambda: None, gpu_reader=lambda: {"util_pct": 90.0,
                                                                       "others": [{"pid": 4242, "used_mib": 900.0}]})
    with mon.window():
        pass
    load = mon.summary()
    assert load["gpu"]["other_processes"] == [{"pid": 4242, "used_mib_max": 900.0}]
    rel = harness.assess_reliability(load, [])
    assert any("pid 4242" in w for w in rel["warnings"])
    assert any("could not be read" in w for w in rel["warnings"])  # no CPU readings at all is not "reliable"


def test_proc_readings_are_sane_here():
    a = harness.read_cpu()
    if a is None:
        pytest.skip("no /proc")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:  # burn CPU in this process
        pass
    b = harness.read_cpu()
    assert b.total > a.total and b.busy >= a.busy and b.ours > a.ours and a.loadavg1 is not None


def test_flops_per_item_agree_with_profile_and_shrink_with_text_length():
    cfg = get_config("priorclip-tiny")
    prof = profile_config(cfg)
    assert harness.gflop_per_item(cfg, "image") == pytest.approx(prof["gflop_image"])
    assert harness.gflop_per_item(cfg, "text", 77) == pytest.approx(prof["gflop_text"])
    assert harness.gflop_per_item(cfg, "text", 20) < harness.gflop_per_item(cfg, "text", 77)


def test_token_batch_puts_eot_at_the_requested_length():
    t = harness.make_token_batch(4, 20, 77, 49408, seed=0)
    assert t.shape == (4, 77)
    assert (t.argmax(dim=1) == 19).all() and (t[:, 20:] == 0).all() and (t[:, 0] == 49406).all()


def test_measured_cpu_peak_is_positive():
    peaks = harness.measure_peak_tflops("cpu", quick=True)
    assert {"fp32", "fp32_torch"} <= set(peaks) and peaks["fp32"] == max(peaks.values()) > 0


def test_bench_engine_and_e2e_rate_on_tiny():
    torch.manual_seed(0)
    model = create_model("priorclip-tiny")
    eng = create_engine("torch", model, "fp32", "cpu")
    rows = harness.bench_engine(eng, model.cfg, [1, 2], warmup=1, iters=3, text_length=12, peaks={"fp32": 1.0})
    assert [(r.tower, r.batch) for r in rows] == [("image", 1), ("image", 2), ("text", 1), ("text", 2)]
    text = rows[-1]
    assert text.tokens == 12  # eager trims to the caption length, and FLOPs are counted there
    assert text.gflop_per_item == pytest.approx(harness.gflop_per_item(model.cfg, "text", 12))
    for r in rows:
        assert r.items_per_s > 0 and r.tflops > 0 and 0 < r.frac_peak and r.peak_mem_mib > 0
        assert r.iters == 3 and r.p90_ms is None and r.p99_ms is None and r.cv >= 0
    jpegs = harness.make_jpegs(6, size=80)
    assert len(set(jpegs)) == 6  # distinct images, not one repeated
    rate = harness.e2e_rate(eng, jpegs, batch=4, workers=2)
    assert rate["n_images"] == 6 and rate["images_per_s"] > 0
    assert harness.decode_rate(jpegs, EvalTransform(64), workers=2) > 0


def test_caption_batches_and_the_length_they_run():
    """Real-caption batches: seeded draws from the set; the length run is the batch's longest (EOT + 1), averaged."""
    from priorclip.benchmarks.harness import caption_batch, tokens_run

    toks = torch.zeros(5, 77, dtype=torch.long)
    for i, eot in enumerate((3, 9, 4, 20, 6)):
        toks[i, 0], toks[i, eot] = 49406, 49407  # SOT, EOT (the highest id)
    a = caption_batch(toks, 3, seed=1)
    assert torch.equal(a, caption_batch(toks, 3, seed=1)) and len({tuple(r.tolist()) for r in a}) == 3  # no repeats
    assert caption_batch(toks, 8, seed=1).shape == (8, 77)  # more rows than captions: drawn with repeats
    assert tokens_run([toks[:2], toks[2:]]) == round(((9 + 1) + (20 + 1)) / 2)  # 15.5 -> 16
