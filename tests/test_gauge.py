"""Gauge freedom, conservativity and intrinsic dimension against exact answers (chapter 18)."""

import math
import time

import numpy as np
import pytest
import torch

from diffcore import analytic, data, processes, targets
from diffcore.gauge import (
    arc_path,
    asymmetry,
    continuity_residual,
    field_jacobian,
    fit_potential,
    fokker_planck_residual,
    gauge_field,
    gauge_residual,
    intrinsic_dimension,
    line_integral,
    reverse_sde_drift,
    score_spectrum,
    straight_path,
    velocity_field,
)

VP = processes.VP()
CONTINUOUS = {
    "vp": VP,
    "vp_cosine": processes.VPCosine(),
    "ve": processes.VE(),
    "linear": processes.Linear(),
    # DDPM's linear betas, log alpha linear between its 1000 steps
    "discrete": processes.Discrete(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)),
}
ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)  # +90 degrees
SKEW = 1.3 * ROT.T  # a skew-symmetric gauge matrix
ROUND_OFF = 1e-11  # residuals are sums of O(10) terms of size O(10-100) in float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mixture():
    return analytic.GaussianMixture(
        torch.tensor([[1.0, 0.5], [-1.0, 0.0], [0.2, -1.0]], dtype=torch.float64),
        torch.stack(
            [
                torch.diag(torch.tensor([0.3, 0.2], dtype=torch.float64)),
                torch.tensor([[0.4, 0.1], [0.1, 0.2]], dtype=torch.float64),
                0.1 * torch.eye(2, dtype=torch.float64),
            ]
        ),
        torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
    )


def _score(law, process):
    return lambda x, t: law.score(x, t, process)


def _log_prob(law, process):
    return lambda x, t: law.log_prob(x, t, process)


def _rotation(c):
    """s(x) = -x + c R x: Jacobian -I + cR, curl 2c."""
    return lambda x, t: -x + c * x @ ROT.T


def _rel_ms(a, b):
    """E||a - b||^2 / E||b||^2 over the batch."""
    return float(((a - b) ** 2).sum(1).mean() / (b**2).sum(1).mean())


# =============================================================================================
# 1. conservativity
# =============================================================================================
def test_jacobian_of_a_linear_field_and_asymmetry_of_a_rotation():
    """s = -x + cRx: J = -I + cR everywhere, so ||J - J^T|| / (2||J||) = 2c sqrt2 /
    (2 sqrt(2 + 2c^2)) = c / sqrt(1 + c^2) exactly; the exact score's Jacobian is the
    symmetric Hessian of log p_t, asymmetry at round-off."""
    x = torch.randn(64, 2, generator=_gen(1), dtype=torch.float64)
    for c in (0.3, 0.7, 2.0):
        jac = field_jacobian(_rotation(c), x, 0.3)
        want = -torch.eye(2, dtype=torch.float64) + c * ROT
        assert (jac - want).abs().max() < 1e-15
        a = asymmetry(_rotation(c), x, 0.3)
        err = (a - c / math.sqrt(1 + c * c)).abs().max().item()
        print(f"\nc = {c}: asymmetry {a[0].item():.6f}, exact {c / math.sqrt(1 + c * c):.6f}")
        assert err < 1e-14
    mix = _mixture()
    a_score = asymmetry(_score(mix, VP), x, 0.3).max().item()
    print(f"exact score: max asymmetry {a_score:.1e}")
    assert a_score < 1e-13
    # failing variant: the gauged score is not a gradient, its asymmetry is O(1)
    assert asymmetry(gauge_field(_score(mix, VP), SKEW), x, 0.3).min() > 0.1


