"""README pictures: key the shipped procedural samples (samples/*.png) with GreenPost and write one
before/after strip per sample to docs/examples/<sample>.jpg:

    input | RGBA cut-out on a checkerboard | alpha (white = foreground)

with a caption line (sample, key colour found, alpha SAD / MSE against the sample's exact ground truth in
samples/gt/). Deterministic: rerunning with the same GreenPost rewrites the same pictures. No weights, no downloads, CPU is fine:

    .venv/bin/python scripts/make_readme_examples.py [--samples samples] [--out docs/examples]

Each JPEG is kept under --max-kb (150 KB by default) by lowering the quality.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]

from diffusion_matting.py import alpha as A  # noqa: E402  (the pack, installed: pip install -e .)
from diffusion_matting.py import metrics  # noqa: E402
from diffusion_matting.py.greenpost import color_hex, greenpost  # noqa: E402
from diffusion_matting.py.imageio import list_images, load_image, load_mask  # noqa: E402

CAPTION_PX = 22
GAP_PX = 6


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """[H,W,C] -> longest side ``size`` (area resampling)."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return F.interpolate(img.permute(2, 0, 1)[None].float(), size=(nh, nw), mode="area")[0].permute(1, 2, 0)


def strip(image: torch.Tensor, fg: torch.Tensor, alpha: torch.Tensor, caption: str, cell: int) -> Image.Image:
    """input | checkerboard preview of the straight RGBA | alpha, with a caption below."""
    preview = A.preview(fg[None], alpha[None], mode="checkerboard")[0]
    cells = [_fit(c, cell) for c in (image[..., :3], preview, alpha[..., None].expand(*alpha.shape, 3))]
    h = max(c.shape[0] for c in cells)
    w = sum(c.shape[1] for c in cells) + GAP_PX * (len(cells) - 1)
    canvas = Image.new("RGB", (w, h + CAPTION_PX), "white")
    x = 0
    for c in cells:
        arr = (c.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        canvas.paste(Image.fromarray(arr), (x, (h - c.shape[0]) // 2))
        x += c.shape[1] + GAP_PX
    draw = ImageDraw.Draw(canvas)
    draw.text((4, h + 4), caption, fill=(20, 20, 20), font=ImageFont.load_default())
    return canvas


def save_jpeg(img: Image.Image, path: Path, max_bytes: int) -> int:
    for q in (90, 85, 80, 75, 70, 60, 50, 40):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q, optimize=True, progressive=True, subsampling=0 if q >= 80 else 2)
        if buf.tell() <= max_bytes:
            break
    else:
        raise SystemExit(f"{path.name}: over {max_bytes} bytes even at quality {q}; use a smaller --cell")
    path.write_bytes(buf.getvalue())
    return buf.tell()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default=str(REPO / "samples"), help="folder of images (gt/ beside them optional)")
    p.add_argument("--out", default=str(REPO / "docs" / "examples"))
    p.add_argument("--cell", type=int, default=320, help="size of each of the three panels (px)")
    p.add_argument("--max-kb", type=int, default=150)
    args = p.parse_args(argv)

    samples, out = Path(args.samples), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = list_images([samples])
    if not paths:
        raise SystemExit(f"no images in {samples}")
    for path in paths:
        image, _ = load_image(path)
        res = greenpost(image)
        fg, alpha = res.foreground[0].cpu(), res.alpha[0].cpu()
        parts = [path.stem, f"key {color_hex(res.key_color[0].tolist())}"]
        gt = samples / "gt" / f"{path.stem}_alpha.png"
        if gt.is_file():
            truth = load_mask(gt).reshape(alpha.shape)
            parts.append(f"alpha SAD {metrics.sad(alpha, truth):.2f}  MSE {metrics.mse(alpha, truth) * 1e3:.2f}e-3 (vs exact GT)")
        img = strip(image[0], fg, alpha, "   ".join(parts), args.cell)
        dst = out / f"{path.stem}.jpg"
        n = save_jpeg(img, dst, args.max_kb * 1024)
        print(f"{dst}  {img.size[0]}x{img.size[1]}  {n / 1024:.0f} KB  ({'; '.join(parts[1:])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
