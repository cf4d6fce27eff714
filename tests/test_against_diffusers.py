r"""diffcore's samplers against diffusers' schedulers, step for step.

diffusers is the implementation of these samplers that most people run.  Each test runs one of
its schedulers and the matching diffcore sampler on the same grid, with the exact denoiser of a
Gaussian, from the same exact samples of :math:`p_1`, and compares the states.

The bridge: a scheduler whose *training* schedule is the grid itself.  Its
``alphas_cumprod[k]`` is :math:`\alpha^2` at ``ts[n - k]``, so that with ``n + 1`` training
steps its ``n`` inference timesteps are ``n, n - 1, ..., 1`` (asserted) and its final level is
``alphas_cumprod[0]``, i.e. ``ts[-1]``.  The schedule values it reads in ``step`` are then
replaced by the same values in float64, so that both sides use one schedule.

Tolerance.  diffusers' DPM-Solver multistep and Euler schedulers (but not their EDM
DPM-Solver) cast the state to float32 in every ``step``.  A cast rounds by at most
:math:`2^{-24}` relative to the state, and the PF-ODE carries an error made at noise level
:math:`\sigma_k` to the end with the gain that takes the state's scale there to its final scale
(at most :math:`\sqrt{\lambda_{\max}(\Sigma)}` over the state's at :math:`\sigma_k`, for this
Gaussian).  So ``n`` steps stay within :math:`8\,n\,\epsilon_{32}\max|x_{\text{end}}|`, with room
for the float32 arithmetic of the step itself.  The other schedulers (UniPC, single-step
DPM-Solver, EDM's DPM-Solver, DDIM, DDPM, PNDM, score SDE) stay in float64 and are held to
:math:`64\,n\,\epsilon_{64}\max|x_{\text{end}}|`.  Neighbouring variants of a method differ by
:math:`O(h^2)`, far more: ``test_the_comparison_tells_neighbouring_variants_apart`` shows that
the bounds separate them.

Compared: ``ddim`` (every eta, and with eta = 0 also against diffusers' Euler in EDM's
variables), ``dpm_solver_1``, ``dpm_solver_2``, ``dpmpp_2m``, ``dpmpp_3m`` (equal up to one
coefficient, where diffcore departs from the reference codes on purpose), ``unipc``, ``plms``,
``ddpm`` and ``euler_maruyama``, under VP; ``dpmpp_2m`` and ``ddim`` also under VE on EDM's
grid, against diffusers' EDM schedulers; and, from :mod:`diffcore.flowmap`,
:class:`~diffcore.flowmap.ConsistencyModel` with ``consistency_sample`` under VE; and DDPM's
schedule itself.  Without a counterpart: ``dpm_solver_3`` (diffusers'
single-step third-order solver pairs its two stages otherwise than the DPM-Solver code that
diffcore follows), ``euler`` and ``heun`` (diffusers steps in the noise level
:math:`\sigma_t/\alpha_t`, diffcore in ``t``), ``pc`` and ``annealed_langevin`` (the score SDE
corrector of diffusers sizes its step from the norms of the batch).
"""

import math

import diffusers  # pinned in requirements.txt: missing, it fails the run rather than skip
import pytest
import torch

from diffcore import analytic, metrics, processes, samplers, targets

diffusers.utils.logging.set_verbosity_error()  # EDM's schedulers ask for scale_model_input
# diffusers builds numpy arrays from torch tensors in a way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

PROCESS = processes.VP()
EPS32 = torch.finfo(torch.float32).eps


def _gaussian():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), cov)


GAUSS = _gaussian()
DENOISER = GAUSS.denoiser(PROCESS)


def _start(n=256, seed=0):
    """Exact samples of p_1, shape ``(n, 2)``."""
    return GAUSS.marginal(1.0, PROCESS).sample(n, generator=torch.Generator().manual_seed(seed))


def _float32_bound(steps: int, out: torch.Tensor) -> float:
    """Round-off of ``steps`` float32 steps ending at ``out`` (see the module's docstring)."""
    return 8 * steps * EPS32 * float(out.abs().max())


