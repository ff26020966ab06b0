"""DRIP joint foreground + alpha sampling as ComfyUI blocks.

* DRIP Model Loader: ``models/drip/*.safetensors`` -> MODEL (cross-domain attention installed).
* DRIP Cross-Domain Attention: turn the joint fg/alpha self-attention on/off on a DRIP MODEL.
* DRIP Conditioning: image + trimap (or coarse mask + radii) + VAE -> positive/negative CONDITIONING
  carrying the image/trimap latents (concat conditioning) and the switcher codes.
* DRIP Latent: empty interleaved latent batch ``[fg_0, alpha_0, fg_1, alpha_1, ...]`` for KSampler.
* DRIP ControlNet Hint: per-image hints pair-interleaved to line up with the DRIP latent batch.
* DRIP Decode: KSampler output -> fg/alpha LATENTs, foreground IMAGE, alpha MASK (known trimap regions
  clamped), RGBA IMAGE (straight colour).
* DRIP Sampler: all of the above in one node (any sampler/scheduler, N-seed median ensemble).

Images are padded (replicate) to the latent multiple of 8 and cropped back. Alpha MASK: 1 = foreground.
"""

from __future__ import annotations


import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..py import alpha as A
from ..py.errors import UserError
from . import _drip_model as D
from ._common import ALPHA_TIP, STRAIGHT_TIP, check_interrupt, log, model_file, out_device, register_model_folder

FOLDER = "drip"
LATENT_MULTIPLE = 8
DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


register_model_folder(FOLDER)


# ------------------------------------------------------------------------------------------- helpers
def prepare_inputs(image, trimap=None, coarse_mask=None, erode_px: int = 8, dilate_px: int = 8):
    """-> (image [B,H,W,3], trimap [B,H,W] 0/0.5/1, warnings). Exactly one of trimap / coarse_mask."""
    image = A.as_image(image, "image")[..., :3]
    if (trimap is None) == (coarse_mask is None):
        raise UserError("DRIP needs either a trimap or a coarse mask (exactly one of them)")
    warnings: list[str] = []
    if trimap is not None:
        tri = A.normalize_trimap(trimap, "trimap")
    else:
        tri, warnings = A.trimap_from_mask(A.as_mask(coarse_mask, "coarse mask"), erode_px, dilate_px)
    image, tri = A.broadcast_batch(image, tri.to(image.device), names=["image", "trimap"])
    for i in range(tri.shape[0]):
        unknown = bool(((tri[i] > 0.25) & (tri[i] < 0.75)).any())
        has_fg, has_bg = bool((tri[i] > 0.75).any()), bool((tri[i] < 0.25).any())
        if not unknown:
            warnings.append(f"trimap {i} has no unknown region: its alpha is the trimap itself, returned exactly")
        elif not has_fg or not has_bg:
            warnings.append(f"trimap {i} has no definite {'foreground' if not has_fg else 'background'}; "
                            "DRIP still samples the unknown region")
    return image.contiguous(), tri.contiguous(), warnings


def check_vae(vae):
    if getattr(vae, "latent_channels", None) != 4 or getattr(vae, "downscale_ratio", None) != LATENT_MULTIPLE:
        raise UserError("DRIP needs the Stable Diffusion VAE (4 latent channels, 8x downscale); got "
                        f"{getattr(vae, 'latent_channels', '?')} channels, {getattr(vae, 'downscale_ratio', '?')}x")


def make_conditioning(model, vae, image, trimap=None, coarse_mask=None, erode_px=8, dilate_px=8):
    """-> (conditioning list, padded trimap, (H, W), warnings)."""
    drip = D.require_drip(model, "DRIP Conditioning")
    check_vae(vae)
    image, tri, warnings = prepare_inputs(image, trimap, coarse_mask, erode_px, dilate_px)
    size = (image.shape[1], image.shape[2])
    image_p, _ = A.pad_to_multiple(image, LATENT_MULTIPLE)
    tri_p, _ = A.pad_to_multiple(tri, LATENT_MULTIPLE)
    z_image = vae.encode(image_p)
    z_tri = vae.encode(tri_p.unsqueeze(-1).expand(*tri_p.shape, 3).contiguous())
    concat = torch.cat([z_image, z_tri], dim=1)
    from ..py.drip.codes import switcher_codes

    extra = {D.DRIP_CONCAT: concat, D.DRIP_SWITCHER: switcher_codes(), D.DRIP_TRIMAP: tri_p.cpu(), D.DRIP_SIZE: size}
    cond = [[drip.drip_text_embedding.clone(), extra]]
    return cond, tri_p, size, warnings


