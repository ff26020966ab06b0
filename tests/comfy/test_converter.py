"""The tier-2 harness itself: UI->API conversion against hand-written expectations (front-end semantics:
widget order, control_after_generate, upload widgets, bypass, mute, Reroute, PrimitiveNode, notes,
V3 optional widgets, subgraphs), ComfyUI validation reporting errors, CPU execution producing files,
and the converter on the UI workflows ComfyUI's template package ships (convert + validate only).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness


# ---- tiny UI-workflow builder (the JSON the front end saves) ------------------------------------------

def node(id, type, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    n = {"id": id, "type": type, "mode": mode, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {}}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def inp(name, type, link=None, widget=False):
    d = {"name": name, "type": type, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def out(name, type, links=()):
    return {"name": name, "type": type, "links": list(links)}


def workflow(nodes, links, subgraphs=None):
    wf = {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max([l[0] for l in links] or [0]),
          "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
    if subgraphs:
        wf["definitions"] = {"subgraphs": subgraphs}
    return wf


def strip_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def gray_png(comfy):
    """A 20x12 RGB gradient in ComfyUI's input dir."""
    h, w = 12, 20
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w)[None] * 12
    arr[..., 1] = np.arange(h)[:, None] * 20
    arr[..., 2] = 77
    write_png(comfy.input_dir / "harness_gradient.png", arr)
    harness.refresh_file_lists()
    return "harness_gradient.png", arr


def chain_workflow(invert_mode=0):
    """LoadImage -> ImageAddNoise(seed, control, strength 0) -> ImageInvert -> SaveImage, plus notes."""
    return workflow(
        [
            node(1, "LoadImage", ["harness_gradient.png", "image"], outputs=[out("IMAGE", "IMAGE", [1]), out("MASK", "MASK")]),
            node(2, "ImageAddNoise", [123, "fixed", 0.0], inputs=[inp("image", "IMAGE", 1)], outputs=[out("IMAGE", "IMAGE", [2])]),
            node(3, "ImageInvert", [], inputs=[inp("image", "IMAGE", 2)], outputs=[out("IMAGE", "IMAGE", [3])], mode=invert_mode),
            node(4, "SaveImage", ["harness/inv"], inputs=[inp("images", "IMAGE", 3)]),
            node(5, "Note", ["a note"]),
            node(6, "MarkdownNote", ["# md"]),
        ],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"]],
    )


def test_chain_conversion_widgets_control_upload_notes(comfy):
    api = harness.ui_to_api(chain_workflow())
    assert strip_meta(api) == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "harness_gradient.png"}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"seed": 123, "strength": 0.0, "image": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "harness/inv", "images": ["3", 0]}},
    }
    assert api["2"]["_meta"]["title"] == comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.get("ImageAddNoise", "ImageAddNoise")


def test_strict_mode_rejects_misaligned_widgets(comfy):
    wf = chain_workflow()
    wf["nodes"][1]["widgets_values"] = [123, 0.0]  # control value missing: strength would land on control
    with pytest.raises(harness.HarnessError, match="control_after_generate"):
        harness.ui_to_api(wf)
    assert harness.ui_to_api(wf, strict=False)["2"]["inputs"]["strength"] == 0.0
    wf = chain_workflow()
    wf["nodes"][3]["widgets_values"] = ["x", "extra"]
    with pytest.raises(harness.HarnessError, match="left over"):
        harness.ui_to_api(wf)
    wf = chain_workflow()
    del wf["nodes"][3]["widgets_values"]  # absent values: the front end keeps the widget default
    assert harness.ui_to_api(wf, strict=False)["4"]["inputs"]["filename_prefix"] == "ComfyUI"


