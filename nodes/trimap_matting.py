"""Trimap Matting node: closed-form alpha + multilevel foreground, no weights (thin face over
``diffusion_matting.py.trimap_matting.matte``)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..py import alpha as A
from ..py import trimap_matting as T
from ._common import ALPHA_TIP, STRAIGHT_TIP, check_interrupt, device, log, out_device, progress

MODES = ["trimap (0 / 0.5 / 1)", "coarse mask (alpha: 1 = foreground)", "coarse mask (ComfyUI: 1 = background)"]
EPSILONS = ["1e-7", "1e-6", "1e-5", "1e-4"]


class TrimapMatting(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TrimapMatting",
            display_name="Trimap Matting",
            category="matting/trimap",
            description="Alpha matte from an image and a trimap, without any model: closed-form matting "
                        "(Levin et al.), solved coarse to fine, then the straight foreground colour by multilevel "
                        "foreground estimation. Cost grows with the unknown (grey) region, not the image size.",
            inputs=[
                io.Image.Input("image", tooltip="Image to matte (RGB; an RGBA image uses its RGB)."),
                io.Mask.Input("trimap", tooltip="Trimap MASK: 0 = background, 0.5 (any grey) = unknown, 1 = "
                                                "foreground; 0/128/255 also works. In the coarse-mask modes, "
                                                "this is the coarse mask instead."),
                io.Combo.Input("mode", options=MODES, default=MODES[0],
                               tooltip="What the mask input is: a trimap, or a coarse mask turned into a "
                                       "trimap by eroding (definite foreground) and dilating (definite "
                                       "background). LoadImage's MASK is 1 = background: pick the ComfyUI mode."),
                io.Int.Input("erode_px", default=8, min=0, max=512,
                             tooltip="Coarse-mask modes: erosion radius (px) for the definite foreground."),
                io.Int.Input("dilate_px", default=8, min=0, max=512,
                             tooltip="Coarse-mask modes: dilation radius (px) for the definite background."),
                io.Float.Input("tolerance", default=T.DEFAULT_TOL, min=0.0001, max=0.1, step=0.0001,
                               tooltip="Each pyramid level stops once its residual has dropped by this factor. "
                                       "Smaller approaches the exact closed-form solution (slower; on wide unknown "
                                       "regions often blurrier); larger is faster and smoother."),
                io.Int.Input("iterations", default=T.DEFAULT_ITERATIONS, min=1, max=5000,
                             tooltip="At most this many conjugate-gradient steps per pyramid level."),
                io.Combo.Input("epsilon", options=EPSILONS, default="1e-6",
                               tooltip="Colour-line regulariser: larger gives smoother alpha."),
                io.Int.Input("foreground_sweeps", default=2, min=0, max=50,
                             tooltip="Red-black Gauss-Seidel sweeps at full size for the foreground colour "
                                     "(coarser levels get more)."),
            ],
            outputs=[
                io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                io.Image.Output("foreground", display_name="foreground (straight)", tooltip=STRAIGHT_TIP),
                io.Image.Output("rgba", display_name="RGBA",
                                tooltip="Straight foreground + alpha as a 4-channel IMAGE (Save Image writes an "
                                        "RGBA PNG)."),
            ],
        )

    @classmethod
    def execute(cls, image, trimap, mode, erode_px, dilate_px, tolerance, iterations, epsilon,
                foreground_sweeps) -> io.NodeOutput:
        image = A.as_image(image, "image")
        kwargs = {}
        if mode == MODES[0]:
            kwargs["trimap"] = trimap
        else:
            mask = A.as_mask(trimap, "mask")
            kwargs["mask"] = A.comfy_mask_to_alpha(mask) if mode == MODES[2] else mask
        bar = progress(image.shape[0])
        alpha, fg, warnings = T.matte(
            image, **kwargs, erode_px=erode_px, dilate_px=dilate_px, eps=float(epsilon), tol=tolerance,
            iterations=iterations, coarse_iterations=iterations, foreground_sweeps=foreground_sweeps, device=device(),
            progress=lambda done, total: bar.update_absolute(done, total), interrupt=check_interrupt)
        for w in warnings:
            log.warning("Trimap Matting: %s", w)
        dev = out_device()
        alpha, fg = alpha.to(dev), fg.to(dev)
        rgba = torch.cat([fg, alpha.unsqueeze(-1)], dim=-1)
        return io.NodeOutput(alpha, fg, rgba)


NODES = [TrimapMatting]
