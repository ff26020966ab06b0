"""Tier 2: DRIP in real ComfyUI equals the plain diffusers reference loop.

The same random-weight DRIP checkpoints (tiny UNets of the real SD1.5 and SD2 architectures: 4 levels,
cross-attention at the first three, mid attention, conv vs linear transformer projections, constant
head count vs constant head width, 768 vs 1024 text width) are sampled

(a) by ``diffusion_matting.py.drip.sampling.drip_sample_reference`` (diffusers UNet + diffusers scheduler),
(b) through ComfyUI: DRIP Model Loader -> DRIP Conditioning -> DRIP Latent -> core KSampler node,

with the same noise (ComfyUI's ``prepare_noise`` for the seed) and the same numerical method
(ComfyUI ``euler``/``dpmpp_2m`` + ``simple`` == diffusers Euler/DPM-Solver++(2M) with ``trailing``
timesteps, 5 steps). Batch 2 (four interleaved latents), with and without cross-domain attention.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import harness

from diffusion_matting.py import alpha as A
from diffusion_matting.py.drip import model as M
from diffusion_matting.py.drip import sampling as S
from diffusion_matting.py.drip.attention import joint_attention_direct
from diffusion_matting.py.drip.checkpoint import load_drip, save_drip
from diffusion_matting.py.drip.codes import interleave
from diffusion_matting.py.samples import make_sample

SCALE = 0.18215          # SD latent scaling (ComfyUI latent_formats.SD15)
STEPS = 5
H, W = 124, 126          # padded to 128 x 128 -> 16 x 16 latents (at 8 x 8 the 1 x 1 bottom level makes
                         # GroupNorm over 2 values ill-conditioned: float noise is amplified)
FAMILIES = {             # family -> (prediction type, stored key layout)
    "sd15": ("epsilon", "diffusers"),
    "sd2": ("v_prediction", "ldm"),
}


def _glue(env):
    """The pack's nodes/_drip_model module as ComfyUI loaded it."""
    return sys.modules[env.node_class_mappings["DM_DRIPModelLoader"].__module__].D


