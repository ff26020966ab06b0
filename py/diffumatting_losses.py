"""DiffuMatting training losses (ECCV 2024, Sec. 3.2-3.3), ComfyUI-free (torch + diffusers' attention API).

* :func:`noise_loss` - ``L_noise``: MSE between the UNet output and the eps / v target.
* :class:`CrossAttentionMaps` + :func:`green_attention_loss` - ``L_g`` (Eq. 3): the cross-attention
  probability map of the colour token(s) ("green"), averaged over heads and over **every** cross-attention
  layer of the UNet (all resolutions, bilinearly resized to one size), pulled toward the background mask
  ``1 - M``: ``L_g = mean((A - (1 - M))^2)``. The maps are captured by our own diffusers attention
  processor (:class:`RecordingCrossAttnProcessor`, set with ``unet.set_attn_processor``); it computes
  exactly what diffusers' classic ``AttnProcessor`` computes and keeps the softmax columns of the
  selected tokens (with their autograd graph: the loss trains q/k of the cross-attention layers).
* :func:`sobel_high_frequency` / :func:`detail_loss` - ``L_detail`` (Eq. 4-6): ``H(I) = (I*Sx + I*Sy) . I . M``
  (signed Sobel responses summed, times the signal, times the mask - literally Eq. 4) compared between the
  x0 estimate of Eq. 6 (:func:`predicted_x0`) and the ground truth.

  *Our reading of the paper*: Eq. 6 is the usual DDPM x0 estimate ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``
  in the space the UNet denoises, i.e. the **latent** space; the paper never decodes it, so the default
  (``space="latent"``) applies Eq. 4 to latents with ``M`` area-resized to the latent grid. ``space="pixel"``
  (see :mod:`train_diffumatting`) decodes the estimate with the frozen VAE decoder (gradients flow through
  the decoder into the UNet) and compares with the training image at full resolution - closer to the
  paper's "image I" wording, several times more expensive.
* ``L_latent`` (Eq. 8) is :func:`matting_head.matting_head_loss` (L1 + Dice), re-exported here.

Conventions: latents/images ``[B,C,H,W]``; masks ``M`` are *foreground* (alpha, 1 = subject) ``[B,1,H,W]``
or ``[B,H,W]``; the background mask is ``1 - M``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .matting_head import matting_head_loss  # L_latent (Eq. 8), re-exported

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_Y = SOBEL_X.t().contiguous()
PREDICTIONS = ("epsilon", "v_prediction")


# ------------------------------------------------------------------------------------------ L_noise
def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """The regression target: ``noise`` (eps) or ``v = sqrt(a) eps - sqrt(1 - a) x0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type must be one of {PREDICTIONS}")
    a = _gather(alphas_cumprod, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def noise_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_noise = mean((output - target)^2)`` (float32)."""
    return F.mse_loss(model_output.float(), target.float())


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(like.device, torch.float32)[t.to(like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1)))


def predicted_x0(x_t: torch.Tensor, model_output: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """Eq. 6: ``x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)`` (eps models) or
    ``sqrt(a_t) x_t - sqrt(1 - a_t) v_hat`` (v models); differentiable in ``model_output``."""
    a = _gather(alphas_cumprod, t, x_t)
    out = model_output.float()
    if prediction_type == "epsilon":
        return (x_t.float() - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t.float() - (1 - a).sqrt() * out
    raise ValueError(f"prediction_type must be one of {PREDICTIONS}")


# ----------------------------------------------------------------------------------------- L_detail
def _mask4(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    m = mask.float()
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask: expected [B,H,W] or [B,1,H,W], got {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != tuple(size):
        shrink = m.shape[-2] >= size[0] and m.shape[-1] >= size[1]
        m = F.interpolate(m, size=size, mode="area") if shrink else \
            F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.clamp(0, 1)


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Sobel responses ``(x * Sx, x * Sy)`` (cross-correlation, replicate borders)."""
    c = x.shape[1]
    kx = SOBEL_X.to(x.device, x.dtype).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    ky = SOBEL_Y.to(x.device, x.dtype).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(xp, kx, groups=c), F.conv2d(xp, ky, groups=c)


