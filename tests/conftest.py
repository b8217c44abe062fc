import os

import pytest
import torch

# Triton kernels run on CPU tensors through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastdiff.bench import peers  # noqa: E402
from fastdiff.models import builtin_gmm  # noqa: E402


@pytest.fixture(scope="session")
def gmm():
    return builtin_gmm()


@pytest.fixture
def noise():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread as on two, and far faster than two OpenMP threads when the other
    core is busy (CI runs several jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def k_diffusion():
    """The installed k-diffusion's ``k_diffusion.sampling``, the peer the samplers are compared with; skipped with
    the install line where it is missing (.ci/run installs it and checks that it imports, so CI never skips)."""
    try:
        return peers.k_diffusion_sampling()
    except peers.PeerMissing as exc:
        pytest.skip(str(exc))
