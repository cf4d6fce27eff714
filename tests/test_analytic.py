"""The exact Gaussian and mixture models against autograd, Tweedie, scipy and Monte Carlo."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from diffcore import analytic, samplers

T = (0.05, 0.5, 0.95)


def _rotation(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def make_mixture():
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    covs = torch.stack(
        [
            _rotation(a) @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ _rotation(a).T
            for a, d in ((0.3, (0.5, 0.05)), (-1.0, (0.2, 0.6)), (0.0, (0.3, 0.3)))
        ]
    )
    return analytic.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def make_gaussian(d=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return analytic.Gaussian(
        torch.randn(d, generator=gen, dtype=torch.float64), a @ a.T / d + 0.1 * torch.eye(d)
    )


@pytest.fixture
def mixture():
    return make_mixture()


@pytest.mark.parametrize("model_name", ["mixture", "gaussian"])
def test_score_is_the_gradient_of_log_prob(process, gen, model_name):
    model = make_mixture() if model_name == "mixture" else make_gaussian()
    x = 2 * torch.randn(9, model.dim, generator=gen)
    t = torch.tensor(T).repeat(3)  # one time per sample
    x_grad = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(x_grad, t, process).sum(), x_grad)
    torch.testing.assert_close(model.score(x, t, process), grad, rtol=1e-9, atol=1e-9)


def test_tweedie_links_denoiser_and_score(process, gen, mixture):
    """E[x0 | x_t = x] = (x + sigma_t^2 * score) / alpha_t."""
    x = 2 * torch.randn(6, 2, generator=gen)
    for t in T:
        a, s = process.alpha(torch.tensor(t)), process.sigma(torch.tensor(t))
        expected = (x + s**2 * mixture.score(x, t, process)) / a
        torch.testing.assert_close(mixture.denoise(x, t, process), expected, rtol=1e-8, atol=1e-8)


def test_log_prob_matches_scipy(process, gen, mixture):
    x = 2 * torch.randn(7, 2, generator=gen)
    for t in T:
        a, s = float(process.alpha(torch.tensor(t))), float(process.sigma(torch.tensor(t)))
        density = sum(
            float(w)
            * scipy.stats.multivariate_normal(
                a * m.numpy(), a**2 * c.numpy() + s**2 * np.eye(2)
            ).pdf(x.numpy())
            for w, m, c in zip(mixture.weights, mixture.means, mixture.covs, strict=True)
        )
        np.testing.assert_allclose(
            mixture.log_prob(x, t, process).numpy(), np.log(density), rtol=1e-10
        )


def test_labels_give_the_class_conditional_model(process, gen, mixture):
    x = torch.randn(5, 2, generator=gen)
    r = mixture.responsibilities(x, 0.4, process)
    torch.testing.assert_close(r.sum(-1), torch.ones(5))
    scores = torch.stack([mixture.score(x, 0.4, process, label=k) for k in range(3)], 1)
    torch.testing.assert_close(
        torch.einsum("bk,bkd->bd", r, scores), mixture.score(x, 0.4, process)
    )
    for k in range(3):
        component = analytic.Gaussian(mixture.means[k], mixture.covs[k])
        torch.testing.assert_close(scores[:, k], component.score(x, 0.4, process))
        torch.testing.assert_close(
            mixture.denoise(x, 0.4, process, label=k), component.denoise(x, 0.4, process)
        )
        torch.testing.assert_close(
            mixture.log_prob(x, 0.4, process, label=k), component.log_prob(x, 0.4, process)
        )
    per_sample = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(
        mixture.score(x, 0.4, process, label=per_sample), scores[torch.arange(5), per_sample]
    )


def test_mixture_score_agrees_with_monte_carlo(process, mixture):
    """score(x) = E[(alpha x0 - x) / sigma^2 | x_t = x], estimated by self-normalised importance
    sampling over 400k data samples; the error must lie within 5 delta-method standard errors."""
    gen = torch.Generator().manual_seed(7)
    x0 = mixture.sample(400_000, generator=gen)
    x = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.3, -1.8]])
    t = 0.6
    a, s = process.alpha(torch.tensor(t)), process.sigma(torch.tensor(t))
    for xi in x * a:  # points where p_t has mass
        log_w = -((xi - a * x0) ** 2).sum(-1) / (2 * s**2)
        w = torch.softmax(log_w, 0)
        h = (a * x0 - xi) / s**2
        estimate = (w[:, None] * h).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (h - estimate) ** 2).sum(0))
        exact = mixture.score(xi[None], t, process)[0]
        assert bool(((estimate - exact).abs() <= 5 * se).all()), (estimate, exact, se)
        assert bool((se < 0.05 * exact.abs().max() + 1e-3).all())  # the check has teeth


def test_sample_moments(mixture):
    x = mixture.sample(200_000, generator=torch.Generator().manual_seed(1))
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    second = (
        mixture.weights[:, None, None]
        * (mixture.covs + mixture.means[:, :, None] * mixture.means[:, None, :])
    ).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    se_mean = torch.sqrt(torch.diag(cov) / x.shape[0])
    assert bool(((x.mean(0) - mean).abs() <= 5 * se_mean).all())
    # 5 standard errors of the sample covariance, bounded by sqrt((E x^4) / n) per entry
    xc = x - mean
    se_cov = torch.sqrt(((xc[:, :, None] * xc[:, None, :]) ** 2).mean(0) / x.shape[0])
    assert bool(((torch.cov(x.T) - cov).abs() <= 5 * se_cov).all())
    _, labels = mixture.sample(10, generator=torch.Generator().manual_seed(1), return_labels=True)
    assert labels.shape == (10,) and labels.dtype == torch.int64


def test_image_shaped_input(process, gen):
    g = make_gaussian(d=4)
    x = torch.randn(3, 1, 2, 2, generator=gen)
    flat = x.reshape(3, 4)
    for method in ("score", "denoise", "velocity"):
        out = getattr(g, method)(x, 0.3, process)
        assert out.shape == x.shape
        torch.testing.assert_close(out.reshape(3, 4), getattr(g, method)(flat, 0.3, process))


def _pf_ode_reference(g, x, s, t, process):
    """The PF-ODE solved by scipy's DOP853 at tight tolerance, independent of diffcore's samplers."""

    def rhs(time, y):
        state = torch.from_numpy(y).reshape(x.shape)
        return g.velocity(state, min(max(time, 0.0), 1.0), process).reshape(-1).numpy()

    sol = scipy.integrate.solve_ivp(
        rhs, (s, t), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12
    )
    return torch.from_numpy(sol.y[:, -1]).reshape(x.shape)


def test_pf_ode_map_matches_fine_numerical_solves(smooth_process, gen):
    process = smooth_process
    g = make_gaussian(d=3)
    s, t = 0.9, 0.05
    x = g.marginal(s, process).sample(8, generator=gen)
    exact = g.pf_ode_map(x, s, t, process)
    # A fine Heun solve, global error O(h^2): at 2000 log-SNR-uniform steps, below 1e-6 relative
    # to the scale of the state (about 1 for VP and Linear, sigma_s ~ 26 for VE).
    scale = float(x.abs().max())
    ts = samplers.time_grid(process, 2000, kind="logsnr", t_min=t, t_max=s)
    heun = samplers.heun(g.denoiser(process), x, ts, process)
    assert float((heun - exact).abs().max()) <= 1e-6 * max(scale, 1.0)
    torch.testing.assert_close(
        _pf_ode_reference(g, x, s, t, process), exact, rtol=0, atol=1e-8 * max(scale, 1.0)
    )


def test_pf_ode_map_carries_marginal_to_marginal(process):
    g = make_gaussian(d=3)
    for s, t in ((0.9, 0.1), (0.2, 0.7), (1.0, 0.01)):
        shift = g.pf_ode_map(torch.zeros(1, 3), s, t, process)[0]
        jac = g.pf_ode_map(torch.eye(3), s, t, process) - shift  # rows: images of the basis
        p_s, p_t = g.marginal(s, process), g.marginal(t, process)
        torch.testing.assert_close(g.pf_ode_map(p_s.mean[None], s, t, process)[0], p_t.mean)
        torch.testing.assert_close(jac.T @ p_s.cov @ jac, p_t.cov, rtol=1e-10, atol=1e-12)


def test_pf_ode_solver_is_the_exact_map_between_the_grid_ends(process, gen):
    g = make_gaussian(d=3)
    x = g.marginal(0.9, process).sample(8, generator=gen)

    def no_model(x, t):
        raise AssertionError("the exact solver called the model")

    solve = g.pf_ode_solver()
    for ts in (torch.tensor([0.9, 0.05]), samplers.time_grid(process, 7, t_min=0.05, t_max=0.9)):
        assert torch.equal(solve(no_model, x, ts, process), g.pf_ode_map(x, 0.9, 0.05, process))
    # what a convergent solver reaches on the grid: Heun's O(h^2) error at 400 log-SNR steps
    # is 3e-6 to 9e-6 of the state's scale on these processes (1e-6 at 2000 steps, above)
    ts = samplers.time_grid(process, 400, kind="logsnr", t_min=0.05, t_max=0.9)
    heun = samplers.heun(g.denoiser(process), x, ts, process)
    scale = max(float(x.abs().max()), 1.0)
    assert float((heun - solve(no_model, x, ts, process)).abs().max()) <= 3e-5 * scale


def test_flow_map_identities(process, gen):
    g = make_gaussian(d=3)
    x = torch.randn(4, 3, generator=gen)
    torch.testing.assert_close(g.pf_ode_map(x, 0.4, 0.4, process), x)
    via = g.pf_ode_map(g.pf_ode_map(x, 0.9, 0.5, process), 0.5, 0.1, process)
    torch.testing.assert_close(via, g.pf_ode_map(x, 0.9, 0.1, process))
    # per-sample times
    s, t = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    batch = g.pf_ode_map(x, s, t, process)
    for i in range(4):
        torch.testing.assert_close(
            batch[i], g.pf_ode_map(x[i : i + 1], float(s[i]), float(t[i]), process)[0]
        )


def test_bad_models_are_refused():
    eye = torch.eye(2, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"cov must be positive definite, got smallest eigenvalue -1"
    ):
        analytic.Gaussian(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(ValueError, match=r"covs\[1\] must be positive definite"):
        analytic.GaussianMixture(
            torch.zeros(2, 2), torch.stack([eye, 0 * eye]), torch.tensor([0.5, 0.5])
        )
    with pytest.raises(ValueError, match=r"weights must sum to 1, got sum\(weights\) = 0.9"):
        analytic.GaussianMixture(
            torch.zeros(2, 2), torch.stack([eye, eye]), torch.tensor([0.5, 0.4])
        )
    with pytest.raises(ValueError, match=r"weights must be positive"):
        analytic.GaussianMixture(
            torch.zeros(2, 2), torch.stack([eye, eye]), torch.tensor([1.5, -0.5])
        )
    with pytest.raises(ValueError, match=r"covs must have shape \(K, d, d\) = \(2, 2, 2\)"):
        analytic.GaussianMixture(
            torch.zeros(2, 2), torch.stack([eye, eye, eye]), torch.tensor([0.5, 0.5])
        )
    with pytest.raises(ValueError, match=r"need mean of shape \(d,\) and cov of shape \(d, d\)"):
        analytic.Gaussian(torch.zeros(3), eye)
    with pytest.raises(ValueError, match="symmetric"):
        analytic.Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="means must be finite"):
        analytic.GaussianMixture(torch.full((1, 2), float("nan")), eye[None], torch.ones(1))


def test_bad_calls_are_refused(process, mixture):
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\).* got \(4, 3\)"):
        mixture.score(torch.zeros(4, 3), 0.5, process)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got t = -0.2"):
        mixture.denoise(torch.zeros(4, 2), -0.2, process)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 3\), got label = \[3\]"):
        mixture.score(torch.zeros(4, 2), 0.5, process, label=3)
    with pytest.raises(ValueError, match=r"t of shape \(3,\) does not broadcast"):
        mixture.log_prob(torch.zeros(4, 2), torch.full((3,), 0.5), process)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got n = 0"):
        mixture.sample(0)
