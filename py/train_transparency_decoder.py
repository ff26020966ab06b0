"""Training the latent transparency decoder (``diffusion-matting train transparency-decoder``).

Stage A (needs only the VAE): encode the ground-truth foreground and alpha (alpha copied to 3 channels) with
the frozen VAE, decode them, and teach the decoder to undo the VAE's reconstruction error given the composite
image and a trimap. Stage B (DRIP's own recipe, sec. 3.4) trains on latents *sampled* by a DRIP model with a
random 1-10 steps (``--drip CHECKPOINT``, usually with ``--init`` = stage A's export), sampled with the
plain-diffusers reference sampler of ``diffusion_matting.py.drip.sampling``.

Data: folders of image + alpha (+ fg) and/or procedural subjects (:func:`..samples.render_subject`, exact
straight foreground and alpha) composited over random backgrounds. Runs on ``accelerate`` (CPU, one or
many GPUs, mixed precision). The run folder holds ``log.jsonl``, ``resume.safetensors`` (model + AdamW
state + step, safetensors only: no pickle) and the exported decoder for the loader.

Needs the ``train`` extra (diffusers, accelerate); imported lazily so the CLI starts without them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import alpha as A
from . import metrics
from .errors import UserError
from .transparency_decoder import (LossWeights, TransparencyDecoder, TransparencyDecoderConfig, decoder_loss,
                                   load_decoder, plain_decode, save_decoder)

LDM_PREFIXES = ("first_stage_model.", "vae.")


# ------------------------------------------------------------------------------------------------ VAE
class FrozenVAE:
    """A frozen diffusers ``AutoencoderKL``: pixels 0..1 NCHW <-> unscaled latents (ComfyUI's LATENT space)."""

    def __init__(self, vae, family: str = "unknown"):
        self.vae = vae.eval().requires_grad_(False)
        self.family = family
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.stride = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 0.18215) or 0.18215)

    def to(self, device, dtype=None):
        self.vae.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self):
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        dist = self.vae.encode((pixels * 2.0 - 1.0).to(self.dtype)).latent_dist
        return (dist.sample(generator) if sample else dist.mean).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(z.to(self.dtype)).sample.float() + 1.0) / 2.0).clamp(0, 1)


def _ldm_vae_config(sd: dict) -> dict:
    """diffusers AutoencoderKL config inferred from an LDM VAE state dict (prefix already stripped)."""
    def need(key):
        if key not in sd:
            raise UserError(f"not an LDM VAE state dict: tensor {key!r} missing")
        return sd[key]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    if not levels:
        raise UserError("not an LDM VAE state dict: no encoder.down.* tensors")
    blocks = [int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in levels]
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return {
        "in_channels": int(need("encoder.conv_in.weight").shape[1]),
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
        "block_out_channels": blocks,
        "layers_per_block": layers,
        "latent_channels": int(need("decoder.conv_in.weight").shape[1]),
        "norm_num_groups": 32,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
    }


