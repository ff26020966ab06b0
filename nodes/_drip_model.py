"""DRIP model glue for ComfyUI: model config / model classes, the loader, cross-domain attention patch.

The model is built from ComfyUI's own classes: a ``supported_models`` config (SD1.5 or SD2 family,
``in_channels`` 12, ``label_emb`` with ``num_classes="sequential"`` over the 4-d switcher) and a
``model_base.BaseModel`` subclass whose ``extra_conds`` turns DRIP conditioning into ``c_concat``
(image + trimap latents, each sample stretched over its [fg, alpha] pair), ``y`` (switcher codes, tiled
``[fg, alpha, fg, alpha, ...]``) and ``c_crossattn`` (the empty-prompt embedding stored in the file).
The result is a plain ``ModelPatcher``: LoRA loaders patch it, model management loads/offloads it,
KSampler samples it.

Cross-domain attention is installed with ``ModelPatcher.set_model_attn1_replace`` on every transformer
block (the official hook): the patch receives the projected q/k/v ``[batch, tokens, C]`` of a whole
model call. ComfyUI batches cond and uncond as consecutive chunks of the full latent batch (an even
``2 x pairs``), so a pair ``[fg_i, alpha_i]`` is always two consecutive items and viewing the tensors
as ``[batch/2, 2*tokens, C]`` is the joint attention of each pair.
"""

from __future__ import annotations

import logging

import torch

import comfy.conds
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils

from ..py.drip import checkpoint as ck
from ..py.drip import convert
from ..py.drip.codes import SWITCHER_DIM, stretch_pairs, switcher_codes
from ..py.errors import UserError

log = logging.getLogger("diffusion_matting")

DRIP_CONCAT = "drip_concat"        # conditioning key: [B, 8, h, w] raw VAE latents (image, trimap)
DRIP_SWITCHER = "drip_switcher"    # conditioning key: [2, 4] switcher codes (fg row, alpha row)
DRIP_TRIMAP = "drip_trimap"        # conditioning key: [B, H8, W8] padded pixel trimap (0 / 0.5 / 1)
DRIP_SIZE = "drip_size"            # conditioning key: (H, W) before padding to the latent multiple


class DRIPModel(comfy.model_base.BaseModel):
    """A DRIP UNet in ComfyUI: conditioning -> c_concat / y / c_crossattn for an interleaved batch."""

    drip_text_embedding: torch.Tensor | None = None
    drip_info: dict = {}

    def extra_conds(self, **kwargs):
        out = {}
        noise = kwargs["noise"]
        batch = noise.shape[0]
        if batch % 2:
            raise UserError(f"DRIP samples [foreground, alpha] pairs: the latent batch must be even, got {batch}. "
                            "Use the DRIP Latent node.")
        pairs = batch // 2
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is None:
            cross_attn = self.drip_text_embedding
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDCrossAttn(cross_attn)
        concat = kwargs.get(DRIP_CONCAT, None)
        if concat is None:
            raise UserError("a DRIP model needs DRIP Conditioning (image and trimap latents); "
                            "this conditioning has none")
        concat = self.process_latent_in(concat)
        if concat.shape[-2:] != noise.shape[-2:]:
            raise UserError(f"the DRIP latent is {noise.shape[-1] * 8}x{noise.shape[-2] * 8} but the conditioning "
                            f"image is {concat.shape[-1] * 8}x{concat.shape[-2] * 8} (after padding to 8)")
        try:
            concat = stretch_pairs(concat, pairs)
        except ValueError as exc:
            raise UserError(f"DRIP: {exc} (latent batch {batch} = 2 x {pairs})") from None
        out["c_concat"] = comfy.conds.CONDNoiseShape(concat.to(kwargs["device"]))
        codes = kwargs.get(DRIP_SWITCHER, None)
        if codes is None:
            codes = switcher_codes()
        out["y"] = comfy.conds.CONDRegular(codes.to(kwargs["device"]))
        return out


class _DRIPConfigMixin:
    """Per-file settings on top of the SD family config: head layout, prediction type."""

    def __init__(self, unet_config, heads: dict, prediction_type: str):
        self.unet_extra_config = {**type(self).unet_extra_config, **heads}
        super().__init__(unet_config)
        self.drip_prediction_type = prediction_type

    def model_type(self, state_dict=None, prefix=""):
        if self.drip_prediction_type == "v_prediction":
            return comfy.model_base.ModelType.V_PREDICTION
        return comfy.model_base.ModelType.EPS

    def inpaint_model(self):
        return False

    def get_model(self, state_dict=None, prefix="", device=None):
        return DRIPModel(self, model_type=self.model_type(), device=device)


class DRIP_SD15(_DRIPConfigMixin, comfy.supported_models.SD15):
    unet_config = {"context_dim": 768, "in_channels": 12, "adm_in_channels": SWITCHER_DIM, "num_classes": "sequential"}


