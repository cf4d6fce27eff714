"""Bad input across the public API: every call below raises a ``ValueError`` (a bad value) or a
``TypeError`` (a bad kind) whose message names the argument, before any work is done.

The classes: NaN or infinity in data; integer and half-precision tensors; user functions that
return the wrong shape or None; documented rules (grids, times, covariances, counts, shapes);
checkpoints that cannot be resumed; conversions at the degenerate ends of a process.  The
samplers and the inverse solvers have their own sweeps, beside their tests.
"""

from __future__ import annotations

import re

import pytest
import torch

from diffcore import (
    analytic,
    checks,
    data,
    flowmap,
    guidance,
    likelihood,
    metrics,
    nets,
    plot,
    processes,
    targets,
    train,
)
from diffcore.inverse import operators as op

NAN, INF = float("nan"), float("inf")
BIG = 10**30  # a count that overflows every integer type torch has
VP, VE, LIN = processes.VP(), processes.VE(), processes.Linear()


# -- small inputs, built inside the tests (where float64 is the default) --------------------------
def _x(*shape, fill=0.0, dtype=None) -> torch.Tensor:
    return torch.full(shape, fill, dtype=dtype or torch.get_default_dtype())


def _bad(*shape, value=NAN) -> torch.Tensor:
    """Zeros with one bad entry, at the last position."""
    x = _x(*shape)
    x.view(-1)[-1] = value
    return x


def _gauss() -> analytic.Gaussian:
    return analytic.Gaussian(torch.zeros(2), torch.eye(2))


def _mixture() -> analytic.GaussianMixture:
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5]])
    return analytic.GaussianMixture(means, torch.eye(2).expand(2, 2, 2).clone(), [0.5, 0.5])


def _cov_with_eigenvalue(value: float) -> torch.Tensor:
    return torch.diag(torch.tensor([1.0, value]))


def _mlp() -> nets.MLP:
    return nets.MLP(2, hidden=8, depth=1, time_embedding=4).double()


def _unet() -> nets.UNet:
    return nets.UNet(channels=1, base=8, mults=(1,), time_embedding=4).double()


def _ts() -> torch.Tensor:
    return torch.tensor([1.0, 0.5, 0.002])


def _consistency() -> flowmap.ConsistencyModel:
    return flowmap.ConsistencyModel(_mlp(), VP, 0.002)


def _trajectory() -> flowmap.TrajectoryModel:
    return flowmap.TrajectoryModel(flowmap.TwoTimeMLP(2, hidden=8, depth=1, time_embedding=4), VP)


def _blur() -> op.Blur:
    return op.Blur(op.gaussian_kernel(3, 0.6), (1, 4, 4))


def _identity(x, t):
    return x


def _loss(model, x0, generator=None):
    return train.eps_loss(model, x0, VP, generator=generator)


def _wrong_shape(first, *rest):
    """A user function that drops all but the first coordinate of its first argument."""
    return first[:, :1]


def _none(*args):
    """A user function that forgets to return."""
    return None


def _refused(call, exc, argument: str, pattern: str | None = None) -> str:
    """Run ``call``; check the exception's type, that its message names ``argument`` (as a
    word) and matches ``pattern``.  Returns the message."""
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert info.type is exc, f"{info.type.__name__}: {message}"
    assert re.search(rf"(?<![\w']){re.escape(argument)}(?![\w'])", message), message
    if pattern is not None:
        assert re.search(pattern, message), message
    return message


