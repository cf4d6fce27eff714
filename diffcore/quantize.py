r"""Post-training quantisation of a diffusion network (PTQ4DM), emulated in floating point.

A trained network is made cheaper by storing its weights, and computing its activations, on
:math:`2^b` levels.  The uniform affine quantiser of a range :math:`[l, h]` (widened to hold
0, so that zero is exact) has step and zero point

.. math::
    \Delta = \frac{h - l}{2^b - 1}, \qquad
    z = \operatorname{round}(-l/\Delta),

and maps a value to :math:`\hat x = \Delta\,(\operatorname{clamp}(\operatorname{round}(x /
\Delta) + z, 0, 2^b - 1) - z)` (:func:`fake_quantize`).  Inside the range the error is at
most half a step, :math:`|\hat x - x| \le \Delta/2`; outside, the value is clipped.  Here
the weights of every ``Linear`` and ``Conv2d`` layer are quantised per output channel (their
own min and max), and the *input* of each such layer per tensor, on a range calibrated by
running the float network on a calibration set (:func:`quantize`).  Quantisation is
emulated: the values are rounded but kept in float32/float64, with no integer kernels.

**What is special about diffusion.**  One network serves every noise level, and the ranges
of its activations drift with :math:`t` (:func:`ranges_over_time`).  Which inputs
:math:`(x, t)` calibrate the ranges matters, and PTQ4DM (Shang et al., 2023) argues for
inputs the network actually meets at sampling time: states of the float model's own reverse
trajectories (:func:`reverse_calibration`) at times drawn from a normal law,
:math:`t \sim \mathcal N(\mu, s^2)` centred in the first half of the schedule ("normally
distributed time-step calibration", NDTC; :func:`ndtc_times`; the released script takes
:math:`\mu = s = 0.4`).  The baseline draws :math:`x_t = \alpha_t x_0 +
\sigma_t\varepsilon` from the forward process at times spread uniformly over :math:`[t_{\min},
t_{\max}]` (:func:`forward_calibration`).

**Paper and code.**  Read from ``42Shawn/PTQ4DM`` (``improved-diffusion/scripts/
quant_image_sample.py`` and ``QDrop/quant``):

- the NDTC script draws ``t = int(N(0.4, 0.4) * T)``, clamped to ``[0, T - 1]`` (a sixth of
  the draws pile up at 0), but ``t`` then counts *reverse iterations from the noise*: the
  state kept is the sample yielded at iteration ``t`` of the DDIM loop, which sits at step
  ``T - 2 - t`` of the respaced schedule, so the times lean towards the noise end, not the
  data end; and the pair fed to the network carries the label ``t`` itself, the iteration
  count, handed to the raw network, which at sampling time receives the original step
  rescaled to [0, 1000) (``rescale_timesteps``): a state at step ``248 - t`` of 250 is
  labelled as if it sat at the fraction ``t / 1000`` of the schedule.  Here each state
  keeps its own time, and ``mean`` and ``std`` are in :math:`t` (0 data, 1 noise), the
  direction in which the paper's DDPM notation counts its steps;
- activations are quantised at the *outputs* of the layers (QDrop's ``QuantModule``), the
  network output excepted, with the range of each chosen by a search that minimises the
  :math:`L_{2.4}` error, averaged over calibration batches with an exponential moving
  average; weights by the same search per channel (so a few weights are clipped).  The
  ``symmetric`` and ``scale_method`` options are accepted but ignored: the quantiser is
  always asymmetric with the search.  The first and last layers are kept at 8 bits, and the
  reconstruction (AdaRound/BRECQ from QDrop) is an option off in the released scripts.
  Here: inputs of every layer, ``method="minmax"`` (the calibrated min and max) or
  ``"mse"`` (a one-dimensional search of the clipping range, in the spirit of QDrop's), no
  layer kept at 8 bits, no reconstruction.

Shapes: a model maps ``(batch, ...)`` and a time to ``(batch, ...)``; a calibration set is a
pair ``(x, t)`` with ``x`` ``(N, ...)`` and ``t`` ``(N,)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore import samplers, targets
from diffcore.checks import between, count, finite, one_of, positive, time_grid
from diffcore.processes import Process
from diffcore.stepping import Trace

__all__ = [
    "QUANTIZED_LAYERS",
    "METHODS",
    "check_bits",
    "quant_params",
    "fake_quantize",
    "quantize_weight",
    "LayerQuant",
    "quantize",
    "forward_calibration",
    "ndtc_times",
    "reverse_calibration",
    "layer_inputs",
    "layer_bound",
    "activation_ranges",
    "ranges_over_time",
]

#: The layers whose weights and inputs :func:`quantize` quantises.
QUANTIZED_LAYERS = (nn.Linear, nn.Conv2d)

#: How :func:`quantize` picks an activation range from the calibration inputs.
METHODS = ("minmax", "mse")


def check_bits(bits, name: str = "bits") -> int:
    """``bits`` checked to be an integer from 2 to 16 (``ValueError`` naming it otherwise)."""
    bits = count(bits, name, low=2)
    if bits > 16:
        raise ValueError(f"{name} must be at most 16 (emulated in floating point), got {bits}")
    return bits


# -- the quantiser -----------------------------------------------------------------------------
def quant_params(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    r"""Step and zero point of the uniform affine quantiser of the range :math:`[l, h]`.

    The range is widened to hold 0 (:math:`l \leftarrow \min(l, 0)`, :math:`h \leftarrow
    \max(h, 0)`), then :math:`\Delta = (h - l)/(2^b - 1)` (at least the smallest normal number
    of the dtype, for an all-zero range) and :math:`z = \operatorname{clamp}(\operatorname
    {round}(-l/\Delta), 0, 2^b - 1)`.  Shapes: ``low``, ``high`` any (one per channel);
    returns two tensors of that shape (the zero point holds integers, in the float dtype).
    """
    bits = check_bits(bits)
    levels = 2**bits - 1
    low, high = torch.clamp(low, max=0), torch.clamp(high, min=0)
    step = torch.clamp((high - low) / levels, min=torch.finfo(low.dtype).tiny)
    zero = torch.clamp(torch.round(-low / step), 0, levels)
    return step, zero


def fake_quantize(x: Tensor, step: Tensor, zero: Tensor, bits: int) -> Tensor:
    r"""Quantise and dequantise: :math:`\hat x = \Delta(\operatorname{clamp}(\operatorname
    {round}(x/\Delta) + z, 0, 2^b - 1) - z)`.

    Within the range of :func:`quant_params`, :math:`|\hat x - x| \le \Delta/2`; outside it,
    :math:`\hat x` is the nearest end of the grid.  ``round`` is to the nearest integer, ties
    to even.  Shapes: ``step`` and ``zero`` broadcast against ``x``; returns ``x``'s shape.
    """
    levels = 2 ** check_bits(bits) - 1
    return step * (torch.clamp(torch.round(x / step) + zero, 0, levels) - zero)


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    """``(C,)`` viewed to broadcast along dim 0 of ``like`` ``(C, ...)``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def quantize_weight(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Fake-quantise a weight per output channel (dim 0) on its own range.

    Channel :math:`c` uses :func:`quant_params` of :math:`[\min_j W_{cj}, \max_j W_{cj}]`, so
    no weight is clipped and :math:`|\hat W_{cj} - W_{cj}| \le \Delta_c/2`, exactly.  Shapes:
    ``weight`` ``(C, ...)``; returns the quantised weight (same shape), and ``step`` and
    ``zero`` ``(C,)``.
    """
    flat = weight.detach().reshape(weight.shape[0], -1)
    step, zero = quant_params(flat.amin(1), flat.amax(1), bits)
    quantized = fake_quantize(
        weight.detach(), _per_channel(step, weight), _per_channel(zero, weight), bits
    )
    return quantized, step, zero


def _mse_range(values: Tensor, bits: int, p: float = 2.4, grid: int = 100) -> tuple[Tensor, Tensor]:
    """The clipping range :math:`[c\\,l, c\\,h]`, :math:`c \\in \\{1/g, ..., 1\\}`, that
    minimises the mean :math:`|\\hat x - x|^p` over ``values`` (QDrop's exponent 2.4)."""
    low, high = values.amin().clamp(max=0), values.amax().clamp(min=0)
    best, best_range = None, (low, high)
    for i in range(1, grid + 1):
        c = i / grid
        step, zero = quant_params(c * low, c * high, bits)
        err = (fake_quantize(values, step, zero, bits) - values).abs().pow(p).mean()
        if best is None or err < best:
            best, best_range = err, (c * low, c * high)
    return best_range


# -- quantising a model ------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerQuant:
    """What :func:`quantize` did to one layer: ``bits`` of the weight, its per-channel
    ``weight_step`` and ``weight_zero`` ``(C,)``; ``act_bits`` and the input's calibrated
    range ``act_low``, ``act_high``, ``act_step``, ``act_zero`` (0-d; None where activations
    stay in float)."""

    bits: int
    weight_step: Tensor
    weight_zero: Tensor
    act_bits: int | None
    act_low: Tensor | None
    act_high: Tensor | None
    act_step: Tensor | None
    act_zero: Tensor | None


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}


def _check_calibration(calibration) -> tuple[Tensor, Tensor]:
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2):
        raise TypeError(f"calibration must be a pair (x, t), got {type(calibration).__name__}")
    x, t = calibration
    finite(x, "calibration x")
    finite(t, "calibration t")
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"calibration t must have shape ({x.shape[0]},), one time per input, got "
            f"{tuple(t.shape)}"
        )
    return x, t


