#!/usr/bin/env bash
# The GPU checks still pending, as two calls on a lent GPU machine (15 minutes of device time a
# session, starts included), each a list of steps in order of priority:
#   call 1: bandwidth timings with the layout sweep, after a dirty and a clean L2 flush, the
#           register-cap switches A/B, short-row timings with the sweep, a profile of the weak
#           cells, then the row-loop and tactic variants' GPU tests;
#   call 2: the split-row variants' GPU tests (clusters of blocks), decode timings of the table's,
#           the tactic and the split-row layouts, the PARAMS_EARLY decode A/B, the split-row
#           exchange A/B (cluster barrier or mbarrier), then the rest of the GPU suite.
# Two calls, not one: a machine that stops answering returns nothing of its call (it happened to the
# single call on 2026-12-05, which brought back no file), so the first call's results are safe
# before the second launches the one kind of kernel no GPU has run yet (clusters). Issue the
# second as soon as the first returns: the machine stays warm for 30 s, and a new start costs
# minutes. Each step has its own time limit (the last takes what is left of BUDGET), so a call ends
# with whatever finished; a step that runs out is said in the log and the next starts.
#
# Here, first, so that the GPU machine compiles nothing (1136 modules took 5 to 12 minutes on 2 cores, the static builds 1.5 more;
# about 120 MB of PTX make a 6 MB archive):
#   NORMFUSE_CACHE_DIR=.carry/ptx python -c "import plugins.build as b; b.prebuild('sm_90')"
#   NORMFUSE_CACHE_DIR=.carry/ptx python bench/kernels.py --static sm_90 --hidden 4096 8192 16384 \
#       --sources worktree,worktree+NORMFUSE_AB_PARAMS_EARLY         (step decode-ab's switched build)
#   NORMFUSE_CACHE_DIR=.carry/ptx python bench/kernels.py --static sm_90 --hidden 4096 8192 \
#       --sources <BANDWIDTH_AB below>                               (step bandwidth-ab's builds)
#   NORMFUSE_CACHE_DIR=.carry/ptx python bench/kernels.py --static sm_90 --hidden 8192 16384 --split \
#       --ops RMSNorm AddLayerNorm --sources worktree,worktree+NORMFUSE_AB_SPLIT_MBARRIER   (step split-ab's)
#   tar cJf .carry/ptx.tar.xz -C .carry ptx
# Then the device tool's runs, from the repository root, carry: [".carry/ptx.tar.xz"]:
#   command: bash bench/gpu_session.sh 1                  timeout_s: 370
#   command: BUDGET=<left - 30> bash bench/gpu_session.sh 2   timeout_s: BUDGET + 20
# (BUDGET for call 2: status's budget_left_s after call 1, less 30 s for the transfers.)
# What comes back ($OUT): session.log (every step's output and exit status) and results.tar.gz
# (the benchmarks' JSON, Markdown and plots): two files, inside the tool's limit of eight.
#
# STEPS (space-separated step names) runs a subset of the call's steps, e.g. STEPS="bandwidth profile" with call 1.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
LOG=$OUT/session.log
CALL=${1:-1}
case $CALL in
    1) STEPS=${STEPS:-"bandwidth clean-flush bandwidth-ab short-rows profile new-variants"}; BUDGET=${BUDGET:-345} ;;
    2) STEPS=${STEPS:-"split-variants decode decode-ab split-ab proven-kernels"}; BUDGET=${BUDGET:-405} ;;
    *) echo "usage: bash bench/gpu_session.sh 1|2 (the first or second device call)" >&2; exit 2 ;;
esac
[ "$BUDGET" -le 580 ] || { echo "BUDGET=$BUDGET: at most 580 s (the device tool stops a command at 600)" >&2; exit 2; }
export PYTHONUNBUFFERED=1 NORMFUSE_CUDA_ARCH=${NORMFUSE_CUDA_ARCH:-sm_90}
PY=$(command -v python3 || command -v python)

if [ -f .carry/ptx.tar.xz ]; then
    mkdir -p "$WORK/cache" && tar xJf .carry/ptx.tar.xz -C "$WORK/cache"
    # the carried PTX was compiled here, maybe by another nvcc release than the GPU machine's: used as it is
    export NORMFUSE_CACHE_DIR=$WORK/cache/ptx NORMFUSE_PTX_ANY_NVCC=1
