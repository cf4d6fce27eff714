r"""Samplers: one signature for all, ``sampler(model, x, ts, process, **options)``.

``model(x, t)`` is the denoiser :math:`D(x, t) \approx \mathbb E[x_0 \mid x_t = x]` (see
:func:`diffcore.targets.as_denoiser`), ``x`` the start state at time ``ts[0]``
(``process.prior_sample``, or an exact sample of :math:`p_{t_0}`), and ``ts`` a strictly
decreasing 1-D tensor of times from :func:`time_grid`.  ``SAMPLERS`` maps names to samplers.

Every sampler

- moves the state from ``ts[0]`` to ``ts[-1]`` and returns the state *at* ``ts[-1]`` (an
  :math:`x_{t_{\min}}`, not a denoised sample, unless ``t_min = 0`` and :math:`\sigma_0 = 0`);
  with ``denoise_last=True`` it returns :math:`D(x, t_{\min})` instead, one more model call;
- calls ``callback(i, t, x)``, when given, after step ``i`` with the state ``x`` at
  ``t = ts[i + 1]`` (to record a trajectory);
- reads the schedule only through ``process``: :math:`\alpha_t`, :math:`\sigma_t`, their
  derivatives and the log-SNR :math:`\lambda_t = \log(\alpha_t/\sigma_t)`, precomputed once on
  the grid as Python floats so that a step costs a few fused tensor operations.

The families.  PF-ODE solvers in ``t``: :func:`euler`, :func:`heun` (stochastic with EDM's
churn).  Exponential integrators in :math:`\lambda`, with :math:`h_i = \lambda_{i+1} - \lambda_i > 0`:
:func:`ddim` (``eta = 0``), :func:`dpm_solver_1`, :func:`dpm_solver_2`, :func:`dpm_solver_3`,
:func:`dpmpp_2m`, :func:`dpmpp_3m`, :func:`unipc`, :func:`plms`.  Stochastic: :func:`ddpm`,
:func:`ddim` (``eta > 0``), :func:`euler_maruyama`, :func:`pc`, :func:`annealed_langevin`.
A step whose :math:`h` is infinite (to :math:`\sigma = 0` at ``t = 0``, or from
:math:`\alpha = 0` at ``t = 1`` for :class:`~diffcore.processes.Linear`) is the exact limit of
the first-order exponential step, :math:`x_{i+1} = \alpha_{i+1} D` (resp.
:math:`\alpha_{i+1} D + \sigma_{i+1}\varepsilon`), as in k-diffusion.

Stochastic samplers draw their Gaussian noise from ``noise_sampler(i, shape)`` when given (``i``
is the step; a sampler may draw several times per step), else from ``torch.randn`` with
``generator``.  Replacing the noise is what lets :func:`diffcore.metrics.sampler_output_law`
treat it as an input and compute a sampler's exact output law on Gaussian data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore._checks import as_time, require
from diffcore.processes import Process

__all__ = [
    "time_grid",
    "check_time_grid",
    "model_calls",
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


def check_time_grid(ts) -> Tensor:
    """Check that ``ts`` is a strictly decreasing 1-D tensor of at least two times in [0, 1]."""
    if not isinstance(ts, Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            f"ts must be a 1-D tensor of at least 2 times, got shape {tuple(ts.shape)}"
        )
    as_time(ts, name="ts")
    steps = ts[1:] - ts[:-1]
    if not bool((steps < 0).all()):
        i = int(torch.nonzero(steps >= 0)[0])
        raise ValueError(
            f"ts must decrease strictly, got ts[{i}] = {float(ts[i]):.6g} <= "
            f"ts[{i + 1}] = {float(ts[i + 1]):.6g}"
        )
    return ts


# -- shared pieces ---------------------------------------------------------------------------
def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _is_count(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _prepare(ts, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The checked grid in float64 (for the coefficients) and the model's times in x's dtype."""
    ts = check_time_grid(ts)
    return ts.to(torch.float64), list(ts.to(device=x.device, dtype=x.dtype).unbind())


def _coefficients(process: Process, ts: Tensor) -> tuple[list[float], ...]:
    """alpha, sigma and their time derivatives on the whole grid, computed once, as floats."""
    coefs = (process.alpha(ts), process.sigma(ts), process.d_alpha(ts), process.d_sigma(ts))
    return tuple(c.tolist() for c in coefs)


def _log_snr(process: Process, ts: Tensor) -> list[float]:
    """lam_t = log(alpha_t / sigma_t) on the grid as floats (+inf where sigma = 0, -inf where alpha = 0)."""
    return process.lam(ts).tolist()


def _scales(values, like: Tensor) -> list[Tensor]:
    """Per-step multipliers of x as 0-d tensors in x's dtype and device, made once per run.

    ``x * tensor`` costs half of ``x * float``, which wraps the float in a new tensor at every
    call; weights of the other terms stay floats, passed free as ``alpha=`` of ``add``.
    """
    return list(torch.tensor(list(values), dtype=like.dtype, device=like.device).unbind())


def _need_positive_alpha(name: str, a: list[float], ts: Tensor, why: str) -> None:
    if a[0] <= 0:
        raise ValueError(
            f"{name} needs alpha > 0 on the grid ({why}), got alpha(ts[0]) = {a[0]:.6g} at "
            f"ts[0] = {float(ts[0]):.6g}: take t_max < {float(ts[0]):.6g}"
        )


def _noise_source(x: Tensor, generator, noise_sampler) -> Callable:
    """``noise(i, shape, std=None)``: ``noise_sampler(i, shape)`` if given, else standard normal
    noise like ``x`` from ``generator``; with ``std``, ``std`` times it as a new tensor, which
    the caller may update in place (drawn already scaled: one pass over memory fewer)."""
    if noise_sampler is not None:

        def given(i: int, shape, std: float | None = None) -> Tensor:
            z = noise_sampler(i, shape)
            return z if std is None else z * std

        return given

    def randn(i: int, shape, std: float | None = None) -> Tensor:
        std = 1.0 if std is None else std
        return torch.normal(0.0, std, shape, generator=generator, dtype=x.dtype, device=x.device)

    return randn


