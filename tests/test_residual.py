"""RDDM, Resfusion and ResShift (diffcore.residual) against exact answers and exact identities.

Three kinds of checks, each shown to fail when one coefficient is wrong:

- the official codes' formulas (schedules, targets, posteriors, sampling loops), rewritten here
  from ``nachifur/RDDM``, ``nkicsl/Resfusion`` and ``zsyOAOA/ResShift``: equal to round-off;
- identities with diffcore's own methods (``samplers.ddim``, ``samplers.ddpm``,
  ``stepping.ddim_step``, ``GaussianMixture.posterior``): equal to round-off;
- exact laws on paired Gaussian data: the output law of each sampler against Monte Carlo, and
  the losses' exact minima, within bounds derived below.
"""

import math
import re

import pytest
import torch

from diffcore import analytic, metrics, processes, samplers
from diffcore import residual as R
from diffcore.stepping import Trace, ddim_step, integrate

from ._moments import assert_gaussian_moments

TOL = 1e-12


def _pair():
    """x0 ~ N(mu, Sigma) in 2-D, y = A x0 + 0.3 n: a blur-like A with some noise."""
    prior = analytic.Gaussian([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])
    return R.GaussianPair.from_degradation(prior, [[0.8, 0.1], [0.0, 0.5]], 0.3)


def _data(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0, y = _pair().sample(n, gen)
    return x0, y, torch.randn(n, 2, generator=gen)


def _noises(n_steps, shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    zs = [torch.randn(shape, generator=gen) for _ in range(n_steps)]
    return zs, lambda i, shape: zs[i]


def _err(a, b):
    return float((a - b).abs().max())


def _shift_ddim(denoiser, x, ts, process, y, etas, noise_sampler):
    """DDIM on u = x - c_t y with a per-step eta, from diffcore's engine and ddim_step only."""
    c = process.shift(ts).tolist()

    def d_u(u, t):  # the denoiser of u: D(u + c_t y, t, y)
        return denoiser(u + float(process.shift(t)) * y, t, y)

    def update(k, u):
        return ddim_step(u, k.D(u), k.t, k.s, etas[k.i], noise_sampler(k.i, u.shape))

    return integrate(update, d_u, x - c[0] * y, ts, process) + c[-1] * y


# -- the official codes' schedules, rewritten ----------------------------------------------
def _rddm_tables(steps, sum_scale):
    """RDDM's gen_coefficients: alphas 'decreased', betas2 'increased'; their cumsums."""
    x = torch.linspace(1, steps, steps, dtype=torch.float64)
    scale = 0.5 * steps * (steps + 1)
    alphas = torch.flip(x, dims=[0]) / scale
    betas2 = x / scale * sum_scale
    return alphas.cumsum(0).clip(0, 1), betas2.cumsum(0).clip(0, 1)


def _resshift_code_sqrt_etas(steps, min_noise_level, etas_end, kappa, power):
    """ResShift's get_named_eta_schedule('exponential')."""
    etas_start = min(min_noise_level / kappa, min_noise_level)
    increaser = math.exp(1 / (steps - 1) * math.log(etas_end / etas_start))
    power_timestep = torch.linspace(0, 1, steps, dtype=torch.float64) ** power * (steps - 1)
    return increaser**power_timestep * etas_start


# -- forward processes ----------------------------------------------------------------------
def test_rddm_coefficients_are_the_code_tables():
    """c_t = alpha-bar_t and b_t^2 = beta-bar_t^2 at t = n/T equal the code's cumsums; the
    'increased' alpha schedule (the other of the code's two) is far off."""
    for steps, s in ((10, 1.0), (1000, 0.01)):
        proc = R.RDDM(steps, sum_scale=s)
        ts = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        ac, b2c = _rddm_tables(steps, s)
        assert _err(proc.shift(ts), ac) < TOL
        assert _err(proc.sigma(ts) ** 2, b2c) < TOL
        increased = torch.linspace(1, steps, steps, dtype=torch.float64).cumsum(0)
        assert _err(increased / (0.5 * steps * (steps + 1)), ac) > 0.1


def test_resshift_etas_are_the_paper_and_the_code_schedule():
    """The power schedule ends at eta_1 and eta_T, with the paper's eta_1 = (0.04/kappa)^2 for
    kappa = 2; with the code's end points it is the code's schedule (4 steps, min_noise_level
    0.2, etas_end 0.99, kappa 2, power 0.3, the journal configs); power 0.31 is not."""
    etas = R.resshift_etas(15, kappa=2.0)
    assert abs(float(etas[0]) - 0.0004) < TOL and abs(float(etas[-1]) - 0.999) < TOL
    code = _resshift_code_sqrt_etas(4, 0.2, 0.99, 2.0, 0.3)
    ours = R.resshift_etas(4, kappa=2.0, power=0.3, eta_1=0.01, eta_T=0.99**2).sqrt()
    assert _err(ours, code) < TOL
    assert _err(R.resshift_etas(4, 2.0, 0.31, 0.01, 0.99**2).sqrt(), code) > 1e-3


@pytest.mark.parametrize(
    "proc",
    [R.RDDM(10), R.Resfusion(), R.ResShift(kappa=2.0, steps=4)],
    ids=["rddm", "resfusion", "resshift"],
)
def test_processes_keep_the_process_contract(proc):
    """As Processes of u = x - c_t y: t_of_lam inverts lam to 1e-12, and d_alpha, d_sigma
    match central differences (step 1e-6, inside the pieces of ResShift's linear eta) to
    1e-7 (d_alpha in the place of d_sigma would not)."""
    ts = torch.tensor([0.05, 0.2, 0.45, 0.7, 0.95])
    assert _err(proc.t_of_lam(proc.lam(ts)), ts) < TOL
    h = 1e-6
    for f, df in ((proc.alpha, proc.d_alpha), (proc.sigma, proc.d_sigma)):
        assert _err((f(ts + h) - f(ts - h)) / (2 * h), df(ts)) < 1e-7
    assert _err(proc.d_alpha(ts), proc.d_sigma(ts)) > 1e-2


def test_marginals_are_the_papers_forward_processes():
    """x_t = a x0 + c y + b eps against each paper's own form, per-sample t: RDDM x0 + abar R +
    bbar eps; Resfusion's resfusion_x0_to_xt; ResShift's q_sample."""
    x0, y, eps = _data()
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])[:, None]
    res = y - x0
    rddm = R.RDDM(10)
    want = x0 + rddm.shift(t) * res + rddm.sigma(t) * eps
    assert _err(rddm.pair_marginal(x0, y, t[:, 0], eps), want) < TOL
    fus = R.Resfusion()
    root = fus.base.alpha(t * fus.t_start)
    want = root * x0 + (1 - root) * res + torch.sqrt(1 - root**2) * eps
    assert _err(fus.pair_marginal(x0, y, t[:, 0], eps), want) < TOL
    shift = R.ResShift(kappa=2.0, steps=4)
    eta = shift.eta(t)
    assert (
        _err(shift.pair_marginal(x0, y, t[:, 0], eps), eta * res + x0 + 2.0 * eta.sqrt() * eps)
        < TOL
    )


