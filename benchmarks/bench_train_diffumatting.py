"""DiffuMatting training on CPU: a tiny SD1.5-architecture UNet (random init) + tiny VAE, procedural subjects on
the green canvas, all four losses (stage 1: L_noise + L_g + L_detail; stage 2: + L_latent with the head).

Prints JSON: held-out L_g (fixed timesteps/noise) before/after vs the best spatially constant map, the head's
IoU/SAD before/after, GSG of generated samples, the per-loss averages of the first and last 20 steps, and
seconds per step. Usage: ``python benchmarks/bench_train_diffumatting.py [--steps 300] [--resolution 16]``.
(No real data needed: the toy set is procedural; ``--data`` is accepted for the benchmark convention and
adds Green100K-style folders.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--family", default="sd15", choices=("sd15", "sd2"))
    ap.add_argument("--procedural", type=int, default=24)
    ap.add_argument("--data", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny ops: 1 is fastest)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusion_matting.py import train_diffumatting as TD
    from diffusion_matting.py.drip import model as M
    from diffusion_matting.py.green_dataset import GreenFolder, Mixture, ProceduralGreen

    torch.manual_seed(args.seed)
    unet = M.build_unet(M.base_config(args.family, tiny=True))
    data = Mixture([GreenFolder(d) for d in args.data] + [ProceduralGreen(args.procedural, 64, args.seed)])
    order = np.random.default_rng(args.seed).permutation(len(data))
    val, train = data.subset(order[:6]), data.subset(order[6:])
    cfg = TD.DiffuMattingConfig(steps=args.steps, stage1_steps=args.stage1_steps, batch_size=args.batch_size,
                                lr=args.lr, head_lr=args.lr, resolution=args.resolution, log_every=10 ** 9,
                                save_every=0, val_count=6, val_steps=10, seed=args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        res = TD.train_diffumatting(unet, TD.tiny_vae(args.seed), TD.HashTextEncoder(unet.config.cross_attention_dim),
                                    train, val, cfg, out, log=lambda *a: None, export={"dtype": torch.float32})
    secs = time.time() - t0

    def avg(rows, key):
        vals = [r[key] for r in rows if key in r]
        return round(float(np.mean(vals)), 5) if vals else None

    first, last = res["losses"][:20], res["losses"][-20:]
    keys = ("noise", "green", "detail", "latent", "loss")
    print(json.dumps({
        "config": {"steps": args.steps, "stage1_steps": args.stage1_steps, "resolution": args.resolution,
                   "family": args.family, "batch_size": args.batch_size, "lr": args.lr},
        "held_out_green_loss": {"initial": res["initial"].get("green_loss"), "final": res["final"].get("green_loss"),
                                "best_constant_map": res["final"].get("green_loss_constant_map")},
        "head": {"initial": res["initial"]["head"], "final": res["final"]["head"]},
        "gsg": {"initial": res["initial"]["gsg"], "final": res["final"]["gsg"], "data": res["final"]["gsg_data"],
                "vae_reconstruction": res["final"]["gsg_vae_recon"]},
        "train_loss_first20": {k: avg(first, k) for k in keys},
        "train_loss_last20": {k: avg(last, k) for k in keys},
        "sec_per_step": round(secs / args.steps, 4),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
