"""Multi-task (joint data-label) diffusion against exact answers."""

import math
import re

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffcore import analytic, processes
from diffcore.multitask import (
    ExactJoint,
    JointMLP,
    JointProcess,
    conditional_denoiser,
    conditional_sample,
    joint_denoiser,
    joint_sample,
    label_classifier,
    multitask_loss,
    onehot_embedding,
    replacement_sample,
    train_joint,
)
from diffcore.samplers import time_grid
from diffcore.targets import convert
from tests._moments import assert_gaussian_moments

VP = processes.VP()
MEANS = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
COVS = [[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]], [[0.8, 0.0], [0.0, 0.2]]]
WEIGHTS = [0.5, 0.3, 0.2]
SCALE = 1.5


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _setup(process=VP, scale=SCALE, covs=COVS):
    mixture = analytic.GaussianMixture(
        torch.tensor(MEANS), torch.tensor(covs), torch.tensor(WEIGHTS)
    )
    joint = JointProcess(process, onehot_embedding(3, scale))
    return mixture, joint, ExactJoint(mixture, joint)


def _draws(exact, n, t, seed=0):
    """Labelled pairs and their joint states z_t (t a float or (n,))."""
    gen = _gen(seed)
    x0, y = exact.sample(n, gen)
    noise = torch.randn(n, x0.shape[1] + exact.joint.label_dim, generator=gen)
    return x0, y, noise, exact.joint.marginal(x0, y, t, noise)


def _brute_log_joint(mixture, joint, z, t, label_var=None):
    """log pi_k + log N(z; alpha [mu_k, E_k], blockdiag(alpha^2 Sigma_k + sigma^2 I, v I)) from
    the full (d + m)-dimensional Gaussian, sample by sample (v = sigma^2 unless given)."""
    t = torch.as_tensor(t).expand(z.shape[0])
    d, m = mixture.dim, joint.label_dim
    out = torch.empty(z.shape[0], mixture.n_components)
    for i in range(z.shape[0]):
        a, s = joint.process.alpha(t[i]), joint.process.sigma(t[i])
        v = s**2 if label_var is None else label_var(a, s)
        for k in range(mixture.n_components):
            mean = a * torch.cat([mixture.means[k], joint.embedding[k]])
            cov = torch.zeros(d + m, d + m)
            cov[:d, :d] = a**2 * mixture.covs[k] + s**2 * torch.eye(d)
            cov[d:, d:] = v * torch.eye(m)
            out[i, k] = math.log(WEIGHTS[k]) + MultivariateNormal(mean, cov).log_prob(z[i])
    return out


# -- the forward process and the exact posterior ------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "linear"])
def test_posterior_equals_brute_force_bayes(name):
    process = {"vp": VP, "linear": processes.Linear()}[name]
    mixture, joint, exact = _setup(process)
    t = torch.linspace(0.05, 0.95, 40)
    x0, y, noise, z = _draws(exact, 40, t)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    z0 = torch.cat([x0, SCALE * torch.eye(3)[y]], dim=1)
    assert (z - (a * z0 + s * noise)).abs().max() < 1e-12
    brute = torch.softmax(_brute_log_joint(mixture, joint, z, t), dim=-1)
    err = (exact.label_posterior(z, t) - brute).abs().max().item()
    log_err = exact.log_prob(z, t) - torch.logsumexp(_brute_log_joint(mixture, joint, z, t), -1)
    print(
        f"\n{name}: posterior vs brute-force Bayes {err:.1e}, log p_t(z) {log_err.abs().max():.1e}"
    )
    assert err < 1e-12 and log_err.abs().max() < 1e-12
    # failing variant: the label block's variance alpha^2 + sigma^2 instead of sigma^2
    wrong = _brute_log_joint(mixture, joint, z, t, label_var=lambda a, s: a**2 + s**2)
    gap = (exact.label_posterior(z, t) - torch.softmax(wrong, -1)).abs().max().item()
    print(f"  with alpha^2 + sigma^2 in the label block: {gap:.2f}")
    assert gap > 0.05


