"""DRIP single-file checkpoints (safetensors + metadata); torch/safetensors only, no diffusers needed.

A file holds the DRIP UNet in the diffusers key layout or the LDM/ComfyUI key layout, plus the
empty-prompt text embedding (key ``drip.text_embedding``, ``[1, tokens, width]``) so no CLIP is needed
at inference. String metadata (safetensors header):

==================  =====================================================================
``format``          ``drip`` (required: how the loader recognises a DRIP file)
``drip_version``    ``1``
``base_family``     ``sd15`` or ``sd2``
``prediction_type`` ``epsilon`` or ``v_prediction``
``layout``          ``diffusers`` or ``ldm``
``in_channels``     ``12`` (``latent_channels`` x 3)
``latent_channels`` ``4``
``channel_order``   ``noisy,image,trimap`` (UNet input concatenation order)
``switcher``        how the branch codes are built (see :mod:`.codes`)
``unet_config``     JSON of the diffusers ``UNet2DConditionModel`` config (block structure, heads)
==================  =====================================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import UserError
from . import convert
from .codes import SWITCHER_DIM

FORMAT = "drip"
VERSION = "1"
TEXT_KEY = "drip.text_embedding"
CHANNEL_ORDER = "noisy,image,trimap"
SWITCHER_DESC = "posenc(onehot2d): fg=[sin(1,0),cos(1,0)], alpha=[sin(0,1),cos(0,1)]; projection class embedding"
FAMILIES = {"sd15": 768, "sd2": 1024}           # base family -> cross-attention (text) width
PREDICTIONS = ("epsilon", "v_prediction")
LAYOUTS = ("diffusers", "ldm")


class DRIPFormatError(UserError):
    """The file is not a (valid) DRIP checkpoint; the message names what is missing."""


@dataclass
class DRIPCheckpoint:
    unet: dict[str, torch.Tensor]          # UNet weights in ``layout`` names
    layout: str
    config: dict[str, Any]                 # diffusers UNet2DConditionModel config
    base_family: str
    prediction_type: str
    text_embedding: torch.Tensor           # [1, tokens, width]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.metadata.get("latent_channels", 4))

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.unet) if self.layout == "diffusers" else convert.ldm_to_diffusers(self.unet, self.config)

    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.unet) if self.layout == "ldm" else convert.diffusers_to_ldm(self.unet, self.config)


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able copy of a diffusers config (drops private ``_...`` entries, tuples -> lists)."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def check_family(base_family: str, config: Mapping[str, Any], text_embedding: torch.Tensor | None = None) -> None:
    if base_family not in FAMILIES:
        raise DRIPFormatError(f"unsupported base family {base_family!r} (expected one of {', '.join(FAMILIES)})")
    width = FAMILIES[base_family]
    cad = config.get("cross_attention_dim")
    if cad is not None and int(cad) != width:
        other = [f for f, w in FAMILIES.items() if w == int(cad)]
        raise DRIPFormatError(
            f"base family {base_family!r} expects a {width}-wide text embedding but the UNet's cross-attention "
            f"width is {cad}" + (f" (that is {other[0]})" if other else ""))
    if text_embedding is not None and text_embedding.shape[-1] != width:
        raise DRIPFormatError(f"text embedding width {text_embedding.shape[-1]} does not match base family "
                              f"{base_family!r} ({width})")


def save_drip(path: str | os.PathLike, unet_state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
              base_family: str, prediction_type: str, text_embedding: torch.Tensor, layout: str = "diffusers",
              dtype: torch.dtype | None = None, extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write a DRIP checkpoint. ``unet_state_dict`` is in the *diffusers* layout (as
    ``UNet2DConditionModel.state_dict()`` gives it); ``layout`` picks how it is stored."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")
    config = _plain_config(config)
    check_family(base_family, config, text_embedding)
    convert.check_sd_unet_config(config)
    latent = int(config.get("out_channels", 4))
    if int(config.get("in_channels", 0)) != 3 * latent:
        raise ValueError(f"a DRIP UNet has in_channels = 3 x {latent}, config says {config.get('in_channels')}")
    if config.get("class_embed_type") != "projection" or int(config.get("projection_class_embeddings_input_dim") or 0) != SWITCHER_DIM:
        raise ValueError("a DRIP UNet has class_embed_type='projection' with a 4-d switcher input")
    sd = {k: v.detach() for k, v in unet_state_dict.items()}
    if layout == "ldm":
        sd = convert.diffusers_to_ldm(sd, config)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    emb = text_embedding.detach().float()
    if emb.ndim == 2:
        emb = emb.unsqueeze(0)
    if emb.ndim != 3 or emb.shape[0] != 1:
        raise ValueError(f"text embedding must be [1, tokens, width], got {tuple(emb.shape)}")
    tensors = {k: v.contiguous().cpu() for k, v in sd.items()}
    tensors[TEXT_KEY] = emb.contiguous().cpu()
    meta = {
        "format": FORMAT,
        "drip_version": VERSION,
        "base_family": base_family,
        "prediction_type": prediction_type,
        "layout": layout,
        "in_channels": str(3 * latent),
        "latent_channels": str(latent),
        "channel_order": CHANNEL_ORDER,
        "switcher": SWITCHER_DESC,
        "unet_config": json.dumps(config, sort_keys=True),
    }
    if extra_metadata:
        meta.update({str(k): str(v) for k, v in extra_metadata.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # not a safetensors file at all
        raise DRIPFormatError(f"{os.path.basename(str(path))}: not a safetensors file ({exc})") from None


def _describe_foreign(keys: list[str]) -> str:
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return (" It looks like a full Stable Diffusion checkpoint (a base model): DRIP weights are made from one "
                "with `diffusion-matting train drip --base FILE ...`.")
    if any(k.startswith(("input_blocks.", "down_blocks.")) for k in keys):
        return " It looks like a plain diffusion UNet, not a DRIP model."
    return ""


def load_drip(path: str | os.PathLike, device: str | torch.device = "cpu") -> DRIPCheckpoint:
    """Read and validate a DRIP checkpoint; :class:`DRIPFormatError` names what is missing."""
    from safetensors.torch import load_file

    name = os.path.basename(str(path))
    if not os.path.isfile(path):
        raise DRIPFormatError(f"{path}: no such file")
    meta = read_metadata(path)
    tensors = load_file(str(path), device=str(device))
    keys = list(tensors)
    if meta.get("format") != FORMAT:
        raise DRIPFormatError(
            f"{name} is not a DRIP checkpoint: its metadata lacks format=drip (and the base family, prediction "
            f"type, UNet config and the empty-prompt text embedding a DRIP file carries).{_describe_foreign(keys)}")
    missing = [k for k in ("base_family", "prediction_type", "layout", "unet_config") if k not in meta]
    if TEXT_KEY not in tensors:
        missing.append(f"tensor {TEXT_KEY!r} (empty-prompt text embedding)")
    if missing:
        raise DRIPFormatError(f"{name}: DRIP checkpoint is missing {', '.join(missing)}")
    try:
        config = json.loads(meta["unet_config"])
    except json.JSONDecodeError as exc:
        raise DRIPFormatError(f"{name}: unet_config metadata is not valid JSON ({exc})") from None
    layout = meta["layout"]
    if layout not in LAYOUTS:
        raise DRIPFormatError(f"{name}: unknown layout {layout!r} (expected diffusers or ldm)")
    if meta["prediction_type"] not in PREDICTIONS:
        raise DRIPFormatError(f"{name}: unknown prediction type {meta['prediction_type']!r} (expected {' or '.join(PREDICTIONS)})")
    emb = tensors.pop(TEXT_KEY).float()
    check_family(meta["base_family"], config, emb)
    try:
        convert.check_sd_unet_config(config)
    except convert.LayoutError as exc:
        raise DRIPFormatError(f"{name}: {exc}") from None
    unet = convert.strip_ldm_prefix(tensors) if layout == "ldm" else tensors
    latent = int(meta.get("latent_channels", config.get("out_channels", 4)))
    conv_key = "conv_in.weight" if layout == "diffusers" else "input_blocks.0.0.weight"
    label_key = "class_embedding.linear_1.weight" if layout == "diffusers" else "label_emb.0.0.weight"
    problems = []
    if conv_key not in unet:
        problems.append(f"the UNet input conv ({conv_key})")
    elif unet[conv_key].shape[1] != 3 * latent:
        problems.append(f"a {3 * latent}-channel input conv (it has {unet[conv_key].shape[1]})")
    if label_key not in unet:
        problems.append(f"the switcher projection ({label_key})")
    elif unet[label_key].shape[1] != SWITCHER_DIM:
        problems.append(f"a {SWITCHER_DIM}-d switcher projection (it takes {unet[label_key].shape[1]})")
    if problems:
        raise DRIPFormatError(f"{name}: DRIP checkpoint is missing {', '.join(problems)}")
    return DRIPCheckpoint(unet=unet, layout=layout, config=config, base_family=meta["base_family"],
                          prediction_type=meta["prediction_type"], text_embedding=emb, metadata=meta)
