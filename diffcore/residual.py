r"""Diffusions that start from the degraded image: the shifted process they share, RDDM,
Resfusion and ResShift, and the exact oracle of paired Gaussian data.

A restoration model is given pairs :math:`(x_0, y)` of a clean image and its degraded version.
The methods here and in :mod:`diffcore.bridges` diffuse between them rather than between noise
and data: their forward processes all read

.. math:: x_t = a_t x_0 + c_t y + b_t\varepsilon, \qquad \varepsilon \sim \mathcal N(0, I),

with :math:`a_1 \approx 0` (or exactly 0) and :math:`c_1 > 0`, so that the reverse process starts
from the degraded :math:`y` plus some noise, not from pure noise.  For a fixed :math:`y`, the
*shifted variable* :math:`u_t = x_t - c_t y = a_t x_0 + b_t\varepsilon` is a standard diffusion
of :math:`x_0` with :math:`\alpha_t = a_t`, :math:`\sigma_t = b_t`.  So each process is a
:class:`ShiftedProcess`: a :class:`~diffcore.processes.Process` (its ``alpha`` and ``sigma`` are
those of :math:`u`) with a ``shift`` :math:`c_t`, and everything of diffcore that reads
:math:`\alpha_t, \sigma_t` (the DDIM transition, the samplers,
:class:`~diffcore.analytic.Gaussian`) runs on :math:`u`.  What the methods add is their chain of
transitions (:class:`ResidualChain`), their prediction targets and their samplers:

- :class:`RDDM`: :math:`a_t = 1 - \bar\alpha_t`, :math:`c_t = \bar\alpha_t`,
  :math:`b_t = \bar\beta_t`; its sampler (:func:`rddm`) is DDIM on :math:`u` with a per-step
  :math:`\eta` (:func:`ddim_eta`);
- :class:`Resfusion`: :math:`a_t = 2\sqrt{\bar\alpha_t} - 1`, :math:`c_t = 1 -
  \sqrt{\bar\alpha_t}`, :math:`b_t = \sqrt{1 - \bar\alpha_t}`; its sampler (:func:`resfusion`)
  is DDPM on :math:`x - R`, :math:`R = y - x_0`, started where :math:`a_t = 0`;
- :class:`ResShift`: :math:`a_t = 1 - \eta_t`, :math:`c_t = \eta_t`, :math:`b_t =
  \kappa\sqrt{\eta_t}`; its sampler (:func:`resshift`) draws from the chain's posterior in a
  few steps, and is DDIM on :math:`u` with a per-step :math:`\eta`;
- in :mod:`diffcore.bridges`, the mean-reverting SDE (:math:`c_t = 1 - a_t`) and the Brownian
  bridge (:math:`a_1 = b_1 = 0`, :math:`c_1 = 1`: :math:`x_1 = y` exactly).

Times follow diffcore: :math:`t \in [0, 1]`, data at 0, the start of sampling at 1.  Step
:math:`n` of a paper's :math:`T`-step chain sits at :math:`t = n/T` (the code's index
:math:`n - 1`), as for :class:`~diffcore.processes.Discrete`.

**The conditional convention** (this module's and :mod:`diffcore.bridges`'): the condition is
the degraded image ``y`` (IR-SDE's :math:`\mu`, I2SB's :math:`x_1`).  A conditional model is
called ``model(x, t, y)`` and returns what its method predicts (RDDM a pair (residual, noise),
Resfusion the resnoise, ResShift and the bridges :math:`\hat x_0`, MRS its target); a sampler
is ``sampler(model, x, ts_or_steps, process, *, y, ...)``, with ``x`` the start state and
``ts_or_steps`` a decreasing grid (the chains here also take a number of steps, or None for
all the paper's steps).  ``y`` has the shape of ``x`` or of one sample, ``x.shape[1:]``, shared
by the batch; it is taken in the dtype of ``x``.  The samplers run on
:func:`diffcore.stepping.integrate`, so ``generator``, ``noise_sampler``, ``callback`` (with
:class:`~diffcore.stepping.Trace`) and ``progress`` work as for every sampler; the callback's
``denoised`` is the step's :math:`\hat x_0`.  Every conditional sampler is listed in
:data:`CONDITIONAL_SAMPLERS`.

The exact oracle is :class:`GaussianPair`: :math:`(x_0, y)` jointly Gaussian, with the exact
conditional law :math:`p(x_0 \mid y)`, the exact conditional denoiser
:math:`\mathbb E[x_0 \mid x_t, y]` and PF-ODE flow under any shifted process;
:func:`output_law` gives the exact Gaussian law of a conditional sampler's output with an affine
model (the pair's exact denoiser by default).

References: J. Liu et al., *Residual Denoising Diffusion Models*, CVPR 2024 (code
``nachifur/RDDM``); Z. Shi et al., *Resfusion: Denoising Diffusion Probabilistic Models for Image
Restoration Based on Prior Residual Noise*, NeurIPS 2024 (code ``nkicsl/Resfusion``); Z. Yue,
J. Wang and C. C. Loy, *ResShift: Efficient Diffusion Model for Image Restoration by Residual
Shifting*, NeurIPS 2023 (code ``zsyOAOA/ResShift``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.analytic import Gaussian
from diffcore.checks import (
    as_time,
    count,
    finite,
    floating,
    per_sample,
    positive,
    real,
    require,
    returned,
    returned_shape,
    same_shape,
    time_grid,
)
from diffcore.processes import VP, Discrete, Process
from diffcore.stepping import ddim_step, ddim_weights, grid_points, integrate

__all__ = [
    "ShiftedProcess",
    "ResidualChain",
    "RDDM",
    "Resfusion",
    "ResShift",
    "resfusion_schedule",
    "resshift_etas",
    "ddim_eta",
    "GaussianPair",
    "rddm_model",
    "resfusion_model",
    "rddm_loss",
    "resfusion_loss",
    "resshift_loss",
    "CONDITIONAL_SAMPLERS",
    "conditional_sampler",
    "rddm",
    "resfusion",
    "resshift",
    "output_law",
    "as_condition",
    "check_kind",
    "bind",
    "loss_draws",
    "squared_error",
]


# -- the processes ---------------------------------------------------------------------------
class ShiftedProcess(Process):
    r"""A forward process that carries the degraded image: :math:`x_t = a_t x_0 + c_t y +
    b_t\varepsilon`.

    As a :class:`~diffcore.processes.Process` it is the diffusion of the shifted variable
    :math:`u_t = x_t - c_t y = a_t x_0 + b_t\varepsilon`: ``alpha`` :math:`= a_t`, ``sigma``
    :math:`= b_t`, and ``lam``, ``f``, ``g2``, ``marginal`` are those of :math:`u`.  A subclass
    gives ``alpha``, ``sigma``, their derivatives and :meth:`shift`; :meth:`pair_marginal` draws
    :math:`x_t` itself.  :meth:`t_of_lam` is found by bisection unless a subclass has it in
    closed form.  An end where :math:`a_t = b_t = 0` is allowed (a bridge's :math:`t = 1`,
    where :math:`x_1 = c_1 y` holds no trace of :math:`x_0`): :math:`\lambda` is undefined
    there, and :class:`GaussianPair` gives the exact denoiser there too.
    """

    def shift(self, t) -> Tensor:
        """The weight :math:`c_t` of the degraded image; same shape as ``t``."""
        raise NotImplementedError

    def coefficients(self, t, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(a_t, c_t, b_t)`` (``alpha``, ``shift``, ``sigma``) at ``t``, each viewed to
        broadcast against ``like``.  Shapes: ``t`` a float, ``()`` or ``(batch,)``; ``like``
        ``(batch, ...)``."""
        t = as_time(t, like=like)
        return tuple(per_sample(f(t), like) for f in (self.alpha, self.shift, self.sigma))

    def pair_marginal(self, x0: Tensor, y: Tensor, t, noise: Tensor) -> Tensor:
        r"""A draw of :math:`q(x_t \mid x_0, y)`: :math:`a_t x_0 + c_t y + b_t\,\text{noise}`.

        Shapes: ``x0``, ``noise`` ``(batch, ...)``, ``y`` that or one sample; ``t`` a float,
        ``()`` or ``(batch,)``; returns ``(batch, ...)``.
        """
        y = as_condition(y, x0, x_name="x0")
        u = self.marginal(x0, t, noise)
        return u + per_sample(self.shift(as_time(t, like=x0)), x0) * y

    def t_of_lam(self, lam) -> Tensor:
        """The time where the log-SNR of :math:`u_t` equals ``lam``, by bisection (60 halvings)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        low, high = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(60):
            mid = (low + high) / 2
            later = self.lam(mid) > lam  # lam decreases: the root lies after mid
            low, high = torch.where(later, mid, low), torch.where(later, high, mid)
        return (low + high) / 2


class ResidualChain(ShiftedProcess):
    r"""A :class:`ShiftedProcess` that a paper defines by a Markov chain of ``steps`` steps
    (RDDM, Resfusion, ResShift): step :math:`n` at :math:`t = n/T`.

    A subclass gives, besides the shifted process, the number of steps ``steps`` and the
    chain's :meth:`posterior`; :meth:`start` and :meth:`grid` are the papers' start and time
    grid.
    """

    steps: int

    def start(self, y: Tensor, noise: Tensor) -> Tensor:
        r"""The state the sampler starts from at :math:`t = 1`: :math:`c_1 y + b_1\,\text{noise}`
        (the exact :math:`x_1` when :math:`a_1 = 0`).  Shapes: ``y``, ``noise`` ``(batch, ...)``."""
        finite(y, "y")
        _like(noise, y, "noise", "y")
        one = torch.ones((), dtype=y.dtype)
        return float(self.shift(one)) * y + float(self.sigma(one)) * noise

    def grid(self, n: int | None = None) -> Tensor:
        r"""``n`` steps over the chain's ``steps`` (all of them when None): the times
        :math:`(k_j + 1)/T` with :math:`k_j` = ``int(linspace(-1, T - 1, n + 1))``, decreasing,
        as in RDDM's ``ddim_sample``; float64 ``(n + 1,)`` from 1 to 0."""
        n = self.steps if n is None else count(n, "n")
        require(n <= self.steps, "n", n, f"at most the chain's {self.steps} steps")
        k = torch.linspace(-1, self.steps - 1, n + 1, dtype=torch.float64).trunc() + 1
        return (k / self.steps).flip(0)

    def posterior(self, x_t: Tensor, t: float, s: float, x0: Tensor, y: Tensor):
        r"""The law :math:`q(x_s \mid x_t, x_0, y)` of the chain, :math:`s < t`: ``(mean, var)``."""
        raise NotImplementedError