fi

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output appended to the log;
# its exit status is kept in RC[NAME], and a step named in SKIP_WHY is passed over with that reason
declare -A RC SKIP_WHY
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) echo "== $name: not in STEPS, skipped" >>"$LOG"; return 0 ;; esac
    if [ -n "${SKIP_WHY[$name]:-}" ]; then echo "== $name: skipped, ${SKIP_WHY[$name]}" >>"$LOG"; return 0; fi
    if [ "$limit" -lt 10 ]; then echo "== $name: no time left, skipped" >>"$LOG"; return 0; fi
    echo "== $name (at most ${limit}s): $*" >>"$LOG"
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    RC[$name]=$rc
    [ $rc -eq 124 ] && echo "== $name: STOPPED at its limit of ${limit}s" >>"$LOG"
    echo "== $name: exit $rc after $((SECONDS - start))s" >>"$LOG"
    # keep what has been written so far, in case a later step takes the call down
    tar czf "$OUT/results.tar.gz" -C "$WORK" results 2>/dev/null
    return 0
}

{
    echo "call $CALL of 2, budget ${BUDGET}s, steps: $STEPS"
    date -u
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1
    git log -1 --format='%h %s' 2>/dev/null || true
    "$PY" -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" 2>&1
    echo "PTX cache: ${NORMFUSE_CACHE_DIR:-none carried, compiled here}"
} >"$LOG"
cached() { ls "${NORMFUSE_CACHE_DIR:-/nonexistent}" 2>/dev/null | wc -l; }
CACHED_AT_START=$(cached)
mkdir -p "$WORK/results"

# Each GPU test is named as it finishes (-v), so a step stopped at its limit still says which
# passed; pytest-timeout, where installed, stops a hung kernel (a wrong barrier count hangs): its
# thread method dumps the stacks and ends the process even while the main thread waits inside a
# CUDA call, where a signal would never be handled.
PYTEST=("$PY" -m pytest -v --tb=short --maxfail=3 -p no:cacheprovider)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120 --timeout-method=thread)
# the builds step bandwidth-ab times (their modules are in the carried cache: see the top)
BANDWIDTH_AB=worktree,worktree+NORMFUSE_AB_MIN_THREADS_PER_SM=1024,worktree+NORMFUSE_AB_MIN_THREADS_PER_SM=1280,\
worktree+NORMFUSE_AB_PLAIN_LOADS+NORMFUSE_AB_LN_ONE_REDUCTION+NORMFUSE_AB_NO_TRAILING_SYNC
# the variants no GPU has run yet: call 1 tests those without clusters, call 2 the split rows
NEW_1="row_loop or row-loop or tactic"
NEW_2="split"

# Call 1: nothing that launches a cluster of blocks (the one mechanism no GPU has run yet whose
# fault could hang the GPU); if the machine is lost in call 2, call 1's results are already here.
call_1() {
    # (--compile-dtypes with none: torch.compile's first compiles take tens of seconds a cell kind,
    # and no decision here rests on it; the full grid, bench/kernels.py alone, times it)
    # Bandwidth at the target shapes, the table's kernel beside the layout sweep (one-row and
    # row-loop layouts) behind the launch table.
    step bandwidth 100 "$PY" bench/kernels.py --quick --tune --tokens 4096 16384 --dtypes bfloat16 \
        --compile-dtypes --budget 0.1 --out "$WORK/results"
    # The same target cells after a clean flush (L2 read, not written, before each launch): the
    # dirty flush above leaves up to 50 MB of modified lines for the timed kernel to write back, a
    # fifth of a 16384x4096 RMSNorm's bytes. Is that why the smallest target cells miss 90%?
    step clean-flush 35 "$PY" bench/kernels.py --quick --flush clean --tokens 16384 --hidden 4096 8192 \
        --dtypes bfloat16 --compile-dtypes --budget 0.1 --out "$WORK/results/clean-flush"
    # The compile-time switches that gain resident blocks where the target cells miss, against the
    # default build, in alternation (plugins/README.md, "What to A/B first"): a register cap for 4
    # blocks of 256 (LayerNorm 4096: 80 -> 62 registers, 3 -> 4 blocks, the spill gone) or 5
    # (RMSNorm 4096: 48 registers), and LayerNorm's one-reduction build (8192: 3 blocks, 1 barrier).
    step bandwidth-ab 40 "$PY" bench/kernels.py --quick --sources "$BANDWIDTH_AB" --tokens 16384 --hidden 4096 8192 \
        --budget 0.1 --out "$WORK/results/bandwidth-ab"
    # Short rows (hidden 768-2048), the weak spot (half torch's fused speed at 768): the same sweep,
    # whose row-loop layouts (TPRxCxK) are the candidate fix.
    step short-rows 50 "$PY" bench/kernels.py --quick --tune --tokens 16384 --hidden 768 1024 2048 --dtypes bfloat16 \
        --compile-dtypes --budget 0.1 --out "$WORK/results/short-rows"
    # Nsight Compute on the weak cells (short rows; RMSNorm and LayerNorm at 4096, below target),
    # normfuse's kernel beside torch's: occupancy, DRAM throughput and warp stall reasons.
    step profile 40 "$PY" bench/kernel_profile.py RMSNorm:16384x768 RMSNorm:16384x768@128x1x4 RMSNorm:16384x4096 \
        LayerNorm:16384x4096 --out "$WORK/results/profile"
    # The row-loop and tactic variants against the float64 references, in what is left: until they
    # pass, the launch table and TensorRT's tactics pick none of them.
    step new-variants $((BUDGET - SECONDS - 5)) "${PYTEST[@]}" tests/gpu -k "$NEW_1"
}