def test_resfusion_is_ddpm_on_x_minus_r():
    """x_t - R = sqrt(abar) (x0 - R) + sqrt(1 - abar) eps, DDPM's marginal of x0 - R (base time
    t t_start); weighting R by 1 - abar instead of 1 - sqrt(abar) breaks it."""
    x0, y, eps = _data()
    fus = R.Resfusion()
    res = y - x0
    for t in (0.2, 0.6, 1.0):
        xt = fus.pair_marginal(x0, y, t, eps)
        ddpm = fus.base.marginal(x0 - res, t * fus.t_start, eps)
        assert _err(xt - res, ddpm) < TOL
        abar = float(fus.base.alpha(torch.tensor(t * fus.t_start))) ** 2
        wrong = math.sqrt(abar) * x0 + (1 - abar) * res + math.sqrt(1 - abar) * eps
        assert _err(wrong - res, ddpm) > 1e-2


@pytest.mark.parametrize(
    "base", [processes.VP(), processes.VPCosine(), "code"], ids=["vp", "cosine", "code"]
)
def test_resfusion_accelerated_start_drops_x0(base):
    """At the acceleration point the x0 coefficient 2 sqrt(abar) - 1 vanishes: x_1 = y/2 +
    (sqrt 3/2) eps for any x0, and the start (DDPM's marginal of y) is that exact law.  The
    code's schedule (12 steps) reaches it in its 5th step, as the paper's five steps."""
    fus = R.Resfusion.from_alphas_cumprod(R.resfusion_schedule(12)) if base == "code" else None
    fus = fus or R.Resfusion(base)
    one = torch.tensor(1.0)
    assert abs(float(fus.alpha(one))) < TOL and abs(float(fus.shift(one)) - 0.5) < TOL
    x0, y, eps = _data()
    assert (
        _err(fus.pair_marginal(x0, y, 1.0, eps), fus.pair_marginal(5 * x0 - 3, y, 1.0, eps)) < TOL
    )
    assert _err(fus.start(y, eps), 0.5 * y + math.sqrt(0.75) * eps) < TOL
    if base == "code":
        assert fus.steps == 5
        ddpm = processes.alphas_cumprod(processes.ddpm_betas())  # 1000 steps: T_acc = 368
        code = R.Resfusion.from_alphas_cumprod(ddpm)
        assert code.steps == int((ddpm.sqrt() - 0.5).abs().argmin()) + 1 == 368


