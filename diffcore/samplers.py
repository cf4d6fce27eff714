r"""Samplers: one signature for all, ``sampler(model, x, ts, process, **options)``.

``model(x, t)`` is the denoiser :math:`D(x, t) \approx \mathbb E[x_0 \mid x_t = x]` (see
:func:`diffcore.targets.as_denoiser`), ``x`` the start state at time ``ts[0]``
(``process.prior_sample``, or an exact sample of :math:`p_{t_0}`), and ``ts`` a strictly
decreasing 1-D tensor of times from :func:`time_grid`.  Each sampler is its update, the
monograph's formula for one step from :math:`t = t_i` to :math:`s = t_{i+1}`, handed to the
stepping engine :func:`diffcore.stepping.integrate`, which owns the rest.  So every sampler

- returns the state *at* ``ts[-1]`` (an :math:`x_{t_{\min}}`, not a denoised sample, unless
  ``t_min = 0`` and :math:`\sigma_0 = 0`); with ``denoise_last=True``, :math:`D(x, t_{\min})`;
- takes the engine's options: ``generator`` and ``noise_sampler(i, shape)`` (the noise; the
  deterministic samplers ignore them), ``callback(step)`` (a
  :class:`~diffcore.stepping.Step` after every step; :class:`~diffcore.stepping.Trace` records
  a run and counts its model calls), ``denoise_last`` and ``progress``;
- is listed in :data:`SAMPLERS` with its facts (:class:`Sampler`: order, model calls per step,
  stochastic or not, options), which :func:`model_calls`, the tests and the benchmarks read.

In an update, ``k.t`` and ``k.s`` are the two ends (:class:`~diffcore.stepping.Point`: ``alpha``,
``sigma``, ``lam``, their derivatives), ``k.h`` :math:`= \lambda_s - \lambda_t > 0`, ``k.D(x)``
the model, ``k.noise()`` standard normal noise and ``k.history`` the earlier steps.  The
exponential integrators integrate the linear part of the PF-ODE in data prediction exactly,

.. math:: x_s = \frac{\sigma_s}{\sigma_t}x_t + \sigma_s\int_{\lambda_t}^{\lambda_s}e^{\lambda}
    \hat x_0(\lambda)\,d\lambda,

and differ in how they approximate :math:`\hat x_0` along the step; their coefficients are the
small functions :func:`phi1`, :func:`phi2`, :func:`phi3`.  A step whose :math:`h` is infinite
(to :math:`\sigma = 0` at ``t = 0``, or from :math:`\alpha = 0` at ``t = 1`` for
:class:`~diffcore.processes.Linear`) is taken at first order, the exact limit
:math:`x_s = \alpha_s\hat x_0`, as in k-diffusion.

Replacing the noise through ``noise_sampler`` is what lets
:func:`diffcore.metrics.sampler_output_law` treat it as an input and compute a sampler's exact
output law on Gaussian data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffcore.checks import between, count, finite, nonnegative, one_of, positive, real, require
from diffcore.inversion import bdia  # registered below; it lives beside its inverse
from diffcore.processes import Process
from diffcore.stepping import (  # Step, Trace, check_time_grid: re-exported for callers here
    Point,
    ddim_step,
    eps_hat,
    grid_points,
    integrate,
    noising_step,
)
from diffcore.stepping import (
    Step as Step,
)
from diffcore.stepping import (
    Trace as Trace,
)
from diffcore.stepping import (
    check_time_grid as check_time_grid,
)

__all__ = [
    "time_grid",
    "model_calls",
    "Sampler",
    "phi1",
    "phi2",
    "phi3",
    "velocity",
    "exponential_euler",
    "dpmpp_3m_weights",
    "euler",
    "heun",
    "ddpm",
    "ddim",
    "euler_maruyama",
    "pc",
    "annealed_langevin",
    "dpm_solver_1",
    "dpm_solver_2",
    "dpm_solver_3",
    "dpmpp_2m",
    "dpmpp_3m",
    "unipc",
    "plms",
    "evodiff",
    "lm_direction",
    "lml_hessian",
    "lml",
    "LML_PREDICTIONS",
    "gaussian_skip",
    "SAMPLERS",
    "GRIDS",
]

#: The kinds of time grid that :func:`time_grid` builds.
GRIDS = ("uniform", "logsnr", "karras", "quadratic")


def time_grid(
    process: Process,
    n: int,
    kind: str = "uniform",
    t_min: float = 1e-3,
    t_max: float = 1.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""``n`` steps from ``t_max`` down to ``t_min``: a decreasing tensor of ``n + 1`` times.

    Kinds:

    - ``"uniform"``: equal steps in ``t``;
    - ``"logsnr"``: equal steps in :math:`\lambda_t` (the natural grid of DPM-Solver);
    - ``"karras"``: EDM's grid (Karras et al., 2022) in the noise level
      :math:`\bar\sigma_t = \sigma_t / \alpha_t = e^{-\lambda_t}`, equal steps in
      :math:`\bar\sigma^{1/\rho}`; for :class:`~diffcore.processes.VE` this is EDM exactly;
    - ``"quadratic"``: steps that shrink linearly towards ``t_min`` (DDIM's quadratic grid).

    ``ts[0] == t_max`` and ``ts[-1] == t_min`` exactly.  ``t_min > 0`` keeps the last time
    where :math:`\sigma_t > 0` (for VP and Linear, :math:`\lambda_0 = \infty`); the sample is
    then an :math:`x_{t_{\min}}`, and ``denoise_last=True`` in the sampler maps it to data.
    ``t_min = 0`` is allowed: the last step of each sampler is then its limit at
    :math:`\sigma = 0`.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive integer number of steps, got n = {n!r}")
    if kind not in GRIDS:
        raise ValueError(f"kind must be one of {GRIDS}, got kind = {kind!r}")
    if not (0 <= t_min < t_max <= 1):
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min = {t_min}, t_max = {t_max}")
    u = torch.linspace(0, 1, n + 1, dtype=dtype)  # 0 at t_max, 1 at t_min
    ends = torch.tensor([t_max, t_min], dtype=dtype)
    lam_ends = process.lam(ends)
    if kind in ("logsnr", "karras") and not bool(torch.isfinite(lam_ends[0])):
        raise ValueError(
            f"kind={kind!r} needs a finite log-SNR at t_max, but {process!r} has "
            f"lam({t_max}) = {float(lam_ends[0])}: take t_max < {t_max}"
        )
    if kind == "logsnr" and not bool(torch.isfinite(lam_ends[1])):
        raise ValueError(
            f"kind='logsnr' needs a finite log-SNR at t_min, but {process!r} has "
            f"lam({t_min}) = {float(lam_ends[1])}: take t_min > {t_min}"
        )
    if kind == "uniform":
        ts = t_max + u * (t_min - t_max)
    elif kind == "quadratic":
        ts = t_min + (t_max - t_min) * (1 - u) ** 2
    elif kind == "logsnr":
        lam_start, lam_end = lam_ends
        ts = process.t_of_lam(lam_start + u * (lam_end - lam_start))
    else:
        if not rho > 0:
            raise ValueError(f"rho must be positive, got rho = {rho}")
        s_max, s_min = torch.exp(-lam_ends)
        noise = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        ts = process.t_of_lam(-torch.log(noise))
    ts = ts.clamp(0, 1)
    ts[0], ts[-1] = t_max, t_min  # exact ends, free of round-off in t_of_lam
    return check_time_grid(ts)


# -- the pieces the updates share -------------------------------------------------------------
def phi1(h: float) -> float:
    r""":math:`\varphi_1(h) = 1 - e^{-h} = \int_0^h e^{u - h}\,du`: the weight of a frozen
    :math:`\hat x_0` over a step of log-SNR length :math:`h` (1 at :math:`h = \infty`)."""
    return -math.expm1(-h)


def phi2(h: float) -> float:
    r""":math:`\varphi_2(h) = 1 - \varphi_1(h)/h`, with :math:`h\varphi_2(h) = \int_0^h
    e^{u - h}u\,du`: the weight of the first divided difference of :math:`\hat x_0`."""
    return math.expm1(-h) / h + 1


def phi3(h: float) -> float:
    r""":math:`\varphi_3(h) = \varphi_2(h)/h - 1/2`, with :math:`-h^2\varphi_3(h) =
    \int_0^h e^{u - h}\tfrac{u^2}{2}du`: the weight of the second divided difference."""
    return phi2(h) / h - 0.5


def velocity(x: Tensor, x0: Tensor, t: Point) -> Tensor:
    r"""The PF-ODE velocity :math:`u = \dot\alpha_t\hat x_0 + \dot\sigma_t\hat\varepsilon` at the
    point ``t``, from the state and its estimate of :math:`x_0`.  Shapes: ``(batch, ...)``."""
    # = (sigma'/sigma) x + (alpha' - sigma' alpha / sigma) x0, in two fused passes
    c_x = t.d_sigma / t.sigma
    return torch.add(x * c_x, x0, alpha=t.d_alpha - c_x * t.alpha)


def exponential_euler(x: Tensor, x0: Tensor, t: Point, s: Point) -> Tensor:
    r"""The first-order exponential step (DDIM, DPM-Solver-1) from ``t`` to ``s`` with
    :math:`\hat x_0` frozen: :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t +
    \alpha_s\varphi_1(\lambda_s - \lambda_t)\hat x_0`.  Shapes: ``(batch, ...)``."""
    return torch.add(x * (s.sigma / t.sigma), x0, alpha=s.alpha * phi1(s.lam - t.lam))


def _inner_points(process: Process, ts: Tensor, r: float, like: Tensor) -> list[Point]:
    """The points at log-SNR lam_i + r h_i inside each step (t_i itself where h is infinite)."""
    lam = process.lam(ts.to(torch.float64))
    h = lam.diff()
    finite = torch.isfinite(h)
    inside = torch.where(finite, lam[:-1] + r * h, torch.zeros_like(h))
    t_mid = torch.where(finite, process.t_of_lam(inside), ts[:-1].to(torch.float64)).clamp(0, 1)
    return grid_points(process, t_mid, like)


def _need_positive_alpha(name: str, process: Process, ts: Tensor, why: str) -> None:
    a0 = float(process.alpha(ts[:1].to(torch.float64)))
    if a0 <= 0:
        raise ValueError(
            f"{name} needs alpha > 0 on the grid ({why}), got alpha(ts[0]) = {a0:.6g} at "
            f"ts[0] = {float(ts[0]):.6g}: take t_max < {float(ts[0]):.6g}"
        )


def _checked_grid(ts: Tensor, x: Tensor) -> Tensor:
    """The checked grid in float64, ``x`` checked too: samplers that precompute on the grid
    call this first, so that bad input is refused before any work."""
    finite(x, "x")
    return check_time_grid(ts).to(torch.float64)


# -- PF-ODE solvers in t -----------------------------------------------------------------------
def euler(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""Euler's method on the PF-ODE: :math:`x_s = x_t + (s - t)\,u(x_t, t)`, with the velocity
    :math:`u = \dot\alpha_t\hat x_0 + \dot\sigma_t\hat\varepsilon` (:func:`velocity`).

    Order 1; one model call per step.  ``run``: the engine's options (module docstring).
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """

    def update(k, x):
        return torch.add(x, velocity(x, k.D(x), k.t), alpha=k.s.t - k.t.t)  # x + (s - t) u

    return integrate(update, model, x, ts, process, **run)


def _churn(process: Process, ts: Tensor, s_churn, s_tmin, s_tmax) -> Tensor:
    """EDM's raised times t_hat_i >= t_i: noise level sigma/alpha times (1 + gamma_i)."""
    n = len(ts) - 1
    lam_t = process.lam(ts[:-1])
    level = torch.exp(-lam_t)  # sigma / alpha, the sigma of EDM
    inside = (level >= s_tmin) & (level <= s_tmax) & torch.isfinite(lam_t)
    gamma = torch.where(inside, min(s_churn / n, math.sqrt(2) - 1), 0.0)
    raised = process.t_of_lam(torch.where(inside, lam_t - torch.log1p(gamma), 0.0))
    return torch.where(gamma > 0, raised.clamp(max=1.0), ts[:-1])


def heun(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    **run,
) -> Tensor:
    r"""Heun's method (explicit trapezoid) on the PF-ODE, with EDM's churn (Karras et al., 2022, Alg. 2).

    :math:`\tilde x = x_t + (s - t)\,u(x_t, t)`, then
    :math:`x_s = x_t + \tfrac{s - t}2\,(u(x_t, t) + u(\tilde x, s))`.  A step that ends where
    :math:`\sigma_s = 0` is an Euler step, since the velocity is not defined there.  Order 2;
    two model calls per step, one fewer when ``ts[-1]`` has :math:`\sigma = 0`.  The steps are
    taken in ``t`` on ``x``, as EDM's Algorithm 1 does in a process's own time.  EDM's
    recommended sampler (and the Heun of k-diffusion and diffusers) steps instead in the noise
    level :math:`\bar\sigma = \sigma_t/\alpha_t` on :math:`x/\alpha_t`; the two coincide where
    :math:`\alpha_t = 1` and :math:`\sigma_t = t`, not for :class:`~diffcore.processes.VE`,
    whose :math:`\sigma_t` is exponential in ``t``, nor for VP.  In those variables Euler's
    method is :func:`ddim`.

    Churn (``s_churn > 0``): before step ``i``, where EDM's noise level
    :math:`\bar\sigma_i = \sigma_i/\alpha_i` lies in ``[s_tmin, s_tmax]``, the state is moved up
    to the noisier :math:`\hat t_i` with :math:`\bar\sigma_{\hat t} = (1 + \gamma)\bar\sigma_i`,
    :math:`\gamma = \min(s_{\text{churn}}/N, \sqrt2 - 1)`, by the forward process itself
    (:func:`~diffcore.stepping.noising_step`, noise scaled by ``s_noise``); the Heun step then
    runs from :math:`\hat t_i` to :math:`t_{i+1}`.  For VE this is EDM's
    :math:`\hat x = x + \sqrt{\hat\sigma^2 - \sigma^2}\,S_{\text{noise}} z` exactly;
    :math:`\hat t` is capped at 1.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        require(real(value, name) >= 0, name, value, "finite and >= 0")
    require(
        isinstance(s_tmax, (int, float)) and s_tmax >= s_tmin,
        "s_tmax",
        s_tmax,
        f">= s_tmin = {s_tmin}",
    )
    raised = None
    if s_churn > 0:
        ts = _checked_grid(ts, x)
        raised = grid_points(process, _churn(process, ts, s_churn, s_tmin, s_tmax), x)

    def update(k, x):
        t = k.t
        if raised is not None and raised[k.i].t > k.t.t:  # churn: noise up to t_hat
            t = raised[k.i]
            x = noising_step(x, k.t, t, k.noise(s_noise))
        dt = k.s.t - t.t
        u = velocity(x, k.D(x, t), t)
        x_euler = torch.add(x, u, alpha=dt)  # x + dt u
        if k.s.sigma == 0:
            return x_euler
        u_s = velocity(x_euler, k.D(x_euler, k.s), k.s)
        return torch.add(x, u.add_(u_s), alpha=dt / 2)  # x + dt (u + u_s) / 2

    return integrate(update, model, x, ts, process, **run)


# -- stochastic samplers ---------------------------------------------------------------------
def ddpm(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""DDPM ancestral sampling (Ho et al., 2020): :math:`x_s \sim q(x_s \mid x_t, x_0 = \hat x_0)`.

    For :math:`s < t` the forward process gives :math:`x_t \mid x_s \sim
    \mathcal N(\alpha_{t|s} x_s, \sigma_{t|s}^2 I)` with :math:`\alpha_{t|s} = \alpha_t/\alpha_s`,
    :math:`\sigma_{t|s}^2 = \sigma_t^2(1 - e^{-2h})`, :math:`h = \lambda_s - \lambda_t`, and the
    Gaussian posterior

    .. math::
        x_s = \alpha_s\hat x_0 + \sigma_s e^{-h}\,\hat\varepsilon + \sigma_s\sqrt{1 - e^{-2h}}\,z,

    the DDIM transition with :math:`\eta = 1` (:func:`~diffcore.stepping.ddim_step`).  Any
    process; one model call per step; first order in law.  Shapes: ``x`` ``(batch, ...)``;
    returns the same.
    """

    def update(k, x):
        x0 = k.D(x)
        return ddim_step(x, x0, k.t, k.s, eta=1.0, z=k.noise())

    return integrate(update, model, x, ts, process, **run)


def ddim(model: Callable, x: Tensor, ts: Tensor, process: Process, *, eta=0.0, **run) -> Tensor:
    r"""DDIM (Song, Meng & Ermon, 2021): keep the predicted noise, add fresh noise of std :math:`c`.

    .. math::
        x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\;\hat\varepsilon + c\,z, \qquad
        \hat\varepsilon = \frac{x_t - \alpha_t\hat x_0}{\sigma_t}, \qquad
        c = \eta\,\sigma_s\sqrt{1 - e^{-2h}},

    :math:`c` being :math:`\eta` times the DDPM posterior std.  ``eta = 0`` is deterministic, the
    exponential Euler step of the PF-ODE in data prediction (= :func:`dpm_solver_1`), order 1;
    ``eta = 1`` is DDPM ancestral sampling (:func:`ddpm`), in law and sample by sample.
    ``0 <= eta <= 1``.  One model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    require(0 <= real(eta, "eta") <= 1, "eta", eta, "in [0, 1]")

    def update(k, x):
        x0 = k.D(x)
        z = k.noise() if eta > 0 else None  # one draw per step, even where c = 0
        return ddim_step(x, x0, k.t, k.s, eta, z)

    return integrate(update, model, x, ts, process, **run)


def euler_maruyama(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""Euler–Maruyama on the reverse SDE (Song et al., 2021): :math:`dx = [f x - g^2\nabla\log p_t]dt + g\,d\bar w`.

    With :math:`dt = s - t < 0` and the score from the denoiser,
    :math:`\nabla\log p_t(x) = (\alpha_t\hat x_0 - x)/\sigma_t^2`:

    .. math:: x_s = x_t + dt\,[f(t) x_t - g^2(t)\,\nabla\log p_t(x_t)] + \sqrt{-dt\,g^2(t)}\,z.

    Needs finite :math:`f` and :math:`g^2` on ``ts[:-1]`` (for Linear, :math:`t < 1`).  Strong
    order 1/2, weak order 1; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns
    the same.
    """
    ts = _checked_grid(ts, x)
    f, g2 = process.f(ts[:-1]).tolist(), process.g2(ts[:-1]).tolist()
    for i, (f_i, g2_i) in enumerate(zip(f, g2, strict=True)):
        if not (math.isfinite(f_i) and math.isfinite(g2_i)):
            raise ValueError(
                f"euler_maruyama needs a finite SDE drift and diffusion on the grid, got "
                f"f = {f_i:.6g}, g2 = {g2_i:.6g} at ts[{i}] = {float(ts[i]):.6g} under {process!r}"
            )

    def update(k, x):
        dt, f_t, g2_t = k.s.t - k.t.t, f[k.i], g2[k.i]
        z = k.noise(math.sqrt(-dt * g2_t))
        # x + dt (f x - g2 score) + z with score = (alpha x0 - x) / sigma^2, fused:
        pull = dt * g2_t / k.t.sigma**2
        return z.add_(x, alpha=1 + dt * f_t + pull).add_(k.D(x), alpha=-pull * k.t.alpha)

    return integrate(update, model, x, ts, process, **run)


def pc(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    snr: float = 0.16,
    n_corrector: int = 1,
    **run,
) -> Tensor:
    r"""Predictor–corrector sampling (Song et al., 2021, Alg. 2–3): Langevin corrector, ancestral predictor.

    At each :math:`t_i`: ``n_corrector`` Langevin steps on :math:`p_{t_i}`,
    :math:`x \leftarrow x + \epsilon\nabla\log p_{t_i}(x) + \sqrt{2\epsilon}\,z` with
    :math:`\nabla\log p_t = (\alpha_t\hat x_0 - x)/\sigma_t^2`, then one :func:`ddpm` step to
    :math:`t_{i+1}`.  Step size: the paper sets
    :math:`\epsilon = 2\alpha_i(r\lVert z\rVert/\lVert\nabla\log p\rVert)^2` from the norms of
    the batch (:math:`r` = ``snr``); here the norms are replaced by their values for pure noise,
    :math:`\lVert z\rVert^2 = d`, :math:`\lVert\nabla\log p_t\rVert^2 = d/\sigma_t^2`, and
    the VP factor :math:`\alpha_i = 1 - \beta_i \approx 1` is dropped, giving
    :math:`\epsilon = 2(r\sigma_t)^2`, i.e. :math:`x \leftarrow x + 2r^2(\alpha_t\hat x_0 - x)
    + 2r\sigma_t z`.  This keeps the step independent of the batch and the sampler affine in
    its noise on Gaussian data (so its exact law is computable).  Of the paper's predictors
    (reverse diffusion, Euler–Maruyama, ancestral sampling) the ancestral one is used here: the
    forward posterior with :math:`x_0 = \hat x_0`, defined for any process.
    ``1 + n_corrector`` model calls per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    require(0 < real(snr, "snr"), "snr", snr, "positive and finite")
    count(n_corrector, "n_corrector", low=0)
    pull = 2 * snr**2  # epsilon / sigma_t^2

    def update(k, x):
        for _ in range(n_corrector):  # Langevin on p_t
            z = k.noise(2 * snr * k.t.sigma)  # x + pull (alpha x0 - x) + z, fused:
            x = z.add_(x, alpha=1 - pull).add_(k.D(x), alpha=pull * k.t.alpha)
        z = k.noise()  # the ancestral predictor
        x0 = k.D(x)
        return ddim_step(x, x0, k.t, k.s, eta=1.0, z=z)

    return integrate(update, model, x, ts, process, **run)


def annealed_langevin(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    eps: float = 2e-5,
    n_steps_each: int = 1,
    **run,
) -> Tensor:
    r"""Annealed Langevin dynamics (NCSN; Song & Ermon, 2019, Alg. 1) over the noise levels of ``ts``.

    NCSN runs Langevin on :math:`y = x_0 + \bar\sigma\varepsilon` at decreasing noise levels
    :math:`\bar\sigma_1 > \dots > \bar\sigma_L` with steps
    :math:`\delta_i = \epsilon\,(\bar\sigma_i/\bar\sigma_L)^2`.  For any process we take
    :math:`\bar\sigma_t = \sigma_t/\alpha_t` and :math:`y = x/\alpha_t`, in which every process
    is VE; in :math:`x` the step is :math:`\alpha_t^2\delta_i = \epsilon\sigma_t^2/\bar\sigma_L^2`.
    Step ``i`` carries :math:`y` to the level :math:`s = t_{i+1}` (:math:`x \leftarrow
    (\alpha_s/\alpha_t) x`) and makes ``n_steps_each`` Langevin steps there,

    .. math::
        x \leftarrow x + c\,(\alpha_s\hat x_0 - x) + \sqrt{2c}\,\sigma_s z,
        \qquad c = \frac{\epsilon}{2\bar\sigma_L^2},

    so the levels are ``ts[1:]`` and the start ``x`` only initialises the chain.  The steps
    contract only for :math:`c < 2`, so ``eps`` must be below :math:`4\bar\sigma_L^2`; ``eps``
    is absolute, as in NCSN (2e-5 with :math:`\bar\sigma_L = 0.01`).  Needs :math:`\alpha > 0`
    and :math:`\sigma > 0` on the grid.  ``n_steps_each`` model calls per step; no order in the
    step: the output law tends, as the levels get dense, to the unadjusted-Langevin law of
    :math:`p_{t_{\min}}`, whose bias grows with ``eps``.  Shapes: ``x`` ``(batch, ...)``;
    returns the same.
    """
    require(0 < real(eps, "eps"), "eps", eps, "positive and finite")
    count(n_steps_each, "n_steps_each")
    ts = _checked_grid(ts, x)
    _need_positive_alpha("annealed_langevin", process, ts, "it anneals y = x / alpha")
    a_last, s_last = float(process.alpha(ts[-1])), float(process.sigma(ts[-1]))
    if not s_last > 0:
        raise ValueError(
            f"annealed_langevin needs sigma > 0 at the last level, got sigma(ts[-1]) = "
            f"{s_last:.6g} at ts[-1] = {float(ts[-1]):.6g}: take t_min > 0"
        )
    level_last = s_last / a_last
    require(eps < 4 * level_last**2, "eps", eps, f"< 4 (sigma/alpha)^2 = {4 * level_last**2:.6g}")
    c = eps / (2 * level_last**2)

    def update(k, x):
        x = k.s.alpha / k.t.alpha * x  # y = x / alpha stays put
        for _ in range(n_steps_each):
            z = k.noise(math.sqrt(2 * c) * k.s.sigma)  # x + c (alpha x0 - x) + z, fused:
            x = z.add_(x, alpha=1 - c).add_(k.D(x, k.s), alpha=c * k.s.alpha)
        return x

    return integrate(update, model, x, ts, process, **run)


# -- exponential integrators in log-SNR ------------------------------------------------------
def dpm_solver_1(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""DPM-Solver-1 (Lu et al., 2022): the exponential Euler step of the PF-ODE in :math:`\lambda`.

    The PF-ODE in data prediction with :math:`\hat x_0` frozen at :math:`t`
    (:func:`exponential_euler`):

    .. math:: x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1 - e^{-h})\,\hat x_0(x_t, t).

    The same as DDIM with ``eta = 0``.  Order 1; one model call per step.  Shapes: ``x``
    ``(batch, ...)``; returns the same.
    """

    def update(k, x):
        return torch.add(x * (k.s.sigma / k.t.sigma), k.D(x), alpha=k.s.alpha * phi1(k.h))

    return integrate(update, model, x, ts, process, **run)


def dpm_solver_2(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""DPM-Solver-2 (Lu et al., 2022), single-step, in data prediction (DPM-Solver++(2S), Lu et al., 2022b).

    With the point :math:`u` at :math:`\lambda_t + h/2` (its time from ``process.t_of_lam``):

    .. math::
        x_u &= \frac{\sigma_u}{\sigma_t}x_t + \alpha_u(1 - e^{-h/2})\hat x_0(x_t, t), \\
        x_s &= \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1 - e^{-h})\,\hat x_0(x_u, u),

    the exponential midpoint rule (:math:`r_1 = 1/2` in the paper's
    :math:`D_t + (D_u - D_t)/(2r_1)`).  Order 2; two model calls per step (one for a step of
    infinite :math:`h`).  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts = _checked_grid(ts, x)
    mid = _inner_points(process, ts, 0.5, x)

    def update(k, x):
        x0 = k.D(x)
        if math.isfinite(k.h):
            x0 = k.D(exponential_euler(x, x0, k.t, mid[k.i]), mid[k.i])
        return exponential_euler(x, x0, k.t, k.s)

    return integrate(update, model, x, ts, process, **run)


def dpm_solver_3(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""DPM-Solver-3 (Lu et al., 2022), single-step, in data prediction as in the reference code.

    With :math:`r_1 = 1/3`, :math:`r_2 = 2/3`, points :math:`u_k` at :math:`\lambda_t + r_k h`
    and :math:`D_u = \hat x_0(x_u, u)`:

    .. math::
        x_{u_1} &= \tfrac{\sigma_{u_1}}{\sigma_t}x_t + \alpha_{u_1}\varphi_1(r_1h)\,D_t, \\
        x_{u_2} &= \tfrac{\sigma_{u_2}}{\sigma_t}x_t + \alpha_{u_2}\varphi_1(r_2h)\,D_t
               + \tfrac{r_2}{r_1}\alpha_{u_2}\varphi_2(r_2h)(D_{u_1} - D_t), \\
        x_s &= \tfrac{\sigma_s}{\sigma_t}x_t + \alpha_s\varphi_1(h)\,D_t
               + \tfrac{1}{r_2}\alpha_s\varphi_2(h)(D_{u_2} - D_t).

    Order 3; three model calls per step (one for a step of infinite :math:`h`).  Shapes: ``x``
    ``(batch, ...)``; returns the same.
    """
    r1, r2 = 1 / 3, 2 / 3
    ts = _checked_grid(ts, x)
    inner_1, inner_2 = _inner_points(process, ts, r1, x), _inner_points(process, ts, r2, x)

    def update(k, x):
        t, s, h, d_t = k.t, k.s, k.h, k.D(x)
        if not math.isfinite(h):  # a step of infinite h: first order
            return exponential_euler(x, d_t, t, s)
        u1, u2 = inner_1[k.i], inner_2[k.i]
        d_u1 = k.D(exponential_euler(x, d_t, t, u1), u1)
        x_u2 = exponential_euler(x, d_t, t, u2)
        x_u2 = x_u2.add_(d_u1 - d_t, alpha=r2 / r1 * u2.alpha * phi2(r2 * h))
        d_u2 = k.D(x_u2, u2)
        x_s = exponential_euler(x, d_t, t, s)
        return x_s.add_(d_u2 - d_t, alpha=s.alpha * phi2(h) / r2)

    return integrate(update, model, x, ts, process, **run)


def dpmpp_2m(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""DPM-Solver++(2M) (Lu et al., 2022b, Alg. 2): multistep, second order, in data prediction.

    With :math:`r = h_{i-1}/h_i`, the last two denoisings extrapolate :math:`\hat x_0` to the step:

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1 - e^{-h})
              \Big[\big(1 + \tfrac{1}{2r}\big)D_i - \tfrac{1}{2r}D_{i-1}\Big].

    The first step, and a step of infinite :math:`h`, are first order (:func:`dpm_solver_1`), as
    in k-diffusion; the reference code's option of lower order in the final steps is left out.
    Order 2; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """

    def update(k, x):
        d = k.D(x)
        if k.history:
            d_prev, t_prev = k.history[0]
            h_prev = k.t.lam - t_prev.lam
            if math.isfinite(k.h) and math.isfinite(h_prev):
                w = k.h / (2 * h_prev)  # 1 / (2r): (1 + w) D_i - w D_{i-1}
                d = torch.add(d * (1 + w), d_prev, alpha=-w)
        return exponential_euler(x, d, k.t, k.s)

    return integrate(update, model, x, ts, process, **run)


def dpmpp_3m(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""DPM-Solver++(3M) (Lu et al., 2022b): multistep, third order, in data prediction.

    With :math:`r_0 = h_{i-1}/h_i`, :math:`r_1 = h_{i-2}/h_i`, divided differences of the last
    three denoisings estimate :math:`d_1 \approx h D'` and :math:`d_2 \approx h^2 D''/2`
    (:math:`D' = dD/d\lambda` at :math:`t_i`):

    .. math::
        \delta_0 = \frac{D_i - D_{i-1}}{r_0},\ \delta_1 = \frac{D_{i-1} - D_{i-2}}{r_1},\quad
        d_2 = \frac{\delta_0 - \delta_1}{r_0 + r_1},\ d_1 = \delta_0 + r_0 d_2,

    and the Taylor terms of :math:`\sigma_s\int e^{\lambda}D\,d\lambda` integrate exactly:

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\big[\varphi_1(h) D_i
              + \varphi_2(h) d_1 - 2\varphi_3(h) d_2\big]

    (:func:`phi1`, :func:`phi2`, :func:`phi3`).  Departure: the reference codes (DPM-Solver's
    ``multistep_dpm_solver_third_update``, k-diffusion's ``sample_dpmpp_3m_sde``) weight
    :math:`d_2` by :math:`-\varphi_3`, half the Taylor coefficient; a step then fails to
    integrate a quadratic :math:`D(\lambda)` exactly and the method is of order 2 (measured on
    the Gaussian oracle: 2.0 with their weight, 3.0 with this one;
    ``tests/test_against_diffusers.py`` runs diffusers' solver beside this one).  The first two
    steps are first and second order (their start-up error is :math:`O(\alpha_{t_1} h^2)`,
    small where :math:`\alpha_{t_0} \ll 1`); a step of infinite :math:`h` is first order.
    Order 3; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """

    def update(k, x):
        d, lams = k.D(x), [k.s.lam, k.t.lam, *(t_j.lam for _, t_j in k.history)]
        hs = [a - b for a, b in zip(lams, lams[1:], strict=False)]  # h_i, h_{i-1}, h_{i-2}
        known = 0  # earlier denoisings the step may use: those behind finite steps only
        while known < min(2, len(hs) - 1) and all(map(math.isfinite, hs[: known + 2])):
            known += 1
        weights = dpmpp_3m_weights(*hs[: known + 1])  # of D_i, D_{i-1}, D_{i-2}
        x = x * (k.s.sigma / k.t.sigma)
        for w, d_j in zip(weights, [d, *(d_j for d_j, _ in k.history)], strict=False):
            x = x.add_(d_j, alpha=k.s.alpha * w)
        return x

    return integrate(update, model, x, ts, process, **run)


def dpmpp_3m_weights(h: float, h1: float | None = None, h2: float | None = None) -> tuple:
    r"""The bracket of :func:`dpmpp_3m`, :math:`\varphi_1 D_i + \varphi_2 d_1 - 2\varphi_3 d_2`,
    as weights of :math:`(D_i, D_{i-1}, D_{i-2})`: each divided difference is a vector of such
    weights.  With ``h1`` only, the second-order start :math:`\varphi_1 D_i + \varphi_2 (D_i -
    D_{i-1})/r_0`; with neither, the first-order :math:`\varphi_1 D_i`."""
    if h1 is None:
        return (phi1(h),)
    r0 = h1 / h
    delta0 = (1 / r0, -1 / r0, 0.0)  # (D_i - D_{i-1}) / r0
    if h2 is None:
        return tuple(f + phi2(h) * p for f, p in zip((phi1(h), 0.0, 0.0), delta0, strict=True))[:2]
    r1 = h2 / h
    delta1 = (0.0, 1 / r1, -1 / r1)  # (D_{i-1} - D_{i-2}) / r1
    d2 = [(p - q) / (r0 + r1) for p, q in zip(delta0, delta1, strict=True)]
    d1 = [p + r0 * q for p, q in zip(delta0, d2, strict=True)]
    first = (phi1(h), 0.0, 0.0)
    return tuple(f + phi2(h) * p - 2 * phi3(h) * q for f, p, q in zip(first, d1, d2, strict=True))


def _unipc_weights(h: float, r: float) -> tuple[float, float]:
    """UniC-2's (rho0, rho1) for bh2 in data prediction, as in the reference code: they solve
    rho0 + rho1 = b1, r rho0 + rho1 = b2, with b_k = k! (-h) phi_{k+1}(-h) / B(h)."""
    big_b = math.expm1(-h)  # B(h) of bh2, in data prediction; also h phi_1
    k1 = big_b / -h - 1  # the reference code's h_phi_k for k = 1, 2
    k2 = k1 / -h - 0.5
    b1, b2 = k1 / big_b, 2 * k2 / big_b
    rho0 = (b1 - b2) / (1 - r)
    return rho0, b1 - rho0


def unipc(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""UniPC (Zhao et al., 2023): predictor UniP-2 and corrector UniC-2, variant bh2, data prediction.

    With the DDIM step :math:`\hat x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1 - e^{-h})D_i`,
    :math:`B = e^{-h} - 1` (bh2: the paper's :math:`B(h) = e^h - 1`, in data prediction),
    :math:`r = (\lambda_{i-1} - \lambda_i)/h` and :math:`\Delta = (D_{i-1} - D_i)/r`:

    .. math::
        x^{p}_s = \hat x_s - \alpha_s B\,\tfrac12\Delta, \qquad
        x_s = \hat x_s - \alpha_s B\,\big[\rho_0\Delta + \rho_1(D(x^{p}_s) - D_i)\big],

    where :math:`(\rho_0, \rho_1)` solve :math:`\rho_0 + \rho_1 = b_1`, :math:`r\rho_0 + \rho_1 =
    b_2`, with :math:`b_k = k!\,(-h)\,\varphi_{k+1}(-h)/B`, :math:`\varphi_1(z) = (e^z - 1)/z`,
    :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`, as in the reference code
    (``multistep_uni_pc_bh_update``).  As there, :math:`D(x^{p}_s)`, evaluated at the
    *predicted* state, is reused as :math:`D_{i+1}` by the next step, so the corrector costs
    no call (NFE = steps); the first step is UniP-1 (DDIM) + UniC-1 (:math:`\rho = 1/2`), the last
    step has no corrector, and a step of infinite :math:`h` is first order.  The reference
    code's lower order in the final steps is left out.  Order 3 (UniC raises UniP-2 by one).
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    corrected = {}  # D(x^p_s) of the last corrector, reused as the next step's D_i

    def update(k, x):
        d = corrected.pop(k.i) if k.i in corrected else k.D(x)
        k.denoised = d
        x_hat = exponential_euler(x, d, k.t, k.s)
        if not math.isfinite(k.h):  # a step to sigma = 0 or from alpha = 0: first order
            return x_hat
        scale = k.s.alpha * phi1(k.h)  # -alpha_s B(h)
        h_prev = k.t.lam - k.history[0][1].lam if k.history else math.inf
        if not math.isfinite(h_prev):  # UniP-1 is the DDIM step; UniC-1 has rho = 1/2
            x_pred, correction = x_hat, None
            rho1 = 0.5
        else:
            r = -h_prev / k.h
            rho0, rho1 = _unipc_weights(k.h, r)
            delta = (k.history[0][0] - d) / r
            x_pred = torch.add(x_hat, delta, alpha=scale * 0.5)
            correction = (delta, scale * rho0)
        if k.last:
            return x_pred
        d_next = k.D(x_pred, k.s)
        corrected[k.i + 1] = d_next
        x_s = torch.add(x_hat, d_next - d, alpha=scale * rho1)  # + scale rho1 (D_next - D_i)
        return x_s if correction is None else x_s.add_(correction[0], alpha=correction[1])

    return integrate(update, model, x, ts, process, **run)


_ADAMS_BASHFORTH = (
    (1.0,),
    (1.5, -0.5),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def plms(model: Callable, x: Tensor, ts: Tensor, process: Process, **run) -> Tensor:
    r"""Pseudo linear multistep (PLMS; Liu et al., 2022), as in the Latent Diffusion sampler.

    The noise predictions :math:`e_i = (x_i - \alpha_i D_i)/\sigma_i` are combined with the
    Adams–Bashforth weights, :math:`e' = (55e_i - 59e_{i-1} + 37e_{i-2} - 9e_{i-3})/24` (the
    AB2 and AB3 weights while fewer are known), and moved by the DDIM transfer

    .. math:: x_s = \frac{\alpha_s}{\alpha_t}(x_t - \sigma_t e') + \sigma_s e'.

    The first step is a pseudo improved Euler step, :math:`e' = (e_i + e(\tilde x, s))/2`
    with :math:`\tilde x` the DDIM step, as in Latent Diffusion; the paper warms up with three
    pseudo Runge–Kutta steps of four calls instead.  In :math:`y = x/\alpha` and the noise level
    :math:`\bar\sigma = \sigma/\alpha` the transfer is Euler's method for :math:`dy/d\bar\sigma
    = e`, so the fixed Adams–Bashforth weights are exact only on a grid with equal steps in
    :math:`\bar\sigma` (``time_grid(..., kind="karras", rho=1)``): there the AB4 body is of
    order 4 and the second-order start adds one :math:`O(h^3)` term, so the order is 3 at least
    (about 4 until that small term shows).  On the other grids (log-SNR, uniform in ``t``) the
    weights are off by :math:`O(h)` and the order is 2.  The history keeps the :math:`e_j`.
    Needs :math:`\alpha > 0` on the grid.  NFE = steps + 1.  Shapes: ``x`` ``(batch, ...)``;
    returns the same.
    """
    _need_positive_alpha(
        "plms", process, _checked_grid(ts, x), "its DDIM transfer divides by alpha"
    )

    def transfer(x, e, t, s):  # (alpha_s / alpha_t)(x - sigma_t e) + sigma_s e, fused
        ratio = s.alpha / t.alpha
        return torch.add(x * ratio, e, alpha=s.sigma - ratio * t.sigma)

    def update(k, x):
        e = eps_hat(x, k.D(x), k.t)
        k.kept = e
        if k.first and k.s.sigma > 0:  # pseudo improved Euler
            x_tilde = transfer(x, e, k.t, k.s)
            e_tilde = eps_hat(x_tilde, k.D(x_tilde, k.s), k.s)
            e_prime = torch.add(e, e_tilde).mul_(0.5)
        else:  # Adams-Bashforth: sum_j w_j e_{i-j}
            weights = _ADAMS_BASHFORTH[len(k.history)]
            e_prime = e * weights[0]
            for w, (e_j, _) in zip(weights[1:], k.history, strict=True):
                e_prime = e_prime.add_(e_j, alpha=w)
        return transfer(x, e_prime, k.t, k.s)

    return integrate(update, model, x, ts, process, **run)


# -- variance-optimised and damped multistep steps (EVODiff, LML) ----------------------------
def _dot_per_channel(a: Tensor, b: Tensor) -> Tensor:
    """Inner products per sample, and per channel of an image, kept broadcastable: over dim 1 of
    ``(batch, d)``, over dims 2, 3, ... of ``(batch, channels, ...)`` (EVODiff's code sums
    ``'bchw,bchw->bc'``)."""
    if a.ndim > 2:
        dots = torch.linalg.vecdot(a.flatten(2), b.flatten(2))
        return dots.reshape(*a.shape[:2], *([1] * (a.ndim - 2)))
    return torch.linalg.vecdot(a, b)[:, None]


def _dot_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """Inner products per sample over every other dim, kept broadcastable (LML's code)."""
    dots = torch.linalg.vecdot(a.flatten(1), b.flatten(1))
    return dots.reshape(a.shape[0], *([1] * (a.ndim - 1)))


def _projection(a: Tensor, b: Tensor) -> Tensor:
    """<a, b>/<b, b> per sample (and channel), clipped to [-2, 2] as in EVODiff's code; 0 where
    b = 0 (where the code divides by zero)."""
    num, den = _dot_per_channel(a, b), _dot_per_channel(b, b)
    nonzero = den > 0  # a safe denominator, for autograd too
    ratio = num / torch.where(nonzero, den, torch.ones_like(den))
    return torch.where(nonzero, ratio, torch.zeros_like(ratio)).clamp(-2.0, 2.0)


def _noise_level_weight(process: Process, ts: Tensor) -> Callable:
    """EVODiff's weight of the projection in the balance, ``w(s) = (1 - u^2)/2`` with
    ``u = (kappa_s + kappa_end)/(kappa_start + kappa_end)``, kappa = sigma/alpha."""
    lam_ends = process.lam(ts[[0, -1]].to(torch.float64)).tolist()
    kappa_start, kappa_end = (math.exp(-lam) for lam in lam_ends)  # inf where alpha = 0

    def weight(s: Point) -> float:
        u = (math.exp(-s.lam) + kappa_end) / (kappa_start + kappa_end)
        return 0.5 * (1 - u**2) if math.isfinite(kappa_start) else 0.5

    return weight


def evodiff(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    balance: str | float = "adaptive",
    refine: bool = True,
    **run,
) -> Tensor:
    r"""EVODiff (Li, Chen & Zeng, 2025): DPM-Solver++(2M) with variance-optimised coefficients.

    DPM-Solver++(2M) (:func:`dpmpp_2m`) steps
    :math:`x_s = x^{E}_s + \frac{c}{r}(D_i - D_{i-1})`, with the exponential Euler step
    :math:`x^{E}_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\varphi_1(h)D_i`,
    :math:`c = \alpha_s\varphi_1(h)/2` and :math:`r = h_{i-1}/h_i`.  EVODiff chooses, at each
    step and from the model outputs at hand, the coefficients that minimise a conditional
    variance.  First the *balance* :math:`\gamma` of the difference
    :math:`\Delta^- = D_i - \gamma D_{i-1}`:
    :math:`\gamma^* = \langle D_i, D_{i-1}\rangle/\lVert D_{i-1}\rVert^2` minimises
    :math:`\lVert D_i - \gamma D_{i-1}\rVert^2`, and the code blends it with a ratio of the grid,

    .. math::
        \gamma = (1 - w)\,b + w\,\mathrm{clip}(\gamma^*, -2, 2), \quad
        b = e^{(h_{i-1} - h_i)/2}, \quad w = \tfrac12(1 - u^2),

    :math:`u = (\bar\sigma_s + \bar\sigma_{\min})/(\bar\sigma_{\max} + \bar\sigma_{\min})`
    in the noise level :math:`\bar\sigma = \sigma/\alpha` (EDM's :math:`\sigma`).  Then a probe
    :math:`x^{p} = x^{E}_s + \frac{c}{\tilde r}\Delta^-` with the shortened ratio
    :math:`\tilde r = r\,\mathrm{sigmoid}(|\gamma|/4)`, one model call
    :math:`D^{p} = D(x^{p}, s)`, the forward difference :math:`\Delta^+ = D^{p} - \gamma' D_i`
    (:math:`\gamma'` as :math:`\gamma`, from :math:`D^{p}` and :math:`D_i`), and with
    :math:`B^- = \Delta^-/r`, :math:`B^+ = r\Delta^+` (two estimates of :math:`hD'`):

    .. math::
        \begin{aligned}
        \eta^* &= \tfrac12\,\mathrm{clip}(\rho, -2, 2), \quad
            \rho = \frac{\langle B^+ + B^-, B^+ - B^-\rangle}
            {\lVert B^+ - B^-\rVert^2}, \\
        \eta &= \tfrac12\,\mathrm{sigmoid}(|\eta^*|), \quad
            B_\theta = (1 - \eta)B^+ - \eta B^-, \\
        x_s &= x^{E}_s + \frac{c}{\zeta}B_\theta .
        \end{aligned}

    :math:`\eta^* + \tfrac12` is the :math:`\eta` that minimises the variance
    :math:`\lVert(1 - \eta)B^+ + \eta B^-\rVert^2` of the interpolated difference.  The scale
    :math:`\zeta = \mathrm{sigmoid}(|\zeta^*| - \tfrac12)` comes from the projection
    :math:`\zeta^* = \mathrm{clip}(\langle P, \Delta^-\rangle/\lVert\Delta^-\rVert^2, -2, 2)/(2c)`
    of the probe's residual :math:`P = x^{p} - x^{E}_s - \frac{c}{\tilde r}B_\theta`; beyond
    20 steps the code uses :math:`\zeta = \mathrm{sigmoid}(-(|\zeta^*| - \tfrac12)\,k)` with
    :math:`k = \mathrm{sigmoid}(\mathrm{clip}(\langle D_i, g\rangle/\lVert g\rVert^2, -2, 2)
    (2 - e^{-2h}))`, :math:`g = (D_i - D_{i-1})/(e^{\lambda_s} - e^{\lambda_t})`.  The probe's
    :math:`D^{p}` is the next step's :math:`D_{i+1}`, so a step costs one call (NFE = steps).
    Inner products are taken per sample (per sample and channel for images, as in the code);
    a zero denominator gives the coefficient 0.

    The first step is DDIM; the last has no probe (it would cost a call nothing uses) and is
    the balanced 2M step :math:`x^{E}_s + \frac{c}{r}\Delta^-`; a step of infinite :math:`h`
    is first order.  Options: ``balance`` ``"adaptive"`` (the rule above) or a number, the
    fixed :math:`\gamma` of both differences; ``refine`` False skips the probe and its
    corrections, so that each step is the balanced 2M step.  With ``balance=1.0`` and
    ``refine=False`` the method *is* DPM-Solver++(2M).  Every coefficient depends on the
    state, so the sampler is not affine in ``x`` even on Gaussian data.

    Departures from the released code (``EVODiff_edm.sample``, written for EDM, where
    :math:`\alpha = 1` and :math:`\sigma_t = t`): its :math:`\sigma_t` is read here as the noise
    level :math:`\sigma/\alpha`, so :math:`b` and the ratios become functions of :math:`h`; its
    last step multiplies the state by :math:`1 - \sqrt{\sigma_s\sigma_t}`, a shrink set by EDM's
    absolute noise levels (:math:`\sigma_{\min} = 0.002`) that has no counterpart for other
    processes, and is replaced by the balanced 2M step.  The sigmoids, clips and the constants
    1/4 and 1/2 are the code's; the paper derives the optimal :math:`\gamma` and :math:`\eta`
    and the code squashes them through these heuristics.  The balance's projection leaves in
    :math:`\Delta^-` only the part of :math:`D_i - D_{i-1}` orthogonal to :math:`D_{i-1}`
    (scaled by :math:`w`), so the estimate of :math:`hD'` is biased by :math:`O(h)` and the
    method is of order 1 as :math:`h \to 0` (measured on the Gaussian oracle).  Shapes: ``x``
    ``(batch, ...)``; returns the same.
    """
    if balance != "adaptive":
        require(
            isinstance(balance, (int, float))
            and not isinstance(balance, bool)
            and math.isfinite(balance),
            "balance",
            balance,
            "'adaptive' or a finite number",
        )
    require(isinstance(refine, bool), "refine", refine, "True or False")
    ts = _checked_grid(ts, x)
    n = len(ts) - 1
    weight = _noise_level_weight(process, ts)
    probed = {}  # D(x^p, s) of the last probe: the next step's D_i

    def balanced(newer, older, w, base):
        if balance == "adaptive":
            gamma = (1 - w) * base + w * _projection(newer, older)
        else:
            gamma = torch.full_like(_dot_per_channel(older, older), float(balance))
        return newer - gamma * older, gamma

    def update(k, x):
        d = probed.pop(k.i) if k.i in probed else k.D(x)
        k.denoised = d
        x_euler = exponential_euler(x, d, k.t, k.s)
        if not k.history:  # the first step: DDIM
            return x_euler
        d_prev, t_prev = k.history[0]
        h_prev = k.t.lam - t_prev.lam
        if not (math.isfinite(k.h) and math.isfinite(h_prev)):
            return x_euler
        r, c = h_prev / k.h, 0.5 * k.s.alpha * phi1(k.h)
        w, base = weight(k.s), math.exp(0.5 * (h_prev - k.h))
        back, gamma = balanced(d, d_prev, w, base)  # Delta^- = D_i - gamma D_{i-1}
        if k.last or not refine:
            return x_euler + (c / r) * back
        r_probe = (torch.sigmoid(0.25 * gamma.abs()) * r).clamp(0.25 * r, 1.5 * r)
        x_probe = x_euler + (c / r_probe) * back
        d_probe = k.D(x_probe, k.s)
        probed[k.i + 1] = d_probe
        forward, _ = balanced(d_probe, d, w, base)  # Delta^+ = D^p - gamma' D_i
        b_back, b_forward = back / r, r * forward
        eta_star = 0.5 * _projection(b_forward + b_back, b_forward - b_back)
        eta = 0.5 * torch.sigmoid(eta_star.abs())
        b_theta = (1 - eta) * b_forward - eta * b_back
        residual = (c / r_probe) * (back - b_theta)  # x^p - x^E - (c / r~) B_theta
        shifted = (_projection(residual, back) / (2 * c)).abs() - 0.5  # |zeta*| - 1/2
        if n > 20:
            slope = (d - d_prev) / (math.exp(k.s.lam) - math.exp(k.t.lam))
            fit = torch.sigmoid(_projection(d, slope) * (2 - math.exp(-2 * k.h)))
            zeta = torch.sigmoid(-shifted * fit)
        else:
            zeta = torch.sigmoid(shifted)
        return x_euler + (c / zeta) * b_theta

    return integrate(update, model, x, ts, process, **run)


def lm_direction(u: Tensor, v: Tensor, damping: float) -> Tensor:
    r"""LML's damped rank-one correction of a step's increment ``u`` along ``v``, per sample.

    The Levenberg–Marquardt direction with the rank-one Hessian surrogate
    :math:`vv^\top` and damping :math:`\lambda`, rescaled to the length of :math:`u`:

    .. math::
        \tilde u = \lambda(\lambda I + vv^\top)^{-1}u
                 = u - \frac{\langle u, v\rangle}{\lambda + \lVert v\rVert^2}\,v,
        \qquad u \leftarrow \tilde u\,\frac{\lVert u\rVert}{\lVert\tilde u\rVert}

    (Sherman–Morrison), inner products over all but the batch dim.  For :math:`v \parallel u`
    the result is :math:`u` for every :math:`\lambda`.  The vector is formed as
    :math:`\lambda u + (\lVert v\rVert^2 u - \langle u, v\rangle v)`, whose bracket vanishes
    exactly when :math:`v` is :math:`u`; the released code's :math:`u - v\langle u,
    v\rangle/(\lambda + \lVert v\rVert^2)` cancels instead, with a relative rounding error of
    about :math:`\epsilon\lVert u\rVert^2/\lambda` per entry.  Shapes: ``u``, ``v``
    ``(batch, ...)``; returns the shape of ``u``.
    """
    damping = positive(damping, "damping")
    uv, vv = _dot_per_sample(u, v), _dot_per_sample(v, v)
    damped = (vv * u - uv * v).add(u, alpha=damping)  # |v|^2 u - <u, v> v + lambda u
    # rescaled to |u|; a zero u (the only way to a zero result) is kept, and so is its
    # derivative (a safe denominator: autograd must not meet 0/0 in the branch not taken)
    length2, damped2 = _dot_per_sample(u, u), _dot_per_sample(damped, damped)
    nonzero = damped2 > 0
    ones = torch.ones_like(damped2)
    ratio = (torch.where(nonzero, length2, ones) / torch.where(nonzero, damped2, ones)).sqrt()
    return torch.where(nonzero, damped * ratio, u)


def lml_hessian(score: Tensor, damping: float = 0.0) -> Tensor:
    r"""LML's damped rank-one surrogate of the Hessian of :math:`\log p_t` at each sample.

    .. math:: \nabla^2\log p_t(x) \approx -\big(\mu I + s s^\top\big),
        \qquad s = \nabla\log p_t(x),

    the Gauss–Newton (Fisher) approximation that :func:`lml` builds from its increments:
    with noise prediction at first order the increment is
    :math:`u = \sigma_s\sigma_t(e^{h} - 1)\,s`, so :math:`\lambda I + uu^\top` is this matrix
    times :math:`c^2 = (\sigma_s\sigma_t(e^h - 1))^2` with :math:`\mu = \lambda/c^2`.  In
    expectation over :math:`x \sim p_t` it is exact without damping,
    :math:`\mathbb E[ss^\top] = -\mathbb E[\nabla^2\log p_t]` (integration by parts), and for
    Gaussian data, where :math:`-\nabla^2\log p_t = (\alpha_t^2\Sigma + \sigma_t^2 I)^{-1}` is
    constant, it equals the Hessian on average; one sample gives a rank-one matrix.  Shapes:
    ``score`` ``(batch, d)``; returns ``(batch, d, d)``.
    """
    damping = nonnegative(damping, "damping")
    require(isinstance(score, Tensor) and score.ndim == 2, "score", score, "a (batch, d) tensor")
    outer = score[:, :, None] * score[:, None, :]
    eye = torch.eye(score.shape[1], dtype=score.dtype, device=score.device)
    return -(outer + damping * eye)


#: The parametrisations of :func:`lml`'s base solver (the code's ``algorithm_type``).
LML_PREDICTIONS = ("noise", "data")


def lml(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    damping: float = 1e-3,
    memory: float = 0.0,
    order: int = 2,
    prediction: str = "noise",
    **run,
) -> Tensor:
    r"""Levenberg–Marquardt–Langevin (LML; Wang et al., 2025) on multistep DPM-Solver.

    The base solver writes a step as :math:`x_s = a\,x_t + u` and LML replaces the increment
    :math:`u` by its damped rank-one correction (:func:`lm_direction`):

    .. math::
        x_s = a\,x_t + \tilde u, \quad
        \tilde u \propto \lambda(\lambda I + vv^\top)^{-1}u, \quad
        \lVert\tilde u\rVert = \lVert u\rVert,

    with :math:`v = \kappa\,u_{i-1} + (1 - \kappa)\,u` (``memory`` :math:`\kappa`, the weight
    of the last step's uncorrected increment) and ``damping`` :math:`\lambda > 0`.  The base
    (``prediction``, the code's ``algorithm_type``; ``order`` 1 or 2, multistep, midpoint form):

    - ``"noise"`` (DPM-Solver, the released scripts' ``dpm_lm``): :math:`a = \alpha_s/\alpha_t`,
      :math:`u = -\sigma_s(e^{h} - 1)\,[\hat\varepsilon_i + \tfrac{1}{2r}(\hat\varepsilon_i
      - \hat\varepsilon_{i-1})]`;
    - ``"data"`` (DPM-Solver++, the code's ``dpm++_lm``): :math:`a = \sigma_s/\sigma_t`,
      :math:`u = \alpha_s(1 - e^{-h})\,[D_i + \tfrac{1}{2r}(D_i - D_{i-1})]`, so that the
      base is :func:`dpmpp_2m` (``order=2``) or :func:`dpm_solver_1` (``order=1``),

    with :math:`r = h_{i-1}/h_i`, the first step (and a step of infinite :math:`h`, which is
    not corrected) first order.  In noise prediction at first order :math:`u \propto
    \nabla\log p_t`, and :math:`vv^\top` is the rank-one Hessian surrogate of
    :func:`lml_hessian`.  One model call per step; order 2 with ``order=2``: for fixed
    :math:`\lambda` the correction turns :math:`u` by an angle of
    :math:`O(\kappa h\,\lVert u\rVert^2/\lambda)` with :math:`\lVert u\rVert = O(h)`.

    The correction vanishes exactly where :math:`v \parallel u`: on the first step, and at
    every step for ``memory = 0``, the code's default (its scripts never set it), for which
    LML *is* the base solver whatever the damping; as :math:`\lambda \to \infty` it vanishes
    for every ``memory``.  Departures from the released code
    (``scheduling_dpmsolver_multistep_lm.py``): the code's third order and its lower order in
    the last steps (for fewer than 15 steps) are left out; the vector is formed so that
    ``memory = 0`` is the identity in floating point too (see :func:`lm_direction`; in the
    code it is not: for an increment of 3,072 entries of size 0.5, CIFAR-10's, and
    :math:`\lambda = 8\cdot 10^{-4}`, float32's rounding in the cancellation changes each entry
    by 3% (RMS), more as :math:`\lambda` falls).  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    damping = positive(damping, "damping")
    memory = between(memory, "memory", 0.0, 1.0)
    require(order in (1, 2) and not isinstance(order, bool), "order", order, "1 or 2")
    one_of(prediction, "prediction", LML_PREDICTIONS)
    previous = {}  # the last step's increment u, uncorrected (the code's prev_noise)

    def update(k, x):
        d = k.D(x)
        noise = prediction == "noise"
        if noise:
            k.kept = eps_hat(x, d, k.t)  # the history holds the noise predictions
        if not math.isfinite(k.h):  # to sigma = 0 or from alpha = 0: first order, no correction
            previous.clear()
            return exponential_euler(x, d, k.t, k.s)
        own = k.kept if noise else d  # eps_i or D_i
        if order == 2 and k.history and math.isfinite(k.t.lam - k.history[0][1].lam):
            w = k.h / (2 * (k.t.lam - k.history[0][1].lam))  # 1 / (2r)
            own = torch.add(own * (1 + w), k.history[0][0], alpha=-w)
        if noise:
            carry, u = k.s.alpha / k.t.alpha, own * (-k.s.sigma * math.expm1(k.h))
        else:
            carry, u = k.s.sigma / k.t.sigma, own * (k.s.alpha * phi1(k.h))
        v = u if "u" not in previous else memory * previous["u"] + (1 - memory) * u
        previous["u"] = u
        return carry * x + lm_direction(u, v, damping)

    return integrate(update, model, x, ts, process, **run)


# -- the registry of samplers and their facts ------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """A sampler with its facts; calling it runs the sampler.

    ``order``: the order of convergence (of the path for the ODE solvers, in law for the
    stochastic ones; None where there is none); ``calls_per_step``: model calls per step, or
    the option whose value gives them (``calls_per_step(options)``); ``extra_calls``: calls
    beyond the steps (PLMS's start); ``stochastic``: True, False, or the option that makes it
    stochastic when nonzero; ``options``: the method's own options (beyond the engine's);
    ``affine``: whether, with an affine denoiser (the exact one of Gaussian data), the output is
    affine in the start state and the injected noise, so that its law on Gaussian data is
    Gaussian (:func:`diffcore.metrics.sampler_output_law`): True, False, or the option that
    makes it not affine when nonzero.
    """

    fn: Callable
    order: float | None
    calls_per_step: int | Callable = 1
    stochastic: bool | str = False
    options: tuple[str, ...] = ()
    extra_calls: int = 0
    affine: bool | str = True
    name: str = field(default="", compare=False)

    def __call__(self, model: Callable, x: Tensor, ts: Tensor, process: Process, **options):
        return self.fn(model, x, ts, process, **options)

    def is_stochastic(self, **options) -> bool:
        """Whether the sampler draws noise under ``options``."""
        if isinstance(self.stochastic, str):
            return bool(options.get(self.stochastic, 0))
        return self.stochastic

    def is_affine(self, **options) -> bool:
        """Whether the output is affine in the start and the noise under ``options`` (given an
        affine denoiser)."""
        if isinstance(self.affine, str):
            return not options.get(self.affine, 0)
        return self.affine

    def model_calls(self, n_steps: int, **options) -> int:
        """Model calls (NFE) over ``n_steps`` steps with ``options``, on a grid with
        :math:`\\sigma > 0` at ``ts[-1]`` and :math:`\\alpha > 0` at ``ts[0]``."""
        count(n_steps, "n_steps")
        unknown = set(options) - set(self.options) - {"denoise_last"} - _ENGINE_OPTIONS
        if unknown:
            raise TypeError(f"{self.name} takes the options {self.options}, got {sorted(unknown)}")
        per_step = self.calls_per_step
        if callable(per_step):
            per_step = per_step(options)
        return per_step * n_steps + self.extra_calls + int(bool(options.get("denoise_last")))


_ENGINE_OPTIONS = {"generator", "noise_sampler", "callback", "progress"}

#: Every sampler of this module by its name, with its facts; all take
#: ``(model, x, ts, process, **options)``.
SAMPLERS: dict[str, Sampler] = {
    name: Sampler(name=name, **facts)
    for name, facts in {
        "euler": dict(fn=euler, order=1),
        "heun": dict(
            fn=heun,
            order=2,
            calls_per_step=2,
            stochastic="s_churn",
            options=("s_churn", "s_tmin", "s_tmax", "s_noise"),
        ),
        "ddpm": dict(fn=ddpm, order=1, stochastic=True),
        "ddim": dict(fn=ddim, order=1, stochastic="eta", options=("eta",)),
        "euler_maruyama": dict(fn=euler_maruyama, order=1, stochastic=True),
        "pc": dict(
            fn=pc,
            order=1,
            calls_per_step=lambda o: 1 + count(o.get("n_corrector", 1), "n_corrector", low=0),
            stochastic=True,
            options=("snr", "n_corrector"),
        ),
        "annealed_langevin": dict(
            fn=annealed_langevin,
            order=None,
            calls_per_step=lambda o: count(o.get("n_steps_each", 1), "n_steps_each"),
            stochastic=True,
            options=("eps", "n_steps_each"),
        ),
        "dpm_solver_1": dict(fn=dpm_solver_1, order=1),
        "dpm_solver_2": dict(fn=dpm_solver_2, order=2, calls_per_step=2),
        "dpm_solver_3": dict(fn=dpm_solver_3, order=3, calls_per_step=3),
        "dpmpp_2m": dict(fn=dpmpp_2m, order=2),
        "dpmpp_3m": dict(fn=dpmpp_3m, order=3),
        "unipc": dict(fn=unipc, order=3),
        "plms": dict(fn=plms, order=2, extra_calls=1),
        "evodiff": dict(fn=evodiff, order=1, options=("balance", "refine"), affine=False),
        "lml": dict(
            fn=lml,
            order=2,
            options=("damping", "memory", "order", "prediction"),
            affine="memory",
        ),
        "bdia": dict(fn=bdia, order=2, options=("gamma",)),
    }.items()
}


def model_calls(name: str, n_steps: int, **options) -> int:
    """The number of model calls (NFE) of ``SAMPLERS[name]`` over ``n_steps`` steps.

    For a grid with :math:`0 < \\sigma` at ``ts[-1]`` and :math:`0 < \\alpha` at ``ts[0]`` (no step
    of infinite log-SNR length), with the sampler's options (``n_corrector``, ``n_steps_each``,
    ``denoise_last``).  The same as ``SAMPLERS[name].model_calls(n_steps, **options)``.
    """
    require(name in SAMPLERS, "name", name, f"one of {tuple(SAMPLERS)}")
    return SAMPLERS[name].model_calls(n_steps, **options)


# -- skipping the early steps with the Gaussian closed form ------------------------------------
def gaussian_skip(
    sampler: Callable | str,
    model: Callable,
    gaussian,
    x: Tensor,
    ts: Tensor,
    process: Process,
    t_skip,
    **options,
) -> Tensor:
    r"""Jump from ``ts[0]`` to ``t_skip`` along a Gaussian's exact PF-ODE, then run ``sampler``.

    At low log-SNR the marginal :math:`p_t` of any data law is close to that of the Gaussian
    :math:`\mathcal N(\mu, \Sigma)` with the same mean and covariance, and so are its PF-ODE
    trajectories (Wang & Vastola, 2023, who call the jump *analytical teleportation*).  The
    early part of the solve is therefore replaced by that Gaussian's closed-form flow
    (:meth:`~diffcore.analytic.Gaussian.pf_ode_map`), at no model call:

    .. math::
        x_{t_{\text{skip}}} = \alpha_{t_{\text{skip}}}\mu
            + C_{t_{\text{skip}}}^{1/2} C_{t_0}^{-1/2}(x - \alpha_{t_0}\mu),
        \qquad C_t = \alpha_t^2\Sigma + \sigma_t^2 I,

    and ``sampler(model, x_skip, tail, process, **options)`` finishes on the tail grid
    ``tail = [t_skip, *ts[ts < t_skip]]``: the times of ``ts`` strictly below ``t_skip``,
    preceded by ``t_skip`` (so a ``t_skip`` that is a time of ``ts`` cuts the grid there, and
    ``t_skip = ts[0]`` is the plain sampler, with no jump).  The cost is the sampler's model
    calls on the tail, ``model_calls(name, len(tail) - 1)``.  On data that *is*
    :math:`\mathcal N(\mu, \Sigma)` the jump is exact and only the tail's discretisation error
    is left; on other data the jump adds the error of the Gaussian approximation on
    :math:`[t_{\text{skip}}, t_0]`, which vanishes as ``t_skip`` approaches ``ts[0]``.

    ``sampler`` is a sampler of this module or its name in :data:`SAMPLERS`; ``gaussian`` an
    :class:`~diffcore.analytic.Gaussian`, typically with the data's mean and covariance;
    ``options`` go to the sampler (its ``callback`` counts the tail's steps).  Needs
    ``ts[-1] < t_skip <= ts[0]``.  Shapes: ``x`` ``(batch, ...)`` with ``gaussian.dim`` entries
    per sample; returns the same.
    """
    from diffcore.analytic import Gaussian  # here, not at the top: analytic is a peer module

    if isinstance(sampler, str):
        require(sampler in SAMPLERS, "sampler", sampler, f"a callable or one of {tuple(SAMPLERS)}")
        sampler = SAMPLERS[sampler]
    require(callable(sampler), "sampler", sampler, f"a callable or one of {tuple(SAMPLERS)}")
    require(isinstance(gaussian, Gaussian), "gaussian", gaussian, "an analytic.Gaussian")
    ts = check_time_grid(ts)
    if isinstance(t_skip, Tensor) and t_skip.numel() == 1:
        t_skip = float(t_skip)
    t_first, t_last = float(ts[0]), float(ts[-1])
    require(
        isinstance(t_skip, (int, float)) and t_last < t_skip <= t_first,
        "t_skip",
        t_skip,
        f"a number in (ts[-1], ts[0]] = ({t_last:.6g}, {t_first:.6g}]",
    )
    if t_skip < t_first:  # the closed-form jump; none when t_skip = ts[0]
        x = gaussian.pf_ode_map(x, ts[0], t_skip, process)
    tail = torch.cat([ts.new_tensor([t_skip]), ts[ts < t_skip]])
    return sampler(model, x, tail, process, **options)
