r"""One model, five targets: conversions between the quantities a network may predict.

Given :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, a prediction of any one of

==============  ============================================================
``"eps"``       the noise :math:`\varepsilon`
``"x0"``        the clean data :math:`x_0` (the denoiser :math:`D(x_t, t)`)
``"score"``     :math:`\nabla \log p_t(x_t) = -\varepsilon / \sigma_t`
``"v"``         :math:`v = \alpha_t \varepsilon - \sigma_t x_0` (Salimans & Ho)
``"velocity"``  the PF-ODE velocity :math:`\dot\alpha_t x_0 + \dot\sigma_t \varepsilon`
==============  ============================================================

fixes all the others, because :math:`x_t` and :math:`t` are known.  Every conversion goes
through the pair :math:`(\hat x_0, \hat\varepsilon)`.  For :class:`~diffcore.processes.Linear`
the velocity is :math:`\varepsilon - x_0`, the flow-matching target.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from diffcore._checks import as_time, per_sample, same_shape
from diffcore.processes import Process

__all__ = ["TARGETS", "convert", "as_denoiser", "pf_ode_velocity"]

#: The quantities a network may predict, by their names in :func:`convert`.
TARGETS = ("eps", "x0", "score", "v", "velocity")


def _check_target(name: str, role: str) -> None:
    if name not in TARGETS:
        raise ValueError(f"{role} must be one of {TARGETS}, got {role} = {name!r}")


def _to_x0_eps(pred: Tensor, source: str, x: Tensor, a, s, da, ds) -> tuple[Tensor, Tensor]:
    if source == "eps":
        return (x - s * pred) / a, pred
    if source == "x0":
        return pred, (x - a * pred) / s
    if source == "score":
        eps = -s * pred
        return (x - s * eps) / a, eps
    if source == "v":
        norm = a**2 + s**2
        return (a * x - s * pred) / norm, (s * x + a * pred) / norm
    # velocity u = da x0 + ds eps together with x = a x0 + s eps: a 2x2 linear system
    det = a * ds - s * da
    return (ds * x - s * pred) / det, (a * pred - da * x) / det


def _from_x0_eps(x0: Tensor, eps: Tensor, target: str, a, s, da, ds) -> Tensor:
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "score":
        return -eps / s
    if target == "v":
        return a * eps - s * x0
    return da * x0 + ds * eps


def convert(pred: Tensor, source: str, target: str, x: Tensor, t, process: Process) -> Tensor:
    """Convert a prediction of ``source`` at ``(x, t)`` into the equivalent ``target``.

    Shapes: ``pred`` and ``x`` are ``(batch, ...)``; ``t`` is a float, ``()`` or ``(batch,)``;
    returns ``(batch, ...)``.
    """
    _check_target(source, "source")
    _check_target(target, "target")
    same_shape(pred, x, "pred", "x")
    if source == target:
        return pred
    t = as_time(t, like=x)
    a, s, da, ds = (
        per_sample(c, x)
        for c in (process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t))
    )
    x0, eps = _to_x0_eps(pred, source, x, a, s, da, ds)
    return _from_x0_eps(x0, eps, target, a, s, da, ds)


def as_denoiser(model: Callable, source: str, process: Process) -> Callable:
    """Turn ``model(x, t) -> source`` into the denoiser ``D(x, t) -> x0``, the samplers' currency.

    Shapes: ``D`` maps ``x`` ``(batch, ...)`` and ``t`` (float, ``()`` or ``(batch,)``) to
    ``(batch, ...)``.
    """
    _check_target(source, "source")
    if source == "x0":
        return model

    def denoiser(x: Tensor, t) -> Tensor:
        return convert(model(x, t), source, "x0", x, t, process)

    denoiser.__doc__ = f"Denoiser built from a {source!r}-prediction model under {process!r}."
    return denoiser


def pf_ode_velocity(denoiser: Callable, x: Tensor, t, process: Process) -> Tensor:
    r"""The probability-flow ODE velocity :math:`dx/dt = \dot\alpha_t D + \dot\sigma_t (x - \alpha_t D)/\sigma_t`.

    This equals :math:`f(t) x - \tfrac12 g^2(t) \nabla\log p_t(x)` and stays finite where
    :math:`\alpha_t = 0`.  Shapes: ``x`` is ``(batch, ...)``; returns ``(batch, ...)``.
    """
    return convert(denoiser(x, t), "x0", "velocity", x, t, process)
