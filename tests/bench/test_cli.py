"""``priorclip-bench`` end to end on the tiny model on CPU: outputs, report schema, and user mistakes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from priorclip.benchmarks.cli import main
from priorclip.benchmarks.report import SCHEMA, validate_report
from priorclip.serve.engines import available_backends

FAST = [
    "--model",
    "priorclip-tiny",
    "--device",
    "cpu",
    "--batch-sizes",
    "1,2",
    "--warmup",
    "1",
    "--iters",
    "2",
    "--recall-images",
    "8",
    "--e2e-images",
    "4",
    "--generated-set",  # the same set on every machine, whether or not real data is reachable
    "--quiet",
]


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _report(out):
    files = sorted(out.glob("bench-cpu-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """torch, plus onnxruntime when the export package is built (the compiling backends are in the slow test)."""
    out = tmp_path_factory.mktemp("bench")
    backends = ["torch"] + (["onnxruntime"] if available_backends("cpu")["onnxruntime"] is None else [])
    res = _run([*FAST, "--backends", ",".join(backends), "--precisions", "fp32,bf16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output, backends


def test_writes_json_markdown_and_png(fast_run):
    out, output, backends = fast_run
    doc, path = _report(out)
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").stat().st_size > 1000
    md = path.with_suffix(".md").read_text()
    assert "## Request latency" in md and "## Pipelined throughput" in md and "## Recall check" in md and "JPEG" in md
    assert md.index("| engine | precision |") < md.index("## Run")  # the summary table opens the report
    assert "items/s" in output and "reference torch/fp32" in output and "fastest engine that passes" in output


def test_report_schema_and_contents(fast_run):
    out, _, backends = fast_run
    doc, _ = _report(out)
    assert validate_report(doc) == []
    assert doc["schema"] == SCHEMA
    env = doc["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] and env["date_utc"].endswith("Z")
    assert "priorclip-tiny" in env["command"] or env["command"]
    ok = {(e["backend"], e["precision"]) for e in doc["engines"] if e["status"] == "ok"}
    assert ("torch", "fp32") in ok and ("torch", "bf16") in ok
    if "onnxruntime" in backends:
        assert ("onnxruntime", "fp32") in ok
        assert any(e["backend"] == "onnxruntime" and e["status"] == "unsupported" for e in doc["engines"])  # no bf16
    points = {(t["backend"], t["precision"], t["tower"], t["batch"]) for t in doc["timings"]}
    for b, p in ok:
        assert {(b, p, tw, n) for tw in ("image", "text") for n in (1, 2)} <= points
    assert {(e["backend"], e["precision"]) for e in doc["e2e"]} == ok
    assert {r["engine"] for r in doc["recall"]["engines"]} == {f"{b}/{p}" for b, p in ok}
    assert doc["recall"]["dataset"]["n_images"] == 8 and doc["recall"]["dataset"]["n_classes"] == 6
    assert {r["engine"] for r in doc["summary"]["rows"]} == {f"{b}/{p}" for b, p in ok}
    # two timed calls: no p90 and no p99 is printed from them; throughput is measured apart from latency
    assert all(t["iters"] == 2 and t["p90_ms"] is None and t["p99_ms"] is None for t in doc["timings"])
    assert all(t["throughput_calls"] >= 1 and t["items_per_s"] > 0 for t in doc["timings"])
    assert doc["load"]["measured"] and isinstance(doc["reliability"]["reliable"], bool)
    rows = {r["engine"]: r for r in doc["recall"]["engines"]}
    # torch/fp32 runs the reference's own path: every recall delta is exactly 0 (a harness that perturbs or
    # misaligns embeddings fails here); ONNX Runtime is an independent runtime of the same maths: float32 rounding only
    assert set(rows["torch/fp32"]["delta"].values()) == {0.0} and rows["torch/fp32"]["within_tolerance"]
    if "onnxruntime/fp32" in rows:
        ort = rows["onnxruntime/fp32"]
        assert ort["cosine_image_min"] > 0.99999 and ort["cosine_text_min"] > 0.99999, ort
        assert ort["within_tolerance"], ort["failures"]


def test_validator_catches_a_broken_report(fast_run):
    doc, _ = _report(fast_run[0])
    del doc["environment"]["git_revision"]
    doc["timings"][0]["p50_ms"] = "fast"
    problems = validate_report(doc)
    assert any("git_revision" in p for p in problems) and any("p50_ms" in p for p in problems)


def test_dataset_option_reads_a_karpathy_folder(tmp_path):
    from priorclip.synthetic import make_sample

    make_sample(tmp_path / "ds", n_images=6, size=64)
    res = _run(
        [
            *[a for a in FAST if a != "--generated-set"],
            "--backends",
            "torch",
            "--no-e2e",
            "--towers",
            "image",
            "--batch-sizes",
            "4",
            "--dataset",
            str(tmp_path / "ds"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert res.exit_code == 0, res.output
    doc, _ = _report(tmp_path / "out")
    ds = doc["recall"]["dataset"]
    assert ds["name"] == "dataset.json" and ds["n_images"] == 6 and ds["generated"] is False
    assert {t["tower"] for t in doc["timings"]} == {"image"} and doc["e2e"] == []


def test_real_captions_time_texts_at_their_own_lengths(tmp_path):
    """--real-captions: texts drawn from the recall set; eager and fused cut them, so they run (and count FLOPs at)
    the batch's longest caption, far under the 77-token context; the fused engine's result equals eager's."""
    from priorclip.benchmarks import harness

    res = _run([*FAST, "--engines", "torch:fp32,fused:fp32", "--no-e2e", "--towers", "text", "--real-captions",
                "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    doc, path = _report(tmp_path / "out")
    assert doc["config"]["real_captions"] is True
    rows = {(t["backend"], t["batch"]): t for t in doc["timings"]}
    assert set(rows) == {(b, n) for b in ("torch", "fused") for n in (1, 2)}
    for t in rows.values():
        assert 3 <= t["tokens"] < 40  # generated captions are a few words, not 77 tokens
        assert t["gflop_per_item"] == pytest.approx(harness.gflop_per_item(harness_cfg(), "text", t["tokens"]))
    assert "real captions drawn from the recall set" in path.with_suffix(".md").read_text()
    assert all(r["within_tolerance"] for r in doc["recall"]["engines"])


def harness_cfg():
    from priorclip import get_config

    return get_config("priorclip-tiny")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--real-captions", "--no-recall"], "--real-captions draws the timed captions"),
        (["--backends", "nope"], "unknown backend 'nope'"),
        (["--engines", "torch:fp9"], "unknown precision 'fp9'"),
        (["--batch-sizes", "0,8"], "positive integers"),
        (["--batch-sizes", "a,b"], "positive integers"),
        (["--dataset", "/nonexistent/ds.json"], "not found"),
        (["--images", "/tmp"], "--images needs --dataset"),
        (["--engines", "torch", "--backends", "torch"], "not both"),
        (["--model", "no-such-model"], "unknown model"),
        (["--recall-images", "1"], "integer >= 2 or 'all'"),
        (["--generated-set", "--dataset", "/tmp"], "not both"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, args, message):
    res = CliRunner().invoke(main, ["--device", "cpu", "--out", str(tmp_path), *args])
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("Error")]) == 1


