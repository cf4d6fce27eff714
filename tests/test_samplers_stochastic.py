"""Exact output laws of the samplers on Gaussian data, and the stochastic samplers' convergence.

On Gaussian data every sampler is an affine map of its Gaussian inputs, so its output law is
Gaussian and ``metrics.sampler_output_law`` gives it exactly; the W2 distances below are exact,
without Monte Carlo, except where a test says otherwise.
"""

import math

import pytest
import torch

from diffcore import analytic, metrics, processes, samplers

from ._moments import assert_gaussian_moments

T_MAX, T_MIN = 0.99, 0.05


def _gaussian():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), cov)


def _level(process, t):
    """sigma_t / alpha_t, the noise level of EDM and NCSN."""
    t = torch.tensor(t, dtype=torch.float64)
    return float(process.sigma(t) / process.alpha(t))


def _options(name, process):
    """Options that exercise each sampler's noise: eta, churn, two corrector steps, and for
    annealed Langevin a step with contraction c = eps / (2 level_L^2) = 1/4 per Langevin step."""
    return {
        "ddim": {"eta": 0.5},
        "heun": {"s_churn": 4.0},
        "pc": {"n_corrector": 2},
        "annealed_langevin": {"eps": 0.5 * _level(process, T_MIN) ** 2, "n_steps_each": 2},
    }.get(name, {})


def _w2_to(law, mean, cov):
    return float(metrics.gaussian_w2(mean, cov, law.mean, law.cov))


@pytest.mark.parametrize("name", [n for n, s in samplers.SAMPLERS.items() if s.is_affine()])
def test_exact_law_matches_monte_carlo(name):
    """20,000 runs from exact samples of p_{t_0}: the sample mean and covariance lie within 5
    standard errors of the exact law.  The output is exactly Gaussian, so the standard errors
    are exact: sqrt(C_ii / n) for the mean, sqrt((C_ii C_jj + C_ij^2) / n) for the covariance."""
    vp = processes.VP()
    g = _gaussian()
    ts = samplers.time_grid(vp, 8, kind="logsnr", t_min=T_MIN, t_max=T_MAX)
    options = _options(name, vp)
    mean, cov = metrics.sampler_output_law(name, g, ts, vp, **options)
    n = 20_000
    gen = torch.Generator().manual_seed(7)
    x = g.marginal(T_MAX, vp).sample(n, generator=gen)
    out = samplers.SAMPLERS[name](g.denoiser(vp), x, ts, vp, generator=gen, **options)
    assert_gaussian_moments(out, mean, cov)
    # The exact W2 to the law it aims at, p_{t_min}, against the W2 of the Monte-Carlo Gaussian
    # fit: they differ by at most W2(exact law, fit) (triangle inequality), whose square has
    # mean tr C / n (means) + tr C / (2n) (square roots of the covariances): 5 of its sd.
    target = g.marginal(T_MIN, vp)
    w2_exact = _w2_to(target, mean, cov)
    w2_fit = _w2_to(target, out.mean(0), out.T.cov())
    assert abs(w2_exact - w2_fit) <= 5 * math.sqrt(1.5 * float(cov.trace()) / n), (w2_exact, w2_fit)


def test_exact_law_from_the_prior_start():
    """start="prior": x ~ N(0, sigma_{t_0}^2 I), what process.prior_sample draws."""
    vp = processes.VP()
    g = _gaussian()
    ts = samplers.time_grid(vp, 6, kind="logsnr", t_min=T_MIN, t_max=T_MAX)
    mean, cov = metrics.sampler_output_law("ddpm", g, ts, vp, start="prior")
    n, gen = 20_000, torch.Generator().manual_seed(3)
    x = vp.prior_sample((n, 2), t=T_MAX, generator=gen)
    out = samplers.ddpm(g.denoiser(vp), x, ts, vp, generator=gen)
    assert_gaussian_moments(out, mean, cov)


