"""The multi-process path on CPU: two gloo processes started the way torchrun starts them (RANK, WORLD_SIZE, ...)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.training.test_loss import _feats, ref_loss

NAMES = ["airport_1.jpg", "beach_2.jpg", "airport_3.jpg", "park_4.jpg", "beach_5.jpg", "airport_6.jpg", "00007.jpg"]
SIZES = [4, 3]  # unequal local batches: the gather pads and slices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, tmp_path: Path, world: int = 2, timeout: int = 240) -> None:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        procs.append(subprocess.Popen([sys.executable, str(path), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


def test_gathered_loss_and_gradients_match_float64(tmp_path):
    script = f"""
    import json, sys, torch
    from priorclip.training.common import setup_distributed
    from priorclip.training.loss import ClipAffLoss, affiliation_labels
    from tests.training.test_loss import _feats
    d = setup_distributed("cpu")
    names, sizes = {NAMES!r}, {SIZES!r}
    img, txt = _feats(len(names), 8, 5)
    s0 = sum(sizes[:d.rank]); sl = slice(s0, s0 + sizes[d.rank])
    i, t = img[sl].clone().requires_grad_(True), txt[sl].clone().requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    out = ClipAffLoss()(i, t, scale, affiliation_labels(names[sl]))
    sum(out.values()).backward()
    res = {{k: float(v.detach()) for k, v in out.items()}}
    res.update(gi=i.grad.tolist(), gt=t.grad.tolist(), gs=float(scale.grad))
    open(f"{{sys.argv[1]}}/rank{{d.rank}}.json", "w").write(json.dumps(res))
    torch.distributed.destroy_process_group()
    """
    _launch(script, tmp_path)
    img, txt = _feats(len(NAMES), 8, 5, torch.float64)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    s = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    lc, la = ref_loss(img, txt, s, NAMES, groups=SIZES)
    (lc + la).backward()
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["contrastive"] == pytest.approx(lc.item(), rel=1e-5)
        assert r["affiliation"] == pytest.approx(la.item(), rel=1e-5)
        s0 = sum(SIZES[:rank])
        sl = slice(s0, s0 + SIZES[rank])
        # each process holds the whole loss; the gather's backward sums both copies' gradients (2x), which DDP's
        # averaging turns back into the single-process gradient
        torch.testing.assert_close(torch.tensor(r["gi"], dtype=torch.float64), 2 * img.grad[sl], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(r["gt"], dtype=torch.float64), 2 * txt.grad[sl], rtol=1e-4, atol=1e-5)


def test_ddp_training_matches_one_process(tmp_path, tiny_data):
    """2 processes x batch 4 without the affiliation loss take the same first step as 1 process x batch 8."""
    json_path, img_dir = tiny_data
    common = dict(data=str(json_path), images=str(img_dir), model="clip-tiny", epochs=1, batch_size=4, workers=0,
                  val_split=None, test_split=None, progress=False, tensorboard=False, affiliation=False, stop_after=2, warmup=1)
    script = f"""
    import json, sys, torch
    from priorclip.training.trainer import Trainer, TrainConfig
    from priorclip.training.common import TrainingInterrupted
    t = Trainer(TrainConfig(out=sys.argv[1] + "/ddp", **{common!r}))
    try:
        t.fit()
    except TrainingInterrupted:
        pass
    torch.distributed.destroy_process_group()
    sd = {{k: v.sum().item() for k, v in t.model.state_dict().items()}}
    open(f"{{sys.argv[1]}}/ddp{{t.d.rank}}.json", "w").write(json.dumps({{"history": t.history, "sd": sd}}))
    """
    _launch(script, tmp_path)
    from priorclip.training.common import TrainingInterrupted
    from priorclip.training.trainer import Trainer, TrainConfig

    single = Trainer(TrainConfig(out=str(tmp_path / "single"), **{**common, "batch_size": 8}))
    with pytest.raises(TrainingInterrupted):
        single.fit()
    r0, r1 = (json.loads((tmp_path / f"ddp{r}.json").read_text()) for r in range(2))
    assert r0["sd"] == r1["sd"]  # the replicas stay identical
    # step 1 checks the data split and the gathered loss; step 2 also checks that the averaged gradients and the
    # optimiser step agree (parameters are not compared directly: Adam's first step turns rounding noise in the
    # gradients that are zero in exact arithmetic, such as attention key biases, into full-size updates)
    assert len(r0["history"]) == len(single.history) == 2
    for a, b in zip(r0["history"], single.history):
        assert a["contrastive"] == pytest.approx(b["contrastive"], rel=1e-4)
