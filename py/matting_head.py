"""DiffuMatting's matting head on the SD VAE decoder (ComfyUI-free).

DiffuMatting (ECCV 2024, Eq. 7-8) taps the VAE decoder's last full-resolution feature - the
128-channel tensor that enters the decoder's output GroupNorm (``norm_out`` in LDM/ComfyUI naming,
``conv_norm_out`` in diffusers) - with a small head ``ConR`` (conv, SiLU, conv) that predicts a
one-channel mask through a sigmoid. The head is trained with L1 + Dice against ground-truth alpha while
the VAE stays frozen (see :mod:`train_matting_head`).

This module holds:

* :class:`MattingHead` / :class:`MattingHeadConfig` - the head (``operations``-compatible so ComfyUI can
  build it with ``comfy.ops``);
* :func:`save_matting_head` / :func:`load_matting_head` - safetensors with format metadata (never pickle);
* :func:`decode_with_features_diffusers` - ONE decoder pass of a diffusers ``AutoencoderKL`` returning the
  RGB exactly as ``vae.decode(latents).sample`` plus the tapped feature (forward pre-hook);
* :func:`decode_with_matte` - the tiling/blending core used by the tests and the ComfyUI node. It
  takes a callable ``decode_fn(latent_tile) -> (rgb_tile, feature_tile)`` so it does not care which VAE
  implementation (diffusers, ComfyUI) runs the decoder; a ``decode_fn`` that carries a
  :class:`~diffusion_matting.py.decoder_tiles.TiledDecoder` (``.tiled``) is tiled with GroupNorm statistics
  shared across tiles, which makes tiled == untiled up to float rounding.

Tensor layouts here are the decoder's: latents ``[B,C,h,w]``, RGB ``[B,3,H,W]`` (whatever range the
decode_fn gives: diffusers -1..1, ComfyUI 0..1), feature ``[B,128,H,W]``, head output ``[B,1,H,W]`` in
0..1 where **1 = foreground** (alpha convention).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .decoder_tiles import TiledDecoder, diffusers_decoder_plan, input_of
from .errors import UserError

FORMAT_NAME = "diffusion-matting.matting-head"
FORMAT_VERSION = 1
TAP_POINT = "decoder.norm_out.input"
VAE_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "unknown")

# metadata keys every matting-head file must carry
REQUIRED_METADATA = ("format", "format_version", "vae_family", "tap_point", "config")


# ---------------------------------------------------------------------------------------------- head
@dataclass(frozen=True)
class MattingHeadConfig:
    in_channels: int = 128   # the decoder's full-resolution width (block_out_channels[0] / ch * ch_mult[0])
    hidden: int = 64
    kernel_size: int = 3

    def __post_init__(self):
        for name in ("in_channels", "hidden", "kernel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"matting head config: {name} must be a positive integer, got {v!r}")
        if self.kernel_size % 2 == 0:
            raise UserError(f"matting head config: kernel_size must be odd, got {self.kernel_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MattingHeadConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("config is not a JSON object")
        unknown = set(data) - {"in_channels", "hidden", "kernel_size"}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**data)


class MattingHead(nn.Module):
    """``ConR``: conv(in->hidden, k) -> SiLU -> conv(hidden->1, k) -> sigmoid.

    ``operations`` is a namespace with a ``Conv2d`` class: ``torch.nn`` (default) or ComfyUI's
    ``comfy.ops.manual_cast`` / ``comfy.ops.disable_weight_init``.
    ``forward(feature [B,C,H,W]) -> alpha [B,1,H,W]`` in 0..1 (1 = foreground).
    """

    def __init__(self, config: MattingHeadConfig | None = None, operations=nn, device=None, dtype=None):
        super().__init__()
        self.config = config or MattingHeadConfig()
        c, k = self.config, self.config.kernel_size
        self.conv1 = operations.Conv2d(c.in_channels, c.hidden, k, padding=k // 2, device=device, dtype=dtype)
        self.act = nn.SiLU()
        self.conv2 = operations.Conv2d(c.hidden, 1, k, padding=k // 2, device=device, dtype=dtype)

    @property
    def radius(self) -> int:
        """Receptive radius in feature px (two k x k convs): tiles need this much context."""
        return 2 * (self.config.kernel_size // 2)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.ndim != 4 or feature.shape[1] != self.config.in_channels:
            raise UserError(f"matting head expects a [B,{self.config.in_channels},H,W] decoder feature, "
                            f"got {tuple(feature.shape)}")
        return self.conv2(self.act(self.conv1(feature)))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(feature))


# --------------------------------------------------------------------------------------- file format
class MattingHeadInfo(NamedTuple):
    path: str
    config: MattingHeadConfig
    vae_family: str
    metadata: dict


def save_matting_head(path: str | os.PathLike, head: MattingHead, vae_family: str = "sd1",
                      latent_channels: int = 4, extra_metadata: dict | None = None) -> Path:
    """Write ``head`` as safetensors with its format metadata (the file the loader node reads)."""
    from safetensors.torch import save_file

    if vae_family not in VAE_FAMILIES:
        raise UserError(f"vae_family {vae_family!r}: expected one of {', '.join(VAE_FAMILIES)}")
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "vae_family": vae_family,
        "tap_point": TAP_POINT,
        "config": head.config.to_json(),
        "latent_channels": str(int(latent_channels)),
        "head": "ConR: conv-SiLU-conv-sigmoid (DiffuMatting Eq. 7)",
    }
    for k, v in (extra_metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_matting_head_metadata(path: str | os.PathLike) -> dict:
    """Validated metadata of a matting-head file; :class:`UserError` naming the path and what is missing."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"matting head file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
        raise UserError(f"{path}: not a matting head (not a readable safetensors file: {exc})") from None
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise UserError(f"{path}: not a matting head (metadata lacks {', '.join(missing)}; "
                        f"expected format={FORMAT_NAME!r})")
    if meta["format"] != FORMAT_NAME:
        raise UserError(f"{path}: not a matting head (metadata format={meta['format']!r}, expected {FORMAT_NAME!r})")
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise UserError(f"{path}: bad matting head format_version {meta['format_version']!r}") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: matting head format version {version} is newer than this pack supports "
                        f"({FORMAT_VERSION}); update diffusion-matting")
    if meta["tap_point"] != TAP_POINT:
        raise UserError(f"{path}: matting head taps {meta['tap_point']!r}; this pack supports {TAP_POINT!r}")
    return meta


