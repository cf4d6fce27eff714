"""Priors from measurements only (MSM, SelfDB, the score-based KL), against exact answers.

Losses are checked at their exact minimisers through the quadratic in a perturbation
``delta * g``: with common random numbers a loss is exactly ``L(0) + 2 delta C + delta^2 Q``,
so ``C = (L(h) - L(-h)) / 4h`` (the directional derivative / 2) must vanish within its
Monte-Carlo error at the minimiser, estimated here from independent batches, and ``Q > 0``.
"""

import math

import pytest
import torch

from diffcore import analytic, processes, samplers
from diffcore.bridges import BrownianBridge
from diffcore.inverse import measurements as ms
from diffcore.inverse import operators as op

VP = processes.VP()
VE = processes.VE(sigma_min=1e-4, sigma_max=1e4)


def _corr_gaussian(d=4, rho=0.8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(d, dtype=torch.float64)
    cov = rho ** (idx[:, None] - idx[None, :]).abs()
    return analytic.Gaussian(torch.randn(d, generator=gen), cov)


def _diag_gaussian(d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return analytic.Gaussian(
        torch.randn(d, generator=gen), torch.diag(0.5 + torch.rand(d, generator=gen))
    )


def _slope(loss_at, h, batches=12):
    """C and Q of the quadratic loss(delta) over independent batches: (C mean, C s.e., Q)."""
    cs, qs = [], []
    for b in range(batches):
        lp, lm, l0 = loss_at(h, b), loss_at(-h, b), loss_at(0.0, b)
        cs.append((lp - lm) / (4 * h))
        qs.append((lp + lm - 2 * l0) / (2 * h * h))
    c = torch.tensor(cs)
    return float(c.mean()), float(c.std() / math.sqrt(batches)), float(torch.tensor(qs).mean())


# -- MSM -----------------------------------------------------------------------------------------
def test_partial_denoiser_is_tweedie_on_the_marginal_and_zero_off_the_mask():
    prior = _corr_gaussian()
    D = ms.partial_denoiser(prior, VP)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=gen)
    mask = torch.tensor([True, False, True, True])
    out = D(x, 0.4, mask)
    S = torch.tensor([0, 2, 3])
    a, s = float(VP.alpha(0.4)), float(VP.sigma(0.4))
    cov = prior.cov[S][:, S]
    gain = a * cov @ torch.linalg.inv(a**2 * cov + s**2 * torch.eye(3))
    want = prior.mean[S] + (x[:, S] - a * prior.mean[S]) @ gain.T
    assert torch.allclose(out[:, S], want, atol=1e-12)
    assert bool((out[:, 1] == 0).all())
    # the full mask is the full denoiser; per-sample masks are grouped correctly
    full = D(x, 0.4, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(full, prior.denoise(x, 0.4, VP), atol=1e-12)
    per = torch.stack([mask, torch.ones(4, dtype=torch.bool)] * 2 + [mask])
    mixed = D(x, 0.4, per)
    assert torch.allclose(mixed[0], out[0], atol=1e-12)
    assert torch.allclose(mixed[1], full[1], atol=1e-12)


def test_bad_masks_and_noise_levels_are_named():
    prior = _corr_gaussian()
    D = ms.partial_denoiser(prior, VP)
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="mask must have the shape"):
        D(x, 0.5, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        D(x, 0.5, torch.ones(4))
    with pytest.raises(ValueError, match="sigma_y"):
        ms.msm_loss(D, x, torch.ones(4, dtype=torch.bool), VP, sigma_y=-0.1)
    with pytest.raises(ValueError, match="sigma"):
        ms.sigma_denoiser(prior.denoiser(VE), VE)(x, 0.0)
    with pytest.raises(ValueError, match="sigmas must be positive"):
        ms.quadrature_kl([-1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="keep"):
        ms.random_masks((2, 4), 0.0)


def _msm_slope(prior, model, sigma_y, t_sampler=None, n=4000):
    """C and its s.e. for msm_loss at model + delta * (x + g): the minimiser's error is
    orthogonal to every function of the input, here a constant and the input itself."""
    gen = torch.Generator().manual_seed(2)
    g_dir = torch.tensor([1.0, -0.5, 0.7, 0.3])

    def loss_at(delta, b):
        g = torch.Generator().manual_seed(100 + b)
        x0 = prior.sample(n, generator=g)
        mask = ms.random_masks((n, 4), 0.6, g)
        y = (x0 + sigma_y * torch.randn(n, 4, generator=g)) * mask

        def perturbed(x, t, m):
            return model(x, t, m) + delta * (x + g_dir)  # a direction that reads the input

        return float(ms.msm_loss(perturbed, y, mask, VP, sigma_y, t_sampler, generator=g))

    del gen
    return _slope(loss_at, 0.3)


def test_msm_noiseless_loss_is_minimised_by_the_partial_denoiser():
    """At the exact partial denoiser the slope C vanishes (|C| < 4 s.e.) with Q > 0; the full
    denoiser fed the zero-filled input (it reads the zeros as data) is off the minimum."""
    prior = _corr_gaussian()
    c, se, q = _msm_slope(prior, ms.partial_denoiser(prior, VP), 0.0)
    assert abs(c) < 4 * se and q > 0.5, (c, se, q)

    def blind(x, t, m):
        return prior.denoise(x, t, VP)

    # failing variant: its excess loss E||M (blind - D*)||^2 over the oracle, common draws
    gaps = []
    for b in range(8):
        g = torch.Generator().manual_seed(300 + b)
        x0 = prior.sample(2000, generator=g)
        mask = ms.random_masks((2000, 4), 0.6, g)
        losses = [
            float(ms.msm_loss(f, x0 * mask, mask, VP, generator=torch.Generator().manual_seed(b)))
            for f in (blind, ms.partial_denoiser(prior, VP))
        ]
        gaps.append(losses[0] - losses[1])
    gaps = torch.tensor(gaps)
    assert float(gaps.mean()) > 5 * float(gaps.std()) / math.sqrt(8), gaps


def _msm_slope_noisy_as_clean(prior, model, sigma_y, t_sampler, n=4000):
    g_dir = torch.tensor([1.0, -0.5, 0.7, 0.3])

    def loss_at(delta, b):
        g = torch.Generator().manual_seed(100 + b)
        x0 = prior.sample(n, generator=g)
        mask = ms.random_masks((n, 4), 0.6, g)
        y = (x0 + sigma_y * torch.randn(n, 4, generator=g)) * mask

        def perturbed(x, t, m):
            return model(x, t, m) + delta * (x + g_dir)

        return float(ms.msm_loss(perturbed, y, mask, VP, 0.0, t_sampler, generator=g))

    return _slope(loss_at, 0.3)


def test_msm_noisy_loss_case_one_and_sure_are_minimised_by_the_partial_denoiser():
    """Times with sigma_bar > sigma_y (case 1) and the SURE term: the partial denoiser is the
    minimiser (|C| < 4 s.e.; SURE's finite-difference bias is O(tau) = 1e-3).  Failing
    variant: the noiseless loss on the same noisy data is minimised elsewhere."""
    prior = _corr_gaussian()
    sigma_y = 0.3
    # sigma_bar(t) > 0.3 for VP needs t > ~0.2: draw t on [0.3, 1)
    t_case1 = lambda n, g: 0.3 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    D = ms.partial_denoiser(prior, VP)
    c, se, q = _msm_slope(prior, D, sigma_y, t_case1)
    assert abs(c) < 4 * se and q > 0, (c, se, q)
    # failing variant: the noiseless loss on noisy data is minimised by the denoiser of the
    # noisy law, not by D*: its slope at D* is far from zero
    c_bad, se_bad, _ = _msm_slope_noisy_as_clean(prior, D, sigma_y, t_case1)
    assert abs(c_bad) > 5 * se_bad, (c_bad, se_bad)


def _covering_masks():
    return torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)


def test_aggregated_partial_denoisers_are_exact_for_independent_coordinates_only():
    """Diagonal covariance: the partial denoiser of each mask is the full one on its entries,
    so the count-normalised average is the full denoiser to round-off.  Correlated (rho = 0.8):
    a gap of the order of the correlation's effect, measured relative to ||D - x/alpha||."""
    masks = _covering_masks()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 4, generator=gen) * 1.5
    for prior, exact in ((_diag_gaussian(), True), (_corr_gaussian(), False)):
        D = ms.partial_denoiser(prior, VP)
        for t in (0.1, 0.3, 0.5):
            agg = ms.aggregate(D, x, t, masks, VP)
            full = prior.denoise(x, t, VP)
            rel = float((agg - full).norm() / (full - x / VP.alpha(t)).norm())
            if exact:
                assert rel < 1e-12, rel
            else:
                assert rel > 0.01, (t, rel)
    # uncovered entries: the zero score, D = x / alpha
    one = torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)
    agg = ms.aggregate(ms.partial_denoiser(_diag_gaussian(), VP), x[:3], 0.5, one, VP)
    assert torch.allclose(agg[:, 1:], x[:3, 1:] / VP.alpha(0.5))


