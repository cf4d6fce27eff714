"""Exact inversion (DDIM inversion, EDICT, BDIA) against exact identities and the exact Gaussian
PF-ODE flow map, and where "exactly invertible" stops holding in floating point."""

import inspect
import math

import pytest
import torch

from diffcore import analytic, metrics, processes, samplers, stepping
from diffcore.inversion import (
    METHODS,
    bdia,
    bdia_inverse,
    bdia_pair,
    ddim_inversion,
    ddim_move,
    edict,
    edict_inverse,
    invert,
    regenerate,
    round_trip,
)
from tests.conftest import PROCESSES

T_MIN = 1e-2
VP = PROCESSES["vp"]


def _gaussian():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), cov)


def _t_max(process):
    """EDICT divides by alpha: under Linear, start below t = 1 (alpha(1) = 0)."""
    return 0.99 if isinstance(process, processes.Linear) else 1.0


def _noise(process, t_max=1.0, n=64, seed=0):
    """Exact samples of p_{t_max}: the start states of the samplers."""
    return (
        _gaussian()
        .marginal(t_max, process)
        .sample(n, generator=torch.Generator().manual_seed(seed))
    )


def _data(process, n=64, seed=1):
    """Exact samples of p_{t_min}: the 'images' to invert."""
    return (
        _gaussian()
        .marginal(T_MIN, process)
        .sample(n, generator=torch.Generator().manual_seed(seed))
    )


def _grid(process, n, t_max=1.0):
    return samplers.time_grid(process, n, kind="uniform", t_min=T_MIN, t_max=t_max)


def _rel(a, b):
    """The largest error relative to the largest entry of the reference."""
    return float((a - b).abs().max() / b.abs().max())


def _slope(ns, errors):
    """The least-squares slope of log(error) against n: the growth rate per step."""
    n = torch.tensor(ns, dtype=torch.float64)
    e = torch.tensor(errors, dtype=torch.float64).log()
    return float(((n - n.mean()) * (e - e.mean())).sum() / (n - n.mean()).pow(2).sum())


# -- the DDIM map and DDIM inversion -----------------------------------------------------------
def test_ddim_move_is_the_ddim_step_and_undoes_itself_with_x0_frozen(process):
    g, ts = _gaussian(), _grid(process, 5)
    a, b = stepping.grid_points(process, ts[1:3], ts)
    x = _noise(process, float(ts[1]), n=16)
    x0 = g.denoise(x, a.t, process)
    down = ddim_move(x, x0, a, b)
    torch.testing.assert_close(down, stepping.ddim_step(x, x0, a, b), rtol=1e-14, atol=1e-14)
    # with the same x0, the map back up is the exact inverse ...
    torch.testing.assert_close(ddim_move(down, x0, b, a), x, rtol=1e-13, atol=1e-13)
    # ... DDIM inversion re-evaluates x0 at the point it has, and so does not return x
    again = ddim_move(down, g.denoise(down, b.t, process), b, a)
    assert _rel(again, x) > 1e-3


def test_ddim_inversion_drifts_at_first_order(smooth_process):
    """Inverting data with DDIM and sampling again misses the data by a drift that is not
    round-off and falls like 1/n; the inverted noise misses the exact inverse flow map of the
    PF-ODE, at the same order (measured on VP at 160 steps: drift 0.065, miss 0.050)."""
    g, data = _gaussian(), _data(smooth_process)
    model = g.denoiser(smooth_process)
    exact = g.pf_ode_map(data, T_MIN, 1.0, smooth_process)
    ns, drift, miss = (20, 40, 80, 160), [], []
    for n in ns:
        ts = _grid(smooth_process, n)
        drift.append(
            float((round_trip("ddim", model, data, ts, smooth_process) - data).abs().max())
        )
        miss.append(float((invert("ddim", model, data, ts, smooth_process) - exact).abs().max()))
    print(f"\nDDIM drift {drift}, inversion error {miss}")
    assert min(drift) > 1e-3
    assert abs(metrics.convergence_order(ns, drift) - 1) <= 0.15, drift
    assert abs(metrics.convergence_order(ns, miss) - 1) <= 0.15, miss


