"""Save Matting Sample: write composite + alpha + straight foreground (+ caption) as a matting dataset."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..py import alpha as A
from ..py import matting_dataset as D
from ._common import ALPHA_TIP, MASK_CONVENTIONS, STRAIGHT_TIP, check_interrupt, log, mask_to_alpha


class SaveMattingSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SaveMattingSample",
            display_name="Save Matting Sample",
            category="matting/data",
            description="Write each batch item as one matting sample under the ComfyUI output folder: "
                        "<subfolder>/image/<name>.png (composite), alpha/<name>.png (white = foreground), "
                        "fg/<name>.png (straight foreground), captions/<name>.txt, and one manifest.jsonl line "
                        "(sizes, sha256 of the files, prompt/seed if linked). Names are never reused, even "
                        "with several queues or servers writing to the same folder. "
                        "`diffusion-matting factory` drives this node over ComfyUI's API.",
            is_output_node=True,
            inputs=[
                io.Image.Input("image", tooltip="The composite (e.g. the green-canvas generation), batch."),
                io.Mask.Input("alpha", tooltip=ALPHA_TIP + " Convention below."),
                io.Image.Input("foreground", tooltip=STRAIGHT_TIP),
                io.String.Input("subfolder", default="matting_dataset",
                                tooltip="Dataset folder, relative to ComfyUI's output folder."),
                io.String.Input("prefix", default="sample", tooltip="Sample names are <prefix>_<counter>."),
                io.Combo.Input("mask_convention", options=MASK_CONVENTIONS, default=MASK_CONVENTIONS[0],
                               optional=True, tooltip=ALPHA_TIP),
                io.String.Input("caption", optional=True, force_input=True,
                                tooltip="Caption written to captions/<name>.txt (e.g. the prompt used)."),
                io.String.Input("prompt", optional=True, force_input=True,
                                tooltip="Recorded in the manifest (not written as a caption)."),
                io.Int.Input("seed", optional=True, force_input=True, tooltip="Recorded in the manifest."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, image, alpha, foreground, subfolder, prefix, mask_convention=MASK_CONVENTIONS[0],
                caption=None, prompt=None, seed=None) -> io.NodeOutput:
        image = A.as_image(image, "image")
        fg = A.as_image(foreground, "foreground")
        alpha = mask_to_alpha(alpha, mask_convention, "alpha").clamp(0, 1)
        image, alpha, fg = A.broadcast_batch(image, alpha, fg, names=["image", "alpha", "foreground"])
        sub = D.check_subfolder(subfolder)
        D.check_prefix(prefix)
        out_dir = os.path.abspath(folder_paths.get_output_directory())
        root = os.path.abspath(os.path.join(out_dir, sub))
        if os.path.commonpath([out_dir, root]) != out_dir:
            raise ValueError(f"subfolder {subfolder!r} leaves the output folder")
        entries, previews = [], []
        batch = image.shape[0]
        for i in range(batch):
            check_interrupt()
            meta = {"batch_index": i, "batch_size": batch, "prompt": prompt, "seed": seed}
            entry = D.save_sample(root, prefix, image[i].cpu(), alpha[i].cpu(), fg[i].cpu(), caption, **meta)
            entry["subfolder"] = sub
            entries.append(entry)
            img_dir, _ = D.KINDS["image"]
            previews.append({"filename": os.path.basename(entry["files"]["image"]),
                             "subfolder": f"{sub}/{img_dir}" if sub else img_dir, "type": "output"})
        log.info("Save Matting Sample: %d sample(s) in %s (%s)", batch, root, ", ".join(e["name"] for e in entries))
        return io.NodeOutput(ui={"images": previews, "matting_samples": entries})


NODES = [SaveMattingSample]
