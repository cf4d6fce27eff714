r"""Plug-and-play priors, read as a score-based method, and the total-variation reference.

A PnP denoiser ``denoise(x, sigma)`` estimates :math:`x` from :math:`x + \sigma n`.  Its MMSE
version is Tweedie's :math:`x + \sigma^2\nabla\log p_\sigma(x)`, with :math:`p_\sigma` the prior
smoothed by :math:`\mathcal N(0, \sigma^2 I)`: a score model *is* a PnP denoiser (Park et al.,
2025).  :func:`diffusion_denoiser` makes one from a diffusion denoiser :math:`D(x, t)` by the
change of variables :math:`x_t = \alpha_t x` at the time where :math:`\sigma_t/\alpha_t = \sigma`.

Algorithms (the data term is :math:`f(x) = \lVert y - Ax\rVert^2/(2\sigma_y^2)`): :func:`pnp_pgd`,
:func:`pnp_admm`, :func:`pnp_hqs` (DPIR-style, decreasing :math:`\sigma`), :func:`red`; and a
posterior sampler, :func:`pnp_dm` (split Gibbs: :func:`likelihood_step`, then the prior step
:func:`diffusion_prior_step`, a Gaussian denoising posterior sampled by the diffusion model).
Classical denoisers: :func:`wiener_denoiser`, :func:`fourier_wiener_denoiser`,
:func:`patch_gmm_denoiser`.  Total variation: :func:`tv`, the exact :func:`tv_prox`, the
closed-form :func:`tv_prox_approx` and the solver :func:`tv_fista`.

Images are ``(B, C, H, W)``, vectors ``(B, d)``; 1-D signals for TV are ``(B, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore import samplers
from diffcore.analytic import Gaussian, GaussianMixture
from diffcore.checks import count, finite, noise_level, positive
from diffcore.inverse.operators import LinearOperator
from diffcore.processes import Process
from diffcore.stepping import Step, emit

__all__ = [
    "noise_level_time",
    "diffusion_denoiser",
    "wiener_denoiser",
    "fit_power_spectrum",
    "fourier_wiener_denoiser",
    "fit_patch_gmm",
    "patch_gmm_denoiser",
    "pnp_pgd",
    "pnp_admm",
    "pnp_hqs",
    "dpir_sigmas",
    "red",
    "likelihood_step",
    "diffusion_prior_step",
    "gaussian_prior_step",
    "pnp_dm",
    "tv",
    "tv_prox",
    "tv_prox_approx",
    "tv_fista",
]


# -- checks --------------------------------------------------------------------------------------
def _positive(value, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    return positive(value, name)


def _sigma_tensor(sigma, x: Tensor) -> Tensor:
    """The noise level as a tensor of shape () or (B,), checked positive."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"sigma must be a number or one per sample, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"sigma must be positive and finite, got sigma = {s.tolist()}")
    return s


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


def _check_problem(operator, y, sigma_y, x):
    if not isinstance(operator, LinearOperator):
        raise ValueError(f"operator must be a LinearOperator, got {type(operator).__name__}")
    sigma_y = noise_level(sigma_y, "sigma_y")
    if sigma_y == 0:
        raise ValueError("the PnP data term divides by sigma_y^2: give sigma_y > 0")
    operator.check_shape(y, operator.out_shape, "out")
    x = operator.pinv(y) if x is None else x
    operator.check_shape(x, operator.in_shape, "in")
    return sigma_y, x.detach().clone()


# -- the denoiser of a diffusion model -----------------------------------------------------------
def noise_level_time(process: Process, sigma) -> Tensor:
    r"""The time at which the process has noise level ``sigma``: :math:`\sigma_t/\alpha_t =
    \sigma`, i.e. :math:`t = \lambda^{-1}(-\log\sigma)`.  A level outside the process's range
    :math:`[\bar\sigma_0, \bar\sigma_1]` raises.  Shapes: ``sigma`` float or tensor; returns the
    same shape (float64 for a float)."""
    s = torch.as_tensor(sigma, dtype=torch.float64 if not isinstance(sigma, Tensor) else None)
    if not s.is_floating_point() or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"sigma must be positive and finite, got sigma = {s.tolist()}")
    t = process.t_of_lam(-torch.log(s))
    slack = 1e-10  # round-off of t_of_lam at the ends of [0, 1]
    if not bool(((t >= -slack) & (t <= 1 + slack)).all()):
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        low, high = torch.exp(-process.lam(ends)).tolist()
        raise ValueError(
            f"sigma = {s.tolist()} lies outside the noise levels sigma_t / alpha_t of "
            f"{process!r}: [{low:.4g}, {high:.4g}]"
        )
    return t.clamp(0, 1)


