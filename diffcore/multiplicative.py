r"""Multiplicative diffusion on positive data: geometric Brownian motion ("Dale meets Langevin").

The forward process is geometric Brownian motion (GBM), elementwise on data :math:`x > 0`:

.. math:: dx = \mu\,x\,dt + \sigma\,x\,dw, \qquad t \in [0, 1].

**Change of variables.**  With :math:`y = \log x`, Itô's formula gives an additive diffusion
with constant coefficients,

.. math:: dy = m\,dt + \sigma\,dw, \qquad m = \mu - \tfrac12\sigma^2,

so :math:`\log x_t = \log x_0 + m t + \sigma w_t` and the marginal given :math:`x_0` is
log-normal, :math:`\log x_t \sim \mathcal N(\log x_0 + m t, \sigma^2 t)`.  The centred log
:math:`y_t - m t` is Brownian motion, the process :math:`\alpha_t = 1`,
:math:`\sigma_t = \sigma\sqrt t` (:class:`LogBrownian`): a variance-exploding process with
:math:`f = 0` and :math:`g^2 = \sigma^2`, but not diffcore's :class:`~diffcore.processes.VE`,
whose :math:`\sigma_t` grows geometrically in :math:`t`.

**The multiplicative score.**  The score that positive data call for (Hyvärinen, 2007, for
non-negative data) is :math:`x \odot \nabla_x \log p_t(x)`.  It is the log-space score less
one: with :math:`q_t(y) = p_t(e^y)\,e^y` the density of :math:`y = \log x`,

.. math:: \nabla_y \log q_t(y) = x \odot \nabla_x \log p_t(x) + 1 .

**Reverse time.**  The reverse SDE in log space, :math:`dy = [m - \sigma^2\nabla_y\log q_t]dt +
\sigma\,d\bar w`, taken by Euler–Maruyama in :math:`y` and mapped back, is a *multiplicative*
update (:func:`multiplicative_step`), which keeps every coordinate positive; the same reverse
SDE taken by Euler–Maruyama in :math:`x` (:func:`additive_step`) does not.

Shapes: data ``(batch, ...)``; a time is a float, a 0-d tensor, one per sample ``(batch,)``, or
a tensor that broadcasts against the data (one value per sample, or one for all).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffcore.checks import (
    as_time,
    finite,
    nonnegative,
    per_sample,
    positive,
    real,
    returned,
    returned_shape,
    same_shape,
    time_grid,
)
from diffcore.processes import Process
from diffcore.stepping import integrate

__all__ = [
    "LogBrownian",
    "GBM",
    "check_positive",
    "fokker_planck_residual",
    "multiplicative_dsm_loss",
    "multiplicative_step",
    "additive_step",
    "multiplicative_sampler",
]


def check_positive(x, name: str = "x") -> Tensor:
    """``x`` checked to be a finite float32 or float64 tensor with every entry ``> 0``.

    Raises ``TypeError`` (not a float tensor) or ``ValueError`` naming the first entry
    that is not positive.  Shapes: any; returns ``x``.
    """
    finite(x, name)
    if x.is_complex():
        raise TypeError(f"{name} must be a real tensor, got {name} of dtype {x.dtype}")
    bad = x <= 0
    if x.numel() and bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0]) if x.ndim else ()
        where = f"{name}[{', '.join(map(str, first))}]" if x.ndim else name
        raise ValueError(
            f"{name} must be positive (multiplicative diffusion acts on positive data), got "
            f"{int(bad.sum())} of {x.numel()} entries <= 0 (the first: {where} = "
            f"{x[first].item() if x.ndim else x.item():.6g})"
        )
    return x


class LogBrownian(Process):
    r"""The centred log of GBM, :math:`\log x_t - m t = \log x_0 + \sigma w_t`: Brownian motion.

    :math:`\alpha_t = 1`, :math:`\sigma_t = \sigma\sqrt t`, so :math:`f = 0`, :math:`g^2 =
    \sigma^2` and :math:`\lambda_t = -\log(\sigma\sqrt t)`.  ``scale`` is :math:`\sigma > 0`.
    """

    def __init__(self, scale: float = 1.0):
        self.scale = positive(scale, "scale")

    def alpha(self, t) -> Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t) -> Tensor:
        return self.scale * torch.sqrt(as_time(t))

    def d_alpha(self, t) -> Tensor:
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t) -> Tensor:
        return 0.5 * self.scale / torch.sqrt(as_time(t))

    def t_of_lam(self, lam) -> Tensor:
        lam = lam if isinstance(lam, Tensor) else torch.as_tensor(lam)
        return torch.exp(-2 * lam) / self.scale**2


class GBM:
    r"""Geometric Brownian motion :math:`dx = \mu x\,dt + \sigma x\,dw` on positive data.

    ``mu`` is the real growth rate :math:`\mu`, ``sigma`` the volatility :math:`\sigma > 0`.
    ``log_drift`` is :math:`m = \mu - \sigma^2/2`, the drift of :math:`\log x_t`, and
    ``log_process`` the :class:`LogBrownian` of :math:`\log x_t - m t`.

    The laws below are those of :math:`x_t` when :math:`\log x_0 \sim \mathcal N(\ell,
    s^2)` elementwise (``loc`` :math:`\ell`, ``scale`` :math:`s \ge 0`; ``scale = 0``: the fixed
    start :math:`x_0 = e^\ell`): log-normal with

    .. math:: \log x_t \sim \mathcal N(\ell + m t,\; s^2 + \sigma^2 t).
    """

    def __init__(self, mu: float = 0.0, sigma: float = 1.0):
        self.mu = real(mu, "mu")
        self.sigma = positive(sigma, "sigma")
        self.log_drift = self.mu - 0.5 * self.sigma**2
        self.log_process = LogBrownian(self.sigma)

    def __repr__(self) -> str:
        return f"GBM(mu={self.mu!r}, sigma={self.sigma!r})"

    # -- the forward process ------------------------------------------------------------------
    def drift(self, x: Tensor) -> Tensor:
        r"""The drift :math:`\mu x`.  Shapes: ``x`` any; returns the same."""
        return self.mu * x

    def diffusion(self, x: Tensor) -> Tensor:
        r"""The diffusion coefficient :math:`\sigma x`.  Shapes: ``x`` any; returns the same."""
        return self.sigma * x

    def marginal(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        r"""A draw of :math:`x_t` given :math:`x_0`: :math:`x_0\exp(m t + \sigma\sqrt t\,
        \varepsilon)` with ``noise`` :math:`\varepsilon`.  Shapes: ``x0``, ``noise``
        ``(batch, ...)``; ``t`` a float or per sample; returns ``(batch, ...)``."""
        check_positive(x0, "x0")
        finite(noise, "noise")
        same_shape(x0, noise, "x0", "noise")
        t = per_sample(as_time(t, like=x0), x0)
        return x0 * torch.exp(self.log_drift * t + self.sigma * torch.sqrt(t) * noise)

    def mean(self, x0: Tensor, t) -> Tensor:
        r""":math:`\mathbb E[x_t \mid x_0] = x_0 e^{\mu t}`.  Shapes: ``x0`` ``(batch, ...)``."""
        check_positive(x0, "x0")
        t = per_sample(as_time(t, like=x0), x0)
        return x0 * torch.exp(self.mu * t)

    def variance(self, x0: Tensor, t) -> Tensor:
        r""":math:`\operatorname{Var}[x_t \mid x_0] = x_0^2 e^{2\mu t}(e^{\sigma^2 t} - 1)`.
        Shapes: ``x0`` ``(batch, ...)``; returns the same."""
        check_positive(x0, "x0")
        t = per_sample(as_time(t, like=x0), x0)
        return x0**2 * torch.exp(2 * self.mu * t) * torch.expm1(self.sigma**2 * t)

    def log_normal(self, t, loc, scale=0.0, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""The parameters :math:`(\ell + m t, \sqrt{s^2 + \sigma^2 t})` of :math:`\log x_t`.

        ``loc`` a float or a tensor, ``scale`` :math:`s \ge 0` a float; ``like`` the data the
        time broadcasts against.  Shapes: broadcast of ``t`` (per sample) and ``loc``.
        """
        if not isinstance(loc, Tensor):
            loc = real(loc, "loc")
        else:
            finite(loc, "loc")
        scale = nonnegative(scale, "scale")
        t = as_time(t, like=like)
        if like is not None:
            t = per_sample(t, like)
        return loc + self.log_drift * t, torch.sqrt(scale**2 + self.sigma**2 * t)

    def log_prob(self, x: Tensor, t, loc, scale=0.0) -> Tensor:
        r"""The log-normal log-density of :math:`x_t`, elementwise:

        .. math:: \log p_t(x) = -\log x - \log(b_t\sqrt{2\pi}) - \frac{(\log x - a_t)^2}{2b_t^2},

        :math:`(a_t, b_t)` from :meth:`log_normal`.  The coordinates are independent: the joint
        log-density is the sum over them.  Shapes: ``x`` ``(batch, ...)``; returns the same.
        """
        check_positive(x, "x")
        a, b = self.log_normal(t, loc, scale, like=x)
        y = torch.log(x)
        return -y - torch.log(b) - 0.5 * math.log(2 * math.pi) - 0.5 * ((y - a) / b) ** 2

    def score(self, x: Tensor, t, loc, scale=0.0) -> Tensor:
        r"""The multiplicative (Hyvärinen) score of the log-normal marginal, in closed form:

        .. math:: x \odot \nabla_x \log p_t(x) = -1 - \frac{\log x - a_t}{b_t^2}.

        Add 1 for the log-space score :math:`\nabla_y \log q_t(y)`.  Shapes: ``x``
        ``(batch, ...)``; returns the same.
        """
        check_positive(x, "x")
        a, b = self.log_normal(t, loc, scale, like=x)
        return -1 - (torch.log(x) - a) / b**2


