r"""Multi-task diffusion: data and its label diffused together in one space (MT-Diffusion).

A labelled pair :math:`(x_0, y)`, :math:`x_0 \in \mathbb R^d` and :math:`y \in \{0, \dots,
K-1\}`, enters one *common diffusion space* through a fixed label embedding :math:`E \in
\mathbb R^{K \times m}` (row :math:`E_y`; :func:`onehot_embedding` gives :math:`s\,I_K`):

.. math::
    z_0 = [x_0, E_y] \in \mathbb R^{d + m}, \qquad
    z_t = \alpha_t z_0 + \sigma_t \varepsilon,

with any :class:`~diffcore.processes.Process` (:class:`JointProcess`).  Write
:math:`z_t = [x_t, e_t]`.  This is a standard diffusion of :math:`z`, so every sampler of
:mod:`diffcore.samplers` runs on it unchanged.

**The exact label posterior.**  If class :math:`k` has weight :math:`\pi_k` and law
:math:`\mathcal N(\mu_k, \Sigma_k)`, then given :math:`y = k` the two blocks of :math:`z_t` are
independent Gaussians, so Bayes' rule reads (:class:`ExactJoint`)

.. math::
    \begin{aligned}
    p(k \mid z_t) \propto \pi_k\,
    &\mathcal N(x_t; \alpha_t\mu_k, \alpha_t^2\Sigma_k + \sigma_t^2 I) \\
    \times\,&\mathcal N(e_t; \alpha_t E_k, \sigma_t^2 I),
    \end{aligned}

and the exact joint denoiser is :math:`\mathbb E[z_0 \mid z_t] = \sum_k p(k \mid z_t)\,
[D_k(x_t), E_k]`, with :math:`D_k` the denoiser of component :math:`k`
(:meth:`~diffcore.analytic.GaussianMixture.denoise`).

**The network** (:class:`JointMLP`): a shared time-conditioned trunk on :math:`z_t` with two
heads, one for :math:`x` (:math:`\hat x_0`, or the noise of the data block) and one giving the
logits of :math:`p_\theta(y \mid z_t)`.  Any *joint model* ``model(z, t) -> (x_pred, logits)``
(the network, or :class:`ExactJoint` itself) becomes a denoiser of :math:`z` with
:func:`joint_denoiser`: :math:`[\hat x_0, \sum_k p_\theta(k \mid z_t) E_k]`.

**The multi-task loss** (:func:`multitask_loss`).  For :math:`z_0` the variational bound of a
diffusion (Kingma et al., 2021) is

.. math::
    \begin{aligned}
    -\log p_\theta(x_0, y) \le{}&
       \mathbb E[-\log p_\theta(x_0, y \mid z_{t_0})] + L_1 \\
    &+ \tfrac12\int_{t_0}^1 -\mathrm{SNR}'(t)\,
       \mathbb E\lVert z_0 - \hat z_\theta\rVert^2 dt,
    \end{aligned}

:math:`L_1` the prior term.  With one decoder head per modality the first term splits into
:math:`-\log p_\theta(x_0 \mid z_{t_0}) - \log p_\theta(y \mid z_{t_0})`, and the squared
error splits into the blocks :math:`\lVert x_0 - \hat x_0\rVert^2 + \lVert E_y -
\hat e_0\rVert^2`.  The loss keeps the usual denoising term for :math:`x` (constant weight,
DDPM's simple loss) and the label head's cross-entropy, the discrete decoder term, at every
:math:`t`:

.. math::
    \begin{aligned}
    L = \mathbb E_{t, x_0, y, \varepsilon}\big[
        &\lVert \hat x_\theta(z_t, t) - x_0\rVert^2 \\
        &- \lambda \log p_\theta(y \mid z_t)\big],
    \end{aligned}

or the same with the noise of the data block as the target (``target = "eps"``, the
default of :class:`JointMLP`).

The two heads are separate outputs, so each term has its own exact minimiser whatever the
weight :math:`\lambda`: :math:`\mathbb E[x_0 \mid z_t]` and :math:`p(y \mid z_t)` (the
cross-entropy is a proper scoring rule: its excess over the minimum is
:math:`\mathbb E\,\mathrm{KL}(p(\cdot \mid z_t)\,\Vert\,p_\theta(\cdot \mid z_t))`).  The
label block's squared error, :math:`\lVert E_y - \sum_k p_\theta(k \mid z_t) E_k\rVert^2`, is
also minimised by the exact posterior; the cross-entropy stands for it.

**Conditional generation.**  Given :math:`y = c`, the law of :math:`z_t` factorises,
:math:`p_t(z \mid c) = p_t(x \mid c)\,\mathcal N(e; \alpha_t E_c, \sigma_t^2 I)`, and Bayes'
rule gives its score from the joint model alone: the label head is the classifier,

.. math::
    \begin{aligned}
    \nabla_z \log p_t(z \mid c)
      &= \nabla_z \log p_t(z) \\
      &+ \nabla_z \log p(c \mid z_t).
    \end{aligned}

:func:`conditional_sample` runs this classifier guidance with weight 1
(:func:`diffcore.guidance.classifier_guided_denoiser`): with :class:`ExactJoint` the guided
denoiser *is* the exact conditional denoiser :math:`[D_c(x_t), E_c]`, so the samples follow
the class law up to the sampler's discretisation; with a network it is as good as its two
heads.  :func:`replacement_sample` instead overwrites the label block by a fresh draw of
:math:`\alpha_t E_c + \sigma_t\xi` before each step (imputation, as in inpainting).  This is an
approximation even with the exact model: the denoiser then conditions on a noisy label, and
early in the run, when :math:`e_t` says little about :math:`c`, the samples drift towards the
other classes.

**The paper and this toy version.**  Chen et al. (ICLR 2024) aggregate the encoded task data
into the image's own latent along the chain, :math:`q(z_t \mid z_{t-1}, x^{1:N}) =
\mathcal N(\sqrt{\alpha_t}(z_{t-1} + w_t\mathcal E(x^{1:N})), (1 - \alpha_t) I)`, with learned
encoders :math:`\mathcal E` and weights :math:`w_t`, and decode every modality from the
shared latent with its own head on a shared backbone (a U-Net).  Here the encoder is a fixed
embedding, placed in its own block (additive aggregation into coordinates orthogonal to the
data, all of it at :math:`t = 0`): :math:`z` stays a standard diffusion, and the label
posterior, the joint denoiser and the conditional law have closed forms.  No official code
is known; this is the natural toy version of the paper's joint image-label setting.

Shapes: data ``(batch, d)``; labels ``(batch,)`` integers in ``0..K-1`` (or one int);
joint states ``(batch, d + m)``; a time is a float, a 0-d tensor or one per sample ``(batch,)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore.analytic import GaussianMixture
from diffcore.checks import (
    Deferred,
    as_time,
    count,
    finite,
    floating,
    one_of,
    per_sample,
    positive,
    real,
    returned_shape,
    same_shape,
)
from diffcore.guidance import classifier_guided_denoiser
from diffcore.nets import sinusoidal_embedding
from diffcore.processes import Process, check_process
from diffcore.samplers import SAMPLERS
from diffcore.stepping import integrate
from diffcore.targets import convert

__all__ = [
    "DATA_TARGETS",
    "onehot_embedding",
    "JointProcess",
    "ExactJoint",
    "JointMLP",
    "multitask_loss",
    "train_joint",
    "joint_denoiser",
    "label_classifier",
    "conditional_denoiser",
    "joint_sample",
    "conditional_sample",
    "replacement_sample",
]

#: The targets the data head may predict: a joint model's ``target`` attribute (``"x0"`` when
#: it has none).
DATA_TARGETS = ("x0", "eps")


def _target_of(model: Callable) -> str:
    """What the joint model's data head predicts: ``model.target``, ``"x0"`` by default."""
    target = getattr(model, "target", "x0")
    one_of(target, "model.target", DATA_TARGETS)
    return target


