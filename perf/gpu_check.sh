#!/usr/bin/env bash
# One prepared GPU check (at most ~9 minutes with the default limits): install, CUDA tests, benchmarks.
#
#   bash perf/gpu_check.sh                              # on the GPU machine, from anywhere
#   bash perf/gpu_check.sh --quick                      # the quick check (at most ~7 minutes)
#   COMPRESS_OPS_GIT_SHA=<sha> bash perf/gpu_check.sh   # name the commit when .git is absent
#   GPU_CHECK_DRY=1 bash perf/gpu_check.sh [--quick]    # CPU rehearsal: tests/perf + --quick bench
#                                                       # (--quick: the quick check, tiny shapes)
#
# Steps (each under `timeout`; a failing step is recorded and the next one still runs):
#   1. pip install -e . (no index, no deps, no build isolation: the image brings torch/triton)
#   2. nvidia-smi and the versions torch/triton see
#   3. pytest on CUDA (TRITON_INTERPRET unset, HYPOTHESIS_PROFILE=gpu)
#   4. python -m compress_ops.perf.bench -> perf/results/<date>-<gpu>.json (rewritten after
#      every row, so a timeout still leaves the rows measured so far)
#   5. a summary; with $OUT set, logs go to $OUT/gpu_check/ and the results file is written to
#      $OUT/results/ (the device tool returns what is under $OUT), then copied to perf/results/;
#      at the end the logs fold into $OUT/gpu_check_logs.tar.gz (+ gpu_check_summary.txt): the
#      tool returns at most 8 files, and the first GPU run lost its results JSON to that limit.
#
# --quick replaces steps 3-4 with python -m compress_ops.perf.quick_check, one process per step,
# all filling one <date>-quick-<gpu>.json: in $OUT/results/ when $OUT is set (not copied into
# perf/results/), else in perf/results/; a dry run writes it under the logs folder instead:
#   3q. smoke: every family against its float64 reference (W8A8: its exact reference, the
#       quantized activation's product), fp16 + bf16, a ragged shape each
#   4q. headline: M in {1, 16, 2048}, N = K = 8192, fp16: ours / F.linear / torch's native
#       kernel, each checked then timed eagerly and as a CUDA-graph replay (no autotune; W8A8
#       int8 and FP8 also against the int8 weight-only row); then
#       the fused dw+pw conv on two MobileNetV2 pairs (batch 32) against the cuDNN pair
#   5q. table: the static model's predictions (perf/results/static-triton<ver>.json) against
#       the measured rows, then a compact table of everything
#   6q. e2e: python -m compress_ops.perf.bench_e2e -> <date>-<gpu>-e2e.json next to the quick
#       file: a random-weight Llama decoder, batch-1 greedy decode tokens/s, dense fp16 vs
#       int4 g128 / int8 / 2:4 / low rank / 4-bit codebook, eager and torch.compile
#       reduce-overhead; MobileNetV2 images/s (batch 32) fused vs unfused, eager and compiled.
#       Size 1b (Llama-3.2-1B's shape) when the quick budget left (GPU_CHECK_QUICK_BUDGET, 480 s,
#       minus the time spent so far) covers the step's limit and that limit is at least
#       GPU_CHECK_E2E_1B_MIN (80 s), else small (4 layers of 1024); GPU_CHECK_E2E_SIZE forces
#       one. The choice and its reason are stored in the file (meta.e2e.size, size_reason). The
#       step stops starting rows 20 s before its limit (the rest: "skipped" rows) and rewrites
#       the file after every row. Without transformers in the image the Llama part is one
#       skipped row ("transformers missing") and MobileNetV2 still runs. A dry run: tiny, eager
#       only, the ops' CPU routes (not the interpreter).
#
# Time limits (seconds), overridable: GPU_CHECK_INSTALL_TIMEOUT (60), GPU_CHECK_TEST_TIMEOUT
# (270), GPU_CHECK_BENCH_TIMEOUT (210); --quick: GPU_CHECK_SMOKE_TIMEOUT (90),
# GPU_CHECK_HEADLINE_TIMEOUT (180), GPU_CHECK_TABLE_TIMEOUT (20), GPU_CHECK_SMOKE_WORKERS (8),
# GPU_CHECK_E2E_TIMEOUT (90; 0 skips the e2e step).
# GPU_CHECK_FAMILIES (comma-separated) limits the benchmark to those families.
# Exit status: 0 when every step passed, else 1 (2: a bad argument).
set -u
set -o pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (known: --quick, --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DRY=${GPU_CHECK_DRY:-0}
T_INSTALL=${GPU_CHECK_INSTALL_TIMEOUT:-60}
T_TEST=${GPU_CHECK_TEST_TIMEOUT:-270}
T_BENCH=${GPU_CHECK_BENCH_TIMEOUT:-210}
T_SMOKE=${GPU_CHECK_SMOKE_TIMEOUT:-90}
T_HEADLINE=${GPU_CHECK_HEADLINE_TIMEOUT:-180}
T_TABLE=${GPU_CHECK_TABLE_TIMEOUT:-20}
T_E2E=${GPU_CHECK_E2E_TIMEOUT:-90}
QUICK_BUDGET=${GPU_CHECK_QUICK_BUDGET:-480}
E2E_1B_MIN=${GPU_CHECK_E2E_1B_MIN:-80}

if [ "$DRY" = "1" ] && [ -x "$REPO/.venv/bin/python" ]; then
    PY=${PYTHON:-$REPO/.venv/bin/python}
else
    PY=${PYTHON:-python3}
fi

if [ -n "${OUT:-}" ]; then
    LOG_DIR="$OUT/gpu_check"
else
    LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
fi
mkdir -p "$LOG_DIR"

START=$(date +%s)
SUMMARY=()
note() { SUMMARY+=("$1"); echo "== $1"; }
elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "=================== $1 (t=$(elapsed)s) ==================="; }

