"""MMD fine-tuning for few steps (MMD-DDM) against exact answers."""

import math

import pytest
import torch

from diffcore import metrics, processes, targets
from diffcore.analytic import Gaussian
from diffcore.finetune import (
    AffineEps,
    affine_law,
    eps_error,
    few_step_grid,
    few_step_sample,
    gaussian_mmd2,
    linear_kernel,
    mmd2,
    mmd_finetune,
    output_law,
    polynomial_kernel,
    w2_parts,
)

VP = processes.VP()
F64 = torch.float64
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
DATA = Gaussian(MEAN, COV)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _draw(law, n, gen):
    return law.sample(n, generator=gen)


# -- kernels and the estimator ----------------------------------------------------------------
def test_kernels_and_estimator_are_their_formulas():
    gen = _gen(0)
    x, y = torch.randn(7, 3, generator=gen), torch.randn(5, 3, generator=gen) + 0.5
    loop = torch.tensor([[(a @ b / 3 + 1) ** 3 for b in y] for a in x])
    assert torch.allclose(polynomial_kernel(x, y), loop, rtol=1e-14, atol=0)
    assert torch.allclose(linear_kernel(x, y), x @ y.T, rtol=1e-14, atol=0)
    # the unbiased estimator, term by term over the pairs
    k = polynomial_kernel
    within_x = sum(k(x[i : i + 1], x[j : j + 1]) for i in range(7) for j in range(7) if i != j)
    within_y = sum(k(y[i : i + 1], y[j : j + 1]) for i in range(5) for j in range(5) if i != j)
    cross = sum(k(x[i : i + 1], y[j : j + 1]) for i in range(7) for j in range(5))
    by_pairs = within_x / 42 + within_y / 20 - 2 * cross / 35
    assert abs(float(mmd2(x, y)) - float(by_pairs)) < 1e-13
    # failing variant: KID's gamma = 1/d replaced by 1
    assert (polynomial_kernel(x, y, gamma=1.0) - loop).abs().max() > 1


def test_linear_estimator_is_mean_gap_less_mean_variances():
    """Exact identity: with the linear kernel, MMD^2_u = |xbar - ybar|^2 - s_x^2/m - s_y^2/n
    (s^2 the unbiased total variance): the data enter through their batch mean alone."""
    gen = _gen(1)
    x, y = torch.randn(40, 2, generator=gen), torch.randn(30, 2, generator=gen) * 2 + 1
    s2x = (x - x.mean(0)).pow(2).sum() / 39
    s2y = (y - y.mean(0)).pow(2).sum() / 29
    closed = (x.mean(0) - y.mean(0)).pow(2).sum() - s2x / 40 - s2y / 30
    assert abs(float(mmd2(x, y, "linear") - closed)) < 1e-13
    # failing variant: the variances of the batch means left out
    assert abs(float(mmd2(x, y, "linear") - (x.mean(0) - y.mean(0)).pow(2).sum())) > 0.05


def _estimates(law_x, law_y, kernel, repeats=400, n=32, seed=2):
    gen = _gen(seed)
    values = [mmd2(_draw(law_x, n, gen), _draw(law_y, n, gen), kernel) for _ in range(repeats)]
    return torch.stack(values)


@pytest.mark.parametrize("kernel", ["cubic", "linear"])
def test_unbiased_estimator_has_expectation_zero_for_equal_laws(kernel):
    values = _estimates(DATA, DATA, kernel)
    bound = 5 * float(values.std()) / math.sqrt(len(values))
    print(f"\n{kernel}: mean MMD^2_u of equal laws {float(values.mean()):.2e} <= {bound:.2e}")
    assert abs(float(values.mean())) < bound
    # failing variant: the biased (V-statistic) estimate keeps the diagonal k(x_i, x_i)
    gen, biased = _gen(2), []
    k = polynomial_kernel if kernel == "cubic" else linear_kernel
    for _ in range(len(values)):
        x, y = _draw(DATA, 32, gen), _draw(DATA, 32, gen)
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    biased = torch.stack(biased)
    print(f"  biased estimate: mean {float(biased.mean()):.3f}")
    assert float(biased.mean()) > bound


