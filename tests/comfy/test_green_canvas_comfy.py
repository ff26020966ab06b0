"""Tier 2: the green-canvas nodes inside real ComfyUI with random-weight SD1.5 and SDXL models.

Models are ComfyUI's own classes (``supported_models.SD15`` / ``SDXL`` -> ``BaseModel`` / ``SDXL`` with
the real block layout: SD1.5's 4 levels with attention in the first 3, SDXL's 3 levels with 2 and 10
transformer blocks, 768 vs 2048 text width, SDXL's ADM vector) shrunk to 32 base channels, at 64x64 px
(8x8 latents). Two LoRAs (kohya format, written to models/loras, loaded by LoraLoaderModelOnly) are
stacked, a ControlNet of the same architecture (comfy.cldm ControlNet, random weights) is applied with
ControlNetApplyAdvanced, and sampling goes through the core KSampler / KSamplerAdvanced / SamplerCustom
nodes. Tokenisation uses ComfyUI's real CLIP tokenizers (the text encoders are not run: conditioning
tensors are random, which is all the UNet needs).
"""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

import harness
# the model builders are shared with test_workflows (tests/comfy/models.py)
from models import build_clip as _build_clip, build_controlnet as _build_controlnet
from models import build_model as _build_model, tiny_vae as _tiny_vae, write_lora as _write_lora

PROMPT = "a photo of a cat, (pure green:1.2) background"
GREEN_INDEX = 8  # <s> a photo of a cat , pure green background -> "green" is token 8
B, PX = 2, 64


def _cond(family: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    width = 768 if family == "sd15" else 2048
    extra = {} if family == "sd15" else {"pooled_output": torch.randn(1, 1280, generator=g)}
    return [[torch.randn(1, 77, width, generator=g), extra]]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two spinning ones on a shared CPU; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _node_classes(comfy) -> dict:
    """Our node classes as ComfyUI registered them; if the pack failed to load (another module's fault,
    reported by test_pack_loads), the same module imported from the installed package."""
    import importlib

    mapping = dict(comfy.node_class_mappings)
    if "DM_GreenCanvasModel" not in mapping:
        mod = importlib.import_module("diffusion_matting.nodes.green_canvas")
        mapping.update({cls.GET_SCHEMA().node_id: cls for cls in mod.NODES})
    return mapping


@pytest.fixture(scope="module")
def env(comfy, one_thread):
    out = {"vae": _tiny_vae(), "m": _node_classes(comfy), "nodes": comfy.nodes}
    for fam in ("sd15", "sdxl"):
        model, mc = _build_model(fam)
        _write_lora(model, f"gc_{fam}_a.safetensors", seed=10)
        _write_lora(model, f"gc_{fam}_b.safetensors", seed=11)
        out[fam] = {"model": model, "clip": _build_clip(mc), "controlnet": _build_controlnet(fam)}
    harness.refresh_file_lists()
    return out


def _module(env):
    """The pack's nodes/green_canvas module as ComfyUI loaded it."""
    return sys.modules[env["m"]["DM_GreenCanvasModel"].__module__]


def _with_loras_and_controlnet(env, fam):
    nodes = env["nodes"]
    model = env[fam]["model"]
    model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"gc_{fam}_a.safetensors", 0.8)[0]
    model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"gc_{fam}_b.safetensors", 0.5)[0]
    cn = env[fam]["controlnet"]
    hint = torch.rand(1, PX, PX, 3, generator=torch.Generator().manual_seed(5))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(_cond(fam, 6), _cond(fam, 7), cn, hint, 0.9, 0.0, 1.0)
    return model, pos, neg


def _canvas(env, batch=B):
    return env["m"]["DM_CanvasLatent"].execute(vae=env["vae"], color="#00ff00", width=PX, height=PX,
                                              batch_size=batch).result[0]


def _controller(model):
    """The CanvasController shared by the patches of a patched MODEL (read from its model_options)."""
    attn2 = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for p in attn2.values():
        if hasattr(p, "controller"):
            return p.controller
    for f in model.model_options.get("sampler_post_cfg_function", []):
        if hasattr(f, "controller"):
            return f.controller
    return None


