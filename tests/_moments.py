"""A shared Monte-Carlo check against an exact Gaussian law."""

import torch


def assert_gaussian_moments(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance of ``samples`` ``(n, d)`` within 5 exact standard errors of
    N(mean, cov): sqrt(C_ii / n) for the mean, sqrt((C_ii C_jj + C_ij^2) / n) for the covariance
    (exact for Gaussian samples)."""
    n = samples.shape[0]
    var = cov.diagonal()
    z_mean = (samples.mean(0) - mean) / (var / n).sqrt()
    z_cov = (samples.T.cov() - cov) / ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert float(z_mean.abs().max()) < 5 and float(z_cov.abs().max()) < 5, (z_mean, z_cov)
