"""Latent transparency decoder (DRIP sec. 3.4): exact zero-init identity, trimap handling, file format,
loss maths against direct computations, tiling, and a CPU training run of the toolkit on procedural data
with a small (random-weight) diffusers AutoencoderKL of the real architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import ndimage

from diffusion_matting.py import transparency_decoder as TD
from diffusion_matting.py.errors import UserError

@pytest.fixture(autouse=True)
def one_thread():
    """These tests run single-threaded (restored after): on a busy 2-core box, two OpenMP threads fighting
    other processes made the small convs here up to ~10x slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(base_channels=16, channel_mult=(1, 2, 2, 2), hint_channels=16)


def _inputs(b=2, h=64, w=96, seed=0, lat=4, stride=8):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g)
    fg = torch.rand(b, 3, h, w, generator=g) * 1.2 - 0.1  # VAE decodes can overshoot 0..1 slightly
    alpha = torch.rand(b, 1, h, w, generator=g) * 1.2 - 0.1
    lh, lw = -(-h // stride), -(-w // stride)
    z_f = torch.randn(b, lat, lh, lw, generator=g) * 5
    z_a = torch.randn(b, lat, lh, lw, generator=g) * 5
    return image, fg, alpha, z_f, z_a


def _trimap(b, h, w):
    t = torch.full((b, 1, h, w), 0.5)
    t[..., : h // 4, :] = 0.0
    t[..., -h // 4:, :] = 1.0
    return t


def _randomise_output(model, std=0.05, seed=1):
    """Give the zero-initialised convs (output, latent hints) non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (model.conv_out, model.hint_fg.zero, model.hint_alpha.zero):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------ zero init
def test_zero_init_decoder_is_exactly_the_plain_decode():
    torch.manual_seed(0)
    model = TD.TransparencyDecoder().eval()  # the shipped default config (attention on)
    assert float(model.conv_out.weight.detach().abs().sum()) == 0.0
    assert not model.hint_fg.zero.weight.any() and not model.hint_alpha.zero.weight.any()
    assert bool(model.conv_in.weight.any())  # the rest is initialised normally
    image, fg, alpha, z_f, z_a = _inputs()
    unknown = torch.full_like(alpha, 0.5)
    with torch.no_grad():
        delta = model.residual(image, unknown, fg, alpha, z_f, z_a)
        out_f, out_a = model(image, unknown, fg, alpha, z_f, z_a)
    assert torch.equal(delta, torch.zeros_like(delta))
    plain_f, plain_a = TD.plain_decode(fg, alpha)
    assert torch.equal(out_f, plain_f) and torch.equal(out_a, plain_a)
    # any size, tiled, with flip TTA: still exactly the plain decode
    crop = (slice(0, 1), slice(None), slice(0, 61), slice(0, 90))
    tf, ta = TD.decode_tiled(model, image[crop], unknown[crop], fg[crop], alpha[crop], z_f[:1], z_a[:1], tile=48,
                             overlap=16, flip_tta=True)
    assert torch.equal(tf, plain_f[crop]) and torch.equal(ta, plain_a[crop])


def test_known_trimap_regions_are_respected():
    torch.manual_seed(0)
    model = _randomise_output(TD.TransparencyDecoder(TD.TransparencyDecoderConfig(**SMALL)), std=0.5).eval()
    image, fg, alpha, z_f, z_a = _inputs()
    tri = _trimap(*alpha.shape[:1], *alpha.shape[2:])
    with torch.no_grad():
        f, a = model(image, tri, fg, alpha, z_f, z_a)
        delta = model.residual(image, tri, fg, alpha, z_f, z_a)
    assert float(delta.abs().mean()) > 0.05  # the decoder does change things
    assert torch.all(a[tri == 1.0] == 1.0) and torch.all(a[tri == 0.0] == 0.0)
    unk = (tri == 0.5).expand_as(a)
    assert torch.equal(a[unk], (alpha + delta[:, 3:4]).clamp(0, 1)[unk])
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    assert torch.equal(f, (fg + delta[:, :3]).clamp(0, 1))
    # trimap encodings: 0/0.5/1 thresholds (< 0.1 bg, > 0.9 fg)
    t = torch.tensor([[[[0.05, 0.5, 0.95]]]])
    assert TD.enforce_trimap(torch.full_like(t, 0.3), t).flatten().tolist() == pytest.approx([0.0, 0.3, 1.0])


def test_operations_argument_builds_every_layer():
    made = []

    class Ops:
        class Conv2d(nn.Conv2d):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append("conv")

        class LayerNorm(nn.LayerNorm):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append("norm")

    model = TD.TransparencyDecoder(TD.TransparencyDecoderConfig(**SMALL), operations=Ops)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert leaves and all(isinstance(m, (Ops.Conv2d, Ops.LayerNorm)) for m in leaves)
    assert made.count("conv") == sum(isinstance(m, nn.Conv2d) for m in leaves)


def test_config_validation_and_sizes():
    cfg = TD.TransparencyDecoderConfig(channel_mult=(1, 2, 4, 4, 8))
    assert cfg.multiple == 16 and cfg.inject_level == 3
    assert TD.TransparencyDecoderConfig(channel_mult=(1, 2)).inject_level == 1
    with pytest.raises(UserError, match="attention_heads"):
        TD.TransparencyDecoderConfig(base_channels=12, channel_mult=(1,), attention_heads=5)
    with pytest.raises(UserError, match="unknown config keys"):
        TD.TransparencyDecoderConfig.from_json(json.dumps({"base_chanels": 8}))
    model = TD.TransparencyDecoder(TD.TransparencyDecoderConfig(**SMALL))
    image, fg, alpha, z_f, z_a = _inputs(h=60, w=90)
    with pytest.raises(UserError, match="multiple of 8"):
        model(image, torch.full_like(alpha, 0.5), fg, alpha, z_f, z_a)
    with pytest.raises(UserError, match="does not cover"):
        TD.decode_tiled(model, image, None, fg, alpha, z_f[..., :6, :], z_a[..., :6, :])


# ------------------------------------------------------------------------------------ file format
def test_safetensors_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    cfg = TD.TransparencyDecoderConfig(**SMALL, attention=False)
    model = _randomise_output(TD.TransparencyDecoder(cfg)).eval()
    path = TD.save_decoder(model, tmp_path / "dec.safetensors", vae_family="sd15", extra={"steps": 7})
    loaded, meta = TD.load_decoder(path)
    assert meta["format"] == TD.FORMAT_NAME and meta["format_version"] == "1" and meta["vae_family"] == "sd15"
    assert json.loads(meta["steps"]) == 7
    assert loaded.config == cfg
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    image, fg, alpha, z_f, z_a = _inputs()
    tri = torch.full_like(alpha, 0.5)
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(model(image, tri, fg, alpha, z_f, z_a),
                                                     loaded(image, tri, fg, alpha, z_f, z_a)))
    assert path.read_bytes()[:8] != b"\x80\x04\x95" and b"PK" != path.read_bytes()[:2]  # not a pickle / zip

    from safetensors.torch import save_file

    with pytest.raises(UserError, match="not found: .*nope.safetensors"):
        TD.load_decoder(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="junk.safetensors: not a readable safetensors"):
        TD.load_decoder(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"x": "y"})
    with pytest.raises(UserError, match="foreign.safetensors: missing metadata format"):
        TD.load_decoder(foreign)
    partial = tmp_path / "partial.safetensors"
    state = {k: v for k, v in sd0.items() if not k.startswith("conv_out")}
    save_file(state, str(partial), metadata={"format": TD.FORMAT_NAME, "format_version": "1",
                                             "config": cfg.to_json()})
    with pytest.raises(UserError, match=r"partial.safetensors: .*2 missing tensors.*conv_out"):
        TD.load_decoder(partial)
    noconf = tmp_path / "noconf.safetensors"
    save_file(sd0, str(noconf), metadata={"format": TD.FORMAT_NAME, "format_version": "1"})
    with pytest.raises(UserError, match="noconf.safetensors: missing metadata 'config'"):
        TD.load_decoder(noconf)


# ------------------------------------------------------------------------------------------ losses
def test_l1_l2_against_direct_sums():
    g = torch.Generator().manual_seed(3)
    p, t = torch.rand(2, 3, 9, 11, generator=g), torch.rand(2, 3, 9, 11, generator=g)
    w = torch.rand(2, 1, 9, 11, generator=g)
    pn, tn, wn = p.numpy().astype(np.float64), t.numpy().astype(np.float64), w.numpy().astype(np.float64)
    assert float(TD.l1_loss(p, t)) == pytest.approx(np.abs(pn - tn).mean(), rel=1e-5)
    assert float(TD.l2_loss(p, t)) == pytest.approx(((pn - tn) ** 2).mean(), rel=1e-5)
    assert float(TD.l1_loss(p, t, w)) == pytest.approx((wn * np.abs(pn - tn)).sum() / (3 * wn.sum()), rel=1e-5)
    assert float(TD.l2_loss(p, t, w)) == pytest.approx((wn ** 2 * (pn - tn) ** 2).sum() / (3 * wn.sum()), rel=1e-5)
    ones = torch.ones_like(w)
    assert float(TD.l1_loss(p, t, ones)) == pytest.approx(float(TD.l1_loss(p, t)), rel=1e-6)


def test_laplacian_pyramid_and_loss_known_cases():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 2, 64, 48, generator=g)
    bands = TD.laplacian_pyramid(x, 5)
    assert [tuple(b.shape[-2:]) for b in bands] == [(64, 48), (32, 24), (16, 12), (8, 6), (4, 3)]
    # the bands reconstruct the image exactly (collapse the pyramid from the coarsest level)
    rec = bands[-1]
    for band in reversed(bands[:-1]):
        rec = band + torch.nn.functional.interpolate(rec, size=band.shape[-2:], mode="bilinear", align_corners=False)
    assert torch.allclose(rec, x, atol=1e-6)
    # a constant offset c lives only in the low-pass residual: loss = 2^(K-1) * c
    c = 0.125
    assert float(TD.laplacian_loss(x + c, x, levels=5)) == pytest.approx(16 * c, rel=1e-4)
    assert float(TD.laplacian_loss(x + c, x, levels=3)) == pytest.approx(4 * c, rel=1e-4)
    # G_1 is the separable binomial blur, subsampled (independent scipy computation)
    k = np.array([1, 4, 6, 4, 1]) / 16.0
    ref = ndimage.correlate1d(ndimage.correlate1d(x.numpy()[0, 0].astype(np.float64), k, axis=0, mode="nearest"),
                              k, axis=1, mode="nearest")[::2, ::2]
    assert np.allclose(TD.laplacian_pyramid(x, 2)[1].numpy()[0, 0], ref, atol=1e-6)  # G_1 = low-pass residual
    # weighted: premultiplied by w, normalised by mean(w); w = 1 gives the plain loss
    w = torch.rand(1, 1, 64, 48, generator=g)
    y = torch.rand_like(x)
    assert float(TD.laplacian_loss(x, y, torch.ones_like(w))) == pytest.approx(float(TD.laplacian_loss(x, y)), rel=1e-6)
    assert float(TD.laplacian_loss(x, y, w)) == pytest.approx(float(TD.laplacian_loss(w * x, w * y)) / float(w.mean()),
                                                              rel=1e-5)


def test_gradient_loss_against_scipy_sobel():
    g = torch.Generator().manual_seed(5)
    p, t = torch.rand(1, 1, 20, 17, generator=g), torch.rand(1, 1, 20, 17, generator=g)
    pn, tn = p.numpy()[0, 0].astype(np.float64), t.numpy()[0, 0].astype(np.float64)
    sx = lambda a: ndimage.sobel(a, axis=1, mode="nearest") / 8.0  # noqa: E731
    sy = lambda a: ndimage.sobel(a, axis=0, mode="nearest") / 8.0  # noqa: E731
    ref = np.abs(sx(pn) - sx(tn)).mean() + np.abs(sy(pn) - sy(tn)).mean()
    assert float(TD.gradient_loss(p, t)) == pytest.approx(ref, rel=1e-5)
    # a ramp of slope s against a flat target: |gx| = s inside, gy = 0
    s = 0.03
    ramp = (torch.arange(17, dtype=torch.float32) * s).view(1, 1, 1, 17).expand(1, 1, 20, 17)
    gx, gy = TD.sobel(ramp)
    assert torch.allclose(gx[..., 1:-1], torch.full_like(gx[..., 1:-1], s), atol=1e-6) and float(gy.abs().max()) < 1e-6


def test_decoder_loss_sums_terms_and_ignores_undefined_colour():
    g = torch.Generator().manual_seed(6)
    pf, gf = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    pa, ga = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    ga[..., :, :10] = 0.0
    total, parts = TD.decoder_loss(pf, pa, gf, ga)
    assert float(total) == pytest.approx(sum(parts.values()), rel=1e-5)
    assert parts["alpha_l1"] == pytest.approx(float((pa - ga).abs().mean()), rel=1e-6)
    total2, parts2 = TD.decoder_loss(pf, pa, gf, ga, weights=TD.LossWeights(laplacian=0.0, foreground=2.0))
    expect = sum(v * (2.0 if k.startswith("fg") else 1.0) for k, v in parts.items() if not k.endswith("lap"))
    assert float(total2) == pytest.approx(expect, rel=1e-5)
    # foreground colour where gt alpha = 0 is undefined: changing it changes no term
    pf2 = pf.clone()
    pf2[..., :, :10] = torch.rand(2, 3, 32, 10, generator=g)
    assert float(TD.decoder_loss(pf2, pa, gf, ga)[0]) == pytest.approx(float(total), rel=1e-6)


# ------------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("attention,tol", [(False, 0.03), (True, 0.1)])
def test_tiled_matches_untiled(attention, tol):
    torch.manual_seed(0)
    model = _randomise_output(TD.TransparencyDecoder(TD.TransparencyDecoderConfig(**SMALL, attention=attention)),
                              std=0.05).eval()
    image, fg, alpha, z_f, z_a = _inputs(b=1, h=150, w=200, seed=2)
    tri = torch.full_like(alpha, 0.5)
    whole_f, whole_a = TD.decode_tiled(model, image, tri, fg, alpha, z_f, z_a, tile=0)
    tiled_f, tiled_a = TD.decode_tiled(model, image, tri, fg, alpha, z_f, z_a, tile=96, overlap=48)
    assert TD.tile_count(150, 200, model.config, 96, 48) > 4
    plain_f, plain_a = TD.plain_decode(fg, alpha)
    change = float((whole_a - plain_a).abs().mean())
    assert change > 0.01  # the residual is not negligible
    err_a, err_f = float((tiled_a - whole_a).abs().mean()), float((tiled_f - whole_f).abs().mean())
    assert err_a < tol * change and err_f < tol * change, (err_a, err_f, change)
    assert float((tiled_a - whole_a).abs().max()) < 0.25


def test_flip_tta_is_the_average_of_both_passes():
    torch.manual_seed(0)
    model = _randomise_output(TD.TransparencyDecoder(TD.TransparencyDecoderConfig(**SMALL)), std=0.05).eval()
    image, fg, alpha, z_f, z_a = _inputs(b=1, h=64, w=64, seed=3)
    fg, alpha = fg.clamp(0.2, 0.8), alpha.clamp(0.2, 0.8)  # keep the sums away from the clamp
    tri = torch.full_like(alpha, 0.5)
    f, a = TD.decode_tiled(model, image, tri, fg, alpha, z_f, z_a, tile=0, flip_tta=True)
    with torch.no_grad():
        d0 = model.residual(image, tri, fg, alpha, z_f, z_a)
        d1 = model.residual(*(t.flip(-1) for t in (image, tri, fg, alpha, z_f, z_a))).flip(-1)
    ref_a = (alpha + 0.5 * (d0 + d1)[:, 3:4]).clamp(0, 1)
    assert torch.allclose(a, ref_a, atol=1e-6)
    assert float((d0 - d1).abs().mean()) > 1e-3  # the flipped pass really differs


# ------------------------------------------------------------------------------------------ training
def _tiny_vae(folder):
    """A diffusers AutoencoderKL of the real SD architecture (4 levels, 8x, 4 latent channels, mid attention),
    narrow and with random weights, saved as a diffusers folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4)
    vae.save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_training_beats_the_plain_vae_decode(tmp_path):
    pytest.importorskip("accelerate")
    from diffusion_matting.py import train_transparency_decoder as T

    vae_dir = _tiny_vae(tmp_path / "vae")
    opts = T.TrainOptions(vae=str(vae_dir), out=str(tmp_path / "run"), procedural=24, procedural_size=96, crop=64,
                          batch=4, steps=200, lr=2e-3, warmup=20, val=8, val_size=64, log_every=100, save_every=0,
                          unknown_trimap_prob=0.05, quiet=True, cpu=True, seed=0,
                          config=dict(base_channels=16, channel_mult=(1, 2, 2, 2), hint_channels=16))
    summary = T.train(opts)
    plain, initial, final = summary["plain"], summary["initial"], summary["final"]
    print(json.dumps(summary))
    # untrained = plain decode exactly (zero init), on the held-out crops
    assert initial == plain
    # Measured (seed 0, 200 steps of batch 4, 64 px crops, one CPU thread, ~35-60 s): alpha SAD (/1000 per 64x64
    # crop) 0.864 -> 0.453 (0.52x), alpha-weighted fg MSE 0.0584 -> 0.0259 (0.44x). With a random-weight VAE the
    # plain decode is nearly flat grey, so this is mostly the decoder learning to matte from the image, trimap and
    # latents; thresholds leave room for run-to-run float differences.
    assert final["alpha_sad"] < 0.7 * plain["alpha_sad"], summary
    assert final["fg_mse"] < 0.6 * plain["fg_mse"], summary
    # the exported file is what the loader reads, and reproduces the reported numbers
    model, meta = TD.load_decoder(summary["export"])
    assert meta["format"] == TD.FORMAT_NAME and json.loads(meta["steps"]) == 200
    vae = T.load_vae(vae_dir)
    val = T._validation_set(opts, vae, torch.device("cpu"))
    again = T.evaluate(model, val)
    assert again["alpha_sad"] == pytest.approx(final["alpha_sad"], rel=1e-4)
    assert again["fg_mse"] == pytest.approx(final["fg_mse"], rel=1e-4)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [100, 200]


def test_cli_trains_resumes_and_exports(tmp_path):
    pytest.importorskip("accelerate")
    from diffusion_matting.py import cli

    vae_dir = _tiny_vae(tmp_path / "vae")
    out = tmp_path / "run"
    common = ["train", "transparency-decoder", "--vae", str(vae_dir), "--out", str(out), "--procedural", "2",
              "--procedural-size", "64", "--crop", "32", "--batch", "1", "--val", "1", "--cpu",
              "--base-channels", "8", "--channel-mult", "1,2", "--no-attention", "--vae-family", "tiny"]
    assert cli.main(common + ["--steps", "2", "--save-every", "1"]) == 0
    first = TD.load_decoder(out / "transparency_decoder.safetensors")[0]
    assert first.config.channel_mult == (1, 2) and first.config.attention is False
    # latent scale "auto" = 1 / std of the training latents (this random VAE's are ~0.3, SD's ~5.5 -> 0.18)
    assert 1.5 < first.config.latent_scale < 10
    assert cli.main(common + ["--steps", "3", "--resume", "--latent-scale", "vae"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [2, 3]  # resumed at step 2, ran only step 3
    model, meta = TD.load_decoder(out / "transparency_decoder.safetensors")
    assert meta["vae_family"] == "tiny" and json.loads(meta["steps"]) == 3
    assert model.config == first.config  # a resumed run keeps its own config
    # bad input is a one-line user error (exit code 2)
    assert cli.main(["train", "transparency-decoder", "--vae", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert cli.main(common + ["--steps", "1", "--stage", "B"]) == 2  # stage B without --drip


def test_stage_b_trains_on_drip_samples(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from diffusion_matting.py import train_transparency_decoder as T
    from diffusion_matting.py.drip import model as M
    from diffusion_matting.py.drip import sampling as S
    from diffusion_matting.py.drip.checkpoint import save_drip

    torch.manual_seed(0)
    unet = M.convert_base_to_drip(M.build_unet(M.base_config("sd15", tiny=True)))
    drip_path = tmp_path / "drip.safetensors"
    save_drip(drip_path, unet.state_dict(), unet.config, base_family="sd15", prediction_type="epsilon",
              text_embedding=torch.randn(1, 77, 768))
    vae_dir = _tiny_vae(tmp_path / "vae")
    calls = []
    real = S.drip_sample_reference

    def spy(unet, zi, zt, noise, scheduler, steps, *a, **k):
        calls.append((steps, tuple(zi.shape), tuple(noise.shape)))
        return real(unet, zi, zt, noise, scheduler, steps, *a, **k)

    monkeypatch.setattr(S, "drip_sample_reference", spy)
    opts = T.TrainOptions(vae=str(vae_dir), out=str(tmp_path / "b"), procedural=2, procedural_size=64, crop=64, batch=2,
                          steps=4, stage="B", drip=str(drip_path), drip_steps=(1, 3), val=0, save_every=0, quiet=True,
                          cpu=True, config=dict(base_channels=8, channel_mult=(1, 2), attention=False))
    summary = T.train(opts)
    assert len(calls) == 4 and {c[0] for c in calls} <= {1, 2, 3} and len({c[0] for c in calls}) > 1
    assert all(c[1] == (2, 4, 8, 8) and c[2] == (4, 4, 8, 8) for c in calls)  # interleaved fg/alpha noise
    model, meta = TD.load_decoder(summary["export"])
    assert meta["stage"] == "B"
    with pytest.raises(UserError, match="config.json"):  # not a DRIP checkpoint: the DRIP loader's one-line error
        T.train(T.TrainOptions(**{**opts.__dict__, "drip": str(vae_dir / "config.json"), "out": str(tmp_path / "c")}))


def _to_ldm(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> original LDM (CompVis) keys, written out independently of diffusers."""
    import re

    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", n)
        n = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", n)
        n = n.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace(".conv_shortcut.", ".nin_shortcut.")
        for a, b in ((".attn_1.group_norm.", ".attn_1.norm."), (".attn_1.to_q.", ".attn_1.q."),
                     (".attn_1.to_k.", ".attn_1.k."), (".attn_1.to_v.", ".attn_1.v."),
                     (".attn_1.to_out.0.", ".attn_1.proj_out.")):
            n = n.replace(a, b)
        if ".attn_1." in n and n.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM attention projections are 1x1 convs
        out["first_stage_model." + n] = v
    return out


def test_ldm_single_file_vae_loads_like_the_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from diffusion_matting.py import train_transparency_decoder as T

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4)
    sd = _to_ldm(ref.state_dict(), 4)
    sd["model.diffusion_model.dummy"] = torch.zeros(1)  # a full SD checkpoint carries other parts too
    save_file(sd, str(tmp_path / "ckpt.safetensors"))
    vae = T.load_vae(tmp_path / "ckpt.safetensors", scaling_factor=0.5)
    assert vae.scaling_factor == 0.5 and vae.stride == 8 and vae.latent_channels == 4
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        z_ref = ref.encode(x * 2 - 1).latent_dist.mean
        d_ref = ((ref.decode(z_ref).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(vae.encode(x), z_ref, atol=1e-5) and torch.allclose(vae.decode(z_ref), d_ref, atol=1e-5)
    with pytest.raises(UserError, match="pickled"):
        T.load_vae(tmp_path / "vae.ckpt") if (tmp_path / "vae.ckpt").write_bytes(b"x") else None
    with pytest.raises(UserError, match="not an LDM VAE"):
        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        T.load_vae(tmp_path / "other.safetensors")


def test_folder_data_layouts(tmp_path):
    from diffusion_matting.py import train_transparency_decoder as T
    from diffusion_matting.py.imageio import save_gray, save_rgb
    from diffusion_matting.py.samples import make_sample

    s = make_sample(48, 48, seed=5, style="pure")
    case = tmp_path / "cases" / "a"
    case.mkdir(parents=True)
    save_rgb(case / "image.png", torch.from_numpy(s.image))
    save_gray(case / "alpha.png", torch.from_numpy(s.alpha))
    save_rgb(case / "fg.png", torch.from_numpy(s.fg))
    flat = tmp_path / "flat"
    for sub in ("image", "alpha"):
        (flat / sub).mkdir(parents=True)
    save_rgb(flat / "image" / "x.png", torch.from_numpy(s.image))
    save_gray(flat / "alpha" / "x.png", torch.from_numpy(s.alpha))
    src = T.FolderSource([str(tmp_path / "cases"), str(flat)], pad_iters=5)
    assert len(src) == 2
    rng = np.random.default_rng(0)
    with_fg, without_fg = src.get(0, rng), src.get(1, rng)
    assert np.allclose(with_fg.alpha, s.alpha, atol=1 / 255) and with_fg.fg_weight.min() == 1.0
    defined = s.alpha > 0.01
    assert np.abs(with_fg.fg - s.fg)[defined].max() < 2 / 255  # padding only touches alpha = 0 pixels
    # no fg file: the image is the target, trusted only where (nearly) opaque
    assert set(np.unique(without_fg.fg_weight)) <= {0.0, 1.0}
    assert np.array_equal(without_fg.fg_weight > 0, without_fg.alpha >= 0.99)
    img, a, fg, fw = T.Batcher([src], 32).batch(3, rng)
    assert img.shape == (3, 3, 32, 32) and a.shape == fw.shape == (3, 1, 32, 32)
    with pytest.raises(UserError, match="no image\\+alpha pairs"):
        T.FolderSource([str(tmp_path / "cases" / "a")])
