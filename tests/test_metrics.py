"""Matting metrics against hand-computed values and independent brute-force re-implementations.

The references here are written differently from ``py/metrics.py`` on purpose: connectivity via an
explicit BFS flood fill (no scipy.ndimage.label), the gradient via DIM's 2-D filter built with nested
loops and an explicit convolution loop (no separable scipy filters).
"""

from collections import deque
import math

import numpy as np
import pytest
import torch

from diffusion_matting.py import metrics as M
from diffusion_matting.py.errors import UserError


# ---------------------------------------------------------------------------------- references
def ref_components(mask, eight=False):
    """Connected components of a bool mask by BFS; list of pixel lists, in column-major discovery order."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if eight:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    comps = []
    for x in range(w):          # column-major scan, as MATLAB's bwconncomp
        for y in range(h):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            q, comp = deque([(y, x)]), []
            while q:
                cy, cx = q.popleft()
                comp.append((cy, cx))
                for dy, dx in steps:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
            comps.append(comp)
    return comps


def ref_conn(pred, gt, region=None, step=0.1, theta=0.15, eight=False, gca_bug=False, row_major=False):
    """DIM connectivity error written out pixel by pixel.

    ``gca_bug=True`` reproduces the widely copied GCA-Matting port: the "largest component" is the
    argmax of the label histogram *including* background label 0.
    """
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    h, w = gt.shape
    n = round(1 / step)
    level = [[None] * w for _ in range(h)]
    for i in range(1, n + 1):
        t, t_prev = i / n, (i - 1) / n
        inter = (pred >= t) & (gt >= t)
        comps = ref_components(inter, eight)
        if row_major:
            comps.sort(key=lambda c: min(c))
        omega = set()
        if gca_bug:
            background = [(y, x) for y in range(h) for x in range(w) if not inter[y, x]]
            sizes = [len(background)] + [len(c) for c in comps]
            best = max(range(len(sizes)), key=lambda k: (sizes[k], -k))
            omega = set(background if best == 0 else comps[best - 1])
        elif comps:
            best = max(range(len(comps)), key=lambda k: (len(comps[k]), -k))  # first of the largest
            omega = set(comps[best])
        for y in range(h):
            for x in range(w):
                if level[y][x] is None and (y, x) not in omega:
                    level[y][x] = t_prev
    total = 0.0
    for y in range(h):
        for x in range(w):
            if region is not None and not region[y, x]:
                continue
            lv = 1.0 if level[y][x] is None else level[y][x]
            dp, dg = pred[y, x] - lv, gt[y, x] - lv
            phi_p = 1 - dp if dp >= theta else 1.0
            phi_g = 1 - dg if dg >= theta else 1.0
            total += abs(phi_p - phi_g)
    return total / 1000


def ref_grad_magnitude(img, sigma=1.4):
    """DIM gaussgradient: 2-D filter from nested loops, explicit 'replicate' convolution."""
    eps = 1e-2
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * eps)))
    size = 2 * half + 1
    gauss = lambda u: math.exp(-u * u / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
    hx = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            hx[i, j] = gauss(i - half) * (-(j - half) * gauss(j - half) / sigma ** 2)
    hx /= math.sqrt((hx ** 2).sum())
    hy = hx.T
    h, w = img.shape
    padded = np.pad(img, half, mode="edge")
    gx, gy = np.zeros_like(img), np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            # convolution: kernel flipped in both axes
            win = padded[y:y + size, x:x + size][::-1, ::-1]
            gx[y, x] = (win * hx).sum()
            gy[y, x] = (win * hy).sum()
    return np.sqrt(gx ** 2 + gy ** 2)


def ref_grad(pred, gt, region=None):
    def mat2gray(a):
        return (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else np.zeros_like(a)
    e = (ref_grad_magnitude(mat2gray(pred)) - ref_grad_magnitude(mat2gray(gt))) ** 2
    return (e if region is None else e * region).sum() / 1000


def blob_pair(h=14, w=17, seed=0, levels=10):
    """A smooth blob gt matte, a noisy prediction with a detached speck; values quantised to 1/levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    gt = np.clip(1.3 - np.hypot((yy - h / 2) / (h / 3), (xx - w / 2.5) / (w / 3)), 0, 1)
    pred = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1)
    pred[1:3, w - 3:w - 1] = 0.9  # speck away from the blob
    gt[1:3, w - 3:w - 1] = 0.7
    q = lambda a: np.round(a * 255) / 255  # 8-bit values: never exactly on a threshold
    return q(pred), q(gt)


