"""The mean-reverting SDE, MRS and the Brownian bridges of ``diffcore.bridges``, against exact
answers and against the monograph's samplers run on the shifted variable.

Identities hold to float64 round-off (``TOL``); each is also run with one coefficient wrong (a
schedule parameter 1% off, a factor dropped), and the error is then above ``WRONG``, far
above round-off.  Orders are fitted by ``metrics.convergence_order`` on the exact Gaussian
flow map (paths) or by the exact W2 of ``residual.output_law`` (laws), within 0.15 of the
claim.  Monte-Carlo checks state their bound where they make it.
"""

import math

import pytest
import torch

from diffcore import analytic, bridges, metrics, processes, residual, samplers
from diffcore.stepping import Trace

from ._moments import assert_gaussian_moments

TOL = 1e-12
WRONG = 1e-6


def _mr(theta_max=7.0):
    return bridges.MeanReverting(theta_min=1.0, theta_max=theta_max, sigma_inf=0.5)


def _bridge(beta_max=1.0, beta_min=0.1):
    return bridges.BrownianBridge(beta_min, beta_max)


def _pair():
    """x0 ~ N(m, C), x1 = A x0 + 0.3 n: a degraded copy, jointly Gaussian with x0."""
    prior = analytic.Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.6], [0.6, 0.5]]))
    return residual.GaussianPair.from_degradation(prior, [[0.8, 0.3], [-0.2, 0.5]], 0.3)


def _x1():
    return torch.tensor([0.4, -0.2])


def _start(process, t, n=64, seed=0):
    """n exact draws of x_t given x1 = _x1()."""
    mean, cov = _pair().marginal(_x1(), t, process)
    return analytic.Gaussian(mean, cov).sample(n, generator=torch.Generator().manual_seed(seed))


def _on_u(process):
    """The standard denoiser of u = x - kappa_t x1 (analytic.Gaussian's, for p(x0 | x1))."""
    return _pair().conditional(_x1()).denoiser(process)


def _fixed_noise(n, steps, seed=10):
    zs = [
        torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + i)) for i in range(steps)
    ]
    return lambda i, shape: zs[i]


def _err(a, b):
    return float((a - b).abs().max())


def _shift(process, t):
    return float(process.shift(torch.tensor(float(t))))


# -- the mean-reverting SDE ----------------------------------------------------------------
def test_mean_reverting_marginal_solves_the_moment_equations():
    """x_t = mu + alpha_t (x0 - mu) + sigma_t eps solves dx = theta (mu - x) dt + g dw iff
    alpha' = -theta alpha and (sigma^2)' = -2 theta sigma^2 + g^2 with g^2 = 2 sigma_inf^2 theta:
    autograd on the closed forms.  With g^2 = sigma_inf^2 theta (the factor 2 dropped) the
    variance equation is off by O(1).  The generic Process.f and Process.g2 (from alpha, sigma
    and their derivatives) are -theta and g^2; t_of_lam inverts lam."""
    mr = _mr()
    t = torch.linspace(0.02, 1.0, 50).requires_grad_(True)
    d_alpha = torch.autograd.grad(mr.alpha(t).sum(), t)[0]
    d_sigma = torch.autograd.grad(mr.sigma(t).sum(), t)[0]
    d_var = torch.autograd.grad((mr.sigma(t) ** 2).sum(), t)[0]
    t = t.detach()
    theta, var = mr.theta(t), mr.sigma(t) ** 2
    assert _err(d_alpha, -theta * mr.alpha(t)) < TOL
    assert _err(d_var, -2 * theta * var + mr.g2(t)) < TOL
    assert _err(d_var, -2 * theta * var + mr.sigma_inf**2 * theta) > 1e-2
    assert _err(d_alpha, mr.d_alpha(t)) < TOL and _err(d_sigma, mr.d_sigma(t)) < TOL
    assert _err(processes.Process.g2(mr, t), mr.g2(t)) < TOL
    assert _err(mr.f(t), -theta) < TOL
    assert _err(mr.t_of_lam(mr.lam(t)), t) < TOL


