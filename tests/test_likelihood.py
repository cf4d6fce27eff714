"""Log-likelihood through the PF-ODE against the exact log-density of the diffused marginal."""

import math

import pytest
import torch

from diffcore import likelihood, processes

from .test_analytic import make_gaussian, make_mixture

T_MIN = 1e-3


def _t_max(process):
    # the log-SNR grid needs a finite log-SNR at t_max: Linear has alpha_1 = 0
    return 0.999 if isinstance(process, processes.Linear) else 1.0


def _errors(law, process, x, steps, **options):
    exact = law.log_prob(x, T_MIN, process)
    return [
        float(
            (
                likelihood.log_likelihood(
                    law.denoiser(process), x, process, T_MIN, n_steps=n, prior=law, **options
                )
                - exact
            )
            .abs()
            .max()
        )
        for n in steps
    ]


@pytest.mark.parametrize("law_name", ["mixture_2d", "gaussian_4d"])
def test_log_likelihood_of_the_exact_model_is_the_exact_log_density(smooth_process, law_name):
    """With the exact denoiser and the exact time-t_max marginal as prior, the only error is
    RK4's, O(h^4): halving the step must divide it by about 16 (we ask for at least 8, an
    observed order of 3 or more), and the finer solve must be within a milli-nat."""
    process = smooth_process
    if law_name == "mixture_2d":
        law, steps = make_mixture(), (32, 64)
    else:
        law, steps = make_gaussian(d=4), (16, 32)
    x = law.sample(8, generator=torch.Generator().manual_seed(0))
    coarse, fine = _errors(law, process, x, steps, t_max=_t_max(process))
    assert fine <= coarse / 8, (coarse, fine)
    assert fine <= 1e-3, fine


def test_default_prior_is_exact_for_linear_at_t_max_one():
    """Linear has alpha_1 = 0, so p_1 = N(0, I) is the default prior exactly; the uniform grid
    reaches t = 1 where the log-SNR grid cannot."""
    law, process = make_mixture(), processes.Linear()
    x = law.sample(8, generator=torch.Generator().manual_seed(1))
    exact = law.log_prob(x, T_MIN, process)
    errors = [
        float(
            (
                likelihood.log_likelihood(
                    law.denoiser(process), x, process, T_MIN, 1.0, n_steps=n, grid="uniform"
                )
                - exact
            )
            .abs()
            .max()
        )
        for n in (16, 32)
    ]
    assert errors[1] <= errors[0] / 8 and errors[1] <= 1e-4, errors


def test_image_shaped_data():
    law, process = make_gaussian(d=4), processes.VP()
    x = law.sample(3, generator=torch.Generator().manual_seed(2))
    flat = likelihood.log_likelihood(law.denoiser(process), x, process, n_steps=8, prior=law)
    image = likelihood.log_likelihood(
        law.denoiser(process), x.reshape(3, 1, 2, 2), process, n_steps=8, prior=law
    )
    torch.testing.assert_close(image, flat, rtol=1e-12, atol=1e-12)


def _gaussian_velocity_divergence(law, t, process):
    """u = f x - g^2/2 * score with score = -(a^2 Sigma + s^2 I)^{-1} (x - a mu), so
    div u = f d + g^2/2 * sum_i 1 / (a^2 l_i + s^2): constant in x."""
    t = torch.tensor(t)
    a, s = process.alpha(t), process.sigma(t)
    ell = torch.linalg.eigvalsh(law.cov)
    return float(process.f(t) * law.dim + 0.5 * process.g2(t) * (1 / (a**2 * ell + s**2)).sum())


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_divergence_exact_and_hutchinson_unbiased(probe):
    law, process, t = make_gaussian(d=4), processes.VP(), 0.3
    exact = _gaussian_velocity_divergence(law, t, process)
    velocity = lambda y: law.velocity(y, t, process)  # noqa: E731
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    value, div = likelihood.value_and_divergence(velocity, x)
    torch.testing.assert_close(value, law.velocity(x, t, process))
    torch.testing.assert_close(div, torch.full((5,), exact), rtol=1e-10, atol=1e-10)
    # one probe per row on 20k copies of a point: independent single-probe estimates
    n = 20_000
    gen = torch.Generator().manual_seed(1)
    if probe == "rademacher":
        probes = 2 * torch.randint(0, 2, (1, n, 4), generator=gen).double() - 1
    else:
        probes = torch.randn(1, n, 4, generator=gen)
    _, estimates = likelihood.value_and_divergence(velocity, x[:1].expand(n, 4), probes)
    se = float(estimates.std()) / math.sqrt(n)
    assert abs(float(estimates.mean()) - exact) <= 4 * se, (float(estimates.mean()), exact, se)
    # and the variance is the textbook one, with S = J + J^T: 1/2 ||S||_F^2 for Gaussian probes;
    # for Rademacher probes v_i^2 = 1, the diagonal is exact and only S's off-diagonal counts
    jac = torch.autograd.functional.jacobian(lambda y: velocity(y[None])[0], x[0])
    sym = jac + jac.T
    if probe == "rademacher":
        sym = sym - torch.diag(torch.diag(sym))
    variance, se_variance = _variance(estimates)
    assert abs(variance - 0.5 * float((sym**2).sum())) <= 4 * se_variance


