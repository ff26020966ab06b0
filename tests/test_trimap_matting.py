"""Trimap matting: matrix-free closed-form Laplacian and solver against an independently assembled sparse
Levin Laplacian (scipy), procedural composites with exact ground truth, trimap encodings and fallbacks,
multilevel foreground estimation, and the ``matte`` CLI verb."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from PIL import Image

from diffusion_matting.py import alpha as A
from diffusion_matting.py import trimap_matting as T
from diffusion_matting.py import tiling
from diffusion_matting.py.cli import main as cli_main
from diffusion_matting.py.foreground import estimate_foreground


# ------------------------------------------------------------------------------------------- fixtures
def levin_laplacian(img: np.ndarray, eps: float, r: int = 1) -> sp.csr_matrix:
    """Closed-form matting Laplacian assembled window by window from Levin et al.'s formula:
    L = sum_k  I_n - (1 + (I_i - mu_k)^T (Sigma_k + eps/n I)^-1 (I_j - mu_k)) / n  over windows inside."""
    H, W, _ = img.shape
    n = (2 * r + 1) ** 2
    idx = np.arange(H * W).reshape(H, W)
    rows, cols, vals = [], [], []
    for y in range(r, H - r):
        for x in range(r, W - r):
            win = img[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3)
            ids = idx[y - r:y + r + 1, x - r:x + r + 1].ravel()
            d = win - win.mean(0)
            cov = d.T @ d / n
            g = np.eye(n) - (1 + d @ np.linalg.inv(cov + eps / n * np.eye(3)) @ d.T) / n
            rows.append(np.repeat(ids, n))
            cols.append(np.tile(ids, n))
            vals.append(g.ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(H * W, H * W))


def random_image(h, w, seed=0, flat=True):
    rng = np.random.default_rng(seed)
    img = rng.random((h, w, 3))
    if flat:
        img[: h // 3, : w // 3] = 0.3  # a perfectly flat patch: Delta^-1 = n / eps there
        img[h // 2:, w // 2:, :] = img[h // 2:, w // 2:, :1] * np.array([1.0, 0.5, 0.25])  # colours on a line
    return img


def composite(h=64, w=72, seed=0):
    """Smooth-coloured foreground over a smooth background, soft (sigmoid) curved edge. Returns
    (image, alpha, fg, bg) as float32 numpy arrays."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fg = np.stack([0.75 + 0.2 * np.sin(xx / 17.0), 0.35 + 0.25 * yy / h, 0.2 + 0.1 * np.cos(yy / 11.0)], -1)
    bg = np.stack([0.15 + 0.1 * xx / w, 0.3 + 0.2 * np.sin(yy / 13.0), 0.8 - 0.3 * xx / w], -1)
    dist = np.hypot(yy - h * 0.5, xx - w * 0.45) - min(h, w) * 0.28
    alpha = 1.0 / (1.0 + np.exp(dist / 1.5))
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    return image.astype(np.float32), alpha.astype(np.float32), fg.astype(np.float32), bg.astype(np.float32)


def band_trimap(alpha: np.ndarray, width: int = 5) -> np.ndarray:
    """0 / 0.5 / 1 trimap: unknown = pixels within ``width`` px (square) of a fractional alpha."""
    from scipy import ndimage

    frac = (alpha > 0.02) & (alpha < 0.98)
    unknown = ndimage.binary_dilation(frac, np.ones((2 * width + 1, 2 * width + 1), bool))
    return np.where(unknown, 0.5, np.where(alpha >= 0.5, 1.0, 0.0)).astype(np.float32)


