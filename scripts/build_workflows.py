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
MODE_BYPASS = 4  # the front end's "bypass" (Ctrl+B): not executed, links pass through or drop


def _input_types(node_id: str) -> dict:
    """``INPUT_TYPES()`` of a pack node. Needs ComfyUI importable (``COMFYUI_PATH``)."""
    if os.environ.get("COMFYUI_PATH") and os.environ["COMFYUI_PATH"] not in sys.path:
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True  # only the schemas are needed: never touch a GPU
    from diffusion_matting.nodes import all_nodes

    return {c.GET_SCHEMA().node_id: c for c in all_nodes()}[node_id].INPUT_TYPES()


def socket_only_inputs(node_id: str) -> set[str]:
    """Inputs of a pack node that are sockets although their type could be a widget (V3
    ``force_input=True``, i.e. ``forceInput`` in ``INPUT_TYPES``): they have no widget and no value in
    ``widgets_values``."""
    spec = _input_types(node_id)
    return {name for group in ("required", "optional") for name, (_typ, *rest) in spec.get(group, {}).items()
            if rest and (rest[0].get("forceInput") or rest[0].get("force_input"))}


def pack_widgets(node_id: str, values: dict) -> list:
    """``widgets_values`` of a pack node: its schema's widget inputs (required, then optional; socket-only
    ``forceInput`` ones skipped) in order, each from ``values`` or the schema default. Needs ComfyUI
    importable (``COMFYUI_PATH``)."""
    spec = _input_types(node_id)
    out, seen = [], set()
    for group in ("required", "optional"):
        for name, (typ, *rest) in spec.get(group, {}).items():
            opts = rest[0] if rest else {}
            combo = isinstance(typ, list) or typ == "COMBO"
            if not combo and typ not in _WIDGET_TYPES:
                continue
            if opts.get("forceInput") or opts.get("force_input"):
                continue  # a socket, not a widget
            if name in values:
                out.append(values[name])
            elif "default" in opts:
                out.append(opts["default"])
            else:
                options = typ if isinstance(typ, list) else opts.get("options", [])
                out.append(options[0])
            seen.add(name)
            # the front end's extra widgets: control_after_generate after a seed-like INT ("fixed" keeps the
            # file reproducible; "<name>:control" overrides), plus control_filter_list after a COMBO's
            cag = opts.get("control_after_generate")
            if typ == "INT" and (cag or (cag is None and name in ("seed", "noise_seed"))):
                out.append(values.get(f"{name}:control", "fixed"))
                seen.add(f"{name}:control")
            elif combo and cag:
                out += [values.get(f"{name}:control", "fixed"), ""]
                seen.add(f"{name}:control")
    unknown = set(values) - seen
    if unknown:
        raise KeyError(f"{node_id} has no widget(s) {sorted(unknown)}")
    return out


class Graph:
    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.cols: dict[int, int] = {}

    def node(self, type_: str, widgets: list | None = None, inputs: dict | None = None,
             outputs: list[tuple[str, str]] | None = None, title: str | None = None, size=(380, 170),
             mode: int = 0, col: int | None = None) -> int:
        """inputs: {input name: (type, (src node id, src slot))}; outputs: [(name, type)].

        An input of a widget type (STRING, INT, FLOAT, BOOLEAN, COMBO) is a widget fed by a link (the
        widget keeps its value in ``widgets_values``); like the front end, such inputs follow the
        socket inputs. With ``widgets`` given by name (a pack node), the schema's socket-only inputs
        (``force_input``) get no ``widget`` entry. ``mode``: 0 = normal, 4 = bypassed (e.g. an optional
        loader the user enables).
        ``col``: layout column (default: one right of the node's deepest input), e.g. to put a loader
        next to the node it feeds."""
        nid = len(self.nodes) + 1
        if col is not None:
            self.cols[nid] = col
        sockets: set[str] = set()
        if isinstance(widgets, dict):
            widgets = pack_widgets(type_, widgets)
            sockets = socket_only_inputs(type_)
        node = {
            "id": nid, "type": type_, "pos": [0, 0], "size": list(size), "flags": {}, "order": nid - 1,
            "mode": mode, "inputs": [], "outputs": [],
            "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets or []),
        }
        if title:
            node["title"] = title
        for name, typ in outputs or []:
            node["outputs"].append({"name": name, "type": typ, "links": []})
        items = sorted((inputs or {}).items(), key=lambda kv: kv[1][0] in _WIDGET_TYPES and kv[0] not in sockets)
        for name, (typ, (src, slot)) in items:
            lid = len(self.links) + 1
            self.links.append([lid, src, slot, nid, len(node["inputs"]), typ])
            entry = {"name": name, "type": typ, "link": lid}
            if typ in _WIDGET_TYPES and name not in sockets:
                entry = {"name": name, "type": typ, "widget": {"name": name}, "link": lid}
            node["inputs"].append(entry)
            self.nodes[src - 1]["outputs"][slot]["links"].append(lid)
        self.nodes.append(node)
        return nid

    def note(self, text: str, title: str = "Models", size=(380, 220)) -> int:
        """A Note (front-end only; not executed) with instructions for the user."""
        return self.node("Note", [text], title=title, size=size)

    def depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}
        for n in self.nodes:  # nodes are added in dependency order
            srcs = [l[1] for l in self.links if l[3] == n["id"]]
            depth[n["id"]] = self.cols.get(n["id"], 1 + max((depth[s] for s in srcs), default=-1))
        return depth

    def depth_of(self, nid: int) -> int:
        return self.depths()[nid]

    def layout(self) -> None:
        depth = self.depths()
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