def onehot_embedding(n_classes: int, scale: float = 1.0, dtype=None) -> Tensor:
    r"""The label embedding :math:`E = s\,I_K`: label :math:`k` becomes :math:`s\,e_k`.

    The scale :math:`s > 0` sets how loud the label is against the noise: the label block's
    signal-to-noise ratio is :math:`s^2\alpha_t^2/\sigma_t^2`.  Shapes: returns ``(K, K)``.
    """
    n_classes = count(n_classes, "n_classes", low=2)
    scale = positive(scale, "scale")
    return scale * torch.eye(n_classes, dtype=dtype or torch.get_default_dtype())


def _check_labels(label, n_classes: int, batch: int, device) -> Tensor:
    """``label`` (an int or ``(batch,)`` integers) checked to lie in ``0..K-1``, as ``(batch,)``."""
    label = torch.as_tensor(label, device=device)
    if label.dtype not in (torch.int32, torch.int64) or label.ndim > 1:
        raise ValueError(f"label must be an int or a 1-D integer tensor, got label = {label!r}")
    bad = (label < 0) | (label >= n_classes)
    if bool(bad.any()):
        shown = label[bad].tolist() if label.ndim else label.item()
        raise ValueError(f"label must lie in 0..{n_classes - 1}, got label = {shown}")
    if label.ndim == 0:
        return label.expand(batch)
    if label.shape != (batch,):
        raise ValueError(
            f"label must have one entry per sample ({batch}), got label of shape "
            f"{tuple(label.shape)}"
        )
    return label


