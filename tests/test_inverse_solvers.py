"""The diffusion posterior solvers, run with exact denoisers and judged by exact posteriors.

Two kinds of checks, each bound following from what is known of the method:

- exact in the small-step limit: on an isotropic Gaussian prior, replacement, DDRM (eta = 0),
  DDS, DiffPIR (zeta = 0) and PiGDM reach the exact posterior as the steps grow; the samplers are
  first order in law, so the covariance error at 100 steps must fall well below that at 10;
- approximate: on Gaussian-mixture priors every solver must beat the prior-only baseline (samples
  that ignore y) by a factor 2 in mean error and in sliced W2, and the unconditional sampler, the
  same machinery without y, must fail that very bound.
"""

import inspect
import math

import pytest
import torch

from diffcore import analytic, metrics, processes, samplers
from diffcore.inverse import operators as op
from diffcore.inverse import solvers as sv
from tests.test_analytic import make_mixture

VP = processes.VP()


def _grid(process, steps):
    # Linear has alpha = 0 at t = 1, where no solver can divide by alpha
    return samplers.time_grid(
        process, steps, t_max=0.999 if isinstance(process, processes.Linear) else 1.0
    )


def _run(name, prior, process, A, y, sigma_y, steps, n, seed, **options):
    gen = torch.Generator().manual_seed(seed)
    ts = _grid(process, steps)
    # the start state; RED-diff has none (its mu starts from its default)
    x = (
        None
        if name == "red_diff"
        else process.prior_sample((n, *A.in_shape), t=float(ts[0]), generator=gen)
    )
    y = y.expand(n, *y.shape[1:]) if x is None else y
    start = {} if x is None else {"x": x}
    out = sv.SOLVERS[name](
        prior.denoiser(process), y, A, sigma_y, ts, process, generator=gen, **start, **options
    )
    return out.reshape(n, -1)


def _cov_errors(samples, mean, cov):
    """||sample mean - mean||, its standard error sqrt(tr(C)/n), ||sample cov - cov||_F and the
    Monte-Carlo size of the latter, sqrt((tr(C)^2 + tr(C^2)) / n) (Gaussian fourth moments)."""
    n = samples.shape[0]
    mean_err = float((samples.mean(0) - mean).norm())
    mean_se = math.sqrt(float(torch.trace(cov)) / n)
    cov_err = float((torch.cov(samples.T) - cov).norm())
    mc = math.sqrt((float(torch.trace(cov)) ** 2 + float(torch.trace(cov @ cov))) / n)
    return mean_err, mean_se, cov_err, mc


# -- exact in the small-step limit ---------------------------------------------------------------
def _iso_problem(kind: str, sigma_y: float):
    """Prior N(mu, I) in d = 16 (images 1 x 4 x 4): observed and unobserved (spectral)
    coordinates are independent, which is what makes replacement-type methods exact."""
    gen = torch.Generator().manual_seed(11)
    d = 16
    prior = analytic.Gaussian(torch.randn(d, generator=gen), torch.eye(d))
    A = {
        "inpainting": lambda: op.Inpainting(op.random_mask((1, 4, 4), 0.5, gen)),
        "downsample": lambda: op.Downsample((1, 4, 4), 2),
        "blur": lambda: op.Blur(op.gaussian_kernel(3, 0.6), (1, 4, 4)),
        "mri": lambda: op.FourierSubsampling(op.cartesian_mask((4, 4), 2, 0.25, gen)),
    }[kind]()
    x_true = prior.sample(1, generator=gen).reshape(1, *A.in_shape)
    y = op.measure(A, x_true, sigma_y, gen)
    dense, y_real = A.to_dense(), y.reshape(-1)
    if dense.is_complex():  # complex k-space as the real-linear map R^d -> R^{2m}
        dense = torch.cat([dense.real, dense.imag])
        y_real = torch.cat([y_real.real, y_real.imag])
    if sigma_y == 0:  # the noiseless posterior is singular: y on the row space, the prior off it
        pinv = torch.linalg.pinv(dense)
        mean = prior.mean + pinv @ (y_real - dense @ prior.mean)
        cov = torch.eye(d) - pinv @ dense
    else:
        post = prior.posterior(dense, y_real, sigma_y)
        mean, cov = post.mean, post.cov
    return prior, A, y, mean, cov


def _check_converges(name, kind, sigma_y, process, n=4000, **options):
    prior, A, y, mean, cov = _iso_problem(kind, sigma_y)
    errs = {}
    for steps in (5, 50):
        samples = _run(name, prior, process, A, y, sigma_y, steps, n, seed=steps, **options)
        mean_err, mean_se, cov_err, mc = _cov_errors(samples, mean, cov)
        # the mean is exact at every step count (affine maps of Gaussians preserve it)
        assert mean_err < 5 * mean_se, (steps, mean_err, mean_se)
        errs[steps] = cov_err
    # a first-order sampler divides its error by ~10 from 5 to 50 steps: demand 0.3, plus MC
    assert errs[5] > 5 * mc, errs  # the 5-step error is discretisation, not noise
    assert errs[50] < 0.3 * errs[5] + 3 * mc, (errs, mc)
    return errs, mc


