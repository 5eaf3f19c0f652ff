"""``priorclip train`` and ``priorclip train-prior`` (registered lazily by ``priorclip.cli``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from priorclip.cliutils import user_errors

_P = click.Path(path_type=str)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--data", required=True, help="Training data: a Karpathy-style dataset JSON (with --images), a CSV/TSV "
              "(image + caption columns), or webdataset tars with RS5M keys ('shards/{000..127}.tar', a glob or a folder).")
@click.option("--images", type=_P, help="Image folder the JSON/CSV file names are relative to.")
@click.option("--data-type", type=click.Choice(["auto", "karpathy", "csv", "wds"]), default="auto", show_default=True)
@click.option("--split", default="train", show_default=True, help="Training split of a dataset JSON.")
@click.option("--val-data", type=_P, help="Karpathy JSON for validation (default: --data when it is one).")
@click.option("--val-images", type=_P, help="Image folder of --val-data (default: --images).")
@click.option("--val-split", default="val", show_default=True, help="Split validated after every epoch ('none' to skip).")
@click.option("--val-limit", type=click.IntRange(min=1), help="Validate on N images spread over the scene classes (seeded), not the first N.")
@click.option("--test-split", default="test", show_default=True, help="Split evaluated once at the end ('none' to skip).")
@click.option("--train-num-samples", type=click.IntRange(min=1), help="Samples per epoch for webdataset data (default: counted).")
@click.option("--model", default="priorclip-vit-b32", show_default=True, help="Registered config to train (see 'priorclip info'): the open-domain PriorCLIP family or the closed-domain PIR (pir-swin-t-bert).")
@click.option("--init-checkpoint", type=_P, help="Start from these weights (strict load), e.g. an official PriorCLIP .pt or PIR checkpoint_best.pth.")
@click.option("--prior-checkpoint", type=_P, help="Load the prior network before training: a 'priorclip train-prior' output (res_visual.* / conv_encoder.*), or for PIR a torchvision ResNet-50 file such as RSP's aid_28-rsp-resnet-50-ckpt.pth.")
@click.option("--lock-prior", is_flag=True, help="Freeze the prior network (weights and BatchNorm statistics). PIR's prior weights are always frozen, as in the reference; its BatchNorm statistics still update unless this is given.")
@click.option("--lock-text", is_flag=True, help="Freeze the text tower (CLIP: embeddings, transformer, ln_final, text_projection; PIR: BERT and text_proj).")
@click.option("--no-aff-loss", is_flag=True, help="Contrastive loss only (turn the affiliation loss off).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Per process and micro-batch.")
@click.option("--accum-freq", default=1, show_default=True, type=click.IntRange(min=1), help="Micro-batches per optimiser step (the loss sees all of them).")
@click.option("--lr", type=float, help="Peak learning rate. Default: the model family's recipe: 5e-4 (PriorCLIP), 6e-5 (PIR, spec §5B).")
@click.option("--wd", type=float, help="AdamW weight decay (PriorCLIP: not on norms, biases, logit scale; PIR: not on biases and LayerNorm/norm weights, as PIR-pytorch). Default: 0.2 (PriorCLIP), 0.01 (PIR).")
@click.option("--beta1", default=0.9, show_default=True, type=float)
@click.option("--beta2", type=float, help="Default: 0.999 (the PriorCLIP recipe), 0.98 (PIR).")
@click.option("--eps", default=1e-8, show_default=True, type=float)
@click.option("--warmup", type=click.IntRange(min=0), help="Linear warm-up steps. Default: 100 (PriorCLIP), 10%% of the run's steps (PIR).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "hf_linear", "const"]), default=None,
              help="After the warm-up. Default: cosine (PriorCLIP), hf_linear (PIR: linear to 0, transformers' schedule).")
@click.option("--grad-clip", type=float, help="Clip the gradient norm to this value.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="bf16/fp16 autocast (fp16 with a gradient scaler).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute transformer blocks in backward (less memory).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0), help="Data-loader processes.")
@click.option("--cache", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Decode all images once into memory (auto: datasets up to 200k images).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto (torchrun: one GPU per process).")
@click.option("--out", default="runs/train", show_default=True, type=_P, help="Run folder (checkpoints, metrics.jsonl, summary.json).")
@click.option("--resume", type=_P,
              help="Continue a run: a checkpoint with training state, or 'auto' (OUT/checkpoints/latest.pt if there "
              "is one, else start). The run goes on exactly where it stopped, so it must keep --seed, --epochs, the "
              "global batch (processes x --batch-size x --accum-freq; how it is split may change, which is "
              "reported) and the training data (same samples, images and captions); a change in these is refused, "
              "naming the way out. Summary and checkpoints keep every validation of the run.")
@click.option("--accept-new-data", is_flag=True, help="With --resume: go on although the training data differ from the "
              "saved run's (steps, schedule and optimiser state carry over; reported).")
@click.option("--overwrite", is_flag=True, help="Start afresh in an --out folder that already holds a run.")
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(min=0), help="Also save a resumable checkpoint every N steps.")
@click.option("--resume-every-epochs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Write the resumable checkpoint (weights + optimiser state) every N epochs; always at the end and "
              "when stopped.")
@click.option("--no-epoch-checkpoints", is_flag=True, help="Keep only checkpoints/latest.pt and model.pt, not epoch_K.pt.")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop resumably after N steps in all (split a run over several calls).")
@click.option("--max-wall-min", type=float, help="End training after this many minutes, then validate and test as usual.")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="End training after N optimiser steps (the LR schedule anneals over them), then validate, test and "
              "save as usual: a step budget that is the same for every run compared.")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--val-every", default=1, show_default=True, type=click.IntRange(min=1), help="Validate every N epochs.")
@click.option("--val-batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@user_errors
def train(**kw) -> None:
    """Train PriorCLIP (contrastive InfoNCE + the affiliation loss, spec §4A) or PIR (--model pir-swin-t-bert: soft
    same-image contrastive + its affiliation term, unclamped temperatures, spec §4B): AdamW, warm-up + decay, AMP, DDP.
    Unset optimiser options take the family's reference recipe (recorded in config.json).

    \b
    Single GPU:  priorclip train --data dataset_rsicd.json --images images/ --out runs/rsicd --precision bf16
    Several:     torchrun --nproc_per_node 4 -m priorclip.training.cli --data ... (same options)
    """
    from priorclip.training.trainer import TrainConfig, train as run

    kw["affiliation"] = not kw.pop("no_aff_loss")
    kw["progress"] = not kw.pop("no_progress")
    kw["epoch_checkpoints"] = not kw.pop("no_epoch_checkpoints")
    for k in ("val_split", "test_split"):
        if kw[k] in ("none", ""):
            kw[k] = None
    summary = run(TrainConfig(**kw))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the first process reports
        return
    if summary.get("test"):
        click.echo(json.dumps({"test": summary["test"], "samples_per_s": summary["samples_per_s"]}, indent=2))
    click.echo(f"wrote {Path(kw['out']) / 'model.pt'} and {Path(kw['out']) / 'summary.json'}")


@click.command("train-prior", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--data", required=True, type=_P, help="Karpathy-style dataset JSON whose images carry a 'label' (else the file-name prefix is the class).")
@click.option("--images", required=True, type=_P, help="Image folder the JSON's file names are relative to.")
@click.option("--model", default="priorclip-vit-b32", show_default=True,
              help="Config whose prior network is trained: res_visual (the ModifiedResNet) of a PriorCLIP config, or "
              "conv_encoder (the torchvision-layout ResNet) of a PIR config (pir-swin-t-bert, pir-tiny).")
@click.option("--split", default="train", show_default=True)
@click.option("--val-split", default="val", show_default=True, help="'none' to skip.")
@click.option("--test-split", default="test", show_default=True, help="'none' to skip.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--wd", default=0.05, show_default=True, type=float)
@click.option("--warmup", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--label-smoothing", default=0.1, show_default=True, type=float)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", type=click.IntRange(min=2), help="Train on a random subset of N training images only (quick checks).")
@click.option("--max-wall-min", type=float, help="Stop training after this many minutes (then evaluate and save).")
@click.option("--out", default="runs/prior", show_default=True, type=_P, help="Writes prior.pt, prior_summary.json, metrics.jsonl.")
@click.option("--no-progress", is_flag=True)
@user_errors
def train_prior(**kw) -> None:
    """Train a model's prior network as a scene classifier (the prior + a linear head), report val/test top-1.

    OUT/prior.pt holds the prior under the retrieval model's keys (res_visual.* or conv_encoder.*). Then start
    retrieval training from it: priorclip train --model <same config> --prior-checkpoint OUT/prior.pt ...
    (for PIR, --prior-checkpoint also takes a torchvision ResNet state dict such as the RSP AID ResNet-50).
    """
    from priorclip.training.prior import PriorTrainConfig, train_prior as run

    kw["progress"] = not kw.pop("no_progress")
    for k in ("val_split", "test_split"):
        if kw[k] in ("none", ""):
            kw[k] = None
    summary = run(PriorTrainConfig(**kw))
    click.echo(json.dumps(summary["metrics"], indent=2))


if __name__ == "__main__":  # torchrun -m priorclip.training.cli ...
    train()
