"""Procedural matting samples with exact ground truth (no third-party images).

A subject = an opaque soft-edged body, a semi-transparent veil and many thin hair-like strands,
rendered with 4x supersampling so coverage (alpha) is fractional at edges and along strands.
It is composited over a green (or any colour) plate: pure, studio (gradient + vignette) or uneven
(wrinkles, noise, optional JPEG). Spill tints the observed foreground near the backdrop, while the
ground-truth foreground stays spill-free, as in a real keying job.

``I = alpha * F_spill + (1 - alpha) * B`` (straight colour F, exact for the composite).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

DIFFUMATTING_GREEN = (0.0, 1.0, 0.0)
STUDIO_GREEN = (0.16, 0.62, 0.26)


@dataclass
class Sample:
    image: np.ndarray   # [H,W,3] float32 composite (what a keyer sees)
    alpha: np.ndarray   # [H,W] float32 ground-truth alpha (1 = foreground)
    fg: np.ndarray      # [H,W,3] float32 ground-truth straight, spill-free foreground
    plate: np.ndarray   # [H,W,3] float32 the clean backdrop behind the subject


def _downsample(x: np.ndarray, s: int) -> np.ndarray:
    h, w = x.shape[0] // s, x.shape[1] // s
    return x[: h * s, : w * s].reshape(h, s, w, s, *x.shape[2:]).mean(axis=(1, 3))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: random values on a coarse grid, bicubically upsampled."""
    grid = rng.uniform(-1, 1, size=(cells + 3, cells + 3)).astype(np.float32)
    t = torch.from_numpy(grid)[None, None]
    up = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", align_corners=True)
    return up[0, 0].numpy().clip(-1, 1)


def _strand_mask(rng: np.random.Generator, H: int, W: int, roots: np.ndarray, n: int,
                 length: float) -> np.ndarray:
    """Stamp ``n`` random curved strands (quadratic Beziers from ``roots``) into a binary canvas."""
    canvas = np.zeros((H, W), dtype=np.float32)
    t = np.linspace(0.0, 1.0, int(length * 3))[:, None]
    for _ in range(n):
        p0 = roots[rng.integers(len(roots))]
        ang = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(ang), np.sin(ang)]) * length * rng.uniform(0.5, 1.0)
        bend = np.array([-d[1], d[0]]) * rng.uniform(-0.6, 0.6)
        p2 = p0 + d
        p1 = p0 + d / 2 + bend
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        ys = np.clip(pts[:, 0].round().astype(int), 0, H - 1)
        xs = np.clip(pts[:, 1].round().astype(int), 0, W - 1)
        thick = rng.integers(1, 3)
        for dy in range(thick):
            canvas[np.clip(ys + dy, 0, H - 1), xs] = 1.0
    return canvas


def render_subject(height: int = 384, width: int = 384, seed: int = 0, ss: int = 4):
    """Render one subject: returns (alpha [H,W], straight foreground [H,W,3]) as float32."""
    rng = np.random.default_rng(seed)
    H, W = height * ss, width * ss
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cy, cx = H * rng.uniform(0.45, 0.6), W * rng.uniform(0.4, 0.6)
    ry, rx = H * rng.uniform(0.2, 0.28), W * rng.uniform(0.16, 0.24)
    # body: a wobbly ellipse (opaque), slightly blurred edge (motion/defocus) at the supersampled scale
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.08 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.05 * np.sin(5 * theta + rng.uniform(0, 6))
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) / wobble
    body = np.clip((1.0 - r) * (H / 40.0), 0, 1)
    # veil: a semi-transparent disc/wing with a radial falloff (alpha 0.25..0.6)
    vy, vx = cy + ry * rng.uniform(0.4, 0.9), cx + rx * rng.choice([-1.2, 1.2])
    vr = np.sqrt((yy - vy) ** 2 + (xx - vx) ** 2) / (0.8 * rx)
    veil = np.clip(1.0 - vr, 0, 1) ** 0.5 * rng.uniform(0.35, 0.6)
    # strands: from the top half of the body outline, outward
    ang = rng.uniform(-np.pi, 0, size=400)
    roots = np.stack([cy + 0.95 * ry * np.sin(ang), cx + 0.95 * rx * np.cos(ang)], axis=1)
    strands = _strand_mask(rng, H, W, roots, n=90, length=0.45 * min(H, W) * rng.uniform(0.6, 0.9))
    a_hi = 1.0 - (1.0 - body) * (1.0 - veil) * (1.0 - strands)
    alpha = _downsample(a_hi, ss).astype(np.float32)

    h, w = height, width
    base = rng.uniform(0.15, 0.95, size=3)
    hair = rng.uniform(0.1, 0.8, size=3) * np.array([1.0, 0.8, 0.6])
    veil_c = rng.uniform(0.3, 1.0, size=3)
    tex = _smooth_noise(rng, h, w, 6)[..., None] * 0.12 + _smooth_noise(rng, h, w, 40)[..., None] * 0.04
    body_c = np.clip(base[None, None] + tex, 0, 1)
    # colour per pixel: weight of each layer at full resolution
    wb = _downsample(body, ss)[..., None]
    wv = _downsample(veil * (1 - body), ss)[..., None]
    ws = _downsample(strands * (1 - body), ss)[..., None]
    tot = np.maximum(wb + wv + ws, 1e-6)
    fg = (wb * body_c + wv * veil_c + ws * hair) / tot
    fg = np.where(tot > 1e-5, fg, body_c).astype(np.float32)
    # the green must be absent from the ground-truth subject colours (like a real keyed subject)
    fg[..., 1] = np.minimum(fg[..., 1], np.maximum(fg[..., 0], fg[..., 2]) * 1.05)
    return alpha, np.clip(fg, 0, 1).astype(np.float32)


