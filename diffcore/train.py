r"""Training: the losses of the variational, score and flow views, and one training loop.

Every loss is a regression.  Per sample it draws a time :math:`t` and noise
:math:`\varepsilon \sim \mathcal N(0, I)`, forms :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`,
and compares the model output with a target :math:`y = c_0(t)\,x_0 + c_\varepsilon(t)\,\varepsilon`:

.. math::
    L(\theta) = \mathbb E_{t, x_0, \varepsilon}\, w(t)\,\lVert F_\theta(x_t, t) - y \rVert^2 ,

the squared norm summed over the data dimensions, the expectation estimated by the batch
mean.  Its minimiser is :math:`F^*(x, t) = \mathbb E[y \mid x_t = x]`, whatever :math:`w > 0`:
the weighting changes the emphasis across noise levels, not the optimum.  The targets:

==============  ==================================================  ===================================
``"eps"``       :math:`\varepsilon`                                 DDPM (Ho et al., 2020)
``"x0"``        :math:`x_0`                                         the denoiser itself
``"score"``     :math:`-\varepsilon/\sigma_t`                       DSM (Song & Ermon, 2019)
``"v"``         :math:`\alpha_t\varepsilon - \sigma_t x_0`          Salimans & Ho (2022)
``"velocity"``  :math:`\dot\alpha_t x_0 + \dot\sigma_t\varepsilon`  flow matching (Lipman et al., 2023)
==============  ==================================================  ===================================

A loss takes ``(model, x0, process, ...)`` with ``x0`` ``(batch, ...)``, calls
``model(x_t, t)`` (or ``model(x_t, t, label)``) with ``t`` of shape ``(batch,)``, and returns
a scalar.  Random draws come from ``generator`` (a ``torch.Generator``, on any device) and
are moved to the device of ``x0``.  :func:`fit` trains a model on any of these losses.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import scipy.optimize
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffcore.checks import (
    between,
    count,
    finite,
    floating,
    one_of,
    per_sample,
    positive,
    real,
    returned,
    returned_shape,
    same_shape,
)
from diffcore.processes import Linear, Process
from diffcore.targets import TARGETS

__all__ = [
    "uniform_time",
    "uniform_logsnr_time",
    "drop_labels",
    "diffusion_loss",
    "eps_loss",
    "x0_loss",
    "v_loss",
    "elbo_weighting",
    "elbo_loss",
    "dsm_loss",
    "ot_pairing",
    "cfm_loss",
    "reflow_pairs",
    "reflow_loss",
    "EMA",
    "fit",
]


# -- random draws ----------------------------------------------------------------------------
def _rand(draw: Callable, shape, generator, like: Tensor, dtype=None) -> Tensor:
    """``torch.rand``/``randn`` on the generator's device, then moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    out = draw(shape, generator=generator, dtype=dtype or like.dtype, device=device)
    return out.to(like.device)


def uniform_time(t_min: float = 1e-3, t_max: float = 1.0) -> Callable:
    """A time sampler ``(n, generator=None) -> (n,)``: uniform on ``[t_min, t_max)``, float64.

    ``t_min > 0`` keeps :math:`\\sigma_t > 0` (VP and Linear have :math:`\\sigma_0 = 0`, where
    the score target and the ELBO weight are infinite).
    """
    real(t_min, "t_min")
    real(t_max, "t_max")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min = {t_min}, t_max = {t_max}")

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        n = count(n, "n", low=0)
        device = generator.device if generator is not None else None
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return t_min + (t_max - t_min) * u

    sample.t_min, sample.t_max = t_min, t_max
    sample.density = lambda t: torch.full_like(t, 1 / (t_max - t_min))
    return sample


