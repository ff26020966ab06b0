"""Tier 2: Load BackgroundMattingV2 + GreenPost's ``refiner`` input inside a real ComfyUI (CPU).

Random-weight BackgroundMattingV2 files (MobileNetV2 + refiner, the public layout) are written into
``models/background_matting`` as ``.safetensors`` (through the pack's converter) and as a plain ``.pth``
state dict; the node outputs are compared with the ComfyUI-free core (``greenpost`` + ``refine_with_bmv2``).
"""

from __future__ import annotations


import pytest
import torch

import harness
import models

H, W = 45, 62  # not multiples of 4: the refiner pads and crops back
ALPHA = "alpha (1 = foreground)"


def _frame():
    g = torch.Generator().manual_seed(4)
    img = torch.tensor([0.1, 0.75, 0.2]).expand(1, H, W, 3) + torch.rand(1, H, W, 3, generator=g) * 0.04
    img = img.clone()
    img[0, 12:34, 18:44] = torch.rand(22, 26, 3, generator=g) * 0.5 + torch.tensor([0.4, 0.1, 0.2])
    return img.clamp(0, 1)


@pytest.fixture(scope="module")
def env(comfy_pack, tmp_path_factory):
    from diffusion_matting.py import background_matting as BM

    pth = models.write_bmv2("bmv2_test.pth", seed=0)  # random weights, the authors' plain state-dict layout
    model = BM.build_bmv2("mobilenetv2").eval()
    model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
    BM.convert_bmv2(pth, pth.with_name("bmv2_test.safetensors"))
    harness.refresh_file_lists()
    return {"m": comfy_pack.node_class_mappings, "BM": BM, "model": model, "image": _frame()}


def test_nodes_and_inputs(env):
    loader = env["m"]["DM_BackgroundMattingLoader"].GET_SCHEMA()
    assert loader.category == "matting/keying"
    ids = [i.id for i in loader.inputs]
    assert ids == ["model_name", "backbone_scale", "refine_mode", "sample_pixels", "threshold"]
    assert loader.outputs[0].io_type == "DM_BMV2"
    refiner = [i for i in env["m"]["DM_GreenPost"].GET_SCHEMA().inputs if i.id == "refiner"]
    assert len(refiner) == 1 and refiner[0].optional and refiner[0].io_type == "DM_BMV2"
    import folder_paths
    names = folder_paths.get_filename_list("background_matting")
    assert {"bmv2_test.pth", "bmv2_test.safetensors"} <= set(names)


@pytest.mark.parametrize("name", ["bmv2_test.safetensors", "bmv2_test.pth"])
def test_loader_gives_a_managed_model_with_the_file_weights(env, name):
    import comfy.model_patcher

    ref = env["m"]["DM_BackgroundMattingLoader"].execute(model_name=name, backbone_scale="1/4",
                                                           refine_mode="thresholding", sample_pixels=0,
                                                           threshold=0.2).result[0]
    assert isinstance(ref.patcher, comfy.model_patcher.ModelPatcher)
    # (ComfyUI imports the pack under its folder name: compare class names, not class objects)
    assert type(ref.model).__name__ == "MattingRefine" and ref.model.backbone_name == "mobilenetv2"
    assert ref.options == {"backbone_scale": 0.25, "refine_mode": "thresholding", "sample_pixels": None,
                           "threshold": 0.2}
    sd, exp = ref.model.state_dict(), env["model"].state_dict()
    assert set(sd) == set(exp) and all(torch.equal(sd[k].cpu(), exp[k]) for k in exp)
    with pytest.raises(ValueError, match=r"background_matting[/\\]nope\.pth"):
        env["m"]["DM_BackgroundMattingLoader"].execute(model_name="nope.pth")


