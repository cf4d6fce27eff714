"""Input checks shared by the modules (internal, but under public names).

Bad input raises a ``ValueError`` (a bad value) or a ``TypeError`` (a bad kind), naming the
argument and what it got, before any work is done.  Each rule is written once, here.

**Precision.**  diffcore computes in single or double precision: a data tensor must be
``float32`` or ``float64`` (``complex64`` or ``complex128`` where complex values are meant).
Integer tensors (which would turn ``t = 0.5`` into 0) and half-precision ones (``float16``,
``bfloat16``: too coarse for the schedules, whose ``1000 t`` embedding or :math:`\\sigma_t`
near 0 they cannot resolve, and unsupported by the linear algebra on the CPU) are refused
with a ``TypeError`` that says how to convert them.  For mixed-precision training, run the
network under ``torch.autocast``: its inputs stay ``float32``.

**Cost.**  A check that reads a tensor back (finite entries, times in [0, 1]) synchronises
with the device once.  :class:`Deferred` gathers several such verdicts and reads them back
together, so that a function called once per step costs one synchronisation, as the time
check alone did; on the CPU nothing is deferred, since nothing waits.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "COMPLEX_DTYPES",
    "require",
    "positive",
    "nonnegative",
    "real",
    "between",
    "count",
    "one_of",
    "noise_level",
    "sizes",
    "float_dtype",
    "floating",
    "finite",
    "returned",
    "returned_shape",
    "as_time",
    "time_grid",
    "per_sample",
    "same_shape",
    "Deferred",
]

#: The real dtypes diffcore computes in.
FLOAT_DTYPES = (torch.float32, torch.float64)
#: The complex dtypes accepted where complex values are meant (k-space measurements).
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_COUNT_LIMIT = 2**31


# -- numbers -----------------------------------------------------------------------------------
def require(ok: bool, name: str, value, need: str) -> None:
    """Raise ``ValueError("<name> must be <need>, got <name> = <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {need}, got {name} = {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(value, name: str) -> float:
    """``value`` as a float, checked to be a positive finite number."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {name} = {value!r}")
    return float(value)


def nonnegative(value, name: str) -> float:
    """``value`` as a float, checked to be a finite number ``>= 0``."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {name} = {value!r}")
    return float(value)


def real(value, name: str) -> float:
    """``value`` as a float, checked to be a finite real number (not a bool)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {name} = {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name} = {value!r}")
    return float(value)


def between(
    value, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> float:
    """``value`` as a float, checked to be a real number in ``[low, high]`` (an end excluded
    with ``open_low`` or ``open_high``), e.g. ``between(p, "p_uncond", 0, 1)``."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number in {interval}, got {name} = {value!r}")
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):  # False for NaN
        raise ValueError(f"{name} must lie in {interval}, got {name} = {value!r}")
    return float(value)


def count(value, name: str, low: int = 1) -> int:
    """``value`` checked to be an integer ``>= low`` (not a bool) and below 2**31.

    Python integers and integer scalars that support ``__index__`` (NumPy's) are accepted;
    a float such as ``2.0`` is not.
    """
    if isinstance(value, bool) or isinstance(value, (float, Tensor)):
        raise TypeError(f"{name} must be an integer >= {low}, got {name} = {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= {low}, got {name} = {value!r}") from None
    if number < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name} = {value!r}")
    if number >= _COUNT_LIMIT:
        raise ValueError(f"{name} must be an integer below 2**31, got {name} = {value!r}")
    return number


def one_of(value, name: str, options) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``options`` (names, usually)."""
    options = tuple(options)
    try:
        ok = value in options
    except TypeError:  # an unhashable value against a set or dict
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {options}, got {name} = {value!r}")


def noise_level(value, name: str = "sigma_y") -> float:
    """A measurement noise level: a finite number ``>= 0`` (or a one-element tensor holding
    one), returned as a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(
                f"{name} must be a number (or a one-element real tensor), got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite number >= 0, got {name} = {value!r}")
    return nonnegative(value, name)


def sizes(value, name: str = "shape", low: int = 1) -> tuple[int, ...]:
    """A shape: an integer or a non-empty sequence of integers, each ``>= low`` and below
    2**31, returned as a tuple."""
    if isinstance(value, (int, numbers.Integral)) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of integers, got {name} = {value!r}") from None
    if not items:
        raise ValueError(f"{name} must have at least one entry, got {name} = {value!r}")
    try:
        return tuple(count(s, f"{name}[{i}]", low) for i, s in enumerate(items))
    except (TypeError, ValueError) as err:
        kind = type(err)
        raise kind(
            f"{name} must be a tuple of integers >= {low}, got {name} = {value!r} ({err})"
        ) from None