def test_msm_sampler_is_ddim_with_the_full_denoiser_for_independent_coordinates():
    prior = _diag_gaussian()
    ts = samplers.time_grid(VP, 20)
    x = VP.prior_sample((64, 4), generator=torch.Generator().manual_seed(7))
    out = ms.msm_sample(
        ms.partial_denoiser(prior, VP),
        x,
        ts,
        VP,
        masks=_covering_masks(),
        eta=1.0,
        generator=torch.Generator().manual_seed(8),
    )
    ref = samplers.ddim(
        prior.denoiser(VP), x, ts, VP, eta=1.0, generator=torch.Generator().manual_seed(8)
    )
    assert torch.allclose(out, ref, atol=1e-10)


def test_msm_posterior_is_data_consistent_and_matches_the_prior_off_the_mask():
    """Diagonal prior, noiseless inpainting: the estimate equals y on the mask (lam = 1 is the
    projection), and off the mask its mean is the prior mean (independent coordinates), within
    5 standard errors."""
    prior = _diag_gaussian()
    mask = torch.tensor([True, False, True, False])
    A = op.Inpainting(mask)
    gen = torch.Generator().manual_seed(9)
    x_true = prior.sample(1, generator=gen)
    y = A(x_true)
    n = 2000
    ts = samplers.time_grid(VP, 30)
    out = ms.msm_posterior(
        ms.partial_denoiser(prior, VP),
        y,
        A,
        0.0,
        ts,
        VP,
        x=VP.prior_sample((n, 4), generator=gen),
        generator=gen,
        keep=0.5,
        n_masks=3,
    )
    assert torch.allclose(A(out), y.expand(n, -1), atol=1e-10)
    free = torch.tensor([1, 3])
    se = prior.cov.diagonal()[free].sqrt() / math.sqrt(n)
    err = (out[:, free].mean(0) - prior.mean[free]).abs()
    assert bool((err < 5 * se).all()), (err, se)