def test_posteriors_are_the_codes():
    """Each posterior q(x_{n-1} | x_n, x0, y) against the code's coefficients: RDDM's
    q_posterior (coef1..3, posterior_variance), Resfusion's eq. 44 with betas_hat, ResShift's
    q_posterior_mean_variance.  Using a standard deviation where the variance goes (RDDM) or
    ResShift's kappa in place of kappa^2 is far off."""
    x0, y, xt = _data()
    res = y - x0
    steps = 10
    ac, b2c = _rddm_tables(steps, 1.0)
    proc = R.RDDM(steps)
    for n in (9, 4, 1):  # code index n: the step from (n + 1)/T to n/T
        mean, var = proc.posterior(xt, (n + 1) / steps, n / steps, x0, y)
        b2, a = b2c[n] - b2c[n - 1], ac[n] - ac[n - 1]
        want = b2c[n - 1] / b2c[n] * xt + (b2 * ac[n - 1] - b2c[n - 1] * a) / b2c[n] * res
        want = want + b2 / b2c[n] * x0
        assert _err(mean, want) < TOL and abs(var - float(b2 * b2c[n - 1] / b2c[n])) < TOL
        assert abs(math.sqrt(var) - float(b2 * b2c[n - 1] / b2c[n])) > 1e-3
    fus = R.Resfusion.from_alphas_cumprod(R.resfusion_schedule(12))
    ah = R.resfusion_schedule(12)
    for n in (4, 2, 1):
        mean, var = fus.posterior(xt, (n + 1) / 5, n / 5, x0, y)
        alpha = ah[n] / ah[n - 1]
        want = (
            alpha.sqrt() * (1 - ah[n - 1]) * (xt - res)
            + ah[n - 1].sqrt() * (1 - alpha) * (x0 - res)
        ) / (1 - ah[n]) + res
        assert _err(mean, want) < TOL
        assert abs(var - float((1 - ah[n - 1]) / (1 - ah[n]) * (1 - alpha))) < TOL
    shift = R.ResShift(kappa=2.0, steps=4)
    etas = shift.etas
    for n in (3, 2, 1):
        mean, var = shift.posterior(xt, (n + 1) / 4, n / 4, x0, y)
        alpha = etas[n] - etas[n - 1]
        assert _err(mean, etas[n - 1] / etas[n] * xt + alpha / etas[n] * x0) < TOL
        assert abs(var - float(4.0 * etas[n - 1] / etas[n] * alpha)) < TOL
        assert abs(var / float(2.0 * etas[n - 1] / etas[n] * alpha) - 1) > 0.5


# -- the samplers against the official loops --------------------------------------------------
def test_rddm_sampler_is_the_code_loop():
    """rddm against ResidualDiffusion.ddim_sample (type 'use_pred_noise', sigma2 = eta *
    betas2 * betas2_cumsum_next / betas2_cumsum, x_start at the last step) on 10 of 50
    steps, eta = 0.3; reading eta as a standard deviation breaks it."""
    steps, n, eta = 50, 10, 0.3
    pair, proc = _pair(), R.RDDM(steps)
    model = R.rddm_model(pair.denoiser(proc), proc)
    _, y, eps = _data()
    x = proc.start(y, eps)
    zs, sampler = _noises(n, x.shape)
    ours = R.rddm(model, x, n, proc, y=y, eta=eta, noise_sampler=sampler)
    ac, b2c = _rddm_tables(steps, 1.0)
    times = list(reversed(torch.linspace(-1, steps - 1, n + 1).int().tolist()))

    def code(eta_var):
        img = x
        for i, (time, nxt) in enumerate(zip(times[:-1], times[1:], strict=True)):
            res, noise = model(img, torch.tensor((time + 1) / steps), y)
            if nxt < 0:
                return img - ac[time] * res - b2c[time].sqrt() * noise
            b2 = b2c[time] - b2c[nxt]
            sigma2 = eta_var * (b2 * b2c[nxt] / b2c[time])
            img = (
                img
                - (ac[time] - ac[nxt]) * res
                - (b2c[time].sqrt() - (b2c[nxt] - sigma2).sqrt()) * noise
            )
            img = img + sigma2.sqrt() * zs[i]

    assert _err(ours, code(eta)) < TOL
    assert _err(ours, code(eta**2)) > 1e-3