def uniform_logsnr_time(process: Process, t_min: float = 1e-3, t_max: float = 1.0) -> Callable:
    r"""A time sampler ``(n, generator=None) -> (n,)`` with the log-SNR uniform, float64.

    Draws :math:`\lambda` uniform between :math:`\lambda_{t_{\max}}` and
    :math:`\lambda_{t_{\min}}` and returns :math:`t = t(\lambda)`: the time density is
    :math:`q(t) = -\dot\lambda_t / (\lambda_{t_{\min}} - \lambda_{t_{\max}})`, exposed as
    ``sampler.density(t)``.  It is the importance law that makes the ELBO weight of the
    :math:`\varepsilon`-loss constant (Kingma et al., 2021): each noise level in log-SNR
    counts once, where uniform times spend most draws at high noise.  Needs a finite
    :math:`\lambda` at both ends (``t_min > 0``; for Linear, ``t_max < 1``).
    """
    real(t_min, "t_min")
    real(t_max, "t_max")
    if not 0 < t_min < t_max <= 1:
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min = {t_min}, t_max = {t_max}")
    lam_high, lam_low = float(process.lam(t_min)), float(process.lam(t_max))
    if not (math.isfinite(lam_high) and math.isfinite(lam_low)):
        raise ValueError(
            f"the log-SNR must be finite at both ends, got lambda = {lam_high} at t_min = "
            f"{t_min} and lambda = {lam_low} at t_max = {t_max}"
        )

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        n = count(n, "n", low=0)
        device = generator.device if generator is not None else None
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return process.t_of_lam(lam_high + (lam_low - lam_high) * u)

    def density(t: Tensor) -> Tensor:
        lam_dot = process.d_alpha(t) / process.alpha(t) - process.d_sigma(t) / process.sigma(t)
        return -lam_dot / (lam_high - lam_low)

    sample.t_min, sample.t_max, sample.density = t_min, t_max, density
    return sample


def drop_labels(label: Tensor, p_uncond: float, null_label: int, generator=None) -> Tensor:
    """Replace each label by ``null_label`` with probability ``p_uncond``, independently.

    Training with dropped labels teaches one network both :math:`p(x \\mid c)` and
    :math:`p(x)`, which classifier-free guidance combines (Ho & Salimans, 2022).
    Shapes: ``label`` ``(batch,)`` integers; returns ``(batch,)``.
    """
    p_uncond = between(p_uncond, "p_uncond", 0, 1)
    if not isinstance(label, Tensor) or label.is_floating_point() or label.is_complex():
        raise TypeError(f"label must be an integer tensor (batch,), got label = {label!r}")
    drop = _rand(torch.rand, label.shape, generator, label, torch.float64) < p_uncond
    return torch.where(drop, torch.full_like(label, null_label), label)


def _labels_for(model, label, p_uncond: float, generator) -> Tensor | None:
    p_uncond = between(p_uncond, "p_uncond", 0, 1)
    if p_uncond == 0:
        return label
    if label is None:
        raise ValueError(f"p_uncond = {p_uncond} drops labels, but no label was given")
    null = getattr(model, "null_label", None)
    if null is None:
        raise ValueError(
            f"p_uncond = {p_uncond} needs a class-conditional model with a null_label, "
            f"got {type(model).__name__}"
        )
    return drop_labels(torch.as_tensor(label), p_uncond, null, generator)


# -- the regression ----------------------------------------------------------------------------
def _check_target(target: str) -> None:
    one_of(target, "target", TARGETS)


def _check_x0(x0, name: str = "x0") -> Tensor:
    """A batch of data: a finite float32 or float64 tensor ``(batch, ...)``, batch >= 1."""
    finite(x0, name)
    if x0.is_complex() or x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(
            f"{name} must be a real tensor (batch, ...) with batch >= 1, got {name} of shape "
            f"{tuple(x0.shape)} and dtype {x0.dtype}"
        )
    return x0


def _draw_times(t_sampler: Callable, x0: Tensor, generator) -> Tensor:
    """One time per sample from ``t_sampler``, checked to be a tensor ``(batch,)``."""
    t = t_sampler(x0.shape[0], generator)
    return floating(returned_shape(t, (x0.shape[0],), "t_sampler"), "t_sampler's times")


def _coefficients(target: str, a, s, da, ds):
    """``(c_0, c_eps)`` with ``target = c_0 x0 + c_eps eps``."""
    return {
        "eps": (0.0, 1.0),
        "x0": (1.0, 0.0),
        "score": (0.0, -1 / s),
        "v": (-s, a),
        "velocity": (da, ds),
    }[target]


