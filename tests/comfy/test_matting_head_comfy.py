"""Tier 2: the DiffuMatting matting head on ComfyUI's own VAE (comfy.sd.VAE, LDM Decoder), CPU.

VAEs: random-weight diffusers ``AutoencoderKL`` in the SD1.x/SD2.x/SDXL architecture (ch 128, mult
1-2-4-4, 2 res blocks, 4 latent channels, quant convs; SD1.5 and SDXL VAEs share this architecture) and in
the SD3/Flux layout (16 latent channels, no quant convs), handed to ``comfy.sd.VAE(sd=...)``, which
converts the diffusers keys and builds its own LDM decoder. Latents 8x8 (64 px).
"""

from __future__ import annotations


import pytest
import torch

import harness

pytest.importorskip("diffusers")

PX, LAT = 64, 8


def _diffusers_vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    quant = latent_channels == 4
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                         latent_channels=latent_channels, use_quant_conv=quant, use_post_quant_conv=quant).eval()


@pytest.fixture(scope="module")
def env(comfy):
    import comfy.sd as comfy_sd

    from diffusion_matting.py.matting_head import MattingHead, save_matting_head

    out = {"m": dict(comfy.node_class_mappings)}
    if "DM_VAEDecodeWithMatte" not in out["m"]:  # pack import failed: test_pack_loads reports why
        import importlib
        mod = importlib.import_module("diffusion_matting.nodes.matting_head")
        out["m"].update({cls.GET_SCHEMA().node_id: cls for cls in mod.NODES})
    for name, ch, seed in (("sd", 4, 0), ("flux", 16, 1)):
        dvae = _diffusers_vae(ch, seed)
        out[name] = {"diffusers": dvae, "comfy": comfy_sd.VAE(sd=dvae.state_dict()), "ch": ch}
    torch.manual_seed(5)
    head = MattingHead().eval()
    with torch.no_grad():
        head.conv2.weight.mul_(20)  # real dynamic range for the comparisons
    out["head"] = head
    save_matting_head(harness.model_path("matting_heads", "mh_test.safetensors"), head, "sd1")
    harness.refresh_file_lists()
    return out


def _latents(ch, seed=0, batch=2):
    return torch.randn(batch, ch, LAT, LAT, generator=torch.Generator().manual_seed(seed))


def _features_module():
    from diffusion_matting.nodes import _vae_features
    return _vae_features


@pytest.mark.parametrize("fam", ["sd", "flux"])
def test_comfy_decode_with_features_is_vae_decode(env, fam):
    vf = _features_module()
    vae, dvae = env[fam]["comfy"], env[fam]["diffusers"]
    z = _latents(env[fam]["ch"])
    with torch.no_grad():
        ref = vae.decode(z)
        image, feat = vf.comfy_decode_with_features(vae, z)
        assert torch.equal(image, ref)
        assert feat.shape == (2, 128, PX, PX)
        # the feature is what enters norm_out (give_pre_end): finishing the decoder reproduces the image
        dec = vae.first_stage_model.decoder
        rest = dec.conv_out(torch.nn.functional.silu(dec.norm_out(feat)))
        assert torch.equal(vae.process_output(rest.float()).movedim(1, -1), ref)
        # and it is the same tensor diffusers taps (conv_norm_out input): heads trained with diffusers apply
        from diffusion_matting.py.matting_head import decode_with_features_diffusers
        rgb_d, feat_d = decode_with_features_diffusers(dvae, z)
        assert torch.allclose(feat_d, feat, rtol=1e-4, atol=1e-4 * float(feat.abs().max()))
        assert torch.allclose(((rgb_d + 1) / 2).clamp(0, 1).movedim(1, -1), ref, atol=1e-4)


