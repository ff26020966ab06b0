"""Every shipped workflow (workflows/*.json, UI format) converts, validates with zero errors and runs
on the CPU inside ComfyUI; saved/previewed images are checked against the tensors that produced them
and, for the pack's nodes, against independent computations from the inputs the test generated.

Per-workflow needs go in ``SPECS``: a ``setup`` hook (write input images / random-weight model files
under the names the workflow's widgets use: tests/comfy/models.py builds checkpoints, LoRAs and
ControlNets ComfyUI's loaders detect), the expected output size, test-only widget ``overrides`` (e.g. a
small latent and few steps; the shipped JSON keeps the user-facing values) and extra checks. Input
images named by LoadImage widgets and not written by a hook get a procedural default (an RGBA cut-out,
or a green-screen shot when the name says green/screen/key).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import harness

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
INPUT_HW = (72, 96)  # default input size (H, W): small and non-square to catch transposes


# ---- context handed to setup hooks and checks -------------------------------------------------------

@dataclass
class WorkflowContext:
    env: harness.ComfyEnv
    name: str
    workflow: dict
    inputs: dict[str, dict] = field(default_factory=dict)   # filename -> {"rgb": u8 HxWx3, "alpha": u8 HxW | None}
    truth: dict[str, Any] = field(default_factory=dict)     # filename -> ground truth (e.g. samples.Sample)
    prompt: dict | None = None
    run: harness.Run | None = None

    def add_input_image(self, filename: str, rgb: np.ndarray, alpha: np.ndarray | None = None) -> Path:
        """Write ``rgb`` (u8 HxWx3) [+ ``alpha`` u8 HxW] as a PNG in ComfyUI's input dir."""
        path = Path(self.env.folder_paths.get_annotated_filepath(filename))
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rgb if alpha is None else np.concatenate([rgb, alpha[..., None]], axis=-1)
        Image.fromarray(np.ascontiguousarray(arr)).save(path)
        self.inputs[filename] = {"rgb": rgb, "alpha": alpha}
        harness.refresh_file_lists()
        return path

    def add_model_file(self, folder_name: str, filename: str, tensors: dict[str, torch.Tensor] | bytes) -> Path:
        """Write a model file (a safetensors state dict, or raw bytes) where ComfyUI's ``folder_name``
        lists it, e.g. random weights made by a setup hook for a checkpoint-loading workflow."""
        path = harness.model_path(folder_name, filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(tensors, (bytes, bytearray)):
            path.write_bytes(tensors)
        else:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        harness.refresh_file_lists()
        return path

    # helpers for checks
    def upstream(self, node_id: str, input_name: str):
        """The value feeding ``input_name`` of ``node_id`` (None if unlinked)."""
        link = harness.upstream(self.prompt, node_id, input_name)
        return None if link is None else self.run.output(link[0], link[1])

    def loaded_file(self, node_id: str, input_name: str) -> dict | None:
        """The generated input behind ``input_name`` if it comes straight from a LoadImage node."""
        link = harness.upstream(self.prompt, node_id, input_name)
        if link is None or self.prompt[link[0]]["class_type"] != "LoadImage":
            return None
        return self.inputs.get(self.prompt[link[0]]["inputs"]["image"])


@dataclass
class Spec:
    """How the test runs one shipped workflow.

    ``overrides``: test-only widget values, ``{class_type: {input name: value}}``, set on every node of
    that type in the converted API prompt (after conversion and before validation), e.g. a smaller
    latent and fewer steps so random-weight checkpoints sample in seconds on a CPU. The shipped JSON keeps
    its user-facing values; every named node type and input must exist (a stale override fails)."""
    setup: Callable[[WorkflowContext], None] | None = None
    output_hw: tuple[int, int] | None = None   # every saved/previewed image's (H, W); None = the input size
    check: Callable[[WorkflowContext], None] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def apply_overrides(prompt: dict, overrides: dict[str, dict[str, Any]]) -> None:
    for class_type, values in overrides.items():
        ids = harness.nodes_of(prompt, class_type)
        assert ids, f"override for {class_type}, which the workflow does not have"
        for nid in ids:
            for name, value in values.items():
                assert name in prompt[nid]["inputs"], f"override {class_type}.{name}: no such input in node {nid}"
                assert not isinstance(prompt[nid]["inputs"][name], list), f"override {class_type}.{name}: linked"
                prompt[nid]["inputs"][name] = value


def _sample(h: int, w: int, seed: int, style: str = "studio"):
    try:
        from diffusion_matting.py.samples import make_sample
    except ImportError:  # pragma: no cover - the pack's core is importable wherever the pack is installed
        return None
    return make_sample(height=h, width=w, seed=seed, style=style)


def default_input(ctx: WorkflowContext, filename: str) -> None:
    h, w = INPUT_HW
    seed = sum(filename.encode()) % 97
    keyed = any(k in filename.lower() for k in ("green", "screen", "key", "plate"))
    s = _sample(h, w, seed)
    if s is None:  # soft disc fallback
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.clip(1.0 - (np.hypot(yy - h / 2, xx - w / 2) - h / 3) / 3, 0, 1).astype(np.float32)
        fg = np.stack([0.8 * a + 0.1, 0.3 * np.ones_like(a), 0.5 * np.ones_like(a)], -1).astype(np.float32)
        image = a[..., None] * fg + (1 - a[..., None]) * np.array([0.16, 0.62, 0.26], np.float32)
    else:
        a, fg, image = s.alpha, s.fg, s.image
    u8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    if keyed:
        ctx.add_input_image(filename, u8(image))
    else:  # an RGBA cut-out: straight colour + alpha
        ctx.add_input_image(filename, u8(fg), u8(a))
    ctx.truth[filename] = s


def _trimap_inputs(ctx: WorkflowContext) -> None:
    """A composite photo and its trimap (0/128/255 from the exact alpha, 4 px unknown band)."""
    h, w = INPUT_HW
    s = _sample(h, w, seed=11, style="pure")
    a = torch.from_numpy(s.alpha)[None]
    from diffusion_matting.py.alpha import trimap_from_mask
    band = (a > 0.02) & (a < 0.98)
    tri, _ = trimap_from_mask((a > 0.5).float(), erode_px=3, dilate_px=3)
    tri[band] = 0.5
    u8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    ctx.add_input_image("dm_trimap_photo.png", u8(s.image))
    t8 = np.round(tri[0].numpy() * 255).astype(np.uint8)
    t8[t8 == 127] = 128
    ctx.add_input_image("dm_trimap.png", np.repeat(t8[..., None], 3, -1))
    ctx.truth["trimap"] = (s, tri[0].numpy())


def _trimap_check(ctx: WorkflowContext) -> None:
    s, tri = ctx.truth["trimap"]
    nid = next(k for k, v in ctx.prompt.items() if v["class_type"] == "DM_TrimapMatting")
    alpha = _np(ctx.run.output(nid, 0))[0]
    unknown = tri == 0.5
    # known regions are respected exactly; the unknown band is solved far better than a flat 0.5 guess
    np.testing.assert_array_equal(alpha[tri == 1.0], 1.0)
    np.testing.assert_array_equal(alpha[tri == 0.0], 0.0)
    err = float(np.abs(alpha - s.alpha)[unknown].mean())
    flat = float(np.abs(0.5 - s.alpha)[unknown].mean())
    assert err < 0.5 * flat, (err, flat)


DRIP_HW = (54, 74)  # not a multiple of 8: DRIP pads to 56 x 80 (7 x 10 latents) and crops back
DRIP_FILES = {"drip": "drip-sd2-v.safetensors", "vae": "vae-ft-mse-840000-ema-pruned.safetensors",
              "transparency_decoders": "drip-transparency-decoder.safetensors"}


def _random_like(state: dict, seed: int) -> dict:
    """Random weights for a state dict: unit norms, zero biases, 1/sqrt(fan_in) kernels (finite, O(1) signals)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
        elif "norm" in k and k.endswith("weight"):
            out[k] = torch.ones_like(v)
        elif k.endswith("bias"):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5
    return out


def _drip_inputs(ctx: WorkflowContext) -> None:
    """Photo + coarse mask image, and random-weight model files under the names the workflow uses:
    a tiny DRIP UNet of the SD2 architecture (v-prediction, LDM keys), a full-size SD VAE (VAELoader
    only recognises the real architecture) and a small transparency decoder."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from diffusion_matting.py import transparency_decoder as TD
    from diffusion_matting.py.drip import model as M
    from diffusion_matting.py.drip.checkpoint import save_drip

    h, w = DRIP_HW
    s = _sample(h, w, seed=5, style="studio")
    u8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    ctx.add_input_image("dm_drip_photo.png", u8(s.image))
    coarse = (s.alpha > 0.5).astype(np.float32)
    ctx.add_input_image("dm_drip_mask.png", np.repeat(u8(coarse)[..., None], 3, -1))
    ctx.truth["drip"] = s

    torch.manual_seed(0)
    unet = M.build_unet(M.drip_config(M.base_config("sd2", tiny=True)))
    path = harness.model_path("drip", DRIP_FILES["drip"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_drip(path, unet.state_dict(), unet.config, base_family="sd2", prediction_type="v_prediction",
              text_embedding=torch.randn(1, 77, 1024) * 0.5, layout="ldm")

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    probe = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)  # the model comfy.sd.VAE builds for these keys
    vae_sd = _random_like(probe.state_dict(), seed=3)
    del probe
    ctx.add_model_file("vae", DRIP_FILES["vae"], {k: v.half() for k, v in vae_sd.items()})

    dec = TD.TransparencyDecoder(TD.TransparencyDecoderConfig(base_channels=16, channel_mult=(1, 2, 2, 2),
                                                              hint_channels=16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like: the zero-initialised output / hint convs made non-zero
        for conv in (dec.conv_out, dec.hint_fg.zero, dec.hint_alpha.zero):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    TD.save_decoder(dec, harness.model_path("transparency_decoders", DRIP_FILES["transparency_decoders"]),
                    vae_family="sd")
    harness.refresh_file_lists()


def _drip_check(ctx: WorkflowContext) -> None:
    from diffusion_matting.py import transparency_decoder as TD

    h, w = DRIP_HW
    (tri_id,) = harness.nodes_of(ctx.prompt, "DM_TrimapFromMask")
    (samp_id,) = harness.nodes_of(ctx.prompt, "DM_DRIPSampler")
    (td_id,) = harness.nodes_of(ctx.prompt, "DM_DRIPTransparencyDecode")
    tri = _np(ctx.run.output(tri_id))[0]
    assert tri.shape == (h, w) and (tri == 0.5).any() and (tri == 1).any() and (tri == 0).any()
    # the trimap comes from the coarse mask we wrote (white = foreground)
    coarse = ctx.inputs["dm_drip_mask.png"]["rgb"][..., 0] > 127
    assert coarse[tri == 1].all() and not coarse[tri == 0].any()

    fg_l, al_l = (ctx.run.output(samp_id, i)["samples"] for i in (0, 1))
    assert tuple(fg_l.shape) == tuple(al_l.shape) == (1, 4, -(-h // 8), -(-w // 8)), fg_l.shape
    assert torch.isfinite(fg_l).all() and torch.isfinite(al_l).all()
    assert (fg_l - al_l).abs().max() > 1e-2, "fg and alpha branches collapsed to one latent"

    # DRIP Sampler's own alpha = plain VAE decode of its alpha latent (channel mean), clamped, trimap enforced
    vae = ctx.upstream(td_id, "vae")
    dec_a = vae.decode(al_l)[:, :h, :w, :3].float().cpu()  # 3 channels whose mean is alpha
    plain_a = dec_a.mean(-1).clamp(0, 1)[0].numpy()
    plain_f = vae.decode(fg_l)[:, :h, :w, :3].float().clamp(0, 1)
    plain_a = np.where(tri == 1, 1.0, np.where(tri == 0, 0.0, plain_a))
    np.testing.assert_allclose(_np(ctx.run.output(samp_id, 3))[0], plain_a, atol=1e-5)
    np.testing.assert_allclose(_np(ctx.run.output(samp_id, 2)), _np(plain_f), atol=1e-5)

    fg, alpha, rgba = (_np(ctx.run.output(td_id, i)) for i in range(3))
    assert fg.shape == (1, h, w, 3) and alpha.shape == (1, h, w) and rgba.shape == (1, h, w, 4)
    for x in (fg, alpha, rgba):
        assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    a = alpha[0]
    np.testing.assert_array_equal(a[tri == 1], 1.0)   # known regions respected exactly
    np.testing.assert_array_equal(a[tri == 0], 0.0)
    np.testing.assert_array_equal(rgba[..., :3], fg)  # RGBA = straight fg + alpha
    np.testing.assert_array_equal(rgba[..., 3], alpha)
    # the decoder refined the plain decode (the unknown band moved) ...
    unknown = tri == 0.5
    assert np.abs(a - plain_a)[unknown].max() > 1e-3
    # ... exactly as the core does with the decoder file on disk
    model, _ = TD.load_decoder(harness.model_path("transparency_decoders", DRIP_FILES["transparency_decoders"]))
    image = ctx.upstream(td_id, "image").float().cpu()
    inp = ctx.prompt[td_id]["inputs"]
    want_f, want_a = TD.refine_bhwc(model, image, torch.from_numpy(tri)[None], plain_f.cpu(),
                                    dec_a, fg_l.cpu(), al_l.cpu(), tile=int(inp["tile_size"]),
                                    overlap=int(inp["overlap"]), flip_tta=bool(inp["flip_tta"]))
    np.testing.assert_allclose(a, want_a[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(fg, want_f.numpy(), atol=1e-4)
    # end to end: the RGBA PNG on disk is the decoder's output at the photo's size
    (save_id,) = harness.nodes_of(ctx.prompt, "SaveImage")
    (png,) = ctx.run.files(save_id)
    arr = np.asarray(Image.open(png))
    assert arr.shape == (h, w, 4)
    np.testing.assert_array_equal(arr[..., 3][tri == 1], 255)
    np.testing.assert_array_equal(arr[..., 3][tri == 0], 0)


def _greenpost_check(ctx: WorkflowContext) -> None:
    s = ctx.truth["dm_greenscreen.png"]
    nid = next(k for k, v in ctx.prompt.items() if v["class_type"] == "DM_GreenPost")
    alpha, rgba = _np(ctx.run.output(nid, 1))[0], _np(ctx.run.output(nid, 2))[0]
    np.testing.assert_array_equal(rgba[..., 3], alpha)
    err = float(np.abs(alpha - s.alpha).sum())
    trivial = float(min(np.abs(s.alpha).sum(), np.abs(1 - s.alpha).sum()))
    assert err < 0.35 * trivial, (err, trivial)
    key = ctx.run.output(nid, 4)
    assert str(key).startswith("#") and len(str(key)) == 7


# ---- green-canvas generation: random-weight SD1.5 / SDXL checkpoints, LoRA and ControlNet ---------------
# The public file names the workflows use (README "Workflows"); tests/comfy/models.py writes random-weight
# files of the right architecture under them (CheckpointLoaderSimple must detect SD1.5 / SDXL).
GC_FILES = {"sd15": ("checkpoints", "v1-5-pruned-emaonly.safetensors"),
            "sdxl": ("checkpoints", "sd_xl_base_1.0.safetensors"),
            "lora": ("loras", "add_detail.safetensors"),
            "controlnet": ("controlnet", "control_v11p_sd15_openpose.safetensors")}
GC_PX, GC_STEPS = 128, 4   # test-only: 16x16 latents, 4 steps (the workflows ship 512/1024 px, 25 steps)
# threshold: with random weights Otsu splits the key word's attention map anywhere; a low fixed threshold
# marks most of the frame as background, so the random image always has a screen for GreenPost to find
GC_OVERRIDES = {"DM_CanvasLatent": {"width": GC_PX, "height": GC_PX}, "KSamplerAdvanced": {"steps": GC_STEPS},
                "DM_GreenCanvasModel": {"threshold": 0.15}}
POSE_HW = (120, 160)  # not the latent's size: the ControlNet resizes its hint


def _pose_image(h: int, w: int) -> np.ndarray:
    """An OpenPose-style skeleton (coloured limbs and joints on black)."""
    img = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    pts = {"head": (0.2, 0.5), "neck": (0.35, 0.5), "l_sh": (0.37, 0.38), "r_sh": (0.37, 0.62), "l_hand": (0.6, 0.3),
           "r_hand": (0.6, 0.7), "hip": (0.65, 0.5), "l_foot": (0.95, 0.4), "r_foot": (0.95, 0.6)}
    limbs = [("head", "neck"), ("neck", "l_sh"), ("neck", "r_sh"), ("l_sh", "l_hand"), ("r_sh", "r_hand"),
             ("neck", "hip"), ("hip", "l_foot"), ("hip", "r_foot")]
    colours = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (170, 255, 0), (0, 255, 85), (0, 170, 255), (85, 0, 255),
               (255, 0, 170)]
    for (a, b), c in zip(limbs, colours):
        (y0, x0), (y1, x1) = (np.array(pts[a]) * (h, w)), (np.array(pts[b]) * (h, w))
        d = np.array([y1 - y0, x1 - x0])
        t = np.clip(((yy - y0) * d[0] + (xx - x0) * d[1]) / max(1e-6, d @ d), 0, 1)
        img[np.hypot(yy - (y0 + t * d[0]), xx - (x0 + t * d[1])) < 2.5] = c
    for y, x in pts.values():
        img[np.hypot(yy - y * h, xx - x * w) < 3.5] = (0, 0, 255)
    return img


def _green_canvas_setup(family: str, lora: bool = False, controlnet: bool = False):
    def setup(ctx: WorkflowContext) -> None:
        import models

        models.write_checkpoint(*GC_FILES[family], family=family)  # once per session (same name, same weights)
        if lora:
            models.write_lora_file(GC_FILES["lora"][1], family, seed=10)
        if controlnet:
            models.write_controlnet(GC_FILES["controlnet"][1], family, seed=20)
            ctx.add_input_image("dm_pose.png", _pose_image(*POSE_HW))
        harness.refresh_file_lists()
    return setup


def _controller(model):
    """The CanvasController a Green Canvas Model MODEL carries (shared by its attn2 and post-CFG patches)."""
    for f in model.model_options.get("sampler_post_cfg_function", []):
        if hasattr(f, "controller"):
            return f.controller
    return None


def _green_canvas_check(ctx: WorkflowContext) -> None:
    import comfy.supported_models as SM
    from safetensors import safe_open

    from diffusion_matting.py import green_canvas as G

    # the core function as ComfyUI loaded it with the pack (the node module's own import of py/greenpost.py)
    greenpost = sys.modules[ctx.env.node_class_mappings["DM_GreenPost"].__module__].greenpost

    P = ctx.prompt
    one = lambda t: (harness.nodes_of(P, t) or [None])[0]  # noqa: E731
    ckpt, phrase, gcm, canvas_id, noise_id, ks, dec, gp = (
        one(t) for t in ("CheckpointLoaderSimple", "DM_AppendCanvasPhrase", "DM_GreenCanvasModel", "DM_CanvasLatent",
                         "DM_GreenCanvasNoise", "KSamplerAdvanced", "DM_VAEDecodeWithMatte", "DM_GreenPost"))
    name = P[ckpt]["inputs"]["ckpt_name"]
    family = "sdxl" if name == GC_FILES["sdxl"][1] else "sd15"
    lat_hw = (GC_PX // 8, GC_PX // 8)

    # 1. CheckpointLoaderSimple detected the random file as the right family
    base = ctx.run.output(ckpt, 0)
    want_cfg = SM.SDXL if family == "sdxl" else SM.SD15
    assert type(base.model.model_config) is want_cfg, type(base.model.model_config)
    clip, vae = ctx.run.output(ckpt, 1), ctx.run.output(ckpt, 2)
    pos = ctx.upstream(ks, "positive")
    width = 2048 if family == "sdxl" else 768
    assert pos[0][0].shape == (1, 77, width)
    if family == "sdxl":
        assert pos[0][1]["pooled_output"].shape == (1, 1280)

    # 2. the prompt got the canvas phrase, and the patch watches the token of "green" in it
    text = ctx.run.output(phrase)
    user = P[phrase]["inputs"]["prompt"]
    assert text.startswith(user) and text.rstrip().endswith("pure green background"), text
    tokens = [t for t, _w in clip.tokenize(text)["l"][0]]
    green = clip.tokenize("green")["l"][0][1][0]
    want_idx = [i for i, t in enumerate(tokens) if t == green]
    assert len(want_idx) == 1
    ctrl = _controller(ctx.run.output(gcm))
    assert ctrl is not None and ctrl.recorder is not None and ctrl.recorder.token_indices == want_idx
    steps = int(P[ks]["inputs"]["steps"])
    strengths = [h[2] for h in ctrl.history]
    assert len(strengths) == steps, (len(strengths), steps)
    assert strengths[0] == pytest.approx(float(P[gcm]["inputs"]["strength"])) and strengths[-1] == 0.0
    mask = ctrl.last_mask.float().cpu()  # background estimate from the key word's attention, 1 = background
    assert mask.shape == (1, *lat_hw) and 0 <= float(mask.min()) and float(mask.max()) <= 1
    assert (mask > 0.5).any() and (mask < 0.5).any(), "attention found no background/subject split"

    # 3. the far background (core_margin away from the subject) is held on the canvas to the last step:
    #    the sampled latent there IS the key colour's latent; the subject is free
    out = ctx.run.output(ks)["samples"].float().cpu()
    canvas = ctx.run.output(canvas_id)["samples"].float().cpu()
    assert out.shape == canvas.shape == (1, 4, *lat_hw)
    core = G.background_core(mask, float(P[gcm]["inputs"]["core_margin"]))  # where hold_background acts
    held, exact, subject = core >= 0.9, core >= 0.999, mask < 0.5
    assert int(held.sum()) >= 4 and subject.any(), (int(held.sum()), int(subject.sum()))
    dist = (out - canvas).abs().amax(1)  # [1,h,w]
    scale = 1 + float(canvas.abs().max())
    if exact.any():  # last step: d' = d + core * (canvas - d) -> the canvas itself where core = 1
        assert float(dist[exact].max()) < 1e-2 * scale, float(dist[exact].max())
    near, far = float(dist[held].mean()), float(dist[subject].mean())
    assert near < 0.15 * far and far > 0.1, (near, far)
    # the start was the key-colour noise: its background channel means moved to the canvas (not plain noise)
    noisy = ctx.run.output(noise_id, 1)["samples"].float().cpu()
    assert noisy.shape == out.shape and torch.isfinite(noisy).all()

    # 4. VAE Decode with Matte: the VAE's decode, and its matte: GreenPost's alpha of it without a head,
    #    else the head run on the decoder's last feature (the input of decoder.norm_out, captured by a hook)
    image, alpha, source = ctx.run.output(dec, 0), ctx.run.output(dec, 1), ctx.run.output(dec, 2)
    head = ctx.upstream(dec, "matting_head")
    feats = []
    hook = vae.first_stage_model.decoder.norm_out.register_forward_pre_hook(
        lambda _m, args: feats.append(args[0].detach().float().cpu()))
    try:
        decoded = vae.decode(ctx.run.output(ks)["samples"])[..., :3]
    finally:
        hook.remove()
    np.testing.assert_allclose(_np(image), _np(decoded), atol=2e-3)
    if head is None:
        assert "GreenPost" in source, source
        np.testing.assert_allclose(_np(alpha), _np(greenpost(image.float()).alpha), atol=1e-5)
    else:
        from diffusion_matting.py.matting_head import load_matting_head

        assert head.name in source and "matting head" in source, source
        ref, _info = load_matting_head(harness.model_path("matting_heads", head.name))
        (feature,) = feats
        np.testing.assert_allclose(_np(alpha), _np(ref(feature)[:, 0]), atol=1e-4)
        assert 0.05 < float(alpha.float().std()), "the head's matte is flat"
    # the held background decodes to one flat colour, the subject does not
    up = lambda m: np.kron(m[0].numpy().astype(np.float32), np.ones((8, 8))) > 0.5  # noqa: E731
    img = _np(image)[0]
    bg_px, subj_px = img[up(held)], img[up(subject)]
    spread_bg, spread_subj = float(bg_px.std(0).max()), float(subj_px.std(0).max())
    assert spread_bg < 0.3 * spread_subj, (spread_bg, spread_subj)

    # 5. GreenPost keyed the decode with its matte as the coarse mask (alpha convention, not inverted)
    fg, a, rgba = (_np(ctx.run.output(gp, i)) for i in range(3))
    want = greenpost(image.float(), mask=alpha.float())
    np.testing.assert_allclose(a, _np(want.alpha), atol=1e-5)
    np.testing.assert_array_equal(rgba[..., 3], a)
    np.testing.assert_array_equal(rgba[..., :3], fg)
    # ... and it found the held background to be the screen: its colour is the key, it is cut out
    key = np.array([int(str(ctx.run.output(gp, 4))[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    np.testing.assert_allclose(key, np.median(bg_px, 0), atol=0.1)
    assert float(a[0][up(held)].mean()) < 0.1, float(a[0][up(held)].mean())
    assert float(a[0][up(subject)].mean()) > 0.3, float(a[0][up(subject)].mean())
    (save,) = harness.nodes_of(P, "SaveImage")
    (png,) = ctx.run.files(save)
    arr = np.asarray(Image.open(png))
    assert arr.shape == (GC_PX, GC_PX, 4)
    np.testing.assert_allclose(arr[..., 3] / 255.0, a[0], atol=1 / 255 + 1e-6)  # the saved alpha IS GreenPost's (8 bit)

    # 6. LoRA: every module of the file patched the UNet / text encoder at the workflow's strengths
    lo = one("LoraLoader")
    if lo is not None:
        path = harness.model_path("loras", P[lo]["inputs"]["lora_name"])
        with safe_open(str(path), "pt") as f:
            downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
        n_unet = sum(k.startswith("lora_unet_") for k in downs)
        m_lora, c_lora = ctx.run.output(lo, 0), ctx.run.output(lo, 1)
        assert n_unet > 0 and len(m_lora.patches) == n_unet, (len(m_lora.patches), n_unet)
        assert len(c_lora.patcher.patches) == len(downs) - n_unet > 0
        assert {p[0][0] for p in m_lora.patches.values()} == {float(P[lo]["inputs"]["strength_model"])}
        assert {p[0][0] for p in c_lora.patcher.patches.values()} == {float(P[lo]["inputs"]["strength_clip"])}
        assert not base.patches, "the checkpoint's MODEL must stay unpatched"

    # 7. ControlNet: the pose image drives both conditionings, and it changes the sample
    ap = one("ControlNetApplyAdvanced")
    if ap is not None:
        import nodes as comfy_nodes

        pose = ctx.loaded_file(ap, "image")
        assert pose is not None
        for slot in (0, 1):
            c = ctx.run.output(ap, slot)[0][1]["control"]
            assert c.strength == pytest.approx(float(P[ap]["inputs"]["strength"]))
            hint = c.cond_hint_original.float().cpu()
            np.testing.assert_allclose(hint[0].permute(1, 2, 0).numpy(), pose["rgb"] / 255.0, atol=1e-6)
        # without the ControlNet (same model, noise and sampler settings) the result differs
        inp = P[ks]["inputs"]
        plain = comfy_nodes.KSamplerAdvanced().sample(
            ctx.run.output(gcm), "disable", int(inp["noise_seed"]), steps, float(inp["cfg"]), inp["sampler_name"],
            inp["scheduler"], ctx.upstream(ap, "positive"), ctx.upstream(ap, "negative"),
            ctx.run.output(noise_id, 1), int(inp["start_at_step"]), int(inp["end_at_step"]),
            inp["return_with_leftover_noise"])[0]["samples"].float().cpu()
        assert float((plain - out).abs().max()) > 1e-2, "the ControlNet changed nothing"


# ---- GreenPost + BackgroundMattingV2: a random-weight MobileNetV2 MattingRefine under the public name ------
BMV2_FILE = "pytorch_mobilenetv2.pth"  # the authors' public file name (the workflow's loader widget)


def _bmv2_setup(ctx: WorkflowContext) -> None:
    import models

    models.write_bmv2(BMV2_FILE, "mobilenetv2", seed=0)


def _bmv2_check(ctx: WorkflowContext) -> None:
    from diffusion_matting.py import background_matting as BM
    from diffusion_matting.py.greenpost import color_hex

    greenpost = sys.modules[ctx.env.node_class_mappings["DM_GreenPost"].__module__].greenpost
    P = ctx.prompt
    (loader,) = harness.nodes_of(P, "DM_BackgroundMattingLoader")
    (gp,) = harness.nodes_of(P, "DM_GreenPost")
    assert P[loader]["inputs"]["model_name"] == BMV2_FILE and tuple(harness.upstream(P, gp, "refiner")) == (loader, 0)
    ref = ctx.run.output(loader)
    assert ref.model.backbone_name == "mobilenetv2" and type(ref.model).__name__ == "MattingRefine"
    # the loader read the .pth we wrote, tensors only, every weight as written
    model = BM.load_bmv2(harness.model_path("background_matting", BMV2_FILE))
    want_sd, got_sd = model.state_dict(), ref.model.state_dict()
    assert set(got_sd) == set(want_sd) and all(torch.equal(got_sd[k].cpu(), want_sd[k]) for k in want_sd)

    image = ctx.upstream(gp, "image").float().cpu()
    assert ctx.loaded_file(gp, "image") is ctx.inputs["dm_greenscreen.png"]
    fg, alpha, rgba, plate = (ctx.run.output(gp, i).float().cpu() for i in range(4))
    key = ctx.run.output(gp, 4)
    # GreenPost (training-free) finds the key and the plate; the network turns image + plate into alpha/fg
    res = greenpost(image)
    inp = P[loader]["inputs"]
    scales = {"auto": None, "1/2": 0.5, "1/4": 0.25, "1/8": 0.125}
    e_alpha, e_fg = BM.refine_with_bmv2(model, image, res.plate, backbone_scale=scales[inp["backbone_scale"]],
                                        refine_mode=inp["refine_mode"], sample_pixels=int(inp["sample_pixels"]) or None,
                                        threshold=float(inp["threshold"]))
    h, w = INPUT_HW
    assert alpha.shape == (1, h, w) and fg.shape == (1, h, w, 3)
    np.testing.assert_allclose(_np(plate), _np(res.plate), atol=1e-6)
    assert key == color_hex(res.key_color[0].tolist()), (key, res.key_color)
    np.testing.assert_allclose(_np(alpha), _np(e_alpha), atol=1e-5)
    np.testing.assert_allclose(_np(fg), _np(e_fg), atol=1e-5)
    np.testing.assert_array_equal(_np(rgba[..., 3]), _np(alpha))
    np.testing.assert_array_equal(_np(rgba[..., :3]), _np(fg))
    assert float((alpha - res.alpha.float().cpu()).abs().mean()) > 1e-2, "the refiner left GreenPost's matte"
    # the RGBA PNG on disk carries the network's alpha (8 bit)
    (save,) = harness.nodes_of(P, "SaveImage")
    (png,) = ctx.run.files(save)
    arr = np.asarray(Image.open(png))
    assert arr.shape == (h, w, 4)
    np.testing.assert_allclose(arr[..., 3] / 255.0, _np(alpha)[0], atol=1 / 255 + 1e-6)


# ---- matting-data factory: green canvas (random SD1.5) -> GreenPost -> Save Matting Sample ---------------
# key colour: the random checkpoints' VAE decodes the canvas to key green (models.local_vae_state), but the
# random image's backdrop is too uneven for GreenPost's K-Means to call a screen; keyed with that colour given
FACTORY_OVERRIDES = {"DM_GreenCanvasSample": {"width": GC_PX, "height": GC_PX, "steps": GC_STEPS},
                     "DM_GreenPost": {"key_color_mode": "override", "key_color": "#1ae61a"}}


def _factory_setup(ctx: WorkflowContext) -> None:
    import models

    models.write_checkpoint(*GC_FILES["sd15"], family="sd15")  # once per session (same name, same weights)
    harness.refresh_file_lists()


def _factory_check(ctx: WorkflowContext) -> None:
    from diffusion_matting.py import matting_dataset as D

    P = ctx.prompt
    (save,) = harness.nodes_of(P, "DM_SaveMattingSample")
    (sample,) = harness.nodes_of(P, "DM_GreenCanvasSample")
    inp = P[save]["inputs"]
    assert not _is_comfy_mask(inp["mask_convention"])  # GreenPost's alpha goes in as alpha (1 = foreground)
    root = ctx.env.output_dir / inp["subfolder"]
    (entry,) = ctx.run.outputs[save]["matting_samples"]  # batch of 1
    manifest = {e["name"]: e for e in D.read_manifest(root)}
    assert manifest[entry["name"]] == {k: v for k, v in entry.items() if k != "subfolder"}
    assert D.verify(root, [manifest[entry["name"]]]) == []  # files present, sha256 and sizes as listed
    assert entry["name"].startswith(inp["prefix"] + "_") and (entry["width"], entry["height"]) == (GC_PX, GC_PX)
    files = {k: root / rel for k, rel in entry["files"].items()}
    assert set(files) == {"image", "alpha", "fg", "caption"}
    for kind, (folder, suffix) in D.KINDS.items():
        assert files[kind] == root / folder / (entry["name"] + suffix) and files[kind].is_file()

    # pixels: the tensors fed to the node, 8 bit (alpha: 1 = foreground, as GreenPost output it)
    u8 = lambda x: np.floor(np.clip(_np(x), 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    for kind, src in (("image", "image"), ("fg", "foreground"), ("alpha", "alpha")):
        im = Image.open(files[kind])
        assert im.mode == ("L" if kind == "alpha" else "RGB"), (kind, im.mode)
        np.testing.assert_array_equal(np.asarray(im), u8(ctx.upstream(save, src))[0], err_msg=kind)
    a8 = np.asarray(Image.open(files["alpha"]))
    assert (a8 == 0).mean() > 0.05 and (a8 > 127).mean() > 0.05, "GreenPost's matte is trivial"
    (gp,) = harness.nodes_of(P, "DM_GreenPost")
    assert tuple(harness.upstream(P, save, "alpha")) == (gp, 1)
    assert tuple(harness.upstream(P, save, "foreground")) == (gp, 0)

    # caption = Green Canvas Sample's prompt output (the prompt node's text + the canvas phrase);
    # the manifest records the prompt node's text and the seed node's value
    caption = ctx.run.output(sample, 3)
    text = ctx.upstream(sample, "prompt")
    assert caption.startswith(text) and caption.rstrip().endswith("pure green background"), caption
    assert files["caption"].read_text(encoding="utf-8") == caption
    assert entry["caption"] == caption and entry["prompt"] == text == ctx.upstream(save, "prompt")
    assert entry["seed"] == ctx.upstream(save, "seed") == ctx.upstream(sample, "seed")


SPECS: dict[str, Spec] = {
    "greenpost_key_photo.json": Spec(check=_greenpost_check),
    "alpha_tools.json": Spec(),
    "trimap_matting.json": Spec(setup=_trimap_inputs, check=_trimap_check),
    "drip_matting.json": Spec(setup=_drip_inputs, check=_drip_check),
    "green_canvas_sd15.json": Spec(setup=_green_canvas_setup("sd15"), check=_green_canvas_check,
                                   output_hw=(GC_PX, GC_PX), overrides=GC_OVERRIDES),
    "green_canvas_lora_controlnet.json": Spec(setup=_green_canvas_setup("sd15", lora=True, controlnet=True),
                                              check=_green_canvas_check, output_hw=(GC_PX, GC_PX),
                                              overrides=GC_OVERRIDES),
    "green_canvas_sdxl.json": Spec(setup=_green_canvas_setup("sdxl"), check=_green_canvas_check,
                                   output_hw=(GC_PX, GC_PX), overrides=GC_OVERRIDES),
    "greenpost_bmv2.json": Spec(setup=_bmv2_setup, check=_bmv2_check),
    "matting_data_factory.json": Spec(setup=_factory_setup, check=_factory_check, output_hw=(GC_PX, GC_PX),
                                      overrides=FACTORY_OVERRIDES),
}


# ---- checks of the pack's nodes, by class type (run wherever the node occurs in a workflow) --------------

NODE_CHECKS: dict[str, Callable[[WorkflowContext, str], None]] = {}


def node_check(class_type: str):
    def deco(fn):
        NODE_CHECKS[class_type] = fn
        return fn
    return deco


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _is_comfy_mask(convention) -> bool:
    return str(convention).lower().startswith("comfyui mask")


def _source_alpha(ctx, nid, input_name="mask") -> np.ndarray:
    mask = _np(ctx.upstream(nid, input_name))
    return 1.0 - mask if _is_comfy_mask(ctx.prompt[nid]["inputs"].get("mask_convention")) else mask


@node_check("DM_JoinRGBA")
def _check_join(ctx, nid):
    out = _np(ctx.run.output(nid))
    fg = _np(ctx.upstream(nid, "foreground"))
    alpha = _source_alpha(ctx, nid)
    assert out.shape == fg.shape[:3] + (4,), out.shape
    np.testing.assert_allclose(out[..., :3], fg[..., :3], atol=1e-6, err_msg="RGB must stay straight")
    np.testing.assert_allclose(out[..., 3], alpha, atol=1e-6)
    src = ctx.loaded_file(nid, "foreground")
    if src is not None and src["alpha"] is not None and ctx.loaded_file(nid, "mask") is src \
            and _is_comfy_mask(ctx.prompt[nid]["inputs"].get("mask_convention")):
        # end to end: the RGBA PNG we wrote comes back as the same straight RGBA
        np.testing.assert_allclose(out[0, ..., :3], src["rgb"] / 255.0, atol=1e-6)
        np.testing.assert_allclose(out[0, ..., 3], src["alpha"] / 255.0, atol=1e-6)


@node_check("DM_SplitRGBA")
def _check_split(ctx, nid):
    rgba = _np(ctx.upstream(nid, "rgba"))
    rgb, alpha, comfy_mask = (_np(ctx.run.output(nid, i)) for i in range(3))
    a = rgba[..., 3] if rgba.shape[-1] == 4 else np.ones(rgba.shape[:3], np.float32)
    np.testing.assert_allclose(rgb, rgba[..., :3], atol=1e-6)
    np.testing.assert_allclose(alpha, a, atol=1e-6)
    np.testing.assert_allclose(comfy_mask, 1 - a, atol=1e-6)


@node_check("DM_CompositeOver")
def _check_composite(ctx, nid):
    fg = _np(ctx.upstream(nid, "foreground"))[..., :3]
    a = _np(ctx.upstream(nid, "alpha"))[..., None]
    bg = _np(ctx.upstream(nid, "background"))[..., :3]
    np.testing.assert_allclose(_np(ctx.run.output(nid)), np.clip(a * fg + (1 - a) * bg, 0, 1), atol=1e-5)


@node_check("DM_AlphaPreview")
def _check_preview(ctx, nid):
    out = _np(ctx.run.output(nid))
    fg = _np(ctx.upstream(nid, "foreground"))
    alpha = ctx.upstream(nid, "alpha")
    a = _np(alpha) if alpha is not None else (fg[..., 3] if fg.shape[-1] == 4 else np.ones(fg.shape[:3], np.float32))
    rgb = fg[..., :3]
    assert out.shape == rgb.shape, (out.shape, rgb.shape)
    inputs = ctx.prompt[nid]["inputs"]
    if inputs.get("mode") != "checkerboard":
        return
    # reconstruct the backdrop from mostly transparent pixels (out = a*F + (1-a)*bg solved for bg; exact
    # where alpha is 0): a grey checker of `square` px cells
    s = int(inputs["square"])
    h, w = a.shape[1:]
    parity = ((np.arange(h)[:, None] // s) + (np.arange(w)[None] // s)) % 2
    clear = a[0] < 0.5
    if not clear.any():  # nothing transparent (e.g. a keyer that found no screen): opaque pixels show F itself
        opaque = a == 1
        assert opaque.any(), "test image needs opaque or mostly transparent pixels"
        np.testing.assert_allclose(out[opaque], rgb[opaque], atol=1e-6, err_msg="opaque preview pixel != F")
        return
    bg_est = (out[0] - a[0][..., None] * rgb[0]) / (1 - a[0][..., None]).clip(0.5, 1)
    levels = []
    for p in (0, 1):
        px = bg_est[clear & (parity == p)]
        assert len(px), "test image needs mostly transparent pixels in both checker cells"
        assert np.ptp(px, axis=0).max() < 1e-4 and np.ptp(px[0]) < 1e-4, "checker cell must be one grey"
        levels.append(float(np.median(px)))
    assert abs(levels[0] - levels[1]) > 0.05, f"checker levels {levels} indistinguishable"
    bg = np.where(parity == 0, levels[0], levels[1])[None, ..., None]
    expect = np.clip(a[..., None] * rgb + (1 - a[..., None]) * bg, 0, 1)
    np.testing.assert_allclose(out, expect, atol=1e-5, err_msg="preview != alpha*F + (1-alpha)*checker")


@node_check("DM_TrimapFromMask")
def _check_trimap(ctx, nid):
    tri = _np(ctx.run.output(nid))
    inputs = ctx.prompt[nid]["inputs"]
    alpha = _source_alpha(ctx, nid)
    r_e, r_d, thr = int(inputs["erode_px"]), int(inputs["dilate_px"]), float(inputs["threshold"])
    assert set(np.unique(tri)) <= {0.0, 0.5, 1.0}, np.unique(tri)
    for t, a in zip(tri, alpha):
        inside = a >= thr
        d_out = ndimage.distance_transform_edt(inside)    # distance to the nearest outside pixel
        d_in = ndimage.distance_transform_edt(~inside)    # distance to the nearest inside pixel
        fg, bg = t == 1.0, t == 0.0
        # any erosion/dilation of radius r (disc or square) keeps/clears exactly within these bounds
        assert (d_out[fg] > r_e).all(), "definite foreground closer than erode_px to the background"
        assert (d_in[bg] > r_d).all(), "definite background closer than dilate_px to the foreground"
        margin = int(np.ceil(max(r_e, r_d) * np.sqrt(2))) + 2  # ignore image borders (padding conventions)
        core = np.zeros_like(inside)
        core[margin:-margin, margin:-margin] = True
        assert (fg | ~(core & (d_out > r_e * np.sqrt(2) + 1))).all(), "deep foreground not marked definite"
        assert (bg | ~(core & (d_in > r_d * np.sqrt(2) + 1))).all(), "far background not marked definite"
        assert fg.any() and bg.any() and (t == 0.5).any()


@node_check("DM_Premultiply")
def _check_premultiply(ctx, nid):
    img = _np(ctx.upstream(nid, "image"))[..., :3]
    a = _np(ctx.upstream(nid, "alpha"))[..., None]
    out = _np(ctx.run.output(nid))
    if str(ctx.prompt[nid]["inputs"].get("direction", "")).startswith("straight"):
        np.testing.assert_allclose(out, img * a, atol=1e-6)
    else:
        m = np.broadcast_to(a > 1e-3, out.shape)
        np.testing.assert_allclose(out[m], np.clip(img / np.maximum(a, 1e-3), 0, 1)[m], atol=1e-4)


# ---- the test ------------------------------------------------------------------------------------------

IMAGE_INPUT = {"DM_SaveMattingSample": "image"}  # output nodes whose reported images come from another input


def _check_image_outputs(ctx: WorkflowContext, spec: Spec) -> int:
    """Saved / previewed PNGs exist and equal the tensors fed to them; returns how many were checked."""
    expected_hw = spec.output_hw
    if expected_hw is None and ctx.inputs:
        first = next(iter(ctx.inputs.values()))["rgb"]
        expected_hw = first.shape[:2]
    checked = 0
    for nid, ui in ctx.run.outputs.items():
        files = ctx.run.files(nid)
        if not files:
            continue
        cls = ctx.prompt[nid]["class_type"]
        src = ctx.upstream(nid, IMAGE_INPUT.get(cls, "images"))
        assert src is not None, f"{cls} {nid} saved images but has no `images` input"
        src = _np(src)
        assert len(files) == src.shape[0], f"{cls} {nid}: {len(files)} files for a batch of {src.shape[0]}"
        for f, t in zip(files, src):
            assert f.is_file(), f
            base = ctx.env.output_dir if cls in ("SaveImage", "DM_SaveMattingSample") else ctx.env.temp_dir
            assert base in f.parents, f"{cls} wrote {f} outside {base}"
            im = Image.open(f)
            want_mode = {3: "RGB", 4: "RGBA", 1: "L"}[t.shape[-1]]
            assert im.mode == want_mode, f"{cls} {nid}: {im.mode} PNG from a {t.shape[-1]}-channel image"
            arr = np.asarray(im)
            assert arr.shape[:2] == t.shape[:2]
            if expected_hw is not None:
                assert tuple(arr.shape[:2]) == tuple(expected_hw), f"{cls} {nid}: {arr.shape[:2]} != {expected_hw}"
            ref = np.clip(t * 255.0, 0, 255).astype(np.uint8).reshape(arr.shape)
            assert np.abs(arr.astype(int) - ref.astype(int)).max() <= 1
            checked += 1
    return checked


def run_workflow(env: harness.ComfyEnv, name: str, workflow: dict, spec: Spec) -> WorkflowContext:
    """Set up, convert, validate, execute and check one UI-format workflow (see the module docstring)."""
    ctx = WorkflowContext(env=env, name=name, workflow=workflow)
    if spec.setup is not None:
        spec.setup(ctx)
    ctx.prompt = harness.ui_to_api(workflow)  # strict: widgets_values must line up with the node schemas
    apply_overrides(ctx.prompt, spec.overrides)
    for filename in harness.upload_files(ctx.prompt):  # LoadImage & co: images the hook did not write
        if filename not in ctx.inputs:
            default_input(ctx, filename)
    errors = harness.validate(ctx.prompt)
    hint = ("\n(a model file missing? write it from a setup hook in SPECS, tests/comfy/test_workflows.py)"
            if any(e["type"] == "value_not_in_list" for e in errors) else "")
    assert not errors, f"{name} does not validate in ComfyUI:\n{harness.format_errors(errors)}{hint}"
    # execute every output node, plus every pack node so its checks can read its outputs
    checked_nodes = [nid for nid, n in ctx.prompt.items() if n["class_type"] in NODE_CHECKS]
    ctx.run = harness.execute(ctx.prompt, capture=checked_nodes)
    ctx.run.raise_for_error()

    n_images = _check_image_outputs(ctx, spec)
    assert n_images > 0 or spec.check is not None, f"{name} wrote no images"
    for nid in checked_nodes:
        NODE_CHECKS[ctx.prompt[nid]["class_type"]](ctx, nid)
    if spec.check is not None:
        with torch.inference_mode():  # the run's tensors are inference tensors
            spec.check(ctx)
    return ctx


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_runs_in_comfyui(comfy_pack, path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    run_workflow(comfy_pack, path.name, workflow, SPECS.get(path.name, Spec()))


def test_green_canvas_with_matting_head(comfy_pack):
    """The green-canvas workflow's optional Load Matting Head, enabled the way its note says (un-bypass):
    VAE Decode with Matte then takes the head's matte (checked against the head run on the decoder's
    norm_out input, captured with a hook) and GreenPost uses it as the coarse mask."""
    name = "green_canvas_sd15.json"
    workflow = json.loads((REPO / "workflows" / name).read_text(encoding="utf-8"))
    (head,) = [n for n in workflow["nodes"] if n["type"] == "DM_MattingHeadLoader"]
    assert head["mode"] == 4, "the head loader ships bypassed (the workflow runs without a head file)"
    head["mode"] = 0
    setup = _green_canvas_setup("sd15")

    def setup_with_head(ctx):
        from diffusion_matting.py.matting_head import MattingHead, MattingHeadConfig, save_matting_head

        setup(ctx)
        torch.manual_seed(7)
        save_matting_head(harness.model_path("matting_heads", head["widgets_values"][0]),
                          MattingHead(MattingHeadConfig(in_channels=128, hidden=8)), vae_family="sd1")
        harness.refresh_file_lists()

    spec = Spec(setup=setup_with_head, check=_green_canvas_check, output_hw=(GC_PX, GC_PX), overrides=GC_OVERRIDES)
    run_workflow(comfy_pack, name, workflow, spec)
