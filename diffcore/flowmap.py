r"""Flow maps: the PF-ODE solution operator, and models that learn it to sample in a few steps.

The PF-ODE :math:`\dot x = v(x, t)` carries :math:`p_t` to :math:`p_s`; its flow map
:math:`\Phi(x, t, s)` sends the state at time ``t`` to the state at time ``s``, with the
boundary :math:`\Phi(x, t, t) = x` and the semigroup property
:math:`\Phi(\Phi(x, t, u), u, s) = \Phi(x, t, s)`.  A model of :math:`\Phi` generates in one
jump or a few.

**Convention.**  Every map here is called with the positional order (state, its time, target
time), as :meth:`~diffcore.analytic.Gaussian.pf_ode_map`: ``G(x, t, s)`` takes the state
``x`` at ``t`` to time ``s <= t``; data at ``t = 0``, noise at ``t = 1``, as everywhere in
diffcore.  MeanFlow's time convention is ours too (noise at ``t = 1``); its paper writes the
average velocity :math:`u(z, r, t)`, which is ``u(z, t, r)`` here.

- Exact maps: :meth:`Gaussian.pf_ode_map <diffcore.analytic.Gaussian.pf_ode_map>` (closed form),
  :func:`exact_flow_map` (a fine solve, for a mixture or any denoiser),
  :func:`exact_average_velocity` (MeanFlow's target for Gaussian data).
- Consistency models (Song et al., 2023): :math:`f(x, t) = \Phi(x, t, t_{\min})`, the
  parameterisation :class:`ConsistencyModel`, :func:`consistency_distillation_loss`,
  :func:`consistency_training_loss`, :func:`consistency_sample`.
- Consistency trajectory models (CTM; Kim et al., 2024): :math:`G(x, t, s) = \Phi(x, t, s)`
  for every :math:`s \le t`: :class:`TrajectoryModel`, :func:`ctm_loss`, :func:`ctm_sample`.
- MeanFlow (Geng et al., 2025): the average velocity
  :math:`u(z, t, s) = \frac{1}{t - s}\int_s^t v(z_\tau, \tau)\,d\tau = \frac{z - \Phi(z, t, s)}{t - s}`:
  :func:`total_derivative`, :func:`meanflow_loss`, :func:`meanflow_sample`.
- :class:`TwoTimeMLP`: a network ``(x, t, s) -> (B, d)`` for the two-time maps.

**Teachers.**  A loss that needs the PF-ODE (distillation, CTM) takes a deterministic sampler of
:mod:`diffcore.samplers` by name (``teacher="heun"``), or a callable with the sampler
signature, and advances each sample one step of the grid ``ts`` per call; samples drawn at
different times advance together.  A multistep solver (``dpmpp_2m``, ``unipc``, ...) called one
step at a time is its first-order start, so prefer single-step solvers (``heun``,
``dpm_solver_2``, ``dpm_solver_3``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore.analytic import Gaussian
from diffcore.checks import (
    Deferred,
    as_time,
    between,
    count,
    finite,
    per_sample,
    positive,
    returned,
)
from diffcore.nets import sinusoidal_embedding
from diffcore.processes import Linear, Process
from diffcore.samplers import SAMPLERS, check_time_grid
from diffcore.stepping import Step, emit, grid_points, noise_source, noising_step
from diffcore.train import EMA

__all__ = [
    "ODE_SOLVERS",
    "exact_flow_map",
    "exact_average_velocity",
    "TwoTimeMLP",
    "ConsistencyModel",
    "TrajectoryModel",
    "consistency_distillation_loss",
    "consistency_training_loss",
    "ctm_loss",
    "with_ema_target",
    "total_derivative",
    "meanflow_loss",
    "consistency_sample",
    "ctm_sample",
    "meanflow_sample",
]

#: The deterministic samplers (by the registry's facts; heun and ddim with their defaults):
#: the PF-ODE solvers a teacher or an exact flow map may use.
ODE_SOLVERS = tuple(name for name, sampler in SAMPLERS.items() if sampler.stochastic is not True)
_LAM_CAP = 10.0  # |lam| at which exact_flow_map replaces an infinite log-SNR end
_FREQ = 0.03  # TwoTimeMLP embeds 0.03 t: smooth in t, for MeanFlow's d/dt (see the class)


def _solver(solver, role: str = "teacher") -> Callable:
    if callable(solver):
        return solver
    if solver not in ODE_SOLVERS:
        raise ValueError(
            f"{role} must be a PF-ODE solver, one of {ODE_SOLVERS}, or a sampler callable, "
            f"got {role} = {solver!r}"
        )
    return SAMPLERS[solver]


def _one_time(t, name: str) -> float:
    # checked in float64, so that a Python float comes back exactly (0.002 stays 0.002)
    t = as_time(t, like=torch.empty((), dtype=torch.float64), name=name)
    if t.ndim:
        raise ValueError(
            f"{name} must be one time (a float or a 0-d tensor), got shape {tuple(t.shape)}"
        )
    return float(t)


# -- exact maps --------------------------------------------------------------------------------
def _logsnr_grid(process: Process, s: float, t: float, n: int) -> Tensor:
    """``n`` steps from ``s`` down to ``t``, equal in log-SNR.  An infinite end (sigma = 0 at
    t = 0; alpha = 0 at t = 1 for Linear) is replaced by |lam| = _LAM_CAP and reached by one
    more step, which the samplers take as the exact limit of the first-order exponential step:
    its error is O(e^{-2 _LAM_CAP}) (alpha^2 from alpha = 0, (sigma/alpha)^3 to sigma = 0)."""
    lam_s, lam_t = process.lam(torch.tensor([s, t], dtype=torch.float64)).tolist()
    start = lam_s if math.isfinite(lam_s) else min(-_LAM_CAP, lam_t - 1)
    end = lam_t if math.isfinite(lam_t) else max(_LAM_CAP, start + 1)
    ts = process.t_of_lam(torch.linspace(start, end, n + 1, dtype=torch.float64)).clamp(0, 1)
    ts = ts.tolist()
    ts = [s] + ts[1:] if start == lam_s else [s] + ts
    ts = ts[:-1] + [t] if end == lam_t else ts + [t]
    return check_time_grid(torch.tensor(ts, dtype=torch.float64))


def exact_flow_map(
    denoiser: Callable,
    x: Tensor,
    s,
    t,
    process: Process,
    n_steps: int = 128,
    solver: str = "dpm_solver_3",
) -> Tensor:
    r"""The PF-ODE flow of ``denoiser`` from time ``s`` down to time ``t <= s``, by a fine solve.

    ``n_steps`` steps of ``solver`` (third-order DPM-Solver by default, three calls a step) on
    a grid equal in log-SNR; an infinite log-SNR end (:math:`\sigma_0 = 0`, or
    :math:`\alpha_1 = 0` for ``Linear``) is reached by one extra exact-limit step from
    :math:`|\lambda| = 10`.  With the exact denoiser of a mixture this is the mixture's flow
    map up to the solver's error, :math:`O(n^{-3})`: from ``t = 1`` to ``0`` at the default
    128 steps, at most 1e-5 on Gaussian data and about 5e-4 on a mixture with a thin
    component (variance 0.05); each doubling of ``n_steps`` divides it by about 8.  ``s = t``
    returns ``x`` (the boundary).  The forward direction ``s < t`` is refused: the samplers integrate towards
    data.  Shapes: ``x`` ``(B, ...)``; ``s``, ``t`` one time each; returns ``(B, ...)``.
    """
    s, t = _one_time(s, "s"), _one_time(t, "t")
    n_steps = count(n_steps, "n_steps")
    run = _solver(solver, "solver")
    finite(x, "x")
    if not callable(denoiser):
        raise TypeError(f"denoiser must be a function D(x, t), got {type(denoiser).__name__}")
    if s < t:
        raise ValueError(
            f"exact_flow_map integrates from s down to t <= s, got s = {s} < t = {t}: the "
            f"forward direction is not supported"
        )
    if s == t:
        return x

    def checked(x_: Tensor, t_) -> Tensor:
        return returned(denoiser(x_, t_), x_, "denoiser")

    out = run(checked, x, _logsnr_grid(process, s, t, n_steps), process)
    return returned(out, x, "solver")


def exact_average_velocity(gaussian: Gaussian, process: Process | None = None) -> Callable:
    r"""MeanFlow's average velocity for Gaussian data, from the closed-form flow map.

    :math:`u(z, t, s) = (z - \Phi(z, t, s))/(t - s)`, and at ``s = t`` its limit, the PF-ODE
    velocity :math:`v(z, t)`.  ``process`` defaults to ``Linear()``.  Returns
    ``u(z, t, s)`` with ``z`` ``(B, d)``, ``t``, ``s`` floats, ``()`` or ``(B,)``.
    """
    process = process or Linear()

    def u(z: Tensor, t, s) -> Tensor:
        t, s = as_time(t, like=z), as_time(s, like=z, name="s")
        same = per_sample(t == s, z)
        span = per_sample(torch.where(t == s, torch.ones_like(t - s), t - s), z)
        average = (z - gaussian.pf_ode_map(z, t, s, process)) / span
        return torch.where(same, gaussian.velocity(z, t, process), average)

    return u


# -- networks and parameterisations ------------------------------------------------------------
def _batch_time(t, x: Tensor, name: str) -> Tensor:
    t = as_time(t, like=x, name=name)
    if t.ndim == 0 or t.shape == (1,):
        return t.reshape(()).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must be a float, a 0-d tensor or have shape (batch,) = ({x.shape[0]},), "
            f"got {name} of shape {tuple(t.shape)}"
        )
    return t


class TwoTimeMLP(nn.Module):
    r"""The residual MLP of :class:`diffcore.nets.MLP` conditioned on two times, for ``G(x, t, s)`` and ``u(z, t, s)``.

    The conditioning vector is an MLP of the sinusoidal features of ``t`` and of ``s``,
    concatenated; it is added before each of the ``depth`` residual layers of width
    ``hidden``.  The features are those of :math:`0.03\,t` (angles up to :math:`30\,t`, where
    ``nets`` uses :math:`1000\,t`): MeanFlow differentiates the network in ``t``, and with
    the faster angles its :math:`(t - s)\,du/dt` target grew until training diverged.  Shapes: ``forward(x, t, s)`` with ``x`` ``(B, dim)``, ``t`` and ``s`` floats,
    ``()`` or ``(B,)``; returns ``(B, dim)``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_embedding: int = 32):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            count(value, name)
        if count(time_embedding, "time_embedding", low=2) % 2:
            raise ValueError(
                f"time_embedding must be an even integer >= 2, got time_embedding = "
                f"{time_embedding!r}"
            )
        self.dim, self.time_features = dim, time_embedding
        self.time = nn.Sequential(
            nn.Linear(2 * time_embedding, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t, s) -> Tensor:
        finite(x, "x")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        features = [
            sinusoidal_embedding(_FREQ * _batch_time(v, x, n), self.time_features)
            for v, n in ((t, "t"), (s, "s"))
        ]
        c = self.time(torch.cat(features, dim=-1))
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(F.silu(h + c))
        return self.out(F.silu(h))


def _edm_scalings(a: Tensor, s: Tensor, sigma_data: float, kappa: float = 0.0, scale: float = 1.0):
    r"""EDM's preconditioning written in :math:`x = \alpha y` for any process.

    In the VE variable :math:`y = x/\alpha` at noise level :math:`\bar\sigma = \sigma/\alpha`,
    the consistency parameterisation of Song et al. (2023) is
    :math:`c_{\rm skip} = \sigma_d^2/((\bar\sigma - \kappa)^2 + \sigma_d^2)`,
    :math:`c_{\rm out} = \sigma_d(\bar\sigma - \kappa)/\sqrt{\sigma_d^2 + \bar\sigma^2}`,
    :math:`c_{\rm in} = 1/\sqrt{\sigma_d^2 + \bar\sigma^2}` (``kappa = 0``: EDM's denoiser).
    Multiplied out by :math:`\alpha` the coefficients of ``x`` stay finite at :math:`\alpha = 0`.
    ``scale`` multiplies the output (the units of the target time).
    """
    r = s - kappa * a  # alpha (sigma_bar - kappa)
    norm = torch.sqrt(s**2 + sigma_data**2 * a**2)  # alpha sqrt(sigma_bar^2 + sigma_d^2)
    c_skip = scale * sigma_data**2 * a / (r**2 + sigma_data**2 * a**2)
    c_out = scale * sigma_data * r / norm
    return c_skip, c_out, 1 / norm


class ConsistencyModel(nn.Module):
    r"""A consistency function :math:`f(x, t) \approx \Phi(x, t, t_{\min})` with the boundary condition built in.

    .. math:: f(x, t) = c_{\rm skip}(t)\,x + c_{\rm out}(t)\,F(c_{\rm in}(t)\,x, t)

    with Song et al.'s (2023) EDM-style coefficients taken in the VE variable
    :math:`y = x/\alpha_t`, noise level :math:`\bar\sigma_t = \sigma_t/\alpha_t`, and
    :math:`\kappa = \bar\sigma_{t_{\min}}`:

    .. math::
        c_{\rm skip} &= \frac{\alpha_{t_{\min}}\sigma_d^2\alpha_t}{(\sigma_t - \kappa\alpha_t)^2
        + \sigma_d^2\alpha_t^2}, \\
        c_{\rm out} &= \frac{\alpha_{t_{\min}}\sigma_d(\sigma_t - \kappa\alpha_t)}
        {\sqrt{\sigma_t^2 + \sigma_d^2\alpha_t^2}},\quad
        c_{\rm in} = \frac{1}{\sqrt{\sigma_t^2 + \sigma_d^2\alpha_t^2}},

    so that :math:`f(x, t_{\min}) = x` exactly, the output is in the units of :math:`x_{t_{\min}}`,
    and every coefficient is finite where :math:`\alpha_t = 0`.  For ``VE`` these are Song et
    al.'s :math:`c_{\rm skip}, c_{\rm out}` with :math:`\epsilon = \sigma_{\min}`.  ``net(x, t)``
    is any network (``nets.MLP``); ``sigma_data`` the data's scale (0.5 in EDM).  Needs
    :math:`\alpha_{t_{\min}} > 0`.  Shapes: ``forward(x, t)`` with ``x`` ``(B, ...)``, ``t`` a
    float, ``()`` or ``(B,)``; returns ``(B, ...)``.
    """

    def __init__(self, net: nn.Module, process: Process, t_min: float, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.process = net, process
        self.t_min = _one_time(t_min, "t_min")
        self.sigma_data = positive(sigma_data, "sigma_data")
        t_end = torch.tensor(self.t_min, dtype=torch.float64)
        self._alpha_end = float(process.alpha(t_end))
        if not self._alpha_end > 0:
            raise ValueError(f"t_min must have alpha > 0, got alpha({t_min}) = {self._alpha_end}")
        self._kappa = float(process.sigma(t_end)) / self._alpha_end

    def forward(self, x: Tensor, t) -> Tensor:
        check = Deferred()
        check.finite(x, "x")
        t_ = check.time(t, like=x)
        check.done()
        a, s = per_sample(self.process.alpha(t_), x), per_sample(self.process.sigma(t_), x)
        c_skip, c_out, c_in = _edm_scalings(a, s, self.sigma_data, self._kappa, self._alpha_end)
        return c_skip * x + c_out * returned(self.net(c_in * x, t), x, "net")


class TrajectoryModel(nn.Module):
    r"""CTM's two-time map :math:`G(x, t, s) \approx \Phi(x, t, s)`: a DDIM step with a learned, two-time denoiser.

    .. math::
        G(x, t, s) &= \frac{\sigma_s}{\sigma_t}\,x
                     + \Big(\alpha_s - \alpha_t\frac{\sigma_s}{\sigma_t}\Big)\,g(x, t, s), \\
        g &= c_{\rm skip}(t)\,x + c_{\rm out}(t)\,F(c_{\rm in}(t)\,x, t, s),

    with EDM's denoiser coefficients (:class:`ConsistencyModel` with :math:`\kappa = 0`).  For
    ``VE`` (:math:`\alpha = 1`) this is Kim et al.'s (2024) :math:`G = \frac st x + (1 - \frac
    st) g` with their time, the noise level: :math:`s/t = \sigma_s/\sigma_t`.  :math:`G(x, t, t) = x` exactly, and
    :math:`G(x, t, s) = g` where :math:`\sigma_s = 0`.  ``net(x, t, s)`` is any two-time network
    (:class:`TwoTimeMLP`).  Shapes: ``forward(x, t, s)`` with ``x`` ``(B, ...)``, ``t``, ``s``
    floats, ``()`` or ``(B,)``, ``s <= t``; returns ``(B, ...)``.
    """

    def __init__(self, net: nn.Module, process: Process, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.process = net, process
        self.sigma_data = positive(sigma_data, "sigma_data")

    def forward(self, x: Tensor, t, s) -> Tensor:
        check = Deferred()
        check.finite(x, "x")
        t_, s_ = check.time(t, like=x), check.time(s, like=x, name="s")
        check.require(s_ <= t_, lambda: _later_error(s_, t_))
        check.done()
        a_t, s_t = (per_sample(c, x) for c in (self.process.alpha(t_), self.process.sigma(t_)))
        a_s, s_s = (per_sample(c, x) for c in (self.process.alpha(s_), self.process.sigma(s_)))
        # sigma_s / sigma_t, and 1 where sigma_t = 0 (then t = s = 0 and G(x, 0, 0) = x)
        ratio = torch.where(s_t > 0, s_s / torch.where(s_t > 0, s_t, torch.ones_like(s_t)), 1.0)
        c_skip, c_out, c_in = _edm_scalings(a_t, s_t, self.sigma_data)
        g = c_skip * x + c_out * returned(self.net(c_in * x, t, s), x, "net")
        return ratio * x + (a_s - a_t * ratio) * g


def _later_error(s: Tensor, t: Tensor) -> ValueError:
    """The error for a target time ``s`` after the state's time ``t`` (G maps towards data)."""
    s_, t_ = torch.broadcast_tensors(s, t)
    bad = s_ > t_
    first = tuple(int(i) for i in bad.nonzero()[0]) if bad.ndim else ()
    return ValueError(
        f"s must be <= t (G(x, t, s) maps towards the data), got s = {float(s_[first]):.6g} > "
        f"t = {float(t_[first]):.6g}"
    )


# -- shared pieces of the losses ---------------------------------------------------------------
def _draw(draw: Callable, shape, generator, like: Tensor, **kw) -> Tensor:
    device = generator.device if generator is not None else like.device
    return draw(*shape, generator=generator, device=device, **kw).to(like.device)


def _grid(ts, x0: Tensor, name: str = "x0") -> Tensor:
    """The checked grid ``ts`` in ``x0``'s dtype, after checking ``x0`` (finite data)."""
    finite(x0, name)
    ts = check_time_grid(ts)
    return ts.to(dtype=x0.dtype, device=x0.device)


def _check_end(model, ts: Tensor, name: str) -> None:
    t_min = getattr(model, "t_min", None)
    # equal up to the rounding of t_min in the grid's dtype (float32 stores 0.002 inexactly)
    if t_min is not None and abs(t_min - float(ts[-1])) > 2 * torch.finfo(ts.dtype).eps:
        raise ValueError(
            f"ts must end at the consistency model's t_min = {t_min}, got ts[-1] = "
            f"{float(ts[-1])} for {name}"
        )


def _marginal(process: Process, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return per_sample(process.alpha(t), x0) * x0 + per_sample(process.sigma(t), x0) * noise


def _teacher_solve(solver, denoiser, x, start: Tensor, stop: Tensor, ts: Tensor, process):
    """Each sample of ``x`` from ``ts[start]`` to ``ts[stop]``, one grid step per solver call."""
    x = x.clone()
    for m in range(int(start.min()), int(stop.max())):
        active = (start <= m) & (stop > m)
        if bool(active.any()):
            part = x[active]
            x[active] = returned(solver(denoiser, part, ts[m : m + 2], process), part, "teacher")
    return x


def _frozen(model: Callable) -> Callable:
    """``model`` with its parameters detached: gradients reach its input, not its weights."""
    if not isinstance(model, nn.Module):
        return model
    params = {k: v.detach() for k, v in model.named_parameters()}
    return lambda *args: torch.func.functional_call(model, params, args)


def _squared(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).flatten(1).sum(1).mean()


def with_ema_target(loss: Callable, student: nn.Module, decay: float = 0.9) -> Callable:
    r"""``loss(model, target, x0, generator)`` as a loss of ``(model, x0, generator)`` for
    :func:`diffcore.train.fit`, with the target network :math:`\theta^-` of consistency models
    and CTM: an exponential moving average of the student's weights (``train.EMA``,
    bias-corrected), folded in and copied to a frozen copy of ``student`` before each loss.

    After :math:`n` calls with student weights :math:`\theta_1, \dots, \theta_n` (and
    :math:`\theta_0` at construction), the target holds
    :math:`\sum_k \beta^{n-k}\theta_k / \sum_k \beta^{n-k}`; ``decay = 0`` makes it the
    student itself, without gradient.  The target is ``with_ema_target(...).target``.
    """
    if not isinstance(student, nn.Module):
        raise ValueError(f"student must be an nn.Module, got {type(student).__name__}")
    average = EMA(student, decay)
    target = copy.deepcopy(student).requires_grad_(False)

    def loss_with_target(model: nn.Module, x0: Tensor, generator=None) -> Tensor:
        average.update(model)
        average.copy_to(target)
        return loss(model, target, x0, generator)

    loss_with_target.target = target
    return loss_with_target


# -- consistency models ------------------------------------------------------------------------
def _consistency_loss(student, target, x_t, t, x_s, s) -> Tensor:
    with torch.no_grad():
        y = returned(target(x_s, s), x_s, "target")
    return _squared(returned(student(x_t, t), x_t, "student"), y)


def consistency_distillation_loss(
    student: Callable,
    target: Callable,
    teacher_denoiser: Callable,
    x0: Tensor,
    process: Process,
    ts: Tensor,
    teacher="heun",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Consistency distillation (Song et al., 2023): :math:`\lVert f_\theta(x_{t_i}, t_i) - f_{\theta^-}(\hat x_{t_{i+1}}, t_{i+1})\rVert^2`.

    ``ts`` is a decreasing grid ending at the consistency model's :math:`t_{\min}`.  Per
    sample: an index ``i`` uniform in ``0..N-1``, :math:`x_{t_i} = \alpha x_0 + \sigma z`, one
    step of the ``teacher`` solver with ``teacher_denoiser`` to :math:`\hat x_{t_{i+1}}`, and
    the target network ``target`` (:math:`\theta^-`: an EMA copy, or ``student`` itself for a
    stop-gradient) evaluated there without gradient.  The squared distance is summed over the
    data dimensions and averaged over the batch.  With an exact teacher and
    :math:`f = \Phi(\cdot, \cdot, t_{\min})` the loss is zero.  Draws: ``i``, then ``z``.
    Shapes: ``x0`` ``(B, ...)``; returns a scalar.
    """
    run = _solver(teacher)
    ts = _grid(ts, x0)
    _check_end(student, ts, "the student")
    i = _draw(torch.randint, (len(ts) - 1, (x0.shape[0],)), generator, x0)
    x_t = _marginal(process, x0, ts[i], _draw(torch.randn, x0.shape, generator, x0, dtype=x0.dtype))
    with torch.no_grad():
        x_s = _teacher_solve(run, teacher_denoiser, x_t, i, i + 1, ts, process)
    return _consistency_loss(student, target, x_t, ts[i], x_s, ts[i + 1])


def consistency_training_loss(
    student: Callable,
    target: Callable,
    x0: Tensor,
    process: Process,
    ts: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Consistency training (Song et al., 2023): distillation with :math:`x_0` itself as the teacher.

    The one-sample estimate of the denoiser, :math:`D(x_{t_i}) \approx x_0` (the score
    :math:`-(x - \alpha x_0)/\sigma^2`), makes the PF-ODE linear, solved exactly by
    :math:`\hat x_{t_{i+1}} = \alpha_{t_{i+1}} x_0 + \sigma_{t_{i+1}} z` with the same ``z``
    as :math:`x_{t_i}`.  Its conditional mean given :math:`x_{t_i}` is the DDIM step with the
    exact denoiser, so for data whose flow map is affine (Gaussian) the expected loss is
    distillation with a DDIM teacher plus a term free of the student.  Otherwise as
    :func:`consistency_distillation_loss`.  Shapes: ``x0`` ``(B, ...)``; returns a scalar.
    """
    ts = _grid(ts, x0)
    _check_end(student, ts, "the student")
    i = _draw(torch.randint, (len(ts) - 1, (x0.shape[0],)), generator, x0)
    z = _draw(torch.randn, x0.shape, generator, x0, dtype=x0.dtype)
    x_t, x_s = _marginal(process, x0, ts[i], z), _marginal(process, x0, ts[i + 1], z)
    return _consistency_loss(student, target, x_t, ts[i], x_s, ts[i + 1])


def _renoise(process: Process, x: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    r"""A draw of :math:`x_t \mid x_s` (``s <= t``) by the forward process, the shared
    :func:`~diffcore.stepping.noising_step`:
    :math:`(\alpha_t/\alpha_s) x_s + \sigma_t\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}}\,z`."""
    low, high = grid_points(process, torch.stack([s, t]).reshape(2), x)
    return noising_step(x, low, high, noise)


def consistency_sample(
    f: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    callback: Callable | None = None,
) -> Tensor:
    r"""Multistep consistency sampling (Song et al., 2023, Alg. 1).

    ``ts = [T, tau_1, ..., tau_{k-1}, t_min]``: jump :math:`x \leftarrow f(x, T)` to
    :math:`t_{\min}`, then for each :math:`\tau`, noise forward to :math:`\tau`
    (:math:`x_\tau = (\alpha_\tau/\alpha_{t_{\min}})x + \sqrt{\sigma_\tau^2 -
    (\alpha_\tau\sigma_{t_{\min}}/\alpha_{t_{\min}})^2}\,z`) and jump again.  ``ts = [T,
    t_min]`` is one-step generation.  Noise: ``noise_sampler(i, shape)`` for the renoising
    before :math:`f(\cdot, \tau_{i+1})`, else ``torch.randn`` with ``generator``.
    ``callback(step)`` sees each jump's sample (:class:`~diffcore.stepping.Step` at ``ts[-1]``).
    Shapes: ``x`` ``(B, ...)`` at ``ts[0]``; returns ``(B, ...)`` at ``ts[-1]``.
    """
    ts = _grid(ts, x, "x")
    _check_end(f, ts, "f")
    noise = noise_source(x, generator, noise_sampler)
    x = returned(f(x, ts[0]), x, "f")
    emit(callback, Step(0, ts[-1], x, x, 1))
    for i, tau in enumerate(ts[1:-1]):
        x = f(_renoise(process, x, ts[-1], tau, noise(i)), tau)
        emit(callback, Step(i + 1, ts[-1], x, x, i + 2))
    return x


# -- consistency trajectory models -------------------------------------------------------------
def ctm_loss(
    G: Callable,
    target: Callable,
    teacher_denoiser: Callable,
    x0: Tensor,
    process: Process,
    ts: Tensor,
    teacher="heun",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""CTM's soft consistency matching (Kim et al., 2024, eq. 6), compared at the end time ``ts[-1]``.

    Per sample, grid indices ``i < k <= j``: :math:`t = t_i` uniform over ``ts[:-1]``,
    :math:`s = t_j` uniform after it, :math:`u = t_k` uniform in :math:`(t, s]`.  From
    :math:`x_t = \alpha_t x_0 + \sigma_t z`, the teacher solves to :math:`u` (``k - i`` steps)
    and the target network finishes the trip:

    .. math::
        \big\lVert G_{\rm sg}(G_\theta(x_t, t, s), s, t_{\rm end})
        - G_{\rm sg}(G_{\rm sg}(\hat x_u, u, s), s, t_{\rm end})\big\rVert^2,

    where :math:`G_{\rm sg}` is ``target`` with its weights out of the gradient (the EMA, or
    ``G`` itself) and the comparison at :math:`t_{\rm end}` = ``ts[-1]`` is CTM's comparison
    at time 0, in squared :math:`L_2` instead of a feature distance.  ``u = s`` is global
    consistency, ``u = t_{i+1}`` local.  With an exact teacher and :math:`G = \Phi` the loss
    is zero.  CTM's auxiliary DSM and GAN terms are left out.  Draws: ``i``, ``j``, ``k``,
    then ``z``.  Shapes: ``x0`` ``(B, ...)``; returns a scalar.
    """
    run = _solver(teacher)
    ts = _grid(ts, x0)
    n, batch = len(ts) - 1, x0.shape[0]
    i = _draw(torch.randint, (n, (batch,)), generator, x0)
    j = i + 1 + (_draw(torch.rand, (batch,), generator, x0, dtype=torch.float64) * (n - i)).long()
    k = i + 1 + (_draw(torch.rand, (batch,), generator, x0, dtype=torch.float64) * (j - i)).long()
    x_t = _marginal(process, x0, ts[i], _draw(torch.randn, x0.shape, generator, x0, dtype=x0.dtype))
    end = ts[-1].expand(batch)
    with torch.no_grad():
        x_u = _teacher_solve(run, teacher_denoiser, x_t, i, k, ts, process)
        y = returned(target(x_u, ts[k], ts[j]), x_u, "target")
        y = returned(target(y, ts[j], end), y, "target")
    jump = returned(G(x_t, ts[i], ts[j]), x_t, "G")
    return _squared(_frozen(target)(jump, ts[j], end), y)


def ctm_sample(
    G: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    callback: Callable | None = None,
) -> Tensor:
    r"""CTM's :math:`\gamma`-sampling (Kim et al., 2024, Alg. 3): jump below the next time, noise back up.

    From :math:`t_i` to :math:`t_{i+1}`: jump to the time :math:`s` whose noise level is
    :math:`\bar\sigma_s = \sqrt{1 - \gamma^2}\,\bar\sigma_{t_{i+1}}` (:math:`\bar\sigma =
    \sigma/\alpha`; :math:`s` clipped to ``ts[-1]``), :math:`x \leftarrow G(x, t_i, s)`, then
    noise forward from :math:`s` to :math:`t_{i+1}`; the last step jumps to ``ts[-1]``.
    ``gamma = 0`` is deterministic (:math:`x \leftarrow G(x, t_i, t_{i+1})`), ``gamma = 1`` is
    :func:`consistency_sample` with :math:`f = G(\cdot, \cdot, t_{\rm end})`.  For VE the
    renoising is CTM's :math:`x + \gamma\,\sigma_{t_{i+1}} z`.  Shapes: ``x`` ``(B, ...)`` at ``ts[0]``;
    returns ``(B, ...)`` at ``ts[-1]``; ``callback(step)`` sees each step.
    """
    gamma = between(gamma, "gamma", 0, 1)
    ts = _grid(ts, x, "x")
    noise = noise_source(x, generator, noise_sampler)
    n = len(ts) - 1
    for i in range(n):
        t, t_next = ts[i], ts[i + 1]
        if gamma == 0 or i == n - 1:
            x = returned(G(x, t, t_next), x, "G")
        else:
            if gamma == 1:
                s = ts[-1]
            else:  # lam_s = lam_{t_next} - log sqrt(1 - gamma^2)
                lam = process.lam(t_next) - 0.5 * math.log1p(-(gamma**2))
                s = process.t_of_lam(lam).clamp(min=ts[-1], max=t_next)
            x = _renoise(process, returned(G(x, t, s), x, "G"), s, t_next, noise(i))
        emit(callback, Step(i, t_next, x, None, i + 1))
    return x


# -- MeanFlow ----------------------------------------------------------------------------------
def total_derivative(u: Callable, z: Tensor, t: Tensor, s, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""``u(z, t, s)`` and its total time derivative along the flow, by one Jacobian-vector product.

    .. math:: \frac{d}{dt}u(z_t, t, s) = \partial_z u\;v + \partial_t u,

    the JVP of :math:`(z, t) \mapsto u(z, t, s)` in the direction :math:`(v, 1)`
    (``torch.func.jvp``, forward mode: one extra pass, no Jacobian).  ``s`` is held fixed.
    The value keeps its graph (to train through it); the derivative does too, for the caller
    to detach.  Shapes: ``z``, ``v`` ``(B, ...)``; ``t`` ``()`` or ``(B,)``; ``s`` a float,
    ``()`` or ``(B,)``; returns two ``(B, ...)``.
    """
    t = as_time(t, like=z)
    with warnings.catch_warnings():
        # torch's first forward-mode call scripts its JVP decompositions and warns that
        # torch.jit.script is deprecated: torch's own code, nothing to act on here
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        return torch.func.jvp(
            lambda z_, t_: returned(u(z_, t_, s), z_, "u"), (z, t), (v, torch.ones_like(t))
        )


def meanflow_loss(
    u: Callable,
    x0: Tensor,
    process: Process | None = None,
    p_equal: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""MeanFlow (Geng et al., 2025): regress :math:`u_\theta(z_t, t, s)` on the MeanFlow identity.

    Differentiating :math:`(t - s)\,u(z_t, t, s) = \int_s^t v\,d\tau` in ``t`` gives

    .. math:: u(z_t, t, s) = v(z_t, t) - (t - s)\,\frac{d}{dt}u(z_t, t, s),

    and the loss is :math:`\lVert u_\theta - \operatorname{sg}(v_c - (t - s)\,\tfrac{d}{dt}
    u_\theta)\rVert^2` with the conditional velocity :math:`v_c = \dot\alpha_t x_0 +
    \dot\sigma_t\varepsilon` (:math:`\varepsilon - x_0` for ``Linear``, the default process)
    and the total derivative by :func:`total_derivative`; the stop-gradient ``sg`` keeps
    second derivatives out.  As in flow matching, :math:`v_c` may replace the marginal
    velocity because the target is linear in it.  Times: two uniform draws on [0, 1),
    :math:`t` the larger; with probability ``p_equal`` (the paper's 75 %), :math:`s = t` and
    the loss is flow matching.  Plain squared error (the paper's adaptive weighting is left
    out).  Draws: the times, the ``p_equal`` coin, then :math:`\varepsilon`.  Shapes: ``x0``
    ``(B, ...)``; returns a scalar.
    """
    p_equal = between(p_equal, "p_equal", 0, 1)
    finite(x0, "x0")
    process = process or Linear()
    batch = x0.shape[0]
    pair = _draw(torch.rand, (batch, 2), generator, x0, dtype=x0.dtype)
    t, s = pair.max(dim=1).values, pair.min(dim=1).values
    equal = _draw(torch.rand, (batch,), generator, x0, dtype=x0.dtype) < p_equal
    s = torch.where(equal, t, s)
    eps = _draw(torch.randn, x0.shape, generator, x0, dtype=x0.dtype)
    a, sig, da, ds = (
        per_sample(c, x0)
        for c in (process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t))
    )
    z, v = a * x0 + sig * eps, da * x0 + ds * eps
    value, du_dt = total_derivative(u, z, t, s, v)
    target = (v - per_sample(t - s, x0) * du_dt).detach()
    return _squared(value, target)


def meanflow_sample(u: Callable, x: Tensor, ts: Tensor, *, callback=None) -> Tensor:
    r"""MeanFlow sampling: :math:`z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1})\,u(z_{t_i}, t_i, t_{i+1})`.

    Exact for the exact average velocity, whatever the steps; ``ts = [1, 0]`` is one-step
    generation.  ``callback(step)`` sees each step.  Shapes: ``x`` ``(B, ...)`` at ``ts[0]``;
    returns ``(B, ...)`` at ``ts[-1]``.
    """
    ts = _grid(ts, x, "x")
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        x = x - (t - s) * returned(u(x, t, s), x, "u")
        emit(callback, Step(i, s, x, None, i + 1))
    return x
