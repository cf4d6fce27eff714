"""The distances of diffcore.metrics against closed forms and known cases."""

import math

import pytest
import scipy.linalg
import torch

from diffcore import metrics


def _spd(d, gen, scale=1.0):
    a = torch.randn(d, d, generator=gen)
    return scale * (a @ a.T / d + 0.2 * torch.eye(d))


def test_gaussian_w2_in_one_dimension(gen):
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    w2 = metrics.gaussian_w2(
        torch.tensor([0.3]), torch.tensor([[4.0]]), torch.tensor([-1.2]), torch.tensor([[0.25]])
    )
    assert math.isclose(float(w2), math.hypot(1.5, 2.0 - 0.5), rel_tol=1e-12)


def test_gaussian_w2_known_cases(gen):
    d = 4
    m1, m2 = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    c = _spd(d, gen)
    # equal covariances: only the means count
    assert math.isclose(
        float(metrics.gaussian_w2(m1, c, m2, c)), float((m1 - m2).norm()), rel_tol=1e-7
    )
    # commuting covariances (one eigenbasis): the Frobenius distance of the square roots
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    l1, l2 = torch.rand(d, generator=gen) + 0.1, torch.rand(d, generator=gen) + 0.1
    c1, c2 = q @ torch.diag(l1) @ q.T, q @ torch.diag(l2) @ q.T
    expected = math.sqrt(float((m1 - m2).pow(2).sum() + (l1.sqrt() - l2.sqrt()).pow(2).sum()))
    assert math.isclose(float(metrics.gaussian_w2(m1, c1, m2, c2)), expected, rel_tol=1e-10)
    # general case against scipy's matrix square root, symmetric, and 0 on the diagonal
    c1, c2 = _spd(d, gen), _spd(d, gen, scale=2.0)
    cross = scipy.linalg.sqrtm(
        scipy.linalg.sqrtm(c1.numpy()) @ c2.numpy() @ scipy.linalg.sqrtm(c1.numpy())
    )
    w2_sq = (
        float((m1 - m2).pow(2).sum()) + float(torch.trace(c1 + c2)) - 2 * float(cross.real.trace())
    )
    assert math.isclose(float(metrics.gaussian_w2(m1, c1, m2, c2)), math.sqrt(w2_sq), rel_tol=1e-9)
    assert math.isclose(
        float(metrics.gaussian_w2(m1, c1, m2, c2)),
        float(metrics.gaussian_w2(m2, c2, m1, c1)),
        rel_tol=1e-9,
    )
    assert float(metrics.gaussian_w2(m1, c1, m1, c1)) < 1e-13


@pytest.mark.parametrize("d", [2, 5, 20])
def test_gaussian_w2_resolves_distances_far_below_the_trace_forms_floor(d, gen):
    # Commuting covariances Q diag(a) Q^T and Q diag(b) Q^T are W2 = ||sqrt(a) - sqrt(b)|| apart.
    # The trace form cancels terms of size tr C and cannot go below ~1e-8; the square roots of
    # eigh are accurate to O(d eps ||C||^(1/2)), which bounds the absolute error here.
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    a = torch.rand(d, generator=gen) + 0.05
    zero = torch.zeros(d)
    for delta in (1e-2, 1e-5, 1e-8, 1e-11):
        b = a * (1 + delta * torch.randn(d, generator=gen))
        exact = float((a.sqrt() - b.sqrt()).norm())
        w2 = metrics.gaussian_w2(zero, q @ torch.diag(a) @ q.T, zero, q @ torch.diag(b) @ q.T)
        assert abs(float(w2) - exact) <= 10 * d * torch.finfo(torch.float64).eps, (delta, exact)


def test_sliced_wasserstein_zero_for_identical_sets_and_exact_in_one_dimension(gen):
    x = torch.randn(500, 3, generator=gen)
    assert (
        float(metrics.sliced_wasserstein(x, x[torch.randperm(500, generator=gen)], generator=gen))
        == 0
    )
    # 1-D: every direction is +-1, and the empirical W2 is that of the sorted samples
    a, b = torch.randn(300, 1, generator=gen), 2 * torch.rand(300, 1, generator=gen) + 1
    exact = (a.sort(0).values - b.sort(0).values).pow(2).mean().sqrt()
    torch.testing.assert_close(
        metrics.sliced_wasserstein(a, b, 8, generator=gen), exact, rtol=1e-12, atol=0
    )


