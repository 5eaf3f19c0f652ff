#!/usr/bin/env bash
# Training runs on aid-rsicd (AID images + RSICD captions), phase by phase; each phase writes its results before the
# next starts. On the GPU machine it is driven by queue entry 2 (benchmarks/gpu/q2-train.sh: the data parts, a
# deadline, per-phase time caps, parity on the trained weights, one call); here it also runs on its own:
#
#   benchmarks/gpu/train_aid.sh PHASE[,PHASE...] [DATA_DIR]
#
# PHASE, in this order:
#   prior      train the ModifiedResNet-50 prior of priorclip-vit-b32 as a 30-class AID scene classifier
#   priorclip  priorclip-vit-b32 from that prior, contrastive + affiliation loss
#   noaff      the same budget, contrastive loss only
#   clip       the same budget, plain CLIP ViT-B/32 (no prior, no gate), contrastive loss only
#   randprior  optional: priorclip-vit-b32 + affiliation loss with a random (untrained) prior
#   pirprior   the closed-domain PIR's prior: PIR_MODEL's torchvision ResNet-50 as the same AID scene classifier
#   pir        PIR_MODEL (Swin-T + that prior + BERT, VIR + LCA) with PIR's losses, the same budget as the others
#              (random Swin/BERT init: no pretrained weights are reachable; the reference starts from ImageNet-22k
#              Swin-T and bert-base-uncased, so this measures the architecture under our budget, not the paper)
#   report     JSON + Markdown + PNG (loss and validation-mR curves) from the phases that have run (CPU is enough)
#   all        prior,priorclip,noaff,clip,report
#
# "The same budget" is the same epochs, batch, learning rate and schedule, warm-up, precision, seed and augmentation
# for every retrieval run; MAX_MIN / CLIP_MAX_MIN are wall-clock guards (the trainer's --max-wall-min: training ends,
# then validation and the test split run as usual). A run the guard cut short is marked 'stopped' in the report, and
# its steps/planned show by how much the budgets then differ.
#
# DATA_DIR defaults to $DATA, else the dataset every priorclip tool finds by itself (priorclip.data.default_dataset:
# $PRIORCLIP_DATASET, then ../shared/data/aid-rsicd, ..., /tmp/data/aid-rsicd). Run folders (checkpoints included) go to
# $RUNS (default runs/train-aid, ignored by git). The small outputs of every phase (summary.json or
# prior_summary.json, metrics.jsonl, the log: 3 files) are copied to $OUT/<phase>/; `report` reads $RUNS, or
# REPORT_FROM=<a folder holding those phase folders>, and writes $OUT/train-aid-results.{json,md} and
# $OUT/train-aid-curves.png.
#
# Knobs (environment), defaults sized for one 9-minute H100 call (benchmarks/gpu/README.md derives them):
# EPOCHS (2: 310 steps of 256 pairs), BATCH (256), LR (5e-4), LR_WARMUP (30 steps), PRECISION (bf16), WORKERS
# (cores - 2), PRIOR_EPOCHS (8), PRIOR_BATCH (256), PRIOR_LR (2e-3), PRIOR_WARMUP (50), MAX_MIN (2.25),
# CLIP_MAX_MIN (MAX_MIN), PIR_MAX_MIN (MAX_MIN), PRIOR_MAX_MIN (1.25), PIR_MODEL (pir-swin-t-bert), VAL_LIMIT (validate on N class-spread val images; default: the whole
# val split), MODEL (priorclip-vit-b32), CLIP_MODEL (clip-vit-b32), DEVICE (auto), DATA_JSON
# (dataset_rsicd_aid.json), EXTRA (more `priorclip train` options), PYTHON. The CPU tests run every phase with the
# tiny configs through these knobs. The tokenizer needs ftfy, which the GPU image lacks: q2-train.sh installs the
# carried wheels first (lib.sh); on its own, this script needs an environment that has it.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

PHASES=${1:?usage: train_aid.sh prior|priorclip|noaff|clip|randprior|pirprior|pir|report|all [DATA_DIR]}
PY=${PYTHON:-$(command -v python3 || command -v python)}
DATA=${2:-${DATA:-}}
if [[ -z "$DATA" && "$PHASES" != report ]]; then  # the search every priorclip tool makes, in one place
  FOUND=$("$PY" -c 'from priorclip.data import default_dataset as d; f = d(); print(f[0] if f else "")')
  [[ -n "$FOUND" ]] && { DATA=$(dirname "$FOUND"); DATA_JSON=${DATA_JSON:-$(basename "$FOUND")}; }
  echo "data: ${FOUND:-none found (pass the aid-rsicd folder as the second argument)}"
fi
DATA_JSON=${DATA_JSON:-dataset_rsicd_aid.json}
RUNS=${RUNS:-runs/train-aid}
OUT=${OUT:-$RUNS/report}
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=${WORKERS:-$(( CORES > 3 ? CORES - 2 : 1 ))}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-256}
LR=${LR:-5e-4}
LR_WARMUP=${LR_WARMUP:-30}  # not WARMUP: in the queue's bench entries that is the bench's warm-up calls
PRECISION=${PRECISION:-bf16}
PRIOR_EPOCHS=${PRIOR_EPOCHS:-8}
PRIOR_BATCH=${PRIOR_BATCH:-256}
PRIOR_LR=${PRIOR_LR:-2e-3}
PRIOR_WARMUP=${PRIOR_WARMUP:-50}
MAX_MIN=${MAX_MIN:-2.25}
CLIP_MAX_MIN=${CLIP_MAX_MIN:-$MAX_MIN}
PRIOR_MAX_MIN=${PRIOR_MAX_MIN:-1.25}
VAL_LIMIT=${VAL_LIMIT:-}
MODEL=${MODEL:-priorclip-vit-b32}
CLIP_MODEL=${CLIP_MODEL:-clip-vit-b32}
PIR_MODEL=${PIR_MODEL:-pir-swin-t-bert}
PIR_MAX_MIN=${PIR_MAX_MIN:-$MAX_MIN}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
PRIORCLIP=("$PY" -m priorclip.cli)
[[ "$PHASES" == all ]] && PHASES=prior,priorclip,noaff,clip,report

