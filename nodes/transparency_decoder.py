"""DRIP's latent transparency decoder as ComfyUI blocks.

* Load Transparency Decoder: ``models/transparency_decoders/*.safetensors`` -> DM_TRANSPARENCY_DECODER (a
  ModelPatcher, so ComfyUI's model management loads/offloads it like any model).
* DRIP Decode (Transparency Decoder): fg LATENT + alpha LATENT (as DRIP Sampler / DRIP Decode give them),
  the image, its trimap and the VAE -> straight foreground IMAGE, alpha MASK (1 = foreground), RGBA IMAGE.
  With a decoder, the plain VAE decodes are refined past the VAE's reconstruction limit; without one the
  node returns the plain decode. Tiled for large images, optional flip TTA.
"""

from __future__ import annotations


import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..py import alpha as A
from ..py import transparency_decoder as TD
from ..py.errors import UserError
from ._common import ALPHA_TIP, STRAIGHT_TIP, check_interrupt, model_file, out_device, register_model_folder

FOLDER = "transparency_decoders"
TransparencyDecoderType = io.Custom("DM_TRANSPARENCY_DECODER")


register_model_folder(FOLDER)


def load_patcher(path: str) -> comfy.model_patcher.ModelPatcher:
    """Decoder file -> ModelPatcher (weights on the offload device until a decode needs them)."""
    model, meta = TD.load_decoder(path, operations=comfy.ops.manual_cast, device=mm.vae_offload_device(),
                                  dtype=torch.float32)
    model.metadata = meta
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.vae_device(), offload_device=mm.vae_offload_device())


class TransparencyDecoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TransparencyDecoderLoader",
            display_name="Load Transparency Decoder",
            category="matting/drip",
            description="Load a DRIP latent transparency decoder (trained with `diffusion-matting train "
                        "transparency-decoder`) from models/transparency_decoders.",
            inputs=[io.Combo.Input("decoder_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A .safetensors file in models/transparency_decoders.")],
            outputs=[TransparencyDecoderType.Output("decoder", display_name="decoder")],
        )

    @classmethod
    def execute(cls, decoder_name) -> io.NodeOutput:
        return io.NodeOutput(load_patcher(model_file(FOLDER, decoder_name, "transparency decoder")))


def _check_vae(vae, config: TD.TransparencyDecoderConfig | None, latent: torch.Tensor) -> None:
    if latent.ndim != 4:
        raise UserError(f"expected image latents [B,C,h,w], got shape {tuple(latent.shape)}")
    channels = getattr(vae, "latent_channels", latent.shape[1])
    if latent.shape[1] != channels:
        raise UserError(f"the latents have {latent.shape[1]} channels but the VAE takes {channels}")
    if config is not None:
        stride = getattr(vae, "downscale_ratio", config.latent_stride)
        if channels != config.latent_channels or stride != config.latent_stride:
            raise UserError(f"the transparency decoder was trained for a VAE with {config.latent_channels} latent "
                            f"channels at {config.latent_stride}x; this VAE has {channels} at {stride}x")