def _additive_posterior(process: ResidualChain, x_t, t, s, x0, y):
    r"""The posterior of a chain :math:`x_t = x_s + (c_t - c_s)(y - x_0) + \sqrt{b_t^2 - b_s^2}\,z`
    (:math:`a_t = 1 - c_t`): given :math:`x_0, y`, :math:`x_s` and :math:`x_t` have covariance
    :math:`b_s^2`, so mean :math:`x_0 + c_s R + (b_s^2/b_t^2)(x_t - x_0 - c_t R)` and variance
    :math:`b_s^2(1 - b_s^2/b_t^2)`, :math:`R = y - x_0`."""
    y = as_condition(y, x_t, x_name="x_t")
    _like(x0, x_t, "x0", "x_t")
    ts = time_grid(torch.tensor([float(t), float(s)], dtype=torch.float64), "(t, s)")
    (c_t, c_s), (b_t, b_s) = process.shift(ts).tolist(), process.sigma(ts).tolist()
    ratio = (b_s / b_t) ** 2
    res = y - x0
    mean = x0 + c_s * res + ratio * (x_t - x0 - c_t * res)
    return mean, b_s**2 * (1 - ratio)


class RDDM(ResidualChain):
    r"""RDDM's forward process (Liu et al., 2024): :math:`x_t = x_0 + \bar\alpha_t R + \bar\beta_t\varepsilon`.

    With the residual :math:`R = y - x_0` this is :math:`a_t = 1 - \bar\alpha_t`,
    :math:`c_t = \bar\alpha_t`, :math:`b_t = \bar\beta_t`.  The chain adds the residual and
    independent noise, :math:`x_n = x_{n-1} + \alpha_n R + \beta_n z_n`, with
    :math:`\bar\alpha_n = \sum_{i \le n}\alpha_i` and :math:`\bar\beta_n^2 = \sum_{i\le n}\beta_i^2`.
    The schedule is the code's default (``gen_coefficients``): :math:`\alpha_i` decreasing
    linearly and :math:`\beta_i^2` increasing linearly, summing to 1 and to ``sum_scale``
    :math:`= \bar\beta_T^2`; in continuous time (exact at :math:`t = n/T`)

    .. math::
        \bar\alpha_t = \frac{t(2T + 1 - Tt)}{T + 1}, \qquad
        \bar\beta_t^2 = s\,\frac{t(Tt + 1)}{T + 1}.

    At :math:`t = 1`, :math:`x_1 = y + \sqrt{s}\,\varepsilon` exactly.  ``sum_scale`` 1 is the
    code's default for generation and for the deraining experiment; its restoration default
    (``condition=True`` without ``sum_scale``) is 0.01.  Departures of the code
    (``residual_denoising_diffusion_pytorch.py``, ``ResidualDiffusion``): the paper also
    studies other schedules; the code clips the predicted residual and :math:`\hat x_0` to
    [-1, 1] (not done here).  Shapes: every method acts elementwise on ``t``.
    """

    def __init__(self, steps: int = 1000, sum_scale: float = 1.0):
        self.steps = count(steps, "steps")
        self.sum_scale = positive(sum_scale, "sum_scale")

    def shift(self, t) -> Tensor:
        """:math:`\\bar\\alpha_t`, the weight of the residual (and of :math:`y`)."""
        t, n = as_time(t), self.steps
        return t * (2 * n + 1 - n * t) / (n + 1)

    def _beta2(self, t: Tensor) -> Tensor:
        n = self.steps
        return self.sum_scale * t * (n * t + 1) / (n + 1)

    def alpha(self, t) -> Tensor:
        return 1 - self.shift(t)

    def sigma(self, t) -> Tensor:
        return torch.sqrt(self._beta2(as_time(t)))

    def d_alpha(self, t) -> Tensor:
        t, n = as_time(t), self.steps
        return -(2 * n + 1 - 2 * n * t) / (n + 1)

    def d_sigma(self, t) -> Tensor:
        t, n = as_time(t), self.steps
        return self.sum_scale * (2 * n * t + 1) / (n + 1) / (2 * self.sigma(t))

    def posterior(self, x_t: Tensor, t: float, s: float, x0: Tensor, y: Tensor):
        r"""RDDM's :math:`q(x_s \mid x_t, x_0, R)`, the code's ``q_posterior``:

        .. math::
            \begin{aligned}
            \mu &= \frac{\bar\beta_s^2}{\bar\beta_t^2}x_t
                + \frac{(\bar\beta_t^2 - \bar\beta_s^2)\bar\alpha_s
                  - \bar\beta_s^2(\bar\alpha_t - \bar\alpha_s)}{\bar\beta_t^2}R \\
                &\quad + \frac{\bar\beta_t^2 - \bar\beta_s^2}{\bar\beta_t^2}x_0, \\
            \sigma^2 &= \frac{(\bar\beta_t^2 - \bar\beta_s^2)\bar\beta_s^2}{\bar\beta_t^2}.
            \end{aligned}

        Shapes: ``x_t``, ``x0``, ``y`` ``(batch, ...)``; ``t > s`` floats; returns the mean
        ``(batch, ...)`` and the variance (a float).
        """
        return _additive_posterior(self, x_t, t, s, x0, y)


def resfusion_schedule(steps: int = 12) -> Tensor:
    r"""The ``alphas_cumprod`` of Resfusion's ``LinearProScheduler``, cut at the acceleration point.

    DDPM's linear betas stretched to ``steps`` steps, :math:`\beta_n` from :math:`10^{-4}` to
    :math:`0.02` times :math:`1000/T`; the table ends at the first :math:`n` with
    :math:`\sqrt{\bar\alpha_n} \le 1/2`, set to exactly 1/4 there when it was more than 0.01
    below (``variance_scheduler/linear_pro.py``).  For ``steps = 12`` the table has 5 entries,
    the paper's five sampling steps.  Returns a float64 tensor ``(T_acc,)``.
    """
    steps = count(steps, "steps", low=2)
    scale = 1000 / steps
    betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    below = (ab.sqrt() <= 0.5).nonzero()
    if not len(below):
        raise ValueError(f"the schedule of steps = {steps} never reaches sqrt(alphas_cumprod) 0.5")
    i = int(below[0])
    if 0.5 - math.sqrt(float(ab[i])) > 0.01:
        return torch.cat([ab[:i], ab.new_tensor([0.25])])
    return ab[: i + 1]


