"""Train DiffuMatting (``diffusion-matting train diffumatting``): an SD UNet that paints subjects on a pure
green canvas, plus the matting head on the VAE decoder (Hu et al., ECCV 2024), with diffusers + accelerate.

Recipe:

* data: Green100K-style folders (:mod:`green_dataset`: ``image/ alpha/ fg/ captions.jsonl``, built with
  ``diffusion-matting dataset green-canvas``) and/or procedural subjects on green (``--procedural N``);
  square crops at ``--resolution``, flips, caption dropout (for classifier-free guidance);
* losses (:mod:`diffumatting_losses`, each with a weight and an on/off switch):
  ``L = w_noise L_noise + w_green L_g + w_detail L_detail + w_latent L_latent``;
* two stages: steps ``< --stage1-steps`` train generation only (``L_noise + L_g + L_detail``; the head is
  untouched); later steps train jointly with the matting head (``+ L_latent``: the head on the decoder's
  ``norm_out`` input for the UNet's x0 estimate, gradients reaching the UNet through the frozen decoder -
  or, ``--head-input gt``, for the clean latent, head only);
* full fine-tune or LoRA (our own small LoRA on the attention projections ``to_q/to_k/to_v/to_out.0``;
  the `peft` package is not required) - exports merge the LoRA into the weights;
* frozen VAE and text encoder; EMA optional; resume from ``OUT/checkpoint``; ``log.jsonl``; validation
  (GSG of samples generated from held-out captions, and the head's IoU/SAD/MAD on held-out composites);
* export: ``diffumatting_unet.safetensors`` (UNet, LDM keys: ComfyUI ``models/diffusion_models``),
  ``diffumatting.safetensors`` (single-file checkpoint for ``models/checkpoints``; includes the VAE and,
  for a single-file base, its text encoder) and ``matting_head.safetensors`` (``models/matting_heads``).

Bases (``--base``): a diffusers pipeline folder (``unet/ vae/ text_encoder/ tokenizer/``; the CLIP text
encoder needs the ``transformers`` package), a single-file SD1.x/SD2.x checkpoint (then ``--text-encoder``
names a transformers CLIP folder or pipeline), or ``tiny-sd15`` / ``tiny-sd2`` (random tiny UNets of the
real architectures, with ``--vae tiny`` and the word-hash text encoder: CPU proofs and tests only).
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import diffumatting_losses as L
from .errors import UserError
from .green_dataset import GreenFolder, Mixture, ProceduralGreen, fixed_batch, make_batch
from .matting_head import (MattingHead, MattingHeadConfig, decode_with_features_diffusers, features_diffusers,
                           load_matting_head, save_matting_head)
from .train_drip import _EMA, VAECodec
from .train_matting_head import evaluate as evaluate_head
from .train_matting_head import guess_vae_family

CHECKPOINT_DIR = "checkpoint"
UNET_EXPORT = "diffumatting_unet.safetensors"
CKPT_EXPORT = "diffumatting.safetensors"
HEAD_EXPORT = "matting_head.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ------------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * up(down(x))``; ``base`` frozen, ``up`` starts at zero (no change at init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / self.rank
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.up.weight.float() @ self.down.weight.float()).to(self.base.weight)


def apply_lora(unet, rank: int, alpha: float | None = None, targets=LORA_TARGETS) -> list[nn.Parameter]:
    """Freeze ``unet`` and wrap the attention projections (``attn1``/``attn2`` of every transformer block)
    with :class:`LoRALinear`. Returns the new trainable parameters."""
    unet.requires_grad_(False)
    params = []
    for name, mod in list(unet.named_modules()):
        if not name.endswith(("attn1", "attn2")):
            continue
        for t in targets:
            parent, attr = (mod.to_out, 0) if t == "to_out.0" else (mod, t)
            lin = parent[attr] if t == "to_out.0" else getattr(parent, attr)
            if isinstance(lin, LoRALinear) or not isinstance(lin, nn.Linear):
                continue
            wrapped = LoRALinear(lin, rank, alpha)
            if t == "to_out.0":
                parent[0] = wrapped
            else:
                setattr(parent, attr, wrapped)
            params += [wrapped.down.weight, wrapped.up.weight]
    if not params:
        raise UserError("LoRA: no attention projections found in the UNet")
    return params


# ------------------------------------------------------------------------------------- text encoders
class HashTextEncoder:
    """Word-level text encoder for CPU proofs and tests (no weights): ``<s>`` + words, each word a fixed
    pseudo-random vector (seeded by its CRC32) plus a sinusoidal position code; ``[B, length, width]``."""

    name = "word-hash"

    def __init__(self, width: int, length: int = 16, seed: int = 0):
        self.width, self.length, self.seed = int(width), int(length), int(seed)
        pos = torch.arange(self.length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(1000.0) * torch.arange(0, self.width, 2, dtype=torch.float32) / self.width)
        pe = torch.zeros(self.length, self.width)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : self.width // 2]
        self.pos = pe * 0.3

    @staticmethod
    def words(caption: str) -> list[str]:
        return [w for w in (x.strip(",.;:()!?\"'") for x in caption.lower().split()) if w]

    def _vec(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()) ^ self.seed)
        return torch.randn(self.width, generator=g)

    def encode(self, captions: list[str], key_words=("green",)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [B,L,width], key token mask [B,L])``."""
        embs, masks = [], []
        keys = {k.lower() for k in key_words}
        for cap in captions:
            toks = ["<s>"] + self.words(cap)[: self.length - 1]
            e = torch.zeros(self.length, self.width)
            m = torch.zeros(self.length)
            for i, w in enumerate(toks):
                e[i] = self._vec(w)
                m[i] = float(w in keys)
            embs.append(e + self.pos)
            masks.append(m)
        return torch.stack(embs), torch.stack(masks)


