"""Build a green-screen stress set: the ground-truth foregrounds and alphas of a green-screen set, re-shot
on backdrop conditions the source set does not use, for judging how a keyer generalises.

    python benchmarks/make_stress_set.py OUT [--src ../shared/data/greenscreen] [--style uneven]
        [--dim 0.7] [--noise 0.02] [--jpeg 70] [--spill 0.2] [--seed 0]
    python benchmarks/bench_greenpost.py --data OUT --no-4k --stream-frames 0

Each case ``<src>/<case>/{fg,alpha}.png`` (straight foreground, alpha) is composited as
``I = a F_s + (1 - a) B`` with

* ``B``: :func:`diffusion_matting.py.samples.render_plate` (``--style`` pure / studio / uneven) in one of four
  greens that differ from the usual studio green (dull, bright bluish, yellowish, dark), cycling over the
  cases, and exposed at a random gain in ``[dim, 1]`` (a dim screen has a weak key signal);
* spill, sensor noise and JPEG as in the shipped samples (:func:`diffusion_matting.py.samples.shoot`):
  ``F_s = clip(F + spill * sqrt(1 - a) * max(B - mean(F), 0))``, screen light spilling onto thin and
  translucent parts (the ground truth stays the spill-free ``F``); Gaussian noise of std ``--noise``;
  JPEG at quality ``--jpeg`` (100 = none: saved as 8-bit PNG).

Writes ``OUT/<case>/{image,alpha,fg}.png`` (the layout ``bench_greenpost.py --data`` reads); refuses a
non-empty ``OUT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "greenscreen"
GREENS = [(0.20, 0.55, 0.25), (0.05, 0.80, 0.35), (0.30, 0.70, 0.15), (0.10, 0.45, 0.20)]


def _load(path: Path, mode: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert(mode), dtype=np.float32) / 255.0


def main(argv: list[str] | None = None) -> int:
    from diffusion_matting.py.samples import render_plate, shoot

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="<case>/{fg,alpha}.png")
    ap.add_argument("--style", default="uneven", choices=("pure", "studio", "uneven"))
    ap.add_argument("--dim", type=float, default=0.7, help="screen exposure gain drawn from [dim, 1]")
    ap.add_argument("--noise", type=float, default=0.02, help="sensor noise std (0..1 units)")
    ap.add_argument("--jpeg", type=int, default=70, help="JPEG quality (100 = lossless PNG)")
    ap.add_argument("--spill", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0.0 < args.dim <= 1.0 or args.noise < 0 or not 1 <= args.jpeg <= 100:
        ap.error("--dim must be in (0, 1], --noise >= 0, --jpeg in 1..100")
    cases = sorted(p.name for p in args.src.iterdir() if (p / "fg.png").is_file() and (p / "alpha.png").is_file()) \
        if args.src.is_dir() else []
    if not cases:
        print(f"error: no <case>/fg.png + alpha.png under {args.src}", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty", file=sys.stderr)
        return 2
    for i, case in enumerate(cases):
        fg, alpha = _load(args.src / case / "fg.png", "RGB"), _load(args.src / case / "alpha.png", "L")
        rng = np.random.default_rng(args.seed * 1000 + i)
        plate = render_plate(*alpha.shape, style=args.style, color=GREENS[i % len(GREENS)], seed=args.seed * 1000 + 50 + i)
        plate = plate * rng.uniform(args.dim, 1.0)
        out = args.out / case
        out.mkdir(parents=True)
        image = shoot(fg, alpha, plate, args.spill, args.noise, args.jpeg if args.jpeg < 100 else None, rng)
        Image.fromarray((image * 255.0 + 0.5).astype(np.uint8)).save(out / "image.png")
        Image.fromarray((alpha * 255.0 + 0.5).astype(np.uint8)).save(out / "alpha.png")
        Image.fromarray((fg * 255.0 + 0.5).astype(np.uint8)).save(out / "fg.png")
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