# -- SelfDB --------------------------------------------------------------------------------------
def _bridge_oracle(prior, bridge):
    """The exact E[x | x_t, y'', M'] for noiseless measurements: per pattern (M', M''), Gaussian
    conditioning of x on (x_t, y'') = (alpha M' + kappa M'') x + (sigma eps, 0)."""

    def model(x_t, t, y2, m1):
        n, d = x_t.shape
        m2 = (y2 != 0) & m1
        out = torch.empty_like(x_t)
        t = torch.as_tensor(t).expand(n)
        a, k, s = bridge.alpha(t), bridge.shift(t), bridge.sigma(t)
        for i in range(n):
            A = torch.cat([torch.diag(a[i] * m1[i] + k[i] * m2[i]), torch.diag(m2[i].double())])
            noise = torch.diag(torch.cat([s[i] ** 2 * torch.ones(d), torch.zeros(d)]))
            c_oo = A @ prior.cov @ A.T + noise
            obs = torch.cat([x_t[i], y2[i]]) - A @ prior.mean
            out[i] = prior.mean + prior.cov @ A.T @ torch.linalg.pinv(c_oo, hermitian=True) @ obs
        return out

    return model


def test_selfdb_optimum_is_the_supervised_one_when_random_masks_cover_every_entry():
    """Random Bernoulli masks (every entry observed with probability 0.7): at the exact
    supervised minimiser E[x | x_t, y'', M'] the self-supervised loss has zero slope in every
    direction (|C| < 4 s.e.) and positive curvature, so the two optima coincide."""
    prior = _corr_gaussian(d=3, rho=0.7)
    bridge = BrownianBridge()
    oracle = _bridge_oracle(prior, bridge)
    n = 400
    for g_dir in (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, -1.0, 0.5])):

        def loss_at(delta, b, kind, g_dir=g_dir):
            g = torch.Generator().manual_seed(200 + b)
            x = prior.sample(n, generator=g)
            mask = ms.random_masks((n, 3), 0.7, g)
            y = x * mask

            def model(*a, delta=delta, g_dir=g_dir):
                return oracle(*a) + delta * g_dir

            if kind == "self":
                return float(ms.selfdb_loss(model, y, mask, bridge, 0.7, generator=g))
            return float(ms.supervised_bridge_loss(model, x, y, mask, bridge, 0.7, generator=g))

        for kind in ("self", "supervised"):
            c, se, q = _slope(lambda h, b, kind=kind: loss_at(h, b, kind), 0.5, batches=8)
            assert abs(c) < 4 * se and q > 0.1, (kind, g_dir, c, se, q)
    # failing variant: the prior mean is not the minimiser (slope far from 0)
    mean_model = lambda x_t, t, y2, m1: prior.mean.expand(x_t.shape[0], -1) + 0 * x_t  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x = prior.sample(n, generator=g)
    mask = ms.random_masks((n, 3), 0.7, g)
    base = float(
        ms.selfdb_loss(
            oracle, x * mask, mask, bridge, 0.7, generator=torch.Generator().manual_seed(4)
        )
    )
    worse = float(
        ms.selfdb_loss(
            mean_model, x * mask, mask, bridge, 0.7, generator=torch.Generator().manual_seed(4)
        )
    )
    assert worse > 1.2 * base, (base, worse)


