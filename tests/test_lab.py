"""diffcore.lab: each helper against an exact answer (a hand computation, a closed form, or the
diffcore call it stands for), and bad input refused by name."""

import math

import matplotlib
import pytest
import torch

from diffcore import analytic, data, lab, metrics, processes, samplers, targets

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VP = processes.VP()


def _mixture():
    return analytic.GaussianMixture(
        torch.tensor([[-1.0, 0.5], [1.5, -0.2]]),
        torch.stack([0.3 * torch.eye(2), torch.tensor([[0.5, 0.1], [0.1, 0.2]])]),
        torch.tensor([0.4, 0.6]),
    )


# -- seeds and distances --------------------------------------------------------------------------
def test_seeded_gives_a_fresh_reproducible_generator():
    a, b = lab.seeded(5), lab.seeded(5)
    assert a is not b
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    assert not torch.equal(torch.randn(4, generator=lab.seeded(5)), torch.randn(4))


def test_rms_per_sample_and_per_entry_by_hand():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.zeros(2, 2)
    # distances 5 and 0: sqrt((25 + 0) / 2); entries 9, 16, 0, 0: sqrt(25 / 4)
    assert lab.rms(a, b) == pytest.approx(math.sqrt(12.5), rel=1e-15)
    assert lab.rms(a) == lab.rms(a, b)
    assert lab.rms(a, b, per="entry") == pytest.approx(2.5, rel=1e-15)
    images = torch.arange(8.0).reshape(2, 1, 2, 2)  # flattened per sample
    assert lab.rms(images) == pytest.approx(math.sqrt((14 + 126) / 2), rel=1e-15)


def test_relative_error_is_zero_for_exact_and_one_for_zero():
    exact = torch.randn(50, 3, generator=lab.seeded(1))
    assert lab.relative_error(exact, exact) == 0.0
    assert lab.relative_error(torch.zeros_like(exact), exact) == pytest.approx(1.0, rel=1e-15)
    assert lab.relative_error(2 * exact, exact) == pytest.approx(1.0, rel=1e-15)


def test_sliced_w2_is_the_metric_with_the_seeded_projections():
    x = torch.randn(200, 3, generator=lab.seeded(2))
    y = torch.randn(200, 3, generator=lab.seeded(3)) + 0.5
    direct = metrics.sliced_wasserstein(x, y, 64, generator=torch.Generator().manual_seed(9))
    assert lab.sliced_w2(x, y, seed=9, n_projections=64) == float(direct)
    assert lab.sliced_w2(x, y, seed=9) == lab.sliced_w2(x, y, seed=9)
    # in one dimension every projection is +-1: the exact W2 between the empirical laws
    u = torch.randn(100, 1, generator=lab.seeded(4))
    assert lab.sliced_w2(u, u + 0.3) == pytest.approx(0.3, rel=1e-12)


def test_sw_floor_draws_the_documented_seeds():
    law = _mixture()

    def draw(n, generator):
        return law.sample(n, generator=generator)

    pairs = lab.sw_floor(draw, 100, repeats=3, seed=10, projection_seed=7)
    assert pairs.dtype == torch.float64 and pairs.shape == (3,)
    for r in range(3):
        a, b = draw(100, lab.seeded(10 + 2 * r)), draw(100, lab.seeded(11 + 2 * r))
        assert float(pairs[r]) == lab.sliced_w2(a, b, seed=7)
    reference = draw(100, lab.seeded(99))
    against = lab.sw_floor(draw, 100, reference=reference, repeats=2, seed=20)
    assert float(against[1]) == lab.sliced_w2(draw(100, lab.seeded(21)), reference)


