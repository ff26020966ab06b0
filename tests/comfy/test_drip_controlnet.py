"""Tier 2: a ControlNet attached to DRIP conditioning runs through DRIP sampling in real ComfyUI.

What ComfyUI feeds a ControlNet (``comfy.controlnet.ControlNet.get_control``): ``x`` = the noisy latent
only (``model_sampling.calculate_input`` of ``x_noisy``: 4 channels, NOT the 12-channel DRIP input -
``c_concat`` is added inside ``BaseModel.apply_model`` and never reaches the ControlNet), the hint through
the ControlNet's own ``input_hint_block``, ``context`` = the conditioning's ``c_crossattn`` (the DRIP
empty-prompt embedding) and the ``extra_conds`` (default ``["y"]``: the DRIP switcher codes, one row per
batch item). So the ControlNet for a DRIP UNet is one of the *base* SD architecture with ``in_channels``
4 - a plain SD1.5/SD2 ControlNet (no ``label_emb``: ``y`` is ignored), or one that also takes the
4-d switcher code through a ``label_emb`` (``num_classes="sequential"``, ``adm_in_channels`` 4) - and
its residuals fit the DRIP UNet because DRIP keeps the base block layout. A ControlNet that copied the
DRIP UNet's 12-channel ``conv_in`` cannot run in ComfyUI (shape error, asserted below).

Models: the tiny random-weight DRIP SD1.5 checkpoint (DRIP Model Loader), a ControlNet built in-process
from the loaded model's own ComfyUI ``unet_config`` (``comfy.cldm.cldm.ControlNet``, random weights from
``models.randomize``, non-zero zero-convs) and wrapped like ``ControlNetLoader`` wraps it, ComfyUI's
``ControlNetApplyAdvanced`` on the positive/negative from DRIP Conditioning, core ``KSampler``.
"""

from __future__ import annotations

import pytest
import torch

import harness

from diffusion_matting.py import alpha as A
from diffusion_matting.py.drip import model as M
from diffusion_matting.py.drip.checkpoint import save_drip
from diffusion_matting.py.drip.codes import switcher_codes
from diffusion_matting.py.samples import make_sample
from models import randomize, tiny_vae

H = W = 64               # 8 x 8 latents
STEPS = 3
SEED = 321


@pytest.fixture(scope="module")
def setup(comfy):
    torch.manual_seed(0)
    unet = M.build_unet(M.drip_config(M.base_config("sd15", tiny=True)))
    save_drip(harness.model_path("drip", "cn_tiny_sd15.safetensors"), unet.state_dict(), unet.config,
              base_family="sd15", prediction_type="epsilon", text_embedding=torch.randn(1, 77, 768) * 0.5,
              layout="ldm")
    harness.refresh_file_lists()
    samples = [make_sample(H, W, seed=s) for s in (3, 4)]
    image = torch.stack([torch.from_numpy(s.image) for s in samples])
    trimap, _ = A.trimap_from_mask(torch.stack([torch.from_numpy(s.alpha) for s in samples]), 3, 3)
    m = comfy.node_class_mappings
    model = m["DM_DRIPModelLoader"].execute(drip_name="cn_tiny_sd15.safetensors", weight_dtype="default",
                                            cross_domain_attention=True).result[0]
    vae = tiny_vae()
    pos, neg, _ = m["DM_DRIPConditioning"].execute(model=model, vae=vae, image=image, erode_px=8, dilate_px=8,
                                                   trimap=trimap).result
    latent = m["DM_DRIPLatent"].execute(image=image).result[0]
    hint = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(9))
    return {"model": model, "pos": pos, "neg": neg, "latent": latent, "hint": hint, "image": image}


