r"""Posterior sampling, exact and active: particles, active subsampling, two priors, FlowChef.

Chapter 20 of the book.  Four methods, each with an exact answer on Gaussian or Gaussian-mixture
priors (:class:`diffcore.analytic.GaussianMixture` and its exact ``posterior``):

- :func:`twisted_smc` / :func:`tds`: an asymptotically exact posterior sampler, twisted
  sequential Monte Carlo over the reverse diffusion (TDS, Wu, Trippe, Naesseth, Blei &
  Cunningham, 2023).  Particles follow the ΠGDM-twisted DDPM transition, carry importance
  weights that correct to :math:`p(x_0 \mid y)` for the sampler's own prior chain, and are
  resampled (systematic) when the effective sample size drops.  The approximation-free ensemble
  method of the seed paper (Solving inverse problems via diffusion-based priors: an
  approximation-free ensemble sampling approach, 2025) simulates a weighted-particle PDE of the
  same kind (a modified diffusion plus a reweighting term); only its abstract was available
  here, so this module implements the discrete-time TDS form, whose weights are written below.
- :func:`greedy_exact_choice`, :func:`ads_scores`, :func:`ads_choice`, :func:`active_subsample`:
  active diffusion subsampling (ADS, Nolan, Stevens, van Nierop, van Sloun, 2024): the next pixel
  is the one whose predicted measurement has maximum entropy under the posterior particles.
- :func:`stack_mixtures`, :func:`stacked_denoiser`, :func:`dehaze`: two diffusion priors at
  once, :math:`y = x + h + \sigma_y n` with separate priors for the signal :math:`x` and the
  structured corruption :math:`h` (Stevens et al., 2023, dehazing ultrasound), sampled jointly.
- :func:`flowchef`, :func:`flowchef_law`: FlowChef (Patel, Wen, Metaxas & Yang, 2024), steering a
  rectified flow by a gradient-skipping correction of its own estimate of :math:`x_0`.

States are ``(B, *in_shape)``; the measurement is one ``y`` of shape ``(1, *out_shape)`` (or
``(B, ...)`` with identical rows, for the particle methods).  The solvers share the signature
of :mod:`diffcore.inverse.solvers` and run on :func:`diffcore.stepping.integrate`;
:data:`PARTICLE_SOLVERS` lists them with their facts (:class:`~diffcore.inverse.solvers.Solver`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffcore.analytic import GaussianMixture
from diffcore.checks import between, count, finite, floating, noise_level, nonnegative, positive
from diffcore.inverse.operators import LinearOperator, check_operator
from diffcore.inverse.solvers import Solver
from diffcore.processes import Process, check_process
from diffcore.stepping import check_time_grid, ddim_step, ddim_weights, integrate

__all__ = [
    "SMCResult",
    "effective_sample_size",
    "systematic_resample",
    "twisted_smc",
    "tds",
    "gaussian_posterior_cov",
    "gaussian_entropy",
    "greedy_exact_choice",
    "ads_scores",
    "ads_choice",
    "ADSResult",
    "active_subsample",
    "stack_mixtures",
    "stacked_denoiser",
    "dehaze",
    "flowchef",
    "flowchef_law",
    "PARTICLE_SOLVERS",
]

_LOG_2PI = math.log(2 * math.pi)


# -- shared checks -------------------------------------------------------------------------------
def _check_grid(ts, process) -> Tensor:
    ts = check_time_grid(ts).to(torch.float64)
    alpha_0 = float(process.alpha(ts[0]))
    if alpha_0 <= 0:
        raise ValueError(
            f"the particle methods need alpha > 0 on the grid, got alpha(ts[0]) = {alpha_0:.3g} "
            f"at ts[0] = {float(ts[0]):.6g}: take t_max < {float(ts[0]):.6g}"
        )
    return ts


def _one_measurement(y, shape: tuple[int, ...], what: str) -> Tensor:
    """``y`` of shape ``(1, *shape)`` or ``(B, *shape)`` with identical rows; returns ``(1, ...)``."""
    if not isinstance(y, Tensor) or y.ndim != len(shape) + 1 or tuple(y.shape[1:]) != shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"y must have shape (1, {', '.join(map(str, shape))}) for {what}, got {got}"
        )
    floating(y, "y")
    finite(y, "y")
    if y.shape[0] > 1 and not bool((y == y[:1]).all()):
        raise ValueError(
            f"y must be one measurement for the whole particle population: got {y.shape[0]} "
            f"different rows (run one population per measurement)"
        )
    return y[:1]


def _start(x, n, shape, ts, process, generator, like: Tensor) -> Tensor:
    """The start state at ``ts[0]``: ``x`` checked, or :math:`\\sigma_{t_0}\\varepsilon` of batch ``n``."""
    if x is None:
        sigma_0 = float(process.sigma(ts[0]))
        return sigma_0 * torch.randn(
            (n, *shape), generator=generator, dtype=like.dtype, device=like.device
        )
    floating(x, "x")
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"x must have shape (batch, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
        )
    return finite(x, "x").detach()


def _r2(point, prior_var: float) -> float:
    r"""ΠGDM's variance of :math:`p(x_0 \mid x_t)`: :math:`v\bar\sigma^2/(v + \bar\sigma^2)`."""
    if prior_var == 0 or point.sigma == 0:
        return 0.0
    bar2 = (point.sigma / point.alpha) ** 2
    return prior_var * bar2 / (prior_var + bar2)