def test_resfusion_sampler_is_the_code_loop():
    """resfusion against GaussianResfusion_Restore.generate ('epsilon' mode, eq. 33 with
    betas_hat from the LinearProScheduler of 12 steps, no noise at the last step)."""
    fus = R.Resfusion.from_alphas_cumprod(R.resfusion_schedule(12))
    model = R.resfusion_model(_pair().denoiser(fus), fus)
    _, y, eps = _data()
    ah = R.resfusion_schedule(12)
    alphas = ah / torch.cat([ah.new_ones(1), ah[:-1]])
    betas = 1 - alphas
    ah_prev = torch.roll(ah, 1)
    ah_prev[0] = ah_prev[1]
    betas_hat = (1 - ah_prev) / (1 - ah) * betas
    x = ah[-1].sqrt() * y + (1 - ah[-1]).sqrt() * eps  # ddpm_x0_to_xt(X_0_hat, alpha_hat, noise)
    zs, sampler = _noises(5, x.shape)
    ours = R.resfusion(model, x, None, fus, y=y, noise_sampler=sampler)
    img = x
    for t in range(4, -1, -1):
        z = zs[4 - t] if t > 0 else 0 * zs[0]
        rho = model(img, torch.tensor((t + 1) / 5), y)
        img = (
            1 / alphas[t].sqrt() * (img - betas[t] / (1 - ah[t]).sqrt() * rho)
            + betas_hat[t].sqrt() * z
        )
    assert _err(ours, img) < TOL


def test_resshift_sampler_is_the_code_loop():
    """resshift against GaussianDiffusion.p_sample_loop (posterior_mean_coef1/2, the clipped
    log-variance, no noise at t = 0) on the journal configuration: 4 steps, kappa 2."""
    etas = R.resshift_etas(4, 2.0, 0.3, eta_1=0.01, eta_T=0.99**2)
    proc = R.ResShift(etas, kappa=2.0)
    model = _pair().denoiser(proc)
    _, y, eps = _data()
    x = proc.start(y, eps)
    assert _err(x, y + 2.0 * etas[-1].sqrt() * eps) < TOL  # prior_sample
    zs, sampler = _noises(4, x.shape)
    ours = R.resshift(model, x, None, proc, y=y, noise_sampler=sampler)
    prev = torch.cat([etas.new_zeros(1), etas[:-1]])
    alpha = etas - prev
    var = 4.0 * prev / etas * alpha
    log_var = torch.log(torch.cat([var[1:2], var[1:]]))
    img = x
    for i in range(3, -1, -1):
        x0 = model(img, torch.tensor((i + 1) / 4), y)
        mean = prev[i] / etas[i] * img + alpha[i] / etas[i] * x0
        img = mean + (i != 0) * torch.exp(0.5 * log_var[i]) * zs[3 - i]
    assert _err(ours, img) < TOL


# -- the samplers as DDIM and DDPM on a shifted variable --------------------------------------
def test_rddm_eta0_is_diffcore_ddim_on_the_shifted_variable():
    """RDDM with eta = 0 is samplers.ddim (eta = 0) on u = x - abar_t y under the RDDM process
    (alpha = 1 - abar, sigma = bbar), with the denoiser of u; samplers.ddim on x itself (the
    shift dropped) is not."""
    pair, proc = _pair(), R.RDDM(100)
    D = pair.denoiser(proc)
    _, y, eps = _data()
    x = proc.start(y, eps)
    ours = R.rddm(R.rddm_model(D, proc), x, 10, proc, y=y, eta=0.0)
    ts = proc.grid(10)

    def d_u(u, t):
        return D(u + float(proc.shift(t)) * y, t, y)

    assert _err(ours, samplers.ddim(d_u, x - y, ts, proc, eta=0.0)) < TOL  # c_1 = 1, c_0 = 0
    unshifted = samplers.ddim(lambda x, t: D(x, t, y), x, ts, proc, eta=0.0)
    assert _err(ours, unshifted) > 1e-2


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_rddm_is_ddim_with_a_per_step_eta(eta):
    """RDDM with eta > 0 is DDIM on u with eta_DDIM = sqrt(eta (1 - b_s^2/b_t^2) / (1 -
    e^{-2h})) per step (ddim_eta), the same noise; taking RDDM's eta as DDIM's standard
    deviation scale (eta_DDIM = eta, or sqrt(eta) without the ratio) is not.  For eta = 1
    the step is a draw of RDDM's posterior."""
    pair, proc = _pair(), R.RDDM(100)
    D = pair.denoiser(proc)
    _, y, eps = _data()
    x = proc.start(y, eps)
    ts = proc.grid(10)
    zs, sampler = _noises(10, x.shape)
    ours = R.rddm(R.rddm_model(D, proc), x, ts, proc, y=y, eta=eta, noise_sampler=sampler)
    pairs = list(zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True))
    right = [R.ddim_eta(proc, t, s, eta) for t, s in pairs]
    assert _err(ours, _shift_ddim(D, x, ts, proc, y, right, sampler)) < TOL
    assert _err(ours, _shift_ddim(D, x, ts, proc, y, [eta] * 10, sampler)) > 1e-3
    if eta < 1:
        no_ratio = [math.sqrt(eta)] * 10
        assert _err(ours, _shift_ddim(D, x, ts, proc, y, no_ratio, sampler)) > 1e-3
    else:  # one step from t = 0.5 to 0.4 is a draw of the posterior
        step = R.rddm(R.rddm_model(D, proc), x, ts[5:7], proc, y=y, eta=1.0, noise_sampler=sampler)
        mean, var = proc.posterior(x, 0.5, 0.4, D(x, torch.tensor(0.5), y), y)
        assert _err(step, mean + math.sqrt(var) * zs[0]) < TOL


