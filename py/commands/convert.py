"""``diffusion-matting convert FORMAT IN OUT``: third-party weights -> safetensors (no pickled code kept).

* ``bmv2``: a BackgroundMattingV2 ``.pth`` state dict (``pytorch_mobilenetv2.pth``, ``pytorch_resnet50.pth``,
  ``pytorch_resnet101.pth``) -> ``.safetensors`` for ``models/background_matting``. The ``.pth`` is read
  with ``torch.load(weights_only=True)`` (tensors only) and must load strictly into the variant its keys
  describe before anything is written.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert third-party weights to safetensors (bmv2)",
                       description="Convert third-party weights to .safetensors. Nothing is overwritten unless "
                                   "--overwrite.")
    formats = p.add_subparsers(dest="convert_format", metavar="FORMAT")
    b = formats.add_parser("bmv2", help="BackgroundMattingV2 .pth state dict -> .safetensors",
                           description="BackgroundMattingV2 weights (MattingRefine or MattingBase; mobilenetv2, "
                                       "resnet50 or resnet101, detected from the keys) -> .safetensors with the "
                                       "same keys. The .pth is loaded tensors-only (pickled code is refused).")
    b.add_argument("input", help="BackgroundMattingV2 .pth (or .safetensors) state dict")
    b.add_argument("output", help="output .safetensors path")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    b.set_defaults(func=run_bmv2)

    def no_format(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_format)


def run_bmv2(args) -> int:
    from ..background_matting import convert_bmv2

    info = convert_bmv2(args.input, args.output, overwrite=args.overwrite)
    print(json.dumps(info))
    return 0