class ClipTextEncoder:
    """A frozen transformers CLIP text encoder: the last hidden state, as diffusers' SD pipelines use it (SD2
    pipeline folders ship the OpenCLIP encoder already cut to its penultimate layer); ``penultimate=True``
    takes the layer before the last (through the final layer norm) for full-depth encoders. Key tokens are
    located by their ids."""

    name = "clip"

    def __init__(self, folder: str | os.PathLike, penultimate: bool = False, device="cpu"):
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise UserError("the CLIP text encoder needs the `transformers` package (pip install transformers)") from None
        root = Path(folder)
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        enc_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        try:
            self.tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            self.enc = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"{folder}: cannot load a CLIP tokenizer + text encoder ({exc})") from None
        self.enc.requires_grad_(False)
        self.penultimate = penultimate
        self.width = int(self.enc.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str], key_words=("green",)):
        from .green_canvas import find_key_token_indices

        ids = self.tok(captions, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        dev = next(self.enc.parameters()).device
        out = self.enc(ids.to(dev), output_hidden_states=self.penultimate)
        h = self.enc.text_model.final_layer_norm(out.hidden_states[-2]) if self.penultimate else out.last_hidden_state
        mask = torch.zeros(ids.shape)
        for w in key_words:
            kid = self.tok(w, add_special_tokens=False).input_ids
            for b in range(ids.shape[0]):
                for j in find_key_token_indices([ids[b].tolist()], kid):
                    mask[b, j] = 1.0
        return h.float().cpu(), mask


# ------------------------------------------------------------------------------------------ config
@dataclass
class DiffuMattingConfig:
    steps: int = 20000
    stage1_steps: int = 10000          # generation-only steps; then joint with the matting head
    batch_size: int = 8
    lr: float = 1e-5
    head_lr: float = 1e-4
    weight_decay: float = 0.0
    resolution: int = 512
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    prediction_type: str = "epsilon"
    use_noise: bool = True
    use_green: bool = True
    use_detail: bool = True
    use_latent: bool = True
    w_noise: float = 1.0
    w_green: float = 1.0
    w_detail: float = 0.1
    w_latent: float = 1.0
    dice_weight: float = 1.0
    detail_space: str = "latent"       # "latent" (Eq. 6 space) or "pixel" (decoded x0 estimate)
    detail_norm: str = "l2"
    head_input: str = "x0_pred"        # "x0_pred" (joint, gradients into the UNet) or "gt" (clean latent)
    detail_max_timestep: int = 500     # L_detail only for samples with t < this (see compute_losses)
    latent_max_timestep: int = 500     # L_latent (head on the x0 estimate) only for samples with t < this
    key_words: tuple = ("green",)
    caption_dropout: float = 0.0
    lora_rank: int = 0                 # 0 = full fine-tune
    lora_alpha: float | None = None
    ema: bool = False
    ema_decay: float = 0.9999
    head: dict = field(default_factory=lambda: asdict(MattingHeadConfig()))
    log_every: int = 50
    save_every: int = 1000
    val_every: int = 0                 # 0: validate at the start and the end only
    validate: bool = True              # False: no validation at all (GSG sampling costs val_steps UNet calls)
    val_count: int = 4
    val_steps: int = 20
    val_guidance: float = 1.0
    key_color: str = "#00ff00"
    seed: int = 0

    def check(self) -> None:
        if self.prediction_type not in L.PREDICTIONS:
            raise UserError(f"prediction type must be one of {L.PREDICTIONS}")
        if self.detail_space not in ("latent", "pixel"):
            raise UserError("--detail-space must be latent or pixel")
        if self.head_input not in ("x0_pred", "gt"):
            raise UserError("--head-input must be x0_pred or gt")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_count", "val_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.stage1_steps < 0 or self.save_every < 0 or self.val_every < 0:
            raise UserError("--stage1-steps, --save-every and --val-every must be >= 0")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if not 0 <= self.caption_dropout < 1:
            raise UserError("--caption-dropout must be in [0, 1)")


# ------------------------------------------------------------------------------------ one train step
def _noise_schedule(prediction_type: str):
    from diffusers import DDPMScheduler

    from .drip.sampling import SD_SCHEDULE

    return DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)


