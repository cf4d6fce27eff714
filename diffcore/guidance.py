r"""Guidance: classifier guidance and classifier-free guidance, with exact oracles.

Bayes' rule splits the class-conditional score into the unconditional score and a classifier,

.. math::
    \nabla\log p_t(x \mid c) = \nabla\log p_t(x) + \nabla\log p_t(c \mid x).

- **Classifier guidance** (Dhariwal & Nichol, 2021) scales the classifier term by ``w``:
  :math:`\nabla\log p_t(x) + w\,\nabla_x\log p_t(c \mid x)`.  ``w = 0`` is the unconditional
  model, ``w = 1`` the conditional one, ``w > 1`` sharpens the class.
- **Classifier-free guidance** (CFG; Ho & Salimans, 2022) needs no classifier: one network
  trained with dropped labels (``train.diffusion_loss(..., p_uncond=...)``) gives a conditional
  and an unconditional prediction, combined as :math:`(1 + w)\,\text{cond} - w\,\text{uncond}`.
  In scores this is :math:`\nabla\log p_t(x \mid c) + w\,\nabla\log p_t(c \mid x)`: CFG with
  weight ``w`` is classifier guidance with scale ``1 + w``, the classifier being implicit.
  ``w = 0`` is the conditional model; ``-1 <= w < 0`` moves towards the unconditional one
  (reached at ``w = -1``), ``w > 0`` guides.

**Any target guides alike.**  At a fixed :math:`(x, t)` every target is an affine function of
every other, :math:`y = A(x, t) + B(t)\,\text{pred}` (:mod:`diffcore.targets`).  The weights
:math:`1 + w` and :math:`-w` sum to one, so the combination commutes with these maps: guiding
the ``eps``, ``x0``, ``score``, ``v`` or ``velocity`` prediction gives the same denoiser.

Both wrappers return a denoiser ``D(x, t)``, so every sampler of :mod:`diffcore.samplers` runs
guided without a change.

**The tilted law is not what CFG samples.**  At each ``t`` the CFG score is the score of
:math:`p_t(x \mid c)^{1+w}\,p_t(x)^{-w}`.  At ``t = 0`` this is the tilted law
:math:`p_w(x \mid c) \propto p(x \mid c)^{1+w} p(x)^{-w} \propto p(x \mid c)\,p(c \mid x)^w`,
but the forward process does not carry products of densities to products of densities:
diffusing :math:`p_w` does not give :math:`p_t(x \mid c)^{1+w} p_t(x)^{-w}` at ``t > 0``, so
the PF-ODE driven by the CFG score does not end at :math:`p_w` (Chidambaram et al., 2024;
Bradley & Nakkiran, 2024).  For a Gaussian mixture, whose components are the classes,
:func:`tilted_log_density` and :func:`sample_tilted` (exact, by rejection) give the tilted law,
so the gap can be measured.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.analytic import Gaussian, GaussianMixture
from diffcore.checks import (
    as_time,
    count,
    one_of,
    per_sample,
    require,
    returned,
    returned_shape,
)
from diffcore.processes import Linear, Process
from diffcore.targets import TARGETS, convert

__all__ = [
    "exact_class_log_prob",
    "exact_conditional_model",
    "classifier_gradient",
    "classifier_guided_denoiser",
    "cfg_denoiser",
    "tilted_log_density",
    "sample_tilted",
]

# alpha_0 = 1 and sigma_0 = 0: evaluated at t = 0, any such process gives the data law itself
_DATA = Linear()


def _check_weight(w, low: float) -> float:
    need = f"a finite number >= {low:g}"
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        raise TypeError(f"w must be {need}, got w = {w!r}")
    require(math.isfinite(w) and w >= low, "w", w, need)
    return float(w)


def _check_label(label, n_classes: int | None):
    """A class index (int or 1-D integer tensor), in ``[0, n_classes)`` when the count is known."""
    value = None if label is None else torch.as_tensor(label)
    if value is None or value.dtype not in (torch.int32, torch.int64) or value.ndim > 1:
        raise ValueError(
            f"label must be a class index (an int or a 1-D integer tensor), got label = {label!r}"
        )
    if n_classes is not None:
        bad = (value < 0) | (value >= n_classes)
        if bool(bad.any()):
            raise ValueError(
                f"label must lie in [0, {n_classes}), got label = {value[bad].tolist()}"
            )
    return label


def _batch_labels(label, n_classes: int, batch: int, device) -> Tensor:
    """``label`` checked and expanded to one index per sample, shape ``(batch,)``."""
    _check_label(label, n_classes)
    label = torch.as_tensor(label, device=device)
    label = label.expand(batch) if label.ndim == 0 else label
    if label.shape != (batch,):
        raise ValueError(
            f"label must have one entry per sample ({batch}), got {tuple(label.shape)}"
        )
    return label


# -- exact models of a Gaussian mixture, whose components are the classes ----------------------
def exact_class_log_prob(mixture: GaussianMixture, process: Process) -> Callable:
    r"""The exact time-dependent classifier :math:`\log p_t(c \mid x_t = x)` of a mixture.

    :math:`p_t(c \mid x) = w_c\,\mathcal N_c(x) / \sum_k w_k\,\mathcal N_k(x)` with the diffused
    components :math:`\mathcal N_k = \mathcal N(\alpha_t\mu_k, \alpha_t^2\Sigma_k + \sigma_t^2 I)`,
    computed as a log-softmax.  Returns ``log_prob_class(x, t, label) -> (B,)`` with ``x``
    ``(B, ...)``, ``t`` a float, ``()`` or ``(B,)`` and ``label`` an int or ``(B,)``; it carries
    ``n_classes = K``.
    """

    def log_prob_class(x: Tensor, t, label) -> Tensor:
        index = _batch_labels(label, mixture.n_components, x.shape[0], x.device)
        logits = torch.log(mixture.weights.to(x)) + mixture.component_log_prob(x, t, process)
        return torch.log_softmax(logits, dim=-1).gather(1, index[:, None])[:, 0]

    log_prob_class.n_classes = mixture.n_components
    return log_prob_class


def exact_conditional_model(
    mixture: GaussianMixture, process: Process, target: str = "x0"
) -> Callable:
    """The exact mixture as a class-conditional network ``model(x, t, label=None) -> target``.

    ``label=None`` is the unconditional model (a network's null label), an index the
    component's.  It carries ``n_classes = K``.  Shapes: ``x`` ``(B, ...)``; returns the same.
    """
    one_of(target, "target", TARGETS)

    def model(x: Tensor, t, label=None) -> Tensor:
        return convert(mixture.denoise(x, t, process, label), "x0", target, x, t, process)

    model.n_classes = mixture.n_components
    return model


# -- classifier guidance -----------------------------------------------------------------------
def classifier_gradient(log_prob_class: Callable, x: Tensor, t, label) -> Tensor:
    r""":math:`\nabla_x\log p_t(c \mid x)` by autograd, one gradient per sample.

    ``log_prob_class(x, t, label) -> (B,)`` must treat the samples independently (the
    gradient of the batch sum is then the per-sample gradient).  If ``x`` itself requires
    grad, the graph is kept, so that an outer autograd (DPS, exact sampler laws) can
    differentiate through the guidance.  Shapes: ``x`` ``(B, ...)``; returns the same.
    """
    with torch.enable_grad():
        x_in = x if x.requires_grad else x.detach().requires_grad_(True)
        log_p = returned_shape(log_prob_class(x_in, t, label), (x.shape[0],), "log_prob_class")
        (grad,) = torch.autograd.grad(log_p.sum(), x_in, create_graph=x.requires_grad)
    return grad


def classifier_guided_denoiser(
    denoiser: Callable, log_prob_class: Callable, process: Process, label, w: float
) -> Callable:
    r"""Classifier guidance as a denoiser: the score :math:`\nabla\log p_t(x) + w\,\nabla\log p_t(c \mid x)`.

    By Tweedie, :math:`D = (x + \sigma_t^2\,\text{score})/\alpha_t`, so the guided score is
    the denoiser

    .. math:: D_w(x, t) = D(x, t) + w\,\frac{\sigma_t^2}{\alpha_t}\,\nabla_x\log p_t(c \mid x),

    which is ``targets.convert(score + w * grad, "score", "x0", ...)`` without the round trip
    through the score.  ``w >= 0`` (``w = 1``: the conditional model).  Needs
    :math:`\alpha_t > 0` where ``w != 0``: at :math:`\alpha_t = 0` (``Linear`` at ``t = 1``)
    the classifier is flat and the correction is :math:`0 \cdot \infty`.  ``label``: an int or
    ``(B,)``.  Shapes: ``D_w(x, t)`` maps ``x`` ``(B, ...)`` to ``(B, ...)``.
    """
    w = _check_weight(w, 0.0)
    _check_label(label, getattr(log_prob_class, "n_classes", None))

    def guided(x: Tensor, t) -> Tensor:
        d = returned(denoiser(x, t), x, "denoiser")
        if w == 0:
            return d
        t_ = as_time(t, like=x)
        a, s = per_sample(process.alpha(t_), x), per_sample(process.sigma(t_), x)
        if not bool((a > 0).all()):
            raise ValueError(
                f"classifier guidance needs alpha_t > 0, got alpha_t = 0 at t = {t!r} under "
                f"{process!r}: start the time grid below t = 1"
            )
        return d + (w * s**2 / a) * classifier_gradient(log_prob_class, x, t, label)

    return guided


# -- classifier-free guidance ------------------------------------------------------------------
def cfg_denoiser(model: Callable, process: Process, label, w: float, target: str = "eps"):
    r"""Classifier-free guidance as a denoiser: :math:`(1 + w)\,\text{cond} - w\,\text{uncond}`.

    ``model(x, t, label)`` is the conditional prediction of ``target`` and ``model(x, t, None)``
    the unconditional one (a network of :mod:`diffcore.nets` maps None to its null label).
    The guided prediction :math:`\text{cond} + w(\text{cond} - \text{uncond})` is converted to
    :math:`x_0`; the result does not depend on the target (see the module docstring).
    ``w >= -1``: ``w = 0`` is the conditional model, ``w = -1`` the unconditional one.
    ``label``: an int or ``(B,)``, in ``[0, model.n_classes)`` when the model says its count.
    Shapes: ``D(x, t)`` maps ``x`` ``(B, ...)`` to ``(B, ...)``.
    """
    one_of(target, "target", TARGETS)
    w = _check_weight(w, -1.0)
    _check_label(label, getattr(model, "n_classes", None))

    def guided(x: Tensor, t) -> Tensor:
        cond = returned(model(x, t, label), x, "model")
        uncond = returned(model(x, t, None), x, "model")
        pred = cond + w * (cond - uncond)  # written so that w = 0 returns cond exactly
        return convert(pred, target, "x0", x, t, process)

    return guided


# -- the tilted law ----------------------------------------------------------------------------
def tilted_log_density(mixture: GaussianMixture, label: int, w: float) -> Callable:
    r"""The unnormalised log-density of the tilted law :math:`p_w(x \mid c) \propto p(x \mid c)^{1+w} p(x)^{-w}`.

    At ``t = 0``: ``log_density(x) = (1 + w) log p(x | c) - w log p(x)``, shape ``(B,)`` for
    ``x`` ``(B, d)``.  Normalisable for every ``w >= -1``, since :math:`p \ge w_c\,p(\cdot
    \mid c)`.  Its gradient is the CFG score at ``t = 0``; the law CFG samples differs (see the
    module docstring).
    """
    w = _check_weight(w, -1.0)
    _single_label(label, mixture)

    def log_density(x: Tensor) -> Tensor:
        conditional = mixture.log_prob(x, 0.0, _DATA, label=label)
        return (1 + w) * conditional - w * mixture.log_prob(x, 0.0, _DATA)

    return log_density


def _single_label(label, mixture: GaussianMixture) -> int:
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"label must be one class index (an int), got label = {label!r}")
    return int(_check_label(label, mixture.n_components))


def sample_tilted(
    mixture: GaussianMixture,
    label: int,
    w: float,
    n: int,
    generator: torch.Generator | None = None,
    max_rounds: int = 1000,
) -> Tensor:
    r"""Exact samples of the tilted law :math:`p_w(x \mid c) \propto p(x \mid c)\,p(c \mid x)^w`, by rejection.

    For ``w >= 0`` propose :math:`x \sim p(x \mid c)` and accept with probability
    :math:`p(c \mid x)^w \le 1`; for ``-1 <= w < 0`` write
    :math:`p_w \propto p(x)\,p(c \mid x)^{1+w}`, propose :math:`x \sim p(x)` and accept with
    :math:`p(c \mid x)^{1+w}`.  Either way the accepted points follow :math:`p_w` exactly.
    Rounds of ``n`` proposals run until ``n`` are accepted; an acceptance rate too small to
    finish in ``max_rounds`` rounds (large ``w`` on overlapping classes) raises a
    ``ValueError``.  Shapes: returns ``(n, d)``.
    """
    w = _check_weight(w, -1.0)
    label = _single_label(label, mixture)
    n = count(n, "n")
    max_rounds = count(max_rounds, "max_rounds")
    if w >= 0:
        proposal, power = Gaussian(mixture.means[label], mixture.covs[label]), w
    else:
        proposal, power = mixture, 1 + w
    log_class = exact_class_log_prob(mixture, _DATA)
    kept, accepted = [], 0
    for _ in range(max_rounds):
        x = proposal.sample(n, generator=generator)
        u = torch.rand(n, generator=generator, dtype=x.dtype, device=x.device)
        accept = torch.log(u) < power * log_class(x, 0.0, label)
        kept.append(x[accept])
        accepted += int(accept.sum())
        if accepted >= n:
            return torch.cat(kept)[:n]
    raise ValueError(
        f"sample_tilted accepted {accepted} of {n * max_rounds} proposals for w = {w}: the "
        f"acceptance rate is too small; lower w or raise max_rounds"
    )