class DRIP_SD2(_DRIPConfigMixin, comfy.supported_models.SD20):
    unet_config = {"context_dim": 1024, "in_channels": 12, "adm_in_channels": SWITCHER_DIM, "num_classes": "sequential"}


CONFIGS = {"sd15": DRIP_SD15, "sd2": DRIP_SD2}


def is_drip(model_patcher) -> bool:
    return getattr(getattr(model_patcher, "model", None), "drip_text_embedding", None) is not None


def require_drip(model_patcher, what: str = "this node"):
    if not is_drip(model_patcher):
        raise UserError(f"{what} needs a DRIP model (from the DRIP Model Loader); got "
                        f"{type(getattr(model_patcher, 'model', model_patcher)).__name__}")
    return model_patcher.model


def load_drip_model(path: str, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """Build a DRIP ``ModelPatcher`` from a single-file DRIP checkpoint (diffusers or LDM layout)."""
    ckpt = ck.load_drip(path)
    try:
        sd = ckpt.ldm_state_dict()
    except convert.LayoutError as exc:
        raise UserError(f"{path}: {exc}") from None
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if unet_config is None:
        raise UserError(f"{path}: no UNet found in the DRIP checkpoint")
    if unet_config.get("in_channels") != 3 * ckpt.latent_channels or unet_config.get("adm_in_channels") != SWITCHER_DIM:
        raise UserError(f"{path}: UNet takes {unet_config.get('in_channels')} channels / "
                        f"{unet_config.get('adm_in_channels')}-d label input; DRIP needs {3 * ckpt.latent_channels} / {SWITCHER_DIM}")
    heads = convert.comfy_head_config(ckpt.config)
    model_config = CONFIGS[ckpt.base_family](unet_config, heads, ckpt.prediction_type)

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                              supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(sd, "")
    model = model.to(offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the {ckpt.base_family} DRIP UNet "
                        f"(missing {list(missing)[:4]}{'...' if len(missing) > 4 else ''}, "
                        f"unexpected {list(unexpected)[:4]}{'...' if len(unexpected) > 4 else ''})")
    model.drip_text_embedding = ckpt.text_embedding.clone()
    model.drip_info = {"base_family": ckpt.base_family, "prediction_type": ckpt.prediction_type,
                       "layout": ckpt.layout, "file": str(path)}
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# ------------------------------------------------------------------------------- cross-domain attention
def cross_domain_attn1(q, k, v, extra_options):
    """attn1 replacement: each [fg, alpha] pair (consecutive batch items) attends jointly."""
    b, n, c = q.shape
    if b % 2:
        raise UserError(f"DRIP cross-domain attention needs [fg, alpha] pairs but the model was called with "
                        f"batch {b}; use the DRIP Latent node (even batch) and sample a DRIP model")
    out = comfy_attention.optimized_attention(
        q.reshape(b // 2, 2 * n, c), k.reshape(b // 2, 2 * n, c), v.reshape(b // 2, 2 * n, c),
        extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options)
    return out.reshape(b, n, c)


def attn1_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every transformer block, as ComfyUI's UNet
    reports them in ``transformer_options`` (``input``/``middle``/``output``)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    found = []
    groups = [("input", list(diffusion_model.input_blocks)), ("middle", [diffusion_model.middle_block]),
              ("output", list(diffusion_model.output_blocks))]
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    found += [(name, number, i) for i in range(len(layer.transformer_blocks))]
    return found


def apply_cross_domain(model_patcher, enabled: bool = True):
    """Clone of ``model_patcher`` with DRIP cross-domain attention on every transformer block (or, with
    ``enabled=False``, with ours removed). Other extensions' attn1 replacements on a block are
    replaced (with a warning) since the joint attention must own attn1."""
    m = model_patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    replace = to.get("patches_replace", {}).get("attn1", {})
    blocks = attn1_blocks(m.model.diffusion_model)
    ours = {k for k, p in replace.items() if p is cross_domain_attn1}
    others = {k for k in replace if k not in ours}
    if ours:
        to["patches_replace"] = dict(to["patches_replace"])
        to["patches_replace"]["attn1"] = {k: p for k, p in replace.items() if k not in ours}
    if enabled:
        if others:
            log.warning("DRIP: replacing %d attn1 patches set by other nodes with cross-domain attention", len(others))
        for name, number, idx in blocks:
            m.set_model_attn1_replace(cross_domain_attn1, name, number, idx)
    return m


def cross_domain_active(model_patcher) -> bool:
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    blocks = attn1_blocks(model_patcher.model.diffusion_model)
    return bool(blocks) and all(replace.get(b) is cross_domain_attn1 for b in blocks)