def diffusion_denoiser(denoiser: Callable, process: Process) -> Callable:
    r"""The PnP denoiser of a diffusion model: ``denoise(x, sigma) = D(alpha_t x, t)`` at the time
    :math:`t` with :math:`\sigma_t/\alpha_t = \sigma` (:func:`noise_level_time`).

    If :math:`x = x_0 + \sigma n`, then :math:`\alpha_t x = \alpha_t x_0 + \sigma_t n` has the law
    of :math:`x_t`, so :math:`D(\alpha_t x, t) = \mathbb E[x_0 \mid x]`: with an exact denoiser
    this is the exact MMSE denoiser at level :math:`\sigma`, whatever the process.  Shapes:
    ``x`` ``(B, ...)``, ``sigma`` a float or ``(B,)``; returns ``(B, ...)``.
    """

    def denoise(x: Tensor, sigma) -> Tensor:
        level = _sigma_tensor(sigma, x)
        t = noise_level_time(process, level).to(x.dtype)
        return denoiser(_per_sample(process.alpha(t), x) * x, t)

    return denoise


# -- classical denoisers -------------------------------------------------------------------------
def wiener_denoiser(mean: Tensor, cov: Tensor) -> Callable:
    r"""The exact MMSE denoiser of a Gaussian prior :math:`\mathcal N(\mu, \Sigma)`:
    :math:`\mu + \Sigma(\Sigma + \sigma^2 I)^{-1}(x - \mu)`, by one eigendecomposition.
    Shapes: ``mean`` ``(d,)``, ``cov`` ``(d, d)``; ``denoise`` maps ``(B, ...)`` with ``d``
    entries per sample and ``sigma`` (float or ``(B,)``) to ``(B, ...)``."""
    mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(
            f"need mean (d,) and cov (d, d), got {tuple(mean.shape)} and {tuple(cov.shape)}"
        )
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    if float(evals[0]) < 0:
        raise ValueError(
            f"cov must be positive semi-definite, got eigenvalue {float(evals[0]):.3g}"
        )

    def denoise(x: Tensor, sigma) -> Tensor:
        level = _sigma_tensor(sigma, x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != mean.shape[0]:
            raise ValueError(
                f"x must have {mean.shape[0]} entries per sample, got {tuple(x.shape)}"
            )
        m, u, ell = (v.to(dtype=x.dtype, device=x.device) for v in (mean, evecs, evals))
        gain = ell / (ell + _per_sample(level, flat) ** 2)
        return (m + ((flat - m) @ u * gain) @ u.T).reshape(x.shape)

    return denoise


def fit_power_spectrum(images: Tensor) -> tuple[Tensor, Tensor]:
    r"""A stationary Gaussian model of ``images`` ``(N, C, H, W)``: the per-channel mean ``(C,)``
    and the power spectrum ``(C, H, W)``, :math:`P = \tfrac1N\sum|F(x - m)|^2` with the
    orthonormal FFT (circular boundary)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] < 2:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be (N, C, H, W) with N >= 2, got {shape}")
    mean = images.mean(dim=(0, 2, 3))
    centred = images - mean[:, None, None]
    power = torch.fft.fft2(centred, norm="ortho").abs().pow(2).mean(0)
    return mean, power


def fourier_wiener_denoiser(mean: Tensor, power: Tensor) -> Callable:
    r"""The stationary Wiener filter :math:`m + F^H\frac{P}{P + \sigma^2}F(x - m)`: the exact MMSE
    denoiser of the circulant Gaussian prior with spectrum ``power`` ``(C, H, W)`` and mean
    ``mean`` ``(C,)`` (:func:`fit_power_spectrum`).  ``denoise`` maps ``(B, C, H, W)`` and
    ``sigma`` (float or ``(B,)``) to ``(B, C, H, W)``."""
    mean, power = torch.as_tensor(mean), torch.as_tensor(power)
    if power.ndim != 3 or mean.shape != (power.shape[0],) or bool((power < 0).any()):
        raise ValueError(
            f"need power (C, H, W) >= 0 and mean (C,), got {tuple(power.shape)} and "
            f"{tuple(mean.shape)}"
        )

    def denoise(x: Tensor, sigma) -> Tensor:
        level = _sigma_tensor(sigma, x)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(power.shape):
            raise ValueError(f"x must be (B, *{tuple(power.shape)}), got {tuple(x.shape)}")
        p = power.to(dtype=x.dtype, device=x.device)
        m = mean.to(dtype=x.dtype, device=x.device)[:, None, None]
        gain = p / (p + _per_sample(level, x) ** 2)
        return m + torch.fft.ifft2(torch.fft.fft2(x - m, norm="ortho") * gain, norm="ortho").real

    return denoise


def _patches(x: Tensor, p: int) -> Tensor:
    """All ``p x p`` patches of ``x`` ``(B, C, H, W)`` with circular wrap: ``(B, H, W, C p^2)``,
    the patch at ``(r, c)`` covering pixels ``r..r+p-1, c..c+p-1`` (mod H, W)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (0, p - 1, 0, p - 1), mode="circular")
    cols = F.unfold(padded, p)  # (B, C p^2, H W)
    return cols.transpose(1, 2).reshape(b, h, w, c * p * p)


