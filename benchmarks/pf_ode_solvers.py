"""Error against the closed-form Gaussian PF-ODE, and each sampler's own time per step.

Prints, for every process and PF-ODE sampler in ``diffcore.samplers.SAMPLERS``:

- the largest error at ``t_min`` against ``Gaussian.pf_ode_map`` (float64, 256 samples in 2-D),
  for NFE in {5, 10, 20, 50, 100, 200} on the log-SNR grid (uniform in ``t`` for Linear,
  whose log-SNR is infinite at ``t = 1``);
- the wall time per step that is the sampler's own, for 1,000 points in 2-D in float32:
  a run with a free model (``D(x, t) = x``) divided by the number of steps.

Run: ``.venv/bin/python benchmarks/pf_ode_solvers.py``
"""

from __future__ import annotations

import time

import torch

from diffcore import analytic, processes, samplers

NFES = (5, 10, 20, 50, 100, 200)
PROCESSES = {
    "vp": processes.VP(),
    "vp_cosine": processes.VPCosine(),
    "ve": processes.VE(),
    "linear": processes.Linear(),
}
CALLS_PER_STEP = {"euler": 1, "heun": 2}


def error_table() -> None:
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    g = analytic.Gaussian(mean, cov)
    t_min = 1e-3
    print(f"max |x - exact| at t_min = {t_min}, 256 samples, float64")
    print(f"{'process':<10} {'sampler':<8}" + "".join(f"{f'NFE {n}':>11}" for n in NFES))
    for pname, proc in PROCESSES.items():
        kind = "uniform" if pname == "linear" else "logsnr"
        x = g.marginal(1.0, proc).sample(256, generator=torch.Generator().manual_seed(0))
        exact = g.pf_ode_map(x, 1.0, t_min, proc)
        for sname in samplers.SAMPLERS:
            row = []
            for nfe in NFES:
                steps = max(nfe // CALLS_PER_STEP[sname], 1)
                ts = samplers.time_grid(proc, steps, kind=kind, t_min=t_min)
                out = samplers.SAMPLERS[sname](g.denoiser(proc), x, ts, proc)
                row.append(float((out - exact).abs().max()))
            print(f"{pname:<10} {sname:<8}" + "".join(f"{e:>11.2e}" for e in row))


def overhead_table(steps: int = 200, repeats: int = 5) -> None:
    proc = processes.VP()
    x = torch.randn(1000, 2)
    ts = samplers.time_grid(proc, steps, kind="logsnr")

    def free_model(x, t):
        return x

    print(
        f"\nsampler's own time per step: 1,000 points in 2-D, float32, {steps} steps, best of {repeats}"
    )
    print(f"{'sampler':<8} {'us/step':>9} {'us/model call':>14}")
    for sname, sampler in samplers.SAMPLERS.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            sampler(free_model, x, ts, proc)
            best = min(best, time.perf_counter() - start)
        per_step = best / steps * 1e6
        print(f"{sname:<8} {per_step:>9.1f} {per_step / CALLS_PER_STEP[sname]:>14.1f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    error_table()
    overhead_table()
