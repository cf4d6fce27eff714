"""The stepping engine: its shared transitions against exact formulas, its observer (Step and
Trace), and every bad input it catches for the samplers, the inverse solvers and the PnP loops
before any work is done."""

import math

import pytest
import torch

from diffcore import analytic, flowmap, processes, samplers, stepping
from diffcore.inverse import blind, pnp
from diffcore.inverse import operators as op
from diffcore.inverse import solvers as sv

VP = processes.VP()
GAUSS = analytic.Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.6], [0.6, 0.5]]))
TS = samplers.time_grid(VP, 6, kind="logsnr", t_min=0.05)


def _points(*times):
    return stepping.grid_points(VP, torch.tensor(times, dtype=torch.float64), torch.zeros(1))


# -- the shared transitions ---------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_keeps_the_marginal_variance_and_at_eta_1_is_the_ddpm_posterior(eta):
    """DDIM's weights satisfy w_eps^2 + c^2 = sigma_s^2, so x_s = alpha_s x0 + sigma_s eps' has
    the forward marginal for any eta; at eta = 1 the step is the Gaussian posterior q(x_s | x_t,
    x0) in its textbook form (Ho et al., eq. 7, for any alpha, sigma)."""
    t, s = _points(0.7, 0.4)
    w_x0, w_eps, c = stepping.ddim_weights(t, s, eta)
    assert w_x0 == s.alpha
    assert math.isclose(w_eps**2 + c**2, s.sigma**2, rel_tol=1e-14)
    gen = torch.Generator().manual_seed(0)
    x, x0, z = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    out = stepping.ddim_step(x, x0, t, s, eta, z)
    if eta == 1.0:
        a_ts = t.alpha / s.alpha  # alpha_{t|s}
        var_ts = t.sigma**2 - a_ts**2 * s.sigma**2  # sigma_{t|s}^2
        mean = a_ts * s.sigma**2 / t.sigma**2 * x + s.alpha * var_ts / t.sigma**2 * x0
        std = math.sqrt(var_ts) * s.sigma / t.sigma
        torch.testing.assert_close(out, mean + std * z, rtol=1e-13, atol=1e-13)
    eps = stepping.eps_hat(x, x0, t)
    torch.testing.assert_close(x, t.alpha * x0 + t.sigma * eps, rtol=1e-14, atol=1e-14)
    given = stepping.ddim_step(x, x0, t, s, eta, z, eps=eps)  # the same noise, passed
    torch.testing.assert_close(given, out, rtol=1e-13, atol=1e-13)


def test_the_process_offers_the_same_transitions():
    gen = torch.Generator().manual_seed(1)
    x, x0, z = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    t, s = _points(0.6, 0.2)
    torch.testing.assert_close(
        VP.ddim_step(x, x0, 0.6, 0.2, eta=0.5, z=z), stepping.ddim_step(x, x0, t, s, 0.5, z)
    )
    torch.testing.assert_close(VP.noising_step(x, 0.2, 0.6, z), stepping.noising_step(x, s, t, z))
    with pytest.raises(ValueError, match=r"ddim_step goes down from t to s < t, got t = 0.2"):
        VP.ddim_step(x, x0, 0.2, 0.6)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        VP.noising_step(x, 0.2, 1.5, z)


def test_noising_step_is_the_forward_transition():
    """Noising x_s ~ p_s from s up to t gives the marginal p_t: on x0 = 0 exactly alpha_t / alpha_s
    x_s + sigma_{t|s} z with sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2."""
    s, t = _points(0.3, 0.8)
    ratio, std = stepping.noising_weights(s, t)
    assert ratio == t.alpha / s.alpha
    assert math.isclose(std**2, t.sigma**2 - ratio**2 * s.sigma**2, rel_tol=1e-12)


# -- the observer ------------------------------------------------------------------------------
def test_trace_records_states_times_estimates_and_calls():
    x = VP.prior_sample((4, 2), t=float(TS[0]), generator=torch.Generator().manual_seed(0))
    trace = samplers.Trace()
    out = samplers.heun(GAUSS.denoiser(VP), x, TS, VP, callback=trace)
    assert len(trace) == 6 and trace.nfe == 12
    assert trace.xs.shape == (6, 4, 2) and torch.equal(trace.xs[-1], out)
    torch.testing.assert_close(trace.ts, TS[1:], rtol=0, atol=0)
    # the first model output of each step: D at the step's start
    starts = torch.cat([x[None], trace.xs[:-1]])
    for i in range(6):
        expected = GAUSS.denoise(starts[i], TS[i], VP)
        torch.testing.assert_close(trace.denoised[i], expected, rtol=1e-13, atol=1e-13)
    assert [step.nfe for step in trace.steps] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="the trace is empty"):
        samplers.Trace().xs  # noqa: B018