class JointProcess:
    r"""The common diffusion space of :math:`(x, y)`: :math:`z_t = \alpha_t [x_0, E_y] +
    \sigma_t\varepsilon`.

    ``process``: any :class:`~diffcore.processes.Process`; ``embedding``: the fixed matrix
    :math:`E` ``(K, m)`` with distinct rows (e.g. :func:`onehot_embedding`).  The last ``m``
    coordinates of a joint state are the label block.
    """

    def __init__(self, process: Process, embedding):
        check_process(process)
        embedding = torch.as_tensor(embedding)
        if not (embedding.is_floating_point() or embedding.is_complex()):
            embedding = embedding.to(torch.get_default_dtype())
        embedding = finite(floating(embedding, "embedding"), "embedding")
        if embedding.ndim != 2 or embedding.shape[0] < 2:
            raise ValueError(
                f"embedding must be a matrix (K, m) with K >= 2 classes, got shape "
                f"{tuple(embedding.shape)}"
            )
        gaps = torch.cdist(embedding, embedding) + torch.eye(embedding.shape[0]).to(embedding)
        if not bool((gaps > 0).all()):
            i, j = (int(v) for v in torch.nonzero(gaps <= 0)[0])
            raise ValueError(
                f"embedding rows must be distinct (else the label is lost), got embedding[{i}] "
                f"= embedding[{j}] = {embedding[i].tolist()}"
            )
        self.process, self.embedding = process, embedding

    @property
    def n_classes(self) -> int:
        """The number of classes ``K``."""
        return self.embedding.shape[0]

    @property
    def label_dim(self) -> int:
        """The width ``m`` of the label block."""
        return self.embedding.shape[1]

    def __repr__(self) -> str:
        return f"JointProcess({self.process!r}, K={self.n_classes}, m={self.label_dim})"

    def embed(self, label, like: Tensor) -> Tensor:
        """:math:`E_y` for each label, in ``like``'s dtype and device.  Shapes: ``label`` an
        int or ``(batch,)``; ``like`` ``(batch, ...)``; returns ``(batch, m)``."""
        label = _check_labels(label, self.n_classes, like.shape[0], like.device)
        return self.embedding.to(like)[label]

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The data and label blocks of ``z``.  Shapes: ``z`` ``(batch, d + m)``; returns
        ``(batch, d)`` and ``(batch, m)``."""
        floating(z, "z")
        if z.ndim != 2 or z.shape[1] <= self.label_dim:
            raise ValueError(
                f"z must have shape (batch, d + {self.label_dim}) with d >= 1, got z of shape "
                f"{tuple(z.shape)}"
            )
        return z[:, : -self.label_dim], z[:, -self.label_dim :]

    def join(self, x0: Tensor, label) -> Tensor:
        """:math:`z_0 = [x_0, E_y]`.  Shapes: ``x0`` ``(batch, d)``; returns ``(batch, d + m)``."""
        finite(x0, "x0")
        if x0.ndim != 2:
            raise ValueError(f"x0 must have shape (batch, d), got x0 of shape {tuple(x0.shape)}")
        return torch.cat([x0, self.embed(label, x0)], dim=1)

    def marginal(self, x0: Tensor, label, t, noise: Tensor) -> Tensor:
        r"""A draw of :math:`z_t = \alpha_t [x_0, E_y] + \sigma_t\varepsilon` with ``noise``
        :math:`\varepsilon`.  Shapes: ``x0`` ``(batch, d)``, ``noise`` ``(batch, d + m)``;
        returns ``(batch, d + m)``."""
        z0 = self.join(x0, label)
        finite(noise, "noise")
        same_shape(z0, noise, "[x0, E y]", "noise")
        return self.process.marginal(z0, t, noise)


class ExactJoint:
    r"""The exact joint model of a labelled Gaussian mixture in a :class:`JointProcess`.

    Component :math:`k` of ``mixture`` is class :math:`k` (:math:`\pi_k` = ``weights[k]``).
    Called as a joint model, ``exact(z, t)`` returns :math:`(\mathbb E[x_0 \mid z_t], \log
    p(\cdot \mid z_t))`, so that everything that takes a network takes it too.  Needs
    :math:`\sigma_t > 0` (at :math:`\sigma_t = 0` the label block is the label itself).
    """

    #: What the data head returns: the posterior mean of :math:`x_0`.
    target = "x0"

    def __init__(self, mixture: GaussianMixture, joint: JointProcess):
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        if not isinstance(joint, JointProcess):
            raise TypeError(f"joint must be a JointProcess, got {type(joint).__name__}")
        if mixture.n_components != joint.n_classes:
            raise ValueError(
                f"the mixture's components are the classes: need K = {joint.n_classes} "
                f"components, got {mixture.n_components}"
            )
        self.mixture, self.joint = mixture, joint

    def __repr__(self) -> str:
        return f"ExactJoint({self.mixture!r}, {self.joint!r})"

    def _coefficients(self, z: Tensor, t) -> tuple[Tensor, Tensor, Tensor]:
        """``t`` as a tensor and :math:`\\alpha_t, \\sigma_t` viewed per sample against ``z``."""
        check = Deferred()
        check.finite(z, "z")
        t = check.time(t, like=z)
        check.done()
        process = self.joint.process
        a, s = per_sample(process.alpha(t), z), per_sample(process.sigma(t), z)
        if not bool((s > 0).all()):
            first = t.reshape(-1)[torch.nonzero((s == 0).reshape(-1))[0]].item()
            raise ValueError(
                f"the label posterior needs sigma_t > 0, got sigma_t = 0 at t = {first}"
            )
        return t, a, s

    def log_joint(self, z: Tensor, t) -> Tensor:
        r""":math:`\log \pi_k + \log\mathcal N(x_t; \alpha_t\mu_k, \alpha_t^2\Sigma_k +
        \sigma_t^2 I) + \log\mathcal N(e_t; \alpha_t E_k, \sigma_t^2 I)`, the log-density of
        :math:`(z_t, y = k)`.  Shapes: ``z`` ``(B, d + m)``; returns ``(B, K)``."""
        x, e = self.joint.split(z)
        if x.shape[1] != self.mixture.dim:
            raise ValueError(
                f"z must have d + m = {self.mixture.dim} + {self.joint.label_dim} columns, got "
                f"z of shape {tuple(z.shape)}"
            )
        t, a, s = self._coefficients(z, t)
        data_part = self.mixture.component_log_prob(x, t, self.joint.process)  # (B, K)
        # the label block given k: N(alpha E_k, sigma^2 I) in m coordinates
        sq = ((e[:, None, :] - a[..., None] * self.joint.embedding.to(z)) ** 2).sum(-1)
        m = self.joint.label_dim
        label_part = -0.5 * (sq / s**2 + m * torch.log(2 * math.pi * s**2))
        return torch.log(self.mixture.weights.to(z)) + data_part + label_part

    def log_prob(self, z: Tensor, t) -> Tensor:
        """The exact :math:`\\log p_t(z)` of the joint state.  Shapes: ``z`` ``(B, d + m)``;
        returns ``(B,)``."""
        return torch.logsumexp(self.log_joint(z, t), dim=-1)

    def label_log_posterior(self, z: Tensor, t) -> Tensor:
        """:math:`\\log p(k \\mid z_t)`, a log-softmax of :meth:`log_joint`.  Shapes: ``(B, K)``."""
        return torch.log_softmax(self.log_joint(z, t), dim=-1)

    def label_posterior(self, z: Tensor, t) -> Tensor:
        """The exact label posterior :math:`p(k \\mid z_t)`.  Shapes: ``z`` ``(B, d + m)``;
        returns ``(B, K)``, rows summing to 1."""
        return torch.exp(self.label_log_posterior(z, t))

    def _class_denoisers(self, x: Tensor, t) -> Tensor:
        """:math:`D_k(x_t)` of every component, ``(B, K, d)``."""
        process = self.joint.process
        return torch.stack(
            [self.mixture.denoise(x, t, process, label=k) for k in range(self.joint.n_classes)],
            dim=1,
        )

    def denoise(self, z: Tensor, t, label=None) -> Tensor:
        r"""The exact joint denoiser :math:`\mathbb E[z_0 \mid z_t]` (given :math:`y` for
        ``label``).

        :math:`\sum_k p(k \mid z_t)\,[D_k(x_t), E_k]`, or :math:`[D_c(x_t), E_c]` for
        ``label = c``.  Shapes: ``z`` ``(B, d + m)``; returns the same.
        """
        x, _ = self.joint.split(z)
        per_class = self._class_denoisers(x, t)  # (B, K, d)
        embedding = self.joint.embedding.to(z)
        if label is None:
            r = self.label_posterior(z, t)
            return torch.cat([torch.einsum("bk,bkd->bd", r, per_class), r @ embedding], dim=1)
        label = _check_labels(label, self.joint.n_classes, z.shape[0], z.device)
        rows = torch.arange(z.shape[0], device=z.device)
        return torch.cat([per_class[rows, label], embedding[label]], dim=1)

    def __call__(self, z: Tensor, t) -> tuple[Tensor, Tensor]:
        """The joint-model call: ``(E[x0 | z_t] (B, d), log p(k | z_t) (B, K))``."""
        d = self.denoise(z, t)
        return d[:, : -self.joint.label_dim], self.label_log_posterior(z, t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` labelled pairs of the data law: ``x0`` ``(n, d)`` and ``label`` ``(n,)``."""
        return self.mixture.sample(n, generator=generator, return_labels=True)


