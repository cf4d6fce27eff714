"""Classifier and classifier-free guidance against the exact mixture, and the CFG gap.

For a Gaussian mixture the classes are the components, and ``p_t(c | x)``, the conditional
scores and denoisers are exact, so guided denoisers can be compared with exact ones to float
precision, and the law CFG samples with the tilted law it is often said to sample.
"""

import functools
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from diffcore import analytic, flowmap, guidance, metrics, nets, processes, samplers, targets, train

from .test_analytic import make_mixture


@pytest.fixture
def mixture():
    return make_mixture()


def _mixture_1d():
    """Two classes on the line, unequal widths: the tilted law has no closed form, a grid does it."""
    return analytic.GaussianMixture(
        torch.tensor([[-1.0], [1.5]]), torch.tensor([[[0.3]], [[0.6]]]), torch.tensor([0.5, 0.5])
    )


def test_exact_classifier_gradient_is_the_difference_of_scores(process, gen, mixture):
    """Bayes: grad log p_t(c | x) = grad log p_t(x | c) - grad log p_t(x); and the autograd
    gradient agrees with central differences of log p_t(c | x) (error O(h^2) ~ 1e-10)."""
    log_class = guidance.exact_class_log_prob(mixture, process)
    x = 2 * torch.randn(6, 2, generator=gen)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.95])  # one time per sample
    label = torch.tensor([0, 1, 2, 2, 1, 0])
    grad = guidance.classifier_gradient(log_class, x, t, label)
    expected = mixture.score(x, t, process, label=label) - mixture.score(x, t, process)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)
    h = 1e-5
    for i in range(2):
        e = torch.zeros(2)
        e[i] = h
        central = (log_class(x + e, t, label) - log_class(x - e, t, label)) / (2 * h)
        torch.testing.assert_close(grad[:, i], central, rtol=1e-6, atol=1e-6)
    # log p_t(c | x) is a log-probability: the classes' probabilities sum to one
    total = sum(torch.exp(log_class(x, t, k)) for k in range(3))
    torch.testing.assert_close(total, torch.ones(6), rtol=1e-12, atol=1e-12)


def test_classifier_guidance_with_w_one_is_the_conditional_denoiser(process, gen, mixture):
    """score + grad log p(c | x) is the conditional score exactly, so the guided denoiser is the
    class-conditional one to round-off (the correction sigma^2/alpha grad carries ~1e-16/alpha)."""
    log_class = guidance.exact_class_log_prob(mixture, process)
    x = 2 * torch.randn(8, 2, generator=gen)
    for t in (0.02, 0.4, 0.9):
        for c in range(3):
            guided = guidance.classifier_guided_denoiser(
                mixture.denoiser(process), log_class, process, c, w=1.0
            )
            torch.testing.assert_close(
                guided(x, t), mixture.denoise(x, t, process, label=c), rtol=1e-9, atol=1e-9
            )
    unguided = guidance.classifier_guided_denoiser(
        mixture.denoiser(process), log_class, process, 1, w=0.0
    )
    assert torch.equal(unguided(x, 0.4), mixture.denoise(x, 0.4, process))


def test_cfg_with_w_is_classifier_guidance_with_scale_one_plus_w(process, gen, mixture):
    log_class = guidance.exact_class_log_prob(mixture, process)
    model = guidance.exact_conditional_model(mixture, process)
    x = 2 * torch.randn(8, 2, generator=gen)
    for w in (-1.0, -0.5, 0.0, 0.7, 3.0):
        cfg = guidance.cfg_denoiser(model, process, 2, w, target="x0")
        classifier = guidance.classifier_guided_denoiser(
            mixture.denoiser(process), log_class, process, 2, w=1 + w
        )
        for t in (0.1, 0.6):
            torch.testing.assert_close(cfg(x, t), classifier(x, t), rtol=1e-9, atol=1e-9)
    # the ends: w = 0 is the conditional model and w = -1 the unconditional one
    cond = guidance.cfg_denoiser(model, process, 2, 0.0, target="x0")
    assert torch.equal(cond(x, 0.3), mixture.denoise(x, 0.3, process, label=2))
    uncond = guidance.cfg_denoiser(model, process, 2, -1.0, target="x0")
    torch.testing.assert_close(uncond(x, 0.3), mixture.denoise(x, 0.3, process), rtol=0, atol=1e-14)