# -- exact laws -----------------------------------------------------------------------------------
def test_noisy_samples_are_the_forward_process_of_the_law(smooth_process):
    law, t = _mixture(), 0.4
    x = lab.noisy_samples(law, 300, t, smooth_process, lab.seeded(6))
    generator = lab.seeded(6)
    x0 = law.sample(300, generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    assert torch.equal(x, smooth_process.marginal(x0, t, eps))


@pytest.mark.parametrize("target", targets.TARGETS)
def test_exact_model_predicts_each_target_of_the_law(smooth_process, target):
    law, t = _mixture(), 0.3
    x = torch.randn(20, 2, generator=lab.seeded(7))
    model = lab.exact_model(law, smooth_process, target)
    expected = targets.convert(
        law.denoise(x, t, smooth_process), "x0", target, x, t, smooth_process
    )
    assert torch.allclose(model(x, t), expected, rtol=1e-10, atol=1e-12)
    # single precision in, single precision out, computed in double
    low = model(x.float(), t)
    assert low.dtype == torch.float32
    assert torch.equal(low, model(x.float().double(), t).float())


def test_moment_matched_has_the_mixture_moments():
    # 1-D: means -1 and 1 with weights 1/2 and variances 0.2 and 0.4: mean 0, variance 1.3
    mixture = analytic.GaussianMixture(
        torch.tensor([[-1.0], [1.0]]), torch.tensor([[[0.2]], [[0.4]]]), torch.tensor([0.5, 0.5])
    )
    gauss = lab.moment_matched(mixture)
    assert isinstance(gauss, analytic.Gaussian)
    assert float(gauss.mean) == pytest.approx(0.0, abs=1e-15)
    assert float(gauss.cov) == pytest.approx(1.3, rel=1e-14)
    eight = data.eight_gaussians_mixture()
    assert torch.equal(lab.moment_matched(eight).cov, lab.moment_matched(eight).cov.T)


def test_rotated_covariance_has_the_variances_along_its_axes():
    angle, variances = 0.7, (0.5, 0.12)
    cov = lab.rotated_covariance(angle, variances)
    along = torch.tensor([math.cos(angle), math.sin(angle)])
    across = torch.tensor([-math.sin(angle), math.cos(angle)])
    assert float(along @ cov @ along) == pytest.approx(0.5, rel=1e-14)
    assert float(across @ cov @ across) == pytest.approx(0.12, rel=1e-14)
    assert float(along @ cov @ across) == pytest.approx(0.0, abs=1e-15)
    assert lab.rotated_covariance(0.0, (1.0, 2.0), dtype=torch.float32).dtype == torch.float32


# -- networks and model calls ---------------------------------------------------------------------
def test_on_device_calls_the_model_in_its_dtype_and_returns_like_x():
    seen = {}

    def model(x, t, label=None):
        seen.update(x=x.dtype, t=t.dtype if isinstance(t, torch.Tensor) else type(t), label=label)
        return 2 * x

    model.n_classes = 3
    wrapped = lab.on_device(model)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = wrapped(x, torch.tensor(0.5, dtype=torch.float64), 1)
    assert out.dtype == torch.float64 and torch.equal(out, (2 * x.float()).double())
    assert seen == {"x": torch.float32, "t": torch.float32, "label": 1}
    wrapped(x, 0.5)
    assert seen["t"] is float  # a float time is passed as it is
    assert wrapped.n_classes == 3
    assert lab.on_device(lambda x, t: x).n_classes is None


# -- sweeps over the number of model calls --------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "nfe", "options", "steps"),
    [
        ("euler", 10, {}, 10),
        ("heun", 10, {}, 5),
        ("heun", 11, {}, 5),
        ("dpm_solver_3", 10, {}, 3),
        ("plms", 10, {}, 9),  # the first step calls twice
        ("pc", 12, {"n_corrector": 2}, 4),
        ("euler", 10, {"denoise_last": True}, 9),
    ],
)
def test_steps_for_nfe_is_the_largest_count_that_fits(name, nfe, options, steps):
    assert lab.steps_for_nfe(name, nfe, **options) == steps
    assert samplers.model_calls(name, steps, **options) <= nfe
    assert samplers.model_calls(name, steps + 1, **options) > nfe


