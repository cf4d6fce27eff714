r"""What the chapters share: seeded draws, errors against an exact answer, sweeps over the
number of model calls (NFE), and explorers drawn by sliders.

A chapter shows an idea and the diffcore call that does the work; the few lines that every
chapter would otherwise write again (a seeded generator, a sliced :math:`W_2` with fixed
projections, the steps that fit a budget of model calls, a network moved to its device)
live here, once, with tests.

>>> g = lab.seeded(3)                                      # a fresh generator for one draw
>>> lab.sliced_w2(samples, exact, seed=6)                  # the same projections at every call
>>> lab.steps_for_nfe("heun", 10)                          # 5 steps of 2 model calls
>>> outs = lab.nfe_sweep("dpmpp_2m", D, x, [5, 10, 20], vp)  # {nfe: sample}
>>> display(lab.explorer(draw, t=widgets.FloatSlider(0.3, min=0, max=1)))  # draw(ax, t=...)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffcore import metrics, plot, samplers, targets
from diffcore.analytic import Gaussian, GaussianMixture
from diffcore.checks import count, one_of, positive, require
from diffcore.processes import Process

__all__ = [
    "seeded",
    "rms",
    "relative_error",
    "sliced_w2",
    "sw_floor",
    "noisy_samples",
    "exact_model",
    "moment_matched",
    "rotated_covariance",
    "OnDevice",
    "on_device",
    "steps_for_nfe",
    "nfe_sweep",
    "nfe_to_reach",
    "exact_w2",
    "Grade",
    "grade",
    "Scores",
    "scores",
    "panels",
    "explorer",
]


def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _samples(x, name: str) -> Tensor:
    """``x`` checked to be a ``(n, d)`` tensor of samples, ``n >= 1``."""
    _tensor(x, name)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a (n, d) tensor of samples, got shape {tuple(x.shape)}")
    return x


# -- seeds ----------------------------------------------------------------------------------------
def seeded(seed: int, device="cpu") -> torch.Generator:
    """A fresh generator on ``device``, seeded with ``seed``.

    One generator per random draw that a figure or a check depends on: each draw is then
    reproducible on its own, whatever ran before it.  ``seed`` is an integer in
    ``[0, 2**31)``.
    """
    seed = count(seed, "seed", low=0)
    return torch.Generator(device=device).manual_seed(seed)


# -- errors and distances -------------------------------------------------------------------------
def rms(a: Tensor, b: Tensor | None = None, *, per: str = "sample") -> float:
    r"""The root mean square of ``a - b`` (of ``a`` when ``b`` is None), as a float.

    ``per="sample"``: the root mean square *distance*, :math:`\sqrt{\frac1n\sum_i \lVert a_i -
    b_i\rVert^2}`, each sample flattened (for 2-D points, the typical distance between
    matched points).  ``per="entry"``: the root mean square over all entries,
    :math:`\sqrt{\frac1N\sum (a - b)^2}` (for images, the error per pixel).  Shapes: ``a``
    and ``b`` ``(n, ...)``, the same; ``per="sample"`` needs at least 2 dimensions.
    """
    _tensor(a, "a")
    one_of(per, "per", ("sample", "entry"))
    if b is not None:
        _tensor(b, "b")
        if a.shape != b.shape:
            raise ValueError(
                f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
    if a.numel() == 0:
        raise ValueError(f"a must not be empty, got shape {tuple(a.shape)}")
    d = a if b is None else a - b
    if per == "entry":
        return float(d.pow(2).mean().sqrt())
    if d.ndim < 2:
        raise ValueError(
            f'per="sample" needs a (n, ...) batch of samples, got a of shape {tuple(a.shape)}'
        )
    return float(d.flatten(1).pow(2).sum(1).mean().sqrt())


def relative_error(pred: Tensor, exact: Tensor) -> float:
    r"""The relative squared error :math:`\frac{\sum_i \lVert p_i - e_i\rVert^2}{\sum_i
    \lVert e_i\rVert^2}` of a prediction against the exact value, as a float.

    0 for an exact prediction, 1 for a prediction of zero.  Shapes: ``pred`` and ``exact``
    ``(n, ...)``, the same, each sample flattened.
    """
    _tensor(pred, "pred")
    _tensor(exact, "exact")
    if pred.shape != exact.shape or pred.ndim < 2:
        raise ValueError(
            f"pred and exact must be (n, ...) tensors of the same shape, got "
            f"{tuple(pred.shape)} and {tuple(exact.shape)}"
        )
    scale = exact.flatten(1).pow(2).sum(1).mean()
    if not float(scale) > 0:
        raise ValueError("exact is zero: a relative error needs a non-zero exact value")
    return float((pred - exact).flatten(1).pow(2).sum(1).mean() / scale)


def sliced_w2(x: Tensor, y: Tensor, *, seed: int = 0, n_projections: int = 256) -> float:
    """:func:`diffcore.metrics.sliced_wasserstein` between two equal-size sample sets, with
    projections drawn from a fresh generator seeded with ``seed`` (on ``x``'s device).

    The same ``seed`` gives the same directions at every call, so that distances of several
    sets to one reference compare.  Shapes: ``x``, ``y`` ``(n, d)``; returns a float.
    """
    _samples(x, "x")
    _samples(y, "y")
    n_projections = count(n_projections, "n_projections")
    generator = seeded(seed, x.device)
    return float(metrics.sliced_wasserstein(x, y, n_projections, generator=generator))


def sw_floor(
    draw: Callable,
    n: int,
    *,
    reference: Tensor | None = None,
    repeats: int = 8,
    seed: int = 0,
    projection_seed: int = 0,
    n_projections: int = 256,
) -> Tensor:
    """The Monte-Carlo floor of :func:`sliced_w2`: its values between sets that are *exact*.

    ``draw(n, generator)`` returns ``n`` exact samples.  Without ``reference``, repeat ``r``
    is the distance between two independent sets, drawn with the seeds ``seed + 2 r`` and
    ``seed + 2 r + 1``; with ``reference`` (an exact set of ``n``), the distance of the set
    drawn with ``seed + r`` to it.  A sampler whose distance to exact samples lies within
    this spread cannot be told from exact by ``n`` points.  The projections are those of
    ``sliced_w2(..., seed=projection_seed)``.  Shapes: ``draw`` returns ``(n, d)``, like
    ``reference``; returns the values, ``(repeats,)`` in float64.
    """
    if not callable(draw):
        raise TypeError(f"draw must be a function (n, generator) -> samples, got {draw!r}")
    n = count(n, "n")
    repeats = count(repeats, "repeats")
    seed = count(seed, "seed", low=0)
    if reference is not None:
        _samples(reference, "reference")
        require(reference.shape[0] == n, "reference", tuple(reference.shape), f"{n} samples")
    values = []
    for r in range(repeats):
        if reference is None:
            a, b = draw(n, seeded(seed + 2 * r)), draw(n, seeded(seed + 2 * r + 1))
        else:
            a, b = draw(n, seeded(seed + r)), reference
        values.append(sliced_w2(a, b, seed=projection_seed, n_projections=n_projections))
    return torch.tensor(values, dtype=torch.float64)


# -- exact laws -----------------------------------------------------------------------------------
def noisy_samples(
    law, n: int, t, process: Process, generator: torch.Generator | None = None
) -> Tensor:
    r"""Exact samples of the noisy marginal :math:`p_t`: :math:`x_t = \alpha_t x_0 + \sigma_t
    \epsilon` with :math:`x_0` drawn from ``law`` (anything with ``sample(n, generator=)``),
    then :math:`\epsilon` drawn from the same ``generator``.

    Shapes: returns ``(n, d)``, in the law's dtype.
    """
    n = count(n, "n")
    if not callable(getattr(law, "sample", None)):
        raise TypeError(f"law must have a sample(n, generator=) method, got {law!r}")
    x0 = law.sample(n, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return process.marginal(x0, t, noise)


def exact_model(law: GaussianMixture, process: Process, target: str = "x0") -> Callable:
    """The exact model of ``law`` that predicts ``target``: a function ``model(x, t)``.

    ``target`` is one of ``diffcore.targets.TARGETS``: ``"x0"`` (the denoiser),
    ``"score"`` and ``"velocity"`` come from the law's own closed forms, ``"eps"`` and
    ``"v"`` from its denoiser through :func:`diffcore.targets.convert`.  The exact
    counterpart of a network trained for ``target``, to compare with it or to measure a
    loss floor.  Single-precision input is computed in double precision and returned in
    single.  Shapes: ``x`` ``(batch, d)``; returns ``(batch, d)``.
    """
    if not isinstance(law, GaussianMixture):
        raise TypeError(f"law must be an analytic.GaussianMixture, got {type(law).__name__}")
    if not isinstance(process, Process):
        raise TypeError(f"process must be a processes.Process, got {type(process).__name__}")
    one_of(target, "target", targets.TARGETS)

    def model(x: Tensor, t) -> Tensor:
        z = x.double() if x.dtype == torch.float32 else x
        if target == "x0":
            out = law.denoise(z, t, process)
        elif target == "score":
            out = law.score(z, t, process)
        elif target == "velocity":
            out = law.velocity(z, t, process)
        else:
            out = targets.convert(law.denoise(z, t, process), "x0", target, z, t, process)
        return out.to(x.dtype)

    model.__doc__ = f"The exact {target!r} of {law!r} under {process!r}."
    return model


def moment_matched(mixture: GaussianMixture) -> Gaussian:
    r"""The Gaussian with the mean and covariance of ``mixture``.

    :math:`m = \sum_k w_k\mu_k` and :math:`C = \sum_k w_k(\Sigma_k + \mu_k\mu_k^\top) -
    m m^\top`, symmetrised against round-off: the best affine model of the data, whose
    denoiser and score are the baselines a learned model must beat.  Shapes: a mixture in
    ``d`` dimensions gives a :class:`~diffcore.analytic.Gaussian` with mean ``(d,)`` and
    covariance ``(d, d)``.
    """
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(
            f"mixture must be an analytic.GaussianMixture, got {type(mixture).__name__}"
        )
    w, means, covs = mixture.weights, mixture.means, mixture.covs
    mean = w @ means
    second = torch.einsum("k,kij->ij", w, covs + means[:, :, None] * means[:, None, :])
    cov = second - torch.outer(mean, mean)
    return Gaussian(mean, 0.5 * (cov + cov.T))


def rotated_covariance(angle: float, variances, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The 2-D covariance :math:`R\,\mathrm{diag}(v_1, v_2)\,R^\top`, :math:`R` the rotation
    by ``angle`` (radians): an ellipse with variance :math:`v_1` along the direction
    :math:`(\cos\theta, \sin\theta)` and :math:`v_2` across it.

    Shapes: ``variances`` two non-negative numbers; returns ``(2, 2)`` in ``dtype``.
    """
    require(
        isinstance(angle, (int, float)) and math.isfinite(angle), "angle", angle, "a real number"
    )
    values = torch.as_tensor(variances, dtype=dtype)
    require(
        values.shape == (2,) and bool((values >= 0).all()) and bool(values.isfinite().all()),
        "variances",
        variances,
        "two non-negative numbers",
    )
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=dtype)
    return rotation @ torch.diag(values) @ rotation.T