GREENPOST_OUTPUTS = [("foreground", "IMAGE"), ("alpha", "MASK"), ("rgba", "IMAGE"), ("clean_plate", "IMAGE"),
                     ("key", "STRING")]


def load_image(g: Graph, filename: str, title: str, size=(380, 320)) -> int:
    """A ``LoadImage`` of ``input/<filename>`` (outputs IMAGE and its ComfyUI MASK, 1 - alpha)."""
    return g.node("LoadImage", [filename, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title=title,
                  size=size)


def checker_preview(g: Graph, foreground: tuple[int, int], alpha: tuple[int, int] | None = None,
                    title: str | None = None, size=(380, 300)) -> int:
    """Alpha Preview (checkerboard) of ``foreground`` (an RGBA IMAGE, or straight RGB with ``alpha``) into a
    ``PreviewImage``; both given as (node, output slot)."""
    links = {"foreground": ("IMAGE", foreground)}
    if alpha is not None:
        links["alpha"] = ("MASK", alpha)
    prev = g.node("DM_AlphaPreview", {"mode": "checkerboard"}, links, [("preview", "IMAGE")])
    return g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, title=title, size=size)


def alpha_tools() -> Graph:
    """Key-free alpha tools: an RGBA cut-out -> RGBA save, checkerboard preview, trimap preview."""
    g = Graph("Alpha tools (no keyer, no weights)")
    load = load_image(g, "dm_cutout.png", "Load an RGBA cut-out (its MASK is 1 - alpha)", size=(320, 320))
    join = g.node("DM_JoinRGBA", {"mask_convention": COMFY_MASK}, {"foreground": ("IMAGE", (load, 0)), "mask": ("MASK", (load, 1))},
                  [("RGBA", "IMAGE")])
    g.node("SaveImage", ["dm_rgba"], {"images": ("IMAGE", (join, 0))}, size=(320, 300))
    checker_preview(g, (join, 0), size=(320, 300))
    tri = g.node("DM_TrimapFromMask", {"mask_convention": COMFY_MASK, "erode_px": 8, "dilate_px": 8}, {"mask": ("MASK", (load, 1))}, [("trimap", "MASK")])
    img = g.node("MaskToImage", [], {"mask": ("MASK", (tri, 0))}, [("IMAGE", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (img, 0))}, size=(320, 300))
    return g


def trimap_matting() -> Graph:
    """Trimap matting without weights: photo + trimap image -> alpha, straight foreground, RGBA."""
    g = Graph("Trimap matting (no weights)")
    photo = load_image(g, "dm_trimap_photo.png", "Photo")
    tri_img = load_image(g, "dm_trimap.png", "Trimap (black = bg, grey = unknown, white = fg)")
    tri = g.node("ImageToMask", ["red"], {"image": ("IMAGE", (tri_img, 0))}, [("MASK", "MASK")])
    matte = g.node("DM_TrimapMatting", {},
                   {"image": ("IMAGE", (photo, 0)), "trimap": ("MASK", (tri, 0))},
                   [("alpha", "MASK"), ("foreground", "IMAGE"), ("rgba", "IMAGE")], size=(380, 300))
    g.node("SaveImage", ["dm_trimap_rgba"], {"images": ("IMAGE", (matte, 2))}, size=(380, 300))
    checker_preview(g, (matte, 1), (matte, 0))
    return g