# ------------------------------------------------------------------------------------ SAD / MSE
def test_sad_mse_hand_computed():
    pred = np.array([[0.0, 0.5, 1.0], [0.2, 0.2, 0.2], [1.0, 1.0, 0.0]])
    gt = np.array([[0.0, 1.0, 1.0], [0.0, 0.2, 0.6], [1.0, 0.5, 1.0]])
    # |diff| = 0 .5 0 / .2 0 .4 / 0 .5 1  -> 2.6 ; squares: .25 .04 .16 .25 1 -> 1.7
    assert M.sad(pred, gt) == pytest.approx(2.6 / 1000)
    assert M.mse(pred, gt) == pytest.approx(1.7 / 9)
    region = np.zeros((3, 3), bool)
    region[1, :] = True  # .2 0 .4
    assert M.sad(pred, gt, region) == pytest.approx(0.6 / 1000)
    assert M.mse(pred, gt, region) == pytest.approx((0.04 + 0.16) / 3)
    assert M.mse(pred, gt, np.zeros((3, 3), bool)) == 0.0


def test_inputs_torch_uint8_and_batch_axis():
    pred, gt = blob_pair()
    ref = M.sad(pred, gt)
    assert M.sad(torch.from_numpy(pred).float()[None], torch.from_numpy(gt)) == pytest.approx(ref, rel=1e-6)
    p8, g8 = (pred * 255).round().astype(np.uint8), (gt * 255).round().astype(np.uint8)
    assert M.sad(p8, g8) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(UserError, match="17x14.*16x14"):
        M.sad(pred, gt[:, :16])


def test_unknown_region_encodings():
    t01 = np.array([[0, 0.5, 1], [0.5, 0, 1]])
    expect = np.array([[False, True, False], [True, False, False]])
    assert np.array_equal(M.unknown_region(t01), expect)
    assert np.array_equal(M.unknown_region(t01 * 255), expect)
    t255 = np.array([[0, 128, 255], [128, 0, 255]], dtype=np.uint8)
    assert np.array_equal(M.unknown_region(t255), expect)
    assert np.array_equal(M.unknown_region(torch.tensor(t255.astype(np.float32))[None]), expect)


# ------------------------------------------------------------------------------------------ Grad
def test_gradient_kernel_matches_dim_filter():
    g, dg = M.gaussian_derivative_kernels(1.4)
    assert len(g) == len(dg) == 9  # DIM: halfsize ceil(3.62) = 4 for sigma 1.4
    hx = np.outer(g, dg)
    assert np.sqrt((hx ** 2).sum()) == pytest.approx(1.0)
    assert np.allclose(dg, -dg[::-1]) and np.argmax(dg) < 4  # odd, G'(u) > 0 for u < 0


def test_gradient_error_matches_explicit_convolution():
    pred, gt = blob_pair()
    region = (gt > 0) & (gt < 1)
    assert M.gradient_error(pred, gt) == pytest.approx(ref_grad(pred, gt), rel=1e-10)
    assert M.gradient_error(pred, gt, region) == pytest.approx(ref_grad(pred, gt, region), rel=1e-10)
    # non-square, asymmetric content: catches swapped axes
    rng = np.random.default_rng(3)
    a, b = rng.random((6, 11)), rng.random((6, 11)) ** 2
    assert M.gradient_error(a, b) == pytest.approx(ref_grad(a, b), rel=1e-10)
    mag = M.gaussian_gradient_magnitude(a)
    assert np.allclose(mag, ref_grad_magnitude(a))


def test_gradient_error_properties():
    pred, gt = blob_pair()
    assert M.gradient_error(gt, gt) == 0.0
    # min/max normalisation (mat2gray): an affine rescale of a matte does not change the error
    assert M.gradient_error(0.25 + 0.5 * pred, gt) == pytest.approx(M.gradient_error(pred, gt), rel=1e-9)
    # a constant prediction has zero gradient: the error is the gt's squared gradient magnitude
    const = np.full_like(gt, 0.3)
    assert M.gradient_error(const, gt) == pytest.approx((ref_grad_magnitude(gt) ** 2).sum() / 1000, rel=1e-9)


