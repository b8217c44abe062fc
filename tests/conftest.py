import pytest
import torch

from fastdiff.models import builtin_gmm


@pytest.fixture(scope="session")
def gmm():
    return builtin_gmm()


@pytest.fixture
def noise():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