# -- networks and model calls ---------------------------------------------------------------------
class OnDevice:
    """``model`` run on ``device`` in ``dtype``, called with tensors of any device and dtype.

    ``OnDevice(net, "cuda")(x, t, *args)`` moves ``x`` (and ``t`` when it is a tensor) to the
    network's device and dtype, calls ``net(x, t, *args, **kwargs)`` and returns the result
    on ``x``'s device and in its dtype: a single-precision network called by double-precision
    samplers and checks on the CPU.  ``n_classes`` is the model's own (None if it has none),
    so that :func:`diffcore.guidance.cfg_denoiser` can check labels against it.  Shapes:
    those of ``model``.
    """

    def __init__(self, model: Callable, device="cpu", dtype: torch.dtype = torch.float32):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got dtype = {dtype!r}")
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    @property
    def n_classes(self) -> int | None:
        """The wrapped model's number of classes, or None."""
        return getattr(self.model, "n_classes", None)

    def __call__(self, x: Tensor, t, *args, **kwargs) -> Tensor:
        _tensor(x, "x")
        if isinstance(t, Tensor):
            t = t.to(self.device, self.dtype)
        return self.model(x.to(self.device, self.dtype), t, *args, **kwargs).to(x)

    def __repr__(self) -> str:
        return f"OnDevice({self.model!r}, device={str(self.device)!r}, dtype={self.dtype})"


