r"""Physics in the loop (chapter 21): the forward model enters every step of the sampler.

Four ways to put the measurement physics inside a diffusion prior, each reduced to a toy
size at which its fixed point or its law is known exactly:

- **3-D from 2-D priors** (DiffusionMBIR, Chung et al., 2023; the 2.5-D strategy of
  DiffSPECT-3D): a 2-D prior acts slice by slice on a volume ``(B, D, H, W)``, and a total
  variation along the through-plane axis, :math:`\lambda\lVert D_z x\rVert_1`, ties the slices
  together.  :class:`SliceStack` applies a 2-D operator (CT's
  :class:`~diffcore.inverse.operators.Radon`, MRI's
  :class:`~diffcore.inverse.operators.FourierSubsampling`) to every slice; :class:`ThroughPlaneDifference` is :math:`D_z`; :func:`admm_tv` solves the TV
  sub-problem by ADMM with a conjugate-gradient :math:`x`-update whose dual variables
  (:class:`TVState`) carry over between diffusion steps; :func:`diffusion_mbir` alternates
  the slice-wise denoiser with a few ADMM iterations.
- **Conditional model with data consistency at every step** (MRI from undersampled k-space):
  :func:`data_consistency` (replace the measured k-space entries; with noise, their
  posterior-weighted average) and :func:`dc_sampler`, which enforces it after every
  denoiser call.
- **Diff-Unfolding** (an unrolled proximal-gradient scheme on the prior's denoiser):
  :func:`unrolled_posterior_mean` approximates :math:`\mathbb E[x_0 \mid x_t, y]`, exactly for
  a Gaussian prior.
- **RELD** (regularisation by latent denoising with half-quadratic splitting): :func:`reld`
  with any encoder, decoder and latent denoiser; :class:`LinearAutoencoder` (PCA) with a
  Gaussian latent prior makes every sub-problem quadratic, so the fixed point is known in
  closed form.

Volumes are ``(B, D, *plane)`` (``plane = (H, W)`` for images); a slice handed to a 2-D model
is ``(B * D, *slice_shape)`` with ``slice_shape`` the 2-D operator's ``in_shape`` (``(1, H,
W)``).  Inner products are the real ones of :func:`~diffcore.inverse.operators.inner`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffcore.checks import between, count, finite, floating, noise_level, nonnegative, positive
from diffcore.inverse.operators import (
    FourierSubsampling,
    LinearOperator,
    check_operator,
    conjugate_gradient,
    inner,
)
from diffcore.inverse.pnp import noise_level_time
from diffcore.inverse.solvers import _problem
from diffcore.processes import Process, check_process
from diffcore.stepping import Step, check_time_grid, emit, integrate

__all__ = [
    "SliceStack",
    "ThroughPlaneDifference",
    "TVState",
    "shrink",
    "through_plane_tv_objective",
    "admm_tv",
    "diffusion_mbir",
    "data_consistency",
    "dc_sampler",
    "unrolled_posterior_mean",
    "LinearAutoencoder",
    "reld",
]


# -- shared checks -------------------------------------------------------------------------------
def _measurement(operator: LinearOperator, y, name: str = "y") -> Tensor:
    operator.check_output(y, name)
    return finite(y, name)


def _solver_problem(y, operator, sigma_y, ts, process, x, generator):
    """The solvers' checked problem (:mod:`~diffcore.inverse.solvers`): the measurement
    expanded to the batch of ``x``, the start state, the noise level, and the grid."""
    y, x, sigma_y = _problem(y, operator, sigma_y, ts, process, x, generator)
    return y, x, sigma_y, check_time_grid(ts).to(torch.float64)


# -- 3-D from 2-D: operators ----------------------------------------------------------------------
class SliceStack(LinearOperator):
    r"""A 2-D operator :math:`A_2` applied to every slice of a volume: :math:`A = I_D \otimes A_2`.

    ``operator`` maps ``(N, *slice_shape) -> (N, *out2)``; ``depth`` :math:`D` slices.  A leading
    channel of one is dropped from the volume: for ``slice_shape = (1, H, W)`` (CT's
    :class:`~diffcore.inverse.operators.Radon`, single-coil MRI) ``in_shape = (D, H, W)``, else
    ``in_shape = (D, *slice_shape)``; ``out_shape = (D, *out2)``.  Because :math:`A^\top A =
    I_D \otimes A_2^\top A_2` is block diagonal, ``pinv`` and ``normal_solve`` are the
    2-D operator's, slice by slice (closed form where it has one).  The adjoint is exact: the
    dot-product test holds to round-off when it holds for :math:`A_2`.  DiffusionMBIR stores a
    volume as a batch of slices; here the batch holds volumes and the slices are an axis.
    """

    def __init__(self, operator: LinearOperator, depth: int):
        self.operator = check_operator(operator)
        self.depth = count(depth, "depth")
        self.slice_shape = tuple(operator.in_shape)
        squeeze = len(self.slice_shape) == 3 and self.slice_shape[0] == 1
        self.plane = self.slice_shape[1:] if squeeze else self.slice_shape
        self.in_shape = (self.depth, *self.plane)
        self.out_shape = (self.depth, *operator.out_shape)
        self.complex_output = operator.complex_output

    def slices(self, x: Tensor) -> Tensor:
        """A volume ``(B, D, *plane)`` as slices ``(B * D, *slice_shape)``."""
        return x.reshape(x.shape[0] * self.depth, *self.slice_shape)

    def volume(self, s: Tensor) -> Tensor:
        """Slices ``(B * D, *slice_shape)`` back to the volume ``(B, D, *plane)``."""
        return s.reshape(-1, self.depth, *self.plane)

    def _forward(self, x: Tensor) -> Tensor:
        out = self.operator.forward(self.slices(x))
        return out.reshape(x.shape[0], *self.out_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        flat = y.reshape(y.shape[0] * self.depth, *self.operator.out_shape)
        return self.volume(self.operator.adjoint(flat))

    def pinv(self, y: Tensor) -> Tensor:
        self.check_output(y)
        flat = y.reshape(y.shape[0] * self.depth, *self.operator.out_shape)
        return self.volume(self.operator.pinv(flat))

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(gamma, "gamma")
        self.check_input(b, "b")
        return self.volume(self.operator.normal_solve(self.slices(b), gamma))


class ThroughPlaneDifference(LinearOperator):
    r"""The through-plane finite difference :math:`(D_z x)_k = x_{k+1} - x_k` along the first
    axis of a volume ``in_shape = (D, *plane)``.

    ``circular=False`` (default): :math:`k = 0, \dots, D-2`, ``out_shape = (D - 1, *plane)``,
    adjoint :math:`(D_z^\top p)_k = p_{k-1} - p_k` with :math:`p_{-1} = p_{D-1} = 0`.
    ``circular=True``: the last slice differs from the first, ``out_shape = in_shape``, adjoint
    :math:`p_{k-1} - p_k` cyclically; this is ``_Dz``/``_DzT`` of the official DiffusionMBIR
    code, which wraps the volume around (the first and last slices are then tied by the TV, an
    artefact the default avoids).  Both adjoints are exact.
    """

    def __init__(self, in_shape, circular: bool = False):
        shape = tuple(in_shape) if not isinstance(in_shape, int) else (in_shape,)
        if len(shape) < 2 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(
                f"in_shape must be a volume shape (D, *plane) of positive integers, got "
                f"in_shape = {in_shape!r}"
            )
        if not isinstance(circular, bool):
            raise TypeError(f"circular must be True or False, got circular = {circular!r}")
        if shape[0] < 2:
            raise ValueError(f"a through-plane difference needs D >= 2 slices, got D = {shape[0]}")
        self.circular = circular
        self.in_shape = shape
        self.out_shape = shape if circular else (shape[0] - 1, *shape[1:])

    def _forward(self, x: Tensor) -> Tensor:
        if self.circular:
            return torch.roll(x, -1, 1) - x
        return x[:, 1:] - x[:, :-1]

    def _adjoint(self, p: Tensor) -> Tensor:
        if self.circular:
            return torch.roll(p, 1, 1) - p
        zero = torch.zeros_like(p[:, :1])
        padded = torch.cat([zero, p, zero], dim=1)  # p_{-1} = p_{D-1} = 0
        return padded[:, :-1] - padded[:, 1:]


# -- 3-D from 2-D: ADMM for the through-plane TV ---------------------------------------------
@dataclass(frozen=True)
class TVState:
    r"""The ADMM variables of :func:`admm_tv` that carry over between calls (between diffusion
    steps in :func:`diffusion_mbir`): the split variable :math:`z \approx D_z x` and the scaled
    dual :math:`u`, both ``(B, *difference.out_shape)``; ``iterations`` done so far."""

    z: Tensor
    u: Tensor
    iterations: int = 0


def shrink(v: Tensor, threshold: float) -> Tensor:
    r"""Soft thresholding :math:`\operatorname{sign}(v)\max(|v| - \tau, 0)`, the proximal map of
    :math:`\tau\lVert\cdot\rVert_1`.  Shapes: any; returns ``v``'s."""
    threshold = nonnegative(threshold, "threshold")
    return torch.sign(v) * (v.abs() - threshold).clamp(min=0)


