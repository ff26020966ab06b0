"""The matting-data factory workflow (UI format), built like the ones in ``build_workflows.py``.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python scripts/workflow_factory.py   # prints the JSON

Green-canvas SD1.5 generation (Green Canvas Sample, all-in-one) -> VAE Decode with Matte (optional
matting head, bypassed; GreenPost fallback) -> GreenPost with the decode's matte as coarse mask ->
Save Matting Sample (composite, alpha, straight foreground, caption = the prompt with the canvas phrase).
The prompt comes from a String (Multiline) node titled ``prompt`` and the seed from an Int node titled
``seed``: ``diffusion-matting factory`` writes each job's prompt and seed there; in the front end, queue
it with a batch count and edit the prompt between runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_workflows import ALPHA, CHECKPOINTS, GC_NEGATIVE, MATTING_HEADS, MODE_BYPASS, SIZES, Graph  # noqa: E402

FACTORY_PROMPT = "a portrait photo of a woman with long curly hair, studio light, sharp focus"
PROMPT_TITLE = "prompt"  # diffusion-matting factory --prompt-title (default)
SEED_TITLE = "seed"      # diffusion-matting factory --seed-title (default)
DATASET_SUBFOLDER = "green_matting"

NOTE = "\n\n".join([
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


def socket_only(g: Graph, nid: int) -> None:
    """Inputs of a STRING/INT type that are sockets (``force_input``), not widgets: no ``widget`` entry."""
    for entry in g.nodes[nid - 1]["inputs"]:
        entry.pop("widget", None)


def matting_data_factory() -> Graph:
    """Green-canvas SD1.5 -> VAE Decode with Matte -> GreenPost -> Save Matting Sample, prompt/seed nodes
    titled for ``diffusion-matting factory``."""
    g = Graph("Matting-data factory: green-canvas SD1.5 -> VAE Decode with Matte -> GreenPost -> Save Matting Sample")
    g.note(NOTE, title="Matting-data factory", size=(420, 360))
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
                [("foreground", "IMAGE"), ("alpha", "MASK"), ("rgba", "IMAGE"), ("clean_plate", "IMAGE"),
                 ("key", "STRING")], size=(380, 330))
    # Save Matting Sample's widgets are listed (subfolder, prefix, mask_convention): its socket-only STRING
    # inputs (caption, prompt) have no widget, which pack_widgets does not skip.
    save = g.node("DM_SaveMattingSample", [DATASET_SUBFOLDER, "gen", ALPHA],
                  {"image": ("IMAGE", (dec, 0)), "alpha": ("MASK", (gp, 1)), "foreground": ("IMAGE", (gp, 0)),
                   "caption": ("STRING", (sample, 3)), "prompt": ("STRING", (prompt, 0)), "seed": ("INT", (seed, 0))},
                  title="Save Matting Sample", size=(380, 230))
    socket_only(g, save)
    prev = g.node("DM_AlphaPreview", {"mode": "checkerboard"},
                  {"foreground": ("IMAGE", (gp, 0)), "alpha": ("MASK", (gp, 1))}, [("preview", "IMAGE")])
    g.node("PreviewImage", [], {"images": ("IMAGE", (prev, 0))}, title="Cut-out on a checkerboard", size=(380, 320))
    return g


if __name__ == "__main__":
    print(json.dumps(matting_data_factory().to_json(), indent=1))