def test_sliced_wasserstein_of_a_shift(gen):
    """y = x + c: each projection's W2^2 is (theta . c)^2, whose sphere average is |c|^2 / d;
    with the same directions, the estimate is the mean over them exactly."""
    x = torch.randn(400, 3, generator=gen)
    c = torch.tensor([1.0, -2.0, 0.5])
    sw = metrics.sliced_wasserstein(x, x + c, 1000, generator=torch.Generator().manual_seed(5))
    theta = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5))
    theta = theta / theta.norm(dim=0)
    torch.testing.assert_close(sw, (c @ theta).pow(2).mean().sqrt(), rtol=1e-12, atol=0)
    # and the average over the sphere: |c|^2 / d, within 5 Monte-Carlo standard errors
    proj2 = (c @ theta).pow(2)
    assert abs(float(sw) ** 2 - float(c @ c) / 3) <= 5 * float(proj2.std()) / math.sqrt(1000)


def test_sliced_wasserstein_between_gaussians_in_one_dimension(gen):
    """Against the exact W2 of N(0, 1) and N(1, 4): sqrt(1 + 1).  For n samples the empirical
    W2^2 has a bias and spread of order log(n) / n (here ~1e-3), checked with a 0.05 margin."""
    n = 20_000
    x, y = torch.randn(n, 1, generator=gen), 1 + 2 * torch.randn(n, 1, generator=gen)
    assert abs(float(metrics.sliced_wasserstein(x, y, 4, generator=gen)) - math.sqrt(2)) < 0.05


def test_mmd_is_zero_in_mean_for_one_law_and_positive_for_two(gen):
    """The unbiased MMD^2 of two samples of one law has mean 0: over 20 independent pairs its
    mean lies within 5 standard errors of 0.  A shifted law gives an MMD^2 far above that."""
    same = torch.stack(
        [
            metrics.mmd(torch.randn(200, 2, generator=gen), torch.randn(200, 2, generator=gen))
            for _ in range(20)
        ]
    )
    se = float(same.std()) / math.sqrt(20)
    assert abs(float(same.mean())) <= 5 * se
    shifted = metrics.mmd(
        torch.randn(200, 2, generator=gen), torch.randn(200, 2, generator=gen) + 0.5
    )
    assert float(shifted) > 5 * float(same.std())
    # unequal sizes are fine, and the kernel sum is symmetric in x and y
    x, y = torch.randn(50, 2, generator=gen), torch.randn(80, 2, generator=gen)
    torch.testing.assert_close(metrics.mmd(x, y), metrics.mmd(y, x))