def load_matting_head(path: str | os.PathLike, operations=nn, device=None, dtype=None
                      ) -> tuple[MattingHead, MattingHeadInfo]:
    """Load a head written by :func:`save_matting_head` (safetensors only; never pickle)."""
    from safetensors import safe_open

    meta = read_matting_head_metadata(path)
    try:
        config = MattingHeadConfig.from_json(meta["config"])
    except (ValueError, TypeError, UserError) as exc:
        raise UserError(f"{path}: bad matting head config metadata ({exc})") from None
    head = MattingHead(config, operations=operations, device=device, dtype=dtype)
    expected = head.state_dict()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise UserError(f"{path}: not a complete matting head (missing tensors {', '.join(missing)})")
        sd = {k: f.get_tensor(k) for k in expected}
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: tensor {k} has shape {tuple(t.shape)}, the config implies "
                            f"{tuple(expected[k].shape)}")
    head.load_state_dict(sd, strict=True)
    head.eval()
    return head, MattingHeadInfo(str(path), config, meta["vae_family"], meta)


# -------------------------------------------------------------------------- feature tap (diffusers)
def _diffusers_norm_out(vae) -> nn.Module:
    dec = getattr(vae, "decoder", None)
    norm = getattr(dec, "conv_norm_out", None)
    if norm is None:
        raise UserError(f"{type(vae).__name__}: no decoder.conv_norm_out to tap (expected a diffusers AutoencoderKL)")
    return norm