def test_estimator_matches_gaussian_closed_forms():
    other = Gaussian(
        torch.tensor([0.3, 0.4], dtype=F64), torch.tensor([[0.5, -0.2], [-0.2, 0.8]], dtype=F64)
    )
    for kernel in ("linear", "cubic"):
        exact = float(gaussian_mmd2(MEAN, COV, other.mean, other.cov, kernel))
        values = _estimates(DATA, other, kernel, seed=3)
        bound = 5 * float(values.std()) / math.sqrt(len(values))
        err = abs(float(values.mean()) - exact)
        print(f"\n{kernel}: E MMD^2_u = {exact:.4f}, Monte Carlo error {err:.2e} <= {bound:.2e}")
        assert err < bound
    assert abs(exact - float((MEAN - other.mean).pow(2).sum())) > 0  # cubic differs from linear
    linear = float(gaussian_mmd2(MEAN, COV, other.mean, other.cov, "linear"))
    assert abs(linear - float((MEAN - other.mean).pow(2).sum())) < 1e-15
    # failing variant: the third moments E[x_a x_b x_c] taken as m_a m_b m_c, without the
    # three terms m_a C_bc: far outside the Monte-Carlo bound
    d = 2

    def e(ma, ca, mb, cb):
        s = torch.trace((ca + torch.outer(ma, ma)) @ (cb + torch.outer(mb, mb)))
        return 1 + 3 * (ma @ mb) / d + 3 * s / d**2 + (ma @ mb) ** 3 / d**3

    m1, m2 = MEAN, other.mean
    wrong = float(e(m1, COV, m1, COV) + e(m2, other.cov, m2, other.cov))
    wrong -= 2 * float(e(m1, COV, m2, other.cov))
    print(f"  third moments without the m C terms: {wrong:.4f}")
    assert abs(wrong - float(values.mean())) > bound


def test_closed_form_sees_covariance_only_with_the_cubic_kernel():
    rotated = torch.tensor([[0.5, -0.6], [-0.6, 1.0]], dtype=F64)  # same mean, another covariance
    same = gaussian_mmd2(MEAN, COV, MEAN, COV)
    assert abs(float(same)) < 1e-13
    cubic = float(gaussian_mmd2(MEAN, COV, MEAN, rotated))
    linear = float(gaussian_mmd2(MEAN, COV, MEAN, rotated, "linear"))
    print(f"\nsame mean, other covariance: cubic MMD^2 {cubic:.4f}, linear MMD^2 {linear}")
    assert cubic > 1e-3 and linear == 0.0


# -- the exact toy ------------------------------------------------------------------------------
def test_affine_eps_is_the_exact_predictor():
    ts = few_step_grid(VP, 4)
    model = AffineEps.exact(DATA, ts, VP)
    x = torch.randn(16, 2, generator=_gen(4))
    worst = 0.0
    for t in ts[:-1].tolist():
        exact = targets.convert(DATA.denoise(x, t, VP), "x0", "eps", x, t, VP)
        worst = max(worst, float((model(x, t).detach() - exact).abs().max()))
    print(f"\nAffineEps.exact vs the exact eps: {worst:.1e}")
    assert worst < 1e-12
    assert float(eps_error(model, DATA, VP).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="grid"):
        model(x, 0.123)


