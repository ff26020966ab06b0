"""GreenPost keyer: procedural green/blue-screen composites with exact ground truth (no /work/shared).

The fixtures come from ``diffusion_matting.py.samples``: a soft-edged body, a semi-transparent veil and
many 1-2 px strands (4x supersampled coverage), over pure / studio (gradient + vignette) / uneven
(wrinkles, JPEG) plates with sensor noise and edge spill. Thresholds are honest margins over what the
keyer reaches, and each quality test also beats a naive colour-difference keyer by a wide factor.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_matting.py import metrics
from diffusion_matting.py.cli import main
from diffusion_matting.py.errors import UserError
from diffusion_matting.py.imageio import load_image
from diffusion_matting.py.greenpost import (_box5, _downsample, _half, _lstsq_rows, _subsample, _upf, _Upsampler,
                                            color_hex, estimate_plate, greenpost, key_basis, key_signal, kmeans,
                                            soft_clip)
from diffusion_matting.py.samples import STUDIO_GREEN, make_sample, render_plate

BLUE = (0.1, 0.25, 0.85)


def sample(style="studio", color=STUDIO_GREEN, size=160, seed=3, **kw):
    return make_sample(height=size, width=size, seed=seed, style=style, color=color, **kw)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))[None]


def naive_alpha(image, key):
    """Classic colour-difference key with the *true* key colour and no plate: 1 - s(I) / s(K)."""
    k, n, _ = key_basis(torch.tensor(key, dtype=torch.float32))
    s = key_signal(torch.from_numpy(image), k, n)
    sk = key_signal(torch.tensor(key, dtype=torch.float32), k, n)
    return (1 - s / sk).clamp(0, 1).numpy()


def chromaticity(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / rgb.sum()


# ------------------------------------------------------------------------------------------ maths
def test_key_signal_is_colour_difference_for_green_and_rotates_with_hue():
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(0))
    k, n, _ = key_basis(torch.tensor([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(key_signal(x, k, n), x[:, 1] - torch.maximum(x[:, 0], x[:, 2]), atol=1e-6)
    # for a pure blue key it is B - max(R, G): the same formula rotated to another hue
    k, n, _ = key_basis(torch.tensor([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(key_signal(x, k, n), x[:, 2] - torch.maximum(x[:, 0], x[:, 1]), atol=1e-6)
    # grey has no key signal whatever the key
    k, n, _ = key_basis(torch.tensor(STUDIO_GREEN))
    assert torch.allclose(key_signal(torch.full((4, 3), 0.37), k, n), torch.zeros(4), atol=1e-6)


def test_soft_clip_snaps_noise_keeps_the_middle():
    a = torch.linspace(-0.5, 1.5, 2001)
    out = soft_clip(a, 0.05)
    ref = torch.where(a < 0.1, 2 * (a - 0.05), a)
    ref = torch.where(ref > 0.9, 2 * (ref + 0.05) - 1, ref).clamp(0, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert out[(a > 0.1) & (a < 0.9)].equal(a[(a > 0.1) & (a < 0.9)])
    assert (out[a < 0.05] == 0).all() and (out[a > 0.95] == 1).all()


def test_soft_clip_writes_into_out():
    a = torch.linspace(-0.5, 1.5, 999)
    out = torch.empty_like(a)
    assert soft_clip(a, 0.07, out=out) is out and torch.equal(out, soft_clip(a, 0.07))
    assert torch.equal(soft_clip(a, 0.0, out=out), a.clamp(0, 1))


def test_subsample_is_stratified_and_deterministic():
    idx = np.arange(0, 300000, 3)  # 100000 candidates
    pick = _subsample(idx, 1000)
    # one pick in each run of 100 candidates, so the samples spread evenly (and never repeat here)
    np.testing.assert_array_equal(np.searchsorted(idx, pick) // 100, np.arange(1000))
    assert np.array_equal(pick, _subsample(idx, 1000)) and not np.array_equal(pick, _subsample(idx, 1000, seed=1))
    within = np.searchsorted(idx, pick) % 100  # the position inside each run is random, not a fixed stride
    assert within.std() > 20 and len(np.unique(within)) > 90
    assert np.array_equal(_subsample(idx[:500], 1000), idx[:500])  # few candidates: all of them


def test_half_matches_average_pooling():
    g = torch.Generator().manual_seed(4)
    for shape in [(1, 2, 256, 130), (1, 2, 7, 9), (1, 1, 40, 40)]:
        x = torch.rand(shape, generator=g)
        assert torch.allclose(_half(x), F.avg_pool2d(x, 2, ceil_mode=True), atol=1e-6)


def test_downsample_and_upsampler_match_torch_references():
    g = torch.Generator().manual_seed(1)
    for h, w, f in [(37, 53, 4), (40, 48, 4), (5, 7, 3), (30, 31, 1)]:
        x = torch.rand(h, w, 3, generator=g)
        ref = F.avg_pool2d(x.permute(2, 0, 1)[None], f, ceil_mode=True)  # ragged cells average what exists
        assert torch.allclose(_downsample(x, f), ref, atol=1e-6)
        low = torch.rand(1, 2, -(-h // f), -(-w // f), generator=g)
        full = F.interpolate(low, scale_factor=f, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)[0, :, :h, :w]
        up = _Upsampler(low, f, h, w)
        bands = torch.cat([up.rows(a, min(h, a + 6)) for a in range(0, h, 6)], 1)  # row bands == one pass
        assert torch.allclose(bands, full, atol=1e-6)


def test_fast_upsampling_and_box_filter_match_torch_references():
    g = torch.Generator().manual_seed(4)
    for shape, f in [((1, 3, 80, 81), 2), ((1, 7, 33, 70), 5), ((2, 2, 40, 31), 8), ((1, 1, 3, 4), 2), ((1, 2, 9, 200), 3)]:
        x = torch.rand(*shape, generator=g)
        ref = F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        # (torch computes the source coordinate (i + 0.5) / f - 0.5 in float32: ~1e-5 apart at large i)
        assert torch.allclose(_upf(x, f), ref, atol=2e-5), (shape, f)
    for r in range(4):
        x = torch.rand(3, 17, 26, generator=g)
        ref = F.avg_pool2d(F.pad(x[None], (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)[0]
        assert torch.allclose(_box5(x, r), ref, atol=1e-6), r


def test_kmeans_finds_separated_clusters_and_normal_equations_match_lstsq():
    rng = np.random.default_rng(0)
    truth = np.array([[0.1, 0.8, 0.2], [0.9, 0.3, 0.3], [0.2, 0.2, 0.9]])
    pts = np.concatenate([c + 0.03 * rng.standard_normal((n, 3)) for c, n in zip(truth, (500, 300, 200))])
    centres, labels = kmeans(pts, 3, seed=1)
    order = [int(np.argmin(np.linalg.norm(centres - c, axis=1))) for c in truth]
    assert sorted(order) == [0, 1, 2]
    assert np.abs(centres[order] - truth).max() < 0.01
    # every point carries the label of its nearest centre, and the centres are their members' means
    nearest = np.argmin(((pts[:, None] - centres[None]) ** 2).sum(2), 1)
    assert np.array_equal(labels, nearest)
    assert np.allclose(centres[labels[0]], pts[labels == labels[0]].mean(0))
    assert [int((labels == j).sum()) for j in order] == [500, 300, 200]
    # more clusters than distinct points: no failure, every point is its own centre
    few = np.array([[0.5, 0.5, 0.5], [0.1, 0.2, 0.3]] * 10)
    centres, labels = kmeans(few, 5)
    assert np.abs(centres[labels] - few).max() < 1e-12
    basis = torch.rand(6, 400, generator=torch.Generator().manual_seed(5)) * 2 - 1
    values = torch.rand(3, 400, generator=torch.Generator().manual_seed(6))
    ref = torch.linalg.lstsq(basis.t().double(), values.t().double()).solution.float()
    assert torch.allclose(torch.from_numpy(_lstsq_rows(basis.numpy(), values.numpy())), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("style,kw,max_sad,max_mse,max_fg", [
    ("studio", {}, 1.1, 12.0, 9.0),
    ("uneven", dict(noise=0.015, jpeg=90), 1.5, 16.0, 12.0),
])
def test_green_screen_matte_and_foreground_quality(style, kw, max_sad, max_mse, max_fg):
    s = sample(style, **kw)
    res = greenpost(t(s.image))
    assert res.warnings == []
    m = metrics.evaluate(res.alpha[0], s.alpha, pred_fg=res.foreground[0], gt_fg=s.fg)
    naive = metrics.evaluate(naive_alpha(s.image, STUDIO_GREEN), s.alpha, pred_fg=s.image, gt_fg=s.fg)
    trivial = min(metrics.sad(np.zeros_like(s.alpha), s.alpha), metrics.sad(np.ones_like(s.alpha), s.alpha))
    assert m["sad"] < max_sad and m["mse_x1e3"] < max_mse, m
    assert m["sad"] < 0.4 * naive["sad"] and m["mse_x1e3"] < 0.4 * naive["mse_x1e3"], (m, naive)
    assert m["sad"] < 0.25 * trivial
    # straight, spill-free colour: far closer to the truth than the observed (spilled, mixed) pixels
    assert m["fg_mse_x1e3"] < max_fg and m["fg_mse_x1e3"] < 0.7 * naive["fg_mse_x1e3"], (m, naive)
    # opaque pixels keep their observed colour; the rgba output carries the same data
    opaque = s.alpha > 0.999
    assert np.abs(res.foreground[0].numpy()[opaque] - s.image[opaque]).mean() < 0.01
    assert torch.equal(res.rgba[..., :3], res.foreground) and torch.equal(res.rgba[..., 3], res.alpha)
    # matte and colours are in range and the plate is the backdrop where it is visible
    assert res.alpha.min() >= 0 and res.alpha.max() <= 1 and res.foreground.min() >= 0 and res.foreground.max() <= 1
    bg = s.alpha < 1e-3
    assert np.abs(res.plate[0].numpy()[bg] - s.plate[bg]).mean() < 0.02


@pytest.mark.parametrize("color", [STUDIO_GREEN, BLUE, (0.0, 1.0, 0.0)])
def test_key_colour_recovered_for_green_and_blue_screens(color):
    s = sample("studio" if color != (0.0, 1.0, 0.0) else "pure", color=color)
    res = greenpost(t(s.image))
    key = res.key_color[0].numpy()
    # studio plates are darkened by vignetting: the key's chromaticity is what identifies the screen
    assert np.abs(chromaticity(key) - chromaticity(color)).max() < 0.02, (key, color)
    assert color_hex(key).startswith("#") and len(color_hex(key)) == 7
    m = metrics.evaluate(res.alpha[0], s.alpha)
    assert m["sad"] < 0.3 * metrics.sad(naive_alpha(s.image, color), s.alpha) + 0.3


def test_user_plate_and_key_override_paths():
    s = sample("uneven", noise=0.01)
    auto = greenpost(t(s.image))
    with_plate = greenpost(t(s.image), plate=t(s.plate))
    assert torch.equal(with_plate.plate[0], torch.from_numpy(s.plate))  # the user plate is used as given
    sad_auto, sad_plate = metrics.sad(auto.alpha[0], s.alpha), metrics.sad(with_plate.alpha[0], s.alpha)
    assert sad_plate < 1.2 and sad_plate < 1.25 * sad_auto, (sad_plate, sad_auto)
    override = greenpost(t(s.image), key_color=STUDIO_GREEN)
    assert np.allclose(override.key_color[0].numpy(), STUDIO_GREEN)
    assert metrics.sad(override.alpha[0], s.alpha) < 1.25 * sad_auto + 0.1
    with pytest.raises(UserError):
        greenpost(t(s.image), key_color=(0.2, 1.5, 0.1))
    with pytest.raises(UserError):
        greenpost(t(s.image), plate=torch.rand(1, 20, 20, 3))  # size mismatch


def test_coarse_mask_is_garbage_and_holdout_matte():
    s = sample("studio")
    support = torch.from_numpy(s.alpha > 0.02).float()[None, None]
    generous = F.max_pool2d(support, 21, stride=1, padding=10)[0]  # covers every strand
    # junk on the screen far from the subject: a grey blob the mask excludes
    img = s.image.copy()
    img[5:20, 5:20] = 0.5
    generous[0, 0:30, 0:30] = 0
    res = greenpost(t(img), mask=generous, mask_margin=0.02)  # a garbage matte
    a = res.alpha[0]
    r = round(0.02 * np.hypot(160, 160))  # the margin, in px (a 160 px image is worked at full size)
    outside = F.max_pool2d(generous[None], 2 * r + 1, stride=1, padding=r)[0, 0] < 0.5
    assert outside[5:20, 5:20].all() and (a[outside] == 0).all()  # nothing survives outside the mask + margin
    free = greenpost(t(img))
    assert free.alpha[0, 5:20, 5:20].mean() > 0.5  # without the mask the blob is (rightly) foreground
    sad_free = metrics.sad(free.alpha[0, 30:, 30:], s.alpha[30:, 30:])
    assert metrics.sad(a[30:, 30:], s.alpha[30:, 30:]) < 1.1 * sad_free + 0.05  # same matte elsewhere
    # holdout: a conservative silhouette mask forces its eroded interior opaque, even over key-coloured
    # paint on the subject that the keyer alone would make transparent
    body = torch.from_numpy(s.alpha > 0.999).float()[None]
    painted = s.image.copy()
    hole = (slice(70, 80), slice(70, 80))
    assert body[0][hole].all()
    painted[hole] = s.plate[hole]
    held = greenpost(t(painted), mask=body, mask_holdout=True).alpha[0]
    interior = -F.max_pool2d(-body[None], 2 * r + 1, stride=1, padding=r)[0, 0] > 0.5
    assert interior[hole].all() and (held[interior] == 1).all()
    assert greenpost(t(painted), mask=body).alpha[0][hole].mean() < 0.2  # garbage-only leaves the hole
    # a mask covering everything cannot tell the background: warned, still keyed from the image
    full = greenpost(t(s.image), mask=torch.ones(1, 160, 160))
    assert any("mask" in w for w in full.warnings)


def test_fully_background_gives_zero_alpha():
    for style, color in [("studio", STUDIO_GREEN), ("uneven", BLUE)]:
        s = sample(style, color=color)
        res = greenpost(t(s.plate + np.random.default_rng(0).normal(0, 0.01, s.plate.shape).astype(np.float32)))
        assert res.warnings == []
        assert float(res.alpha.max()) == 0.0


def test_photo_without_a_screen_is_all_foreground_with_a_warning_or_an_error():
    g = torch.Generator().manual_seed(0)
    photo = F.interpolate(torch.rand(1, 3, 10, 10, generator=g), size=(128, 96), mode="bicubic",
                          align_corners=False).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    res = greenpost(photo)
    assert len(res.warnings) == 1 and "no backdrop colour" in res.warnings[0]
    assert torch.equal(res.alpha, torch.ones(1, 128, 96)) and torch.equal(res.foreground, photo)
    with pytest.raises(UserError, match="no backdrop colour"):
        greenpost(photo, strict=True)
    grey = torch.full((1, 64, 64, 3), 0.5) + 0.02 * torch.rand(1, 64, 64, 3, generator=g)
    assert "no backdrop colour" in greenpost(grey).warnings[0]


def test_bad_and_unusual_inputs():
    s = sample("studio", size=96)
    x = t(s.image)
    nan = x.clone()
    nan[0, 3, 4, 1] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        greenpost(nan)
    with pytest.raises(UserError):
        greenpost(torch.rand(1, 8, 8, 2))
    ref = greenpost(x).alpha
    # RGBA input: the alpha channel is ignored; [H,W,C] gets a batch axis; HDR values are clamped
    assert torch.equal(greenpost(torch.cat([x, torch.zeros_like(x[..., :1])], -1)).alpha, ref)
    assert torch.equal(greenpost(x[0]).alpha, ref)
    assert torch.equal(greenpost(x * 1.0).alpha, ref)
    hdr = greenpost(x * 3.0)
    assert hdr.alpha.shape == ref.shape and torch.isfinite(hdr.rgba).all()
    # grey input (1 channel): no screen colour in a grey image -> documented all-foreground result
    grey = greenpost(x.mean(-1, keepdim=True))
    assert grey.alpha.shape == (1, 96, 96) and grey.warnings
    # odd sizes are keyed at their own size
    odd = sample("studio", size=96)
    res = greenpost(t(odd.image[:77, :93]))
    assert res.alpha.shape == (1, 77, 93) and res.rgba.shape == (1, 77, 93, 4)
    assert metrics.sad(res.alpha[0], odd.alpha[:77, :93]) < 0.6


def test_band_processing_is_exact_and_batches_are_independent():
    s = sample("studio", size=128)
    x = t(s.image)
    whole = greenpost(x)
    # 7-row bands (thinner than the guided filter's halo: pass 1 runs first) and 12-row bands (pass 2 runs one
    # band behind pass 1, reusing its planar copy): the halos of the guided filter must be right
    for rows in (7, 12):
        banded = greenpost(x, chunk_pixels=128 * rows)
        assert torch.allclose(whole.rgba, banded.rgba, atol=1e-5)
        assert torch.allclose(whole.plate, banded.plate, atol=1e-6)
    # with mask bounds, a user plate and partial decontamination too
    kw = dict(mask=(whole.alpha > 0.5).float(), plate=whole.plate, decontaminate=0.3, mask_holdout=True)
    ref = greenpost(x, **kw)
    for rows in (7, 12):
        assert torch.allclose(ref.rgba, greenpost(x, chunk_pixels=128 * rows, **kw).rgba, atol=1e-5)
    blue = sample("studio", color=BLUE, size=128, seed=5)
    photo = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)), size=(128, 128),
                          mode="bicubic", align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)
    batch = greenpost(torch.cat([x, t(blue.image), photo]))
    assert torch.equal(batch.alpha[0], whole.alpha[0])
    assert torch.allclose(batch.alpha[1], greenpost(t(blue.image)).alpha[0])
    assert len(batch.warnings) == 1 and batch.warnings[0].startswith("image 2:")
    assert (batch.alpha[2] == 1).all()
    assert np.abs(chromaticity(batch.key_color[1].numpy()) - chromaticity(BLUE)).max() < 0.02


def test_guided_refinement_removes_noise_and_keeps_edges():
    s = sample("studio", noise=0.03, size=128, seed=11)
    x = t(s.image)
    raw = greenpost(x, refine_radius=0).alpha[0]
    refined = greenpost(x).alpha[0]
    gt = torch.from_numpy(s.alpha)
    # sensor noise leaks into the unrefined matte; the guided filter removes most of it without blurring
    # the edges away: lower SAD, MSE and gradient error against the truth
    assert metrics.mse(refined, s.alpha) < 0.75 * metrics.mse(raw, s.alpha)
    assert metrics.sad(refined, s.alpha) < 0.85 * metrics.sad(raw, s.alpha)
    assert refined[gt == 0].abs().mean() < 0.6 * raw[gt == 0].abs().mean()
    e_raw, e_ref = metrics.evaluate(raw, s.alpha), metrics.evaluate(refined, s.alpha)
    assert e_ref["grad"] < 0.8 * e_raw["grad"], (e_ref, e_raw)
    # any window: band processing (even bands, halo on the half-resolution grid) equals one pass
    for radius in (1, 6):
        whole = greenpost(x, refine_radius=radius).alpha
        assert torch.allclose(whole, greenpost(x, refine_radius=radius, chunk_pixels=128 * 9).alpha, atol=1e-5)


def test_threads_setting_is_restored():
    before = torch.get_num_threads()
    greenpost(t(sample("studio", size=64).image), cpu_threads=1)
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------ CLI
def test_cli_key_writes_rgba_of_same_size_and_refuses_overwrite(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    a, b = sample("studio", size=96), sample("studio", color=BLUE, size=96, seed=8)
    Image.fromarray((a.image * 255 + 0.5).astype(np.uint8)).save(src / "one.png")
    Image.fromarray((b.image[:80, :90] * 255 + 0.5).astype(np.uint8)).save(src / "two.jpg", quality=95)
    out = tmp_path / "out"
    assert main(["key", str(src), "--out", str(out)]) == 0
    one = np.asarray(Image.open(out / "one.png"))
    two = np.asarray(Image.open(out / "two.png"))
    assert one.shape == (96, 96, 4) and two.shape == (80, 90, 4)
    assert metrics.sad(one[..., 3] / 255.0, a.alpha) < 0.6
    # the file is straight colour: opaque pixels keep the image colour
    opaque = a.alpha > 0.999
    assert np.abs(one[..., :3][opaque] / 255.0 - a.image[opaque]).mean() < 0.02
    before = (out / "one.png").read_bytes()
    assert main(["key", str(src / "one.png"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "one.png").read_bytes() == before
    assert main(["key", str(src / "one.png"), "--out", str(out), "--overwrite", "--key-color", "0.16,0.62,0.26"]) == 0
    # bad input: one line, exit 2
    assert main(["key", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert main(["key", str(src / "one.png"), "--out", str(tmp_path / "o2"), "--key-color", "green"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 2 and all(line.startswith("diffusion-matting key: error:") for line in err)
    # PNG compression is lossless at every level: other bytes, the same pixels
    assert main(["key", str(src / "one.png"), "--out", str(tmp_path / "o9"), "--compress-level", "9"]) == 0
    assert main(["key", str(src / "one.png"), "--out", str(tmp_path / "o0"), "--compress-level", "0"]) == 0
    z0, z9 = (tmp_path / "o0" / "one.png").read_bytes(), (tmp_path / "o9" / "one.png").read_bytes()
    assert len(z9) < len(z0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o9" / "one.png")), np.asarray(Image.open(tmp_path / "o0" / "one.png")))



def test_cli_key_writes_behind_keying_in_order_and_stops_on_a_failed_write(tmp_path, monkeypatch):
    from diffusion_matting.py.commands import key as key_cmd

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        s = sample("studio", size=64, seed=20 + i)
        Image.fromarray((s.image * 255 + 0.5).astype(np.uint8)).save(src / f"f{i}.png")
    # the threaded writer gives the same files as keying and saving one by one
    assert main(["key", str(src), "--out", str(tmp_path / "out")]) == 0
    for i in range(3):
        image, _ = load_image(src / f"f{i}.png")
        res = greenpost(image)
        got = np.asarray(Image.open(tmp_path / "out" / f"f{i}.png")).astype(np.float32) / 255.0
        assert np.abs(got[..., 3] - res.alpha[0].numpy()).max() <= 0.5 / 255 + 1e-6
    # a write that fails stops the run: the error reaches the caller, no later file is written
    calls = []

    def failing_save(path, *a, **k):
        calls.append(path)
        raise OSError(f"disk full writing {path}")

    monkeypatch.setattr(key_cmd, "save_rgba", failing_save)
    with pytest.raises(OSError, match="disk full"):
        main(["key", str(src), "--out", str(tmp_path / "out2")])
    assert len(calls) == 1 and not any((tmp_path / "out2").glob("*.png"))

# ------------------------------------------------------------------------------------------ screen or not
def _smooth_field(rng, h, w, cells, channels):
    """A smooth random field ``[h,w,channels]`` in 0..1 (bicubic upsampling of a coarse random grid)."""
    g = torch.from_numpy(rng.random((1, channels, cells, cells)).astype(np.float32))
    return F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).clamp(0, 1).numpy()


def small_screen_sample(seed, size=160):
    """A close-up filling ~95% of the frame (skin, dark hair, a patterned shirt; no screen-green clothes: a
    keyer cannot tell those from the screen) over a studio screen that shows only in two thin strips and
    a corner, with ~2 px soft edges and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    wob = 0.01 * np.sin(xx * 25 + rng.uniform(0, 6)) + 0.01 * np.sin(yy * 31 + rng.uniform(0, 6))
    edge = np.minimum(np.minimum(xx - 0.03 + wob, 0.97 - xx + wob), 1.0)
    inside = np.minimum(edge, (xx + yy) - 0.14 + wob)  # the screen: left/right strips and the top-left corner
    alpha = np.clip(inside * size / 2.0 + 0.5, 0, 1).astype(np.float32)  # ~2 px soft edge
    tex = _smooth_field(rng, size, size, 12, 3)
    skin = np.array([0.85, 0.62, 0.5]) * (0.75 + 0.3 * tex[..., :1])
    hair = np.array([0.2, 0.14, 0.1]) * (0.6 + 0.8 * tex[..., 1:2])
    shirt_colour = rng.choice([[0.75, 0.15, 0.2], [0.2, 0.3, 0.75], [0.85, 0.75, 0.3]])
    shirt = np.asarray(shirt_colour) * (0.6 + 0.5 * tex) * (1 + 0.15 * np.sin(xx * 60)[..., None])
    fg = np.where((yy < 0.3 + 0.1 * np.sin(xx * 7))[..., None], hair, skin)
    fg = np.clip(np.where((yy > 0.7)[..., None], shirt, fg), 0, 1)
    plate = render_plate(size, size, "studio", STUDIO_GREEN, seed)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * plate
    image = np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1).astype(np.float32)
    return image, alpha, fg.astype(np.float32)


