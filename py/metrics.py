"""Matting metrics (numpy/scipy), computed the way the matting literature reports them.

The alpha metrics follow the Deep Image Matting (DIM, Xu et al. 2017) MATLAB evaluation code, the
convention behind every Composition-1k / Distinctions-646 table (also reproduced by OpenMMLab's
mmeval): SAD, MSE, gradient and connectivity error, restricted to the trimap's *unknown* region
when a trimap is given. Reporting units, as in the papers:

* ``sad``  = SAD / 1000,  ``mse_x1e3`` = MSE * 1000,  ``grad`` = Grad / 1000,  ``conn`` = Conn / 1000.

The functions below return SAD, Grad and Conn already divided by 1000 and the MSE *as is*;
:func:`evaluate` returns the reporting dict with explicit field names.

Inputs: alpha mattes are ``[H,W]`` arrays in 0..1 (1 = foreground). numpy arrays and torch tensors
are accepted (a leading batch axis of size 1 is dropped; ``uint8``/``uint16`` arrays are rescaled
from 0..255 / 0..65535). Regions are boolean ``[H,W]`` masks; ``None`` means the whole image.

Known deviation of widely copied Python ports (e.g. GCA-Matting's ``utils/evaluate.py``): their
connectivity error picks the largest connected component with ``argmax(bincount(labels))``, which
includes the *background* label 0, so whenever the background is larger than the object the
"largest component" is the background. That under-reports Conn. This module excludes label 0 as
MATLAB's ``bwconncomp`` does (see ``tests/test_metrics.py``).
"""

from __future__ import annotations

import math
import numpy as np
from scipy import ndimage

from .errors import UserError

NORM = 1000.0  # SAD, Grad and Conn are reported divided by 1000


# ------------------------------------------------------------------------------------------ inputs
def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.double()
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if x.dtype == np.uint16:
        return x.astype(np.float64) / 65535.0
    if x.dtype == bool:
        return x.astype(np.float64)
    if not np.issubdtype(x.dtype, np.number):
        raise UserError(f"{name}: expected a numeric array, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


def _matte(x, name: str) -> np.ndarray:
    """``[H,W]`` float64 in 0..1 from an array/tensor (``[1,H,W]`` and ``[H,W,1]`` are squeezed)."""
    a = _to_numpy(x, name)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise UserError(f"{name}: expected an [H,W] matte, got shape {a.shape}")
    if np.isnan(a).any():
        raise UserError(f"{name}: contains NaN values")
    return a


def _color(x, name: str) -> np.ndarray:
    """``[H,W,3]`` float64 in 0..1 (``[1,H,W,3]`` squeezed, RGBA keeps its RGB)."""
    a = _to_numpy(x, name)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise UserError(f"{name}: expected an [H,W,3] colour image, got shape {a.shape}")
    return a[..., :3]


def _same_size(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise UserError(f"size mismatch: {na} is {a.shape[1]}x{a.shape[0]} but {nb} is "
                        f"{b.shape[1]}x{b.shape[0]} (WxH)")


def _region(region, shape: tuple[int, int]) -> np.ndarray | None:
    if region is None:
        return None
    r = _to_numpy(region, "region")
    while r.ndim > 2 and r.shape[0] == 1:
        r = r[0]
    if r.shape != shape:
        raise UserError(f"size mismatch: region has shape {r.shape} but the matte is {shape[1]}x{shape[0]} (WxH)")
    return r > 0.5


def _pair(pred, gt, region):
    p, g = _matte(pred, "pred"), _matte(gt, "gt")
    _same_size(p, g, "pred", "gt")
    return p, g, _region(region, g.shape)


def _masked_sum(values: np.ndarray, region: np.ndarray | None) -> float:
    return float(values.sum() if region is None else values[region].sum())


# ------------------------------------------------------------------------------------ alpha metrics
def unknown_region(trimap) -> np.ndarray:
    """Unknown region of a trimap: bool ``[H,W]``, True where the trimap is neither background nor foreground.

    Accepts 0..1 (0 / 0.5 / 1) and 0..255 (0 / 128 / 255) encodings; an array whose maximum exceeds 1
    is read as 0..255. With ``t`` rescaled to 0..1, ``unknown = (t > e) & (t < 1 - e)`` with
    ``e = 1/510`` (half an 8-bit level), i.e. exactly DIM's ``trimap == 128`` for 0/128/255 trimaps,
    while tolerating 16-bit and float encodings.
    """
    t = _matte(trimap, "trimap")
    if t.max() > 1.0 + 1e-6:
        t = t / 255.0
    eps = 0.5 / 255.0
    return (t > eps) & (t < 1.0 - eps)


def sad(pred, gt, region=None) -> float:
    """Sum of absolute differences, divided by 1000.

    ``SAD = sum_{p in R} |pred_p - gt_p| / 1000`` over the region ``R`` (whole image if ``None``),
    alphas in 0..1 (DIM: ``sum(abs(pred - target) .* (trimap == 128)) / 255``, reported / 1000).
    """
    p, g, r = _pair(pred, gt, region)
    return _masked_sum(np.abs(p - g), r) / NORM


def mse(pred, gt, region=None) -> float:
    """Mean squared error over the region, *not* scaled (papers report ``mse * 1e3``).

    ``MSE = sum_{p in R} (pred_p - gt_p)^2 / |R|`` with alphas in 0..1. An empty region gives 0.0.
    """
    p, g, r = _pair(pred, gt, region)
    n = p.size if r is None else int(r.sum())
    if n == 0:
        return 0.0
    return _masked_sum((p - g) ** 2, r) / n


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-(x * x) / (2.0 * sigma * sigma)) / (sigma * math.sqrt(2.0 * math.pi))


def gaussian_derivative_kernels(sigma: float = 1.4, epsilon: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """The two 1-D factors ``(smooth, derivative)`` of DIM's ``gaussgradient`` filter.

    DIM builds a ``size x size`` filter ``hx[i,j] = G(i) * G'(j)`` on offsets ``-h..h`` with
    ``G(u) = exp(-u^2 / 2 sigma^2) / (sigma sqrt(2 pi))``, ``G'(u) = -u G(u) / sigma^2`` and
    ``h = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma epsilon)))`` (h = 4 for sigma 1.4), then divides it by
    its Frobenius norm. ``hx`` is the outer product of ``G`` and ``G'``, and its norm is
    ``|G| * |G'|``, so each factor is returned already divided by its own 2-norm.
    """
    half = int(math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon))))
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = _gauss(u, sigma)
    dg = -u * g / (sigma * sigma)
    return g / np.linalg.norm(g), dg / np.linalg.norm(dg)