def load_vae(path: str | os.PathLike, family: str = "unknown", scaling_factor: float | None = None) -> FrozenVAE:
    """A diffusers ``AutoencoderKL`` from a diffusers folder (``config.json`` + weights, or a pipeline folder
    with ``vae/``) or an LDM single-file ``.safetensors`` (a bare VAE or a full SD checkpoint)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise UserError(f"{path}: no config.json (a diffusers AutoencoderKL folder, or a pipeline folder "
                            "with vae/config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise UserError(f"{folder}: cannot load the diffusers VAE ({exc})") from None
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{path}: VAE files must be .safetensors (pickled checkpoints are not loaded)")
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        from safetensors.torch import load_file

        sd = load_file(str(path))
        for prefix in LDM_PREFIXES:
            if any(k.startswith(prefix + "encoder.") for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                break
        config = _ldm_vae_config(sd)
        vae = AutoencoderKL(**config)
        converted = convert_ldm_vae_checkpoint(sd, dict(vae.config))
        missing, unexpected = vae.load_state_dict(converted, strict=False)
        if missing:
            raise UserError(f"{path}: VAE tensors missing after conversion (e.g. {missing[:3]})")
    else:
        raise UserError(f"VAE not found: {path}")
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    return FrozenVAE(vae, family)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    image: np.ndarray          # [H,W,3] composite
    alpha: np.ndarray          # [H,W]
    fg: np.ndarray             # [H,W,3] straight foreground, defined everywhere (padded)
    fg_weight: np.ndarray      # [H,W] 1 where the fg target is trustworthy


def random_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random backdrop: flat colour, two-colour gradient, or band-limited colour noise (+ grain)."""
    kind = rng.integers(3)
    if kind == 0:
        bg = np.broadcast_to(rng.uniform(0, 1, 3).astype(np.float32), (h, w, 3)).copy()
    elif kind == 1:
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        bg = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    else:
        cells = int(rng.integers(2, 24))
        grid = torch.from_numpy(rng.uniform(0, 1, (1, 3, cells + 3, cells + 3)).astype(np.float32))
        bg = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0).numpy()
    bg = bg + rng.normal(0, rng.uniform(0, 0.03), (h, w, 3))
    return np.clip(bg, 0, 1).astype(np.float32)


class ProceduralSource:
    """``count`` procedural subjects (seeds ``seed .. seed+count-1``), rendered once, composited per draw."""

    def __init__(self, count: int, size: int = 256, seed: int = 0):
        from .samples import render_subject

        self.items = []
        for i in range(count):
            a, f = render_subject(size, size, seed=seed + i)
            self.items.append((a, f))

    def __len__(self):
        return len(self.items)

    def get(self, i: int, rng: np.random.Generator) -> Example:
        a, f = self.items[i]
        bg = random_background(rng, *a.shape)
        img = a[..., None] * f + (1 - a[..., None]) * bg
        return Example(img.astype(np.float32), a, f, np.ones_like(a))


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


class FolderSource:
    """Matting folders, either ``ROOT/<case>/{image,alpha[,fg]}.<ext>`` or ``ROOT/{image,alpha[,fg]}/<name>.<ext>``.

    Without ``fg`` the image itself is the foreground target, trusted only where ``alpha >= 0.99`` (elsewhere
    the observed colour is mixed with the background). Foregrounds are padded outside ``alpha > 0`` with
    DRIP's blur padding (:func:`..alpha.pad_foreground`, ``pad_iters`` iterations) before VAE encoding.
    """

    def __init__(self, roots: list[str], pad_iters: int = 100):
        self.pad_iters = pad_iters
        self.items: list[tuple[Path, Path, Path | None]] = []
        for root in map(Path, roots):
            if not root.is_dir():
                raise UserError(f"--data {root}: not a folder")
            found = []
            if (root / "image").is_dir() and (root / "alpha").is_dir():
                for p in sorted((root / "image").iterdir()):
                    a = _find(root / "alpha", p.stem)
                    if a is not None:
                        found.append((p, a, _find(root / "fg", p.stem) if (root / "fg").is_dir() else None))
            else:
                for case in sorted(d for d in root.iterdir() if d.is_dir()):
                    img, a = _find(case, "image"), _find(case, "alpha")
                    if img is not None and a is not None:
                        found.append((img, a, _find(case, "fg")))
            if not found:
                raise UserError(f"--data {root}: no image+alpha pairs (expected ROOT/<case>/image.png + alpha.png, "
                                "or ROOT/image/<name>.png + ROOT/alpha/<name>.png)")
            self.items.extend(found)

    def __len__(self):
        return len(self.items)

    def get(self, i: int, rng: np.random.Generator) -> Example:
        from .imageio import load_image, load_mask

        ip, ap, fp = self.items[i]
        img = load_image(ip)[0][0]
        a = load_mask(ap)[0]
        if tuple(a.shape) != tuple(img.shape[:2]):
            raise UserError(f"{ap}: alpha is {a.shape[1]}x{a.shape[0]} but {ip} is {img.shape[1]}x{img.shape[0]}")
        if fp is not None:
            fg = load_image(fp)[0][0]
            weight = torch.ones_like(a)
            defined = a
        else:
            fg = img
            weight = (a >= 0.99).float()
            defined = weight
        fg = A.pad_foreground(fg[None], defined[None], iterations=self.pad_iters)[0] if self.pad_iters > 0 else fg
        return Example(img.numpy(), a.numpy(), fg.numpy(), weight.numpy())


