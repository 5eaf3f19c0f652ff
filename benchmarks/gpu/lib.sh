# Shared by the GPU queue entries (q1-speed.sh, q2-train.sh, q3-ort-cuda.sh); source it, do not run it.
#
# What it gives an entry:
#   q_init ENTRY             a deadline (Q_TIME_LIMIT s from now, default 510 = 8.5 min), $OUT, a work folder, status
#   q_setup                  carried wheels (.whl/*.whl) -> $Q_SITE, the project importable as `priorclip` without pip,
#                            the git revision, ftfy checked, env.txt (GPU, driver, versions)
#   q_step NAME MAX_S CMD..  runs CMD under `timeout` (MAX_S, cut to the time left minus Q_RESERVE), logs it, records
#                            ok / failed / timeout in the status and re-packs $OUT, so a later overrun loses nothing
#   q_skip NAME REASON       records a step that was not run, and why
#   q_left                   seconds left before the deadline
#   q_finish                 final status and summary; the entry's exit status (0 when every step ran or was skipped)
#
# What comes back from the device machine is at most 8 files, 2 folders deep: every entry writes exactly three to
# $OUT, rewritten after each step: q<N>-<name>-status.json, q<N>-<name>-summary.md and q<N>-<name>-results.tar.gz
# (every step's result files and logs). `python benchmarks/gpu/collect.py FOLDER` files them under
# benchmarks/results/ on the development machine.
#
# Knobs: Q_TIME_LIMIT (510), Q_RESERVE (15 s kept for the last bundle), Q_WORK (/tmp/<entry>-work), Q_SITE
# (/tmp/site), WHL_DIR (.whl), PYTHON (python3), PRIORCLIP_GIT_REVISION (.git does not travel: pass it in).

