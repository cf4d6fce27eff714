r"""Distances between laws: exact ones between Gaussians, and sample-based ones.

- :func:`sampler_output_law`: the exact law of a sampler's output on Gaussian data.  The exact
  denoiser of :math:`\mathcal N(\mu, \Sigma)` is affine in :math:`x`, so every sampler in
  :mod:`diffcore.samplers` is an affine map of its Gaussian inputs (the start state and the
  noise it injects) and its output is Gaussian, with a mean and covariance computed here from
  autograd Jacobians (Pierret & Galerne, 2025): error against NFE without Monte Carlo.
- :func:`gaussian_w2`: the closed-form Wasserstein-2 distance between two Gaussians.
- :func:`sliced_wasserstein` and :func:`mmd`: two-sample distances for laws known only
  through samples (Gaussian mixtures, learned models).
- :func:`convergence_order`: the order :math:`p` of an error that falls as :math:`C n^{-p}`.
- :func:`psnr` and :func:`ssim`: the image-quality scores of the inverse-problem chapters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffcore import samplers as _samplers
from diffcore.analytic import Gaussian
from diffcore.checks import count, finite, positive
from diffcore.processes import Process

__all__ = [
    "sampler_output_law",
    "gaussian_w2",
    "sliced_wasserstein",
    "mmd",
    "straightness",
    "convergence_order",
    "psnr",
    "ssim",
]

STARTS = ("marginal", "prior")


def sampler_output_law(
    sampler: Callable | str,
    gaussian: Gaussian,
    ts: Tensor,
    process: Process,
    start: str = "marginal",
    **options,
) -> tuple[Tensor, Tensor]:
    r"""The exact law :math:`\mathcal N(m, C)` of ``sampler``'s output on Gaussian data.

    The start state is :math:`x \sim p_{t_0} = \mathcal N(\alpha_{t_0}\mu, \alpha_{t_0}^2\Sigma
    + \sigma_{t_0}^2 I)` (``start="marginal"``, the exact marginal) or :math:`\mathcal N(0,
    \sigma_{t_0}^2 I)` (``start="prior"``, what ``process.prior_sample`` draws).  The sampler
    runs once, in float64, on one sample with the exact denoiser ``gaussian.denoiser(process)``,
    at :math:`x` = the start mean and with every injected noise :math:`z_k` replaced (through
    its ``noise_sampler`` option) by a zero tensor that autograd tracks.  The output
    :math:`y = A x + \sum_k B_k z_k + c` is affine, so

    .. math:: m = y(x = \bar x_0, z = 0), \qquad C = A C_0 A^\top + \sum_k B_k B_k^\top,

    with the Jacobians :math:`A`, :math:`B_k` from :math:`d` backward passes (a registered
    sampler whose facts say it is not affine is refused).  ``options`` go to
    the sampler (``eta``, ``denoise_last``, ...).  Cost: one run and :math:`d` backward passes
    with a batch of one.  Shapes: returns ``mean`` ``(d,)`` and ``cov`` ``(d, d)``, float64.
    """
    if isinstance(sampler, str):
        if sampler not in _samplers.SAMPLERS:
            raise ValueError(
                f"sampler must be a callable or one of {tuple(_samplers.SAMPLERS)}, got "
                f"sampler = {sampler!r}"
            )
        sampler = _samplers.SAMPLERS[sampler]
    if not callable(sampler):
        raise TypeError(f"sampler must be a callable or a name, got {type(sampler).__name__}")
    if not isinstance(gaussian, Gaussian):
        raise ValueError(f"gaussian must be an analytic.Gaussian, got {type(gaussian).__name__}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got start = {start!r}")
    if isinstance(sampler, _samplers.Sampler):  # its facts say which options it takes
        allowed = (*sampler.options, "denoise_last")
        for name in options:
            if name not in allowed:
                raise ValueError(
                    f"{name!r} is not an option of {sampler.name} here (its options: {allowed})"
                )
        if not sampler.is_affine(**options):
            raise ValueError(
                f"{sampler.name} with options {options} is not affine in its start state, so "
                "its output law on Gaussian data is not Gaussian; estimate it by Monte Carlo"
            )
    ts = _samplers.check_time_grid(ts).to(torch.float64)
    dtype = torch.float64
    d = gaussian.dim
    law = gaussian.marginal(ts[0], process)
    if start == "marginal":
        mean0, cov0 = law.mean.to(dtype), law.cov.to(dtype)
    else:
        mean0 = torch.zeros(d, dtype=dtype)
        cov0 = process.sigma(ts[0]).to(dtype) ** 2 * torch.eye(d, dtype=dtype)

    noises: list[Tensor] = []

    def tracked_zeros(i: int, shape) -> Tensor:
        z = torch.zeros(shape, dtype=dtype, requires_grad=True)
        noises.append(z)
        return z

    options["noise_sampler"] = tracked_zeros  # every sampler takes the one noise hook
    x = mean0.clone()[None].requires_grad_(True)
    with torch.enable_grad():
        y = sampler(gaussian.denoiser(process), x, ts, process, **options).reshape(d)
        inputs = [x, *noises]
        rows = []
        for j in range(d):
            grads = torch.autograd.grad(y[j], inputs, retain_graph=j < d - 1, allow_unused=True)
            rows.append(
                [
                    torch.zeros_like(v) if g is None else g
                    for g, v in zip(grads, inputs, strict=True)
                ]
            )
    jac_x = torch.stack([row[0].reshape(d) for row in rows])  # (d, d)
    cov = jac_x @ cov0 @ jac_x.T
    if noises:
        jac_z = torch.stack([torch.cat([g.reshape(-1) for g in row[1:]]) for row in rows])
        cov = cov + jac_z @ jac_z.T  # (d, K d) (K d, d): the sum over injected noises
    return y.detach(), 0.5 * (cov + cov.T)


def _psd_tolerance(dtype: torch.dtype) -> float:
    r"""How far below 0 (relative to :math:`\lVert C\rVert_2`) an eigenvalue of a covariance may
    fall, and how far from symmetric (relative to its largest entry) it may be, in ``dtype``:
    :math:`\sqrt{\epsilon}` (1.5e-8 in float64, 3.5e-4 in float32).

    A covariance assembled in floating point from :math:`n` products (an empirical covariance
    of :math:`n` samples, :math:`J C J^\top`, a sum of outer products) differs from the exact,
    positive semi-definite one by up to about :math:`n\,\epsilon\lVert C\rVert` (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 3.1), and a symmetric eigensolver adds
    :math:`O(d\,\epsilon\lVert C\rVert_2)`; :math:`\sqrt\epsilon` covers :math:`n` up to
    :math:`1/\sqrt\epsilon` (6.7e7 in float64).  A larger negative eigenvalue, or asymmetry,
    is not round-off but a wrong matrix.
    """
    return torch.finfo(dtype).eps ** 0.5


def _sqrtm_psd(mat: Tensor, name: str = "cov") -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix, via eigh.

    Raises if ``mat`` is not symmetric, or has an eigenvalue below 0, beyond round-off
    (:func:`_psd_tolerance`); eigenvalues below 0 within it are clamped to 0.
    """
    tol = _psd_tolerance(mat.dtype)
    scale = float(mat.abs().amax()) if mat.numel() else 0.0
    asymmetry = float((mat - mat.transpose(-1, -2)).abs().amax()) if mat.numel() else 0.0
    if asymmetry > tol * scale:
        raise ValueError(
            f"{name} must be symmetric, got max |{name} - {name}.T| = {asymmetry:.3g} for "
            f"entries up to {scale:.3g}"
        )
    evals, evecs = torch.linalg.eigh(0.5 * (mat + mat.transpose(-1, -2)))
    norm = float(evals.abs().amax()) if evals.numel() else 0.0
    smallest = float(evals.amin()) if evals.numel() else 0.0
    if smallest < -tol * norm:
        raise ValueError(
            f"{name} must be positive semi-definite, got an eigenvalue {smallest:.6g} of {name} "
            f"(largest magnitude {norm:.6g}; round-off in {mat.dtype} stays above "
            f"{-tol * norm:.3g})"
        )
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)


