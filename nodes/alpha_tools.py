"""Alpha toolkit nodes: trimap from mask, previews, compositing, RGBA join/split.

Conventions: alpha MASK 1 = foreground; ComfyUI's LoadImage mask is 1 - alpha (each node says which it
takes); foreground colour is straight unless named premultiplied.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..py import alpha as A
from ._common import ALPHA_TIP, COMFY_MASK_TIP, MASK_CONVENTIONS, STRAIGHT_TIP, log, mask_to_alpha, out_device


class TrimapFromMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TrimapFromMask",
            display_name="Trimap From Mask",
            category="matting/alpha",
            description="Definite foreground = mask eroded; definite background = outside the dilated mask; "
                        "unknown (0.5) between. Output trimap: 0 = bg, 0.5 = unknown, 1 = fg.",
            inputs=[
                io.Mask.Input("mask", tooltip="Coarse mask; its convention is chosen below."),
                io.Combo.Input("mask_convention", options=MASK_CONVENTIONS, default=MASK_CONVENTIONS[0],
                               tooltip=ALPHA_TIP),
                io.Int.Input("erode_px", default=8, min=0, max=512, tooltip="Erosion radius (px) for definite foreground."),
                io.Int.Input("dilate_px", default=8, min=0, max=512, tooltip="Dilation radius (px) for definite background."),
                io.Float.Input("threshold", default=0.5, min=0.01, max=0.99, step=0.01),
            ],
            outputs=[io.Mask.Output("trimap", display_name="trimap", tooltip="0 = bg, 0.5 = unknown, 1 = fg")],
        )

    @classmethod
    def execute(cls, mask, mask_convention, erode_px, dilate_px, threshold) -> io.NodeOutput:
        trimap, warnings = A.trimap_from_mask(mask_to_alpha(mask, mask_convention), erode_px, dilate_px, threshold)
        for w in warnings:
            log.warning("Trimap From Mask: %s", w)
        return io.NodeOutput(trimap.to(out_device()))


class AlphaPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_AlphaPreview",
            display_name="Alpha Preview",
            category="matting/alpha",
            description="Composite a straight foreground with its alpha over a checkerboard, a solid colour or an image.",
            inputs=[
                io.Image.Input("foreground", tooltip=STRAIGHT_TIP + " RGBA input uses its own alpha if no alpha is linked."),
                io.Mask.Input("alpha", optional=True, tooltip=ALPHA_TIP),
                io.Combo.Input("mode", options=["checkerboard", "color", "image"], default="checkerboard"),
                io.String.Input("color", default="#ffffff", tooltip="Solid backdrop colour for mode=color ('#rrggbb' or 'R,G,B')."),
                io.Int.Input("square", default=16, min=2, max=256, tooltip="Checker square size (px)."),
                io.Image.Input("background", optional=True, tooltip="Backdrop for mode=image (batch broadcasts 1 -> N)."),
            ],
            outputs=[io.Image.Output("preview", display_name="preview")],
        )

    @classmethod
    def execute(cls, foreground, mode, color, square, alpha=None, background=None) -> io.NodeOutput:
        rgb, own_alpha = A.split_rgba(foreground)
        alpha = own_alpha if alpha is None else A.as_mask(alpha, "alpha")
        out = A.preview(rgb, alpha, mode=mode, color=A.parse_color(color), background=background, square=square)
        return io.NodeOutput(out.to(out_device()))


class CompositeOver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_CompositeOver",
            display_name="Composite Over",
            category="matting/alpha",
            description="I = alpha * F + (1 - alpha) * B with straight foreground F.",
            inputs=[
                io.Image.Input("foreground", tooltip=STRAIGHT_TIP),
                io.Mask.Input("alpha", tooltip=ALPHA_TIP),
                io.Image.Input("background", tooltip="Backdrop image (same size; batch broadcasts 1 -> N)."),
            ],
            outputs=[io.Image.Output("image", display_name="image")],
        )

    @classmethod
    def execute(cls, foreground, alpha, background) -> io.NodeOutput:
        fg = A.as_image(foreground, "foreground")[..., :3]
        bg = A.as_image(background, "background")[..., :3]
        a = A.as_mask(alpha, "alpha")
        fg, a, bg = A.broadcast_batch(fg, a, bg.to(fg.device), names=["foreground", "alpha", "background"])
        return io.NodeOutput(A.composite(fg, a, bg).clamp(0, 1).to(out_device()))


class JoinRGBA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_JoinRGBA",
            display_name="Join RGBA (straight)",
            category="matting/alpha",
            description="Straight RGB + mask -> RGBA IMAGE (4 channels, straight colour). Save Image writes it as an RGBA PNG.",
            inputs=[
                io.Image.Input("foreground", tooltip=STRAIGHT_TIP),
                io.Mask.Input("mask"),
                io.Combo.Input("mask_convention", options=MASK_CONVENTIONS, default=MASK_CONVENTIONS[0],
                               tooltip=f"{ALPHA_TIP} Pick 'ComfyUI mask' for the MASK of LoadImage ({COMFY_MASK_TIP})"),
            ],
            outputs=[io.Image.Output("rgba", display_name="RGBA")],
        )

    @classmethod
    def execute(cls, foreground, mask, mask_convention) -> io.NodeOutput:
        return io.NodeOutput(A.join_rgba(foreground, mask_to_alpha(mask, mask_convention)).to(out_device()))


class SplitRGBA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SplitRGBA",
            display_name="Split RGBA (straight)",
            category="matting/alpha",
            description="RGBA IMAGE -> straight RGB, alpha MASK (1 = fg) and ComfyUI mask (1 - alpha). RGB input gets alpha 1.",
            inputs=[io.Image.Input("rgba", tooltip="RGBA with straight colour (as Join RGBA and GreenPost output).")],
            outputs=[
                io.Image.Output("foreground", display_name="foreground (straight)", tooltip=STRAIGHT_TIP),
                io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                io.Mask.Output("comfy_mask", display_name="ComfyUI mask (1 - alpha)", tooltip=COMFY_MASK_TIP),
            ],
        )

    @classmethod
    def execute(cls, rgba) -> io.NodeOutput:
        rgb, alpha = A.split_rgba(rgba)
        dev = out_device()
        return io.NodeOutput(rgb.to(dev), alpha.to(dev), A.alpha_to_comfy_mask(alpha).to(dev))


class PremultiplyAlpha(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_Premultiply",
            display_name="Straight <-> Premultiplied",
            category="matting/alpha",
            description="Convert colour between straight F and premultiplied alpha*F.",
            inputs=[
                io.Image.Input("image"),
                io.Mask.Input("alpha", tooltip=ALPHA_TIP),
                io.Combo.Input("direction", options=["straight -> premultiplied", "premultiplied -> straight"]),
            ],
            outputs=[io.Image.Output("converted", display_name="image")],
        )

    @classmethod
    def execute(cls, image, alpha, direction) -> io.NodeOutput:
        img = A.as_image(image, "image")[..., :3]
        a = A.as_mask(alpha, "alpha")
        img, a = A.broadcast_batch(img, a.to(img.device), names=["image", "alpha"])
        out = A.premultiply(img, a) if direction.startswith("straight") else A.unpremultiply(img, a)
        return io.NodeOutput(out.to(out_device()))


NODES = [TrimapFromMask, AlphaPreview, CompositeOver, JoinRGBA, SplitRGBA, PremultiplyAlpha]
