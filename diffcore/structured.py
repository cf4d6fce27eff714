r"""Structured noise: noise whose mean follows a segmentation (SAM-DiffSR), and noise made of
deformations (DRDM).

**1. Structure-modulated noise (SAM-DiffSR, Wang et al., 2024).**  A segmentation of the clean
image (by SAM in the paper) is encoded into a *mean map* :math:`m`, one constant per segment
(:func:`encode_segments`), and added to the noise of the forward process:

.. math::
    \tilde x_t = \alpha_t x_0 + \sigma_t(\varepsilon + c_t m),
    \qquad \varepsilon \sim \mathcal N(0, I),

and the network regresses the modulated noise :math:`\varepsilon + c_t m`
(:func:`modulated_noise_loss`).

*(a) The marginals.*  Given :math:`x_0` (and its map :math:`m`), :math:`\tilde x_t` is Gaussian
with mean :math:`\alpha_t x_0 + \sigma_t c_t m` and covariance :math:`\sigma_t^2 I`: the mean
moves by :math:`\sigma_t c_t m`, the covariance does not change.  For mixture data whose
component :math:`k` carries the map :math:`m_k`, the marginal is the mixture with means
:math:`\alpha_t\mu_k + \sigma_t c_t m_k` and the usual covariances :math:`\alpha_t^2\Sigma_k +
\sigma_t^2 I` (:class:`ModulatedMixture`, exact).  At :math:`t = 1` (VP) the law is
:math:`\approx\mathcal N(c_1 m, I)`, not :math:`\mathcal N(0, I)`.

*(b) The reverse process.*  The minimiser of the regression is
:math:`\hat\varepsilon = \mathbb E[\varepsilon + c_t m \mid \tilde x_t]`; since
:math:`x_0 = (\tilde x_t - \sigma_t(\varepsilon + c_t m))/\alpha_t` holds sample by sample, the
*standard* conversion gives the exact posterior mean of the modulated process,

.. math::
    \frac{\tilde x_t - \sigma_t\hat\varepsilon}{\alpha_t}
    = \mathbb E[x_0 \mid \tilde x_t].

The velocity of the interpolation :math:`\tilde x_t = \alpha_t x_0 + \sigma_t\xi`,
:math:`\xi = \varepsilon + c_t m`, conditioned on :math:`\tilde x_t`, is

.. math::
    v = \dot\alpha_t \hat x_0 + \dot\sigma_t\hat\varepsilon
      + \sigma_t \dot c_t\,\mathbb E[m \mid \tilde x_t],

and it carries the modulated marginals (the continuity equation holds).  The PF-ODE that the
deterministic samplers integrate from :math:`\hat\varepsilon` (DDIM, Heun, DPM-Solver) is the
first two terms: *exact for a constant* :math:`c` (started from the modulated prior), off by
the last term when :math:`c_t` varies, as in the official code.  With one fixed map, DDIM is
even conjugate, step for step, to standard DDIM on :math:`y_t = \tilde x_t - \sigma_t c\,m`.
The stochastic samplers are not exact: the standard reverse SDE driven by
:math:`-\hat\varepsilon/\sigma_t` (which is *not* the score of the modulated marginals; it
differs by :math:`c_t\mathbb E[m\mid\tilde x_t]/\sigma_t`) has a drift too many,
:math:`(\dot\sigma_t - f\sigma_t)c\,m\,dt`; a DDPM step keeps :math:`e^{-h}` of the shift
instead of all of it.  And a sampler started at :math:`\mathcal N(0, I)` instead of the
modulated prior is off by the flow of :math:`-\sigma_1 c\,m`.

*The official code* (``models_sr/diffusion_sam.py``, ``data_gen/merge_mask_to_one.py``):
the map is built from a rotary position embedding (:func:`rope_map`) averaged over each SAM
mask; it multiplies the map by :math:`c_n = \sqrt{1 - \bar\alpha_n}\,\beta_n`
(``mask_coefficient``, :func:`ddpm_mask_coefficient`) before adding it to the noise, so the
shift of :math:`\tilde x_t` is :math:`\sigma_t c_t m` with a time-varying :math:`c_t` (for its
100-step cosine schedule: :math:`1.6\cdot10^{-5}` at the first step, median 0.02, and
:math:`\approx 1` at the last, where :math:`\beta` is clipped at 0.999); the diffusion runs
on the residual between the high-resolution image and the upsampled low-resolution one,
conditioned on features of the latter (here: on the data themselves); the loss is L1 (whose
minimiser is the conditional median, the mean only for symmetric posteriors); the network
never sees the mask (``cond_sam: False``), and sampling is the standard DDPM ancestral loop
from :math:`\mathcal N(0, I)`.  The paper writes :math:`\varepsilon + E` without the
coefficient.

**2. Deformation as noise (DRDM, Zheng et al., 2024).**  The state is an image warped by a
displacement field :math:`u` (pixels, channels (row, column)):
:math:`\operatorname{warp}(x, u)(p) = x(p + u(p))`, bilinear (:func:`warp`).  Warping by
:math:`u` and then by :math:`w` is warping by their composition

.. math:: (u \circ w)(p) = w(p) + u(p + w(p))

(:func:`compose`).  The forward process composes small random multi-scale fields :math:`u_1,
\dots, u_t` (:func:`random_field`, :func:`deformation_path`): :math:`x_t =
\operatorname{warp}(x_0, U_t)`, :math:`U_t = U_{t-1}\circ u_t`.  *Topology.*  If every entry of
the finite-difference gradient of a step is at most :math:`b < 1/2` in size, its Jacobian
determinant is at least :math:`1 - 2b > 0` (the bilinear interpolant's gradient is a convex
combination of the grid's differences) and :math:`\mathrm{id} + u` is invertible (a contraction
in the max norm with constant :math:`2b`).  After :math:`n` steps the composed field's gradient
bound obeys :math:`1 + 2B_n \le (1 + 2b)^n`, so :math:`\det J \ge 2 - (1 + 2b)^n`: no folding
at all while :math:`(1 + 2b)^n < 2`.  *Recovery.*  The network learns the field :math:`r` that
undoes the last step, :math:`r \circ u_t = 0` (:func:`recovery_loss`; the exact answer is the
inverse, :func:`inverse_field`), and the reverse process composes its predictions with the
current field and resamples the *original* image once (:func:`recover`).

*The official code* (``Diffusion/diffuser.py``, ``DRDM_train.py``): each draw is a sum over
control grids of Gaussian fields of std proportional to the grid spacing, upsampled
bilinearly (as here); its size is a fixed small ``v_scale`` (here: normalised to a gradient
bound :math:`b`, so that the guarantee above is explicit); the forward field at step :math:`t` is
*one* such field composed with itself :math:`\lfloor 2t^{1.3}/3\rfloor` times (a stationary
velocity, ``repeat=True`` here) plus a small perturbation, and the target is the inverse of
:math:`\lfloor t^{0.6}\rfloor` self-compositions; fields are drawn at twice the image size and
cropped, in units of the image size; the loss adds a normalised-correlation term and a penalty
on negative Jacobian determinants.  The paper reports a folding rate below 1%, not a bound.

Shapes: SAM-DiffSR data ``(batch, ...)``; DRDM images ``(batch, channels, H, W)`` and fields
``(batch, 2, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore.analytic import GaussianMixture
from diffcore.checks import (
    as_time,
    count,
    finite,
    floating,
    nonnegative,
    one_of,
    per_sample,
    positive,
    returned,
    returned_shape,
)
from diffcore.processes import Process

__all__ = [
    "rope_map",
    "encode_segments",
    "modulated_target",
    "modulated_marginal",
    "modulated_noise_loss",
    "ddpm_mask_coefficient",
    "ModulatedMixture",
    "warp",
    "compose",
    "jacobian_determinant",
    "gradient_bound",
    "folding_fraction",
    "affine_field",
    "inverse_field",
    "random_field",
    "DeformationPath",
    "deformation_path",
    "recovery_loss",
    "deformation_recovery_loss",
    "recover",
]


# =============================================================================================
# 1. SAM-DiffSR: structure-modulated noise
# =============================================================================================
def rope_map(height: int, width: int, *, dtype=None, device=None) -> Tensor:
    r"""The structural position map of SAM-DiffSR: a rotary embedding of an all-ones image.

    Rows are positions :math:`p`, columns features :math:`q`; with
    :math:`\theta_i = 10000^{-2i/W}` and :math:`i = \lfloor q/2 \rfloor`,

    .. math::
        E_{p, 2i} = \cos p\theta_i - \sin p\theta_i, \qquad
        E_{p, 2i+1} = \cos p\theta_i + \sin p\theta_i,

    and a last odd column is left at 1: ``RotaryEmbedding(dim=W).rotate_queries_or_keys`` of
    ``torch.ones(1, 1, H, W)``, as the official code builds it.  Shapes: returns ``(H, W)``.
    """
    height, width = count(height, "height"), count(width, "width")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    pairs = width // 2
    theta = 10000.0 ** (-torch.arange(0, 2 * pairs, 2, dtype=dtype, device=device) / width)
    angle = torch.arange(height, dtype=dtype, device=device)[:, None] * theta  # (H, pairs)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotated = torch.stack((cos - sin, cos + sin), dim=-1).reshape(height, 2 * pairs)
    rest = torch.ones(height, width - 2 * pairs, dtype=dtype, device=device)
    return torch.cat((rotated, rest), dim=1)


def encode_segments(segments: Tensor, *, dtype=None) -> Tensor:
    r"""Encode a segment map into the mean map :math:`m`: one constant per segment.

    ``segments`` holds an integer label per pixel (``-1``: in no segment).  Segment
    :math:`S` gets the image mean of the position map :math:`E` (:func:`rope_map`) over
    :math:`S`,

    .. math:: m_p = \frac{1}{HW}\sum_{q \in S} E_q \quad (p \in S),

    and unlabelled pixels get 0, as ``merge_all_mask_to_one_RoPE`` does.  Simplified: the
    segments here are disjoint (SAM's masks may overlap; the code lets a later mask overwrite
    an earlier one but averages each over its whole mask), and the map is neither cropped nor
    resized.  Shapes: ``segments`` ``(H, W)`` or ``(batch, H, W)`` integers; returns the same
    shape, float (``dtype``; None: the default).
    """
    if not isinstance(segments, Tensor):
        raise TypeError(f"segments must be an integer tensor, got {type(segments).__name__}")
    if segments.ndim not in (2, 3) or min(segments.shape, default=0) < 1:
        raise ValueError(
            f"segments must be a label map of shape (H, W) or (batch, H, W), got segments of "
            f"shape {tuple(segments.shape)}"
        )
    if segments.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"segments must hold integer labels, got dtype {segments.dtype}")
    labels = segments.long().reshape(-1, *segments.shape[-2:])
    if bool((labels < -1).any()):
        raise ValueError(f"segments must be labels >= -1, got segments.min() = {int(labels.min())}")
    batch, height, width = labels.shape
    E = rope_map(height, width, dtype=dtype, device=segments.device).reshape(-1)
    flat = labels.reshape(batch, -1)
    slot = flat + 1  # label -1 (no segment) goes to slot 0, which is dropped below
    sums = torch.zeros(batch, int(slot.max()) + 1, dtype=E.dtype, device=E.device)
    sums.scatter_add_(1, slot, E.expand(batch, -1).contiguous())
    sums[:, 0] = 0
    return (torch.gather(sums, 1, slot) / (height * width)).reshape(segments.shape)


def _scale_at(scale, t: Tensor, like: Tensor) -> Tensor:
    """The modulation :math:`c_t`: a number, a tensor per sample, or ``scale(t)``."""
    if callable(scale):
        c = scale(t)
        if not isinstance(c, Tensor):
            c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
        finite(c, "scale(t)")
        return per_sample(c.to(like), like, "scale(t)")
    if isinstance(scale, Tensor):
        finite(scale, "scale")
        if bool((scale < 0).any()):
            raise ValueError(f"scale must be >= 0, got scale.min() = {float(scale.min())}")
        return per_sample(scale.to(like), like, "scale")
    return torch.as_tensor(nonnegative(scale, "scale"), dtype=like.dtype, device=like.device)


def _mean_map(mean_map: Tensor, x: Tensor) -> Tensor:
    finite(mean_map, "mean_map")
    try:
        shape = torch.broadcast_shapes(mean_map.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"mean_map must broadcast to the data's shape {tuple(x.shape)}, got mean_map of shape "
            f"{tuple(mean_map.shape)} (give one map (...) for all, or one per sample, e.g. "
            f"(batch, 1, H, W) for images)"
        )
    return mean_map.to(x)


def modulated_target(noise: Tensor, mean_map: Tensor, scale=1.0, t=None) -> Tensor:
    r"""The regression target of SAM-DiffSR, the modulated noise :math:`\varepsilon + c_t m`.

    ``scale`` is :math:`c \ge 0`: a number, a per-sample tensor ``(batch,)`` or a function of
    the time ``scale(t)`` (then ``t`` is needed).  Shapes: ``noise`` ``(batch, ...)``,
    ``mean_map`` broadcastable to it; returns ``(batch, ...)``.
    """
    finite(noise, "noise")
    m = _mean_map(mean_map, noise)
    if callable(scale):
        if t is None:
            raise ValueError("a scale given as a function scale(t) needs the time t")
        t = as_time(t, like=noise)
    return noise + _scale_at(scale, t, noise) * m


def modulated_marginal(
    x0: Tensor, t, noise: Tensor, mean_map: Tensor, process: Process, scale=1.0
) -> Tensor:
    r"""A draw of the modulated forward process,

    .. math:: \tilde x_t = \alpha_t x_0 + \sigma_t(\varepsilon + c_t m),

    the standard :meth:`~diffcore.processes.Process.marginal` moved by :math:`\sigma_t c_t m`.
    ``scale`` as in :func:`modulated_target`.  Shapes: ``x0``, ``noise`` ``(batch, ...)``,
    ``mean_map`` broadcastable to them, ``t`` a float or ``(batch,)``; returns ``(batch, ...)``.
    """
    x_t = process.marginal(x0, t, noise)
    t = as_time(t, like=x0)
    sigma = per_sample(process.sigma(t), x0)
    return x_t + sigma * _scale_at(scale, t, x0) * _mean_map(mean_map, x0)


def modulated_noise_loss(
    model: Callable,
    x0: Tensor,
    mean_map: Tensor,
    process: Process,
    *,
    scale=1.0,
    t_sampler: Callable | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""SAM-DiffSR's training loss: regress the modulated noise (squared error).

    .. math::
        L = \mathbb E\,\big\lVert \hat\varepsilon_\theta(\tilde x_t, t)
            - (\varepsilon + c_t m)\big\rVert^2,

    :math:`t \sim` ``t_sampler`` (default uniform on :math:`[10^{-3}, 1)`), :math:`\tilde x_t`
    from :func:`modulated_marginal`.  Its minimiser is :math:`\mathbb E[\varepsilon + c_t m \mid
    \tilde x_t]` (:meth:`ModulatedMixture.eps`).  The official code takes the L1 norm.
    ``model(x, t)`` predicts noise and takes ``t`` of shape ``(batch,)``.  Shapes: ``x0``
    ``(batch, ...)``, ``mean_map`` broadcastable to it; returns a scalar (the batch mean).
    """
    finite(x0, "x0")
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be (batch, ...) with batch >= 1, got shape {tuple(x0.shape)}")
    if t_sampler is None:
        from diffcore.train import uniform_time

        t_sampler = uniform_time(1e-3, 1.0)
    n = x0.shape[0]
    t = as_time(returned_shape(t_sampler(n, generator), (n,), "t_sampler"), like=x0)
    device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
    x_t = modulated_marginal(x0, t, eps, mean_map, process, scale)
    target = modulated_target(eps, mean_map, scale, t)
    pred = returned(model(x_t, t), x0, "model")
    return ((pred - target) ** 2).flatten(1).sum(1).mean()