def test_solvers_report_each_step_and_their_final_estimate():
    prior = analytic.Gaussian(torch.zeros(4), torch.eye(4))
    A = op.Inpainting(torch.tensor([[True, False], [True, True]]).reshape(1, 2, 2))
    y = A(torch.ones(3, 1, 2, 2))
    ts = samplers.time_grid(VP, 5)
    for name, solver in sv.SOLVERS.items():
        trace = stepping.Trace()
        out = solver(prior.denoiser(VP), y, A, 0.1, ts, VP, callback=trace)
        steps = 5 + int(solver.final_call)
        assert len(trace) == steps and trace.nfe == solver.model_calls(5), name
        assert torch.equal(trace.xs[-1], out), name


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_no_sampler_changes_its_input_in_place(name):
    x = VP.prior_sample((4, 2), generator=torch.Generator().manual_seed(0))
    kept = x.clone()
    options = {"eps": 1e-4} if name == "annealed_langevin" else {}
    samplers.SAMPLERS[name](GAUSS.denoiser(VP), x, TS, VP, generator=torch.Generator(), **options)
    assert torch.equal(x, kept)


def test_flow_map_samplers_report_each_step():
    lin = processes.Linear()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = torch.tensor([1.0, 0.5, 0.2, 1e-3], dtype=torch.float64)
    trace = stepping.Trace()

    def jump(x, t, s):
        return GAUSS.pf_ode_map(x, t, s, lin)

    out = flowmap.ctm_sample(jump, x, ts, lin, callback=trace)
    assert len(trace) == 3 and torch.equal(trace.xs[-1], out) and trace.nfe == 3
    torch.testing.assert_close(trace.ts, ts[1:], rtol=0, atol=0)
    trace = stepping.Trace()
    out = flowmap.consistency_sample(lambda x, t: jump(x, t, 1e-3), x, ts, lin, callback=trace)
    assert len(trace) == 3 and torch.equal(trace.xs[-1], out)
    trace = stepping.Trace()
    out = flowmap.meanflow_sample(flowmap.exact_average_velocity(GAUSS), x, ts, callback=trace)
    assert len(trace) == 3 and torch.equal(trace.xs[-1], out)


def test_progress_bar_runs_are_the_same_runs(capsys):
    x = VP.prior_sample((4, 2), generator=torch.Generator().manual_seed(0))
    plain = samplers.dpmpp_2m(GAUSS.denoiser(VP), x, TS, VP)
    shown = samplers.dpmpp_2m(GAUSS.denoiser(VP), x, TS, VP, progress=True)
    assert torch.equal(plain, shown)


# -- bad input ---------------------------------------------------------------------------------
def _good_sampler_call(name, **changes):
    call = {
        "model": GAUSS.denoiser(VP),
        "x": torch.zeros(4, 2),
        "ts": TS,
        "process": VP,
        **({"eps": 1e-4} if name == "annealed_langevin" else {}),
    }
    call.update(changes)
    return lambda: samplers.SAMPLERS[name](**call)


SAMPLER_BAD_INPUT = {
    "model returns the wrong shape": (
        {"model": lambda x, t: x[:, :1]},
        ValueError,
        r"model\(x, t\) must return a tensor of shape \(4, 2\).*got shape \(4, 1\)",
    ),
    "model returns None": (
        {"model": lambda x, t: None},
        TypeError,
        r"model\(x, t\) must return a tensor of shape \(4, 2\), got NoneType",
    ),
    "model is not callable": ({"model": 3}, TypeError, r"model must be callable"),
    "x has NaN": (
        {"x": torch.tensor([[0.0, math.nan]] * 4)},
        ValueError,
        r"x must be finite, got 4 NaN and 0 infinite entries of 8 in x",
    ),
    "x is an integer tensor": (
        {"x": torch.zeros(4, 2, dtype=torch.int64)},
        TypeError,
        r"x must be a float.*tensor.*torch.int64",
    ),
    "x is a list": ({"x": [[0.0, 0.0]]}, TypeError, r"x must be a torch.Tensor, got .*list"),
    "ts increases": (
        {"ts": torch.tensor([0.5, 0.9])},
        ValueError,
        r"ts must decrease strictly, got ts\[0\] = 0.5 <= ts\[1\] = 0.9",
    ),
    "ts outside [0, 1]": ({"ts": torch.tensor([1.5, 0.5])}, ValueError, r"ts must lie in \[0, 1\]"),
    "generator is a seed": ({"generator": 0}, TypeError, r"generator must be a torch.Generator"),
    "noise_sampler is not callable": (
        {"noise_sampler": 1.0},
        TypeError,
        r"noise_sampler must be callable",
    ),
    "callback is not callable": ({"callback": []}, TypeError, r"callback must be callable"),
    "denoise_last is not a bool": (
        {"denoise_last": "yes"},
        TypeError,
        r"denoise_last must be True or False, got denoise_last = 'yes'",
    ),
    "progress is not a bool": ({"progress": 2}, TypeError, r"progress must be True, False or None"),
    "an unknown option": ({"step_size": 0.1}, TypeError, r"step_size"),
}


