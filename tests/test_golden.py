"""Every sampler, solver and PnP loop reproduces, to 1e-12, the outputs recorded on fixed seeds
in float64 (``tests/data/golden_outputs.pt``) before the samplers and solvers were rewritten on
the stepping engine (the recorded code is commit 51cf677).  The inputs are in
``tests/golden_cases.py``; each record is compared with a bound of 1e-12 times the largest
entry (at least 1), far above float64 round-off (1e-16 per operation, a few hundred
operations) and far below any change of a coefficient."""

import pytest
import torch

from diffcore import analytic, flowmap, metrics, processes, samplers
from diffcore.inverse import blind, pnp
from diffcore.inverse import solvers as sv
from diffcore.stepping import Trace
from tests import golden_cases as gc

GOLDEN = torch.load(gc.GOLDEN_PATH)


def _close(key: str, value: torch.Tensor) -> None:
    expected = GOLDEN[key]
    assert value.shape == expected.shape, key
    bound = 1e-12 * max(1.0, float(expected.abs().max()))
    err = float((value - expected).abs().max())
    assert err <= bound, f"{key}: off by {err:.3g} (bound {bound:.3g})"


def _sampler_cases():
    for grid in gc.sampler_grids():
        for name in samplers.SAMPLERS:
            for k in range(len(gc.SAMPLER_OPTIONS.get(name, [{}]))):
                if f"sampler/{grid}/{name}/{k}" in GOLDEN:
                    yield grid, name, k


@pytest.mark.parametrize("grid,name,k", list(_sampler_cases()))
def test_samplers_reproduce_the_recorded_outputs(grid, name, k):
    process, ts = gc.sampler_grids()[grid]
    model = gc.mixture().denoiser(process)
    options = gc.SAMPLER_OPTIONS.get(name, [{}])[k]
    trace = Trace()
    out = samplers.SAMPLERS[name](
        model, gc.start(process, ts), ts, process, callback=trace, generator=gc.noise(), **options
    )
    _close(f"sampler/{grid}/{name}/{k}", out)
    _close(f"trajectory/{grid}/{name}/{k}", trace.xs)
    assert trace.nfe == samplers.model_calls(name, len(ts) - 1, **options) or grid in (
        "vp_to_zero",
        "linear_from_one",
    )  # a step of infinite log-SNR length may save a call
    out = samplers.SAMPLERS[name](
        model,
        gc.start(process, ts),
        ts,
        process,
        generator=gc.noise(),
        denoise_last=True,
        **options,
    )
    _close(f"denoised/{grid}/{name}/{k}", out)


def test_gaussian_skip_and_exact_laws_reproduce_the_recorded_outputs():
    process, ts = gc.sampler_grids()["vp_logsnr"]
    mix = gc.mixture()
    unit = analytic.Gaussian(torch.zeros(2), torch.eye(2))
    out = samplers.gaussian_skip(
        "ddim", mix.denoiser(process), unit, gc.start(process, ts), ts, process, 0.5
    )
    _close("skip/ddim", out)
    gauss = analytic.Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[2.0, 0.6], [0.6, 0.5]]))
    for name, options in gc.LAW_OPTIONS.items():
        mean, cov = metrics.sampler_output_law(name, gauss, ts, process, **options)
        _close(f"law/{name}/mean", mean)
        _close(f"law/{name}/cov", cov)


def _solver_cases():
    for key in GOLDEN:
        if key.startswith("solver/") and not key.endswith("default_start"):
            _, kind, pname, name, sigma_y = key.split("/")
            yield kind, pname, name, float(sigma_y)


@pytest.mark.parametrize("kind,pname,name,sigma_y", list(_solver_cases()))
def test_solvers_reproduce_the_recorded_outputs(kind, pname, name, sigma_y):
    prior, A, y = gc.solver_problem(kind)
    process = {"vp": processes.VP(), "linear": processes.Linear()}[pname]
    ts = samplers.time_grid(process, 5, t_max=0.999 if pname == "linear" else 1.0)
    gen = torch.Generator().manual_seed(5)
    x = process.prior_sample((3, *A.in_shape), t=float(ts[0]), generator=gen)
    y = y.expand(3, *y.shape[1:])
    model = prior.denoiser(process)
    trace = Trace()
    start = {"mu": x} if name == "red_diff" else {"x": x}
    out = sv.SOLVERS[name](
        model, y, A, sigma_y, ts, process, generator=gen, callback=trace, **start
    )
    _close(f"solver/{kind}/{pname}/{name}/{sigma_y}", out)
    assert len(trace) >= len(ts) - 1
    if name == "red_diff":
        gen = torch.Generator().manual_seed(5)
        torch.randn(x.shape, generator=gen)  # the recorded code drew a start it did not use
        out = sv.SOLVERS[name](model, y, A, sigma_y, ts, process, generator=gen)
        _close(f"solver/{kind}/{pname}/{name}/{sigma_y}/default_start", out)


