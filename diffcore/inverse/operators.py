r"""Linear forward models :math:`y = A x + \sigma_y n` of imaging inverse problems.

Every operator maps a batch ``x`` of shape ``(B, *in_shape)`` to ``(B, *out_shape)`` and gives

- :meth:`~LinearOperator.forward` (also ``A(x)``) and :meth:`~LinearOperator.adjoint`
  :math:`A^\top`, exact (the dot-product test :func:`dot_test` holds to round-off);
- :meth:`~LinearOperator.pinv`, the Moore-Penrose pseudo-inverse :math:`A^+` (closed form where
  one exists, else conjugate gradients on the normal equations), so :math:`A A^+ A = A`;
- :meth:`~LinearOperator.normal_solve`, :math:`(A^\top A + \gamma I)^{-1} b`, the data step of
  proximal and half-quadratic-splitting methods;
- for operators with a simple singular value decomposition :math:`A = U S V^\top`
  (:class:`Identity`, :class:`Inpainting`, :class:`Downsample`, :class:`MatrixOperator`),
  :meth:`~LinearOperator.svd`: the singular values and :math:`V^\top`, :math:`V`,
  :math:`U^\top`, :math:`U` as functions, what DDRM works with.

The inner products are real: :math:`\langle u, v\rangle = \operatorname{Re}\sum \bar u v`.
:class:`FourierSubsampling` measures complex k-space values of a real image; as a map from real
images to :math:`\mathbb C^m \cong \mathbb R^{2m}` it is real-linear, its adjoint is
:math:`\operatorname{Re}(F^H P^\top y)`, and complex noise has real and imaginary parts of
standard deviation :math:`\sigma_y` each (:func:`measure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore.checks import (
    between,
    count,
    finite,
    float_dtype,
    floating,
    noise_level,
    positive,
    real,
    returned,
    sizes,
)

__all__ = [
    "LinearOperator",
    "check_operator",
    "SVD",
    "MatrixOperator",
    "Identity",
    "Inpainting",
    "Blur",
    "Downsample",
    "FourierSubsampling",
    "Radon",
    "random_mask",
    "box_mask",
    "gaussian_kernel",
    "motion_kernel",
    "cartesian_mask",
    "measure",
    "dot_test",
    "inner",
    "conjugate_gradient",
    "as_shape",
    "kernel_spectra",
    "fourier_filter",
]


class SVD(NamedTuple):
    r"""The pieces of :math:`A = U S V^\top`: ``s`` ``(r,)`` with ``r = min(m, d)`` (zeros allowed),
    ``Vt``: ``(B, *in_shape) -> (B, d)``, ``V``: its inverse, ``Ut``: ``(B, *out_shape) -> (B, m)``
    and ``U``: its inverse.  :math:`A x = U(\operatorname{pad}_m(s \odot V^\top x_{[:r]}))`."""

    s: Tensor
    Vt: Callable
    V: Callable
    Ut: Callable
    U: Callable


def inner(u: Tensor, v: Tensor) -> Tensor:
    """Real inner product per sample, :math:`\\operatorname{Re}\\sum \\bar u v`: ``(B, ...) -> (B,)``."""
    prod = u.conj() * v if u.is_complex() or v.is_complex() else u * v
    return prod.real.flatten(1).sum(1) if prod.is_complex() else prod.flatten(1).sum(1)


def _sq_norm(v: Tensor) -> Tensor:
    return inner(v, v)


def conjugate_gradient(
    apply: Callable, b: Tensor, x: Tensor | None = None, n_iter: int = 100, tol: float = 1e-12
) -> Tensor:
    r"""Conjugate gradients for :math:`M x = b`, :math:`M` symmetric positive semi-definite,
    each sample of the batch with its own step sizes.

    ``b`` and ``x`` must be finite, and ``apply(v)`` must return a tensor of ``v``'s shape
    (checked at every call) with finite values (read once, with the first convergence test,
    at no extra synchronisation).  Starting from ``x`` (zero by default, else of ``b``'s
    shape), ``n_iter >= 1`` iterations at most; a sample stops when its residual norm falls
    below ``tol`` (at least :math:`10^{-13}`, past which round-off drives the iteration) times
    its initial residual norm, or when its search direction has a Rayleigh quotient
    :math:`10^{12}` times below the largest seen (the numerical null space of a singular
    :math:`M`, where a step would amplify round-off).  From ``x = 0`` on a consistent system
    with singular :math:`M` the iterates stay in the range of :math:`M`: the limit is the
    minimum-norm solution.  Shapes: ``b``, ``x`` ``(B, ...)``; returns ``(B, ...)``.
    """
    if not callable(apply):
        raise TypeError(f"apply must be a function v -> M v, got {type(apply).__name__}")
    finite(b, "b")
    if b.ndim < 1 or b.shape[0] == 0:
        raise ValueError(f"b must be a batch (B, ...) with B >= 1, got b of shape {tuple(b.shape)}")
    if x is not None:
        finite(x, "x")
        if x.shape != b.shape:
            raise ValueError(
                f"x must have the shape of b, {tuple(b.shape)}, got x of shape {tuple(x.shape)}"
            )
    n_iter = count(n_iter, "n_iter")
    tol = real(tol, "tol")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got tol = {tol!r}")
    x = torch.zeros_like(b) if x is None else x.clone()
    r = b - returned(apply(x), x, "apply")
    p = r.clone()
    rs = _sq_norm(r)
    stop = max(tol, 1e-13) ** 2 * rs
    shape = (-1,) + (1,) * (b.ndim - 1)
    largest = torch.zeros_like(rs)  # the largest Rayleigh quotient p^T M p / p^T p seen
    for i in range(n_iter):
        active = rs > stop
        if i == 0:  # the first test also reads back whether M x was finite
            any_active, finite_start = torch.stack(
                [active.any(), torch.isfinite(rs).all()]
            ).tolist()
            if not finite_start:
                raise ValueError(
                    "apply must return finite values, got NaN or infinite entries in apply(x)"
                )
            if not any_active:
                break
        elif not bool(active.any()):
            break
        mp = returned(apply(p), p, "apply")
        curvature = inner(p, mp)
        quotient = curvature / _sq_norm(p).clamp(min=1e-300)
        largest = torch.maximum(largest, quotient)
        active = active & (quotient > 1e-12 * largest)
        step = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = x + step.reshape(shape) * p
        r = r - step.reshape(shape) * mp
        rs_new = _sq_norm(r)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        p = r + beta.reshape(shape) * p
        rs = torch.where(active, rs_new, 0.0)
    return x


class LinearOperator:
    """A linear map from ``(B, *in_shape)`` to ``(B, *out_shape)``; subclasses write
    ``_forward`` and ``_adjoint``, and override :meth:`pinv`, :meth:`normal_solve` and
    :meth:`svd` where a closed form exists."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    complex_output: bool = False
    cg_iters: int = 500  # for the conjugate-gradient defaults of pinv and normal_solve
    cg_tol: float = 1e-12

    # -- to write in a subclass ------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    # -- checked public maps ---------------------------------------------------------------
    def check_shape(self, v: Tensor, shape: tuple[int, ...], name: str) -> None:
        """``v`` of shape ``(batch, *shape)`` and of a dtype diffcore computes in; ``name`` is
        the argument (``"in"`` and ``"out"`` stand for ``x`` and ``y``).  Reads no values."""
        arg = {"in": "x", "out": "y"}.get(name, name)
        if name in ("in", "out"):
            which = name
        else:
            which = "in" if shape == self.in_shape else "out"
        floating(v, arg, complex_ok=which == "out" and self.complex_output)
        if v.ndim != len(shape) + 1 or tuple(v.shape[1:]) != shape:
            raise ValueError(
                f"{arg} must have shape (batch, *{which}_shape) = "
                f"(batch, {', '.join(map(str, shape))}) for {type(self).__name__}, got "
                f"{tuple(v.shape)}"
            )

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """Check that ``x`` is an input of this operator: a float32 or float64 tensor
        ``(B, *in_shape)``.  Reads no values (no synchronisation).  Returns ``x``."""
        self.check_shape(x, self.in_shape, name)
        return x

    def check_output(self, y: Tensor, name: str = "y") -> Tensor:
        """Check that ``y`` is a measurement of this operator: a float32 or float64 (or complex)
        tensor ``(B, *out_shape)``.  Reads no values (no synchronisation).  Returns ``y``."""
        self.check_shape(y, self.out_shape, name)
        return y

    def forward(self, x: Tensor) -> Tensor:
        """:math:`A x`: ``(B, *in_shape) -> (B, *out_shape)``."""
        self.check_shape(x, self.in_shape, "in")
        return self._forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        """:math:`A^\\top y` (real adjoint): ``(B, *out_shape) -> (B, *in_shape)``."""
        self.check_shape(y, self.out_shape, "out")
        return self._adjoint(y)

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def normal(self, x: Tensor) -> Tensor:
        """:math:`A^\\top A x`: ``(B, *in_shape) -> (B, *in_shape)``."""
        return self.adjoint(self.forward(x))

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        """:math:`(A^\\top A + \\gamma I)^{-1} b` for ``gamma > 0`` (conjugate gradients here).

        Shapes: ``b`` ``(B, *in_shape)``; returns the same.
        """
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        return conjugate_gradient(
            lambda v: self.normal(v) + gamma * v, b, n_iter=self.cg_iters, tol=self.cg_tol
        )

    def pinv(self, y: Tensor) -> Tensor:
        """:math:`A^+ y`, the minimum-norm least-squares solution (conjugate gradients on
        :math:`A^\\top A x = A^\\top y` from 0 here).  Shapes: ``(B, *out_shape) -> (B, *in_shape)``."""
        return conjugate_gradient(
            self.normal, self.adjoint(y), n_iter=self.cg_iters, tol=self.cg_tol
        )

    def norm_sq(self, n_iter: int = 200, dtype: torch.dtype = torch.float64) -> float:
        """:math:`\\lVert A\\rVert_2^2`, the largest eigenvalue of :math:`A^\\top A`, by the power
        method from a fixed start (the Lipschitz constant of the gradient of
        :math:`\\tfrac12\\lVert y - Ax\\rVert^2`); a lower estimate that converges from below.
        ``n_iter >= 1`` iterations in ``dtype`` (float32 or float64)."""
        n_iter = count(n_iter, "n_iter")
        dtype = float_dtype(dtype)
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(1, *self.in_shape, generator=gen, dtype=dtype)
        value = 0.0
        for _ in range(n_iter):
            v = v / _sq_norm(v).sqrt().reshape(1, *([1] * len(self.in_shape)))
            w = self.normal(v)
            value = float(inner(v, w))
            v = w
        return value

    @property
    def has_svd(self) -> bool:
        """Whether :meth:`svd` gives the pieces of a singular value decomposition."""
        return False

    def svd(self) -> SVD:
        """The pieces of :math:`A = U S V^\\top` (see :class:`SVD`)."""
        raise ValueError(
            f"{type(self).__name__} has no SVD in diffcore; SVD-based solvers (ddrm) need "
            f"Identity, Inpainting, Downsample or MatrixOperator"
        )

    @property
    def in_dim(self) -> int:
        """The number of entries of one input, ``prod(in_shape)``."""
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        """The number of entries of one measurement, ``prod(out_shape)``."""
        return math.prod(self.out_shape)

    def to_dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The matrix of :math:`A`, ``(out_dim, in_dim)`` (complex for complex output), built by
        applying :meth:`forward` to the standard basis; for small problems."""
        basis = torch.eye(self.in_dim, dtype=dtype).reshape(self.in_dim, *self.in_shape)
        return self.forward(basis).reshape(self.in_dim, self.out_dim).T

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={self.in_shape}, out_shape={self.out_shape})"


def check_operator(operator, name: str = "operator") -> LinearOperator:
    """``operator`` checked to be a :class:`LinearOperator` (``TypeError`` naming it otherwise)."""
    if not isinstance(operator, LinearOperator):
        raise TypeError(
            f"{name} must be a diffcore.inverse.operators.LinearOperator, got "
            f"{type(operator).__name__}"
        )
    return operator


def as_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """``shape`` checked to be a non-empty tuple of positive integers (or one integer), as a
    tuple: the ``in_shape`` and ``out_shape`` of an operator."""
    return sizes(shape, name)


# -- dense ---------------------------------------------------------------------------------------
class MatrixOperator(LinearOperator):
    """A dense matrix ``(m, d)`` acting on ``(B, d)`` (or on ``(B, *in_shape)`` with
    ``prod(in_shape) = d``): the small problems of the exact-posterior tests."""

    def __init__(self, matrix: Tensor, in_shape=None):
        matrix = finite(floating(torch.as_tensor(matrix), "matrix"), "matrix")
        if matrix.ndim != 2:
            raise ValueError(
                f"matrix must be a 2-D tensor (m, d), got matrix of shape {tuple(matrix.shape)}"
            )
        self.matrix = matrix
        m, d = matrix.shape
        self.in_shape = (d,) if in_shape is None else as_shape(in_shape, "in_shape")
        if math.prod(self.in_shape) != d:
            raise ValueError(f"in_shape {self.in_shape} does not have d = {d} entries")
        self.out_shape = (m,)
        self._svd = None

    def _on(self, v: Tensor) -> Tensor:
        return self.matrix.to(dtype=v.dtype, device=v.device)

    def _forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ self._on(x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        return (y @ self._on(y)).reshape(y.shape[0], *self.in_shape)

    def _factors(self):
        if self._svd is None:
            self._svd = torch.linalg.svd(self.matrix, full_matrices=True)
        return self._svd

    def pinv(self, y: Tensor) -> Tensor:
        self.check_shape(y, self.out_shape, "out")
        u, s, vh = (f.to(dtype=y.dtype, device=y.device) for f in self._factors())
        cut = s.amax() * max(self.matrix.shape) * torch.finfo(s.dtype).eps  # numpy's rcond
        inv = torch.where(s > cut, 1 / s.clamp(min=1e-300), 0.0)
        r = s.shape[0]
        coef = (y @ u[:, :r]) * inv
        return (coef @ vh[:r]).reshape(y.shape[0], *self.in_shape)

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        a = self._on(b)
        gram = a.T @ a + gamma * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        return torch.linalg.solve(gram, b.reshape(b.shape[0], -1).T).T.reshape(b.shape)

    @property
    def has_svd(self) -> bool:
        return True

    def svd(self) -> SVD:
        u, s, vh = self._factors()
        shape = self.in_shape

        def on(f, v):
            return f.to(dtype=v.dtype, device=v.device)

        return SVD(
            s=s,
            Vt=lambda x: x.reshape(x.shape[0], -1) @ on(vh, x).T,
            V=lambda c: (c @ on(vh, c)).reshape(c.shape[0], *shape),
            Ut=lambda y: y @ on(u, y),
            U=lambda c: c @ on(u, c).T,
        )


# -- denoising and inpainting --------------------------------------------------------------------
class Identity(LinearOperator):
    """:math:`A = I`: denoising.  ``shape`` is ``in_shape = out_shape``."""

    def __init__(self, shape):
        self.in_shape = self.out_shape = as_shape(shape)

    def _forward(self, x: Tensor) -> Tensor:
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        return y

    def pinv(self, y: Tensor) -> Tensor:
        self.check_shape(y, self.out_shape, "out")
        return y

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        return b / (1 + gamma)

    @property
    def has_svd(self) -> bool:
        return True

    def svd(self) -> SVD:
        shape = self.in_shape

        def flat(v):
            return v.reshape(v.shape[0], -1)

        def back(c):
            return c.reshape(c.shape[0], *shape)

        return SVD(torch.ones(self.in_dim, dtype=torch.float64), flat, back, flat, back)


def random_mask(shape, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """A mask of ``shape`` that keeps ``round(keep * numel)`` entries chosen uniformly at random
    (True = observed); for images ``(C, H, W)`` use ``(1, H, W)`` and ``expand``, or give the
    full shape to mask channels independently."""
    shape = as_shape(shape)
    keep = between(keep, "keep", 0, 1, open_low=True)
    n = math.prod(shape)
    order = torch.randperm(n, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: max(1, round(keep * n))]] = True
    return mask.reshape(shape)


def box_mask(shape, top: int, left: int, height: int, width: int) -> Tensor:
    """A mask of ``shape = (..., H, W)`` that hides the box ``[top, top + height) x [left, left +
    width)`` in every channel (False there, True elsewhere)."""
    shape = as_shape(shape)
    if len(shape) < 2:
        raise ValueError(f"box_mask needs a shape (..., H, W), got shape = {shape}")
    top, left = count(top, "top", low=0), count(left, "left", low=0)
    height, width = count(height, "height"), count(width, "width")
    h, w = shape[-2:]
    if not (0 <= top < top + height <= h and 0 <= left < left + width <= w):
        raise ValueError(
            f"the box top={top}, left={left}, height={height}, width={width} must lie inside "
            f"the image of size {h} x {w}"
        )
    mask = torch.ones(shape, dtype=torch.bool)
    mask[..., top : top + height, left : left + width] = False
    return mask


class Inpainting(LinearOperator):
    r"""Keep the entries where ``mask`` is True: :math:`y = x_{\text{mask}}`, shape ``(m,)``.

    ``mask`` is a boolean tensor of ``in_shape`` (:func:`random_mask`, :func:`box_mask`).
    :math:`A A^\top = I`, so :math:`A^+ = A^\top` (zero filling); the SVD has :math:`s = 1`,
    :math:`U = I` and :math:`V^\top` the permutation that lists kept entries first.
    """

    def __init__(self, mask: Tensor):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.ndim < 1:
            raise ValueError(
                f"mask must be a boolean tensor of at least one dimension, got mask of dtype "
                f"{mask.dtype} and shape {tuple(mask.shape)}"
            )
        if not bool(mask.any()):
            raise ValueError("mask keeps no entry: it must have at least one True")
        self.mask = mask
        self.in_shape = tuple(mask.shape)
        flat = mask.reshape(-1)
        self.kept = torch.nonzero(flat).reshape(-1)
        self.missing = torch.nonzero(~flat).reshape(-1)
        self.out_shape = (self.kept.numel(),)

    def _forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)[:, self.kept.to(x.device)]

    def _adjoint(self, y: Tensor) -> Tensor:
        x = y.new_zeros(y.shape[0], self.in_dim)
        x[:, self.kept.to(y.device)] = y
        return x.reshape(y.shape[0], *self.in_shape)

    def pinv(self, y: Tensor) -> Tensor:
        return self.adjoint(y)

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        return b / (self.mask.to(dtype=b.dtype, device=b.device) + gamma)

    @property
    def has_svd(self) -> bool:
        return True

    def svd(self) -> SVD:
        order = torch.cat([self.kept, self.missing])
        inverse = torch.argsort(order)
        shape = self.in_shape

        def vt(x):
            return x.reshape(x.shape[0], -1)[:, order.to(x.device)]

        def v(c):
            return c[:, inverse.to(c.device)].reshape(c.shape[0], *shape)

        return SVD(torch.ones(self.out_dim, dtype=torch.float64), vt, v, _ident, _ident)


def _ident(v: Tensor) -> Tensor:
    return v


# -- blur ----------------------------------------------------------------------------------------
def gaussian_kernel(size: int, std: float) -> Tensor:
    """A normalised ``size x size`` Gaussian kernel (``size`` odd), float64."""
    _odd_size(size)
    std = positive(std, "std")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (r / std) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def motion_kernel(size: int, angle: float, length: float | None = None) -> Tensor:
    """A normalised ``size x size`` linear motion-blur kernel: a segment of ``length`` pixels
    (default ``size``) through the centre at ``angle`` degrees (counter-clockwise from the
    horizontal), drawn with bilinear weights at sub-pixel sample points, float64."""
    _odd_size(size)
    angle = real(angle, "angle")
    length = float(size) if length is None else positive(length, "length")
    if length > size:
        raise ValueError(f"length must be at most size = {size}, got length = {length}")
    theta = math.radians(angle)
    u = torch.linspace(-0.5, 0.5, 8 * size + 1, dtype=torch.float64) * (length - 1)
    c = size // 2
    cols, rows = c + u * math.cos(theta), c - u * math.sin(theta)
    k = torch.zeros(size, size, dtype=torch.float64)
    r0, c0 = rows.floor(), cols.floor()
    for dr in (0, 1):
        for dc in (0, 1):
            rr, cc = r0 + dr, c0 + dc
            w = (1 - (rows - rr).abs()) * (1 - (cols - cc).abs())
            inside = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            k.index_put_((rr[inside].long(), cc[inside].long()), w[inside], accumulate=True)
    return k / k.sum()


def _odd_size(size) -> int:
    if count(size, "size") % 2 == 0:
        raise ValueError(f"size must be an odd positive integer, got size = {size!r}")
    return size


def kernel_spectra(kernels: Tensor, size: tuple[int, int]) -> Tensor:
    """The rFFT of each kernel (odd sizes), zero-padded to ``size`` and centred at pixel (0, 0),
    the circular-convolution convention of :class:`Blur`: ``(B, kh, kw) -> (B, H, W // 2 + 1)``."""
    kh, kw = kernels.shape[-2:]
    padded = kernels.new_zeros(kernels.shape[0], *size)
    padded[:, :kh, :kw] = kernels
    padded = torch.roll(padded, (-(kh // 2), -(kw // 2)), (1, 2))
    return torch.fft.rfft2(padded)


def fourier_filter(v: Tensor, gain: Tensor) -> Tensor:
    """``v`` ``(..., H, W)`` multiplied by ``gain`` in the rFFT domain, back in ``v``'s dtype.

    Shapes: ``gain`` broadcasts against ``(..., H, W // 2 + 1)``; returns the shape of ``v``.
    """
    return torch.fft.irfft2(torch.fft.rfft2(v) * gain, s=v.shape[-2:]).to(v.dtype)


# the names other modules import today


class Blur(LinearOperator):
    r"""Circular convolution with ``kernel`` ``(k1, k2)`` (odd sizes, centred), by the FFT.

    ``in_shape = out_shape = (C, H, W)``; every channel is blurred by the same kernel.  In the
    Fourier basis :math:`A = F^H \operatorname{diag}(\hat h) F`, so :math:`A^\top` multiplies by
    :math:`\bar{\hat h}`, :math:`(A^\top A + \gamma I)^{-1}` divides by :math:`|\hat h|^2 + \gamma`
    and :math:`A^+` by :math:`\hat h` where :math:`|\hat h| > 10^{-10}\max|\hat h|` (0 elsewhere:
    a frequency damped below that is treated as lost).
    """

    rcond = 1e-10

    def __init__(self, kernel: Tensor, in_shape):
        kernel = torch.as_tensor(kernel)
        finite(floating(kernel, "kernel"), "kernel")
        self.in_shape = self.out_shape = as_shape(in_shape, "in_shape")
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {self.in_shape}")
        _, h, w = self.in_shape
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel must be 2-D with odd sizes, got {tuple(kernel.shape)}")
        if kernel.shape[0] > h or kernel.shape[1] > w:
            raise ValueError(f"kernel {tuple(kernel.shape)} is larger than the image {h} x {w}")
        self.kernel = kernel.to(torch.float64)
        self.spectrum = kernel_spectra(self.kernel[None], (h, w))[0]  # (H, W // 2 + 1)

    def _spec(self, v: Tensor) -> Tensor:
        return self.spectrum.to(
            device=v.device, dtype=torch.promote_types(v.dtype, torch.complex64)
        )

    def _forward(self, x: Tensor) -> Tensor:
        return fourier_filter(x, self._spec(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        return fourier_filter(y, self._spec(y).conj())

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        return fourier_filter(b, 1 / (self._spec(b).abs() ** 2 + gamma))

    def pinv(self, y: Tensor) -> Tensor:
        self.check_shape(y, self.out_shape, "out")
        h = self._spec(y)
        keep = h.abs() > self.rcond * h.abs().amax()
        return fourier_filter(y, torch.where(keep, 1 / torch.where(keep, h, 1), 0))


# -- super-resolution ----------------------------------------------------------------------------
class Downsample(LinearOperator):
    r"""Average pooling by ``factor`` :math:`f`: ``(C, H, W) -> (C, H/f, W/f)``.

    Each :math:`f \times f` block is averaged, :math:`A A^\top = f^{-2} I`, so
    :math:`A^+ = f^2 A^\top` (nearest-neighbour upsampling).  SVD: per block an orthonormal
    basis whose first vector is the normalised constant :math:`\mathbf 1/f`; every singular value
    is :math:`1/f`, :math:`U = I`, and :math:`V^\top` lists the block means (times :math:`f`)
    first, then the other in-block coordinates.
    """

    def __init__(self, in_shape, factor: int):
        self.in_shape = as_shape(in_shape, "in_shape")
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got in_shape = {self.in_shape}")
        factor = count(factor, "factor")
        c, h, w = self.in_shape
        if h % factor or w % factor:
            raise ValueError(f"factor = {factor} must divide the image size {h} x {w}")
        self.factor = factor
        self.out_shape = (c, h // factor, w // factor)
        basis = torch.eye(factor * factor, dtype=torch.float64)
        basis[:, 0] = 1.0
        q, _ = torch.linalg.qr(basis)
        self._block_basis = q * torch.sign(q[0, 0])  # columns: orthonormal, first = 1 / f

    def _forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def _adjoint(self, y: Tensor) -> Tensor:
        f = self.factor
        return y.repeat_interleave(f, -2).repeat_interleave(f, -1) / f**2

    def pinv(self, y: Tensor) -> Tensor:
        return self.adjoint(y) * self.factor**2

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        # A^T A = P / f^2 with P the block-mean projection: invert on range(P) and its complement
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        f = self.factor
        mean = self._adjoint(self._forward(b)) * f**2  # P b
        return (b - mean) / gamma + mean / (1 / f**2 + gamma)

    @property
    def has_svd(self) -> bool:
        return True

    def _blocks(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H/f, W/f, f^2)``."""
        b, c, h, w = x.shape
        f = self.factor
        return (
            x.reshape(b, c, h // f, f, w // f, f)
            .permute(0, 1, 2, 4, 3, 5)
            .reshape(b, c, h // f, w // f, f * f)
        )

    def _unblocks(self, z: Tensor) -> Tensor:
        b = z.shape[0]
        c, h, w = self.in_shape
        f = self.factor
        return z.reshape(b, c, h // f, w // f, f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    def svd(self) -> SVD:
        m = self.out_dim
        out_shape = self.out_shape

        def basis(v):
            return self._block_basis.to(dtype=v.dtype, device=v.device)

        def vt(x):
            coef = self._blocks(x) @ basis(x)  # (B, C, h, w, f^2)
            return torch.cat([coef[..., 0].flatten(1), coef[..., 1:].flatten(1)], dim=1)

        def v(c):
            first = c[:, :m].reshape(c.shape[0], *out_shape, 1)
            rest = c[:, m:].reshape(c.shape[0], *out_shape, self.factor**2 - 1)
            return self._unblocks(torch.cat([first, rest], dim=-1) @ basis(c).T)

        def ut(y):
            return y.reshape(y.shape[0], -1)

        def u(c):
            return c.reshape(c.shape[0], *out_shape)

        return SVD(torch.full((m,), 1.0 / self.factor, dtype=torch.float64), vt, v, ut, u)


# -- MRI -----------------------------------------------------------------------------------------
def cartesian_mask(
    shape, acceleration: float, center_fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    r"""A Cartesian k-space mask ``(H, W)`` in the centred layout (zero frequency at
    ``(H // 2, W // 2)``): whole columns (phase-encoding lines) are kept, the
    ``round(W * center_fraction)`` central ones always, and others chosen uniformly at random
    until ``round(W / acceleration)`` columns are kept."""
    shape = as_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got shape = {shape}")
    h, w = shape
    acceleration = real(acceleration, "acceleration")
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got acceleration = {acceleration!r}")
    center_fraction = between(center_fraction, "center_fraction", 0, 1, open_low=True)
    n_center = max(1, round(w * center_fraction))
    n_total = max(n_center, round(w / acceleration))
    start = w // 2 - n_center // 2
    cols = torch.zeros(w, dtype=torch.bool)
    cols[start : start + n_center] = True
    others = torch.nonzero(~cols).reshape(-1)
    pick = torch.randperm(others.numel(), generator=generator)[: n_total - n_center]
    cols[others[pick]] = True
    return cols[None, :].expand(h, w).clone()


class FourierSubsampling(LinearOperator):
    r"""Single-coil MRI: the orthonormal 2-D FFT of a real image, sampled on ``mask``.

    ``mask`` ``(H, W)`` is boolean in the centred layout (:func:`cartesian_mask`); ``in_shape =
    (channels, H, W)``, ``out_shape = (channels, m)`` complex.  :math:`y = P F x` with
    :math:`F` unitary, so :math:`A A^H = I` as a complex map.  For real :math:`x` the real
    adjoint is :math:`\operatorname{Re}(F^H P^\top y)` and :math:`A^\top A = F^H W F` with
    :math:`W_k = (M_k + M_{-k})/2 \in \{0, \tfrac12, 1\}` (a real image has Hermitian
    k-space, so sampling :math:`k` also tells :math:`-k`).  Hence :math:`A^+ = F^H W^+ F A^\top`
    and :math:`(A^\top A + \gamma)^{-1} = F^H (W + \gamma)^{-1} F`, both exact.
    """

    complex_output = True

    def __init__(self, mask: Tensor, channels: int = 1):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(
                f"mask must be a boolean (H, W) tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        if not bool(mask.any()):
            raise ValueError("mask keeps no k-space sample")
        channels = count(channels, "channels")
        self.mask = mask
        self.in_shape = (channels, *mask.shape)
        self.out_shape = (channels, int(mask.sum()))
        unshifted = torch.fft.ifftshift(mask.to(torch.float64))
        mirrored = torch.roll(torch.flip(unshifted, (0, 1)), (1, 1), (0, 1))  # M_{-k}
        self.weight = 0.5 * (unshifted + mirrored)  # W in the unshifted layout

    def _fft(self, x: Tensor) -> Tensor:
        return torch.fft.fft2(x, norm="ortho")

    def _ifft_real(self, k: Tensor, dtype) -> Tensor:
        return torch.fft.ifft2(k, norm="ortho").real.to(dtype)

    def _forward(self, x: Tensor) -> Tensor:
        k = torch.fft.fftshift(self._fft(x), dim=(-2, -1))
        return k[..., self.mask.to(x.device)]

    def _adjoint(self, y: Tensor) -> Tensor:
        c, h, w = self.in_shape
        k = torch.zeros(
            y.shape[0],
            c,
            h,
            w,
            dtype=y.dtype if y.is_complex() else torch.complex128,
            device=y.device,
        )
        k[..., self.mask.to(y.device)] = y
        real = y.real.dtype if y.is_complex() else y.dtype
        return self._ifft_real(torch.fft.ifftshift(k, dim=(-2, -1)), real)

    def _weighted(self, x: Tensor, gain: Tensor) -> Tensor:
        return self._ifft_real(self._fft(x) * gain.to(device=x.device), x.dtype)

    def pinv(self, y: Tensor) -> Tensor:
        self.check_shape(y, self.out_shape, "out")
        w = self.weight
        return self._weighted(self._adjoint(y), torch.where(w > 0, 1 / w.clamp(min=0.5), 0.0))

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(gamma, "gamma")
        self.check_shape(b, self.in_shape, "in")
        return self._weighted(b, 1 / (self.weight + gamma))


# -- CT ------------------------------------------------------------------------------------------
class Radon(LinearOperator):
    r"""Parallel-beam Radon transform of ``size x size`` images at ``angles`` (degrees), as a
    sparse matrix: ``(1, size, size) -> (n_detectors, n_angles)``.

    The projector is the one of ``skimage.transform.radon``: for each angle the (zero-padded
    when ``circle=False``) image is rotated about pixel ``(P // 2, P // 2)`` with bilinear
    interpolation and zero outside, and its columns are summed.  Written as a matrix, it agrees
    with scikit-image to round-off, and the adjoint is its exact transpose (unfiltered
    back-projection).  With ``circle=True`` the image should vanish outside the inscribed
    circle, as scikit-image assumes.  Pseudo-inverse and data steps use conjugate gradients.
    """

    def __init__(self, size: int, angles, circle: bool = True):
        size = count(size, "size", low=2)
        angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
        if angles.numel() == 0 or not bool(torch.isfinite(angles).all()):
            raise ValueError(f"angles must be a non-empty list of finite degrees, got {angles}")
        self.size, self.angles, self.circle = size, angles, bool(circle)
        if circle:
            padded, before = size, 0
        else:
            pad = math.ceil(math.sqrt(2) * size - size)
            padded = size + pad
            before = (size + pad) // 2 - size // 2
        self.in_shape = (1, size, size)
        self.out_shape = (padded, angles.numel())
        self.matrix = self._build(padded, before)
        self.matrix_t = self.matrix.t().coalesce()

    def _build(self, p: int, before: int) -> Tensor:
        n_angles = self.angles.numel()
        center = p // 2
        r, c = torch.meshgrid(
            torch.arange(p, dtype=torch.float64),
            torch.arange(p, dtype=torch.float64),
            indexing="ij",
        )
        rows_out, cols_in, values = [], [], []
        for a, theta in enumerate(torch.deg2rad(self.angles).tolist()):
            cos, sin = math.cos(theta), math.sin(theta)
            # output pixel (r, c) reads the input at (r_in, c_in): scikit-image's rotation
            c_in = cos * (c - center) + sin * (r - center) + center
            r_in = -sin * (c - center) + cos * (r - center) + center
            r0, c0 = torch.floor(r_in), torch.floor(c_in)
            fr, fc = r_in - r0, c_in - c0
            for dr, dc, w in (
                (0, 0, (1 - fr) * (1 - fc)),
                (0, 1, (1 - fr) * fc),
                (1, 0, fr * (1 - fc)),
                (1, 1, fr * fc),
            ):
                rr, cc = (r0 + dr).long() - before, (c0 + dc).long() - before
                inside = (rr >= 0) & (rr < self.size) & (cc >= 0) & (cc < self.size) & (w != 0)
                rows_out.append((c.long() * n_angles + a)[inside])  # detector = output column
                cols_in.append((rr * self.size + cc)[inside])
                values.append(w[inside])
        index = torch.stack([torch.cat(rows_out), torch.cat(cols_in)])
        shape = (p * n_angles, self.size * self.size)
        return torch.sparse_coo_tensor(
            index, torch.cat(values), shape, check_invariants=False
        ).coalesce()

    def _apply(self, mat: Tensor, v: Tensor) -> Tensor:
        mat = mat.to(dtype=v.dtype, device=v.device)
        return torch.sparse.mm(mat, v.reshape(v.shape[0], -1).T).T

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply(self.matrix, x).reshape(x.shape[0], *self.out_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply(self.matrix_t, y).reshape(y.shape[0], *self.in_shape)


# -- measurement and checks ----------------------------------------------------------------------
def measure(
    operator: LinearOperator, x: Tensor, sigma_y: float, generator: torch.Generator | None = None
) -> Tensor:
    r""":math:`y = A x + \sigma_y n`, :math:`n` standard normal (for complex output, real and
    imaginary parts each standard normal).  Shapes: ``x`` ``(B, *in_shape)``; returns
    ``(B, *out_shape)``."""
    sigma_y = noise_level(sigma_y, "sigma_y")
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"operator must be a LinearOperator, got {type(operator).__name__}")
    operator.check_input(x)
    finite(x, "x")
    clean = operator(x)
    if sigma_y == 0:
        return clean
    if clean.is_complex():
        real = clean.real
        noise = torch.complex(
            torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device),
            torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device),
        )
    else:
        noise = torch.randn(
            clean.shape, generator=generator, dtype=clean.dtype, device=clean.device
        )
    return clean + sigma_y * noise


def dot_test(
    operator: LinearOperator, generator: torch.Generator | None = None, batch: int = 3
) -> float:
    r"""The largest relative gap :math:`|\langle A x, y\rangle - \langle x, A^\top y\rangle| /
    (\lVert A x\rVert \lVert y\rVert)` over ``batch`` random pairs in float64: round-off
    (~1e-15) for a correct adjoint."""
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"operator must be a LinearOperator, got {type(operator).__name__}")
    batch = count(batch, "batch")
    x = torch.randn(batch, *operator.in_shape, generator=generator, dtype=torch.float64)
    real = torch.randn(batch, *operator.out_shape, generator=generator, dtype=torch.float64)
    if operator.complex_output:
        imag = torch.randn(batch, *operator.out_shape, generator=generator, dtype=torch.float64)
        y = torch.complex(real, imag)
    else:
        y = real
    ax = operator(x)
    gap = (inner(ax, y) - inner(x, operator.adjoint(y))).abs()
    scale = _sq_norm(ax).sqrt() * _sq_norm(y).sqrt()
    return float((gap / scale).amax())
