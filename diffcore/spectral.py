r"""Diffusions with one schedule per coordinate of an orthogonal basis, and shortest-path diffusion.

**Diagonal processes.**  Let :math:`U` be an orthogonal :math:`d \times d` matrix whose columns
are basis images (the 2-D cosine basis, :func:`dct_basis`, for images) and
:math:`z = U^\top x` the coefficients of :math:`x`.  A *diagonal* process noises every
coefficient with its own variance-preserving schedule :math:`\bar\alpha_k(t)`:

.. math::
    z_{t,k} = \alpha_k(t)\,z_{0,k} + \sigma_k(t)\,\varepsilon_k, \qquad
    \alpha_k = \sqrt{\bar\alpha_k}, \quad \sigma_k = \sqrt{1 - \bar\alpha_k},

so :math:`x_t = U(\alpha(t) \odot U^\top x_0) + U(\sigma(t)\odot U^\top\varepsilon)`, and
:math:`U^\top\varepsilon` is standard normal because :math:`U` is orthogonal.  A process with
the same :math:`\bar\alpha` on every coordinate is the scalar VP process of
:mod:`diffcore.processes` (:meth:`Diagonal.uniform`); one that varies with frequency blurs or
sharpens as it noises.

**Shortest path** (Das et al., 2023).  With Gaussian data whose covariance is diagonal in the
basis, :math:`\Sigma_0 = U\,\mathrm{diag}(S)\,U^\top` (its *spectrum* :math:`S`), the marginal
of coefficient :math:`k` has variance :math:`v_k(t) = \bar\alpha_k S_k + 1 - \bar\alpha_k`.
Among all paths from :math:`\mathcal N(0, \Sigma_0)` to :math:`\mathcal N(0, I)`, the shortest
in the Fisher–Rao metric :math:`ds^2 = \tfrac12\mathrm{tr}\big((\Sigma^{-1}d\Sigma)^2\big)` is
the geodesic :math:`\Sigma(t) = \Sigma_0^{1-t}`.  Asking :math:`v_k(t) = S_k^{1-t}` fixes the
schedule of every coefficient,

.. math::
    \bar\alpha_k(t) = \frac{S_k^{\,1-t} - 1}{S_k - 1}

(:math:`1 - t` where :math:`S_k = 1`), and the path's length is the Fisher–Rao distance
:math:`\sqrt{\tfrac12\sum_k \log^2 S_k}` (:func:`fisher_length` measures any path).  The
share :math:`\bar\alpha_k` of the signal kept falls first for the coefficients of large variance
(the coarse structure) and last for the faint fine detail, so next to VP the process sharpens
the image as it noises it, as the paper observes; the coarse coefficients' signal-to-noise ratio
:math:`S_k\bar\alpha_k/(1 - \bar\alpha_k)` stays the larger all the same.

**Paper and code.**  The official code (mtkresearch/shortest-path-diffusion,
``create_fourier_diffusion``) uses the complex Fourier basis (``fft2``, ``norm="ortho"``,
taking the real part) and the spectrum :math:`S(f) = c_1/(c_2 + |f|)^m` with
:math:`(c_1, c_2, m) = (1.59, 0.0086, 2)` fitted to CIFAR-10; its discrete step :math:`n` of
:math:`T` maps to :math:`1 - t = (T - n)/T` for :math:`n = 1 \dots T-1`.  Here the basis is the
real cosine basis (real coefficients; the same spectral picture for images with reflecting
boundaries), the spectrum is a parameter (:func:`power_law_spectrum` gives the code's law,
:func:`empirical_spectrum` the one measured on data), and time is continuous.  Its DDPM step
uses the variance :math:`\beta_t` ("fixed large"); :func:`spectral_ddim` with ``eta = 1`` uses
the posterior variance.

Shapes: data ``(batch, ...)`` with ``d`` entries per sample; coefficients ``(batch, d)``; a
schedule read at times of shape ``(n,)`` has shape ``(n, d)``, at one time ``(d,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.checks import as_time, count, finite, floating, positive, require, returned_shape
from diffcore.stepping import integrate

__all__ = [
    "Basis",
    "dct_basis",
    "power_law_spectrum",
    "empirical_spectrum",
    "fit_power_law",
    "Diagonal",
    "ShortestPath",
    "SpectralGaussian",
    "fisher_length",
    "fisher_rao_distance",
    "spectral_ddim",
    "output_law",
    "spectral_w2",
]


# -- the basis ---------------------------------------------------------------------------------
class Basis:
    r"""An orthogonal basis: ``matrix`` :math:`U` ``(d, d)`` with orthonormal columns (the basis
    vectors) and ``frequencies`` ``(d,)``, a size per vector (its spatial frequency for
    :func:`dct_basis`).  :meth:`analyse` gives coefficients :math:`z = U^\top x`,
    :meth:`synthesise` the data :math:`x = U z`."""

    def __init__(self, matrix: Tensor, frequencies: Tensor | None = None) -> None:
        matrix = floating(matrix, "matrix")
        require(
            matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1],
            "matrix",
            tuple(matrix.shape),
            "a square (d, d) matrix",
        )
        eye = torch.eye(len(matrix), dtype=matrix.dtype)
        gap = float((matrix.T @ matrix - eye).abs().max())
        require(
            gap < 1e3 * torch.finfo(matrix.dtype).eps * len(matrix), "matrix", gap, "orthogonal"
        )
        self.matrix = matrix
        self.dim = len(matrix)
        if frequencies is None:
            frequencies = torch.arange(self.dim, dtype=matrix.dtype)
        self.frequencies = returned_shape(
            torch.as_tensor(frequencies, dtype=matrix.dtype), (self.dim,), "frequencies"
        )

    def _check(self, x: Tensor, name: str) -> Tensor:
        require(
            x.ndim >= 2 and x[0].numel() == self.dim,
            f"{name}.shape",
            tuple(x.shape),
            f"(batch, ...) with {self.dim} entries per sample",
        )
        return x

    def analyse(self, x: Tensor) -> Tensor:
        """Coefficients :math:`U^\\top x`.  Shapes: ``x`` ``(batch, ...)``; returns ``(batch, d)``."""
        x = self._check(x, "x")
        return x.reshape(len(x), -1) @ self.matrix.to(x)

    def synthesise(self, z: Tensor, shape: tuple | None = None) -> Tensor:
        """Data :math:`U z`.  Shapes: ``z`` ``(batch, d)``; returns ``(batch, d)`` or ``shape``."""
        x = self._check(z, "z") @ self.matrix.to(z).T
        return x if shape is None else x.reshape(shape)


def dct_basis(n: int, dtype: torch.dtype = torch.float64) -> Basis:
    r"""The orthonormal 2-D cosine basis (DCT-II) of ``n`` x ``n`` images, :math:`d = n^2`.

    Vector :math:`(u, v)` is :math:`c_u c_v \cos\frac{\pi(2i+1)u}{2n}\cos\frac{\pi(2j+1)v}{2n}`
    (:math:`c_0 = \sqrt{1/n}`, else :math:`\sqrt{2/n}`); its frequency is
    :math:`\sqrt{u^2 + v^2}`.  Column ``u * n + v`` of the matrix, row ``i * n + j``: the order of
    ``image.reshape(-1)``.  Shapes: returns a :class:`Basis` with matrix ``(n^2, n^2)``.
    """
    n = count(n, "n")
    k = torch.arange(n, dtype=dtype)
    one_d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # (u, i)
    scale = torch.full((n, 1), math.sqrt(2 / n), dtype=dtype)
    scale[0] = math.sqrt(1 / n)
    one_d = one_d * scale
    matrix = torch.kron(one_d, one_d).T  # rows: pixels (i, j); columns: frequencies (u, v)
    freq = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).reshape(-1)
    return Basis(matrix, freq)


def power_law_spectrum(
    frequencies: Tensor, c1: float = 1.59, c2: float = 0.0086, m: float = 2.0
) -> Tensor:
    r"""The official code's spectrum :math:`S(f) = c_1/(c_2 + f)^m` (defaults: its CIFAR-10 fit).
    Shapes: ``frequencies`` ``(d,)``, non-negative; returns ``(d,)``."""
    f = finite(frequencies, "frequencies")
    require(bool((f >= 0).all()), "frequencies", float(f.min()), "non-negative")
    return positive(c1, "c1") / (positive(c2, "c2") + f) ** positive(m, "m")


def empirical_spectrum(x: Tensor, basis: Basis) -> Tensor:
    r"""The variance of each coefficient of data ``x``: :math:`S_k = \mathrm{Var}(z_{0,k})`, the
    diagonal of the data covariance in the basis.  Shapes: ``x`` ``(n, ...)``; returns ``(d,)``."""
    z = basis.analyse(finite(x, "x"))
    require(len(z) >= 2, "len(x)", len(z), "at least 2")
    return z.var(dim=0)


def fit_power_law(spectrum: Tensor, frequencies: Tensor, c2: float = 0.0086) -> tuple:
    r"""Least squares of :math:`\log S = \log c_1 - m\log(c_2 + f)` over the coefficients with
    :math:`f > 0` (``c2`` fixed): returns ``(c1, m)``, floats.  Shapes: ``(d,)`` each."""
    keep = frequencies > 0
    design = torch.stack([torch.ones_like(frequencies[keep]), -torch.log(c2 + frequencies[keep])])
    solution = torch.linalg.lstsq(design.T, torch.log(spectrum[keep])[:, None]).solution
    return math.exp(float(solution[0])), float(solution[1])


# -- the processes -----------------------------------------------------------------------------
class Diagonal:
    r"""A variance-preserving process with one schedule :math:`\bar\alpha_k(t)` per coefficient.

    ``signal(t)`` returns :math:`\bar\alpha(t)` ``(..., d)`` for times ``(...)``, decreasing from
    1 at :math:`t = 0` to (near) 0 at :math:`t = 1`; ``d_signal(t)`` its time derivative.
    :meth:`alpha`, :meth:`sigma`, :meth:`lam` and their derivatives are per coefficient, so the
    stepping engine's points hold ``(d,)`` tensors for this process.  Shapes: times ``(n,)``
    give ``(n, d)``; one time gives ``(d,)``.
    """

    def __init__(self, basis: Basis, signal: Callable, d_signal: Callable) -> None:
        if not isinstance(basis, Basis):
            raise TypeError(f"basis must be a spectral.Basis, got {type(basis).__name__}")
        self.basis, self.signal, self.d_signal = basis, signal, d_signal

    @classmethod
    def uniform(cls, process, basis: Basis) -> Diagonal:
        r"""The scalar variance-preserving ``process`` (VP, VP-cosine) on every coefficient:
        :math:`\bar\alpha_k = \alpha_t^2`.  Raises if :math:`\alpha_t^2 + \sigma_t^2 \ne 1`."""
        probe = torch.linspace(0, 1, 11, dtype=torch.float64)
        gap = float((process.alpha(probe) ** 2 + process.sigma(probe) ** 2 - 1).abs().max())
        require(gap < 1e-9, "alpha^2 + sigma^2 - 1", gap, "0 (a variance-preserving process)")
        ones = torch.ones(basis.dim, dtype=basis.matrix.dtype)

        def signal(t: Tensor) -> Tensor:
            return process.alpha(t)[..., None] ** 2 * ones

        def d_signal(t: Tensor) -> Tensor:
            return (2 * process.alpha(t) * process.d_alpha(t))[..., None] * ones

        return cls(basis, signal, d_signal)

    def _t(self, t) -> Tensor:
        return as_time(t, like=self.basis.matrix)

    def alpha(self, t) -> Tensor:
        r""":math:`\alpha_k(t) = \sqrt{\bar\alpha_k(t)}`; shape ``t.shape + (d,)``."""
        return self.signal(self._t(t)).clamp(0, 1).sqrt()

    def sigma(self, t) -> Tensor:
        r""":math:`\sigma_k(t) = \sqrt{1 - \bar\alpha_k(t)}`; shape ``t.shape + (d,)``."""
        return (1 - self.signal(self._t(t))).clamp(0, 1).sqrt()

    def lam(self, t) -> Tensor:
        r"""Log-SNR per coefficient, :math:`\log\alpha_k - \log\sigma_k`; shape ``t.shape + (d,)``."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def d_alpha(self, t) -> Tensor:
        r""":math:`\dot\alpha_k = \dot{\bar\alpha}_k / (2\alpha_k)`; shape ``t.shape + (d,)``."""
        return self.d_signal(self._t(t)) / (2 * self.alpha(t))

    def d_sigma(self, t) -> Tensor:
        r""":math:`\dot\sigma_k = -\dot{\bar\alpha}_k / (2\sigma_k)`; shape ``t.shape + (d,)``."""
        return -self.d_signal(self._t(t)) / (2 * self.sigma(t))

    def marginal(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        r""":math:`x_t = U(\alpha(t)\odot U^\top x_0 + \sigma(t)\odot U^\top\varepsilon)`.

        Shapes: ``x0``, ``noise`` ``(batch, ...)``; ``t`` one time or ``(batch,)``; returns the
        shape of ``x0``."""
        a, s = self.alpha(t), self.sigma(t)
        z = a * self.basis.analyse(x0) + s * self.basis.analyse(noise)
        return self.basis.synthesise(z, x0.shape)

    def variance(self, spectrum: Tensor, t) -> Tensor:
        r"""The marginal variance of each coefficient, :math:`v_k = \bar\alpha_k S_k + 1 -
        \bar\alpha_k`, for data of spectrum :math:`S`.  Shapes: ``(d,)``; returns
        ``t.shape + (d,)``."""
        abar = self.signal(self._t(t))
        return abar * spectrum + 1 - abar


class ShortestPath(Diagonal):
    r"""Shortest-path diffusion for data of spectrum :math:`S` (``(d,)``, positive):
    :math:`\bar\alpha_k(t) = (S_k^{1-t} - 1)/(S_k - 1)`, whose marginal covariance is the
    Fisher–Rao geodesic :math:`\Sigma_0^{1-t}` from the data to :math:`I`."""

    def __init__(self, spectrum: Tensor, basis: Basis) -> None:
        spectrum = returned_shape(finite(spectrum, "spectrum"), (basis.dim,), "spectrum")
        require(bool((spectrum > 0).all()), "spectrum", float(spectrum.min()), "positive")
        log_s = torch.log(spectrum.to(basis.matrix))
        flat = log_s.abs() < 1e-12  # S_k = 1: the limit 1 - t

        def signal(t: Tensor) -> Tensor:
            tau = (1 - t)[..., None]
            ratio = torch.expm1(tau * log_s) / torch.where(flat, 1.0, torch.expm1(log_s))
            return torch.where(flat, tau, ratio)

        def d_signal(t: Tensor) -> Tensor:
            tau = (1 - t)[..., None]
            slope = -log_s * torch.exp(tau * log_s) / torch.where(flat, 1.0, torch.expm1(log_s))
            return torch.where(flat, -torch.ones_like(slope), slope)

        super().__init__(basis, signal, d_signal)
        self.spectrum = spectrum


# -- the exact oracle --------------------------------------------------------------------------
class SpectralGaussian:
    r"""Gaussian data :math:`\mathcal N(U\mu, U\,\mathrm{diag}(S)\,U^\top)`: independent
    coefficients, coefficient :math:`k` of mean :math:`\mu_k` and variance :math:`S_k`.

    Under a diagonal process each coefficient is a one-dimensional Gaussian problem, so the
    denoiser, the PF-ODE flow map and every per-coefficient sampler's output law are exact.
    Shapes: ``spectrum`` and ``mean`` (coefficients, default 0) ``(d,)``.
    """

    def __init__(self, spectrum: Tensor, basis: Basis, mean: Tensor | None = None) -> None:
        spectrum = returned_shape(finite(spectrum, "spectrum"), (basis.dim,), "spectrum")
        require(bool((spectrum > 0).all()), "spectrum", float(spectrum.min()), "positive")
        self.basis, self.spectrum = basis, spectrum.to(basis.matrix)
        mean = torch.zeros_like(self.spectrum) if mean is None else mean
        self.mean = returned_shape(finite(mean, "mean"), (basis.dim,), "mean").to(self.spectrum)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws, shape ``(n, d)``."""
        z = torch.randn(count(n, "n"), self.basis.dim, generator=generator, dtype=self.mean.dtype)
        return self.basis.synthesise(self.mean + self.spectrum.sqrt() * z)

    def marginal(self, process: Diagonal, t) -> tuple[Tensor, Tensor]:
        r"""Mean and variance of every coefficient of :math:`x_t`: :math:`\alpha_k\mu_k` and
        :math:`\alpha_k^2 S_k + \sigma_k^2`.  Shapes: returns two ``(d,)`` tensors."""
        a, s = process.alpha(t), process.sigma(t)
        return a * self.mean, a**2 * self.spectrum + s**2

    def denoiser(self, process: Diagonal) -> Callable:
        r"""The exact :math:`D(x, t) = U\big(\mu + \tfrac{\alpha S}{\alpha^2 S + \sigma^2}
        (U^\top x - \alpha\mu)\big)` (per coefficient), with a network's call signature."""

        def exact_denoiser(x: Tensor, t) -> Tensor:
            a, s = process.alpha(t).to(x), process.sigma(t).to(x)
            z = self.basis.analyse(x)
            mean, spectrum = self.mean.to(x), self.spectrum.to(x)
            z0 = mean + a * spectrum / (a**2 * spectrum + s**2) * (z - a * mean)
            return self.basis.synthesise(z0, x.shape)

        return exact_denoiser

    def pf_ode_map(self, x: Tensor, s, t, process: Diagonal) -> Tensor:
        r"""The exact PF-ODE flow from time ``s`` to ``t``, per coefficient:
        :math:`z_t - \alpha_t\mu = \sqrt{v_t/v_s}\,(z_s - \alpha_s\mu)`.  Shapes: ``x``
        ``(batch, ...)``; returns the same."""
        mean_s, var_s = self.marginal(process, s)
        mean_t, var_t = self.marginal(process, t)
        z = self.basis.analyse(x)
        return self.basis.synthesise(mean_t + (var_t / var_s).sqrt() * (z - mean_s), x.shape)


# -- path lengths ------------------------------------------------------------------------------
def fisher_length(process: Diagonal, spectrum: Tensor, t_min=0.0, t_max=1.0, n=2001) -> float:
    r"""The Fisher–Rao length of the path of marginals :math:`t \mapsto \mathcal N(0,
    \mathrm{diag}\,v(t))` over :math:`[t_{\min}, t_{\max}]`:

    .. math::
        L = \int \sqrt{\tfrac12\textstyle\sum_k \big(\tfrac{d}{dt}\log v_k\big)^2}\,dt,
        \qquad \dot v_k = \dot{\bar\alpha}_k (S_k - 1),

    by Simpson's rule on ``n`` (odd) points.  Shapes: ``spectrum`` ``(d,)``; returns a float."""
    n = count(n, "n", low=3)
    require(n % 2 == 1, "n", n, "odd (Simpson's rule)")
    require(0 <= t_min < t_max <= 1, "(t_min, t_max)", (t_min, t_max), "0 <= t_min < t_max <= 1")
    t = torch.linspace(t_min, t_max, n, dtype=torch.float64)
    spectrum = spectrum.to(torch.float64)
    rate = process.d_signal(t) * (spectrum - 1) / process.variance(spectrum, t)
    speed = torch.sqrt(0.5 * (rate**2).sum(-1))
    weights = torch.ones(n, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return float((weights * speed).sum() * (t_max - t_min) / (3 * (n - 1)))


def fisher_rao_distance(spectrum: Tensor, target: Tensor | None = None) -> float:
    r"""The Fisher–Rao distance between :math:`\mathcal N(0, \mathrm{diag}\,S)` and
    :math:`\mathcal N(0, \mathrm{diag}\,T)` (default :math:`T = 1`):
    :math:`\sqrt{\tfrac12\sum_k\log^2(S_k/T_k)}`.  Shapes: ``(d,)`` each; returns a float."""
    ratio = spectrum if target is None else spectrum / target
    return float(torch.sqrt(0.5 * (torch.log(ratio) ** 2).sum()))


# -- sampling ----------------------------------------------------------------------------------
def spectral_ddim(model: Callable, x: Tensor, ts: Tensor, process: Diagonal, *, eta=0.0, **run):
    r"""DDIM with one schedule per coefficient: :func:`diffcore.samplers.ddim` in the basis.

    .. math::
        \begin{aligned}
        z_s &= \alpha_s\hat z_0 + \sqrt{\sigma_s^2 - c^2}\;\hat\varepsilon + c\,\xi,
        \qquad \hat\varepsilon = (z_t - \alpha_t\hat z_0)/\sigma_t, \\
        c &= \eta\,\sigma_s\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}},
        \end{aligned}

    every product per coefficient, :math:`\hat z_0 = U^\top D(x_t, t)`.  ``eta = 0`` is the
    deterministic sampler, ``eta = 1`` DDPM's ancestral step.  On :meth:`Diagonal.uniform` it
    is :func:`diffcore.samplers.ddim`.  One model call per step; ``run``: the engine's options
    (:func:`diffcore.stepping.integrate`).  Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    if not isinstance(process, Diagonal):
        raise TypeError(f"process must be a spectral.Diagonal, got {type(process).__name__}")
    require(0 <= float(eta) <= 1, "eta", eta, "in [0, 1]")
    basis = process.basis

    def update(k, x):
        z0, z = basis.analyse(k.D(x)), basis.analyse(x)
        eps = (z - k.t.alpha * z0) / k.t.sigma
        spread = -torch.expm1(-2 * k.h)  # the DDPM posterior's share, per coefficient
        z_s = k.s.alpha * z0 + k.s.sigma * torch.sqrt(1 - eta**2 * spread) * eps
        if eta > 0:
            z_s = z_s + eta * k.s.sigma * spread.sqrt() * basis.analyse(k.noise())
        return basis.synthesise(z_s, x.shape)

    return integrate(update, model, x, ts, process, **run)


def output_law(data: SpectralGaussian, ts: Tensor, process: Diagonal, **options):
    r"""The exact law of :func:`spectral_ddim`'s output on ``data`` with its exact denoiser,
    started from the exact marginal at ``ts[0]``.

    Per coefficient the sampler is affine, :math:`z_{\rm out} = g\,z_{t_0} + \sum_j h_j\xi_j +
    b`, so its output is :math:`\mathcal N(g m_0 + b,\; g^2 v_0 + \sum_j h_j^2)`; the gains are
    read from runs on unit inputs (one run, plus one per step that draws noise).  ``options``
    go to the sampler (``eta``).  Shapes: returns mean and variance of the coefficients, ``(d,)``
    each, float64.
    """
    d, dtype = data.basis.dim, torch.float64
    n = len(ts) - 1
    model = data.denoiser(process)

    def run(z_start: Tensor, hit: int | None) -> Tensor:
        def noise_sampler(i: int, shape) -> Tensor:  # the coefficients of noise step i
            ones = torch.ones(d, dtype=dtype) if i == hit else torch.zeros(d, dtype=dtype)
            return data.basis.synthesise(ones[None], shape)

        x = data.basis.synthesise(z_start[None])
        out = spectral_ddim(model, x, ts, process, noise_sampler=noise_sampler, **options)
        return data.basis.analyse(out)[0]

    zeros, ones = torch.zeros(d, dtype=dtype), torch.ones(d, dtype=dtype)
    offset = run(zeros, None)
    gain = run(ones, None) - offset
    mean0, var0 = data.marginal(process, ts[0])
    var = gain**2 * var0
    if float(options.get("eta", 0.0)) > 0:
        for i in range(n):
            var = var + (run(zeros, i) - offset) ** 2
    return gain * mean0 + offset, var


def spectral_w2(mean: Tensor, var: Tensor, data: SpectralGaussian, process: Diagonal, t) -> float:
    r"""The exact :math:`W_2` between :math:`\mathcal N(U m, U\mathrm{diag}(v)U^\top)` and the
    marginal of ``data`` at ``t``, both diagonal in the basis: :math:`\sqrt{\sum_k (m_k -
    \alpha_k\mu_k)^2 + (\sqrt{v_k} - \sqrt{v_k(t)})^2}`.  Shapes: ``(d,)`` each; returns a float."""
    target_mean, target_var = data.marginal(process, t)
    gap = (mean - target_mean) ** 2 + (var.sqrt() - target_var.sqrt()) ** 2
    return float(gap.sum().sqrt())
