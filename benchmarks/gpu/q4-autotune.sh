#!/usr/bin/env bash
# GPU queue entry 4 — the fused engine against torch.compile(mode="max-autotune") at batch 256, same precision, same
# report (issue 13's target: >= 1.2x). ONE device call, < 9 min.
#
#   the call: `python benchmarks/gpu/calls.py 4` prints it (carry .bench-data and .whl, revision filled in)
#
# One priorclip-bench step, engines in this order so that a time limit cuts the slowest last: fused bf16 and fp16
# (CUDA graphs, seconds to build), then torch.compile bf16 and fp16 with max-autotune and static shapes (GEMM and
# convolution autotuning for batch 256 per tower: minutes each). The bench rewrites its report after every engine, so
# an engine cut off is named in the step's note and the ones before it are kept; its summary's "vs torch.compile"
# column is the comparison. Texts are timed on the slice's real captions (the compiled engine runs 77 tokens).
# Knobs: DATA, MODEL, DEVICE, BATCHES (256), WARMUP, ITERS, Q4_ENGINES, COMPILE_MODE (max-autotune), Q4_MAX_S, and
# lib.sh's (Q_TIME_LIMIT, ...); the CPU test dry-runs this with the tiny config.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

q_need_slice
DEVICE=${DEVICE:-cuda}
q_init q4-autotune
q_setup

q_step bench "${Q4_MAX_S:-600}" "$PY" -m priorclip.benchmarks.cli --model "${MODEL:-priorclip-vit-b32}" \
  --device "$DEVICE" --batch-sizes "${BATCHES:-256}" --warmup "${WARMUP:-10}" --iters "${ITERS:-100}" \
  --dataset "$DATA" --real-captions --no-e2e \
  --engines "${Q4_ENGINES:-fused:bf16,fused:fp16,torch-compile:bf16,torch-compile:fp16}" \
  --compile-mode "${COMPILE_MODE:-max-autotune}" --tag "$Q_DEVTAG-autotune" --out "$Q_WORK/results/bench" \
  --note "queue entry 4 (benchmarks/gpu/q4-autotune.sh): fused engine vs torch.compile ${COMPILE_MODE:-max-autotune}, static batch"

q_finish
