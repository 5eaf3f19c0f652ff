"""``priorclip``: inspect models, embed images or captions, evaluate retrieval, train."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click

from priorclip.cliutils import (
    ProductGroup,
    build_model,
    check_output_file,
    model_options,
    output_dir,
    resolve_device,
    write_json,
    write_npy,
    write_npz,
    write_text,
)
from priorclip.errors import DataError, PriorCLIPError

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROTOCOLS = ("priorclip", "pir")  # priorclip.data.PROTOCOLS, spelled here so --help needs no import


@click.group(
    cls=ProductGroup,
    lazy={
        "train": ("priorclip.training.cli:train", "Train PriorCLIP (contrastive + affiliation loss)."),
        "train-prior": ("priorclip.training.cli:train_prior", "Train the ResNet prior as a scene classifier."),
        "index": ("priorclip.serve.index_cli:index", "Build, extend, inspect and search a vector index (FAISS)."),
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
    click.echo(f"{'model':<20} {'gate / filter':<14} {'params':>9} {'vision':>8} {'prior':>8} {'text':>8} {'PAE':>8} "
               f"{'GFLOP/img':>10} {'(prior)':>8} {'GFLOP/txt':>10} {'(tokens)':>8}")
    for n, r in rows.items():
        m = lambda k: f"{r[k] / 1e6:.2f}M" if k in r else "-"  # noqa: E731
        c = r["config"]
        if c.get("family") == "pir":  # VIR + LCA are PIR's Progressive Attention Encoders
            gate, pae = f"VIR top-{c['filter_size']}", f"{(r['params_vir'] + r['params_lca']) / 1e6:.2f}M"
        else:
            gate, pae = (c["gate"] if c["prior"] else "-"), "-"
        click.echo(
            f"{n:<20} {gate:<14} {m('params_total'):>9} {m('params_vision'):>8} {m('params_prior'):>8} "
            f"{m('params_text'):>8} {pae:>8} {r['gflop_image']:>10.2f} {r['gflop_image_prior']:>8.2f} "
            f"{r['gflop_text']:>10.2f} {r['text_tokens']:>8}"
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


def _parse_shard(ctx, param, value: str | None) -> tuple[int, int] | None:
    from priorclip.shards import parse_shard

    if value is None:
        return None
    try:
        return parse_shard(value)
    except PriorCLIPError as e:
        raise click.BadParameter(str(e)) from None




@dataclass(frozen=True)
class _EmbedOutputs:
    npy: Path
    index: Path
    meta: Path
    skipped: Path


def _embed_outputs(out: Path) -> _EmbedOutputs:
    """The exact files an embed run writes, checked before any work."""
    npy = check_output_file(out, ".npy", option="--out")
    beside = lambda suffix: check_output_file(npy.with_name(npy.stem + suffix), option="--out")  # noqa: E731
    return _EmbedOutputs(npy, beside(".index.jsonl"), beside(".meta.json"), beside(".skipped.txt"))


def _shard_out(out: str, shard: tuple[int, int] | None) -> Path:
    """--out for --shards: a folder (existing, or written with a trailing slash) gets one file name per job, so every
    job of a fan-out can run the same command line."""
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return Path(out) / (f"embeddings-{shard[0]:05d}-of-{shard[1]:05d}.npy" if shard else "embeddings.npy")
    return Path(out)


def _embedding_meta(enc, checkpoint: Path | None, kind: str, emb, precision: str, shard: tuple[int, int] | None,
                    sources: list, skipped: int) -> dict:
    """<out>.meta.json: what a merge needs to trust the rows (the model's identity first: vectors of other weights
    share no space with these)."""
    from priorclip.provenance import EMBEDDINGS_FORMAT, checkpoint_sha256, engine_identity

    return {
        "format": EMBEDDINGS_FORMAT,
        "kind": kind,
        "count": int(emb.shape[0]),
        "embed_dim": int(emb.shape[1]),
        "identity": engine_identity(enc.config, checkpoint_sha256(checkpoint)),
        "precision": precision,
        "device": str(enc.device),
        "shard": {"index": shard[0], "count": shard[1]} if shard else None,
        "sources": [str(s) for s in sources],
        "skipped": skipped,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_embeddings(outs: _EmbedOutputs, emb, index: list[dict], meta: dict, skipped: list[str],
                      summary: str = "") -> None:
    """Write the matrix, its index and its meta (last: a complete run's mark), each atomically, and the list of what
    was left out (``summary`` counts it), or remove an earlier run's list, which would now describe nothing."""
    import numpy as np

    write_npy(outs.npy, np.asarray(emb, dtype=np.float32))
    write_text(outs.index, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index))
    write_json(outs.meta, meta)
    click.echo(f"wrote {outs.npy} {tuple(emb.shape)}, {outs.index} and {outs.meta}")
    if skipped:
        write_text(outs.skipped, "\n".join(skipped) + "\n")
        click.echo(f"wrote {outs.skipped}: {summary}, one per line with the reason", err=True)
    elif outs.skipped.exists():
        outs.skipped.unlink()


