r"""Exact log-likelihood through the probability-flow ODE (Song et al., 2021, Appendix D).

Along a solution of the PF-ODE :math:`\dot x_t = u(x_t, t)` the log-density obeys the
instantaneous change of variables (Chen et al., 2018)

.. math::
    \frac{d}{dt}\log p_t(x_t) &= -\nabla\cdot u(x_t, t),
    \qquad\text{so} \\
    \log p_{t_{\min}}(x) &= \log p_{t_{\max}}(x_{t_{\max}})
        + \int_{t_{\min}}^{t_{\max}} \nabla\cdot u(x_t, t)\,dt .

:func:`log_likelihood` integrates the augmented state :math:`[x_t, \int \nabla\cdot u]`
forward from the data at :math:`t_{\min}` to :math:`t_{\max}` with the classical
fourth-order Runge-Kutta method on a fixed grid (global error :math:`O(h^4)`), equally
spaced in log-SNR by default, then adds the prior log-density at :math:`t_{\max}`.
The divergence is exact (one backward pass per coordinate, for low dimension) or
Hutchinson's unbiased estimate :math:`\mathbb E_v[v^\top (\partial u/\partial x) v]` with
probes :math:`v` drawn once per solve (for images).  The velocity comes from a denoiser
(:func:`diffcore.targets.pf_ode_velocity`), the currency of every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.analytic import GaussianMixture
from diffcore.checks import count, finite, floating, one_of, real, returned, returned_shape
from diffcore.processes import Process
from diffcore.samplers import time_grid
from diffcore.targets import pf_ode_velocity

__all__ = ["value_and_divergence", "log_likelihood", "elbo_end_terms", "bits_per_dim"]


def value_and_divergence(fn: Callable, x: Tensor, probes: Tensor | None = None):
    r"""``fn(x)`` and its divergence :math:`\nabla\cdot f(x) = \sum_i \partial f_i / \partial x_i` per sample.

    ``probes=None``: exact, one backward pass per data dimension.  Otherwise Hutchinson's
    estimate :math:`\frac1n\sum_j v_j^\top J v_j` over the ``n`` probes ``(n, batch, ...)``;
    it is unbiased when :math:`\mathbb E[v v^\top] = I` (Rademacher or Gaussian entries).
    ``fn`` must treat samples independently (no batch statistics).  Shapes: ``x``
    ``(batch, ...)``; returns ``fn(x)`` (shape of ``x``) and ``(batch,)``, both detached.
    """
    finite(x, "x")
    if probes is not None:
        finite(probes, "probes")
        if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape or len(probes) == 0:
            raise ValueError(
                f"probes must have shape (n, *x.shape) = (n, {', '.join(map(str, x.shape))}) with "
                f"n >= 1, got probes of shape {tuple(probes.shape)}"
            )
    return _value_and_divergence(fn, x, probes)


def _value_and_divergence(fn: Callable, x: Tensor, probes: Tensor | None):
    """:func:`value_and_divergence` without the checks of its inputs (made once per solve by
    :func:`log_likelihood`, not at each of its steps); ``fn``'s output shape is checked."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = returned(fn(x), x, "fn")
        if probes is None:
            flat = value.flatten(1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
                div = div + grad.flatten(1)[:, i]
        else:
            div = 0
            for v in probes:
                (grad,) = torch.autograd.grad((value * v).sum(), x, retain_graph=True)
                div = div + (grad * v).flatten(1).sum(1)
            div = div / len(probes)
    return value.detach(), div.detach()


def _check_batch(x, name: str) -> Tensor:
    """A batch ``(batch, ...)`` of finite real float32 or float64 data, batch >= 1."""
    if isinstance(x, Tensor) and (x.ndim < 2 or x.shape[0] == 0):
        raise ValueError(f"{name} must be a floating tensor (batch, ...), got {tuple(x.shape)}")
    finite(floating(x, name), name)
    return x


def _probes(kind: str, n: int, x: Tensor, generator) -> Tensor:
    device = generator.device if generator is not None else x.device
    shape = (n, *x.shape)
    if kind == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=x.dtype, device=device)
    else:
        v = 2 * torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) - 1
    return v.to(x.device)


