"""Glue shared by the node faces: devices, progress, interrupts, user errors. Only ComfyUI imports here."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils

log = logging.getLogger("diffusion_matting")

ALPHA_TIP = "alpha MASK: 1 = foreground (opaque), 0 = background. ComfyUI's LoadImage mask is 1 - alpha."
COMFY_MASK_TIP = "ComfyUI mask convention (as LoadImage gives it): 1 = transparent/background."
STRAIGHT_TIP = "Straight (not premultiplied) RGB foreground colour."


def device():
    return mm.get_torch_device()


def out_device():
    return mm.intermediate_device()


def progress(total: int) -> comfy.utils.ProgressBar:
    return comfy.utils.ProgressBar(total)


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()
