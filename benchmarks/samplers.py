"""Every sampler of ``diffcore.samplers`` against exact answers, and its own cost per step.

For each sampler and NFE in {5, 10, 20, 50, 100, 200} (steps = the most whose model calls fit
the NFE: NFE // calls per step, and NFE - 1 for PLMS), from t = 1 to t_min = 1e-3 on the
log-SNR grid (uniform in t for Linear, whose log-SNR is infinite at t = 1), this prints

1. ``ode err``, for VP, VP-cosine, VE and Linear: the largest error at t_min against the exact
   PF-ODE map of a 2-D Gaussian (``Gaussian.pf_ode_map``, 256 exact samples of p_1, float64);
   '-' for stochastic samplers, which do not follow the ODE path;

and, under VP:

2. ``W2 gauss``: the exact W2 between the sampler's output law and p_{t_min} on that Gaussian
   (``metrics.sampler_output_law``, from the exact p_1), no Monte Carlo; for a sampler whose
   output is not affine in its start (the registry's ``affine`` fact; EVODiff: its coefficients
   are inner products of the model outputs), the output law is not Gaussian and
   the table shows Gelbrich's lower bound, the W2 from the Gaussian with the mean and
   covariance of 30,000 outputs;
3. ``SW2 mix``: the sliced W2 between 4,000 outputs on a 2-D three-component Gaussian mixture
   (from exact samples of p_1) and 4,000 exact samples of p_{t_min}; the Monte-Carlo floor (two
   exact sets) is printed with the table;
4. ``us/step``: the wall time per step that is the sampler's own, with a free model
   ``D(x, t) = x``, 1,000 points in 2-D, float32, 200 steps, best of 30 runs taken
   round-robin over the samplers, one thread; and, for scale, the same for the matching
   schedulers of diffusers.

Between 3 and 4 come: the three tables' columns at 10 NFE, one row per sampler; EVODiff and
LML beside DPM-Solver++(2M), UniPC and 3M at 5, 10, 20 NFE on a 64-D Gaussian with the
digits' spectrum (eigenvalues 3 k^-1.35; RMS error per entry against the exact flow map); LML's
damping and memory at 10 NFE on that Gaussian, in noise and data prediction; and LML's rank-one
Hessian surrogate against the exact Hessian of log p_t on an 8-D Gaussian (pointwise error,
the Eckart-Young floor, and the damped preconditioner against the exact inverse Hessian).
EVODiff beyond 20 steps switches to the code's second rule for zeta, which can send zeta to 0
and the state to 1e100 on the mixture (SW2 at 50 NFE).

It then prints Euler's and DDIM's ODE errors over DPM-Solver++(2M)'s per process and NFE (DDIM
is Euler's method in EDM's variables), Euler's over 2M's at 10 NFE on each kind of time grid
and on one-dimensional Gaussians N(0, s^2) of variances 4 to 1e-4 (under VP, N(0, 1) makes
Euler's steps in t exact), and checks two targets: at 10 NFE, DPM-Solver++(2M)'s ODE error is
at most 1/10 of Euler's (per process); each sampler's own time is at most 50 us per step.  The plot (ODE error and
exact W2 against NFE, log-log) goes to ``--plot`` (default ``_build/benchmarks/samplers.png``).

Run: ``.venv/bin/python benchmarks/samplers.py [--plot PATH]``
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable

import torch

from diffcore import analytic, metrics, processes, samplers

NFES = (5, 10, 20, 50, 100, 200)
STOCHASTIC = ("ddpm", "euler_maruyama", "pc", "annealed_langevin")
T_MIN = 1e-3
PROCESS = processes.VP()  # for the laws, the mixture and the timings
ODE_PROCESSES = {
    "vp": PROCESS,
    "vp_cosine": processes.VPCosine(),
    "ve": processes.VE(),
    "linear": processes.Linear(),
}


def _options(name: str) -> dict:
    """Defaults, except annealed Langevin's eps: a contraction c = eps / (2 level_L^2) of 1/4."""
    if name == "annealed_langevin":
        t = torch.tensor(T_MIN, dtype=torch.float64)
        level = float(PROCESS.sigma(t) / PROCESS.alpha(t))
        return {"eps": 0.5 * level**2}
    return {}