if [[ "$PHASES" != report && ! -f "$DATA/$DATA_JSON" ]]; then
  echo "Error: $DATA/$DATA_JSON not found (pass the aid-rsicd folder as the second argument)" >&2
  exit 2
fi
if [[ "$PHASES" != report ]] && ! "$PY" -c "import ftfy" 2>/dev/null; then  # the GPU image lacks ftfy
  echo "Error: the tokenizer needs ftfy: pip install ftfy, or run this through q2-train.sh with its wheels in .whl/" \
    "(benchmarks/gpu/README.md)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT" || { echo "Error: cannot create $RUNS or $OUT" >&2; exit 2; }
VAL_ARGS=()
[[ -n "$VAL_LIMIT" ]] && VAL_ARGS=(--val-limit "$VAL_LIMIT")

keep() {  # copy a phase's small outputs to $OUT/<phase>/ (3 files) so they come back from the device machine
  local name=$1
  mkdir -p "$OUT/$name"
  for f in summary.json prior_summary.json metrics.jsonl; do
    [[ -f "$RUNS/$name/$f" ]] && cp "$RUNS/$name/$f" "$OUT/$name/"
  done
  [[ -f "$RUNS/$name.log" ]] && cp "$RUNS/$name.log" "$OUT/$name/"
  return 0
}

retrieval() {  # NAME MODEL CAP_MIN [options...]: one retrieval run with the shared budget
  local name=$1 model=$2 cap=$3
  shift 3
  rm -rf "${RUNS:?}/$name"
  # The budget is the same for every run: epochs, batch, lr, schedule, precision, seed, augmentation. Checkpoints:
  # the resumable one only at the end (2.3 GB with the optimiser state for the full model), no per-epoch copies.
  "${PRIORCLIP[@]}" train --data "$DATA/$DATA_JSON" --images "$DATA/images" --model "$model" \
    --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --wd 0.2 --beta2 0.98 --eps 1e-6 --warmup "$LR_WARMUP" \
    --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" --seed 0 --log-every 10 \
    --val-split val --test-split test "${VAL_ARGS[@]}" --no-epoch-checkpoints --resume-every-epochs 1000 \
    --max-wall-min "$cap" --no-progress --out "$RUNS/$name" "$@" $EXTRA 2>&1 | tee "$RUNS/$name.log"
  local rc=${PIPESTATUS[0]}
  keep "$name"
  return "$rc"
}

need_prior() {  # [PHASE]: the prior phase whose prior.pt a run starts from (prior, or pirprior for PIR)
  local from=${1:-prior}
  if [[ ! -f "$RUNS/$from/prior.pt" ]]; then
    echo "Error: $RUNS/$from/prior.pt is missing (the device machine was given back?): run the '$from' phase first" >&2
    exit 3
  fi
}

train_prior() {  # NAME MODEL: the scene prior of MODEL as an AID classifier
  local name=$1 model=$2
  rm -rf "${RUNS:?}/$name"
  "${PRIORCLIP[@]}" train-prior --data "$DATA/$DATA_JSON" --images "$DATA/images" --model "$model" \
    --epochs "$PRIOR_EPOCHS" --batch-size "$PRIOR_BATCH" --lr "$PRIOR_LR" --wd 0.05 --warmup "$PRIOR_WARMUP" \
    --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" --max-wall-min "$PRIOR_MAX_MIN" \
    --no-progress --out "$RUNS/$name" 2>&1 | tee "$RUNS/$name.log"
  local rc=${PIPESTATUS[0]}
  keep "$name"
  return "$rc"
}

run_phase() {
  case "$1" in
    prior)
      train_prior prior "$MODEL" ;;
    pirprior)
      train_prior pirprior "$PIR_MODEL" ;;
    pir)
      need_prior pirprior
      retrieval pir "$PIR_MODEL" "$PIR_MAX_MIN" --prior-checkpoint "$RUNS/pirprior/prior.pt" ;;
    priorclip)
      need_prior
      retrieval priorclip "$MODEL" "$MAX_MIN" --prior-checkpoint "$RUNS/prior/prior.pt" ;;
    randprior)
      retrieval randprior "$MODEL" "$MAX_MIN" ;;
    noaff)
      need_prior
      retrieval noaff "$MODEL" "$MAX_MIN" --prior-checkpoint "$RUNS/prior/prior.pt" --no-aff-loss ;;
    clip)
      retrieval clip "$CLIP_MODEL" "$CLIP_MAX_MIN" --no-aff-loss ;;
    report)
      "$PY" benchmarks/gpu/train_aid_report.py --runs "${REPORT_FROM:-$RUNS}" --out "$OUT" ${REPORT_NOTE:+--note "$REPORT_NOTE"} ;;
    *)
      echo "Error: unknown phase '$1' (prior|priorclip|noaff|clip|randprior|pirprior|pir|report|all)" >&2
      exit 2 ;;
  esac
}

IFS=, read -r -a LIST <<<"$PHASES"
for p in "${LIST[@]}"; do
  run_phase "$p" || { rc=$?; echo "Error: phase '$p' failed (exit status $rc)" >&2; exit "$rc"; }
done