def fit_patch_gmm(
    images: Tensor, patch_size: int, k: int, max_patches: int = 20000, seed: int = 0
) -> GaussianMixture:
    """A ``k``-component Gaussian mixture fitted by EM (:func:`diffcore.data.fit_gaussian_mixture`)
    to at most ``max_patches`` random ``patch_size x patch_size`` patches of ``images``
    ``(N, C, H, W)`` (all patches, without wrap, before subsampling).  Returns a mixture in
    dimension ``C * patch_size**2``."""
    from diffcore.data import fit_gaussian_mixture

    p = count(patch_size, "patch_size")
    if not isinstance(images, Tensor) or images.ndim != 4 or min(images.shape[2:]) < p:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be (N, C, H, W) with H, W >= patch_size = {p}, got {shape}")
    cols = F.unfold(images.double(), p).transpose(1, 2).reshape(-1, images.shape[1] * p * p)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(cols.shape[0], generator=gen)[: count(max_patches, "max_patches")]
    return fit_gaussian_mixture(cols[keep], count(k, "k"), seed=seed)


def patch_gmm_denoiser(gmm: GaussianMixture, patch_size: int) -> Callable:
    r"""A one-pass patch-mixture denoiser, a simplification of EPLL (Zoran & Weiss, 2011).

    Every overlapping ``patch_size`` patch (circular wrap) is replaced by its exact posterior
    mean under the mixture prior ``gmm`` for :math:`y = x + \sigma n`
    (:meth:`~diffcore.analytic.GaussianMixture.posterior_mean` with :math:`A = I`), and each
    pixel is the average of the :math:`p^2` estimates that cover it.  EPLL proper iterates this
    with decreasing noise levels and a half-quadratic splitting; this is its first pass.
    ``denoise`` maps ``(B, C, H, W)`` and a float ``sigma`` to ``(B, C, H, W)``.
    """
    p = count(patch_size, "patch_size")
    if not isinstance(gmm, GaussianMixture):
        raise ValueError(f"gmm must be an analytic.GaussianMixture, got {type(gmm).__name__}")

    def denoise(x: Tensor, sigma) -> Tensor:
        level = _positive(sigma, "sigma")
        b, c, h, w = x.shape
        if c * p * p != gmm.dim:
            raise ValueError(f"x has {c} channels but gmm has dimension {gmm.dim} != {c} * {p}^2")
        patches = _patches(x, p)
        eye = torch.eye(gmm.dim, dtype=torch.float64)
        clean = gmm.posterior_mean(eye, patches.reshape(-1, gmm.dim).double(), level)
        clean = clean.to(x.dtype).reshape(b, h, w, c, p, p)
        out = torch.zeros_like(x)
        for i in range(p):
            for j in range(p):
                # the patch at (r, c) puts its entry (i, j) on pixel (r + i, c + j)
                out += torch.roll(clean[..., i, j].permute(0, 3, 1, 2), (i, j), (2, 3))
        return out / p**2

    return denoise


# -- PnP algorithms ------------------------------------------------------------------------------
def _data_grad(operator: LinearOperator, x: Tensor, y: Tensor, sigma_y: float) -> Tensor:
    return operator.adjoint(operator(x) - y) / sigma_y**2


def _data_prox(operator: LinearOperator, v: Tensor, y: Tensor, sigma_y: float, gamma: float):
    r""":math:`\arg\min_x \lVert y - Ax\rVert^2/(2\sigma_y^2) + \lVert x - v\rVert^2/(2\gamma)`."""
    c = sigma_y**2 / gamma
    return operator.normal_solve(operator.adjoint(y) + c * v, c)


