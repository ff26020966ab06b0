"""BackgroundMattingV2 as GreenPost's optional learned refiner.

* Load BackgroundMattingV2: ``models/background_matting/*.safetensors`` (or the authors' ``.pth`` state dicts,
  read tensors-only) -> DM_BMV2 (the model under ComfyUI model management + its run settings). Wire it into
  GreenPost's ``refiner`` input: GreenPost's clean plate becomes the network's background input.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ..py import background_matting as BM
from ._common import log, model_file, register_model_folder

FOLDER = "background_matting"
BMV2Type = io.Custom("DM_BMV2")
SCALES = {"auto": None, "1/2": 0.5, "1/4": 0.25, "1/8": 0.125}

register_model_folder(FOLDER)
# the authors' .pth state dicts load tensors-only (torch.load(weights_only=True)): list them as well
folder_paths.folder_names_and_paths[FOLDER] = (folder_paths.folder_names_and_paths[FOLDER][0],
                                               {".safetensors", ".pth"})


class BMV2Refiner:
    """What flows along a DM_BMV2 wire: the model in a ModelPatcher + the settings it runs with."""

    def __init__(self, model: BM.MattingBase, name: str, backbone_scale: float | None = None,
                 refine_mode: str = "sampling", sample_pixels: int | None = None, threshold: float = 0.1):
        self.name = name
        self.patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                        offload_device=mm.unet_offload_device())
        self.options = dict(backbone_scale=backbone_scale, refine_mode=refine_mode,
                            sample_pixels=sample_pixels or None, threshold=threshold)

    @property
    def model(self) -> BM.MattingBase:
        return self.patcher.model

    def load(self, height: int, width: int) -> None:
        """Put the weights on the compute device (ComfyUI frees memory for them and ~160 B per pixel)."""
        mm.load_models_gpu([self.patcher], memory_required=height * width * 160)

    def refine(self, image: torch.Tensor, plate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (alpha ``[B,H,W]`` 1 = foreground, straight foreground ``[B,H,W,3]``) on the image's device."""
        return BM.refine_with_bmv2(self.model, image, plate, **self.options)

    def __repr__(self) -> str:
        return f"BMV2Refiner({self.name!r}, {self.model.backbone_name}, {self.options})"


class BackgroundMattingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_BackgroundMattingLoader",
            display_name="Load BackgroundMattingV2",
            category="matting/keying",
            description="Load BackgroundMattingV2 weights (MobileNetV2 / ResNet-50 / ResNet-101, detected from the "
                        "file) from models/background_matting, as GreenPost's learned refiner: the network "
                        "takes the image and GreenPost's clean plate. .pth files are read tensors-only; "
                        "`diffusion-matting convert bmv2` turns them into .safetensors.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors or .pth file in models/background_matting."),
                io.Combo.Input("backbone_scale", options=list(SCALES), default="auto",
                               tooltip="Resolution the backbone sees. auto: 1/2 up to 1024 px, 1/4 up to 2048 px "
                                       "(the authors' HD setting), 1/8 above (their 4K setting)."),
                io.Combo.Input("refine_mode", options=list(BM.REFINE_MODES), default="sampling",
                               tooltip="sampling: refine a fixed number of the most uncertain pixels (bounded "
                                       "time/memory); thresholding: every patch with error > threshold; full: "
                                       "refine everywhere (slow and memory-hungry at 4K)."),
                io.Int.Input("sample_pixels", default=0, min=0, max=50_000_000, step=16,
                             tooltip="Pixels refined in sampling mode; 0 = auto (80,000 per HD frame, 320,000 "
                                     "at 4K)."),
                io.Float.Input("threshold", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Error threshold for thresholding mode."),
            ],
            outputs=[BMV2Type.Output("refiner", display_name="refiner")],
        )

    @classmethod
    def execute(cls, model_name, backbone_scale="auto", refine_mode="sampling", sample_pixels=0,
                threshold=0.1) -> io.NodeOutput:
        path = model_file(FOLDER, model_name, "BackgroundMattingV2 weights")
        model = BM.load_bmv2(path).to(mm.unet_offload_device())
        cfg = BM.infer_bmv2_config(model.state_dict())
        log.info("Load BackgroundMattingV2: %s (%s%s)", path, cfg["backbone"], " + refiner" if cfg["refine"] else "")
        return io.NodeOutput(BMV2Refiner(model, model_name, SCALES[backbone_scale], refine_mode, int(sample_pixels),
                                         float(threshold)))


NODES = [BackgroundMattingLoader]
