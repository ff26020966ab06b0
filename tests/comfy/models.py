"""Random-weight Stable Diffusion models for the tier-2 tests, built from ComfyUI's own classes.

Nothing here is imported by the pack. Two kinds of builders (ComfyUI must be booted first: the
``comfy`` fixture does it; ComfyUI modules are imported inside the functions):

* **In-process tiny models** (node-level tests that call nodes directly, e.g. test_green_canvas_comfy):
  :func:`build_model` (``supported_models.SD15`` / ``SDXL`` with the real block layout shrunk to 32 base
  channels: :data:`SD15_TINY`, :data:`SDXL_TINY`), :func:`build_clip`, :func:`tiny_vae`,
  :func:`build_controlnet`, :func:`write_lora` (a LoRA for a model object).
* **Model files under the public names** (workflow tests: CheckpointLoaderSimple, LoraLoader,
  ControlNetLoader read them): :func:`write_checkpoint`, :func:`write_lora_file`,
  :func:`write_controlnet` (and :func:`write_bmv2`: a BackgroundMattingV2 ``.pth``, not SD). ComfyUI
  detects a checkpoint's family from its UNet keys
  (``model_detection.detect_unet_config`` + ``supported_models.*.unet_config``): SD1.5 needs 320 base
  channels, 768-wide cross-attention, conv proj_in and no ADM; SDXL needs 320 channels, 2048-wide
  cross-attention, linear proj_in, the 2816-wide ADM and input transformer depths [0,0,2,2,10,10]. Those are
  kept; everything detection leaves free is shrunk (channel_mult 1 at every level, fewer res blocks and
  output/middle transformer blocks: :data:`SD15_CKPT`, :data:`SDXL_CKPT`). The text encoders (CLIP-L; CLIP-L
  + CLIP-G for SDXL) and the VAE are full size: ComfyUI builds them from fixed configs. Files are
  float16, written with ComfyUI's own key mapping (``BaseModel.state_dict_for_saving``), so they have
  the layout of the published checkpoints.

Random weights (:func:`random_state`): norm weights 1, biases 0, other tensors N(0, 1/fan_in) (finite,
O(1) activations through any depth). ``fast=True`` draws every tensor from one shared pool of normal
numbers at a running offset (a billion-parameter SDXL text encoder is filled in a few seconds).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import harness

# ---- UNet configs (ComfyUI UNetModel kwargs, the way supported_models receive them) -------------------

_COMMON = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
           'legacy': False, 'in_channels': 4, 'use_temporal_attention': False, 'use_temporal_resblock': False}

SD15_TINY = {**_COMMON, 'adm_in_channels': None, 'model_channels': 32, 'num_res_blocks': [2, 2, 2, 2],
             'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1,
             'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 2,
             'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
SDXL_TINY = {**_COMMON, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'model_channels': 32,
             'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 2, 4],
             'transformer_depth_middle': 10, 'use_linear_in_transformer': True, 'context_dim': 2048,
             'num_head_channels': 16, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10]}

# Detected as SD1.5 / SDXL by CheckpointLoaderSimple (see the module docstring for what is pinned).
SD15_CKPT = {**_COMMON, 'adm_in_channels': None, 'model_channels': 320, 'num_res_blocks': [1, 1, 1, 1],
             'transformer_depth': [1, 1, 1, 0], 'channel_mult': [1, 1, 1, 1], 'transformer_depth_middle': 1,
             'use_linear_in_transformer': False, 'context_dim': 768,
             'transformer_depth_output': [1, 1, 1, 1, 1, 1, 0, 0]}
SDXL_CKPT = {**_COMMON, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 1, 1],
             'transformer_depth_middle': 1, 'use_linear_in_transformer': True, 'context_dim': 2048,
             'transformer_depth_output': [0, 0, 0, 1, 1, 1, 1, 1, 1]}

TEXT_WIDTH = {"sd15": 768, "sdxl": 2048}

# the SD VAE ComfyUI's comfy.sd.VAE builds for "decoder.conv_in.weight" keys (SD1.x/SD2.x/SDXL VAEs)
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

_POOL_LEN = 1_000_003  # prime: pooled tensors do not repeat in step with their rows


def _config_class(family: str, tiny: bool = True):
    import comfy.supported_models as SM

    if family == "sd15":
        return SM.SD15, (SD15_TINY if tiny else SD15_CKPT)
    if family == "sdxl":
        return SM.SDXL, (SDXL_TINY if tiny else SDXL_CKPT)
    raise ValueError(f"unknown family {family!r} (sd15 or sdxl)")


# ---- random weights ----------------------------------------------------------------------------------

def _kind(name: str, v: torch.Tensor) -> str:
    if not v.is_floating_point():
        return "keep"
    if ("norm" in name or "ln" in name) and name.endswith("weight"):
        return "one"
    if name.endswith("bias"):
        return "zero"
    if v.ndim == 0:
        return "one"
    return "normal"


def random_state(state: dict, seed: int, fast: bool = False) -> dict:
    """Random values for a state dict (see the module docstring); keys, shapes and dtypes kept."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_LEN, generator=g) if fast else None
    offset = 0
    out = {}
    for k, v in state.items():
        kind = _kind(k, v)
        if kind == "keep":
            out[k] = v
            continue
        if kind == "one":
            out[k] = torch.ones_like(v)
            continue
        if kind == "zero":
            out[k] = torch.zeros_like(v)
            continue
        scale = 1.0 / max(1, v[0].numel()) ** 0.5
        if pool is None:
            x = torch.randn(v.shape, generator=g)
        else:
            n, start = v.numel(), offset % _POOL_LEN
            x = pool.repeat(math.ceil((start + n) / _POOL_LEN))[start:start + n].view(v.shape)
            offset += n + 7919
        out[k] = (x * scale).to(v.dtype)
    return out


