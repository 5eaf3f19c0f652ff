#!/usr/bin/env bash
# Export parity on the GPU machine, one call (< 10 min on an H100):
#   bash benchmarks/gpu/export_parity.sh
# 1. installs carried wheels from .whl/ (onnxruntime-gpu, and onnx/onnxscript if carried) without touching torch;
# 2. exports priorclip-vit-b32 (random init, seed 0) as ONNX fp32 / fp16 / int8 x {minmax, percentile, entropy}
#    and runs each with ONNX Runtime's CUDA execution provider (TF32 off), against the fp32 PyTorch reference;
# 3. compiles the AOTInductor packages (fp32, fp16) for cuda and runs the same parity;
# Results: $OUT/export-parity-gpu-*.{json,md}, $OUT/export-parity-aoti-gpu-*.{json,md}, logs and env.txt.
# Data: ../shared/data/aid-rsicd or /tmp/data/aid-rsicd when present (first 256 test images), else generated scenes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu-export}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
N_TEST=${N_TEST:-256}
# The full data set (calibration uses its train split): ../shared where it exists, else where data-chunks unpacks it.
DATA=synthetic
for d in ../shared/data/aid-rsicd /tmp/data/aid-rsicd; do
  if [ -f "$d/dataset_rsicd_aid.json" ]; then DATA=$d; break; fi
done

if compgen -G ".whl/*.whl" > /dev/null; then
  # onnxruntime and onnxruntime-gpu install the same module folder: remove the CPU one first.
  if compgen -G ".whl/onnxruntime_gpu-*.whl" > /dev/null; then "$PY" -m pip uninstall -y -q onnxruntime 2>/dev/null || true; fi
  for w in .whl/*.whl; do
    echo "installing $w"
    "$PY" -m pip install -q --no-deps "$w" 2>&1 | tail -2
  done
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" - <<'PY'
import importlib
for m in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
try:
    import onnxruntime as ort
    print("ort providers", ort.get_available_providers())
except Exception:
    pass
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

rc=0
# ONNX Runtime, CUDA execution provider.
timeout 330 "$PY" benchmarks/gpu/export_parity.py --model priorclip-vit-b32 --data "$DATA" --n-test "$N_TEST" \
  --device cuda --formats onnx --tag gpu --out "$OUT" > "$OUT/onnx-cuda.log" 2>&1 || { rc=1; echo "onnx-cuda failed (see $OUT/onnx-cuda.log)"; }
tail -5 "$OUT/onnx-cuda.log"
# AOTInductor packages compiled for cuda.
timeout 240 "$PY" benchmarks/gpu/export_parity.py --model priorclip-vit-b32 --data "$DATA" --n-test "$N_TEST" \
  --device cuda --formats aoti --tag aoti-gpu --out "$OUT" > "$OUT/aoti-cuda.log" 2>&1 || { rc=1; echo "aoti-cuda failed (see $OUT/aoti-cuda.log)"; }
tail -5 "$OUT/aoti-cuda.log"
cat "$OUT"/export-parity-*.md 2>/dev/null
exit $rc
