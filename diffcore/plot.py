r"""The pictures the chapters share: an exact 2-D density on a grid, its contours in a square
frame, a batch of images as one array, and a figure redrawn by sliders.

>>> density = plot.density_grid(mixture, 0.0, vp, box=2.6)   # p_0 on a 161 x 161 grid
>>> plot.contours(ax, density, levels=4)                     # contours, axes framed to the box
>>> ax.imshow(plot.image_grid(digits[:64], rows=8), cmap="gray_r", vmin=-1, vmax=1)
>>> display(plot.explorer(draw, t=widgets.FloatSlider(0.3, min=0, max=1)))  # draw(t) -> Figure
>>> plot.scrubber(draw, t=[0.1, 0.3, 0.5, 0.7, 0.9])  # the same figure, no kernel needed
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore.checks import count, floating, positive
from diffcore.processes import Process

__all__ = [
    "Density",
    "box_limits",
    "density_grid",
    "frame",
    "contours",
    "image_grid",
    "explorer",
    "scrubber",
    "Scrubber",
]


class Density(NamedTuple):
    """A density on a grid of the plane: ``X``, ``Y`` and ``p``, each ``(n_y, n_x)``."""

    X: Tensor
    Y: Tensor
    p: Tensor


def box_limits(box) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` from a half-width ``h`` (the square ``[-h, h]^2``) or
    from those four numbers."""
    if isinstance(box, (int, float)) and not isinstance(box, bool):
        half = positive(box, "box")  # a half-width
        return (-half, half, -half, half)
    try:
        x_min, x_max, y_min, y_max = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"box must be a half-width or (x_min, x_max, y_min, y_max), got box = {box!r}"
        ) from err
    if not (x_min < x_max and y_min < y_max and math.isfinite(x_max - x_min + y_max - y_min)):
        raise ValueError(f"box must have finite x_min < x_max and y_min < y_max, got box = {box!r}")
    return (x_min, x_max, y_min, y_max)


def density_grid(
    law, t, process: Process, box, n=161, dtype: torch.dtype = torch.float64
) -> Density:
    r"""The exact density :math:`p_t` of a 2-D law on a regular grid over ``box``.

    ``law`` is anything with ``log_prob(x, t, process)`` (an
    :class:`~diffcore.analytic.Gaussian` or :class:`~diffcore.analytic.GaussianMixture`);
    ``box`` a half-width or ``(x_min, x_max, y_min, y_max)``; ``n`` the number of grid points
    per axis, or ``(n_x, n_y)``.  Returns :class:`Density` with ``X``, ``Y`` and ``p`` of
    shape ``(n_y, n_x)``, ready for ``ax.contour(*density)``.
    """
    if isinstance(n, int):
        n_x = n_y = count(n, "n", low=2)
    else:
        try:
            n_x, n_y = n
        except (TypeError, ValueError):
            raise TypeError(f"n must be an integer or a pair (n_x, n_y), got n = {n!r}") from None
        n_x, n_y = count(n_x, "n_x", low=2), count(n_y, "n_y", low=2)
    if not callable(getattr(law, "log_prob", None)):
        raise TypeError(f"law must have a log_prob(x, t, process), got {type(law).__name__}")
    x_min, x_max, y_min, y_max = box_limits(box)
    X, Y = torch.meshgrid(
        torch.linspace(x_min, x_max, n_x, dtype=dtype),
        torch.linspace(y_min, y_max, n_y, dtype=dtype),
        indexing="xy",
    )
    points = torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1)
    return Density(X, Y, law.log_prob(points, t, process).exp().reshape(X.shape))


def frame(ax, box, title: str | None = None) -> None:
    """Limit the axes ``ax`` to ``box`` (a half-width or ``(x_min, x_max, y_min, y_max)``) with
    equal scales on both axes, and set the title if one is given."""
    x_min, x_max, y_min, y_max = box_limits(box)
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_min, y_max)
    ax.set_aspect("equal")
    if title is not None:
        ax.set_title(title, fontsize=10)


def contours(ax, density: Density, levels=5, colors="0.6", linewidths=0.7, **options):
    """Draw the contours of a :class:`Density` on ``ax``, framed to its grid (equal scales).

    ``levels``, ``colors``, ``linewidths`` and ``options`` go to ``ax.contour``; returns what
    it returns.
    """
    drawn = ax.contour(*density, levels=levels, colors=colors, linewidths=linewidths, **options)
    X, Y = density.X, density.Y
    frame(ax, (float(X.min()), float(X.max()), float(Y.min()), float(Y.max())))
    return drawn