def _float64_bound(steps: int, out: torch.Tensor) -> float:
    return 64 * steps * torch.finfo(torch.float64).eps * float(out.abs().max())


def _on_grid(cls, ts, **config):
    """``cls`` with the training schedule alphas_cumprod[k] = alpha^2(ts[n - k]), its timesteps
    set to n, ..., 1, and the schedule it steps with replaced by float64 values."""
    n = len(ts) - 1
    abar = PROCESS.alpha(ts.flip(0)) ** 2
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    scheduler = cls(num_train_timesteps=n + 1, trained_betas=betas.tolist(), **config)
    scheduler.set_timesteps(n)
    steps = [int(t) for t in scheduler.timesteps]
    if cls is not diffusers.PNDMScheduler:  # PNDM repeats a timestep: checked in its test
        assert steps == list(range(n, 0, -1)), steps
    scheduler.alphas_cumprod = abar
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = abar[0]
    if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
        # the noise level sigma/alpha at the timesteps, then the final one (ts[-1])
        noise_level = PROCESS.sigma(ts) / PROCESS.alpha(ts)
        assert len(scheduler.sigmas) == n + 1
        scheduler.sigmas = noise_level
    return scheduler


def _run(scheduler, ts, x, **step_options):
    """diffusers' loop with the exact denoiser as a model that predicts the sample."""
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(DENOISER(x, ts[i]), t, x, **step_options).prev_sample
    return x


def _multistep(cls, ts, **config):
    return _on_grid(
        cls,
        ts,
        prediction_type="sample",
        lower_order_final=False,
        final_sigmas_type="sigma_min",
        **config,
    )


def test_ddpm_schedule_is_diffusers_default():
    """``ddpm_betas`` and ``alphas_cumprod`` give diffusers' default schedule (linear betas from
    1e-4 to 0.02 over 1,000 steps), which diffusers computes in float32: each beta within one
    float32 rounding, and a product of 1,000 float32 factors within 1,000 of them."""
    scheduler = diffusers.DDPMScheduler()
    betas = processes.ddpm_betas()
    assert float(((scheduler.betas.double() - betas) / betas).abs().max()) <= EPS32
    ours = processes.alphas_cumprod(betas)
    relative = (scheduler.alphas_cumprod.double() - ours) / ours
    assert float(relative.abs().max()) <= 1000 * EPS32


# -- exponential integrators -----------------------------------------------------------------
# non-uniform steps in log-SNR exercise the step ratios r of the multistep methods
KINDS = ("logsnr", "karras", "uniform")


# diffcore's name: diffusers' scheduler, its configuration, and the bound of its arithmetic
MULTISTEP = {
    "dpmpp_2m": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"},
        _float32_bound,
    ),
    "unipc": (
        diffusers.UniPCMultistepScheduler,
        {"solver_type": "bh2", "predict_x0": True},
        _float64_bound,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [5, 12, 40])
@pytest.mark.parametrize("name", list(MULTISTEP))
def test_second_order_multistep_samplers_are_diffusers(name, steps, kind):
    """dpmpp_2m is DPMSolverMultistepScheduler of order 2 (midpoint form), unipc is
    UniPCMultistepScheduler of order 2 (bh2, data prediction)."""
    cls, config, bound = MULTISTEP[name]
    ts = samplers.time_grid(PROCESS, steps, kind=kind)
    x = _start()
    ours = samplers.SAMPLERS[name](DENOISER, x, ts, PROCESS)
    theirs = _run(_multistep(cls, ts, solver_order=2, **config), ts, x)
    assert float((ours - theirs).abs().max()) <= bound(steps, ours)