# -- data: NaN, infinity, integer and half-precision tensors -----------------------------------------
# Each row: (name, argument, shape, call with that argument replaced, kinds of bad tensor to try).
# "int" is left out where integers are documented to be converted (the parameters of an exact
# model, a training set).
ALL = ("nan", "inf", "int", "half")
# fmt: off
DATA = [
    ("marginal", "x0", (3, 2), lambda v: VP.marginal(v, 0.5, _x(3, 2)), ALL),
    ("marginal", "noise", (3, 2), lambda v: VP.marginal(_x(3, 2), 0.5, v), ALL),
    ("convert", "pred", (3, 2), lambda v: targets.convert(v, "eps", "x0", _x(3, 2), 0.5, VP), ALL),
    ("convert", "x", (3, 2), lambda v: targets.convert(_x(3, 2), "v", "eps", v, 0.5, VP), ALL),
    ("Gaussian", "mean", (2,), lambda v: analytic.Gaussian(v, torch.eye(2)), ("nan", "inf", "half")),
    ("Gaussian", "cov", (2, 2), lambda v: analytic.Gaussian(torch.zeros(2), v), ("nan", "inf", "half")),
    ("GaussianMixture", "covs", (1, 2, 2), lambda v: analytic.GaussianMixture(torch.zeros(1, 2), v, [1.0]), ("nan", "inf")),
    ("GaussianMixture", "weights", (2,), lambda v: analytic.GaussianMixture(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), v), ("nan", "inf")),
    ("score", "x", (4, 2), lambda v: _mixture().score(v, 0.5, VP), ALL),
    ("denoise", "x", (4, 2), lambda v: _mixture().denoise(v, 0.5, VP), ALL),
    ("log_prob", "x", (4, 2), lambda v: _mixture().log_prob(v, 0.5, VP), ALL),
    ("velocity", "x", (4, 2), lambda v: _gauss().velocity(v, 0.5, VP), ALL),
    ("pf_ode_map", "x", (4, 2), lambda v: _gauss().pf_ode_map(v, 0.8, 0.2, VP), ALL),
    ("posterior", "y", (2,), lambda v: _gauss().posterior(torch.eye(2), v, 0.1), ("nan", "inf", "half")),
    ("posterior", "A", (2, 2), lambda v: _gauss().posterior(v, torch.zeros(2), 0.1), ("nan", "inf", "half")),
    ("gaussian_w2", "mean1", (2,), lambda v: metrics.gaussian_w2(v, torch.eye(2), torch.zeros(2), torch.eye(2)), ALL),
    ("gaussian_w2", "cov2", (2, 2), lambda v: metrics.gaussian_w2(torch.zeros(2), torch.eye(2), torch.zeros(2), v), ALL),
    ("sliced_wasserstein", "x", (5, 2), lambda v: metrics.sliced_wasserstein(v, _x(5, 2)), ALL),
    ("mmd", "y", (5, 2), lambda v: metrics.mmd(_x(5, 2), v), ALL),
    ("psnr", "x", (1, 1, 4, 4), lambda v: metrics.psnr(v, _x(1, 1, 4, 4)), ALL),
    ("ssim", "ref", (1, 1, 8, 8), lambda v: metrics.ssim(_x(1, 1, 8, 8), v), ALL),
    ("straightness", "path", (3, 2, 2), lambda v: metrics.straightness(v, torch.tensor([1.0, 0.5, 0.0])), ALL),
    ("dequantize", "x", (2, 2), lambda v: data.dequantize(v, 17), ALL),
    ("fit_gaussian_mixture", "x", (10, 2), lambda v: data.fit_gaussian_mixture(v, 2), ALL),
    ("MLP", "x", (4, 2), lambda v: _mlp()(v, 0.5), ALL),
    ("UNet", "x", (2, 1, 8, 8), lambda v: _unet()(v, 0.5), ALL),
    ("eps_loss", "x0", (4, 2), lambda v: train.eps_loss(_mlp(), v, VP), ALL),
    ("cfm_loss", "x0", (4, 2), lambda v: train.cfm_loss(_mlp(), v), ALL),
    ("ot_pairing", "noise", (4, 2), lambda v: train.ot_pairing(_x(4, 2), v), ALL),
    ("reflow_loss", "pairs", (4, 2, 2), lambda v: train.reflow_loss(_mlp(), v), ALL),
    ("fit", "data", (8, 2), lambda v: train.fit(_mlp(), _loss, v, 1), ("nan", "inf")),
    ("log_likelihood", "x", (4, 2), lambda v: likelihood.log_likelihood(_identity, v, VP, n_steps=2), ALL),
    ("elbo_end_terms", "x0", (4, 2), lambda v: likelihood.elbo_end_terms(v, VP), ALL),
    ("value_and_divergence", "x", (4, 2), lambda v: likelihood.value_and_divergence(lambda u: u, v), ALL),
    ("exact_flow_map", "x", (4, 2), lambda v: flowmap.exact_flow_map(_identity, v, 0.8, 0.2, VP, n_steps=2), ALL),
    ("meanflow_sample", "x", (4, 2), lambda v: flowmap.meanflow_sample(lambda z, t, s: z, v, _ts()), ALL),
    ("consistency_sample", "x", (4, 2), lambda v: flowmap.consistency_sample(_consistency(), v, _ts(), VP), ALL),
    ("meanflow_loss", "x0", (4, 2), lambda v: flowmap.meanflow_loss(lambda z, t, s: z, v), ALL),
    ("TrajectoryModel", "x", (4, 2), lambda v: _trajectory()(v, 0.6, 0.3), ALL),
    ("Blur", "kernel", (3, 3), lambda v: op.Blur(v, (1, 8, 8)), ALL),
    ("MatrixOperator", "matrix", (2, 3), lambda v: op.MatrixOperator(v), ALL),
    ("measure", "x", (1, 1, 4, 4), lambda v: op.measure(_blur(), v, 0.1), ALL),
    ("forward", "x", (1, 1, 4, 4), lambda v: _blur()(v), ("int", "half")),
    ("adjoint", "y", (1, 1, 4, 4), lambda v: _blur().adjoint(v), ("int", "half")),
    ("conjugate_gradient", "b", (2, 3), lambda v: op.conjugate_gradient(lambda u: u, v), ALL),
    ("conjugate_gradient", "x", (2, 3), lambda v: op.conjugate_gradient(lambda u: u, _x(2, 3), x=v), ALL),
]
# fmt: on


def _bad_tensor(kind: str, shape) -> torch.Tensor:
    if kind in ("nan", "inf"):
        return _bad(*shape, value=NAN if kind == "nan" else -INF)
    return _x(*shape, dtype=torch.int64 if kind == "int" else torch.float16)


