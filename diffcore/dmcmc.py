r"""Denoising MCMC: a Markov chain on data and noise level, then a reverse ODE from the chain's level.

A diffusion defines, besides its marginals :math:`p_t`, a joint law on the *product space* of
data and noise level: draw a level :math:`t` from a prior :math:`\pi` over a grid of levels
:math:`t_1, \dots, t_L \in (0, 1]`, then :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`,

.. math:: p(x, t) = \pi(t)\,p_t(x).

Denoising MCMC (Kim & Ye, 2023) samples this joint law by MCMC and hands each state
:math:`(x, t)` to a reverse-ODE integrator, which carries :math:`x \sim p_t` from *its own*
level :math:`t` to data.  Since :math:`x \mid t \sim p_t` in the joint law, the output has the
data law exactly when the chain is exact; and the chain moves near the data (its levels are
mostly small), so the integration is short.  The instance of the paper is *Denoising Langevin
Gibbs* (DLG), a Gibbs sampler whose two conditionals are

- :math:`x \mid t \sim p_t`: one Langevin step at the level :math:`t`,
  :math:`x \leftarrow x + \tfrac\delta2\nabla\log p_t(x) + \sqrt\delta\,z`, with the score from
  the denoiser, :math:`\nabla\log p_t(x) = (\alpha_t D(x, t) - x)/\sigma_t^2`;
- :math:`t \mid x \sim p(t \mid x) \propto \pi(t)\,p_t(x)`: a draw from a *noise-level
  classifier*, trained in the paper on pairs :math:`(x_t, t)` from the joint law.

On Gaussian and Gaussian-mixture data (:mod:`diffcore.analytic`) the level posterior is exact,
Bayes' rule with the exact marginal densities (:func:`level_log_posterior`,
:func:`level_classifier`), and on Gaussian data the Langevin step can be replaced by the exact
transition of the Langevin diffusion (:func:`gaussian_langevin_step`, an Ornstein-Uhlenbeck
step that leaves :math:`p_t` invariant): then the whole chain is exact and the output law is the
data law, which the tests check.

The chain is :func:`denoising_langevin_gibbs` (one state per sample, each at its own level);
the integration is :func:`integrate_from_levels`, which runs any sampler of
:mod:`diffcore.samplers` (or the exact flow map
:meth:`~diffcore.analytic.Gaussian.pf_ode_solver`) from each sample's level to ``t_min``: the
samples are grouped by level, and each group runs on its own grid of ``n_steps`` steps.

**Where the released code departs from the paper.**  The official notebook (``1202kbs/DMCMC``,
``Sampling Demo.ipynb``) runs DLG on a VE model with 1000 geometric levels and

1. takes the classifier's *arg-max* level, ``s = get_sigma(net(x).argmax(dim=1))``, where the
   Gibbs step draws :math:`t \sim p(t \mid x)` (``level_choice="argmax"`` here);
2. runs ``n_skip`` Gibbs steps per output and hands the integrator the state of *smallest
   noise level* seen in them (its start included), not the last state
   (``keep="smallest"``); the chain itself goes on from its last state;
3. takes Langevin steps of a fixed size :math:`\eta` in the VE variable
   (``x + 0.5 * eta * score + sqrt(eta) * z``), :math:`\delta = \eta\alpha_t^2` in the
   variable :math:`x_t` of another process; here the step is relative to the level,
   :math:`\delta = \eta\,\sigma_t^2`, so that one :math:`\eta` suits every level;
4. trains the classifier on levels drawn uniformly (a uniform prior :math:`\pi`), starts the
   chain from a 20-step EDM sample plus noise, with a burn-in, integrates with EDM's
   stochastic Heun sampler (churn), and denoises its output once more by Tweedie's formula at
   :math:`\sigma = 10^{-2}` or :math:`10^{-3}` (``t_min > 0`` and ``denoise_last=True``
   here).

Both shortcuts 1 and 2 change the law of the state handed to the integrator, and so the output
law; the tests measure by how much.  With the arg-max, the level is a function of :math:`x`,
its maximum-likelihood level under a uniform prior.  On isotropic Gaussian data
:math:`\mathcal N(\mu, s I)` the marginal variance :math:`v_t = \alpha_t^2 s + \sigma_t^2`
of that level is :math:`\lVert x - \alpha_t\mu\rVert^2/d` up to the grid's spacing, and
the exact flow maps :math:`x` onto the sphere :math:`\lVert x_0 - \mu\rVert^2 = d s` (within
the largest ratio :math:`r` of neighbouring :math:`v_t`, wherever :math:`\lVert x\rVert^2/d`
lies inside the grid's range): the spread of :math:`\lVert x_0 - \mu\rVert^2` collapses.
Keeping the smallest level selects states whose :math:`x` was drawn at a noisier level than
the one it is handed on with (the Gibbs step that lowered the level), so :math:`x` looks
noisier than its level and the output is over-dispersed.

Reference: B. Kim and J. C. Ye, *Denoising MCMC for Accelerating Diffusion-Based Generative
Models*, ICML 2023 (arXiv:2209.14593, 2022; code ``1202kbs/DMCMC``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffcore import samplers
from diffcore.analytic import Gaussian, GaussianMixture
from diffcore.checks import (
    count,
    finite,
    floating,
    one_of,
    per_sample,
    positive,
    require,
    returned,
    returned_shape,
)
from diffcore.processes import Process
from diffcore.stepping import Step, emit

__all__ = [
    "LEVEL_CHOICES",
    "KEEPS",
    "check_levels",
    "sample_joint",
    "level_log_posterior",
    "level_classifier",
    "gaussian_langevin_step",
    "GibbsResult",
    "denoising_langevin_gibbs",
    "integrate_from_levels",
]

#: How the Gibbs step picks the level: a draw from :math:`p(t \mid x)` (the paper) or its
#: arg-max (the released code).
LEVEL_CHOICES = ("sample", "argmax")

#: Which state the chain hands on: its last (the paper) or the one of smallest level seen in
#: the run, its start included (the released code).
KEEPS = ("last", "smallest")


# -- the levels and the joint law ----------------------------------------------------------------
def check_levels(levels) -> Tensor:
    """``levels`` checked: a 1-D tensor (or list) of distinct times in :math:`(0, 1]`, returned
    as a float64 tensor ``(L,)``.  A level 0 would be data itself, with no noise to remove."""
    if not isinstance(levels, Tensor):
        try:
            levels = torch.as_tensor(levels, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"levels must be a 1-D tensor of times, got {levels!r}") from err
    floating(levels, "levels")
    levels = levels.to(torch.float64)
    if levels.ndim != 1 or levels.numel() < 1:
        raise ValueError(f"levels must be a 1-D tensor of times, got shape {tuple(levels.shape)}")
    finite(levels, "levels")
    bad = (levels <= 0) | (levels > 1)
    if bool(bad.any()):
        shown = [f"{v:.17g}" for v in levels[bad].tolist()[:6]]
        raise ValueError(f"levels must lie in (0, 1], got levels = [{', '.join(shown)}]")
    if torch.unique(levels).numel() != levels.numel():
        raise ValueError(f"levels must be distinct, got levels = {levels.tolist()}")
    return levels


def _prior(prior, n_levels: int) -> Tensor:
    """The prior over the levels as float64 probabilities ``(L,)`` (None: uniform)."""
    if prior is None:
        return torch.full((n_levels,), 1.0 / n_levels, dtype=torch.float64)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    require(prior.shape == (n_levels,), "prior", prior.tolist(), f"of shape ({n_levels},)")
    finite(prior, "prior")
    require(bool((prior > 0).all()), "prior", prior.tolist(), "positive")
    total = float(prior.sum())
    require(abs(total - 1) < 1e-6, "prior", prior.tolist(), "a law (summing to 1)")
    return prior / total


def sample_joint(
    data: GaussianMixture,
    levels,
    process: Process,
    n: int,
    prior=None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``n`` exact draws of the joint law :math:`p(x, t) = \pi(t)\,p_t(x)`: a level index
    :math:`l \sim \pi` (``prior``, default uniform), then :math:`x = \alpha_{t_l}x_0 +
    \sigma_{t_l}\varepsilon` with :math:`x_0` from ``data``.  The pairs a noise-level
    classifier is trained on, and a stationary start for :func:`denoising_langevin_gibbs`.
    Shapes: ``levels`` ``(L,)``; returns ``x`` ``(n, d)`` and the level indices ``(n,)``."""
    levels = check_levels(levels)
    n = count(n, "n")
    prior = _prior(prior, levels.numel())
    index = torch.multinomial(prior, n, replacement=True, generator=generator)
    x0 = data.sample(n, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return process.marginal(x0, levels[index].to(x0.dtype), noise), index


def level_log_posterior(
    data: GaussianMixture, x: Tensor, levels, process: Process, prior=None
) -> Tensor:
    r"""The exact level posterior, Bayes' rule with the exact marginal densities:

    .. math:: \log p(t_l \mid x) = \log\pi_l + \log p_{t_l}(x)
              - \log\sum_k \pi_k\,p_{t_k}(x),

    :math:`p_t` from :meth:`~diffcore.analytic.GaussianMixture.log_prob` (all levels in one
    call).  What the paper's noise-level classifier learns.  Shapes: ``x`` ``(B, d)``,
    ``levels`` ``(L,)``; returns log-probabilities ``(B, L)``, in the dtype of ``x``.
    """
    levels = check_levels(levels)
    prior = _prior(prior, levels.numel())
    finite(x, "x")
    batch, n_levels = x.shape[0], levels.numel()
    times = levels.to(x.dtype).repeat_interleave(batch)  # level-major: (L B,)
    log_p = data.log_prob(x.repeat(n_levels, *([1] * (x.ndim - 1))), times, process)
    logits = log_p.reshape(n_levels, batch).T + torch.log(prior).to(x.dtype)
    return torch.log_softmax(logits, dim=-1)


def level_classifier(data: GaussianMixture, levels, process: Process, prior=None) -> Callable:
    """The exact noise-level classifier ``classifier(x)`` :math:`= \\log p(t_l \\mid x)`
    (:func:`level_log_posterior`), in the form :func:`denoising_langevin_gibbs` takes.
    Shapes: ``x`` ``(B, d)``; returns ``(B, L)``."""
    levels = check_levels(levels)
    prior = _prior(prior, levels.numel())

    def classifier(x: Tensor) -> Tensor:
        return level_log_posterior(data, x, levels, process, prior)

    return classifier


def gaussian_langevin_step(gaussian: Gaussian, process: Process) -> Callable:
    r"""The exact Langevin transition on Gaussian data: ``step(x, t, delta, z)``.

    The Langevin diffusion :math:`dX = \tfrac12\nabla\log p_t(X)\,d\tau + dW` on
    :math:`p_t = \mathcal N(m, C)`, :math:`m = \alpha_t\mu`, :math:`C = \alpha_t^2\Sigma +
    \sigma_t^2 I`, is an Ornstein-Uhlenbeck process; run for the time :math:`\delta`, exactly,

    .. math::
        X_\delta = m + e^{-\delta C^{-1}/2}(X_0 - m)
                   + \big(C(I - e^{-\delta C^{-1}})\big)^{1/2} z,

    which leaves :math:`p_t` invariant for every :math:`\delta`.  The Langevin step of
    :func:`denoising_langevin_gibbs` is its Euler-Maruyama discretisation; with this step in
    its place (``langevin=``) the chain is an exact Gibbs sampler.  Shapes: ``x``, ``z``
    ``(B, d)``; ``t``, ``delta`` ``(B,)`` or scalars; returns ``(B, d)``.
    """
    require(isinstance(gaussian, Gaussian), "gaussian", gaussian, "an analytic.Gaussian")
    evals, evecs = torch.linalg.eigh(gaussian.cov.to(torch.float64))
    mean = gaussian.mean.to(torch.float64)

    def step(x: Tensor, t, delta, z: Tensor) -> Tensor:
        flat, noise = x.reshape(x.shape[0], -1), z.reshape(z.shape[0], -1)
        u, ell, mu = (v.to(dtype=x.dtype, device=x.device) for v in (evecs, evals, mean))
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        delta = torch.as_tensor(delta, dtype=x.dtype, device=x.device)
        a, s = per_sample(process.alpha(t), flat), per_sample(process.sigma(t), flat)
        var = a**2 * ell + s**2  # the eigenvalues of C
        decay = torch.exp(-per_sample(delta, flat) / (2 * var))
        coords = (flat - a * mu) @ u  # X - m in the eigenbasis of Sigma
        moved = decay * coords + torch.sqrt(var * (1 - decay**2)) * (noise @ u)
        return (a * mu + moved @ u.T).reshape(x.shape)

    return step


# -- the chain -----------------------------------------------------------------------------------
class GibbsResult(NamedTuple):
    """What :func:`denoising_langevin_gibbs` returns.

    ``x`` ``(B, d)`` and ``level`` ``(B,)`` (indices into the levels): the states to
    integrate from, at the times ``t`` ``(B,)``; ``x_last`` and ``level_last``: where the
    chain stopped, to go on from (the same as ``x`` and ``level`` with ``keep="last"``).
    """

    x: Tensor
    level: Tensor
    t: Tensor
    x_last: Tensor
    level_last: Tensor


def _level_index(level, batch: int, n_levels: int, device) -> Tensor:
    level = torch.as_tensor(level, device=device)
    if level.dtype not in (torch.int32, torch.int64) or level.ndim > 1:
        raise ValueError(f"level must be an int or a 1-D integer tensor, got level = {level!r}")
    level = level.expand(batch) if level.ndim == 0 else level
    if level.shape != (batch,):
        raise ValueError(
            f"level must have one entry per sample ({batch}), got {tuple(level.shape)}"
        )
    bad = (level < 0) | (level >= n_levels)
    if bool(bad.any()):
        raise ValueError(f"level must lie in [0, {n_levels}), got level = {level[bad].tolist()}")
    return level.to(torch.int64)


def denoising_langevin_gibbs(
    model: Callable,
    x: Tensor,
    level,
    levels,
    process: Process,
    *,
    classifier: Callable,
    n_steps: int,
    step_size: float = 0.1,
    level_choice: str = "sample",
    keep: str = "last",
    langevin: Callable | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
) -> GibbsResult:
    r"""Denoising Langevin Gibbs (Kim & Ye, 2023): ``n_steps`` Gibbs sweeps on
    :math:`p(x, t) = \pi(t)\,p_t(x)`, one chain per sample.

    Each sweep, at the level :math:`t = t_{l}` of each sample,

    .. math::
        \begin{aligned}
        x &\leftarrow x + \tfrac\eta2\big(\alpha_t D(x, t) - x\big)
             + \sqrt\eta\,\sigma_t z, \\
        l &\sim p(t_l \mid x) \quad\text{(or its arg-max)},
        \end{aligned}

    the first line a Langevin step on :math:`p_t` of size :math:`\delta = \eta\,\sigma_t^2`
    (``step_size`` :math:`= \eta`; :math:`\tfrac\delta2\nabla\log p_t = \tfrac\eta2(\alpha_t D
    - x)`), or ``langevin(x, t, delta, z)`` when given (e.g. the exact
    :func:`gaussian_langevin_step`, with no model call).  ``classifier(x)`` returns the level
    log-probabilities ``(B, L)`` (normalised here; :func:`level_classifier` is the exact one).
    ``level_choice``: ``"sample"`` (the paper) or ``"argmax"`` (the released code);
    ``keep``: ``"last"`` (the paper) or ``"smallest"``, the state of smallest level seen,
    start included (the released code): see the module docstring.

    ``x`` and ``level`` (an index, or one per sample) are the start state; ``levels`` the
    grid of times in :math:`(0, 1]`.  ``callback(step)`` receives a
    :class:`~diffcore.stepping.Step` after each sweep: ``t`` None (each sample has its own
    level), ``x``, ``denoised`` (the Langevin step's :math:`D(x, t)`, or None), ``nfe`` (model
    calls so far) and ``state`` ``{"level": (B,), "t": (B,)}``, which
    :meth:`~diffcore.stepping.Trace.stack` stacks.  Cost: one model call and one classifier
    call per sweep.  Shapes: ``x`` ``(B, ...)``; returns a :class:`GibbsResult`.
    """
    levels = check_levels(levels)
    n_steps = count(n_steps, "n_steps")
    step_size = positive(step_size, "step_size")
    one_of(level_choice, "level_choice", LEVEL_CHOICES)
    one_of(keep, "keep", KEEPS)
    require(callable(classifier), "classifier", classifier, "a callable classifier(x)")
    require(langevin is None or callable(langevin), "langevin", langevin, "None or a callable")
    finite(x, "x")
    batch, n_levels = x.shape[0], levels.numel()
    level = _level_index(level, batch, n_levels, x.device)
    times = levels.to(dtype=x.dtype, device=x.device)
    best_x, best_level = x, level
    nfe = 0
    for i in range(n_steps):
        t = times[level]
        sigma = per_sample(process.sigma(t), x)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        denoised = None
        if langevin is None:  # Euler-Maruyama on the Langevin diffusion of p_t
            denoised = returned(model(x, t), x, "model(x, t)")
            nfe += 1
            alpha = per_sample(process.alpha(t), x)
            pull = alpha * denoised - x  # sigma_t^2 times the score
            x = x + (step_size / 2) * pull + math.sqrt(step_size) * sigma * z
        else:
            x = returned(langevin(x, t, step_size * sigma.reshape(-1) ** 2, z), x, "langevin")
        log_post = returned_shape(classifier(x), (batch, n_levels), "classifier(x)")
        log_post = torch.log_softmax(log_post.to(torch.float64), dim=-1)
        if level_choice == "argmax":
            level = log_post.argmax(dim=-1)
        else:
            level = torch.multinomial(log_post.exp(), 1, generator=generator)[:, 0]
        level = level.to(x.device)
        if keep == "smallest":  # the released code's x_min, s_min
            lower = times[level] < times[best_level]
            best_x = torch.where(per_sample(lower, x), x, best_x)
            best_level = torch.where(lower, level, best_level)
        emit(callback, Step(i, None, x, denoised, nfe, {"level": level, "t": times[level]}))
    if keep == "last":
        best_x, best_level = x, level
    return GibbsResult(best_x, best_level, times[best_level], x, level)


# -- the integration from each sample's level ----------------------------------------------------
def integrate_from_levels(
    sampler: Callable | str,
    model: Callable,
    x: Tensor,
    t: Tensor,
    process: Process,
    *,
    n_steps: int,
    kind: str = "uniform",
    t_min: float = 0.0,
    **options,
) -> Tensor:
    r"""Integrate each sample from its own time ``t[b]`` down to ``t_min`` with ``sampler``.

    The samples are grouped by their time (a chain's levels form a grid, so the groups are
    few); each group runs ``sampler(model, x[group], ts, process, **options)`` on its own grid
    ``ts = time_grid(process, n_steps, kind, t_min, t_max=t[b])``
    (:func:`~diffcore.samplers.time_grid`), so every sample gets ``n_steps`` steps, as in the
    released code.  ``sampler``: a name in :data:`~diffcore.samplers.SAMPLERS` or a callable
    of the samplers' signature (:meth:`~diffcore.analytic.Gaussian.pf_ode_solver` gives the
    exact flow).  Cost: the sampler's calls per group, times the number of distinct times.
    Needs every ``t[b] > t_min``.  Shapes: ``x`` ``(B, ...)``, ``t`` ``(B,)``; returns the
    shape of ``x``.
    """
    if isinstance(sampler, str):
        one_of(sampler, "sampler", tuple(samplers.SAMPLERS))
        sampler = samplers.SAMPLERS[sampler]
    require(callable(sampler), "sampler", sampler, "a callable or a name in SAMPLERS")
    n_steps = count(n_steps, "n_steps")
    finite(x, "x")
    t = torch.as_tensor(t).to(torch.float64)
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have one time per sample ({x.shape[0]},), got {tuple(t.shape)}")
    low = float(t.min())
    require(low > t_min, "t", low, f"above t_min = {t_min} for every sample (its least value)")
    require(float(t.max()) <= 1, "t", float(t.max()), "at most 1 for every sample")
    out = torch.empty_like(x)
    for start in torch.unique(t).tolist():
        group = (t == start).to(x.device)
        ts = samplers.time_grid(process, n_steps, kind, t_min=t_min, t_max=start)
        out[group] = sampler(model, x[group], ts, process, **options)
    return out
