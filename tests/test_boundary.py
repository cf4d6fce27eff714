"""Optimal boundary conditions of a conditional PF-ODE sampler, exact on a Gaussian prior."""

import math

import pytest
import torch

from diffcore import analytic, boundary, processes, samplers
from diffcore.inverse.operators import Downsample, MatrixOperator

DT = torch.float64
VP, LINEAR = processes.VP(), processes.Linear()
SIGMA_Y = 0.1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(side=4, seed=0):
    """A Gaussian prior on side x side images and 2x super-resolution, y = A x0 + sigma_y n."""
    d = side * side
    gen = _gen(seed)
    root = torch.randn(d, d, generator=gen, dtype=DT) / math.sqrt(d)
    prior = analytic.Gaussian(
        torch.randn(d, generator=gen, dtype=DT), root @ root.T + 0.1 * torch.eye(d, dtype=DT)
    )
    return prior, Downsample((1, side, side), 2)


def _joint(prior, A, n, gen):
    """n draws of (x0, y) from the prior and the measurement."""
    x0 = prior.sample(n, generator=gen)
    return x0, x0 @ A.T + SIGMA_Y * torch.randn(n, A.shape[0], generator=gen, dtype=DT)


def _ddim_grid(process):
    return samplers.time_grid(process, 10, t_min=0.0)


# -- the affine map ------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [VP, LINEAR], ids=["VP", "Linear"])
def test_affine_flow_is_the_exact_conditional_pf_ode(process):
    prior, op = _problem()
    A = op.to_dense()
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, process)
    gen = _gen(1)
    starts = torch.randn(6, prior.dim, generator=gen, dtype=DT)
    gaps, wrong = [], []
    for y in _joint(prior, A, 3, gen)[1]:
        posterior = prior.posterior(A, y, SIGMA_Y)
        exact = posterior.pf_ode_map(starts, 1.0, 0.0, process)
        gaps.append(float((flow(starts, y) - exact).abs().max()))
        # failing variant: K without the alpha_1 M correction, (I - 0 M) G
        gain, _, _ = boundary.posterior_parts(prior, op, SIGMA_Y)
        wrong.append(float((starts @ flow.M.T + y @ gain.T + flow.c - exact).abs().max()))
    print(
        f"\naffine map against the posterior's exact flow: {max(gaps):.1e}; wrong K: {max(wrong):.1e}"
    )
    assert max(gaps) < 1e-12
    if process is VP:  # alpha_1 > 0: the correction matters (for Linear alpha_1 = 0)
        assert max(wrong) > 1e-4


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m"])
def test_probed_map_is_the_sampler_itself(name):
    prior, op = _problem()
    ts = _ddim_grid(VP)
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP, ts=ts, sampler=name)
    gen = _gen(2)
    starts = torch.randn(5, prior.dim, generator=gen, dtype=DT)
    _, y = _joint(prior, op.to_dense(), 5, gen)
    model = boundary.posterior_denoiser(prior, op, SIGMA_Y, y, VP)
    run = samplers.SAMPLERS[name](model, starts, ts, VP)
    gap = float((flow(starts, y) - run).abs().max())
    exact = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP)
    discretisation = float((exact(starts, y) - run).abs().max())
    print(
        f"\n{name}: probed map against the run {gap:.1e}; against the exact flow {discretisation:.2e}"
    )
    assert gap < 1e-12 and discretisation > 1e-4


# -- the exact expected error --------------------------------------------------------------------
def _error_law(flow, start, prior, A):
    """e = h(x_T, y) - x0 is Gaussian: its mean and covariance over (x0, n)."""
    lift = flow.K @ A - torch.eye(prior.dim, dtype=DT)
    mean = flow.M @ start + lift @ prior.mean + flow.c
    cov = lift @ prior.cov @ lift.T + SIGMA_Y**2 * flow.K @ flow.K.T
    return mean, cov


