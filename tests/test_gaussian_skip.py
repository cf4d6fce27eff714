"""``samplers.gaussian_skip``: the closed-form jump along a Gaussian's PF-ODE, then a sampler.

On Gaussian data the jump is the exact flow, so skipping changes nothing but the grid: an exact
solver gives the exact map for every ``t_skip``, and a numerical one converges to the exact map
at its own order, with no floor left by the jump.
"""

import pytest
import torch

from diffcore import analytic, metrics, processes, samplers

T_MIN = 1e-2


def _gaussian():
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64), cov)


def _start(g, process, n=32, t=1.0):
    return g.marginal(t, process).sample(n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("t_skip", [0.95, 0.6, 0.5, 0.37, 0.011])
def test_on_gaussian_data_the_jump_is_exact(process, t_skip):
    """Jump to any t_skip (on the grid or between its times), then the exact map: the exact
    map from ts[0] to ts[-1], to round-off (two affine maps composed, 1e-12 relative)."""
    g = _gaussian()
    x = _start(g, process)
    ts = samplers.time_grid(process, 10, kind="uniform", t_min=T_MIN, t_max=1.0)
    out = samplers.gaussian_skip(g.pf_ode_solver(), g.denoiser(process), g, x, ts, process, t_skip)
    exact = g.pf_ode_map(x, 1.0, T_MIN, process)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12 * float(exact.abs().max()))


def test_the_grid_is_cut_below_t_skip_and_the_start_is_the_jump():
    g, vp = _gaussian(), processes.VP()
    x = _start(g, vp, n=4)
    ts = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.1], dtype=torch.float64)
    seen = {}

    def recorder(model, x, ts, process):
        seen["x"], seen["ts"] = x, ts
        return x

    for t_skip, tail in [
        (0.5, [0.5, 0.4, 0.2, 0.1]),  # between two times: t_skip, then the times below it
        (0.6, [0.6, 0.4, 0.2, 0.1]),  # on a time: the grid from there, no repeated time
        (0.15, [0.15, 0.1]),  # one step left
        (1.0, [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]),  # ts[0]: the whole grid, no jump
    ]:
        samplers.gaussian_skip(recorder, g.denoiser(vp), g, x, ts, vp, t_skip)
        assert seen["ts"].tolist() == tail, t_skip
        jumped = g.pf_ode_map(x, 1.0, t_skip, vp) if t_skip < 1.0 else x
        assert torch.equal(seen["x"], jumped), t_skip


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_skipping_nothing_is_the_plain_sampler(name):
    """t_skip = ts[0]: no jump, the same grid, so the very same output (bit for bit, the same
    seeded noise for the stochastic samplers); by name or by function."""
    g, vp = _gaussian(), processes.VP()
    x = _start(g, vp, n=8, t=0.9)
    ts = samplers.time_grid(vp, 6, kind="uniform", t_min=T_MIN, t_max=0.9)
    options = {"eps": 1e-4} if name == "annealed_langevin" else {}

    def run(sampler_fn):
        generator = torch.Generator().manual_seed(1)
        return sampler_fn(g.denoiser(vp), x, ts, vp, **options, generator=generator)

    plain = run(samplers.SAMPLERS[name])
    for sampler in (name, samplers.SAMPLERS[name]):

        def skip_nothing(model, x, ts, process, sampler=sampler, **opts):
            return samplers.gaussian_skip(sampler, model, g, x, ts, process, 0.9, **opts)

        assert torch.equal(run(skip_nothing), plain), name