def random_trimap(alpha: torch.Tensor, rng: np.random.Generator, unknown_prob: float = 0.2) -> torch.Tensor:
    """Training trimap ``[B,H,W]`` from ground truth: definite fg/bg = ``alpha > 0.99`` / ``alpha < 0.01`` eroded
    by a random radius (so known regions are exactly right); with ``unknown_prob`` all unknown."""
    out = []
    for a in alpha:
        if rng.uniform() < unknown_prob:
            out.append(torch.full_like(a, A.TRIMAP_UNKNOWN))
            continue
        r = int(rng.integers(1, max(2, a.shape[-1] // 16) + 1))
        fg = A.erode((a > 0.99).float()[None], r)
        bg = A.erode((a < 0.01).float()[None], r)
        out.append(A.trimap_from_masks(fg, bg)[0])
    return torch.stack(out)


def _crop_box(alpha: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left of a crop, centred on a random unknown (0 < alpha < 1) pixel 80% of the time."""
    h, w = alpha.shape
    ys, xs = np.nonzero((alpha > 0.01) & (alpha < 0.99))
    if len(ys) and rng.uniform() < 0.8:
        k = rng.integers(len(ys))
        cy, cx = ys[k], xs[k]
    else:
        cy, cx = rng.integers(h), rng.integers(w)
    return int(np.clip(cy - crop // 2, 0, max(0, h - crop))), int(np.clip(cx - crop // 2, 0, max(0, w - crop)))


def _fit(x: np.ndarray, crop: int) -> np.ndarray:
    """Edge-pad a too-small array up to ``crop`` px."""
    h, w = x.shape[:2]
    if h >= crop and w >= crop:
        return x
    pad = [(0, max(0, crop - h)), (0, max(0, crop - w))] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad, mode="edge")


class Batcher:
    """Random crops (+ horizontal flips) from the sources, as NCHW tensors."""

    def __init__(self, sources: list, crop: int):
        self.sources = [s for s in sources if len(s)]
        if not self.sources:
            raise UserError("no training data: give --data folders and/or --procedural N")
        self.crop = crop
        self.total = sum(len(s) for s in self.sources)

    def example(self, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        k = int(rng.integers(self.total))
        for s in self.sources:
            if k < len(s):
                ex = s.get(k, rng)
                break
            k -= len(s)
        arrays = [_fit(x, self.crop) for x in (ex.image, ex.alpha, ex.fg, ex.fg_weight)]
        y, x = _crop_box(arrays[1], self.crop, rng)
        arrays = [a[y:y + self.crop, x:x + self.crop] for a in arrays]
        if rng.uniform() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        img, a, fg, fw = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in arrays)
        return img.permute(2, 0, 1), a[None], fg.permute(2, 0, 1), fw[None]

    def batch(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        items = [self.example(rng) for _ in range(n)]
        return tuple(torch.stack(t) for t in zip(*items))


# --------------------------------------------------------------------------------------------- inputs
def vae_round_trip(vae: FrozenVAE, fg: torch.Tensor, alpha: torch.Tensor, sample: bool = False,
                   generator=None) -> dict[str, torch.Tensor]:
    """Stage A inputs: latents of the ground truth (posterior mean, or a posterior sample) and their plain
    decodes (NCHW, 0..1; the alpha decode is the channel mean of the 3-channel decode)."""
    b = fg.shape[0]
    z = vae.encode(torch.cat([fg, alpha.expand(-1, 3, -1, -1)]), sample, generator)
    dec = vae.decode(z)
    return {"z_fg": z[:b], "z_alpha": z[b:], "fg_dec": dec[:b], "alpha_dec": dec[b:].mean(dim=1, keepdim=True)}


class DRIPSamples:
    """Stage B inputs: fg/alpha latents *sampled* by a DRIP model (DRIP sec. 3.4: the decoder is trained on the
    diffusion model's own outputs, drawn with a random ``steps`` in ``[lo, hi]``, DPM-Solver++(2M)) and their
    plain VAE decodes. Uses the plain-diffusers reference sampler of :mod:`.drip.sampling`."""

    def __init__(self, path: str, vae: FrozenVAE, device, steps: tuple[int, int] = (1, 10),
                 sampler: str = "dpmpp_2m", cross_domain: bool = True):
        from .drip import model as M
        from .drip.checkpoint import load_drip

        lo, hi = steps
        if not 1 <= lo <= hi:
            raise UserError(f"--drip-steps {lo},{hi}: expected 1 <= min <= max")
        ck = load_drip(path)
        if ck.latent_channels != vae.latent_channels:
            raise UserError(f"{path}: DRIP latents have {ck.latent_channels} channels, the VAE {vae.latent_channels}")
        unet = M.build_unet(ck.config)
        unet.load_state_dict(ck.diffusers_state_dict())
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.ck, self.vae, self.device = ck, vae, device
        self.steps, self.sampler, self.cross_domain = (lo, hi), sampler, cross_domain

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, trimap: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        from .drip.sampling import drip_sample_reference, make_scheduler

        sf = self.vae.scaling_factor
        zi = self.vae.encode(image) * sf
        zt = self.vae.encode(trimap.expand(-1, 3, -1, -1)) * sf
        steps = int(rng.integers(self.steps[0], self.steps[1] + 1))
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        noise = torch.randn((2 * zi.shape[0], *zi.shape[1:]), generator=gen).to(self.device)
        zf, za = drip_sample_reference(self.unet, zi, zt, noise, make_scheduler(self.sampler, self.ck.prediction_type),
                                       steps, self.ck.text_embedding, cross_domain=self.cross_domain)
        z = torch.cat([zf, za]).float() / sf  # SD-scaled -> raw latents (what the VAE decoder takes)
        dec = self.vae.decode(z)
        b = image.shape[0]
        return {"z_fg": z[:b], "z_alpha": z[b:], "fg_dec": dec[:b], "alpha_dec": dec[b:].mean(dim=1, keepdim=True),
                "steps": steps}


# ------------------------------------------------------------------------------------ resume (no pickle)
def save_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    scalars = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"]), "opt_scalars": json.dumps(scalars),
            "extra": json.dumps(extra)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def resume_config(path: Path) -> str:
    """The decoder config JSON stored in a resume file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            extra = json.loads((f.metadata() or {}).get("extra", "{}"))
    except Exception as exc:
        raise UserError(f"{path}: not a readable resume file ({exc})") from None
    if "config" not in extra:
        raise UserError(f"{path}: resume metadata has no decoder config")
    return extra["config"]


def load_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a readable resume file ({exc})") from None
    for key in ("step", "param_groups", "opt_scalars", "extra"):
        if key not in meta:
            raise UserError(f"{path}: resume metadata {key!r} missing")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: resume weights do not fit this model config ({str(exc).splitlines()[0]})") from None
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in json.loads(meta["opt_scalars"]).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"]), json.loads(meta["extra"])


# -------------------------------------------------------------------------------------------- training
@dataclass
class TrainOptions:
    vae: str = ""
    out: str = "out/transparency_decoder"
    export: str | None = None
    vae_family: str = "unknown"
    scaling_factor: float | None = None
    data: list[str] = field(default_factory=list)
    procedural: int = 0
    procedural_size: int = 256
    crop: int = 256
    batch: int = 4
    steps: int = 2000
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    stage: str = "A"
    drip: str | None = None
    drip_steps: tuple[int, int] = (1, 10)
    init: str | None = None
    resume: bool = False
    config: TransparencyDecoderConfig | dict | None = None  # a dict = overrides of the default config
    latent_scale: float | str = "auto"  # "auto" = 1 / std of the training latents, "vae" = its scaling factor
    loss: LossWeights = field(default_factory=LossWeights)
    unknown_trimap_prob: float = 0.2
    latent_sample_prob: float = 0.5
    pad_fg_iters: int = 100
    val: int = 8
    val_size: int = 128
    seed: int = 0
    log_every: int = 50
    save_every: int = 500
    mixed_precision: str = "no"
    cpu: bool = False
    quiet: bool = False


def _validation_set(opts: TrainOptions, vae: FrozenVAE, device) -> dict[str, torch.Tensor] | None:
    """Held-out procedural crops (seeds disjoint from training), their trimaps and VAE round trips."""
    if opts.val <= 0:
        return None
    src = ProceduralSource(opts.val, size=opts.val_size, seed=10_000_019 + opts.seed)
    rng = np.random.default_rng(opts.seed + 977)
    exs = [src.get(i, rng) for i in range(len(src))]
    img = torch.from_numpy(np.stack([e.image for e in exs])).permute(0, 3, 1, 2)
    a = torch.from_numpy(np.stack([e.alpha for e in exs]))[:, None]
    fg = torch.from_numpy(np.stack([e.fg for e in exs])).permute(0, 3, 1, 2)
    tri = torch.stack([A.trimap_from_masks(A.erode((x > 0.99).float()[None], 4), A.erode((x < 0.01).float()[None], 4))[0]
                       for x in a[:, 0]])[:, None]
    out = {"image": img, "alpha": a, "fg": fg, "trimap": tri}
    out = {k: v.to(device) for k, v in out.items()}
    with torch.no_grad():
        rt = []
        for i in range(len(exs)):
            rt.append(vae_round_trip(vae, out["fg"][i:i + 1], out["alpha"][i:i + 1]))
    out.update({k: torch.cat([r[k] for r in rt]) for k in rt[0]})
    return out


def evaluate(model: TransparencyDecoder | None, val: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean alpha SAD (/1000, whole crop) and alpha-weighted foreground MSE on the validation crops, for the
    decoder (``model``) or the plain decode (``model=None``); both respect the trimap's known regions."""
    sads, mses = [], []
    for i in range(val["image"].shape[0]):
        sl = {k: v[i:i + 1] for k, v in val.items()}
        if model is None:
            f, a = plain_decode(sl["fg_dec"], sl["alpha_dec"], sl["trimap"])
        else:
            with torch.no_grad():
                f, a = model(sl["image"], sl["trimap"], sl["fg_dec"], sl["alpha_dec"], sl["z_fg"], sl["z_alpha"])
        sads.append(metrics.sad(a[0, 0].float().cpu().numpy(), sl["alpha"][0, 0].cpu().numpy()))
        mses.append(metrics.foreground_mse(f[0].permute(1, 2, 0).float().cpu().numpy(),
                                           sl["fg"][0].permute(1, 2, 0).cpu().numpy(),
                                           sl["alpha"][0, 0].cpu().numpy()))
    return {"alpha_sad": float(np.mean(sads)), "fg_mse": float(np.mean(mses))}


def _latent_scale(opts: TrainOptions, vae: FrozenVAE, batcher: "Batcher", device) -> float:
    """The decoder's latent input scale: ``1 / std`` of ground-truth latents on a few training batches
    (``auto``; SD's own scaling factor is such a number), the VAE's scaling factor (``vae``) or a number."""
    if opts.latent_scale == "vae":
        return vae.scaling_factor
    if opts.latent_scale != "auto":
        try:
            value = float(opts.latent_scale)
        except (TypeError, ValueError):
            raise UserError(f"--latent-scale {opts.latent_scale!r}: expected auto, vae or a number") from None
        if not value > 0:
            raise UserError(f"--latent-scale must be > 0, got {value}")
        return value
    rng = np.random.default_rng([opts.seed, 4242])
    zs = []
    for _ in range(4):
        _, a, fg, _ = batcher.batch(max(2, opts.batch), rng)
        rt = vae_round_trip(vae, fg.to(device), a.to(device))
        zs += [rt["z_fg"].flatten(), rt["z_alpha"].flatten()]
    std = float(torch.cat(zs).std())
    return float(f"{1.0 / max(std, 1e-6):.5g}")


def _lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(opts: TrainOptions) -> dict:
    """Train (or resume) a decoder; returns a summary with the final validation numbers and paths."""
    from accelerate import Accelerator

    if opts.stage not in ("A", "B"):
        raise UserError(f"--stage must be A or B, got {opts.stage!r}")
    if opts.stage == "B" and not opts.drip:
        raise UserError("stage B trains on DRIP samples: it needs --drip CHECKPOINT")
    if opts.crop < 8 or opts.batch < 1 or opts.steps < 0:
        raise UserError("--crop must be >= 8, --batch >= 1 and --steps >= 0")
    out = Path(opts.out)
    accel = Accelerator(cpu=opts.cpu, mixed_precision=opts.mixed_precision)
    device = accel.device
    torch.manual_seed(opts.seed + accel.process_index)

    vae = load_vae(opts.vae, opts.vae_family, opts.scaling_factor).to(device)
    resume_path = out / "resume.safetensors"
    resuming = opts.resume and resume_path.is_file()
    if resuming:  # the run's own config (incl. its latent scale) wins over the command line
        config = TransparencyDecoderConfig.from_json(resume_config(resume_path), source=str(resume_path))
        model = TransparencyDecoder(config)
    elif opts.init:
        model, meta = load_decoder(opts.init)
        config = model.config
        if meta.get("vae_family", "unknown") not in ("unknown", opts.vae_family):
            raise UserError(f"--init {opts.init} was trained for VAE family {meta['vae_family']!r}, not "
                            f"{opts.vae_family!r}")
        model.train()
    else:
        config = opts.config
        if not isinstance(config, TransparencyDecoderConfig):
            kw = dict(config or {})
            kw.setdefault("latent_channels", vae.latent_channels)
            kw.setdefault("latent_stride", vae.stride)
            config = kw  # completed below, once the data is there (latent scale)
    crop_multiple = config.multiple if isinstance(config, TransparencyDecoderConfig) else \
        TransparencyDecoderConfig(**{**config, "latent_scale": 1.0}).multiple
    crop = max(crop_multiple, opts.crop // crop_multiple * crop_multiple)

    sources = []
    if opts.data:
        sources.append(FolderSource(opts.data, pad_iters=opts.pad_fg_iters))
    n_proc = opts.procedural if (opts.procedural or opts.data) else 64
    if n_proc:
        sources.append(ProceduralSource(n_proc, size=max(opts.procedural_size, crop), seed=opts.seed * 100_003))
    batcher = Batcher(sources, crop)

    if not isinstance(config, TransparencyDecoderConfig):
        if "latent_scale" not in config:
            config["latent_scale"] = _latent_scale(opts, vae, batcher, device)
        config = TransparencyDecoderConfig(**config)
        model = TransparencyDecoder(config)
    if config.latent_channels != vae.latent_channels or config.latent_stride != vae.stride:
        raise UserError(f"decoder expects {config.latent_channels}-channel latents at stride {config.latent_stride}, "
                        f"the VAE has {vae.latent_channels} at stride {vae.stride}")
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)

    start = 0
    if resuming:
        start, _ = load_resume(resume_path, model, opt)
    model, opt = accel.prepare(model, opt)
    val = _validation_set(opts, vae, device) if accel.is_main_process else None
    sampler = DRIPSamples(opts.drip, vae, device, opts.drip_steps) if opts.stage == "B" else None

    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a") if accel.is_main_process else None
    unwrapped = accel.unwrap_model(model)
    summary: dict = {"start_step": start}
    if val is not None:
        summary["plain"] = evaluate(None, val)
        unwrapped.eval()
        summary["initial"] = evaluate(unwrapped, val)
        unwrapped.train()
    t0 = time.perf_counter()
    model.train()
    for step in range(start, opts.steps):
        rng = np.random.default_rng([opts.seed, accel.process_index, step])
        img, a, fg, fw = (t.to(device) for t in batcher.batch(opts.batch, rng))
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        tri = random_trimap(a[:, 0].cpu(), rng, opts.unknown_trimap_prob)[:, None].to(device)
        if sampler is None:  # stage A; posterior samples now and then, as a sampler's latents are not exact
            rt = vae_round_trip(vae, fg, a, sample=bool(rng.uniform() < opts.latent_sample_prob), generator=gen)
        else:  # stage B: what the DRIP model samples for this composite and trimap
            rt = sampler(img, tri, rng)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, opts)
        with accel.autocast():
            pf, pa = model(img, tri, rt["fg_dec"], rt["alpha_dec"], rt["z_fg"], rt["z_alpha"], clamp=False)
            loss, parts = decoder_loss(pf.float(), pa.float(), fg, a, fg_weight=a * fw, weights=opts.loss)
        accel.backward(loss)
        if opts.grad_clip > 0:
            accel.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if log is not None and (done % opts.log_every == 0 or done == opts.steps):
            rec = {"step": done, "loss": float(loss.detach()), "lr": _lr_at(step, opts),
                   "seconds": round(time.perf_counter() - t0, 2), **{k: round(v, 6) for k, v in parts.items()}}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if not opts.quiet:
                print(json.dumps(rec), flush=True)
        if accel.is_main_process and opts.save_every > 0 and done % opts.save_every == 0 and done < opts.steps:
            save_resume(resume_path, unwrapped, opt, done, {"stage": opts.stage, "config": config.to_json()})
    accel.wait_for_everyone()
    if accel.is_main_process:
        save_resume(resume_path, unwrapped, opt, opts.steps, {"stage": opts.stage, "config": config.to_json()})
        unwrapped.eval()
        if val is not None:
            summary["final"] = evaluate(unwrapped, val)
            log.write(json.dumps({"step": opts.steps, "validation": summary}) + "\n")
        export = Path(opts.export) if opts.export else out / "transparency_decoder.safetensors"
        save_decoder(unwrapped, export, vae_family=opts.vae_family,
                     extra={"stage": opts.stage, "steps": opts.steps, "crop": crop})
        summary.update({"export": str(export), "resume": str(resume_path), "steps": opts.steps,
                        "seconds": round(time.perf_counter() - t0, 2)})
        log.close()
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "transparency-decoder", help="train DRIP's latent transparency decoder (stage A: VAE round trips)",
        description="Trains the latent transparency decoder (DRIP sec. 3.4). Stage A teaches it to undo the "
                    "frozen VAE's reconstruction error on ground-truth foreground/alpha (needs only the VAE); "
                    "stage B trains on DRIP samples drawn with a random 1-10 steps (needs --drip). Data: "
                    "--data folders (ROOT/<case>/{image,alpha[,fg]}.png or ROOT/{image,alpha,fg}/<name>.png) "
                    "and/or --procedural N rendered subjects. Writes OUT/log.jsonl, OUT/resume.safetensors and "
                    "the decoder for 'Load Transparency Decoder' (models/transparency_decoders).")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (or pipeline folder with vae/), "
                                                "or an LDM .safetensors (bare VAE or full SD checkpoint)")
    p.add_argument("--vae-family", default="unknown", help="recorded in the file, e.g. sd15 or sdxl (default: unknown)")
    p.add_argument("--scaling-factor", type=float, default=None,
                   help="VAE latent scaling factor (default: the VAE config's, else 0.18215)")
    p.add_argument("--out", default="out/transparency_decoder", help="run folder (default: out/transparency_decoder)")
    p.add_argument("--export", default=None, help="decoder file to write (default: OUT/transparency_decoder.safetensors)")
    p.add_argument("--data", action="append", default=[], help="matting folder (repeatable)")
    p.add_argument("--procedural", type=int, default=0,
                   help="procedural subjects to add (default: 64 when no --data is given)")
    p.add_argument("--procedural-size", type=int, default=256)
    p.add_argument("--crop", type=int, default=256, help="training crop size in px (rounded to the decoder's multiple)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--stage", choices=["A", "B"], default="A")
    p.add_argument("--drip", default=None, help="DRIP checkpoint (stage B)")
    p.add_argument("--drip-steps", default="1,10", help="stage B: sampling steps drawn from MIN,MAX (default 1,10)")
    p.add_argument("--init", default=None, help="start from this decoder file (e.g. stage A's export for stage B)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume.safetensors if present")
    p.add_argument("--base-channels", type=int, default=None)
    p.add_argument("--channel-mult", default=None, help="comma list, e.g. 1,2,4,4 (one entry per level)")
    p.add_argument("--blocks", type=int, default=None, help="residual blocks per level")
    p.add_argument("--no-attention", action="store_true", help="no self-attention at the lowest resolution")
    p.add_argument("--latent-scale", default="auto",
                   help="latent input scale: auto (1/std of the training latents), vae (its scaling factor) or a number")
    p.add_argument("--foreground-weight", type=float, default=1.0, help="weight of the foreground loss terms")
    p.add_argument("--unknown-trimap-prob", type=float, default=0.2)
    p.add_argument("--pad-fg-iters", type=int, default=100, help="DRIP foreground padding iterations (folder data)")
    p.add_argument("--val", type=int, default=8, help="held-out procedural crops for validation (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.set_defaults(func=run)


def _pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--drip-steps {text!r}: expected MIN,MAX such as 1,10") from None
    return lo, hi


def options_from_args(args) -> TrainOptions:
    cfg = None
    if any(v is not None for v in (args.base_channels, args.channel_mult, args.blocks)) or args.no_attention:
        kw = {}
        if args.base_channels is not None:
            kw["base_channels"] = args.base_channels
        if args.channel_mult is not None:
            try:
                kw["channel_mult"] = tuple(int(v) for v in args.channel_mult.split(","))
            except ValueError:
                raise UserError(f"--channel-mult {args.channel_mult!r}: expected integers like 1,2,4,4") from None
        if args.blocks is not None:
            kw["blocks_per_level"] = args.blocks
        if args.no_attention:
            kw["attention"] = False
        cfg = kw
    opts = TrainOptions(
        vae=args.vae, out=args.out, export=args.export, vae_family=args.vae_family,
        scaling_factor=args.scaling_factor, data=args.data, procedural=args.procedural,
        procedural_size=args.procedural_size, crop=args.crop, batch=args.batch, steps=args.steps, lr=args.lr,
        warmup=args.warmup, stage=args.stage, drip=args.drip, drip_steps=_pair(args.drip_steps), init=args.init, resume=args.resume,
        loss=LossWeights(foreground=args.foreground_weight), unknown_trimap_prob=args.unknown_trimap_prob,
        pad_fg_iters=args.pad_fg_iters, latent_scale=args.latent_scale, val=args.val, seed=args.seed, log_every=args.log_every,
        save_every=args.save_every, mixed_precision=args.mixed_precision, cpu=args.cpu)
    opts.config = cfg  # overrides; completed from the VAE (latent scale/channels/stride) in train()
    return opts


def run(args) -> int:
    opts = options_from_args(args)
    summary = train(opts)
    print(json.dumps(summary, indent=1))
    return 0
