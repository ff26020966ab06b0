"""Glue shared by the node faces: devices, progress, interrupts, user errors. Only ComfyUI imports here."""

from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..py import alpha as A
from ..py.errors import UserError

log = logging.getLogger("diffusion_matting")

ALPHA_TIP = "alpha MASK: 1 = foreground (opaque), 0 = background. ComfyUI's LoadImage mask is 1 - alpha."
MASK_CONVENTIONS = ["alpha (1 = foreground)", "ComfyUI mask (1 = background)"]
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


def register_model_folder(folder: str) -> str:
    """Register ``models/<folder>`` (+ whatever extra_model_paths.yaml adds) for ``.safetensors`` only;
    returns the default path. Files placed there by hand are listed like downloaded ones."""
    path = os.path.join(folder_paths.models_dir, folder)
    entry = folder_paths.folder_names_and_paths.get(folder)
    paths = [path] if entry is None else list(entry[0])
    if path not in paths:
        paths.append(path)
    folder_paths.folder_names_and_paths[folder] = (paths, {".safetensors"})
    return path


def model_file(folder: str, name: str, what: str) -> str:
    """Full path of ``name`` in ComfyUI's ``folder``; a missing file is a user error naming every path tried."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        tried = [os.path.join(d, name) for d in folder_paths.get_folder_paths(folder)]
        raise UserError(f"{what} not found: {' or '.join(tried)}")
    return path


def mask_to_alpha(mask, convention: str, name: str = "mask"):
    """A MASK in the convention picked from :data:`MASK_CONVENTIONS` -> alpha (1 = foreground)."""
    mask = A.as_mask(mask, name)
    return A.comfy_mask_to_alpha(mask) if convention == MASK_CONVENTIONS[1] else mask