def test_nfe_sweep_runs_the_sampler_on_its_grid_for_each_budget():
    gauss = analytic.Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]))
    D = gauss.denoiser(VP)
    x = VP.prior_sample((6, 2), generator=lab.seeded(9))
    out = lab.nfe_sweep("heun", D, x, [4, 10], VP, t_min=1e-2)
    assert list(out) == [4, 10]
    ts = samplers.time_grid(VP, 5, kind="logsnr", t_min=1e-2)
    assert torch.equal(out[10], samplers.SAMPLERS["heun"](D, x, ts, VP))
    noisy = lab.nfe_sweep("ddpm", D, x, [5], VP, seed=3)
    again = lab.nfe_sweep("ddpm", D, x, [5], VP, seed=3)
    ts = samplers.time_grid(VP, 5, kind="logsnr")
    by_hand = samplers.SAMPLERS["ddpm"](D, x, ts, VP, generator=lab.seeded(3))
    assert torch.equal(noisy[5], again[5]) and torch.equal(noisy[5], by_hand)


def test_nfe_to_reach_is_exact_on_a_power_law():
    nfes = [4, 8, 16, 32]
    errors = [3.0 * n**-2 for n in nfes]
    level = 3.0 * 10.0**-2  # reached at n = 10, between 8 and 16
    assert lab.nfe_to_reach(nfes, errors, level) == pytest.approx(10.0, rel=1e-12)
    assert lab.nfe_to_reach(nfes, errors, 1.0) == 4.0  # already below at the first budget
    assert lab.nfe_to_reach(nfes, errors, 1e-6) == math.inf


