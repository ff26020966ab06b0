"""Alpha toolkit: conventions, compositing, trimaps, DRIP padding — against direct computations."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffusion_matting.py import alpha as A
from diffusion_matting.py.errors import UserError


def rand_img(b=2, h=9, w=11, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g)


def test_join_split_roundtrip_and_conventions():
    rgb, a = rand_img(), rand_img(c=1)[..., 0]
    rgba = A.join_rgba(rgb, a)
    assert rgba.shape == (2, 9, 11, 4)
    r2, a2 = A.split_rgba(rgba)
    assert torch.equal(r2, rgb) and torch.equal(a2, a)
    # ComfyUI mask is 1 - alpha, both ways
    assert torch.allclose(A.comfy_mask_to_alpha(A.alpha_to_comfy_mask(a)), a)
    assert torch.allclose(A.alpha_to_comfy_mask(a), 1 - a)
    # RGB input gets alpha 1
    _, ones = A.split_rgba(rgb)
    assert torch.equal(ones, torch.ones(2, 9, 11))


def test_premultiply_unpremultiply():
    rgb, a = rand_img(), rand_img(c=1)[..., 0] * 0.9 + 0.1
    pm = A.premultiply(rgb, a)
    assert torch.allclose(pm, rgb * a[..., None])
    assert torch.allclose(A.unpremultiply(pm, a), rgb, atol=1e-5)
    zero = torch.zeros_like(a)
    assert torch.equal(A.unpremultiply(pm, zero), torch.zeros_like(pm))  # undefined colour -> 0


def test_composite_matches_formula_colour_and_image():
    f, b, a = rand_img(seed=1), rand_img(seed=2), rand_img(c=1, seed=3)[..., 0]
    out = A.composite(f, a, b)
    ref = a.numpy()[..., None] * f.numpy() + (1 - a.numpy()[..., None]) * b.numpy()
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    green = torch.tensor([0.0, 1.0, 0.0])
    out2 = A.composite(f, a, green)
    np.testing.assert_allclose(out2[..., 1].numpy(), (a * f[..., 1] + (1 - a)).numpy(), atol=1e-6)


def test_broadcast_and_size_errors():
    f = rand_img(b=3)
    a = rand_img(b=1, c=1)[..., 0]
    ff, aa = A.broadcast_batch(f, a, names=["fg", "alpha"])
    assert aa.shape[0] == 3
    with pytest.raises(UserError, match=r"fg is 11x9.*alpha is 12x9"):
        A.broadcast_batch(f, torch.zeros(1, 9, 12), names=["fg", "alpha"])
    with pytest.raises(UserError, match="batch mismatch"):
        A.broadcast_batch(f, torch.zeros(2, 9, 11), names=["fg", "alpha"])
    with pytest.raises(UserError, match="NaN"):
        A.as_image(torch.full((1, 2, 2, 3), float("nan")))


def test_preview_checkerboard_and_colour():
    f, a = rand_img(b=1, h=32, w=32), torch.zeros(1, 32, 32)
    board = A.preview(f, a, "checkerboard", square=8)
    # fully transparent -> exactly the checkerboard
    assert torch.allclose(board[0], A.checkerboard(32, 32, 8))
    assert board[0, 0, 0, 0] != board[0, 0, 8, 0]
    white = A.preview(f, torch.ones(1, 32, 32), "color", color=(1, 1, 1))
    assert torch.allclose(white, f)


def test_parse_color():
    assert A.parse_color("#00ff00") == (0.0, 1.0, 0.0)
    assert A.parse_color("0,177,64") == pytest.approx((0, 177 / 255, 64 / 255))
    assert A.parse_color("0,0.5,1") == (0.0, 0.5, 1.0)
    for bad in ["green", "1,2", "300,0,0"]:
        with pytest.raises(UserError):
            A.parse_color(bad)


def test_trimap_from_mask_matches_scipy_morphology():
    yy, xx = np.mgrid[0:64, 0:64]
    mask = (((yy - 30) ** 2 + (xx - 34) ** 2) < 18 ** 2).astype(np.float32)
    tri, warn = A.trimap_from_mask(torch.from_numpy(mask)[None], erode_px=4, dilate_px=6)
    assert not warn

    def disk(r):
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        return (y * y + x * x) <= r * r

    fg = ndimage.binary_erosion(mask > 0.5, structure=disk(4), border_value=1)
    grown = ndimage.binary_dilation(mask > 0.5, structure=disk(6))
    ref = np.full(mask.shape, 0.5)
    ref[~grown] = 0
    ref[fg] = 1
    np.testing.assert_array_equal(tri[0].numpy(), ref)


def test_trimap_no_foreground_is_explained():
    empty = torch.zeros(1, 16, 16)
    tri, warn = A.trimap_from_mask(empty, 3, 3)
    assert warn and "no foreground" in warn[0]
    assert torch.equal(tri, torch.zeros_like(tri))
    with pytest.raises(UserError, match="no background"):
        A.trimap_from_mask(torch.ones(1, 16, 16), 3, 3, strict=True)


def test_normalize_trimap_encodings_agree():
    t = torch.tensor([[0.0, 0.5, 1.0, 0.5]])
    assert torch.equal(A.normalize_trimap(t * 255), A.normalize_trimap(t))
    assert torch.equal(A.normalize_trimap(torch.tensor([[0.0, 128 / 255, 1.0, 0.5]])), A.normalize_trimap(t))
    fgm, bgm = torch.tensor([[0.0, 0, 1, 0]]), torch.tensor([[1.0, 0, 0, 0]])
    assert torch.equal(A.trimap_from_masks(fgm, bgm), A.normalize_trimap(t))
    with pytest.raises(UserError, match="overlap"):
        A.trimap_from_masks(fgm, fgm)


def test_pad_foreground_keeps_defined_and_fills_smoothly():
    h = w = 40
    f = torch.zeros(1, h, w, 3)
    f[..., :20, :] = torch.tensor([0.8, 0.2, 0.1])
    a = torch.zeros(1, h, w)
    a[:, :, :20] = 1.0  # left half defined (red-ish), right half undefined (black in the input)
    out = A.pad_foreground(f, a, iterations=30)
    assert torch.equal(out[:, :, :20], f[:, :, :20])
    # the undefined half is filled with the defined colour (normalised blur), not darkened toward black
    np.testing.assert_allclose(out[0, :, 20:].numpy(), np.broadcast_to([0.8, 0.2, 0.1], (h, 20, 3)), atol=1e-3)


def test_gaussian_blur_matches_scipy():
    x = rand_img(b=1, h=30, w=30, seed=5)
    ours = A.gaussian_blur(x, 13)[0].numpy()
    sigma = 0.3 * ((13 - 1) * 0.5 - 1) + 0.8
    ref = np.stack([ndimage.gaussian_filter(x[0, ..., c].numpy().astype(np.float64), sigma, mode="mirror",
                                            truncate=6 / sigma) for c in range(3)], -1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