def _variance(estimates):
    """The sample variance and its standard error, sd((e - mean)^2) / sqrt(n)."""
    dev2 = (estimates - estimates.mean()) ** 2
    return float(dev2.mean()), float(dev2.std()) / math.sqrt(len(dev2))


def test_hutchinson_log_likelihood_is_unbiased():
    """Probes are drawn once per solve and the trajectory does not depend on them, so the
    Hutchinson log-likelihood is unbiased for the exact-divergence solve on the same grid:
    2000 independent estimates (copies of one point, Gaussian probes) average to it within 4 standard errors."""
    law, process = make_mixture(), processes.VP()
    x = law.sample(1, generator=torch.Generator().manual_seed(3))
    options = dict(n_steps=8, prior=law)
    exact = likelihood.log_likelihood(law.denoiser(process), x, process, **options)
    estimates = likelihood.log_likelihood(
        law.denoiser(process),
        x.expand(2000, 2),
        process,
        divergence="hutchinson",
        probe="gaussian",
        generator=torch.Generator().manual_seed(4),
        **options,
    )
    se = float(estimates.std()) / math.sqrt(2000)
    assert abs(float(estimates.mean() - exact)) <= 4 * se, (
        float(estimates.mean()),
        float(exact),
        se,
    )
    assert float(estimates.std()) > 1e-3
    averaged = likelihood.log_likelihood(
        law.denoiser(process),
        x.expand(2000, 2),
        process,
        divergence="hutchinson",
        probe="gaussian",
        n_probes=4,
        generator=torch.Generator().manual_seed(5),
        **options,
    )
    # averaging 4 probes divides the variance by 4, within 4 standard errors of the ratio
    (v1, se1), (v4, se4) = _variance(estimates), _variance(averaged)
    ratio = v1 / v4
    assert abs(ratio - 4) <= 4 * ratio * math.hypot(se1 / v1, se4 / v4), ratio


def test_bits_per_dim():
    # the uniform density over the union of the 256 bins, [-1 - D/2, 1 + D/2]^d with D = 2/255,
    # is the uniform law on 256 values: exactly 8 bits per dimension
    d = 3
    log_p = torch.tensor(-d * math.log(256 * 2 / 255))
    torch.testing.assert_close(likelihood.bits_per_dim(log_p, d), torch.tensor(8.0))
    # likewise 17 levels (digits): log2(17) bits
    log_p = torch.tensor(-d * math.log(17 * 2 / 16))
    torch.testing.assert_close(
        likelihood.bits_per_dim(log_p, d, levels=17), torch.tensor(math.log2(17))
    )
    # a density of 1 adds d log(127.5) nats: log2(127.5) bits per dimension
    torch.testing.assert_close(
        likelihood.bits_per_dim(torch.zeros(2), 1), torch.full((2,), math.log2(127.5))
    )
    with pytest.raises(ValueError, match="levels must be an integer >= 2, got levels = 1"):
        likelihood.bits_per_dim(log_p, d, levels=1)
    with pytest.raises(ValueError, match="d must be an integer >= 1, got d = 0"):
        likelihood.bits_per_dim(log_p, 0)


