r"""Exact models: Gaussian and Gaussian-mixture data, diffused by any process.

If :math:`x_0 \sim \sum_k w_k \mathcal N(\mu_k, \Sigma_k)`, then
:math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` is again a mixture, with means :math:`\alpha_t\mu_k`
and covariances :math:`\alpha_t^2\Sigma_k + \sigma_t^2 I`.  Its log-density, score, denoiser
(Tweedie's posterior mean) and PF-ODE velocity are exact, for any process and any ``t``.
These are the oracles every algorithm in diffcore is measured against.

Each covariance is diagonalised once, :math:`\Sigma_k = U_k \operatorname{diag}(\ell_k) U_k^\top`,
so that the covariance at time ``t`` is :math:`U_k \operatorname{diag}(\alpha_t^2 \ell_k + \sigma_t^2) U_k^\top`:
every quantity costs :math:`O(K d^2)` per sample, with one ``t`` per sample allowed.

Data may be vectors ``(batch, d)`` or images ``(batch, c, h, w)`` with ``c * h * w = d``; the
results have the shape of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.checks import (
    Deferred,
    as_time,
    count,
    finite,
    floating,
    noise_level,
    per_sample,
    positive,
    time_grid,
)
from diffcore.processes import Process
from diffcore.targets import convert

__all__ = ["GaussianMixture", "Gaussian"]


def _float_tensor(value, name: str) -> Tensor:
    """A parameter as a finite float32 or float64 tensor (integers and lists are converted to
    the default dtype)."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor of numbers, got {name} = {value!r}") from err
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.get_default_dtype())
    return finite(floating(t, name), name)