MRS_IDENTITIES = {
    # name: (MRS sampler and options, the monograph's sampler on u, number of steps)
    "ode_data_1": (bridges.mrs_ode_data, {"order": 1}, samplers.dpm_solver_1, 10),
    "ode_data_2m": (bridges.mrs_ode_data, {"order": 2, "taylor": False}, samplers.dpmpp_2m, 10),
    "ode_data_taylor": (bridges.mrs_ode_data, {"order": 2}, samplers.dpmpp_3m, 2),
    "ode_noise_1": (bridges.mrs_ode_noise, {"order": 1}, samplers.dpm_solver_1, 10),
    "sde_data_1": (bridges.mrs_sde_data, {"order": 1}, samplers.ddpm, 10),
}


@pytest.mark.parametrize("name", list(MRS_IDENTITIES))
def test_mrs_is_dpm_solver_on_the_shifted_variable(name):
    """Written on u = x - mu, MRS is the monograph's sampler of the process (alpha_t, sigma_t):
    data prediction at order 1 is DPM-Solver-1, at order 2 with DPM-Solver++(2M)'s weight
    dpmpp_2m, with the Taylor weight phi_2 the second step of dpmpp_3m; noise prediction at
    order 1 is DPM-Solver-1 too; the SDE in data prediction at order 1 is DDPM (same noise).
    With theta_max 1% off in the reference process, the runs differ by more than WRONG."""
    mrs, options, reference, steps = MRS_IDENTITIES[name]
    mr, mu, denoiser_u = _mr(), _x1(), _on_u(_mr())
    x = _start(mr, 1.0)
    ts = samplers.time_grid(mr, steps, kind="logsnr", t_min=1e-2, t_max=1.0)

    def model(x, t, mu):
        return denoiser_u(x - mu, t) + mu

    noise = _fixed_noise(64, steps)
    out = mrs(model, x, ts, mr, y=mu, noise_sampler=noise, **options)
    ref = reference(denoiser_u, x - mu, ts, mr, noise_sampler=noise) + mu
    wrong = reference(denoiser_u, x - mu, ts, _mr(theta_max=7.07), noise_sampler=noise) + mu
    assert _err(out, ref) < TOL
    assert _err(out, wrong) > WRONG


@pytest.mark.parametrize(
    "mrs,order",
    [
        (bridges.mrs_ode_data, 1),
        (bridges.mrs_ode_data, 2),
        (bridges.mrs_ode_noise, 1),
        (bridges.mrs_ode_noise, 2),
    ],
)
def test_mrs_ode_converges_at_its_order_on_the_exact_flow(mrs, order):
    """The max error at t = 0.01 against GaussianPair.flow_map, on log-SNR grids of 16 to 128
    steps from t = 1 (measured slopes 0.98, 1.94, 0.98, 1.97)."""
    mr, pair, x1 = _mr(), _pair(), _x1()
    x = _start(mr, 1.0)
    exact = pair.flow_map(x, x1, 1.0, 1e-2, mr)
    ns, errors = (16, 32, 64, 128), []
    for n in ns:
        ts = samplers.time_grid(mr, n, kind="logsnr", t_min=1e-2, t_max=1.0)
        errors.append(_err(mrs(pair.denoiser(mr), x, ts, mr, y=x1, order=order), exact))
    assert abs(metrics.convergence_order(ns, errors) - order) <= 0.15, errors


@pytest.mark.parametrize(
    "mrs,order",
    [
        (bridges.mrs_sde_data, 1),
        (bridges.mrs_sde_data, 2),
        (bridges.mrs_sde_noise, 1),
        (bridges.mrs_sde_noise, 2),
    ],
)
def test_mrs_sde_converges_in_law_at_its_order(mrs, order):
    """The exact W2 between the output law (output_law, from the exact x_1 | x1) and the exact
    x_{0.05} | x1, on log-SNR grids of 40 to 320 steps (measured slopes 0.98, 1.92, 1.05,
    1.94)."""
    mr, pair, x1 = _mr(), _pair(), _x1()
    target = pair.marginal(x1, 0.05, mr)
    ns, w2 = (40, 80, 160, 320), []
    for n in ns:
        ts = samplers.time_grid(mr, n, kind="logsnr", t_min=0.05, t_max=1.0)
        law = residual.output_law(mrs, pair, x1, ts, mr, order=order)
        w2.append(float(metrics.gaussian_w2(*law, *target)))
    assert abs(metrics.convergence_order(ns, w2) - order) <= 0.15, w2