def test_bypass_and_mute(comfy):
    api = strip_meta(harness.ui_to_api(chain_workflow(invert_mode=4)))
    assert "3" not in api and api["4"]["inputs"]["images"] == ["2", 0]  # bypass passes the IMAGE input on
    api = strip_meta(harness.ui_to_api(chain_workflow(invert_mode=2)))
    assert "3" not in api and "images" not in api["4"]["inputs"]  # link from a muted node is dropped
    errors = harness.validate(api)
    assert any(e["node_id"] == "4" and e["type"] == "required_input_missing" for e in errors), errors


def test_bypass_picks_type_matching_input(comfy):
    # JoinImageWithAlpha(image, alpha) -> IMAGE, bypassed: IMAGE consumers get its `image` input;
    # MaskToImage bypassed has no IMAGE input, so its consumer keeps nothing.
    wf = workflow(
        [
            node(1, "LoadImage", ["harness_gradient.png", "image"], outputs=[out("IMAGE", "IMAGE", [1]), out("MASK", "MASK", [2, 4])]),
            node(2, "JoinImageWithAlpha", [], inputs=[inp("image", "IMAGE", 1), inp("alpha", "MASK", 2)],
                 outputs=[out("IMAGE", "IMAGE", [3])], mode=4),
            node(3, "PreviewImage", [], inputs=[inp("images", "IMAGE", 3)]),
            node(4, "MaskToImage", [], inputs=[inp("mask", "MASK", 4)], outputs=[out("IMAGE", "IMAGE", [5])], mode=4),
            node(5, "PreviewImage", [], inputs=[inp("images", "IMAGE", 5)]),
        ],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 1, 1, 2, 1, "MASK"], [3, 2, 0, 3, 0, "IMAGE"], [4, 1, 1, 4, 0, "MASK"],
         [5, 4, 0, 5, 0, "IMAGE"]],
    )
    api = strip_meta(harness.ui_to_api(wf))
    assert api["3"]["inputs"] == {"images": ["1", 0]}
    assert api["5"]["inputs"] == {}


def test_reroute_primitives_and_v3_optional_widgets(comfy, gray_png):
    wf = workflow(
        [
            node(1, "LoadImage", ["harness_gradient.png", "image"], outputs=[out("IMAGE", "IMAGE", [1])]),
            node(2, "Reroute", None, inputs=[inp("", "*", 1)], outputs=[out("", "IMAGE", [2])]),
            node(3, "Reroute", None, inputs=[inp("", "*", 2)], outputs=[out("", "IMAGE", [3])]),
            # seed linked from the V3 PrimitiveInt node (has its own control widget); strength from a
            # front-end PrimitiveNode (virtual: its value is written into the widget)
            node(4, "ImageAddNoise", [5, "randomize", 0.9],
                 inputs=[inp("image", "IMAGE", 3), inp("seed", "INT", 4, widget=True), inp("strength", "FLOAT", 5, widget=True)],
                 outputs=[out("IMAGE", "IMAGE", [6])]),
            node(5, "PrimitiveInt", [77, "increment"], outputs=[out("INT", "INT", [4])]),
            node(6, "PrimitiveNode", [0.0, "fixed"], outputs=[{"name": "FLOAT", "type": "FLOAT", "links": [5], "widget": {"name": "strength"}}]),
            node(7, "SaveImage", ["harness/prim"], inputs=[inp("images", "IMAGE", 6)]),
            # V3 node with optional widget inputs after the required ones
            node(8, "RegexReplace", ["Hello World", "o", "0", False, False, False, 1], outputs=[out("STRING", "STRING", [7])]),
            node(9, "PreviewAny", [], inputs=[inp("source", "*", 7)]),
        ],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 5, 0, 4, 1, "INT"],
         [5, 6, 0, 4, 2, "FLOAT"], [6, 4, 0, 7, 0, "IMAGE"], [7, 8, 0, 9, 0, "STRING"]],
    )
    api = strip_meta(harness.ui_to_api(wf))
    assert api["4"]["inputs"] == {"image": ["1", 0], "seed": ["5", 0], "strength": 0.0}
    assert api["5"]["inputs"] == {"value": 77}
    assert api["8"]["inputs"] == {"string": "Hello World", "regex_pattern": "o", "replace": "0",
                                  "case_insensitive": False, "multiline": False, "dotall": False, "count": 1}
    assert set(api) == {"1", "4", "5", "7", "8", "9"}
    assert harness.validate(api) == []
    run = harness.execute(api)
    run.raise_for_error()
    assert run.outputs["9"]["text"] == ["Hell0 World"]  # count=1: only the first match replaced


