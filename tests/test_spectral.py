"""Diagonal (per-coefficient) diffusions and shortest-path diffusion against exact answers."""

import math

import pytest
import torch

from diffcore import analytic, processes, samplers
from diffcore import spectral as sp

N = 4  # 4 x 4 images: d = 16
BASIS = sp.dct_basis(N)
SPECTRUM = sp.power_law_spectrum(BASIS.frequencies, c1=1.5, c2=0.3, m=1.5)  # both sides of 1
VP = processes.VP()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _processes():
    return {
        "spd": sp.ShortestPath(SPECTRUM, BASIS),
        "vp": sp.Diagonal.uniform(VP, BASIS),
        "cosine": sp.Diagonal.uniform(processes.VPCosine(), BASIS),
    }


# -- the basis ---------------------------------------------------------------------------------
def test_dct_basis_is_orthonormal_and_a_constant_image_is_its_first_vector():
    u = BASIS.matrix
    assert torch.allclose(u.T @ u, torch.eye(N * N, dtype=u.dtype), atol=1e-14)
    z = BASIS.analyse(torch.ones(1, 1, N, N, dtype=torch.float64))
    assert abs(float(z[0, 0]) - N) < 1e-13 and float(z[0, 1:].abs().max()) < 1e-13
    x = torch.randn(3, 1, N, N, generator=_gen(), dtype=torch.float64)
    assert torch.allclose(BASIS.synthesise(BASIS.analyse(x), x.shape), x, atol=1e-14)
    # frequency of vector (u, v) = sqrt(u^2 + v^2): (0, 1) is column 1, (1, 1) column N + 1
    assert float(BASIS.frequencies[1]) == 1.0
    assert abs(float(BASIS.frequencies[N + 1]) - math.sqrt(2)) < 1e-15


def test_fit_power_law_recovers_its_parameters():
    c1, m = sp.fit_power_law(
        sp.power_law_spectrum(BASIS.frequencies, 2.0, 0.0086, 1.7), BASIS.frequencies
    )
    assert abs(c1 - 2.0) < 1e-10 and abs(m - 1.7) < 1e-10


# -- the shortest path -------------------------------------------------------------------------
def test_shortest_path_marginal_is_the_fisher_rao_geodesic():
    spd = sp.ShortestPath(SPECTRUM, BASIS)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    geodesic = SPECTRUM ** (1 - t[:, None])
    assert float((spd.variance(SPECTRUM, t) - geodesic).abs().max()) < 1e-13
    # the failing variants: VP's path, and the schedule with one sign wrong
    assert float((_processes()["vp"].variance(SPECTRUM, t) - geodesic).abs().max()) > 1e-2
    wrong = sp.Diagonal(
        BASIS, lambda t: (SPECTRUM ** (1 - t[..., None]) - 1) / (SPECTRUM + 1), None
    )
    assert float((wrong.variance(SPECTRUM, t) - geodesic).abs().max()) > 1e-2


def test_schedule_ends_limit_and_derivative():
    spd = sp.ShortestPath(SPECTRUM, BASIS)
    ends = spd.signal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(ends[0], torch.ones(N * N, dtype=torch.float64))
    assert torch.equal(ends[1], torch.zeros(N * N, dtype=torch.float64))
    # S_k = 1 is the limit of S_k -> 1 (the signal 1 - t), continuous to first order in S - 1
    near = sp.ShortestPath(
        torch.tensor([1.0, 1.0 + 1e-7, 1.0 - 1e-7]), sp.Basis(torch.eye(3, dtype=torch.float64))
    )
    t = torch.tensor(0.3, dtype=torch.float64)
    assert float((near.signal(t) - 0.7).abs().max()) < 1e-7
    # d_signal against a central difference: error O(h^2)
    h, t = 1e-5, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    fd = (spd.signal(t + h) - spd.signal(t - h)) / (2 * h)
    assert float((fd - spd.d_signal(t)).abs().max()) < 1e-8


def test_path_lengths():
    procs = _processes()
    closed = sp.fisher_rao_distance(SPECTRUM)
    assert abs(sp.fisher_length(procs["spd"], SPECTRUM) - closed) < 1e-12  # constant speed
    for name in ("vp", "cosine"):
        # VP ends at alpha_1^2 = e^{-10.05}, not at I: its length is at least the distance to
        # where it ends, which is within 1e-3 of the geodesic's
        assert sp.fisher_length(procs[name], SPECTRUM) > closed + 0.05, name
    # Simpson converges on VP's smooth speed: two resolutions agree
    lengths = [sp.fisher_length(procs["vp"], SPECTRUM, n=n) for n in (1001, 4001)]
    assert abs(lengths[0] - lengths[1]) < 1e-6


def test_marginal_draws_have_the_geodesic_variances():
    spd = sp.ShortestPath(SPECTRUM, BASIS)
    data = sp.SpectralGaussian(SPECTRUM, BASIS)
    n, t = 20_000, 0.4
    x0, noise = (
        data.sample(n, _gen(1)),
        torch.randn(n, N * N, generator=_gen(2), dtype=torch.float64),
    )
    var = BASIS.analyse(spd.marginal(x0, t, noise)).var(0)
    z = (var / SPECTRUM**0.6 - 1) / math.sqrt(2 / n)  # the sample variance's relative std
    assert float(z.abs().max()) < 5