# ------------------------------------------------------------------------------- (1) matrix-free L x
@pytest.mark.parametrize("eps", [1e-7, 1e-5])
def test_matrix_free_product_equals_assembled_laplacian(eps):
    img = random_image(11, 13)
    L = levin_laplacian(img, eps)
    x = np.random.default_rng(1).standard_normal((11, 13))
    ref = (L @ x.ravel()).reshape(11, 13)
    lap = T.matting_laplacian(torch.from_numpy(img), eps=eps, dtype=torch.float64)
    out = lap.apply(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(lap.diagonal[0].numpy().ravel(), L.diagonal(), rtol=1e-7, atol=1e-7)
    # the float32 operator agrees to float tolerance too (it stores the inverse Cholesky factor)
    lap32 = T.matting_laplacian(torch.from_numpy(img).float(), eps=eps)
    out32 = lap32.apply(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(out32, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_float32_operator_stays_positive_semidefinite():
    """x^T L x >= 0 for the float32 operator even with eps = 1e-7 (rounding Delta^-1 itself would not)."""
    img = random_image(24, 24, seed=3)
    lap = T.matting_laplacian(torch.from_numpy(img).float(), eps=1e-7)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(24, 24, generator=g)
        assert float((x * lap.apply(x)).sum()) > -1e-4 * float((x * x).sum())
    # constants are in the null space
    ones = torch.ones(24, 24)
    assert float(lap.apply(ones).abs().max()) < 1e-3


def test_tiled_operator_equals_whole_image_operator():
    img = torch.from_numpy(random_image(70, 90, seed=2))
    x = torch.randn(70, 90, dtype=torch.float64)
    ref = T.matting_laplacian(img, dtype=torch.float64).apply(x)
    for size in (16, 32):
        tl = tiling.make_tiling(torch.ones(70, 90, dtype=torch.bool), halo=2, tile=size)
        assert tl.n > 1
        lap = T.build_matting_laplacian(img, tl, dtype=torch.float64)
        out = tl.untile(lap.apply(tl.tiles(x)), torch.zeros_like(x))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------- (2) solve vs spsolve
def _trimap_for_small(h, w):
    tri = np.full((h, w), 0.5)
    tri[:, :5] = 1.0
    tri[:, -5:] = 0.0
    tri[:2, :] = np.where(np.arange(w) < w // 2, 1.0, 0.0)
    tri[h // 2, w // 2] = 1.0  # an isolated known pixel inside the unknown region
    return tri


def test_hard_constraint_solve_matches_spsolve():
    h, w, eps = 20, 26, 1e-6
    img = random_image(h, w, seed=4, flat=False) * 0.4
    img[:, : w // 2] += 0.5
    tri = _trimap_for_small(h, w)
    L = levin_laplacian(img, eps)
    u = (tri == 0.5).ravel()
    k = ~u
    ref = tri.ravel().copy()
    ref[u] = spla.spsolve(L[u][:, u].tocsc(), -L[u][:, k] @ tri.ravel()[k])
    a64, info = T.solve_alpha_cf(torch.from_numpy(img), torch.from_numpy(tri), eps=eps, tol=1e-12,
                                 max_iter=5000, dtype=torch.float64)
    assert info["relative_residual"] < 1e-10
    np.testing.assert_allclose(a64.numpy().ravel(), ref, atol=1e-7)
    a32, _ = T.solve_alpha_cf(torch.from_numpy(img).float(), torch.from_numpy(tri).float(), eps=eps, tol=1e-7,
                              max_iter=5000)
    np.testing.assert_allclose(a32.double().numpy().ravel(), ref, atol=1e-4)
    # known pixels are kept exactly
    assert np.array_equal(a32.numpy().ravel()[k], tri.ravel()[k].astype(np.float32))


def test_soft_constraint_solve_matches_spsolve():
    h, w, eps, lam = 18, 22, 1e-6, 100.0
    img = random_image(h, w, seed=5, flat=False)
    tri = _trimap_for_small(h, w)
    L = levin_laplacian(img, eps)
    D = sp.diags((tri != 0.5).ravel().astype(float))
    ref = spla.spsolve((L + lam * D).tocsc(), lam * D @ tri.ravel())
    a, info = T.solve_alpha_cf(torch.from_numpy(img), torch.from_numpy(tri), eps=eps, constraint_weight=lam,
                               tol=1e-12, max_iter=10000, dtype=torch.float64)
    np.testing.assert_allclose(a.numpy().ravel(), ref, atol=1e-7)
    # soft constraints let known pixels move a little (unlike the hard form)
    assert np.abs(ref - tri.ravel())[(tri != 0.5).ravel()].max() > 1e-6


def test_tiled_solve_equals_single_tile_solve(monkeypatch):
    img = torch.from_numpy(random_image(90, 110, seed=6, flat=False))
    tri = torch.full((90, 110), 0.5, dtype=torch.float64)
    tri[:20], tri[70:] = 1.0, 0.0
    tri[40:50, 50:60] = 1.0
    monkeypatch.setattr(tiling.make_tiling, "__defaults__", (None, (32,)))
    a_tiles, info = T.solve_alpha_cf(img, tri, tol=1e-11, max_iter=3000, dtype=torch.float64)
    assert info["tiles"] > 1
    # the same system on one tile (tile sizes larger than the image)
    monkeypatch.setattr(tiling.make_tiling, "__defaults__", (None, (256,)))
    a_one, info_one = T.solve_alpha_cf(img, tri, tol=1e-11, max_iter=3000, dtype=torch.float64)
    assert info_one["tiles"] == 1
    torch.testing.assert_close(a_tiles, a_one, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------- (3) procedural composite
def test_composite_alpha_is_accurate_and_beats_naive_baseline():
    image, alpha, _, _ = composite()
    tri = band_trimap(alpha, width=5)
    unknown = tri == 0.5
    assert unknown.sum() > 500
    pred, fg, warnings = T.matte(torch.from_numpy(image)[None], torch.from_numpy(tri)[None])
    assert warnings == []
    assert pred.shape == (1, 64, 72) and fg.shape == (1, 64, 72, 3)
    err = np.abs(pred[0].numpy() - alpha)[unknown].mean()
    naive = np.abs(0.5 - alpha)[unknown].mean()
    assert err < 0.04, err
    assert err < 0.1 * naive, (err, naive)
    # known pixels are returned exactly
    known = ~unknown
    assert np.array_equal(pred[0].numpy()[known], tri[known])
    # the exact closed-form solution (converged at every level) is as accurate on this easy case
    pred2, _, _ = T.matte(torch.from_numpy(image)[None], torch.from_numpy(tri)[None], tol=1e-7, iterations=3000,
                          coarse_iterations=3000)
    assert np.abs(pred2[0].numpy() - alpha)[unknown].mean() < 0.03


def test_batch_items_are_independent():
    img0, a0, _, _ = composite(seed=0)
    img1 = np.ascontiguousarray(img0[:, ::-1])
    a1 = np.ascontiguousarray(a0[:, ::-1])
    images = torch.from_numpy(np.stack([img0, img1]))
    tris = torch.from_numpy(np.stack([band_trimap(a0), band_trimap(a1)]))
    both, _, _ = T.matte(images, tris)
    single, _, _ = T.matte(images[1:], tris[1:])
    torch.testing.assert_close(both[1:], single)
    torch.testing.assert_close(both[1], both[0].flip(-1), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------ (4) foreground
def test_foreground_recovers_smooth_colours_better_than_raw_image():
    image, alpha, fg, bg = composite(h=80, w=96)
    F_est, B_est = estimate_foreground(torch.from_numpy(image)[None], torch.from_numpy(alpha)[None])
    F_est, B_est = F_est[0].numpy(), B_est[0].numpy()
    partial = (alpha > 0.05) & (alpha < 0.95)
    assert partial.sum() > 200
    raw_f = np.abs(image - fg)[partial].mean()
    est_f = np.abs(F_est - fg)[partial].mean()
    assert est_f < 0.35 * raw_f, (est_f, raw_f)
    raw_b = np.abs(image - bg)[partial].mean()
    assert np.abs(B_est - bg)[partial].mean() < 0.35 * raw_b
    # where alpha is (almost) 1 the foreground is the image colour
    opaque = alpha > 0.999
    assert np.abs(F_est - image)[opaque].max() < 0.02
    # the compositing equation holds for the estimate
    recomposed = alpha[..., None] * F_est + (1 - alpha[..., None]) * B_est
    assert np.abs(recomposed - image).max() < 0.02
    assert F_est.min() >= 0 and F_est.max() <= 1


def test_foreground_restricted_levels_match_full_solve():
    image, alpha, _, _ = composite(h=150, w=170)
    a = torch.from_numpy(alpha)[None]
    im = torch.from_numpy(image)[None]
    F_band, _ = estimate_foreground(im, a, full_size=32)       # only near fractional alpha above 32 px
    F_full, _ = estimate_foreground(im, a, full_size=100000)   # every pixel at every level
    partial = (alpha > 0.01) & (alpha < 0.99)
    diff = (F_band[0] - F_full[0]).abs().numpy()[partial]
    assert diff.mean() < 0.01


# ----------------------------------------------------------------- (5) encodings and fallbacks
def test_trimap_encodings_give_identical_results():
    image, alpha, _, _ = composite(h=48, w=56)
    tri = band_trimap(alpha, width=4)
    img = torch.from_numpy(image)[None]
    ref, ref_fg, _ = T.matte(img, torch.from_numpy(tri)[None])
    as255 = np.where(tri == 0.5, 128.0, tri * 255.0).astype(np.float32)
    variants = {
        "0/128/255": torch.from_numpy(as255)[None],
        "0/128/255 read as 0..1": torch.from_numpy(as255 / 255.0)[None],
        "0/102/255 (pymatting's lemur)": torch.from_numpy(np.where(tri == 0.5, 0.4, tri))[None],
        "[B,H,W,1]": torch.from_numpy(tri)[None, ..., None],
    }
    for name, t in variants.items():
        out, out_fg, _ = T.matte(img, t)
        assert torch.equal(out, ref), name
        assert torch.equal(out_fg, ref_fg), name
    fg_mask = torch.from_numpy((tri == 1.0).astype(np.float32))[None]
    bg_mask = torch.from_numpy((tri == 0.0).astype(np.float32))[None]
    out, _, _ = T.matte(img, fg_mask=fg_mask, bg_mask=bg_mask)
    assert torch.equal(out, ref)
    # a coarse mask goes through trimap_from_mask
    coarse = torch.from_numpy((alpha > 0.5).astype(np.float32))[None]
    via_mask, _, w1 = T.matte(img, mask=coarse, erode_px=3, dilate_px=3)
    manual, w2 = A.trimap_from_mask(coarse, erode_px=3, dilate_px=3)
    via_trimap, _, _ = T.matte(img, manual)
    assert torch.equal(via_mask, via_trimap) and w1 == w2 == []


def test_sources_must_be_exactly_one():
    img = torch.rand(1, 16, 16, 3)
    tri = torch.full((1, 16, 16), 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        T.matte(img)
    with pytest.raises(ValueError, match="exactly one"):
        T.matte(img, tri, mask=tri)
    with pytest.raises(ValueError, match="size mismatch"):
        T.matte(img, torch.full((1, 15, 16), 0.5))


def test_degenerate_trimaps_fall_back_with_warnings():
    image, alpha, _, _ = composite(h=40, w=40)
    img = torch.from_numpy(image)[None]
    tri = band_trimap(alpha, width=3)
    no_fg = np.where(tri == 1.0, 0.5, tri)
    out, fg, warnings = T.matte(img, torch.from_numpy(no_fg)[None])
    assert torch.count_nonzero(out) == 0 and len(warnings) == 1 and "no definite foreground" in warnings[0]
    no_bg = np.where(tri == 0.0, 0.5, tri)
    out, _, warnings = T.matte(img, torch.from_numpy(no_bg)[None])
    assert torch.all(out == 1) and len(warnings) == 1 and "no definite background" in warnings[0]
    no_unknown = (alpha > 0.5).astype(np.float32)
    out, fg, warnings = T.matte(img, torch.from_numpy(no_unknown)[None])
    assert torch.equal(out[0], torch.from_numpy(no_unknown)) and "no unknown" in warnings[0]
    assert torch.allclose(fg[0][out[0] == 1], img[0][out[0] == 1], atol=1e-3)  # opaque: F = image
    all_unknown = torch.full((1, 40, 40), 0.5)
    out, _, warnings = T.matte(img, all_unknown)
    assert torch.count_nonzero(out) == 0 and "no definite foreground or background" in warnings[0]
    # in a batch, only the degenerate item falls back, and the warning names it
    batch, _, warnings = T.matte(img.expand(2, -1, -1, -1),
                                 torch.from_numpy(np.stack([tri, no_fg])))
    assert len(warnings) == 1 and warnings[0].startswith("image 1:")
    assert torch.count_nonzero(batch[0][torch.from_numpy(tri) == 0.5]) > 0


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    image, alpha, _, _ = composite(h=32, w=32)
    T.matte(torch.from_numpy(image)[None], torch.from_numpy(band_trimap(alpha))[None], threads=1)
    assert torch.get_num_threads() == before
    assert 1 <= T.auto_threads() <= before


# ------------------------------------------------------------------------------------------ (6) CLI
def _write_case(folder, stem, h=40, w=48, seed=0):
    image, alpha, _, _ = composite(h, w, seed)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 + 0.5).astype(np.uint8)).save(folder / f"{stem}.png")
    tri = band_trimap(alpha, width=3)
    return image, alpha, tri


def test_cli_writes_rgba_refuses_overwrite_and_rejects_size_mismatch(tmp_path, capsys):
    image, alpha, tri = _write_case(tmp_path / "img", "cat")
    Image.fromarray((tri * 255).round().astype(np.uint8).clip(0, 255)).save(tmp_path / "tri.png")
    out = tmp_path / "out"
    rc = cli_main(["matte", str(tmp_path / "img" / "cat.png"), "--trimap", str(tmp_path / "tri.png"),
                   "--out", str(out)])
    assert rc == 0
    res = Image.open(out / "cat.png")
    assert res.mode == "RGBA" and res.size == (48, 40)
    got = np.asarray(res).astype(np.float32) / 255.0
    unknown = tri == 0.5
    assert np.abs(got[..., 3] - alpha)[unknown].mean() < 0.05
    assert np.array_equal(got[..., 3][~unknown], tri[~unknown])
    before = (out / "cat.png").read_bytes()
    capsys.readouterr()
    rc = cli_main(["matte", str(tmp_path / "img" / "cat.png"), "--trimap", str(tmp_path / "tri.png"),
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists" in err and "--overwrite" in err
    assert (out / "cat.png").read_bytes() == before
    rc = cli_main(["matte", str(tmp_path / "img" / "cat.png"), "--trimap", str(tmp_path / "tri.png"),
                   "--out", str(out), "--overwrite"])
    assert rc == 0
    Image.fromarray(np.zeros((40, 47), np.uint8)).save(tmp_path / "small.png")
    capsys.readouterr()
    rc = cli_main(["matte", str(tmp_path / "img" / "cat.png"), "--trimap", str(tmp_path / "small.png"),
                   "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "47x40" in err[0] and "48x40" in err[0]
    assert not (tmp_path / "out2" / "cat.png").exists()


def test_cli_folders_match_trimaps_by_stem(tmp_path, capsys):
    tris = {}
    for i, stem in enumerate(["a", "b"]):
        _, _, tri = _write_case(tmp_path / "imgs", stem, seed=i)
        tris[stem] = tri
        (tmp_path / "tris").mkdir(exist_ok=True)
        Image.fromarray(np.where(tri == 0.5, 128, tri * 255).astype(np.uint8)).save(tmp_path / "tris" / f"{stem}.png")
    rc = cli_main(["matte", str(tmp_path / "imgs"), "--trimap", str(tmp_path / "tris"), "--out", str(tmp_path / "o")])
    assert rc == 0
    for stem, tri in tris.items():
        got = np.asarray(Image.open(tmp_path / "o" / f"{stem}.png"))
        assert got.shape == (40, 48, 4)
        assert np.array_equal(got[..., 3][tri == 1.0], np.full((tri == 1.0).sum(), 255, np.uint8))
    (tmp_path / "tris" / "b.png").unlink()
    capsys.readouterr()
    rc = cli_main(["matte", str(tmp_path / "imgs"), "--trimap", str(tmp_path / "tris"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "no trimap" in capsys.readouterr().err
