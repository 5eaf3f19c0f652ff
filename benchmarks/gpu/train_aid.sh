#!/usr/bin/env bash
# Real training runs on aid-rsicd (AID images + RSICD captions), in phases that each end well under 10 minutes.
#
#   benchmarks/gpu/train_aid.sh PHASE[,PHASE...] [DATA_DIR]
#
# PHASE, in this order (one device call each):
#   prior      train the ModifiedResNet-50 prior of priorclip-vit-b32 as a 30-class AID scene classifier
#   priorclip  priorclip-vit-b32 from that prior, contrastive + affiliation loss
#   noaff      the same budget, contrastive loss only
#   clip       the same budget, plain CLIP ViT-B/32 (no prior, no gate), contrastive loss only
#   randprior  optional: priorclip-vit-b32 + affiliation loss with a random (untrained) prior
#   report     JSON + Markdown + PNG (loss and validation-mR curves) from the phases that have run (CPU is enough)
#   all        prior,priorclip,noaff,clip,report (for a machine without a per-call limit)
#
# DATA_DIR defaults to ../shared/data/aid-rsicd, else /tmp/data/aid-rsicd (where data-chunks unpacks it). Run
# folders (checkpoints included) go to $RUNS (default runs/train-aid, ignored by git). The small outputs of every
# phase (summary.json or prior_summary.json, metrics.jsonl, the log: 3 files) are copied to $OUT/<phase>/ so they
# come back from the device machine; `report` reads $RUNS, or REPORT_FROM=<a folder holding those phase folders>,
# and writes $OUT/train-aid-results.{json,md} and $OUT/train-aid-curves.png.
#
# On the lent GPU machine (device tool: ../shared does not travel, 64 MiB carried per call, and the machine stays
# warm only ~30 s after a call, so make the calls back to back; 30 min of device time in all):
#   here, once:  ../shared/tools/data-chunks ../shared/data/aid-rsicd      (4 ignored folders .dchunk1..4)
#                echo /.whl/ >> .git/info/exclude && python3 -m pip download -q --no-deps --only-binary=:all: \
#                  --python-version 3.12 -d .whl ftfy wcwidth                   (the tokenizer's ftfy is not there)
#   calls 1-3:   carry [".dchunkN"]: mkdir -p /tmp/dparts && cp .dchunkN/part.* /tmp/dparts/
#   call 4:      carry [".dchunk4", ".whl"]: cp .dchunk4/part.* /tmp/dparts/ && mkdir -p /tmp/data &&
#                  cat /tmp/dparts/part.* | tar -x -C /tmp/data && bash benchmarks/gpu/train_aid.sh prior
#   calls 5-7:   carry [".whl"]: bash benchmarks/gpu/train_aid.sh priorclip   (then noaff, then clip)
#   here:        copy each call's returned <phase>/ folder under one folder F, then
#                REPORT_FROM=F OUT=benchmarks/results bash benchmarks/gpu/train_aid.sh report
# If a call finds runs/train-aid/prior/prior.pt or /tmp/data gone (the machine was given back), it says so: start
# again from call 1.
#
# Knobs (environment): EPOCHS (6), BATCH (256), LR (5e-4), WARMUP (300), PRECISION (bf16), WORKERS (cores - 2),
# PRIOR_EPOCHS (25), PRIOR_BATCH (256), PRIOR_LR (2e-3), MAX_MIN (4.5: wall limit of a retrieval phase's training,
# minutes; a run cut short is marked 'stopped' in the report), PRIOR_MAX_MIN (3.5), MODEL (priorclip-vit-b32),
# CLIP_MODEL (clip-vit-b32), DEVICE (auto), DATA_JSON (dataset_rsicd_aid.json), EXTRA (more `priorclip train`
# options), PYTHON. The CPU test runs every phase with the tiny configs through these knobs.
set -euo pipefail
cd "$(dirname "$0")/../.."

PHASES=${1:?usage: train_aid.sh prior|priorclip|noaff|clip|randprior|report|all [DATA_DIR]}
DEFAULT_DATA=../shared/data/aid-rsicd
[[ -d "$DEFAULT_DATA" || ! -d /tmp/data/aid-rsicd ]] || DEFAULT_DATA=/tmp/data/aid-rsicd
DATA=${2:-${DATA:-$DEFAULT_DATA}}
DATA_JSON=${DATA_JSON:-dataset_rsicd_aid.json}
RUNS=${RUNS:-runs/train-aid}
OUT=${OUT:-$RUNS/report}
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=${WORKERS:-$(( CORES > 3 ? CORES - 2 : 1 ))}
EPOCHS=${EPOCHS:-6}
BATCH=${BATCH:-256}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-300}
PRECISION=${PRECISION:-bf16}
PRIOR_EPOCHS=${PRIOR_EPOCHS:-25}
PRIOR_BATCH=${PRIOR_BATCH:-256}
PRIOR_LR=${PRIOR_LR:-2e-3}
MAX_MIN=${MAX_MIN:-4.5}
PRIOR_MAX_MIN=${PRIOR_MAX_MIN:-3.5}
MODEL=${MODEL:-priorclip-vit-b32}
CLIP_MODEL=${CLIP_MODEL:-clip-vit-b32}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
PY=${PYTHON:-$(command -v python3 || command -v python)}
PRIORCLIP=("$PY" -m priorclip.cli)
[[ "$PHASES" == all ]] && PHASES=prior,priorclip,noaff,clip,report