def _tiny_vae():
    """A small SD-style AutoencoderKL (4 latent channels, 8x) built by ComfyUI, seeded weights."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": ddconfig, "embed_dim": 4}}
    probe = comfy.sd.VAE(sd={}, config=config)
    g = torch.Generator().manual_seed(7)
    sd = {}
    for k, v in probe.first_stage_model.state_dict().items():
        if k.endswith("norm.weight") or ".norm" in k and k.endswith(".weight"):
            sd[k] = torch.ones_like(v)
        elif k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
        else:
            fan_in = max(1, v[0].numel())
            sd[k] = torch.randn(v.shape, generator=g) / fan_in ** 0.5
    return comfy.sd.VAE(sd=sd, config=config)


@pytest.fixture(scope="module")
def setup(comfy):
    torch.manual_seed(0)
    files = {}
    for fam, (pred, layout) in FAMILIES.items():
        unet = M.build_unet(M.drip_config(M.base_config(fam, tiny=True)))
        width = 768 if fam == "sd15" else 1024
        emb = torch.randn(1, 77, width) * 0.5
        name = f"tiny_{fam}.safetensors"
        save_drip(harness.model_path("drip", name), unet.state_dict(), unet.config, base_family=fam,
                  prediction_type=pred, text_embedding=emb, layout=layout)
        files[fam] = name
    plain = harness.model_path("drip", "not_drip.safetensors")
    from safetensors.torch import save_file
    save_file({"input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(plain))
    harness.refresh_file_lists()
    samples = [make_sample(H, W, seed=s) for s in (1, 2)]
    image = torch.stack([torch.from_numpy(s.image) for s in samples])
    alpha = torch.stack([torch.from_numpy(s.alpha) for s in samples])
    trimap, _ = A.trimap_from_mask(alpha, 3, 3)
    return {"files": files, "vae": _tiny_vae(), "image": image, "trimap": trimap}


_RUNS: dict = {}


def _comfy_run(env, setup, fam, cross_domain, sampler="euler", cfg=1.0, seed=123, lora=None):
    """Loader -> Conditioning -> Latent -> KSampler; cached per argument set (CPU time is scarce)."""
    key = (fam, cross_domain, sampler, cfg, seed, lora)
    if key not in _RUNS:
        _RUNS[key] = _comfy_run_uncached(env, setup, fam, cross_domain, sampler, cfg, seed, lora)
    return _RUNS[key]


def _comfy_run_uncached(env, setup, fam, cross_domain, sampler, cfg, seed, lora):
    nodes = env.nodes
    m = env.node_class_mappings
    model = m["DM_DRIPModelLoader"].execute(drip_name=setup["files"][fam], weight_dtype="default",
                                            cross_domain_attention=cross_domain).result[0]
    if lora is not None:
        model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, 1.0)[0]
    pos, neg, _tri = m["DM_DRIPConditioning"].execute(model=model, vae=setup["vae"], image=setup["image"],
                                                      erode_px=8, dilate_px=8, trimap=setup["trimap"]).result
    latent = m["DM_DRIPLatent"].execute(image=setup["image"]).result[0]
    out = nodes.KSampler().sample(model, seed, STEPS, cfg, sampler, "simple", pos, neg, latent, denoise=1.0)[0]
    noise = __import__("comfy.sample").sample.prepare_noise(latent["samples"], seed)
    return out["samples"], noise, pos, model


def _reference(setup, fam, noise, cross_domain, sampler="euler"):
    ckpt = load_drip(harness.model_path("drip", setup["files"][fam]))
    unet = M.build_unet(ckpt.config)
    unet.load_state_dict(ckpt.diffusers_state_dict())
    unet.eval()
    vae = setup["vae"]
    img_p, _ = A.pad_to_multiple(setup["image"], 8)
    tri_p, _ = A.pad_to_multiple(setup["trimap"], 8)
    z_img = vae.encode(img_p) * SCALE
    z_tri = vae.encode(tri_p.unsqueeze(-1).expand(*tri_p.shape, 3).contiguous()) * SCALE
    sched = S.make_scheduler(sampler, ckpt.prediction_type)
    fg, al = S.drip_sample_reference(unet, z_img, z_tri, noise, sched, STEPS, ckpt.text_embedding,
                                     cross_domain=cross_domain)
    return interleave(fg, al), z_img, z_tri


def _close(a, b, rel=2e-5):  # observed: <= 6e-7 (float32 rounding)
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    return err / scale, err / scale <= rel


@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("cross_domain", [True, False])
def test_comfy_equals_reference(comfy, setup, fam, cross_domain):
    out, noise, pos, _ = _comfy_run(comfy, setup, fam, cross_domain)
    ref, z_img, z_tri = _reference(setup, fam, noise, cross_domain)
    # the conditioning node encoded exactly what the reference encodes (raw VAE scale)
    concat = pos[0][1]["drip_concat"]
    assert torch.allclose(concat[:, :4] * SCALE, z_img, atol=1e-6)
    assert torch.allclose(concat[:, 4:] * SCALE, z_tri, atol=1e-6)
    assert out.shape == (4, 4, 16, 16)
    rel, ok = _close(out * SCALE, ref)
    assert ok, f"{fam} cross_domain={cross_domain}: ComfyUI vs reference max rel diff {rel:.2e}"
    assert ref.abs().max() > 0.1  # a real signal, not a collapsed output


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_dpmpp_2m_equals_reference(comfy, setup, fam):
    """The paper's solver (DPM-Solver++ 2M) through ComfyUI vs diffusers."""
    out, noise, _, _ = _comfy_run(comfy, setup, fam, True, sampler="dpmpp_2m", seed=7)
    ref, _, _ = _reference(setup, fam, noise, True, sampler="dpmpp_2m")
    rel, ok = _close(out * SCALE, ref)
    assert ok, f"{fam} dpmpp_2m: max rel diff {rel:.2e}"


