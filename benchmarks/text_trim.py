"""How much work trimming captions to the batch's longest one saves (exact: causal mask + EOT pooling).

    python -m priorclip.benchmarks.text_trim --dataset ../shared/data/aid-rsicd/dataset_rsicd_aid.json \
        --images ../shared/data/aid-rsicd/images --out benchmarks/results/text-trim-aid-rsicd.json

Counts encode_text FLOPs (torch FlopCounterMode, meta tensors) at each batch's max EOT+1 versus the fixed 77 tokens.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from priorclip.cliutils import user_errors, write_json
from priorclip.data import load_karpathy
from priorclip.model import PriorCLIP
from priorclip.registry import get_config
from priorclip.tokenizer import tokenize


def text_gflop(model: PriorCLIP, length: int) -> float:
    tokens = torch.zeros(1, length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_text(tokens)
    return counter.get_total_flops() / 1e9


@click.command()
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="Karpathy-style dataset JSON.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Its image folder.")
@click.option("--split", default="test", show_default=True)
@click.option("--batch", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--model", "model_name", default="priorclip-vit-b32", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the result as JSON.")
@user_errors
def main(dataset: Path, images: Path, split: str, batch: int, model_name: str, out: Path | None) -> None:
    """FLOPs per caption with and without trimming, on a dataset's captions in evaluation order."""
    ds = load_karpathy(dataset, images, split, check_files=False)
    cfg = get_config(model_name)
    lengths = tokenize(ds.captions, cfg.text.context_length).argmax(-1) + 1  # EOT position + 1
    with torch.device("meta"):
        model = PriorCLIP(cfg).eval()
    model.trim_text = False
    full = text_gflop(model, cfg.text.context_length)
    per_batch = [int(lengths[s : s + batch].max()) for s in range(0, len(lengths), batch)]
    trimmed = sum(text_gflop(model, n) * len(lengths[i * batch : (i + 1) * batch]) for i, n in enumerate(per_batch))
    trimmed /= len(lengths)
    result = {
        "dataset": str(dataset), "split": split, "model": model_name, "n_captions": len(lengths), "batch": batch,
        "tokens_incl_sot_eot": {"mean": float(lengths.float().mean()), "p99": float(np.percentile(lengths.numpy(), 99)),
                                "max": int(lengths.max())},
        "batch_lengths": per_batch, "gflop_per_caption_full": full, "gflop_per_caption_trimmed": trimmed,
        "saving_factor": full / trimmed, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
    }
    click.echo(f"{len(lengths)} captions, mean {result['tokens_incl_sot_eot']['mean']:.1f} tokens: "
               f"{full:.2f} GFLOP at {cfg.text.context_length} vs {trimmed:.2f} trimmed (x{full / trimmed:.2f})")
    if out:
        write_json(out, result)


if __name__ == "__main__":
    main()
