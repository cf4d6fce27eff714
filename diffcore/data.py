r"""Data without the internet: toy 2-D sets, their exact mixtures, digits and a few images.

- Toy sets are samplers ``(n, generator=None) -> (n, 2)`` in the default dtype, drawn from
  ``generator`` (a ``torch.Generator``; its device is used).  :func:`two_moons`,
  :func:`swiss_roll` and :func:`checkerboard` are centred and scaled so that
  :math:`\mathbb E\lVert x\rVert^2 = 2` (unit variance per coordinate on average), from
  their closed-form moments.  :func:`eight_gaussians` is the law of
  :func:`eight_gaussians_mixture`: a toy set with an exact model.
- Exact mixtures (:class:`~diffcore.analytic.GaussianMixture`, float64): :func:`ring_mixture`,
  :func:`eight_gaussians_mixture`, :func:`grid_mixture`; and :func:`fit_gaussian_mixture`
  to build one from data.
- Images ``(N, channels, H, W)`` in [-1, 1]: :func:`digits` (scikit-learn's 1797
  handwritten 8x8 digits), and :func:`mnist` / :func:`cifar10` when torchvision and the
  files are present locally.  :func:`skimage_image` gives a grey test image in [0, 1].

Nothing here downloads.  scikit-learn, scikit-image and torchvision are imported only by
the functions that need them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore.analytic import GaussianMixture
from diffcore.checks import count, finite, one_of, positive, real

__all__ = [
    "two_moons",
    "swiss_roll",
    "eight_gaussians",
    "checkerboard",
    "ring_mixture",
    "eight_gaussians_mixture",
    "grid_mixture",
    "fit_gaussian_mixture",
    "digits",
    "dequantize",
    "mnist",
    "cifar10",
    "skimage_image",
]


def _uniform(n: int, generator, *shape) -> Tensor:
    device = generator.device if generator is not None else None
    return torch.rand(n, *shape, generator=generator, dtype=torch.float64, device=device)


def _normal(n: int, generator, *shape) -> Tensor:
    device = generator.device if generator is not None else None
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64, device=device)


def _integers(high: int, n: int, generator) -> Tensor:
    device = generator.device if generator is not None else None
    return torch.randint(high, (n,), generator=generator, device=device)


def _standardise(x: Tensor, mean: tuple[float, float], spread: float) -> Tensor:
    """Centre by the exact mean, scale so that E|x|^2 = 2 given spread = E|x - mean|^2."""
    scale = math.sqrt(spread / 2)
    return ((x - x.new_tensor(mean)) / scale).to(torch.get_default_dtype())


# -- toy 2-D sets ----------------------------------------------------------------------------
MOONS_NOISE = 0.1


def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Two interleaved half circles (scikit-learn's ``make_moons``), noise std 0.1, standardised.

    Upper moon :math:`(\cos\theta, \sin\theta)`, lower moon
    :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)`, :math:`\theta \sim U[0, \pi]`, each with
    probability 1/2.  Shapes: returns ``(n, 2)``.
    """
    n = count(n, "n")
    theta = math.pi * _uniform(n, generator)
    lower = _integers(2, n, generator).bool()
    x = torch.where(lower, 1 - torch.cos(theta), torch.cos(theta))
    y = torch.where(lower, 0.5 - torch.sin(theta), torch.sin(theta))
    points = torch.stack([x, y], 1) + MOONS_NOISE * _normal(n, generator, 2)
    # exact moments: mean (1/2, 1/4); var x = 1/2 + 1/4, var y = 1/2 - 4/pi^2 + (4/pi - 1/2)^2/4
    var = 0.75 + 0.5 - 4 / math.pi**2 + (4 / math.pi - 0.5) ** 2 / 4 + 2 * MOONS_NOISE**2
    return _standardise(points, (0.5, 0.25), var)


SWISS_NOISE = 0.5
_SWISS_A, _SWISS_B = 1.5 * math.pi, 4.5 * math.pi


def _swiss_moments() -> tuple[tuple[float, float], float]:
    """Mean and E|x - mean|^2 of (theta cos theta, theta sin theta) + noise, theta ~ U[a, b]."""
    a, b = _SWISS_A, _SWISS_B
    mean_x = ((b * math.sin(b) + math.cos(b)) - (a * math.sin(a) + math.cos(a))) / (b - a)
    mean_y = ((-b * math.cos(b) + math.sin(b)) - (-a * math.cos(a) + math.sin(a))) / (b - a)
    second = (b**3 - a**3) / (3 * (b - a)) + 2 * SWISS_NOISE**2  # E|x|^2 = E theta^2 + noise
    return (mean_x, mean_y), second - mean_x**2 - mean_y**2


