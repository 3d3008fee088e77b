import pytest
import torch

from ppl_kbnn.moments import set_validation


@pytest.fixture(autouse=True)
def float64_and_seed():
    """Every test compares numbers in float64 with a fixed seed; validation on."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    set_validation(True)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def random_psd(n: int, gen: torch.Generator, scale: float = 1.0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A random full-rank covariance ``scale * A Aᵀ / n + 0.05 scale I``."""
    A = torch.randn(*batch, n, n, generator=gen)
    return scale * (A @ A.mT / n + 0.05 * torch.eye(n))