def render_plate(height: int, width: int, style: str = "studio", color=STUDIO_GREEN, seed: int = 0) -> np.ndarray:
    """Backdrop plate: ``pure`` (flat), ``studio`` (gradient + vignette) or ``uneven`` (wrinkles, blotches)."""
    rng = np.random.default_rng(seed + 1000)
    c = np.asarray(color, dtype=np.float32)[None, None]
    if style == "pure":
        return np.broadcast_to(c, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ny, nx = yy / height - 0.5, xx / width - 0.5
    gain = 1.0 + 0.25 * (rng.uniform(-1, 1) * nx + rng.uniform(-1, 1) * ny) - 0.5 * (nx ** 2 + ny ** 2)
    if style == "uneven":
        gain = gain + 0.12 * _smooth_noise(rng, height, width, 5) + 0.05 * np.sin(xx / width * 40 + 3 * _smooth_noise(rng, height, width, 3))
    elif style != "studio":
        raise ValueError(f"plate style {style!r}: expected pure, studio or uneven")
    plate = c * gain[..., None]
    return np.clip(plate, 0, 1).astype(np.float32)


def make_sample(height: int = 384, width: int = 384, seed: int = 0, style: str = "studio",
                color=STUDIO_GREEN, spill: float = 0.15, noise: float = 0.01, jpeg: int | None = None) -> Sample:
    """One composite with ground truth. ``spill`` tints the observed subject toward the backdrop near its
    edges; ``noise`` is Gaussian sensor noise (std); ``jpeg`` an optional JPEG quality."""
    rng = np.random.default_rng(seed + 7)
    alpha, fg = render_subject(height, width, seed)
    plate = render_plate(height, width, style, color, seed)
    return Sample(image=shoot(fg, alpha, plate, spill, noise, jpeg, rng), alpha=alpha, fg=fg, plate=plate)


def shoot(fg: np.ndarray, alpha: np.ndarray, plate: np.ndarray, spill: float, noise: float, jpeg: int | None,
          rng: np.random.Generator) -> np.ndarray:
    """The photo of straight foreground ``fg`` ``[H,W,3]`` with ``alpha`` ``[H,W]`` in front of ``plate``:
    ``I = a F_s + (1 - a) B`` with screen light spilling onto the subject,
    ``F_s = clip(F + spill sqrt(1 - a) max(B - mean(F), 0))`` (more where it is thin or translucent), then
    Gaussian sensor noise of std ``noise`` drawn from ``rng`` and, with ``jpeg``, JPEG at that quality.
    float32 ``[H,W,3]`` in 0..1."""
    edge = np.clip(1.0 - alpha, 0, 1) ** 0.5  # more spill where the subject is thin / translucent
    observed = np.clip(fg + spill * edge[..., None] * (plate - fg.mean(-1, keepdims=True)).clip(0, None), 0, 1)
    image = alpha[..., None] * observed + (1 - alpha[..., None]) * plate
    image = image + rng.normal(0, noise, size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 1).astype(np.float32)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray((image * 255 + 0.5).astype(np.uint8)).save(buf, format="JPEG", quality=jpeg)
        image = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return image


# The shipped demo set: (name, kwargs) - regenerated by scripts/make_samples.py
DEMO_SAMPLES = [
    ("strands_pure", dict(seed=1, style="pure", color=DIFFUMATTING_GREEN, spill=0.1)),
    ("strands_studio", dict(seed=2, style="studio", color=STUDIO_GREEN, spill=0.15)),
    ("strands_uneven_jpeg", dict(seed=3, style="uneven", color=STUDIO_GREEN, spill=0.2, noise=0.015, jpeg=90)),
    ("strands_bluescreen", dict(seed=4, style="studio", color=(0.1, 0.25, 0.85), spill=0.15)),
]
