"""Training the scene prior of a model as a scene classifier, and loading prior weights into a retrieval model.

Both model families carry a CNN prior meant to hold scene-recognition knowledge (spec §1A, §1B, §11): the open-domain
PriorCLIP's ModifiedResNet ``res_visual`` (attention-pool output, ``embed_dim`` wide) and the closed-domain PIR's
torchvision-layout ResNet ``conv_encoder`` (its "instruction encoder", ``cfg.prior.out_dim`` wide; the reference
uses a ResNet-50 fine-tuned for AID's 30 scene classes). ``train-prior`` trains one: the prior exactly as the retrieval
model builds it (same config, same key names) feeding ``head`` = Linear(width, n_classes), with cross-entropy on the
class labels of a dataset (the JSON ``label`` field, else the file-name prefix). The saved file holds the prior's
weights under the target model's keys (``res_visual.*`` or ``conv_encoder.*``) and ``head.*``, plus the model config,
the class list and the accuracies; ``priorclip train --prior-checkpoint`` loads it with :func:`load_prior_weights`,
which also takes a torchvision ResNet state dict (the RSP release) for PIR.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from priorclip.checkpoint import read_checkpoint
from priorclip.config import FAMILY_PIR, AnyConfig
from priorclip.errors import CheckpointError, DataError, PriorCLIPError
from priorclip.layers.resnet import ModifiedResNet
from priorclip.layers.tv_resnet import TorchvisionResNet, torchvision_to_sequential
from priorclip.training import data as tdata
from priorclip.cliutils import atomic_write, output_dir, write_json, write_text
from priorclip.training.common import (
    MetricsLog,
    StopFlag,
    autocast,
    device_name,
    ignore_stop_signals,
    seed_everything,
    setup_distributed,
    stop_signals_blocked,
)
from priorclip.training.optim import lr_at, make_optimizer, set_lr

PRIOR_FORMAT = "priorclip-prior/1"


def prior_key(cfg: AnyConfig) -> str:
    """The attribute (and state-dict prefix) of the prior in a retrieval model of this config."""
    return "conv_encoder" if cfg.family == FAMILY_PIR else "res_visual"


class PriorClassifier(nn.Module):
    """The config's prior, under the retrieval model's attribute name (:func:`prior_key`), + ``head`` (Linear to the
    classes). Unlike in PIR, where the prior is frozen, every weight here trains."""

    def __init__(self, cfg: AnyConfig, n_classes: int) -> None:
        super().__init__()
        if cfg.prior is None:
            raise PriorCLIPError(f"model {cfg.name!r} has no prior network to train")
        self.cfg = cfg
        self.key = prior_key(cfg)
        if cfg.family == FAMILY_PIR:
            trunk, width = TorchvisionResNet(cfg.prior), cfg.prior.out_dim
        else:
            trunk = ModifiedResNet(cfg.prior.layers, cfg.embed_dim, cfg.prior.heads, image_size=cfg.vision.image_size,
                                   width=cfg.prior.width)
            width = cfg.embed_dim
        self.add_module(self.key, trunk)
        self.head = nn.Linear(width, n_classes)

    @property
    def trunk(self) -> nn.Module:
        return getattr(self, self.key)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(pixels))


_KEYS_SHOWN = 5  # keys named per kind of mismatch in one error line


def load_prior_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the prior of a retrieval model (``model.prior_module``) strictly from ``path``; returns what was loaded.

    Accepted files: a ``priorclip train-prior`` output, or any checkpoint holding the model's prior keys
    (``res_visual.*`` for PriorCLIP, ``conv_encoder.*`` for PIR; other keys are ignored): source ``"train-prior"``.
    For PIR also a torchvision ResNet state dict (``conv1.*``, ``bn1.*``, ``layer1-4.*``, maybe wrapped in
    ``{"model": ...}`` or ``{"state_dict": ...}``, maybe ``module.``-prefixed), such as the RSP release
    ``aid_28-rsp-resnet-50-ckpt.pth`` that PIR-pytorch initialises its prior from: source ``"torchvision"``, with the
    classifier's ``fc.*`` dropped and listed. Files are read weights-only (:func:`read_checkpoint`): a file that
    pickles code (e.g. a training config object saved beside the weights) is refused with a one-line hint to re-save
    the weights alone. Every prior weight and buffer must be present with the model's shape, nothing extra: otherwise
    one :class:`CheckpointError` line names the first missing, unexpected and mis-shaped keys.

    Why map the names: PIR-pytorch loads the RSP file with ``strict=False`` into an ``nn.Sequential`` of the ResNet's
    children, whose keys are indices (``0.weight``, ``4.0.conv1.weight``), while the file has torchvision names
    (``conv1.weight``, ``layer1.0.conv1.weight``). Unless the authors re-saved the file with Sequential keys, no key
    matches, nothing is reported, and the official prior stays randomly initialised (the same risk as spec §11.5 for
    BERT). Here the names are mapped, so the file really loads, and a file that does not fit is an error.

    Returns ``{"path", "source", "module", "dropped", "classes", "metrics"}`` (``classes``/``metrics`` from a
    train-prior file, else None).
    """
    prior = model.prior_module if getattr(model, "has_prior", False) else None
    if prior is None:
        raise CheckpointError(f"--prior-checkpoint: model {model.cfg.name!r} has no prior network (res_visual)")
    key = next(name for name, child in model.named_children() if child is prior)
    ckpt = read_checkpoint(path)
    prefix = key + "."
    sd = {k[len(prefix):]: v for k, v in ckpt.state_dict.items() if k.startswith(prefix)}
    source, dropped = "train-prior", []
    if not sd:
        made_for = f" (it was saved for model {ckpt.config.name!r})" if ckpt.config is not None else ""
        if not isinstance(prior, TorchvisionResNet):
            raise CheckpointError(f"{path}: no {prefix}* weights in it{made_for} (is it a prior checkpoint from "
                                  "train-prior?)")
        try:
            sd, dropped = torchvision_to_sequential(ckpt.state_dict)
        except CheckpointError:
            first = ", ".join(list(ckpt.state_dict)[:_KEYS_SHOWN])
            raise CheckpointError(f"{path}: neither {prefix}* weights (a train-prior file for a PIR config) nor a "
                                  f"torchvision ResNet state dict (conv1.weight, layer1.*, ...){made_for}; its keys "
                                  f"begin {first}") from None
        source = "torchvision"
    expected = prior.state_dict()
    missing = [prefix + k for k in expected if k not in sd]
    extra = [prefix + k for k in sd if k not in expected]
    shapes = [f"{prefix}{k} {list(sd[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or extra or shapes:
        bits = [f"{len(x)} {what}: {', '.join(x[:_KEYS_SHOWN])}"
                for x, what in ((missing, "missing"), (extra, "unexpected"), (shapes, "shape mismatches")) if x]
        legend = f" ({key}.0 is conv1, .1 bn1, .4-.7 layer1-layer4)" if source == "torchvision" else ""
        what = "torchvision ResNet weights" if source == "torchvision" else "prior weights"
        raise CheckpointError(f"{path}: {what} do not fit model {model.cfg.name!r}: " + "; ".join(bits) + legend)
    prior.load_state_dict(sd)
    return {"path": str(path), "source": source, "module": key, "dropped": dropped,
            "classes": ckpt.extra.get("classes"), "metrics": ckpt.extra.get("metrics")}


@dataclass
class PriorTrainConfig:
    data: str
    images: str
    out: str = "runs/prior"
    model: str = "priorclip-vit-b32"
    split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    wd: float = 0.05
    warmup: int = 200
    label_smoothing: float = 0.1
    precision: str = "fp32"
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    limit: int | None = None  # use only the first N training images (quick runs)
    max_wall_min: float | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split_images(cfg: PriorTrainConfig, split: str | None, classes: list[str] | None):
    if split is None:
        return None
    try:
        src = tdata.load_karpathy_pairs(cfg.data, cfg.images, split)
    except DataError as e:
        if "no images in split" in str(e) and split != cfg.split:
            return None
        raise
    return src


class _ImageDataset(torch.utils.data.Dataset):
    """One item per image: (uint8 pixels, class id); cached arrays, augmented or centre-cropped."""

    def __init__(self, arrays: list[np.ndarray], ids: list[int], size: int, augment: bool, seed: int) -> None:
        self.arrays, self.ids, self.seed = arrays, ids, seed
        self.tf = tdata.TrainTransform(size, augment)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        return self.tf(self.arrays[i], tdata.sample_rng(self.seed, epoch, i)), self.ids[i]


def _cached(src, size: int, workers: int, progress: bool, classes: dict[str, int]):
    arrays, bad = tdata.decode_cache(src.images, size, workers, progress)
    keep = [i for i, a in enumerate(arrays) if a is not None and src.labels[i] in classes]
    unknown = sum(1 for i, a in enumerate(arrays) if a is not None and src.labels[i] not in classes)
    return [arrays[i] for i in keep], [classes[src.labels[i]] for i in keep], [(str(src.images[i]), e) for i, e in bad], unknown


def _batches(ds, workers: int, **kw):
    """Iterate a DataLoader whose workers leave SIGTERM/SIGINT to this process (see ``ignore_stop_signals``): a
    signal to the whole process group (SLURM, ``kill -- -PGID``) then stops the run cleanly instead of killing the
    workers under it."""
    init = functools.partial(ignore_stop_signals, main_pid=os.getpid()) if workers else None
    loader = torch.utils.data.DataLoader(ds, num_workers=workers, worker_init_fn=init, **kw)
    with stop_signals_blocked():  # iter() forks the workers
        return iter(loader), len(loader)


@torch.no_grad()
def accuracy(model: nn.Module, ds: _ImageDataset, device: torch.device, precision: str, batch: int, workers: int) -> float:
    model.eval()
    batches, _ = _batches(ds, workers, batch_size=batch)
    correct = 0
    for pixels, ids in batches:
        x = tdata.normalize_on_device(pixels.to(device)).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            pred = model(x).argmax(dim=1).cpu()
        correct += int((pred == ids).sum())
    model.train()
    return 100.0 * correct / max(1, len(ds))


def train_prior(cfg: PriorTrainConfig) -> dict[str, Any]:
    """Train the prior as a scene classifier; writes ``prior.pt``, ``prior_summary.json`` and ``metrics.jsonl``."""
    t_start = time.perf_counter()
    d = setup_distributed(cfg.device)
    if d.enabled:
        raise PriorCLIPError("train-prior runs in one process (the prior trains in minutes on one GPU)")
    out = Path(cfg.out)
    with output_dir(out):  # a run that fails before writing anything leaves no empty folder behind
        return _train_prior(cfg, out, d, t_start)


def _train_prior(cfg: PriorTrainConfig, out: Path, d, t_start: float) -> dict[str, Any]:
    from priorclip.registry import get_config

    mcfg = get_config(cfg.model)
    if mcfg.prior is None:
        raise PriorCLIPError(f"model {cfg.model!r} has no prior network to train")
    size = mcfg.vision.image_size
    seed_everything(cfg.seed)
    train_src = _split_images(cfg, cfg.split, None)
    if cfg.limit and cfg.limit < len(train_src.images):  # a seeded random subset: JSON files are often class-sorted
        keep = sorted(np.random.default_rng(cfg.seed).choice(len(train_src.images), cfg.limit, replace=False).tolist())
        train_src.images = [train_src.images[i] for i in keep]
        train_src.labels = [train_src.labels[i] for i in keep]
    classes = sorted(set(train_src.labels))
    if len(classes) < 2:
        raise DataError(f"{cfg.data} [{cfg.split}]: need at least two classes for a scene classifier, found {classes}")
    cid = {c: i for i, c in enumerate(classes)}
    workers = max(1, cfg.workers)
    arrays, ids, bad, _ = _cached(train_src, size, max(4, workers), cfg.progress, cid)
    if not arrays:
        raise DataError(f"none of the {len(train_src.images)} training images could be read under {cfg.images}")
    evals = {}
    for name, split in (("val", cfg.val_split), ("test", cfg.test_split)):
        src = _split_images(cfg, split, classes)
        if src is not None:
            a, i, b, unknown = _cached(src, size, max(4, workers), False, cid)
            bad += b
            evals[name] = (_ImageDataset(a, i, size, False, cfg.seed), split, unknown)
    if bad:
        write_text(out / "skipped_images.txt", "".join(f"{p}\t{e}\n" for p, e in bad))
        print(f"[train-prior] skipped {len(bad)} unreadable images (listed in {out / 'skipped_images.txt'})", file=sys.stderr)
    train_ds = _ImageDataset(arrays, ids, size, True, cfg.seed)

    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = PriorClassifier(mcfg, len(classes)).to(d.device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.lr, cfg.wd)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch < 1:
        raise DataError(f"{len(train_ds)} training images are fewer than one batch of {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs
    log = MetricsLog(out, True, False)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    print(f"[train-prior] {cfg.model} {model.key} on {device_name(d.device)}: {len(train_ds)} images, {len(classes)} "
          f"classes, {steps_per_epoch} steps/epoch x {cfg.epochs}", file=sys.stderr)
    step, samples, train_s, history, stopped = 0, 0, 0.0, [], None
    with StopFlag() as flag:
        for epoch in range(cfg.epochs):
            sampler = tdata.EpochBatchSampler(len(train_ds), cfg.batch_size, epoch, cfg.seed)
            batches, n_batches = _batches(train_ds, cfg.workers, batch_sampler=sampler,
                                          pin_memory=d.device.type == "cuda", prefetch_factor=4 if cfg.workers else None)
            t_epoch, correct, seen, loss_sum = time.perf_counter(), 0, 0, 0.0
            t_last = time.perf_counter()
            for pixels, y in tqdm(batches, total=n_batches, desc=f"epoch {epoch}", leave=False, disable=not cfg.progress):
                x = tdata.normalize_on_device(pixels.to(d.device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                y = y.to(d.device, non_blocking=True)
                set_lr(opt, lr_at(step, cfg.lr, cfg.warmup, total, "cosine"))
                with autocast(d.device, cfg.precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                step += 1
                samples += len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
                train_s += time.perf_counter() - t_last  # data wait included, as in the retrieval trainer
                t_last = time.perf_counter()
                if flag.reason or (cfg.max_wall_min and time.perf_counter() - t_start > 60 * cfg.max_wall_min):
                    stopped = flag.reason or f"--max-wall-min {cfg.max_wall_min}"
                    break
            rec = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
                   "epoch_s": time.perf_counter() - t_epoch}
            if "val" in evals:
                rec["val_top1"] = accuracy(model, evals["val"][0], d.device, cfg.precision, 256, cfg.workers)
            history.append(rec)
            log.write("epoch", step, **rec)
            print(f"[train-prior] epoch {epoch + 1}: loss {rec['loss']:.3f} train {rec['train_top1']:.1f}%"
                  + (f" val {rec['val_top1']:.1f}%" if "val_top1" in rec else ""), file=sys.stderr)
            if stopped:
                break
    metrics = {f"{k}_top1": accuracy(model, ds, d.device, cfg.precision, 256, cfg.workers) for k, (ds, _, _) in evals.items()}
    summary = {
        "model": cfg.model,
        "classes": classes,
        "n_train": len(train_ds),
        **{f"n_{k}": len(ds) for k, (ds, _, _) in evals.items()},
        "metrics": metrics,
        "epochs": history,
        "steps": step,
        "planned_steps": total,
        "stopped": stopped,
        "skipped_images": len(bad),
        "samples_per_s": samples / train_s if train_s else None,
        "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t_start,
        "device": device_name(d.device),
        "precision": cfg.precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": cfg.to_dict(),
    }
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out / "prior.pt") as tmp:
        torch.save({"state_dict": sd, "config": mcfg.to_dict(), "format": PRIOR_FORMAT, "classes": classes,
                    "metrics": metrics}, tmp)
    write_json(out / "prior_summary.json", summary)
    scores = ", ".join(f"{k} {v:.2f}%" for k, v in metrics.items())
    print(f"[train-prior] {scores + '; ' if scores else ''}wrote {out / 'prior.pt'}", file=sys.stderr)
    log.close()
    return summary
