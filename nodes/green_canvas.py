"""DiffuMatting-style green-canvas generation with any SD1.x / SD2.x / SDXL checkpoint, LoRA and ControlNet.

Graph: Checkpoint Loader -> LoRA Loader(s) -> **Green Canvas Model** -> KSampler / SamplerCustom, with
ControlNet Apply on the conditioning (in any order). The maths lives in ``py/green_canvas.py``.

* **Canvas Latent**: the key colour (default DiffuMatting #00ff00) encoded with *your* VAE.
* **Green Canvas Noise**: key-colour initial noise (TKG-DM) as a NOISE for SamplerCustom(Advanced), and
  as a LATENT for KSamplerAdvanced with ``add_noise = disable`` (the latent already *is* the noisy start).
* **Green Canvas Model**: a MODEL clone whose attn2 patches read the key token's cross-attention and
  whose post-CFG hook pulls the background toward the canvas during the first steps.
* **Append Canvas Phrase**, **Green Canvas Sample** (all-in-one) and **GSG** (score a batch).

Every hook is an official ModelPatcher patch on a clone (``set_model_attn2_replace``,
``set_model_sampler_post_cfg_function``); nothing global is changed.
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..py import green_canvas as G
from ..py.alpha import parse_color
from ..py.errors import UserError
from ._common import log, out_device

CATEGORY = "matting/diffumatting"
SUPPORTED = ("SD1.x, SD2.x, SDXL (base/refiner), SSD-1B/Vega and other UNet checkpoints with text "
             "cross-attention, with any LoRA and ControlNet")
HOLD_TIP = ("After end_at, keep the far background (core_margin away from the subject) on the canvas to the last "
            "step, so it is a flat key colour; the band around the subject (hair, edges) is left to the model. 0 = off.")
MARGIN_TIP = "Distance kept free around the subject by hold_background, as a fraction of the image's shorter side."
SUBJECT_MASK_TIP = ("Optional subject mask (alpha convention: 1 = subject, 0 = background); any size, "
                    "resized to the latent. ComfyUI's LoadImage mask is 1 - alpha: invert it first.")


# --------------------------------------------------------------------------------------- helpers
def _color(text: str) -> tuple[float, float, float]:
    try:
        return tuple(float(c) for c in parse_color(text))
    except UserError:
        raise
    except Exception as e:  # pragma: no cover - parse_color raises UserError for bad text
        raise UserError(f"colour {text!r}: {e}") from None


def _latent_channels(model) -> int | None:
    fmt = getattr(model.model, "latent_format", None)
    return getattr(fmt, "latent_channels", None)


def canvas_in_model_space(model, canvas: dict) -> torch.Tensor:
    """The canvas LATENT (VAE space, as VAEEncode gives it) in the model's space (``process_in``)."""
    if not isinstance(canvas, dict) or "samples" not in canvas:
        raise UserError("canvas: expected a LATENT (connect Canvas Latent)")
    s = canvas["samples"]
    if s.ndim != 4:
        raise UserError(f"canvas latent: expected [B,C,H,W], got {tuple(s.shape)} (video latents are not supported)")
    ch = _latent_channels(model)
    if ch is not None and s.shape[1] != ch:
        raise UserError(f"latent/VAE mismatch: the canvas latent has {s.shape[1]} channels but this model's latent "
                        f"space has {ch}; encode the canvas with the VAE of this checkpoint")
    return model.model.process_latent_in(s.float()).float()


def noise_scale(model) -> float:
    """What the sampler multiplies unit noise by at the first step of a full denoise."""
    ms = model.get_model_object("model_sampling")
    smax = float(ms.sigma_max)
    if isinstance(ms, comfy.model_sampling.CONST):
        return smax
    return float((1.0 + smax ** 2) ** 0.5)


