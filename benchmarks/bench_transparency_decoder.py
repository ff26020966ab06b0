"""Cost of one transparency-decoder pass against one SD VAE decode, same run, same device.

The SD VAE is diffusers' AutoencoderKL with Stable Diffusion's architecture (block_out_channels 128/256/512/512,
2 layers per block, mid-block attention, 4 latent channels) and random weights: speed does not depend on the
weights. The decoder is the shipped default config, one untiled pass without TTA (what DRIP Decode runs per
image on top of its two plain VAE decodes). Prints JSON; exit code 1 if a ratio exceeds --max-ratio.

    python benchmarks/bench_transparency_decoder.py [--sizes 512,1024] [--repeats 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch



def _timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up (allocator, kernels)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1024", help="square image sizes in px (multiples of 8)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best is kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-ratio", type=float, default=1.0)
    ap.add_argument("--data", default=None, help="unused (the benchmark is synthetic); accepted for uniformity")
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL

    from diffusion_matting.py.transparency_decoder import TransparencyDecoder, TransparencyDecoderConfig

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                        norm_num_groups=32).to(dev).eval()
    config = TransparencyDecoderConfig()
    decoder = TransparencyDecoder(config).to(dev).eval()
    with torch.no_grad():  # trained-like: non-zero output convs (zero weights would not change the cost anyway)
        for conv in (decoder.conv_out, decoder.hint_fg.zero, decoder.hint_alpha.zero):
            conv.weight.normal_(0, 0.02)
    result = {
        "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "decoder_config": json.loads(config.to_json()),
        "decoder_params_m": round(sum(p.numel() for p in decoder.parameters()) / 1e6, 3),
        "vae_decoder_params_m": round(sum(p.numel() for p in vae.decoder.parameters()) / 1e6, 3),
        "sizes": {},
    }
    ok = True
    for size in [int(s) for s in args.sizes.split(",")]:
        lat = size // 8
        z = torch.randn(1, 4, lat, lat, device=dev)
        img = torch.rand(1, 3, size, size, device=dev)
        tri = torch.full((1, 1, size, size), 0.5, device=dev)
        alpha = torch.rand(1, 1, size, size, device=dev)
        with torch.inference_mode():
            t_vae = _timed(lambda: vae.decode(z), args.repeats, sync)
            t_dec = _timed(lambda: decoder(img, tri, img, alpha, z, z), args.repeats, sync)
        ratio = t_dec / t_vae
        ok &= ratio <= args.max_ratio
        result["sizes"][str(size)] = {"vae_decode_s": round(t_vae, 3), "decoder_pass_s": round(t_dec, 3),
                                      "ratio": round(ratio, 4), "ok": ratio <= args.max_ratio}
        print(f"{size}px: VAE decode {t_vae:.2f}s, decoder {t_dec:.2f}s, ratio {ratio:.3f}", file=sys.stderr, flush=True)
    result["ok"] = ok
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
