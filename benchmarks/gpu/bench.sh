#!/usr/bin/env bash
# One GPU call (< 10 minutes on an H100): priorclip-bench for priorclip-vit-b32 with
#   torch eager fp32 (the reference code's path), eager fp16, torch.compile fp16 / bf16 (CUDA graphs),
#   ONNX Runtime CUDA fp16 (when onnxruntime-gpu is installed), AOTInductor fp16,
# at batch 1/8/64/256, plus the JPEG-to-embedding rate and the recall check against the fp32 reference.
#
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/gpu/bench.sh [DATASET] [OUT]
# DATASET: a Karpathy JSON or a folder holding one plus images/ (default: ../shared/data/aid-rsicd, then
#          shared/data/aid-rsicd, then .bench-data/aid-rsicd, which benchmarks/gpu/stage-data.sh fills with the
#          test split so a call can carry it; a generated 256-image set when none exists).
# OUT:     output folder (default: $OUT when set, else ./bench-gpu-out): bench-<gpu>-<date>.json/.md/.png + bench.log.
# Wheels: *.whl under .whl/ are installed to /tmp/site first (ftfy and wcwidth are needed by the tokenizer, and are
#         not in the GPU image; onnxruntime-gpu for the CUDA provider), and /tmp/site is put on PYTHONPATH when it
#         exists (where ../shared/tools/wheel-chunks installs large wheels).
# Environment knobs: ENGINES, BATCHES, ITERS, WARMUP, COMPILE_MODE, RECALL_IMAGES, TIME_LIMIT (seconds, default 540),
# MODEL (default priorclip-vit-b32), DEVICE (default cuda; cpu for a smoke test), PYTHON (default python3),
# TAG (name part of the output files instead of the GPU's name, e.g. to split the engines over two calls:
#   ENGINES=torch:fp32,torch:fp16,torch-compile:fp16,torch-compile:bf16 TAG=h100-torch  and
#   ENGINES=onnxruntime:fp16,aoti:fp16 TAG=h100-exported; each compiled precision costs minutes of compilation).
set -uo pipefail
cd "$(dirname "$0")/../.."

DATA=${1:-}
OUTDIR=${2:-${OUT:-$PWD/bench-gpu-out}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/bench.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "bench.sh: installing .whl/*.whl failed" | tee -a "$LOG"; exit 1; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# The project itself, without pip or setuptools: the same package layout pyproject's package-dir mapping installs.
rm -rf /tmp/priorclip-src && mkdir -p /tmp/priorclip-src
cp -r priorclip /tmp/priorclip-src/priorclip
for sub in kernels export serve benchmarks; do cp -r "$sub" "/tmp/priorclip-src/priorclip/$sub"; done
export PYTHONPATH=/tmp/priorclip-src${PYTHONPATH:+:$PYTHONPATH}
# .git does not travel to the GPU machine: pass the revision in, e.g. PRIORCLIP_GIT_REVISION=$(git rev-parse HEAD)
export PRIORCLIP_GIT_REVISION=${PRIORCLIP_GIT_REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
$PY -c "import ftfy" 2>/dev/null \
  || { echo "bench.sh: ftfy is missing; carry its wheel (and wcwidth's) in .whl/" | tee -a "$LOG"; exit 1; }

if [ -z "$DATA" ]; then
  for d in ../shared/data/aid-rsicd shared/data/aid-rsicd .bench-data/aid-rsicd; do
    if [ -d "$d" ]; then DATA=$d; break; fi
  done
fi
DATA_ARGS=()
if [ -n "$DATA" ]; then DATA_ARGS=(--dataset "$DATA"); else DATA_ARGS=(--recall-images "${RECALL_IMAGES:-256}"); fi
[ -n "${RECALL_IMAGES:-}" ] && [ -n "$DATA" ] && DATA_ARGS+=(--recall-images "$RECALL_IMAGES")

ENGINES=${ENGINES:-torch:fp32,torch:fp16,torch-compile:fp16,torch-compile:bf16,onnxruntime:fp16,aoti:fp16}
# reduce-overhead = CUDA graphs with inductor's default kernels; with --compile-dynamic each tower compiles once
# for every batch size, which keeps two compiled precisions inside one call (max-autotune autotunes every GEMM shape
# of every batch size: tens of minutes here). COMPILE_MODE=max-autotune runs the full search when time allows.
COMPILE_MODE=${COMPILE_MODE:-reduce-overhead}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnxruntime', o.__version__, o.get_available_providers())" 2>&1
  echo "dataset: ${DATA:-generated}; engines: $ENGINES; compile mode: $COMPILE_MODE"
} | tee -a "$LOG"

# The report is rewritten after every engine, so a run cut short by the time limit keeps the engines it finished.
timeout -k 20 "${TIME_LIMIT:-540}" $PY -m priorclip.benchmarks.cli \
  --model "${MODEL:-priorclip-vit-b32}" --device "${DEVICE:-cuda}" \
  --engines "$ENGINES" \
  --batch-sizes "${BATCHES:-1,8,64,256}" --warmup "${WARMUP:-10}" --iters "${ITERS:-50}" \
  --compile-mode "$COMPILE_MODE" --compile-dynamic \
  "${DATA_ARGS[@]}" \
  --note "H100 call of benchmarks/gpu/bench.sh; torch-compile mode $COMPILE_MODE with a dynamic batch" \
  ${TAG:+--tag "$TAG"} \
  --out "$OUTDIR" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "bench.sh: priorclip-bench exit status $rc" | tee -a "$LOG"
ls -la "$OUTDIR"
exit "$rc"
