"""Denoising MCMC (Denoising Langevin Gibbs) against exact laws on Gaussian and mixture data."""

import math

import pytest
import torch

from diffcore import analytic, dmcmc, metrics, processes, samplers
from diffcore.stepping import Trace

from ._moments import assert_gaussian_moments

DT = torch.float64
VP = processes.VP()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _levels(n, t_min=0.05):
    return samplers.time_grid(VP, n - 1, kind="uniform", t_min=t_min, t_max=1.0)


def _gaussian():
    evals = torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=DT)
    basis, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(0), dtype=DT))
    mean = torch.tensor([1.0, -0.5, 0.0, 0.3], dtype=DT)
    return analytic.Gaussian(mean, basis @ torch.diag(evals) @ basis.T)


def _mixture():
    means = torch.tensor([[-1.5, 0.5], [1.5, -0.5], [0.0, 1.5]], dtype=DT)
    covs = torch.stack(
        [torch.diag(torch.tensor(v, dtype=DT)) for v in ([0.2, 0.1], [0.1, 0.3], [0.15, 0.15])]
    )
    return analytic.GaussianMixture(means, covs, torch.tensor([0.3, 0.5, 0.2], dtype=DT))


def _ramp_prior(n, top=2.0):
    prior = torch.linspace(1.0, top, n, dtype=DT)
    return prior / prior.sum()


def _marginal_cov(data, t, exponent=2):
    """The covariances alpha^2 Sigma_k + sigma^exponent I of p_t's components (exponent 2: the
    true ones; exponent 1: a wrong coefficient, for the failing variant)."""
    a, s = VP.alpha(torch.tensor(t, dtype=DT)), VP.sigma(torch.tensor(t, dtype=DT))
    return a**2 * data.covs + s**exponent * torch.eye(data.dim, dtype=DT)


def _bayes(data, x, levels, prior, exponent=2):
    """log p(t_l | x) written out: pi_l sum_k w_k N(x; alpha mu_k, C_k(t_l)), normalised."""
    columns = []
    for t in levels.tolist():
        a = VP.alpha(torch.tensor(t, dtype=DT))
        comps = torch.distributions.MultivariateNormal(
            a * data.means, covariance_matrix=_marginal_cov(data, t, exponent)
        )
        log_pk = comps.log_prob(x[:, None, :]) + torch.log(data.weights)
        columns.append(torch.logsumexp(log_pk, dim=-1))
    logits = torch.stack(columns, dim=-1) + torch.log(prior)
    return torch.log_softmax(logits, dim=-1)


# -- the exact pieces ----------------------------------------------------------------------------
def test_level_posterior_is_bayes_rule_with_the_exact_marginals():
    data, levels = _mixture(), _levels(7)
    prior = _ramp_prior(7)
    x, _ = dmcmc.sample_joint(data, levels, VP, 64, prior=prior, generator=_gen(1))
    got = dmcmc.level_log_posterior(data, x, levels, VP, prior)
    want = _bayes(data, x, levels, prior)
    gap = float((got - want).abs().max())
    print(f"\nlevel posterior against Bayes' rule written out: {gap:.1e}")
    assert gap < 1e-12 and float((got.exp().sum(-1) - 1).abs().max()) < 1e-12
    # the same classifier as a callable
    classify = dmcmc.level_classifier(data, levels, VP, prior)
    assert torch.equal(classify(x), got)
    # failing variant: sigma_t instead of sigma_t^2 in the marginal covariance
    wrong = float((_bayes(data, x, levels, prior, exponent=1) - got).abs().max())
    print(f"with sigma_t for sigma_t^2: {wrong:.2f}")
    assert wrong > 0.1


def _step_matrices(step, gaussian, t, delta):
    """The exact Langevin step at level t as x -> m + E (x - m) + S z, by probing."""
    d = gaussian.dim
    a = float(VP.alpha(torch.tensor(t, dtype=DT)))
    m = a * gaussian.mean
    ones = torch.full((d,), t, dtype=DT)
    zero = torch.zeros(d, d, dtype=DT)
    eye = torch.eye(d, dtype=DT)
    base = step(m.expand(d, d), ones, delta, zero)  # every row m
    gain_x = (step(m + eye, ones, delta, zero) - base).T
    gain_z = (step(m.expand(d, d), ones, delta, eye) - base).T
    return base, gain_x, gain_z


