"""The fused-step microbenchmark; the same as `fastdiff bench kernels` (see fastdiff/bench/kernels.py).

python benchmarks/kernels.py --out benchmarks/results            # GPU: 16K, 1M, 50M elements
python benchmarks/kernels.py --sizes 16K,1M --out benchmarks/results/cpu
"""

import sys

from fastdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