@pytest.mark.parametrize("steps", [5, 12, 40])
def test_dpm_solver_1_and_ddim_are_diffusers_first_order_dpm_solver(steps):
    ts = samplers.time_grid(PROCESS, steps, kind="logsnr")
    x = _start()
    scheduler = _multistep(
        diffusers.DPMSolverMultistepScheduler, ts, solver_order=1, algorithm_type="dpmsolver++"
    )
    theirs = _run(scheduler, ts, x)
    for name in ("dpm_solver_1", "ddim"):
        ours = samplers.SAMPLERS[name](DENOISER, x, ts, PROCESS)
        assert float((ours - theirs).abs().max()) <= _float32_bound(steps, ours), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [3, 6, 20])
def test_dpm_solver_2_is_diffusers_single_step_order_2(steps, kind):
    """diffusers' single-step solver takes the midpoint in log-SNR as a timestep of its own: it
    runs on the grid refined by those midpoints, with orders 1, 2, 1, 2, ..."""
    ts = samplers.time_grid(PROCESS, steps, kind=kind)
    lam = PROCESS.lam(ts)
    mid = PROCESS.t_of_lam(0.5 * (lam[:-1] + lam[1:]))
    fine = torch.stack([ts[:-1], mid], dim=1).flatten()
    fine = torch.cat([fine, ts[-1:]])  # ts[0], u_0, ts[1], u_1, ..., ts[-1]
    x = _start()
    scheduler = _multistep(
        diffusers.DPMSolverSinglestepScheduler,
        fine,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
    )
    assert scheduler.order_list == [1, 2] * steps
    ours = samplers.dpm_solver_2(DENOISER, x, ts, PROCESS)
    theirs = _run(scheduler, fine, x)
    assert float((ours - theirs).abs().max()) <= _float64_bound(2 * steps, ours)


_OUR_PHI3 = samplers.phi3


def _reference_phi3(h: float) -> float:
    """The reference codes weight d2 by -phi3, not -2 phi3: half of dpmpp_3m's phi3."""
    return _OUR_PHI3(h) / 2


def _diffusers_3m(ts, x):
    scheduler = _multistep(
        diffusers.DPMSolverMultistepScheduler,
        ts,
        solver_order=3,
        algorithm_type="dpmsolver++",
        solver_type="heun",  # its second step is then the Taylor form of dpmpp_3m's second step
    )
    return _run(scheduler, ts, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [6, 12, 40])
def test_dpmpp_3m_is_diffusers_order_3_but_for_the_weight_of_d2(steps, kind, monkeypatch):
    """dpmpp_3m departs from the reference codes in one coefficient (see its docstring): with
    the reference weight of d2 put back, it is diffusers' third-order multistep solver."""
    ts = samplers.time_grid(PROCESS, steps, kind=kind)
    x = _start()
    theirs = _diffusers_3m(ts, x)
    ours = samplers.dpmpp_3m(DENOISER, x, ts, PROCESS)
    assert float((ours - theirs).abs().max()) > 10 * _float32_bound(steps, ours)
    monkeypatch.setattr(samplers, "phi3", _reference_phi3)
    halved = samplers.dpmpp_3m(DENOISER, x, ts, PROCESS)
    assert float((halved - theirs).abs().max()) <= _float32_bound(steps, ours)


def test_diffusers_third_order_multistep_is_of_order_2():
    """On the exact PF-ODE map, on the sweep of ``test_samplers``' order tests (t from 0.99 to
    0.05, 64 to 512 steps): diffusers' third-order multistep solver converges at order 2,
    dpmpp_3m at order 3 (each within 0.15)."""
    x = GAUSS.marginal(0.99, PROCESS).sample(64, generator=torch.Generator().manual_seed(0))
    exact = GAUSS.pf_ode_map(x, 0.99, 0.05, PROCESS)
    ns, theirs, ours = (64, 128, 256, 512), [], []
    for n in ns:
        ts = samplers.time_grid(PROCESS, n, kind="logsnr", t_min=0.05, t_max=0.99)
        theirs.append(float((_diffusers_3m(ts, x) - exact).abs().max()))
        ours.append(float((samplers.dpmpp_3m(DENOISER, x, ts, PROCESS) - exact).abs().max()))
    assert abs(metrics.convergence_order(ns, theirs) - 2) <= 0.15, theirs
    assert abs(metrics.convergence_order(ns, ours) - 3) <= 0.15, ours