def _steps(name: str, nfe: int) -> int:
    """The most steps whose model calls fit in ``nfe`` (0 if not even one step does)."""
    steps = 0
    while samplers.model_calls(name, steps + 1, **_options(name)) <= nfe:
        steps += 1
    return steps


def _run(name, model, x, ts, generator=None, process=PROCESS):
    return samplers.SAMPLERS[name](model, x, ts, process, generator=generator, **_options(name))


def _grid(steps: int, process=PROCESS):
    kind = "uniform" if isinstance(process, processes.Linear) else "logsnr"
    return samplers.time_grid(process, steps, kind=kind, t_min=T_MIN, t_max=1.0)


def _print_table(title: str, rows) -> None:
    print(f"\n{title}")
    print(f"{'sampler':<18}" + "".join(f"{f'NFE {n}':>10}" for n in NFES))
    for name, values in rows:
        cells = "".join(f"{'-':>10}" if math.isnan(v) else f"{v:>10.2e}" for v in values)
        print(f"{name:<18}{cells}")


def _ode_error(gauss, process) -> Callable:
    """``error(name, ts)``: the largest error at t_min of ``SAMPLERS[name]`` on the grid ``ts``
    against the exact PF-ODE map, from the same 256 exact samples of p_1 for every call."""
    x = gauss.marginal(1.0, process).sample(256, generator=torch.Generator().manual_seed(0))
    exact = gauss.pf_ode_map(x, 1.0, T_MIN, process)
    denoiser = gauss.denoiser(process)

    def error(name: str, ts) -> float:
        return float((_run(name, denoiser, x, ts, process=process) - exact).abs().max())

    return error


def ode_tables(gauss) -> dict:
    """Max error at t_min against the exact PF-ODE map, per process and deterministic sampler."""
    errors = {}
    for pname, process in ODE_PROCESSES.items():
        error = _ode_error(gauss, process)
        rows = []
        for name in samplers.SAMPLERS:
            values = []
            for nfe in NFES:
                steps = _steps(name, nfe)
                if (
                    name in STOCHASTIC
                    or steps == 0
                    or (
                        # these divide by alpha or need a finite drift: refused at t = 1 for Linear
                        pname == "linear"
                        and name in ("plms", "annealed_langevin", "euler_maruyama")
                    )
                ):
                    values.append(math.nan)
                    continue
                values.append(error(name, _grid(steps, process)))
            rows.append((name, values))
        errors[pname] = dict(rows)
        _print_table(
            f"ode err, {pname}: max |x - exact PF-ODE map| at t_min, Gaussian, 256 samples", rows
        )
    return errors


def _gaussian():
    return analytic.Gaussian(
        torch.tensor([1.0, -0.5], dtype=torch.float64),
        torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64),
    )


