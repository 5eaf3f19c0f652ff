"""The GPU queue (benchmarks/gpu/) dry-run on CPU with the tiny config and generated data, so that a lent GPU's
15 minutes are never spent debugging a script: what each entry writes, its status record, its time limits, and its
one-line errors for a missing slice, missing wheels or a missing wheel part. Entry 2 (training) is in
tests/training/test_train_aid_script.py."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from priorclip.synthetic import SCENES, make_sample

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"


def _module(name: str):
    """A script of benchmarks/gpu/ imported as a module (without putting that folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"gpu_queue_{name}", GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def _env(tmp_path: Path, **kw) -> dict:
    env = dict(os.environ, MODEL="priorclip-tiny", DEVICE="cpu", BATCHES="4", WARMUP="0", ITERS="1", E2E="0",
               PYTHON=sys.executable, OUT=str(tmp_path / "out"), Q_WORK=str(tmp_path / "work"),
               Q_SITE=str(tmp_path / "site"), WHL_DIR=str(tmp_path / "no-wheels"))
    env.pop("PRIORCLIP_GIT_REVISION", None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def dry_run(entry: str, env: dict) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """Run queue entry ``entry`` (e.g. "q1-speed") on CPU: it must succeed and leave exactly its three files.
    Returns (the process, $OUT, the status document)."""
    r = subprocess.run(["bash", str(GPU / f"{entry}.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = Path(env["OUT"])
    assert sorted(p.name for p in out.iterdir()) == [f"{entry}-{k}" for k in ("results.tar.gz", "status.json",
                                                                              "summary.md")]  # at most 8 come back
    return r, out, json.loads((out / f"{entry}-status.json").read_text())


def _results(out: Path, entry: str) -> dict[str, bytes]:
    """The files of the entry's results archive, by path."""
    with tarfile.open(out / f"{entry}-results.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _one(files: dict[str, bytes], prefix: str, suffix: str) -> dict:
    found = [k for k in files if k.startswith(prefix) and k.endswith(suffix)]
    assert len(found) == 1, (prefix, suffix, sorted(files))
    return json.loads(files[found[0]])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A generated dataset sorted by class like AID/RSICD: 24 test images (4 per class), 12 train."""
    root = tmp_path_factory.mktemp("src")
    json_path, _ = make_sample(root, n_images=36, size=64, seed=0, split="test")
    doc = json.loads(json_path.read_text())
    for i, e in enumerate(doc["images"]):
        e["split"] = "test" if i < 24 else "train"
    json_path.write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def slice_dir(source, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("bench-data") / "aid-rsicd"
    r = subprocess.run([sys.executable, str(GPU / "stage.py"), "slice", "--src", str(source), "--dst", str(dst),
                        "--test", "12", "--calib", "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dst


def test_stage_slice_is_class_spread(slice_dir):
    doc = json.loads((slice_dir / "dataset_rsicd_aid.json").read_text())
    test = [e for e in doc["images"] if e["split"] == "test"]
    train = [e for e in doc["images"] if e["split"] == "train"]
    # 12 of 24 test images whose names sort by class: the first 12 would be 3 classes; spread gives 2 of each of 6
    classes = [e["filename"].split("_")[0] for e in test]
    assert len(test) == 12 and {classes.count(c) for c in SCENES} == {2}
    assert len(train) == 6 and len({e["filename"].split("_")[0] for e in train}) == 6
    assert sorted(p.name for p in (slice_dir / "images").iterdir()) == sorted(e["filename"] for e in doc["images"])
    assert all(set(e) <= {"filename", "split", "label", "sentences"} and len(e["sentences"]) == 5 for e in doc["images"])
    staged = json.loads((slice_dir.parent / "STAGED.json").read_text())
    assert staged["test"]["n_classes"] == 6 and staged["test"]["per_class_min"] == 2
    assert "class-spread" in staged["test"]["coverage"] and staged["train_for_calibration"]["n_images"] == 6
    assert staged["revision"]


def test_lib_time_limits_failures_and_bundle(tmp_path):
    """A step cut by its time limit, a failing step and a step with no time left are recorded, and what the steps
    before them wrote stays in the three files of $OUT."""
    script = tmp_path / "entry.sh"
    script.write_text(f"""set -uo pipefail
. {GPU / 'lib.sh'}
q_init q9-test
R=$Q_WORK/results
q_step first 30 bash -c "echo kept > $R/first/result.txt"
q_step broken 30 bash -c "echo 'Error: something broke' >&2; exit 4"
# a training phase's metrics as they are written, before the step is cut off (q2's runs/<phase>/metrics.jsonl)
q_step slow 6 bash -c "mkdir -p $Q_WORK/runs/slow && echo step-1 > $Q_WORK/runs/slow/metrics.jsonl; sleep 30"
q_step late 30 bash -c "echo never > $R/late/x.txt"
q_finish
""")
    env = _env(tmp_path, Q_TIME_LIMIT="12", Q_RESERVE="0", Q_MIN_STEP_S="8", Q_KILL_S="2")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr  # a step timed out or failed
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["q9-test-results.tar.gz", "q9-test-status.json",
                                                      "q9-test-summary.md"]
    status = json.loads((out / "q9-test-status.json").read_text())
    steps = {s["name"]: s for s in status["steps"]}
    assert steps["first"]["state"] == "ok" and steps["first"]["files"] == ["first/result.txt"]
    assert steps["slow"]["state"] == "timeout" and steps["slow"]["rc"] == 124 and steps["slow"]["seconds"] < 10
    assert steps["broken"]["state"] == "failed" and steps["broken"]["rc"] == 4
    assert steps["broken"]["note"] == "Error: something broke"
    assert steps["late"]["state"] == "skipped" and "not enough time left" in steps["late"]["note"]
    assert status["finished"] and status["time_limit_s"] == 12 and status["revision"]
    files = _results(out, "q9-test")
    assert files["results/first/result.txt"] == b"kept\n"
    assert files["runs/slow/metrics.jsonl"] == b"step-1\n"  # kept although the step was killed
    summary = (out / "q9-test-summary.md").read_text()
    assert "| slow | TIMEOUT |" in summary and "| broken | FAILED |" in summary
    # the summary is the last thing printed (the device tool returns the end of the output)
    assert r.stdout.rstrip().endswith("all of it: the -results.tar.gz)") and "| slow | TIMEOUT |" in r.stdout
    assert r.stdout.rindex("q9-test-status.json") < r.stdout.rindex("| step | state |")


def test_lib_leaves_a_later_step_its_time(tmp_path):
    """A step limited with q_leaving that runs to its limit, even one that ignores SIGTERM, still leaves the next
    step enough time to run (q2's int8 step before its report)."""
    script = tmp_path / "entry.sh"
    script.write_text(f"""set -uo pipefail
. {GPU / 'lib.sh'}
q_init q9-test
q_step greedy "$(q_leaving 3)" bash -c "trap '' TERM; sleep 60"
q_step report 30 bash -c "echo report > $Q_WORK/results/report/r.txt"
q_finish
""")
    env = _env(tmp_path, Q_TIME_LIMIT="20", Q_RESERVE="1", Q_MIN_STEP_S="3", Q_KILL_S="2")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    status = json.loads((tmp_path / "out" / "q9-test-status.json").read_text())
    states = {s["name"]: s["state"] for s in status["steps"]}
    assert states == {"greedy": "timeout", "report": "ok"}, r.stdout + r.stderr


def test_bench_step_notes_name_failed_and_cut_off_engines(tmp_path):
    """priorclip-bench exits 0 when engines fail: the step's note names them, and a bench cut off by its limit
    names the engine it was on, from its "[engine] building ..." line."""
    def bench_json(engines, recall=()):
        return json.dumps({"engines": [{"backend": b, "precision": p, "status": st, "reason": why, "verdict": v}
                                       for b, p, st, why, v in engines],
                           "recall": {"engines": [{"engine": n, "failures": f} for n, f in recall]}})

    done = bench_json([("torch", "fp32", "ok", None, "PASS"), ("torch", "fp16", "ok", None, "FAIL"),
                       ("aoti", "fp16", "failed", "RuntimeError: no compiler", "FAIL")],
                      [("torch/fp16", ["|ΔmR| 2.1 > 1.0"])])
    cut = bench_json([("torch-compile", "fp16", "ok", None, "PASS")])
    (tmp_path / "done.json").write_text(done)
    (tmp_path / "cut.json").write_text(cut)
    script = tmp_path / "entry.sh"
    script.write_text(f"""set -uo pipefail
. {GPU / 'lib.sh'}
q_init q9-test
R=$Q_WORK/results
q_step bench 30 cp {tmp_path / 'done.json'} $R/bench/bench-x.json
q_step compiled 3 bash -c "echo '[torch-compile/fp16] building ...' >&2; cp {tmp_path / 'cut.json'} $R/compiled/bench-y.json
echo '[aoti/fp16] building ...' >&2; sleep 30"
q_finish
""")
    env = _env(tmp_path, Q_TIME_LIMIT="60", Q_RESERVE="0", Q_MIN_STEP_S="1", Q_KILL_S="2")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "q9-test-status.json").read_text())["steps"]}
    assert steps["bench"]["state"] == "ok", r.stdout + r.stderr
    assert steps["bench"]["note"] == ("torch/fp16 FAIL: |ΔmR| 2.1 > 1.0; aoti/fp16 failed: RuntimeError: no compiler")
    assert steps["compiled"]["state"] == "timeout"
    assert "cut off during aoti/fp16" in steps["compiled"]["note"] and "torch-compile" not in steps["compiled"]["note"]
    assert "aoti/fp16 failed" in (tmp_path / "out" / "q9-test-summary.md").read_text()


def test_q1_speed_dry_run(slice_dir, tmp_path):
    env = _env(tmp_path, DATA=slice_dir, EAGER_ENGINES="torch:fp32,torch:bf16", COMPILED_ENGINES="torch:fp32",
               FUSED_ENGINES="fused:fp32", AOTI_ENGINES="", PRIORCLIP_GIT_REVISION="abc123",
               KBENCH_ARGS="--kernels stem_gate,add_layernorm --batches 2 --dtypes fp32 --shape 9,40,24 --iters 1 "
                           "--configs 64:2")
    r, out, status = dry_run("q1-speed", env)
    assert [(s["name"], s["state"]) for s in status["steps"]] == [
        ("eager", "ok"), ("kernels", "ok"), ("kbench", "ok"), ("fused", "ok"), ("compiled", "ok"), ("tf32", "ok"),
        ("aoti", "skipped")]
    notes = {s["name"]: s["note"] for s in status["steps"]}
    assert notes["aoti"] == "AOTI_ENGINES is empty"
    assert status["revision"] == "abc123" and status["finished"] and status["wall_s"] > 0
    assert "EAGER_ENGINES=torch:fp32,torch:bf16" in status["command"] and "q1-speed.sh" in status["command"]
    assert status["environment"]["torch"] and status["environment"]["device"].startswith("CPU")

    files = _results(out, "q1-speed")
    eager = _one(files, "results/eager/bench-cpu-eager-", ".json")
    assert [(e["backend"], e["precision"], e["status"]) for e in eager["engines"]] == [
        ("torch", "fp32", "ok"), ("torch", "bf16", "ok")]
    ds = eager["recall"]["dataset"]  # parity on the carried slice, all of it
    assert ds["generated"] is False and ds["n_images"] == 12 and ds["n_classes"] == 6
    assert eager["config"]["batch_sizes"] == [4] and eager["environment"]["git_revision"] == "abc123"  # no .git there
    assert eager["config"]["real_captions"] is True  # texts on the slice's captions
    assert all(t["tokens"] < 77 for t in eager["timings"] if t["tower"] == "text")
    tf32 = _one(files, "results/tf32/bench-cpu-eager-tf32-", ".json")
    assert "TF32 ON" in tf32["config"]["note"] and [e["backend"] for e in tf32["engines"]] == ["torch"]
    kb = json.loads(files["results/kbench/kernels.json"])
    assert kb["dry_run"] and {r["variant"] for r in kb["rows"]} >= {"eager", "fused b64/w2", "op"}
    assert "results/kernels/junit.xml" in files  # the kernel tests ran (on CPU every one is gpu-marked: skipped)
    fused = _one(files, "results/fused/bench-cpu-fused-", ".json")
    assert [(e["backend"], e["precision"], e["status"]) for e in fused["engines"]] == [("fused", "fp32", "ok")]
    compiled = _one(files, "results/compiled/bench-cpu-compiled-", ".json")
    assert compiled["config"]["compile_mode"] == "reduce-overhead" and compiled["config"]["compile_dynamic"] is True
    assert "results/env.txt" in files and any(k.startswith("logs/eager") for k in files)
    summary = (out / "q1-speed-summary.md").read_text()
    assert "| eager | ok |" in summary and "## eager/bench-cpu-eager-" in summary
    # what the call prints last fits the device tool's 12,000-character output tail, the step table included
    brief = r.stdout[r.stdout.rindex("# GPU queue entry"):]
    assert len(brief) < 12_000 and "| compiled | ok |" in brief and "## eager/bench-cpu-eager-" in brief

    # filed under benchmarks/results/gpu/ with the status (device, versions, command, revision, date)
    res = tmp_path / "results"
    r = subprocess.run([sys.executable, str(GPU / "collect.py"), str(out), "--results", str(res)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (dest,) = (res / "gpu").iterdir()
    assert dest.name.startswith("q1-speed-cpu-") and (dest / "status.json").is_file() and (dest / "summary.md").is_file()
    assert list((dest / "eager").glob("bench-cpu-eager-*.json")) and not (dest / "logs").exists()
    assert "last run: " in r.stdout and "6 ok, 1 skipped" in r.stdout and f"results: `{dest}/`" in r.stdout


def test_q4_autotune_dry_run(slice_dir, tmp_path):
    """Entry 4 on CPU with the tiny model: one bench step, fused first, real captions, the compile mode recorded
    (torch stands in for torch.compile here: max-autotune on a CPU would take minutes)."""
    env = _env(tmp_path, DATA=slice_dir, Q4_ENGINES="fused:fp32,torch:fp32", PRIORCLIP_GIT_REVISION="abc123")
    _, out, status = dry_run("q4-autotune", env)
    assert [(s["name"], s["state"]) for s in status["steps"]] == [("bench", "ok")]
    bench = _one(_results(out, "q4-autotune"), "results/bench/bench-cpu-autotune-", ".json")
    assert [(e["backend"], e["precision"], e["status"]) for e in bench["engines"]] == [
        ("fused", "fp32", "ok"), ("torch", "fp32", "ok")]
    assert bench["config"]["real_captions"] is True and bench["config"]["compile_mode"] == "max-autotune"
    assert bench["config"]["batch_sizes"] == [4]


def test_q6_pae_dry_run(slice_dir, tmp_path):
    """Entry 6 on CPU with pir-tiny: the kernel tests (every one gpu-marked, so skipped here), the PAE kernel bench
    under the interpreter at a tiny shape, and one bench step with PIR's fused engine first, on the slice's real
    captions (torch stands in for torch.compile: compiling PIR on two cores would take minutes)."""
    env = _env(tmp_path, DATA=slice_dir, MODEL="pir-tiny", Q6_ENGINES="fused:fp32,torch:fp32",
               PRIORCLIP_GIT_REVISION="abc123", KB_BATCHES="2", KB_DTYPES="fp32", KB_ITERS="1",
               KB_ARGS="--pae-shape 32,2,10,7")
    r, out, status = dry_run("q6-pae", env)
    assert [(s["name"], s["state"]) for s in status["steps"]] == [("kernels", "ok"), ("kbench", "ok"), ("bench", "ok")]
    assert [s["note"] for s in status["steps"]] == [None] * 3, status["steps"]  # no engine failed or fell outside
    assert "Q6_ENGINES=fused:fp32,torch:fp32" in status["command"] and "q6-pae.sh" in status["command"]
    files = _results(out, "q6-pae")
    junit = files["results/kernels/junit.xml"].decode()
    assert 'skipped="0"' not in junit and 'errors="0"' in junit and 'failures="0"' in junit  # ran, all skipped
    for name in ("test_vir_filter", "test_pae_linear", "test_pae_attention", "test_pae_blocks", "test_fused_pir"):
        assert name in junit, name  # every file of the step was collected
    kb = json.loads(files["results/kbench/kernels.json"])  # the PAE section only, at the tiny shape passed in
    assert kb["dry_run"] and kb["kernels"] == ["pae"] and kb["pae_shape"]["e"] == 32
    assert {r["block"] for r in kb["rows"]} >= {"filter", "vir", "lca"} and {r["batch"] for r in kb["rows"]} == {2}
    bench = _one(files, "results/bench/bench-cpu-pae-", ".json")
    assert [(e["backend"], e["precision"], e["status"]) for e in bench["engines"]] == [
        ("fused", "fp32", "ok"), ("torch", "fp32", "ok")]
    assert bench["config"]["real_captions"] is True and bench["config"]["compile_mode"] == "reduce-overhead"
    assert bench["config"]["batch_sizes"] == [4] and bench["config"]["compile_dynamic"] is True
    assert bench["recall"]["dataset"]["n_images"] == 12 and bench["environment"]["git_revision"] == "abc123"
    brief = r.stdout[r.stdout.rindex("# GPU queue entry"):]
    assert len(brief) < 12_000 and "| bench | ok |" in brief


def test_q6_runs_only_the_steps_asked_for(slice_dir, tmp_path):
    """Q6_STEPS: a later session runs what a time limit cut; the others are recorded as skipped, with the reason."""
    env = _env(tmp_path, DATA=slice_dir, MODEL="pir-tiny", Q6_STEPS="kernels")
    _, _, status = dry_run("q6-pae", env)
    assert [(s["name"], s["state"], s["note"]) for s in status["steps"]] == [
        ("kernels", "ok", None), ("kbench", "skipped", "not in Q6_STEPS"), ("bench", "skipped", "not in Q6_STEPS")]


@pytest.mark.parametrize("entry,script", [("4", "q4-autotune.sh"), ("6", "q6-pae.sh")])
def test_calls_plans_one_call_entries(entry, script):
    calls = _module("calls")
    (call,) = calls.plan(entry, "abc")
    assert call == {"carry": [".bench-data", ".whl"], "timeout_s": calls.RUN_TIMEOUT_S,
                    "command": f"PRIORCLIP_GIT_REVISION=abc bash benchmarks/gpu/{script}"}
    assert (GPU / script).is_file()
    with pytest.raises(SystemExit, match=r"unknown entry '8' \(1, 2, 3, 4, 5, 6 or 7\)"):
        calls.plan("8", "abc")


def test_q1_errors_are_one_line(slice_dir, tmp_path):
    r = subprocess.run(["bash", str(GPU / "q1-speed.sh")], env=_env(tmp_path, DATA=tmp_path / "nowhere"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "stage.py slice" in r.stderr and r.stderr.startswith("Error:")
    # the GPU image has no ftfy: without its wheel in .whl/ the entry stops at once, before any GPU work
    fake = tmp_path / "block"
    fake.mkdir()
    (fake / "ftfy.py").write_text("raise ImportError('ftfy is not installed here')\n")
    env = _env(tmp_path, DATA=slice_dir, PYTHONPATH=fake)
    r = subprocess.run(["bash", str(GPU / "q1-speed.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs ftfy" in r.stderr and ".whl" in r.stderr
    assert json.loads((tmp_path / "out" / "q1-speed-status.json").read_text())["steps"] == []


def _fake_wheel(folder: Path, name: str = "priorclip_fake_dep", version: str = "1.0") -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VERSION = '1.0'\n" + "# padding\n" * 4000,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def _chunk(wheels: list[Path], root: Path, part_bytes: int) -> tuple[Path, Path]:
    """The layout ../shared/tools/wheel-chunks makes: parts of the concatenated wheels in .chunk1..N, names.txt and
    sizes.txt beside the last; the earlier parts copied to a chunks folder as its printed calls do."""
    blob = b"".join(w.read_bytes() for w in wheels)
    parts = [blob[i:i + part_bytes] for i in range(0, len(blob), part_bytes)]
    chunks = root / "chunks"
    chunks.mkdir()
    last = root / f".chunk{len(parts)}"
    last.mkdir()
    for i, p in enumerate(parts):
        name = f"part.a{chr(ord('a') + i)}"
        ((last if i == len(parts) - 1 else chunks) / name).write_bytes(p)
    (last / "names.txt").write_text("".join(f"{w.name}\n" for w in wheels))
    (last / "sizes.txt").write_text("".join(f"{w.stat().st_size}\n" for w in wheels))
    return chunks, last / "names.txt"


def test_wheel_parts_missing_part_is_named(tmp_path):
    wheel = _fake_wheel(tmp_path)
    chunks, names = _chunk([wheel], tmp_path, part_bytes=wheel.stat().st_size // 3 + 1)
    (chunks / "part.ab").unlink()
    r = subprocess.run([sys.executable, str(GPU / "wheels.py"), "--names", str(names), "--parts", str(chunks),
                        "--site", str(tmp_path / "site"), "--work", str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode != 0 and "part is missing" in r.stderr and "part.aa, part.ac" in r.stderr
    assert not (tmp_path / "site").exists()


def test_setup_installs_carried_wheels(slice_dir, tmp_path):
    """The GPU image lacks ftfy: a wheel carried in .whl/ is installed into Q_SITE ahead of everything else on
    PYTHONPATH, so the ftfy check passes and the steps import it (here an ftfy that is blocked otherwise)."""
    whl = tmp_path / "wheels"
    whl.mkdir()
    _fake_wheel(whl, name="ftfy", version="6.3.1")
    block = tmp_path / "block"
    block.mkdir()
    (block / "ftfy.py").write_text("raise ImportError('ftfy is not installed here')\n")
    script = tmp_path / "entry.sh"
    script.write_text(f"""set -uo pipefail
. {GPU / 'lib.sh'}
q_init q9-test
q_setup
q_step check 60 "$PY" -c "import ftfy, sys; print('ftfy from', ftfy.__file__); sys.exit(ftfy.VERSION != '1.0')"
q_finish
""")
    env = _env(tmp_path, WHL_DIR=whl, PYTHONPATH=block, DEVICE="cpu")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "ftfy" / "__init__.py").is_file()
    assert f"ftfy from {tmp_path / 'site' / 'ftfy' / '__init__.py'}" in r.stdout
    status = json.loads((tmp_path / "out" / "q9-test-status.json").read_text())
    assert status["steps"][0]["state"] == "ok" and status["environment"]["ftfy"] == "?"  # the fake has no __version__
    assert "pip could not" not in (tmp_path / "work" / "logs" / "pip-whl.log").read_text()


def test_q3_ort_dry_run(slice_dir, tmp_path):
    wheel = _fake_wheel(tmp_path)
    chunks, names = _chunk([wheel], tmp_path, part_bytes=wheel.stat().st_size // 3 + 1)
    env = _env(tmp_path, DATA=slice_dir, NAMES=names, CHUNKS_DIR=chunks, ENGINES="onnxruntime:fp16",
               EXPORT_VARIANTS="fp16")
    _, out, status = dry_run("q3-ort-cuda", env)
    assert [(s["name"], s["state"]) for s in status["steps"]] == [
        ("wheels", "ok"), ("preflight", "ok"), ("bench", "ok"), ("export-fp16", "ok")]
    assert all(s["note"] is None for s in status["steps"])  # no engine failed
    assert (tmp_path / "site" / "priorclip_fake_dep" / "__init__.py").is_file()  # the parts, put back, installed
    files = _results(out, "q3-ort-cuda")
    pre = json.loads(files["results/preflight/preflight.json"])
    assert pre["ok"] and pre["session_providers"][0] == "CPUExecutionProvider"
    bench = _one(files, "results/bench/bench-cpu-ort-", ".json")
    assert [(e["backend"], e["precision"], e["status"]) for e in bench["engines"]] == [("onnxruntime", "fp16", "ok")]
    assert "--calib-images 256 --calib-captions 1024" in bench["environment"]["command"]  # as the export steps
    export = _one(files, "results/export-fp16/export-parity-cpu-ort-fp16-", ".json")
    (name,) = export["reports"]
    assert name.startswith("onnx-fp16") and export["reports"][name]["n_images"] == 12
    assert "12 images over 6" in export["held_out"]


@pytest.mark.skipif(_has_cuda_provider(), reason="onnxruntime here has a CUDA provider: nothing falls back")
def test_q3_stops_when_onnxruntime_falls_back_to_cpu(slice_dir, tmp_path):
    """No CUDA provider (here: no GPU at all): the preflight fails and no export time is spent."""
    env = _env(tmp_path, DATA=slice_dir, NAMES="", DEVICE="cuda")
    r = subprocess.run(["bash", str(GPU / "q3-ort-cuda.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    status = json.loads((tmp_path / "out" / "q3-ort-cuda-status.json").read_text())
    states = {s["name"]: s["state"] for s in status["steps"]}
    assert states["wheels"] == "skipped" and states["preflight"] == "failed"
    assert all(states[s] == "skipped" for s in ("bench", "export-int8-minmax", "export-int8-percentile"))
    pre = json.loads(_results(tmp_path / "out", "q3-ort-cuda")["results/preflight/preflight.json"])
    assert pre["ok"] is False and "CUDAExecutionProvider" in pre["message"]


def test_trained_parity_writes_each_precision(tmp_path, monkeypatch):
    """fp16/bf16 on trained-checkpoint weights, and the int8 branch (calibrated on the train split, never the test
    split) with its engine stubbed: every precision's result is in the JSON, and a failing one does not lose the rest."""
    import torch

    trained_parity = _module("trained_parity")

    from priorclip.serve import engines

    from priorclip.checkpoint import save_checkpoint
    from priorclip.registry import create_model

    data = tmp_path / "data"
    json_path, _ = make_sample(data, n_images=12, size=64, seed=0, split="test")
    doc = json.loads(json_path.read_text())
    for i, e in enumerate(doc["images"]):
        e["split"] = "test" if i < 8 else "train"
    json_path.write_text(json.dumps(doc))
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "model.pt"
    ckpt.parent.mkdir()
    save_checkpoint(create_model("priorclip-tiny"), ckpt)
    (ckpt.parent / "summary.json").write_text(json.dumps({"steps": 7, "planned_steps": 7, "stopped": None}))

    real = engines.create_engine
    seen = {}

    def fake(backend, model, precision, device, calib=None, **kw):
        if precision == "int8":
            seen["calib"] = [p.name for p in calib.images]
            raise RuntimeError("int8 export broke")
        return real(backend, model, precision, device, **kw)

    monkeypatch.setattr(engines, "create_engine", fake)
    rc = trained_parity.main(["--checkpoint", str(ckpt), "--data", str(data), "--precisions", "fp16,bf16,int8",
                              "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 1  # int8 failed; fp16 and bf16 are kept
    doc = json.loads((tmp_path / "out" / "trained-parity.json").read_text())
    assert set(doc["reports"]) == {"torch-fp16 (autocast, cpu)", "torch-bf16 (autocast, cpu)"}
    rep = doc["reports"]["torch-bf16 (autocast, cpu)"]
    assert rep["n_images"] == 8 and rep["precision"] == "bf16" and "passed" in rep and "belief_order" in rep
    assert doc["trained"]["steps"] == 7 and doc["dataset"]["n_images"] == 8 and doc["dataset"]["split"] == "test"
    assert "int8 export broke" in doc["errors"]["onnxruntime-int8 (CPU provider)"]
    assert len(seen["calib"]) == 4 and all(int(n.split("_")[1].split(".")[0]) >= 8 for n in seen["calib"])
    md = (tmp_path / "out" / "trained-parity.md").read_text()
    assert "torch-bf16 (autocast, cpu)" in md and "could not run" in md
    assert trained_parity.main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(data),
                                "--out", str(tmp_path / "o2")]) == 2


def test_calls_checks_sizes_and_staging(tmp_path, monkeypatch, capsys):
    calls = _module("calls")
    monkeypatch.setattr(calls, "ROOT", tmp_path)
    monkeypatch.setattr(calls, "tree_bytes", lambda: 3 << 20)
    with pytest.raises(SystemExit, match="stage.py train"):
        calls.plan("2", "abc")
    for i, mib in ((1, 50), (2, 62), (3, 5)):
        (tmp_path / f".dtrain{i}").mkdir()
        (tmp_path / f".dtrain{i}" / f"part.0{i - 1}").write_bytes(b"\0" * (mib << 20))
    (tmp_path / ".dtrain3" / "parts.json").write_text("{}")
    plan = calls.plan("2", "abc123")
    assert [c["carry"] for c in plan] == [[".dtrain1"], [".dtrain2"], [".dtrain3", ".whl"]]
    assert plan[0]["command"] == "mkdir -p /tmp/dparts && cp .dtrain1/part.* /tmp/dparts/ && ls -l /tmp/dparts"
    assert plan[-1]["command"] == "PRIORCLIP_GIT_REVISION=abc123 bash benchmarks/gpu/q2-train.sh"
    assert plan[-1]["timeout_s"] == 540 and set(plan[-1]) == {"carry", "command", "timeout_s"}  # ready for run
    pir = calls.plan("5", "abc123")  # entry 5 trains PIR on the same staged parts
    assert pir[:-1] == plan[:-1] and pir[-1] == {**plan[-1], "command": "PRIORCLIP_GIT_REVISION=abc123 bash "
                                                                        "benchmarks/gpu/q5-pir.sh"}
    errors, sizes = calls.check(plan)
    assert any("call 2 would send 65.0 MiB" in e for e in errors)  # 62 + the 3 MiB tree: over 64
    assert any("no ftfy wheel" in e for e in errors) and any(".whl, which does not exist" in e for e in errors)
    assert sizes[0] == 53.0


def _stage_hey(folder: Path) -> Path:
    """.whl/serve as the README stages it, without the wheels (the CPU venv has the service's packages; the staged
    pydantic-core is built for the GPU image's Python 3.12): hey gzip'd, and its version."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hey.gz").write_bytes(gzip.compress(Path(shutil.which("hey")).read_bytes()))
    (folder / "hey.version").write_text("hey 0.1.4-2+b4 (Debian package)")
    return folder


@pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed (apt-get install hey)")
def test_q7_serve_dry_run(slice_dir, tmp_path):
    """Entry 7 on CPU with the tiny model and its ONNX Runtime engine (the one with the most plumbing: the preflight,
    one export served by --engine; tests/bench/test_serve_load.py runs a torch engine end to end): the carried hey
    unpacked and used, the slice's median image and caption drawn, the report in the results."""
    env = _env(tmp_path, DATA=slice_dir, NAMES="", SERVE_WHL=_stage_hey(tmp_path / "serve"),
               Q7_ENGINES="onnxruntime:fp32", PRIORCLIP_GIT_REVISION="abc123",
               SL_ARGS="--quick --concurrency 2 --no-cached-run --kinds text")
    r, out, status = dry_run("q7-serve", env)
    assert [(s["name"], s["state"]) for s in status["steps"]] == [
        ("serve-wheels", "skipped"), ("ort-wheel", "skipped"), ("preflight", "ok"), ("serve-onnxruntime-fp32", "ok")]
    assert "Q7_ENGINES=onnxruntime:fp32" in status["command"] and "q7-serve.sh" in status["command"]
    assert "could not run" not in (status["steps"][-1]["note"] or "")  # a FAIL verdict may be named, not a failed run
    files = _results(out, "q7-serve")
    doc = _one(files, "results/serve-onnxruntime-fp32/serve-load-cpu-onnxruntime-", ".json")
    assert doc["status"] == "done" and not doc["errors"] and doc["offline"]["engine"] == "onnxruntime/fp32"
    assert [(x["kind"], x["concurrency"], x["cached"]) for x in doc["runs"]] == [("text", 2, False)]
    assert doc["runs"][0]["ok"] == doc["runs"][0]["requested"] and doc["runs"][0]["service"]["items"] > 0
    assert doc["servers"]["cache_off"]["command"].startswith("priorclip-serve --engine ")  # the export made offline
    assert doc["inputs"]["chosen_by"] == "--dataset" and "6 images over 6" in doc["inputs"]["draw"]
    hey = doc["environment"]["hey"]  # the carried binary: identified by its staged version and its digest
    assert hey["version"] == "hey 0.1.4-2+b4 (Debian package)" and hey["path"].endswith("/bin/hey")
    assert hey["sha256"] == hashlib.sha256(Path(shutil.which("hey")).read_bytes()).hexdigest()
    assert doc["environment"]["git_revision"] == "abc123" and "queue entry 7" in doc["note"]
    assert any(n.startswith("results/serve-onnxruntime-fp32/serve-load-") and n.endswith(".md") for n in files)
    brief = r.stdout[r.stdout.rindex("# GPU queue entry"):]
    assert len(brief) < 12_000 and "| serve-onnxruntime-fp32 | ok |" in brief


@pytest.mark.skipif(_has_cuda_provider(), reason="onnxruntime here has a CUDA provider: nothing falls back")
def test_q7_skips_onnxruntime_when_it_falls_back_to_cpu(slice_dir, tmp_path):
    """No CUDA provider (here: no GPU at all): the ONNX Runtime engine is skipped with the reason, no time spent."""
    env = _env(tmp_path, DATA=slice_dir, NAMES="", DEVICE="cuda", HEY=shutil.which("hey") or "/usr/bin/hey",
               Q7_ENGINES="onnxruntime:fp16", SERVE_WHL=tmp_path / "empty")
    r = subprocess.run(["bash", str(GPU / "q7-serve.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the preflight failed
    status = json.loads((tmp_path / "out" / "q7-serve-status.json").read_text())
    assert [(s["name"], s["state"]) for s in status["steps"]] == [
        ("serve-wheels", "skipped"), ("ort-wheel", "skipped"), ("preflight", "failed"),
        ("serve-onnxruntime-fp16", "skipped")]
    assert "does not run on the cuda provider" in status["steps"][-1]["note"]


def test_q7_needs_the_load_tool(slice_dir, tmp_path):
    env = _env(tmp_path, DATA=slice_dir, SERVE_WHL=tmp_path / "empty")
    env.pop("HEY", None)
    r = subprocess.run(["bash", str(GPU / "q7-serve.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("Error: no load tool") and "hey.gz" in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_calls_plans_entry_7(tmp_path, monkeypatch):
    """Entry 7: entry 3's part calls, then q7-serve.sh with the last part, the slice and .whl; staging checked."""
    calls = _module("calls")
    monkeypatch.setattr(calls, "ROOT", tmp_path)
    monkeypatch.setattr(calls, "tree_bytes", lambda: 3 << 20)
    with pytest.raises(SystemExit, match="wheel-chunks onnxruntime-gpu"):
        calls.plan("7", "abc")
    for i in (1, 2):
        (tmp_path / f".chunk{i}").mkdir()
        (tmp_path / f".chunk{i}" / f"part.a{'ab'[i - 1]}").write_bytes(b"\0" * (1 << 20))
    (tmp_path / ".chunk2" / "names.txt").write_text("onnxruntime_gpu.whl\n")
    plan = calls.plan("7", "abc123")
    assert plan == [{"carry": [".chunk1"], "timeout_s": calls.COPY_TIMEOUT_S,
                     "command": "mkdir -p /tmp/chunks && cp .chunk1/part.* /tmp/chunks/ && ls -l /tmp/chunks"},
                    {"carry": [".chunk2", ".bench-data", ".whl"], "timeout_s": calls.RUN_TIMEOUT_S,
                     "command": "PRIORCLIP_GIT_REVISION=abc123 bash benchmarks/gpu/q7-serve.sh"}]
    (tmp_path / ".bench-data").mkdir()
    serve = tmp_path / ".whl" / "serve"
    serve.mkdir(parents=True)
    for name in ("ftfy-6.3.1-py3-none-any.whl", "wcwidth-0.9.4-py3-none-any.whl"):
        (tmp_path / ".whl" / name).write_bytes(b"w")
    errors, _ = calls.check(plan)
    assert len(errors) == 2 and "python-multipart==0.0.34" in errors[0] and "-d .whl/serve" in errors[0]
    assert "gzip -9 -c /usr/bin/hey > .whl/serve/hey.gz" in errors[1]
    for spec in calls.SERVE_WHEELS:
        name, version = spec.split("==")
        (serve / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"w")
    (serve / "hey.gz").write_bytes(b"h")
    errors, sizes = calls.check(plan)
    assert errors == [] and sizes == [4.0, 4.0]
    assert calls.check(calls.plan("3", "abc123"))[0] == []  # entry 3 carries .whl too, but needs no service