@main.command()
@model_options
@click.option("--images", type=click.Path(path_type=Path), help="Folder of images to embed (files directly inside).")
@click.option("--captions", type=click.Path(path_type=Path), help="Captions to embed: a .txt (one per line) or a JSON list.")
@click.option("--shards", "shard_patterns", multiple=True, metavar="PATTERN", help="Webdataset tars to embed: a path, a glob, brace notation ('d/train-{0000..0127}.tar', quoted) or a folder of tars; repeatable.")
@click.option("--shard", callback=_parse_shard, metavar="I/N", help="With --shards: embed only job I's share of N (0 <= I < N): the sorted shards at positions I, I+N, I+2N, ...")
@click.option("--out", required=True, type=click.Path(), help="Output .npy; beside it <out>.index.jsonl and <out>.meta.json. With --shards, a folder (or a path ending in /) gets embeddings-IIIII-of-NNNNN.npy.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images, samples or shards (listed in <out>.skipped.txt) instead of stopping.")
@_device_option
@_precision_option
def embed(model_name, checkpoint, gate, images, captions, shard_patterns, shard, out, batch_size, skip_bad, device,
          precision) -> None:
    """Embed a folder of images, a file of captions or webdataset shards into an .npy matrix plus index and meta.

    Writes <out>.npy (float32 [N, embed_dim], L2-normalised), <out>.index.jsonl (line i describes row i) and
    <out>.meta.json (format priorclip-embeddings/1: kind image or text, count, the model's identity, --shard, the
    sources), each atomically; 'priorclip index build/add --embeddings <out>.npy' reads them.

    Images: every format PIL reads (JPEG, PNG, TIFF, GIF, WebP, ...); other files in the folder are left out and
    named in <out>.skipped.txt. A multi-page TIFF or animated GIF is embedded from its first page (page 0; a note
    names them). Images over the pixel limit ($PRIORCLIP_MAX_PIXELS, default 268 Mpx, read from the header) or that
    fail to decode end the run with one line, or with --skip-bad are listed in <out>.skipped.txt with the reason.

    Shards (--shards, webdataset tars, plain or compressed; repeat it for several patterns): tar members group into
    samples by key, the member path up to the first dot of its base name. A sample's image is its member with an
    image extension (jpg, jpeg, png, tif, tiff, webp first, RS5M's img_content, any format PIL reads), decoded
    exactly as the same file in a folder; its captions, kept in the index, come from .txt or .caption (one per line)
    and .json (a string, a list, or an object's "captions"/"caption"/"text"). Index lines: {"row", "key", "shard",
    "member", "captions"}. Keys must be unique over the selected shards. A corrupt tar, a sample without an image and
    a repeated key are found from the tar headers before the model loads; with --skip-bad the first two are left
    out (<out>.skipped.txt: shard, key, reason; a tab between).

    --shard I/N fans the work out over any scheduler: the shards the patterns match are sorted, and job I takes those
    at positions I, I+N, I+2N, ... (whole shards: each job reads only its files), so N jobs running the same command
    cover every sample exactly once and their outputs merge into one index. A job left without a shard (N larger
    than the number of shards) writes empty outputs and says so.

    \b
    SLURM array:     sbatch --array=0-15 --wrap 'priorclip embed --shards "d/{0000..0127}.tar"
                       --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --out out/'
                     (a 1-based array 1-16: --shard $((SLURM_ARRAY_TASK_ID - 1))/16)
    Kubernetes:      an Indexed Job (completionMode: Indexed, completions: 16) whose container runs
                       priorclip embed --shards ... --shard $(JOB_COMPLETION_INDEX)/16 --out /results/
    Ray:             one task per i in range(16), each running the command with --shard {i}/16
    """
    modes = [name for name, value in (("--images", images), ("--captions", captions), ("--shards", shard_patterns))
             if value]
    if len(modes) != 1:
        raise PriorCLIPError("give exactly one of --images DIR, --captions FILE or --shards PATTERN"
                             + (f" (got {' and '.join(modes)})" if modes else ""))
    if shard is not None and not shard_patterns:
        raise PriorCLIPError("--shard I/N splits --shards: give the shard pattern(s) with --shards")
    if shard_patterns:
        _embed_shards(model_name, checkpoint, gate, shard_patterns, shard, out, batch_size, skip_bad, device, precision)
        return

    from priorclip.data import check_images, list_images, read_captions
    from priorclip.retrieval import embed_images, embed_texts

    # the exact files written, checked before any work; each is written atomically (never half a file under its name)
    outs = _embed_outputs(Path(out))
    skipped: list[str] = []
    n_not_images = 0
    if images is not None:
        listing = list_images(images)
        skipped = [f"{p}\t{reason}" for p, reason in listing.skipped]  # all that is left out, with the reason
        n_not_images = len(skipped)
        if listing.skipped:
            names = ", ".join(p.name for p, _ in listing.skipped[:5]) + (", ..." if len(listing.skipped) > 5 else "")
            click.echo(f"note: left out {_count(len(listing.skipped), 'file')} that PIL does not read as images ({names})",
                       err=True)
        enc = _encoder(model_name, checkpoint, gate, device, precision)
        checked = check_images(listing.files, skip_bad, enc.image_size)
        skipped += [f"{p}\t{reason}" for p, reason in checked.bad]
        if note := checked.multi_page_note():
            click.echo(note, err=True)
        paths, pages = checked.paths, checked.pages
        emb = embed_images(enc, paths, batch_size)
        index = [{"row": i, "image": str(p), **({"page": 0, "pages": pages[p]} if p in pages else {})}
                 for i, p in enumerate(paths)]
        kind, source = "image", images
    else:
        caps = read_captions(captions)
        enc = _encoder(model_name, checkpoint, gate, device, precision)
        _check_cleanable(enc.config, caps, captions)
        emb = embed_texts(enc, caps, batch_size)
        index = [{"row": i, "caption": c} for i, c in enumerate(caps)]
        kind, source = "text", captions
    emb = emb.numpy()
    meta = _embedding_meta(enc, checkpoint, kind, emb, precision, None, [source], len(skipped))
    bad = _count(len(skipped) - n_not_images, "unreadable image")
    _write_embeddings(outs, emb, index, meta, skipped,
                      f"{_count(len(skipped), 'file')} left out ({bad}, {_count(n_not_images, 'other file')})")