@pytest.mark.parametrize("name,order", [("heun", 2), ("dpm_solver_2", 2), ("dpmpp_2m", 2)])
def test_on_gaussian_data_the_skip_converges_with_no_floor(smooth_process, name, order):
    """Skip from 1 to t_skip = ts[n/2], then the sampler on the remaining n/2 uniform steps.  The jump being exact, the error against the exact map is the
    tail's discretisation error alone: it falls at the sampler's order, within 0.15 (as the
    plain solvers' orders are tested), down to ~1e-6 at n = 256, far below any floor a wrong
    jump would leave (the jump's own round-off is ~1e-15)."""
    g = _gaussian()
    x = _start(g, smooth_process)
    exact = g.pf_ode_map(x, 1.0, T_MIN, smooth_process)
    ns, errors = (64, 128, 256), []
    for n in ns:
        ts = samplers.time_grid(smooth_process, n, kind="uniform", t_min=T_MIN, t_max=1.0)
        model, t_skip = g.denoiser(smooth_process), float(ts[n // 2])
        out = samplers.gaussian_skip(name, model, g, x, ts, smooth_process, t_skip)
        errors.append(float((out - exact).abs().max()))
    slope = metrics.convergence_order(ns, errors)
    assert abs(slope - order) <= 0.15, (name, slope, errors)


def test_options_reach_the_sampler_and_the_cost_is_the_tail():
    g, vp = _gaussian(), processes.VP()
    x = _start(g, vp, n=4)
    ts = samplers.time_grid(vp, 12, kind="logsnr", t_min=T_MIN, t_max=0.99)
    t_skip = float(ts[5])  # 7 steps left
    calls, steps = [], []

    def counted(x, t):
        calls.append(float(t))
        return g.denoise(x, t, vp)

    for name in ("euler", "heun", "dpm_solver_3", "plms", "unipc"):
        calls.clear()
        steps.clear()
        out = samplers.gaussian_skip(
            name, counted, g, x, ts, vp, t_skip, callback=lambda step: steps.append(step.i)
        )
        assert len(calls) == samplers.model_calls(name, 7), name
        assert max(calls) <= t_skip and steps == list(range(7)), name
        xt = samplers.gaussian_skip(name, g.denoiser(vp), g, x, ts, vp, t_skip)
        denoised = samplers.gaussian_skip(
            name, g.denoiser(vp), g, x, ts, vp, t_skip, denoise_last=True
        )
        torch.testing.assert_close(out, xt, rtol=0, atol=0)
        torch.testing.assert_close(denoised, g.denoise(xt, ts[-1], vp))


def test_a_tensor_t_skip_is_a_time_of_the_grid():
    g, vp = _gaussian(), processes.VP()
    x = _start(g, vp, n=4)
    ts = samplers.time_grid(vp, 8, kind="uniform", t_min=T_MIN)
    as_tensor = samplers.gaussian_skip("heun", g.denoiser(vp), g, x, ts, vp, ts[3])
    as_float = samplers.gaussian_skip("heun", g.denoiser(vp), g, x, ts, vp, float(ts[3]))
    assert torch.equal(as_tensor, as_float)


@pytest.mark.parametrize(
    "t_skip,message",
    [
        (
            T_MIN,
            r"t_skip must be a number in \(ts\[-1\], ts\[0\]\] = \(0.01, 1\], got t_skip = 0.01",
        ),
        (0.001, r"got t_skip = 0.001"),
        (1.2, r"got t_skip = 1.2"),
        (float("nan"), r"got t_skip = nan"),
        ("0.5", r"got t_skip = '0.5'"),
        (None, r"got t_skip = None"),
    ],
)
def test_a_bad_t_skip_is_refused(t_skip, message):
    g, vp = _gaussian(), processes.VP()
    ts = samplers.time_grid(vp, 8, kind="uniform", t_min=T_MIN)
    with pytest.raises(ValueError, match=message):
        samplers.gaussian_skip("heun", g.denoiser(vp), g, _start(g, vp, 2), ts, vp, t_skip)


def test_bad_inputs_are_refused():
    g, vp = _gaussian(), processes.VP()
    x = _start(g, vp, 2)
    ts = samplers.time_grid(vp, 8, kind="uniform", t_min=T_MIN)
    mixture = analytic.GaussianMixture(g.means, g.covs, g.weights)
    with pytest.raises(
        ValueError, match=r"sampler must be a callable or one of .* got sampler = 'rk4'"
    ):
        samplers.gaussian_skip("rk4", g.denoiser(vp), g, x, ts, vp, 0.5)
    with pytest.raises(ValueError, match=r"sampler must be a callable .* got sampler = 3"):
        samplers.gaussian_skip(3, g.denoiser(vp), g, x, ts, vp, 0.5)
    with pytest.raises(ValueError, match=r"gaussian must be an analytic.Gaussian, got gaussian = "):
        samplers.gaussian_skip("heun", g.denoiser(vp), mixture, x, ts, vp, 0.5)
    with pytest.raises(ValueError, match=r"ts must decrease strictly"):
        samplers.gaussian_skip("heun", g.denoiser(vp), g, x, torch.tensor([0.9, 0.5, 0.7]), vp, 0.6)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        samplers.gaussian_skip("heun", g.denoiser(vp), g, torch.zeros(2, 4), ts, vp, 0.5)
