r"""Diffusion posterior solvers for :math:`y = A x_0 + \sigma_y n`, one signature for all.

``solver(denoiser, process, operator, y, sigma_y, ts, x=None, generator=None, **options)``
returns the estimate of :math:`x_0`, shape ``(B, *operator.in_shape)``:

- ``denoiser(x, t)`` is the prior's denoiser :math:`D(x, t) \approx \mathbb E[x_0 \mid x_t = x]`
  (an exact one from :mod:`diffcore.analytic`, or a network through
  :func:`diffcore.targets.as_denoiser`);
- ``y`` is ``(B, *operator.out_shape)`` or ``(1, *out_shape)``, broadcast to the batch of ``x``
  (many posterior samples of one measurement: give ``x`` of batch ``n``, or expand ``y``);
- ``ts`` is a strictly decreasing grid (:func:`diffcore.samplers.time_grid`), ``x`` the state at
  ``ts[0]`` (default :math:`\sigma_{t_0}\varepsilon`, drawn from ``generator``);
- every solver walks the grid and returns its final data-consistent estimate of :math:`x_0` at
  ``ts[-1]``, after one more model call there.

The papers write their updates for VP/DDPM (:math:`\bar\alpha_t`).  Here they are written with
the :math:`\alpha_t`, :math:`\sigma_t` of any process: the DDIM/DDPM transition
:math:`x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon + c z` with
:math:`c = \eta\,\sigma_s\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}}` (``eta = 1`` is DDPM's
ancestral step), and DDRM in the variance-exploding coordinates :math:`x/\alpha_t` with noise
level :math:`\bar\sigma_t = \sigma_t/\alpha_t`.  For VP they are the papers' formulas; every
solver needs :math:`\alpha > 0` on the grid (``t_max < 1`` for :class:`~diffcore.processes.Linear`).
Defaults are chosen to make each method a consistent posterior approximation (``lam = 1`` is the
prior weight Bayes' rule gives), not the papers' tuned values for images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore._checks import positive, require
from diffcore.inverse.operators import (
    LinearOperator,
    _check_sigma_y,
    conjugate_gradient,
    inner,
)
from diffcore.processes import Process
from diffcore.samplers import check_time_grid

__all__ = ["replacement", "dps", "pigdm", "ddrm", "red_diff", "dds", "diffpir", "SOLVERS"]


# -- shared pieces -------------------------------------------------------------------------------
def _unit(value, name: str) -> float:
    require(isinstance(value, (int, float)) and 0 <= value <= 1, name, value, "in [0, 1]")
    return float(value)


class _Problem:
    """The checked inputs of a solver: grid coefficients as floats, ``y`` and the start ``x``."""

    def __init__(self, process, operator, y, sigma_y, ts, x, generator):
        if not isinstance(operator, LinearOperator):
            raise ValueError(
                f"operator must be a diffcore.inverse.operators.LinearOperator, got "
                f"{type(operator).__name__}"
            )
        if not isinstance(process, Process):
            raise ValueError(f"process must be a diffcore Process, got {type(process).__name__}")
        self.sigma_y = _check_sigma_y(sigma_y)
        ts = check_time_grid(ts).to(torch.float64)
        self.a = process.alpha(ts).tolist()
        self.s = process.sigma(ts).tolist()
        if self.a[0] <= 0:
            raise ValueError(
                f"the solvers need alpha > 0 on the grid, got alpha(ts[0]) = {self.a[0]:.3g} at "
                f"ts[0] = {float(ts[0]):.6g}: take t_max < {float(ts[0]):.6g}"
            )
        self.lam = process.lam(ts).tolist()
        out = operator.out_shape
        if not isinstance(y, Tensor) or y.ndim != len(out) + 1 or tuple(y.shape[1:]) != out:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"y must have shape (batch, *out_shape) = (batch, {', '.join(map(str, out))}) for "
                f"{type(operator).__name__}, got {got}"
            )
        dtype = y.real.dtype if y.is_complex() else y.dtype
        if x is None:
            shape = (y.shape[0], *operator.in_shape)
            x = self.s[0] * torch.randn(shape, generator=generator, dtype=dtype, device=y.device)
        else:
            operator._check(x, operator.in_shape, "in")
            if y.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"y has batch {y.shape[0]} but x has batch {x.shape[0]}: give one y, or one "
                    f"per sample"
                )
        self.y = y.expand(x.shape[0], *out) if y.shape[0] != x.shape[0] else y
        self.x = x.detach()
        self.times = list(ts.to(dtype=dtype, device=y.device).unbind())
        self.n = len(self.times) - 1
        self.generator = generator

    def noise(self, like: Tensor) -> Tensor:
        return torch.randn(
            like.shape, generator=self.generator, dtype=like.dtype, device=like.device
        )

    def noise_std(self, i: int, eta: float) -> float:
        """DDIM's fresh-noise std c from t_i to t_{i+1}: eta times the DDPM posterior std."""
        s_next = self.s[i + 1]
        if s_next == 0 or eta == 0:
            return 0.0
        h = self.lam[i + 1] - self.lam[i]
        return eta * s_next * math.sqrt(-math.expm1(-2 * h))

    def renoise(self, i: int, x0: Tensor, eps: Tensor, eta: float) -> Tensor:
        """x_{t_{i+1}} = alpha x0 + sqrt(sigma^2 - c^2) eps + c z (DDIM with eta)."""
        c = self.noise_std(i, eta)
        s_next = self.s[i + 1]
        out = self.a[i + 1] * x0 + math.sqrt(max(s_next**2 - c**2, 0.0)) * eps
        return out + c * self.noise(x0) if c > 0 else out

    def eps(self, i: int, x: Tensor, x0: Tensor) -> Tensor:
        """The noise that x0 implies at t_i: (x - alpha x0) / sigma."""
        return (x - self.a[i] * x0) / self.s[i]