# -- grading against the exact answer -------------------------------------------------------------
def test_exact_w2_vanishes_where_the_sampler_is_exact_and_matches_metrics():
    # VP on N(0, I): the PF-ODE velocity is constant in t, so Euler's steps in t are exact
    standard = analytic.Gaussian(torch.zeros(2), torch.eye(2))
    ts = samplers.time_grid(VP, 3, t_min=1e-2)
    assert lab.exact_w2("euler", standard, ts, VP) < 1e-12
    gauss = analytic.Gaussian(torch.tensor([1.0, 0.0]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
    mean, cov = metrics.sampler_output_law("euler", gauss, ts, VP)
    target = gauss.marginal(1e-2, VP)
    expected = float(metrics.gaussian_w2(mean, cov, target.mean, target.cov))
    assert lab.exact_w2("euler", gauss, ts, VP) == expected > 1e-3


def test_grade_of_the_exact_samples_themselves():
    law = _mixture()
    exact = law.sample(400, generator=lab.seeded(12))
    # the samples that grade draws with its seed: sliced W2 zero, mean error by hand
    mean_error, distance = lab.grade(exact, law, seed=12)
    assert distance == 0.0
    assert mean_error == pytest.approx(float((exact.mean(0) - law.weights @ law.means).norm()))
    shifted = lab.grade(exact + torch.tensor([0.3, 0.4]), law, seed=12)
    assert shifted.sliced_w2 > 0.1 and shifted.mean_error > 0.4


def test_scores_of_an_exact_copy_and_of_a_shift():
    ref = torch.rand(3, 1, 16, 16, generator=lab.seeded(13)) * 2 - 1
    same = lab.scores(ref, ref)
    assert same.psnr == math.inf and same.ssim == pytest.approx(1.0)
    # a constant shift of 0.1 on a range of 2: PSNR = 10 log10(4 / 0.01)
    assert lab.scores(ref + 0.1, ref).psnr == pytest.approx(10 * math.log10(400), rel=1e-12)


# -- explorers ------------------------------------------------------------------------------------
def test_explorer_hands_the_panels_and_the_values_to_draw():
    import ipywidgets as widgets

    calls = []

    def draw(axes, t, name):
        calls.append((axes.shape, t, name))
        for ax in axes:
            ax.plot([0, 1], [0, t])

    t = widgets.FloatSlider(value=0.3, min=0.0, max=1.0)
    name = widgets.Dropdown(options=["a", "b"], value="a")
    box = lab.explorer(draw, grid=(1, 2), figsize=(4, 2), dpi=50, t=t, name=name)
    assert calls == [((2,), 0.3, "a")]
    first = bytes(box.children[-1].value)
    assert first.startswith(b"\x89PNG")
    t.value = 0.8
    assert calls[-1] == ((2,), 0.8, "a") and bytes(box.children[-1].value) != first
    single = []
    lab.explorer(lambda ax, t: single.append(type(ax).__name__), t=widgets.FloatSlider())
    assert single == ["Axes"]
    assert plt.get_fignums() == []


def test_panels_makes_the_figure_and_hands_draw_its_axes():
    from matplotlib.figure import Figure

    seen = []
    figure = lab.panels(
        lambda axes, t: seen.append((axes.shape, t)), grid=(2, 3), figsize=(6, 4), dpi=40
    )
    fig = figure(t=0.5)
    assert isinstance(fig, Figure) and len(fig.axes) == 6 and seen == [((2, 3), 0.5)]
    assert tuple(fig.get_size_inches()) == (6.0, 4.0) and fig.dpi == 40
    plt.close(fig)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: lab.seeded(-1), ValueError, "seed"),
        (lambda: lab.seeded(1.5), TypeError, "seed"),
        (lambda: lab.rms([1.0]), TypeError, "a must be a torch.Tensor"),
        (lambda: lab.rms(torch.zeros(2, 2), torch.zeros(3, 2)), ValueError, "same shape"),
        (lambda: lab.rms(torch.zeros(3)), ValueError, "per="),
        (lambda: lab.rms(torch.zeros(2, 2), per="pixel"), ValueError, "per must be one of"),
        (lambda: lab.relative_error(torch.ones(2, 2), torch.zeros(2, 2)), ValueError, "exact"),
        (lambda: lab.sliced_w2(torch.zeros(5), torch.zeros(5)), ValueError, r"x must be a \(n, d\)"),
        (lambda: lab.sliced_w2(torch.zeros(2, 2), torch.zeros(2, 2), n_projections=0), ValueError, "n_projections"),
        (lambda: lab.sw_floor("draw", 10), TypeError, "draw must be a function"),
        (lambda: lab.sw_floor(lambda n, g: torch.zeros(n, 2), 10, reference=torch.zeros(9, 2)), ValueError, "reference"),
        (lambda: lab.noisy_samples(torch.zeros(3), 5, 0.5, VP), TypeError, "law must have a sample"),
        (lambda: lab.exact_model(torch.zeros(2), VP), TypeError, "law must be"),
        (lambda: lab.exact_model(_mixture(), VP, "noise"), ValueError, "target must be one of"),
        (lambda: lab.moment_matched(torch.zeros(2)), TypeError, "mixture must be"),
        (lambda: lab.rotated_covariance(0.1, (1.0, -1.0)), ValueError, "variances"),
        (lambda: lab.rotated_covariance(math.nan, (1.0, 1.0)), ValueError, "angle"),
        (lambda: lab.on_device("net"), TypeError, "model must be callable"),
        (lambda: lab.on_device(abs, dtype=torch.int64), TypeError, "dtype"),
        (lambda: lab.steps_for_nfe("heun", 1), ValueError, "nfe = 1"),
        (lambda: lab.steps_for_nfe("heun", 0), ValueError, "nfe"),
        (lambda: lab.steps_for_nfe("rk45", 10), ValueError, "rk45"),
        (lambda: lab.nfe_sweep("rk45", abs, torch.zeros(1, 2), [5], VP), ValueError, "name must be one of"),
        (lambda: lab.nfe_sweep("euler", abs, torch.zeros(1, 2), [], VP), ValueError, "nfes"),
        (lambda: lab.nfe_to_reach([4, 8], [1.0], 0.5), ValueError, "errors"),
        (lambda: lab.nfe_to_reach([8, 4], [1.0, 0.1], 0.5), ValueError, "nfes"),
        (lambda: lab.nfe_to_reach([4, 8], [1.0, 0.1], -0.5), ValueError, "level"),
        (lambda: lab.exact_w2("euler", _mixture(), torch.ones(2), VP), TypeError, "gaussian must be"),
        (lambda: lab.grade(torch.zeros(4, 3), _mixture()), ValueError, "samples"),
        (lambda: lab.grade(torch.zeros(4, 2), torch.zeros(2)), TypeError, "law must be"),
        (lambda: lab.scores([0.0], torch.zeros(1, 1, 8, 8)), TypeError, "x must be"),
        (lambda: lab.explorer("draw"), TypeError, "draw must be a function"),
        (lambda: lab.explorer(lambda ax: None, grid=(0, 1)), ValueError, "grid"),
        (lambda: lab.panels(lambda ax: None, grid=(1,)), ValueError, "grid"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()