def test_guiding_any_target_gives_the_same_denoiser(process, gen, mixture):
    """Targets are affine in one another at fixed (x, t) and the CFG weights sum to one, so the
    guided denoiser does not depend on the target guided; only round-off in the conversions
    (divisions by alpha_t, sigma_t of order 1e-2 at worst here) separates them."""
    x = 2 * torch.randn(8, 2, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6])
    label = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    reference = guidance.cfg_denoiser(
        guidance.exact_conditional_model(mixture, process, "x0"), process, label, 2.5, "x0"
    )(x, t)
    for target in targets.TARGETS:
        model = guidance.exact_conditional_model(mixture, process, target)
        guided = guidance.cfg_denoiser(model, process, label, 2.5, target)
        torch.testing.assert_close(guided(x, t), reference, rtol=1e-9, atol=1e-9)
    # not a vacuous check: guidance moved the denoiser away from the conditional one
    assert float((reference - mixture.denoise(x, t, process, label=label)).abs().max()) > 0.1


def _with_noise(name):
    return {"generator": torch.Generator().manual_seed(3)}  # deterministic samplers ignore it


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_runs_guided(name, mixture):
    """A guided denoiser is a denoiser: each sampler (same seed for the noisy ones) gives with
    classifier guidance at w = 1 the samples of the exact conditional model, and with CFG at
    w = 0 exactly the samples of the conditional model."""
    vp = processes.VP()
    ts = samplers.time_grid(vp, 8, kind="logsnr", t_min=1e-2, t_max=1.0)
    x = vp.prior_sample((16, 2), generator=torch.Generator().manual_seed(0))
    sampler = samplers.SAMPLERS[name]
    conditional = sampler(mixture.denoiser(vp, label=1), x, ts, vp, **_with_noise(name))
    log_class = guidance.exact_class_log_prob(mixture, vp)
    classifier = guidance.classifier_guided_denoiser(mixture.denoiser(vp), log_class, vp, 1, 1.0)
    torch.testing.assert_close(
        sampler(classifier, x, ts, vp, **_with_noise(name)), conditional, rtol=1e-8, atol=1e-8
    )
    cfg = guidance.cfg_denoiser(guidance.exact_conditional_model(mixture, vp), vp, 1, 0.0, "x0")
    assert torch.equal(sampler(cfg, x, ts, vp, **_with_noise(name)), conditional)


def test_classifier_guided_samples_follow_the_class_law(mixture):
    """From the exact class marginal at t = 1 (VP), the PF-ODE of the classifier-guided
    unconditional model (w = 1) lands on the class law at t_min.  Sliced W2 against fresh exact
    class samples: two independent 2000-samples of one law sit ~0.03 apart (Monte Carlo,
    n^{-1/2} times the scale), and Heun's error at 40 steps is below 1e-3; the unguided model,
    which lands on the whole mixture, is ~1 away."""
    vp = processes.VP()
    c, n, t_min = 0, 2000, 1e-3
    component = analytic.Gaussian(mixture.means[c], mixture.covs[c])
    ts = samplers.time_grid(vp, 40, kind="logsnr", t_min=t_min, t_max=1.0)
    x1 = component.marginal(1.0, vp).sample(n, generator=torch.Generator().manual_seed(1))
    log_class = guidance.exact_class_log_prob(mixture, vp)
    guided = guidance.classifier_guided_denoiser(mixture.denoiser(vp), log_class, vp, c, 1.0)
    out = samplers.heun(guided, x1, ts, vp)
    exact = component.marginal(t_min, vp).sample(n, generator=torch.Generator().manual_seed(2))
    distance = float(
        metrics.sliced_wasserstein(out, exact, generator=torch.Generator().manual_seed(0))
    )
    floor = float(
        metrics.sliced_wasserstein(
            component.marginal(t_min, vp).sample(n, generator=torch.Generator().manual_seed(3)),
            exact,
            generator=torch.Generator().manual_seed(0),
        )
    )
    unguided = samplers.heun(mixture.denoiser(vp), x1, ts, vp)
    far = float(
        metrics.sliced_wasserstein(unguided, exact, generator=torch.Generator().manual_seed(0))
    )
    assert distance < 0.06 and floor < 0.06, (distance, floor)
    assert far > 10 * distance, (far, distance)


