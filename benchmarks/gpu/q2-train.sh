#!/usr/bin/env bash
# GPU queue entry 2 — training on AID/RSICD and parity on the trained weights. Two data calls, then ONE call < 9 min.
#
# Here, once: `python benchmarks/gpu/stage.py train` (train split + 300 class-spread val images + test split, 126.9
# MiB gzip'd tar in parts of <= 50 MiB: .dtrain1, .dtrain2, .dtrain3) and the ftfy/wcwidth wheels in .whl/.
# On the device, back to back (the machine stays warm ~30 s between calls): the calls that `python
# benchmarks/gpu/calls.py 2` prints: one per part folder but the last (copies its part to /tmp/dparts), then this
# script with the last part folder and .whl carried.
# Steps (each writes its results before the next starts; the time caps shrink to what is left of Q_TIME_LIMIT):
#   data       check every part (size, SHA-256; a missing one is named) and unpack to /tmp/data/aid-rsicd
#   prior      `priorclip train-prior`: the ModifiedResNet-50 scene prior, PRIOR_EPOCHS, cap PRIOR_MAX_MIN
#   priorclip  `priorclip train`: priorclip-vit-b32 from that prior, contrastive + affiliation loss, cap MAX_MIN
#   clip       `priorclip train`: plain CLIP ViT-B/32 with the same epochs/batch/lr/schedule, cap CLIP_MAX_MIN
#              (both report test-split R@1/5/10 and mR, samples/s, train and wall seconds)
#   parity     fp16 and bf16 autocast engines against the fp32 reference (TF32 off) on the whole test split, with
#              the trained PriorCLIP weights (benchmarks/gpu/trained_parity.py)
#   int8       the same for ONNX Runtime int8 (CPU provider), only when INT8_MIN_S (175) seconds are left: when
#              every phase runs to its cap (the worst case) none are, so int8 runs only after faster training
#   report     train_aid_report.py: JSON + Markdown + curves PNG over the phases (rebuildable here from the copies);
#              int8 is cut so that it always leaves the report its time
# Output ($OUT, 3 files): q2-train-status.json, q2-train-summary.md, q2-train-results.tar.gz.
# Knobs: train_aid.sh's (EPOCHS, BATCH, LR, LR_WARMUP, PRECISION, PRIOR_EPOCHS, ...), the caps PRIOR_MAX_MIN (1.25),
# MAX_MIN (2.25), CLIP_MAX_MIN (1.25), PARTS_DIR (/tmp/dparts), DATA_ROOT (/tmp/data), DATA (an unpacked dataset
# folder instead of the parts), MANIFEST (the carried .dtrain*/parts.json), PARITY_PRECISIONS (fp16,bf16),
# PARITY_S (60), INT8_MIN_S (175), and lib.sh's (Q_TIME_LIMIT 510, ...).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

PARTS_DIR=${PARTS_DIR:-/tmp/dparts}
DATA_ROOT=${DATA_ROOT:-/tmp/data}
MANIFEST=${MANIFEST-$(ls -d .dtrain*/parts.json 2>/dev/null | head -1)}
if [ -z "${DATA:-}" ] && [ -z "$MANIFEST" ]; then
  q_die "no .dtrain*/parts.json here: carry the last part folder with this call (python benchmarks/gpu/stage.py train)"
fi
q_init q2-train

if [ -z "${DATA:-}" ]; then
  q_step data 120 "$PY" benchmarks/gpu/stage.py unpack --manifest "$MANIFEST" --parts "$PARTS_DIR" --dst "$DATA_ROOT"
  DATA=$DATA_ROOT/aid-rsicd
fi
if [ ! -f "$DATA/dataset_rsicd_aid.json" ]; then
  q_finish
  q_die "no dataset at $DATA (see the data step above)"
fi
q_setup