def _regress(model, x0: Tensor, eps: Tensor, t: Tensor, process: Process, target, weighting, label):
    """Batch mean of ``w(t) ||model(x_t, t) - (c_0 x0 + c_eps eps)||^2``."""
    t = t.to(dtype=x0.dtype, device=x0.device)
    a, s, da, ds = (
        per_sample(c, x0)
        for c in (process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t))
    )
    c0, c_eps = _coefficients(target, a, s, da, ds)
    y = c0 * x0 + c_eps * eps
    x_t = a * x0 + s * eps
    pred = model(x_t, t) if label is None else model(x_t, t, label)
    returned(pred, x0, "model")
    squared = ((pred - y) ** 2).flatten(1).sum(1)
    if weighting is not None:
        squared = returned_shape(weighting(t), squared.shape, "weighting") * squared
    return squared.mean()


def diffusion_loss(
    model: Callable,
    x0: Tensor,
    process: Process,
    target: str = "eps",
    weighting: Callable | None = None,
    t_sampler: Callable | None = None,
    label=None,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The generic loss :math:`\mathbb E\, w(t)\,\lVert F_\theta(x_t, t) - y_{\text{target}}\rVert^2`.

    ``weighting(t) -> (batch,)`` is :math:`w` (default 1); ``t_sampler(n, generator)`` draws
    the times (default :func:`uniform_time`, uniform on [1e-3, 1)).  With ``label`` (an int
    tensor ``(batch,)``) the model is called as ``model(x_t, t, label)``; ``p_uncond`` drops
    labels to ``model.null_label`` (:func:`drop_labels`).  Draws: ``t``, then ``eps``, then
    the label dropout.  Shapes: ``x0`` ``(batch, ...)``; returns a scalar.
    """
    _check_target(target)
    _check_x0(x0)
    t = _draw_times(t_sampler or uniform_time(), x0, generator)
    eps = _rand(torch.randn, x0.shape, generator, x0)
    label = _labels_for(model, label, p_uncond, generator)
    return _regress(model, x0, eps, t, process, target, weighting, label)


def eps_loss(model: Callable, x0: Tensor, process: Process, **options) -> Tensor:
    r"""DDPM's simple loss (Ho et al., 2020): :math:`\mathbb E\,\lVert\varepsilon_\theta(x_t, t) - \varepsilon\rVert^2`.

    In continuous time, ``t`` uniform on [1e-3, 1) (``t_sampler`` to change it); its minimum
    is :math:`\mathbb E_t \operatorname{tr}\operatorname{Cov}[\varepsilon \mid x_t]`.  Options
    as in :func:`diffusion_loss`.
    """
    return diffusion_loss(model, x0, process, "eps", **options)


def x0_loss(model: Callable, x0: Tensor, process: Process, **options) -> Tensor:
    r"""Denoising loss :math:`\mathbb E\,\lVert D_\theta(x_t, t) - x_0\rVert^2`; options as in :func:`diffusion_loss`."""
    return diffusion_loss(model, x0, process, "x0", **options)


def v_loss(model: Callable, x0: Tensor, process: Process, **options) -> Tensor:
    r""":math:`v`-prediction loss, target :math:`\alpha_t\varepsilon - \sigma_t x_0` (Salimans & Ho, 2022)."""
    return diffusion_loss(model, x0, process, "v", **options)


def elbo_weighting(process: Process, target: str = "eps") -> Callable:
    r"""The weight :math:`w(t)` that makes the ``target`` loss the continuous-time ELBO term.

    Kingma et al. (2021) write the diffusion term of the negative ELBO as
    :math:`-\tfrac12\int \mathrm{SNR}'(t)\,\mathbb E\lVert x_0 - \hat x_0\rVert^2 dt`.  At a
    fixed :math:`x_t`, any prediction of :math:`y = c_0 x_0 + c_\varepsilon\varepsilon` has
    :math:`y - \hat y = (c_0 - c_\varepsilon\alpha_t/\sigma_t)(x_0 - \hat x_0)`, so

    .. math::
        w(t) = -\tfrac12\,\mathrm{SNR}'(t)\,\frac{\sigma_t^2}{(c_0\sigma_t - c_\varepsilon\alpha_t)^2}
             = -\dot\lambda_t\,\frac{\alpha_t^2}{(c_0\sigma_t - c_\varepsilon\alpha_t)^2},

    which is :math:`-\dot\lambda_t` for ``"eps"``.  Returns ``w(t) -> (batch,)``.
    """
    _check_target(target)

    def weight(t: Tensor) -> Tensor:
        a, s, da, ds = process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t)
        lam_dot = da / a - ds / s
        c0, c_eps = _coefficients(target, a, s, da, ds)
        return -lam_dot * a**2 / (c0 * s - c_eps * a) ** 2

    return weight


def elbo_loss(
    model: Callable,
    x0: Tensor,
    process: Process,
    target: str = "eps",
    t_min: float = 1e-3,
    t_max: float = 1.0,
    t_sampler: Callable | None = None,
    **options,
) -> Tensor:
    r"""The diffusion term of the negative ELBO in nats (VDM, Kingma et al., 2021), continuous time.

    .. math::
        L = \int_{t_{\min}}^{t_{\max}} -\dot\lambda_t\,
            \mathbb E\lVert\varepsilon - \hat\varepsilon_\theta(x_t, t)\rVert^2\,dt
          = -\tfrac12\int \mathrm{SNR}'(t)\,\mathbb E\lVert x_0 - \hat x_0\rVert^2 dt,

    estimated by importance sampling: :math:`t \sim q` and weight :math:`w(t)/q(t)`, with
    ``t_sampler`` a sampler that has a ``density`` (default :func:`uniform_time` on
    :math:`[t_{\min}, t_{\max})`, so :math:`1/q = t_{\max} - t_{\min}`;
    :func:`uniform_logsnr_time` makes the :math:`\varepsilon` weight constant and the
    estimate less noisy).  The model predicts ``target``; :func:`elbo_weighting` gives the
    weight in that target's units.  The whole bound adds
    :func:`diffcore.likelihood.elbo_end_terms`.  Options (``label``, ``p_uncond``,
    ``generator``) as in :func:`diffusion_loss`.  Returns the batch mean, ``()``.
    """
    t_sampler = t_sampler or uniform_time(t_min, t_max)
    if not (callable(t_sampler) and callable(getattr(t_sampler, "density", None))):
        raise ValueError(f"t_sampler must be a time sampler with a density, got {t_sampler!r}")
    if (t_sampler.t_min, t_sampler.t_max) != (t_min, t_max):
        raise ValueError(
            f"t_sampler covers [{t_sampler.t_min}, {t_sampler.t_max}], "
            f"not [t_min, t_max] = [{t_min}, {t_max}]"
        )
    w = elbo_weighting(process, target)
    return diffusion_loss(
        model,
        x0,
        process,
        target,
        weighting=lambda t: w(t) / t_sampler.density(t),
        t_sampler=t_sampler,
        **options,
    )


def dsm_loss(
    model: Callable,
    x0: Tensor,
    process: Process,
    sigma_weight: Callable | None = None,
    **options,
) -> Tensor:
    r"""Denoising score matching (Vincent, 2011; Song & Ermon, 2019), with a weight :math:`\lambda(\sigma)`.

    .. math::
        L &= \mathbb E_t\,\tfrac12\,\lambda(\sigma_t)\,
            \mathbb E\lVert s_\theta(x_t, t) - \nabla\log p(x_t \mid x_0)\rVert^2, \\
        \nabla\log p(x_t \mid x_0) &= -\frac{x_t - \alpha_t x_0}{\sigma_t^2}
                                    = -\frac{\varepsilon}{\sigma_t}.

    The default :math:`\lambda(\sigma) = \sigma^2` makes every noise level contribute about
    equally: the loss becomes :math:`\tfrac12\lVert\sigma_t s_\theta + \varepsilon\rVert^2`.
    ``sigma_weight(sigma) -> (batch,)`` is :math:`\lambda`; options as in :func:`diffusion_loss`.
    """
    lam = sigma_weight or (lambda sigma: sigma**2)
    return diffusion_loss(
        model, x0, process, "score", weighting=lambda t: 0.5 * lam(process.sigma(t)), **options
    )


def ot_pairing(x0: Tensor, noise: Tensor) -> Tensor:
    r"""The permutation :math:`\pi` minimising :math:`\sum_i \lVert x_0^{(i)} - \varepsilon^{(\pi_i)}\rVert^2` in a minibatch.

    Exact, by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on the
    matrix of squared distances: the minibatch optimal-transport coupling of Tong et al.
    (2023) and Pooladian et al. (2023).  Shapes: ``x0`` and ``noise`` ``(batch, ...)``;
    returns ``(batch,)`` indices, so that ``noise[perm]`` pairs with ``x0``.
    """
    _check_x0(x0)
    _check_x0(noise, "noise")
    same_shape(x0, noise, "x0", "noise")
    cost = torch.cdist(x0.detach().flatten(1), noise.detach().flatten(1)) ** 2
    _, cols = scipy.optimize.linear_sum_assignment(cost.cpu().numpy())  # rows come in order
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def cfm_loss(
    model: Callable,
    x0: Tensor,
    process: Process | None = None,
    coupling: str = "independent",
    t_sampler: Callable | None = None,
    label=None,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Conditional flow matching (Lipman et al., 2023): :math:`\mathbb E\,\lVert u_\theta(x_t, t) - (\dot\alpha_t x_0 + \dot\sigma_t\varepsilon)\rVert^2`.

    On the default :class:`~diffcore.processes.Linear` process the conditional velocity is
    :math:`\varepsilon - x_0` and the minimiser is the marginal PF-ODE velocity.
    ``coupling="independent"`` draws :math:`\varepsilon` independently of :math:`x_0`;
    ``coupling="ot"`` re-pairs the minibatch by :func:`ot_pairing` (minibatch OT-CFM), which
    straightens the learned paths.  ``t`` is uniform on [0, 1) by default.  Shapes: ``x0``
    ``(batch, ...)``; returns a scalar.
    """
    one_of(coupling, "coupling", ("independent", "ot"))
    _check_x0(x0)
    t = _draw_times(t_sampler or uniform_time(0.0, 1.0), x0, generator)
    eps = _rand(torch.randn, x0.shape, generator, x0)
    if coupling == "ot":
        eps = eps[ot_pairing(x0, eps)]
    label = _labels_for(model, label, p_uncond, generator)
    return _regress(model, x0, eps, t, process or Linear(), "velocity", None, label)


def reflow_pairs(denoiser: Callable, noise: Tensor, ts: Tensor, sampler: str = "heun") -> Tensor:
    r"""Couple noise with data by a flow's ODE, the first step of reflow (Liu et al., 2023).

    Each noise sample :math:`\varepsilon` is carried to :math:`x_0 = \Phi(\varepsilon, 1, 0)` by
    the PF-ODE of ``denoiser`` under :class:`~diffcore.processes.Linear`, solved by
    ``samplers.SAMPLERS[sampler]`` on ``ts`` (decreasing, from 1).  Shapes: ``noise``
    ``(batch, ...)``; returns pairs ``(batch, 2, ...)`` with ``[:, 0]`` the data end and
    ``[:, 1]`` the noise, the layout :func:`reflow_loss` reads.
    """
    from diffcore.samplers import SAMPLERS  # samplers imports nothing from train

    one_of(sampler, "sampler", sorted(SAMPLERS))
    _check_x0(noise, "noise")
    with torch.no_grad():
        x0 = returned(
            SAMPLERS[sampler](denoiser, noise, ts, Linear()), noise, f"sampler {sampler!r}"
        )
    return torch.stack([x0, noise], dim=1)


def reflow_loss(
    model: Callable,
    pairs: Tensor,
    t_sampler: Callable | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Rectified-flow regression on given pairs: :math:`\mathbb E\,\lVert u_\theta(x_t, t) - (\varepsilon - x_0)\rVert^2`.

    ``pairs[:, 0]`` is :math:`x_0` and ``pairs[:, 1]`` the noise :math:`\varepsilon` it is
    coupled with (:func:`reflow_pairs`); :math:`x_t = (1 - t)x_0 + t\varepsilon` on the
    :class:`~diffcore.processes.Linear` path, ``t`` uniform on [0, 1).  Independent pairs make
    this conditional flow matching; pairs coupled by a flow's own ODE make it reflow, whose
    minimiser has straighter trajectories than the flow it came from.  Train with
    ``fit(model, reflow_loss, pairs, ...)``.  Shapes: ``pairs`` ``(batch, 2, ...)``; returns a
    scalar.
    """
    _check_x0(pairs, "pairs")
    if pairs.ndim < 3 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (batch, 2, ...), got {tuple(pairs.shape)}")
    x0, eps = pairs[:, 0], pairs[:, 1]
    t = _draw_times(t_sampler or uniform_time(0.0, 1.0), x0, generator)
    return _regress(model, x0, eps, t, Linear(), "velocity", None, None)


# -- the training loop -------------------------------------------------------------------------
class EMA:
    r"""Exponential moving average of a model's weights, bias-corrected.

    With iterates :math:`\theta_0` (at construction), :math:`\theta_1, \dots, \theta_n` (one
    :meth:`update` each) and decay :math:`\beta`, the average is

    .. math::
        \bar\theta_n = \frac{\sum_{k=0}^{n} \beta^{n-k}\,\theta_k}{\sum_{k=0}^{n} \beta^{n-k}},

    kept as :math:`m_n = \beta m_{n-1} + (1 - \beta)\theta_n` (:math:`m_{-1} = 0`) divided by
    :math:`1 - \beta^{n+1}`, so that short runs are not pulled towards the initial weights.
    Integer buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = between(decay, "decay", 0, 1, open_high=True)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.count = 0
        self.shadow = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        self.update(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].mul_(self.decay).add_(value, alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)
        self.count += 1

    def average(self) -> dict[str, Tensor]:
        """The averaged weights :math:`\\bar\\theta_n` as a state dict."""
        norm = 1 - self.decay**self.count
        return {k: v / norm if v.is_floating_point() else v for k, v in self.shadow.items()}

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.average())

    def state_dict(self) -> dict:
        """The decay, the update count and the averaged tensors, for a checkpoint."""
        return {"decay": self.decay, "count": self.count, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; a state of another decay or model is refused, and
        leaves this average as it was."""
        if not (isinstance(state, dict) and {"decay", "count", "shadow"} <= set(state)):
            raise ValueError(
                "state must be the dict of EMA.state_dict() (decay, count, shadow), got a "
                f"{type(state).__name__}"
                + (f" with keys {sorted(state)}" if isinstance(state, dict) else "")
            )
        if state["decay"] != self.decay:
            raise ValueError(
                f"the checkpoint's EMA has decay {state['decay']}, this one has {self.decay}"
            )
        _check_fits(state["shadow"], self.shadow, "this EMA's model", "state")
        count(state["count"], "state['count']", low=0)
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
        self.count = int(state["count"])


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    env = os.environ.get("DIFFCORE_PROGRESS")
    return env == "1" if env in ("0", "1") else sys.stderr.isatty()


def _batch(data, n: int, generator: torch.Generator, device, dtype):
    """A minibatch ``(x0, label or None)`` on the model's device, ``x0`` in its dtype."""
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)):
        index = torch.randint(len(data[0]), (n,), generator=generator, device=generator.device)
        batch = tuple(d[index.to(d.device)] for d in data)
    elif isinstance(data, Iterator):
        batch = next(data)
    else:
        batch = data(n, generator=generator)
    if isinstance(batch, Tensor):
        batch = (batch,)
    x0 = batch[0].to(device=device, dtype=dtype)
    return x0, (batch[1].to(device) if len(batch) > 1 else None)


