"""The exact posterior of a Gaussian-mixture prior under y = A x + sigma_y n, against the Kalman
update in information form and against self-normalised importance sampling."""

import math

import pytest
import scipy.stats
import torch

from diffcore import analytic
from tests.test_analytic import make_gaussian, make_mixture


def _importance(prior, A, y, sigma_y, n, gen):
    """Prior samples weighted by the likelihood N(y; A x, sigma_y^2 I), self-normalised."""
    x, labels = prior.sample(n, generator=gen, return_labels=True)
    log_w = -0.5 * ((y - x @ A.T) ** 2).sum(1) / sigma_y**2
    w = torch.exp(log_w - log_w.max())
    return x, labels, w / w.sum(), log_w


def _within_5_se(estimate_terms, w, expected):
    """Self-normalised estimate sum_i w_i f_i against ``expected``; its delta-method standard
    error is sqrt(sum_i w_i^2 (f_i - estimate)^2).  Shapes: f ``(n, k)``."""
    estimate = w @ estimate_terms
    se = torch.sqrt((w[:, None] ** 2 * (estimate_terms - estimate) ** 2).sum(0))
    assert bool(((estimate - expected).abs() <= 5 * se).all()), (estimate, expected, se)
    return se


def test_gaussian_posterior_is_the_kalman_update_in_information_form(gen):
    prior = make_gaussian(d=4)
    A = torch.randn(2, 4, generator=gen)
    y, sigma_y = torch.randn(2, generator=gen), 0.3
    post = prior.posterior(A, y, sigma_y)
    assert isinstance(post, analytic.Gaussian)
    precision = torch.linalg.inv(prior.cov) + A.T @ A / sigma_y**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (torch.linalg.solve(prior.cov, prior.mean) + A.T @ y / sigma_y**2)
    torch.testing.assert_close(post.cov, cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        prior.posterior_mean(A, y[None], sigma_y)[0], mean, rtol=0, atol=1e-12
    )
    evidence = scipy.stats.multivariate_normal(
        (A @ prior.mean).numpy(), (A @ prior.cov @ A.T + sigma_y**2 * torch.eye(2)).numpy()
    ).logpdf(y.numpy())
    assert abs(float(prior.evidence_log_prob(A, y[None], sigma_y)[0]) - evidence) < 1e-12


@pytest.mark.parametrize(
    "case", ["2d_mixture_1d_measurement", "4d_mixture_2d_measurement", "rank_deficient"]
)
def test_mixture_posterior_agrees_with_importance_sampling(case, gen):
    """Mean, second moments, component weights and evidence within 5 standard errors of a
    self-normalised importance-sampling estimate from 400 000 prior samples."""
    if case == "2d_mixture_1d_measurement":
        prior = make_mixture()
        A, y, sigma_y = torch.tensor([[1.0, 0.5]]), torch.tensor([0.8]), 0.5
    else:
        d = 4
        means = torch.randn(3, d, generator=gen) * 1.5
        covs = torch.stack([make_gaussian(d, seed).cov for seed in (2, 3, 4)])
        prior = analytic.GaussianMixture(means, covs, torch.tensor([0.2, 0.5, 0.3]))
        A = torch.randn(2, d, generator=gen)
        if case == "rank_deficient":  # two identical rows: A Sigma A^T alone is singular
            A = torch.cat([A[:1], A[:1]])
        y, sigma_y = A @ prior.sample(1, generator=gen)[0] + 0.4 * torch.randn(2), 0.4
    post = prior.posterior(A, y, sigma_y)
    x, labels, w, log_like = _importance(prior, A, y, sigma_y, 400_000, gen)
    exact_mean = post.weights @ post.means
    _within_5_se(x, w, exact_mean)
    second = post.weights @ (post.covs + post.means[:, :, None] * post.means[:, None, :]).flatten(1)
    _within_5_se((x[:, :, None] * x[:, None, :]).flatten(1), w, second)
    onehot = torch.nn.functional.one_hot(labels, prior.n_components).to(x.dtype)
    _within_5_se(onehot, w, post.weights)
    # evidence p(y) = E_prior[N(y; A x, sigma_y^2 I)], a plain Monte-Carlo mean
    like = torch.exp(log_like) / (2 * math.pi * sigma_y**2) ** (A.shape[0] / 2)
    estimate, se = like.mean(), like.std() / math.sqrt(like.numel())
    evidence = torch.exp(prior.evidence_log_prob(A, y[None], sigma_y)[0])
    assert abs(float(estimate - evidence)) <= 5 * float(se)


def test_posterior_mean_is_batched_and_matches_posterior(gen):
    prior = make_mixture()
    A = torch.tensor([[1.0, -0.3], [0.2, 0.7], [0.5, 0.5]])
    ys = torch.randn(5, 3, generator=gen) * 2
    batch = prior.posterior_mean(A, ys, 0.4)
    for y, got in zip(ys, batch, strict=True):
        post = prior.posterior(A, y, 0.4)
        torch.testing.assert_close(got, post.weights @ post.means, rtol=0, atol=1e-12)


def test_posterior_mean_with_identity_is_the_exact_denoiser(process, gen):
    """A = I, sigma_y = sigma: E[x | x + sigma n] is the denoiser D(alpha_t x, t) at the time
    with sigma_t / alpha_t = sigma (Tweedie)."""
    prior = make_mixture()
    t = torch.tensor(0.3)
    sigma = float(process.sigma(t) / process.alpha(t))
    v = torch.randn(6, 2, generator=gen) * 2
    expected = prior.denoise(process.alpha(t) * v, t, process)
    torch.testing.assert_close(prior.posterior_mean(torch.eye(2), v, sigma), expected)


def test_bad_input_and_degenerate_posteriors_raise():
    prior = make_mixture()
    A = torch.tensor([[1.0, 0.5]])
    with pytest.raises(ValueError, match="sigma_y = 0"):
        prior.posterior(A, torch.tensor([0.1]), 0)
    with pytest.raises(ValueError, match="sigma_y = -1"):
        prior.posterior_mean(A, torch.tensor([[0.1]]), -1)
    with pytest.raises(ValueError, match=r"A must be a matrix of shape \(m, d\) = \(m, 2\)"):
        prior.posterior(torch.ones(1, 3), torch.tensor([0.1]), 0.1)
    with pytest.raises(ValueError, match=r"y must have shape \(1,\)"):
        prior.posterior(A, torch.tensor([0.1, 0.2]), 0.1)
    # sigma_y^2 underflows to 0: the posterior covariance of A = I is 0, not positive definite
    with pytest.raises(ValueError, match="not positive definite"):
        prior.posterior(torch.eye(2), torch.tensor([0.1, 0.2]), 1e-200)
    # ... and for a rank-deficient A the evidence covariance itself is singular
    with pytest.raises(ValueError, match="not positive definite"):
        prior.posterior(torch.ones(2, 2), torch.tensor([0.1, 0.1]), 1e-200)


def test_posterior_leaves_the_prior_untouched(gen):
    prior = make_mixture()
    before = (prior.means.clone(), prior.covs.clone(), prior.weights.clone())
    prior.posterior(torch.tensor([[1.0, 0.0]]), torch.tensor([3.0]), 0.2)
    for a, b in zip(before, (prior.means, prior.covs, prior.weights), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and a far-away measurement shifts the weights to the component that explains it
    post = prior.posterior(torch.eye(2), torch.tensor([2.0, 1.0]), 0.1)
    assert float(post.weights[1]) > 0.99
