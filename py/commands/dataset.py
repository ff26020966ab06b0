"""``diffusion-matting dataset green-canvas``: build a Green100K-style DiffuMatting training folder.

Composites matting foregrounds (``--fg-data``: case folders with ``alpha`` + ``fg``/``image``, or RGBA
cutouts) and salient-object masks (``--salient``) onto the pure green canvas and writes
``OUT/image/ alpha/ fg/`` + ``OUT/captions.jsonl`` (see :mod:`..green_dataset`). Never overwrites:
running it again appends new samples after the existing ones.
"""

from __future__ import annotations

from ..alpha import parse_color
from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build training data sets (green-canvas: Green100K-style for DiffuMatting)",
                       description="Data-set builders. `diffusion-matting dataset green-canvas --help` for options.")
    kinds = p.add_subparsers(dest="dataset_kind", metavar="KIND")
    g = kinds.add_parser("green-canvas", help="composite foregrounds + alpha onto a green canvas with captions",
                         description="Writes OUT/image, OUT/alpha, OUT/fg (PNG, numbered) and appends to "
                                     "OUT/captions.jsonl. Existing samples are never overwritten.")
    g.add_argument("--fg-data", nargs="*", default=[], help="matting folders: case folders (alpha + fg/image) "
                                                            "or RGBA cutouts")
    g.add_argument("--salient", nargs="*", default=[], help="salient-object folders: case folders (image + mask) "
                                                            "or image/ + mask/ folders paired by name")
    g.add_argument("--procedural", type=int, default=0, help="add N procedural subjects")
    g.add_argument("--captions", help="captions.txt (lines: caption, or stem<TAB>caption) or captions.jsonl "
                                      "({\"source\": stem, \"caption\": ...}); ', pure green background' is added "
                                      "where a caption lacks it")
    g.add_argument("--default-caption", default="an object", help="caption for items without one")
    g.add_argument("--out", required=True, help="output folder (created; appended to)")
    g.add_argument("--per-item", type=int, default=1, help="composites per foreground (random scale/position/flip)")
    g.add_argument("--size", type=int, default=512, help="square canvas size in pixels")
    g.add_argument("--canvas", default="#00ff00", help="canvas colour (default the DiffuMatting green #00ff00)")
    g.add_argument("--max-side", type=int, default=1536, help="foregrounds are shrunk to this longer side on load")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run)

    def no_kind(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_kind)


def run(args) -> int:
    from ..green_dataset import build_green_folder, load_matte_items, load_salient_items, read_captions
    from ..train_matting_head import procedural_items

    if args.procedural < 0:
        raise UserError("--procedural must be >= 0")
    items = load_matte_items(args.fg_data, max_side=args.max_side) if args.fg_data else []
    items += load_salient_items(args.salient, max_side=args.max_side)
    if args.procedural:
        items += procedural_items(args.procedural, size=min(args.size, 512), seed=args.seed * 1000)
    build_green_folder(items, args.out, read_captions(args.captions), per_item=args.per_item, size=args.size,
                       seed=args.seed, canvas=parse_color(args.canvas), default_caption=args.default_caption)
    return 0
