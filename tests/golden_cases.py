"""The fixed problems on which every sampler, solver and PnP loop was recorded in float64
(``tests/data/golden_outputs.pt``); ``tests/test_golden.py`` runs them again and asks for the
same numbers to 1e-12.  Only the inputs live here, so that the calls can change their form."""

from __future__ import annotations

import torch

from diffcore import analytic, processes, samplers
from diffcore.inverse import operators as op

MIXTURE_MEANS = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
MIXTURE_COVS = [[[0.5, 0.1], [0.1, 0.2]], [[0.3, -0.1], [-0.1, 0.6]], [[0.3, 0.0], [0.0, 0.3]]]
BATCH = 5


def mixture() -> analytic.GaussianMixture:
    dt = torch.float64
    return analytic.GaussianMixture(
        torch.tensor(MIXTURE_MEANS, dtype=dt),
        torch.tensor(MIXTURE_COVS, dtype=dt),
        torch.tensor([0.5, 0.3, 0.2], dtype=dt),
    )


#: Sampler problems: (process, grid) by name.
def sampler_grids() -> dict:
    vp, ve, lin = processes.VP(), processes.VE(), processes.Linear()
    return {
        "vp_logsnr": (vp, samplers.time_grid(vp, 6, kind="logsnr")),
        "vp_to_zero": (vp, samplers.time_grid(vp, 5, kind="uniform", t_min=0.0)),
        "ve_karras": (ve, samplers.time_grid(ve, 6, kind="karras")),
        "linear_from_one": (lin, samplers.time_grid(lin, 5, kind="uniform")),
    }


#: Options under which each sampler is recorded beyond its defaults.
SAMPLER_OPTIONS = {
    "heun": [{}, {"s_churn": 2.0}],
    "ddim": [{}, {"eta": 0.5}, {"eta": 1.0}],
    "pc": [{}, {"snr": 0.1, "n_corrector": 2}],
    "annealed_langevin": [{"eps": 1e-6}, {"eps": 1e-6, "n_steps_each": 2}],
}


def start(process, ts, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return process.prior_sample((BATCH, 2), t=float(ts[0]), generator=gen)


#: Solver problems: 16-pixel images, a Gaussian prior and two operators.
def solver_problem(kind: str):
    gen = torch.Generator().manual_seed(11)
    d = 16
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    prior = analytic.Gaussian(
        torch.randn(d, generator=gen, dtype=torch.float64), a @ a.T / d + 0.2 * torch.eye(d)
    )
    A = {
        "inpainting": lambda: op.Inpainting(op.random_mask((1, 4, 4), 0.5, gen)),
        "blur": lambda: op.Blur(op.gaussian_kernel(3, 0.6), (1, 4, 4)),
    }[kind]()
    x_true = prior.sample(1, generator=gen).reshape(1, *A.in_shape)
    y = op.measure(A, x_true, 0.1, gen)
    return prior, A, y


GOLDEN_PATH = __import__("pathlib").Path(__file__).parent / "data" / "golden_outputs.pt"

#: The samplers whose exact output laws were recorded, with their options.
LAW_OPTIONS = {
    "ddpm": {},
    "ddim": {"eta": 0.5},
    "pc": {},
    "euler_maruyama": {},
    "heun": {"s_churn": 2.0},
}


def noise() -> torch.Generator:
    """The generator every stochastic sampler was recorded with."""
    return torch.Generator().manual_seed(7)


def blind_problem():
    """Blind-PnPDM on a 1 x 6 signal and a 3-tap kernel, Gaussian priors for both."""
    from diffcore.inverse import blind, pnp

    gen = torch.Generator().manual_seed(5)
    shape, kshape = (1, 1, 6), (1, 3)
    idx = torch.arange(6)
    mu_x = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64)
    cov_x = 0.5 * torch.exp(-((idx[:, None] - idx) ** 2) / 4.0).double()
    mu_k = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    cov_k = 0.02 * torch.eye(3, dtype=torch.float64) + 0.01
    xs = (
        mu_x
        + torch.randn(4, 6, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov_x).T
    )
    kernels = mu_k.reshape(1, 3).expand(4, 1, 3)
    noise = 0.2 * torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    ys = blind.ImageBlur(kernels, shape)(xs.reshape(4, *shape)) + noise
    step_x = pnp.gaussian_prior_step(analytic.Gaussian(mu_x, cov_x), generator=gen)
    step_k = pnp.gaussian_prior_step(analytic.Gaussian(mu_k, cov_k), generator=gen)
    args = (step_x, step_k, ys, 0.2, kshape, [0.4, 0.3, 0.2], [0.15, 0.1, 0.1])
    return args, {"generator": gen}
