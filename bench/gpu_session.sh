#!/usr/bin/env bash
# The GPU checks still pending, as one call on a lent GPU machine (15 minutes of device time a
# session, starts included): the unproven kernel variants, the decode, bandwidth and short-row
# timings, a profile of the weak cells, then the rest of the GPU suite, in that order of priority.
# Each step has its own time limit (the last takes what is left of BUDGET, inside the device tool's
# 10 minutes a command), so the call ends with whatever finished; a step that runs out is said in
# the log and the next starts.
#
# Here, first, so that the GPU machine compiles nothing (1136 modules took 12 minutes on 2 cores;
# 119 MB of PTX make a 5.8 MB archive):
#   NORMFUSE_CACHE_DIR=.carry/ptx python -c "import plugins.build as b; b.prebuild('sm_90')"
#   NORMFUSE_CACHE_DIR=.carry/ptx python bench/kernels.py --static sm_90 --hidden 4096 8192 16384 \
#       --sources worktree,worktree+NORMFUSE_AB_PARAMS_EARLY         (step decode-ab's switched build)
#   tar cJf .carry/ptx.tar.xz -C .carry ptx
# Then the device tool's run, from the repository root:
#   command: bash bench/gpu_session.sh     carry: [".carry/ptx.tar.xz"]     timeout_s: 600
# What comes back ($OUT): session.log (every step's output and exit status) and results.tar.gz
# (the benchmarks' JSON, Markdown and plots): two files, inside the tool's limit of eight.
#
# STEPS (space-separated step names) runs a subset, e.g. STEPS="new-variants decode".
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
LOG=$OUT/session.log
STEPS=${STEPS:-"new-variants decode decode-ab bandwidth short-rows profile proven-kernels"}
BUDGET=${BUDGET:-575}  # seconds for the whole script: the device tool stops a command at 600
export PYTHONUNBUFFERED=1 NORMFUSE_CUDA_ARCH=${NORMFUSE_CUDA_ARCH:-sm_90}
PY=$(command -v python3 || command -v python)

if [ -f .carry/ptx.tar.xz ]; then
    mkdir -p "$WORK/cache" && tar xJf .carry/ptx.tar.xz -C "$WORK/cache"
    export NORMFUSE_CACHE_DIR=$WORK/cache/ptx
fi

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output appended to the log
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) echo "== $name: not in STEPS, skipped" >>"$LOG"; return 0 ;; esac
    if [ "$limit" -lt 10 ]; then echo "== $name: no time left, skipped" >>"$LOG"; return 0; fi
    echo "== $name (at most ${limit}s): $*" >>"$LOG"
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "== $name: STOPPED at its limit of ${limit}s" >>"$LOG"
    echo "== $name: exit $rc after $((SECONDS - start))s" >>"$LOG"
    # keep what has been written so far, in case a later step takes the call down
    tar czf "$OUT/results.tar.gz" -C "$WORK" results 2>/dev/null
    return 0
}

{
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
# passed; pytest-timeout, where installed, stops a hung kernel (a wrong barrier count hangs).
PYTEST=("$PY" -m pytest -v --tb=short --maxfail=3 -p no:cacheprovider)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
NEW="split or row_loop or row-loop or tactic"

# 1. The variants no GPU has run yet (split-row, row-loop, TensorRT's tactic layouts) against the
#    float64 references: until they pass, the launch table and the tactics pick none of them.
step new-variants 150 "${PYTEST[@]}" tests/gpu -k "$NEW"
# 2. Decode (1 and 32 tokens): the table's kernel beside the tactic and split-row layouts, over an
#    empty launch (the target: within 2 us of it).
step decode 100 "$PY" bench/kernels.py --quick --tactics --split --tokens 1 32 --dtypes bfloat16 \
    --budget 0.1 --out "$WORK/results"
# 3. Decode, the table's kernels against the same built with NORMFUSE_AB_PARAMS_EARLY (gamma/beta
#    loaded before the statistics, so no dependent load round trip follows the last barrier), the
#    candidate for hidden 8192/16384 on GPUs without clusters; outputs compared with the default's.
step decode-ab 60 "$PY" bench/kernels.py --quick --sources worktree,worktree+NORMFUSE_AB_PARAMS_EARLY \
    --tokens 1 32 --hidden 4096 8192 16384 --budget 0.1 --out "$WORK/results/decode-ab"
# 4. Bandwidth at the target shapes, with the layout sweep behind the launch table.
step bandwidth 120 "$PY" bench/kernels.py --quick --tune --tokens 4096 16384 65536 --dtypes bfloat16 \
    --budget 0.1 --out "$WORK/results"
# 5. Short rows (hidden 768-2048), the weak spot (half torch's fused speed at 768): the same sweep,
#    whose row-loop layouts (TPRxCxK) are the candidate fix.
step short-rows 60 "$PY" bench/kernels.py --quick --tune --tokens 16384 --hidden 768 1024 2048 --dtypes bfloat16 \
    --budget 0.1 --out "$WORK/results/short-rows"
# 6. Nsight Compute on the weak cells (short rows; RMSNorm and LayerNorm at 4096, below target),
#    normfuse's kernel beside torch's: occupancy, DRAM throughput and warp stall reasons.
step profile 40 "$PY" bench/kernel_profile.py RMSNorm:16384x768 RMSNorm:16384x768@128x1x4 RMSNorm:16384x4096 \
    LayerNorm:16384x4096 --out "$WORK/results/profile"
# 7. The rest of the GPU suite, in whatever time is left: the kernels the table runs now, proven
#    before and unchanged since (a CPU test holds their PTX to the proven revision's).
step proven-kernels $((BUDGET - SECONDS - 5)) "${PYTEST[@]}" tests/gpu -k "not ($NEW)"

tar czf "$OUT/results.tar.gz" -C "$WORK" results
# more entries at the end than at the start: modules compiled here, so the carried cache missed
echo "== PTX cache entries: $CACHED_AT_START at the start, $(cached) at the end" >>"$LOG"
echo "== done after ${SECONDS}s" >>"$LOG"
