"""Switcher codes and the interleaved branch layout (torch only).

The switcher of a branch is a 2-d one-hot ``e`` (foreground ``[1, 0]``, alpha ``[0, 1]``) encoded as
``PosEnc(e) = [sin(e), cos(e)]`` (4 numbers), as GeoWizard's domain switcher and ComfyUI's Lotus task
embedding do. The paper writes ``s_F = PosEnc(1)`` and ``s_alpha = PosEnc(0)``: "1" is the foreground
slot of the one-hot. The code is projected by the UNet's class embedding and added to the time embedding.

Batches are interleaved per sample: ``[fg_0, alpha_0, fg_1, alpha_1, ...]``. That is how ComfyUI tiles a
``[2, 4]`` ``y`` over a batch (``repeat_to_batch_size``) and how it stretches a ``[B, ...]`` concat latent
to ``2B`` (``resize_to_batch_size``: item ``i`` -> ``i // 2``), so one layout serves both worlds.
"""

from __future__ import annotations

import torch

FG = 0        # branch index of the straight foreground colour
ALPHA = 1     # branch index of the alpha
SWITCHER_DIM = 4


def switcher_code(branch: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[4]`` code of one branch (``FG`` or ``ALPHA``): ``[sin(e), cos(e)]`` of the one-hot ``e``."""
    if branch not in (FG, ALPHA):
        raise ValueError(f"branch must be FG ({FG}) or ALPHA ({ALPHA}), got {branch!r}")
    onehot = torch.zeros(2, dtype=torch.float64)
    onehot[branch] = 1.0
    return torch.cat([torch.sin(onehot), torch.cos(onehot)]).to(dtype=dtype, device=device)


def switcher_codes(dtype=torch.float32, device=None) -> torch.Tensor:
    """``[2, 4]``: row 0 the foreground code, row 1 the alpha code (one interleaved pair)."""
    return torch.stack([switcher_code(FG, dtype, device), switcher_code(ALPHA, dtype, device)])


def tiled_codes(pairs: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[2 * pairs, 4]`` codes for an interleaved batch of ``pairs`` samples."""
    return switcher_codes(dtype, device).repeat(pairs, 1)


def interleave(fg: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` + ``[B, ...]`` -> ``[2B, ...]`` as ``[fg_0, alpha_0, fg_1, alpha_1, ...]``."""
    if fg.shape != alpha.shape:
        raise ValueError(f"interleave: fg {tuple(fg.shape)} and alpha {tuple(alpha.shape)} differ")
    return torch.stack([fg, alpha], dim=1).reshape(fg.shape[0] * 2, *fg.shape[1:])


def deinterleave(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...]`` interleaved -> (fg ``[B, ...]``, alpha ``[B, ...]``)."""
    if x.shape[0] % 2:
        raise ValueError(f"an interleaved DRIP batch has an even size, got {x.shape[0]}")
    return x[0::2], x[1::2]


def stretch_pairs(x: torch.Tensor, pairs: int) -> torch.Tensor:
    """Per-sample tensor ``[B, ...]`` -> per-branch ``[2 * pairs, ...]`` (each sample twice, in order).

    ``B == pairs`` or ``B == 1`` (broadcast)."""
    if x.shape[0] == 1:
        return x.expand(2 * pairs, *x.shape[1:])
    if x.shape[0] != pairs:
        raise ValueError(f"{x.shape[0]} conditioning items for {pairs} foreground/alpha pairs")
    return x.repeat_interleave(2, dim=0)