unset TRITON_INTERPRET
unset COMPRESS_OPS_CPU_BACKEND
export PYTHONUNBUFFERED=1
if [ -z "${COMPRESS_OPS_GIT_SHA:-}" ]; then
    if SHA=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null); then
        [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] \
            && SHA="$SHA+dirty"
        export COMPRESS_OPS_GIT_SHA="$SHA"
    fi
fi
echo "gpu_check: repo=$REPO python=$PY dry=$DRY quick=$QUICK logs=$LOG_DIR sha=${COMPRESS_OPS_GIT_SHA:-unknown}"

# 1. install --------------------------------------------------------------------------------
section "install"
if [ "$DRY" = "1" ]; then
    note "install: skipped (dry run uses the existing environment)"
    RC_INSTALL=0
else
    timeout -k 10 "$T_INSTALL" "$PY" -m pip install --disable-pip-version-check -q \
        --no-index --no-deps --no-build-isolation -e . 2>&1 | tee "$LOG_DIR/install.log"
    RC_INSTALL=$?
    if [ $RC_INSTALL -ne 0 ]; then
        echo "editable install failed (rc=$RC_INSTALL); trying a regular install"
        timeout -k 10 "$T_INSTALL" "$PY" -m pip install --disable-pip-version-check -q \
            --no-index --no-deps --no-build-isolation . 2>&1 | tee -a "$LOG_DIR/install.log"
        RC_INSTALL=$?
    fi
    note "install: rc=$RC_INSTALL"
fi

# 2. machine ----------------------------------------------------------------------------------
section "machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee "$LOG_DIR/nvidia-smi.log"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv 2>&1 | tee -a "$LOG_DIR/nvidia-smi.log"
else
    echo "nvidia-smi not found" | tee "$LOG_DIR/nvidia-smi.log"
fi
"$PY" - <<'EOF' 2>&1 | tee "$LOG_DIR/versions.log"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
try:
    import compress_ops, compress_ops.kernels.sparse24, compress_ops.kernels.dequant  # noqa: F401
    print("compress_ops imports from", compress_ops.__file__)
except Exception as e:
    print("compress_ops import FAILED:", type(e).__name__, e)
EOF
if [ "$DRY" = "1" ]; then
    DEVICE=cpu
else
    DEVICE=cuda
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        note "machine: WARNING torch sees no CUDA device"
    fi
fi

timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ] || [ "$1" -eq 130 ]; }

