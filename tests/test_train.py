"""The losses against their exact minima, minibatch OT, EMA, and the training loop's resume.

The exact model of a target is :math:`\\mathbb E[y \\mid x_t]`, computed from the exact
denoiser of an analytic law through ``targets.convert``.  For Gaussian data its loss has a
closed form: at fixed :math:`x_t`, any prediction of :math:`y = c_0 x_0 + c_\\varepsilon
\\varepsilon` errs by :math:`(c_0 - c_\\varepsilon\\alpha/\\sigma)(x_0 - \\hat x_0)`, and
:math:`\\operatorname{tr}\\operatorname{Cov}[x_0 \\mid x_t] = \\sum_i \\ell_i\\sigma^2/(\\alpha^2
\\ell_i + \\sigma^2)` over the eigenvalues :math:`\\ell_i` of the covariance, so the minimum
at time ``t`` is :math:`(c_0\\sigma - c_\\varepsilon\\alpha)^2 \\sum_i \\ell_i/(\\alpha^2\\ell_i +
\\sigma^2)`.
"""

import functools
import itertools
import math

import pytest
import scipy.integrate
import torch

from diffcore import analytic, data, nets, processes, samplers, targets, train

from .test_analytic import make_mixture

T_MIN = 1e-3  # the losses' default time range is [T_MIN, 1)


def _gaussian():
    cov = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=torch.float64)
    return analytic.Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64), cov)


def _exact_model(law, process, target):
    def model(x, t, label=None):
        return targets.convert(law.denoise(x, t, process), "x0", target, x, t, process)

    return model


def _coefficients(target, a, s, da, ds):
    """(c_0, c_eps) with y = c_0 x0 + c_eps eps, written from the targets' definitions."""
    return {
        "eps": (0, 1),
        "x0": (1, 0),
        "score": (0, -1 / s),
        "v": (-s, a),
        "velocity": (da, ds),
    }[target]


def _mc(loss, n_batches=25, batch=4000, **kw):
    """Loss values on independent batches (seeds 0..n-1): their mean and standard error."""
    values = torch.stack(
        [
            loss(batch=batch, generator=torch.Generator().manual_seed(i), **kw)
            for i in range(n_batches)
        ]
    )
    return values, float(values.mean()), float(values.std() / math.sqrt(n_batches))


