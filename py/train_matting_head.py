"""Train DiffuMatting's matting head on a frozen SD VAE (``diffusion-matting train matting-head``).

Recipe (DiffuMatting, ECCV 2024, Sec. 3.3 / Eq. 7-8): foregrounds with alpha are composited onto green
canvases (the plain DiffuMatting green and studio/uneven plates with colour jitter and sensor noise), encoded
with the frozen VAE; the decoder's last 128-channel full-resolution feature (input of ``norm_out``) is fed to
the head ``ConR`` (conv-SiLU-conv-sigmoid), trained with L1 + Dice against the ground-truth alpha.

Data folders: each ``--data`` folder is either a case folder or holds case folders with ``alpha.*`` and
``fg.*`` (straight foreground; ``image.*`` is used when there is no ``fg``), or holds RGBA cutouts (PNG/WebP
with an alpha channel). Procedural subjects (:mod:`samples`) can be mixed in with ``--procedural N``.

Runs unchanged on several GPUs through ``accelerate launch`` (the head is the only trained module).
Checkpoints: ``OUT/checkpoint/head.safetensors`` (a loadable head) + ``OUT/checkpoint/train_state.pt``
(optimizer tensors, loaded with ``weights_only=True``). Export: ``OUT/matting_head.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .imageio import IMAGE_EXTS, load_image, load_mask
from .matting_head import (MattingHead, MattingHeadConfig, VAE_FAMILIES, dice_loss, features_diffusers,
                           load_matting_head, mask_metrics, save_matting_head)
from .samples import DIFFUMATTING_GREEN, render_plate, render_subject

EXPORT_NAME = "matting_head.safetensors"
CHECKPOINT_DIR = "checkpoint"


# ------------------------------------------------------------------------------------------ the VAE
def _strip_prefix(sd: dict) -> dict:
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def infer_ldm_vae_config(sd: dict, path: str = "VAE") -> dict:
    """diffusers ``AutoencoderKL`` config for an LDM-key KL VAE state dict (SD1/SD2/SDXL/SD3/Flux shapes)."""
    needed = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise UserError(f"{path}: not an LDM KL VAE with encoder and decoder (missing {', '.join(missing)})")
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise UserError(f"{path}: no encoder.down.* blocks; not an SD VAE")
    block_out = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": any(k.startswith("decoder.mid.attn_1.") for k in sd),
    }


def load_vae(spec: str | os.PathLike, device="cpu", dtype=torch.float32):
    """A frozen diffusers ``AutoencoderKL`` from a diffusers folder (``config.json`` + weights, or a pipeline
    folder with ``vae/``) or a single ``.safetensors`` file with LDM keys (as ComfyUI's models/vae holds) or
    diffusers keys. Offline: nothing is downloaded. Returns ``(vae, source_description)``."""
    from diffusers import AutoencoderKL

    path = Path(spec)
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise UserError(f"{path}: a diffusers VAE folder needs config.json (or vae/config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise UserError(f"{path}: cannot load a diffusers AutoencoderKL ({exc})") from None
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{path}: VAE files must be .safetensors (pickled checkpoints are not loaded)")
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
        sd = _strip_prefix(sd)
        if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:    # diffusers keys in one file
            raise UserError(f"{path}: diffusers-key VAE file; pass the diffusers folder (with config.json) instead")
        config = infer_ldm_vae_config(sd, str(path))
        try:
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        except ImportError as exc:  # moved in a future diffusers
            raise UserError(f"this diffusers version lacks convert_ldm_vae_checkpoint ({exc})") from None
        converted = convert_ldm_vae_checkpoint(sd, config)
        vae = AutoencoderKL(**config)
        missing, unexpected = vae.load_state_dict(converted, strict=False)
        if missing:
            raise UserError(f"{path}: VAE weights incomplete after LDM->diffusers conversion "
                            f"(missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        if dtype != torch.float32:
            vae = vae.to(dtype)
    else:
        raise UserError(f"VAE not found: {path}")
    return vae.to(device).eval().requires_grad_(False)


def guess_vae_family(vae, spec: str | os.PathLike | None = None) -> str:
    """Best-effort family name for the metadata (architectures of SD1 and SDXL VAEs are identical)."""
    name = str(spec or "").lower()
    cfg = vae.config
    if cfg.latent_channels == 16:
        if "flux" in name or (cfg.shift_factor is not None and abs(cfg.shift_factor - 0.1159) < 1e-3):
            return "flux"
        if "sd3" in name or (cfg.shift_factor is not None and abs(cfg.shift_factor - 0.0609) < 1e-3):
            return "sd3"
        return "unknown"
    if cfg.latent_channels == 4:
        if "xl" in name or abs(cfg.scaling_factor - 0.13025) < 1e-5:
            return "sdxl"
        return "sd1"
    return "unknown"


# ------------------------------------------------------------------------------------------- data
@dataclass
class MatteItem:
    fg: np.ndarray      # [H,W,3] float32 straight foreground
    alpha: np.ndarray   # [H,W] float32, 1 = foreground
    name: str


def _find(folder: Path, stem: str) -> Path | None:
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.stem.lower() == stem and p.suffix.lower() in IMAGE_EXTS:
            return p
    return None


def _shrink(x: np.ndarray, max_side: int) -> np.ndarray:
    h, w = x.shape[:2]
    if max(h, w) <= max_side:
        return x
    s = max_side / max(h, w)
    t = torch.from_numpy(x if x.ndim == 3 else x[..., None]).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True,
                      align_corners=False)
    out = t[0].permute(1, 2, 0).numpy()
    return out if x.ndim == 3 else out[..., 0]


def load_matte_items(folders, max_side: int = 1024, log=print) -> list[MatteItem]:
    """Case folders (``alpha`` + ``fg`` or ``image``) and RGBA cutouts from the given folders."""
    items: list[MatteItem] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"--data: no such folder: {root}")
        dirs = [root] + sorted(d for d in root.iterdir() if d.is_dir())
        found = 0
        for d in dirs:
            a_path = _find(d, "alpha")
            if a_path is not None:
                f_path = _find(d, "fg") or _find(d, "foreground")
                if f_path is None:
                    f_path = _find(d, "image")
                    if f_path is None:
                        raise UserError(f"{d}: has {a_path.name} but no fg.* or image.*")
                    log(f"note: {d} has no fg.*; using {f_path.name} as foreground colour (edges keep its backdrop)")
                fg = load_image(f_path)[0][0].numpy()
                alpha = load_mask(a_path)[0].numpy()
                if fg.shape[:2] != alpha.shape:
                    raise UserError(f"{d}: {f_path.name} is {fg.shape[1]}x{fg.shape[0]} but {a_path.name} is "
                                    f"{alpha.shape[1]}x{alpha.shape[0]}")
                items.append(MatteItem(_shrink(fg, max_side), _shrink(alpha, max_side), str(d)))
                found += 1
            elif d == root:
                for p in sorted(root.iterdir()):
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                        rgb, alpha = load_image(p)
                        if alpha is not None:
                            items.append(MatteItem(_shrink(rgb[0].numpy(), max_side),
                                                   _shrink(alpha[0].numpy(), max_side), str(p)))
                            found += 1
        if not found:
            raise UserError(f"--data {root}: no matting samples (case folders with alpha + fg/image, "
                            "or RGBA cutouts)")
    return items


def procedural_items(n: int, size: int = 256, seed: int = 0) -> list[MatteItem]:
    """``n`` procedural subjects (soft body, veil, strands) with exact alpha and straight foreground."""
    out = []
    for i in range(n):
        alpha, fg = render_subject(size, size, seed=seed + i, ss=2 if size > 192 else 4)
        out.append(MatteItem(fg, alpha, f"procedural-{seed + i}"))
    return out


def _resize_t(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def green_plate(res: int, rng: np.random.Generator) -> np.ndarray:
    """A green canvas: the plain DiffuMatting green (1/3) or a jittered studio/uneven plate, plus noise."""
    kind = rng.integers(3)
    if kind == 0:
        plate = np.broadcast_to(np.asarray(DIFFUMATTING_GREEN, np.float32), (res, res, 3)).copy()
    else:
        color = (rng.uniform(0.0, 0.3), rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.35))
        plate = render_plate(res, res, "studio" if kind == 1 else "uneven", color, seed=int(rng.integers(1 << 30)))
    sigma = rng.uniform(0.0, 0.02)
    if sigma > 0:
        plate = plate + rng.normal(0, sigma, size=plate.shape).astype(np.float32)
    return np.clip(plate, 0, 1).astype(np.float32)


def composite_batch(items: list[MatteItem], n: int, res: int, rng: np.random.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random crops of ``items`` composited over green canvases: (image ``[n,3,R,R]`` 0..1, alpha
    ``[n,1,R,R]``). Crops are square, 50-100 % of the shorter side, flipped at random, and re-drawn (up to
    4 times) when they hold almost no foreground or almost only foreground."""
    imgs, alphas = [], []
    for _ in range(n):
        it = items[int(rng.integers(len(items)))]
        fg = torch.from_numpy(np.ascontiguousarray(it.fg)).permute(2, 0, 1)
        al = torch.from_numpy(np.ascontiguousarray(it.alpha))[None]
        H, W = al.shape[-2:]
        for _attempt in range(5):
            c = max(8, int(min(H, W) * rng.uniform(0.5, 1.0)))
            y, x = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
            a_c = al[:, y:y + c, x:x + c]
            if 0.03 < float(a_c.mean()) < 0.97:
                break
        f_c = fg[:, y:y + c, x:x + c]
        f_c, a_c = _resize_t(f_c, res), _resize_t(a_c, res).clamp(0, 1)
        if rng.random() < 0.5:
            f_c, a_c = f_c.flip(-1), a_c.flip(-1)
        plate = torch.from_numpy(green_plate(res, rng)).permute(2, 0, 1)
        imgs.append((a_c * f_c + (1 - a_c) * plate).clamp(0, 1))
        alphas.append(a_c)
    return torch.stack(imgs), torch.stack(alphas)


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-3
    resolution: int = 512
    log_every: int = 50
    save_every: int = 500
    seed: int = 0
    val_count: int = 8
    dice_weight: float = 1.0
    head: dict = field(default_factory=lambda: asdict(MattingHeadConfig()))
    vae_family: str = "sd1"
    latent: str = "mode"          # "mode" or "sample" of the VAE posterior


def _encode(vae, images01: torch.Tensor, latent: str, gen: torch.Generator | None):
    dist = vae.encode(images01 * 2.0 - 1.0).latent_dist
    return dist.sample(generator=gen) if latent == "sample" else dist.mode()


@torch.no_grad()
def vae_features(vae, images01: torch.Tensor, latent: str = "mode", gen=None, chunk: int = 4) -> torch.Tensor:
    """Frozen-VAE features: encode 0..1 images ``[B,3,H,W]``, tap the decoder's ``norm_out`` input."""
    dtype = next(vae.parameters()).dtype
    outs = []
    for i in range(0, images01.shape[0], chunk):
        lat = _encode(vae, images01[i:i + chunk].to(dtype), latent, gen)
        outs.append(features_diffusers(vae, lat).float())
    return torch.cat(outs)


@torch.no_grad()
def evaluate(head, vae, images01: torch.Tensor, alphas: torch.Tensor, chunk: int = 4) -> dict[str, float]:
    """IoU / SAD / MAD of the head on fixed composites (see :func:`matting_head.mask_metrics`)."""
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    preds = []
    for i in range(0, images01.shape[0], chunk):
        feat = vae_features(vae, images01[i:i + chunk].to(device), chunk=chunk)
        preds.append(head(feat).float().cpu())
    head.train(was_training)
    return mask_metrics(torch.cat(preds), alphas.cpu())


def _save_checkpoint(ckpt_dir: Path, head, optimizer, step: int, cfg: TrainConfig, latent_channels: int):
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_matting_head(ckpt_dir / "head.safetensors", head, cfg.vae_family, latent_channels,
                      extra_metadata={"train_step": str(step)})
    tmp = ckpt_dir / "train_state.pt.tmp"
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "config": json.dumps(asdict(cfg))}, tmp)
    os.replace(tmp, ckpt_dir / "train_state.pt")