def _attention_blocks(unet) -> list[tuple[str, int, int]]:
    """``(block_name, index, downscale)`` of every UNet block holding a cross-attention SpatialTransformer."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    def kinds(block):
        mods = list(block.modules())
        return (any(isinstance(m, SpatialTransformer) for m in mods), any(isinstance(m, Downsample) for m in mods),
                any(isinstance(m, Upsample) for m in mods))

    out, ds = [], 1
    for i, blk in enumerate(unet.input_blocks):
        has_st, down, _ = kinds(blk)
        if down:
            ds *= 2
        if has_st:
            out.append(("input", i, ds))
    if kinds(unet.middle_block)[0]:
        out.append(("middle", 0, ds))
    for i, blk in enumerate(unet.output_blocks):
        has_st, _, up = kinds(blk)
        if has_st:
            out.append(("output", i, ds))
        if up:
            ds = max(1, ds // 2)
    return out


def check_supported(model) -> None:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = getattr(model.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel) or not _attention_blocks(unet):
        name = type(model.model).__name__ + "/" + type(unet).__name__
        raise UserError(f"Green Canvas Model: unsupported model family ({name}). Supported: {SUPPORTED}. "
                        "Canvas Latent and Green Canvas Noise work with any latent model.")


def key_token_indices(clip, prompt: str, key_word: str) -> tuple[list[int], int]:
    """Indices of ``key_word``'s tokens in ``prompt`` as encoded by ``clip`` (weights and embeddings
    allowed) and the prompt's encoded length; ``([], 0)`` if absent."""
    if clip is None or not (prompt or "").strip() or not (key_word or "").strip():
        return [], 0
    tokens = clip.tokenize(prompt)
    key = clip.tokenize(key_word.strip())
    empty = clip.tokenize("")
    enc = "l" if "l" in tokens else next(iter(tokens))
    chunks = tokens[enc]
    chunk_len = len(chunks[0]) if chunks else 77
    ids = G.key_token_ids(key[enc], empty[enc])
    return G.find_key_token_indices(chunks, ids, chunk_len), chunk_len * len(chunks)


class _Shared:
    """Objects referenced from model_options must survive ModelPatcher.clone()'s deepcopy as the same
    instance (state is shared between the attention patch and the post-CFG hook)."""

    def __deepcopy__(self, memo):
        return self


class CanvasAttention(_Shared):
    """attn2 replace patch: computes the block's cross-attention as usual (calling a previously set
    replace patch if there was one, else ComfyUI's optimized attention) and, while the canvas is
    active, records the key token's softmax probabilities into the controller's recorder."""

    def __init__(self, controller: G.CanvasController, previous=None):
        self.controller = controller
        self.previous = previous
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules import attention as A

        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = A.optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))
        ctrl = self.controller
        rec = ctrl.recorder
        if rec is None:
            return out
        sigmas = extra_options.get("sigmas")
        sample_sigmas = extra_options.get("sample_sigmas")
        sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else float(sigmas or 0.0)
        progress = G.progress_from_sigmas(sigma, sample_sigmas)
        if progress is None:
            progress = 0.0
        ctrl.begin_step(sigma, id(sample_sigmas) if sample_sigmas is not None else None)
        if not ctrl.recording(progress):
            return out
        cols = rec.columns(k.shape[1])
        shape = extra_options.get("activations_shape")
        orig = extra_options.get("original_shape")
        if not cols or shape is None or orig is None:
            rec.skipped += 1
            return out
        heads = extra_options["n_heads"]
        B, N, D = q.shape
        dh = D // heads
        with torch.no_grad():
            qh = q.reshape(B, N, heads, dh).transpose(1, 2).float()
            kh = k.reshape(k.shape[0], -1, heads, dh).transpose(1, 2).float()
            logits = qh @ kh.transpose(-1, -2) * (dh ** -0.5)  # [B,h,N,T]
            probs_key = torch.exp(logits[..., cols] - torch.logsumexp(logits, dim=-1, keepdim=True)).sum(-1).mean(1)
            rec.add_key_map(probs_key, (int(shape[-2]), int(shape[-1])), extra_options.get("cond_or_uncond", [0]),
                            (int(orig[-2]), int(orig[-1])))
        self.calls += 1
        return out


class CanvasPostCFG(_Shared):
    """sampler_post_cfg_function: blends the denoised estimate toward the canvas in the background."""

    def __init__(self, controller: G.CanvasController):
        self.controller = controller

    def __call__(self, args):
        denoised = args["denoised"]
        sigma_t = args["sigma"]
        sigma = float(sigma_t.max()) if isinstance(sigma_t, torch.Tensor) else float(sigma_t)
        to = (args.get("model_options") or {}).get("transformer_options", {})
        sample_sigmas = to.get("sample_sigmas")
        progress = G.progress_from_sigmas(sigma, sample_sigmas)
        if progress is None:
            ms = args["model"].model_sampling
            progress = 1.0 - float(ms.timestep(torch.tensor([sigma])).item()) / 999.0
        if denoised.ndim != 4:
            return denoised
        return self.controller.post_cfg(denoised, sigma, progress, id(sample_sigmas) if sample_sigmas is not None else None)