def test_line_integral_of_the_exact_score_is_the_log_density_difference():
    """Gauss-Legendre on a smooth (analytic) integrand: the error falls geometrically in n,
    slower for the sharper p_t at small t (measured at t = 0.1: 4e-2, 4e-4, 1e-7, 1e-11,
    1e-14 for n = 8, 16, 32, 48, 64; at t = 0.3 round-off from n = 16).  With n = 64 every
    path gives log p_t(b) - log p_t(a) to round-off."""
    mix, gen = _mixture(), _gen(2)
    a = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    score = _score(mix, VP)
    for t in (0.1, 0.3, torch.linspace(0.1, 0.9, 16, dtype=torch.float64)):
        exact = mix.log_prob(b, t, VP) - mix.log_prob(a, t, VP)
        for path in (straight_path(a, b), arc_path(a, b, 0.4), arc_path(a, b, -0.8)):
            err = (line_integral(score, path, t, n=64) - exact).abs().max().item()
            assert err < 1e-12
    exact = mix.log_prob(b, 0.1, VP) - mix.log_prob(a, 0.1, VP)
    coarse = (line_integral(score, arc_path(a, b, 0.4), 0.1, n=8) - exact).abs().max().item()
    print(f"\nexact score, t = 0.1, n = 8: error {coarse:.2e}")
    assert coarse > 1e-3  # failing variant: too few nodes for a non-polynomial integrand
    # a path given only as a callable: the tangent by forward-mode autograd
    arc = arc_path(a, b, 0.4)
    gap = line_integral(score, lambda tau: arc(tau), 0.3) - line_integral(score, arc, 0.3)
    assert gap.abs().max() < 1e-14


def test_line_integrals_of_a_rotation_differ_by_stokes():
    """For s = -x + cRx (curl 2c) along a quadratic arc and the chord, the integrand is a
    polynomial of degree <= 3 in tau, exact with n = 2 nodes; the difference is 2c times
    the signed area between them, (c_ctrl - a) x (b - a) / 3."""
    gen = _gen(3)
    a = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    for bend in (0.5, -0.3):
        arc = arc_path(a, b, bend)
        area = -bend * ((b - a) ** 2).sum(1) / 3  # left bend: clockwise loop
        assert (arc.signed_area() - area).abs().max() < 1e-14
        for c in (0.0, 0.7):
            diff = line_integral(_rotation(c), arc, 0.5, n=2) - line_integral(
                _rotation(c), straight_path(a, b), 0.5, n=2
            )
            err = (diff - 2 * c * area).abs().max().item()
            print(f"\nbend {bend}, c {c}: path gap {diff[0].item():+.4f}, Stokes error {err:.1e}")
            assert err < 1e-14
    # failing variant: for c != 0 the two paths do not agree
    assert diff.abs().min() > 1e-3


