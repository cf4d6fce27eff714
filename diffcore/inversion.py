r"""Inverting a deterministic sampler: DDIM inversion and its drift, EDICT and BDIA.

To *invert* a sampler is to find the start state from which it produces a given output; image
editing inverts an image, changes the conditioning and samples again.  On the sampler's grid
:math:`t_0 > t_1 > \dots > t_n` (``ts``) with states :math:`x_i` at :math:`t_i`, write
:math:`\Phi_{a \to b}` for the DDIM map from time :math:`a` to time :math:`b` (either
direction), with the model evaluated at the start (:func:`ddim_move`):

.. math::
    \Phi_{a\to b}(x) = \alpha_b\hat x_0 + \sigma_b\hat\varepsilon,
    \qquad \hat x_0 = D(x, a),
    \qquad \hat\varepsilon = \frac{x - \alpha_a\hat x_0}{\sigma_a}.

DDIM sampling is :math:`x_{i+1} = \Phi_{t_i\to t_{i+1}}(x_i)`.

**DDIM inversion** (:func:`ddim_inversion`) runs the map up the grid with the model at the
point it has, :math:`x_i \approx \Phi_{t_{i+1}\to t_i}(x_{i+1})`.  The exact inverse of a DDIM
step would need the model at the unknown :math:`x_i`; the substitution costs
:math:`O(h^2)` per step, so inverting and sampling again does not return the input: it
*drifts*, by an amount of first order in the step.

**EDICT** (Wallace, Gokul & Naik, 2023; :func:`edict`) keeps two chains :math:`(x, y)`, both
started at the same state, and moves each one by an affine map whose noise comes from the other
chain, :math:`\varepsilon(z) = (z - \alpha_t D(z, t))/\sigma_t`, then mixes them:

.. math::
    \begin{aligned}
    x' &= a_t x + b_t\varepsilon(y), \qquad y' = a_t y + b_t\varepsilon(x'),\\
    x_s &= p\,x' + (1 - p)\,y', \qquad y_s = p\,y' + (1 - p)\,x_s,
    \end{aligned}

with :math:`a_t = \alpha_s/\alpha_t`, :math:`b_t = \sigma_s - a_t\sigma_t` (the DDIM step
written in the noise prediction) and both model calls at :math:`t`.  Each line is solved for its
left input in turn, so the step is inverted exactly (:func:`edict_inverse`).  Two model calls
per step; first order (each chain makes DDIM steps with :math:`O(h^2)` perturbations).  The
mixing matrix has eigenvalues 1 and :math:`p^2`: it damps the difference of the chains, which
without it (:math:`p = 1`) drift apart.

**BDIA** (Zhang, Lewis & Kleijn, 2024; :func:`bdia`) keeps the last two states.  Its first step
is DDIM; after it, one model call at :math:`x_i` serves a forward DDIM step to
:math:`t_{i+1}` and a backward one to :math:`t_{i-1}`, and the backward one redoes the last
interval:

.. math::
    x_{i+1} = \gamma\,x_{i-1} + \Phi_{t_i\to t_{i+1}}(x_i)
        - \gamma\,\Phi_{t_i\to t_{i-1}}(x_i),

which is the paper's update, written with increments
:math:`\Delta(t_i\to t_j\mid z_i) = \Phi_{t_i\to t_j}(z_i) - z_i` and indices counting down,

.. math::
    \begin{aligned}
    z_{i-1} = z_{i+1} &- (1 - \gamma)(z_{i+1} - z_i)\\
        &- \gamma\Delta(t_i\to t_{i+1}\mid z_i)
        + \Delta(t_i\to t_{i-1}\mid z_i).
    \end{aligned}

Given :math:`(x_i, x_{i+1})`, the same model call gives :math:`x_{i-1}` back
(:func:`bdia_inverse`), for :math:`\gamma > 0`:

.. math::
    x_{i-1} = \Phi_{t_i\to t_{i-1}}(x_i)
        + \frac{x_{i+1} - \Phi_{t_i\to t_{i+1}}(x_i)}{\gamma}.

The update is :math:`\gamma` times a leapfrog step plus :math:`1 - \gamma` times a DDIM step, a
two-step method with :math:`\rho(\zeta) = \zeta^2 - (1 - \gamma)\zeta - \gamma`, whose roots
are :math:`1` and :math:`-\gamma`: of order 2 at :math:`\gamma = 1` (the leapfrog's truncation
error is :math:`O(h^3)` on a smooth grid), DDIM exactly at :math:`\gamma = 0`, and of order 1
in between, with a global error :math:`(1 - \gamma)/(1 + \gamma)` times DDIM's up to
:math:`O(h^2)` (the local error is :math:`1 - \gamma` times DDIM's, and
:math:`\rho'(1) = 1 + \gamma`).

**Exact, up to floating point.**  "Exactly invertible" holds in exact arithmetic.  In floating
point each step's round-off is carried by the inverse map, and the inverse map of BDIA divides by
:math:`\gamma` (its parasitic root is near :math:`-1/\gamma`), that of EDICT by :math:`p^2` (on
the difference of the chains): the round-trip error grows like :math:`\gamma^{-n}` and
:math:`p^{-2n}` times the float's resolution.  At :math:`\gamma = 1` it does not grow.  The same
amplification meets any state the sampler did not produce: inverting *data*, the
:math:`O(h^2)` mismatch of the first (DDIM) step of BDIA, or of the pair :math:`(x, x)` of
EDICT, grows like :math:`\gamma^{-n}` or :math:`p^{-2n}`, so over many steps only BDIA at
:math:`\gamma = 1` inverts data accurately (to second order).

**One way to invert.**  :func:`invert` takes a method's name (:data:`METHODS`) and the state
its sampler returns (a tensor for DDIM, the pair for EDICT, the last two states for BDIA, or a
single data tensor for each), and returns the start state that :func:`regenerate` maps back;
:func:`round_trip` does both.  Every grid ``ts`` here is the *sampler's* grid, decreasing; the
inverse runs it from ``ts[-1]`` up to ``ts[0]``.  The model is the denoiser
:math:`D(x, t) \approx \mathbb E[x_0 \mid x_t = x]`, as for :mod:`diffcore.samplers`.

**Paper and code.**  EDICT's released code (``salesforce/EDICT``, ``edict_functions.py``)
alternates which chain moves first on every other step (``leapfrog_steps=True``, its default;
the paper's equations move :math:`x` first on every step): ``leapfrog=True`` here.  It runs in
float64 (its README: to avoid floating-point errors in inversion) and interpolates
:math:`\bar\alpha` between integer timesteps.  Its docstring says a higher ``mix_weight``
:math:`p` gives more consistent generations but divergence in inversion; on exact Gaussian
models the trade-off runs the other way (a lower :math:`p` samples better and inverts data
worse, :math:`p = 1` inverts like DDIM and samples badly).  BDIA's released code
(``guoqiang-zhang-x/BDIA``) writes the update in the paper's increment form when sampling and
solved for :math:`x_{i-1}` when inverting, the same algebra.  Its text-to-image sampler
(``BDIAddim.py``) makes a plain DDIM first step, as here (with ``ddim_eta > 0`` its BDIA
branch would shrink the noise direction and add no noise); its editing code
(``bdia_edict_functions.py``) inverts an image by one DDIM step, then exact ones, and samples
from the last two states, as :func:`invert` and :func:`regenerate` do.  That code evaluates
the network at a negative timestep (the first one less :math:`1000/N`) on its first
inversion step, keeps EDICT's loop over two latents (one update per step only with
``run_baseline=True``, which its ``BDIA_editing`` passes), and defaults to
:math:`\gamma = 0.5` for editing where its README recommends :math:`\gamma \in [0.92, 1]`.

References: B. Wallace, A. Gokul and N. Naik, *EDICT: Exact Diffusion Inversion via Coupled
Transformations*, CVPR 2023; G. Zhang, J. P. Lewis and W. B. Kleijn, *Exact Diffusion Inversion
via Bi-directional Integration Approximation*, ECCV 2024.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.checks import between, finite, one_of, require, returned, same_shape
from diffcore.processes import Process
from diffcore.stepping import Point, Step, check_time_grid, emit, grid_points, integrate

__all__ = [
    "METHODS",
    "ddim_move",
    "ddim_inversion",
    "edict",
    "edict_inverse",
    "bdia",
    "bdia_pair",
    "bdia_inverse",
    "invert",
    "regenerate",
    "round_trip",
]

#: The methods that :func:`invert`, :func:`regenerate` and :func:`round_trip` take by name.
METHODS = ("ddim", "edict", "bdia")


# -- the shared pieces -------------------------------------------------------------------------
def ddim_move(x: Tensor, x0: Tensor, a: Point, b: Point) -> Tensor:
    r"""The DDIM map :math:`\Phi_{a\to b}` from the point ``a`` to the point ``b``, either way:

    .. math::
        \Phi_{a\to b}(x) = \alpha_b\hat x_0 + \frac{\sigma_b}{\sigma_a}(x - \alpha_a\hat x_0),

    with ``x0`` :math:`= \hat x_0 = D(x, a)`.  Needs :math:`\sigma_a > 0`.  Shapes: ``x``,
    ``x0`` ``(batch, ...)``; returns the same.
    """
    ratio = b.sigma / a.sigma
    return torch.add(x * ratio, x0, alpha=b.alpha - ratio * a.alpha)


def _noise(z: Tensor, x0: Tensor, t: Point) -> Tensor:
    """The noise that ``x0`` implies at ``t``: (z - alpha_t x0) / sigma_t."""
    return torch.sub(z, x0, alpha=t.alpha) / t.sigma


def _edict_weights(t: Point, s: Point) -> tuple[float, float]:
    """EDICT's (a, b): the DDIM step from t to s as a x + b eps."""
    a = s.alpha / t.alpha
    return a, s.sigma - a * t.sigma