def patch_model(model, canvas: dict, clip=None, prompt: str = "", key_word: str = "green", strength: float = 0.8,
                end_at: float = 0.5, threshold: float = 0.0, subject_mask: torch.Tensor | None = None,
                layers: str = "coarse", hold_background: float = 1.0, core_margin: float = 0.08):
    """Clone ``model`` and install the attention-guided canvas. Returns ``(model_clone, controller)``."""
    check_supported(model)
    strength = G.check_range(strength, "strength")
    end_at = G.check_range(end_at, "end_at")
    threshold = G.check_range(threshold, "threshold")
    canvas_m = canvas_in_model_space(model, canvas)
    recorder = None
    fixed = None
    if subject_mask is not None:
        fixed = 1.0 - G.resize_mask(subject_mask, *subject_mask.shape[-2:])
        log.info("Green Canvas Model: using the given subject mask instead of the attention estimate")
    else:
        idx, prompt_len = key_token_indices(clip, prompt, key_word)
        if idx:
            recorder = G.AttentionRecorder(idx, prompt_len)
            log.info("Green Canvas Model: key word %r -> token indices %s", key_word, idx)
        elif clip is None or not (prompt or "").strip():
            log.warning("Green Canvas Model: no clip/prompt connected, attention control disabled "
                        "(connect the CLIP and the positive prompt text, or a subject mask)")
        else:
            log.warning("Green Canvas Model: key word %r not found in the prompt, attention control disabled "
                        "(key-colour noise still works; add the word, e.g. with Append Canvas Phrase)", key_word)
    ctrl = G.CanvasController(canvas_m, recorder, strength=strength, end=end_at, threshold=threshold,
                              fixed_background=fixed, hold=G.check_range(hold_background, "hold_background"),
                              core_margin=G.check_range(core_margin, "core_margin", 0.0, 0.5))
    m = model.clone()
    if recorder is not None:
        unet = m.model.diffusion_model
        blocks = _attention_blocks(unet)
        if layers == "coarse":
            coarse = [b for b in blocks if b[2] >= 2]
            blocks = coarse or blocks
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for name, i, _ in blocks:
            m.set_model_attn2_replace(CanvasAttention(ctrl, replaces.get((name, i))), name, i)
    m.set_model_sampler_post_cfg_function(CanvasPostCFG(ctrl))
    return m, ctrl


class KeyColorNoise:
    """NOISE object (SamplerCustom / SamplerCustomAdvanced): seeded noise, key-colour shifted."""

    def __init__(self, seed: int, canvas_m: torch.Tensor, subject_prior, strength: float, boost: float, scale: float):
        self.seed = seed
        self.canvas_m = canvas_m
        self.subject_prior = subject_prior  # callable (H, W, B) -> subject mask [B,H,W]
        self.strength, self.boost, self.scale = strength, boost, scale

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        batch_inds = input_latent.get("batch_index")
        n = comfy.sample.prepare_noise(samples, self.seed, batch_inds)
        if n.ndim != 4:
            log.warning("Green Canvas Noise: %dD latents are not supported, plain noise used", n.ndim)
            return n
        B, C, H, W = n.shape
        bg = 1.0 - self.subject_prior(H, W, B)
        return G.key_color_noise(n, self.canvas_m, bg, self.strength, self.scale, self.boost)


def subject_prior_fn(subject_mask, size: float, feather: float):
    G.check_range(size, "subject_size", 0.0, 2.0)
    G.check_range(feather, "feather")

    def fn(H, W, B):
        if subject_mask is not None:
            return G.resize_mask(subject_mask, H, W, B)
        return G.ellipse_subject_mask(H, W, size, feather)[None].expand(B, H, W)
    return fn


