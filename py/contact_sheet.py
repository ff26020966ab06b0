"""Contact sheet: one row per image, columns image | alpha | checkerboard preview."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import alpha as A


def contact_sheet(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cell: int = 256,
                  gap: int = 4) -> torch.Tensor:
    """``rows``: (image [H,W,3], straight foreground [H,W,3], alpha [H,W]) per entry -> sheet [Hs,Ws,3].

    Each cell keeps the image's aspect ratio (fit into ``cell`` x ``cell``, centred on white)."""
    out_rows = []
    for image, fg, alpha in rows:
        prev = A.preview(fg[None], alpha[None])[0]
        cells = [image[..., :3], alpha[..., None].expand(*alpha.shape, 3), prev]
        fitted = []
        for c in cells:
            h, w = c.shape[:2]
            s = cell / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            r = F.interpolate(c.permute(2, 0, 1)[None].float(), size=(nh, nw), mode="area")[0].permute(1, 2, 0)
            canvas = torch.ones(cell, cell, 3)
            y0, x0 = (cell - nh) // 2, (cell - nw) // 2
            canvas[y0:y0 + nh, x0:x0 + nw] = r
            fitted.append(canvas)
            fitted.append(torch.ones(cell, gap, 3))
        out_rows.append(torch.cat(fitted[:-1], dim=1))
        out_rows.append(torch.ones(gap, out_rows[-1].shape[1], 3))
    return torch.cat(out_rows[:-1], dim=0).clamp(0, 1)