@pytest.mark.parametrize(
    "mrs,order",
    [
        (bridges.mrs_ode_data, 1),
        (bridges.mrs_ode_data, 2),
        (bridges.mrs_ode_noise, 1),
        (bridges.mrs_ode_noise, 2),
    ],
)
def test_mrs_ode_is_exact_on_a_point_mass(mrs, order):
    """The semi-analytic solution integrates the linear part exactly; for data at one point c
    the denoiser is c and the implied noise is constant along the PF-ODE, so 4 coarse steps
    land on the exact path mu + alpha_s (c - mu) + sigma_s eps_t.  The same steps under a
    process with theta_max 1% off miss it."""
    mr, mu, c = _mr(), _x1(), torch.tensor([1.5, -1.0])
    x = _start(mr, 0.9)
    ts = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.02])
    t, s = ts[0], ts[-1]
    eps = (x - mu - mr.alpha(t) * (c - mu)) / mr.sigma(t)
    exact = mu + mr.alpha(s) * (c - mu) + mr.sigma(s) * eps

    def point(x, t, mu):
        return c.expand_as(x)

    assert _err(mrs(point, x, ts, mr, y=mu, order=order), exact) < TOL
    assert _err(mrs(point, x, ts, _mr(theta_max=7.07), y=mu, order=order), exact) > WRONG


def test_mrs_sde_data_step_is_ir_sde_posterior():
    """For data at one point c, one step of the data-prediction SDE solver is a draw of
    IR-SDE's posterior q(x_s | x_t, x0 = c) (IRSDE.reverse_optimum_step and _std, with
    A = alpha_t / alpha_s, B = alpha_t, C = alpha_s): mean mu + A (1 - C^2)/(1 - B^2) (x_t -
    mu) + C (1 - A^2)/(1 - B^2) (c - mu), std sigma_inf sqrt((1 - A^2)(1 - C^2)/(1 - B^2)).
    The noise-prediction SDE solver freezes the implied noise instead, which varies along the
    reverse SDE: its step misses the posterior."""
    mr, mu, c = _mr(), _x1(), torch.tensor([1.5, -1.0])
    x, ts = _start(mr, 0.7), torch.tensor([0.7, 0.4])
    a_t, a_s = float(mr.alpha(ts[0])), float(mr.alpha(ts[1]))
    big_a, big_b, big_c = a_t / a_s, a_t, a_s
    mean = mu + big_a * (1 - big_c**2) / (1 - big_b**2) * (x - mu)
    mean = mean + big_c * (1 - big_a**2) / (1 - big_b**2) * (c - mu)
    std = mr.sigma_inf * math.sqrt((1 - big_a**2) * (1 - big_c**2) / (1 - big_b**2))

    def point(x, t, mu):
        return c.expand_as(x)

    def step(mrs, z):
        return mrs(point, x, ts, mr, y=mu, order=1, noise_sampler=lambda i, shape: z)

    zero, one = torch.zeros(64, 2), torch.ones(64, 2)
    assert _err(step(bridges.mrs_sde_data, zero), mean) < TOL
    assert _err(step(bridges.mrs_sde_data, one) - step(bridges.mrs_sde_data, zero), std) < TOL
    assert _err(step(bridges.mrs_sde_noise, zero), mean) > WRONG


def test_mr_targets_convert_exactly():
    """eps, x0 and v = sigma_inf alpha eps - s (x0 - mu) (s = sigma / sigma_inf) of one draw
    convert into each other exactly.  Salimans & Ho's v of x - mu itself, alpha eps - sigma
    (x0 - mu), is not the code's v when sigma_inf != 1."""
    mr, mu = _mr(), _x1()
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(32, 2, generator=gen), torch.randn(32, 2, generator=gen)
    t = torch.rand(32, generator=gen) * 0.9 + 0.05
    a, s = mr.alpha(t)[:, None], mr.sigma(t)[:, None]
    x = mr.pair_marginal(x0, mu.expand(32, 2), t, eps)
    truth = {"eps": eps, "x0": x0, "v": mr.sigma_inf * a * eps - s / mr.sigma_inf * (x0 - mu)}
    for source in bridges.MR_TARGETS:
        for target in bridges.MR_TARGETS:
            got = bridges.mr_convert(truth[source], source, target, x, t, mr, mu)
            assert _err(got, truth[target]) < TOL, (source, target)
    salimans = a * eps - s * (x0 - mu)
    assert _err(bridges.mr_convert(salimans, "v", "x0", x, t, mr, mu), x0) > WRONG