def layer_inputs(model: nn.Module, x: Tensor, t, batch_size: int = 1024) -> dict[str, Tensor]:
    """The input of every ``Linear`` and ``Conv2d`` layer of ``model`` on ``(x, t)``, by the
    layer's name, concatenated over batches of ``batch_size`` (no gradients).  Shapes: ``x``
    ``(N, ...)``, ``t`` a float or ``(N,)``; each input ``(N, ...)`` (or ``(N * ..., ...)``
    where a layer sees several rows per sample)."""
    batch_size = count(batch_size, "batch_size")
    found: dict[str, list[Tensor]] = {}
    hooks = []
    for name, layer in _layers(model).items():

        def record(module, args, name=name):
            found.setdefault(name, []).append(args[0].detach())

        hooks.append(layer.register_forward_pre_hook(record))
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                ti = t if t.ndim == 0 else t[i : i + batch_size]
                model(x[i : i + batch_size], ti)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in found.items()}


def _fed_input(model: nn.Module, x: Tensor, t: Tensor) -> set[str]:
    """The names of the layers whose input is the network's own input ``x`` (the very
    tensor), found on one small batch."""
    fed: set[str] = set()
    hooks = []
    for name, layer in _layers(model).items():

        def check(module, args, name=name):
            if args[0] is x:
                fed.add(name)

        hooks.append(layer.register_forward_pre_hook(check))
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return fed


