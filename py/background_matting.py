"""BackgroundMattingV2 (Lin et al., CVPR 2021) as GreenPost's optional learned refiner.

DiffuMatting's GreenPost fed the image and its clean backdrop plate to BackgroundMattingV2. This module is an
independent implementation of that network whose module and parameter names reproduce the state-dict layout
of the public checkpoints (``MattingRefine`` with a ``mobilenetv2`` / ``resnet50`` / ``resnet101`` backbone,
PyTorch ``.pth`` state dicts), so they load with ``strict=True``. No torchvision: the backbones are built
here with torchvision's key names (``backbone.features.N...`` / ``backbone.conv1``, ``layer1`` ...).

Network (all convolutions bias-free and followed by BatchNorm unless noted)
--------------------------------------------------------------------------
* input: ``src`` and ``bgr`` (RGB 0..1) concatenated, 6 channels.
* backbone, output stride 16, with the features at 1/2, 1/4 and 1/8 kept for the decoder:
  MobileNetV2 (inverted residuals; the 160-channel stage runs at stride 1 and the later blocks use dilation
  2; the final 1280-channel conv is dropped) or ResNet-50/101 (bottlenecks, layer4 dilated instead of
  strided).
* ASPP (DeepLabV3): 1x1 conv, three 3x3 convs with dilation 3 / 6 / 9, global pooling branch, 1x1
  projection of the concatenation (256 channels each; dropout, inactive at inference).
* decoder: upsample x2, concatenate the skip feature, 3x3 conv (256 -> 128 -> 64 -> 48 -> 37 channels; the
  last conv has a bias and no norm). The 37 channels are alpha (1), foreground *residual* (3, added to
  the source image), error (1) and a hidden encoding (32).
* refiner (``MattingRefine``): the base runs on the image scaled by ``backbone_scale`` (<= 1/2); the coarse
  error map, resampled to 1/4 resolution, picks 4x4 full-resolution patches to refine: the ``sampling_pixels
  // 16`` worst ones (``sampling``), all with error > ``threshold`` (``thresholding``), or everything
  (``full``, plain convolutions). Each patch: coarse hidden/alpha/foreground + src/bgr at 1/2 resolution
  (8x8 crop with a 3 px margin) -> two 3x3 convs -> nearest x2 -> with src/bgr at full resolution -> two
  3x3 convs -> alpha + foreground residual of the 4x4 patch, replacing the bilinear upsample of the coarse
  result there.

Weights: :func:`load_bmv2_state_dict` reads ``.safetensors`` or a ``.pth`` state dict (``torch.load`` with
``weights_only=True``; anything but a flat mapping of names to tensors is refused), :func:`load_bmv2`
builds the variant the keys describe and loads them strictly, :func:`convert_bmv2` writes safetensors.
:func:`refine_with_bmv2` runs a model on ComfyUI-layout images of any size.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .alpha import as_image, broadcast_batch
from .errors import UserError

BACKBONES = ("mobilenetv2", "resnet50", "resnet101")
REFINE_MODES = ("sampling", "thresholding", "full")
HIDDEN = 32
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
# MobileNetV2 stages (torchvision's table): expansion, output channels, blocks, stride of the first block.
# BackgroundMattingV2 keeps output stride 16: block 14 (first of the 160-channel stage) does not stride and
# the depthwise convs of blocks 15.. are dilated by 2 (the final 1280-channel conv, block 18, is dropped).
MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))
MOBILENET_UNSTRIDED, MOBILENET_DILATED_FROM = 14, 15
HD_PIXELS = 1920 * 1080


# ------------------------------------------------------------------------------------------- blocks
class ConvNormAct(nn.Sequential):
    """``conv (no bias) -> BatchNorm -> activation`` with keys ``0`` (conv) and ``1`` (norm)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
                 act: type[nn.Module] = nn.ReLU6):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * dilation, dilation=dilation,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise, linear 1x1 projection (all in ``conv``)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [ConvNormAct(cin, hidden, 1)]
        layers += [ConvNormAct(hidden, hidden, 3, stride, dilation, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip else self.conv(x)


class MobileNetV2Backbone(nn.Module):
    """``features.0`` (stem, stride 2) + 17 inverted residuals; returns (1/16, 1/8, 1/4, 1/2, input)."""

    TAPS = (1, 3, 6)  # outputs of features[1] (1/2), features[3] (1/4), features[6] (1/8)
    CHANNELS = (320, 32, 24, 16)

    def __init__(self, in_channels: int = 6):
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(in_channels, 32, 3, 2)]
        cin = 32
        for expand, cout, blocks, stride in MOBILENET_STAGES:
            for i in range(blocks):
                n = len(layers)
                layers.append(InvertedResidual(cin, cout, 1 if i or n == MOBILENET_UNSTRIDED else stride, expand,
                                               2 if n >= MOBILENET_DILATED_FROM else 1))
                cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        skips = [x]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                skips.append(x)
        return (x, *reversed(skips))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride in the 3x3 conv), expansion 4, optional ``downsample`` projection."""

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetBackbone(nn.Module):
    """ResNet-50/101 without pooling head; layer4 dilated (output stride 16)."""

    CHANNELS = (2048, 512, 256, 64)

    def __init__(self, variant: str, in_channels: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for n, (planes, blocks) in enumerate(zip((64, 128, 256, 512), RESNET_BLOCKS[variant]), start=1):
            stride = 2 if n in (2, 3) else 1
            dilation = 2 if n == 4 else 1
            layer = []
            for i in range(blocks):  # layer4's first block keeps dilation 1, the rest use 2
                layer.append(Bottleneck(cin, planes, stride if i == 0 else 1, 1 if i == 0 else dilation))
                cin = planes * 4
            setattr(self, f"layer{n}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x1 = self.relu(self.bn1(self.conv1(x)))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer2(x2)
        x4 = self.layer4(self.layer3(x3))
        return x4, x3, x2, x1, x


class PoolingBranch(nn.Sequential):
    """ASPP image-level branch: global average -> 1x1 conv -> norm -> ReLU, spread back over the map."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, rates=(3, 6, 9), cout: int = 256):
        super().__init__()
        branches: list[nn.Module] = [ConvNormAct(cin, cout, 1, act=nn.ReLU)]
        branches += [ConvNormAct(cin, cout, 3, dilation=r, act=nn.ReLU) for r in rates]
        branches.append(PoolingBranch(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(cout * len(branches), cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class Decoder(nn.Module):
    """Four x2 steps, each: bilinear upsample to the skip's size, concatenate the skip, 3x3 conv."""

    def __init__(self, skips: tuple[int, int, int, int], widths=(256, 128, 64, 48), out_channels: int = 5 + HIDDEN):
        super().__init__()
        outs = (*widths[1:], out_channels)
        for n, (c_in, c_skip, c_out) in enumerate(zip(widths, skips, outs), start=1):
            setattr(self, f"conv{n}", nn.Conv2d(c_in + c_skip, c_out, 3, padding=1, bias=n == 4))
            if n < 4:
                setattr(self, f"bn{n}", nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        for n, skip in enumerate(skips, start=1):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = getattr(self, f"conv{n}")(torch.cat([x, skip], dim=1))
            if n < 4:
                x = self.relu(getattr(self, f"bn{n}")(x))
        return x


def _cells(i: torch.Tensor, step: int, margin: int) -> torch.Tensor:
    """Pixel indices ``[P, step + 2 margin]`` of grid cells ``i`` (cell size ``step``) with a margin."""
    return i[:, None] * step + (torch.arange(step + 2 * margin, device=i.device) - margin)


def _gather(x: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[b, :, rows, cols]`` for per-patch row/column lists ``[P, s]`` -> ``[P, s, s, C]``."""
    return x[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]


def _patches(x: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor, step: int,
             margin: int) -> torch.Tensor:
    """Square crops ``[P, C, step + 2 margin, same]`` of ``x`` ``[B,C,H,W]`` at cells ``(b, i, j)`` of a
    ``step``-pixel grid, ``margin`` pixels around each; outside the image is 0 (as zero padding would give),
    without padding (copying) the whole map."""
    h, w = x.shape[-2:]
    rows, cols = _cells(i, step, margin), _cells(j, step, margin)
    out = _gather(x, b, rows.clamp(0, h - 1), cols.clamp(0, w - 1))
    if margin:
        vr = ((rows >= 0) & (rows < h)).to(out.dtype)
        vc = ((cols >= 0) & (cols < w)).to(out.dtype)
        out = out * vr[:, :, None, None] * vc[:, None, :, None]
    return out.permute(0, 3, 1, 2)


def _bilinear_axis(idx: torch.Tensor, n_in: int, n_out: int, dtype):
    """Source taps of ``F.interpolate(..., mode="bilinear", align_corners=False)`` resizing ``n_in`` -> ``n_out``
    along one axis, at output indices ``idx`` (out-of-range ones get zero weights, like zero padding)."""
    src = ((idx.to(dtype) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    lam = (src - i0.to(dtype)).clamp(0, 1)
    valid = ((idx >= 0) & (idx < n_out)).to(dtype)
    return i0, (i0 + 1).clamp(max=n_in - 1), (1 - lam) * valid, lam * valid


def _resized_patches(x: torch.Tensor, size: tuple[int, int], b, i, j, step: int, margin: int) -> torch.Tensor:
    """``_patches(F.interpolate(x, size, bilinear), ...)`` without resizing the whole map: each patch pixel is
    interpolated from its 4 source taps (same formula as the resize; equal up to float rounding)."""
    r0, r1, wr0, wr1 = _bilinear_axis(_cells(i, step, margin), x.shape[-2], size[0], x.dtype)
    c0, c1, wc0, wc1 = _bilinear_axis(_cells(j, step, margin), x.shape[-1], size[1], x.dtype)
    wr0, wr1, wc0, wc1 = wr0[:, :, None, None], wr1[:, :, None, None], wc0[:, None, :, None], wc1[:, None, :, None]
    top = _gather(x, b, r0, c0) * wc0 + _gather(x, b, r0, c1) * wc1
    bottom = _gather(x, b, r1, c0) * wc0 + _gather(x, b, r1, c1) * wc1
    return (top * wr0 + bottom * wr1).permute(0, 3, 1, 2)


class Refiner(nn.Module):
    """Patch refiner; channels 32 (hidden) + 1 + 3 (coarse alpha, fg residual) + 6 (src, bgr) -> 24 -> 16,
    then + 6 (src, bgr at full resolution) -> 12 -> 4 (alpha, fg residual)."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        if kernel_size not in (1, 3):
            raise UserError(f"refiner kernel_size must be 1 or 3, got {kernel_size}")
        self.kernel_size = kernel_size
        k = kernel_size
        self.conv1 = nn.Conv2d(HIDDEN + 4 + 6, 24, k, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, k, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16 + 6, 12, k, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.conv4 = nn.Conv2d(12, 4, k, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def _stage1(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))

    def _stage2(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv4(self.relu(self.bn3(self.conv3(x))))

    @staticmethod
    def select(err: torch.Tensor, mode: str, sample_pixels: int, threshold: float,
               prevent_oversampling: bool = True) -> torch.Tensor:
        """Quarter-resolution error ``[B,1,h,w]`` -> refinement map (1 = refine that 4x4 patch)."""
        if mode == "thresholding":
            return (err > threshold).to(err.dtype)
        b = err.shape[0]
        flat = err.reshape(b, -1)
        k = min(max(int(sample_pixels) // 16, 0), flat.shape[1])
        ref = torch.zeros_like(flat)
        if k:
            ref.scatter_(1, flat.topk(k, dim=1, sorted=False).indices, 1.0)
        if prevent_oversampling:
            ref = ref * (flat > 0).to(ref.dtype)
        return ref.reshape(err.shape)

    def forward(self, src, bgr, pha, fgr, err, hid, *, mode: str = "sampling", sample_pixels: int = 80_000,
                threshold: float = 0.1, prevent_oversampling: bool = True, chunk: int = 4096):
        """Coarse ``pha``/``fgr``(residual)/``err``/``hid`` -> full-resolution (alpha, fg residual, ref map)."""
        H, W = src.shape[-2:]
        k3 = self.kernel_size == 3
        coarse = torch.cat([hid, pha, fgr], dim=1)
        if mode == "full":
            half = F.interpolate(coarse, (H // 2, W // 2), mode="bilinear", align_corners=False)
            y = F.interpolate(torch.cat([src, bgr], 1), (H // 2, W // 2), mode="bilinear", align_corners=False)
            x = torch.cat([half, y], 1)
            del half, y
            x = self._stage1(F.pad(x, (3,) * 4) if k3 else x)
            x = F.interpolate(x, (H + 4, W + 4) if k3 else (H, W), mode="nearest")
            y = torch.cat([src, bgr], 1)
            x = self._stage2(torch.cat([x, F.pad(y, (2,) * 4) if k3 else y], 1))
            ref = torch.ones(src.shape[0], 1, H // 4, W // 4, device=src.device, dtype=src.dtype)
            return x[:, :1], x[:, 1:], ref
        err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
        ref = self.select(err_q, mode, sample_pixels, threshold, prevent_oversampling)
        out = F.interpolate(torch.cat([pha, fgr], 1), (H, W), mode="bilinear", align_corners=False)
        b, i, j = ref[:, 0].nonzero(as_tuple=True)
        m1, m2 = (3, 2) if k3 else (0, 0)
        half = (H // 2, W // 2)
        for s in range(0, b.numel(), chunk):  # patches are independent: bounded memory for 4K
            pb, pi, pj = b[s:s + chunk], i[s:s + chunk], j[s:s + chunk]
            x = torch.cat([_resized_patches(t, half, pb, pi, pj, 2, m1) for t in (coarse, src, bgr)], 1)
            x = F.interpolate(self._stage1(x), scale_factor=2, mode="nearest")
            x = self._stage2(torch.cat([x, _patches(src, pb, pi, pj, 4, m2), _patches(bgr, pb, pi, pj, 4, m2)], 1))
            rows, cols = _cells(pi, 4, 0), _cells(pj, 4, 0)
            out[pb[:, None, None], :, rows[:, :, None], cols[:, None, :]] = x.permute(0, 2, 3, 1)
        return out[:, :1], out[:, 1:], ref


# -------------------------------------------------------------------------------------------- models
class MattingBase(nn.Module):
    """Backbone + ASPP + decoder on the full input: ``(src, bgr)`` ``[B,3,H,W]`` RGB 0..1 ->
    ``(pha, fgr, err, hid)`` with ``fgr`` the straight foreground colour (residual + src, clamped)."""

    multiple = 1  # any size works (the decoder resamples to every skip's size)

    def __init__(self, backbone: str = "mobilenetv2"):
        super().__init__()
        if backbone not in BACKBONES:
            raise UserError(f"unknown BackgroundMattingV2 backbone {backbone!r} (one of {', '.join(BACKBONES)})")
        self.backbone_name = backbone
        if backbone == "mobilenetv2":
            self.backbone = MobileNetV2Backbone(6)
            top, skips = MobileNetV2Backbone.CHANNELS[0], MobileNetV2Backbone.CHANNELS[1:]
        else:
            self.backbone = ResNetBackbone(backbone, 6)
            top, skips = ResNetBackbone.CHANNELS[0], ResNetBackbone.CHANNELS[1:]
        self.aspp = ASPP(top)
        self.decoder = Decoder((*skips, 6))

    def coarse(self, src: torch.Tensor, bgr: torch.Tensor):
        """Raw heads: (alpha clamped, fg residual, error clamped, hidden ReLU)."""
        x, *skips = self.backbone(torch.cat([src, bgr], dim=1))
        x = self.decoder(self.aspp(x), *skips)
        return x[:, :1].clamp(0, 1), x[:, 1:4], x[:, 4:5].clamp(0, 1), x[:, 5:].relu()

    def forward(self, src: torch.Tensor, bgr: torch.Tensor):
        pha, res, err, hid = self.coarse(src, bgr)
        return pha, (res + src).clamp(0, 1), err, hid


class MattingRefine(MattingBase):
    """Base at ``backbone_scale`` + patch refiner -> ``(pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm)``.

    ``forward`` takes per-call overrides of ``backbone_scale`` / ``refine_mode`` / ``sample_pixels`` /
    ``threshold`` / ``prevent_oversampling`` (the constructor's values are the defaults). Height and width
    must be multiples of 4 (:attr:`multiple`; :func:`refine_with_bmv2` pads)."""

    multiple = 4

    def __init__(self, backbone: str = "mobilenetv2", backbone_scale: float = 0.25, refine_mode: str = "sampling",
                 sample_pixels: int = 80_000, threshold: float = 0.1, kernel_size: int = 3,
                 prevent_oversampling: bool = True):
        super().__init__(backbone)
        self.backbone_scale = backbone_scale
        self.refine_mode = refine_mode
        self.sample_pixels = sample_pixels
        self.threshold = threshold
        self.prevent_oversampling = prevent_oversampling
        _check_options(backbone_scale, refine_mode)
        self.refiner = Refiner(kernel_size)

    def forward(self, src: torch.Tensor, bgr: torch.Tensor, *, backbone_scale: float | None = None,
                refine_mode: str | None = None, sample_pixels: int | None = None, threshold: float | None = None,
                prevent_oversampling: bool | None = None):
        scale = self.backbone_scale if backbone_scale is None else backbone_scale
        mode = self.refine_mode if refine_mode is None else refine_mode
        _check_options(scale, mode)
        if src.shape != bgr.shape:
            raise UserError(f"src {tuple(src.shape)} and bgr {tuple(bgr.shape)} differ in shape")
        H, W = src.shape[-2:]
        if H % 4 or W % 4:
            raise UserError(f"MattingRefine needs height and width divisible by 4, got {W}x{H}")
        size = (max(1, math.floor(H * scale)), max(1, math.floor(W * scale)))
        src_sm = F.interpolate(src, size, mode="bilinear", align_corners=False)
        bgr_sm = F.interpolate(bgr, size, mode="bilinear", align_corners=False)
        pha_sm, res_sm, err_sm, hid_sm = self.coarse(src_sm, bgr_sm)
        pha, res, ref_sm = self.refiner(
            src, bgr, pha_sm, res_sm, err_sm, hid_sm, mode=mode,
            sample_pixels=self.sample_pixels if sample_pixels is None else sample_pixels,
            threshold=self.threshold if threshold is None else threshold,
            prevent_oversampling=self.prevent_oversampling if prevent_oversampling is None else prevent_oversampling)
        return (pha.clamp(0, 1), (res + src).clamp(0, 1), pha_sm, (res_sm + src_sm).clamp(0, 1), err_sm, ref_sm)


def _check_options(scale: float, mode: str) -> None:
    if not 0 < scale <= 0.5:
        raise UserError(f"backbone_scale must lie in (0, 1/2], got {scale}")
    if mode not in REFINE_MODES:
        raise UserError(f"refine_mode must be one of {', '.join(REFINE_MODES)}, got {mode!r}")


# -------------------------------------------------------------------------------------------- weights
def load_bmv2_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a BackgroundMattingV2 state dict from ``.safetensors`` or ``.pth`` (no code is ever run: a
    ``.pth`` is unpickled with ``weights_only=True`` and must be a flat mapping of names to tensors, possibly
    under a single ``state_dict`` key; a ``module.`` prefix from DataParallel training is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"BackgroundMattingV2 weights not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a malformed header
            raise UserError(f"{path.name}: not a readable safetensors file ({exc})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path.name}: refused: not a plain tensor state dict (only tensors are loaded, "
                            f"never pickled code; {first[:200]})") from None
    if isinstance(sd, Mapping) and set(sd) == {"state_dict"}:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise UserError(f"{path.name}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path.name}: refused: {len(bad)} entries are not tensors (e.g. {str(bad[0])[:80]!r})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def infer_bmv2_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """Backbone, refiner presence and refiner kernel size from the keys/shapes of a state dict."""
    if "backbone.features.0.0.weight" in sd:
        backbone = "mobilenetv2"
    elif "backbone.conv1.weight" in sd:
        backbone = "resnet101" if "backbone.layer3.22.conv1.weight" in sd else "resnet50"
    else:
        raise UserError("not a BackgroundMattingV2 state dict: neither backbone.features.0.0.weight (MobileNetV2) "
                        "nor backbone.conv1.weight (ResNet) is present")
    refine = "refiner.conv1.weight" in sd
    kernel = int(sd["refiner.conv1.weight"].shape[-1]) if refine else 3
    return {"backbone": backbone, "refine": refine, "kernel_size": kernel}


def build_bmv2(backbone: str = "mobilenetv2", refine: bool = True, kernel_size: int = 3, **options) -> MattingBase:
    """A fresh (random) model: ``MattingRefine`` (``options``: its constructor arguments) or ``MattingBase``."""
    if refine:
        return MattingRefine(backbone, kernel_size=kernel_size, **options)
    return MattingBase(backbone)


def bmv2_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "state dict", **options) -> MattingBase:
    """Model of the variant ``sd`` describes with ``sd`` loaded strictly (every key, every shape); eval mode."""
    cfg = infer_bmv2_config(sd)
    with torch.device("meta"):  # no random init: every tensor comes from sd (strict), assigned as is
        model = build_bmv2(**cfg, **(options if cfg["refine"] else {}))
    try:
        model.load_state_dict(dict(sd), strict=True, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
        raise UserError(f"{name}: does not match BackgroundMattingV2 {cfg['backbone']}"
                        f"{' + refiner' if cfg['refine'] else ''}: {' '.join(lines)[:400]}") from None
    return model.eval()


def load_bmv2(path: str | os.PathLike, **options) -> MattingBase:
    """Weights file (``.pth`` / ``.safetensors``) -> model in eval mode on the CPU (float32)."""
    return bmv2_from_state_dict(load_bmv2_state_dict(path), Path(path).name, **options).float()


def convert_bmv2(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> dict:
    """``.pth`` (or ``.safetensors``) -> ``.safetensors`` with the same keys and tensors, after checking that
    the weights load strictly into the variant they describe. Never overwrites unless asked."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise UserError(f"output must end in .safetensors, got {dst.name}")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists (use --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise UserError("input and output are the same file")
    sd = load_bmv2_state_dict(src)
    bmv2_from_state_dict(sd, src.name)  # refuse to write weights that would not load
    cfg = infer_bmv2_config(sd)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(tmp),
              metadata={"architecture": "BackgroundMattingV2", "backbone": cfg["backbone"],
                        "refine": str(cfg["refine"]).lower(), "kernel_size": str(cfg["kernel_size"]),
                        "source": src.name})
    os.replace(tmp, dst)
    return {**cfg, "tensors": len(sd), "parameters": int(sum(v.numel() for v in sd.values() if v.is_floating_point())),
            "output": str(dst)}


# -------------------------------------------------------------------------------------------- running
def auto_backbone_scale(height: int, width: int) -> float:
    """The authors' advice (1/4 for HD, 1/8 for 4K) generalised: the backbone sees a long side of ~480-1024
    px: 1/2 up to 1024 px, 1/4 up to 2048 px, 1/8 above (4K)."""
    side = max(height, width)
    return 0.5 if side <= 1024 else 0.25 if side <= 2048 else 0.125


def auto_sample_pixels(height: int, width: int) -> int:
    """80,000 refined pixels per HD frame (the authors' HD setting; 4K gets their 320,000), at least 80,000."""
    return max(80_000, int(round(80_000 * height * width / HD_PIXELS)))


@torch.no_grad()
def refine_with_bmv2(model: MattingBase, image: torch.Tensor, plate: torch.Tensor, *,
                     backbone_scale: float | None = None, refine_mode: str | None = None,
                     sample_pixels: int | None = None, threshold: float | None = None,
                     multiple: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BackgroundMattingV2 on ComfyUI-layout images: ``image`` and its clean backdrop ``plate``
    ``[B,H,W,3]`` (0..1; batches of 1 broadcast) -> (alpha ``[B,H,W]``, 1 = foreground; straight foreground
    ``[B,H,W,3]``), on the image's device.

    Runs one image at a time on the model's device/dtype, padded bottom/right (edge replicated) to the
    model's multiple (4 for ``MattingRefine``) and cropped back. ``None`` settings: the model's own for
    ``refine_mode`` (``sampling`` by default) and ``threshold``; :func:`auto_backbone_scale` and
    :func:`auto_sample_pixels` for the image size (a 4K frame: backbone at 1/8, 320,000 refined pixels, a
    few GB of memory at most). A ``MattingBase`` model runs at full resolution (no refiner)."""
    image = as_image(image, "image")[..., :3].clamp(0, 1)
    plate = as_image(plate, "plate")[..., :3].clamp(0, 1)
    if image.shape[1:3] != plate.shape[1:3]:
        raise UserError(f"image {tuple(image.shape[1:3])} and plate {tuple(plate.shape[1:3])} differ in size")
    image, plate = broadcast_batch(image, plate, names=["image", "plate"])
    p = next(model.parameters())
    B, H, W, _ = image.shape
    mult = int(multiple or model.multiple)
    ph, pw = (-H) % mult, (-W) % mult
    refine = hasattr(model, "refiner")  # duck-typed: ComfyUI may import this module under another name
    opts = {}
    if refine:
        opts = dict(backbone_scale=backbone_scale or auto_backbone_scale(H + ph, W + pw),
                    refine_mode=refine_mode, threshold=threshold,
                    sample_pixels=sample_pixels or auto_sample_pixels(H + ph, W + pw))
    alpha = torch.empty(B, H, W, device=image.device)
    fg = torch.empty(B, H, W, 3, device=image.device)
    for i in range(B):
        src, bgr = (t[i:i + 1].to(p.device, p.dtype).permute(0, 3, 1, 2) for t in (image, plate))
        if ph or pw:
            src, bgr = (F.pad(t, (0, pw, 0, ph), mode="replicate") for t in (src, bgr))
        src, bgr = src.contiguous(), bgr.contiguous()
        out = model(src, bgr, **opts)
        alpha[i] = out[0][0, 0, :H, :W].to(alpha)
        fg[i] = out[1][0, :, :H, :W].permute(1, 2, 0).to(fg)
        del out
    return alpha, fg


def garbage_matte_bound(mask: torch.Tensor, margin: float = 0.02, work_size: int = 256) -> torch.Tensor:
    """Upper bound for alpha from a coarse alpha mask ``[B,H,W]`` (1 = foreground) used as a garbage matte,
    as GreenPost applies it: ``mask > 0.5`` dilated by ``margin`` x the image diagonal (at <= ``work_size`` px,
    square dilation), bilinearly upsampled. Outside the dilated mask the bound is 0."""
    B, H, W = mask.shape
    f = max(1, math.ceil(max(H, W) / work_size))
    cover = F.avg_pool2d(mask[:, None].float(), f, ceil_mode=True) if f > 1 else mask[:, None].float()
    h, w = cover.shape[-2:]
    r = max(1, round(margin * math.hypot(h, w)))
    allowed = F.max_pool2d((cover > 0.5).float(), 2 * r + 1, 1, r)
    if f > 1:
        allowed = F.interpolate(allowed, size=(h * f, w * f), mode="bilinear", align_corners=False)[..., :H, :W]
    return allowed[:, 0].clamp(0, 1)
