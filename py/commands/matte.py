"""``diffusion-matting matte``: trimap matting without weights (closed-form alpha + multilevel foreground).

Writes ``OUT/<stem>.png`` as an RGBA PNG with straight (not premultiplied) colour, one per input image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..imageio import IMAGE_EXTS, list_images, load_image, load_mask, output_path, save_rgba


def register(sub) -> None:
    p = sub.add_parser(
        "matte", help="alpha matte + straight foreground from image(s) and trimap(s), no model needed",
        description="Closed-form matting (Levin et al., solved matrix-free and coarse to fine) and multilevel "
                    "foreground estimation. Each IMAGE (file or folder) is matched with a trimap: --trimap is a "
                    "file (one image) or a folder holding a file with the same stem. Trimaps: 0 = background, "
                    "grey = unknown, 255 (or 1) = foreground; with --from-mask they are coarse masks (white = "
                    "foreground) turned into trimaps by --erode / --dilate. Writes OUT/<stem>.png as RGBA with "
                    "straight colour; existing files are kept unless --overwrite.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--trimap", required=True, metavar="T",
                   help="trimap file, or folder of trimaps named like the images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--from-mask", action="store_true", help="the trimap inputs are coarse masks (white = foreground)")
    p.add_argument("--erode", type=int, default=8, metavar="PX", help="--from-mask: erosion radius for definite fg (8)")
    p.add_argument("--dilate", type=int, default=8, metavar="PX",
                   help="--from-mask: dilation radius for definite bg (8)")
    p.add_argument("--tol", type=float, default=None, help="stop each pyramid level when its residual has dropped "
                                                           "by this factor (default 3e-3; ~1e-6 = exact solution)")
    p.add_argument("--iterations", type=int, default=None, help="at most this many CG steps per level (300)")
    p.add_argument("--eps", type=float, default=None, help="closed-form regulariser epsilon (default 1e-6)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def _pair(images: list[Path], trimap: Path) -> list[tuple[Path, Path]]:
    if trimap.is_file():
        if len(images) != 1:
            raise UserError(f"--trimap {trimap} is one file but there are {len(images)} images: give a folder "
                            "of trimaps named like the images")
        return [(images[0], trimap)]
    if not trimap.is_dir():
        raise UserError(f"--trimap: no such file or folder: {trimap}")
    by_stem = {q.stem: q for q in sorted(trimap.iterdir()) if q.is_file() and q.suffix.lower() in IMAGE_EXTS}
    missing = [im.name for im in images if im.stem not in by_stem]
    if missing:
        raise UserError(f"no trimap in {trimap} for: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [(im, by_stem[im.stem]) for im in images]


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) as loaded (EXIF rotation applied), read from the header; None if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # load_image reports unreadable files with a proper message later
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def run(args) -> int:
    from ..trimap_matting import matte

    images = list_images(args.images)
    stems = [p.stem for p in images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise UserError(f"several inputs share the stem(s) {', '.join(dupes)}: their outputs would collide")
    pairs = _pair(images, Path(args.trimap))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    targets = [output_path(out, im.stem, ".png", overwrite=args.overwrite) for im, _ in pairs]  # refuse early
    for image_path, trimap_path in pairs:  # size mismatches before any work
        si, st = _size(image_path), _size(trimap_path)
        if si and st and si != st:
            raise UserError(f"{trimap_path.name} is {st[0]}x{st[1]} but {image_path.name} is {si[0]}x{si[1]} (WxH)")
    if args.erode < 0 or args.dilate < 0:
        raise UserError("--erode / --dilate must be >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {device}: {exc}") from None
    kwargs = {k: v for k, v in (("iterations", args.iterations), ("coarse_iterations", args.iterations),
                                ("tol", args.tol), ("eps", args.eps)) if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    warned = 0
    for (image_path, trimap_path), target in tqdm(list(zip(pairs, targets)), desc="matting", unit="img"):
        image, _ = load_image(image_path)
        mask = load_mask(trimap_path)
        if tuple(mask.shape[1:]) != tuple(image.shape[1:3]):
            raise UserError(f"{trimap_path.name} is {mask.shape[2]}x{mask.shape[1]} but {image_path.name} is "
                            f"{image.shape[2]}x{image.shape[1]} (WxH)")
        if args.from_mask:
            source = {"mask": mask, "erode_px": args.erode, "dilate_px": args.dilate}
        else:
            source = {"trimap": mask}
        alpha, fg, warnings = matte(image, **source, device=device, **kwargs)
        for w in warnings:
            tqdm.write(f"{image_path.name}: {w}", file=sys.stderr)
            warned += 1
        save_rgba(target, fg[0].cpu(), alpha[0].cpu())
    print(f"wrote {len(pairs)} RGBA PNG(s) to {out}" + (f" ({warned} warning(s))" if warned else ""))
    return 0
