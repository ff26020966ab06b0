"""BackgroundMattingV2: public state-dict layout, strict loading, functional re-computation, refine modes,
safe .pth loading, the converter and the image-level wrapper.

The expected key names and shapes are written here from the reference architecture (torchvision's
MobileNetV2 / ResNet key names, DeepLabV3's ASPP, BackgroundMattingV2's decoder and refiner), independently
of the module's own tables; the forward passes are recomputed with ``torch.nn.functional`` straight from
the state dict.
"""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from diffusion_matting.py import background_matting as BM
from diffusion_matting.py.cli import main as cli_main
from diffusion_matting.py.errors import UserError



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only, scoped to each test (a module-level switch would leak into other test files)."""
    with torch.no_grad():
        yield


# ------------------------------------------------------------------------- the public layout, by hand
def _conv(name, cout, cin, k, bias=False):
    out = [(f"{name}.weight", (cout, cin, k, k))]
    return out + ([(f"{name}.bias", (cout,))] if bias else [])


def _bn(name, c):
    return [(f"{name}.{s}", (c,)) for s in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{name}.num_batches_tracked", ())]


# torchvision MobileNetV2 table (expansion t, channels c, repeats n, first stride s)
MBV2_TABLE = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_keys():
    keys = _conv("backbone.features.0.0", 32, 6, 3) + _bn("backbone.features.0.1", 32)
    cin, idx = 32, 1
    for t, c, n, _ in MBV2_TABLE:
        for _ in range(n):
            p, hid, q = f"backbone.features.{idx}.conv", cin * t, 0
            if t != 1:
                keys += _conv(f"{p}.0.0", hid, cin, 1) + _bn(f"{p}.0.1", hid)
                q = 1
            keys += _conv(f"{p}.{q}.0", hid, 1, 3) + _bn(f"{p}.{q}.1", hid)  # depthwise
            keys += _conv(f"{p}.{q + 1}", c, hid, 1) + _bn(f"{p}.{q + 2}", c)
            cin, idx = c, idx + 1
    return keys


def resnet_keys(blocks):
    keys = _conv("backbone.conv1", 64, 6, 7) + _bn("backbone.bn1", 64)
    cin = 64
    for L, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"backbone.layer{L}.{b}"
            keys += _conv(f"{p}.conv1", planes, cin, 1) + _bn(f"{p}.bn1", planes)
            keys += _conv(f"{p}.conv2", planes, planes, 3) + _bn(f"{p}.bn2", planes)
            keys += _conv(f"{p}.conv3", planes * 4, planes, 1) + _bn(f"{p}.bn3", planes * 4)
            if b == 0:
                keys += _conv(f"{p}.downsample.0", planes * 4, cin, 1) + _bn(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    return keys


def head_keys(top, skips, refine):
    keys = _conv("aspp.convs.0.0", 256, top, 1) + _bn("aspp.convs.0.1", 256)
    for r in (1, 2, 3):
        keys += _conv(f"aspp.convs.{r}.0", 256, top, 3) + _bn(f"aspp.convs.{r}.1", 256)
    keys += _conv("aspp.convs.4.1", 256, top, 1) + _bn("aspp.convs.4.2", 256)
    keys += _conv("aspp.project.0", 256, 5 * 256, 1) + _bn("aspp.project.1", 256)
    widths, outs = (256, 128, 64, 48), (128, 64, 48, 37)
    for n in range(4):
        keys += _conv(f"decoder.conv{n + 1}", outs[n], widths[n] + skips[n], 3, bias=n == 3)
        if n < 3:
            keys += _bn(f"decoder.bn{n + 1}", outs[n])
    if refine:
        keys += _conv("refiner.conv1", 24, 42, 3) + _bn("refiner.bn1", 24)
        keys += _conv("refiner.conv2", 16, 24, 3) + _bn("refiner.bn2", 16)
        keys += _conv("refiner.conv3", 12, 22, 3) + _bn("refiner.bn3", 12)
        keys += _conv("refiner.conv4", 4, 12, 3, bias=True)
    return keys


def expected_keys(backbone, refine=True):
    if backbone == "mobilenetv2":
        return mobilenet_keys() + head_keys(320, (32, 24, 16, 6), refine)
    return resnet_keys((3, 4, 6, 3) if backbone == "resnet50" else (3, 4, 23, 3)) + \
        head_keys(2048, (512, 256, 64, 6), refine)


# counts worked out by hand: MobileNetV2 306 (stem 6 + 12 + 16 x 18), ResNet-50 318 (6 + 16 x 18 + 4 x 6),
# ResNet-101 624 (6 + 33 x 18 + 4 x 6); ASPP 36, decoder 20, refiner 20
COUNTS = {("mobilenetv2", True): 382, ("mobilenetv2", False): 362, ("resnet50", True): 394, ("resnet101", True): 700}
SPOT = {
    "mobilenetv2": {"backbone.features.0.0.weight": (32, 6, 3, 3), "backbone.features.1.conv.1.weight": (16, 32, 1, 1),
                    "backbone.features.14.conv.1.0.weight": (576, 1, 3, 3),
                    "backbone.features.17.conv.2.weight": (320, 960, 1, 1), "aspp.convs.0.0.weight": (256, 320, 1, 1),
                    "aspp.convs.4.1.weight": (256, 320, 1, 1), "aspp.project.0.weight": (256, 1280, 1, 1),
                    "decoder.conv1.weight": (128, 288, 3, 3), "decoder.conv4.weight": (37, 54, 3, 3),
                    "decoder.conv4.bias": (37,), "refiner.conv1.weight": (24, 42, 3, 3),
                    "refiner.conv3.weight": (12, 22, 3, 3), "refiner.conv4.bias": (4,)},
    "resnet50": {"backbone.conv1.weight": (64, 6, 7, 7), "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
                 "backbone.layer3.5.conv2.weight": (256, 256, 3, 3),
                 "backbone.layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
                 "backbone.layer4.2.bn3.running_var": (2048,), "aspp.convs.1.0.weight": (256, 2048, 3, 3),
                 "decoder.conv1.weight": (128, 768, 3, 3), "decoder.conv2.weight": (64, 384, 3, 3),
                 "decoder.conv3.weight": (48, 128, 3, 3), "refiner.conv2.weight": (16, 24, 3, 3)},
    "resnet101": {"backbone.layer3.22.conv3.weight": (1024, 256, 1, 1), "backbone.layer2.3.bn2.bias": (128,),
                  "backbone.layer4.2.conv2.weight": (512, 512, 3, 3), "refiner.bn3.num_batches_tracked": ()},
}


def random_state_dict(keys, seed=0):
    """Trained-like random weights: He-scaled convs, BN stats near 1/0, residual branches damped."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            sd[k] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:
            damp = 0.2 if k.endswith("bn3.weight") or ".conv.2.weight" in k or ".conv.3.weight" in k else 1.0
            sd[k] = (torch.rand(shape, generator=g) + 0.5) * damp
        else:
            fan = shape[1] * shape[2] * shape[3]
            gain = 3.0 if k.startswith("decoder.conv4") else 1.0
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan) * gain
    for k in ("decoder.conv4.bias", "refiner.conv4.bias"):  # alpha (and error) around 0.5: unsaturated outputs
        if k in sd:
            sd[k][0] = 0.5
            sd[k][4:5] = 0.5
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One ``.pth`` per variant, written with the public layout (plain ``torch.save`` of a dict)."""
    root = tmp_path_factory.mktemp("bmv2")
    out = {}
    for backbone, refine in COUNTS:
        sd = random_state_dict(expected_keys(backbone, refine), seed=len(out))
        path = root / f"{backbone}{'' if refine else '_base'}.pth"
        torch.save(sd, path)
        out[(backbone, refine)] = (path, sd)
    return out


# ------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("backbone,refine", list(COUNTS))
def test_module_has_the_public_keys_and_shapes(backbone, refine):
    exp = expected_keys(backbone, refine)
    assert len(exp) == len({k for k, _ in exp}) == COUNTS[(backbone, refine)]
    got = {k: tuple(v.shape) for k, v in BM.build_bmv2(backbone, refine).state_dict().items()}
    assert got == dict(exp)
    for k, shape in SPOT.get(backbone, {}).items():
        if refine or not k.startswith("refiner."):
            assert got[k] == shape, k


@pytest.mark.parametrize("backbone,refine", list(COUNTS))
def test_pth_loads_strictly_key_for_key(weights, backbone, refine):
    path, sd = weights[(backbone, refine)]
    model = BM.load_bmv2(path)
    assert isinstance(model, BM.MattingRefine if refine else BM.MattingBase) and model.backbone_name == backbone
    assert BM.infer_bmv2_config(sd) == {"backbone": backbone, "refine": refine, "kernel_size": 3}
    msd = model.state_dict()
    assert set(msd) == set(sd) and all(torch.equal(msd[k], sd[k]) for k in sd)
    assert not model.training


# ------------------------------------------------------------------------- functional re-computation
def _bn_f(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _cbr(x, sd, conv, bn, stride=1, pad=0, dil=1, groups=1, act=F.relu):
    y = _bn_f(F.conv2d(x, sd[conv + ".weight"], None, stride, pad, dil, groups), sd, bn)
    return act(y) if act else y


def f_mobilenet(sd, x):
    relu6 = lambda t: F.hardtanh(t, 0.0, 6.0)  # noqa: E731
    feats = [x]
    x = _cbr(x, sd, "backbone.features.0.0", "backbone.features.0.1", 2, 1, act=relu6)
    cin, idx = 32, 1
    for t, c, n, s in MBV2_TABLE:
        for r in range(n):
            stride = s if r == 0 else 1
            residual = stride == 1 and cin == c  # decided with torchvision's stride (before the BMV2 edit)
            if idx == 14:
                stride = 1                        # BMV2: block 14 no longer strides ...
            dil = 2 if idx >= 15 else 1           # ... and blocks 15-17 are dilated
            p, q, y = f"backbone.features.{idx}.conv", 0, x
            if t != 1:
                y = _cbr(y, sd, f"{p}.0.0", f"{p}.0.1", act=relu6)
                q = 1
            y = _cbr(y, sd, f"{p}.{q}.0", f"{p}.{q}.1", stride, dil, dil, groups=cin * t, act=relu6)
            y = _bn_f(F.conv2d(y, sd[f"{p}.{q + 1}.weight"]), sd, f"{p}.{q + 2}")
            x = x + y if residual else y
            if idx in (1, 3, 6):
                feats.append(x)
            cin, idx = c, idx + 1
    return x, feats[3], feats[2], feats[1], feats[0]


def f_resnet(sd, x, blocks):
    x0 = x
    x1 = _cbr(x, sd, "backbone.conv1", "backbone.bn1", 2, 3)
    x = F.max_pool2d(x1, 3, 2, 1)
    outs = []
    for L, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"backbone.layer{L}.{b}"
            stride = 2 if (b == 0 and L in (2, 3)) else 1
            dil = 2 if (L == 4 and b > 0) else 1
            y = _cbr(x, sd, f"{p}.conv1", f"{p}.bn1")
            y = _cbr(y, sd, f"{p}.conv2", f"{p}.bn2", stride, dil, dil)
            y = _cbr(y, sd, f"{p}.conv3", f"{p}.bn3", act=None)
            sc = _cbr(x, sd, f"{p}.downsample.0", f"{p}.downsample.1", stride, act=None) if b == 0 else x
            x = F.relu(y + sc)
        outs.append(x)
    return outs[3], outs[1], outs[0], x1, x0


def f_base(sd, backbone, src, bgr):
    x = torch.cat([src, bgr], 1)
    if backbone == "mobilenetv2":
        x4, *skips = f_mobilenet(sd, x)
    else:
        x4, *skips = f_resnet(sd, x, (3, 4, 6, 3) if backbone == "resnet50" else (3, 4, 23, 3))
    br = [_cbr(x4, sd, "aspp.convs.0.0", "aspp.convs.0.1")]
    br += [_cbr(x4, sd, f"aspp.convs.{i}.0", f"aspp.convs.{i}.1", 1, r, r) for i, r in ((1, 3), (2, 6), (3, 9))]
    pooled = _cbr(x4.mean((2, 3), keepdim=True), sd, "aspp.convs.4.1", "aspp.convs.4.2")
    br.append(pooled.expand(-1, -1, *x4.shape[-2:]))
    x = _cbr(torch.cat(br, 1), sd, "aspp.project.0", "aspp.project.1")
    for n, skip in enumerate(skips, start=1):
        x = torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1)
        if n < 4:
            x = _cbr(x, sd, f"decoder.conv{n}", f"decoder.bn{n}", 1, 1)
        else:
            x = F.conv2d(x, sd["decoder.conv4.weight"], sd["decoder.conv4.bias"], 1, 1)
    return x[:, :1].clamp(0, 1), x[:, 1:4], x[:, 4:5].clamp(0, 1), F.relu(x[:, 5:])


def f_refine_full(sd, src, bgr, pha, res, hid):
    """The refiner applied everywhere (what every selected 4x4 patch computes)."""
    H, W = src.shape[-2:]
    up = lambda t, s: F.interpolate(t, s, mode="bilinear", align_corners=False)  # noqa: E731
    half = (H // 2, W // 2)
    x = torch.cat([up(torch.cat([hid, pha, res], 1), half), up(torch.cat([src, bgr], 1), half)], 1)
    x = _cbr(F.pad(x, (3, 3, 3, 3)), sd, "refiner.conv1", "refiner.bn1")
    x = _cbr(x, sd, "refiner.conv2", "refiner.bn2")
    x = x.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest x2 of the (H/2 + 2)-sized map
    x = torch.cat([x, F.pad(torch.cat([src, bgr], 1), (2, 2, 2, 2))], 1)
    x = _cbr(x, sd, "refiner.conv3", "refiner.bn3")
    return F.conv2d(x, sd["refiner.conv4.weight"], sd["refiner.conv4.bias"])


def f_refine(sd, backbone, src, bgr, scale, threshold):
    """MattingRefine, 'thresholding' semantics: refined where the 1/4-res error exceeds ``threshold``
    (-1 = everywhere, i.e. 'full'; None = the median of the unclamped errors), the bilinear upsample of the
    coarse result elsewhere. Returns the 6 model outputs + (1/4-res error, threshold, refined-everywhere)."""
    H, W = src.shape[-2:]
    size = (math.floor(H * scale), math.floor(W * scale))
    src_sm = F.interpolate(src, size, mode="bilinear", align_corners=False)
    bgr_sm = F.interpolate(bgr, size, mode="bilinear", align_corners=False)
    pha_sm, res_sm, err_sm, hid_sm = f_base(sd, backbone, src_sm, bgr_sm)
    full = f_refine_full(sd, src, bgr, pha_sm, res_sm, hid_sm)
    err_q = F.interpolate(err_sm, (H // 4, W // 4), mode="bilinear", align_corners=False)
    if threshold is None:
        threshold = float(err_q[(err_q > 0) & (err_q < 1)].median())
    ref = (err_q > threshold).float()
    sel = ref.repeat_interleave(4, 2).repeat_interleave(4, 3) > 0
    coarse = F.interpolate(torch.cat([pha_sm, res_sm], 1), (H, W), mode="bilinear", align_corners=False)
    out = torch.where(sel, full, coarse)
    return (out[:, :1].clamp(0, 1), (out[:, 1:] + src).clamp(0, 1), pha_sm, (res_sm + src_sm).clamp(0, 1), err_sm,
            ref, err_q, threshold, full)


def _pair(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    bgr = torch.rand(1, 3, h, w, generator=g) * 0.3 + torch.tensor([0.1, 0.6, 0.2]).view(1, 3, 1, 1)
    src = bgr.clone()
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 5, 3 * w // 4
    src[:, :, y0:y1, x0:x1] = torch.rand(1, 3, y1 - y0, x1 - x0, generator=g)
    return src, bgr


def _close(a, b, tol=2e-4):
    return float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50", "resnet101"])
def test_base_matches_functional_recomputation(weights, backbone):
    sd = {k: v for k, v in weights[(backbone, True)][1].items() if not k.startswith("refiner.")}
    model = BM.bmv2_from_state_dict(sd)
    assert type(model) is BM.MattingBase
    src, bgr = _pair(64, 64)
    pha, fgr, err, hid = model(src, bgr)
    e_pha, e_res, e_err, e_hid = f_base(sd, backbone, src, bgr)
    assert _close(pha, e_pha) and _close(fgr, (e_res + src).clamp(0, 1)) and _close(err, e_err) and _close(hid, e_hid)
    assert 0.05 < float(((pha > 0) & (pha < 1)).float().mean())  # not a saturated, trivially equal output


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])  # same refiner; resnet101: base + layout
def test_refine_matches_functional_recomputation(weights, backbone):
    path, sd = weights[(backbone, True)]
    model = BM.load_bmv2(path)
    src, bgr = _pair(64, 96, seed=1)
    # full: refined everywhere
    got = model(src, bgr, backbone_scale=0.25, refine_mode="full")
    exp = f_refine(sd, backbone, src, bgr, 0.25, -1.0)
    assert all(_close(a, b) for a, b in zip(got[:5], exp[:5]))
    assert torch.equal(got[5], torch.ones(1, 1, 16, 24))
    # thresholding at the median error: about half the patches refined, the rest bilinear
    exp = f_refine(sd, backbone, src, bgr, 0.5, None)
    got = model(src, bgr, backbone_scale=0.5, refine_mode="thresholding", threshold=exp[7])
    assert torch.equal(got[5], exp[5]) and 0 < int(got[5].sum()) < got[5].numel()
    assert all(_close(a, b) for a, b in zip(got[:5], exp[:5]))
    unsel = exp[5].repeat_interleave(4, 2).repeat_interleave(4, 3) == 0
    assert float((exp[0] - exp[8][:, :1].clamp(0, 1))[unsel].abs().max()) > 1e-3  # refining changes alpha there


def test_sampling_picks_the_worst_patches(weights):
    path, sd = weights[("mobilenetv2", True)]
    model = BM.load_bmv2(path)
    src, bgr = _pair(64, 64, seed=2)
    # enough samples for every patch: refine exactly where the error is positive (prevent_oversampling)
    got = model(src, bgr, backbone_scale=0.25, refine_mode="sampling", sample_pixels=10 ** 6)
    exp = f_refine(sd, "mobilenetv2", src, bgr, 0.25, 0.0)
    assert torch.equal(got[5], exp[5]) and all(_close(a, b) for a, b in zip(got[:2], exp[:2]))
    # 40 patches: the 40 largest errors
    got = model(src, bgr, backbone_scale=0.25, refine_mode="sampling", sample_pixels=40 * 16)
    err_q, ref = exp[6].flatten(), got[5].flatten() > 0
    assert int(ref.sum()) == 40 and float(err_q[ref].min()) >= float(err_q[~ref].max())
    expect = torch.where(got[5].repeat_interleave(4, 2).repeat_interleave(4, 3) > 0,
                         exp[8][:, :1].clamp(0, 1),
                         F.interpolate(exp[2], (64, 64), mode="bilinear", align_corners=False))
    assert _close(got[0], expect)


def test_kernel_size_1_refiner_and_bad_options():
    model = BM.MattingRefine("mobilenetv2", kernel_size=1).eval()
    assert BM.infer_bmv2_config(model.state_dict())["kernel_size"] == 1
    src, bgr = _pair(32, 32)
    full = model(src, bgr, backbone_scale=0.5, refine_mode="full")[0]
    every = model(src, bgr, backbone_scale=0.5, refine_mode="thresholding", threshold=-1.0)[0]
    assert _close(full, every, 1e-5)
    with pytest.raises(UserError, match="divisible by 4"):
        model(src[..., :30], bgr[..., :30])
    with pytest.raises(UserError, match="backbone_scale"):
        model(src, bgr, backbone_scale=0.75)
    with pytest.raises(UserError, match="refine_mode"):
        model(src, bgr, refine_mode="tiles")


# ------------------------------------------------------------------------------------ safe loading
FLAG = []


def _side_effect(*args):
    FLAG.append(args)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path, weights):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"backbone.features.0.0.weight": _Evil()}, fh)
    with pytest.raises(UserError, match="refused"):
        BM.load_bmv2(path)
    assert FLAG == []
    torch.save({"backbone.conv1.weight": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(UserError, match="not tensors"):
        BM.load_bmv2_state_dict(tmp_path / "mixed.pth")
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a BackgroundMattingV2"):
        BM.load_bmv2(tmp_path / "other.pth")
    _, sd = weights[("mobilenetv2", True)]
    bad = dict(sd)
    bad["decoder.conv4.weight"] = torch.zeros(37, 50, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="does not match"):
        BM.load_bmv2(tmp_path / "bad.pth")
    # DataParallel prefix and BN counters missing (older checkpoints): still a strict, complete load
    alt = {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": alt}, tmp_path / "alt.pth")
    model = BM.load_bmv2(tmp_path / "alt.pth")
    msd = model.state_dict()
    assert all(torch.equal(msd[k], v) for k, v in sd.items() if v.is_floating_point())
    assert all(t.device.type == "cpu" for t in msd.values())  # nothing left on the meta device


def test_convert_round_trip_and_no_overwrite(tmp_path, weights, capsys):
    from safetensors.torch import load_file

    src_path, sd = weights[("mobilenetv2", True)]
    out = tmp_path / "bmv2.safetensors"
    assert cli_main(["convert", "bmv2", str(src_path), str(out)]) == 0
    assert '"backbone": "mobilenetv2"' in capsys.readouterr().out
    back = load_file(str(out))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    stamp = (out.stat().st_mtime_ns, out.read_bytes())
    assert cli_main(["convert", "bmv2", str(src_path), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out.stat().st_mtime_ns, out.read_bytes()) == stamp
    assert cli_main(["convert", "bmv2", str(src_path), str(out), "--overwrite"]) == 0
    a, b = BM.load_bmv2(src_path), BM.load_bmv2(out)
    src, bgr = _pair(32, 48)
    assert all(torch.equal(x, y) for x, y in zip(a(src, bgr), b(src, bgr)))
    assert cli_main(["convert", "bmv2", str(tmp_path / "none.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert not os.path.exists(tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------- image wrapper
def test_refine_with_bmv2_pads_odd_sizes_and_crops_back(weights):
    model = BM.load_bmv2(weights[("mobilenetv2", True)][0])
    g = torch.Generator().manual_seed(3)
    H, W = 45, 61
    plate = torch.rand(1, H, W, 3, generator=g) * 0.2 + torch.tensor([0.1, 0.7, 0.2])
    image = plate.expand(2, -1, -1, -1).clone()
    image[0, 10:30, 15:40] = torch.rand(20, 25, 3, generator=g)
    image[1, 5:20, 30:55] = 0.9
    alpha, fg = BM.refine_with_bmv2(model, image, plate, backbone_scale=0.5, sample_pixels=2000)
    assert alpha.shape == (2, H, W) and fg.shape == (2, H, W, 3)
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1 and float(fg.min()) >= 0 and float(fg.max()) <= 1
    for i in range(2):  # = the network on the edge-replicated 48x64 frame, cropped
        pad = lambda t: F.pad(t.permute(0, 3, 1, 2), (0, 3, 0, 3), mode="replicate").contiguous()  # noqa: E731
        pha, fgr = model(pad(image[i:i + 1]), pad(plate), backbone_scale=0.5, sample_pixels=2000)[:2]
        assert pha.shape[-2:] == (48, 64)
        assert torch.equal(alpha[i], pha[0, 0, :H, :W]) and torch.equal(fg[i], fgr[0, :, :H, :W].permute(1, 2, 0))
    with pytest.raises(UserError, match="differ in size"):
        BM.refine_with_bmv2(model, image, plate[:, :40])


def test_auto_settings_follow_the_authors_hd_and_4k_advice():
    assert BM.auto_backbone_scale(1080, 1920) == 0.25 and BM.auto_sample_pixels(1080, 1920) == 80_000
    assert BM.auto_backbone_scale(2160, 3840) == 0.125 and BM.auto_sample_pixels(2160, 3840) == 320_000
    assert BM.auto_backbone_scale(512, 768) == 0.5 and BM.auto_sample_pixels(512, 768) == 80_000


def test_base_model_runs_through_the_wrapper(weights):
    model = BM.load_bmv2(weights[("mobilenetv2", False)][0])
    src, bgr = _pair(37, 50)
    alpha, fg = BM.refine_with_bmv2(model, src.permute(0, 2, 3, 1), bgr.permute(0, 2, 3, 1))
    pha, fgr = model(src.contiguous(), bgr.contiguous())[:2]  # MattingBase: any size, no padding
    assert torch.equal(alpha, pha[:, 0]) and torch.equal(fg, fgr.permute(0, 2, 3, 1))


def test_garbage_matte_bound():
    mask = torch.zeros(1, 300, 500)
    mask[:, 100:200, 150:300] = 1.0
    bound = BM.garbage_matte_bound(mask)
    assert bound.shape == mask.shape
    assert torch.all(bound[:, 100:200, 150:300] == 1.0)   # inside the mask: unbounded
    assert torch.all(bound[:, :60] == 0) and torch.all(bound[:, :, 400:] == 0)  # far outside: alpha 0
    margin = round(0.02 * math.hypot(150, 250)) * 2       # dilation at the 2x-reduced working size
    assert float(bound[0, 150, 300 + margin - 3]) > 0.5 and float(bound[0, 150, 300 + margin + 4]) < 0.5