@pytest.mark.parametrize(
    ("call", "argument", "shape", "kind"),
    [
        pytest.param(call, argument, shape, kind, id=f"{where}-{argument}-{kind}")
        for where, argument, shape, call, kinds in DATA
        for kind in kinds
    ],
)
def test_bad_data_is_refused(call, argument, shape, kind):
    if kind in ("nan", "inf"):
        _refused(lambda: call(_bad_tensor(kind, shape)), ValueError, argument, "must be finite")
    else:
        dtype = "torch.int64" if kind == "int" else "torch.float16"
        _refused(lambda: call(_bad_tensor(kind, shape)), TypeError, argument, f"dtype {dtype}")


# -- user functions that return the wrong shape, or None -------------------------------------------
# Each row: (name, the function's name in the message, call with that function replaced).
# fmt: off
FUNCTIONS = [
    ("exact_flow_map", "denoiser", lambda f: flowmap.exact_flow_map(f, _x(4, 2), 0.8, 0.2, VP, n_steps=2)),
    ("exact_flow_map", "solver", lambda f: flowmap.exact_flow_map(_identity, _x(4, 2), 0.8, 0.2, VP, solver=lambda m, x, ts, p: f(x))),
    ("meanflow_sample", "u", lambda f: flowmap.meanflow_sample(f, _x(4, 2), _ts())),
    ("meanflow_loss", "u", lambda f: flowmap.meanflow_loss(f, _x(4, 2))),
    ("consistency_sample", "f", lambda f: flowmap.consistency_sample(f, _x(4, 2), _ts(), VP)),
    ("ctm_sample", "G", lambda f: flowmap.ctm_sample(f, _x(4, 2), _ts(), VP)),
    ("ctm_loss", "G", lambda f: flowmap.ctm_loss(f, lambda x, t, s: x, _identity, _x(4, 2), VP, _ts())),
    ("ConsistencyModel", "net", lambda f: flowmap.ConsistencyModel(f, VP, 0.002)(_x(4, 2), 0.5)),
    ("TrajectoryModel", "net", lambda f: flowmap.TrajectoryModel(f, VP)(_x(4, 2), 0.6, 0.3)),
    ("consistency_training_loss", "student", lambda f: flowmap.consistency_training_loss(f, _identity, _x(4, 2), VP, _ts())),
    ("consistency_distillation_loss", "teacher", lambda f: flowmap.consistency_distillation_loss(_identity, _identity, _identity, _x(4, 2), VP, _ts(), teacher=lambda m, x, ts, p: f(x))),
    ("conjugate_gradient", "apply", lambda f: op.conjugate_gradient(f, _x(2, 3, fill=1.0))),
    ("log_likelihood", "denoiser", lambda f: likelihood.log_likelihood(f, _x(4, 2), VP, n_steps=2)),
    ("value_and_divergence", "fn", lambda f: likelihood.value_and_divergence(f, _x(4, 2))),
    ("as_denoiser", "model", lambda f: targets.as_denoiser(f, "eps", VP)(_x(4, 2), 0.5)),
    ("pf_ode_velocity", "denoiser", lambda f: targets.pf_ode_velocity(f, _x(4, 2), 0.5, VP)),
    ("cfg_denoiser", "model", lambda f: guidance.cfg_denoiser(f, VP, 0, 1.0)(_x(4, 2), 0.5)),
    ("classifier_guided_denoiser", "denoiser", lambda f: guidance.classifier_guided_denoiser(f, lambda x, t, c: x.sum(1), VP, 0, 1.0)(_x(4, 2), 0.5)),
    ("eps_loss", "model", lambda f: train.eps_loss(f, _x(4, 2), VP)),
    ("cfm_loss", "model", lambda f: train.cfm_loss(f, _x(4, 2))),
    ("reflow_loss", "model", lambda f: train.reflow_loss(f, _x(4, 2, 2))),
]
# fmt: on


@pytest.mark.parametrize(
    ("call", "name", "returns"),
    [
        pytest.param(call, name, returns, id=f"{where}-{name}-{returns.__name__.strip('_')}")
        for where, name, call in FUNCTIONS
        for returns in (_wrong_shape, _none)
    ],
)
def test_a_user_function_returning_the_wrong_shape_is_named(call, name, returns):
    if returns is _none:
        _refused(
            lambda: call(returns), TypeError, name, r"must return a tensor of shape .* got NoneType"
        )
    else:
        _refused(
            lambda: call(returns),
            ValueError,
            name,
            r"must return a tensor of shape \(\d+, \d+\).* got shape \(\d+, 1\)",
        )