def resolve_resume(resume: str | os.PathLike, out_dir: Path) -> Path:
    p = out_dir / CHECKPOINT_DIR if str(resume) == "auto" else Path(resume)
    if (p / CHECKPOINT_DIR).is_dir():
        p = p / CHECKPOINT_DIR
    for need in ("head.safetensors", "train_state.pt"):
        if not (p / need).is_file():
            raise UserError(f"--resume: {p / need} not found")
    return p


def train_matting_head(vae, train_items: list[MatteItem], val_items: list[MatteItem], cfg: TrainConfig,
                       out_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
                       accelerator=None, log=print) -> dict:
    """Train the head on composites of ``train_items``; evaluate on fixed composites of ``val_items``.

    Returns ``{"initial": metrics, "final": metrics, "losses": [...], "export": path, "step": n}``.
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    acc = accelerator or Accelerator()
    main = acc.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not train_items:
        raise UserError("no training samples")
    torch.manual_seed(cfg.seed)
    head_cfg = MattingHeadConfig(**cfg.head)
    feat_ch = vae.decoder.conv_norm_out.num_channels
    if feat_ch != head_cfg.in_channels:
        raise UserError(f"the VAE decoder's norm_out has {feat_ch} channels; the head expects {head_cfg.in_channels}")
    vae = vae.to(acc.device).eval().requires_grad_(False)
    latent_channels = int(vae.config.latent_channels)
    head = MattingHead(head_cfg)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    start = 0
    if resume is not None:
        ckpt = resolve_resume(resume, out_dir)
        loaded, _info = load_matting_head(ckpt / "head.safetensors")
        if loaded.config != head_cfg:
            raise UserError(f"--resume: checkpoint head config {loaded.config} differs from {head_cfg}")
        head.load_state_dict(loaded.state_dict())
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"resumed from {ckpt} at step {start}")
    head, optimizer = acc.prepare(head, optimizer)

    # fixed held-out composites (same on every process)
    val_rng = np.random.default_rng([cfg.seed, 999])
    val_imgs, val_alphas = composite_batch(val_items or train_items, cfg.val_count, cfg.resolution, val_rng)
    unwrapped = acc.unwrap_model(head)
    initial = evaluate(unwrapped, vae, val_imgs, val_alphas)
    if main:
        log(json.dumps({"step": start, "eval": initial}))
    log_path = out_dir / "log.jsonl"
    losses = []
    gen = torch.Generator(device=acc.device).manual_seed(cfg.seed + 17 * acc.process_index)
    t0 = time.perf_counter()
    head.train()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, acc.process_index, step])
        imgs, alphas = composite_batch(train_items, cfg.batch_size, cfg.resolution, rng)
        feat = vae_features(vae, imgs.to(acc.device), cfg.latent, gen)
        pred = head(feat)
        target = alphas.to(acc.device)
        l1 = F.l1_loss(pred, target)
        dice = dice_loss(pred, target)
        loss = l1 + cfg.dice_weight * dice
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if main and (done % cfg.log_every == 0 or done == cfg.steps):
            rec = {"step": done, "loss": round(float(np.mean(losses[-cfg.log_every:])), 5),
                   "l1": round(float(l1.detach()), 5), "dice": round(float(dice.detach()), 5),
                   "sec_per_step": round((time.perf_counter() - t0) / max(1, done - start), 4)}
            log(json.dumps(rec))
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            acc.wait_for_everyone()
            if main:
                _save_checkpoint(out_dir / CHECKPOINT_DIR, acc.unwrap_model(head), optimizer, done, cfg,
                                 latent_channels)
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(head)
    final = evaluate(unwrapped, vae, val_imgs, val_alphas)
    export = out_dir / EXPORT_NAME
    if main:
        log(json.dumps({"step": cfg.steps, "eval": final}))
        _save_checkpoint(out_dir / CHECKPOINT_DIR, unwrapped, optimizer, cfg.steps, cfg, latent_channels)
        save_matting_head(export, unwrapped, cfg.vae_family, latent_channels, extra_metadata={
            "train_steps": str(cfg.steps), "train_resolution": str(cfg.resolution),
            "val_initial": initial, "val_final": final})
        (out_dir / "metrics.json").write_text(json.dumps({"initial": initial, "final": final,
                                                          "steps": cfg.steps}, indent=2))
    return {"initial": initial, "final": final, "losses": losses, "export": str(export), "step": cfg.steps}


# ------------------------------------------------------------------------------------------------ CLI
def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "matting-head", help="train DiffuMatting's matting head on a frozen SD VAE decoder",
        description="Composite foregrounds onto green canvases, encode them with the frozen VAE and train the "
                    "ConR head on the decoder's norm_out input with L1 + Dice. Multi-GPU: "
                    "`accelerate launch -m diffusion_matting.py.cli train matting-head ...`.")
    p.add_argument("--vae", required=True, help="SD VAE: single-file .safetensors (LDM keys, e.g. ComfyUI "
                                                "models/vae) or a diffusers folder")
    p.add_argument("--data", nargs="*", default=[], help="folders of case folders (alpha + fg/image) or RGBA cutouts")
    p.add_argument("--procedural", type=int, default=None,
                   help="add N procedural subjects (samples.render_subject; default: 32 when --data is empty, "
                        "else 0)")
    p.add_argument("--out", required=True, help="output folder (log, checkpoint/, matting_head.safetensors)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resolution", type=int, default=512, help="training crop size in pixels (multiple of 8)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from OUT/checkpoint (or the given checkpoint folder)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-count", type=int, default=8, help="held-out composites for IoU/SAD")
    p.add_argument("--hidden", type=int, default=64, help="head hidden channels")
    p.add_argument("--vae-family", default="auto", choices=("auto",) + VAE_FAMILIES,
                   help="recorded in the head's metadata (auto: from the VAE config/file name)")
    p.add_argument("--latent", default="mode", choices=("mode", "sample"), help="VAE posterior mode or a sample")
    p.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(func=run)


def run(args) -> int:
    from accelerate import Accelerator

    for name in ("steps", "batch_size", "log_every", "val_count", "hidden"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.resolution < 16 or args.resolution % 8:
        raise UserError("--resolution must be a multiple of 8, >= 16")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise UserError("--lr must be > 0")
    acc = Accelerator()
    log = print if acc.is_main_process else (lambda *a, **k: None)
    vae = load_vae(args.vae, device=acc.device, dtype=getattr(torch, args.vae_dtype))
    family = guess_vae_family(vae, args.vae) if args.vae_family == "auto" else args.vae_family
    log(f"VAE {args.vae}: latent_channels={vae.config.latent_channels}, "
        f"feature={vae.decoder.conv_norm_out.num_channels} ch, family={family}")
    items = load_matte_items(args.data, max_side=max(2 * args.resolution, 256), log=log) if args.data else []
    n_proc = args.procedural if args.procedural is not None else (0 if items else 32)
    if n_proc < 0:
        raise UserError("--procedural must be >= 0")
    if n_proc:
        items += procedural_items(n_proc, size=max(args.resolution, 128), seed=args.seed * 1000)
    # hold out ~10 % of the samples for evaluation (at least one when there are two or more)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(items))
    n_val = max(1, len(items) // 10) if len(items) >= 2 else 0
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    if not train:
        raise UserError("no training samples: give --data folders or --procedural N")
    log(f"{len(train)} training samples, {len(val)} held out"
        + ("" if val else " (one sample: evaluation reuses the training sample)"))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, resolution=args.resolution,
                      log_every=args.log_every, save_every=args.save_every, seed=args.seed,
                      val_count=args.val_count, head=asdict(MattingHeadConfig(hidden=args.hidden)),
                      vae_family=family, latent=args.latent)
    res = train_matting_head(vae, train, val, cfg, args.out, resume=args.resume, accelerator=acc, log=log)
    log(f"wrote {res['export']}  (held-out IoU {res['initial']['iou']:.3f} -> {res['final']['iou']:.3f}, "
        f"SAD {res['initial']['sad']:.3f} -> {res['final']['sad']:.3f})")
    return 0