def test_cfg_batches_cond_and_uncond(comfy, setup):
    """cfg != 1 runs cond and uncond as one 8-item batch; pairs stay consecutive inside each chunk, so
    with identical positive/negative the result equals the cfg-free reference."""
    out, noise, _, _ = _comfy_run(comfy, setup, "sd15", True, cfg=2.5)
    ref, _, _ = _reference(setup, "sd15", noise, True)
    rel, ok = _close(out * SCALE, ref)
    assert ok, f"cfg 2.5 vs reference: {rel:.2e}"


def test_cross_domain_matters(comfy, setup):
    on, _, _, _ = _comfy_run(comfy, setup, "sd15", True)
    off, _, _, _ = _comfy_run(comfy, setup, "sd15", False)
    rel = (on - off).abs().max().item() / on.abs().max().item()
    assert rel > 2e-3, rel  # 100x the ComfyUI-vs-reference tolerance: a real change, not float noise


def test_attention_patch_equals_direct_joint_attention(comfy):
    D = _glue(comfy)
    torch.manual_seed(3)
    heads, n, c = 4, 10, 32
    q, k, v = (torch.randn(6, n, c) for _ in range(3))
    got = D.cross_domain_attn1(q, k, v, {"n_heads": heads, "attn_precision": None})
    want = joint_attention_direct(q, k, v, heads)
    assert (got - want).abs().max() < 1e-5
    # and it is not plain self-attention
    import comfy.ldm.modules.attention as ca
    plain = ca.optimized_attention(q, k, v, heads)
    assert (got - plain).abs().max() > 1e-2
    with pytest.raises(ValueError):
        D.cross_domain_attn1(q[:5], k[:5], v[:5], {"n_heads": heads})


def test_patch_covers_every_transformer_block(comfy, setup):
    D = _glue(comfy)
    m = comfy.node_class_mappings
    model = m["DM_DRIPModelLoader"].execute(drip_name=setup["files"]["sd2"], weight_dtype="default",
                                            cross_domain_attention=True).result[0]
    from comfy.ldm.modules.attention import BasicTransformerBlock
    n_blocks = sum(isinstance(x, BasicTransformerBlock) for x in model.model.diffusion_model.modules())
    replace = model.model_options["transformer_options"]["patches_replace"]["attn1"]
    # tiny: 1 layer per down level (3 with attention), the mid block, 2 layers per up level (3 with attention)
    assert n_blocks == 3 * 1 + 1 + 3 * 2 and len(replace) == n_blocks
    assert D.cross_domain_active(model)
    off = m["DM_DRIPCrossDomainAttention"].execute(model=model, enabled=False).result[0]
    assert not D.cross_domain_active(off) and D.cross_domain_active(model)


