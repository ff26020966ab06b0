"""A tiny text-conditioned pixel-space diffusion model and its procedural scene data (ComfyUI-free).

It exists to prove mechanisms (green-canvas control, attention read-out) on a *trained* model on CPU,
where no real Stable Diffusion weights are available. Everything mirrors the real thing at toy scale:

* data: 32x32 RGB scenes, a subject (``disc``/``box``/``tuft`` = disc with hair-like strands) of a
  non-green colour near the centre, on a ``green`` (studio-green shades with gradients/vignette, never
  the pure key colour) or ``random`` (any colour, gradient + smooth texture) background;
* text: a word-level tokenizer with a start token, prompts such as ``"a tuft on green background"``
  (classifier-free dropout of the whole prompt and of the background phrase);
* model: a small UNet (pixel-unshuffle x2, levels 16x16 and 8x8) with **cross-attention** from the
  pixels to the prompt tokens in every level, eps-prediction like SD1.5; its attention probabilities
  can be read through :attr:`ToyUNet.attn_hook` (the counterpart of ComfyUI's attn2 patches);
* noise schedule: SD's discrete "scaled linear" betas (sigma 0.029..14.6), k-diffusion sigma
  parametrisation ``x = x0 + sigma * eps`` and the ComfyUI EPS input scaling ``1/sqrt(sigma^2+1)``;
  the "VAE" is the identity (pixels in -1..1 are the latent).

``scripts/train_toy_diffusion.py`` trains it; the fixture lives in ``tests/fixtures/``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

VOCAB = ["<pad>", "<s>", "a", "disc", "box", "tuft", "on", "green", "random", "background"]
TOKEN = {w: i for i, w in enumerate(VOCAB)}
SUBJECTS = ["disc", "box", "tuft"]
CONTEXT_LEN = 8
IMAGE_SIZE = 32


# ------------------------------------------------------------------------------------------ text
def tokenize(prompt: str, length: int = CONTEXT_LEN) -> list[int]:
    """Word-level tokens: ``<s>`` + words (lower-cased, punctuation stripped) + ``<pad>`` up to ``length``."""
    words = [w.strip(",.;:()") for w in prompt.lower().split()]
    ids = [TOKEN["<s>"]]
    for w in words:
        if not w:
            continue
        if w not in TOKEN:
            raise UserError(f"toy tokenizer: unknown word {w!r}; vocabulary: {', '.join(VOCAB[2:])}")
        ids.append(TOKEN[w])
    if len(ids) > length:
        raise UserError(f"toy tokenizer: prompt longer than {length - 1} words")
    return ids + [TOKEN["<pad>"]] * (length - len(ids))


def prompt_for(subject: int, background: str | None) -> str:
    return f"a {SUBJECTS[subject]}" + (f" on {background} background" if background else "")


# ------------------------------------------------------------------------------------------ data
def _smoothstep(e0: float, e1: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _smooth_field(g: torch.Generator, b: int, size: int, cells: int = 4) -> torch.Tensor:
    grid = torch.rand(b, 1, cells, cells, generator=g) * 2 - 1
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[:, 0]


def render_scenes(batch: int, generator: torch.Generator, size: int = IMAGE_SIZE,
                  green_prob: float = 0.5, drop_bg_phrase: float = 0.0, drop_prompt: float = 0.0):
    """Procedural scenes. Returns ``(images [B,3,H,W] in -1..1, tokens [B,L] long, alpha [B,H,W],
    is_green [B] bool)``. ``alpha`` is the subject coverage (1 = subject)."""
    g = generator
    B, S = batch, size
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32) + 0.5,
                            torch.arange(S, dtype=torch.float32) + 0.5, indexing="ij")
    yy, xx = yy[None], xx[None]
    subj = torch.randint(0, len(SUBJECTS), (B,), generator=g)
    cx = S / 2 + (torch.rand(B, generator=g) - 0.5) * S * 0.15
    cy = S / 2 + (torch.rand(B, generator=g) - 0.5) * S * 0.15
    r = S * (0.17 + 0.08 * torch.rand(B, generator=g))
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    dist = torch.sqrt(dx * dx + dy * dy)
    disc = 1 - _smoothstep(-0.7, 0.7, dist - r[:, None, None])
    half = r[:, None, None] * 0.88
    box = (1 - _smoothstep(-0.7, 0.7, dx.abs() - half)) * (1 - _smoothstep(-0.7, 0.7, dy.abs() - half))
    # tuft: a smaller disc with ~14 thin strands reaching out
    ang = torch.atan2(dy, dx)
    n_str = 14
    theta = torch.rand(B, n_str, generator=g) * 2 * math.pi
    length = r[:, None] * (0.6 + 0.7 * torch.rand(B, n_str, generator=g))
    dtheta = torch.remainder(ang[:, None] - theta[:, :, None, None] + math.pi, 2 * math.pi) - math.pi
    perp = (dtheta.abs() * dist[:, None]).clamp(max=10)
    along = dist[:, None] - r[:, None, None, None] * 0.75
    strand = (1 - _smoothstep(0.25, 0.9, perp)) * (along > 0) * (along < length[:, :, None, None])
    strand = strand.amax(1) * 0.85
    core = 1 - _smoothstep(-0.7, 0.7, dist - 0.75 * r[:, None, None])
    tuft = 1 - (1 - core) * (1 - strand)
    alpha = torch.stack([disc, box, tuft], 1)[torch.arange(B), subj]

    # subject colour: no green cast (g <= max(r, b)), a light shading gradient
    col = torch.rand(B, 3, generator=g) * 0.85 + 0.1
    col[:, 1] = torch.minimum(col[:, 1], torch.maximum(col[:, 0], col[:, 2]) * 0.9)
    shade = 1 + 0.15 * (-(dx + dy) / (r[:, None, None] * 2)).clamp(-1, 1)
    fg = (col[:, :, None, None] * shade[:, None]).clamp(0, 1)

    # background: studio-green shades (never the pure key colour) or any colour, with gradients
    is_green = torch.rand(B, generator=g) < green_prob
    base_green = torch.stack([0.05 + 0.25 * torch.rand(B, generator=g), 0.45 + 0.35 * torch.rand(B, generator=g),
                              0.1 + 0.25 * torch.rand(B, generator=g)], 1)
    base_rand = torch.rand(B, 3, generator=g)
    base = torch.where(is_green[:, None], base_green, base_rand)
    gx, gy = (torch.rand(B, 2, generator=g) - 0.5).unbind(1)
    ny, nx = yy / S - 0.5, xx / S - 0.5
    gain = 1 + 0.3 * (gx[:, None, None] * nx + gy[:, None, None] * ny) - 0.45 * (nx * nx + ny * ny)
    tex = _smooth_field(g, B, S) * torch.where(is_green, 0.04, 0.12)[:, None, None]
    bg = (base[:, :, None, None] * gain[:, None] + tex[:, None]).clamp(0, 1)
    img = alpha[:, None] * fg + (1 - alpha[:, None]) * bg
    img = (img + 0.01 * torch.randn(img.shape, generator=g)).clamp(0, 1)

    tokens = []
    u_bg = torch.rand(B, generator=g)
    u_p = torch.rand(B, generator=g)
    for i in range(B):
        if u_p[i] < drop_prompt:
            tokens.append(tokenize(""))
        elif u_bg[i] < drop_bg_phrase:
            tokens.append(tokenize(prompt_for(int(subj[i]), None)))
        else:
            tokens.append(tokenize(prompt_for(int(subj[i]), "green" if bool(is_green[i]) else "random")))
    return img * 2 - 1, torch.tensor(tokens, dtype=torch.long), alpha, is_green


# ------------------------------------------------------------------------------------- schedule
def discrete_sigmas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD1.5's "scaled linear" schedule as k-diffusion sigmas (ascending, ``n`` values)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return ((1 - ac) / ac).sqrt().float()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) spacing, descending, with a final 0."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


# ---------------------------------------------------------------------------------------- model
def _sinusoidal(x: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    a = x[:, None].float() * freqs[None] * 100.0
    return torch.cat([a.cos(), a.sin()], 1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.n1 = nn.GroupNorm(8, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t(t)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Pixels (queries) attend to prompt tokens; ``hook(name, probs [B,heads,N,T], (h, w))`` sees the
    softmax probabilities (what the pack's attn2 replace patch computes in ComfyUI)."""

    def __init__(self, ch: int, ctx: int, heads: int, name: str):
        super().__init__()
        self.heads, self.name = heads, name
        self.norm = nn.GroupNorm(8, ch)
        self.q = nn.Linear(ch, ch, bias=False)
        self.k = nn.Linear(ctx, ch, bias=False)
        self.v = nn.Linear(ctx, ch, bias=False)
        self.out = nn.Linear(ch, ch)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, context, hook=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B,N,C]
        q = self.q(h).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
        k = self.k(context).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
        v = self.v(context).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // self.heads), dim=-1)
        if hook is not None:
            hook(self.name, probs, (H, W))
        o = (probs @ v).transpose(1, 2).reshape(B, -1, C)
        return x + self.out(o).transpose(1, 2).view(B, C, H, W)