def _mixing(p) -> float:
    return between(p, "p", 0, 1, open_low=True)


def _pair(state, name: str) -> tuple[Tensor, Tensor]:
    """A pair of tensors of one shape (a single tensor becomes (x, x)), checked finite."""
    if isinstance(state, Tensor):
        finite(state, name)
        return state, state
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(
            f"{name} must be a tensor or a pair of tensors, got {name} of type "
            f"{type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
        )
    first, second = (finite(z, f"{name}[{j}]") for j, z in enumerate(state))
    same_shape(first, second, f"{name}[0]", f"{name}[1]")
    require(first.dtype == second.dtype, f"{name}[1].dtype", second.dtype, f"{first.dtype}")
    return first, second


def _check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step), got {callback!r}")


def _points(process: Process, ts, like: Tensor) -> list[Point]:
    return grid_points(process, check_time_grid(ts), like)


def _need(ok: bool, method: str, what: str, point: Point, index: str, process) -> None:
    if not ok:
        raise ValueError(
            f"{method} needs {what}, got alpha = {point.alpha:.6g}, sigma = {point.sigma:.6g} at "
            f"{index} = {point.t:.6g} under {process!r}"
        )


class _Calls:
    """The model at a point, checked and counted, for the loops that run up the grid (the
    engine runs down only)."""

    def __init__(self, model: Callable) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        self.model, self.nfe, self.first = model, 0, None

    def __call__(self, x: Tensor, at: Point) -> Tensor:
        out = returned(self.model(x, at.time), x, "model(x, t)")
        self.nfe += 1
        if self.first is None:
            self.first = out
        return out

    def report(self, callback, j: int, at: Point, state: Tensor) -> None:
        """Hand the step to the callback and start a new one."""
        emit(callback, Step(j, at.time, state, self.first, self.nfe))
        self.first = None


