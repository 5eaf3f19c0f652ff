"""``priorclip``: inspect models, embed images or captions, evaluate retrieval, train."""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from priorclip.cliutils import ProductGroup, build_model, ensure_writable_dir, model_options, resolve_device, write_json
from priorclip.errors import DataError, PriorCLIPError

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@click.group(
    cls=ProductGroup,
    lazy={
        "train": ("priorclip.training.cli:train", "Train PriorCLIP (contrastive + affiliation loss)."),
        "train-prior": ("priorclip.training.cli:train_prior", "Train the ResNet prior as a scene classifier."),
    },
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(package_name="priorclip")
def main() -> None:
    """PriorCLIP remote-sensing image-text retrieval: the reference model and its tools.

    Start with 'priorclip demo' (embeds and evaluates a generated sample with the default model), 'priorclip info'
    (configs, parameters, FLOPs) or 'priorclip eval --help'.
    """


@main.command()
@click.option("--model", "names", multiple=True, help="Config(s) to show; default: all registered.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(names: tuple[str, ...], as_json: bool) -> None:
    """Registered configs with parameter counts and FLOPs per image / caption."""
    from priorclip.profile import profile_config
    from priorclip.registry import get_config, list_models

    rows = {n: {"config": get_config(n).to_dict(), **profile_config(get_config(n))} for n in (names or list_models())}
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<20} {'gate':<12} {'params':>9} {'vision':>8} {'prior':>8} {'text':>8} {'GFLOP/img':>10} {'(prior)':>8} {'GFLOP/txt77':>11}")
    for n, r in rows.items():
        m = lambda k: f"{r[k] / 1e6:.2f}M"  # noqa: E731
        gate = r["config"]["gate"] if r["config"]["prior"] else "-"
        click.echo(
            f"{n:<20} {gate:<12} {m('params_total'):>9} {m('params_vision'):>8} {m('params_prior'):>8} {m('params_text'):>8} "
            f"{r['gflop_image']:>10.2f} {r['gflop_image_prior']:>8.2f} {r['gflop_text']:>11.2f}"
        )


def _device_option(fn):
    return click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(fn)


def _precision_option(fn):
    return click.option(
        "--precision",
        type=click.Choice(list(PRECISIONS)),
        default="fp32",
        show_default=True,
        help="fp32 is the reference path; fp16/bf16 run under autocast.",
    )(fn)


def _encoder(model_name, checkpoint, gate, device, precision):
    import torch

    from priorclip.encoder import TorchEncoder

    model = build_model(model_name, checkpoint, gate)
    return TorchEncoder(model, resolve_device(device), getattr(torch, PRECISIONS[precision]))


@main.command()
@model_options
@click.option("--images", type=click.Path(path_type=Path), help="Folder of images to embed (files directly inside).")
@click.option("--captions", type=click.Path(path_type=Path), help="Captions to embed: a .txt (one per line) or a JSON list.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .npy; the index goes to <out>.index.jsonl.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed in <out>.skipped.txt) instead of stopping.")
@_device_option
@_precision_option
def embed(model_name, checkpoint, gate, images, captions, out, batch_size, skip_bad, device, precision) -> None:
    """Embed a folder of images or a file of captions into an .npy matrix plus an index file.

    Row i of the .npy (float32 [N, embed_dim], L2-normalised) is described by line i of <out>.index.jsonl.
    """
    import numpy as np

    from priorclip.data import list_images, read_captions
    from priorclip.retrieval import embed_images, embed_texts
    from priorclip.transforms import open_image

    if (images is None) == (captions is None):
        raise PriorCLIPError("give exactly one of --images DIR or --captions FILE")
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
    ensure_writable_dir(out.parent)
    if images is not None:
        paths = list_images(images)
        skipped = []
        if skip_bad:  # decode-check first so the matrix rows and the index stay aligned
            good = []
            for p in paths:
                try:
                    open_image(p)
                    good.append(p)
                except DataError as e:
                    skipped.append(f"{p}\t{e}")
            paths = good
            if not paths:
                raise DataError(f"none of the images in {images} could be read")
        enc = _encoder(model_name, checkpoint, gate, device, precision)
        emb = embed_images(enc, paths, batch_size)
        index = [{"row": i, "image": str(p)} for i, p in enumerate(paths)]
        if skipped:
            out.with_name(out.stem + ".skipped.txt").write_text("\n".join(skipped) + "\n", encoding="utf-8")
            click.echo(f"skipped {len(skipped)} unreadable images (see {out.stem}.skipped.txt)", err=True)
    else:
        caps = read_captions(captions)
        enc = _encoder(model_name, checkpoint, gate, device, precision)
        emb = embed_texts(enc, caps, batch_size)
        index = [{"row": i, "caption": c} for i, c in enumerate(caps)]
    np.save(out, emb.numpy().astype(np.float32))
    index_path = out.with_name(out.stem + ".index.jsonl")
    index_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index), encoding="utf-8")
    click.echo(f"wrote {out} {tuple(emb.shape)} and {index_path}")