# Functions that must give one value per sample, or a scalar.
# fmt: off
PER_SAMPLE = [
    ("log_likelihood-prior", "prior", lambda: likelihood.log_likelihood(_gauss().denoiser(VP), _x(4, 2), VP, n_steps=2, prior=lambda y: y), r"shape \(4,\), got shape \(4, 2\)"),
    ("classifier_gradient", "log_prob_class", lambda: guidance.classifier_gradient(lambda x, t, c: None, _x(3, 2), 0.5, 0), "got NoneType"),
    ("diffusion_loss-t_sampler", "t_sampler", lambda: train.diffusion_loss(_mlp(), _x(4, 2), VP, t_sampler=lambda n, g: torch.rand(n + 1)), r"shape \(4,\), got shape \(5,\)"),
    ("diffusion_loss-weighting", "weighting", lambda: train.diffusion_loss(_mlp(), _x(4, 2), VP, weighting=lambda t: t[:2]), r"got shape \(2,\)"),
    ("fit-loss_fn", "loss_fn", lambda: train.fit(_mlp(), lambda m, x0, generator: None, _x(8, 2), 1), "scalar tensor"),
]
# fmt: on


@pytest.mark.parametrize(
    ("argument", "call", "pattern"), [pytest.param(*row[1:], id=row[0]) for row in PER_SAMPLE]
)
def test_a_user_function_with_one_value_per_sample(argument, call, pattern):
    exc = TypeError if "NoneType" in pattern or "scalar" in pattern else ValueError
    _refused(call, exc, argument, pattern)


# -- counts: zero, negative, overflowing, not integers ------------------------------------------------
# Each row: (name, argument, smallest valid value, call with that argument replaced).
# fmt: off
COUNTS = [
    ("ddpm_betas", "n_steps", 1, lambda n: processes.ddpm_betas(n)),
    ("sample", "n", 1, lambda n: _mixture().sample(n)),
    ("two_moons", "n", 1, lambda n: data.two_moons(n)),
    ("checkerboard", "n", 1, lambda n: data.checkerboard(n)),
    ("ring_mixture", "k", 1, lambda k: data.ring_mixture(k=k)),
    ("grid_mixture", "n", 1, lambda n: data.grid_mixture(n=n)),
    ("fit_gaussian_mixture", "k", 1, lambda k: data.fit_gaussian_mixture(_x(10, 2), k)),
    ("digits", "size", 8, lambda n: data.digits(size=n)),
    ("dequantize", "levels", 2, lambda n: data.dequantize(_x(2, 2), n)),
    ("sliced_wasserstein", "n_projections", 1, lambda n: metrics.sliced_wasserstein(_x(5, 2), _x(5, 2), n_projections=n)),
    ("log_likelihood", "n_steps", 1, lambda n: likelihood.log_likelihood(_identity, _x(4, 2), VP, n_steps=n)),
    ("log_likelihood", "n_probes", 1, lambda n: likelihood.log_likelihood(_identity, _x(4, 2), VP, divergence="hutchinson", n_probes=n)),
    ("bits_per_dim", "d", 1, lambda n: likelihood.bits_per_dim(_x(3), n)),
    ("bits_per_dim", "levels", 2, lambda n: likelihood.bits_per_dim(_x(3), 4, levels=n)),
    ("exact_flow_map", "n_steps", 1, lambda n: flowmap.exact_flow_map(_identity, _x(4, 2), 0.8, 0.2, VP, n_steps=n)),
    ("TwoTimeMLP", "depth", 1, lambda n: flowmap.TwoTimeMLP(2, depth=n)),
    ("sample_tilted", "n", 1, lambda n: guidance.sample_tilted(_mixture(), 0, 1.0, n)),
    ("sample_tilted", "max_rounds", 1, lambda n: guidance.sample_tilted(_mixture(), 0, 1.0, 10, max_rounds=n)),
    ("fit", "steps", 0, lambda n: train.fit(_mlp(), _loss, _x(8, 2), n)),
    ("fit", "batch_size", 1, lambda n: train.fit(_mlp(), _loss, _x(8, 2), 1, batch_size=n)),
    ("fit", "checkpoint_every", 1, lambda n: train.fit(_mlp(), _loss, _x(8, 2), 1, checkpoint_every=n)),
    ("MLP", "hidden", 1, lambda n: nets.MLP(2, hidden=n)),
    ("UNet", "base", 1, lambda n: nets.UNet(base=n)),
    ("sinusoidal_embedding", "features", 2, lambda n: nets.sinusoidal_embedding(_x(3), n)),
    ("conjugate_gradient", "n_iter", 1, lambda n: op.conjugate_gradient(lambda v: v, _x(2, 3), n_iter=n)),
    ("norm_sq", "n_iter", 1, lambda n: _blur().norm_sq(n_iter=n)),
    ("dot_test", "batch", 1, lambda n: op.dot_test(_blur(), batch=n)),
    ("gaussian_kernel", "size", 1, lambda n: op.gaussian_kernel(n, 1.0)),
    ("Downsample", "factor", 1, lambda n: op.Downsample((1, 8, 8), n)),
    ("Identity", "shape", 1, lambda n: op.Identity((4, n))),
    ("prior_sample", "shape", 1, lambda n: VP.prior_sample((n, 2))),
    ("box_mask", "top", 0, lambda n: op.box_mask((1, 6, 6), n, 0, 2, 2)),
    ("density_grid", "n", 2, lambda n: plot.density_grid(_gauss(), 0.0, VP, 1.0, n=n)),
    ("image_grid", "rows", 1, lambda n: plot.image_grid(_x(4, 1, 2, 2), n)),
]
# fmt: on


