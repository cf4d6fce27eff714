r"""Diffusions that start from the degraded input: the mean-reverting SDE with its fast sampler
(MRS), and Brownian-bridge diffusions between paired laws (I2SB, DDBM).

Both carry the degraded input :math:`y` (IR-SDE's :math:`\mu`, I2SB's :math:`x_1`) inside the
forward process, :math:`x_t = \alpha_t x_0 + \kappa_t y + \sigma_t\varepsilon`, so that the
shifted variable :math:`u_t = x_t - \kappa_t y` is a standard diffusion :math:`u_t = \alpha_t
x_0 + \sigma_t\varepsilon` of the data, given :math:`y`: each process is a
:class:`~diffcore.residual.ShiftedProcess` (the :class:`~diffcore.processes.Process` of
:math:`u`, with :math:`\alpha_t, \sigma_t, \lambda_t, f, g^2`, and the shift :math:`\kappa_t`),
as RDDM, Resfusion and ResShift are:

- :class:`MeanReverting`: :math:`dx = \theta_t(y - x)\,dt + g_t\,dw`, :math:`\kappa_t = 1 -
  \alpha_t` (IR-SDE, Luo et al., 2023); its samplers are MRS (Li et al., 2025):
  :func:`mrs_ode_data`, :func:`mrs_ode_noise`, :func:`mrs_sde_data`, :func:`mrs_sde_noise`;
- :class:`BrownianBridge`: Brownian motion from :math:`x_0` pinned at :math:`y` at
  :math:`t = 1` (I2SB, Liu et al., 2023; the VE bridge of DDBM, Zhou et al., 2024; the kind
  of diffusion bridge that DB-CR and SelfDB build on); its samplers :func:`bridge_posterior`,
  :func:`bridge_ode`, :func:`bridge_heun`.

Written on :math:`u`, each of these samplers is one of the monograph's: MRS is DPM-Solver(++)
and DDPM, the bridge samplers are DDPM, DDIM and Heun, on :math:`u`, to float64 round-off
(``tests/test_bridges.py``).

Models and samplers follow the conditional convention written in :mod:`diffcore.residual`
(``model(x, t, y)``, ``sampler(model, x, ts, process, *, y, ...)``); every sampler here is in
:data:`~diffcore.residual.CONDITIONAL_SAMPLERS`.  The currency is a conditional denoiser
``D(x, t, y)`` :math:`\approx \mathbb E[x_0 \mid x_t = x, y]`; :func:`mr_denoiser` and :func:`bridge_denoiser`
turn a network trained by :func:`mr_loss` or :func:`bridge_loss` into one.  For jointly
Gaussian pairs, :class:`~diffcore.residual.GaussianPair` gives the exact denoiser, the exact
conditional law :math:`p(x_0 \mid y)` and the exact PF-ODE flow, and
:func:`~diffcore.residual.output_law` the exact law of a few-step sampler's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.checks import (
    as_time,
    finite,
    floating,
    one_of,
    per_sample,
    positive,
    returned,
    time_grid,
)
from diffcore.residual import (
    ShiftedProcess,
    as_condition,
    bind,
    check_kind,
    conditional_sampler,
    loss_draws,
    squared_error,
)
from diffcore.samplers import phi1, phi2
from diffcore.stepping import eps_hat, integrate

__all__ = [
    "MeanReverting",
    "BrownianBridge",
    "MR_TARGETS",
    "BRIDGE_TARGETS",
    "mr_convert",
    "mr_denoiser",
    "mr_loss",
    "mrs_ode_data",
    "mrs_ode_noise",
    "mrs_sde_data",
    "mrs_sde_noise",
    "bridge_denoiser",
    "bridge_loss",
    "bridge_posterior",
    "bridge_ode",
    "bridge_heun",
]

#: What a mean-reverting model may predict (:func:`mr_convert`).
MR_TARGETS = ("eps", "x0", "v")
#: What a bridge model may predict (:func:`bridge_denoiser`).
BRIDGE_TARGETS = ("x0", "i2sb")


# -- the processes -----------------------------------------------------------------------------
def _solve_quadratic(value: Tensor, linear: float, quad: float) -> Tensor:
    """The root u >= 0 of linear * u + quad * u^2 = value, in the form stable at quad = 0."""
    return 2 * value / (linear + torch.sqrt(linear**2 + 4 * quad * value))


def _as_tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else value.to(torch.get_default_dtype())
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


class MeanReverting(ShiftedProcess):
    r"""The mean-reverting SDE of IR-SDE (Luo et al., 2023), as MRS (Li et al., 2025) writes it:

    .. math::
        dx = \theta_t(y - x)\,dt + g_t\,dw, \qquad g_t^2 = 2\sigma_\infty^2\theta_t,
        \qquad \theta_t = \theta_{\min} + t(\theta_{\max} - \theta_{\min}),

    the ratio :math:`g_t^2/\theta_t = 2\sigma_\infty^2` constant as in IR-SDE (its
    :math:`\lambda^2`; ``sigma_inf`` is the stationary standard deviation).  With
    :math:`\bar\theta_t = \int_0^t\theta`, the marginal is exact:

    .. math::
        x_t = y + (x_0 - y)e^{-\bar\theta_t}
              + \sigma_\infty\sqrt{1 - e^{-2\bar\theta_t}}\;\varepsilon,

    so :math:`\alpha_t = e^{-\bar\theta_t}`, :math:`\sigma_t = \sigma_\infty\sqrt{1 -
    \alpha_t^2}`, :math:`\kappa_t = 1 - \alpha_t`, and :math:`u = x - y` solves the linear SDE
    :math:`du = -\theta_t u\,dt + g_t\,dw` (:math:`f = -\theta_t`).  IR-SDE's mean
    :math:`\mu` is the degraded input :math:`y`.  Departure: IR-SDE's code
    (``utils/sde_utils.py``, ``IRSDE._initialize``) uses a discrete :math:`\theta` schedule
    (cosine by default) with a step ``dt`` chosen so that :math:`\alpha_T` = ``eps``; here
    :math:`\theta_t` is linear in continuous time (constant for ``theta_min == theta_max``).
    The default (0.1 to 9.1) reaches :math:`\alpha_1 = e^{-4.6} \approx 0.01`, IR-SDE's
    ``eps``.
    """

    def __init__(self, theta_min: float = 0.1, theta_max: float = 9.1, sigma_inf: float = 0.5):
        self.theta_min = positive(theta_min, "theta_min")
        self.theta_max = positive(theta_max, "theta_max")
        self.sigma_inf = positive(sigma_inf, "sigma_inf")
        if self.theta_max < self.theta_min:
            raise ValueError(
                f"need theta_min <= theta_max, got theta_min = {theta_min}, theta_max = {theta_max}"
            )

    def theta(self, t) -> Tensor:
        r"""The mean-reversion rate :math:`\theta_t`."""
        return self.theta_min + as_time(t) * (self.theta_max - self.theta_min)

    def theta_bar(self, t) -> Tensor:
        r""":math:`\bar\theta_t = \int_0^t\theta_\tau\,d\tau`."""
        t = as_time(t)
        return self.theta_min * t + 0.5 * (self.theta_max - self.theta_min) * t**2

    def alpha(self, t) -> Tensor:
        return torch.exp(-self.theta_bar(t))

    def sigma(self, t) -> Tensor:
        return self.sigma_inf * torch.sqrt(-torch.expm1(-2 * self.theta_bar(t)))

    def d_alpha(self, t) -> Tensor:
        return -self.theta(t) * self.alpha(t)

    def d_sigma(self, t) -> Tensor:
        return self.sigma_inf**2 * self.theta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def g2(self, t) -> Tensor:
        r""":math:`g_t^2 = 2\sigma_\infty^2\theta_t` (finite at ``t = 0``, where
        :math:`\dot\sigma_t` is not)."""
        return 2 * self.sigma_inf**2 * self.theta(t)

    def shift(self, t) -> Tensor:
        return -torch.expm1(-self.theta_bar(t))

    def t_of_lam(self, lam) -> Tensor:
        # e^{-2 lam} = sigma_inf^2 (e^{2 theta_bar} - 1)
        lam = _as_tensor(lam)
        bar = 0.5 * torch.nn.functional.softplus(-2 * lam - 2 * math.log(self.sigma_inf))
        return _solve_quadratic(bar, self.theta_min, 0.5 * (self.theta_max - self.theta_min))

    def noisy_start(self, y: Tensor, t: float = 1.0, generator=None) -> Tensor:
        r"""A start state for the samplers at time ``t``: :math:`y + \sigma_t\varepsilon`, the
        law of :math:`x_t` with the term :math:`\alpha_t(x_0 - y)` dropped.  Departure:
        IR-SDE's code (``IRSDE.noise_state``) draws :math:`\mu + \sigma_\infty\varepsilon`.
        Shapes: ``y`` ``(batch, ...)``; returns the same."""
        finite(floating(y, "y"), "y")
        t = as_time(t, like=y)
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        return y + self.sigma(t) * noise


class BrownianBridge(ShiftedProcess):
    r"""A Brownian motion from :math:`x_0`, pinned at :math:`y` at :math:`t = 1`: the bridge of
    I2SB (Liu et al., 2023) and, up to a change of time, DDBM's VE bridge (Zhou et al., 2024).

    With :math:`\beta_t > 0`, :math:`\sigma_t^2 = \int_0^t\beta` (I2SB's ``std_fwd``),
    :math:`\bar\sigma_t^2 = \int_t^1\beta` (``std_bwd``) and :math:`S = \sigma_1^2`, I2SB's
    eq. 11 gives the exact bridge marginal

    .. math::
        q(x_t \mid x_0, y) = \mathcal N\Big(\frac{\bar\sigma_t^2}{S}x_0
            + \frac{\sigma_t^2}{S}y,\ \frac{\sigma_t^2\bar\sigma_t^2}{S}I\Big)

    (I2SB's :math:`x_1` is :math:`y`), so :math:`\alpha_t = \bar\sigma_t^2/S`, :math:`\kappa_t =
    \sigma_t^2/S`, :math:`\sigma_t^{(u)} = \sigma_t\bar\sigma_t/\sqrt S` and :math:`\lambda_t =
    \log(\bar\sigma_t/\sigma_t)`; at :math:`t = 1`, :math:`\alpha = \sigma^{(u)} = 0` and
    :math:`x_1 = y`.  :math:`u` solves :math:`du = -(\beta_t/\bar\sigma_t^2)u\,dt +
    \sqrt{\beta_t}\,dw`: on :math:`x` the drift is Doob's :math:`\beta_t(y - x)/\bar
    \sigma_t^2`.  Here :math:`\beta_t = \beta_{\min} + (\beta_{\max} - \beta_{\min})(1 - |2t -
    1|)`, symmetric about :math:`t = 1/2` as in I2SB (constant for ``beta_min == beta_max``,
    the plain Brownian bridge).  Departure: I2SB's code (``i2sb/runner.py``) uses 1000 discrete
    betas, quadratic in :math:`\sqrt\beta` up to the middle and mirrored after it.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 1.0):
        self.beta_min = positive(beta_min, "beta_min")
        self.beta_max = positive(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"need beta_min <= beta_max, got beta_min = {beta_min}, beta_max = {beta_max}"
            )
        self._slope = self.beta_max - self.beta_min
        self._total = self.beta_min + 0.5 * self._slope

    def beta(self, t) -> Tensor:
        r""":math:`\beta_t`, which is also :math:`g^2(t)` of :math:`u`."""
        return self.beta_min + self._slope * (1 - torch.abs(2 * as_time(t) - 1))

    def _half(self, u: Tensor) -> Tensor:
        return self.beta_min * u + self._slope * u**2  # the integral of beta over [0, u <= 1/2]

    def forward_var(self, t) -> Tensor:
        r""":math:`\sigma_t^2 = \int_0^t\beta_\tau\,d\tau`, the variance of the Brownian motion."""
        t = as_time(t)
        return torch.where(t <= 0.5, self._half(t), self._total - self._half(1 - t))

    def backward_var(self, t) -> Tensor:
        r""":math:`\bar\sigma_t^2 = \int_t^1\beta_\tau\,d\tau`."""
        t = as_time(t)
        return torch.where(t >= 0.5, self._half(1 - t), self._total - self._half(t))

    def alpha(self, t) -> Tensor:
        return self.backward_var(t) / self._total

    def shift(self, t) -> Tensor:
        return self.forward_var(t) / self._total

    def sigma(self, t) -> Tensor:
        return torch.sqrt(self.forward_var(t) * self.backward_var(t) / self._total)

    def lam(self, t) -> Tensor:
        return 0.5 * (torch.log(self.backward_var(t)) - torch.log(self.forward_var(t)))

    def d_alpha(self, t) -> Tensor:
        return -self.beta(t) / self._total

    def d_sigma(self, t) -> Tensor:
        spread = self.backward_var(t) - self.forward_var(t)
        return self.beta(t) * spread / (2 * self._total * self.sigma(t))

    def t_of_lam(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        fwd = self._total * torch.sigmoid(-2 * lam)  # sigma_t^2 / bar sigma_t^2 = e^{-2 lam}
        bwd = self._total * torch.sigmoid(2 * lam)
        early = _solve_quadratic(fwd, self.beta_min, self._slope)
        late = 1 - _solve_quadratic(bwd, self.beta_min, self._slope)
        return torch.where(fwd <= 0.5 * self._total, early, late)

    def posterior(self, x: Tensor, x0: Tensor, t: float, s: float) -> tuple[Tensor, float]:
        r"""Mean and standard deviation of :math:`q(x_s \mid x_t = x, x_0)` for :math:`s < t`
        (I2SB's eq. 4), the Brownian bridge from :math:`(0, x_0)` to :math:`(t, x_t)`: mean and
        variance

        .. math::
            x_0 + \frac{\sigma_s^2}{\sigma_t^2}(x_t - x_0), \qquad
            \frac{\sigma_s^2(\sigma_t^2 - \sigma_s^2)}{\sigma_t^2},

        free of :math:`y` (the path is Markov).  Shapes: ``x``, ``x0`` ``(batch, ...)``;
        ``t``, ``s`` floats; returns the mean ``(batch, ...)`` and the std, a float."""
        if not float(s) < float(t):
            raise ValueError(f"the posterior goes down from t to s < t, got t = {t}, s = {s}")
        var_t, var_s = self.forward_var(torch.tensor([float(t), float(s)])).tolist()
        return _posterior_step(x, x0, var_t, var_s), math.sqrt(var_s * (1 - var_s / var_t))


# -- small pieces the samplers share ----------------------------------------------------------
def _order(order) -> int:
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got order = {order!r}")
    return order


def _step_ratio(k, order: int) -> float | None:
    """r = h_{i-1} / h_i for a second-order multistep step, or None for a first-order one (the
    first step, order 1, or a step of infinite log-SNR length)."""
    if order == 1 or not k.history:
        return None
    h_prev = k.t.lam - k.history[0][1].lam
    return h_prev / k.h if math.isfinite(k.h) and math.isfinite(h_prev) else None


def _posterior_step(x: Tensor, x0: Tensor, var_t: float, var_s: float) -> Tensor:
    """The mean x0 + (var_s / var_t)(x - x0) of the Brownian posterior."""
    return torch.add(x0, x - x0, alpha=var_s / var_t)


def _posterior_draw(k, x: Tensor, x0: Tensor, var: list) -> Tensor:
    """A draw of the Brownian posterior q(x_s | x_t, x0) over the step k (I2SB's eq. 4)."""
    var_t, var_s = var[k.i], var[k.i + 1]
    z = k.noise(math.sqrt(var_s * (1 - var_s / var_t)))
    return _posterior_step(x, x0, var_t, var_s).add_(z)


# -- MRS: the mean-reverting SDE's samplers --------------------------------------------------
@conditional_sampler
def mrs_ode_data(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: MeanReverting,
    *,
    y: Tensor,
    order: int = 2,
    taylor: bool = True,
    **run,
) -> Tensor:
    r"""MRS for the PF-ODE in data prediction (Li et al., 2025), multistep, order 1 or 2.

    The PF-ODE :math:`dx/dt = \theta_t(y - x) - \tfrac12 g_t^2\nabla\log p_t` in
    :math:`\lambda` has the semi-analytic solution :math:`x_s - y = \frac{\sigma_s}{\sigma_t}
    (x_t - y) + \sigma_s\int_{\lambda_t}^{\lambda_s}e^{\lambda}(\hat x_0 - y)\,d\lambda`;
    with :math:`D_i = \hat x_0(x_t, t)` extrapolated linearly in :math:`\lambda`
    (:math:`r = h_{i-1}/h`),

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\varphi_1(h)D_i
              + \alpha_s w(h)\,\frac{D_i - D_{i-1}}{r}
              + \Big(1 - \frac{\sigma_s}{\sigma_t} - \alpha_s\varphi_1(h)\Big)y,

    with :math:`w = \varphi_2` (:func:`~diffcore.samplers.phi2`, the exact integral of the
    line: ``taylor=True``, as the official code ``MRSampler.step_ode_2nd`` writes it) or
    :math:`w = \varphi_1/2` (``taylor=False``, DPM-Solver++(2M)'s weight); the two agree to
    :math:`O(h^3)` per step.  The weight of :math:`y` is one minus the others: on :math:`u =
    x - y` this is DPM-Solver++ (``dpm_solver_1`` for ``order=1``, ``dpmpp_2m`` for
    ``taylor=False``, the second step of ``dpmpp_3m`` for ``taylor=True``).  The first step,
    and a step to :math:`\sigma = 0`, are first order.  ``model(x, t, y)`` is the conditional
    denoiser (:func:`mr_denoiser`).  Departures of the official code
    (``universal-image-restoration/utils/sampler.py``): it interpolates
    :math:`\alpha_t, \sigma_t, \lambda_t` linearly between the training steps, each on its own
    (so :math:`\lambda \ne \log(\alpha/\sigma)` off the steps); it lowers the order in the last
    steps of runs under 10 steps; its third order weights the second divided difference by
    :math:`\varphi_3`, half the Taylor weight (see :func:`~diffcore.samplers.dpmpp_3m`).  One
    model call per step.  Shapes: ``x`` ``(batch, ...)``, ``y`` that or ``x.shape[1:]``;
    returns ``(batch, ...)``.
    """
    y, order = as_condition(y, x), _order(order)
    if not isinstance(taylor, bool):
        raise TypeError(f"taylor must be True or False, got taylor = {taylor!r}")

    def update(k, x):
        t, s, d = k.t, k.s, k.D(x)
        keep, pull = s.sigma / t.sigma, s.alpha * phi1(k.h)
        out = x * keep + d * pull + (1 - keep - pull) * y
        r = _step_ratio(k, order)
        if r is not None:
            w = phi2(k.h) if taylor else phi1(k.h) / 2
            out = out.add_(d - k.history[0][0], alpha=s.alpha * w / r)
        return out

    return integrate(update, bind(model, y), x, ts, process, **run)


@conditional_sampler
def mrs_ode_noise(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: MeanReverting,
    *,
    y: Tensor,
    order: int = 2,
    **run,
) -> Tensor:
    r"""MRS for the PF-ODE in noise prediction (Li et al., 2025), multistep, order 1 or 2.

    The semi-analytic solution :math:`x_s - y = \frac{\alpha_s}{\alpha_t}(x_t - y) -
    \alpha_s\int_{\lambda_t}^{\lambda_s}e^{-\lambda}\hat\varepsilon\,d\lambda`, with
    :math:`\hat\varepsilon_i = (x_t - y - \alpha_t(D_i - y))/\sigma_t` extrapolated
    linearly in :math:`\lambda`:

    .. math::
        \begin{aligned}
        x_s = {} & \frac{\alpha_s}{\alpha_t}x_t + \Big(1 - \frac{\alpha_s}{\alpha_t}\Big)y
              - \sigma_s(e^h - 1)\hat\varepsilon_i \\
              & - \sigma_s\Big(\frac{e^h - 1}{h} - 1\Big)
              \frac{\hat\varepsilon_i - \hat\varepsilon_{i-1}}{r},
        \end{aligned}

    as ``MRSampler.step_ode_2nd`` (``parameterization="noise"``) writes it;
    :math:`\sigma_s e^h` is computed as :math:`\alpha_s\sigma_t/\alpha_t`, finite where
    :math:`\sigma_s = 0`.  First order, it equals :func:`mrs_ode_data` (DDIM).  Keeps
    :math:`\hat\varepsilon` in the history.  One model call per step.  Shapes as in
    :func:`mrs_ode_data`.
    """
    y, order = as_condition(y, x), _order(order)

    def update(k, x):
        t, s = k.t, k.s
        eps = k.kept = eps_hat(x - y, k.D(x) - y, t)
        ratio = s.alpha / t.alpha
        grow = ratio * t.sigma - s.sigma  # sigma_s (e^h - 1)
        out = (x * ratio).add_(eps, alpha=-grow).add_(y, alpha=1 - ratio)
        r = _step_ratio(k, order)
        if r is not None:
            out = out.add_(eps - k.history[0][0], alpha=-(grow / k.h - s.sigma) / r)
        return out

    return integrate(update, bind(model, y), x, ts, process, **run)


@conditional_sampler
def mrs_sde_data(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: MeanReverting,
    *,
    y: Tensor,
    order: int = 2,
    **run,
) -> Tensor:
    r"""MRS for the reverse SDE in data prediction (Li et al., 2025), multistep, order 1 or 2.

    The reverse SDE :math:`dx = [\theta_t(y - x) - g_t^2\nabla\log p_t]dt + g_t\,d\bar w` has
    the semi-analytic solution :math:`x_s - y = \frac{\sigma_s}{\sigma_t}e^{-h}(x_t - y) +
    2\alpha_s\int_{\lambda_t}^{\lambda_s}e^{-2(\lambda_s - \lambda)}(\hat x_0 - y)\,d\lambda
    + \sigma_s\sqrt{1 - e^{-2h}}\,z`; with :math:`D` linear in :math:`\lambda`,

    .. math::
        \begin{aligned}
        x_s = {} & \frac{\sigma_s}{\sigma_t}e^{-h}x_t + \alpha_s(1 - e^{-2h})D_i
              + \alpha_s\varphi_2(2h)\frac{D_i - D_{i-1}}{r} \\
              & + \sigma_s\sqrt{1 - e^{-2h}}\,z + (1 - \text{the weights of } x_t, D_i)\,y,
        \end{aligned}

    :math:`\varphi_2(2h) = 1 - (1 - e^{-2h})/(2h)`, as ``MRSampler.step_sde_2nd`` writes it.
    First order it is DDPM's ancestral step on :math:`u = x - y`, a draw of IR-SDE's
    posterior :math:`q(x_s \mid x_t, x_0 = D_i)` (``IRSDE.reverse_optimum_step``); the second
    order is k-diffusion's ``sample_dpmpp_2m_sde`` with ``solver_type="heun"`` and
    ``eta=1``.  Order 1 or 2
    in law; one model call and one normal draw per step.  Shapes as in :func:`mrs_ode_data`.
    """
    y, order = as_condition(y, x), _order(order)

    def update(k, x):
        t, s, d = k.t, k.s, k.D(x)
        keep, pull = math.exp(-k.h) * s.sigma / t.sigma, s.alpha * phi1(2 * k.h)
        out = (x * keep).add_(d, alpha=pull).add_(y, alpha=1 - keep - pull)
        out = out.add_(k.noise(s.sigma * math.sqrt(phi1(2 * k.h))))
        r = _step_ratio(k, order)
        if r is not None:
            out = out.add_(d - k.history[0][0], alpha=s.alpha * phi2(2 * k.h) / r)
        return out

    return integrate(update, bind(model, y), x, ts, process, **run)


@conditional_sampler
def mrs_sde_noise(
    model: Callable,
    x: Tensor,
    ts: Tensor,
    process: MeanReverting,
    *,
    y: Tensor,
    order: int = 2,
    **run,
) -> Tensor:
    r"""MRS for the reverse SDE in noise prediction (Li et al., 2025), multistep, order 1 or 2.

    The semi-analytic solution :math:`x_s - y = \frac{\alpha_s}{\alpha_t}(x_t - y) -
    2\alpha_s\int_{\lambda_t}^{\lambda_s}e^{-\lambda}\hat\varepsilon\,d\lambda +
    \sigma_s\sqrt{e^{2h} - 1}\,z`; with :math:`\hat\varepsilon` linear in :math:`\lambda`,

    .. math::
        \begin{aligned}
        x_s = {} & \frac{\alpha_s}{\alpha_t}x_t + \Big(1 - \frac{\alpha_s}{\alpha_t}\Big)y
              - 2\sigma_s(e^h - 1)\hat\varepsilon_i \\
              & - 2\sigma_s\Big(\frac{e^h - 1}{h} - 1\Big)
              \frac{\hat\varepsilon_i - \hat\varepsilon_{i-1}}{r} + \sigma_s\sqrt{e^{2h} - 1}\,z,
        \end{aligned}

    as ``MRSampler.step_sde_2nd`` (``parameterization="noise"``) writes it (SDE-DPM-Solver-1
    of Lu et al. on :math:`u` at first order), with :math:`\sigma_s e^h =
    \alpha_s\sigma_t/\alpha_t`.  Unlike the data form it is not exact on a point mass, since
    :math:`\hat\varepsilon` varies along the reverse SDE's paths.  One model call and one
    normal draw per step.  Shapes as in :func:`mrs_ode_data`.
    """
    y, order = as_condition(y, x), _order(order)

    def update(k, x):
        t, s = k.t, k.s
        eps = k.kept = eps_hat(x - y, k.D(x) - y, t)
        ratio = s.alpha / t.alpha
        grow = ratio * t.sigma - s.sigma  # sigma_s (e^h - 1)
        out = (x * ratio).add_(eps, alpha=-2 * grow).add_(y, alpha=1 - ratio)
        out = out.add_(k.noise(math.sqrt(max((ratio * t.sigma) ** 2 - s.sigma**2, 0.0))))
        r = _step_ratio(k, order)
        if r is not None:
            out = out.add_(eps - k.history[0][0], alpha=-2 * (grow / k.h - s.sigma) / r)
        return out

    return integrate(update, bind(model, y), x, ts, process, **run)


# -- MR targets and loss --------------------------------------------------------------------
def mr_convert(
    pred: Tensor, source: str, target: str, x: Tensor, t, process: MeanReverting, y: Tensor
) -> Tensor:
    r"""Convert a mean-reverting model's prediction between ``"eps"``, ``"x0"`` and ``"v"``.

    With :math:`x_t - y = \alpha_t(x_0 - y) + \sigma_t\varepsilon` and :math:`\sigma_t =
    \sigma_\infty s_t`, :math:`\alpha_t^2 + s_t^2 = 1`, the velocity is

    .. math:: v = \sigma_\infty\alpha_t\varepsilon - s_t(x_0 - y), \qquad
        x_0 - y = \alpha_t(x_t - y) - s_t v,

    Salimans & Ho's :math:`v` of the variance-preserving variable :math:`(x - y)/\sigma_\infty`,
    times :math:`\sigma_\infty`, as the official MRS code converts it
    (``MRSampler.convert_model_output``, ``fit_target="velocity"``).  Shapes: ``pred``, ``x``
    ``(batch, ...)``, ``y`` that or one sample; ``t`` a float or ``(batch,)``.
    """
    one_of(source, "source", MR_TARGETS)
    one_of(target, "target", MR_TARGETS)
    y = as_condition(y, x)
    returned(pred, x, "pred")
    a, _, s = process.coefficients(t, x)
    unit = s / process.sigma_inf
    u = x - y
    if source == "eps":
        x0 = y + (u - s * pred) / a
    elif source == "v":
        x0 = y + a * u - unit * pred
    else:
        x0 = pred
    if target == "x0":
        return x0
    eps = (u - a * (x0 - y)) / s
    return eps if target == "eps" else process.sigma_inf * a * eps - unit * (x0 - y)


def mr_denoiser(model: Callable, source: str, process: MeanReverting) -> Callable:
    """The conditional denoiser ``D(x, t, y)`` of a model ``model(x, t, y)`` that predicts
    ``source`` (:data:`MR_TARGETS`), by :func:`mr_convert`.  Shapes: ``x`` ``(batch, ...)``,
    ``y`` that or one sample, ``t`` a float or ``(batch,)``; ``D`` returns ``(batch, ...)``."""
    one_of(source, "source", MR_TARGETS)

    def denoiser(x: Tensor, t, y: Tensor) -> Tensor:
        return mr_convert(model(x, t, y), source, "x0", x, t, process, y)

    return denoiser


def _uniform_times(n: int, generator, device) -> Tensor:
    """The losses' default times: uniform on [1e-3, 1)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return 1e-3 + (1 - 1e-3) * u


def mr_loss(
    model: Callable,
    x0: Tensor,
    y: Tensor,
    process: MeanReverting | None = None,
    target: str = "eps",
    t_sampler: Callable | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The regression loss of a mean-reverting model: :math:`\mathbb E\,\lVert F_\theta(x_t, t,
    y) - w\rVert^2`, ``y`` the degraded input.

    :math:`x_t = y + \alpha_t(x_0 - y) + \sigma_t\varepsilon`; the target :math:`w` is
    :math:`\varepsilon`, :math:`x_0` or :math:`v` (:func:`mr_convert`), its minimiser
    :math:`\mathbb E[w \mid x_t, y]`.  IR-SDE trains the noise by matching the mean of one
    Euler step of the reverse SDE to the posterior mean (its "maximum likelihood" loss,
    ``optimize_parameters``): a weighted :math:`\varepsilon`-loss, with the same minimiser.
    ``t`` uniform on [1e-3, 1) unless ``t_sampler(n, generator)`` says otherwise.  Draws:
    ``t``, then :math:`\varepsilon`.  Shapes: ``x0`` ``(batch, ...)``, ``y`` that or one
    sample; returns a scalar.
    """
    process = MeanReverting() if process is None else process
    one_of(target, "target", MR_TARGETS)
    t, eps, y = loss_draws(x0, y, t_sampler, generator, _uniform_times)
    a, _, s = process.coefficients(t, x0)
    x_t = y + a * (x0 - y) + s * eps
    w = {"eps": eps, "x0": x0, "v": process.sigma_inf * a * eps - s / process.sigma_inf * (x0 - y)}
    return squared_error(model(x_t, t, y), w[target], "model").mean()


# -- bridges: loss, denoiser, samplers -----------------------------------------------------
def bridge_denoiser(model: Callable, source: str, bridge: BrownianBridge) -> Callable:
    r"""The conditional denoiser ``D(x, t, y)`` of a model ``model(x, t, y)`` trained with
    :func:`bridge_loss` on ``source``: ``"x0"`` as it is, ``"i2sb"`` by :math:`\hat x_0 = x_t -
    \sigma_t\,F` (I2SB's ``compute_pred_x0``).  Shapes: ``x`` ``(batch, ...)``, ``y`` that or
    one sample, ``t`` a float or ``(batch,)``; ``D`` returns ``(batch, ...)``."""
    one_of(source, "source", BRIDGE_TARGETS)
    if source == "x0":
        return model

    def denoiser(x: Tensor, t, y: Tensor) -> Tensor:
        std = per_sample(bridge.forward_var(as_time(t, like=x)).sqrt(), x)
        return x - std * returned(model(x, t, y), x, "model(x, t, y)")

    return denoiser


def bridge_loss(
    model: Callable,
    x0: Tensor,
    y: Tensor,
    bridge: BrownianBridge | None = None,
    target: str = "x0",
    t_sampler: Callable | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The regression loss of a bridge model on pairs: :math:`\mathbb E\,\lVert F_\theta(x_t,
    t, y) - w\rVert^2`, :math:`x_t \sim q(x_t \mid x_0, y)`.

    ``target="x0"``: :math:`w = x_0`, the denoiser, minimised by :math:`\mathbb E[x_0 \mid x_t,
    y]` (DDBM's target, without its preconditioning and weights).  ``target="i2sb"``:
    I2SB's label :math:`w = (x_t - x_0)/\sigma_t` (its eq. 12, ``compute_label``).
    Departure: I2SB's network sees :math:`y` only with ``cond_x1``; without it, it learns
    :math:`\mathbb E[\cdot \mid x_t]`, while :math:`y` still informs :math:`x_0` given
    :math:`x_t`.  ``t`` uniform on [1e-3, 1) unless ``t_sampler(n, generator)`` says
    otherwise.  To train with :func:`diffcore.train.fit`, stack the pairs ``(N, 2, ...)`` and
    pass ``lambda m, p, generator: bridge_loss(m, p[:, 0], p[:, 1], bridge,
    generator=generator)``.  Draws: ``t``, then :math:`\varepsilon`.  Shapes: ``x0``
    ``(batch, ...)``, ``y`` that or one sample; returns a scalar.
    """
    bridge = BrownianBridge() if bridge is None else bridge
    one_of(target, "target", BRIDGE_TARGETS)
    t, eps, y = loss_draws(x0, y, t_sampler, generator, _uniform_times)
    x_t = bridge.pair_marginal(x0, y, t, eps)
    if target == "x0":
        w = x0
    else:
        w = (x_t - x0) / per_sample(bridge.forward_var(t).sqrt(), x0)
    return squared_error(model(x_t, t, y), w, "model").mean()


def _bridge_setup(x, ts, bridge, y):
    """Checked grid (float64), checked condition (x itself when ts[0] == 1), and the forward
    variances and shifts on the grid."""
    check_kind(bridge, BrownianBridge, "bridge")
    finite(floating(x, "x"), "x")
    ts = time_grid(ts).to(torch.float64)
    if y is None:
        if float(ts[0]) != 1.0:
            raise ValueError(
                f"y is needed when the run starts before t = 1, got y = None with "
                f"ts[0] = {float(ts[0]):.6g}"
            )
        y = x
    y = as_condition(y, x)
    return ts, y, bridge.forward_var(ts).tolist(), bridge.shift(ts).tolist()


@conditional_sampler
def bridge_posterior(
    model: Callable, x: Tensor, ts: Tensor, bridge: BrownianBridge, *, y=None, **run
) -> Tensor:
    r"""I2SB's sampler (Liu et al., 2023, eq. 4): :math:`x_s \sim q(x_s \mid x_t, x_0 =
    \hat x_0)`, the posterior of the Brownian motion (:meth:`BrownianBridge.posterior`),

    .. math::
        x_s = \hat x_0 + \frac{\sigma_s^2}{\sigma_t^2}(x_t - \hat x_0)
              + \sqrt{\frac{\sigma_s^2(\sigma_t^2 - \sigma_s^2)}{\sigma_t^2}}\;z,

    :math:`\hat x_0 = ` ``model(x, t, y)``.  On :math:`u = x - \kappa_t y` it is DDPM's
    ancestral step (:func:`~diffcore.samplers.ddpm`) of the bridge's process; also DDBM's and
    DBIM's (Zheng et al., 2024) step at :math:`\eta = 1`.  ``x`` at ``ts[0]`` (at ``t = 1`` it
    is ``y``; ``y=None`` then takes ``x``).  As in I2SB's ``p_posterior``, the step to
    :math:`t = 0` adds no noise.  One model call and one normal draw per step; first order in
    law.  Shapes: ``x``, ``y`` ``(batch, ...)`` (or ``y`` one sample); returns the same.
    """
    ts, y, var, _ = _bridge_setup(x, ts, bridge, y)

    def update(k, x):
        return _posterior_draw(k, x, k.D(x), var)

    return integrate(update, bind(model, y), x, ts, bridge, **run)


@conditional_sampler
def bridge_ode(
    model: Callable, x: Tensor, ts: Tensor, bridge: BrownianBridge, *, y=None, **run
) -> Tensor:
    r"""The bridge's PF-ODE solved exactly over each step with :math:`\hat x_0` held fixed:

    .. math::
        x_s = \kappa_s y + \alpha_s\hat x_0
              + \frac{\sigma_s}{\sigma_t}(x_t - \kappa_t y - \alpha_t\hat x_0),

    DDIM (:math:`\eta = 0`, :func:`~diffcore.samplers.dpm_solver_1`) on :math:`u = x -
    \kappa_t y`: it keeps the noise that :math:`\hat x_0` implies (DBIM's :math:`\eta = 0`
    step, Zheng et al., 2024).  At :math:`t = 1`, :math:`x_t = y` holds no noise to keep, so
    a step from there is a posterior step (:func:`bridge_posterior`), as DBIM's first step;
    the rest is deterministic.  Not I2SB's ``ot_ode``, the noiseless bridge
    (:math:`\beta \to 0`) with a model trained on it.  First order.  Shapes as in
    :func:`bridge_posterior`.
    """
    ts, y, var, kappa = _bridge_setup(x, ts, bridge, y)

    def update(k, x):
        t, s, x0 = k.t, k.s, k.D(x)
        if t.sigma == 0:  # from x_t = y: the posterior step
            return _posterior_draw(k, x, x0, var)
        noise = x - kappa[k.i] * y - t.alpha * x0  # the implied noise, times sigma_t
        return (noise * (s.sigma / t.sigma)).add_(x0, alpha=s.alpha).add_(y, alpha=kappa[k.i + 1])

    return integrate(update, bind(model, y), x, ts, bridge, **run)


@conditional_sampler
def bridge_heun(
    model: Callable, x: Tensor, ts: Tensor, bridge: BrownianBridge, *, y=None, **run
) -> Tensor:
    r"""DDBM's sampler (Zhou et al., 2024, ``sample_heun`` without churn): Heun's method in
    :math:`t` on the bridge's PF-ODE

    .. math::
        \frac{dx}{dt} = -\tfrac12\beta_t\Big[\frac{\hat x_0 - x}{\sigma_t^2}
                        - \frac{y - x}{\bar\sigma_t^2}\Big],

    the score of :math:`p(x_t \mid x_0 = \hat x_0)` less Doob's
    :math:`\nabla\log p(y \mid x_t)`, as DDBM's ``to_d`` writes it.  A step to
    :math:`t = 0` is an Euler step; a step from :math:`t = 1`, where the drift is
    :math:`0/0`, is a posterior step (:func:`bridge_posterior`).  Departures of the official
    code (``ddbm/karras_diffusion.py``): it starts at :math:`\sigma_{\max} - 10^{-4}` with
    :math:`x = x_T`, and alternates Euler–Maruyama steps (``churn_step_ratio``) with the Heun
    steps.  On :math:`u = x - \kappa_t y` this is :func:`~diffcore.samplers.heun` when
    :math:`\kappa_t` is linear in :math:`t` (constant :math:`\beta`).  Order 2; two model
    calls per step.  Shapes as in :func:`bridge_posterior`.
    """
    ts, y, var, _ = _bridge_setup(x, ts, bridge, y)
    beta = bridge.beta(ts).tolist()
    total = float(bridge.forward_var(1.0))

    def drift(x, x0, i):
        return (x0 - x) / var[i] - (y - x) / (total - var[i])  # times -beta/2: the velocity

    def update(k, x):
        x0, dt, i = k.D(x), k.s.t - k.t.t, k.i
        if k.t.sigma == 0:  # from x_t = y: the posterior step
            return _posterior_draw(k, x, x0, var)
        u = drift(x, x0, i).mul_(-0.5 * beta[i])
        x_euler = torch.add(x, u, alpha=dt)
        if k.s.sigma == 0:
            return x_euler
        u_s = drift(x_euler, k.D(x_euler, k.s), i + 1).mul_(-0.5 * beta[i + 1])
        return torch.add(x, u.add_(u_s), alpha=dt / 2)

    return integrate(update, bind(model, y), x, ts, bridge, **run)