def _tv_weights(lam, mu, rho):
    return nonnegative(lam, "lam"), nonnegative(mu, "mu"), positive(rho, "rho")


def through_plane_tv_objective(
    operator: LinearOperator,
    y: Tensor,
    x: Tensor,
    lam: float,
    *,
    v: Tensor | None = None,
    mu: float = 0.0,
    circular: bool = False,
) -> Tensor:
    r"""The objective of :func:`admm_tv`,

    .. math:: \Phi(x) = \tfrac12\lVert A x - y\rVert^2 + \tfrac\mu2\lVert x - v\rVert^2
        + \lambda\lVert D_z x\rVert_1 .

    ``v`` is needed when ``mu > 0``.  Shapes: ``y`` ``(B, *out_shape)``, ``x`` and ``v``
    ``(B, D, *plane)``; returns ``(B,)``.
    """
    check_operator(operator)
    lam, mu = nonnegative(lam, "lam"), nonnegative(mu, "mu")
    operator.check_input(x)
    y = _measurement(operator, y)
    diff = ThroughPlaneDifference(operator.in_shape, circular)
    r = operator(x) - y
    value = 0.5 * inner(r, r) + lam * diff(x).abs().flatten(1).sum(1)
    if mu > 0:
        if v is None:
            raise ValueError("mu > 0 needs the point v of the proximity term, got v = None")
        operator.check_input(v, "v")
        value = value + 0.5 * mu * inner(x - v, x - v)
    return value