def test_one_ddpm_step_misses_exactly_the_posterior_variance(process):
    """One DDPM step from x_t ~ p_t draws x_s from q(x_s | x_t, x0 = E[x0 | x_t]).  The true
    reverse kernel averages q over x0 ~ p(x0 | x_t); q is linear in x0 with weight
    c = alpha_s sigma_{t|s}^2 / sigma_t^2, so the DDPM law has the exact mean alpha_s mu and a
    covariance short of p_s's by exactly c^2 Cov[x0 | x_t], Cov[x0 | x_t] = (Sigma^-1 + alpha_t^2
    / sigma_t^2 I)^-1 for Gaussian data."""
    g = _gaussian()
    t, s = 0.7, 0.4
    mean, cov = metrics.sampler_output_law("ddpm", g, torch.tensor([t, s]), process)
    a_t, s_t, a_s, s_s = (
        float(f(torch.tensor(v)))
        for f, v in ((process.alpha, t), (process.sigma, t), (process.alpha, s), (process.sigma, s))
    )
    var_ts = s_t**2 - (a_t / a_s) ** 2 * s_s**2  # sigma_{t|s}^2 from its definition
    c = a_s * var_ts / s_t**2
    post_cov = torch.linalg.inv(torch.linalg.inv(g.cov) + a_t**2 / s_t**2 * torch.eye(2))
    p_s = g.marginal(s, process)
    torch.testing.assert_close(mean, p_s.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov + c**2 * post_cov, p_s.cov, rtol=1e-12, atol=1e-12)


def test_ddim_with_eta_one_has_the_law_of_ddpm(process):
    g = _gaussian()
    ts = samplers.time_grid(process, 10, kind="uniform", t_min=0.0, t_max=1.0)
    m1, c1 = metrics.sampler_output_law("ddpm", g, ts, process)
    m2, c2 = metrics.sampler_output_law("ddim", g, ts, process, eta=1.0)
    torch.testing.assert_close(m2, m1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c2, c1, rtol=1e-12, atol=1e-12)


def _w2_along(name, process, ns, **options):
    """Exact W2 between the sampler's output law and p_{t_min}, on log-SNR grids of ns steps."""
    g = _gaussian()
    target = g.marginal(T_MIN, process)
    out = []
    for n in ns:
        ts = samplers.time_grid(process, n, kind="logsnr", t_min=T_MIN, t_max=T_MAX)
        out.append(_w2_to(target, *metrics.sampler_output_law(name, g, ts, process, **options)))
    return out


@pytest.mark.parametrize(
    "name,options", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler_maruyama", {})]
)
def test_first_order_stochastic_samplers_converge_in_law(name, options):
    """Ancestral sampling, DDIM with eta > 0 and Euler-Maruyama have weak order 1: the exact W2
    to p_{t_min} is C / N + o(1/N), so it falls by 2^(1 - 0.15) or more per doubling of N
    (measured 2^0.9 to 2^1.1), from 0.1-0.3 at 20 steps to W2 <= C/80 ~ 0.05 at 80."""
    ns = (20, 40, 80)
    w2 = _w2_along(name, processes.VP(), ns, **options)
    for coarse, fine in zip(w2, w2[1:], strict=False):
        assert math.log2(coarse / fine) >= 1 - 0.15, w2
    assert w2[-1] < 0.05, w2


def test_heun_with_churn_converges_in_law_at_second_order():
    """The churn moves x from p_{t_i} to p_{t_hat} exactly (forward noising), so the only error
    in law is that of the Heun steps: order 2 (measured from 40 steps; below, gamma =
    min(s_churn / N, 0.41) is capped and the steps are pre-asymptotic)."""
    ns = (40, 80, 160)
    w2 = _w2_along("heun", processes.VP(), ns, s_churn=10.0)
    for coarse, fine in zip(w2, w2[1:], strict=False):
        assert abs(math.log2(coarse / fine) - 2) <= 0.15, w2


