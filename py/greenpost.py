"""GreenPost: a fast, training-free, matting-level keyer for green (and any colour) screens.

After DiffuMatting (ECCV 2024, sec. 3.5, "GreenPost"): a coarse mask (optional) tells background pixels,
K-Means finds the backdrop colour, a clean background plate is built, and known-background matting gives
a matting-level alpha. The paper used BackgroundMattingV2 for the last step (weights unavailable); here a
closed-form estimator against the plate replaces it: no weights, a 4K frame in about half a second of one
CPU core. The full-resolution passes are torch (float32), so they run on the caller's device; the
low-resolution stages (key colour, plate, ``F_l``, noise level: maps of at most ~160 px) run in numpy on
the CPU, where a chain of a few hundred tiny ops costs less than torch's per-op dispatch (or GPU launches).

Model
-----
Every pixel mixes a straight foreground colour ``F`` with the backdrop ``B`` (the *plate*)::

    I = a F + (1 - a) B                                   (a = alpha, 1 = foreground)

With ``B`` known that is 3 equations for 4 unknowns (``a`` and ``F``). GreenPost closes it with a local
foreground colour ``F_l`` (below) and solves for ``a`` by weighted least squares along the line
``B -> F_l``::

    a = argmin_a |I - B - a (F_l - B)|_M^2 = <d, e>_M / <e, e>_M,      d = I - B,  e = F_l - B,
    <u, v>_M = u . v + (w_k - 1) (u . k)(v . k) + (w_g - 1) (u . g)(v . g)                       (1)

``g`` is the grey axis and ``k`` the unit *key direction*: the chroma of the key colour ``K`` (``K`` minus
its grey part, normalised). With ``w_k = w_g = 1`` (1) is the projection of ``d`` onto ``e``. A screen
separates from any subject best along ``k``, so ``w_k = 4``; brightness texture (hair, fabric) is finer
than the low-resolution ``F_l`` can follow, so ``w_g = 0.3``. For ``w_k -> inf`` (1) becomes the
colour-difference key ``a = (s(B) - s(I)) / (s(B) - s(F_l))`` with the *key signal*::

    s(X) = sqrt(6)/2 (X . k) - sqrt(2)/2 |X . n|,      n = unit(g x k)                             (2)

which is exactly the classic ``G - max(R, B)`` for a pure green key, rotated to any hue. The classic
keyer assumes ``s(F) = 0``; that doubles the alpha of a red subject (``s(F) < 0``) and thins a plant
(``s(F) > 0``), hence ``F_l``. At full resolution (1) is one dot product, ``a = d . u`` with
``u = M e / <e, e>_M`` precomputed at low resolution and bilinearly upsampled.

Local foreground colour ``F_l`` (working resolution, <= ``work_size`` px): from the colour-difference alpha
``a0 = 1 - s(I)/s(B)``, confident foreground (``a0 > 1 - max(fg_conf, 3 sigma)``) keeps its colour with
weight 1, partial pixels (``a0 > 0.1``) give their unmixed colour ``B + (I - B)/a0`` with weight ``a0^2``,
and push-pull (a weighted image pyramid, filled coarse to fine) spreads them everywhere.

Noise and refinement: ``sigma`` = robust std (1.4826 MAD) of ``a0`` over full-resolution
confident-background samples. Alpha goes through soft thresholds of width ``t = noise_clip * sigma``
(``0`` below ``t``, ``2 (a - t)`` on ``[t, 2t]``, unchanged above, mirrored near 1), then a guided filter
(He et al. 2010) with the unclipped colour-difference alpha as the guide: in every window
``a ~ A g + b`` by least squares (``A = cov(g, a) / (var(g) + eps)``), averaged over the windows covering
a pixel; it removes sensor noise and JPEG blocks and keeps every edge that the key signal shows. It is the
*fast* guided filter (He & Sun 2015): window statistics, ``A`` and ``b`` at half resolution (window
radius ``r/2`` there, i.e. about ``r`` px), ``A`` and ``b`` bilinearly upsampled and applied to the
full-resolution guide (the edges come from the guide, so nothing is lost; a quarter of the work).

Plate (<= ``plate_size`` px): backdrop pixels keep the screen's *chromaticity* ``X / (R + G + B)`` however
lit (uneven light, vignetting), while mixing in any non-black subject moves it. The screen chromaticity
is found by mode seeking (medians within a shrinking radius, from the K-Means centre to the densest
chromaticity, over a sample of the pixels near the K-Means centre, so that a small bare screen still
supplies most of the samples) with a tolerance of 3x the median distance (it follows the noise), then a quadratic
surface for screens whose hue drifts (a large transparent region such as glass cannot bend it); pixels
much darker than the smooth brightness of their backdrop neighbours (dark semi-transparent strands) are
dropped. The plate is the normalised-convolution average of what is left, filled under the subject by
push-pull, then bilinearly upsampled. A user plate replaces all this.

Foreground: unmixing ``F = (I - (1 - a) B) / a = F_l + r / a`` (``r = d - a e``, the residual off the
``B -> F_l`` line) amplifies noise and backdrop leftovers as ``a -> 0``. GreenPost uses
``F = F_l + r / max(a, a_d)``; with the default ``a_d = decontaminate = 1`` that is
``F = I + (1 - a)(F_l - B) = a F_true + (1 - a) F_l``: opaque pixels keep their observed colour, faint
ones borrow the nearby confident colour in proportion to their transparency. Spill is removed by taking a
positive key signal out along ``k``: ``F -= despill * max(s(F), 0) * 2/sqrt(6) * k`` (luminance kept).
All colour is straight (not premultiplied).

No screen: without a mask, plate or key override, an image whose most screen-like colour is unsaturated
or nearly grey, or whose backdrop candidates vary too much in chromaticity (foliage, a room), or match
almost nowhere, is returned as all foreground with a warning (``strict=True``: a :class:`UserError`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .alpha import as_mask, broadcast_batch
from .errors import UserError

SQ6_2 = math.sqrt(6.0) / 2.0
SQ2_2 = math.sqrt(2.0) / 2.0
_GREY = (1.0 / math.sqrt(3.0),) * 3


@dataclass
class GreenPostResult:
    """Outputs for a batch (on the input's device).

    ``foreground``: straight RGB ``[B,H,W,3]`` (a view of ``rgba[..., :3]``; call ``.contiguous()`` if
    needed); ``alpha``: ``[B,H,W]``, 1 = foreground; ``rgba``: ``[B,H,W,4]`` straight colour + alpha;
    ``plate``: the clean backdrop ``[B,H,W,3]``; ``key_color``: ``[B,3]`` in 0..1; ``warnings``: one
    human-readable line per issue (e.g. an image without a screen, returned as all foreground).
    """

    foreground: torch.Tensor
    alpha: torch.Tensor
    rgba: torch.Tensor
    plate: torch.Tensor
    key_color: torch.Tensor
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ colour maths
def key_basis(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Unit key direction ``k`` (chroma of ``key``), the other chroma axis ``n = unit(g x k)`` and the
    key's chroma magnitude ``|K - (K.g) g|``. A neutral key (grey/white/black) gets ``k`` = green's."""
    key = torch.as_tensor(key, dtype=torch.float32)
    k, n, mag = _key_basis_np(key.detach().cpu().numpy())
    return (torch.from_numpy(k).to(key.device), torch.from_numpy(n).to(key.device), mag)


def _key_basis_np(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`key_basis` in float64 scalar maths (float32 ``k`` and ``n``): a few operations on three
    numbers, which cost several times less in plain Python than as array calls."""
    kr, kg, kb = (float(v) for v in np.asarray(key, dtype=np.float64).reshape(3))
    g = 1.0 / math.sqrt(3.0)
    dot = (kr + kg + kb) * g
    c = [kr - dot * g, kg - dot * g, kb - dot * g]
    mag = math.sqrt(c[0] * c[0] + c[1] * c[1] + c[2] * c[2])
    c = [-1.0 / math.sqrt(6.0), 2.0 / math.sqrt(6.0), -1.0 / math.sqrt(6.0)] if mag < 1e-6 else [v / mag for v in c]
    n = [g * (c[2] - c[1]), g * (c[0] - c[2]), g * (c[1] - c[0])]  # g x c with g = (1, 1, 1) / sqrt(3)
    nn = math.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    return np.array(c, dtype=np.float32), np.array([v / nn for v in n], dtype=np.float32), mag


def key_signal(x: torch.Tensor, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``s(X) = sqrt(6)/2 X.k - sqrt(2)/2 |X.n|`` over the last axis (``G - max(R,B)`` for a green key)."""
    kn = torch.stack([k, n], 1).to(x)  # [3,2]: both projections in one matrix product
    p = (x.reshape(-1, 3) @ kn).reshape(*x.shape[:-1], 2)
    return SQ6_2 * p[..., 0] - SQ2_2 * p[..., 1].abs()


def color_hex(rgb: Sequence[float]) -> str:
    """``(r, g, b)`` in 0..1 -> ``"#rrggbb"``."""
    return "#" + "".join(f"{int(round(min(max(float(c), 0.0), 1.0) * 255)):02x}" for c in rgb)


def soft_clip(a: torch.Tensor, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-aware soft thresholds: 0 below ``t``, ``2 (a - t)`` on ``[t, 2t]``, unchanged in between,
    mirrored near 1 (continuous), clamped to 0..1 (into ``out`` when given)."""
    t = min(float(t), 0.25)
    if t <= 0:
        return torch.clamp(a, 0, 1, out=out) if out is not None else a.clamp(0, 1)
    # max(min(a, 2a - 2t), 2a + 2t - 1) == clamp(a, 2a + 2t - 1, 2a - 2t): the bounds never cross (t <= 1/4)
    hi = a * 2.0
    lo = torch.add(hi, 2.0 * t - 1.0)
    hi.sub_(2.0 * t)
    res = torch.clamp(a, lo, hi, out=lo if out is None else out)
    return res.clamp_(0, 1)


# ------------------------------------------------------------------------------------ full-res tools (torch)
def _half(x: torch.Tensor) -> torch.Tensor:
    """2x2 mean of ``[N,C,h,w]`` (a ragged last row/column averages what exists): ``ceil(h/2) x ceil(w/2)``."""
    if x.shape[-1] * x.shape[-2] < 16384 or x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.avg_pool2d(x, 2, ceil_mode=True)  # fastest for small maps
    s = x[..., 0::2, :] + x[..., 1::2, :]  # row pairs first: contiguous rows, half the strided reads
    return (s[..., 0::2] + s[..., 1::2]).mul_(0.25)


def _up_axis(x: torch.Tensor, f: int, dim: int) -> torch.Tensor:
    """Bilinear upsampling of ``x`` by the integer ``f`` along ``dim`` (-1 or -2), half-pixel centres and
    clamped edges (== ``F.interpolate(scale_factor=f, align_corners=False)``): output ``i f + p`` lerps
    input ``i`` with its neighbour on the side of ``(p + 0.5) / f - 0.5``; one strided lerp per phase."""
    n = x.shape[dim]
    if dim == -1:
        out = torch.empty(*x.shape, f, dtype=x.dtype, device=x.device)
        phase = lambda p: out[..., p]  # noqa: E731
    else:
        out = torch.empty(*x.shape[:-1], f, x.shape[-1], dtype=x.dtype, device=x.device)
        phase = lambda p: out[..., p, :]  # noqa: E731
    # no padded copy: interior outputs lerp neighbours, the clamped edge output is the edge input itself
    lo, hi = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)
    for p in range(f):
        off = (p + 0.5) / f - 0.5
        o = phase(p)
        if off < 0:
            o.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
            if n > 1:
                torch.lerp(lo, hi, 1.0 + off, out=o.narrow(dim, 1, n - 1))
        else:
            o.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
            if n > 1:
                torch.lerp(lo, hi, off, out=o.narrow(dim, 0, n - 1))
    return out.flatten(-2) if dim == -1 else out.flatten(-3, -2)


def _upf(x: torch.Tensor, f: int) -> torch.Tensor:
    """Exact ``F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)`` for an integer
    ``f`` and ``[N,C,h,w]``: on a CPU the separable shifted lerps are several times faster (tiny maps
    keep the library call)."""
    if f == 1:
        return x
    if x.shape[-1] * x.shape[-2] * x.shape[-3] < 4096 or x.device.type != "cpu":
        return F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    return _up_axis(_up_axis(x, f, -1), f, -2)


def _erode(binary: torch.Tensor, r: int) -> torch.Tensor:
    """Square erosion of ``[N,1,h,w]`` 0/1 by radius ``r`` (min-pool)."""
    return binary if r <= 0 else -F.max_pool2d(-binary, 2 * r + 1, stride=1, padding=r)


def _dilate(binary: torch.Tensor, r: int) -> torch.Tensor:
    return binary if r <= 0 else F.max_pool2d(binary, 2 * r + 1, stride=1, padding=r)


def _downsample(img: torch.Tensor, f: int) -> torch.Tensor:
    """``[H,W,C]`` -> planar ``[1,C,ceil(H/f),ceil(W/f)]`` area average; ragged border cells average the
    pixels that exist. Sums whole row groups first (contiguous, fast), then column groups."""
    H, W, C = img.shape
    if f == 1:
        return img.permute(2, 0, 1).unsqueeze(0).contiguous()
    h, w = -(-H // f), -(-W // f)
    Hc, Wc = (H // f) * f, (W // f) * f
    rows = _sum_phases(img[:Hc].reshape(H // f, f, W, C), 1)
    if Hc < H:
        rows = torch.cat([rows, img[Hc:].sum(0, keepdim=True)], 0)  # [h, W, C]
    out = _sum_phases(rows[:, :Wc].reshape(h, W // f, f, C), 2)
    if Wc < W:
        out = torch.cat([out, rows[:, Wc:].sum(1, keepdim=True)], 1)  # [h, w, C]
    if Hc < H or Wc < W:
        cy = torch.full((h,), float(f), device=img.device)
        cx = torch.full((w,), float(f), device=img.device)
        cy[-1], cx[-1] = H - (h - 1) * f, W - (w - 1) * f
        out = out / (cy.view(-1, 1, 1) * cx.view(1, -1, 1))
    else:
        out = out.mul_(1.0 / (f * f))
    return out.permute(2, 0, 1).unsqueeze(0).contiguous()


def _sum_phases(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` for a short ``dim`` as a chain of adds of slices (several times faster on a CPU
    than the reduction kernel over a middle axis)."""
    acc = x.select(dim, 0) + x.select(dim, 1) if x.shape[dim] > 1 else x.select(dim, 0).clone()
    for i in range(2, x.shape[dim]):
        acc += x.select(dim, i)
    return acc


class _Upsampler:
    """Bilinear upsampling of a low-res planar map ``[1,C,h,w]`` made by :func:`_downsample` with factor
    ``f`` (cell centres at full-res ``(i + 0.5) f - 0.5``, edges clamped) to planar ``[C,H,W]``, a band of
    rows at a time (no full-size temporaries): ``F.interpolate`` with ``scale_factor=f`` on the few
    low-res rows the band needs (one row of margin each side, so sub-block edges never clamp)."""

    def __init__(self, low: torch.Tensor, f: int, height: int, width: int):
        self.low, self.f, self.W = low, f, width

    def rows(self, a: int, b: int) -> torch.Tensor:
        f = self.f
        if f == 1:
            return self.low[0, :, a:b]
        h = self.low.shape[-2]
        j0, j1 = max(0, a // f - 1), min(h, (b - 1) // f + 2)
        up = _upf(self.low[:, :, j0:j1], f)
        return up[0, :, a - j0 * f: b - j0 * f, : self.W]


# ------------------------------------------------------------------------------------ low-res tools (numpy)
# The low-resolution stages (key colour, plate, F_l, noise level) run in numpy on the CPU whatever the
# device: their maps are at most ``plate_size`` / ``work_size`` px (a few hundred kB, copied once each
# way), where a chain of a few hundred tiny ops costs mostly per-op dispatch, which numpy keeps several
# times lower than torch on a CPU (and far lower than kernel launches and synchronisations on a GPU).
# Arrays are float32 and planar: ``[C,h,w]``.
_F32 = np.float32


def _nhalf(x: np.ndarray) -> np.ndarray:
    """2x2 mean of ``[..., h, w]``; a ragged last row/column averages what exists (``ceil(h/2) x ceil(w/2)``)."""
    if x.shape[-2] % 2:
        x = np.concatenate([x, x[..., -1:, :]], -2)
    if x.shape[-1] % 2:
        x = np.concatenate([x, x[..., -1:]], -1)
    s = x[..., 0::2, :] + x[..., 1::2, :]
    return (s[..., 0::2] + s[..., 1::2]) * _F32(0.25)


@functools.lru_cache(maxsize=256)
def _lerp_table(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resampling of one axis, half-pixel centres, clamped edges (``F.interpolate(...,
    align_corners=False)``): output ``j`` lerps inputs ``i0[j]`` and ``i1[j]`` by ``lam[j]``."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(_F32)


def _nup2(x: np.ndarray, axis: int) -> np.ndarray:
    """Exactly :func:`_nresize` to twice the length along ``axis`` (-1 or -2), by slices instead of
    gathers: output ``2i`` is ``x[i-1] + 0.75 (x[i] - x[i-1])``, ``2i+1`` is ``x[i] + 0.25 (x[i+1] - x[i])``,
    the first and last outputs copy the edge inputs (the same arithmetic as the general path)."""
    n = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = 2 * n

    def at(start, stop=None, step=None):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, stop, step)
        return tuple(idx)

    out = np.empty(shape, dtype=x.dtype)
    lo = x[at(0, n - 1)]
    d = x[at(1, n)] - lo
    np.add(lo, d * _F32(0.75), out=out[at(2, None, 2)])
    np.add(lo, d * _F32(0.25), out=out[at(1, 2 * n - 2, 2)])
    out[at(0, 1)] = x[at(0, 1)]
    out[at(2 * n - 1, 2 * n)] = x[at(n - 1, n)]
    return out


def _nresize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of ``[..., h0, w0]`` to ``[..., h, w]`` (half-pixel centres, as ``F.interpolate``).
    Exact 2x steps of large maps use slices (:func:`_nup2`); the rest gathers rows/columns by a cached
    table (the same arithmetic, ``a + (b - a) lam``, so both give identical values), in place, which
    costs a third of the slice version on the tiny levels of a pyramid."""
    small = x.size <= 4096
    for axis, n in ((-2, h), (-1, w)):
        if n == 2 * x.shape[axis] and not small:
            x = _nup2(x, x.ndim + axis)
        elif x.shape[axis] != n:
            i0, i1, lam = _lerp_table(x.shape[axis], n)
            a = x.take(i0, axis)
            x = x.take(i1, axis)
            x -= a
            x *= lam[:, None] if axis == -2 else lam
            x += a
    return x


def _npad_edge(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Replicate-pad ``x`` by ``r`` along ``axis`` (-1 or -2)."""
    first, last = np.take(x, [0] * r, axis=axis), np.take(x, [x.shape[axis] - 1] * r, axis=axis)
    return np.concatenate([first, x, last], axis)


def _blur(x: np.ndarray) -> np.ndarray:
    """Binomial ``[1 4 6 4 1]/16`` blur (a Gaussian of sigma 1 px) of ``[C,h,w]``, replicate borders:
    per axis four adds of neighbouring pairs (``[1 1]^4``)."""
    scale = 1.0
    if x.shape[-1] >= 2:
        x = _npad_edge(x, 2, -1)
        for _ in range(4):
            x = x[..., :-1] + x[..., 1:]
        scale /= 16
    if x.shape[-2] >= 2:
        x = _npad_edge(x, 2, -2)
        for _ in range(4):
            x = x[..., :-1, :] + x[..., 1:, :]
        scale /= 16
    return x * _F32(scale) if scale != 1.0 else x


def _norm_blur(values: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised convolution: ``blur(w v) / blur(w)`` and ``blur(w)`` (``[C,h,w]``, ``[1,h,w]``); both
    blurs in one call (per-channel maths, fewer numpy calls)."""
    b = _blur(np.concatenate([values * weight, weight], 0))
    den = b[-1:]
    return b[:-1] / np.maximum(den, _F32(1e-6)), den


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box mean of ``[C,h,w]`` with replicate borders."""
    p = _npad_edge(_npad_edge(x, 1, -1), 1, -2)
    r = p[..., :-2] + p[..., 1:-1] + p[..., 2:]
    return (r[..., :-2, :] + r[..., 1:-1, :] + r[..., 2:, :]) * _F32(1.0 / 9)


def _pool(x: np.ndarray, c: int) -> np.ndarray:
    """``c x c`` block means of ``[C,h,w]``; ragged border blocks average what exists."""
    if c == 1:
        return x
    h, w = x.shape[-2:]
    ys, xs = np.arange(0, h, c), np.arange(0, w, c)
    s = np.add.reduceat(np.add.reduceat(x, ys, axis=-2), xs, axis=-1)
    return s / (np.minimum(c, h - ys)[:, None] * np.minimum(c, w - xs)[None, :]).astype(_F32)


def push_pull(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill ``values`` ``[C,h,w]`` where ``weight`` ``[1,h,w]`` (0..1) is small, smoothly.

    Push: a pyramid of weight-averaged colours (2x2 averages of ``w v`` and ``w``). Pull: from the top,
    each level keeps its own average in proportion to its coverage ``min(1, 2 w)`` and takes the
    upsampled coarser estimate for the rest, so well-known pixels keep their value and holes get a
    smooth blend of their surroundings at every scale.
    """
    x = np.concatenate([values * weight, weight], 0)
    levels = []
    while min(x.shape[-2:]) > 1:
        levels.append(x)
        x = _nhalf(x)
    est = x[:-1] / np.maximum(x[-1:], _F32(1e-8))
    for lx in reversed(levels):
        up = _nresize(est, *lx.shape[-2:])
        lw = lx[-1:]
        est = lx[:-1] / np.maximum(lw, _F32(1e-8))  # up + (own - up) min(2 w, 1), in place
        est -= up
        est *= np.minimum(lw * _F32(2.0), _F32(1.0))
        est += up
    return est


def _ksig(x: np.ndarray, kn: np.ndarray) -> np.ndarray:
    """Key signal ``s(X)`` (eq. 2) over axis 0 of planar ``[3,...]`` (``kn`` = ``[k; n]``, ``[2,3]``)."""
    p = (kn @ x.reshape(3, -1)).reshape(2, *x.shape[1:])
    return p[0] * _F32(SQ6_2) - np.abs(p[1]) * _F32(SQ2_2)


@functools.lru_cache(maxsize=16)
def _strata(n: int, seed: int) -> np.ndarray:
    """``j + u_j`` for ``j < n``, ``u_j`` uniform in ``[0, 1)`` drawn with a fixed seed (float64)."""
    return np.arange(n) + np.random.default_rng(seed).random(n)


def _subsample(idx: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` entries of a 1-D index array: jittered stratified sampling, one pick (fixed-seed
    random) in each of ``n`` equal runs of ``idx``. Candidates come in raster order, so the samples spread
    evenly over the image (no clumps of a random draw, no aliasing of a fixed stride), and the cost is
    ``O(n)`` whatever ``len(idx)`` (a random permutation of it costs ~70 us per 20k candidates)."""
    m = idx.size
    if m <= n:
        return idx
    return idx[(_strata(n, seed) * (m / n)).astype(np.intp)]


def _sample_bilinear(low: np.ndarray, f: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The :class:`_Upsampler` value of ``low`` ``[C,h,w]`` at full-res pixels ``(ys, xs)`` -> ``[C,N]``."""
    h, w = low.shape[-2:]
    sy = np.clip((ys + 0.5) / f - 0.5, 0, h - 1)
    sx = np.clip((xs + 0.5) / f - 0.5, 0, w - 1)
    y0, x0 = sy.astype(np.intp), sx.astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (sy - y0).astype(_F32), (sx - x0).astype(_F32)
    a, b = low[:, y0, x0], low[:, y0, x1]
    top = a + (b - a) * wx
    a, b = low[:, y1, x0], low[:, y1, x1]
    bot = a + (b - a) * wx
    return top + (bot - top) * wy


# ------------------------------------------------------------------------------------ key colour
@functools.lru_cache(maxsize=8)
def _uniforms(seed: int, count: int) -> tuple[float, ...]:
    """``count`` fixed-seed uniform draws in ``[0, 1)`` (cached: a generator costs more to seed than the
    few draws K-Means seeding takes)."""
    return tuple(np.random.default_rng(seed).random(count).tolist())


def kmeans(pts: np.ndarray, k: int, seed: int = 0, max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """K-Means of ``pts`` ``[n,d]`` (float64) into ``k`` clusters: greedy k-means++ seeding (each new centre
    is the best of ``2 + ln k`` candidates drawn in proportion to the squared distance to the nearest
    centre so far, as in Arthur & Vassilvitskii / scikit-learn), then Lloyd iterations until no label
    changes. Fixed seed. Returns ``(centres [k,d], labels [n])``. A few hundred microseconds for the
    1000 x 3 samples used here, where scikit-learn's estimator spends milliseconds on set-up."""
    n = len(pts)
    k = max(1, min(int(k), n))
    trials = 2 + int(math.log(k))
    draws = iter(_uniforms(seed, 1 + (k - 1) * trials))  # the same stream as default_rng(seed).random()
    cols = [np.ascontiguousarray(pts[:, j]) for j in range(pts.shape[1])]  # sums over d as adds of rows
    sq = functools.reduce(np.add, [c * c for c in cols])
    centres = [pts[min(int(next(draws) * n), n - 1)]]
    d2 = functools.reduce(np.add, [(c - centres[0][j]) ** 2 for j, c in enumerate(cols)])
    for _ in range(1, k):
        total = float(d2.sum())
        u = np.array([next(draws) for _ in range(trials)])
        if total <= 0:  # fewer distinct points than clusters
            centres.append(pts[min(int(u[0] * n), n - 1)])
            continue
        cand = np.searchsorted(np.cumsum(d2), u * total).clip(max=n - 1)
        nd = np.minimum(d2[None], np.maximum(sq[None] - 2.0 * pts[cand] @ pts.T + sq[cand][:, None], 0))
        best = int(nd.sum(1).argmin())
        centres.append(pts[cand[best]])
        d2 = nd[best]
    centres = np.array(centres)
    labels = None
    # scikit-learn's default stopping rule: 1e-4 x the mean per-feature variance
    tol = 1e-4 * max(sum(float(c @ c) / n - (float(c.sum()) / n) ** 2 for c in cols) / len(cols), 0.0)
    d = pts.shape[1]
    flat_pts = np.ascontiguousarray(pts).ravel()
    bins = np.arange(d)

    def nearest(c):  # squared distance minus |p|^2, as [n, k]: the argmin runs along contiguous rows
        return (pts @ (c * -2.0).T + (c * c).sum(1)).argmin(1)

    for _ in range(max_iter):
        new = nearest(centres)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        count = np.bincount(labels, minlength=k)
        ok = count > 0
        old = centres.copy()
        # per-cluster sums of every feature in one bincount (bin = label * d + feature; same order of adds)
        sums = np.bincount((labels[:, None] * d + bins).ravel(), weights=flat_pts, minlength=k * d)
        centres[ok] = sums.reshape(k, d)[ok] / count[ok, None]
        if float(((centres - old) ** 2).sum()) <= tol:
            labels = nearest(centres)
            break
    return centres, labels


def find_key_color(small: np.ndarray, bg_hint: np.ndarray | None = None, clusters: int = 5,
                   samples: int = 1000, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Backdrop colour of a low-res planar image ``[3,h,w]`` (numpy) by K-Means (:func:`kmeans`:
    k-means++ and at most 20 Lloyd iterations, fixed seed, on at most ``samples`` pixels, a stratified
    sample of the candidates).

    With ``bg_hint`` (``[h,w]`` bool: background candidates, e.g. outside a coarse mask) the most
    populated cluster of those pixels wins, whatever its colour. Without one, a screen is large, touches
    the frame, is saturated and uniform in chromaticity, so each cluster scores
    ``(share of pixels + share of the border) * saturation^2 / (chroma spread + 0.02)`` with saturation
    ``(max - min) / max`` of its centre and spread the median distance of its members' chromaticity
    ``X / sum(X)`` from the centre's. Returns ``(key [3] float64, info)`` (``info``: share, saturation,
    spread of the chosen cluster).
    """
    _, h, w = small.shape
    cand = np.arange(h * w) if bg_hint is None else np.flatnonzero(bg_hint)
    idx = _subsample(cand, samples, seed)
    pts_t = small.reshape(3, -1)[:, idx].astype(np.float64)  # [3,n]: sums over colour = adds of rows
    pts = pts_t.T
    yy, xx = np.divmod(idx, w)
    onb = (yy == 0) | (yy == h - 1) | (xx == 0) | (xx == w - 1)
    dev = pts_t - pts_t.mean(1, keepdims=True)
    k = min(clusters if float((dev * dev).mean(1).max()) > 1e-6 else 1, pts_t.shape[1])  # std > 1e-3
    centres, labels = kmeans(pts, k, seed=seed, max_iter=20)
    ratio = pts_t / np.maximum(pts_t[0] + pts_t[1] + pts_t[2], 1e-2)  # chromaticity, [3,n]
    nb = max(1, int(onb.sum()))
    # every member's chromaticity distance to its centre's, then per-cluster medians from one sort
    rc_all = centres / np.maximum(centres.sum(1, keepdims=True), 1e-2)  # [k,3]
    t = ratio - rc_all[labels].T
    t *= t
    dist = np.sqrt(t[0] + t[1] + t[2])
    dist = dist[np.lexsort((dist, labels))]  # grouped by cluster, ascending within each
    count = np.bincount(labels, minlength=k)
    first = np.cumsum(count) - count
    bcount = np.bincount(labels[onb], minlength=k)
    best, best_score, stats = 0, -1.0, []
    for j in range(k):
        c = centres[j]
        share = float(count[j]) / labels.size
        bshare = float(bcount[j]) / nb
        if count[j]:  # np.median: the middle value, or the mean of the two middle values
            lo, hi = first[j] + (count[j] - 1) // 2, first[j] + count[j] // 2
            spread = float(dist[lo]) if lo == hi else float((dist[lo] + dist[hi]) / 2)
        else:
            spread = 1.0
        sat = float((c.max() - c.min()) / max(c.max(), 1e-3))
        score = share if bg_hint is not None else (share + bshare) * sat * sat / (spread + 0.02)
        stats.append({"share": share, "saturation": sat, "spread": spread})
        if score > best_score:
            best, best_score = j, score
    return np.clip(centres[best], 0, 1), stats[best]


def _ratio(x: np.ndarray) -> np.ndarray:
    """Chromaticity ``X / (R + G + B)`` of a planar ``[3,...]`` array (blind to lighting gain)."""
    return x / np.maximum(x.sum(0, keepdims=True), _F32(1e-2))


@functools.lru_cache(maxsize=8)
def _poly_design(h: int, w: int) -> np.ndarray:
    """Quadratic surface basis ``[6, h*w]`` (1, x, y, x^2, xy, y^2) over coordinates in -1..1 (cached:
    at most ``plate_size^2`` x 6 floats each)."""
    x = np.tile(np.linspace(-1, 1, w, dtype=_F32), h)
    y = np.repeat(np.linspace(-1, 1, h, dtype=_F32), w)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 0)


def estimate_plate(small: np.ndarray, key: np.ndarray, bg_hint: np.ndarray | None = None,
                   gain_tol: float = 0.2, samples: int = 2048, radius: float = 0.1) -> tuple[np.ndarray, np.ndarray, float]:
    """Clean plate of a low-res planar image ``[3,h,w]`` (numpy float32): returns ``(plate [3,h,w],
    confident background weight [h,w], chromaticity tolerance)`` (a wide tolerance means a non-uniform
    backdrop).

    1. Chroma gate on the denoised (3x3 mean) chromaticity ``r = X / sum(X)``. Mode seeking: starting
       at the key with ``radius`` (0.1) over a sample of the pixels within it, the reference becomes the median ``r`` within the radius and the
       radius ``clamp(3 median|r - ref|, 0.008, 0.08)`` (shrinking by at most 0.6x a step) until it stops
       shrinking: the K-Means centre, pulled by mixed edge pixels, walks to the bare screen, and the final
       radius (the tolerance) follows the noise. Then a quadratic surface ``r(x, y)`` is fitted to the
       selection (twice) and pixels within the tolerance of it are kept: a screen whose hue drifts is
       followed, while a large transparent region (glass) cannot bend a global quadratic surface.
    2. Brightness gate: drop pixels darker than ``(1 - gain_tol)`` x the smooth (sigma = size/16)
       brightness of the selected pixels around them (dark semi-transparent strands keep the chromaticity).
    3. Plate = normalised convolution (binomial, sigma = 1 px) of the selection eroded by 1 px,
       push-pull filled elsewhere.
    ``bg_hint`` (``[h,w]`` bool, e.g. outside a coarse mask) restricts the selection.
    """
    _, h, w = small.shape
    r = _ratio(_box3(small)).reshape(3, -1)  # denoised, [3, h*w]
    hint = None if bg_hint is None else bg_hint.reshape(-1)
    if hint is not None and int(hint.sum()) < 16:
        hint = None
    key = np.asarray(key, dtype=_F32)
    ref = (key / max(float(key.sum()), 1e-2)).reshape(3, 1)
    # the pool: pixels within the starting radius of the key, so that a small bare screen (a subject
    # filling most of the frame) still provides most of the samples (a random draw over the whole image
    # would hold a few dozen screen pixels, and the tolerance would swing with the draw)
    near0 = _sqdist(r, ref) < radius * radius
    if hint is not None:
        near0 &= hint
    pool = _subsample(np.flatnonzero(near0), samples)
    # mode seeking: medians within a shrinking radius walk from the K-Means centre (pulled by mixed
    # pixels) to the densest chromaticity, the bare screen; the radius settles at 3x the median distance
    rp = np.ascontiguousarray(r[:, pool])  # (fancy indexing gives a column-major copy: slow sums over axis 0)
    for _ in range(8):
        near = _sqdist(rp, ref) < radius * radius
        if int(near.sum()) < 16:
            break
        rn = rp.compress(near, axis=1)  # (several times faster than boolean indexing)
        ref = _lower_median(rn, 1)[:, None]
        new_radius = min(max(3.0 * float(np.sqrt(_lower_median(_sqdist(rn, ref), 0))), 0.008), 0.08)
        if new_radius >= radius * 0.95:
            radius = min(new_radius, radius)
            break
        radius = max(new_radius, radius * 0.6)
    tol2 = radius * radius
    sel = _sqdist(r, ref) < tol2
    if hint is not None:
        sel &= hint
    if int(sel.sum()) < 16:
        return np.broadcast_to(key.reshape(3, 1, 1), (3, h, w)).copy(), np.zeros((h, w), _F32), radius
    # a quadratic chromaticity surface for screens whose hue drifts (fitted twice)
    design = _poly_design(h, w)
    for it in range(2):
        idx = _subsample(np.flatnonzero(sel), samples, it)
        coef = _lstsq_rows(design.take(idx, axis=1), r.take(idx, axis=1))
        new = _sqdist(r, coef.T @ design) < tol2
        if hint is not None:
            new &= hint
        if int(new.sum()) < 16:
            break
        sel = new
    cand = sel.reshape(1, h, w).astype(_F32)
    lum = small.sum(0, keepdims=True)
    c = max(1, max(h, w) // 32)  # smooth brightness of the selection at ~1/16 of the size
    pooled = _pool(np.concatenate([lum * cand, cand], 0), c)  # both block means in one pass
    lref, den = _norm_blur(pooled[:1], pooled[1:])
    lref = _nresize(push_pull(lref, (den > 0.02).astype(_F32)), h, w)
    keep = cand * (lum > _F32(1.0 - gain_tol) * lref)
    if float(keep.sum()) > 16:
        cand = keep
    wgt = (_box3(cand) > 0.999).astype(_F32)  # erode by 1 px
    if float(wgt.sum()) < 16:
        wgt = cand
    smooth, den = _norm_blur(small, wgt)
    return push_pull(smooth, (den > 0.3) * np.minimum(den, _F32(1.0))), wgt[0], radius


def _lstsq_rows(basis: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares ``coef`` ``[m,c]`` (float32) with ``values ~ coef.T @ basis`` (``basis`` ``[m,N]``,
    ``values`` ``[c,N]``) by the normal equations in float64 (a few-term polynomial basis on -1..1 is well
    conditioned; a LAPACK least-squares call costs several times more for these tiny systems)."""
    b = basis.astype(np.float64)
    v = values.astype(np.float64)
    try:
        return np.linalg.solve(b @ b.T, b @ v.T).astype(_F32)
    except np.linalg.LinAlgError:  # rank-deficient (e.g. all samples on one row): the minimum-norm solution
        return np.linalg.lstsq(b.T, v.T, rcond=None)[0].astype(_F32)


def _lower_median(x: np.ndarray, axis: int) -> np.ndarray:
    """Median along ``axis`` that, like ``torch.median``, takes the lower middle value of an even count."""
    m = (x.shape[axis] - 1) // 2
    return np.take(np.partition(x, m, axis=axis), m, axis=axis)


def _sqdist(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Squared distances between the columns of planar ``[3,N]`` ``x`` and ``ref`` (``[3,1]`` or ``[3,N]``)."""
    t = x - ref
    t *= t
    return t[0] + t[1] + t[2]


# ------------------------------------------------------------------------------------ alpha / F_l
def local_foreground(small: np.ndarray, plate: np.ndarray, kn: np.ndarray, noise: float,
                     fg_conf: float = 0.05, partial: float = 0.1) -> tuple[np.ndarray, float]:
    """Local foreground colour ``F_l`` ``[3,h,w]`` at low resolution (numpy), and the largest ``a0``.

    From the colour-difference alpha ``a0 = 1 - s(I)/s(B)``: confident foreground
    (``a0 > 1 - max(fg_conf, 3 sigma)``) keeps its colour with weight 1, partial pixels (``a0 > partial``)
    give their unmixed colour ``B + (I - B)/a0`` with weight ``a0^2``; push-pull spreads the weighted
    colours everywhere (a second pass with the refined alpha changes the dev-set scores by < 1%).
    ``kn``: ``[k; n]`` (``[2,3]``) of :func:`key_basis`.
    """
    a = np.clip(1.0 - _ksig(small, kn) / np.maximum(_ksig(plate, kn), _F32(1e-3)), 0, 1)[None]
    conf = a > _F32(1.0 - max(fg_conf, 3.0 * noise))
    a_max = float(a.max())
    if not conf.any():
        return np.full_like(small, 0.5), a_max
    unmixed = np.where(conf, small, np.clip(plate + (small - plate) / np.maximum(a, _F32(0.05)), 0, 1))
    wgt = np.maximum(np.where(a > _F32(partial), a * a, _F32(0.0)), conf.astype(_F32))
    return push_pull(unmixed, wgt), a_max


@functools.lru_cache(maxsize=32)
def _noise_samples(H: int, W: int, m: int, f: int, w: int) -> tuple[np.ndarray, ...]:
    """``m`` fixed-seed random pixels of an ``H x W`` image: rows, columns, flat indices, and flat indices
    of their cells in a ``[., w]`` map at factor ``f`` (cached per size, like the draws)."""
    gen = torch.Generator().manual_seed(0)
    ys = torch.randint(0, H, (m,), generator=gen).numpy().copy()
    xs = torch.randint(0, W, (m,), generator=gen).numpy().copy()
    return ys, xs, ys * W + xs, ys // f * w + xs // f


def _noise_level(img, plate_at, bg_small, f, kn, samples: int = 4096) -> float:
    """Robust std (1.4826 MAD) of ``a0 = 1 - s(I)/s(B)`` over up to ``samples`` full-resolution pixels of
    confident background: the sensor / JPEG noise the soft thresholds must absorb. ``plate_at(ys, xs)``
    gives the plate there (``[3,N]`` numpy); ``bg_small`` ``[h,w]`` at factor ``f`` (numpy) or None."""
    H, W, _ = img.shape
    w = 1 if bg_small is None else bg_small.shape[-1]
    ys, xs, flat, low = _noise_samples(H, W, min(samples, H * W), f, w)
    if bg_small is not None:
        ok = bg_small.ravel().take(low) > 0.99
        ys, xs, flat = ys.compress(ok), xs.compress(ok), flat.compress(ok)
    if ys.size < 32:
        return 0.01
    flat = torch.from_numpy(flat).to(img.device)
    if img.is_contiguous():  # one index_select on rows of 3: far cheaper than 2-D advanced indexing
        pix = img.view(-1, 3).index_select(0, flat).t().cpu().numpy()
    else:
        pix = img[flat // W, flat % W].t().cpu().numpy()
    a = 1.0 - _ksig(pix, kn) / np.maximum(_ksig(plate_at(ys, xs), kn), _F32(1e-3))
    a = a[np.abs(a) < 0.25]  # backdrop-like samples only (all samples are candidates with a user plate)
    if a.size < 32:
        return 0.01
    return float(1.4826 * _lower_median(np.abs(a - _lower_median(a, 0)), 0))


# ------------------------------------------------------------------------------------ main entry
@torch.no_grad()
def greenpost(image: torch.Tensor, mask: torch.Tensor | None = None, plate: torch.Tensor | None = None,
              key_color: Sequence[float] | torch.Tensor | None = None, *,
              key_weight: float = 4.0, grey_weight: float = 0.3, despill: float = 1.0,
              decontaminate: float = 1.0, noise_clip: float = 1.0, refine_radius: int = 4,
              refine_eps: float = 1e-4, mask_margin: float = 0.02, mask_holdout: bool = False, work_size: int = 160,
              min_foreground: float = 0.25,
              plate_size: int = 160, strict: bool = False, min_saturation: float = 0.25,
              max_spread: float = 0.06, min_key_signal: float = 0.05,
              chunk_pixels: int | None = None, cpu_threads: int | None = 1) -> GreenPostResult:
    """Key a batch of green / blue / any-colour screen images (see the module doc for the maths).

    Parameters
    ----------
    image : ``[B,H,W,C]`` (or ``[H,W,C]``) float 0..1; ``C`` = 3, 4 (alpha channel ignored) or 1 (grey).
        NaN is a :class:`UserError`; values outside 0..1 are clamped.
    mask : optional coarse **alpha** ``[B,H,W]`` (1 = foreground, 0 = background; *not* ComfyUI's
        LoadImage mask, which is ``1 - alpha``), used as a *garbage matte*: pixels outside it (dilated by
        ``mask_margin`` x the image diagonal) pick the key colour and the plate and get alpha 0, so draw it
        generously around hair. With ``mask_holdout`` it is also a *holdout matte*: inside it (eroded
        likewise) alpha is 1 (for subjects that contain the key colour, e.g. plants on green).
    plate : optional clean backdrop ``[B,H,W,3]`` (a shot of the empty screen), used as ``B`` directly.
    key_color : optional ``(r, g, b)`` in 0..1 overriding the K-Means backdrop colour.
    key_weight, grey_weight : ``w_k``, ``w_g`` in (1); both 1 = plain projection onto ``B -> F_l``.
    despill : 0..1, share of a positive key signal ``s(F)`` removed from the foreground.
    decontaminate : ``a_d`` in ``F = F_l + r / max(a, a_d)``, 0..1 (0 = plain unmixing, 1 = blend
        ``a F + (1 - a) F_l``).
    noise_clip : width of the soft thresholds near 0 and 1, in noise standard deviations.
    refine_radius, refine_eps : guided-filter window radius (full-res px, 0 = off; the fast guided filter
        uses ``max(1, round(r/2))`` on its half-resolution grid) and regulariser (alpha^2 units).
    min_foreground : if no pixel of the working copy reaches this colour-difference alpha, the image is an
        empty screen and its alpha is exactly 0.
    work_size, plate_size : long side (px) of the working copies for ``F_l`` (at most 8x smaller than the
        image) and for key colour + plate.
    strict : raise :class:`UserError` when an image shows no backdrop colour, instead of returning it as
        all foreground with a warning. ``min_saturation``, ``max_spread`` (chromaticity tolerance) and
        ``min_key_signal`` set what counts as a screen (only without mask, plate and key override).
    chunk_pixels : full-resolution pixels processed at once (memory vs. overhead). ``None``: a quarter of
        the image, between 2^17 and 2^19: large frames amortise the per-band overhead, while on mid-sized
        ones each band's temporaries stay well below the outputs' size, so the C allocator reuses that
        memory instead of returning it to the system and faulting it back in (up to a third of the
        time on a CPU); images up to 2^17 px (e.g. 320 x 320) take one band, which also saves the
        second planar copy of the image.
    cpu_threads : torch intra-op threads while keying on a CPU (restored afterwards; ``None`` = leave
        torch's setting). The work is a long chain of small, memory-bound ops, where extra threads mostly
        wait on each other: on a loaded 2-core machine 2 threads made a 4K frame 4x *slower* than 1.

    Returns a :class:`GreenPostResult`; a batch is processed one image at a time (mixed content is fine).
    """
    threads = torch.get_num_threads()
    on_cpu = not isinstance(image, torch.Tensor) or image.device.type == "cpu"
    if cpu_threads and on_cpu:
        torch.set_num_threads(max(1, int(cpu_threads)))
    try:
        return _greenpost(image, mask, plate, key_color, key_weight=key_weight, grey_weight=grey_weight,
                          despill=despill, decontaminate=decontaminate, noise_clip=noise_clip,
                          refine_radius=refine_radius, refine_eps=refine_eps, mask_margin=mask_margin,
                          mask_holdout=mask_holdout, min_foreground=min_foreground,
                          work_size=work_size, plate_size=plate_size, strict=strict,
                          min_saturation=min_saturation, max_spread=max_spread,
                          min_key_signal=min_key_signal, chunk_pixels=chunk_pixels)
    finally:
        torch.set_num_threads(threads)


def _greenpost(image, mask, plate, key_color, *, key_weight, grey_weight, despill, decontaminate, noise_clip,
               refine_radius, refine_eps, mask_margin, mask_holdout, min_foreground, work_size, plate_size, strict, min_saturation,
               max_spread, min_key_signal, chunk_pixels) -> GreenPostResult:
    image = _as_rgb(image, "image")
    dev = image.device
    if mask is not None:
        mask = as_mask(mask, "mask").to(dev).clamp(0, 1)
        image, mask = broadcast_batch(image, mask, names=["image", "mask"])
    if plate is not None:
        plate = _as_rgb(plate, "plate").to(dev)
        image, plate = broadcast_batch(image, plate, names=["image", "plate"])
        if mask is not None:
            mask = broadcast_batch(image, mask, names=["image", "mask"])[1]
    override = None
    if key_color is not None:
        override = torch.as_tensor(key_color, dtype=torch.float32).flatten().to(dev)
        if override.numel() != 3 or not torch.isfinite(override).all():
            raise UserError(f"key_color: expected 3 finite components, got {key_color!r}")
        if (override < 0).any() or (override > 1).any():
            raise UserError("key_color: components must lie in 0..1")
    if work_size < 16 or plate_size < 16:
        raise UserError(f"work_size and plate_size must be >= 16 px, got {work_size} and {plate_size}")
    if refine_radius < 0 or refine_eps <= 0 or not 0 <= decontaminate <= 1 or not 0 <= despill <= 1:
        raise UserError("refine_radius must be >= 0, refine_eps > 0, decontaminate and despill in 0..1")
    bsz, H, W, _ = image.shape
    opt = dict(key_weight=float(key_weight), grey_weight=float(grey_weight), despill=float(despill),
               decontaminate=float(decontaminate), noise_clip=float(noise_clip),
               refine_radius=int(refine_radius), refine_eps=float(refine_eps), mask_margin=float(mask_margin),
               mask_holdout=bool(mask_holdout), min_foreground=float(min_foreground),
               work_size=int(work_size), plate_size=int(plate_size), strict=bool(strict),
               min_saturation=float(min_saturation), max_spread=float(max_spread),
               min_key_signal=float(min_key_signal),
               chunk_pixels=None if chunk_pixels is None else max(1, int(chunk_pixels)))
    alpha = torch.empty(bsz, H, W, device=dev)
    rgba = torch.empty(bsz, H, W, 4, device=dev)
    plate_out = torch.empty(bsz, H, W, 3, device=dev)
    keys = torch.empty(bsz, 3, device=dev)
    warnings: list[str] = []
    for i in range(bsz):
        keys[i] = _key_one(image[i], None if mask is None else mask[i], None if plate is None else plate[i],
                           override, alpha[i], rgba[i], plate_out[i], i, warnings, opt)
    return GreenPostResult(foreground=rgba[..., :3], alpha=alpha, rgba=rgba, plate=plate_out,
                           key_color=keys, warnings=warnings)


def _as_rgb(x: torch.Tensor, name: str) -> torch.Tensor:
    """IMAGE -> float ``[B,H,W,3]`` in 0..1: ``[H,W,C]`` gets a batch axis, grey (C=1) is repeated, an alpha
    channel dropped; NaN is a :class:`UserError`; out-of-range values (HDR, +-inf) are clamped. One
    min/max pass replaces a separate NaN scan (NaN propagates through it)."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise UserError(f"{name}: expected [B,H,W,C] with C = 1, 3 or 4, got shape {tuple(x.shape)}")
    if min(x.shape[:3]) < 1:
        raise UserError(f"{name}: empty image of shape {tuple(x.shape)}")
    x = x[..., :3].float() if x.shape[-1] != 1 else x.float().expand(*x.shape[:3], 3)
    lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isnan(lo) or math.isnan(hi):
        raise UserError(f"{name}: contains NaN values")
    return x.clamp(0, 1) if (lo < 0 or hi > 1) else x


def _key_one(img, mask, user_plate, override, alpha_out, rgba_out, plate_out, index, warnings, opt):
    """Key one image ``[H,W,3]`` into preallocated outputs; returns its key colour ``[3]``."""
    H, W, _ = img.shape
    dev = img.device
    # working factor: the working copy has a long side of about work_size px, but never less than 1/8 of
    # the image (large frames can afford detail: their cost is dominated by the full-resolution passes)
    f = max(1, min(math.ceil(max(H, W) / opt["work_size"]), 8))
    small = _downsample(img, f)[0].cpu().numpy()  # [3,h,w], numpy from here on (low-res stages)
    _, h, w = small.shape

    # ---- coarse mask -> background hint and alpha bounds (bounds stay on the device: they go full-res)
    hint_bg = bounds = None
    if mask is not None:
        cover = _downsample(mask.unsqueeze(-1), f)  # [1,1,h,w] coverage
        margin = max(1, round(opt["mask_margin"] * math.hypot(h, w)))
        binary = (cover > 0.5).float()
        allowed = _dilate(binary, margin)           # alpha <= allowed
        forced = _erode(binary, margin) if opt["mask_holdout"] else torch.zeros_like(binary)  # alpha >= forced
        hint_bg = (allowed[0, 0] < 0.5).cpu().numpy()
        bounds = (forced, allowed)
        if not hint_bg.any():
            warnings.append(f"image {index}: the coarse mask leaves no background; key colour and plate "
                            f"come from the image alone")
            hint_bg = None

    # ---- key colour and plate work at a coarser level (<= plate_size px; both are smooth)
    coarse, hint_c, levels = small, hint_bg, 0
    while max(coarse.shape[-2:]) > opt["plate_size"] and min(coarse.shape[-2:]) >= 16:
        coarse, levels = _nhalf(coarse), levels + 1
        hint_c = None if hint_c is None else _nhalf(hint_c.astype(_F32)) > 0.99
    fp = f * 2 ** levels
    # ---- key colour
    auto = override is None and user_plate is None and hint_bg is None  # nothing says where the screen is
    user_small = None if user_plate is None else _downsample(user_plate, f)[0].cpu().numpy()
    if override is not None:
        key = override.double().cpu().numpy()
    elif user_plate is not None:
        key = user_small.mean(axis=(1, 2), dtype=np.float64)
    else:
        key, info = find_key_color(coarse, hint_c)
        if auto and info["saturation"] < opt["min_saturation"]:
            reason = f"the most screen-like colour {color_hex(key)} is unsaturated"
            return _no_screen(img, key, index, reason, alpha_out, rgba_out, plate_out, warnings, opt)

    # ---- plate (coarse level, upsampled to the working level), confident background, noise
    if user_plate is not None:
        plate_small, bg_c = user_small, None
        plate_at = lambda ys, xs: user_plate[torch.from_numpy(ys).to(dev), torch.from_numpy(xs).to(dev)].t().cpu().numpy()  # noqa: E731,E501
    else:
        plate_c, bg_c, tol = estimate_plate(coarse, key, hint_c)
        if override is None and float(bg_c.sum()) >= 16:  # the bare screen's colour, free of mixed pixels
            key = (coarse * bg_c).sum(axis=(1, 2), dtype=np.float64) / float(bg_c.sum(dtype=np.float64))
        if auto:  # is it a screen at all?
            reason = None
            if tol > opt["max_spread"]:
                reason = f"the backdrop candidates around {color_hex(key)} vary too much in colour"
            elif float(bg_c.mean()) < 0.001:
                reason = f"only {float(bg_c.mean()):.2%} of the image matches {color_hex(key)}"
            if reason is not None:
                return _no_screen(img, key, index, reason, alpha_out, rgba_out, plate_out, warnings, opt)
        plate_at = lambda ys, xs: _sample_bilinear(plate_c, fp, ys, xs)  # noqa: E731
        plate_small = _nresize(plate_c, h, w) if levels else plate_c
    k, n, _ = _key_basis_np(key)
    kn = np.stack([k, n])  # [2,3] float32
    strength = float(_ksig(plate_small.mean(axis=(1, 2)), kn))
    if strength < opt["min_key_signal"]:
        reason = f"the backdrop {color_hex(key)} is nearly grey (key signal {strength:.3f})"
        if auto:
            return _no_screen(img, key, index, reason, alpha_out, rgba_out, plate_out, warnings, opt)
        warnings.append(f"image {index}: {reason}; colour keying is unreliable there")
    noise = _noise_level(img, plate_at, bg_c, fp, kn)
    key_t = torch.tensor(key, dtype=torch.float32, device=dev)

    # ---- local foreground colour (low res)
    fl_small, a0_max = local_foreground(small, plate_small, kn, noise)
    if a0_max < opt["min_foreground"] and (bounds is None or float(bounds[0].max()) == 0):
        # not one working-res pixel is even partly foreground: an empty screen, exactly transparent
        alpha_out.zero_()
        rgba_out[..., :3] = img
        rgba_out[..., 3] = 0.0
        if user_plate is None:
            plate_t = torch.from_numpy(np.ascontiguousarray(plate_small))[None].to(dev)
            plate_out.copy_(_Upsampler(plate_t, f, H, W).rows(0, H).permute(1, 2, 0))
        else:
            plate_out.copy_(user_plate)
        return key_t

    # ---- alpha terms at low res: a = <d, e>_M / <e, e>_M = d . u with u = M e / <e, e>_M  (eq. 1)
    e_small = fl_small - plate_small
    kk, gv = kn[0].astype(np.float64), np.array(_GREY)
    metric = (np.eye(3) + (opt["key_weight"] - 1.0) * np.outer(kk, kk)
              + (opt["grey_weight"] - 1.0) * np.outer(gv, gv)).astype(_F32)  # M of eq. (1), 3x3 symmetric
    me = (metric @ e_small.reshape(3, -1)).reshape(e_small.shape)
    u = me / np.maximum((e_small * me).sum(0, keepdims=True), _F32(1e-3))
    inv_sb = 1.0 / np.maximum(_ksig(plate_small, kn), _F32(1e-3))[None]
    maps = [u, inv_sb] if user_plate is not None else [plate_small, u, inv_sb]
    low = torch.from_numpy(np.concatenate(maps + [e_small], 0))[None].to(dev)
    nm = low.shape[1] - 3
    low1 = low[:, :nm]
    if bounds is not None:
        low1 = torch.cat([low1] + list(bounds), 1)
    up1 = _Upsampler(low1, f, H, W)
    up2 = _Upsampler(low[:, nm:], f, H, W)
    _full_res(img, user_plate, up1, up2, torch.from_numpy(kn).to(dev), noise, opt, alpha_out, rgba_out, plate_out,
              bounds is not None)
    return key_t


def _box5(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(2r+1)^2`` box mean of ``[C,n,W]`` with replicate borders (separable window sums)."""
    p = F.pad(x.unsqueeze(0), (r, r, r, r), mode="replicate")[0]
    return _window_sum(_window_sum(p, 2 * r + 1, -1), 2 * r + 1, -2).mul_(1.0 / (2 * r + 1) ** 2)


def _window_sum(p: torch.Tensor, w: int, dim: int) -> torch.Tensor:
    """Sums of ``w`` consecutive entries along ``dim`` (length ``L - w + 1``) by binary doubling: sums of
    widths 1, 2, 4, ... (each one add of two shifted copies of the previous) combined by the bits of
    ``w`` (``w = 5``: 3 adds instead of 4)."""
    n = p.shape[dim] - w + 1
    parts, off, s, width = [], 0, p, 1
    while width <= w:
        if w & width:
            parts.append(s.narrow(dim, off, n))
            off += width
        if 2 * width <= w:
            m = s.shape[dim] - width
            s = s.narrow(dim, 0, m) + s.narrow(dim, width, m)
        width *= 2
    out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
    for part in parts[2:]:
        out += part
    return out


def _full_res(img, user_plate, up1, up2, kn, noise, opt, alpha_out, rgba_out, plate_out, has_bounds):
    """Full resolution, in bands of rows (planar maths, interleaved outputs).

    Pass 1: alpha by eq. (1) (``a = d . u``), soft thresholds; the guide ``g = 1 - s(I)/s(B)`` (the
    colour-difference alpha, unclipped). Pass 2 (bands with a halo): fast guided-filter refinement of
    alpha with ``g`` as the guide (He & Sun: ``g`` and ``a`` averaged 2x2, in each ``(2 rl + 1)^2`` window
    of that grid, ``rl = max(1, round(r/2))``, ``a ~ A g + b`` by least squares,
    ``A = cov(g, a) / (var(g) + eps)``, ``A`` and ``b`` averaged over the windows covering a cell, then
    bilinearly upsampled and applied as ``A g + b`` to the full-resolution guide), which removes sensor
    noise and JPEG blocks while keeping every edge the key signal shows; then mask bounds, unmixing,
    despill. Bands are an even number of rows, so every band sees the same half-resolution grid. Each
    band of the interleaved image is copied to planar ``[3,n,W]`` once (element-wise maths on strided
    channels is several times slower on a CPU) and used by both passes: pass 2 runs one band behind
    pass 1. ``a`` and ``g`` share one ``[2,H,W]`` buffer, so the filter's 2x2 averages read both without
    a stacked copy.
    """
    H, W, _ = img.shape
    chunk = opt["chunk_pixels"] or min(max(H * W // 4, 1 << 17), 1 << 19)
    rows = max(2, chunk // W // 2 * 2)  # even: bands align with the half-resolution grid
    t = min(max(opt["noise_clip"] * noise, 0.004), 0.15)
    a_d = max(opt["decontaminate"], 1e-3)
    spill = opt["despill"]
    kn = kn.float()  # [k; n], [2,3] on the device
    kcol = kn[0].view(3, 1, 1)
    r, eps = opt["refine_radius"], opt["refine_eps"]
    rl = max(1, round(r / 2))  # window radius at half resolution
    halo = 2 + 4 * rl  # full-res rows a band needs on each side (even)
    ag_buf = torch.empty(2 if r > 0 else 1, H, W, device=img.device)  # [a, g]
    a_buf = ag_buf[0]
    g_buf = ag_buf[1] if r > 0 else None
    bnd_buf = torch.empty(2, H, W, device=img.device) if has_bounds else None
    planar = lambda y0, y1: img[y0:y1].permute(2, 0, 1).contiguous()  # noqa: E731

    def pass1(y0, y1):  # alpha by eq. (1), guide; returns the band's planar image copy
        Ip = planar(y0, y1)
        m = up1.rows(y0, y1)
        if user_plate is None:
            B, u, inv_sb, rest = m[0:3], m[3:6], m[6], m[7:]
            for c in range(3):
                plate_out[y0:y1, :, c] = B[c]
        else:
            B, u, inv_sb, rest = user_plate[y0:y1].permute(2, 0, 1), m[0:3], m[3], m[4:]
            plate_out[y0:y1] = user_plate[y0:y1]
        d = torch.sub(Ip, B).mul_(u)
        soft_clip(d[0].add_(d[1]).add_(d[2]), t, out=a_buf[y0:y1])
        if has_bounds:
            bnd_buf[:, y0:y1] = rest
        if g_buf is not None:  # g = 1 - s(I) / s(B); I.k and I.n in one small matrix product
            ikn = torch.mm(kn, Ip.view(3, -1)).view(2, y1 - y0, W)
            ik = ikn[0].mul_(-SQ6_2).add_(ikn[1].abs_(), alpha=SQ2_2)
            torch.mul(ik, inv_sb, out=g_buf[y0:y1]).add_(1.0)
        del m, B, u, inv_sb, rest, d
        return Ip

    def pass2(y0, y1, I):  # guided filter, bounds, unmixing, despill, outputs
        a = alpha_out[y0:y1]
        if g_buf is not None:
            soft_clip(_guided_rows(ag_buf, y0, y1, halo, rl, eps), t, out=a)
        else:
            a.copy_(a_buf[y0:y1])
        if has_bounds:
            torch.clamp(a, bnd_buf[0, y0:y1], bnd_buf[1, y0:y1], out=a)  # forced <= allowed
        # F = F_l + (d - a e) / max(a, a_d) = B + p d + q e,  p = 1 / max(a, a_d),  q = 1 - a p;
        # the default a_d = 1 gives F = I + (1 - a) e
        e = up2.rows(y0, y1)
        if a_d >= 1.0:
            fg = torch.addcmul(I, torch.rsub(a, 1.0), e)
        else:
            Bi = plate_out[y0:y1].permute(2, 0, 1)
            pinv = a.clamp_min(a_d).reciprocal_()
            q = torch.addcmul(torch.ones_like(a), a, pinv, value=-1.0)
            fg = torch.addcmul(Bi, pinv, I - Bi).addcmul_(q, e)
        del e, I
        if spill > 0:  # F -= spill * max(s(F), 0) * 2/sqrt(6) * k
            fkn = torch.mm(kn, fg.view(3, -1)).view(2, y1 - y0, W)
            s = fkn[0].mul_(SQ6_2).sub_(fkn[1].abs_(), alpha=SQ2_2).clamp_min_(0).mul_(spill / SQ6_2)
            fg.addcmul_(kcol, s, value=-1.0)
            del fkn, s
        fg.clamp_(0, 1)
        out = rgba_out[y0:y1]
        for c in range(3):
            out[..., c] = fg[c]
        out[..., 3] = a

    # pass 2 of a band needs pass-1 rows down to ``halo`` below it, so it runs one band behind pass 1
    # and reuses that band's planar copy of the image (one copy per band, and the rows are still cached)
    bands = [(y0, min(H, y0 + rows)) for y0 in range(0, H, rows)]
    if rows >= halo or len(bands) == 1:
        prev = None
        for y0, y1 in bands:
            Ip = pass1(y0, y1)
            if prev is not None:
                pass2(*prev)
            prev = (y0, y1, Ip)
            del Ip
        pass2(*prev)
    else:  # bands thinner than the halo (very wide images): all of pass 1 first
        for y0, y1 in bands:
            pass1(y0, y1)
        for y0, y1 in bands:
            pass2(y0, y1, planar(y0, y1))


def _guided_rows(ag: torch.Tensor, y0: int, y1: int, halo: int, rl: int, eps: float) -> torch.Tensor:
    """Fast guided filter (He & Sun 2015) of ``p = ag[0]`` with the guide ``g = ag[1]`` (``[2,H,W]``) for
    rows ``y0..y1``: window statistics and the linear model ``p ~ A g + b`` at half resolution (rows
    ``y0 - halo .. y1 + halo``), ``A`` and ``b`` bilinearly upsampled (only the band's rows) and applied to
    the full-resolution guide. Returns ``[y1 - y0, W]``."""
    H, W = ag.shape[-2:]
    ya, yb = max(0, y0 - halo), min(H, y1 + halo)
    low = _half(ag[None, :, ya:yb])[0]
    pl, gl = low[0], low[1]
    mean = _box5(torch.stack([gl, pl, gl * pl, gl * gl]), rl)
    mg, mp = mean[0], mean[1]
    A = (mean[2] - mg * mp).div_(mean[3].sub_(mg * mg).add_(eps))
    coef = _Upsampler(_box5(torch.stack([A, mp.sub_(A * mg)]), rl)[None], 2, yb - ya, W).rows(y0 - ya, y1 - ya)
    return torch.addcmul(coef[1], coef[0], ag[1, y0:y1])


def _no_screen(img, key, index, reason, alpha_out, rgba_out, plate_out, warnings, opt):
    msg = f"image {index}: no backdrop colour found ({reason}); returned as all foreground"
    if opt["strict"]:
        raise UserError(msg)
    warnings.append(msg)
    alpha_out.fill_(1.0)
    rgba_out[..., :3] = img
    rgba_out[..., 3] = 1.0
    plate_out.copy_(img)
    return torch.as_tensor(np.asarray(key, dtype=np.float32), device=img.device)