def empty_latent(image) -> dict:
    image = A.as_image(image, "image")
    b, h, w = image.shape[:3]
    hp, wp = A.ceil_div(h, LATENT_MULTIPLE), A.ceil_div(w, LATENT_MULTIPLE)
    return {"samples": torch.zeros([2 * b, 4, hp, wp], device=mm.intermediate_device())}


def _conditioning_extra(positive) -> dict:
    for c in positive:
        if isinstance(c, (list, tuple)) and len(c) > 1 and D.DRIP_CONCAT in c[1]:
            return c[1]
    raise UserError("this conditioning does not come from DRIP Conditioning (no image/trimap latents)")


def median(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Median along ``dim`` (mean of the two middle values for an even count)."""
    n = x.shape[dim]
    s = x.sort(dim=dim).values
    if n % 2:
        return s.select(dim, n // 2)
    return 0.5 * (s.select(dim, n // 2 - 1) + s.select(dim, n // 2))


def decode(vae, fg_latent, alpha_latent, trimap_p, size):
    """Plain VAE decode of fg / alpha latents (raw VAE scale) -> (fg [B,H,W,3], alpha [B,H,W]) cropped,
    with alpha clamped to the trimap's known regions."""
    h, w = size
    fg = vae.decode(fg_latent)[:, :h, :w, :3].float()
    al = vae.decode(alpha_latent)[:, :h, :w, :3].float().mean(-1)
    tri = trimap_p[:, :h, :w].to(al.device)
    tri = A.broadcast_batch(al, tri, names=["alpha", "trimap"])[1]
    al = torch.where(tri > 0.75, torch.ones_like(al), torch.where(tri < 0.25, torch.zeros_like(al), al))
    return fg.clamp(0, 1), al.clamp(0, 1)


def _latent_batch_check(samples: torch.Tensor) -> None:
    if samples.ndim != 4 or samples.shape[0] % 2:
        raise UserError(f"a DRIP latent is an even [fg, alpha] batch; got shape {tuple(samples.shape)}")


# --------------------------------------------------------------------------------------------- nodes
class DRIPModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPModelLoader",
            display_name="DRIP Model Loader",
            category="matting/drip",
            description="Load a DRIP UNet (single-file safetensors from models/drip, diffusers or LDM key "
                        "layout, with DRIP metadata and the empty-prompt text embedding). Returns a MODEL for "
                        "KSampler / LoRA loaders; cross-domain attention is installed unless turned off.",
            inputs=[
                io.Combo.Input("drip_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A DRIP checkpoint in models/drip (made by `diffusion-matting train drip`)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default"),
                io.Boolean.Input("cross_domain_attention", default=True,
                                 tooltip="Joint fg/alpha self-attention (what DRIP is trained with)."),
            ],
            outputs=[io.Model.Output("model", display_name="MODEL")],
        )

    @classmethod
    def execute(cls, drip_name, weight_dtype, cross_domain_attention) -> io.NodeOutput:
        model = D.load_drip_model(model_file(FOLDER, drip_name, "DRIP model"), dtype=DTYPES.get(weight_dtype))
        if cross_domain_attention:
            model = D.apply_cross_domain(model, True)
        return io.NodeOutput(model)


class DRIPCrossDomainAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPCrossDomainAttention",
            display_name="DRIP Cross-Domain Attention",
            category="matting/drip",
            description="Turn DRIP's cross-domain attention (each branch's queries attend over the keys/values "
                        "of both the foreground and the alpha branch of the same sample) on or off.",
            inputs=[io.Model.Input("model"), io.Boolean.Input("enabled", default=True)],
            outputs=[io.Model.Output("patched_model", display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, enabled) -> io.NodeOutput:
        D.require_drip(model, "DRIP Cross-Domain Attention")
        return io.NodeOutput(D.apply_cross_domain(model, enabled))


class DRIPConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPConditioning",
            display_name="DRIP Conditioning",
            category="matting/drip",
            description="Encode the image and its trimap with the SD VAE into DRIP's concat conditioning "
                        "(plus switcher codes and the model's empty-prompt embedding). Give a trimap "
                        "(0 = bg, 0.5 = unknown, 1 = fg) or a coarse alpha mask with erode/dilate radii.",
            inputs=[
                io.Model.Input("model", tooltip="DRIP MODEL (its empty-prompt embedding is used)."),
                io.Vae.Input("vae"),
                io.Image.Input("image"),
                io.Mask.Input("trimap", optional=True, tooltip="0 = background, 0.5 = unknown, 1 = foreground."),
                io.Mask.Input("coarse_mask", optional=True, tooltip="Coarse alpha mask (1 = foreground) -> trimap."),
                io.Int.Input("erode_px", default=8, min=0, max=512, tooltip="Coarse mask: definite-fg erosion radius."),
                io.Int.Input("dilate_px", default=8, min=0, max=512, tooltip="Coarse mask: definite-bg dilation radius."),
            ],
            outputs=[io.Conditioning.Output("positive", display_name="positive"),
                     io.Conditioning.Output("negative", display_name="negative"),
                     io.Mask.Output("trimap_used", display_name="trimap", tooltip="The trimap used (0 / 0.5 / 1).")],
        )

    @classmethod
    def execute(cls, model, vae, image, erode_px, dilate_px, trimap=None, coarse_mask=None) -> io.NodeOutput:
        cond, tri_p, (h, w), warnings = make_conditioning(model, vae, image, trimap, coarse_mask, erode_px, dilate_px)
        for msg in warnings:
            log.warning("DRIP Conditioning: %s", msg)
        negative = [[c[0].clone(), dict(c[1])] for c in cond]
        return io.NodeOutput(cond, negative, tri_p[:, :h, :w].to(out_device()))


class DRIPLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPLatent",
            display_name="DRIP Latent",
            category="matting/drip",
            description="Empty latent batch for DRIP: two items per image, interleaved [fg0, alpha0, fg1, "
                        "alpha1, ...], sized to the image padded to a multiple of 8.",
            inputs=[io.Image.Input("image")],
            outputs=[io.Latent.Output("latent", display_name="LATENT")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        return io.NodeOutput(empty_latent(image))


class DRIPControlNetHint(io.ComfyNode):
    """ComfyUI repeats a hint batch whole to the latent batch ([h0, h1] -> [h0, h1, h0, h1]); DRIP's latent
    batch is [fg0, alpha0, fg1, alpha1, ...], so per-image hints must come pair-interleaved."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPControlNetHint",
            display_name="DRIP ControlNet Hint",
            category="matting/drip",
            description="Per-image ControlNet hints for a DRIP batch: repeats each hint for the fg and alpha "
                        "items of its image ([h0, h0, h1, h1, ...]) so Apply ControlNet pairs hint i with image "
                        "i. A single hint needs no conversion (it is passed through).",
            inputs=[io.Image.Input("hint", tooltip="one hint image per DRIP input image (or one for all)")],
            outputs=[io.Image.Output("drip_hint", display_name="hint")],
        )

    @classmethod
    def execute(cls, hint) -> io.NodeOutput:
        return io.NodeOutput(hint if hint.shape[0] == 1 else hint.repeat_interleave(2, dim=0))


class DRIPDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPDecode",
            display_name="DRIP Decode",
            category="matting/drip",
            description="Split a sampled DRIP latent into foreground and alpha latents and decode them with "
                        "the VAE: straight foreground IMAGE, alpha MASK (definite trimap regions clamped), RGBA.",
            inputs=[io.Vae.Input("vae"), io.Latent.Input("samples", tooltip="KSampler output on a DRIP Latent."),
                    io.Conditioning.Input("positive", tooltip="The DRIP Conditioning used (trimap and size).")],
            outputs=[io.Image.Output("foreground", display_name="foreground", tooltip=STRAIGHT_TIP),
                     io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                     io.Image.Output("rgba", display_name="RGBA"),
                     io.Latent.Output("fg_latent", display_name="fg LATENT"),
                     io.Latent.Output("alpha_latent", display_name="alpha LATENT")],
        )

    @classmethod
    def execute(cls, vae, samples, positive) -> io.NodeOutput:
        check_vae(vae)
        extra = _conditioning_extra(positive)
        s = samples["samples"]
        _latent_batch_check(s)
        fg_l, al_l = s[0::2], s[1::2]
        fg, al = decode(vae, fg_l, al_l, extra[D.DRIP_TRIMAP], extra[D.DRIP_SIZE])
        rgba = A.join_rgba(fg, al)
        return io.NodeOutput(fg.to(out_device()), al.to(out_device()), rgba.to(out_device()),
                             {"samples": fg_l}, {"samples": al_l})


class DRIPSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DRIPSampler",
            display_name="DRIP Sampler",
            category="matting/drip",
            description="Joint foreground + alpha sampling with a DRIP model (conditioning, interleaved latent, "
                        "any ComfyUI sampler, decode). ensemble > 1 samples seeds seed..seed+N-1 and takes the "
                        "per-pixel median (latents: element-wise median).",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Image.Input("image"),
                io.Mask.Input("trimap", optional=True, tooltip="0 = background, 0.5 = unknown, 1 = foreground."),
                io.Mask.Input("coarse_mask", optional=True, tooltip="Coarse alpha mask (1 = foreground) -> trimap."),
                io.Int.Input("erode_px", default=8, min=0, max=512),
                io.Int.Input("dilate_px", default=8, min=0, max=512),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Int.Input("steps", default=10, min=1, max=50),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("ensemble", default=1, min=1, max=16, tooltip="Seeds aggregated by median."),
                io.Boolean.Input("cross_domain_attention", default=True),
            ],
            outputs=[io.Latent.Output("fg_latent", display_name="fg LATENT"),
                     io.Latent.Output("alpha_latent", display_name="alpha LATENT"),
                     io.Image.Output("foreground", display_name="foreground", tooltip=STRAIGHT_TIP),
                     io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                     io.Image.Output("rgba", display_name="RGBA")],
        )

    @classmethod
    def execute(cls, model, vae, image, erode_px, dilate_px, sampler_name, scheduler, steps, seed, ensemble,
                cross_domain_attention, trimap=None, coarse_mask=None) -> io.NodeOutput:
        fg_l, al_l, fg, al = sample_drip(model, vae, image, trimap, coarse_mask, erode_px, dilate_px, sampler_name,
                                         scheduler, steps, seed, ensemble, cross_domain_attention)
        rgba = A.join_rgba(fg, al)
        return io.NodeOutput({"samples": fg_l}, {"samples": al_l}, fg.to(out_device()), al.to(out_device()),
                             rgba.to(out_device()))


def sample_drip(model, vae, image, trimap, coarse_mask, erode_px, dilate_px, sampler_name, scheduler, steps, seed,
                ensemble=1, cross_domain_attention=True):
    """The DRIP Sampler's work: -> (fg latent, alpha latent, fg IMAGE, alpha MASK) (latents raw VAE scale)."""
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if ensemble < 1:
        raise UserError(f"ensemble must be >= 1, got {ensemble}")
    cond, tri_p, size, warnings = make_conditioning(model, vae, image, trimap, coarse_mask, erode_px, dilate_px)
    for msg in warnings:
        log.warning("DRIP Sampler: %s", msg)
    negative = [[c[0].clone(), dict(c[1])] for c in cond]
    model = D.apply_cross_domain(model, cross_domain_attention)
    latent = empty_latent(image)["samples"]
    pbar = comfy.utils.ProgressBar(steps * ensemble)
    lat_fg, lat_al, imgs, alphas = [], [], [], []
    for e in range(ensemble):
        check_interrupt()
        s_seed = seed + e

        def callback(step, x0, x, total, _e=e):
            pbar.update_absolute(_e * steps + step + 1, steps * ensemble)

        noise = comfy.sample.prepare_noise(latent, s_seed)
        out = comfy.sample.sample(model, noise, steps, 1.0, sampler_name, scheduler, cond, negative, latent,
                                  denoise=1.0, callback=callback, disable_pbar=True, seed=s_seed)
        fg_l, al_l = out[0::2], out[1::2]
        fg, al = decode(vae, fg_l, al_l, tri_p, size)
        lat_fg.append(fg_l)
        lat_al.append(al_l)
        imgs.append(fg)
        alphas.append(al)
    if ensemble == 1:
        return lat_fg[0], lat_al[0], imgs[0], alphas[0]
    return (median(torch.stack(lat_fg)), median(torch.stack(lat_al)), median(torch.stack(imgs)),
            median(torch.stack(alphas)))


NODES = [DRIPModelLoader, DRIPCrossDomainAttention, DRIPConditioning, DRIPLatent, DRIPControlNetHint, DRIPDecode,
         DRIPSampler]