def test_lora_applies_to_drip_model(comfy, setup):
    """A LoRA (diffusers module names, kohya-style keys, plus LDM-named conv_in / label_emb) patches the
    DRIP MODEL: every key is matched and the sampled latents change."""
    import comfy.lora as comfy_lora
    from safetensors.torch import save_file

    ckpt = load_drip(harness.model_path("drip", setup["files"]["sd15"]))
    dsd = ckpt.diffusers_state_dict()
    g = torch.Generator().manual_seed(11)
    lora, rank = {}, 4
    targets = [k[:-len(".weight")] for k in dsd if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight",
                                                                ".to_out.0.weight"))]
    for t in targets:
        w = dsd[t + ".weight"]
        name = "lora_unet_" + t.replace(".", "_")
        lora[name + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
        lora[name + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
        lora[name + ".alpha"] = torch.tensor(float(rank))
    w = dsd["class_embedding.linear_1.weight"]
    lora["lora_unet_label_emb_0_0.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g)
    lora["lora_unet_label_emb_0_0.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g)
    n_modules = len(targets) + 1
    save_file(lora, str(harness.model_path("loras", "drip_test_lora.safetensors")))
    harness.refresh_file_lists()

    model = comfy.node_class_mappings["DM_DRIPModelLoader"].execute(
        drip_name=setup["files"]["sd15"], weight_dtype="default", cross_domain_attention=True).result[0]
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    records = []

    class _H(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    h = _H(logging.WARNING)
    logging.getLogger().addHandler(h)
    try:
        patches = comfy_lora.load_lora(lora, key_map)
        base, noise, _, _ = _comfy_run(comfy, setup, "sd15", True)
        patched, noise2, _, pm = _comfy_run(comfy, setup, "sd15", True, lora="drip_test_lora.safetensors")
    finally:
        logging.getLogger().removeHandler(h)
    assert len(patches) == n_modules, (len(patches), n_modules)
    assert not [r for r in records if "lora key not loaded" in r or "NOT LOADED" in r], records
    assert len(pm.patches) == n_modules
    assert torch.equal(noise, noise2)
    assert (patched - base).abs().max() > 1e-2 * max(1.0, base.abs().max().item())


def test_loader_rejects_non_drip_checkpoint(comfy, setup):
    m = comfy.node_class_mappings
    with pytest.raises(ValueError, match="not a DRIP checkpoint"):
        m["DM_DRIPModelLoader"].execute(drip_name="not_drip.safetensors", weight_dtype="default",
                                        cross_domain_attention=True)


def test_sampler_node_outputs(comfy, setup):
    """DRIP Sampler (2-seed ensemble): its latents are the median (= mean of two) of the KSampler runs for
    seeds 123 and 124, the plain-decoded alpha clamps known trimap regions exactly, the crop restores the
    input size, RGBA joins the two."""
    m = comfy.node_class_mappings
    nd = sys.modules[m["DM_DRIPSampler"].__module__]
    model = m["DM_DRIPModelLoader"].execute(drip_name=setup["files"]["sd15"], weight_dtype="default",
                                            cross_domain_attention=False).result[0]
    fg_l, al_l, fg, al, rgba = m["DM_DRIPSampler"].execute(
        model=model, vae=setup["vae"], image=setup["image"], erode_px=8, dilate_px=8, sampler_name="euler",
        scheduler="simple", steps=STEPS, seed=123, ensemble=2, cross_domain_attention=True,
        trimap=setup["trimap"]).result
    k1, _, pos, _ = _comfy_run(comfy, setup, "sd15", True, seed=123)
    k2, _, _, _ = _comfy_run(comfy, setup, "sd15", True, seed=124)
    assert torch.allclose(fg_l["samples"], 0.5 * (k1[0::2] + k2[0::2]), atol=1e-5)
    assert torch.allclose(al_l["samples"], 0.5 * (k1[1::2] + k2[1::2]), atol=1e-5)
    assert fg.shape == (2, H, W, 3) and al.shape == (2, H, W) and rgba.shape == (2, H, W, 4)
    extra = pos[0][1]
    a1 = nd.decode(setup["vae"], k1[0::2], k1[1::2], extra["drip_trimap"], extra["drip_size"])[1]
    a2 = nd.decode(setup["vae"], k2[0::2], k2[1::2], extra["drip_trimap"], extra["drip_size"])[1]
    assert torch.allclose(al, 0.5 * (a1 + a2), atol=1e-5)
    d_fg, d_al, d_rgba, d_fgl, d_all = m["DM_DRIPDecode"].execute(vae=setup["vae"], samples={"samples": k1},
                                                                   positive=pos).result
    assert torch.equal(d_fgl["samples"], k1[0::2]) and torch.equal(d_all["samples"], k1[1::2])
    assert torch.equal(d_al, a1) and d_fg.shape == (2, H, W, 3) and d_rgba.shape == (2, H, W, 4)
    tri = setup["trimap"]
    assert torch.equal(al[tri > 0.75], torch.ones_like(al[tri > 0.75]))
    assert torch.equal(al[tri < 0.25], torch.zeros_like(al[tri < 0.25]))
    unknown = (tri > 0.25) & (tri < 0.75)
    assert al[unknown].std() > 1e-3          # sampled, not a constant
    assert torch.equal(rgba[..., 3], al) and torch.equal(rgba[..., :3], fg)


def test_trained_export_loads_and_matches_reference(comfy, setup, tmp_path):
    """The training toolkit's export (fp16, LDM layout) loads in the DRIP Model Loader and ComfyUI
    reproduces the reference loop on it."""
    from diffusion_matting.py import train_drip as T

    torch.manual_seed(0)
    unet = M.convert_base_to_drip(M.build_unet(M.base_config("sd15", tiny=True)))
    items = T.prepare_items(T.procedural_items(3, size=64, seed=0), pad_iterations=5)
    cfg = T.DRIPTrainConfig(steps=2, batch_size=2, lr=1e-3, resolution=32, val_count=1, val_steps=1,
                            val_sampler="euler", save_every=10 ** 6)
    res = T.train_drip(unet, T.PoolCodec(4), torch.randn(1, 77, 768) * 0.5, items[:2], items[2:], cfg, tmp_path,
                       "sd15", log=lambda *a: None, export_layout="ldm", export_dtype=torch.float16)
    target = harness.model_path("drip", "trained_sd15.safetensors")
    target.write_bytes(open(res["export"], "rb").read())
    harness.refresh_file_lists()
    setup["files"]["trained"] = "trained_sd15.safetensors"
    out, noise, _, _ = _comfy_run(comfy, setup, "trained", True)
    ref, _, _ = _reference(setup, "trained", noise, True)
    rel, ok = _close(out * SCALE, ref)
    assert ok, f"trained export: max rel diff {rel:.2e}"


def test_bad_inputs_and_trimap_without_unknown(comfy, setup):
    import types

    m = comfy.node_class_mappings
    nd = sys.modules[m["DM_DRIPSampler"].__module__]
    model = m["DM_DRIPModelLoader"].execute(drip_name=setup["files"]["sd15"], weight_dtype="default",
                                            cross_domain_attention=True).result[0]
    vae, image, tri = setup["vae"], setup["image"], setup["trimap"]
    cond = m["DM_DRIPConditioning"]
    kw = dict(model=model, vae=vae, erode_px=8, dilate_px=8)
    with pytest.raises(ValueError, match="size mismatch"):
        cond.execute(image=image, trimap=tri[:, :-4], **kw)
    with pytest.raises(ValueError, match="batch mismatch"):
        cond.execute(image=torch.cat([image, image[:1]]), trimap=tri, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        cond.execute(image=image, **kw)
    with pytest.raises(ValueError, match="needs a DRIP model"):
        cond.execute(image=image, trimap=tri, **{**kw, "model": types.SimpleNamespace(model=torch.nn.Linear(1, 1))})
    with pytest.raises(ValueError, match="Stable Diffusion VAE"):
        cond.execute(image=image, trimap=tri, **{**kw, "vae": types.SimpleNamespace(latent_channels=16, downscale_ratio=8)})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        nd.sample_drip(model, vae, image, tri, None, 8, 8, "euler", "simple", 0, 0)
    # a trimap with no unknown region comes back exactly (and a coarse mask works too)
    hard = (tri > 0.5).float()
    _, _, fg, al, _ = m["DM_DRIPSampler"].execute(
        model=model, vae=vae, image=image, erode_px=8, dilate_px=8, sampler_name="euler", scheduler="simple",
        steps=1, seed=0, ensemble=1, cross_domain_attention=True, trimap=hard).result
    assert torch.equal(al, hard)
    pos, _, used = cond.execute(image=image, coarse_mask=(tri > 0.5).float(), **kw).result
    assert torch.equal(used, A.trimap_from_mask((tri > 0.5).float(), 8, 8)[0])
    assert pos[0][1]["drip_concat"].shape == (2, 8, 16, 16)