def test_greenpost_with_refiner_matches_the_core(env):
    import comfy.model_management as mm

    from diffusion_matting.py.greenpost import greenpost

    BM, image = env["BM"], env["image"]
    ref = env["m"]["DM_BackgroundMattingLoader"].execute(model_name="bmv2_test.safetensors", backbone_scale="1/2",
                                                           refine_mode="sampling", sample_pixels=1600,
                                                           threshold=0.1).result[0]
    node = env["m"]["DM_GreenPost"]
    args = dict(image=image, key_color_mode="auto (K-Means)", key_color="#00ff00", despill=1.0, decontaminate=1.0,
                noise_clip=1.0, strict=False)
    plain = node.execute(**args).result
    fg, alpha, rgba, plate, key = node.execute(**args, refiner=ref).result
    assert any(lm.model is ref.patcher for lm in mm.current_loaded_models)  # ComfyUI model management holds it
    assert fg.shape == (1, H, W, 3) and alpha.shape == (1, H, W) and rgba.shape == (1, H, W, 4)
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1 and float(fg.min()) >= 0 and float(fg.max()) <= 1
    assert torch.equal(rgba[..., :3], fg) and torch.equal(rgba[..., 3], alpha)
    assert torch.equal(plate, plain[3]) and key == plain[4]          # the plate and key are GreenPost's
    res = greenpost(image)
    e_alpha, e_fg = BM.refine_with_bmv2(env["model"], image, res.plate, backbone_scale=0.5, refine_mode="sampling",
                                        sample_pixels=1600, threshold=0.1)
    assert torch.allclose(alpha.cpu(), e_alpha, atol=1e-6) and torch.allclose(fg.cpu(), e_fg, atol=1e-6)
    assert float((alpha.cpu() - plain[1].cpu()).abs().mean()) > 1e-2  # the refiner replaced GreenPost's matte

    # a coarse mask still bounds the alpha (GreenPost's garbage-matte rule)
    mask = torch.zeros(1, H, W)
    mask[:, 14:32, 20:42] = 1.0
    _, m_alpha, _, _, _ = node.execute(**args, coarse_mask=mask, mask_convention=ALPHA, refiner=ref).result
    res = greenpost(image, mask=mask)
    e_alpha, _ = BM.refine_with_bmv2(env["model"], image, res.plate, backbone_scale=0.5, sample_pixels=1600)
    bound = BM.garbage_matte_bound(mask)
    assert torch.allclose(m_alpha.cpu(), torch.minimum(e_alpha, bound), atol=1e-6)
    assert torch.all(m_alpha.cpu()[bound == 0] == 0) and float(e_alpha[bound == 0].max()) > 0.05


def test_prompt_with_loader_wired_into_greenpost_runs(env):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x00FF00}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 20, "batch_size": 1, "color": 0xC04020}},
        "3": {"class_type": "ImageCompositeMasked",
              "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": 20, "y": 14, "resize_source": False}},
        "4": {"class_type": "DM_BackgroundMattingLoader",
              "inputs": {"model_name": "bmv2_test.pth", "backbone_scale": "auto", "refine_mode": "sampling",
                         "sample_pixels": 0, "threshold": 0.1}},
        "5": {"class_type": "DM_GreenPost",
              "inputs": {"image": ["3", 0], "key_color_mode": "auto (K-Means)", "key_color": "#00ff00",
                         "despill": 1.0, "decontaminate": 1.0, "noise_clip": 1.0, "strict": False,
                         "refiner": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }
    assert harness.validate(prompt) == []
    run = harness.execute(prompt)
    run.raise_for_error()
    rgba = run.output("5", 2)
    assert rgba.shape == (1, 48, 64, 4) and len(run.files("6")) == 1
    image = run.output("3", 0)
    plate = run.output("5", 3)
    e_alpha, e_fg = env["BM"].refine_with_bmv2(env["model"], image, plate)
    assert torch.allclose(rgba[..., 3].cpu(), e_alpha, atol=1e-6)
    assert torch.allclose(rgba[..., :3].cpu(), e_fg, atol=1e-6)
