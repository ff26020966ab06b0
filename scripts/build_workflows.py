"""Build the shipped ComfyUI workflows (UI format, as the front end saves them) from compact graphs.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python scripts/build_workflows.py   # rewrites workflows/*.json

Each graph lists nodes with their widget values and links by (node, output slot). Widget values of the
pack's own nodes are given by name and laid out in the order of the node's schema (unnamed ones take the
schema default), so the files follow the nodes; built-in nodes list theirs in widget order. Positions are
laid out left to right by dependency depth.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"

COMFY_MASK = "ComfyUI mask (1 = background)"
ALPHA = "alpha (1 = foreground)"


_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def pack_widgets(node_id: str, values: dict) -> list:
    """``widgets_values`` of a pack node: its schema's widget inputs (required, then optional) in order,
    each from ``values`` or the schema default. Needs ComfyUI importable (``COMFYUI_PATH``)."""
    if os.environ.get("COMFYUI_PATH") and os.environ["COMFYUI_PATH"] not in sys.path:
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True  # only the schemas are needed: never touch a GPU
    from diffusion_matting.nodes import all_nodes

    cls = {c.GET_SCHEMA().node_id: c for c in all_nodes()}[node_id]
    spec = cls.INPUT_TYPES()
    out, seen = [], set()
    for group in ("required", "optional"):
        for name, (typ, *rest) in spec.get(group, {}).items():
            opts = rest[0] if rest else {}
            combo = isinstance(typ, list) or typ == "COMBO"
            if not combo and typ not in _WIDGET_TYPES:
                continue
            if name in values:
                out.append(values[name])
            elif "default" in opts:
                out.append(opts["default"])
            else:
                options = typ if isinstance(typ, list) else opts.get("options", [])
                out.append(options[0])
            seen.add(name)
    unknown = set(values) - seen
    if unknown:
        raise KeyError(f"{node_id} has no widget(s) {sorted(unknown)}")
    return out


class Graph:
    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, widgets: list | None = None, inputs: dict | None = None,
             outputs: list[tuple[str, str]] | None = None, title: str | None = None, size=(380, 170)) -> int:
        """inputs: {input name: (type, (src node id, src slot))}; outputs: [(name, type)]."""
        nid = len(self.nodes) + 1
        if isinstance(widgets, dict):
            widgets = pack_widgets(type_, widgets)
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
    join = g.node("DM_JoinRGBA", {"mask_convention": COMFY_MASK}, {"foreground": ("IMAGE", (load, 0)), "mask": ("MASK", (load, 1))},
                  [("RGBA", "IMAGE")])
    g.node("SaveImage", ["dm_rgba"], {"images": ("IMAGE", (join, 0))}, size=(320, 300))
    prev = g.node("DM_AlphaPreview", {"mode": "checkerboard"}, {"foreground": ("IMAGE", (join, 0))},
                  [("preview", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, size=(320, 300))
    tri = g.node("DM_TrimapFromMask", {"mask_convention": COMFY_MASK, "erode_px": 8, "dilate_px": 8}, {"mask": ("MASK", (load, 1))}, [("trimap", "MASK")])
    img = g.node("MaskToImage", [], {"mask": ("MASK", (tri, 0))}, [("IMAGE", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (img, 0))}, size=(320, 300))
    return g


def trimap_matting() -> Graph:
    """Trimap matting without weights: photo + trimap image -> alpha, straight foreground, RGBA."""
    g = Graph("Trimap matting (no weights)")
    photo = g.node("LoadImage", ["dm_trimap_photo.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   title="Photo", size=(380, 320))
    tri_img = g.node("LoadImage", ["dm_trimap.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                     title="Trimap (black = bg, grey = unknown, white = fg)", size=(380, 320))
    tri = g.node("ImageToMask", ["red"], {"image": ("IMAGE", (tri_img, 0))}, [("MASK", "MASK")])
    matte = g.node("DM_TrimapMatting", {},
                   {"image": ("IMAGE", (photo, 0)), "trimap": ("MASK", (tri, 0))},
                   [("alpha", "MASK"), ("foreground", "IMAGE"), ("rgba", "IMAGE")], size=(380, 300))
    g.node("SaveImage", ["dm_trimap_rgba"], {"images": ("IMAGE", (matte, 2))}, size=(380, 300))
    prev = g.node("DM_AlphaPreview", {"mode": "checkerboard"},
                  {"foreground": ("IMAGE", (matte, 1)), "alpha": ("MASK", (matte, 0))}, [("preview", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, size=(380, 300))
    return g


def drip_matting() -> Graph:
    """DRIP: photo + coarse mask -> trimap -> DRIP Sampler -> transparency-decoder decode -> RGBA + preview."""
    g = Graph("DRIP matting (DRIP UNet + SD VAE + transparency decoder)")
    photo = g.node("LoadImage", ["dm_drip_photo.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   title="Photo", size=(380, 320))
    mask = g.node("LoadImageMask", ["dm_drip_mask.png", "red", "image"], outputs=[("MASK", "MASK")],
                  title="Coarse mask (white = foreground)", size=(380, 320))
    tri = g.node("DM_TrimapFromMask", [ALPHA, 6, 6, 0.5], {"mask": ("MASK", (mask, 0))}, [("trimap", "MASK")])
    model = g.node("DM_DRIPModelLoader", ["drip-sd2-v.safetensors", "default", True], outputs=[("MODEL", "MODEL")],
                   title="DRIP Model Loader (models/drip)")
    vae = g.node("VAELoader", ["vae-ft-mse-840000-ema-pruned.safetensors"], outputs=[("VAE", "VAE")],
                 title="SD VAE (4 ch, 8x)")
    dec = g.node("DM_TransparencyDecoderLoader", ["drip-transparency-decoder.safetensors"],
                 outputs=[("decoder", "DM_TRANSPARENCY_DECODER")], title="Load Transparency Decoder")
    samp = g.node("DM_DRIPSampler", [8, 8, "dpmpp_2m", "simple", 10, 0, "fixed", 1, True],
                  {"model": ("MODEL", (model, 0)), "vae": ("VAE", (vae, 0)), "image": ("IMAGE", (photo, 0)),
                   "trimap": ("MASK", (tri, 0))},
                  [("fg LATENT", "LATENT"), ("alpha LATENT", "LATENT"), ("foreground", "IMAGE"), ("alpha", "MASK"),
                   ("RGBA", "IMAGE")], size=(380, 400))
    td = g.node("DM_DRIPTransparencyDecode", [512, 64, False],
                {"fg_latent": ("LATENT", (samp, 0)), "alpha_latent": ("LATENT", (samp, 1)),
                 "image": ("IMAGE", (photo, 0)), "trimap": ("MASK", (tri, 0)), "vae": ("VAE", (vae, 0)),
                 "decoder": ("DM_TRANSPARENCY_DECODER", (dec, 0))},
                [("foreground", "IMAGE"), ("alpha", "MASK"), ("RGBA", "IMAGE")], size=(380, 300))
    g.node("SaveImage", ["dm_drip_rgba"], {"images": ("IMAGE", (td, 2))}, size=(380, 300))
    prev = g.node("DM_AlphaPreview", {"mode": "checkerboard"},
                  {"foreground": ("IMAGE", (td, 0)), "alpha": ("MASK", (td, 1))}, [("preview", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, size=(380, 300))
    return g


def greenpost_key_photo() -> Graph:
    """Key an existing green-screen photo with GreenPost -> RGBA PNG, checkerboard preview, clean plate."""
    g = Graph("Key a green-screen photo with GreenPost (no weights)")
    load = g.node("LoadImage", ["dm_greenscreen.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                  title="Green-screen photo", size=(380, 320))
    gp = g.node("DM_GreenPost", {},
                {"image": ("IMAGE", (load, 0))},
                [("foreground", "IMAGE"), ("alpha", "MASK"), ("rgba", "IMAGE"), ("clean_plate", "IMAGE"),
                 ("key", "STRING")], size=(380, 330))
    g.node("SaveImage", ["dm_greenpost"], {"images": ("IMAGE", (gp, 2))}, size=(380, 300))
    prev = g.node("DM_AlphaPreview", {"mode": "checkerboard"},
                  {"foreground": ("IMAGE", (gp, 0)), "alpha": ("MASK", (gp, 1))}, [("preview", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, size=(380, 300))
    g.node("PreviewImage", [], {"images": ("IMAGE", (gp, 3))}, title="Clean plate", size=(380, 300))
    return g


BUILDERS = {"alpha_tools": alpha_tools, "trimap_matting": trimap_matting, "greenpost_key_photo": greenpost_key_photo, "drip_matting": drip_matting}


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(build().to_json(), indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