# -- DDIM, DDPM, PLMS, Euler ---------------------------------------------------------------
def _discrete(cls, ts, **config):
    """Timesteps arange(n) + 1, each step going to the one below: the grid, down to ts[-1]."""
    return _on_grid(cls, ts, timestep_spacing="leading", steps_offset=1, **config)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_is_diffusers_ddim(eta, kind):
    steps = 12
    ts = samplers.time_grid(PROCESS, steps, kind=kind)
    x = _start()
    scheduler = _discrete(
        diffusers.DDIMScheduler,
        ts,
        prediction_type="sample",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    noise = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(1))
    theirs = x
    for i, t in enumerate(scheduler.timesteps):
        d = DENOISER(theirs, ts[i])
        theirs = scheduler.step(d, t, theirs, eta=eta, variance_noise=noise[i]).prev_sample
    ours = samplers.ddim(DENOISER, x, ts, PROCESS, eta=eta, noise_sampler=lambda i, shape: noise[i])
    assert float((ours - theirs).abs().max()) <= _float64_bound(steps, ours)


def test_ddpm_is_diffusers_ddpm():
    """Ancestral sampling with the posterior variance (``fixed_small``), the same generator.
    diffusers' DDPM takes its last step to alphas_cumprod = 1 (sigma = 0), not to
    alphas_cumprod[0]: the states are compared at every time before that step."""
    steps = 12
    ts = samplers.time_grid(PROCESS, steps, kind="logsnr")
    x = _start()
    scheduler = _discrete(
        diffusers.DDPMScheduler,
        ts,
        prediction_type="sample",
        clip_sample=False,
        variance_type="fixed_small",
    )
    generator = torch.Generator().manual_seed(1)
    theirs = [x]
    for i, t in enumerate(scheduler.timesteps[:-1]):
        d = DENOISER(theirs[-1], ts[i])
        theirs.append(scheduler.step(d, t, theirs[-1], generator=generator).prev_sample)
    generator = torch.Generator().manual_seed(1)
    ours = [x]
    samplers.ddpm(
        DENOISER,
        x,
        ts[:-1],
        PROCESS,
        generator=generator,
        callback=lambda step: ours.append(step.x),
    )
    assert len(ours) == len(theirs) == steps
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert float((a - b).abs().max()) <= _float64_bound(steps, a), k


def _noise_prediction(x, t):
    """The exact noise prediction (x - alpha D) / sigma, for schedulers that take no other."""
    return targets.convert(DENOISER(x, t), "x0", "eps", x, t, PROCESS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [2, 3, 4, 12])
def test_plms_is_diffusers_pndm_without_runge_kutta_steps(steps, kind):
    """PNDM with ``skip_prk_steps`` is the PLMS of Latent Diffusion: a pseudo improved Euler step
    (two calls at the first time, the second at the predicted state), then Adams-Bashforth on
    the noise predictions."""
    ts = samplers.time_grid(PROCESS, steps, kind=kind)
    x = _start()
    scheduler = _discrete(diffusers.PNDMScheduler, ts, skip_prk_steps=True, set_alpha_to_one=False)
    # the second call is at timestep n - 1, the time the first step ends at
    times = [steps, steps - 1, *range(steps - 1, 0, -1)]
    assert [int(t) for t in scheduler.timesteps] == times
    at = {k: ts[steps - k] for k in range(steps + 1)}  # timestep k is the time ts[n - k]
    theirs = x
    for t in scheduler.timesteps:
        eps = _noise_prediction(theirs, at[int(t)])
        theirs = scheduler.step(eps, t, theirs).prev_sample
    ours = samplers.plms(DENOISER, x, ts, PROCESS)
    # a noise prediction (x - alpha D) / sigma loses the digits of x below sigma: eps / sigma
    sigma_min = float(PROCESS.sigma(ts[-1]))
    assert float((ours - theirs).abs().max()) <= _float64_bound(steps, ours) / sigma_min