def admm_tv(
    operator: LinearOperator,
    y: Tensor,
    lam: float,
    *,
    v: Tensor | None = None,
    mu: float = 0.0,
    rho: float = 1.0,
    n_iter: int = 100,
    n_cg: int = 50,
    x: Tensor | None = None,
    state: TVState | None = None,
    circular: bool = False,
    callback: Callable | None = None,
) -> tuple[Tensor, TVState]:
    r"""ADMM for the through-plane TV problem of DiffusionMBIR,

    .. math:: \min_x \tfrac12\lVert A x - y\rVert^2 + \tfrac\mu2\lVert x - v\rVert^2
        + \lambda\lVert D_z x\rVert_1 ,

    split as :math:`z = D_z x` with penalty :math:`\rho` and scaled dual :math:`u`:

    .. math::
        x_{k+1} &= (A^\top A + \mu I + \rho D_z^\top D_z)^{-1}
                  \big(A^\top y + \mu v + \rho D_z^\top(z_k - u_k)\big), \\
        z_{k+1} &= \mathcal S_{\lambda/\rho}(D_z x_{k+1} + u_k), \qquad
        u_{k+1} = u_k + D_z x_{k+1} - z_{k+1},

    the :math:`x`-update by ``n_cg`` conjugate-gradient iterations warm-started at
    :math:`x_k` (:func:`~diffcore.inverse.operators.conjugate_gradient`), the
    :math:`z`-update by soft thresholding (:func:`shrink`).  With an exact :math:`x`-update
    (``n_cg`` large) ADMM converges to the minimiser for every :math:`\rho > 0`; DiffusionMBIR
    takes ``n_cg = 1`` and one ADMM iteration per diffusion step, an inexact ADMM whose gap the
    tests measure.  The paper's problem has :math:`\mu = 0` (the default); the denoised iterate
    enters only as the warm start ``x``.  Start ``x`` (default ``v``, else zero); ``state``
    (:class:`TVState`; default :math:`z = D_z x`, :math:`u = 0`) continues an earlier run.
    ``callback(step)`` sees each :math:`x_k` (``state``: ``{"z", "u"}``).  Shapes: ``y``
    ``(B, *out_shape)``, ``v``, ``x`` ``(B, D, *plane)``; returns ``(x, state)``.
    """
    check_operator(operator)
    lam, mu, rho = _tv_weights(lam, mu, rho)
    n_iter, n_cg = count(n_iter, "n_iter"), count(n_cg, "n_cg")
    y = _measurement(operator, y)
    if len(operator.in_shape) < 2:
        raise ValueError(
            f"operator must act on volumes (D, *plane), got in_shape = {operator.in_shape}"
        )
    diff = ThroughPlaneDifference(operator.in_shape, circular)
    if v is not None:
        operator.check_input(v, "v")
        finite(v, "v")
    elif mu > 0:
        raise ValueError("mu > 0 needs the point v of the proximity term, got v = None")
    if x is None:
        x = v.clone() if v is not None else operator.adjoint(y) * 0
    else:
        operator.check_input(x)
        finite(x, "x")
        x = x.detach().clone()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has batch {x.shape[0]} but y has batch {y.shape[0]}")
    if state is None:
        z, u, done = diff(x), torch.zeros_like(diff(x)), 0
    else:
        if not isinstance(state, TVState):
            raise TypeError(f"state must be a TVState, got {type(state).__name__}")
        want = (x.shape[0], *diff.out_shape)
        if tuple(state.z.shape) != want or tuple(state.u.shape) != want:
            raise ValueError(
                f"state.z and state.u must have shape {want}, got {tuple(state.z.shape)} and "
                f"{tuple(state.u.shape)}"
            )
        z, u, done = state.z.to(x), state.u.to(x), state.iterations
    fixed = operator.adjoint(y) + (mu * v if mu > 0 else 0)

    def normal(w: Tensor) -> Tensor:
        out = operator.normal(w) + rho * diff.adjoint(diff(w))
        return out + mu * w if mu > 0 else out

    for i in range(n_iter):
        x = conjugate_gradient(normal, fixed + rho * diff.adjoint(z - u), x, n_iter=n_cg)
        dx = diff(x)
        z = shrink(dx + u, lam / rho)
        u = u + dx - z
        emit(callback, Step(i, None, x, None, 0, {"z": z, "u": u}))
    return x, TVState(z, u, done + n_iter)