def pnp_pgd(
    denoise: Callable,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    sigma: float,
    *,
    gamma: float | None = None,
    n_iter: int = 100,
    x: Tensor | None = None,
    callback: Callable | None = None,
):
    r"""PnP proximal gradient: :math:`x_{k+1} = D_\sigma(x_k - \gamma\nabla f(x_k))`,
    :math:`f = \lVert y - Ax\rVert^2/(2\sigma_y^2)`.

    Score-based reading: the MMSE denoiser is (nearly) :math:`\operatorname{prox}` of
    :math:`-\sigma^2\log p`, the prox of :math:`\gamma g` with :math:`g = -\log p` when
    :math:`\gamma = \sigma^2` (the default).  For a Gaussian prior this holds exactly and the
    iteration converges, for :math:`\gamma < 2\sigma_y^2/\lVert A\rVert^2`, to the minimiser of
    :math:`f + (\sigma^2/\gamma)g`.  Start ``x`` (default :math:`A^+y`).  Returns ``x``;
    ``callback(step)`` sees each iterate (:class:`~diffcore.stepping.Step`, ``t`` the level
    :math:`\sigma`, ``denoised`` the iterate itself).
    """
    sigma, n_iter = _positive(sigma, "sigma"), count(n_iter, "n_iter")
    gamma = sigma**2 if gamma is None else _positive(gamma, "gamma")
    sigma_y, x = _check_problem(operator, y, sigma_y, x)
    for i in range(n_iter):
        x = denoise(x - gamma * _data_grad(operator, x, y, sigma_y), sigma)
        emit(callback, Step(i, sigma, x, x, i + 1))
    return x


def pnp_admm(
    denoise: Callable,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    sigma: float,
    *,
    gamma: float | None = None,
    n_iter: int = 100,
    x: Tensor | None = None,
    callback: Callable | None = None,
):
    r"""PnP-ADMM (scaled form) with penalty :math:`1/\gamma`:

    .. math::
        x_{k+1} &= \operatorname{prox}_{\gamma f}(z_k - u_k), \\
        z_{k+1} &= D_\sigma(x_{k+1} + u_k), \quad u_{k+1} = u_k + x_{k+1} - z_{k+1},

    the data step in closed form (``operator.normal_solve``).  If :math:`D_\sigma =
    \operatorname{prox}_{\sigma^2 g}` (exact for the MMSE denoiser of a Gaussian prior, with
    :math:`g = -\log p`), ADMM converges, for every :math:`\gamma > 0`, to the minimiser of
    :math:`f + (\sigma^2/\gamma)g`: with :math:`\gamma = \sigma^2` (the default) the MAP
    estimate, which for a Gaussian prior is the posterior mean.  Start ``x`` (default
    :math:`A^+y`), :math:`z_0 = x`, :math:`u_0 = 0`.  Returns :math:`x`; ``callback(step)``
    sees each :math:`x_k` (``denoised``: :math:`z_k`).
    """
    sigma, n_iter = _positive(sigma, "sigma"), count(n_iter, "n_iter")
    gamma = sigma**2 if gamma is None else _positive(gamma, "gamma")
    sigma_y, z = _check_problem(operator, y, sigma_y, x)
    u = torch.zeros_like(z)
    for i in range(n_iter):
        x = _data_prox(operator, z - u, y, sigma_y, gamma)
        z = denoise(x + u, sigma)
        u = u + x - z
        emit(callback, Step(i, sigma, x, z, i + 1))
    return x


def dpir_sigmas(sigma_max: float, sigma_min: float, n: int) -> list[float]:
    """``n`` noise levels decreasing geometrically from ``sigma_max`` to ``sigma_min`` (DPIR's
    schedule, uniform in log sigma)."""
    hi, lo, n = _positive(sigma_max, "sigma_max"), _positive(sigma_min, "sigma_min"), count(n, "n")
    if lo > hi:
        raise ValueError(f"need sigma_min <= sigma_max, got {lo} > {hi}")
    if n == 1:
        return [lo]
    return [hi * (lo / hi) ** (k / (n - 1)) for k in range(n)]


def pnp_hqs(
    denoise: Callable,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    sigmas,
    *,
    lam: float = 1.0,
    x: Tensor | None = None,
    callback: Callable | None = None,
):
    r"""Half-quadratic splitting with a decreasing noise schedule (DPIR, Zhang et al., 2021).

    For each :math:`\sigma_k` of ``sigmas`` (:func:`dpir_sigmas`):
    :math:`x_k = \arg\min_x f(x) + \lambda\lVert x - z_{k-1}\rVert^2/(2\sigma_k^2)` (closed form
    or conjugate gradients, ``operator.normal_solve``), then :math:`z_k = D_{\sigma_k}(x_k)`.
    With ``lam = 1`` the splitting weight matches the denoiser's level.  Start :math:`z_0` =
    ``x`` (default :math:`A^+y`).  Returns the last :math:`z`; ``callback(step)`` sees each
    :math:`z_k` (``t``: :math:`\sigma_k`).
    """
    lam = _positive(lam, "lam")
    sigmas = [_positive(float(s), "sigmas[k]") for s in sigmas]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level")
    sigma_y, z = _check_problem(operator, y, sigma_y, x)
    for i, level in enumerate(sigmas):
        x = _data_prox(operator, z, y, sigma_y, level**2 / lam)
        z = denoise(x, level)
        emit(callback, Step(i, level, z, z, i + 1))
    return z


