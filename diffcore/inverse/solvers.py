r"""Diffusion posterior solvers for :math:`y = A x_0 + \sigma_y n`, one signature for all.

``solver(model, y, operator, sigma_y, ts, process, *, x=None, generator=None, callback=None,
**options)`` returns the estimate of :math:`x_0`, shape ``(B, *operator.in_shape)``, in the
samplers' order of arguments with the measurement after the model:

- ``model(x, t)`` is the prior's denoiser :math:`D(x, t) \approx \mathbb E[x_0 \mid x_t = x]`
  (an exact one from :mod:`diffcore.analytic`, or a network through
  :func:`diffcore.targets.as_denoiser`);
- ``y`` is ``(B, *operator.out_shape)`` or ``(1, *out_shape)``, broadcast to the batch of ``x``
  (many posterior samples of one measurement: give ``x`` of batch ``n``, or expand ``y``);
- ``ts`` is a strictly decreasing grid (:func:`diffcore.samplers.time_grid`), ``x`` the state at
  ``ts[0]`` (default :math:`\sigma_{t_0}\varepsilon`, drawn from ``generator``; RED-diff, which
  has no such state, takes its start as ``mu``);
- every solver runs on the stepping engine (:func:`diffcore.stepping.integrate`): ``callback``
  receives a :class:`~diffcore.stepping.Step` after each step and one more with the final
  estimate, and :class:`~diffcore.stepping.Trace` records them and counts the model calls;
- every solver walks the grid and returns its final data-consistent estimate of :math:`x_0` at
  ``ts[-1]``, after one more model call there.

Each solver reads as its correction, then the shared step: the DDIM transition
:math:`x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon + c z` with
:math:`c = \eta\,\sigma_s\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}}` (``k.ddim``, from
:func:`diffcore.stepping.ddim_step`; ``eta = 1`` is DDPM's ancestral step).  The papers write
their updates for VP/DDPM (:math:`\bar\alpha_t`); here they are written with the
:math:`\alpha_t`, :math:`\sigma_t` of any process, and DDRM in the variance-exploding
coordinates :math:`x/\alpha_t` with noise level :math:`\bar\sigma_t = \sigma_t/\alpha_t`.  For VP
they are the papers' formulas; every solver needs :math:`\alpha > 0` on the grid (``t_max < 1``
for :class:`~diffcore.processes.Linear`).  Defaults are chosen to make each method a consistent
posterior approximation (``lam = 1`` is the prior weight Bayes' rule gives), not the papers'
tuned values for images.  :data:`SOLVERS` lists them with their facts (:class:`Solver`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffcore.checks import between, count, noise_level, positive
from diffcore.inverse.operators import LinearOperator, check_operator, conjugate_gradient, inner
from diffcore.processes import Process, check_process
from diffcore.stepping import check_time_grid, eps_hat, integrate

__all__ = [
    "replacement",
    "dps",
    "pigdm",
    "ddrm",
    "red_diff",
    "dds",
    "diffpir",
    "Solver",
    "SOLVERS",
]


# -- shared pieces -------------------------------------------------------------------------------
def _problem(y, operator, sigma_y, ts, process, x, generator, draw=True):
    """The checked measurement (expanded to the batch of ``x``), the start state ``x`` (drawn
    from the prior at ``ts[0]`` when None, unless ``draw`` is False) and the noise level."""
    check_operator(operator)
    check_process(process)
    sigma_y = noise_level(sigma_y, "sigma_y")
    ts = check_time_grid(ts).to(torch.float64)
    alpha_0 = float(process.alpha(ts[0]))
    if alpha_0 <= 0:
        raise ValueError(
            f"the solvers need alpha > 0 on the grid, got alpha(ts[0]) = {alpha_0:.3g} at "
            f"ts[0] = {float(ts[0]):.6g}: take t_max < {float(ts[0]):.6g}"
        )
    out = operator.out_shape
    if not isinstance(y, Tensor) or y.ndim != len(out) + 1 or tuple(y.shape[1:]) != out:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"y must have shape (batch, *out_shape) = (batch, {', '.join(map(str, out))}) for "
            f"{type(operator).__name__}, got {got}"
        )
    if not (y.is_floating_point() or y.is_complex()) or not bool(torch.isfinite(y).all()):
        raise ValueError(f"y must be a finite floating-point tensor, got dtype {y.dtype}")
    dtype = y.real.dtype if y.is_complex() else y.dtype
    if x is None and not draw:
        return y, None, sigma_y
    if x is None:
        shape = (y.shape[0], *operator.in_shape)
        sigma_0 = float(process.sigma(ts[0]))
        x = sigma_0 * torch.randn(shape, generator=generator, dtype=dtype, device=y.device)
    else:
        operator.check_shape(x, operator.in_shape, "in")
        if y.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"y has batch {y.shape[0]} but x has batch {x.shape[0]}: give one y, or one "
                f"per sample"
            )
    y = y.expand(x.shape[0], *out) if y.shape[0] != x.shape[0] else y
    return y, x.detach(), sigma_y


def _project(operator: LinearOperator, x: Tensor, y: Tensor) -> Tensor:
    """x + A^+ (y - A x): the point of {A x = y} closest to x (if y is in the range of A)."""
    return x + operator.pinv(y - operator(x))


def _with_grad(k, x: Tensor, at=None) -> tuple[Tensor, Tensor]:
    """The denoiser at a leaf copy of x that autograd tracks: (x_leaf, D(x_leaf, t))."""
    leaf = x.detach().requires_grad_(True)
    return leaf, k.D(leaf, at)


# -- Song et al. (2021): replacement -------------------------------------------------------------
def replacement(
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
    eta = between(eta, "eta", 0, 1)
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)

    def update(k, x):
        y_t = k.t.alpha * y + k.t.sigma * operator(k.noise())  # a draw of A x_t given A x_0 = y
        x = _project(operator, x, y_t)
        x0 = k.D(x)
        return k.ddim(x, x0, eta)

    def finish(k, x):
        return _project(operator, k.D(x), y)

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- Chung et al. (2023): DPS --------------------------------------------------------------------
def dps(
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
    eta, zeta = between(eta, "eta", 0, 1), positive(zeta, "zeta")
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)

    def update(k, x):
        with torch.enable_grad():
            leaf, x0 = _with_grad(k, x)
            resid = y - operator(x0)
            norm = inner(resid, resid).clamp(min=1e-300).sqrt()
            (grad,) = torch.autograd.grad(norm.sum(), leaf)
        x0 = k.denoised = x0.detach()
        return k.ddim(x, x0, eta) - zeta * grad

    def finish(k, x):
        return k.D(x)

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- Song et al. (2023): PiGDM -------------------------------------------------------------------
def pigdm(
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
    eta = between(eta, "eta", 0, 1)
    prior_var = positive(prior_var, "prior_var")
    guidance_scale = positive(guidance_scale, "guidance_scale")
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)

    def guided(k, x: Tensor) -> Tensor:
        t = k.t
        with torch.enable_grad():
            leaf, x0 = _with_grad(k, x)
            bar2 = (t.sigma / t.alpha) ** 2
            r2 = prior_var * bar2 / (prior_var + bar2)  # the variance of p(x_0 | x_t)
            resid = (y - operator(x0)).detach()
            if sigma_y == 0:
                u = operator.pinv(resid) / r2
            else:
                u = operator.normal_solve(operator.adjoint(resid), sigma_y**2 / r2) / r2
            (g,) = torch.autograd.grad(x0, leaf, grad_outputs=u)
        return x0.detach() + guidance_scale * t.sigma**2 / t.alpha * g

    def update(k, x):
        x0 = k.denoised = guided(k, x)
        return k.ddim(x, x0, eta)

    def finish(k, x):
        return guided(k, x) if k.t.sigma > 0 else k.D(x)

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- Kawar et al. (2022): DDRM -------------------------------------------------------------------
def ddrm(
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
    eta, eta_b = between(eta, "eta", 0, 1), between(eta_b, "eta_b", 0, 1)
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)
    if not operator.has_svd:
        raise ValueError(
            f"ddrm needs an operator with an SVD, got {type(operator).__name__} (has_svd is False)"
        )
    svd = operator.svd()
    sv = svd.s.to(dtype=x.dtype, device=x.device)
    idx = torch.nonzero(sv > sv.amax() * 1e-12).reshape(-1)  # the observed coordinates
    y_bar = svd.Ut(y)[:, idx] / sv[idx]  # (B, r)
    y_std = sigma_y / sv[idx]  # the noise level of each observed coordinate

    def spectral_step(k, x_bar_t: Tensor, x_theta: Tensor, bar_t: float, bar_s: float) -> Tensor:
        new = x_theta + math.sqrt(1 - eta**2) * (bar_s / bar_t) * (x_bar_t - x_theta)
        if eta > 0 and bar_s > 0:
            new = new + eta * bar_s * k.noise(like=new)
        xo = x_theta[:, idx]
        below = bar_s < y_std  # (r,)
        quiet = xo + math.sqrt(1 - eta**2) * bar_s * (y_bar - xo) / y_std.clamp(min=1e-300)
        if eta > 0 and bar_s > 0:
            quiet = quiet + eta * bar_s * k.noise(like=quiet)
        spread = (bar_s**2 - eta_b**2 * y_std**2).clamp(min=0).sqrt()
        loud = (1 - eta_b) * xo + eta_b * y_bar + spread * k.noise(like=xo)
        new[:, idx] = torch.where(below, quiet, loud)
        return new

    def update(k, x):
        x_theta = svd.Vt(k.D(x))
        x_bar = svd.Vt(x / k.t.alpha)
        bar_t, bar_s = k.t.sigma / k.t.alpha, k.s.sigma / k.s.alpha
        return k.s.alpha * svd.V(spectral_step(k, x_bar, x_theta, bar_t, bar_s))

    def finish(k, x):
        x_theta = svd.Vt(k.D(x))
        bar_t = max(k.t.sigma / k.t.alpha, 1e-300)
        return svd.V(spectral_step(k, svd.Vt(x / k.t.alpha), x_theta, bar_t, 0.0))

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- Mardani et al. (2024): RED-diff -------------------------------------------------------------
def red_diff(
    model: Callable,
    y: Tensor,
    operator: LinearOperator,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    *,
    mu: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
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
    y, mu, sigma_y = _problem(y, operator, sigma_y, ts, process, mu, generator, draw=False)
    if sigma_y == 0:
        raise ValueError("red_diff's data term divides by sigma_y^2: give sigma_y > 0")
    if mu is None:  # the Tikhonov estimate
        mu = operator.normal_solve(operator.adjoint(y), sigma_y**2)
    adam = {"m": torch.zeros_like(mu), "v": torch.zeros_like(mu)}  # betas 0.9, 0.999

    def update(k, mu):
        d = k.D(k.t.alpha * mu + k.t.sigma * k.noise())
        grad = operator.adjoint(operator(mu) - y) / sigma_y**2 + lam * (mu - d)
        m = adam["m"] = 0.9 * adam["m"] + 0.1 * grad
        v = adam["v"] = 0.999 * adam["v"] + 0.001 * grad**2
        m_hat, v_hat = m / (1 - 0.9 ** (k.i + 1)), v / (1 - 0.999 ** (k.i + 1))
        return mu - lr * m_hat / (v_hat.sqrt() + 1e-8)

    return integrate(update, model, mu.clone(), ts, process, generator=generator, callback=callback)


# -- Chung, Lee & Ye (2024): DDS -----------------------------------------------------------------
def dds(
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
    eta = between(eta, "eta", 0, 1)
    cg_iters = count(cg_iters, "cg_iters")
    if gamma is not None:
        gamma = positive(gamma, "gamma")
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)
    aty = operator.adjoint(y)

    def correct(x0: Tensor) -> Tensor:
        if gamma is None:
            return conjugate_gradient(operator.normal, aty, x0, n_iter=cg_iters, tol=0.0)
        return conjugate_gradient(
            lambda v: gamma * operator.normal(v) + v, gamma * aty + x0, x0, cg_iters, tol=0.0
        )

    def update(k, x):
        x0 = k.D(x)
        return k.ddim(x, correct(x0), eta, eps=eps_hat(x, x0, k.t))  # the unconditional noise

    def finish(k, x):
        return correct(k.D(x))

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- Zhu et al. (2023): DiffPIR ------------------------------------------------------------------
def diffpir(
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
    lam, zeta = positive(lam, "lam"), between(zeta, "zeta", 0, 1)
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)
    aty = operator.adjoint(y)

    def data_step(t, x0: Tensor) -> Tensor:
        if sigma_y == 0:
            return _project(operator, x0, y)
        if t.sigma == 0:
            return x0  # the denoiser is exact at sigma = 0: the prior step wins (rho = inf)
        rho = lam * sigma_y**2 * (t.alpha / t.sigma) ** 2
        return operator.normal_solve(aty + rho * x0, rho)

    def update(k, x):
        x0 = data_step(k.t, k.D(x))
        eps = eps_hat(x, x0, k.t)
        return k.s.alpha * x0 + k.s.sigma * (
            math.sqrt(1 - zeta) * eps + math.sqrt(zeta) * k.noise()
        )

    def finish(k, x):
        return data_step(k.t, k.D(x))

    return integrate(
        update, model, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- the registry of solvers and their facts -------------------------------------------------
@dataclass(frozen=True)
class Solver:
    """A solver with its facts; calling it runs the solver.

    ``needs``: what it asks of the operator or the model (``"svd"``: ``operator.has_svd``;
    ``"gradient"``: a backward pass through the model; ``"sigma_y > 0"``); ``stochastic``: True,
    False or the option that makes it stochastic when nonzero; ``options``: its own options;
    ``final_call``: whether it makes one more model call at ``ts[-1]`` (NFE = steps + 1).
    """

    fn: Callable
    needs: tuple[str, ...] = ()
    stochastic: bool | str = True
    options: tuple[str, ...] = ()
    final_call: bool = True
    name: str = field(default="", compare=False)

    def __call__(self, model, y, operator, sigma_y, ts, process, **options) -> Tensor:
        return self.fn(model, y, operator, sigma_y, ts, process, **options)

    def applies(self, operator: LinearOperator, sigma_y: float) -> bool:
        """Whether the solver can run on ``operator`` at noise level ``sigma_y``."""
        if "svd" in self.needs and not operator.has_svd:
            return False
        return not ("sigma_y > 0" in self.needs and not sigma_y > 0)

    def model_calls(self, n_steps: int) -> int:
        """Model calls (NFE) over ``n_steps`` steps."""
        return count(n_steps, "n_steps") + int(self.final_call)


#: Every solver of this module by its name, with its facts; all take
#: ``(model, y, operator, sigma_y, ts, process, *, x=None, generator=None, callback=None, ...)``.
SOLVERS: dict[str, Solver] = {
    name: Solver(name=name, **facts)
    for name, facts in {
        "replacement": dict(fn=replacement, stochastic=True, options=("eta",)),
        "dps": dict(fn=dps, needs=("gradient",), options=("zeta", "eta")),
        "pigdm": dict(
            fn=pigdm, needs=("gradient",), options=("eta", "prior_var", "guidance_scale")
        ),
        "ddrm": dict(fn=ddrm, needs=("svd",), options=("eta", "eta_b")),
        "red_diff": dict(
            fn=red_diff, needs=("sigma_y > 0",), options=("lam", "lr"), final_call=False
        ),
        "dds": dict(fn=dds, stochastic="eta", options=("eta", "cg_iters", "gamma")),
        "diffpir": dict(fn=diffpir, stochastic="zeta", options=("lam", "zeta")),
    }.items()
}