def diffusion_mbir(
    model2d: Callable,
    y: Tensor,
    operator3d: LinearOperator,
    sigma_y: float,
    ts: Tensor,
    process: Process,
    *,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    lam: float = 1.0,
    rho: float = 1.0,
    mu: float | None = None,
    n_admm: int = 1,
    n_cg: int = 1,
    eta: float = 1.0,
    circular: bool = False,
) -> Tensor:
    r"""DiffusionMBIR (Chung et al., 2023): a 2-D diffusion prior slice by slice, tied across
    slices by the through-plane TV of :func:`admm_tv`, in the solvers' signature.

    At each time :math:`t \to s`: the 2-D denoiser on every slice, :math:`\hat x_0 =
    D_{2}(x_t, t)` (slices ``(B * D, *slice_shape)``); then ``n_admm`` ADMM iterations
    (``n_cg`` conjugate-gradient steps each) on

    .. math:: \min_x \tfrac12\lVert A x - y\rVert^2 + \tfrac{\mu_t}2\lVert x - \hat x_0\rVert^2
        + \lambda\lVert D_z x\rVert_1

    warm-started at :math:`\hat x_0`, whose :class:`TVState` carries over to the next step;
    then the DDIM step with the corrected :math:`\hat x_0'` (``eta = 1``: DDPM's ancestral
    step).  ``mu=None`` takes :math:`\mu_t = \sigma_y^2\alpha_t^2/\sigma_t^2` (the weight
    Bayes' rule gives the proximity term when :math:`x_0 \sim \mathcal N(\hat x_0,
    \bar\sigma_t^2 I)`; 0 when :math:`\sigma_y = 0`); a number fixes it.  The estimate is the
    corrected :math:`\hat x_0'` at ``ts[-1]``, after one more model call.

    Departures from the paper and its code (``controllable_generation_TV.py``): the paper runs
    the VE predictor-corrector and applies the ADMM to the noisy state :math:`x_t` itself, with
    :math:`\mu = 0` and one CG step warm-started at the state; here the ADMM acts on the
    denoised :math:`\hat x_0` and the DDIM step renoises (as in DDS, its successor), for any
    process; ``mu = 0, n_admm = n_cg = 1`` is the paper's correction.  The official
    through-plane difference is circular (``circular=True``); the default here is not.  The
    paper's final Kaczmarz step onto :math:`Ax = y` is left out.  Shapes: ``y`` ``(B,
    *out_shape)`` or ``(1, *out_shape)``; returns ``(B, D, *plane)``.
    """
    if not callable(model2d):
        raise TypeError(f"model2d must be callable as model2d(x, t), got {type(model2d).__name__}")
    y, x, sigma_y, ts = _solver_problem(y, operator3d, sigma_y, ts, process, x, generator)
    if len(operator3d.in_shape) < 2:
        raise ValueError(
            f"operator3d must act on volumes (D, *plane), got in_shape = {operator3d.in_shape}"
        )
    lam, _, rho = _tv_weights(lam, 0.0, rho)
    fixed_mu = None if mu is None else nonnegative(mu, "mu")
    n_admm, n_cg = count(n_admm, "n_admm"), count(n_cg, "n_cg")
    eta = between(eta, "eta", 0, 1)
    depth = operator3d.in_shape[0]
    if isinstance(operator3d, SliceStack):
        slice_shape = operator3d.slice_shape
    else:
        slice_shape = (1, *operator3d.in_shape[1:])

    def model3d(v: Tensor, t) -> Tensor:
        out = model2d(v.reshape(v.shape[0] * depth, *slice_shape), t)
        return out.reshape(v.shape)

    carried: list[TVState | None] = [None]

    def correct(point, x0: Tensor) -> Tensor:
        if fixed_mu is not None:
            weight = fixed_mu
        elif point.sigma == 0:
            return x0  # the denoiser is exact at sigma = 0: the proximity term wins
        else:
            weight = sigma_y**2 * (point.alpha / point.sigma) ** 2
        out, carried[0] = admm_tv(
            operator3d,
            y,
            lam,
            v=x0,
            mu=weight,
            rho=rho,
            n_iter=n_admm,
            n_cg=n_cg,
            x=x0,
            state=carried[0],
            circular=circular,
        )
        return out

    def update(k, x):
        x0 = correct(k.t, k.D(x))
        return k.ddim(x, x0, eta)

    def finish(k, x):
        return correct(k.t, k.D(x))

    return integrate(
        update, model3d, x, ts, process, generator=generator, callback=callback, finish=finish
    )