def encode_canvas(vae, color: str, width: int, height: int, batch: int) -> dict:
    """Flat ``color`` encoded with ``vae``: a 256 px tile (or the image if smaller) is encoded and the
    per-channel mean of its central half (away from the VAE's border effects) fills the latent."""
    rgb = _color(color)
    r = int(vae.spacial_compression_encode())
    if width < r or height < r:
        raise UserError(f"canvas size {width}x{height} is smaller than the VAE's factor {r}")
    tw, th = min(width, 256) // r * r, min(height, 256) // r * r
    pixels = torch.tensor(rgb, dtype=torch.float32).view(1, 1, 1, 3).expand(1, th, tw, 3).contiguous()
    lat = vae.encode(pixels)
    if lat.ndim != 4:
        raise UserError(f"Canvas Latent: this VAE gives {lat.ndim}D latents; only image VAEs are supported")
    h, w = lat.shape[-2:]
    cen = lat[:, :, h // 4: h - h // 4 or h, w // 4: w - w // 4 or w].float().mean(dim=(0, 2, 3))
    samples = cen.view(1, -1, 1, 1).expand(batch, -1, height // r, width // r).contiguous()
    return {"samples": samples.to(out_device())}


# ------------------------------------------------------------------------------------------ nodes
class CanvasLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_CanvasLatent",
            display_name="Canvas Latent (key colour)",
            category=CATEGORY,
            description="The key colour encoded with the connected VAE (right for SD1.5, SDXL or any latent space). "
                        "Feed it to Green Canvas Noise / Model, or use it as the latent of an img2img pass.",
            inputs=[
                io.Vae.Input("vae"),
                io.String.Input("color", default="#00ff00", tooltip="Key colour: '#rrggbb' or 'R,G,B'. DiffuMatting uses pure green #00ff00."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8),
                io.Int.Input("batch_size", default=1, min=1, max=4096),
            ],
            outputs=[io.Latent.Output("canvas", display_name="canvas")],
        )

    @classmethod
    def execute(cls, vae, color, width, height, batch_size) -> io.NodeOutput:
        return io.NodeOutput(encode_canvas(vae, color, width, height, batch_size))


class GreenCanvasNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_GreenCanvasNoise",
            display_name="Green Canvas Noise (key-colour initial noise)",
            category=CATEGORY,
            description="TKG-DM key-colour initial noise: the background region's noise has its channel means moved to the "
                        "canvas latent's (noised to the first sigma), the subject region (centred ellipse or your mask) is "
                        "left free. NOISE -> SamplerCustom / SamplerCustomAdvanced. noisy_latent -> KSamplerAdvanced with "
                        "add_noise = disable, start_at_step = 0 (the latent already holds the scaled noise; eps/v models).",
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("canvas", tooltip="From Canvas Latent (same VAE as the model)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05, tooltip="0 = plain noise, 1 = background means exactly at the (boosted) target."),
                io.Float.Input("boost", default=2.0, min=0.0, max=20.0, step=0.1, tooltip="Multiplies the shift (1 = the canvas noised to sigma_max exactly; TKG-DM-like pushes use more)."),
                io.Float.Input("subject_size", default=0.6, min=0.0, max=2.0, step=0.05, tooltip="Ellipse axes as a fraction of the image (the subject region left free)."),
                io.Float.Input("feather", default=0.35, min=0.0, max=1.0, step=0.05, tooltip="Relative width of the smooth subject/background transition."),
                io.Mask.Input("subject_mask", optional=True, tooltip=SUBJECT_MASK_TIP),
                io.Latent.Input("latent", optional=True, tooltip="Size/batch for noisy_latent (default: the canvas's)."),
            ],
            outputs=[io.Noise.Output("noise", display_name="noise"),
                     io.Latent.Output("noisy_latent", display_name="noisy_latent")],
        )

    @classmethod
    def execute(cls, model, canvas, seed, strength, boost, subject_size, feather, subject_mask=None, latent=None) -> io.NodeOutput:
        strength = G.check_range(strength, "strength")
        boost = G.check_range(boost, "boost", 0.0, 20.0)
        canvas_m = canvas_in_model_space(model, canvas)
        scale = noise_scale(model)
        prior = subject_prior_fn(subject_mask, subject_size, feather)
        noise = KeyColorNoise(seed, canvas_m, prior, strength, boost, scale)
        base = latent if latent is not None else canvas
        ref = dict(base)
        ref["samples"] = comfy.sample.fix_empty_latent_channels(model, base["samples"])
        n = noise.generate_noise(ref)
        ms = model.get_model_object("model_sampling")
        if isinstance(ms, comfy.model_sampling.CONST):
            log.warning("Green Canvas Noise: noisy_latent is for eps/v-prediction models; use the NOISE output with flow models")
        x_t = ms.noise_scaling(ms.sigma_max.float(), n.float(), torch.zeros_like(n, dtype=torch.float32), max_denoise=True)
        out = {k: v for k, v in base.items() if k != "noise_mask"}
        out["samples"] = model.model.process_latent_out(x_t).to(out_device())
        return io.NodeOutput(noise, out)


class GreenCanvasModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_GreenCanvasModel",
            display_name="Green Canvas Model (attention-guided canvas)",
            category=CATEGORY,
            description="Patches a MODEL clone: the key word's cross-attention (found in the prompt via the CLIP's tokenizer, "
                        "weights/embeddings allowed) estimates the background at each early step, and the denoised "
                        "background is pulled toward the canvas (known-background inpainting), fading out at end_at so hair "
                        "and edges stay natural. Put it after the LoRA loaders; works with any sampler, CFG, batches, "
                        f"img2img and ControlNet. Supported: {SUPPORTED}.",
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("canvas", tooltip="From Canvas Latent (same VAE as the model)."),
                io.Clip.Input("clip", optional=True, tooltip="The CLIP that encodes the positive prompt (for the token lookup)."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The positive prompt text exactly as encoded "
                                "(tip: feed the same STRING to CLIP Text Encode, e.g. from Append Canvas Phrase)."),
                io.String.Input("key_word", default="green", tooltip="Word whose attention marks the background (one or more tokens)."),
                io.Float.Input("strength", default=0.8, min=0.0, max=1.0, step=0.05),
                io.Float.Input("end_at", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="Fraction of the steps after which the canvas is off (it fades over the last 40% before)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.05, tooltip="Soft threshold on the normalised attention map; 0 = automatic (Otsu, per image)."),
                io.Combo.Input("layers", options=["coarse", "all"], default="coarse", tooltip="coarse: attention blocks at 1/2 latent resolution and below (faster); all: every block."),
                io.Float.Input("hold_background", default=1.0, min=0.0, max=1.0, step=0.05, tooltip=HOLD_TIP),
                io.Float.Input("core_margin", default=0.08, min=0.0, max=0.5, step=0.01, tooltip=MARGIN_TIP),
                io.Mask.Input("subject_mask", optional=True, tooltip=SUBJECT_MASK_TIP + " Replaces the attention estimate."),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model")],
        )

    @classmethod
    def execute(cls, model, canvas, key_word, strength, end_at, threshold, layers, hold_background=1.0, core_margin=0.08,
                clip=None, prompt="", subject_mask=None) -> io.NodeOutput:
        m, _ = patch_model(model, canvas, clip, prompt, key_word, strength, end_at, threshold, subject_mask, layers,
                           hold_background, core_margin)
        return io.NodeOutput(m)


class AppendCanvasPhrase(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_AppendCanvasPhrase",
            display_name="Append Canvas Phrase",
            category=CATEGORY,
            description="Appends ', pure green background' (or your phrase) unless the prompt already has it "
                        "(case, weights and punctuation ignored). Wire the STRING into CLIP Text Encode and Green Canvas Model.",
            inputs=[
                io.String.Input("prompt", multiline=True, default=""),
                io.String.Input("phrase", default=G.CANVAS_PHRASE),
            ],
            outputs=[io.String.Output("prompt_out", display_name="prompt")],
        )

    @classmethod
    def execute(cls, prompt, phrase) -> io.NodeOutput:
        return io.NodeOutput(G.ensure_canvas_phrase(prompt, phrase))


class GreenCanvasSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_GreenCanvasSample",
            display_name="Green Canvas Sample (all-in-one)",
            category=CATEGORY,
            description="Canvas latent + key-colour noise + attention-guided canvas + sampling in one node. Outputs the "
                        "sampled LATENT and the coarse subject/background estimate for GreenPost. Connect positive "
                        "CONDITIONING (e.g. with ControlNet applied) or let the node encode the prompt.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input("prompt", multiline=True, default="a portrait photo of a woman with long curly hair"),
                io.String.Input("negative_prompt", multiline=True, default="blurry, lowres, shadow, gradient background"),
                io.Boolean.Input("append_canvas_phrase", default=True),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8),
                io.Int.Input("batch_size", default=1, min=1, max=4096),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=25, min=1, max=10000),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.String.Input("color", default="#00ff00"),
                io.String.Input("key_word", default="green"),
                io.Float.Input("noise_strength", default=1.0, min=0.0, max=1.0, step=0.05),
                io.Float.Input("noise_boost", default=2.0, min=0.0, max=20.0, step=0.1),
                io.Float.Input("canvas_strength", default=0.8, min=0.0, max=1.0, step=0.05),
                io.Float.Input("end_at", default=0.5, min=0.0, max=1.0, step=0.05),
                io.Float.Input("hold_background", default=1.0, min=0.0, max=1.0, step=0.05, tooltip=HOLD_TIP),
                io.Conditioning.Input("positive", optional=True, tooltip="Overrides the encoded prompt (the prompt text is still used to find the key token)."),
                io.Conditioning.Input("negative", optional=True),
                io.Latent.Input("latent_image", optional=True, tooltip="img2img input (use denoise < 1); default: empty."),
                io.Mask.Input("subject_mask", optional=True, tooltip=SUBJECT_MASK_TIP),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent"),
                     io.Mask.Output("coarse_alpha", display_name="coarse_alpha", tooltip="Coarse subject estimate, 1 = subject (alpha)."),
                     io.Mask.Output("background_mask", display_name="background_mask", tooltip="1 = background (ComfyUI mask convention)."),
                     io.String.Output("prompt_used", display_name="prompt")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompt, negative_prompt, append_canvas_phrase, width, height, batch_size, seed,
                steps, cfg, sampler_name, scheduler, denoise, color, key_word, noise_strength, noise_boost,
                canvas_strength, end_at, hold_background=1.0, positive=None, negative=None, latent_image=None,
                subject_mask=None) -> io.NodeOutput:
        text = G.ensure_canvas_phrase(prompt) if append_canvas_phrase else prompt
        if latent_image is not None:
            base = latent_image
            r = int(vae.spacial_compression_encode())
            height, width = base["samples"].shape[-2] * r, base["samples"].shape[-1] * r
            batch_size = base["samples"].shape[0]
        canvas = encode_canvas(vae, color, width, height, batch_size)
        if latent_image is None:
            base = {"samples": torch.zeros_like(canvas["samples"])}
        if positive is None:
            positive = _encode(clip, text)
        if negative is None:
            negative = _encode(clip, negative_prompt)
        patched, ctrl = patch_model(model, canvas, clip, text, key_word, canvas_strength, end_at, 0.0, subject_mask,
                                    "coarse", hold_background)
        prior = subject_prior_fn(subject_mask, 0.6, 0.35)
        samples_in = comfy.sample.fix_empty_latent_channels(patched, base["samples"])
        noise = KeyColorNoise(seed, canvas_in_model_space(model, canvas), prior, noise_strength, noise_boost,
                              noise_scale(model)).generate_noise({**base, "samples": samples_in})
        out = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples_in,
                                  denoise=denoise, noise_mask=base.get("noise_mask"), seed=seed)
        latent = dict(base)
        latent["samples"] = out
        Hl, Wl = out.shape[-2:]
        bg = ctrl.last_mask
        if bg is None or bg.shape[0] != out.shape[0]:
            bg = 1.0 - prior(Hl, Wl, out.shape[0])
        bg = G.resize_mask(bg.float().cpu(), height, width)
        return io.NodeOutput(latent, (1.0 - bg).to(out_device()), bg.to(out_device()), text)


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


class GSG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_GSG",
            display_name="GSG (green-screen score)",
            category=CATEGORY,
            description="Per image: distance (0..255 RGB units) of the dominant K-Means colour to the key colour; "
                        "0 = the canvas is exactly the key colour. Returns the per-image list and the mean.",
            inputs=[
                io.Image.Input("images"),
                io.String.Input("key_color", default="#00ff00"),
            ],
            outputs=[io.String.Output("report", display_name="report"),
                     io.Float.Output("mean_gsg", display_name="mean_gsg")],
        )

    @classmethod
    def execute(cls, images, key_color) -> io.NodeOutput:
        from ..py.metrics import gsg

        key = _color(key_color)
        imgs = images if images.ndim == 4 else images[None]
        scores = [gsg(imgs[i, ..., :3].float().cpu(), key) for i in range(imgs.shape[0])]
        mean = float(sum(scores) / len(scores))
        report = ", ".join(f"{s:.1f}" for s in scores) + f" (mean {mean:.2f})"
        return io.NodeOutput(report, mean)


NODES = [CanvasLatent, GreenCanvasNoise, GreenCanvasModel, AppendCanvasPhrase, GreenCanvasSample, GSG]
