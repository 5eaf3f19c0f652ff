#!/usr/bin/env bash
# GPU queue entry 3 — ONNX Runtime's CUDA execution provider, fp16 and int8. Wheel-part calls, then ONE call < 9 min.
#
# Here, once: `../shared/tools/wheel-chunks onnxruntime-gpu==1.31.1` (243.7 MiB: .chunk1-.chunk4 of 52 MiB, .chunk5 of
# 35.7 MiB + names.txt/sizes.txt), `python benchmarks/gpu/stage.py slice` (.bench-data) and the ftfy/wcwidth wheels in
# .whl/. On the device, back to back (the machine stays warm ~30 s between calls), the calls that `python
# benchmarks/gpu/calls.py 3` prints: one per wheel-part folder but the last (copies its part to /tmp/chunks), then
# this script with the last part folder, .bench-data and .whl carried.
# Steps (each writes its results before the next starts, under what is left of Q_TIME_LIMIT):
#   wheels     put onnxruntime-gpu back together from /tmp/chunks + the carried last part (a missing part is named),
#              install it into /tmp/site (ahead of the image's CPU onnxruntime on PYTHONPATH)
#   preflight  a one-node graph on the CUDA provider alone; a session that fell back to the CPU stops the entry here
#   bench      priorclip-bench --engines onnxruntime:fp16,onnxruntime:int8 at batch 1/8/256 on the carried slice:
#              speed, and parity with the fp32 eager reference; INT8 (entropy) calibrated on all 256 of the slice's
#              train images, as the export steps below are; its note names any engine that failed or FAILs parity
#   export-int8-minmax, export-int8-percentile
#              python -m priorclip.export.report on the same slice and calibration images: the two calibration
#              methods the bench does not run, one step each, so each writes its JSON as soon as it is done (each
#              also computes its own CPU fp32 reference, ~10-20 s). fp16 and int8 entropy are not repeated here: the
#              bench exported and checked them. Both give int8 the CUDA provider's layout (tensorrt Q/DQ on fp16),
#              so the three calibration methods compare directly.
# Output ($OUT, 3 files): q3-ort-cuda-status.json, q3-ort-cuda-summary.md, q3-ort-cuda-results.tar.gz.
# Knobs: CHUNKS_DIR (/tmp/chunks), NAMES (the carried .chunk*/names.txt), DATA (.bench-data/aid-rsicd), MODEL, DEVICE,
# BATCHES, WARMUP (bench warm-up calls), ITERS, E2E (1), ENGINES, CALIB_IMAGES (256), EXPORT_VARIANTS
# (onnx-int8-minmax onnx-int8-percentile: one step each), and lib.sh's (Q_TIME_LIMIT, ...).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

q_need_slice
DEVICE=${DEVICE:-cuda}
NAMES=${NAMES-$(ls -d .chunk*/names.txt 2>/dev/null | head -1)}
q_init q3-ort-cuda
Q_SITE=${Q_SITE:-/tmp/site}
R=$Q_WORK/results

if [ -n "$NAMES" ]; then
  q_step wheels 150 "$PY" benchmarks/gpu/wheels.py --names "$NAMES" --parts "${CHUNKS_DIR:-/tmp/chunks}" \
    --site "$Q_SITE" --work "$Q_WORK/wheels"
else
  q_skip wheels "no .chunk*/names.txt carried: using the onnxruntime already installed (the preflight checks it)"
fi
q_setup
q_cuda_libs  # the CUDA provider's libraries (lib.sh)

q_step preflight 90 "$PY" benchmarks/gpu/ort_preflight.py --device "$DEVICE" --out "$R/preflight"
if ! grep -q '"ok": true' "$R/preflight/preflight.json" 2>/dev/null; then
  for s in bench $(printf 'export-%s ' ${EXPORT_VARIANTS:-int8-minmax int8-percentile}); do
    q_skip "$s" "the preflight failed: ONNX Runtime does not run on the $DEVICE provider (see preflight.json)"
  done
  q_finish
  exit 3
fi

DEVTAG=$Q_DEVTAG  # from q_setup
E2E_ARGS=(); [ "${E2E:-1}" = 1 ] || E2E_ARGS=(--no-e2e)
q_step bench 330 "$PY" -m priorclip.benchmarks.cli --model "${MODEL:-priorclip-vit-b32}" --device "$DEVICE" \
  --engines "${ENGINES:-onnxruntime:fp16,onnxruntime:int8}" --batch-sizes "${BATCHES:-1,8,256}" \
  --warmup "${WARMUP:-10}" --iters "${ITERS:-100}" --dataset "$DATA" "${E2E_ARGS[@]}" --tag "$DEVTAG-ort" \
  --calib-images "${CALIB_IMAGES:-256}" --calib-captions 1024 \
  --out "$R/bench" --note "queue entry 3 (benchmarks/gpu/q3-ort-cuda.sh): ONNX Runtime on the $DEVICE provider"

for v in ${EXPORT_VARIANTS:-int8-minmax int8-percentile}; do
  q_step "export-$v" 150 "$PY" -m priorclip.export.report --model "${MODEL:-priorclip-vit-b32}" --data "$DATA" \
    --n-test 0 --n-calib-images "${CALIB_IMAGES:-256}" --n-calib-captions 1024 --device "$DEVICE" --variants "onnx-$v" \
    --tag "$DEVTAG-ort-$v" --out "$R/export-$v"
done
q_finish