def drip_matting() -> Graph:
    """DRIP: photo + coarse mask -> trimap -> DRIP Sampler -> transparency-decoder decode -> RGBA + preview."""
    g = Graph("DRIP matting (DRIP UNet + SD VAE + transparency decoder)")
    photo = load_image(g, "dm_drip_photo.png", "Photo")
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
    checker_preview(g, (td, 0), (td, 1))
    return g


def greenpost_key_photo() -> Graph:
    """Key an existing green-screen photo with GreenPost -> RGBA PNG, checkerboard preview, clean plate."""
    g = Graph("Key a green-screen photo with GreenPost (no weights)")
    load = load_image(g, "dm_greenscreen.png", "Green-screen photo")
    gp = g.node("DM_GreenPost", {},
                {"image": ("IMAGE", (load, 0))},
                GREENPOST_OUTPUTS, size=(380, 330))
    g.node("SaveImage", ["dm_greenpost"], {"images": ("IMAGE", (gp, 2))}, size=(380, 300))
    checker_preview(g, (gp, 0), (gp, 1))
    g.node("PreviewImage", [], {"images": ("IMAGE", (gp, 3))}, title="Clean plate", size=(380, 300))
    return g


# ---- GreenPost + BackgroundMattingV2 (the paper's learned refinement; public weights) ----------------------
BMV2_FILE = "pytorch_mobilenetv2.pth"  # the authors' public file name (PeterL1n/BackgroundMattingV2, MIT)
BMV2_NOTE = "\n\n".join([
    f"BackgroundMattingV2 weights: models/background_matting/{BMV2_FILE} (or pytorch_resnet50.pth / "
    "pytorch_resnet101.pth), the authors' PyTorch files from github.com/PeterL1n/BackgroundMattingV2 (MIT). "
    "They are loaded tensors-only (torch.load(weights_only=True)); `diffusion-matting convert bmv2 IN.pth "
    "OUT.safetensors` makes a .safetensors copy.",
    "GreenPost finds the key colour and estimates the clean plate; the network takes the photo and that plate "
    "and returns the alpha and straight foreground. Disconnect the refiner input for plain (training-free) "
    "GreenPost.",
])


def greenpost_bmv2() -> Graph:
    """Green-screen photo -> Load BackgroundMattingV2 -> GreenPost (refiner) -> RGBA PNG, checkerboard preview,
    clean plate."""
    g = Graph("Key a green-screen photo with GreenPost + BackgroundMattingV2")
    g.note(BMV2_NOTE, title="BackgroundMattingV2 weights", size=(400, 260))
    load = load_image(g, "dm_greenscreen.png", "Green-screen photo")
    bm = g.node("DM_BackgroundMattingLoader", [BMV2_FILE, "auto", "sampling", 0, 0.1],
                outputs=[("refiner", "DM_BMV2")], title="Load BackgroundMattingV2 (models/background_matting)",
                size=(380, 200))
    gp = g.node("DM_GreenPost", {},
                {"image": ("IMAGE", (load, 0)), "refiner": ("DM_BMV2", (bm, 0))},
                GREENPOST_OUTPUTS, size=(380, 330))
    g.node("SaveImage", ["dm_greenpost_bmv2"], {"images": ("IMAGE", (gp, 2))}, size=(380, 300))
    checker_preview(g, (gp, 0), (gp, 1))
    g.node("PreviewImage", [], {"images": ("IMAGE", (gp, 3))}, title="Clean plate", size=(380, 300))
    return g


# ---- green-canvas generation (DiffuMatting without its weights) ----------------------------------------
# Public file names (README: "Workflows"); tests/comfy/test_workflows.py writes random-weight models
# under exactly these names.
CHECKPOINTS = {"sd15": "v1-5-pruned-emaonly.safetensors", "sdxl": "sd_xl_base_1.0.safetensors"}
SIZES = {"sd15": 512, "sdxl": 1024}
LORA_SD15 = "add_detail.safetensors"  # "Detail Tweaker LoRA" (civitai.com/models/58390): any SD1.5 LoRA works
CONTROLNET_SD15 = "control_v11p_sd15_openpose.safetensors"  # lllyasviel/ControlNet-v1-1 (comfyanonymous fp16 too)
MATTING_HEADS = {"sd15": "dm-matting-head-sd15.safetensors", "sdxl": "dm-matting-head-sdxl.safetensors"}
GC_PROMPT = "a portrait photo of a woman with long curly hair, studio light, sharp focus"
GC_NEGATIVE = "blurry, lowres, shadow, gradient background, vignette, text, watermark"