def decode_with_features_diffusers(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder pass of a diffusers ``AutoencoderKL``: ``(rgb, feature)``.

    ``rgb`` is exactly ``vae.decode(latents).sample`` (-1..1, ``[B,3,H,W]``) - it *is* that call - and
    ``feature`` ``[B,C,H,W]`` is the input of ``vae.decoder.conv_norm_out`` (LDM ``norm_out``), captured with
    a forward pre-hook. ``latents`` are raw VAE latents (already divided by the scaling factor).
    With ``vae.enable_slicing()`` the per-sample captures are concatenated; diffusers' own tiling would
    split the tap into tiles, so it is refused: use :func:`decode_with_matte` with ``tile`` instead.
    """
    norm = _diffusers_norm_out(vae)
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        rgb = vae.decode(latents).sample
    finally:
        handle.remove()
    return rgb, _join_captures(captured, rgb, "diffusers AutoencoderKL")


def features_diffusers(vae, latents: torch.Tensor) -> torch.Tensor:
    """Only the tapped feature (stops the decoder at ``conv_norm_out``; used for training)."""
    norm = _diffusers_norm_out(vae)
    if getattr(vae, "use_slicing", False) or getattr(vae, "use_tiling", False):
        raise UserError("features_diffusers: disable the VAE's slicing/tiling (vae.disable_slicing())")
    return input_of(norm, lambda: vae.decode(latents), "the VAE decoder's conv_norm_out")


def _join_captures(captured: list[torch.Tensor], rgb: torch.Tensor, what: str) -> torch.Tensor:
    if not captured:
        raise RuntimeError(f"{what}: the decoder never reached its output norm (nothing captured)")
    if (any(c.shape[-2:] != rgb.shape[-2:] for c in captured)
            or sum(c.shape[0] for c in captured) != rgb.shape[0]):
        raise RuntimeError(f"{what}: captured {len(captured)} decoder passes that do not add up to the image "
                           f"(first {tuple(captured[0].shape)} vs rgb {tuple(rgb.shape)}); the VAE decoded in "
                           "tiles - decode with decode_with_matte(tile=...) instead")
    return captured[0] if len(captured) == 1 else torch.cat(captured, dim=0)


# ------------------------------------------------------------------------------------ tiled decoding
class MatteDecode(NamedTuple):
    rgb: torch.Tensor              # [B,3,H,W] as decode_fn returns it (range of the VAE wrapper)
    matte: torch.Tensor | None     # [B,1,H,W] head output 0..1 (1 = foreground), None without a head
    tiles: int                     # output tiles blended (1 = untiled, one decoder pass)
    shared_stats: bool = False     # tiled with whole-image GroupNorm statistics (exact) vs independent tiles


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap`` overlap."""
    if tile >= size:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return sorted(set(starts))


def feather_1d(length: int, ramp: int, left: bool, right: bool, device=None) -> torch.Tensor:
    """Blend weight along one tile axis: linear ramps of ``ramp`` px at edges shared with a neighbour.

    The ramp is ``(i + 0.5) / ramp`` so it never reaches 0; edges on the image border keep weight 1.
    """
    w = torch.ones(length, device=device, dtype=torch.float32)
    ramp = min(ramp, length)
    if ramp > 0:
        r = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
        if left:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if right:
            w[length - ramp:] = torch.minimum(w[length - ramp:], r.flip(0))
    return w


class _Blender:
    """Accumulates overlapping output tiles (RGB and head output with the SAME feathered weights)."""

    def __init__(self, h: int, w: int, overlap: int, out_device):
        self.h, self.w, self.overlap, self.out_device = h, w, overlap, out_device
        self.rgb = self.matte = self.weight = None

    def add(self, y0: int, x0: int, th: int, tw: int, rgb_t: torch.Tensor, matte_t: torch.Tensor | None) -> None:
        h, w = self.h, self.w
        scale = rgb_t.shape[-1] // tw
        if scale < 1 or rgb_t.shape[-1] != tw * scale or rgb_t.shape[-2] != th * scale:
            raise RuntimeError(f"decoder returned {tuple(rgb_t.shape)} for a {th}x{tw} latent tile "
                               "(not an integer upscale)")
        if self.rgb is None:
            dev = self.out_device if self.out_device is not None else rgb_t.device
            B = rgb_t.shape[0]
            self.rgb = torch.zeros((B, rgb_t.shape[1], h * scale, w * scale), device=dev, dtype=torch.float32)
            self.weight = torch.zeros((1, 1, h * scale, w * scale), device=dev, dtype=torch.float32)
            if matte_t is not None:
                self.matte = torch.zeros((B, 1, h * scale, w * scale), device=dev, dtype=torch.float32)
        dev = self.rgb.device
        ramp = self.overlap * scale
        wy = feather_1d(th * scale, ramp, y0 > 0, y0 + th < h, dev)
        wx = feather_1d(tw * scale, ramp, x0 > 0, x0 + tw < w, dev)
        wt = (wy[:, None] * wx[None, :])[None, None]
        Y, X, Hs, Ws = y0 * scale, x0 * scale, th * scale, tw * scale
        self.rgb[:, :, Y:Y + Hs, X:X + Ws] += rgb_t.to(dev, torch.float32) * wt
        if self.matte is not None:
            self.matte[:, :, Y:Y + Hs, X:X + Ws] += matte_t.to(dev, torch.float32) * wt
        self.weight[:, :, Y:Y + Hs, X:X + Ws] += wt

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        rgb = self.rgb / self.weight
        matte = (self.matte / self.weight).clamp_(0, 1) if self.matte is not None else None
        return rgb, matte


def _tile_grid(h: int, w: int, tile: int, overlap: int):
    th = tw = tile if tile else max(h, w)
    th, tw = min(th, h), min(tw, w)
    if tile and (th < h or tw < w):
        overlap = max(0, min(overlap, min(th, tw) // 2))
    return th, tw, overlap, tile_starts(h, th, overlap), tile_starts(w, tw, overlap)


def decode_jobs(latent_shape, decode_fn, tile: int = 0, overlap: int = 8, shared_stats: bool = True) -> int:
    """How many times :func:`decode_with_matte` calls ``on_tile`` for these arguments (progress bars)."""
    h, w = latent_shape[-2:]
    th, tw, overlap, ys, xs = _tile_grid(h, w, tile, overlap)
    n = len(ys) * len(xs)
    tiled = getattr(decode_fn, "tiled", None)
    if n > 1 and shared_stats and tiled is not None:
        n += tiled.steps(h, w, (th, tw))
    return n


def decode_with_matte(latents: torch.Tensor,
                      decode_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      tile: int = 0, overlap: int = 8, out_device=None,
                      on_tile: Callable[[int, int], None] | None = None,
                      shared_stats: bool = True) -> MatteDecode:
    """Decode ``latents`` ``[B,C,h,w]`` with ``decode_fn`` and run ``head`` on the tapped feature.

    ``tile`` / ``overlap`` are in latent pixels; ``tile=0`` (or a tile covering the latent) decodes in one
    pass. Tiled, each output tile's RGB *and* head output are accumulated with the same feathered weights
    (linear cross-fade across the overlap).

    If ``decode_fn`` carries a ``tiled`` attribute (a :class:`decoder_tiles.TiledDecoder`, as
    :func:`diffusers_decode_fn` and the ComfyUI glue provide) and ``shared_stats`` is true, the tiles are
    computed stage by stage with every GroupNorm using the statistics of the whole image and with
    receptive-field halos, so tiled == untiled up to float rounding (see :mod:`decoder_tiles` for the cost).
    Otherwise each tile is an independent ``decode_fn`` call (per-tile GroupNorm statistics and attention:
    an approximation everywhere, as in any plain tiled VAE decode). ``on_tile(done, total)`` is called after
    each tile job (progress bars, interrupts); :func:`decode_jobs` gives ``total`` in advance.
    """
    if latents.ndim != 4:
        raise UserError(f"latents: expected [B,C,h,w], got shape {tuple(latents.shape)}")
    B, _, h, w = latents.shape
    if tile < 0:
        raise UserError(f"tile must be >= 0 latent px, got {tile}")
    th, tw, overlap, ys, xs = _tile_grid(h, w, tile, overlap)
    total = len(ys) * len(xs)

    if total == 1:
        rgb, feature = decode_fn(latents)
        matte = head(feature) if head is not None else None
        del feature
        if on_tile:
            on_tile(1, 1)
        if out_device is not None:
            rgb = rgb.to(out_device)
            matte = matte.to(out_device) if matte is not None else None
        return MatteDecode(rgb, matte, 1)

    blend = _Blender(h, w, overlap, out_device)
    tiled = getattr(decode_fn, "tiled", None) if shared_stats else None
    jobs = decode_jobs(latents.shape, decode_fn, tile, overlap, shared_stats)
    done = 0

    def step():
        nonlocal done
        done += 1
        if on_tile:
            on_tile(done, jobs)

    if tiled is None:
        for y0 in ys:
            for x0 in xs:
                rgb_t, feat_t = decode_fn(latents[:, :, y0:y0 + th, x0:x0 + tw])
                matte_t = head(feat_t) if head is not None else None
                del feat_t
                blend.add(y0, x0, th, tw, rgb_t, matte_t)
                step()
    else:
        feature, stats = tiled.features(latents, (th, tw), step)
        plan, dev = tiled.plan, tiled.compute_device
        affine = stats.affine(plan.norm_out, dev)
        s = plan.upscale
        halo = max(plan.out_radius, int(getattr(head, "radius", 8)) if head is not None else 0)
        H, W = feature.shape[-2:]
        for y0 in ys:
            for x0 in xs:
                Y0, Y1, X0, X1 = y0 * s, (y0 + th) * s, x0 * s, (x0 + tw) * s
                ya, yb, xa, xb = max(0, Y0 - halo), min(H, Y1 + halo), max(0, X0 - halo), min(W, X1 + halo)
                rgb_t, matte_t = tiled.finish(feature[..., ya:yb, xa:xb].to(dev), affine, head)
                crop = (..., slice(Y0 - ya, Y1 - ya), slice(X0 - xa, X1 - xa))
                blend.add(y0, x0, th, tw, rgb_t[crop], matte_t[crop] if matte_t is not None else None)
                del rgb_t, matte_t
                step()
        del feature
    rgb, matte = blend.result()
    return MatteDecode(rgb, matte, len(ys) * len(xs), tiled is not None)


def diffusers_decode_fn(vae, store_device=None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``decode_fn`` for :func:`decode_with_matte` over a diffusers ``AutoencoderKL`` (RGB in -1..1); it
    carries a shared-statistics :class:`~decoder_tiles.TiledDecoder` as ``.tiled`` (``store_device``: where
    the whole-image stage tensors live; default the VAE's device)."""
    def decode_fn(z):
        return decode_with_features_diffusers(vae, z)

    def run_decode(z):
        if getattr(vae, "use_slicing", False) or getattr(vae, "use_tiling", False):
            raise UserError("shared-statistics tiling: disable the VAE's own slicing/tiling")
        return vae.decode(z)

    decode_fn.tiled = TiledDecoder(diffusers_decoder_plan(vae.decoder), run_decode, store_device=store_device)
    return decode_fn


# ------------------------------------------------------------------------------------------- metrics
def mask_metrics(pred: torch.Tensor, alpha: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """IoU (at ``threshold``), SAD (sum |pred - alpha| per image / 1000, the matting convention) and MAD
    (mean |pred - alpha|) between predicted and ground-truth alpha of the same shape (1 = foreground)."""
    pred, alpha = pred.float().flatten(1), alpha.float().flatten(1)
    pb, ab = pred >= threshold, alpha >= threshold
    inter = (pb & ab).sum(1).float()
    union = (pb | ab).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    err = (pred - alpha).abs()
    return {"iou": float(iou.mean()), "sad": float(err.sum(1).mean() / 1000.0), "mad": float(err.mean())}


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`` per sample, averaged."""
    p, t = pred.flatten(1), target.flatten(1)
    return (1.0 - (2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def matting_head_loss(pred: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """DiffuMatting Eq. 8: L1 + Dice between the head's sigmoid output and ground-truth alpha."""
    return F.l1_loss(pred, target) + dice_weight * dice_loss(pred, target)
