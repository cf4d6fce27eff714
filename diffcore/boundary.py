r"""Optimal boundary conditions: one start noise for a deterministic conditional sampler.

A conditional diffusion model for restoration (super-resolution: :math:`y` a low-resolution
image) sampled by a deterministic solver of the conditional PF-ODE is a map
:math:`x_0 = h(x_T, y)` of the start noise :math:`x_T` (the *boundary condition* of the ODE)
and the condition.  Each start gives a different result, of a different quality.  Ma et al.
(2024) choose one start :math:`\tilde x_T` for all inputs: the best of :math:`K` random starts
on a reference set :math:`\{(x_0^{(j)}, y^{(j)})\}_{j \le R}` of clean images and their
measurements,

.. math:: \tilde x_T = \arg\min_{k \le K}\;\frac1R\sum_{j}
          \mathcal L\big(h(x_T^{(k)}, y^{(j)}),\,x_0^{(j)}\big),

then reuse it for every new :math:`y` (:func:`best_of_k`, :func:`reference_error`).

**The Gaussian case, in closed form.**  With a Gaussian prior :math:`x_0 \sim \mathcal N(\mu,
\Sigma)` and a linear measurement :math:`y = A x_0 + \sigma_y n`, the posterior is
:math:`\mathcal N(m(y), P)` with :math:`m(y) = \mu + G(y - A\mu)`, :math:`G = \Sigma A^\top
(A\Sigma A^\top + \sigma_y^2 I)^{-1}` and :math:`P = \Sigma - GA\Sigma`, the same for every
:math:`y`.  Its exact denoiser is affine in :math:`(x, y)`, so every deterministic sampler
driven by it, and the exact flow, is an affine map (:class:`AffineFlow`,
:func:`conditional_flow_map`):

.. math:: h(x_T, y) = M x_T + K y + c .

For the exact PF-ODE from :math:`t_0` to :math:`t_1`, :math:`M = C_{t_1}^{1/2}C_{t_0}^{-1/2}`
with :math:`C_t = \alpha_t^2 P + \sigma_t^2 I`, and :math:`h = M x_T + (\alpha_{t_1}I -
\alpha_{t_0}M)\,m(y)`.  The error :math:`e = h(x_T, y) - x_0` is Gaussian in :math:`(x_0, n)`,
so the expected squared error of a fixed start is a quadratic in :math:`x_T`, exact
(:func:`expected_error`):

.. math::
    \begin{aligned}
    J(x_T) &= \lVert M x_T + b\rVert^2 + \operatorname{tr}\Sigma_e, \\
    b &= (KA - I)\mu + c, \\
    \Sigma_e &= (KA - I)\Sigma(KA - I)^\top + \sigma_y^2 K K^\top,
    \end{aligned}

minimised by :math:`x_T^\star = -M^+ b` (:func:`optimal_start`), for the exact flow
:math:`\alpha_{t_0}\mu`.  Given one :math:`y`, the error is :math:`\lVert M x_T + Ky + c -
m(y)\rVert^2 + \operatorname{tr}P`.  Where the sampler commutes with a shift of the mean
(:math:`x_t \to x_t + \alpha_t\delta` when :math:`m \to m + \delta`), its map is
:math:`h = m(y) + M(x_T - \alpha_{t_0}m(y))` and the per-measurement optimum is
:math:`\alpha_{t_0}m(y)`: so for the exact flow and the exponential integrators (DDIM,
DPM-Solver, DPM-Solver++, UniPC), on any process, and for every sampler on
:class:`~diffcore.processes.Linear`, whose :math:`\alpha_t` is linear in :math:`t`.  It
depends on :math:`y` only through :math:`\alpha_{t_0}`, which is 0 for
:class:`~diffcore.processes.Linear` (then one start is optimal for all :math:`y`, exactly:
the paper's finding) and :math:`6.6\cdot 10^{-3}` at :math:`t = 1` for the default
:class:`~diffcore.processes.VP`.  Euler and Heun steps in :math:`t` on VP do not commute with
the shift, and their per-measurement optimum moves with :math:`y` by much more.  At the optimum
the exact flow returns :math:`m(y) - \alpha_{t_0}M(m(y) - \mu)`, nearly the MMSE estimate;
a random start :math:`x_T \sim \mathcal N(0, I)` returns nearly a posterior sample, with
about twice the error.

**Best of K against the optimum.**  The excess error of a start is the quadratic form
:math:`\lVert M(x_T - x_T^\star)\rVert^2`; where it is isotropic, a random start's excess is
:math:`c^2\chi^2_d` and the best of :math:`K` keeps the fraction
:math:`\mathbb E\min_K\chi^2_d / d` of it (:func:`best_of_k_excess`): :math:`1/K` in
:math:`d = 2`, tending to 1 as :math:`d` grows, since :math:`\chi^2_d/d` concentrates.  In
high dimension the best of a few random starts is hardly better than any one of them.

**The paper and its code.**  The paper's distance :math:`\mathcal L` is LPIPS, its models
SR3 and StableSR, its candidates random Gaussian starts; it argues that the optimal start is
approximately shared by all :math:`y` through the unconditional model.  Here
:math:`\mathcal L` is the squared error, for which everything above is exact, and the sharing
is exact where :math:`\alpha_{t_0} = 0`.  We found no released implementation, so the
procedure follows the paper's text.

Reference: Y. Ma, H. Yang, W. Yang, J. Fu and J. Liu, *Solving Diffusion ODEs with Optimal
Boundary Conditions for Better Image Super-Resolution*, ICLR 2024 (arXiv:2305.15357).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffcore import samplers
from diffcore.analytic import Gaussian
from diffcore.checks import (
    count,
    finite,
    noise_level,
    per_sample,
    positive,
    require,
    returned_shape,
)
from diffcore.inverse.operators import LinearOperator
from diffcore.processes import Process

__all__ = [
    "AffineFlow",
    "posterior_parts",
    "posterior_denoiser",
    "conditional_flow_map",
    "expected_error",
    "optimal_start",
    "reference_error",
    "BestOfK",
    "best_of_k",
    "best_of_k_excess",
]


# -- the measurement and the exact posterior -----------------------------------------------------
def _matrix(operator, dim: int) -> Tensor:
    """The measurement as a float64 matrix ``(m, d)``: a real LinearOperator or a matrix."""
    if isinstance(operator, LinearOperator):
        require(not operator.complex_output, "operator", operator, "a real-valued operator")
        require(operator.in_dim == dim, "operator", operator, f"an operator on {dim} entries")
        return operator.to_dense(torch.float64)
    A = finite(torch.as_tensor(operator).to(torch.float64), "operator")
    if A.ndim != 2 or A.shape[1] != dim:
        raise ValueError(f"operator must be a matrix (m, {dim}), got shape {tuple(A.shape)}")
    return A


def _prior(prior) -> Gaussian:
    require(isinstance(prior, Gaussian), "prior", prior, "an analytic.Gaussian")
    return prior


def _sigma_y(sigma_y) -> float:
    return positive(noise_level(sigma_y, "sigma_y"), "sigma_y")


def posterior_parts(prior: Gaussian, operator, sigma_y: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""The gain, the offset and the covariance of the exact posterior of :math:`y = A x_0 +
    \sigma_y n` under :math:`x_0 \sim \mathcal N(\mu, \Sigma)`: :math:`m(y) = G y + g`,

    .. math::
        G = \Sigma A^\top(A\Sigma A^\top + \sigma_y^2 I)^{-1}, \quad
        g = \mu - G A\mu, \quad P = \Sigma - G A \Sigma,

    :math:`P` in the Joseph form :math:`(I - GA)\Sigma(I - GA)^\top + \sigma_y^2 GG^\top`.
    ``operator``: a real :class:`~diffcore.inverse.operators.LinearOperator` on ``d`` entries,
    or a matrix.  Shapes: returns ``G`` ``(d, m)``, ``g`` ``(d,)``, ``P`` ``(d, d)``, float64.
    """
    prior = _prior(prior)
    A = _matrix(operator, prior.dim)
    sigma_y = _sigma_y(sigma_y)
    mean, cov = prior.mean.to(torch.float64), prior.cov.to(torch.float64)
    evidence = A @ cov @ A.T + sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64)
    gain = torch.linalg.solve(evidence, A @ cov).T  # Sigma A^T S^{-1} (S, Sigma symmetric)
    keep = torch.eye(prior.dim, dtype=torch.float64) - gain @ A
    post = keep @ cov @ keep.T + sigma_y**2 * gain @ gain.T
    return gain, mean - gain @ (A @ mean), 0.5 * (post + post.T)