def test_ldm_single_file_vae_loads_for_training(env, tmp_path):
    from safetensors.torch import save_file

    from diffusion_matting.py import cli
    from diffusion_matting.py.matting_head import decode_with_features_diffusers, read_matting_head_metadata
    from diffusion_matting.py.train_matting_head import guess_vae_family, load_vae

    vae = env["sd"]["comfy"]
    ldm = {k: v.contiguous() for k, v in vae.first_stage_model.state_dict().items()}
    assert "decoder.mid.attn_1.q.weight" in ldm  # LDM keys, as in models/vae files
    path = tmp_path / "random_sdxl_vae.safetensors"
    save_file(ldm, str(path))
    loaded = load_vae(path)
    assert guess_vae_family(loaded, path) == "sdxl"
    orig = env["sd"]["diffusers"].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(orig)
    for k in orig:
        assert torch.equal(got[k], orig[k]), k
    z = _latents(4, seed=3, batch=1)
    with torch.no_grad():
        _, feat = decode_with_features_diffusers(loaded, z)
        _, feat_c = _features_module().comfy_decode_with_features(vae, z)
    assert torch.allclose(feat, feat_c, rtol=1e-4, atol=1e-4 * float(feat.abs().max()))
    out = tmp_path / "out"
    assert cli.main(["train", "matting-head", "--vae", str(path), "--procedural", "2", "--out", str(out),
                     "--steps", "1", "--batch-size", "1", "--resolution", "32", "--val-count", "1"]) == 0
    assert read_matting_head_metadata(out / "matting_head.safetensors")["vae_family"] == "sdxl"


def test_loader_node_lists_loads_and_names_missing_paths(env):
    loader = env["m"]["DM_MattingHeadLoader"]
    options = loader.GET_SCHEMA().inputs[0].options
    assert "mh_test.safetensors" in options
    mh = loader.execute(head_name="mh_test.safetensors").result[0]
    x = torch.randn(1, 128, 6, 6)
    with torch.no_grad():
        assert torch.allclose(mh(x), env["head"](x), atol=1e-6)
    assert mh.info.vae_family == "sd1"
    expected = str(harness.model_path("matting_heads", "missing.safetensors"))
    with pytest.raises(ValueError) as exc:  # the pack's UserError (ComfyUI loads its own copy of the module)
        loader.execute(head_name="missing.safetensors")
    assert type(exc.value).__name__ == "UserError" and expected in str(exc.value)
    assert loader.GET_SCHEMA().category == "matting/diffumatting"


def test_decode_node_with_head_untiled_and_tiled(env):
    vf = _features_module()
    m = env["m"]
    vae = env["sd"]["comfy"]
    mh = m["DM_MattingHeadLoader"].execute(head_name="mh_test.safetensors").result[0]
    z = _latents(4, seed=1)
    image, alpha, how = m["DM_VAEDecodeWithMatte"].execute(samples={"samples": z}, vae=vae, matting_head=mh,
                                                           tile_size=0, overlap=64).result
    with torch.no_grad():
        ref = vae.decode(z)
        _, feat = vf.comfy_decode_with_features(vae, z)
        expect = env["head"](feat)[:, 0]
    assert torch.equal(image, ref)
    assert alpha.shape == (2, PX, PX) and torch.allclose(alpha, expect, atol=1e-6)
    assert "matting head 'mh_test.safetensors'" in how and "GreenPost" not in how
    assert float(alpha.std()) > 0.1
    assert not alpha.requires_grad and not image.requires_grad
    # tiled: 48 px tiles (6 latent px) with 16 px overlap -> 2 x 2 tiles per image, GroupNorm statistics
    # shared across tiles: equal to the untiled decode up to float rounding (alpha < 1e-3, observed ~1e-6)
    t_image, t_alpha, t_how = m["DM_VAEDecodeWithMatte"].execute(samples={"samples": z}, vae=vae, matting_head=mh,
                                                                 tile_size=48, overlap=16).result
    assert t_image.shape == image.shape and t_alpha.shape == alpha.shape
    assert "decoded in 4 tiles (GroupNorm statistics shared across tiles)" in t_how
    rgb_err, a_err = float((t_image - image).abs().max()), float((t_alpha - alpha).abs().max())
    print({"tiled_rgb_max_abs": rgb_err, "tiled_alpha_max_abs": a_err})
    assert rgb_err < 1e-3 and a_err < 1e-3
    # independent tiles (what ComfyUI's own tiled decode does: per-tile GroupNorm statistics and attention)
    # are far off, so the comparison above is not vacuous
    from diffusion_matting.py.matting_head import decode_with_matte
    with torch.no_grad():
        old = decode_with_matte(z, vf.comfy_decode_fn(vae), mh, tile=6, overlap=2, shared_stats=False)
    assert float((old.matte[:, 0] - alpha).abs().mean()) > 0.01


