"""PnP as a score-based method, against closed forms: the diffusion model's PnP denoiser is the
exact MMSE denoiser, PnP-ADMM/PGD/HQS/RED converge to the minimisers they should, and the
closed-form TV proximal operator behaves as its analysis says."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from diffcore import analytic
from diffcore.inverse import operators as op
from diffcore.inverse import pnp
from diffcore.stepping import Trace
from tests.test_analytic import make_gaussian, make_mixture


# -- the denoiser of a diffusion model -----------------------------------------------------------
def test_noise_level_time_inverts_the_noise_level(process):
    """The time found has sigma_t / alpha_t = sigma, for levels across the process's range."""
    low, high = torch.exp(-process.lam(torch.tensor([0.0, 1.0]))).tolist()
    low = max(low, 1e-3)
    sigmas = torch.exp(torch.linspace(math.log(low) + 0.01, math.log(min(high, 1e3)) - 0.01, 9))
    t = pnp.noise_level_time(process, sigmas)
    torch.testing.assert_close(process.sigma(t) / process.alpha(t), sigmas, rtol=1e-9, atol=0)
    if math.isfinite(high):  # Linear covers every level in (0, inf); the others stop at sigma_1
        with pytest.raises(ValueError, match="outside the noise levels"):
            pnp.noise_level_time(process, 2 * high)
    with pytest.raises(ValueError, match="sigma must be positive"):
        pnp.noise_level_time(process, -1.0)


def test_diffusion_denoiser_is_the_exact_mmse_denoiser(process, gen):
    """With an exact prior, D(alpha_t x, t) = E[x0 | x0 + sigma n]: the Wiener filter for a
    Gaussian, the mixture posterior mean for a mixture; one level per sample allowed."""
    sigmas = torch.tensor([0.05, 0.3, 1.0, 2.5])
    gaussian, mixture = make_gaussian(d=4), make_mixture()
    for prior, wiener in (
        (gaussian, pnp.wiener_denoiser(gaussian.mean, gaussian.cov)),
        (mixture, None),
    ):
        denoise = pnp.diffusion_denoiser(prior.denoiser(process), process)
        x = torch.randn(4, prior.dim, generator=gen) * 2
        got = denoise(x, sigmas)
        for i, s in enumerate(sigmas.tolist()):
            expected = prior.posterior_mean(torch.eye(prior.dim), x[i : i + 1], s)[0]
            torch.testing.assert_close(got[i], expected, rtol=1e-9, atol=1e-9)
            if wiener is not None:
                torch.testing.assert_close(
                    got[i : i + 1], wiener(x[i : i + 1], s), rtol=1e-9, atol=1e-9
                )


def test_fourier_wiener_is_the_wiener_filter_of_a_circulant_gaussian(gen):
    """For the stationary prior with spectrum P (covariance F^H diag(P) F) the Fourier filter
    equals the exact Wiener denoiser; fit_power_spectrum recovers P within Monte-Carlo error."""
    h, w = 6, 8
    spectrum = torch.rand(1, h, w, generator=gen) + 0.1
    spectrum = 0.5 * (spectrum + torch.roll(spectrum.flip(1, 2), (1, 1), (1, 2)))  # P_k = P_-k
    basis = torch.eye(h * w).reshape(h * w, 1, h, w)
    cov = torch.fft.ifft2(torch.fft.fft2(basis, norm="ortho") * spectrum, norm="ortho").real
    cov = cov.reshape(h * w, h * w)
    mean = torch.tensor([0.3])
    x = torch.randn(3, 1, h, w, generator=gen)
    expected = pnp.wiener_denoiser(mean.expand(h * w), cov)(x, 0.7)
    torch.testing.assert_close(pnp.fourier_wiener_denoiser(mean, spectrum)(x, 0.7), expected)
    # samples of that prior: P is E|F(x - m)|^2, each entry an exponential-type average
    n = 4000
    root = torch.linalg.cholesky(cov + 1e-12 * torch.eye(h * w))
    samples = (torch.randn(n, h * w, generator=gen) @ root.T).reshape(n, 1, h, w) + mean
    fit_mean, fit_power = pnp.fit_power_spectrum(samples)
    assert (
        abs(float(fit_mean - mean)) < 5 * math.sqrt(float(spectrum[0, 0, 0]) / (n * h * w)) + 1e-3
    )
    rel = (fit_power - spectrum).abs() / spectrum
    assert float(rel.amax()) < 5 * math.sqrt(2 / n) * 2  # |F x|^2 has relative std <= sqrt(2)


