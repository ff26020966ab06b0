"""Export of a trained DiffuMatting UNet as ComfyUI-loadable files (torch/safetensors; no ComfyUI import).

* :func:`save_unet_file` - the UNet alone in the LDM/ComfyUI key layout (``input_blocks.*`` ...), for
  ``ComfyUI/models/diffusion_models`` (``Load Diffusion Model`` / UNETLoader). The key mapping is
  :mod:`.drip.convert` (diffusers <-> LDM, SD1.x/SD2.x UNets).
* :func:`save_checkpoint_file` - a single-file checkpoint for ``models/checkpoints`` (CheckpointLoaderSimple):
  ``model.diffusion_model.*`` (the UNet, LDM keys) + ``first_stage_model.*`` (the VAE: the source file's
  LDM tensors when the VAE came from a single file, else diffusers-key tensors, which ComfyUI converts on
  load) + ``cond_stage_model.*`` copied unchanged from a single-file base when it had a text encoder.
* :func:`merged_unet_state_dict` - plain diffusers UNet keys with any LoRA folded into the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .drip import convert

FORMAT = "diffumatting.unet"


def merged_unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """``unet.state_dict()`` in plain diffusers names; :class:`LoRALinear` wrappers are merged
    (``W + scale * up @ down``)."""
    from .train_diffumatting import LoRALinear

    sd = {}
    lora = {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}
    for k, v in unet.state_dict().items():
        owner = next((n for n in lora if k.startswith(n + ".")), None)
        if owner is None:
            sd[k] = v.detach()
            continue
        rest = k[len(owner) + 1:]
        if rest.startswith("base."):
            name = owner + "." + rest[len("base."):]
            if rest == "base.weight":
                sd[name] = lora[owner].merged_weight().detach()
            else:
                sd[name] = v.detach()
    return sd


def _meta(config: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, str]:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}
    meta = {"format": FORMAT, "unet_config": json.dumps(cfg, sort_keys=True)}
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _tensors(sd: Mapping[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in sd.items()}


def save_unet_file(path, unet_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype=None,
                   extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """The UNet (diffusers-key ``unet_sd``) renamed to LDM keys, as one safetensors file."""
    from safetensors.torch import save_file

    ldm = convert.diffusers_to_ldm(dict(unet_sd), config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(_tensors(ldm, dtype), str(tmp), metadata=_meta(config, extra_metadata))
    os.replace(tmp, path)
    return path


def vae_tensors_for_checkpoint(vae, source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """VAE tensors for ``first_stage_model.``: the original LDM tensors of a single-file source (the VAE is
    frozen in training, so they are exactly what was used), else the diffusers state dict."""
    if source is not None and Path(source).is_file() and str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        from .train_matting_head import _strip_prefix

        sd = _strip_prefix(load_file(str(source)))
        if "decoder.conv_in.weight" in sd:
            return {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                  "post_quant_conv."))}
    return dict(vae.state_dict())


def text_encoder_tensors(base: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """``cond_stage_model.*`` tensors of a single-file base checkpoint (unchanged), or ``{}``."""
    if base is None or not Path(base).is_file() or not str(base).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(base), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("cond_stage_model.")}


def save_checkpoint_file(path, unet_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         vae_sd: Mapping[str, torch.Tensor] | None = None,
                         text_sd: Mapping[str, torch.Tensor] | None = None, dtype=None,
                         extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Single-file checkpoint: ``model.diffusion_model.`` UNet (LDM keys) + ``first_stage_model.`` VAE +
    ``cond_stage_model.`` text encoder (each optional except the UNet)."""
    from safetensors.torch import save_file

    out = {"model.diffusion_model." + k: v for k, v in convert.diffusers_to_ldm(dict(unet_sd), config).items()}
    out.update({"first_stage_model." + k: v for k, v in (vae_sd or {}).items()})
    out.update(dict(text_sd or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(_tensors(out, dtype), str(tmp), metadata=_meta(config, extra_metadata))
    os.replace(tmp, path)
    return path


def load_unet_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_unet_file` / :func:`save_checkpoint_file`: (diffusers-key UNet
    state dict, diffusers config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a DiffuMatting UNet export (metadata format={meta.get('format')!r})")
    config = json.loads(meta["unet_config"])
    sd = convert.strip_ldm_prefix(load_file(str(path)))
    return convert.ldm_to_diffusers(sd, config), config