def test_decode_node_without_head_uses_greenpost(env):
    from diffusion_matting.py.greenpost import greenpost

    m = env["m"]
    vae = env["sd"]["comfy"]
    z = _latents(4, seed=2, batch=1)
    image, alpha, how = m["DM_VAEDecodeWithMatte"].execute(samples={"samples": z}, vae=vae, tile_size=0,
                                                           overlap=64).result
    assert torch.equal(image, vae.decode(z))
    assert "GreenPost" in how and "no matting head" in how
    assert torch.allclose(alpha, greenpost(image).alpha, atol=1e-6)


def test_decode_node_rejects_mismatched_vae(env):
    m = env["m"]
    mh = m["DM_MattingHeadLoader"].execute(head_name="mh_test.safetensors").result[0]
    with pytest.raises(ValueError, match="latents"):
        m["DM_VAEDecodeWithMatte"].execute(samples={"samples": torch.zeros(1, 4, 2, 8, 8)}, vae=env["sd"]["comfy"],
                                           matting_head=mh, tile_size=0, overlap=64)


def test_workflow_through_comfyui_executor(env):
    from safetensors.torch import save_file

    vae = env["sd"]["comfy"]
    save_file({k: v.contiguous() for k, v in vae.first_stage_model.state_dict().items()},
              str(harness.model_path("vae", "mh_rand_sd.safetensors")))
    harness.refresh_file_lists()
    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": "mh_rand_sd.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": PX, "height": PX, "batch_size": 1}},
        "3": {"class_type": "DM_MattingHeadLoader", "inputs": {"head_name": "mh_test.safetensors"}},
        "4": {"class_type": "DM_VAEDecodeWithMatte", "inputs": {"samples": ["2", 0], "vae": ["1", 0],
                                                                 "matting_head": ["3", 0], "tile_size": 0,
                                                                 "overlap": 64}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    run = harness.execute(prompt, capture=["4"])
    run.raise_for_error()
    image, alpha, how = (run.output("4", i) for i in range(3))
    assert image.shape == (1, PX, PX, 3) and alpha.shape == (1, PX, PX)
    with torch.no_grad():
        ref = vae.decode(torch.zeros(1, 4, LAT, LAT))
    assert torch.allclose(image, ref, atol=1e-6)
    assert how.startswith("matting head")


def test_out_of_memory_falls_back_to_own_tiling(env, monkeypatch):
    """An OOM in the one-pass decode retries with the pack's tiling (never ComfyUI's silent fallback, which
    would fire the feature hook per tile); the result equals an explicitly tiled decode. The OOM is
    simulated in the full-resolution part (norm_out), which the shared-statistics tiling only reads
    parameters of; its latent-resolution part runs once on the whole latent."""
    import sys

    m = env["m"]
    node = m["DM_VAEDecodeWithMatte"]
    mod = sys.modules[node.__module__]
    vae = env["sd"]["comfy"]
    mh = m["DM_MattingHeadLoader"].execute(head_name="mh_test.safetensors").result[0]
    z = _latents(4, seed=4, batch=1)
    tiled = node.execute(samples={"samples": z}, vae=vae, matting_head=mh, tile_size=32, overlap=16).result
    real_decode = vae.first_stage_model.decode
    norm_out = vae.first_stage_model.decoder.norm_out
    calls, norm_calls = [], []

    def decode(x, **kw):
        calls.append(tuple(x.shape[-2:]))
        return real_decode(x, **kw)

    def oom(x):
        norm_calls.append(tuple(x.shape[-2:]))
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(vae.first_stage_model, "decode", decode)
    monkeypatch.setattr(norm_out, "forward", oom)
    monkeypatch.setattr(mod, "AUTO_TILE_PX", 32)
    monkeypatch.setattr(mod, "AUTO_OVERLAP_PX", 16)
    image, alpha, how = node.execute(samples={"samples": z}, vae=vae, matting_head=mh, tile_size=0,
                                     overlap=64).result
    assert calls == [(LAT, LAT), (LAT, LAT)] and norm_calls == [(PX, PX)]  # one-pass try, tiled prefix
    assert "after an out-of-memory fallback" in how and "9 tiles" in how
    assert torch.allclose(image, tiled[0], atol=1e-6) and torch.allclose(alpha, tiled[1], atol=1e-6)