def test_expected_error_is_exact_against_monte_carlo():
    prior, op = _problem()
    A = op.to_dense()
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP, ts=_ddim_grid(VP), sampler="ddim")
    gen, n = _gen(3), 20000
    starts = torch.randn(3, prior.dim, generator=gen, dtype=DT)
    exact = boundary.expected_error(flow, starts, prior, op, SIGMA_Y)
    x0, y = _joint(prior, A, n, gen)
    for k, start in enumerate(starts):
        sq = (flow(start.expand(n, -1), y) - x0).pow(2).sum(-1)
        mean, cov = _error_law(flow, start, prior, A)
        # Var |e|^2 = 2 tr(C^2) + 4 m^T C m for e ~ N(m, C)
        bound = 5 * math.sqrt(float(2 * (cov @ cov).trace() + 4 * mean @ cov @ mean) / n)
        gap = abs(float(sq.mean() - exact[k]))
        print(
            f"\nstart {k}: J = {float(exact[k]):.4f}, Monte Carlo off by {gap:.4f} <= {bound:.4f}"
        )
        assert gap < bound
        # failing variant: the squared mean error alone, without tr(Sigma_e)
        assert abs(float(sq.mean()) - float(mean @ mean)) > 10 * bound
    # given one y: the error over the posterior N(m(y), P)
    y0 = y[0]
    posterior = prior.posterior(A, y0, SIGMA_Y)
    draws = posterior.sample(n, generator=gen)
    sq = (flow(starts[0], y0) - draws).pow(2).sum(-1)
    mean = flow(starts[0], y0) - posterior.mean
    cov = posterior.cov
    bound = 5 * math.sqrt(float(2 * (cov @ cov).trace() + 4 * mean @ cov @ mean) / n)
    given = boundary.expected_error(flow, starts[0], prior, op, SIGMA_Y, y=y0)
    assert abs(float(sq.mean() - given[0])) < bound


# -- the optimal start ---------------------------------------------------------------------------
def test_optimal_start_beats_every_draw_and_is_exact():
    prior, op = _problem()
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP)
    best = boundary.optimal_start(flow, prior, op, SIGMA_Y)
    # for the exact flow, the scaled prior mean alpha_1 mu
    alpha_1 = VP.alpha(torch.tensor(1.0, dtype=DT))
    assert float((best - alpha_1 * prior.mean).abs().max()) < 1e-12
    j_best = boundary.expected_error(flow, best, prior, op, SIGMA_Y)
    draws = torch.randn(512, prior.dim, generator=_gen(4), dtype=DT)
    j_draws = boundary.expected_error(flow, draws, prior, op, SIGMA_Y)
    print(
        f"\nJ(x*) = {float(j_best):.4f}; the best of 512 draws {float(j_draws.min()):.4f}, "
        f"their mean {float(j_draws.mean()):.4f}"
    )
    assert float(j_best) < float(j_draws.min())
    # the quadratic: J(x* + h) - J(x*) = |M h|^2 exactly (so a perturbed x* is worse)
    h = 1e-3 * torch.randn(8, prior.dim, generator=_gen(5), dtype=DT)
    rise = boundary.expected_error(flow, best + h, prior, op, SIGMA_Y) - j_best
    gap = float((rise - (h @ flow.M.T).pow(2).sum(-1)).abs().max())
    print(f"J(x* + h) - J(x*) - |M h|^2: {gap:.1e} (|M h|^2 ~ {float(rise.mean()):.1e})")
    assert gap < 1e-12 and bool((rise > 0).all())


def _per_y_optima(sampler, process, prior, op, ys):
    ts = None if sampler is None else _ddim_grid(process)
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, process, ts=ts, sampler=sampler)
    return torch.stack([boundary.optimal_start(flow, prior, op, SIGMA_Y, y=y) for y in ys])


@pytest.mark.parametrize("sampler", [None, "ddim", "dpmpp_2m", "heun"])
def test_the_optimum_for_each_measurement_is_alpha_1_times_its_posterior_mean(sampler):
    prior, op = _problem()
    ys = _joint(prior, op.to_dense(), 6, _gen(6))[1]
    gain, offset, _ = boundary.posterior_parts(prior, op, SIGMA_Y)
    gaps, spreads = {}, {}
    for name, process in (("Linear", LINEAR), ("VP", VP)):
        per_y = _per_y_optima(sampler, process, prior, op, ys)
        alpha_1 = float(process.alpha(torch.tensor(1.0, dtype=DT)))
        gaps[name] = float((per_y - alpha_1 * (ys @ gain.T + offset)).abs().max())
        spreads[name] = float((per_y - per_y[0]).abs().max())
    print(
        f"\n{sampler or 'exact'}: per-y optimum against alpha_1 m(y): Linear {gaps['Linear']:.1e}, "
        f"VP {gaps['VP']:.1e}; spread over y: Linear {spreads['Linear']:.1e}, VP {spreads['VP']:.1e}"
    )
    # alpha_1 = 0 (Linear): one start for every measurement, exactly, whatever the sampler
    assert gaps["Linear"] < 1e-12 and spreads["Linear"] < 1e-12
    if sampler == "heun":  # steps in t on VP do not commute with the shift of the mean
        assert gaps["VP"] > 1e-2
    else:  # the exact flow and the exponential integrators: alpha_1 m(y), moving with y
        assert gaps["VP"] < 1e-12 and spreads["VP"] > 1e-6


