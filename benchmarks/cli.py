"""``priorclip-bench``: latency, throughput, JPEG-to-embedding rate and recall parity, per backend x precision x batch.

With no arguments it benchmarks the default model (random weights) with every backend this machine can run, checks
recall on the real dataset when one is reachable (else on a generated set, labelled as such), and writes JSON +
Markdown + PNG to ./bench-out. The report opens with a summary table and the fastest engine that passes, and warns
when the machine was busy while timing.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from priorclip.cliutils import check_output_dir, image_count, model_options, user_errors, write_json, write_text
from priorclip.errors import PriorCLIPError


def _int_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers, got {value!r}")
    return out


def _str_list(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    out = [v.strip() for v in value.split(",") if v.strip()]
    if not out:
        raise click.BadParameter("empty list")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@model_options
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (CUDA when present).")
@click.option(
    "--backends",
    callback=_str_list,
    help="Comma-separated backends (torch, torch-compile, onnxruntime, aoti, "
    "tensorrt); default: every backend available here on GPU, torch and onnxruntime on CPU (the compiling backends "
    "spend minutes on a small CPU). Unavailable ones are listed with the reason.",
)
@click.option(
    "--precisions",
    callback=_str_list,
    help="Comma-separated precisions (fp32, fp16, bf16, int8, fp8), crossed "
    "with --backends where supported; default fp32 on CPU, fp32,fp16,bf16 on GPU.",
)
@click.option(
    "--engines",
    "engines_spec",
    help="Exact backend:precision pairs instead of the cross product, e.g. "
    "'torch:fp32,torch:fp16,torch-compile:bf16,onnxruntime:fp16'.",
)
@click.option(
    "--batch-sizes", callback=_int_list, help="Comma-separated batch sizes; default 1,8,64,256 on GPU, 1,8 on CPU."
)
@click.option("--warmup", type=click.IntRange(min=0), help="Untimed calls per point (default 10 on GPU, 2 on CPU).")
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    help="Timed calls per point (default 100 on GPU, 10 on CPU): synchronised "
    "calls for the latency (p90 printed from 10, p99 from 100) and, on GPU, as many back-to-back calls for throughput.",
)
@click.option(
    "--text-length",
    type=click.IntRange(min=2),
    help="Tokens per benchmark caption incl. start/end "
    "(default: the model's full context: 77, 47 for PIR). PriorCLIP: eager PyTorch trims to it; torch-compile runs 77 "
    "anyway. PIR attends to its padding: every engine runs the batch's ids as given, at this length.",
)
@click.option(
    "--real-captions",
    is_flag=True,
    help="Time texts on captions drawn from the recall set (their real lengths: engines that cut to the batch's "
    "longest caption run that; PIR runs them padded to the batch's longest, as its tokenizer pads) instead of "
    "--text-length tokens; fixed-length engines still run the full context.",
)
@click.option(
    "--towers",
    type=click.Choice(["both", "image", "text"]),
    default="both",
    show_default=True,
    help="Which encoders to time.",
)
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    help="Recall check on a Karpathy-style JSON (or a folder "
    "holding one and images/, e.g. ../shared/data/aid-rsicd); default: $PRIORCLIP_DATASET or the first of "
    "../shared/data/aid-rsicd, shared/data/aid-rsicd, .bench-data/aid-rsicd, /tmp/data/aid-rsicd that exists, else "
    "a generated set (labelled GENERATED in the report). INT8 calibration uses its train split (its val split "
    "with --split train).",
)
@click.option(
    "--images", type=click.Path(path_type=Path), help="Image folder of --dataset (default: images/ beside it)."
)
@click.option("--split", default="test", show_default=True, help="Split of --dataset to use.")
@click.option(
    "--recall-images",
    callback=image_count(2),
    metavar="N|all",
    help="Images in the recall set, drawn class-spread (default: the whole split on GPU; on CPU "
    "334, the smallest set on which every precision's ΔmR is judged; the generated fallback: 334 on CPU, 1024 on "
    "GPU); 'all' = the whole split (for the generated set: its default size above).",
)
@click.option(
    "--generated-set",
    is_flag=True,
    help="Check recall on the generated set even when a real dataset is reachable (by default --dataset, "
    "$PRIORCLIP_DATASET or ../shared/data/aid-rsicd is used when present).",
)
@click.option(
    "--calib-images",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="INT8 and FP8 calibration images, class-spread from the dataset's train split (val with --split train; "
    "generated when there is none).",
)
@click.option(
    "--calib-captions", type=click.IntRange(min=1), default=256, show_default=True, help="INT8 calibration captions."
)
@click.option(
    "--tf32",
    is_flag=True,
    help="Allow TF32 in the fp32 engines on GPU (labelled fp32+TF32); default off: plain fp32.",
)
@click.option("--no-recall", is_flag=True, help="Skip the recall check.")
@click.option("--no-e2e", is_flag=True, help="Skip the JPEG-bytes-to-embeddings rate.")
@click.option(
    "--e2e-images",
    type=click.IntRange(min=1),
    help="JPEGs for the end-to-end rate (default 4x the largest batch; at least 512 on GPU).",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Decoding threads (default: the usable CPU cores, at most 16)."
)
@click.option(
    "--compile-mode",
    type=click.Choice(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
    default="default",
    show_default=True,
    help="torch.compile mode for torch-compile: "
    "'default' means max-autotune (CUDA graphs) on GPU and inductor's default on CPU; reduce-overhead = CUDA "
    "graphs without the GEMM autotuning search.",
)
@click.option(
    "--compile-dynamic",
    is_flag=True,
    help="torch-compile with a symbolic batch size: one compilation per "
    "tower for every batch size instead of one per size (much shorter compile, slightly slower kernels).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where exported engines are written (default: a temporary folder, removed afterwards).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Output folder for bench-<device>-<date>.json/.md/.png.",
)
@click.option("--tag", help="Name part of the output files instead of the device (bench-<tag>-<date>.*).")
@click.option("--note", help="A sentence recorded in the report (e.g. 'CPU shared with other jobs').")
@click.option("--quiet", is_flag=True, help="No progress lines, only the final tables.")
@click.option(
    "--strict",
    is_flag=True,
    help="Exit with status 3 when an engine fails to build or run, or falls outside its recall tolerance "
    "(every FAIL in the summary).",
)
@user_errors
def main(
    model_name,
    checkpoint,
    gate,
    device,
    backends,
    precisions,
    engines_spec,
    batch_sizes,
    warmup,
    iters,
    text_length,
    real_captions,
    towers,
    dataset,
    images,
    split,
    recall_images,
    generated_set,
    calib_images,
    calib_captions,
    tf32,
    no_recall,
    no_e2e,
    e2e_images,
    workers,
    compile_mode,
    compile_dynamic,
    workdir,
    out,
    tag,
    note,
    quiet,
    strict,
) -> None:
    """Benchmark every embedding engine: request latency (synchronised calls; p90 from 10 calls, p99 from 100),
    pipelined throughput, peak memory and TFLOP/s (as a share of the matrix-product peak measured in the same run)
    for the image and the text encoder; the JPEG-bytes-to-embedding rate; and the recall check against the fp32
    reference (R@1/5/10, mR, per-item cosine, belief rank flips, top-10 agreement, FAIL when outside the precision's
    tolerance) on a class-spread set: the real dataset when reachable, else a generated one (labelled).

    The report opens with a summary table (items/s, speed-up against fp32 eager and torch.compile, batch-1
    latency, ΔmR, cosine, rank flips, PASS/FAIL) and the fastest engine that passes, and warns when other processes
    loaded the machine or timings spread while measuring. Writes bench-<device>-<date>.json (with device, driver,
    versions, git revision, command, date and load), .md and .png to --out and prints the tables.
    """
    from priorclip.benchmarks.report import render_console, render_markdown, render_plot, validate_report
    from priorclip.benchmarks.runner import BenchOptions, parse_engines, run_bench

    if dataset is not None and not dataset.exists():
        raise PriorCLIPError(f"--dataset {dataset}: not found")
    if images is not None and dataset is None:
        raise PriorCLIPError("--images needs --dataset")
    if generated_set and dataset is not None:
        raise PriorCLIPError("give either --dataset or --generated-set, not both")
    engines = parse_engines(engines_spec) if engines_spec else None
    if engines and (backends or precisions):
        raise PriorCLIPError("give either --engines or --backends/--precisions, not both")
    # checked before the run, created by the first report written (atomic_write): a run that fails before it leaves
    # no empty --out folder behind
    check_output_dir(out, option="--out")
    opts = BenchOptions(
        model_name=model_name,
        checkpoint=checkpoint,
        gate=gate,
        device=device,
        engines=engines,
        backends=backends,
        precisions=precisions,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iters=iters,
        text_length=text_length,
        real_captions=real_captions,
        towers=("image", "text") if towers == "both" else (towers,),
        recall=not no_recall,
        dataset=dataset,
        images=images,
        split=split,
        recall_images=recall_images,
        generated_set=generated_set,
        calib_images=calib_images,
        calib_captions=calib_captions,
        tf32=tf32,
        e2e=not no_e2e,
        e2e_images=e2e_images,
        workers=workers,
        compile_mode=compile_mode,
        compile_dynamic=compile_dynamic,
        workdir=workdir,
        note=note,
    )
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    files: dict[str, Path] = {}

    def write(doc: dict) -> None:
        problems = validate_report(doc)
        if problems:  # a bug, not a user mistake
            raise RuntimeError("report does not match its schema: " + "; ".join(problems[:5]))
        if not files:
            env = doc["environment"]
            name = tag or ("cpu" if env["device"] == "cpu" else _slug(env["device_name"]))
            stem = f"bench-{_slug(name)}-{datetime.now(timezone.utc).strftime('%Y-%m-%d')}"
            files.update(json=out / f"{stem}.json", md=out / f"{stem}.md", png=out / f"{stem}.png")
        write_json(files["json"], doc)
        png = render_plot(doc, files["png"])
        write_text(files["md"], render_markdown(doc, png.name if png else None))

    doc = run_bench(opts, argv=sys.argv, log=log, checkpoint=write)
    write(doc)
    click.echo(render_console(doc))
    click.echo(
        f"\nwrote {files['json']}, {files['md'].name}" + (f", {files['png'].name}" if files["png"].is_file() else "")
    )
    # the reliability warnings and every FAIL with its reason are in the tables just printed (under the summary):
    # not repeated on stderr
    if strict and doc["summary"]["failing"]:
        sys.exit(3)


if __name__ == "__main__":
    main()