def _embed_shards(model_name, checkpoint, gate, patterns, shard, out, batch_size, skip_bad, device, precision) -> None:
    """``embed --shards``: select, scan (headers only, before the model loads), then stream and embed."""
    from priorclip.shards import embed_samples, expand_shards, iter_samples, scan_shards, select_shards

    matched = expand_shards(patterns)
    selected = select_shards(matched, *shard) if shard else matched
    outs = _embed_outputs(_shard_out(out, shard))
    if not selected:
        click.echo(f"note: --shard {shard[0]}/{shard[1]} has no shard to embed: the patterns match "
                   f"{_count(len(matched), 'shard')}, so jobs {len(matched)}..{shard[1] - 1} have none; writing "
                   f"empty outputs", err=True)
    scan = scan_shards(selected, skip_bad)
    if selected and not scan.shards:
        raise DataError(f"none of the {_count(len(selected), 'selected shard')} could be read, e.g. "
                        f"{scan.unreadable[0][1]}")
    if scan.ignored:
        click.echo(f"note: {_count(scan.ignored, 'tar member')} without a key.extension name ignored (as webdataset "
                   f"ignores them)", err=True)
    if scan.several_images:
        click.echo(f"note: {_count(scan.several_images, 'sample')} hold several images; the preferred one of each is "
                   f"embedded (the index names it: 'member')", err=True)
    click.echo(f"{_count(scan.samples, 'sample')} in {_count(len(scan.shards), 'shard')}"
               + (f" (job {shard[0]} of {shard[1]}: {len(selected)} of the {len(matched)} shards matched)"
                  if shard else ""), err=True)
    enc = _encoder(model_name, checkpoint, gate, device, precision)
    samples = (s for path in scan.shards for s in iter_samples(path))
    res = embed_samples(enc, samples, batch_size, skip_bad, total=scan.samples)
    if res.multi_page:
        click.echo(f"note: {_count(len(res.multi_page), 'image')} have several pages or frames; page 0 of each is "
                   f"embedded: " + ", ".join(res.multi_page[:5]) + (", ..." if len(res.multi_page) > 5 else ""),
                   err=True)
    skipped = [_tsv(path, "", reason) for path, reason in scan.unreadable]
    skipped += [_tsv(b.shard, b.key, b.reason) for b in res.skipped]
    if scan.samples and not res.rows:
        first = res.skipped[0]
        raise DataError(f"none of the {_count(scan.samples, 'sample')} could be embedded, e.g. {first.shard}: "
                        f"sample {first.key!r}: {first.reason}")
    meta = _embedding_meta(enc, checkpoint, "image", res.embeddings, precision, shard, scan.shards, len(skipped))
    _write_embeddings(outs, res.embeddings, res.rows, meta, skipped,
                      f"{_count(len(res.skipped), 'sample')} and {_count(len(scan.unreadable), 'unreadable shard')} "
                      f"left out")


