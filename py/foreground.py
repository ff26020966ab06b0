r"""Foreground (and background) colour estimation from an image and its alpha: multilevel, torch.

Germer, Uelwer, Conrad, Harmeling, "Fast Multi-Level Foreground Estimation" (ICPR 2020). Given the image
:math:`I` and alpha :math:`\alpha` (1 = foreground), find straight colours F and B minimising

.. math::

    \sum_i \big|\alpha_i F_i + (1-\alpha_i) B_i - I_i\big|^2
    + \sum_i \sum_{j \in N_4(i)} \big(\varepsilon_r + \omega\,|\alpha_i - \alpha_j|\big)
      \big(|F_i - F_j|^2 + |B_i - B_j|^2\big),

the compositing equation plus a smoothness term that is weak (:math:`\varepsilon_r`) where alpha is flat
and stronger across alpha edges, so colour is propagated along the matte rather than across it. Setting
the gradient with respect to :math:`(F_i, B_i)` to zero, with the neighbours held fixed, gives one 2x2
system per pixel and colour channel (:math:`w_j = \varepsilon_r + \omega|\alpha_i-\alpha_j|`,
:math:`W = \sum_j w_j`):

.. math::

    \begin{pmatrix} \alpha_i^2 + W & \alpha_i(1-\alpha_i) \\ \alpha_i(1-\alpha_i) & (1-\alpha_i)^2 + W
    \end{pmatrix} \begin{pmatrix} F_i \\ B_i \end{pmatrix} =
    \begin{pmatrix} \alpha_i I_i + \sum_j w_j F_j \\ (1-\alpha_i) I_i + \sum_j w_j B_j \end{pmatrix}.

The paper sweeps these updates pixel by pixel (Gauss-Seidel) on a pyramid, from 1x1 up to full size,
each level starting from the upsampled coarser F and B: a few sweeps per level suffice because the
coarse levels already carry the low frequencies. Here a sweep is a *red-black* Gauss-Seidel sweep: the
pixels of one checkerboard colour depend only on the other colour, so each half-sweep is one vectorised
tensor update (no per-pixel Python loop), with the same convergence guarantee as a Gauss-Seidel sweep on
this symmetric positive definite system. Image and alpha are nearest-neighbour downsampled for the coarse
levels (as in the paper: every coarse pixel stays an exact composite), F and B bilinearly upsampled.

Cost: levels up to ``full_size`` px are solved on every pixel. Above that, only pixels within ``band`` px
of a fractional alpha (0 < alpha < 1) are updated, on tiles (:mod:`diffusion_matting.py.tiling`); elsewhere
the solution is already known to the precision that matters: where alpha = 1 (0) the data term pins F
(B) to the image colour, and the other, invisible colour keeps its smooth extension from the coarser
levels. So a large image with a thin soft edge costs about as much as its edge band.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import alpha as A
from .tiling import dilate, fill_halo, halo_index, make_tiling


def _level_sizes(h: int, w: int, min_size: int) -> list[tuple[int, int]]:
    """Pyramid sizes, coarsest first: halve (rounding up) until the long side is at most ``min_size``."""
    sizes = [(h, w)]
    while max(sizes[-1]) > min_size:
        ph, pw = sizes[-1]
        sizes.append((max(1, math.ceil(ph / 2)), max(1, math.ceil(pw / 2))))
    return sizes[::-1]


def _sweep_level(image: torch.Tensor, alpha: torch.Tensor, fb: torch.Tensor, active: torch.Tensor,
                 sweeps: int, regularization: float, gradient_weight: float) -> torch.Tensor:
    """``sweeps`` red-black Gauss-Seidel sweeps of the 2x2 per-pixel update on the ``active`` pixels.

    ``image`` ``[3,h,w]``, ``alpha`` ``[h,w]``, ``fb`` = F and B stacked ``[6,h,w]``, ``active`` bool ``[h,w]``.
    Neighbours outside the image have weight 0."""
    tl = make_tiling(active, halo=1)
    if tl.n == 0 or sweeps <= 0:
        return fb
    # one gather for everything: image, alpha, inside-the-image, active, F and B -> [N,12,th+2,tw+2]
    packed = tl.padded_tiles(torch.cat([image, alpha[None], torch.ones_like(alpha)[None],
                                        active[None].to(alpha.dtype), fb]))
    ap, inside = packed[:, 3], packed[:, 4]
    ac = ap[:, 1:-1, 1:-1]
    sl = ((slice(None), slice(0, -2), slice(1, -1)), (slice(None), slice(2, None), slice(1, -1)),
          (slice(None), slice(1, -1), slice(0, -2)), (slice(None), slice(1, -1), slice(2, None)))
    weights = [((regularization + gradient_weight * (ac - ap[s]).abs()) * inside[s]).unsqueeze(1) for s in sl]
    wsum = weights[0] + weights[1] + weights[2] + weights[3]
    a = ac.unsqueeze(1)
    m00, m01, m11 = a * a + wsum, a * (1 - a), (1 - a) * (1 - a) + wsum
    det = (m00 * m11 - m01 * m01).clamp_min(1e-12)
    i00, i01, i11 = m11 / det, -m01 / det, m00 / det
    img = packed[:, :3, 1:-1, 1:-1]
    data = torch.cat([a * img, (1 - a) * img], dim=1)
    # checkerboard colour in image coordinates, restricted to active pixels
    ys = (tl.oy + tl.ty * tl.th).view(-1, 1, 1) + torch.arange(tl.th, device=alpha.device).view(1, -1, 1)
    xs = (tl.ox + tl.tx * tl.tw).view(-1, 1, 1) + torch.arange(tl.tw, device=alpha.device).view(1, 1, -1)
    red = ((ys + xs) % 2 == 0).unsqueeze(1)
    act = packed[:, 5:6, 1:-1, 1:-1]
    masks = (red.to(alpha.dtype) * act, (~red).to(alpha.dtype) * act)
    state = packed[:, 6:].contiguous()  # [N,6,th+2,tw+2] F, B; halos of inactive neighbours stay as gathered
    index = None if tl.single else halo_index(tl, channels=6, corners=False)
    centre = state[:, :, 1:-1, 1:-1]
    shifted = [state[(slice(None), slice(None)) + s[1:]] for s in sl]
    rhs, new = torch.empty_like(data), torch.empty_like(data)
    rf, rb, new_f, new_b = rhs[:, :3], rhs[:, 3:], new[:, :3], new[:, 3:]
    for _ in range(sweeps):
        for m in masks:
            torch.addcmul(data, weights[0], shifted[0], out=rhs).addcmul_(weights[1], shifted[1])
            rhs.addcmul_(weights[2], shifted[2]).addcmul_(weights[3], shifted[3])
            torch.mul(i00, rf, out=new_f).addcmul_(i01, rb)
            torch.mul(i01, rf, out=new_b).addcmul_(i11, rb)
            new.clamp_(0, 1).sub_(centre)
            centre.addcmul_(new, m)  # update this colour's active pixels only
            if index is not None:
                fill_halo(state, index)
    return tl.untile(centre, fb)


def estimate_foreground(image: torch.Tensor, alpha: torch.Tensor, regularization: float = 1e-5,
                        gradient_weight: float = 1.0, sweeps: int = 2, coarse_sweeps: int = 20,
                        growth: float = 2.0, small_size: int = 32, min_size: int = 16, full_size: int = 64,
                        band: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Multilevel foreground/background estimation (Germer et al. 2020), see the module docstring.

    ``image`` ``[B,H,W,3]`` (or ``[H,W,3]``), ``alpha`` ``[B,H,W]`` (1 = foreground; batch 1 broadcasts).
    The finest level gets ``sweeps`` red-black sweeps, each coarser one ``growth`` times more, up to
    ``coarse_sweeps`` (which levels of at most ``small_size`` px always get). Levels larger than
    ``full_size`` px only update pixels within ``band`` px of a fractional alpha. Returns straight
    ``(foreground, background)``, both ``[B,H,W,3]`` in 0..1 on the image's device. Where alpha = 1 the
    foreground is the image colour exactly, where alpha = 0 a smooth extension of the nearby foreground
    colour (the background likewise, the other way round).
    """
    image = A.as_image(image, "image")[..., :3]
    alpha = A.as_mask(alpha, "alpha").to(image.device)
    image, alpha = A.broadcast_batch(image, alpha, names=["image", "alpha"])
    fgs, bgs = [], []
    for i in range(image.shape[0]):
        fb = _estimate_one(image[i].permute(2, 0, 1).float(), alpha[i].float().clamp(0, 1), regularization,
                           gradient_weight, sweeps, coarse_sweeps, growth, small_size, min_size, full_size, band)
        fb = fb.permute(1, 2, 0)
        fgs.append(fb[..., :3])
        bgs.append(fb[..., 3:])
    return torch.stack(fgs), torch.stack(bgs)