def _velocity_coefficients(a, s, da, ds) -> tuple[list[float], list[float]]:
    """The PF-ODE velocity u = da D + ds (x - a D)/s = (ds/s) x + (da - ds a/s) D, as the two
    per-time weights (nan where sigma = 0, a time at which no solver evaluates u)."""
    c_x = [d_s / s_ if s_ > 0 else math.nan for s_, d_s in zip(s, ds, strict=True)]
    c_d = [d_a - c * a_ for a_, d_a, c in zip(a, da, c_x, strict=True)]
    return c_x, c_d


def _exp_euler_weights(a: list[float], s: list[float], lam: list[float]):
    """The first-order exponential step x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1}
    expm1(-h_i) D_i on the grid: the ratios (as floats) and the weights of D."""
    n = len(a) - 1
    ratio = [s[i + 1] / s[i] for i in range(n)]
    weight = [-a[i + 1] * math.expm1(-(lam[i + 1] - lam[i])) for i in range(n)]
    return ratio, weight


def _intermediate(process: Process, ts: Tensor, lam: list[float], r: float, like: Tensor):
    """The times at log-SNR lam_i + r h_i inside each step, with their alpha and sigma as floats.

    Steps with an infinite h (taken at first order) get t_i, unused.  Shapes: returns a list of
    ``len(ts) - 1`` 0-d times in the dtype of ``like``, and two lists of floats.
    """
    lam = torch.tensor(lam, dtype=torch.float64)
    h = lam.diff()
    finite = torch.isfinite(h)
    inside = torch.where(finite, lam[:-1] + r * h, torch.zeros_like(h))
    t_mid = torch.where(finite, process.t_of_lam(inside), ts[:-1]).clamp(0, 1)
    times = list(t_mid.to(device=like.device, dtype=like.dtype).unbind())
    return times, process.alpha(t_mid).tolist(), process.sigma(t_mid).tolist()


def _finish(model: Callable, x: Tensor, t: Tensor, denoise_last: bool) -> Tensor:
    return model(x, t) if denoise_last else x