def test_output_law_equals_the_exact_sampler_law():
    for k in (1, 2, 5):
        ts = few_step_grid(VP, k)
        model = AffineEps.exact(DATA, ts, VP)
        mean, cov = (v.detach() for v in output_law(model, ts, VP))
        ref_mean, ref_cov = metrics.sampler_output_law("ddim", DATA, ts, VP, start="prior")
        err = max(float((mean - ref_mean).abs().max()), float((cov - ref_cov).abs().max()))
        w2 = float(metrics.gaussian_w2(mean, cov, MEAN, COV))
        print(f"\nK = {k}: exact DDIM W2 to the data {w2:.4f}; law vs sampler_output_law {err:.1e}")
        assert err < 1e-12
    # failing variant: one coefficient of one map changed
    with torch.no_grad():
        model.weight[1, 0, 1] += 0.01
    mean, cov = (v.detach() for v in output_law(model, ts, VP))
    assert float((cov - ref_cov).abs().max()) > 1e-4


def test_affine_law_and_eps_error_against_monte_carlo():
    """affine_law gives the law of an affine map; eps_error the exact RMS distance of a
    perturbed predictor, checked by sampling p_t (5 standard errors)."""
    ts = few_step_grid(VP, 3)
    model = AffineEps.exact(DATA, ts, VP)
    with torch.no_grad():
        model.weight.add_(0.1 * torch.randn(model.weight.shape, generator=_gen(5)))
        model.bias.add_(0.1)
    exact = AffineEps.exact(DATA, ts, VP)
    errors = eps_error(model, DATA, VP)
    n = 200_000
    for i, t in enumerate(model.times.tolist()):
        x = DATA.marginal(t, VP).sample(n, generator=_gen(6 + i))
        sq = (model(x, t) - exact(x, t)).pow(2).sum(1).detach()
        bound = 5 * float(sq.std()) / math.sqrt(n)
        assert abs(float(sq.mean()) - float(errors[i]) ** 2) < bound
        # failing variant: the trace term (the spread of p_t) left out
        shift_only = (model.weight[i] - exact.weight[i]) @ DATA.marginal(t, VP).mean
        shift_only = (shift_only + model.bias[i] - exact.bias[i]).pow(2).sum().detach()
        assert abs(float(sq.mean()) - float(shift_only)) > 10 * bound
    jac, shift = torch.tensor([[2.0, 1.0], [0.0, -1.0]]), torch.tensor([0.5, 3.0])
    mean, cov = affine_law(lambda x: x @ jac.T + shift, MEAN, COV)
    assert torch.allclose(mean, jac @ MEAN + shift, atol=1e-14)
    assert torch.allclose(cov, jac @ COV @ jac.T, atol=1e-14)


# -- fine-tuning --------------------------------------------------------------------------------
def _finetuned(kernel, data, steps=300, lr=3e-3, seed=7, k=2):
    ts = few_step_grid(VP, k)
    model = AffineEps.exact(DATA, ts, VP)
    losses = mmd_finetune(
        model,
        data,
        ts,
        VP,
        steps=steps,
        lr=lr,
        batch_size=256,
        kernel=kernel,
        generator=_gen(seed),
    )
    return model, ts, losses


def test_cubic_mmd_finetuning_lowers_exact_w2_and_leaves_the_score():
    ts = few_step_grid(VP, 2)
    before = w2_parts(*output_law(AffineEps.exact(DATA, ts, VP), ts, VP), DATA)
    model, ts, losses = _finetuned("cubic", DATA.sample)
    after = w2_parts(*output_law(model, ts, VP), DATA)
    gap = eps_error(model, DATA, VP).detach()
    scale = math.sqrt(DATA.dim)  # the RMS norm of the exact eps, E|eps|^2 = d
    print(
        f"\nK = 2 DDIM, exact W2 (total, mean part, covariance part): before "
        f"{tuple(round(v, 4) for v in before)}, after {tuple(round(v, 4) for v in after)}"
    )
    shares = [round(v / scale, 4) for v in gap.tolist()]
    print(
        f"RMS distance to the exact eps at t = {model.times.tolist()}: 0 before, "
        f"{[round(v, 4) for v in gap.tolist()]} after ({shares} of |eps|)"
    )
    print(f"MMD^2_u: first step {losses[0]:.3f}, mean of the last 50 {sum(losses[-50:]) / 50:.4f}")
    assert after[0] < before[0]
    assert float(gap.min()) > 1e-3  # the network left the exact predictor
    # the W2 after fine-tuning is exact: the same law through the sampler's Jacobians
    mean, cov = (v.detach() for v in output_law(model, ts, VP))
    x = VP.prior_sample((20_000, 2), t=1.0, generator=_gen(8))
    y = few_step_sample(model, x, ts, VP).detach()
    err = (y.mean(0) - mean).abs().max()
    assert float(err) < 5 * float(cov.diagonal().max().sqrt()) / math.sqrt(20_000)


