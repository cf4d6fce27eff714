"""Toy sets against their closed-form moments, the exact mixtures, digits, images and errors."""

import importlib.util
import math

import pytest
import torch

from diffcore import data, processes

from .test_analytic import make_mixture

P0 = processes.Linear()  # at t = 0, alpha = 1 and sigma = 0: log_prob(x, 0.0, P0) is log p_0

TOYS = {
    "two_moons": data.two_moons,
    "swiss_roll": data.swiss_roll,
    "eight_gaussians": data.eight_gaussians,
    "checkerboard": data.checkerboard,
}


@pytest.mark.parametrize("name", list(TOYS))
def test_toy_sets_are_deterministic_samplers(name):
    sample = TOYS[name]
    x = sample(100, torch.Generator().manual_seed(0))
    assert x.shape == (100, 2) and x.dtype == torch.get_default_dtype()
    assert bool(torch.isfinite(x).all())
    assert torch.equal(x, sample(100, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, sample(100, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="n must be an integer >= 1, got n = 0"):
        sample(0)


@pytest.mark.parametrize("name", ["two_moons", "swiss_roll", "checkerboard"])
def test_standardised_toy_sets_have_mean_zero_and_unit_scale(name):
    """Centred and scaled with their exact moments: E x = 0 and E|x|^2 = 2, within 4 standard
    errors of 200k samples."""
    n = 200_000
    x = TOYS[name](n, torch.Generator().manual_seed(0))
    se_mean = x.std(0) / math.sqrt(n)
    assert bool((x.mean(0).abs() <= 4 * se_mean).all()), x.mean(0)
    sq = (x**2).sum(1)
    assert abs(float(sq.mean()) - 2) <= 4 * float(sq.std()) / math.sqrt(n), float(sq.mean())


def test_checkerboard_fills_the_dark_squares():
    x = data.checkerboard(10_000, torch.Generator().manual_seed(0))
    cells = torch.floor(x * math.sqrt(4 / 3) + 2).long()  # undo the scaling: cells 0..3
    assert bool(((cells >= 0) & (cells <= 3)).all())
    assert bool((cells.sum(1) % 2 == 0).all())
    assert len(set(map(tuple, cells.tolist()))) == 8


def test_eight_gaussians_is_the_law_of_its_exact_mixture():
    """The toy set and eight_gaussians_mixture() are written independently; their laws agree:
    mean 0 and covariance (r^2/2 + s^2) I, and the same mean log-density under the mixture
    (a statistic that also sees where the modes sit), within 4 standard errors."""
    mixture = data.eight_gaussians_mixture()
    n = 200_000
    toy = data.eight_gaussians(n, torch.Generator().manual_seed(0))
    exact_var = data.EIGHT_RADIUS**2 / 2 + data.EIGHT_STD**2
    cov = torch.cov(toy.T)
    assert bool((toy.mean(0).abs() <= 4 * math.sqrt(exact_var / n)).all())
    # sample covariance entries: SE about sqrt(E[x_i^2 x_j^2] / n)
    se_cov = torch.sqrt(((toy[:, :, None] * toy[:, None, :]) ** 2).mean(0) / n)
    assert bool(((cov - exact_var * torch.eye(2)).abs() <= 4 * se_cov).all()), cov
    log_p_toy = mixture.log_prob(toy, 0.0, P0)
    log_p_mix = mixture.log_prob(mixture.sample(n, torch.Generator().manual_seed(1)), 0.0, P0)
    se = math.hypot(float(log_p_toy.std()), float(log_p_mix.std())) / math.sqrt(n)
    assert abs(float(log_p_toy.mean() - log_p_mix.mean())) <= 4 * se
    modes = mixture.responsibilities(toy, 0.0, P0).argmax(1)
    freq = torch.bincount(modes, minlength=8).double() / n
    assert bool(((freq - 1 / 8).abs() <= 4 * math.sqrt(1 / 8 * 7 / 8 / n)).all()), freq


def test_exact_mixture_constructors():
    ring = data.ring_mixture(6, radius=2.0, std=0.3)
    assert ring.n_components == 6 and ring.dim == 2
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((6,), 2.0))
    torch.testing.assert_close(ring.means.sum(0), torch.zeros(2), atol=1e-12, rtol=0)
    torch.testing.assert_close(ring.covs, 0.09 * torch.eye(2).expand(6, 2, 2))
    torch.testing.assert_close(ring.weights, torch.full((6,), 1 / 6))
    grid = data.grid_mixture(3, spacing=1.0, std=0.1)
    assert sorted(map(tuple, grid.means.tolist())) == [
        (i, j) for i in (-1.0, 0.0, 1.0) for j in (-1.0, 0.0, 1.0)
    ]
    with pytest.raises(ValueError, match="std must be a positive finite number, got std = 0"):
        data.ring_mixture(4, 1.0, 0.0)


def test_fit_gaussian_mixture_recovers_a_known_mixture():
    """EM's maximum-likelihood estimates lie within a few standard errors of the truth:
    means sqrt(Sigma_ii / n_k), covariances sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n_k),
    weights sqrt(w (1 - w) / n); we allow 5."""
    truth = make_mixture()
    n = 40_000
    x = truth.sample(n, generator=torch.Generator().manual_seed(0))
    fitted = data.fit_gaussian_mixture(x, 3, reg_covar=1e-8)  # the ridge is far below the SE
    order = [int(torch.cdist(m[None], fitted.means).argmin()) for m in truth.means]
    assert sorted(order) == [0, 1, 2]
    for k, j in enumerate(order):
        w, cov = float(truth.weights[k]), truth.covs[k]
        n_k = n * w
        diag = torch.diag(cov)
        assert bool(((fitted.means[j] - truth.means[k]).abs() <= 5 * torch.sqrt(diag / n_k)).all())
        se_cov = torch.sqrt((diag[:, None] * diag[None, :] + cov**2) / n_k)
        assert bool(((fitted.covs[j] - cov).abs() <= 5 * se_cov).all())
        assert abs(float(fitted.weights[j]) - w) <= 5 * math.sqrt(w * (1 - w) / n)


def test_fit_gaussian_mixture_on_digits_gives_an_exact_prior():
    images, _ = data.digits()
    prior = data.fit_gaussian_mixture(images, 2)  # full covariances, made definite by the ridge
    assert prior.dim == 64 and prior.means.dtype == torch.float64
    assert float(torch.linalg.eigvalsh(prior.covs).min()) >= 1e-3 * (1 - 1e-9)
    assert bool(torch.isfinite(prior.log_prob(images[:5], 0.0, P0)).all())
    with pytest.raises(ValueError, match=r"x must be a tensor \(N, ...\) with N >= k = 3"):
        data.fit_gaussian_mixture(torch.zeros(2, 2), 3)


def test_dequantize_stays_in_the_bin_and_is_uniform(gen):
    images, _ = data.digits()
    noisy = data.dequantize(images, 17, generator=gen)
    offset = (noisy - images) / (2 / 16)  # uniform on [-1/2, 1/2): mean 0, variance 1/12
    assert float(offset.min()) >= -0.5 and float(offset.max()) < 0.5
    n = offset.numel()
    assert abs(float(offset.mean())) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(offset.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    # rounding back to the 17 levels recovers the data exactly
    torch.testing.assert_close(torch.round((noisy + 1) * 8) / 8 - 1, images)
    with pytest.raises(ValueError, match="levels must be an integer >= 2, got levels = 1"):
        data.dequantize(images, 1)


def test_digits():
    images, labels = data.digits()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert labels.dtype == torch.int64 and sorted(set(labels.tolist())) == list(range(10))
    levels = torch.unique(images)
    torch.testing.assert_close(levels, torch.arange(17) / 8 - 1)  # 17 grey levels in [-1, 1]
    train_x, train_y = data.digits(split="train")
    test_x, test_y = data.digits(split="test")
    assert len(train_y) == 1437 and len(test_y) == 360
    assert torch.equal(torch.cat([train_x, test_x]).sort(0).values, images.sort(0).values)
    raw, _ = data.digits(normalize=False)
    torch.testing.assert_close(2 * raw - 1, images)
    big, big_labels = data.digits(size=16)
    assert big.shape == (1797, 1, 16, 16) and torch.equal(big_labels, labels)
    assert float(big.min()) >= -1 and float(big.max()) <= 1  # bilinear weights are convex
    with pytest.raises(
        ValueError, match=r"split must be one of \(None, 'train', 'test'\), got split = 'val'"
    ):
        data.digits(split="val")
    with pytest.raises(ValueError, match="size must be an integer >= 8, got size = 4"):
        data.digits(size=4)


@pytest.mark.parametrize(
    "loader,marker", [(data.mnist, "MNIST/raw"), (data.cifar10, "cifar-10-batches-py")]
)
def test_mnist_and_cifar10_say_what_is_missing(loader, marker, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFCORE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="set DIFFCORE_DATA"):
        loader()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / marker} not found"):
        loader(tmp_path)
    monkeypatch.setenv("DIFFCORE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / marker} not found"):
        loader()
    (tmp_path / marker).mkdir(parents=True)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="needs torchvision: pip install torchvision"):
            loader()
    else:  # the folder is there but empty
        with pytest.raises(FileNotFoundError, match="missing or corrupt"):
            loader()


def test_skimage_images():
    for name, side in (("camera", 512), ("astronaut", 512), ("shepp_logan_phantom", 400)):
        x = data.skimage_image(name)
        assert x.shape == (1, 1, side, side) and x.dtype == torch.get_default_dtype()
        assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.std()) > 0.1
    small = data.skimage_image("camera", size=64)
    assert small.shape == (1, 1, 64, 64)
    assert float(small.min()) >= 0 and float(small.max()) <= 1
    with pytest.raises(ValueError, match=r"name must be one of .* got name = 'lena'"):
        data.skimage_image("lena")
