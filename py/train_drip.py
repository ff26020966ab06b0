"""Train DRIP (``diffusion-matting train drip``): a Stable Diffusion UNet turned into a joint
foreground + alpha generator (see :mod:`.drip`).

Recipe (paper defaults): SD2 base, empty prompt; image X, trimap, foreground F (padded where alpha = 0 by
repeated 13x13 Gaussian blur) and alpha (copied to 3 channels) through the frozen SD VAE; UNet input per
branch ``[z_t, z_X, z_Tri]`` (conv_in from the base weight repeated 3x / 3), switcher codes on the time
embedding, cross-domain attention; eps (or v) MSE on both branches at the same timestep, annealed
multi-resolution noise, DDPM 1000 steps; Adam 1e-5, batch 96, 512 px, 30k iterations; inference
DPM-Solver++ 10 steps. Data: Composition-1k / Distinctions-646 / AIM-500 style folders (case folders
with ``alpha`` + ``fg`` (or ``image``), or RGBA cutouts) composited on the fly over background images
(``--bg``) or procedural textured backgrounds, with crops, flips and photometric jitter.

Multi-GPU / multi-node: ``accelerate launch -m diffusion_matting.py.cli train drip ...`` (unchanged code).
Output folder: ``log.jsonl``, ``checkpoint/`` (``unet.safetensors``, ``ema.safetensors``,
``train_state.pt``; ``--resume`` continues from it) and the export ``drip.safetensors`` (the single-file
format the ComfyUI DRIP Model Loader reads; copy it to ``ComfyUI/models/drip``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import alpha as A
from .drip import model as M
from .drip.attention import set_cross_domain
from .drip.checkpoint import PREDICTIONS, save_drip
from .drip.codes import interleave, stretch_pairs, tiled_codes
from .errors import UserError
from .train_matting_head import MatteItem, load_matte_items, procedural_items

EXPORT_NAME = "drip.safetensors"
CHECKPOINT_DIR = "checkpoint"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------ codecs
class VAECodec:
    """The frozen SD VAE: 0..1 images ``[B,3,H,W]`` <-> SD-scaled latents (posterior mode)."""

    name = "sd-vae"

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = int(vae.config.latent_channels)

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode((x01 * 2 - 1).to(self.device, dtype)).latent_dist.mode()
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode((z / self.scale + self.shift).to(self.device, dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


class PoolCodec:
    """Testing-only stand-in for the VAE (no weights): ``factor``-x average pooling of ``2x - 1`` plus a
    luminance channel (4 latent channels); decode = bilinear upsampling. Lets the DRIP training loop be
    proven on a CPU without SD weights; models trained with it only make sense with it."""

    name = "toy-pool"
    channels = 4

    def __init__(self, factor: int = 4, device="cpu"):
        self.factor = int(factor)
        self.device = torch.device(device)
        self.name = f"toy-pool{self.factor}"

    @torch.no_grad()
    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(x01.to(self.device).float() * 2 - 1, self.factor)
        return torch.cat([y, y.mean(1, keepdim=True)], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(z[:, :3].float(), scale_factor=self.factor, mode="bilinear", align_corners=False)
        return ((x + 1) / 2).clamp(0, 1)


# -------------------------------------------------------------------------------------------- data
@dataclass
class DRIPItem:
    fg: torch.Tensor        # [3,H,W] straight foreground, padded where alpha = 0
    alpha: torch.Tensor     # [1,H,W]
    name: str


def prepare_items(items: list[MatteItem], pad_iterations: int = 30, log=print) -> list[DRIPItem]:
    """Foreground padding once per item (DRIP: repeated 13x13 Gaussian blur where alpha = 0)."""
    out = []
    for it in items:
        fg = torch.from_numpy(np.ascontiguousarray(it.fg)).float()[None]
        al = torch.from_numpy(np.ascontiguousarray(it.alpha)).float()[None]
        padded = A.pad_foreground(fg, al, iterations=pad_iterations) if pad_iterations > 0 else fg
        out.append(DRIPItem(padded[0].permute(2, 0, 1).contiguous(), al, it.name))
    return out


def list_backgrounds(folders) -> list[Path]:
    paths: list[Path] = []
    for folder in folders or []:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"--bg: no such folder: {root}")
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not found:
            raise UserError(f"--bg {root}: no images")
        paths += found
    return paths


def procedural_background(res: int, rng: np.random.Generator) -> torch.Tensor:
    """A textured backdrop ``[3,R,R]``: colour gradient + smooth noise at two scales + optional stripes."""
    def field(cells):
        g = torch.from_numpy(rng.uniform(-1, 1, size=(3, cells + 2, cells + 2)).astype(np.float32))[None]
        return F.interpolate(g, size=(res, res), mode="bicubic", align_corners=True)[0]

    c0, c1 = rng.uniform(0, 1, size=(2, 3, 1, 1)).astype(np.float32)
    ramp = torch.linspace(0, 1, res).view(1, 1, res) if rng.random() < 0.5 else torch.linspace(0, 1, res).view(1, res, 1)
    bg = torch.from_numpy(c0) * (1 - ramp) + torch.from_numpy(c1) * ramp
    bg = bg + 0.25 * field(int(rng.integers(2, 6))) + 0.08 * field(int(rng.integers(10, 30)))
    if rng.random() < 0.3:
        freq = rng.uniform(4, 20)
        yy = torch.arange(res).float().view(res, 1)
        bg = bg + 0.1 * torch.sin(yy / res * freq * 2 * math.pi + torch.arange(res).float().view(1, res) / res * 3)
    return bg.clamp(0, 1)


def _load_bg(path: Path, res: int, rng: np.random.Generator) -> torch.Tensor:
    from .imageio import load_image

    img = load_image(path)[0][0].permute(2, 0, 1).float()
    h, w = img.shape[-2:]
    c = int(min(h, w) * rng.uniform(0.6, 1.0))
    y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    return F.interpolate(img[None, :, y:y + c, x:x + c], size=(res, res), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


def _jitter(x: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Photometric jitter of a ``[3,H,W]`` image: brightness, contrast, saturation, gamma."""
    if strength <= 0:
        return x
    b = 1 + rng.uniform(-0.2, 0.2) * strength
    c = 1 + rng.uniform(-0.2, 0.2) * strength
    s = 1 + rng.uniform(-0.3, 0.3) * strength
    g = math.exp(rng.uniform(-0.2, 0.2) * strength)
    mean = x.mean()
    x = (x - mean) * c + mean
    grey = x.mean(0, keepdim=True)
    x = (grey + (x - grey) * s) * b
    return x.clamp(0, 1) ** g