def gaussian_gradient_magnitude(matte: np.ndarray, sigma: float = 1.4) -> np.ndarray:
    """``sqrt(gx^2 + gy^2)`` with DIM's normalised Gaussian-derivative filter, replicate borders.

    ``gx = matte (*) hx`` (2-D convolution, MATLAB ``imfilter(.., 'replicate', 'conv')``), ``hy = hx^T``;
    computed separably (smooth along one axis, differentiate along the other).
    """
    g, dg = gaussian_derivative_kernels(sigma)
    m = np.asarray(matte, dtype=np.float64)
    # hx[i, j] = g[i] * dg[j]: rows (axis 0) smoothed, columns (axis 1) differentiated
    gx = ndimage.convolve1d(ndimage.convolve1d(m, g, axis=0, mode="nearest"), dg, axis=1, mode="nearest")
    gy = ndimage.convolve1d(ndimage.convolve1d(m, dg, axis=0, mode="nearest"), g, axis=1, mode="nearest")
    return np.sqrt(gx * gx + gy * gy)


def _minmax(a: np.ndarray) -> np.ndarray:
    """MATLAB ``mat2gray``: ``(a - min) / (max - min)`` over the whole image (a constant image gives 0)."""
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def gradient_error(pred, gt, region=None, sigma: float = 1.4) -> float:
    """Gradient error, divided by 1000.

    Each matte is min/max normalised over the whole image (``mat2gray``), its gradient magnitude
    ``|nabla a| = sqrt((a (*) hx)^2 + (a (*) hy)^2)`` is taken with DIM's Gaussian-derivative filter of
    ``sigma`` (see :func:`gaussian_derivative_kernels`) and
    ``Grad = sum_{p in R} (|nabla pred|_p - |nabla gt|_p)^2 / 1000``.
    """
    p, g, r = _pair(pred, gt, region)
    diff = gaussian_gradient_magnitude(_minmax(p), sigma) - gaussian_gradient_magnitude(_minmax(g), sigma)
    return _masked_sum(diff * diff, r) / NORM


