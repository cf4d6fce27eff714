r"""Forward processes :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, with :math:`t \in [0, 1]`.

Every process gives :math:`\alpha_t`, :math:`\sigma_t`, their time derivatives, the log-SNR
:math:`\lambda_t = \log(\alpha_t / \sigma_t)` and its inverse, and the coefficients of the
linear SDE :math:`dx = f(t)\,x\,dt + g(t)\,dw` whose marginals they are:

.. math::
    f(t) = \frac{\dot\alpha_t}{\alpha_t}, \qquad
    g^2(t) = \frac{d\sigma_t^2}{dt} - 2 f(t)\,\sigma_t^2 = -2\,\sigma_t^2\,\dot\lambda_t .

A subclass writes :meth:`~Process.alpha`, :meth:`~Process.sigma`, :meth:`~Process.d_alpha`,
:meth:`~Process.d_sigma` and :meth:`~Process.t_of_lam`; everything else follows from them.  All methods act elementwise on ``t``
(a float or a tensor of any shape) and return a tensor of the shape of ``t``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffcore.checks import (
    Deferred,
    as_time,
    between,
    count,
    float_dtype,
    per_sample,
    positive,
    same_shape,
    sizes,
)

__all__ = [
    "Process",
    "check_process",
    "VP",
    "VPCosine",
    "VE",
    "Linear",
    "Discrete",
    "ddpm_betas",
    "alphas_cumprod",
    "PROCESSES",
]


def _transition_times(first, second) -> Tensor:
    """The two times of a transition as a float64 tensor ``(2,)``, checked to lie in [0, 1]."""
    return as_time(torch.tensor([float(first), float(second)], dtype=torch.float64), name="t")


class Process:
    """The law of :math:`x_t` given :math:`x_0`: :math:`\\mathcal N(\\alpha_t x_0, \\sigma_t^2 I)`."""

    def alpha(self, t) -> Tensor:
        """Signal scale :math:`\\alpha_t`; same shape as ``t``."""
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        """Noise scale :math:`\\sigma_t`; same shape as ``t``."""
        raise NotImplementedError

    def d_alpha(self, t) -> Tensor:
        """Time derivative :math:`\\dot\\alpha_t`; same shape as ``t``."""
        raise NotImplementedError

    def d_sigma(self, t) -> Tensor:
        """Time derivative :math:`\\dot\\sigma_t`; same shape as ``t``."""
        raise NotImplementedError

    def t_of_lam(self, lam) -> Tensor:
        """The time at which the log-SNR equals ``lam`` (inverse of :meth:`lam`)."""
        raise NotImplementedError

    def lam(self, t) -> Tensor:
        """Log signal-to-noise ratio :math:`\\lambda_t = \\log\\alpha_t - \\log\\sigma_t`, decreasing."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def snr(self, t) -> Tensor:
        """Signal-to-noise ratio :math:`\\alpha_t^2 / \\sigma_t^2`."""
        return torch.exp(2 * self.lam(t))

    def f(self, t) -> Tensor:
        """Drift coefficient :math:`f(t) = \\dot\\alpha_t / \\alpha_t` of the forward SDE."""
        return self.d_alpha(t) / self.alpha(t)

    def g2(self, t) -> Tensor:
        """Squared diffusion coefficient :math:`g^2(t) = 2\\sigma_t\\dot\\sigma_t - 2 f(t)\\sigma_t^2`."""
        sigma = self.sigma(t)
        return 2 * sigma * self.d_sigma(t) - 2 * self.f(t) * sigma**2

    def marginal(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """Sample of :math:`x_t` given :math:`x_0`: ``alpha_t * x0 + sigma_t * noise``.

        ``x0`` and ``noise`` must be finite float32 or float64 tensors (an integer ``x0`` would
        take ``t`` in integers).  Shapes: ``x0`` and ``noise`` are ``(batch, ...)``; ``t`` is a
        float, ``()`` or ``(batch,)``; returns ``(batch, ...)``.
        """
        check = Deferred()
        check.finite(x0, "x0")
        check.finite(noise, "noise")
        same_shape(x0, noise, "x0", "noise")
        t = check.time(t, like=x0)
        check.done()
        return per_sample(self.alpha(t), x0) * x0 + per_sample(self.sigma(t), x0) * noise

    def ddim_step(self, x: Tensor, x0: Tensor, t: float, s: float, eta=0.0, z=None) -> Tensor:
        r"""The DDIM transition from time ``t`` down to ``s < t``: :math:`x_s = \alpha_s\hat x_0 +
        \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon + c z`, :math:`\hat\varepsilon = (x - \alpha_t
        \hat x_0)/\sigma_t`, :math:`c = \eta\,\sigma_s\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}}`
        (``eta = 1``: DDPM's ancestral step, with ``z`` standard normal noise).  The one
        implementation, :func:`diffcore.stepping.ddim_step`, is the step of the samplers and the
        inverse solvers.  Shapes: ``x``, ``x0``, ``z`` ``(batch, ...)``; ``t``, ``s`` floats.
        """
        from diffcore.stepping import ddim_step, grid_points

        if not float(s) < float(t):
            raise ValueError(f"ddim_step goes down from t to s < t, got t = {t}, s = {s}")
        at_t, at_s = grid_points(self, _transition_times(t, s), x)
        return ddim_step(x, x0, at_t, at_s, eta, z)

    def noising_step(self, x: Tensor, s: float, t: float, z: Tensor) -> Tensor:
        r"""The forward transition from time ``s`` up to ``t >= s``: a draw of
        :math:`q(x_t \mid x_s)`, :math:`(\alpha_t/\alpha_s)x_s + \sigma_t\sqrt{1 -
        e^{-2(\lambda_s - \lambda_t)}}\,z` (:func:`diffcore.stepping.noising_step`).  Shapes:
        ``x``, ``z`` ``(batch, ...)``; ``s``, ``t`` floats.
        """
        from diffcore.stepping import grid_points, noising_step

        if not float(s) <= float(t):
            raise ValueError(f"noising_step goes up from s to t >= s, got s = {s}, t = {t}")
        at_s, at_t = grid_points(self, _transition_times(s, t), x)
        return noising_step(x, at_s, at_t, z)

    def prior_sample(self, shape, t=1.0, generator=None, dtype=None, device=None) -> Tensor:
        """Start noise for a sampler that begins at time ``t``: :math:`\\sigma_t\\,\\varepsilon`.

        This is the law of :math:`x_t` with the signal part :math:`\\alpha_t x_0` dropped, exact
        for :class:`Linear` at ``t = 1`` and accurate when :math:`\\alpha_t \\ll \\sigma_t`.
        Shapes: ``shape`` is an integer or a tuple of positive integers; returns a tensor of
        that shape, of ``dtype`` (float32 or float64; None: the default dtype).
        """
        shape = sizes(shape, "shape")
        dtype = float_dtype(dtype)
        t = as_time(t, like=torch.empty((), dtype=dtype, device=device))
        if t.ndim:
            raise ValueError(f"prior_sample takes one time, got t of shape {tuple(t.shape)}")
        noise = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return self.sigma(t) * noise

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _as_tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else value.to(torch.get_default_dtype())
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


def check_process(process, name: str = "process") -> Process:
    """``process`` checked to be a :class:`Process` (``TypeError`` naming it otherwise)."""
    if not isinstance(process, Process):
        raise TypeError(f"{name} must be a diffcore Process, got {type(process).__name__}")
    return process


class VP(Process):
    r"""Variance preserving process with a linear :math:`\beta(t)` (DDPM in continuous time).

    :math:`\beta(t) = \beta_{\min} + t(\beta_{\max} - \beta_{\min})`,
    :math:`\alpha_t = \exp(-\tfrac12\int_0^t \beta)`, :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = positive(beta_min, "beta_min")
        self.beta_max = positive(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"need beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}"
            )

    def beta(self, t) -> Tensor:
        """:math:`\\beta(t)`, which here equals :math:`g^2(t) = -2 f(t)`."""
        t = as_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def g2(self, t) -> Tensor:
        return self.beta(t)

    def _int_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t) -> Tensor:
        return torch.exp(-0.5 * self._int_beta(as_time(t)))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._int_beta(as_time(t))))

    def d_alpha(self, t) -> Tensor:
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t) -> Tensor:
        return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def t_of_lam(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        int_beta = torch.nn.functional.softplus(-2 * lam)  # -log(alpha^2) at this log-SNR
        delta = self.beta_max - self.beta_min
        return 2 * int_beta / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * delta * int_beta))


class VPCosine(Process):
    r"""Variance preserving process with the cosine schedule of Nichol & Dhariwal.

    :math:`\alpha_t = \cos(\theta_t) / \cos(\theta_0)` with
    :math:`\theta_t = \tfrac{\pi}{2}\,(t\,t_{\text{end}} + s)/(1 + s)`, and
    :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`.  The schedule's own time runs to
    :math:`t_{\text{end}}` as in DPM-Solver: at its end point 1, :math:`\alpha` vanishes and the
    log-SNR and :math:`f` diverge, while at 0.9946, :math:`\lambda_1 \approx -4.8`, close to
    the :math:`-5.0` of ``VP()``.
    """

    def __init__(self, s: float = 0.008, t_end: float = 0.9946):
        self.s = positive(s, "s")
        self.t_end = between(t_end, "t_end", 0, 1, open_low=True)
        self._theta0 = 0.5 * math.pi * self.s / (1 + self.s)
        self._d_theta = 0.5 * math.pi * self.t_end / (1 + self.s)

    def _theta(self, t: Tensor) -> Tensor:
        return self._theta0 + self._d_theta * t

    def alpha(self, t) -> Tensor:
        return torch.cos(self._theta(as_time(t))) / math.cos(self._theta0)

    def sigma(self, t) -> Tensor:
        return torch.sqrt(1 - self.alpha(t) ** 2)

    def d_alpha(self, t) -> Tensor:
        return -self._d_theta * torch.sin(self._theta(as_time(t))) / math.cos(self._theta0)

    def d_sigma(self, t) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def g2(self, t) -> Tensor:
        return -2 * self.f(t)  # variance preserving; finite at t = 0, where d_sigma is not

    def t_of_lam(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        alpha = torch.sqrt(torch.sigmoid(2 * lam))  # alpha^2 = snr / (1 + snr)
        theta = torch.arccos(alpha * math.cos(self._theta0))
        return (theta - self._theta0) / self._d_theta


class VE(Process):
    r"""Variance exploding process: :math:`\alpha_t = 1`, :math:`\sigma_t = \sigma_{\min}(\sigma_{\max}/\sigma_{\min})^t`.

    With the Karras time grid and Heun's method this is EDM.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = positive(sigma_min, "sigma_min")
        self.sigma_max = positive(sigma_max, "sigma_max")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"need sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t) -> Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t) -> Tensor:
        return self.sigma_min * torch.exp(self._log_ratio * as_time(t))

    def d_alpha(self, t) -> Tensor:
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t) -> Tensor:
        return self._log_ratio * self.sigma(t)

    def t_of_lam(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        return (-lam - math.log(self.sigma_min)) / self._log_ratio


class Linear(Process):
    r"""The straight path of rectified flow and flow matching: :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t`."""

    def alpha(self, t) -> Tensor:
        return 1 - as_time(t)

    def sigma(self, t) -> Tensor:
        return as_time(t).clone()

    def d_alpha(self, t) -> Tensor:
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t) -> Tensor:
        return torch.ones_like(as_time(t))

    def t_of_lam(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        return torch.sigmoid(-lam)


def ddpm_betas(n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The linear DDPM schedule of Ho et al. (2020): ``betas``, shape ``(n_steps,)``, float64."""
    n_steps = count(n_steps, "n_steps")
    beta_start = between(beta_start, "beta_start", 0, 1, open_low=True, open_high=True)
    beta_end = between(beta_end, "beta_end", 0, 1, open_low=True, open_high=True)
    if not beta_start <= beta_end:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """``alphas_cumprod[n] = prod_{i <= n} (1 - betas[i])``, the :math:`\\bar\\alpha_n` of DDPM.

    Shapes: ``betas`` is ``(N,)``; returns ``(N,)``.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be a 1-D tensor, got betas of shape {tuple(betas.shape)}")
    bad = ~((betas > 0) & (betas < 1))  # True for NaN
    if bool(bad.any()):
        raise ValueError(
            f"betas must be a 1-D tensor with entries in (0, 1), got betas[{int(bad.nonzero()[0])}]"
            f" = {float(betas[bad][0])}"
        )
    return torch.cumprod(1 - betas, dim=0)


class Discrete(Process):
    r"""A discrete DDPM schedule ``alphas_cumprod[n]`` placed on continuous time.

    Step ``n`` (``0 <= n < N``) sits at :math:`t_n = (n + 1)/N` with
    :math:`\alpha_{t_n}^2 = \bar\alpha_n`, and :math:`\log\alpha_t` is linear between steps
    (with :math:`\alpha_0 = 1`), as in DPM-Solver's discrete-time wrapper.  A network trained
    on integer steps is evaluated at the fractional step :meth:`step_of_t`.  For the linear
    betas of DDPM, this process is close to ``VP(0.1, 20)``.
    """

    def __init__(self, alphas_cumprod: Tensor):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ab.shape)}"
            )
        bad = ~((ab > 0) & (ab < 1))  # True for NaN
        bad[1:] |= ~(ab[1:] < ab[:-1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"alphas_cumprod must lie in (0, 1) and decrease strictly, got "
                f"alphas_cumprod[{i}] = {float(ab[i])}"
                + (f" after alphas_cumprod[{i - 1}] = {float(ab[i - 1])}" if i else "")
            )
        n = ab.numel()
        self.n_steps = n
        self._t = torch.arange(n + 1, dtype=torch.float64) / n
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ab)])

    def _piece(self, t: Tensor):
        knots = self._t.to(t)
        i = torch.clamp(
            torch.searchsorted(knots, t.detach().contiguous(), right=True) - 1, 0, self.n_steps - 1
        )
        log_a = self._log_alpha.to(t)
        slope = (log_a[i + 1] - log_a[i]) * self.n_steps
        return log_a[i] + slope * (t - knots[i]), slope

    def alpha(self, t) -> Tensor:
        return torch.exp(self._piece(as_time(t))[0])

    def sigma(self, t) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self._piece(as_time(t))[0]))

    def d_alpha(self, t) -> Tensor:
        log_alpha, slope = self._piece(as_time(t))
        return slope * torch.exp(log_alpha)

    def d_sigma(self, t) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def g2(self, t) -> Tensor:
        return -2 * self.f(t)  # variance preserving; finite at t = 0, where d_sigma is not

    def t_of_lam(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        # log alpha decreases in t: search on its negation, then interpolate within the piece
        neg = -self._log_alpha.to(log_alpha)
        i = torch.clamp(torch.searchsorted(neg, -log_alpha.contiguous()) - 1, 0, self.n_steps - 1)
        frac = (-log_alpha - neg[i]) / (neg[i + 1] - neg[i])
        return (i + frac) / self.n_steps

    def step_of_t(self, t) -> Tensor:
        """The (fractional) DDPM step index at time ``t``: :math:`N t - 1`."""
        return self.n_steps * as_time(t) - 1

    def __repr__(self) -> str:
        return f"Discrete(n_steps={self.n_steps})"


#: The four continuous processes by name.
PROCESSES = {"vp": VP, "vp_cosine": VPCosine, "ve": VE, "linear": Linear}