@torch.no_grad()
def drip_decode(vae, fg_latent, alpha_latent, image, trimap, decoder=None, tile_size=512, overlap=64,
                flip_tta=False):
    """-> (straight foreground [B,H,W,3], alpha [B,H,W] 1 = fg). Image size H x W; the latents cover it
    (``ceil(H / 8)`` rows: DRIP pads the image bottom/right to a multiple of 8, the decode is cropped back)."""
    config = decoder.model.config if decoder is not None else None
    z_f, z_a = fg_latent["samples"], alpha_latent["samples"]
    _check_vae(vae, config, z_f)
    if tuple(z_f.shape) != tuple(z_a.shape):
        raise UserError(f"fg latent {tuple(z_f.shape)} and alpha latent {tuple(z_a.shape)} differ")
    image = A.as_image(image, "image")[..., :3]
    tri = A.normalize_trimap(trimap, "trimap").to(image.device)
    image, tri = A.broadcast_batch(image, tri, names=["image", "trimap"])
    b = z_f.shape[0]
    if image.shape[0] not in (1, b):
        raise UserError(f"batch mismatch: {image.shape[0]} images but {b} latents")
    if b > 1 and image.shape[0] == 1:
        image, tri = image.expand(b, -1, -1, -1), tri.expand(b, -1, -1)
    elif image.shape[0] > b:
        raise UserError(f"batch mismatch: {image.shape[0]} images but {b} latents")
    h, w = image.shape[1:3]

    fg_dec = vae.decode(z_f)
    al_dec = vae.decode(z_a)
    dh, dw = fg_dec.shape[1:3]
    if not (dh - 8 < h <= dh and dw - 8 < w <= dw):
        raise UserError(f"the latents decode to {dw}x{dh} px but the image is {w}x{h}: use the image the latents "
                        "were sampled for")
    fg_dec, al_dec = fg_dec[:, :h, :w, :3].float(), al_dec[:, :h, :w, :3].float().mean(-1)
    if decoder is None:
        f, a = TD.refine_bhwc(None, image, tri, fg_dec, al_dec, z_f, z_a)
        return f, a

    model = decoder.model
    per_item = TD.tile_count(h, w, config, tile_size, overlap, flip_tta)
    t = min(max(tile_size, config.multiple), max(h, w)) if tile_size > 0 else max(h, w)
    mm.load_models_gpu([decoder], memory_required=t * t * config.base_channels * 4 * 48)
    pbar = comfy.utils.ProgressBar(b * per_item)

    def tick():
        check_interrupt()
        pbar.update(1)

    fgs, alphas = [], []
    for i in range(b):
        check_interrupt()
        f, a = TD.refine_bhwc(model, image[i:i + 1], tri[i:i + 1], fg_dec[i:i + 1], al_dec[i:i + 1], z_f[i:i + 1],
                              z_a[i:i + 1], tile=tile_size, overlap=overlap, flip_tta=flip_tta, callback=tick,
                              device=decoder.load_device)
        fgs.append(f.cpu())
        alphas.append(a.cpu())
    return torch.cat(fgs), torch.cat(alphas)


class DRIPTransparencyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPTransparencyDecode",
            display_name="DRIP Decode (Transparency Decoder)",
            category="matting/drip",
            description="Decode DRIP's foreground and alpha latents, refined by the latent transparency decoder "
                        "(DRIP sec. 3.4) when one is linked: (F, alpha) = D_trans(image, trimap, D(z_F), "
                        "D(z_alpha), z_F, z_alpha). Without a decoder: the plain VAE decode. Known trimap regions "
                        "are respected (alpha 1 / 0).",
            inputs=[
                io.Latent.Input("fg_latent", display_name="fg LATENT", tooltip="Foreground latent (DRIP Sampler)."),
                io.Latent.Input("alpha_latent", display_name="alpha LATENT", tooltip="Alpha latent (DRIP Sampler)."),
                io.Image.Input("image", tooltip="The image the latents were sampled for."),
                io.Mask.Input("trimap", tooltip="0 = background, 0.5 = unknown, 1 = foreground (0/128/255 accepted)."),
                io.Vae.Input("vae"),
                TransparencyDecoderType.Input("decoder", optional=True,
                                              tooltip="Load Transparency Decoder; unlinked = plain VAE decode."),
                io.Int.Input("tile_size", default=512, min=0, max=8192, step=64,
                             tooltip="Decoder tile size in px (0 = whole image in one pass)."),
                io.Int.Input("overlap", default=64, min=0, max=1024, step=8, tooltip="Tile overlap in px (feathered)."),
                io.Boolean.Input("flip_tta", default=False,
                                 tooltip="Average with a horizontally flipped pass (2x the decoder time)."),
            ],
            outputs=[io.Image.Output("foreground", display_name="foreground", tooltip=STRAIGHT_TIP),
                     io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                     io.Image.Output("rgba", display_name="RGBA", tooltip="Straight RGBA (Save Image writes RGBA PNG).")],
        )

    @classmethod
    def execute(cls, fg_latent, alpha_latent, image, trimap, vae, tile_size, overlap, flip_tta,
                decoder=None) -> io.NodeOutput:
        fg, alpha = drip_decode(vae, fg_latent, alpha_latent, image, trimap, decoder, tile_size, overlap, flip_tta)
        rgba = A.join_rgba(fg, alpha)
        dev = out_device()
        return io.NodeOutput(fg.to(dev), alpha.to(dev), rgba.to(dev))


NODES = [TransparencyDecoderLoader, DRIPTransparencyDecode]