def ddpm_mask_coefficient(process: Process, t, n_steps: int) -> Tensor:
    r"""The official code's modulation :math:`c_n = \sqrt{1 - \bar\alpha_n}\,\beta_n`, on
    continuous time.

    With :math:`N` steps at :math:`t_n = (n + 1)/N` (as :class:`~diffcore.processes.Discrete`
    places them), :math:`\bar\alpha_n = \alpha_{t_n}^2` and :math:`\beta_n = 1 -
    \alpha_{t_n}^2/\alpha_{t_n - 1/N}^2`, so

    .. math:: c_t = \sigma_t\big(1 - \alpha_t^2/\alpha_{t - 1/N}^2\big)

    (:math:`t - 1/N` clipped at 0).  Shapes: ``t`` a float or a tensor; returns its shape.
    """
    n_steps = count(n_steps, "n_steps")
    as_time(t.detach() if isinstance(t, Tensor) else t)  # checked; t keeps its graph
    t = t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.get_default_dtype())
    before = torch.clamp(t - 1.0 / n_steps, min=0.0)
    beta = 1 - (process.alpha(t) / process.alpha(before)) ** 2
    return process.sigma(t) * beta


class ModulatedMixture:
    r"""Exact oracle of SAM-DiffSR's forward process on Gaussian-mixture data.

    Component :math:`k` of ``mixture`` (:class:`~diffcore.analytic.GaussianMixture`) carries
    the mean map :math:`m_k` (``mean_maps[k]``; the structure of the images it draws); with
    the modulation :math:`c_t` (``scale``: a number :math:`\ge 0` or a function ``scale(t)``),

    .. math::
        \tilde p_t = \sum_k w_k\,\mathcal N\big(\alpha_t\mu_k + \sigma_t c_t m_k,\;
        \alpha_t^2\Sigma_k + \sigma_t^2 I\big).

    Every method takes ``x`` ``(batch, ...)`` with ``d`` entries per sample and a time (a
    float or ``(batch,)``) and returns the shape of ``x`` (``log_prob``: ``(batch,)``).
    Shapes: ``mean_maps`` ``(K, ...)`` with ``d`` entries per component.
    """

    def __init__(self, mixture: GaussianMixture, mean_maps: Tensor, scale=1.0):
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        finite(floating(mean_maps, "mean_maps"), "mean_maps")
        k, d = mixture.n_components, mixture.dim
        if mean_maps.ndim < 1 or mean_maps.shape[0] != k or mean_maps[0].numel() != d:
            raise ValueError(
                f"mean_maps must have shape (K, ...) = ({k}, ...) with {d} entries per "
                f"component, got mean_maps of shape {tuple(mean_maps.shape)}"
            )
        if not callable(scale):
            scale = nonnegative(scale, "scale")
        self.mixture, self.scale = mixture, scale
        self.mean_maps = mean_maps.reshape(k, d).to(mixture.means.dtype)
        self._evals, self._evecs = torch.linalg.eigh(mixture.covs)

    def __repr__(self) -> str:
        scale = getattr(self.scale, "__name__", "scale(t)") if callable(self.scale) else self.scale
        return (
            f"ModulatedMixture(K={self.mixture.n_components}, d={self.mixture.dim}, scale={scale})"
        )

    # -- internals ---------------------------------------------------------------------------
    def _scale_of(self, t: Tensor) -> Tensor:
        c = self.scale(t)
        c = c if isinstance(c, Tensor) else torch.as_tensor(c, dtype=t.dtype, device=t.device)
        return finite(c.to(t), "scale(t)") * torch.ones_like(t)

    def _scale(self, t: Tensor) -> Tensor:
        """:math:`c_t`, differentiable in ``t``, shape of ``t``."""
        if not callable(self.scale):
            return torch.full_like(t, self.scale)
        return self._scale_of(t)

    def _rate(self, t: Tensor) -> Tensor:
        """:math:`\\dot c_t` by autograd (0 for a constant), shape of ``t``."""
        if not callable(self.scale):
            return torch.zeros_like(t)
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            (rate,) = torch.autograd.grad(self._scale_of(tt).sum(), tt, allow_unused=True)
        return torch.zeros_like(t) if rate is None else rate

    def _parts(self, x: Tensor, t, process: Process) -> dict:
        """Flat ``x``, the time coefficients (per sample, shaped to broadcast against
        ``(batch, K, d)``), the whitened residuals ``z`` of each component and their variances,
        and the posterior weights of the components."""
        mix = self.mixture
        floating(x, "x")
        if x.ndim < 2 or x[0].numel() != mix.dim:
            raise ValueError(
                f"x must have shape (batch, ...) with {mix.dim} entries per sample, got "
                f"{tuple(x.shape)}"
            )
        finite(x, "x")
        xf = x.reshape(x.shape[0], mix.dim)
        t = as_time(t, like=xf)
        c = self._scale(t)
        at3 = xf[:, None, :]

        def coef(value: Tensor) -> Tensor:
            return per_sample(value, at3)

        a, s = coef(process.alpha(t)), coef(process.sigma(t))
        means, maps = mix.means.to(xf), self.mean_maps.to(xf)
        evals, evecs = self._evals.to(xf), self._evecs.to(xf)
        z = torch.einsum("kji,bkj->bki", evecs, at3 - a * means - s * coef(c) * maps)
        var = a**2 * evals + s**2
        comp = -0.5 * ((z**2 / var).sum(-1) + torch.log(var).sum(-1))
        logits = torch.log(mix.weights.to(xf)) + comp
        # per-component posterior means of x0: mu_k + alpha Sigma_k (cov_t)^-1 (x - centre_k)
        x0_k = means + torch.einsum("kij,bkj->bki", evecs, a * evals / var * z)
        return dict(
            x=xf,
            t=t,
            z=z,
            var=var,
            evecs=evecs,
            logits=logits,
            weights=torch.softmax(logits, dim=-1),
            x0_k=x0_k,
            maps=maps,
        )

    # -- the exact quantities ----------------------------------------------------------------
    def shift(self, t, process: Process) -> Tensor:
        r"""The mean shift :math:`\sigma_t c_t m_k` of each component.

        Shapes: ``t`` a float or ``(batch,)``; returns ``(batch or 1, K, d)``."""
        t = as_time(t, like=self.mean_maps)
        return (process.sigma(t) * self._scale(t)).reshape(-1, 1, 1) * self.mean_maps

    def log_prob(self, x: Tensor, t, process: Process) -> Tensor:
        r"""Exact :math:`\log\tilde p_t(x)`, shape ``(batch,)``."""
        p = self._parts(x, t, process)
        return torch.logsumexp(p["logits"], dim=-1) - 0.5 * self.mixture.dim * math.log(2 * math.pi)

    def score(self, x: Tensor, t, process: Process) -> Tensor:
        r"""Exact score :math:`\nabla\log\tilde p_t(x)` of the modulated marginal."""
        p = self._parts(x, t, process)
        per = -torch.einsum("kij,bkj->bki", p["evecs"], p["z"] / p["var"])
        return torch.einsum("bk,bkd->bd", p["weights"], per).reshape(x.shape)

    def denoise(self, x: Tensor, t, process: Process) -> Tensor:
        r"""Exact :math:`\mathbb E[x_0 \mid \tilde x_t = x]`: per component
        :math:`\mu_k + \alpha_t\Sigma_k(\alpha_t^2\Sigma_k + \sigma_t^2 I)^{-1}(x - \alpha_t\mu_k -
        \sigma_t c_t m_k)`, weighted by the posterior of the component."""
        p = self._parts(x, t, process)
        return torch.einsum("bk,bkd->bd", p["weights"], p["x0_k"]).reshape(x.shape)

    def mean_map(self, x: Tensor, t, process: Process) -> Tensor:
        r"""Exact :math:`\mathbb E[m \mid \tilde x_t = x] = \sum_k p(k \mid x)\,m_k`."""
        p = self._parts(x, t, process)
        return (p["weights"] @ p["maps"]).reshape(x.shape)

    def eps(self, x: Tensor, t, process: Process) -> Tensor:
        r"""The exact minimiser of :func:`modulated_noise_loss`, :math:`\mathbb E[\varepsilon +
        c_t m \mid \tilde x_t = x] = (x - \alpha_t\,\mathbb E[x_0 \mid x])/\sigma_t`; needs
        :math:`\sigma_t > 0`."""
        p = self._parts(x, t, process)
        xf, tt = p["x"], p["t"]
        x0 = torch.einsum("bk,bkd->bd", p["weights"], p["x0_k"])
        a, s = per_sample(process.alpha(tt), xf), per_sample(process.sigma(tt), xf)
        return ((xf - a * x0) / s).reshape(x.shape)

    def velocity(self, x: Tensor, t, process: Process) -> Tensor:
        r"""The velocity that carries the modulated marginals,

        .. math::
            \begin{aligned}
            v &= \dot\alpha_t\,\mathbb E[x_0 \mid x]
                 + \dot\sigma_t\,\mathbb E[\varepsilon + c_t m \mid x] \\
              &\quad + \sigma_t\dot c_t\,\mathbb E[m \mid x],
            \end{aligned}

        the mean of :math:`\frac{d}{dt}(\alpha_t x_0 + \sigma_t(\varepsilon + c_t m))` given
        :math:`\tilde x_t = x`; the last term vanishes for a constant ``scale``.  Needs
        :math:`\sigma_t > 0`.
        """
        p = self._parts(x, t, process)
        xf, tt = p["x"], p["t"]
        x0 = torch.einsum("bk,bkd->bd", p["weights"], p["x0_k"])
        m = p["weights"] @ p["maps"]
        a, s = per_sample(process.alpha(tt), xf), per_sample(process.sigma(tt), xf)
        da, ds = per_sample(process.d_alpha(tt), xf), per_sample(process.d_sigma(tt), xf)
        eps = (xf - a * x0) / s
        return (da * x0 + ds * eps + s * per_sample(self._rate(tt), xf) * m).reshape(x.shape)

    def denoiser(self, process: Process) -> Callable:
        r"""The exact :math:`\mathbb E[x_0 \mid \tilde x_t = x]` as a model ``D(x, t)``: what a
        network trained on the modulated noise gives through the standard conversion, ready
        for any sampler of :mod:`diffcore.samplers`."""

        def modulated_denoiser(x: Tensor, t) -> Tensor:
            return self.denoise(x, t, process)

        return modulated_denoiser

    def sample(
        self, n: int, t, process: Process, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""``n`` draws of :math:`\tilde x_t` (each with its component's map), shape ``(n, d)``."""
        x0, labels = self.mixture.sample(n, generator=generator, return_labels=True)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return modulated_marginal(x0, t, noise, self.mean_maps.to(x0)[labels], process, self.scale)


# =============================================================================================
# 2. DRDM: deformation as noise
# =============================================================================================
PADDINGS = ("border", "zeros", "reflection")


def _field(field, name: str = "field", like: Tensor | None = None) -> Tensor:
    """``field`` checked to be a finite ``(batch, 2, H, W)`` tensor (matching ``like``'s batch
    and size when given)."""
    finite(floating(field, name), name)
    if field.ndim != 4 or field.shape[1] != 2 or min(field.shape[-2:]) < 2:
        raise ValueError(
            f"{name} must be a displacement field of shape (batch, 2, H, W) with H, W >= 2, got "
            f"{name} of shape {tuple(field.shape)}"
        )
    if like is not None and (
        field.shape[-2:] != like.shape[-2:] or field.shape[0] not in (1, like.shape[0])
    ):
        raise ValueError(
            f"{name} of shape {tuple(field.shape)} does not fit the image of shape "
            f"{tuple(like.shape)}: it needs shape ({like.shape[0]} or 1, 2, {like.shape[-2]}, "
            f"{like.shape[-1]})"
        )
    return field


def _identity_grid(height: int, width: int, like: Tensor) -> Tensor:
    """Pixel coordinates (row, column), shape ``(1, 2, H, W)``."""
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))[None]


