"""Cross-domain attention for diffusers UNets (DRIP's joint foreground/alpha self-attention).

In every self-attention (``attn1``) each branch's queries attend over the keys/values of *both* branches
of the same sample: ``Att(W_q h_i, W_k [h_F; h_alpha], W_v [h_F; h_alpha])``, no new weights. With the
interleaved batch ``[fg_0, alpha_0, fg_1, alpha_1, ...]`` a pair is two consecutive items, so viewing the
projected ``[2B, N, C]`` tensors as ``[B, 2N, C]`` *is* the joint attention (the ``2N`` queries of a pair
see the ``2N`` keys of the pair) and costs no copy.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def pair_view(x: torch.Tensor) -> torch.Tensor:
    """``[2B, N, C]`` -> ``[B, 2N, C]`` (a pair's tokens side by side); raises on an odd batch."""
    b, n, c = x.shape
    if b % 2:
        raise ValueError(f"cross-domain attention needs [fg, alpha] pairs: batch {b} is odd")
    return x.reshape(b // 2, 2 * n, c)


def joint_attention_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Joint attention written out literally (for tests): ``q, k, v`` are projected ``[2B, N, C]``;
    output ``[2B, N, C]`` where item ``i`` attends over ``cat(k[pair(i)])`` / ``cat(v[pair(i)])``."""
    b, n, c = q.shape
    d = c // heads
    out = torch.empty_like(q)
    for i in range(b):
        j = i - i % 2
        kk = torch.cat([k[j], k[j + 1]], dim=0)          # [2N, C]
        vv = torch.cat([v[j], v[j + 1]], dim=0)
        qh = q[i].view(n, heads, d).transpose(0, 1)       # [h, N, d]
        kh = kk.view(2 * n, heads, d).transpose(0, 1)     # [h, 2N, d]
        vh = vv.view(2 * n, heads, d).transpose(0, 1)
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[i] = (w @ vh).transpose(0, 1).reshape(n, c)
    return out


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Fast joint attention of projected ``[2B, N, C]`` tensors (SDPA over the pair view)."""
    b, n, c = q.shape
    d = c // heads
    qp, kp, vp = (pair_view(t).view(b // 2, 2 * n, heads, d).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qp, kp, vp)
    return o.transpose(1, 2).reshape(b, n, c)


class CrossDomainAttnProcessor:
    """diffusers attention processor for ``attn1``: joint attention over each ``[fg, alpha]`` pair."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("CrossDomainAttnProcessor belongs on self-attention (attn1) only")
        if attention_mask is not None:
            raise ValueError("CrossDomainAttnProcessor does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            bb, ch, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(bb, ch, hh * ww).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        b, n, c = q.shape
        heads = attn.heads
        d = c // heads
        qp, kp, vp = (pair_view(t).view(b // 2, 2 * n, heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            qp = attn.norm_q(qp)
        if attn.norm_k is not None:
            kp = attn.norm_k(kp)
        o = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=0.0, is_causal=False, scale=attn.scale)
        o = o.transpose(1, 2).reshape(b, n, c).to(q.dtype)
        o = attn.to_out[0](o)
        o = attn.to_out[1](o)
        if input_ndim == 4:
            o = o.transpose(-1, -2).reshape(bb, ch, hh, ww)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


def attn1_modules(unet) -> dict[str, torch.nn.Module]:
    """The self-attention modules of a diffusers UNet (``...transformer_blocks.N.attn1``)."""
    return {name: m for name, m in unet.named_modules() if name.endswith(".attn1")}


def set_cross_domain(unet, enabled: bool = True) -> int:
    """Install (or remove: back to diffusers' default processor) cross-domain attention on every
    ``attn1``. Returns the number of attention layers changed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    mods = attn1_modules(unet)
    for m in mods.values():
        m.set_processor(CrossDomainAttnProcessor() if enabled else AttnProcessor2_0())
    return len(mods)


def cross_domain_enabled(unet) -> bool:
    mods = attn1_modules(unet)
    return bool(mods) and all(isinstance(m.processor, CrossDomainAttnProcessor) for m in mods.values())


@contextmanager
def cross_domain(unet, enabled: bool = True):
    """Context manager: cross-domain attention on (or off) inside, the previous processors restored after."""
    mods = attn1_modules(unet)
    saved = {n: m.processor for n, m in mods.items()}
    set_cross_domain(unet, enabled)
    try:
        yield unet
    finally:
        for n, m in mods.items():
            m.set_processor(saved[n])
