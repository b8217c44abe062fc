#!/usr/bin/env bash
# Every GPU check and benchmark in one device call, finished within 8 minutes (device time is scarce: 15 minutes a
# session, the machine's start included). Stages, each under `timeout` with its own deadline (a stage may use what
# the stages before it left unused):
#   wheels     install the carried wheels (.whl/, from benchmarks/gpu_wheels.sh): the machine has no registry
#   build      build fastdiff._C with CUDA for sm_90; then stop at once, with a one-line reason, unless
#              _C.with_cuda holds and both the cuda and triton backends are available
#   tests      the GPU tests (pytest -m gpu); every test forces its backend and proves it ran
#   sanitizer  compute-sanitizer memcheck over the CUDA kernels' tests (forward and backward, every dtype pair,
#              aligned and unaligned; the 12M-element case left out for time)
#   kernels    the fused-step microbenchmark against eager, torch.compile and the copy bandwidth
#   cache      feature caching on an SD-sized diffusers UNet from config: time per batch, eager and captured
#   sample     the sampling-loop benchmark: loop overhead against k-diffusion and diffusers, EDM2 interval, e2e
# $OUT receives at most 8 files: summary.txt, logs.tar.gz (every stage's log), kernels.csv/.png, cache_speed.csv
# and sample_loops.csv/.png.
#
#   bash benchmarks/gpu_session.sh              on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh --rehearse   on a CPU machine: each stage runs a CPU form of its command (the
#                                               test selections collected, not run; tiny CPU benchmarks), so the
#                                               script's own mistakes show before device time is spent
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
OUT=${OUT:-gpu-results}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1 FASTDIFF_CUDA_ARCHS=${FASTDIFF_CUDA_ARCHS:-9.0}
# torch guesses CUDA_HOME from nvcc's folder, which is wrong where nvcc on the PATH is a wrapper script (it is on
# the CPU machines: /usr/local/bin/nvcc, giving /usr/local and no cuda_runtime.h).
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
SANITIZE='cuda and (kernels_match or backward_kernels) and not 256'

START=$SECONDS
DEADLINE=$START
summary() { echo "$*" | tee -a "$LOGS/summary.txt"; }

# stage NAME SECONDS COMMAND...: run COMMAND, logged, until this stage's deadline (the previous one plus SECONDS).
stage() {
    local name=$1 slice=$2
    shift 2
    DEADLINE=$((DEADLINE + slice))
    local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc status last
    if [ "$left" -lt 5 ]; then
        summary "$name: not run (its deadline has passed)"
        return 124
    fi
    timeout --kill-after=5 "$left" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT after ${left} s" ;;
        *) status="exit $rc" ;;
    esac
    last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-240)
    summary "$name: $status ($((SECONDS - t0)) s)${last:+: $last}"
    return $rc
}

finish() {
    summary "total $((SECONDS - START)) s"
    cp "$LOGS/summary.txt" "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
    local n
    n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    [ "$n" -le 8 ] || echo "gpu_session.sh: $OUT holds $n files, more than the 8 that come back" >&2
    exit "$1"
}

if [ $REHEARSE = 1 ]; then
    summary "rehearsal on $(uname -n): CPU forms of every stage"
else
    summary "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
fi

if [ -d "$WHEELS" ]; then
    SITE=$(mktemp -d)
    stage wheels 25 "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    summary "wheels: none carried ($WHEELS); diffusers and k-diffusion rows and tests will say they are missing"
fi

CHECK='import torch, fastdiff.ops as o
b = o.available_backends()
print("torch", torch.__version__, "backends", b, "extension with CUDA", bool(o._C and o._C.with_cuda))
missing = [x for x in ("cuda", "triton") if x not in b]
if o._C is None or not o._C.with_cuda or missing:
    raise SystemExit("stopped: " + ("fastdiff._C did not import" if o._C is None else
        "fastdiff._C was built without CUDA" if not o._C.with_cuda else "backend(s) unavailable: " + ", ".join(missing)))'
if [ $REHEARSE = 1 ]; then
    stage build 140 "$PY" -c 'import fastdiff.ops as o; print("built already; backends", o.available_backends())'
    stage check 10 "$PY" -c "$CHECK"  # on a CPU machine this says why a GPU run would stop
else
    stage build 140 "$PY" -m pip install -q --root-user-action=ignore --no-build-isolation --no-deps -e . \
        || { summary "stopped: the build failed (logs.tar.gz: build.log)"; finish 2; }
    stage check 10 "$PY" -c "$CHECK" || { summary "$(tail -n 1 "$LOGS/check.log")"; finish 3; }
fi

if [ $REHEARSE = 1 ]; then
    stage tests 110 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests
    stage sanitizer 40 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/test_gpu.py -k "$SANITIZE"
    stage kernels 70 "$PY" -m fastdiff bench kernels --device cpu --sizes 16K --dtypes fp32 \
        --workloads euler_cfg,apg,unipc_corrector --no-compile --reps 5 --out "$OUT"
    stage cache 40 "$PY" benchmarks/cache_speed.py --size tiny --steps 4 --reps 2 --device cpu --out "$OUT"
    stage sample 60 "$PY" -m fastdiff bench sample --preset cpu --scenarios overhead --reps 5 --no-progress \
        --out "$OUT"
else
    stage tests 110 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests
    stage sanitizer 40 compute-sanitizer --tool memcheck --error-exitcode 3 \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "$SANITIZE"
    stage kernels 65 "$PY" -m fastdiff bench kernels --workloads euler_cfg,apg,rescale,cfg_zero_star,unipc_corrector \
        --sizes 16K,50M --time-budget 50 --progress --out "$OUT"
    stage cache 40 "$PY" benchmarks/cache_speed.py --steps 20 --reps 5 --out "$OUT"
    left=$((DEADLINE + 50 - SECONDS))
    stage sample 50 "$PY" -m fastdiff bench sample --preset gpu --batches 1,8 \
        --time-budget $((left > 50 ? left - 35 : 15)) --no-progress --out "$OUT"
fi
finish 0
