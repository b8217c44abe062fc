"""fastdiff: fast, trustworthy sampling for diffusion models.

Models follow the k-diffusion/EDM convention ``model(x, sigma, **cond) -> D(x; sigma)``.
"""

from fastdiff import cache, denoisers, guidance, metrics, models, ode, ops, schedules, solvers
from fastdiff.guidance import Guidance
from fastdiff.sampler import CaptureError, Sampler, SampleStats, count_nfe, sample
from fastdiff.solvers import ODE_SOLVERS, SOLVERS

__version__ = "0.1.0"
__all__ = [
    "CaptureError",
    "Guidance",
    "SOLVERS",
    "ODE_SOLVERS",
    "SampleStats",
    "Sampler",
    "cache",
    "count_nfe",
    "denoisers",
    "guidance",
    "metrics",
    "models",
    "ode",
    "ops",
    "sample",
    "schedules",
    "solvers",
]