# -- BDIA: the sampler, its inverse, their round trips -----------------------------------------
def test_bdia_with_gamma_zero_is_ddim(process):
    g, ts = _gaussian(), _grid(process, 12)
    x, model = _noise(process), g.denoiser(process)
    ddim = samplers.ddim(model, x, ts, process)
    torch.testing.assert_close(bdia(model, x, ts, process, gamma=0.0), ddim, rtol=1e-13, atol=1e-13)
    assert _rel(bdia(model, x, ts, process, gamma=0.5), ddim) > 1e-3  # not vacuous


@pytest.mark.parametrize("n", [1, 2, 25])
def test_bdia_round_trips_to_round_off(process, n):
    """gamma = 1: sampling then inverting gives back the start state and the DDIM first step;
    inverting data then sampling gives back the data.  Round-off only: measured <= 6e-16
    relative, and 1.3e-13 for data under VE, whose inverted noise is ~50 times the data.  The
    bound 1e-12 leaves a factor of 8 over the worst.  A wrong coefficient (gamma = 0.9 in the
    inverse) or a sampler started without the second state misses by 1e-3 to 2e-2 (measured),
    a million times the bound at least."""
    g, ts = _gaussian(), _grid(process, n)
    x, data, model = _noise(process), _data(process), g.denoiser(process)
    pair = bdia_pair(model, x, ts, process)
    x0, x1 = bdia_inverse(model, pair, ts, process)
    points = stepping.grid_points(process, ts[:2], x)
    first = ddim_move(x, g.denoise(x, ts[0], process), *points)
    assert _rel(x0, x) < 1e-12 and _rel(x1, first) < 1e-12
    back = round_trip("bdia", model, data, ts, process)
    assert _rel(back[1], data) < 1e-12
    if n > 2:  # on one or two steps there is nothing, or little, for gamma to weigh
        wrong = bdia_inverse(model, pair, ts, process, gamma=0.9)[0]
        assert _rel(wrong, x) > 1e-6
        start = invert("bdia", model, data, ts, process)
        assert _rel(bdia(model, start[0], ts, process), data) > 1e-6  # x_1 by DDIM: not exact


def test_bdia_round_trip_with_gamma_below_one_in_float64():
    """In exact arithmetic any gamma in (0, 1] inverts exactly; over 20 steps in float64 the
    round-off of gamma = 0.7 grows by 0.7^-20 ~ 1e3 and stays far below 1e-9 (measured)."""
    g, ts = _gaussian(), _grid(VP, 20)
    x, model = _noise(VP), g.denoiser(VP)
    for gamma in (0.7, 0.9):
        pair = bdia_pair(model, x, ts, VP, gamma=gamma)
        back = invert("bdia", model, pair, ts, VP, gamma=gamma)
        assert _rel(back[0], x) < 1e-9, gamma
        again = regenerate("bdia", model, back, ts, VP, gamma=gamma)
        assert _rel(again[1], pair[1]) < 1e-9 and _rel(again[0], pair[0]) < 1e-9, gamma