def image_grid(images: Tensor, rows: int, border: float = -1.0) -> Tensor:
    """Tile a batch of one-channel images into one array, row by row, each with a one-pixel
    ``border`` (``-1``: white under ``cmap="gray_r"`` with pixels in ``[-1, 1]``).

    Shapes: ``images`` ``(n, 1, h, w)`` with ``n`` a multiple of ``rows``; returns
    ``(rows * (h + 2), n / rows * (w + 2))`` on the CPU, ready for ``imshow``.
    """
    if not (isinstance(images, Tensor) and images.ndim == 4 and images.shape[1] == 1):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (n, 1, h, w) tensor, got {shape}")
    floating(images, "images")
    n, _, h, w = images.shape
    if count(rows, "rows") > n or n % rows:
        raise ValueError(f"rows must be a positive divisor of the {n} images, got rows = {rows!r}")
    padded = F.pad(images.detach().cpu()[:, 0], (1, 1, 1, 1), value=border)
    return (
        padded.reshape(rows, n // rows, h + 2, w + 2)
        .permute(0, 2, 1, 3)
        .reshape(rows * (h + 2), -1)
    )


def explorer(draw: Callable, **controls):
    """A figure redrawn whenever a control changes: ``draw(**values)`` returns a matplotlib
    ``Figure``, and each keyword is an ipywidgets control (a slider, a dropdown) whose ``value``
    is passed under that name (and whose description defaults to it).

    Like ``ipywidgets.interactive``, except that the figure is shown as a PNG in an ``Image``
    widget rather than captured by an ``Output`` widget.  Headless runners (nbclient, and so
    ``make book``) imitate an ``Output`` widget by writing to the kernel while they wait for its
    reply on the same socket, and now and then miss that reply until the cell's timeout
    (jupyter/nbclient#312); an ``Image`` needs no imitation.  Returns the ``VBox`` of the
    controls and the image, for ``display``.
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise TypeError(f"draw must be a function returning a Figure, got {type(draw).__name__}")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise TypeError(f"control {name!r} must be an ipywidgets control, got {control!r}")
        control.description = control.description or name
    image = widgets.Image(format="png")

    def redraw(_change=None) -> None:
        image.value = _png(draw(**{name: control.value for name, control in controls.items()}))

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([*controls.values(), image])


def _png(fig, dpi: float | None = None, colors: int | None = None) -> bytes:
    """The figure ``draw`` returned, as PNG bytes (cropped as the inline backend does), closed;
    with ``colors``, reduced to a palette of that many colours (a plot has few: the frames of
    a :func:`scrubber` shrink two- to threefold, with no visible change)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise TypeError(f"draw must return a matplotlib Figure, got {type(fig).__name__}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=dpi)
    plt.close(fig)
    if colors is None:
        return buffer.getvalue()
    from PIL import Image

    image = Image.open(buffer).convert("RGB").quantize(colors, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    return buffer.getvalue()


class Scrubber:
    """A figure with a slider that needs no kernel: every frame is drawn beforehand and stored
    in the notebook's output as a PNG, and a few lines of JavaScript, with nothing to fetch,
    show the frame the slider points at.  Made by :func:`scrubber`; displays as HTML in
    Jupyter and in the built book.  ``frames`` holds the PNG bytes, ``labels`` the slider's
    values as text."""

    def __init__(self, name: str, labels: list[str], frames: list[bytes], start: int) -> None:
        self.name, self.labels, self.frames, self.start = name, labels, frames, start

    def __repr__(self) -> str:
        return f"Scrubber({self.name}: {len(self.frames)} frames, {self.labels[0]} to {self.labels[-1]})"

    def _repr_html_(self) -> str:
        import base64
        import html
        import json

        sources = ["data:image/png;base64," + base64.b64encode(f).decode() for f in self.frames]
        data = json.dumps({"frames": sources, "labels": self.labels}).replace("</", "<\\/")
        name, label = html.escape(self.name), html.escape(self.labels[self.start])
        return (
            f'<div class="diffcore-scrubber">'
            f'<img class="diffcore-frame" src="{sources[self.start]}" alt="{name} = {label}" '
            f'style="max-width:100%;background:#fff">'
            f'<div style="display:flex;gap:0.6em;align-items:center;max-width:36em">'
            f"<span>{name}</span>"
            f'<input type="range" min="0" max="{len(sources) - 1}" step="1" '
            f'value="{self.start}" aria-label="{name}" style="flex:1">'
            f"<output>{label}</output></div>"
            f'<script type="application/json">{data}</script>'
            "<script>(function () {"
            "var root = document.currentScript.parentElement;"
            "var data = JSON.parse(root.querySelector('script[type=\"application/json\"]')"
            ".textContent);"
            "var img = root.querySelector('img'), out = root.querySelector('output');"
            "var slider = root.querySelector('input');"
            "slider.addEventListener('input', function () {"
            "img.src = data.frames[slider.value]; out.textContent = data.labels[slider.value];"
            "img.alt = slider.getAttribute('aria-label') + ' = ' + data.labels[slider.value];"
            "});})();</script></div>"
        )


def scrubber(draw: Callable, *, start: int = 0, fmt: str = "{:.3g}", dpi=72, **values) -> Scrubber:
    """The kernel-free twin of :func:`explorer`: ``draw(**{name: v})`` is drawn for every
    value ``v`` of the one keyword ``name=[v0, v1, ...]``, and the figure is shown with a slider
    over those values that works in the built book, offline, with no kernel.

    ``start`` is the index of the frame shown first, ``fmt`` formats numeric values for the
    label, ``dpi`` sets the frames' resolution (their PNGs, reduced to 256 colours, are stored
    in the notebook).  Keep the frames few (a dozen): each is an image in the page.  Returns a :class:`Scrubber`.
    """
    if not callable(draw):
        raise TypeError(f"draw must be a function returning a Figure, got {type(draw).__name__}")
    if len(values) != 1:
        raise TypeError(f"scrubber takes exactly one keyword of values, got {sorted(values)}")
    ((name, sweep),) = values.items()
    sweep = list(sweep)
    if len(sweep) < 2:
        raise ValueError(f"{name} must hold at least 2 values to scrub over, got {sweep!r}")
    count(start + 1, "start + 1")
    if start >= len(sweep):
        raise ValueError(f"start must index one of the {len(sweep)} values, got start = {start}")
    labels = [fmt.format(v) if isinstance(v, (int, float)) else str(v) for v in sweep]
    frames = [_png(draw(**{name: v}), dpi=dpi, colors=256) for v in sweep]
    return Scrubber(name, labels, frames, start)


# -- drawings two or more chapters make: fields, loss curves, errors against NFE, images, paths --
__all__ += [
    "vector_field",
    "loss_curve",
    "nfe_axis",
    "error_vs_nfe",
    "slope_guide",
    "image",
    "image_rows",
    "trajectories",
]


def _array(value, name: str, ndim: int | None = None):
    """``value`` (a tensor, on any device, or an array-like) as a float NumPy array."""
    import numpy as np

    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor or an array of numbers, got {value!r}") from err
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def vector_field(
    ax,
    points,
    field,
    *,
    length: float | None = None,
    reference: float | None = None,
    color=None,
    cmap="plasma",
    norm=None,
    scale: float | None = None,
    width: float = 0.005,
):
    r"""Arrows of a 2-D vector ``field`` at ``points`` on ``ax``; returns the ``Quiver``.

    Two readings.  ``length=None``: every arrow has the same length (``scale``: arrows per
    width of the axes, matplotlib's default when None) and its colour shows
    :math:`\log_{10}` of the field's length, through ``cmap`` and ``norm`` (a
    ``matplotlib.colors.Normalize``, to share one colour scale between panels); a zero
    vector has no direction and is drawn as a dot.  ``length=L``: arrows to scale in data
    units, one of the length ``reference`` (by default the field's longest) drawn ``L``
    long, all in ``color``.  Shapes: ``points`` and ``field`` ``(n, 2)``.
    """
    import numpy as np

    xy, uv = _array(points, "points", 2), _array(field, "field", 2)
    if xy.shape[1] != 2 or uv.shape != xy.shape:
        raise ValueError(f"points and field must both be (n, 2), got {xy.shape} and {uv.shape}")
    speed = np.hypot(uv[:, 0], uv[:, 1])
    if length is None:
        direction = np.divide(uv, speed[:, None], out=np.zeros_like(uv), where=speed[:, None] > 0)
        with np.errstate(divide="ignore"):
            shade = np.log10(speed)
        return ax.quiver(
            xy[:, 0],
            xy[:, 1],
            direction[:, 0],
            direction[:, 1],
            shade,
            cmap=cmap,
            norm=norm,
            scale=scale,
            width=width,
        )
    if not (isinstance(length, (int, float)) and length > 0):
        raise ValueError(f"length must be a positive number of data units, got length = {length!r}")
    reference = float(speed.max()) if reference is None else reference
    if not (isinstance(reference, (int, float)) and reference > 0):
        raise ValueError(
            f"reference must be a positive field length, got reference = {reference!r}"
        )
    return ax.quiver(
        xy[:, 0],
        xy[:, 1],
        uv[:, 0],
        uv[:, 1],
        color=color,
        angles="xy",
        scale_units="xy",
        scale=reference / length,
        width=width,
    )


def loss_curve(ax, losses, window: int = 50, *, raw: bool = False, label=None, **style):
    """Draw a training loss on ``ax`` as its moving mean over ``window`` steps.

    The mean of steps ``k - window + 1`` to ``k`` is drawn at step ``k`` (steps counted from
    1); with ``raw=True`` the per-step losses are drawn too, thin and grey, behind it.
    ``label`` (default: "training loss (moving mean of <window>)") and ``style`` go to
    ``ax.plot``.  Sets the x label and a light grid; returns the line of the moving mean.
    Shapes: ``losses`` a sequence of at least ``window`` numbers.
    """
    import numpy as np

    values = _array(losses, "losses", 1)
    if not (isinstance(window, int) and 1 <= window <= len(values)):
        raise ValueError(
            f"window must be an integer from 1 to the {len(values)} losses, got window = {window!r}"
        )
    if raw:
        ax.plot(np.arange(1, len(values) + 1), values, color="0.75", lw=0.5, label="loss per step")
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    label = f"training loss (moving mean of {window})" if label is None else label
    (line,) = ax.plot(np.arange(window, len(values) + 1), smooth, label=label, **style)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    return line


def nfe_axis(ax, nfes, label: str = "NFE") -> None:
    """Make the x axis of ``ax`` a log axis of model calls, with a tick at each of ``nfes``
    (labelled by its number, no minor ticks) and the label ``label``."""
    counts = _array(nfes, "nfes", 1)
    if counts.size == 0 or not bool((counts > 0).all()):
        raise ValueError(f"nfes must be positive numbers of model calls, got nfes = {nfes!r}")
    ax.set_xscale("log")
    ax.set_xticks(counts, [f"{n:g}" for n in counts])
    ax.minorticks_off()
    ax.set_xlabel(label)


def error_vs_nfe(ax, nfes, errors, *, label=None, **style):
    """Draw an error against the number of model calls on log-log axes; returns the line.

    ``style`` goes to ``ax.plot`` (markers ``"o"`` of size 4 unless given); the x axis is
    :func:`nfe_axis` of ``nfes``, with a light grid.  Shapes: ``nfes`` and ``errors``
    sequences of the same length, positive.
    """
    x, y = _array(nfes, "nfes", 1), _array(errors, "errors", 1)
    if x.shape != y.shape:
        raise ValueError(f"need one error per NFE, got {x.size} NFE and {y.size} errors")
    style = {"marker": "o", "ms": 4} | style
    (line,) = ax.plot(x, y, label=label, **style)
    ax.set_yscale("log")
    nfe_axis(ax, nfes)
    ax.grid(alpha=0.3, which="both")
    return line


def slope_guide(ax, x, order: float, through, *, label=None, **style):
    r"""Draw the power law :math:`y = y_0 (x / x_0)^{-p}` of ``order`` :math:`p` through the
    point ``through = (x0, y0)``, over the values ``x``: the slope a method of that order
    follows on log-log axes (dotted grey unless ``style`` says otherwise).  Returns the line.
    """
    xs = _array(x, "x", 1)
    try:
        x0, y0 = (float(v) for v in through)
    except (TypeError, ValueError) as err:
        raise ValueError(f"through must be a point (x0, y0), got through = {through!r}") from err
    if not (x0 > 0 and y0 > 0 and bool((xs > 0).all())):
        raise ValueError(f"x and through must be positive, got x0 = {x0}, y0 = {y0}")
    style = {"color": "0.5", "ls": ":", "lw": 1} | style
    (line,) = ax.plot(xs, y0 * (xs / x0) ** (-float(order)), label=label, **style)
    return line


def image(ax, picture, title: str | None = None, *, cmap="gray", vmin=0.0, vmax=1.0):
    """Show one image on ``ax``, without ticks or frame (axis labels still show), with an
    optional small ``title``; returns the ``AxesImage``.

    Shapes: ``picture`` ``(h, w)``, or with leading dimensions of size one (``(1, 1, h, w)``,
    a batch of one grey image).  ``vmin``/``vmax``: the grey range (None: the image's own).
    """
    array = _array(picture, "picture")
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(
            f"picture must be one image (h, w) or (1, ..., 1, h, w), got {array.shape}"
        )
    shown = ax.imshow(array, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return shown


def image_rows(
    ax,
    images: Tensor,
    rows: int,
    *,
    row_labels=None,
    col_labels=None,
    cmap="gray_r",
    vmin=-1.0,
    vmax=1.0,
    gap_color=None,
):
    """Show a batch of images as a table of ``rows`` rows, image ``k`` in row ``k // cols``.

    The tiles come from :func:`image_grid`, separated by gaps of no value, drawn in
    ``gap_color`` (default: the colour map's colour for missing values, transparent).
    ``row_labels`` go on the left of the rows and ``col_labels`` above the columns; the
    axes get no other ticks and no frame.  Returns the ``AxesImage``.  Shapes: ``images``
    ``(n, 1, h, w)`` with ``n`` a multiple of ``rows``.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    tiled = _array(image_grid(images, rows, border=float("nan")), "images")
    h, w = images.shape[-2] + 2, images.shape[-1] + 2
    cols = images.shape[0] // rows
    for name, labels, size in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} must have {size} entries, got {len(labels)}")
    colours = plt.get_cmap(cmap).copy()
    if gap_color is not None:
        colours.set_bad(gap_color)
    shown = ax.imshow(tiled, cmap=colours, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(h * np.arange(rows) + h / 2 - 0.5 if row_labels else [], row_labels or [])
    ax.set_xticks(w * np.arange(cols) + w / 2 - 0.5 if col_labels else [], col_labels or [])
    ax.tick_params(length=0, labeltop=True, labelbottom=False)
    for side in ax.spines.values():
        side.set_visible(False)
    return shown


def trajectories(
    ax,
    path,
    *,
    color=None,
    lw: float = 0.8,
    alpha: float = 1.0,
    marker=None,
    start="s",
    end="o",
    ms: float = 4,
    chord=None,
    label=None,
):
    """Draw a fan of 2-D trajectories on ``ax``, one line per path.

    ``color``: one colour for all, or None for one colour per path from the cycle
    ``C0``-``C9``; ``marker`` marks every state.  ``start`` (black) and ``end`` (the path's
    colour) mark the first and last states (None: no mark); ``chord``, a colour, draws each
    path's straight chord from start to end, dashed.  ``label`` names the first path in a
    legend.  Returns the lines of the paths.  Shapes: ``path`` ``(steps + 1, n, 2)``, as a
    sampler's states stacked along time.
    """
    xy = _array(path, "path", 3)
    if xy.shape[-1] != 2 or xy.shape[0] < 1:
        raise ValueError(f"path must be (steps + 1, n, 2), got shape {xy.shape}")
    lines = []
    for k in range(xy.shape[1]):
        c = f"C{k % 10}" if color is None else color
        (line,) = ax.plot(
            xy[:, k, 0],
            xy[:, k, 1],
            color=c,
            lw=lw,
            alpha=alpha,
            marker=marker,
            ms=ms,
            label=label if k == 0 else None,
        )
        lines.append(line)
        if chord is not None:
            ax.plot(xy[[0, -1], k, 0], xy[[0, -1], k, 1], color=chord, ls="--", lw=0.8)
        if end is not None:
            ax.plot(xy[-1, k, 0], xy[-1, k, 1], end, color=c, ms=ms)
    if start is not None:
        ax.plot(xy[0, :, 0], xy[0, :, 1], start, color="k", ms=ms)
    return lines
