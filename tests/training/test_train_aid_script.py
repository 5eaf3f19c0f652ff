"""benchmarks/gpu/train_aid.sh end to end with the tiny configs on generated data (CPU), so the GPU run works first time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.training.conftest import make_tiny

REPO = Path(__file__).resolve().parents[2]


def test_all_phases_and_report(tmp_path):
    data = tmp_path / "data"
    make_tiny(data, n_images=12, size=64)
    env = dict(os.environ, MODEL="priorclip-tiny", CLIP_MODEL="clip-tiny", EPOCHS="1", BATCH="20", WARMUP="1",
               PRIOR_EPOCHS="1", PRIOR_BATCH="8", PRECISION="fp32", WORKERS="0", DEVICE="cpu", DATA_JSON="dataset.json",
               RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    script = REPO / "benchmarks" / "gpu" / "train_aid.sh"
    r = subprocess.run(["bash", str(script), "all", str(data)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    rep = json.loads((out / "train-aid-results.json").read_text())
    assert set(rep["runs"]) == {"priorclip", "noaff", "clip"}
    assert rep["runs"]["priorclip"]["affiliation_loss"] is True and rep["runs"]["noaff"]["affiliation_loss"] is False
    assert rep["runs"]["priorclip"]["prior_checkpoint"].endswith("prior.pt")
    assert rep["runs"]["clip"]["model"] == "clip-tiny" and rep["runs"]["clip"]["test"]["mR"] >= 0
    assert rep["prior"]["n_classes"] == 6 and "test_top1" in rep["prior"]["metrics"]
    assert (out / "train-aid-curves.png").stat().st_size > 10_000
    md = (out / "train-aid-results.md").read_text()
    assert "| plain CLIP (no prior/gate" in md and "test top-1" in md
    for phase in ("prior", "priorclip", "noaff", "clip"):  # what comes back from a device call: 3 files a phase
        assert len(list((out / phase).iterdir())) == 3 and (out / phase / "metrics.jsonl").is_file(), phase
    # the report can be rebuilt elsewhere from those copies alone
    r = subprocess.run(["bash", str(script), "report"], env=dict(env, REPORT_FROM=str(out), OUT=str(tmp_path / "again")),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "again" / "train-aid-results.json").read_text())
    assert again["runs"]["priorclip"]["test"] == rep["runs"]["priorclip"]["test"]
    # a clear error when the data folder is wrong, and when the prior is missing
    r = subprocess.run(["bash", str(script), "clip", str(tmp_path / "nowhere")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr
    env["RUNS"] = str(tmp_path / "fresh")
    r = subprocess.run(["bash", str(script), "priorclip", str(data)], env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "run the 'prior' phase first" in r.stderr