def test_metrics_refuse_bad_input():
    z2, i2, z3 = torch.zeros(2), torch.eye(2), torch.zeros(3)
    with pytest.raises(ValueError, match=r"same dimension, got d = 2 and 3"):
        metrics.gaussian_w2(z2, i2, z3, torch.eye(3))
    with pytest.raises(
        ValueError,
        match=r"mean1 and cov1 must have shapes \(d,\) and \(d, d\), got \(2,\) and \(3, 3\)",
    ):
        metrics.gaussian_w2(z2, torch.eye(3), z2, i2)
    with pytest.raises(ValueError, match=r"same dimension, got 2 and 3"):
        metrics.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"same size, got 5 and 6"):
        metrics.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"x must be a \(n, d\) tensor of samples, got \(5,\)"):
        metrics.sliced_wasserstein(torch.zeros(5), torch.zeros(5, 2))
    with pytest.raises(
        ValueError, match=r"n_projections must be an integer >= 1, got n_projections = 0"
    ):
        metrics.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), n_projections=0)
    with pytest.raises(ValueError, match=r"same dimension, got 2 and 3"):
        metrics.mmd(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(
        ValueError, match=r"bandwidths must be positive, got bandwidths = \(1.0, -1.0\)"
    ):
        metrics.mmd(torch.zeros(5, 2), torch.zeros(5, 2), bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"at least 2 samples each, got 1 and 5"):
        metrics.mmd(torch.zeros(1, 2), torch.zeros(5, 2))


@pytest.mark.parametrize("reverse", [False, True])
def test_straightness_of_a_circular_arc(reverse):
    """x(t) = (cos(theta t), sin(theta t)) on a uniform grid of n steps: each step's difference
    quotient has squared norm (2 - 2 cos(theta h)) / h^2 and they average to the chord, so the
    Riemann sum is exactly (2 - 2 cos(theta h)) / h^2 - (2 - 2 cos theta), in either direction;
    and a path along its chord at constant speed has S = 0."""
    theta, n = 2.0, 50
    ts = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    ts = ts.flip(0) if reverse else ts
    arc = torch.stack([torch.cos(theta * ts), torch.sin(theta * ts)], -1)[:, None]  # (n+1, 1, 2)
    h = 1 / n
    exact = (2 - 2 * math.cos(theta * h)) / h**2 - (2 - 2 * math.cos(theta))
    torch.testing.assert_close(
        metrics.straightness(arc, ts), torch.tensor([exact]), rtol=1e-10, atol=0
    )
    line = arc[0] + (arc[-1] - arc[0]) * ((ts - ts[0]) / (ts[-1] - ts[0]))[:, None, None]
    torch.testing.assert_close(
        metrics.straightness(line, ts), torch.zeros(1, dtype=torch.float64), rtol=0, atol=1e-24
    )
    with pytest.raises(ValueError, match="strictly monotone"):
        metrics.straightness(arc[:3], torch.tensor([0.0, 0.5, 0.2]))
    with pytest.raises(ValueError, match=r"path must be \(len\(ts\) = 3, batch, ...\)"):
        metrics.straightness(arc, torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("metric", [metrics.sliced_wasserstein, metrics.mmd])
def test_sample_metrics_refuse_mixed_dtypes(metric):
    x, y = torch.zeros(4, 2, dtype=torch.float32), torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch.float32 on cpu and torch.float64 on cpu"):
        metric(x, y)


# -- image quality: PSNR and SSIM ----------------------------------------------------------------
def test_psnr_is_the_decibel_ratio_of_peak_to_mean_squared_error(gen):
    from skimage.metrics import peak_signal_noise_ratio

    ref = torch.rand(4, 1, 12, 10, generator=gen, dtype=torch.float64) * 2 - 1
    x = ref + 0.1 * torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    values = metrics.psnr(x, ref)
    assert values.shape == (4,) and values.dtype == torch.float64
    for v, a, b in zip(values, x, ref, strict=True):
        assert math.isclose(float(v), peak_signal_noise_ratio(b.numpy(), a.numpy(), data_range=2.0))
    # a constant error c everywhere: 10 log10(R^2 / c^2), exactly
    assert torch.allclose(
        metrics.psnr(ref + 0.01, ref, 1.0), torch.full((4,), 40.0, dtype=torch.float64)
    )
    assert bool(torch.isinf(metrics.psnr(ref, ref)).all())


def test_ssim_is_skimages_per_image_and_one_for_a_copy(gen):
    from skimage.metrics import structural_similarity

    ref = torch.rand(3, 2, 16, 16, generator=gen, dtype=torch.float64)
    x = (ref + 0.1 * torch.randn(ref.shape, generator=gen, dtype=torch.float64)).float()
    values = metrics.ssim(x, ref.float(), data_range=1.0)
    assert values.shape == (3,) and values.dtype == torch.float64
    for v, a, b in zip(values, x, ref, strict=True):
        # two channels: the mean of the per-channel SSIMs
        each = [
            structural_similarity(b[c].numpy(), a[c].double().numpy(), data_range=1.0)
            for c in range(2)
        ]
        assert math.isclose(float(v), sum(each) / 2, rel_tol=1e-6)
    assert torch.allclose(metrics.ssim(ref, ref), torch.ones(3, dtype=torch.float64))
    assert bool((values < 1).all())


@pytest.mark.parametrize(
    ("x", "ref", "options", "message"),
    [
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 5), {}, "same shape"),
        (torch.zeros(4, 4), torch.zeros(4, 4), {}, r"\(batch, ...\)"),
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), {"data_range": 0}, "data_range = 0"),
    ],
)
def test_image_metrics_refuse_bad_input(x, ref, options, message):
    for metric in (metrics.psnr, metrics.ssim):
        with pytest.raises(ValueError, match=message):
            metric(x, ref, **options)


def test_convergence_order_of_power_laws():
    ns = [10, 20, 40, 80]
    for p in (0.5, 1.0, 2.0, 3.0):
        assert math.isclose(metrics.convergence_order(ns, [3.0 * n**-p for n in ns]), p)
    # two points: the log ratio; an error that grows has a negative order
    assert math.isclose(
        metrics.convergence_order([8, 32], [1e-2, 1e-3]), math.log(10) / math.log(4)
    )
    assert metrics.convergence_order([8, 16], [1.0, 2.0]) == pytest.approx(-1.0)
    # a least-squares fit: a wiggle of factor e^{+-d} on alternate points shifts the order by
    # the fitted slope of the wiggle, exactly computable here
    wiggle = [1.1, 1 / 1.1, 1.1, 1 / 1.1]
    e = [w * n**-2.0 for w, n in zip(wiggle, ns, strict=True)]
    x = torch.log(torch.tensor(ns, dtype=torch.float64))
    w = torch.log(torch.tensor(wiggle, dtype=torch.float64))
    shift = float(((x - x.mean()) * w).sum() / (x - x.mean()).pow(2).sum())
    assert math.isclose(metrics.convergence_order(ns, e), 2.0 - shift)


@pytest.mark.parametrize(
    ("steps", "errors", "message"),
    [
        ([10], [0.1], "at least 2"),
        ([10, 20], [0.1], "at least 2"),
        ([10, 20], [0.1, 0.0], "positive and finite"),
        ([10, 20], [0.1, float("nan")], "positive and finite"),
        ([10, 10], [0.1, 0.2], "not all be equal"),
    ],
)
def test_convergence_order_refuses_bad_input(steps, errors, message):
    with pytest.raises(ValueError, match=message):
        metrics.convergence_order(steps, errors)