class ToyUNet(nn.Module):
    """eps-prediction UNet on ``[B,3,32,32]`` (pixel-unshuffled to 12x16x16), cross-attention at 16x16
    and 8x8 to a token context of width ``ctx``."""

    def __init__(self, ch: int = 48, ctx: int = 64, heads: int = 4, vocab: int = len(VOCAB),
                 context_len: int = CONTEXT_LEN):
        super().__init__()
        self.config = dict(ch=ch, ctx=ctx, heads=heads, vocab=vocab, context_len=context_len)
        temb = ch * 2
        self.tok = nn.Embedding(vocab, ctx)
        self.pos = nn.Parameter(torch.randn(context_len, ctx) * 0.02)
        self.ctx_mlp = nn.Sequential(nn.LayerNorm(ctx), nn.Linear(ctx, ctx), nn.GELU(), nn.Linear(ctx, ctx))
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(12, ch, 3, padding=1)
        self.d1 = ResBlock(ch, ch, temb)
        self.a1 = CrossAttention(ch, ctx, heads, "down16")
        self.down = nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1)
        self.d2 = ResBlock(ch * 2, ch * 2, temb)
        self.a2 = CrossAttention(ch * 2, ctx, heads, "down8")
        self.m1 = ResBlock(ch * 2, ch * 2, temb)
        self.am = CrossAttention(ch * 2, ctx, heads, "mid8")
        self.u2 = ResBlock(ch * 4, ch * 2, temb)
        self.au2 = CrossAttention(ch * 2, ctx, heads, "up8")
        self.up = nn.Conv2d(ch * 2, ch, 3, padding=1)
        self.u1 = ResBlock(ch * 2, ch, temb)
        self.au1 = CrossAttention(ch, ctx, heads, "up16")
        self.norm_out = nn.GroupNorm(8, ch)
        self.outc = nn.Conv2d(ch, 12, 3, padding=1)
        nn.init.zeros_(self.outc.weight)
        nn.init.zeros_(self.outc.bias)
        # hook(name, probs [B,heads,N,T], (h, w), transformer_options); the sampler fills
        # transformer_options like ComfyUI does: cond_or_uncond (batch chunks, 0 = cond, 1 = uncond),
        # sigmas (current sigma) and sample_sigmas (the run's schedule)
        self.attn_hook: Callable | None = None
        self.transformer_options: dict = {"cond_or_uncond": [0], "sigmas": None, "sample_sigmas": None}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.tok(tokens) + self.pos[None, : tokens.shape[1]]
        return e + self.ctx_mlp(e)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hook = None
        if self.attn_hook is not None:
            hook = lambda name, probs, hw: self.attn_hook(name, probs, hw, self.transformer_options)  # noqa: E731
        t = self.temb(_sinusoidal(c_noise, self.config["ch"]))
        h0 = self.inp(F.pixel_unshuffle(x_in, 2))
        h1 = self.a1(self.d1(h0, t), context, hook)
        h2 = self.a2(self.d2(self.down(h1), t), context, hook)
        m = self.am(self.m1(h2, t), context, hook)
        u2 = self.au2(self.u2(torch.cat([m, h2], 1), t), context, hook)
        u1 = self.up(F.interpolate(u2, scale_factor=2.0, mode="nearest"))
        u1 = self.au1(self.u1(torch.cat([u1, h1], 1), t), context, hook)
        return F.pixel_shuffle(self.outc(F.silu(self.norm_out(u1))), 2)


