r"""The stepping engine: one loop for every sampler and inverse solver, and one way to watch it.

A sampler or solver of diffcore is its *update*, a few lines of the monograph's formulas, handed
to :func:`integrate`, which owns everything the methods share:

- the time grid: checked (:func:`check_time_grid`) and read once into :class:`Point`\ s, one per
  time, holding :math:`t`, :math:`\alpha_t`, :math:`\sigma_t`, their derivatives and the
  log-SNR :math:`\lambda_t = \log(\alpha_t/\sigma_t)` as Python floats (for the diagonal processes of
  :mod:`diffcore.spectral`, tensors with one entry per coefficient);
- the model call, :meth:`Interval.D`, which counts calls (the NFE) and checks the shape of what
  the model returns;
- the noise, :meth:`Interval.noise`: ``noise_sampler(i, shape)`` when given, else a standard
  normal draw from ``generator``; one hook for all;
- the history of earlier steps that multistep methods read, ``Interval.history``;
- the observer, ``callback(step)`` with a :class:`Step` after every step, and :class:`Trace`,
  the callback that records a run and counts its model calls;
- the final denoise (``denoise_last``), a progress bar for long runs (``progress``), and a check
  that the result is finite.

Step ``i`` goes from :math:`t = t_i` to :math:`s = t_{i+1} < t` (the monograph's :math:`s < t`
for a step towards data); the update reads the two ends as ``k.t`` and ``k.s`` and their
log-SNR gap as ``k.h`` :math:`= \lambda_s - \lambda_t`.  The transitions that many methods share
are written once here: the DDIM transition (:func:`ddim_step`; ``eta = 1`` is DDPM's ancestral
step) and the forward noising from a time up to a noisier one (:func:`noising_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffcore.checks import finite, returned, time_grid

__all__ = [
    "Point",
    "Step",
    "Trace",
    "Interval",
    "integrate",
    "check_time_grid",
    "grid_points",
    "eps_hat",
    "ddim_step",
    "ddim_weights",
    "noising_step",
    "noising_weights",
    "emit",
    "noise_source",
    "LONG_RUN",
]

#: Runs of at least this many steps show a progress bar when ``progress=None``.
LONG_RUN = 500


def check_time_grid(ts) -> Tensor:
    """The check every run makes of its grid: a strictly decreasing 1-D tensor of at least two
    times in [0, 1] (a list becomes a float64 tensor).  Shapes: ``ts`` ``(n + 1,)``; returns
    it."""
    return time_grid(ts)


@dataclass(frozen=True, slots=True)
class Point:
    r"""One time of a grid, read from the process once: floats, and the time as a tensor.

    ``time`` is the 0-d tensor (in the state's dtype and device) that the model receives;
    ``lam`` is :math:`+\infty` where :math:`\sigma_t = 0` and :math:`-\infty` where
    :math:`\alpha_t = 0`.
    """

    t: float
    time: Tensor
    alpha: float
    sigma: float
    lam: float
    d_alpha: float
    d_sigma: float


def grid_points(process, ts: Tensor, like: Tensor) -> list[Point]:
    """The :class:`Point` of every time of ``ts`` (not checked: see :func:`check_time_grid`).

    Shapes: ``ts`` ``(n,)``; ``like`` any tensor whose dtype and device the times take.  A
    process with one schedule per coefficient (:class:`diffcore.spectral.Diagonal`) gives
    ``(d,)`` tensors in place of the floats.
    """
    ts64 = ts.to(torch.float64)

    def column(values: Tensor) -> list:  # (n,): floats; (n, d), one per coefficient: tensors
        if values.ndim == 1:
            return values.tolist()
        return list(values.to(device=like.device, dtype=like.dtype).unbind())

    columns = (
        ts64.tolist(),
        ts.to(device=like.device, dtype=like.dtype).unbind(),
        *(column(f(ts64)) for f in (process.alpha, process.sigma, process.lam)),
        *(column(f(ts64)) for f in (process.d_alpha, process.d_sigma)),
    )
    return [Point(*values) for values in zip(*columns, strict=True)]


@dataclass(frozen=True, slots=True)
class Step:
    """What ``callback(step)`` receives after each step of any iteration in diffcore.

    ``i`` the step (0-based); ``t`` the time reached, ``ts[i + 1]`` (0-d tensor; for a PnP or
    Gibbs loop the iteration's noise level or coupling, or None); ``x`` the state there;
    ``denoised`` the step's estimate of :math:`x_0` (the first model output of the step, or
    the method's own estimate; None if it made none); ``nfe`` the model calls so far.  With
    ``denoise_last`` (or a solver's final estimate) one more step follows the last, with
    ``i = n``, ``x`` the returned value and ``denoised`` the same.  ``state``: other parts of
    the state, by name (Blind-PnPDM's ``"kernel"``).  Shapes: ``x`` and ``denoised``
    ``(batch, ...)``.
    """

    i: int
    t: Tensor | float | None
    x: Tensor
    denoised: Tensor | None
    nfe: int
    state: dict | None = None


class Trace:
    """A callback that records every :class:`Step` of a run and counts its model calls.

    >>> trace = Trace()
    >>> x = samplers.SAMPLERS["heun"](D, x, ts, process, callback=trace)  # doctest: +SKIP
    >>> trace.xs.shape, trace.nfe                                           # doctest: +SKIP

    ``xs`` stacks the states after each step, ``(n_steps, batch, ...)``; ``ts`` the times
    reached, ``(n_steps,)``; ``denoised`` the steps' estimates of :math:`x_0`; ``nfe`` the
    model calls of the run; ``steps`` the raw :class:`Step` records.  Tensors are kept as
    given (the engine never changes a state in place once a step has returned it).
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def __call__(self, step: Step) -> None:
        self.steps.append(step)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        """The model calls of the run so far (0 before the first step)."""
        return self.steps[-1].nfe if self.steps else 0

    @property
    def xs(self) -> Tensor:
        """The states after each step, ``(n_steps, batch, ...)``."""
        return torch.stack([step.x for step in self._nonempty()])

    @property
    def denoised(self) -> Tensor:
        """The estimates of :math:`x_0` of each step, ``(n_steps, batch, ...)``."""
        found = [step.denoised for step in self._nonempty()]
        if any(d is None for d in found):
            raise ValueError("some steps made no estimate of x0 (step.denoised is None)")
        return torch.stack(found)

    def stack(self, name: str) -> Tensor:
        """The part ``name`` of the state at each step (``step.state[name]``), stacked."""
        found = [(step.state or {}).get(name) for step in self._nonempty()]
        if any(v is None for v in found):
            raise ValueError(f"some steps have no state {name!r}")
        return torch.stack(found)

    @property
    def ts(self) -> Tensor:
        """The times reached, ``(n_steps,)`` (float64)."""
        return torch.tensor([float(step.t) for step in self._nonempty()], dtype=torch.float64)

    def _nonempty(self) -> list[Step]:
        if not self.steps:
            raise ValueError("the trace is empty: pass it as callback= to a run first")
        return self.steps


def emit(callback: Callable | None, step: Step) -> None:
    """Hand ``step`` to ``callback`` if there is one (the loops of diffcore all report so)."""
    if callback is not None:
        callback(step)


# -- the shared transitions --------------------------------------------------------------------
def eps_hat(x: Tensor, x0: Tensor, t: Point) -> Tensor:
    r"""The noise that the estimate ``x0`` implies at ``t``: :math:`\hat\varepsilon = (x_t -
    \alpha_t\hat x_0)/\sigma_t`.  Shapes: ``x``, ``x0`` ``(batch, ...)``; returns the same."""
    return torch.sub(x, x0, alpha=t.alpha) / t.sigma


def ddim_weights(t: Point, s: Point, eta: float = 0.0) -> tuple[float, float, float]:
    r"""The weights of :math:`\hat x_0`, :math:`\hat\varepsilon` and fresh noise in the DDIM
    transition from ``t`` to ``s``: :math:`(\alpha_s, \sqrt{\sigma_s^2 - c^2}, c)` with
    :math:`c = \eta\,\sigma_s\sqrt{1 - e^{-2h}}`, :math:`h = \lambda_s - \lambda_t`."""
    spread = -math.expm1(-2 * (s.lam - t.lam))  # 1 - e^{-2h}: the DDPM posterior's share
    c = eta * s.sigma * math.sqrt(spread)
    return s.alpha, s.sigma * math.sqrt(1 - eta**2 * spread), c


def ddim_step(x, x0, t: Point, s: Point, eta: float = 0.0, z=None, eps=None) -> Tensor:
    r"""The DDIM transition (Song, Meng & Ermon, 2021) from ``t`` down to ``s``:

    .. math::
        x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\;\hat\varepsilon + c\,z,
        \qquad c = \eta\,\sigma_s\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}},

    with :math:`\hat\varepsilon = (x_t - \alpha_t\hat x_0)/\sigma_t`, the noise that
    :math:`\hat x_0` implies (or ``eps``, when a method renoises with another one).
    ``eta = 0`` keeps the predicted noise (the exponential Euler step of the PF-ODE);
    ``eta = 1`` is DDPM's ancestral step, a draw from :math:`q(x_s \mid x_t, x_0 = \hat x_0)`.
    ``z`` is the standard normal noise (needed when ``eta > 0``; ignored when None).  Shapes:
    ``x``, ``x0``, ``z``, ``eps`` ``(batch, ...)``; returns the same.
    """
    w_x0, w_eps, c = ddim_weights(t, s, eta)
    if eps is None:  # w_eps (x - alpha_t x0) / sigma_t + w_x0 x0, in two fused passes
        ratio = w_eps / t.sigma
        out = torch.add(x * ratio, x0, alpha=w_x0 - ratio * t.alpha)
    else:
        out = torch.add(x0 * w_x0, eps, alpha=w_eps)
    return out if z is None else out.add_(z, alpha=c)


def noising_weights(s: Point, t: Point) -> tuple[float, float]:
    r"""The forward transition from ``s`` up to the noisier ``t``: :math:`x_t = \alpha_{t|s}x_s
    + \sigma_{t|s}z` with :math:`\alpha_{t|s} = \alpha_t/\alpha_s` and :math:`\sigma_{t|s} =
    \sigma_t\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}}`; returns the two floats."""
    return t.alpha / s.alpha, t.sigma * math.sqrt(-math.expm1(-2 * (s.lam - t.lam)))


def noising_step(x: Tensor, s: Point, t: Point, z: Tensor) -> Tensor:
    r""":math:`x_t = \alpha_{t|s}x_s + \sigma_{t|s}z`, a draw of :math:`q(x_t \mid x_s)` for
    :math:`t \ge s` (:func:`noising_weights`).  Shapes: ``x``, ``z`` ``(batch, ...)``."""
    ratio, std = noising_weights(s, t)
    return ratio * x + std * z


# -- the loop ----------------------------------------------------------------------------------
class Interval:
    r"""The step from ``t`` = :math:`t_i` to ``s`` = :math:`t_{i+1}`, as an update sees it.

    ``i``; ``t`` and ``s``, the two :class:`Point`\ s; ``h`` :math:`= \lambda_s - \lambda_t`;
    ``first`` and ``last``; ``D(x, at=None)``, the model at ``at`` (default ``t``), counted and
    checked; ``noise(std=1.0)``, Gaussian noise like the state; ``denoised``, the step's
    estimate of :math:`x_0` reported to the callback (the first model output unless the update
    sets it); ``kept``, what the step leaves to later steps (default: ``denoised``; PLMS keeps
    its noise prediction); ``history``, the earlier steps newest first, as ``(kept_j, t_j)``
    with :math:`t_j` the :class:`Point` the step started from, three at most: the one history
    mechanism of the multistep methods.
    """

    __slots__ = (
        "i",
        "t",
        "s",
        "h",
        "first",
        "last",
        "history",
        "denoised",
        "kept",
        "nfe",
        "_model",
        "_noise",
    )

    def D(self, x: Tensor, at: Point | None = None) -> Tensor:  # noqa: N802 (the denoiser D)
        """The denoiser :math:`D(x, t)` at ``at`` (default the step's start ``t``)."""
        time = (self.t if at is None else at).time
        out = returned(self._model(x, time), x, "model(x, t)")
        self.nfe += 1
        if self.denoised is None:
            self.denoised = out
        return out

    def noise(self, std: float = 1.0, like: Tensor | None = None) -> Tensor:
        """Standard normal noise times ``std``, shaped like the state (or like ``like``), from
        the run's noise source."""
        if like is None:
            return self._noise(self.i, std)
        return self._noise(self.i, std, like)

    def ddim(self, x: Tensor, x0: Tensor, eta: float = 0.0, eps: Tensor | None = None) -> Tensor:
        r"""The shared DDIM transition from ``t`` to ``s`` (:func:`ddim_step`), drawing its
        noise only when it adds some (``eta > 0`` and :math:`\sigma_s > 0`)."""
        z = self.noise() if eta > 0 and self.s.sigma > 0 else None
        return ddim_step(x, x0, self.t, self.s, eta, z, eps)


def noise_source(like: Tensor, generator=None, noise_sampler=None) -> Callable:
    """The one noise hook: ``noise(i, std=1.0, like=None)``, standard normal noise times
    ``std``, shaped like ``like`` (default: the state ``like`` given here), from
    ``noise_sampler(i, shape)`` when given (``i`` the step), else drawn from ``generator``.
    Shapes: returns a tensor of the shape, dtype and device of ``like``."""
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(
            f"noise_sampler must be callable as noise_sampler(i, shape), got "
            f"{type(noise_sampler).__name__}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if noise_sampler is not None:

        def given(i: int, std: float = 1.0, like: Tensor = like) -> Tensor:
            z = returned(noise_sampler(i, like.shape), like, "noise_sampler(i, shape)")
            return z if std == 1.0 else z * std

        return given

    def drawn(i: int, std: float = 1.0, like: Tensor = like) -> Tensor:
        return torch.normal(
            0.0, std, like.shape, generator=generator, dtype=like.dtype, device=like.device
        )

    return drawn


def integrate(
    update: Callable,
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process,
    *,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    callback: Callable | None = None,
    denoise_last: bool = False,
    progress: bool | None = None,
    finish: Callable | None = None,
) -> Tensor:
    r"""Run ``x = update(k, x)`` over the steps of ``ts``, with ``k`` the step's :class:`Interval`.

    ``model(x, t)`` is the denoiser; ``x`` the state at ``ts[0]`` (a floating-point tensor
    without NaN); ``ts`` a strictly decreasing grid; ``process`` the forward process whose
    :math:`\alpha_t, \sigma_t` the :class:`Point`\ s hold.  Options every sampler passes on:
    ``generator`` and ``noise_sampler`` (the noise source; ``noise_sampler(i, shape)`` wins),
    ``callback(step)`` (a :class:`Step` after each step; :class:`Trace` records them),
    ``denoise_last`` (return :math:`D(x, t_{\min})`, one more call), ``progress`` (a progress
    bar; ``None``: for runs of at least :data:`LONG_RUN` steps).  For the solvers:
    ``finish(k, x)`` computes the returned value from the last state with ``k`` at the last time
    (``k.t = k.s`` = the last point).  Returns the state at ``ts[-1]`` (or the finish).
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    if not isinstance(denoise_last, bool):
        raise TypeError(f"denoise_last must be True or False, got denoise_last = {denoise_last!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got progress = {progress!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step), got {callback!r}")
    finite(x, "x")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    noise = noise_source(x, generator, noise_sampler)
    points = grid_points(process, check_time_grid(ts), x)
    n = len(points) - 1
    k = Interval()
    k._model, k._noise, k.history, k.nfe = model, noise, [], 0
    steps = range(n)
    if progress or (progress is None and n >= LONG_RUN):
        from tqdm.auto import tqdm

        steps = tqdm(steps, leave=False)
    for i in steps:
        k.i, k.t, k.s, k.first, k.last = i, points[i], points[i + 1], i == 0, i == n - 1
        k.h, k.denoised, k.kept = k.s.lam - k.t.lam, None, None
        x = update(k, x)
        if callback is not None:
            callback(Step(i, k.s.time, x, k.denoised, k.nfe))
        kept = k.denoised if k.kept is None else k.kept
        k.history = [(kept, k.t), *k.history[:2]]
    if denoise_last and finish is None:

        def finish(k, x):
            return k.D(x)

    if finish is not None:
        k.i, k.t, k.first, k.last, k.denoised = n, points[-1], False, True, None
        x = finish(k, x)
        emit(callback, Step(n, points[-1].time, x, x, k.nfe))
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"the run produced NaN or infinite values ({int((~torch.isfinite(x)).sum())} of "
            f"{x.numel()}): check the model's output and the grid's ends"
        )
    return x