def _raw_latent(codec: VAECodec, z: torch.Tensor) -> torch.Tensor:
    return z / codec.scale + codec.shift


def compute_losses(unet, codec: VAECodec, head, store, sched, images, alpha, emb, key_mask, t, noise,
                   cfg: DiffuMattingConfig, joint: bool) -> dict[str, torch.Tensor]:
    """All enabled losses for one batch (``images`` 0..1 ``[B,3,H,W]``, ``alpha`` ``[B,1,H,W]``, text
    ``emb`` ``[B,T,D]``, ``key_mask`` ``[B,T]``, timesteps ``t``, ``noise`` like the latents).
    Returns ``{"loss": total, "noise": ..., "green": ..., "detail": ..., "latent": ...}`` (enabled terms;
    a term is absent when no sample of the batch qualifies). The x0 estimate (Eq. 6) divides by
    ``sqrt(a_t)`` (down to ~0.07 at t = 999), amplifying the noise-prediction error 14x, so L_detail and the
    head's L_latent use only samples with ``t`` below ``detail_max_timestep`` / ``latent_max_timestep``
    (our choice; the paper does not say)."""
    device = noise.device
    z0 = codec.encode(images).to(device)
    ac = sched.alphas_cumprod
    zt = sched.add_noise(z0, noise, t)
    valid_g = key_mask.sum(1) > 0
    record = cfg.use_green and store is not None and bool(valid_g.any())
    if record:
        store.begin(key_mask.to(device), z0.shape[-2:])
    try:
        out = unet(zt, t, encoder_hidden_states=emb.to(device)).sample
    finally:
        if store is not None:
            store.stop()
    terms: dict[str, torch.Tensor] = {}
    total = out.new_zeros((), dtype=torch.float32)
    if cfg.use_noise:
        terms["noise"] = L.noise_loss(out, L.diffusion_target(z0, noise, ac, t, cfg.prediction_type))
        total = total + cfg.w_noise * terms["noise"]
    if record:
        a_lat = F.interpolate(alpha.to(device).float(), size=z0.shape[-2:], mode="area")
        terms["green"] = L.green_attention_loss(store.mean_map(z0.shape[-2:]), a_lat, valid_g.to(device))
        total = total + cfg.w_green * terms["green"]
    need_x0 = cfg.use_detail or (joint and cfg.use_latent and cfg.head_input == "x0_pred")
    x0 = L.predicted_x0(zt, out, ac, t, cfg.prediction_type) if need_x0 else None
    rgb = feat = None
    if joint and cfg.use_latent and cfg.head_input == "x0_pred" and cfg.use_detail and cfg.detail_space == "pixel":
        rgb, feat = decode_with_features_diffusers(codec.vae, _raw_latent(codec, x0).to(codec.vae.dtype))
    sel_d = t < cfg.detail_max_timestep
    if cfg.use_detail and bool(sel_d.any()):
        if cfg.detail_space == "latent":
            a_lat = F.interpolate(alpha.to(device).float(), size=z0.shape[-2:], mode="area")
            terms["detail"] = L.detail_loss(x0[sel_d], z0[sel_d], a_lat[sel_d], cfg.detail_norm)
        else:
            if rgb is None:
                rgb = codec.vae.decode(_raw_latent(codec, x0[sel_d]).to(codec.vae.dtype)).sample
            else:
                rgb = rgb[sel_d]
            terms["detail"] = L.detail_loss(rgb.float(), images.to(device)[sel_d] * 2 - 1, alpha.to(device)[sel_d],
                                            cfg.detail_norm)
        total = total + cfg.w_detail * terms["detail"]
    if joint and cfg.use_latent and head is not None:
        sel = t < cfg.latent_max_timestep if cfg.head_input == "x0_pred" else torch.ones_like(t, dtype=torch.bool)
        if bool(sel.any()):
            if cfg.head_input == "gt":
                with torch.no_grad():
                    feat = features_diffusers(codec.vae, _raw_latent(codec, z0[sel]).to(codec.vae.dtype))
            elif feat is None:
                feat = features_diffusers(codec.vae, _raw_latent(codec, x0[sel]).to(codec.vae.dtype))
            else:
                feat = feat[sel]
            pred = head(feat.float())
            terms["latent"] = L.matting_head_loss(pred, alpha.to(device)[sel].float(), cfg.dice_weight)
            total = total + cfg.w_latent * terms["latent"]
    terms["loss"] = total
    return terms