def law_tables(gauss) -> dict:
    """Exact W2 on the Gaussian and sliced W2 on the mixture, under VP."""
    mix = analytic.GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0]], dtype=torch.float64),
        torch.stack(
            [
                torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=torch.float64),
                torch.tensor([[0.2, -0.05], [-0.05, 0.3]], dtype=torch.float64),
                0.15 * torch.eye(2, dtype=torch.float64),
            ]
        ),
        torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
    )
    gen = torch.Generator().manual_seed(0)
    target = gauss.marginal(T_MIN, PROCESS)

    def mixture_at(t, n=4000):
        return PROCESS.marginal(
            mix.sample(n, generator=gen), t, torch.randn(n, 2, dtype=torch.float64, generator=gen)
        )

    x_mix, mix_reference = mixture_at(1.0), mixture_at(T_MIN)

    def sliced(x):
        return float(metrics.sliced_wasserstein(x, mix_reference, 128, generator=gen))

    floor = sliced(mixture_at(T_MIN))
    results, not_affine = {}, set()
    blocks = {"W2 gauss": [], "SW2 mix": []}
    for name in samplers.SAMPLERS:
        rows = {key: [] for key in blocks}
        affine = samplers.SAMPLERS[name].is_affine(**_options(name))
        for nfe in NFES:
            steps = _steps(name, nfe)
            if steps == 0:
                for key in rows:
                    rows[key].append(math.nan)
                continue
            ts = _grid(steps)
            if affine:
                law = metrics.sampler_output_law(name, gauss, ts, PROCESS, **_options(name))
            else:  # the linearisation would not be the law: Gelbrich's bound, Monte Carlo
                law = _moment_law(name, gauss, ts)
                not_affine.add(name)
            rows["W2 gauss"].append(float(metrics.gaussian_w2(*law, target.mean, target.cov)))
            rows["SW2 mix"].append(sliced(_run(name, mix.denoiser(PROCESS), x_mix, ts, gen)))
        for key in blocks:
            blocks[key].append((name, rows[key]))
        results[name] = rows
    notes = {
        "W2 gauss": "W2 gauss, vp: exact W2(output law, p_t_min), Gaussian, no Monte Carlo",
        "SW2 mix": "SW2 mix, vp: sliced W2 to exact samples of p_t_min, mixture, 4,000 samples "
        f"(Monte-Carlo floor, exact vs exact: {floor:.3f})",
    }
    if not_affine:
        notes["W2 gauss"] += (
            f"\n(for {', '.join(sorted(not_affine))}, not affine in x, the output law is not "
            "Gaussian: shown is the Gelbrich lower bound, W2 between p_t_min and the Gaussian "
            "with the mean and covariance of 30,000 outputs, within ~0.01 by Monte Carlo)"
        )
    for key, rows in blocks.items():
        _print_table(notes[key], rows)
    return results


def _moment_law(name: str, gauss, ts, n: int = 30_000):
    """The mean and covariance of ``n`` outputs from exact samples of p_1."""
    gen = torch.Generator().manual_seed(2)
    out = _run(name, gauss.denoiser(PROCESS), gauss.marginal(1.0, PROCESS).sample(n, gen), ts, gen)
    return out.mean(0), out.T.cov()


def summary_table(errors: dict, results: dict, nfe: int = 10) -> None:
    """Every sampler at one budget: the columns of the tables above at ``nfe``."""
    i = NFES.index(nfe)
    print(f"\nevery sampler at {nfe} NFE (the columns of the tables above)")
    cells = ("steps", *(f"err {p}" for p in ODE_PROCESSES), "W2 gauss", "SW2 mix")
    print(f"{'sampler':<18}" + "".join(f"{c:>12}" for c in cells))
    for name in samplers.SAMPLERS:
        values = [errors[p][name][i] for p in ODE_PROCESSES]
        values += [results[name]["W2 gauss"][i], results[name]["SW2 mix"][i]]
        row = "".join(f"{'-':>12}" if math.isnan(v) else f"{v:>12.2e}" for v in values)
        print(f"{name:<18}{_steps(name, nfe):>12}{row}")


def _digits_like(d: int = 64):
    """A Gaussian with the digits' spectrum: eigenvalues 3 k^(-1.35), random basis and mean."""
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eig = 3.0 * torch.arange(1, d + 1, dtype=torch.float64) ** -1.35
    mean = 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    return analytic.Gaussian(mean, basis * eig @ basis.T)


REFINED = ("dpmpp_2m", "unipc", "dpmpp_3m", "evodiff", "lml")


def refined_table() -> None:
    """EVODiff and LML beside 2M, UniPC and 3M at 5, 10, 20 NFE: RMS error per entry at t_min
    against the exact flow map of a 64-D Gaussian with the digits' spectrum (VP, log-SNR grid,
    256 exact samples of p_1)."""
    gauss = _digits_like()
    x = gauss.marginal(1.0, PROCESS).sample(256, generator=torch.Generator().manual_seed(0))
    exact = gauss.pf_ode_map(x, 1.0, T_MIN, PROCESS)
    budgets = (5, 10, 20)
    print("\nrms error per entry against the exact flow map, 64-D Gaussian, digits' spectrum")
    print(f"{'sampler':<18}" + "".join(f"{f'NFE {n}':>10}" for n in budgets))
    errors = {}
    for name in REFINED:
        errors[name] = []
        for nfe in budgets:
            out = _run(name, gauss.denoiser(PROCESS), x, _grid(_steps(name, nfe)))
            errors[name].append(float((out - exact).pow(2).mean().sqrt()))
        print(f"{name:<18}" + "".join(f"{e:>10.2e}" for e in errors[name]))
    ratio = errors["evodiff"][1] / errors["dpmpp_2m"][1]
    print(
        f"  at 10 NFE EVODiff's error is {ratio:.2f} times DPM-Solver++(2M)'s (the paper: 0.55 "
        "of DPM-Solver++'s FID-measured error on CIFAR-10)"
    )