def test_at_the_optimum_the_exact_rectified_flow_returns_the_posterior_mean():
    prior, op = _problem()
    A = op.to_dense()
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, LINEAR)
    best = boundary.optimal_start(flow, prior, op, SIGMA_Y)
    _, y = _joint(prior, A, 5, _gen(7))
    mmse = prior.posterior_mean(A, y, SIGMA_Y)
    assert float((flow(best, y) - mmse).abs().max()) < 1e-12
    # its error is tr P (the MMSE), a random start's on average 2 tr P (a posterior sample's)
    _, _, post = boundary.posterior_parts(prior, op, SIGMA_Y)
    j_best = float(boundary.expected_error(flow, best, prior, op, SIGMA_Y))
    # E J(xi) = J(0) + tr(M^T M) for xi ~ N(0, I), and J(0) = J(x*) here (x* = 0)
    zero = torch.zeros(prior.dim, dtype=DT)
    j_random = float(boundary.expected_error(flow, zero, prior, op, SIGMA_Y)) + float(
        flow.M.pow(2).sum()
    )
    print(f"\nJ(x*) = {j_best:.4f} = tr P = {float(post.trace()):.4f}; random start {j_random:.4f}")
    assert abs(j_best - float(post.trace())) < 1e-12
    assert abs(j_random - 2 * float(post.trace())) < 1e-12


# -- best of K -----------------------------------------------------------------------------------
def test_best_of_k_excess_has_its_closed_forms():
    for k in (1, 4, 16, 64):
        # d = 2: chi^2_2 is exponential, its minimum of k has the mean 2 / k
        assert abs(boundary.best_of_k_excess(2, k) - 1 / k) < 1e-9
        # d = 4: E min = 2 e^k Gamma(k + 1, k) / k^(k+1) = k! sum_{j<=k} k^j / j! / k^(k+1) * 2
        closed = 2 * sum(
            math.exp(math.lgamma(k + 1) - math.lgamma(j + 1) + (j - k - 1) * math.log(k))
            for j in range(k + 1)
        )
        assert abs(boundary.best_of_k_excess(4, k) - closed / 4) < 1e-9
    # failing variant: 1 / k is not the answer in d = 4
    assert abs(boundary.best_of_k_excess(4, 16) - 1 / 16) > 0.1


def test_best_of_k_gains_less_as_the_dimension_grows():
    k, trials = 16, 3000
    rho = {d: boundary.best_of_k_excess(d, k) for d in (2, 8, 32, 128)}
    print("\nbest of 16: share of a random start's excess error kept, rho_d(16) = E min / d")
    dims = sorted(rho)
    assert all(rho[a] < rho[b] for a, b in zip(dims, dims[1:], strict=False))
    # denoising with an isotropic prior: M = c I, the excess of a start is c^2 |x_T - x*|^2
    for d in (2, 8, 32):
        prior = analytic.Gaussian(torch.zeros(d, dtype=DT), torch.eye(d, dtype=DT))
        op = MatrixOperator(torch.eye(d, dtype=DT))
        flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP)
        best = boundary.optimal_start(flow, prior, op, SIGMA_Y)
        j_best = float(boundary.expected_error(flow, best, prior, op, SIGMA_Y))
        c2 = float(flow.M[0, 0] ** 2)
        draws = torch.randn(trials * k, d, generator=_gen(d), dtype=DT)
        excess = boundary.expected_error(flow, draws, prior, op, SIGMA_Y) - j_best
        kept = excess.reshape(trials, k).min(-1).values / (c2 * d)
        bound = 5 * float(kept.std()) / math.sqrt(trials)
        gap = abs(float(kept.mean()) - rho[d])
        print(
            f"d = {d:3d}: rho = {rho[d]:.4f}, Monte Carlo {float(kept.mean()):.4f} "
            f"(off by {gap:.4f} <= {bound:.4f})"
        )
        assert gap < bound
    print("  d = 128: rho = " + f"{rho[128]:.4f}")