def training_trimap(alpha: torch.Tensor, erode_px: int, dilate_px: int) -> torch.Tensor:
    """Trimap ``[1,H,W]`` (0 / 0.5 / 1): definite fg = (alpha > 0.99) eroded, definite bg = outside
    (alpha > 0.01) dilated, every fractional pixel unknown."""
    fg = A.erode((alpha > 0.99).float(), erode_px)
    grown = A.dilate((alpha > 0.01).float(), dilate_px)
    tri = torch.full_like(alpha, 0.5)
    tri[grown < 0.5] = 0.0
    tri[fg > 0.5] = 1.0
    return tri


def make_batch(items: list[DRIPItem], n: int, res: int, rng: np.random.Generator, backgrounds=(),
               jitter: float = 1.0, trimap_px: tuple[int, int] = (4, 24)):
    """``n`` training composites: (image, trimap, fg, alpha), each ``[n,C,R,R]`` in 0..1 (trimap, alpha 1-ch).

    A square crop of 50-100 % of an item's shorter side (redrawn when almost empty/full), resized to
    ``res``, random flip, foreground and background jittered independently, composited over a random
    background (image crop or procedural texture); trimap radii drawn from ``trimap_px`` (scaled by
    ``res / 512``)."""
    imgs, tris, fgs, als = [], [], [], []
    lo, hi = (max(1, round(r * res / 512)) for r in trimap_px)
    for _ in range(n):
        it = items[int(rng.integers(len(items)))]
        H, W = it.alpha.shape[-2:]
        for _attempt in range(5):
            c = max(8, int(min(H, W) * rng.uniform(0.5, 1.0)))
            y, x = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
            a = it.alpha[:, y:y + c, x:x + c]
            if 0.03 < float(a.mean()) < 0.97:
                break
        f = it.fg[:, y:y + c, x:x + c]
        f = F.interpolate(f[None], size=(res, res), mode="bilinear", antialias=True, align_corners=False)[0]
        a = F.interpolate(a[None], size=(res, res), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
        if rng.random() < 0.5:
            f, a = f.flip(-1), a.flip(-1)
        f = _jitter(f.clamp(0, 1), rng, jitter)
        if backgrounds and rng.random() < 0.9:
            bg = _load_bg(backgrounds[int(rng.integers(len(backgrounds)))], res, rng)
        else:
            bg = procedural_background(res, rng)
        bg = _jitter(bg, rng, jitter)
        imgs.append((a * f + (1 - a) * bg).clamp(0, 1))
        tris.append(training_trimap(a, int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))))
        fgs.append(f)
        als.append(a)
    return torch.stack(imgs), torch.stack(tris), torch.stack(fgs), torch.stack(als)