def _run_eval(enc, dataset, batch_size, workers, label: str, extra: dict, out_json: Path | None, save_embeddings: Path | None):
    import torch

    from priorclip.retrieval import evaluate, format_table

    t0 = time.perf_counter()
    ev = evaluate(enc, dataset, batch_size=batch_size, workers=workers)
    wall = time.perf_counter() - t0
    click.echo(f"\n{ev.n_images} images, {ev.n_captions} captions, {wall:.1f} s on {enc.device}\n")
    click.echo(format_table({label: ev.metrics, "chance (random ranking)": ev.chance}))
    report = {
        "metrics": ev.metrics,
        "chance": ev.chance,
        "n_images": ev.n_images,
        "n_captions": ev.n_captions,
        "wall_s": wall,
        "device": str(enc.device),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "model": enc.model.cfg.to_dict(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        **extra,
    }
    if out_json:
        write_json(out_json, report)
        click.echo(f"metrics written to {out_json}")
    if save_embeddings:
        import numpy as np

        np.savez(save_embeddings, images=ev.image_emb.numpy(), texts=ev.text_emb.numpy(), caption_image=dataset.caption_image)
        click.echo(f"embeddings written to {save_embeddings}")
    return report


@main.command("eval")
@model_options
@click.option("--dataset", "dataset_json", required=True, type=click.Path(path_type=Path), help="Karpathy-style dataset JSON (e.g. dataset_rsicd.json).")
@click.option("--images", "image_root", required=True, type=click.Path(path_type=Path), help="Folder the JSON's file names are relative to.")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only N images spread over the scene classes (seeded; files sort by class, so never the first N) and their captions.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch (the reference uses 64).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1), help="Image decoding threads.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), help="Write the metrics and run details as JSON.")
@click.option("--save-embeddings", type=click.Path(path_type=Path), help="Write image/text embeddings to an .npz.")
@_device_option
@_precision_option
def eval_cmd(model_name, checkpoint, gate, dataset_json, image_root, split, limit, batch_size, workers, out_json, save_embeddings, device, precision) -> None:
    """Image-text retrieval on one split of a dataset: R@1/5/10 both ways and mR, as the reference computes them."""
    from priorclip.checkpoint import file_sha256
    from priorclip.data import load_karpathy

    dataset = load_karpathy(dataset_json, image_root, split)
    if limit:
        dataset = dataset.subset(limit)
    if checkpoint is None:
        click.echo("note: no --checkpoint given: the model has random weights, so recall will be near chance", err=True)
    enc = _encoder(model_name, checkpoint, gate, device, precision)
    extra = {
        "dataset": str(dataset_json),
        "split": split,
        "images_evaluated": dataset.describe()["coverage"],
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
    }
    _run_eval(enc, dataset, batch_size, workers, enc.model.cfg.name, extra, out_json, save_embeddings)


@main.command()
@click.option("--model", "model_name", default=None, help="Config name (default: priorclip-vit-b32).")
@click.option("--images", "n_images", default=64, show_default=True, type=click.IntRange(min=2), help="Generated images (5 captions each).")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@_device_option
def demo(model_name, n_images, out_dir, seed, device) -> None:
    """Embed and evaluate a generated sample with a randomly initialised model: the whole pipeline, no files needed."""
    import torch

    from priorclip.data import load_karpathy
    from priorclip.synthetic import make_sample

    ensure_writable_dir(out_dir)
    torch.manual_seed(seed)
    json_path, img_dir = make_sample(out_dir / "sample", n_images=n_images, seed=seed)
    click.echo(f"generated {n_images} images x 5 captions under {out_dir / 'sample'}")
    dataset = load_karpathy(json_path, img_dir)
    enc = _encoder(model_name, None, None, device, "fp32")
    _run_eval(enc, dataset, 32, 4, f"{enc.model.cfg.name} (random weights)", {"dataset": str(json_path)}, out_dir / "metrics.json", None)


if __name__ == "__main__":
    main()
