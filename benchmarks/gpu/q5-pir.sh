#!/usr/bin/env bash
# GPU queue entry 5 — the closed-domain PIR on a GPU: Swin-T against timm, then PIR trained on AID/RSICD beside
# entry 2's open-domain runs. Two data calls (entry 2's staged parts), then ONE call < 9 min.
#
#   the calls: `python benchmarks/gpu/calls.py 5` prints them (the .dtrain* parts as for entry 2, then this script
#   with the last part folder and .whl carried)
#
# Steps (each writes its results before the next starts; the time caps shrink to what is left of Q_TIME_LIMIT):
#   data       check and unpack the parts to /tmp/data/aid-rsicd (as entry 2)
#   swin       benchmarks/gpu/swin_timm_parity.py: our Swin-T against timm's swin_tiny_patch4_window7_224 with
#              identical (random) weights, fp32 with TF32 off, batch 1 and 8 (tolerance 1e-4)
#   pirprior   `priorclip train-prior --model pir-swin-t-bert`: PIR's torchvision ResNet-50 prior, AID scene classes
#   pir        `priorclip train --model pir-swin-t-bert` from that prior: PIR's losses, the same epochs, batch, lr,
#              schedule and precision as entry 2's runs (train_aid.sh), so the two families stand side by side
#   parity     fp16 and bf16 autocast against the fp32 reference on the whole test split, trained PIR weights
#   report     train_aid_report.py over these phases
# Output ($OUT, 3 files): q5-pir-status.json, q5-pir-summary.md, q5-pir-results.tar.gz.
# Knobs: train_aid.sh's, PIR_MAX_MIN (2.5), PRIOR_MAX_MIN (1.0), SWIN (1; 0 skips the timm step), SWIN_S (90), PARITY_S (60), PARTS_DIR, DATA_ROOT,
# DATA, MANIFEST, PARITY_PRECISIONS, and lib.sh's (Q_TIME_LIMIT 510, ...). The CPU test dry-runs it with pir-tiny.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

q_train_data q5-pir
PIR_MAX_MIN=${PIR_MAX_MIN:-2.5}
PRIOR_MAX_MIN=${PRIOR_MAX_MIN:-1.0}
OVER_PRIOR=30 OVER_RUN=45 PARITY_S=${PARITY_S:-60} REPORT_S=15

if [ "${SWIN:-1}" = 1 ]; then
  q_step swin "${SWIN_S:-90}" "$PY" benchmarks/gpu/swin_timm_parity.py --out "$R/swin" --device "${DEVICE:-auto}"
else
  q_skip swin "SWIN=$SWIN (the CPU dry run: timm cannot be imported there)"
fi

after_pir=$(( PARITY_S + REPORT_S ))
after_prior=$(awk -v m="$PIR_MAX_MIN" -v o="$OVER_RUN" -v a="$after_pir" 'BEGIN { printf "%d", m*60+o+a }')
q_phase pirprior "$OVER_PRIOR" "$after_prior" PRIOR_MAX_MIN
if [ -f "$RUNS/pirprior/prior.pt" ]; then
  q_phase pir "$OVER_RUN" "$after_pir" PIR_MAX_MIN
else
  q_skip pir "no trained PIR prior (see the pirprior step)"
fi

if [ -f "$RUNS/pir/model.pt" ]; then
  q_step parity "$(( PARITY_S + 60 ))" "$PY" benchmarks/gpu/trained_parity.py --checkpoint "$RUNS/pir/model.pt" \
    --data "$DATA" --split test --precisions "${PARITY_PRECISIONS:-fp16,bf16}" --device "${DEVICE:-auto}" --out "$R/parity"
else
  q_skip parity "no trained PIR checkpoint (see the pir step)"
fi

q_step report 60 env REPORT_FROM="$R" OUT="$R/report" \
  REPORT_NOTE="queue entry 5 (benchmarks/gpu/q5-pir.sh), one call; revision $PRIORCLIP_GIT_REVISION" \
  bash benchmarks/gpu/train_aid.sh report
q_finish