def _controlnet(model, in_channels: int = 4, switcher: bool = False, seed: int = 4):
    """A ControlNet of the DRIP model's base architecture, from the loaded model's ComfyUI unet_config."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    cfg = dict(model.model.model_config.unet_config)
    cfg.pop("out_channels")
    assert cfg["in_channels"] == 12 and cfg["adm_in_channels"] == 4  # the DRIP UNet itself
    cfg["in_channels"] = in_channels
    if not switcher:
        cfg.pop("num_classes")
        cfg.pop("adm_in_channels")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    cn = comfy.cldm.cldm.ControlNet(**cfg)
    randomize(cn, seed=seed)
    return comfy.controlnet.ControlNet(cn, load_device=torch.device("cpu"), manual_cast_dtype=None)


def _sample(comfy, setup, pos, neg, cfg=1.0):
    out = comfy.nodes.KSampler().sample(setup["model"], SEED, STEPS, cfg, "euler", "simple", pos, neg,
                                        setup["latent"], denoise=1.0)[0]
    return out["samples"]


_BASE: dict = {}


def _baseline(comfy, setup, cfg=1.0):
    if cfg not in _BASE:
        _BASE[cfg] = _sample(comfy, setup, setup["pos"], setup["neg"], cfg)
    return _BASE[cfg]


def _spy(cn, seen):
    """Record what ComfyUI feeds the control model (x, hint, y) on every call."""
    inner = cn.control_model
    real = inner.forward

    def forward(x, hint, timesteps, context, y=None, **kw):
        seen.append({"x": tuple(x.shape), "hint": hint.detach().clone(), "context": tuple(context.shape),
                     "y": None if y is None else y.detach().clone(), "batch": x.shape[0]})
        return real(x, hint, timesteps, context, y=y, **kw)

    inner.forward = forward  # instance attribute: shared by the copies ControlNetApplyAdvanced makes
    return lambda: inner.__dict__.pop("forward", None)


@pytest.mark.parametrize("switcher", [False, True], ids=["plain_sd_controlnet", "switcher_label_emb"])
def test_controlnet_runs_through_drip_sampling(comfy, setup, switcher):
    """ControlNetApplyAdvanced on DRIP Conditioning: sampling runs, the ControlNet sees the 4-channel
    noisy latent of every [fg, alpha] item, the DRIP text embedding as context and (with a label_emb) the
    per-item switcher codes; the output differs from sampling without the ControlNet."""
    base = _baseline(comfy, setup)
    cn = _controlnet(setup["model"], switcher=switcher)
    seen = []
    undo = _spy(cn, seen)
    try:
        pos, neg = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(setup["pos"], setup["neg"], cn,
                                                                           setup["hint"], 1.0, 0.0, 1.0)
        out = _sample(comfy, setup, pos, neg)
    finally:
        undo()
    assert len(seen) == STEPS
    for call in seen:
        assert call["x"] == (4, 4, H // 8, W // 8) and call["context"] == (4, 77, 768)
        assert call["hint"].shape == (1, 3, H, W)  # one hint shared by all items (broadcast)
        assert torch.allclose(call["hint"], setup["hint"].movedim(-1, 1))
        assert call["y"] is not None  # ComfyUI passes y; a plain SD ControlNet (no label_emb) ignores it
        assert torch.equal(call["y"], switcher_codes().repeat(2, 1))  # [fg, alpha, fg, alpha] codes
    assert out.shape == base.shape == (4, 4, H // 8, W // 8)
    rel = (out - base).abs().max().item() / base.abs().max().item()
    assert rel > 1e-2, rel
    assert torch.isfinite(out).all()


def test_strength_zero_equals_no_controlnet(comfy, setup):
    """Strength 0 through the node (ComfyUI leaves the conditioning untouched) and a ControlNet that does
    run with strength 0 (set_cond_hint directly) both reproduce sampling without a ControlNet exactly;
    strength 1 with cfg > 1 (cond and uncond in one batch, ControlNet on both) changes the output."""
    base = _baseline(comfy, setup)
    cn = _controlnet(setup["model"])
    pos, neg = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(setup["pos"], setup["neg"], cn,
                                                                       setup["hint"], 0.0, 0.0, 1.0)
    assert torch.equal(_sample(comfy, setup, pos, neg), base)

    seen = []
    undo = _spy(cn, seen)
    try:
        c0 = cn.copy().set_cond_hint(setup["hint"].movedim(-1, 1), 0.0, (0.0, 1.0))
        pos0 = [[t[0], {**t[1], "control": c0, "control_apply_to_uncond": False}] for t in setup["pos"]]
        neg0 = [[t[0], {**t[1], "control": c0, "control_apply_to_uncond": False}] for t in setup["neg"]]
        out0 = _sample(comfy, setup, pos0, neg0)
        assert len(seen) == STEPS  # the ControlNet really ran
        assert torch.allclose(out0, base, rtol=0, atol=1e-6 * max(1.0, base.abs().max().item()))

        seen.clear()
        base_cfg = _baseline(comfy, setup, cfg=2.0)
        pos1, neg1 = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(setup["pos"], setup["neg"], cn,
                                                                             setup["hint"], 1.0, 0.0, 1.0)
        out1 = _sample(comfy, setup, pos1, neg1, cfg=2.0)
    finally:
        undo()
    assert seen and all(c["batch"] == 8 for c in seen)  # cond + uncond pairs in one call
    assert (out1 - base_cfg).abs().max().item() > 1e-2 * base_cfg.abs().max().item()


def test_per_image_hints_must_be_given_per_pair(comfy, setup):
    """ComfyUI broadcasts a hint batch to the latent batch by repeating it whole ([h0, h1] -> [h0, h1, h0,
    h1]), which would pair image 0's alpha with image 1's hint. Per-image hints for a DRIP batch are
    given pair-interleaved ([h0, h0, h1, h1]): the DRIP ControlNet Hint node does that; then every
    [fg_i, alpha_i] pair gets hint i."""
    from diffusion_matting.nodes.drip import DRIPControlNetHint

    hints = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(11))
    paired = DRIPControlNetHint.execute(hints).result[0]
    single = hints[:1]
    assert DRIPControlNetHint.execute(single).result[0] is single  # one hint for all: passed through
    cn = _controlnet(setup["model"])
    seen = []
    undo = _spy(cn, seen)
    try:
        pos, neg = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(
            setup["pos"], setup["neg"], cn, paired, 0.7, 0.0, 1.0)
        _sample(comfy, setup, pos, neg)
    finally:
        undo()
    got = seen[0]["hint"]
    want = hints.movedim(-1, 1)
    assert got.shape == (4, 3, H, W)
    for item, img in enumerate((0, 0, 1, 1)):
        assert torch.allclose(got[item], want[img]), item


def test_controlnet_copying_the_12_channel_conv_in_cannot_run(comfy, setup):
    """A ControlNet whose conv_in copies the DRIP UNet's 12 input channels gets ComfyUI's 4-channel noisy
    latent and fails with a shape error - the reason DRIP ControlNets take in_channels 4."""
    cn = _controlnet(setup["model"], in_channels=12, switcher=True)
    pos, neg = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(setup["pos"], setup["neg"], cn,
                                                                       setup["hint"], 1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="channels"):
        comfy.nodes.KSampler().sample(setup["model"], SEED, 1, 1.0, "euler", "simple", pos, neg, setup["latent"],
                                      denoise=1.0)
