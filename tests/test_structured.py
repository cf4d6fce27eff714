"""Structured noise against exact answers: SAM-DiffSR's modulated noise on Gaussian (mixture)
data, and DRDM's deformation noise on images."""

import math

import pytest
import torch

from diffcore import analytic, processes, samplers
from diffcore.structured import (
    ModulatedMixture,
    affine_field,
    compose,
    ddpm_mask_coefficient,
    deformation_path,
    deformation_recovery_loss,
    encode_segments,
    folding_fraction,
    gradient_bound,
    inverse_field,
    jacobian_determinant,
    modulated_marginal,
    modulated_noise_loss,
    modulated_target,
    random_field,
    recover,
    recovery_loss,
    rope_map,
    warp,
)

VP = processes.VP()
SIDE = 4  # 4 x 4 toy images: d = 16


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# =============================================================================================
# SAM-DiffSR
# =============================================================================================
def _rotary_reference(height, width):
    """RotaryEmbedding(dim=W).rotate_queries_or_keys(ones(1, 1, H, W)) of rotary-embedding-torch,
    written out: frequencies repeated pairwise, rotate_half on interleaved pairs."""
    freqs = 1.0 / (10000 ** (torch.arange(0, width, 2)[: width // 2].double() / width))
    angles = torch.arange(height).double()[:, None] * freqs  # (H, W // 2)
    angles = angles.repeat_interleave(2, dim=-1)  # '... n -> ... (n r)', r = 2
    rot = angles.shape[-1]
    t = torch.ones(height, width)
    x = t[:, :rot]
    pairs = x.reshape(height, -1, 2)
    half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(height, rot)
    return torch.cat((x * angles.cos() + half * angles.sin(), t[:, rot:]), dim=1)


def test_rope_map_is_the_rotary_embedding_of_ones():
    for h, w in [(6, 8), (5, 7)]:
        err = (rope_map(h, w) - _rotary_reference(h, w)).abs().max().item()
        print(f"\nrope_map({h}, {w}) vs rotary reference: {err:.1e}")
        assert err < 1e-12
    # failing variant: the rotate-half-by-halves convention (GPT-NeoX) gives another map
    e = rope_map(6, 8)
    halves = torch.cat((e[:, 0::2], e[:, 1::2]), dim=1)
    assert (halves - _rotary_reference(6, 8)).abs().max() > 0.1


def test_encode_segments_puts_one_image_mean_per_segment():
    gen = _gen(1)
    seg = torch.randint(-1, 4, (3, 6, 5), generator=gen)
    m = encode_segments(seg)
    E = rope_map(6, 5)
    worst = 0.0
    for b in range(3):
        for label in range(-1, 4):
            inside = seg[b] == label
            if not inside.any():
                continue
            expected = 0.0 if label < 0 else E[inside].sum().item() / 30
            worst = max(worst, (m[b][inside] - expected).abs().max().item())
    print(f"\nper-segment constants: max error {worst:.1e}")
    assert worst < 1e-12
    # one map at a time gives the same, and the map's values are the only thing that moves
    assert torch.equal(encode_segments(seg[1]), m[1])
    # failing variant: the mean over the segment (not over the image) is |image|/|S| larger
    inside = seg[0] == 2
    seg_mean = E[inside].mean().item()
    assert abs(seg_mean - m[0][inside][0].item()) > 0.1 * abs(seg_mean)


def _toy_mixture():
    """Two 4 x 4 'images' with their own segmentations: component k's segments are where its
    mean is bright and where it is dark."""
    rows = torch.arange(SIDE).double()[:, None].expand(SIDE, SIDE)
    means = torch.stack([(rows - 1.5) / 1.5, (rows.T - 1.5) / 1.5]).reshape(2, -1)
    gen = _gen(2)
    covs = []
    for _ in range(2):
        a = 0.3 * torch.randn(SIDE * SIDE, 3, generator=gen)
        covs.append(0.05 * torch.eye(SIDE * SIDE) + a @ a.T)
    mixture = analytic.GaussianMixture(means, torch.stack(covs), torch.tensor([0.4, 0.6]))
    segments = (means.reshape(2, SIDE, SIDE) > 0).long()
    return mixture, encode_segments(segments).reshape(2, -1)


MIXTURE, MAPS = _toy_mixture()
SCALE = 2.0


def test_modulated_marginal_moves_the_mean_only():
    gen = _gen(3)
    x0, _ = MIXTURE.sample(5, generator=gen, return_labels=True)
    noise = torch.randn(5, 16, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    m = MAPS[0]
    shifted = modulated_marginal(x0, t, noise, m, VP, SCALE)
    err = (shifted - VP.marginal(x0, t, noise) - VP.sigma(t)[:, None] * SCALE * m).abs().max()
    assert err < 1e-12
    assert torch.equal(modulated_target(noise, m, SCALE), noise + SCALE * m)
    # Monte Carlo for one x0: mean alpha x0 + sigma c m, covariance sigma^2 I (unchanged)
    n, tt = 200_000, 0.6
    x0 = x0[:1].expand(n, -1)
    draws = modulated_marginal(x0, tt, torch.randn(n, 16, generator=gen), m, VP, SCALE)
    a, s = VP.alpha(tt).item(), VP.sigma(tt).item()
    mean_err = (draws.mean(0) - (a * x0[0] + s * SCALE * m)).abs().max().item()
    cov = torch.cov(draws.T)
    cov_err = (cov - s**2 * torch.eye(16)).abs().max().item()
    # 5 standard errors: of a mean, s / sqrt(n); of a covariance entry, s^2 sqrt(2 / n)
    mean_bound, cov_bound = 5 * s / math.sqrt(n), 5 * s**2 * math.sqrt(2 / n)
    print(
        f"\nmean error {mean_err:.1e} <= {mean_bound:.1e}; "
        f"cov error {cov_err:.1e} <= {cov_bound:.1e}"
    )
    assert mean_err < mean_bound and cov_err < cov_bound
    # failing variant: the unmodulated mean misses by sigma c max|m|
    miss = (draws.mean(0) - a * x0[0]).abs().max().item()
    assert miss > 10 * mean_bound


def test_mixture_oracle_samples_log_prob_and_score():
    oracle = ModulatedMixture(MIXTURE, MAPS, SCALE)
    gen, n, t = _gen(4), 200_000, 0.5
    draws = oracle.sample(n, t, VP, generator=gen)
    a, s = VP.alpha(t).item(), VP.sigma(t).item()
    w = MIXTURE.weights
    exact_mean = w @ (a * MIXTURE.means + s * SCALE * MAPS)
    spread = (w[:, None] * (a**2 * torch.diagonal(MIXTURE.covs, dim1=1, dim2=2) + s**2)).sum(0)
    spread = spread + w @ (a * MIXTURE.means + s * SCALE * MAPS - exact_mean) ** 2
    err = ((draws.mean(0) - exact_mean).abs() / (spread / n).sqrt()).max().item()
    print(f"\nsample mean of the modulated mixture: max {err:.2f} standard errors")
    assert err < 5
    # the score is the gradient of the log-density
    x = draws[:64].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(oracle.log_prob(x, t, VP).sum(), x)
    assert (oracle.score(x.detach(), t, VP) - grad).abs().max() < 1e-12
    # failing variant: the mean of the unmodulated mixture is far outside
    plain = (draws.mean(0) - w @ (a * MIXTURE.means)).abs() / (spread / n).sqrt()
    assert plain.max() > 50


def test_modulated_tweedie_and_the_standard_conversion():
    """alpha E[x0|x] + sigma c E[m|x] = x + sigma^2 grad log p (Tweedie for the shifted signal)
    and (x - sigma eps_hat)/alpha = E[x0|x]: the standard conversion of the regression's
    minimiser is the exact denoiser of the modulated process."""
    oracle = ModulatedMixture(MIXTURE, MAPS, SCALE)
    gen = _gen(5)
    t = torch.rand(64, generator=gen) * 0.9 + 0.05
    x = oracle.sample(64, t, VP, generator=gen)
    a, s = VP.alpha(t)[:, None], VP.sigma(t)[:, None]
    d, mm, score = oracle.denoise(x, t, VP), oracle.mean_map(x, t, VP), oracle.score(x, t, VP)
    err = (a * d + s * SCALE * mm - x - s**2 * score).abs().max().item()
    conv = ((x - s * oracle.eps(x, t, VP)) / a - d).abs().max().item()
    print(f"\nmodulated Tweedie {err:.1e}; standard conversion {conv:.1e}")
    assert err < 1e-12 and conv < 1e-12
    # failing variant: the standard Tweedie formula misses by sigma c E[m | x]
    miss = (a * d - x - s**2 * score).abs().max().item()
    assert miss > 0.1
    # -eps_hat / sigma is not the score of the modulated marginals: it is off by c E[m|x]/sigma
    off = -oracle.eps(x, t, VP) / s - score + SCALE * mm / s
    assert off.abs().max() < 1e-12


def test_eps_oracle_minimises_the_modulated_noise_loss():
    """L(f) = L(eps_hat) + E|f - eps_hat|^2 + 2 E<eps_hat - target, f - eps_hat>; the last
    term has mean 0 exactly when eps_hat is the conditional mean.  With the same draws
    (same generator), L(f) - L(eps_hat) - mean|f - eps_hat|^2 is the sample cross term."""
    oracle = ModulatedMixture(MIXTURE, MAPS, SCALE)
    n = 40_000
    x0, labels = MIXTURE.sample(n, generator=_gen(6), return_labels=True)
    maps = MAPS[labels]

    def exact(x, t):
        return oracle.eps(x, t, VP)

    def standard(x, t):  # the noise of the unmodulated mixture: ignores the map
        a, s = VP.alpha(t)[:, None], VP.sigma(t)[:, None]
        return (x - a * MIXTURE.denoise(x, t, VP)) / s

    # the same draws as the loss makes (generator order: t, then eps)
    gen = _gen(7)
    t = 1e-3 + (1 - 1e-3) * torch.rand(n, generator=gen)
    eps = torch.randn(n, 16, generator=gen)
    x_t = modulated_marginal(x0, t, eps, maps, VP, SCALE)
    target = eps + SCALE * maps
    gap = standard(x_t, t) - exact(x_t, t)
    cross = 2 * ((exact(x_t, t) - target) * gap).sum(1)
    bound = 5 * cross.std().item() / math.sqrt(n)
    l_exact = modulated_noise_loss(exact, x0, maps, VP, scale=SCALE, generator=_gen(7)).item()
    l_std = modulated_noise_loss(standard, x0, maps, VP, scale=SCALE, generator=_gen(7)).item()
    excess = l_std - l_exact - (gap**2).sum(1).mean().item()
    print(
        f"\nloss at eps_hat {l_exact:.4f}, at the unmodulated eps {l_std:.4f}; cross term "
        f"{excess:.2e} (|.| <= {bound:.1e})"
    )
    assert abs(excess) < bound
    # failing variant: taking the unmodulated eps as the minimiser leaves a cross term of
    # 2 E<eps_std - target, eps_hat - eps_std> = -2 E|gap|^2, many standard errors from 0
    wrong = 2 * ((standard(x_t, t) - target) * (-gap)).sum(1)
    assert abs(wrong.mean().item()) > 10 * 5 * wrong.std().item() / math.sqrt(n)


def _continuity_residual(log_p, velocity, x, t):
    """d/dt log p + div v + v . grad log p at (x, t), by autograd (zero for the velocity that
    carries the marginals)."""
    x = x.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    lp = log_p(x, t)
    d_x, d_t = torch.autograd.grad(lp.sum(), (x, t))
    v = velocity(x, t)
    div = sum(
        torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1])
    )
    return (d_t + div + (v * d_x).sum(1)).detach()


def test_velocity_carries_the_modulated_marginals():
    gen = _gen(8)
    mix = analytic.GaussianMixture(
        torch.tensor([[1.0, 0.5], [-1.0, 0.0]]),
        torch.stack([torch.diag(torch.tensor([0.3, 0.2])), torch.tensor([[0.4, 0.1], [0.1, 0.2]])]),
        torch.tensor([0.5, 0.5]),
    )
    maps = torch.tensor([[0.8, -0.5], [-0.3, 0.9]])
    x = 1.5 * torch.randn(200, 2, generator=gen)
    t = 0.05 + 0.9 * torch.rand(200, generator=gen)
    for name, scale in {"constant c": 1.5, "c(t) = 0.5 + t": lambda t: 0.5 + t}.items():
        oracle = ModulatedMixture(mix, maps, scale)
        r = _continuity_residual(
            lambda x, t, o=oracle: o.log_prob(x, t, VP),
            lambda x, t, o=oracle: o.velocity(x, t, VP),
            x,
            t,
        )
        print(f"\n{name}: continuity residual {r.abs().max().item():.1e}")
        assert r.abs().max() < 1e-9
    # failing variants: (i) the PF-ODE that a sampler integrates from eps_hat drops
    # sigma c' E[m|x]: wrong when c varies; (ii) the PF-ODE of the *true* score of the
    # modulated marginals, f x - g^2/2 grad log p, is wrong even for a constant c
    varying = ModulatedMixture(mix, maps, lambda t: 0.5 + t)

    def sampler_velocity(x, t):
        d = varying.denoise(x, t, VP)
        return VP.d_alpha(t)[:, None] * d + VP.d_sigma(t)[:, None] * varying.eps(x, t, VP)

    constant = ModulatedMixture(mix, maps, 1.5)

    def score_velocity(x, t):
        f, g2 = VP.f(t)[:, None], VP.g2(t)[:, None]
        return f * x - 0.5 * g2 * constant.score(x, t, VP)

    for name, lp, v in [
        ("sampler PF-ODE, c(t) varying", varying.log_prob, sampler_velocity),
        ("true-score PF-ODE, constant c", constant.log_prob, score_velocity),
    ]:
        r = _continuity_residual(lambda x, t, lp=lp: lp(x, t, VP), v, x, t)
        print(f"  {name}: residual {r.abs().max().item():.2f}")
        assert r.abs().max() > 1e-2


def _gaussian_setup():
    gen = _gen(9)
    a = 0.4 * torch.randn(16, 16, generator=gen)
    gaussian = analytic.Gaussian(
        0.3 * torch.randn(16, generator=gen), a @ a.T + 0.1 * torch.eye(16)
    )
    segments = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 1], [2, 2, 2, 1]])
    m = encode_segments(segments).reshape(1, 16)
    return gaussian, m, torch.randn(8, 16, generator=gen)


