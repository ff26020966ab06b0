"""Cost of DiffuMatting's matting head: VAE decode + head (one decoder pass, feature tapped with a hook) vs
the plain ``vae.decode``, same weights, same latents, same process.

Prints JSON: per size the best (min) and median wall times of both, their ratio (target <= 1.05), the
head-only time, and the settings. With ``--tile N`` (latent px, default 32; 0 = off) a third variant,
decode + head tiled with GroupNorm statistics shared across tiles (``decoder_tiles``), is timed too
(``tiled_vs_untiled``: its cost relative to the untiled decode + head; ``tiled_max_abs_alpha`` /
``tiled_max_abs_rgb``: its difference from the untiled result). The VAE is a random-weight diffusers ``AutoencoderKL`` with the real SD
VAE architecture (block_out_channels 128-256-512-512, 2 layers per block, 4 latent channels; SD1.5 and
SDXL VAEs share it), so no weights are needed. CPU by default; the two variants are interleaved so load
changes on a shared machine hit both alike.

    python benchmarks/bench_matting_head.py [--sizes 512 1024] [--repeats 3] [--repeats-large 1] [--tile 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from diffusion_matting.py.matting_head import MattingHead, decode_with_matte, diffusers_decode_fn


def sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval()


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes in pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant below 1024 px")
    p.add_argument("--repeats-large", type=int, default=1, help="timed repeats per variant at >= 1024 px")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant at the smallest size")
    p.add_argument("--tile", type=int, default=32, help="latent px per tile for the tiled variant (0 = skip it)")
    p.add_argument("--overlap", type=int, default=8, help="tile overlap in latent px")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="unused (benchmarks share the --data convention)")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    vae = sd_vae().to(dev)
    torch.manual_seed(1)
    head = MattingHead().eval().to(dev)
    decode_fn = diffusers_decode_fn(vae)

    def plain(z):
        return vae.decode(z).sample

    def with_head(z):
        return decode_with_matte(z, decode_fn, head)

    def tiled(z):
        return decode_with_matte(z, decode_fn, head, tile=args.tile, overlap=args.overlap)

    results = []
    with torch.no_grad():
        for i, size in enumerate(sorted(args.sizes)):
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size)).to(dev)
            if i == 0:
                for _ in range(args.warmup):
                    plain(z), with_head(z)
            reps = args.repeats_large if size >= 1024 else args.repeats
            times = {"plain": [], "decode_with_head": []}
            cpu = {"plain": [], "decode_with_head": []}
            for r in range(reps):
                order = (("plain", plain), ("decode_with_head", with_head))
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    _sync(dev)
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = fn(z)
                    _sync(dev)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    if name == "decode_with_head":
                        ref = out  # the untiled result the tiled variant is compared with
                    del out
            tiled_res = {}
            if args.tile:
                _sync(dev)
                t0 = time.perf_counter()
                out = tiled(z)
                _sync(dev)
                tiled_s = time.perf_counter() - t0
                tiled_res = {"tiled_s": round(tiled_s, 3), "tiles": out.tiles, "tile_latent_px": args.tile,
                             "tiled_vs_untiled": round(tiled_s / min(times["decode_with_head"]), 4),
                             "tiled_max_abs_alpha": float((out.matte - ref.matte).abs().max()),
                             "tiled_max_abs_rgb": float((out.rgb - ref.rgb).abs().max())}
                del out
            del ref
            # head alone on a feature of this size (what the tap adds besides the hook)
            feat = torch.randn(1, 128, size, size, device=dev)
            _sync(dev)
            t0 = time.perf_counter()
            head(feat)
            _sync(dev)
            head_s = time.perf_counter() - t0
            del feat
            res = {
                "size": size, "repeats": reps,
                "plain_s": {"min": round(min(times["plain"]), 3), "median": round(statistics.median(times["plain"]), 3)},
                "decode_with_head_s": {"min": round(min(times["decode_with_head"]), 3),
                                       "median": round(statistics.median(times["decode_with_head"]), 3)},
                "ratio_min": round(min(times["decode_with_head"]) / min(times["plain"]), 4),
                "ratio_median": round(statistics.median(times["decode_with_head"]) / statistics.median(times["plain"]), 4),
                "ratio_cpu_time": round(min(cpu["decode_with_head"]) / min(cpu["plain"]), 4),
                "head_only_s": round(head_s, 3),
                **tiled_res,
            }
            res["pass"] = res["ratio_min"] <= 1.05
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)

    print(json.dumps({
        "benchmark": "matting_head_decode_overhead",
        "target_ratio": 1.05,
        "pass": all(r["pass"] for r in results),
        "results": results,
        "settings": {"device": str(dev), "vae": "AutoencoderKL SD architecture (128,256,512,512) x2, random",
                     "head": "MattingHead(128->64->1, 3x3)", "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