if [[ "$PHASES" != report && ! -f "$DATA/$DATA_JSON" ]]; then
  echo "Error: $DATA/$DATA_JSON not found (pass the aid-rsicd folder as the second argument)" >&2
  exit 2
fi
if [[ "$PHASES" != report ]] && ! "$PY" -c "import ftfy" 2>/dev/null; then  # the GPU image lacks ftfy (see above)
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "Error: the tokenizer needs ftfy: pip install ftfy, or carry its wheels in .whl/ (see the header)" >&2
    exit 2
  fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT"

keep() {  # copy a phase's small outputs to $OUT/<phase>/ so they come back from the device machine
  local name=$1
  mkdir -p "$OUT/$name"
  for f in summary.json prior_summary.json metrics.jsonl; do  # at most 8 files come back per call: 3 a phase
    [[ -f "$RUNS/$name/$f" ]] && cp "$RUNS/$name/$f" "$OUT/$name/"
  done
  [[ -f "$RUNS/$name.log" ]] && cp "$RUNS/$name.log" "$OUT/$name/"
  return 0
}

retrieval() {  # NAME MODEL [options...]: one retrieval run with the shared budget
  local name=$1 model=$2
  shift 2
  rm -rf "${RUNS:?}/$name"
  # The budget is the same for every run: epochs, batch, lr, schedule, precision, seed, augmentation.
  "${PRIORCLIP[@]}" train --data "$DATA/$DATA_JSON" --images "$DATA/images" --model "$model" \
    --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --wd 0.2 --beta2 0.98 --eps 1e-6 --warmup "$WARMUP" \
    --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" --seed 0 --log-every 10 \
    --val-split val --test-split test --no-epoch-checkpoints --resume-every-epochs 4 --max-wall-min "$MAX_MIN" --no-progress \
    --out "$RUNS/$name" "$@" $EXTRA 2>&1 | tee "$RUNS/$name.log"
  keep "$name"
}

run_phase() {
  case "$1" in
    prior)
      rm -rf "${RUNS:?}/prior"
      "${PRIORCLIP[@]}" train-prior --data "$DATA/$DATA_JSON" --images "$DATA/images" --model "$MODEL" \
        --epochs "$PRIOR_EPOCHS" --batch-size "$PRIOR_BATCH" --lr "$PRIOR_LR" --wd 0.05 --warmup 200 \
        --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" --max-wall-min "$PRIOR_MAX_MIN" \
        --no-progress --out "$RUNS/prior" 2>&1 | tee "$RUNS/prior.log"
      keep prior ;;
    priorclip|randprior)
      local prior_args=()
      if [[ "$1" == priorclip ]]; then
        if [[ ! -f "$RUNS/prior/prior.pt" ]]; then
          echo "Error: $RUNS/prior/prior.pt is missing (the device machine was released?): run the 'prior' phase first" >&2
          exit 3
        fi
        prior_args=(--prior-checkpoint "$RUNS/prior/prior.pt")
      fi
      retrieval "$1" "$MODEL" "${prior_args[@]}" ;;
    noaff)
      if [[ ! -f "$RUNS/prior/prior.pt" ]]; then
        echo "Error: $RUNS/prior/prior.pt is missing: run the 'prior' phase first" >&2
        exit 3
      fi
      retrieval noaff "$MODEL" --prior-checkpoint "$RUNS/prior/prior.pt" --no-aff-loss ;;
    clip)
      retrieval clip "$CLIP_MODEL" --no-aff-loss ;;
    report)
      "$PY" benchmarks/gpu/train_aid_report.py --runs "${REPORT_FROM:-$RUNS}" --out "$OUT" ;;
    *)
      echo "Error: unknown phase '$1' (prior|priorclip|noaff|clip|randprior|report|all)" >&2
      exit 2 ;;
  esac
}

IFS=, read -r -a LIST <<<"$PHASES"
for p in "${LIST[@]}"; do run_phase "$p"; done