# (loss, target, weight w(t) of the squared error, time range)
LOSSES = {
    "eps": (train.eps_loss, "eps", lambda p, t: 1.0, (T_MIN, 1.0)),
    "x0": (train.x0_loss, "x0", lambda p, t: 1.0, (T_MIN, 1.0)),
    "v": (train.v_loss, "v", lambda p, t: 1.0, (T_MIN, 1.0)),
    "dsm": (train.dsm_loss, "score", lambda p, t: 0.5 * p.sigma(t) ** 2, (T_MIN, 1.0)),
    "velocity": (
        functools.partial(train.diffusion_loss, target="velocity"),
        "velocity",
        lambda p, t: 1.0,
        (T_MIN, 1.0),
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_exact_model_attains_the_closed_form_minimum(smooth_process, name):
    process, law = smooth_process, _gaussian()
    loss_fn, target, weight, (t0, t1) = LOSSES[name]
    ell = torch.linalg.eigvalsh(law.cov).tolist()
    model = _exact_model(law, process, target)

    # E_t of the minimum at time t, t uniform on [t0, t1): Simpson's rule in u = log t on 4001
    # points (the integrand is smooth in log t; the quadrature error is far below the MC error)
    u = torch.linspace(math.log(t0), math.log(t1), 4001)
    t = torch.exp(u).clamp(max=t1)
    a, s, da, ds = (f(t) for f in (process.alpha, process.sigma, process.d_alpha, process.d_sigma))
    c0, c_eps = _coefficients(target, a, s, da, ds)
    at_t = (
        weight(process, t) * (c0 * s - c_eps * a) ** 2 * sum(l / (a * a * l + s * s) for l in ell)
    )
    exact = scipy.integrate.simpson((at_t * t).numpy(), x=u.numpy()) / (t1 - t0)

    def loss(batch, generator):
        x0 = law.sample(batch, generator=generator)
        return loss_fn(model, x0, process, generator=generator)

    _, mean, se = _mc(loss)
    # the estimate is a mean of 100k iid terms: within 4 standard errors of the exact value
    assert abs(mean - exact) <= 4 * se, (mean, exact, se)
    assert se <= 0.03 * exact  # and precise enough to mean something


def test_elbo_at_the_exact_model_is_the_mutual_information_gap(smooth_process):
    """For Gaussian data the ELBO term at the optimum has a closed form (I-MMSE):
    int -lam'(t) sum_i a^2 l_i / (a^2 l_i + s^2) dt = sum_i 1/2 [log(1 + SNR l_i)] from t_max to t_min."""
    process, law = smooth_process, _gaussian()
    ell = torch.linalg.eigvalsh(law.cov)
    snr = process.snr(torch.tensor([T_MIN, 1.0]))
    exact = float(0.5 * (torch.log1p(snr[0] * ell) - torch.log1p(snr[1] * ell)).sum())
    model = _exact_model(law, process, "eps")

    def loss(batch, generator):
        return train.elbo_loss(
            model, law.sample(batch, generator=generator), process, generator=generator
        )

    _, mean, se = _mc(loss, n_batches=40)
    assert abs(mean - exact) <= 4 * se, (mean, exact, se)
    assert se <= 0.03 * exact


def test_elbo_with_uniform_logsnr_times_is_unbiased_and_less_noisy(smooth_process):
    """The same closed form, estimated with t drawn uniform in log-SNR and importance weight
    w/q; on [T_MIN, 0.999] (Linear has lambda = -inf at t = 1).  Its standard error must not
    exceed that of uniform times: the eps weight -lambda' becomes constant.  (For VE,
    lambda = -log sigma_t is linear in t, and the two samplers draw the same times.)"""
    process, law, t_max = smooth_process, _gaussian(), 0.999
    ell = torch.linalg.eigvalsh(law.cov)
    snr = process.snr(torch.tensor([T_MIN, t_max]))
    exact = float(0.5 * (torch.log1p(snr[0] * ell) - torch.log1p(snr[1] * ell)).sum())
    model = _exact_model(law, process, "eps")
    standard_errors = {}
    for name, sampler in [
        ("uniform", train.uniform_time(T_MIN, t_max)),
        ("logsnr", train.uniform_logsnr_time(process, T_MIN, t_max)),
    ]:

        def loss(batch, generator, sampler=sampler):
            x0 = law.sample(batch, generator=generator)
            return train.elbo_loss(
                model, x0, process, t_max=t_max, t_sampler=sampler, generator=generator
            )

        _, mean, standard_errors[name] = _mc(loss, n_batches=20)
        assert abs(mean - exact) <= 4 * standard_errors[name], (name, mean, exact)
    assert standard_errors["logsnr"] <= standard_errors["uniform"] * (1 + 1e-9), standard_errors


def test_uniform_logsnr_time_draws_uniform_lambda_with_its_density(smooth_process, gen):
    process = smooth_process
    sampler = train.uniform_logsnr_time(process, 0.01, 0.9)
    t = sampler(20_000, gen)
    assert t.dtype == torch.float64 and 0.01 <= float(t.min()) and float(t.max()) <= 0.9
    lam = process.lam(t)
    high, low = float(process.lam(0.01)), float(process.lam(0.9))
    u = (lam - low) / (high - low)  # uniform on [0, 1]: mean 1/2, variance 1/12
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 20_000)
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / 20_000)
    # the density integrates to one over [t_min, t_max] (Simpson on a fine grid)
    grid = torch.linspace(0.01, 0.9, 2001, dtype=torch.float64)
    integral = scipy.integrate.simpson(sampler.density(grid).numpy(), x=grid.numpy())
    assert abs(integral - 1) < 1e-6, integral