def randomize(module: torch.nn.Module, seed: int, fast: bool = False) -> dict:
    """Load :func:`random_state` into ``module`` in place (works on ComfyUI's uninitialised comfy.ops
    layers); returns the state."""
    sd = random_state(module.state_dict(), seed, fast=fast)
    with torch.no_grad():
        module.load_state_dict(sd)
    return sd


# ---- in-process tiny models ----------------------------------------------------------------------------

def build_model(family: str, seed: int | None = None):
    """A ModelPatcher around ComfyUI's SD1.5 / SDXL model class with the tiny UNet; returns
    ``(patcher, model_config)``."""
    import comfy.model_patcher

    cls, cfg = _config_class(family, tiny=True)
    mc = cls(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    randomize(model.diffusion_model, seed=(1 if family == "sd15" else 2) if seed is None else seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), mc


def build_clip(mc):
    """The family's CLIP (real tokenizers; the text encoder is NOT initialised: tokenise only)."""
    import comfy.sd

    return comfy.sd.CLIP(target=mc.clip_target({}),
                         embedding_directory=harness.env().folder_paths.get_folder_paths("embeddings"))


def tiny_vae(seed: int = 3):
    """A 4-channel, 8x VAE (the SD VAE layout at 32 channels) as comfy.sd.VAE."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    randomize(vae.first_stage_model, seed=seed)
    return vae


def lora_state(unet_state: dict, seed: int, rank: int = 4, clip_state: dict | None = None,
               clip_prefixes: dict[str, str] | None = None) -> dict:
    """A kohya-style LoRA: one down/up/alpha triple for every attention projection of the UNet (LDM key
    names, ``lora_unet_*``) and, with ``clip_state``, for every self-attention projection of the text
    encoder(s) (``lora_te_*``; ``clip_prefixes`` maps a state-dict prefix such as ``clip_l.`` to its
    LoRA prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(base, shape):
        sd[base + ".lora_down.weight"] = torch.randn(rank, shape[1], generator=g) * 0.05
        sd[base + ".lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * 0.05
        sd[base + ".alpha"] = torch.tensor(float(rank))

    for k, v in unet_state.items():
        if k.endswith(".weight") and v.ndim == 2 and (".attn1." in k or ".attn2." in k) and "to_out" not in k:
            add("lora_unet_" + k[: -len(".weight")].replace(".", "_"), v.shape)
    for prefix, lora_prefix in (clip_prefixes or {}).items():
        for k, v in (clip_state or {}).items():
            if k.startswith(prefix) and ".self_attn." in k and k.endswith("_proj.weight"):
                # clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight -> layers_3_self_attn_q_proj
                rest = k[len(prefix):].split("text_model.encoder.", 1)[1][: -len(".weight")]
                add(f"{lora_prefix}_text_model_encoder_" + rest.replace(".", "_"), v.shape)
    return sd


def write_lora(model, name: str, seed: int, rank: int = 4) -> Path:
    """A kohya-style LoRA on every attention projection of ``model``'s UNet, in models/loras."""
    from safetensors.torch import save_file

    path = harness.model_path("loras", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(model.model.diffusion_model.state_dict(), seed, rank), str(path))
    return path


def build_controlnet(family: str, seed: int = 4):
    """A ControlNet of the tiny model's architecture (cldm.ControlNet, random weights, non-zero zero-convs)
    wrapped the way ControlNetLoader wraps it. (ComfyUI's loader cannot size a shrunken SD1.5-style
    ControlNet from its file: detection needs the real 320 channels; :func:`write_controlnet` writes one
    it can.)"""
    import comfy.controlnet

    cn = _controlnet_module(family, tiny=True)
    randomize(cn, seed=seed)
    return comfy.controlnet.ControlNet(cn, load_device=torch.device("cpu"), manual_cast_dtype=None)


def _controlnet_module(family: str, tiny: bool, dtype=torch.float32):
    import comfy.cldm.cldm
    import comfy.ops

    cls, cfg = _config_class(family, tiny=tiny)
    # the checkpoint-sized one as ControlNetLoader builds it (the family's head settings added)
    cfg = dict(cfg) if tiny else dict(cls(dict(cfg)).unet_config)
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=dtype, device="cpu")
    return comfy.cldm.cldm.ControlNet(**cfg)


# ---- model files under the public names ------------------------------------------------------------------

def _save(path: Path, sd: dict, dtype=torch.float16, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, str(path), metadata=metadata)
    harness.refresh_file_lists()
    return path


def _checkpoint_parts(family: str):
    import comfy.sd

    cls, cfg = _config_class(family, tiny=False)
    mc = cls(dict(cfg))
    mc.set_inference_dtype(torch.float16, None)
    model = mc.get_model({}, "")  # comfy.ops layers: allocated, not initialised (filled below)
    clip = comfy.sd.CLIP(target=mc.clip_target({}))
    return mc, model, clip


def local_vae_state(sd: dict, neutral_rgb: tuple[float, float, float] = (0.1, 0.9, 0.1),
                    colour_gain: float = 3.0) -> dict:
    """Make a random SD VAE state decode like a trained one where the tests need it.

    * Local: the residual branches of its ResNet and attention blocks are zeroed (the zero-init-residual
      scheme: every block starts as the identity). With full random branches every output pixel depends
      on the whole latent (the mid block's global attention, a receptive field of ~17 latent pixels), so
      nothing decodes flat at test sizes; now a flat latent region decodes to a flat colour a couple of
      latent pixels in from its edge.
    * Green canvas: the output conv's bias makes a neutral decoder feature decode to ``neutral_rgb``
      (key green). A trained VAE decodes the green canvas latent to green; a random one decodes it to
      an arbitrary, usually greyish colour no keyer could call a screen. Sampled content far from the
      canvas latent decodes to colours all over the cube (``colour_gain`` scales the output conv: N(0,
      1/fan_in) weights alone keep colours within about +-0.25 of the neutral one).
    """
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(("conv2.weight", "conv2.bias", "proj_out.weight", "proj_out.bias")):
            out[k] = torch.zeros_like(v)
    out["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"] * colour_gain
    out["decoder.conv_out.bias"] = torch.tensor(neutral_rgb, dtype=sd["decoder.conv_out.bias"].dtype) * 2 - 1
    return out


def write_checkpoint(folder: str, name: str, family: str, seed: int = 0) -> Path:
    """A random-weight single-file checkpoint (UNet + text encoder(s) + VAE, float16) that
    CheckpointLoaderSimple loads as ``family`` ("sd15" or "sdxl"). Written once per session and name."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    path = harness.model_path(folder, name)
    if path.is_file():
        return path
    _mc, model, clip = _checkpoint_parts(family)
    randomize(model.diffusion_model, seed=seed, fast=True)
    randomize(clip.cond_stage_model, seed=seed + 1, fast=True)
    probe = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    vae_sd = local_vae_state(random_state(probe.state_dict(), seed=seed + 2, fast=True))
    del probe
    sd = model.state_dict_for_saving(clip.get_sd(), vae_sd, None)
    return _save(path, sd, metadata={"modelspec.architecture": f"dm-test-random-{family}"})


def write_lora_file(name: str, family: str, seed: int = 10, rank: int = 4) -> Path:
    """A kohya LoRA for the checkpoints of :func:`write_checkpoint` (UNet attention + text-encoder
    self-attention projections) in models/loras."""
    mc, model, clip = _checkpoint_parts(family)
    prefixes = {"clip_l.": "lora_te"} if family == "sd15" else {"clip_l.": "lora_te1", "clip_g.": "lora_te2"}
    sd = lora_state(model.diffusion_model.state_dict(), seed, rank, clip.cond_stage_model.state_dict(), prefixes)
    return _save(harness.model_path("loras", name), sd)


def write_controlnet(name: str, family: str = "sd15", seed: int = 20) -> Path:
    """A ControlNet (LDM layout, ``control_model.`` keys like the lllyasviel v1.1 files) of the
    :func:`write_checkpoint` architecture, with non-zero zero-convs, in models/controlnet."""
    cn = _controlnet_module(family, tiny=False, dtype=torch.float16)
    sd = random_state(cn.state_dict(), seed, fast=True)
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sd.items():  # trained-like: zero convs and the hint block's last conv are not zero
        if ("zero_convs" in k or "middle_block_out" in k or "input_hint_block.14" in k) and k.endswith("weight"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
    return _save(harness.model_path("controlnet", name), {"control_model." + k: v for k, v in sd.items()})


# ---- BackgroundMattingV2 (GreenPost's optional refiner) -------------------------------------------------

def write_bmv2(name: str, backbone: str = "mobilenetv2", seed: int = 0) -> Path:
    """A random-weight BackgroundMattingV2 ``MattingRefine`` as a plain ``.pth`` state dict (the layout of
    the authors' ``pytorch_<backbone>.pth``: ``torch.save(model.state_dict())``) in models/background_matting.

    BatchNorm statistics and scales are positive (running_var, weights in [0.5, 1.5]), biases and running
    means small, kernels N(0, 2/fan_in); the alpha channel of the decoder's and the refiner's last conv gets
    a bias of 0.5, so the random network's alpha is unsaturated (neither all 0 nor all 1)."""
    from diffusion_matting.py import background_matting as BM

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in BM.build_bmv2(backbone).state_dict().items():
        if not v.is_floating_point():
            sd[k] = v.clone()
        elif k.endswith("running_var") or (v.ndim == 1 and k.endswith("weight")):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        else:
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / max(1, v[0].numel()))
    for k in ("decoder.conv4.bias", "refiner.conv4.bias"):
        sd[k][0] = 0.5
    path = harness.model_path("background_matting", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    harness.refresh_file_lists()
    return path