def test_linear_kernel_cannot_fix_the_covariance():
    """The linear-kernel estimator depends on the data batch only through its mean (identity
    above), so fine-tuning on two data sets whose batches share their means gives the same
    network, to round-off.  The two laws differ in covariance, so by the triangle
    inequality the one network is at least half their W2 from one of them."""
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    n = 256

    def rotated_about_batch_mean(count, generator=None):
        y = DATA.sample(count, generator=generator)
        centre = y.mean(0)
        return centre + (y - centre) @ rotation.T

    # the law of one point of a rotated batch: mean MEAN, covariance R C R^T (1 - 1/n) + C/n
    cov_b = rotation @ COV @ rotation.T * (1 - 1 / n) + COV / n
    law_b = Gaussian(MEAN, cov_b)
    apart = float(metrics.gaussian_w2(MEAN, COV, MEAN, cov_b))
    model_a, ts, _ = _finetuned("linear", DATA.sample, steps=100)
    model_b, _, _ = _finetuned("linear", rotated_about_batch_mean, steps=100)
    same = max(
        float((model_a.weight - model_b.weight).detach().abs().max()),
        float((model_a.bias - model_b.bias).detach().abs().max()),
    )
    print(f"\nlinear kernel, two data laws with equal batch means: parameters differ by {same:.1e}")
    assert same < 1e-10
    law = output_law(model_a, ts, VP)
    to_a, to_b = w2_parts(*law, DATA), w2_parts(*law, law_b)
    print(f"W2 between the two data laws: {apart:.4f}")
    print(
        f"the one fine-tuned law: W2 {to_a[0]:.4f} to the first (covariance part "
        f"{to_a[2]:.4f}), {to_b[0]:.4f} to the second"
    )
    assert max(to_a[0], to_b[0]) >= apart / 2
    # failing variant: the cubic kernel sees the covariance, and the two runs part ways
    cubic_a, _, _ = _finetuned("cubic", DATA.sample, steps=100)
    cubic_b, _, _ = _finetuned("cubic", rotated_about_batch_mean, steps=100)
    apart_params = float((cubic_a.weight - cubic_b.weight).detach().abs().max())
    print(f"cubic kernel, the same two data sets: parameters differ by {apart_params:.3f}")
    assert apart_params > 1e-2


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_names_the_value():
    ts = few_step_grid(VP, 2)
    model = AffineEps.exact(DATA, ts, VP)
    with pytest.raises(ValueError, match="lr"):
        mmd_finetune(model, DATA.sample, ts, VP, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        mmd_finetune(model, DATA.sample, ts, VP, steps=1, lr=-1e-3)
    with pytest.raises(ValueError, match="n_steps"):
        few_step_grid(VP, 0)
    with pytest.raises(ValueError, match="kernel"):
        mmd2(torch.zeros(3, 2), torch.zeros(3, 2), "gaussian")
    with pytest.raises(ValueError, match="at least 2"):
        mmd2(torch.zeros(1, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="degree"):
        polynomial_kernel(torch.zeros(3, 2), torch.zeros(3, 2), degree=0)
    with pytest.raises(ValueError, match="batch_size"):
        mmd_finetune(model, DATA.sample, ts, VP, steps=1, batch_size=1)