def test_ddim_with_the_modulated_model_is_standard_ddim_shifted():
    """x~_t = y_t + sigma_t c m: a data-prediction step x_s = (sigma_s/sigma_t) x_t +
    alpha_s(...)D carries the shift exactly, so from the modulated prior the output is the
    standard sampler's output, to round-off."""
    gaussian, m, y = _gaussian_setup()
    oracle = ModulatedMixture(gaussian, m, SCALE)
    start = y + VP.sigma(1.0) * SCALE * m
    for name in ("ddim", "dpmpp_2m"):
        for n in (10, 40):
            ts = torch.linspace(1, 0, n + 1)
            out = samplers.SAMPLERS[name](oracle.denoiser(VP), start, ts, VP)
            ref = samplers.SAMPLERS[name](gaussian.denoiser(VP), y, ts, VP)
            err = (out - ref).abs().max().item()
            print(f"\n{name}, {n} steps: modulated vs standard {err:.1e}")
            assert err < 1e-12

    # failing variant: the official code's time-varying c_t = sigma_t beta_t (100 steps)
    def code_scale(t):
        return ddpm_mask_coefficient(VP, t, 100)

    varying = ModulatedMixture(gaussian, m, code_scale)
    ts = torch.linspace(1, 0, 41)
    start = y + VP.sigma(1.0) * code_scale(torch.tensor(1.0)) * m
    out = samplers.ddim(varying.denoiser(VP), start, ts, VP)
    ref = samplers.ddim(gaussian.denoiser(VP), y, ts, VP)
    print(f"  the code's time-varying c_t: {(out - ref).abs().max().item():.1e}")
    assert (out - ref).abs().max() > 1e-6


