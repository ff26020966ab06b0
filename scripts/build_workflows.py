"""Build the shipped ComfyUI workflows (UI format, as the front end saves them) from compact graphs.

    .venv/bin/python scripts/build_workflows.py          # rewrites workflows/*.json

Each graph lists nodes with their widget values (in the node's widget order) and links by
(node, output slot). Positions are laid out left to right by dependency depth.
"""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"

COMFY_MASK = "ComfyUI mask (1 = background)"
ALPHA = "alpha (1 = foreground)"


class Graph:
    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, widgets: list | None = None, inputs: dict | None = None,
             outputs: list[tuple[str, str]] | None = None, title: str | None = None, size=(380, 170)) -> int:
        """inputs: {input name: (type, (src node id, src slot))}; outputs: [(name, type)]."""
        nid = len(self.nodes) + 1
        node = {
            "id": nid, "type": type_, "pos": [0, 0], "size": list(size), "flags": {}, "order": nid - 1,
            "mode": 0, "inputs": [], "outputs": [],
            "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets or []),
        }
        if title:
            node["title"] = title
        for name, typ in outputs or []:
            node["outputs"].append({"name": name, "type": typ, "links": []})
        for name, (typ, (src, slot)) in (inputs or {}).items():
            lid = len(self.links) + 1
            self.links.append([lid, src, slot, nid, len(node["inputs"]), typ])
            node["inputs"].append({"name": name, "type": typ, "link": lid})
            self.nodes[src - 1]["outputs"][slot]["links"].append(lid)
        self.nodes.append(node)
        return nid

    def layout(self) -> None:
        depth: dict[int, int] = {}
        for n in self.nodes:  # nodes are added in dependency order
            srcs = [l[1] for l in self.links if l[3] == n["id"]]
            depth[n["id"]] = 1 + max((depth[s] for s in srcs), default=-1)
        rows: dict[int, int] = {}
        for n in self.nodes:
            d = depth[n["id"]]
            n["pos"] = [40 + d * 430, 40 + rows.get(d, 0)]
            rows[d] = rows.get(d, 0) + n["size"][1] + 60
            for o in n["outputs"]:
                o["slot_index"] = n["outputs"].index(o)

    def to_json(self) -> dict:
        self.layout()
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"title": self.title}, "version": 0.4,
        }


def alpha_tools() -> Graph:
    """Key-free alpha tools: an RGBA cut-out -> RGBA save, checkerboard preview, trimap preview."""
    g = Graph("Alpha tools (no keyer, no weights)")
    load = g.node("LoadImage", ["dm_cutout.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                  title="Load an RGBA cut-out (its MASK is 1 - alpha)", size=(320, 320))
    join = g.node("DM_JoinRGBA", [COMFY_MASK], {"foreground": ("IMAGE", (load, 0)), "mask": ("MASK", (load, 1))},
                  [("RGBA", "IMAGE")])
    g.node("SaveImage", ["dm_rgba"], {"images": ("IMAGE", (join, 0))}, size=(320, 300))
    prev = g.node("DM_AlphaPreview", ["checkerboard", "#ffffff", 16], {"foreground": ("IMAGE", (join, 0))},
                  [("preview", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, size=(320, 300))
    tri = g.node("DM_TrimapFromMask", [COMFY_MASK, 8, 8, 0.5], {"mask": ("MASK", (load, 1))}, [("trimap", "MASK")])
    img = g.node("MaskToImage", [], {"mask": ("MASK", (tri, 0))}, [("IMAGE", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (img, 0))}, size=(320, 300))
    return g


BUILDERS = {"alpha_tools": alpha_tools}


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(build().to_json(), indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
