#!/usr/bin/env bash
# GPU queue entry 7 — priorclip-serve under load (issue 17): the HTTP service against the offline numbers of the same
# engine, on the fused engine and on ONNX Runtime's CUDA provider, fp16. Wheel-part calls, then ONE call < 9 min.
#
#   the calls: `python benchmarks/gpu/calls.py 7` prints them: entry 3's onnxruntime-gpu part calls (each copies its
#   part to /tmp/chunks), then this script carrying the last part folder, .bench-data and .whl, revision filled in
#
# Before the calls, here: the slice (`python benchmarks/gpu/stage.py slice`), the onnxruntime-gpu parts
# (`../shared/tools/wheel-chunks onnxruntime-gpu==1.31.1`), the ftfy/wcwidth wheels in .whl/, and in .whl/serve/ the
# service's wheels (fastapi and what it needs that the GPU image lacks) and the load tool hey, gzip'd, with its version
# (benchmarks/gpu/README.md, "Before a GPU session"). Steps; each writes its results before the next starts, under a
# time limit cut to what is left of Q_TIME_LIMIT (510 s):
#   serve-wheels  the service's wheels (.whl/serve/*.whl) into /tmp/site; hey unpacked from .whl/serve/hey.gz
#   ort-wheel     onnxruntime-gpu put back together from /tmp/chunks + the carried last part, into /tmp/site
#   serve-<backend>-<precision>, one per engine of Q7_ENGINES (fused:fp16, then onnxruntime:fp16)
#                 python -m priorclip.benchmarks.serve_load on the carried slice's median image and caption: offline
#                 batch-1 latency and throughput at --max-batch (64) of the engine, then priorclip-serve with the cache
#                 off, loaded by hey at concurrency 1,4,16,64,256 per kind (one image or one caption per request),
#                 plus one cached run per kind; verdicts against the issue's targets (a FAIL is named in the step's
#                 note). The report is rewritten after every run, so a time limit loses only the run it cut.
#                 Each engine's limit leaves the engines after it an equal share of the time left.
#   preflight     before the first ONNX Runtime engine: does it run on the CUDA provider (as entry 3)? If not, the
#                 ONNX Runtime engines are skipped with the reason.
# Output ($OUT, 3 files): q7-serve-status.json, q7-serve-summary.md, q7-serve-results.tar.gz.
# Knobs: DATA (.bench-data/aid-rsicd), MODEL (priorclip-vit-b32), DEVICE (cuda), Q7_ENGINES, LEVELS (concurrency
# levels), SL_ARGS (more serve_load options, e.g. the CPU test's --quick), SERVE_WHL (.whl/serve), HEY (a hey binary
# instead of the carried one), NAMES and CHUNKS_DIR (as entry 3), SERVE_MAX_S (one engine's cap, 300), and lib.sh's
# (Q_TIME_LIMIT, ...); the CPU test dry-runs this with the tiny config.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
. benchmarks/gpu/lib.sh

q_need_slice
DEVICE=${DEVICE:-cuda}
SERVE_WHL=${SERVE_WHL:-.whl/serve}
NAMES=${NAMES-$(ls -d .chunk*/names.txt 2>/dev/null | head -1)}
[ -n "${HEY:-}" ] || [ -f "$SERVE_WHL/hey.gz" ] \
  || q_die "no load tool: stage hey in $SERVE_WHL/hey.gz (gzip -9 -c /usr/bin/hey; see benchmarks/gpu/README.md)"
q_init q7-serve
Q_SITE=${Q_SITE:-/tmp/site}
R=$Q_WORK/results

# The service's wheels go in before q_setup, which puts Q_SITE on PYTHONPATH once it exists
BIN=$Q_WORK/bin
mkdir -p "$BIN" "$Q_SITE"
if [ -z "${HEY:-}" ]; then
  gunzip -c "$SERVE_WHL/hey.gz" >"$BIN/hey" && chmod +x "$BIN/hey" || q_die "cannot unpack $SERVE_WHL/hey.gz"
  [ -f "$SERVE_WHL/hey.version" ] && cp "$SERVE_WHL/hey.version" "$BIN/hey.version"
  HEY=$BIN/hey
fi
if compgen -G "$SERVE_WHL/*.whl" >/dev/null; then
  q_step serve-wheels 60 "$PY" benchmarks/gpu/wheels.py --site "$Q_SITE" "$SERVE_WHL"/*.whl
else
  q_skip serve-wheels "no wheels in $SERVE_WHL: the service's packages as installed (checked below)"
fi
if [ -n "$NAMES" ]; then
  q_step ort-wheel 150 "$PY" benchmarks/gpu/wheels.py --names "$NAMES" --parts "${CHUNKS_DIR:-/tmp/chunks}" \
    --site "$Q_SITE" --work "$Q_WORK/wheels"
else
  q_skip ort-wheel "no .chunk*/names.txt carried: ONNX Runtime as installed (the preflight checks its CUDA provider)"
fi
q_setup
"$PY" -c "import fastapi, uvicorn, multipart, prometheus_client" 2>"$Q_WORK/logs/serve-import.log" || {
  cat "$Q_WORK/logs/serve-import.log" >&2
  q_finish
  q_die "the service's packages do not import: stage them in $SERVE_WHL (benchmarks/gpu/README.md)"
}
q_cuda_libs  # the CUDA provider's libraries (lib.sh)

IFS=, read -r -a ENGINES <<<"${Q7_ENGINES:-fused:fp16,onnxruntime:fp16}"
ORT_OK=
for i in "${!ENGINES[@]}"; do
  backend=${ENGINES[$i]%%:*} precision=${ENGINES[$i]#*:}
  [ "$precision" = "${ENGINES[$i]}" ] && precision=fp32
  step=serve-$backend-$precision
  if [ "$backend" = onnxruntime ] && [ -z "$ORT_OK" ]; then
    q_step preflight 90 "$PY" benchmarks/gpu/ort_preflight.py --device "$DEVICE" --out "$R/preflight"
    ORT_OK=no
    grep -q '"ok": true' "$R/preflight/preflight.json" 2>/dev/null && ORT_OK=yes
  fi
  if [ "$backend" = onnxruntime ] && [ "$ORT_OK" = no ]; then
    q_skip "$step" "the preflight failed: ONNX Runtime does not run on the $DEVICE provider (see preflight.json)"
    continue
  fi
  # an equal share of what is left for this engine and each after it (SIGKILL grace and recording included)
  share=$(( ($(q_left) - Q_RESERVE) / (${#ENGINES[@]} - i) - Q_KILL_S - 5 ))
  # shellcheck disable=SC2086  # SL_ARGS is a list of options
  q_step "$step" "$(( share < ${SERVE_MAX_S:-300} ? share : ${SERVE_MAX_S:-300} ))" \
    "$PY" -m priorclip.benchmarks.serve_load --model "${MODEL:-priorclip-vit-b32}" --backend "$backend" \
    --precision "$precision" --device "$DEVICE" --dataset "$DATA" --concurrency "${LEVELS:-1,4,16,64,256}" \
    --hey "$HEY" --out "$R/$step" ${SL_ARGS:-} --note "queue entry 7 (benchmarks/gpu/q7-serve.sh): priorclip-serve \
under hey beside the same engine offline; random-init weights (speed does not depend on them)"
done
q_finish
