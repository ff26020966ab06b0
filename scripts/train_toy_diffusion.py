"""Train the toy text-conditioned pixel diffusion model used as a test fixture (CPU, one thread, ~7-10 minutes).

    .venv/bin/python scripts/train_toy_diffusion.py --out tests/fixtures/toy_green_canvas.safetensors

Model, data and schedule are ``diffusion_matting.py.toy_diffusion`` (procedural 32x32 scenes: a
non-green subject on a studio-green or random background, prompts like "a tuft on green background").
eps-prediction loss at uniformly drawn discrete timesteps of SD's schedule, weighted by
min(1 + sigma^2, 25) (normalised) so the high-noise steps, where the prompt sets the colours, count,
plus a small background-word attention loss (DiffuMatting's green-background control loss, Eq. 3, in
toy form: the cross-attention of "green"/"random" should equal the background mask; a 10-minute toy's
attention otherwise barely localises, unlike SD's). AdamW with warm-up and cosine decay, EMA of the weights (the EMA weights are saved, as fp16 safetensors with the model config
in the metadata). Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusion_matting.py.toy_diffusion import TOKEN, ToyDenoiser, ToyUNet, discrete_sigmas, render_scenes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/toy_green_canvas.safetensors"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--weight-cap", type=float, default=25.0,
                    help="eps-loss weight min(1 + sigma^2, cap): v-prediction-like emphasis on high noise, where "
                         "the prompt decides the colours (plain eps loss barely sees them there)")
    ap.add_argument("--attn-loss", type=float, default=0.05,
                    help="weight of the background-word attention loss (DiffuMatting's green-background control "
                         "loss, Eq. 3, in toy form); 0 disables")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the model is small; extra threads mostly spin on a shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    unet = ToyUNet(ch=args.ch)
    den = ToyDenoiser(unet)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps))))
    sigmas = discrete_sigmas()
    weights = torch.clamp(1 + sigmas ** 2, max=args.weight_cap)
    weights = weights / weights.mean()
    bg_pos = 4  # "<s> a <subject> on <green|random> background": the background word's position
    bg_words = torch.tensor([TOKEN["green"], TOKEN["random"]])
    maps: list = []
    unet.attn_hook = lambda name, probs, hw, opts: maps.append((probs[..., bg_pos].mean(1), hw))
    t0 = time.time()
    run = 0.0
    for step in range(args.steps):
        x0, tokens, alpha, _ = render_scenes(args.batch, gen, drop_bg_phrase=0.15, drop_prompt=0.1)
        maps.clear()
        t = torch.randint(0, len(sigmas), (args.batch,), generator=gen)
        s = sigmas[t]
        eps = torch.randn(x0.shape, generator=gen)
        pred = den.eps(x0 + s[:, None, None, None] * eps, s, unet.encode_text(tokens))
        loss = torch.mean(weights[t] * ((pred - eps) ** 2).mean(dim=(1, 2, 3)))
        has_bg = torch.isin(tokens[:, bg_pos], bg_words)
        if args.attn_loss > 0 and has_bg.any():
            # the background word's attention (heads averaged) should be the background mask
            att = 0.0
            for a, (h, w) in maps:
                target = F.adaptive_avg_pool2d((1 - alpha)[:, None], (h, w)).flatten(1)
                att = att + ((a - target) ** 2)[has_bg].mean()
            loss = loss + args.attn_loss * att / len(maps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(args.ema, (step + 1) / (step + 10))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {run:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.0f}s", flush=True)
    unet.attn_hook = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
    meta = {"config": json.dumps(unet.config), "steps": str(args.steps), "batch": str(args.batch),
            "seed": str(args.seed), "weight_cap": str(args.weight_cap), "attn_loss": str(args.attn_loss), "trainer": "scripts/train_toy_diffusion.py",
            "train_seconds": f"{time.time() - t0:.0f}"}
    save_file(sd, str(args.out), metadata=meta)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, "seconds": round(time.time() - t0)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
