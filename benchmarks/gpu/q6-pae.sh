#!/usr/bin/env bash
# GPU queue entry 6 — the PAE attention kernels of the closed-domain PIR (issue 16) and PIR's fused engine: the
# kernels' parity on hardware, each PAE block against torch.compile, the fused engine against compiled PIR end to
# end. ONE device call, < 9 min.
#
#   the call: `python benchmarks/gpu/calls.py 6` prints it (carry .bench-data and .whl, revision filled in)
#
# Steps, in this order; each writes its results before the next starts, and each runs under a time limit cut to what
# is left of Q_TIME_LIMIT (510 s):
#   kernels   pytest -m gpu over the PAE kernels' tests and the fused PIR engine's (KERNEL_TESTS): parity on
#             hardware, opcheck, the engine under CUDA graphs against the fp32 eager model (junit.xml)
#   kbench    python -m priorclip.benchmarks.kernels --kernels pae: each PAE block (eager, torch.compile, the Triton
#             kernel, the memory floor) at batch 1 and 256 in bf16 (targets: >= 2x torch.compile at batch 256;
#             the VIR chain at batch 1 against its weight-streaming floor, ~6 us)
#   bench     priorclip-bench on pir-swin-t-bert (random init: no PIR weights exist, so the verdict is each engine's
#             parity with its own fp32 reference) on the carried slice, texts on its real captions, batch 1/8/256: the
#             issue's comparison first, fused bf16 then torch.compile bf16 (mode reduce-overhead, dynamic batch:
#             max-autotune would not fit), then fused fp16 and eager bf16. The bench rewrites its report after every
#             engine, so a time limit keeps the engines before the one it cut (named in the step's note).
# Output ($OUT, 3 files): q6-pae-status.json, q6-pae-summary.md, q6-pae-results.tar.gz.
# Knobs: Q6_STEPS (kernels,kbench,bench; a later session can run what a time limit cut, e.g. Q6_STEPS=bench), DATA,
# MODEL, DEVICE, BATCHES, WARMUP, ITERS, Q6_ENGINES, COMPILE_MODE (reduce-overhead), COMPILE_DYNAMIC (1), E2E (0: the
# JPEG decode rate is the same for every engine and entry 1 measures it), KERNEL_TESTS, KB_BATCHES, KB_DTYPES,
# KB_ITERS, KB_COMPILE_MODE (default), KB_ARGS (more kernel-bench options, e.g. the CPU test's tiny --pae-shape), the
# step caps KERNELS_MAX_S, KBENCH_MAX_S, Q6_MAX_S, and lib.sh's (Q_TIME_LIMIT, ...); the CPU test dry-runs this with
# pir-tiny.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

q_need_slice
DEVICE=${DEVICE:-cuda}
q_init q6-pae
q_setup
R=$Q_WORK/results
STEPS=",${Q6_STEPS:-kernels,kbench,bench},"
wanted() { [[ $STEPS == *",$1,"* ]] || { q_skip "$1" "not in Q6_STEPS"; return 1; }; }

# On a machine without CUDA every test here is gpu-marked and skipped (the CPU runs are deselected by -m gpu)
TESTS="tests/kernels/test_vir_filter.py tests/kernels/test_pae_linear.py tests/kernels/test_pae_attention.py
  tests/kernels/test_pae_blocks.py tests/pir/test_fused_pir.py"
# shellcheck disable=SC2086  # KERNEL_TESTS is a list of paths
wanted kernels && q_step kernels "${KERNELS_MAX_S:-120}" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$R/kernels/junit.xml" ${KERNEL_TESTS:-$TESTS}

# shellcheck disable=SC2086  # KB_ARGS is a list of options
wanted kbench && q_step kbench "${KBENCH_MAX_S:-180}" "$PY" -m priorclip.benchmarks.kernels --device "$DEVICE" \
  --out "$R/kbench" --kernels pae --batches "${KB_BATCHES:-1,256}" --dtypes "${KB_DTYPES:-bf16}" \
  --iters "${KB_ITERS:-100}" --compile-mode "${KB_COMPILE_MODE:-default}" ${KB_ARGS:-}

MODE=${COMPILE_MODE:-reduce-overhead}
EXTRA=()
[ "${COMPILE_DYNAMIC:-1}" = 1 ] && EXTRA+=(--compile-dynamic)
[ "${E2E:-0}" = 1 ] || EXTRA+=(--no-e2e)
wanted bench && q_step bench "${Q6_MAX_S:-600}" "$PY" -m priorclip.benchmarks.cli \
  --model "${MODEL:-pir-swin-t-bert}" --device "$DEVICE" --batch-sizes "${BATCHES:-1,8,256}" \
  --warmup "${WARMUP:-10}" --iters "${ITERS:-100}" --dataset "$DATA" --real-captions "${EXTRA[@]}" \
  --engines "${Q6_ENGINES:-fused:bf16,torch-compile:bf16,fused:fp16,torch:bf16}" --compile-mode "$MODE" \
  --tag "$Q_DEVTAG-pae" --out "$R/bench" --note "queue entry 6 (benchmarks/gpu/q6-pae.sh): PIR's fused engine (PAE \
kernels) vs torch.compile $MODE; random-init weights, each engine judged against the model's own fp32 reference"

q_finish
