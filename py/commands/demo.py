"""``diffusion-matting demo``: key the shipped procedural samples, write RGBA PNGs and a contact sheet."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import metrics
from ..greenpost import greenpost
from ..contact_sheet import contact_sheet
from ..imageio import list_images, load_image, load_mask, save_rgb, save_rgba
from ..samples import DEMO_SAMPLES, make_sample

REPO_SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def register(sub) -> None:
    p = sub.add_parser("demo", help="key the shipped sample images (no weights, no downloads)",
                       description="Keys the procedural green/blue-screen samples with GreenPost, writes "
                                   "RGBA PNGs (straight colour) and a contact sheet (image | alpha | preview), "
                                   "and prints alpha metrics against the samples' exact ground truth.")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--samples", default=None, help="folder of images to key (default: the shipped samples/)")
    p.set_defaults(func=run)


def _ensure_samples(folder: Path) -> Path:
    if folder.is_dir() and any(folder.glob("*.png")):
        return folder
    # not a repo checkout (e.g. a wheel install): render the samples procedurally
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    for name, kwargs in DEMO_SAMPLES:
        s = make_sample(height=384, width=384, **kwargs)
        save_rgb(folder / f"{name}.png", torch.from_numpy(s.image))
        save_rgb(folder / "gt" / f"{name}_fg.png", torch.from_numpy(s.fg))
        from ..imageio import save_gray
        save_gray(folder / "gt" / f"{name}_alpha.png", torch.from_numpy(s.alpha))
    return folder


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.samples) if args.samples else _ensure_samples(REPO_SAMPLES if REPO_SAMPLES.is_dir()
                                                                       else out / "samples")
    rows, report = [], {}
    for path in tqdm(list_images([folder]), desc="keying", unit="img"):
        image, _ = load_image(path)
        t0 = time.perf_counter()
        res = greenpost(image)
        seconds = time.perf_counter() - t0
        fg, alpha = res.foreground[0].cpu(), res.alpha[0].cpu()
        save_rgba(out / f"{path.stem}.png", fg, alpha)
        rows.append((image[0], fg, alpha))
        entry = {"seconds": round(seconds, 3), "key_color": [round(float(c), 3) for c in res.key_color[0]]}
        gt = folder / "gt" / f"{path.stem}_alpha.png"
        if gt.is_file():
            gt_fg = folder / "gt" / f"{path.stem}_fg.png"
            entry.update(metrics.evaluate(alpha.numpy(), load_mask(gt)[0].numpy(),
                                          pred_fg=fg.numpy(),
                                          gt_fg=load_image(gt_fg)[0][0].numpy() if gt_fg.is_file() else None))
        report[path.stem] = entry
    sheet = out / "contact_sheet.png"
    save_rgb(sheet, contact_sheet(rows))
    print(json.dumps(report, indent=1, default=float))
    print(f"wrote {len(rows)} RGBA PNGs and {sheet} to {out.resolve()}")
    return 0