def test_unavailable_backend_is_listed_with_its_reason(tmp_path):
    res = _run(
        [
            *FAST,
            "--engines",
            "torch:fp32,tensorrt:fp16",
            "--no-recall",
            "--no-e2e",
            "--towers",
            "text",
            "--batch-sizes",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert res.exit_code == 0, res.output
    doc, _ = _report(tmp_path)
    trt = [e for e in doc["engines"] if e["backend"] == "tensorrt"]
    assert trt and trt[0]["status"] == "unavailable" and trt[0]["reason"]
    assert doc["recall"] is None


def test_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    """--compile-mode / --compile-dynamic / --dataset / --note through the whole CLI to the torch.compile call, with
    torch.compile stood in by a recorder that returns the function unchanged (real compiles are the slow test's and
    the GPU queue's: minutes on two cores)."""
    import torch

    from priorclip.synthetic import make_sample

    if available_backends("cpu")["torch-compile"] is not None:
        pytest.skip(available_backends("cpu")["torch-compile"])
    calls = []

    def record(fn, **kw):
        calls.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    make_sample(tmp_path / "ds", n_images=5, size=64)
    res = _run([*[a for a in FAST if a != "--generated-set"], "--engines", "torch-compile:fp32", "--batch-sizes", "2,3",
                "--compile-mode", "reduce-overhead", "--compile-dynamic", "--dataset", str(tmp_path / "ds"),
                "--note", "test", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert calls and all(kw == {"dynamic": True, "mode": "reduce-overhead"} for kw in calls), calls
    assert len(calls) == 2  # one per tower
    doc, _ = _report(tmp_path / "out")
    (eng,) = [e for e in doc["engines"] if e["backend"] == "torch-compile"]
    assert eng["status"] == "ok" and eng["metadata"]["dynamic"] and eng["metadata"]["compile_mode"] == "reduce-overhead"
    assert doc["config"]["note"] == "test" and doc["recall"]["engines"], doc["recall"]


@pytest.mark.slow
def test_compiling_backends_on_tiny_with_the_gpu_script_options(tmp_path):
    """torch-compile and AOTInductor through the whole CLI with benchmarks/gpu/q1-speed.sh's options (compile mode,
    dynamic batch, --engines, a dataset folder, --note); compiling makes this slow on CPU."""
    from priorclip.synthetic import make_sample

    avail = available_backends("cpu")
    engines = [
        e
        for e in ("torch:fp32", "torch:fp16", "torch-compile:fp32", "onnxruntime:fp16", "onnxruntime:int8", "aoti:fp32")
        if avail[e.split(":")[0]] is None
    ]
    make_sample(tmp_path / "ds", n_images=5, size=64)
    res = _run(
        [
            *[a for a in FAST if a != "--generated-set"],
            "--engines",
            ",".join(engines),
            "--batch-sizes",
            "2,3",
            "--compile-mode",
            "reduce-overhead",
            "--compile-dynamic",
            "--dataset",
            str(tmp_path / "ds"),
            "--note",
            "test",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert res.exit_code == 0, res.output
    doc, _ = _report(tmp_path / "out")
    ok = {f"{e['backend']}:{e['precision']}" for e in doc["engines"] if e["status"] == "ok"}
    assert ok == set(engines), doc["engines"]
    compiled = [e for e in doc["engines"] if e["backend"] == "torch-compile"]
    assert all(e["metadata"]["dynamic"] and e["metadata"]["compile_mode"] == "reduce-overhead" for e in compiled)
    rows = {r["engine"]: r for r in doc["recall"]["engines"]}
    for name in ("torch-compile/fp32", "aoti/fp32"):
        if name in rows:
            assert rows[name]["within_tolerance"], rows[name]
    assert doc["config"]["note"] == "test"


def test_gpu_markdown_puts_our_numbers_beside_the_reference_points(fast_run):
    """The H100 report's extra section, rendered from a CPU report relabelled as a GPU one."""
    from priorclip.benchmarks.report import render_markdown

    doc, _ = _report(fast_run[0])
    doc["environment"]["device"] = "cuda:0"
    row = dict(doc["timings"][0], backend="torch", precision="fp16", tower="image", batch=256, items_per_s=6900.0)
    doc["timings"].append(row)
    md = render_markdown(doc)
    assert "## Beside the reference points" in md
    assert "| 6,900 | 1.00x |" in md and "not run" in md


def test_failed_run_leaves_no_empty_output_folder(tmp_path, monkeypatch):
    """--out is checked before the run and made only by the first report: a run that fails first leaves nothing."""
    res = CliRunner().invoke(main, ["--model", "no-such-model", "--device", "cpu", "--quiet",
                                    "--out", str(tmp_path / "new" / "bench")])
    assert res.exit_code == 1 and "unknown model 'no-such-model'" in res.output, res.output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    res = CliRunner().invoke(main, ["--model", "no-such-model", "--device", "cpu", "--quiet",
                                    "--out", str(tmp_path / "kept")])
    assert res.exit_code == 1 and (tmp_path / "kept").is_dir()  # a folder that was there stays

    def never(*a, **k):
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr("priorclip.benchmarks.runner.run_bench", never)
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(main, ["--device", "cpu", "--out", str(tmp_path / "afile" / "bench")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # not the stand-in's error
    assert res.output.strip() == (f"Error: --out: output folder {tmp_path / 'afile' / 'bench'} is not writable: "
                                  f"{tmp_path / 'afile'} is a file, not a folder")