def lml_tables() -> None:
    """LML's damping and memory at 10 NFE on the 64-D Gaussian, and its rank-one Hessian
    surrogate against the exact Hessian of log p_t on an 8-D one."""
    gauss = _digits_like()
    x = gauss.marginal(1.0, PROCESS).sample(256, generator=torch.Generator().manual_seed(0))
    exact = gauss.pf_ode_map(x, 1.0, T_MIN, PROCESS)
    ts = _grid(10)
    dampings = (1e-3, 1e-1, 1.0, 1e1, 1e2, 1e4)
    print("\nLML at 10 NFE, 64-D Gaussian: rms error per entry against the exact flow map")
    for prediction in samplers.LML_PREDICTIONS:
        base = samplers.lml(gauss.denoiser(PROCESS), x, ts, PROCESS, prediction=prediction)
        base_err = float((base - exact).pow(2).mean().sqrt())
        print(f"  {prediction} prediction; memory 0 (the base solver): {base_err:.2e}")
        print(f"{'memory / damping':<18}" + "".join(f"{d:>10.0e}" for d in dampings))
        for memory in (0.1, 0.5, 1.0):
            cells = []
            for damping in dampings:
                out = samplers.lml(
                    gauss.denoiser(PROCESS),
                    x,
                    ts,
                    PROCESS,
                    damping=damping,
                    memory=memory,
                    prediction=prediction,
                )
                cells.append(float((out - exact).pow(2).mean().sqrt()))
            print(f"{memory:<18}" + "".join(f"{c:>10.2e}" for c in cells))
    small = _digits_like(8)
    print(
        "\nLML's surrogate -(mu I + s s^T) of the Hessian H of log p_t, 8-D Gaussian, 2,000 "
        "exact samples of p_t:\npointwise relative Frobenius error at mu = 0 (and the "
        "Eckart-Young floor of any rank-one matrix); relative error of the preconditioner "
        "(mu I + s s^T)^-1 against -H^-1 at the best mu, and of the best scalar mu^-1 I alone"
    )
    print(
        f"{'t':>6}{'sigma':>8}{'rank-1 err':>12}{'floor':>8}{'best mu':>9}{'LM inv':>9}"
        f"{'scalar':>9}"
    )
    gen = torch.Generator().manual_seed(3)
    for t in (0.05, 0.2, 0.5, 0.9):
        law = small.marginal(t, PROCESS)
        hessian = -torch.linalg.inv(law.cov)
        score = small.score(law.sample(2000, generator=gen), t, PROCESS)
        rank_one = samplers.lml_hessian(score)
        err = float(((rank_one - hessian).flatten(1).norm(dim=1) / hessian.norm()).mean())
        eig = torch.linalg.eigvalsh(-hessian)
        floor = math.sqrt(1 - float(eig.max() ** 2 / eig.pow(2).sum()))
        mus = torch.logspace(-2, 2, 21, dtype=torch.float64).tolist()
        inverse = [
            float(
                (
                    (torch.linalg.inv(-samplers.lml_hessian(score, mu)) - law.cov)
                    .flatten(1)
                    .norm(dim=1)
                    / law.cov.norm()
                ).mean()
            )
            for mu in mus
        ]
        best = min(range(len(mus)), key=inverse.__getitem__)
        eye = torch.eye(8, dtype=torch.float64)
        scalar = min(float((eye / mu - law.cov).norm() / law.cov.norm()) for mu in mus)
        sigma = float(PROCESS.sigma(torch.tensor(t, dtype=torch.float64)))
        print(
            f"{t:>6}{sigma:>8.3f}{err:>12.2f}{floor:>8.2f}{mus[best]:>9.2f}"
            f"{inverse[best]:>9.2f}{scalar:>9.2f}"
        )


