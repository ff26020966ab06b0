"""DiffuMatting matting head: decoder tap, tiled decoding, file format, training (CPU, random small VAE)."""

from __future__ import annotations

import json
import struct
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

from diffusion_matting.py import cli  # noqa: E402
from diffusion_matting.py.errors import UserError  # noqa: E402
from diffusion_matting.py.matting_head import (  # noqa: E402
    FORMAT_NAME, TAP_POINT, MattingHead, MattingHeadConfig, decode_jobs, decode_with_features_diffusers,
    decode_with_matte,
    diffusers_decode_fn, feather_1d, features_diffusers, load_matting_head, mask_metrics,
    read_matting_head_metadata, save_matting_head, tile_starts)
from diffusion_matting.py.train_matting_head import (  # noqa: E402
    TrainConfig, composite_batch, load_matte_items, load_vae, procedural_items, train_matting_head)


def small_vae(seed: int = 0, attention: bool = True) -> AutoencoderKL:
    """The real AutoencoderKL architecture, shrunk: full-resolution decoder width 128 (the tapped feature),
    one down/up level (x2), 4 latent channels, random weights."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(128, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=32, mid_block_add_attention=attention).eval()


@pytest.fixture(scope="module")
def vae():
    return small_vae()


def _latents(vae, size=64, seed=0, batch=2):
    items = procedural_items(2, size=96, seed=seed)
    imgs, _ = composite_batch(items, batch, size, np.random.default_rng(seed))
    with torch.no_grad():
        return vae.encode(imgs * 2 - 1).latent_dist.mode()


# ------------------------------------------------------------------------------------------- the tap
def test_decode_with_features_is_the_plain_decode_and_the_norm_out_input(vae):
    z = _latents(vae, size=48)
    with torch.no_grad():
        ref = vae.decode(z).sample
        rgb, feat = decode_with_features_diffusers(vae, z)
        assert torch.equal(rgb, ref)
        assert feat.shape == (2, 128, 48, 48)
        # the feature IS the input of conv_norm_out: finishing the decoder from it reproduces the RGB exactly
        d = vae.decoder
        assert torch.equal(d.conv_out(d.conv_act(d.conv_norm_out(feat))), ref)
        # the early-stopping variant used for training gives the same tensor
        assert torch.equal(features_diffusers(vae, z), feat)


def test_decode_with_features_with_slicing_concatenates_and_refuses_diffusers_tiling(vae):
    z = _latents(vae, size=32, batch=3)
    with torch.no_grad():
        per_sample = [decode_with_features_diffusers(vae, z[i:i + 1]) for i in range(3)]
        vae.enable_slicing()
        try:
            ref = vae.decode(z).sample
            rgb, feat = decode_with_features_diffusers(vae, z)
        finally:
            vae.disable_slicing()
        assert torch.equal(rgb, ref)
        assert torch.equal(feat, torch.cat([f for _, f in per_sample]))
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = 8, 16  # latent 16 > 8: diffusers tiles
        try:
            with pytest.raises(RuntimeError, match="tiles"):
                decode_with_features_diffusers(vae, z)
        finally:
            vae.disable_tiling()
            vae.tile_latent_min_size, vae.tile_sample_min_size = 16, 32


# ------------------------------------------------------------------------------------------- tiling
def test_tile_layout_and_feather_weights():
    assert tile_starts(10, 16, 4) == [0]
    s = tile_starts(100, 32, 8)
    assert s[0] == 0 and s[-1] == 68 and all(b - a <= 24 for a, b in zip(s, s[1:]))
    w = feather_1d(16, 4, left=True, right=False)
    assert torch.allclose(w[:4], torch.tensor([0.125, 0.375, 0.625, 0.875])) and torch.all(w[4:] == 1)
    # two neighbours overlapping by exactly the ramp cross-fade to a constant sum of 1
    a, b = feather_1d(16, 4, False, True), feather_1d(16, 4, True, False)
    assert torch.allclose(a[12:] + b[:4], torch.ones(4))


class LocalDecoder(torch.nn.Module):
    """A stand-in decoder with only local operations (x2 upsample + convs): tiles see exact context except
    within its receptive field of a tile edge, so tiled == untiled away from seams."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1 = torch.nn.Conv2d(4, 128, 3, padding=1)
        self.c2 = torch.nn.Conv2d(128, 3, 3, padding=1)

    def forward(self, z):
        feat = torch.tanh(self.c1(F.interpolate(z, scale_factor=2, mode="nearest")))
        return self.c2(feat), feat