def test_ddim_is_diffusers_euler_in_the_noise_level():
    """EulerDiscreteScheduler steps dy/dsigma = (y - D)/sigma in y = x/alpha and
    sigma = sigma_t/alpha_t (EDM's variables): the same map as DDIM with eta = 0."""
    steps = 12
    ts = samplers.time_grid(PROCESS, steps, kind="logsnr")
    x = _start()
    scheduler = _discrete(
        diffusers.EulerDiscreteScheduler,
        ts,
        prediction_type="sample",
        final_sigmas_type="sigma_min",
    )
    alpha = PROCESS.alpha(ts)
    y = x / alpha[0]
    for i, t in enumerate(scheduler.timesteps):
        y = scheduler.step(DENOISER(alpha[i] * y, ts[i]), t, y).prev_sample
    ours = samplers.ddim(DENOISER, x, ts, PROCESS)
    # EulerDiscreteScheduler too casts the state to float32 in its step
    assert float((ours - alpha[-1] * y).abs().max()) <= _float32_bound(steps, ours)


def test_euler_maruyama_is_diffusers_score_sde_vp():
    """ScoreSdeVpScheduler: Euler-Maruyama on the reverse VP SDE at t = 1, 1 - 1/n, ..., 1/n with
    dt = -1/n, i.e. the uniform grid to t = 0."""
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    steps = 20
    ts = samplers.time_grid(PROCESS, steps, kind="uniform", t_min=0.0)
    x = _start()
    scheduler = ScoreSdeVpScheduler(beta_min=PROCESS.beta_min, beta_max=PROCESS.beta_max)
    scheduler.sampling_eps = 1 / steps
    scheduler.set_timesteps(steps)
    scheduler.timesteps = ts[:-1]  # the same times, in float64
    generator = torch.Generator().manual_seed(1)
    theirs = x
    for t in scheduler.timesteps:
        eps = _noise_prediction(theirs, t)
        theirs, _ = scheduler.step_pred(eps, theirs, t.reshape(1), generator=generator)
    generator = torch.Generator().manual_seed(1)
    ours = samplers.euler_maruyama(DENOISER, x, ts, PROCESS, generator=generator)
    assert float((ours - theirs).abs().max()) <= _float64_bound(steps, ours)


def test_the_comparison_tells_neighbouring_variants_apart():
    """The bounds are no formality: diffusers' other second-order variants, its lower order in
    the last step, and a step without corrector miss dpmpp_2m and unipc by more than ten times
    the bound their tests use."""
    steps = 12
    ts = samplers.time_grid(PROCESS, steps, kind="karras")
    x = _start()
    variants = [
        ("dpmpp_2m", {"solver_type": "heun"}),
        ("dpmpp_2m", {"euler_at_final": True}),
        ("unipc", {"solver_type": "bh1"}),
        ("unipc", {"disable_corrector": [3]}),
    ]
    for name, change in variants:
        cls, config, bound = MULTISTEP[name]
        ours = samplers.SAMPLERS[name](DENOISER, x, ts, PROCESS)
        theirs = _run(_multistep(cls, ts, solver_order=2, **{**config, **change}), ts, x)
        assert float((ours - theirs).abs().max()) > 10 * bound(steps, ours), (name, change)


# -- EDM's variables: VE on the Karras grid ----------------------------------------------------
EDM = processes.VE(sigma_min=0.002, sigma_max=80.0)


def _edm(cls, ts, **config):
    """An EDM scheduler stepping through the noise levels sigma(ts), in float64."""
    scheduler = cls(sigma_min=EDM.sigma_min, sigma_max=EDM.sigma_max, **config)
    scheduler.set_timesteps(len(ts) - 1)
    assert len(scheduler.sigmas) == len(ts)
    scheduler.sigmas = EDM.sigma(ts)
    return scheduler