def test_selfdb_with_a_fixed_mask_leaves_unobserved_entries_unconstrained():
    """A fixed mask never observes entry 2: any change of the prediction there leaves the
    self-supervised loss exactly unchanged (zero gradient), while the supervised loss moves."""
    prior = _corr_gaussian(d=3, rho=0.7)
    bridge = BrownianBridge()
    oracle = _bridge_oracle(prior, bridge)
    n = 200
    gen = torch.Generator().manual_seed(11)
    x = prior.sample(n, generator=gen)
    mask = torch.tensor([True, True, False])
    y = x * mask
    off = torch.tensor([0.0, 0.0, 3.0])
    moved = lambda *a: oracle(*a) + off  # noqa: E731

    def run(model, loss):
        g = torch.Generator().manual_seed(12)
        if loss == "self":
            return float(ms.selfdb_loss(model, y, mask, bridge, 0.7, generator=g))
        return float(ms.supervised_bridge_loss(model, x, y, mask, bridge, 0.7, generator=g))

    assert run(moved, "self") == run(oracle, "self")
    assert run(moved, "supervised") > run(oracle, "supervised") + 8.0  # + 9 exactly, less cross
    # the gradient of the self-supervised loss at entry 2 is exactly zero
    w = torch.zeros(3, requires_grad=True)
    g = torch.Generator().manual_seed(12)
    loss = ms.selfdb_loss(lambda *a: oracle(*a) + w, y, mask, bridge, 0.7, generator=g)
    (grad,) = torch.autograd.grad(loss, w)
    assert grad[2] == 0 and grad[:2].abs().sum() > 0