def test_exact_joint_denoiser_is_tweedie_of_brute_force_density():
    mixture, joint, exact = _setup()
    t = torch.linspace(0.1, 0.9, 30)
    _, _, _, z = _draws(exact, 30, t, seed=1)
    a, s = VP.alpha(t)[:, None], VP.sigma(t)[:, None]

    def tweedie(label_var=None):
        zz = z.clone().requires_grad_(True)
        log_p = torch.logsumexp(_brute_log_joint(mixture, joint, zz, t, label_var), -1)
        (score,) = torch.autograd.grad(log_p.sum(), zz)
        return (z + s**2 * score) / a

    err = (exact.denoise(z, t) - tweedie()).abs().max().item()
    same = (joint_denoiser(exact, joint)(z, t) - exact.denoise(z, t)).abs().max().item()
    print(
        f"\ndenoiser vs Tweedie on the brute-force density: {err:.1e}; as a joint model {same:.1e}"
    )
    assert err < 1e-10 and same < 1e-14

    # the same exact model behind a noise head: joint_denoiser converts eps back to x0
    class EpsHead:
        target = "eps"

        def __call__(self, zz, tt):
            x0_hat, logits = exact(zz, tt)
            x_t = joint.split(zz)[0]
            return convert(x0_hat, "x0", "eps", x_t, tt, VP), logits

    via_eps = (joint_denoiser(EpsHead(), joint)(z, t) - exact.denoise(z, t)).abs().max().item()
    EpsHead.target = "x0"  # failing variant: the noise read as x0
    misread = (joint_denoiser(EpsHead(), joint)(z, t) - exact.denoise(z, t)).abs().max().item()
    print(f"  through an eps head: {via_eps:.1e}; the eps read as x0: {misread:.2f}")
    assert via_eps < 1e-12 and misread > 0.05
    gap = (exact.denoise(z, t) - tweedie(lambda a, s: 2 * s**2)).abs().max().item()
    print(f"  Tweedie with 2 sigma^2 in the label block: {gap:.2f}")
    assert gap > 0.05


def test_posterior_tends_to_prior_at_t1_and_to_the_label_at_t0():
    prior = torch.tensor(WEIGHTS)
    _, _, linear = _setup(processes.Linear())
    _, _, _, z = _draws(linear, 2000, 1.0, seed=2)
    at_one = (linear.label_posterior(z, 1.0) - prior).abs().max().item()
    print(f"\nLinear, t = 1 (alpha = 0): |p(y | z) - pi| = {at_one:.1e}")
    assert at_one < 1e-14
    # VP: on fixed states z, the gap is first order in alpha_t as alpha_t -> 0 (the
    # log-likelihoods differ across classes by alpha_t times a linear form in z, over sigma_t^2)
    _, _, exact = _setup()
    z = torch.randn(2000, 5, generator=_gen(3))
    times = (0.5, 0.7, 0.85, 0.95, 1.0)
    gaps = [(exact.label_posterior(z, t) - prior).abs().max().item() for t in times]
    rates = [g / VP.alpha(t).item() for g, t in zip(gaps, times, strict=True)]
    print(
        "VP, max |p(y | z) - pi| at t = 0.5, 0.7, 0.85, 0.95, 1: "
        + ", ".join(f"{g:.1e}" for g in gaps)
        + "; over alpha_t: "
        + ", ".join(f"{r:.2f}" for r in rates)
    )
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False))
    assert abs(rates[-1] / rates[-2] - 1) < 0.05  # gap ~ C alpha_t: the limit is pi
    hits = []
    for t in (0.3, 0.1, 1e-3):
        _, y, _, z = _draws(exact, 2000, t, seed=4)
        hits.append(exact.label_posterior(z, t).gather(1, y[:, None]).mean().item())
    print("VP, mean p(true y | z_t) at t = 0.3, 0.1, 1e-3: " + ", ".join(f"{h:.6f}" for h in hits))
    assert hits[0] < hits[1] < hits[2] and hits[2] > 1 - 1e-12


# -- the multi-task loss ----------------------------------------------------------------------
class LinearHead(torch.nn.Module):
    """Logits affine in z_t: the exact posterior's family when the classes share a covariance."""

    def __init__(self, width, n_classes, dim):
        super().__init__()
        self.dim = dim
        self.logits = torch.nn.Linear(width, n_classes)

    def forward(self, z, t):
        return z.new_zeros(z.shape[0], self.dim), self.logits(z)


