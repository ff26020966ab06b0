"""ComfyUI faces (V3 API). Every module here exposes ``NODES``; this package collects them.

Only imported by ComfyUI (through the root ``comfy_entrypoint``): importing it needs ``comfy_api``.
"""

from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


def all_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        nodes.extend(importlib.import_module(f"{__name__}.{info.name}").NODES)
    return nodes


class DiffusionMattingExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
