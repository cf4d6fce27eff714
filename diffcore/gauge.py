r"""What the network learns: gauge freedom, conservativity and intrinsic dimension.

A learned field :math:`s_\theta(x, t) \approx \nabla\log p_t(x)` is a vector field, not a
gradient: nothing in denoising score matching makes it conservative, and trained networks are
measurably not (their Jacobian is not symmetric).  Yet they sample well.  This module makes the
reason checkable (Horvat & Pfister; the Wasserstein-gradient-flow reading of diffusion).

**1. Conservativity.**  A field is a gradient exactly where its Jacobian
:math:`J = \partial s/\partial x` is symmetric (on a simply connected domain).
:func:`asymmetry` measures the relative size of the antisymmetric part,

.. math::
    \begin{aligned}
    a(x) &= \frac{\lVert J - J^\top\rVert_F}{2\lVert J\rVert_F}
          = \frac{\lVert A\rVert_F}{\sqrt{\lVert S\rVert_F^2 + \lVert A\rVert_F^2}}
          \in [0, 1], \\
    S &= \tfrac12(J + J^\top), \qquad A = \tfrac12(J - J^\top),
    \end{aligned}

0 for a gradient (for :math:`s(x) = -x + cRx` in 2-D, :math:`R` the rotation by 90 degrees,
:math:`a = c/\sqrt{1 + c^2}`).  Globally, a gradient's line integral
:math:`\int_\gamma s\cdot d\gamma` (:func:`line_integral`, Gauss–Legendre in the path
parameter) depends only on the end points: for the exact score it is
:math:`\log p_t(b) - \log p_t(a)`.  Around a closed loop it is, by Stokes, the flux of the curl
:math:`\partial_1 s_2 - \partial_2 s_1` through the enclosed area: for :math:`-x + cRx` the curl
is :math:`2c`, so two paths between the same ends differ by :math:`2c` times the signed area
between them.

**2. Gauge freedom.**  Write a field as :math:`s = \nabla\log p_t + r`.  The probability-flow ODE
:math:`\dot x = f(t)x - \tfrac12 g^2(t) s` transports :math:`p_t` (the continuity equation
:math:`\partial_t p + \nabla\cdot(pv) = 0` holds) if and only if

.. math::
    \nabla\cdot(p_t\, r) = 0, \qquad\text{i.e.}\qquad
    \frac{\nabla\cdot(p_t r)}{p_t} = \nabla\cdot r + r\cdot\nabla\log p_t = 0

(:func:`gauge_residual`), and the same holds for the reverse SDE
:math:`dx = [f x - g^2 s]\,dt + g\,d\bar w`.  So the *exact* sampling of the marginals
constrains the field only up to such a gauge term: conservativity is neither necessary nor
sufficient (Horvat & Pfister).  A family of gauge terms for any law: with :math:`J` a constant
skew-symmetric matrix, :math:`r = cJ\nabla\log p_t` has
:math:`\nabla\cdot(p J\nabla\log p) = \nabla\cdot(J\nabla p) = \sum_{ij}J_{ij}\partial_i\partial_j p
= 0` (:func:`gauge_field`).  The marginals stay, the flow map changes (for isotropic Gaussian
data it is the exact map followed by a rotation, see the tests).  A rotation about the wrong
centre, :math:`r = cJ(x - x_c)`, is not a gauge term: it moves the marginals.

Every gauge term is orthogonal to all gradients in :math:`L^2(p_t)`: for any :math:`\psi`,
:math:`\mathbb E_p[r\cdot\nabla\psi] = -\mathbb E_p[\psi\,\nabla\cdot(p r)/p] = 0`.  Hence the
:math:`L^2(p_t)` projection of a field onto gradients (the Helmholtz–Hodge projection,
:func:`fit_potential`) returns the exact score when the field is exact up to a gauge: what a
sampler needs from the network is its conservative part in this weighted sense.
:func:`continuity_residual` and :func:`fokker_planck_residual` check the transport directly,
by autograd in :math:`x` and :math:`t`.

**3. Intrinsic dimension.**  For data on a :math:`k`-dimensional manifold and small
:math:`\sigma_t`, :math:`p_t` is a thin tube around the (scaled) manifold: across it,
:math:`\log p_t \approx -\mathrm{dist}^2/(2\sigma_t^2)`, along it nearly flat.  The spectrum
of :math:`\sigma_t^2\,\tfrac12(J + J^\top)` (:func:`score_spectrum`) then has :math:`d - k`
eigenvalues near :math:`-1` (normal directions) and :math:`k` near 0 (tangent ones).  For a
Gaussian :math:`\mathcal N(\mu, \Sigma)` the spectrum is exact:
:math:`-\sigma_t^2/(\alpha_t^2\lambda_i + \sigma_t^2)`, :math:`\lambda_i` the eigenvalues of
:math:`\Sigma`.  :func:`intrinsic_dimension` counts the eigenvalues above ``-threshold``.  The
count depends on the scale :math:`\sigma_t`: too small and it sees the data's own thickness
(or the gaps between samples), too large and everything is noise (count 0).

Fields are callables ``s(x, t)`` with ``x`` ``(batch, d)`` and ``t`` a float or ``(batch,)``,
returning ``(batch, d)``, that treat samples independently: a network, an exact score
``lambda x, t: mixture.score(x, t, process)``, or a perturbed one.  Derivatives are exact
(autograd, one backward pass per coordinate: meant for small ``d``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from diffcore.checks import (
    as_time,
    between,
    count,
    finite,
    floating,
    nonnegative,
    per_sample,
    positive,
    real,
    returned,
    returned_shape,
)
from diffcore.likelihood import value_and_divergence
from diffcore.processes import Process, check_process

__all__ = [
    "field_jacobian",
    "asymmetry",
    "StraightPath",
    "ArcPath",
    "straight_path",
    "arc_path",
    "gauss_legendre",
    "line_integral",
    "gauge_residual",
    "gauge_field",
    "velocity_field",
    "reverse_sde_drift",
    "continuity_residual",
    "fokker_planck_residual",
    "Potential",
    "fit_potential",
    "score_spectrum",
    "intrinsic_dimension",
]


# -- checks ------------------------------------------------------------------------------------
def _callable(fn, name: str) -> Callable:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {name} of type {type(fn).__name__}")
    return fn


def _points(x, name: str = "x") -> Tensor:
    """A finite float32/float64 batch of points ``(batch, d)``, batch and d at least 1."""
    floating(x, name)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape (batch, d) with batch, d >= 1, got {tuple(x.shape)}"
        )
    return finite(x, name)


def _time(t, x: Tensor) -> Tensor:
    """``t`` checked to lie in [0, 1] and to be a float, ``()``, ``(1,)`` or ``(batch,)``."""
    t = as_time(t, like=x)
    per_sample(t, x)  # raises for a shape that does not broadcast
    if t.ndim > 1:
        raise ValueError(f"t must be a float or have shape (batch,), got {tuple(t.shape)}")
    return t


def _coef(value: Tensor, x: Tensor) -> Tensor:
    return per_sample(torch.as_tensor(value).to(dtype=x.dtype, device=x.device), x)


def _grad_log_prob(log_prob: Callable, x: Tensor, t, create_graph: bool = False):
    """``log_prob(x, t)`` ``(batch,)`` and its gradient in ``x`` (and in ``t`` when ``t``
    requires grad)."""
    lp = returned_shape(log_prob(x, t), (x.shape[0],), "log_prob(x, t)")
    inputs = (x, t) if isinstance(t, Tensor) and t.requires_grad else (x,)
    grads = torch.autograd.grad(lp.sum(), inputs, create_graph=create_graph)
    return lp, grads


# -- 1. conservativity -------------------------------------------------------------------------
def field_jacobian(field: Callable, x: Tensor, t, create_graph: bool = False) -> Tensor:
    r"""The Jacobian :math:`J_{bij} = \partial s_i/\partial x_j` of ``field`` at each sample.

    By autograd, one backward pass per output coordinate (``field`` must treat the samples
    independently).  ``create_graph=True`` keeps the graph (for derivatives of :math:`J`).
    Shapes: ``x`` ``(batch, d)``, ``t`` a float or ``(batch,)``; returns ``(batch, d, d)``.
    """
    _callable(field, "field")
    _points(x)
    _time(t, x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = returned(field(xg, t), xg, "field(x, t)")
        rows = []
        for i in range(x.shape[1]):
            (row,) = torch.autograd.grad(
                out[:, i].sum(),
                xg,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            rows.append(torch.zeros_like(xg) if row is None else row)
    jac = torch.stack(rows, dim=1)
    return jac if create_graph else jac.detach()


def asymmetry(field: Callable, x: Tensor, t) -> Tensor:
    r"""The relative size of the antisymmetric part of the Jacobian,
    :math:`\lVert J - J^\top\rVert_F / (2\lVert J\rVert_F)`, in :math:`[0, 1]`.

    0 for a gradient field (to round-off), 1 for a pure rotation; 0 where :math:`J = 0`.
    Shapes: ``x`` ``(batch, d)``, ``t`` a float or ``(batch,)``; returns ``(batch,)``.
    """
    jac = field_jacobian(field, x, t)
    anti = torch.linalg.matrix_norm(jac - jac.transpose(1, 2))
    norm = torch.linalg.matrix_norm(jac)
    return torch.where(norm > 0, anti / (2 * norm.clamp_min(torch.finfo(x.dtype).tiny)), 0.0)


class StraightPath:
    r"""The segment :math:`\gamma(\tau) = a + \tau(b - a)`, :math:`\tau \in [0, 1]`.

    Shapes: ``a``, ``b`` ``(batch, d)`` or ``(d,)`` (broadcast against each other);
    ``path(tau)`` and ``path.velocity(tau)`` are ``(batch, d)`` for a scalar ``tau``.
    """

    def __init__(self, a: Tensor, b: Tensor):
        a, b = _ends(a, b)
        self.a, self.b = a, b

    def __call__(self, tau) -> Tensor:
        return self.a + tau * (self.b - self.a)

    def velocity(self, tau) -> Tensor:
        """:math:`\\gamma'(\\tau) = b - a`."""
        return (self.b - self.a).clone()


class ArcPath:
    r"""The quadratic Bézier curve from ``a`` to ``b`` with control point ``control``:
    :math:`\gamma(\tau) = (1-\tau)^2 a + 2\tau(1-\tau)\,c + \tau^2 b`.

    With the chord it encloses (in 2-D) the signed area
    :math:`\tfrac13\,(c - a)\times(b - a)` (two thirds of the triangle :math:`a, c, b`;
    positive when the loop arc-then-chord-back runs counter-clockwise), see
    :meth:`signed_area`.  Shapes: ``a``, ``b``, ``control`` ``(batch, d)`` or ``(d,)``.
    """

    def __init__(self, a: Tensor, b: Tensor, control: Tensor):
        a, b = _ends(a, b)
        control = finite(floating(control, "control"), "control").to(a)
        try:
            a, b, control = torch.broadcast_tensors(a, b, control)
        except RuntimeError:
            raise ValueError(
                f"control of shape {tuple(control.shape)} does not broadcast against a and b of "
                f"shape {tuple(a.shape)}"
            ) from None
        self.a, self.b, self.control = a, b, control

    def __call__(self, tau) -> Tensor:
        return (1 - tau) ** 2 * self.a + 2 * tau * (1 - tau) * self.control + tau**2 * self.b

    def velocity(self, tau) -> Tensor:
        """:math:`\\gamma'(\\tau) = 2(1-\\tau)(c - a) + 2\\tau(b - c)`."""
        return 2 * (1 - tau) * (self.control - self.a) + 2 * tau * (self.b - self.control)

    def signed_area(self) -> Tensor:
        """The signed area between the arc and the chord (2-D only), shape ``(batch,)``."""
        if self.a.shape[-1] != 2:
            raise ValueError(f"signed_area is defined in 2-D, got d = {self.a.shape[-1]}")
        u, v = self.control - self.a, self.b - self.a
        return (u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]) / 3


def _ends(a, b) -> tuple[Tensor, Tensor]:
    for value, name in ((a, "a"), (b, "b")):
        finite(floating(value, name), name)
        if value.ndim not in (1, 2) or value.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (d,) or (batch, d), got {tuple(value.shape)}")
    b = b.to(a)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"a and b must have the same dimension d, got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        raise ValueError(
            f"a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)} do not broadcast"
        ) from None
    return a, b


def straight_path(a: Tensor, b: Tensor) -> StraightPath:
    """The segment from ``a`` to ``b`` (:class:`StraightPath`).  Shapes: ``(batch, d)`` or
    ``(d,)``."""
    return StraightPath(a, b)


def arc_path(a: Tensor, b: Tensor, bend) -> ArcPath:
    r"""A bent path from ``a`` to ``b``: the quadratic Bézier curve (:class:`ArcPath`) whose
    control point is the midpoint moved by ``bend``.

    ``bend`` is a tensor ``(d,)`` or ``(batch, d)`` (the offset itself) or, in 2-D, a number:
    the offset ``bend`` times the chord :math:`b - a` turned by +90 degrees (``bend > 0`` bends
    to the left of the direction of travel; the loop arc-then-chord-back then runs clockwise,
    signed area :math:`-\tfrac13\,\mathrm{bend}\,\lVert b - a\rVert^2`).
    """
    a, b = _ends(a, b)
    if isinstance(bend, Tensor):
        offset = finite(floating(bend, "bend"), "bend").to(a)
    else:
        bend = real(bend, "bend")
        if a.shape[-1] != 2:
            raise ValueError(
                f"a number bend is defined in 2-D (the chord turned by 90 degrees), got d = "
                f"{a.shape[-1]}: give the offset of the control point as a tensor"
            )
        chord = b - a
        offset = bend * torch.stack([-chord[..., 1], chord[..., 0]], dim=-1)
    return ArcPath(a, b, 0.5 * (a + b) + offset)


def gauss_legendre(n: int, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
    r"""The ``n``-point Gauss–Legendre rule on :math:`[0, 1]`: nodes and weights, each ``(n,)``.

    Exact for polynomials of degree :math:`\le 2n - 1`; for an integrand analytic in a
    neighbourhood of :math:`[0, 1]` the error falls geometrically in :math:`n`.
    """
    n = count(n, "n")
    nodes, weights = np.polynomial.legendre.leggauss(n)
    nodes = torch.as_tensor(0.5 * (nodes + 1), dtype=dtype, device=device)
    return nodes, torch.as_tensor(0.5 * weights, dtype=dtype, device=device)


def _value_and_tangent(path: Callable, tau: Tensor) -> tuple[Tensor, Tensor]:
    r"""``path(tau)`` and its derivative in the scalar ``tau``, by the double-vjp trick: the
    vjp :math:`u \mapsto u\cdot\gamma'(\tau)` is linear in ``u``, its gradient in ``u`` is
    :math:`\gamma'(\tau)`."""
    with torch.enable_grad():
        tau = tau.detach().requires_grad_(True)
        point = path(tau)
        if not isinstance(point, Tensor) or not point.requires_grad:
            raise ValueError(
                "path(tau) must be differentiable in tau (a torch function of tau), or give the "
                "path a velocity(tau) method"
            )
        probe = torch.zeros_like(point, requires_grad=True)
        (dot,) = torch.autograd.grad(point, tau, grad_outputs=probe, create_graph=True)
        (tangent,) = torch.autograd.grad(dot, probe)
    return point.detach(), tangent.detach()


def line_integral(field: Callable, path: Callable, t, n: int = 64) -> Tensor:
    r"""The line integral :math:`\int_0^1 s(\gamma(\tau), t)\cdot\gamma'(\tau)\,d\tau` per sample.

    ``path(tau)`` returns the points ``(batch, d)`` at the scalar ``tau`` (a 0-d tensor);
    its tangent is ``path.velocity(tau)`` when the path has one (:func:`straight_path`,
    :func:`arc_path`), else the exact derivative of ``path`` in ``tau`` by autograd (two
    backward passes: the derivative of a vector-Jacobian product).  Quadrature:
    ``n``-point Gauss–Legendre (:func:`gauss_legendre`): exact when
    :math:`s(\gamma(\tau))\cdot\gamma'(\tau)` is a polynomial of degree :math:`\le 2n - 1` (a
    linear field along a straight path or a quadratic arc: degree :math:`\le 3`), otherwise
    with an error that falls geometrically in ``n`` for smooth fields.  For the exact score it
    equals :math:`\log p_t(\gamma(1)) - \log p_t(\gamma(0))`.
    Shapes: ``t`` a float or ``(batch,)``; returns ``(batch,)``.
    """
    _callable(field, "field")
    _callable(path, "path")
    n = count(n, "n")
    start = path(torch.zeros((), dtype=torch.float64))
    _points(start, "path(0)")
    t = _time(t, start)
    nodes, weights = gauss_legendre(n, dtype=start.dtype, device=start.device)
    total = torch.zeros(start.shape[0], dtype=start.dtype, device=start.device)
    for tau, w in zip(nodes, weights, strict=True):
        if hasattr(path, "velocity"):
            point = path(tau)
            tangent = returned(path.velocity(tau), point, "path.velocity(tau)")
        else:
            point, tangent = _value_and_tangent(path, tau)
        point = returned(point, start, "path(tau)")
        total = total + w * (returned(field(point, t), point, "field(x, t)") * tangent).sum(1)
    return total.detach()


# -- 2. gauge decomposition --------------------------------------------------------------------
def gauge_residual(r: Callable, log_prob: Callable, x: Tensor, t) -> Tensor:
    r""":math:`\nabla\cdot(p_t r)/p_t = \nabla\cdot r + r\cdot\nabla\log p_t` at each sample.

    Zero everywhere exactly when adding ``r`` to the score leaves the PF-ODE's (and the
    reverse SDE's) marginals unchanged.  ``r(x, t)`` ``(batch, d)``, ``log_prob(x, t)``
    ``(batch,)``; exact divergence (:func:`diffcore.likelihood.value_and_divergence`) and
    gradient by autograd.  Shapes: ``x`` ``(batch, d)``, ``t`` a float or ``(batch,)``;
    returns ``(batch,)``.
    """
    _callable(r, "r")
    _callable(log_prob, "log_prob")
    _points(x)
    _time(t, x)
    value, div = value_and_divergence(lambda y: r(y, t), x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        _, (grad,) = _grad_log_prob(log_prob, xg, t)
    return div + (value * grad).sum(1)


def _skew(skew, d: int | None = None) -> Tensor:
    if not isinstance(skew, Tensor):
        try:
            skew = torch.as_tensor(skew, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"skew must be a (d, d) tensor, got skew = {skew!r}") from err
    finite(floating(skew, "skew"), "skew")
    if skew.ndim != 2 or skew.shape[0] != skew.shape[1] or (d is not None and skew.shape[0] != d):
        want = "(d, d)" if d is None else f"({d}, {d})"
        raise ValueError(f"skew must have shape {want}, got {tuple(skew.shape)}")
    gap = (skew + skew.T).abs().max()
    scale = skew.abs().max()
    if gap > 8 * torch.finfo(skew.dtype).eps * scale:
        raise ValueError(
            f"skew must be skew-symmetric (skew.T == -skew), got max |skew + skew.T| = "
            f"{float(gap):.3g} for max |skew| = {float(scale):.3g}"
        )
    return skew


def gauge_field(score: Callable, skew, c: float = 1.0) -> Callable:
    r"""The gauged field :math:`s + c\,J s`, ``J = skew`` a constant skew-symmetric ``(d, d)``
    matrix (checked: a ``ValueError`` otherwise).

    For the exact score :math:`s = \nabla\log p_t`, the added term :math:`cJ\nabla\log p_t` is a
    gauge term (:math:`\nabla\cdot(p_t J\nabla\log p_t) = 0`): the marginals of the PF-ODE and
    of the reverse SDE stay :math:`p_t` for every process; the flow map changes.  Shapes: the
    result maps ``x`` ``(batch, d)`` and ``t`` to ``(batch, d)``.
    """
    _callable(score, "score")
    skew = _skew(skew)
    c = real(c, "c")

    def gauged(x: Tensor, t) -> Tensor:
        s = returned(score(x, t), x, "score(x, t)")
        if s.ndim != 2 or s.shape[1] != skew.shape[0]:
            raise ValueError(
                f"the gauge matrix skew is {tuple(skew.shape)} but the score has shape "
                f"{tuple(s.shape)}"
            )
        return s + c * s @ skew.to(s).T

    gauged.__doc__ = f"The score plus {c:g} J times the score, J skew-symmetric."
    return gauged


def velocity_field(score: Callable, process: Process) -> Callable:
    r"""The PF-ODE velocity of any score field: :math:`v(x, t) = f(t)\,x - \tfrac12 g^2(t)\,s(x, t)`.

    For a denoiser ``D`` and the score it implies this equals
    :func:`diffcore.targets.pf_ode_velocity` (tested).  Shapes: the result maps ``x``
    ``(batch, d)`` and ``t`` (float or ``(batch,)``) to ``(batch, d)``.
    """
    _callable(score, "score")
    check_process(process)

    def velocity(x: Tensor, t) -> Tensor:
        s = returned(score(x, t), x, "score(x, t)")
        tt = _time(t, x)
        return _coef(process.f(tt), x) * x - 0.5 * _coef(process.g2(tt), x) * s

    return velocity


def reverse_sde_drift(score: Callable, process: Process) -> Callable:
    r"""The drift of the reverse SDE :math:`dx = [f(t)x - g^2(t)s(x, t)]\,dt + g(t)\,d\bar w`,
    run from :math:`t = 1` down to 0.  Shapes as :func:`velocity_field`."""
    _callable(score, "score")
    check_process(process)

    def drift(x: Tensor, t) -> Tensor:
        s = returned(score(x, t), x, "score(x, t)")
        tt = _time(t, x)
        return _coef(process.f(tt), x) * x - _coef(process.g2(tt), x) * s

    return drift


def _residual_parts(log_prob: Callable, x: Tensor, t, second: bool):
    """``t`` as ``(batch,)``, and :math:`\\partial_t\\log p`, :math:`\\nabla\\log p` (and the
    Laplacian of :math:`\\log p` when ``second``), all detached."""
    tt = _time(t, x).expand(x.shape[0]).clone()
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        tg = tt.detach().requires_grad_(True)
        _, (d_x, d_t) = _grad_log_prob(log_prob, xg, tg, create_graph=second)
        lap = None
        if second:
            lap = sum(
                torch.autograd.grad(d_x[:, i].sum(), xg, retain_graph=True)[0][:, i]
                for i in range(x.shape[1])
            )
    return tt, d_t.detach(), d_x.detach(), None if lap is None else lap.detach()


def continuity_residual(velocity: Callable, log_prob: Callable, x: Tensor, t) -> Tensor:
    r"""The continuity residual :math:`\frac1{p}\big[\partial_t p + \nabla\cdot(p v)\big]
    = \partial_t\log p_t + \nabla\cdot v + v\cdot\nabla\log p_t` at each sample.

    Zero everywhere exactly when the ODE :math:`\dot x = v(x, t)` carries the densities
    ``log_prob(x, t)``.  Derivatives by autograd in ``x`` and ``t`` (``log_prob`` receives
    ``t`` as a ``(batch,)`` tensor, ``velocity`` too).  Shapes: ``x`` ``(batch, d)``, ``t`` a
    float or ``(batch,)``; returns ``(batch,)``.
    """
    _callable(velocity, "velocity")
    _callable(log_prob, "log_prob")
    _points(x)
    tt, d_t, d_x, _ = _residual_parts(log_prob, x, t, second=False)
    v, div = value_and_divergence(lambda y: velocity(y, tt), x)
    return d_t + div + (v * d_x).sum(1)


def fokker_planck_residual(
    drift: Callable, g2, log_prob: Callable, x: Tensor, t, *, reverse: bool = False
) -> Tensor:
    r"""The Fokker–Planck residual of :math:`dx = b(x, t)\,dt + g(t)\,dw`, divided by :math:`p`:

    .. math::
        \partial_t\log p + \nabla\cdot b + b\cdot\nabla\log p
        \mp \tfrac12 g^2(t)\big(\Delta\log p + \lVert\nabla\log p\rVert^2\big),

    with :math:`-` for an SDE run forward in time and :math:`+` (``reverse=True``) for one run
    from :math:`t = 1` down to 0 (:func:`reverse_sde_drift`), whose marginals obey
    :math:`\partial_t p = -\nabla\cdot(bp) - \tfrac12 g^2\Delta p`.  ``g2`` is a callable of
    ``t`` (``process.g2``) or a number.  Zero everywhere exactly when the SDE carries
    ``log_prob``.  Shapes: ``x`` ``(batch, d)``, ``t`` a float or ``(batch,)``; returns
    ``(batch,)``.
    """
    _callable(drift, "drift")
    _callable(log_prob, "log_prob")
    _points(x)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got reverse = {reverse!r}")
    tt, d_t, d_x, lap = _residual_parts(log_prob, x, t, second=True)
    if callable(g2):
        g2_t = torch.as_tensor(g2(tt)).to(x).expand(x.shape[0])
    else:
        g2_t = torch.full_like(tt, nonnegative(g2, "g2"))
    b, div = value_and_divergence(lambda y: drift(y, tt), x)
    sign = 1.0 if reverse else -1.0
    return d_t + div + (b * d_x).sum(1) + sign * 0.5 * g2_t * (lap + (d_x**2).sum(1))


class Potential:
    r"""A fitted potential :math:`\varphi(x) = \sum_k c_k\psi_k(x)` at one time ``t``, from
    :func:`fit_potential`.

    Calling it returns the conservative field :math:`\nabla\varphi` ``(batch, d)``;
    :meth:`potential` returns :math:`\varphi` ``(batch,)`` (up to an additive constant).
    Attributes: ``t`` (the fit time), ``centers`` ``(K, d)`` and ``width`` of the Gaussian
    bumps (in standardised coordinates), ``coef``, and ``fraction``: the share of the field's
    mean square (under the fit weights) that no gradient in the basis explains,
    :math:`\mathbb E\lVert s - \nabla\varphi\rVert^2 / \mathbb E\lVert s\rVert^2`.
    """

    def __init__(self, t, shift, scale, centers, width, coef, fraction):
        self.t, self.shift, self.scale = t, shift, scale
        self.centers, self.width, self.coef, self.fraction = centers, width, coef, fraction

    def _features(self, x: Tensor, grad: bool) -> Tensor:
        """Basis values ``(B, K)`` or their gradients in ``x`` ``(B, d, K)``."""
        y = (x - self.shift.to(x)) / self.scale
        d = y.shape[1]
        iu, ju = torch.triu_indices(d, d, device=x.device)
        diff = y[:, None, :] - self.centers.to(x)[None]  # (B, M, d)
        bump = torch.exp(-0.5 * (diff**2).sum(-1) / self.width**2)  # (B, M)
        if not grad:
            quad = y[:, iu] * y[:, ju]
            return torch.cat([y, quad, bump], dim=1)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        lin = eye.expand(y.shape[0], d, d)  # d/dy_a of y_k: delta_ak
        # d/dy_a (y_i y_j) = delta_ai y_j + delta_aj y_i
        quad = eye[None, :, iu] * y[:, None, ju] + eye[None, :, ju] * y[:, None, iu]
        dbump = -(diff / self.width**2).transpose(1, 2) * bump[:, None, :]  # (B, d, M)
        return torch.cat([lin, quad, dbump], dim=2) / self.scale

    def __call__(self, x: Tensor, t=None) -> Tensor:
        _points(x)
        if t is not None:
            tt = _time(t, x)
            if not bool(torch.all(tt == self.t)):
                raise ValueError(
                    f"this potential was fitted at t = {self.t:g}, got t = {tt.flatten()[:6]}"
                )
        if x.shape[1] != self.centers.shape[1]:
            raise ValueError(f"x must have d = {self.centers.shape[1]}, got {tuple(x.shape)}")
        return self._features(x, grad=True) @ self.coef.to(x)

    def potential(self, x: Tensor) -> Tensor:
        """:math:`\\varphi(x)`, shape ``(batch,)``."""
        _points(x)
        return self._features(x, grad=False) @ self.coef.to(x)


def fit_potential(
    field: Callable,
    x: Tensor,
    t,
    *,
    n_centers: int = 128,
    width: float | None = None,
    ridge: float = 1e-6,
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Potential:
    r"""The :math:`L^2(p)` projection of a field onto gradients: least squares for
    :math:`\min_\varphi \sum_n w_n\lVert\nabla\varphi(x_n) - s(x_n, t)\rVert^2`.

    The samples ``x`` stand for :math:`p` (draws of :math:`p_t`: the Helmholtz–Hodge
    projection in :math:`L^2(p_t)`; or quadrature nodes with ``weights``).  The potential is
    linear in its coefficients, so the fit is one linear solve (no training):
    :math:`\varphi` is a quadratic polynomial (exact for Gaussian data, whose score is affine)
    plus ``n_centers`` Gaussian bumps :math:`\exp(-\lVert y - z_k\rVert^2/(2h^2))` centred at
    samples drawn from ``x`` (with ``generator``), in coordinates :math:`y` standardised by the
    samples' mean and rms spread.  ``width`` :math:`h` (standardised units): default the
    median distance from a centre to its nearest other centre, times 3.  ``ridge`` damps
    the normal equations relative to their mean diagonal.  A gauge part of the field (one with
    :math:`\nabla\cdot(p r) = 0`) is orthogonal to every gradient in :math:`L^2(p)` and drops
    out, up to the sampling error :math:`O(N^{-1/2})` of :math:`p`.  Cost: one field
    evaluation and a solve of size :math:`K = d + d(d+1)/2 + n_{\text{centers}}`; ``n_centers=0``
    fits a quadratic potential.
    Shapes: ``x`` ``(N, d)``, ``t`` a float, ``weights`` ``(N,)`` nonnegative (default equal);
    returns a :class:`Potential`.
    """
    _callable(field, "field")
    _points(x)
    t = _time(t, x)
    if t.ndim:
        raise ValueError(f"fit_potential fits at one time, got t of shape {tuple(t.shape)}")
    n_centers = count(n_centers, "n_centers", low=0)
    ridge = nonnegative(ridge, "ridge")
    n, d = x.shape
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
    else:
        finite(floating(weights, "weights"), "weights")
        if weights.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be nonnegative with a positive sum")
        w = (weights / weights.sum()).to(x)
    x = x.detach()
    with torch.no_grad():
        s = returned(field(x, float(t)), x, "field(x, t)").detach()
    shift = (w[:, None] * x).sum(0)
    scale = float(torch.sqrt((w[:, None] * (x - shift) ** 2).sum() / d))
    if not scale > 0:
        raise ValueError("x must have a positive spread (all the samples coincide)")
    y = (x - shift) / scale
    m = min(n_centers, n)
    pick = torch.randperm(n, generator=generator)[:m].to(x.device)
    centers = y[pick]
    if width is None:
        if m > 1:
            gaps = torch.cdist(centers, centers)
            gaps.fill_diagonal_(float("inf"))
            width = 3.0 * float(gaps.min(1).values.median())
        else:
            width = 1.0
    width = positive(width, "width")
    fit = Potential(float(t), shift, scale, centers, width, None, None)
    design = fit._features(x, grad=True)  # (N, d, K)
    weighted = design * w[:, None, None].sqrt()
    flat = weighted.reshape(n * d, -1)
    target = (s * w[:, None].sqrt()).reshape(n * d)
    normal = flat.T @ flat
    rhs = flat.T @ target
    damp = ridge * normal.diagonal().mean() + torch.finfo(x.dtype).eps
    normal = normal + damp * torch.eye(normal.shape[0], dtype=x.dtype, device=x.device)
    chol, info = torch.linalg.cholesky_ex(normal)
    if int(info) == 0:
        coef = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
    else:
        coef = torch.linalg.lstsq(normal, rhs[:, None]).solution[:, 0]
    fit.coef = coef
    resid = ((design @ coef - s) ** 2).sum(1)
    fit.fraction = float((w * resid).sum() / (w * (s**2).sum(1)).sum().clamp_min(1e-300))
    return fit


# -- 3. intrinsic dimension --------------------------------------------------------------------
def score_spectrum(field: Callable, x: Tensor, t, process: Process) -> Tensor:
    r"""The eigenvalues of :math:`\sigma_t^2\,\tfrac12(J + J^\top)`, :math:`J = \partial s/\partial x`,
    in increasing order.

    For the exact score this is :math:`\sigma_t^2\nabla^2\log p_t`; for Gaussian data
    :math:`\mathcal N(\mu, \Sigma)` its eigenvalues are exactly
    :math:`-\sigma_t^2/(\alpha_t^2\lambda_i + \sigma_t^2)`.  Near a :math:`k`-dimensional data
    manifold at small :math:`\sigma_t`: :math:`d - k` of them near :math:`-1`, :math:`k` near
    0.  Shapes: ``x`` ``(batch, d)``, ``t`` a float or ``(batch,)``; returns ``(batch, d)``.
    """
    check_process(process)
    jac = field_jacobian(field, x, t)
    sigma2 = process.sigma(_time(t, x)).to(x) ** 2
    sym = 0.5 * (jac + jac.transpose(1, 2))
    return torch.linalg.eigvalsh(per_sample(sigma2, sym) * sym)


def intrinsic_dimension(
    field: Callable, x: Tensor, t, process: Process, threshold: float = 0.5
) -> Tensor:
    r"""The local dimension :math:`d - \#\{\text{eigenvalues} < -\text{threshold}\}` of
    :func:`score_spectrum`: the directions in which the noised density is *not* saturated.

    ``threshold`` in :math:`(0, 1)`: the eigenvalue of a normal direction is
    :math:`-\sigma_t^2/(\sigma_t^2 + \alpha_t^2\ell)` for a data thickness :math:`\ell \ll
    \sigma_t^2/\alpha_t^2` (near :math:`-1`), that of a tangent one near 0; 0.5 sits halfway.
    Shapes: ``x`` ``(batch, d)``, ``t`` a float or ``(batch,)``; returns ``(batch,)``
    (``int64``).
    """
    threshold = between(threshold, "threshold", 0, 1, open_low=True, open_high=True)
    eig = score_spectrum(field, x, t, process)
    return x.shape[1] - (eig < -threshold).sum(1)
