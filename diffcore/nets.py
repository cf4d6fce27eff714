r"""Time-conditioned networks with the signature of every model in diffcore: ``net(x, t[, label])``.

:class:`MLP` is for low-dimensional data ``(batch, d)``, :class:`UNet` for small images
``(batch, channels, height, width)``.  A network predicts whatever target it was trained for
(:mod:`diffcore.train`); :func:`diffcore.targets.as_denoiser` turns it into a denoiser.

Time enters through sinusoidal features of :math:`1000\,t` (the positional embedding of DDPM,
continuous in ``t``), followed by a small MLP.  We embed ``t`` rather than the log-SNR
:math:`\lambda_t` because ``t`` is finite on all of [0, 1] for every process, while
:math:`\lambda_t` is infinite at the ends of VP and Linear; the network learns the schedule.

With ``n_classes=K`` a network is class-conditional: labels ``0..K-1`` are embedded, and the
extra index ``K`` (the ``null_label`` property), used when ``label`` is None, stands for "no class",
which classifier-free guidance needs.  Parameters live where the caller puts them
(``net.to(device)``); the inputs carry the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore.checks import Deferred, count, floating, positive

__all__ = ["sinusoidal_embedding", "MLP", "UNet"]


def _check_input(net: nn.Module, x) -> None:
    """``x`` a float32 or float64 tensor on the device and in the dtype of the parameters."""
    floating(x, "x")
    param = next(net.parameters(), None)
    if param is not None and (x.dtype != param.dtype or x.device != param.device):
        raise TypeError(
            f"x must have the dtype and device of the network's parameters, got x of dtype "
            f"{x.dtype} on {x.device} for parameters of dtype {param.dtype} on {param.device}: "
            f"move one of them (x.to(...) or net.to(...))"
        )


def sinusoidal_embedding(t: Tensor, features: int, max_period: float = 10_000.0) -> Tensor:
    r"""Features :math:`[\cos(1000\,t\,\omega_k), \sin(1000\,t\,\omega_k)]`, :math:`\omega_k = P^{-k/h}`.

    ``h = features / 2`` frequencies from 1 down to :math:`1/P`, so the angles resolve steps of
    ``t`` from about 1e-3 to the whole of [0, 1].  Shapes: ``t`` ``(B,)``; returns
    ``(B, features)``.
    """
    if count(features, "features", low=2) % 2:
        raise ValueError(f"features must be even, got features = {features}")
    max_period = positive(max_period, "max_period")
    floating(t, "t")
    half = features // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    angles = 1000 * t[:, None] * torch.exp(-math.log(max_period) * k / half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _Embedding(nn.Module):
    """One conditioning vector per sample from ``t`` (and a label): shape ``(B, width)``."""

    def __init__(self, width: int, time_features: int, n_classes: int | None):
        super().__init__()
        self.time_features = count(time_features, "time_embedding")
        self.time = nn.Sequential(
            nn.Linear(time_features, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.n_classes = None if n_classes is None else count(n_classes, "n_classes")
        # index n_classes is the null class: "no label", for classifier-free guidance
        self.label = None if n_classes is None else nn.Embedding(n_classes + 1, width)

    def forward(self, x: Tensor, t, label) -> Tensor:
        batch = x.shape[0]
        check = Deferred()
        check.finite(x, "x")
        t = check.time(t, like=x)
        check.done()
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(()).expand(batch)
        elif t.shape != (batch,):
            raise ValueError(
                f"t must be a float, a 0-d tensor or have shape (batch,) = ({batch},), "
                f"got t of shape {tuple(t.shape)}"
            )
        c = self.time(sinusoidal_embedding(t, self.time_features))
        if self.label is None:
            if label is not None:
                raise ValueError(f"this network is unconditional (n_classes=None), got {label=}")
            return c
        return c + self.label(self._labels(label, batch, x.device))

    def _labels(self, label, batch: int, device) -> Tensor:
        if label is None:
            return torch.full((batch,), self.n_classes, device=device)
        label = torch.as_tensor(label, device=device)
        if label.dtype not in (torch.int32, torch.int64) or label.ndim > 1:
            raise ValueError(f"label must be an int or a 1-D integer tensor, got {label!r}")
        bad = (label < 0) | (label > self.n_classes)
        if bool(bad.any()):
            raise ValueError(
                f"label must lie in [0, {self.n_classes}] ({self.n_classes} is the null class), "
                f"got label = {label[bad].tolist()}"
            )
        if label.ndim == 0 or label.shape == (1,):
            return label.reshape(()).expand(batch)
        if label.shape != (batch,):
            raise ValueError(
                f"label must have one entry per sample ({batch}), got shape {tuple(label.shape)}"
            )
        return label


class _Conditional(nn.Module):
    """What both networks share: the embedding of ``t`` and of an optional class label."""

    embed: _Embedding

    @property
    def n_classes(self) -> int | None:
        """Number of classes, or None for an unconditional network."""
        return self.embed.n_classes

    @property
    def null_label(self) -> int | None:
        """The label index that means "no class" (``n_classes``), or None if unconditional."""
        return self.embed.n_classes


class MLP(_Conditional):
    r"""A residual MLP for data ``(batch, dim)``: ``h <- h + W_i silu(h + c(t, label))``.

    ``depth`` residual layers of width ``hidden``; the conditioning vector ``c`` is added
    before each.  ``time_embedding`` is the number of sinusoidal features of ``t``.

    Shapes: ``forward(x, t, label=None)`` with ``x`` ``(B, dim)``, ``t`` a float, ``()`` or
    ``(B,)``, ``label`` None, an int or ``(B,)``; returns ``(B, dim)``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_embedding: int = 64,
        n_classes: int | None = None,
    ):
        super().__init__()
        self.dim = count(dim, "dim")
        count(hidden, "hidden")
        count(depth, "depth")
        self.embed = _Embedding(hidden, time_embedding, n_classes)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t, label=None) -> Tensor:
        _check_input(self, x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        c = self.embed(x, t, label)
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(F.silu(h + c))
        return self.out(F.silu(h))


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)  # GroupNorm with up to 8 groups that divide the channels


