"""PIRLoss (spec §4B) against a float64 re-derivation written with explicit loops, a hand-computed 2x2 case, two gloo
processes against one, and the ``image_ids`` the training data hands to it."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from priorclip.training import data as tdata
from priorclip.training.loss import PIRLoss

REPO = Path(__file__).resolve().parents[2]


def ref_pir(img, txt, temps, labels, ids=None, groups=None, center_factor=1.0):
    """float64, one term at a time, straight from spec §4B. ``groups``: local-batch sizes (one per process); the
    class centres are taken within each group, features and ids over the whole batch."""
    n = img.shape[0]
    groups = groups or [n]
    temp, temp2 = temps[0], temps[1]

    def soft_ce(rows, cols, temp, positives):
        """mean_i of -sum_j P_ij log softmax_j(<rows_i, cols_j> / temp), with P_i uniform over positives(i)."""
        terms = []
        for i in range(n):
            lg = torch.stack([torch.dot(rows[i], cols[j]) / temp for j in range(n)])
            lse = torch.logsumexp(lg, 0)
            pos = positives(i)
            terms.append(sum(lse - lg[j] for j in pos) / len(pos))
        return torch.stack(terms).mean()

    def same_image(i):
        return [i] if ids is None else [j for j in range(n) if ids[j] == ids[i]]

    lc = 0.5 * (soft_ce(img, txt, temp, same_image) + soft_ce(txt, img, temp, same_image))
    if labels is None:
        return lc, None
    ic, tc, s0 = [], [], 0
    for size in groups:
        for i in range(s0, s0 + size):
            members = [j for j in range(s0, s0 + size) if labels[j] == labels[i]]
            ic.append(sum(img[j] for j in members) / len(members))
            tc.append(sum(txt[j] for j in members) / len(members))
        s0 += size
    ic, tc = torch.stack(ic), torch.stack(tc)
    # image i against the text centres; image centre i against the texts (the transposed C = T Īᵀ)
    la = 0.5 * (soft_ce(img, tc, temp2, lambda i: [i]) + soft_ce(ic, txt, temp2, lambda i: [i]))
    return lc, center_factor * la


def _feats(n: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64) + 0.7 * img, dim=-1)
    return img, txt


CASES = {  # labels, image ids
    "repeats": ([3, 1, 3, 3, 2, 1, 2, 0], [0, 0, 1, 2, 3, 3, 3, 4]),
    "ids-across-labels": ([0, 1, 0, 1, 0, 1], [5, 5, 9, 9, 2, 2]),
    "no-ids": ([1, 1, 2, 2, 2, 0], None),
    "one-image-one-class": ([4, 4, 4, 4], [7, 7, 7, 7]),
    "batch-1": ([0], [3]),
}


def _both(case, temps, center_factor=1.0, e=16):
    labels, ids = CASES[case]
    img64, txt64 = _feats(len(labels), e, seed=len(labels) + e)
    img32, txt32 = (t.float().requires_grad_(True) for t in (img64, txt64))
    t32 = torch.tensor(temps, requires_grad=True)
    lab, idt = torch.tensor(labels), None if ids is None else torch.tensor(ids)
    out = PIRLoss(center_factor=center_factor)(img32, txt32, t32, lab, idt)
    sum(out.values()).backward()
    img64.requires_grad_(True)
    txt64.requires_grad_(True)
    t64 = torch.tensor(temps, dtype=torch.float64, requires_grad=True)
    lc, la = ref_pir(img64, txt64, t64, labels, ids, center_factor=center_factor)
    (lc + la).backward()
    return out, (img32, txt32, t32), (lc, la), (img64, txt64, t64)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temps", [(0.07, 0.07), (0.05, 0.3), (1.0, 0.5)])
def test_matches_float64_derivation(case, temps):
    out, (i32, t32, tp32), (lc, la), (i64, t64, tp64) = _both(case, temps)
    assert set(out) == {"contrastive", "affiliation"}
    assert out["contrastive"].dtype == torch.float32
    torch.testing.assert_close(out["contrastive"].double(), lc.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["affiliation"].double(), la.detach(), rtol=1e-6, atol=1e-6)
    scale = 1 / min(temps)  # gradients grow like 1/temp (and 1/temp² for the temperatures)
    torch.testing.assert_close(i32.grad.double(), i64.grad, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(t32.grad.double(), t64.grad, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(tp32.grad.double(), tp64.grad, rtol=1e-5, atol=1e-6 * scale**2)
    if case == "batch-1":  # one candidate per row: both terms are exactly 0, with finite zero gradients
        assert out["contrastive"].item() == 0 and out["affiliation"].item() == 0
        assert torch.isfinite(i32.grad).all() and i32.grad.abs().max() < 1e-6


def sp(x: float) -> float:
    """log(1 + e^x): for a row [a, b], -log softmax(row)[0] = sp(b - a)."""
    return math.log1p(math.exp(x))


def lse(a: float, b: float) -> float:
    return math.log(math.exp(a) + math.exp(b))


def test_hand_computed_2x2():
    """I = [e1, e2], T = [e1, 0.6e1 + 0.8e2], temp 0.5, temp2 0.25; the logits are worked out by hand."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    temps = torch.tensor([0.5, 0.25])
    # I Tᵀ / temp = [[2, 1.2], [0, 1.6]]
    out = PIRLoss()(img, txt, temps, torch.tensor([0, 1]), torch.tensor([0, 1]))
    contrastive = 0.25 * (sp(-0.8) + sp(-1.6) + sp(-2.0) + sp(-0.4))  # rows of the logits, then of its transpose
    # distinct classes: centres = features; A = I Tᵀ / temp2 = [[4, 2.4], [0, 3.2]] and Cᵀ = A
    affiliation = 0.5 * (sp(-1.6) + sp(-3.2))
    assert out["contrastive"].item() == pytest.approx(contrastive, rel=1e-6)
    assert out["affiliation"].item() == pytest.approx(affiliation, rel=1e-6)
    # without the transpose the second term would be over the rows of C = [[4, 0], [2.4, 3.2]]: not what we get
    assert out["affiliation"].item() != pytest.approx(0.25 * (sp(-1.6) + sp(-3.2) + sp(-4.0) + sp(-0.8)), rel=1e-3)

    # one image, one class: P = 1/2 everywhere; Ī = (.5, .5), T̄ = (.8, .4)
    out = PIRLoss()(img, txt, temps, torch.tensor([1, 1]), torch.tensor([4, 4]))
    i2t = (lse(2.0, 1.2) - 1.6) + (lse(0.0, 1.6) - 0.8)  # per row: lse - mean of the row
    t2i = (lse(2.0, 0.0) - 1.0) + (lse(1.2, 1.6) - 1.4)
    # A's rows are constant ([3.2, 3.2] and [1.6, 1.6]): log 2 each; row i of Cᵀ = <T_j, Ī>/temp2 = [2, 2.8]
    affiliation = 0.5 * (math.log(2.0) + 0.5 * (sp(0.8) + sp(-0.8)))
    assert out["contrastive"].item() == pytest.approx(0.25 * (i2t + t2i), rel=1e-6)
    assert out["affiliation"].item() == pytest.approx(affiliation, rel=1e-6)