# -- MRI: data consistency at every step ---------------------------------------------------------
def _fourier(mask, x: Tensor) -> LinearOperator:
    if isinstance(mask, LinearOperator):
        return mask
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask)
        raise ValueError(
            f"mask must be a boolean (H, W) k-space mask or a LinearOperator, got mask = {got}"
        )
    if x.ndim != 4:
        raise ValueError(f"x0_hat must be images (B, C, H, W), got shape {tuple(x.shape)}")
    return FourierSubsampling(mask, channels=x.shape[1])


def data_consistency(
    x0_hat: Tensor, y: Tensor, mask, *, sigma_y: float = 0.0, spread: float | None = None
) -> Tensor:
    r"""Data consistency for Fourier subsampling (or any linear ``A``): make the estimate
    :math:`\hat x_0` agree with the measured k-space :math:`y = P F x_0 + \sigma_y n`.

    Noiseless (``sigma_y = 0``): the projection onto :math:`\{x : A x = y\}`,
    :math:`x = \hat x_0 + A^+(y - A\hat x_0)`.  For a mask closed under :math:`k \to -k` this
    *replaces* the measured k-space entries, :math:`F x = (1 - M) F\hat x_0 + P^\top y`; for
    other masks the real image's Hermitian symmetry makes :math:`A^+` average a measured
    :math:`k` with its unmeasured mirror (the exact weights of
    :class:`~diffcore.inverse.operators.FourierSubsampling`).  With noise (``sigma_y > 0``),
    the weighted version: the posterior mean when :math:`x_0 \sim \mathcal N(\hat x_0,
    s^2 I)`, ``s = spread``,

    .. math::
        x &= \arg\min_x \frac{\lVert y - A x\rVert^2}{2\sigma_y^2}
             + \frac{\lVert x - \hat x_0\rVert^2}{2 s^2} \\
          &= (A^\top A + \gamma I)^{-1}(A^\top y + \gamma\hat x_0),
          \qquad \gamma = \sigma_y^2/s^2,

    which on a symmetric mask sets each measured entry to :math:`(s^2 y_k + \sigma_y^2
    \widehat{F x}_k)/(s^2 + \sigma_y^2)` and keeps the others.  ``mask`` is a boolean ``(H, W)``
    k-space mask (centred layout, one operator over the ``C`` channels) or a
    :class:`~diffcore.inverse.operators.LinearOperator`.  Shapes: ``x0_hat`` ``(B,
    *in_shape)``, ``y`` ``(B, *out_shape)``; returns ``(B, *in_shape)``.
    """
    floating(x0_hat, "x0_hat")
    operator = _fourier(mask, x0_hat)
    operator.check_input(x0_hat, "x0_hat")
    y = _measurement(operator, y)
    sigma_y = noise_level(sigma_y, "sigma_y")
    if sigma_y == 0:
        return x0_hat + operator.pinv(y - operator(x0_hat))
    if spread is None:
        raise ValueError(
            "sigma_y > 0 needs the spread s of x0_hat (the weighted data consistency), got "
            "spread = None"
        )
    spread = nonnegative(spread, "spread")
    if spread == 0:
        return x0_hat.clone()
    gamma = (sigma_y / spread) ** 2
    return operator.normal_solve(operator.adjoint(y) + gamma * x0_hat, gamma)


