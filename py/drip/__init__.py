"""DRIP (NeurIPS 2024): joint foreground + alpha sampling with a Stable Diffusion UNet.

No code or weights were released by the authors; this package is our reading of the paper.

* One DRIP UNet serves two *branches* per sample: the straight foreground colour ``F`` and the alpha.
  The noisy latent of a branch is concatenated with the VAE latents of the image ``X`` and of the
  trimap: UNet input ``[z_t, z_X, z_Tri]`` (12 channels; the paper writes ``[z_X, z_Tri, z_t]``; the order
  is a permutation of conv_in's input channels and ours is the one ComfyUI's ``c_concat`` produces).
* A *switcher* code tells the branches apart: a sin/cos encoding of a 2-d one-hot (as GeoWizard and
  ComfyUI's Lotus), projected and added to the time embedding (diffusers ``class_embedding`` of type
  ``"projection"`` == ComfyUI ``label_emb`` with ``num_classes="sequential"``), see :mod:`.codes`.
* Cross-domain attention: every self-attention (``attn1``) lets each branch's queries attend over the
  keys/values of *both* branches of the same sample, see :mod:`.attention`.
* Batches are interleaved ``[fg0, a0, fg1, a1, ...]``.

ComfyUI-free modules: :mod:`.codes`, :mod:`.convert`, :mod:`.checkpoint`, :mod:`.noise` (torch + safetensors).
:mod:`.model`, :mod:`.attention` and :mod:`.sampling` need ``diffusers`` (the ``train`` extra); they are
not imported here so the ComfyUI nodes work without diffusers.
"""

from .codes import (ALPHA, FG, SWITCHER_DIM, deinterleave, interleave, switcher_code, switcher_codes,
                    tiled_codes)

__all__ = ["ALPHA", "FG", "SWITCHER_DIM", "deinterleave", "interleave", "switcher_code", "switcher_codes",
           "tiled_codes"]