def _finite_result(x: Tensor, method: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{method} produced NaN or infinite values ({int((~torch.isfinite(x)).sum())} of "
            f"{x.numel()}): check the model's output and the grid's ends"
        )
    return x


# -- DDIM inversion ----------------------------------------------------------------------------
def ddim_inversion(
    model: Callable, x: Tensor, ts: Tensor, process: Process, *, callback: Callable | None = None
) -> Tensor:
    r"""DDIM run up the grid: from ``x`` at ``ts[-1]`` to a state at ``ts[0]``.

    .. math:: x_i = \Phi_{t_{i+1}\to t_i}(x_{i+1}), \qquad i = n - 1, \dots, 0,

    with the model at :math:`(x_{i+1}, t_{i+1})`, the point at hand (:func:`ddim_move`): the
    usual, approximate inversion.  DDIM sampling from the result on the same grid returns ``x``
    only up to a drift of first order in the step (:func:`round_trip`).  One model call per
    step; needs :math:`\sigma > 0` at ``ts[-1]``.  ``callback(step)`` receives a
    :class:`~diffcore.stepping.Step` after each step (``step.t`` the time reached).
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    finite(x, "x")
    _check_callback(callback)
    points = _points(process, ts, x)
    _need(
        points[-1].sigma > 0, "ddim_inversion", "sigma > 0 at ts[-1]", points[-1], "ts[-1]", process
    )
    calls = _Calls(model)
    n = len(points) - 1
    for j, i in enumerate(range(n - 1, -1, -1)):
        low, high = points[i + 1], points[i]
        x = ddim_move(x, calls(x, low), low, high)
        calls.report(callback, j, high, x)
    return _finite_result(x, "ddim_inversion")


def _ddim(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    """Deterministic DDIM down the grid: the sampler that ddim_inversion inverts."""

    def update(k, x):
        return ddim_move(x, k.D(x), k.t, k.s)

    return integrate(update, model, x, ts, process, **run)


# -- EDICT -------------------------------------------------------------------------------------
def _edict_grid(process: Process, ts, like: Tensor) -> list[Point]:
    points = _points(process, ts, like)
    for i, point in enumerate(points):  # a = alpha_s / alpha_t, and its inverse
        _need(point.alpha > 0, "edict", "alpha > 0 on the grid", point, f"ts[{i}]", process)
    return points


def _swapped(leapfrog: bool, i: int) -> bool:
    """Whether step i moves y first (the released code's leapfrog order, on odd steps)."""
    if not isinstance(leapfrog, bool):
        raise TypeError(f"leapfrog must be True or False, got leapfrog = {leapfrog!r}")
    return leapfrog and i % 2 == 1


def edict(
    model: Callable,
    x,
    ts: Tensor,
    process: Process,
    *,
    p: float = 0.93,
    leapfrog: bool = False,
    callback: Callable | None = None,
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    r"""EDICT sampling (Wallace, Gokul & Naik, 2023): two coupled chains, mixed after each step.

    With :math:`\varepsilon(z) = (z - \alpha_t D(z, t))/\sigma_t`, :math:`a_t = \alpha_s/\alpha_t`
    and :math:`b_t = \sigma_s - a_t\sigma_t`, each step from :math:`t` to :math:`s` is

    .. math::
        \begin{aligned}
        x' &= a_t x + b_t\varepsilon(y), \qquad y' = a_t y + b_t\varepsilon(x'),\\
        x_s &= p\,x' + (1 - p)\,y', \qquad y_s = p\,y' + (1 - p)\,x_s.
        \end{aligned}

    ``x``: the start state at ``ts[0]`` (both chains start there) or a pair ``(x, y)``, as
    :func:`edict_inverse` returns.  ``p`` in (0, 1], the paper's mixing weight (0.93 in the
    paper and the code); ``leapfrog=True`` moves :math:`y` first on odd steps, as the released
    code does.  Needs :math:`\alpha > 0` on the grid.  Two model calls per step; first order.
    ``callback`` sees the state as the stacked pair, ``(2, batch, ...)``.  Shapes: ``x``
    ``(batch, ...)``; returns the pair ``(x, y)`` at ``ts[-1]``, each ``(batch, ...)``.
    """
    p = _mixing(p)
    start = torch.stack(_pair(x, "x"))
    _edict_grid(process, ts, start)
    _swapped(leapfrog, 0)

    def update(k, state):
        x, y = state.unbind(0)
        a, b = _edict_weights(k.t, k.s)
        first, second = (y, x) if _swapped(leapfrog, k.i) else (x, y)
        first = torch.add(first * a, _noise(second, k.D(second), k.t), alpha=b)
        second = torch.add(second * a, _noise(first, k.D(first), k.t), alpha=b)
        x, y = (second, first) if _swapped(leapfrog, k.i) else (first, second)
        x = torch.add(x * p, y, alpha=1 - p)  # the mixing layer
        y = torch.add(y * p, x, alpha=1 - p)
        return torch.stack((x, y))

    out = integrate(update, model, start, ts, process, callback=callback, progress=progress)
    return out[0], out[1]


def edict_inverse(
    model: Callable,
    x,
    ts: Tensor,
    process: Process,
    *,
    p: float = 0.93,
    leapfrog: bool = False,
    callback: Callable | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The exact inverse of :func:`edict`: from the pair at ``ts[-1]`` up to the pair at ``ts[0]``.

    Each step of :func:`edict` undone, last line first, with the same model calls at :math:`t`:

    .. math::
        \begin{aligned}
        y' &= \frac{y_s - (1 - p)\,x_s}{p}, \qquad x' = \frac{x_s - (1 - p)\,y'}{p},\\
        y &= \frac{y' - b_t\varepsilon(x')}{a_t}, \qquad
        x = \frac{x' - b_t\varepsilon(y)}{a_t}.
        \end{aligned}

    ``x``: the pair ``(x, y)`` that :func:`edict` returned, or one tensor (an image to invert:
    both chains start there, as in the released code).  ``p`` and ``leapfrog`` as in
    :func:`edict`.  Two model calls per step.  Shapes: ``x`` ``(batch, ...)`` each; returns the
    pair at ``ts[0]``.
    """
    p = _mixing(p)
    _check_callback(callback)
    x, y = _pair(x, "x")
    points = _edict_grid(process, ts, x)
    _swapped(leapfrog, 0)
    calls = _Calls(model)
    n = len(points) - 1
    for j, i in enumerate(range(n - 1, -1, -1)):
        t, s = points[i], points[i + 1]
        a, b = _edict_weights(t, s)
        y = (y - (1 - p) * x) / p  # the mixing layer, undone
        x = (x - (1 - p) * y) / p
        first, second = (y, x) if _swapped(leapfrog, i) else (x, y)
        second = (second - b * _noise(first, calls(first, t), t)) / a
        first = (first - b * _noise(second, calls(second, t), t)) / a
        x, y = (second, first) if _swapped(leapfrog, i) else (first, second)
        calls.report(callback, j, t, torch.stack((x, y)))
    _finite_result(torch.stack((x, y)), "edict_inverse")
    return x, y


# -- BDIA --------------------------------------------------------------------------------------
def _gamma(gamma, invertible: bool = False) -> float:
    return between(gamma, "gamma", 0, 1, open_low=invertible)


def bdia_pair(
    model: Callable,
    x,
    ts: Tensor,
    process: Process,
    *,
    gamma: float = 1.0,
    **run,
) -> tuple[Tensor, Tensor]:
    r"""BDIA sampling (:func:`bdia`), returning the last two states :math:`(x_{n-1}, x_n)`.

    What :func:`bdia_inverse` needs to run the sampler backwards exactly.  ``x`` and the
    options as for :func:`bdia`.  Shapes: ``x`` ``(batch, ...)``; returns two tensors of that
    shape, at ``ts[-2]`` and ``ts[-1]`` (with ``denoise_last=True`` the second is
    :math:`D(x_n, t_n)`).
    """
    gamma = _gamma(gamma)
    # a pair is a tuple; anything else goes to the engine, which names what it got
    start, given = _pair(x, "x") if isinstance(x, tuple) else (x, None)
    before = {}

    def update(k, x):
        before["x"] = x
        k.kept = x  # the next step reads (x_{i-1}, t_{i-1}) from k.history
        if k.first:
            if given is not None:  # x_1 known (from an inversion): no step to take
                return given
            return ddim_move(x, k.D(x), k.t, k.s)  # the first step is DDIM
        x0 = k.D(x)
        x_back, t_back = k.history[0]
        # x_{i+1} = gamma x_{i-1} + Phi_{t_i -> t_{i+1}}(x_i) - gamma Phi_{t_i -> t_{i-1}}(x_i)
        out = ddim_move(x, x0, k.t, k.s)
        return out.add_(x_back - ddim_move(x, x0, k.t, t_back), alpha=gamma)

    last = integrate(update, model, start, ts, process, **run)
    return before["x"], last


def bdia(model: Callable, x, ts: Tensor, process: Process, *, gamma: float = 1.0, **run) -> Tensor:
    r"""BDIA-DDIM (Zhang, Lewis & Kleijn, 2024): bi-directional integration, exactly invertible.

    The first step is DDIM, :math:`x_1 = \Phi_{t_0\to t_1}(x_0)` (:func:`ddim_move`); after it,
    with one model call :math:`D(x_i, t_i)` per step,

    .. math::
        x_{i+1} = \gamma\,x_{i-1} + \Phi_{t_i\to t_{i+1}}(x_i)
            - \gamma\,\Phi_{t_i\to t_{i-1}}(x_i),

    the backward DDIM step to :math:`t_{i-1}` correcting the forward one that produced
    :math:`x_i`.  ``gamma`` in [0, 1]: 0 is DDIM, 1 (the default) is of order 2 and the paper's
    choice for exact inversion; the paper's code uses 0.5 for 10-step text-to-image sampling.
    ``x``: the start state at ``ts[0]``, or the pair :math:`(x_0, x_1)` at ``ts[0]`` and
    ``ts[1]`` that :func:`bdia_inverse` returns (the first step is then skipped, at no model
    call).  The previous state is kept in the engine's history (``k.kept``).  ``run``: the
    engine's options (:func:`diffcore.stepping.integrate`).  Order 2 at :math:`\gamma = 1`,
    1 below; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the state at
    ``ts[-1]``.
    """
    return bdia_pair(model, x, ts, process, gamma=gamma, **run)[1]


def bdia_inverse(
    model: Callable,
    x,
    ts: Tensor,
    process: Process,
    *,
    gamma: float = 1.0,
    callback: Callable | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The inverse of :func:`bdia`: from :math:`(x_{n-1}, x_n)` back to :math:`(x_0, x_1)`.

    For :math:`i = n - 1, \dots, 1`, with the model at :math:`(x_i, t_i)`, the call the
    sampler made there,

    .. math::
        x_{i-1} = \Phi_{t_i\to t_{i-1}}(x_i)
            + \frac{x_{i+1} - \Phi_{t_i\to t_{i+1}}(x_i)}{\gamma}.

    ``x``: the pair :math:`(x_{n-1}, x_n)` at ``ts[-2]`` and ``ts[-1]`` (what
    :func:`bdia_pair` returns), or a single state :math:`x_n` (an image to invert), for which
    :math:`x_{n-1} = \Phi_{t_n\to t_{n-1}}(x_n)` is made first by one step of
    :func:`ddim_inversion`, the only approximate step, as in the released editing code.
    ``gamma`` in (0, 1]: the inverse divides by it.  The sampler's first step (DDIM) is never
    undone, as :math:`x_1` is part of the returned pair.  One model call per step.  Shapes:
    ``(batch, ...)`` each; returns the pair at ``ts[0]`` and ``ts[1]``.
    """
    gamma = _gamma(gamma, invertible=True)
    _check_callback(callback)
    calls = _Calls(model)
    single = isinstance(x, Tensor)
    x_prev, x_last = (None, finite(x, "x")) if single else _pair(x, "x")
    points = _points(process, ts, x_last)
    n = len(points) - 1
    j = 0
    if single:  # x_{n-1} by DDIM inversion from x_n
        low, high = points[n], points[n - 1]
        _need(low.sigma > 0, "bdia_inverse", "sigma > 0 at ts[-1]", low, "ts[-1]", process)
        x_prev = ddim_move(x_last, calls(x_last, low), low, high)
        calls.report(callback, j, high, x_prev)
        j += 1
    ahead, here = x_last, x_prev  # x_{i+1}, x_i
    for i in range(n - 1, 0, -1):
        t = points[i]
        x0 = calls(here, t)
        back = ddim_move(here, x0, t, points[i - 1])
        back = back.add_(ahead - ddim_move(here, x0, t, points[i + 1]), alpha=1 / gamma)
        ahead, here = here, back
        calls.report(callback, j, points[i - 1], here)
        j += 1
    _finite_result(torch.stack((here, ahead)), "bdia_inverse")
    return here, ahead


# -- one way to invert -------------------------------------------------------------------------
def invert(name: str, model: Callable, state, ts: Tensor, process: Process, **options):
    r"""Invert the sampler ``name`` on the grid ``ts``: the start state it maps to ``state``.

    ``name`` in :data:`METHODS`; ``ts`` the sampler's (decreasing) grid, run here from
    ``ts[-1]`` up to ``ts[0]``; ``options`` the method's own (``p`` and ``leapfrog`` for
    EDICT, ``gamma`` for BDIA) and ``callback``.

    - ``"ddim"``: ``state`` a tensor at ``ts[-1]``; returns a tensor at ``ts[0]``
      (:func:`ddim_inversion`, approximate);
    - ``"edict"``: ``state`` the pair :func:`edict` returns, or one tensor; returns the pair
      at ``ts[0]`` (:func:`edict_inverse`, exact);
    - ``"bdia"``: ``state`` the last two states :func:`bdia_pair` returns, or one tensor;
      returns :math:`(x_0, x_1)` at ``ts[0]`` and ``ts[1]`` (:func:`bdia_inverse`, exact
      after the first step).

    :func:`regenerate` with the same arguments maps the result back to ``state``.
    Shapes: each tensor ``(batch, ...)``.
    """
    one_of(name, "name", METHODS)
    inverse = {"ddim": ddim_inversion, "edict": edict_inverse, "bdia": bdia_inverse}[name]
    return inverse(model, state, ts, process, **options)


def regenerate(name: str, model: Callable, state, ts: Tensor, process: Process, **options):
    r"""Run the sampler ``name`` from what :func:`invert` returns, down the grid ``ts``.

    ``"ddim"``: deterministic DDIM from a tensor at ``ts[0]``, returns the tensor at
    ``ts[-1]``; ``"edict"``: :func:`edict` from a pair, returns the pair; ``"bdia"``:
    :func:`bdia_pair` from :math:`(x_0, x_1)`, returns :math:`(x_{n-1}, x_n)`.  ``options``
    as for :func:`invert` (and ``progress``).  Shapes: each tensor ``(batch, ...)``.
    """
    one_of(name, "name", METHODS)
    sampler = {"ddim": _ddim, "edict": edict, "bdia": bdia_pair}[name]
    return sampler(model, state, ts, process, **options)


def round_trip(name: str, model: Callable, state, ts: Tensor, process: Process, **options):
    r"""``regenerate(name, ..., invert(name, ..., state, ...), ...)``: invert, then sample again.

    For EDICT, and for BDIA from a pair, the result equals ``state`` up to round-off; from a
    single tensor, EDICT returns the pair ``(state, state)`` and BDIA
    :math:`(\Phi_{t_n\to t_{n-1}}(x_n), x_n)`, again up to round-off.  For DDIM it differs by the
    inversion's drift, of first order in the step.  ``options`` go to both runs.  Shapes: as
    :func:`regenerate` returns.
    """
    start = invert(name, model, state, ts, process, **options)
    return regenerate(name, model, start, ts, process, **options)
