"""Multiplicative diffusion (geometric Brownian motion) against exact answers."""

import math

import pytest
import torch

from diffcore.multiplicative import (
    GBM,
    LogBrownian,
    additive_step,
    fokker_planck_residual,
    multiplicative_dsm_loss,
    multiplicative_sampler,
    multiplicative_step,
)
from diffcore.stepping import Trace

GBM_ = GBM(mu=0.3, sigma=0.8)
LOC, SCALE = 0.5, 0.4  # log x0 ~ N(LOC, SCALE^2) elementwise


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _log_normal_data(n, d, gen, loc=LOC, scale=SCALE):
    return torch.exp(loc + scale * torch.randn(n, d, generator=gen))


# -- the change of variables ------------------------------------------------------------------
def test_log_space_is_brownian_motion_with_drift():
    gen = _gen(1)
    x0 = _log_normal_data(64, 3, gen)
    eps = torch.randn(64, 3, generator=gen)
    t = torch.rand(64, generator=gen)
    x_t = GBM_.marginal(x0, t, eps)
    m = GBM_.mu - GBM_.sigma**2 / 2
    centred = GBM_.log_process.marginal(torch.log(x0), t, eps)
    assert torch.allclose(torch.log(x_t) - m * t[:, None], centred, rtol=0, atol=1e-12)
    # the log-space process: alpha = 1, sigma_t = sigma sqrt t, f = 0, g^2 = sigma^2
    ts = torch.tensor([0.1, 0.5, 0.9])
    lp = GBM_.log_process
    assert isinstance(lp, LogBrownian) and lp.scale == GBM_.sigma
    assert torch.allclose(lp.f(ts), torch.zeros(3), atol=1e-15)
    assert torch.allclose(lp.g2(ts), torch.full((3,), GBM_.sigma**2), rtol=1e-12)
    assert torch.allclose(lp.t_of_lam(lp.lam(ts)), ts, rtol=1e-12)
    # a wrong Ito correction (mu instead of mu - sigma^2/2) misses by sigma^2 t / 2
    wrong = torch.log(x_t) - GBM_.mu * t[:, None] - centred
    assert (wrong.abs() - GBM_.sigma**2 * t[:, None] / 2).abs().max() < 1e-12


# -- exact moments ----------------------------------------------------------------------------
def _raw_moment(x0, k, t, gbm=GBM_):
    """E[x_t^k | x0] = x0^k exp(k m t + k^2 sigma^2 t / 2), the log-normal raw moments."""
    return x0**k * math.exp(k * gbm.log_drift * t + k**2 * gbm.sigma**2 * t / 2)


def test_log_normal_moments_exact_and_monte_carlo():
    t, x0, n = 0.7, 1.5, 400_000
    x0_t = torch.full((1, 1), x0)
    mean, var = GBM_.mean(x0_t, t).item(), GBM_.variance(x0_t, t).item()
    m1, m2, m4 = (_raw_moment(x0, k, t) for k in (1, 2, 4))
    assert abs(mean - m1) < 1e-12 * m1 and abs(var - (m2 - m1**2)) < 1e-12 * m2
    x_t = GBM_.marginal(torch.full((n, 1), x0), t, torch.randn(n, 1, generator=_gen(2)))
    # the sample mean of x and of x^2: standard errors sqrt(Var / n) from the exact moments
    err_1 = abs(x_t.mean().item() - m1)
    err_2 = abs((x_t**2).mean().item() - m2)
    bound_1, bound_2 = 5 * math.sqrt(var / n), 5 * math.sqrt((m4 - m2**2) / n)
    print(f"\nE[x_t]: error {err_1:.2e} <= {bound_1:.2e}; E[x_t^2]: {err_2:.2e} <= {bound_2:.2e}")
    assert err_1 < bound_1 and err_2 < bound_2
    # failing variant: the mean with the log drift, x0 e^{m t}, is far outside the bound
    wrong = abs(x_t.mean().item() - x0 * math.exp(GBM_.log_drift * t))
    print(f"mean with e^(m t) instead of e^(mu t): error {wrong:.2e}")
    assert wrong > 10 * bound_1


# -- the Fokker-Planck equation ---------------------------------------------------------------
def _points(seed=3):
    gen = _gen(seed)
    x = torch.exp(torch.randn(200, 2, generator=gen))
    t = 0.05 + 0.95 * torch.rand(200, 2, generator=gen)
    return x, t


