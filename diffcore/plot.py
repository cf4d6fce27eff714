r"""The pictures the chapters share: an exact 2-D density on a grid, its contours in a square
frame, a batch of images as one array, and a figure redrawn by sliders.

>>> density = plot.density_grid(mixture, 0.0, vp, box=2.6)   # p_0 on a 161 x 161 grid
>>> plot.contours(ax, density, levels=4)                     # contours, axes framed to the box
>>> ax.imshow(plot.image_grid(digits[:64], rows=8), cmap="gray_r", vmin=-1, vmax=1)
>>> display(plot.explorer(draw, t=widgets.FloatSlider(0.3, min=0, max=1)))  # draw(t) -> Figure
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore.processes import Process

__all__ = ["Density", "box_limits", "density_grid", "frame", "contours", "image_grid", "explorer"]


class Density(NamedTuple):
    """A density on a grid of the plane: ``X``, ``Y`` and ``p``, each ``(n_y, n_x)``."""

    X: Tensor
    Y: Tensor
    p: Tensor


def box_limits(box) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` from a half-width ``h`` (the square ``[-h, h]^2``) or
    from those four numbers."""
    if isinstance(box, (int, float)) and not isinstance(box, bool):
        if not box > 0:
            raise ValueError(f"a box given by its half-width needs it positive, got box = {box}")
        return (-float(box), float(box), -float(box), float(box))
    try:
        x_min, x_max, y_min, y_max = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"box must be a half-width or (x_min, x_max, y_min, y_max), got box = {box!r}"
        ) from err
    if not (x_min < x_max and y_min < y_max):
        raise ValueError(f"box must have x_min < x_max and y_min < y_max, got box = {box!r}")
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
    n_x, n_y = (n, n) if isinstance(n, int) else n
    for name, count in (("n_x", n_x), ("n_y", n_y)):
        if not (isinstance(count, int) and count >= 2):
            raise ValueError(f"a grid needs at least 2 points per axis, got {name} = {count!r}")
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
    n, _, h, w = images.shape
    if not (isinstance(rows, int) and rows >= 1 and n % rows == 0):
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
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if not callable(draw):
        raise ValueError(f"draw must be a function returning a Figure, got {type(draw).__name__}")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise ValueError(f"control {name!r} must be an ipywidgets control, got {control!r}")
        control.description = control.description or name
    image = widgets.Image(format="png")

    def redraw(_change=None) -> None:
        fig = draw(**{name: control.value for name, control in controls.items()})
        if not isinstance(fig, Figure):
            raise ValueError(f"draw must return a matplotlib Figure, got {type(fig).__name__}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")  # as the inline backend does
        plt.close(fig)
        image.value = buffer.getvalue()

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([*controls.values(), image])