@pytest.mark.parametrize("t", [0.05, 0.4, 1.0])
def test_exact_langevin_step_leaves_p_t_invariant(t):
    gaussian = _gaussian()
    step = dmcmc.gaussian_langevin_step(gaussian, VP)
    law = gaussian.marginal(t, VP)
    delta = 0.3
    base, gain_x, gain_z = _step_matrices(step, gaussian, t, delta)
    moved = gain_x @ law.cov @ gain_x.T + gain_z @ gain_z.T
    gap = float((base - law.mean).abs().max() + (moved - law.cov).abs().max())
    print(f"\nt = {t}: exact Langevin step moves N(m_t, C_t) by {gap:.1e}")
    assert gap < 1e-12
    # failing variant: the Euler-Maruyama step of the same size widens C_t by about delta/4
    eye = torch.eye(gaussian.dim, dtype=DT)
    ula = eye - delta / 2 * torch.linalg.inv(law.cov)
    widened = ula @ law.cov @ ula.T + delta * eye
    wrong = float((widened - law.cov).abs().max())
    print(f"the Euler-Maruyama (ULA) step moves it by {wrong:.3f}")
    assert wrong > 1e-3


def test_integrate_from_levels_is_the_flow_from_each_samples_own_time():
    gaussian, levels = _gaussian(), _levels(6)
    x, index = dmcmc.sample_joint(gaussian, levels, VP, 50, generator=_gen(2))
    t = levels[index]
    flow = dmcmc.integrate_from_levels(gaussian.pf_ode_solver(), None, x, t, VP, n_steps=1)
    exact = gaussian.pf_ode_map(x, t, 0.0, VP)
    gap = float((flow - exact).abs().max())
    # a sampler on the groups: each sample as if run alone on its own grid
    D = gaussian.denoiser(VP)
    heun = dmcmc.integrate_from_levels("heun", D, x, t, VP, n_steps=8)
    alone = torch.cat(
        [
            samplers.heun(
                D, x[b : b + 1], samplers.time_grid(VP, 8, t_min=0.0, t_max=float(tb)), VP
            )
            for b, tb in enumerate(t)
        ]
    )
    gap_heun = float((heun - alone).abs().max())
    print(
        f"\nper-sample exact flow: {gap:.1e}; grouped Heun against one run per sample: {gap_heun:.1e}"
    )
    assert gap < 1e-12 and gap_heun < 1e-12
    # failing variant: the times of other samples
    shuffled = dmcmc.integrate_from_levels(
        gaussian.pf_ode_solver(), None, x, t.flip(0), VP, n_steps=1
    )
    assert float((shuffled - exact).abs().max()) > 0.1


# -- the exact chain -----------------------------------------------------------------------------
def test_exact_gibbs_chain_reaches_the_prior_over_levels_and_the_data_law():
    gaussian, n_levels, n = _gaussian(), 12, 4000
    levels, prior = _levels(n_levels), _ramp_prior(n_levels)
    classifier = dmcmc.level_classifier(gaussian, levels, VP, prior)
    start = torch.randn(n, gaussian.dim, generator=_gen(3), dtype=DT)  # every chain at t = 1
    trace = Trace()
    chain = dmcmc.denoising_langevin_gibbs(
        None,
        start,
        0,
        levels,
        VP,
        classifier=classifier,
        n_steps=60,
        step_size=5.0,
        langevin=dmcmc.gaussian_langevin_step(gaussian, VP),
        generator=_gen(4),
        callback=trace,
    )
    assert trace.nfe == 0 and trace.stack("level").shape == (60, n)
    assert torch.equal(chain.x, chain.x_last) and torch.equal(chain.t, levels[chain.level])
    # the last levels of n independent chains: multinomial(n, prior), 5 standard errors each
    freq = torch.bincount(chain.level, minlength=n_levels).to(DT) / n
    z_level = (freq - prior) / torch.sqrt(prior * (1 - prior) / n)
    print(f"\nlevel frequencies against the prior: max |z| = {float(z_level.abs().max()):.2f}")
    assert float(z_level.abs().max()) < 5
    out = dmcmc.integrate_from_levels(
        gaussian.pf_ode_solver(), None, chain.x, chain.t, VP, n_steps=1
    )
    assert_gaussian_moments(out, gaussian.mean, gaussian.cov)
    # failing variant: the same states integrated from t = 1, as if they were fresh noise
    wrong = gaussian.pf_ode_map(chain.x, 1.0, 0.0, VP)
    var = gaussian.cov.diagonal()
    z_wrong = (wrong.T.cov().diagonal() - var) / (var * math.sqrt(2 / n))
    print(
        f"integrated from t = 1 instead: max |z| of the variances = {float(z_wrong.abs().max()):.0f}"
    )
    assert float(z_wrong.abs().max()) > 5


