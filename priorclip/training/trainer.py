"""The PriorCLIP trainer: contrastive + affiliation loss, AdamW, cosine/linear schedule, AMP, accumulation, DDP.

One process per GPU through ``torchrun`` (``torch.distributed``; no launcher of our own). Files in ``out``:

* ``metrics.jsonl``: one line per logged step (loss terms, lr, logit scale, samples/s, data wait) and per validation;
* ``checkpoints/latest.pt``: weights + config (``priorclip eval --checkpoint`` reads it) plus ``train_state``
  (optimiser, scaler, step, epoch, RNG, run config, world size, data identity, loss and validation histories) for
  ``--resume``, which refuses a changed global batch or data (see ``read_resume_state``); ``checkpoints/epoch_K.pt``:
  weights only;
* ``model.pt`` (final weights), ``summary.json`` (throughput, wall time, device, val/test metrics), ``config.json``.

SIGTERM or SIGINT, to the main process or its whole group (SLURM, ``kill -- -PGID``, Ctrl-C), ends the run after the
current step (or the epoch's end work under way) with ``latest.pt``; loader workers leave those signals to the main
process (``common.ignore_stop_signals``). A run that fails before it has saved or logged anything removes the folders
it created.

Gradient accumulation uses open_clip's feature cache: a no-grad pass embeds every micro-batch, then each micro-batch
is recomputed with gradients and the loss is taken over the whole accumulated batch, so labels, centres and negatives
are those of the full batch and the gradient equals the large-batch gradient (BatchNorm statistics aside).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from priorclip.checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from priorclip.config import FAMILY_PIR, FAMILY_PRIORCLIP, AnyConfig
from priorclip.preprocess import preprocess_for
from priorclip.wordpiece import trim_padding
from priorclip.errors import CheckpointError, DataError, PriorCLIPError
from priorclip.training import data as tdata
from priorclip.training.common import (
    MetricsLog,
    StopFlag,
    TrainingInterrupted,
    any_rank,
    autocast,
    device_name,
    ignore_stop_signals,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    stop_signals_blocked,
)
from priorclip.training.loss import ClipAffLoss, PIRLoss, affiliation_labels
from priorclip.training.prior import load_prior_weights
from priorclip.training.optim import (
    clamp_logit_scale,
    lr_at,
    make_optimizer,
    no_weight_decay,
    pir_no_weight_decay,
    pir_warmup_steps,
    set_lr,
)

STATE_FORMAT = "priorclip-train-state/1"


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/train"
    images: str | None = None
    data_type: str = "auto"
    split: str = "train"
    val_data: str | None = None  # Karpathy JSON; default: --data when it is one
    val_images: str | None = None
    val_split: str | None = "val"
    val_limit: int | None = None
    test_split: str | None = "test"
    train_num_samples: int | None = None  # webdataset epoch size (counted from the shards if not given)
    model: str = "priorclip-vit-b32"
    init_checkpoint: str | None = None
    prior_checkpoint: str | None = None
    lock_prior: bool = False
    lock_text: bool = False  # freeze the text tower (the paper's figure shows it frozen in instruction fine-tuning)
    affiliation: bool = True
    epochs: int = 10
    batch_size: int = 64  # per process and micro-batch
    accum_freq: int = 1
    # None: the model family's reference recipe (RECIPES), resolved by the Trainer and recorded as resolved
    lr: float | None = None
    wd: float | None = None
    beta1: float = 0.9
    beta2: float | None = None
    eps: float = 1e-8
    warmup: int | None = None
    schedule: str | None = None
    grad_clip: float | None = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    workers: int = 4
    cache: str = "auto"  # auto | yes | no
    seed: int = 0
    device: str = "auto"
    resume: str | None = None  # a train-state checkpoint, or "auto" (out/checkpoints/latest.pt if present)
    accept_new_data: bool = False  # resume even though the training data differ from the saved run's
    save_every: int = 0  # steps between resumable checkpoints (0: at epoch ends only)
    epoch_checkpoints: bool = True  # also keep checkpoints/epoch_K.pt (weights only) after every epoch
    resume_every_epochs: int = 1  # write checkpoints/latest.pt (weights + optimiser, ~3x the weights) every N epochs
    stop_after: int | None = None  # stop (resumably) after this many total steps: splits a run across calls
    max_wall_min: float | None = None  # stop training after this many minutes, then validate/test as usual
    max_steps: int | None = None  # end training after this many steps (the schedule anneals over them), then as usual
    log_every: int = 10
    val_every: int = 1
    val_batch_size: int = 128
    progress: bool = True
    tensorboard: bool = True
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The two families' reference recipes (spec §5A, §5B): what an option left unset takes. PIR warms up over the first 10%
# of the run's steps (warmup None here), then decays linearly to 0 (HF's schedule), with AdamW betas (0.9, 0.98).
RECIPES = {
    FAMILY_PRIORCLIP: {"lr": 5e-4, "wd": 0.2, "beta2": 0.999, "warmup": 100, "schedule": "cosine"},
    FAMILY_PIR: {"lr": 6e-5, "wd": 0.01, "beta2": 0.98, "warmup": None, "schedule": "hf_linear"},
}


def resolve_recipe(cfg: TrainConfig, family: str, total_steps: int | None = None) -> TrainConfig:
    """``cfg`` with every unset optimiser setting taken from the family's recipe; a warm-up that is a fraction of the
    run (PIR's) stays unset until ``total_steps`` is known."""
    recipe = dict(RECIPES[family])
    if recipe["warmup"] is None and total_steps is not None:
        recipe["warmup"] = pir_warmup_steps(total_steps)
    return dataclasses.replace(cfg, **{k: v for k, v in recipe.items() if getattr(cfg, k) is None and v is not None})


CACHE_AUTO_LIMIT = 200_000  # images: decode into memory below this (~6 GB at 150 px, ~30 GB at 224 px)


def data_identity(kind: str, n_samples: int, items) -> dict[str, Any]:
    """What a resumed run compares: the kind, the sample count and a hash of the ordered sample list (pairs as
    relative image path + caption; shard file names for webdataset), so a moved image folder is still the same data."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode("utf-8", "surrogatepass") + b"\n")
    return {"kind": kind, "samples": n_samples, "sha256": h.hexdigest()[:16]}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


class TrainData:
    """The training stream for one process: a cached/decoded map-style dataset or a webdataset stream."""

    def __init__(self, cfg: TrainConfig, model_cfg: AnyConfig, d, out: Path) -> None:
        self.cfg, self.d = cfg, d
        image_size, context_length = model_cfg.vision.image_size, model_cfg.text.context_length
        self.tokenizer = preprocess_for(model_cfg).tokenizer
        self.randaugment = model_cfg.family == FAMILY_PIR  # PIR-pytorch's augmentation adds RandAugment(2, 7)
        kind = tdata.detect_type(cfg.data) if cfg.data_type == "auto" else cfg.data_type
        self.kind = kind
        self.skipped_at_load: list[tuple[str, str]] = []
        global_batch = cfg.batch_size * cfg.accum_freq * d.world
        pin = d.device.type == "cuda"
        if kind == "wds":
            self.shards = tdata.expand_shards(cfg.data)
            n = cfg.train_num_samples or tdata.count_tar_samples(self.shards)
            self.n_samples = n
            self.image_size = image_size
            self.context_length = context_length
            self.steps_per_epoch = n // global_batch
            self.description = f"{len(self.shards)} webdataset shards, {n} samples"
            self.identity = data_identity(kind, n, (Path(s).name for s in self.shards))
        else:
            if kind == "karpathy":
                if not cfg.images:
                    raise DataError("--images DIR is required with a Karpathy-style dataset JSON")
                src = tdata.load_karpathy_pairs(cfg.data, cfg.images, cfg.split)
            elif kind == "csv":
                src = tdata.load_csv_pairs(cfg.data, cfg.images)
            else:
                raise DataError(f"unknown data type {kind!r}; choose one of {', '.join(tdata.DATA_TYPES)}")
            src, tokens, self.empty_captions = tdata.tokenize_pairs(src, self.tokenizer)
            use_cache = cfg.cache == "yes" or (cfg.cache == "auto" and len(src.images) <= CACHE_AUTO_LIMIT)
            cache = None
            if use_cache:
                t0 = time.perf_counter()
                cache, bad = tdata.decode_cache(src.images, image_size, max(4, cfg.workers), cfg.progress and d.is_main)
                self.skipped_at_load = [(str(src.images[i]), e) for i, e in bad]
                if len(bad) == len(src.images):
                    raise DataError(
                        f"none of the {len(src.images)} images of {src.description} could be read "
                        f"(e.g. {self.skipped_at_load[0][0]}: {self.skipped_at_load[0][1]}); check --images"
                    )
                self.cache_seconds = time.perf_counter() - t0
            self.dataset = tdata.PairDataset(src, image_size, tokens, cache, augment=True, seed=cfg.seed,
                                             randaugment=self.randaugment)
            self.n_samples = len(self.dataset)
            self.steps_per_epoch = self.n_samples // global_batch
            root = Path(cfg.images) if cfg.images else Path(cfg.data).parent
            pairs = (
                f"{_relative(src.images[src.caption_image[i]], root)}\t{src.captions[i]}" for i in self.dataset.index
            )
            self.identity = data_identity(kind, self.n_samples, pairs)
            self.description = (
                f"{src.description}: {len(src.images)} images, {len(src.captions)} pairs"
                + (f", {len(self.skipped_at_load)} unreadable images skipped" if self.skipped_at_load else "")
                + (f", {self.empty_captions} captions empty after cleaning left out" if self.empty_captions else "")
                + (" (decoded once into memory)" if cache is not None else "")
            )
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{self.n_samples} training samples are fewer than one global batch ({global_batch} = batch "
                f"{cfg.batch_size} x accum {cfg.accum_freq} x {d.world} processes)"
            )
        self.pin = pin
        if self.skipped_at_load and d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "skipped_images.txt").write_text("".join(f"{p}\t{e}\n" for p, e in self.skipped_at_load), "utf-8")

    def loader(self, epoch: int, start_step: int):
        cfg, d = self.cfg, self.d
        if self.kind == "wds":
            ds = tdata.WebDatasetStream(self.shards, self.image_size, cfg.seed, d.rank, d.world, epoch,
                                        context_length=self.context_length, tokenizer=self.tokenizer,
                                        randaugment=self.randaugment)
            with stop_signals_blocked():  # iter() forks the workers
                it = iter(tdata.wds_loader(ds, cfg.batch_size, cfg.workers, self.pin, self._worker_init))
            for _ in range(start_step * cfg.accum_freq):  # a resumed epoch replays the stream up to where it stopped
                next(it)
            return it
        sampler = tdata.EpochBatchSampler(
            len(self.dataset), cfg.batch_size, epoch, cfg.seed, d.rank, d.world, cfg.accum_freq, start_step
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=tdata.collate,
            pin_memory=self.pin, prefetch_factor=4 if cfg.workers else None, worker_init_fn=self._worker_init,
        )
        with stop_signals_blocked():  # iter() forks the workers (and starts the pin-memory thread)
            return iter(loader)

    @property
    def _worker_init(self):
        # Workers leave SIGTERM/SIGINT to the main process (see ignore_stop_signals). They are started per epoch
        # (not persistent), so every epoch's workers get it; a persistent loader would get it once, which suffices.
        return functools.partial(ignore_stop_signals, main_pid=os.getpid()) if self.cfg.workers else None


@contextmanager
def preserved_bn_stats(model: nn.Module):
    """Leave BatchNorm running statistics untouched by the no-grad feature pass of gradient accumulation."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        for m, (mean, var, n) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from priorclip.registry import create_model

        self.cfg = cfg
        self.d = setup_distributed(cfg.device)
        if cfg.precision not in ("fp32", "bf16", "fp16"):
            raise PriorCLIPError(f"--precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
        if cfg.accum_freq < 1 or cfg.batch_size < 1:
            raise PriorCLIPError("--batch-size and --accum-freq must be at least 1")
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.resume_path = self._resume_path()
        if self.d.is_main:
            self._check_out_dir()
        seed_everything(cfg.seed)
        if self.d.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the prior's conv algorithms
        self.model = create_model(cfg.model, checkpoint=cfg.init_checkpoint)
        self.family = self.model.cfg.family
        self.cfg = cfg = resolve_recipe(cfg, self.family)
        self.prior_info = load_prior_weights(self.model, cfg.prior_checkpoint) if cfg.prior_checkpoint else None
        if cfg.lock_prior:
            if self.model.prior_module is None:
                raise PriorCLIPError(f"--lock-prior: model {cfg.model!r} has no prior")
            self.model.prior_module.requires_grad_(False)
        if cfg.lock_text:
            for p in self._text_parameters():
                p.requires_grad_(False)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(self.d.device)
        self.model.train()
        self._lock_prior_bn()
        self.ddp = self.model
        if self.d.enabled:
            ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        pir = self.family == FAMILY_PIR
        self.loss_fn = PIRLoss(affiliation=cfg.affiliation) if pir else ClipAffLoss(affiliation=cfg.affiliation)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps,
                                        no_decay=pir_no_weight_decay if pir else no_weight_decay)
        self.scaler = torch.amp.GradScaler(self.d.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.history: list[dict[str, float]] = []  # per-step losses (tests compare resumed curves with these)
        self.val_history: list[dict[str, Any]] = []  # every validation of the run, earlier segments included
        self.data_identity: dict[str, Any] | None = None  # set by fit(); saved so a resume can compare
        self.resume_notes: list[str] = []  # how a resumed run adapted to a changed geometry or data

    # ------------------------------------------------------------------ bookkeeping
    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if r is None:
            return None
        if r == "auto":
            p = self.ckpt_dir / "latest.pt"
            return p if p.is_file() else None
        if not Path(r).is_file():
            raise CheckpointError(f"--resume: checkpoint not found: {r}")
        return Path(r)

    def _check_out_dir(self) -> None:
        latest = self.ckpt_dir / "latest.pt"
        if latest.exists() and self.resume_path is None and not self.cfg.overwrite:
            raise PriorCLIPError(
                f"{self.out} already holds a run ({latest}); continue it with --resume auto, or pass --overwrite or "
                "another --out"
            )
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PriorCLIPError(f"output folder {self.out} is not writable: {e.strerror or e}") from None
        # --overwrite clears the old run's logs only once this run's data have loaded (fit), so a run that fails
        # early leaves the old one as it was

    def _lock_prior_bn(self) -> None:
        if self.cfg.lock_prior:
            self.model.prior_module.eval()

    def _temperatures(self) -> dict[str, float]:
        """What scales the logits: CLIP's exp(logit_scale), or PIR's two temperatures (logits are divided by them)."""
        if self.family == FAMILY_PIR:
            return {"temp": float(self.model.temp.detach()), "temp2": float(self.model.temp2.detach())}
        return {"logit_scale": float(self.model.logit_scale.detach().exp())}

    def _text_parameters(self) -> list[nn.Parameter]:
        """The text tower: PIR's BERT and its projection (LCA stays trainable), or CLIP's whole text transformer."""
        m = self.model
        if self.family == FAMILY_PIR:
            return [*m.text_encoder.parameters(), *m.text_proj.parameters()]
        modules = (m.token_embedding, m.transformer, m.ln_final)
        return [p for mod in modules for p in mod.parameters()] + [m.positional_embedding, m.text_projection]

    def save(self, path: Path, epoch: int, step_in_epoch: int, with_state: bool = True) -> None:
        if not self.d.is_main:
            return
        extra: dict[str, Any] = {"epoch": epoch, "step": self.step}
        if with_state:
            extra["train_state"] = {
                "format": STATE_FORMAT,
                "step": self.step,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "train_config": self.cfg.to_dict(),
                "history": self.history,
                "val_history": self.val_history,
                "world_size": self.d.world,
                "global_batch": self.cfg.batch_size * self.cfg.accum_freq * self.d.world,
                "data": self.data_identity,
            }
        save_checkpoint(self.model, path, **extra)

    def read_resume_state(self, path: Path) -> tuple[Checkpoint, dict[str, Any]]:
        """Read a resumable checkpoint and check everything but the data (which needs them loaded): fails fast."""
        ckpt: Checkpoint = read_checkpoint(path)
        state = ckpt.extra.get("train_state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: no training state to resume from (weights-only checkpoint?); use --init-checkpoint for weights")
        if ckpt.config is not None and ckpt.config != self.model.cfg:
            raise CheckpointError(f"{path}: saved for model {ckpt.config.name!r}, this run builds {self.model.cfg.name!r}")
        old = state["train_config"]
        for k in ("seed", "epochs"):
            if old.get(k) != getattr(self.cfg, k):
                raise CheckpointError(
                    f"{path}: --{k} was {old.get(k)} in the saved run, now {getattr(self.cfg, k)}; a resumed run must keep it"
                )
        self._check_geometry(path, state)
        return ckpt, state

    def _check_geometry(self, path: Path, state: dict[str, Any]) -> None:
        """The global batch (processes x batch x accum) fixes each step's samples and the schedule, so it must stay;
        how it is split may change: the sampler hands every step the same samples (EpochBatchSampler)."""
        cfg, old = self.cfg, state["train_config"]
        w0 = int(state.get("world_size") or self.d.world)  # older checkpoints did not record it
        was = (w0, int(old["batch_size"]), int(old["accum_freq"]))
        now = (self.d.world, cfg.batch_size, cfg.accum_freq)

        def split(w: int, b: int, a: int) -> str:
            return f"{w} process{'es' if w != 1 else ''} x --batch-size {b} x --accum-freq {a}"

        if math.prod(was) != math.prod(now):
            raise CheckpointError(
                f"{path}: the saved run's global batch was {math.prod(was)} ({split(*was)}), this run's is "
                f"{math.prod(now)} ({split(*now)}); a resumed run must keep it (each step's samples and the LR "
                f"schedule depend on it): pick --batch-size/--accum-freq so that processes x batch x accum = "
                f"{math.prod(was)}, or start a new run from these weights with --init-checkpoint {path} and another --out"
            )
        if was != now:
            self.resume_notes.append(
                f"global batch {math.prod(now)} split as {split(*now)} (the saved run: {split(*was)}); every step "
                "sees the same samples (BatchNorm statistics and per-process class centres follow the new split)"
            )

    def _check_data(self, path: Path, state: dict[str, Any], data: TrainData) -> None:
        old, new = state.get("data"), data.identity
        if old and old != new:
            if old.get("kind") != new["kind"]:
                what = f"{old.get('kind')} data then, {new['kind']} now"
            elif old.get("samples") != new["samples"]:
                what = f"{old.get('samples')} samples then, {new['samples']} now"
            else:
                what = f"the same {new['samples']} samples in number, but other images or captions"
            if not self.cfg.accept_new_data:
                raise CheckpointError(
                    f"{path}: the training data differ from the saved run's ({what}); resume with the same --data, "
                    f"--split and images, add --accept-new-data to go on with this run on the new data, or start a "
                    f"new run from these weights with --init-checkpoint {path} and another --out"
                )
            self.resume_notes.append(f"training data changed ({what}); going on with the new data (--accept-new-data)")
        split_changed = (state.get("world_size", self.d.world), state["train_config"].get("workers")) != (
            self.d.world, self.cfg.workers)
        if new["kind"] == "wds" and split_changed:
            self.resume_notes.append(
                "the webdataset stream is split by process and loader worker, which changed: the rest of the current "
                "epoch is a new random draw, not the one the saved run would have seen"
            )

    def load_state(
        self, path: Path, data: TrainData | None = None, resume: tuple[Checkpoint, dict[str, Any]] | None = None
    ) -> tuple[int, int]:
        """Restore weights, optimiser, scaler, RNG, step and histories; returns (epoch, step in epoch).

        ``resume``: what :meth:`read_resume_state` returned (else it is read here); ``data``: compared with the
        saved run's."""
        ckpt, state = resume if resume is not None else self.read_resume_state(path)
        if data is not None:
            self._check_data(path, state, data)
        load_checkpoint(self.model, ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.val_history = self._merged_val_history(state.get("val_history", []))
        return int(state["epoch"]), int(state["step_in_epoch"])

    def _merged_val_history(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The checkpoint's validations plus those in metrics.jsonl up to its step: the epoch-end checkpoint is
        written before that epoch's validation, so the log can hold one the checkpoint lacks. Later log lines come
        from a segment that stopped without saving and are replayed by this one."""
        def key(e: dict[str, Any]) -> tuple:
            return e.get("epoch"), e.get("step"), bool(e.get("partial_epoch"))

        merged: dict[tuple, dict[str, Any]] = {}
        log = self.out / "metrics.jsonl"
        if self.d.is_main and log.is_file():
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short when a process was killed mid-write
                    continue
                if not (isinstance(rec, dict) and rec.get("type") == "val" and isinstance(rec.get("step"), int)):
                    continue
                if rec["step"] <= self.step:
                    e = {k: v for k, v in rec.items() if k not in ("type", "time", "split")}
                    merged[key(e)] = e
        merged.update((key(e), e) for e in saved)
        return sorted(merged.values(), key=lambda e: (e.get("step") or 0, e.get("epoch") or 0))

    # ------------------------------------------------------------------ one optimiser step
    def _embed(self, micro: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.d.device
        pixels = tdata.normalize_on_device(micro["pixels"].to(dev, non_blocking=True))
        tokens = micro["tokens"]
        if self.family == FAMILY_PIR:  # padded to this batch's longest caption, as PIR-pytorch trains
            tokens = trim_padding(tokens)
        tokens = tokens.to(dev, non_blocking=True)
        with autocast(dev, self.cfg.precision):
            return self.ddp(pixels, tokens)

    def train_step(self, micros: list[dict]) -> dict[str, float]:
        """Forward/backward over ``accum_freq`` micro-batches and one optimiser step; returns the loss terms."""
        losses = self.forward_backward(micros)
        self.optimizer_step()
        return losses

    def forward_backward(self, micros: list[dict]) -> dict[str, float]:
        """Accumulate the gradient of the loss over all micro-batches together (labels over the whole batch)."""
        for m in micros:
            if "pixels" not in m:
                raise DataError(f"every image of a batch failed to decode, e.g. {m['skipped'][0][0]}: {m['skipped'][0][1]}")
        names = [n for m in micros for n in m["names"]]
        labels = affiliation_labels(names, self.d.device)
        # PIR's contrastive targets: every pair of the same image is a positive (ids are global, gathered by the loss)
        ids = {"image_ids": torch.cat([m["image_ids"] for m in micros]).to(self.d.device)} \
            if self.family == FAMILY_PIR else {}
        if len(micros) == 1:
            img, txt, scale = self._embed(micros[0])
            losses = self.loss_fn(img, txt, scale, labels, **ids)
            self.scaler.scale(sum(losses.values())).backward()
        else:
            with torch.no_grad(), preserved_bn_stats(self.model):
                cached = [self._embed(m)[:2] for m in micros]
            for j, m in enumerate(micros):
                last = j == len(micros) - 1
                sync = nullcontext() if last or not self.d.enabled else self.ddp.no_sync()
                with sync:
                    img_j, txt_j, scale = self._embed(m)
                    if not last:  # the logit scale's gradient must be counted once, and in DDP's synced pass
                        scale = scale.detach()
                    imgs = [img_j if k == j else c[0] for k, c in enumerate(cached)]
                    txts = [txt_j if k == j else c[1] for k, c in enumerate(cached)]
                    losses = self.loss_fn(torch.cat(imgs), torch.cat(txts), scale, labels, **ids)
                    self.scaler.scale(sum(losses.values())).backward()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = sum(out.values())
        return out

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.family != FAMILY_PIR:  # PIR's temperatures are unclamped (spec §1B)
            clamp_logit_scale(self.model)

    # ------------------------------------------------------------------ validation
    def _val_set(self, split: str | None, limit: int | None = None):
        cfg = self.cfg
        if split is None:
            return None
        json_path = cfg.val_data or (cfg.data if tdata.detect_type(cfg.data) == "karpathy" and cfg.data_type in ("auto", "karpathy") else None)
        if json_path is None:
            return None
        from priorclip.data import PROTOCOL_PIR, PROTOCOL_PRIORCLIP, load_retrieval_set

        protocol = PROTOCOL_PIR if self.family == FAMILY_PIR else PROTOCOL_PRIORCLIP
        try:
            ds = load_retrieval_set(json_path, cfg.val_images or cfg.images, split, protocol)
        except DataError as e:
            if "no images in split" in str(e):
                return None
            raise
        return ds.subset(limit) if limit else ds

    def evaluate(self, dataset) -> dict[str, float]:
        from priorclip.encoder import TorchEncoder
        from priorclip.retrieval import evaluate

        enc = TorchEncoder(self.model, self.d.device, torch.float32)
        try:
            ev = evaluate(enc, dataset, batch_size=self.cfg.val_batch_size, progress=False, workers=max(1, self.cfg.workers))
        finally:
            self.model.train()
            self._lock_prior_bn()
        return ev.metrics

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        t_start = time.perf_counter()
        # the checkpoint's own checks run before the (possibly long) decoding of the data; the data's after it
        resume = self.read_resume_state(self.resume_path) if self.resume_path is not None else None
        data = TrainData(cfg, self.model.cfg, d, self.out)
        self.data_identity = data.identity
        total = cfg.epochs * data.steps_per_epoch
        if cfg.max_steps is not None:  # a step budget: equal for runs compared at the same cost
            total = min(total, cfg.max_steps)
        self.cfg = cfg = resolve_recipe(cfg, self.family, total)  # PIR's warm-up: 10% of the run
        start_epoch, start_in_epoch = 0, 0
        if resume is not None:
            start_epoch, start_in_epoch = self.load_state(self.resume_path, data, resume)
        val_set, test_set = self._val_set(cfg.val_split, cfg.val_limit), self._val_set(cfg.test_split)
        if d.is_main and cfg.overwrite and resume is None:
            for f in ("metrics.jsonl", "summary.json"):
                (self.out / f).unlink(missing_ok=True)
        log = MetricsLog(self.out, d.is_main, cfg.tensorboard)
        if d.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
            print(f"[train] {self.model.cfg.name} on {device_name(d.device)} x{d.world}; {data.description}; "
                  f"{data.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global batch "
                  f"{cfg.batch_size * cfg.accum_freq * d.world}" + (f"; resuming at step {self.step}" if self.step else ""),
                  file=sys.stderr)
            for note in self.resume_notes:
                print(f"[train] resume: {note}", file=sys.stderr)
        skipped_stream, stream_skips = 0, []  # images dropped from batches (decoded on the fly), this process
        samples_done, train_seconds, data_seconds = 0, 0.0, 0.0
        stopped: str | None = None
        epoch = start_epoch
        with StopFlag() as flag:
            for epoch in range(start_epoch, cfg.epochs):
                # a run stopped on an epoch's last step resumes with that epoch's end (checkpoints, validation)
                first = min(start_in_epoch, data.steps_per_epoch) if epoch == start_epoch else 0
                it = data.loader(epoch, first) if first < data.steps_per_epoch else None
                bar = tqdm(total=data.steps_per_epoch, initial=first, desc=f"epoch {epoch}", unit="step",
                           disable=not (cfg.progress and d.is_main), leave=False)
                for k in range(first, data.steps_per_epoch):
                    t0 = time.perf_counter()
                    try:
                        micros = [next(it) for _ in range(cfg.accum_freq)]
                    except RuntimeError as e:
                        # A worker killed by the stop signal all the same (ignore_stop_signals makes this rare):
                        # the last completed step is intact, so it is saved. With several processes the others
                        # are inside a collective of this step, so there is no consistent state to save.
                        if flag.reason is None or d.enabled or "DataLoader worker" not in str(e):
                            raise
                        stopped = flag.reason
                        self.save(self.ckpt_dir / "latest.pt", epoch, k)
                        break
                    t1 = time.perf_counter()
                    for m in micros:
                        skipped_stream += len(m["skipped"])
                        stream_skips.extend(m["skipped"][: max(0, 10_000 - len(stream_skips))])
                    set_lr(self.optimizer, lr_at(self.step, cfg.lr, cfg.warmup, total, cfg.schedule))
                    losses = self.train_step(micros)
                    if d.device.type == "cuda" and (self.step + 1) % cfg.log_every == 0:
                        torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    n = sum(len(m["names"]) for m in micros) * d.world
                    samples_done += n
                    train_seconds += t2 - t0
                    data_seconds += t1 - t0
                    self.step += 1
                    self.history.append(losses)
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses['loss']:.3f}")
                    if self.step % cfg.log_every == 0 or self.step == 1:
                        log.write("train", self.step, epoch=epoch, lr=self.optimizer.param_groups[0]["lr"],
                                  **self._temperatures(), samples_per_s=n / max(t2 - t0, 1e-9),
                                  data_wait_s=t1 - t0, skipped=skipped_stream, **losses)
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save(self.ckpt_dir / "latest.pt", epoch, k + 1)
                    reason = flag.reason
                    if cfg.stop_after is not None and self.step >= cfg.stop_after:
                        reason = reason or f"--stop-after {cfg.stop_after}"
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        reason = reason or f"--max-steps {cfg.max_steps}"
                    if cfg.max_wall_min is not None and time.perf_counter() - t_start > 60 * cfg.max_wall_min:
                        reason = reason or f"--max-wall-min {cfg.max_wall_min}"
                    if any_rank(reason is not None, d):
                        stopped = reason or "another process stopped"
                        self.save(self.ckpt_dir / "latest.pt", epoch, k + 1)
                        break
                bar.close()
                del it
                if stopped:
                    break
                if (epoch + 1) % max(1, cfg.resume_every_epochs) == 0 or epoch + 1 == cfg.epochs:
                    self.save(self.ckpt_dir / "latest.pt", epoch + 1, 0)
                if d.is_main and cfg.epoch_checkpoints:
                    self.save(self.ckpt_dir / f"epoch_{epoch + 1}.pt", epoch + 1, 0, with_state=False)
                if val_set is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                    if d.is_main:
                        m = self.evaluate(val_set)
                        self.val_history.append({"epoch": epoch + 1, "step": self.step, **m})
                        log.write("val", self.step, epoch=epoch + 1, split=cfg.val_split, **m)
                        print(f"[train] epoch {epoch + 1}: val mR {m['mR']:.2f} (R@1 i2t {m['i2t_R@1']:.2f}, t2i {m['t2i_R@1']:.2f})", file=sys.stderr)
                    d.barrier()
                # a stop that came during the epoch's end (its last step had been checked): stop here rather than
                # after the first step of the next epoch; a finished run just finishes
                if epoch + 1 < cfg.epochs and any_rank(flag.reason is not None, d):
                    stopped = flag.reason or "another process stopped"
                    if (epoch + 1) % max(1, cfg.resume_every_epochs) != 0:
                        self.save(self.ckpt_dir / "latest.pt", epoch + 1, 0)
                    break
        if stream_skips and d.is_main:
            with (self.out / "skipped_images.txt").open("a", encoding="utf-8") as f:
                f.writelines(f"{p}\t{e}\n" for p, e in stream_skips)
            print(f"[train] skipped {skipped_stream} unreadable samples while training (listed in "
                  f"{self.out / 'skipped_images.txt'})", file=sys.stderr)
        interrupted = stopped is not None and (stopped.startswith("SIG") or stopped.startswith("another") or stopped.startswith("--stop-after"))
        summary: dict[str, Any] = {
            "model": self.model.cfg.name,
            "affiliation_loss": cfg.affiliation,
            "prior_checkpoint": self.prior_info,
            "steps": self.step,
            "planned_steps": total,
            "epochs_planned": cfg.epochs,
            "stopped": stopped,
            "global_batch": cfg.batch_size * cfg.accum_freq * d.world,
            "train_samples": data.n_samples,
            "skipped_images": len(data.skipped_at_load) + skipped_stream,
            "samples_per_s": samples_done / train_seconds if train_seconds else None,
            "data_wait_fraction": data_seconds / train_seconds if train_seconds else None,
            "train_seconds": train_seconds,
            "wall_seconds": None,
            "device": device_name(d.device),
            "world_size": d.world,
            "precision": cfg.precision,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "val": self.val_history,  # every validation of the run, those of earlier (resumed) segments included
            "resume_notes": self.resume_notes,
            "val_set": val_set.describe() if val_set is not None else None,
            "final_loss": self.history[-1] if self.history else None,
            "config": cfg.to_dict(),
        }
        if interrupted:
            summary["wall_seconds"] = time.perf_counter() - t_start
            if d.is_main:
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
            log.close()
            raise TrainingInterrupted(
                f"stopped by {stopped} at step {self.step}/{total}; resumable checkpoint: {self.ckpt_dir / 'latest.pt'} "
                f"(continue with --resume auto --out {self.out})"
            )
        if stopped and val_set is not None and d.is_main:  # a time limit ended training mid-epoch: one last point
            m = self.evaluate(val_set)
            self.val_history.append({"epoch": epoch + 1, "step": self.step, "partial_epoch": True, **m})
            log.write("val", self.step, epoch=epoch + 1, split=cfg.val_split, partial_epoch=True, **m)
        if d.is_main:
            save_checkpoint(self.model, self.out / "model.pt", epoch=epoch, step=self.step)
            if test_set is not None:
                m = self.evaluate(test_set)
                summary["test"] = {"split": cfg.test_split, **m}
                log.write("test", self.step, split=cfg.test_split, **m)
                print(f"[train] test mR {m['mR']:.2f}", file=sys.stderr)
            summary["wall_seconds"] = time.perf_counter() - t_start
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        log.close()
        d.barrier()
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary (also written to ``out/summary.json``).

    A process group started here (under torchrun) is closed again at the end."""
    import torch.distributed as dist

    owned = not (dist.is_available() and dist.is_initialized())
    made = _missing_dirs(Path(cfg.out)) if os.environ.get("RANK", "0") == "0" else []
    try:
        return Trainer(cfg).fit()
    except TrainingInterrupted:
        raise
    except BaseException:
        _remove_unused(made)
        raise
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# What a run writes before its first step: removed with the folders it created when it fails that early.
_SCAFFOLDING = ("config.json", "skipped_images.txt", "events.out.tfevents.")


def _missing_dirs(out: Path) -> list[Path]:
    """The folders a run in ``out`` would create: missing ancestors, ``out``, and its sub-folders; deepest first."""
    made = [q for q in (out / "checkpoints", out / "tensorboard") if not q.exists()]
    for q in (out, *out.parents):
        if q.exists():
            break
        made.append(q)
    return made


def _remove_unused(made: list[Path]) -> None:
    """Remove the folders this failed run created if they hold nothing but scaffolding: no checkpoint, no metrics.
    A folder that existed before the run is never touched, nor is anything else found in one it created."""
    for q in made:  # deepest first
        try:
            entries = list(q.iterdir())
            if all(e.is_file() and e.name.startswith(_SCAFFOLDING) for e in entries):
                for e in entries:
                    e.unlink()
                q.rmdir()
        except OSError:  # gone already, or not ours to empty: leave it
            continue