# -- the score-based KL --------------------------------------------------------------------------
def test_the_sigma_cubed_weight_gives_the_gaussian_kl_by_quadrature():
    """KL = int gap(sigma) sigma^-3 dsigma with the exact gap; grid 1e-4..1e4, 321 levels in
    log sigma (trapezoid: spectrally accurate for this smooth, decaying integrand).  Tails:
    0.5 sigma_min^2 F + 0.5 |dmu|^2 / sigma_max^2 < 1e-7.  Failing variant: the weight
    sigma^-2 (a plain d sigma / sigma^2 in place of d sigma / sigma^3) is far off."""
    p = _corr_gaussian(d=3, rho=0.6, seed=1)
    q = analytic.Gaussian(p.mean + torch.tensor([0.5, -0.3, 0.2]), 1.5 * p.cov + 0.1 * torch.eye(3))
    sigmas = torch.logspace(-4, 4, 321, dtype=torch.float64)
    gaps = torch.tensor([ms.gaussian_gap(p, q, s) for s in sigmas.tolist()])
    kl = float(ms.quadrature_kl(sigmas, gaps))
    exact = ms.gaussian_kl(p, q)
    assert abs(kl - exact) < 1e-6 * max(1.0, exact), (kl, exact)
    # the weight is the one that makes the KL invariant under x -> 3x; sigma^-2 is not
    p3 = analytic.Gaussian(3 * p.mean, 9 * p.cov)
    q3 = analytic.Gaussian(3 * q.mean, 9 * q.cov)
    gaps3 = torch.tensor([ms.gaussian_gap(p3, q3, s) for s in sigmas.tolist()])
    assert abs(float(ms.quadrature_kl(sigmas, gaps3)) - exact) < 1e-6 * max(1.0, exact)
    wrong, wrong3 = (float(ms.quadrature_kl(sigmas, g * sigmas)) for g in (gaps, gaps3))
    assert abs(wrong3 / wrong - 3) < 0.01, (wrong, wrong3)


def _grid_kl(p, q, lim=9.0, n=601):
    u = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    lp, lq = p.log_prob(pts, 0.0, VE), q.log_prob(pts, 0.0, VE)
    # at t = 0 VE has sigma = 1e-4: the mixtures themselves to ~1e-8
    h = float(u[1] - u[0])
    return float((lp.exp() * (lp - lq)).sum() * h * h)


def test_score_kl_matches_grid_integration_for_2d_mixtures():
    """Two 2-D mixtures: the Monte-Carlo score KL with exact denoisers (N = 1500 samples, one
    noise draw per level) against the KL integrated on a 601^2 grid: within 4 s.e."""
    p = analytic.GaussianMixture(
        [[-1.5, 0.0], [1.5, 0.5]],
        torch.stack([torch.eye(2) * 0.5, torch.tensor([[0.6, 0.2], [0.2, 0.4]])]),
        [0.4, 0.6],
    )
    q = analytic.GaussianMixture(
        [[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]],
        torch.stack([torch.eye(2) * 0.7] * 3),
        [0.3, 0.4, 0.3],
    )
    exact = _grid_kl(p, q)
    gen = torch.Generator().manual_seed(13)
    x0 = p.sample(1500, generator=gen)
    est = ms.score_kl(
        ms.sigma_denoiser(p.denoiser(VE), VE),
        ms.sigma_denoiser(q.denoiser(VE), VE),
        x0,
        sigmas=torch.logspace(-3, 3, 61, dtype=torch.float64),
        generator=gen,
    )
    assert abs(est.kl - exact) < 4 * est.se + 0.01 * exact, (est.kl, est.se, exact)


def _measurement_kl_exact(p, q, keep):
    """E_M KL(p_M || q_M) for Bernoulli(keep) masks, by enumerating the 2^d masks."""
    d = p.dim
    total = 0.0
    for code in range(1, 2**d):
        keep_idx = torch.tensor([j for j in range(d) if code >> j & 1])
        k = len(keep_idx)
        w = keep**k * (1 - keep) ** (d - k)
        sub = [analytic.Gaussian(g.mean[keep_idx], g.cov[keep_idx][:, keep_idx]) for g in (p, q)]
        total += w * ms.gaussian_kl(*sub)
    return total


