"""Tiled VAE decoding with GroupNorm statistics shared across tiles (ComfyUI-free).

A plain tiled decode (ComfyUI's ``decode_tiled``, diffusers' ``tiled_decode``) runs the whole decoder on
each tile, so every GroupNorm normalises with the statistics of its tile and the mid-block attention
sees only the tile: the tiles disagree with the untiled decode everywhere, not only at seams. Here the
decoder is executed *stage by stage* instead, and every stage tile by tile:

1. The latent-resolution part (``post_quant_conv``, ``conv_in``, the mid block with its global
   attention) runs once on the whole latent, through the model's own ``decode`` (a forward pre-hook on
   the first up-path module captures its input and stops the call). It is 1/64 of the output pixels.
2. The up path (where nearly all memory and FLOPs are) is split into stages that each start with at
   most one GroupNorm: ``conv1(act(norm1(x)))``, ``shortcut(x) + conv2(act(norm2(t)))``, ``upsample(x)``.
   Each stage runs over a grid of disjoint tile *cores*: the latent tile grid scaled to the stage's
   resolution, coarsened at the low-resolution / wide stages so every tile job holds about as many
   values as a full-resolution tile. Each core is computed from its input plus a halo of the stage's
   receptive radius (1 px for 3x3 convs), so the core is exact. While a stage writes its output, the
   per-(sample, group) mean and M2 of every core are merged (Chan et al., float64) into the statistics
   of the *whole* output; the next stage's GroupNorm normalises every tile with those. Hence every
   GroupNorm sees exactly the statistics of the untiled decode and tiled == untiled up to float
   rounding (measured ~1e-5 max abs on RGB and alpha).
3. The final stage (``conv_out(act(norm_out(f)))`` for the RGB and the matting head on the tapped
   feature ``f``) runs over the *overlapping* output tiles of :func:`matting_head.decode_with_matte`,
   with a halo covering both, and the RGB and the head output of a tile are cross-faded with the same
   weights (the tiles agree, so the cross-fade blends equal values).

Cost: the decoder's FLOPs once, plus the halos (a 1 px ring per stage around each core: for 512 px
cores ~1 %), the overlap of the final stage (``conv_out`` + head only), one mean/variance pass per
GroupNorm input and one copy of every stage output into its whole-image tensor - measured on a shared
2-core CPU with 256 px tiles: 1.10x the untiled decode + head at 512 px, 1.19-1.28x at 1024 px (see
``benchmarks/bench_matting_head.py``). Memory: stage
inputs/outputs are kept whole on ``store_device`` (at most 3 tensors of the current level: stage input,
the resnet's hidden tensor, its output - at full resolution ``3 x 128 x H x W`` values); on the compute
device only one tile job is live (about a ``tile x 8`` px square of 128-256 channels plus the conv's
workspace). With ``store_device`` = CPU the GPU never holds a whole-image tensor above latent
resolution, at the price of moving each stage tensor to and from it once.

Supported decoders: the LDM/ComfyUI ``Decoder`` (``up[i].block`` / ``upsample`` / ``norm_out``) and the
diffusers ``Decoder`` (``up_blocks[i].resnets`` / ``upsamplers`` / ``conv_norm_out``) of the SD-family KL
VAEs (SD1.x, SD2.x, SDXL, SD3, Flux), i.e. up paths of GroupNorm resnets and nearest-x2 upsamplers
without attention. Anything else raises :class:`UnsupportedDecoder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedDecoder(ValueError):
    """The decoder has a layer the shared-statistics tiling does not know how to split."""


class _Stop(Exception):
    def __init__(self, value):
        super().__init__("captured")
        self.value = value


def input_of(module: nn.Module, run: Callable[[], object], what: str) -> torch.Tensor:
    """Call ``run()`` until it reaches ``module``; return ``module``'s first positional input (a forward
    pre-hook stops the pass there, so nothing after it is computed). ``RuntimeError`` naming ``what`` if it
    never does."""

    def hook(_m, args):
        raise _Stop(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop as stop:
        return stop.value
    finally:
        handle.remove()
    raise RuntimeError(f"{what} was never reached")


# ----------------------------------------------------------------------------------- group statistics
class GroupStats:
    """Per-(sample, group) mean and M2 of a ``[B,C,H,W]`` tensor seen in disjoint pieces (float64, CPU)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        B, C, h, w = x.shape
        xs = x.unflatten(1, (self.groups, C // self.groups))  # a view, also of a cropped core
        if xs.dtype != torch.float32:
            xs = xs.float()
        var, mean = torch.var_mean(xs, dim=(2, 3, 4), correction=0)
        nt = (C // self.groups) * h * w
        mean, m2 = mean.cpu().double(), var.cpu().double() * nt  # (MPS has no float64)
        if self.mean is None:
            self.n, self.mean, self.m2 = nt, mean, m2
            return
        n = self.n + nt
        delta = mean - self.mean
        self.mean = self.mean + delta * (nt / n)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * nt / n)
        self.n = n

    def affine(self, norm: nn.GroupNorm, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` ``[B,C,1,1]`` float32 with ``norm(x) == x * scale + shift`` for these stats."""
        if norm.num_groups != self.groups:
            raise RuntimeError(f"statistics over {self.groups} groups used for a {norm.num_groups}-group norm")
        rstd = (self.m2 / self.n + norm.eps).rsqrt()
        per = norm.num_channels // self.groups
        rstd_c = rstd.repeat_interleave(per, dim=1)
        mean_c = self.mean.repeat_interleave(per, dim=1)
        w = norm.weight.detach().cpu().double() if norm.weight is not None else torch.ones(norm.num_channels,
                                                                                          dtype=torch.float64)
        b = norm.bias.detach().cpu().double() if norm.bias is not None else torch.zeros(norm.num_channels,
                                                                                       dtype=torch.float64)
        scale = rstd_c * w
        shift = b - mean_c * scale
        return (scale.float().to(device)[:, :, None, None], shift.float().to(device)[:, :, None, None])


def _norm_act(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor], act) -> torch.Tensor:
    """GroupNorm with given statistics (computed in float32) + activation, back in ``x``'s dtype."""
    scale, shift = affine
    y = torch.addcmul(shift, x.float(), scale)
    y = F.silu(y, inplace=True) if act is F.silu or isinstance(act, nn.SiLU) else act(y)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------- stages
def _conv_radius(conv, what: str) -> int:
    k, p, s = getattr(conv, "kernel_size", None), getattr(conv, "padding", None), getattr(conv, "stride", None)
    if k is None or p is None or s is None:
        raise UnsupportedDecoder(f"{what}: not a Conv2d")
    k, p, s = (tuple(v) if isinstance(v, (tuple, list)) else (v, v) for v in (k, p, s))
    if s != (1, 1) or k[0] != k[1] or p != (k[0] // 2, k[0] // 2) or k[0] % 2 == 0:
        raise UnsupportedDecoder(f"{what}: needs a stride-1 'same' conv with an odd square kernel, got "
                                 f"kernel {k}, padding {p}, stride {s}")
    return k[0] // 2


def _group_norm(norm, what: str) -> nn.GroupNorm:
    if not isinstance(norm, nn.GroupNorm):
        raise UnsupportedDecoder(f"{what}: expected a GroupNorm, got {type(norm).__name__}")
    return norm


@dataclass
class ResStage:
    """``out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / scale``."""

    norm1: nn.GroupNorm
    conv1: nn.Module
    norm2: nn.GroupNorm
    conv2: nn.Module
    shortcut: nn.Module | None
    act: Callable
    scale: float = 1.0

    def __post_init__(self):
        self.r1 = _conv_radius(self.conv1, "resnet conv1")
        self.r2 = max(_conv_radius(self.conv2, "resnet conv2"),
                      _conv_radius(self.shortcut, "resnet shortcut") if self.shortcut is not None else 0)


@dataclass
class UpStage:
    """A nearest-x2 upsampler with a conv, called as the model's own module."""

    module: nn.Module
    radius: int


@dataclass
class DecoderPlan:
    entry: nn.Module                 # first up-path module: its input is captured from the model's decode
    stages: list                     # ResStage / UpStage, in order
    norm_out: nn.GroupNorm           # the tap point: its input is the matting head's feature
    act_out: Callable
    conv_out: nn.Module
    tanh_out: bool = False

    @property
    def out_radius(self) -> int:
        return _conv_radius(self.conv_out, "conv_out")

    @property
    def upscale(self) -> int:
        return 2 ** sum(isinstance(s, UpStage) for s in self.stages)


def ldm_decoder_plan(decoder: nn.Module) -> DecoderPlan:
    """Plan for the LDM / ComfyUI ``Decoder`` (``comfy.ldm.modules.diffusionmodules.model.Decoder``)."""
    if getattr(decoder, "give_pre_end", False):
        raise UnsupportedDecoder("decoder has give_pre_end set")
    try:
        levels = int(decoder.num_resolutions)
        ups = decoder.up
    except AttributeError as exc:
        raise UnsupportedDecoder(f"not an LDM Decoder ({exc})") from None
    stages: list = []
    for i_level in reversed(range(levels)):
        up = ups[i_level]
        if len(getattr(up, "attn", [])):
            raise UnsupportedDecoder("attention in the decoder's up path")
        for blk in up.block:
            for name in ("norm1", "conv1", "norm2", "conv2"):
                if not hasattr(blk, name):
                    raise UnsupportedDecoder(f"up-path block {type(blk).__name__} has no {name}")
            shortcut = None
            if blk.in_channels != blk.out_channels:
                shortcut = blk.conv_shortcut if getattr(blk, "use_conv_shortcut", False) else blk.nin_shortcut
            stages.append(ResStage(_group_norm(blk.norm1, "norm1"), blk.conv1, _group_norm(blk.norm2, "norm2"),
                                   blk.conv2, shortcut, getattr(blk, "swish", F.silu)))
        if i_level != 0:
            u = up.upsample
            sf = u.scale_factor
            if not (isinstance(sf, (int, float)) and float(sf) == 2.0):
                raise UnsupportedDecoder(f"upsampler with scale factor {sf!r} (only x2 is supported)")
            stages.append(UpStage(u, _conv_radius(u.conv, "upsample conv") if u.with_conv else 0))
    return DecoderPlan(ups[levels - 1].block[0], stages, _group_norm(decoder.norm_out, "norm_out"), F.silu,
                       decoder.conv_out, bool(getattr(decoder, "tanh_out", False)))


def diffusers_decoder_plan(decoder: nn.Module) -> DecoderPlan:
    """Plan for the diffusers ``Decoder`` of an ``AutoencoderKL``."""
    stages: list = []
    blocks = getattr(decoder, "up_blocks", None)
    if blocks is None or not hasattr(decoder, "conv_norm_out"):
        raise UnsupportedDecoder(f"{type(decoder).__name__} is not a diffusers Decoder")
    for ub in blocks:
        if getattr(ub, "attentions", None):
            raise UnsupportedDecoder("attention in the decoder's up path")
        for r in ub.resnets:
            if (getattr(r, "upsample", None) is not None or getattr(r, "downsample", None) is not None
                    or getattr(r, "time_emb_proj", None) is not None):
                raise UnsupportedDecoder("up-path resnet with its own resampling or time embedding")
            stages.append(ResStage(_group_norm(r.norm1, "norm1"), r.conv1, _group_norm(r.norm2, "norm2"), r.conv2,
                                   r.conv_shortcut, r.nonlinearity, float(r.output_scale_factor)))
        for u in (ub.upsamplers or []):
            if getattr(u, "use_conv_transpose", False) or getattr(u, "norm", None) is not None \
                    or not getattr(u, "interpolate", True):
                raise UnsupportedDecoder("upsampler other than nearest x2 + conv")
            conv = u.conv if getattr(u, "name", "conv") == "conv" else u.Conv2d_0
            stages.append(UpStage(u, _conv_radius(conv, "upsample conv") if getattr(u, "use_conv", True) else 0))
    norm = decoder.conv_norm_out
    return DecoderPlan(blocks[0], stages, _group_norm(norm, "conv_norm_out"), decoder.conv_act, decoder.conv_out)


# ------------------------------------------------------------------------------------------ executor
def _cores(size: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(size, s + tile)) for s in range(0, size, tile)]


@dataclass
class TiledDecoder:
    """Shared-statistics tiled decoding of one VAE: ``prefix(z) -> h`` runs the model's own decode up to
    ``plan.entry`` (the latent-resolution part), ``post(rgb)`` maps ``conv_out``'s output to what the
    untiled ``decode_fn`` returns (e.g. ComfyUI's ``process_output``)."""

    plan: DecoderPlan
    run_decode: Callable[[torch.Tensor], object]
    post: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    store_device: torch.device | str | None = None

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        return input_of(self.plan.entry, lambda: self.run_decode(z), "the decoder's up path")

    def _run(self, fn, inputs, halo, up, grid, groups, store, step):
        """Run ``fn`` over the disjoint cores ``grid`` (rows x cols at the inputs' resolution) with ``halo``
        px of context; ``up`` = output/input scale. Returns the whole output (on ``store``) and its
        GroupStats over ``groups`` (None: no stats)."""
        H, W = inputs[0].shape[-2:]
        dev = self.compute_device
        out, stats = None, (GroupStats(groups) if groups else None)
        rows, cols = grid
        for y0, y1 in rows:
            for x0, x1 in cols:
                ya, yb, xa, xb = max(0, y0 - halo), min(H, y1 + halo), max(0, x0 - halo), min(W, x1 + halo)
                res = fn(*(t[..., ya:yb, xa:xb].to(dev) for t in inputs))
                core = res[..., (y0 - ya) * up:(y1 - ya) * up, (x0 - xa) * up:(x1 - xa) * up]
                if out is None:
                    out = torch.empty((*res.shape[:2], H * up, W * up), dtype=res.dtype, device=store)
                out[..., y0 * up:y1 * up, x0 * up:x1 * up] = core
                if stats is not None:
                    stats.add(core)
                del res, core
                step()
        return out, stats

    def _grid(self, h, w, th, tw, scale, channels):
        """Disjoint cores (at resolution ``scale``) of a stage whose input has ``channels`` channels: the
        latent tile grid, coarsened at the narrow-resolution / wide-channel stages so that every tile job
        holds about as many values as a full-resolution tile (``tile x upscale`` px of ``norm_out``'s
        width) - fewer, larger convolutions where the image is small."""
        f = (self.plan.upscale / scale) * math.sqrt(self.plan.norm_out.num_channels / channels)
        ch, cw = max(th, int(th * f)), max(tw, int(tw * f))
        return ([(a * scale, b * scale) for a, b in _cores(h, ch)],
                [(a * scale, b * scale) for a, b in _cores(w, cw)])

    def _channels(self) -> list[int]:
        """Input channels of every stage (conv1 / upsample conv in-channels)."""
        out = []
        for st in self.plan.stages:
            conv = st.conv1 if isinstance(st, ResStage) else getattr(st.module, "conv", None)
            out.append(int(getattr(conv, "in_channels", self.plan.norm_out.num_channels)))
        return out

    def steps(self, h: int, w: int, tile) -> int:
        """Number of tile jobs :meth:`features` makes for an ``h x w`` latent (for progress bars)."""
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        n, scale = 0, 1
        for st, c in zip(self.plan.stages, self._channels()):
            rows, cols = self._grid(h, w, th, tw, scale, c)
            n += len(rows) * len(cols) * (2 if isinstance(st, ResStage) else 1)
            if isinstance(st, UpStage):
                scale *= 2
        return n

    def features(self, z: torch.Tensor, tile, step: Callable[[], None] = lambda: None
                 ) -> tuple[torch.Tensor, GroupStats]:
        """The tapped feature (``norm_out`` input) of the whole image, computed stage by stage over
        disjoint cores of ``tile`` (int or ``(th, tw)``) latent px, and its GroupNorm statistics."""
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        x = self.prefix(z)
        self.compute_device = x.device
        store = torch.device(self.store_device) if self.store_device is not None else x.device
        stages = self.plan.stages
        h, w = z.shape[-2:]
        scale = 1

        def consumer_groups(i):
            nxt = stages[i + 1] if i + 1 < len(stages) else None
            if nxt is None:
                return self.plan.norm_out.num_groups
            return nxt.norm1.num_groups if isinstance(nxt, ResStage) else None

        first = stages[0] if stages else None
        stats = None
        if isinstance(first, ResStage) or not stages:
            stats = GroupStats(first.norm1.num_groups if stages else self.plan.norm_out.num_groups)
            stats.add(x)
        x = x.to(store)
        for i, st in enumerate(stages):
            grid = self._grid(h, w, th, tw, scale, x.shape[1])
            dev = self.compute_device
            if isinstance(st, ResStage):
                a1 = stats.affine(st.norm1, dev)
                t, t_stats = self._run(lambda xt: st.conv1(_norm_act(xt, a1, st.act)), [x], st.r1, 1, grid,
                                       st.norm2.num_groups, store, step)
                a2 = t_stats.affine(st.norm2, dev)

                def second(xt, tt):
                    hid = st.conv2(_norm_act(tt, a2, st.act))
                    sc = st.shortcut(xt) if st.shortcut is not None else xt
                    out = sc + hid
                    return out / st.scale if st.scale != 1.0 else out

                x, stats = self._run(second, [x, t], st.r2, 1, grid, consumer_groups(i), store, step)
                del t
            else:
                halo = math.ceil(st.radius / 2) if st.radius else 0
                x, stats = self._run(st.module, [x], halo, 2, grid, consumer_groups(i), store, step)
                scale *= 2
        return x, stats

    def finish(self, feature: torch.Tensor, affine, head=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RGB (after ``post``) and head output of one feature tile (no halo handling)."""
        p = self.plan
        rgb = p.conv_out(_norm_act(feature, affine, p.act_out))
        if p.tanh_out:
            rgb = torch.tanh(rgb)
        return self.post(rgb), (head(feature) if head is not None else None)