# -- the losses -------------------------------------------------------------------------
def _posterior_spread(process, t):
    """Eigenvalues of Cov[x0 | x_t, x1] for the test pair: l sigma^2 / (alpha^2 l + sigma^2)."""
    evals = torch.linalg.eigvalsh(_pair().conditional_cov)
    a, s = float(process.alpha(torch.tensor(t))), float(process.sigma(torch.tensor(t)))
    return evals * s**2 / (a**2 * evals + s**2)


def _exact_target(kind, process, target):
    """The exact minimiser of the loss for ``target``, converted from the exact denoiser."""
    denoise = _pair().denoiser(process)
    if kind == "mr":
        return lambda x, t, x1: bridges.mr_convert(
            denoise(x, t, x1), "x0", target, x, t, process, x1
        )
    if target == "x0":
        return denoise
    return lambda x, t, x1: (x - denoise(x, t, x1)) / process.forward_var(t)[:, None].sqrt()


LOSSES = [("mr", "eps"), ("mr", "x0"), ("mr", "v"), ("bridge", "x0"), ("bridge", "i2sb")]


@pytest.mark.parametrize("kind,target", LOSSES)
def test_loss_at_the_exact_model_has_its_exact_value(kind, target):
    """At t = 0.4 the exact model's error is c (x0 - E[x0 | x_t, x1]) with c = 1 (x0),
    alpha/sigma (eps), sigma_inf/sigma (v), 1/sigma_fwd (i2sb), a Gaussian N(0, c^2 P) free of
    (x_t, x1), P = Cov[x0 | x_t, x1].  So the per-sample loss has mean c^2 tr P and variance
    2 c^4 tr P^2, and the batch mean of n = 20,000 lies within 5 standard errors of c^2 tr P.
    The exact model with x1 replaced by 0 (the condition dropped) is many standard errors
    off."""
    process = _mr() if kind == "mr" else _bridge()
    loss = bridges.mr_loss if kind == "mr" else bridges.bridge_loss
    t = 0.4
    a, s = float(process.alpha(torch.tensor(t))), float(process.sigma(torch.tensor(t)))
    c = {
        "x0": 1.0,
        "eps": a / s,
        "v": getattr(process, "sigma_inf", 1.0) / s,
        "i2sb": 1 / math.sqrt(float(_bridge().forward_var(t))),
    }[target]
    spread = _posterior_spread(process, t)
    mean, sd = c**2 * float(spread.sum()), c**2 * math.sqrt(2 * float((spread**2).sum()))
    n = 20_000
    x0, x1 = _pair().sample(n, generator=torch.Generator().manual_seed(5))

    def at(time):
        return lambda n, generator: torch.full((n,), time)

    exact = _exact_target(kind, process, target)
    value = loss(exact, x0, x1, process, target, at(t), torch.Generator().manual_seed(6))
    assert abs(float(value) - mean) < 5 * sd / math.sqrt(n), (float(value), mean)

    def blind(x, time, x1):
        return exact(x, time, torch.zeros_like(x1))

    value = loss(blind, x0, x1, process, target, at(t), torch.Generator().manual_seed(6))
    assert float(value) - mean > 20 * sd / math.sqrt(n), (float(value), mean)


def test_denoisers_of_trained_targets():
    """mr_denoiser and bridge_denoiser turn each exact target back into the exact denoiser."""
    x, x1, t = _start(_bridge(), 0.6), _x1(), torch.full((64,), 0.6)
    for kind, target in LOSSES:
        process = _mr() if kind == "mr" else _bridge()
        wrap = bridges.mr_denoiser if kind == "mr" else bridges.bridge_denoiser
        got = wrap(_exact_target(kind, process, target), target, process)(x, t, x1)
        assert _err(got, _pair().denoise(x, t, x1, process)) < TOL, (kind, target)