def test_heun_churn_lands_on_the_marginal_of_the_raised_time():
    """One churned Heun step from t_0 has the law of the plain Heun step from t_hat started at
    p_{t_hat}: the churn is the exact forward transition from t_0 to t_hat."""
    vp = processes.VP()
    g = _gaussian()
    ts = torch.tensor([0.5, 0.3])
    gamma = math.sqrt(2) - 1  # s_churn / N = 5 is capped at sqrt(2) - 1
    t_hat = vp.t_of_lam(vp.lam(ts[0]) - math.log1p(gamma))
    churned = metrics.sampler_output_law("heun", g, ts, vp, s_churn=5.0)
    plain = metrics.sampler_output_law("heun", g, torch.stack([t_hat, ts[1]]), vp)
    torch.testing.assert_close(churned[0], plain[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(churned[1], plain[1], rtol=1e-10, atol=1e-12)


def test_predictor_corrector_improves_on_its_predictor():
    """PC's predictor is the DDPM step; its Langevin corrector pulls the state towards p_{t_i}
    (up to the bias of unadjusted Langevin with step 2 (snr sigma_t)^2: a W2 floor of 5.5e-4
    here, far below the predictor's error), so PC's W2 falls with N and stays below DDPM's."""
    ns = (20, 40, 80)
    vp = processes.VP()
    w2_pc, w2_ddpm = _w2_along("pc", vp, ns), _w2_along("ddpm", vp, ns)
    assert w2_pc[0] > w2_pc[1] > w2_pc[2], w2_pc
    assert all(p < d for p, d in zip(w2_pc, w2_ddpm, strict=True)), (w2_pc, w2_ddpm)


def _langevin_law(law, delta):
    """The stationary law of unadjusted Langevin, x <- x + delta/2 score + sqrt(delta) z, on a
    Gaussian N(m, C): mean m, covariance C (I - delta/4 C^-1)^-1 (per eigenvalue v: v / (1 -
    delta / (4 v)), the fixed point of s = (1 - delta/(2v))^2 s + delta)."""
    evals, evecs = torch.linalg.eigh(law.cov)
    return law.mean, (evecs * (evals / (1 - delta / (4 * evals)))) @ evecs.T


def test_annealed_langevin_at_one_level_reaches_the_langevin_stationary_law():
    """One level (t = 0.3), many steps: the law converges to the unadjusted-Langevin stationary
    law with step delta = eps alpha^2 in x (eps relative to y = x / alpha), geometrically at the
    slowest contraction c sigma^2 / v_max = 0.26 per step: 60 steps leave < 1e-6.  The bias of
    that law against p_t (W2 = 0.1 here) is what a finite eps costs."""
    vp = processes.VP()
    g = _gaussian()
    level = _level(vp, 0.3)
    eps = level**2  # c = eps / (2 level^2) = 1/2
    law = g.marginal(0.3, vp)
    alpha = float(vp.alpha(torch.tensor(0.3)))
    mean, cov = metrics.sampler_output_law(
        "annealed_langevin", g, torch.tensor([0.9, 0.3]), vp, eps=eps, n_steps_each=60
    )
    stationary = _langevin_law(law, eps * alpha**2)
    assert float(metrics.gaussian_w2(mean, cov, *stationary)) < 1e-6
    assert _w2_to(law, *stationary) > 0.05


def test_annealed_langevin_converges_as_the_levels_get_dense():
    """At fixed eps (c = 1/4) and 2 steps per level, more levels track p_t more closely: W2 falls
    by 2^0.85 or more per doubling (measured 2^1.2 - 2^1.5), down to the Langevin bias of the last
    level (W2 = 5.5e-3 here, not reached at these N)."""
    vp = processes.VP()
    w2 = _w2_along("annealed_langevin", vp, (20, 40, 80), **_options("annealed_langevin", vp))
    for coarse, fine in zip(w2, w2[1:], strict=False):
        assert math.log2(coarse / fine) >= 1 - 0.15, w2


def test_ddpm_on_a_gaussian_mixture_matches_exact_samples():
    """A 3-component mixture under VP, from the prior at t = 1 to t_min = 0.01, against exact
    samples of p_{t_min}.  Sliced W2^2 between two independent 4,000-sample sets is not 0: its
    null law is estimated from 10 pairs of exact sets.  At 200 steps DDPM's excess over the null
    mean is within 5 null standard deviations (its own bias, first order, ~1e-4 in SW2^2, is
    below that resolution), while 10 steps are detected (excess ~ 40 standard deviations)."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0]])
    covs = torch.stack(
        [
            torch.tensor([[0.3, 0.1], [0.1, 0.2]]),
            torch.tensor([[0.2, -0.05], [-0.05, 0.3]]),
            0.15 * torch.eye(2),
        ]
    )
    mix = analytic.GaussianMixture(means, covs, torch.tensor([0.3, 0.3, 0.4]))
    vp, n, t_min = processes.VP(), 4000, 0.01
    gen = torch.Generator().manual_seed(0)

    def exact():
        return vp.marginal(mix.sample(n, generator=gen), t_min, torch.randn(n, 2, generator=gen))

    def sw2(x, y):
        return float(metrics.sliced_wasserstein(x, y, n_projections=64, generator=gen)) ** 2

    reference = exact()
    null = torch.tensor([sw2(exact(), reference) for _ in range(10)])
    excess = {}
    for steps in (200, 10):
        ts = samplers.time_grid(vp, steps, kind="uniform", t_min=t_min)
        x = vp.prior_sample((n, 2), generator=gen)
        out = samplers.ddpm(mix.denoiser(vp), x, ts, vp, generator=gen)
        excess[steps] = (sw2(out, reference) - float(null.mean())) / float(null.std())
    assert excess[200] < 5 and excess[10] > 5, excess


def test_sampler_output_law_refuses_bad_input():
    vp, g = processes.VP(), _gaussian()
    ts = samplers.time_grid(vp, 4)
    with pytest.raises(ValueError, match=r"sampler must be a callable or one of .* 'dpm'"):
        metrics.sampler_output_law("dpm", g, ts, vp)
    mix = analytic.GaussianMixture(g.means, g.covs, g.weights)
    with pytest.raises(
        ValueError, match=r"gaussian must be an analytic.Gaussian, got GaussianMixture"
    ):
        metrics.sampler_output_law("ddpm", mix, ts, vp)
    with pytest.raises(ValueError, match=r"start must be one of .* got start = 'noise'"):
        metrics.sampler_output_law("ddpm", g, ts, vp, start="noise")
    with pytest.raises(ValueError, match=r"'etta' is not an option of ddim"):
        metrics.sampler_output_law("ddim", g, ts, vp, etta=0.5)
    with pytest.raises(ValueError, match=r"'noise_sampler' is not an option"):
        metrics.sampler_output_law("ddpm", g, ts, vp, noise_sampler=lambda i, shape: None)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got eta = -1"):
        metrics.sampler_output_law("ddim", g, ts, vp, eta=-1)
    with pytest.raises(ValueError, match=r"evodiff with options \{\} is not affine"):
        metrics.sampler_output_law("evodiff", g, ts, vp)


@pytest.mark.parametrize(
    "name,options",
    [(n, {}) for n in samplers.SAMPLERS] + [("lml", {"memory": 0.5}), ("bdia", {"gamma": 0.5})],
)
def test_affine_facts_are_true(name, options):
    """The registry's ``affine`` fact, checked: on Gaussian data (an affine exact denoiser) the
    deterministic run's second difference f(a) - 2 f((a + b)/2) + f(b) vanishes to round-off
    exactly for the samplers said to be affine, and is far from zero for the others."""
    vp, g = processes.VP(), _gaussian()
    ts = samplers.time_grid(vp, 6, kind="logsnr", t_min=T_MIN, t_max=T_MAX)
    sampler = samplers.SAMPLERS[name]
    gen = torch.Generator().manual_seed(1)
    a, b = (g.marginal(T_MAX, vp).sample(16, generator=gen) for _ in range(2))

    def run(x):  # the same noise for each start
        return sampler(
            g.denoiser(vp), x, ts, vp, generator=torch.Generator().manual_seed(2), **options
        )

    second = run(a) - 2 * run((a + b) / 2) + run(b)
    size = float(run(a).abs().max())
    if sampler.is_affine(**options):
        assert float(second.abs().max()) <= 1e-12 * size, name
    else:
        assert float(second.abs().max()) > 1e-3 * size, name


@pytest.mark.parametrize(
    "name", ["ddpm", "ddim", "euler_maruyama", "heun", "pc", "annealed_langevin"]
)
def test_drawn_noise_is_the_noise_a_noise_sampler_would_give(name):
    """A sampler's own draws from ``generator`` are the standard normals that a ``noise_sampler``
    drawing from the same seeded generator hands out, scaled inside the sampler: both runs agree
    to float64 rounding (the scaled draw ``normal(0, std)`` is ``std * z`` of the same stream)."""
    vp = processes.VP()
    g = _gaussian()
    ts = samplers.time_grid(vp, 6, kind="logsnr", t_min=T_MIN, t_max=T_MAX)
    x = g.marginal(T_MAX, vp).sample(32, generator=torch.Generator().manual_seed(0))
    options = _options(name, vp)
    run = samplers.SAMPLERS[name]
    own = run(g.denoiser(vp), x, ts, vp, generator=torch.Generator().manual_seed(3), **options)
    replay = torch.Generator().manual_seed(3)
    given = run(
        g.denoiser(vp),
        x,
        ts,
        vp,
        noise_sampler=lambda i, shape: torch.randn(shape, generator=replay, dtype=x.dtype),
        **options,
    )
    torch.testing.assert_close(own, given, rtol=1e-12, atol=1e-12)
