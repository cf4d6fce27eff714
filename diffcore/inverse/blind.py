r"""Blind deblurring, :math:`y = k \circledast x + \sigma_y n` with the image :math:`x` *and* the
kernel :math:`k` unknown, solved by Blind-PnPDM (Li, Gan & Kamilov, 2025).

The measurement is bilinear: linear in :math:`x` for a fixed kernel (:class:`ImageBlur`) and
linear in :math:`k` for a fixed image (:class:`KernelBlur`).  Each batch entry carries its own
kernel (resp. image), so that a batch of chains runs at once.  :func:`blind_pnp_dm` alternates
PnP-DM's likelihood and prior steps (:mod:`diffcore.inverse.pnp`) on the image and on the kernel,
with one denoising prior for each.

Convolution is circular, with odd kernel sizes centred as in
:class:`~diffcore.inverse.operators.Blur`.  Shapes: images ``(B, C, H, W)``, kernels ``(B, kh, kw)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.checks import noise_level, positive
from diffcore.inverse.operators import (
    LinearOperator,
    as_shape,
    fourier_filter,
    kernel_spectra,
)
from diffcore.inverse.pnp import likelihood_step
from diffcore.stepping import Step, emit

__all__ = ["ImageBlur", "KernelBlur", "blind_pnp_dm"]


def _kernel_shape(shape) -> tuple[int, int]:
    shape = as_shape(shape, "kernel_shape")
    if len(shape) != 2 or shape[0] % 2 == 0 or shape[1] % 2 == 0:
        raise ValueError(f"kernel_shape must be two odd sizes (kh, kw), got {shape}")
    return shape


class _PerEntry(LinearOperator):
    """An operator whose batch entries each carry their own parameters (``batch`` of them)."""

    batch: int
    entry: str

    def check_shape(self, v: Tensor, shape: tuple[int, ...], name: str) -> None:
        super().check_shape(v, shape, name)
        if v.shape[0] != self.batch:
            raise ValueError(
                f"{name} must have one entry per {self.entry} ({self.batch}), got batch "
                f"{v.shape[0]}"
            )


class ImageBlur(_PerEntry):
    r""":math:`x \mapsto k_b \circledast x` with kernel :math:`k_b` for batch entry :math:`b`,
    diagonal in the Fourier basis: :math:`A^\top` multiplies by :math:`\bar{\hat k}_b` and
    :math:`(A^\top A + \gamma I)^{-1}` divides by :math:`|\hat k_b|^2 + \gamma`.  ``kernels``
    ``(B, kh, kw)``; ``in_shape = out_shape = (C, H, W)``; inputs must have batch ``B``."""

    def __init__(self, kernels: Tensor, in_shape):
        self.in_shape = self.out_shape = as_shape(in_shape, "in_shape")
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {self.in_shape}")
        if not isinstance(kernels, Tensor) or kernels.ndim != 3:
            got = tuple(kernels.shape) if isinstance(kernels, Tensor) else type(kernels).__name__
            raise ValueError(f"kernels must be (B, kh, kw), got {got}")
        _kernel_shape(kernels.shape[1:])
        if kernels.shape[1] > self.in_shape[1] or kernels.shape[2] > self.in_shape[2]:
            raise ValueError(f"kernels {tuple(kernels.shape[1:])} exceed the image {self.in_shape}")
        self.kernels = kernels
        self.spectrum = kernel_spectra(kernels, self.in_shape[1:])[:, None]  # (B, 1, H, W//2+1)
        self.batch, self.entry = kernels.shape[0], "kernel"

    def _forward(self, x: Tensor) -> Tensor:
        return fourier_filter(x, self.spectrum)

    def _adjoint(self, y: Tensor) -> Tensor:
        return fourier_filter(y, self.spectrum.conj())

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(float(gamma), "gamma")
        self.check_shape(b, self.in_shape, "in")
        return fourier_filter(b, 1 / (self.spectrum.abs() ** 2 + gamma))


class KernelBlur(_PerEntry):
    r""":math:`k \mapsto k \circledast x_b` with image :math:`x_b` for batch entry :math:`b`: the
    same measurement, read as linear in the kernel.  Its matrix :math:`X_b` (pixels by taps) has
    one column per tap, the image shifted to that tap, so :math:`(X_b^\top X_b + \gamma I)^{-1}`
    is a small dense solve.  ``images`` ``(B, C, H, W)``; ``in_shape = kernel_shape``,
    ``out_shape = (C, H, W)``."""

    def __init__(self, images: Tensor, kernel_shape):
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, C, H, W), got {got}")
        self.in_shape = _kernel_shape(kernel_shape)
        self.out_shape = tuple(images.shape[1:])
        kh, kw = self.in_shape
        if kh > self.out_shape[1] or kw > self.out_shape[2]:
            raise ValueError(f"kernel_shape {self.in_shape} exceeds the image {self.out_shape}")
        taps = torch.eye(kh * kw, dtype=images.dtype, device=images.device).reshape(-1, kh, kw)
        spectra = kernel_spectra(taps, self.out_shape[1:])  # (taps, H, W//2+1)
        # (B, taps, C, H, W): the image blurred by each unit tap
        columns = fourier_filter(images[:, None], spectra[None, :, None])
        self.matrix = columns.reshape(images.shape[0], kh * kw, -1).transpose(1, 2)
        self.gram = self.matrix.transpose(1, 2) @ self.matrix
        self.batch, self.entry = images.shape[0], "image"

    def _forward(self, k: Tensor) -> Tensor:
        out = self.matrix @ k.reshape(k.shape[0], -1, 1).to(self.matrix.dtype)
        return out.reshape(k.shape[0], *self.out_shape).to(k.dtype)

    def _adjoint(self, y: Tensor) -> Tensor:
        out = self.matrix.transpose(1, 2) @ y.reshape(y.shape[0], -1, 1).to(self.matrix.dtype)
        return out.reshape(y.shape[0], *self.in_shape).to(y.dtype)

    def normal_solve(self, b: Tensor, gamma: float) -> Tensor:
        gamma = positive(float(gamma), "gamma")
        self.check_shape(b, self.in_shape, "in")
        eye = torch.eye(self.gram.shape[-1], dtype=self.gram.dtype, device=self.gram.device)
        rhs = b.reshape(b.shape[0], -1, 1).to(self.gram.dtype)
        return torch.linalg.solve(self.gram + gamma * eye, rhs).reshape(b.shape).to(b.dtype)


def blind_pnp_dm(
    image_prior_step: Callable,
    kernel_prior_step: Callable,
    y: Tensor,
    sigma_y: float,
    kernel_shape,
    rhos,
    kernel_rhos,
    *,
    x: Tensor | None = None,
    kernel: Tensor | None = None,
    kernel_copy: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
):
    r"""Blind-PnPDM (Li, Gan & Kamilov, 2025): samples of the image *and* the kernel given
    :math:`y = k \circledast x + \sigma_y n`, from a split Gibbs sampler with two priors.

    Both unknowns get a coupled copy, :math:`z` for the image (strength :math:`\rho`) and
    :math:`w` for the kernel (strength :math:`\rho_k`), and the measurement is put on the
    copies:

    .. math:: \pi(x, z, k, w) \propto p(x)\,p(k)\,e^{-\lVert x - z\rVert^2/(2\rho^2)}
        \,e^{-\lVert k - w\rVert^2/(2\rho_k^2)}\,e^{-\lVert y - w \circledast z\rVert^2
        /(2\sigma_y^2)},

    whose :math:`(x, k)`-marginal is the joint posterior :math:`p(x, k \mid y)` as
    :math:`\rho, \rho_k \to 0`.  Every conditional is a Gaussian likelihood step or a Gaussian
    denoising posterior, so one sweep (per pair :math:`\rho, \rho_k` of ``rhos`` and
    ``kernel_rhos``, annealed) is four steps:

    1. :math:`z \mid x, w`: :func:`~diffcore.inverse.pnp.likelihood_step` with
       :class:`ImageBlur` (kernel :math:`w`);
    2. :math:`x \mid z`: ``image_prior_step(z, rho)``;
    3. :math:`w \mid k, z`: the likelihood step with :class:`KernelBlur` (image :math:`z`);
    4. :math:`k \mid w`: ``kernel_prior_step(w, rho_k)``.

    The priors are any samplers of Gaussian denoising posteriors, e.g.
    :func:`~diffcore.inverse.pnp.diffusion_prior_step` of an image model and of a kernel model.
    Starts: ``x`` (default ``y``), ``kernel`` (default the identity kernel, a centred delta) and
    ``kernel_copy`` :math:`w` (default ``kernel``); :math:`z` needs none, as step 1 draws it
    afresh, so ``(x, kernel, kernel_copy)`` is the whole state of a chain.  Each batch entry is
    its own chain.  Returns ``(x, kernel)``; ``callback(step)`` sees each sweep
    (:class:`~diffcore.stepping.Step` with ``x`` the image, ``t`` the coupling :math:`\rho`,
    ``state["kernel"]`` the kernel).  Shapes: ``y`` ``(B, C, H, W)``;
    returns ``(B, C, H, W)`` and ``(B, kh, kw)``.
    """
    kh, kw = _kernel_shape(kernel_shape)
    sigma_y = noise_level(sigma_y, "sigma_y")
    if not isinstance(y, Tensor) or y.ndim != 4:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be (B, C, H, W), got {got}")
    rhos = [positive(float(r), "rho") for r in rhos]
    kernel_rhos = [positive(float(r), "kernel rho") for r in kernel_rhos]
    if not rhos or len(rhos) != len(kernel_rhos):
        raise ValueError(
            f"rhos and kernel_rhos must be non-empty and of one length, got {len(rhos)} and "
            f"{len(kernel_rhos)}"
        )
    x = y.clone() if x is None else x.clone()
    if kernel is None:
        kernel = y.new_zeros(y.shape[0], kh, kw)
        kernel[:, kh // 2, kw // 2] = 1
    if tuple(x.shape) != tuple(y.shape) or tuple(kernel.shape) != (y.shape[0], kh, kw):
        raise ValueError(
            f"x must be {tuple(y.shape)} and kernel {(y.shape[0], kh, kw)}, got "
            f"{tuple(x.shape)} and {tuple(kernel.shape)}"
        )
    image_shape = tuple(y.shape[1:])
    w = kernel.clone() if kernel_copy is None else kernel_copy.clone()
    if tuple(w.shape) != tuple(kernel.shape):
        raise ValueError(f"kernel_copy must be {tuple(kernel.shape)}, got {tuple(w.shape)}")
    for i, (rho, rho_k) in enumerate(zip(rhos, kernel_rhos, strict=True)):
        z = likelihood_step(ImageBlur(w, image_shape), y, sigma_y, x, rho, generator)
        x = image_prior_step(z, rho)
        w = likelihood_step(KernelBlur(z, (kh, kw)), y, sigma_y, kernel, rho_k, generator)
        kernel = kernel_prior_step(w, rho_k)
        emit(callback, Step(i, rho, x, x, 2 * (i + 1), state={"kernel": kernel}))
    return x, kernel