def dc_sampler(
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
    conditional: bool = True,
    eta: float = 1.0,
    spread: float | None = None,
    noise_sampler: Callable | None = None,
) -> Tensor:
    r"""A (conditional) diffusion sampler with data consistency after every denoiser call, in
    the solvers' signature (MRI from undersampled k-space).

    At each time: :math:`\hat x_0 = D(x_t, t, y)` (``conditional=True``: a model trained on
    pairs, called as ``model(x, t, y)``, the exact one being :math:`\mathbb E[x_0 \mid x_t,
    y]`) or :math:`D(x_t, t)` (``conditional=False``, an unconditional prior); then
    :func:`data_consistency` (the projection for ``sigma_y = 0``; otherwise the weighted
    version with spread ``spread``, default :math:`\bar\sigma_t = \sigma_t/\alpha_t`); then the
    DDIM step (``eta = 1``: DDPM's ancestral step).  The estimate is the data-consistent
    :math:`\hat x_0` at ``ts[-1]``, after one more model call: for ``sigma_y = 0`` it satisfies
    :math:`A x = y` to round-off.  With the exact conditional denoiser every data-consistency
    step moves :math:`\hat x_0` only by round-off when ``sigma_y = 0`` (it is already
    consistent), and the sampler is the ancestral sampler of the posterior, exact as the steps
    shrink.

    Departure from the paper (a conditional DDPM with iterative data-consistency correction
    trained on fastMRI): its correction is written for its network; here it acts on the
    denoised estimate before the shared DDIM transition, for any process and any linear
    ``A``.  ``noise_sampler(i, shape)`` replaces the draws from ``generator`` (as in the
    samplers).  One model call per step, plus one.  Shapes: ``y`` ``(B, *out_shape)`` or ``(1,
    *out_shape)``; returns ``(B, *in_shape)``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(conditional, bool):
        raise TypeError(f"conditional must be True or False, got conditional = {conditional!r}")
    y, x, sigma_y, ts = _solver_problem(y, operator, sigma_y, ts, process, x, generator)
    eta = between(eta, "eta", 0, 1)
    fixed_spread = None if spread is None else positive(spread, "spread")
    net = (lambda v, t: model(v, t, y)) if conditional else model

    def consistent(point, x0: Tensor) -> Tensor:
        if sigma_y == 0:
            return data_consistency(x0, y, operator)
        if fixed_spread is not None:
            s = fixed_spread
        else:
            s = point.sigma / point.alpha
        return data_consistency(x0, y, operator, sigma_y=sigma_y, spread=s)

    def update(k, x):
        return k.ddim(x, consistent(k.t, k.D(x)), eta)

    def finish(k, x):
        return consistent(k.t, k.D(x))

    return integrate(
        update,
        net,
        x,
        ts,
        process,
        generator=generator,
        noise_sampler=noise_sampler,
        callback=callback,
        finish=finish,
    )


# -- Diff-Unfolding ---------------------------------------------------------------------------
def unrolled_posterior_mean(
    denoiser: Callable,
    x_t: Tensor,
    t: float,
    y: Tensor,
    operator: LinearOperator,
    sigma_y: float,
    process: Process,
    *,
    n_iter: int = 50,
    step: float | None = None,
    x: Tensor | None = None,
    callback: Callable | None = None,
) -> Tensor:
    r"""An unrolled proximal-gradient estimate of :math:`\mathbb E[x_0 \mid x_t, y]` built from
    the prior's denoiser (the scheme Diff-Unfolding trains).

    The posterior :math:`p(x_0 \mid x_t, y) \propto p(x_0)\,\mathcal N(x_t; \alpha_t x_0,
    \sigma_t^2 I)\,\mathcal N(y; A x_0, \sigma_y^2 I)` splits into the data term :math:`f(x) =
    \lVert A x - y\rVert^2/(2\sigma_y^2)` and :math:`g(x) = -\log p(x) + \lVert x -
    x_t/\alpha_t\rVert^2/(2\bar\sigma_t^2)`, :math:`\bar\sigma_t = \sigma_t/\alpha_t`.  The
    proximal map of :math:`\gamma g` is a denoiser: completing the square,

    .. math:: \operatorname{prox}_{\gamma g}(w) = \operatorname{prox}_{\ell^2(-\log p)}
        \Big(\ell^2\big(\tfrac{x_t/\alpha_t}{\bar\sigma_t^2} + \tfrac{w}{\gamma}\big)\Big),
        \qquad \ell^{-2} = \bar\sigma_t^{-2} + \gamma^{-1},

    and the MMSE denoiser at level :math:`\ell`, :math:`D(\alpha_\tau v, \tau)` with
    :math:`\bar\sigma_\tau = \ell` (:func:`~diffcore.inverse.pnp.noise_level_time`), stands
    in for that prox.  ``n_iter`` iterations of

    .. math:: x_{k+1} = \operatorname{prox}_{\gamma g}\big(x_k - \gamma\nabla f(x_k)\big).

    For a Gaussian prior the denoiser *is* the prox, the fixed point is the exact
    :math:`\mathbb E[x_0 \mid x_t, y]` and the error contracts with the factor
    :math:`\rho\big((I + \gamma(\Sigma^{-1} + \bar\sigma_t^{-2}))^{-1}(I - \gamma A^\top
    A/\sigma_y^2)\big) < 1` for :math:`0 < \gamma < 2\sigma_y^2/\lVert A\rVert^2`; the
    operator enters only through :math:`f`, so it can be swapped at test time.  For other
    priors the fixed point is an approximation (MMSE denoiser in place of a prox).  ``step``
    :math:`\gamma` defaults to :math:`\sigma_y^2/\lVert A\rVert^2`; start ``x`` (default
    :math:`D(x_t, t)`, the prior's estimate that ignores :math:`y`).

    Departure from the paper: Diff-Unfolding *trains* the unrolled network (a learned prior
    module per iteration, conditioned on :math:`x_t` and :math:`t`) to output the posterior
    score; here the unrolling is training-free, with the prior's own denoiser as its prox,
    so that its fixed point can be checked.  ``callback(step)`` sees each iterate (``t``: the
    level :math:`\ell`).  Shapes: ``x_t`` ``(B, *in_shape)``, ``y`` ``(B, *out_shape)``;
    returns ``(B, *in_shape)``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as D(x, t), got {type(denoiser).__name__}")
    check_operator(operator)
    check_process(process)
    t = between(float(t) if isinstance(t, Tensor) else t, "t", 0, 1, open_low=True)
    n_iter = count(n_iter, "n_iter")
    sigma_y = noise_level(sigma_y, "sigma_y")
    if sigma_y == 0:
        raise ValueError("the data term divides by sigma_y^2: give sigma_y > 0")
    operator.check_input(x_t, "x_t")
    finite(x_t, "x_t")
    y = _measurement(operator, y)
    if y.shape[0] != x_t.shape[0]:
        raise ValueError(f"y has batch {y.shape[0]} but x_t has batch {x_t.shape[0]}")
    time = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = float(process.alpha(time)), float(process.sigma(time))
    if alpha <= 0 or sigma <= 0:
        raise ValueError(
            f"need alpha_t > 0 and sigma_t > 0, got {alpha:.3g}, {sigma:.3g} at t = {t}"
        )
    if step is None:
        step = sigma_y**2 / (1.01 * operator.norm_sq())
    step = positive(step, "step")
    bar2 = (sigma / alpha) ** 2
    level2 = 1 / (1 / bar2 + 1 / step)
    tau = noise_level_time(process, math.sqrt(level2))
    alpha_tau = float(process.alpha(tau))
    at_t = time.to(dtype=x_t.dtype, device=x_t.device)
    at_tau = tau.to(dtype=x_t.dtype, device=x_t.device)
    if x is None:
        x = denoiser(x_t, at_t)
    operator.check_input(x)
    anchor = x_t / (alpha * bar2)
    for i in range(n_iter):
        w = x - step * operator.adjoint(operator(x) - y) / sigma_y**2
        x = denoiser(alpha_tau * level2 * (anchor + w / step), at_tau)
        emit(callback, Step(i, math.sqrt(level2), x, x, i + 1))
    return x


# -- RELD -------------------------------------------------------------------------------------
class LinearAutoencoder:
    r"""A linear autoencoder: :math:`E(x) = U^\top(x - m)`, :math:`\operatorname{Dec}(z) = m +
    U z`, ``basis`` :math:`U` ``(d, k)`` with orthonormal columns, and the latent variances
    ``variances`` ``(k,)`` of a Gaussian latent prior :math:`\mathcal N(0,
    \operatorname{diag}(\ell))` (:meth:`fit`: PCA).  ``shape`` is the data's per-sample shape
    (default ``(d,)``).  Shapes: :meth:`encode` ``(B, *shape) -> (B, k)``; :meth:`decode` back.
    """

    def __init__(self, mean: Tensor, basis: Tensor, variances: Tensor, shape=None):
        mean, basis, variances = (torch.as_tensor(v) for v in (mean, basis, variances))
        for v, name in ((mean, "mean"), (basis, "basis"), (variances, "variances")):
            finite(floating(v, name), name)
        if mean.ndim != 1 or basis.ndim != 2 or basis.shape[0] != mean.shape[0]:
            raise ValueError(
                f"need mean (d,) and basis (d, k), got {tuple(mean.shape)} and {tuple(basis.shape)}"
            )
        if variances.shape != (basis.shape[1],) or bool((variances <= 0).any()):
            raise ValueError(
                f"variances must be ({basis.shape[1]},) and positive, got {variances.tolist()}"
            )
        gram = basis.T @ basis
        if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-8):
            raise ValueError("basis must have orthonormal columns (basis.T @ basis = I)")
        self.mean, self.basis, self.variances = mean, basis, variances
        self.shape = (mean.shape[0],) if shape is None else tuple(shape)
        if math.prod(self.shape) != mean.shape[0]:
            raise ValueError(f"shape {self.shape} does not have d = {mean.shape[0]} entries")

    @classmethod
    def fit(cls, data: Tensor, k: int, shape=None) -> LinearAutoencoder:
        """PCA of ``data`` ``(N, *shape)``: the mean, the top ``k`` principal directions and
        their variances (unbiased, ``N - 1``)."""
        if not isinstance(data, Tensor) or data.ndim < 2 or data.shape[0] < 2:
            got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"data must be (N, ...) with N >= 2, got {got}")
        flat = finite(floating(data, "data"), "data").reshape(data.shape[0], -1)
        k = count(k, "k")
        if k > min(flat.shape):
            raise ValueError(f"k must be <= min(N, d) = {min(flat.shape)}, got k = {k}")
        mean = flat.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov(flat.T).reshape(flat.shape[1], -1))
        order = torch.argsort(evals, descending=True)[:k]
        return cls(mean, evecs[:, order], evals[order], data.shape[1:] if shape is None else shape)

    @property
    def latent_dim(self) -> int:
        """``k``."""
        return self.basis.shape[1]

    def encode(self, x: Tensor) -> Tensor:
        """:math:`U^\\top(x - m)`: ``(B, *shape) -> (B, k)``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"x must have {self.mean.shape[0]} entries per sample, got {tuple(x.shape)}"
            )
        return (flat - self.mean.to(x)) @ self.basis.to(x)

    def decode(self, z: Tensor) -> Tensor:
        """:math:`m + U z`: ``(B, k) -> (B, *shape)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be (B, {self.latent_dim}), got {tuple(z.shape)}")
        return (self.mean.to(z) + z @ self.basis.to(z).T).reshape(z.shape[0], *self.shape)