# -- the exact oracle and the sampler ----------------------------------------------------------
def test_exact_denoiser_matches_the_dense_gaussian_formula():
    mean = torch.randn(N * N, generator=_gen(3), dtype=torch.float64)
    data = sp.SpectralGaussian(SPECTRUM, BASIS, mean)
    u = BASIS.matrix
    cov = u @ torch.diag(SPECTRUM) @ u.T
    x = torch.randn(5, N * N, generator=_gen(4), dtype=torch.float64)
    for name, proc in _processes().items():
        t = torch.tensor(0.35, dtype=torch.float64)
        a = u @ torch.diag(proc.alpha(t)) @ u.T
        s2 = u @ torch.diag(proc.sigma(t) ** 2) @ u.T
        gain = cov @ a @ torch.linalg.inv(a @ cov @ a + s2)
        dense = u @ mean + (x - (a @ u @ mean)) @ gain.T
        assert float((data.denoiser(proc)(x, t) - dense).abs().max()) < 1e-12, name
    # on the uniform VP it is analytic.Gaussian's denoiser
    gaussian = analytic.Gaussian(u @ mean, cov)
    exact = gaussian.denoise(x, 0.35, VP)
    assert float((data.denoiser(_processes()["vp"])(x, 0.35) - exact).abs().max()) < 1e-12


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_spectral_ddim_on_a_uniform_schedule_is_ddim(eta):
    data = sp.SpectralGaussian(SPECTRUM, BASIS)
    gaussian = analytic.Gaussian(
        torch.zeros(N * N, dtype=torch.float64),
        BASIS.matrix @ torch.diag(SPECTRUM) @ BASIS.matrix.T,
    )
    ts = samplers.time_grid(VP, 8)
    x = torch.randn(3, N * N, generator=_gen(5), dtype=torch.float64)
    ours = sp.spectral_ddim(
        data.denoiser(_processes()["vp"]), x, ts, _processes()["vp"], eta=eta, generator=_gen(6)
    )
    theirs = samplers.ddim(gaussian.denoiser(VP), x, ts, VP, eta=eta, generator=_gen(6))
    assert float((ours - theirs).abs().max()) < 1e-12


def test_spectral_ddim_converges_at_order_one_to_the_exact_flow_map():
    spd = sp.ShortestPath(SPECTRUM, BASIS)
    data = sp.SpectralGaussian(SPECTRUM, BASIS, torch.linspace(-1, 1, N * N, dtype=torch.float64))
    x = torch.randn(4, N * N, generator=_gen(7), dtype=torch.float64)
    t0, t1 = 0.9, 0.1
    exact = data.pf_ode_map(x, t0, t1, spd)
    steps = [8, 16, 32, 64]
    errors = []
    for n in steps:
        ts = torch.linspace(t0, t1, n + 1, dtype=torch.float64)
        errors.append(float((sp.spectral_ddim(data.denoiser(spd), x, ts, spd) - exact).norm()))
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / math.log(steps[-1] / steps[0])
    assert abs(slope - 1) < 0.15, (slope, errors)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_output_law_matches_monte_carlo(eta):
    spd = sp.ShortestPath(SPECTRUM, BASIS)
    data = sp.SpectralGaussian(SPECTRUM, BASIS, torch.linspace(-1, 1, N * N, dtype=torch.float64))
    ts = samplers.time_grid(VP, 4, t_min=1e-2)
    mean, var = sp.output_law(data, ts, spd, eta=eta)
    n = 20_000
    m0, v0 = data.marginal(spd, ts[0])
    start = BASIS.synthesise(
        m0 + v0.sqrt() * torch.randn(n, N * N, generator=_gen(8), dtype=torch.float64)
    )
    z = BASIS.analyse(
        sp.spectral_ddim(data.denoiser(spd), start, ts, spd, eta=eta, generator=_gen(9))
    )
    assert float(((z.mean(0) - mean) / (var / n).sqrt()).abs().max()) < 5
    assert float(((z.var(0) / var - 1) / math.sqrt(2 / n)).abs().max()) < 5
    # and with many steps the output is the data's marginal: W2 -> 0 at order one
    w2 = [
        sp.spectral_w2(
            *sp.output_law(data, samplers.time_grid(VP, n, t_min=1e-2), spd), data, spd, 1e-2
        )
        for n in (20, 80)
    ]
    assert 0 < w2[1] < w2[0] / 3


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="orthogonal"):
        sp.Basis(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="spectrum"):
        sp.ShortestPath(-SPECTRUM, BASIS)
    with pytest.raises(ValueError, match="spectrum"):
        sp.ShortestPath(SPECTRUM[:-1], BASIS)
    with pytest.raises(ValueError, match="alpha"):
        sp.Diagonal.uniform(processes.VE(), BASIS)
    with pytest.raises(ValueError, match="eta"):
        sp.spectral_ddim(
            lambda x, t: x,
            torch.zeros(1, N * N),
            samplers.time_grid(VP, 2),
            _processes()["spd"],
            eta=2.0,
        )
    with pytest.raises(ValueError, match="x.shape"):
        BASIS.analyse(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="Diagonal"):
        sp.spectral_ddim(lambda x, t: x, torch.zeros(1, N * N), samplers.time_grid(VP, 2), VP)
    with pytest.raises(ValueError, match="odd"):
        sp.fisher_length(_processes()["spd"], SPECTRUM, n=100)
