#!/usr/bin/env bash
# Every GPU check and benchmark in one device call (the device machine has no package registry, and device time is
# scarce): build fastdiff._C with CUDA, run the GPU tests, run the CUDA tests under compute-sanitizer, benchmark the
# kernels, and run the end-to-end sampling benchmark (k-diffusion-style and diffusers loops against fastdiff.Sampler,
# eager and CUDA graph). Logs, kernels.csv/.png and sample_loops.csv/.png land in $OUT.
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
# The diffusers integration's GPU tests and the end-to-end benchmark build diffusers networks (its SD pipelines
# import transformers); the device machine has no registry, so bring the wheels (pip download diffusers
# transformers -d wheels/ on a machine with one). Without them those tests skip, the benchmark's diffusers rows are
# recorded as failed, and the rest still runs.
for pkg in diffusers transformers; do
    python3 -c "import $pkg" 2>/dev/null || python3 -m pip install -q --no-index --find-links "${WHEELS:-wheels}" \
        "$pkg" 2>&1 | tail -3
done
python3 -m pytest -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# memcheck on the plain-CUDA path, forward and backward, every dtype pair and odd size.
FASTDIFF_BACKEND=cuda compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 -m pytest -m gpu -q -p no:cacheprovider -k "kernels_match or backward_kernels" 2>&1 \
    | tee "$OUT/sanitizer.log" | tail -8
python3 -m fastdiff bench kernels --progress --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
# End-to-end loops: SD-like latents 4x64x64 and 4x128x128, batch 1, 8, 32 (about 5 minutes on an H100). The time
# budget records the rows that would start after it as skipped, so that the CSV and the plot are always written.
python3 -m fastdiff bench sample --preset gpu --time-budget 330 --out "$OUT" 2>&1 | tee "$OUT/sample_loops.log" | tail -120
