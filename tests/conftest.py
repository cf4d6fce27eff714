"""Shared fixtures: the four processes, and float64 throughout so that identities hold exactly."""

import pytest
import torch

from diffcore import processes


def pytest_configure(config):
    # Tests run two at a time (pytest-xdist) on two cores: more threads only contend.
    torch.set_num_threads(1)


PROCESSES = {
    "vp": processes.VP(),
    "vp_cosine": processes.VPCosine(),
    "ve": processes.VE(),
    "linear": processes.Linear(),
    "ddpm": processes.Discrete(processes.alphas_cumprod(processes.ddpm_betas())),
}


@pytest.fixture(params=list(PROCESSES), ids=list(PROCESSES))
def process(request):
    return PROCESSES[request.param]


@pytest.fixture(params=["vp", "vp_cosine", "ve", "linear"])
def smooth_process(request):
    """The four continuous processes; the discrete DDPM schedule has kinks that cost an ODE
    solver its order, so order and fine-solve tests leave it out."""
    return PROCESSES[request.param]


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