def _two_sample_z(a, b):
    """|z| of the differences of means and of centred second moments of two independent
    samples, with standard errors from the samples themselves."""
    n = a.shape[0]
    z = [(a.mean(0) - b.mean(0)) / torch.sqrt((a.var(0) + b.var(0)) / n)]
    ca, cb = a - a.mean(0), b - b.mean(0)
    pa, pb = ca[:, :, None] * ca[:, None, :], cb[:, :, None] * cb[:, None, :]
    z.append((pa.mean(0) - pb.mean(0)) / torch.sqrt((pa.var(0) + pb.var(0)) / n))
    return max(float(v.abs().max()) for v in z)


def test_langevin_gibbs_with_the_model_keeps_the_joint_law_of_a_mixture():
    data, n_levels, n = _mixture(), 20, 4000
    levels, prior = _levels(n_levels), _ramp_prior(n_levels, top=5.0)
    D = data.denoiser(VP)
    classifier = dmcmc.level_classifier(data, levels, VP, prior)
    x, index = dmcmc.sample_joint(data, levels, VP, n, prior=prior, generator=_gen(5))
    trace = Trace()
    chain = dmcmc.denoising_langevin_gibbs(
        D,
        x,
        index,
        levels,
        VP,
        classifier=classifier,
        n_steps=20,
        step_size=0.05,
        generator=_gen(6),
        callback=trace,
    )
    assert trace.nfe == 20 and trace.denoised.shape == (20, n, 2)
    freq = torch.bincount(chain.level, minlength=n_levels).to(DT) / n
    z_level = float(((freq - prior) / torch.sqrt(prior * (1 - prior) / n)).abs().max())
    # the output against the same integrator run on fresh exact draws of the joint law
    out = dmcmc.integrate_from_levels("heun", D, chain.x, chain.t, VP, n_steps=20)
    fresh_x, fresh_index = dmcmc.sample_joint(data, levels, VP, n, prior=prior, generator=_gen(7))
    fresh = dmcmc.integrate_from_levels("heun", D, fresh_x, levels[fresh_index], VP, n_steps=20)
    z_out = _two_sample_z(out, fresh)
    print(
        f"\nmixture: levels max |z| = {z_level:.2f}; output against fresh draws max |z| = {z_out:.2f}"
    )
    assert z_level < 5 and z_out < 5
    # failing variant: a classifier with the wrong prior (uniform) moves the levels off pi
    flat = dmcmc.level_classifier(data, levels, VP)
    drawn = torch.multinomial(flat(x).exp(), 1, generator=_gen(8))[:, 0]
    freq_flat = torch.bincount(drawn, minlength=n_levels).to(DT) / n
    z_flat = float(((freq_flat - prior) / torch.sqrt(prior * (1 - prior) / n)).abs().max())
    print(f"with a uniform prior in the classifier: levels max |z| = {z_flat:.1f}")
    assert z_flat > 5


