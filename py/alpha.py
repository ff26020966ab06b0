"""Alpha / RGBA toolkit (ComfyUI-free, torch).

Conventions used throughout the pack
------------------------------------
* IMAGE: float tensor ``[B, H, W, C]`` in 0..1 (ComfyUI layout). ``C`` is 3 (RGB) or 4 (RGBA).
* alpha MASK: float tensor ``[B, H, W]`` in 0..1 with **1 = foreground** (opaque).
  ComfyUI's ``LoadImage`` mask is ``1 - alpha`` (1 = transparent); convert with :func:`comfy_mask_to_alpha`.
* Foreground colour is **straight** (not multiplied by alpha) unless a name says ``premultiplied``.
* Trimap: float ``[B, H, W]`` with 0 = background, 0.5 = unknown, 1 = foreground.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import UserError

TRIMAP_BG, TRIMAP_UNKNOWN, TRIMAP_FG = 0.0, 0.5, 1.0


# ----------------------------------------------------------------------------------------- shapes
def as_image(image: torch.Tensor, name: str = "image", channels: Sequence[int] = (3, 4)) -> torch.Tensor:
    """Check/normalise an IMAGE to float ``[B,H,W,C]``; a single ``[H,W,C]`` image gets a batch axis."""
    if not isinstance(image, torch.Tensor):
        raise UserError(f"{name}: expected a tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise UserError(f"{name}: expected [B,H,W,C], got shape {tuple(image.shape)}")
    if image.shape[-1] not in channels:
        raise UserError(f"{name}: expected {' or '.join(map(str, channels))} channels, got {image.shape[-1]}")
    if image.shape[1] < 1 or image.shape[2] < 1 or image.shape[0] < 1:
        raise UserError(f"{name}: empty image of shape {tuple(image.shape)}")
    image = image.float()
    if torch.isnan(image).any():
        raise UserError(f"{name}: contains NaN values")
    return image


def as_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Check/normalise a MASK to float ``[B,H,W]``; ``[H,W]`` gets a batch axis, ``[B,H,W,1]`` is squeezed."""
    if not isinstance(mask, torch.Tensor):
        raise UserError(f"{name}: expected a tensor, got {type(mask).__name__}")
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise UserError(f"{name}: expected [B,H,W], got shape {tuple(mask.shape)}")
    mask = mask.float()
    if torch.isnan(mask).any():
        raise UserError(f"{name}: contains NaN values")
    return mask