def test_resfusion_is_diffcore_ddpm_on_x_minus_r():
    """For any fixed R, Resfusion's loop on a resnoise eps_w(x - R) + k_t R is R + samplers.ddpm
    on w = x - R under the base schedule (times t t_start), with the same noise: the resnoise
    carries R through DDPM's update.  A resnoise that weights R by sqrt(1 - abar) (1 - alpha
    in place of 1 - sqrt(alpha) in eq. 24) is not."""
    fus = R.Resfusion(processes.VP(), steps=5)
    g = analytic.Gaussian([0.5, -1.0], [[0.7, 0.2], [0.2, 0.4]])  # the law of w0 = x0 - R
    d_w = g.denoiser(fus.base)
    _, y, eps = _data()
    res = torch.tensor([0.3, -0.8])

    def resnoise(weight):
        def model(x, t, y):
            bt = float(t) * fus.t_start
            a, s = float(fus.base.alpha(torch.tensor(bt))), float(fus.base.sigma(torch.tensor(bt)))
            return (x - res - a * d_w(x - res, torch.tensor(bt))) / s + weight(t) * res

        return model

    x = res + fus.sigma(torch.tensor(1.0)) * eps
    zs, sampler = _noises(5, x.shape)
    ours = R.resfusion(resnoise(fus.resnoise_weight), x, None, fus, y=y, noise_sampler=sampler)
    ddpm = samplers.ddpm(d_w, x - res, fus.grid() * fus.t_start, fus.base, noise_sampler=sampler)
    assert _err(ours, res + ddpm) < TOL
    wrong = R.resfusion(resnoise(fus.sigma), x, None, fus, y=y, noise_sampler=sampler)
    assert _err(wrong, res + ddpm) > 1e-2


@pytest.mark.parametrize("steps", [None, 2])
def test_resshift_is_ddim_on_x_minus_eta_y(steps):
    """ResShift's 4-step loop (and a 2-step skip) is DDIM on u = x - eta_t y (stepping's
    ddim_step) with ddim_eta's eta_DDIM per step; kappa off by 1% in the posterior, or DDPM's
    posterior on u (eta_DDIM = 1), is not."""
    proc = R.ResShift(kappa=2.0, steps=4)
    D = _pair().denoiser(proc)
    _, y, eps = _data()
    x = proc.start(y, eps)
    ts = proc.grid(steps)
    zs, sampler = _noises(len(ts) - 1, x.shape)
    ours = R.resshift(D, x, steps, proc, y=y, noise_sampler=sampler)
    pairs = list(zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True))
    right = [R.ddim_eta(proc, t, s) for t, s in pairs]
    assert _err(ours, _shift_ddim(D, x, ts, proc, y, right, sampler)) < TOL
    off = R.ResShift(proc.etas, kappa=2.02)
    assert _err(R.resshift(D, x, steps, off, y=y, noise_sampler=sampler), ours) > 1e-4
    assert _err(ours, _shift_ddim(D, x, ts, proc, y, [1.0] * len(pairs), sampler)) > 1e-3


def test_callback_trace_and_the_denoised_estimates():
    """Trace records every step and counts one call per step; the steps' denoised estimates are
    the exact E[x0 | x_t, y] (for Resfusion, recovered from the resnoise)."""
    pair = _pair()
    _, y, eps = _data()
    for proc, sampler, wrap in (
        (R.RDDM(20), R.rddm, R.rddm_model),
        (R.Resfusion(), R.resfusion, R.resfusion_model),
        (R.ResShift(kappa=1.0, steps=4), R.resshift, None),
    ):
        D = pair.denoiser(proc)
        trace = Trace()
        x = proc.start(y, eps)
        sampler(wrap(D, proc) if wrap else D, x, None, proc, y=y, callback=trace)
        assert trace.nfe == len(trace) == proc.steps and trace.xs.shape == (proc.steps, 6, 2)
        starts = [x, *trace.xs[:-1]]
        for i, (xi, t) in enumerate(zip(starts, proc.grid()[:-1], strict=True)):
            assert _err(trace.denoised[i], D(xi, t, y)) < 1e-10


