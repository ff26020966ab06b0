"""DRIP's latent transparency decoder ``D_trans`` (DRIP sec. 3.4 / A.3), ComfyUI-free.

    (F, alpha) = D_trans(X, Tri, D(z_F), D(z_alpha), z_F, z_alpha)

A small U-Net over pixels. Its input is the composite image ``X``, the trimap ``Tri`` and the plain VAE
decodes of the foreground and alpha latents, ``D(z_F)`` (RGB) and ``D(z_alpha)`` (the mean of the 3-channel
decode). The two latents themselves enter through ControlNet-style hint branches whose last conv is
zero-initialised, added to the U-Net features at the level whose stride equals the VAE's (1/8).

The network predicts a **residual** on the plain decode: ``F = clamp(D(z_F) + dF)``,
``alpha = clamp(D(z_alpha) + dA)``. Its final conv is zero-initialised, so an untrained decoder returns the
plain VAE decode exactly (clamped to 0..1); known trimap regions are then written over the alpha
(1 where the trimap says foreground, 0 where it says background).

Everything here is NCHW (network layout). Pixel inputs are 0..1; the trimap is 0 / 0.5 / 1;
latents are what the VAE decoder takes (unscaled: ComfyUI's LATENT convention, diffusers'
``latent_dist`` before ``scaling_factor``). The config's ``latent_scale`` normalises their magnitude.

Also here: the loss terms (L1, L2, Laplacian pyramid, Sobel gradient), tiled + flip-TTA inference and the
safetensors file format (never pickle).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

FORMAT_NAME = "diffusion-matting/transparency-decoder"
FORMAT_VERSION = 1
TRIMAP_BG_BELOW, TRIMAP_FG_ABOVE = 0.1, 0.9  # same thresholds as alpha.normalize_trimap


# ------------------------------------------------------------------------------------------- config
@dataclass
class TransparencyDecoderConfig:
    """Architecture of :class:`TransparencyDecoder` (stored as JSON in the safetensors metadata).

    * ``base_channels``: width at full resolution; level ``i`` has ``base_channels * channel_mult[i]``.
    * ``channel_mult``: one entry per resolution level (``levels = len(channel_mult)``); level ``i`` has
      stride ``2**i``, so the lowest resolution is ``1 / 2**(levels - 1)``.
    * ``blocks_per_level``: residual blocks per level on the way down (and up).
    * ``attention``: multi-head self-attention at the lowest resolution (global context, costs memory
      quadratic in its token count; tiled inference bounds it).
    * ``latent_channels`` / ``latent_stride``: the VAE's latent depth and spatial compression (4 / 8 for
      SD1.x / SDXL). ``latent_scale`` multiplies latents before the hint branches (SD's 0.18215).
    """

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 1
    attention: bool = True
    attention_heads: int = 4
    latent_channels: int = 4
    latent_stride: int = 8
    latent_scale: float = 0.18215
    hint_channels: int = 64

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise UserError(f"transparency decoder config: {msg}")
        if self.base_channels < 4 or self.base_channels % 4:
            bad(f"base_channels must be a multiple of 4 (>= 4), got {self.base_channels}")
        if not 1 <= len(self.channel_mult) <= 7 or any(m < 1 for m in self.channel_mult):
            bad(f"channel_mult must have 1..7 positive entries, got {list(self.channel_mult)}")
        if self.blocks_per_level < 1:
            bad(f"blocks_per_level must be >= 1, got {self.blocks_per_level}")
        if self.attention and (self.attention_heads < 1 or self.channels(self.levels - 1) % self.attention_heads):
            bad(f"attention_heads ({self.attention_heads}) must divide the lowest level's "
                f"{self.channels(self.levels - 1)} channels")
        if self.latent_channels < 1:
            bad(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.latent_stride < 1 or self.latent_stride & (self.latent_stride - 1):
            bad(f"latent_stride must be a power of two, got {self.latent_stride}")
        if not self.latent_scale > 0:
            bad(f"latent_scale must be > 0, got {self.latent_scale}")
        if self.hint_channels < 4 or self.hint_channels % 4:
            bad(f"hint_channels must be a multiple of 4 (>= 4), got {self.hint_channels}")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def channels(self, level: int) -> int:
        return self.base_channels * self.channel_mult[level]

    @property
    def inject_level(self) -> int:
        """Level where the latents are added: stride == latent_stride, or the lowest level if shallower."""
        return min(int(math.log2(self.latent_stride)), self.levels - 1)

    @property
    def multiple(self) -> int:
        """Pixel sizes fed to the network must be multiples of this (latent grid and U-Net strides)."""
        return max(self.latent_stride, 2 ** (self.levels - 1))

    def to_json(self) -> str:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "TransparencyDecoderConfig":
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{source}: config is not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise UserError(f"{source}: config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{source}: unknown config keys {unknown} (a newer format?)")
        try:
            return cls(**d)
        except TypeError as exc:
            raise UserError(f"{source}: bad config ({exc})") from None


# ------------------------------------------------------------------------------------------- layers
class _Norm(nn.Module):
    """LayerNorm over channels at each pixel (spatially local, so tiles see the same statistics as the
    whole image, unlike GroupNorm)."""

    def __init__(self, ch, ops, device=None, dtype=None):
        super().__init__()
        self.norm = ops.LayerNorm(ch, eps=1e-6, device=device, dtype=dtype)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, ops, device=None, dtype=None):
        super().__init__()
        self.norm1 = _Norm(cin, ops, device, dtype)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, device=device, dtype=dtype)
        self.norm2 = _Norm(cout, ops, device, dtype)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, device=device, dtype=dtype)
        self.skip = ops.Conv2d(cin, cout, 1, device=device, dtype=dtype) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class _Attention(nn.Module):
    def __init__(self, ch, heads, ops, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.norm = _Norm(ch, ops, device, dtype)
        self.qkv = ops.Conv2d(ch, 3 * ch, 1, device=device, dtype=dtype)
        self.proj = ops.Conv2d(ch, ch, 1, device=device, dtype=dtype)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Hint(nn.Module):
    """ControlNet-style latent branch: conv -> SiLU -> conv -> SiLU -> zero-initialised 1x1 conv."""

    def __init__(self, cin, hidden, cout, ops, device=None, dtype=None):
        super().__init__()
        self.conv1 = ops.Conv2d(cin, hidden, 3, padding=1, device=device, dtype=dtype)
        self.conv2 = ops.Conv2d(hidden, hidden, 3, padding=1, device=device, dtype=dtype)
        self.zero = ops.Conv2d(hidden, cout, 1, device=device, dtype=dtype)

    def forward(self, z):
        return self.zero(F.silu(self.conv2(F.silu(self.conv1(z)))))


def _zero_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


# -------------------------------------------------------------------------------------------- model
class TransparencyDecoder(nn.Module):
    """``(F, alpha) = D_trans(X, Tri, D(z_F), D(z_alpha), z_F, z_alpha)`` as a residual on the plain decode.

    ``operations`` supplies ``Conv2d`` and ``LayerNorm`` (``torch.nn`` by default; ComfyUI passes
    ``comfy.ops.manual_cast`` so weights are cast/offloaded by its model management).
    """

    IN_CHANNELS = 3 + 1 + 3 + 1  # X, trimap, D(z_F), D(z_alpha)
    OUT_CHANNELS = 3 + 1  # dF, dA

    def __init__(self, config: TransparencyDecoderConfig | None = None, operations=None, device=None,
                 dtype=None):
        super().__init__()
        ops = operations if operations is not None else nn
        cfg = self.config = config or TransparencyDecoderConfig()
        kw = dict(device=device, dtype=dtype)
        self.conv_in = ops.Conv2d(self.IN_CHANNELS, cfg.channels(0), 3, padding=1, **kw)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = cfg.channels(0)
        skips = []
        for lvl in range(cfg.levels):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                blocks.append(_ResBlock(ch, cfg.channels(lvl), ops, **kw))
                ch = cfg.channels(lvl)
            self.down.append(blocks)
            skips.append(ch)
            if lvl < cfg.levels - 1:
                self.downsample.append(ops.Conv2d(ch, cfg.channels(lvl + 1), 3, stride=2, padding=1, **kw))
                ch = cfg.channels(lvl + 1)
        inj = cfg.channels(cfg.inject_level)
        self.hint_fg = _zero_hint(_Hint(cfg.latent_channels, cfg.hint_channels, inj, ops, **kw))
        self.hint_alpha = _zero_hint(_Hint(cfg.latent_channels, cfg.hint_channels, inj, ops, **kw))
        self.mid1 = _ResBlock(ch, ch, ops, **kw)
        self.attn = _Attention(ch, cfg.attention_heads, ops, **kw) if cfg.attention else None
        self.mid2 = _ResBlock(ch, ch, ops, **kw)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(cfg.levels)):
            if lvl < cfg.levels - 1:
                self.upsample.append(ops.Conv2d(ch, cfg.channels(lvl), 3, padding=1, **kw))
                ch = cfg.channels(lvl)
            blocks = nn.ModuleList()
            for i in range(cfg.blocks_per_level):
                blocks.append(_ResBlock(ch + (skips[lvl] if i == 0 else 0), cfg.channels(lvl), ops, **kw))
                ch = cfg.channels(lvl)
            self.up.append(blocks)
        self.norm_out = _Norm(ch, ops, **kw)
        # the output conv also sees the raw inputs (pixel-exact paths such as "F = X where opaque")
        self.conv_out = _zero_(ops.Conv2d(ch + self.IN_CHANNELS, self.OUT_CHANNELS, 3, padding=1, **kw))

    # ---------------------------------------------------------------------------------------------
    def _latent_at(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        z = z * self.config.latent_scale
        if tuple(z.shape[-2:]) != size:
            z = F.interpolate(z, size=size, mode="nearest")
        return z

    def residual(self, image, trimap, fg, alpha, z_fg, z_alpha) -> torch.Tensor:
        """The correction ``[B,4,H,W]`` (dF RGB, dA) for the plain decodes; H, W multiples of ``config.multiple``."""
        cfg = self.config
        h, w = image.shape[-2:]
        if h % cfg.multiple or w % cfg.multiple:
            raise UserError(f"transparency decoder: size {w}x{h} must be a multiple of {cfg.multiple} "
                            "(use decode_tiled, which pads)")
        lh, lw = h // cfg.latent_stride, w // cfg.latent_stride
        for name, z in (("z_fg", z_fg), ("z_alpha", z_alpha)):
            if z.shape[1] != cfg.latent_channels or tuple(z.shape[-2:]) != (lh, lw):
                raise UserError(f"transparency decoder: {name} has shape {tuple(z.shape)}, expected "
                                f"[B,{cfg.latent_channels},{lh},{lw}] for a {w}x{h} image")
        inp = torch.cat([image, trimap, fg, alpha], dim=1) * 2.0 - 1.0
        x = self.conv_in(inp)
        skips = []
        for lvl in range(cfg.levels):
            for block in self.down[lvl]:
                x = block(x)
            if lvl == cfg.inject_level:
                size = tuple(x.shape[-2:])
                x = x + self.hint_fg(self._latent_at(z_fg, size)) + self.hint_alpha(self._latent_at(z_alpha, size))
            skips.append(x)
            if lvl < cfg.levels - 1:
                x = self.downsample[lvl](x)
        x = self.mid1(x)
        if self.attn is not None:
            x = self.attn(x)
        x = self.mid2(x)
        for i, lvl in enumerate(reversed(range(cfg.levels))):
            if lvl < cfg.levels - 1:
                x = self.upsample[i - 1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
            for j, block in enumerate(self.up[i]):
                x = block(torch.cat([x, skips[lvl]], dim=1) if j == 0 else x)
        return self.conv_out(torch.cat([F.silu(self.norm_out(x)), inp], dim=1))

    @staticmethod
    def compose(delta, fg, alpha, trimap=None, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a residual: ``F = D(z_F) + dF``, ``alpha = D(z_alpha) + dA``, clamped to 0..1 (unless
        ``clamp`` is off, as in training) with the trimap's known regions written over alpha."""
        out_fg = fg + delta[:, :3].to(fg.dtype)
        out_a = alpha + delta[:, 3:4].to(alpha.dtype)
        if clamp:
            out_fg, out_a = out_fg.clamp(0, 1), out_a.clamp(0, 1)
        return out_fg, enforce_trimap(out_a, trimap)

    def forward(self, image, trimap, fg, alpha, z_fg, z_alpha, clamp: bool = True):
        """One pass (sizes multiples of ``config.multiple``). Returns (foreground [B,3,H,W] straight,
        alpha [B,1,H,W])."""
        delta = self.residual(image, trimap, fg, alpha, z_fg, z_alpha)
        return self.compose(delta, fg, alpha, trimap, clamp=clamp)


def _zero_hint(h: _Hint) -> _Hint:
    _zero_(h.zero)
    return h


def enforce_trimap(alpha: torch.Tensor, trimap: torch.Tensor | None) -> torch.Tensor:
    """alpha = 1 where the trimap says foreground (> 0.9), 0 where background (< 0.1), else unchanged.

    Shapes: alpha ``[B,1,H,W]`` (or ``[B,H,W]``), trimap the same shape (0 / 0.5 / 1)."""
    if trimap is None:
        return alpha
    trimap = trimap.to(alpha)
    out = torch.where(trimap > TRIMAP_FG_ABOVE, torch.ones_like(alpha), alpha)
    return torch.where(trimap < TRIMAP_BG_BELOW, torch.zeros_like(alpha), out)


def alpha_from_decode(decoded_rgb: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The alpha latent decodes to a 3-channel image whose channel mean is alpha (keeps ``dim``)."""
    return decoded_rgb.mean(dim=dim, keepdim=True)


def plain_decode(fg, alpha, trimap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """What you get without a decoder: the VAE decodes clamped to 0..1, known trimap regions respected."""
    return fg.clamp(0, 1), enforce_trimap(alpha.clamp(0, 1), trimap)


# ------------------------------------------------------------------------------------- tiled inference
def _feather(n: int, overlap: int, lead: bool, trail: bool, device) -> torch.Tensor:
    """1-D blending weight: linear ramps of ``overlap`` px on sides that overlap a neighbour tile."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 1.0) / (overlap + 1.0)
        if lead:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if trail:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def _starts(size: int, tile: int, step: int, align: int) -> list[int]:
    if size <= tile:
        return [0]
    out = list(range(0, size - tile, step))
    last = (size - tile) // align * align
    if not out or out[-1] != last:
        out.append(last)
    return out


def tile_count(height: int, width: int, config: TransparencyDecoderConfig, tile: int = 512,
               overlap: int = 64, flip_tta: bool = False) -> int:
    """Number of network passes :func:`decode_tiled` makes for one image (for progress bars)."""
    m = config.multiple
    hp, wp = -(-height // m) * m, -(-width // m) * m
    tile, overlap = _tile_params(tile, overlap, config)
    if tile <= 0 or (hp <= tile and wp <= tile):
        n = 1
    else:
        step = tile - overlap
        n = len(_starts(hp, tile, step, config.latent_stride)) * len(_starts(wp, tile, step, config.latent_stride))
    return n * (2 if flip_tta else 1)


def _tile_params(tile: int, overlap: int, cfg: TransparencyDecoderConfig) -> tuple[int, int]:
    if tile <= 0:
        return 0, 0
    tile = max(cfg.multiple, -(-tile // cfg.multiple) * cfg.multiple)
    overlap = max(0, overlap) // cfg.latent_stride * cfg.latent_stride
    overlap = min(overlap, (tile // 2) // cfg.latent_stride * cfg.latent_stride)
    return tile, overlap


@torch.no_grad()
def decode_tiled(model: TransparencyDecoder, image, trimap, fg, alpha, z_fg, z_alpha, tile: int = 512,
                 overlap: int = 64, flip_tta: bool = False, callback: Callable[[], None] | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder on any size, tile by tile, and compose the result.

    Inputs NCHW: image / fg ``[B,3,H,W]``, trimap / alpha ``[B,1,H,W]`` (trimap may be None = all
    unknown), latents ``[B,C,h,w]`` with ``h = ceil(H / stride)``. The pixel inputs are edge-padded to
    ``stride * h`` then to a multiple of ``config.multiple`` (latents padded to match), the residual is
    computed on tiles of ``tile`` px (rounded up to that multiple; ``tile <= 0`` = one pass) that overlap by
    ``overlap`` px and are blended with linear feathers, then cropped back. ``flip_tta`` averages the
    residual with the one computed on horizontally flipped inputs. ``callback()`` runs after each pass
    (progress / interrupt checks). ``device``: where to run (default: where the weights are). Returns
    (foreground [B,3,H,W] straight, alpha [B,1,H,W]) on the inputs' device.
    """
    cfg = model.config
    s = cfg.latent_stride
    b, _, h, w = image.shape
    if trimap is None:
        trimap = torch.full_like(alpha, 0.5)
    for name, t, c in (("trimap", trimap, 1), ("foreground decode", fg, 3), ("alpha decode", alpha, 1)):
        if t.shape[0] != b or t.shape[1] != c or tuple(t.shape[-2:]) != (h, w):
            raise UserError(f"transparency decoder: {name} has shape {tuple(t.shape)}, expected [{b},{c},{h},{w}]")
    lh, lw = z_fg.shape[-2:]
    if tuple(z_alpha.shape) != tuple(z_fg.shape):
        raise UserError(f"transparency decoder: fg latent {tuple(z_fg.shape)} and alpha latent "
                        f"{tuple(z_alpha.shape)} differ")
    if not (lh * s - s < h <= lh * s and lw * s - s < w <= lw * s):
        raise UserError(f"transparency decoder: a {lw}x{lh} latent decodes to {lw * s}x{lh * s} px, "
                        f"which does not cover the {w}x{h} image")
    m = cfg.multiple
    hp, wp = -(-lh * s // m) * m, -(-lw * s // m) * m

    def pad(t, H, W, f=1):
        ph, pw = H // f - t.shape[-2], W // f - t.shape[-1]
        return F.pad(t, (0, pw, 0, ph), mode="replicate") if ph or pw else t

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = torch.float32
    inputs = [pad(t, hp, wp) for t in (image, trimap, fg, alpha)] + [pad(z, hp, wp, s) for z in (z_fg, z_alpha)]
    inputs = [t.to(dev, dtype) for t in inputs]

    tile, overlap = _tile_params(tile, overlap, cfg)
    single = tile <= 0 or (hp <= tile and wp <= tile)

    def run(args):
        if single:
            out = model.residual(*args).float()
            if callback:
                callback()
            return out
        th, tw = min(tile, hp), min(tile, wp)
        acc = torch.zeros(b, 4, hp, wp, device=dev)
        wsum = torch.zeros(1, 1, hp, wp, device=dev)
        ys = _starts(hp, th, th - overlap, s)
        xs = _starts(wp, tw, tw - overlap, s)
        for y in ys:
            wy = _feather(th, overlap, y > 0, y + th < hp, dev)
            for x in xs:
                wx = _feather(tw, overlap, x > 0, x + tw < wp, dev)
                crop = [t[..., y:y + th, x:x + tw] for t in args[:4]]
                crop += [z[..., y // s:(y + th) // s, x // s:(x + tw) // s] for z in args[4:]]
                wt = (wy[:, None] * wx[None, :])[None, None]
                acc[..., y:y + th, x:x + tw] += model.residual(*crop).float() * wt
                wsum[..., y:y + th, x:x + tw] += wt
                if callback:
                    callback()
        return acc / wsum

    delta = run(inputs)
    if flip_tta:
        delta = 0.5 * (delta + run([t.flip(-1) for t in inputs]).flip(-1))
    delta = delta[..., :h, :w].to(fg.device)
    return TransparencyDecoder.compose(delta, fg.float(), alpha.float(), trimap.float())


def refine_bhwc(model: TransparencyDecoder | None, image, trimap, fg_decoded, alpha_decoded, z_fg, z_alpha,
                tile: int = 512, overlap: int = 64, flip_tta: bool = False, callback=None, device=None):
    """ComfyUI layout wrapper: image / fg decode ``[B,H,W,3]``, alpha decode ``[B,H,W,3]`` (channel mean is
    alpha) or ``[B,H,W]``, trimap ``[B,H,W]`` or None, latents ``[B,C,h,w]``.

    Returns (straight foreground ``[B,H,W,3]``, alpha ``[B,H,W]``, 1 = foreground). ``model=None`` gives
    the plain decode (clamped, known trimap regions respected)."""
    a = alpha_decoded if alpha_decoded.ndim == 3 else alpha_decoded.mean(-1)
    a = a.unsqueeze(1)
    f = fg_decoded[..., :3].permute(0, 3, 1, 2)
    t = trimap.unsqueeze(1) if trimap is not None else None
    if model is None:
        out_f, out_a = plain_decode(f.float(), a.float(), t)
    else:
        out_f, out_a = decode_tiled(model, image[..., :3].permute(0, 3, 1, 2), t, f, a, z_fg, z_alpha,
                                    tile=tile, overlap=overlap, flip_tta=flip_tta, callback=callback,
                                    device=device)
    return out_f.permute(0, 2, 3, 1).contiguous(), out_a[:, 0]


# -------------------------------------------------------------------------------------------- losses
# Weighted terms (the foreground, weighted by alpha_gt) compare *premultiplied* values ``w * pred`` and
# ``w * target`` and divide by ``mean(w)``, so pixels count in proportion to their weight, pixels of weight 0
# (where the colour is undefined) never enter a band or a gradient, and the scale does not depend on how much
# of the crop is foreground. With ``w = 1`` every term reduces to its plain form.
def _premultiplied(pred, target, weight):
    if weight is None:
        return pred, target, None
    weight = weight.to(pred)
    return pred * weight, target * weight, weight.mean().clamp_min(1e-8)


def l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``L1 = mean(|w*pred - w*target|) / mean(w)`` = ``sum_p w_p |pred_p - target_p| / (C * sum_p w_p)``.

    ``pred``/``target`` ``[B,C,H,W]``; ``weight`` ``[B,1,H,W]`` (>= 0, broadcast over channels) or None
    (``w = 1``: the plain mean absolute error)."""
    p, t, norm = _premultiplied(pred, target, weight)
    err = (p - t).abs().mean()
    return err if norm is None else err / norm


def l2_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``L2 = mean((w*pred - w*target)^2) / mean(w)`` = ``sum_p w_p^2 (pred_p - target_p)^2 / (C * sum_p w_p)``
    (the plain mean squared error when ``weight`` is None)."""
    p, t, norm = _premultiplied(pred, target, weight)
    err = ((p - t) ** 2).mean()
    return err if norm is None else err / norm


_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur5(x: torch.Tensor) -> torch.Tensor:
    """Separable 5x5 binomial blur (kernel [1,4,6,4,1]/16 per axis), edge-replicated."""
    c = x.shape[1]
    k = _BINOMIAL.to(x)
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int = 5) -> list[torch.Tensor]:
    """Bands ``L_0 .. L_{K-1}``: ``G_0 = x``, ``G_{k+1} = blur5(G_k)[::2, ::2]``,
    ``L_k = G_k - up(G_{k+1})`` (bilinear up to G_k's size) for k < K-1, and ``L_{K-1} = G_{K-1}``
    (the low-pass residual). Stops early (fewer bands) once a level is smaller than 4 px."""
    bands = []
    cur = x
    for _ in range(levels - 1):
        if min(cur.shape[-2:]) < 4:
            break
        down = _blur5(cur)[..., ::2, ::2]
        up = F.interpolate(down, size=cur.shape[-2:], mode="bilinear", align_corners=False)
        bands.append(cur - up)
        cur = down
    bands.append(cur)
    return bands


def laplacian_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   levels: int = 5) -> torch.Tensor:
    """Laplacian-pyramid L1: ``sum_k 2^k * mean|L_k(w*pred) - L_k(w*target)| / mean(w)`` over the bands of
    :func:`laplacian_pyramid` (k = 0 is the finest band; ``w = 1`` without a weight)."""
    p, t, norm = _premultiplied(pred, target, weight)
    total = pred.new_zeros(())
    for k, (bp, bt) in enumerate(zip(laplacian_pyramid(p, levels), laplacian_pyramid(t, levels))):
        total = total + (2.0 ** k) * (bp - bt).abs().mean()
    return total if norm is None else total / norm


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (d/dx, d/dy), normalised by 1/8 so a ramp of slope s gives s; edge-replicated.

    ``gx = x (*) [[-1,0,1],[-2,0,2],[-1,0,1]] / 8`` (cross-correlation, x to the right), gy its transpose."""
    c = x.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8.0
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, kx.view(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c)
    gy = F.conv2d(xp, kx.t().contiguous().view(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c)
    return gx, gy


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sobel-gradient L1: ``(mean|gx(w*pred) - gx(w*target)| + mean|gy(w*pred) - gy(w*target)|) / mean(w)``
    with :func:`sobel` (``w = 1`` without a weight)."""
    p, t, norm = _premultiplied(pred, target, weight)
    px, py = sobel(p)
    tx, ty = sobel(t)
    err = (px - tx).abs().mean() + (py - ty).abs().mean()
    return err if norm is None else err / norm


@dataclass
class LossWeights:
    l1: float = 1.0
    l2: float = 1.0
    laplacian: float = 1.0
    gradient: float = 1.0
    foreground: float = 1.0  # weight of the foreground terms relative to alpha's


def decoder_loss(pred_fg, pred_alpha, gt_fg, gt_alpha, fg_weight=None, weights: LossWeights | None = None):
    """DRIP's decoder loss: ``(L1 + L2 + Laplacian + gradient)(alpha)`` plus the same four terms on the
    foreground weighted by ``fg_weight`` (default ``gt_alpha``: colour matters in proportion to coverage and
    is undefined where alpha = 0), scaled by :class:`LossWeights`.

    Returns (total, dict of the eight terms as floats)."""
    wts = weights or LossWeights()
    fw = gt_alpha if fg_weight is None else fg_weight
    parts = {
        "alpha_l1": l1_loss(pred_alpha, gt_alpha), "alpha_l2": l2_loss(pred_alpha, gt_alpha),
        "alpha_lap": laplacian_loss(pred_alpha, gt_alpha), "alpha_grad": gradient_loss(pred_alpha, gt_alpha),
        "fg_l1": l1_loss(pred_fg, gt_fg, fw), "fg_l2": l2_loss(pred_fg, gt_fg, fw),
        "fg_lap": laplacian_loss(pred_fg, gt_fg, fw), "fg_grad": gradient_loss(pred_fg, gt_fg, fw),
    }
    scale = {"l1": wts.l1, "l2": wts.l2, "lap": wts.laplacian, "grad": wts.gradient}
    total = pred_alpha.new_zeros(())
    for name, value in parts.items():
        kind, term = name.split("_")
        total = total + scale[term] * (wts.foreground if kind == "fg" else 1.0) * value
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------- file format
def save_decoder(model: TransparencyDecoder, path: str | os.PathLike, vae_family: str = "unknown",
                 extra: dict | None = None) -> Path:
    """Write weights (float32) + metadata (format name/version, config JSON, vae family, extras)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": model.config.to_json(),
            "vae_family": str(vae_family)}
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    save_file(state, str(path), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata, checked to be ours; UserError naming the path otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"transparency decoder file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: missing metadata format={FORMAT_NAME!r} (found {meta.get('format')!r}); "
                        "not a diffusion-matting transparency decoder")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise UserError(f"{path}: missing or bad metadata 'format_version'") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version} is newer than this pack reads ({FORMAT_VERSION})")
    if "config" not in meta:
        raise UserError(f"{path}: missing metadata 'config' (the architecture JSON)")
    return meta


def load_decoder(path: str | os.PathLike, operations=None, device=None, dtype=None
                 ) -> tuple[TransparencyDecoder, dict[str, str]]:
    """Load a decoder written by :func:`save_decoder`. Returns (model in eval mode, metadata)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    config = TransparencyDecoderConfig.from_json(meta["config"], source=str(path))
    state = load_file(str(path), device="cpu")
    model = TransparencyDecoder(config, operations=operations, device=device, dtype=dtype)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        raise UserError(f"{path}: weights do not match its config: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True, assign=False)
    return model.eval(), meta