def _tsv(*fields: str) -> str:
    return "\t".join(" ".join(f.split()) if f else "" for f in fields)  # a field never holds a tab or a newline


def _check_cleanable(cfg, caps: list[str], source: Path) -> None:
    """PIR's cleaning refuses a caption with no words left: name the first before any is embedded, not at its chunk."""
    from priorclip.config import FAMILY_PIR

    if cfg.family != FAMILY_PIR:
        return
    from priorclip.wordpiece import pre_caption

    for i, c in enumerate(caps, 1):
        try:
            pre_caption(c)
        except DataError as e:
            raise DataError(f"{source}: caption {i} of {len(caps)}: {e}") from None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _run_eval(enc, dataset, batch_size, workers, label: str, extra: dict, out_json: Path | None, save_embeddings: Path | None):
    """Evaluate, print the table, write ``out_json`` and the ``save_embeddings`` .npz: exact paths, already checked
    by the caller (:func:`_eval_outputs`), written atomically."""
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
        click.echo(f"wrote {write_json(out_json, report)}")
    if save_embeddings:
        images, texts = ev.image_emb.numpy(), ev.text_emb.numpy()
        write_npz(save_embeddings, images=images, texts=texts, caption_image=dataset.caption_image)
        click.echo(f"wrote {save_embeddings} (images {list(images.shape)}, texts {list(texts.shape)}, caption_image "
                   f"[{len(dataset.caption_image)}]: the image row of each caption)")
    return report


