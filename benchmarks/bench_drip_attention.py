"""Cost of DRIP's cross-domain attention: one sampling step (one UNet call on the doubled fg/alpha batch)
with joint attention vs plain self-attention, same weights, same inputs, same run.

Prints JSON: per-step min and median times over interleaved repeats, the ratio of the minima (target
<= 1.15; minima are least disturbed by other load), the median ratio, and the settings. CPU by default, at a
small image size, with the real SD1.5/SD2 UNet architecture and random weights (no weights needed; about
3.5 GB of RAM, ~10 s per step on one core). ``--channels 64,128,256,256 --layers 1`` gives a quick
reduced variant (there the narrow 8-dim heads make attention a larger share of the step).

    python benchmarks/bench_drip_attention.py [--family sd15|sd2] [--size 256] [--pairs 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from diffusion_matting.py.drip import model as M
from diffusion_matting.py.drip.attention import set_cross_domain


def build(family: str, channels: list[int], layers: int):
    cfg = M.base_config(family)
    cfg["block_out_channels"] = channels
    cfg["layers_per_block"] = layers
    if family == "sd15":
        cfg["attention_head_dim"] = 8
    else:
        cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]
    torch.manual_seed(0)
    return M.build_unet(M.drip_config(cfg)).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd15", choices=("sd15", "sd2"))
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    p.add_argument("--pairs", type=int, default=1, help="fg/alpha pairs (UNet batch = 2 x pairs)")
    p.add_argument("--channels", default="320,640,1280,1280", help="block_out_channels (SD: 320,640,1280,1280)")
    p.add_argument("--layers", type=int, default=2, help="layers per block (SD: 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="unused (benchmarks share the --data convention)")
    args = p.parse_args(argv)
    chans = [int(c) for c in args.channels.split(",")]
    unet = build(args.family, chans, args.layers).to(args.device)
    h = args.size // 8
    b = 2 * args.pairs
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 12, h, h, generator=g).to(args.device)
    t = torch.full((b,), 500.0, device=args.device)
    width = unet.config.cross_attention_dim
    ctx = torch.randn(b, 77, width, generator=g).to(args.device)
    y = torch.randn(b, 4, generator=g).to(args.device)

    def step():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx, class_labels=y)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {"plain": [], "cross_domain": []}
    for mode in ("plain", "cross_domain"):  # warm-up both
        set_cross_domain(unet, mode == "cross_domain")
        step()
    for _ in range(args.repeats):  # interleaved so load changes hit both alike
        for mode in ("plain", "cross_domain"):
            set_cross_domain(unet, mode == "cross_domain")
            t0 = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratio_med = med["cross_domain"] / med["plain"]
    ratio = best["cross_domain"] / best["plain"]  # minima: least disturbed by other load on the machine
    print(json.dumps({
        "benchmark": "drip_cross_domain_attention",
        "family": args.family, "size_px": args.size, "latent": h, "unet_batch": b,
        "block_out_channels": chans, "layers_per_block": args.layers, "device": args.device,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "plain_min_s": round(best["plain"], 4), "cross_domain_min_s": round(best["cross_domain"], 4),
        "plain_median_s": round(med["plain"], 4), "cross_domain_median_s": round(med["cross_domain"], 4),
        "ratio": round(ratio, 3), "ratio_median": round(ratio_med, 3), "target_ratio": 1.15, "pass": ratio <= 1.15,
        "all_s": {k: [round(s, 4) for s in v] for k, v in times.items()},
        "python": platform.python_version(), "torch": torch.__version__,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
