"""The networks: shapes, gradients, dependence on t and on the label, dtypes and bad input."""

import pytest
import torch

from diffcore import nets, processes, targets


def _mlp(**kw):
    torch.manual_seed(0)
    return nets.MLP(3, hidden=32, depth=2, **kw)


def _unet(**kw):
    torch.manual_seed(0)
    return nets.UNet(channels=2, base=8, mults=(1, 2), **kw)


NETS = {"mlp": (_mlp, (5, 3)), "unet": (_unet, (5, 2, 8, 8))}


@pytest.fixture(params=list(NETS))
def net_and_shape(request):
    make, shape = NETS[request.param]
    return make, shape


def test_output_shape_and_gradients_reach_every_parameter(net_and_shape, gen):
    make, shape = net_and_shape
    net = make()
    x = torch.randn(shape, generator=gen)
    out = net(x, 0.3)
    assert out.shape == x.shape and out.dtype == torch.float64  # the suite's default dtype
    out.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_output_depends_on_t_and_per_sample_times_are_per_sample(net_and_shape, gen):
    make, shape = net_and_shape
    net = make()
    x = torch.randn(shape, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    assert not torch.allclose(net(x, 0.1), net(x, 0.9))
    batch = net(x, t)
    for i in range(5):
        torch.testing.assert_close(batch[i : i + 1], net(x[i : i + 1], float(t[i])))
    # a float, a 0-d tensor and a constant (B,) tensor are one time
    torch.testing.assert_close(net(x, 0.4), net(x, torch.tensor(0.4)))
    torch.testing.assert_close(net(x, 0.4), net(x, torch.full((5,), 0.4)))


def test_class_conditioning_and_the_null_label(net_and_shape, gen):
    make, shape = net_and_shape
    net = make(n_classes=3)
    assert net.n_classes == 3 and net.null_label == 3
    x = torch.randn(shape, generator=gen)
    outs = [net(x, 0.5, k) for k in range(4)]
    for k in range(3):
        assert not torch.allclose(outs[k], outs[k + 1])
    torch.testing.assert_close(net(x, 0.5), outs[3])  # no label means the null class
    labels = torch.tensor([0, 2, 1, 3, 0])
    batch = net(x, 0.5, labels)
    for i in range(5):
        torch.testing.assert_close(batch[i], outs[int(labels[i])][i])
    assert _mlp().null_label is None


def test_float32_and_float64(net_and_shape, gen):
    make, shape = net_and_shape
    x = torch.randn(shape, generator=gen)
    net64 = make()
    net32 = make().float()
    out32 = net32(x.float(), 0.5)
    assert out32.dtype == torch.float32
    # the same weights in two precisions agree to float32 round-off
    torch.testing.assert_close(out32.double(), net64(x, 0.5), rtol=1e-4, atol=1e-4)


def test_a_network_becomes_a_denoiser(gen):
    vp = processes.VP()
    net = _mlp()
    x = torch.randn(4, 3, generator=gen)
    denoiser = targets.as_denoiser(net, "eps", vp)
    expected = targets.convert(net(x, 0.5), "eps", "x0", x, 0.5, vp)
    torch.testing.assert_close(denoiser(x, 0.5), expected)


def test_unet_sizes_and_attention():
    torch.manual_seed(0)
    for size, mults in ((8, (1, 2)), (16, (1, 2, 2)), (32, (1, 2))):
        net = nets.UNet(channels=1, base=8, mults=mults, attention=size != 16)
        assert net(torch.randn(2, 1, size, size), 0.5).shape == (2, 1, size, size)


def test_sinusoidal_embedding():
    t = torch.tensor([0.0, 0.25])
    emb = nets.sinusoidal_embedding(t, 8)
    freqs = torch.tensor([1.0, 10.0**-1, 10.0**-2, 10.0**-3])  # 10000^(-k/4)
    angles = 1000 * t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([torch.cos(angles), torch.sin(angles)], 1))
    with pytest.raises(ValueError, match="features must be even, got features = 7"):
        nets.sinusoidal_embedding(t, 7)


def test_bad_input_is_refused():
    mlp, unet = _mlp(n_classes=2), _unet()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\), got \(4, 2\)"):
        mlp(torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\), got \(4, 3, 1\)"):
        mlp(torch.zeros(4, 3, 1), 0.5)
    with pytest.raises(
        ValueError, match=r"x must have shape \(batch, 2, H, W\).* got \(4, 1, 8, 8\)"
    ):
        unet(torch.zeros(4, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match=r"divisible by 2, got \(4, 2, 7, 8\)"):
        unet(torch.zeros(4, 2, 7, 8), 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got t = 1.5"):
        mlp(torch.zeros(4, 3), 1.5)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(4,\), got t of shape \(3,\)"):
        mlp(torch.zeros(4, 3), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"label must lie in \[0, 2\].* got label = \[3\]"):
        mlp(torch.zeros(4, 3), 0.5, 3)
    with pytest.raises(ValueError, match="label must be an int or a 1-D integer tensor"):
        mlp(torch.zeros(4, 3), 0.5, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="unconditional"):
        unet(torch.zeros(4, 2, 8, 8), 0.5, 1)
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got depth = 0"):
        nets.MLP(2, depth=0)
    with pytest.raises(ValueError, match=r"mults must be a non-empty tuple"):
        nets.UNet(mults=())


def test_unet_out_channels_sets_the_output_width_only():
    net = nets.UNet(channels=1, base=8, attention=False, out_channels=2)
    out = net(torch.zeros(3, 1, 8, 8), torch.full((3,), 0.5))
    assert out.shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="out_channels"):
        nets.UNet(channels=1, base=8, out_channels=0)