def test_tiled_blending_matches_untiled_away_from_seams_for_a_local_decoder():
    dec, head = LocalDecoder().eval(), MattingHead().eval()
    with torch.no_grad():
        head.conv2.weight.mul_(20)  # a head with real dynamic range, not ~0.5 everywhere
        z = torch.randn(2, 4, 48, 80, generator=torch.Generator().manual_seed(0))
        un = decode_with_matte(z, dec, head)
        ti = decode_with_matte(z, dec, head, tile=32, overlap=8)
    assert un.tiles == 1 and ti.tiles == 2 * 3
    assert un.matte.std() > 0.2
    # receptive field at output resolution: c1 (1 latent px = 2 px) + c2 (1) + head (2)  -> 6 px
    seam = torch.zeros(96, 160, dtype=torch.bool)
    for axis, n in ((0, 48), (1, 80)):
        for s in tile_starts(n, 32, 8):
            for e in (2 * s, 2 * (s + 32)):
                if 0 < e < 2 * n:
                    sl = slice(max(0, e - 6), e + 6)
                    if axis == 0:
                        seam[sl, :] = True
                    else:
                        seam[:, sl] = True
    away = ~seam
    assert away.float().mean() > 0.45
    assert (ti.rgb - un.rgb).abs()[..., away].max() < 1e-5
    assert (ti.matte - un.matte).abs()[..., away].max() < 1e-5
    # at seams the feathering keeps the error small (edge pixels get small weights)
    assert (ti.matte - un.matte).abs().mean() < 0.01


def test_tiled_vs_untiled_on_the_vae(vae):
    """Real decoder (GroupNorms everywhere, mid-block attention): with GroupNorm statistics shared across
    tiles (stage-by-stage tiling, latent-resolution part whole) the tiled RGB and head output equal the
    untiled ones up to float rounding; independent tiles (per-tile statistics and attention, what a plain
    tiled VAE decode does) are off everywhere."""
    z = _latents(vae, size=96, batch=2)
    head = MattingHead().eval()
    with torch.no_grad():
        head.conv2.weight.mul_(20)
        fn = diffusers_decode_fn(vae)
        un = decode_with_matte(z, fn, head)
        calls = []
        ti = decode_with_matte(z, fn, head, tile=32, overlap=16, on_tile=lambda d, t: calls.append((d, t)))
        assert ti.tiles == 4 and ti.shared_stats and un.matte.std() > 0.1
        assert calls[-1][0] == calls[-1][1] == decode_jobs(z.shape, fn, 32, 16) == len(calls)
        rgb_err = (ti.rgb - un.rgb).abs().max().item()
        matte_err = (ti.matte - un.matte).abs().max().item()
        old = decode_with_matte(z, fn, head, tile=32, overlap=16, shared_stats=False)
        old_err = (old.matte - un.matte).abs().mean().item()
        print(json.dumps({"shared_stats_max_abs_rgb": rgb_err, "shared_stats_max_abs_matte": matte_err,
                          "independent_tiles_mean_abs_matte": old_err, "rgb_std": un.rgb.std().item(),
                          "matte_std": un.matte.std().item()}))
        assert rgb_err < 1e-4 and matte_err < 1e-4, (rgb_err, matte_err)   # observed ~5e-6
        assert old_err > 0.01 and not old.shared_stats
        # where only tile (0,0) covers a pixel, the independent-tile result IS that tile's own decode + head
        rgb_t, feat_t = decode_with_features_diffusers(vae, z[:, :, :32, :32])
        corner = slice(0, 32)  # the next tile starts at latent 16 = px 32
        assert torch.allclose(old.rgb[..., corner, corner], rgb_t[..., corner, corner], atol=1e-6)
        assert torch.allclose(old.matte[..., corner, corner], head(feat_t)[..., corner, corner], atol=1e-6)