class Resfusion(ResidualChain):
    r"""Resfusion's forward process (Shi et al., 2024, eq. 20) on a variance-preserving schedule.

    .. math::
        x_t = \sqrt{\bar\alpha_t}\,x_0 + (1 - \sqrt{\bar\alpha_t})R + \sqrt{1 - \bar\alpha_t}\,\varepsilon,
        \qquad R = y - x_0,

    that is :math:`a_t = 2\sqrt{\bar\alpha_t} - 1`, :math:`c_t = 1 - \sqrt{\bar\alpha_t}`,
    :math:`b_t = \sqrt{1 - \bar\alpha_t}`, and :math:`x_t - R = \sqrt{\bar\alpha_t}(x_0 - R) +
    \sqrt{1 - \bar\alpha_t}\,\varepsilon` is DDPM's forward process applied to :math:`x_0 - R`.
    The coefficient of :math:`x_0` vanishes where :math:`\sqrt{\bar\alpha_t} = 1/2` (eq. 27):
    there :math:`x_t = y/2 + (\sqrt3/2)\varepsilon` holds no trace of :math:`x_0`, so the
    reverse process starts there, from the degraded image (the accelerated start).

    ``base`` is the DDPM schedule, any variance-preserving process (:math:`\sqrt{\bar\alpha} =`
    ``base.alpha``: :class:`~diffcore.processes.VP`, ``VPCosine``, ``Discrete``); ``t_start``
    the base time of the start, by default the exact acceleration time
    (:math:`\lambda = -\tfrac12\log 3`); this process's time :math:`t \in [0, 1]` is base time
    :math:`t\,t_{\text{start}}`.  ``steps`` is the number of steps of the chain the network is
    trained and sampled on (the resnoise target depends on the step, :meth:`resnoise_weight`).
    :meth:`from_alphas_cumprod` builds the code's discrete version.  Departure of the code
    (``model/resfusion_restore.py``): ``get_acc_point`` takes the step nearest to
    :math:`\sqrt{\bar\alpha} = 1/2` and starts from DDPM's marginal of :math:`y` there,
    :math:`\sqrt{\bar\alpha}y + \sqrt{1 - \bar\alpha}\varepsilon` (:meth:`start`), exact only
    when :math:`\sqrt{\bar\alpha} = 1/2` (which ``resfusion_schedule`` arranges); it clips
    :math:`\hat x_0` to [-1, 1] in its ``sample`` and ``residual`` modes.
    """

    def __init__(self, base: Process | None = None, steps: int = 5, t_start: float | None = None):
        base = VP() if base is None else base
        if not isinstance(base, Process):
            raise TypeError(f"base must be a diffcore Process, got base = {base!r}")
        probe = torch.linspace(0, 1, 11, dtype=torch.float64)
        gap = float((base.alpha(probe) ** 2 + base.sigma(probe) ** 2 - 1).abs().max())
        require(gap < 1e-9, "base", base, "variance preserving (alpha^2 + sigma^2 = 1)")
        self.base, self.steps = base, count(steps, "steps")
        if t_start is None:
            t_start = float(base.t_of_lam(torch.tensor(-0.5 * math.log(3), dtype=torch.float64)))
        self.t_start = real(t_start, "t_start")
        require(0 < self.t_start <= 1, "t_start", t_start, "in (0, 1]")

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> Resfusion:
        r"""The code's Resfusion on a DDPM table: ``T_acc`` :math:`= 1 + \arg\min_n
        |\sqrt{\bar\alpha_n} - 1/2|` (``get_acc_point``) steps, base
        ``Discrete(alphas_cumprod[:T_acc])``, starting at its last step."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        t_acc = int((ab.sqrt() - 0.5).abs().argmin()) + 1
        return cls(Discrete(ab[:t_acc]), steps=t_acc, t_start=1.0)

    def _root(self, t) -> Tensor:
        """:math:`\\sqrt{\\bar\\alpha}` at this process's time ``t``."""
        return self.base.alpha(as_time(t) * self.t_start)

    def shift(self, t) -> Tensor:
        return 1 - self._root(t)

    def alpha(self, t) -> Tensor:
        return 2 * self._root(t) - 1

    def sigma(self, t) -> Tensor:
        return self.base.sigma(as_time(t) * self.t_start)

    def d_alpha(self, t) -> Tensor:
        return 2 * self.t_start * self.base.d_alpha(as_time(t) * self.t_start)

    def d_sigma(self, t) -> Tensor:
        return self.t_start * self.base.d_sigma(as_time(t) * self.t_start)

    def start(self, y: Tensor, noise: Tensor) -> Tensor:
        r"""The code's start (eq. 28): DDPM's marginal of :math:`y`,
        :math:`\sqrt{\bar\alpha_1}y + \sqrt{1 - \bar\alpha_1}\,\text{noise}`."""
        finite(y, "y")
        _like(noise, y, "noise", "y")
        one = torch.ones((), dtype=torch.float64)
        return float(self._root(one)) * y + float(self.sigma(one)) * noise

    def resnoise_weight(self, t) -> Tensor:
        r"""The weight of :math:`R` in the resnoise (eq. 24), for the step from ``t`` to
        :math:`t - 1/T`: with :math:`\alpha = \bar\alpha_t/\bar\alpha_{t - 1/T}` and
        :math:`\beta = 1 - \alpha`,

        .. math:: k_t = \frac{(1 - \sqrt\alpha)\sqrt{1 - \bar\alpha_t}}{\beta}
                      = \frac{\sqrt{1 - \bar\alpha_t}}{1 + \sqrt\alpha}.
        """
        t = as_time(t)
        prev = (t - 1 / self.steps).clamp(min=0)
        return self.sigma(t) / (1 + self._root(t) / self._root(prev))

    def posterior(self, x_t: Tensor, t: float, s: float, x0: Tensor, y: Tensor):
        r"""DDPM's posterior on :math:`x - R`: :math:`x_s = R + w_s`, :math:`w_s \sim q(w_s \mid
        w_t = x_t - R, w_0 = x_0 - R)` under the base schedule (eq. 44).  Shapes as in
        :meth:`RDDM.posterior`."""
        y = as_condition(y, x_t, x_name="x_t")
        _like(x0, x_t, "x0", "x_t")
        ts = time_grid(torch.tensor([float(t), float(s)], dtype=torch.float64), "(t, s)")
        at_t, at_s = grid_points(self.base, ts * self.t_start, x_t)
        res = y - x0
        std = ddim_weights(at_t, at_s, 1.0)[2]
        return res + ddim_step(x_t - res, x0 - res, at_t, at_s, eta=1.0), std**2


def resshift_etas(
    steps: int = 15,
    kappa: float = 2.0,
    power: float = 0.3,
    eta_1: float | None = None,
    eta_T: float = 0.999,
) -> Tensor:
    r"""ResShift's shifting schedule (Yue et al., 2023): :math:`\sqrt{\eta_n} =
    \sqrt{\eta_1}\,b_0^{\beta_n}`, :math:`\beta_n = \big(\tfrac{n-1}{T-1}\big)^p(T - 1)`,
    :math:`b_0 = \exp\big(\tfrac{1}{2(T-1)}\log\tfrac{\eta_T}{\eta_1}\big)`, so that
    :math:`\eta` rises from :math:`\eta_1` to :math:`\eta_T`.  The paper's defaults:
    :math:`\eta_1 = \min((0.04/\kappa)^2, 0.001)`, :math:`\eta_T = 0.999`, :math:`p = 0.3`.

    Departure of the code (``models/gaussian_diffusion.py``, ``get_named_eta_schedule``): it
    takes :math:`\sqrt{\eta_1}` = ``min(min_noise_level / kappa, min_noise_level)``, which
    differs from the paper's for :math:`\kappa < 1.27`, and its ``etas_end`` = 0.99 is
    :math:`\sqrt{\eta_T}`, so :math:`\eta_T = 0.9801`; the 4-step configurations
    (``min_noise_level`` 0.2, :math:`\kappa = 2`) have :math:`\eta_1 = 0.01`.  Pass those as
    ``eta_1`` and ``eta_T`` to match the code.  Returns float64 ``(steps,)``.
    """
    steps = count(steps, "steps", low=2)
    kappa = positive(kappa, "kappa")
    power = positive(power, "power")
    eta_1 = min((0.04 / kappa) ** 2, 0.001) if eta_1 is None else eta_1
    eta_1 = real(eta_1, "eta_1")
    eta_T = real(eta_T, "eta_T")
    require(0 < eta_1 < eta_T < 1, "eta_1, eta_T", (eta_1, eta_T), "0 < eta_1 < eta_T < 1")
    u = torch.linspace(0, 1, steps, dtype=torch.float64) ** power
    return eta_1 * (eta_T / eta_1) ** u  # sqrt(eta_1) b0^beta_n, squared