def on_device(model: Callable, device="cpu", dtype: torch.dtype = torch.float32) -> OnDevice:
    """``model`` as an :class:`OnDevice`: run on ``device`` in ``dtype``, called like ``x``."""
    return OnDevice(model, device, dtype)


# -- sweeps over the number of model calls --------------------------------------------------------
def steps_for_nfe(name: str, nfe: int, **options) -> int:
    """The most steps of ``samplers.SAMPLERS[name]`` whose model calls fit in ``nfe``.

    Counted by :func:`diffcore.samplers.model_calls` with the sampler's ``options`` (a
    corrector's calls, ``denoise_last``): ``heun`` takes 5 steps for 10 calls,
    ``dpm_solver_3`` 3 and ``plms`` 9 (its first step calls twice).  Raises ``ValueError``
    when not even one step fits.
    """
    nfe = count(nfe, "nfe")
    if samplers.model_calls(name, 1, **options) > nfe:
        raise ValueError(
            f"nfe = {nfe} model calls do not fit one step of {name!r}, which needs "
            f"{samplers.model_calls(name, 1, **options)}"
        )
    steps = 1
    while steps < nfe and samplers.model_calls(name, steps + 1, **options) <= nfe:
        steps += 1
    return steps


def nfe_sweep(
    name: str,
    model: Callable,
    x: Tensor,
    nfes,
    process: Process,
    *,
    kind: str = "logsnr",
    t_min: float = 1e-3,
    t_max: float = 1.0,
    seed: int | None = None,
    **options,
) -> dict[int, Tensor]:
    """Run ``samplers.SAMPLERS[name]`` from ``x`` once per budget of model calls in ``nfes``.

    For each budget the grid is ``samplers.time_grid(process, steps, kind, t_min, t_max)``
    with the :func:`steps_for_nfe` that fit it, and the sampler gets ``options``; with a
    ``seed``, also ``generator=seeded(seed)`` on ``x``'s device, fresh for each budget (for
    the stochastic samplers: the same noise stream at every budget).  Returns
    ``{nfe: output}``.  Shapes: ``x`` ``(batch, ...)``; each output the same.
    """
    one_of(name, "name", samplers.SAMPLERS)
    _tensor(x, "x")
    nfes = list(nfes)
    require(len(nfes) > 0, "nfes", nfes, "a non-empty list of budgets")
    out = {}
    for nfe in nfes:
        steps = steps_for_nfe(name, nfe, **options)
        ts = samplers.time_grid(process, steps, kind=kind, t_min=t_min, t_max=t_max)
        noise = {} if seed is None else {"generator": seeded(seed, x.device)}
        out[nfe] = samplers.SAMPLERS[name](model, x, ts, process, **options, **noise)
    return out