Q_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The command as the call gave it (sourced without arguments, this file sees the entry script's own), plus every
# knob that was set, so the status records what ran.
Q_KNOB_NAMES="DATA MODEL CLIP_MODEL DEVICE BATCHES WARMUP ITERS E2E EAGER_ENGINES COMPILED_ENGINES FUSED_ENGINES
  COMPILE_MODE COMPILE_DYNAMIC ENGINES EPOCHS BATCH LR PRECISION PRIOR_EPOCHS PRIOR_BATCH PRIOR_LR PRIOR_WARMUP
  MAX_MIN CLIP_MAX_MIN PRIOR_MAX_MIN VAL_LIMIT WORKERS PARITY_PRECISIONS INT8_MIN_S EXPORT_VARIANTS Q_TIME_LIMIT"
Q_INVOCATION="bash ${0#"$Q_ROOT"/}${*:+ $*}"
for _k in $Q_KNOB_NAMES; do
  [ -n "${!_k+x}" ] && Q_INVOCATION="$_k=${!_k} $Q_INVOCATION"
done

q_die() { echo "Error: $*" >&2; exit 2; }

# Entries 1 and 3 read the carried class-spread test slice: $DATA (default .bench-data/aid-rsicd).
q_need_slice() {
  DATA=${DATA:-.bench-data/aid-rsicd}
  [ -f "$DATA/dataset_rsicd_aid.json" ] \
    || q_die "no staged test slice at $DATA: run 'python benchmarks/gpu/stage.py slice' here and carry .bench-data"
}

q_now() { date +%s; }

q_left() { echo $(( Q_DEADLINE - $(q_now) )); }

q_init() {
  Q_ENTRY=$1
  Q_START=$(q_now)
  Q_DEADLINE=$(( Q_START + ${Q_TIME_LIMIT:-510} ))
  OUT=${OUT:-$Q_ROOT/bench-gpu-out}
  mkdir -p "$OUT" || q_die "cannot create the output folder $OUT"
  OUT=$(cd "$OUT" && pwd)
  Q_WORK=${Q_WORK:-/tmp/$Q_ENTRY-work}
  rm -rf "$Q_WORK" && mkdir -p "$Q_WORK/results" "$Q_WORK/logs" || q_die "cannot create the work folder $Q_WORK"
  Q_STATUS=$Q_WORK/status.json
  Q_FAILED=0
  q_revision
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" init --status "$Q_STATUS" --entry "$Q_ENTRY" \
    --time-limit "${Q_TIME_LIMIT:-510}" --command "$Q_INVOCATION" \
    || q_die "could not write $Q_STATUS (is $PY a Python 3?)"
  q_bundle
}

q_revision() {
  # .git does not travel to the GPU machine: the call passes PRIORCLIP_GIT_REVISION, else the staged folders name it
  if [ -z "${PRIORCLIP_GIT_REVISION:-}" ]; then
    PRIORCLIP_GIT_REVISION=$(git -C "$Q_ROOT" rev-parse HEAD 2>/dev/null || true)
  fi
  if [ -z "${PRIORCLIP_GIT_REVISION:-}" ]; then
    for f in "$Q_ROOT"/.bench-data/STAGED.json "$Q_ROOT"/.dtrain*/parts.json; do
      [ -f "$f" ] || continue
      PRIORCLIP_GIT_REVISION="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("revision","unknown"))' "$f") (as staged)"
      break
    done
  fi
  export PRIORCLIP_GIT_REVISION=${PRIORCLIP_GIT_REVISION:-unknown}
}

q_setup() {
  Q_SITE=${Q_SITE:-/tmp/site}
  local whl=${WHL_DIR:-$Q_ROOT/.whl}
  if compgen -G "$whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$Q_SITE" "$whl"/*.whl \
      >"$Q_WORK/logs/pip-whl.log" 2>&1 || { cat "$Q_WORK/logs/pip-whl.log" >&2; q_die "installing $whl/*.whl failed"; }
  fi
  [ -d "$Q_SITE" ] && export PYTHONPATH=$Q_SITE${PYTHONPATH:+:$PYTHONPATH}
  # The project without pip: the same package layout as pyproject's package-dir mapping (priorclip.export = export/...)
  local src=$Q_WORK/src
  rm -rf "$src" && mkdir -p "$src"
  cp -r "$Q_ROOT/priorclip" "$src/priorclip" || q_die "cannot copy the project into $src"
  for sub in kernels export serve benchmarks; do cp -r "$Q_ROOT/$sub" "$src/priorclip/$sub"; done
  export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}
  q_revision
  "$PY" -c "import ftfy" 2>/dev/null \
    || q_die "the tokenizer needs ftfy, which is not installed: carry its wheel and wcwidth's in .whl/ (benchmarks/gpu/README.md)"
  "$PY" -c "import priorclip, priorclip.serve.engines" 2>"$Q_WORK/logs/import.log" \
    || { cat "$Q_WORK/logs/import.log" >&2; q_die "the project does not import (see above)"; }
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" env --status "$Q_STATUS" --out "$Q_WORK/results/env.txt" \
    || q_die "could not record the environment"
  q_bundle
}

q_bundle() {
  # Three files in $OUT, each replaced atomically (a rename): status, summary and every result so far.
  local stem=$OUT/$Q_ENTRY
  cp "$Q_STATUS" "$stem-status.json.tmp" && mv "$stem-status.json.tmp" "$stem-status.json"
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" summary --status "$Q_STATUS" --results "$Q_WORK/results" \
    --out "$stem-summary.md.tmp" && mv "$stem-summary.md.tmp" "$stem-summary.md"
  cp "$stem-summary.md" "$Q_WORK/summary.md" 2>/dev/null
  tar -czf "$stem-results.tar.gz.tmp" -C "$Q_WORK" status.json summary.md results logs 2>/dev/null \
    && mv "$stem-results.tar.gz.tmp" "$stem-results.tar.gz"
  rm -f "$stem"-*.tmp
  return 0
}

q_record() {  # NAME STATUS RC SECONDS NOTE
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" step --status "$Q_STATUS" --name "$1" --state "$2" --rc "$3" \
    --seconds "$4" --note "$5" --results "$Q_WORK/results"
  q_bundle
}

q_skip() {
  echo "[$Q_ENTRY] step $1 skipped: $2"
  q_record "$1" skipped 0 0 "$2"
}

q_step() {
  local name=$1 max_s=$2
  shift 2
  local left=$(( $(q_left) - ${Q_RESERVE:-15} ))
  local budget=$(( max_s < left ? max_s : left ))
  local need=$(( max_s < ${Q_MIN_STEP_S:-20} ? max_s : ${Q_MIN_STEP_S:-20} ))  # a useful run needs this much
  if [ "$left" -lt "$need" ] || [ "$budget" -lt 1 ]; then
    q_skip "$name" "not enough time left (${left} s before the deadline, minus the reserve)"
    return 0
  fi
  echo "[$Q_ENTRY] step $name: up to ${budget} s ($(q_left) s left): $*"
  local t0 rc
  t0=$(q_now)
  mkdir -p "$Q_WORK/results/$name"
  timeout -k 15 "$budget" "$@" 2>&1 | tee "$Q_WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(q_now) - t0 ))
  if [ "$rc" -eq 0 ]; then
    q_record "$name" ok 0 "$dt" ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    Q_FAILED=1
    q_record "$name" timeout "$rc" "$dt" "stopped at its time limit of ${budget} s; what it wrote before is kept"
  else
    Q_FAILED=1
    q_record "$name" failed "$rc" "$dt" "$(grep -E '^(Error|[A-Za-z]*Error)' "$Q_WORK/logs/$name.log" | tail -1 | cut -c1-300)"
  fi
  return 0
}

q_finish() {
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" finish --status "$Q_STATUS"
  q_bundle
  echo
  cat "$OUT/$Q_ENTRY-summary.md"
  echo
  ls -la "$OUT"
  return "$Q_FAILED"
}