def test_uniform_logsnr_time_rejects_infinite_log_snr():
    with pytest.raises(ValueError, match="t_max = 1.0"):
        train.uniform_logsnr_time(processes.Linear(), 1e-3, 1.0)
    with pytest.raises(ValueError, match="t_min = 0"):
        train.uniform_logsnr_time(processes.VP(), 0, 1.0)


def test_elbo_loss_rejects_a_sampler_on_another_range():
    law, vp = _gaussian(), processes.VP()
    with pytest.raises(ValueError, match="t_sampler covers"):
        train.elbo_loss(
            _exact_model(law, vp, "eps"),
            law.sample(4),
            vp,
            t_sampler=train.uniform_logsnr_time(vp, 0.01, 1.0),
        )


def test_elbo_is_the_same_for_every_target(process, gen):
    """w(t) ||y - y_hat||^2 = -1/2 SNR'(t) ||x0 - x0_hat||^2 holds sample by sample, so models
    that make the same x0 prediction in five parametrisations have the same ELBO loss."""
    law = make_mixture()
    x0 = law.sample(500, generator=gen)
    values = [
        train.elbo_loss(
            _exact_model(law, process, target),
            x0,
            process,
            target=target,
            generator=torch.Generator().manual_seed(3),
        )
        for target in targets.TARGETS
    ]
    torch.testing.assert_close(torch.stack(values), values[0].expand(5), rtol=1e-9, atol=0)


def _cfm(model, x0, process, generator):
    return train.cfm_loss(model, x0, process, generator=generator)


MIXTURE_LOSSES = {
    "eps": (train.eps_loss, "eps"),
    "x0": (train.x0_loss, "x0"),
    "v": (train.v_loss, "v"),
    "dsm": (train.dsm_loss, "score"),
    "elbo": (train.elbo_loss, "eps"),
    "cfm": (_cfm, "velocity"),
}


@pytest.mark.parametrize("name", list(MIXTURE_LOSSES))
def test_the_exact_mixture_model_is_the_minimiser(name):
    """L(F* + delta h) - L(F*) = delta^2 E w|h|^2 + 2 delta E w (F* - y).h: the second term
    vanishes exactly when F* = E[y | x_t].  With common random numbers (same seeds), the
    paired differences have small standard errors; both signs of delta must raise the loss
    by more than 4 of them, and the symmetric part must vanish within 4."""
    process = processes.Linear() if name == "cfm" else processes.VP()
    law = make_mixture()
    loss_fn, target = MIXTURE_LOSSES[name]
    exact = _exact_model(law, process, target)

    def perturbed(delta):
        def model(x, t, label=None):
            return exact(x, t) + delta * torch.sin(x + 1)  # a smooth, non-constant direction

        return model

    def loss(batch, generator, delta):
        x0 = law.sample(batch, generator=generator)
        return loss_fn(perturbed(delta), x0, process, generator=generator)

    base, _, _ = _mc(loss, delta=0.0)
    delta = 0.1
    up, _, _ = _mc(loss, delta=delta)
    down, _, _ = _mc(loss, delta=-delta)
    n = len(base)
    for other in (up, down):
        diff = other - base
        assert float(diff.mean()) > 4 * float(diff.std()) / math.sqrt(n), diff
    slope = (up - down) / 2  # 2 delta E w (F* - y).h: zero in expectation at the minimiser
    assert abs(float(slope.mean())) <= 4 * float(slope.std()) / math.sqrt(n), slope


