"""Tier 2: Load Transparency Decoder + DRIP Decode (Transparency Decoder) inside a real ComfyUI.

The VAE is ComfyUI's own ``comfy.sd.VAE`` (LDM AutoencoderKL, SD layout, shrunk, random weights); the decoder
file is written by the pack's own ``save_decoder`` into ``models/transparency_decoders``. The node's output is
compared with the ComfyUI-free core called directly on the same VAE decodes.
"""

from __future__ import annotations

import pytest
import torch

import harness

H, W = 60, 90  # not a multiple of 8: DRIP pads to 64x96 latents-wise, the decode is cropped back


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            sd[k] = v
        elif "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("bias"):
            sd[k] = torch.zeros_like(v)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5
    module.load_state_dict(sd)


@pytest.fixture(scope="module")
def env(comfy_pack):
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    _randomize(vae.first_stage_model, seed=3)

    from diffusion_matting.py import transparency_decoder as TD

    torch.manual_seed(0)
    model = TD.TransparencyDecoder(TD.TransparencyDecoderConfig(base_channels=16, channel_mult=(1, 2, 2, 2),
                                                                hint_channels=16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like: non-zero output / hint convs
        for conv in (model.conv_out, model.hint_fg.zero, model.hint_alpha.zero):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    path = harness.model_path("transparency_decoders", "tiny_td.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    TD.save_decoder(model, path, vae_family="tiny")
    harness.refresh_file_lists()

    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, H, W, 3, generator=g)
    trimap = torch.full((1, H, W), 0.5)
    trimap[:, :12] = 0.0
    trimap[:, -12:] = 1.0
    from diffusion_matting.py import alpha as A

    padded, _ = A.pad_to_multiple(image, 8)
    z_f = vae.encode(padded)
    z_a = vae.encode(A.pad_to_multiple(torch.rand(1, H, W, generator=g).unsqueeze(-1).expand(1, H, W, 3).contiguous(), 8)[0])
    return {"m": comfy_pack.node_class_mappings, "vae": vae, "model": model.eval(), "path": path, "image": image,
            "trimap": trimap, "z_f": z_f, "z_a": z_a, "TD": TD}


def test_nodes_registered(env):
    for node_id in ("DM_TransparencyDecoderLoader", "DM_DRIPTransparencyDecode"):
        assert node_id in env["m"]
    schema = env["m"]["DM_DRIPTransparencyDecode"].GET_SCHEMA()
    assert schema.category == "matting/drip"


def test_loader_returns_a_managed_model_and_names_missing_paths(env):
    import comfy.model_patcher

    out = env["m"]["DM_TransparencyDecoderLoader"].execute(decoder_name="tiny_td.safetensors")
    patcher = out.result[0]
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert patcher.model.config.to_json() == env["model"].config.to_json() and patcher.model.metadata["vae_family"] == "tiny"
    sd, ref = patcher.model.state_dict(), env["model"].state_dict()
    assert all(torch.equal(sd[k].cpu(), ref[k]) for k in ref)
    with pytest.raises(ValueError, match=r"transparency_decoders[/\\]nope\.safetensors"):
        env["m"]["DM_TransparencyDecoderLoader"].execute(decoder_name="nope.safetensors")


def test_decode_matches_the_core_and_respects_the_trimap(env):
    import comfy.model_management as mm

    patcher = env["m"]["DM_TransparencyDecoderLoader"].execute(decoder_name="tiny_td.safetensors").result[0]
    node = env["m"]["DM_DRIPTransparencyDecode"]
    progress_before = len(harness.env().progress)
    out = node.execute(fg_latent={"samples": env["z_f"]}, alpha_latent={"samples": env["z_a"]}, image=env["image"],
                       trimap=env["trimap"], vae=env["vae"], tile_size=32, overlap=16, flip_tta=True,
                       decoder=patcher).result
    fg, alpha, rgba = out
    assert fg.shape == (1, H, W, 3) and alpha.shape == (1, H, W) and rgba.shape == (1, H, W, 4)
    assert torch.equal(rgba[..., :3], fg) and torch.equal(rgba[..., 3], alpha)
    assert torch.all(alpha[env["trimap"] == 1.0] == 1.0) and torch.all(alpha[env["trimap"] == 0.0] == 0.0)
    assert any(lm.model is patcher for lm in mm.current_loaded_models)  # ComfyUI model management holds it
    ticks = harness.env().progress[progress_before:]
    n = env["TD"].tile_count(H, W, patcher.model.config, 32, 16, True)
    assert len(ticks) == n and ticks[-1][1:] == (n, n)

    # the same computation through the ComfyUI-free core
    vae = env["vae"]
    fg_dec = vae.decode(env["z_f"])[:, :H, :W].float()
    al_dec = vae.decode(env["z_a"])[:, :H, :W].float().mean(-1)
    ref_f, ref_a = env["TD"].refine_bhwc(env["model"], env["image"], env["trimap"], fg_dec, al_dec, env["z_f"],
                                         env["z_a"], tile=32, overlap=16, flip_tta=True)
    assert torch.allclose(fg.cpu(), ref_f, atol=1e-5) and torch.allclose(alpha.cpu(), ref_a, atol=1e-5)
    plain_f = fg_dec.clamp(0, 1)
    assert float((fg.cpu() - plain_f).abs().mean()) > 1e-3  # the decoder changed the plain decode

    # no decoder linked: the plain decode, known regions respected
    pf, pa, _ = node.execute(fg_latent={"samples": env["z_f"]}, alpha_latent={"samples": env["z_a"]},
                             image=env["image"], trimap=env["trimap"], vae=vae, tile_size=512, overlap=64,
                             flip_tta=False).result
    assert torch.equal(pf.cpu(), plain_f)
    unk = env["trimap"] == 0.5
    assert torch.equal(pa.cpu()[unk], al_dec.clamp(0, 1)[unk])


def test_decode_rejects_mismatched_inputs(env):
    node = env["m"]["DM_DRIPTransparencyDecode"]
    big = torch.rand(1, H + 16, W, 3)
    with pytest.raises(ValueError, match="decode to 96x64 px but the image is 90x76"):
        node.execute(fg_latent={"samples": env["z_f"]}, alpha_latent={"samples": env["z_a"]}, image=big,
                     trimap=torch.full((1, H + 16, W), 0.5), vae=env["vae"], tile_size=0, overlap=0, flip_tta=False)
    with pytest.raises(ValueError, match="differ"):
        node.execute(fg_latent={"samples": env["z_f"]}, alpha_latent={"samples": env["z_a"][..., :4]},
                     image=env["image"], trimap=env["trimap"], vae=env["vae"], tile_size=0, overlap=0, flip_tta=False)