# -- EDICT: the coupled chains and their inverse -----------------------------------------------
@pytest.mark.parametrize("leapfrog", [False, True])
def test_edict_round_trips_to_round_off(process, leapfrog):
    """Sampling then inverting gives back the start (measured <= 3e-15 relative); inverting data
    then sampling gives back the data (measured <= 3e-13: the inverse mixing divides by p twice
    per step, and the data's pair (x, x) is not one the sampler makes).  The bounds, 1e-12 and
    1e-10, leave a factor of 300 at least.  A wrong p (0.92 for 0.93) or the other order of the
    two updates misses by 4e-3 to 3 (measured), a million times the bound at least."""
    g, top = _gaussian(), _t_max(process)
    ts, model = _grid(process, 25, t_max=top), g.denoiser(process)
    x, data = _noise(process, top), _data(process)
    pair = edict(model, x, ts, process, leapfrog=leapfrog)
    back = edict_inverse(model, pair, ts, process, leapfrog=leapfrog)
    assert max(_rel(z, x) for z in back) < 1e-12
    again = round_trip("edict", model, data, ts, process, leapfrog=leapfrog)
    assert max(_rel(z, data) for z in again) < 1e-10
    wrong_p = edict_inverse(model, pair, ts, process, p=0.92, leapfrog=leapfrog)
    wrong_order = edict_inverse(model, pair, ts, process, leapfrog=not leapfrog)
    assert _rel(wrong_p[0], x) > 1e-6 and _rel(wrong_order[0], x) > 1e-6


def test_edict_chains_agree_with_ddim_on_the_first_step():
    """On one step both chains start at x: the x-update is the DDIM step, exactly."""
    g, ts = _gaussian(), _grid(VP, 1)
    x, model = _noise(VP), g.denoiser(VP)
    x_chain, _ = edict(model, x, ts, VP, p=1.0)
    torch.testing.assert_close(x_chain, samplers.ddim(model, x, ts, VP), rtol=1e-13, atol=1e-13)


# -- accuracy against the exact flow map, and the orders ---------------------------------------
def _errors(run, process, ns):
    g = _gaussian()
    x = _noise(process)
    exact = g.pf_ode_map(x, 1.0, T_MIN, process)
    return [float((run(g.denoiser(process), x, _grid(process, n)) - exact).abs().max()) for n in ns]


def test_orders_of_ddim_and_bdia_against_the_exact_flow_map(smooth_process):
    """DDIM is of order 1, BDIA at gamma = 1 of order 2 (a leapfrog step: truncation O(h^3) on a
    grid that varies smoothly)."""
    ns = (32, 64, 128, 256)
    ddim = _errors(lambda m, x, ts: samplers.ddim(m, x, ts, smooth_process), smooth_process, ns)
    two = _errors(lambda m, x, ts: bdia(m, x, ts, smooth_process), smooth_process, ns)
    print(f"\nDDIM {ddim}\nBDIA(1) {two}")
    assert abs(metrics.convergence_order(ns, ddim) - 1) <= 0.15, ddim
    assert abs(metrics.convergence_order(ns, two) - 2) <= 0.15, two


def test_bdia_below_one_carries_a_known_fraction_of_the_ddim_error(smooth_process):
    """For gamma < 1, BDIA = gamma (leapfrog) + (1 - gamma) DDIM, a two-step method with
    rho(z) = z^2 - (1 - gamma) z - gamma, rho'(1) = 1 + gamma: its local error is (1 - gamma)
    DDIM's plus O(h^3), so its global error is (1 - gamma)/(1 + gamma) times DDIM's, up to
    O(h^2).  The difference is of order 2; with the fraction 1 - gamma (forgetting rho'(1))
    the first-order terms do not cancel."""
    gamma, ns = 0.5, (32, 64, 128, 256)
    g, process = _gaussian(), smooth_process
    x = _noise(process)
    exact = g.pf_ode_map(x, 1.0, T_MIN, process)
    right, wrong, plain = [], [], []
    for n in ns:
        ts = _grid(process, n)
        e_bdia = bdia(g.denoiser(process), x, ts, process, gamma=gamma) - exact
        e_ddim = samplers.ddim(g.denoiser(process), x, ts, process) - exact
        right.append(float((e_bdia - (1 - gamma) / (1 + gamma) * e_ddim).abs().max()))
        wrong.append(float((e_bdia - (1 - gamma) * e_ddim).abs().max()))
        plain.append(float(e_bdia.abs().max()))
    print(f"\nBDIA(0.5) {plain}, order {metrics.convergence_order(ns, plain):.3f}")
    assert abs(metrics.convergence_order(ns, right) - 2) <= 0.15, right
    assert metrics.convergence_order(ns, wrong) < 1.5, wrong