def red(
    denoise: Callable,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    sigma: float,
    *,
    lam: float | None = None,
    step: float | None = None,
    n_iter: int = 200,
    x: Tensor | None = None,
    callback: Callable | None = None,
):
    r"""Regularisation by denoising (Romano, Elad & Milanfar, 2017), gradient form:
    :math:`x_{k+1} = x_k - \mu\,[\nabla f(x_k) + \lambda(x_k - D_\sigma(x_k))]`.

    Score-based reading: :math:`x - D_\sigma(x) = -\sigma^2\nabla\log p_\sigma(x)` for the MMSE
    denoiser, so with :math:`\lambda = 1/\sigma^2` (the default) RED is gradient descent on
    :math:`f - \log p_\sigma`, the MAP objective under the smoothed prior :math:`p_\sigma`.  Step
    :math:`\mu` (default :math:`1/(\lVert A\rVert^2/\sigma_y^2 + \lambda)`, safe since
    :math:`x - D_\sigma(x)` is 1-Lipschitz for a Gaussian prior).  Returns ``x``;
    ``callback(step)`` sees each iterate (``denoised``: :math:`D_\sigma(x_k)`).
    """
    sigma, n_iter = _positive(sigma, "sigma"), count(n_iter, "n_iter")
    lam = 1 / sigma**2 if lam is None else _positive(lam, "lam")
    sigma_y, x = _check_problem(operator, y, sigma_y, x)
    if step is None:
        step = 1 / (1.01 * operator.norm_sq() / sigma_y**2 + lam)
    step = _positive(step, "step")
    for i in range(n_iter):
        d = denoise(x, sigma)
        x = x - step * (_data_grad(operator, x, y, sigma_y) + lam * (x - d))
        emit(callback, Step(i, sigma, x, d, i + 1))
    return x