def quantize(
    model: nn.Module,
    bits: int,
    calibration,
    *,
    act_bits: int | None = None,
    activations: bool = True,
    method: str = "minmax",
    quantize_input: bool = False,
) -> nn.Module:
    r"""A quantised copy of ``model``: every ``Linear``/``Conv2d`` weight fake-quantised per
    output channel to ``bits`` (:func:`quantize_weight`), and every such layer's input
    fake-quantised per tensor to ``act_bits`` (default ``bits``) by a forward pre-hook.

    The input ranges are calibrated on ``calibration = (x, t)`` by running the float
    ``model``: ``method="minmax"`` takes each input's min and max over the set,
    ``"mse"`` the clipping of that range that minimises the mean :math:`|\hat x - x|^{2.4}`.
    ``activations=False`` quantises the weights only.  A layer fed the network's own input
    :math:`x_t` keeps it in float unless ``quantize_input=True``: a noise predictor recovers
    :math:`\varepsilon \approx (x_t - \alpha_t x_0)/\sigma_t`, so rounding :math:`x_t` by
    :math:`\Delta/2` costs up to :math:`\Delta/(2\sigma_t)` in the output, without bound as
    :math:`t \to 0` (the released code quantises layer outputs, and so never the network
    input either).  Biases, normalisations and the output stay in float.  The copy is in
    eval mode and records what was done in ``copy.quantization``, a dict of
    :class:`LayerQuant` by layer name.  ``bits`` and
    ``act_bits`` lie in 2..16 (``ValueError`` naming them otherwise).  Shapes: as ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    bits = check_bits(bits)
    act_bits = bits if act_bits is None else check_bits(act_bits, "act_bits")
    one_of(method, "method", METHODS)
    x, t = _check_calibration(calibration)
    if not isinstance(quantize_input, bool):
        raise TypeError(f"quantize_input must be True or False, got {quantize_input!r}")
    was_training = model.training
    model.eval()
    try:
        inputs = layer_inputs(model, x, t) if activations else {}
        fed_input = set() if quantize_input else _fed_input(model, x[:2], t[:2])
    finally:
        model.train(was_training)
    quantized = copy.deepcopy(model).eval()
    record: dict[str, LayerQuant] = {}
    for name, layer in _layers(quantized).items():
        with torch.no_grad():
            weight, w_step, w_zero = quantize_weight(layer.weight, bits)
            layer.weight.copy_(weight)
        if not activations or name in fed_input:
            record[name] = LayerQuant(bits, w_step, w_zero, None, None, None, None, None)
            continue
        values = inputs[name]
        if method == "minmax":
            low, high = values.amin(), values.amax()
        else:
            low, high = _mse_range(values, act_bits)
        step, zero = quant_params(low, high, act_bits)
        record[name] = LayerQuant(bits, w_step, w_zero, act_bits, low, high, step, zero)

        def hook(module, args, step=step, zero=zero):
            return (fake_quantize(args[0], step, zero, act_bits), *args[1:])

        layer.register_forward_pre_hook(hook)
    quantized.quantization = record
    return quantized


def _apply(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s linear map (no bias) with ``weight`` in place of its own."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight)


def layer_bound(layer: nn.Module, record: LayerQuant, x: Tensor) -> Tensor:
    r"""The step-size bound on one quantised layer's output error, entry by entry.

    With :math:`\hat W` the quantised weight (:math:`|\hat W - W| \le \Delta_c/2` in output
    channel :math:`c`) and :math:`\hat x` the quantised input (:math:`|\hat x - x| \le
    \delta/2` inside the calibrated range), the triangle inequality gives

    .. math::
        |\hat W\hat x - Wx| &\le |\hat W - W|\,|\hat x| + |W|\,|\hat x - x| \\
            &\le \tfrac{\Delta_c}{2}\,\mathbf 1^\top|\hat x|
            + \tfrac{\delta}{2}\,|W|\mathbf 1,

    products read as the layer's map (a convolution for ``Conv2d``; the bias cancels).
    ``layer`` is the *float* layer, ``record`` its :class:`LayerQuant`, ``x`` its float input,
    which must lie in the calibrated range for the bound to hold (clipped inputs break it).
    Shapes: ``x`` the layer's input; returns the shape of its output.
    """
    if not isinstance(layer, QUANTIZED_LAYERS):
        raise TypeError(f"layer must be a Linear or Conv2d, got {type(layer).__name__}")
    weight = layer.weight.detach()
    x = x.detach()
    if record.act_bits is None:
        x_hat, act_half_step = x, 0.0
    else:
        x_hat = fake_quantize(x, record.act_step, record.act_zero, record.act_bits)
        act_half_step = record.act_step / 2
    half_step = record.weight_step / 2  # (C,): along the last dim of a Linear's output
    if isinstance(layer, nn.Conv2d):
        half_step = half_step.reshape(-1, 1, 1)
    weight_part = _apply(layer, x_hat.abs(), torch.ones_like(weight)) * half_step
    input_part = _apply(layer, torch.ones_like(x), weight.abs()) * act_half_step
    return weight_part + input_part


# -- calibration sets --------------------------------------------------------------------------
def _draw(data, n: int, generator) -> Tensor:
    if isinstance(data, Tensor):
        return data[torch.randint(data.shape[0], (n,), generator=generator)]
    if callable(data):
        return data(n, generator=generator)
    raise TypeError(f"data must be a tensor or a sampler (n, generator), got {type(data)}")


def forward_calibration(
    data,
    n: int,
    process: Process,
    *,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""A calibration set from the forward process at uniform times: ``n`` equally spaced
    times from ``t_min`` to ``t_max`` and :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`
    with :math:`x_0` drawn from ``data`` (a tensor ``(N, ...)``, drawn from with
    replacement, or a sampler ``(n, generator)``).  Shapes: returns ``x`` ``(n, ...)`` and
    ``t`` ``(n,)``.
    """
    n = count(n, "n")
    between(t_min, "t_min", 0.0, 1.0)
    between(t_max, "t_max", t_min, 1.0)
    x0 = _draw(data, n, generator)
    t = torch.linspace(t_min, t_max, n, dtype=x0.dtype, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return process.marginal(x0, t, noise), t


def ndtc_times(
    n: int,
    ts: Tensor,
    mean: float = 0.4,
    std: float = 0.4,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""NDTC's times on a sampler's grid: draw :math:`u \sim \mathcal N(\mu, s^2)` (``mean``,
    ``std``, in :math:`t`: 0 data, 1 noise), clamp it to :math:`[t_{\min}, t_{\max}]` of the
    grid ``ts`` and take the index of the nearest grid time.  The clamp piles the tails onto
    the ends, as the released code does.  Shapes: ``ts`` ``(K + 1,)``; returns ``(n,)``
    indices into ``ts``.
    """
    n = count(n, "n")
    ts = time_grid(ts).to(torch.float64)
    positive(std, "std")
    between(mean, "mean", 0.0, 1.0)
    u = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    u = u.clamp(float(ts[-1]), float(ts[0]))
    return (u[:, None] - ts[None, :]).abs().argmin(1)


def reverse_calibration(
    model: Callable,
    n: int,
    shape,
    ts: Tensor,
    process: Process,
    *,
    target: str = "eps",
    mean: float = 0.4,
    std: float = 0.4,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""A calibration set from the float model's own reverse trajectories, at NDTC's times.

    ``n`` trajectories of deterministic DDIM (:func:`diffcore.samplers.ddim`) on the grid
    ``ts`` from the prior noise :math:`\sigma_{t_0}z`, with the float ``model`` (predicting
    ``target``); trajectory :math:`i` contributes its state at the grid time :math:`t_{j_i}`
    drawn by :func:`ndtc_times` (``mean``, ``std``), with that time.  ``shape`` is the shape
    of one sample; ``dtype`` that of the states (None: the model's, else float32).  Shapes:
    returns ``x`` ``(n, *shape)`` and ``t`` ``(n,)``.
    """
    n = count(n, "n")
    ts = time_grid(ts)
    shape = tuple(shape)
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    if dtype is None:
        dtype = params[0].dtype if params else torch.float32
    x = process.prior_sample((n, *shape), t=float(ts[0]), generator=generator, dtype=dtype)
    x = x.to(device)
    index = ndtc_times(n, ts, mean, std, generator).to(device)
    trace = Trace()
    with torch.no_grad():
        samplers.ddim(targets.as_denoiser(model, target, process), x, ts, process, callback=trace)
    states = torch.cat([x[None], trace.xs])  # (K + 1, n, ...): the state at each grid time
    picked = states[index, torch.arange(n, device=device)]
    return picked, ts.to(dtype=dtype, device=device)[index]


# -- activation ranges -------------------------------------------------------------------------
def activation_ranges(model: nn.Module, x: Tensor, t) -> dict[str, Tensor]:
    """The range ``[min, max]`` of the input of every ``Linear``/``Conv2d`` layer of ``model``
    on the batch ``(x, t)``, by layer name.  Shapes: ``x`` ``(B, ...)``, ``t`` a float or
    ``(B,)``; each value ``(2,)``."""
    return {
        name: torch.stack([v.amin(), v.amax()]) for name, v in layer_inputs(model, x, t).items()
    }


def ranges_over_time(model: nn.Module, xs: Tensor, times: Tensor) -> dict[str, Tensor]:
    """How the input range of each layer drifts with :math:`t`: :func:`activation_ranges` of
    the batch ``xs[j]`` at the time ``times[j]``, for each ``j`` (``xs`` a trajectory, e.g.
    ``torch.cat([x[None], trace.xs])`` of a run, or forward samples at each time).  Shapes:
    ``xs`` ``(T, B, ...)``, ``times`` ``(T,)``; each value ``(T, 2)``, the min and max.
    """
    if xs.shape[0] != times.shape[0]:
        raise ValueError(
            f"xs and times must have one entry per time, got {xs.shape[0]} and {times.shape[0]}"
        )
    per_time = [activation_ranges(model, xs[j], float(times[j])) for j in range(xs.shape[0])]
    return {name: torch.stack([r[name] for r in per_time]) for name in per_time[0]}
