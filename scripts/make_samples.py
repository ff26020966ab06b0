"""Regenerate the shipped procedural demo samples in ``samples/`` (image + ground truth).

    .venv/bin/python scripts/make_samples.py

Writes ``samples/<name>.png`` (the green-screen composite a keyer sees) and
``samples/gt/<name>_alpha.png`` / ``samples/gt/<name>_fg.png`` (exact ground truth).
Everything is rendered by ``diffusion_matting.py.samples``; no third-party images.
"""

from pathlib import Path

import torch

from diffusion_matting.py.imageio import save_gray, save_rgb
from diffusion_matting.py.samples import DEMO_SAMPLES, make_sample


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "samples"
    (root / "gt").mkdir(parents=True, exist_ok=True)
    for name, kwargs in DEMO_SAMPLES:
        s = make_sample(height=384, width=384, **kwargs)
        save_rgb(root / f"{name}.png", torch.from_numpy(s.image))
        save_gray(root / "gt" / f"{name}_alpha.png", torch.from_numpy(s.alpha))
        save_rgb(root / "gt" / f"{name}_fg.png", torch.from_numpy(s.fg))
        print(root / f"{name}.png")


if __name__ == "__main__":
    main()