def swiss_roll(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""A 2-D Swiss roll: :math:`(\theta\cos\theta, \theta\sin\theta)`, :math:`\theta \sim U[1.5\pi, 4.5\pi]`.

    Gaussian noise of std 0.5 (in the units of :math:`\theta`), then standardised.
    Shapes: returns ``(n, 2)``.
    """
    n = count(n, "n")
    theta = _SWISS_A + (_SWISS_B - _SWISS_A) * _uniform(n, generator)
    points = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], 1)
    points = points + SWISS_NOISE * _normal(n, generator, 2)
    mean, var = _swiss_moments()
    return _standardise(points, mean, var)


EIGHT_RADIUS, EIGHT_STD = math.sqrt(2.0), 0.25


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Eight Gaussians of std 1/4 at the angles :math:`\pi k / 4` on the circle of radius :math:`\sqrt2`.

    Equal weights; :math:`\mathbb E\lVert x\rVert^2 = 2 + 2/16`.  Its exact model is
    :func:`eight_gaussians_mixture`.  Shapes: returns ``(n, 2)``.
    """
    n = count(n, "n")
    angle = math.pi / 4 * _integers(8, n, generator).to(torch.float64)
    centre = EIGHT_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (centre + EIGHT_STD * _normal(n, generator, 2)).to(torch.get_default_dtype())


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Uniform on the 8 dark squares of a 4x4 checkerboard, scaled to unit variance per coordinate.

    Before scaling, square ``(i, j)`` is :math:`[i - 2, i - 1] \times [j - 2, j - 1]`, dark when
    :math:`i + j` is even; each coordinate is then uniform on [-2, 2] (variance 4/3).
    Shapes: returns ``(n, 2)``.
    """
    n = count(n, "n")
    i = _integers(4, n, generator)
    j = i % 2 + 2 * _integers(2, n, generator)  # i + j even
    points = torch.stack([i, j], 1).to(torch.float64) - 2 + _uniform(n, generator, 2)
    return _standardise(points, (0.0, 0.0), 2 * 4 / 3)


# -- exact mixtures ----------------------------------------------------------------------------
def _isotropic_mixture(means: Tensor, std: float) -> GaussianMixture:
    std = positive(std, "std")
    k, d = means.shape
    covs = std**2 * torch.eye(d, dtype=torch.float64).expand(k, d, d).clone()
    return GaussianMixture(means, covs, torch.full((k,), 1 / k, dtype=torch.float64))


def ring_mixture(
    k: int = 8, radius: float = EIGHT_RADIUS, std: float = EIGHT_STD
) -> GaussianMixture:
    r"""``k`` equal-weight Gaussians :math:`\mathcal N(r(\cos\tfrac{2\pi j}{k}, \sin\tfrac{2\pi j}{k}), s^2 I)`, 2-D."""
    count(k, "k")
    radius = real(radius, "radius")
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return _isotropic_mixture(radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1), std)


def eight_gaussians_mixture() -> GaussianMixture:
    """The exact law of :func:`eight_gaussians`: ``ring_mixture(8, sqrt(2), 1/4)``."""
    return ring_mixture(8, EIGHT_RADIUS, EIGHT_STD)


def grid_mixture(n: int = 5, spacing: float = 0.7, std: float = 0.1) -> GaussianMixture:
    """``n * n`` equal-weight Gaussians of std ``std`` on a centred square grid, 2-D."""
    count(n, "n")
    spacing = real(spacing, "spacing")
    line = spacing * (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)
    means = torch.cartesian_prod(line, line)
    return _isotropic_mixture(means, std)


def fit_gaussian_mixture(
    x: Tensor, k: int, reg_covar: float = 1e-3, seed: int = 0, max_iter: int = 500
) -> GaussianMixture:
    r"""Fit a ``k``-component Gaussian mixture with full covariances by EM (scikit-learn).

    ``reg_covar`` is added to every covariance's diagonal, so that all are positive definite
    even where the data are degenerate (digits have constant border pixels); for data in
    [-1, 1] the default floors each standard deviation at about 0.03.  The result is an exact
    prior (:class:`~diffcore.analytic.GaussianMixture`, float64) for every oracle in diffcore.
    Shapes: ``x`` ``(N, d)`` or ``(N, ...)`` (flattened); the mixture lives in dimension
    ``d = prod(...)``.
    """
    from sklearn.mixture import GaussianMixture as SklearnMixture

    count(k, "k")
    count(max_iter, "max_iter")
    if not (isinstance(x, Tensor) and x.ndim >= 2 and x.shape[0] >= k):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor (N, ...) with N >= k = {k}, got {shape}")
    finite(x, "x")
    positive(reg_covar, "reg_covar")
    data = x.detach().flatten(1).cpu().double().numpy()
    em = SklearnMixture(
        k, covariance_type="full", reg_covar=reg_covar, random_state=seed, max_iter=max_iter
    ).fit(data)
    if not em.converged_:
        raise ValueError(f"EM did not converge in max_iter = {max_iter} iterations")
    covs = torch.from_numpy(em.covariances_)
    weights = torch.from_numpy(em.weights_)
    return GaussianMixture(
        torch.from_numpy(em.means_), 0.5 * (covs + covs.transpose(1, 2)), weights / weights.sum()
    )


# -- images ------------------------------------------------------------------------------------
def digits(size: int = 8, split: str | None = None, normalize: bool = True):
    r"""scikit-learn's handwritten digits: ``(images (N, 1, size, size), labels (N,))``.

    1797 images of 8x8 pixels with 17 grey levels :math:`k \in \{0, \dots, 16\}`, mapped to
    :math:`2k/16 - 1 \in [-1, 1]` (``normalize=False``: :math:`k/16 \in [0, 1]`), in the
    default dtype; labels 0..9 (int64).  ``size > 8`` upsamples bilinearly (values stay in
    range).  ``split``: None for all, ``"test"`` for every fifth image (360), ``"train"`` for
    the others (1437).  For bits per dimension use ``levels=17``.
    """
    from sklearn.datasets import load_digits

    count(size, "size", low=8)
    one_of(split, "split", (None, "train", "test"))
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.get_default_dtype())[:, None] / 16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if split is not None:
        test = torch.arange(len(labels)) % 5 == 0
        keep = test if split == "test" else ~test
        images, labels = images[keep], labels[keep]
    if normalize:
        images = 2 * images - 1
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, labels


def dequantize(x: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Uniform dequantisation: move each value of ``x`` uniformly within its grey-level bin.

    ``x`` holds discrete data on ``levels`` equally spaced values in :math:`[-1, 1]` (bin
    width :math:`\Delta = 2/(L-1)`, e.g. ``levels=17`` for :func:`digits`); the result is
    :math:`x + \Delta(u - \tfrac12)`, :math:`u \sim U[0, 1)`.  A density model of the
    dequantised data gives a bound on the discrete likelihood (Theis et al., 2016; see
    :func:`diffcore.likelihood.bits_per_dim`).  Shapes: any; returns the shape of ``x``.
    """
    count(levels, "levels", low=2)
    finite(x, "x")
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return x + 2 / (levels - 1) * (u - 0.5)


def _data_folder(root, name: str, marker: str) -> Path:
    root = root if root is not None else os.environ.get("DIFFCORE_DATA")
    if root is None:
        raise FileNotFoundError(
            f"{name}: no data folder; pass root=... or set DIFFCORE_DATA to a folder holding "
            f"{marker}/ (diffcore never downloads; torchvision's download=True writes that layout)"
        )
    folder = Path(root) / marker
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name}: {folder} not found; put the torchvision files there (diffcore never "
            f"downloads; torchvision.datasets with download=True writes that layout)"
        )
    return Path(root)