@pytest.mark.parametrize(
    ("call", "argument", "value", "exc"),
    [
        pytest.param(call, argument, value, exc, id=f"{where}-{argument}-{label}")
        for where, argument, low, call in COUNTS
        for label, value, exc in (
            ("below", low - 1, ValueError),
            ("overflow", BIG, ValueError),
            ("float", float(low) + 0.5, TypeError),
            ("bool", True, TypeError),
        )
        if not (label == "bool" and low > 1)  # True >= low is refused as a kind, not a value
    ],
)
def test_a_bad_count_is_refused(call, argument, value, exc):
    pattern = "below 2\\*\\*31" if value == BIG else re.escape(f"= {value!r}")
    _refused(lambda: call(value), exc, argument, pattern)


# -- documented rules, times and numbers --------------------------------------------------------------
# Each row: (name, exception, argument, pattern, call).
# fmt: off
RULES = [
    ("pf_ode_solver-increasing-ts", ValueError, "ts", "ts must decrease strictly", lambda: _gauss().pf_ode_solver()(None, _x(4, 2), torch.tensor([0.1, 0.5]), VP)),
    ("TrajectoryModel-s-after-t", ValueError, "s", r"s must be <= t.* s = 0.6 > t = 0.3", lambda: _trajectory()(_x(4, 2), 0.3, 0.6)),
    ("TrajectoryModel-s-after-t-per-sample", ValueError, "s", r"s = 0.5 > t = 0.2", lambda: _trajectory()(_x(4, 2), torch.tensor([0.9, 0.2, 0.9, 0.9]), 0.5)),
    ("gaussian_w2-negative-eigenvalue", ValueError, "cov1", "cov1 must be positive semi-definite", lambda: metrics.gaussian_w2(torch.zeros(2), _cov_with_eigenvalue(-1e-6), torch.zeros(2), torch.eye(2))),
    ("gaussian_w2-asymmetric", ValueError, "cov2", "cov2 must be symmetric", lambda: metrics.gaussian_w2(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))),
    ("sliced_wasserstein-no-samples", ValueError, "x", r"shape \(0, 2\)", lambda: metrics.sliced_wasserstein(_x(0, 2), _x(0, 2))),
    ("sliced_wasserstein-no-coordinates", ValueError, "x", r"shape \(5, 0\)", lambda: metrics.sliced_wasserstein(_x(5, 0), _x(5, 0))),
    ("mmd-no-samples", ValueError, "x", r"shape \(0, 2\)", lambda: metrics.mmd(_x(0, 2), _x(3, 2))),
    ("prior_sample-negative-shape", ValueError, "shape", r"shape\[0\] = -1", lambda: VP.prior_sample((-1, 2))),
    ("prior_sample-dtype-half", TypeError, "dtype", "torch.float16", lambda: VP.prior_sample((2, 2), dtype=torch.float16)),
    ("prior_sample-dtype-int", TypeError, "dtype", "torch.int64", lambda: VP.prior_sample((2, 2), dtype=torch.long)),
    ("norm_sq-dtype-bfloat16", TypeError, "dtype", "torch.bfloat16", lambda: _blur().norm_sq(dtype=torch.bfloat16)),
    ("MLP-dtype-mismatch", TypeError, "x", "parameters of dtype torch.float32", lambda: _mlp().float()(_x(4, 2), 0.5)),
    ("as_time-like-int", TypeError, "t", "dtype torch.int64", lambda: checks.as_time(0.5, like=_x(2, dtype=torch.long))),
    ("conjugate_gradient-tol", ValueError, "tol", "tol = -1.0", lambda: op.conjugate_gradient(lambda v: v, _x(2, 3), tol=-1.0)),
    ("conjugate_gradient-apply-nan", ValueError, "apply", "must return finite", lambda: op.conjugate_gradient(lambda v: v * NAN, _x(2, 3, fill=1.0))),
    ("denoise-t-outside", ValueError, "t", "t = 1.5", lambda: _mixture().denoise(_x(4, 2), 1.5, VP)),
    ("pf_ode_map-s-nan", ValueError, "s", "s = nan", lambda: _gauss().pf_ode_map(_x(4, 2), NAN, 0.2, VP)),
    ("posterior-sigma_y-nan", ValueError, "sigma_y", "sigma_y = nan", lambda: _gauss().posterior_mean(torch.eye(2), torch.zeros(3, 2), NAN)),
    ("VPCosine-t_end-nan", ValueError, "t_end", "t_end = nan", lambda: processes.VPCosine(t_end=NAN)),
    ("ddpm_betas-beta_start-nan", ValueError, "beta_start", "beta_start = nan", lambda: processes.ddpm_betas(10, beta_start=NAN)),
    ("alphas_cumprod-betas-nan", ValueError, "betas", r"betas\[1\] = nan", lambda: processes.alphas_cumprod(torch.tensor([0.1, NAN]))),
    ("ring_mixture-radius-nan", ValueError, "radius", "radius = nan", lambda: data.ring_mixture(radius=NAN)),
    ("uniform_time-nan", ValueError, "t_min", "t_min = nan", lambda: train.uniform_time(NAN, 1.0)),
    ("drop_labels-p_uncond", ValueError, "p_uncond", "p_uncond = 1.5", lambda: train.drop_labels(torch.zeros(4, dtype=torch.long), 1.5, 3)),
    ("EMA-decay-nan", ValueError, "decay", "decay = nan", lambda: train.EMA(_mlp(), NAN)),
    ("fit-lr-nan", ValueError, "lr", "lr = nan", lambda: train.fit(_mlp(), _loss, _x(8, 2), 1, lr=NAN)),
    ("ctm_sample-gamma-nan", ValueError, "gamma", "gamma = nan", lambda: flowmap.ctm_sample(lambda x, t, s: x, _x(4, 2), _ts(), VP, gamma=NAN)),
    ("cfg_denoiser-w-inf", ValueError, "w", "w = inf", lambda: guidance.cfg_denoiser(_identity, VP, 0, INF)),
    ("motion_kernel-angle-nan", ValueError, "angle", "angle = nan", lambda: op.motion_kernel(5, NAN)),
    ("motion_kernel-angle-inf", ValueError, "angle", "angle = inf", lambda: op.motion_kernel(5, INF)),
    ("Radon-angles-nan", ValueError, "angles", "angles must be", lambda: op.Radon(8, [0.0, NAN])),
    ("random_mask-keep-nan", ValueError, "keep", "keep = nan", lambda: op.random_mask((4, 4), NAN)),
    ("cartesian_mask-acceleration-inf", ValueError, "acceleration", "acceleration = inf", lambda: op.cartesian_mask((8, 8), INF, 0.25)),
    ("measure-sigma_y-inf", ValueError, "sigma_y", "sigma_y = inf", lambda: op.measure(_blur(), _x(1, 1, 4, 4), INF)),
    ("noise_level-tensor", TypeError, "sigma_y", r"shape \(2,\)", lambda: checks.noise_level(torch.ones(2), "sigma_y")),
    ("box_limits-inf", ValueError, "box", "box = inf", lambda: plot.box_limits(INF)),
    ("density_grid-n_y", ValueError, "n_y", "n_y = 1", lambda: plot.density_grid(_gauss(), 0.0, VP, 1.0, n=(2, 1))),
    # degenerate ends of a process: a conversion that divides by alpha_t = 0 or sigma_t = 0
    ("convert-x0-eps-VP-t0", ValueError, "t", r"t = 0 .* sigma_t = 0", lambda: targets.convert(_x(3, 2), "x0", "eps", _x(3, 2), 0.0, VP)),
    ("convert-eps-x0-Linear-t1", ValueError, "t", r"t = 1 .* alpha_t = 0", lambda: targets.convert(_x(3, 2), "eps", "x0", _x(3, 2), 1.0, LIN)),
    ("convert-x0-score-Linear-t0", ValueError, "t", r"t = 0 .* sigma_t = 0", lambda: targets.convert(_x(3, 2), "x0", "score", _x(3, 2), 0.0, LIN)),
    ("convert-score-v-Linear-t1", ValueError, "t", r"t = 1 .* alpha_t = 0", lambda: targets.convert(_x(3, 2), "score", "v", _x(3, 2), 1.0, LIN)),
    ("convert-eps-velocity-VP-t0", ValueError, "t", "infinite", lambda: targets.convert(_x(3, 2), "eps", "velocity", _x(3, 2), 0.0, VP)),
    ("convert-per-sample-t0", ValueError, "t", r"at t = 0 ", lambda: targets.convert(_x(3, 2), "x0", "eps", _x(3, 2), torch.tensor([0.5, 0.0, 0.2]), VP)),
    ("velocity-Linear-t0", ValueError, "t", r"t = 0 .* sigma_t = 0", lambda: _gauss().velocity(_x(3, 2), 0.0, LIN)),
]
# fmt: on