# -- the Brownian bridge -----------------------------------------------------------------
def test_bridge_is_a_shifted_linear_sde_with_a_consistent_posterior():
    """u = x - kappa_t x1 has f = -beta / bar sigma^2 and g^2 = beta (on x: Doob's drift
    beta (x1 - x) / bar sigma^2), from the generic Process formulas; t_of_lam inverts lam.
    The posterior q(x_s | x_t, x0) of the marginal q(x_t | x0, x1) is q(x_s | x0, x1): its
    mean coefficients and variance compose exactly, and do not with a posterior whose
    schedule has beta_max 1% off."""
    br = _bridge()
    t = torch.linspace(0.02, 0.98, 49)
    assert _err(processes.Process.g2(br, t), br.beta(t)) < TOL
    assert _err(br.f(t), -br.beta(t) / br.backward_var(t)) < TOL
    assert _err(br.t_of_lam(br.lam(t)), t) < TOL

    def composed(posterior_bridge):
        x0, x1 = torch.eye(2)  # the coefficients of x0 and x1, read off two unit vectors
        rows = []
        for t, s in ((0.9, 0.5), (0.5, 0.2), (1.0, 0.3)):
            a, k, c = (float(f(torch.tensor(t))) for f in (br.alpha, br.shift, br.sigma))
            x_t = a * x0 + k * x1  # the mean of x_t; its noise is c
            mean, std = posterior_bridge.posterior(x_t[None], x0[None], t, s)
            ratio = float(posterior_bridge.forward_var(s) / posterior_bridge.forward_var(t))
            var = ratio**2 * c**2 + std**2
            want = torch.tensor([float(br.alpha(s)), float(br.shift(s)), float(br.sigma(s)) ** 2])
            rows.append(torch.stack([mean[0, 0], mean[0, 1], torch.tensor(var)]) - want)
        return float(torch.stack(rows).abs().max())

    assert composed(br) < TOL
    assert composed(_bridge(beta_max=1.01)) > WRONG


def test_gaussian_pair_exact_laws_are_analytics():
    """For x1 = A x0 + sigma_y n, p(x0 | x1) is analytic.Gaussian.posterior; the exact
    E[x0 | x_t, x1] and the exact PF-ODE flow are analytic.Gaussian's denoiser and pf_ode_map
    of p(x0 | x1) on u = x - kappa_t x1, under the bridge and under the MR process; at the
    bridge's t = 1 the denoiser is E[x0 | x1].  A posterior with sigma_y 1% off differs."""
    pair, x1 = _pair(), _x1()
    prior = analytic.Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.6], [0.6, 0.5]]))
    a = torch.tensor([[0.8, 0.3], [-0.2, 0.5]])
    law = prior.posterior(a, x1, 0.3)
    assert _err(pair.conditional(x1).mean, law.mean) < TOL
    assert _err(pair.conditional_cov, law.cov) < TOL
    assert _err(pair.conditional_cov, prior.posterior(a, x1, 0.303).cov) > WRONG
    for process in (_bridge(), _mr()):
        x, k = _start(process, 0.7), _shift(process, 0.7)
        y_law = pair.conditional(x1)
        got = pair.denoise(x, 0.7, x1, process)
        assert _err(got, y_law.denoise(x - k * x1, 0.7, process)) < TOL
        flow = pair.flow_map(x, x1, 0.7, 0.2, process)
        want = y_law.pf_ode_map(x - k * x1, 0.7, 0.2, process) + _shift(process, 0.2) * x1
        assert _err(flow, want) < TOL
    at_one = pair.denoise(x1.expand(5, 2), 1.0, x1, _bridge())
    assert _err(at_one, pair.conditional(x1).mean.expand(5, 2)) < TOL


BRIDGE_IDENTITIES = {
    # name: (bridge sampler, the monograph's sampler on u, options of the latter, beta_min)
    "posterior_is_ddpm": (bridges.bridge_posterior, samplers.ddpm, {}, 0.1),
    "ode_is_dpm_solver_1": (bridges.bridge_ode, samplers.dpm_solver_1, {}, 0.1),
    "ode_is_ddim": (bridges.bridge_ode, samplers.ddim, {"eta": 0.0}, 0.1),
    "heun_is_heun": (bridges.bridge_heun, samplers.heun, {}, 1.0),
}


