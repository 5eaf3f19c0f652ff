"""GPU queue entry 2 (benchmarks/gpu/q2-train.sh, driving train_aid.sh and train_aid_report.py) end to end with the
tiny configs on generated data (CPU), so the GPU call works first time: the staged data parts, the phases, parity on
the trained weights, the report, the three files that come back, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.bench.test_gpu_queue import dry_run
from tests.training.conftest import make_tiny
from tests.training.test_trainer import _recall_by_hand

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"
TINY = dict(MODEL="priorclip-tiny", CLIP_MODEL="clip-tiny", EPOCHS="1", BATCH="20", LR_WARMUP="1", PRIOR_EPOCHS="1",
            PRIOR_BATCH="8", PRECISION="fp32", WORKERS="0", DEVICE="cpu")


def _env(tmp_path: Path, **kw) -> dict:
    env = dict(os.environ, **TINY, PYTHON=sys.executable, OUT=str(tmp_path / "out"), Q_WORK=str(tmp_path / "work"),
               Q_SITE=str(tmp_path / "site"), WHL_DIR=str(tmp_path / "no-wheels"), DATA_ROOT=str(tmp_path / "data"),
               PARTS_DIR=str(tmp_path / "dparts"))
    env.update({k: str(v) for k, v in kw.items()})
    return env


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """The tiny data set staged as stage.py stages AID/RSICD for the device: three parts, parts.json in the last."""
    root = tmp_path_factory.mktemp("stage")
    make_tiny(root / "src", n_images=24, size=64)
    r = subprocess.run([sys.executable, str(GPU / "stage.py"), "train", "--src", str(root / "src"), "--out-root",
                        str(root), "--part-mib", "0.02"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "python benchmarks/gpu/calls.py 2" in r.stdout  # the one place that prints the device calls
    return root


def _copy_parts(staged: Path, dparts: Path, skip: str | None = None) -> Path:
    """What the data calls do: every part but the last into the parts folder. Returns the last folder's manifest."""
    man = json.loads(next(staged.glob(".dtrain*/parts.json")).read_text())
    dparts.mkdir()
    for p in man["parts"][:-1]:
        if p["name"] != skip:
            shutil.copy(staged / p["folder"] / p["name"], dparts)
    return staged / man["parts"][-1]["folder"] / "parts.json"


def test_staged_parts(staged):
    man = json.loads(next(staged.glob(".dtrain*/parts.json")).read_text())
    assert len(man["parts"]) >= 3 and all(p["bytes"] <= 0.02 * (1 << 20) + 1 for p in man["parts"])
    assert man["splits"]["train"]["n_images"] == 16 and man["splits"]["test"]["n_images"] == 4
    assert man["splits"]["val"]["n_images"] == 4  # the val subset (class-spread; here the whole small split)
    assert [p["folder"] for p in man["parts"]] == [f".dtrain{i + 1}" for i in range(len(man["parts"]))]