@pytest.mark.parametrize(
    ("exc", "argument", "pattern", "call"), [pytest.param(*row[1:], id=row[0]) for row in RULES]
)
def test_a_documented_rule_is_enforced(exc, argument, pattern, call):
    _refused(call, exc, argument, pattern)


# -- conversions that stay defined at the ends ------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "target", "t", "process"),
    [
        ("eps", "score", 1.0, LIN),  # the score needs eps only: -eps / sigma_1 = -eps
        ("x0", "v", 1.0, LIN),  # v = alpha eps - sigma x0 = -x0 at alpha = 0
        ("eps", "v", 0.0, LIN),  # v = alpha eps at sigma = 0
        ("x0", "velocity", 0.5, VE),
        ("eps", "x0", 0.0, VP),  # alpha_0 = 1: x0 = x
    ],
)
def test_conversions_defined_at_the_ends_still_run(source, target, t, process):
    x, pred = torch.randn(3, 2), torch.randn(3, 2)
    assert bool(torch.isfinite(targets.convert(pred, source, target, x, t, process)).all())


# -- before any work: the user's functions are not called ------------------------------------------
def _counting():
    calls = []

    def denoiser(x, t):
        calls.append(1)
        return x

    return denoiser, calls


@pytest.mark.parametrize(
    "call",
    [
        lambda D: flowmap.exact_flow_map(D, _bad(4, 2), 0.8, 0.2, VP, n_steps=2),
        lambda D: flowmap.exact_flow_map(D, _x(4, 2), 0.8, 0.2, VP, n_steps=0),
        lambda D: likelihood.log_likelihood(D, _bad(4, 2), VP, n_steps=2),
        lambda D: likelihood.log_likelihood(D, _x(4, 2), VP, n_steps=2, n_probes=BIG),
        lambda D: op.conjugate_gradient(lambda v: D(v, 0.0), _bad(2, 3)),
        lambda D: op.conjugate_gradient(lambda v: D(v, 0.0), _x(2, 3), n_iter=0),
        lambda D: flowmap.meanflow_sample(lambda z, t, s: D(z, t), _bad(4, 2), _ts()),
        lambda D: _gauss().pf_ode_solver()(D, _x(4, 2), torch.tensor([0.2, 0.8]), VP),
    ],
    ids=[
        "exact-flow-map-nan",
        "exact-flow-map-steps",
        "log-likelihood-nan",
        "log-likelihood-probes",
        "cg-nan",
        "cg-n-iter",
        "meanflow-nan",
        "pf-ode-solver-grid",
    ],
)
def test_bad_input_is_refused_before_the_model_runs(call):
    denoiser, calls = _counting()
    with pytest.raises((ValueError, TypeError)):
        call(denoiser)
    assert not calls