# -- the released code's shortcuts ---------------------------------------------------------------
def test_shortcuts_of_the_released_code_change_the_output_law():
    d, s, n, n_levels = 8, 0.25, 4000, 40
    gaussian = analytic.Gaussian(torch.zeros(d, dtype=DT), s * torch.eye(d, dtype=DT))
    levels = _levels(n_levels, t_min=0.02)
    classifier = dmcmc.level_classifier(gaussian, levels, VP)  # uniform prior
    step = dmcmc.gaussian_langevin_step(gaussian, VP)
    x, index = dmcmc.sample_joint(gaussian, levels, VP, n, generator=_gen(9))
    # v(t) = alpha^2 s + sigma^2, the variance per coordinate of p_t; r its largest grid ratio
    v = VP.alpha(levels) ** 2 * s + VP.sigma(levels) ** 2
    ratio = float((v[:-1] / v[1:]).max())
    rows, outs = {}, {}
    for choice in dmcmc.LEVEL_CHOICES:
        for keep in dmcmc.KEEPS:
            chain = dmcmc.denoising_langevin_gibbs(
                None,
                x,
                index,
                levels,
                VP,
                classifier=classifier,
                n_steps=10,
                step_size=2.0,
                level_choice=choice,
                keep=keep,
                langevin=step,
                generator=_gen(10),
            )
            out = gaussian.pf_ode_map(chain.x, chain.t, 0.0, VP)
            norm = out.pow(2).sum(-1) / (d * s)  # chi^2_d / d for the data: mean 1, var 2/d
            w2 = float(metrics.gaussian_w2(out.mean(0), out.T.cov(), gaussian.mean, gaussian.cov))
            rows[choice, keep] = (float(norm.mean()), float(norm.var()) * d / 2, w2, chain)
            outs[choice, keep] = out
    fresh = gaussian.sample(n, generator=_gen(11))
    floor = float(metrics.gaussian_w2(fresh.mean(0), fresh.T.cov(), gaussian.mean, gaussian.cov))
    print(f"\nmoment W2 of {n} exact data samples (the Monte-Carlo floor): {floor:.3f}")
    print(
        f"{'level':>7} {'keep':>9} {'E|x|^2/ds':>10} {'Var ratio':>10} {'moment W2':>10} {'mean t':>7}"
    )
    for (choice, keep), (mean, var, w2, chain) in rows.items():
        print(
            f"{choice:>7} {keep:>9} {mean:10.3f} {var:10.3f} {w2:10.3f} {float(chain.t.mean()):7.3f}"
        )
    # the paper's chain (a draw, the last state) is exact: the data law within its MC bounds
    assert_gaussian_moments(outs["sample", "last"], gaussian.mean, gaussian.cov)
    # arg-max: the maximum-likelihood level maps x to the sphere |x0|^2 = d s, up to the grid
    # ratio r, wherever |x|^2 / d lies inside the grid's range of v
    chain = rows["argmax", "last"][3]
    inside = (chain.x_last.pow(2).sum(-1) / d > v.min()) & (
        chain.x_last.pow(2).sum(-1) / d < v.max()
    )
    norm = outs["argmax", "last"].pow(2).sum(-1)[inside] / (d * s)
    print(
        f"arg-max, inside the range ({int(inside.sum())} of {n}): |x0|^2/ds in "
        f"[{float(norm.min()):.4f}, {float(norm.max()):.4f}], r = {ratio:.4f}"
    )
    assert float(norm.min()) >= 1 / ratio - 1e-12 and float(norm.max()) <= ratio + 1e-12
    # keeping the smallest level selects x that look noisier than their level: over-dispersed
    norm = outs["sample", "smallest"].pow(2).sum(-1) / (d * s)
    assert float(norm.mean()) > 1 + 5 * float(norm.std()) / math.sqrt(n)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_value_named():
    data, levels = _mixture(), _levels(5)
    classifier = dmcmc.level_classifier(data, levels, VP)
    x = torch.zeros(3, 2, dtype=DT)
    run = dict(classifier=classifier, n_steps=2)
    D = data.denoiser(VP)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="step_size"):
            dmcmc.denoising_langevin_gibbs(D, x, 0, levels, VP, step_size=bad, **run)
    for bad_levels in ([0.0, 0.5], [0.5, 1.5], [0.3, 0.3]):
        with pytest.raises(ValueError, match="levels"):
            dmcmc.denoising_langevin_gibbs(D, x, 0, bad_levels, VP, **run)
    with pytest.raises(ValueError, match="n_steps"):
        dmcmc.denoising_langevin_gibbs(D, x, 0, levels, VP, classifier=classifier, n_steps=0)
    with pytest.raises(ValueError, match="level_choice"):
        dmcmc.denoising_langevin_gibbs(D, x, 0, levels, VP, level_choice="mode", **run)
    with pytest.raises(ValueError, match="keep"):
        dmcmc.denoising_langevin_gibbs(D, x, 0, levels, VP, keep="first", **run)
    with pytest.raises(ValueError, match="level"):
        dmcmc.denoising_langevin_gibbs(D, x, 5, levels, VP, **run)
    with pytest.raises(ValueError, match=r"classifier\(x\)"):
        dmcmc.denoising_langevin_gibbs(
            D, x, 0, levels, VP, classifier=lambda v: v[:, :1], n_steps=1
        )
    with pytest.raises(ValueError, match="prior"):
        dmcmc.level_classifier(data, levels, VP, prior=[0.5, 0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="t"):
        dmcmc.integrate_from_levels("heun", D, x, torch.zeros(3, dtype=DT), VP, n_steps=2)
    with pytest.raises(ValueError, match="n_steps"):
        dmcmc.integrate_from_levels("heun", D, x, torch.full((3,), 0.5), VP, n_steps=0)