class ToyDenoiser(nn.Module):
    """k-diffusion style denoiser around :class:`ToyUNet`: ``D(x, sigma, tokens) = x - sigma * eps``
    with ComfyUI's EPS input scaling ``x / sqrt(sigma^2 + 1)`` and ``c_noise = ln(sigma) / 4``."""

    def __init__(self, unet: ToyUNet):
        super().__init__()
        self.unet = unet
        s = discrete_sigmas()
        self.sigma_min, self.sigma_max = float(s[0]), float(s[-1])

    def eps(self, x, sigma, context):
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        return self.unet(x * c_in[:, None, None, None], sigma.log() / 4, context)

    def forward(self, x, sigma, context):
        sigma_b = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        return x - sigma_b[:, None, None, None] * self.eps(x, sigma_b, context)


def load_toy(path) -> ToyDenoiser:
    """Load a trained toy denoiser from a safetensors file written by ``scripts/train_toy_diffusion.py``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("config", "{}"))
    unet = ToyUNet(**config)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    unet.load_state_dict(sd)
    return ToyDenoiser(unet.eval())


# -------------------------------------------------------------------------------------- sampling
PostCFG = Callable[[dict], torch.Tensor]


@torch.no_grad()
def sample_euler(denoiser: ToyDenoiser, noise: torch.Tensor, tokens: torch.Tensor, steps: int = 16,
                 cfg: float = 3.0, post_cfg: Sequence[PostCFG] = (), ancestral: bool = False,
                 generator: torch.Generator | None = None, denoise: float = 1.0,
                 latent_image: torch.Tensor | None = None) -> torch.Tensor:
    """Euler (or Euler-ancestral) sampling with classifier-free guidance, in k-diffusion form.

    ``noise`` is N(0,1) (already shifted if key-colour noise is used); the start is
    ``latent_image + sigma_0 * noise``. ``post_cfg`` functions get a dict like ComfyUI's
    ``sampler_post_cfg_function`` (``denoised``, ``input``, ``sigma``, ``sample_sigmas``, ``step``)
    and return a new ``denoised``. ``denoise < 1`` runs the last ``denoise`` fraction (img2img).
    """
    full = karras_sigmas(max(1, round(steps / denoise)), denoiser.sigma_min, denoiser.sigma_max)
    sigmas = full[-(steps + 1):]
    context = denoiser.unet.encode_text(tokens)
    null = denoiser.unet.encode_text(torch.tensor([tokenize("")] * tokens.shape[0]))
    x0 = latent_image if latent_image is not None else torch.zeros_like(noise)
    x = x0 + noise * sigmas[0]
    for i in range(steps):
        s = sigmas[i]
        opts = denoiser.unet.transformer_options
        opts.update(sigmas=s, sample_sigmas=sigmas)
        if cfg == 1.0:
            opts["cond_or_uncond"] = [0]
            d = denoiser(x, s, context)
        else:
            opts["cond_or_uncond"] = [0, 1]  # batch layout: cond chunk, then uncond chunk
            both = denoiser(torch.cat([x, x]), s, torch.cat([context, null]))
            dc, du = both.chunk(2)
            d = du + cfg * (dc - du)
        for fn in post_cfg:
            d = fn({"denoised": d, "input": x, "sigma": s, "sample_sigmas": sigmas, "step": i})
        s_next = sigmas[i + 1]
        if ancestral and s_next > 0:
            s_up = min(float(s_next), float((s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5))
            s_down = (s_next ** 2 - s_up ** 2) ** 0.5
            x = x + (x - d) / s * (s_down - s)
            x = x + torch.randn(x.shape, generator=generator) * s_up
        else:
            x = x + (x - d) / s * (s_next - s)
    return x
