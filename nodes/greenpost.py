"""GreenPost node: training-free, matting-level keyer for green (or any colour) screens."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..py import alpha as A
from ..py.background_matting import garbage_matte_bound
from ..py.greenpost import color_hex, greenpost
from .background_matting import BMV2Type
from ._common import (ALPHA_TIP, MASK_CONVENTIONS, STRAIGHT_TIP, check_interrupt, device, log, mask_to_alpha,
                      out_device, progress)


class GreenPost(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_GreenPost",
            display_name="GreenPost (green-screen keyer)",
            category="matting/keying",
            description="DiffuMatting's GreenPost without weights: K-Means backdrop colour -> clean plate -> "
                        "known-background matting -> alpha + straight, spill-free foreground. Any screen colour.",
            inputs=[
                io.Image.Input("image", tooltip="Green/blue/any-colour screen images (batch)."),
                io.Combo.Input("key_color_mode", options=["auto (K-Means)", "override"], default="auto (K-Means)"),
                io.String.Input("key_color", default="#00ff00",
                                tooltip="Backdrop colour for mode=override ('#rrggbb' or 'R,G,B')."),
                io.Float.Input("despill", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the backdrop colour cast removed from the foreground."),
                io.Float.Input("decontaminate", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Edge colour: 0 = plain unmixing (noisy at low alpha); 1 = "
                                       "alpha*observed + (1-alpha)*nearby confident foreground colour."),
                io.Float.Input("noise_clip", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Soft threshold near 0/1 in noise standard deviations (JPEG/sensor noise)."),
                io.Boolean.Input("strict", default=False,
                                 tooltip="Error on an image with no backdrop colour (else: all foreground + warning)."),
                io.Mask.Input("coarse_mask", optional=True,
                              tooltip="Optional garbage matte (draw it generously): outside it alpha is 0 and "
                                      "only pixels there pick the key colour and plate. Convention below."),
                io.Combo.Input("mask_convention", options=MASK_CONVENTIONS, default=MASK_CONVENTIONS[0],
                               optional=True, tooltip=ALPHA_TIP),
                io.Image.Input("plate", optional=True, tooltip="Optional clean shot of the empty backdrop."),
                BMV2Type.Input("refiner", optional=True,
                               tooltip="Optional BackgroundMattingV2 (Load BackgroundMattingV2): DiffuMatting's "
                                       "exact GreenPost. The clean plate GreenPost estimates (or the plate input) "
                                       "is its background input; its alpha and foreground are returned (the "
                                       "coarse mask still bounds the alpha). Not connected: training-free."),
            ],
            outputs=[
                io.Image.Output("foreground", display_name="foreground (straight)", tooltip=STRAIGHT_TIP),
                io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                io.Image.Output("rgba", display_name="RGBA", tooltip="Straight colour + alpha (4 channels)."),
                io.Image.Output("clean_plate", display_name="clean plate"),
                io.String.Output("key", display_name="key colour", tooltip="Backdrop colour per image, '#rrggbb'."),
            ],
        )

    @classmethod
    def execute(cls, image, key_color_mode, key_color, despill, decontaminate, noise_clip, strict,
                coarse_mask=None, mask_convention=MASK_CONVENTIONS[0], plate=None, refiner=None) -> io.NodeOutput:
        image = A.as_image(image, "image")
        override = A.parse_color(key_color) if key_color_mode == "override" else None
        if coarse_mask is not None:
            coarse_mask = mask_to_alpha(coarse_mask, mask_convention, "coarse_mask")
            if coarse_mask.shape[1:] != image.shape[1:3]:  # e.g. a latent-resolution mask: resize, never squash silently
                log.info("GreenPost: resizing coarse mask %s to the image size %s", tuple(coarse_mask.shape[1:]),
                         tuple(image.shape[1:3]))
                coarse_mask = torch.nn.functional.interpolate(coarse_mask[:, None], size=image.shape[1:3],
                                                              mode="bilinear", align_corners=False)[:, 0]
        dev = device()
        n = image.shape[0]
        if refiner is not None:
            refiner.load(*image.shape[1:3])
        bar = progress(n)
        outs = []
        for i in range(n):
            check_interrupt()
            pick = lambda t: None if t is None else t[i if t.shape[0] == n else 0:][:1].to(dev)  # noqa: E731
            res = greenpost(pick(image), mask=pick(coarse_mask), plate=pick(plate), key_color=override,
                            despill=despill, decontaminate=decontaminate, noise_clip=noise_clip, strict=strict)
            for w in res.warnings:
                log.warning("GreenPost image %d: %s", i, w)
            if refiner is not None:
                res = _refine(refiner, pick(image), pick(coarse_mask), res, i)
            outs.append(res)
            bar.update(1)
        od = out_device()
        cat = lambda name: torch.cat([getattr(r, name).to(od) for r in outs])  # noqa: E731
        keys = ", ".join(color_hex(r.key_color[0].tolist()) for r in outs)
        return io.NodeOutput(cat("foreground").contiguous(), cat("alpha"), cat("rgba"), cat("plate"), keys)


def _refine(refiner, img, mask, res, index):
    """GreenPost result -> the same with BackgroundMattingV2's alpha/foreground (image + GreenPost's plate);
    the coarse mask bounds the alpha as in GreenPost. An image GreenPost found no screen in stays as it is
    (its "plate" is the image itself, which would make the network call everything background)."""
    if res.warnings and torch.equal(res.plate, img[..., :3]):
        log.warning("GreenPost image %d: no backdrop found, so the BackgroundMattingV2 refiner is skipped", index)
        return res
    alpha, fg = refiner.refine(img[..., :3], res.plate)
    if mask is not None:
        alpha = torch.minimum(alpha, garbage_matte_bound(mask.to(alpha.device)))
    res.rgba = A.join_rgba(fg, alpha)
    res.alpha, res.foreground = res.rgba[..., 3], res.rgba[..., :3]
    return res


NODES = [GreenPost]
