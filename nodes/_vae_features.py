"""ComfyUI VAE -> ``decode_fn(latent_tile) -> (rgb_tile, feature_tile)`` for the matting-head core.

The tap is the input of ``first_stage_model.decoder.norm_out`` - what the LDM ``Decoder`` returns with
``give_pre_end=True`` - captured with a forward pre-hook during the ordinary ``first_stage_model.decode``
call, so the RGB is produced by exactly the code ``comfy.sd.VAE.decode`` runs (same dtype/device moves,
same ``process_output``). The tiling and blending live in ``diffusion_matting.py.matting_head``; this
module never calls ``vae.decode`` (whose silent OOM fallback would decode in tiles and fire the hook per
tile). The ``decode_fn`` carries a :class:`~diffusion_matting.py.decoder_tiles.TiledDecoder` (``.tiled``)
over the same LDM decoder, so tiled decoding shares GroupNorm statistics across tiles (exact tiling).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..py.decoder_tiles import TiledDecoder, UnsupportedDecoder, ldm_decoder_plan
from ..py.errors import UserError
from ..py.matting_head import _join_captures


def comfy_norm_out(vae) -> torch.nn.Module:
    """The decoder's output GroupNorm of a ``comfy.sd.VAE`` (UserError for VAEs without one)."""
    vae.throw_exception_if_invalid()
    fsm = vae.first_stage_model
    norm = getattr(getattr(fsm, "decoder", None), "norm_out", None)
    if norm is None or not isinstance(norm, torch.nn.GroupNorm):
        raise UserError(f"this VAE ({type(fsm).__name__}) has no LDM decoder.norm_out to tap; the matting head "
                        "needs an SD-family KL VAE (SD1.x/SD2.x/SDXL/SD3/Flux), not TAESD or a video/audio VAE")
    return norm


def comfy_feature_channels(vae) -> int:
    return int(comfy_norm_out(vae).num_channels)


def comfy_decode_fn(vae, store_device=None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``decode_fn`` over a ``comfy.sd.VAE``: RGB ``[B,3,H,W]`` 0..1 on ``vae.output_device`` (bit-identical
    to the corresponding slice of ``vae.decode`` before its ``movedim``) and the feature on ``vae.device``.
    Its ``.tiled`` attribute is the shared-statistics tiled decoder over the same modules (None if the
    decoder's up path has layers it cannot split); ``store_device`` is where that keeps whole-image stage
    tensors (default ``vae.device``).

    The caller loads the VAE first (``comfy.model_management.load_models_gpu([vae.patcher], ...)``).
    """
    norm = comfy_norm_out(vae)
    if vae.latent_dim != 2:
        raise UserError("the matting head works on image VAEs (4-D latents); this VAE is a video/audio VAE")

    def decode_fn(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = vae.first_stage_model.decode(z.to(vae.vae_dtype).to(vae.device))
        finally:
            handle.remove()
        rgb = vae.process_output(out.to(vae.output_device).float())
        return rgb, _join_captures(captured, rgb, "ComfyUI VAE")

    try:
        plan = ldm_decoder_plan(vae.first_stage_model.decoder)
    except UnsupportedDecoder:
        plan = None
    decode_fn.tiled = None if plan is None else TiledDecoder(
        plan, run_decode=lambda z: vae.first_stage_model.decode(z.to(vae.vae_dtype).to(vae.device)),
        post=lambda x: vae.process_output(x.to(vae.output_device).float()), store_device=store_device)
    return decode_fn


def comfy_decode_with_features(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: ``(image [B,H,W,3] 0..1 == vae.decode(latents), feature [B,C,H,W])``; loads the VAE."""
    import comfy.model_management as mm

    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(latents.shape, vae.vae_dtype),
                       force_full_load=vae.disable_offload)
    rgb, feature = comfy_decode_fn(vae)(latents)
    return rgb.movedim(1, -1), feature