class ResShift(ResidualChain):
    r"""ResShift's residual-shifting chain (Yue et al., 2023): :math:`x_t = x_0 + \eta_t e_0 + \kappa\sqrt{\eta_t}\,\varepsilon`.

    With the residual :math:`e_0 = y - x_0`: :math:`a_t = 1 - \eta_t`, :math:`c_t = \eta_t`,
    :math:`b_t = \kappa\sqrt{\eta_t}`.  The Markov chain shifts the residual by
    :math:`\alpha_n = \eta_n - \eta_{n-1}` per step, :math:`q(x_n \mid x_{n-1}, x_0) =
    \mathcal N(x_{n-1} + \alpha_n e_0, \kappa^2\alpha_n I)`, and its posterior is
    (:meth:`posterior`)

    .. math:: q(x_{n-1} \mid x_n, x_0) = \mathcal N\Big(\frac{\eta_{n-1}}{\eta_n}x_n
        + \frac{\alpha_n}{\eta_n}x_0,\ \kappa^2\frac{\eta_{n-1}}{\eta_n}\alpha_n I\Big).

    ``etas`` is :math:`(\eta_1, \dots, \eta_T)`, increasing in (0, 1) (default
    :func:`resshift_etas` with ``steps`` steps, 15 when None, and this ``kappa``); step
    :math:`n` sits at :math:`t = n/T`, :math:`\eta_0 = 0`, and :math:`\eta` is linear in
    :math:`t` between steps.  The sampler starts from :math:`x_T \sim \mathcal N(y,
    \kappa^2\eta_T I)` (:meth:`start`), which drops :math:`(1 - \eta_T)(x_0 - y)` from the
    mean.  Departures of the code (``models/gaussian_diffusion.py``, ``GaussianDiffusion``):
    the network sees :math:`x_t/\sqrt{\kappa^2\eta_t + 1}` (``_scale_input``) and its
    :math:`\hat x_0` is clipped to [-1, 1]; both belong to the network here.
    """

    def __init__(self, etas: Tensor | None = None, kappa: float = 2.0, steps: int | None = None):
        self.kappa = positive(kappa, "kappa")
        if etas is None:
            etas = resshift_etas(15 if steps is None else steps, kappa)
        etas = finite(torch.as_tensor(etas, dtype=torch.float64), "etas")
        if etas.ndim != 1 or etas.numel() < 1:
            raise ValueError(f"etas must be a 1-D tensor of eta_1..eta_T, got shape {etas.shape}")
        bad = ~((etas > 0) & (etas < 1))
        bad[1:] |= ~(etas[1:] > etas[:-1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"etas must increase strictly inside (0, 1), got etas[{i}] = {float(etas[i]):.6g}"
                + (f" after etas[{i - 1}] = {float(etas[i - 1]):.6g}" if i else "")
            )
        if steps is not None:
            require(count(steps, "steps") == len(etas), "steps", steps, f"len(etas) = {len(etas)}")
        self.steps = len(etas)
        self.etas = etas
        self._knots = torch.cat([etas.new_zeros(1), etas])

    def _piece(self, t: Tensor):
        knots = self._knots.to(t)
        n = self.steps
        i = torch.clamp(torch.floor(t.detach() * n), 0, n - 1).long()
        slope = (knots[i + 1] - knots[i]) * n
        return knots[i] + slope * (t - i.to(t.dtype) / n), slope  # in t's dtype

    def eta(self, t) -> Tensor:
        r""":math:`\eta_t`, with :math:`\eta_{n/T} = \eta_n` and :math:`\eta_0 = 0`."""
        return self._piece(as_time(t))[0]

    def shift(self, t) -> Tensor:
        return self.eta(t)

    def alpha(self, t) -> Tensor:
        return 1 - self.eta(t)

    def sigma(self, t) -> Tensor:
        return self.kappa * torch.sqrt(self.eta(t))

    def d_alpha(self, t) -> Tensor:
        return -self._piece(as_time(t))[1]

    def d_sigma(self, t) -> Tensor:
        eta, slope = self._piece(as_time(t))
        return self.kappa * slope / (2 * torch.sqrt(eta))

    def start(self, y: Tensor, noise: Tensor) -> Tensor:
        r"""The paper's start, a draw of :math:`\mathcal N(y, \kappa^2\eta_T I)` (the code's
        ``prior_sample``)."""
        finite(y, "y")
        _like(noise, y, "noise", "y")
        return y + self.kappa * math.sqrt(float(self.etas[-1])) * noise

    def posterior(self, x_t: Tensor, t: float, s: float, x0: Tensor, y: Tensor):
        r"""ResShift's :math:`q(x_s \mid x_t, x_0)`, for any :math:`s < t`:
        mean :math:`\frac{\eta_s}{\eta_t}x_t + \big(1 - \frac{\eta_s}{\eta_t}\big)x_0`, variance
        :math:`\kappa^2\frac{\eta_s}{\eta_t}(\eta_t - \eta_s)`.  Shapes as in
        :meth:`RDDM.posterior`."""
        return _additive_posterior(self, x_t, t, s, x0, y)


def ddim_eta(process: ResidualChain, t: float, s: float, eta: float = 1.0) -> float:
    r"""The DDIM :math:`\eta` under which an RDDM or ResShift step is DDIM on :math:`u = x - c_t y`.

    Their chains add the residual and independent noise, so the posterior variance of a step
    from :math:`t` to :math:`s` is :math:`b_s^2(1 - b_s^2/b_t^2)`, scaled by RDDM's ``eta``
    (:math:`\sigma_t^2 = \eta\beta_t^2\bar\beta_{t-1}^2/\bar\beta_t^2`: RDDM's :math:`\eta`
    scales a *variance*).  DDIM's noise (:func:`~diffcore.stepping.ddim_step`) has the
    *standard deviation* :math:`\eta_{\text{DDIM}}\,b_s\sqrt{1 - e^{-2h}}`,
    :math:`e^{-h} = a_t b_s/(b_t a_s)`, the posterior of a chain that rescales :math:`u`.  The
    two steps agree, with :math:`\hat\varepsilon = (u_t - a_t\hat x_0)/b_t`, for

    .. math:: \eta_{\text{DDIM}} = \sqrt{\eta\,\frac{1 - b_s^2/b_t^2}{1 - e^{-2h}}} \le \sqrt\eta,

    which varies with the step, so neither RDDM (:math:`\eta > 0`) nor ResShift is DDIM with
    one :math:`\eta`; ``eta = 0`` is DDIM's deterministic step exactly.  Returns a float.
    """
    if isinstance(process, Resfusion) or not isinstance(process, ResidualChain):
        raise TypeError(f"ddim_eta takes an RDDM or ResShift process, got {process!r}")
    require(0 <= real(eta, "eta") <= 1, "eta", eta, "in [0, 1]")
    ts = time_grid(torch.tensor([float(t), float(s)], dtype=torch.float64), "(t, s)")
    (a_t, a_s), (b_t, b_s) = process.alpha(ts).tolist(), process.sigma(ts).tolist()
    spread = 1 - (a_t * b_s / (b_t * a_s)) ** 2
    return math.sqrt(eta * (1 - (b_s / b_t) ** 2) / spread)


# -- the exact oracle ------------------------------------------------------------------------
class GaussianPair:
    r"""Paired Gaussian data: :math:`(x_0, y) \sim \mathcal N(\mu, \Sigma)` jointly, with exact laws.

    ``mean`` ``(d + m,)`` and ``cov`` ``(d + m, d + m)`` (symmetric positive definite) are the
    joint law of :math:`x_0` (the first ``dim`` = :math:`d` coordinates, half by default) and
    :math:`y`; :meth:`from_degradation` builds it from :math:`y = A x_0 + \sigma_y n`.  The
    parameters are kept in float64.  The conditional law is :math:`p(x_0 \mid y) =
    \mathcal N(m(y), S)` with :math:`m(y) = \mu_x + K(y - \mu_y)`, :math:`K =
    \Sigma_{xy}\Sigma_{yy}^{-1}`, :math:`S = \Sigma_{xx} - K\Sigma_{yx}`.  Under a
    :class:`ShiftedProcess` (with :math:`m = d`), :math:`u_t = x_t - c_t y = a_t x_0 +
    b_t\varepsilon` given :math:`y` is a standard diffusion of :math:`x_0 \sim \mathcal N(m(y),
    S)`, so :math:`x_t \mid y \sim \mathcal N(c_t y + a_t m(y), a_t^2 S + b_t^2 I)` and the
    exact conditional denoiser is

    .. math:: \mathbb E[x_0 \mid x_t, y] = m(y) + a_t S(a_t^2 S + b_t^2 I)^{-1}(x_t - c_t y - a_t m(y)),

    :math:`m(y)` where :math:`a_t = b_t = 0` (a bridge's :math:`t = 1`).
    """

    def __init__(self, mean, cov, dim: int | None = None):
        mean = finite(torch.as_tensor(mean, dtype=torch.float64), "mean")
        cov = finite(torch.as_tensor(cov, dtype=torch.float64), "cov")
        n = mean.shape[0] if mean.ndim == 1 else 0
        if n < 2 or cov.shape != (n, n):
            raise ValueError(
                f"need mean (d + m,) and cov (d + m, d + m), got {tuple(mean.shape)} and "
                f"{tuple(cov.shape)}"
            )
        if dim is None:
            require(n % 2 == 0, "len(mean)", n, "an even length 2d when dim is not given")
            dim = n // 2
        dim = count(dim, "dim")
        require(dim < n, "dim", dim, f"below the joint dimension {n}")
        if not torch.allclose(cov, cov.T, rtol=0, atol=1e-12 * float(cov.abs().max())):
            raise ValueError("cov must be symmetric, got cov != cov.T")
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info):
            raise ValueError(
                f"cov must be positive definite, got smallest eigenvalue "
                f"{float(torch.linalg.eigvalsh(cov)[0]):.6g}"
            )
        self.mean, self.cov, self.dim, self.y_dim = mean, cov, dim, n - dim
        self._chol = chol
        s_xy, s_yy = cov[:dim, dim:], cov[dim:, dim:]
        self.gain = torch.linalg.solve(s_yy, s_xy.T).T  # K = S_xy S_yy^{-1}, (d, m)
        cond = cov[:dim, :dim] - self.gain @ s_xy.T
        self.conditional_cov = 0.5 * (cond + cond.T)  # S, (d, d)
        self._evals, self._evecs = torch.linalg.eigh(self.conditional_cov)

    @classmethod
    def from_degradation(cls, prior: Gaussian, A, sigma_y: float) -> GaussianPair:
        r"""The pair of :math:`x_0 \sim` ``prior`` and :math:`y = A x_0 + \sigma_y n`: joint mean
        :math:`(\mu, A\mu)`, covariance :math:`\begin{pmatrix}\Sigma & \Sigma A^\top\\ A\Sigma &
        A\Sigma A^\top + \sigma_y^2 I\end{pmatrix}`.  Shapes: ``prior`` an
        :class:`~diffcore.analytic.Gaussian` in :math:`\mathbb R^d`, ``A`` ``(m, d)``."""
        check_kind(prior, Gaussian, "prior")
        mean, cov = prior.mean.to(torch.float64), prior.cov.to(torch.float64)
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.ndim != 2 or A.shape[1] != prior.dim:
            raise ValueError(f"A must have shape (m, d) = (m, {prior.dim}), got {tuple(A.shape)}")
        sigma_y = positive(sigma_y, "sigma_y")
        a_cov = A @ cov
        top = torch.cat([cov, a_cov.T], 1)
        bottom = torch.cat([a_cov, a_cov @ A.T + sigma_y**2 * torch.eye(A.shape[0])], 1)
        joint = torch.cat([top, bottom])
        return cls(torch.cat([mean, A @ mean]), 0.5 * (joint + joint.T), dim=prior.dim)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws of the pair: ``x0`` ``(n, d)`` and ``y`` ``(n, m)``."""
        z = torch.randn(count(n, "n"), len(self.mean), generator=generator, dtype=torch.float64)
        joint = self.mean + z @ self._chol.T
        return joint[:, : self.dim], joint[:, self.dim :]

    def _condition(self, y, batched: bool) -> Tensor:
        """``y`` checked to be ``(B, m)`` (``batched``) or ``(m,)``."""
        finite(floating(y, "y"), "y")
        if not ((y.ndim == 2 if batched else y.ndim == 1) and y.shape[-1] == self.y_dim):
            want = f"(B, {self.y_dim})" if batched else f"({self.y_dim},)"
            raise ValueError(f"y must have shape {want}, got y of shape {tuple(y.shape)}")
        return y

    def conditional_mean(self, y: Tensor) -> Tensor:
        r""":math:`m(y) = \mathbb E[x_0 \mid y]`.  Shapes: ``y`` ``(B, m)``; returns ``(B, d)``."""
        y = self._condition(y, batched=True)
        mu_x, mu_y = self.mean[: self.dim].to(y), self.mean[self.dim :].to(y)
        return mu_x + (y - mu_y) @ self.gain.to(y).T

    def conditional(self, y: Tensor) -> Gaussian:
        r"""The exact law :math:`p(x_0 \mid y) = \mathcal N(m(y), S)` for one ``y`` ``(m,)``."""
        mean = self.conditional_mean(self._condition(y, batched=False)[None])[0]
        return Gaussian(mean, self.conditional_cov.to(mean))

    def marginal(self, y: Tensor, t: float, process: ShiftedProcess) -> tuple[Tensor, Tensor]:
        r"""The law of :math:`x_t` given :math:`y`: mean :math:`c_t y + a_t m(y)` and covariance
        :math:`a_t^2 S + b_t^2 I` (zero for a bridge at :math:`t = 1`).  Shapes: ``y`` ``(m,)``
        or ``(B, m)``, :math:`m = d`; ``t`` a float; returns the mean in the shape of ``y`` and
        the covariance ``(d, d)``."""
        check_kind(process, ShiftedProcess, "process")
        y = self._condition(y, batched=isinstance(y, Tensor) and y.ndim == 2)
        require(self.y_dim == self.dim, "y_dim", self.y_dim, f"dim = {self.dim} to shift x_t")
        m = self.conditional_mean(y) if y.ndim == 2 else self.conditional_mean(y[None])[0]
        t = as_time(t, like=m)
        a, c, b = (float(f(t)) for f in (process.alpha, process.shift, process.sigma))
        cov = a**2 * self.conditional_cov.to(m) + b**2 * torch.eye(self.dim, dtype=m.dtype)
        return c * y + a * m, cov

    def _centred(self, x: Tensor, y: Tensor, t, process: ShiftedProcess):
        """Coordinates of u - a_t m(y) in S's eigenbasis, the variances there, and the flat
        pieces: (z, var, a, m, xf, yf)."""
        check_kind(process, ShiftedProcess, "process")
        floating(x, "x")
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"x must be (batch, ...) with {self.dim} entries, got {tuple(x.shape)}"
            )
        xf = finite(x, "x").reshape(x.shape[0], self.dim)
        yf = as_condition(y, x).reshape(-1, self.dim).expand_as(xf)
        a, c, b = process.coefficients(t, xf)
        m = self.conditional_mean(yf)
        evals, evecs = self._evals.to(xf), self._evecs.to(xf)
        z = (xf - c * yf - a * m) @ evecs
        return z, a**2 * evals + b**2, a, m, xf, yf

    def denoise(self, x: Tensor, t, y: Tensor, process: ShiftedProcess) -> Tensor:
        r"""The exact :math:`\mathbb E[x_0 \mid x_t = x, y]` under ``process`` (class docstring);
        where :math:`a_t = b_t = 0`, :math:`m(y)`.  Shapes: ``x`` ``(batch, ...)`` with ``d``
        entries, ``y`` that or one sample; ``t`` a float, ``()`` or ``(batch,)``; returns the
        shape of ``x``."""
        z, var, a, m, _, _ = self._centred(x, y, t, process)
        lam = self._evals.to(z)
        gain = torch.where(var > 0, a * lam / torch.where(var > 0, var, 1.0), 0.0)
        return (m + (gain * z) @ self._evecs.to(z).T).reshape(x.shape)

    def denoiser(self, process: ShiftedProcess) -> Callable:
        """The exact conditional denoiser as a model ``D(x, t, y)`` (:meth:`denoise`; an
        :math:`\\hat x_0` network, what ResShift and the bridges train)."""

        def exact_denoiser(x: Tensor, t, y: Tensor) -> Tensor:
            return self.denoise(x, t, y, process)

        return exact_denoiser

    def flow_map(self, x: Tensor, y: Tensor, s: float, t: float, process: ShiftedProcess):
        r"""The exact PF-ODE flow given :math:`y`, from time ``s`` to ``t``:

        .. math::
            x_t - c_t y - a_t m(y) = C_t^{1/2}C_s^{-1/2}(x_s - c_s y - a_s m(y)),

        .. math:: C_t = a_t^2 S + b_t^2 I

        (the :math:`C_t` commute).  Needs :math:`C_s` invertible.  Shapes as in
        :meth:`denoise`; ``s``, ``t`` floats."""
        z, var_s, _, m, xf, yf = self._centred(x, y, s, process)
        t = as_time(t, like=xf)
        a_t, c_t, b_t = (float(f(t)) for f in (process.alpha, process.shift, process.sigma))
        scale = torch.sqrt((a_t**2 * self._evals.to(z) + b_t**2) / var_s)
        out = c_t * yf + a_t * m + (scale * z) @ self._evecs.to(z).T
        return out.reshape(x.shape)

    def __repr__(self) -> str:
        return f"GaussianPair(d={self.dim}, m={self.y_dim})"


def rddm_model(denoiser: Callable, process: ResidualChain) -> Callable:
    r"""RDDM's two heads from a denoiser: ``model(x, t, y)`` returns :math:`(\hat R, \hat\varepsilon)`
    with :math:`\hat R = y - \hat x_0`, :math:`\hat\varepsilon = (x - a_t\hat x_0 - c_t y)/b_t`,
    :math:`\hat x_0 = D(x, t, y)`.  Shapes: ``x``, ``y`` ``(batch, ...)``."""

    def model(x: Tensor, t, y: Tensor):
        x0 = denoiser(x, t, y)
        a, c, b = process.coefficients(t, x)
        return y - x0, (x - a * x0 - c * y) / b

    return model


def resfusion_model(denoiser: Callable, process: Resfusion) -> Callable:
    r"""Resfusion's resnoise from a denoiser: ``model(x, t, y)`` returns :math:`\hat\varepsilon +
    k_t\hat R` (:meth:`Resfusion.resnoise_weight`), with :math:`\hat R` and :math:`\hat\varepsilon`
    as in :func:`rddm_model`.  Shapes: ``x``, ``y`` ``(batch, ...)``."""
    check_kind(process, Resfusion, "process")

    def model(x: Tensor, t, y: Tensor) -> Tensor:
        x0 = denoiser(x, t, y)
        a, c, b = process.coefficients(t, x)
        k = per_sample(process.resnoise_weight(as_time(t, like=x)), x)
        return (x - a * x0 - c * y) / b + k * (y - x0)

    return model


# -- losses ----------------------------------------------------------------------------------
def _draw(process: ResidualChain, x0: Tensor, y: Tensor, t_sampler, generator):
    """Checked inputs, then the times (the chain's steps n/T, uniform, by default) and noise;
    returns them with the checked ``y`` and the draw of ``x_t``."""
    check_kind(process, ResidualChain, "process")

    def chain_steps(n: int, generator, device) -> Tensor:
        k = torch.randint(1, process.steps + 1, (n,), generator=generator, device=device)
        return k.to(torch.float64) / process.steps

    t, noise, y = loss_draws(x0, y, t_sampler, generator, chain_steps)
    return t, noise, y, process.pair_marginal(x0, y, t, noise)


def rddm_loss(
    model: Callable,
    x0: Tensor,
    y: Tensor,
    process: RDDM,
    *,
    t_sampler=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""RDDM's joint loss: :math:`\mathbb E\,\lVert R_\theta - R\rVert^2 + \lVert\varepsilon_\theta
    - \varepsilon\rVert^2`, :math:`R = y - x_0` (the ``pred_res_noise`` objective).

    ``model(x_t, t, y)`` returns the pair; ``t`` (``(batch,)``) is a step :math:`n/T` drawn
    uniformly (``t_sampler(n, generator)`` to change it).  Draws: ``t``, then the noise.  The
    code trains with the L1 norm (``loss_type='l1'``), the mean over pixels of each head; the
    squared norm here has the conditional means as minimiser.  Shapes: ``x0``, ``y``
    ``(batch, ...)``; returns a scalar.
    """
    check_kind(process, (RDDM, ResShift), "process")
    t, noise, y, x_t = _draw(process, x0, y, t_sampler, generator)
    res, eps = _two(model(x_t, t, y), x_t)
    return (
        squared_error(res, y - x0, "model's residual") + squared_error(eps, noise, "model's noise")
    ).mean()


def resfusion_loss(
    model: Callable,
    x0: Tensor,
    y: Tensor,
    process: Resfusion,
    *,
    t_sampler=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Resfusion's loss (eq. 24): :math:`\mathbb E\,\lVert\epsilon_\theta(x_t, t, y) - (\varepsilon + k_t R)\rVert^2`.

    The resnoise weight :math:`k_t` (:meth:`Resfusion.resnoise_weight`) belongs to the step from
    :math:`t` to :math:`t - 1/T`, so the default times are the chain's steps :math:`n/T`.  The
    code's ``epsilon`` mode, with the mean over pixels (``F.mse_loss``) instead of the sum.
    Shapes: ``x0``, ``y`` ``(batch, ...)``; returns a scalar.
    """
    check_kind(process, Resfusion, "process")
    t, noise, y, x_t = _draw(process, x0, y, t_sampler, generator)
    target = noise + per_sample(process.resnoise_weight(t), x0) * (y - x0)
    return squared_error(model(x_t, t, y), target, "model").mean()


def resshift_loss(
    model: Callable,
    x0: Tensor,
    y: Tensor,
    process: ResShift,
    *,
    t_sampler=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""ResShift's loss: :math:`\mathbb E\,\lVert f_\theta(x_t, t, y) - x_0\rVert^2` (the code's
    ``predict_type: xstart`` without ``weighted_mse``; the code averages over pixels).

    Times: the chain's steps :math:`n/T`, uniform.  Shapes: ``x0``, ``y`` ``(batch, ...)``;
    returns a scalar.
    """
    check_kind(process, ResShift, "process")
    t, _, y, x_t = _draw(process, x0, y, t_sampler, generator)
    return squared_error(model(x_t, t, y), x0, "model").mean()


# -- samplers --------------------------------------------------------------------------------
#: The conditional samplers, ``sampler(model, x, ts_or_steps, process, *, y, ...)``, by name:
#: this module's and those of :mod:`diffcore.bridges` (registered when it is imported).  The
#: fact they share: the condition goes in as ``y=``, which :func:`output_law` relies on.
CONDITIONAL_SAMPLERS: dict[str, Callable] = {}


def conditional_sampler(fn: Callable) -> Callable:
    """Register ``fn``, a sampler of the conditional convention (module docstring), in
    :data:`CONDITIONAL_SAMPLERS` under its name; returns ``fn``."""
    CONDITIONAL_SAMPLERS[fn.__name__] = fn
    return fn


@conditional_sampler
def rddm(
    model: Callable,
    x: Tensor,
    ts_or_steps,
    process: ResidualChain,
    *,
    y: Tensor,
    eta: float = 0.0,
    **run,
) -> Tensor:
    r"""RDDM's sampler (Liu et al., 2024), from the two heads :math:`(\hat R, \hat\varepsilon) =` ``model(x, t, y)``:

    .. math::
        x_s = x_t - (\bar\alpha_t - \bar\alpha_s)\hat R - \big(\bar\beta_t - \sqrt{\bar\beta_s^2
              - \sigma^2}\big)\hat\varepsilon + \sigma z, \qquad
        \sigma^2 = \eta\,\frac{(\bar\beta_t^2 - \bar\beta_s^2)\bar\beta_s^2}{\bar\beta_t^2}.

    ``eta`` scales the *variance*; ``eta = 1`` draws from the posterior :meth:`RDDM.posterior`.
    With consistent heads (:func:`rddm_model`) this is DDIM on :math:`u = x - \bar\alpha_t y`
    with :func:`ddim_eta`'s :math:`\eta_{\text{DDIM}}` (``eta = 0``: DDIM's deterministic step,
    :func:`diffcore.samplers.ddim` on ``process``).  The code's default branch
    (``ddim_sample``, ``type = "use_pred_noise"``); its restoration setting forces ``eta = 0``,
    and its DDIM-conversion scheduler (``scheduling_ddim_our.py``, ``step_res``) uses DDIM's
    variance with a standard deviation ``eta`` instead.  Works for any process with
    :math:`a_t + c_t = 1` (also :class:`ResShift`).  One model call per step.  Shapes: ``x``,
    ``y`` ``(batch, ...)``; returns the same.
    """
    require(0 <= real(eta, "eta") <= 1, "eta", eta, "in [0, 1]")
    ts, shift, y = _setup(x, y, ts_or_steps, process, (RDDM, ResShift))

    def to_x0(out, x, t):  # x - c_t R - b_t eps
        _, c, b = process.coefficients(t, x)
        return x - c * out[0] - b * out[1]

    D, heads = _stash(model, y, to_x0, 2)

    def update(k, x):
        k.D(x)
        res, eps = heads
        var = eta * (k.t.sigma**2 - k.s.sigma**2) * k.s.sigma**2 / k.t.sigma**2
        x = (
            x
            - (shift[k.i] - shift[k.i + 1]) * res
            - (k.t.sigma - math.sqrt(k.s.sigma**2 - var)) * eps
        )
        return x + k.noise(math.sqrt(var)) if var > 0 else x

    return integrate(update, D, x, ts, process, **run)


@conditional_sampler
def resfusion(
    model: Callable, x: Tensor, ts_or_steps, process: Resfusion, *, y: Tensor, **run
) -> Tensor:
    r"""Resfusion's sampler (Shi et al., 2024, eq. 33), from the resnoise :math:`\hat\epsilon =` ``model(x, t, y)``:

    .. math::
        x_s = \frac{1}{\sqrt{\alpha}}\Big(x_t - \frac{1 - \alpha}{\sqrt{1 - \bar\alpha_t}}
              \hat\epsilon\Big) + \sigma z, \qquad \alpha = \frac{\bar\alpha_t}{\bar\alpha_s},
              \quad \sigma^2 = \frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}(1 - \alpha),

    DDPM's step in its noise form.  For *any* :math:`R`, it is :math:`R` plus DDPM's step on
    :math:`x - R` with the noise :math:`\hat\epsilon - k_t R`: the resnoise carries the residual
    through DDPM's update.  It runs on the chain's own grid, from the acceleration point
    (:math:`t = 1`) to 0 in ``process.steps`` steps, since the resnoise weight belongs to its
    steps; ``ts_or_steps`` must be that grid (or None).  The callback's ``denoised`` is the
    :math:`\hat x_0` the resnoise implies, :math:`(x_t - c_t y + b_t k_t y - b_t\hat\epsilon)/
    (a_t + b_t k_t)`.  One model call per step.  Shapes: ``x``, ``y`` ``(batch, ...)``;
    returns the same.
    """
    ts, _, y = _setup(x, y, ts_or_steps, process, (Resfusion,))
    own = process.grid()
    if len(ts) != len(own) or not torch.allclose(ts, own, rtol=0, atol=1e-12):
        raise ValueError(
            f"resfusion samples on its chain's grid of {process.steps} steps (the resnoise "
            f"belongs to them), got ts = {ts.tolist()}"
        )
    abar = (process._root(ts) ** 2).tolist()

    def to_x0(out, x, t):  # the x0 that the resnoise implies
        a, c, b = process.coefficients(t, x)
        k = per_sample(process.resnoise_weight(as_time(t, like=x)), x)
        return (x - c * y + b * k * y - b * out[0]) / (a + b * k)

    D, resnoise = _stash(model, y, to_x0, 1)

    def update(k, x):
        k.D(x)
        alpha = abar[k.i] / abar[k.i + 1]
        x = (x - (1 - alpha) / math.sqrt(1 - abar[k.i]) * resnoise[0]) / math.sqrt(alpha)
        var = (1 - abar[k.i + 1]) / (1 - abar[k.i]) * (1 - alpha)
        return x + k.noise(math.sqrt(var)) if var > 0 else x

    return integrate(update, D, x, ts, process, **run)


@conditional_sampler
def resshift(
    model: Callable, x: Tensor, ts_or_steps, process: ResShift, *, y: Tensor, **run
) -> Tensor:
    r"""ResShift's sampler (Yue et al., 2023): the chain's posterior with :math:`x_0 = \hat x_0 =` ``model(x, t, y)``,

    .. math::
        x_s = \frac{\eta_s}{\eta_t}x_t + \Big(1 - \frac{\eta_s}{\eta_t}\Big)\hat x_0
              + \kappa\sqrt{\frac{\eta_s}{\eta_t}(\eta_t - \eta_s)}\,z,

    over all the chain's steps by default (the paper samples in as few as 4; with ``n`` fewer
    steps, the posterior of the skip).  It is DDIM on :math:`u = x - \eta_t y`
    (:func:`~diffcore.stepping.ddim_step`) with the per-step :math:`\eta_{\text{DDIM}}` of
    :func:`ddim_eta`.  The code's ``p_sample_loop``.  One model call per step.  Shapes: ``x``,
    ``y`` ``(batch, ...)``; returns the same.
    """
    ts, eta, y = _setup(x, y, ts_or_steps, process, (ResShift,))
    D, _ = _stash(model, y, lambda out, x, t: out[0], 1)

    def update(k, x):
        ratio = eta[k.i + 1] / eta[k.i]
        x = ratio * x + (1 - ratio) * k.D(x)
        std = k.s.sigma * math.sqrt(1 - ratio)
        return x + k.noise(std) if std > 0 else x

    return integrate(update, D, x, ts, process, **run)


def output_law(
    sampler: Callable | str,
    pair: GaussianPair,
    y: Tensor,
    ts_or_steps,
    process: ShiftedProcess,
    *,
    model: Callable | None = None,
    start: str = "marginal",
    **options,
) -> tuple[Tensor, Tensor]:
    r"""The exact law :math:`\mathcal N(m, C)` of a conditional sampler's output given
    :math:`y`, with an affine ``model`` (by default the exact denoiser of ``pair``).

    ``sampler`` is one of :data:`CONDITIONAL_SAMPLERS` (or its name); it gets ``y=``, and
    ``options`` (``eta``, ``order``, ...).  ``model`` is what the sampler calls, affine in
    :math:`(x, y)` (``rddm_model(pair.denoiser(process), process)`` for RDDM, for instance).
    The start is the exact :math:`q(x_{t_0} \mid y) = \mathcal N(c\,y + a\,m(y), a^2 S +
    b^2 I)` of ``pair`` (``start="marginal"``; the point :math:`y` for a bridge at ``t = 1``)
    or what :meth:`ResidualChain.start` draws (``start="prior"``, the papers' start; for the
    chains only).  Every step is affine in the state and in its noise, so, as
    :func:`diffcore.metrics.sampler_output_law` does, the sampler runs once in float64 with
    the start's noise and each injected noise (through ``noise_sampler``) replaced by zero
    tensors that autograd tracks, and

    .. math:: m = x_{\text{out}}(x = \bar x_{t_0}, z = 0), \qquad C = A C_0 A^\top +
        \sum_k B_k B_k^\top,

    with the Jacobians :math:`A` (of the start, whose covariance is :math:`C_0`; :math:`C_0 =
    I` for the start's noise) and :math:`B_k` exact, from :math:`d` backward passes.  Compare
    with ``pair.conditional(y)`` by :func:`diffcore.metrics.gaussian_w2`.  Shapes: ``y``
    ``(d,)`` or ``(B, d)`` (the law of each is that of the first but for its mean); returns
    ``mean`` in the shape of ``y`` and ``cov`` ``(d, d)``, float64.
    """
    if isinstance(sampler, str):
        names = tuple(CONDITIONAL_SAMPLERS)
        require(sampler in names, "sampler", sampler, f"one of {names}")
        sampler = CONDITIONAL_SAMPLERS[sampler]
    if not any(sampler is fn for fn in CONDITIONAL_SAMPLERS.values()):
        raise TypeError(
            f"sampler must be one of the conditional samplers {tuple(CONDITIONAL_SAMPLERS)} "
            f"(they take the condition as y=), got {getattr(sampler, '__name__', sampler)!r}"
        )
    check_kind(pair, GaussianPair, "pair")
    check_kind(process, ShiftedProcess, "process")
    require(start in ("marginal", "prior"), "start", start, "'marginal' or 'prior'")
    if start == "prior":
        check_kind(process, ResidualChain, "process")
    single = isinstance(y, Tensor) and y.ndim == 1
    y = finite(floating(y, "y"), "y").to(torch.float64)
    y = pair._condition(y[None] if single else y, batched=True)
    ts = _grid(process, ts_or_steps)
    model = pair.denoiser(process) if model is None else model
    noises: list[Tensor] = []

    def tracked(i: int, shape) -> Tensor:
        noises.append(torch.zeros(shape, dtype=torch.float64, requires_grad=True))
        return noises[-1]

    with torch.enable_grad():
        if start == "marginal":
            mean0, cov0 = pair.marginal(y, float(ts[0]), process)
            first = x = mean0.clone().requires_grad_(True)
        else:
            cov0, first = None, torch.zeros_like(y, requires_grad=True)
            x = process.start(y, first)
        out = sampler(model, x, ts, process, y=y, noise_sampler=tracked, **options)
        inputs = [first, *noises]
        rows = []
        for j in range(out.shape[1]):
            grads = torch.autograd.grad(out[0, j], inputs, retain_graph=True, allow_unused=True)
            zero = [torch.zeros_like(v[0]) for v in inputs]
            rows.append(
                torch.cat([z if g is None else g[0] for g, z in zip(grads, zero, strict=True)])
            )
    jac = torch.stack(rows)
    if cov0 is None:  # every input is standard normal noise
        cov = jac @ jac.T
    else:
        jac_x, jac_z = jac[:, : pair.dim], jac[:, pair.dim :]
        cov = jac_x @ cov0 @ jac_x.T
        if noises:
            cov = cov + jac_z @ jac_z.T
    mean = out.detach()
    return mean[0] if single else mean, 0.5 * (cov + cov.T)


# -- checks and pieces shared with diffcore.bridges -----------------------------------------
def as_condition(y, x: Tensor, name: str = "y", x_name: str = "x") -> Tensor:
    """The condition ``y`` checked against the state ``x`` (the conditional convention of the
    module docstring): a finite float32 or float64 tensor of the shape of ``x`` or of one
    sample, ``x.shape[1:]``, on the device of ``x``.  Returns ``y`` in the dtype of ``x``."""
    floating(x, x_name)
    floating(y, name)
    if y.shape != x.shape and y.shape != x.shape[1:]:
        raise ValueError(
            f"{name} must have the shape of {x_name} {tuple(x.shape)} or of one sample "
            f"{tuple(x.shape[1:])}, got {name} of shape {tuple(y.shape)}"
        )
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but {x_name} is on {x.device}")
    return finite(y, name).to(x.dtype)


def check_kind(value, kinds, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``value`` is an instance of ``kinds`` (a
    class or a tuple of classes)."""
    if not isinstance(value, kinds):
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        names = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be a {names}, got {name} = {value!r}")


def bind(model: Callable, y: Tensor) -> Callable:
    """The engine's denoiser of a conditional model: ``D(x, t) = model(x, t, y)``."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")

    def bound(x: Tensor, t) -> Tensor:
        return model(x, t, y)

    return bound


def loss_draws(
    x0: Tensor, y: Tensor, t_sampler, generator, default: Callable
) -> tuple[Tensor, Tensor, Tensor]:
    """The draws of a conditional loss, after the checks of the pair: one time per sample,
    ``t_sampler(n, generator)`` or else ``default(n, generator, device)``, then standard
    normal noise like ``x0``.  Returns ``(t, noise, y)``, ``y`` checked by
    :func:`as_condition`.  Shapes: ``x0`` ``(batch, ...)``, ``y`` that or one sample; ``t``
    ``(batch,)``."""
    finite(floating(x0, "x0"), "x0")
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(
            f"x0 must be a batch (batch, ...) with batch >= 1, got x0 of shape {tuple(x0.shape)}"
        )
    y = as_condition(y, x0, x_name="x0")
    n = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    if t_sampler is None:
        t = default(n, generator, device)
    else:
        t = floating(returned_shape(t_sampler(n, generator), (n,), "t_sampler"), "t")
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
    return as_time(t.to(device=x0.device, dtype=x0.dtype)), noise.to(x0.device), y


def squared_error(pred: Tensor, target: Tensor, name: str) -> Tensor:
    """The squared error of each sample, summed over all but the batch dimension, once
    ``pred`` (what ``name`` returned) is checked to have the shape of ``target``.  Shapes:
    ``(batch, ...)``; returns ``(batch,)``."""
    returned(pred, target, name)
    return (pred - target).pow(2).flatten(1).sum(1)


# -- helpers ---------------------------------------------------------------------------------
def _like(v, like: Tensor, name: str, like_name: str) -> Tensor:
    """``v`` checked to be finite and of the shape of ``like``."""
    finite(v, name)
    same_shape(v, like, name, like_name)
    return v


def _grid(process: ShiftedProcess, ts_or_steps) -> Tensor:
    """The run's grid in float64: a chain's own grid of ``ts_or_steps`` steps (None: all of
    them), or the given times, checked."""
    if ts_or_steps is None or isinstance(ts_or_steps, int):
        if not isinstance(process, ResidualChain):
            raise TypeError(
                f"ts_or_steps must be a grid of times for a {type(process).__name__} (only a "
                f"chain has its own grid), got ts_or_steps = {ts_or_steps!r}"
            )
        return process.grid(ts_or_steps)
    return time_grid(ts_or_steps).to(torch.float64)


def _setup(x: Tensor, y: Tensor, ts_or_steps, process, kinds) -> tuple[Tensor, list, Tensor]:
    """Checks shared by the samplers, before any work: the process, ``x``, ``y`` and the grid;
    returns the grid, the shift :math:`c_t` on it and the checked ``y``."""
    check_kind(process, kinds, "process")
    finite(x, "x")
    y = as_condition(y, x)
    ts = _grid(process, ts_or_steps)
    return ts, process.shift(ts).tolist(), y


def _two(out, x: Tensor) -> tuple[Tensor, Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            f"an RDDM model must return the pair (residual, noise), got {type(out).__name__}"
        )
    return returned(out[0], x, "model's residual"), returned(out[1], x, "model's noise")


def _stash(model: Callable, y: Tensor, to_x0: Callable, heads: int):
    """The engine's denoiser ``D(x, t)``: ``model(x, t, y)`` (:func:`bind`), its raw output
    kept in the returned list (the step reads it), turned into :math:`\\hat x_0` by
    ``to_x0(out, x, t)`` for the engine's count, checks and callback."""
    bound = bind(model, y)
    kept: list[Tensor] = []

    def D(x: Tensor, t) -> Tensor:  # noqa: N802 (the denoiser D)
        out = bound(x, t)
        out = _two(out, x) if heads == 2 else (returned(out, x, "model(x, t, y)"),)
        kept[:] = out
        return to_x0(out, x, t)

    return D, kept
