"""Parity of reduced-precision engines with the fp32 reference, on TRAINED weights (queue entry 2).

    python benchmarks/gpu/trained_parity.py --checkpoint runs/priorclip/model.pt --data DIR --out DIR \
        [--precisions fp16,bf16] [--split test] [--device cuda]

With random weights the 50 beliefs of an image differ by about 1e-6, every score is a near-tie and any rounding
flips the gate's rank order, so fp16/bf16/int8 verdicts on random weights say little. This compares each engine with
the fp32 eager reference (TF32 off) on the whole split of a real dataset with the weights a training run just wrote,
using the project's one comparator (:func:`priorclip.export.parity.parity_report`: per-item cosine, belief rank-flip
rate, top-10 agreement, R@K/mR and their deltas, the precision's tolerance, the set's size and class coverage).

Engines: ``fp16`` / ``bf16`` are eager PyTorch under autocast on ``--device``; ``int8`` is the ONNX Runtime int8
export on the CPU provider (the only int8 engine without onnxruntime-gpu), calibrated on a class-spread subset of
the train split (never the evaluated split). ``trained-parity.json`` and ``.md`` are rewritten after every
precision, so a time limit keeps the precisions already done.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path


def _tf32_off():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint (it carries its config)")
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (one Karpathy JSON + images/) or JSON")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="class-spread subset of N images (0: the whole split)")
    ap.add_argument("--precisions", default="fp16,bf16", help="comma list of fp16, bf16, int8")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--calib-images", type=int, default=64, help="int8: class-spread train images for calibration")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stem", default="trained-parity")
    a = ap.parse_args(argv)

    import torch
    from priorclip.export.parity import format_parity_table, format_recall_table, parity_report, reference_embed
    from priorclip.serve.engines import create_engine

    from priorclip.cliutils import build_model, resolve_device, write_json
    from priorclip.data import load_karpathy, resolve_dataset
    from priorclip.encoder import TorchEncoder
    from priorclip.errors import PriorCLIPError

    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("fp16", "bf16", "int8")]
    if bad:
        print(f"Error: unknown precision(s) {', '.join(bad)} (fp16, bf16, int8)", file=sys.stderr)
        return 2
    try:
        if not a.checkpoint.is_file():
            raise PriorCLIPError(f"checkpoint not found: {a.checkpoint} (did the training step finish?)")
        device = resolve_device(a.device)
        json_path, images = resolve_dataset(a.data)
        data = load_karpathy(json_path, images, a.split)
        if a.limit:
            data = data.subset(a.limit)
        model = build_model(None, a.checkpoint, None).eval()
    except PriorCLIPError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    summary_file = a.checkpoint.parent / "summary.json"
    trained = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    doc = {
        "what": "parity of reduced-precision engines with the fp32 eager reference (TF32 off) on trained weights",
        "checkpoint": str(a.checkpoint),
        "model": model.cfg.name,
        "trained": {k: trained.get(k) for k in ("steps", "planned_steps", "stopped", "precision", "test", "date")},
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "dataset": {"json": str(json_path), "split": a.split, **data.describe()},
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/gpu/trained_parity.py", *sys.argv[1:]]),
        "reports": {},
        "errors": {},
    }
    a.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        write_json(a.out / f"{a.stem}.json", doc)
        md = [f"# Parity on trained weights: {doc['model']} ({a.checkpoint.name})", "",
              f"- device: {doc['device']}; torch {doc['torch']}; {doc['date']}",
              f"- set: {doc['dataset']['coverage']}, {doc['dataset']['n_captions']} captions ({a.split} split)",
              f"- trained: {doc['trained']}", f"- command: `{doc['command']}`", ""]
        if doc["reports"]:
            md += [format_parity_table(doc["reports"]), "", format_recall_table(doc["reports"])]
        md += [f"- {name}: could not run: {err}" for name, err in doc["errors"].items()]
        (a.out / f"{a.stem}.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    t0 = time.perf_counter()
    _tf32_off()
    ref = reference_embed(TorchEncoder(model, device, torch.float32), data, a.batch_size)
    doc["reference_seconds"] = round(time.perf_counter() - t0, 1)
    write()
    failed = False
    for p in precisions:
        t0 = time.perf_counter()
        name = f"torch-{p} (autocast, {device})" if p != "int8" else "onnxruntime-int8 (CPU provider)"
        print(f"[trained-parity] {name} ...", file=sys.stderr, flush=True)
        try:
            if p == "int8":
                train = load_karpathy(json_path, images, "train").subset(a.calib_images)
                engine = create_engine("onnxruntime", model, "int8", "cpu", calib=train)
            else:
                engine = create_engine("torch", model, p, device)
            rep = parity_report(engine, None, data, p, a.batch_size, reference_embeddings=ref)
        except Exception as e:  # noqa: BLE001 - one engine failing must not lose the others
            failed = True
            doc["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"[trained-parity] {name}: {doc['errors'][name]}", file=sys.stderr, flush=True)
            write()
            continue
        rep.pop("mask", None)
        rep["seconds"] = round(time.perf_counter() - t0, 1)
        doc["reports"][name] = rep
        write()
        print(format_parity_table({name: rep}), file=sys.stderr, flush=True)
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"wrote {a.out / (a.stem + '.json')} and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