# ------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_key_token_found_with_real_tokenizers(env, fam):
    from safetensors.torch import save_file

    gc = _module(env)
    clip = env[fam]["clip"]
    assert gc.key_token_indices(clip, PROMPT, "green") == ([GREEN_INDEX], 77)
    assert gc.key_token_indices(clip, "a cat, pure green background", "green background") == ([5, 6], 77)
    # an embedding of 3 vectors takes 3 positions: <s> e e e a cat , green
    width = 768
    emb_file = harness.model_path("embeddings", "gcemb.safetensors")
    save_file({"emb_params": torch.randn(3, width)} if fam == "sd15" else
              {"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}, str(emb_file))
    harness.refresh_file_lists()
    assert gc.key_token_indices(clip, "embedding:gcemb a cat, green", "green") == ([7], 77)
    # a long prompt: the key word lands in the second 77-token chunk
    long = ", ".join(["a red apple"] * 25) + ", (green:1.1) background"
    idx, length = gc.key_token_indices(clip, long, "green")
    assert length == 154 and len(idx) == 1 and 77 < idx[0] < 154
    chunks = clip.tokenize(long)["l"]
    assert chunks[1][idx[0] - 77][0] == clip.tokenize("green")["l"][0][1][0]
    assert gc.key_token_indices(clip, "a cat on a red floor", "green") == ([], 77)


# ------------------------------------------------------------------------------ main sampling
@pytest.mark.parametrize("fam,sampler,steps", [("sd15", "euler_ancestral", 3), ("sdxl", "euler", 2)])
def test_sample_with_loras_controlnet_and_canvas(env, fam, sampler, steps):
    """KSampler with two LoRAs + ControlNet + Green Canvas Model: no errors; the attention patch reads the
    right column (checked against a reference softmax computed by a spy patch it must chain to); maps
    per batch element for cond and uncond; the canvas changes the result; the source model is untouched."""
    from comfy.ldm.modules import attention as A

    m, nodes = env["m"], env["nodes"]
    model, pos, neg = _with_loras_and_controlnet(env, fam)
    latent = {"samples": torch.zeros(B, 4, PX // 8, PX // 8)}
    ref_plain = nodes.KSampler().sample(model, 42, steps, 5.0, sampler, "normal", pos, neg, latent)[0]["samples"]

    # a pre-existing attn2 replace (as IPAdapter & co. install): ours must chain to it
    spy = {"calls": 0, "last": None}

    def spy_replace(q, k, v, extra):
        spy["calls"] += 1
        heads = extra["n_heads"]
        dh = q.shape[-1] // heads
        qh = q.reshape(q.shape[0], -1, heads, dh).transpose(1, 2).double()
        kh = k.reshape(k.shape[0], -1, heads, dh).transpose(1, 2).double()
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        spy["last"] = probs[..., GREEN_INDEX].mean(1)  # [Bt, N]
        return A.optimized_attention(q, k, v, heads)

    pre = model.clone()
    gc = _module(env)
    blocks = gc._attention_blocks(pre.model.diffusion_model)
    for name, i, _ in blocks:
        pre.set_model_attn2_replace(spy_replace, name, i)
    patched = m["DM_GreenCanvasModel"].execute(model=pre, canvas=_canvas(env), clip=env[fam]["clip"], prompt=PROMPT,
                                               key_word="green", strength=1.0, end_at=0.5, threshold=0.4,
                                               layers="all").result[0]
    ctrl = _controller(patched)
    assert ctrl is not None and ctrl.recorder is not None and ctrl.recorder.token_indices == [GREEN_INDEX]
    log_calls = []
    orig_add = ctrl.recorder.add_key_map

    def add_spy(a, hw, cond_or_uncond, size):  # instance attribute: only this recorder
        log_calls.append((a.clone(), tuple(hw), list(cond_or_uncond), tuple(size), spy["last"]))
        return orig_add(a, hw, cond_or_uncond, size)

    ctrl.recorder.add_key_map = add_spy
    out = nodes.KSampler().sample(patched, 42, steps, 5.0, sampler, "normal", pos, neg, latent)[0]["samples"]

    assert out.shape == (B, 4, PX // 8, PX // 8) and torch.isfinite(out).all()
    assert spy["calls"] > 0 and log_calls, "the attention patch never recorded"
    kinds = set()
    for a, hw, cu, size, ref in log_calls:
        assert size == (PX // 8, PX // 8)
        assert a.shape == (len(cu) * B, hw[0] * hw[1])
        torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-4)
        kinds.update(cu)
    assert kinds == {0, 1}, "cond and uncond maps"
    resolutions = {hw for _, hw, *_ in log_calls}
    assert (PX // 16, PX // 16) in resolutions  # attention read at 1/2 latent resolution (and coarser)
    # only the early steps record; the canvas is off after end_at
    strengths = [h[2] for h in ctrl.history]
    assert strengths[0] == 1.0 and strengths[-1] == 0.0
    assert ctrl.last_mask is not None and ctrl.last_mask.shape == (B, PX // 8, PX // 8)
    assert not torch.allclose(ctrl.last_mask[0], ctrl.last_mask[1]), "one mask per batch element"
    assert 0 <= float(ctrl.last_mask.min()) and float(ctrl.last_mask.max()) <= 1
    assert (out - ref_plain).abs().max() > 1e-3, "the canvas changed nothing"
    # the un-patched model (and the LoRA'd clone) are untouched: same result as before
    again = nodes.KSampler().sample(model, 42, steps, 5.0, sampler, "normal", pos, neg, latent)[0]["samples"]
    torch.testing.assert_close(again, ref_plain, atol=0, rtol=0)
    assert "patches_replace" not in env[fam]["model"].model_options.get("transformer_options", {})


def test_canvas_pulls_background_toward_canvas_latent(env):
    """With a subject mask (no attention), strength 1 through all steps makes the background of the
    result the canvas latent (process_out of the model-space canvas) while the subject differs."""
    m, nodes = env["m"], env["nodes"]
    model = env["sd15"]["model"]
    canvas = _canvas(env)
    subject = torch.zeros(1, PX, PX)
    subject[:, 16:48, 16:48] = 1
    patched = m["DM_GreenCanvasModel"].execute(model=model, canvas=canvas, key_word="green", strength=1.0, end_at=1.0,
                                               threshold=0.4, layers="coarse", subject_mask=subject).result[0]
    latent = {"samples": torch.zeros(B, 4, 8, 8)}
    pos, neg = _cond("sd15", 1), _cond("sd15", 2)
    out = nodes.KSampler().sample(patched, 3, 4, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    plain = nodes.KSampler().sample(model, 3, 4, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    bg = torch.ones(8, 8, dtype=torch.bool)
    bg[2:6, 2:6] = False
    c = canvas["samples"][0, :, 0, 0]
    err = (out[:, :, bg] - c[None, :, None]).abs().max()
    err_plain = (plain[:, :, bg] - c[None, :, None]).abs().max()
    assert err < 0.05 * err_plain, (float(err), float(err_plain))
    assert (out[:, :, ~bg] - c[None, :, None]).abs().mean() > 10 * (out[:, :, bg] - c[None, :, None]).abs().mean()


@pytest.mark.parametrize("sampler,denoise,cfg", [("dpmpp_sde", 1.0, 5.0), ("euler", 0.5, 5.0), ("dpmpp_2m", 1.0, 1.0)])
def test_samplers_img2img_and_cfg1(env, sampler, denoise, cfg):
    m, nodes = env["m"], env["nodes"]
    model, pos, neg = _with_loras_and_controlnet(env, "sd15")
    patched = m["DM_GreenCanvasModel"].execute(model=model, canvas=_canvas(env), clip=env["sd15"]["clip"], prompt=PROMPT,
                                               key_word="green", strength=0.8, end_at=0.5, threshold=0.4,
                                               layers="coarse").result[0]
    ctrl = _controller(patched)
    start = {"samples": torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    out = nodes.KSampler().sample(patched, 1, 4, cfg, sampler, "karras", pos, neg, start, denoise=denoise)[0]["samples"]
    assert torch.isfinite(out).all() and out.shape == (B, 4, 8, 8)
    assert ctrl.last_mask is not None and ctrl.last_mask.shape == (B, 8, 8)
    assert ctrl.history and ctrl.history[0][2] > 0


def test_noise_node_routes_agree(env):
    """NOISE -> SamplerCustom equals noisy_latent -> KSamplerAdvanced(add_noise=disable); the noise's
    background channel means are the canvas's (model space) * boost / sqrt(1 + sigma_max^2)."""
    m, nodes = env["m"], env["nodes"]
    model = env["sd15"]["model"]
    canvas = _canvas(env)
    subject = torch.zeros(PX, PX)
    subject[24:40, 24:40] = 1
    noise_obj, noisy = m["DM_GreenCanvasNoise"].execute(model=model, canvas=canvas, seed=5, strength=1.0, boost=2.0,
                                                        subject_size=0.6, feather=0.35, subject_mask=subject).result
    latent = {"samples": torch.zeros(B, 4, 8, 8)}
    n = noise_obj.generate_noise(latent)
    import comfy.sample
    plain = comfy.sample.prepare_noise(latent["samples"], 5)
    sig_max = float(model.get_model_object("model_sampling").sigma_max)
    c_model = model.model.process_latent_in(canvas["samples"])[0, :, 0, 0]
    bg = torch.ones(8, 8, dtype=torch.bool)
    bg[3:5, 3:5] = False
    for b in range(B):
        torch.testing.assert_close(n[b][:, bg].mean(-1), c_model * 2.0 / math.sqrt(1 + sig_max ** 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(n[b][:, ~bg], plain[b][:, ~bg])
    pos, neg = _cond("sd15", 1), _cond("sd15", 2)
    import comfy.samplers
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).cpu()
    x_custom = comfy.sample.sample_custom(model, n, 4.0, sampler, sigmas, pos, neg, latent["samples"], seed=5)
    ks = nodes.KSamplerAdvanced().sample(model, "disable", 5, 3, 4.0, "euler", "normal", pos, neg, noisy, 0, 10000,
                                         "disable")[0]["samples"]
    torch.testing.assert_close(ks, x_custom, atol=1e-3, rtol=1e-3)  # float32 latent scale round trip


def test_bad_inputs(env, caplog):
    m = env["m"]
    model = env["sd15"]["model"]
    canvas = _canvas(env)

    class Stub:
        class model:
            diffusion_model = torch.nn.Linear(2, 2)
            latent_format = None

    with pytest.raises(ValueError, match="unsupported model family.*SD1.x, SD2.x, SDXL"):
        m["DM_GreenCanvasModel"].execute(model=Stub(), canvas=canvas, key_word="green", strength=0.5, end_at=0.5,
                                         threshold=0.4, layers="coarse")
    with pytest.raises(ValueError, match="latent/VAE mismatch"):
        m["DM_GreenCanvasModel"].execute(model=model, canvas={"samples": torch.zeros(1, 16, 8, 8)}, key_word="green",
                                         strength=0.5, end_at=0.5, threshold=0.4, layers="coarse")
    with pytest.raises(ValueError, match="out of range"):
        m["DM_GreenCanvasModel"].execute(model=model, canvas=canvas, key_word="green", strength=1.5, end_at=0.5,
                                         threshold=0.4, layers="coarse")
    with pytest.raises(ValueError, match="out of range"):
        m["DM_GreenCanvasNoise"].execute(model=model, canvas=canvas, seed=0, strength=-0.1, boost=1.0,
                                         subject_size=0.5, feather=0.3)
    # prompt without the key word: attention disabled with a message, sampling still works
    with caplog.at_level(logging.WARNING):
        patched = m["DM_GreenCanvasModel"].execute(model=model, canvas=canvas, clip=env["sd15"]["clip"],
                                                   prompt="a cat on a red floor", key_word="green", strength=0.8,
                                                   end_at=0.5, threshold=0.4, layers="coarse").result[0]
    assert any("not found in the prompt" in r.getMessage() for r in caplog.records)
    assert _controller(patched).recorder is None
    out = env["nodes"].KSampler().sample(patched, 0, 2, 4.0, "euler", "normal", _cond("sd15", 1), _cond("sd15", 2),
                                         {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]
    assert torch.isfinite(out).all()
    # a subject mask of another size is resized
    noise_obj, _ = m["DM_GreenCanvasNoise"].execute(model=model, canvas=canvas, seed=0, strength=1.0, boost=1.0,
                                                    subject_size=0.5, feather=0.3, subject_mask=torch.ones(1, 37, 91)).result
    assert noise_obj.generate_noise({"samples": torch.zeros(1, 4, 8, 8)}).shape == (1, 4, 8, 8)


def test_sample_node_outputs_latent_and_masks(env):
    m = env["m"]
    model, pos, neg = _with_loras_and_controlnet(env, "sd15")
    res = m["DM_GreenCanvasSample"].execute(
        model=model, clip=env["sd15"]["clip"], vae=env["vae"], prompt="a photo of a cat", negative_prompt="",
        append_canvas_phrase=True, width=PX, height=PX, batch_size=B, seed=1, steps=3, cfg=4.0, sampler_name="euler",
        scheduler="normal", denoise=1.0, color="#00ff00", key_word="green", noise_strength=1.0, noise_boost=2.0,
        canvas_strength=0.8, end_at=0.6, positive=pos, negative=neg).result
    latent, alpha, bg, text = res
    assert text == "a photo of a cat, pure green background"
    assert latent["samples"].shape == (B, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    assert alpha.shape == (B, PX, PX) and bg.shape == (B, PX, PX)
    torch.testing.assert_close(alpha + bg, torch.ones_like(bg))


def test_gsg_and_phrase_nodes(env):
    m = env["m"]
    imgs = torch.zeros(3, 16, 16, 3)
    imgs[0, ..., 1] = 1.0           # pure green
    imgs[1, ..., 0] = 1.0           # pure red
    imgs[2, ..., 1] = 1.0
    imgs[2, 4:8, 4:8] = torch.tensor([1.0, 0.0, 1.0])  # green with a small magenta subject
    report, mean = m["DM_GSG"].execute(images=imgs, key_color="#00ff00").result
    scores = [float(s) for s in report.split(" (")[0].split(", ")]
    assert scores[0] == pytest.approx(0.0, abs=0.1) and scores[2] == pytest.approx(0.0, abs=0.1)
    assert scores[1] == pytest.approx(255 * math.sqrt(2), abs=0.2)
    assert mean == pytest.approx(sum(scores) / 3, abs=0.1)
    assert m["DM_AppendCanvasPhrase"].execute(prompt="a dog", phrase="pure green background").result[0] == \
        "a dog, pure green background"
