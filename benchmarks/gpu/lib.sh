# Shared by the GPU queue entries (q1-speed.sh ... q5-pir.sh); source it, do not run it.
#
# What it gives an entry:
#   q_init ENTRY             a deadline (Q_TIME_LIMIT s from now, default 510 = 8.5 min), $OUT, a work folder, status
#                            and the revision ($PRIORCLIP_GIT_REVISION, exported for every step)
#   q_setup                  carried wheels (.whl/*.whl) -> $Q_SITE, the project importable as `priorclip` without pip,
#                            ftfy checked, env.txt (GPU, driver, versions), $Q_DEVTAG (the device as a file-name tag)
#                            and $Q_FUSED (the fused-kernel engines registered for $DEVICE)
#   q_step NAME MAX_S CMD..  runs CMD under `timeout` (MAX_S, cut to the time left minus Q_RESERVE), logs it, records
#                            ok / failed / timeout in the status and re-packs $OUT, so a later overrun loses nothing;
#                            a priorclip-bench step's note names its failed/FAIL engines and, when cut off, the engine
#                            it was on
#   q_skip NAME REASON       records a step that was not run, and why
#   q_left                   seconds left before the deadline
#   q_leaving NEED_S         a time limit for a step that must leave NEED_S (at least Q_MIN_STEP_S) to a later step,
#                            even when it runs to its limit
#   q_finish                 final status and summary; the entry's exit status (0 when every step ran or was skipped)
#   q_train_data ENTRY       the training entries' start (q2-train.sh, q5-pir.sh): q_init ENTRY, then the staged
#                            AID/RSICD parts checked and unpacked (step "data"; or DATA, an unpacked folder), q_setup;
#                            sets DATA, R (results folder) and exports RUNS, DATA_JSON and PYTHON for train_aid.sh
#   q_phase STEP OVER RESERVE CAPVAR
#                            one train_aid.sh phase under a wall-clock cap (minutes, from $CAPVAR) cut to what is left
#                            after OVER s of the phase's own overhead and RESERVE s kept for later steps; skipped with
#                            its reason when under 0.3 min would be left
#
# What comes back from the device machine is at most 8 files, 2 folders deep: every entry writes exactly three to
# $OUT, rewritten after each step: q<N>-<name>-status.json, q<N>-<name>-summary.md and q<N>-<name>-results.tar.gz
# (every step's result files and logs). `python benchmarks/gpu/collect.py FOLDER` files them under
# benchmarks/results/ on the development machine.
#
# Knobs: Q_TIME_LIMIT (510), Q_RESERVE (15 s kept for the last bundle), Q_MIN_STEP_S (20: a step with less left is
# skipped), Q_KILL_S (15: SIGKILL this long after a step's SIGTERM), Q_WORK (/tmp/<entry>-work), Q_SITE (/tmp/site),
# WHL_DIR (.whl), PYTHON (python3), PRIORCLIP_GIT_REVISION (.git does not travel: pass it in; else the revision
# recorded when the data was staged, marked "(as staged)").