class JointMLP(nn.Module):
    r"""A shared trunk with two heads: ``net(z, t) -> (x_pred, logits)``.

    The trunk is the residual MLP of :class:`diffcore.nets.MLP` on the joint state
    :math:`z_t` (``depth`` layers of width ``hidden``, ``h <- h + W silu(h + c(t))``, with
    :math:`c(t)` from sinusoidal features of ``t``); the data head maps its features to
    ``dim`` outputs, the label head to ``n_classes`` logits of :math:`p_\theta(y \mid z_t)`.
    ``target`` (kept as ``net.target``) is what the data head learns: the data block of the
    noise (``"eps"``, the default) or :math:`x_0` (``"x0"``).  The noise target trains better
    at small :math:`t`, where an :math:`x_0` head has to learn the identity map.

    Shapes: ``forward(z, t)`` with ``z`` ``(B, dim + label_dim)``, ``t`` a float, ``()`` or
    ``(B,)``; returns ``(B, dim)`` and ``(B, n_classes)``.
    """

    def __init__(
        self,
        dim: int,
        n_classes: int,
        label_dim: int,
        hidden: int = 128,
        depth: int = 3,
        time_embedding: int = 64,
        target: str = "eps",
    ):
        super().__init__()
        one_of(target, "target", DATA_TARGETS)
        self.target = target
        self.dim = count(dim, "dim")
        self.n_classes = count(n_classes, "n_classes", low=2)
        self.label_dim = count(label_dim, "label_dim")
        count(hidden, "hidden")
        count(depth, "depth")
        if count(time_embedding, "time_embedding", low=2) % 2:
            raise ValueError(f"time_embedding must be even, got time_embedding = {time_embedding}")
        self.time_features = time_embedding
        self.time = nn.Sequential(
            nn.Linear(time_embedding, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.inp = nn.Linear(dim + label_dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.data_head = nn.Linear(hidden, dim)
        self.label_head = nn.Linear(hidden, n_classes)

    def forward(self, z: Tensor, t) -> tuple[Tensor, Tensor]:
        floating(z, "z")
        width = self.dim + self.label_dim
        if z.ndim != 2 or z.shape[1] != width:
            raise ValueError(f"z must have shape (batch, {width}), got z of shape {tuple(z.shape)}")
        param = self.inp.weight
        if z.dtype != param.dtype or z.device != param.device:
            raise TypeError(
                f"z must have the dtype and device of the network's parameters, got z of dtype "
                f"{z.dtype} on {z.device} for parameters of dtype {param.dtype} on {param.device}"
            )
        check = Deferred()
        check.finite(z, "z")
        t = check.time(t, like=z)
        check.done()
        t = t.reshape(()).expand(z.shape[0]) if t.numel() == 1 else t
        if t.shape != (z.shape[0],):
            raise ValueError(
                f"t must be a float, a 0-d tensor or have shape (batch,) = ({z.shape[0]},), got t "
                f"of shape {tuple(t.shape)}"
            )
        c = self.time(sinusoidal_embedding(t, self.time_features))
        h = self.inp(z)
        for layer in self.layers:
            h = h + layer(F.silu(h + c))
        h = F.silu(h)
        return self.data_head(h), self.label_head(h)


def _joint_output(model: Callable, z: Tensor, t, dim: int, n_classes: int):
    """``model(z, t)`` checked to return ``(x_pred (B, dim), logits (B, K))``."""
    out = model(z, t)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"a joint model returns a pair (x_pred, logits), got {type(out).__name__} from "
            f"{type(model).__name__}"
        )
    x_pred, logits = out
    returned_shape(x_pred, (z.shape[0], dim), "the joint model's data head")
    returned_shape(logits, (z.shape[0], n_classes), "the joint model's label head")
    return x_pred, logits


def multitask_loss(
    model: Callable,
    x0: Tensor,
    joint: JointProcess,
    label=None,
    *,
    label_weight: float = 1.0,
    t_sampler: Callable | None = None,
    generator: torch.Generator | None = None,
    parts: bool = False,
):
    r"""The multi-task loss of the multi-modal bound: denoising MSE plus label cross-entropy.

    .. math::
        L = \mathbb E\big[\lVert F_\theta(z_t, t) - y_{\text{target}}\rVert^2
            - \lambda\log p_\theta(y \mid z_t)\big],

    :math:`z_t` = ``joint.marginal(x0, label, t, eps)`` with :math:`t \sim` ``t_sampler``
    (default uniform on :math:`[10^{-3}, 1)`, :func:`diffcore.train.uniform_time`), then
    :math:`\varepsilon \sim \mathcal N(0, I_{d + m})`; the target is the model's ``target``
    attribute (``"x0"`` when it has none): :math:`x_0`, or the data block of
    :math:`\varepsilon` (``"eps"``); :math:`\lambda` = ``label_weight``
    :math:`\ge 0`.  ``model(z_t, t) -> (x_pred, logits)`` takes ``t`` ``(batch,)``.  Called
    by :func:`diffcore.train.fit` as ``loss(model, x0, generator=g, label=labels)``.
    Returns the batch mean, a scalar; with ``parts=True`` a dict of the three batch means
    ``"denoising"``, ``"label"`` (the cross-entropy, in nats) and ``"total"``.  Shapes:
    ``x0`` ``(batch, d)``, ``label`` ``(batch,)``.
    """
    from diffcore.train import uniform_time

    target = _target_of(model)
    label_weight = real(label_weight, "label_weight")
    if label_weight < 0:
        raise ValueError(f"label_weight must be >= 0, got label_weight = {label_weight}")
    if label is None:
        raise ValueError("multitask_loss needs the labels: pass label=... (batch,) integers")
    z0 = joint.join(x0, label)
    label = _check_labels(label, joint.n_classes, x0.shape[0], x0.device)
    n = x0.shape[0]
    t = (t_sampler or uniform_time())(n, generator)
    t = as_time(returned_shape(t, (n,), "t_sampler"), like=x0, name="t_sampler's times")
    device = generator.device if generator is not None else x0.device
    eps = torch.randn(z0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
    z_t = joint.process.marginal(z0, t, eps)
    x_pred, logits = _joint_output(model, z_t, t, x0.shape[1], joint.n_classes)
    wanted = x0 if target == "x0" else eps[:, : x0.shape[1]]
    denoising = ((x_pred - wanted) ** 2).sum(1).mean()
    cross_entropy = F.cross_entropy(logits, label)
    total = denoising + label_weight * cross_entropy
    if parts:
        return {"denoising": denoising, "label": cross_entropy, "total": total}
    return total


def train_joint(
    model: nn.Module,
    joint: JointProcess,
    data,
    steps: int,
    *,
    label_weight: float = 1.0,
    **fit_options,
) -> tuple[nn.Module, list[float]]:
    """Train a joint model on :func:`multitask_loss` with :func:`diffcore.train.fit`.

    ``data``: a tuple ``(x, labels)`` of tensors or a sampler ``(n, generator) -> (x,
    labels)`` (e.g. :meth:`ExactJoint.sample`).  ``fit_options`` go to
    :func:`diffcore.train.fit` (``lr``, ``batch_size``, ``ema_decay``, ``generator``, ...).
    Returns ``(ema_model, losses)`` as :func:`diffcore.train.fit` does.
    """
    from diffcore.train import fit

    _target_of(model)
    loss = functools.partial(multitask_loss, joint=joint, label_weight=label_weight)
    return fit(model, loss, data, steps, **fit_options)


def joint_denoiser(model: Callable, joint: JointProcess) -> Callable:
    r"""A joint model as a denoiser of :math:`z`: :math:`D(z, t) = [\hat x_0, \sum_k
    p_\theta(k \mid z_t) E_k]`.

    The data block converts the data head's prediction (``model.target``, default ``"x0"``)
    to :math:`\hat x_0`
    (:func:`diffcore.targets.convert` on :math:`x_t`); the label block is the posterior mean
    of the embedding under the label head's softmax.  With :class:`ExactJoint` this is
    :meth:`ExactJoint.denoise`.  Shapes: ``D(z, t)`` maps ``(B, d + m)`` to the same.
    """
    target = _target_of(model)

    def denoiser(z: Tensor, t) -> Tensor:
        x_t, _ = joint.split(z)
        x_pred, logits = _joint_output(model, z, t, x_t.shape[1], joint.n_classes)
        if target != "x0":
            x_pred = convert(x_pred, target, "x0", x_t, t, joint.process)
        return torch.cat([x_pred, torch.softmax(logits, dim=-1) @ joint.embedding.to(z)], dim=1)

    return denoiser


def label_classifier(model: Callable, joint: JointProcess) -> Callable:
    r"""The label head as a classifier ``log_prob_class(z, t, label) -> (B,)``:
    :math:`\log p_\theta(y = \text{label} \mid z_t)` (a log-softmax of the logits).

    It carries ``n_classes``, as :func:`diffcore.guidance.classifier_guided_denoiser` reads.
    Shapes: ``z`` ``(B, d + m)``, ``label`` an int or ``(B,)``; returns ``(B,)``.
    """

    def log_prob_class(z: Tensor, t, label) -> Tensor:
        x_t, _ = joint.split(z)
        _, logits = _joint_output(model, z, t, x_t.shape[1], joint.n_classes)
        label = _check_labels(label, joint.n_classes, z.shape[0], z.device)
        return torch.log_softmax(logits, dim=-1).gather(1, label[:, None])[:, 0]

    log_prob_class.n_classes = joint.n_classes
    return log_prob_class


def conditional_denoiser(model: Callable, joint: JointProcess, label, w: float = 1.0) -> Callable:
    r"""The class-conditional denoiser from the joint model alone: classifier guidance of
    :func:`joint_denoiser` by its own label head (:func:`label_classifier`),

    .. math::
        D_c(z, t) = D(z, t) + w\,\frac{\sigma_t^2}{\alpha_t}\,
            \nabla_z\log p_\theta(c \mid z_t).

    With ``w = 1`` and :class:`ExactJoint` it is exactly :math:`\mathbb E[z_0 \mid z_t, y = c]
    = [D_c(x_t), E_c]`.  ``label``: an int or ``(B,)``.  Needs :math:`\alpha_t > 0`.
    Shapes: maps ``(B, d + m)`` to the same.
    """
    denoiser = joint_denoiser(model, joint)
    classifier = label_classifier(model, joint)  # checks the label's range against K
    return classifier_guided_denoiser(denoiser, classifier, joint.process, label, w)


def _sampler(sampler) -> Callable:
    if isinstance(sampler, str):
        one_of(sampler, "sampler", tuple(SAMPLERS))
        return SAMPLERS[sampler]
    if not callable(sampler):
        raise TypeError(f"sampler must be a name or a callable, got {type(sampler).__name__}")
    return sampler


def joint_sample(
    model: Callable,
    joint: JointProcess,
    z: Tensor,
    ts,
    sampler="heun",
    **options,
) -> tuple[Tensor, Tensor]:
    """Generate labelled pairs: run ``sampler`` on :func:`joint_denoiser` from ``z`` at
    ``ts[0]`` down to ``ts[-1]``, then decode the label with the label head there (argmax).

    ``sampler``: a name of :data:`diffcore.samplers.SAMPLERS` or a sampler; ``options`` go to
    it (``generator``, ``callback``, ...).  Shapes: ``z`` ``(B, d + m)``; returns ``x``
    ``(B, d)`` and ``label`` ``(B,)``.
    """
    run = _sampler(sampler)
    out = run(joint_denoiser(model, joint), z, ts, joint.process, **options)
    x, _ = joint.split(out)
    _, logits = _joint_output(model, out, ts[-1], x.shape[1], joint.n_classes)
    return x, logits.argmax(dim=-1)


def conditional_sample(
    model: Callable,
    joint: JointProcess,
    label,
    z: Tensor,
    ts,
    sampler="heun",
    w: float = 1.0,
    **options,
) -> Tensor:
    """Generate data of class ``label``: ``sampler`` on :func:`conditional_denoiser`.

    Exact in law, up to the sampler's discretisation, when ``model`` is :class:`ExactJoint`
    and ``w = 1``.  ``z``: the start at ``ts[0]`` (a draw of :math:`p_{t_0}(z \\mid c)`, or
    noise).  Shapes: ``z`` ``(B, d + m)``; returns the data block ``(B, d)``.
    """
    run = _sampler(sampler)
    out = run(conditional_denoiser(model, joint, label, w), z, ts, joint.process, **options)
    return joint.split(out)[0]


def replacement_sample(
    model: Callable,
    joint: JointProcess,
    label,
    z: Tensor,
    ts,
    eta: float = 1.0,
    **run,
) -> Tensor:
    r"""Generate data of class ``label`` by replacing the label block (an approximation).

    Before each step from :math:`t` to :math:`s`, the label block is overwritten by a fresh
    draw of :math:`q(e_t \mid y = c)`, :math:`\alpha_t E_c + \sigma_t\xi`; then the DDIM
    transition (:func:`diffcore.stepping.ddim_step`, ``eta = 1``: DDPM's ancestral step) moves
    the whole state with :func:`joint_denoiser`.  Not exact, even for :class:`ExactJoint`:
    the denoiser conditions on the noisy label block, not on :math:`y = c`.  Options of
    :func:`diffcore.stepping.integrate` (``generator``, ``callback``, ...).  Shapes: ``z``
    ``(B, d + m)``; returns the data block ``(B, d)``.
    """
    eta = real(eta, "eta")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got eta = {eta}")
    joint.split(z)  # checks the shape
    known = joint.embed(label, z)  # E_c per sample, (B, m)

    def update(k, z):
        x, e = joint.split(z)
        e = k.t.alpha * known + k.t.sigma * k.noise(like=e)
        z = torch.cat([x, e], dim=1)
        return k.ddim(z, k.D(z), eta)

    out = integrate(update, joint_denoiser(model, joint), z, ts, joint.process, **run)
    return joint.split(out)[0]