def test_center_factor_switch_and_default_ids():
    img, txt = (t.float() for t in _feats(6, 8, 0))
    temps, labels = torch.tensor([0.07, 0.1]), torch.tensor([0, 0, 1, 1, 2, 2])
    base = PIRLoss()(img, txt, temps, labels)
    weighted = PIRLoss(center_factor=2.5)(img, txt, temps, labels)
    torch.testing.assert_close(weighted["affiliation"], 2.5 * base["affiliation"])
    torch.testing.assert_close(weighted["contrastive"], base["contrastive"])
    plain = PIRLoss(affiliation=False)(img, txt, temps)  # no labels needed
    assert set(plain) == {"contrastive"}
    torch.testing.assert_close(plain["contrastive"], base["contrastive"])
    distinct = PIRLoss()(img, txt, temps, labels, torch.tensor([9, 3, 4, 0, 1, 2]))  # all different: = no ids
    torch.testing.assert_close(distinct["contrastive"], base["contrastive"])
    paired = PIRLoss()(img, txt, temps, labels, torch.tensor([9, 9, 4, 0, 1, 2]))
    assert paired["contrastive"].item() != pytest.approx(base["contrastive"].item(), rel=1e-4)


def test_float32_under_autocast():
    img, txt = _feats(4, 8, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = PIRLoss()(img.bfloat16(), txt.bfloat16(), torch.tensor([0.07, 0.07]), torch.tensor([0, 1, 0, 1]))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_bad_inputs():
    img, txt = (t.float() for t in _feats(3, 4, 2))
    temps, labels = torch.tensor([0.07, 0.07]), torch.tensor([0, 1, 0])
    bad = [
        (dict(labels=None), "labels"),
        (dict(temps=torch.tensor(0.07)), "temps"),
        (dict(temps=torch.tensor([0.07, 0.07, 0.07])), "temps"),
        (dict(temps=(0.07, 0.07)), "temps"),
        (dict(text=txt[:2]), "image and text"),
        (dict(image=img[0], text=txt[0]), "image and text"),
        (dict(labels=torch.tensor([0, 1])), "labels"),
        (dict(labels=torch.tensor([0.0, 1.0, 0.0])), "labels"),
        (dict(image_ids=torch.tensor([0, 1, 2, 3])), "image_ids"),
    ]
    for change, match in bad:
        args = dict(image=img, text=txt, temps=temps, labels=labels, image_ids=None) | change
        with pytest.raises(ValueError, match=match):
            PIRLoss()(**args)


# ------------------------------------------------------------------------------------------- two gloo processes

SIZES = [4, 3]  # unequal local batches: the gather pads and slices
DDP_LABELS = [5, 5, 7, 5, 7, 7, 5]  # per process: centres of 5 and 7 are taken within each local batch
DDP_IDS = [0, 0, 1, 2, 2, 3, 0]  # images 0 and 2 have captions on both processes


def _launch(script: str, tmp_path: Path, world: int = 2, timeout: int = 120) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "worker.py").write_text(textwrap.dedent(script))
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("gloo workers timed out")
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