def _family_protocol(model_name: str | None, cfg=None) -> str | None:
    """The evaluation protocol of a model's family (PIR's own for PIR), or None while only a checkpoint knows it."""
    from priorclip.config import FAMILY_PIR
    from priorclip.data import PROTOCOL_PIR, PROTOCOL_PRIORCLIP
    from priorclip.registry import get_config

    if cfg is None and model_name is None:
        return None
    cfg = cfg or get_config(model_name)
    return PROTOCOL_PIR if cfg.family == FAMILY_PIR else PROTOCOL_PRIORCLIP


def _eval_outputs(out_json: Path | None, save_embeddings: Path | None) -> tuple[Path | None, Path | None]:
    """The exact files ``eval`` will write, checked before the dataset and the model are loaded: an evaluation of the
    full test split takes minutes, and must not end in an unwritable path."""
    out_json = check_output_file(out_json, option="--out") if out_json else None
    save_embeddings = check_output_file(save_embeddings, ".npz", option="--save-embeddings") if save_embeddings else None
    if out_json and save_embeddings and out_json.resolve() == save_embeddings.resolve():
        raise PriorCLIPError(f"--out and --save-embeddings name the same file: {out_json}")
    return out_json, save_embeddings


@main.command("eval")
@model_options
@click.option("--dataset", "dataset_json", required=True, type=click.Path(path_type=Path), help="Karpathy-style dataset JSON (e.g. dataset_rsicd.json), or a PIR-pytorch split file (e.g. rsitmd_test.json).")
@click.option("--images", "image_root", required=True, type=click.Path(path_type=Path), help="Folder the JSON's file names are relative to.")
@click.option("--split", default="test", show_default=True, help="Split of a Karpathy-style JSON (a PIR-pytorch file is one split).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=None, help="Test-set order: 'priorclip' (spec §6A: images sorted by file name) or 'pir' (§6B: file order; PIR's caption embeddings depend on their chunk of 128). Default: the model family's own.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only N images spread over the scene classes (seeded; files sort by class, so never the first N) and their captions.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch (the reference uses 64).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1), help="Image decoding threads.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), help="Write the metrics and run details as JSON.")
@click.option("--save-embeddings", type=click.Path(path_type=Path), help="Write image/text embeddings to an .npz.")
@_device_option
@_precision_option
def eval_cmd(model_name, checkpoint, gate, dataset_json, image_root, split, protocol, limit, batch_size, workers, out_json, save_embeddings, device, precision) -> None:
    """Image-text retrieval on one split of a dataset: R@1/5/10 both ways and mR, as the reference computes them."""
    from priorclip.checkpoint import file_sha256
    from priorclip.data import load_retrieval_set

    out_json, save_embeddings = _eval_outputs(out_json, save_embeddings)

    def load():
        ds = load_retrieval_set(dataset_json, image_root, split, protocol)
        return ds.subset(limit) if limit else ds

    protocol = protocol or _family_protocol(model_name)
    dataset = load() if protocol else None  # the data are checked before the model loads, where the protocol is known
    if checkpoint is None:
        click.echo("note: no --checkpoint given: the model has random weights, so recall will be near chance", err=True)
    enc = _encoder(model_name, checkpoint, gate, device, precision)
    if dataset is None:  # only the checkpoint's config said which family
        protocol = _family_protocol(enc.config.name, enc.config)
        dataset = load()
    extra = {
        "dataset": str(dataset_json),
        "split": split,
        "protocol": protocol,
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

    metrics = check_output_file(out_dir / "metrics.json", option="--out")
    with output_dir(out_dir):  # removed again if the demo fails before writing anything there
        enc = _encoder(model_name, None, None, device, "fp32")  # first: a bad --model or --device fails at once
        torch.manual_seed(seed)
        json_path, img_dir = make_sample(out_dir / "sample", n_images=n_images, seed=seed)
        click.echo(f"generated {n_images} images x 5 captions under {out_dir / 'sample'}")
        dataset = load_karpathy(json_path, img_dir)
        _run_eval(enc, dataset, 32, 4, f"{enc.model.cfg.name} (random weights)", {"dataset": str(json_path)}, metrics, None)


if __name__ == "__main__":
    main()
