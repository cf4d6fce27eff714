"""The five targets are one model: conversions are exact and invertible for every process."""

import itertools

import pytest
import torch

from diffcore import targets


def _truth(process, gen, shape=(6, 3)):
    """x0, eps, a per-sample t, x_t and every target's exact value there."""
    x0 = torch.randn(shape, generator=gen)
    eps = torch.randn(shape, generator=gen)
    t = torch.linspace(0.05, 0.95, shape[0])
    x = process.marginal(x0, t, eps)
    view = (-1,) + (1,) * (len(shape) - 1)
    a, s = process.alpha(t).view(view), process.sigma(t).view(view)
    da, ds = process.d_alpha(t).view(view), process.d_sigma(t).view(view)
    values = {
        "eps": eps,
        "x0": x0,
        "score": -eps / s,
        "v": a * eps - s * x0,
        "velocity": da * x0 + ds * eps,
    }
    return x, t, values


@pytest.mark.parametrize("source,target", list(itertools.product(targets.TARGETS, repeat=2)))
def test_every_target_converts_exactly(process, gen, source, target):
    x, t, values = _truth(process, gen)
    out = targets.convert(values[source], source, target, x, t, process)
    torch.testing.assert_close(out, values[target], rtol=1e-9, atol=1e-9)
    back = targets.convert(out, target, source, x, t, process)
    torch.testing.assert_close(back, values[source], rtol=1e-9, atol=1e-9)


def test_conversions_work_on_images(process, gen):
    x, t, values = _truth(process, gen, shape=(4, 1, 3, 3))
    out = targets.convert(values["eps"], "eps", "v", x, t, process)
    torch.testing.assert_close(out, values["v"], rtol=1e-9, atol=1e-9)


def test_velocity_is_the_pf_ode_drift(process, gen):
    """u = f x - g^2/2 * score: the flow view and the SDE view give the same ODE."""
    x, t, values = _truth(process, gen)
    f, g2 = process.f(t)[:, None], process.g2(t)[:, None]
    torch.testing.assert_close(values["velocity"], f * x - 0.5 * g2 * values["score"])


def test_as_denoiser_and_pf_ode_velocity(process, gen):
    x, t, values = _truth(process, gen)

    def eps_model(x_in, t_in):
        assert x_in is x
        return values["eps"]

    denoiser = targets.as_denoiser(eps_model, "eps", process)
    torch.testing.assert_close(denoiser(x, t), values["x0"])
    torch.testing.assert_close(targets.pf_ode_velocity(denoiser, x, t, process), values["velocity"])
    assert targets.as_denoiser(eps_model, "x0", process) is eps_model


def test_bad_targets_and_shapes_are_refused(process):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"source must be one of .* got source = 'noise'"):
        targets.convert(x, "noise", "x0", x, 0.5, process)
    with pytest.raises(ValueError, match=r"target must be one of .* got target = 'flow'"):
        targets.convert(x, "eps", "flow", x, 0.5, process)
    with pytest.raises(ValueError, match=r"pred has shape \(2, 2\) but x has shape \(2, 3\)"):
        targets.convert(torch.zeros(2, 2), "eps", "x0", x, 0.5, process)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got t = 2"):
        targets.convert(x, "eps", "x0", x, 2.0, process)
    with pytest.raises(ValueError, match="source must be one of"):
        targets.as_denoiser(lambda x, t: x, "epsilon", process)