R=$Q_WORK/results
export RUNS=$Q_WORK/runs DATA_JSON=dataset_rsicd_aid.json PYTHON="$PY"
PRIOR_MAX_MIN=${PRIOR_MAX_MIN:-1.25}
MAX_MIN=${MAX_MIN:-2.25}
CLIP_MAX_MIN=${CLIP_MAX_MIN:-1.25}
# Seconds a phase needs beyond its training cap (start, data decode, final validation and test, checkpoints), and
# what the steps after training need: estimates for an H100 (benchmarks/gpu/README.md), kept as reserves.
OVER_PRIOR=30 OVER_RUN=40 PARITY_S=${PARITY_S:-60} REPORT_S=15

cap_min() {  # MAX_MIN OVERHEAD_S RESERVE_S: the cap in minutes, cut to what is left (empty when under 0.3 min)
  awk -v l="$(q_left)" -v m="$1" -v o="$2" -v r="$(( $3 + Q_RESERVE ))" \
    'BEGIN { c = (l - o - r) / 60; if (c > m) c = m; if (c >= 0.3) printf "%.2f", c }'
}

phase() {  # STEP OVERHEAD_S RESERVE_S CAPVAR: one train_aid.sh phase under a cap that fits the time left
  local step=$1 over=$2 reserve=$3 var=$4 cap
  cap=$(cap_min "${!var}" "$over" "$reserve")
  if [ -z "$cap" ]; then
    q_skip "$step" "not enough time left for a useful $step run ($(q_left) s left, $reserve s reserved for later steps)"
    return
  fi
  local hard
  hard=$(awk -v c="$cap" -v o="$over" 'BEGIN { printf "%d", c * 60 + o + 60 }')
  q_step "$step" "$hard" env "$var=$cap" OUT="$R" bash benchmarks/gpu/train_aid.sh "$step" "$DATA"
}

after_pc=$(awk -v c="$CLIP_MAX_MIN" -v o="$OVER_RUN" -v p="$PARITY_S" -v r="$REPORT_S" 'BEGIN { printf "%d", c*60+o+p+r }')
after_prior=$(awk -v m="$MAX_MIN" -v o="$OVER_RUN" -v a="$after_pc" 'BEGIN { printf "%d", m*60+o+a }')
phase prior "$OVER_PRIOR" "$after_prior" PRIOR_MAX_MIN
if [ -f "$RUNS/prior/prior.pt" ]; then
  phase priorclip "$OVER_RUN" "$after_pc" MAX_MIN
else
  q_skip priorclip "no trained prior (see the prior step)"
fi
phase clip "$OVER_RUN" "$(( PARITY_S + REPORT_S ))" CLIP_MAX_MIN

if [ -f "$RUNS/priorclip/model.pt" ]; then
  q_step parity "$(( PARITY_S + 60 ))" "$PY" benchmarks/gpu/trained_parity.py --checkpoint "$RUNS/priorclip/model.pt" \
    --data "$DATA" --split test --precisions "${PARITY_PRECISIONS:-fp16,bf16}" --device "${DEVICE:-auto}" --out "$R/parity"
  if [ "$(q_left)" -ge "${INT8_MIN_S:-175}" ]; then
    q_step int8 "$(q_leaving "$REPORT_S")" "$PY" benchmarks/gpu/trained_parity.py \
      --checkpoint "$RUNS/priorclip/model.pt" --data "$DATA" --split test --precisions int8 --device "${DEVICE:-auto}" \
      --out "$R/int8" --stem trained-parity-int8
  else
    q_skip int8 "$(q_left) s left, under INT8_MIN_S=${INT8_MIN_S:-175} (export + calibration + CPU inference)"
  fi
else
  q_skip parity "no trained PriorCLIP checkpoint (see the priorclip step)"
fi

q_step report 60 env REPORT_FROM="$R" OUT="$R/report" \
  REPORT_NOTE="queue entry 2 (benchmarks/gpu/q2-train.sh), one call; revision $PRIORCLIP_GIT_REVISION" \
  bash benchmarks/gpu/train_aid.sh report
q_finish