def fokker_planck_residual(gbm: GBM, log_p: Callable, x: Tensor, t: Tensor) -> Tensor:
    r"""The Fokker–Planck residual of GBM for an elementwise log-density, by autograd.

    For each coordinate, with :math:`\ell = \log p_t(x)` and primes in :math:`x`,

    .. math::
        \begin{aligned}
        &\frac1p\Big[\partial_t p + \partial_x(\mu x p) - \tfrac12\partial_x^2(\sigma^2x^2p)\Big]
        \\
        &\quad = \partial_t\ell + \mu(1 + x\ell') - \tfrac{\sigma^2}2\big(2 + 4x\ell'
          + x^2(\ell'^2 + \ell'')\big),
        \end{aligned}

    zero where :math:`p` is the GBM marginal.  ``log_p(x, t)`` returns the log-density of
    each coordinate (coordinate :math:`j` a function of :math:`x_j` alone).  Shapes: ``x`` and
    ``t`` the same shape; returns it.
    """
    check_positive(x, "x")
    finite(t, "t")
    same_shape(x, t, "x", "t")
    x = x.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    ell = returned(log_p(x, t), x, "log_p(x, t)")
    d_x, d_t = torch.autograd.grad(ell.sum(), (x, t), create_graph=True)
    (d_xx,) = torch.autograd.grad(d_x.sum(), x)
    mu, s2 = gbm.mu, gbm.sigma**2
    out = d_t + mu * (1 + x * d_x) - 0.5 * s2 * (2 + 4 * x * d_x + x**2 * (d_x**2 + d_xx))
    return out.detach()


