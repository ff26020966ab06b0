"""Benchmark BackgroundMattingV2 as GreenPost's refiner on one 4K frame on the CPU: time and peak memory.

    python benchmarks/bench_background_matting.py [--data ../shared/data/greenscreen] [--weights FILE]
        [--backbone mobilenetv2] [--width 3840] [--height 2160] [--mode sampling] [--repeat 2]

Prints one JSON object. The frame is the first dev case's ``image.png`` upscaled to ``--width`` x ``--height``
(or, without the data, a procedural green-screen frame); GreenPost estimates the clean plate, then
:func:`diffusion_matting.py.background_matting.refine_with_bmv2` runs with the automatic 4K settings
(backbone at 1/8, 320,000 refined pixels in ``sampling`` mode) unless overridden. Without ``--weights`` the
network has random weights with trained-like BatchNorm statistics: the cost does not depend on the weights
(sampling mode refines a fixed number of patches), the matte does, so no quality is reported. Seconds are
wall-clock (best and median of ``--repeat`` runs after a warm-up at 1/4 size); memory is the process's
peak resident set (VmHWM) and its resident set before the first 4K run (python + torch + model + frame).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "greenscreen"
sys.path.insert(0, str(REPO.parent))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _frame(data: Path, width: int, height: int) -> tuple[torch.Tensor, str]:
    cases = sorted(p for p in data.glob("*/image.png")) if data.is_dir() else []
    if cases:
        from diffusion_matting.py.imageio import load_image

        img = load_image(cases[0])[0][..., :3]
        big = F.interpolate(img.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
        return big.permute(0, 2, 3, 1).clamp(0, 1).contiguous(), f"{cases[0].parent.name} (upscaled)"
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    subject = ((xs / 0.35) ** 2 + (ys / 0.7) ** 2 < 1).float()
    screen = torch.tensor([0.15, 0.75, 0.25]) * (1 - 0.15 * ys[..., None] ** 2)
    colour = torch.rand(3, generator=g) * 0.6 + 0.2
    img = subject[..., None] * colour + (1 - subject[..., None]) * screen
    return img.unsqueeze(0).clamp(0, 1), "procedural"


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif k.endswith(("running_mean", "bias")):
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
            elif v.ndim == 1:
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            else:
                v.copy_(torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--weights", type=Path, help="BackgroundMattingV2 .pth/.safetensors (default: random weights)")
    ap.add_argument("--backbone", default="mobilenetv2", choices=["mobilenetv2", "resnet50", "resnet101"])
    ap.add_argument("--width", type=int, default=3840)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--mode", default="sampling", choices=["sampling", "thresholding", "full"])
    ap.add_argument("--backbone-scale", type=float, default=None)
    ap.add_argument("--sample-pixels", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from diffusion_matting.py import background_matting as BM
    from diffusion_matting.py.greenpost import greenpost

    if args.weights:
        model = BM.load_bmv2(args.weights)
    else:
        model = BM.build_bmv2(args.backbone).eval()
        _randomize(model)
    image, source = _frame(args.data, args.width, args.height)
    opts = dict(backbone_scale=args.backbone_scale, refine_mode=args.mode, sample_pixels=args.sample_pixels)

    small = F.interpolate(image.permute(0, 3, 1, 2), scale_factor=0.25, mode="bilinear").permute(0, 2, 3, 1)
    BM.refine_with_bmv2(model, small, small * 0.5, **opts)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    res = greenpost(image)
    t_plate = time.perf_counter() - t0
    plate = res.plate.contiguous()
    del res
    rss_before = _status_mb("VmRSS")
    times = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        alpha, fg = BM.refine_with_bmv2(model, image, plate, **opts)
        times.append(time.perf_counter() - t0)
    H, W = args.height, args.width
    out = {
        "backbone": model.backbone_name, "weights": str(args.weights) if args.weights else "random",
        "size": [W, H], "frame": source, "refine_mode": args.mode,
        "backbone_scale": args.backbone_scale or BM.auto_backbone_scale(H, W),
        "sample_pixels": args.sample_pixels or BM.auto_sample_pixels(H, W),
        "threads": torch.get_num_threads(),
        "seconds": min(times), "seconds_median": statistics.median(times), "seconds_all": times,
        "greenpost_plate_seconds": t_plate,
        "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "alpha_range": [float(alpha.min()), float(alpha.max())], "fg_range": [float(fg.min()), float(fg.max())],
        "outputs": [list(alpha.shape), list(fg.shape)],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