def test_edict_is_first_order_and_needs_its_mixing():
    """EDICT makes DDIM steps with O(h^2) perturbations: order 1 (measured on VP; on the other
    processes the slope is still settling at 1024 steps).  Without mixing (p = 1) the two chains
    drift apart: the error at 256 steps is a hundred times larger (measured 6.3 against 0.021)."""
    ns = (128, 256, 512, 1024)

    def run(p):
        return lambda m, x, ts: edict(m, x, ts, VP, p=p, progress=False)[0]

    mixed = _errors(run(0.93), VP, ns)
    print(f"\nEDICT(0.93) {mixed}")
    assert abs(metrics.convergence_order(ns, mixed) - 1) <= 0.15, mixed
    unmixed = _errors(run(1.0), VP, (256,))
    assert unmixed[0] > 100 * mixed[1], (unmixed, mixed)


def test_inverting_data(process):
    """Data to noise, against the exact inverse flow map: BDIA at gamma = 1 is of order 2.  Below
    1 the O(h^2) mismatch of its DDIM first step is amplified by gamma^-1 per step; EDICT's
    by p^-2 per step: both blow up as n grows (a lesson, not a bug: their exactness is for
    states their own sampler produced)."""
    g, top = _gaussian(), _t_max(process)
    data, model = _data(process), g.denoiser(process)
    exact = g.pf_ode_map(data, T_MIN, top, process)

    def miss(name, n, **options):
        start = invert(name, model, data, _grid(process, n, top), process, **options)
        return float((start[0] - exact).abs().max())

    ns = (20, 40, 80, 160)
    errors = [miss("bdia", n) for n in ns]
    print(f"\nBDIA(1) inversion {errors}")
    if process is not PROCESSES["ddpm"]:  # the discrete schedule has kinks: no clean order
        assert abs(metrics.convergence_order(ns, errors) - 2) <= 0.15, errors
    assert errors[-1] < errors[0]
    assert miss("bdia", 320, gamma=0.9) > 10 * miss("bdia", 40, gamma=0.9)
    assert miss("edict", 320) > 10 * miss("edict", 40)


# -- where exact inversion stops in floating point ---------------------------------------------
def _bdia_round_off(n, gamma, dtype):
    g, ts = _gaussian(), _grid(VP, n)
    x = _noise(VP).to(dtype)
    pair = bdia_pair(g.denoiser(VP), x, ts, VP, gamma=gamma)
    return _rel(bdia_inverse(g.denoiser(VP), pair, ts, VP, gamma=gamma)[0], x)


@pytest.mark.parametrize("gamma,ns", [(0.5, (20, 30, 40, 50)), (0.7, (30, 45, 60, 75))])
def test_bdia_round_off_grows_like_gamma_to_the_minus_n(gamma, ns):
    """The inverse recursion x_{i-1} = Phi(x_i) + (x_{i+1} - Phi(x_i)) / gamma has a parasitic
    root near -1/gamma: each step's round-off is multiplied by 1/gamma per later step, so
    log(error) grows by -log(gamma) per step (measured 0.71 for 0.69 at gamma = 0.5 and 0.36
    for 0.36 at 0.7).  At gamma = 1 it does not grow."""
    errors = [_bdia_round_off(n, gamma, torch.float64) for n in ns]
    rate = _slope(ns, errors)
    print(f"\ngamma = {gamma}: errors {errors}, log-growth per step {rate:.3f}")
    assert abs(rate / -math.log(gamma) - 1) <= 0.15, (rate, errors)
    assert _bdia_round_off(400, 1.0, torch.float64) < 1e-13