def sobel_high_frequency(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``H = (x*Sx + x*Sy) . x . M`` with ``M`` (foreground, resized to ``x``) broadcast over channels."""
    gx, gy = sobel(x.float())
    return (gx + gy) * x.float() * _mask4(mask, x.shape[-2:])


def detail_loss(x0_pred: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Eq. 5: distance between ``H(x0_hat)`` and ``H(x0)`` (mean squared, or mean absolute with ``norm='l1'``)."""
    d = sobel_high_frequency(x0_pred, mask) - sobel_high_frequency(x0.detach(), mask)
    return d.abs().mean() if norm == "l1" else d.pow(2).mean()


# -------------------------------------------------------------------------------------------- L_g
class CrossAttentionMaps:
    """Collects the key-token attention maps of every cross-attention call of one UNet forward.

    Before the forward call :meth:`begin` with ``token_mask`` ``[B,T]`` (1 on the key tokens, e.g. every
    "green" token of each caption) and the latent size; each :class:`RecordingCrossAttnProcessor` call
    then adds ``sum_{k in key} softmax(q k^T / sqrt(d))[:, :, k]`` averaged over heads, as ``[B,h,w]``.
    :meth:`mean_map` averages all layers after resizing them (bilinear) to one size.
    """

    def __init__(self):
        self.token_mask: torch.Tensor | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.maps: list[torch.Tensor] = []
        self.enabled = False

    def begin(self, token_mask: torch.Tensor, latent_hw: tuple[int, int]) -> None:
        self.token_mask, self.latent_hw, self.maps, self.enabled = token_mask, tuple(latent_hw), [], True

    def stop(self) -> None:
        """Stop recording. The token mask stays set so that the processors keep computing (not storing) the
        same maps: gradient checkpointing re-runs the forward during backward and needs identical ops."""
        self.enabled = False

    def grid(self, n: int) -> tuple[int, int]:
        H, W = self.latent_hw
        for f in (1, 2, 4, 8, 16, 32, 64):
            if (H // f) * (W // f) == n or (-(-H // f)) * (-(-W // f)) == n:
                return (H // f, W // f) if (H // f) * (W // f) == n else (-(-H // f), -(-W // f))
        raise ValueError(f"cannot place {n} attention queries on a grid of the {H}x{W} latent")

    def key_map(self, probs: torch.Tensor, heads: int) -> torch.Tensor | None:
        """``[B,h,w]`` key-token map of ``probs`` ``[B*heads, N, T]`` (diffusers' head_to_batch_dim layout:
        batch-major), or ``None`` when the token mask does not fit this call."""
        if self.token_mask is None or self.latent_hw is None:
            return None
        BH, N, T = probs.shape
        B = BH // heads
        if tuple(self.token_mask.shape) != (B, T):
            if self.enabled:
                raise ValueError(f"token mask {tuple(self.token_mask.shape)} does not match attention batch "
                                 f"{B} x {T} tokens")
            return None
        tm = self.token_mask.to(probs.device, probs.dtype)
        a = (probs.view(B, heads, N, T) * tm[:, None, None, :]).sum(-1).mean(1)   # [B, N]
        return a.view(B, *self.grid(N))

    def add(self, probs: torch.Tensor, heads: int) -> None:
        a = self.key_map(probs, heads)
        if a is not None and self.enabled:
            self.maps.append(a)

    def mean_map(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        if not self.maps:
            raise RuntimeError("no cross-attention maps were recorded (no cross-attention layers ran)")
        size = tuple(size or self.latent_hw)
        ms = [m if tuple(m.shape[-2:]) == size else
              F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
              for m in self.maps]
        return torch.stack([m.float() for m in ms]).mean(0)


class RecordingCrossAttnProcessor:
    """A diffusers attention processor: the classic ``softmax(q k^T * scale) v`` computation, recording the
    key-token probability maps into ``store`` when ``store.enabled`` (cross-attention layers only)."""

    def __init__(self, store: CrossAttentionMaps):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch, seq, _ = (encoder_hidden_states if cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if cross:
            self.store.add(probs, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_attention_recorder(unet) -> CrossAttentionMaps:
    """Give every cross-attention layer (``attn2``) of a diffusers UNet a :class:`RecordingCrossAttnProcessor`
    sharing one :class:`CrossAttentionMaps`; self-attention keeps its processor. Returns the store."""
    store = CrossAttentionMaps()
    procs = {}
    for name, proc in unet.attn_processors.items():
        procs[name] = RecordingCrossAttnProcessor(store) if name.endswith("attn2.processor") else proc
    if not any(isinstance(p, RecordingCrossAttnProcessor) for p in procs.values()):
        raise ValueError("the UNet has no cross-attention (attn2) layers to record")
    unet.set_attn_processor(procs)
    return store


def green_attention_loss(attn_map: torch.Tensor, alpha: torch.Tensor,
                         valid: torch.Tensor | Sequence[bool] | None = None) -> torch.Tensor:
    """Eq. 3: ``mean((A - (1 - M))^2)`` with ``A`` ``[B,h,w]`` bilinearly resized to the mask ``M``
    (alpha, ``[B,H,W]`` or ``[B,1,H,W]``) resolution. ``valid`` ``[B]`` selects the samples whose caption
    has the key token (others contribute nothing); returns 0 (with a graph) when none is valid."""
    m = _mask4(alpha, alpha.shape[-2:])[:, 0]
    a = attn_map.float()
    if tuple(a.shape[-2:]) != tuple(m.shape[-2:]):
        a = F.interpolate(a[:, None], size=m.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    err = (a - (1 - m.to(a.device))).pow(2).flatten(1).mean(1)
    if valid is None:
        return err.mean()
    v = torch.as_tensor(valid, device=err.device, dtype=err.dtype)
    return (err * v).sum() / v.sum().clamp_min(1.0)


__all__ = ["PREDICTIONS", "SOBEL_X", "SOBEL_Y", "diffusion_target", "noise_loss", "predicted_x0", "sobel",
           "sobel_high_frequency", "detail_loss", "CrossAttentionMaps", "RecordingCrossAttnProcessor",
           "install_attention_recorder", "green_attention_loss", "matting_head_loss"]
