"""Green-canvas generation without fine-tuning: the maths behind the DiffuMatting-style nodes.

DiffuMatting (Hu et al., 2024) fine-tunes SD so that subjects are painted on a flat, pure green canvas
(its green-background control loss, Eq. 3, ties the cross-attention map of the colour token to the
background). Its weights are not public, so this module gives the *training-free* counterparts that
work with any SD1.x / SD2.x / SDXL checkpoint, LoRA and ControlNet (ComfyUI-free; the ComfyUI faces
are in ``nodes/green_canvas.py``):

1. **Key-colour initial noise** (the idea of TKG-DM, "Training-free Chroma Key Content Generation
   Diffusion Model", CVPR 2025): the per-channel means of the initial noise are shifted toward the
   canvas latent in the *background* region (a soft mask: everything outside a centred ellipse, or
   the user's subject mask), the subject region's noise is left untouched.
   :func:`key_color_noise`.
2. **Attention-guided canvas**: the cross-attention probabilities of the key-colour token ("green")
   are recorded at every step (:class:`AttentionRecorder`), turned into a soft background mask
   (:func:`attention_to_mask`) and the background is pulled toward the canvas in the known-background
   inpainting way (:func:`canvas_blend`), with a strength that fades out before the end
   (:func:`schedule_strength`) so hair and edges are finished by the model alone.
   :class:`CanvasController` holds the state and is what a sampler hook calls.
3. Prompt helper :func:`ensure_canvas_phrase` and key-word token lookup (:func:`key_token_ids`,
   :func:`find_key_token_indices`) for tokenised prompts (weights, embeddings, several 77-token chunks).

Tensors: latents ``[B,C,H,W]`` (model space, i.e. after the latent format's ``process_in``), masks
``[B,H,W]`` in 0..1. *Background masks* are 1 on the background (where the canvas goes); *subject
masks* are 1 on the subject (the pack's alpha convention).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError


DIFFUMATTING_GREEN = (0.0, 1.0, 0.0)  # #00ff00, the DiffuMatting canvas
CANVAS_PHRASE = "pure green background"


# ------------------------------------------------------------------------------------- validation
def check_range(value, name: str, lo: float = 0.0, hi: float = 1.0) -> float:
    """``float(value)`` if it is a finite number in ``[lo, hi]``, else a :class:`UserError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a number in [{lo:g}, {hi:g}], got {value!r}") from None
    if not math.isfinite(v) or v < lo or v > hi:
        raise UserError(f"{name}: {v:g} is out of range [{lo:g}, {hi:g}]")
    return v


# ------------------------------------------------------------------------------------------ masks
def ellipse_subject_mask(height: int, width: int, size: float = 0.6, feather: float = 0.3,
                         center: tuple[float, float] = (0.5, 0.5), device=None) -> torch.Tensor:
    """Soft subject prior ``[H,W]`` (1 = subject): a centred ellipse whose axes are ``size`` times the
    image's, with a smooth (smoothstep) transition of relative width ``feather`` around its edge.

    With ``r`` the normalised elliptical radius (1 on the ellipse),
    ``m = 1 - smoothstep(1 - feather, 1 + feather, r)``.
    """
    size = check_range(size, "subject size", 0.0, 2.0)
    feather = check_range(feather, "feather", 0.0, 1.0)
    if height < 1 or width < 1:
        raise UserError(f"mask size must be positive, got {width}x{height}")
    if size == 0.0:
        return torch.zeros(height, width, device=device)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height - center[1]
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width - center[0]
    r = torch.sqrt((ys[:, None] / (size / 2)) ** 2 + (xs[None, :] / (size / 2)) ** 2)
    if feather == 0.0:
        return (r <= 1).float()
    t = ((r - (1 - feather)) / (2 * feather)).clamp(0, 1)
    return 1 - t * t * (3 - 2 * t)


def resize_mask(mask: torch.Tensor, height: int, width: int, batch: int | None = None) -> torch.Tensor:
    """Any ``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` mask -> ``[B,height,width]`` (bilinear, area-averaged
    when shrinking), with a batch of 1 broadcast to ``batch``; other batch sizes are cycled."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise UserError(f"mask: expected [H,W] or [B,H,W], got shape {tuple(mask.shape)}")
    if m.shape[-2:] != (height, width):
        shrink = m.shape[-2] > height and m.shape[-1] > width
        m = F.interpolate(m[:, None], size=(height, width), mode="area" if shrink else "bilinear",
                          align_corners=None if shrink else False)[:, 0]
    if batch is not None and m.shape[0] != batch:
        reps = -(-batch // m.shape[0])
        m = m.repeat(reps, 1, 1)[:batch]
    return m.clamp(0, 1)


def _blur_masks(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[B,H,W]`` (replicate borders); ``sigma`` in pixels, 0 = none."""
    if sigma <= 0:
        return m
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=m.device)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = (k / k.sum()).to(m.dtype)
    t = m[:, None]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return t[:, 0]


# ----------------------------------------------------------------------------- key-colour noise
def canvas_channel_means(canvas: torch.Tensor) -> torch.Tensor:
    """Per-channel mean ``[B,C]`` of a canvas latent ``[B,C,H,W]`` (a flat colour's latent is nearly
    constant; the mean ignores the VAE's border effects)."""
    if canvas.ndim != 4:
        raise UserError(f"canvas latent: expected [B,C,H,W], got shape {tuple(canvas.shape)}")
    return canvas.float().mean(dim=(2, 3))


def key_color_noise(noise: torch.Tensor, canvas: torch.Tensor, background: torch.Tensor,
                    strength: float = 1.0, noise_scale: float = 14.6, boost: float = 1.0) -> torch.Tensor:
    """TKG-DM-style key-colour initial noise.

    ``noise`` ``[B,C,H,W]`` ~ N(0, 1) is what the sampler will multiply by its first sigma
    (``noise_scale``: ``sqrt(1 + sigma_max^2)`` for SD's eps models); ``canvas`` the canvas latent in
    model space (``[1|B,C,h,w]``, only its channel means are used); ``background`` ``[1|B,H',W']`` the
    soft background mask (resized). With ``w = background`` the per-channel background mean of the
    noise ``mu_bc = sum(w * noise_bc) / sum(w)`` is moved toward the target
    ``t_c = boost * mean(canvas_c) / noise_scale``::

        noise'_bc = noise_bc + strength * w * (t_c - mu_bc)

    so that with ``strength = boost = 1`` the background of the first sampler state
    ``noise_scale * noise'`` has exactly the canvas's channel means (the key colour, "noised" to the
    first sigma) while its per-pixel fluctuations, and the whole subject region (``w = 0``), are
    unchanged. ``boost > 1`` overshoots (TKG-DM shifts the noise by a fixed fraction of its spread
    rather than by the exact canvas offset); ``strength = 0`` returns ``noise`` unchanged.
    """
    strength = check_range(strength, "noise strength", 0.0, 1.0)
    boost = check_range(boost, "boost", 0.0, 100.0)
    if noise.ndim != 4:
        raise UserError(f"noise: expected [B,C,H,W], got shape {tuple(noise.shape)}")
    if canvas.shape[1] != noise.shape[1]:
        raise UserError(f"canvas latent has {canvas.shape[1]} channels but the latent being sampled has "
                        f"{noise.shape[1]}: encode the canvas with the VAE that belongs to this model")
    if strength == 0.0:
        return noise
    B, C, H, W = noise.shape
    w = resize_mask(background.to(noise.device), H, W, B)[:, None].to(torch.float32)
    n = noise.float()
    target = canvas_channel_means(canvas.to(noise.device)) * (boost / float(noise_scale))  # [1|B,C]
    if target.shape[0] not in (1, B):
        target = target[:1]
    area = w.sum(dim=(2, 3)).clamp_min(1e-6)
    mu = (w * n).sum(dim=(2, 3)) / area  # [B,C]
    out = n + strength * w * (target - mu)[:, :, None, None]
    return out.to(noise.dtype)


# ------------------------------------------------------------------------ attention-guided canvas
def schedule_strength(progress: float, strength: float, end: float = 0.5, fade: float = 0.4) -> float:
    """Canvas strength at sampling ``progress`` (0 = first step, 1 = last).

    Full ``strength`` until ``end * (1 - fade)``, then a linear ramp down to 0 at ``end``; 0 after
    ``end`` (the model finishes hair and edges alone). ``fade = 0`` is a hard stop.
    """
    if strength <= 0 or progress >= end:
        return 0.0
    start_fade = end * (1 - fade)
    if progress <= start_fade:
        return float(strength)
    return float(strength) * (end - progress) / max(end - start_fade, 1e-8)


def normalize_maps(maps: torch.Tensor, lo_q: float = 0.02, hi_q: float = 0.98) -> torch.Tensor:
    """Per-image robust min-max normalisation of ``[B,H,W]`` maps to 0..1 (quantiles ``lo_q``/``hi_q``)."""
    flat = maps.float().flatten(1)
    lo = torch.quantile(flat, lo_q, dim=1)[:, None, None]
    hi = torch.quantile(flat, hi_q, dim=1)[:, None, None]
    return ((maps.float() - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def otsu_threshold(a: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Per-image Otsu threshold ``[B]`` of ``[B,H,W]`` values in 0..1 (maximises the between-class
    variance of the two classes ``<= t`` and ``> t`` over ``bins`` histogram levels)."""
    flat = a.float().flatten(1).clamp(0, 1)
    idx = (flat * (bins - 1)).round().long()
    hist = torch.zeros(flat.shape[0], bins, device=a.device).scatter_add_(1, idx, torch.ones_like(flat))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.linspace(0, 1, bins, device=a.device)
    w0 = p.cumsum(1)
    mu = (p * levels).cumsum(1)
    mu_t = mu[:, -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between[w0 >= 1 - 1e-9] = -1
    k = between.argmax(1)
    return (levels[k] + 0.5 / (bins - 1)).clamp(0, 1)


def attention_to_mask(maps: torch.Tensor, threshold: float | None = None, softness: float = 0.07,
                      blur: float = 1.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Background mask ``[B,H,W]`` from key-token attention maps ``[B,h,w]`` (any scale).

    ``a = normalize_maps(maps)``; ``m = sigmoid((a - t) / softness)`` (a soft threshold; ``softness = 0``
    gives a hard one) with ``t = threshold``, or per image :func:`otsu_threshold` when ``threshold`` is
    ``None``/0 (automatic); then a Gaussian blur of ``blur`` pixels at the output size ``size``
    (default: the maps' size) so the transition is smooth.
    """
    a = normalize_maps(maps)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = resize_mask(a, size[0], size[1])
    if threshold is None or threshold == 0:
        t = otsu_threshold(a)[:, None, None]
    else:
        t = check_range(threshold, "threshold", 0.0, 1.0)
    m = (a > t).float() if softness <= 0 else torch.sigmoid((a - t) / softness)
    return _blur_masks(m, blur).clamp(0, 1)


def background_core(background: torch.Tensor, margin: float = 0.08, threshold: float = 0.5) -> torch.Tensor:
    """The confident background, well away from the subject: ``background > threshold`` eroded by
    ``margin`` times the shorter side (at least 1 px), softened by a 1 px blur. ``[B,H,W]`` in 0..1."""
    from .alpha import erode

    margin = check_range(margin, "core margin", 0.0, 0.5)
    hard = (background > threshold).float()
    radius = max(1, int(round(margin * min(background.shape[-2:])))) if margin > 0 else 0
    return _blur_masks(erode(hard, radius), 1.0 if radius else 0.0).clamp(0, 1)


def canvas_blend(denoised: torch.Tensor, canvas: torch.Tensor, background: torch.Tensor,
                 strength: float) -> torch.Tensor:
    """Known-background update on the denoised estimate: ``d' = d + strength * m * (canvas - d)``.

    Blending the sampler's *denoised* prediction is the sampler-agnostic form of known-region
    inpainting (``x = m * x_canvas_noised + (1 - m) * x``): an Euler/DDIM step from ``x = c + s * eps``
    with ``d = c`` lands exactly on ``c + s' * eps``, the canvas noised to the next sigma, and
    ancestral/SDE samplers add their fresh noise on top as usual. ``canvas`` ``[1|B,C,h,w]`` is
    broadcast/resized; ``background`` ``[1|B,H,W]`` is resized to the latent.
    """
    if strength <= 0:
        return denoised
    B, C, H, W = denoised.shape
    c = canvas.to(device=denoised.device, dtype=denoised.dtype)
    if c.shape[1] != C:
        raise UserError(f"canvas latent has {c.shape[1]} channels but the model's latent has {C}: encode "
                        "the canvas with this model's VAE")
    if c.shape[-2:] != (H, W):
        c = F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False)
    if c.shape[0] != B:
        c = c.repeat(-(-B // c.shape[0]), 1, 1, 1)[:B]
    m = resize_mask(background.to(denoised.device), H, W, B)[:, None].to(denoised.dtype)
    return denoised + float(strength) * m * (c - denoised)


def noised_canvas(canvas: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``canvas + sigma * noise`` (the key colour at noise level ``sigma``, k-diffusion eps form)."""
    s = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device).reshape(-1, *([1] * (noise.ndim - 1)))
    return canvas.to(noise) + s * noise


# --------------------------------------------------------------------------------- prompt + tokens
def ensure_canvas_phrase(prompt: str, phrase: str = CANVAS_PHRASE) -> str:
    """Append ``phrase`` (", pure green background") unless the prompt already says it.

    The check ignores case, ComfyUI weight syntax ``(green background:1.2)`` and punctuation, so
    ``"a cat, (pure green background:1.3)"`` is left alone.
    """
    phrase = (phrase or "").strip()
    if not phrase:
        return prompt
    norm = lambda s: " ".join(re.sub(r"[^\w]+", " ", re.sub(r":\s*[\d.]+\s*\)", ")", s.lower())).split())
    if norm(phrase) in norm(prompt or ""):
        return prompt
    base = (prompt or "").rstrip().rstrip(",").rstrip()
    return f"{base}, {phrase}" if base else phrase


def _token_id(entry):
    """The int token id of a tokenizer entry (``id``, ``(id, weight)``, ``(id, weight, word_id)``);
    ``None`` for embeddings (tensors) and anything else that is not a plain id."""
    tok = entry[0] if isinstance(entry, (tuple, list)) else entry
    if isinstance(tok, bool):
        return None
    if isinstance(tok, int):
        return tok
    if isinstance(tok, torch.Tensor) and tok.ndim == 0 and not tok.is_floating_point():
        return int(tok)
    return None


def key_token_ids(key_chunks: Sequence[Sequence], empty_chunks: Sequence[Sequence]) -> list[int]:
    """Token ids of a key word from the tokenisation of the word alone and of the empty prompt.

    ``empty_chunks`` gives the special tokens (``[start, end, pad, ...]``); the key's ids are the
    entries after ``start`` up to the first ``end`` (works whether padding uses the end token, as in
    SD1.5's CLIP-L, or 0, as in SDXL's CLIP-G)."""
    if not key_chunks or not empty_chunks or len(empty_chunks[0]) < 2:
        return []
    end = _token_id(empty_chunks[0][1])
    ids = [_token_id(e) for e in key_chunks[0]]
    out = []
    for t in ids[1:]:
        if t is None or t == end:
            break
        out.append(t)
    return out


def find_key_token_indices(prompt_chunks: Sequence[Sequence], key_ids: Sequence[int],
                           chunk_len: int | None = None) -> list[int]:
    """Positions of ``key_ids`` (as a contiguous run) in a tokenised prompt, as indices into the text
    encoder's output sequence (chunk ``i`` occupies ``[i * chunk_len, (i + 1) * chunk_len)``).

    ``prompt_chunks`` is a list of chunks of tokenizer entries (``id`` or ``(id, weight[, word_id])``,
    as ComfyUI's ``clip.tokenize`` returns per encoder); weights are ignored and embedding vectors never
    match, but keep their positions. Every token of every match is returned, sorted."""
    key = [int(k) for k in key_ids]
    if not key:
        return []
    out: list[int] = []
    for ci, chunk in enumerate(prompt_chunks):
        L = chunk_len if chunk_len is not None else len(chunk)
        ids = [_token_id(e) for e in chunk]
        for p in range(0, len(ids) - len(key) + 1):
            if ids[p:p + len(key)] == key:
                out.extend(ci * L + p + j for j in range(len(key)))
    return sorted(set(out))


# ------------------------------------------------------------------------------------- recording
class AttentionRecorder:
    """Accumulates the key token's cross-attention probabilities per step, batch element and
    cond/uncond chunk.

    ``add(probs, hw, cond_or_uncond, size)`` takes one attention call's probabilities
    ``[Bt, heads, N, T]`` (``Bt = len(cond_or_uncond) * B``, chunk ``j`` in rows ``j*B:(j+1)*B``,
    ``N = h*w`` query pixels, ``T`` context tokens), sums the key token columns (including the repeats
    that appear when ComfyUI tiles a shorter prompt to a longer one's length), averages the heads,
    reshapes to ``[B,h,w]``, resizes to the latent ``size`` and adds it to the running sum of that chunk
    kind (0 = cond, 1 = uncond). :meth:`maps` returns ``{kind: [B,H,W]}`` averaged over the layers of
    the current step.
    """

    def __init__(self, token_indices: Sequence[int], prompt_len: int | None = None):
        self.token_indices = sorted(int(i) for i in token_indices)
        self.prompt_len = prompt_len
        self.reset()

    def reset(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.skipped = 0

    def columns(self, T: int) -> list[int]:
        idx = [i for i in self.token_indices if i < T]
        L = self.prompt_len
        if L and T > L and T % L == 0:
            idx = [i + k * L for k in range(T // L) for i in idx if i < L]
        return sorted(set(idx))

    def key_columns(self, probs: torch.Tensor) -> torch.Tensor | None:
        """``[Bt, N]``: the key columns of ``probs`` ``[Bt, heads, N, T]`` summed, heads averaged."""
        cols = self.columns(probs.shape[-1])
        if not cols:
            self.skipped += 1
            return None
        return probs[..., cols].float().sum(-1).mean(1)

    def add(self, probs: torch.Tensor, hw: tuple[int, int], cond_or_uncond: Sequence[int],
            size: tuple[int, int]) -> None:
        a = self.key_columns(probs)
        if a is not None:
            self.add_key_map(a, hw, cond_or_uncond, size)

    def add_key_map(self, a: torch.Tensor, hw: tuple[int, int], cond_or_uncond: Sequence[int],
                    size: tuple[int, int]) -> None:
        h, w = hw
        n_chunks = max(1, len(cond_or_uncond))
        if a.shape[0] % n_chunks or a.shape[1] != h * w:
            self.skipped += 1
            return
        B = a.shape[0] // n_chunks
        m = a.reshape(a.shape[0], h, w)
        if (h, w) != tuple(size):
            m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        for j, kind in enumerate(cond_or_uncond):
            part = m[j * B:(j + 1) * B].detach()
            kind = int(kind)
            if kind not in self.sums:
                self.sums[kind], self.counts[kind] = part.clone(), 1
            elif self.sums[kind].shape == part.shape:
                self.sums[kind] = self.sums[kind] + part
                self.counts[kind] += 1
            else:  # e.g. an area-restricted conditioning: another batch/size, not mixed in
                self.skipped += 1

    def maps(self) -> dict[int, torch.Tensor]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


@dataclass
class CanvasController:
    """Sampler-side state of the attention-guided canvas (one sampling run at a time).

    ``canvas``: canvas latent in model space; ``recorder``: fed by the attention hook (``None``:
    attention read-out disabled, then ``fixed_background`` — the user's mask or the noise prior — is
    used if given, else the canvas is not applied). Call :meth:`post_cfg` with the sampler's denoised
    estimate at each step; the attention hook must call :meth:`begin_step` before it records.

    Blend weight per pixel: ``max(schedule_strength(progress) * m, hold * core(m))`` with ``m`` the
    background mask and ``core`` :func:`background_core` (the background ``core_margin`` away from the
    subject). ``hold = 0`` stops everything at ``end``; ``hold > 0`` keeps the far background on the
    canvas to the last step (a flat key colour) while the band around the subject, where hair and
    edges are, is left to the model after ``end``.
    """

    canvas: torch.Tensor
    recorder: AttentionRecorder | None = None
    strength: float = 0.8
    end: float = 0.5
    fade: float = 0.4
    threshold: float = 0.0  # 0 = automatic (Otsu per image)
    softness: float = 0.07
    blur: float = 1.0
    fixed_background: torch.Tensor | None = None
    hold: float = 0.0
    core_margin: float = 0.08
    last_sigma: float | None = field(default=None, init=False)
    run_key: object = field(default=None, init=False)
    accum: torch.Tensor | None = field(default=None, init=False)
    n_accum: int = field(default=0, init=False)
    last_mask: torch.Tensor | None = field(default=None, init=False)
    history: list = field(default_factory=list, init=False)

    def __post_init__(self):
        self.strength = check_range(self.strength, "canvas strength", 0.0, 1.0)
        self.end = check_range(self.end, "end_at", 0.0, 1.0)
        self.fade = check_range(self.fade, "fade", 0.0, 1.0)
        self.threshold = check_range(self.threshold, "threshold", 0.0, 1.0)
        self.hold = check_range(self.hold, "hold", 0.0, 1.0)
        self.core_margin = check_range(self.core_margin, "core margin", 0.0, 0.5)

    # -- run bookkeeping
    def begin_step(self, sigma: float, run_key=None) -> None:
        """Called by the attention hook (before recording) and by :meth:`post_cfg`. A new ``run_key``
        (e.g. the id of the run's sigma schedule) or a sigma above the previous one starts a new
        sampling run (state reset); a new sigma starts a new step."""
        new_run = (run_key is not None and run_key != self.run_key) or (
            self.last_sigma is not None and sigma > self.last_sigma * (1 + 1e-6))
        if self.last_sigma is None or new_run:
            self.run_key = run_key
            self.last_sigma = None
            self.accum, self.n_accum, self.last_mask = None, 0, None
            self.history = []
        if self.last_sigma is None or abs(sigma - self.last_sigma) > 1e-9 * max(1.0, abs(sigma)):
            if self.recorder is not None:
                self.recorder.reset()
            self.last_sigma = sigma

    def recording(self, progress: float) -> bool:
        return self.recorder is not None and schedule_strength(progress, self.strength, self.end, self.fade) > 0

    def current_mask(self, size: tuple[int, int], batch: int) -> torch.Tensor | None:
        """Background mask for this step: the running mean (over steps) of normalised cond attention
        maps, soft-thresholded and smoothed; or the fixed background."""
        if self.recorder is not None:
            maps = self.recorder.maps()
            cond = maps.get(0)
            if cond is not None and cond.shape[0] == batch:
                a = normalize_maps(cond)
                if self.accum is None or self.accum.shape != a.shape:
                    self.accum, self.n_accum = a, 1
                else:
                    self.accum, self.n_accum = self.accum + a, self.n_accum + 1
                self.recorder.reset()
            if self.accum is not None:
                m = attention_to_mask(self.accum / self.n_accum, self.threshold, self.softness, self.blur, size)
                self.last_mask = m
                return m
            return self.last_mask
        if self.fixed_background is not None:
            return resize_mask(self.fixed_background, size[0], size[1], batch)
        return None

    def post_cfg(self, denoised: torch.Tensor, sigma: float, progress: float, run_key=None) -> torch.Tensor:
        self.begin_step(sigma, run_key)
        s = schedule_strength(progress, self.strength, self.end, self.fade)
        B, _, H, W = denoised.shape
        m = self.current_mask((H, W), B) if (s > 0 or self.hold > 0 or self.recorder is not None) else None
        self.history.append((float(sigma), float(progress), s))
        if m is None or (s <= 0 and self.hold <= 0):
            return denoised
        w = m * s
        if self.hold > 0:
            w = torch.maximum(w, self.hold * background_core(m, self.core_margin))
        return canvas_blend(denoised, self.canvas, w, 1.0)


def progress_from_sigmas(sigma: float, sample_sigmas: torch.Tensor | Sequence[float] | None) -> float | None:
    """Step fraction of ``sigma`` in a descending schedule (index of the nearest sigma / number of
    steps); ``None`` without a schedule."""
    if sample_sigmas is None:
        return None
    s = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten()
    if s.numel() < 2:
        return None
    i = int(torch.argmin((s - float(sigma)).abs()))
    return i / (s.numel() - 1)


__all__: Iterable[str] = (
    "DIFFUMATTING_GREEN", "CANVAS_PHRASE", "check_range", "ellipse_subject_mask", "resize_mask",
    "canvas_channel_means", "key_color_noise", "schedule_strength", "normalize_maps", "otsu_threshold", "attention_to_mask",
    "background_core", "canvas_blend", "noised_canvas", "ensure_canvas_phrase", "key_token_ids", "find_key_token_indices",
    "AttentionRecorder", "CanvasController", "progress_from_sigmas",
)
