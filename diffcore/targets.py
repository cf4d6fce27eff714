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

import torch
from torch import Tensor

from diffcore.checks import Deferred, one_of, per_sample, returned, same_shape
from diffcore.processes import Process

__all__ = ["TARGETS", "convert", "as_denoiser", "pf_ode_velocity"]

#: The quantities a network may predict, by their names in :func:`convert`.
TARGETS = ("eps", "x0", "score", "v", "velocity")


def _check_target(name: str, role: str) -> None:
    one_of(name, role, TARGETS)


def _undefined(source: str, target: str, a, s, da, ds) -> list[tuple[Tensor, str]]:
    """Where the conversion is undefined: a division by a zero coefficient, or an infinite
    coefficient, in a term that the result uses.  Returns (condition, reason) pairs, each
    condition a boolean shaped like the coefficients, True where undefined."""
    found = []
    if source in ("eps", "score") and target != "eps":  # x0 = (x - sigma eps) / alpha
        uses_x0 = {"x0": True, "v": s != 0, "velocity": da != 0}.get(target, False)
        if uses_x0 is not False:
            found.append(
                (uses_x0 & (a == 0), "alpha_t = 0, where x0 = (x - sigma_t eps) / alpha_t")
            )
    if source == "x0":  # eps = (x - alpha x0) / sigma
        uses_eps = {"eps": True, "score": True, "v": a != 0, "velocity": ds != 0}[target]
        found.append((uses_eps & (s == 0), "sigma_t = 0, where eps = (x - alpha_t x0) / sigma_t"))
    if source == "velocity":
        det = a * ds - s * da
        found.append(
            (
                ~torch.isfinite(det) | (det == 0),
                "alpha_t dsigma_t - sigma_t dalpha_t is 0 or infinite, where x0 and eps are "
                "solved from the velocity",
            )
        )
    if target == "score":
        found.append((s == 0, "sigma_t = 0, where the score -eps / sigma_t is infinite"))
    if target == "velocity":
        found.append(
            (~(torch.isfinite(da) & torch.isfinite(ds)), "dalpha_t or dsigma_t is infinite")
        )
    return found


def _undefined_error(source, target, t: Tensor, bad: Tensor, reason: str, process) -> ValueError:
    t_bad = t.expand(bad.shape)[bad] if t.ndim else t
    shown = ", ".join(f"{v:.6g}" for v in t_bad.flatten()[:6].tolist())
    return ValueError(
        f"cannot convert {source!r} into {target!r} at t = {shown} under {process!r}: "
        f"{reason} is undefined there; take t inside (0, 1) or predict {target!r} directly"
    )


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
    r"""Convert a prediction of ``source`` at ``(x, t)`` into the equivalent ``target``.

    ``pred`` and ``x`` must be finite float32 or float64 tensors.  Where the conversion is
    undefined it raises rather than return infinities: from ``"eps"`` or ``"score"`` to a target
    that needs :math:`x_0` where :math:`\alpha_t = 0` (``Linear`` at ``t = 1``), from ``"x0"``
    to one that needs :math:`\varepsilon` where :math:`\sigma_t = 0` (VP and Linear at
    ``t = 0``), to ``"score"`` where :math:`\sigma_t = 0`, and through ``"velocity"`` where its
    coefficients are infinite or singular.  Shapes: ``pred`` and ``x`` are ``(batch, ...)``;
    ``t`` is a float, ``()`` or ``(batch,)``; returns ``(batch, ...)``.
    """
    _check_target(source, "source")
    _check_target(target, "target")
    check = Deferred()
    check.finite(pred, "pred")
    check.finite(x, "x")
    same_shape(pred, x, "pred", "x")
    t = check.time(t, like=x)
    if source == target:
        check.done()
        return pred
    coefs = (process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t))
    for bad, reason in _undefined(source, target, *coefs):
        check.require(
            ~bad, lambda b=bad, r=reason: _undefined_error(source, target, t, b, r, process)
        )
    check.done()  # one read-back for the data and the ends, before the conversion
    a, s, da, ds = (per_sample(c, x) for c in coefs)
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
        return convert(returned(model(x, t), x, "model"), source, "x0", x, t, process)

    denoiser.__doc__ = f"Denoiser built from a {source!r}-prediction model under {process!r}."
    return denoiser


def pf_ode_velocity(denoiser: Callable, x: Tensor, t, process: Process) -> Tensor:
    r"""The probability-flow ODE velocity :math:`dx/dt = \dot\alpha_t D + \dot\sigma_t (x - \alpha_t D)/\sigma_t`.

    This equals :math:`f(t) x - \tfrac12 g^2(t) \nabla\log p_t(x)` and stays finite where
    :math:`\alpha_t = 0`.  Shapes: ``x`` is ``(batch, ...)``; returns ``(batch, ...)``.
    """
    return convert(returned(denoiser(x, t), x, "denoiser"), "x0", "velocity", x, t, process)