def _check_data(data) -> None:
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)):
        if not (1 <= len(data) <= 2 and all(isinstance(d, Tensor) for d in data)):
            raise ValueError(
                "data as a tuple must be (x,) or (x, labels) of tensors, got "
                f"{tuple(type(d).__name__ for d in data)}"
            )
        if len(data) == 2 and len(data[0]) != len(data[1]):
            raise ValueError(
                f"x and labels must have the same length, got {len(data[0])} and {len(data[1])}"
            )
        x = data[0]
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"data is empty: x has shape {tuple(x.shape)}")
        if x.is_complex():
            raise TypeError(f"data must be real, got data of dtype {x.dtype}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            finite(x, "data")  # raises, with the count and the first bad entry
        if len(data) == 2 and (data[1].is_floating_point() or data[1].is_complex()):
            raise TypeError(f"data's labels must be integers, got labels of dtype {data[1].dtype}")
    elif not (isinstance(data, Iterator) or callable(data)):
        raise ValueError(
            "data must be a tensor, a tuple (x, labels), an iterator of batches or a sampler "
            f"(n, generator) -> batch, got {type(data).__name__}"
        )


#: What :func:`fit` writes in a checkpoint.
CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "generator", "losses")


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, checked to be one that :func:`fit` wrote."""
    if path.is_dir():
        raise ValueError(f"checkpoint = '{path}' is a directory, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch.load's errors for a corrupt file vary with the damage
        raise ValueError(
            f"checkpoint = '{path}' cannot be read as a checkpoint of train.fit: the file is "
            f"truncated, corrupt, or not written by torch.save ({type(err).__name__})"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint = '{path}' holds a {type(state).__name__}, not the dict of train.fit"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"checkpoint = '{path}' lacks the keys {missing} of a train.fit checkpoint "
            f"(it has {sorted(map(str, state))})"
        )
    step, losses, ema = state["step"], state["losses"], state["ema"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"checkpoint = '{path}' has step = {step!r}, not an integer >= 0")
    if not (isinstance(losses, Tensor) and losses.ndim == 1 and losses.numel() == step):
        raise ValueError(
            f"checkpoint = '{path}' must hold one loss per step ({step}), got "
            f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}"
        )
    if not (isinstance(ema, dict) and {"decay", "count", "shadow"} <= set(ema)):
        raise ValueError(f"checkpoint = '{path}' has no EMA state (decay, count, shadow)")
    return state


def _check_fits(saved, expected: dict, what: str, source: str) -> None:
    """Raise unless the state dict ``saved`` (from ``source``) has the keys and shapes of
    ``expected``."""
    if not isinstance(saved, dict):
        raise ValueError(f"{source} holds no state dict for {what}")
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{key}: {tuple(saved[key].shape)} saved, {tuple(value.shape)} here"
        for key, value in expected.items()
        if key in saved and isinstance(saved[key], Tensor) and saved[key].shape != value.shape
    ]
    kinds = [key for key in expected if key in saved and not isinstance(saved[key], Tensor)]
    if missing or unexpected or shapes or kinds:
        parts = [
            f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("other shapes", shapes),
                ("not tensors", kinds),
            )
            if items
        ]
        raise ValueError(
            f"{source} does not fit {what} (another architecture?): " + "; ".join(parts)
        )


def _resume(path: Path, model: nn.Module, ema: EMA, optimizer, generator, lr: float):
    """Load the checkpoint into ``model``, ``ema``, ``optimizer`` and ``generator``.

    Everything is checked before the caller's ``model`` and ``generator`` change: a
    checkpoint that does not fit raises and leaves them as they were.  Returns
    ``(step, losses)``.
    """
    state = _read_checkpoint(path)
    source = f"checkpoint = '{path}'"
    _check_fits(state["model"], model.state_dict(), "this model", source)
    _check_fits(state["ema"]["shadow"], ema.shadow, "this model's EMA", source)
    if state["ema"]["decay"] != ema.decay:
        raise ValueError(
            f"checkpoint = '{path}': the checkpoint's EMA has decay {state['ema']['decay']}, "
            f"this one has {ema.decay} (ema_decay)"
        )
    scratch = torch.Generator(device=generator.device)
    try:
        scratch.set_state(state["generator"])
        optimizer.load_state_dict(state["optimizer"])  # fit's own optimizer: free to change
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint = '{path}' does not fit this run: {err}") from err
    for group in optimizer.param_groups:
        group["lr"] = lr
    ema.load_state_dict(state["ema"])
    model.load_state_dict(state["model"])  # checked above: nothing can fail from here on
    generator.set_state(state["generator"])
    return state["step"], state["losses"].tolist()


def _save(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fit(
    model: nn.Module,
    loss_fn: Callable,
    data,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    ema_decay: float = 0.999,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train ``model`` in place with Adam for ``steps`` steps; return ``(ema_model, losses)``.

    - ``loss_fn(model, x0, generator=g)`` returns a scalar; with labelled data it is called
      with ``label=labels`` too.  Bind the process with ``functools.partial``, e.g.
      ``partial(train.eps_loss, process=vp)``.
    - ``data``: a tensor ``(N, ...)`` or a tuple ``(x, labels)``, from which minibatches of
      ``batch_size`` are drawn with replacement; a sampler ``(n, generator) -> x`` or
      ``(x, labels)`` (a toy set of :mod:`diffcore.data`, ``mixture.sample``); or an iterator
      of batches.  Batches go to the device and floating dtype of the model's parameters.
    - All randomness (batches, times, noise) comes from ``generator``; by default a CPU
      generator seeded from the global RNG (so ``torch.manual_seed`` fixes the run).
    - ``ema_model`` is a copy of the model carrying the :class:`EMA` of the weights, in eval
      mode; ``losses`` is the list of the per-step training losses.
    - ``checkpoint``: a file path.  The state (model, EMA, optimizer, generator, step,
      losses) is saved atomically every ``checkpoint_every`` steps and at the end.  If the
      file exists and ``resume`` is true, training continues from it (loaded with
      ``weights_only=True``) and gives bit-for-bit the parameters of an uninterrupted run
      (except with an iterator, which cannot be rewound).  The ``lr`` given here applies
      after resuming.
    - ``progress``: a tqdm bar; None shows it when stderr is a terminal or the environment
      sets ``DIFFCORE_PROGRESS=1`` (``DIFFCORE_PROGRESS=0`` hides it), so tests stay quiet.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function, got loss_fn = {loss_fn!r}")
    steps = count(steps, "steps", low=0)
    batch_size = count(batch_size, "batch_size")
    checkpoint_every = count(checkpoint_every, "checkpoint_every")
    lr = positive(lr, "lr")
    if not (checkpoint is None or isinstance(checkpoint, (str, os.PathLike))):
        raise TypeError(f"checkpoint must be a file path or None, got checkpoint = {checkpoint!r}")
    _check_data(data)
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    device, dtype = params[0].device, params[0].dtype
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    optimizer = torch.optim.Adam(params, lr=lr)
    ema = EMA(model, ema_decay)
    step, losses = 0, []
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and resume and path.exists():
        step, losses = _resume(path, model, ema, optimizer, generator, lr)

    model.train()
    show = _show_progress(progress)
    with tqdm(total=steps, initial=step, disable=not show, desc="fit") as bar:
        while step < steps:
            x0, label = _batch(data, batch_size, generator, device, dtype)
            labelled = {} if label is None else {"label": label}
            loss = loss_fn(model, x0, generator=generator, **labelled)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r}")
            value = loss.item()
            if not math.isfinite(value):
                if x0.is_floating_point() and not bool(torch.isfinite(x0).all()):
                    raise ValueError(
                        f"data must give finite batches, got one with NaN or infinite entries "
                        f"at step {step}"
                    )
                raise FloatingPointError(f"the loss is {value} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)
            step += 1
            losses.append(value)
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.4g}")
            if path is not None and (step % checkpoint_every == 0 or step == steps):
                state = {
                    "step": step,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "losses": torch.tensor(losses, dtype=torch.float64),
                }
                _save(path, state)
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged)
    return averaged.eval().requires_grad_(False), losses