print_summary() {
    section "summary"
    {
        echo "gpu_check finished in $(elapsed)s (dry=$DRY, quick=$QUICK, sha=${COMPRESS_OPS_GIT_SHA:-unknown})"
        for line in "${SUMMARY[@]}"; do echo "  $line"; done
        echo "logs: $LOG_DIR"
    } | tee "$LOG_DIR/summary.txt"
}

# The device tool returns at most 8 files from $OUT: fold the logs into one archive there (the
# summary stays readable beside it), so the results JSON is never the file left out.
bundle_logs() {
    [ -n "${OUT:-}" ] && [ -d "$LOG_DIR" ] || return 0
    cp "$LOG_DIR/summary.txt" "$OUT/gpu_check_summary.txt" 2>/dev/null
    tar czf "$OUT/gpu_check_logs.tar.gz" -C "$(dirname "$LOG_DIR")" "$(basename "$LOG_DIR")" \
        && rm -rf "$LOG_DIR" && echo "logs: $OUT/gpu_check_logs.tar.gz"
}

# --quick: smoke, headline, table (python -m compress_ops.perf.quick_check), then exit ---------
if [ "$QUICK" = "1" ]; then
    unset COMPRESS_OPS_AUTOTUNE
    QARGS=(--device "$DEVICE")
    QENV=(env)
    if [ "$DRY" = "1" ]; then
        # the rehearsal: tiny shapes, the Triton kernels under the interpreter, one process
        QARGS+=(--small)
        QENV=(env TRITON_INTERPRET=1 COMPRESS_OPS_CPU_BACKEND=triton)
        QDIR="$LOG_DIR/results"
    elif [ -n "${OUT:-}" ]; then
        QDIR="$OUT/results"
    else
        QDIR="$REPO/perf/results"
    fi
    QRESULT=$(timeout -k 5 60 "${QENV[@]}" "$PY" -m compress_ops.perf.quick_check \
        "${QARGS[@]}" --out-dir "$QDIR" --print-path 2>"$LOG_DIR/quick-path.log" | tail -n 1)
    [ -z "$QRESULT" ] && QRESULT="$QDIR/$(date +%F)-quick-unknown.json"
    echo "quick results: $QRESULT"
    RC_QUICK=0
    # one process per step, each under its own limit; every step after the first resumes the file
    RESUME=()
    for STEP in smoke headline table; do
        case "$STEP" in
            smoke) LIMIT=$T_SMOKE; EXTRA=(--workers "${GPU_CHECK_SMOKE_WORKERS:-8}") ;;
            headline) LIMIT=$T_HEADLINE; EXTRA=() ;;
            table) LIMIT=$T_TABLE; EXTRA=() ;;
        esac
        [ "$DRY" = "1" ] && [ "$STEP" = "smoke" ] && EXTRA=(--workers 1)
        section "quick: $STEP (limit ${LIMIT}s)"
        # SIGINT first: the step records 'interrupted' and the file keeps what was measured
        timeout -s INT -k 10 "$LIMIT" "${QENV[@]}" "$PY" -m compress_ops.perf.quick_check \
            "${QARGS[@]}" --steps "$STEP" --out "$QRESULT" "${RESUME[@]}" "${EXTRA[@]}" 2>&1 \
            | tee "$LOG_DIR/quick-$STEP.log"
        RC=$?
        RESUME=(--resume)
        LAST=$(grep -E "^== $STEP:" "$LOG_DIR/quick-$STEP.log" | tail -n 1 | sed 's/^== //')
        if timed_out $RC; then
            note "quick $STEP: TIMED OUT after ${LIMIT}s (rc=$RC); ${LAST:-no summary line}"
        else
            note "quick $STEP: rc=$RC ${LAST:-}"
        fi
        [ $RC -ne 0 ] && RC_QUICK=1
    done
    # 6q. e2e: its own process and limit; the size by the time left of the quick budget
    if [ "$T_E2E" -gt 0 ]; then
        LEFT=$(( QUICK_BUDGET - $(elapsed) ))
        if [ -n "${GPU_CHECK_E2E_SIZE:-}" ]; then
            E2E_SIZE=$GPU_CHECK_E2E_SIZE; E2E_WHY="GPU_CHECK_E2E_SIZE=$GPU_CHECK_E2E_SIZE"
        elif [ "$DRY" = "1" ]; then
            E2E_SIZE=tiny; E2E_WHY="dry run (CPU rehearsal)"
        elif [ "$LEFT" -ge "$T_E2E" ] && [ "$T_E2E" -ge "$E2E_1B_MIN" ]; then
            E2E_SIZE=1b
            E2E_WHY="gpu_check --quick: ${LEFT}s left of the ${QUICK_BUDGET}s budget >= the ${T_E2E}s e2e limit (>= ${E2E_1B_MIN}s)"
        else
            E2E_SIZE=small
            E2E_WHY="gpu_check --quick: ${LEFT}s left of the ${QUICK_BUDGET}s budget, e2e limit ${T_E2E}s (1b needs both >= the limit and the limit >= ${E2E_1B_MIN}s)"
        fi
        SLUG=$(basename "$QRESULT" .json | sed 's/^.*-quick-//')
        E2E_OUT="$QDIR/$(date +%F)-${SLUG}-e2e.json"
        E2E_BUDGET=$(( T_E2E - 20 ))
        [ "$E2E_BUDGET" -lt 10 ] && E2E_BUDGET=10
        E2E_ARGS=(--device "$DEVICE" --size "$E2E_SIZE" --size-reason "$E2E_WHY"
                  --out "$E2E_OUT" --budget-s "$E2E_BUDGET")
        # the rehearsal: eager only, tiny counts, one thread, the ops' CPU routes (the interpreter would
        # take minutes over a whole model)
        [ "$DRY" = "1" ] && E2E_ARGS+=(--no-compile --decode-tokens 8 --reps 3 --no-peaks --threads 1)
        section "quick: e2e, size $E2E_SIZE (limit ${T_E2E}s)"
        echo "e2e size: $E2E_SIZE ($E2E_WHY)"
        # SIGINT first: the benchmark records 'interrupted' and the file keeps its rows
        timeout -s INT -k 10 "$T_E2E" "$PY" -m compress_ops.perf.bench_e2e "${E2E_ARGS[@]}" \
            2>&1 | tee "$LOG_DIR/quick-e2e.log"
        RC=$?
        E2E_ROWS=$("$PY" - "$E2E_OUT" <<'EOF' 2>&1
import sys
from compress_ops.perf import schema
obj, problems = schema.load_results(sys.argv[1])
if obj is None:
    print("no e2e file:", "; ".join(problems))
else:
    st = [r.get("e2e", {}).get("status") for r in obj["rows"]]
    e2e = obj["meta"].get("e2e", {})
    print(f"{len(st)} rows ({st.count('ok')} ok, {st.count('error')} error, "
          f"{st.count('skipped')} skipped), size {e2e.get('size')}, {e2e.get('transformers')}, "
          f"complete={obj['meta'].get('complete')}, {len(problems)} schema problems")
EOF
)
        if timed_out $RC; then
            note "quick e2e: TIMED OUT after ${T_E2E}s (rc=$RC); $E2E_ROWS -> $E2E_OUT"
        else
            note "quick e2e: rc=$RC; $E2E_ROWS -> $E2E_OUT"
        fi
        [ $RC -ne 0 ] && RC_QUICK=1
    else
        note "quick e2e: skipped (GPU_CHECK_E2E_TIMEOUT=0)"
    fi
    if [ -f "$QRESULT" ]; then
        note "quick results -> $QRESULT"
    else
        note "quick results: no file at $QRESULT"
        RC_QUICK=1
    fi
    print_summary
    bundle_logs
    [ $RC_INSTALL -eq 0 ] && [ $RC_QUICK -eq 0 ]
    exit $?