def overhead_table(steps: int = 200, repeats: int = 30) -> dict:
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    ts = _grid(steps)

    def free_model(x, t):
        return x

    # round-robin over the samplers, so that each sees the same (shared) machine load
    best = dict.fromkeys(samplers.SAMPLERS, math.inf)
    for _ in range(repeats):
        for name in samplers.SAMPLERS:
            start = time.perf_counter()
            _run(name, free_model, x, ts)
            best[name] = min(best[name], time.perf_counter() - start)
    per_step = {name: seconds / steps * 1e6 for name, seconds in best.items()}
    print(
        f"\nsampler's own time per step: free model D(x, t) = x, 1,000 points in 2-D, float32, "
        f"{steps} steps, best of {repeats}, {torch.get_num_threads()} thread"
    )
    print(f"{'sampler':<18}{'us/step':>9}{'calls/step':>12}{'us/call':>9}")
    for name, us in per_step.items():
        calls = samplers.model_calls(name, steps, **_options(name)) / steps
        print(f"{name:<18}{us:>9.1f}{calls:>12.2f}{us / calls:>9.1f}")
    return per_step


def diffusers_overhead_table(steps: int = 200, repeats: int = 10) -> None:
    """For scale: the time per step of diffusers' matching schedulers, under the conditions of
    :func:`overhead_table` (their default 1,000-step DDPM schedule, ``set_timesteps(steps)``,
    the sample as the model output), ``step`` and the loop around it."""
    import diffusers

    schedulers = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"solver_order": 2}),
        "dpmpp_3m": (diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
        "plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
    }
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    best = dict.fromkeys(schedulers, math.inf)
    for _ in range(repeats):
        for name, (cls, config) in schedulers.items():
            prediction = "epsilon" if cls is diffusers.PNDMScheduler else "sample"
            scheduler = cls(prediction_type=prediction, **config)
            scheduler.set_timesteps(steps)
            y = x
            start = time.perf_counter()
            for t in scheduler.timesteps:
                y = scheduler.step(y, t, y).prev_sample  # the free model: output = input
            best[name] = min(best[name], (time.perf_counter() - start) / len(scheduler.timesteps))
    print(
        f"\nfor scale, diffusers {diffusers.__version__}: its matching schedulers' time per step, "
        f"best of {repeats}"
    )
    print(f"{'sampler':<18}{'us/step':>9}   scheduler")
    for name, seconds in best.items():
        print(f"{name:<18}{seconds * 1e6:>9.1f}   {schedulers[name][0].__name__}")


def grid_ratios(gauss, nfe: int = 10) -> None:
    """Euler's ODE error over DPM-Solver++(2M)'s at ``nfe`` on every time grid, both solvers on
    the same grid: the target's ratio does not hinge on the grid chosen above."""
    print(f"\nEuler's ODE error / DPM-Solver++(2M)'s at {nfe} NFE, per process and time grid")
    print(f"{'process':<18}" + "".join(f"{kind:>12}" for kind in samplers.GRIDS))
    for pname, process in ODE_PROCESSES.items():
        error = _ode_error(gauss, process)
        cells = []
        for kind in samplers.GRIDS:
            try:
                ts = samplers.time_grid(process, nfe, kind=kind, t_min=T_MIN, t_max=1.0)
            except ValueError:  # log-SNR grids need a finite log-SNR at t = 1 (not Linear)
                cells.append(f"{'-':>12}")
                continue
            cells.append(f"{error('euler', ts) / error('dpmpp_2m', ts):>12.1f}")
        print(f"{pname:<18}" + "".join(cells))


VARIANCES = (4.0, 1.0, 0.25, 0.1, 1e-2, 1e-3, 1e-4)