def test_shared_stats_tiling_on_the_sd_vae_architecture():
    """The SD/SDXL VAE decoder layout (4 levels, 2 layers per block, 3 upsamplers, channel-changing
    shortcuts, mid attention, 128-channel tap) at reduced inner widths, random weights, odd latent size,
    uneven tiles, batch 2, whole-image tensors on an explicit store device: alpha (head) and RGB agree
    with the untiled decode to < 1e-3 (observed ~1e-6)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 64, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval()
    torch.manual_seed(1)
    head = MattingHead().eval()
    z = torch.randn(2, 4, 9, 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        head.conv2.weight.mul_(20)
        fn = diffusers_decode_fn(vae, store_device="cpu")
        un = decode_with_matte(z, fn, head)
        ti = decode_with_matte(z, fn, head, tile=5, overlap=2)
    assert ti.tiles == 3 * 4 and un.matte.std() > 0.1
    a_err, rgb_err = (ti.matte - un.matte).abs().max().item(), (ti.rgb - un.rgb).abs().max().item()
    print(json.dumps({"sd_arch_max_abs_alpha": a_err, "sd_arch_max_abs_rgb": rgb_err}))
    assert a_err < 1e-3 and rgb_err < 1e-3


def test_group_stats_merge_equals_whole_tensor_group_norm():
    from diffusion_matting.py.decoder_tiles import GroupStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 9, 14, generator=g) * 3 + 5
    norm = torch.nn.GroupNorm(8, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
        st = GroupStats(8)
        for ys in (slice(0, 4), slice(4, 9)):           # disjoint pieces of unequal size
            for xs in (slice(0, 5), slice(5, 6), slice(6, 14)):
                st.add(x[..., ys, xs])
        scale, shift = st.affine(norm, "cpu")
        assert st.n == 8 * 9 * 14  # values per (sample, group)
        assert torch.allclose(x * scale + shift, norm(x), atol=1e-5)


# -------------------------------------------------------------------------------------- file format
def test_safetensors_round_trip_and_metadata(tmp_path):
    torch.manual_seed(1)
    head = MattingHead(MattingHeadConfig(hidden=32))
    path = save_matting_head(tmp_path / "h.safetensors", head, "sdxl", extra_metadata={"note": "x", "n": 3})
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])          # plain safetensors: JSON header, no pickle
    assert header["__metadata__"]["format"] == FORMAT_NAME
    meta = read_matting_head_metadata(path)
    assert meta["vae_family"] == "sdxl" and meta["tap_point"] == TAP_POINT == "decoder.norm_out.input"
    assert json.loads(meta["config"]) == {"in_channels": 128, "hidden": 32, "kernel_size": 3}
    assert meta["n"] == "3" and meta["latent_channels"] == "4"
    loaded, info = load_matting_head(path)
    assert info.vae_family == "sdxl" and info.config == head.config
    x = torch.randn(1, 128, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))
        assert loaded(x).min() >= 0 and loaded(x).max() <= 1


def test_operations_argument_is_used():
    made = []

    class Conv(torch.nn.Conv2d):
        def __init__(self, *a, **k):
            made.append((a, k.get("dtype")))
            super().__init__(*a, **k)

    head = MattingHead(operations=types.SimpleNamespace(Conv2d=Conv), dtype=torch.float64)
    assert [m[0][:2] for m in made] == [(128, 64), (64, 1)] and made[0][1] == torch.float64
    assert head.conv1.weight.dtype == torch.float64


def test_bad_files_raise_user_errors_naming_the_path(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="nope.safetensors"):
        load_matting_head(missing)
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"text\.safetensors.*not a matting head"):
        load_matting_head(text)
    plain = tmp_path / "plain.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 128, 3, 3)}, str(plain))
    with pytest.raises(UserError, match=r"plain\.safetensors.*lacks format"):
        load_matting_head(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other), metadata={"format": "something-else", "format_version": "1",
                                                            "vae_family": "sd1", "tap_point": TAP_POINT,
                                                            "config": "{}"})
    with pytest.raises(UserError, match="something-else"):
        load_matting_head(other)
    good = save_matting_head(tmp_path / "good.safetensors", MattingHead())
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del sd["conv2.bias"]
    partial = tmp_path / "partial.safetensors"
    save_file(sd, str(partial), metadata=meta)
    with pytest.raises(UserError, match=r"partial\.safetensors.*conv2\.bias"):
        load_matting_head(partial)
    sd["conv2.bias"] = torch.zeros(2)
    wrong = tmp_path / "wrong.safetensors"
    save_file(sd, str(wrong), metadata=meta)
    with pytest.raises(UserError, match=r"wrong\.safetensors.*conv2\.bias"):
        load_matting_head(wrong)


def test_mask_metrics_against_hand_values():
    a = torch.tensor([[[0.0, 1.0], [1.0, 0.5]]])
    p = torch.tensor([[[0.2, 0.9], [0.4, 0.5]]])
    m = mask_metrics(p, a)
    # thresholded at 0.5: pred (0,1,0,1), gt (0,1,1,1): intersection 2, union 3
    assert m["iou"] == pytest.approx(2 / 3)
    assert m["sad"] == pytest.approx((0.2 + 0.1 + 0.6 + 0.0) / 1000)
    assert m["mad"] == pytest.approx(0.9 / 4)


# ------------------------------------------------------------------------------------------- training
def test_training_improves_held_out_iou_and_sad(tmp_path):
    vae = small_vae(seed=0)
    train_items = procedural_items(12, size=96, seed=0)
    val_items = procedural_items(3, size=96, seed=100)
    cfg = TrainConfig(steps=60, batch_size=2, lr=3e-3, resolution=32, log_every=20, save_every=0,
                      val_count=8, seed=0)
    logs = []
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_matting_head(vae, train_items, val_items, cfg, tmp_path, log=logs.append)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    ini, fin, losses = res["initial"], res["final"], res["losses"]
    print(json.dumps({"initial": ini, "final": fin, "wall_s": round(elapsed, 1), "cpu_s": round(cpu, 1),
                      "loss_first3": float(np.mean(losses[:3])), "loss_last20": float(np.mean(losses[-20:]))}))
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:3])
    assert fin["sad"] < 0.75 * ini["sad"]
    assert fin["iou"] > ini["iou"] + 0.1
    # the exported file is a loadable head with the training metrics in its metadata
    head, info = load_matting_head(res["export"])
    assert json.loads(info.metadata["val_final"])["iou"] == pytest.approx(fin["iou"])
    assert (tmp_path / "log.jsonl").is_file() and (tmp_path / "checkpoint" / "train_state.pt").is_file()


def test_resume_continues_bit_for_bit(tmp_path):
    vae = small_vae(seed=1, attention=False)
    items = procedural_items(4, size=64, seed=7)
    base = dict(batch_size=2, lr=2e-3, resolution=16, log_every=1, val_count=2, seed=3)
    full = train_matting_head(vae, items, items, TrainConfig(steps=4, save_every=0, **base), tmp_path / "a",
                              log=lambda *_: None)
    train_matting_head(vae, items, items, TrainConfig(steps=2, save_every=0, **base), tmp_path / "b",
                       log=lambda *_: None)
    resumed = train_matting_head(vae, items, items, TrainConfig(steps=4, save_every=0, **base), tmp_path / "b",
                                 resume="auto", log=lambda *_: None)
    assert resumed["losses"] == full["losses"][2:]
    ha, _ = load_matting_head(full["export"])
    hb, _ = load_matting_head(resumed["export"])
    for (k, va), vb in zip(ha.state_dict().items(), hb.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(UserError, match=r"--resume: .*checkpoint.* not found"):
        train_matting_head(vae, items, items, TrainConfig(steps=1, **base), tmp_path / "c", resume="auto")


def test_cli_train_matting_head_from_a_diffusers_folder_and_data_folders(tmp_path, capsys):
    from diffusion_matting.py.imageio import save_gray, save_rgb, save_rgba

    vae = small_vae(seed=2, attention=False)
    vae.save_pretrained(tmp_path / "vae")
    # a case folder (alpha + fg) and an RGBA cutout, as the data loader accepts them
    alpha, fg = procedural_items(1, size=64, seed=4)[0].alpha, procedural_items(1, size=64, seed=4)[0].fg
    case = tmp_path / "data" / "case0"
    case.mkdir(parents=True)
    save_gray(case / "alpha.png", torch.from_numpy(alpha))
    save_rgb(case / "fg.png", torch.from_numpy(fg))
    cut = tmp_path / "cutouts"
    cut.mkdir()
    save_rgba(cut / "c.png", torch.from_numpy(fg), torch.from_numpy(alpha))
    items = load_matte_items([tmp_path / "data", cut])
    assert len(items) == 2 and np.abs(items[0].alpha - items[1].alpha).max() < 1 / 255
    out = tmp_path / "out"
    argv = ["train", "matting-head", "--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "data"), str(cut),
            "--procedural", "2", "--out", str(out), "--steps", "2", "--batch-size", "2", "--resolution", "16",
            "--log-every", "1", "--val-count", "2"]
    assert cli.main(argv) == 0
    head, info = load_matting_head(out / "matting_head.safetensors")
    assert info.vae_family == "sd1" and info.config.in_channels == 128
    resume = [a if a != "2" or argv[i - 1] != "--steps" else "3" for i, a in enumerate(argv)] + ["--resume"]
    assert cli.main(resume) == 0
    assert "resumed from" in capsys.readouterr().out
    assert read_matting_head_metadata(out / "checkpoint" / "head.safetensors")["train_step"] == "3"
    # user errors -> exit 2 with one line
    assert cli.main(["train", "matting-head", "--vae", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert cli.main(["train", "matting-head", "--vae", str(tmp_path / "vae"), "--out", str(out),
                     "--resolution", "30"]) == 2
    with pytest.raises(UserError, match="no matting samples"):
        load_matte_items([tmp_path / "vae"])
    assert load_vae(tmp_path / "vae").config.latent_channels == 4