TIGHT = [
    ("replacement", "inpainting", {}),
    ("replacement", "downsample", {}),
    ("ddrm", "inpainting", {"eta": 0.0}),
    ("ddrm", "downsample", {"eta": 0.0}),
    ("dds", "inpainting", {"cg_iters": 4}),
    ("diffpir", "downsample", {"zeta": 0.0}),
    ("pigdm", "inpainting", {}),
]


@pytest.mark.parametrize("name, kind, options", TIGHT, ids=[f"{n}-{k}" for n, k, _ in TIGHT])
def test_noiseless_isotropic_gaussian_posterior_is_reached_as_steps_grow(name, kind, options):
    _check_converges(name, kind, 0.0, VP, **options)


def test_pigdm_is_exact_for_an_isotropic_gaussian_prior_in_every_process(smooth_process):
    """r_t^2 = sigma_bar^2 / (1 + sigma_bar^2) is the exact variance of p(x0 | x_t) for a prior
    N(mu, I): PiGDM's conditional denoiser is then exact, also for noisy y."""
    _check_converges("pigdm", "inpainting", 0.2, smooth_process, n=3000)


@pytest.mark.parametrize("kind", ["blur", "mri"])
def test_pigdm_is_exact_for_noisy_blur_and_complex_mri_data(kind):
    """Also through a complex measurement: k-space samples with real and imaginary noise."""
    _check_converges("pigdm", kind, 0.2, VP)


def test_ddrm_with_eta_above_zero_keeps_a_bias_as_steps_grow():
    """DDRM injects noise of std eta * sigma_bar_s at every step, a size that does not shrink
    with the step: for eta > 0 (the paper's 0.85) the chain is a denoise-and-renoise iteration,
    whose variance falls short by sigma^2 (1 - sqrt(1 - eta^2))^2 / (1 + sigma^2) per step on a
    unit Gaussian, and it does not converge to the posterior.  Where a consistent first-order
    sampler divides its error by ~10 from 10 to 100 steps (to ~0.1 + MC), DDRM keeps > 40%."""
    prior, A, y, mean, cov = _iso_problem("inpainting", 0.0)
    errs = {}
    for steps in (10, 100):
        samples = _run("ddrm", prior, VP, A, y, 0.0, steps, 4000, seed=steps, eta=0.85)
        _, _, errs[steps], mc = _cov_errors(samples, mean, cov)
    assert errs[10] > 5 * mc and errs[100] > 0.4 * errs[10], (errs, mc)


# -- approximate solvers on mixture priors -------------------------------------------------------
def _mixture_16():
    gen = torch.Generator().manual_seed(4)
    d = 16
    means = 1.5 * torch.randn(3, d, generator=gen)
    covs = []
    for _ in range(3):
        m = torch.randn(d, d, generator=gen)
        covs.append(m @ m.T / d + 0.1 * torch.eye(d))
    return analytic.GaussianMixture(means, torch.stack(covs), torch.tensor([0.5, 0.3, 0.2]))


def _mixture_problem(kind: str):
    gen = torch.Generator().manual_seed(2)
    if kind == "2d":  # a 2-D mixture seen through one noisy linear measurement
        prior = make_mixture()
        A, sigma_y = op.MatrixOperator(torch.tensor([[1.0, 0.5]])), 0.5
        y = torch.tensor([[0.8]])
    else:  # a 16-D mixture, half its pixels observed with noise
        prior = _mixture_16()
        A, sigma_y = op.Inpainting(op.random_mask((1, 4, 4), 0.5, gen)), 0.2
        y = op.measure(A, prior.sample(1, generator=gen).reshape(1, *A.in_shape), sigma_y, gen)
    post = prior.posterior(A.to_dense(), y.reshape(-1), sigma_y)
    return prior, A, y, sigma_y, post


def _distances(samples, post, seed):
    gen = torch.Generator().manual_seed(seed)
    exact = post.sample(samples.shape[0], generator=gen)
    mean_err = float((samples.mean(0) - post.weights @ post.means).norm())
    return mean_err, float(metrics.sliced_wasserstein(samples, exact, generator=gen))


def _beats_baseline(samples, prior, post, seed):
    """Half the mean error and half the sliced W2 of samples from the prior, which ignore y."""
    baseline = _distances(
        prior.sample(samples.shape[0], generator=torch.Generator().manual_seed(seed)), post, seed
    )
    got = _distances(samples, post, seed)
    return got[0] < 0.5 * baseline[0] and got[1] < 0.5 * baseline[1], got, baseline


STEPS = {"2d": 50, "16d": 50}


def _options(name, steps):
    # DPS moves x by about zeta per step whatever the step count: keep the total, 10, fixed
    return {"zeta": 10 / steps} if name == "dps" else {}