# -- the exact oracle and the exact output laws --------------------------------------------
def test_gaussian_pair_conditional_law_and_denoiser():
    """p(x0 | y) equals the Kalman posterior of analytic.Gaussian; E[x0 | x_t, y] equals the
    conditioning of the joint Gaussian of (x0, x_t, y), built here from its covariance; the
    denoiser with the shift c_t dropped is not."""
    mean, cov = torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    A = torch.tensor([[0.8, 0.1], [0.0, 0.5]])
    pair = R.GaussianPair.from_degradation(analytic.Gaussian(mean, cov), A, 0.3)
    _, y, eps = _data()
    kalman = analytic.Gaussian(mean, cov).posterior(A, y[0], 0.3)
    assert _err(pair.conditional(y[0]).mean, kalman.mean) < TOL
    assert _err(pair.conditional_cov, kalman.cov) < TOL
    for proc in (R.RDDM(10), R.Resfusion(), R.ResShift(kappa=2.0, steps=4)):
        t = 0.55
        a, c, b = (float(f(torch.tensor(t))) for f in (proc.alpha, proc.shift, proc.sigma))
        lift = torch.cat([torch.cat([a * torch.eye(2), c * torch.eye(2)], 1), torch.eye(4)[2:]])
        joint_cov = lift @ pair.cov @ lift.T + torch.block_diag(
            b**2 * torch.eye(2), torch.zeros(2, 2)
        )
        joint_mean = lift @ pair.mean
        cross = torch.cat([a * pair.cov[:2, :2] + c * pair.cov[:2, 2:], pair.cov[:2, 2:]], 1)
        xt = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
        obs = torch.cat([xt, y], 1)
        want = pair.mean[:2] + (obs - joint_mean) @ torch.linalg.solve(joint_cov, cross.T)
        assert _err(pair.denoise(xt, t, y, proc), want) < TOL
        if c > 0.1:
            assert _err(pair.denoise(xt - c * y, t, 0 * y, proc), want) > 1e-2


def _resshift_law_closed_form(pair, proc, y):
    """The 4-step ResShift output law propagated by hand: with D = m + G(x - c y - a m),
    x_s = M x + (1 - r)(m - G(c y + a m)) + std z, M = r I + (1 - r) G."""
    S, eye = pair.conditional_cov, torch.eye(2)
    m = pair.conditional_mean(y)
    mean, cov = y.clone(), 4.0 * float(proc.etas[-1]) * eye
    ts = proc.grid()
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        a, c, b = float(proc.alpha(t)), float(proc.shift(t)), float(proc.sigma(t))
        r = float(proc.eta(s) / proc.eta(t))
        G = a * S @ torch.linalg.inv(a**2 * S + b**2 * eye)
        M = r * eye + (1 - r) * G
        mean = mean @ M.T + (1 - r) * (m - (c * y + a * m) @ G.T)
        cov = M @ cov @ M.T + float(proc.sigma(s)) ** 2 * (1 - r) * eye
    return mean, cov


def test_resshift_output_law_is_exact():
    """output_law of 4-step ResShift equals the law propagated by hand to round-off; the law
    with kappa 2.02 in the propagation is far off."""
    pair = _pair()
    proc = R.ResShift(kappa=2.0, steps=4)
    _, y, _ = _data()
    mean, cov = R.output_law(R.resshift, pair, y, None, proc, start="prior")
    want_mean, want_cov = _resshift_law_closed_form(pair, proc, y)
    assert _err(mean, want_mean) < TOL and _err(cov, want_cov) < TOL
    _, off_cov = _resshift_law_closed_form(pair, R.ResShift(proc.etas, kappa=2.02), y)
    assert _err(cov, off_cov) > 1e-4


@pytest.mark.parametrize("name", ["rddm", "resfusion", "resshift"])
def test_output_law_matches_monte_carlo(name):
    """20,000 runs of each sampler from its start, for one y: the sample mean and covariance
    lie within 5 exact standard errors of output_law (tests/_moments.py)."""
    pair = _pair()
    proc, sampler, model, options = {
        "rddm": (R.RDDM(50), R.rddm, R.rddm_model, {"eta": 0.5}),
        "resfusion": (R.Resfusion(), R.resfusion, R.resfusion_model, {}),
        "resshift": (R.ResShift(kappa=2.0, steps=4), R.resshift, None, {}),
    }[name]
    D = pair.denoiser(proc)
    model = model(D, proc) if model else D
    steps = 10 if name == "rddm" else None
    _, y, _ = _data(1)
    mean, cov = R.output_law(sampler, pair, y, steps, proc, model=model, start="prior", **options)
    n = 20_000
    gen = torch.Generator().manual_seed(11)
    ys = y.expand(n, 2)
    x = proc.start(ys, torch.randn(n, 2, generator=gen))
    out = sampler(model, x, steps, proc, y=ys, generator=gen, **options)
    assert_gaussian_moments(out, mean[0], cov)


