#!/usr/bin/env bash
# GPU queue entry 1 — speed of every torch-based engine, kernel tests, parity on CUDA. ONE device call, < 9 min.
#
#   the call: `python benchmarks/gpu/calls.py 1` prints it (carry .bench-data and .whl, revision filled in)
#
# Before the call, here: `python benchmarks/gpu/stage.py slice` (the class-spread test slice, 9 MiB, in .bench-data/)
# and the ftfy/wcwidth wheels in .whl/ (benchmarks/gpu/README.md). Steps, in priority order; each writes its results
# before the next starts, and each runs under a time limit cut to what is left of Q_TIME_LIMIT (510 s):
#   eager     priorclip-bench, torch eager fp32 (plain fp32: the bench turns TF32 off for matmuls AND cuDNN, whose
#             PyTorch default is on), fp16 and bf16 autocast, batch 1/8/256, JPEG->embedding rate, recall/parity of
#             each against the fp32 reference on the carried slice, on CUDA
#   kernels   pytest -m gpu on the open-domain kernels' tests: their parity grid, opcheck and
#             torch.compile(fullgraph) on hardware
#   kbench    python -m priorclip.benchmarks.kernels: each kernel vs eager, torch.compile and the memory floor, over its
#             autotuning grid (BLOCK_D x warps), CUDA-graph and per-call times (KBENCH_ARGS)
#   fused     every backend of priorclip.serve.engines that is none of torch, torch-compile, onnxruntime, aoti,
#             tensorrt (the fused Triton engine, at each precision it declares for CUDA; or FUSED_ENGINES=...)
#   compiled  torch.compile fp16 (mode reduce-overhead = CUDA graphs without the GEMM autotuning search, dynamic batch:
#             one graph per tower plus batch 1's): the baseline the fused engine is judged against, in the same run
#   tf32      eager fp32 with --tf32 (labelled fp32+TF32, tag "-tf32"), judged against the plain fp32 reference
#   aoti      AOTInductor fp16 with all the time left (AOTI_ENGINES; cut off first when time runs short). An engine
#             cut off by the limit is missing from the report and named in the step's note ("cut off during
#             aoti/fp16"); the engines before it are kept.
# Every bench step's note in the status also names the engines that failed, or fell outside their tolerance.
# Output ($OUT, 3 files): q1-speed-status.json, q1-speed-summary.md, q1-speed-results.tar.gz (bench JSON/MD/PNG per
# step, logs). Knobs: DATA, MODEL, DEVICE, BATCHES, WARMUP (bench warm-up calls), ITERS, EAGER_ENGINES,
# COMPILED_ENGINES, FUSED_ENGINES, AOTI_ENGINES, KBENCH_ARGS, COMPILE_MODE, COMPILE_DYNAMIC (1), E2E (1),
# REAL_CAPTIONS (1: texts timed on the slice's captions, see priorclip-bench --real-captions), the step caps
# EAGER_MAX_S, KERNELS_MAX_S, KBENCH_MAX_S, FUSED_MAX_S, COMPILED_MAX_S, TF32_MAX_S, AOTI_MAX_S, and lib.sh's
# (Q_TIME_LIMIT, ...); the CPU test dry-runs this with the tiny config.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

q_need_slice
DEVICE=${DEVICE:-cuda}
q_init q1-speed
q_setup  # also sets Q_DEVTAG (the device as a file-name tag) and Q_FUSED (the fused engines registered for DEVICE)

DEVTAG=$Q_DEVTAG
COMMON=(--model "${MODEL:-priorclip-vit-b32}" --device "$DEVICE" --batch-sizes "${BATCHES:-1,8,256}"
        --warmup "${WARMUP:-10}" --iters "${ITERS:-100}" --dataset "$DATA")
[ "${E2E:-1}" = 1 ] || COMMON+=(--no-e2e)
# texts timed on the slice's real captions: what a service embeds, and the issue's "text on real captions" target
[ "${REAL_CAPTIONS:-1}" = 1 ] && COMMON+=(--real-captions)
R=$Q_WORK/results
BENCH=("$PY" -m priorclip.benchmarks.cli)

q_step eager "${EAGER_MAX_S:-200}" "${BENCH[@]}" "${COMMON[@]}" \
  --engines "${EAGER_ENGINES:-torch:fp32,torch:fp16,torch:bf16}" --tag "$DEVTAG-eager" --out "$R/eager" \
  --note "queue entry 1 (benchmarks/gpu/q1-speed.sh), eager engines"

# the open-domain kernels' tests (PIR's PAE kernels are entry 6's)
q_step kernels "${KERNELS_MAX_S:-90}" "$PY" -m pytest -m gpu tests/kernels/test_belief_gate.py \
  tests/kernels/test_fp8_quant.py tests/kernels/test_add_layernorm.py -q -p no:cacheprovider \
  --junitxml="$R/kernels/junit.xml"

# shellcheck disable=SC2086  # KBENCH_ARGS is a list of options
q_step kbench "${KBENCH_MAX_S:-120}" "$PY" -m priorclip.benchmarks.kernels --device "$DEVICE" --out "$R/kbench" \
  ${KBENCH_ARGS:---kernels stem_gate,quantize_fp8,add_layernorm --batches 1,8,256 --dtypes fp16,fp32 --iters 100}

FUSED=${FUSED_ENGINES:-$Q_FUSED}
if [ -n "$FUSED" ]; then
  q_step fused "${FUSED_MAX_S:-180}" "${BENCH[@]}" "${COMMON[@]}" --engines "$FUSED" --tag "$DEVTAG-fused" \
    --out "$R/fused" --note "queue entry 1, fused-kernel engine(s)"
else
  q_skip fused "no fused-kernel engine registered for $DEVICE in priorclip.serve.engines (FUSED_ENGINES=backend:precision picks one)"
fi

DYN=(); [ "${COMPILE_DYNAMIC:-1}" = 1 ] && DYN=(--compile-dynamic)
COMPILED=${COMPILED_ENGINES-torch-compile:fp16}
if [ -n "$COMPILED" ]; then
  q_step compiled "${COMPILED_MAX_S:-300}" "${BENCH[@]}" "${COMMON[@]}" --engines "$COMPILED" \
    --compile-mode "${COMPILE_MODE:-reduce-overhead}" "${DYN[@]}" --tag "$DEVTAG-compiled" --out "$R/compiled" \
    --note "queue entry 1, compiled engines: torch.compile mode ${COMPILE_MODE:-reduce-overhead}$([ ${#DYN[@]} -gt 0 ] && echo ', dynamic batch')"
else
  q_skip compiled "COMPILED_ENGINES is empty"
fi

q_step tf32 "${TF32_MAX_S:-100}" "${BENCH[@]}" "${COMMON[@]}" --no-e2e --tf32 \
  --engines torch:fp32 --tag "$DEVTAG-eager-tf32" --out "$R/tf32" \
  --note "queue entry 1, eager fp32 with TF32 ON for matmuls and cuDNN: a TF32 row (fp32+TF32), not fp32"

AOTI=${AOTI_ENGINES-aoti:fp16}
if [ -n "$AOTI" ]; then
  q_step aoti "${AOTI_MAX_S:-600}" "${BENCH[@]}" "${COMMON[@]}" --engines "$AOTI" "${DYN[@]}" \
    --tag "$DEVTAG-aoti" --out "$R/aoti" --note "queue entry 1, AOTInductor package(s)"
else
  q_skip aoti "AOTI_ENGINES is empty"
fi

q_finish
