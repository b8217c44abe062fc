"""The end-to-end sampling benchmark; the same as `fastdiff bench sample` (see fastdiff/bench/loops.py).

python benchmarks/sample_loop.py --preset gpu --out benchmarks/results/gpu     # SD-like latents, batch 1, 8, 32
python benchmarks/sample_loop.py --preset cpu --out benchmarks/results/cpu     # tiny networks, < 2 min on 2 cores
"""

import sys

from fastdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sample", *sys.argv[1:]]))