def test_fokker_planck_residual_of_log_normal_marginal():
    x, t = _points()
    exact = fokker_planck_residual(GBM_, lambda x, t: GBM_.log_prob(x, t, LOC, SCALE), x, t)
    print(f"\nFokker-Planck residual max |r| = {exact.abs().max().item():.2e}")
    assert exact.abs().max() < 1e-10
    # failing variants: one coefficient wrong in the marginal
    variants = {
        "log drift mu + sigma^2/2": GBM(GBM_.mu + GBM_.sigma**2, GBM_.sigma),
        "variance rate sigma^2/2": GBM(GBM_.mu, GBM_.sigma / math.sqrt(2)),
    }
    for name, wrong in variants.items():
        r = fokker_planck_residual(GBM_, lambda x, t, w=wrong: w.log_prob(x, t, LOC, SCALE), x, t)
        print(f"  wrong {name}: max |r| = {r.abs().max().item():.2e}")
        assert r.abs().max() > 1e-2


# -- the multiplicative score -----------------------------------------------------------------
def test_multiplicative_score_matches_autograd():
    x, t = _points(4)
    x = x.requires_grad_(True)
    (grad,) = torch.autograd.grad(GBM_.log_prob(x, t, LOC, SCALE).sum(), x)
    x = x.detach()
    err = (GBM_.score(x, t, LOC, SCALE) - x * grad).abs().max().item()
    print(f"\nscore vs x * autograd: {err:.2e}")
    assert err < 1e-12
    # failing variant: the log-space score (one more) is not x * grad log p
    assert ((GBM_.score(x, t, LOC, SCALE) + 1 - x * grad).abs() - 1).abs().max() < 1e-12


# -- multiplicative denoising score matching --------------------------------------------------
def test_dsm_loss_at_exact_score_is_its_minimum():
    """At the exact score the per-sample loss is (c_t / 2) chi^2_d with c_t = B/(B + sigma^2 t),
    B = SCALE^2, so its mean over t ~ U[t0, t1] is d/2 * B/(sigma^2 (t1 - t0)) *
    log((B + sigma^2 t1)/(B + sigma^2 t0)); its variance is at most E[c_t^2](d^2 + 2d)/4 <=
    (d^2 + 2d)/4 (c_t <= 1), which bounds the Monte-Carlo error of the batch mean."""
    n, d, t0, t1 = 100_000, 4, 1e-3, 1.0
    B, s2 = SCALE**2, GBM_.sigma**2
    minimum = d / 2 * B / (s2 * (t1 - t0)) * math.log((B + s2 * t1) / (B + s2 * t0))
    bound = 5 * math.sqrt((d * d + 2 * d) / 4 / n)
    x0 = _log_normal_data(n, d, _gen(5))

    def exact(x, t):
        return GBM_.score(x, t, LOC, SCALE)

    loss = multiplicative_dsm_loss(exact, x0, GBM_, generator=_gen(6)).item()
    print(
        f"\nDSM loss {loss:.5f}, exact minimum {minimum:.5f}, |diff| {abs(loss - minimum):.2e}"
        f" <= {bound:.2e}"
    )
    assert abs(loss - minimum) < bound
    # failing variants: the log-space score (excess d sigma^2 E[t] / 2), and the score of the
    # wrong log-variance (no data spread)
    for name, wrong in {
        "log-space score": lambda x, t: exact(x, t) + 1,
        "scale 0": lambda x, t: GBM_.score(x, t, LOC, 0.0),
    }.items():
        w = multiplicative_dsm_loss(wrong, x0, GBM_, generator=_gen(6)).item()
        print(f"  {name}: loss {w:.5f} (excess {w - minimum:.3f})")
        assert w - minimum > 10 * bound


