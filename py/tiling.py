"""Batches of image tiles with halos, so local (stencil / box-filter) solvers only touch the pixels that matter.

A :class:`Tiling` lays ``th x tw`` tiles on a grid anchored at some image pixel and keeps the *active*
ones (those containing a pixel of interest). Data lives either on a *canvas* (the grid area plus a
``halo`` on every side, ``[..., Hc, Wc]``; zero or a fill value outside the image) or as a batch of
tiles: interior tiles ``[N, (C,) th, tw]`` or padded tiles ``[N, (C,) th + 2 halo, tw + 2 halo]`` whose
halo overlaps the neighbouring tiles. Gathering padded tiles is one strided ``unfold`` plus one index,
so a batched stencil runs over ~(1 + 4 halo / t) times the active area instead of the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE_SIZES = (16, 32, 64, 128)


@dataclass
class Tiling:
    """Active ``th x tw`` tiles (indices ``ty, tx``, ``[N]``) of a ``nty x ntx`` grid whose pixel (0, 0) is
    image pixel ``(oy, ox)``, for an image of ``height x width``, with a ``halo`` px margin."""

    height: int
    width: int
    th: int
    tw: int
    oy: int
    ox: int
    nty: int
    ntx: int
    ty: torch.Tensor
    tx: torch.Tensor
    halo: int

    @property
    def n(self) -> int:
        return int(self.ty.numel())

    @property
    def canvas_shape(self) -> tuple[int, int]:
        return self.nty * self.th + 2 * self.halo, self.ntx * self.tw + 2 * self.halo

    @property
    def single(self) -> bool:
        """One tile covering the whole grid: the canvas *is* the padded tile."""
        return self.nty == 1 and self.ntx == 1 and self.n == 1

    def to_canvas(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Full image ``[..., H, W]`` -> canvas ``[..., Hc, Wc]`` (``fill`` outside the image)."""
        Hc, Wc = self.canvas_shape
        canvas = x.new_full((*x.shape[:-2], Hc, Wc), fill)
        y0, x0 = self.oy - self.halo, self.ox - self.halo  # image coordinates of canvas (0, 0)
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(self.height, y0 + Hc), min(self.width, x0 + Wc)
        if ye > ys and xe > xs:
            canvas[..., ys - y0:ye - y0, xs - x0:xe - x0] = x[..., ys:ye, xs:xe]
        return canvas

    def from_canvas(self, canvas: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Copy of the full image ``base`` ``[..., H, W]`` with the canvas interior (the grid) written over it."""
        h = self.halo
        out = base.clone()
        ye, xe = min(self.height, self.oy + self.nty * self.th), min(self.width, self.ox + self.ntx * self.tw)
        out[..., self.oy:ye, self.ox:xe] = canvas[..., h:h + ye - self.oy, h:h + xe - self.ox]
        return out

    def _grid(self, canvas: torch.Tensor) -> torch.Tensor:
        h = self.halo
        inner = canvas[..., h:h + self.nty * self.th, h:h + self.ntx * self.tw]
        d = inner.ndim
        return inner.unfold(d - 2, self.th, self.th).unfold(d - 1, self.tw, self.tw)  # [..., nty, ntx, th, tw]

    def read(self, canvas: torch.Tensor) -> torch.Tensor:
        """Canvas ``[(C,) Hc, Wc]`` -> interior tiles ``[N, (C,) th, tw]``."""
        g = self._grid(canvas)
        return g[self.ty, self.tx] if canvas.ndim == 2 else g[:, self.ty, self.tx].transpose(0, 1).contiguous()

    def write(self, canvas: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """Write interior tiles ``[N, (C,) th, tw]`` into the canvas ``[(C,) Hc, Wc]`` (in place)."""
        g = self._grid(canvas)
        if canvas.ndim == 2:
            g[self.ty, self.tx] = tiles
        else:
            g[:, self.ty, self.tx] = tiles.transpose(0, 1)
        return canvas

    def padded(self, canvas: torch.Tensor) -> torch.Tensor:
        """Canvas ``[(C,) Hc, Wc]`` -> padded tiles ``[N, (C,) th + 2 halo, tw + 2 halo]``."""
        if self.single:
            return canvas.unsqueeze(0)
        ph, pw = self.th + 2 * self.halo, self.tw + 2 * self.halo
        d = canvas.ndim
        view = canvas.unfold(d - 2, ph, self.th).unfold(d - 1, pw, self.tw)  # [..., nty, ntx, ph, pw]
        if d == 2:
            return view[self.ty, self.tx]
        return view[:, self.ty, self.tx].transpose(0, 1).contiguous()

    def tiles(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Full image ``[(C,) H, W]`` -> interior tiles ``[N, (C,) th, tw]``."""
        return self.read(self.to_canvas(x, fill))

    def padded_tiles(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Full image ``[(C,) H, W]`` -> padded tiles ``[N, (C,) th + 2 halo, tw + 2 halo]``."""
        return self.padded(self.to_canvas(x, fill))

    def untile(self, tiles: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Interior tiles ``[N, (C,) th, tw]`` written over a copy of the full image ``base`` ``[(C,) H, W]``."""
        return self.from_canvas(self.write(self.to_canvas(base), tiles), base)


_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbours(tl: Tiling) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For each of the 8 directions ``(dy, dx)``: the active tiles that have an active neighbour there and
    that neighbour's index, as ``(dy, dx, tiles, neighbour_tiles)`` (directions without any are left out)."""
    grid = torch.full((tl.nty + 2, tl.ntx + 2), -1, dtype=torch.long, device=tl.ty.device)
    grid[tl.ty + 1, tl.tx + 1] = torch.arange(tl.n, device=tl.ty.device)
    out = []
    for dy, dx in _DIRECTIONS:
        nb = grid[tl.ty + 1 + dy, tl.tx + 1 + dx]
        has = torch.nonzero(nb >= 0).flatten()
        if has.numel():
            out.append((dy, dx, has, nb[has]))
    return out


def halo_index(tl: Tiling, channels: int | None = None, corners: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``(dst, src)`` into a contiguous padded-tile buffer ``[N, (C,) Ph, Pw]`` such that
    ``buf.view(-1)[dst] = buf.view(-1)[src]`` refreshes every halo pixel that borders an active neighbour
    tile from that neighbour's interior (one gather + one scatter instead of one pair per direction)."""
    h, th, tw = tl.halo, tl.th, tl.tw
    ph, pw = th + 2 * h, tw + 2 * h
    c = 1 if channels is None else channels
    dev = tl.ty.device
    dst_all, src_all = [], []
    for dy, dx, dst, src in neighbours(tl):
        if not corners and dy and dx:
            continue
        dr = range(0, h) if dy < 0 else range(h + th, 2 * h + th) if dy > 0 else range(h, h + th)
        dc = range(0, h) if dx < 0 else range(h + tw, 2 * h + tw) if dx > 0 else range(h, h + tw)
        sr = range(th, th + h) if dy < 0 else range(h, 2 * h) if dy > 0 else range(h, h + th)
        sc = range(tw, tw + h) if dx < 0 else range(h, 2 * h) if dx > 0 else range(h, h + tw)
        ch = torch.arange(c, device=dev).view(1, c, 1, 1) * (ph * pw)
        d_pix = (torch.tensor(list(dr), device=dev).view(-1, 1) * pw + torch.tensor(list(dc), device=dev).view(1, -1))
        s_pix = (torch.tensor(list(sr), device=dev).view(-1, 1) * pw + torch.tensor(list(sc), device=dev).view(1, -1))
        stride = c * ph * pw
        dst_all.append((dst.view(-1, 1, 1, 1) * stride + ch + d_pix).flatten())
        src_all.append((src.view(-1, 1, 1, 1) * stride + ch + s_pix).flatten())
    if not dst_all:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    return torch.cat(dst_all), torch.cat(src_all)


def fill_halo(padded: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Refresh, in place, the halos of a contiguous padded-tile buffer from its neighbours' interiors
    (``index`` from :func:`halo_index`). Halo pixels without an active neighbour are left as they are (e.g.
    zero, or values gathered once from a fixed image)."""
    dst, src = index
    if dst.numel():
        flat = padded.view(-1)
        flat.index_copy_(0, dst, flat.index_select(0, src))  # (much faster than flat[dst] = flat[src])
    return padded


def whole_image(height: int, width: int, halo: int, device=None) -> Tiling:
    """One tile covering the whole image."""
    idx = torch.zeros(1, dtype=torch.long, device=device)
    return Tiling(height, width, height, width, 0, 0, 1, 1, idx, idx, halo)


def make_tiling(active: torch.Tensor, halo: int, tile: int | None = None,
                sizes: tuple[int, ...] = TILE_SIZES) -> Tiling:
    """Tiling covering the ``True`` pixels of ``active`` ``[H, W]``: tile size ``tile``, or the one of
    ``sizes`` whose active tiles have the least padded area, on a grid anchored at the bounding box of
    ``active`` (tiles are clipped to the box, so a small box is a single tile)."""
    H, W = active.shape
    rows = torch.nonzero(active.any(1)).flatten()
    cols = torch.nonzero(active.any(0)).flatten()
    if rows.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=active.device)
        return Tiling(H, W, 1, 1, 0, 0, 0, 0, empty, empty, halo)
    oy, ox = int(rows[0]), int(cols[0])
    bh, bw = int(rows[-1]) - oy + 1, int(cols[-1]) - ox + 1
    box = active[oy:oy + bh, ox:ox + bw]
    best = None
    for t in ([tile] if tile else sizes):
        th, tw = min(t, max(bh, 2 * halo)), min(t, max(bw, 2 * halo))  # a halo never spans two tiles
        nty, ntx = -(-bh // th), -(-bw // tw)
        grid = F.pad(box, (0, ntx * tw - bw, 0, nty * th - bh)) if (nty * th, ntx * tw) != (bh, bw) else box
        grid = grid[:nty * th, :ntx * tw]
        occ = grid.view(nty, th, ntx, tw).any(3).any(1)
        cost = int(occ.sum()) * ((th + 2 * halo) * (tw + 2 * halo) + 64)  # + a little per-tile overhead
        if best is None or cost < best[0]:
            best = (cost, th, tw, nty, ntx, occ)
    _, th, tw, nty, ntx, occ = best
    ty, tx = torch.nonzero(occ, as_tuple=True)
    return Tiling(H, W, th, tw, oy, ox, nty, ntx, ty, tx, halo)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a bool ``[H, W]`` mask by a ``(2 radius + 1)`` square (separable shifted ORs)."""
    out = mask.clone()
    for d in range(1, radius + 1):
        out[d:] |= mask[:-d]
        out[:-d] |= mask[d:]
    rows = out.clone()
    for d in range(1, radius + 1):
        out[:, d:] |= rows[:, :-d]
        out[:, :-d] |= rows[:, d:]
    return out