def test_patch_gmm_denoiser_averages_exact_patch_posteriors(gen):
    """Each pixel is the mean of the p^2 posterior means of the (circular) patches covering it;
    checked against a direct loop over patches."""
    p = 2
    gmm = analytic.GaussianMixture(
        torch.randn(2, p * p, generator=gen),
        torch.stack([make_gaussian(p * p, s).cov for s in (1, 2)]),
        torch.tensor([0.6, 0.4]),
    )
    x = torch.randn(2, 1, 4, 5, generator=gen)
    sigma = 0.4
    got = pnp.patch_gmm_denoiser(gmm, p)(x, sigma)
    expected = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for r in range(h):
        for c in range(w):
            rows, cols = [(r + i) % h for i in range(p)], [(c + j) % w for j in range(p)]
            patch = x[:, 0][:, rows][:, :, cols].reshape(2, p * p)
            clean = gmm.posterior_mean(torch.eye(p * p), patch, sigma).reshape(2, p, p)
            for i in range(p):
                for j in range(p):
                    expected[:, 0, rows[i], cols[j]] += clean[:, i, j] / p**2
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_patch_gmm_fitted_on_digits_denoises_digits():
    """Fitted on training digits, the one-pass patch-GMM denoiser at least halves the squared
    error of noisy test digits (sigma = 0.4 on data in [-1, 1])."""
    from threadpoolctl import threadpool_limits

    from diffcore import data

    train, _ = data.digits(split="train")
    test, _ = data.digits(split="test")
    with threadpool_limits(1):  # EM's BLAS calls contend with the other test worker otherwise
        gmm = pnp.fit_patch_gmm(train[:100].double(), patch_size=4, k=3, max_patches=2000)
    assert gmm.dim == 16
    gen = torch.Generator().manual_seed(0)
    clean = test[:40].double()
    sigma = 0.4
    noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
    denoised = pnp.patch_gmm_denoiser(gmm, 4)(noisy, sigma)
    assert float((denoised - clean).pow(2).mean()) < 0.5 * sigma**2


# -- PnP algorithms converge to closed forms -----------------------------------------------------
def _gaussian_problem(gen, d=8, m=5):
    prior = make_gaussian(d, seed=3)
    A = op.MatrixOperator(torch.randn(m, d, generator=gen) / math.sqrt(d))
    sigma_y = 0.3
    y = op.measure(A, prior.sample(1, generator=gen), sigma_y, gen)
    return prior, A, y, sigma_y


def _minimiser(prior, A, y, sigma_y, prior_weight):
    """argmin ||y - Ax||^2 / (2 sigma_y^2) + prior_weight * (x - mu)^T Sigma^{-1} (x - mu) / 2."""
    precision = torch.linalg.inv(prior.cov)
    lhs = A.matrix.T @ A.matrix / sigma_y**2 + prior_weight * precision
    rhs = A.matrix.T @ y[0] / sigma_y**2 + prior_weight * precision @ prior.mean
    return torch.linalg.solve(lhs, rhs)


def test_pnp_admm_with_the_exact_gaussian_denoiser_converges_to_the_map(gen):
    """The Wiener denoiser is prox of sigma^2 g, g = -log N(mu, Sigma): ADMM with penalty
    1/gamma minimises f + (sigma^2/gamma) g.  gamma = sigma^2: the MAP, which for a Gaussian
    prior is the posterior mean; gamma = 2 sigma^2: the MAP with half the prior weight."""
    prior, A, y, sigma_y = _gaussian_problem(gen)
    denoise = pnp.wiener_denoiser(prior.mean, prior.cov)
    sigma = 0.5
    x = pnp.pnp_admm(denoise, A, y, sigma_y, sigma, n_iter=400)
    torch.testing.assert_close(x[0], _minimiser(prior, A, y, sigma_y, 1.0), rtol=0, atol=1e-9)
    torch.testing.assert_close(
        x[0], prior.posterior(A.matrix, y[0], sigma_y).mean, rtol=0, atol=1e-9
    )
    trace = Trace()
    x = pnp.pnp_admm(denoise, A, y, sigma_y, sigma, gamma=2 * sigma**2, n_iter=400, callback=trace)
    torch.testing.assert_close(x[0], _minimiser(prior, A, y, sigma_y, 0.5), rtol=0, atol=1e-9)
    assert len(trace) == 400 and trace.nfe == 400 and torch.equal(trace.xs[-1], x)