def test_few_step_resshift_against_the_conditional_law():
    """With the exact denoiser and the exact start, ResShift's output mean is E[x0 | y] to
    round-off for any number of steps, but its covariance falls short of S (the posterior
    step ignores Cov[x0 | x_t]), so W2 to p(x0 | y) is 0.28 at 4 steps (tr S = 0.22) and
    decreases with the steps: 0.41, 0.28, 0.18, 0.12, 0.08 for T = 2, 4, 8, 15, 30.  The
    paper's start N(y, kappa^2 eta_T) moves the mean by (1 - eta_T)(y - m(y))."""
    pair = _pair()
    _, y, _ = _data(3)
    m, S = pair.conditional_mean(y), pair.conditional_cov
    w2 = []
    for steps in (2, 4, 8, 15, 30):
        proc = R.ResShift(kappa=2.0, steps=steps)
        mean, cov = R.output_law(R.resshift, pair, y, None, proc)
        assert _err(mean, m) < TOL
        assert float(torch.linalg.eigvalsh(S - cov)[0]) > 0  # under-dispersed
        w2.append(float(metrics.gaussian_w2(mean[0], cov, m[0], S)))
        if steps == 4:
            prior_mean, _ = R.output_law(R.resshift, pair, y, None, proc, start="prior")
            assert _err(prior_mean, m) > 1e-6
    assert all(a > b for a, b in zip(w2, w2[1:], strict=False)), w2
    assert 0.25 < w2[1] < 0.3 and w2[-1] < 0.1, w2


# -- losses --------------------------------------------------------------------------------
def _draws(n, steps, seed, shape):
    """The losses' draws: a step n/T, uniform, then the noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(1, steps + 1, (n,), generator=gen).double() / steps
    return t, torch.randn(shape, generator=gen)


def test_losses_have_the_codes_targets():
    """With a model that outputs zeros each loss is the mean squared norm of its target,
    computed from the codes: RDDM's (x_res, noise), Resfusion's resnoise noise + (1 -
    sqrt(alpha_t)) sqrt(1 - alpha_hat_t) / beta_t R (eq. 24, LinearPro tables), ResShift's x0."""
    x0, y, _ = _data(8)
    res = y - x0
    zero = torch.zeros_like(x0)
    rddm = R.RDDM(10)
    loss = R.rddm_loss(
        lambda x, t, y: (zero, zero), x0, y, rddm, generator=torch.Generator().manual_seed(5)
    )
    t, noise = _draws(8, 10, 5, x0.shape)
    assert abs(float(loss) - float((res.pow(2).sum(1) + noise.pow(2).sum(1)).mean())) < TOL

    fus = R.Resfusion.from_alphas_cumprod(R.resfusion_schedule(12))
    loss = R.resfusion_loss(
        lambda x, t, y: zero, x0, y, fus, generator=torch.Generator().manual_seed(5)
    )
    t, noise = _draws(8, 5, 5, x0.shape)
    ah = R.resfusion_schedule(12)
    alphas = ah / torch.cat([ah.new_ones(1), ah[:-1]])
    i = (t * 5).round().long() - 1  # the code's index
    weight = ((1 - alphas[i].sqrt()) * (1 - ah[i]).sqrt() / (1 - alphas[i]))[:, None]
    assert abs(float(loss) - float((noise + weight * res).pow(2).sum(1).mean())) < TOL
    wrong = ((1 - alphas[i]) * (1 - ah[i]).sqrt() / (1 - alphas[i]))[:, None]
    assert abs(float(loss) - float((noise + wrong * res).pow(2).sum(1).mean())) > 1e-2

    shift = R.ResShift(kappa=2.0, steps=4)
    loss = R.resshift_loss(
        lambda x, t, y: zero, x0, y, shift, generator=torch.Generator().manual_seed(5)
    )
    assert abs(float(loss) - float(x0.pow(2).sum(1).mean())) < TOL


