"""The report a user reads first: the summary table, FAIL marked everywhere, --strict, the generated-set label, the
ΔmR message on a small set, class coverage, and exported engines wired to the recall set."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from priorclip.benchmarks import report as report_mod
from priorclip.benchmarks import runner as runner_mod
from priorclip.benchmarks.cli import main
from priorclip.benchmarks.report import labels, plot_series, render_console, render_markdown, validate_report
from priorclip.benchmarks.runner import BenchOptions, run_bench
from priorclip.serve.engines import Engine, create_engine
from tests.bench.test_recall_check import _Corrupt  # rotates image rows: a batching bug


def _bad_bf16_factory(backend, model, precision, device, **kw):
    eng = create_engine(backend, model, precision, device, **kw)
    if precision == "bf16":
        return Engine(_Corrupt(eng), backend, precision, device, fixed_text_length=False)
    return eng


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory):
    """One CLI run with a stand-in bf16 engine outside tolerance, on an 8-image generated set, with --strict."""
    out = tmp_path_factory.mktemp("strict")
    mp = pytest.MonkeyPatch()
    mp.setattr(runner_mod, "create_engine", _bad_bf16_factory)
    try:
        res = CliRunner().invoke(
            main,
            ["--model", "priorclip-tiny", "--device", "cpu", "--engines", "torch:fp32,torch:bf16", "--batch-sizes",
             "1,2", "--warmup", "0", "--iters", "2", "--recall-images", "8", "--generated-set", "--e2e-images", "2",
             "--strict", "--quiet", "--out", str(out)],
            catch_exceptions=False,
        )
    finally:
        mp.undo()
    doc = json.loads(next(out.glob("bench-cpu-*.json")).read_text())
    md = next(out.glob("bench-cpu-*.md")).read_text()
    return res, doc, md


def test_strict_exits_non_zero_when_an_engine_fails(strict_run):
    res, doc, _ = strict_run
    assert res.exit_code == 3, res.output
    # the FAIL and its reason, and each reliability warning, are printed once (in the tables), not again on stderr
    assert res.output.count("FAIL torch/bf16: image cosine min") == 1 and "FAIL: " not in res.output
    warnings = doc["reliability"]["warnings"]
    assert res.output.count("WARNING: timings may be unreliable") == len(warnings)
    assert all(res.output.count(w) == 1 for w in warnings)
    assert doc["summary"]["failing"] == ["torch/bf16"]
    assert validate_report(doc) == []


def test_report_opens_with_the_summary_table(strict_run):
    res, doc, md = strict_run
    console = render_console(doc)
    for text in (console, md):
        first_table = text[: text.index("fastest engine that passes")]
        assert "vs fp32 eager" in first_table and "vs torch.compile" in first_table and "verdict" in first_table
        assert "rank flips" in first_table and "ΔmR" in first_table and "cos min" in first_table
    assert md.splitlines()[2].startswith("| engine | precision | img/s @2 | txt/s @2 |")
    rows = {r["engine"]: r for r in doc["summary"]["rows"]}
    assert rows["torch/fp32"]["verdict"] == "PASS" and rows["torch/bf16"]["verdict"] == "FAIL"
    assert rows["torch/fp32"]["speedup_eager"]["image"] == pytest.approx(1.0)
    assert rows["torch/fp32"]["latency"]["batch"] == 1 and rows["torch/fp32"]["latency"]["image"] > 0
    assert "fastest engine that passes: torch/fp32" in console
    assert doc["summary"]["fastest_passing"]["engine"] == "torch/fp32"  # the faster bf16 fails: never "fastest"
    assert "torch.compile: not run here" in md  # the compile column says why it is empty


def test_a_failing_engine_is_marked_in_every_table(strict_run):
    _, doc, md = strict_run
    console = render_console(doc)
    marked = "torch/bf16 [FAIL]"
    # engines, latency, throughput, e2e tables (and the recall table) each carry the mark on their bf16 rows
    for section in ("## Engines", "## Request latency", "## Pipelined throughput", "## End to end", "## Recall"):
        body = md[md.index(section):].split("\n## ")[0]
        bf16 = [ln for ln in body.splitlines() if "torch/bf16" in ln]
        assert bf16 and all(marked in ln for ln in bf16), (section, bf16)
    assert console.count(marked) >= 9  # 1 engine + 4 latency + 4 throughput (+ e2e, recall)
    assert "FAIL torch/bf16: image cosine min" in console
    assert all(label.endswith("[FAIL]") for label in plot_series(doc, "image") if "bf16" in label)
    assert labels(doc) == {"torch/bf16": marked}
    assert [e["verdict"] for e in doc["engines"]] == ["PASS", "FAIL"]


def test_small_set_says_dmr_is_not_judged(strict_run):
    _, doc, md = strict_run
    assert "too few items for a ΔmR verdict" in doc["recall"]["dmr_note"]
    assert "too few items for a ΔmR verdict" in md and "too few items for a ΔmR verdict" in render_console(doc)
    assert all(not r["dmr_judged"] for r in doc["recall"]["engines"])
    assert doc["recall"]["tolerances"]["fp32"]["dmr_max"] is None


def test_generated_set_is_labelled_everywhere(strict_run):
    _, doc, md = strict_run
    ds = doc["recall"]["dataset"]
    assert ds["generated"] is True and "GENERATED" in ds["name"] and ds["chosen_by"] == "--generated-set"
    assert "GENERATED scenes, not real data" in md and "GENERATED scenes, not real data" in render_console(doc)
    assert "8 images over 6 classes" in md  # size and class coverage


def _karpathy_with_splits(root):
    """A small real-looking dataset folder: 12 test + 12 train images over 6 classes, one JSON, images/."""
    from PIL import Image

    from priorclip.synthetic import make_sample

    entries = []
    (root / "images").mkdir(parents=True)
    for split, seed, offset in (("test", 0, 0), ("train", 1, 100)):
        js, imgs = make_sample(root / f"src-{split}", n_images=12, size=48, seed=seed, split=split)
        for e in json.loads(js.read_text())["images"]:
            kind, idx = e["filename"].rsplit(".", 1)[0].split("_")
            name = f"{kind}_{int(idx) + offset}.jpg"
            Image.open(imgs / e["filename"]).save(root / "images" / name)
            entries.append({**e, "filename": name})
    (root / "data.json").write_text(json.dumps({"images": entries}))
    return root


def test_reachable_dataset_is_the_default_and_calibration_uses_its_train_split(tmp_path, monkeypatch):
    ds = _karpathy_with_splits(tmp_path / "ds")
    monkeypatch.setenv("PRIORCLIP_DATASET", str(ds))
    opts = BenchOptions(model_name="priorclip-tiny", device="cpu", engines=[("torch", "fp32")], batch_sizes=[2],
                        warmup=0, iters=1, recall_images=6, e2e=False, quick_peak=True, towers=("image",),
                        calib_images=6, calib_captions=6)
    source = runner_mod.recall_source(opts)
    assert source is not None and source[0].name == "data.json"
    calib, desc = runner_mod._calibration_set(opts, source, tmp_path)
    assert desc["split"] == "train" and not desc["generated"] and desc["n_classes"] == 6
    assert all(int(p.stem.split("_")[1]) >= 100 for p in calib.images)  # never an evaluated (test) image
    doc = run_bench(opts, argv=["priorclip-bench"], log=lambda s: None)
    d = doc["recall"]["dataset"]
    assert d["generated"] is False and d["name"] == "data.json" and "default dataset" in d["chosen_by"]
    assert d["coverage"].startswith("6 images over 6 of 6 classes (1-1 per class), drawn class-spread")
    md = render_markdown(doc)
    assert "parity set: data.json: 6 images over 6 of 6 classes" in md and "GENERATED" not in md


def test_exported_engines_get_the_recall_set_and_a_refused_export_fails(monkeypatch):
    """Exporting backends receive the recall set and its reference embeddings; an export whose own parity ran on
    that set is reused, and one refused for its parity is a FAIL row that says why, its parity in the recall table."""
    from priorclip.export.api import ExportError
    from priorclip.export.parity import parity_report

    seen = {}

    def factory(backend, model, precision, device, **kw):
        seen[precision] = kw
        eng = create_engine("torch", model, "fp32", device)
        if precision == "fp16":  # refused as export/api.py refuses it: the error carries its parity report
            bad = Engine(_Corrupt(eng), backend, precision, device, fixed_text_length=False)
            rep = parity_report(bad, None, kw["parity_set"], "fp16", reference_embeddings=kw["reference_embeddings"])
            assert not rep["passed"]
            err = ExportError(f"parity outside the fp16 tolerance: {'; '.join(rep['failures'])}")
            err.parity = rep
            raise err
        rep = parity_report(eng, None, kw["parity_set"], "fp32", reference_embeddings=kw["reference_embeddings"])
        return Engine(eng.inner, backend, precision, device, fixed_text_length=False, info={"export_parity": rep})

    monkeypatch.setattr(runner_mod, "available_backends", lambda d: {b: None for b in runner_mod.BACKENDS})
    opts = BenchOptions(model_name="priorclip-tiny", device="cpu", engines=[("aoti", "fp32"), ("aoti", "fp16")],
                        batch_sizes=[2], warmup=0, iters=1, recall_images=6, generated_set=True, e2e=False,
                        quick_peak=True, towers=("image",))
    doc = run_bench(opts, argv=["priorclip-bench"], log=lambda s: None, engine_factory=factory)
    ref_img, ref_txt, ref_order = seen["fp32"]["reference_embeddings"]
    assert len(seen["fp32"]["parity_set"].images) == 6 and ref_img.shape[0] == 6 and ref_order is not None
    rows = {r["engine"]: r for r in doc["recall"]["engines"]}
    assert rows["aoti/fp32"]["source"].startswith("export parity") and rows["aoti/fp32"]["within_tolerance"]
    refused = rows["aoti/fp16"]  # the refused export's own parity joins the recall table, no second embedding pass
    assert refused["source"].startswith("export parity") and not refused["within_tolerance"]
    assert any("image cosine min" in f for f in refused["failures"]) and refused["n_images"] == 6
    failed = next(e for e in doc["engines"] if e["precision"] == "fp16")
    assert failed["status"] == "failed" and failed["verdict"] == "FAIL"
    summary = {r["engine"]: r for r in doc["summary"]["rows"]}
    assert summary["aoti/fp16"]["verdict"] == "FAIL"
    assert "parity outside the fp16 tolerance" in summary["aoti/fp16"]["why"]
    md = render_markdown(doc)
    assert "aoti/fp16 [FAIL]" in md
    recall_md = md[md.index("## Recall check"):]
    assert any(ln.startswith("| aoti/fp16 [FAIL] |") and "**FAIL**" in ln for ln in recall_md.splitlines())
    assert validate_report(doc) == []


def test_speedup_against_compile_names_its_precision_when_it_differs():
    doc = {
        "config": {"batch_sizes": [8], "towers": ["image", "text"], "tf32": None},
        "environment": {"device": "cpu"},
        "recall": None,
        "engines": [{"backend": b, "precision": p, "status": "ok", "reason": None, "verdict": "unchecked"}
                    for b, p in (("torch", "fp32"), ("torch-compile", "fp32"), ("onnxruntime", "int8"))],
        "timings": [{"backend": b, "precision": p, "tower": tw, "batch": 8, "items_per_s": v, "p50_ms": 1.0}
                    for b, p, v in (("torch", "fp32", 10.0), ("torch-compile", "fp32", 20.0),
                                    ("onnxruntime", "int8", 40.0)) for tw in ("image", "text")],
    }
    doc["summary"] = report_mod.build_summary(doc)
    row = {r["engine"]: r for r in doc["summary"]["rows"]}["onnxruntime/int8"]
    assert row["speedup_eager"]["image"] == pytest.approx(4.0)
    assert row["speedup_compile"] == {"against": "torch-compile/fp32", "image": pytest.approx(2.0),
                                      "text": pytest.approx(2.0)}
    cells = report_mod.summary_rows(doc)[1][2]
    assert "2.00x / 2.00x (vs fp32)" in cells
    assert "no parity check ran" in doc["summary"]["fastest_line"]


def test_tf32_label_follows_each_engines_recorded_flag():
    """"+TF32" marks exactly the engines whose metadata records TF32 on (the runner decides which backends it
    applies to); ΔmR cells are recall.fmt_dmr's."""
    meta = {("torch", "fp32"): {"tf32": True}, ("onnxruntime", "fp32"): {}, ("torch", "fp16"): None}
    doc = {
        "config": {"batch_sizes": [8], "towers": ["image"], "tf32": True},
        "environment": {"device": "cuda:0"},
        "recall": None,
        "engines": [{"backend": b, "precision": p, "status": "ok", "reason": None, "verdict": "unchecked",
                     "metadata": m} for (b, p), m in meta.items()],
        "timings": [{"backend": b, "precision": p, "tower": "image", "batch": 8, "items_per_s": 1.0, "p50_ms": 1.0}
                    for b, p in meta],
    }
    doc["summary"] = report_mod.build_summary(doc)
    doc["summary"]["rows"][0].update(dmr=0.25, dmr_judged=False)
    cells = report_mod.summary_rows(doc)[1]
    assert [c[1] for c in cells] == ["fp32+TF32", "fp32", "fp16"]
    assert cells[0][6] == "(+0.25)" and cells[1][6] == "—"