def variance_ratios(nfe: int = 10) -> None:
    """Euler's ODE error over DPM-Solver++(2M)'s at ``nfe`` on N(0, s^2) in one dimension, per
    process on the grids above: the ratio depends on the data's scale as much as on the solvers.
    Under VP and VP-cosine, N(0, 1) is the stationary law, the PF-ODE velocity vanishes and
    Euler's steps in t are exact (``test_steps_in_t_are_exact_on_the_stationary_law_of_vp``)."""
    print(f"\nEuler's ODE error / DPM-Solver++(2M)'s at {nfe} NFE on N(0, s^2), 1-D, per process")
    print(f"{'process':<18}" + "".join(f"{f's^2 = {v:g}':>13}" for v in VARIANCES))
    for pname, process in ODE_PROCESSES.items():
        cells, ts = [], _grid(nfe, process)
        for variance in VARIANCES:
            gauss = analytic.Gaussian(
                torch.zeros(1, dtype=torch.float64),
                torch.full((1, 1), variance, dtype=torch.float64),
            )
            error = _ode_error(gauss, process)
            cells.append(f"{error('euler', ts) / error('dpmpp_2m', ts):>13.2g}")
        print(f"{pname:<18}" + "".join(cells))


def plot(errors: dict, results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for i, name in enumerate(results):
        style = {"marker": "o", "ms": 3, "color": plt.cm.tab20(i % 20)}
        for ax, values in zip(axes, (errors["vp"][name], results[name]["W2 gauss"]), strict=True):
            if not all(math.isnan(v) for v in values):
                ax.loglog(NFES, values, label=name, **style)
    axes[0].set(xlabel="NFE", ylabel="max error at t_min", title="PF-ODE error, Gaussian (VP)")
    axes[1].set(xlabel="NFE", ylabel="W2(output, p_t_min)", title="exact W2 of the output law")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def _machine() -> str:
    """The CPU, torch's version and the load: timings from different machines or loads differ."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plot", type=pathlib.Path, default=pathlib.Path("_build/benchmarks/samplers.png")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(_machine())
    gauss = _gaussian()
    errors = ode_tables(gauss)
    results = law_tables(gauss)
    summary_table(errors, results)
    refined_table()
    lml_tables()
    per_step = overhead_table()
    diffusers_overhead_table()
    plot(errors, results, args.plot)

    # Euler's method in t (``euler``) depends on the process's clock; Euler's method in EDM's
    # variables x / alpha and sigma / alpha, the Euler of EDM and k-diffusion, is DDIM for every
    # process (``test_ddim_is_euler_in_edm_variables``).
    for first, what in (("euler", "Euler's (in t)"), ("ddim", "DDIM's (Euler in EDM's variables)")):
        print(f"\n{what} ODE error / DPM-Solver++(2M)'s, per process (2M is second order, so")
        print("the ratio grows about linearly in NFE once the steps resolve the path)")
        print(f"{'process':<18}" + "".join(f"{f'NFE {n}':>10}" for n in NFES))
        for pname, table in errors.items():
            ratios = (e / d for e, d in zip(table[first], table["dpmpp_2m"], strict=True))
            print(f"{pname:<18}" + "".join(f"{r:>10.1f}" for r in ratios))
    grid_ratios(gauss)
    variance_ratios()

    i = NFES.index(10)
    print("\ntargets")
    for pname, table in errors.items():
        euler, dpmpp = table["euler"][i], table["dpmpp_2m"][i]
        mark = "ok" if dpmpp <= euler / 10 else "MISSED"
        print(
            f"  [{mark}] {pname}: at 10 NFE, DPM-Solver++(2M) error {dpmpp:.2e} vs Euler's "
            f"{euler:.2e} (ratio {euler / dpmpp:.1f}, target >= 10)"
        )
    print(
        "  (the ratio depends on the data's scale: under VP and VP-cosine, Euler's steps in t are"
        "\n   exact on N(0, 1), whose paths stand still; see the table of variances above)"
    )
    for name, us in per_step.items():
        if us > 50:
            print(f"  [MISSED] {name}: own time {us:.1f} us per step (target <= 50)")
    if all(us <= 50 for us in per_step.values()):
        worst = max(per_step, key=per_step.get)
        print(
            f"  [ok] own time <= 50 us per step for every sampler (largest: {worst}, {per_step[worst]:.1f} us)"
        )


if __name__ == "__main__":
    main()