def _tilted_grid_law(mixture, label, w):
    """The normalised tilted density on a fine grid: points, density and CDF (trapezoid rule,
    error O(dx^2) ~ 1e-7 with dx = 5e-4)."""
    grid = torch.linspace(-12.0, 12.0, 48001)
    log_p = guidance.tilted_log_density(mixture, label, w)(grid[:, None])
    p = torch.exp(log_p - log_p.max()).numpy()
    x = grid.numpy()
    p = p / scipy.integrate.trapezoid(p, x)
    return x, p, scipy.integrate.cumulative_trapezoid(p, x, initial=0.0)


def test_sample_tilted_is_exact(mixture):
    """Rejection samples of p_w(x | c) against the grid law: means within 4 standard errors
    sqrt(var / n), variances within 4 sqrt(2 var^2 / n) (Gaussian-like tails); for w >= 0 and
    for w in [-1, 0), whose proposal is the mixture."""
    m = _mixture_1d()
    n = 20000
    for c, w in ((0, 2.0), (1, 0.5), (0, -0.5)):
        x, p, _ = _tilted_grid_law(m, c, w)
        mean = scipy.integrate.trapezoid(p * x, x)
        var = scipy.integrate.trapezoid(p * (x - mean) ** 2, x)
        y = guidance.sample_tilted(m, c, w, n, generator=torch.Generator().manual_seed(c))
        assert y.shape == (n, 1)
        assert abs(float(y.mean()) - mean) < 4 * math.sqrt(var / n), (c, w)
        assert abs(float(y.var()) - var) < 4 * var * math.sqrt(2 / n), (c, w)
    # w = 0 is the class law; 2-D works as well
    y = guidance.sample_tilted(mixture, 1, 0.0, 4000, generator=torch.Generator().manual_seed(0))
    assert y.shape == (4000, 2)
    assert float((y.mean(0) - mixture.means[1]).norm()) < 4 * math.sqrt(0.8 / 4000)


def test_cfg_does_not_sample_the_tilted_law():
    """The CFG gap, without Monte Carlo.  In 1-D the PF-ODE is a monotone map T of its start,
    so with Linear (p_1 = N(0, 1) exactly, for every class) the law CFG samples has quantiles
    T(Phi^{-1}(u)); its moments and its W2 to the tilted law are Gauss-Hermite sums over
    z = Phi^{-1}(u).  The control w = 0 (CFG is then the conditional model, the tilted law the
    class law) measures the method's own error: the solver's (~1e-4 at 64 steps) and the
    grid's (measured 1.4e-5).  At w = 1 the gap is W2 = 0.34: CFG overshoots, pushing the class
    away from the other one (mean -0.31 further) and shrinking it (variance x0.58), far more
    than the tilted law does."""
    m, c = _mixture_1d(), 0
    linear = processes.Linear()
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    u = scipy.stats.norm.cdf(nodes)

    def cfg_vs_tilted(w):
        cfg = guidance.cfg_denoiser(guidance.exact_conditional_model(m, linear), linear, c, w, "x0")
        out = flowmap.exact_flow_map(cfg, torch.tensor(nodes)[:, None], 1.0, 0.0, linear, 64)
        out = out[:, 0].numpy()
        x, p, cdf = _tilted_grid_law(m, c, w)
        w2 = math.sqrt(np.sum(weights * (out - np.interp(u, cdf, x)) ** 2))
        mean_cfg, mean_tilted = np.sum(weights * out), scipy.integrate.trapezoid(p * x, x)
        var_cfg = np.sum(weights * (out - mean_cfg) ** 2)
        var_tilted = scipy.integrate.trapezoid(p * (x - mean_tilted) ** 2, x)
        return w2, mean_cfg - mean_tilted, var_cfg / var_tilted

    control, _, _ = cfg_vs_tilted(0.0)
    gap, mean_shift, var_ratio = cfg_vs_tilted(1.0)
    assert control < 1e-3, control
    assert gap > 300 * control and gap > 0.25, (gap, control)
    assert mean_shift < -0.2 and var_ratio < 0.7, (mean_shift, var_ratio)