@pytest.mark.parametrize("name", list(BRIDGE_IDENTITIES))
def test_bridge_samplers_are_the_monograph_samplers_on_u(name):
    """From exact x_{0.9} | x1 down to t = 0, on u = x - kappa_t x1 under the bridge's own
    (alpha, sigma): I2SB's posterior step is DDPM (same noise), the PF-ODE step with x0 frozen
    is DPM-Solver-1 = DDIM (eta = 0), and DDBM's Heun in t is Heun's method when beta is
    constant (kappa_t = t, which Heun integrates exactly).  The reference under a bridge with
    beta_max 1% off differs by more than WRONG."""
    ours, reference, options, beta_min = BRIDGE_IDENTITIES[name]
    br, x1 = _bridge(beta_max=1.0, beta_min=beta_min), _x1()
    x = _start(br, 0.9)
    ts = samplers.time_grid(br, 10, kind="uniform", t_min=0.0, t_max=0.9)
    denoiser_u, k0 = _on_u(br), _shift(br, 0.9)
    noise = _fixed_noise(64, 10)
    out = ours(_pair().denoiser(br), x, ts, br, y=x1, noise_sampler=noise)
    ref = reference(denoiser_u, x - k0 * x1, ts, br, noise_sampler=noise, **options)
    wrong_br = _bridge(beta_max=1.01, beta_min=beta_min)
    wrong = reference(denoiser_u, x - k0 * x1, ts, wrong_br, noise_sampler=noise, **options)
    assert _err(out, ref) < TOL  # kappa_0 = 0: u and x agree at t = 0
    assert _err(out, wrong) > WRONG


def test_heun_on_u_needs_a_linear_shift():
    """With the triangular beta (kappa_t not linear in t), DDBM's Heun on x and Heun on u
    differ at O(h^3) per step (5.6e-4 on 10 steps from 0.9): the shift is not a detail."""
    br, x1 = _bridge(), _x1()
    x, ts = _start(br, 0.9), samplers.time_grid(br, 10, kind="uniform", t_min=0.0, t_max=0.9)
    out = bridges.bridge_heun(_pair().denoiser(br), x, ts, br, y=x1)
    ref = samplers.heun(_on_u(br), x - _shift(br, 0.9) * x1, ts, br)
    assert 1e-4 < _err(out, ref) < 1e-2


@pytest.mark.parametrize("sampler", [bridges.bridge_posterior, bridges.bridge_ode])
def test_one_bridge_step_returns_the_conditional_mean(sampler):
    """One step from x1 at t = 1 to t = 0 returns E[x0 | x1] (the posterior at s = 0 has no
    spread): the output law is a point mass, at W2 = sqrt(tr S) from p(x0 | x1), exactly."""
    pair, x1 = _pair(), _x1()
    mean, cov = residual.output_law(sampler, pair, x1, torch.tensor([1.0, 0.0]), _bridge())
    law = pair.conditional(x1)
    assert _err(mean, law.mean) < TOL and _err(cov, torch.zeros(2, 2)) < TOL
    w2 = float(metrics.gaussian_w2(mean, cov, law.mean, law.cov))
    assert abs(w2 - math.sqrt(float(law.cov.trace()))) < TOL


def _z_scores(samples, mean, cov):
    """The largest |z| of the sample mean and covariance against N(mean, cov) (standard
    errors sqrt(C_ii / n) and sqrt((C_ii C_jj + C_ij^2) / n), exact for Gaussian samples)."""
    n, var = samples.shape[0], cov.diagonal()
    z_mean = (samples.mean(0) - mean) / (var / n).sqrt()
    z_cov = (samples.T.cov() - cov) / ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    return max(float(z_mean.abs().max()), float(z_cov.abs().max()))


@pytest.mark.parametrize("sampler", [bridges.bridge_posterior, bridges.bridge_ode])
def test_bridge_exact_output_law_matches_monte_carlo(sampler):
    """4 steps from x1 at t = 1 to t = 0, 20,000 runs: the sample mean and covariance lie
    within 5 standard errors of output_law's exact law (tests/_moments.py); the exact law of
    the same sampler under a bridge with beta_max doubled lies beyond 20 of them."""
    pair, x1, n = _pair(), _x1(), 20_000
    ts = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    gen = torch.Generator().manual_seed(7)
    out = sampler(pair.denoiser(_bridge()), x1.expand(n, 2), ts, _bridge(), generator=gen)
    assert_gaussian_moments(out, *residual.output_law(sampler, pair, x1, ts, _bridge()))
    wrong = residual.output_law(sampler, pair, x1, ts, _bridge(beta_max=2.0))
    assert _z_scores(out, *wrong) > 20


