#!/usr/bin/env bash
# The wheels benchmarks/gpu_session.sh installs on the GPU machine, which has no package registry. Its image (see the
# device tool's KINDS.md) has torch, triton, transformers, huggingface-hub, safetensors, scipy, torchdiffeq and the
# rest of fastdiff's needs; these are the packages it lacks: diffusers and importlib_metadata (diffusers' one missing
# requirement), and k-diffusion with its samplers' requirements torchsde and trampoline. All pure Python. Run from
# the repository root on a machine with a registry; the folder is ignored by git and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py -d .whl \
    diffusers==0.42.1 importlib_metadata k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
ls .whl