def test_mixture_eps_loss_minimum_by_the_law_of_total_variance():
    """tr Cov[eps | x_t] = sum_k r_k tr Cov_k[eps | x_t] + sum_k r_k |m_k - m|^2, with
    m_k = E[eps | x_t, k]: the first term averages to sum_k w_k sum_i a^2 l_ki / (a^2 l_ki + s^2)
    (closed form per component), the second is estimated on an independent sample.  Both
    routes are Monte-Carlo means; they must agree within 4 combined standard errors."""
    process, law = processes.VP(), make_mixture()
    model = _exact_model(law, process, "eps")
    values, mean, se = _mc(
        lambda batch, generator: train.eps_loss(
            model, law.sample(batch, generator=generator), process, generator=generator
        )
    )

    gen = torch.Generator().manual_seed(1000)
    n = 100_000
    x0 = law.sample(n, generator=gen)
    t = T_MIN + (1 - T_MIN) * torch.rand(n, generator=gen)
    x = process.marginal(x0, t, torch.randn(n, 2, generator=gen))
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    ell = torch.linalg.eigvalsh(law.covs)  # (K, d)
    within = (
        law.weights
        * (a[:, :, None] ** 2 * ell / (a[:, :, None] ** 2 * ell + s[:, :, None] ** 2)).sum(-1)
    ).sum(-1)
    r = law.responsibilities(x, t, process)
    m_k = torch.stack([(x - a * law.denoise(x, t, process, label=k)) / s for k in range(3)], 1)
    m = (r[:, :, None] * m_k).sum(1)
    between = (r * ((m_k - m[:, None]) ** 2).sum(-1)).sum(-1)
    total = within + between
    independent, se_independent = float(total.mean()), float(total.std() / math.sqrt(n))
    assert abs(mean - independent) <= 4 * math.hypot(se, se_independent), (mean, independent)
    assert float(between.mean()) > 10 * se  # the between-component term is resolved, not noise


def test_a_wrong_model_has_a_larger_loss():
    """The checks above have teeth: the exact model of a moment-matched Gaussian, a good but
    wrong model of the mixture, loses by many standard errors."""
    process, law = processes.VP(), make_mixture()
    x = law.sample(200_000, generator=torch.Generator().manual_seed(5))
    wrong = analytic.Gaussian(x.mean(0), torch.cov(x.T))

    def loss(batch, generator, model_law):
        x0 = law.sample(batch, generator=generator)
        return train.eps_loss(
            _exact_model(model_law, process, "eps"), x0, process, generator=generator
        )

    right_values, _, _ = _mc(loss, model_law=law)
    wrong_values, _, _ = _mc(loss, model_law=wrong)
    diff = wrong_values - right_values
    assert float(diff.mean()) > 10 * float(diff.std()) / math.sqrt(len(diff))


# -- minibatch optimal transport --------------------------------------------------------------
def _cost(x0, noise, perm):
    return float(((x0 - noise[perm]) ** 2).sum())


def test_ot_pairing_is_the_brute_force_optimum(gen):
    for _ in range(3):
        x0, noise = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
        perm = train.ot_pairing(x0, noise)
        best = min(itertools.permutations(range(6)), key=lambda p: _cost(x0, noise, list(p)))
        assert perm.tolist() == list(best)


def test_ot_pairing_is_a_permutation_that_does_not_increase_the_cost(gen):
    x0, noise = data.two_moons(256, generator=gen), torch.randn(256, 2, generator=gen)
    perm = train.ot_pairing(x0, noise)
    assert sorted(perm.tolist()) == list(range(256))
    identity = torch.arange(256)
    assert _cost(x0, noise, perm) <= _cost(x0, noise, identity)
    assert _cost(x0, noise, perm) < 0.5 * _cost(x0, noise, identity)  # much shorter paths
    images = torch.randn(8, 1, 2, 2, generator=gen)
    assert sorted(
        train.ot_pairing(images, torch.randn(8, 1, 2, 2, generator=gen)).tolist()
    ) == list(range(8))