# Call 2: the split-row variants (a cluster of blocks per row, the decode candidate), then the
# rest of the GPU suite.
call_2() {
    step split-variants 150 "${PYTEST[@]}" tests/gpu -k "$NEW_2"
    # Decode (1 and 32 tokens): the table's kernel beside TensorRT's other tactic layouts and the
    # split-row layouts, over an empty launch (the target: within 2 us of it).
    step decode 100 "$PY" bench/kernels.py --quick --tactics --split --tokens 1 32 --dtypes bfloat16 \
        --compile-dtypes --budget 0.1 --out "$WORK/results/decode"
    # Decode, the table's kernels against the same built with NORMFUSE_AB_PARAMS_EARLY (gamma/beta
    # loaded before the statistics, so no dependent load round trip follows the last barrier), the
    # candidate for hidden 8192/16384 on GPUs without clusters; outputs compared with the default's.
    step decode-ab 50 "$PY" bench/kernels.py --quick --sources worktree,worktree+NORMFUSE_AB_PARAMS_EARLY \
        --tokens 1 32 --hidden 4096 8192 16384 --budget 0.1 --out "$WORK/results/decode-ab"
    # The split-row exchange, cluster barriers (default) against NORMFUSE_AB_SPLIT_MBARRIER (partials
    # pushed with st.async, counted by an mbarrier: no cluster barrier, so no GPU-wide fence, between
    # the statistics and y), on the split layouts at decode, RMSNorm (one float a block) and
    # AddLayerNorm (three); only if the split variants passed their tests (a step not run counts as
    # passed, so that STEPS=split-ab runs it alone).
    [ "${RC[split-variants]:-0}" = 0 ] || SKIP_WHY[split-ab]="the split-row variants did not pass their GPU tests"
    step split-ab 40 "$PY" bench/kernels.py --quick --sources worktree,worktree+NORMFUSE_AB_SPLIT_MBARRIER --split \
        --tokens 1 32 --hidden 8192 16384 --ops RMSNorm AddLayerNorm --budget 0.1 --out "$WORK/results/split-ab"
    # The kernels the table runs now, proven before and unchanged since (a CPU test holds their PTX
    # to the proven revision's), in whatever time is left.
    step proven-kernels $((BUDGET - SECONDS - 5)) "${PYTEST[@]}" tests/gpu -k "not ($NEW_1 or $NEW_2)"
}

"call_$CALL"

# The targets judged from what the timing steps wrote (no GPU; each file against its own run's copy
# and empty launch), into the log and the results.
# (partial.json: what a step stopped at its limit had timed, with its run's references)
mapfile -t TIMED < <(find "$WORK/results" \( -name '*-kernels*.json' -o -name partial.json \) ! -name '*-kernels-ab.json' | sort)
if [ ${#TIMED[@]} -gt 0 ]; then
    echo "== targets: $PY bench/kernel_targets.py (${#TIMED[@]} results files)" >>"$LOG"
    "$PY" bench/kernel_targets.py "${TIMED[@]}" --out "$WORK/results/targets" >>"$LOG" 2>&1
    echo "== targets: exit $?" >>"$LOG"
fi
tar czf "$OUT/results.tar.gz" -C "$WORK" results
# more entries at the end than at the start: modules compiled here, so the carried cache missed
echo "== PTX cache entries: $CACHED_AT_START at the start, $(cached) at the end" >>"$LOG"
echo "== done after ${SECONDS}s" >>"$LOG"
# the summary in the reply itself (the device tool returns the end of the output)
grep "^== " "$LOG"