# -- PF-ODE solvers in t -----------------------------------------------------------------------
def euler(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Euler's method on the PF-ODE: :math:`x_{i+1} = x_i + (t_{i+1} - t_i)\,u(x_i, t_i)`.

    :math:`u = \dot\alpha_t \hat x_0 + \dot\sigma_t \hat\varepsilon` is the PF-ODE velocity.
    Order 1; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, da, ds = _coefficients(process, ts)
    c_x, c_d = _velocity_coefficients(a, s, da, ds)
    t = ts.tolist()
    h = [t[i + 1] - t[i] for i in range(len(t) - 1)]
    keep = _scales((1 + h_i * c for h_i, c in zip(h, c_x, strict=False)), x)
    for i in range(len(h)):
        # x + h u = (1 + h c_x) x + h c_d D
        x = torch.add(x * keep[i], model(x, tm[i]), alpha=h[i] * c_d[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def _churn(process: Process, ts: Tensor, lam: list[float], s_churn, s_tmin, s_tmax) -> Tensor:
    """EDM's raised times t_hat_i >= t_i: noise level sigma/alpha times (1 + gamma_i)."""
    n = len(ts) - 1
    lam_t = torch.tensor(lam[:-1], dtype=torch.float64)
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
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Heun's method (explicit trapezoid) on the PF-ODE, with EDM's churn (Karras et al., 2022, Alg. 2).

    :math:`\tilde x = x_i + h\,u(x_i, t_i)`, then
    :math:`x_{i+1} = x_i + \tfrac h2\,(u(x_i, t_i) + u(\tilde x, t_{i+1}))`, with
    :math:`h = t_{i+1} - t_i`.  A step that ends where :math:`\sigma_t = 0` is an Euler step,
    since the velocity is not defined there.  Order 2; two model calls per step, one fewer when
    ``ts[-1]`` has :math:`\sigma = 0`.  The steps are taken in ``t`` on ``x``, as EDM's
    Algorithm 1 does in a process's own time.  EDM's recommended sampler (and the Heun of
    k-diffusion and diffusers) steps instead in the noise level
    :math:`\bar\sigma = \sigma_t/\alpha_t` on :math:`x/\alpha_t`; the two coincide where
    :math:`\alpha_t = 1` and :math:`\sigma_t = t`, not for :class:`~diffcore.processes.VE`,
    whose :math:`\sigma_t` is exponential in ``t``, nor for VP.  In those variables Euler's
    method is :func:`ddim`.

    Churn (``s_churn > 0``): before step ``i``, where EDM's noise level
    :math:`\bar\sigma_i = \sigma_i/\alpha_i` lies in ``[s_tmin, s_tmax]``, the state is moved up
    to the noisier :math:`\hat t_i` with :math:`\bar\sigma_{\hat t} = (1 + \gamma)\bar\sigma_i`,
    :math:`\gamma = \min(s_{\text{churn}}/N, \sqrt2 - 1)`, by the forward process itself:
    :math:`\hat x = (\alpha_{\hat t}/\alpha_i) x_i + s_{\text{noise}}\,\sigma_{\hat t|t_i}\,z`
    with :math:`\sigma_{\hat t|t_i}^2 = \sigma_{\hat t}^2(1 - e^{-2(\lambda_i - \lambda_{\hat t})})`;
    the Heun step then runs from :math:`\hat t_i` to :math:`t_{i+1}`.  For VE this is EDM's
    :math:`\hat x = x + \sqrt{\hat\sigma^2 - \sigma^2}\,S_{\text{noise}} z` exactly;
    :math:`\hat t` is capped at 1.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        require(_is_real(value) and 0 <= value < math.inf, name, value, "finite and >= 0")
    require(_is_real(s_tmax) and s_tmax >= s_tmin, "s_tmax", s_tmax, f">= s_tmin = {s_tmin}")
    ts, tm = _prepare(ts, x)
    a, s, da, ds = _coefficients(process, ts)
    c_x, c_d = _velocity_coefficients(a, s, da, ds)
    t = ts.tolist()
    n = len(t) - 1
    t_hat, tm_hat, c_x_hat, c_d_hat = t, tm, c_x, c_d  # the times the steps start from
    if s_churn > 0:
        lam = _log_snr(process, ts)
        raised = _churn(process, ts, lam, s_churn, s_tmin, s_tmax)
        t_hat = raised.tolist()
        tm_hat = list(raised.to(device=x.device, dtype=x.dtype).unbind())
        a_hat, s_hat, da_hat, ds_hat = _coefficients(process, raised)
        c_x_hat, c_d_hat = _velocity_coefficients(a_hat, s_hat, da_hat, ds_hat)
        lam_hat = _log_snr(process, raised)
        # forward noising from t_i to t_hat_i: x_hat = (alpha_hat/alpha_i) x + std z
        up = _scales((a_hat[i] / a[i] if t_hat[i] > t[i] else 1.0 for i in range(n)), x)
        std = [
            s_noise * s_hat[i] * math.sqrt(-math.expm1(-2 * (lam[i] - lam_hat[i])))
            for i in range(n)
        ]
        noise = _noise_source(x, generator, noise_sampler)
    cx_hat, cx = _scales(c_x_hat, x), _scales(c_x, x)
    for i in range(n):
        if t_hat[i] > t[i]:  # churn
            x = noise(i, x.shape, std[i]).add_(x * up[i])  # noise drawn scaled, then x added
        h = t[i + 1] - t_hat[i]
        u = torch.add(x * cx_hat[i], model(x, tm_hat[i]), alpha=c_d_hat[i])
        x_euler = torch.add(x, u, alpha=h)
        if s[i + 1] == 0:
            x = x_euler
        else:
            u_next = torch.add(x_euler * cx[i + 1], model(x_euler, tm[i + 1]), alpha=c_d[i + 1])
            x = torch.add(x, u.add_(u_next), alpha=0.5 * h)
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


# -- stochastic samplers ---------------------------------------------------------------------
def _ancestral_weights(a: list[float], s: list[float], lam: list[float]):
    """DDPM's posterior step on the grid: x_{i+1} = ratio x_i + weight D_i + std z, with
    ratio = (sigma_{i+1}/sigma_i) e^{-h}, weight = alpha_{i+1}(1 - e^{-2h}),
    std = sigma_{i+1} sqrt(1 - e^{-2h})."""
    ratio, weight, std = [], [], []
    for i in range(len(a) - 1):
        h = lam[i + 1] - lam[i]
        keep = -math.expm1(-2 * h)  # 1 - e^{-2h}
        ratio.append(s[i + 1] / s[i] * math.exp(-h))
        weight.append(a[i + 1] * keep)
        std.append(s[i + 1] * math.sqrt(keep))
    return ratio, weight, std


def ddpm(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DDPM ancestral sampling (Ho et al., 2020): :math:`x_s \sim q(x_s \mid x_t, x_0 = D(x_t, t))`.

    For :math:`s < t`, the forward process gives :math:`x_t \mid x_s \sim
    \mathcal N(\alpha_{t|s} x_s, \sigma_{t|s}^2 I)` with :math:`\alpha_{t|s} = \alpha_t/\alpha_s`,
    :math:`\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2\sigma_s^2 = \sigma_t^2(1 - e^{-2h})`,
    :math:`h = \lambda_s - \lambda_t`, and the Gaussian posterior

    .. math::
        x_s &= \frac{\alpha_{t|s}\sigma_s^2}{\sigma_t^2} x_t
            + \frac{\alpha_s\sigma_{t|s}^2}{\sigma_t^2} D
            + \frac{\sigma_{t|s}\sigma_s}{\sigma_t} z \\
            &= \frac{\sigma_s}{\sigma_t}e^{-h} x_t + \alpha_s(1 - e^{-2h}) D
            + \sigma_s\sqrt{1 - e^{-2h}}\, z,

    the second form free of cancellation (and exact at :math:`h = \infty`).  Any process; one
    model call per step; first order in law.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    ratio, weight, std = _ancestral_weights(a, s, _log_snr(process, ts))
    noise = _noise_source(x, generator, noise_sampler)
    for i in range(len(tm) - 1):
        z = noise(i, x.shape, std[i])
        x = z.add_(model(x, tm[i]), alpha=weight[i]).add_(x, alpha=ratio[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def ddim(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DDIM (Song, Meng & Ermon, 2021): keep the predicted noise, add fresh noise of std :math:`c`.

    .. math::
        x_s = \alpha_s D + \sqrt{\sigma_s^2 - c^2}\;\hat\varepsilon + c\,z, \qquad
        \hat\varepsilon = \frac{x_t - \alpha_t D}{\sigma_t}, \qquad
        c = \eta\,\sigma_s\sqrt{1 - e^{-2h}},

    :math:`c` being :math:`\eta` times the DDPM posterior std.  ``eta = 0`` is deterministic, the
    exponential Euler step of the PF-ODE in data prediction (= :func:`dpm_solver_1`), order 1;
    ``eta = 1`` is DDPM ancestral sampling (:func:`ddpm`), in law and sample by sample.
    ``0 <= eta <= 1``.  One model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    require(_is_real(eta) and 0 <= eta <= 1, "eta", eta, "in [0, 1]")
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    lam = _log_snr(process, ts)
    n = len(tm) - 1
    keep = [-math.expm1(-2 * (lam[i + 1] - lam[i])) for i in range(n)]  # 1 - e^{-2h}
    rho = [math.sqrt(1 - eta**2 * k) for k in keep]  # sqrt(sigma_s^2 - c^2) / sigma_s
    # x_s = alpha_s D + rho sigma_s (x - alpha_t D) / sigma_t + c z
    ratio = _scales((rho[i] * s[i + 1] / s[i] for i in range(n)), x)
    weight = [a[i + 1] - rho[i] * s[i + 1] * a[i] / s[i] for i in range(n)]
    std = [eta * s[i + 1] * math.sqrt(keep[i]) for i in range(n)]
    noise = _noise_source(x, generator, noise_sampler) if eta > 0 else None
    for i in range(n):
        d = model(x, tm[i])
        if noise is not None:  # noise drawn scaled, then the other terms added to it in place
            x = noise(i, x.shape, std[i]).add_(x * ratio[i]).add_(d, alpha=weight[i])
        else:
            x = torch.add(x * ratio[i], d, alpha=weight[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def euler_maruyama(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Euler–Maruyama on the reverse SDE (Song et al., 2021): :math:`dx = [f x - g^2\nabla\log p_t]dt + g\,d\bar w`.

    With :math:`h = t_{i+1} - t_i < 0` and the score from the denoiser,
    :math:`\nabla\log p_t(x) = (\alpha_t D - x)/\sigma_t^2`:

    .. math::
        x_{i+1} = x_i + h\,[f(t_i) x_i - g^2(t_i)\,\nabla\log p_{t_i}(x_i)] + \sqrt{-h\,g^2(t_i)}\,z.

    Needs finite :math:`f` and :math:`g^2` on ``ts[:-1]`` (for Linear, :math:`t < 1`).  Strong
    order 1/2, weak order 1; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns
    the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    f, g2 = process.f(ts[:-1]).tolist(), process.g2(ts[:-1]).tolist()
    for i, (fi, gi) in enumerate(zip(f, g2, strict=True)):
        if not (math.isfinite(fi) and math.isfinite(gi)):
            raise ValueError(
                f"euler_maruyama needs a finite SDE drift and diffusion on the grid, got "
                f"f = {fi:.6g}, g2 = {gi:.6g} at ts[{i}] = {float(ts[i]):.6g} under {process!r}"
            )
    t = ts.tolist()
    h = [t[i + 1] - t[i] for i in range(len(f))]
    # x + h (f x - g2 (alpha D - x)/sigma^2) = (1 + h f + pull) x - pull alpha D, pull = h g2/sigma^2
    pull = [h[i] * g2[i] / s[i] ** 2 for i in range(len(h))]
    keep = [1 + h[i] * f[i] + pull[i] for i in range(len(h))]
    noise = _noise_source(x, generator, noise_sampler)
    for i in range(len(h)):
        z = noise(i, x.shape, math.sqrt(-h[i] * g2[i]))
        x = z.add_(model(x, tm[i]), alpha=-pull[i] * a[i]).add_(x, alpha=keep[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def pc(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    snr: float = 0.16,
    n_corrector: int = 1,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Predictor–corrector sampling (Song et al., 2021, Alg. 2–3): Langevin corrector, ancestral predictor.

    At each :math:`t_i`: ``n_corrector`` Langevin steps on :math:`p_{t_i}`,
    :math:`x \leftarrow x + \epsilon\nabla\log p_{t_i}(x) + \sqrt{2\epsilon}\,z` with
    :math:`\nabla\log p_t = (\alpha_t D - x)/\sigma_t^2`, then one :func:`ddpm` step to
    :math:`t_{i+1}`.  Step size: the paper sets
    :math:`\epsilon = 2\alpha_i(r\lVert z\rVert/\lVert\nabla\log p\rVert)^2` from the norms of
    the batch (:math:`r` = ``snr``); here the norms are replaced by their values for pure noise,
    :math:`\lVert z\rVert^2 = d`, :math:`\lVert\nabla\log p_t\rVert^2 = d/\sigma_t^2`, and
    the VP factor :math:`\alpha_i = 1 - \beta_i \approx 1` is dropped, giving
    :math:`\epsilon = 2(r\sigma_t)^2`, i.e. :math:`x \leftarrow (1 - 2r^2)x + 2r^2\alpha_t D
    + 2r\sigma_t z`.  This keeps the step independent of the batch and the sampler affine in
    its noise on Gaussian data (so its exact law is computable).  Of the paper's predictors
    (reverse diffusion, Euler–Maruyama, ancestral sampling) the ancestral one is used here: the
    forward posterior with :math:`x_0 = D`, defined for any process.  ``1 + n_corrector`` model calls per step.
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    require(_is_real(snr) and 0 < snr < math.inf, "snr", snr, "positive and finite")
    require(_is_count(n_corrector, 0), "n_corrector", n_corrector, "an integer >= 0")
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    ratio, weight, std = _ancestral_weights(a, s, _log_snr(process, ts))
    pull = 2 * snr**2  # epsilon / sigma_t^2
    kept = 1 - pull
    noise = _noise_source(x, generator, noise_sampler)
    for i in range(len(tm) - 1):
        for _ in range(n_corrector):  # Langevin: (1 - 2r^2) x + 2r^2 alpha D + 2 r sigma z
            z = noise(i, x.shape, 2 * snr * s[i])
            x = z.add_(model(x, tm[i]), alpha=pull * a[i]).add_(x, alpha=kept)
        z = noise(i, x.shape, std[i])  # ancestral predictor
        x = z.add_(model(x, tm[i]), alpha=weight[i]).add_(x, alpha=ratio[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def annealed_langevin(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    eps: float = 2e-5,
    n_steps_each: int = 1,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Annealed Langevin dynamics (NCSN; Song & Ermon, 2019, Alg. 1) over the noise levels of ``ts``.

    NCSN runs Langevin on :math:`y = x_0 + \bar\sigma\varepsilon` at decreasing noise levels
    :math:`\bar\sigma_1 > \dots > \bar\sigma_L` with steps
    :math:`\delta_i = \epsilon\,(\bar\sigma_i/\bar\sigma_L)^2`.  For any process we take
    :math:`\bar\sigma_t = \sigma_t/\alpha_t` and :math:`y = x/\alpha_t`, in which every process
    is VE; in :math:`x` the step is :math:`\alpha_t^2\delta_i = \epsilon\sigma_t^2/\bar\sigma_L^2`.
    Step ``i`` carries :math:`y` to the level :math:`t_{i+1}` (:math:`x \leftarrow
    (\alpha_{i+1}/\alpha_i) x`) and makes ``n_steps_each`` Langevin steps there,

    .. math::
        x \leftarrow x + c\,(\alpha_{i+1} D - x) + \sqrt{2c}\,\sigma_{i+1} z,
        \qquad c = \frac{\epsilon}{2\bar\sigma_L^2},

    so the levels are ``ts[1:]`` and the start ``x`` only initialises the chain.  The steps
    contract only for :math:`c < 2`, so ``eps`` must be below :math:`4\bar\sigma_L^2`; ``eps``
    is absolute, as in NCSN (2e-5 with :math:`\bar\sigma_L = 0.01`).  Needs :math:`\alpha > 0`
    and :math:`\sigma > 0` on the grid.  ``n_steps_each`` model calls per step; no order in the
    step: the output law tends, as the levels get dense, to the unadjusted-Langevin law of
    :math:`p_{t_{\min}}`, whose bias grows with ``eps``.  Shapes: ``x`` ``(batch, ...)``;
    returns the same.
    """
    require(_is_real(eps) and 0 < eps < math.inf, "eps", eps, "positive and finite")
    require(_is_count(n_steps_each, 1), "n_steps_each", n_steps_each, "an integer >= 1")
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    _need_positive_alpha("annealed_langevin", a, ts, "it anneals y = x / alpha")
    if not s[-1] > 0:
        raise ValueError(
            f"annealed_langevin needs sigma > 0 at the last level, got sigma(ts[-1]) = {s[-1]:.6g}"
            f" at ts[-1] = {float(ts[-1]):.6g}: take t_min > 0"
        )
    level_last = s[-1] / a[-1]
    require(eps < 4 * level_last**2, "eps", eps, f"< 4 (sigma/alpha)^2 = {4 * level_last**2:.6g}")
    c = eps / (2 * level_last**2)
    up = _scales((a[i + 1] / a[i] for i in range(len(a) - 1)), x)  # y = x / alpha stays put
    noise = _noise_source(x, generator, noise_sampler)
    for i in range(len(tm) - 1):
        x = x * up[i]
        for _ in range(n_steps_each):
            z = noise(i, x.shape, math.sqrt(2 * c) * s[i + 1])
            x = z.add_(model(x, tm[i + 1]), alpha=c * a[i + 1]).add_(x, alpha=1 - c)
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


# -- exponential integrators in log-SNR ------------------------------------------------------
def dpm_solver_1(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DPM-Solver-1 (Lu et al., 2022): the exponential Euler step of the PF-ODE in :math:`\lambda`.

    The PF-ODE in data prediction, :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t +
    \sigma_s\int_{\lambda_t}^{\lambda_s} e^{\lambda} D\,d\lambda`, with :math:`D` frozen at
    :math:`t`:

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h_i})\,D(x_i, t_i).

    The same as DDIM with ``eta = 0``.  Order 1; one model call per step.  Shapes: ``x``
    ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    ratio, weight = _exp_euler_weights(a, s, _log_snr(process, ts))
    ratio = _scales(ratio, x)
    for i in range(len(tm) - 1):
        x = torch.add(x * ratio[i], model(x, tm[i]), alpha=weight[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def dpm_solver_2(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DPM-Solver-2 (Lu et al., 2022), single-step, in data prediction (DPM-Solver++(2S), Lu et al., 2022b).

    With :math:`r_1 = 1/2`, :math:`u` at :math:`\lambda_i + r_1 h` (its time from
    ``process.t_of_lam``):

    .. math::
        u &= \frac{\sigma_u}{\sigma_i}x_i + \alpha_u(1 - e^{-r_1 h})D_i, \\
        x_{i+1} &= \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h})
                  \Big[D_i + \frac{1}{2r_1}(D(u) - D_i)\Big],

    which for :math:`r_1 = 1/2` is the exponential midpoint rule.  Order 2; two model calls per
    step (one for a step of infinite :math:`h`).  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    lam = _log_snr(process, ts)
    ratio, weight = _exp_euler_weights(a, s, lam)
    tm_u, a_u, s_u = _intermediate(process, ts, lam, 0.5, x)
    n = len(tm) - 1
    finite = [math.isfinite(lam[i + 1] - lam[i]) for i in range(n)]
    # the half step: u = (sigma_u / sigma_i) x - alpha_u expm1(-h/2) D_i
    ratio_u = _scales((s_u[i] / s[i] for i in range(n)), x)
    weight_u = [-a_u[i] * math.expm1(-0.5 * (lam[i + 1] - lam[i])) for i in range(n)]
    ratio = _scales(ratio, x)
    for i in range(n):
        d = model(x, tm[i])
        if finite[i]:  # r1 = 1/2: D_i + (D(u) - D_i) / (2 r1) = D(u)
            d = model(torch.add(x * ratio_u[i], d, alpha=weight_u[i]), tm_u[i])
        x = torch.add(x * ratio[i], d, alpha=weight[i])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def dpm_solver_3(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DPM-Solver-3 (Lu et al., 2022), single-step, in data prediction as in the reference code.

    With :math:`r_1 = 1/3`, :math:`r_2 = 2/3`, :math:`\varphi_1(z) = e^{-z} - 1`,
    :math:`\varphi_2(z) = \varphi_1(z)/z + 1` and points :math:`u_k` at :math:`\lambda_i + r_k h`:

    .. math::
        u_1 &= \tfrac{\sigma_{u_1}}{\sigma_i}x_i - \alpha_{u_1}\varphi_1(r_1h) D_i, \\
        u_2 &= \tfrac{\sigma_{u_2}}{\sigma_i}x_i - \alpha_{u_2}\varphi_1(r_2h) D_i
               + \tfrac{r_2}{r_1}\alpha_{u_2}\varphi_2(r_2h)(D(u_1) - D_i), \\
        x_{i+1} &= \tfrac{\sigma_{i+1}}{\sigma_i}x_i - \alpha_{i+1}\varphi_1(h) D_i
               + \tfrac{1}{r_2}\alpha_{i+1}\varphi_2(h)(D(u_2) - D_i).

    Order 3; three model calls per step (one for a step of infinite :math:`h`).  Shapes: ``x``
    ``(batch, ...)``; returns the same.
    """
    r1, r2 = 1 / 3, 2 / 3
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    lam = _log_snr(process, ts)
    n = len(tm) - 1
    ratio, weight = _exp_euler_weights(a, s, lam)
    tm_1, a_1, s_1 = _intermediate(process, ts, lam, r1, x)
    tm_2, a_2, s_2 = _intermediate(process, ts, lam, r2, x)
    finite = [math.isfinite(lam[i + 1] - lam[i]) for i in range(n)]
    w1, w2, w3 = [], [], []  # weights of D_i in u1; (D_i, D(u1)) in u2; (D_i, D(u2)) in x_{i+1}
    for i in range(n):
        h = lam[i + 1] - lam[i] if finite[i] else 1.0  # unused where h is infinite
        phi2_u2 = math.expm1(-r2 * h) / (r2 * h) + 1
        phi2 = math.expm1(-h) / h + 1
        c2 = r2 / r1 * a_2[i] * phi2_u2  # weight of D(u1) - D_i in u2
        c3 = a[i + 1] * phi2 / r2  # weight of D(u2) - D_i in x_{i+1}
        w1.append(-a_1[i] * math.expm1(-r1 * h))
        w2.append((-a_2[i] * math.expm1(-r2 * h) - c2, c2))
        w3.append((weight[i] - c3, c3))
    ratio, ratio_1, ratio_2 = (
        _scales(ratio, x),
        _scales((s_1[i] / s[i] for i in range(n)), x),
        _scales((s_2[i] / s[i] for i in range(n)), x),
    )
    for i in range(n):
        d = model(x, tm[i])
        if not finite[i]:  # a step of infinite h: first order
            x = torch.add(x * ratio[i], d, alpha=weight[i])
        else:
            d1 = model(torch.add(x * ratio_1[i], d, alpha=w1[i]), tm_1[i])
            u2 = torch.add(x * ratio_2[i], d, alpha=w2[i][0]).add_(d1, alpha=w2[i][1])
            d2 = model(u2, tm_2[i])
            x = torch.add(x * ratio[i], d, alpha=w3[i][0]).add_(d2, alpha=w3[i][1])
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def dpmpp_2m(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DPM-Solver++(2M) (Lu et al., 2022b, Alg. 2): multistep, second order, in data prediction.

    With :math:`r = h_{i-1}/h_i`, the last two denoisings extrapolate :math:`D` to the step:

    .. math::
        x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h_i})
                  \Big[\big(1 + \tfrac{1}{2r}\big)D_i - \tfrac{1}{2r}D_{i-1}\Big].

    The first step, and a step of infinite :math:`h`, are first order (:func:`dpm_solver_1`), as
    in k-diffusion; the reference code's option of lower order in the final steps is left out.
    Order 2; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    lam = _log_snr(process, ts)
    ratio, weight = _exp_euler_weights(a, s, lam)
    ratio = _scales(ratio, x)
    h = [lam[i + 1] - lam[i] for i in range(len(tm) - 1)]
    d_prev = None
    for i in range(len(h)):
        d = model(x, tm[i])
        x = torch.mul(x, ratio[i])
        if d_prev is not None and math.isfinite(h[i]) and math.isfinite(h[i - 1]):
            w = h[i] / (2 * h[i - 1])  # 1 / (2r): D = (1 + w) D_i - w D_{i-1}
            x = x.add_(d, alpha=weight[i] * (1 + w)).add_(d_prev, alpha=-weight[i] * w)
        else:
            x = x.add_(d, alpha=weight[i])
        d_prev = d
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def _multistep_3_weights(h: float, h1: float, h2: float) -> tuple[float, float, float]:
    """The bracket of DPM-Solver++(3M), (1 - e^{-h}) D_i + phi2 d1 - 2 phi3 d2, as weights of
    (D_i, D_{i-1}, D_{i-2}): each divided difference is a vector of such weights."""
    r0, r1 = h1 / h, h2 / h
    delta0 = (1 / r0, -1 / r0, 0.0)  # (D_i - D_{i-1}) / r0
    delta1 = (0.0, 1 / r1, -1 / r1)  # (D_{i-1} - D_{i-2}) / r1
    d2 = [(p - q) / (r0 + r1) for p, q in zip(delta0, delta1, strict=True)]
    d1 = [p + r0 * q for p, q in zip(delta0, d2, strict=True)]
    phi2 = math.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    first = (-math.expm1(-h), 0.0, 0.0)
    return tuple(f + phi2 * p - 2 * phi3 * q for f, p, q in zip(first, d1, d2, strict=True))


def _multistep_2_weights(h: float, h1: float) -> tuple[float, float, float]:
    """The bracket (1 - e^{-h}) D_i + phi2 (D_i - D_{i-1}) / r0 of 3M's second step."""
    phi2_r0 = (math.expm1(-h) / h + 1) * h / h1
    return (-math.expm1(-h) + phi2_r0, -phi2_r0, 0.0)


def dpmpp_3m(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""DPM-Solver++(3M) (Lu et al., 2022b): multistep, third order, in data prediction.

    With :math:`r_0 = h_{i-1}/h_i`, :math:`r_1 = h_{i-2}/h_i`, divided differences of the last
    three denoisings estimate :math:`d_1 \approx h D'` and :math:`d_2 \approx h^2 D''/2`
    (:math:`D' = dD/d\lambda` at :math:`t_i`):

    .. math::
        \delta_0 = \frac{D_i - D_{i-1}}{r_0},\ \delta_1 = \frac{D_{i-1} - D_{i-2}}{r_1},\quad
        d_2 = \frac{\delta_0 - \delta_1}{r_0 + r_1},\ d_1 = \delta_0 + r_0 d_2,

    and the Taylor terms of :math:`\sigma_s\int e^{\lambda}D\,d\lambda` integrate exactly:

    .. math::
        x_{i+1} &= \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}\big[(1 - e^{-h})D_i
                  + \varphi_2 d_1 - 2\varphi_3 d_2\big], \\
        \varphi_2 &= \frac{e^{-h} - 1}{h} + 1,\quad \varphi_3 = \frac{\varphi_2}{h} - \frac12,

    since :math:`\int_0^h e^{u-h}u\,du = h\varphi_2` and
    :math:`\int_0^h e^{u-h}\tfrac{u^2}{2}du = -h^2\varphi_3`.  Departure: the reference codes
    (DPM-Solver's ``multistep_dpm_solver_third_update``, k-diffusion's ``sample_dpmpp_3m_sde``)
    weight :math:`d_2` by :math:`-\varphi_3`, half the Taylor coefficient; a step then fails to
    integrate a quadratic :math:`D(\lambda)` exactly and the method is of order 2 (measured on
    the Gaussian oracle: 2.0 with their weight, 3.0 with this one;
    ``tests/test_against_diffusers.py`` runs diffusers' solver beside this one).  The first two
    steps are first and second order (their start-up error is :math:`O(\alpha_{t_1} h^2)`,
    small where :math:`\alpha_{t_0} \ll 1`); a step of infinite :math:`h` is first order.
    Order 3; one model call per step.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    lam = _log_snr(process, ts)
    n = len(tm) - 1
    h = [lam[i + 1] - lam[i] for i in range(n)]
    finite = [math.isfinite(v) for v in h]  # only a first or last step can be infinite
    brackets = []  # weights of (D_i, D_{i-1}, D_{i-2}): lower order while fewer are known
    for i in range(n):
        if i >= 2 and all(finite[i - 2 : i + 1]):
            brackets.append(_multistep_3_weights(h[i], h[i - 1], h[i - 2]))
        elif i >= 1 and all(finite[i - 1 : i + 1]):
            brackets.append(_multistep_2_weights(h[i], h[i - 1]))
        else:
            brackets.append((-math.expm1(-h[i]), 0.0, 0.0))
    ratio = _scales((s[i + 1] / s[i] for i in range(n)), x)
    history: list[Tensor] = []  # D_{i-1}, D_{i-2}
    for i in range(n):
        d = model(x, tm[i])
        x = torch.mul(x, ratio[i])
        for w, d_k in zip(brackets[i], (d, *history), strict=False):
            if w:
                x = x.add_(d_k, alpha=a[i + 1] * w)
        history = [d, *history[:1]]
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


def _unipc_weights(h: float, r: float) -> tuple[float, float]:
    """UniC-2's (rho0, rho1) for bh2 in data prediction, as in the reference code: they solve
    rho0 + rho1 = b1, r rho0 + rho1 = b2, with b_k = k! (-h) phi_{k+1}(-h) / B(h)."""
    big_b = math.expm1(-h)  # B(h) of bh2, in data prediction; also h phi_1
    k1 = big_b / -h - 1  # the reference code's h_phi_k for k = 1, 2
    k2 = k1 / -h - 0.5
    b1, b2 = k1 / big_b, 2 * k2 / big_b
    rho0 = (b1 - b2) / (1 - r)
    return rho0, b1 - rho0


def unipc(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""UniPC (Zhao et al., 2023): predictor UniP-2 and corrector UniC-2, variant bh2, data prediction.

    With :math:`\hat x = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h})D_i`,
    :math:`B = e^{-h} - 1` (bh2: the paper's :math:`B(h) = e^h - 1`, in data prediction), :math:`r = (\lambda_{i-1} -
    \lambda_i)/h` and :math:`\Delta = (D_{i-1} - D_i)/r`:

    .. math::
        x^{p}_{i+1} = \hat x - \alpha_{i+1} B\,\tfrac12\Delta, \qquad
        x_{i+1} = \hat x - \alpha_{i+1} B\,\big[\rho_0\Delta + \rho_1(D(x^{p}_{i+1}) - D_i)\big],

    where :math:`(\rho_0, \rho_1)` solve :math:`\rho_0 + \rho_1 = b_1`, :math:`r\rho_0 + \rho_1 =
    b_2`, with :math:`b_k = k!\,(-h)\,\varphi_{k+1}(-h)/B`, :math:`\varphi_1(z) = (e^z - 1)/z`,
    :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`, as in the reference code
    (``multistep_uni_pc_bh_update``).  As there, :math:`D(x^{p}_{i+1})`, evaluated at the
    *predicted* state, is reused as :math:`D_{i+1}` by the next step, so the corrector costs
    no call (NFE = steps); the first step is UniP-1 (DDIM) + UniC-1 (:math:`\rho = 1/2`), the last
    step has no corrector, and a step of infinite :math:`h` is first order.  The reference
    code's lower order in the final steps is left out.  Order 3 (UniC raises UniP-2 by one).
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    lam = _log_snr(process, ts)
    n = len(tm) - 1
    ratio, weight = _exp_euler_weights(a, s, lam)  # x_hat = ratio x + weight D_i
    ratio = _scales(ratio, x)
    d, d_prev = model(x, tm[0]), None
    for i in range(n):
        h = lam[i + 1] - lam[i]
        last = i == n - 1
        if not math.isfinite(h):  # a step to sigma = 0 or from alpha = 0: first order
            x = torch.add(x * ratio[i], d, alpha=weight[i])
            d, d_prev = (None if last else model(x, tm[i + 1])), None
        else:
            scale = -a[i + 1] * math.expm1(-h)  # -alpha_{i+1} B(h)
            x_ratio = x * ratio[i]  # shared by the predictor and the corrector
            if d_prev is None:  # UniP-1 is the DDIM step; UniC-1 has rho = 1/2
                x_pred = torch.add(x_ratio, d, alpha=weight[i])
                q0, rho1 = 0.0, 0.5
            else:
                r = (lam[i - 1] - lam[i]) / h
                rho0, rho1 = _unipc_weights(h, r)
                # Delta = (D_{i-1} - D_i) / r; UniP-2: x_hat + scale Delta / 2
                p0, q0 = scale * 0.5 / r, scale * rho0 / r
                x_pred = torch.add(x_ratio, d, alpha=weight[i] - p0).add_(d_prev, alpha=p0)
            if last:
                x = x_pred
            else:
                d_next = model(x_pred, tm[i + 1])
                # corrector: x_hat + scale (rho0 Delta + rho1 (D_next - D_i))
                x = torch.add(x_ratio, d, alpha=weight[i] - q0 - scale * rho1)
                if d_prev is not None:
                    x = x.add_(d_prev, alpha=q0)
                x = x.add_(d_next, alpha=scale * rho1)
                d_prev, d = d, d_next
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


_ADAMS_BASHFORTH = (
    (1.0,),
    (1.5, -0.5),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def plms(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Pseudo linear multistep (PLMS; Liu et al., 2022), as in the Latent Diffusion sampler.

    The noise predictions :math:`e_i = (x_i - \alpha_i D_i)/\sigma_i` are combined with the
    Adams–Bashforth weights, :math:`e' = (55e_i - 59e_{i-1} + 37e_{i-2} - 9e_{i-3})/24` (the
    AB2 and AB3 weights while fewer are known), and moved by the DDIM transfer

    .. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}(x_i - \sigma_i e') + \sigma_{i+1}e'.

    The first step is a pseudo improved Euler step, :math:`e' = (e_i + e(\tilde x, t_{i+1}))/2`
    with :math:`\tilde x` the DDIM step, as in Latent Diffusion; the paper warms up with three
    pseudo Runge–Kutta steps of four calls instead.  In :math:`y = x/\alpha` and the noise level
    :math:`\bar\sigma = \sigma/\alpha` the transfer is Euler's method for :math:`dy/d\bar\sigma
    = e`, so the fixed Adams–Bashforth weights are exact only on a grid with equal steps in
    :math:`\bar\sigma` (``time_grid(..., kind="karras", rho=1)``): there the AB4 body is of
    order 4 and the second-order start adds one :math:`O(h^3)` term, so the order is 3 at least
    (about 4 until that small term shows).  On the other grids (log-SNR, uniform in ``t``) the
    weights are off by :math:`O(h)` and the order is 2.
    Needs :math:`\alpha > 0` on the grid.  NFE = steps + 1.  Shapes: ``x`` ``(batch, ...)``;
    returns the same.
    """
    ts, tm = _prepare(ts, x)
    a, s, _, _ = _coefficients(process, ts)
    _need_positive_alpha("plms", a, ts, "its DDIM transfer divides by alpha")
    n = len(tm) - 1
    # DDIM transfer: x_{i+1} = (alpha_{i+1}/alpha_i) x + (sigma_{i+1} - alpha_{i+1} sigma_i/alpha_i) e'
    ratio = _scales((a[i + 1] / a[i] for i in range(n)), x)
    gain = [s[i + 1] - a[i + 1] * s[i] / a[i] for i in range(n)]

    def scaled_noise(x, i):  # sigma_i e_i = x - alpha_i D(x, t_i); 1/sigma_i goes to the weights
        return torch.sub(x, model(x, tm[i]), alpha=a[i])

    history: list[tuple[Tensor, float]] = []  # (sigma_k e_k, sigma_k), newest first
    for i in range(n):
        r = scaled_noise(x, i)
        if not history and s[i + 1] > 0:  # pseudo improved Euler: e' = (e_i + e(x_tilde)) / 2
            r_next = scaled_noise(torch.add(x * ratio[i], r, alpha=gain[i] / s[i]), i + 1)
            x = torch.mul(x, ratio[i]).add_(r, alpha=0.5 * gain[i] / s[i])
            x = x.add_(r_next, alpha=0.5 * gain[i] / s[i + 1])
        else:
            weights = _ADAMS_BASHFORTH[len(history)]
            x = torch.mul(x, ratio[i])
            for w, (r_k, s_k) in zip(weights, [(r, s[i]), *history], strict=False):
                x = x.add_(r_k, alpha=w * gain[i] / s_k)
        history = [(r, s[i]), *history[:2]]
        if callback is not None:
            callback(i, tm[i + 1], x)
    return _finish(model, x, tm[-1], denoise_last)


#: Every sampler of this module by its name, all with the signature
#: ``sampler(model, x, ts, process, **options)``.
SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "heun": heun,
    "ddpm": ddpm,
    "ddim": ddim,
    "euler_maruyama": euler_maruyama,
    "pc": pc,
    "annealed_langevin": annealed_langevin,
    "dpm_solver_1": dpm_solver_1,
    "dpm_solver_2": dpm_solver_2,
    "dpm_solver_3": dpm_solver_3,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "plms": plms,
}

_CALLS_PER_STEP = {"heun": 2, "dpm_solver_2": 2, "dpm_solver_3": 3}


def model_calls(name: str, n_steps: int, **options) -> int:
    """The number of model calls (NFE) of ``SAMPLERS[name]`` over ``n_steps`` steps.

    For a grid with :math:`0 < \\sigma` at ``ts[-1]`` and :math:`0 < \\alpha` at ``ts[0]`` (no step
    of infinite log-SNR length), with the sampler's options (``n_corrector``, ``n_steps_each``,
    ``denoise_last``).
    """
    if name not in SAMPLERS:
        raise ValueError(f"name must be one of {tuple(SAMPLERS)}, got name = {name!r}")
    require(_is_count(n_steps, 1), "n_steps", n_steps, "an integer >= 1")
    if name == "pc":
        per_step = 1 + options.get("n_corrector", 1)
    elif name == "annealed_langevin":
        per_step = options.get("n_steps_each", 1)
    else:
        per_step = _CALLS_PER_STEP.get(name, 1)
    extra = 1 if name == "plms" else 0
    return per_step * n_steps + extra + int(bool(options.get("denoise_last", False)))


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
        _is_real(t_skip) and t_last < t_skip <= t_first,
        "t_skip",
        t_skip,
        f"a number in (ts[-1], ts[0]] = ({t_last:.6g}, {t_first:.6g}]",
    )
    if t_skip < t_first:  # the closed-form jump; none when t_skip = ts[0]
        x = gaussian.pf_ode_map(x, ts[0], t_skip, process)
    tail = torch.cat([ts.new_tensor([t_skip]), ts[ts < t_skip]])
    return sampler(model, x, tail, process, **options)