def test_pnp_pgd_and_red_converge_to_their_closed_forms(gen):
    """PGD with gamma = sigma^2 < 2 sigma_y^2 / ||A||^2 has the same fixed point as ADMM; RED with
    lambda = 1/sigma^2 is gradient descent on f - log p_sigma, p_sigma = N(mu, Sigma + sigma^2 I)."""
    prior, A, y, sigma_y = _gaussian_problem(gen)
    denoise = pnp.wiener_denoiser(prior.mean, prior.cov)
    sigma = 0.2  # gamma = 0.04 < 2 * 0.09 / ||A||^2
    assert sigma**2 < 2 * sigma_y**2 / A.norm_sq()
    x = pnp.pnp_pgd(denoise, A, y, sigma_y, sigma, n_iter=3000)
    torch.testing.assert_close(x[0], _minimiser(prior, A, y, sigma_y, 1.0), rtol=0, atol=1e-9)
    smoothed = analytic.Gaussian(prior.mean, prior.cov + sigma**2 * torch.eye(prior.dim))
    x = pnp.red(denoise, A, y, sigma_y, sigma, n_iter=3000)
    torch.testing.assert_close(x[0], _minimiser(smoothed, A, y, sigma_y, 1.0), rtol=0, atol=1e-9)


def test_pnp_hqs_with_a_fixed_level_minimises_the_split_objective(gen):
    """With constant sigma, HQS is block-coordinate descent on
    J(x, z) = f(x) + lam ||x - z||^2 / (2 sigma^2) + lam g(z), whose minimiser solves a linear
    system; a DPIR schedule then ends closer to the posterior mean than its start A^+ y."""
    prior, A, y, sigma_y = _gaussian_problem(gen)
    denoise = pnp.wiener_denoiser(prior.mean, prior.cov)
    sigma, lam, d = 0.4, 1.0, prior.dim
    z = pnp.pnp_hqs(denoise, A, y, sigma_y, [sigma] * 600, lam=lam)
    precision, eye = torch.linalg.inv(prior.cov), torch.eye(d)
    c = lam / sigma**2
    lhs = torch.cat(
        [
            torch.cat([A.matrix.T @ A.matrix / sigma_y**2 + c * eye, -c * eye], 1),
            torch.cat([-c * eye, c * eye + lam * precision], 1),
        ]
    )
    rhs = torch.cat([A.matrix.T @ y[0] / sigma_y**2, lam * precision @ prior.mean])
    torch.testing.assert_close(z[0], torch.linalg.solve(lhs, rhs)[d:], rtol=0, atol=1e-9)
    post_mean = prior.posterior(A.matrix, y[0], sigma_y).mean
    z = pnp.pnp_hqs(denoise, A, y, sigma_y, pnp.dpir_sigmas(1.0, 1e-3, 40))
    assert float((z[0] - post_mean).norm()) < 0.1 * float((A.pinv(y)[0] - post_mean).norm())


# -- total variation -----------------------------------------------------------------------------
def _piecewise_constant(gen, n=32, noise=0.05):
    base = torch.zeros(1, n)
    base[:, 8:20], base[:, 24:28] = 1.0, -0.5
    return base + noise * torch.randn(1, n, generator=gen)


def _square(gen, n=8, noise=0.05):
    img = torch.zeros(1, 1, n, n)
    img[..., 2:6, 3:7] = 1.0
    return img + noise * torch.randn(1, 1, n, n, generator=gen)