# -- checkpoints -----------------------------------------------------------------------------------
def _write_good(path):
    train.fit(_mlp(), _loss, torch.zeros(8, 2), 1, batch_size=4, checkpoint=path)


def _random_bytes(path):
    path.write_bytes(bytes(range(256)) * 4)


def _truncated(path):
    _write_good(path)
    path.write_bytes(path.read_bytes()[:200])


def _empty(path):
    path.write_bytes(b"")


def _not_a_dict(path):
    torch.save([1, 2, 3], path)


def _missing_keys(path):
    torch.save({"model": _mlp().state_dict(), "step": 1}, path)


def _other_architecture(path):
    train.fit(
        nets.MLP(2, hidden=16, depth=2, time_embedding=4).double(),
        _loss,
        torch.zeros(8, 2),
        1,
        batch_size=4,
        checkpoint=path,
    )


def _other_decay(path):
    train.fit(_mlp(), _loss, torch.zeros(8, 2), 1, batch_size=4, checkpoint=path, ema_decay=0.5)


def _directory(path):
    path.mkdir()


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (_random_bytes, "cannot be read"),
        (_truncated, "cannot be read"),
        (_empty, "cannot be read"),
        (_not_a_dict, "not the dict"),
        (_missing_keys, "lacks the keys"),
        (_other_architecture, "does not fit this model"),
        (_other_decay, "decay 0.5"),
        (_directory, "is a directory"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_a_bad_checkpoint_names_the_file_and_leaves_the_model_alone(tmp_path, write, reason):
    path = tmp_path / "run.pt"
    write(path)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    with pytest.raises(ValueError) as info:
        train.fit(
            model, _loss, torch.zeros(8, 2), 3, batch_size=4, checkpoint=path, generator=generator
        )
    message = str(info.value)
    assert str(path) in message and "checkpoint" in message and reason in message, message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model untouched
    assert torch.equal(generator.get_state(), state)  # and the caller's generator


def test_the_ema_refuses_a_state_of_another_model():
    ema = train.EMA(_mlp(), 0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    other = train.EMA(nets.MLP(3, hidden=8, depth=1, time_embedding=4).double(), 0.9)
    with pytest.raises(ValueError, match="does not fit this EMA's model"):
        ema.load_state_dict(other.state_dict())
    assert all(torch.equal(before[k], ema.shadow[k]) for k in before)


# -- the shared validators themselves ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda: checks.count(0, "n"), ValueError, "n must be an integer >= 1, got n = 0"),
        (lambda: checks.count(2.0, "n"), TypeError, "n must be an integer >= 1, got n = 2.0"),
        (lambda: checks.count(True, "n"), TypeError, "got n = True"),
        (lambda: checks.count(BIG, "n"), ValueError, "n must be an integer below 2**31"),
        (lambda: checks.count(-1, "k", low=0), ValueError, "k must be an integer >= 0, got k = -1"),
        (lambda: checks.real("a", "w"), TypeError, "w must be a real number, got w = 'a'"),
        (lambda: checks.real(NAN, "w"), ValueError, "w must be finite, got w = nan"),
        (lambda: checks.between(1.5, "p", 0, 1), ValueError, "p must lie in [0, 1], got p = 1.5"),
        (lambda: checks.between(0, "p", 0, 1, open_low=True), ValueError, "p must lie in (0, 1]"),
        (
            lambda: checks.one_of("x", "kind", ("a", "b")),
            ValueError,
            "kind must be one of ('a', 'b'), got kind = 'x'",
        ),
        (
            lambda: checks.noise_level(-0.1),
            ValueError,
            "sigma_y must be a finite number >= 0, got sigma_y = -0.1",
        ),
        (lambda: checks.sizes((2, 0)), ValueError, "shape[1] must be an integer >= 1"),
        (lambda: checks.sizes("ab"), TypeError, "shape must be a tuple of integers"),
        (
            lambda: checks.float_dtype(torch.int32),
            TypeError,
            "dtype must be torch.float32 or torch.float64",
        ),
        (
            lambda: checks.floating([1.0], "x"),
            TypeError,
            "x must be a torch.Tensor, got x of type list",
        ),
        (
            lambda: checks.finite(torch.tensor([1.0, INF, NAN]), "x"),
            ValueError,
            "1 NaN and 1 infinite entries of 3 in x (the first: x[1] = inf)",
        ),
        (
            lambda: checks.returned(None, torch.zeros(2, 3), "model"),
            TypeError,
            "model must return a tensor of shape (2, 3), got NoneType",
        ),
        (
            lambda: checks.returned_shape(torch.zeros(3), (2,), "prior"),
            ValueError,
            "prior must return a tensor of shape (2,), got shape (3,)",
        ),
        (lambda: checks.time_grid([0.2, 0.5]), ValueError, "ts must decrease strictly"),
        (lambda: checks.time_grid(torch.tensor([1.0, NAN])), ValueError, "ts must lie in [0, 1]"),
    ],
)
def test_the_shared_validators(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), str(info.value)