def _green_canvas_note(family: str, lora: bool, controlnet: bool) -> str:
    lines = [f"Checkpoint: models/checkpoints/{CHECKPOINTS[family]} (any {'SD1.5' if family == 'sd15' else 'SDXL'} "
             "checkpoint works)."]
    if lora:
        lines.append(f"LoRA: models/loras/{LORA_SD15} (Detail Tweaker; any SD1.5 LoRA works).")
    if controlnet:
        lines.append(f"ControlNet: models/controlnet/{CONTROLNET_SD15}; load an OpenPose skeleton image "
                     "(e.g. from a pose preprocessor) as the pose image.")
    lines += [
        f"Optional: a matting head trained with `diffusion-matting train matting-head` in models/matting_heads/ "
        f"({MATTING_HEADS[family]}); select the bypassed Load Matting Head node and press Ctrl+B. Without it, "
        "VAE Decode with Matte keys the decoded image with GreenPost (training-free).",
        "Append Canvas Phrase adds 'pure green background'; the same text goes to CLIP Text Encode and Green "
        "Canvas Model (which finds the key word 'green' in it). Green Canvas Noise already holds the noise: keep "
        "add_noise = disable in KSampler (Advanced).",
    ]
    return "\n\n".join(lines)


def green_canvas(family: str = "sd15", lora: bool = False, controlnet: bool = False) -> Graph:
    """Green-canvas text-to-image: checkpoint [-> LoRA] -> Green Canvas Model + key-colour noise ->
    KSampler (Advanced) [with a ControlNet on the conditioning] -> VAE Decode with Matte (optional matting
    head; GreenPost fallback) -> GreenPost with the decode's matte as coarse mask -> RGBA PNG + preview."""
    fam = "SD1.5" if family == "sd15" else "SDXL"
    extras = " + LoRA + ControlNet (OpenPose)" if lora or controlnet else ""
    g = Graph(f"Green-canvas generation ({fam}{extras}) -> VAE Decode with Matte -> GreenPost -> RGBA")
    g.note(_green_canvas_note(family, lora, controlnet), title="Models and tips", size=(400, 330))
    ckpt = g.node("CheckpointLoaderSimple", [CHECKPOINTS[family]],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], title=f"Load Checkpoint ({fam})",
                  size=(380, 120))
    model, clip = (ckpt, 0), (ckpt, 1)
    vae = (ckpt, 2)
    if lora:
        lo = g.node("LoraLoader", [LORA_SD15, 0.6, 0.6], {"model": ("MODEL", model), "clip": ("CLIP", clip)},
                    [("MODEL", "MODEL"), ("CLIP", "CLIP")], title="Load LoRA (any SD1.5 LoRA)", size=(380, 140))
        model, clip = (lo, 0), (lo, 1)
    phrase = g.node("DM_AppendCanvasPhrase", {"prompt": GC_PROMPT}, outputs=[("prompt", "STRING")],
                    title="Prompt (+ ', pure green background')", size=(400, 200))
    pos = g.node("CLIPTextEncode", [""], {"clip": ("CLIP", clip), "text": ("STRING", (phrase, 0))},
                 [("CONDITIONING", "CONDITIONING")], title="CLIP Text Encode (positive)", size=(380, 100))
    neg = g.node("CLIPTextEncode", [GC_NEGATIVE], {"clip": ("CLIP", clip)},
                 [("CONDITIONING", "CONDITIONING")], title="CLIP Text Encode (negative)", size=(380, 160))
    positive, negative = (pos, 0), (neg, 0)
    if controlnet:
        beside = 2 if lora else 1  # the column of the text encoders: right before Apply ControlNet
        cn = g.node("ControlNetLoader", [CONTROLNET_SD15], outputs=[("CONTROL_NET", "CONTROL_NET")],
                    title="Load ControlNet (OpenPose)", size=(380, 90), col=beside)
        pose = g.node("LoadImage", ["dm_pose.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                      title="Pose image (OpenPose skeleton)", size=(380, 320), col=beside)
        apply = g.node("ControlNetApplyAdvanced", [0.8, 0.0, 1.0],
                       {"positive": ("CONDITIONING", positive), "negative": ("CONDITIONING", negative),
                        "control_net": ("CONTROL_NET", (cn, 0)), "image": ("IMAGE", (pose, 0))},
                       [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], size=(380, 190))
        positive, negative = (apply, 0), (apply, 1)
    size = SIZES[family]
    canvas = g.node("DM_CanvasLatent", {"width": size, "height": size}, {"vae": ("VAE", vae)},
                    [("canvas", "LATENT")], size=(380, 180))
    gcm = g.node("DM_GreenCanvasModel", {}, {"model": ("MODEL", model), "canvas": ("LATENT", (canvas, 0)),
                                             "clip": ("CLIP", clip), "prompt": ("STRING", (phrase, 0))},
                 [("model", "MODEL")], size=(400, 330))
    noise = g.node("DM_GreenCanvasNoise", {"seed": 42}, {"model": ("MODEL", model), "canvas": ("LATENT", (canvas, 0))},
                   [("noise", "NOISE"), ("noisy_latent", "LATENT")], size=(380, 250))
    ks = g.node("KSamplerAdvanced", ["disable", 0, "fixed", 25, 7.0, "dpmpp_2m", "karras", 0, 10000, "disable"],
                {"model": ("MODEL", (gcm, 0)), "positive": ("CONDITIONING", positive),
                 "negative": ("CONDITIONING", negative), "latent_image": ("LATENT", (noise, 1))},
                [("LATENT", "LATENT")], title="KSampler (Advanced): add_noise = disable", size=(380, 340))
    head = g.node("DM_MattingHeadLoader", [MATTING_HEADS[family]], outputs=[("matting_head", "DM_MATTING_HEAD")],
                  title="Load Matting Head (optional: bypassed)", size=(380, 90), mode=MODE_BYPASS,
                  col=g.depth_of(ks))
    dec = g.node("DM_VAEDecodeWithMatte", {}, {"samples": ("LATENT", (ks, 0)), "vae": ("VAE", vae),
                                              "matting_head": ("DM_MATTING_HEAD", (head, 0))},
                 [("image", "IMAGE"), ("alpha", "MASK"), ("mask_source", "STRING")], size=(380, 150))
    gp = g.node("DM_GreenPost", {"mask_convention": ALPHA},
                {"image": ("IMAGE", (dec, 0)), "coarse_mask": ("MASK", (dec, 1))},
                GREENPOST_OUTPUTS, size=(380, 330))
    g.node("PreviewImage", [], {"images": ("IMAGE", (dec, 0))}, title="Generated image (green canvas)",
           size=(380, 320))
    g.node("SaveImage", [f"dm_green_canvas_{family}" + ("_lora_cn" if lora or controlnet else "")],
           {"images": ("IMAGE", (gp, 2))}, title="Save RGBA PNG", size=(380, 320))
    checker_preview(g, (gp, 0), (gp, 1), title="Cut-out on a checkerboard", size=(380, 320))
    return g


def green_canvas_sd15() -> Graph:
    return green_canvas("sd15")


def green_canvas_lora_controlnet() -> Graph:
    return green_canvas("sd15", lora=True, controlnet=True)


def green_canvas_sdxl() -> Graph:
    return green_canvas("sdxl")


# ---- matting-data factory (Save Matting Sample; driven by `diffusion-matting factory`) ----------------------
# Green-canvas SD1.5 generation (Green Canvas Sample, all-in-one) -> VAE Decode with Matte (optional matting
# head, bypassed; GreenPost fallback) -> GreenPost with the decode's matte as coarse mask -> Save Matting
# Sample (composite, alpha, straight foreground, caption = the prompt with the canvas phrase). The prompt
# comes from a String (Multiline) node titled ``prompt`` and the seed from an Int node titled ``seed``:
# ``diffusion-matting factory`` writes each job's prompt and seed there; in the front end, queue it with a
# batch count and edit the prompt between runs.
FACTORY_PROMPT = "a portrait photo of a woman with long curly hair, studio light, sharp focus"
PROMPT_TITLE = "prompt"  # diffusion-matting factory --prompt-title (default)
SEED_TITLE = "seed"      # diffusion-matting factory --seed-title (default)
DATASET_SUBFOLDER = "green_matting"

FACTORY_NOTE = "\n\n".join([
    f"Checkpoint: models/checkpoints/{CHECKPOINTS['sd15']} (any SD1.5 checkpoint works).",
    f"Optional: a matting head in models/matting_heads/ ({MATTING_HEADS['sd15']}); select the bypassed Load "
    "Matting Head node and press Ctrl+B. Without it, VAE Decode with Matte keys the image with GreenPost.",
    f"Each run writes output/{DATASET_SUBFOLDER}/image|alpha|fg|captions/<name> and a manifest.jsonl line per "
    "sample (names never reused). Queue with a batch count here, or drive one or more servers with:",
    "diffusion-matting factory --server http://127.0.0.1:8188 --workflow matting_data_factory.json "
    "--prompts prompts.txt --count 1000 --out dataset/",
    f"The factory writes each prompt into the node titled '{PROMPT_TITLE}' and each seed into the node titled "
    f"'{SEED_TITLE}'. Green Canvas Sample appends ', pure green background'; that text is the caption.",
])


def matting_data_factory() -> Graph:
    """Green-canvas SD1.5 -> VAE Decode with Matte -> GreenPost -> Save Matting Sample, prompt/seed nodes
    titled for ``diffusion-matting factory``."""
    g = Graph("Matting-data factory: green-canvas SD1.5 -> VAE Decode with Matte -> GreenPost -> Save Matting Sample")
    g.note(FACTORY_NOTE, title="Matting-data factory", size=(420, 360))
    ckpt = g.node("CheckpointLoaderSimple", [CHECKPOINTS["sd15"]],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], title="Load Checkpoint (SD1.5)",
                  size=(380, 120))
    prompt = g.node("PrimitiveStringMultiline", [FACTORY_PROMPT], outputs=[("STRING", "STRING")], title=PROMPT_TITLE,
                    size=(400, 160))
    seed = g.node("PrimitiveInt", [0, "randomize"], outputs=[("INT", "INT")], title=SEED_TITLE, size=(320, 110))
    size = SIZES["sd15"]
    sample = g.node("DM_GreenCanvasSample",
                    {"negative_prompt": GC_NEGATIVE, "width": size, "height": size, "steps": 25, "cfg": 6.0,
                     "seed:control": "fixed"},
                    {"model": ("MODEL", (ckpt, 0)), "clip": ("CLIP", (ckpt, 1)), "vae": ("VAE", (ckpt, 2)),
                     "prompt": ("STRING", (prompt, 0)), "seed": ("INT", (seed, 0))},
                    [("latent", "LATENT"), ("coarse_alpha", "MASK"), ("background_mask", "MASK"), ("prompt", "STRING")],
                    size=(400, 620))
    head = g.node("DM_MattingHeadLoader", [MATTING_HEADS["sd15"]], outputs=[("matting_head", "DM_MATTING_HEAD")],
                  title="Load Matting Head (optional: bypassed)", size=(380, 90), mode=MODE_BYPASS)
    dec = g.node("DM_VAEDecodeWithMatte", {}, {"samples": ("LATENT", (sample, 0)), "vae": ("VAE", (ckpt, 2)),
                                              "matting_head": ("DM_MATTING_HEAD", (head, 0))},
                 [("image", "IMAGE"), ("alpha", "MASK"), ("mask_source", "STRING")], size=(380, 150))
    gp = g.node("DM_GreenPost", {"mask_convention": ALPHA},
                {"image": ("IMAGE", (dec, 0)), "coarse_mask": ("MASK", (dec, 1))},
                GREENPOST_OUTPUTS, size=(380, 330))
    # caption / prompt / seed are socket-only (force_input): no widget, no entry in widgets_values
    g.node("DM_SaveMattingSample", {"subfolder": DATASET_SUBFOLDER, "prefix": "gen", "mask_convention": ALPHA},
           {"image": ("IMAGE", (dec, 0)), "alpha": ("MASK", (gp, 1)), "foreground": ("IMAGE", (gp, 0)),
            "caption": ("STRING", (sample, 3)), "prompt": ("STRING", (prompt, 0)), "seed": ("INT", (seed, 0))},
           title="Save Matting Sample", size=(380, 230))
    checker_preview(g, (gp, 0), (gp, 1), title="Cut-out on a checkerboard", size=(380, 320))
    return g


# Add a workflow: write a builder returning a Graph and list it here (file name = key); give it a Spec in
# tests/comfy/test_workflows.py if it needs model files or inputs of its own.
BUILDERS = {"alpha_tools": alpha_tools, "trimap_matting": trimap_matting, "greenpost_key_photo": greenpost_key_photo,
            "drip_matting": drip_matting, "green_canvas_sd15": green_canvas_sd15,
            "green_canvas_lora_controlnet": green_canvas_lora_controlnet, "green_canvas_sdxl": green_canvas_sdxl,
            "greenpost_bmv2": greenpost_bmv2, "matting_data_factory": matting_data_factory}


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(build().to_json(), indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