def _run_edm(scheduler, ts, x):
    """The exact denoiser given as the noise prediction of EDM's preconditioning:
    D = c_skip x + c_out F, so F = (D - c_skip x) / c_out."""
    sigma_data = scheduler.config.sigma_data
    for i, t in enumerate(scheduler.timesteps):
        sigma = EDM.sigma(ts[i])
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        prediction = (GAUSS.denoiser(EDM)(x, ts[i]) - c_skip * x) / c_out
        x = scheduler.step(prediction, t, x).prev_sample
    return x


def _edm_start(n=256):
    return GAUSS.marginal(1.0, EDM).sample(n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [5, 18, 40])
def test_dpmpp_2m_under_ve_is_diffusers_edm_dpm_solver(steps):
    """Under VE on EDM's grid (sigma from 80 to 0.002, rho = 7), dpmpp_2m is diffusers'
    EDMDPMSolverMultistepScheduler, which stays in float64."""
    ts = samplers.time_grid(EDM, steps, kind="karras", t_min=0.0, t_max=1.0)
    x = _edm_start()
    scheduler = _edm(
        diffusers.EDMDPMSolverMultistepScheduler,
        ts,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=False,
        final_sigmas_type="sigma_min",
    )
    ours = samplers.dpmpp_2m(GAUSS.denoiser(EDM), x, ts, EDM)
    theirs = _run_edm(scheduler, ts, x)
    assert float((ours - theirs).abs().max()) <= _float64_bound(steps, ours)


@pytest.mark.parametrize("steps", [5, 18, 40])
def test_ddim_under_ve_is_diffusers_edm_euler(steps):
    """EDMEulerScheduler (no churn) is EDM's Euler step in sigma, i.e. DDIM under VE; it casts
    the state to float32."""
    ts = samplers.time_grid(EDM, steps, kind="karras", t_min=0.0, t_max=1.0)
    x = _edm_start()
    scheduler = _edm(diffusers.EDMEulerScheduler, ts, final_sigmas_type="sigma_min")
    ours = samplers.ddim(GAUSS.denoiser(EDM), x, ts, EDM)
    theirs = _run_edm(scheduler, ts, x)
    assert float((ours - theirs).abs().max()) <= _float32_bound(steps, ours)


# -- consistency models ------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """A fixed random network F(u, sigma): what it computes does not matter, only that both
    sides call it at the same inputs and noise levels."""

    def __init__(self, d=2, width=16):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w1 = torch.randn(d, width, generator=gen) / math.sqrt(d)
        self.b = torch.randn(width, generator=gen)
        self.w2 = torch.randn(width, d, generator=gen) / math.sqrt(width)

    def forward(self, u, sigma):
        return torch.tanh(u @ self.w1 + torch.log(sigma) * self.b) @ self.w2


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_consistency_sample_is_diffusers_cm_stochastic_iterative(steps):
    """ConsistencyModel under VE (Song et al.'s c_skip, c_out, c_in with epsilon = sigma_min)
    and consistency_sample (their Alg. 1) are diffusers' CMStochasticIterativeScheduler, on
    its own noise levels and with the same generator; diffusers also draws noise for its last
    step and multiplies it by zero."""
    from diffcore import flowmap

    net = _Net()
    scheduler = diffusers.CMStochasticIterativeScheduler(
        sigma_min=EDM.sigma_min, sigma_max=EDM.sigma_max
    )
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.to(torch.float64)  # the k levels, then sigma_min
    ts = EDM.t_of_lam(-torch.log(sigmas)).clamp(0, 1)
    ts[-1] = 0.0  # sigma_min, exactly
    scheduler.sigmas = EDM.sigma(ts)  # the same levels in float64 on both sides
    model = flowmap.ConsistencyModel(lambda u, t: net(u, EDM.sigma(t)), EDM, t_min=0.0)
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0))

    theirs = x
    generator = torch.Generator().manual_seed(1)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        out = net(scheduler.scale_model_input(theirs, t), sigma)
        theirs = scheduler.step(out, t, theirs, generator=generator).prev_sample
    generator = torch.Generator().manual_seed(1)
    ours = flowmap.consistency_sample(model, x, ts, EDM, generator=generator)
    assert float((ours - theirs).abs().max()) <= _float64_bound(steps, ours)