# -------------------------------------------------------------------------------------- validation
@torch.no_grad()
def generate(unet, codec: VAECodec, text, captions: list[str], size: int, steps: int, guidance: float,
             prediction_type: str, seed: int = 1234) -> torch.Tensor:
    """DDIM samples for ``captions`` (fixed noise): images ``[B,3,S,S]`` in 0..1."""
    from diffusers import DDIMScheduler

    from .drip.sampling import SD_SCHEDULE

    sched = DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing",
                          clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    device = next(unet.parameters()).device
    emb, _ = text.encode(captions)
    null, _ = text.encode([""] * len(captions))
    f = codec.factor
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(captions), codec.channels, size // f, size // f), generator=g).to(device)
    was = unet.training
    unet.eval()
    for t in sched.timesteps:
        tt = t.expand(x.shape[0]).to(device)
        if guidance == 1.0:
            eps = unet(x, tt, encoder_hidden_states=emb.to(device)).sample
        else:
            both = unet(torch.cat([x, x]), torch.cat([tt, tt]),
                        encoder_hidden_states=torch.cat([emb, null]).to(device)).sample
            c, u = both.chunk(2)
            eps = u + guidance * (c - u)
        x = sched.step(eps, t, x).prev_sample
    unet.train(was)
    return codec.decode(x).cpu()


@torch.no_grad()
def held_out_green_loss(unet, codec, store, text, val, cfg: DiffuMattingConfig) -> dict:
    """L_g on the held-out composites at fixed timesteps (evenly spread over 50..950) and fixed noise, and the
    L_g of the best spatially constant map (per image: the mean background fraction) - a map below that
    baseline knows *where* the background is."""
    images, alphas, captions = val
    emb, key = text.encode(captions, cfg.key_words)
    valid = key.sum(1) > 0
    if store is None or not bool(valid.any()):
        return {}
    device = next(unet.parameters()).device
    z0 = codec.encode(images).to(device)
    n = z0.shape[0]
    t = torch.linspace(50, 950, n).round().long().to(device)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(4321)).to(device)
    zt = _noise_schedule(cfg.prediction_type).add_noise(z0, noise, t)
    store.begin(key.to(device), z0.shape[-2:])
    try:
        unet(zt, t, encoder_hidden_states=emb.to(device))
        amap = store.mean_map(z0.shape[-2:])
    finally:
        store.stop()
    a_lat = F.interpolate(alphas.to(device).float(), size=z0.shape[-2:], mode="area")
    bg = 1 - a_lat[:, 0]
    const = ((bg - bg.mean((1, 2), keepdim=True)) ** 2).flatten(1).mean(1)
    v = valid.to(device).float()
    return {"green_loss": float(L.green_attention_loss(amap, a_lat, valid.to(device))),
            "green_loss_constant_map": float((const * v).sum() / v.sum())}