def _thresholds(step: float) -> np.ndarray:
    """MATLAB ``0:step:1`` (values ``i*step``, computed as ``i/n`` when ``1/step`` is an integer ``n``)."""
    n = int(math.floor(1.0 / step + 1e-9))
    if abs(n * step - 1.0) < 1e-9:
        return np.arange(n + 1, dtype=np.float64) / n
    return np.arange(n + 1, dtype=np.float64) * step


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of ``mask`` (background never counts). Ties go to the component
    found first in column-major order, as MATLAB's ``bwconncomp`` + ``max`` do."""
    # label the transpose so that label order follows MATLAB's column-major scan
    labels, num = ndimage.label(mask.T)  # default structure = 4-connectivity
    out = np.zeros(mask.shape, dtype=bool)
    if num == 0:
        return out
    sizes = np.bincount(labels.ravel(), minlength=num + 1)
    sizes[0] = 0  # label 0 is the background: never the "largest component"
    out.T[...] = labels == int(np.argmax(sizes))
    return out


def connectivity_levels(pred, gt, step: float = 0.1) -> np.ndarray:
    """DIM's ``l_map``: for each pixel, the threshold just before the one at which it first falls out of
    the largest 4-connected component of ``(pred >= t) & (gt >= t)``, ``t = step, 2 step, .., 1``;
    pixels that never fall out get 1."""
    p, g = _matte(pred, "pred"), _matte(gt, "gt")
    _same_size(p, g, "pred", "gt")
    steps = _thresholds(step)
    level = np.full(p.shape, -1.0)
    for i in range(1, len(steps)):
        omega = _largest_component((p >= steps[i]) & (g >= steps[i]))
        level[(level == -1.0) & ~omega] = steps[i - 1]
    level[level == -1.0] = 1.0
    return level


def connectivity_error(pred, gt, region=None, step: float = 0.1, theta: float = 0.15) -> float:
    """Connectivity error (DIM / Rhemann et al. 2009), divided by 1000.

    For thresholds ``t_i = i * step`` (``i = 1..1/step``), ``Omega_i`` is the largest 4-connected
    component of ``(pred >= t_i) & (gt >= t_i)`` (background excluded). ``l_p = t_{i-1}`` for the first
    ``i`` with ``p`` not in ``Omega_i`` (``l_p = 1`` if never). With ``d = a - l``,
    ``phi(a) = 1 - d * [d >= theta]`` and ``Conn = sum_{p in R} |phi(pred)_p - phi(gt)_p| / 1000``.
    """
    p, g, r = _pair(pred, gt, region)
    level = connectivity_levels(p, g, step)
    dp, dg = p - level, g - level
    phi_p = 1.0 - dp * (dp >= theta)
    phi_g = 1.0 - dg * (dg >= theta)
    return _masked_sum(np.abs(phi_p - phi_g), r) / NORM


# ------------------------------------------------------------------------------- foreground metrics
def _fg_inputs(pred_fg, gt_fg, gt_alpha, region):
    pf, gf = _color(pred_fg, "pred_fg"), _color(gt_fg, "gt_fg")
    a = _matte(gt_alpha, "gt_alpha")
    _same_size(pf, gf, "pred_fg", "gt_fg")
    _same_size(gf, a, "gt_fg", "gt_alpha")
    r = _region(region, a.shape)
    w = a * (a > 0)
    if r is not None:
        w = w * r
    return pf, gf, w


def foreground_mse(pred_fg, gt_fg, gt_alpha, region=None) -> float:
    """Alpha-weighted MSE of the straight foreground colour (0..1 units; report ``* 1e3``).

    Over pixels ``P = {p in R : gt_alpha_p > 0}``:
    ``fg_MSE = sum_{p in P} gt_alpha_p * sum_c (F^pred_pc - F^gt_pc)^2 / (3 * sum_{p in P} gt_alpha_p)``,
    i.e. the per-channel squared error averaged with weights ``gt_alpha`` (the colour of a pixel
    matters in proportion to how much of it is foreground; where ``gt_alpha = 0`` it is undefined).
    Returns 0.0 if ``P`` carries no weight.
    """
    pf, gf, w = _fg_inputs(pred_fg, gt_fg, gt_alpha, region)
    total = float(w.sum())
    if total <= 0:
        return 0.0
    err = ((pf - gf) ** 2).sum(axis=-1)
    return float((w * err).sum()) / (3.0 * total)


def foreground_sad(pred_fg, gt_fg, gt_alpha, region=None) -> float:
    """Alpha-weighted SAD of the straight foreground colour, divided by 1000 (like alpha SAD).

    ``fg_SAD = sum_{p in R, gt_alpha_p > 0} gt_alpha_p * sum_c |F^pred_pc - F^gt_pc| / 1000``
    (colours in 0..1, the three channels summed).
    """
    pf, gf, w = _fg_inputs(pred_fg, gt_fg, gt_alpha, region)
    return float((w * np.abs(pf - gf).sum(axis=-1)).sum()) / NORM