# -- positivity of the reverse step -----------------------------------------------------------
def test_multiplicative_step_stays_positive_where_additive_does_not():
    gbm, n, d = GBM(0.3, 2.0), 20_000, 2
    gen = _gen(7)
    x1 = _log_normal_data(n, d, gen, LOC + gbm.log_drift, math.sqrt(SCALE**2 + gbm.sigma**2))
    z = torch.randn(n, d, generator=gen)
    s = gbm.score(x1, 1.0, LOC, SCALE)
    mult = multiplicative_step(x1, s, gbm, 1.0, 0.5, z)
    add = additive_step(x1, s, gbm, 1.0, 0.5, z)
    n_mult, n_add = int((mult <= 0).sum()), int((add <= 0).sum())
    print(
        f"\nnon-positive after one step 1 -> 0.5 of {n * d}: multiplicative {n_mult}, "
        f"additive {n_add}"
    )
    assert n_mult == 0 and n_add > 100
    # the two steps discretise the same reverse SDE: the multiplicative step's mean over z,
    # x exp(dt [m - sigma^2 (s + 1)] + sigma^2 |dt| / 2), equals the additive step's mean
    # x (1 + dt [mu - 2 sigma^2 - sigma^2 s]) to O(dt^2)
    dt, zero = 1e-5, torch.zeros_like(z)
    mean_mult = multiplicative_step(x1, s, gbm, 1.0, 1.0 - dt, zero) * math.exp(
        gbm.sigma**2 * dt / 2
    )
    gap = ((mean_mult - additive_step(x1, s, gbm, 1.0, 1.0 - dt, zero)) / (x1 * dt)).abs()
    print(f"mean drift gap per unit time at dt = 1e-5: {gap.max().item():.2e}")
    assert gap.max() < 1e-2
    # failing variant: the additive drift without the -d/dx(sigma^2 x^2) term misses 2 sigma^2
    wrong = x1 + (-dt) * x1 * (gbm.mu - gbm.sigma**2 * s)
    gap_wrong = ((mean_mult - wrong) / (x1 * dt)).abs()
    assert (gap_wrong - 2 * gbm.sigma**2).abs().max() < 1e-2


def test_multiplicative_sampler_runs_positive_and_recovers_log_mean():
    gbm, n, d = GBM(0.3, 2.0), 20_000, 2
    gen = _gen(8)
    x1 = _log_normal_data(n, d, gen, LOC + gbm.log_drift, math.sqrt(SCALE**2 + gbm.sigma**2))
    trace = Trace()
    out = multiplicative_sampler(
        lambda x, t: gbm.score(x, t, LOC, SCALE),
        x1,
        torch.linspace(1, 0, 21),
        gbm,
        generator=gen,
        callback=trace,
    )
    assert bool((trace.xs > 0).all()) and trace.nfe == 20
    print(
        f"\nsampler, 20 steps: {int((trace.xs <= 0).sum())} non-positive states of "
        f"{trace.xs.numel()}; mean log x0 {torch.log(out).mean().item():.4f} (exact {LOC})"
    )
    assert abs(torch.log(out).mean().item() - LOC) < 0.05


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: GBM(sigma=0.0), ValueError, "sigma = 0.0"),
        (lambda: GBM(sigma=-1.0), ValueError, "sigma = -1.0"),
        (lambda: GBM(mu=True), TypeError, "mu = True"),
        (lambda: LogBrownian(scale=0.0), ValueError, "scale = 0.0"),
        (
            lambda: GBM_.marginal(torch.tensor([[1.0, -2.0]]), 0.5, torch.zeros(1, 2)),
            ValueError,
            "x0[0, 1] = -2",
        ),
        (lambda: GBM_.mean(torch.tensor([[0.0]]), 0.5), ValueError, "x0[0, 0] = 0"),
        (lambda: GBM_.score(torch.tensor([[1.0, -1.0]]), 0.5, LOC), ValueError, "x[0, 1] = -1"),
        (lambda: GBM_.score(torch.ones(1, 2), 0.5, LOC, -0.1), ValueError, "scale = -0.1"),
        (lambda: GBM_.mean(torch.ones(1, 2, dtype=torch.int64), 0.5), TypeError, "x0"),
        (lambda: GBM_.mean(torch.ones(1, 2), 1.5), ValueError, "t = 1.5"),
        (
            lambda: multiplicative_dsm_loss(
                lambda x, t: x, torch.tensor([[1.0, -3.0]]), GBM_, generator=_gen()
            ),
            ValueError,
            "x0[0, 1] = -3",
        ),
        (
            lambda: multiplicative_sampler(
                lambda x, t: x, torch.tensor([[-0.5]]), torch.linspace(1, 0, 3), GBM_
            ),
            ValueError,
            "x[0, 0] = -0.5",
        ),
        (
            lambda: multiplicative_step(
                torch.ones(1), torch.ones(1), GBM_, 0.2, 0.5, torch.ones(1)
            ),
            ValueError,
            "t = 0.2, s = 0.5",
        ),
    ],
)
def test_bad_input_names_the_value(call, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        call()