def reld(
    latent_denoiser: Callable,
    encode: Callable,
    decode: Callable,
    operator: LinearOperator,
    y: Tensor,
    sigma_y: float,
    sigma: float,
    *,
    beta: float | None = None,
    n_iter: int = 100,
    x: Tensor | None = None,
    callback: Callable | None = None,
) -> Tensor:
    r"""Regularisation by latent denoising (RELD) with half-quadratic splitting.

    The regulariser acts through a denoiser in the latent space of an autoencoder
    :math:`(E, \operatorname{Dec})`; HQS alternates

    .. math::
        x_{k+1} &= \arg\min_x \frac{\lVert y - A x\rVert^2}{2\sigma_y^2}
                   + \frac\beta2\lVert x - v_k\rVert^2 \\
                &= (A^\top A + \beta\sigma_y^2 I)^{-1}(A^\top y + \beta\sigma_y^2 v_k), \\
        v_{k+1} &= \operatorname{Dec}\big(D_\sigma(E(x_{k+1}))\big),

    the data step by ``operator.normal_solve`` (closed form or conjugate gradients), the prior
    step ``latent_denoiser(z, sigma)`` (any callable: a Wiener filter, the PnP denoiser of a
    latent diffusion model, :func:`~diffcore.inverse.pnp.diffusion_denoiser`).  ``beta``
    defaults to :math:`1/\sigma^2` (the splitting weight matched to the denoiser's level).
    With a linear autoencoder :math:`E(x) = U^\top(x - m)` and the Wiener latent denoiser of
    :math:`\mathcal N(0, \operatorname{diag}\ell)`, :math:`v = m + P(x - m)` with :math:`P =
    U\operatorname{diag}(\ell/(\ell + \sigma^2))U^\top`, every step is affine and the fixed
    point solves :math:`(A^\top A/\sigma_y^2 + \beta(I - P))(x^* - m) = A^\top(y - A m)/
    \sigma_y^2`, reached geometrically with the factor
    :math:`\rho\big(\beta(A^\top A/\sigma_y^2 + \beta I)^{-1}P\big) < 1`.

    Departures from the paper: RELD's denoiser is a latent diffusion model run for a few steps
    from the encoded iterate, with its own (fixed or decreasing) noise level and a gradient
    solver for the data step; here one level ``sigma`` throughout and an exact data step, so
    that the fixed point is closed-form.  Start ``x`` (default :math:`A^+ y`), :math:`v_0 =
    x`.  Returns the last :math:`x`; ``callback(step)`` sees each :math:`x_k` (``denoised``:
    :math:`v_k`).  Shapes: ``y`` ``(B, *out_shape)``; returns ``(B, *in_shape)``.
    """
    for fn, name in ((latent_denoiser, "latent_denoiser"), (encode, "encode"), (decode, "decode")):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    check_operator(operator)
    sigma_y = noise_level(sigma_y, "sigma_y")
    if sigma_y == 0:
        raise ValueError("the data term divides by sigma_y^2: give sigma_y > 0")
    sigma = positive(sigma, "sigma")
    beta = 1 / sigma**2 if beta is None else positive(beta, "beta")
    n_iter = count(n_iter, "n_iter")
    y = _measurement(operator, y)
    if x is None:
        x = operator.pinv(y)
    operator.check_input(x)
    finite(x, "x")
    v = x.detach().clone()
    gamma = beta * sigma_y**2
    aty = operator.adjoint(y)
    for i in range(n_iter):
        x = operator.normal_solve(aty + gamma * v, gamma)
        v = decode(latent_denoiser(encode(x), sigma))
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(
                f"decode(latent_denoiser(encode(x), sigma)) must return x's shape "
                f"{tuple(x.shape)}, got {tuple(v.shape)}"
            )
        emit(callback, Step(i, sigma, x, v, i + 1))
    return x