fi

# 3. tests -------------------------------------------------------------------------------------
section "tests"
if [ "$DRY" = "1" ]; then
    TEST_PATHS=(tests/perf)
else
    TEST_PATHS=(tests/kernels tests/compress_ops tests/perf)  # kernels first: -x and a time limit
fi
# Triton JIT-compiles every kernel specialization the tests draw: spread the test files over
# worker processes when pytest-xdist is there (the GPU image has it), one file per worker.
XDIST=()
if [ "$DRY" != "1" ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${GPU_CHECK_TEST_WORKERS:-6}" --dist loadfile)
fi
# SIGINT first: pytest then still prints what failed before the limit.
HYPOTHESIS_PROFILE=gpu timeout -s INT -k 20 "$T_TEST" "$PY" -m pytest -x -q -p no:cacheprovider \
    "${XDIST[@]}" "${TEST_PATHS[@]}" 2>&1 | tee "$LOG_DIR/pytest.log"
RC_TEST=$?
TEST_LINE=$(grep -E "(passed|failed|error|no tests ran)" "$LOG_DIR/pytest.log" | tail -n 1)
if [ $RC_TEST -eq 124 ] || [ $RC_TEST -eq 137 ] || [ $RC_TEST -eq 130 ]; then
    note "tests: TIMED OUT after ${T_TEST}s (rc=$RC_TEST); last: ${TEST_LINE:-none}"
else
    note "tests: rc=$RC_TEST ${TEST_LINE:-}"
fi

# 4. benchmarks -------------------------------------------------------------------------------
section "benchmarks"
BENCH_ARGS=(--device "$DEVICE")
[ "$DRY" = "1" ] && BENCH_ARGS+=(--quick)
# GPU_CHECK_FAMILIES=lowrank,dwsep_conv: only those benchmark families (a short device budget)
[ -n "${GPU_CHECK_FAMILIES:-}" ] && BENCH_ARGS+=(--families "$GPU_CHECK_FAMILIES")
RESULT=$("$PY" - "$DEVICE" "$REPO/perf/results" <<'EOF'
import sys
import torch
from compress_ops.perf import machine, schema
# this checkout's perf/results/ (named: a regular install would default to ./perf-results/)
print(schema.results_path(machine.device_name(torch.device(sys.argv[1])),
                          results_dir=sys.argv[2]))
EOF
)
if [ -z "$RESULT" ]; then
    RESULT="perf/results/$(date +%F)-unknown.json"
fi
# Write straight under $OUT when set (it comes back even if this script is cut short), else
# into perf/results/. A rehearsal (dry run) never writes into the committed results.
FINAL="$RESULT"
if [ -n "${OUT:-}" ]; then
    RESULT="$OUT/results/$(basename "$FINAL")"
elif [ "$DRY" = "1" ]; then
    RESULT="$LOG_DIR/results/$(basename "$FINAL")"
fi
timeout -s INT -k 20 "$T_BENCH" "$PY" -m compress_ops.perf.bench "${BENCH_ARGS[@]}" \
    --out "$RESULT" 2>&1 \
    | tee "$LOG_DIR/bench.log"
RC_BENCH=$?
ROWS=$("$PY" - "$RESULT" <<'EOF' 2>&1
import sys
from compress_ops.perf import schema
obj, problems = schema.load_results(sys.argv[1])
if obj is None:
    print("no results file:", "; ".join(problems))
else:
    rows = obj.get("rows", [])
    timed = sum(1 for r in rows if r.get("median_us"))
    print(f"{len(rows)} rows ({timed} timed), complete={obj['meta'].get('complete')}, "
          f"{len(problems)} schema problems, errors={obj['meta'].get('errors')}")
EOF
)
if [ $RC_BENCH -eq 124 ] || [ $RC_BENCH -eq 137 ] || [ $RC_BENCH -eq 130 ]; then
    note "bench: TIMED OUT after ${T_BENCH}s (rc=$RC_BENCH); $ROWS -> $RESULT"
else
    note "bench: rc=$RC_BENCH; $ROWS -> $RESULT"
fi
if [ "$DRY" != "1" ] && [ "$RESULT" != "$FINAL" ] && [ -f "$RESULT" ]; then
    mkdir -p "$(dirname "$FINAL")"
    cp "$RESULT" "$FINAL" && note "copied to $FINAL"
fi

# 5. summary ----------------------------------------------------------------------------------
print_summary
bundle_logs

[ $RC_INSTALL -eq 0 ] && [ $RC_TEST -eq 0 ] && [ $RC_BENCH -eq 0 ]