def multiplicative_dsm_loss(
    model: Callable,
    x0: Tensor,
    gbm: GBM,
    *,
    t_sampler: Callable | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Multiplicative denoising score matching: regress the multiplicative score.

    Per sample :math:`t \sim` ``t_sampler`` (default uniform on :math:`[10^{-3}, 1)`),
    :math:`\varepsilon \sim \mathcal N(0, I)`, :math:`x_t = x_0 e^{m t + \sigma\sqrt t
    \varepsilon}`, and the conditional target

    .. math::
        x_t\odot\nabla_x\log p(x_t \mid x_0) = -1 - \frac{\varepsilon}{\sigma\sqrt t},

    .. math::
        \begin{aligned}
        L &= \mathbb E\,\tfrac12\sigma^2 t\,\Big\lVert s_\theta(x_t, t) + 1 +
            \frac{\varepsilon}{\sigma\sqrt t}\Big\rVert^2 \\
          &= \mathbb E\,\tfrac12\big\lVert\sigma\sqrt t\,(s_\theta + 1) + \varepsilon\big\rVert^2,
        \end{aligned}

    the weight :math:`\sigma^2 t` (the log-space :math:`\sigma_t^2`, as in
    :func:`diffcore.train.dsm_loss`).  Its minimiser is :math:`x\odot\nabla_x\log p_t(x)`.
    ``model(x_t, t)`` takes ``t`` of shape ``(batch,)``.  Shapes: ``x0`` ``(batch, ...)``
    positive; returns a scalar (the batch mean of the per-sample loss).
    """
    check_positive(x0, "x0")
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be (batch, ...) with batch >= 1, got shape {tuple(x0.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if t_sampler is None:
        from diffcore.train import uniform_time

        t_sampler = uniform_time(1e-3, 1.0)
    n = x0.shape[0]
    t = returned_shape(t_sampler(n, generator), (n,), "t_sampler")
    t = as_time(t, like=x0, name="t_sampler's times")
    device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
    eps = eps.to(x0.device)
    x_t = gbm.marginal(x0, t, eps)
    pred = returned(model(x_t, t), x0, "model")
    root_v = gbm.sigma * torch.sqrt(per_sample(t, x0))
    return 0.5 * ((root_v * (pred + 1) + eps) ** 2).flatten(1).sum(1).mean()


def _step_sizes(gbm: GBM, t: float, s: float) -> tuple[float, float]:
    t, s = float(t), float(s)
    if not 0 <= s < t <= 1:
        raise ValueError(
            f"a reverse step goes from t down to s, 0 <= s < t <= 1, got t = {t}, s = {s}"
        )
    return s - t, gbm.sigma * math.sqrt(t - s)


def multiplicative_step(
    x: Tensor, score: Tensor, gbm: GBM, t: float, s: float, z: Tensor
) -> Tensor:
    r"""One reverse step from ``t`` down to ``s``, Euler–Maruyama in :math:`\log x`:

    .. math::
        x_s = x_t \odot \exp\!\big(\Delta t\,[m - \sigma^2(\hat s + 1)] + \sigma\sqrt{-\Delta t}\,
        z\big), \qquad \Delta t = s - t < 0,

    with ``score`` :math:`\hat s \approx x_t\odot\nabla\log p_t(x_t)`: an exponentiated
    (multiplicative) update, positive whatever ``z``.  Shapes: ``x``, ``score``, ``z``
    ``(batch, ...)``; returns the same.
    """
    dt, root = _step_sizes(gbm, t, s)
    return x * torch.exp(dt * (gbm.log_drift - gbm.sigma**2 * (score + 1)) + root * z)


def additive_step(x: Tensor, score: Tensor, gbm: GBM, t: float, s: float, z: Tensor) -> Tensor:
    r"""The same reverse SDE by Euler–Maruyama in :math:`x` itself, for comparison.

    The reverse of :math:`dx = \mu x\,dt + \sigma x\,dw` is :math:`dx = [\mu x - \partial_x
    (\sigma^2x^2) - \sigma^2x^2\partial_x\log p_t]dt + \sigma x\,d\bar w`, so

    .. math::
        x_s = x_t + \Delta t\,x_t\,(\mu - 2\sigma^2 - \sigma^2\hat s) + \sigma x_t\sqrt{-\Delta t}\,z,

    an additive step that leaves the positive half-line when :math:`z` is very negative.
    Shapes: ``x``, ``score``, ``z`` ``(batch, ...)``; returns the same.
    """
    dt, root = _step_sizes(gbm, t, s)
    return x + dt * x * (gbm.mu - 2 * gbm.sigma**2 - gbm.sigma**2 * score) + root * x * z


def multiplicative_sampler(score: Callable, x: Tensor, ts, gbm: GBM, **run) -> Tensor:
    r"""The reverse-time multiplicative sampler: :func:`multiplicative_step` over ``ts``.

    ``score(x, t)`` is the multiplicative score :math:`x\odot\nabla\log p_t(x)`; ``x`` the
    positive start at ``ts[0]``; ``ts`` decreasing in :math:`[0, 1]`.  The step reports as
    ``step.denoised`` the log-space Tweedie estimate :math:`\exp\mathbb E[\log x_0 \mid x_t] =
    x_t\exp(-m t + \sigma^2 t(\hat s + 1))`.  Options of :func:`diffcore.stepping.integrate`
    (``generator``, ``noise_sampler``, ``callback``, ...).  Every state stays positive.
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    check_positive(x, "x")
    ts = time_grid(ts)
    m, s2 = gbm.log_drift, gbm.sigma**2

    def update(k, x):
        s_hat = k.D(x)
        k.denoised = x * torch.exp(-m * k.t.t + s2 * k.t.t * (s_hat + 1))
        return multiplicative_step(x, s_hat, gbm, k.t.t, k.s.t, k.noise())

    return integrate(update, score, x, ts, gbm.log_process, **run)
