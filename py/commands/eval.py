"""``diffusion-matting eval``: score predicted alpha mattes (and foregrounds) against ground truth.

Files are matched by stem (``pred/foo.png`` <-> ``gt/foo.png``). A folder may also be a dataset
folder with one sub-folder per case (``gt/foo/alpha.png``, ``trimap/foo/trimap.png``,
``gt-fg/foo/fg.png``), the layout of the dev data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from .. import metrics
from ..errors import UserError
from ..imageio import IMAGE_EXTS, list_images, load_image, load_mask


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="score alpha mattes (SAD, MSE, Grad, Conn; foreground error) against ground truth",
        description="Matches prediction and ground-truth files by stem and prints JSON "
                    '{"cases": {stem: {...}}, "mean": {...}, "count": n} to stdout. Metrics follow the '
                    "Deep Image Matting evaluation code: sad = SAD/1000, mse_x1e3 = MSE*1000, "
                    "grad = Grad/1000, conn = Conn/1000, over the trimap's unknown region when --trimap "
                    "is given, else over the whole image. Predictions with an alpha channel (RGBA PNG) "
                    "are scored on that channel, others on their luminance.")
    p.add_argument("--pred", required=True, metavar="DIR", help="predicted mattes (RGBA or grayscale)")
    p.add_argument("--gt", required=True, metavar="DIR", help="ground-truth alpha mattes")
    p.add_argument("--trimap", metavar="DIR", help="trimaps (0/128/255 or 0/0.5/1); restricts the metrics "
                                                   "to the unknown region")
    p.add_argument("--pred-fg", metavar="DIR", help="predicted straight foreground colour (RGB or RGBA; "
                                                    "may be the same RGBA files as --pred)")
    p.add_argument("--gt-fg", metavar="DIR", help="ground-truth straight foreground colour")
    p.set_defaults(func=run)


def _index(folder: str, case_file: str, what: str) -> dict[str, Path]:
    """stem -> file for a folder of images, or case -> ``case/<case_file>.*`` for a dataset folder."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--{what}: no such folder: {root}")
    files = [q for q in root.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS]
    if files:
        return {q.stem: q for q in list_images([root])}
    out: dict[str, Path] = {}
    for sub in sorted(q for q in root.iterdir() if q.is_dir()):
        hits = sorted(q for q in sub.iterdir() if q.is_file() and q.stem == case_file
                      and q.suffix.lower() in IMAGE_EXTS)
        if hits:
            out[sub.name] = hits[0]
    if not out:
        raise UserError(f"--{what}: no images in {root} (nor */{case_file}.png case folders)")
    return out


def _load_alpha(path: Path):
    """Alpha channel if the file has one, else its luminance; ``[H,W]`` float."""
    _, alpha = load_image(path)
    return (alpha if alpha is not None else load_mask(path))[0]


def _check_size(stem: str, name_a: str, a, name_b: str, b) -> None:
    if tuple(a.shape[:2]) != tuple(b.shape[:2]):
        raise UserError(f"{stem}: {name_a} is {a.shape[1]}x{a.shape[0]} but {name_b} is "
                        f"{b.shape[1]}x{b.shape[0]} (WxH)")


def run(args) -> int:
    if (args.pred_fg is None) != (args.gt_fg is None):
        raise UserError("--pred-fg and --gt-fg must be given together")
    pred = _index(args.pred, "alpha", "pred")
    gt = _index(args.gt, "alpha", "gt")
    stems = sorted(set(pred) & set(gt))
    if not stems:
        raise UserError(f"no file stems in common between --pred {args.pred} ({len(pred)} files) and "
                        f"--gt {args.gt} ({len(gt)} files)")
    unmatched = len(set(pred) ^ set(gt))
    if unmatched:
        print(f"diffusion-matting eval: {unmatched} file(s) without a counterpart skipped", file=sys.stderr)
    extra = {}
    for what, folder, case_file in (("trimap", args.trimap, "trimap"), ("pred-fg", args.pred_fg, "fg"),
                                    ("gt-fg", args.gt_fg, "fg")):
        if folder is None:
            continue
        extra[what] = _index(folder, case_file, what)
        missing = [s for s in stems if s not in extra[what]]
        if missing:
            raise UserError(f"--{what} {folder}: no file for {len(missing)} case(s), e.g. {missing[0]!r}")

    cases: dict[str, dict] = {}
    for stem in tqdm(stems, desc="eval", unit="img", file=sys.stderr):
        p, g = _load_alpha(pred[stem]), _load_alpha(gt[stem])
        _check_size(stem, "pred", p, "gt", g)
        kwargs = {}
        if "trimap" in extra:
            t = load_mask(extra["trimap"][stem])[0]
            _check_size(stem, "trimap", t, "gt", g)
            kwargs["trimap"] = t
        if "pred-fg" in extra:
            pf, gf = load_image(extra["pred-fg"][stem])[0][0], load_image(extra["gt-fg"][stem])[0][0]
            _check_size(stem, "pred-fg", pf, "gt", g)
            _check_size(stem, "gt-fg", gf, "gt", g)
            kwargs.update(pred_fg=pf, gt_fg=gf)
        cases[stem] = metrics.evaluate(p, g, **kwargs)

    keys = [k for k, v in cases[stems[0]].items() if isinstance(v, (int, float))]
    mean = {k: sum(c[k] for c in cases.values()) / len(cases) for k in keys}
    regions = sorted({c["region"] for c in cases.values()})
    mean["region"] = regions[0] if len(regions) == 1 else "mixed"
    json.dump({"cases": cases, "mean": mean, "count": len(cases)}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
