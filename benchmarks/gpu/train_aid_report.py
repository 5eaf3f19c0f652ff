"""Collect the phases of ``train_aid.sh`` into one JSON, one Markdown table and one PNG of the curves.

    python benchmarks/gpu/train_aid_report.py --runs runs/train-aid --out benchmarks/results

``--runs`` holds one folder per phase (prior/, priorclip/, noaff/, clip/, randprior/), each with its
``summary.json`` (``prior_summary.json`` for the prior) and ``metrics.jsonl``; phases that have not run are left out.
Parity on the trained weights (``parity/trained-parity.json``, ``int8/trained-parity-int8.json`` from
``trained_parity.py``) is summarised when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNS = {
    "priorclip": "PriorCLIP (trained prior + gate, contrastive + affiliation)",
    "noaff": "PriorCLIP (trained prior + gate, contrastive only)",
    "clip": "plain CLIP (no prior/gate, contrastive only)",
    "randprior": "PriorCLIP (random prior + gate, contrastive + affiliation)",
    "pir": "closed-domain PIR (Swin-T + trained ResNet-50 prior + BERT, VIR + LCA, PIR's contrastive + affiliation)",
}
PRIORS = {"prior": "prior", "pirprior": "pir_prior"}  # phase folder -> report key
KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR")
CITE = ("Data: AID images (Xia et al., IEEE TGRS 2017) with RSICD captions (Lu et al., IEEE TGRS 2018), RSICD's split "
        "without its 921 numbered images; results are comparable with each other, not with published RSICD tables.")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(runs: Path) -> dict:
    report: dict = {"runs": {}, "curves": {}}
    for folder, key in PRIORS.items():
        prior = runs / folder / "prior_summary.json"
        if not prior.is_file():
            continue
        p = json.loads(prior.read_text())
        report[key] = {k: p.get(k) for k in ("model", "metrics", "n_train", "n_val", "n_test", "steps", "planned_steps",
                                             "stopped", "samples_per_s", "train_seconds", "wall_seconds", "device",
                                             "precision", "torch", "date", "command", "skipped_images")}
        report[key]["n_classes"] = len(p.get("classes", []))
        report[key]["val_curve"] = [(e["epoch"], e.get("val_top1")) for e in p.get("epochs", [])]
    for name in RUNS:
        f = runs / name / "summary.json"
        if not f.is_file():
            continue
        s = json.loads(f.read_text())
        best = max(s.get("val") or [{"mR": None}], key=lambda v: v["mR"] if v["mR"] is not None else -1)
        report["runs"][name] = {
            "what": f"{RUNS[name]} [{s.get('model')}]",
            **{k: s.get(k) for k in ("model", "affiliation_loss", "steps", "planned_steps", "stopped", "global_batch",
                                     "train_samples", "samples_per_s", "data_wait_fraction", "train_seconds",
                                     "wall_seconds", "device", "precision", "torch", "date", "command", "skipped_images")},
            "prior_checkpoint": (s.get("prior_checkpoint") or {}).get("path"),
            "test": s.get("test"),
            "best_val_mR": best.get("mR"),
            "best_val_epoch": best.get("epoch"),
        }
        metrics = _read_jsonl(runs / name / "metrics.jsonl")
        report["curves"][name] = {
            "train": [(m["step"], m["loss"], m.get("contrastive"), m.get("affiliation")) for m in metrics if m["type"] == "train"],
            "val": [(m["epoch"], m["step"], m["mR"]) for m in metrics if m["type"] == "val"],
        }
    parity = {}
    for f in (runs / "parity" / "trained-parity.json", runs / "int8" / "trained-parity-int8.json"):
        if f.is_file():
            doc = json.loads(f.read_text())
            for name, r in doc.get("reports", {}).items():
                flips = r.get("belief_order") or {}
                parity[name] = {"passed": r.get("passed"), "failures": r.get("failures"), "notes": r.get("notes"),
                                "image_cosine_min": r["image"]["cosine_min"], "text_cosine_min": r["text"]["cosine_min"],
                                "rank_flips": flips.get("flipped"), "n_images": r.get("n_images"),
                                "dmr": r["recall_delta"]["mR"], "mR_reference": r["recall_reference"]["mR"],
                                "dmr_judged": (r.get("tolerance") or {}).get("dmr_judged"),
                                "coverage": (r.get("dataset") or {}).get("coverage"), "device": doc.get("device")}
            for name, err in doc.get("errors", {}).items():
                parity[name] = {"passed": False, "failures": [f"could not run: {err}"]}
    if parity:
        report["parity"] = parity
    devices = {r["device"] for r in report["runs"].values()} | {report[k]["device"] for k in PRIORS.values() if k in report}
    report["device"] = ", ".join(sorted(d for d in devices if d))
    return report


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(rep: dict) -> str:
    lines = ["# Training on aid-rsicd", "", f"Device: {rep['device'] or 'unknown'}.", ""]
    if rep.get("note"):
        lines += [f"**Note:** {rep['note']}", ""]
    lines += [CITE, ""]
    for key in (k for k in PRIORS.values() if k in rep):
        p = rep[key]
        m = p.get("metrics") or {}
        what = ("conv_encoder of {}: torchvision ResNet-50 + linear head" if key == "pir_prior"
                else "res_visual of {}: ModifiedResNet + linear head").format(p.get("model"))
        lines += [
            f"## Scene prior ({what}, {p.get('n_classes')} classes)", "",
            "| val top-1 | test top-1 | train images | steps | samples/s | train s | wall s | precision |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {m.get('val_top1', float('nan')):.2f} | {m.get('test_top1', float('nan')):.2f} | {p.get('n_train')} | "
            f"{p.get('steps')}/{p.get('planned_steps')} | {p.get('samples_per_s') or 0:.0f} | {p.get('train_seconds') or 0:.0f} | "
            f"{p.get('wall_seconds') or 0:.0f} | {p.get('precision')} |",
            "", f"Command: `{p.get('command')}`", "",
        ]
    if rep["runs"]:
        lines += ["## Retrieval, test split (R@K in %, mR = mean of the six)", "",
                  "| run | " + " | ".join(KEYS) + " | best val mR | steps | samples/s | data wait | train s | wall s |",
                  "|---|" + "---:|" * (len(KEYS) + 6)]
        for name, r in rep["runs"].items():
            t = r.get("test") or {}
            vals = " | ".join(f"{t[k]:.2f}" if k in t else "-" for k in KEYS)
            stop = f" (stopped: {r['stopped']})" if r.get("stopped") else ""
            lines.append(
                f"| {r['what']}{stop} | {vals} | {_num(r['best_val_mR'])} | {r['steps']}/{r['planned_steps']} | "
                f"{r['samples_per_s'] or 0:.0f} | {100 * (r['data_wait_fraction'] or 0):.0f} % | {r['train_seconds'] or 0:.0f} | "
                f"{r['wall_seconds'] or 0:.0f} |"
            )
        lines += ["", "Throughput is training samples per second at the global batch below (data loading, forward, "
                  "backward and the optimiser step; validation excluded). Data wait is the share of step time spent "
                  "waiting for the loader.", ""]
        for name, r in rep["runs"].items():
            lines.append(f"- {name}: global batch {r['global_batch']}, {r['precision']}, torch {r['torch']}, {r['date']}: `{r['command']}`")
    if rep.get("parity"):
        lines += ["", "## Reduced precision on the trained PriorCLIP weights (against fp32 eager, TF32 off)", "",
                  "| engine | images | img cos min | txt cos min | rank flips | mR ref | ΔmR | verdict |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, p in rep["parity"].items():
            if "image_cosine_min" not in p:
                lines.append(f"| {name} | - | - | - | - | - | - | **FAIL**: {'; '.join(p['failures'])} |")
                continue
            dmr = f"{p['dmr']:+.3f}" + ("" if p.get("dmr_judged", True) else " (not judged)")
            verdict = "PASS" if p["passed"] else "**FAIL**: " + "; ".join(p["failures"])
            lines.append(f"| {name} | {p['n_images']} | {p['image_cosine_min']:.6f} | {p['text_cosine_min']:.6f} | "
                         f"{p['rank_flips'] if p['rank_flips'] is not None else '-'} | {p['mR_reference']:.2f} | {dmr} | "
                         f"{verdict} |")
        first = next(iter(rep["parity"].values()))
        if first.get("coverage"):
            lines += ["", f"Set: {first['coverage']}; device {first.get('device')}."]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3 if "prior" in rep else 2, figsize=(16 if "prior" in rep else 11, 4.2))
    for name, c in rep["curves"].items():
        if c["train"]:
            steps = [x[0] for x in c["train"]]
            loss = [x[1] for x in c["train"]]
            k = max(1, len(loss) // 50)
            smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
            axes[0].plot(steps, smooth, label=name)
        if c["val"]:
            axes[1].plot([v[0] for v in c["val"]], [v[2] for v in c["val"]], marker="o", label=name)
    axes[0].set(title="training loss (contrastive [+ affiliation]; PIR's own terms)", xlabel="step", ylabel="loss")
    axes[1].set(title="validation mR (%)", xlabel="epoch", ylabel="mR")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if "prior" in rep:
        cur = [(e, v) for e, v in rep["prior"]["val_curve"] if v is not None]
        axes[2].plot([e for e, _ in cur], [v for _, v in cur], marker=".")
        axes[2].set(title="scene prior: validation top-1 (%)", xlabel="epoch", ylabel="top-1")
        axes[2].grid(alpha=0.3)
    fig.suptitle(f"aid-rsicd training ({rep['device'] or 'unknown device'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, type=Path, help="folder with prior/, priorclip/, noaff/, clip/ ...")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prefix", default="train-aid", help="output file names: PREFIX-results.json/.md, PREFIX-curves.png")
    ap.add_argument("--note", default="", help="a sentence printed at the top of the Markdown (what this run is)")
    a = ap.parse_args(argv)
    rep = collect(a.runs)
    rep["note"] = a.note
    if not rep["runs"] and not any(k in rep for k in PRIORS.values()) and "parity" not in rep:
        print(f"Error: no phase results under {a.runs}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.prefix}-results.json").write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    md = markdown(rep)
    (a.out / f"{a.prefix}-results.md").write_text(md, encoding="utf-8")
    plot(rep, a.out / f"{a.prefix}-curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