class _ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the projected conditioning; again; plus a skip connection."""

    def __init__(self, c_in: int, c_out: int, width: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.cond = nn.Linear(width, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        r = self.conv1(F.silu(self.norm1(h))) + self.cond(F.silu(c))[:, :, None, None]
        r = self.conv2(F.silu(self.norm2(r)))
        return self.skip(h) + r


class _SelfAttention(nn.Module):
    """Single-head self-attention over the pixels, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: Tensor) -> Tensor:
        b, c, height, width = h.shape
        qkv = self.qkv(self.norm(h)).reshape(b, 3, c, height * width).transpose(-1, -2)
        a = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (b, pixels, c)
        return h + self.out(a.transpose(-1, -2).reshape(b, c, height, width))


class UNet(_Conditional):
    r"""A small UNet for images from 8x8 to 32x32.

    One residual block per resolution level with ``base * m`` channels for ``m`` in ``mults``;
    average pooling down, nearest upsampling up, skip connections by concatenation.  The
    middle (lowest resolution) has two residual blocks around a self-attention layer
    (``attention=True``; cheap at that resolution).  The conditioning vector of ``t`` (and of
    the label) has width ``4 * base`` and is added inside every block.

    ``out_channels`` (default: ``channels``) sets the channels of the output, for a network
    that reads an image and returns something else of its size, such as a displacement field.

    Shapes: ``forward(x, t, label=None)`` with ``x`` ``(B, channels, H, W)``, ``H`` and ``W``
    divisible by ``2 ** (len(mults) - 1)``; returns ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        channels: int = 1,
        base: int = 32,
        mults: tuple[int, ...] = (1, 2),
        attention: bool = True,
        time_embedding: int = 64,
        n_classes: int | None = None,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.channels = count(channels, "channels")
        out_channels = (
            self.channels if out_channels is None else count(out_channels, "out_channels")
        )
        count(base, "base")
        if not (isinstance(mults, (tuple, list)) and len(mults) >= 1):
            raise ValueError(f"mults must be a non-empty tuple of positive integers, got {mults!r}")
        for i, m in enumerate(mults):
            count(m, f"mults[{i}]")
        self.levels = len(mults)
        widths = [base * m for m in mults]
        self.embed = _Embedding(4 * base, time_embedding, n_classes)
        self.inp = nn.Conv2d(channels, widths[0], 3, 1, 1)
        self.down, prev = nn.ModuleList(), widths[0]
        for w in widths:
            self.down.append(_ResBlock(prev, w, 4 * base))
            prev = w
        self.mid1, self.mid2 = _ResBlock(prev, prev, 4 * base), _ResBlock(prev, prev, 4 * base)
        self.attn = _SelfAttention(prev) if attention else nn.Identity()
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_ResBlock(prev + w, w, 4 * base))
            prev = w
        self.out_norm, self.out = (
            nn.GroupNorm(_groups(prev), prev),
            nn.Conv2d(prev, out_channels, 3, 1, 1),
        )

    def forward(self, x: Tensor, t, label=None) -> Tensor:
        _check_input(self, x)
        factor = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] != self.channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x must have shape (batch, {self.channels}, H, W) with H and W divisible by "
                f"{factor}, got {tuple(x.shape)}"
            )
        c = self.embed(x, t, label)
        h, skips = self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(F.avg_pool2d(h, 2) if i else h, c)
            skips.append(h)
        h = self.mid2(self.attn(self.mid1(h, c)), c)
        for i, block in enumerate(self.up):
            h = F.interpolate(h, scale_factor=2, mode="nearest") if i else h
            h = block(torch.cat([h, skips.pop()], dim=1), c)
        return self.out(F.silu(self.out_norm(h)))