def test_float32_loses_what_float64_keeps():
    """gamma = 0.5 over 30 steps: 2^30 ~ 1e9 times the round-off, that is ~1e-7 in float64 and
    ~1e2 in float32 (measured 8e-8 and 25): the float32 round trip returns nothing like the
    start.  gamma = 1 keeps float32 at its resolution (measured 1e-7)."""
    assert _bdia_round_off(30, 0.5, torch.float64) < 1e-5
    assert _bdia_round_off(30, 0.5, torch.float32) > 1e-1
    assert _bdia_round_off(30, 1.0, torch.float32) < 1e-5


def test_edict_round_off_grows_like_p_to_the_minus_2n():
    """EDICT's mixing has eigenvalues 1 and p^2 (det = p^2): its inverse multiplies the
    difference of the chains by p^-2 per step, and the round-off with it (measured 0.43 per step
    for 2 log(1/0.8) = 0.45)."""
    g, p, ns = _gaussian(), 0.8, (40, 60, 80)
    x, model = _noise(VP), g.denoiser(VP)
    errors = []
    for n in ns:
        ts = _grid(VP, n)
        back = edict_inverse(model, edict(model, x, ts, VP, p=p), ts, VP, p=p)
        errors.append(max(_rel(z, x) for z in back))
    rate = _slope(ns, errors)
    print(f"\nEDICT p = {p}: errors {errors}, log-growth per step {rate:.3f}")
    assert abs(rate / (-2 * math.log(p)) - 1) <= 0.15, (rate, errors)


# -- the engine's conventions: model calls, callbacks, the sampler's signature ----------------
def test_model_calls_and_callbacks():
    g, n = _gaussian(), 7
    ts, x, model = _grid(VP, n), _noise(VP, n=4), g.denoiser(VP)
    trace = stepping.Trace()
    pair = bdia_pair(model, x, ts, VP, callback=trace)
    assert trace.nfe == n and trace.ts.tolist() == ts[1:].tolist()
    torch.testing.assert_close(trace.xs[-2], pair[0], rtol=0, atol=0)
    x1 = trace.xs[0]
    trace = stepping.Trace()
    again = bdia(model, (x, x1), ts, VP, callback=trace)
    assert trace.nfe == n - 1 and len(trace) == n  # the given x_1 costs no call
    torch.testing.assert_close(again, pair[1], rtol=0, atol=0)
    for name, options, calls in (("ddim", {}, n), ("edict", {}, 2 * n), ("bdia", {}, n)):
        trace = stepping.Trace()
        start = invert(name, model, x, ts, VP, callback=trace, **options)
        assert trace.nfe == calls and len(trace) == n, name
        assert trace.ts.tolist() == ts.flip(0)[1:].tolist(), name
        trace = stepping.Trace()
        regenerate(name, model, start, ts, VP, callback=trace)
        assert trace.nfe == calls - (name == "bdia") and len(trace) == n, name
    trace = stepping.Trace()
    bdia_inverse(model, pair, ts, VP, callback=trace)
    assert trace.nfe == len(trace) == n - 1
    assert METHODS == ("ddim", "edict", "bdia")