def broadcast_batch(*tensors: torch.Tensor, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Broadcast batch sizes 1 -> N and check that H, W agree, with an error naming both sizes."""
    names = list(names or [f"input {i}" for i in range(len(tensors))])
    sizes = [tuple(t.shape[1:3]) for t in tensors]
    for n, s in zip(names[1:], sizes[1:]):
        if s != sizes[0]:
            raise UserError(
                f"size mismatch: {names[0]} is {sizes[0][1]}x{sizes[0][0]} (WxH) but {n} is {s[1]}x{s[0]}"
            )
    batch = max(t.shape[0] for t in tensors)
    out = []
    for n, t in zip(names, tensors):
        if t.shape[0] == batch:
            out.append(t)
        elif t.shape[0] == 1:
            out.append(t.expand(batch, *t.shape[1:]))
        else:
            raise UserError(f"batch mismatch: {n} has {t.shape[0]} items, others have {batch} (only 1 -> N broadcasts)")
    return out


# ------------------------------------------------------------------------------------ conventions
def comfy_mask_to_alpha(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``LoadImage`` mask (1 = transparent) -> alpha (1 = foreground)."""
    return 1.0 - mask


def alpha_to_comfy_mask(alpha: torch.Tensor) -> torch.Tensor:
    """alpha (1 = foreground) -> ComfyUI ``LoadImage``-style mask (1 = transparent)."""
    return 1.0 - alpha


def premultiply(straight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Straight colour ``F`` -> premultiplied ``alpha * F``."""
    return straight * alpha.unsqueeze(-1)


def unpremultiply(premultiplied: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Premultiplied ``alpha * F`` -> straight ``F``; where ``alpha <= eps`` the colour is 0 (undefined)."""
    a = alpha.unsqueeze(-1)
    return torch.where(a > eps, premultiplied / a.clamp_min(eps), torch.zeros_like(premultiplied)).clamp(0, 1)


def join_rgba(straight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Straight RGB ``[B,H,W,3]`` + alpha ``[B,H,W]`` -> RGBA ``[B,H,W,4]`` (straight colour)."""
    straight = as_image(straight, "foreground", channels=(3, 4))[..., :3]
    alpha = as_mask(alpha, "alpha")
    straight, alpha = broadcast_batch(straight, alpha, names=["foreground", "alpha"])
    return torch.cat([straight, alpha.unsqueeze(-1).to(straight)], dim=-1).clamp(0, 1)


def split_rgba(rgba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA ``[B,H,W,4]`` -> (straight RGB ``[B,H,W,3]``, alpha ``[B,H,W]``). RGB input gets alpha 1."""
    rgba = as_image(rgba, "rgba", channels=(3, 4))
    if rgba.shape[-1] == 3:
        return rgba, torch.ones(rgba.shape[:3], dtype=rgba.dtype, device=rgba.device)
    return rgba[..., :3], rgba[..., 3]


# ------------------------------------------------------------------------------------ compositing
def composite(straight: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Porter-Duff *over* with straight colour: ``I = alpha * F + (1 - alpha) * B``.

    ``background`` is an IMAGE ``[B,H,W,3]`` or a colour tensor ``[3]`` (broadcast everywhere).
    """
    a = alpha.unsqueeze(-1)
    if background.ndim == 1:
        background = background.to(straight).view(1, 1, 1, -1)
    return a * straight + (1.0 - a) * background


def parse_color(text: str) -> tuple[float, float, float]:
    """Parse ``"#00b140"``, ``"0,177,64"`` (0-255) or ``"0,0.69,0.25"`` (0-1) into an RGB tuple in 0..1."""
    s = text.strip()
    try:
        if s.startswith("#") and len(s) == 7:
            return tuple(int(s[i:i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]
        parts = [float(p) for p in s.replace(" ", "").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise UserError(f"colour {text!r}: expected '#rrggbb' or 'R,G,B'")
    if any(p > 1.0 for p in parts):
        if any(p < 0 or p > 255 for p in parts):
            raise UserError(f"colour {text!r}: components must lie in 0..255")
        return tuple(p / 255.0 for p in parts)  # type: ignore[return-value]
    if any(p < 0 for p in parts):
        raise UserError(f"colour {text!r}: components must be >= 0")
    return tuple(parts)  # type: ignore[return-value]


def checkerboard(height: int, width: int, square: int = 16, light: float = 0.8, dark: float = 0.55,
                 device=None) -> torch.Tensor:
    """Grey checkerboard ``[H,W,3]`` (the usual 'transparent' backdrop)."""
    yy = torch.arange(height, device=device).div(square, rounding_mode="floor")
    xx = torch.arange(width, device=device).div(square, rounding_mode="floor")
    cells = (yy[:, None] + xx[None, :]) % 2
    board = torch.where(cells == 0, torch.tensor(light, device=device), torch.tensor(dark, device=device))
    return board.unsqueeze(-1).expand(height, width, 3).float()


def preview(straight: torch.Tensor, alpha: torch.Tensor, mode: str = "checkerboard",
            color: Sequence[float] = (1.0, 1.0, 1.0), background: torch.Tensor | None = None,
            square: int = 16) -> torch.Tensor:
    """Composite a straight foreground over a checkerboard, a solid colour or an image (for a batch)."""
    straight = as_image(straight, "foreground")[..., :3]
    alpha = as_mask(alpha, "alpha")
    straight, alpha = broadcast_batch(straight, alpha, names=["foreground", "alpha"])
    b, h, w, _ = straight.shape
    if mode == "checkerboard":
        bg = checkerboard(h, w, square, device=straight.device).unsqueeze(0)
    elif mode == "color":
        bg = torch.tensor(list(color), dtype=straight.dtype, device=straight.device)
        if bg.numel() != 3:
            raise UserError("color: expected 3 components")
    elif mode == "image":
        if background is None:
            raise UserError("preview mode 'image' needs a background image")
        bg = as_image(background, "background")[..., :3].to(straight.device)
        bg = broadcast_batch(straight, bg, names=["foreground", "background"])[1]
    else:
        raise UserError(f"preview mode {mode!r}: expected checkerboard, color or image")
    return composite(straight, alpha, bg).clamp(0, 1)


# ------------------------------------------------------------------------------------ morphology
def _disk(radius: int, device) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + 1e-6).float()


def dilate(binary: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``[B,H,W]`` by a disk of ``radius`` px (separable max-pool for speed on squares
    is not isotropic; we use a disk via convolution of the indicator, exact for binary masks)."""
    if radius <= 0:
        return binary.clone()
    k = _disk(radius, binary.device)
    x = binary.float().unsqueeze(1)
    hit = F.conv2d(F.pad(x, (radius,) * 4, mode="constant", value=0.0), k[None, None])
    return (hit[:, 0] > 0.5).to(binary.dtype)


def erode(binary: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion by a disk of ``radius`` px (outside the image counts as neither: border-replicated)."""
    if radius <= 0:
        return binary.clone()
    k = _disk(radius, binary.device)
    x = binary.float().unsqueeze(1)
    miss = F.conv2d(F.pad(1.0 - x, (radius,) * 4, mode="replicate"), k[None, None])
    return (miss[:, 0] < 0.5).to(binary.dtype)


def trimap_from_mask(mask: torch.Tensor, erode_px: int = 8, dilate_px: int = 8, threshold: float = 0.5,
                     strict: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Trimap from a (coarse) alpha mask: definite foreground = mask eroded by ``erode_px``, definite
    background = outside the mask dilated by ``dilate_px``, unknown (0.5) in between.

    Returns ``(trimap [B,H,W], warnings)``. A mask with no foreground (or no background) cannot give a
    two-sided trimap: with ``strict`` that is a :class:`UserError`; otherwise the trimap is returned as it is
    (all background / all foreground plus the unknown band) and a warning says so.
    """
    mask = as_mask(mask, "mask")
    if erode_px < 0 or dilate_px < 0:
        raise UserError(f"erode/dilate radii must be >= 0 px, got erode={erode_px}, dilate={dilate_px}")
    binary = (mask >= threshold).float()
    fg = erode(binary, erode_px)
    grown = dilate(binary, dilate_px)
    trimap = torch.full_like(mask, TRIMAP_UNKNOWN)
    trimap[grown < 0.5] = TRIMAP_BG
    trimap[fg > 0.5] = TRIMAP_FG
    warnings = []
    for i in range(mask.shape[0]):
        has_fg = bool((binary[i] > 0.5).any())
        has_bg = bool((binary[i] < 0.5).any())
        if not has_fg or not has_bg:
            what = "no foreground" if not has_fg else "no background"
            msg = (f"mask {i}: {what} above threshold {threshold}; the trimap is "
                   f"{'all background' if not has_fg else 'all foreground'} (nothing to matte)")
            if strict:
                raise UserError(msg)
            warnings.append(msg)
    return trimap, warnings


def normalize_trimap(trimap: torch.Tensor, name: str = "trimap") -> torch.Tensor:
    """Accept common trimap encodings and return 0 / 0.5 / 1.

    Values in 0..1 (0/0.5/1, or 0/128/255 read as 0..1): < 0.1 -> bg, > 0.9 -> fg, else unknown.
    Values in 0..255 are rescaled first.
    """
    trimap = as_mask(trimap, name)
    if trimap.max() > 1.0 + 1e-6:
        if trimap.max() > 255.0 + 1e-3 or trimap.min() < 0:
            raise UserError(f"{name}: values must lie in 0..1 or 0..255, got {float(trimap.min())}..{float(trimap.max())}")
        trimap = trimap / 255.0
    if trimap.min() < -1e-6:
        raise UserError(f"{name}: negative values")
    out = torch.full_like(trimap, TRIMAP_UNKNOWN)
    out[trimap < 0.1] = TRIMAP_BG
    out[trimap > 0.9] = TRIMAP_FG
    return out


def trimap_from_masks(fg_mask: torch.Tensor, bg_mask: torch.Tensor) -> torch.Tensor:
    """Trimap from separate definite-foreground and definite-background masks (rest unknown)."""
    fg_mask, bg_mask = broadcast_batch(as_mask(fg_mask, "fg mask"), as_mask(bg_mask, "bg mask"),
                                       names=["fg mask", "bg mask"])
    if ((fg_mask > 0.5) & (bg_mask > 0.5)).any():
        raise UserError("fg mask and bg mask overlap: a pixel cannot be both definite foreground and background")
    out = torch.full_like(fg_mask, TRIMAP_UNKNOWN)
    out[bg_mask > 0.5] = TRIMAP_BG
    out[fg_mask > 0.5] = TRIMAP_FG
    return out


# ------------------------------------------------------------------------------------ DRIP padding
def gaussian_kernel1d(size: int, sigma: float | None = None, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian; default sigma follows OpenCV's rule for a given size."""
    if sigma is None:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(image: torch.Tensor, size: int = 13, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``[B,H,W,C]`` with reflect padding."""
    k = gaussian_kernel1d(size, sigma, device=image.device).to(image.dtype)
    x = image.permute(0, 3, 1, 2)
    c = x.shape[1]
    p = size // 2
    mode = "reflect" if min(x.shape[-2:]) > p else "replicate"
    x = F.conv2d(F.pad(x, (p, p, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, p, p), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)
    return x.permute(0, 2, 3, 1)


def pad_foreground(straight: torch.Tensor, alpha: torch.Tensor, iterations: int = 100, size: int = 13,
                   threshold: float = 0.0) -> torch.Tensor:
    """DRIP's foreground padding: where ``alpha <= threshold`` the colour is undefined; fill it by
    repeatedly blurring (``size`` x ``size`` Gaussian) and writing the blur back only there, so defined
    colour bleeds outward smoothly while defined pixels stay exactly as they were.

    Uses a normalised (alpha-weighted) blur so the fill is not darkened by the undefined zeros:
    ``F_{k+1} = where(defined, F, blur(F_k * w_k) / blur(w_k))``, ``w`` = 1 on defined / filled pixels.
    """
    straight = as_image(straight, "foreground")[..., :3]
    alpha = as_mask(alpha, "alpha")
    straight, alpha = broadcast_batch(straight, alpha, names=["foreground", "alpha"])
    defined = (alpha > threshold).unsqueeze(-1).to(straight.dtype)
    out = straight * defined
    weight = defined.clone()
    for _ in range(iterations):
        num = gaussian_blur(out * weight, size)
        den = gaussian_blur(weight, size)
        filled = num / den.clamp_min(1e-8)
        newly = (den > 1e-6).to(straight.dtype)
        out = defined * straight + (1 - defined) * torch.where(newly > 0, filled, out)
        weight = torch.maximum(defined, newly)
    return out.clamp(0, 1)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad a ``[B,H,W,C]`` or ``[B,H,W]`` tensor at the bottom/right to a multiple; returns (padded, (H, W))."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    squeeze = x.ndim == 3
    t = (x.unsqueeze(-1) if squeeze else x).permute(0, 3, 1, 2)
    t = F.pad(t, (0, pw, 0, ph), mode=mode)
    t = t.permute(0, 2, 3, 1)
    return (t[..., 0] if squeeze else t), (h, w)


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