# -- weights and resampling ----------------------------------------------------------------------
def effective_sample_size(log_weights: Tensor) -> float:
    r"""Kish's effective sample size :math:`(\sum_i w_i)^2/\sum_i w_i^2` of unnormalised log
    weights, a number in :math:`[1, N]`.  Shapes: ``log_weights`` ``(N,)``."""
    if not isinstance(log_weights, Tensor) or log_weights.ndim != 1 or log_weights.numel() == 0:
        raise ValueError("log_weights must be a non-empty 1-D tensor")
    lw = log_weights - log_weights.max()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def systematic_resample(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Systematic resampling (Kitagawa, 1996): indices :math:`a_i = F^{-1}((i + u)/N)`,
    :math:`u \sim U[0, 1)` one draw for all, :math:`F` the cumulative normalised weights.  Each
    particle is copied :math:`\lfloor N w_i\rfloor` or :math:`\lceil N w_i\rceil` times (unbiased,
    lowest variance of the standard schemes).  Shapes: ``weights`` ``(N,)`` non-negative, not all
    zero; returns ``(N,)`` int64 indices, sorted."""
    if not isinstance(weights, Tensor) or weights.ndim != 1 or weights.numel() == 0:
        raise ValueError("weights must be a non-empty 1-D tensor")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    total = float(weights.sum())
    if not total > 0:
        raise ValueError("weights must not all be zero")
    n = weights.numel()
    cdf = torch.cumsum(weights / total, 0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype, device=cdf.device)
    points = (torch.arange(n, dtype=cdf.dtype, device=cdf.device) + u) / n
    return torch.searchsorted(cdf, points).clamp(max=n - 1)


# -- twisted SMC ---------------------------------------------------------------------------------
@dataclass
class SMCResult:
    r"""What :func:`twisted_smc` returns.

    ``particles`` ``(N, *in_shape)``; ``log_weights`` ``(N,)`` unnormalised; ``ess`` ``(n + 2,)``
    the effective sample size after the start's weights, after each of the ``n`` steps (before
    any resampling) and after the final likelihood correction; ``resampled`` the steps after
    which the particles were resampled (``-1``: at the start);
    ``log_evidence`` the SMC estimate of :math:`\log p(y)` under the sampler's prior chain;
    ``nfe`` the model calls.
    """

    particles: Tensor
    log_weights: Tensor
    ess: Tensor
    resampled: list[int]
    log_evidence: float
    nfe: int

    @property
    def weights(self) -> Tensor:
        """The normalised weights ``(N,)``."""
        return torch.softmax(self.log_weights, 0)

    def mean(self) -> Tensor:
        r""":math:`\sum_i w_i x_i`, shape ``(prod(in_shape),)``."""
        return self.weights @ self.particles.reshape(self.particles.shape[0], -1)

    def cov(self) -> Tensor:
        r"""The weighted covariance :math:`\sum_i w_i (x_i - m)(x_i - m)^\top`, ``(d, d)``."""
        flat = self.particles.reshape(self.particles.shape[0], -1)
        c = flat - self.mean()
        return (c * self.weights[:, None]).T @ c

    def resample(self, generator: torch.Generator | None = None) -> Tensor:
        """Equally weighted particles ``(N, *in_shape)`` by :func:`systematic_resample`."""
        return self.particles[systematic_resample(self.weights, generator)]


class _Twist:
    r"""The twisting function :math:`\tilde p_t(y \mid x_t) = \mathcal N(y; A\hat x_0(x_t),
    \sigma_y^2 I + r_t^2 AA^\top)` through the eigendecomposition :math:`AA^\top = Q\Lambda
    Q^\top` (dense: the toy dimensions of the book)."""

    def __init__(self, operator: LinearOperator, y: Tensor, sigma_y: float):
        if operator.complex_output:
            raise ValueError(
                f"twisted_smc needs a real-valued operator, got {type(operator).__name__} "
                f"(complex output)"
            )
        a = operator.to_dense(torch.float64)
        lam, q = torch.linalg.eigh(a @ a.T)
        self.lam = lam.clamp(min=0).to(dtype=y.dtype, device=y.device)
        self.q = q.to(dtype=y.dtype, device=y.device)
        self.operator, self.y, self.sigma_y = operator, y.reshape(1, -1), sigma_y

    def __call__(self, x0: Tensor, r2: float) -> tuple[Tensor, Tensor]:
        """``(log p~ (B,), A^T S^{-1} (y - A x0) (B, *in_shape))`` at the estimates ``x0``."""
        resid = self.y - self.operator(x0).reshape(x0.shape[0], -1)
        var = self.sigma_y**2 + r2 * self.lam
        c = resid @ self.q
        quad = (c**2 / var).sum(-1)
        logp = -0.5 * (quad + torch.log(var).sum() + var.numel() * _LOG_2PI)
        u = (c / var) @ self.q.T
        return logp, self.operator.adjoint(u)


def twisted_smc(
    model: Callable,
    y: Tensor,
    operator: LinearOperator,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    *,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    n_particles: int | None = None,
    prior_var: float = 1.0,
    ess_threshold: float = 0.5,
) -> SMCResult:
    r"""Twisted sequential Monte Carlo over the reverse diffusion (TDS, Wu et al., 2023).

    The target is the posterior of the sampler's own prior chain: the DDPM ancestral chain
    :math:`p(x_{t_0})\prod_i p(x_{t_{i+1}} \mid x_{t_i})` with output
    :math:`x_{\text{out}} = D(x_{t_n}, t_n)`, reweighted by the likelihood
    :math:`\mathcal N(y; Ax_{\text{out}}, \sigma_y^2 I)`.  With the exact denoiser this chain
    tends to the prior as the steps grow, so the weighted particles tend to :math:`p(x_0 \mid y)`
    as particles and steps grow (the discretisation floor is that of DDPM).  The pieces:

    - twisting functions :math:`\tilde p_t(y \mid x_t) = \mathcal N(y; A\hat x_0(x_t),
      \sigma_y^2 I + r_t^2AA^\top)`, :math:`r_t^2 = v\bar\sigma_t^2/(v + \bar\sigma_t^2)`,
      :math:`\bar\sigma_t = \sigma_t/\alpha_t` (ΠGDM's; ``prior_var = 0`` is TDS's own
      :math:`r_t = 0`, i.e. :math:`p(y \mid \hat x_0)`);
    - the proposal (TDS adds the transition variance times :math:`\nabla\log\tilde p_t` to
      the DDPM mean; here the gradient enters through the conditional denoiser, as in ΠGDM,
      which scales it by :math:`\partial\mu/\partial\hat x_0\cdot\sigma_t^2/\alpha_t`; any
      such choice leaves the target unchanged, only the weights' variance differs), the DDPM
      transition :math:`\mathcal N(\mu(x_t, \hat x_0^y), c^2 I)` from the
      twisted denoiser :math:`\hat x_0^y = \hat x_0 + (\sigma_t^2/\alpha_t)\nabla_{x_t}\log
      \tilde p_t(y \mid x_t)` (Tweedie's formula for :math:`p(x_t \mid y)`; the gradient by
      autograd through the model), where :math:`\mu(x_t, \hat x_0)` and :math:`c^2` are the
      mean and variance of the prior's transition :math:`p(x_s \mid x_t) = \mathcal N(\mu(x_t,
      \hat x_0), c^2 I)` (:func:`~diffcore.stepping.ddim_step` with ``eta = 1``);
    - the weights: :math:`w_{t_0} = \tilde p_{t_0}(y \mid x_{t_0})`, then at each step

      .. math:: w \leftarrow w\,\frac{p(x_s \mid x_t)\,\tilde p_s(y \mid x_s)}
                {q(x_s \mid x_t, y)\,\tilde p_t(y \mid x_t)},

      and at the end :math:`w \leftarrow w\,\mathcal N(y; Ax_{\text{out}}, \sigma_y^2 I)/
      \tilde p_{t_n}(y \mid x_{t_n})`, so the product telescopes to the target over the
      proposal, whatever the twist;
    - systematic resampling (:func:`systematic_resample`) whenever the effective sample size
      falls below ``ess_threshold * N`` (0: never; 1: every step).

    The start is ``x`` (its batch is the number of particles ``N``) or ``n_particles`` draws of
    :math:`\sigma_{t_0}\varepsilon`, the solvers' convention.  Needs ``sigma_y > 0`` (a likelihood
    density) and :math:`\sigma > 0` on the whole grid (the transition densities).  ``y``: one
    measurement ``(1, *out_shape)``.  Cost: one model call and one backward pass per step, plus
    one at the start (NFE = steps + 1), and an eigendecomposition of the dense :math:`AA^\top`.
    Returns an :class:`SMCResult` (particles ``(N, *in_shape)``, log weights, ESS history).
    """
    operator = check_operator(operator)
    process = check_process(process)
    sigma_y = noise_level(sigma_y, "sigma_y")
    if sigma_y == 0:
        raise ValueError(
            "twisted_smc weights particles by the likelihood N(y; Ax, sigma_y^2 I): give "
            "sigma_y > 0, got sigma_y = 0.0"
        )
    prior_var = nonnegative(prior_var, "prior_var")
    ess_threshold = between(ess_threshold, "ess_threshold", 0, 1)
    ts = _check_grid(ts, process)
    sigma_last = float(process.sigma(ts[-1]))
    if sigma_last <= 0:
        raise ValueError(
            f"twisted_smc needs sigma > 0 at the last time (its transitions need a density), "
            f"got sigma(ts[-1]) = {sigma_last:.3g} at ts[-1] = {float(ts[-1]):.6g}: take t_min > 0"
        )
    y = _one_measurement(y, operator.out_shape, type(operator).__name__)
    n = count(n_particles if n_particles is not None else 1, "n_particles")
    if x is not None and n_particles is not None and n != x.shape[0]:
        raise ValueError(f"n_particles = {n_particles} but x has batch {x.shape[0]}")
    x = _start(x, n, operator.in_shape, ts, process, generator, y)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one particle, got batch 0")
    n = x.shape[0]
    twist = _Twist(operator, y, sigma_y)
    state: dict = {"log_w": None, "log_z": 0.0, "ess": [], "resampled": []}

    def evaluate(k, x: Tensor, point) -> dict:
        """x0, log p~, the twisted x0 at ``x`` (time ``point``)."""
        r2 = _r2(point, prior_var)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            x0 = k.D(leaf, point)
            logp, grad_out = twist(x0, r2)
            (g,) = torch.autograd.grad(x0, leaf, grad_outputs=grad_out.detach())
        x0 = x0.detach()
        return {"x0": x0, "logp": logp.detach(), "x0y": x0 + point.sigma**2 / point.alpha * g}

    def maybe_resample(i: int, x: Tensor, here: dict) -> Tensor:
        state["ess"].append(effective_sample_size(state["log_w"]))
        if state["ess"][-1] < ess_threshold * n:
            lw = state["log_w"]
            state["log_z"] += float(torch.logsumexp(lw, 0)) - math.log(n)
            idx = systematic_resample(torch.softmax(lw, 0), generator)
            for key in here:
                here[key] = here[key][idx]
            state["log_w"] = torch.zeros_like(lw)
            state["resampled"].append(i)
            x = x[idx]
        return x

    def update(k, x):
        if k.first:
            state["here"] = evaluate(k, x, k.t)
            state["log_w"] = state["here"]["logp"].clone()
            x = maybe_resample(-1, x, state["here"])
        here = state["here"]
        k.denoised = here["x0y"]
        mean_prior = ddim_step(x, here["x0"], k.t, k.s, eta=1.0)
        mean_twist = ddim_step(x, here["x0y"], k.t, k.s, eta=1.0)
        c = ddim_weights(k.t, k.s, 1.0)[2]  # the transition's std
        z = k.noise()
        new = mean_twist + c * z
        delta = (mean_twist - mean_prior) / c
        # log p(x_s | x_t) - log q(x_s | x_t, y) = -(|delta + z|^2 - |z|^2) / 2
        log_ratio = -0.5 * (delta * (delta + 2 * z)).reshape(n, -1).sum(-1)
        nxt = evaluate(k, new, k.s)
        state["log_w"] = state["log_w"] + log_ratio + nxt["logp"] - here["logp"]
        state["here"] = nxt
        return maybe_resample(k.i, new, nxt)

    def finish(k, x):
        here = state["here"]
        final, _ = twist(here["x0"], 0.0)
        state["log_w"] = state["log_w"] + final - here["logp"]
        k.denoised = here["x0"]
        return here["x0"]

    out = integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )
    lw = state["log_w"]
    log_z = state["log_z"] + float(torch.logsumexp(lw, 0)) - math.log(n)
    ess = torch.tensor([*state["ess"], effective_sample_size(lw)], dtype=torch.float64)
    return SMCResult(out, lw, ess, state["resampled"], log_z, nfe=len(ts))


def tds(
    model: Callable,
    y: Tensor,
    operator: LinearOperator,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    *,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    prior_var: float = 1.0,
    ess_threshold: float = 0.5,
) -> Tensor:
    r"""The twisted diffusion sampler in the solvers' signature: :func:`twisted_smc` with as many
    particles as the batch (of ``x``, else of ``y``), followed by a final systematic resampling,
    so that the returned ``(B, *in_shape)`` are equally weighted posterior samples.  All rows of
    ``y`` must be the same measurement (one population per measurement).  One model call and one
    backward pass per step, plus one."""
    n = None if x is not None else (y.shape[0] if isinstance(y, Tensor) and y.ndim > 0 else 1)
    result = twisted_smc(
        model,
        y,
        operator,
        sigma_y,
        ts,
        process,
        x=x,
        generator=generator,
        callback=callback,
        n_particles=n,
        prior_var=prior_var,
        ess_threshold=ess_threshold,
    )
    return result.resample(generator)


# -- active diffusion subsampling ----------------------------------------------------------------
def _check_cov_mask(cov, mask) -> tuple[Tensor, Tensor]:
    floating(cov, "cov")
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix (d, d), got {tuple(cov.shape)}")
    d = cov.shape[0]
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.numel() != d:
        raise ValueError(
            f"mask must be a boolean tensor with d = {d} entries, got mask of dtype "
            f"{mask.dtype} and shape {tuple(mask.shape)}"
        )
    return cov, mask.reshape(d).to(cov.device)


def gaussian_posterior_cov(cov: Tensor, mask: Tensor, sigma_y: float) -> Tensor:
    r"""The posterior covariance of :math:`x \sim \mathcal N(\mu, \Sigma)` given the entries in
    ``mask`` measured with noise :math:`\sigma_y`: :math:`\Sigma - \Sigma_{:M}(\Sigma_{MM} +
    \sigma_y^2I)^{-1}\Sigma_{M:}` (independent of the values measured).  Shapes: ``cov``
    ``(d, d)``, ``mask`` boolean with ``d`` entries (any shape); returns ``(d, d)``."""
    cov, mask = _check_cov_mask(cov, mask)
    sigma_y = noise_level(sigma_y, "sigma_y")
    idx = torch.nonzero(mask).reshape(-1)
    if idx.numel() == 0:
        return cov.clone()
    s = cov[idx][:, idx] + sigma_y**2 * torch.eye(idx.numel(), dtype=cov.dtype, device=cov.device)
    c = cov[:, idx]
    out = cov - c @ torch.linalg.solve(s, c.T)
    return 0.5 * (out + out.T)


def gaussian_entropy(cov: Tensor) -> float:
    r""":math:`H(\mathcal N(\mu, \Sigma)) = \tfrac12\log\det(2\pi e\,\Sigma)` in nats.  Shapes:
    ``cov`` ``(d, d)`` positive definite."""
    floating(cov, "cov")
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix (d, d), got {tuple(cov.shape)}")
    d = cov.shape[0]
    return 0.5 * (d * (1 + _LOG_2PI) + float(torch.linalg.slogdet(cov)[1]))


def greedy_exact_choice(cov: Tensor, mask: Tensor, sigma_y: float) -> int:
    r"""The exact greedy maximum-entropy choice on a Gaussian prior: the unobserved coordinate
    :math:`j` of largest posterior variance :math:`(\Sigma_{\text{post}})_{jj}`
    (:func:`gaussian_posterior_cov`).  Measuring :math:`j` next removes
    :math:`\tfrac12\log(1 + (\Sigma_{\text{post}})_{jj}/\sigma_y^2)` nats, and the predicted
    measurement's entropy is :math:`\tfrac12\log 2\pi e((\Sigma_{\text{post}})_{jj} +
    \sigma_y^2)`: both grow with the variance, so maximum expected entropy, maximum information
    and maximum posterior variance pick the same :math:`j`.  Shapes: ``cov`` ``(d, d)``,
    ``mask`` boolean with ``d`` entries; returns the flat index (an int)."""
    cov, mask = _check_cov_mask(cov, mask)
    if bool(mask.all()):
        raise ValueError("mask already observes every entry: nothing left to choose")
    var = gaussian_posterior_cov(cov, mask, sigma_y).diagonal().clone()
    var[mask] = -math.inf
    return int(torch.argmax(var))


def ads_scores(particles: Tensor, mask: Tensor, sigma_y: float) -> Tensor:
    r"""ADS's entropy of each candidate measurement under the particles (Nolan et al., 2024).

    For an unobserved entry :math:`j`, the predicted measurement :math:`y_j = x_j +
    \sigma_y n` under the particles :math:`x^{(1..N)}` is the mixture
    :math:`\frac1N\sum_k\mathcal N(x^{(k)}_j, \sigma_y^2)`; its entropy is estimated at the
    particles,

    .. math:: \hat H_j = -\frac1N\sum_i\log\Big(\frac1N\sum_k
              \mathcal N(x^{(i)}_j; x^{(k)}_j, \sigma_y^2)\Big).

    Observed entries score :math:`-\infty`.  The official code scores
    :math:`\sum_i\log\sum_k\exp(+(x^{(i)}_j - x^{(k)}_j)^2/2\sigma^2)` (positive exponent,
    no normalisation); both grow with the spread of the particles along :math:`j`, and for
    Gaussian particles both pick the entry of largest variance as :math:`N` grows.  Shapes:
    ``particles`` ``(N, *shape)``, ``mask`` boolean of ``shape``; returns ``(prod(shape),)``.
    """
    floating(particles, "particles")
    if particles.ndim < 2 or particles.shape[0] == 0:
        raise ValueError(
            f"particles must have shape (N, *shape) with N >= 1, got {tuple(particles.shape)}"
        )
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(particles.shape[1:]):
        raise ValueError(
            f"mask must be a boolean tensor of shape {tuple(particles.shape[1:])} (the "
            f"particles' shape), got mask of dtype {mask.dtype} and shape {tuple(mask.shape)}"
        )
    sigma_y = positive(noise_level(sigma_y, "sigma_y") or 0.0, "sigma_y")
    flat = particles.reshape(particles.shape[0], -1)
    n, d = flat.shape
    chunk = max(1, 2**22 // (n * n))  # at most ~4M pairwise entries at once
    parts = []
    for lo in range(0, d, chunk):
        cols = flat[:, lo : lo + chunk]
        diff = cols[:, None, :] - cols[None, :, :]  # (N, N, chunk)
        log_kernel = -0.5 * (diff / sigma_y) ** 2
        log_density = torch.logsumexp(log_kernel, 1) - math.log(n)  # (N, chunk)
        parts.append(-log_density.mean(0))
    scores = torch.cat(parts) + 0.5 * _LOG_2PI + math.log(sigma_y)
    return scores.masked_fill(mask.reshape(-1).to(scores.device), -math.inf)


def ads_choice(particles: Tensor, mask: Tensor, sigma_y: float) -> int:
    """The ADS choice: the flat index of the unobserved entry of largest :func:`ads_scores`.
    Shapes: ``particles`` ``(N, *shape)``, ``mask`` boolean of ``shape``; returns an int."""
    scores = ads_scores(particles, mask, sigma_y)
    if bool(torch.isinf(scores).all()):
        raise ValueError("mask already observes every entry: nothing left to choose")
    return int(torch.argmax(scores))


@dataclass
class ADSResult:
    """What :func:`active_subsample` returns: the final ``mask`` (boolean, ``in_shape``), the
    ``order`` of the chosen flat indices, the measurement ``y`` ``(1, *in_shape)`` (zero where
    unobserved), the final ``particles`` ``(N, *in_shape)`` and the model calls ``nfe``."""

    mask: Tensor
    order: list[int]
    y: Tensor
    particles: Tensor
    nfe: int


def active_subsample(
    model: Callable,
    x_true: Tensor,
    n_measurements: int,
    ts: Tensor,
    process: Process,
    *,
    sigma_y: float,
    mask: Tensor | None = None,
    n_particles: int = 64,
    window: float = 0.8,
    prior_var: float = 1.0,
    generator: torch.Generator | None = None,
) -> ADSResult:
    r"""Active diffusion subsampling (Nolan et al., 2024): acquire pixels during the reverse process.

    ``n_particles`` particles run the ΠGDM-guided DDPM chain (the conditional denoiser
    :math:`\hat x_0^y = \hat x_0 + (\sigma_t^2/\alpha_t)\nabla\log\mathcal N(y_M; \hat x_{0,M},
    (\sigma_y^2 + r_t^2)I)`, ``prior_var`` as in :func:`twisted_smc`) on the pixels measured so
    far, :math:`M` = ``mask``.  At ``n_measurements`` steps spread over the first ``window``
    fraction of the grid, the particles' estimates :math:`\hat x_0^y` (the beliefs about
    :math:`x`) choose the next pixel (:func:`ads_choice`), which is then measured from the
    true signal, :math:`y_j = x_j + \sigma_y n`, and joins the mask.  The paper guides with DPS;
    here ΠGDM's guidance, whose weight needs no tuning.  ``x_true`` ``(1, *shape)``; ``mask``
    the initially observed pixels (default none).  One model call and one backward pass per
    step, plus one.  Returns an :class:`ADSResult`.
    """
    process = check_process(process)
    floating(x_true, "x_true")
    finite(x_true, "x_true")
    if x_true.ndim < 2 or x_true.shape[0] != 1:
        raise ValueError(f"x_true must have shape (1, *shape), got {tuple(x_true.shape)}")
    shape = tuple(x_true.shape[1:])
    sigma_y = positive(noise_level(sigma_y, "sigma_y") or 0.0, "sigma_y")
    n_particles = count(n_particles, "n_particles")
    window = between(window, "window", 0, 1, open_low=True)
    prior_var = nonnegative(prior_var, "prior_var")
    ts = _check_grid(ts, process)
    n_steps = len(ts) - 1
    if mask is None:
        mask = torch.zeros(shape, dtype=torch.bool)
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"mask must be a boolean tensor of shape {shape} (x_true's), got mask of dtype "
            f"{mask.dtype} and shape {tuple(mask.shape)}"
        )
    mask = mask.clone().to(x_true.device)
    free = int((~mask).sum())
    n_measurements = count(n_measurements, "n_measurements")
    if n_measurements > free:
        raise ValueError(
            f"n_measurements = {n_measurements} exceeds the {free} unobserved entries of mask"
        )
    noise = torch.randn(shape, generator=generator, dtype=x_true.dtype, device=x_true.device)
    y_full = torch.where(mask, x_true[0] + sigma_y * noise, torch.zeros_like(x_true[0]))
    at = [math.floor(j * window * n_steps / n_measurements) for j in range(n_measurements)]
    order: list[int] = []
    x = _start(None, n_particles, shape, ts, process, generator, x_true)

    def guided(k, x: Tensor, point) -> Tensor:
        r2 = _r2(point, prior_var)
        m = mask.to(x.dtype)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            x0 = k.D(leaf, point)
            u = m * (y_full - x0).detach() / (sigma_y**2 + r2)
            (g,) = torch.autograd.grad(x0, leaf, grad_outputs=u)
        if point.sigma == 0:
            return x0.detach()
        return x0.detach() + point.sigma**2 / point.alpha * g

    def update(k, x):
        x0y = k.denoised = guided(k, x, k.t)
        for _ in range(at.count(k.i)):
            j = ads_choice(x0y, mask, sigma_y)
            order.append(j)
            mask.view(-1)[j] = True
            y_full.view(-1)[j] = x_true.reshape(-1)[j] + sigma_y * noise.reshape(-1)[j]
        return k.ddim(x, x0y, 1.0)

    def finish(k, x):
        return guided(k, x, k.t)

    nfe = {"n": 0}

    def counted(v, t):
        nfe["n"] += 1
        return model(v, t)

    out = integrate(update, counted, x, ts, process, generator=generator, finish=finish)
    return ADSResult(mask, order, (y_full * mask)[None], out, nfe["n"])


# -- two priors at once --------------------------------------------------------------------------
def stack_mixtures(signal: GaussianMixture, haze: GaussianMixture) -> GaussianMixture:
    r"""The prior of the stacked variable :math:`z = (x, h)` with :math:`x \sim` ``signal`` and
    :math:`h \sim` ``haze`` independent: the mixture of products, components :math:`(j, k)` with
    weight :math:`w_j v_k`, mean :math:`(\mu_j, \nu_k)` and block-diagonal covariance
    :math:`\operatorname{diag}(\Sigma_j, \Gamma_k)`.  Shapes: the mixtures in dimensions
    :math:`d_x, d_h`; returns a mixture in :math:`d_x + d_h` with :math:`K_xK_h` components
    (component :math:`jK_h + k`)."""
    for name, m in (("signal", signal), ("haze", haze)):
        if not isinstance(m, GaussianMixture):
            raise TypeError(f"{name} must be a GaussianMixture, got {type(m).__name__}")
    kx, kh, dx, dh = signal.n_components, haze.n_components, signal.dim, haze.dim
    dtype = signal.means.dtype
    means = torch.cat(
        [
            signal.means[:, None, :].expand(kx, kh, dx),
            haze.means.to(dtype)[None, :, :].expand(kx, kh, dh),
        ],
        -1,
    ).reshape(kx * kh, dx + dh)
    covs = torch.zeros(kx, kh, dx + dh, dx + dh, dtype=dtype)
    covs[:, :, :dx, :dx] = signal.covs[:, None]
    covs[:, :, dx:, dx:] = haze.covs.to(dtype)[None, :]
    weights = (signal.weights[:, None] * haze.weights.to(dtype)[None, :]).reshape(-1)
    return GaussianMixture(means, covs.reshape(kx * kh, dx + dh, dx + dh), weights / weights.sum())


def stacked_denoiser(model_x: Callable, model_h: Callable) -> Callable:
    r"""The denoiser of the stacked variable ``z`` ``(B, 2, *shape)`` (signal ``z[:, 0]``, haze
    ``z[:, 1]``) under independent priors: the product's diffused marginal is the product of
    the marginals, so :math:`D(z, t) = (D_x(z_0, t), D_h(z_1, t))`, one call of each model."""
    for name, m in (("model_x", model_x), ("model_h", model_h)):
        if not callable(m):
            raise TypeError(f"{name} must be callable as model(x, t), got {type(m).__name__}")

    def joint(z: Tensor, t) -> Tensor:
        if z.ndim < 2 or z.shape[1] != 2:
            raise ValueError(f"z must have shape (batch, 2, *shape), got {tuple(z.shape)}")
        return torch.stack([model_x(z[:, 0], t), model_h(z[:, 1], t)], 1)

    return joint


def dehaze(
    model_x: Callable,
    model_h: Callable,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    *,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    eta: float = 1.0,
    prior_var: tuple[float, float] = (1.0, 1.0),
    guidance_scale: float = 1.0,
) -> Tensor:
    r"""Joint posterior sampling with two diffusion priors: :math:`y = x + h + \sigma_y n`.

    The stacked state :math:`z = (x, h)` ``(B, 2, *shape)`` runs one reverse chain with the
    stacked denoiser (:func:`stacked_denoiser`), guided as in ΠGDM with the variances of the
    two priors kept apart: :math:`p(x_0 \mid x_t) \approx \mathcal N(\hat x_0, r_{x,t}^2 I)`,
    :math:`p(h_0 \mid h_t) \approx \mathcal N(\hat h_0, r_{h,t}^2 I)`, so :math:`p(y \mid z_t)
    \approx \mathcal N(\hat x_0 + \hat h_0, (\sigma_y^2 + r_{x,t}^2 + r_{h,t}^2)I)` and, with
    :math:`u = (y - \hat x_0 - \hat h_0)/(\sigma_y^2 + r_{x,t}^2 + r_{h,t}^2)`,

    .. math:: \hat x_0^y = \hat x_0 + w\frac{\sigma_t^2}{\alpha_t}
              \Big(\frac{\partial\hat x_0}{\partial x_t}\Big)^{\!\top}u, \qquad
              \hat h_0^y = \hat h_0 + w\frac{\sigma_t^2}{\alpha_t}
              \Big(\frac{\partial\hat h_0}{\partial h_t}\Big)^{\!\top}u,

    then the DDIM step (``eta``) on the stacked state.  With equal ``prior_var`` this is
    :func:`~diffcore.inverse.solvers.pigdm` on :math:`z` with the operator :math:`[I, I]`
    (identical up to round-off); on isotropic Gaussian priors of variances ``prior_var`` it is
    exact in the small-step limit.  The paper (Stevens et al., 2023) guides each prior with its
    own DPS-type step and weight; the ΠGDM form is used here so that the method is exact where
    ΠGDM is and needs no tuned weights.  For mixtures, :func:`twisted_smc` on the stacked
    variable (:func:`stack_mixtures` for the exact joint posterior) is asymptotically exact.
    ``y`` ``(B or 1, *shape)``; ``x`` the stacked start ``(B, 2, *shape)`` (default
    :math:`\sigma_{t_0}\varepsilon`).  Returns :math:`(\hat x_0, \hat h_0)` stacked,
    ``(B, 2, *shape)``.  One call of each model and one backward pass per step, plus one.
    """
    joint = stacked_denoiser(model_x, model_h)
    process = check_process(process)
    sigma_y = noise_level(sigma_y, "sigma_y")
    eta = between(eta, "eta", 0, 1)
    guidance_scale = positive(guidance_scale, "guidance_scale")
    if not isinstance(prior_var, (tuple, list)) or len(prior_var) != 2:
        raise ValueError(f"prior_var must be a pair (v_x, v_h), got prior_var = {prior_var!r}")
    v_x, v_h = (positive(v, "prior_var") for v in prior_var)
    ts = _check_grid(ts, process)
    floating(y, "y")
    finite(y, "y")
    if y.ndim < 2:
        raise ValueError(f"y must have shape (batch, *shape), got {tuple(y.shape)}")
    shape = tuple(y.shape[1:])
    n = y.shape[0] if x is None else x.shape[0]
    x = _start(x, n, (2, *shape), ts, process, generator, y)
    if y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"y has batch {y.shape[0]} but x has batch {x.shape[0]}")
    y = y.expand(x.shape[0], *shape)

    def guided(k, z: Tensor) -> Tensor:
        t = k.t
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            z0 = k.D(leaf)
            var = sigma_y**2 + _r2(t, v_x) + _r2(t, v_h)
            resid = (y - z0[:, 0] - z0[:, 1]).detach()
            u = resid / var
            (g,) = torch.autograd.grad(z0, leaf, grad_outputs=torch.stack([u, u], 1))
        return z0.detach() + guidance_scale * t.sigma**2 / t.alpha * g

    def update(k, z):
        z0 = k.denoised = guided(k, z)
        return k.ddim(z, z0, eta)

    def finish(k, z):
        return guided(k, z) if k.t.sigma > 0 else k.D(z)

    return integrate(
        update, joint, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- FlowChef ------------------------------------------------------------------------------------
def flowchef(
    model: Callable,
    y: Tensor,
    operator: LinearOperator,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    *,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    step_size: float = 1.0,
    inner_steps: int = 1,
) -> Tensor:
    r"""FlowChef (Patel et al., 2024): steer the flow with gradient skipping, no backpropagation.

    At each step the flow's own estimate :math:`\hat x_0 = D(x_t, t)` (for the rectified flow,
    :math:`x_t - t\,v`) is corrected by ``inner_steps`` gradient steps on
    :math:`\tfrac12\lVert y - A\hat x_0\rVert^2`, :math:`\hat x_0' \leftarrow \hat x_0' -
    \zeta A^\top(A\hat x_0' - y)` (``step_size`` :math:`\zeta`), and the state is moved by the
    same vector, :math:`x_t' = x_t + (\hat x_0' - \hat x_0)`: the gradient with respect to
    :math:`x_t` is taken as the gradient with respect to :math:`\hat x_0`
    (:math:`\partial\hat x_0/\partial x_t \approx I`, the skipped Jacobian).  Then the
    unconditional step with the velocity computed *before* the correction, which for the
    rectified flow (:class:`~diffcore.processes.Linear`) is Euler's step
    :math:`x_s = x_t' + (s - t)v` = the DDIM step of :math:`x_t` minus the correction; for other
    processes, the DDIM step.  Deterministic; :math:`\sigma_y` is not used (checked only).

    Paper vs code: the paper's Algorithm 1 repeats the correction ``N`` times per step (here
    ``inner_steps``); the official pixel-space code does one correction per step, on a loss that
    averages over pixels (a factor absorbed in ``step_size``), and skips it at the last step, as
    here.  The result is the last state (after one more model call when :math:`\sigma_{t_n} >
    0`; none when the grid ends at :math:`t = 0`).  One model call per step and no backward
    pass.
    """
    operator = check_operator(operator)
    process = check_process(process)
    noise_level(sigma_y, "sigma_y")
    step_size = positive(step_size, "step_size")
    inner_steps = count(inner_steps, "inner_steps")
    ts = _check_grid(ts, process)
    operator.check_output(y)
    finite(y, "y")
    n = y.shape[0] if x is None else x.shape[0]
    x = _start(x, n, operator.in_shape, ts, process, generator, y)
    if y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"y has batch {y.shape[0]} but x has batch {x.shape[0]}")
    y = y.expand(x.shape[0], *operator.out_shape)

    def update(k, x):
        x0 = k.D(x)
        out = k.ddim(x, x0, 0.0)
        if k.last:
            return out
        x0c = x0
        for _ in range(inner_steps):
            x0c = x0c - step_size * operator.adjoint(operator(x0c) - y)
        return out + (x0c - x0)

    def finish(k, x):
        return x if k.t.sigma == 0 else k.D(x)

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


def flowchef_law(
    model: Callable,
    y: Tensor,
    operator: LinearOperator,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    **options,
) -> tuple[Tensor, Tensor]:
    r"""The exact law :math:`\mathcal N(c, \sigma_{t_0}^2MM^\top)` of :func:`flowchef`'s output
    when the model is affine (the exact denoiser of a Gaussian prior).

    The output is then :math:`Mx + c` in the start :math:`x \sim \mathcal N(0, \sigma_{t_0}^2I)`
    (the solvers' start), and :math:`c`, :math:`M` come from :math:`d + 1` runs in one batch, at
    :math:`x = 0` and :math:`x = e_i`; one more run at a random :math:`x` checks that the map is
    affine (else ``ValueError``).  ``y``: one measurement ``(1, *out_shape)``.  Shapes: returns
    ``mean`` ``(d,)`` and ``cov`` ``(d, d)``.
    """
    operator = check_operator(operator)
    y = _one_measurement(y, operator.out_shape, type(operator).__name__)
    ts = _check_grid(ts, check_process(process))
    d = operator.in_dim
    gen = torch.Generator(device=y.device).manual_seed(0)
    probe = torch.randn(1, d, generator=gen, dtype=y.dtype, device=y.device)
    basis = torch.cat([torch.zeros(1, d, dtype=y.dtype, device=y.device), torch.eye(d), probe])
    basis = basis.to(dtype=y.dtype, device=y.device)
    start = basis.reshape(d + 2, *operator.in_shape)
    out = flowchef(model, y, operator, sigma_y, ts, process, x=start, **options)
    out = out.reshape(d + 2, d)
    c, m = out[0], (out[1 : d + 1] - out[0]).T
    gap = float((out[-1] - (m @ probe[0] + c)).norm())
    scale = float(out.abs().max()) + 1.0
    if gap > 1e-8 * scale * d:
        raise ValueError(
            f"flowchef's output is not affine in the start (off by {gap:.3g}): flowchef_law "
            f"needs an affine model, the exact denoiser of a Gaussian prior"
        )
    sigma_0 = float(process.sigma(ts[0]))
    cov = sigma_0**2 * m @ m.T
    return c, 0.5 * (cov + cov.T)


#: The solvers of this module in the signature of :data:`diffcore.inverse.solvers.SOLVERS`, with
#: their facts; ready to be merged into it.
PARTICLE_SOLVERS: dict[str, Solver] = {
    "tds": Solver(
        fn=tds,
        name="tds",
        needs=("gradient", "sigma_y > 0"),
        options=("prior_var", "ess_threshold"),
    ),
    "flowchef": Solver(
        fn=flowchef,
        name="flowchef",
        stochastic=False,
        options=("step_size", "inner_steps"),
        final_call=True,
    ),
}
