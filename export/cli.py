"""``priorclip-export``: ONNX / TensorRT / AOTInductor export with FP16 and calibrated INT8, manifest and parity.

Examples::

    priorclip-export --model priorclip-tiny --format onnx --precision fp32 --out out/tiny-fp32
    priorclip-export --checkpoint ckpt.pt --format onnx --precision int8 --calib-method entropy \\
        --calib-data ../shared/data/aid-rsicd/dataset_rsicd_aid.json \\
        --parity-data ../shared/data/aid-rsicd/dataset_rsicd_aid.json --out out/int8
    priorclip-export --checkpoint ckpt.pt --format trt --precision fp16 --out out/trt-fp16
    priorclip-export --checkpoint ckpt.pt --format triton-repo --precision fp16 --triton-accelerator tensorrt \\
        --out models/    # an NVIDIA Triton model repository (export/README.md, Triton model repository)

User mistakes end as one ``Error: ...`` line and a non-zero exit.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from priorclip.cliutils import build_model, check_output_dir, image_count, model_options, user_errors
from priorclip.errors import DataError, PriorCLIPError
from priorclip.parity import JUDGED_SET_IMAGES


def _karpathy(json_path: Path, image_root: Path | None, split: str):
    from priorclip.data import load_karpathy

    root = image_root or json_path.parent / "images"
    return load_karpathy(json_path, root, split)


def load_calibration(path: Path, image_root: Path | None, split: str, n_images: int, n_captions: int, seed: int = 0):
    """``--calib-data``: a Karpathy JSON (its ``split``) or a folder of images with an optional captions file.

    Images (and a JSON's captions, by their image) are drawn spread over the scene classes, deterministically:
    files sort by class, so the first N would calibrate on one class. A folder's images are every format PIL reads;
    its other files are named in a note and left out.

    Every drawn image is decode-checked here (pixel limit from the header, then a reduced-scale decode that still
    reads the whole file), seconds before the minutes-long fp32 export. Unreadable ones are left out, each named on
    stderr with the reason; if fewer than half of the drawn images remain, it raises :class:`DataError` instead
    (that many bad files means the wrong folder or --image-root, not a few damaged tiles).
    """
    from priorclip.data import describe_selection, image_label, list_images, read_captions, spread
    from priorclip.transforms import check_image

    from .api import CalibrationSet

    if not path.exists():
        raise DataError(f"calibration data not found: {path}")
    if path.is_dir():
        listing = list_images(path)  # DataError when the folder has no images
        images = listing.files
        caps_file = next((path / n for n in ("captions.txt", "captions.json") if (path / n).is_file()), None)
        if caps_file is None:
            raise DataError(f"{path}: no captions.txt or captions.json for the text encoder's calibration")
        others = [p.name for p, _ in listing.skipped if p != caps_file]
        if others:
            click.echo(f"note: calibration folder {path}: left out {len(others)} files that are not images PIL "
                       f"reads ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})", err=True)
        captions = read_captions(caps_file)
        picked = spread(images, [image_label(p) for p in images], n_images, seed)
        # captions of a folder belong to no class: the spread over one label per caption is a seeded random draw
        captions = spread(captions, [str(i) for i in range(len(captions))], n_captions, seed)
        cover = describe_selection([image_label(p) for p in picked])
        source = str(path)
    else:
        picked, captions, cover = _karpathy(path, image_root, split).spread_draw(n_images, n_captions, seed)
        source = f"{path} (split {split})"
    good, bad = [], []
    for p in picked:
        try:
            check_image(p, draft_size=1)  # draft_size=1: a large JPEG decodes at 1/8 scale, all its data still read
            good.append(p)
        except DataError as e:
            bad.append(p)
            click.echo(f"note: calibration image left out: {e}", err=True)
    if 2 * len(good) < len(picked):
        raise DataError(f"{source}: only {len(good)} of the {len(picked)} calibration images drawn can be read "
                        f"(first failure above); check --calib-data / --image-root")
    if bad:
        cover = describe_selection([image_label(p) for p in good], selection=cover.get("selection"))
    dropped = f", {len(bad)} unreadable left out" if bad else ""
    return CalibrationSet(good, captions, f"{source}: {cover['coverage']} (class-spread seed {seed}{dropped}), "
                                          f"{len(captions)} captions")


def load_parity_set(parity_data: Path | None, image_root: Path | None, split: str, n_images: int | None):
    """The held-out parity set: ``--parity-data``, else the real dataset when one is reachable
    (:func:`priorclip.data.default_dataset`), else a generated set, labelled as such. ``n_images`` images are drawn
    class-spread (0 or None: all of them)."""
    from priorclip.data import default_dataset, load_karpathy

    if parity_data is not None:
        ds = _karpathy(parity_data, image_root, split)
        origin = f"{parity_data} (split {split})"
    elif (found := default_dataset()) is not None:
        ds = load_karpathy(found[0], found[1], split)
        origin = f"{found[0]} (split {split}; found by default, --parity-data overrides)"
    else:
        import atexit
        import shutil
        import tempfile

        from priorclip.synthetic import make_sample

        tmp = tempfile.mkdtemp(prefix="priorclip-parity-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # read until the parity report is written
        j, imgs = make_sample(Path(tmp), GENERATED_PARITY_IMAGES)
        ds = load_karpathy(j, imgs)
        origin = ("GENERATED scenes (priorclip.synthetic, seed 0): no real dataset found; pass --parity-data or set "
                  "$PRIORCLIP_DATASET for a verdict on real images")
    if n_images and n_images < len(ds.images):
        ds = ds.subset(n_images)
    ds.selection = {**(ds.selection or {}), "source": origin}
    return ds, origin


GENERATED_PARITY_IMAGES = 64


def _triton_options(fmt: str, precision: str, max_batch: int, int8_target: str | None, given: dict):
    """The ``--triton-*`` options as checked :class:`~.triton_repo.TritonOptions` (None for other formats, where
    giving one is an error)."""
    set_ = {k: v for k, v in given.items() if v is not None}
    if fmt != "triton-repo":
        if set_:
            raise PriorCLIPError(f"--{next(iter(set_)).replace('_', '-')} applies only to --format triton-repo")
        return None
    from .triton_repo import TritonOptions, parse_batch_list, resolve_options

    if "triton_preferred_batch" in set_:
        set_["triton_preferred_batch"] = parse_batch_list(set_["triton_preferred_batch"])
    options = TritonOptions(**{k.removeprefix("triton_"): v for k, v in set_.items()})  # --triton-x is field x
    return resolve_options(options, precision, max_batch, int8_target)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@model_options
@click.option("--format", "fmt", default="onnx", show_default=True, metavar="onnx|trt|aoti|triton-repo",
              help="onnx: ONNX graphs (ONNX Runtime, TensorRT). trt: the same ONNX plus strongly typed TensorRT "
              "engines (needs tensorrt). aoti: torch AOTInductor packages (run where TensorRT does not). "
              "triton-repo: an NVIDIA Triton model repository (ONNX encoders with dynamic batching, Python-backend "
              "preprocessing and tokenizer, ensembles), validated against Triton's model-config schema.")
@click.option("--precision", default="fp32", show_default=True, metavar="fp32|fp16|int8",
              help="fp16: fp16 weights/activations, norms and softmax in fp32. int8: explicit Q/DQ from calibration.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="INT8 calibration: a Karpathy dataset JSON (images under --image-root, default <json dir>/images; "
              "--calib-split) or a folder of images with captions.txt/captions.json.")
@click.option("--calib-method", default="entropy", metavar="minmax|percentile|entropy",
              show_default=True, help="How activation ranges are chosen (percentile = 99.99th of |x|; entropy = KL).")
@click.option("--int8-target", default=None, metavar="ort-cpu|tensorrt",
              help="INT8 Q/DQ layout for the runtime that will run it: ort-cpu (uint8 activations in the integer "
              "chains ONNX Runtime's CPU provider fuses) or tensorrt (symmetric int8 on an fp16 graph). "
              "Default: tensorrt for --format trt, ort-cpu for --format onnx.")
@click.option("--calib-split", default="train", show_default=True, help="Split of a calibration JSON.")
@click.option("--calib-images", type=int, default=256, show_default=True, help="Calibration images (0 = all).")
@click.option("--calib-captions", type=int, default=1024, show_default=True, help="Calibration captions (0 = all).")
@click.option("--keep-fp", multiple=True, metavar="PATTERN",
              help="INT8: leave layers matching this module-path pattern unquantised (repeatable), e.g. "
              "'res_visual.attnpool*', 'visual.conv1'. Replaces the default, the measured set "
              "visual.conv1, res_visual.attnpool*, vision_proj_res (priorclip.export.quantize.DEFAULT_KEEP_FP); for PIR "
              "models none (PIR_KEEP_FP), e.g. 'conv_encoder', 'conv_proj' for its prior.")
@click.option("--fp16-keep", multiple=True, metavar="PATTERN",
              help="FP16: also keep layers matching this module-path pattern in fp32 (repeatable), e.g. 'res_visual' "
              "for the whole prior; added to the measured default (norms, softmax, reductions, the belief gate; for PIR "
              "VIR's belief).")
@click.option("--parity-data", type=click.Path(path_type=Path), default=None,
              help="Held-out Karpathy JSON for the parity report (default: the real dataset when one is found — "
              "$PRIORCLIP_DATASET, ../shared/data/aid-rsicd — else a labelled generated set of "
              f"{GENERATED_PARITY_IMAGES} images).")
@click.option("--parity-split", default="test", show_default=True)
@click.option("--parity-images", callback=image_count(1), metavar="N|all",
              help="Images of the parity split, drawn class-spread (default: the whole split with --device cuda; on "
              f"cpu {JUDGED_SET_IMAGES}, the fewest on which every precision's ΔmR is judged).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Image folder for --calib-data/--parity-data JSON files (default: <json dir>/images).")
@click.option("--no-parity", is_flag=True, help="Skip the parity report (and its tolerance check).")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Largest batch of the dynamic batch axis / TensorRT profile.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the pinned one).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda: where AOTI compiles for and where the parity check runs the engine.")
@click.option("--force", is_flag=True, help="Keep an export whose parity is outside its precision's tolerance.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@click.option("--triton-instances", type=click.IntRange(min=1), default=None,
              help="triton-repo: instances of each encoder (instance_group count). [default: 1]")
@click.option("--triton-kind", type=click.Choice(["gpu", "cpu"]), default=None,
              help="triton-repo: encoder instance kind. [default: gpu]")
@click.option("--triton-preferred-batch", default=None, metavar="N,N,...",
              help="triton-repo: the encoders' dynamic-batching preferred batch sizes (each <= --max-batch). "
              "[default: 8,32,64 capped at --max-batch]")
@click.option("--triton-max-queue-delay-us", type=click.IntRange(min=0), default=None,
              help="triton-repo: longest wait (µs) for a fuller batch. [default: 2000]")
@click.option("--triton-accelerator", type=click.Choice(["none", "tensorrt", "tensorrt-plan"]), default=None,
              help="triton-repo: tensorrt runs the encoders through ONNX Runtime's TensorRT execution provider "
              "(engines built on the serving GPU; fp32/fp16). [default: none]")
@click.option("--triton-preprocess-instances", type=click.IntRange(min=1), default=None,
              help="triton-repo: CPU instances of the image preprocess and tokenizer models. [default: 4]")
@click.option("--triton-text-bucket", type=click.IntRange(min=0), default=None,
              help="triton-repo, PriorCLIP: pad each text request to a multiple of N tokens (exact), so requests of "
              "similar length batch together; 0 = its longest caption. PIR's padding is never changed. [default: 16]")
@user_errors
def main(model_name, checkpoint, gate, fmt, precision, calib_data, calib_method, int8_target, calib_split,
         calib_images, calib_captions, keep_fp, fp16_keep, parity_data, parity_split, parity_images, image_root,
         no_parity, max_batch, opset,
         device, force, out_dir, quiet, **triton) -> None:
    """Export the image and text encoders of a PriorCLIP or PIR model with a manifest and a parity report against
    fp32 PyTorch."""
    from . import require_export_dependencies

    require_export_dependencies()
    from .api import FORMATS, PRECISIONS, export_model
    from .fp16 import default_keeps
    from .onnx_export import OPSET
    from .quantize import METHODS, TARGETS

    for opt, value, allowed in (("--format", fmt, FORMATS + ("triton-repo",)), ("--precision", precision, PRECISIONS),
                                ("--calib-method", calib_method, METHODS),
                                ("--int8-target", int8_target or TARGETS[0], TARGETS)):
        if value not in allowed:
            raise PriorCLIPError(f"{opt} {value!r} is not one of: {', '.join(allowed)}")

    triton_options = _triton_options(fmt, precision, max_batch, int8_target, triton)
    if checkpoint is not None and not checkpoint.is_file():
        raise PriorCLIPError(f"checkpoint not found: {checkpoint}")
    check_output_dir(out_dir, option="--out")  # before calibration, parity set and model: nothing is created yet
    if precision == "int8" and fmt == "aoti":
        raise PriorCLIPError("--format aoti supports --precision fp32 or fp16 (INT8 is for onnx and trt)")
    calib = None
    if precision == "int8":
        if calib_data is None:
            raise PriorCLIPError("--precision int8 needs --calib-data DIR|JSON (images and captions to calibrate on)")
        calib = load_calibration(calib_data, image_root, calib_split, calib_images, calib_captions)
    parity_set = None
    if not no_parity:
        if parity_images is None:
            parity_images = 0 if device.startswith("cuda") else JUDGED_SET_IMAGES
        parity_set, origin = load_parity_set(parity_data, image_root, parity_split, parity_images)
        if not quiet:
            click.echo(f"parity set: {origin}; {parity_set.describe()['coverage']}", err=True)
    model = build_model(model_name, checkpoint, gate)
    command = " ".join(shlex.quote(a) for a in ["priorclip-export", *sys.argv[1:]])
    common = dict(calib=calib, calib_method=calib_method, opset=opset or OPSET, parity_set=parity_set, force=force,
                  keep_fp=keep_fp or None, device=device, checkpoint=checkpoint,
                  fp16_keep_patterns=(default_keeps(model.cfg.family)[1] + tuple(fp16_keep)) if fp16_keep else None,
                  command=command, int8_target=int8_target)
    if fmt == "triton-repo":
        from .triton_repo import export_triton_repo

        result = export_triton_repo(model, out_dir, precision, triton_options, max_batch=max_batch,
                                    progress=not quiet, **common)
    else:
        result = export_model(model, out_dir, fmt, precision, max_batch=max_batch, progress=not quiet, **common)
    if quiet and result.parity is not None:
        from .parity import format_parity_table

        click.echo(format_parity_table({f"{result.parity['export']} ({result.parity['engine']})": result.parity}))
    click.echo(f"wrote {result.out_dir} ({fmt}, {precision})")


if __name__ == "__main__":  # pragma: no cover
    main()