def _estimate_one(img: torch.Tensor, a: torch.Tensor, regularization: float, gradient_weight: float,
                  sweeps: int, coarse_sweeps: int, growth: float, small_size: int, min_size: int,
                  full_size: int, band: int) -> torch.Tensor:
    """One image ``[3,H,W]`` + alpha ``[H,W]`` -> F and B stacked ``[6,H,W]``."""
    H, W = a.shape
    sizes = _level_sizes(H, W, min_size)
    fb = None
    for level, (h, w) in enumerate(sizes):
        if (h, w) == (H, W):
            img_l, a_l = img, a
        else:
            img_l = F.interpolate(img[None], size=(h, w), mode="nearest")[0]
            a_l = F.interpolate(a[None, None], size=(h, w), mode="nearest")[0, 0]
        if fb is None:
            # start from the mean colours of the (mostly) opaque and (mostly) transparent pixels
            is_f, is_b = (a_l > 0.9).to(img.dtype), (a_l < 0.1).to(img.dtype)
            mean_f = (img_l * is_f).sum((-2, -1)) / is_f.sum().clamp_min(1)
            mean_b = (img_l * is_b).sum((-2, -1)) / is_b.sum().clamp_min(1)
            fb = torch.cat([mean_f, mean_b]).view(6, 1, 1).expand(6, h, w).contiguous()
        else:
            fb = F.interpolate(fb[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        n = sweeps * growth ** (len(sizes) - 1 - level)
        n = coarse_sweeps if max(h, w) <= small_size else int(min(coarse_sweeps, round(n)))
        if max(h, w) <= full_size:
            active = torch.ones(h, w, dtype=torch.bool, device=img.device)
        else:
            # pin the visible colour where alpha is 0 or 1; solve only near fractional alpha
            torch.where(a_l == 1, img_l, fb[:3], out=fb[:3])
            torch.where(a_l == 0, img_l, fb[3:], out=fb[3:])
            active = dilate((a_l > 0) & (a_l < 1), band)
        fb = _sweep_level(img_l, a_l, fb, active, n, regularization, gradient_weight)
    # opaque pixels show the image colour exactly (I = F there); likewise B where alpha = 0
    torch.where(a == 1, img, fb[:3], out=fb[:3])
    torch.where(a == 0, img, fb[3:], out=fb[3:])
    return fb