def float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """``dtype`` checked to be ``torch.float32`` or ``torch.float64`` (None: the default)."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be torch.float32 or torch.float64, got {name} = {dtype!r}: diffcore "
            f"computes in single or double precision"
        )
    return dtype


# -- tensors -----------------------------------------------------------------------------------
def floating(x, name: str, complex_ok: bool = False) -> Tensor:
    """``x`` checked to be a tensor of a dtype diffcore computes in (see the module docstring).

    No synchronisation: only the kind and the dtype are read.  Shapes: any; returns ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {name} of type {type(x).__name__}")
    allowed = FLOAT_DTYPES + (COMPLEX_DTYPES if complex_ok else ())
    if x.dtype not in allowed:
        if x.dtype in (torch.float16, torch.bfloat16, torch.complex32):
            why = "diffcore computes in single or double precision"
        elif x.is_complex():
            why = "complex values are not meant here"
        else:
            why = "an integer or boolean tensor would round the arithmetic"
        raise TypeError(
            f"{name} must be a float32 or float64 tensor, got {name} of dtype {x.dtype}: {why}; "
            f"convert it with {name}.float() or {name}.double()"
        )
    return x


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite.  A finite sum proves it (NaN and infinities
    propagate through a sum) and is cheaper to get; only a non-finite sum, which an overflow
    may also cause, is looked at entry by entry."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _not_finite(x: Tensor, name: str) -> ValueError:
    bad = ~torch.isfinite(x)
    n_nan, n_bad = int(torch.isnan(x).sum()), int(bad.sum())
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if x.ndim else ()
    where = f"{name}[{', '.join(map(str, first))}]" if x.ndim else name
    value = x[first].item() if x.ndim else x.item()
    return ValueError(
        f"{name} must be finite, got {n_nan} NaN and {n_bad - n_nan} infinite entries of "
        f"{x.numel()} in {name} (the first: {where} = {value})"
    )


def finite(x, name: str) -> Tensor:
    """``x`` checked to be a float32 or float64 (or complex) tensor without NaN or infinity.

    Shapes: any; returns ``x`` itself.
    """
    floating(x, name, complex_ok=True)
    if x.numel() and not _all_finite(x):
        raise _not_finite(x, name)
    return x


def returned(out, like: Tensor, fn: str) -> Tensor:
    """Check that the user function ``fn`` returned a tensor shaped like ``like``.

    Shapes: ``out`` must have ``like``'s shape; returns ``out``.
    """
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{fn} must return a tensor of shape {tuple(like.shape)}, got {type(out).__name__}"
        )
    if out.shape != like.shape:
        raise ValueError(
            f"{fn} must return a tensor of shape {tuple(like.shape)} (the shape of its input), "
            f"got shape {tuple(out.shape)}"
        )
    return out


def returned_shape(out, shape, fn: str) -> Tensor:
    """Check that the user function ``fn`` returned a tensor of shape ``shape`` (e.g. one value
    per sample, ``(batch,)``).  Returns ``out``."""
    shape = tuple(shape)
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn} must return a tensor of shape {shape}, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(
            f"{fn} must return a tensor of shape {shape}, got shape {tuple(out.shape)}"
        )
    return out


# -- times -------------------------------------------------------------------------------------
def _show(value: Tensor, limit: int = 6) -> str:
    flat = value.detach().flatten()
    shown = ", ".join(f"{v:.6g}" for v in flat[:limit].tolist())
    return f"[{shown}{', ...' if flat.numel() > limit else ''}]" if value.ndim else shown


def _outside(t: Tensor, name: str) -> ValueError:
    # every digit the dtype holds: a time a hair above 1 must not read as "1"
    digits = 17 if t.dtype == torch.float64 else 9
    flat = t.reshape(-1)
    bad = [f"{v:.{digits}g}" for v in flat[~((flat >= 0) & (flat <= 1))].tolist()]
    shown = bad[0] if t.ndim == 0 else f"[{', '.join(bad[:6])}{', ...' * (len(bad) > 6)}]"
    return ValueError(f"{name} must lie in [0, 1], got {name} = {shown}")