Q_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The command as the call gave it (sourced without arguments, this file sees the entry script's own), plus every
# knob that was set, so the status records what ran. The knobs are derived, so none is left out: every variable read
# with a default (the :- and - expansions) in this file, the entry and train_aid.sh (q2 runs it with the same
# environment); OUT is the device tool's and the revision has its own field. Read before the entry assigns anything.
Q_KNOB_NAMES=$(grep -sohE '\$\{[A-Z][A-Z0-9_]*:?-' "${BASH_SOURCE[0]}" "$0" "$Q_ROOT/benchmarks/gpu/train_aid.sh" \
  | sed -E 's/^\$\{([A-Z0-9_]+).*/\1/' | grep -vxE 'OUT|PRIORCLIP_GIT_REVISION' | sort -u)
Q_INVOCATION="bash ${0#"$Q_ROOT"/}${*:+ $*}"
for _k in $Q_KNOB_NAMES; do
  [ -n "${!_k+x}" ] && Q_INVOCATION="$_k=${!_k} $Q_INVOCATION"
done
Q_RESERVE=${Q_RESERVE:-15} Q_MIN_STEP_S=${Q_MIN_STEP_S:-20} Q_KILL_S=${Q_KILL_S:-15}

q_die() { echo "Error: $*" >&2; exit 2; }

q_train_data() {  # ENTRY
  PARTS_DIR=${PARTS_DIR:-/tmp/dparts}
  DATA_ROOT=${DATA_ROOT:-/tmp/data}
  MANIFEST=${MANIFEST-$(ls -d .dtrain*/parts.json 2>/dev/null | head -1)}
  if [ -z "${DATA:-}" ] && [ -z "$MANIFEST" ]; then
    q_die "no .dtrain*/parts.json here: carry the last part folder with this call (python benchmarks/gpu/stage.py train)"
  fi
  q_init "$1"
  if [ -z "${DATA:-}" ]; then
    q_step data 120 "$PY" benchmarks/gpu/stage.py unpack --manifest "$MANIFEST" --parts "$PARTS_DIR" --dst "$DATA_ROOT"
    DATA=$DATA_ROOT/aid-rsicd
  fi
  if [ ! -f "$DATA/dataset_rsicd_aid.json" ]; then
    q_finish
    q_die "no dataset at $DATA (see the data step above)"
  fi
  q_setup
  R=$Q_WORK/results
  export RUNS=$Q_WORK/runs DATA_JSON=dataset_rsicd_aid.json PYTHON="$PY"
}

q_phase() {  # STEP OVERHEAD_S RESERVE_S CAPVAR
  local step=$1 over=$2 reserve=$3 var=$4 cap
  cap=$(awk -v l="$(q_left)" -v m="${!var}" -v o="$over" -v r="$(( reserve + Q_RESERVE ))" \
    'BEGIN { c = (l - o - r) / 60; if (c > m) c = m; if (c >= 0.3) printf "%.2f", c }')
  if [ -z "$cap" ]; then
    q_skip "$step" "not enough time left for a useful $step run ($(q_left) s left, $reserve s reserved for later steps)"
    return
  fi
  q_step "$step" "$(awk -v c="$cap" -v o="$over" 'BEGIN { printf "%d", c * 60 + o + 60 }')" \
    env "$var=$cap" OUT="$R" bash benchmarks/gpu/train_aid.sh "$step" "$DATA"
}

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
  # init records the revision (qstatus.py: the one place that works it out) and prints it: every step's reports
  # read it from the environment, as .git does not travel
  PRIORCLIP_GIT_REVISION=$("$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" init --status "$Q_STATUS" --entry "$Q_ENTRY" \
    --time-limit "${Q_TIME_LIMIT:-510}" --command "$Q_INVOCATION") \
    || q_die "could not write $Q_STATUS (is $PY a Python 3?)"
  export PRIORCLIP_GIT_REVISION
  q_bundle
}

q_setup() {
  Q_SITE=${Q_SITE:-/tmp/site}
  local whl=${WHL_DIR:-$Q_ROOT/.whl}
  if compgen -G "$whl/*.whl" >/dev/null; then
    "$PY" "$Q_ROOT/benchmarks/gpu/wheels.py" --site "$Q_SITE" "$whl"/*.whl \
      >"$Q_WORK/logs/pip-whl.log" 2>&1 || { cat "$Q_WORK/logs/pip-whl.log" >&2; q_die "installing $whl/*.whl failed"; }
  fi
  [ -d "$Q_SITE" ] && export PYTHONPATH=$Q_SITE${PYTHONPATH:+:$PYTHONPATH}
  # The project without pip: the same package layout as pyproject's package-dir mapping (priorclip.export = export/...)
  local src=$Q_WORK/src
  rm -rf "$src" && mkdir -p "$src"
  cp -r "$Q_ROOT/priorclip" "$src/priorclip" || q_die "cannot copy the project into $src"
  for sub in kernels export serve benchmarks; do cp -r "$Q_ROOT/$sub" "$src/priorclip/$sub"; done
  export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}
  # `python -m`/`-c` put the working directory (the checkout) first on sys.path, and its own priorclip/ lacks the
  # subpackages above: it would shadow the copy (here an editable install hides that; the GPU image has none).
  # Python >= 3.11 then leaves sys.path[0] out, for every later step too.
  export PYTHONSAFEPATH=1
  "$PY" -c "import ftfy" 2>/dev/null \
    || q_die "the tokenizer needs ftfy, which is not installed: carry its wheel and wcwidth's in .whl/ (benchmarks/gpu/README.md)"
  "$PY" -c "import priorclip, priorclip.serve.engines" 2>"$Q_WORK/logs/import.log" \
    || { cat "$Q_WORK/logs/import.log" >&2; q_die "the project does not import (see above)"; }
  # the process that imports torch for env.txt also names the device tag and the fused engines: no second one
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" env --status "$Q_STATUS" --out "$Q_WORK/results/env.txt" \
    --device "${DEVICE:-auto}" --shell "$Q_WORK/env.sh" && . "$Q_WORK/env.sh" \
    || q_die "could not record the environment"
  q_bundle
}

q_bundle() {
  # Three files in $OUT, each replaced atomically (a rename): status, summary and every result so far.
  local stem=$OUT/$Q_ENTRY
  cp "$Q_STATUS" "$stem-status.json.tmp" && mv "$stem-status.json.tmp" "$stem-status.json"
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" summary --status "$Q_STATUS" --results "$Q_WORK/results" \
    --out "$stem-summary.md.tmp" --brief-out "$Q_WORK/brief.md" && mv "$stem-summary.md.tmp" "$stem-summary.md"
  cp "$stem-summary.md" "$Q_WORK/summary.md" 2>/dev/null
  # q2's training runs write metrics.jsonl as they go; train_aid.sh copies it to results/ only when the trainer
  # returns, so a phase cut off by its time limit would lose its curves without these (a few kB each)
  local runs=()
  mapfile -t runs < <(cd "$Q_WORK" && compgen -G 'runs/*/metrics.jsonl')
  tar -czf "$stem-results.tar.gz.tmp" -C "$Q_WORK" status.json summary.md results logs "${runs[@]}" 2>/dev/null \
    && mv "$stem-results.tar.gz.tmp" "$stem-results.tar.gz"
  rm -f "$stem"-*.tmp
  return 0
}

q_record() {  # NAME STATUS RC SECONDS NOTE
  # qstatus adds to the note what the step's log and reports say (a bench exits 0 with failed engines)
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" step --status "$Q_STATUS" --name "$1" --state "$2" --rc "$3" \
    --seconds "$4" --note "$5" --results "$Q_WORK/results" --log "$Q_WORK/logs/$1.log"
  q_bundle
}

q_skip() {
  echo "[$Q_ENTRY] step $1 skipped: $2"
  q_record "$1" skipped 0 0 "$2"
}

q_leaving() {  # NEED_S
  # A step that runs to this limit is sent SIGTERM, SIGKILL Q_KILL_S later, then recorded (~5 s): the next step still
  # finds NEED_S (and at least the Q_MIN_STEP_S it needs to run at all) after Q_RESERVE.
  local need=$(( $1 > Q_MIN_STEP_S ? $1 : Q_MIN_STEP_S ))
  echo $(( $(q_left) - Q_RESERVE - need - Q_KILL_S - 5 ))
}

q_step() {
  local name=$1 max_s=$2
  shift 2
  local left=$(( $(q_left) - Q_RESERVE ))
  local budget=$(( max_s < left ? max_s : left ))
  local need=$(( max_s < Q_MIN_STEP_S ? max_s : Q_MIN_STEP_S ))  # a useful run needs this much
  if [ "$left" -lt "$need" ] || [ "$budget" -lt 1 ]; then
    q_skip "$name" "not enough time left (${left} s before the deadline, minus the reserve)"
    return 0
  fi
  echo "[$Q_ENTRY] step $name: up to ${budget} s ($(q_left) s left): $*"
  local t0 rc
  t0=$(q_now)
  mkdir -p "$Q_WORK/results/$name"
  timeout -k "$Q_KILL_S" "$budget" "$@" 2>&1 | tee "$Q_WORK/logs/$name.log"
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

# ONNX Runtime's CUDA provider links against cuBLAS/cuDNN/cuFFT/cuRAND 13: the GPU image has them as nvidia-* packages
# (for torch); put their lib folders on LD_LIBRARY_PATH (after q_setup, which sets $PY).
q_cuda_libs() {
  local nv
  nv=$("$PY" - <<'PY' 2>/dev/null
import os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = set()
for root in nvidia.__path__:
    for d, sub, files in os.walk(root):
        if d.count(os.sep) - root.count(os.sep) > 3:
            sub[:] = []
        elif os.path.basename(d) == "lib" and any(".so" in f for f in files):
            dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
  if [ -n "$nv" ]; then export LD_LIBRARY_PATH=$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
}

q_finish() {
  "$PY" "$Q_ROOT/benchmarks/gpu/qstatus.py" finish --status "$Q_STATUS"
  q_bundle
  echo
  ls -la "$OUT"
  echo
  # last, and short enough for the call's 12,000-character output tail: the step table and each report's key table
  # (the whole heads are in the summary file that comes back)
  cat "$Q_WORK/brief.md"
  return "$Q_FAILED"
}
