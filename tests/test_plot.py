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
        (lambda: plot.density_grid(_gaussian(), 0.0, VP, 1.0, n=1), "n = 1"),
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

    with pytest.raises(TypeError, match="control 't' must be an ipywidgets control"):
        plot.explorer(lambda t: plt.figure(), t=0.3)
    with pytest.raises(TypeError, match="must return a matplotlib Figure, got NoneType"):
        plot.explorer(lambda t: None, t=widgets.FloatSlider())
    with pytest.raises(TypeError, match="draw must be a function"):
        plot.explorer("draw", t=widgets.FloatSlider())


# -- the drawings the chapters share: fields, loss curves, errors against NFE, images, paths ------
def test_vector_field_unit_arrows_are_coloured_by_log_length():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    field = torch.tensor([[3.0, 4.0], [0.0, -0.1], [0.0, 0.0]])
    fig, ax = plt.subplots()
    quiver = plot.vector_field(ax, points, field, scale=20)
    assert quiver.U.tolist() == [0.6, 0.0, 0.0] and quiver.V.tolist() == [0.8, -1.0, 0.0]
    shade = quiver.get_array()
    assert shade[0] == pytest.approx(math.log10(5.0)) and shade[1] == pytest.approx(-1.0)
    assert quiver.scale == 20
    plt.close(fig)


def test_vector_field_to_scale_draws_the_reference_length_in_data_units():
    points, field = torch.zeros(2, 2), torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    fig, ax = plt.subplots()
    quiver = plot.vector_field(ax, points, field, length=0.5, color="k")
    # the longest vector, of length 2, is drawn 0.5 data units long: scale 2 / 0.5
    assert quiver.scale == pytest.approx(4.0) and quiver.scale_units == "xy"
    assert quiver.U.tolist() == [2.0, 0.0]
    other = plot.vector_field(ax, points, field, length=0.5, reference=8.0)
    assert other.scale == pytest.approx(16.0)
    plt.close(fig)


def test_loss_curve_is_the_moving_mean_ending_at_each_step():
    losses = [4.0, 2.0, 6.0, 0.0, 1.0]
    fig, ax = plt.subplots()
    line = plot.loss_curve(ax, losses, window=2, raw=True)
    assert line.get_xdata().tolist() == [2, 3, 4, 5]
    assert line.get_ydata().tolist() == [3.0, 4.0, 3.0, 0.5]
    assert len(ax.lines) == 2 and ax.get_xlabel() == "training step"
    assert ax.lines[0].get_ydata().tolist() == losses
    plt.close(fig)


def test_error_vs_nfe_and_slope_guide_on_log_axes():
    fig, ax = plt.subplots()
    line = plot.error_vs_nfe(ax, [5, 10, 20], [1.0, 0.25, 0.0625], label="Heun", color="C1")
    assert line.get_xdata().tolist() == [5, 10, 20] and line.get_label() == "Heun"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "10", "20"]
    assert ax.get_xlabel() == "NFE"
    guide = plot.slope_guide(ax, [5, 10, 20], 2, through=(5, 1.0))
    assert guide.get_ydata().tolist() == [1.0, 0.25, 0.0625]  # the errors lie on order 2
    plt.close(fig)


def test_image_and_image_rows_show_the_pixels_and_label_the_rows():
    fig, (left, right) = plt.subplots(1, 2)
    picture = torch.arange(6.0).reshape(1, 1, 2, 3)
    shown = plot.image(left, picture, "a title", vmin=None, vmax=None)
    assert shown.get_array().tolist() == picture[0, 0].tolist()
    assert left.get_title() == "a title" and list(left.get_xticks()) == []
    images = torch.arange(24.0).reshape(4, 1, 2, 3)
    tiled = plot.image_rows(right, images, 2, row_labels=["first", "second"])
    expected = plot.image_grid(images, 2, border=float("nan"))
    assert torch.equal(
        torch.as_tensor(tiled.get_array().filled(float("nan"))).isnan(), expected.isnan()
    )
    assert [t.get_text() for t in right.get_yticklabels()] == ["first", "second"]
    assert right.get_yticks().tolist() == [1.5, 5.5]  # the centre of each row of 2 + 2 pixels
    plt.close(fig)