@pytest.mark.parametrize("kind", ["2d", "16d"])
@pytest.mark.parametrize("name", list(sv.SOLVERS))
def test_solver_beats_the_prior_only_baseline_on_mixture_posteriors(name, kind):
    prior, A, y, sigma_y, post = _mixture_problem(kind)
    steps = STEPS[kind]
    samples = _run(name, prior, VP, A, y, sigma_y, steps, 1000, seed=1, **_options(name, steps))
    ok, got, baseline = _beats_baseline(samples, prior, post, seed=5)
    assert ok, (got, baseline)


@pytest.mark.parametrize("kind", ["2d", "16d"])
def test_the_baseline_bound_fails_when_y_is_ignored(kind):
    """The unconditional sampler (DDPM with the same exact denoiser, no y) must fail the bound
    the solvers pass: it can tell a solver that uses y from one that does not."""
    prior, A, y, sigma_y, post = _mixture_problem(kind)
    gen = torch.Generator().manual_seed(1)
    ts = _grid(VP, STEPS[kind])
    x = VP.prior_sample((1000, prior.dim), generator=gen)
    samples = samplers.ddpm(prior.denoiser(VP), x, ts, VP, generator=gen, denoise_last=True)
    ok, got, baseline = _beats_baseline(samples, prior, post, seed=5)
    assert not ok, (got, baseline)


@pytest.mark.parametrize("name", list(sv.SOLVERS))
def test_every_solver_runs_in_every_process(name, smooth_process):
    """Written with alpha_t, sigma_t of any process: each solver beats the baseline on the 2-D
    problem under VP, VP-cosine, VE and Linear (30 steps, 500 samples)."""
    prior, A, y, sigma_y, post = _mixture_problem("2d")
    samples = _run(
        name, prior, smooth_process, A, y, sigma_y, 30, 1000, seed=3, **_options(name, 30)
    )
    ok, got, baseline = _beats_baseline(samples, prior, post, seed=6)
    assert ok, (got, baseline)


# -- interface -----------------------------------------------------------------------------------
def test_one_signature_for_all_solvers():
    """The samplers' order, the measurement after the model; then keyword-only options, among
    them the start (RED-diff's is mu), the generator, the callback and the registry's options."""
    expected = ["model", "y", "operator", "sigma_y", "ts", "process"]
    for name, solver in sv.SOLVERS.items():
        params = list(inspect.signature(solver.fn).parameters.values())
        assert [p.name for p in params[:6]] == expected, name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[6:]), name
        keywords = {p.name for p in params[6:]}
        start = "mu" if name == "red_diff" else "x"
        assert keywords == {start, "generator", "callback", *solver.options}, name


def test_solvers_are_reproducible_and_broadcast_one_y():
    prior, A, y, sigma_y, _ = _mixture_problem("2d")
    ts = samplers.time_grid(VP, 10)
    for name, solver in sv.SOLVERS.items():
        runs = [
            solver(
                prior.denoiser(VP),
                y.expand(4, 1),
                A,
                sigma_y,
                ts,
                VP,
                generator=torch.Generator().manual_seed(0),
            )
            for _ in range(2)
        ]
        assert runs[0].shape == (4, 2), name
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_bad_input_raises_value_errors_naming_the_value():
    prior, A, y, sigma_y, _ = _mixture_problem("2d")
    D = prior.denoiser(VP)
    ts = samplers.time_grid(VP, 5)
    with pytest.raises(ValueError, match=r"y must have shape .* = \(batch, 1\).*got \(1, 2\)"):
        sv.dps(D, torch.zeros(1, 2), A, sigma_y, ts, VP)
    with pytest.raises(ValueError, match="sigma_y = -0.5"):
        sv.pigdm(D, y, A, -0.5, ts, VP)
    with pytest.raises(ValueError, match="has_svd is False"):
        blur = op.Blur(op.gaussian_kernel(3, 1.0), (1, 4, 4))
        sv.ddrm(D, torch.zeros(1, 1, 4, 4), blur, 0.1, ts, VP)
    with pytest.raises(ValueError, match="y has batch 3 but x has batch 2"):
        sv.replacement(D, torch.zeros(3, 1), A, sigma_y, ts, VP, x=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"alpha\(ts\[0\]\) = 0"):
        lin = processes.Linear()
        sv.diffpir(prior.denoiser(lin), y, A, sigma_y, samplers.time_grid(lin, 5), lin)
    with pytest.raises(ValueError, match="eta = 1.5"):
        sv.ddrm(D, y, A, sigma_y, ts, VP, eta=1.5)
    with pytest.raises(ValueError, match="give sigma_y > 0"):
        sv.red_diff(D, y, A, 0.0, ts, VP)
    with pytest.raises(ValueError, match="ts must decrease"):
        sv.dds(D, y, A, sigma_y, torch.tensor([0.1, 0.5]), VP)