# -- posterior sampling: PnP-DM -----------------------------------------------------------------
def likelihood_step(
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    x: Tensor,
    rho: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A sample of :math:`z \sim \mathcal N(m, \Sigma) \propto \exp(-\lVert y - Az\rVert^2 /
    (2\sigma_y^2) - \lVert z - x\rVert^2/(2\rho^2))`, the likelihood step of PnP-DM.

    :math:`\Sigma = (A^\top A/\sigma_y^2 + I/\rho^2)^{-1}` and :math:`m = \Sigma(A^\top y /
    \sigma_y^2 + x/\rho^2)`.  Drawn exactly by perturbation and optimisation: with
    :math:`\gamma = \sigma_y^2/\rho^2`,

    .. math:: z = (A^\top A + \gamma I)^{-1}\big(A^\top(y + \sigma_y\varepsilon_1)
        + \gamma(x + \rho\varepsilon_2)\big),

    whose mean is :math:`m` and covariance :math:`\Sigma`; one ``operator.normal_solve``.
    Shapes: ``y`` ``(B, *out_shape)``, ``x`` ``(B, *in_shape)``; returns ``(B, *in_shape)``.
    """
    if not isinstance(operator, LinearOperator) or operator.complex_output:
        raise ValueError(f"operator must be a LinearOperator with real output, got {operator!r}")
    sigma_y, rho = noise_level(sigma_y, "sigma_y"), _positive(rho, "rho")
    if sigma_y == 0:
        raise ValueError("the likelihood step needs noise: give sigma_y > 0")
    operator.check_shape(y, operator.out_shape, "out")
    operator.check_shape(x, operator.in_shape, "in")
    gamma = (sigma_y / rho) ** 2

    def normal(v: Tensor) -> Tensor:
        return torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)

    noisy_y = y + sigma_y * normal(y)
    noisy_x = x + rho * normal(x)
    return operator.normal_solve(operator.adjoint(noisy_y) + gamma * noisy_x, gamma)


def diffusion_prior_step(
    denoiser: Callable,
    process: Process,
    n_steps: int = 20,
    generator: torch.Generator | None = None,
    noise_sampler: Callable | None = None,
) -> Callable:
    r"""The prior step of PnP-DM with a diffusion model: ``step(z, rho)`` samples
    :math:`p(x \mid z) \propto p(x)\exp(-\lVert x - z\rVert^2/(2\rho^2))`.

    If :math:`z = x + \rho n`, then :math:`\alpha_t z` at the time :math:`t` with
    :math:`\sigma_t/\alpha_t = \rho` (:func:`noise_level_time`) has the law of :math:`x_t`
    given :math:`x`, so the reverse process started there samples the denoising posterior.  Here
    it is :func:`~diffcore.samplers.ddpm`, the discretised reverse SDE: ``n_steps`` equal steps
    in log-SNR from the level :math:`\rho` down to :math:`\rho/100`, then its exact last step
    to :math:`t = 0` (for VE, whose levels end at :math:`\sigma_{\min}`, the grid ends there).
    Exact in law as the steps shrink, first order.  Only the reverse SDE itself samples the
    posterior: an ODE, or a sampler with extra churn, keeps the marginals but not the coupling
    of :math:`x_0` to :math:`x_t`.  ``noise_sampler`` goes to the sampler.  Shapes: ``z``
    ``(B, ...)``; returns ``(B, ...)``.
    """
    n_steps = count(n_steps, "n_steps")
    zero = torch.zeros(1, dtype=torch.float64)
    lowest = float(torch.exp(-process.lam(zero)))  # the level at t = 0

    def step(z: Tensor, rho) -> Tensor:
        rho = _positive(rho, "rho")
        t = float(noise_level_time(process, rho))
        floor = float(noise_level_time(process, max(rho / 100, lowest)))
        ts = samplers.time_grid(process, n_steps, kind="logsnr", t_min=floor, t_max=t)
        if floor > 0:
            ts = torch.cat([ts, zero])
        start = process.alpha(torch.tensor(t, dtype=torch.float64)).item() * z
        return samplers.ddpm(
            denoiser, start, ts, process, generator=generator, noise_sampler=noise_sampler
        )

    return step


def gaussian_prior_step(gaussian, generator: torch.Generator | None = None) -> Callable:
    r"""The exact prior step of a Gaussian prior :math:`\mathcal N(\mu, \Sigma)` (``analytic.
    Gaussian``): ``step(z, rho)`` samples :math:`p(x \mid z)` for :math:`z = x + \rho n`,
    :math:`\mathcal N(\mu + G(z - \mu), \Sigma - G\Sigma)` with :math:`G = \Sigma(\Sigma +
    \rho^2 I)^{-1}`.  The reference against which :func:`diffusion_prior_step` is an
    approximation, and a prior step that makes :func:`pnp_dm` exact on Gaussian problems.
    Shapes: ``z`` ``(B, ...)`` with ``gaussian.dim`` entries per sample; returns the same.
    """
    if not isinstance(gaussian, Gaussian):
        raise ValueError(f"gaussian must be an analytic.Gaussian, got {type(gaussian).__name__}")
    mean, cov = gaussian.mean, gaussian.cov

    def step(z: Tensor, rho) -> Tensor:
        rho = _positive(rho, "rho")
        flat = z.reshape(z.shape[0], -1)
        gain = cov @ torch.linalg.inv(cov + rho**2 * torch.eye(cov.shape[0], dtype=cov.dtype))
        post_cov = cov - gain @ cov
        m = mean + (flat - mean) @ gain.T
        noise = torch.randn(flat.shape, generator=generator, dtype=z.dtype)
        return (m + noise @ torch.linalg.cholesky(post_cov).T).reshape(z.shape)

    return step


def pnp_dm(
    prior_step: Callable,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    rhos,
    *,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
):
    r"""PnP-DM (Wu et al., 2024): posterior sampling by a split Gibbs sampler.

    The target couples :math:`x` to a copy :math:`z` at strength :math:`\rho`,

    .. math:: \pi_\rho(x, z) \propto p(x)\,e^{-\lVert x - z\rVert^2/(2\rho^2)}\,
        e^{-\lVert y - Az\rVert^2/(2\sigma_y^2)},

    whose :math:`x`-marginal is :math:`p(x)\,\mathcal N(y; Ax, \sigma_y^2 I + \rho^2 AA^\top)`:
    the posterior as :math:`\rho \to 0`.  One sweep per :math:`\rho_k` of ``rhos`` (annealed,
    e.g. :func:`dpir_sigmas`): the likelihood step :math:`z \sim \pi(z \mid x)`
    (:func:`likelihood_step`, exact), then the prior step :math:`x \sim \pi(x \mid z)`, a
    Gaussian denoising posterior, ``prior_step(z, rho)`` (:func:`diffusion_prior_step`).  Start
    ``x`` (default :math:`A^+ y`).  Each batch entry is its own chain.  Returns the last ``x``;
    ``callback(step)`` sees each sweep's ``x`` (``t``: :math:`\rho_k`; ``nfe``: prior steps).  Shapes: ``y`` ``(B, *out_shape)``;
    returns ``(B, *in_shape)``.
    """
    sigma_y, x = _check_problem(operator, y, sigma_y, x)
    rhos = [_positive(rho, "rho") for rho in rhos]
    if not rhos:
        raise ValueError("rhos must hold at least one coupling strength")
    for i, rho in enumerate(rhos):
        z = likelihood_step(operator, y, sigma_y, x, rho, generator)
        x = prior_step(z, rho)
        emit(callback, Step(i, rho, x, x, i + 1))
    return x


# -- total variation -----------------------------------------------------------------------------
def _tv_axes(x: Tensor) -> tuple[int, ...]:
    """TV acts on the last axis of 1-D signals ``(B, n)`` and the last two of ``(B, C, H, W)``."""
    if not isinstance(x, Tensor) or x.ndim not in (2, 4):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"TV takes signals (B, n) or images (B, C, H, W), got {shape}")
    return (-1,) if x.ndim == 2 else (-2, -1)


def _diff(x: Tensor, axis: int) -> Tensor:
    """Circular forward difference along ``axis``: x[i + 1] - x[i]."""
    return torch.roll(x, -1, axis) - x


def _diff_t(p: Tensor, axis: int) -> Tensor:
    """The adjoint of :func:`_diff`: p[i - 1] - p[i]."""
    return torch.roll(p, 1, axis) - p


def tv(x: Tensor) -> Tensor:
    r"""Anisotropic total variation with circular boundary,
    :math:`\mathrm{TV}(x) = \sum_a \lVert D_a x\rVert_1` over the spatial axes.
    Shapes: ``(B, n)`` or ``(B, C, H, W)``; returns ``(B,)``."""
    return sum(_diff(x, a).abs().flatten(1).sum(1) for a in _tv_axes(x))


def tv_prox(z: Tensor, tau: float, n_iter: int = 5000, tol: float = 1e-12) -> Tensor:
    r"""The exact proximal operator :math:`\arg\min_x \tfrac12\lVert x - z\rVert^2 + \tau\,\mathrm{TV}(x)`,
    by FISTA on the dual (Beck & Teboulle, 2009).

    :math:`x = z - \tau\sum_a D_a^\top p_a` with :math:`p` the minimiser of
    :math:`\tfrac12\lVert z - \tau D^\top p\rVert^2` over :math:`\lVert p\rVert_\infty \le 1`:
    accelerated projected gradient with step :math:`1/(\tau^2\lVert D\rVert^2)`,
    :math:`\lVert D\rVert^2 \le 4 \times` (number of axes).  Stops when the primal iterate moves
    by less than ``tol`` (relative, max norm) or after ``n_iter`` iterations.
    Shapes: ``z`` ``(B, n)`` or ``(B, C, H, W)``; returns the same.
    """
    axes = _tv_axes(z)
    finite(z, "z")
    tau, n_iter = _positive(tau, "tau"), count(n_iter, "n_iter")
    lip = 4.0 * len(axes)
    p = [torch.zeros_like(z) for _ in axes]
    q = [v.clone() for v in p]
    momentum = 1.0
    x = z.clone()
    scale = float(z.abs().amax()) or 1.0
    for _ in range(n_iter):
        primal = z - tau * sum(_diff_t(v, a) for v, a in zip(q, axes, strict=True))
        new_p = [
            (v + _diff(primal, a) / (tau * lip)).clamp(-1, 1) for v, a in zip(q, axes, strict=True)
        ]
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        q = [n + (momentum - 1) / next_momentum * (n - o) for n, o in zip(new_p, p, strict=True)]
        p, momentum = new_p, next_momentum
        new_x = z - tau * sum(_diff_t(v, a) for v, a in zip(p, axes, strict=True))
        moved = float((new_x - x).abs().amax())
        x = new_x
        if moved <= tol * scale:
            break
    return x


def tv_prox_approx(z: Tensor, tau: float) -> Tensor:
    r"""The closed-form approximation of :math:`\operatorname{prox}_{\tau\mathrm{TV}}` by Haar
    shrinkage averaged over shifts (Kamilov, 2017; analysed by Chandler et al., 2025).

    Along each axis and for each of the two pairings of neighbours (shift 0 and 1), a one-level
    Haar transform :math:`W_k` has detail coefficients :math:`(x_{2i+1} - x_{2i})/\sqrt2`, so
    :math:`\mathrm{TV}(x) = \sum_{k=1}^{K}\sqrt2\,\lVert \text{detail}(W_k x)\rVert_1`,
    :math:`K = 2 \times` (number of axes).  The approximation averages the exact proxes of the
    :math:`K` pieces, each scaled by :math:`K`:

    .. math:: \hat x = \frac1K\sum_{k=1}^{K} W_k^\top\,\mathcal T_{\sqrt2 K\tau}(W_k z),

    :math:`\mathcal T` soft thresholding of the detail coefficients.  The scaling parameter
    :math:`\tau` controls the error: it is a prox of a convex function (firmly non-expansive),
    never increases TV, and is *exact* when every difference of :math:`z` exceeds
    :math:`2K\tau` in magnitude (then both it and the exact prox equal
    :math:`z - \tau D^\top\operatorname{sign}(Dz)`); in general
    :math:`\lVert\hat x - \operatorname{prox}_{\tau\mathrm{TV}}(z)\rVert \le 2K\tau\sqrt N`.
    Needs even lengths along the TV axes (circular pairs).  Shapes: as :func:`tv`.
    """
    axes = _tv_axes(z)
    tau = _positive(tau, "tau")
    for a in axes:
        if z.shape[a] % 2:
            raise ValueError(
                f"tv_prox_approx needs even sizes along the TV axes, got shape {tuple(z.shape)}"
            )
    k = 2 * len(axes)
    threshold = math.sqrt(2) * k * tau
    correction = torch.zeros_like(z)
    for a in axes:
        for shift in (0, 1):
            v = torch.roll(z, -shift, a).movedim(a, -1)
            pairs = v.reshape(*v.shape[:-1], -1, 2)
            detail = (pairs[..., 1] - pairs[..., 0]) / math.sqrt(2)
            kept = detail.clamp(-threshold, threshold)  # detail - soft(detail)
            # W^T of the removed detail: -kept/sqrt2 on the first of each pair, +kept/sqrt2 on the second
            back = torch.stack([-kept, kept], dim=-1).reshape(v.shape) / math.sqrt(2)
            correction += torch.roll(back.movedim(-1, a), shift, a)
    return z - correction / k


def tv_fista(
    operator: LinearOperator,
    y: Tensor,
    lam: float,
    *,
    n_iter: int = 200,
    prox: str = "approx",
    step: float | None = None,
    x: Tensor | None = None,
    callback: Callable | None = None,
    prox_iters: int = 200,
):
    r"""TV-regularised least squares :math:`\min_x \tfrac12\lVert y - Ax\rVert^2 + \lambda\,\mathrm{TV}(x)`
    by FISTA (Beck & Teboulle, 2009): a gradient step of size :math:`\mu` (default
    :math:`1/\lVert A\rVert^2`), then :math:`\operatorname{prox}_{\mu\lambda\mathrm{TV}}`, exact
    (``prox="exact"``, :func:`tv_prox` with ``prox_iters`` inner iterations) or closed-form
    (``prox="approx"``, :func:`tv_prox_approx`).  Start ``x`` (default :math:`A^\top y`).
    Returns ``x``; ``callback(step)`` sees each iterate (``t`` and ``denoised`` None).
    """
    lam, n_iter = _positive(lam, "lam"), count(n_iter, "n_iter")
    if prox not in ("approx", "exact"):
        raise ValueError(f"prox must be 'approx' or 'exact', got prox = {prox!r}")
    if not isinstance(operator, LinearOperator):
        raise ValueError(f"operator must be a LinearOperator, got {type(operator).__name__}")
    operator.check_shape(y, operator.out_shape, "out")
    step = 1 / (1.01 * operator.norm_sq()) if step is None else _positive(step, "step")
    x = operator.adjoint(y) if x is None else x.detach().clone()
    _tv_axes(x)

    def shrink(v: Tensor) -> Tensor:
        if prox == "exact":
            return tv_prox(v, step * lam, n_iter=prox_iters)
        return tv_prox_approx(v, step * lam)

    w, momentum = x.clone(), 1.0
    for i in range(n_iter):
        new_x = shrink(w - step * operator.adjoint(operator(w) - y))
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        w = new_x + (momentum - 1) / next_momentum * (new_x - x)
        x, momentum = new_x, next_momentum
        emit(callback, Step(i, None, x, None, 0))
    return x