@pytest.mark.parametrize("case", list(SAMPLER_BAD_INPUT))
@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_refuses_bad_input_naming_it(name, case):
    changes, error, message = SAMPLER_BAD_INPUT[case]
    calls = []
    if "model" not in changes:  # the model must not run on bad input
        changes = {**changes, "model": lambda x, t: calls.append(t) or x}
    with pytest.raises(error, match=message):
        _good_sampler_call(name, **changes)()
    if case != "model returns the wrong shape":
        assert calls == [], f"{name} called the model before refusing {case}"


def test_a_noise_sampler_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"noise_sampler\(i, shape\) must return .* \(4, 2\)"):
        samplers.ddpm(
            GAUSS.denoiser(VP), torch.zeros(4, 2), TS, VP, noise_sampler=lambda i, s: torch.zeros(3)
        )


def test_a_model_that_returns_nan_is_reported():
    with pytest.raises(ValueError, match=r"the run produced NaN or infinite values \(8 of 8\)"):
        samplers.euler(lambda x, t: x * math.nan, torch.zeros(4, 2), TS, VP)


def _solver_problem():
    prior = analytic.Gaussian(torch.zeros(4), torch.eye(4))
    A = op.Inpainting(torch.tensor([[True, False], [True, True]]).reshape(1, 2, 2))
    return prior.denoiser(VP), A, A(torch.ones(3, 1, 2, 2))


SOLVER_BAD_INPUT = {
    "model returns the wrong shape": (
        {"model": lambda x, t: x[..., :1]},
        ValueError,
        r"model\(x, t\) must return a tensor of shape \(3, 1, 2, 2\)",
    ),
    "y has NaN": ({"y": torch.full((3, 3), math.nan)}, ValueError, r"y must be a finite"),
    "y has the wrong shape": ({"y": torch.zeros(3, 4)}, ValueError, r"y must have shape"),
    "operator is a matrix": ({"operator": torch.eye(4)}, TypeError, r"operator must be a"),
    "sigma_y is negative": ({"sigma_y": -0.1}, ValueError, r"sigma_y must be a finite number >= 0"),
    "sigma_y is a string": ({"sigma_y": "0.1"}, TypeError, r"sigma_y must be a finite number"),
    "process is a string": ({"process": "vp"}, TypeError, r"process must be a diffcore Process"),
    "ts increases": ({"ts": torch.tensor([0.2, 0.9])}, ValueError, r"ts must decrease"),
}


@pytest.mark.parametrize("case", list(SOLVER_BAD_INPUT))
@pytest.mark.parametrize("name", list(sv.SOLVERS))
def test_every_solver_refuses_bad_input_naming_it(name, case):
    model, A, y = _solver_problem()
    call = {"model": model, "y": y, "operator": A, "sigma_y": 0.1, "ts": TS, "process": VP}
    changes, error, message = SOLVER_BAD_INPUT[case]
    call.update(changes)
    with pytest.raises(error, match=message):
        sv.SOLVERS[name](**call)


def test_the_pnp_loops_take_the_one_callback():
    """PnP and Gibbs loops report through callback(step) too; bad counts and noise are named."""
    model, A, y = _solver_problem()
    wiener = pnp.wiener_denoiser(torch.zeros(4), torch.eye(4))
    trace = stepping.Trace()
    x = pnp.pnp_hqs(wiener, A, y, 0.1, pnp.dpir_sigmas(1.0, 0.1, 4), callback=trace)
    assert len(trace) == 4 and torch.equal(trace.xs[-1], x)
    assert [float(step.t) for step in trace.steps] == pnp.dpir_sigmas(1.0, 0.1, 4)
    with pytest.raises(TypeError, match=r"n_iter must be an integer >= 1, got n_iter = 2.0"):
        pnp.pnp_pgd(wiener, A, y, 0.1, 0.3, n_iter=2.0)
    with pytest.raises(ValueError, match=r"n_iter must be an integer below 2\*\*31"):
        pnp.red(wiener, A, y, 0.1, 0.3, n_iter=10**30)
    with pytest.raises(TypeError, match="history"):
        pnp.pnp_admm(wiener, A, y, 0.1, 0.3, history=True)
    with pytest.raises(ValueError, match=r"z must be finite"):
        pnp.tv_prox(torch.full((1, 4), math.nan), 0.1)
    with pytest.raises(ValueError, match=r"rho must be a positive finite number, got rho = -1"):
        blind.blind_pnp_dm(
            None, None, torch.zeros(1, 1, 4, 4), 0.1, (3, 3), [-1.0], [0.5], callback=trace
        )