def test_ddpm_with_the_modulated_model_is_biased():
    """A DDPM step from x~_t = y + sigma_t c m returns the standard step from y plus
    sigma_s e^{-h} c m: it keeps e^{-h} of the shift, so the standard chain takes an error
    sigma_s (e^{-h} - 1) c m at every step (checked to round-off with the same noise).  The
    output mean (zero noise: the steps are affine for Gaussian data) moves away from the
    standard DDPM's and does not come back as the steps get finer; DDIM has no bias."""
    gaussian, m, y = _gaussian_setup()
    oracle = ModulatedMixture(gaussian, m, SCALE)
    s1 = VP.sigma(1.0)
    ts = torch.linspace(1, 0, 21)
    noise = torch.randn(20, *y.shape, generator=_gen(15))
    out = samplers.ddpm(
        oracle.denoiser(VP), y + s1 * SCALE * m, ts, VP, noise_sampler=lambda i, shape: noise[i]
    )
    chain = y.clone()
    for i in range(20):
        t, s = ts[i].item(), ts[i + 1].item()
        chain = VP.ddim_step(chain, gaussian.denoise(chain, t, VP), t, s, eta=1.0, z=noise[i])
        h = (VP.lam(torch.tensor(s)) - VP.lam(torch.tensor(t))).item()
        if math.isfinite(h):
            chain = chain + VP.sigma(s) * (math.exp(-h) - 1) * SCALE * m
    err = (out - chain).abs().max().item()
    print(f"\nDDPM = standard DDPM + sigma_s (e^-h - 1) c m per step: {err:.1e}")
    assert err < 1e-12

    def zero(i, shape):
        return torch.zeros(shape)

    y_mean = (VP.alpha(1.0) * gaussian.mean)[None]
    biases = {}
    for n in (50, 400):
        ts = torch.linspace(1, 0, n + 1)
        start = y_mean + s1 * SCALE * m
        out = samplers.ddpm(oracle.denoiser(VP), start, ts, VP, noise_sampler=zero)
        ref = samplers.ddpm(gaussian.denoiser(VP), y_mean, ts, VP, noise_sampler=zero)
        biases[n] = (out - ref).norm().item()
        out = samplers.ddim(oracle.denoiser(VP), start, ts, VP)
        ref = samplers.ddim(gaussian.denoiser(VP), y_mean, ts, VP)
        assert (out - ref).abs().max() < 1e-12
    print(f"DDPM output-mean bias |.|: {biases}  (|c m| = {(SCALE * m).norm().item():.3f})")
    # failing variant (of "the reverse process is unchanged"): a bias of the size of c m that
    # does not shrink with the step
    assert min(biases.values()) > 0.5 * (SCALE * m).norm().item()
    assert biases[400] > 0.5 * biases[50]


def test_ddpm_mask_coefficient_is_the_official_codes():
    betas = processes.ddpm_betas(100)
    ab = processes.alphas_cumprod(betas)
    proc = processes.Discrete(ab)
    t = (torch.arange(100) + 1).double() / 100
    code = torch.sqrt(1 - ab) * betas
    err = (ddpm_mask_coefficient(proc, t, 100) - code).abs().max().item()
    print(f"\nmask coefficient vs sqrt(1 - abar_n) beta_n: {err:.1e}")
    assert err < 1e-12
    # failing variant: one step off (beta_{n+1})
    assert (torch.sqrt(1 - ab[:-1]) * betas[1:] - code[:-1]).abs().max() > 1e-6


# =============================================================================================
# DRDM
# =============================================================================================
def _digit(size=8):
    from diffcore.data import digits

    images, _ = digits(size)
    return images[:4].double()


def test_warp_by_zero_is_the_identity_and_by_a_pixel_a_shift():
    x = _digit()
    zero = torch.zeros(4, 2, 8, 8)
    err = (warp(x, zero) - x).abs().max().item()
    print(f"\nwarp by the zero field: {err:.1e}")
    assert err < 1e-14
    down = torch.zeros(4, 2, 8, 8)
    down[:, 0] = 1.0  # x(p + (1, 0)): the row below
    assert (warp(x, down)[..., :-1, :] - x[..., 1:, :]).abs().max() < 1e-14
    # failing variant: the channels are (row, column); read as (x, y) the shift goes sideways
    assert (warp(x, down.flip(1))[..., :-1, :] - x[..., 1:, :]).abs().max() > 0.5


def _affine(angle, scale, shift, size):
    c, s = math.cos(angle), math.sin(angle)
    jac = scale * torch.tensor([[c, -s], [s, c]])
    return jac - torch.eye(2), torch.tensor(shift), size


def _inside(points, size, margin=0.0):
    return ((points >= margin) & (points <= size - 1 - margin)).all(1)


def test_compose_is_exact_for_affine_fields_and_the_inverse_cancels():
    size = 24
    A, sa, _ = _affine(0.15, 1.05, [0.3, -0.4], size)
    B, sb, _ = _affine(-0.1, 0.95, [-0.2, 0.5], size)
    u, w = affine_field(A, sa, size), affine_field(B, sb, size)
    grid = torch.stack(
        torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    )[None]
    keep = _inside(grid + w, size)
    IA, IB = torch.eye(2) + A, torch.eye(2) + B
    exact = affine_field(IA @ IB - torch.eye(2), IA @ sb + sa, size)
    err = (compose(u, w) - exact).permute(0, 2, 3, 1)[keep].abs().max().item()
    # the exact inverse map: (I + A)^-1 - I and -(I + A)^-1 s about the same centre
    inv = torch.linalg.inv(IA)
    u_inv = affine_field(inv - torch.eye(2), -inv @ sa, size)
    keep_inv = _inside(grid + u_inv, size)
    cancel = compose(u, u_inv).permute(0, 2, 3, 1)[keep_inv].abs().max().item()
    print(f"\naffine composition {err:.1e}; u o u^-1 {cancel:.1e} (on {int(keep_inv.sum())} px)")
    assert err < 1e-12 and cancel < 1e-12
    # failing variant: -u is only a first-order inverse
    wrong = compose(u, -u).permute(0, 2, 3, 1)[_inside(grid - u, size)].abs().max().item()
    print(f"  u o (-u): {wrong:.2f} px")
    assert wrong > 0.1


def test_warp_round_trip_within_the_bilinear_interpolation_bound():
    """f(p) = sin(k.p + 0.3) sampled on the grid; warp by u (map phi, Jacobian J) and then by
    its exact inverse.  Two bilinear interpolations: |f - Pi f| <= (|f_rr| + |f_cc|)/8 per
    interpolation, so the error is at most (|k|^2 + |J^T k|^2)/8 where every point used stays
    in the image; warping once by the composed field (zero) is exact."""
    size = 32
    k = torch.tensor([0.35, -0.25])
    grid = torch.stack(
        torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    )[None]
    f = torch.sin((k[:, None, None] * grid[0]).sum(0) + 0.3)[None, None]
    A, s, _ = _affine(0.3, 1.15, [0.4, -0.7], size)
    J = torch.eye(2) + A
    u = affine_field(A, s, size)
    inv = torch.linalg.inv(J)
    v = affine_field(inv - torch.eye(2), -inv @ s, size)
    back = warp(warp(f, u), v)
    # pixels p whose psi(p) and the phi-images of psi(p)'s cell corners all lie in the image
    q = grid + v
    ok = _inside(q, size)
    for dr in (0, 1):
        for dc in (0, 1):
            corner = torch.stack((q[:, 0].floor() + dr, q[:, 1].floor() + dc), 1)
            phi = affine_field(A, s, size, centre=((size - 1) / 2, (size - 1) / 2))
            mapped = corner + warp(phi, corner - grid, padding="border")  # phi is affine: exact
            ok &= _inside(mapped, size)
    err = (back - f)[:, 0][ok].abs().max().item()
    bound = ((k**2).sum() + ((J.T @ k) ** 2).sum()).item() / 8
    once = (warp(f, compose(u, v)) - f)[:, 0][ok].abs().max().item()
    print(
        f"\nround trip {err:.3f} <= bound {bound:.3f} on {int(ok.sum())} px; "
        f"composed once {once:.1e}"
    )
    assert err <= bound and once < 1e-12
    # failing variant: the first-order inverse -u leaves an error beyond the bound
    wrong = (warp(warp(f, u), -u) - f)[:, 0][ok].abs().max().item()
    print(f"  with -u as the inverse: {wrong:.3f}")
    assert wrong > 2 * bound


def test_fixed_point_inverse_contracts_at_rate_2b():
    u = random_field(6, 16, bound=0.3, generator=_gen(10))
    rate = 2 * gradient_bound(u)
    size_u = u.abs().flatten(1).amax(1)
    for k in (5, 10, 20):
        residual = compose(u, inverse_field(u, k)).abs().flatten(1).amax(1)
        bound = rate**k * size_u
        print(f"\nk = {k}: residual {residual.max().item():.1e} <= {bound.max().item():.1e}")
        assert bool((residual <= bound + 1e-14).all())
    # failing variant: -u (the first-order inverse) is far from the 20-step bound
    first_order = compose(u, -u).abs().flatten(1).amax(1)
    assert bool((first_order > 100 * rate**20 * size_u).all())


def test_one_step_keeps_det_j_above_one_minus_2b():
    gen = _gen(11)
    for b in (0.1, 0.3, 0.45):
        u = random_field(100, 16, bound=b, generator=gen, scales=(2, 4, 8))
        assert (gradient_bound(u) - b).abs().max() < 1e-12
        low = jacobian_determinant(u).min().item()
        print(f"\nb = {b}: min det J {low:.3f} >= {1 - 2 * b:.3f}")
        assert low >= 1 - 2 * b - 1e-12
    # failing variant: b = 1.5 folds
    u = random_field(100, 16, bound=1.5, generator=gen, scales=(2, 4, 8))
    folded = folding_fraction(u).mean().item()
    print(f"  b = 1.5: folding fraction {folded:.4f}")
    assert folded > 0


def test_composed_steps_keep_det_j_positive_while_guaranteed():
    gen = _gen(12)
    b, n = 0.05, 7  # (1 + 2b)^n = 1.95 < 2
    growth = (1 + 2 * b) ** n
    path = deformation_path(200, 16, n, bound=b, generator=gen)
    for t in range(1, n + 1):
        field = path.fields[t]
        assert gradient_bound(field).max() <= ((1 + 2 * b) ** t - 1) / 2 + 1e-12
    det = jacobian_determinant(path.fields[-1])
    print(f"\nb = {b}, {n} steps: min det J {det.min().item():.3f} >= {2 - growth:.3f}")
    assert det.min() >= 2 - growth - 1e-12 and folding_fraction(path.fields[-1]).max() == 0
    # beyond the guarantee the bound says nothing: measured, 10 steps of b = 0.3
    far = deformation_path(200, 16, 10, bound=0.3, generator=gen)
    print(f"  b = 0.3, 10 steps: folding {folding_fraction(far.fields[-1]).mean().item():.2e}")
    # failing variant: steps of b = 1.5 fold, and the composition keeps folding
    bad = deformation_path(200, 16, 3, bound=1.5, generator=gen)
    folded = folding_fraction(bad.fields[-1]).mean().item()
    print(f"  b = 1.5, 3 steps: folding {folded:.3f}")
    assert folded > 0


def test_displacement_variance_adds_over_independent_steps():
    """E|U_t(p)|^2 = E|u_t(p)|^2 + E|U_{t-1}(p + u_t(p))|^2: the cross term has mean 0 exactly
    (u_t is independent of U_{t-1}, whose mean is 0 at every point).  To first order the
    variances add: E|U_t(p)|^2 ~ sum_k E|u_k(p)|^2 (the last term is evaluated at a displaced
    point; the difference is of second order in the displacement).  Both within 5 standard
    errors at the centre pixel; one field repeated (the official code's choice) adds coherently."""
    n_samples, n, c = 4000, 8, 8
    path = deformation_path(n_samples, 16, n, bound=0.2, generator=_gen(13))
    for t in range(2, n + 1):  # (U_0 = 0: no cross term at the first step)
        before = warp(path.fields[t - 1], path.steps[t - 1])
        cross = 2 * (path.steps[t - 1] * before).sum(1)[:, c, c]
        assert abs(cross.mean().item()) < 5 * cross.std().item() / math.sqrt(n_samples)
    total = (path.fields[-1][:, :, c, c] ** 2).sum(1)
    steps = (path.steps[:, :, :, c, c] ** 2).sum(2).sum(0)
    diff = total - steps
    bound = 5 * diff.std().item() / math.sqrt(n_samples)
    print(
        f"\nE|U_{n}|^2 = {total.mean().item():.4f}, sum of step variances "
        f"{steps.mean().item():.4f}: |diff| {abs(diff.mean().item()):.4f} <= {bound:.4f}"
    )
    assert abs(diff.mean().item()) < bound
    # failing variant: one field composed with itself: the cross term is large, variance ~ n^2
    same = deformation_path(n_samples, 16, n, bound=0.2, repeat=True, generator=_gen(13))
    total = (same.fields[-1][:, :, c, c] ** 2).sum(1).mean().item()
    step = (same.steps[0][:, :, c, c] ** 2).sum(1).mean().item()
    print(f"  repeated field: E|U_{n}|^2 / E|u|^2 = {total / step:.1f} (independent: ~{n})")
    assert total / step > 4 * n


def test_recovery_loss_zero_at_the_inverse_one_at_zero():
    size = 16
    A, s, _ = _affine(0.17, 0.8, [0.0, 0.0], size)  # a contraction: p + u(p) stays inside
    u = affine_field(A, s, size)
    inv = torch.linalg.inv(torch.eye(2) + A)
    r = affine_field(inv - torch.eye(2), -inv @ s, size)
    at_inverse, at_zero = recovery_loss(r, u).item(), recovery_loss(torch.zeros_like(u), u).item()
    print(f"\nrecovery loss at the inverse {at_inverse:.1e}, at zero {at_zero:.15f}")
    assert at_inverse < 1e-24 and abs(at_zero - 1) < 1e-14
    # failing variant: -u, the first-order inverse
    assert recovery_loss(-u, u).item() > 1e-3
    # the loss is differentiable in the prediction (for training a recovery network)
    pred = torch.zeros_like(u).requires_grad_(True)
    recovery_loss(pred, u).backward()
    assert pred.grad.abs().max() > 0


def test_recover_with_exact_inverses_returns_the_field_to_zero():
    """Affine steps (exact under composition); the oracle returns the inverse of step t.  The
    reverse process undoes the last step first: the field returns to 0 to round-off on the
    pixels far enough from the border (each composition moves the evaluation point by at most
    max|r| + 1 pixel).  In the wrong order (first step first) it does not: the maps do not
    commute."""
    size, n = 64, 3
    gen = _gen(14)
    mats = [0.03 * torch.randn(2, 2, generator=gen) for _ in range(n)]
    shifts = [0.5 * torch.randn(2, generator=gen) for _ in range(n)]
    steps = [affine_field(a, s, size) for a, s in zip(mats, shifts, strict=True)]
    inverses = []
    for a, s in zip(mats, shifts, strict=True):
        inv = torch.linalg.inv(torch.eye(2) + a)
        inverses.append(affine_field(inv - torch.eye(2), -inv @ s, size))
    field = torch.zeros(1, 2, size, size)
    for step in steps:
        field = compose(field, step)
    image = torch.rand(1, 1, size, size, generator=gen)
    reach = sum(f.abs().max().item() + 1 for f in steps + inverses)
    margin = math.ceil(reach)
    inner = (slice(None), slice(None), slice(margin, size - margin), slice(margin, size - margin))

    def oracle(x, t):
        return inverses[round(t * n) - 1]

    out, back = recover(oracle, image, field, n)
    err = back[inner].abs().max().item()
    print(f"\nrecovered field {err:.1e} on the inner {size - 2 * margin}^2 pixels")
    assert err < 1e-12 and (out - image)[inner].abs().max() < 1e-12

    def wrong_order(x, t):
        return inverses[n - round(t * n)]

    _, off = recover(wrong_order, image, field, n)
    print(f"  wrong order: {off[inner].abs().max().item():.2e} px")
    assert off[inner].abs().max() > 1e-3


# =============================================================================================
# bad input
# =============================================================================================
def test_bad_input():
    with pytest.raises(ValueError, match="segments"):
        encode_segments(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="segments"):
        encode_segments(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="segments"):
        encode_segments(torch.zeros(4, 4))
    x0 = torch.zeros(3, 16)
    with pytest.raises(ValueError, match="mean_map"):
        modulated_marginal(x0, 0.5, torch.zeros(3, 16), torch.zeros(15), VP)
    with pytest.raises(ValueError, match="scale"):
        modulated_marginal(x0, 0.5, torch.zeros(3, 16), torch.zeros(16), VP, scale=-1.0)
    with pytest.raises(ValueError, match="mean_maps"):
        ModulatedMixture(MIXTURE, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="bound"):
        random_field(2, 8, bound=0.0)
    with pytest.raises(ValueError, match="bound"):
        deformation_path(2, 8, 3, bound=-0.1)
    image = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="field"):
        warp(image, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="field"):
        warp(image, torch.zeros(2, 2, 8, 7))
    with pytest.raises(ValueError, match="field"):
        jacobian_determinant(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="then"):
        compose(torch.zeros(2, 2, 8, 8), torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="padding"):
        warp(image, torch.zeros(2, 2, 8, 8), padding="wrap")
    with pytest.raises(ValueError, match="n_steps"):
        ddpm_mask_coefficient(VP, 0.5, 0)


def test_deformation_recovery_loss_scores_the_last_step():
    """The training objective: 1 for the zero field (to round-off), and near 0 for a model
    that knows the drawn step and returns its inverse (a model that redraws the path from the
    same generator state): what is left is bilinear interpolation, about 1e-3 of |u|^2 at any b
    below 1/2; the first-order inverse -u misses a term of relative size ~ b, so at b = 0.3 its
    loss is over ten times larger.  The model reads t/n."""
    images = torch.rand(6, 1, 16, 16, generator=_gen(20))
    seen = []

    def zero(x, t):
        seen.append(t)
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    loss = deformation_recovery_loss(zero, images, 4, bound=0.1, generator=_gen(21))
    assert abs(loss.item() - 1) < 1e-14
    assert seen[0].shape == (6,) and set(seen[0].tolist()) <= {0.25, 0.5, 0.75, 1.0}

    def redrawn_step(seed):
        gen = _gen(seed)
        torch.randint(1, 2, (6,), generator=gen)  # the loss's draw of t (n = 1)
        return deformation_path(6, 16, 1, bound=0.3, generator=gen).steps[0]

    def knows_the_step(x, t):
        return inverse_field(redrawn_step(22))

    def first_order(x, t):
        return -redrawn_step(22)

    exact = deformation_recovery_loss(knows_the_step, images, 1, bound=0.3, generator=_gen(22))
    rough = deformation_recovery_loss(first_order, images, 1, bound=0.3, generator=_gen(22))
    print(f"\nrecovery loss: exact inverse {exact.item():.1e}, -u {rough.item():.1e}")
    assert exact < 2e-3 and rough > 10 * exact
    with pytest.raises(ValueError, match="x0"):
        deformation_recovery_loss(zero, torch.zeros(6, 16, 16), 4, bound=0.1)