def test_ot_cfm_pairs_data_with_noise_by_the_assignment():
    """With the OT coupling, x_t lies on the straight segment from x0 to its assigned noise:
    a model that records its inputs sees x_t = (1 - t) x0 + t noise[perm]."""
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    seen = {}

    def recorder(x, t, label=None):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    train.cfm_loss(recorder, x0, coupling="ot", generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(16, generator=gen, dtype=torch.float64)
    noise = torch.randn(16, 2, generator=gen)
    noise = noise[train.ot_pairing(x0, noise)]
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x"], (1 - t[:, None]) * x0 + t[:, None] * noise)


# -- labels ------------------------------------------------------------------------------------
def test_drop_labels():
    label = torch.arange(10).repeat(2000)
    gen = torch.Generator().manual_seed(0)
    dropped = train.drop_labels(label, 0.2, 10, generator=gen)
    changed = dropped != label
    assert bool((dropped[changed] == 10).all())
    p, n = float(changed.double().mean()), label.numel()
    assert abs(p - 0.2) <= 4 * math.sqrt(0.2 * 0.8 / n)  # binomial standard error
    assert torch.equal(train.drop_labels(label, 0.0, 10), label)
    assert bool((train.drop_labels(label, 1.0, 10) == 10).all())


def test_losses_pass_labels_and_drop_them():
    net = nets.MLP(2, hidden=16, depth=1, n_classes=4)
    seen = []

    def model(x, t, label=None):
        seen.append(label)
        return net(x, t, label)

    model.null_label = net.null_label
    x0, label = torch.zeros(1000, 2), torch.zeros(1000, dtype=torch.long)
    train.eps_loss(
        model,
        x0,
        processes.VP(),
        label=label,
        p_uncond=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    dropped = float((seen[-1] == 4).double().mean())
    assert abs(dropped - 0.5) <= 4 * math.sqrt(0.25 / 1000)
    train.cfm_loss(model, x0, label=label)
    assert torch.equal(seen[-1], label)


# -- EMA ---------------------------------------------------------------------------------------
def test_ema_is_the_normalised_exponentially_weighted_average(gen):
    model = torch.nn.Linear(3, 2)
    beta = 0.9
    iterates = [{k: v.clone() for k, v in model.state_dict().items()}]
    ema = train.EMA(model, beta)
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        iterates.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    n = len(iterates) - 1
    weights = torch.tensor([beta ** (n - k) for k in range(n + 1)])
    for key in iterates[0]:
        stacked = torch.stack([it[key] for it in iterates])
        expected = torch.einsum("k,k...->...", weights, stacked) / weights.sum()
        torch.testing.assert_close(ema.average()[key], expected, rtol=1e-12, atol=1e-12)
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy)
    torch.testing.assert_close(copy.weight, ema.average()["weight"])
    other = train.EMA(torch.nn.Linear(3, 2), beta)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.average()["bias"], ema.average()["bias"])
    with pytest.raises(ValueError, match="decay 0.9, this one has 0.5"):
        train.EMA(torch.nn.Linear(3, 2), 0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\), got decay = 1"):
        train.EMA(model, 1.0)


# -- the training loop -------------------------------------------------------------------------
def _small_net(n_classes=None):
    torch.manual_seed(0)
    return nets.MLP(2, hidden=32, depth=2, n_classes=n_classes)