def _standard_normal_log_prob(x: Tensor, sigma: Tensor) -> Tensor:
    """:math:`\\log\\mathcal N(x; 0, \\sigma^2 I)` per sample."""
    d = x[0].numel()
    return (
        -0.5 * (x.flatten(1) ** 2).sum(1) / sigma**2
        - 0.5 * d * math.log(2 * math.pi)
        - d * torch.log(sigma)
    )


def log_likelihood(
    denoiser: Callable,
    x: Tensor,
    process: Process,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    n_steps: int = 64,
    grid: str = "logsnr",
    divergence: str = "exact",
    probe: str = "rademacher",
    n_probes: int = 1,
    prior: Callable | GaussianMixture | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The log-density :math:`\log p_{t_{\min}}(x)` in nats, through the PF-ODE of ``denoiser``.

    - ``grid``: the ``n_steps``-step time grid of :func:`diffcore.samplers.time_grid`
      (``"logsnr"`` needs a finite log-SNR at ``t_max``: for Linear take ``t_max < 1`` or
      ``grid="uniform"``).  Four velocity evaluations per step (RK4).
    - ``divergence``: ``"exact"`` or ``"hutchinson"``, with ``n_probes`` probes of kind
      ``probe`` (``"rademacher"`` or ``"gaussian"``) from ``generator``.  The estimate of
      :math:`\log p` is then unbiased (the trajectory does not depend on the probes).
    - ``prior``: the log-density at ``t_max``.  None: :math:`\mathcal N(0, \sigma_{t_{\max}}^2 I)`,
      which ignores the signal :math:`\alpha_{t_{\max}} x_0` left at ``t_max`` (exact for
      Linear at ``t_max = 1``).  A :class:`~diffcore.analytic.GaussianMixture` is taken as
      the *data* law and its exact time-``t_max`` marginal is used; a callable
      ``prior(x) -> (batch,)`` is used as is.

    With the exact denoiser of a mixture and that mixture as prior, the result equals
    ``mixture.log_prob(x, t_min, process)`` up to the integrator's :math:`O(h^4)` error.
    Shapes: ``x`` ``(batch, ...)``; returns ``(batch,)``.
    """
    _check_batch(x, "x")
    one_of(divergence, "divergence", ("exact", "hutchinson"))
    one_of(probe, "probe", ("rademacher", "gaussian"))
    n_probes = count(n_probes, "n_probes")
    n_steps = count(n_steps, "n_steps")
    real(t_min, "t_min")
    real(t_max, "t_max")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min = {t_min}, t_max = {t_max}")
    if prior is not None and not (isinstance(prior, GaussianMixture) or callable(prior)):
        raise TypeError(
            f"prior must be None, a GaussianMixture or a function x -> (batch,), got {prior!r}"
        )
    ts = time_grid(process, n_steps, kind=grid, t_min=t_min, t_max=t_max, dtype=x.dtype)
    ts = ts.flip(0).to(x.device)  # increasing: from the data towards the noise
    probes = _probes(probe, n_probes, x, generator) if divergence == "hutchinson" else None

    def rhs(state: Tensor, t: Tensor):
        return _value_and_divergence(
            lambda y: pf_ode_velocity(denoiser, y, t, process), state, probes
        )

    integral = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    x = x.detach()
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        h = t1 - t0
        k1, d1 = rhs(x, t0)
        k2, d2 = rhs(x + 0.5 * h * k1, t0 + 0.5 * h)
        k3, d3 = rhs(x + 0.5 * h * k2, t0 + 0.5 * h)
        k4, d4 = rhs(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        integral = integral + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    if prior is None:
        prior_log_prob = _standard_normal_log_prob(x, process.sigma(ts[-1]))
    elif isinstance(prior, GaussianMixture):
        prior_log_prob = prior.log_prob(x, ts[-1], process)
    else:
        prior_log_prob = returned_shape(prior(x), (x.shape[0],), "prior")
    return prior_log_prob + integral


def elbo_end_terms(
    x0: Tensor, process: Process, t_min: float = 1e-3, t_max: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""The two ends of the negative ELBO, per sample in nats: ``(prior, reconstruction)``.

    With the prior :math:`\mathcal N(0, \sigma_{t_{\max}}^2 I)` of :func:`log_likelihood` and
    the Gaussian decoder :math:`p(x_0 \mid x_{t_{\min}}) = \mathcal N(x_{t_{\min}}/\alpha,\,
    (\sigma/\alpha)^2 I)` at :math:`t_{\min}` (Kingma et al., 2021, with a continuous decoder),

    .. math::
        L_{\text{prior}} = \mathrm{KL}\big(q(x_{t_{\max}} \mid x_0)\,\Vert\,
            \mathcal N(0, \sigma_{t_{\max}}^2 I)\big)
            = \frac{\alpha_{t_{\max}}^2 \lVert x_0\rVert^2}{2\sigma_{t_{\max}}^2},

    .. math::
        L_{\text{rec}} = \mathbb E_q\big[-\log p(x_0 \mid x_{t_{\min}})\big]
            = \frac d2 \log\Big(2\pi e\,\frac{\sigma_{t_{\min}}^2}{\alpha_{t_{\min}}^2}\Big),

    so that ``prior + train.elbo_loss(...) + reconstruction`` is the negative ELBO of a
    continuous density, an upper bound on :math:`-\log p(x_0)`; with the exact denoiser it is
    tight as :math:`t_{\min} \to 0` and :math:`\alpha_{t_{\max}} \to 0`.  The reconstruction
    term is negative for small :math:`t_{\min}`: it is a density, not a probability (see
    :func:`bits_per_dim` for discrete data).  Shapes: ``x0`` ``(batch, ...)``; returns two
    ``(batch,)`` tensors.
    """
    _check_batch(x0, "x0")
    real(t_min, "t_min")
    real(t_max, "t_max")
    if not (0 < t_min < t_max <= 1):
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min = {t_min}, t_max = {t_max}")
    ends = torch.tensor([t_min, t_max], dtype=torch.float64)  # the schedule in double precision
    alpha, sigma = process.alpha(ends).tolist(), process.sigma(ends).tolist()
    snr_end = (alpha[1] / sigma[1]) ** 2
    prior = 0.5 * snr_end * x0.flatten(1).pow(2).sum(1)
    d = x0[0].numel()
    noise_to_signal = (sigma[0] / alpha[0]) ** 2
    reconstruction = x0.new_full(
        (x0.shape[0],), 0.5 * d * math.log(2 * math.pi * math.e * noise_to_signal)
    )
    return prior, reconstruction


def bits_per_dim(log_prob: Tensor, d: int, levels: int = 256) -> Tensor:
    r"""Convert a log-density in nats of data in [-1, 1] into bits per dimension of discrete data.

    The convention: integer data :math:`k \in \{0, \dots, L - 1\}` (``levels`` :math:`= L`)
    scaled to :math:`x = 2k/(L - 1) - 1`, so that each value owns a bin of width
    :math:`\Delta = 2/(L - 1)` (1/127.5 for 8-bit data; 1/8 for :func:`diffcore.data.digits`,
    ``levels=17``).  Taking the density as constant over each bin,
    :math:`P(k) \approx p(x)\,\Delta^d`, hence

    .. math::
        \text{bpd} = \frac{-\log p(x) - d\log\Delta}{d\,\log 2},

    i.e. :math:`d \log 127.5` nats are added for 8-bit data.  (Averaged over uniform
    dequantisation noise, this bounds the discrete negative log-likelihood from above;
    Theis et al., 2016.)  Shapes: ``log_prob`` any; returns the same shape.
    """
    d = count(d, "d")
    levels = count(levels, "levels", low=2)
    floating(log_prob, "log_prob")
    log_bin = math.log(2 / (levels - 1))
    return (-log_prob / d - log_bin) / math.log(2)
