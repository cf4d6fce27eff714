r"""MMD fine-tuning for few steps (MMD-DDM): train the network *through* a K-step sampler.

A diffusion model trained by denoising score matching is right at every noise level, yet its
samples are poor when the sampler takes only a few steps: the discretisation, not the
network, is wrong.  MMD-DDM (Aiello, Valsesia & Magli, 2023) keeps the sampler fixed (DDIM
with ``K`` steps, :func:`diffcore.samplers.ddim`) and fine-tunes the network so that the
*output* of the K-step sampler matches the data, differentiating through all ``K`` steps.
The loss is the unbiased squared maximum mean discrepancy between a generated batch
:math:`x_i = \Phi_\theta(z_i)` and a data batch :math:`y_j`, on features :math:`f`:

.. math::
    \widehat{\mathrm{MMD}}^2 = {} & \frac{1}{m(m-1)}\sum_{i \ne i'} k(f_i, f_{i'}) \\
        & + \frac{1}{n(n-1)}\sum_{j \ne j'} k(g_j, g_{j'}) \\
        & - \frac{2}{mn}\sum_{i,j} k(f_i, g_j),

with :math:`f_i = f(x_i)` and :math:`g_j = f(y_j)`; its expectation is the population
:math:`\mathrm{MMD}^2 = \mathbb E k(X, X') + \mathbb E k(Y, Y') - 2\,\mathbb E k(X, Y)`.
The kernel is KID's cubic polynomial kernel (Bińkowski et al., 2018),

.. math:: k(a, b) = \Big(\frac{a^\top b}{d} + 1\Big)^3 ,

which sees the moments of the features up to order three; the features are those of an
Inception network in the paper and the identity here, at toy scale.  For contrast the
*linear* kernel :math:`k(a, b) = a^\top b` gives :math:`\mathrm{MMD}^2 = \lVert\mu_X -
\mu_Y\rVert^2`: it matches means and nothing else (:func:`gaussian_mmd2` has both in
closed form between Gaussians).  Its estimate is :math:`\lVert\bar x - \bar y\rVert^2 -
s_x^2/m - s_y^2/n` (:math:`s^2` the unbiased total variance of a batch): the data enter
only through their batch mean, so a network fine-tuned with it cannot learn a covariance.

**An exact toy.**  On Gaussian data :math:`\mathcal N(\mu, \Sigma)` the exact noise predictor
is affine, :math:`\varepsilon^*(x, t) = \sigma_t(\alpha_t^2\Sigma + \sigma_t^2 I)^{-1}(x -
\alpha_t\mu)`.  :class:`AffineEps` holds one learnable affine map per time of the grid,
:math:`\varepsilon_\theta(x, t_i) = A_i x + b_i`, so the K-step DDIM output is an affine map
of the start noise and its law is Gaussian with a mean and covariance computed exactly
(:func:`output_law`).  Its :math:`W_2` to the data (:func:`diffcore.metrics.gaussian_w2`)
is then exact before and after fine-tuning, and so is the distance of the fine-tuned
predictor to the exact :math:`\varepsilon^*` (:func:`eps_error`): fine-tuning lowers the
first and raises the second, since the network stops being a score and becomes a few-step
map.

**Paper and code.**  The released code (``diegovalsesia/MMD-DDM``, ``runners/diffusion.py``)
calls the KID class of ``functions/losses.py`` with ``degree=3``, :math:`\gamma = 1/d`,
``coef0 = 1`` on Inception-V3 (or CLIP) features of images mapped to [0, 1], in float64, with
equal batch sizes; its estimator is the one above.  Where it departs from a plain reading of
the paper:

- the K times are DDIM's ``range(0, 1000, 1000 // K)``: the first model call is at step
  ``1000 - 1000/K`` (``t = 0.8`` for ``K = 5``), from pure noise, and the last at step 1,
  followed by the jump to :math:`\alpha = 1`; :func:`few_step_grid` takes ``t_max = 1`` by
  default and ``t_max = 1 - 1/K`` reproduces the code's grid up to its last, tiny step;
- the network is fine-tuned in ``train()`` mode, with the dropout of the pretrained model
  (0.1 on CIFAR-10) active inside the sampler; gradients are clipped to norm 0.5 (1.0 in the
  CLIP runs); Adam with learning rate 5e-6 and a fresh noise batch per data batch;
- the class ``KID`` defaults to ``degree=1`` (a linear-plus-constant kernel, which matches
  means only); every training run passes ``degree=3`` explicitly.

Shapes: samples and features ``(batch, d)``; a model maps ``(batch, d)`` and a time to
``(batch, d)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffcore import samplers, targets
from diffcore.analytic import Gaussian
from diffcore.checks import count, finite, one_of, positive, time_grid
from diffcore.metrics import gaussian_w2
from diffcore.processes import Process

__all__ = [
    "polynomial_kernel",
    "linear_kernel",
    "KERNELS",
    "mmd2",
    "gaussian_mmd2",
    "few_step_grid",
    "few_step_sample",
    "AffineEps",
    "affine_law",
    "output_law",
    "eps_error",
    "w2_parts",
    "mmd_step",
    "mmd_finetune",
]


# -- kernels -----------------------------------------------------------------------------------
def _pair(a: Tensor, b: Tensor) -> None:
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, Tensor) or v.ndim != 2:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a (n, d) tensor of features, got {shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")


def polynomial_kernel(
    a: Tensor, b: Tensor, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> Tensor:
    r"""The Gram matrix of the polynomial kernel :math:`k(a, b) = (\gamma\,a^\top b + c)^p`.

    The defaults are KID's cubic kernel: ``degree`` :math:`p = 3`, ``gamma`` :math:`\gamma =
    1/d` (None), ``coef0`` :math:`c = 1`.  Shapes: ``a`` ``(m, d)``, ``b`` ``(n, d)``;
    returns ``(m, n)``.
    """
    _pair(a, b)
    degree = count(degree, "degree")
    gamma = 1.0 / a.shape[1] if gamma is None else positive(gamma, "gamma")
    return (gamma * (a @ b.T) + coef0) ** degree


def linear_kernel(a: Tensor, b: Tensor) -> Tensor:
    r"""The Gram matrix of the linear kernel :math:`k(a, b) = a^\top b`, whose MMD matches
    means only.  Shapes: ``a`` ``(m, d)``, ``b`` ``(n, d)``; returns ``(m, n)``."""
    _pair(a, b)
    return a @ b.T


#: The kernels by name: ``"cubic"`` (KID's, MMD-DDM's) and ``"linear"`` (means only).
KERNELS: dict[str, Callable] = {"cubic": polynomial_kernel, "linear": linear_kernel}


def _kernel(kernel) -> Callable:
    if callable(kernel):
        return kernel
    one_of(kernel, "kernel", tuple(KERNELS))
    return KERNELS[kernel]


def mmd2(x: Tensor, y: Tensor, kernel: str | Callable = "cubic") -> Tensor:
    r"""The unbiased estimate of :math:`\mathrm{MMD}^2` between the laws of ``x`` and ``y``.

    .. math::
        \widehat{\mathrm{MMD}}^2 = {} & \frac{1}{m(m-1)}\sum_{i \ne i'} k(x_i, x_{i'}) \\
            & + \frac{1}{n(n-1)}\sum_{j \ne j'} k(y_j, y_{j'}) \\
            & - \frac{2}{mn}\sum_{i,j} k(x_i, y_j) ,

    each term the unbiased estimate of its expectation (the two batches are independent),
    so the result scatters around the population value and may be negative.  ``kernel``: a
    name of :data:`KERNELS` or a function ``(a, b) -> (m, n)`` Gram matrix.  Differentiable
    in ``x`` and ``y``.  Shapes: ``x`` ``(m, d)``, ``y`` ``(n, d)``, ``m, n >= 2``; returns a
    0-d tensor.
    """
    k = _kernel(kernel)
    _pair(x, y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"mmd2 needs at least 2 samples in each set, got m = {m} and n = {n}")
    kxx, kyy = k(x, x), k(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k(x, y).mean()


def _third_moment(mean: Tensor, cov: Tensor) -> Tensor:
    """:math:`\\mathbb E[x_i x_j x_k]` of :math:`\\mathcal N(m, C)`: the outer cube of the mean
    plus the three placements of :math:`m_i C_{jk}`.  Shapes: ``(d,)``, ``(d, d)`` -> ``(d, d,
    d)``."""
    m_c = torch.einsum("i,jk->ijk", mean, cov)
    cube = torch.einsum("i,j,k->ijk", mean, mean, mean)
    return cube + m_c + m_c.permute(1, 0, 2) + m_c.permute(1, 2, 0)


def _expected_cubic(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> Tensor:
    r""":math:`\mathbb E(u^\top v/d + 1)^3` for independent :math:`u \sim \mathcal N(m_1,
    C_1)`, :math:`v \sim \mathcal N(m_2, C_2)`, from the binomial expansion and the moments
    :math:`\mathbb E u^\top v = m_1^\top m_2`, :math:`\mathbb E(u^\top v)^2 = \operatorname{tr}
    (S_1 S_2)` with :math:`S = C + m m^\top`, and :math:`\mathbb E(u^\top v)^3 = T_1 : T_2`
    (third moments)."""
    d = m1.shape[0]
    first = m1 @ m2
    second = torch.trace((c1 + torch.outer(m1, m1)) @ (c2 + torch.outer(m2, m2)))
    third = (_third_moment(m1, c1) * _third_moment(m2, c2)).sum()
    return 1 + 3 * first / d + 3 * second / d**2 + third / d**3


def gaussian_mmd2(
    mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, kernel: str = "cubic"
) -> Tensor:
    r"""The population :math:`\mathrm{MMD}^2` between :math:`\mathcal N(m_1, C_1)` and
    :math:`\mathcal N(m_2, C_2)`, in closed form, for the kernels of :data:`KERNELS`.

    Linear kernel: :math:`\lVert m_1 - m_2\rVert^2`, whatever the covariances.  Cubic kernel
    (:func:`polynomial_kernel` with its defaults): :math:`\mathrm{MMD}^2 = e_{11} + e_{22} -
    2e_{12}` with, for :math:`S_k = C_k + m_k m_k^\top` and :math:`T_k` the third-moment
    tensor :math:`(T_k)_{abc} = \mathbb E[x_a x_b x_c]`,

    .. math::
        e_{kl} = {} & 1 + \frac{3\,m_k^\top m_l}{d} \\
            & + \frac{3\operatorname{tr}(S_k S_l)}{d^2} + \frac{T_k : T_l}{d^3} ;

    zero between Gaussians exactly when both means and covariances agree.  Shapes: means
    ``(d,)``, covariances ``(d, d)``; returns a 0-d tensor.
    """
    one_of(kernel, "kernel", tuple(KERNELS))
    for i, (m, c) in enumerate(((mean1, cov1), (mean2, cov2)), start=1):
        finite(m, f"mean{i}")
        finite(c, f"cov{i}")
        if m.ndim != 1 or c.shape != (m.shape[0], m.shape[0]):
            raise ValueError(
                f"mean{i} and cov{i} must have shapes (d,) and (d, d), got {tuple(m.shape)} "
                f"and {tuple(c.shape)}"
            )
    if mean1.shape != mean2.shape:
        raise ValueError(f"the laws must share a dimension, got {mean1.shape} and {mean2.shape}")
    if kernel == "linear":
        return (mean1 - mean2).pow(2).sum()
    e11 = _expected_cubic(mean1, cov1, mean1, cov1)
    e22 = _expected_cubic(mean2, cov2, mean2, cov2)
    return e11 + e22 - 2 * _expected_cubic(mean1, cov1, mean2, cov2)


# -- the few-step sampler ----------------------------------------------------------------------
def few_step_grid(
    process: Process, n_steps: int, kind: str = "uniform", t_max: float = 1.0
) -> Tensor:
    """The grid of a ``K``-step sampler that ends on the data, ``t_min = 0``: ``K + 1`` times
    from ``t_max`` down to 0 (:func:`diffcore.samplers.time_grid`; ``kind`` as there).  The
    last DDIM step then lands on :math:`\\alpha_0\\hat x_0`, the model's clean estimate.
    ``n_steps`` :math:`K \\ge 1`.  Shapes: returns ``(K + 1,)``, float64.
    """
    n_steps = count(n_steps, "n_steps")
    return samplers.time_grid(process, n_steps, kind=kind, t_min=0.0, t_max=t_max)


def few_step_sample(
    model: Callable, x: Tensor, ts: Tensor, process: Process, target: str = "eps"
) -> Tensor:
    r"""The K-step deterministic DDIM output :math:`\Phi_\theta(x)`, differentiable in the
    model's parameters and in ``x``.

    ``model(x, t)`` predicts ``target`` (``"eps"`` in MMD-DDM; see
    :func:`diffcore.targets.as_denoiser`); ``x`` is the start state at ``ts[0]``
    (``process.prior_sample``).  Runs :func:`diffcore.samplers.ddim` with ``eta = 0``.
    Shapes: ``x`` ``(batch, ...)``; returns the same.
    """
    denoiser = targets.as_denoiser(model, target, process)
    return samplers.ddim(denoiser, x, ts, process)


# -- the exact toy: an affine noise predictor on Gaussian data ----------------------------------
def _exact_maps(gaussian: Gaussian, times: Tensor, process: Process) -> tuple[Tensor, Tensor]:
    """The exact :math:`(A_i, b_i)` of :meth:`AffineEps.exact` at ``times``: ``(K, d, d)``,
    ``(K, d)``."""
    weights, biases = [], []
    eye = torch.eye(gaussian.dim, dtype=gaussian.cov.dtype)
    for t in times.tolist():
        a, s = float(process.alpha(t)), float(process.sigma(t))
        prec = torch.linalg.inv(a**2 * gaussian.cov + s**2 * eye)
        weights.append(s * prec)
        biases.append(-s * a * prec @ gaussian.mean)
    return torch.stack(weights), torch.stack(biases)


class AffineEps(nn.Module):
    r"""A noise predictor that is affine in ``x``, one map per time of a grid:
    :math:`\varepsilon_\theta(x, t_i) = A_i x + b_i`.

    ``ts`` the grid (the sampler calls the model at ``ts[:-1]``, so one map is kept for each of
    those ``K`` times), ``dim`` :math:`d`.  Parameters ``weight`` ``(K, d, d)`` and ``bias``
    ``(K, d)``, zero at creation; :meth:`exact` sets them to the exact predictor of a
    Gaussian.  A time that is not on the grid (to 1e-6) is refused.  Shapes:
    ``forward(x, t)`` with ``x`` ``(B, d)`` and ``t`` a float or a 0-d tensor; returns
    ``(B, d)``.
    """

    def __init__(self, ts: Tensor, dim: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        ts = time_grid(ts)
        self.dim = count(dim, "dim")
        self.register_buffer("times", ts[:-1].to(torch.float64).clone())
        k = self.times.shape[0]
        self.weight = nn.Parameter(torch.zeros(k, dim, dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(k, dim, dtype=dtype))

    @classmethod
    def exact(cls, gaussian: Gaussian, ts: Tensor, process: Process) -> AffineEps:
        r"""The exact predictor of :math:`\mathcal N(\mu, \Sigma)` at each time of the grid:
        :math:`A_i = \sigma_t C_t^{-1}`, :math:`b_i = -\sigma_t\alpha_t C_t^{-1}\mu`, with
        :math:`C_t = \alpha_t^2\Sigma + \sigma_t^2 I` and :math:`t = t_i`."""
        if not isinstance(gaussian, Gaussian):
            raise TypeError(f"gaussian must be an analytic.Gaussian, got {type(gaussian)}")
        model = cls(ts, gaussian.dim, dtype=gaussian.mean.dtype)
        weight, bias = _exact_maps(gaussian, model.times, process)
        with torch.no_grad():
            model.weight.copy_(weight)
            model.bias.copy_(bias)
        return model

    def index(self, t) -> int:
        """The grid index of the time ``t``; a ``ValueError`` off the grid."""
        t = float(t)
        gaps = (self.times - t).abs()
        i = int(gaps.argmin())
        if float(gaps[i]) > 1e-6:
            raise ValueError(
                f"t must be a time of the model's grid {self.times.tolist()}, got t = {t}"
            )
        return i

    def forward(self, x: Tensor, t) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        if isinstance(t, Tensor) and t.ndim > 0:
            if not bool((t == t.reshape(-1)[0]).all()):
                raise ValueError("AffineEps takes one time per call (all of t equal)")
            t = t.reshape(-1)[0]
        i = self.index(t)
        return x @ self.weight[i].T + self.bias[i]


def affine_law(transform: Callable, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    r"""The exact law of :math:`y = T(x)` for :math:`x \sim \mathcal N(m, C)` and an affine
    :math:`T(x) = Jx + c`: :math:`\mathcal N(T(m), J C J^\top)`.

    :math:`J` is read off :math:`d + 1` evaluations, column :math:`j` being :math:`T(m + e_j) -
    T(m)`: exact for an affine map up to round-off, differentiable in whatever ``transform``
    depends on.  Shapes: ``transform`` maps ``(batch, d)`` to ``(batch, d')``; ``mean``
    ``(d,)``, ``cov`` ``(d, d)``; returns ``(d',)`` and ``(d', d')``.
    """
    d = mean.shape[0]
    if cov.shape != (d, d):
        raise ValueError(f"cov must have shape ({d}, {d}), got {tuple(cov.shape)}")
    points = torch.cat([mean[None], mean[None] + torch.eye(d, dtype=mean.dtype)])
    y = transform(points)
    jac = (y[1:] - y[:1]).T  # (d', d): column j is T(m + e_j) - T(m)
    out = jac @ cov @ jac.T
    return y[0], 0.5 * (out + out.T)


def output_law(
    model: Callable,
    ts: Tensor,
    process: Process,
    target: str = "eps",
    start: tuple[Tensor, Tensor] | None = None,
    dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The exact law of the K-step DDIM output (:func:`few_step_sample`) of a model that is
    affine in ``x`` (:class:`AffineEps`, or an exact Gaussian model).

    ``start`` = ``(mean, cov)`` of the start state; None: the prior
    :math:`\mathcal N(0, \sigma_{t_0}^2 I)` that ``process.prior_sample`` draws (``dim``
    then gives :math:`d`, or ``model.dim``).  Computed by :func:`affine_law`.  Shapes:
    returns mean ``(d,)`` and covariance ``(d, d)``.
    """
    ts = time_grid(ts)
    if start is None:
        d = count(dim if dim is not None else getattr(model, "dim", None), "dim")
        sigma = float(process.sigma(float(ts[0])))
        start = (torch.zeros(d, dtype=torch.float64), sigma**2 * torch.eye(d, dtype=torch.float64))
    mean, cov = start
    return affine_law(lambda x: few_step_sample(model, x, ts, process, target), mean, cov)


@torch.no_grad()
def eps_error(model: AffineEps, gaussian: Gaussian, process: Process) -> Tensor:
    r"""The exact root mean square distance of an :class:`AffineEps` to the exact predictor,
    at each of its times, under the exact marginal :math:`p_t = \mathcal N(m_t, C_t)`:

    .. math::
        e_i^2 &= \mathbb E_{x\sim p_{t_i}}\lVert\varepsilon_\theta(x, t_i)
            - \varepsilon^*(x, t_i)\rVert^2 \\
        &= \lVert D m_t + \delta\rVert^2 + \operatorname{tr}(D C_t D^\top),

    with :math:`D = A_i - A_i^*`, :math:`\delta = b_i - b_i^*`.  Shapes: returns ``(K,)``.
    """
    if not isinstance(model, AffineEps):
        raise TypeError(f"model must be an AffineEps, got {type(model).__name__}")
    weight, bias = _exact_maps(gaussian, model.times, process)
    errors = []
    for i, t in enumerate(model.times.tolist()):
        law = gaussian.marginal(t, process)
        gap = model.weight[i] - weight[i]
        shift = gap @ law.mean + model.bias[i] - bias[i]
        errors.append(shift.pow(2).sum() + torch.trace(gap @ law.cov @ gap.T))
    return torch.stack(errors).sqrt()


def w2_parts(mean: Tensor, cov: Tensor, gaussian: Gaussian) -> tuple[float, float, float]:
    r""":math:`W_2` between :math:`\mathcal N(m, C)` and ``gaussian`` and its two parts,
    :math:`W_2^2 = \lVert m - \mu\rVert^2 + W_2(\mathcal N(0, C), \mathcal N(0, \Sigma))^2`:
    returns ``(total, mean_part, covariance_part)`` as floats.  Shapes: ``mean`` ``(d,)``,
    ``cov`` ``(d, d)``."""
    mean, cov = mean.detach(), cov.detach()
    total = float(gaussian_w2(mean, cov, gaussian.mean, gaussian.cov))
    zero = torch.zeros_like(mean)
    cov_part = float(gaussian_w2(zero, cov, zero, gaussian.cov))
    return total, float((mean - gaussian.mean).norm()), cov_part


# -- fine-tuning -------------------------------------------------------------------------------
def _identity(x: Tensor) -> Tensor:
    return x


def mmd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    x: Tensor,
    ts: Tensor,
    process: Process,
    *,
    kernel: str | Callable = "cubic",
    features: Callable | None = None,
    target: str = "eps",
    grad_clip: float | None = None,
) -> float:
    r"""One MMD-DDM step: sample :math:`\Phi_\theta(x)` with the K-step DDIM sampler, take
    :math:`\widehat{\mathrm{MMD}}^2(f(\Phi_\theta(x)), f(y))` (:func:`mmd2`), backpropagate
    through the ``K`` steps, clip the gradient norm to ``grad_clip`` (None: no clipping) and
    take one ``optimizer`` step.  ``features`` :math:`f` (None: the identity).  Returns the
    loss as a float.  Shapes: ``data`` :math:`y` ``(n, d)``, ``x`` the start states ``(m,
    d)``.
    """
    f = _identity if features is None else features
    optimizer.zero_grad(set_to_none=True)
    samples = few_step_sample(model, x, ts, process, target)
    loss = mmd2(f(samples), f(data), kernel)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), positive(grad_clip, "grad_clip"))
    optimizer.step()
    return float(loss.detach())


def _batch(data, n: int, generator, like: Tensor) -> Tensor:
    if isinstance(data, Tensor):
        idx = torch.randint(data.shape[0], (n,), generator=generator)
        return data[idx].to(like)
    return data(n, generator=generator).to(like)


def mmd_finetune(
    model: nn.Module,
    data,
    ts: Tensor,
    process: Process,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    kernel: str | Callable = "cubic",
    features: Callable | None = None,
    target: str = "eps",
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
) -> list[float]:
    r"""Fine-tune ``model`` in place by MMD-DDM for ``steps`` Adam steps; return the losses.

    Each step draws a data batch :math:`y` (``data``: a tensor ``(N, d)``, drawn from with
    replacement, or a sampler ``(n, generator) -> (n, d)``) and start states :math:`x =
    \sigma_{t_0} z` (``process.prior_sample``), both of ``batch_size``, then takes
    :func:`mmd_step`.  ``ts`` is the fixed grid of the K-step sampler (:func:`few_step_grid`),
    ``lr`` Adam's learning rate (> 0), ``kernel``, ``features``, ``target``, ``grad_clip`` as
    in :func:`mmd_step`; all draws come from ``generator``.  The model's mode (train or
    eval) is left as it is.  Shapes: the model maps ``(B, d)`` to ``(B, d)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    steps = count(steps, "steps", low=0)
    lr = positive(lr, "lr")
    batch_size = count(batch_size, "batch_size", low=2)
    _kernel(kernel)
    ts = time_grid(ts)
    if not (isinstance(data, Tensor) or callable(data)):
        raise TypeError(f"data must be a tensor or a sampler (n, generator), got {type(data)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters to fine-tune")
    like = params[0]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        y = _batch(data, batch_size, generator, like)
        x = process.prior_sample(y.shape, t=float(ts[0]), generator=generator, dtype=like.dtype)
        x = x.to(like.device)
        losses.append(
            mmd_step(
                model,
                optimizer,
                y,
                x,
                ts,
                process,
                kernel=kernel,
                features=features,
                target=target,
                grad_clip=grad_clip,
            )
        )
    return losses