@pytest.mark.parametrize("name", ["rddm", "resfusion", "resshift"])
def test_losses_reach_their_exact_minimum_at_the_exact_model(name):
    """At a fixed t the exact model's loss is w ||x0 - E[x0 | x_t, y]||^2 with w = 1 + a^2/b^2
    (RDDM: residual and noise), (a/b + k_t)^2 (Resfusion), 1 (ResShift), and x0 - E[...] ~
    N(0, P), P = S - a^2 S (a^2 S + b^2)^{-1} S: mean w tr P, standard deviation of the batch
    mean w sqrt(2 tr P^2 / n).  Over 20,000 pairs the loss is within 5 of those of w tr P; a
    model one step off (evaluated at t - 1/T, the code's index taken for the step) is more
    than 5 such bounds above it."""
    pair = _pair()
    proc, loss_fn, make = {
        "rddm": (R.RDDM(10), R.rddm_loss, R.rddm_model),
        "resfusion": (R.Resfusion(), R.resfusion_loss, R.resfusion_model),
        "resshift": (R.ResShift(kappa=2.0, steps=4), R.resshift_loss, None),
    }[name]
    t = 0.6
    a, c, b = (float(f(torch.tensor(t))) for f in (proc.alpha, proc.shift, proc.sigma))
    S = pair.conditional_cov
    P = S - a**2 * S @ torch.linalg.inv(a**2 * S + b**2 * torch.eye(2)) @ S
    w = {"rddm": 1 + a**2 / b**2, "resshift": 1.0}.get(name)
    if name == "resfusion":
        w = (a / b + float(proc.resnoise_weight(torch.tensor(t)))) ** 2
    n = 20_000
    x0, y = pair.sample(n, torch.Generator().manual_seed(2))
    fixed = lambda n, generator: torch.full((n,), t)  # noqa: E731
    exact = pair.denoiser(proc)
    model = make(exact, proc) if make else exact
    value = float(
        loss_fn(model, x0, y, proc, t_sampler=fixed, generator=torch.Generator().manual_seed(4))
    )
    want = w * float(torch.trace(P))
    bound = 5 * w * math.sqrt(2 * float(torch.trace(P @ P)) / n)
    assert abs(value - want) < bound, (value, want, bound)

    def late(x, t, y):
        return model(x, t - 1 / proc.steps, y)

    value = float(
        loss_fn(late, x0, y, proc, t_sampler=fixed, generator=torch.Generator().manual_seed(4))
    )
    assert value - want > 5 * bound, (value, want, bound)


# -- bad input ------------------------------------------------------------------------------
def _never(*args):
    raise AssertionError("the model must not be called on bad input")


def test_bad_input_is_named_before_any_work():
    """A shift y of the wrong shape, a non-positive kappa, an eta schedule that does not
    increase, eta outside [0, 1], a grid Resfusion was not trained on, a base that is not
    variance preserving, a model that does not return RDDM's pair, a process of another
    method: each raises naming the value, and no model is called."""
    _, y, eps = _data()
    rddm, fus, shift = R.RDDM(10), R.Resfusion(), R.ResShift(kappa=2.0, steps=4)
    x = rddm.start(y, eps)
    short = y[:, :1]
    cases = [
        (ValueError, "y must have the shape", lambda: R.rddm(_never, x, None, rddm, y=short)),
        (ValueError, "y must have the shape", lambda: R.resshift(_never, x, None, shift, y=y[:3])),
        (ValueError, "y must have the shape", lambda: rddm.pair_marginal(x, short, 0.5, eps)),
        (ValueError, "y must have the shape", lambda: R.resshift_loss(_never, x, short, shift)),
        (ValueError, "kappa", lambda: R.ResShift(kappa=0.0)),
        (ValueError, "kappa", lambda: R.ResShift(kappa=-1.0)),
        (ValueError, "etas[2] = 0.1", lambda: R.ResShift(torch.tensor([0.01, 0.2, 0.1]))),
        (ValueError, "etas[1] = 1", lambda: R.ResShift(torch.tensor([0.01, 1.0]))),
        (ValueError, "steps", lambda: R.ResShift(torch.tensor([0.01, 0.5]), steps=3)),
        (ValueError, "eta = 1.5", lambda: R.rddm(_never, x, None, rddm, y=y, eta=1.5)),
        (ValueError, "sum_scale", lambda: R.RDDM(10, sum_scale=0.0)),
        (ValueError, "steps", lambda: R.RDDM(0)),
        (TypeError, "steps", lambda: R.RDDM(10.0)),
        (ValueError, "n = 11", lambda: R.rddm(_never, x, 11, rddm, y=y)),
        (ValueError, "ts = ", lambda: R.resfusion(_never, x, 3, fus, y=y)),
        (ValueError, "ts must decrease", lambda: R.resshift(_never, x, [0.0, 1.0], shift, y=y)),
        (ValueError, "base", lambda: R.Resfusion(processes.VE())),
        (TypeError, "pair (residual, noise)", lambda: R.rddm(lambda x, t, y: x, x, 2, rddm, y=y)),
        (TypeError, "process must be a ResShift", lambda: R.resshift(_never, x, 2, rddm, y=y)),
        (TypeError, "process must be a Resfusion", lambda: R.resfusion_loss(_never, x, y, rddm)),
        (TypeError, "RDDM or ResShift", lambda: R.ddim_eta(fus, 0.5, 0.4)),
        (
            ValueError,
            "positive definite",
            lambda: R.GaussianPair([0.0, 0.0], [[1.0, 1.0], [1.0, 1.0]]),
        ),
        (ValueError, "x must be finite", lambda: R.rddm(_never, x * math.nan, 2, rddm, y=y)),
    ]
    for kind, words, call in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()