def test_bdia_has_the_sampler_signature_and_an_exact_output_law():
    """The facts of the registry entry: (model, x, ts, process, *, gamma, **run), deterministic,
    one call per step; its output on Gaussian data is Gaussian, so its W2 to p_{t_min} is exact
    (at 10 log-SNR steps on VP: BDIA(1) 0.019, DDIM 0.22, measured)."""
    params = inspect.signature(bdia).parameters
    assert list(params)[:4] == ["model", "x", "ts", "process"]
    own = [p for p in list(params)[4:] if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    assert own == ["gamma"] and params["run"].kind is inspect.Parameter.VAR_KEYWORD
    assert "Shapes" in bdia.__doc__
    g = _gaussian()
    ts = samplers.time_grid(VP, 10, kind="logsnr", t_min=T_MIN, t_max=1.0)
    target = g.marginal(T_MIN, VP)

    def w2(sampler):
        mean, cov = metrics.sampler_output_law(sampler, g, ts, VP)
        return float(metrics.gaussian_w2(mean, cov, target.mean, target.cov))

    ours, ddim = w2(bdia), w2(samplers.ddim)
    print(f"\nexact W2 at 10 steps: BDIA(1) {ours:.3g}, DDIM {ddim:.3g}")
    assert ours < ddim / 5


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda m, x, ts: bdia(m, x, ts, VP, gamma=1.5),
            r"gamma must lie in \[0, 1\], got gamma = 1.5",
        ),
        (lambda m, x, ts: bdia(m, x, ts, VP, gamma=-0.1), r"got gamma = -0.1"),
        (
            lambda m, x, ts: bdia_inverse(m, x, ts, VP, gamma=0.0),
            r"gamma must lie in \(0, 1\], got gamma = 0.0",
        ),
        (lambda m, x, ts: invert("bdia", m, x, ts, VP, gamma=2), r"got gamma = 2"),
        (lambda m, x, ts: edict(m, x, ts, VP, p=0.0), r"p must lie in \(0, 1\], got p = 0.0"),
        (lambda m, x, ts: edict(m, x, ts, VP, p=1.2), r"got p = 1.2"),
        (lambda m, x, ts: edict_inverse(m, x, ts, VP, p=-1), r"got p = -1"),
        (lambda m, x, ts: invert("edict", m, x, ts, VP, p=float("nan")), r"got p = nan"),
        (lambda m, x, ts: invert("dpm", m, x, ts, VP), r"name must be one of .* got name = 'dpm'"),
        (lambda m, x, ts: regenerate("heun", m, x, ts, VP), r"got name = 'heun'"),
        (lambda m, x, ts: edict(m, (x, x[:1]), ts, VP), r"x\[0\] has shape \(4, 2\) but x\[1\]"),
        (lambda m, x, ts: bdia_inverse(m, (x, x * float("nan")), ts, VP), r"x\[1\] must be finite"),
        (lambda m, x, ts: ddim_inversion(m, x, ts.flip(0), VP), r"ts must decrease strictly"),
    ],
)
def test_bad_input_is_refused(call, message):
    g = _gaussian()
    x, ts = _noise(VP, n=4), _grid(VP, 4)
    with pytest.raises(ValueError, match=message):
        call(g.denoiser(VP), x, ts)


def test_bad_grids_and_kinds_are_refused():
    g, lin = _gaussian(), processes.Linear()
    x = _noise(VP, n=4)
    with pytest.raises(
        ValueError, match=r"edict needs alpha > 0 on the grid, got alpha = 0, .* ts\[0\] = 1"
    ):
        edict(g.denoiser(lin), x, samplers.time_grid(lin, 4), lin)
    to_zero = samplers.time_grid(VP, 4, t_min=0.0)
    with pytest.raises(ValueError, match=r"ddim_inversion needs sigma > 0 at ts\[-1\]"):
        ddim_inversion(g.denoiser(VP), x, to_zero, VP)
    with pytest.raises(ValueError, match=r"bdia_inverse needs sigma > 0 at ts\[-1\]"):
        bdia_inverse(g.denoiser(VP), x, to_zero, VP)
    with pytest.raises(TypeError, match=r"leapfrog must be True or False, got leapfrog = 1"):
        edict(g.denoiser(VP), x, _grid(VP, 4), VP, leapfrog=1)
    with pytest.raises(TypeError, match=r"x must be a tensor or a pair of tensors"):
        bdia_inverse(g.denoiser(VP), (x, x, x), _grid(VP, 4), VP)
    with pytest.raises(TypeError, match=r"gamma must be a real number"):
        bdia(g.denoiser(VP), x, _grid(VP, 4), VP, gamma="1")