def test_paper_procedure_on_a_reference_set_against_the_optimum():
    """Super-resolution by 2 on side x side images: the paper's best of K on R reference pairs,
    its exact test error against the optimum's and a random start's (numbers for the book)."""
    k, n_ref, trials = 16, 20, 40
    print(f"\nbest of {k} on {n_ref} reference pairs, exact test errors, {trials} trials:")
    print(f"{'d':>4} {'J(x*)':>9} {'random':>9} {'best-of-K':>10} {'kept':>6} {'rho_d(K)':>9}")
    kept_by_d, se_by_d = {}, {}
    for side in (2, 4, 8):
        prior, op = _problem(side, seed=side)
        A = op.to_dense()
        flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP)
        star = boundary.optimal_start(flow, prior, op, SIGMA_Y)
        j_star = float(boundary.expected_error(flow, star, prior, op, SIGMA_Y))
        zero = torch.zeros(prior.dim, dtype=DT)  # E J(x_T) = J(0) + tr(M^T M), x_T ~ N(0, I)
        j_random = float(boundary.expected_error(flow, zero, prior, op, SIGMA_Y))
        j_random += float(flow.M.pow(2).sum())
        gen, chosen = _gen(10 + side), []
        for _ in range(trials):
            ref_x0, ref_y = _joint(prior, A, n_ref, gen)
            pick = boundary.best_of_k(flow, ref_x0, ref_y, k, generator=gen)
            assert pick.index == int(pick.errors.argmin())
            chosen.append(float(boundary.expected_error(flow, pick.start, prior, op, SIGMA_Y)))
        chosen = torch.tensor(chosen, dtype=DT)
        j_chosen = float(chosen.mean())
        kept = (j_chosen - j_star) / (j_random - j_star)
        kept_by_d[prior.dim] = kept
        se_by_d[prior.dim] = float(chosen.std()) / math.sqrt(trials) / (j_random - j_star)
        rho = boundary.best_of_k_excess(prior.dim, k)
        print(
            f"{prior.dim:4d} {j_star:9.4f} {j_random:9.4f} {j_chosen:10.4f} {kept:6.3f} {rho:9.3f}"
        )
        assert j_star < float(chosen.min())  # the closed-form start beats every chosen one
    # best of K keeps more of the excess in d = 64 than in d = 4, by 5 standard errors
    spread = 5 * math.hypot(se_by_d[4], se_by_d[64])
    assert kept_by_d[64] - kept_by_d[4] > spread


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_value_named():
    prior, op = _problem()
    A = op.to_dense()
    flow = boundary.conditional_flow_map(prior, op, SIGMA_Y, VP)
    ref_x0, ref_y = _joint(prior, A, 4, _gen(9))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="k"):
            boundary.best_of_k(flow, ref_x0, ref_y, bad)
    with pytest.raises(ValueError, match="std"):
        boundary.best_of_k(flow, ref_x0, ref_y, 4, std=0.0)
    with pytest.raises(ValueError, match="sigma_y"):
        boundary.conditional_flow_map(prior, op, 0.0, VP)
    with pytest.raises(ValueError, match="operator"):
        boundary.conditional_flow_map(prior, Downsample((1, 2, 2), 2), SIGMA_Y, VP)
    with pytest.raises(ValueError, match="sampler"):
        boundary.conditional_flow_map(
            prior, op, SIGMA_Y, VP, ts=_ddim_grid(VP), sampler="ddim", eta=1.0
        )
    with pytest.raises(ValueError, match="ts"):
        boundary.conditional_flow_map(prior, op, SIGMA_Y, VP, ts=[0.0, 1.0])
    with pytest.raises(ValueError, match="starts"):
        boundary.expected_error(flow, torch.zeros(3, 5, dtype=DT), prior, op, SIGMA_Y)
    with pytest.raises(ValueError, match="ref_y"):
        boundary.reference_error(flow, torch.zeros(2, prior.dim, dtype=DT), ref_x0, ref_y[:2])
    with pytest.raises(ValueError, match="k"):
        boundary.best_of_k_excess(8, 0)