def test_cross_entropy_is_minimised_by_the_exact_posterior():
    """With a shared covariance the exact log-posterior is affine in z_t (the Gaussian terms'
    quadratic parts cancel across classes), so a linear label head is well specified.  Its
    maximum-likelihood fit on N draws has excess risk 2N (CE - CE*) ~ chi^2_p with p = (K - 1)
    (D + 1) identifiable parameters: the bound (p + 5 sqrt(2p)) / (2N), plus 5 standard errors
    of the paired Monte-Carlo estimate of the excess on n fresh draws."""
    shared = [COVS[0]] * 3
    mixture, joint, exact = _setup(covs=shared)
    t_fixed, n_train, n_test = 0.6, 20_000, 200_000

    def at_t(n, generator=None):
        return torch.full((n,), t_fixed)

    x0, y = exact.sample(n_train, _gen(5))
    head = LinearHead(5, 3, 2)
    opt = torch.optim.LBFGS(
        head.parameters(),
        lr=1,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        # the same generator seed each call: a fixed training set, as the theory assumes
        loss = multitask_loss(head, x0, joint, y, t_sampler=at_t, generator=_gen(6), parts=True)
        loss["label"].backward()
        return loss["label"]

    for _ in range(5):
        opt.step(closure)
    _, y_te, _, z = _draws(exact, n_test, t_fixed, seed=7)
    log_exact = exact.label_log_posterior(z, t_fixed).gather(1, y_te[:, None])[:, 0]

    def excess(model):
        logits = model(z, t_fixed)[1]
        d = log_exact - torch.log_softmax(logits, -1).gather(1, y_te[:, None])[:, 0]
        return d.mean().item(), d.std().item() / math.sqrt(n_test)

    p = (3 - 1) * (5 + 1)
    gap, se = excess(head)
    bound = (p + 5 * math.sqrt(2 * p)) / (2 * n_train) + 5 * se
    ce_exact = -log_exact.mean().item()
    loss_exact = multitask_loss(exact, x0, joint, y, t_sampler=at_t, generator=_gen(6), parts=True)
    print(
        f"\nCE of the exact posterior {ce_exact:.4f} nats (in the loss: "
        f"{loss_exact['label'].item():.4f}); fitted linear head: excess {gap:.2e} "
        f"(+- {se:.1e}) <= {bound:.2e}"
    )
    assert -5 * se < gap < bound
    # failing variants: the exact posterior with the label block's variance doubled (a wrong
    # coefficient), and the prior pi
    a, s = VP.alpha(t_fixed), VP.sigma(t_fixed)
    sq = ((z[:, None, 2:] - a * joint.embedding) ** 2).sum(-1)  # ||e_t - alpha E_k||^2, (n, K)
    doubled = exact.label_log_posterior(z, t_fixed) + sq / (2 * s**2) - sq / (4 * s**2)
    w_gap, _ = excess(lambda z, t: (None, doubled))
    prior_gap, _ = excess(lambda z, t: (None, torch.log(torch.tensor(WEIGHTS)).expand(n_test, 3)))
    print(
        f"  excess with 2 sigma^2 in the label block: {w_gap:.2e}; of the prior pi: {prior_gap:.2e}"
    )
    assert w_gap > bound and prior_gap > bound


def test_joint_network_learns_both_heads():
    mixture, joint, exact = _setup()
    torch.manual_seed(0)
    net = JointMLP(2, 3, 3, hidden=64, depth=2).double()
    trained, losses = train_joint(
        net,
        joint,
        exact.sample,
        steps=300,
        batch_size=256,
        lr=3e-3,
        ema_decay=0.9,
        generator=_gen(8),
    )
    n = 20_000
    t = 1e-3 + (1 - 1e-3) * torch.rand(n, generator=_gen(9))
    x0, y, _, z = _draws(exact, n, t, seed=10)
    with torch.no_grad():
        x_net, logits = trained(z, t)
    log_exact = exact.label_log_posterior(z, t).gather(1, y[:, None])[:, 0]
    log_net = torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
    log_prior = torch.log(torch.tensor(WEIGHTS))[y]
    d_net, d_prior = log_exact - log_net, log_net - log_prior
    se_net, se_prior = (d.std().item() / math.sqrt(n) for d in (d_net, d_prior))
    # the data head, as x0, where alpha_t is not tiny (t < 0.5): paired squared errors against
    # the exact denoiser's, and against the data mean's (a head that learned nothing)
    low = t < 0.5
    x_net = joint_denoiser(trained, joint)(z, t)[:, :2].detach()
    sq_net = ((x_net - x0) ** 2).sum(1)[low]
    sq_exact = ((exact.denoise(z, t)[:, :2] - x0) ** 2).sum(1)[low]
    sq_mean = ((x0 - x0.mean(0)) ** 2).sum(1)[low]
    e_net, e_mean = sq_net - sq_exact, sq_mean - sq_net
    se_x, se_mean = (e.std().item() / math.sqrt(int(low.sum())) for e in (e_net, e_mean))
    print(
        f"\n300 steps: loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}; label CE excess "
        f"over exact {d_net.mean():.4f} (+- {se_net:.1e}), gain over the prior "
        f"{d_prior.mean():.3f} (+- {se_prior:.1e}); x0 MSE at t < 0.5: {sq_net.mean():.3f} "
        f"(exact {sq_exact.mean():.3f}, data mean {sq_mean.mean():.3f})"
    )
    assert e_net.mean() > -5 * se_x and e_mean.mean() > 5 * se_mean
    assert d_net.mean() > -5 * se_net  # no head beats the Bayes posterior
    assert d_prior.mean() > 5 * se_prior  # the label head has learned from z_t
    assert d_net.mean() < d_prior.mean()


# -- conditional generation ---------------------------------------------------------------------
def test_guided_denoiser_is_the_exact_conditional_denoiser():
    mixture, joint, exact = _setup()
    t = torch.linspace(0.05, 0.9, 64)
    _, _, _, z = _draws(exact, 64, t, seed=11)
    for c in range(3):
        guided = conditional_denoiser(exact, joint, c)(z, t)
        err = (guided - exact.denoise(z, t, label=c)).abs().max().item()
        print(f"\nclass {c}: guided joint denoiser vs [D_c(x_t), E_c]: {err:.1e}", end="")
        assert err < 1e-10
    # failing variants: guidance weight 0.9, and a classifier that ignores the label block
    gap_w = conditional_denoiser(exact, joint, 1, w=0.9)(z, t) - exact.denoise(z, t, label=1)
    x_only = analytic.GaussianMixture(mixture.means, mixture.covs, mixture.weights)

    def x_only_model(zz, tt):
        x = joint.split(zz)[0]
        logits = torch.log(x_only.weights) + x_only.component_log_prob(x, tt, VP)
        return exact(zz, tt)[0], logits

    from diffcore.guidance import classifier_guided_denoiser

    blind = classifier_guided_denoiser(
        joint_denoiser(exact, joint), label_classifier(x_only_model, joint), VP, 1, 1.0
    )
    gap_x = blind(z, t) - exact.denoise(z, t, label=1)
    print(
        f"\n  w = 0.9: {gap_w.abs().max():.2f}; classifier blind to the label block: "
        f"{gap_x.abs().max():.2f}"
    )
    assert gap_w.abs().max() > 0.05 and gap_x.abs().max() > 0.05


def test_conditional_generation_reproduces_the_class_law():
    """Heun on the guided exact joint denoiser, started from the exact p_1(z | c): the data
    block must follow N(mu_c, Sigma_c) within 5 standard errors (tests/_moments.py); the
    replacement method, from the same start, must not."""
    mixture, joint, exact = _setup()
    n, c = 4000, 1
    ts = time_grid(VP, 20, t_min=1e-3)
    gen = _gen(12)
    x_c = (
        mixture.means[c]
        + torch.randn(n, 2, generator=gen) @ torch.linalg.cholesky(mixture.covs[c]).T
    )
    z1 = joint.marginal(x_c, c, float(ts[0]), torch.randn(n, 5, generator=gen))
    x = conditional_sample(exact, joint, c, z1, ts)
    print(f"\nguided: mean {x.mean(0).tolist()}, exact {mixture.means[c].tolist()}")
    assert_gaussian_moments(x, mixture.means[c], mixture.covs[c])
    x_rep = replacement_sample(exact, joint, c, z1, ts, generator=gen)
    z_mean = (x_rep.mean(0) - mixture.means[c]) / (mixture.covs[c].diagonal() / n).sqrt()
    print(f"replacement: mean {x_rep.mean(0).tolist()}, z-scores {z_mean.tolist()}")
    assert z_mean.abs().max() > 50


def test_joint_generation_gives_coherent_pairs():
    """Heun on the exact joint denoiser from p_1(z): the decoded labels follow pi (5 multinomial
    standard errors) and each class's data its class law."""
    mixture, joint, exact = _setup()
    n = 6000
    ts = time_grid(VP, 20, t_min=1e-3)
    x0, y, _, z1 = _draws(exact, n, float(ts[0]), seed=13)
    x, label = joint_sample(exact, joint, z1, ts)
    freq = torch.bincount(label, minlength=3) / n
    prior = torch.tensor(WEIGHTS)
    z_freq = (freq - prior) / (prior * (1 - prior) / n).sqrt()
    print(f"\nlabel frequencies {freq.tolist()}, z-scores {z_freq.tolist()}")
    assert z_freq.abs().max() < 5
    for k in range(3):
        assert_gaussian_moments(x[label == k], mixture.means[k], mixture.covs[k])


# -- bad input --------------------------------------------------------------------------------
_M, _J, _E = _setup()


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: onehot_embedding(3, scale=0.0), ValueError, "scale = 0.0"),
        (lambda: onehot_embedding(3, scale=-2.0), ValueError, "scale = -2.0"),
        (lambda: onehot_embedding(1), ValueError, "n_classes = 1"),
        (lambda: JointProcess(VP, torch.ones(3, 2)), ValueError, "embedding[0] = embedding[1]"),
        (lambda: JointProcess(VP, torch.ones(3)), ValueError, "shape (3,)"),
        (lambda: _J.embed(torch.tensor([0, 3]), torch.zeros(2, 2)), ValueError, "label = [3]"),
        (lambda: _J.embed(-1, torch.zeros(2, 2)), ValueError, "label = -1"),
        (lambda: _J.embed(torch.tensor([0, 1, 2]), torch.zeros(2, 2)), ValueError, "(3,)"),
        (lambda: _J.marginal(torch.zeros(4, 2), 0, 0.5, torch.zeros(4, 4)), ValueError, "(4, 4)"),
        (lambda: _J.split(torch.zeros(4, 3)), ValueError, "(4, 3)"),
        (lambda: _E.label_posterior(torch.zeros(4, 6), 0.5), ValueError, "(4, 6)"),
        (lambda: _E.label_posterior(torch.zeros(4, 5), 0.0), ValueError, "sigma_t = 0"),
        (lambda: _E.label_posterior(torch.zeros(4, 5), 1.5), ValueError, "t = 1.5"),
        (lambda: _E.denoise(torch.zeros(4, 5), 0.5, label=7), ValueError, "label = 7"),
        (
            lambda: ExactJoint(_M, JointProcess(VP, onehot_embedding(4))),
            ValueError,
            "K = 4",
        ),
        (
            lambda: multitask_loss(_E, torch.zeros(4, 2), _J, torch.tensor([0, 1, 2, 5])),
            ValueError,
            "label = [5]",
        ),
        (lambda: multitask_loss(_E, torch.zeros(4, 2), _J), ValueError, "label="),
        (
            lambda: multitask_loss(_E, torch.zeros(4, 2), _J, 0, label_weight=-1.0),
            ValueError,
            "label_weight = -1.0",
        ),
        (lambda: conditional_denoiser(_E, _J, 3), ValueError, "label = [3]"),
        (lambda: JointMLP(2, 3, 3)(torch.zeros(4, 4), 0.5), ValueError, "(4, 4)"),
        (lambda: JointMLP(2, 3, 3, target="v"), ValueError, "target = 'v'"),
        (
            lambda: replacement_sample(_E, _J, 0, torch.zeros(2, 5), [1.0, 0.5], eta=2.0),
            ValueError,
            "eta = 2.0",
        ),
    ],
)
def test_bad_input_names_the_value(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()