@pytest.mark.parametrize("sampler", [bridges.bridge_posterior, bridges.bridge_ode])
def test_bridge_samplers_converge_in_law(sampler):
    """Exact W2 from the output law to x_{0.05} | x1, from x1 at t = 1 on uniform grids of 40,
    80, 160 steps: first order (measured slopes 0.95 and 0.99; W2 0.026 to 0.0070 and 0.012 to
    0.0031)."""
    pair, x1, br = _pair(), _x1(), _bridge()
    target = pair.marginal(x1, 0.05, br)
    ns, w2 = (40, 80, 160), []
    for n in ns:
        ts = samplers.time_grid(br, n, kind="uniform", t_min=0.05, t_max=1.0)
        w2.append(
            float(metrics.gaussian_w2(*residual.output_law(sampler, pair, x1, ts, br), *target))
        )
    assert abs(metrics.convergence_order(ns, w2) - 1) <= 0.15, w2


@pytest.mark.parametrize("sampler,order", [(bridges.bridge_ode, 1), (bridges.bridge_heun, 2)])
def test_bridge_ode_solvers_converge_on_the_exact_flow(sampler, order):
    """From exact x_{0.9} | x1 to t = 0.05 against GaussianPair.flow_map, uniform grids of 16
    to 128 steps (measured slopes 0.99 and 1.92)."""
    pair, x1, br = _pair(), _x1(), _bridge()
    x = _start(br, 0.9)
    exact = pair.flow_map(x, x1, 0.9, 0.05, br)
    ns, errors = (16, 32, 64, 128), []
    for n in ns:
        ts = samplers.time_grid(br, n, kind="uniform", t_min=0.05, t_max=0.9)
        errors.append(_err(sampler(pair.denoiser(br), x, ts, br, y=x1), exact))
    assert abs(metrics.convergence_order(ns, errors) - order) <= 0.15, errors


def test_heun_from_the_pinned_end_keeps_a_bias():
    """From x1 at t = 1, the drift's Doob term (x1 - x)/bar sigma_t^2 is stiff: a uniform grid's
    first steps are O(1) in log-SNR whatever the number of steps, and Heun's error there does
    not shrink.  Measured with beta constant: W2 to p(x0 | x1) = 0.0106 at 64 steps and 0.0103
    at 256, while the W2 of bridge_ode, whose exponential step is exact in the linear part,
    falls from 0.034 to 0.011."""
    pair, x1, br = _pair(), _x1(), _bridge(beta_max=0.7, beta_min=0.7)
    law = pair.conditional(x1)

    def w2(sampler, n):
        ts = samplers.time_grid(br, n, kind="uniform", t_min=0.0, t_max=1.0)
        out = residual.output_law(sampler, pair, x1, ts, br)
        return float(metrics.gaussian_w2(*out, law.mean, law.cov))

    heun = [w2(bridges.bridge_heun, n) for n in (64, 256)]
    assert heun[1] > 0.005 and abs(heun[1] / heun[0] - 1) < 0.1, heun
    ode = [w2(bridges.bridge_ode, n) for n in (64, 256)]
    assert ode[1] < ode[0] / 2.5, ode


def test_the_engine_reports_every_step():
    """callback(step) and Trace work as for the samplers: one record per step, one model call
    per step (two for Heun from t < 1), the states and the estimates of x0."""
    pair, x1 = _pair(), _x1()
    br, mr = _bridge(), _mr()
    ts = torch.tensor([1.0, 0.6, 0.3, 0.0])
    for sampler, process, condition in (
        (bridges.bridge_posterior, br, {"y": x1}),
        (bridges.mrs_sde_noise, mr, {"y": x1}),
    ):
        trace = Trace()
        gen = torch.Generator().manual_seed(2)
        x = x1.expand(8, 2) if process is br else mr.noisy_start(x1.expand(8, 2), generator=gen)
        out = sampler(pair.denoiser(process), x, ts, process, callback=trace, **condition)
        assert len(trace) == 3 and trace.nfe == 3 and trace.denoised.shape == (3, 8, 2)
        assert torch.equal(trace.xs[-1], out)
    trace, ts = Trace(), torch.tensor([0.9, 0.4, 0.0])
    bridges.bridge_heun(pair.denoiser(br), _start(br, 0.9, n=8), ts, br, y=x1, callback=trace)
    assert trace.nfe == 3  # Heun, then Euler into t = 0


# -- bad input -------------------------------------------------------------------------------
def _raises(kind, match, fn, *args, **kwargs):
    with pytest.raises(kind, match=match):
        fn(*args, **kwargs)


