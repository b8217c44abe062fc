#!/usr/bin/env bash
# Every GPU check and benchmark of the step kernels in one device call (the device machine has no package
# registry, and device time is scarce): build fastdiff._C with CUDA, run the GPU tests, run the CUDA tests under
# compute-sanitizer, and benchmark the kernels. Logs, kernels.csv and kernels.png land in $OUT.
#
#     bash benchmarks/gpu_session.sh        (from the repository root, on a machine with CUDA)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTDIFF_CUDA_ARCHS=${FASTDIFF_CUDA_ARCHS:-9.0}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import torch, fastdiff.ops as o; print('torch', torch.__version__, 'backends', o.available_backends())" \
    | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# memcheck on the plain-CUDA path, forward and backward, every dtype pair and odd size.
FASTDIFF_BACKEND=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 -m pytest -m gpu -q -p no:cacheprovider -k "kernels_match or backward_kernels" 2>&1 \
    | tee "$OUT/sanitizer.log" | tail -8
python3 -m fastdiff bench kernels --progress --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