def test_deferred_checks_raise_the_first_failure_in_call_order():
    check = checks.Deferred()
    check.finite(torch.ones(3), "a")
    with pytest.raises(ValueError, match="b must be finite"):
        check.finite(torch.tensor([1.0, NAN]), "b")  # on the CPU a check runs at once
    check = checks.Deferred()
    t = check.time(torch.tensor([0.2, 0.4]), like=torch.zeros(2))
    check.done()
    assert t.dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got t = \[1.5\]"):
        checks.Deferred().time(torch.tensor([0.2, 1.5]))


def test_the_deferred_path_raises_at_done_in_call_order():
    """What an accelerator does (here forced on the CPU): nothing raises before ``done``, which
    raises the first failure in the order of the calls, and valid input passes."""
    check = checks.Deferred(defer_cpu=True)
    x = check.finite(torch.tensor([1.0, 2.0]), "x")
    t = check.time(0.5, like=x)
    check.done()
    assert t.dtype == x.dtype and float(t) == 0.5
    check = checks.Deferred(defer_cpu=True)
    check.finite(torch.tensor([1.0, 2.0]), "a")
    check.time(torch.tensor([0.2, 1.5]), name="s")  # deferred: no error yet
    check.finite(torch.tensor([INF]), "b")
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\], got s = \[1.5\]"):
        check.done()
    check = checks.Deferred(defer_cpu=True)
    check.require(torch.tensor([True, False]), lambda: ValueError("the second"))
    with pytest.raises(ValueError, match="the second"):
        check.done()
    with pytest.raises(TypeError, match="x must be a float32 or float64 tensor"):
        checks.Deferred(defer_cpu=True).finite(
            torch.ones(2, dtype=torch.long), "x"
        )  # kinds: at once


@pytest.mark.parametrize(
    ("dtype", "round_off", "wrong"), [(torch.float64, -1e-12, -1e-6), (torch.float32, -1e-5, -1e-2)]
)
def test_w2_takes_round_off_below_zero_and_refuses_more(dtype, round_off, wrong):
    """sqrt(eps) of the dtype separates round-off (clamped to 0) from a wrong covariance."""
    zero, eye = torch.zeros(2, dtype=dtype), torch.eye(2, dtype=dtype)
    near = torch.diag(torch.tensor([1.0, round_off], dtype=dtype))
    w2 = metrics.gaussian_w2(zero, near, zero, torch.diag(torch.tensor([1.0, 0.0], dtype=dtype)))
    assert float(w2) < 1e-2
    with pytest.raises(ValueError, match="cov2 must be positive semi-definite"):
        metrics.gaussian_w2(zero, eye, zero, torch.diag(torch.tensor([1.0, wrong], dtype=dtype)))


def test_valid_counts_and_shapes_pass_through():
    import numpy as np

    assert checks.count(np.int64(3), "n") == 3 and isinstance(checks.count(np.int64(3), "n"), int)
    assert checks.sizes(4) == (4,) and checks.sizes(torch.Size([2, 3])) == (2, 3)
    assert checks.noise_level(torch.tensor(0.5)) == 0.5
    assert checks.between(1, "p", 0, 1) == 1.0
