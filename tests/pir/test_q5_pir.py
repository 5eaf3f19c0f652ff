"""GPU queue entry 5 (benchmarks/gpu/q5-pir.sh) dry-run on CPU with pir-tiny and the tiny staged data: every step in
order, the PIR prior and retrieval runs through train_aid.sh's phases, parity and the report. timm cannot be
imported here, so the Swin-vs-timm step is skipped (SWIN=0; the script's own one-line refusal without timm is tested
in test_swin.py)."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.bench.test_gpu_queue import dry_run
from tests.training import test_train_aid_script as aid

staged = aid.staged  # the tiny data staged as for the device (a fixture)


def _pir_recall_by_hand(model_path, json_path, img_dir, split):
    """R@1/5/10 and mR of a saved PIR model re-derived here by spec §6B: the split's images in file order, squashed to
    the input size, captions tokenised in chunks of 128 in order, 0-based ranks with ties to the lower index."""
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from priorclip import create_model
    from priorclip.transforms import OPENAI_MEAN, OPENAI_STD, open_image
    from priorclip.wordpiece import pir_tokenizer

    entries = [e for e in json.loads(Path(json_path).read_text())["images"] if e["split"] == split]
    caps = [s["raw"] for e in entries for s in e["sentences"]]
    owner = [i for i, e in enumerate(entries) for _ in e["sentences"]]
    model = create_model(checkpoint=model_path).eval()
    s = model.image_size

    def pixels(e):
        img = open_image(Path(img_dir) / e["filename"]).convert("RGB").resize((s, s), Image.Resampling.BICUBIC)
        a = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
        return torch.from_numpy(a).permute(2, 0, 1)

    tok = pir_tokenizer(model.context_length)
    with torch.no_grad():
        img = model.encode_image(torch.stack([pixels(e) for e in entries])).double()
        txt = torch.cat([model.encode_text(tok(caps[i:i + 128])) for i in range(0, len(caps), 128)]).double()
    scores = (img @ txt.T).tolist()

    def rank(row, j):
        return sum(1 for k, v in enumerate(row) if v > row[j] or (v == row[j] and k < j))

    i2t = [min(rank(scores[i], c) for c in range(len(caps)) if owner[c] == i) for i in range(len(entries))]
    t2i = [rank([scores[i][c] for i in range(len(entries))], owner[c]) for c in range(len(caps))]
    out = {f"{d}_R@{k}": 100.0 * sum(r < k for r in ranks) / len(ranks)
           for d, ranks in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    out["mR"] = sum(out.values()) / 6
    return out


def test_q5_pir_dry_run(staged, tmp_path):
    manifest = aid._copy_parts(staged, tmp_path / "dparts")
    env = aid._env(tmp_path, MANIFEST=manifest, PIR_MODEL="pir-tiny", PRIORCLIP_GIT_REVISION="rev5", SWIN=0)
    _, out, status = dry_run("q5-pir", env)
    steps = {s["name"]: s for s in status["steps"]}
    assert [s["name"] for s in status["steps"]] == ["data", "swin", "pirprior", "pir", "parity", "report"]
    assert all(steps[n]["state"] == "ok" for n in ("data", "pirprior", "pir", "parity", "report")), steps
    assert steps["swin"]["state"] == "skipped" and "SWIN=0" in steps["swin"]["note"]
    res = tmp_path / "res"
    with tarfile.open(out / "q5-pir-results.tar.gz") as tar:
        tar.extractall(res)
    rep = json.loads((res / "results" / "report" / "train-aid-results.json").read_text())
    run = rep["runs"]["pir"]
    assert run["model"] == "pir-tiny" and run["prior_checkpoint"].endswith("pirprior/prior.pt")
    assert rep["pir_prior"]["model"] == "pir-tiny" and "test_top1" in rep["pir_prior"]["metrics"]
    data = tmp_path / "data" / "aid-rsicd"  # the reported test recall is the saved PIR weights', recomputed here
    want = _pir_recall_by_hand(tmp_path / "work" / "runs" / "pir" / "model.pt", data / "dataset_rsicd_aid.json",
                           data / "images", "test")
    assert {k: run["test"][k] for k in want} == pytest.approx(want, abs=1e-9)
    assert set(rep["parity"]) == {"torch-fp16 (autocast, cpu)", "torch-bf16 (autocast, cpu)"}
    md = (res / "results" / "report" / "train-aid-results.md").read_text()
    assert "closed-domain PIR" in md and "torchvision ResNet-50" in md and "rev5" in md
