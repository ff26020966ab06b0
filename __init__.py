"""Diffusion matting for ComfyUI (GreenPost, trimap matting, DiffuMatting, DRIP).

ComfyUI loads this folder as a custom-node pack and calls :func:`comfy_entrypoint` (V3 API).
Importing this package outside ComfyUI imports nothing from ComfyUI: the core lives in
``.py`` (ComfyUI-free), the node faces in ``.nodes`` are imported only when ComfyUI asks for them.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI awaits this and registers the returned extension's nodes."""
    from .nodes import DiffusionMattingExtension

    return DiffusionMattingExtension()