def test_pnp_loops_reproduce_the_recorded_outputs():
    prior, A, y = gc.solver_problem("blur")
    wiener = pnp.wiener_denoiser(prior.mean, prior.cov)
    runs = {
        "pgd": lambda cb: pnp.pnp_pgd(wiener, A, y, 0.1, 0.3, n_iter=6, callback=cb),
        "admm": lambda cb: pnp.pnp_admm(wiener, A, y, 0.1, 0.3, n_iter=6, callback=cb),
        "hqs": lambda cb: pnp.pnp_hqs(wiener, A, y, 0.1, pnp.dpir_sigmas(1.0, 0.1, 6), callback=cb),
        "red": lambda cb: pnp.red(wiener, A, y, 0.1, 0.3, n_iter=6, callback=cb),
        "tv_fista": lambda cb: pnp.tv_fista(A, y, 0.05, n_iter=6, callback=cb),
    }
    for name, run in runs.items():
        trace = Trace()
        _close(f"pnp/{name}", run(trace))
        if name == "tv_fista":  # recorded: the objective 0.5 |A x - y|^2 + lam TV(x) per step
            r = A(trace.xs.flatten(0, 1)) - y.expand(6, *y.shape[1:])
            objective = 0.5 * r.flatten(1).pow(2).sum(1) + 0.05 * pnp.tv(trace.xs.flatten(0, 1))
            _close(f"pnp/{name}/trace", objective.reshape(6, -1))
        else:
            _close(f"pnp/{name}/trace", trace.xs)
    y3 = y.expand(3, *y.shape[1:])
    gen = torch.Generator().manual_seed(2)
    step = pnp.gaussian_prior_step(prior, generator=gen)
    trace = Trace()
    rhos = pnp.dpir_sigmas(1.0, 0.1, 5)
    _close("pnp/dm_gauss", pnp.pnp_dm(step, A, y3, 0.1, rhos, generator=gen, callback=trace))
    _close("pnp/dm_gauss/trace", trace.xs)
    gen = torch.Generator().manual_seed(2)
    vp = processes.VP()
    step = pnp.diffusion_prior_step(prior.denoiser(vp), vp, n_steps=4, generator=gen)
    rhos = pnp.dpir_sigmas(1.0, 0.1, 4)
    _close("pnp/dm_diffusion", pnp.pnp_dm(step, A, y3, 0.1, rhos, generator=gen))


def test_blind_pnp_dm_reproduces_the_recorded_outputs():
    args, options = gc.blind_problem()
    trace = Trace()
    x, k = blind.blind_pnp_dm(*args, **options, callback=trace)
    _close("blind/x", x)
    _close("blind/k", k)
    assert torch.equal(trace.xs[-1], x) and torch.equal(trace.stack("kernel")[-1], k)


def test_flow_map_samplers_reproduce_the_recorded_outputs():
    lin = processes.Linear()
    gauss = analytic.Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[2.0, 0.6], [0.6, 0.5]]))
    ts = torch.tensor([1.0, 0.6, 0.3, 1e-3])
    x1 = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))

    def jump(x, t, s):
        return gauss.pf_ode_map(x, t, s, lin)

    _close("flowmap/ctm0", flowmap.ctm_sample(jump, x1, ts, lin))
    gen = torch.Generator().manual_seed(1)
    _close("flowmap/ctm05", flowmap.ctm_sample(jump, x1, ts, lin, gamma=0.5, generator=gen))
    gen = torch.Generator().manual_seed(1)
    f = lambda x, t: gauss.pf_ode_map(x, t, 1e-3, lin)  # noqa: E731
    _close("flowmap/cm", flowmap.consistency_sample(f, x1, ts, lin, generator=gen))
    u = flowmap.exact_average_velocity(gauss)
    _close("flowmap/meanflow", flowmap.meanflow_sample(u, x1, torch.tensor([1.0, 0.5, 0.0])))
