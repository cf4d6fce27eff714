"""Time grids and the samplers' deterministic behaviour, against the closed-form Gaussian PF-ODE.

The laws of the stochastic samplers are tested in ``test_samplers_stochastic.py``.
"""

import inspect
import math

import pytest
import torch

from diffcore import analytic, metrics, processes, samplers
from tests.conftest import PROCESSES

ALWAYS_STOCHASTIC = ("ddpm", "euler_maruyama", "pc", "annealed_langevin")
# ddim (eta > 0) and heun (s_churn > 0) are stochastic through an option
NOISY = (*ALWAYS_STOCHASTIC, "ddim", "heun")
# alpha = 0 at t = 1 (Linear) is refused by the samplers that divide by alpha (plms, and
# annealed_langevin through y = x / alpha) or need a finite SDE drift f = alpha'/alpha
NEED_ALPHA = ("plms", "annealed_langevin", "euler_maruyama")


def _gaussian():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), cov)


def _with_noise(name, seed=0, **options):
    """Options for ``SAMPLERS[name]`` with a seeded generator (the deterministic ones ignore it)."""
    options["generator"] = torch.Generator().manual_seed(seed)
    return options


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


def _order(sampler, process, ns=(32, 64, 128, 256)):
    """The fitted order of the max error at t_min against the exact map, and the errors."""
    g = _gaussian()
    x = g.marginal(1.0, process).sample(64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in ns:
        ts = samplers.time_grid(process, n, kind="uniform", t_min=1e-2, t_max=1.0)
        out = sampler(g.denoiser(process), x, ts, process)
        errors.append(float((out - g.pf_ode_map(x, 1.0, 1e-2, process)).abs().max()))
    return metrics.convergence_order(ns, errors), errors


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


# -- convergence orders of the ODE solvers ------------------------------------------------------
T_MAX, T_MIN = 0.99, 0.05  # finite log-SNR at both ends for every process (Linear included)
NS = (32, 64, 128)  # errors from ~1e-1 down to >= 1e-7: asymptotic, far above round-off


def _log_snr_errors(name, process, ns, **options):
    """Max error at T_MIN against the exact PF-ODE map, on log-SNR grids of ns steps."""
    g = _gaussian()
    x = g.marginal(T_MAX, process).sample(64, generator=torch.Generator().manual_seed(0))
    exact = g.pf_ode_map(x, T_MAX, T_MIN, process)
    errors = []
    for n in ns:
        ts = samplers.time_grid(process, n, kind="logsnr", t_min=T_MIN, t_max=T_MAX)
        out = samplers.SAMPLERS[name](g.denoiser(process), x, ts, process, **options)
        errors.append(float((out - exact).abs().max()))
    return errors


@pytest.mark.parametrize(
    "name,options,order,ns",
    [
        ("euler", {}, 1, NS),
        ("heun", {}, 2, NS),
        ("ddim", {"eta": 0.0}, 1, NS),
        ("dpm_solver_1", {}, 1, NS),
        ("dpm_solver_2", {}, 2, NS),
        ("dpm_solver_3", {}, 3, (64, 128, 256)),  # approaches 3 from below: 2.84 at 32->64
        ("dpmpp_2m", {}, 2, NS),
        ("unipc", {}, 3, NS),  # UniP-2 + UniC: order p + 1 = 3 (Zhao et al., Thm 3.3)
        ("plms", {}, 2, NS),  # fixed AB weights on a grid not uniform in sigma/alpha: order 2
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_ode_solver_orders_on_the_gaussian_oracle(smooth_process, name, options, order, ns):
    errors = _log_snr_errors(name, smooth_process, ns, **options)
    slope = metrics.convergence_order(ns, errors)
    assert abs(slope - order) <= 0.15, f"{name}: slope {slope:.3f}, errors {errors}"


def test_dpmpp_3m_is_third_order_until_its_start_shows():
    """3M starts with a first-order step (as the reference codes do): its local error
    alpha_{t_1} h^2 D'/2 enters the global error once, O(h^2), beside the O(h^3) of the body.
    On VP, alpha(0.99) = 0.007 keeps that term below the third-order one up to 1024 steps, so the
    order 3 is measured there.  On VE (alpha = 1) it takes over from ~100 steps, on VP-cosine
    (alpha = 0.024) from ~300 and on Linear (0.01) from ~1000, the two terms partly cancelling
    in between, so no clean slope exists there.  What holds everywhere is that 3M beats 2M by
    about 1/h at the same NFE: at 128 steps, h = 6/128 ~ 0.05, so by 20x at least."""
    ns = (64, 128, 256, 512)
    errors = _log_snr_errors("dpmpp_3m", processes.VP(), ns)
    assert abs(metrics.convergence_order(ns, errors) - 3) <= 0.15, errors
    for process in (processes.VE(), processes.VPCosine(), processes.Linear()):
        (err_3m,) = _log_snr_errors("dpmpp_3m", process, (128,))
        (err_2m,) = _log_snr_errors("dpmpp_2m", process, (128,))
        assert err_3m <= err_2m / 20, (process, err_3m, err_2m)


def test_plms_is_higher_order_on_a_grid_uniform_in_the_noise_level():
    """On equal steps of sigma/alpha (Karras grid with rho = 1) the Adams-Bashforth weights are
    exact: order 3 at least (the AB4 body is 4, the second-order start adds an O(h^3) term)."""
    g = _gaussian()
    for process in (processes.VE(), processes.Linear()):
        x = g.marginal(0.6, process).sample(64, generator=torch.Generator().manual_seed(0))
        exact = g.pf_ode_map(x, 0.6, T_MIN, process)
        ns, errors = (64, 128, 256), []
        for n in ns:
            ts = samplers.time_grid(process, n, kind="karras", rho=1.0, t_min=T_MIN, t_max=0.6)
            errors.append(
                float((samplers.plms(g.denoiser(process), x, ts, process) - exact).abs().max())
            )
        assert metrics.convergence_order(ns, errors) >= 3 - 0.15, (process, errors)


# -- identities -------------------------------------------------------------------------------
def test_ddim_is_dpm_solver_1_is_the_exponential_euler_step(process):
    """From t = 1 to t = 0: the end steps have an infinite log-SNR step for VP and Linear."""
    g = _gaussian()
    x = g.marginal(1.0, process).sample(16, generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(process, 12, kind="uniform", t_min=0.0, t_max=1.0)
    model = g.denoiser(process)
    expected = x
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        # x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D(x_t, t), h = lam_s - lam_t
        h = process.lam(s) - process.lam(t)
        ratio = process.sigma(s) / process.sigma(t)
        expected = ratio * expected + process.alpha(s) * (1 - torch.exp(-h)) * model(expected, t)
    ddim = samplers.ddim(model, x, ts, process, eta=0.0)
    dpm1 = samplers.dpm_solver_1(model, x, ts, process)
    torch.testing.assert_close(ddim, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpm1, expected, rtol=1e-12, atol=1e-12)


def test_ddim_is_euler_in_edm_variables(process):
    """Euler's method on EDM's ODE dx^/dsigma^ = (x^ - D)/sigma^, in x^ = x/alpha and
    sigma^ = sigma/alpha (the Euler sampler of EDM and k-diffusion), is DDIM step by step."""
    g = _gaussian()
    x = g.marginal(0.9, process).sample(16, generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(process, 12, kind="uniform", t_min=1e-2, t_max=0.9)
    model = g.denoiser(process)
    a, s = process.alpha(ts), process.sigma(ts)
    level = s / a
    x_hat = x / a[0]
    for i in range(len(ts) - 1):
        d = model(a[i] * x_hat, ts[i])
        x_hat = x_hat + (level[i + 1] - level[i]) * (x_hat - d) / level[i]
    ddim = samplers.ddim(model, x, ts, process, eta=0.0)
    torch.testing.assert_close(ddim, a[-1] * x_hat, rtol=1e-12, atol=1e-12)


EXPONENTIAL = ("ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m")


@pytest.mark.parametrize("name", [*EXPONENTIAL, "unipc", "plms"])
def test_exponential_integrators_are_exact_on_a_point_mass(process, name):
    """Data at one point m: D = m for every x and t, and the PF-ODE path is the forward noising
    x_t = alpha_t m + sigma_t eps with eps = (x_0 - alpha_0 m) / sigma_0 fixed.  A solver that
    integrates the linear part exactly and only approximates the integral of D makes no error,
    whatever its steps; PLMS, which combines noise predictions, sees the constant eps."""
    m = torch.tensor([0.7, -1.2], dtype=torch.float64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = samplers.time_grid(process, 7, kind="uniform", t_min=1e-3, t_max=0.9)
    out = samplers.SAMPLERS[name](lambda y, t: m.expand_as(y), x, ts, process)
    a, s = process.alpha(ts), process.sigma(ts)
    expected = a[-1] * m + s[-1] * (x - a[0] * m) / s[0]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("process_name", ["vp", "vp_cosine"])
def test_steps_in_t_are_exact_on_the_stationary_law_of_vp(name, process_name):
    """On N(0, I) data, under VP, D = alpha x and the PF-ODE velocity
    (sigma'/sigma) x + alpha lam' D = -(sigma'/sigma)(alpha^2 + sigma^2 - 1) x vanishes: the
    paths stand still, and Euler's and Heun's steps in t are exact.  DDIM is not: its step is
    (sigma_s sigma_t + alpha_s alpha_t) x = cos(theta_t - theta_s) x, theta = atan(sigma/alpha),
    so it shrinks x by prod cos(dtheta).  Euler leaves no error to beat here, which is why
    "2M is ten times as accurate as Euler" depends on the data's scale."""
    process = PROCESSES[process_name]
    gaussian = analytic.Gaussian(torch.zeros(2), torch.eye(2))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = samplers.time_grid(process, 7, kind="logsnr", t_min=1e-3, t_max=1.0)
    model = gaussian.denoiser(process)
    torch.testing.assert_close(gaussian.pf_ode_map(x, ts[0], ts[-1], process), x)
    out = samplers.SAMPLERS[name](model, x, ts, process)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    theta = torch.atan2(process.sigma(ts), process.alpha(ts))
    shrink = torch.prod(torch.cos(theta[:-1] - theta[1:]))
    ddim = samplers.ddim(model, x, ts, process)
    torch.testing.assert_close(ddim, shrink * x, rtol=1e-12, atol=1e-12)
    # log cos is concave, so over a turn of theta_0 - theta_7 (nearly pi/2) the product is
    # largest for equal steps: DDIM loses at least 1 - cos(turn / 7)^7, some 16% of |x|
    turn = float(theta[0] - theta[-1])
    assert float(shrink) <= math.cos(turn / 7) ** 7 < 0.85, (float(shrink), turn)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_steps_in_t_are_exact_on_a_point_mass_under_linear(name):
    """Under Linear (alpha = 1 - t, sigma = t) the paths of a point mass m are straight lines
    x_t = (1 - t) m + t eps, run at the constant speed (x - m)/t = eps - m."""
    process = PROCESSES["linear"]
    m = torch.tensor([0.7, -1.2], dtype=torch.float64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = samplers.time_grid(process, 7, kind="uniform", t_min=1e-3, t_max=1.0)
    out = samplers.SAMPLERS[name](lambda y, t: m.expand_as(y), x, ts, process)
    torch.testing.assert_close(out, m + ts[-1] * (x - m), rtol=1e-12, atol=1e-12)


def _replay(noises):
    """A noise_sampler that hands out the given tensors in order."""
    it = iter(noises)
    return lambda i, shape: next(it)


def test_ddim_with_eta_one_is_ddpm_sample_by_sample(process):
    g = _gaussian()
    gen = torch.Generator().manual_seed(1)
    x = g.marginal(1.0, process).sample(16, generator=gen)
    ts = samplers.time_grid(process, 10, kind="uniform", t_min=0.0, t_max=1.0)
    noises = [torch.randn(16, 2, generator=gen) for _ in range(10)]  # one draw per step
    ddpm = samplers.ddpm(g.denoiser(process), x, ts, process, noise_sampler=_replay(noises))
    ddim = samplers.ddim(
        g.denoiser(process), x, ts, process, eta=1.0, noise_sampler=_replay(noises)
    )
    torch.testing.assert_close(ddim, ddpm, rtol=1e-12, atol=1e-12)


def test_heun_churn_is_exact_forward_noising_then_heun():
    """EDM Alg. 2, lines 5-6, for VE where sigma/alpha = sigma: the model first sees
    x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z at sigma_hat = (1 + gamma) sigma."""
    ve = processes.VE(sigma_min=0.002, sigma_max=80.0)
    ts = samplers.time_grid(ve, 4, kind="karras", t_min=0.0, t_max=1.0)
    x, z = torch.randn(5, 2) * 80, torch.randn(5, 2)
    seen = []

    def model(x, t):
        seen.append((x.clone(), float(t)))
        return torch.zeros_like(x)

    s_churn, s_noise = 1.2, 1.007
    samplers.heun(
        model, x, ts, ve, s_churn=s_churn, s_noise=s_noise, noise_sampler=lambda i, shape: z
    )
    gamma = min(s_churn / 4, math.sqrt(2) - 1)
    sigma = float(ve.sigma(ts[0]))
    sigma_hat = (1 + gamma) * sigma
    x_hat, t_hat = seen[0]
    assert math.isclose(float(ve.sigma(torch.tensor(t_hat))), min(sigma_hat, 80.0), rel_tol=1e-12)
    sigma_hat = float(ve.sigma(torch.tensor(t_hat)))  # capped at t = 1 (sigma_max)
    torch.testing.assert_close(x_hat, x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * z)
    # the second step starts below sigma_max: no cap
    sigma1 = float(ve.sigma(ts[1]))
    assert math.isclose(
        float(ve.sigma(torch.tensor(seen[2][1]))), (1 + gamma) * sigma1, rel_tol=1e-10
    )


def test_heun_churn_gated_off_is_plain_heun():
    g = _gaussian()
    vp = processes.VP()
    x = vp.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(vp, 10, kind="logsnr")
    plain = samplers.heun(g.denoiser(vp), x, ts, vp)
    # noise levels sigma/alpha on this grid lie in [0.03, 150]: s_tmax = 0.01 excludes them all
    gated = samplers.heun(g.denoiser(vp), x, ts, vp, s_churn=10.0, s_tmax=0.01)
    torch.testing.assert_close(gated, plain, rtol=0, atol=0)


# -- every sampler: the grid, t_min, callback, denoise_last, NFE -----------------------------
@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_reaches_t_zero_or_says_why(process, name):
    """ts from 1 to 0: infinite log-SNR steps at both ends for VP and Linear."""
    g = _gaussian()
    x = g.marginal(1.0, process).sample(8, generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(process, 20, kind="uniform", t_min=0.0, t_max=1.0)
    run = samplers.SAMPLERS[name]
    if name in NEED_ALPHA and isinstance(process, processes.Linear):
        with pytest.raises(ValueError, match=r"alpha > 0|finite SDE drift"):
            run(g.denoiser(process), x, ts, process, **_with_noise(name))
    elif name == "annealed_langevin" and float(process.sigma(ts[-1])) == 0:
        with pytest.raises(ValueError, match=r"sigma > 0 at the last level"):
            run(g.denoiser(process), x, ts, process, **_with_noise(name))
    else:
        out = run(g.denoiser(process), x, ts, process, **_with_noise(name))
        assert out.shape == x.shape and bool(torch.isfinite(out).all()), name


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_t_min_callback_and_denoise_last(name):
    """The sampler returns the state at ts[-1] (the callback's last time, exactly), and
    denoise_last=True returns D(that state, ts[-1]) with the same noise."""
    vp = processes.VP()
    g = _gaussian()
    x = vp.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(vp, 6, kind="logsnr", t_min=0.05)
    trace = samplers.Trace()
    out = samplers.SAMPLERS[name](g.denoiser(vp), x, ts, vp, callback=trace, **_with_noise(name))
    assert [step.i for step in trace.steps] == list(range(6))
    assert trace.ts.tolist() == ts[1:].tolist() and float(trace.ts[-1]) == 0.05
    torch.testing.assert_close(trace.xs[-1], out, rtol=0, atol=0)
    assert trace.denoised.shape == (6, 8, 2)  # every step reports its estimate of x0
    trace = samplers.Trace()
    denoised = samplers.SAMPLERS[name](
        g.denoiser(vp), x, ts, vp, denoise_last=True, callback=trace, **_with_noise(name)
    )
    torch.testing.assert_close(denoised, g.denoise(out, ts[-1], vp), rtol=1e-13, atol=1e-13)
    last = trace.steps[-1]  # the final denoise is one more step, with the returned value
    assert last.i == 6 and last.x is denoised and last.denoised is denoised


# annealed_langevin scales its steps by the last level, unipc skips the corrector on its last
# step, and evodiff does both (its balance weighs the noise level against the grid's ends, and
# its last step has no probe): for them a run on a shortened grid is not the start of the full run
@pytest.mark.parametrize(
    "name", [n for n in samplers.SAMPLERS if n not in ("annealed_langevin", "unipc", "evodiff")]
)
def test_callback_states_are_the_runs_on_shortened_grids(name):
    vp = processes.VP()
    g = _gaussian()
    x = vp.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(vp, 6, kind="logsnr", t_min=0.05)
    seen = []
    samplers.SAMPLERS[name](
        g.denoiser(vp), x, ts, vp, callback=lambda step: seen.append(step.x), **_with_noise(name)
    )
    short = samplers.SAMPLERS[name](g.denoiser(vp), x, ts[:4], vp, **_with_noise(name))
    torch.testing.assert_close(seen[2], short, rtol=1e-13, atol=1e-13)


OPTIONS = {
    "ddim": {"eta": 0.5},
    "heun": {"s_churn": 2.0},
    "pc": {"n_corrector": 2},
    "annealed_langevin": {"eps": 1e-3, "n_steps_each": 3},
}


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_model_calls_are_counted(name):
    vp = processes.VP()
    g = _gaussian()
    calls = []

    def model(x, t):
        calls.append(float(t))
        return g.denoise(x, t, vp)

    ts = samplers.time_grid(vp, 7, kind="logsnr", t_min=0.05, t_max=0.99)
    x = vp.prior_sample((4, 2), t=0.99, generator=torch.Generator().manual_seed(0))
    options = {**OPTIONS.get(name, {}), "denoise_last": True}
    trace = samplers.Trace()
    samplers.SAMPLERS[name](model, x, ts, vp, callback=trace, **_with_noise(name, **options))
    assert len(calls) == samplers.model_calls(name, 7, **options) == trace.nfe


def test_registry_and_signature():
    """SAMPLERS holds each sampler with its facts; the function's own keyword options are
    exactly the options the registry lists (the engine's options pass through ``**run``)."""
    assert set(samplers.SAMPLERS) == {
        "euler", "heun", "ddpm", "ddim", "euler_maruyama", "pc", "annealed_langevin",
        "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "plms",
        "evodiff", "lml", "bdia",
    }  # fmt: skip
    for name, sampler in samplers.SAMPLERS.items():
        assert isinstance(sampler, samplers.Sampler) and sampler.name == name
        params = inspect.signature(sampler.fn).parameters
        assert list(params)[:4] == ["model", "x", "ts", "process"], name
        own = [p for p in list(params)[4:] if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
        assert set(own) == set(sampler.options), name
        assert params[list(params)[-1]].kind is inspect.Parameter.VAR_KEYWORD, name
        assert sampler.fn.__doc__ and "Shapes" in sampler.fn.__doc__, name
        assert (sampler.is_stochastic(**OPTIONS.get(name, {}))) == (name in NOISY), name
        assert sampler.order in (None, 1, 2, 3), name
    assert not samplers.SAMPLERS["ddim"].is_stochastic() and samplers.SAMPLERS["ddpm"].stochastic


def test_model_calls_refuses_options_the_sampler_does_not_take():
    with pytest.raises(TypeError, match=r"euler takes the options \(\), got \['eta'\]"):
        samplers.model_calls("euler", 4, eta=0.5)
    with pytest.raises(ValueError, match=r"n_corrector must be an integer >= 0"):
        samplers.model_calls("pc", 4, n_corrector=-1)
    with pytest.raises(ValueError, match=r"n_steps must be an integer below 2\*\*31"):
        samplers.model_calls("euler", 10**30)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_samplers_follow_the_input_dtype(name):
    vp = processes.VP()
    g = _gaussian()
    x = torch.randn(4, 2, dtype=torch.float32)
    out = samplers.SAMPLERS[name](
        g.denoiser(vp), x, samplers.time_grid(vp, 5), vp, **_with_noise(name)
    )
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("ddim", {"eta": -0.1}, r"eta must be in \[0, 1\], got eta = -0.1"),
        ("ddim", {"eta": 1.5}, r"eta must be in \[0, 1\], got eta = 1.5"),
        ("pc", {"snr": 0.0}, r"snr must be positive and finite, got snr = 0.0"),
        ("pc", {"snr": -1}, r"snr must be positive and finite, got snr = -1"),
        ("pc", {"n_corrector": -1}, r"n_corrector must be an integer >= 0, got n_corrector = -1"),
        ("pc", {"n_corrector": 1.5}, r"n_corrector must be an integer >= 0, got n_corrector = 1.5"),
        ("annealed_langevin", {"eps": 0.0}, r"eps must be positive and finite, got eps = 0.0"),
        (
            "annealed_langevin",
            {"eps": 1.0},
            r"eps must be < 4 \(sigma/alpha\)\^2 = .*, got eps = 1.0",
        ),
        ("annealed_langevin", {"n_steps_each": 0}, r"got n_steps_each = 0"),
        ("heun", {"s_churn": -1.0}, r"s_churn must be finite and >= 0, got s_churn = -1.0"),
        ("heun", {"s_noise": float("nan")}, r"got s_noise = nan"),
        (
            "heun",
            {"s_tmin": 2.0, "s_tmax": 1.0},
            r"s_tmax must be >= s_tmin = 2.0, got s_tmax = 1.0",
        ),
    ],
)
def test_bad_options_are_refused(name, options, message):
    vp = processes.VP()
    ts = samplers.time_grid(vp, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        samplers.SAMPLERS[name](lambda x, t: x, torch.zeros(2, 2), ts, vp, **options)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_refuses_a_grid_that_does_not_decrease(name):
    vp = processes.VP()
    with pytest.raises(ValueError, match=r"ts must decrease strictly, got ts\[1\] = 0.5"):
        samplers.SAMPLERS[name](
            lambda x, t: x, torch.zeros(1, 2), torch.tensor([0.9, 0.5, 0.7]), vp
        )


def test_bad_schedules_for_a_sampler_are_refused():
    lin, vp = processes.Linear(), processes.VP()
    ts = samplers.time_grid(lin, 4)  # from t = 1, where alpha = 0
    with pytest.raises(ValueError, match=r"plms needs alpha > 0 .* alpha\(ts\[0\]\) = 0"):
        samplers.plms(lambda x, t: x, torch.zeros(1, 2), ts, lin)
    with pytest.raises(ValueError, match=r"annealed_langevin needs alpha > 0"):
        samplers.annealed_langevin(lambda x, t: x, torch.zeros(1, 2), ts, lin)
    with pytest.raises(ValueError, match=r"finite SDE drift .* f = -inf.* at ts\[0\] = 1"):
        samplers.euler_maruyama(lambda x, t: x, torch.zeros(1, 2), ts, lin)
    with pytest.raises(ValueError, match=r"sigma\(ts\[-1\]\) = 0 at ts\[-1\] = 0"):
        samplers.annealed_langevin(
            lambda x, t: x, torch.zeros(1, 2), samplers.time_grid(vp, 4, t_min=0.0), vp
        )
    with pytest.raises(ValueError, match=r"name must be one of .* got name = 'dpm'"):
        samplers.model_calls("dpm", 4)
    with pytest.raises(ValueError, match=r"n_steps must be an integer >= 1, got n_steps = 0"):
        samplers.model_calls("euler", 0)


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