def warp(image: Tensor, field: Tensor, *, padding: str = "border") -> Tensor:
    r"""Resample ``image`` at the displaced points: :math:`\operatorname{warp}(x, u)(p) =
    x(p + u(p))`, bilinear (:func:`torch.nn.functional.grid_sample`, ``align_corners=True``).

    ``field`` :math:`u` is in pixels, channel 0 along rows, 1 along columns (the order of the
    official code); points outside the image take ``padding`` (``"border"``, ``"zeros"`` or
    ``"reflection"``).  The zero field returns ``image`` to round-off.  Shapes: ``image``
    ``(batch, C, H, W)``, ``field`` ``(batch or 1, 2, H, W)``; returns ``(batch, C, H, W)``.
    """
    finite(floating(image, "image"), "image")
    if image.ndim != 4:
        raise ValueError(
            f"image must have shape (batch, channels, H, W), got image of shape "
            f"{tuple(image.shape)}"
        )
    _field(field, like=image)
    one_of(padding, "padding", PADDINGS)
    height, width = image.shape[-2:]
    points = _identity_grid(height, width, image) + field.to(image)
    # grid_sample reads (x, y) = (column, row) in [-1, 1]
    grid = torch.stack(
        (2 * points[:, 1] / (width - 1) - 1, 2 * points[:, 0] / (height - 1) - 1), dim=-1
    )
    grid = grid.expand(image.shape[0], -1, -1, -1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def compose(field: Tensor, then: Tensor) -> Tensor:
    r"""The field of warping by ``field`` and then by ``then``:

    .. math:: (u \circ w)(p) = w(p) + u(p + w(p)),

    so that :math:`\operatorname{warp}(\operatorname{warp}(x, u), w) \approx
    \operatorname{warp}(x, u\circ w)` (the maps compose as :math:`(\mathrm{id} + u) \circ
    (\mathrm{id} + w)`); ``field`` is resampled with border padding, as in the official code.
    Exact (to round-off) for affine fields wherever :math:`p + w(p)` stays in the image.
    Shapes: ``(batch, 2, H, W)`` each (a batch of 1 broadcasts); returns ``(batch, 2, H, W)``.
    """
    _field(field, "field")
    _field(then, "then")
    batch = max(field.shape[0], then.shape[0])
    if then.shape[-2:] != field.shape[-2:] or {field.shape[0], then.shape[0]} - {1, batch}:
        raise ValueError(
            f"then of shape {tuple(then.shape)} does not fit field of shape {tuple(field.shape)}: "
            f"they need one size (H, W) and equal batches (or a batch of 1)"
        )
    return then + warp(field.expand(batch, -1, -1, -1), then, padding="border")


def _gradients(field: Tensor) -> tuple[Tensor, Tensor]:
    """Finite differences along rows and columns (central inside, one-sided at the edges)."""
    d_row, d_col = torch.gradient(field, dim=(-2, -1))
    return d_row, d_col


def jacobian_determinant(field: Tensor) -> Tensor:
    r""":math:`\det(I + \nabla u)` at every pixel, by finite differences (central inside,
    one-sided at the edges):

    .. math::
        \det J = (1 + \partial_r u_r)(1 + \partial_c u_c) - \partial_c u_r\,\partial_r u_c.

    Positive everywhere for a map that keeps the topology.  Shapes: ``field``
    ``(batch, 2, H, W)``; returns ``(batch, H, W)``.
    """
    _field(field)
    d_row, d_col = _gradients(field)
    return (1 + d_row[:, 0]) * (1 + d_col[:, 1]) - d_col[:, 0] * d_row[:, 1]


def gradient_bound(field: Tensor) -> Tensor:
    r"""The largest grid difference of the field, :math:`b = \max |u_i(p + e_k) - u_i(p)|`
    over components :math:`i`, directions :math:`k` and pixels: a bound on every entry of
    :math:`\nabla u`, finite-difference or of the bilinear interpolant.  :math:`b < 1/2`
    gives :math:`\det J \ge 1 - 2b > 0`.  Shapes: ``field`` ``(batch, 2, H, W)``; returns
    ``(batch,)``.
    """
    _field(field)
    rows = (field[..., 1:, :] - field[..., :-1, :]).abs().flatten(1).amax(1)
    cols = (field[..., :, 1:] - field[..., :, :-1]).abs().flatten(1).amax(1)
    return torch.maximum(rows, cols)


def folding_fraction(field: Tensor) -> Tensor:
    r"""The fraction of pixels with :math:`\det J \le 0` (folding), DRDM's quality measure.
    Shapes: ``field`` ``(batch, 2, H, W)``; returns ``(batch,)``."""
    return (jacobian_determinant(field) <= 0).flatten(1).to(field.dtype).mean(1)


def affine_field(matrix: Tensor, shift: Tensor, size, *, centre=None) -> Tensor:
    r"""The field of an affine map about ``centre`` :math:`c` (default: the image centre),

    .. math:: u(p) = A(p - c) + s,

    whose inverse map is affine again: :math:`A' = (I + A)^{-1} - I`, :math:`s' = -(I +
    A)^{-1}s` about the same centre.  Coordinates (row, column).  Shapes: ``matrix``
    ``(2, 2)`` or ``(batch, 2, 2)``, ``shift`` ``(2,)`` or ``(batch, 2)``, ``size`` ``(H, W)``;
    returns ``(batch or 1, 2, H, W)``.
    """
    finite(floating(matrix, "matrix"), "matrix")
    finite(floating(shift, "shift"), "shift")
    if matrix.shape[-2:] != (2, 2) or matrix.ndim not in (2, 3):
        raise ValueError(
            f"matrix must have shape (2, 2) or (batch, 2, 2), got {tuple(matrix.shape)}"
        )
    if shift.shape[-1:] != (2,) or shift.ndim not in (1, 2):
        raise ValueError(f"shift must have shape (2,) or (batch, 2), got {tuple(shift.shape)}")
    height, width = (count(s, "size") for s in ((size, size) if isinstance(size, int) else size))
    matrix = matrix.reshape(-1, 2, 2)
    shift = shift.reshape(-1, 2).to(matrix)
    grid = _identity_grid(height, width, matrix)
    if centre is None:
        centre = ((height - 1) / 2, (width - 1) / 2)
    centre = torch.as_tensor(centre, dtype=matrix.dtype, device=matrix.device).reshape(1, 2, 1, 1)
    return torch.einsum("bij,bjhw->bihw", matrix, grid - centre) + shift[:, :, None, None]


def inverse_field(field: Tensor, iterations: int = 30) -> Tensor:
    r"""The field :math:`v` of the inverse map, :math:`u \circ v = 0`, by fixed-point iteration:

    .. math:: v_0 = 0, \qquad v_{k+1}(q) = -u(q + v_k(q)).

    The residual :math:`u \circ v_k = v_k - v_{k+1}` is at most :math:`L^k \max|u|` at every
    pixel, :math:`L = 2\,b(u)` (:func:`gradient_bound`): the iteration contracts when
    :math:`b < 1/2`, the condition of a positive Jacobian.  ``warp(warp(x, u), v)`` then
    returns ``x`` up to two bilinear interpolations; warping ``x`` once by the composed field
    returns it to round-off.  Shapes: ``field`` ``(batch, 2, H, W)``; returns the same.
    """
    _field(field)
    iterations = count(iterations, "iterations", low=0)
    inverse = torch.zeros_like(field)
    for _ in range(iterations):
        inverse = -warp(field, inverse, padding="border")
    return inverse


def random_field(
    batch: int,
    size,
    *,
    bound: float,
    scales=(2, 4),
    generator: torch.Generator | None = None,
    dtype=None,
    device=None,
) -> Tensor:
    r"""A smooth random displacement field, multi-scale as in DRDM, of gradient bound ``bound``.

    For each control size :math:`c` in ``scales``: a :math:`c\times c` grid of standard
    normal displacements times :math:`H/c` (coarser grids move farther, so that every scale has
    gradients of one size, as in the official code), upsampled bilinearly to the image; the sum
    is then scaled, sample by sample, so that :func:`gradient_bound` equals ``bound``
    (:math:`b < 1/2`: :math:`\det J \ge 1 - 2b > 0` everywhere).  The law is symmetric
    (:math:`u` and :math:`-u` equally likely).  Shapes: ``size`` ``H`` or ``(H, W)``; returns
    ``(batch, 2, H, W)``.
    """
    batch = count(batch, "batch")
    bound = positive(bound, "bound")
    height, width = (
        count(s, "size", low=2) for s in ((size, size) if isinstance(size, int) else size)
    )
    scales = tuple(count(c, "scales", low=2) for c in scales)
    if not scales:
        raise ValueError("scales must name at least one control size, got scales = ()")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if generator is not None:
        device = generator.device
    total = torch.zeros(batch, 2, height, width, dtype=dtype, device=device)
    for c in scales:
        coarse = torch.randn(batch, 2, c, c, generator=generator, dtype=dtype, device=device)
        coarse = coarse * (max(height, width) / c)
        total = total + F.interpolate(
            coarse, size=(height, width), mode="bilinear", align_corners=False
        )
    return total * (bound / gradient_bound(total))[:, None, None, None]


class DeformationPath(NamedTuple):
    """A run of the deformation-noising process.

    ``steps`` ``(n, batch, 2, H, W)``: the step fields :math:`u_1, \\dots, u_n`; ``fields``
    ``(n + 1, batch, 2, H, W)``: :math:`U_0 = 0` and :math:`U_t = U_{t-1} \\circ u_t`, so that
    :math:`x_t =` ``warp(x0, fields[t])``.
    """

    steps: Tensor
    fields: Tensor


def deformation_path(
    batch: int,
    size,
    n_steps: int,
    *,
    bound: float,
    scales=(2, 4),
    repeat: bool = False,
    generator: torch.Generator | None = None,
    dtype=None,
    device=None,
) -> DeformationPath:
    r"""The forward deformation process: compose ``n_steps`` small random fields.

    .. math:: U_t = U_{t-1} \circ u_t, \qquad x_t = \operatorname{warp}(x_0, U_t),

    each :math:`u_t` from :func:`random_field` with gradient bound ``bound`` :math:`= b`.
    Independent steps (``repeat=False``) add their displacement variances, since the cross
    term :math:`\mathbb E\langle u_t(p), U_{t-1}(p + u_t(p))\rangle` vanishes (each step has
    mean zero and is independent of the others); ``repeat=True`` composes *one* field with
    itself, as the official code does (a stationary velocity: displacements add coherently,
    variance growing like :math:`t^2`).  While :math:`(1 + 2b)^t < 2`, every
    :math:`\det J \ge 2 - (1 + 2b)^t > 0`.  Shapes: returns a :class:`DeformationPath`.
    """
    n_steps = count(n_steps, "n_steps")
    if not isinstance(repeat, bool):
        raise TypeError(f"repeat must be True or False, got repeat = {repeat!r}")
    draw = dict(bound=bound, scales=scales, generator=generator, dtype=dtype, device=device)
    if repeat:
        steps = random_field(batch, size, **draw).expand(n_steps, -1, -1, -1, -1)
    else:
        steps = torch.stack([random_field(batch, size, **draw) for _ in range(n_steps)])
    fields = [torch.zeros_like(steps[0])]
    for step in steps:
        fields.append(compose(fields[-1], step))
    return DeformationPath(steps.contiguous(), torch.stack(fields))


def recovery_loss(prediction: Tensor, step: Tensor, eps: float = 0.0) -> Tensor:
    r"""DRDM's recovery loss: how far the predicted field is from undoing ``step``.

    .. math::
        L = \frac{\sum_p \lVert (r \circ u)(p)\rVert^2}{\sum_p \lVert u(p)\rVert^2 + \epsilon},
        \qquad (r\circ u)(p) = u(p) + r(p + u(p)),

    zero when :math:`\mathrm{id} + r` inverts :math:`\mathrm{id} + u` (the exact inverse,
    :func:`inverse_field`), 1 for :math:`r = 0` (with :math:`\epsilon = 0`).  This is the
    official code's relative squared error (its ``RMSE`` form, a ratio of means; its ``MRSE``
    divides pixel by pixel), without its correlation and Jacobian terms.  Shapes:
    ``prediction``, ``step`` ``(batch, 2, H, W)``; returns a scalar (the batch mean).
    """
    _field(step, "step")
    _field(prediction, "prediction", like=step)
    eps = nonnegative(eps, "eps")
    residual = compose(prediction, step)
    return ((residual**2).flatten(1).sum(1) / ((step**2).flatten(1).sum(1) + eps)).mean()


def deformation_recovery_loss(
    model: Callable,
    x0: Tensor,
    n_steps: int,
    *,
    bound: float,
    scales=(2, 4),
    repeat: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""DRDM's training objective: deform each image by a random number of steps, then score
    the network's field against undoing the last one.

    For each image, :math:`t` uniform on :math:`\{1, \dots, n\}`, a forward path
    (:func:`deformation_path`) to :math:`U_t`, and the network's field :math:`r =
    \text{model}(\operatorname{warp}(x_0, U_t), t/n)`, scored by :func:`recovery_loss` against
    the last step :math:`u_t` (``repeat=True``: one field composed with itself, as the official
    code draws them, so that the last step is a function of the whole field).  The model reads the time as the fraction :math:`t/n \in (0, 1]`,
    as in :func:`recover`.  To be passed to :func:`diffcore.train.fit` with
    ``functools.partial`` (the other arguments bound).  Shapes: ``x0`` ``(batch, C, H, W)``;
    ``model(x, t)`` takes ``t`` ``(batch,)`` and returns ``(batch, 2, H, W)``; returns a scalar.
    """
    finite(floating(x0, "x0"), "x0")
    if x0.ndim != 4:
        raise ValueError(f"x0 must have shape (batch, C, H, W), got x0 of shape {tuple(x0.shape)}")
    n_steps = count(n_steps, "n_steps")
    batch, size = x0.shape[0], tuple(x0.shape[-2:])
    gen_device = generator.device if generator is not None else x0.device
    t = torch.randint(1, n_steps + 1, (batch,), generator=generator, device=gen_device)
    path = deformation_path(
        batch,
        size,
        n_steps,
        bound=bound,
        scales=scales,
        repeat=repeat,
        generator=generator,
        dtype=x0.dtype,
        device=gen_device,
    )
    rows = torch.arange(batch, device=gen_device)
    field, step = path.fields[t, rows].to(x0.device), path.steps[t - 1, rows].to(x0.device)
    prediction = model(warp(x0, field), (t / n_steps).to(x0))
    _field(prediction, "model(x, t)", like=x0)
    return recovery_loss(prediction, step)


def recover(model: Callable, image: Tensor, field: Tensor, n_steps: int) -> tuple[Tensor, Tensor]:
    r"""DRDM's reverse process: predict a recovering field, compose it, resample the original.

    For :math:`t = n, \dots, 1`: :math:`r_t =` ``model(warp(image, U), t / n)``, :math:`U
    \leftarrow U \circ r_t`; the image is always resampled from ``image`` (one interpolation,
    not one per step).  With the exact inverses of the forward steps, last step first, the
    field returns to zero.  ``model(x, t)`` returns a field ``(batch, 2, H, W)``; ``t`` is the
    fraction :math:`t/n \in (0, 1]` of the step, a float (as in
    :func:`deformation_recovery_loss`).  Shapes: ``image`` ``(batch, C, H, W)``, ``field`` ``(batch, 2, H, W)``;
    returns the recovered image and its field.
    """
    finite(floating(image, "image"), "image")
    _field(field, like=image)
    n_steps = count(n_steps, "n_steps")
    for t in range(n_steps, 0, -1):
        r = model(warp(image, field), t / n_steps)
        _field(r, f"model(x, {t})", like=image)
        field = compose(field, r)
    return warp(image, field), field