# ------------------------------------------------------------------------------------------ Conn
def test_conn_hand_computed_and_gca_port_bug():
    # row: 3 background pixels, object {3, 4}; pred's pixel 4 is 0.65 (gt 1)
    gt = np.array([[0, 0, 0, 1.0, 1.0]])
    pred = np.array([[0, 0, 0, 1.0, 0.65]])
    # MATLAB: {3,4} is the largest component up to t=0.6; pixel 4 leaves at t=0.7 -> l=0.6.
    #   gt: d=0.4 -> phi=0.6; pred: d=0.05 < 0.15 -> phi=1  => |diff| = 0.4
    assert M.connectivity_error(pred, gt) == pytest.approx(0.4 / 1000)
    assert ref_conn(pred, gt) == pytest.approx(0.4 / 1000)
    # GCA port: background (3 px) beats the object (2 px), so the object "leaves" at t=0.1 -> l=0:
    #   gt phi = 0, pred phi = 0.35 => 0.35. Our value must be the MATLAB one.
    assert ref_conn(pred, gt, gca_bug=True) == pytest.approx(0.35 / 1000)
    assert M.connectivity_error(pred, gt) != pytest.approx(0.35 / 1000)


def test_conn_gca_bug_hides_background_errors():
    gt = np.zeros((5, 6))
    gt[1:3, 1:3] = 1.0
    pred = gt.copy()
    pred[4, 5] = 0.2  # false positive far away in the background
    # MATLAB: that pixel is never in the intersection -> l=0, pred d=0.2 >= 0.15 -> phi=0.8 => 0.2
    assert M.connectivity_error(pred, gt) == pytest.approx(0.2 / 1000)
    # GCA port: the pixel belongs to the (largest) background label -> l=1 -> phi=1 => 0
    assert ref_conn(pred, gt, gca_bug=True) == 0.0


def test_conn_uses_4_connectivity():
    gt = np.zeros((4, 4))
    gt[0, 0] = gt[1, 1] = gt[1, 2] = 1.0  # (0,0) touches the pair only diagonally
    pred = gt.copy()
    pred[0, 0] = 0.55
    # 4-conn: (0,0) is alone, the pair is larger -> l=0: gt phi 0, pred phi 0.45 => 0.45
    assert M.connectivity_error(pred, gt) == pytest.approx(0.45 / 1000)
    # 8-conn would keep it until t=0.6 -> l=0.5: gt phi 0.5, pred phi 1 => 0.5
    assert ref_conn(pred, gt, eight=True) == pytest.approx(0.5 / 1000)


def test_conn_tie_break_follows_matlab_column_major_order():
    gt = np.zeros((3, 4))
    gt[0, 2:4] = 1.0  # A: first in row-major order
    gt[2, 0:2] = 1.0  # B: first in column-major order (MATLAB's bwconncomp)
    pred = gt.copy()
    pred[2, 0] = 0.55
    # equal sizes up to t=0.5: MATLAB keeps B, A leaves at once (d equal for A -> 0);
    # B's (2,0) leaves at t=0.6 -> l=0.5: gt phi 0.5, pred phi 1 => 0.5
    assert M.connectivity_error(pred, gt) == pytest.approx(0.5 / 1000)
    assert ref_conn(pred, gt, row_major=True) == pytest.approx(0.45 / 1000)  # a row-major (OpenCV) scan


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_conn_matches_bfs_reference(seed):
    pred, gt = blob_pair(seed=seed)
    region = M.unknown_region(np.where(gt == 0, 0, np.where(gt == 1, 1, 0.5)))
    ours = M.connectivity_error(pred, gt, region)
    assert ours == pytest.approx(ref_conn(pred, gt, region), rel=1e-9, abs=1e-12)
    assert M.connectivity_error(pred, gt) == pytest.approx(ref_conn(pred, gt), rel=1e-9, abs=1e-12)
    assert ours > 0
    assert M.connectivity_error(gt, gt) == 0.0


def test_connectivity_levels_simple():
    gt = np.array([[0.0, 0.35, 1.0, 1.0]])
    pred = np.array([[0.0, 0.55, 1.0, 1.0]])
    # pixel 1 is in the component while min(pred, gt) = 0.35 >= t, leaves at t=0.4 -> 0.3
    assert np.allclose(M.connectivity_levels(pred, gt), [[0.0, 0.3, 1.0, 1.0]])


