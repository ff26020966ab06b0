"""DiffuMatting matting head on the VAE decoder: "Load Matting Head" and "VAE Decode with Matte".

The head (DiffuMatting Eq. 7) reads the decoder's last 128-channel full-resolution feature (the input of
``decoder.norm_out``) during the ordinary decode, so the matte costs one extra small conv pair, not a
second decoder pass. Without a head, the node keys the decoded RGB with GreenPost (training-free colour
difference) and says so in its ``mask_source`` output.

Mask outputs are alpha MASKs: 1 = foreground.
"""

from __future__ import annotations


import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch
from comfy_api.latest import io

from ..py.errors import UserError
from ..py.matting_head import MattingHeadInfo, decode_jobs, decode_with_matte, load_matting_head
from ._common import ALPHA_TIP, check_interrupt, log, model_file, out_device, progress, register_model_folder
from ._vae_features import comfy_decode_fn, comfy_feature_channels

FOLDER = "matting_heads"
MattingHeadType = io.Custom("DM_MATTING_HEAD")

AUTO_TILE_PX = 512      # tile used when an untiled decode runs out of memory
AUTO_OVERLAP_PX = 64


register_model_folder(FOLDER)


class MattingHeadModel:
    """What flows along a DM_MATTING_HEAD wire: the head under ComfyUI model management + its file info."""

    def __init__(self, head: torch.nn.Module, info: MattingHeadInfo, name: str):
        self.head = head
        self.info = info
        self.name = name
        self.patcher = comfy.model_patcher.ModelPatcher(head, load_device=mm.get_torch_device(),
                                                        offload_device=mm.unet_offload_device())

    @property
    def radius(self) -> int:
        """Context (feature px) a tile needs around it for an exact head output."""
        return self.head.radius

    def __call__(self, feature: torch.Tensor) -> torch.Tensor:
        # manual_cast ops follow the feature's device; the head computes in float32 (it is tiny)
        return self.head(feature.float())

    def __repr__(self) -> str:
        return f"MattingHeadModel({self.name!r}, vae_family={self.info.vae_family!r})"


class MattingHeadLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MattingHeadLoader",
            display_name="Load Matting Head",
            category="matting/diffumatting",
            description="Load a DiffuMatting matting head (.safetensors from models/matting_heads, trained with "
                        "`diffusion-matting train matting-head`). It predicts alpha from the VAE decoder's "
                        "last feature; pair it with the VAE family it was trained for.",
            inputs=[io.Combo.Input("head_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="File in models/matting_heads.")],
            outputs=[MattingHeadType.Output("matting_head", display_name="matting_head")],
        )

    @classmethod
    def execute(cls, head_name) -> io.NodeOutput:
        path = model_file(FOLDER, head_name, "matting head file")
        head, info = load_matting_head(path, operations=comfy.ops.manual_cast, device=mm.unet_offload_device(),
                                       dtype=torch.float32)
        log.info("Load Matting Head: %s (vae_family=%s, config=%s)", path, info.vae_family, info.config)
        return io.NodeOutput(MattingHeadModel(head, info, head_name))


def _store_device(vae, latents, tile, channels):
    """Where tiled decoding keeps its whole-image stage tensors: the VAE's device when ~3 of the largest
    (full-resolution, ``channels`` wide) fit comfortably in its free memory, else the intermediate device."""
    if not tile:
        return None
    ratio = vae.spacial_compression_decode()
    B, _, h, w = latents.shape
    itemsize = torch.empty((), dtype=vae.vae_dtype).element_size()
    need = 4 * B * channels * h * w * ratio * ratio * itemsize
    if mm.get_free_memory(vae.device) > 2 * need:
        return vae.device
    return mm.intermediate_device()


def _decode_chunk(vae, latents, head, tile, overlap, pbar, channels):
    decode_fn = comfy_decode_fn(vae, store_device=_store_device(vae, latents, tile, channels))
    if tile and decode_fn.tiled is None:
        log.warning("VAE Decode with Matte: this decoder cannot be split with shared GroupNorm statistics; "
                    "tiles are decoded independently (approximate, as any tiled VAE decode)")

    def on_tile(done, total):
        pbar.update(1)
        check_interrupt()

    return decode_with_matte(latents, decode_fn, head, tile=tile, overlap=overlap, out_device=out_device(),
                             on_tile=on_tile)


class VAEDecodeWithMatte(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_VAEDecodeWithMatte",
            display_name="VAE Decode with Matte",
            category="matting/diffumatting",
            description="Decode a latent and, in the same decoder pass, predict a coarse alpha with a DiffuMatting "
                        "matting head on the decoder's last feature. Without a head, the decoded image is keyed "
                        "with GreenPost (training-free colour difference; meant for green-canvas generations).",
            inputs=[
                io.Latent.Input("samples"),
                io.Vae.Input("vae"),
                MattingHeadType.Input("matting_head", optional=True,
                                      tooltip="From Load Matting Head. Unlinked: GreenPost keys the decoded RGB."),
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=64,
                             tooltip="Decode in tiles of this many pixels (0 = one pass; falls back to "
                                     f"{AUTO_TILE_PX} px tiles if that runs out of memory). GroupNorm statistics "
                                     "are shared across tiles, so the tiled image and matte match the one-pass "
                                     "decode."),
                io.Int.Input("overlap", default=64, min=0, max=2048, step=8,
                             tooltip="Tile overlap in pixels; image and matte are cross-faded across it with the "
                                     "same weights."),
            ],
            outputs=[
                io.Image.Output("image", display_name="image"),
                io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                io.String.Output("mask_source", display_name="mask_source",
                                 tooltip="Which path produced the mask (matting head or GreenPost)."),
            ],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, matting_head=None) -> io.NodeOutput:
        with torch.no_grad():
            return cls._run(samples, vae, tile_size, overlap, matting_head)

    @classmethod
    def _run(cls, samples, vae, tile_size, overlap, matting_head) -> io.NodeOutput:
        latents = samples["samples"]
        if getattr(latents, "is_nested", False):
            raise UserError("VAE Decode with Matte: nested (multi-resolution) latents are not supported")
        if latents.ndim != 4:
            raise UserError(f"VAE Decode with Matte: needs image latents [B,C,h,w], got {tuple(latents.shape)}")
        channels = comfy_feature_channels(vae)
        if matting_head is not None:
            cfg = matting_head.info.config
            if cfg.in_channels != channels:
                raise UserError(f"matting head {matting_head.name!r} expects a {cfg.in_channels}-channel decoder "
                                f"feature; this VAE's decoder.norm_out has {channels} channels")
            meta_lc = matting_head.info.metadata.get("latent_channels")
            if meta_lc and int(meta_lc) != latents.shape[1]:
                log.warning("VAE Decode with Matte: head %r was trained for a %s-channel-latent VAE (%s); this "
                            "latent has %d channels - the matte will likely be wrong",
                            matting_head.name, meta_lc, matting_head.info.vae_family, latents.shape[1])

        ratio = vae.spacial_compression_decode()
        tile = max(1, tile_size // ratio) if tile_size > 0 else 0
        ov = overlap // ratio
        head = matting_head
        B, C, lh, lw = latents.shape
        th, tw = (min(tile, lh), min(tile, lw)) if tile else (lh, lw)
        # per-sample memory of one decoder pass (ComfyUI's estimate) + the head's float32 feature copy and
        # hidden activations
        need = vae.memory_used_decode((1, C, th, tw), vae.vae_dtype)
        if head is not None:
            need += th * tw * ratio * ratio * (channels + 2 * head.info.config.hidden) * 4
        models = [vae.patcher] + ([head.patcher] if head is not None else [])
        mm.load_models_gpu(models, memory_required=need, force_full_load=vae.disable_offload)
        batch = min(B, max(1, int(mm.get_free_memory(vae.device) / max(1, need))))
        chunks = (B + batch - 1) // batch  # every chunk has the same tile jobs (they do not depend on B)
        pbar = progress(chunks * decode_jobs(latents.shape, comfy_decode_fn(vae), tile, ov))

        images, mattes, passes, fell_back, shared = [], [], 0, False, True
        for i in range(0, B, batch):
            chunk = latents[i:i + batch]
            res = None
            try:
                res = _decode_chunk(vae, chunk, head, tile, ov, pbar, channels)
            except mm.OOM_EXCEPTION as exc:
                if isinstance(exc, (UserError, mm.InterruptProcessingException)) or tile:
                    raise
            if res is None:  # retried outside the except block so the failed pass's tensors can be freed
                log.warning("VAE Decode with Matte: out of memory in one pass; decoding in %d px tiles "
                            "(image and matte blended with the same weights)", AUTO_TILE_PX)
                fell_back = True
                mm.soft_empty_cache()
                res = _decode_chunk(vae, chunk, head, AUTO_TILE_PX // ratio, AUTO_OVERLAP_PX // ratio, pbar, channels)
            passes += res.tiles
            shared = shared and (res.tiles == 1 or res.shared_stats)
            images.append(res.rgb.movedim(1, -1))
            if res.matte is not None:
                mattes.append(res.matte[:, 0])
        image = torch.cat(images, 0).to(out_device())

        if head is not None:
            alpha = torch.cat(mattes, 0).to(out_device())
            how = (f"matting head '{head.name}' (DiffuMatting ConR on decoder.norm_out input, "
                   f"trained for vae_family={head.info.vae_family})")
        else:
            alpha = greenpost_alpha(image)
            how = ("GreenPost colour-difference key on the decoded RGB (training-free fallback: no matting head "
                   "linked)")
            log.info("VAE Decode with Matte: no matting head linked; alpha from GreenPost on the decoded image")
        if passes > (B + batch - 1) // batch or fell_back:
            how += (f"; decoded in {passes} tiles"
                    + (" (GroupNorm statistics shared across tiles)" if shared else " (independent tiles, approximate)")
                    + (" after an out-of-memory fallback" if fell_back else ""))
        return io.NodeOutput(image, alpha.clamp(0, 1), how)


def greenpost_alpha(image: torch.Tensor) -> torch.Tensor:
    """Training-free alpha (1 = foreground) of decoded green-canvas images ``[B,H,W,3]`` via GreenPost."""
    try:
        from ..py.greenpost import greenpost
    except ImportError as exc:
        raise UserError(f"no matting head linked and GreenPost is unavailable ({exc}); link a matting head") from None
    res = greenpost(image)
    for w in res.warnings:
        log.warning("VAE Decode with Matte (GreenPost): %s", w)
    return res.alpha.float()


NODES = [MattingHeadLoader, VAEDecodeWithMatte]