@torch.no_grad()
def validate(unet, codec, head, text, val, cfg: DiffuMattingConfig, store=None) -> dict:
    """GSG (mean over generated samples, 0..255 RGB distance of the dominant colour from the key colour; the
    same for the held-out composites, and for their VAE reconstructions - the floor reachable through this
    VAE), held-out L_g (:func:`held_out_green_loss`) and
    the head's IoU/SAD/MAD on the composites."""
    from .metrics import gsg

    images, alphas, captions = val
    gen = generate(unet, codec, text, captions, cfg.resolution, cfg.val_steps, cfg.val_guidance, cfg.prediction_type)
    recon = codec.decode(codec.encode(images)).cpu()
    score = lambda batch: float(np.mean([gsg(im.permute(1, 2, 0).numpy(), cfg.key_color) for im in batch]))  # noqa: E731
    out = {"gsg": score(gen), "gsg_data": score(images), "gsg_vae_recon": score(recon)}
    out.update(held_out_green_loss(unet, codec, store, text, val, cfg))
    if head is not None:
        out["head"] = evaluate_head(head, codec.vae, images, alphas[:, :1])
    return out


# ---------------------------------------------------------------------------------------- training
def _save_state(ckpt: Path, unet, head, opt, ema, step: int, cfg, vae_family: str, latent_channels: int):
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "unet.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}, str(tmp),
              metadata={"step": str(step)})
    os.replace(tmp, ckpt / "unet.safetensors")
    if ema is not None:
        tmp = ckpt / "ema.safetensors.tmp"
        save_file({f"p{i}": s.contiguous().cpu() for i, s in enumerate(ema.shadow)}, str(tmp))
        os.replace(tmp, ckpt / "ema.safetensors")
    save_matting_head(ckpt / "head.safetensors", head, vae_family, latent_channels, {"train_step": str(step)})
    tmp = ckpt / "train_state.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "step": step, "config": json.dumps(asdict(cfg), default=list)}, tmp)
    os.replace(tmp, ckpt / "train_state.pt")


def resolve_resume(resume, out_dir: Path) -> Path:
    p = out_dir / CHECKPOINT_DIR if str(resume) == "auto" else Path(resume)
    if (p / CHECKPOINT_DIR).is_dir():
        p = p / CHECKPOINT_DIR
    for need in ("unet.safetensors", "head.safetensors", "train_state.pt"):
        if not (p / need).is_file():
            raise UserError(f"--resume: {p / need} not found")
    return p


def _step_generator(seed: int, step: int, micro: int, proc: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 131 + micro * 7 + proc) % (2 ** 63))


