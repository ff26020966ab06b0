"""UNet key layouts: diffusers ``UNet2DConditionModel`` <-> original LDM/ComfyUI ``UNetModel`` (pure Python).

Only the Stable Diffusion UNet family is covered (SD1.x / SD2.x layouts, plus DRIP's extra
``class_embedding`` == LDM ``label_emb``): ``CrossAttnDownBlock2D``/``DownBlock2D`` levels, a
``UNetMidBlock2DCrossAttn`` middle, the mirrored up blocks. The LDM names are the ones ComfyUI's
``UNetModel`` uses (``input_blocks.N.M``, ``middle_block.N``, ``output_blocks.N.M``, ``out.N``).

Everything below the resnet / transformer level keeps its name except inside resnets
(``norm1 -> in_layers.0`` ...). The transformer (``Transformer2DModel`` == ``SpatialTransformer``) keys
are identical in both layouts.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class LayoutError(ValueError):
    """The UNet is not a Stable-Diffusion-style UNet this converter knows."""


def _layers(config: Mapping[str, Any]) -> int:
    lpb = config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise LayoutError(f"layers_per_block differs per level ({lpb}); not an SD-style UNet")
        lpb = lpb[0]
    return int(lpb)


def check_sd_unet_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`LayoutError` unless ``config`` describes an SD1.x/SD2.x-style UNet."""
    down = list(config.get("down_block_types", []))
    up = list(config.get("up_block_types", []))
    if not down or len(down) != len(up) or len(down) != len(config.get("block_out_channels", [])):
        raise LayoutError("down/up block types and block_out_channels must have the same length")
    allowed_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
    allowed_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down) - allowed_down or set(up) - allowed_up:
        raise LayoutError(f"unsupported block types {sorted(set(down) - allowed_down | set(up) - allowed_up)}")
    if [("CrossAttn" in d) for d in down] != [("CrossAttn" in u) for u in reversed(up)]:
        raise LayoutError("up blocks must mirror the down blocks (attention at the same levels)")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise LayoutError(f"unsupported mid block {mid!r}")
    if config.get("addition_embed_type") is not None:
        raise LayoutError("addition_embed_type (SDXL-style) is not supported")
    cet = config.get("class_embed_type")
    if cet not in (None, "projection"):
        raise LayoutError(f"class_embed_type {cet!r}: only 'projection' maps to ComfyUI's label_emb")
    if config.get("norm_num_groups", 32) != 32:
        raise LayoutError("norm_num_groups must be 32 (ComfyUI's UNet hard-codes GroupNorm(32))")
    if config.get("only_cross_attention", False) not in (False, [False] * len(down)):
        raise LayoutError("only_cross_attention is not supported")
    if config.get("dual_cross_attention", False):
        raise LayoutError("dual_cross_attention is not supported")
    if config.get("resnet_time_scale_shift", "default") != "default":
        raise LayoutError("resnet_time_scale_shift must be 'default'")
    tl = config.get("transformer_layers_per_block", 1)
    if isinstance(tl, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in tl):
        raise LayoutError("nested transformer_layers_per_block is not supported")


def heads_per_level(config: Mapping[str, Any]) -> list[int]:
    """Attention heads per level (diffusers' ``attention_head_dim`` historically means *heads*)."""
    n = len(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        return [int(h) for h in heads]
    return [int(heads)] * n


def comfy_head_config(config: Mapping[str, Any]) -> dict[str, int]:
    """ComfyUI ``UNetModel`` head settings: ``num_heads`` (constant heads) or ``num_head_channels``
    (constant head width), whichever reproduces diffusers' heads at every level."""
    heads = heads_per_level(config)
    chans = list(config["block_out_channels"])
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    widths = {c // h for c, h in zip(chans, heads)}
    if len(widths) == 1 and all(c % h == 0 for c, h in zip(chans, heads)):
        return {"num_heads": -1, "num_head_channels": widths.pop()}
    raise LayoutError(f"heads {heads} for channels {chans}: neither the head count nor the head width is constant")


def _block_map(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(diffusers prefix, ldm prefix, kind) for every block; kind is 'resnet', 'attn', 'down', 'up'."""
    check_sd_unet_config(config)
    L = _layers(config)
    n = len(config["block_out_channels"])
    down_attn = ["CrossAttn" in d for d in config["down_block_types"]]
    up_attn = ["CrossAttn" in u for u in config["up_block_types"]]
    out: list[tuple[str, str, str]] = []
    for i in range(n):
        for j in range(L):
            idx = 1 + i * (L + 1) + j
            out.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet"))
            if down_attn[i]:
                out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "attn"))
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (L + 1) + L}.0.op", "down"))
    out.append(("mid_block.resnets.0", "middle_block.0", "resnet"))
    out.append(("mid_block.attentions.0", "middle_block.1", "attn"))
    out.append(("mid_block.resnets.1", "middle_block.2", "resnet"))
    for i in range(n):
        for j in range(L + 1):
            idx = i * (L + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", "resnet"))
            if up_attn[i]:
                out.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", "attn"))
        if i < n - 1:
            sub = 2 if up_attn[i] else 1
            out.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (L + 1) + L}.{sub}.conv", "up"))
    return out


def diffusers_to_ldm_key(key: str, blocks: list[tuple[str, str, str]]) -> str:
    for d, l in _TOP.items():
        if key.startswith(d + "."):
            return l + key[len(d):]
    for d, l, kind in blocks:
        if key.startswith(d + "."):
            rest = key[len(d) + 1:]
            if kind == "resnet":
                head, _, tail = rest.partition(".")
                if head not in _RESNET:
                    raise LayoutError(f"unknown resnet parameter {key!r}")
                rest = _RESNET[head] + "." + tail
            return l + "." + rest
    raise LayoutError(f"no LDM name for diffusers key {key!r}")


def diffusers_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a diffusers UNet state dict to the LDM/ComfyUI ``UNetModel`` names (tensors are shared)."""
    blocks = _block_map(config)
    out = {}
    for k, v in state_dict.items():
        nk = diffusers_to_ldm_key(k, blocks)
        if nk in out:
            raise LayoutError(f"two diffusers keys map to {nk!r}")
        out[nk] = v
    return out


def ldm_to_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`diffusers_to_ldm` (needs the diffusers config to know the block structure)."""
    blocks = _block_map(config)
    inv_top = {l: d for d, l in _TOP.items()}
    inv_res = {l: d for d, l in _RESNET.items()}
    # longest LDM prefixes first so that 'input_blocks.1.0' does not swallow 'input_blocks.10.0'
    inv_blocks = sorted(((l, d, kind) for d, l, kind in blocks), key=lambda t: -len(t[0]))
    out = {}
    for k, v in state_dict.items():
        nk = None
        for l, d in inv_top.items():
            if k.startswith(l + "."):
                nk = d + k[len(l):]
                break
        if nk is None:
            for l, d, kind in inv_blocks:
                if k.startswith(l + "."):
                    rest = k[len(l) + 1:]
                    if kind == "resnet":
                        m = re.match(r"^((?:in_layers|out_layers|emb_layers)\.\d+|skip_connection)\.(.*)$", rest)
                        if not m or m.group(1) not in inv_res:
                            raise LayoutError(f"unknown resnet parameter {k!r}")
                        rest = inv_res[m.group(1)] + "." + m.group(2)
                    nk = d + "." + rest
                    break
        if nk is None:
            raise LayoutError(f"no diffusers name for LDM key {k!r}")
        out[nk] = v
    return out


def strip_ldm_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``model.diffusion_model.`` (checkpoint) prefix if every UNet key carries it."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)