# ------------------------------------------------------------------------------------------- GSG
def _key_rgb255(key_color) -> np.ndarray:
    if isinstance(key_color, str):
        from .alpha import parse_color
        return np.asarray(parse_color(key_color), dtype=np.float64) * 255.0
    k = _to_numpy(key_color, "key_color").reshape(-1)
    if k.size != 3:
        raise UserError(f"key_color: expected 3 components, got {k.size}")
    return k * 255.0 if float(k.max()) <= 1.0 else k


def dominant_color(image, n_clusters: int = 3, sample: int = 20000, seed: int = 0) -> np.ndarray:
    """Centre (0..255 RGB) of the most populated K-Means cluster of the image's pixel colours.

    K-Means (scikit-learn, ``n_init=4``, ``random_state=seed``) runs on at most ``sample`` pixels drawn
    without replacement with a fixed-seed generator, so the result is deterministic.
    """
    from sklearn.cluster import KMeans

    img = _color(image, "image")
    px = img.reshape(-1, 3) * 255.0
    rng = np.random.default_rng(seed)
    if len(px) > sample:
        px = px[rng.choice(len(px), size=sample, replace=False)]
    k = max(1, min(int(n_clusters), len(np.unique(px, axis=0))))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(px)
    counts = np.bincount(km.labels_, minlength=k)
    return km.cluster_centers_[int(np.argmax(counts))]


def gsg(image, key_color, n_clusters: int = 3, sample: int = 20000, seed: int = 0) -> float:
    """GSG (green-screen generation) score: how far the image's dominant colour is from the key colour.

    ``GSG = || c_dom - k ||_2`` in **0..255 RGB units** (0 = the dominant colour is exactly the key;
    the maximum is ``255 * sqrt(3)`` ~ 441.7), where ``c_dom`` is :func:`dominant_color` (K-Means with
    ``n_clusters`` on a fixed-seed subsample of ``sample`` pixels) of ``image`` ``[H,W,3]`` in 0..1 and
    ``k`` is ``key_color``: ``"#00ff00"`` / ``"0,255,0"`` strings or 3 numbers (read as 0..1 if all
    are <= 1, else 0..255).
    """
    return float(np.linalg.norm(dominant_color(image, n_clusters, sample, seed) - _key_rgb255(key_color)))


# -------------------------------------------------------------------------------------- evaluate
def evaluate(pred_alpha, gt_alpha, trimap=None, pred_fg=None, gt_fg=None) -> dict:
    """All alpha metrics (and foreground metrics when both colours are given) in reporting units.

    Returns ``{"sad": SAD/1000, "mse_x1e3": MSE*1000, "grad": Grad/1000, "conn": Conn/1000,
    ["fg_mse_x1e3": fg_MSE*1000, "fg_sad": fg_SAD/1000,] "region": "unknown" | "image"}``.
    The region is the trimap's unknown region when a trimap is given (DIM convention), else the whole
    image; the foreground metrics (computed only when *both* ``pred_fg`` and ``gt_fg`` are given) use
    the same region, intersected with ``gt_alpha > 0``.
    """
    p, g = _matte(pred_alpha, "pred_alpha"), _matte(gt_alpha, "gt_alpha")
    _same_size(p, g, "pred_alpha", "gt_alpha")
    region = None
    if trimap is not None:
        t = _matte(trimap, "trimap")
        _same_size(t, g, "trimap", "gt_alpha")
        region = unknown_region(t)
    out = {
        "sad": sad(p, g, region),
        "mse_x1e3": mse(p, g, region) * 1e3,
        "grad": gradient_error(p, g, region),
        "conn": connectivity_error(p, g, region),
    }
    if pred_fg is not None and gt_fg is not None:
        out["fg_mse_x1e3"] = foreground_mse(pred_fg, gt_fg, g, region) * 1e3
        out["fg_sad"] = foreground_sad(pred_fg, gt_fg, g, region)
    out["region"] = "unknown" if region is not None else "image"
    return out


__all__ = [
    "sad", "mse", "gradient_error", "connectivity_error", "connectivity_levels", "foreground_mse",
    "foreground_sad", "gsg", "dominant_color", "unknown_region", "evaluate",
    "gaussian_derivative_kernels", "gaussian_gradient_magnitude",
]
