"""ComfyUI imports the pack through its own custom-node loader, and every node module registers nodes
whose V3 schemas are valid, serialisable for /object_info, and follow the pack's naming rules."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[2]
NODE_MODULES = sorted(p.stem for p in (REPO / "nodes").glob("*.py") if not p.stem.startswith("_"))
FAILURE_MARKERS = ("IMPORT FAILED", "Traceback", "Cannot import", "Error while calling comfy_entrypoint",
                   "did not return")


def loaded_nodes_package(env):
    """The pack's ``nodes`` subpackage exactly as ComfyUI imported it (module named after the folder path)."""
    import sys
    name = str(env.custom_nodes_dir / harness.PACK_FOLDER_NAME).replace(".", "_x_") + ".nodes"
    return sys.modules[name]


def test_comfyui_imported_the_pack(comfy):
    problems = [line for line in comfy.pack_load_log if any(m in line for m in FAILURE_MARKERS)]
    assert comfy.pack_loaded and not problems, "ComfyUI failed to import the pack:\n" + "\n".join(comfy.pack_load_log)
    assert comfy.pack_node_ids, "the pack registered no nodes"


def test_registered_ids_match_all_nodes(comfy_pack):
    pkg = loaded_nodes_package(comfy_pack)
    schema_ids = [cls.GET_SCHEMA().node_id for cls in pkg.all_nodes()]
    assert len(schema_ids) == len(set(schema_ids)), f"duplicate node ids: {sorted(schema_ids)}"
    assert sorted(schema_ids) == comfy_pack.pack_node_ids
    for nid in comfy_pack.pack_node_ids:
        cls = comfy_pack.node_class_mappings[nid]
        assert cls.RELATIVE_PYTHON_MODULE == comfy_pack.pack_module
        assert comfy_pack.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(nid) == cls.GET_SCHEMA().display_name


def test_installed_package_matches_loaded_folder(comfy_pack):
    """``diffusion_matting.nodes.all_nodes()`` (the pip-installed package) declares the same node ids
    ComfyUI registered from the custom_nodes folder."""
    try:
        installed = importlib.import_module("diffusion_matting.nodes")
    except ImportError:
        pytest.skip("diffusion_matting is not pip-installed in this environment")
    assert sorted(cls.GET_SCHEMA().node_id for cls in installed.all_nodes()) == comfy_pack.pack_node_ids


@pytest.mark.parametrize("module", NODE_MODULES)
def test_node_module_registers(comfy, module):
    # uses `comfy`, not `comfy_pack`: when the pack fails to load, this names the module/node at fault
    pkg = loaded_nodes_package(comfy)
    mod = importlib.import_module(f"{pkg.__name__}.{module}")
    nodes = getattr(mod, "NODES", None)
    assert isinstance(nodes, list) and nodes, f"nodes/{module}.py must expose a non-empty NODES list"
    for cls in nodes:
        try:
            schema = cls.GET_SCHEMA()  # V3 validation (unique ids, types, ...)
        except Exception as ex:
            pytest.fail(f"nodes/{module}.py {cls.__name__}: invalid V3 schema: {ex}", pytrace=False)
        nid = schema.node_id
        if comfy.pack_loaded:  # (a failed load stops registering at the failing node)
            assert comfy.node_class_mappings.get(nid) is cls, f"{nid} from nodes/{module}.py is not registered"
        assert nid.startswith("DM_"), nid
        assert schema.category and schema.category.startswith("matting/"), f"{nid}: category {schema.category!r}"
        assert schema.display_name and schema.display_name.strip(), f"{nid}: no display name"
        # what /object_info serves the front end: must build and be JSON-serialisable
        info = cls.GET_NODE_INFO_V1()
        json.dumps(info)
        assert info["name"] == nid and info["category"] == schema.category
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        # the UI widget layout is derivable (the workflow converter relies on it)
        layout = harness.widget_layout(cls)
        widget_names = [n for n, kind in layout if kind == "value"]
        assert len(widget_names) == len(set(widget_names))