# ------------------------------------------------------------------------------------------- noise
def multires_noise(shape, timesteps: torch.Tensor, num_train_timesteps: int = 1000, strength: float = 0.9,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Annealed multi-resolution (pyramid) noise: white noise plus bilinearly upsampled noise at 1/2, 1/4,
    ... resolution weighted ``s^i`` with ``s = strength * t / T`` per sample (so low-noise timesteps get
    nearly white noise), renormalised to unit variance per sample. ``strength = 0`` is plain noise."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator, device=device)
    if strength <= 0:
        return noise
    s = (strength * timesteps.float().to(noise.device) / num_train_timesteps).view(b, 1, 1, 1)
    i, scale = 1, 2
    while h // scale >= 1 and w // scale >= 1:
        low = torch.randn((b, c, max(1, h // scale), max(1, w // scale)), generator=generator, device=device)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * s ** i
        i, scale = i + 1, scale * 2
    return noise / noise.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------------------------- training
@dataclass
class DRIPTrainConfig:
    steps: int = 30000
    batch_size: int = 96            # samples (each gives an fg and an alpha UNet item)
    lr: float = 1e-5
    weight_decay: float = 0.0
    resolution: int = 512
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    prediction_type: str = "epsilon"
    multires_strength: float = 0.9
    cross_domain: bool = True
    ema: bool = False
    ema_decay: float = 0.9999
    jitter: float = 1.0
    trimap_min_px: int = 4
    trimap_max_px: int = 24
    log_every: int = 50
    save_every: int = 1000
    val_every: int = 0              # 0: validate at start and end only
    val_count: int = 8
    val_steps: int = 10
    val_sampler: str = "dpmpp_2m"
    seed: int = 0


def _val_set(items, n, res, seed, backgrounds, cfg):
    rng = np.random.default_rng(10_000 + seed)
    return make_batch(items, n, res, rng, backgrounds, jitter=0.0, trimap_px=(cfg.trimap_min_px, cfg.trimap_max_px))


@torch.no_grad()
def evaluate_drip(unet, codec, text_embedding, val, cfg: DRIPTrainConfig, chunk: int = 4) -> dict:
    """Sample the held-out composites (fixed noise), decode, clamp alpha to the trimap; SAD (/1000, per
    image, unknown region) of alpha and MSE of the foreground where alpha > 0."""
    from .drip.sampling import drip_sample_reference, make_scheduler
    from .metrics import sad

    image, tri, fg, alpha = val
    was = unet.training
    unet.eval()
    g = torch.Generator().manual_seed(1234)
    sads, fg_errs = [], []
    device = next(unet.parameters()).device
    for i in range(0, image.shape[0], chunk):
        sl = slice(i, i + chunk)
        zi = codec.encode(image[sl]).to(device)
        zt = codec.encode(tri[sl].expand(-1, 3, -1, -1)).to(device)
        noise = torch.randn((2 * zi.shape[0], *zi.shape[1:]), generator=g).to(device)
        zf, za = drip_sample_reference(unet, zi, zt, noise, make_scheduler(cfg.val_sampler, cfg.prediction_type),
                                       cfg.val_steps, text_embedding.to(device), cross_domain=cfg.cross_domain)
        pa = clamp_to_trimap(codec.decode(za).mean(1, keepdim=True).cpu(), tri[sl])
        pf = codec.decode(zf).cpu()
        for j in range(pa.shape[0]):
            t, a = tri[sl][j, 0], alpha[sl][j, 0]
            sads.append(sad(pa[j, 0].numpy(), a.numpy(), (t == 0.5).numpy()))
            m = (a > 0).float()
            fg_errs.append(float(((pf[j] - fg[sl][j]) ** 2 * m).sum() / (3 * m.sum()).clamp_min(1)))
    unet.train(was)
    return {"sad": float(np.mean(sads)), "fg_mse": float(np.mean(fg_errs))}


def clamp_to_trimap(alpha: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
    return torch.where(trimap > 0.75, torch.ones_like(alpha), torch.where(trimap < 0.25, torch.zeros_like(alpha), alpha))


def constant_alpha_baseline(val, value: float = 0.5) -> float:
    """SAD of ``alpha = value`` in the unknown region (known regions from the trimap)."""
    from .metrics import sad

    _, tri, _, alpha = val
    out = []
    for j in range(tri.shape[0]):
        t = tri[j, 0]
        out.append(sad(clamp_to_trimap(torch.full_like(t, value), t).numpy(), alpha[j, 0].numpy(), (t == 0.5).numpy()))
    return float(np.mean(out))


class _EMA:
    def __init__(self, params, decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def state_dict_for(self, unet) -> dict:
        ids = {id(p): s for p, s in zip(self.params, self.shadow)}
        return {k: ids.get(id(p), p.detach()).to(p.dtype) for k, p in unet.named_parameters()} | \
            {k: b for k, b in unet.named_buffers()}


def _save_unet(path: Path, state: dict, config: dict, extra: dict | None = None):
    from safetensors.torch import save_file

    meta = {"unet_config": json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")})}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def train_drip(unet, codec, text_embedding: torch.Tensor, train_items: list[DRIPItem], val_items: list[DRIPItem],
               cfg: DRIPTrainConfig, out_dir, base_family: str, backgrounds=(), resume=None, accelerator=None,
               log=print, export_layout: str = "diffusers", export_dtype: torch.dtype | None = None) -> dict:
    """Train a DRIP UNet (already converted: 12 input channels, switcher class embedding).

    Returns ``{"initial", "final", "constant_baseline", "losses", "export", "step"}`` (metrics from
    :func:`evaluate_drip` on fixed held-out composites)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    from .drip.sampling import SD_SCHEDULE

    if cfg.prediction_type not in PREDICTIONS:
        raise UserError(f"prediction type must be one of {PREDICTIONS}")
    acc = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    torch.manual_seed(cfg.seed + acc.process_index)
    rng = np.random.default_rng(cfg.seed * 7919 + acc.process_index)
    noise_sched = DDPMScheduler(**SD_SCHEDULE, prediction_type=cfg.prediction_type)
    T = noise_sched.config.num_train_timesteps
    set_cross_domain(unet, cfg.cross_domain)
    unet.train()
    start_step = 0
    if resume is not None:
        rdir = ckpt_dir if str(resume) == "auto" else Path(resume)
        if (rdir / CHECKPOINT_DIR).is_dir():
            rdir = rdir / CHECKPOINT_DIR
        for need in ("unet.safetensors", "train_state.pt"):
            if not (rdir / need).is_file():
                raise UserError(f"--resume: {rdir / need} not found")
        unet.load_state_dict(load_file(str(rdir / "unet.safetensors")))
    ema = _EMA(unet.parameters(), cfg.ema_decay) if cfg.ema else None
    if resume is not None and ema is not None and (rdir / "ema.safetensors").is_file():
        sd = load_file(str(rdir / "ema.safetensors"))
        named = dict(unet.named_parameters())
        lookup = {id(p): k for k, p in named.items()}
        for i, p in enumerate(ema.params):
            ema.shadow[i].copy_(sd[lookup[id(p)]].float())
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0 \
        else torch.optim.Adam(params, lr=cfg.lr)
    unet_p, opt = acc.prepare(unet, opt)
    if resume is not None:
        state = torch.load(rdir / "train_state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        rng = np.random.default_rng(cfg.seed * 7919 + acc.process_index + start_step)
        log(f"resumed from {rdir} at step {start_step}")
    device = acc.device
    emb = text_embedding.to(device).float()
    val = _val_set(val_items or train_items, cfg.val_count, cfg.resolution, cfg.seed, backgrounds, cfg)
    base = acc.unwrap_model(unet_p)
    res = {"constant_baseline": constant_alpha_baseline(val)}
    if acc.is_main_process:
        res["initial"] = evaluate_drip(base, codec, emb, val, cfg)
        log(f"held-out: constant-alpha SAD {res['constant_baseline']:.4f}; step {start_step} SAD "
            f"{res['initial']['sad']:.4f}, fg MSE {res['initial']['fg_mse']:.5f}")
    logf = open(out_dir / "log.jsonl", "a") if acc.is_main_process else None
    losses, t0 = [], time.time()
    step = start_step
    per_proc = max(1, cfg.batch_size // (acc.num_processes * cfg.grad_accum))
    while step < cfg.steps:
        with acc.accumulate(unet_p):
            image, tri, fg, alpha = make_batch(train_items, per_proc, cfg.resolution, rng, backgrounds, cfg.jitter,
                                               (cfg.trimap_min_px, cfg.trimap_max_px))
            zi = codec.encode(image).to(device)
            zt = codec.encode(tri.expand(-1, 3, -1, -1)).to(device)
            z0 = interleave(codec.encode(fg).to(device), codec.encode(alpha.expand(-1, 3, -1, -1)).to(device))
            b = zi.shape[0]
            t = torch.randint(0, T, (b,), device=device).repeat_interleave(2)   # same t for both branches
            noise = multires_noise(z0.shape, t, T, cfg.multires_strength, device=device)
            zt_noisy = noise_sched.add_noise(z0, noise, t)
            target = noise if cfg.prediction_type == "epsilon" else noise_sched.get_velocity(z0, noise, t)
            x = torch.cat([zt_noisy, stretch_pairs(zi, b), stretch_pairs(zt, b)], dim=1)
            out = unet_p(x, t, encoder_hidden_states=emb.expand(2 * b, -1, -1),
                         class_labels=tiled_codes(b, device=device)).sample
            loss = F.mse_loss(out.float(), target.float())
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.update(step)
        losses.append(float(loss.detach()))
        if logf and (step % cfg.log_every == 0 or step == cfg.steps):
            rec = {"step": step, "loss": float(np.mean(losses[-cfg.log_every:])), "sec": round(time.time() - t0, 1)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log(f"step {step}/{cfg.steps} loss {rec['loss']:.4f}")
        if acc.is_main_process and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            m = evaluate_drip(base, codec, emb, val, cfg)
            log(f"step {step}: held-out SAD {m['sad']:.4f}")
            logf.write(json.dumps({"step": step, "val": m}) + "\n")
        if acc.is_main_process and (step % cfg.save_every == 0 or step == cfg.steps):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _save_unet(ckpt_dir / "unet.safetensors", base.state_dict(), base.config, {"step": step})
            if ema is not None:
                _save_unet(ckpt_dir / "ema.safetensors", ema.state_dict_for(base), base.config, {"step": step})
            tmp = ckpt_dir / "train_state.pt.tmp"
            torch.save({"optimizer": opt.state_dict(), "step": step, "config": json.dumps(asdict(cfg))}, tmp)
            os.replace(tmp, ckpt_dir / "train_state.pt")
    acc.wait_for_everyone()
    export = out_dir / EXPORT_NAME
    if acc.is_main_process:
        final_state = ema.state_dict_for(base) if ema is not None else base.state_dict()
        if ema is not None:
            base.load_state_dict(final_state)
        res["final"] = evaluate_drip(base, codec, emb, val, cfg)
        log(f"held-out SAD {res['initial']['sad']:.4f} -> {res['final']['sad']:.4f} "
            f"(constant alpha {res['constant_baseline']:.4f})")
        save_drip(export, final_state, base.config, base_family=base_family, prediction_type=cfg.prediction_type,
                  text_embedding=text_embedding, layout=export_layout, dtype=export_dtype,
                  extra_metadata={"train_steps": str(step), "codec": codec.name,
                                  "recipe": json.dumps(asdict(cfg))})
        logf.write(json.dumps({"step": step, "final": res["final"], "initial": res["initial"],
                               "constant_baseline": res["constant_baseline"]}) + "\n")
        logf.close()
    res.update({"losses": losses, "export": str(export), "step": step})
    return res


# --------------------------------------------------------------------------------- base + prompt
def empty_prompt_embedding(spec: str, base: str, family: str, width: int) -> torch.Tensor:
    """``[1, 77, width]`` empty-prompt embedding: from a file (safetensors/pt tensor), ``zeros``, or
    ``auto`` = encode "" with the base pipeline's text encoder (diffusers folder + ``transformers``)."""
    if spec == "zeros":
        return torch.zeros(1, 77, width)
    if spec != "auto":
        p = Path(spec)
        if not p.is_file():
            raise UserError(f"--text-embedding {spec}: no such file")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            t = load_file(str(p))
            t = t.get("drip.text_embedding", t.get("text_embedding", next(iter(t.values()))))
        else:
            t = torch.load(p, map_location="cpu", weights_only=True)
        t = t.float()
        t = t.unsqueeze(0) if t.ndim == 2 else t
        if t.ndim != 3 or t.shape[0] != 1 or t.shape[-1] != width:
            raise UserError(f"--text-embedding: expected [1, tokens, {width}], got {tuple(t.shape)}")
        return t
    folder = Path(base)
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise UserError("--text-embedding auto needs a diffusers pipeline folder as --base (text_encoder/ and "
                        "tokenizer/); otherwise pass a [1,77,%d] tensor file or 'zeros'" % width)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise UserError("--text-embedding auto needs the `transformers` package (or pass a tensor file)") from None
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids).last_hidden_state.float()


def build_drip_from_args(args, log=print):
    """(drip unet, family, prediction type, text embedding) from ``--base`` (file, diffusers folder or
    ``tiny-sd15``/``tiny-sd2`` random test bases)."""
    if args.base.startswith("tiny-"):
        family = args.base[len("tiny-"):]
        if family not in M.BASE_CONFIGS:
            raise UserError("--base tiny-sd15 or tiny-sd2")
        torch.manual_seed(args.seed)
        base = M.build_unet(M.base_config(family, tiny=True))
        pred = "epsilon" if args.prediction_type == "auto" else args.prediction_type
        width = base.config.cross_attention_dim
        emb = (torch.randn(1, 77, width, generator=torch.Generator().manual_seed(args.seed)) * 0.5
               if args.text_embedding == "auto" else empty_prompt_embedding(args.text_embedding, args.base, family, width))
        log(f"tiny random {family} base (testing only)")
        return M.convert_base_to_drip(base), family, pred, emb
    base, family = M.load_base_unet(args.base, None if args.family == "auto" else args.family)
    pred = args.prediction_type
    if pred == "auto":
        sched_cfg = Path(args.base) / "scheduler" / "scheduler_config.json"
        pred = json.loads(sched_cfg.read_text()).get("prediction_type", "epsilon") if sched_cfg.is_file() else None
        if pred is None:
            raise UserError("--prediction-type auto needs a diffusers pipeline folder; give epsilon or v_prediction")
    emb = empty_prompt_embedding(args.text_embedding, args.base, family, base.config.cross_attention_dim)
    log(f"base {args.base}: {family}, {pred}")
    return M.convert_base_to_drip(base), family, pred, emb


def build_codec(args, device):
    if args.vae.startswith("toy"):
        factor = int(args.vae[3:] or 4)
        return PoolCodec(factor, device)
    from .train_matting_head import load_vae

    spec = args.vae
    if spec == "auto":
        if args.base.startswith("tiny-"):
            raise UserError("--vae is needed with a tiny base (a VAE file/folder, or 'toy')")
        spec = str(Path(args.base) / "vae") if (Path(args.base) / "vae").is_dir() else args.base
    vae = load_vae(spec, device=device)
    vae = vae[0] if isinstance(vae, tuple) else vae
    return VAECodec(vae)


# ------------------------------------------------------------------------------------------- CLI
def register_train(subparsers) -> None:
    d = DRIPTrainConfig()
    p = subparsers.add_parser(
        "drip", help="train DRIP (joint foreground + alpha generation with an SD UNet)",
        description="Convert a base SD1.5/SD2 UNet to DRIP and train it on composited matting data. Defaults "
                    "follow the paper (SD2, Adam 1e-5, batch 96, 512 px, 30k steps). Multi-GPU: "
                    "`accelerate launch -m diffusion_matting.py.cli train drip ...`. Exports drip.safetensors "
                    "for the ComfyUI DRIP Model Loader (models/drip).")
    p.add_argument("--base", required=True, help="base SD UNet: single-file checkpoint, diffusers pipeline/UNet "
                                                 "folder, or tiny-sd15 / tiny-sd2 (random, for tests)")
    p.add_argument("--family", default="auto", choices=("auto", "sd15", "sd2"))
    p.add_argument("--prediction-type", default="auto", choices=("auto",) + PREDICTIONS,
                   help="auto: from the pipeline's scheduler config")
    p.add_argument("--vae", default="auto", help="SD VAE file/folder (auto: the base's); 'toy'/'toyN' = "
                                                 "testing-only pooling codec")
    p.add_argument("--text-embedding", default="auto", help="empty-prompt embedding: auto (encode '' with the "
                                                            "base pipeline), a tensor file, or zeros")
    p.add_argument("--data", nargs="*", default=[], help="matting folders (case folders alpha + fg/image, or RGBA cutouts)")
    p.add_argument("--bg", nargs="*", default=[], help="background image folders (default: procedural textures)")
    p.add_argument("--procedural", type=int, default=0, help="add N procedural subjects")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per optimizer step (all GPUs)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--multires-noise", type=float, default=d.multires_strength, help="annealed pyramid noise strength (0 = off)")
    p.add_argument("--no-cross-domain", action="store_true", help="ablation: plain self-attention")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (exported)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--fg-pad-iterations", type=int, default=30, help="foreground padding blur iterations")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from OUT/checkpoint (or a folder)")
    p.add_argument("--init-only", action="store_true", help="only convert the base and export the untrained DRIP")
    p.add_argument("--export-layout", default="diffusers", choices=("diffusers", "ldm"))
    p.add_argument("--export-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-count", type=int, default=d.val_count)
    p.add_argument("--val-steps", type=int, default=d.val_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args) -> int:
    from accelerate import Accelerator

    for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "val_count", "val_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise UserError("--lr must be > 0")
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum)
    log = print if acc.is_main_process else (lambda *a, **k: None)
    unet, family, pred, emb = build_drip_from_args(args, log)
    codec = build_codec(args, acc.device)
    if args.resolution < 8 * codec.factor or args.resolution % (8 * codec.factor):
        raise UserError(f"--resolution must be a multiple of {8 * codec.factor}")
    out = Path(args.out)
    dtype = getattr(torch, args.export_dtype)
    if args.init_only:
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_drip(out / EXPORT_NAME, unet.state_dict(), unet.config, base_family=family, prediction_type=pred,
                      text_embedding=emb, layout=args.export_layout, dtype=dtype,
                      extra_metadata={"train_steps": "0", "codec": codec.name})
            log(f"wrote {out / EXPORT_NAME} (untrained DRIP from {args.base})")
        return 0
    items = load_matte_items(args.data, max_side=max(2 * args.resolution, 256), log=log) if args.data else []
    n_proc = args.procedural or (0 if items else 32)
    if n_proc:
        items += procedural_items(n_proc, size=max(args.resolution, 64), seed=args.seed * 1000)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(items))
    n_val = max(1, len(items) // 10) if len(items) >= 2 else 0
    prepared = prepare_items(items, args.fg_pad_iterations, log)
    val = [prepared[i] for i in order[:n_val]]
    train = [prepared[i] for i in order[n_val:]]
    log(f"{len(train)} training subjects, {len(val)} held out")
    cfg = DRIPTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          resolution=args.resolution, grad_accum=args.grad_accum, prediction_type=pred,
                          multires_strength=args.multires_noise, cross_domain=not args.no_cross_domain,
                          ema=args.ema, ema_decay=args.ema_decay, log_every=args.log_every,
                          save_every=args.save_every, val_every=args.val_every, val_count=args.val_count,
                          val_steps=args.val_steps, seed=args.seed)
    res = train_drip(unet, codec, emb, train, val, cfg, out, family, backgrounds=list_backgrounds(args.bg),
                     resume=args.resume, accelerator=acc, log=log, export_layout=args.export_layout,
                     export_dtype=dtype)
    log(f"wrote {res['export']}")
    return 0