def _check_law(mean: Tensor, cov: Tensor, i: int) -> None:
    finite(mean, f"mean{i}")
    finite(cov, f"cov{i}")
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(
            f"mean{i} and cov{i} must have shapes (d,) and (d, d), got {tuple(mean.shape)} and "
            f"{tuple(cov.shape)}"
        )
    if mean.is_complex() or cov.is_complex():
        raise TypeError(f"mean{i} and cov{i} must be real, got {mean.dtype} and {cov.dtype}")


def gaussian_w2(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    r"""Wasserstein-2 distance between :math:`\mathcal N(m_1, C_1)` and :math:`\mathcal N(m_2, C_2)`.

    .. math::
        W_2^2 &= \lVert m_1 - m_2\rVert^2 + \operatorname{tr}\big(C_1 + C_2
                 - 2\,(C_1^{1/2} C_2 C_1^{1/2})^{1/2}\big) \\
              &= \lVert m_1 - m_2\rVert^2
                 + \min_{U^\top U = I}\lVert C_1^{1/2} - C_2^{1/2} U\rVert_F^2 .

    The second form (orthogonal Procrustes, :math:`U = WV^\top` from the SVD
    :math:`C_2^{1/2}C_1^{1/2} = WSV^\top`) is the one computed: it subtracts the square roots
    themselves, where the trace form subtracts traces of size :math:`\operatorname{tr} C` and
    so cannot resolve distances below about :math:`\sqrt{10^{-16}\operatorname{tr} C}` in
    float64.  Here the round-off is a few ulps of :math:`\lVert C^{1/2}\rVert`.  Square roots
    from ``eigh``, negative round-off eigenvalues clamped to 0.  A covariance that is not
    symmetric, or has an eigenvalue below :math:`-\sqrt{\epsilon}\,\lVert C\rVert_2` with
    :math:`\epsilon` the machine epsilon of its dtype, is refused: a covariance assembled from
    :math:`n` products is off by about :math:`n\epsilon\lVert C\rVert`, so
    :math:`\sqrt\epsilon` leaves room for :math:`n` up to :math:`1/\sqrt\epsilon` (6.7e7 in
    float64), and a more negative eigenvalue is a wrong matrix, not round-off.  Shapes:
    ``mean`` ``(d,)``, ``cov`` ``(d, d)``; returns a 0-d tensor.
    """
    _check_law(mean1, cov1, 1)
    _check_law(mean2, cov2, 2)
    if mean1.shape != mean2.shape:
        raise ValueError(
            f"the laws must have the same dimension, got d = {mean1.shape[0]} and {mean2.shape[0]}"
        )
    root1, root2 = _sqrtm_psd(cov1, "cov1"), _sqrtm_psd(cov2, "cov2")
    w, _, vh = torch.linalg.svd(root2 @ root1)
    gap = root1 - root2 @ (w @ vh)
    return ((mean1 - mean2).pow(2).sum() + gap.pow(2).sum()).sqrt()


def _check_samples(x: Tensor, y: Tensor, same_size: bool) -> None:
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, Tensor) or v.ndim != 2:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a (n, d) tensor of samples, got {shape}")
        if v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(
                f"{name} must hold at least one sample of at least one coordinate, got {name} "
                f"of shape {tuple(v.shape)}"
            )
        finite(v, name)
        if v.is_complex():
            raise TypeError(f"{name} must be real, got dtype {v.dtype}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if same_size and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same size, got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(
            f"x and y must share dtype and device, got {x.dtype} on {x.device} "
            f"and {y.dtype} on {y.device}"
        )


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_projections: int = 256, generator: torch.Generator | None = None
) -> Tensor:
    r"""Sliced Wasserstein-2 distance between two equal-size sample sets.

    :math:`SW_2^2 = \mathbb E_\theta W_2^2(\theta^\top x, \theta^\top y)`, with
    :math:`\theta` uniform on the sphere (``n_projections`` draws from ``generator``) and the
    1-D :math:`W_2^2` between empirical laws of equal size the mean squared difference of the
    sorted projections.  In 1-D it is the exact :math:`W_2` between the two empirical laws.
    A Monte-Carlo quantity: for two independent ``n``-samples of one law it is of order
    :math:`n^{-1/2}` (times the scale), not 0.  Shapes: ``x``, ``y`` ``(n, d)``; returns a 0-d
    tensor.
    """
    _check_samples(x, y, same_size=True)
    n_projections = count(n_projections, "n_projections")
    theta = torch.randn(
        x.shape[1], n_projections, generator=generator, dtype=x.dtype, device=x.device
    )
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return (px - py).pow(2).mean().sqrt()