def _time_tensor(t, like: Tensor | None, name: str) -> Tensor:
    """``t`` as a tensor in ``like``'s dtype and device (kind errors raised here)."""
    if like is not None and not like.is_floating_point():
        raise TypeError(
            f"{name} is taken in the dtype of the data it goes with, which must be float32 or "
            f"float64, got data of dtype {like.dtype}: convert the data with .float() or "
            f".double()"
        )
    if isinstance(t, Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real number or a real tensor, got dtype {t.dtype}")
        if like is not None:
            return t.to(dtype=like.dtype, device=like.device)
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    try:
        return torch.as_tensor(
            t,
            dtype=like.dtype if like is not None else torch.get_default_dtype(),
            device=like.device if like is not None else None,
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a number or a tensor, got {t!r}") from err


def as_time(t, like: Tensor | None = None, name: str = "t") -> Tensor:
    """Return ``t`` as a tensor (dtype and device of ``like`` when given), checked to lie in [0, 1].

    ``like``, when given, must be a floating tensor (an integer one would round ``t``).
    Shapes: ``t`` is a float or a tensor of any shape; the result has the same shape.
    """
    if _is_real(t):  # a Python number: checked here, with no read-back from a device
        if not 0 <= t <= 1:  # False for NaN
            raise ValueError(f"{name} must lie in [0, 1], got {name} = {float(t):.6g}")
        return _time_tensor(t, like, name)
    t = _time_tensor(t, like, name)
    if t.ndim == 0:
        inside = 0 <= float(t) <= 1  # False for NaN
    else:
        low, high = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        inside = bool((low >= 0) & (high <= 1))  # one read-back; False for NaN
    if not inside:
        raise _outside(t, name)
    return t


def time_grid(ts, name: str = "ts") -> Tensor:
    """Check that ``ts`` is a strictly decreasing 1-D tensor of at least two times in [0, 1].

    A list is turned into a float64 tensor.  Shapes: ``ts`` ``(N + 1,)``; returns it.
    """
    if not isinstance(ts, Tensor):
        try:
            ts = torch.as_tensor(ts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D tensor of times, got {ts!r}") from err
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D tensor of at least 2 times, got shape {tuple(ts.shape)}"
        )
    as_time(ts, name=name)
    steps = ts[1:] - ts[:-1]
    if not bool((steps < 0).all()):
        i = int(torch.nonzero(steps >= 0)[0])
        raise ValueError(
            f"{name} must decrease strictly, got {name}[{i}] = {float(ts[i]):.6g} <= "
            f"{name}[{i + 1}] = {float(ts[i + 1]):.6g}"
        )
    return ts


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


# -- several checks, one synchronisation -------------------------------------------------------
class Deferred:
    """Checks whose verdicts on accelerator tensors are read back together, in :meth:`done`.

    >>> check = Deferred()
    >>> x = check.finite(x, "x")
    >>> t = check.time(t, like=x)
    >>> check.done()          # one synchronisation for both (none on the CPU)

    On the CPU every check runs at once (reading a CPU tensor costs no synchronisation); on
    another device the verdicts stay there until :meth:`done`, which raises the error of the
    first failed check, in the order of the calls.  Call :meth:`done` before any work.
    ``defer_cpu=True`` defers the checks of CPU tensors too, as on an accelerator (so that
    the deferred path can be tested without one).
    """

    def __init__(self, defer_cpu: bool = False) -> None:
        self._pending: list[tuple[Tensor, Callable[[], Exception]]] = []
        self._defer_cpu = bool(defer_cpu)

    def _now(self, v: Tensor) -> bool:
        return v.device.type == "cpu" and not self._defer_cpu

    def require(self, ok: Tensor, error: Callable[[], Exception]) -> None:
        """Raise ``error()`` unless the boolean tensor ``ok`` is all true (at :meth:`done`
        off the CPU)."""
        if self._now(ok):
            if not bool(ok.all()):
                raise error()
        else:
            self._pending.append((ok.all(), error))

    def finite(self, x, name: str) -> Tensor:
        """:func:`finite`, deferred.  Returns ``x``."""
        floating(x, name, complex_ok=True)
        if not x.numel():
            return x
        if self._now(x):
            if not _all_finite(x):
                raise _not_finite(x, name)
        else:
            self.require(torch.isfinite(x), lambda: _not_finite(x, name))
        return x

    def time(self, t, like: Tensor | None = None, name: str = "t") -> Tensor:
        """:func:`as_time`, deferred.  Returns ``t`` as a tensor."""
        if _is_real(t) or (isinstance(t, Tensor) and like is None and self._now(t)):
            return as_time(t, like=like, name=name)
        t = _time_tensor(t, like, name)
        if self._now(t):
            return as_time(t, name=name)
        self.require((t >= 0) & (t <= 1), lambda: _outside(t, name))
        return t

    def done(self) -> None:
        """Read the deferred verdicts back (one synchronisation per device) and raise the
        first failure."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        by_device: dict = {}
        for ok, _ in pending:
            by_device.setdefault(ok.device, []).append(ok)
        if all(bool(torch.stack(oks).all()) for oks in by_device.values()):
            return
        for ok, error in pending:
            if not bool(ok):
                raise error()
