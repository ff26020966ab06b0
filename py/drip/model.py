"""DRIP UNet construction (diffusers): base SD configs, conversion of a base UNet to the DRIP layout,
base-checkpoint loading, and the forward call on an interleaved batch.

Conversion (:func:`convert_base_to_drip`):

* ``conv_in``: 12 input channels ``[z_t, z_X, z_Tri]``, initialised with the base weight repeated 3x along
  the input channels and divided by 3, so three equal latents give exactly the base conv output;
* ``class_embedding``: a ``"projection"`` ``TimestepEmbedding(4 -> time_dim)`` (== ComfyUI ``label_emb``
  with ``num_classes="sequential"``) taking the switcher code. Its last linear layer starts at zero, so
  the converted UNet computes the base UNet's function on equal latents for either branch.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import torch

from . import convert
from .codes import SWITCHER_DIM, stretch_pairs, tiled_codes

SD15_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD2_CONFIG: dict[str, Any] = {
    **SD15_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "sample_size": 96,
}
BASE_CONFIGS = {"sd15": SD15_CONFIG, "sd2": SD2_CONFIG}


def base_config(family: str, tiny: bool = False) -> dict[str, Any]:
    """The diffusers UNet config of a base family (``sd15``/``sd2``). ``tiny`` keeps the architecture
    (4 levels, cross-attention at the first 3, mid attention, linear/conv projections, head rule,
    text width) but with 32/64 channels and one layer per block: seconds on a CPU."""
    if family not in BASE_CONFIGS:
        raise ValueError(f"unknown base family {family!r} (expected sd15 or sd2)")
    cfg = copy.deepcopy(BASE_CONFIGS[family])
    if tiny:
        cfg["block_out_channels"] = [32, 32, 64, 64]
        cfg["layers_per_block"] = 1
        cfg["sample_size"] = 16
        # SD1.5: constant head count (8 -> 4 here); SD2: constant head width (64 -> 16 here)
        cfg["attention_head_dim"] = 4 if family == "sd15" else [2, 2, 4, 4]
    return cfg


def drip_config(base: Mapping[str, Any]) -> dict[str, Any]:
    """DRIP config from a base UNet config: 3x input channels and the switcher class embedding."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(base).items() if not k.startswith("_")}
    convert.check_sd_unet_config(cfg)
    latent = int(cfg.get("out_channels", 4))
    cfg["in_channels"] = 3 * latent
    cfg["class_embed_type"] = "projection"
    cfg["projection_class_embeddings_input_dim"] = SWITCHER_DIM
    return cfg


def family_of(config: Mapping[str, Any]) -> str:
    width = int(config.get("cross_attention_dim", 0))
    for fam, w in (("sd15", 768), ("sd2", 1024)):
        if w == width:
            return fam
    raise ValueError(f"cross_attention_dim {width}: not an SD1.5 (768) or SD2 (1024) UNet")


def build_unet(config: Mapping[str, Any]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{k: v for k, v in dict(config).items() if not k.startswith("_")})


def convert_base_to_drip(base_unet) -> Any:
    """New DRIP ``UNet2DConditionModel`` from a base (4-channel) one; the base is left untouched."""
    cfg = drip_config(base_unet.config)
    drip = build_unet(cfg).to(dtype=base_unet.dtype, device=base_unet.device)
    sd = {k: v.clone() for k, v in base_unet.state_dict().items()}
    w = sd["conv_in.weight"]
    if w.shape[1] * 3 != cfg["in_channels"]:
        raise ValueError(f"base conv_in takes {w.shape[1]} channels; expected {cfg['in_channels'] // 3}")
    sd["conv_in.weight"] = torch.cat([w, w, w], dim=1) / 3.0
    own = drip.state_dict()
    for k in ("class_embedding.linear_1.weight", "class_embedding.linear_1.bias"):
        sd[k] = own[k]
    sd["class_embedding.linear_2.weight"] = torch.zeros_like(own["class_embedding.linear_2.weight"])
    sd["class_embedding.linear_2.bias"] = torch.zeros_like(own["class_embedding.linear_2.bias"])
    drip.load_state_dict(sd, strict=True)
    return drip


def load_base_unet(path: str | os.PathLike, family: str | None = None):
    """Load a base SD UNet (diffusers folder, a ``unet`` sub-folder, or a single-file LDM checkpoint).

    Returns ``(unet, family)``. Single files are converted with :mod:`.convert` (no network needed)."""
    from diffusers import UNet2DConditionModel

    from ..errors import UserError

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "unet" if os.path.isfile(os.path.join(path, "unet", "config.json")) else None
        if sub is None and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path}: neither a diffusers pipeline folder (unet/config.json) nor a UNet folder")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub)
        return unet, family or family_of(unet.config)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    sd = convert.strip_ldm_prefix(sd)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in sd:
        raise UserError(f"{path}: not an SD1.x/SD2.x UNet checkpoint (no {key})")
    fam = family or {768: "sd15", 1024: "sd2"}.get(sd[key].shape[1])
    if fam is None:
        raise UserError(f"{path}: text width {sd[key].shape[1]} is neither SD1.5 (768) nor SD2 (1024)")
    cfg = base_config(fam)
    cfg["in_channels"] = sd["input_blocks.0.0.weight"].shape[1]
    dsd = convert.ldm_to_diffusers(sd, cfg)
    unet = build_unet(cfg)
    missing, unexpected = unet.load_state_dict(dsd, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not match the {fam} UNet ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return unet, fam


def drip_forward(unet, z_t: torch.Tensor, t, z_image: torch.Tensor, z_trimap: torch.Tensor,
                 text_embedding: torch.Tensor) -> torch.Tensor:
    """One UNet call on an interleaved batch ``z_t`` ``[2B,4,h,w]`` (already scaled as the scheduler
    wants). ``z_image``/``z_trimap`` are per sample ``[B or 1,4,h,w]`` (SD-scaled VAE latents)."""
    pairs = z_t.shape[0] // 2
    if z_t.shape[0] != 2 * pairs:
        raise ValueError(f"interleaved batch must be even, got {z_t.shape[0]}")
    x = torch.cat([z_t, stretch_pairs(z_image, pairs).to(z_t), stretch_pairs(z_trimap, pairs).to(z_t)], dim=1)
    emb = text_embedding.to(z_t)
    if emb.ndim == 2:
        emb = emb.unsqueeze(0)
    emb = emb.expand(z_t.shape[0], *emb.shape[1:]) if emb.shape[0] == 1 else emb
    codes = tiled_codes(pairs, dtype=z_t.dtype, device=z_t.device)
    if not torch.is_tensor(t):
        t = torch.tensor(t, device=z_t.device)
    t = t.to(z_t.device)
    if t.ndim == 0:
        t = t.expand(z_t.shape[0])
    return unet(x, t, encoder_hidden_states=emb, class_labels=codes).sample