def test_the_negative_elbo_of_the_exact_model_is_a_tight_bound():
    """For Gaussian data N(mu, S) and the exact eps model, every term has a closed form: the
    prior term a^2 (|mu|^2 + tr S) / (2 s^2) at t_max, the diffusion term by I-MMSE
    sum_i 1/2 [log(1 + SNR l_i)] from t_max to t_min, the decoder term d/2 log(2 pi e / SNR).
    Their sum exceeds the entropy 1/2 log det(2 pi e S) by sum_i 1/2 log(1 + 1/(SNR_min l_i))
    plus the prior terms.  The Monte-Carlo estimate (elbo_end_terms + train.elbo_loss with
    log-SNR times) must match it within 4 standard errors, and the bound must hold."""
    from diffcore import targets, train

    vp, law, t_min = processes.VP(), make_gaussian(3), 1e-4
    ell, d = torch.linalg.eigvalsh(law.cov), law.dim
    snr_min, snr_max = (float(vp.snr(t)) for t in (t_min, 1.0))
    closed = (
        0.5 * snr_max * float(law.mean.pow(2).sum() + ell.sum())
        + float(0.5 * (torch.log1p(snr_min * ell) - torch.log1p(snr_max * ell)).sum())
        + 0.5 * d * math.log(2 * math.pi * math.e / snr_min)
    )
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * law.cov))
    assert 0 < closed - entropy < 0.01  # tight: the gap is O(1/SNR_min) + O(SNR_max)

    def eps_model(x, t):
        return targets.convert(law.denoise(x, t, vp), "x0", "eps", x, t, vp)

    sampler = train.uniform_logsnr_time(vp, t_min, 1.0)
    values = []
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        x0 = law.sample(20_000, generator=gen)
        prior, reconstruction = likelihood.elbo_end_terms(x0, vp, t_min)
        diffusion = train.elbo_loss(
            eps_model, x0, vp, t_min=t_min, t_sampler=sampler, generator=gen
        )
        values.append(float(prior.mean() + diffusion + reconstruction.mean()))
    values = torch.tensor(values)
    mean, se = float(values.mean()), float(values.std() / math.sqrt(len(values)))
    assert abs(mean - closed) <= 4 * se, (mean, closed, se)
    # precise enough to catch a lost or doubled term: the decoder term alone is about -15 nats
    assert se < 0.1


def test_elbo_end_terms_shapes_and_errors():
    x0 = torch.ones(5, 1, 2, 2, dtype=torch.float64)
    prior, reconstruction = likelihood.elbo_end_terms(x0, processes.VE(), 1e-3, 1.0)
    assert prior.shape == reconstruction.shape == (5,)
    torch.testing.assert_close(prior, torch.full((5,), 2.0 / 50.0**2))  # VE: alpha = 1, sigma 50
    with pytest.raises(ValueError, match="t_min = 0, t_max = 1.0"):
        likelihood.elbo_end_terms(x0, processes.VP(), 0, 1.0)
    with pytest.raises(
        ValueError, match=r"x0 must be a floating tensor \(batch, ...\), got \(4,\)"
    ):
        likelihood.elbo_end_terms(torch.zeros(4), processes.VP())


def test_bad_input_is_refused():
    law, vp = make_mixture(), processes.VP()
    D, x = law.denoiser(vp), torch.zeros(2, 2)
    with pytest.raises(
        ValueError,
        match=r"divergence must be one of \('exact', 'hutchinson'\), got divergence = 'trace'",
    ):
        likelihood.log_likelihood(D, x, vp, divergence="trace")
    with pytest.raises(
        ValueError, match=r"probe must be one of \('rademacher', 'gaussian'\), got probe = 'sphere'"
    ):
        likelihood.log_likelihood(D, x, vp, divergence="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="n_probes must be an integer >= 1, got n_probes = 0"):
        likelihood.log_likelihood(D, x, vp, divergence="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \(batch, ...\), got \(2,\)"):
        likelihood.log_likelihood(D, torch.zeros(2), vp)
    with pytest.raises(ValueError, match="needs a finite log-SNR at t_max"):
        likelihood.log_likelihood(D, x, processes.Linear(), t_max=1.0)
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max <= 1"):
        likelihood.log_likelihood(D, x, vp, t_min=0.5, t_max=0.2)