def _project(operator: LinearOperator, x: Tensor, y: Tensor) -> Tensor:
    """x + A^+ (y - A x): the point of {A x = y} closest to x (if y is in the range of A)."""
    return x + operator.pinv(y - operator(x))


def _denoise_with_grad(denoiser: Callable, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The denoiser at a leaf copy of x that autograd tracks: (x_leaf, D(x_leaf, t))."""
    leaf = x.detach().requires_grad_(True)
    return leaf, denoiser(leaf, t)


# -- Song et al. (2021): replacement -------------------------------------------------------------
def replacement(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 1.0,
) -> Tensor:
    r"""Conditional sampling by replacement (Song et al., 2021, imputation), for any linear ``A``.

    At each time the forward process is run on the measurement,
    :math:`y_t = \alpha_t y + \sigma_t A\varepsilon` (a sample of :math:`A x_t` given
    :math:`A x_0 = y`), the state is projected onto :math:`\{A x = y_t\}`,
    :math:`x \leftarrow x + A^+(y_t - A x)`, and an unconditional DDIM step (``eta = 1``: DDPM's
    ancestral step, the reverse SDE's discretisation) follows.  For a mask the projection replaces
    the observed entries, as in the paper.  The method treats ``y`` as noiseless: with
    :math:`\sigma_y > 0` the noise in ``y`` is ignored (a bias).  It conditions on a noisy
    :math:`y_t` instead of on :math:`y` itself, exact only when the observed and unobserved
    parts of :math:`x_0` are independent (an isotropic Gaussian prior).  The estimate is the
    last denoised state projected onto :math:`\{A x = y\}`.  One model call per step, plus one.
    """
    eta = _unit(eta, "eta")
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)
    x = p.x
    for i in range(p.n):
        y_t = p.a[i] * p.y + p.s[i] * operator(p.noise(x))
        x = _project(operator, x, y_t)
        x0 = denoiser(x, p.times[i])
        x = p.renoise(i, x0, p.eps(i, x, x0), eta)
    return _project(operator, denoiser(x, p.times[-1]), p.y)


# -- Chung et al. (2023): DPS --------------------------------------------------------------------
def dps(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    zeta: float = 1.0,
    eta: float = 1.0,
) -> Tensor:
    r"""Diffusion posterior sampling (Chung et al., 2023).

    The likelihood :math:`p(y \mid x_t)` is replaced by :math:`p(y \mid x_0 = \hat x_0(x_t))`:
    after the unconditional step :math:`x'` (DDPM's ancestral step for ``eta = 1``), the state
    moves down the gradient of the residual norm taken through the denoiser with autograd,

    .. math:: x_{t_{i+1}} = x' - \zeta\,\nabla_{x_{t_i}} \lVert y - A\hat x_0(x_{t_i})\rVert .

    The paper writes the step as :math:`\zeta_i\nabla\lVert y - A\hat x_0\rVert^2` with
    :math:`\zeta_i = \zeta'/\lVert y - A\hat x_0\rVert`; its reference implementation takes the
    gradient of the unsquared norm, as here (the two agree for :math:`\zeta = 2\zeta'`).  The
    step is the same in every process (it acts on :math:`x_t` directly); it ignores
    :math:`\sigma_y` and the spread of :math:`p(x_0 \mid x_t)`, so DPS is approximate even for
    Gaussian priors.  Each sample has its own norm.  One model call (and one backward pass) per
    step, plus one.
    """
    eta = _unit(eta, "eta")
    zeta = positive(zeta, "zeta")
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)
    x = p.x
    for i in range(p.n):
        with torch.enable_grad():
            leaf, x0 = _denoise_with_grad(denoiser, x, p.times[i])
            resid = p.y - operator(x0)
            norm = inner(resid, resid).clamp(min=1e-300).sqrt()
            (grad,) = torch.autograd.grad(norm.sum(), leaf)
        x0 = x0.detach()
        x = p.renoise(i, x0, p.eps(i, x, x0), eta) - zeta * grad
    return denoiser(x, p.times[-1])


# -- Song et al. (2023): PiGDM -------------------------------------------------------------------
def pigdm(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 1.0,
    prior_var: float = 1.0,
    guidance_scale: float = 1.0,
) -> Tensor:
    r"""Pseudoinverse-guided diffusion (Song et al., 2023).

    :math:`p(x_0 \mid x_t)` is taken Gaussian, :math:`\mathcal N(\hat x_0, r_t^2 I)` with
    :math:`r_t^2 = v\bar\sigma_t^2/(v + \bar\sigma_t^2)`, :math:`\bar\sigma_t = \sigma_t/\alpha_t`
    (the paper's :math:`\bar\sigma_t^2/(1 + \bar\sigma_t^2)` is ``prior_var`` :math:`v = 1`; it is
    the exact posterior variance for a prior :math:`\mathcal N(\mu, vI)`).  Then
    :math:`p(y \mid x_t) = \mathcal N(A\hat x_0, r_t^2 AA^\top + \sigma_y^2 I)` and its score is the
    vector-Jacobian product

    .. math::
        g = \Big(\frac{\partial\hat x_0}{\partial x_t}\Big)^{\!\top} A^\top
            (r_t^2 AA^\top + \sigma_y^2 I)^{-1}(y - A\hat x_0),

    computed as :math:`(A^\top A + \sigma_y^2/r_t^2)^{-1}A^\top(\cdot)/r_t^2` (or
    :math:`A^+(\cdot)/r_t^2` when :math:`\sigma_y = 0`, the paper's noiseless form).  Departure:
    the paper adds the guidance to the DDIM update with its own time weight; here it enters
    through the conditional denoiser Tweedie's formula gives,
    :math:`\hat x_0^y = \hat x_0 + w\,(\sigma_t^2/\alpha_t)\,g` (``guidance_scale`` :math:`w`),
    and the DDIM step (``eta``) uses :math:`\hat x_0^y` and the noise it implies.  With the exact
    denoiser of :math:`\mathcal N(\mu, vI)` this is the exact posterior denoiser, so the solver
    samples the exact posterior in the small-step limit.  If ``ts[-1]`` has :math:`\sigma = 0`
    the last estimate is the plain denoiser (:math:`r_t = 0` there).  One model call and one
    backward pass per step, plus one.
    """
    eta = _unit(eta, "eta")
    prior_var = positive(prior_var, "prior_var")
    guidance_scale = positive(guidance_scale, "guidance_scale")
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)

    def guided(i: int, x: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf, x0 = _denoise_with_grad(denoiser, x, p.times[i])
            bar2 = (p.s[i] / p.a[i]) ** 2
            r2 = prior_var * bar2 / (prior_var + bar2)
            resid = (p.y - operator(x0)).detach()
            if p.sigma_y == 0:
                u = operator.pinv(resid) / r2
            else:
                u = operator.normal_solve(operator.adjoint(resid), p.sigma_y**2 / r2) / r2
            (g,) = torch.autograd.grad(x0, leaf, grad_outputs=u)
        return x0.detach() + guidance_scale * p.s[i] ** 2 / p.a[i] * g

    x = p.x
    for i in range(p.n):
        x0 = guided(i, x)
        x = p.renoise(i, x0, p.eps(i, x, x0), eta)
    return guided(p.n, x) if p.s[-1] > 0 else denoiser(x, p.times[-1])


# -- Kawar et al. (2022): DDRM -------------------------------------------------------------------
def ddrm(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 0.85,
    eta_b: float = 1.0,
) -> Tensor:
    r"""Denoising diffusion restoration models (Kawar et al., 2022), in the SVD basis of ``A``.

    With :math:`A = USV^\top`, spectral coordinates :math:`\bar x = V^\top x/\alpha_t` (the
    variance-exploding coordinates, noise level :math:`\bar\sigma_t = \sigma_t/\alpha_t`),
    :math:`\bar y_i = (U^\top y)_i/s_i` and :math:`\bar x_\theta = V^\top\hat x_0(x_t)`, each
    step from :math:`t` to :math:`s` sets, coordinate by coordinate,

    - :math:`s_i = 0`: :math:`\bar x_\theta + \sqrt{1-\eta^2}\,\bar\sigma_s(\bar x_t - \bar x_\theta)/\bar\sigma_t + \eta\bar\sigma_s z`;
    - :math:`\bar\sigma_s < \sigma_y/s_i`: :math:`\bar x_\theta + \sqrt{1-\eta^2}\,\bar\sigma_s(\bar y - \bar x_\theta)/(\sigma_y/s_i) + \eta\bar\sigma_s z`;
    - :math:`\bar\sigma_s \ge \sigma_y/s_i`: :math:`(1-\eta_b)\bar x_\theta + \eta_b\bar y + \sqrt{\bar\sigma_s^2 - \eta_b^2\sigma_y^2/s_i^2}\,z`,

    and :math:`x_s = \alpha_s V\bar x_s`.  Defaults ``eta = 0.85``, ``eta_b = 1`` are the paper's.
    The estimate is one more such step to :math:`\bar\sigma = 0`.  Needs an operator with an SVD
    (``operator.has_svd``).

    Small-step behaviour.  The fresh noise :math:`\eta\bar\sigma_s z` does not shrink with the
    step, so for :math:`\eta > 0` the chain is a denoise-and-renoise iteration that does not
    converge to the posterior as steps are added (on a unit Gaussian each step loses variance
    :math:`\sigma^2(1 - \sqrt{1-\eta^2})^2/(1+\sigma^2)`); ``eta = 0`` is DDIM on the
    unobserved coordinates and is exact in the limit when the spectral coordinates are
    independent under the prior (isotropic Gaussian) and ``y`` is noiseless, where, with
    ``eta_b = 1``, the observed coordinates are re-noised copies of ``y`` as in
    :func:`replacement`.  One model call per step, plus one.
    """
    eta, eta_b = _unit(eta, "eta"), _unit(eta_b, "eta_b")
    if not operator.has_svd:
        raise ValueError(
            f"ddrm needs an operator with an SVD, got {type(operator).__name__} (has_svd is False)"
        )
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)
    svd = operator.svd()
    x = p.x
    sv = svd.s.to(dtype=x.dtype, device=x.device)
    observed = sv > sv.amax() * 1e-12
    idx = torch.nonzero(observed).reshape(-1)
    y_bar = svd.Ut(p.y)[:, idx] / sv[idx]  # (B, r)
    y_std = p.sigma_y / sv[idx]  # the noise level of each observed coordinate
    bar = [s / a for s, a in zip(p.s, p.a, strict=True)]

    def step(x_bar_t: Tensor, x_theta: Tensor, bar_t: float, bar_s: float) -> Tensor:
        new = x_theta + math.sqrt(1 - eta**2) * (bar_s / bar_t) * (x_bar_t - x_theta)
        if eta > 0 and bar_s > 0:
            new = new + eta * bar_s * p.noise(new)
        xo = x_theta[:, idx]
        below = bar_s < y_std  # (r,)
        quiet = xo + math.sqrt(1 - eta**2) * bar_s * (y_bar - xo) / y_std.clamp(min=1e-300)
        if eta > 0 and bar_s > 0:
            quiet = quiet + eta * bar_s * p.noise(quiet)
        spread = (bar_s**2 - eta_b**2 * y_std**2).clamp(min=0).sqrt()
        loud = (1 - eta_b) * xo + eta_b * y_bar + spread * p.noise(xo)
        new[:, idx] = torch.where(below, quiet, loud)
        return new

    for i in range(p.n):
        x_theta = svd.Vt(denoiser(x, p.times[i]))
        x_bar = svd.Vt(x / p.a[i])
        x = p.a[i + 1] * svd.V(step(x_bar, x_theta, bar[i], bar[i + 1]))
    x_theta = svd.Vt(denoiser(x, p.times[-1]))
    return svd.V(step(svd.Vt(x / p.a[-1]), x_theta, max(bar[-1], 1e-300), 0.0))


# -- Mardani et al. (2024): RED-diff -------------------------------------------------------------
def red_diff(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    lam: float = 1.0,
    lr: float = 0.1,
) -> Tensor:
    r"""RED-diff (Mardani et al., 2024): variational inference with :math:`q = \mathcal N(\mu, 0)`.

    Adam (``lr``, betas 0.9 and 0.999) minimises over :math:`\mu` the loss
    :math:`\lVert y - A\mu\rVert^2/(2\sigma_y^2) + \lambda_t\,\langle \operatorname{sg}(\hat\varepsilon(x_t, t) - \varepsilon), \mu\rangle`,
    :math:`x_t = \alpha_t\mu + \sigma_t\varepsilon`, one step per time of ``ts`` in decreasing
    order, with the weight :math:`\lambda_t = \lambda\,\sigma_t/\alpha_t` (the inverse square root
    of the SNR, the paper's choice).  Since :math:`\hat\varepsilon - \varepsilon =
    \alpha_t(\mu - D(x_t, t))/\sigma_t`, the prior's gradient is :math:`\lambda(\mu - D(x_t, t))`,
    a stochastic regularisation-by-denoising term.  ``x`` (if given) is the initial :math:`\mu`,
    else the Tikhonov estimate :math:`(A^\top A + \sigma_y^2 I)^{-1}A^\top y` (stable where
    :math:`A^+ y` would amplify the noise).  Returns :math:`\mu`: a point estimate (mode-seeking), not a posterior
    sample.  Needs ``sigma_y > 0``.  One model call per time of ``ts`` except the last.
    """
    lam, lr = positive(lam, "lam"), positive(lr, "lr")
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)
    if p.sigma_y == 0:
        raise ValueError("red_diff's data term divides by sigma_y^2: give sigma_y > 0")
    start = p.x if x is not None else operator.normal_solve(operator.adjoint(p.y), p.sigma_y**2)
    mu = start.clone()
    m, v = torch.zeros_like(mu), torch.zeros_like(mu)  # Adam's moments (betas 0.9, 0.999)
    for i in range(p.n):
        d = denoiser(p.a[i] * mu + p.s[i] * p.noise(mu), p.times[i])
        grad = operator.adjoint(operator(mu) - p.y) / p.sigma_y**2 + lam * (mu - d)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        mu = mu - lr * (m / (1 - 0.9 ** (i + 1))) / ((v / (1 - 0.999 ** (i + 1))).sqrt() + 1e-8)
    return mu


# -- Chung, Lee & Ye (2024): DDS -----------------------------------------------------------------
def dds(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 1.0,
    cg_iters: int = 5,
    gamma: float | None = None,
) -> Tensor:
    r"""Decomposed diffusion sampler (Chung, Lee & Ye, 2024).

    The denoised :math:`\hat x_0` is made data-consistent by ``cg_iters`` conjugate-gradient
    steps started at :math:`\hat x_0`, on :math:`A^\top A x = A^\top y` (``gamma=None``, the
    noiseless form: the iterates stay in :math:`\hat x_0 + \operatorname{range}(A^\top)`, a
    Krylov subspace near the data manifold) or on :math:`(\gamma A^\top A + I)x = \gamma A^\top y
    + \hat x_0` (noisy measurements); then a DDIM step (``eta``) re-noises the corrected
    :math:`\hat x_0'` with the noise :math:`\hat\varepsilon` the *unconditional*
    :math:`\hat x_0` implies.  No gradient through the denoiser.  The estimate is the last
    corrected :math:`\hat x_0'`.  One model call per step, plus one.
    """
    eta = _unit(eta, "eta")
    require(isinstance(cg_iters, int) and cg_iters >= 1, "cg_iters", cg_iters, "an integer >= 1")
    if gamma is not None:
        gamma = positive(gamma, "gamma")
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)
    aty = operator.adjoint(p.y)

    def correct(x0: Tensor) -> Tensor:
        if gamma is None:
            return conjugate_gradient(operator.normal, aty, x0, n_iter=cg_iters, tol=0.0)
        return conjugate_gradient(
            lambda v: gamma * operator.normal(v) + v, gamma * aty + x0, x0, cg_iters, tol=0.0
        )

    x = p.x
    for i in range(p.n):
        x0 = denoiser(x, p.times[i])
        x = p.renoise(i, correct(x0), p.eps(i, x, x0), eta)
    return correct(denoiser(x, p.times[-1]))


# -- Zhu et al. (2023): DiffPIR ------------------------------------------------------------------
def diffpir(
    denoiser: Callable,
    process: Process,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    ts: Tensor,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    lam: float = 1.0,
    zeta: float = 1.0,
) -> Tensor:
    r"""DiffPIR (Zhu et al., 2023): half-quadratic splitting with the diffusion denoiser.

    At each time: the prior step :math:`\hat x_0 = D(x_t, t)`; the data step
    :math:`\hat x_0' = \arg\min_x \lVert y - Ax\rVert^2 + \rho_t\lVert x - \hat x_0\rVert^2` with
    :math:`\rho_t = \lambda\sigma_y^2/\bar\sigma_t^2`, :math:`\bar\sigma_t = \sigma_t/\alpha_t`,
    solved in closed form by ``operator.normal_solve`` (conjugate gradients for operators without
    one; for :math:`\sigma_y = 0` its limit, the projection :math:`\hat x_0 + A^+(y - A\hat x_0)`);
    then :math:`x_s = \alpha_s\hat x_0' + \sigma_s(\sqrt{1-\zeta}\,\hat\varepsilon + \sqrt\zeta\,z)`
    with :math:`\hat\varepsilon = (x_t - \alpha_t\hat x_0')/\sigma_t`.  ``lam = 1`` makes the
    data step the posterior mean under :math:`x_0 \sim \mathcal N(\hat x_0, \bar\sigma_t^2 I)`.
    The estimate is the last :math:`\hat x_0'`.  One model call per step, plus one.
    """
    lam, zeta = positive(lam, "lam"), _unit(zeta, "zeta")
    p = _Problem(process, operator, y, sigma_y, ts, x, generator)
    aty = operator.adjoint(p.y)

    def data_step(i: int, x0: Tensor) -> Tensor:
        if p.sigma_y == 0:
            return _project(operator, x0, p.y)
        if p.s[i] == 0:
            return x0  # the denoiser is exact at sigma = 0: the prior step wins (rho = inf)
        rho = lam * p.sigma_y**2 * (p.a[i] / p.s[i]) ** 2
        return operator.normal_solve(aty + rho * x0, rho)

    x = p.x
    for i in range(p.n):
        x0 = data_step(i, denoiser(x, p.times[i]))
        eps = p.eps(i, x, x0)
        x = p.a[i + 1] * x0 + p.s[i + 1] * (
            math.sqrt(1 - zeta) * eps + math.sqrt(zeta) * p.noise(eps)
        )
    return data_step(p.n, denoiser(x, p.times[-1]))


#: Every solver of this module by its name, all with the signature of the module.
SOLVERS: dict[str, Callable] = {
    "replacement": replacement,
    "dps": dps,
    "pigdm": pigdm,
    "ddrm": ddrm,
    "red_diff": red_diff,
    "dds": dds,
    "diffpir": diffpir,
}