def nfe_to_reach(nfes, errors, level: float) -> float:
    """The number of model calls at which an error curve first falls to ``level``.

    Between the last budget above ``level`` and the first at or below it, the curve is
    interpolated linearly in log-log (exact for a power law :math:`e = C n^{-p}`); the first
    budget itself if it is already below, ``inf`` if none reaches ``level``.  Shapes:
    ``nfes`` increasing positive numbers and ``errors`` positive numbers, as many; returns a
    float.
    """
    level = positive(level, "level")
    nfes, errors = [float(n) for n in nfes], [float(e) for e in errors]
    require(
        len(nfes) == len(errors) > 0,
        "errors",
        errors,
        f"as many values as nfes ({len(nfes)}), at least one",
    )
    require(
        all(n > 0 for n in nfes) and all(a < b for a, b in zip(nfes, nfes[1:], strict=False)),
        "nfes",
        nfes,
        "increasing positive numbers",
    )
    require(all(e > 0 for e in errors), "errors", errors, "positive numbers")
    for k, e in enumerate(errors):
        if e <= level:
            if k == 0:
                return nfes[0]
            u = math.log(errors[k - 1] / level) / math.log(errors[k - 1] / e)
            return math.exp(math.log(nfes[k - 1]) + u * math.log(nfes[k] / nfes[k - 1]))
    return math.inf


# -- grading against the exact answer -------------------------------------------------------------
def exact_w2(sampler, gaussian: Gaussian, ts: Tensor, process: Process, **options) -> float:
    """The exact Wasserstein-2 distance between a sampler's output law on Gaussian data and
    the exact marginal :math:`p_{t_{\\min}}`, ``t_min = ts[-1]``: no Monte Carlo.

    The output law is :func:`diffcore.metrics.sampler_output_law` (from the exact marginal at
    ``ts[0]``, with ``options``), the distance :func:`diffcore.metrics.gaussian_w2`.
    ``sampler`` is a sampler or its name.  Shapes: ``ts`` a decreasing 1-D grid of times
    (:func:`diffcore.samplers.time_grid`); returns a float.
    """
    if not isinstance(gaussian, Gaussian):
        raise TypeError(f"gaussian must be an analytic.Gaussian, got {type(gaussian).__name__}")
    _tensor(ts, "ts")
    mean, cov = metrics.sampler_output_law(sampler, gaussian, ts, process, **options)
    target = gaussian.marginal(float(ts[-1]), process)
    return float(metrics.gaussian_w2(mean, cov, target.mean, target.cov))