def test_a_conditional_net_trained_with_label_dropout_gives_cfg():
    """End to end at toy size (the chapter trains properly): a class-conditional MLP trained
    with p_uncond, guided by CFG.  Shapes, w = 0 is the conditional network exactly, None is
    the null label, and the guided denoiser feeds a sampler."""
    mixture = make_mixture()
    vp = processes.VP()
    torch.manual_seed(0)
    net = nets.MLP(2, hidden=32, depth=2, n_classes=3)
    data = mixture.sample(512, generator=torch.Generator().manual_seed(0), return_labels=True)
    loss = functools.partial(train.eps_loss, process=vp, p_uncond=0.2)
    model, losses = train.fit(
        net, loss, data, steps=30, batch_size=128, generator=torch.Generator().manual_seed(1)
    )
    assert losses[-1] < losses[0]
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x, 0.5, None), model(x, 0.5, model.null_label))
    guided = guidance.cfg_denoiser(model, vp, 2, 3.0, target="eps")
    assert guided(x, 0.5).shape == (5, 2)
    conditional = targets.as_denoiser(lambda x, t: model(x, t, 2), "eps", vp)
    assert torch.equal(guidance.cfg_denoiser(model, vp, 2, 0.0)(x, 0.5), conditional(x, 0.5))
    assert not torch.allclose(guided(x, 0.5), conditional(x, 0.5))
    ts = samplers.time_grid(vp, 5, kind="logsnr", t_min=1e-2, t_max=1.0)
    assert torch.isfinite(samplers.dpmpp_2m(guided, x, ts, vp)).all()


def test_bad_input_is_refused(mixture):
    vp = processes.VP()
    model = guidance.exact_conditional_model(mixture, vp)
    log_class = guidance.exact_class_log_prob(mixture, vp)
    denoiser = mixture.denoiser(vp)
    with pytest.raises(ValueError, match="target must be one of .* got target = 'noise'"):
        guidance.cfg_denoiser(model, vp, 0, 1.0, target="noise")
    with pytest.raises(ValueError, match="target must be one of"):
        guidance.exact_conditional_model(mixture, vp, "noise")
    with pytest.raises(ValueError, match=r"w must be a finite number >= -1, got w = -1.5"):
        guidance.cfg_denoiser(model, vp, 0, -1.5)
    with pytest.raises(ValueError, match=r"w must be a finite number >= 0, got w = -0.5"):
        guidance.classifier_guided_denoiser(denoiser, log_class, vp, 0, -0.5)
    with pytest.raises(ValueError, match="got w = nan"):
        guidance.cfg_denoiser(model, vp, 0, math.nan)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 3\), got label = \[3\]"):
        guidance.cfg_denoiser(model, vp, 3, 1.0)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 3\), got label = \[-1, 5\]"):
        guidance.classifier_guided_denoiser(denoiser, log_class, vp, torch.tensor([0, -1, 5]), 1.0)
    with pytest.raises(ValueError, match="label must be a class index .* got label = None"):
        guidance.cfg_denoiser(model, vp, None, 1.0)
    with pytest.raises(ValueError, match="label must be a class index"):
        guidance.cfg_denoiser(model, vp, 1.5, 1.0)
    net = nets.MLP(2, hidden=8, depth=1, n_classes=4)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 4\), got label = \[4\]"):
        guidance.cfg_denoiser(net, vp, 4, 1.0)  # the null label is no class to guide to
    with pytest.raises(ValueError, match=r"label must lie in \[0, 3\), got label = \[7\]"):
        log_class(torch.zeros(2, 2), 0.5, 7)
    with pytest.raises(ValueError, match="one class index"):
        guidance.tilted_log_density(mixture, torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 3\), got label = \[3\]"):
        guidance.sample_tilted(mixture, 3, 1.0, 10)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got n = 0"):
        guidance.sample_tilted(mixture, 0, 1.0, 0)
    twins = analytic.GaussianMixture(
        torch.zeros(2, 1), torch.ones(2, 1, 1), torch.tensor([0.5, 0.5])
    )
    with pytest.raises(ValueError, match="acceptance rate is too small"):
        guidance.sample_tilted(twins, 0, 40.0, 100, max_rounds=3)  # accepts with p = 2^-40
    linear = processes.Linear()
    guided = guidance.classifier_guided_denoiser(
        mixture.denoiser(linear), guidance.exact_class_log_prob(mixture, linear), linear, 0, 1.0
    )
    with pytest.raises(ValueError, match="classifier guidance needs alpha_t > 0"):
        guided(torch.zeros(3, 2), 1.0)
    with pytest.raises(
        ValueError, match=r"log_prob_class must return a tensor of shape \(3,\), got shape \(\)"
    ):
        guidance.classifier_gradient(lambda x, t, c: x.sum(), torch.zeros(3, 2), 0.5, 0)
