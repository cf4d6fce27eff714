"""Time grids and the PF-ODE samplers, against the closed-form Gaussian PF-ODE."""

import inspect
import math

import pytest
import torch

from diffcore import analytic, processes, samplers


def _gaussian():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), cov)


@pytest.mark.parametrize("kind", samplers.GRIDS)
def test_time_grids_are_decreasing_with_exact_ends(process, kind):
    ts = samplers.time_grid(process, 12, kind=kind, t_min=0.01, t_max=0.99)
    assert ts.shape == (13,) and ts.dtype == torch.float64
    assert float(ts[0]) == 0.99 and float(ts[-1]) == 0.01
    assert bool((ts[1:] < ts[:-1]).all())


def test_grid_spacings(process):
    lam = process.lam(samplers.time_grid(process, 10, kind="logsnr", t_min=0.02, t_max=0.98))
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10), rtol=1e-7, atol=1e-9)
    ts = samplers.time_grid(process, 10, kind="karras", t_min=0.02, t_max=0.98, rho=7.0)
    root = torch.exp(-process.lam(ts)) ** (1 / 7)  # equal steps in (sigma/alpha)^(1/rho)
    torch.testing.assert_close(root.diff(), root.diff().mean().expand(10), rtol=1e-7, atol=1e-9)
    ts = samplers.time_grid(process, 4, kind="quadratic", t_min=0.0, t_max=1.0)
    torch.testing.assert_close(ts, torch.tensor([1.0, 9 / 16, 1 / 4, 1 / 16, 0.0]))


def test_karras_grid_on_ve_is_edm():
    ve = processes.VE(sigma_min=0.002, sigma_max=80.0)
    ts = samplers.time_grid(ve, 18, kind="karras", t_min=0.0, t_max=1.0)
    i = torch.arange(19, dtype=torch.float64)
    edm = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(ve.sigma(ts), edm, rtol=1e-10, atol=0)


def _order(sampler, process, ns=(32, 64, 128, 256, 512)):
    """Least-squares slope of log(error) against log(steps), error at t_min against the exact map."""
    g = _gaussian()
    x = g.marginal(1.0, process).sample(64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in ns:
        ts = samplers.time_grid(process, n, kind="uniform", t_min=1e-2, t_max=1.0)
        out = sampler(g.denoiser(process), x, ts, process)
        errors.append(float((out - g.pf_ode_map(x, 1.0, 1e-2, process)).abs().max()))
    log_n = torch.log(torch.tensor(ns, dtype=torch.float64))
    log_e = torch.log(torch.tensor(errors))
    slope = (
        -((log_n - log_n.mean()) * (log_e - log_e.mean())).sum()
        / ((log_n - log_n.mean()) ** 2).sum()
    )
    return float(slope), errors


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_convergence_order_on_the_gaussian_oracle(smooth_process, name, order):
    slope, errors = _order(samplers.SAMPLERS[name], smooth_process)
    assert abs(slope - order) <= 0.15, f"slope {slope:.3f}, errors {errors}"
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_samplers_reach_t_zero(process, name, order):
    """Ending at t = 0, where sigma vanishes for VP and Linear: Heun's last step is then an Euler
    step, and the velocity is never evaluated at t = 0. No NaN, and the order survives, measured
    as log2 of the error ratio between 100 and 200 steps (not for the kinked DDPM schedule)."""
    g = _gaussian()
    x = g.marginal(1.0, process).sample(16, generator=torch.Generator().manual_seed(0))
    exact = g.pf_ode_map(x, 1.0, 0.0, process)
    errors = []
    for n in (100, 200):
        ts = samplers.time_grid(process, n, kind="uniform", t_min=0.0, t_max=1.0)
        out = samplers.SAMPLERS[name](g.denoiser(process), x, ts, process)
        assert bool(torch.isfinite(out).all())
        errors.append(float((out - exact).abs().max()))
    assert errors[1] < errors[0]
    if not isinstance(process, processes.Discrete):
        assert abs(math.log2(errors[0] / errors[1]) - order) <= 0.15, errors


def test_denoise_last_returns_the_denoised_state():
    vp = processes.VP()
    g = _gaussian()
    x = vp.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(vp, 10)
    xt = samplers.heun(g.denoiser(vp), x, ts, vp)
    x0 = samplers.heun(g.denoiser(vp), x, ts, vp, denoise_last=True)
    torch.testing.assert_close(x0, g.denoise(xt, ts[-1], vp))


def test_callback_records_the_trajectory():
    vp = processes.VP()
    g = _gaussian()
    x = vp.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(vp, 6)
    for name, sampler in samplers.SAMPLERS.items():
        seen = []
        record = seen.append
        out = sampler(
            g.denoiser(vp),
            x,
            ts,
            vp,
            callback=lambda i, t, x, record=record: record((i, float(t), x)),
        )
        assert [i for i, _, _ in seen] == list(range(6)), name
        assert [t for _, t, _ in seen] == ts[1:].tolist(), name
        torch.testing.assert_close(seen[-1][2], out)
        # a step of the trajectory equals the sampler run on the shortened grid
        torch.testing.assert_close(seen[2][2], sampler(g.denoiser(vp), x, ts[:4], vp))


def test_registry_and_signature():
    assert {"euler", "heun"} <= set(samplers.SAMPLERS)
    for name, sampler in samplers.SAMPLERS.items():
        params = list(inspect.signature(sampler).parameters)
        assert params[:4] == ["model", "x", "ts", "process"], name


def test_samplers_follow_the_input_dtype():
    vp = processes.VP()
    g = _gaussian()
    x = torch.randn(4, 2, dtype=torch.float32)
    out = samplers.euler(g.denoiser(vp), x, samplers.time_grid(vp, 5), vp)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_bad_grids_are_refused():
    vp, lin = processes.VP(), processes.Linear()
    with pytest.raises(
        ValueError, match=r"ts must decrease strictly, got ts\[1\] = 0.5 <= ts\[2\] = 0.7"
    ):
        samplers.heun(lambda x, t: x, torch.zeros(1, 2), torch.tensor([0.9, 0.5, 0.7]), vp)
    with pytest.raises(ValueError, match=r"ts must lie in \[0, 1\], got ts = \[1.2\]"):
        samplers.euler(lambda x, t: x, torch.zeros(1, 2), torch.tensor([1.2, 0.5]), vp)
    with pytest.raises(ValueError, match=r"ts must be a 1-D tensor of at least 2 times"):
        samplers.euler(lambda x, t: x, torch.zeros(1, 2), torch.tensor([0.5]), vp)
    with pytest.raises(
        ValueError, match=r"n must be a positive integer number of steps, got n = 0"
    ):
        samplers.time_grid(vp, 0)
    with pytest.raises(ValueError, match=r"kind must be one of .* got kind = 'cosine'"):
        samplers.time_grid(vp, 5, kind="cosine")
    with pytest.raises(
        ValueError, match=r"need 0 <= t_min < t_max <= 1, got t_min = 0.5, t_max = 0.5"
    ):
        samplers.time_grid(vp, 5, t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match=r"needs a finite log-SNR at t_max.* lam\(1.0\) = -inf"):
        samplers.time_grid(lin, 5, kind="logsnr")
    with pytest.raises(ValueError, match=r"needs a finite log-SNR at t_min"):
        samplers.time_grid(vp, 5, kind="logsnr", t_min=0.0)
    assert math.isclose(float(samplers.time_grid(vp, 5, kind="karras", t_min=0.0)[-1]), 0.0)