# =============================================================================================
# 2. gauge decomposition
# =============================================================================================
def test_gauge_residual_vanishes_for_the_gauge_term_and_not_for_a_wrong_centre():
    """r = J grad log p: div(p r)/p = sum_ij J_ij d_i d_j p / p = 0.  Rotation about the wrong
    centre on N(m, v I): div r = c tr J = 0 and r . grad log p = -c (J(x - x_c)).(x_c - m)/v,
    an exact nonzero value (zero for x_c = m)."""
    mix, gen = _mixture(), _gen(4)
    x = 1.5 * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    score, lp = _score(mix, VP), _log_prob(mix, VP)
    gauge = lambda x, t: score(x, t) @ SKEW.T  # noqa: E731
    res = gauge_residual(gauge, lp, x, 0.3).abs().max().item()
    print(f"\ngauge term: residual {res:.1e}")
    assert res < ROUND_OFF
    gauss = analytic.Gaussian(torch.tensor([0.4, -0.2]), 0.5 * torch.eye(2))
    t, c, x_c = 0.3, 0.8, torch.tensor([1.0, 0.5], dtype=torch.float64)
    m = VP.alpha(t) * gauss.mean
    v = VP.alpha(t) ** 2 * 0.5 + VP.sigma(t) ** 2
    wrong = lambda x, t: c * (x - x_c) @ SKEW.T  # noqa: E731
    res = gauge_residual(wrong, _log_prob(gauss, VP), x, t)
    exact = -c * ((x - x_c) @ SKEW.T * (x_c - m)).sum(1) / v
    print(f"wrong centre: residual up to {res.abs().max().item():.2f}")
    assert (res - exact).abs().max() < 1e-13
    assert res.abs().max() > 0.5
    right = lambda x, t: c * (x - m) @ SKEW.T  # noqa: E731
    assert gauge_residual(right, _log_prob(gauss, VP), x, t).abs().max() < 1e-13


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_gauged_score_keeps_the_marginals_of_the_pf_ode_and_the_reverse_sde(name):
    """Continuity (PF-ODE) and Fokker-Planck (reverse SDE) residuals of s + cJs vanish to
    round-off for every process; a rotation about the wrong centre leaves O(1) residuals."""
    process, gen = CONTINUOUS[name], _gen(5)
    mix = _mixture()
    score, lp = _score(mix, process), _log_prob(mix, process)
    x = 1.5 * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(200, generator=gen, dtype=torch.float64)
    out = {}
    for c in (0.0, 1.0, -2.5):
        field = gauge_field(score, SKEW, c)
        out[f"ode c={c}"] = continuity_residual(velocity_field(field, process), lp, x, t)
        out[f"sde c={c}"] = fokker_planck_residual(
            reverse_sde_drift(field, process), process.g2, lp, x, t, reverse=True
        )
    # the forward SDE carries the same marginals (a check of the residual itself)
    f = lambda x, t: process.f(t)[:, None] * x  # noqa: E731
    out["forward sde"] = fokker_planck_residual(f, process.g2, lp, x, t)
    worst = max(r.abs().max().item() for r in out.values())
    print(f"\n{name}: worst residual {worst:.1e}")
    assert worst < ROUND_OFF
    x_c = torch.tensor([0.5, 0.5], dtype=torch.float64)
    wrong = lambda x, t: score(x, t) + (x - x_c) @ SKEW.T  # noqa: E731
    bad_ode = continuity_residual(velocity_field(wrong, process), lp, x, t).abs().max().item()
    bad_sde = fokker_planck_residual(
        reverse_sde_drift(wrong, process), process.g2, lp, x, t, reverse=True
    )
    print(f"  wrong centre: ODE residual {bad_ode:.1f}, SDE {bad_sde.abs().max().item():.1f}")
    assert bad_ode > 1 and bad_sde.abs().max() > 1
    # the forward-SDE sign on the reverse SDE is wrong too
    flipped = fokker_planck_residual(reverse_sde_drift(score, process), process.g2, lp, x, t)
    assert flipped.abs().max() > 1


def test_velocity_field_is_the_pf_ode_velocity_of_the_denoiser():
    mix, gen = _mixture(), _gen(6)
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    for process in CONTINUOUS.values():
        for t in (0.2, 0.7):
            ours = velocity_field(_score(mix, process), process)(x, t)
            theirs = targets.pf_ode_velocity(mix.denoiser(process), x, t, process)
            assert (ours - theirs).abs().max() < 1e-12