class Grade(NamedTuple):
    """How far a sample set is from an exact law: the distance between their means and the
    sliced :math:`W_2` between the samples and as many exact ones."""

    mean_error: float
    sliced_w2: float


def grade(samples: Tensor, law: GaussianMixture, *, seed: int = 0, n_projections=256) -> Grade:
    """Grade ``samples`` (of a sampler or a solver) against the exact ``law`` they should follow.

    ``mean_error`` is :math:`\\lVert \\bar x - \\mathbb E_{law}[x]\\rVert`; ``sliced_w2`` the
    :func:`sliced_w2` to ``n`` exact samples of ``law`` drawn with ``seeded(seed)``, with the
    projections of ``seed + 1``.  Exact samples score near the Monte-Carlo floor
    (:func:`sw_floor`), not zero.  Shapes: ``samples`` ``(n, d)``; returns a :class:`Grade`.
    """
    _samples(samples, "samples")
    if not isinstance(law, GaussianMixture):
        raise TypeError(f"law must be an analytic.GaussianMixture, got {type(law).__name__}")
    require(samples.shape[1] == law.dim, "samples", tuple(samples.shape), f"(n, {law.dim})")
    exact = law.sample(samples.shape[0], generator=seeded(seed))
    mean_error = float((samples.mean(0) - law.weights @ law.means).norm())
    distance = sliced_w2(samples, exact, seed=seed + 1, n_projections=n_projections)
    return Grade(mean_error, distance)


class Scores(NamedTuple):
    """Image quality over a batch: the mean PSNR (dB) and the mean SSIM."""

    psnr: float
    ssim: float


def scores(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Scores:
    """The mean :func:`~diffcore.metrics.psnr` and :func:`~diffcore.metrics.ssim` of the
    images ``x`` against ``ref``, with pixels spanning ``data_range`` (2 for ``[-1, 1]``).

    Shapes: ``x``, ``ref`` ``(batch, channels, height, width)``; returns :class:`Scores` of
    floats.
    """
    _tensor(x, "x")
    _tensor(ref, "ref")
    x, ref = x.detach().cpu(), ref.detach().cpu()
    psnr = float(metrics.psnr(x, ref, data_range).mean())
    return Scores(psnr, float(metrics.ssim(x, ref, data_range).mean()))


# -- explorers ------------------------------------------------------------------------------------
def panels(
    draw: Callable,
    *,
    grid: tuple[int, int] = (1, 1),
    figsize: tuple[float, float] = (5.0, 5.0),
    dpi: float | None = None,
    width_ratios=None,
) -> Callable:
    """``draw(axes, **values)`` as a function of the values alone that returns its ``Figure``.

    The figure has ``grid = (rows, columns)`` panels (``figsize``, ``dpi``, ``width_ratios``
    of the columns, constrained layout); ``draw`` receives them as one ``Axes`` for
    ``grid=(1, 1)``, else as the array that ``plt.subplots`` returns.  So one drawing
    function fills the panels of a static figure, an :func:`explorer` and any builder that
    wants ``figure(**values) -> Figure`` (:func:`diffcore.plot.explorer`).
    """
    import matplotlib.pyplot as plt

    if not callable(draw):
        raise TypeError(f"draw must be a function draw(axes, **values), got {draw!r}")
    if not (
        isinstance(grid, tuple)
        and len(grid) == 2
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in grid)
    ):
        raise ValueError(f"grid must be (rows, columns) of positive integers, got grid = {grid!r}")
    gridspec = None if width_ratios is None else {"width_ratios": width_ratios}

    def figure(**values):
        fig, axes = plt.subplots(
            *grid, figsize=figsize, dpi=dpi, layout="constrained", gridspec_kw=gridspec
        )
        draw(axes, **values)
        return fig

    return figure


def explorer(
    draw: Callable,
    *,
    grid: tuple[int, int] = (1, 1),
    figsize: tuple[float, float] = (5.0, 5.0),
    dpi: float | None = None,
    width_ratios=None,
    **controls,
):
    """A figure of ``grid = (rows, columns)`` panels, redrawn whenever a control changes.

    ``draw(axes, **values)`` draws into the panels (see :func:`panels`, which makes the
    figure), with the value of each ipywidgets control in ``controls`` under its name.  Built
    on :func:`diffcore.plot.explorer`, which shows the figure as a PNG in an ``Image``
    widget; returns its ``VBox``, for ``display``.
    """
    figure = panels(draw, grid=grid, figsize=figsize, dpi=dpi, width_ratios=width_ratios)
    return plot.explorer(figure, **controls)
