r"""Trimap matting without weights: closed-form alpha (Levin et al.) solved matrix-free, plus foreground.

Everything here is torch and runs on any device (CUDA when present, fast on CPU). Conventions: images are
``[B,H,W,3]`` float in 0..1, the trimap is ``[B,H,W]`` with 0 = background, 0.5 = unknown, 1 = foreground
(other encodings go through :func:`diffusion_matting.py.alpha.normalize_trimap`), the returned alpha is
``[B,H,W]`` with **1 = foreground**, the returned foreground colour is **straight** (not premultiplied).

Closed-form matting (Levin, Lischinski, Weiss, "A Closed-Form Solution to Natural Image Matting", 2008)
------------------------------------------------------------------------------------------------------
In every small window :math:`w_k` (:math:`(2r+1)^2` pixels, :math:`n = |w_k|`; r = 1 gives 3x3) alpha is
assumed to be an affine function of colour, :math:`\alpha_i \approx a_k^T I_i + b_k`. Eliminating
:math:`a_k, b_k` from the regularised least-squares fit leaves the quadratic form :math:`\alpha^T L \alpha`
with the *matting Laplacian*

.. math::

    L_{ij} = \sum_{k \,:\, i,j \in w_k} \Big( \delta_{ij} - \frac{1}{n}\big(1 + (I_i-\mu_k)^T
             \Delta_k^{-1} (I_j-\mu_k)\big) \Big), \qquad
    \Delta_k = \Sigma_k + \frac{\varepsilon}{n} I_3,

:math:`\mu_k`, :math:`\Sigma_k` being the window's colour mean and (population) covariance. Only windows
lying entirely inside the image are used (as Levin and pymatting do). Alpha minimises
:math:`\alpha^T L \alpha` subject to the trimap: with hard constraints (the known pixels K fixed; Grady et
al.'s split, also what pymatting's ``estimate_alpha_cf`` solves)

.. math::   L_{UU}\, \alpha_U = -L_{UK}\, \alpha_K

over the unknown pixels U, or with soft constraints (Levin's form; ``constraint_weight`` :math:`\lambda`,
D the known-pixel indicator, every pixel a variable)

.. math::   (L + \lambda D)\, \alpha = \lambda D\, \mathrm{trimap} .

The hard form is the :math:`\lambda \to \infty` limit and the default: better conditioned, and only the
unknown pixels are variables.

Matrix-free product (He, Sun, Tang, "Fast matting using large kernel matting Laplacian matrices", 2010)
----------------------------------------------------------------------------------------------------
:math:`L` is never assembled. Expanding the sum over windows,

.. math::

    (Lp)_i = \sum_{k \ni i} \big(p_i - \bar p_k - (I_i-\mu_k)^T a_k\big)
           = c_i\, p_i - I_i^T \sum_{k \ni i} a_k - \sum_{k \ni i} b_k,

    a_k = \Delta_k^{-1}\Big(\tfrac{1}{n}\sum_{j\in w_k} I_j p_j - \mu_k \bar p_k\Big), \qquad
    b_k = \bar p_k - a_k^T \mu_k,

with :math:`\bar p_k` the window mean of p and :math:`c_i` the number of windows containing pixel i: one
product is two box filters (window sums of :math:`[p, I p]`; window-to-pixel sums of :math:`[a, b]`) and a
3x3 product per window, the guided-filter form. :math:`\mu_k` and the inverse Cholesky factor
:math:`T_k` (:math:`\Delta_k^{-1} = T_k T_k^T`) are precomputed once, in float64, and stored in float32:
applying :math:`T_k T_k^T` keeps the float32 operator symmetric positive semi-definite, whereas rounding
the entries of :math:`\Delta_k^{-1}` itself (eigenvalues up to :math:`n/\varepsilon`) does not, and CG then
diverges. The exact diagonal :math:`L_{ii} = \sum_{k\ni i} 1 - \frac{1}{n} - \frac{1}{n}|T_k^T(I_i-\mu_k)|^2`
is expanded into window sums (in float64) when Jacobi preconditioning is asked for.

Solver
------
Diagonally preconditioned conjugate gradients (exact Jacobi on request; by default the diagonal of L
without its colour term, which measured as good: see :func:`solve_alpha_cf`), warm-started coarse to
fine. The image is box-downsampled 2x per level; a coarse pixel is known only if its 2x2 children all
carry the same known label, so the unknown region grows at coarse levels. The coarsest system is solved
first and each finer level starts from the bilinearly upsampled coarser solution. Every level stops when
its residual has dropped by ``tol`` relative to its right-hand side (or after ``iterations`` /
``coarse_iterations`` steps). ``tol`` ~ 1e-6 reproduces the exact closed-form solution (what pymatting
computes, to its own CG tolerance); the default ``tol`` = 3e-3 is cheaper and, on wide unknown regions,
measurably *better* than the exact solution: the coarse levels (windows spanning 2^l pixels) propagate
the known colours further than 3x3 windows do, and solving the fine level exactly partly undoes that.
On thin unknown bands the two agree closely (see benchmarks/bench_trimap.py and the tests).

Cost scales with the unknown region, not the image: U only interacts through windows, i.e. up to 2r pixels
away, so the unknowns are covered by tiles (16..128 px, the size with the least padded area; see
:mod:`diffusion_matting.py.tiling`) and the product runs on the batch of tiles that contain unknown pixels,
each padded by a 2r halo copied from its neighbours. One product is ~60 float32 passes over the tiles.

The foreground colour comes from :func:`diffusion_matting.py.foreground.estimate_foreground`
(multilevel, Germer et al. 2020).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import alpha as A
from .errors import UserError
from .tiling import Tiling, fill_halo, halo_index, make_tiling, whole_image

DEFAULT_EPS = 1e-6
DEFAULT_ITERATIONS = 300
DEFAULT_COARSE_ITERATIONS = 300
DEFAULT_COARSE_SIZE = 32
DEFAULT_TOL = 3e-3


# ------------------------------------------------------------------------------------------ box filters
def _box_valid(x: torch.Tensor, size: int, rows: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over every ``size x size`` window inside ``x`` ``[..., H, W]`` -> ``[..., H-size+1, W-size+1]``
    (separable slice sums; ``rows``/``out`` are optional preallocated buffers)."""
    H, W = x.shape[-2:]
    h, w = H - size + 1, W - size + 1
    if size == 1:
        return x.clone() if out is None else out.copy_(x)
    if rows is None:
        rows = x.new_empty(*x.shape[:-2], h, W)
    torch.add(x[..., 0:h, :], x[..., 1:h + 1, :], out=rows)
    for d in range(2, size):
        rows += x[..., d:d + h, :]
    if out is None:
        out = x.new_empty(*x.shape[:-2], h, w)
    torch.add(rows[..., 0:w], rows[..., 1:w + 1], out=out)
    for d in range(2, size):
        out += rows[..., d:d + w]
    return out