def test_q2_train_dry_run(staged, tmp_path):
    manifest = _copy_parts(staged, tmp_path / "dparts")
    env = _env(tmp_path, MANIFEST=manifest, INT8_MIN_S="100000", PRIORCLIP_GIT_REVISION="rev42")
    _, out, status = dry_run("q2-train", env)
    steps = {s["name"]: s for s in status["steps"]}
    assert [s["name"] for s in status["steps"]] == ["data", "prior", "priorclip", "clip", "parity", "int8", "report"]
    assert all(steps[n]["state"] == "ok" for n in ("data", "prior", "priorclip", "clip", "parity", "report"))
    assert steps["int8"]["state"] == "skipped" and "INT8_MIN_S" in steps["int8"]["note"]
    assert status["revision"] == "rev42" and status["finished"]
    assert "LR_WARMUP=1" in status["command"] and "EPOCHS=1" in status["command"]  # the knobs the call set
    for phase in ("prior", "priorclip", "clip"):  # the phase's 3 small files, in the archive
        assert len(steps[phase]["files"]) == 3 and f"{phase}/metrics.jsonl" in steps[phase]["files"]

    res = tmp_path / "res"
    with tarfile.open(out / "q2-train-results.tar.gz") as tar:
        tar.extractall(res)
    # the trainers' own metrics too, which survive a phase killed before train_aid.sh copies its files
    assert all((res / "runs" / phase / "metrics.jsonl").is_file() for phase in ("prior", "priorclip", "clip"))
    rep = json.loads((res / "results" / "report" / "train-aid-results.json").read_text())
    assert set(rep["runs"]) == {"priorclip", "clip"}
    pc, clip = rep["runs"]["priorclip"], rep["runs"]["clip"]
    assert pc["affiliation_loss"] is True and pc["prior_checkpoint"].endswith("prior.pt")
    assert clip["model"] == "clip-tiny" and clip["affiliation_loss"] is False
    data = tmp_path / "data" / "aid-rsicd"  # each run's reported test recalls are its saved weights', recomputed here
    for name, run in (("priorclip", pc), ("clip", clip)):
        want = _recall_by_hand(tmp_path / "work" / "runs" / name / "model.pt", data / "dataset_rsicd_aid.json",
                               data / "images", "test")
        assert {k: run["test"][k] for k in want} == pytest.approx(want, abs=1e-9), name
    assert pc["steps"] == clip["steps"] == pc["planned_steps"]  # the same budget, not cut by a cap
    assert "--max-wall-min" in pc["command"] and pc["samples_per_s"] > 0 and pc["wall_seconds"] > 0
    assert rep["prior"]["n_classes"] == 6 and "test_top1" in rep["prior"]["metrics"]
    assert set(rep["parity"]) == {"torch-fp16 (autocast, cpu)", "torch-bf16 (autocast, cpu)"}
    assert rep["parity"]["torch-bf16 (autocast, cpu)"]["n_images"] == 4  # the whole test split
    assert (res / "results" / "report" / "train-aid-curves.png").stat().st_size > 10_000
    md = (res / "results" / "report" / "train-aid-results.md").read_text()
    assert "| plain CLIP (no prior/gate" in md and "test top-1" in md and "Reduced precision on the trained" in md
    assert "rev42" in md
    parity = json.loads((res / "results" / "parity" / "trained-parity.json").read_text())
    assert parity["checkpoint"].endswith("priorclip/model.pt") and parity["dataset"]["split"] == "test"

    # the report can be rebuilt here from the copies that came back alone
    r = subprocess.run(["bash", str(GPU / "train_aid.sh"), "report"],
                       env=_env(tmp_path, REPORT_FROM=res / "results", OUT=tmp_path / "again"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "again" / "train-aid-results.json").read_text())
    assert again["runs"]["priorclip"]["test"] == pc["test"] and again["parity"] == rep["parity"]

    # the phase runner's other phases use the same budget: the contrastive-only ablation from the same prior
    runs = tmp_path / "work" / "runs"
    r = subprocess.run(["bash", str(GPU / "train_aid.sh"), "noaff", str(tmp_path / "data" / "aid-rsicd")],
                       env=_env(tmp_path, RUNS=runs, OUT=tmp_path / "noaff-out", DATA_JSON="dataset_rsicd_aid.json"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    noaff = json.loads((tmp_path / "noaff-out" / "noaff" / "summary.json").read_text())
    assert noaff["affiliation_loss"] is False and noaff["steps"] == pc["steps"]


def test_q2_missing_data_part_is_named(staged, tmp_path):
    manifest = _copy_parts(staged, tmp_path / "dparts", skip="part.01")
    r = subprocess.run(["bash", str(GPU / "q2-train.sh")], env=_env(tmp_path, MANIFEST=manifest),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no dataset at" in r.stderr
    status = json.loads((tmp_path / "out" / "q2-train-status.json").read_text())
    (data,) = status["steps"]
    assert data["name"] == "data" and data["state"] == "failed" and data["rc"] == 3
    assert "part.01 (2 of" in data["note"] and "back to back" in data["note"]
    # without any carried manifest, the call stops before anything else
    r = subprocess.run(["bash", str(GPU / "q2-train.sh")], env=_env(tmp_path, MANIFEST=""), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("Error:") and "stage.py train" in r.stderr


def test_train_aid_errors(tmp_path):
    script = GPU / "train_aid.sh"
    env = _env(tmp_path, RUNS=tmp_path / "runs", DATA_JSON="dataset.json")
    r = subprocess.run(["bash", str(script), "clip", str(tmp_path / "nowhere")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr
    data = tmp_path / "d"
    make_tiny(data, n_images=12, size=32)
    r = subprocess.run(["bash", str(script), "priorclip", str(data)], env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "run the 'prior' phase first" in r.stderr
    r = subprocess.run(["bash", str(script), "bogus", str(data)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown phase 'bogus'" in r.stderr