def _rk4(velocity, x, t0, t1, n):
    h = (t1 - t0) / n
    for i in range(n):
        t = t0 + i * h
        k1 = velocity(x, t)
        k2 = velocity(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = velocity(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = velocity(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_gauge_changes_the_flow_map_by_a_known_rotation():
    """For N(0, s0^2 I) and J = R the 90-degree rotation, the gauge term adds the rotation
    rate (c/2) g^2 / v_t, v_t = alpha^2 s0^2 + sigma^2, which commutes with the exact flow;
    since dv/dt = 2 f v + g^2, the angle from t0 to t1 is (c/2)[log(v/alpha^2)]_{t0}^{t1}.
    So the gauged flow is the exact map followed by that rotation (law unchanged); RK4 with
    400 steps: error O(h^4)."""
    gauss = analytic.Gaussian(torch.zeros(2), 0.3 * torch.eye(2))
    x1 = torch.randn(20, 2, generator=_gen(7), dtype=torch.float64)
    t0, t1, c = 1.0, 0.05, 0.5
    field = gauge_field(_score(gauss, VP), ROT, c)
    out = _rk4(velocity_field(field, VP), x1, t0, t1, 400)
    exact = gauss.pf_ode_map(x1, t0, t1, VP)

    def log_ratio(t):
        a, s = VP.alpha(t), VP.sigma(t)
        return torch.log((a**2 * 0.3 + s**2) / a**2)

    theta = 0.5 * c * (log_ratio(t1) - log_ratio(t0))
    turn = torch.cos(theta) * torch.eye(2) + torch.sin(theta) * ROT
    err = (out - exact @ turn.T).abs().max().item()
    moved = (out - exact).abs().max().item()
    print(f"\nrotation angle {theta.item():.3f} rad; error {err:.1e}; moved {moved:.2f}")
    assert err < 1e-7
    assert moved > 0.5  # the map did change


def test_gauge_terms_are_orthogonal_to_gradients_in_L2p():
    """E_p[r . grad psi] = -E_p[psi div(p r)/p] (integration by parts), by a trapezoid rule
    on a 321^2 grid over [-8, 8]^2 (spectrally accurate for these rapidly decaying smooth
    integrands): 0 for the gauge term, equal nonzero sides for the wrong centre."""
    mix, t = _mixture(), 0.3
    line = torch.linspace(-8, 8, 321, dtype=torch.float64)
    grid = torch.cartesian_prod(line, line)
    w = torch.exp(mix.log_prob(grid, t, VP)) * (line[1] - line[0]) ** 2
    assert abs(w.sum().item() - 1) < 1e-10
    psi = torch.sin(grid[:, 0]) + grid[:, 0] * grid[:, 1] ** 2
    grad_psi = torch.stack([torch.cos(grid[:, 0]) + grid[:, 1] ** 2, 2 * grid.prod(1)], 1)
    score, lp = _score(mix, VP), _log_prob(mix, VP)
    x_c = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for name, r in {
        "gauge": lambda x, t: score(x, t) @ SKEW.T,
        "wrong centre": lambda x, t: (x - x_c) @ SKEW.T,
    }.items():
        lhs = (w * (r(grid, t) * grad_psi).sum(1)).sum().item()
        rhs = -(w * psi * gauge_residual(r, lp, grid, t)).sum().item()
        print(f"\n{name}: E[r.grad psi] = {lhs:+.3e}, -E[psi div(pr)/p] = {rhs:+.3e}")
        assert abs(lhs - rhs) < 1e-9
    assert abs(lhs) > 0.1  # the wrong centre is not orthogonal


def _gauss_hermite_2d(n):
    z, w = np.polynomial.hermite_e.hermegauss(n)
    z, w = torch.as_tensor(z), torch.as_tensor(w / w.sum())
    return torch.cartesian_prod(z, z), torch.outer(w, w).flatten()


def test_fit_potential_recovers_the_gaussian_score_exactly():
    """Gaussian data: the score is affine, a quadratic potential (n_centers=0) represents it,
    and under a Gauss-Hermite rule exact to degree 2n - 1 = 11 the gauge term is exactly
    orthogonal to the basis: the fit (undamped, ridge=0) is the score to round-off, for any
    skew gauge.  (The default ridge 1e-6 would bias it by ~3e-6.)
    Failing variant (isotropic law): r = cJ(x - x_c) = cJ(x - m_t) + cJ(m_t - x_c) is a gauge
    term plus a constant, which is a gradient; the fit is off by exactly cJ(m_t - x_c)."""
    t = 0.3
    gauss = analytic.Gaussian(torch.tensor([0.4, -0.2]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
    marg = gauss.marginal(t, VP)
    z, w = _gauss_hermite_2d(6)
    nodes = marg.mean + z @ torch.linalg.cholesky(marg.cov).T
    score = _score(gauss, VP)
    for c in (1.0, -3.0):
        field = gauge_field(score, SKEW, c)
        fit = fit_potential(field, nodes, t, n_centers=0, ridge=0.0, weights=w)
        err = (fit(nodes) - score(nodes, t)).abs().max().item()
        print(f"\nc = {c}: |grad phi - score| {err:.1e}, non-conservative share {fit.fraction:.3f}")
        assert err < 1e-10
        assert fit.fraction > 0.1  # the gauged field itself is far from its projection
    iso = analytic.Gaussian(torch.tensor([0.4, -0.2]), 0.4 * torch.eye(2))
    marg = iso.marginal(t, VP)
    nodes = marg.mean + z * marg.cov[0, 0].sqrt()
    x_c, c = torch.tensor([1.0, 0.5], dtype=torch.float64), 0.8
    wrong = lambda x, t: iso.score(x, t, VP) + c * (x - x_c) @ SKEW.T  # noqa: E731
    fit = fit_potential(wrong, nodes, t, n_centers=0, ridge=0.0, weights=w)
    shift = c * (marg.mean - x_c) @ SKEW.T
    err = (fit(nodes) - iso.score(nodes, t, VP) - shift).abs().max().item()
    print(f"wrong centre: fit - score - cJ(m - x_c) = {err:.1e}, |shift| = {shift.norm():.2f}")
    assert err < 1e-10 and shift.norm() > 0.5


def test_fit_potential_removes_the_gauge_on_a_ring_mixture():
    """Samples of p_t for the eight-Gaussian ring at t = 0.2 (VP), 4000 draws.  The gauge term
    has mean square 1.69 times the score's (|1.3 R s|^2); after the fit, the gap to the exact
    score on fresh samples is the basis error plus the sampling error of the orthogonality,
    O(K/N) relative (K = 133 functions): measured 0.03; threshold 0.1.  Without the gauge
    the fit is much closer (measured 2e-4).  The wrong-centre field's fit stays O(1) away
    (measured 0.37; threshold 0.3)."""
    ring, t, gen = data.ring_mixture(), 0.2, _gen(8)
    draw = lambda n: VP.marginal(  # noqa: E731
        ring.sample(n, generator=gen), t, torch.randn(n, 2, generator=gen, dtype=torch.float64)
    )
    x, fresh = draw(4000), draw(4000)
    score = _score(ring, VP)
    exact = score(fresh, t)
    start = time.perf_counter()
    fit = fit_potential(gauge_field(score, SKEW), x, t, generator=_gen(9))
    seconds = time.perf_counter() - start
    err = _rel_ms(fit(fresh, t), exact)
    err_plain = _rel_ms(fit_potential(score, x, t, generator=_gen(9))(fresh), exact)
    gauged_err = _rel_ms(gauge_field(score, SKEW)(fresh, t), exact)
    x_c = torch.tensor([0.7, 0.0], dtype=torch.float64)
    wrong = lambda x, t: score(x, t) + (x - x_c) @ SKEW.T  # noqa: E731
    err_wrong = _rel_ms(fit_potential(wrong, x, t, generator=_gen(9))(fresh), exact)
    print(
        f"\nfit {seconds:.2f} s; relative mean-square error: gauged field {gauged_err:.2f}, "
        f"its fit {err:.3f}, fit of the exact score {err_plain:.1e}, wrong centre {err_wrong:.2f}"
    )
    assert err < 0.1 and err_plain < 0.01
    assert err_wrong > 0.3
    assert seconds < 5


# =============================================================================================
# 3. intrinsic dimension
# =============================================================================================
def test_score_spectrum_of_a_rank_one_gaussian():
    """Covariance u u^T + eps I in 3-D: Sigma's eigenvalues 1 + eps, eps, eps, so
    sigma^2 grad^2 log p_t has eigenvalues -sigma^2/(alpha^2 lambda_i + sigma^2) exactly.
    At t = 0.02 (sigma^2 = 0.0040) with eps = 1e-6: (-0.0040, -0.9998, -0.9998) -> count 1.
    At t = 1 everything is noise: count 0."""
    u = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64) / 3
    eps = 1e-6
    gauss = analytic.Gaussian(
        torch.tensor([0.1, 0.0, -0.3]), torch.outer(u, u) + eps * torch.eye(3)
    )
    x = torch.randn(40, 3, generator=_gen(10), dtype=torch.float64)
    score = _score(gauss, VP)
    lam = torch.tensor([eps, eps, 1 + eps], dtype=torch.float64)
    for t in (0.02, 0.3, torch.linspace(0.01, 0.9, 40, dtype=torch.float64)):
        a2 = VP.alpha(torch.as_tensor(t)) ** 2
        s2 = VP.sigma(torch.as_tensor(t)) ** 2
        a2, s2 = (v[:, None] if v.ndim else v for v in (a2, s2))
        exact = (-s2 / (a2 * lam + s2)).expand(40, 3)
        got = score_spectrum(score, x, t, VP)
        assert (got - exact).abs().max() < 1e-13
    print(f"\nt = 0.02: spectrum {score_spectrum(score, x, 0.02, VP)[0].tolist()}")
    assert (intrinsic_dimension(score, x, 0.02, VP) == 1).all()
    assert (intrinsic_dimension(score, x, 1.0, VP) == 0).all()  # failing variant: all noise


def test_intrinsic_dimension_of_a_ring_of_narrow_gaussians():
    """64 Gaussians of std 0.01 on the unit circle (spacing 2 pi / 64 = 0.098).  At t = 0.02
    (VP, sigma = 0.077): std << sigma (blobs look like points), spacing ~ sigma (the ring's
    modulation along it is ~exp(-2 pi^2 sigma^2 / spacing^2) = 5e-6, flat), sigma << radius
    (curvature corrections O(sigma / r)).  Normal eigenvalue near -1, tangent within O(dist /
    r) of 0 (measured in [-0.21, 0.30] on samples of p_t): threshold 0.5 separates them,
    count 1 at every sample.  Failing variants at other scales: t = 1e-3 (sigma = 0.010,
    isolated blobs: count 0 at most samples), t = 1e-4 (sigma below the blobs' own std:
    count 2), t = 1 (all noise: count 0)."""
    ring, gen = data.ring_mixture(64, 1.0, 0.01), _gen(11)
    score = _score(ring, VP)

    def counts(t):
        x0 = ring.sample(300, generator=gen)
        x = VP.marginal(x0, t, torch.randn(300, 2, generator=gen, dtype=torch.float64))
        return torch.bincount(intrinsic_dimension(score, x, t, VP), minlength=3).tolist()

    table = {t: counts(t) for t in (1e-4, 1e-3, 0.02, 1.0)}
    print(f"\ncounts of dimension (0, 1, 2) per t: {table}")
    assert table[0.02] == [0, 300, 0]
    assert table[1e-3][0] > 250 and table[1e-4][2] == 300 and table[1.0][0] == 300


# =============================================================================================
# bad input
# =============================================================================================
def test_bad_input_names_the_value():
    mix = _mixture()
    score = _score(mix, VP)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="skew must be skew-symmetric"):
        gauge_field(score, torch.eye(2))
    with pytest.raises(ValueError, match="skew must have shape"):
        gauge_field(score, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="field must be a callable"):
        asymmetry(3, x, 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        field_jacobian(score, x, 1.5)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, d\)"):
        asymmetry(score, x[0], 0.5)
    with pytest.raises(ValueError, match="x must be finite"):
        asymmetry(score, torch.full((2, 2), float("nan"), dtype=torch.float64), 0.5)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        asymmetry(score, torch.ones(2, 2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match=r"field\(x, t\) must return"):
        asymmetry(lambda x, t: x[:, :1], x, 0.5)
    with pytest.raises(ValueError, match="threshold must lie in"):
        intrinsic_dimension(score, x, 0.1, VP, threshold=1.5)
    with pytest.raises(TypeError, match="process must be a diffcore Process"):
        score_spectrum(score, x, 0.1, "vp")
    with pytest.raises(TypeError, match="n must be an integer"):
        line_integral(score, straight_path(x, -x), 0.5, n=2.0)
    with pytest.raises(ValueError, match="a number bend is defined in 2-D"):
        arc_path(torch.zeros(3), torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="fits at one time"):
        fit_potential(score, x, torch.full((4,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights must have shape"):
        fit_potential(score, x, 0.5, weights=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fitted at t = 0.5"):
        fit_potential(score, torch.randn(50, 2, dtype=torch.float64), 0.5)(x, 0.4)
    with pytest.raises(ValueError, match="g2 must be a finite number"):
        fokker_planck_residual(score, -1.0, _log_prob(mix, VP), x, 0.5)
    with pytest.raises(ValueError, match=r"log_prob\(x, t\) must return"):
        gauge_residual(score, lambda x, t: x, x, 0.5)
