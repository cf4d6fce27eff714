"""diffcore.plot: the density on its grid is the exact density, the frames and tiles are exact."""

import math

import matplotlib
import pytest
import torch

from diffcore import analytic, plot, processes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VP = processes.VP()


def _gaussian():
    return analytic.Gaussian(torch.tensor([0.3, -0.2]), torch.tensor([[0.5, 0.2], [0.2, 0.4]]))


def test_density_grid_is_the_exact_density_on_an_xy_grid():
    law, t = _gaussian(), 0.4
    X, Y, p = plot.density_grid(law, t, VP, (-2.0, 3.0, -1.0, 1.5), n=(11, 6))
    assert X.shape == Y.shape == p.shape == (6, 11)
    # "xy" indexing: x runs along the columns, y along the rows, over the whole box
    assert torch.equal(X[0], torch.linspace(-2.0, 3.0, 11, dtype=torch.float64))
    assert torch.equal(Y[:, 0], torch.linspace(-1.0, 1.5, 6, dtype=torch.float64))
    i, j = 4, 7
    point = torch.stack([X[i, j], Y[i, j]])[None]
    assert math.isclose(float(p[i, j]), float(law.log_prob(point, t, VP).exp()), rel_tol=1e-14)


def test_density_grid_integrates_to_one():
    # p_t is a Gaussian, smooth and negligible at the edges of the box: the Riemann sum is
    # exact to far below 1e-8 (the mass outside |x| > 8 standard deviations is ~1e-15)
    density = plot.density_grid(_gaussian(), 0.0, VP, box=6.0, n=241)
    cell = (12.0 / 240) ** 2
    assert math.isclose(float(density.p.sum()) * cell, 1.0, abs_tol=1e-8)


def test_contours_frame_the_axes_to_the_grid():
    density = plot.density_grid(_gaussian(), 0.0, VP, box=(-2.0, 3.0, -1.0, 1.5), n=41)
    fig, ax = plt.subplots()
    drawn = plot.contours(ax, density, levels=[0.1, 0.2])
    assert list(drawn.levels) == [0.1, 0.2]
    assert ax.get_xlim() == (-2.0, 3.0) and ax.get_ylim() == (-1.0, 1.5)
    assert ax.get_aspect() == 1.0
    plot.frame(ax, 2.5, title="a title")
    assert ax.get_xlim() == (-2.5, 2.5) and ax.get_ylim() == (-2.5, 2.5)
    assert ax.get_title() == "a title"
    plt.close(fig)


def test_image_grid_places_image_k_in_row_k_over_columns():
    n, rows, h, w = 6, 2, 3, 4
    images = torch.arange(n * h * w, dtype=torch.float64).reshape(n, 1, h, w)
    tiled = plot.image_grid(images, rows, border=-7.0)
    cols = n // rows
    assert tiled.shape == (rows * (h + 2), cols * (w + 2))
    inside = torch.zeros_like(tiled, dtype=torch.bool)
    for k in range(n):
        top, left = (k // cols) * (h + 2) + 1, (k % cols) * (w + 2) + 1
        assert torch.equal(tiled[top : top + h, left : left + w], images[k, 0])
        inside[top : top + h, left : left + w] = True
    assert bool((tiled[~inside] == -7.0).all())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: plot.box_limits(-1.0), "box = -1.0"),
        (lambda: plot.box_limits((0, 1, 2)), r"\(x_min, x_max, y_min, y_max\)"),
        (lambda: plot.box_limits((1, 0, 0, 1)), "x_min < x_max"),
        (lambda: plot.density_grid(_gaussian(), 0.0, VP, 1.0, n=1), "n_x = 1"),
        (lambda: plot.image_grid(torch.zeros(6, 3, 4, 4), 2), r"\(n, 1, h, w\)"),
        (lambda: plot.image_grid(torch.zeros(6, 1, 4, 4), 4), "rows = 4"),
    ],
)
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_explorer_redraws_the_figure_when_a_control_changes():
    import ipywidgets as widgets

    calls = []

    def draw(t, name):
        calls.append((t, name))
        fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
        ax.plot([0, 1], [0, t])
        return fig

    t = widgets.FloatSlider(value=0.3, min=0.0, max=1.0)
    name = widgets.Dropdown(options=["a", "b"], value="a", description="law")
    box = plot.explorer(draw, t=t, name=name)
    image = box.children[-1]
    assert list(box.children[:-1]) == [t, name]
    assert calls == [(0.3, "a")]  # drawn once, with the controls' values
    assert bytes(image.value).startswith(b"\x89PNG")
    assert (t.description, name.description) == ("t", "law")  # the name, unless one is given
    first = bytes(image.value)
    t.value = 0.9
    name.value = "b"
    assert calls[1:] == [(0.9, "a"), (0.9, "b")]
    assert bytes(image.value) != first
    assert plt.get_fignums() == []  # every drawn figure is closed


def test_explorer_refuses_what_is_not_a_control_or_a_figure():
    import ipywidgets as widgets

    with pytest.raises(ValueError, match="control 't' must be an ipywidgets control"):
        plot.explorer(lambda t: plt.figure(), t=0.3)
    with pytest.raises(ValueError, match="must return a matplotlib Figure, got NoneType"):
        plot.explorer(lambda t: None, t=widgets.FloatSlider())
    with pytest.raises(ValueError, match="draw must be a function"):
        plot.explorer("draw", t=widgets.FloatSlider())