def test_trajectories_draw_one_line_per_path_with_marks():
    path = torch.stack([torch.zeros(3, 2), torch.ones(3, 2), 2 * torch.ones(3, 2)])  # (3, 3, 2)
    path[:, 1] += 5
    fig, ax = plt.subplots()
    lines = plot.trajectories(ax, path, color="C2", chord="C1", label="exact")
    assert len(lines) == 3 and lines[0].get_label() == "exact"
    assert lines[1].get_xdata().tolist() == [5.0, 6.0, 7.0]
    # 3 paths, 3 chords, 3 end marks and one set of start marks
    assert len(ax.lines) == 10
    plt.close(fig)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda ax: plot.vector_field(ax, torch.zeros(3, 2), torch.zeros(2, 2)), ValueError, "points and field"),
        (lambda ax: plot.vector_field(ax, torch.zeros(2, 2), torch.ones(2, 2), length=-1), ValueError, "length"),
        (lambda ax: plot.loss_curve(ax, [1.0, 2.0], window=3), ValueError, "window"),
        (lambda ax: plot.nfe_axis(ax, [0, 5]), ValueError, "nfes"),
        (lambda ax: plot.error_vs_nfe(ax, [5, 10], [1.0]), ValueError, "one error per NFE"),
        (lambda ax: plot.slope_guide(ax, [1, 2], 1, through=(1,)), ValueError, "through"),
        (lambda ax: plot.image(ax, torch.zeros(2, 3, 4)), ValueError, "picture"),
        (lambda ax: plot.image(ax, "picture"), TypeError, "picture"),
        (lambda ax: plot.image_rows(ax, torch.zeros(4, 1, 2, 2), 2, row_labels=["a"]), ValueError, "row_labels"),
        (lambda ax: plot.trajectories(ax, torch.zeros(3, 2)), ValueError, "path"),
    ],
)  # fmt: skip
def test_shared_drawings_refuse_bad_input_by_name(call, error, message):
    fig, ax = plt.subplots()
    try:
        with pytest.raises(error, match=message):
            call(ax)
    finally:
        plt.close(fig)


# -- the kernel-free figure ------------------------------------------------------------------
def test_scrubber_stores_one_frame_per_value_and_a_slider_over_them():
    import base64
    import json
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []

    def draw(t):
        drawn.append(t)
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, t])
        return fig

    figure = plot.scrubber(draw, t=[0.1, 0.5, 0.9], start=1)
    assert drawn == [0.1, 0.5, 0.9] and len(figure.frames) == 3
    assert all(frame.startswith(b"\x89PNG") for frame in figure.frames)
    assert len(set(figure.frames)) == 3  # the frames differ
    page = figure._repr_html_()
    assert 'type="range" min="0" max="2" step="1" value="1"' in page
    data = json.loads(re.search(r'<script type="application/json">(.*?)</script>', page)[1])
    assert data["labels"] == ["0.1", "0.5", "0.9"]
    assert [base64.b64decode(src.split(",")[1]) for src in data["frames"]] == figure.frames
    assert "http" not in page.replace("https://matplotlib.org", "")  # nothing to fetch
    assert repr(figure) == "Scrubber(t: 3 frames, 0.1 to 0.9)"


def test_scrubber_refuses_bad_input():
    import matplotlib.pyplot as plt

    with pytest.raises(TypeError, match="exactly one keyword"):
        plot.scrubber(lambda t, w: plt.figure(), t=[1, 2], w=[1, 2])
    with pytest.raises(ValueError, match="t must hold at least 2 values"):
        plot.scrubber(lambda t: plt.figure(), t=[1])
    with pytest.raises(ValueError, match="start must index one of the 2 values, got start = 2"):
        plot.scrubber(lambda t: plt.figure(), t=[1, 2], start=2)
    with pytest.raises(TypeError, match="draw must return a matplotlib Figure, got int"):
        plot.scrubber(lambda t: 3, t=[1, 2])
