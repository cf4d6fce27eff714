"""Input checks shared by the modules: bad input raises a ``ValueError`` naming the value."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def require(ok: bool, name: str, value, need: str) -> None:
    """Raise ``ValueError("<name> must be <need>, got <name> = <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {need}, got {name} = {value!r}")


def positive(value, name: str) -> float:
    """``value`` as a float, checked to be a positive finite number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {name} = {value!r}")
    return float(value)


def _show(value: Tensor, limit: int = 6) -> str:
    flat = value.detach().flatten()
    shown = ", ".join(f"{v:.6g}" for v in flat[:limit].tolist())
    return f"[{shown}{', ...' if flat.numel() > limit else ''}]" if value.ndim else shown


def as_time(t, like: Tensor | None = None, name: str = "t") -> Tensor:
    """Return ``t`` as a tensor (dtype and device of ``like`` when given), checked to lie in [0, 1].

    Shapes: ``t`` is a float or a tensor of any shape; the result has the same shape.
    """
    if isinstance(t, Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real number or a real tensor, got dtype {t.dtype}")
        if like is not None:
            t = t.to(dtype=like.dtype, device=like.device)
        elif not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
    else:
        try:
            t = torch.as_tensor(
                t,
                dtype=like.dtype if like is not None else torch.get_default_dtype(),
                device=like.device if like is not None else None,
            )
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a number or a tensor, got {t!r}") from err
    if t.ndim == 0:
        inside = 0 <= float(t) <= 1  # False for NaN
    else:
        low, high = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        inside = bool(low >= 0) and bool(high <= 1)
    if not inside:
        shown = _show(t) if t.ndim == 0 else _show(t[~((t >= 0) & (t <= 1))])
        raise ValueError(f"{name} must lie in [0, 1], got {name} = {shown}")
    return t


def per_sample(coef: Tensor, x: Tensor, name: str = "t") -> Tensor:
    """View a scalar or per-sample coefficient so that it broadcasts against ``x``.

    Shapes: ``coef`` is ``()``, ``(1,)`` or ``(batch,)``; ``x`` is ``(batch, ...)``;
    the result is ``()`` or ``(batch, 1, ..., 1)``.
    """
    if coef.ndim == 0:
        return coef
    if coef.ndim == 1 and coef.shape[0] in (1, x.shape[0]):
        return coef.reshape(-1, *([1] * (x.ndim - 1)))
    if coef.ndim <= x.ndim and all(c in (1, s) for c, s in zip(coef.shape, x.shape, strict=False)):
        return coef.reshape(*coef.shape, *([1] * (x.ndim - coef.ndim)))
    raise ValueError(
        f"{name} of shape {tuple(coef.shape)} does not broadcast against x of shape "
        f"{tuple(x.shape)}: give a float, a 0-d tensor or one value per sample"
    )


def same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )
