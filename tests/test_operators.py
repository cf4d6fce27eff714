"""The forward operators against their defining identities: adjoints (dot-product test),
pseudo-inverses (A A^+ A = A), data steps, SVD pieces, and the Radon transform of scikit-image."""

import math

import numpy as np
import pytest
import torch
from skimage.transform import radon

from diffcore.inverse import operators as op

ANGLES = [0.0, 17.0, 45.0, 90.0, 133.0, 171.5]


def make(name: str) -> op.LinearOperator:
    gen = torch.Generator().manual_seed(7)
    return {
        "matrix": lambda: op.MatrixOperator(torch.randn(4, 7, generator=gen)),
        "matrix_wide_rank_deficient": lambda: op.MatrixOperator(
            torch.randn(6, 2, generator=gen) @ torch.randn(2, 5, generator=gen)
        ),
        "identity": lambda: op.Identity((2, 3, 3)),
        "inpainting_random": lambda: op.Inpainting(op.random_mask((1, 6, 6), 0.4, gen)),
        "inpainting_box": lambda: op.Inpainting(op.box_mask((3, 6, 8), 1, 2, 3, 4)),
        "blur_gaussian": lambda: op.Blur(op.gaussian_kernel(5, 1.2), (2, 8, 8)),
        "blur_motion": lambda: op.Blur(op.motion_kernel(7, 30.0), (1, 8, 10)),
        "downsample": lambda: op.Downsample((2, 8, 6), 2),
        "fourier": lambda: op.FourierSubsampling(op.cartesian_mask((8, 8), 4, 0.25, gen)),
        "fourier_2ch": lambda: op.FourierSubsampling(op.cartesian_mask((6, 8), 2, 0.3, gen), 2),
        "radon": lambda: op.Radon(8, ANGLES),
        "radon_square": lambda: op.Radon(7, ANGLES[:4], circle=False),
    }[name]()


NAMES = [
    "matrix",
    "matrix_wide_rank_deficient",
    "identity",
    "inpainting_random",
    "inpainting_box",
    "blur_gaussian",
    "blur_motion",
    "downsample",
    "fourier",
    "fourier_2ch",
    "radon",
    "radon_square",
]
# closed forms hold to round-off; conjugate gradients (Radon) stop at a relative residual 1e-12,
# which the condition number of A^T A (~1e4 here) turns into ~1e-8 on the solution
CLOSED = 1e-11
ITERATIVE = 1e-7


def _tol(name: str) -> float:
    return ITERATIVE if name.startswith("radon") else CLOSED


@pytest.mark.parametrize("name", NAMES)
def test_adjoint_passes_the_dot_product_test(name, gen):
    assert op.dot_test(make(name), gen) < 1e-13


@pytest.mark.parametrize("name", NAMES)
def test_pseudo_inverse_satisfies_a_pinv_a_equals_a(name, gen):
    A = make(name)
    x = torch.randn(3, *A.in_shape, generator=gen)
    ax = A(x)
    again = A(A.pinv(ax))
    assert float((again - ax).abs().amax() / ax.abs().amax()) < _tol(name)


@pytest.mark.parametrize("name", NAMES)
def test_pseudo_inverse_is_the_minimum_norm_solution(name, gen):
    """A^+ y lies in the range of A^T: it equals A^T of something, so A^+ A A^+ y = A^+ y and
    the pseudo-inverse of the dense matrix gives the same vector."""
    A = make(name)
    y = A(torch.randn(2, *A.in_shape, generator=gen))
    dense = A.to_dense()
    if dense.is_complex():  # the real-linear map C^m ~ R^{2m}
        dense = torch.cat([dense.real, dense.imag])
        y_real = torch.cat([y.real.reshape(2, -1), y.imag.reshape(2, -1)], dim=1)
    else:
        y_real = y.reshape(2, -1)
    rtol = getattr(A, "rcond", None)  # Blur drops frequencies damped below rcond * max
    expected = y_real @ torch.linalg.pinv(dense, rtol=rtol).T
    got = A.pinv(y).reshape(2, -1)
    # two computations of A^+ y agree to round-off times the condition number of A (on its range)
    s = torch.linalg.svdvals(dense)
    kappa = float(s[0] / s[s > (rtol or 1e-12) * s[0]].amin())
    tol = max(_tol(name), 100 * torch.finfo(torch.float64).eps * kappa)
    assert float((got - expected).abs().amax() / expected.abs().amax()) < tol


@pytest.mark.parametrize("name", NAMES)
def test_normal_solve_inverts_the_regularised_normal_operator(name, gen):
    A = make(name)
    b = torch.randn(2, *A.in_shape, generator=gen)
    for gamma in (1e-2, 0.7):
        z = A.normal_solve(b, gamma)
        residual = A.normal(z) + gamma * z - b
        assert float(residual.abs().amax() / b.abs().amax()) < _tol(name)


@pytest.mark.parametrize("name", [n for n in NAMES if make(n).has_svd])
def test_svd_pieces_reconstruct_the_operator(name, gen):
    A = make(name)
    svd = A.svd()
    d, m = A.in_dim, A.out_dim
    vt = svd.Vt(torch.eye(d).reshape(d, *A.in_shape)).T  # columns: V^T e_j
    u = svd.U(torch.eye(m)).reshape(m, m).T
    s = torch.zeros(m, d)
    r = svd.s.numel()
    s[range(r), range(r)] = svd.s
    torch.testing.assert_close(u @ s @ vt, A.to_dense(), rtol=0, atol=1e-12)
    torch.testing.assert_close(vt @ vt.T, torch.eye(d), rtol=0, atol=1e-12)
    torch.testing.assert_close(u @ u.T, torch.eye(m), rtol=0, atol=1e-12)
    x = torch.randn(2, *A.in_shape, generator=gen)
    torch.testing.assert_close(svd.V(svd.Vt(x)), x, rtol=0, atol=1e-12)


def test_operators_without_svd_say_so():
    for name in ("blur_gaussian", "fourier", "radon"):
        A = make(name)
        assert not A.has_svd
        with pytest.raises(ValueError, match="no SVD"):
            A.svd()


# -- specific operators --------------------------------------------------------------------------
def _phantom(n: int, circle: bool) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    img = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)
    if circle:  # scikit-image assumes the image vanishes outside the inscribed circle
        yy, xx = np.ogrid[:n, :n]
        img[(yy - n // 2) ** 2 + (xx - n // 2) ** 2 > (n // 2) ** 2] = 0
    return img


@pytest.mark.parametrize("n, circle", [(16, True), (17, True), (16, False), (15, False)])
def test_radon_agrees_with_scikit_image(n, circle):
    """Same projector (bilinear rotation about pixel n // 2, column sums), so the only gap is
    round-off: 1e-12 relative, not a discretisation tolerance."""
    img = _phantom(n, circle)
    angles = np.linspace(0.0, 180.0, 12, endpoint=False) + 7.3
    expected = radon(img, angles, circle=circle)
    A = op.Radon(n, angles.tolist(), circle=circle)
    got = A(torch.from_numpy(img)[None, None])[0].numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-12 * np.abs(expected).max()


def test_radon_geometry_projects_a_point_where_the_rotation_says():
    """A blob at (row r, col c) lands at detector offset cos(theta)(c - c0) - sin(theta)(r - c0):
    its projection's centroid, to 0.01 pixel (bilinear interpolation keeps first moments of a
    smooth blob to well below that)."""
    n, r_p, c_p = 33, 10.0, 22.0
    angles = [0.0, 30.0, 75.0, 120.0]
    rows, cols = torch.meshgrid(torch.arange(n * 1.0), torch.arange(n * 1.0), indexing="ij")
    blob = torch.exp(-((rows - r_p) ** 2 + (cols - c_p) ** 2) / (2 * 1.5**2))[None, None]
    sino = op.Radon(n, angles)(blob)[0]
    centre = n // 2
    for j, theta in enumerate(angles):
        w = sino[:, j]
        centroid = float((torch.arange(n * 1.0) * w).sum() / w.sum()) - centre
        t = math.radians(theta)
        assert abs(centroid - (math.cos(t) * (c_p - centre) - math.sin(t) * (r_p - centre))) < 0.01


def test_fourier_normal_operator_is_diagonal_with_hermitian_weights(gen):
    """A^T A = F^H W F with W_k = (M_k + M_{-k}) / 2: a real image's k-space is Hermitian."""
    mask = op.cartesian_mask((8, 8), 3, 0.25, gen)
    A = op.FourierSubsampling(mask)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    expected = torch.fft.ifft2(torch.fft.fft2(x, norm="ortho") * A.weight, norm="ortho").real
    torch.testing.assert_close(A.normal(x), expected, rtol=0, atol=1e-13)
    assert set(A.weight.unique().tolist()) <= {0.0, 0.5, 1.0}
    # A A^H = I on the kept samples as a complex map (the orthonormal FFT)
    y = torch.complex(torch.randn(2, *A.out_shape, generator=gen), torch.randn(2, *A.out_shape))
    k = torch.zeros(2, 1, 8, 8, dtype=torch.complex128)
    k[..., mask] = y
    image = torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho")
    back = torch.fft.fftshift(torch.fft.fft2(image, norm="ortho"), dim=(-2, -1))[..., mask]
    torch.testing.assert_close(back, y, rtol=0, atol=1e-13)


def test_cartesian_mask_keeps_whole_central_and_random_columns(gen):
    mask = op.cartesian_mask((16, 32), acceleration=4, center_fraction=0.125, generator=gen)
    cols = mask.all(0)
    assert bool((mask == cols[None]).all())  # whole phase-encoding lines
    assert int(cols.sum()) == 32 // 4
    assert bool(cols[16 - 2 : 16 + 2].all())  # round(32 * 0.125) = 4 central lines


def test_masks_and_kernels(gen):
    mask = op.random_mask((2, 5, 5), 0.3, gen)
    assert int(mask.sum()) == round(0.3 * 50)
    box = op.box_mask((1, 6, 6), 1, 2, 3, 2)
    assert int((~box).sum()) == 6 and not bool(box[0, 1:4, 2:4].any())
    k = op.gaussian_kernel(7, 1.5)
    assert abs(float(k.sum()) - 1) < 1e-14
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    horizontal, vertical = op.motion_kernel(9, 0.0), op.motion_kernel(9, 90.0)
    assert abs(float(horizontal[4].sum()) - 1) < 1e-12  # all mass on the centre row
    assert abs(float(vertical[:, 4].sum()) - 1) < 1e-12  # and on the centre column
    diagonal = op.motion_kernel(9, 45.0)
    # the 45-degree segment lies on the anti-diagonal: mirror-symmetric about it
    torch.testing.assert_close(diagonal, diagonal.flip(0).flip(1).T, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["matrix", "fourier"])
def test_measure_adds_noise_of_std_sigma_y(name, gen):
    """The sample std of y - A x over N entries is sigma_y within 5 standard errors
    (the std of a sample std is about sigma / sqrt(2 N))."""
    A = make(name)
    x = torch.randn(4000, *A.in_shape, generator=gen)
    noise = op.measure(A, x, 0.3, gen) - A(x)
    parts = [noise.real, noise.imag] if noise.is_complex() else [noise]
    for part in parts:
        n = part.numel()
        assert abs(float(part.std()) - 0.3) < 5 * 0.3 / math.sqrt(2 * n)
    torch.testing.assert_close(op.measure(A, x[:2], 0.0), A(x[:2]))


def test_conjugate_gradient_gives_the_minimum_norm_solution_of_a_singular_system(gen):
    a = torch.randn(3, 6, generator=gen)
    m = a.T @ a  # rank 3
    b = (m @ torch.randn(6, 2, generator=gen)).T
    x = op.conjugate_gradient(lambda v: v @ m, b, n_iter=50)
    torch.testing.assert_close(x, b @ torch.linalg.pinv(m), rtol=0, atol=1e-10)


def test_norm_sq_is_the_largest_singular_value_squared():
    A = make("blur_gaussian")
    assert abs(A.norm_sq() - 1.0) < 1e-6  # a normalised non-negative kernel: |h_hat(0)| = 1
    B = make("matrix")
    assert abs(B.norm_sq() - float(torch.linalg.matrix_norm(B.matrix, 2)) ** 2) < 1e-8


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_raises_value_errors_naming_the_value(gen):
    A = make("blur_gaussian")
    with pytest.raises(ValueError, match=r"\(batch, 2, 8, 8\).*got \(3, 1, 8, 8\)"):
        A(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"got \(2, 8, 8\)"):
        A.adjoint(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="larger than the image"):
        op.Blur(op.gaussian_kernel(9, 1.0), (1, 8, 8))
    with pytest.raises(ValueError, match="factor = 3 must divide"):
        op.Downsample((1, 8, 8), 3)
    with pytest.raises(ValueError, match="sigma_y = -0.1"):
        op.measure(A, torch.zeros(1, 2, 8, 8), -0.1)
    with pytest.raises(ValueError, match="gamma = 0"):
        A.normal_solve(torch.zeros(1, 2, 8, 8), 0)
    with pytest.raises(ValueError, match="keep = 1.5"):
        op.random_mask((4, 4), 1.5)
    with pytest.raises(ValueError, match="size = 4"):
        op.gaussian_kernel(4, 1.0)
    with pytest.raises(ValueError, match="box"):
        op.box_mask((1, 6, 6), 4, 4, 3, 3)
    with pytest.raises(ValueError, match="in_shape"):
        op.MatrixOperator(torch.zeros(2, 5), in_shape=(2, 3))
    with pytest.raises(ValueError, match="mask keeps no entry"):
        op.Inpainting(torch.zeros(4, dtype=torch.bool))