class GaussianMixture:
    r"""The data law :math:`p_0 = \sum_k w_k \mathcal N(\mu_k, \Sigma_k)` and all its diffused marginals.

    Shapes: ``means`` ``(K, d)``, ``covs`` ``(K, d, d)`` symmetric positive definite,
    ``weights`` ``(K,)`` positive and summing to 1: finite tensors or nested lists (integers
    are converted to the default dtype; float16 and bfloat16 are refused).  Computations
    follow the dtype and device of the input ``x``, which must be a finite float32 or float64
    tensor.
    """

    def __init__(self, means, covs, weights):
        means = _float_tensor(means, "means")
        covs = _float_tensor(covs, "covs").to(means.dtype)
        weights = _float_tensor(weights, "weights").to(means.dtype)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(
                f"covs must have shape (K, d, d) = {(k, d, d)} to match means {tuple(means.shape)}, "
                f"got {tuple(covs.shape)}"
            )
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape (K,) = ({k},), got {tuple(weights.shape)}")
        if not bool((weights > 0).all()):
            raise ValueError(f"weights must be positive, got weights = {weights.tolist()}")
        total = float(weights.sum())
        if abs(total - 1) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum(weights) = {total:.8g}")
        scale = float(covs.abs().amax())
        if not torch.allclose(covs, covs.transpose(-1, -2), rtol=0, atol=1e-10 * max(scale, 1.0)):
            raise ValueError("covs must be symmetric, got a covariance with cov != cov.T")
        evals, evecs = torch.linalg.eigh(covs)
        for j in range(k):
            if float(evals[j, 0]) <= 0:
                raise ValueError(
                    f"covs[{j}] must be positive definite, got smallest eigenvalue "
                    f"{float(evals[j, 0]):.6g}"
                )
        self.means, self.covs, self.weights = means, covs, weights
        self._evals, self._evecs = evals, evecs
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        """Data dimension ``d``."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """Number of components ``K``."""
        return self.means.shape[0]

    # -- internals ---------------------------------------------------------------------------
    def _on(self, x: Tensor):
        """The parameters in the dtype and on the device of ``x`` (cached)."""
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = tuple(
                p.to(dtype=x.dtype, device=x.device)
                for p in (self.means, self.weights, self._evals, self._evecs)
            )
        return self._cache[key]

    def _flat(self, x: Tensor) -> Tensor:
        floating(x, "x")
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            shape = tuple(x.shape)
            raise ValueError(
                f"x must have shape (batch, {self.dim}) or (batch, ...) with {self.dim} entries "
                f"per sample, got {shape}"
            )
        return x.reshape(x.shape[0], self.dim)

    def _diffused(self, x: Tensor, t, process: Process, name: str = "t"):
        """Coordinates of ``x - alpha_t mu_k`` in each eigenbasis, and the variances there.

        ``x`` is checked (finite) together with ``t``, one synchronisation for both.
        Shapes: returns ``z`` ``(B, K, d)``, ``var`` ``(B or 1, K, d)``, ``alpha`` and ``sigma``
        broadcastable to ``(B, K, d)``.
        """
        xf = self._flat(x)
        check = Deferred()
        check.finite(xf, "x")
        t = check.time(t, like=xf, name=name)
        check.done()
        means, _, evals, evecs = self._on(xf)
        shape3 = xf[:, None, :]
        a = per_sample(process.alpha(t), shape3)
        s = per_sample(process.sigma(t), shape3)
        z = torch.einsum("kji,bkj->bki", evecs, xf[:, None, :] - a * means)
        var = a**2 * evals + s**2
        return z, var, a, s

    def _labels(self, label, batch: int, device) -> Tensor:
        label = torch.as_tensor(label, device=device)
        if label.dtype not in (torch.int32, torch.int64) or label.ndim > 1:
            raise ValueError(f"label must be an int or a 1-D integer tensor, got {label!r}")
        bad = (label < 0) | (label >= self.n_components)
        if bool(bad.any()):
            raise ValueError(
                f"label must lie in [0, {self.n_components}), got label = {label[bad].tolist()}"
            )
        label = label.expand(batch) if label.ndim == 0 else label
        if label.shape != (batch,):
            raise ValueError(
                f"label must have one entry per sample ({batch}), got {tuple(label.shape)}"
            )
        return label

    def _reduce(self, per_component: Tensor, x: Tensor, t, process, label) -> Tensor:
        """Average ``(B, K, d)`` over the components with posterior weights, or pick ``label``."""
        if label is None and self.n_components == 1:
            out = per_component[:, 0]
        elif label is None:
            r = self.responsibilities(x, t, process)
            out = torch.einsum("bk,bkd->bd", r, per_component)
        else:
            label = self._labels(label, x.shape[0], x.device)
            out = per_component[torch.arange(x.shape[0], device=x.device), label]
        return out.reshape(x.shape)

    # -- the exact quantities ----------------------------------------------------------------
    def component_log_prob(self, x: Tensor, t, process: Process) -> Tensor:
        """:math:`\\log \\mathcal N(x; \\alpha_t\\mu_k, \\alpha_t^2\\Sigma_k + \\sigma_t^2 I)`, shape ``(B, K)``."""
        z, var, _, _ = self._diffused(x, t, process)
        quad = (z**2 / var).sum(-1)
        logdet = torch.log(var).sum(-1)
        return -0.5 * (self.dim * math.log(2 * math.pi) + logdet + quad)

    def responsibilities(self, x: Tensor, t, process: Process) -> Tensor:
        """Posterior component probabilities :math:`p(k \\mid x_t = x)`, shape ``(B, K)``."""
        comp = self.component_log_prob(x, t, process)
        _, weights, _, _ = self._on(x)
        logits = torch.log(weights) + comp
        return torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))

    def log_prob(self, x: Tensor, t, process: Process, label=None) -> Tensor:
        """Exact :math:`\\log p_t(x)` (or :math:`\\log p_t(x \\mid k)` for ``label=k``), shape ``(B,)``."""
        comp = self.component_log_prob(x, t, process)
        if label is not None:
            label = self._labels(label, x.shape[0], x.device)
            return comp[torch.arange(x.shape[0], device=x.device), label]
        _, weights, _, _ = self._on(x)
        return torch.logsumexp(torch.log(weights) + comp, dim=-1)

    def score(self, x: Tensor, t, process: Process, label=None) -> Tensor:
        """Exact score :math:`\\nabla_x \\log p_t(x)` (class-conditional for ``label``), shape of ``x``.

        ``label`` is an int or a ``(B,)`` integer tensor of component indices.
        """
        z, var, _, _ = self._diffused(x, t, process)
        _, _, _, evecs = self._on(x)
        per_component = -torch.einsum("kij,bkj->bki", evecs, z / var)
        return self._reduce(per_component, x, t, process, label)

    def denoise(self, x: Tensor, t, process: Process, label=None) -> Tensor:
        """Exact denoiser :math:`D(x, t) = \\mathbb E[x_0 \\mid x_t = x]` (Tweedie), shape of ``x``.

        Per component, :math:`\\mu_k + \\alpha_t\\Sigma_k(\\alpha_t^2\\Sigma_k + \\sigma_t^2 I)^{-1}(x - \\alpha_t\\mu_k)`;
        finite also where :math:`\\alpha_t = 0` or :math:`\\sigma_t = 0`.
        """
        z, var, a, _ = self._diffused(x, t, process)
        means, _, evals, evecs = self._on(x)
        gain = a * evals / var
        per_component = means + torch.einsum("kij,bkj->bki", evecs, gain * z)
        return self._reduce(per_component, x, t, process, label)

    def velocity(self, x: Tensor, t, process: Process, label=None) -> Tensor:
        """Exact PF-ODE velocity :math:`\\dot\\alpha_t D + \\dot\\sigma_t \\hat\\varepsilon`, shape of ``x``."""
        return convert(self.denoise(x, t, process, label), "x0", "velocity", x, t, process)

    def denoiser(self, process: Process, label=None) -> Callable:
        """The exact denoiser as a model ``D(x, t)``, with the call signature of a network."""

        def exact_denoiser(x: Tensor, t) -> Tensor:
            return self.denoise(x, t, process, label)

        return exact_denoiser

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """``n`` samples of the data law, shape ``(n, d)`` (and their component labels ``(n,)``)."""
        n = count(n, "n")
        device = generator.device if generator is not None else self.means.device
        means, weights, evals, evecs = (
            p.to(device) for p in (self.means, self.weights, self._evals, self._evecs)
        )
        labels = torch.multinomial(weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=means.dtype, device=device)
        x = means[labels] + torch.einsum("bij,bj->bi", evecs[labels], evals[labels].sqrt() * noise)
        return (x, labels) if return_labels else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.n_components}, d={self.dim})"

    # -- the exact posterior of a linear-Gaussian measurement --------------------------------
    def _measurement(self, A, sigma_y) -> tuple[Tensor, float]:
        A = _float_tensor(A, "A").to(self.means.dtype)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(
                f"A must be a matrix of shape (m, d) = (m, {self.dim}), got {tuple(A.shape)}"
            )
        sigma_y = noise_level(sigma_y, "sigma_y")
        if sigma_y == 0:
            raise ValueError(
                "sigma_y must be a positive finite number (the posterior of a noiseless "
                "measurement is singular), got sigma_y = 0.0"
            )
        return A, positive(sigma_y, "sigma_y")

    def _posterior_parts(self, A: Tensor, sigma_y: float):
        r"""Per component: the evidence covariance's Cholesky factor, the Kalman gain and the
        posterior covariance (Joseph form, symmetric and PSD by construction).

        Shapes: ``chol`` ``(K, m, m)``, ``gain`` ``(K, d, m)``, ``cov`` ``(K, d, d)``.
        """
        m = A.shape[0]
        eye_m = torch.eye(m, dtype=A.dtype)
        a_cov = A @ self.covs  # (K, m, d)
        evidence = a_cov @ A.T + sigma_y**2 * eye_m  # A Sigma_k A^T + sigma_y^2 I
        chol, info = torch.linalg.cholesky_ex(0.5 * (evidence + evidence.transpose(-1, -2)))
        if bool((info > 0).any()):
            k = int(torch.nonzero(info)[0])
            raise ValueError(
                f"A Sigma_{k} A^T + sigma_y^2 I is not positive definite in floating point for "
                f"sigma_y = {sigma_y:g}: take a larger sigma_y"
            )
        gain = torch.cholesky_solve(a_cov, chol).transpose(-1, -2)  # Sigma A^T S^{-1}
        keep = torch.eye(self.dim, dtype=A.dtype) - gain @ A  # I - G A
        cov = keep @ self.covs @ keep.transpose(-1, -2) + sigma_y**2 * gain @ gain.transpose(-1, -2)
        return chol, gain, 0.5 * (cov + cov.transpose(-1, -2))

    def _posterior_weights_means(self, A, sigma_y, y: Tensor, chol, gain):
        """Posterior log-weights ``(B, K)`` and means ``(B, K, d)`` for a batch ``y`` ``(B, m)``."""
        pred = self.means @ A.T  # (K, m)
        resid = y[:, None, :] - pred  # (B, K, m)
        white = torch.linalg.solve_triangular(
            chol, resid.transpose(0, 1).transpose(-1, -2), upper=False
        )
        quad = white.pow(2).sum(-2).T  # (B, K)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        log_evidence = -0.5 * (A.shape[0] * math.log(2 * math.pi) + logdet + quad)
        logits = torch.log(self.weights) + log_evidence
        means = self.means + torch.einsum("kdm,bkm->bkd", gain, resid)
        return logits - torch.logsumexp(logits, dim=-1, keepdim=True), means, log_evidence

    def _check_y(self, y, m: int, batched: bool) -> Tensor:
        y = _float_tensor(y, "y").to(self.means.dtype)
        ok = (y.ndim == 2 and y.shape[1] == m) if batched else (y.ndim == 1 and y.shape[0] == m)
        if not ok:
            want = f"(B, {m})" if batched else f"({m},)"
            raise ValueError(f"y must have shape {want} to match A, got {tuple(y.shape)}")
        return y

    def posterior(self, A, y, sigma_y: float) -> GaussianMixture:
        r"""The exact posterior of :math:`x` given one measurement :math:`y = A x + \sigma_y n`.

        With :math:`S_k = A\Sigma_k A^\top + \sigma_y^2 I` and the gain :math:`G_k = \Sigma_k
        A^\top S_k^{-1}`, the posterior is the mixture with weights :math:`\propto w_k\,\mathcal
        N(y; A\mu_k, S_k)`, means :math:`\mu_k + G_k(y - A\mu_k)` and covariances
        :math:`\Sigma_k - G_k A \Sigma_k`, computed in the Joseph form :math:`(I - G_k A)\Sigma_k
        (I - G_k A)^\top + \sigma_y^2 G_k G_k^\top`.  ``sigma_y`` must be positive: no jitter is
        added, and a covariance that is not positive definite in floating point raises.
        Shapes: ``A`` ``(m, d)``, ``y`` ``(m,)``; returns a mixture in dimension ``d``.
        """
        A, sigma_y = self._measurement(A, sigma_y)
        y = self._check_y(y, A.shape[0], batched=False)
        chol, gain, cov = self._posterior_parts(A, sigma_y)
        log_w, means, _ = self._posterior_weights_means(A, sigma_y, y[None], chol, gain)
        smallest = torch.linalg.eigvalsh(cov)[:, 0]
        for k in range(self.n_components):
            if float(smallest[k]) <= 0:
                raise ValueError(
                    f"the posterior covariance of component {k} is not positive definite in "
                    f"floating point (smallest eigenvalue {float(smallest[k]):.3g}) for "
                    f"sigma_y = {sigma_y:g}: take a larger sigma_y"
                )
        weights = torch.exp(log_w[0])
        return GaussianMixture(means[0], cov, weights / weights.sum())

    def posterior_mean(self, A, y, sigma_y: float) -> Tensor:
        r"""The MMSE estimate :math:`\mathbb E[x \mid y]` for a batch of measurements
        :math:`y = A x + \sigma_y n`: the posterior weights times the component means of
        :meth:`posterior`.  ``A = I`` gives the exact MMSE denoiser at noise level ``sigma_y``.
        Shapes: ``A`` ``(m, d)``, ``y`` ``(B, m)``; returns ``(B, d)``.
        """
        A, sigma_y = self._measurement(A, sigma_y)
        y = self._check_y(y, A.shape[0], batched=True)
        chol, gain, _ = self._posterior_parts(A, sigma_y)
        log_w, means, _ = self._posterior_weights_means(A, sigma_y, y, chol, gain)
        return torch.einsum("bk,bkd->bd", torch.exp(log_w), means)

    def evidence_log_prob(self, A, y, sigma_y: float) -> Tensor:
        r""":math:`\log p(y) = \log\sum_k w_k \mathcal N(y; A\mu_k, A\Sigma_k A^\top + \sigma_y^2 I)`.

        Shapes: ``A`` ``(m, d)``, ``y`` ``(B, m)``; returns ``(B,)``.
        """
        A, sigma_y = self._measurement(A, sigma_y)
        y = self._check_y(y, A.shape[0], batched=True)
        chol, gain, _ = self._posterior_parts(A, sigma_y)
        _, _, log_evidence = self._posterior_weights_means(A, sigma_y, y, chol, gain)
        return torch.logsumexp(torch.log(self.weights) + log_evidence, dim=-1)


class Gaussian(GaussianMixture):
    r"""Gaussian data :math:`\mathcal N(\mu, \Sigma)`: a one-component mixture with a closed-form PF-ODE.

    Shapes: ``mean`` ``(d,)``, ``cov`` ``(d, d)`` symmetric positive definite.
    """

    def __init__(self, mean, cov):
        mean = _float_tensor(mean, "mean")
        cov = _float_tensor(cov, "cov").to(mean.dtype)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"need mean of shape (d,) and cov of shape (d, d), got {tuple(mean.shape)} and "
                f"{tuple(cov.shape)}"
            )
        try:
            super().__init__(mean[None], cov[None], torch.ones(1, dtype=mean.dtype))
        except ValueError as err:
            raise ValueError(str(err).replace("covs[0]", "cov")) from None

    @property
    def mean(self) -> Tensor:
        """The mean :math:`\\mu`, shape ``(d,)``."""
        return self.means[0]

    @property
    def cov(self) -> Tensor:
        """The covariance :math:`\\Sigma`, shape ``(d, d)``."""
        return self.covs[0]

    def posterior(self, A, y, sigma_y: float) -> Gaussian:
        """The exact Gaussian posterior of :meth:`GaussianMixture.posterior` (the Kalman update)."""
        mixture = super().posterior(A, y, sigma_y)
        return Gaussian(mixture.means[0], mixture.covs[0])

    def marginal(self, t: float, process: Process) -> Gaussian:
        """The law of :math:`x_t`: :math:`\\mathcal N(\\alpha_t\\mu, \\alpha_t^2\\Sigma + \\sigma_t^2 I)`."""
        t = as_time(t, like=self.mean)
        if t.ndim:
            raise ValueError(f"marginal takes one time, got t of shape {tuple(t.shape)}")
        a, s = process.alpha(t), process.sigma(t)
        eye = torch.eye(self.dim, dtype=self.mean.dtype)
        return Gaussian(a * self.mean, a**2 * self.cov + s**2 * eye)

    def pf_ode_map(self, x: Tensor, s, t, process: Process) -> Tensor:
        r"""The exact PF-ODE flow from time ``s`` to time ``t`` (either direction).

        .. math::
            x_t - \alpha_t\mu = (\alpha_t^2\Sigma + \sigma_t^2 I)^{1/2}
                                (\alpha_s^2\Sigma + \sigma_s^2 I)^{-1/2}(x_s - \alpha_s\mu)

        Shapes: ``x`` ``(batch, ...)``; ``s`` and ``t`` floats, ``()`` or ``(batch,)``;
        returns the shape of ``x``.
        """
        z_s, var_s, _, _ = self._diffused(x, s, process, name="s")
        xf = self._flat(x)
        means, _, evals, evecs = self._on(xf)
        t = as_time(t, like=xf)
        a_t = per_sample(process.alpha(t), z_s)
        s_t = per_sample(process.sigma(t), z_s)
        z_t = torch.sqrt((a_t**2 * evals + s_t**2) / var_s) * z_s
        out = a_t * means + torch.einsum("kij,bkj->bki", evecs, z_t)
        return out[:, 0].reshape(x.shape)

    def pf_ode_solver(self) -> Callable:
        """The exact PF-ODE solve, as a sampler: ``solver(model, x, ts, process)`` returns
        :meth:`pf_ode_map` from ``ts[0]`` to ``ts[-1]`` and never calls ``model``.

        What a perfect solver would return: the exact teacher of the flow-map losses
        (``teacher=`` in :mod:`diffcore.flowmap`), or the exact tail of
        :func:`~diffcore.samplers.gaussian_skip`.  Shapes: ``x`` ``(batch, ...)``, ``ts`` a
        decreasing 1-D grid (checked: an increasing one raises); returns the shape of ``x``.
        """

        def solver(model: Callable, x: Tensor, ts: Tensor, process: Process) -> Tensor:
            ts = time_grid(ts)
            return self.pf_ode_map(x, ts[0], ts[-1], process)

        return solver
