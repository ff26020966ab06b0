"""Plain diffusers reference sampling loop for DRIP (no ComfyUI).

:func:`make_scheduler` builds diffusers schedulers that are *the same numerical method* as ComfyUI's
samplers with its ``simple`` scheduler (SD's scaled-linear 1000-step DDPM schedule), so the two paths
can be compared latent for latent:

=============  ====================================================================================
ComfyUI        diffusers
=============  ====================================================================================
``euler``      ``EulerDiscreteScheduler(timestep_spacing="trailing")``
``ddim``       ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)`` (deterministic DDIM
               is Euler in ``x / sqrt(alpha_bar)``)
``dpmpp_2m``   ``DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint, trailing, final sigma 0)``
               (DPM-Solver++(2M), the paper's 10-step solver)
=============  ====================================================================================

``simple`` picks the training timesteps ``999, 999 - 1000/steps, ...``; diffusers' ``trailing`` spacing
rounds ``1000 - i * 1000/steps`` instead, so the two agree exactly when ``steps`` divides 1000
(1, 2, 4, 5, 8, 10, 20, 25, 40, 50).
"""

from __future__ import annotations

from typing import Callable

import torch

from .attention import cross_domain as _cross_domain_ctx
from .codes import deinterleave
from .model import drip_forward

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
COMFY_EQUIVALENT = ("euler", "ddim", "dpmpp_2m")


def make_scheduler(name: str = "dpmpp_2m", prediction_type: str = "epsilon"):
    """diffusers scheduler equivalent to ComfyUI sampler ``name`` + scheduler ``simple`` (see module doc)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    common = dict(SD_SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing")
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", lower_order_final=True,
                                           euler_at_final=False, final_sigmas_type="zero")
    raise ValueError(f"scheduler {name!r}: expected one of {COMFY_EQUIVALENT}")


def initial_noise_scale(scheduler) -> float:
    """Standard deviation of ``x_T`` for ``scheduler`` in the space its ``step`` works in.

    Sigma-space (VE) schedulers work on ``x = x0 + sigma * eps``; with unit-variance data ``x_T`` has std
    ``sqrt(1 + sigma_max^2)``. ComfyUI scales the noise so, and so does diffusers' Euler for ``leading``
    spacing, but for ``linspace``/``trailing`` spacing diffusers uses ``sigma_max`` alone (0.23 % smaller
    at SD's sigma_max 14.6). The reference follows the ``sqrt(1 + sigma_max^2)`` rule everywhere.
    VP schedulers (DDIM, DPM-Solver) start from the plain noise (scale 1) in either convention.
    """
    init = scheduler.init_noise_sigma
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and float(init) != 1.0:
        return float((float(max(sigmas)) ** 2 + 1.0) ** 0.5)
    return float(init)


def steps_match_comfy(steps: int, num_train_timesteps: int = 1000) -> bool:
    """True when diffusers' trailing timesteps equal ComfyUI's ``simple`` ones for ``steps``."""
    return steps >= 1 and num_train_timesteps % steps == 0


@torch.no_grad()
def drip_sample_reference(unet, z_image: torch.Tensor, z_trimap: torch.Tensor, noise: torch.Tensor, scheduler,
                          steps: int, text_embedding: torch.Tensor, cross_domain: bool = True,
                          callback: Callable[[int, torch.Tensor], None] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample foreground and alpha latents with a DRIP UNet and a diffusers scheduler.

    * ``z_image``, ``z_trimap``: SD-scaled VAE latents (``vae.encode(x).mean * scaling_factor``) of the
      image and of the 3-channel trimap, ``[B,4,h,w]`` (``B = 1`` broadcasts);
    * ``noise``: ``[2B,4,h,w]`` standard normal, interleaved ``[fg_0, alpha_0, fg_1, ...]`` (the layout of
      ComfyUI's DRIP latent, so the same noise reproduces a ComfyUI run);
    * ``text_embedding``: ``[1, tokens, width]`` empty-prompt embedding stored with the model.

    Returns ``(z_fg, z_alpha)``, each ``[B,4,h,w]``, SD-scaled (divide by ``scaling_factor`` to decode).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if noise.shape[0] % 2:
        raise ValueError(f"noise batch must be 2 x pairs (interleaved), got {noise.shape[0]}")
    device, dtype = noise.device, unet.dtype
    scheduler.set_timesteps(steps, device=device)
    x = noise.to(dtype) * initial_noise_scale(scheduler)
    zi, zt, emb = z_image.to(device, dtype), z_trimap.to(device, dtype), text_embedding.to(device, dtype)
    with _cross_domain_ctx(unet, cross_domain):
        for i, t in enumerate(scheduler.timesteps):
            inp = scheduler.scale_model_input(x, t)
            out = drip_forward(unet, inp, t, zi, zt, emb)
            x = scheduler.step(out, t, x).prev_sample
            if callback is not None:
                callback(i, x)
    return deinterleave(x)
