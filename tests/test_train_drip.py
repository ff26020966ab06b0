"""DRIP training toolkit (tier 1): data pipeline, noise, a real (tiny) training run on CPU, export,
resume and the CLI. The codec is the testing-only pooling codec (no SD VAE weights here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from diffusion_matting.py import train_drip as T  # noqa: E402
from diffusion_matting.py.cli import main as cli_main  # noqa: E402
from diffusion_matting.py.drip import model as M  # noqa: E402
from diffusion_matting.py.drip.checkpoint import load_drip, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def items():
    return T.prepare_items(T.procedural_items(12, size=64, seed=0), pad_iterations=20)


def test_make_batch_composites_exactly(items):
    rng = np.random.default_rng(0)
    image, tri, fg, alpha = T.make_batch(items, 6, 32, rng, jitter=0.0, trimap_px=(16, 48))
    assert image.shape == (6, 3, 32, 32) and tri.shape == alpha.shape == (6, 1, 32, 32) and fg.shape == image.shape
    # I = a F + (1 - a) B  =>  where alpha = 1 the image is the foreground
    opaque = alpha[:, 0] > 0.999
    assert opaque.any()
    assert (image.permute(0, 2, 3, 1)[opaque] - fg.permute(0, 2, 3, 1)[opaque]).abs().max() < 1e-2
    # trimap: every fractional alpha pixel is unknown; definite regions agree with alpha
    frac = (alpha > 0.01) & (alpha < 0.99)
    assert torch.all(tri[frac] == 0.5)
    assert torch.all(alpha[tri == 1.0] > 0.99) and torch.all(alpha[tri == 0.0] < 0.01)
    assert set(torch.unique(tri).tolist()) <= {0.0, 0.5, 1.0}


def test_foreground_padding_fills_undefined_colour():
    """Where alpha = 0 the foreground colour is undefined: prepare_items bleeds the defined colour into it
    and leaves defined pixels untouched."""
    rng = np.random.default_rng(0)
    fg = rng.uniform(0, 1, size=(16, 16, 3)).astype(np.float32)
    fg[:, :8] = (0.9, 0.1, 0.2)
    alpha = np.zeros((16, 16), np.float32)
    alpha[:, :8] = 1.0
    it = T.prepare_items([T.MatteItem(fg, alpha, "half")], pad_iterations=30)[0]
    assert torch.equal(it.fg[:, :, :8], torch.from_numpy(fg[:, :8]).permute(2, 0, 1))
    assert (it.fg[:, :, 8:] - torch.tensor([0.9, 0.1, 0.2]).view(3, 1, 1)).abs().max() < 1e-3


def test_multires_noise_is_annealed_and_normalised():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 999])
    n = T.multires_noise((2, 4, 32, 32), t, 1000, 0.9, generator=g)
    assert torch.allclose(n.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)

    def lowfreq(x):  # energy of the 4x4-pooled noise: white noise ~ 1/16
        return torch.nn.functional.avg_pool2d(x, 8).pow(2).mean().item()

    assert lowfreq(n[1:]) > 3 * lowfreq(n[:1])   # t = 999: strong low-frequency component
    white = T.multires_noise((1, 4, 32, 32), torch.tensor([500]), 1000, 0.0, generator=g)
    assert abs(lowfreq(white) - 1 / 64) < 0.02


@pytest.mark.slow
def test_tiny_drip_learns_matting(tmp_path, items):
    """A tiny SD2-architecture DRIP (v-prediction) trained 100 steps on procedural composites beats its
    untrained self and a constant-alpha baseline on held-out SAD by a wide margin, and the export loads."""
    torch.manual_seed(0)
    unet = M.convert_base_to_drip(M.build_unet(M.base_config("sd2", tiny=True)))
    emb = torch.randn(1, 77, 1024) * 0.5
    cfg = T.DRIPTrainConfig(steps=100, batch_size=4, lr=2e-3, resolution=32, prediction_type="v_prediction",
                            log_every=25, save_every=10 ** 6, val_count=6, val_steps=5, val_sampler="euler", seed=0)
    res = T.train_drip(unet, T.PoolCodec(4), emb, items[:10], items[10:], cfg, tmp_path, "sd2", log=lambda *a: None)
    init, final, const = res["initial"]["sad"], res["final"]["sad"], res["constant_baseline"]
    assert final < 0.75 * init and final < 0.75 * const, (init, final, const)
    assert res["final"]["fg_mse"] < 0.75 * res["initial"]["fg_mse"]
    assert np.mean(res["losses"][-20:]) < 0.8 * np.mean(res["losses"][:20])
    ck = load_drip(res["export"])
    assert ck.base_family == "sd2" and ck.prediction_type == "v_prediction"
    assert read_metadata(res["export"])["codec"] == "toy-pool4"
    sd = unet.state_dict()
    exported = ck.diffusers_state_dict()
    assert all(torch.allclose(exported[k].float(), sd[k].float(), atol=1e-2) for k in sd)  # fp16 export
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["final"]["sad"] == pytest.approx(final)


def test_resume_continues(tmp_path, items):
    torch.manual_seed(0)
    cfg = T.DRIPTrainConfig(steps=2, batch_size=2, lr=1e-3, resolution=32, log_every=1, save_every=1,
                            val_count=1, val_steps=1, val_sampler="euler")
    quiet = dict(log=lambda *a: None)
    unet = M.convert_base_to_drip(M.build_unet(M.base_config("sd15", tiny=True)))
    emb = torch.zeros(1, 77, 768)
    T.train_drip(unet, T.PoolCodec(4), emb, items[:4], items[4:5], cfg, tmp_path, "sd15", **quiet)
    state = torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    unet2 = M.convert_base_to_drip(M.build_unet(M.base_config("sd15", tiny=True)))
    cfg.steps = 3
    res = T.train_drip(unet2, T.PoolCodec(4), emb, items[:4], items[4:5], cfg, tmp_path, "sd15", resume="auto", **quiet)
    assert res["step"] == 3 and len(res["losses"]) == 1
    with pytest.raises(T.UserError):
        T.train_drip(unet2, T.PoolCodec(4), emb, items[:4], items[4:5], cfg, tmp_path / "none", "sd15",
                     resume="auto", **quiet)


def test_cli_init_only_and_bad_input(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli_main(["train", "drip", "--base", "tiny-sd15", "--vae", "toy", "--init-only", "--out", str(out),
                   "--export-layout", "ldm"])
    assert rc == 0
    ck = load_drip(out / "drip.safetensors")
    assert ck.layout == "ldm" and ck.base_family == "sd15" and ck.prediction_type == "epsilon"
    assert "input_blocks.0.0.weight" in ck.unet and ck.unet["input_blocks.0.0.weight"].shape[1] == 12
    assert cli_main(["train", "drip", "--base", "tiny-sd15", "--vae", "toy", "--out", str(out), "--steps", "0"]) == 2
    assert cli_main(["train", "drip", "--base", str(tmp_path / "missing.safetensors"), "--out", str(out),
                     "--text-embedding", "zeros"]) == 2
    assert "no such file" in capsys.readouterr().err