def test_load_warning_from_injected_readings():
    """Readings in which other processes keep 1.4 of 2 cores busy: the JSON flags it, console and Markdown warn."""
    from priorclip.benchmarks.harness import CpuReading, LoadMonitor

    state = {"t": 0.0, "busy": 0, "total": 0, "ours": 0}

    def busy_machine():
        state["t"] += 1.0
        state["total"] += 200  # 2 cores x 100 ticks/s
        state["busy"] += 180
        state["ours"] += 40  # we get 0.4 cores, others 1.4
        return CpuReading(state["t"], state["busy"], state["total"], 0, state["ours"], 3.2)

    opts = BenchOptions(model_name="priorclip-tiny", device="cpu", engines=[("torch", "fp32")], batch_sizes=[1],
                        warmup=0, iters=1, recall=False, e2e=False, quick_peak=True, towers=("text",))
    doc = run_bench(opts, argv=["priorclip-bench"], log=lambda s: None,
                    load_monitor=LoadMonitor(reader=busy_machine, interval=0.05, cpu_count=2))
    assert doc["reliability"]["reliable"] is False
    assert doc["load"]["others_cpu_share"] == pytest.approx(0.7)
    assert doc["timings"][0]["others_cpu_share"] == pytest.approx(0.7)
    assert any("70 % of this machine's CPU" in w for w in doc["reliability"]["warnings"])
    assert "WARNING: timings may be unreliable: other processes used 70 %" in render_console(doc)
    md = render_markdown(doc)
    assert "WARNING — timings may be unreliable" in md and "**timings unreliable**" in md
    assert md.index("WARNING") < md.index("## Run")  # right under the summary, not buried
    assert validate_report(doc) == []

    state.update(t=0.0, busy=0, total=0, ours=0)

    def idle_machine():
        state["t"] += 1.0
        state["total"] += 200
        state["busy"] += 101
        state["ours"] += 100
        return CpuReading(state["t"], state["busy"], state["total"], 0, state["ours"], 1.0)

    quiet = LoadMonitor(reader=idle_machine, interval=0.05, cpu_count=2)
    with quiet.window():
        pass
    assert quiet.summary()["others_cpu_share"] == pytest.approx(0.005)
    doc["load"] = quiet.summary()
    doc = report_mod.finalize(doc)
    assert doc["reliability"]["reliable"] and "WARNING" not in render_console(doc)


def test_missing_order_method_is_reported_as_not_available():
    from priorclip.benchmarks import recall

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    owner = torch.arange(6).repeat_interleave(2).numpy()
    order = torch.arange(5).repeat(6, 1)
    row = recall.compare("x", "fp32", (img, txt, order), (img, txt, None), owner)
    assert row["rank_flips"] is None and recall.fmt_flips(row["rank_flips"]) == "n/a"