def posterior_denoiser(prior: Gaussian, operator, sigma_y: float, y: Tensor, process: Process):
    r"""The exact conditional denoiser :math:`D(x, t \mid y) = \mathbb E[x_0 \mid x_t = x, y]`
    for a batch of measurements: per sample the denoiser of :math:`\mathcal N(m(y_b), P)`,

    .. math:: D = m(y) + \alpha_t P(\alpha_t^2 P + \sigma_t^2 I)^{-1}(x - \alpha_t m(y)),

    as a model ``D(x, t)`` for the samplers.  Shapes: ``y`` ``(B, m)``; ``D`` maps ``(B, d)``
    to ``(B, d)``.
    """
    gain, offset, post = posterior_parts(prior, operator, sigma_y)
    finite(y, "y")
    require(y.ndim == 2 and y.shape[1] == gain.shape[1], "y", tuple(y.shape), "of shape (B, m)")
    centred = Gaussian(torch.zeros_like(offset), post)  # the posterior, shifted to mean 0
    means = y.to(torch.float64) @ gain.T + offset

    def denoise(x: Tensor, t) -> Tensor:
        m = means.to(dtype=x.dtype, device=x.device)
        alpha = process.alpha(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        return m + centred.denoise(x - per_sample(alpha, x) * m, t, process)

    return denoise


# -- the affine map of a conditional sampler ----------------------------------------------------
class AffineFlow(NamedTuple):
    r"""A conditional sampler that is affine: :math:`h(x_T, y) = M x_T + K y + c`.

    Calling it evaluates the map: ``flow(x_T, y)`` with ``x_T`` ``(B, d)`` or ``(d,)`` and
    ``y`` ``(B, m)`` or ``(m,)`` returns ``(B, d)`` (or ``(d,)``).  Shapes: ``M`` ``(d, d)``,
    ``K`` ``(d, m)``, ``c`` ``(d,)``.
    """

    M: Tensor
    K: Tensor
    c: Tensor

    def __call__(self, x_T: Tensor, y: Tensor) -> Tensor:
        return x_T @ self.M.T + y @ self.K.T + self.c


def conditional_flow_map(
    prior: Gaussian,
    operator,
    sigma_y: float,
    process: Process,
    ts=None,
    sampler: Callable | str | None = None,
    **options,
) -> AffineFlow:
    r"""The affine map :math:`x_0 = h(x_T, y)` of a deterministic conditional sampler on
    Gaussian data, from ``ts[0]`` (default 1) to ``ts[-1]`` (default 0).

    ``sampler=None``: the exact conditional PF-ODE, in closed form,
    :math:`M = C_{t_1}^{1/2}C_{t_0}^{-1/2}` (:math:`C_t = \alpha_t^2 P + \sigma_t^2 I`),
    :math:`K = (\alpha_{t_1}I - \alpha_{t_0}M)G` and :math:`c = (\alpha_{t_1}I -
    \alpha_{t_0}M)g` (:func:`posterior_parts`).  Otherwise ``sampler`` (a name in
    :data:`~diffcore.samplers.SAMPLERS` or a callable of their signature; deterministic) runs
    once on the grid ``ts`` with the exact conditional denoiser
    (:func:`posterior_denoiser`) on :math:`1 + d + m` probes, :math:`(0, 0)`,
    :math:`(e_i, 0)` and :math:`(0, e_j)`, which give :math:`c`, the columns of :math:`M` and
    those of :math:`K`: exact, since the map is affine.  ``options`` go to the sampler.
    Returns an :class:`AffineFlow` in float64.
    """
    ts = torch.tensor([1.0, 0.0], dtype=torch.float64) if ts is None else ts
    ts = samplers.check_time_grid(ts).to(torch.float64)
    gain, offset, post = posterior_parts(prior, operator, sigma_y)
    d, m = gain.shape
    if sampler is None:
        evals, evecs = torch.linalg.eigh(post)
        a0, a1 = process.alpha(ts[0]), process.alpha(ts[-1])
        s0, s1 = process.sigma(ts[0]), process.sigma(ts[-1])
        ratio = torch.sqrt((a1**2 * evals + s1**2) / (a0**2 * evals + s0**2))
        M = (evecs * ratio) @ evecs.T
        mix = a1 * torch.eye(d, dtype=torch.float64) - a0 * M  # what multiplies m(y)
        return AffineFlow(M, mix @ gain, mix @ offset)
    if isinstance(sampler, str):
        require(sampler in samplers.SAMPLERS, "sampler", sampler, "a name in SAMPLERS")
        require(
            not samplers.SAMPLERS[sampler].is_stochastic(**options),
            "sampler",
            sampler,
            "a deterministic sampler (its map is affine only without injected noise)",
        )
        sampler = samplers.SAMPLERS[sampler]
    require(callable(sampler), "sampler", sampler, "None, a name in SAMPLERS or a callable")
    eye_d, eye_m = torch.eye(d, dtype=torch.float64), torch.eye(m, dtype=torch.float64)
    zeros = torch.zeros(1 + d + m, d, dtype=torch.float64)
    starts = torch.cat([zeros[:1], eye_d, zeros[:m]])
    ys = torch.cat([torch.zeros(1 + d, m, dtype=torch.float64), eye_m])
    model = posterior_denoiser(prior, operator, sigma_y, ys, process)
    out = returned_shape(sampler(model, starts, ts, process, **options), starts.shape, "sampler")
    c = out[0]
    return AffineFlow((out[1 : 1 + d] - c).T, (out[1 + d :] - c).T, c)


# -- the exact error of a start and the optimal start -------------------------------------------
def _starts(starts: Tensor, dim: int) -> Tensor:
    finite(starts, "starts")
    starts = starts.to(torch.float64)
    starts = starts[None] if starts.ndim == 1 else starts
    if starts.ndim != 2 or starts.shape[1] != dim:
        raise ValueError(
            f"starts must have shape (K, {dim}) or ({dim},), got {tuple(starts.shape)}"
        )
    return starts


def _offset(flow: AffineFlow, prior: Gaussian, A: Tensor, sigma_y: float, y):
    r"""The offset :math:`b` with :math:`J = \lVert M x_T + b\rVert^2 + \text{const}`, and the
    constant: over the joint law of :math:`(x_0, y)`, or given one ``y``."""
    gain, offset, post = posterior_parts(prior, A, sigma_y)
    if y is not None:
        y = finite(torch.as_tensor(y), "y").to(torch.float64)
        require(y.shape == (A.shape[0],), "y", tuple(y.shape), f"of shape ({A.shape[0]},)")
        return flow.K @ y + flow.c - (gain @ y + offset), torch.trace(post)
    mean, cov = prior.mean.to(torch.float64), prior.cov.to(torch.float64)
    lift = flow.K @ A - torch.eye(prior.dim, dtype=torch.float64)  # e = M x_T + lift x0 + ...
    err_cov = lift @ cov @ lift.T + sigma_y**2 * flow.K @ flow.K.T
    return lift @ mean + flow.c, torch.trace(err_cov)


def expected_error(
    flow: AffineFlow, starts: Tensor, prior: Gaussian, operator, sigma_y: float, y=None
) -> Tensor:
    r"""The exact expected squared error :math:`J(x_T) = \mathbb E\lVert h(x_T, y) -
    x_0\rVert^2` of each fixed start, over :math:`x_0 \sim \mathcal N(\mu, \Sigma)` and
    :math:`y = Ax_0 + \sigma_y n`; or, given one measurement ``y``, over the posterior
    (module docstring):

    .. math:: J(x_T) = \lVert M x_T + b\rVert^2 + \operatorname{tr}\Sigma_e .

    Shapes: ``starts`` ``(K, d)`` or ``(d,)``, ``y`` ``(m,)``; returns ``(K,)``, float64.
    """
    prior = _prior(prior)
    A = _matrix(operator, prior.dim)
    sigma_y = _sigma_y(sigma_y)
    starts = _starts(starts, prior.dim)
    b, const = _offset(flow, prior, A, sigma_y, y)
    return (starts @ flow.M.T + b).pow(2).sum(-1) + const


def optimal_start(flow: AffineFlow, prior: Gaussian, operator, sigma_y: float, y=None) -> Tensor:
    r"""The start that minimises :func:`expected_error`: :math:`x_T^\star = -M^+ b`, the
    least-squares solution of :math:`M x_T = -b` of least norm; over the joint law of
    :math:`(x_0, y)`, or given one ``y`` ``(m,)``.  Shapes: returns ``(d,)``, float64."""
    prior = _prior(prior)
    A = _matrix(operator, prior.dim)
    b, _ = _offset(flow, prior, A, _sigma_y(sigma_y), y)
    return -(torch.linalg.pinv(flow.M) @ b)


# -- the paper's procedure ----------------------------------------------------------------------
def reference_error(flow: Callable, starts: Tensor, ref_x0: Tensor, ref_y: Tensor) -> Tensor:
    r"""The mean squared error of each start on a reference set, :math:`\frac1R\sum_j
    \lVert h(x_T^{(k)}, y^{(j)}) - x_0^{(j)}\rVert^2`: the criterion of best-of-K (with the
    squared error for the paper's LPIPS).  ``flow(x_T, y)`` maps batches ``(R, d)``,
    ``(R, m)`` to ``(R, d)`` (an :class:`AffineFlow` or any deterministic sampler).  Shapes:
    ``starts`` ``(K, d)``, ``ref_x0`` ``(R, d)``, ``ref_y`` ``(R, m)``; returns ``(K,)``."""
    finite(ref_x0, "ref_x0")
    finite(ref_y, "ref_y")
    require(ref_x0.ndim == 2, "ref_x0", tuple(ref_x0.shape), "of shape (R, d)")
    require(
        ref_y.ndim == 2 and ref_y.shape[0] == ref_x0.shape[0],
        "ref_y",
        tuple(ref_y.shape),
        f"of shape (R, m) with R = {ref_x0.shape[0]} as in ref_x0",
    )
    starts = _starts(starts, ref_x0.shape[1]).to(ref_x0.dtype)
    errors = []
    for start in starts:
        out = returned_shape(flow(start.expand_as(ref_x0), ref_y), ref_x0.shape, "flow(x_T, y)")
        errors.append((out - ref_x0).pow(2).sum(-1).mean())
    return torch.stack(errors)


class BestOfK(NamedTuple):
    """What :func:`best_of_k` returns: the chosen ``start`` ``(d,)``, its ``index`` among the
    ``starts`` ``(K, d)`` drawn, and the reference ``errors`` ``(K,)`` of them all."""

    start: Tensor
    index: int
    errors: Tensor
    starts: Tensor


def best_of_k(
    flow: Callable,
    ref_x0: Tensor,
    ref_y: Tensor,
    k: int,
    *,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> BestOfK:
    r"""The paper's boundary condition: of ``k`` starts :math:`x_T^{(i)} \sim \mathcal N(0,
    \mathrm{std}^2 I)`, the one of least :func:`reference_error` on the reference pairs
    ``(ref_x0, ref_y)``.  Cost: ``k`` runs of the sampler on the reference set.  Shapes:
    ``ref_x0`` ``(R, d)``, ``ref_y`` ``(R, m)``; returns a :class:`BestOfK`."""
    k = count(k, "k")
    std = positive(std, "std")
    finite(ref_x0, "ref_x0")
    require(ref_x0.ndim == 2, "ref_x0", tuple(ref_x0.shape), "of shape (R, d)")
    starts = std * torch.randn(k, ref_x0.shape[1], generator=generator, dtype=ref_x0.dtype)
    errors = reference_error(flow, starts, ref_x0, ref_y)
    index = int(errors.argmin())
    return BestOfK(starts[index], index, errors, starts)


def best_of_k_excess(dim: int, k: int) -> float:
    r"""The share of a random start's excess error that the best of ``k`` keeps, where the
    excess is isotropic, :math:`c^2\chi^2_d`:

    .. math:: \rho_d(K) = \frac{\mathbb E\min_{i \le K}\chi^2_{d,i}}{d}
              = \frac1d\int_0^1 F_d^{-1}\!\big(1 - w^{1/K}\big)\,dw,

    with :math:`F_d` the :math:`\chi^2_d` distribution function (the minimum of :math:`K` has
    the survival function :math:`S^K`; the integral is its quantile integral, by quadrature).
    :math:`\rho_2(K) = 1/K` exactly; :math:`\rho_d(K) \to 1` as :math:`d \to \infty`.
    Returns a float.
    """
    from scipy import integrate, stats  # here: only this function needs SciPy

    dim, k = count(dim, "dim"), count(k, "k")
    if k == 1:
        return 1.0
    value, _ = integrate.quad(
        lambda w: stats.chi2.isf(w ** (1.0 / k), dim), 0.0, 1.0, limit=200, epsabs=1e-13
    )
    return value / dim
