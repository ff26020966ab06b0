"""Tier 2: a DiffuMatting export (``train_diffumatting.export_all``) loads in real ComfyUI.

The UNet is a random-weight diffusers ``UNet2DConditionModel`` in the SD1.5 layout that ComfyUI's model
detection recognises as SD1.5 (320 base channels, 8 heads, 768-wide text, conv transformer projections)
but small (one layer per block, base channels at every level), with a LoRA on its attention projections
(the export merges it). The VAE is a random diffusers ``AutoencoderKL`` of the SD architecture. Checked:

* ``diffumatting_unet.safetensors`` through the core ``UNETLoader`` (models/diffusion_models) and
  ``diffumatting.safetensors`` through ``CheckpointLoaderSimple`` (models/checkpoints) give the same eps as
  the diffusers UNet on the same input - both the raw ``diffusion_model`` call and the full
  ``apply_model`` path (sigma <-> timestep, EPS input scaling);
* the checkpoint's VAE decodes like the diffusers VAE;
* ``matting_head.safetensors`` loads through the pack's ``DM_MattingHeadLoader`` and computes the same
  alpha as the trained head.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import harness

pytest.importorskip("diffusers")

LAT = 16


@pytest.fixture(scope="module")
def exported(comfy, tmp_path_factory):
    from diffusers import AutoencoderKL

    from diffusion_matting.py import train_diffumatting as TD
    from diffusion_matting.py.drip import model as M
    from diffusion_matting.py.train_drip import VAECodec

    torch.manual_seed(0)
    cfg = M.base_config("sd15")
    cfg.update(block_out_channels=[320, 320, 320, 320], layers_per_block=1)
    unet = M.build_unet(cfg).eval()
    lora = TD.apply_lora(unet, rank=4, alpha=4)
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.02)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval()
    head = TD.MattingHead(TD.MattingHeadConfig(in_channels=128)).eval()
    with torch.no_grad():
        head.conv2.weight.mul_(20)
    out = tmp_path_factory.mktemp("dm_export")
    paths = TD.export_all(unet, head, VAECodec(vae), out, TD.DiffuMattingConfig(), "sd1",
                          {"dtype": None, "checkpoint": True}, step=1)
    for key, folder, name in (("unet", "diffusion_models", "dm_unet.safetensors"),
                              ("checkpoint", "checkpoints", "dm_ckpt.safetensors"),
                              ("head", "matting_heads", "dm_head.safetensors")):
        dst = harness.model_path(folder, name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths[key], dst)
    harness.refresh_file_lists()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, LAT, LAT, generator=g)
    t = torch.tensor([120, 650])
    emb = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        eps = unet(x, t, encoder_hidden_states=emb).sample
    return {"unet": unet, "vae": vae, "head": head, "x": x, "t": t, "emb": emb, "eps": eps}


def _check_model(model, d):
    dm = model.model.diffusion_model
    with torch.no_grad():
        raw = dm(d["x"], timesteps=d["t"].float(), context=d["emb"])
    scale = d["eps"].abs().max().item()
    assert scale > 0.05
    assert (raw - d["eps"]).abs().max().item() < 1e-4 * max(1.0, scale)
    # the sampler's path: k-diffusion sigma of t, x = x_t / sqrt(a_t), denoised -> eps
    ms = model.get_model_object("model_sampling")
    sig = ms.sigmas[d["t"]].float()
    xk = d["x"] * (1 + sig ** 2).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        den = model.model.apply_model(xk, sig, c_crossattn=d["emb"])
    eps = (xk - den) / sig.view(-1, 1, 1, 1)
    assert (eps - d["eps"]).abs().max().item() < 1e-3 * max(1.0, scale)


def test_unet_loads_through_unet_loader(comfy, exported):
    import nodes

    model = nodes.UNETLoader().load_unet("dm_unet.safetensors", "default")[0]
    assert type(model.model.model_config).__name__ == "SD15"
    _check_model(model, exported)


def test_checkpoint_loads_through_checkpoint_loader(comfy, exported):
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("dm_ckpt.safetensors")
    assert type(model.model.model_config).__name__ == "SD15"
    assert clip is None            # no text encoder in a checkpoint made from a diffusers-folder base
    _check_model(model, exported)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = vae.decode(z)                                # ComfyUI: raw latents in, [B,H,W,3] 0..1 out
    with torch.no_grad():
        want = ((exported["vae"].decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert got.shape == want.shape and (got - want).abs().max() < 2e-3


def test_head_loads_through_pack_loader(comfy_pack, exported):
    loader = comfy_pack.node_class_mappings["DM_MattingHeadLoader"]
    model = loader.execute(head_name="dm_head.safetensors").result[0]
    feat = torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = exported["head"](feat)
    got = model(feat)
    assert (got.float() - want).abs().max() < 1e-5 and want.std() > 0.01