def test_small_screen_fraction_is_keyed_robustly():
    # the bare screen is ~5% of the frame: every noise realisation must still be recognised as a screen
    # (the no-screen decision must not depend on how many screen pixels a random subsample happens to hold)
    for seed in range(4):
        image, alpha, fg = small_screen_sample(seed)
        assert 0.03 < float((alpha < 0.01).mean()) < 0.08
        res = greenpost(t(image))
        assert res.warnings == [], res.warnings
        key = res.key_color[0].numpy()
        assert np.abs(chromaticity(key) - chromaticity(STUDIO_GREEN)).max() < 0.03, key
        m = metrics.evaluate(res.alpha[0], alpha, pred_fg=res.foreground[0], gt_fg=fg)
        trivial = metrics.sad(np.ones_like(alpha), alpha)  # all foreground: the no-screen fallback
        naive = metrics.sad(naive_alpha(image, STUDIO_GREEN), alpha)
        assert m["sad"] < 0.25 * trivial and m["sad"] < 0.6 * naive and m["mse_x1e3"] < 5, (m, trivial, naive)
    # the screen's chromaticity tolerance (the no-screen statistic) hardly moves with the sample size: the
    # samples come from the pixels near the key colour, not from the whole frame (5% of which is screen)
    image, alpha, _ = small_screen_sample(0)
    small = np.ascontiguousarray(image.transpose(2, 0, 1))
    key = np.asarray(STUDIO_GREEN) * 0.9 + 0.1 * image.reshape(-1, 3).mean(0)  # a K-Means-like, pulled centre
    tols = [estimate_plate(small, key, samples=n)[2] for n in (128, 256, 512, 2048)]
    assert max(tols) < 0.03 and max(tols) < 1.5 * min(tols), tols