def test_tv_is_the_sum_of_circular_absolute_differences(gen):
    x = torch.randn(2, 7, generator=gen)
    expected = sum((x[:, (i + 1) % 7] - x[:, i]).abs() for i in range(7))
    torch.testing.assert_close(pnp.tv(x), expected)
    img = torch.randn(2, 3, 4, 5, generator=gen)
    rows = sum((img[..., (i + 1) % 4, :] - img[..., i, :]).abs().sum((1, 2)) for i in range(4))
    cols = sum((img[..., (j + 1) % 5] - img[..., j]).abs().sum((1, 2)) for j in range(5))
    torch.testing.assert_close(pnp.tv(img), rows + cols)


@pytest.mark.parametrize("shape", [(1, 10), (1, 1, 4, 4)])
def test_exact_tv_prox_solves_the_problem(shape, gen):
    """Against SLSQP on the equivalent smooth problem min 1/2||x - z||^2 + tau sum u,
    -u <= D x <= u; both reach the optimum to ~1e-6, the looser of the two."""
    z = torch.randn(*shape, generator=gen)
    tau = 0.15
    x = pnp.tv_prox(z, tau)
    n = z.numel()
    axes = (-1,) if len(shape) == 2 else (-2, -1)
    basis = torch.eye(n).reshape(n, *shape[1:])
    diff = torch.cat([pnp._diff(basis, a).reshape(n, -1) for a in axes], 1).T.numpy()
    zf = z.reshape(-1).numpy()

    def objective(v):
        return 0.5 * np.sum((v[:n] - zf) ** 2) + tau * np.sum(v[n:])

    cons = [
        {
            "type": "ineq",
            "fun": lambda v: v[n:] - diff @ v[:n],
            "jac": lambda v: np.hstack([-diff, np.eye(len(diff))]),
        },
        {
            "type": "ineq",
            "fun": lambda v: v[n:] + diff @ v[:n],
            "jac": lambda v: np.hstack([diff, np.eye(len(diff))]),
        },
    ]
    start = np.concatenate([zf, np.abs(diff @ zf)])
    res = scipy.optimize.minimize(
        objective, start, constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000}
    )
    assert res.success
    assert np.abs(x.reshape(-1).numpy() - res.x[:n]).max() < 1e-5
    value = float(0.5 * (x - z).pow(2).sum() + tau * pnp.tv(x).sum())
    assert value <= res.fun + 1e-9


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_tv_prox_approximation_is_exact_below_its_threshold(kind, gen):
    """If every difference of z exceeds 2 K tau (K = 2 x axes), the Haar shrinkage saturates and
    the approximation equals z - tau D^T sign(D z), which is also the exact prox (no difference
    can change sign, since |tau D D^T sign| <= 2 K tau).  Round-off, and the exact prox's tol."""
    z = (
        torch.randn(2, 16, generator=gen)
        if kind == "1d"
        else torch.randn(2, 1, 6, 8, generator=gen)
    )
    axes = (-1,) if kind == "1d" else (-2, -1)
    k = 2 * len(axes)
    smallest = min(float(pnp._diff(z, a).abs().amin()) for a in axes)
    tau = 0.9 * smallest / (2 * k)
    approx = pnp.tv_prox_approx(z, tau)
    certificate = z - tau * sum(pnp._diff_t(torch.sign(pnp._diff(z, a)), a) for a in axes)
    torch.testing.assert_close(approx, certificate, rtol=0, atol=1e-13)
    torch.testing.assert_close(approx, pnp.tv_prox(z, tau), rtol=0, atol=1e-9)
    # above the threshold the shrinkage no longer saturates: the approximation departs
    big = 20 * tau
    assert float((pnp.tv_prox_approx(z, big) - pnp.tv_prox(z, big)).abs().amax()) > 1e-6


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_tv_prox_approximation_error_is_controlled_by_tau(kind, gen):
    """On a noisy piecewise-constant signal: the error to the exact prox grows with tau across a
    geometric grid, and obeys the bound 2 K tau sqrt(N) (both maps move z by at most
    tau ||D^T p|| <= tau K sqrt(N), |p| <= 1)."""
    z = _piecewise_constant(gen) if kind == "1d" else _square(gen)
    k = 2 if kind == "1d" else 4
    errors = []
    for tau in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3):
        e = float(
            (pnp.tv_prox_approx(z, tau) - pnp.tv_prox(z, tau, n_iter=20000, tol=1e-14)).norm()
        )
        assert e <= 2 * k * tau * math.sqrt(z.numel())
        errors.append(e)
    assert all(a < b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_tv_prox_approximation_decreases_tv_and_is_firmly_nonexpansive(gen):
    """TV(approx(z)) <= TV(z) for every z and tau, and, being the proximal operator of a convex
    function, <T a - T b, a - b> >= ||T a - T b||^2."""
    for shape in ((6, 12), (6, 2, 4, 6)):
        for tau in (0.01, 0.1, 1.0, 10.0):
            a = torch.randn(*shape, generator=gen) * 2
            b = a + 0.5 * torch.randn(*shape, generator=gen)
            ta, tb = pnp.tv_prox_approx(a, tau), pnp.tv_prox_approx(b, tau)
            assert bool((pnp.tv(ta) <= pnp.tv(a) + 1e-12).all())
            lhs = ((ta - tb) * (a - b)).flatten(1).sum(1)
            rhs = (ta - tb).pow(2).flatten(1).sum(1)
            assert bool((lhs >= rhs - 1e-12).all())


def test_tv_fista_with_the_identity_is_one_exact_prox(gen):
    """For A = I and step 1 every FISTA iterate is prox(y): the gradient step lands on y."""
    y = _square(gen)
    A = op.Identity(y.shape[1:])
    x = pnp.tv_fista(A, y, 0.1, n_iter=5, prox="exact", step=1.0, prox_iters=5000)
    torch.testing.assert_close(x, pnp.tv_prox(y, 0.1), rtol=0, atol=1e-12)


def test_tv_fista_deblurs_and_the_approximate_prox_error_shrinks_with_the_step(gen):
    """Deblurring a noisy blurred square.  FISTA with the exact prox reaches an objective below
    the truth's (the minimum is at most that).  With the closed-form prox it converges to the
    minimiser of a nearby problem whose gap is controlled by tau = step * lam: quartering the
    step shrinks the objective gap (by ~3.5x measured; at least 2x asserted)."""
    truth = _square(gen, noise=0.0)
    A = op.Blur(op.gaussian_kernel(3, 1.0), truth.shape[1:])
    y = op.measure(A, truth, 0.02, gen)
    lam = 0.02

    def objective(v):
        return float(0.5 * (A(v) - y).pow(2).sum() + lam * pnp.tv(v).sum())

    trace = Trace()
    x = pnp.tv_fista(A, y, lam, n_iter=80, prox="exact", callback=trace, prox_iters=40)
    assert len(trace) == 80 and torch.equal(trace.xs[-1], x)
    best = objective(x)
    assert best <= objective(truth)
    assert float((x - truth).norm()) < 0.5 * float((y - truth).norm())
    lip = 1.01 * A.norm_sq()
    gaps = []
    for frac, n_iter in ((1.0, 100), (0.25, 400)):
        x = pnp.tv_fista(A, y, lam, n_iter=n_iter, prox="approx", step=frac / lip)
        gaps.append(objective(x) - best)
    assert 0 < gaps[1] < 0.5 * gaps[0], gaps


def test_bad_input_raises(gen):
    denoise = pnp.wiener_denoiser(torch.zeros(4), torch.eye(4))
    A = op.MatrixOperator(torch.eye(4))
    y = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="sigma_y"):
        pnp.pnp_admm(denoise, A, y, 0.0, 0.1)
    with pytest.raises(ValueError, match="sigma = -1"):
        pnp.pnp_pgd(denoise, A, y, 0.1, -1.0)
    with pytest.raises(ValueError, match=r"got \(1, 3\)"):
        pnp.red(denoise, A, torch.zeros(1, 3), 0.1, 0.1)
    with pytest.raises(ValueError, match="even sizes"):
        pnp.tv_prox_approx(torch.zeros(1, 5), 0.1)
    with pytest.raises(ValueError, match="TV takes"):
        pnp.tv(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="tau = 0"):
        pnp.tv_prox(torch.zeros(1, 4), 0)
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        pnp.dpir_sigmas(0.1, 1.0, 5)