def test_training_lowers_the_loss():
    vp = processes.VP()
    loss_fn = functools.partial(train.eps_loss, process=vp)
    net = _small_net()

    def held_out(model):
        return torch.stack(
            [
                loss_fn(
                    model,
                    data.eight_gaussians(1000, torch.Generator().manual_seed(100 + i)),
                    generator=torch.Generator().manual_seed(i),
                )
                for i in range(20)
            ]
        ).detach()

    before = held_out(net)
    ema_net, losses = train.fit(
        net,
        loss_fn,
        data.eight_gaussians,
        steps=150,
        lr=3e-3,
        batch_size=256,
        ema_decay=0.95,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(losses) == 150
    after = held_out(ema_net)
    diff = before - after  # paired: the same data, times and noise
    assert float(diff.mean()) > 5 * float(diff.std()) / math.sqrt(len(diff))
    assert float(after.mean()) < 0.8 * float(before.mean())


def _resume_run(tmp_path, split):
    """Train 2 N steps on labelled data, in one go (split=False) or as N, then resume to 2 N."""
    law = make_mixture()
    x, labels = law.sample(500, generator=torch.Generator().manual_seed(0), return_labels=True)
    loss_fn = functools.partial(train.eps_loss, process=processes.VP(), p_uncond=0.2)
    path = tmp_path / ("split.pt" if split else "straight.pt")
    options = dict(batch_size=64, ema_decay=0.9, checkpoint=path, checkpoint_every=3)
    if split:
        train.fit(
            _small_net(3),
            loss_fn,
            (x, labels),
            10,
            generator=torch.Generator().manual_seed(1),
            **options,
        )
        fresh = torch.Generator().manual_seed(123)  # restored from the checkpoint
        return train.fit(_small_net(3), loss_fn, (x, labels), 20, generator=fresh, **options), path
    net = _small_net(3)
    return (
        train.fit(
            net, loss_fn, (x, labels), 20, generator=torch.Generator().manual_seed(1), **options
        ),
        path,
    )


def test_resume_continues_bit_for_bit(tmp_path):
    (ema_a, losses_a), _ = _resume_run(tmp_path, split=False)
    (ema_b, losses_b), path = _resume_run(tmp_path, split=True)
    assert losses_a == losses_b and len(losses_a) == 20
    for (name, a), (_, b) in zip(
        ema_a.state_dict().items(), ema_b.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    state = torch.load(path, weights_only=True)  # only tensors, numbers and containers inside
    assert state["step"] == 20 and set(state) == {
        "step",
        "model",
        "ema",
        "optimizer",
        "generator",
        "losses",
    }
    raw = _small_net(3)
    raw.load_state_dict(state["model"])
    ema_b2 = train.EMA(raw, 0.9)
    ema_b2.load_state_dict(state["ema"])
    for key, value in ema_b2.average().items():
        assert torch.equal(value, ema_b.state_dict()[key])
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    # resuming past the end trains nothing
    _, losses = train.fit(
        _small_net(3),
        lambda *a, **k: 1 / 0,
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)),
        20,
        checkpoint=path,
        ema_decay=0.9,
    )
    assert losses == losses_b


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    loss_fn = train.cfm_loss
    train.fit(
        _small_net(), loss_fn, data.two_moons, 4, batch_size=16, checkpoint=path, checkpoint_every=2
    )
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.fit(
            _small_net(),
            loss_fn,
            data.two_moons,
            6,
            batch_size=16,
            checkpoint=path,
            checkpoint_every=2,
        )
    assert path.read_bytes() == before  # the old checkpoint survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_progress_is_quiet_under_tests_and_shown_on_request(capsys, monkeypatch):
    loss_fn = functools.partial(train.x0_loss, process=processes.VE())
    monkeypatch.delenv("DIFFCORE_PROGRESS", raising=False)
    train.fit(_small_net(), loss_fn, data.two_moons, 3, batch_size=8)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    monkeypatch.setenv("DIFFCORE_PROGRESS", "1")
    train.fit(_small_net(), loss_fn, data.two_moons, 3, batch_size=8)
    assert "3/3" in capsys.readouterr().err
    train.fit(_small_net(), loss_fn, data.two_moons, 3, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""


def test_data_sources(gen):
    """A tensor, an iterator and a sampler all feed the loop; batches take the model's dtype."""
    seen = []

    def loss_fn(model, x0, generator):
        seen.append(x0)
        return model(x0, 0.5).pow(2).mean()

    net = _small_net().float()
    train.fit(net, loss_fn, torch.randn(10, 2, generator=gen), 2, batch_size=4)
    train.fit(net, loss_fn, iter([torch.ones(3, 2), torch.zeros(3, 2)]), 2)
    train.fit(net, loss_fn, data.checkerboard, 1, batch_size=5)
    assert [tuple(x.shape) for x in seen] == [(4, 2), (4, 2), (3, 2), (3, 2), (5, 2)]
    assert all(x.dtype == torch.float32 for x in seen)


def test_bad_training_input_is_refused():
    net, vp = _small_net(), processes.VP()
    x0 = torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"target must be one of .* got target = 'noise'"):
        train.diffusion_loss(net, x0, vp, target="noise")
    with pytest.raises(
        ValueError,
        match=r"coupling must be one of \('independent', 'ot'\), got coupling = 'sinkhorn'",
    ):
        train.cfm_loss(net, x0, coupling="sinkhorn")
    with pytest.raises(ValueError, match="p_uncond = 0.1 drops labels, but no label was given"):
        train.eps_loss(net, x0, vp, p_uncond=0.1)
    with pytest.raises(ValueError, match="needs a class-conditional model with a null_label"):
        train.eps_loss(net, x0, vp, label=torch.zeros(8, dtype=torch.long), p_uncond=0.1)
    with pytest.raises(
        ValueError, match=r"model must return a tensor of shape \(8, 2\).* got shape \(8, 1\)"
    ):
        train.eps_loss(lambda x, t: x[:, :1], x0, vp)
    with pytest.raises(
        ValueError, match=r"need 0 <= t_min < t_max <= 1, got t_min = 0.5, t_max = 0.5"
    ):
        train.uniform_time(0.5, 0.5)
    loss_fn = functools.partial(train.eps_loss, process=vp)
    with pytest.raises(TypeError, match="steps must be an integer >= 0, got steps = 1.5"):
        train.fit(net, loss_fn, x0, 1.5)
    with pytest.raises(ValueError, match="data must be a tensor, a tuple"):
        train.fit(net, loss_fn, "moons", 1)
    with pytest.raises(ValueError, match="x and labels must have the same length, got 8 and 3"):
        train.fit(net, loss_fn, (x0, torch.zeros(3, dtype=torch.long)), 1)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 0"):
        train.fit(net, lambda model, x0, generator: model(x0, 0.5).sum() * float("nan"), x0, 1)


