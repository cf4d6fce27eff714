"""The forward processes against closed forms from the literature and against autograd."""

import math

import pytest
import torch

from diffcore import processes
from tests.conftest import PROCESSES

T = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


def test_derivatives_match_autograd(process):
    t = T.clone().requires_grad_(True)
    for value, derivative in ((process.alpha, process.d_alpha), (process.sigma, process.d_sigma)):
        (grad,) = torch.autograd.grad((value(t) + 0 * t).sum(), t)
        torch.testing.assert_close(derivative(T), grad, rtol=1e-10, atol=1e-12)


def test_t_of_lam_inverts_lam(process):
    lam = process.lam(T)
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must decrease in t"
    torch.testing.assert_close(process.t_of_lam(lam), T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "ddpm"])
def test_variance_preserving_processes(name):
    process = PROCESSES[name]
    torch.testing.assert_close(process.alpha(T) ** 2 + process.sigma(T) ** 2, torch.ones_like(T))


def test_sde_coefficients_match_the_literature():
    # VP (Song et al. 2021): f = -beta/2, g^2 = beta
    vp = processes.VP(beta_min=0.1, beta_max=20.0)
    beta = 0.1 + T * 19.9
    torch.testing.assert_close(vp.f(T), -beta / 2)
    torch.testing.assert_close(vp.g2(T), beta)
    # VE: f = 0, g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min)
    ve = processes.VE(sigma_min=0.01, sigma_max=50.0)
    sigma = 0.01 * (50.0 / 0.01) ** T
    torch.testing.assert_close(ve.sigma(T), sigma)
    torch.testing.assert_close(ve.f(T), torch.zeros_like(T))
    torch.testing.assert_close(ve.g2(T), 2 * sigma**2 * math.log(50.0 / 0.01))
    # rectified flow: f = -1/(1-t), g^2 = 2t/(1-t)
    lin = processes.Linear()
    torch.testing.assert_close(lin.f(T), -1 / (1 - T))
    torch.testing.assert_close(lin.g2(T), 2 * T / (1 - T))
    # any VP process: g^2 = -2 f, since d(alpha^2 + sigma^2)/dt = 0
    cos = processes.VPCosine()
    torch.testing.assert_close(cos.g2(T), -2 * cos.f(T))


def test_g2_everywhere_on_the_closed_interval(process):
    """Overrides of g2 agree with the generic formula inside (0, 1) and stay finite at t = 0."""
    torch.testing.assert_close(process.g2(T), processes.Process.g2(process, T))
    assert bool(torch.isfinite(process.g2(torch.tensor(0.0))))
    if isinstance(process, processes.VP):
        torch.testing.assert_close(process.g2(torch.tensor(0.0)), torch.tensor(process.beta_min))


def test_marginal_variance_solves_the_forward_sde(smooth_process):
    """Var[x_t | x_0] obeys v' = 2 f v + g^2 (the Lyapunov equation of the linear SDE).

    Integrated by RK4 from t = 0.05 to 0.95 in 300 steps: global error O(h^4), below 1e-9 relative.
    """
    process = smooth_process
    t0, t1, n = 0.05, 0.95, 300
    h = (t1 - t0) / n
    v = process.sigma(torch.tensor(t0)) ** 2

    def rhs(t, v):
        t = torch.tensor(t)
        return 2 * process.f(t) * v + process.g2(t)

    for i in range(n):
        t = t0 + i * h
        k1 = rhs(t, v)
        k2 = rhs(t + h / 2, v + h / 2 * k1)
        k3 = rhs(t + h / 2, v + h / 2 * k2)
        k4 = rhs(t + h, v + h * k3)
        v = v + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(v, process.sigma(torch.tensor(t1)) ** 2, rtol=1e-8, atol=0)


def test_ddpm_schedule_on_continuous_time():
    betas = processes.ddpm_betas(1000, 1e-4, 0.02)
    ab = processes.alphas_cumprod(betas)
    disc = processes.Discrete(ab)
    t_n = torch.arange(1, 1001, dtype=torch.float64) / 1000
    # the discrete process passes exactly through the schedule
    torch.testing.assert_close(disc.alpha(t_n) ** 2, ab, rtol=1e-12, atol=0)
    torch.testing.assert_close(disc.step_of_t(t_n), torch.arange(1000, dtype=torch.float64))
    # and VP(0.1, 20) is its continuous limit: log(1 - b) = -b - b^2/(2(1 - b)) at worst, and
    # the Riemann sum of the linear beta(t) differs from its integral by at most 19.9/(8(N-1))
    vp = processes.VP(0.1, 20.0)
    gap = (torch.log(ab) - 2 * torch.log(vp.alpha(t_n))).abs()
    bound = torch.cumsum(betas**2 / (2 * (1 - betas)), 0) + 19.9 / (8 * 999)
    assert bool((gap <= bound).all()), f"largest gap {float(gap.max()):.3g}"
    assert float(gap.max()) > 0.5 * float(bound.max())  # the bound is not vacuous


def test_marginal_per_sample_time(process, gen):
    x0 = torch.randn(5, 3, generator=gen)
    noise = torch.randn(5, 3, generator=gen)
    t = torch.linspace(0.1, 0.9, 5)
    xt = process.marginal(x0, t, noise)
    for i in range(5):
        torch.testing.assert_close(
            xt[i], process.marginal(x0[i : i + 1], float(t[i]), noise[i : i + 1])[0]
        )
    images = torch.randn(5, 1, 4, 4, generator=gen)
    assert process.marginal(images, t, torch.zeros_like(images)).shape == images.shape


def test_prior_sample_is_sigma_times_noise(process):
    x = process.prior_sample((4, 2), t=1.0, generator=torch.Generator().manual_seed(3))
    z = torch.randn((4, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, process.sigma(torch.tensor(1.0)) * z)


@pytest.mark.parametrize("bad_t", [-0.1, 1.5, float("nan")])
def test_time_outside_unit_interval_is_refused(process, bad_t):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got t = "):
        process.alpha(bad_t)
    with pytest.raises(ValueError, match="must lie in"):
        process.marginal(torch.zeros(2, 2), torch.tensor([0.5, bad_t]), torch.zeros(2, 2))


def test_bad_construction_and_shapes_are_refused():
    with pytest.raises(
        ValueError, match="beta_min must be a positive finite number, got beta_min = -1"
    ):
        processes.VP(beta_min=-1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        processes.VE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="t_end"):
        processes.VPCosine(t_end=1.5)
    with pytest.raises(ValueError, match="betas must be"):
        processes.alphas_cumprod(torch.tensor([0.1, 1.2]))
    with pytest.raises(ValueError, match="decrease strictly"):
        processes.Discrete(torch.tensor([0.9, 0.95]))
    vp = processes.VP()
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 3\) but noise has shape \(2, 2\)"):
        vp.marginal(torch.zeros(2, 3), 0.5, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"t of shape \(3,\) does not broadcast"):
        vp.marginal(torch.zeros(2, 3), torch.full((3,), 0.5), torch.zeros(2, 3))