def test_measurement_score_kl_is_the_kl_of_the_measurements_and_the_fill_bias_of_blind_denoisers():
    """Mask-aware exact partial denoisers: the estimate is E_M KL(p_M || q_M) (within 4 s.e.) and
    does not depend on the fill value at all (same draws: equal to round-off).  Denoisers that
    ignore the mask (the image-domain ones fed the filled measurement) move with the fill."""
    p = _corr_gaussian(d=3, rho=0.7, seed=2)
    q = analytic.Gaussian(p.mean + torch.tensor([0.8, 0.0, -0.4]), 1.5 * p.cov)
    keep = 0.6
    exact = _measurement_kl_exact(p, q, keep)
    gen = torch.Generator().manual_seed(14)
    n = 1500
    x0 = p.sample(n, generator=gen)
    mask = ms.random_masks((n, 3), keep, gen)
    dp = ms.sigma_denoiser(ms.partial_denoiser(p, VE), VE)
    dq = ms.sigma_denoiser(ms.partial_denoiser(q, VE), VE)
    sig = torch.logspace(-3, 3, 49, dtype=torch.float64)
    runs = {
        f: ms.measurement_score_kl(dp, dq, x0, mask, f, sig, torch.Generator().manual_seed(15))
        for f in (0.0, 5.0)
    }
    assert abs(runs[0.0].kl - exact) < 4 * runs[0.0].se + 1e-3, (runs[0.0].kl, exact)
    assert abs(runs[0.0].kl - runs[5.0].kl) < 1e-9
    assert runs[0.0].kl < ms.gaussian_kl(p, q)  # data processing
    bp = ms.sigma_denoiser(p.denoiser(VE), VE)
    bq = ms.sigma_denoiser(q.denoiser(VE), VE)
    blind_p = lambda x, s, m: bp(x, s)  # noqa: E731
    blind_q = lambda x, s, m: bq(x, s)  # noqa: E731
    blind = {
        f: ms.measurement_score_kl(
            blind_p, blind_q, x0, mask, f, sig, torch.Generator().manual_seed(15)
        )
        for f in (0.0, 2.0, 5.0)
    }
    assert abs(blind[5.0].kl - blind[0.0].kl) > 10 * blind[0.0].se, {
        f: b.kl for f, b in blind.items()
    }


class _MeanDenoiser(torch.nn.Module):
    """The exact partial denoiser of N(mu_theta, cov) in sigma form, mu_theta trainable."""

    def __init__(self, mean, cov):
        super().__init__()
        self.mean = torch.nn.Parameter(mean.clone())
        self.cov = cov

    def forward(self, x, sigma, mask):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            idx = torch.nonzero(mask[i]).reshape(-1)
            c = self.cov[idx][:, idx]
            gain = c @ torch.linalg.inv(c + sigma[i] ** 2 * torch.eye(len(idx)))
            out[i, idx] = self.mean[idx] + gain @ (x[i, idx] - self.mean[idx])
        return out


def test_align_on_measurements_lowers_the_estimated_kl():
    """OOD prior N(mu_q, S) fine-tuned with align_loss on measurements of N(mu_p, S): its mean
    moves to mu_p and the measurement-domain score KL falls by more than 10x."""
    p = _corr_gaussian(d=3, rho=0.7, seed=3)
    model = _MeanDenoiser(p.mean + torch.tensor([1.0, -1.0, 0.5]), p.cov)
    gen = torch.Generator().manual_seed(16)
    x0 = p.sample(300, generator=gen)
    mask = ms.random_masks((300, 3), 0.6, gen)
    dp = ms.sigma_denoiser(ms.partial_denoiser(p, VE), VE)
    sig = torch.logspace(-2, 2, 25, dtype=torch.float64)

    def kl():
        with torch.no_grad():
            return ms.measurement_score_kl(
                dp, model, x0, mask, 0.0, sig, torch.Generator().manual_seed(17)
            ).kl

    before = kl()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        idx = torch.randint(0, 300, (64,), generator=gen)
        loss = ms.align_loss(model, x0[idx] * mask[idx], mask[idx], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = kl()
    assert after < 0.1 * before, (before, after)
