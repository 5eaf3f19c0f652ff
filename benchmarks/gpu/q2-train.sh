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

q_train_data q2-train
PRIOR_MAX_MIN=${PRIOR_MAX_MIN:-1.25}
MAX_MIN=${MAX_MIN:-2.25}
CLIP_MAX_MIN=${CLIP_MAX_MIN:-1.25}
# Seconds a phase needs beyond its training cap (start, data decode, final validation and test, checkpoints), and
# what the steps after training need: estimates for an H100 (benchmarks/gpu/README.md), kept as reserves.
OVER_PRIOR=30 OVER_RUN=40 PARITY_S=${PARITY_S:-60} REPORT_S=15

after_pc=$(awk -v c="$CLIP_MAX_MIN" -v o="$OVER_RUN" -v p="$PARITY_S" -v r="$REPORT_S" 'BEGIN { printf "%d", c*60+o+p+r }')
after_prior=$(awk -v m="$MAX_MIN" -v o="$OVER_RUN" -v a="$after_pc" 'BEGIN { printf "%d", m*60+o+a }')
q_phase prior "$OVER_PRIOR" "$after_prior" PRIOR_MAX_MIN
if [ -f "$RUNS/prior/prior.pt" ]; then
  q_phase priorclip "$OVER_RUN" "$after_pc" MAX_MIN
else
  q_skip priorclip "no trained prior (see the prior step)"
fi
q_phase clip "$OVER_RUN" "$(( PARITY_S + REPORT_S ))" CLIP_MAX_MIN

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