def photo_like(seed, size=160):
    """A photo without a screen: textured foliage (saturated greens of varying hue and brightness, the
    hardest case for a green-screen detector) below a row of houses (walls of varied colours), a brown
    path and a few objects. (A clear blue sky is a fine backdrop to key, so there is none.)"""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tex = _smooth_field(rng, size, size, 24, 3)
    houses = np.repeat(np.repeat(rng.uniform(0.2, 0.9, (1, 8, 3)), size // 8, 1), size, 0) * (0.8 + 0.2 * tex)
    light = 0.35 + 0.65 * _smooth_field(rng, size, size, 5, 1)
    hue = tex[..., :1]  # yellow-green .. blue-green foliage
    leaves = np.concatenate([0.15 + 0.45 * hue, 0.45 + 0.35 * tex[..., 1:2], 0.05 + 0.3 * (1 - hue)], -1) * light
    path = np.stack([0.45 + 0.1 * tex[..., 2], 0.32 + 0.05 * tex[..., 0], 0.2 + 0.05 * tex[..., 1]], -1)
    horizon = 0.35 + 0.05 * np.sin(xx * 9)
    img = np.where((yy < horizon)[..., None], houses, leaves)
    img = np.where((np.abs(xx - 0.5 - 0.3 * (yy - 1)) < 0.08 * yy)[..., None] & (yy > horizon)[..., None], path, img)
    for _ in range(3):  # objects: saturated discs
        cy, cx, r = rng.uniform(0.4, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.04, 0.1)
        img = np.where((((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None], rng.random(3), img)
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1).astype(np.float32)


def test_photo_with_foliage_but_no_screen_is_all_foreground():
    for seed in range(3):
        photo = t(photo_like(seed))
        res = greenpost(photo)
        assert len(res.warnings) == 1 and "no backdrop colour" in res.warnings[0], res.warnings
        assert torch.equal(res.alpha, torch.ones_like(res.alpha)) and torch.equal(res.foreground, photo)