# -- reflow ------------------------------------------------------------------------------------
def test_reflow_of_an_exact_deterministic_coupling_is_straight():
    """Pairs (x0, eps) coupled by the exact Gaussian flow map x0 = A eps + b (A symmetric positive
    definite) make x_t = ((1 - t) A + t I) eps + (1 - t) b an invertible function of eps, so the
    reflow target eps - x0 is a function of x_t: the loss at that minimiser is zero (up to
    round-off), a perturbed field pays, and one Euler step from t = 1 is exact."""
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.5]])
    g = analytic.Gaussian(torch.tensor([1.0, -1.0]), cov)
    lin = processes.Linear()
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(512, 2, generator=gen)
    pairs = torch.stack([g.pf_ode_map(eps, 1.0, 0.0, lin), eps], dim=1)
    b = g.pf_ode_map(torch.zeros(1, 2), 1.0, 0.0, lin)[0]
    a = g.pf_ode_map(torch.eye(2), 1.0, 0.0, lin) - b  # rows: images of the basis, A symmetric

    def straight(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1)
        m = (1 - t) * a + t * torch.eye(2)
        e = torch.linalg.solve(m, (x - (1 - t)[..., 0] * b).unsqueeze(-1)).squeeze(-1)
        return e - (e @ a + b)

    loss = train.reflow_loss(straight, pairs, generator=torch.Generator().manual_seed(1))
    assert float(loss) < 1e-20
    worse = train.reflow_loss(
        lambda x, t: straight(x, t) + 0.05, pairs, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(worse, torch.tensor(2 * 0.05**2))
    torch.testing.assert_close(eps - straight(eps, torch.ones(512)), pairs[:, 0])


def test_reflow_pairs_follow_the_flow_and_train():
    g = analytic.Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.4], [0.4, 0.5]]))
    lin = processes.Linear()
    eps = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    ts = samplers.time_grid(lin, 64, kind="uniform", t_min=0.0)
    pairs = train.reflow_pairs(g.denoiser(lin), eps, ts)
    assert pairs.shape == (256, 2, 2)
    torch.testing.assert_close(pairs[:, 1], eps)
    # Heun with 64 steps: second order, error well below 1e-3 here
    assert float((pairs[:, 0] - g.pf_ode_map(eps, 1.0, 0.0, lin)).abs().max()) < 1e-3
    with pytest.raises(
        ValueError, match=r"pairs must have shape \(batch, 2, \.\.\.\), got \(4, 2\)"
    ):
        train.reflow_loss(lambda x, t: x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        train.reflow_pairs(g.denoiser(lin), eps, ts, sampler="rk45")