def test_two_processes_match_one(tmp_path):
    img64, txt64 = _feats(len(DDP_IDS), 8, 11)
    temps = [0.07, 0.2]
    torch.save({"img": img64.float(), "txt": txt64.float()}, tmp_path / "feats.pt")
    script = f"""
    import json, sys, torch
    import torch.distributed as dist
    from priorclip.training.loss import PIRLoss
    dist.init_process_group("gloo")
    rank, sizes = dist.get_rank(), {SIZES!r}
    f = torch.load(sys.argv[1] + "/feats.pt")
    s0 = sum(sizes[:rank]); sl = slice(s0, s0 + sizes[rank])
    i, t = f["img"][sl].clone().requires_grad_(True), f["txt"][sl].clone().requires_grad_(True)
    temps = torch.tensor({temps!r}, requires_grad=True)
    out = PIRLoss()(i, t, temps, torch.tensor({DDP_LABELS!r})[sl], torch.tensor({DDP_IDS!r})[sl])
    sum(out.values()).backward()
    res = {{k: float(v.detach()) for k, v in out.items()}}
    res.update(gi=i.grad.tolist(), gt=t.grad.tolist(), gtemps=temps.grad.tolist())
    open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w").write(json.dumps(res))
    dist.destroy_process_group()
    """
    _launch(script, tmp_path)

    # one process, whole batch: the second process's labels are moved apart so that its centres stay its own
    img32, txt32 = (t.float().requires_grad_(True) for t in (img64, txt64))
    t32 = torch.tensor(temps, requires_grad=True)
    local_labels = torch.tensor(DDP_LABELS) + torch.tensor([0] * SIZES[0] + [100] * SIZES[1])
    single = PIRLoss()(img32, txt32, t32, local_labels, torch.tensor(DDP_IDS))
    sum(single.values()).backward()
    img64.requires_grad_(True)
    txt64.requires_grad_(True)
    t64 = torch.tensor(temps, dtype=torch.float64, requires_grad=True)
    lc, la = ref_pir(img64, txt64, t64, DDP_LABELS, DDP_IDS, groups=SIZES)
    (lc + la).backward()
    torch.testing.assert_close(single["contrastive"].double(), lc.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(single["affiliation"].double(), la.detach(), rtol=1e-6, atol=1e-6)

    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["contrastive"] == pytest.approx(single["contrastive"].item(), rel=1e-6)
        assert r["affiliation"] == pytest.approx(single["affiliation"].item(), rel=1e-6)
        s0 = sum(SIZES[:rank])
        sl = slice(s0, s0 + SIZES[rank])
        # every process holds the whole loss and the gather's backward sums the copies (2x, --gather-with-grad);
        # DDP's averaging of parameter gradients turns that back into the one-process gradient
        for key, one, ref in (("gi", img32, img64), ("gt", txt32, txt64)):
            got = torch.tensor(r[key], dtype=torch.float64)
            torch.testing.assert_close(got, 2 * one.grad[sl].double(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, 2 * ref.grad[sl], rtol=1e-5, atol=1e-5)
        # the temperatures are not gathered: each process's gradient is already the whole loss's
        torch.testing.assert_close(torch.tensor(r["gtemps"], dtype=torch.float64), t64.grad, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(torch.tensor(r["gtemps"]), t32.grad, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------- image ids in batches


def _jpeg(color=(10, 120, 200), size=24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def test_batches_carry_global_image_ids(tmp_path):
    (tmp_path / "im").mkdir()
    for k, n in enumerate(("a_1.jpg", "b_2.jpg", "a_3.jpg")):
        (tmp_path / "im" / n).write_bytes(_jpeg((60 * k, 80, 80)))
    rows = ["a_1.jpg\tone", "b_2.jpg\ttwo", "a_1.jpg\tthree", "a_3.jpg\tfour", "b_2.jpg\tfive"]
    (tmp_path / "d.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    src = tdata.load_csv_pairs(tmp_path / "d.tsv", tmp_path / "im")
    ds = tdata.PairDataset(src, 16, tokens=None, augment=False)
    batch = tdata.collate([ds[(0, i)] for i in range(len(ds))])
    assert batch["image_ids"].dtype == torch.int64
    assert batch["image_ids"].tolist() == [0, 1, 0, 2, 1]  # the two captions of a_1 (and of b_2) share their id
    assert [src.images[i].name for i in batch["image_ids"]] == batch["names"]

    # a dropped (unreadable) image leaves the others' ids as they were: ids index the source, not the survivors
    cache = [np.zeros((16, 16, 3), np.uint8), None, np.zeros((16, 16, 3), np.uint8)]
    kept = tdata.PairDataset(src, 16, tokens=None, cache=cache, augment=False)
    assert tdata.collate([kept[(0, i)] for i in range(len(kept))])["image_ids"].tolist() == [0, 0, 2]
    # an undecodable item on the fly is left out of its batch together with its id
    (tmp_path / "im" / "b_2.jpg").write_bytes(b"not an image")
    batch = tdata.collate([ds[(0, i)] for i in range(len(ds))])
    assert batch["image_ids"].tolist() == [0, 0, 2] and len(batch["skipped"]) == 2


def test_webdataset_ids_hash_the_image_name(tmp_path):
    samples = [("s0", "farm_1.jpg"), ("s1", "farm_1.jpg"), ("s2", "farm_2.jpg"), ("s3", "port_1.jpg")]
    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for key, name in samples:
            for ext, payload in (("img_content", _jpeg()), ("caption", f"caption of {key}".encode()),
                                 ("img_name", name.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = tdata.WebDatasetStream([str(tmp_path / "000.tar")], 16, shuffle_buffer=1)
    batch = tdata.collate(next(tdata.batched_stream(iter(ds), 4)))
    ids = dict(zip(batch["names"], batch["image_ids"].tolist()))
    assert batch["image_ids"].dtype == torch.int64 and len(batch["names"]) == 4
    assert batch["image_ids"][[n == "farm_1.jpg" for n in batch["names"]]].unique().numel() == 1
    assert len(set(ids.values())) == 3
    assert all(0 <= v < 2**63 for v in ids.values())
    # a fixed value: the id must not depend on the process, the run or Python's hash seed
    assert ids["farm_1.jpg"] == tdata.stable_image_id("farm_1.jpg") == 8426675421437903199