def _box_views(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, size: int) -> tuple:
    """Precomputed slice views for :func:`_box_run` (the same sums as :func:`_box_valid` into ``out``)."""
    h, w = out.shape[-2:]
    return (rows, [x[..., d:d + h, :] for d in range(size)], out, [rows[..., d:d + w] for d in range(size)])


def _box_run(views: tuple) -> torch.Tensor:
    rows, xs, out, rs = views
    torch.add(xs[0], xs[1], out=rows)
    for v in xs[2:]:
        rows += v
    torch.add(rs[0], rs[1], out=out)
    for v in rs[2:]:
        out += v
    return out


# ----------------------------------------------------------------------------------------- the Laplacian
def _window_stats(img: torch.Tensor, radius: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means ``[n,3,h,w]`` and inverse Cholesky factors ``T`` ``[n,6,h,w]`` (upper triangular, entries
    t00 t01 t02 t11 t12 t22; :math:`\\Delta^{-1} = T T^T`) of all windows inside ``img`` ``[n,3,H,W]``.
    Call in float64: the covariance is a difference of second moments."""
    size = 2 * radius + 1
    k = size * size
    c0, c1, c2 = img[:, 0], img[:, 1], img[:, 2]
    moments = torch.stack([c0, c1, c2, c0 * c0, c0 * c1, c0 * c2, c1 * c1, c1 * c2, c2 * c2], dim=1)
    m = _box_valid(moments, size) / k
    reg = eps / k
    mu = m[:, :3]
    a = m[:, 3] - mu[:, 0] * mu[:, 0] + reg
    b = m[:, 4] - mu[:, 0] * mu[:, 1]
    c = m[:, 5] - mu[:, 0] * mu[:, 2]
    d = m[:, 6] - mu[:, 1] * mu[:, 1] + reg
    e = m[:, 7] - mu[:, 1] * mu[:, 2]
    f = m[:, 8] - mu[:, 2] * mu[:, 2] + reg
    # Delta = R^T R, R upper triangular (Cholesky); T = R^{-1}
    r00 = a.clamp_min(reg).sqrt()
    r01 = b / r00
    r02 = c / r00
    r11 = (d - r01 * r01).clamp_min(reg).sqrt()
    r12 = (e - r01 * r02) / r11
    r22 = (f - r02 * r02 - r12 * r12).clamp_min(reg).sqrt()
    t00, t11, t22 = 1.0 / r00, 1.0 / r11, 1.0 / r22
    t01 = -r01 * t00 * t11
    t12 = -r12 * t11 * t22
    t02 = (r01 * r12 - r02 * r11) * t00 * t11 * t22
    return mu.contiguous(), torch.stack([t00, t01, t02, t11, t12, t22], dim=1)


@dataclass
class MattingLaplacian:
    """Matrix-free matting Laplacian of one image on a :class:`Tiling` (see the module docstring).

    ``image`` ``[N,3,Ph,Pw]``: padded tiles of the colour (shifted by -0.5: L ignores a global offset);
    ``mu`` ``[N,3,Qh,Qw]`` and ``tri`` ``[N,6,Qh,Qw]``: window means and :math:`T_k/\\sqrt{n}` for the windows
    centred in each padded tile (``Qh = Ph - 2r``), zero for windows not lying inside the image (``valid``);
    ``count``/``diagonal`` ``[N,th,tw]``: windows per pixel and :math:`L_{ii}` on the interior tiles.
    :meth:`apply` maps interior tiles ``[N,th,tw]`` (or ``[H,W]`` for a whole-image Laplacian from
    :func:`matting_laplacian`) to ``L @ x`` in the same layout.
    """

    tiling: Tiling
    image: torch.Tensor
    mu: torch.Tensor
    tri: torch.Tensor
    valid: torch.Tensor
    count: torch.Tensor
    diagonal: torch.Tensor
    radius: int
    eps: float
    _work: dict = field(default_factory=dict, repr=False)

    def _buffers(self, dtype, device) -> dict:
        """Work buffers and precomputed views (per-op Python overhead dominates small levels)."""
        if self._work:
            return self._work
        N, _, Ph, Pw = self.image.shape
        Qh, Qw = self.mu.shape[-2:]
        th, tw = self.tiling.th, self.tiling.tw
        size, h = 2 * self.radius + 1, 2 * self.radius
        new = lambda *s: torch.empty(*s, dtype=dtype, device=device)  # noqa: E731
        pad = torch.zeros(N, Ph, Pw, dtype=dtype, device=device)
        stacked, rows, sums = new(N, 4, Ph, Pw), new(N, 4, Qh, Pw), new(N, 4, Qh, Qw)
        u, ab, rows2, back = new(N, 3, Qh, Qw), new(N, 4, Qh, Qw), new(N, 4, th, Qw), new(N, 4, th, tw)
        t = [self.tri[:, k] for k in range(6)]
        mu = [self.mu[:, k] for k in range(3)]
        inner = self.image[:, :, h:h + th, h:h + tw]
        self._work.update(
            padded=pad, pad_inner=pad[:, h:h + th, h:h + tw], halo=halo_index(self.tiling),
            stacked=stacked, s0=stacked[:, 0], s_rest=stacked[:, 1:],
            box1=_box_views(stacked, rows, sums, size), box2=_box_views(ab, rows2, back, size),
            psum=sums[:, 0], psum_u=sums[:, :1], c=sums[:, 1:], ck=[sums[:, 1 + k] for k in range(3)],
            t=t, mu_all=self.mu, mu=mu, u=[u[:, k] for k in range(3)], ab=[ab[:, k] for k in range(4)],
            back=[back[:, k] for k in range(4)], inner=[inner[:, k] for k in range(3)],
            inv_n=1.0 / (size * size))
        return self._work

    def apply_padded(self, p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``L @ p`` on the interior of padded tiles ``p`` ``[N,Ph,Pw]`` -> ``[N,th,tw]``."""
        w = self._buffers(p.dtype, p.device)
        h = 2 * self.radius
        t, mu, c, u, ab, back, inner = w["t"], w["mu"], w["ck"], w["u"], w["ab"], w["back"], w["inner"]
        w["s0"].copy_(p)
        torch.mul(self.image, p.unsqueeze(1), out=w["s_rest"])
        _box_run(w["box1"])  # n * window means of [p, I p]
        w["c"].addcmul_(w["mu_all"], w["psum_u"], value=-1.0)  # n * (mean(I p) - mu mean(p))
        # u = T^T c; a = T u (= Delta^{-1} (mean(I p) - mu mean(p)) with T scaled by 1/sqrt(n))
        torch.mul(t[0], c[0], out=u[0])
        torch.mul(t[1], c[0], out=u[1]).addcmul_(t[3], c[1])
        torch.mul(t[2], c[0], out=u[2]).addcmul_(t[4], c[1]).addcmul_(t[5], c[2])
        torch.mul(t[0], u[0], out=ab[0]).addcmul_(t[1], u[1]).addcmul_(t[2], u[2])
        torch.mul(t[3], u[1], out=ab[1]).addcmul_(t[4], u[2])
        torch.mul(t[5], u[2], out=ab[2])
        # b = mean(p) - a . mu (valid windows only)
        torch.mul(w["psum"], self.valid, out=ab[3]).mul_(w["inv_n"])
        ab[3].addcmul_(ab[0], mu[0], value=-1.0).addcmul_(ab[1], mu[1], value=-1.0)
        ab[3].addcmul_(ab[2], mu[2], value=-1.0)
        _box_run(w["box2"])  # sums of [a, b] over the windows containing each pixel
        p_inner = w["pad_inner"] if p is w["padded"] else p[:, h:p.shape[1] - h, h:p.shape[2] - h]
        out = torch.mul(self.count, p_inner, out=out)
        out -= back[3]
        out.addcmul_(inner[0], back[0], value=-1.0).addcmul_(inner[1], back[1], value=-1.0)
        out.addcmul_(inner[2], back[2], value=-1.0)
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Interior tiles ``[N,th,tw]`` (zero outside them) -> padded tiles ``[N,Ph,Pw]``."""
        w = self._buffers(x.dtype, x.device)
        w["pad_inner"].copy_(x)
        if not self.tiling.single:
            fill_halo(w["padded"], w["halo"])
        return w["padded"]

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``L @ x`` for ``x`` in interior-tile layout ``[N,th,tw]`` (``[H,W]`` for a whole-image one)."""
        flat = x.ndim == 2
        y = self.apply_padded(self.gather(x.unsqueeze(0) if flat else x), out)
        return y[0] if flat else y


def build_matting_laplacian(image: torch.Tensor, tiling: Tiling, eps: float = DEFAULT_EPS, radius: int = 1,
                            dtype: torch.dtype = torch.float32, exact_diagonal: bool = True,
                            chunk_pixels: int = 1 << 18) -> MattingLaplacian:
    """Precompute the window statistics of ``image`` ``[H,W,3]`` on the active tiles of ``tiling``.

    Windows are those lying inside the image. Statistics are computed in float64 (float32 on MPS, which
    lacks it) in chunks of about ``chunk_pixels`` padded pixels, and stored in ``dtype``. With
    ``exact_diagonal=False`` the ``diagonal`` field holds the window-count diagonal
    :math:`c_i (1 - 1/n)` (that of L without its colour term) instead of :math:`L_{ii}`, which skips about
    40 % of the precomputation."""
    H, W = image.shape[:2]
    size = 2 * radius + 1
    n = size * size
    if H < size or W < size:
        raise UserError(f"image {W}x{H} is smaller than one {size}x{size} matting window")
    device = image.device
    hi = torch.float32 if device.type == "mps" else torch.float64
    img = tiling.padded_tiles(image.permute(2, 0, 1).to(dtype) - 0.5)  # [N,3,Ph,Pw]
    centre = torch.zeros(H, W, dtype=dtype, device=device)
    centre[radius:H - radius, radius:W - radius] = 1.0
    valid = tiling.padded_tiles(centre)[:, radius:-radius, radius:-radius].contiguous()
    N, _, Ph, Pw = img.shape
    Qh, Qw = Ph - 2 * radius, Pw - 2 * radius
    th, tw, h = tiling.th, tiling.tw, 2 * radius
    mu = torch.empty(N, 3, Qh, Qw, dtype=dtype, device=device)
    tri = torch.empty(N, 6, Qh, Qw, dtype=dtype, device=device)
    diag = torch.empty(N, th, tw, dtype=dtype, device=device)
    count = _box_valid(valid, size)
    step = max(1, chunk_pixels // (Ph * Pw))
    for i in range(0, N, step):
        part = img[i:i + step].to(hi)
        v = valid[i:i + step].to(hi)
        m, t = _window_stats(part, radius, eps)
        mu[i:i + step] = m
        tri[i:i + step] = t * (v.unsqueeze(1) / math.sqrt(n))
        if not exact_diagonal:
            continue
        # diagonal: sum over valid windows k containing i of 1 - 1/n - (I_i - mu_k)^T M_k (I_i - mu_k),
        # M_k = Delta_k^{-1} / n = T T^T / n, expanded into window sums (float64: no cancellation issue)
        t00, t01, t02, t11, t12, t22 = (t[:, k] * v for k in range(6))
        mm = torch.stack([t00 * t00 + t01 * t01 + t02 * t02, t01 * t11 + t02 * t12, t02 * t22,
                          t11 * t11 + t12 * t12, t12 * t22, t22 * t22], dim=1) / n
        m0, m1, m2 = m[:, 0], m[:, 1], m[:, 2]
        mmu = torch.stack([mm[:, 0] * m0 + mm[:, 1] * m1 + mm[:, 2] * m2,
                           mm[:, 1] * m0 + mm[:, 3] * m1 + mm[:, 4] * m2,
                           mm[:, 2] * m0 + mm[:, 4] * m1 + mm[:, 5] * m2], dim=1)
        mumu = (mmu * m).sum(1, keepdim=True)
        sums = _box_valid(torch.cat([mm, mmu, mumu], dim=1), size)  # [n, 10, th, tw]
        c = part[:, :, h:h + th, h:h + tw]
        c0, c1, c2 = c[:, 0], c[:, 1], c[:, 2]
        quad = (sums[:, 0] * c0 * c0 + sums[:, 3] * c1 * c1 + sums[:, 5] * c2 * c2
                + 2 * (sums[:, 1] * c0 * c1 + sums[:, 2] * c0 * c2 + sums[:, 4] * c1 * c2))
        lin = sums[:, 6] * c0 + sums[:, 7] * c1 + sums[:, 8] * c2
        diag[i:i + step] = count[i:i + step] * (1.0 - 1.0 / n) - (quad - 2 * lin + sums[:, 9])
    if not exact_diagonal:
        diag = count * (1.0 - 1.0 / n)
    return MattingLaplacian(tiling, img, mu, tri, valid, count, diag.clamp_min_(0.0), radius, eps)


def matting_laplacian(image: torch.Tensor, eps: float = DEFAULT_EPS, radius: int = 1,
                      dtype: torch.dtype = torch.float32) -> MattingLaplacian:
    """The closed-form matting Laplacian of a whole image ``[H,W,3]`` as a matrix-free operator:
    ``matting_laplacian(img).apply(x)`` is ``L @ x`` for ``x`` ``[H,W]``; ``.diagonal[0]`` is diag(L)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(f"matting_laplacian: expected one image [H,W,3], got shape {tuple(image.shape)}")
    tiling = whole_image(image.shape[0], image.shape[1], 2 * radius, image.device)
    return build_matting_laplacian(image, tiling, eps=eps, radius=radius, dtype=dtype)


# ------------------------------------------------------------------------------------------- the solver
def _pcg(apply_a: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], r: torch.Tensor, x: torch.Tensor,
         inv_diag: torch.Tensor, tol: float, max_iter: int, b_norm: float) -> tuple[torch.Tensor, int, float]:
    """Jacobi-preconditioned CG. ``r`` is the initial residual (zero off the variables), ``inv_diag`` the
    preconditioner (zero off the variables). Stops when ``|r| <= tol * b_norm``. Returns (x, iters, |r|/b).
    On CPU the scalars are Python floats; elsewhere they stay on the device (a sync every 10 steps)."""
    on_cpu = x.device.type == "cpu"
    z = r * inv_diag
    p = z.clone()
    ap = torch.empty_like(p)
    r_f, z_f, p_f, ap_f = r.view(-1), z.view(-1), p.view(-1), ap.view(-1)
    rz = torch.vdot(r_f, z_f)
    if on_cpu:
        rz = float(rz)
    check = 1 if on_cpu else 10
    target = tol * b_norm
    rel = float(torch.linalg.vector_norm(r_f)) / b_norm
    it = 0
    while it < max_iter and rel > tol:
        it += 1
        apply_a(p, ap)
        pap = torch.vdot(p_f, ap_f)
        if on_cpu:
            pap = float(pap)
            if not pap > 0.0:  # converged to rounding (or a breakdown): stop
                break
            step = rz / pap
            x.add_(p, alpha=step)
            r.sub_(ap, alpha=step)
        else:
            step = rz / pap
            x.addcmul_(p, step)
            r.addcmul_(ap, step, value=-1.0)
        if it % check == 0 or it == max_iter:
            rn = float(torch.linalg.vector_norm(r_f))
            rel = rn / b_norm
            if not math.isfinite(rn) or rn <= target:
                break
        torch.mul(r, inv_diag, out=z)
        rz_new = torch.vdot(r_f, z_f)
        if on_cpu:
            rz_new = float(rz_new)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return x, it, rel


def solve_alpha_cf(image: torch.Tensor, trimap: torch.Tensor, x0: torch.Tensor | None = None,
                   eps: float = DEFAULT_EPS, radius: int = 1, constraint_weight: float | None = None,
                   tol: float = 1e-6, max_iter: int = 2000, dtype: torch.dtype = torch.float32,
                   preconditioner: str = "count") -> tuple[torch.Tensor, dict]:
    """Single-level closed-form alpha of one image ``[H,W,3]`` for a clean trimap ``[H,W]`` (0 / 0.5 / 1):
    diagonally preconditioned CG from ``x0`` (``[H,W]``; default: the trimap, i.e. 0.5 on unknown pixels).

    ``constraint_weight=None``: hard constraints, :math:`L_{UU}\\alpha_U = -L_{UK}\\alpha_K`, only unknown
    pixels are variables (on tiles covering them); a number :math:`\\lambda`: Levin's
    :math:`(L + \\lambda D)\\alpha = \\lambda D\\,\\mathrm{trimap}` over the whole image.

    ``preconditioner``: ``"jacobi"`` divides by the exact diagonal :math:`L_{ii}` (+ :math:`\\lambda D`);
    ``"count"`` (default) by the diagonal of L without its colour term, :math:`c_i(1 - 1/n)`. The matting
    Laplacian's diagonal is nearly uniform, and on the dev set and the procedural tests exact Jacobi took
    no fewer CG steps (slightly more), while computing it costs ~40 % of the precomputation.
    Returns the unclipped alpha ``[H,W]`` and ``info`` (iterations, relative residual, variables, tiles)."""
    H, W = trimap.shape
    trimap = trimap.to(dtype)
    unknown = trimap == A.TRIMAP_UNKNOWN
    known_f = (~unknown).to(dtype)
    start = trimap if x0 is None else torch.where(unknown, x0.to(dtype), trimap)
    hard = constraint_weight is None
    active = unknown if hard else torch.ones_like(unknown)
    if not bool(active.any()):
        return start.clone(), {"iterations": 0, "relative_residual": 0.0, "variables": 0, "tiles": 0}
    tiling = make_tiling(active, halo=2 * radius)
    if preconditioner not in ("count", "jacobi"):
        raise UserError(f"preconditioner {preconditioner!r}: expected 'count' or 'jacobi'")
    lap = build_matting_laplacian(image, tiling, eps=eps, radius=radius, dtype=dtype,
                                  exact_diagonal=preconditioner == "jacobi")
    # L @ (the full start vector) restricted to the tiles: gather it from a full canvas, not the tile one
    h = tiling.halo
    both = tiling.padded_tiles(torch.stack([start, unknown.to(dtype)]))  # [N,2,Ph,Pw]
    l_start = lap.apply_padded(both[:, 0].contiguous())
    start_tiles = both[:, 0, h:h + tiling.th, h:h + tiling.tw].contiguous()
    if hard:
        mask = both[:, 1, h:h + tiling.th, h:h + tiling.tw].contiguous()
        x = start_tiles * mask
        r = -l_start * mask
        # tolerance relative to the right-hand side -L_UK alpha_K = -(L (start - x0_U))_U
        b_norm = float(torch.linalg.vector_norm(r + lap.apply(x) * mask))
        inv_diag = mask / lap.diagonal.clamp_min(1e-12)

        def apply_a(v, out):
            lap.apply(v, out).mul_(mask)
            return out
    else:
        lam = float(constraint_weight)
        mask = tiling.tiles(torch.ones(H, W, dtype=dtype, device=trimap.device))
        dk = tiling.tiles(known_f) * lam
        rhs = dk * tiling.tiles(trimap)
        x = start_tiles.clone()
        r = (rhs - l_start - dk * x) * mask
        b_norm = float(torch.linalg.vector_norm(rhs))
        inv_diag = mask / (lap.diagonal + dk).clamp_min(1e-12)

        def apply_a(v, out):
            lap.apply(v, out).addcmul_(dk, v).mul_(mask)
            return out
    if b_norm == 0.0:  # no known pixel touches the unknowns through any window: nothing drives the solve
        b_norm = max(float(torch.linalg.vector_norm(r)), 1e-30)
    x, iters, rel = _pcg(apply_a, r, x, inv_diag, tol, max_iter, b_norm)
    alpha = tiling.untile(torch.where(mask > 0, x, start_tiles), start)
    return alpha, {"iterations": iters, "relative_residual": rel, "variables": int(mask.sum()),
                   "tiles": tiling.n, "tile": (tiling.th, tiling.tw)}


def _downsample_level(image: torch.Tensor, trimap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x box-downsample ``[H,W,3]`` and the trimap (a coarse pixel is known only if all children agree)."""
    H, W = trimap.shape
    ph, pw = H % 2, W % 2
    if ph or pw:
        image = F.pad(image.permute(2, 0, 1)[None], (0, pw, 0, ph), mode="replicate")[0].permute(1, 2, 0)
        trimap = F.pad(trimap[None, None], (0, pw, 0, ph), mode="replicate")[0, 0]
    q = [image[dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]  # the four children (strided views)
    img = (q[0] + q[1]).add_(q[2]).add_(q[3]).mul_(0.25)
    t = [trimap[dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]
    lo = torch.minimum(torch.minimum(t[0], t[1]), torch.minimum(t[2], t[3]))
    hi = torch.maximum(torch.maximum(t[0], t[1]), torch.maximum(t[2], t[3]))
    # a coarse pixel is known only if all four children agree: the unknown region grows at coarse levels,
    # which is what lets the coarse solutions propagate colour far (a looser rule measured much worse)
    coarse = torch.where((lo == hi) & (lo != A.TRIMAP_UNKNOWN), lo, torch.full_like(lo, A.TRIMAP_UNKNOWN))
    return img.contiguous(), coarse


def estimate_alpha_cf(image: torch.Tensor, trimap: torch.Tensor, eps: float = DEFAULT_EPS, radius: int = 1,
                      iterations: int = DEFAULT_ITERATIONS, coarse_iterations: int = DEFAULT_COARSE_ITERATIONS,
                      tol: float = DEFAULT_TOL, coarse_size: int = DEFAULT_COARSE_SIZE, max_levels: int = 10,
                      constraint_weight: float | None = None, preconditioner: str = "count",
                      dtype: torch.dtype = torch.float32, interrupt: Callable[[], None] | None = None,
                      ) -> tuple[torch.Tensor, dict]:
    """Closed-form alpha, coarse to fine, for one image ``[H,W,3]`` and a clean trimap ``[H,W]`` (0/0.5/1).

    Builds a 2x pyramid down to ``coarse_size`` px on the short side (while the coarse trimap still has
    both known and unknown pixels), solves the coarsest level with up to ``coarse_iterations`` CG steps
    and every finer level with up to ``iterations`` steps from the bilinearly upsampled coarser solution
    (see :func:`solve_alpha_cf`); every level stops at relative residual ``tol``. ``tol`` ~ 1e-6 gives
    the exact closed-form solution; the default (3e-3) stops each level once the residual has dropped
    ~300x. ``interrupt()`` is called before each level. Returns alpha ``[H,W]`` clipped to 0..1
    (1 = foreground) and ``info`` (one dict per level, coarsest first)."""
    pyramid = [(image, trimap)]
    while len(pyramid) < max_levels:
        img, tri = pyramid[-1]
        if min(tri.shape) // 2 < max(coarse_size, 4 * radius + 2):
            break
        coarse = _downsample_level(img, tri)
        unknown = coarse[1] == A.TRIMAP_UNKNOWN
        if not bool(unknown.any()) or bool(unknown.all()):
            break
        pyramid.append(coarse)
    x = None
    infos = []
    for level, (img, tri) in enumerate(reversed(pyramid)):
        if x is not None:
            x = F.interpolate(x[None, None], size=tri.shape, mode="bilinear", align_corners=False)[0, 0]
        if interrupt is not None:
            interrupt()
        budget = coarse_iterations if level == 0 else iterations
        x, info = solve_alpha_cf(img, tri, x0=x, eps=eps, radius=radius, constraint_weight=constraint_weight,
                                 tol=tol, max_iter=budget, dtype=dtype, preconditioner=preconditioner)
        info["size"] = tuple(tri.shape)
        infos.append(info)
    return x.clamp(0.0, 1.0), {"levels": infos}


# ---------------------------------------------------------------------------------------- public API
def auto_threads() -> int:
    """Intra-op CPU threads worth using now: torch's setting, capped by the cores the load average leaves
    idle (at least 1). The solvers run thousands of small tensor ops; on an oversubscribed CPU, OpenMP
    threads that spin-wait for descheduled partners make them over 10x slower than one thread."""
    n = torch.get_num_threads()
    try:
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return n
    return max(1, min(n, int(idle + 0.5)))


@contextmanager
def _torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None and n != old:
            torch.set_num_threads(old)


def prepare_trimap(image: torch.Tensor, trimap: torch.Tensor | None = None, fg_mask: torch.Tensor | None = None,
                   bg_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None, erode_px: int = 8,
                   dilate_px: int = 8, threshold: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """A clean trimap ``[B,H,W]`` (0 / 0.5 / 1) for ``image`` ``[B,H,W,C]`` from exactly one source:

    * ``trimap``: any common encoding (0/0.5/1, 0/128/255 as 0..1 or 0..255, ...) via
      :func:`~diffusion_matting.py.alpha.normalize_trimap`;
    * ``fg_mask`` + ``bg_mask``: definite foreground / background masks (the rest unknown) via
      :func:`~diffusion_matting.py.alpha.trimap_from_masks`;
    * ``mask``: a coarse alpha mask (1 = foreground), eroded by ``erode_px`` / dilated by ``dilate_px`` via
      :func:`~diffusion_matting.py.alpha.trimap_from_mask`.

    Returns ``(trimap, warnings)``; sizes must match the image (batch 1 broadcasts)."""
    sources = [trimap is not None, fg_mask is not None or bg_mask is not None, mask is not None]
    if sum(sources) != 1:
        raise UserError("give exactly one of: a trimap, fg + bg masks, or a coarse mask")
    warnings: list[str] = []
    if trimap is not None:
        tri = A.normalize_trimap(trimap)
    elif mask is None:
        if fg_mask is None or bg_mask is None:
            raise UserError("fg and bg masks: both are needed")
        tri = A.trimap_from_masks(fg_mask, bg_mask)
    else:
        tri, warnings = A.trimap_from_mask(mask, erode_px=erode_px, dilate_px=dilate_px, threshold=threshold)
    image = A.as_image(image, "image")
    _, tri = A.broadcast_batch(image, tri.to(image.device), names=["image", "trimap"])
    return tri.contiguous(), warnings


def matte(image: torch.Tensor, trimap: torch.Tensor | None = None, *, fg_mask: torch.Tensor | None = None,
          bg_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None, erode_px: int = 8,
          dilate_px: int = 8, eps: float = DEFAULT_EPS, radius: int = 1, iterations: int = DEFAULT_ITERATIONS,
          coarse_iterations: int = DEFAULT_COARSE_ITERATIONS, tol: float = DEFAULT_TOL,
          constraint_weight: float | None = None, foreground: bool = True, foreground_sweeps: int = 2,
          device: torch.device | str | None = None, progress: Callable[[int, int], None] | None = None,
          interrupt: Callable[[], None] | None = None, threads: int | str | None = "auto",
          ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Trimap matting without weights: closed-form alpha (:func:`estimate_alpha_cf`) + multilevel
    foreground (:func:`diffusion_matting.py.foreground.estimate_foreground`).

    ``image`` ``[B,H,W,3]`` (RGBA: its RGB is used) in 0..1; the trimap comes from ``trimap`` (0/0.5/1 or
    another common encoding), ``fg_mask`` + ``bg_mask``, or a coarse ``mask`` (see :func:`prepare_trimap`).
    Runs on ``device`` (default: the image's). ``progress(done, total)`` is called after each batch item,
    ``interrupt()`` before each item and pyramid level (it may raise to abort). On CPU, ``threads`` sets
    torch's intra-op threads for the call (restored after): a number, ``"auto"`` (:func:`auto_threads`:
    no more than the idle cores) or ``None`` (leave torch's setting alone).

    Returns ``(alpha [B,H,W] with 1 = foreground, straight foreground [B,H,W,3], warnings)`` on the
    image's device. Trimaps that leave nothing to solve are not errors: no unknown pixels -> alpha is the
    trimap itself; no definite foreground -> alpha 0 (the constant solution); no definite background ->
    alpha 1; each with a warning saying so.
    """
    image = A.as_image(image, "image")
    out_device = image.device
    dev = torch.device(device) if device is not None else image.device
    tri, warnings = prepare_trimap(image, trimap, fg_mask, bg_mask, mask, erode_px, dilate_px)
    rgb = image[..., :3]
    n_threads = None if dev.type != "cpu" or threads is None else auto_threads() if threads == "auto" else int(threads)
    with _torch_threads(n_threads):
        return _matte(rgb, tri, warnings, dev, out_device, eps, radius, iterations, coarse_iterations, tol,
                      constraint_weight, foreground, foreground_sweeps, progress, interrupt)


def _matte(rgb, tri, warnings, dev, out_device, eps, radius, iterations, coarse_iterations, tol,
           constraint_weight, foreground, foreground_sweeps, progress, interrupt):
    B, H, W = tri.shape
    size = 2 * radius + 1
    alphas, fgs = [], []
    for i in range(B):
        if interrupt is not None:
            interrupt()
        img_i = rgb[i].to(dev, torch.float32)
        tri_i = tri[i].to(dev, torch.float32)
        unknown = tri_i == A.TRIMAP_UNKNOWN
        has_fg, has_bg = bool((tri_i == A.TRIMAP_FG).any()), bool((tri_i == A.TRIMAP_BG).any())
        tag = f"image {i}: " if B > 1 else ""
        if not bool(unknown.any()):
            warnings.append(f"{tag}the trimap has no unknown (grey) pixels, so there is nothing to solve: "
                            "alpha is the trimap itself")
            alpha_i = tri_i.clone()
        elif not has_fg:
            what = "no definite foreground or background" if not has_bg else "no definite foreground (white)"
            warnings.append(f"{tag}the trimap has {what}: closed-form matting needs both; alpha is 0 "
                            "(all background) on the unknown region")
            alpha_i = torch.where(unknown, torch.zeros_like(tri_i), tri_i)
        elif not has_bg:
            warnings.append(f"{tag}the trimap has no definite background (black): closed-form matting needs "
                            "both; alpha is 1 (all foreground) on the unknown region")
            alpha_i = torch.where(unknown, torch.ones_like(tri_i), tri_i)
        elif H < size or W < size:
            raise UserError(f"image {W}x{H} is too small for {size}x{size} matting windows")
        else:
            alpha_i, _ = estimate_alpha_cf(img_i, tri_i, eps=eps, radius=radius, iterations=iterations,
                                           coarse_iterations=coarse_iterations, tol=tol,
                                           constraint_weight=constraint_weight, interrupt=interrupt)
        if foreground:
            from .foreground import estimate_foreground

            fg_i = estimate_foreground(img_i[None], alpha_i[None], sweeps=foreground_sweeps)[0][0]
        else:
            fg_i = img_i
        alphas.append(alpha_i.to(out_device))
        fgs.append(fg_i.to(out_device))
        if progress is not None:
            progress(i + 1, B)
    return torch.stack(alphas), torch.stack(fgs), warnings