# ----------------------------------------------------------------------------- foreground, GSG
def test_foreground_errors_hand_computed():
    gt_fg = np.zeros((1, 3, 3))
    pred_fg = np.zeros((1, 3, 3))
    pred_fg[0, 0] = [0.1, 0.2, 0.0]   # alpha 1:   sq 0.05, abs 0.3
    pred_fg[0, 1] = [0.0, 0.0, 0.4]   # alpha 0.5: sq 0.16, abs 0.4
    pred_fg[0, 2] = [1.0, 1.0, 1.0]   # alpha 0: colour undefined, ignored
    alpha = np.array([[1.0, 0.5, 0.0]])
    assert M.foreground_mse(pred_fg, gt_fg, alpha) == pytest.approx((0.05 + 0.5 * 0.16) / (3 * 1.5))
    assert M.foreground_sad(pred_fg, gt_fg, alpha) == pytest.approx((0.3 + 0.5 * 0.4) / 1000)
    region = np.array([[False, True, True]])
    assert M.foreground_mse(pred_fg, gt_fg, alpha, region) == pytest.approx(0.16 / 3)
    assert M.foreground_sad(pred_fg, gt_fg, alpha, region) == pytest.approx(0.2 / 1000)
    assert M.foreground_mse(pred_fg, gt_fg, np.zeros((1, 3))) == 0.0


def test_gsg_dominant_green():
    rng = np.random.default_rng(0)
    img = np.zeros((50, 40, 3))
    img[..., 1] = 1.0  # pure (0,255,0)
    other = rng.random((50, 40)) < 0.2
    img[other] = rng.choice([[0.9, 0.2, 0.1], [0.95, 0.9, 0.85]], size=int(other.sum()))
    assert M.gsg(img, (0, 1, 0)) < 1.0
    assert M.gsg(img, "0,255,0") < 1.0
    assert M.gsg(img, "#0000ff") == pytest.approx(255 * math.sqrt(2), abs=1.0)
    assert M.gsg(torch.from_numpy(img)[None], (0, 0, 255)) == pytest.approx(255 * math.sqrt(2), abs=1.0)
    # deterministic (fixed-seed subsample and K-Means)
    big = np.repeat(img, 4, axis=0)
    assert M.gsg(big, (0, 0, 1), sample=500) == M.gsg(big, (0, 0, 1), sample=500)


# ------------------------------------------------------------------------------------- evaluate
def test_evaluate_keys_and_region():
    pred, gt = blob_pair()
    tri = np.where(gt == 0, 0.0, np.where(gt == 1, 1.0, 0.5))
    region = (gt > 0) & (gt < 1)
    out = M.evaluate(pred, gt, tri)
    assert out["region"] == "unknown"
    assert set(out) == {"sad", "mse_x1e3", "grad", "conn", "region"}
    assert out["sad"] == pytest.approx(np.abs(pred - gt)[region].sum() / 1000)
    assert out["mse_x1e3"] == pytest.approx(((pred - gt) ** 2)[region].mean() * 1000)
    assert out["grad"] == pytest.approx(ref_grad(pred, gt, region), rel=1e-9)
    assert out["conn"] == pytest.approx(ref_conn(pred, gt, region), rel=1e-9)
    rng = np.random.default_rng(1)
    gfg = rng.random(gt.shape + (3,))
    pfg = np.clip(gfg + 0.1, 0, 1)
    full = M.evaluate(torch.from_numpy(pred), gt, pred_fg=pfg, gt_fg=gfg)
    assert full["region"] == "image"
    assert full["sad"] == pytest.approx(np.abs(pred - gt).sum() / 1000)
    w = gt[..., None] * np.ones(3)
    assert full["fg_mse_x1e3"] == pytest.approx(1000 * (w * (pfg - gfg) ** 2).sum() / w.sum())
    assert full["fg_sad"] == pytest.approx((w * np.abs(pfg - gfg)).sum() / 1000)
    assert "fg_sad" not in M.evaluate(pred, gt, pred_fg=pfg)  # no gt colour: no foreground metrics
    with pytest.raises(UserError, match="size mismatch"):
        M.evaluate(pred, gt, tri[:, :-1])
