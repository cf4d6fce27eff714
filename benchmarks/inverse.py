"""Every posterior method of diffcore against exact posteriors, for growing budgets.

The methods are the seven solvers of ``diffcore.inverse.solvers.SOLVERS`` and the two of
``diffcore.inverse.particles.PARTICLE_SOLVERS`` (TDS, the twisted diffusion sampler, which
returns equally weighted samples after a final resampling, and FlowChef).  The problems are
the two exact ones of chapter 20:

- ``2-D``: a three-component Gaussian mixture in the plane, the first coordinate measured with
  sigma_y = 0.5 (y = 0.3);
- ``16-D``: a two-component mixture with full covariances, a quarter of the entries measured
  with sigma_y = 0.3 at a point between the two modes (a bimodal posterior).

Each method runs with its default options and the mixture's exact denoiser, on the quadratic
VP grid from t = 1 to t_min = 1e-3 (FlowChef: the rectified flow, ``processes.Linear``, from
t = 0.999 to 0), for 10, 30, 100 and 300 steps.  The approximate solvers draw 2,048 samples;
TDS runs with 256, 1,024 and 4,096 particles.  For each problem this prints one table, a row
per method (and per particle number for TDS), with

1. ``err@S``: the error of the posterior mean, ``|mean of the samples - E[x | y]|``, at S steps;
   the Monte-Carlo error of as many exact posterior samples, ``sqrt(tr C / N)``, is printed
   above the table (a method has converged when its error is at that level);
2. ``var``: the ratio of the total variance of the samples to the exact one, at 300 steps
   (1 for a calibrated sampler);
3. ``NFE``: the model calls at 300 steps (``Solver.model_calls``);
4. ``time``: the wall time in seconds of the 100-step run, one thread, float64.

A method converges to the posterior when its error falls with the steps and, for TDS, with the
particles, to the Monte-Carlo level; the approximate solvers plateau at a bias of their own (or
move with the grid without approaching zero).  Times are measured, not asserted.

Run: ``.venv/bin/python benchmarks/inverse.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import math
import time

import torch

from diffcore import analytic, lab, processes, samplers
from diffcore.inverse import operators as op
from diffcore.inverse import particles as pt
from diffcore.inverse import solvers as sv

STEPS = [10, 30, 100, 300]
N_SAMPLES = 2048
TDS_PARTICLES = [256, 1024, 4096]
VP, LINEAR = processes.VP(beta_min=0.1, beta_max=20.0), processes.Linear()
METHODS = {**sv.SOLVERS, **pt.PARTICLE_SOLVERS}


def problems() -> dict:
    """The two exact problems of chapter 20: (prior, operator, y, sigma_y) by name."""
    means = torch.tensor([[-2.0, 0.5], [2.0, -0.5], [0.0, 2.0]])
    covs = torch.stack(
        [
            torch.tensor([[0.5, 0.2], [0.2, 0.6]]),
            torch.tensor([[0.6, -0.1], [-0.1, 0.4]]),
            0.3 * torch.eye(2),
        ]
    )
    prior_2d = analytic.GaussianMixture(means, covs, torch.tensor([0.4, 0.4, 0.2]))
    a_2d = op.Inpainting(torch.tensor([True, False]))

    gen = lab.seeded(5)
    means_16 = 1.5 * torch.randn(2, 16, generator=gen)
    factors = [torch.randn(16, 16, generator=gen) / 4 for _ in range(2)]
    covs_16 = torch.stack([0.5 * f @ f.T + 0.2 * torch.eye(16) for f in factors])
    prior_16 = analytic.GaussianMixture(means_16, covs_16, torch.tensor([0.5, 0.5]))
    a_16 = op.Inpainting(op.random_mask((16,), 0.25, gen))
    y_16 = op.measure(a_16, means_16.mean(0, keepdim=True), 0.3, gen)
    return {
        "2-D": (prior_2d, a_2d, torch.tensor([[0.3]]), 0.5),
        "16-D": (prior_16, a_16, y_16, 0.3),
    }


def grid(name: str, steps: int) -> tuple[processes.Process, torch.Tensor]:
    """The process and the time grid a method runs on."""
    if name == "flowchef":
        return LINEAR, samplers.time_grid(LINEAR, steps, t_max=0.999, t_min=0.0)
    return VP, samplers.time_grid(VP, steps, kind="quadratic", t_min=1e-3)


def run(name: str, problem, steps: int, n: int) -> tuple[float, float, float]:
    """(mean error, variance ratio, seconds) of ``n`` samples of one method at ``steps``."""
    prior, operator, y, sigma_y = problem
    exact = lab.moment_matched(prior.posterior(operator.to_dense(), y[0], sigma_y))
    process, ts = grid(name, steps)
    model = prior.denoiser(process)
    start = time.perf_counter()
    out = METHODS[name](
        model, y.expand(n, -1), operator, sigma_y, ts, process, generator=lab.seeded(steps)
    )
    seconds = time.perf_counter() - start
    out = out.reshape(n, -1)
    error = float((out.mean(0) - exact.mean).norm())
    return error, float(out.var(0).sum() / torch.trace(exact.cov)), seconds


def table(label: str, problem) -> None:
    """Print the table of one problem (see the module docstring)."""
    prior, operator, y, sigma_y = problem
    exact = lab.moment_matched(prior.posterior(operator.to_dense(), y[0], sigma_y))
    floors = ", ".join(
        f"N = {n}: {math.sqrt(float(torch.trace(exact.cov)) / n):.3f}"
        for n in sorted({N_SAMPLES, *TDS_PARTICLES})
    )
    print(f"{label} problem; error of N exact posterior samples: {floors}")
    header = "".join(f"{'err@' + str(s):>9}" for s in STEPS)
    print(f"{'method':<16}{'N':>6}{header}{'var':>7}{'NFE':>6}{'time':>8}")
    rows = [(name, N_SAMPLES) for name in METHODS if name != "tds"]
    rows += [("tds", n) for n in TDS_PARTICLES]
    for name, n in rows:
        results = {steps: run(name, problem, steps, n) for steps in STEPS}
        errors = "".join(f"{results[s][0]:>9.3f}" for s in STEPS)
        ratio, nfe = results[STEPS[-1]][1], METHODS[name].model_calls(STEPS[-1])
        print(f"{name:<16}{n:>6}{errors}{ratio:>7.2f}{nfe:>6}{results[100][2]:>7.2f}s")
    print()


def main() -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for label, problem in problems().items():
        table(label, problem)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