def test_bad_input_is_named():
    """Bad schedules, conditions of the wrong shape, kind or value, grids that do not
    decrease, unknown targets and orders, pairs that are no joint Gaussian: a ValueError or
    TypeError that names the argument, before any work."""
    pair, x1, br, mr = _pair(), _x1(), _bridge(), _mr()
    x = torch.zeros(4, 2)
    ts = torch.tensor([1.0, 0.5, 0.0])
    d_mr, d_br = pair.denoiser(mr), pair.denoiser(br)
    _raises(ValueError, "theta_min", bridges.MeanReverting, theta_min=0.0)
    _raises(ValueError, "theta_max", bridges.MeanReverting, theta_max=-1.0)
    _raises(ValueError, "theta_min <= theta_max", bridges.MeanReverting, 2.0, 1.0)
    _raises(ValueError, "sigma_inf", bridges.MeanReverting, sigma_inf=0.0)
    _raises(ValueError, "beta_min", bridges.BrownianBridge, beta_min=-0.1)
    _raises(ValueError, "beta_min <= beta_max", bridges.BrownianBridge, 1.0, 0.5)
    ints, nan = torch.zeros(2, dtype=torch.int64), torch.full((2,), math.nan)
    for mrs in (bridges.mrs_ode_data, bridges.mrs_ode_noise, bridges.mrs_sde_data):
        _raises(ValueError, "y must have the shape", mrs, d_mr, x, ts, mr, y=torch.zeros(3))
        _raises(TypeError, "y must be a float", mrs, d_mr, x, ts, mr, y=ints)
        _raises(ValueError, "order", mrs, d_mr, x, ts, mr, y=x1, order=3)
        _raises(ValueError, "ts", mrs, d_mr, x, ts.flip(0), mr, y=x1)
    _raises(ValueError, "y must be finite", bridges.mrs_sde_noise, d_mr, x, ts, mr, y=nan)
    for sampler in (bridges.bridge_posterior, bridges.bridge_ode, bridges.bridge_heun):
        _raises(ValueError, "y is needed", sampler, d_br, x, torch.tensor([0.9, 0.0]), br)
        _raises(ValueError, "y must have the shape", sampler, d_br, x, ts, br, y=torch.zeros(4, 3))
        _raises(ValueError, "ts", sampler, d_br, x, torch.tensor([0.0, 0.5, 1.0]), br)
        _raises(TypeError, "model", sampler, "not a model", x, ts, br)
    _raises(ValueError, "source", bridges.mr_convert, x, "score", "x0", x, 0.5, mr, x1)
    _raises(ValueError, "target", bridges.bridge_loss, d_br, x, x, br, target="eps")
    _raises(ValueError, "y must have", bridges.bridge_loss, d_br, x, torch.zeros(4, 3), br)
    _raises(ValueError, "x0", bridges.mr_loss, d_mr, torch.full((4, 2), math.inf), x, mr)
    _raises(ValueError, "even", residual.GaussianPair, torch.zeros(3), torch.eye(3))
    _raises(
        ValueError, "positive definite", residual.GaussianPair, torch.zeros(2), torch.zeros(2, 2)
    )
    _raises(ValueError, "y must have shape", pair.conditional, torch.zeros(3))
    _raises(TypeError, "ShiftedProcess", pair.denoise, x, 0.5, x1, processes.VP())
    _raises(TypeError, "conditional samplers", residual.output_law, samplers.ddpm, pair, x1, ts, br)
    _raises(TypeError, "GaussianPair", residual.output_law, bridges.bridge_ode, None, x1, ts, br)
    _raises(
        TypeError,
        "ShiftedProcess",
        residual.output_law,
        bridges.bridge_ode,
        pair,
        x1,
        ts,
        processes.VP(),
    )
    _raises(TypeError, "bridge", bridges.bridge_ode, d_br, x, ts, mr)
    _raises(TypeError, "taylor", bridges.mrs_ode_data, d_mr, x, ts, mr, y=x1, taylor=1)
    _raises(TypeError, "prior", residual.GaussianPair.from_degradation, None, torch.eye(2), 0.1)
    _raises(
        ValueError,
        "sigma_y",
        residual.GaussianPair.from_degradation,
        _pair().conditional(x1),
        torch.eye(2),
        0.0,
    )