def mmd(x: Tensor, y: Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0)) -> Tensor:
    r"""Unbiased estimate of the squared maximum mean discrepancy :math:`\mathrm{MMD}^2(p, q)`.

    Kernel: a mixture of Gaussian (RBF) kernels :math:`k(a, b) = \sum_\ell
    \exp(-\lVert a - b\rVert^2 / (2\ell^2))` over ``bandwidths`` (suited to data of unit
    scale).  With :math:`x_i \sim p` (``m``) and :math:`y_j \sim q` (``n``),

    .. math::
        \widehat{\mathrm{MMD}}^2 = {} & \frac{1}{m(m-1)}\sum_{i \ne i'} k(x_i, x_{i'})
            + \frac{1}{n(n-1)}\sum_{j \ne j'} k(y_j, y_{j'}) \\
            & - \frac{2}{mn}\sum_{i,j} k(x_i, y_j),

    unbiased, so it scatters around 0 (and can be negative) when :math:`p = q`.  Shapes:
    ``x`` ``(m, d)``, ``y`` ``(n, d)``, ``m, n >= 2``; returns a 0-d tensor.
    """
    _check_samples(x, y, same_size=False)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"mmd needs at least 2 samples each, got {x.shape[0]} and {y.shape[0]}")
    widths = torch.as_tensor(bandwidths, dtype=x.dtype, device=x.device).reshape(-1)
    if widths.numel() == 0 or not bool(((widths > 0) & torch.isfinite(widths)).all()):
        raise ValueError(f"bandwidths must be positive, got bandwidths = {bandwidths!r}")

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        dist2 = torch.cdist(a, b).pow(2)
        return torch.exp(-dist2[..., None] / (2 * widths**2)).sum(-1)

    m, n = x.shape[0], y.shape[0]
    kxx, kyy = kernel(x, x), kernel(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * kernel(x, y).mean()


def straightness(path: Tensor, ts: Tensor) -> Tensor:
    r"""The straightness :math:`S` of trajectories (Liu et al., 2023), one value per trajectory.

    .. math::
        S = \frac{1}{|t_N - t_0|}\int \big\lVert \dot x_t - \bar v\big\rVert^2\,|dt|,
        \qquad \bar v = \frac{x_{t_N} - x_{t_0}}{t_N - t_0},

    zero exactly when the path runs along its chord at constant speed.  The path is known on
    the grid ``ts`` (any direction, e.g. from noise at 1 to data at 0, as a sampler's
    ``callback`` records it): each step's velocity is its difference quotient, weighted by
    its share of the time span (a Riemann sum, exact for piecewise-linear paths).  Shapes:
    ``path`` ``(len(ts), batch, ...)``, ``ts`` ``(N + 1,)`` strictly monotone; returns
    ``(batch,)``.
    """
    if not (isinstance(ts, Tensor) and ts.ndim == 1 and ts.numel() >= 2):
        raise ValueError(f"ts must be a 1-d tensor of at least 2 times, got {ts!r}")
    finite(ts, "ts")
    steps = ts.diff()
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError(f"ts must be strictly monotone, got ts = {ts.tolist()}")
    if not (isinstance(path, Tensor) and path.ndim >= 2 and path.shape[0] == ts.numel()):
        shape = tuple(path.shape) if isinstance(path, Tensor) else type(path).__name__
        raise ValueError(f"path must be (len(ts) = {ts.numel()}, batch, ...), got {shape}")
    finite(path, "path")
    path = path.flatten(2)
    steps = steps.to(path)
    chord = (path[-1] - path[0]) / (ts[-1] - ts[0]).to(path)
    velocity = path.diff(dim=0) / steps[:, None, None]
    weights = steps / steps.sum()  # the share of the time span: positive in either direction
    return ((velocity - chord) ** 2).sum(-1).mul(weights[:, None]).sum(0)


def convergence_order(steps, errors) -> float:
    r"""The order :math:`p` of an error that falls as :math:`e_n \approx C n^{-p}`: minus the
    least-squares slope of :math:`\log e_n` against :math:`\log n`.

    Exact (to round-off) for an exact power law; with two points it is
    :math:`\log(e_{n_1}/e_{n_2}) / \log(n_2/n_1)`.  Shapes: ``steps`` and ``errors`` are
    sequences (or 1-D tensors) of the same length, at least 2, of positive numbers; returns a
    float.
    """
    n = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(errors, dtype=torch.float64).reshape(-1)
    if n.numel() != e.numel() or n.numel() < 2:
        raise ValueError(
            f"need as many errors as step counts, at least 2, got {n.numel()} and {e.numel()}"
        )
    if not (bool((n > 0).all()) and bool((e > 0).all()) and bool(torch.isfinite(e).all())):
        raise ValueError(
            f"steps and errors must be positive and finite, got steps = {n.tolist()}, "
            f"errors = {e.tolist()}"
        )
    if bool((n == n[0]).all()):
        raise ValueError(f"steps must not all be equal, got steps = {n.tolist()}")
    log_n, log_e = n.log() - n.log().mean(), e.log() - e.log().mean()
    return -float((log_n * log_e).sum() / log_n.pow(2).sum())


def _check_images(x: Tensor, ref: Tensor, data_range) -> None:
    for name, v in (("x", x), ("ref", ref)):
        if not isinstance(v, Tensor) or v.ndim < 3:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a (batch, ...) tensor of images, got {shape}")
    if x.shape != ref.shape:
        raise ValueError(
            f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )
    positive(data_range, "data_range")
    for name, v in (("x", x), ("ref", ref)):
        if v.is_complex():
            raise TypeError(f"{name} must be real, got dtype {v.dtype}")
        finite(v, name)


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    r"""Peak signal-to-noise ratio of each image, in dB:
    :math:`10 \log_{10}(R^2 / \mathrm{MSE})`, with :math:`R` the ``data_range`` (2 for pixels
    in ``[-1, 1]``, the convention of :mod:`diffcore.data`; 1 for ``[0, 1]``).

    Computed in float64, as :func:`skimage.metrics.peak_signal_noise_ratio`; ``inf`` for an
    exact copy.  Shapes: ``x``, ``ref`` ``(batch, ...)`` (at least 3 dimensions, e.g.
    ``(batch, channels, height, width)``); returns ``(batch,)`` in float64.
    """
    _check_images(x, ref, data_range)
    mse = (x.double() - ref.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    r"""Structural similarity of each image (Wang et al., 2004), by
    :func:`skimage.metrics.structural_similarity` with its defaults (7 x 7 uniform window)
    and the given ``data_range``; channels, if more than one, are averaged.

    Shapes: ``x``, ``ref`` ``(batch, channels, height, width)``; returns ``(batch,)`` in
    float64, 1 for an exact copy.
    """
    from skimage.metrics import structural_similarity

    _check_images(x, ref, data_range)
    if x.ndim != 4:
        raise ValueError(f"ssim needs (batch, channels, height, width), got {tuple(x.shape)}")
    a = x.detach().double().cpu().numpy()
    b = ref.detach().double().cpu().numpy()
    values = [
        structural_similarity(r, e, data_range=data_range, channel_axis=0)
        for r, e in zip(b, a, strict=True)
    ]
    return torch.tensor(values, dtype=torch.float64)