SUBGRAPH_ID = "5e1f0c9a-0000-4000-8000-000000000001"


def subgraph_workflow():
    definition = {
        "id": SUBGRAPH_ID, "version": 1, "name": "noise+invert", "revision": 0, "config": {},
        "inputNode": {"id": -10, "bounding": [0, 0, 10, 10]}, "outputNode": {"id": -20, "bounding": [0, 0, 10, 10]},
        "inputs": [{"id": "i0", "name": "image", "type": "IMAGE", "linkIds": [11]},
                   {"id": "i1", "name": "strength", "type": "FLOAT", "linkIds": [12]}],
        "outputs": [{"id": "o0", "name": "IMAGE", "type": "IMAGE", "linkIds": [14]}],
        "widgets": [],
        "nodes": [
            node(1, "ImageAddNoise", [7, "fixed", 0.5],
                 inputs=[inp("image", "IMAGE", 11), inp("strength", "FLOAT", 12, widget=True)], outputs=[out("IMAGE", "IMAGE", [13])]),
            node(2, "ImageInvert", [], inputs=[inp("image", "IMAGE", 13)], outputs=[out("IMAGE", "IMAGE", [14])]),
        ],
        "links": [
            {"id": 11, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "IMAGE"},
            {"id": 12, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "FLOAT"},
            {"id": 13, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"},
            {"id": 14, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"},
        ],
    }
    return workflow(
        [
            node(1, "LoadImage", ["harness_gradient.png", "image"], outputs=[out("IMAGE", "IMAGE", [1])]),
            # saved files drop unlinked widget-input slots: `strength` is only a promoted widget value
            node(10, SUBGRAPH_ID, [0.0], inputs=[inp("image", "IMAGE", 1)], outputs=[out("IMAGE", "IMAGE", [2])]),
            node(3, "SaveImage", ["harness/sub"], inputs=[inp("images", "IMAGE", 2)]),
        ],
        [[1, 1, 0, 10, 0, "IMAGE"], [2, 10, 0, 3, 0, "IMAGE"]],
        subgraphs=[definition],
    )


def test_subgraph_flattening(comfy):
    api = strip_meta(harness.ui_to_api(subgraph_workflow()))
    assert api == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "harness_gradient.png"}},
        "10:1": {"class_type": "ImageAddNoise", "inputs": {"seed": 7, "strength": 0.0, "image": ["1", 0]}},
        "10:2": {"class_type": "ImageInvert", "inputs": {"image": ["10:1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "harness/sub", "images": ["10:2", 0]}},
    }


@pytest.mark.parametrize("make", [chain_workflow, subgraph_workflow], ids=["chain", "subgraph"])
def test_execute_on_cpu_writes_inverted_png(comfy, gray_png, make):
    name, arr = gray_png
    api = harness.ui_to_api(make())
    assert harness.validate(api) == []
    run = harness.execute(api)
    run.raise_for_error()
    save_id = harness.nodes_of(api, "SaveImage")[0]
    files = run.files(save_id)
    assert len(files) == 1 and files[0].is_file() and comfy.output_dir in files[0].parents
    saved = np.asarray(Image.open(files[0]))
    assert saved.shape == arr.shape  # (H, W, 3): RGB, same size
    # ImageAddNoise with strength 0 is the identity, ImageInvert is 1 - x; SaveImage truncates to uint8
    assert np.abs(saved.astype(int) - (255 - arr.astype(int))).max() <= 1
    inverted = run.output(harness.nodes_of(api, "ImageInvert")[0])
    assert tuple(inverted.shape) == (1, arr.shape[0], arr.shape[1], 3)
    np.testing.assert_allclose(inverted[0].numpy(), 1 - arr / 255.0, atol=1e-6)


def test_validate_reports_errors(comfy, gray_png):
    api = harness.ui_to_api(chain_workflow())
    api["2"]["inputs"]["strength"] = 5.0  # max is 1.0
    api["1"]["inputs"]["image"] = "missing.png"
    errors = harness.validate(api)
    kinds = {(e["node_id"], e["type"]) for e in errors}
    assert ("2", "value_bigger_than_max") in kinds and ("1", "custom_validation_failed") in kinds, errors
    with pytest.raises(harness.HarnessError, match="failed validation"):
        harness.execute(api)


def test_execution_error_is_reported(comfy):
    api = {"1": {"class_type": "RegexReplace", "inputs": {"string": "x", "regex_pattern": "(", "replace": ""}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    run = harness.execute(api)
    assert not run.success and run.error["node_id"] == "1"
    with pytest.raises(harness.HarnessError, match="RegexReplace"):
        run.raise_for_error()


# ---- the template workflows ComfyUI's front end ships (convert + validate; they need real models to run) --

MODEL_EXT = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".pt2", ".onnx")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
MEDIA_EXT = IMAGE_EXT + (".mp4", ".webm", ".mov", ".gif", ".mp3", ".wav", ".flac", ".ogg", ".m4a")


def _templates_dir():
    try:
        import comfyui_workflow_templates as t
    except ImportError:
        return None
    path = t.get_templates_path()
    return Path(path) if path and os.path.isdir(path) else None


def _fake_files(comfy, prompt, created):
    """Empty model files / tiny media files under every name the prompt's widgets mention."""
    fp = comfy.folder_paths
    for n in prompt.values():
        for v in n["inputs"].values():
            if not isinstance(v, str):
                continue
            low = v.lower()
            if low.endswith(MODEL_EXT):  # which folder a widget lists is unknown here: put it in all
                targets = [Path(paths[0]) / v for name, (paths, _e) in fp.folder_names_and_paths.items()
                           if name != "custom_nodes"]
            elif low.split(" [")[0].endswith(MEDIA_EXT):
                targets = [Path(fp.get_annotated_filepath(v))]
            else:
                continue
            for p in targets:
                if p.exists():
                    continue
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.suffix.lower() in IMAGE_EXT:
                    Image.new("RGB", (8, 8)).save(p, format="PNG")
                else:
                    p.touch()
                created.append(p)
    harness.refresh_file_lists()


def test_template_workflows_convert_and_validate(comfy):
    tdir = _templates_dir()
    if tdir is None:
        pytest.skip("comfyui_workflow_templates not installed: no front-end template workflows to convert")
    created: list[Path] = []
    converted, unknown, failures = 0, 0, []
    try:
        for f in sorted(tdir.glob("*.json")):
            try:
                wf = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(wf, dict) or "nodes" not in wf:
                continue
            try:
                api = harness.ui_to_api(copy.deepcopy(wf), strict=False)
            except harness.HarnessError as ex:
                if str(ex).startswith("unknown node types"):
                    unknown += 1  # API nodes (not loaded) or nodes whose optional deps are missing
                    continue
                failures.append(f"{f.name}: conversion: {ex}")
                continue
            converted += 1
            _fake_files(comfy, api, created)
            errors = harness.validate(api)
            if errors:
                failures.append(f"{f.name}:\n{harness.format_errors(errors)}")
    finally:
        for p in set(created):
            if p.is_file():
                p.unlink()
        harness.refresh_file_lists()
    print(f"templates: {converted} converted + validated, {unknown} skipped (unknown node types)")
    assert converted >= 50, f"only {converted} templates convertible ({unknown} with unknown node types)"
    assert not failures, "\n".join(failures)