def train_diffumatting(unet, vae, text, train_data, val_data, cfg: DiffuMattingConfig, out_dir,
                       resume=None, accelerator=None, log=print, export: dict | None = None) -> dict:
    """Train ``unet`` (a diffusers ``UNet2DConditionModel``; LoRA applied here when ``cfg.lora_rank``) and a
    matting head on the frozen ``vae`` (diffusers ``AutoencoderKL``) with captions encoded by ``text``.

    ``export``: ``{"vae_source", "base", "dtype", "checkpoint"}`` options of the final export.
    Returns ``{"initial", "final", "losses": [per-step dicts], "export": {...}, "step"}``."""
    from accelerate import Accelerator

    cfg.check()
    export = dict(export or {})
    acc = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    main = acc.is_main_process
    out_dir = Path(out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = acc.device
    torch.manual_seed(cfg.seed)
    codec = VAECodec(vae.to(device))
    vae_family = guess_vae_family(vae, export.get("vae_source"))
    feat_ch = vae.decoder.conv_norm_out.num_channels
    head_cfg = MattingHeadConfig(**{**cfg.head, "in_channels": feat_ch})
    cfg.head = asdict(head_cfg)
    head = MattingHead(head_cfg).to(device)
    sched = _noise_schedule(cfg.prediction_type)
    T = sched.config.num_train_timesteps
    store = L.install_attention_recorder(unet) if cfg.use_green else None
    if cfg.lora_rank > 0:
        unet_params = apply_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    else:
        unet.requires_grad_(True)
        unet_params = [p for p in unet.parameters() if p.requires_grad]
    unet.to(device).train()
    start = 0
    rdir = None
    if resume is not None:
        from safetensors.torch import load_file

        rdir = resolve_resume(resume, out_dir)
        unet.load_state_dict(load_file(str(rdir / "unet.safetensors")))
        loaded, _ = load_matting_head(rdir / "head.safetensors")
        if loaded.config != head_cfg:
            raise UserError(f"--resume: checkpoint head {loaded.config} differs from {head_cfg}")
        head.load_state_dict(loaded.state_dict())
    ema = _EMA(unet_params, cfg.ema_decay) if cfg.ema else None
    if ema is not None and rdir is not None and (rdir / "ema.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(rdir / "ema.safetensors"))
        for i, s in enumerate(ema.shadow):
            s.copy_(sd[f"p{i}"])
    groups = [{"params": unet_params, "lr": cfg.lr}, {"params": list(head.parameters()), "lr": cfg.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    unet_p, head_p, opt = acc.prepare(unet, head, opt)
    if rdir is not None:
        state = torch.load(rdir / "train_state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"resumed from {rdir} at step {start}")
    base, head_u = acc.unwrap_model(unet_p), acc.unwrap_model(head_p)
    val = fixed_batch(val_data if len(val_data) else train_data, cfg.val_count, cfg.resolution, 10_000 + cfg.seed)
    res: dict = {}
    log_path = out_dir / "log.jsonl"

    def write(rec):
        if main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    if main and cfg.validate:
        res["initial"] = validate(base, codec, head_u, text, val, cfg, store)
        write({"step": start, "val": res["initial"]})
        log(f"step {start}: {json.dumps(res['initial'])}")
    losses, t0 = [], time.time()
    per_proc = max(1, cfg.batch_size // (acc.num_processes * cfg.grad_accum))
    step = start
    while step < cfg.steps:
        joint = step >= cfg.stage1_steps
        for micro in range(cfg.grad_accum):
            rng = np.random.default_rng([cfg.seed, acc.process_index, step, micro])
            g = _step_generator(cfg.seed, step, micro, acc.process_index)
            with acc.accumulate(unet_p):
                images, alpha, caps = make_batch(train_data, per_proc, cfg.resolution, rng)
                if cfg.caption_dropout > 0:
                    caps = ["" if rng.random() < cfg.caption_dropout else c for c in caps]
                emb, key_mask = text.encode(caps, cfg.key_words)
                t = torch.randint(0, T, (per_proc,), generator=g).to(device)
                noise = torch.randn((per_proc, codec.channels, cfg.resolution // codec.factor,
                                     cfg.resolution // codec.factor), generator=g).to(device)
                terms = compute_losses(unet_p, codec, head_p, store, sched, images.to(device), alpha.to(device),
                                       emb, key_mask, t, noise, cfg, joint)
                acc.backward(terms["loss"])
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(unet_params + list(head_u.parameters()), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(step)
        rec = {k: float(v.detach()) for k, v in terms.items()}
        losses.append(rec)
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            window = losses[-cfg.log_every:]
            row = {"step": step, "stage": 2 if joint else 1, "sec": round(time.time() - t0, 1)}
            row.update({k: round(float(np.mean([w[k] for w in window if k in w])), 6) for k in rec})
            write(row)
            log(json.dumps(row))
        if main and cfg.validate and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            m = validate(base, codec, head_u, text, val, cfg, store)
            write({"step": step, "val": m})
            log(f"step {step}: {json.dumps(m)}")
        if main and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save_state(out_dir / CHECKPOINT_DIR, base, head_u, opt, ema, step, cfg, vae_family,
                        codec.channels)
    acc.wait_for_everyone()
    res.update({"losses": losses, "step": step})
    if main:
        _save_state(out_dir / CHECKPOINT_DIR, base, head_u, opt, ema, step, cfg, vae_family, codec.channels)
        if ema is not None:   # evaluate and export the EMA weights
            named = {id(p): s for p, s in zip(ema.params, ema.shadow)}
            with torch.no_grad():
                for p in ema.params:
                    p.copy_(named[id(p)].to(p.dtype))
        if cfg.validate:
            res["final"] = validate(base, codec, head_u, text, val, cfg, store)
            write({"step": step, "val": res["final"]})
            log(f"step {step}: {json.dumps(res['final'])}")
        res["export"] = export_all(base, head_u, codec, out_dir, cfg, vae_family, export, step)
        log(f"wrote {', '.join(res['export'].values())}")
    return res


def export_all(unet, head, codec: VAECodec, out_dir: Path, cfg: DiffuMattingConfig, vae_family: str,
               export: dict, step: int) -> dict:
    from .diffumatting_export import (merged_unet_state_dict, save_checkpoint_file, save_unet_file,
                                      text_encoder_tensors, vae_tensors_for_checkpoint)

    sd = merged_unet_state_dict(unet)
    meta = {"prediction_type": cfg.prediction_type, "train_steps": str(step), "key_words": list(cfg.key_words),
            "base": str(export.get("base", "")), "recipe": json.dumps(asdict(cfg), default=list)}
    dtype = export.get("dtype")
    paths = {"unet": str(save_unet_file(out_dir / UNET_EXPORT, sd, unet.config, dtype, meta))}
    if export.get("checkpoint", True):
        paths["checkpoint"] = str(save_checkpoint_file(
            out_dir / CKPT_EXPORT, sd, unet.config, vae_tensors_for_checkpoint(codec.vae, export.get("vae_source")),
            text_encoder_tensors(export.get("base")), dtype, meta))
    paths["head"] = str(save_matting_head(out_dir / HEAD_EXPORT, head, vae_family, codec.channels,
                                          {"train_steps": str(step), "trained_with": "diffumatting"}))
    return paths


# ------------------------------------------------------------------------------------ model loading
def tiny_vae(seed: int = 0):
    """A small diffusers ``AutoencoderKL`` (2 levels of 32 channels: 2x downsampling, 4 latent channels,
    quant convs, mid attention) with seeded random weights - tests and CPU proofs only."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=32).eval().requires_grad_(False)


def build_models(args, log=print):
    """(unet, vae, text encoder, family, prediction type, export options) from the CLI arguments."""
    from .drip import model as M
    from .train_matting_head import load_vae

    vae_source = None
    if args.base.startswith("tiny-"):
        family = args.base[len("tiny-"):]
        if family not in M.BASE_CONFIGS:
            raise UserError("--base tiny-sd15 or tiny-sd2")
        torch.manual_seed(args.seed)
        unet = M.build_unet(M.base_config(family, tiny=True))
        pred = "epsilon" if args.prediction_type == "auto" else args.prediction_type
        log(f"tiny random {family} UNet (testing only)")
    else:
        unet, family = M.load_base_unet(args.base, None if args.family == "auto" else args.family)
        pred = args.prediction_type
        if pred == "auto":
            sc = Path(args.base) / "scheduler" / "scheduler_config.json"
            pred = json.loads(sc.read_text()).get("prediction_type", "epsilon") if sc.is_file() else \
                ("v_prediction" if family == "sd2" else "epsilon")
    if args.vae == "tiny":
        vae = tiny_vae(args.seed)
    else:
        spec = args.vae
        if spec == "auto":
            if args.base.startswith("tiny-"):
                raise UserError("--vae is needed with a tiny base (a VAE file/folder, or 'tiny')")
            spec = str(Path(args.base) / "vae") if (Path(args.base) / "vae").is_dir() else args.base
        vae = load_vae(spec)
        vae_source = spec
    width = unet.config.cross_attention_dim
    spec = args.text_encoder
    if spec == "auto":
        spec = "hash" if args.base.startswith("tiny-") else args.base
    if spec == "hash":
        text = HashTextEncoder(width, seed=args.seed)
    else:
        if not Path(spec).is_dir():
            raise UserError(f"--text-encoder {spec}: needs a transformers CLIP folder or a diffusers pipeline "
                            "folder (text_encoder/ + tokenizer/); a single-file base carries no tokenizer")
        text = ClipTextEncoder(spec)
        if text.width != width:
            raise UserError(f"text encoder width {text.width} != the UNet's cross-attention width {width}")
    return unet, vae, text, family, pred, {"vae_source": vae_source, "base": args.base}


# ------------------------------------------------------------------------------------------- CLI
def register_train(subparsers) -> None:
    d = DiffuMattingConfig()
    p = subparsers.add_parser(
        "diffumatting", help="fine-tune SD to paint on a green canvas + train the matting head (DiffuMatting)",
        description="DiffuMatting training: L_noise + green-attention loss L_g + transition-detail loss L_detail, "
                    "then jointly with the matting head (L_latent = L1 + Dice). Full fine-tune or LoRA. "
                    "Multi-GPU: `accelerate launch -m diffusion_matting.py.cli train diffumatting ...`. Exports "
                    "the UNet for ComfyUI (models/diffusion_models), a single-file checkpoint (models/checkpoints) "
                    "and the matting head (models/matting_heads).")
    p.add_argument("--base", required=True, help="diffusers pipeline folder, single-file SD1.x/SD2.x checkpoint, "
                                                 "or tiny-sd15 / tiny-sd2 (random, tests only)")
    p.add_argument("--family", default="auto", choices=("auto", "sd15", "sd2"))
    p.add_argument("--prediction-type", default="auto", choices=("auto",) + L.PREDICTIONS)
    p.add_argument("--vae", default="auto", help="VAE file/folder (auto: the base's); 'tiny' = random test VAE")
    p.add_argument("--text-encoder", default="auto", help="transformers CLIP folder or pipeline folder (auto: the "
                                                          "base folder); 'hash' = word-hash test encoder")
    p.add_argument("--data", nargs="*", default=[], help="Green100K-style folders (image/ alpha/ captions.jsonl)")
    p.add_argument("--procedural", type=int, default=0, help="add N procedural subjects on green")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--stage1-steps", type=int, default=d.stage1_steps, help="generation-only steps before joint training")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    for name in ("noise", "green", "detail", "latent"):
        p.add_argument(f"--w-{name}", type=float, default=getattr(d, f"w_{name}"), help=f"weight of L_{name}")
        p.add_argument(f"--no-{name}", action="store_true", help=f"switch L_{name} off")
    p.add_argument("--detail-space", default=d.detail_space, choices=("latent", "pixel"))
    p.add_argument("--head-input", default=d.head_input, choices=("x0_pred", "gt"),
                   help="head on the decoder feature of the UNet's x0 estimate (joint) or of the clean latent")
    p.add_argument("--detail-max-timestep", type=int, default=d.detail_max_timestep)
    p.add_argument("--latent-max-timestep", type=int, default=d.latent_max_timestep)
    p.add_argument("--key-words", nargs="+", default=list(d.key_words), help="caption words whose attention L_g shapes")
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tune")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--hidden", type=int, default=64, help="matting head hidden channels")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations (less memory)")
    p.add_argument("--resume", nargs="?", const="auto", default=None)
    p.add_argument("--export-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--no-checkpoint-export", action="store_true", help="only the UNet file and the head")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--val-every", type=int, default=d.val_every, help="0: at the start and the end only")
    p.add_argument("--no-val", action="store_true", help="skip validation (GSG sampling + head metrics)")
    p.add_argument("--val-count", type=int, default=d.val_count)
    p.add_argument("--val-steps", type=int, default=d.val_steps)
    p.add_argument("--val-guidance", type=float, default=d.val_guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args) -> int:
    from accelerate import Accelerator

    cfg = DiffuMattingConfig(
        steps=args.steps, stage1_steps=args.stage1_steps, batch_size=args.batch_size, lr=args.lr,
        head_lr=args.head_lr, weight_decay=args.weight_decay, resolution=args.resolution, grad_accum=args.grad_accum,
        use_noise=not args.no_noise, use_green=not args.no_green, use_detail=not args.no_detail,
        use_latent=not args.no_latent, w_noise=args.w_noise, w_green=args.w_green, w_detail=args.w_detail,
        w_latent=args.w_latent, detail_space=args.detail_space, head_input=args.head_input,
        detail_max_timestep=args.detail_max_timestep, latent_max_timestep=args.latent_max_timestep,
        key_words=tuple(args.key_words), caption_dropout=args.caption_dropout, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, ema=args.ema, ema_decay=args.ema_decay,
        head=asdict(MattingHeadConfig(hidden=args.hidden)), log_every=args.log_every, save_every=args.save_every,
        val_every=args.val_every, val_count=args.val_count, val_steps=args.val_steps,
        val_guidance=args.val_guidance, validate=not args.no_val, seed=args.seed)
    cfg.check()
    if args.lora_rank < 0:
        raise UserError("--lora-rank must be >= 0")
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum)
    log = print if acc.is_main_process else (lambda *a, **k: None)
    unet, vae, text, family, pred, export = build_models(args, log)
    cfg.prediction_type = pred
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % (8 * factor):
        raise UserError(f"--resolution must be a multiple of {8 * factor}")
    sources = [GreenFolder(d) for d in args.data]
    n_proc = args.procedural or (0 if sources else 32)
    if n_proc:
        sources.append(ProceduralGreen(n_proc, size=max(args.resolution, 64), seed=args.seed * 1000))
    data = Mixture(sources)
    order = np.random.default_rng(args.seed).permutation(len(data))
    n_val = min(cfg.val_count, max(1, len(data) // 10)) if len(data) >= 2 else 0
    val, train = data.subset(order[:n_val]), data.subset(order[n_val:])
    if not len(train):
        raise UserError("no training samples: give --data folders or --procedural N")
    log(f"{len(train)} training samples, {len(val)} held out; {family}, {pred}; text encoder {text.name}")
    export.update(dtype=getattr(torch, args.export_dtype), checkpoint=not args.no_checkpoint_export)
    train_diffumatting(unet, vae, text, train, val, cfg, args.out, resume=args.resume, accelerator=acc, log=log,
                       export=export)
    return 0
