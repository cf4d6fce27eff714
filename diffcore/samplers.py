r"""Samplers: one signature for all, ``sampler(model, x, ts, process, **options)``.

``model(x, t)`` is the denoiser :math:`D(x, t) \approx \mathbb E[x_0 \mid x_t = x]` (see
:func:`diffcore.targets.as_denoiser`), ``x`` the start noise at time ``ts[0]``
(``process.prior_sample``), and ``ts`` a strictly decreasing 1-D tensor of times from
:func:`time_grid`.  A sampler integrates from ``ts[0]`` to ``ts[-1]`` and returns the state
there; with ``denoise_last=True`` it returns :math:`D(x, t_{\text{last}})` instead.
``callback(i, t, x)``, when given, is called after step ``i`` with the state ``x`` at time
``t = ts[i + 1]`` (to record a trajectory).  ``SAMPLERS`` maps names to samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffcore._checks import as_time
from diffcore.processes import Process

__all__ = ["time_grid", "check_time_grid", "euler", "heun", "SAMPLERS", "GRIDS"]

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

    ``t_min > 0`` keeps the last time where :math:`\sigma_t > 0` (for VP and Linear,
    :math:`\lambda_0 = \infty`); the sample is then an :math:`x_{t_{\min}}`, and
    ``denoise_last=True`` in the sampler maps it to data.
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


def _coefficients(process: Process, ts: Tensor) -> tuple[list[float], ...]:
    """alpha, sigma and their time derivatives on the whole grid, computed once, as floats."""
    coefs = (process.alpha(ts), process.sigma(ts), process.d_alpha(ts), process.d_sigma(ts))
    return tuple(c.tolist() for c in coefs)


def _velocity(model: Callable, x: Tensor, t: Tensor, a, s, da, ds) -> Tensor:
    """PF-ODE velocity from the denoiser: u = da * x0_hat + ds * eps_hat (see ``targets``)."""
    x0 = model(x, t)
    return da * x0 + ds * (x - a * x0) / s


def _finish(model: Callable, x: Tensor, t: Tensor, denoise_last: bool) -> Tensor:
    return model(x, t) if denoise_last else x


def euler(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Euler's method on the PF-ODE: :math:`x_{i+1} = x_i + (t_{i+1} - t_i)\,u(x_i, t_i)`.

    :math:`u = \dot\alpha_t \hat x_0 + \dot\sigma_t \hat\varepsilon` is the PF-ODE velocity.
    Order 1; ``len(ts) - 1`` model calls.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts = check_time_grid(ts).to(device=x.device, dtype=x.dtype)
    a, s, da, ds = _coefficients(process, ts)
    for i in range(len(ts) - 1):
        h = float(ts[i + 1] - ts[i])
        x = x + h * _velocity(model, x, ts[i], a[i], s[i], da[i], ds[i])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return _finish(model, x, ts[-1], denoise_last)


def heun(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: Process,
    denoise_last: bool = False,
    callback: Callable | None = None,
) -> Tensor:
    r"""Heun's method (explicit trapezoid) on the PF-ODE, as in EDM's deterministic sampler.

    :math:`\tilde x = x_i + h\,u(x_i, t_i)`, then
    :math:`x_{i+1} = x_i + \tfrac h2\,(u(x_i, t_i) + u(\tilde x, t_{i+1}))`, with
    :math:`h = t_{i+1} - t_i`.  A step that ends where :math:`\sigma_t = 0` is an Euler step,
    since the velocity is not defined there.  Order 2; ``2 (len(ts) - 1)`` model calls, one
    fewer when ``ts[-1]`` has :math:`\sigma = 0`.  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    ts = check_time_grid(ts).to(device=x.device, dtype=x.dtype)
    a, s, da, ds = _coefficients(process, ts)
    for i in range(len(ts) - 1):
        h = float(ts[i + 1] - ts[i])
        u = _velocity(model, x, ts[i], a[i], s[i], da[i], ds[i])
        x_euler = x + h * u
        if s[i + 1] == 0:
            x = x_euler
        else:
            u_next = _velocity(model, x_euler, ts[i + 1], a[i + 1], s[i + 1], da[i + 1], ds[i + 1])
            x = x + 0.5 * h * (u + u_next)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return _finish(model, x, ts[-1], denoise_last)


SAMPLERS: dict[str, Callable] = {"euler": euler, "heun": heun}