def _torchvision(name: str):
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(f"{name} needs torchvision: pip install torchvision") from err
    return torchvision


def _load(name: str, cls: str, root: Path, train: bool):
    datasets = _torchvision(name).datasets
    try:
        return getattr(datasets, cls)(str(root), train=train, download=False)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name}: the files under {root} are missing or corrupt: {err}"
        ) from err


def mnist(root=None, train: bool = True):
    """MNIST from local files: ``(images (N, 1, 28, 28) in [-1, 1], labels (N,))``.

    ``root`` (or the environment variable ``DIFFCORE_DATA``) holds ``MNIST/raw/`` as written
    by ``torchvision.datasets.MNIST``.  Pixels :math:`k \\in \\{0..255\\}` map to
    :math:`k / 127.5 - 1`.  Raises ``FileNotFoundError`` without the files and
    ``ImportError`` without torchvision; never downloads.
    """
    root = _data_folder(root, "mnist", "MNIST/raw")
    dataset = _load("mnist", "MNIST", root, train)
    images = dataset.data.to(torch.get_default_dtype())[:, None] / 127.5 - 1
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


def cifar10(root=None, train: bool = True):
    """CIFAR-10 from local files: ``(images (N, 3, 32, 32) in [-1, 1], labels (N,))``.

    ``root`` (or ``DIFFCORE_DATA``) holds ``cifar-10-batches-py/`` as written by
    ``torchvision.datasets.CIFAR10``.  Errors as in :func:`mnist`; never downloads.
    """
    root = _data_folder(root, "cifar10", "cifar-10-batches-py")
    dataset = _load("cifar10", "CIFAR10", root, train)
    images = torch.as_tensor(dataset.data).permute(0, 3, 1, 2).to(torch.get_default_dtype())
    return images / 127.5 - 1, torch.as_tensor(dataset.targets, dtype=torch.int64)


SKIMAGE_IMAGES = ("camera", "astronaut", "shepp_logan_phantom")


def skimage_image(name: str, size: int | None = None) -> Tensor:
    """A grey test image from ``skimage.data`` in [0, 1], shape ``(1, 1, H, W)``, default dtype.

    ``name`` is ``"camera"`` (512x512), ``"astronaut"`` (512x512, converted to grey) or
    ``"shepp_logan_phantom"`` (400x400).  ``size`` resizes to ``size x size`` (bilinear,
    antialiased when shrinking).
    """
    import skimage.color
    import skimage.data

    one_of(name, "name", SKIMAGE_IMAGES)
    image = getattr(skimage.data, name)()
    if name == "astronaut":
        image = skimage.color.rgb2gray(image)  # float in [0, 1]
    elif image.dtype.kind == "u":
        image = image / 255.0
    x = torch.as_tensor(image, dtype=torch.get_default_dtype())[None, None]
    if size is not None:
        size = count(size, "size")
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = x.clamp(0, 1)  # the filter weights are non-negative: this only removes round-off
    return x
