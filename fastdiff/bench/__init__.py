"""Benchmarks behind ``fastdiff bench``.

* :mod:`fastdiff.bench.kernels`: the fused guided step against eager torch, ``torch.compile`` and the copy
  bandwidth (``fastdiff bench kernels``);
* :mod:`fastdiff.bench.baselines`: the sampling loops people run today (a k-diffusion-style eager loop and the
  diffusers scheduler loop, both with classifier-free guidance at every step), the reference the end-to-end
  benchmark compares against;
* :mod:`fastdiff.bench.loops`: the end-to-end sampling benchmark (``fastdiff bench sample``).

The submodules are imported on demand: ``loops`` and ``baselines`` pull in diffusers where it is installed.
"""
