"""DiffuMatting training toolkit (tier 1): losses against direct computations, the attention-recording
processor, a training step with all losses, L_g falling on the procedural green set, resume == uninterrupted,
export round trip, and the Green100K-style data-set builder. Tiny real-architecture models (diffusers
UNet2DConditionModel in the SD1.5/SD2 layouts, AutoencoderKL) with random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from diffusion_matting.py import diffumatting_losses as L  # noqa: E402
from diffusion_matting.py import train_diffumatting as TD  # noqa: E402
from diffusion_matting.py.cli import main as cli_main  # noqa: E402
from diffusion_matting.py.diffumatting_export import load_unet_file, merged_unet_state_dict  # noqa: E402
from diffusion_matting.py.drip import model as M  # noqa: E402
from diffusion_matting.py.green_dataset import GreenFolder, ProceduralGreen, fixed_batch, make_batch  # noqa: E402
from diffusion_matting.py.matting_head import load_matting_head  # noqa: E402
from diffusion_matting.py.train_drip import VAECodec  # noqa: E402

RES = 16  # pixels; the tiny VAE downsamples 2x -> 8x8 latents


def _unet(fam="sd15", seed=0):
    torch.manual_seed(seed)
    return M.build_unet(M.base_config(fam, tiny=True))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models here run thousands of microsecond-sized ops: intra-op threads only add sync cost, and on
    a shared 2-core machine their spin-waiting made this file 10x slower (230 s vs 17 s for the L_g run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return ProceduralGreen(10, size=64, seed=0)


# ----------------------------------------------------------------------------------------- losses
def test_x0_estimate_and_targets_invert_the_forward_process():
    sched = TD._noise_schedule("epsilon")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    xt = sched.add_noise(x0, eps, t)
    ac = sched.alphas_cumprod
    assert torch.allclose(L.predicted_x0(xt, eps, ac, t, "epsilon"), x0, atol=1e-4)
    v = L.diffusion_target(x0, eps, ac, t, "v_prediction")
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-5)   # diffusers' own v
    assert torch.allclose(L.predicted_x0(xt, v, ac, t, "v_prediction"), x0, atol=1e-4)
    assert L.noise_loss(eps, eps) == 0 and torch.isclose(L.noise_loss(eps + 0.5, eps), torch.tensor(0.25))


def test_sobel_detail_term_matches_hand_computation():
    from scipy.ndimage import correlate

    img = torch.tensor([[[[0., 1, 2, 3], [1, 3, 5, 7], [0, 0, 1, 1], [2, 2, 2, 9]]]])
    mask = torch.ones(1, 1, 4, 4)
    gx, gy = L.sobel(img)
    # interior pixel (1, 1): Sx = (2 + 2*5 + 1) - (0 + 2*1 + 0) = 11; Sy = (0 + 2*0 + 1) - (0 + 2*1 + 2) = -3
    assert gx[0, 0, 1, 1] == 11 and gy[0, 0, 1, 1] == -3
    H = L.sobel_high_frequency(img, mask)
    assert H[0, 0, 1, 1] == (11 - 3) * 3                      # (I*Sx + I*Sy) . I . M at a pixel of value 3
    # whole image against scipy's correlate with replicated borders (an independent implementation)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 9, 7)).astype(np.float32)
    m = (rng.uniform(size=(2, 1, 9, 7)) > 0.4).astype(np.float32)
    y = rng.normal(size=x.shape).astype(np.float32)
    sx = L.SOBEL_X.numpy()

    def h(a):
        out = np.zeros_like(a)
        for b in range(a.shape[0]):
            for c in range(a.shape[1]):
                r = correlate(a[b, c], sx, mode="nearest") + correlate(a[b, c], sx.T, mode="nearest")
                out[b, c] = r * a[b, c] * m[b, 0]
        return out

    want = np.mean((h(y) - h(x)) ** 2)
    got = L.detail_loss(torch.from_numpy(y), torch.from_numpy(x), torch.from_numpy(m))
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert L.detail_loss(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(m)) == 0
    l1 = L.detail_loss(torch.from_numpy(y), torch.from_numpy(x), torch.from_numpy(m), norm="l1")
    assert l1.item() == pytest.approx(np.mean(np.abs(h(y) - h(x))), rel=1e-5)


def test_green_attention_loss_direct():
    g = torch.Generator().manual_seed(1)
    alpha = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    assert L.green_attention_loss(1 - alpha[:, 0], alpha) == 0          # the map is the background mask
    a = torch.rand(3, 4, 4, generator=g)                                 # coarser map: bilinear-resized up
    up = F.interpolate(a[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    per = ((up - (1 - alpha[:, 0])) ** 2).mean((1, 2))
    assert L.green_attention_loss(a, alpha).item() == pytest.approx(per.mean().item(), rel=1e-6)
    valid = torch.tensor([True, False, True])
    assert L.green_attention_loss(a, alpha, valid).item() == pytest.approx(per[[0, 2]].mean().item(), rel=1e-6)


@pytest.mark.parametrize("fam", ["sd15", "sd2"])
def test_recording_processor_is_exact_and_sees_every_cross_attention_layer(fam):
    unet = _unet(fam).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    emb = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb).sample
    store = L.install_attention_recorder(unet)
    n_cross = sum(1 for n in unet.attn_processors if n.endswith("attn2.processor"))
    store.begin(torch.ones(2, 16), (8, 8))                   # all tokens: probabilities sum to 1 everywhere
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=emb).sample
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()   # same maths as SDPA, float32 rounding apart
    assert len(store.maps) == n_cross >= 7
    assert {tuple(m.shape[-2:]) for m in store.maps} == {(8, 8), (4, 4), (2, 2), (1, 1)}
    assert torch.allclose(store.mean_map(), torch.ones(2, 8, 8), atol=1e-5)
    # one token: the recorded map is that column of the softmax, so it lies in (0, 1) and differs per sample
    mask = torch.zeros(2, 16)
    mask[:, 3] = 1
    store.begin(mask, (8, 8))
    unet(x, t, encoder_hidden_states=emb)
    m = store.mean_map()
    assert 0 < m.min() and m.max() < 1 and not torch.allclose(m[0], m[1])
    # L_g's gradient reaches the cross-attention keys
    L.green_attention_loss(m, torch.zeros(2, 1, 8, 8)).backward()
    k = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert k.grad is not None and k.grad.abs().sum() > 0


def test_attention_loss_gradient_is_unchanged_by_gradient_checkpointing():
    """Checkpointing re-runs the forward during backward; the processors must do the same ops both times."""
    def grads(checkpointing):
        unet = _unet()
        store = L.install_attention_recorder(unet)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        g = torch.Generator().manual_seed(1)
        x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 768, generator=g)
        mask = torch.zeros(2, 16)
        mask[:, 3] = 1
        store.begin(mask, (8, 8))
        out = unet(x, torch.tensor([5, 500]), encoder_hidden_states=emb).sample
        store.stop()
        (L.green_attention_loss(store.mean_map(), torch.zeros(2, 1, 8, 8)) + out.pow(2).mean()).backward()
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad

    plain, ckpt = grads(False), grads(True)
    assert plain.abs().max() > 0 and torch.allclose(plain, ckpt, atol=1e-7)


# ------------------------------------------------------------------------------------------ training
def test_training_step_with_all_losses_updates_unet_and_head(data):
    unet, vae = _unet(), TD.tiny_vae()
    codec = VAECodec(vae)
    store = L.install_attention_recorder(unet)
    head = TD.MattingHead(TD.MattingHeadConfig(in_channels=vae.decoder.conv_norm_out.num_channels))
    text = TD.HashTextEncoder(768)
    cfg = TD.DiffuMattingConfig(resolution=RES)
    images, alpha, caps = make_batch(data, 3, RES, np.random.default_rng(0))
    emb, key = text.encode(caps)
    assert key.sum(1).tolist() == [1.0, 1.0, 1.0]            # every caption names "green" once
    t = torch.tensor([50, 200, 400])
    noise = torch.randn(3, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    for space in ("latent", "pixel"):
        cfg.detail_space = space
        terms = TD.compute_losses(unet, codec, head, store, TD._noise_schedule("epsilon"), images, alpha, emb, key,
                                  t, noise, cfg, joint=True)
        assert set(terms) == {"loss", "noise", "green", "detail", "latent"}
        assert all(torch.isfinite(v) for v in terms.values())
        total = sum(getattr(cfg, f"w_{k}") * v for k, v in terms.items() if k != "loss")
        assert torch.isclose(terms["loss"], total)
    # L_latent alone reaches the UNet through the frozen decoder (joint stage) and trains the head
    unet.zero_grad()
    terms["latent"].backward(retain_graph=True)
    assert unet.conv_out.weight.grad.abs().sum() > 0 and head.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())
    before = {k: v.clone() for k, v in list(unet.state_dict().items()) + list(head.state_dict().items())}
    opt = torch.optim.AdamW(list(unet.parameters()) + list(head.parameters()), 1e-3)
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    after = dict(list(unet.state_dict().items()) + list(head.state_dict().items()))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "conv_out.weight" in changed and "conv1.weight" in changed
    assert any("attn2.to_k" in k for k in changed)
    # generation stage: no head loss; timesteps past the cut-offs: no detail term
    terms = TD.compute_losses(unet, codec, head, store, TD._noise_schedule("epsilon"), images, alpha, emb, key,
                              torch.tensor([600, 700, 999]), noise, cfg, joint=False)
    assert set(terms) == {"loss", "noise", "green"}


def test_green_loss_falls_on_the_toy_set(data):
    """60 steps (L_noise + L_g, lr 1e-3, batch 2): L_g on a fixed held-out batch falls to < 15 % of its
    start and below the best spatially constant map (which only raising the token's attention everywhere
    could reach), i.e. the map learns *where* the background is. (benchmarks/bench_train_diffumatting.py
    runs the few-hundred-step version with all losses.)"""
    unet, vae = _unet(), TD.tiny_vae()
    codec, text = VAECodec(vae), TD.HashTextEncoder(768)
    store = L.install_attention_recorder(unet)
    cfg = TD.DiffuMattingConfig(resolution=RES, use_detail=False, use_latent=False)
    sched = TD._noise_schedule("epsilon")
    opt = torch.optim.AdamW(unet.parameters(), 1e-3)
    vi, va, vc = fixed_batch(data, 6, RES, 5)
    ve, vk = text.encode(vc)
    g = torch.Generator().manual_seed(9)
    vt, vn = torch.randint(0, 1000, (6,), generator=g), torch.randn(6, 4, RES // 2, RES // 2, generator=g)

    def held_out():
        with torch.no_grad():
            return float(TD.compute_losses(unet, codec, None, store, sched, vi, va, ve, vk, vt, vn, cfg, False)["green"])

    start = held_out()
    for i in range(60):
        im, al, caps = make_batch(data, 2, RES, np.random.default_rng(i))
        emb, key = text.encode(caps)
        t, n = torch.randint(0, 1000, (2,), generator=g), torch.randn(2, 4, RES // 2, RES // 2, generator=g)
        TD.compute_losses(unet, codec, None, store, sched, im, al, emb, key, t, n, cfg, False)["loss"].backward()
        opt.step()
        opt.zero_grad()
    end = held_out()
    bg = 1 - F.interpolate(va, size=(RES // 2, RES // 2), mode="area")[:, 0]
    best_constant = float(((bg - bg.mean((1, 2), keepdim=True)) ** 2).mean())
    assert end < 0.15 * start and end < 0.9 * best_constant, (start, end, best_constant)


def _cfg(**kw):
    base = dict(steps=4, stage1_steps=2, batch_size=2, lr=1e-3, head_lr=1e-3, resolution=RES, log_every=1,
                save_every=2, val_count=1, val_steps=1, seed=3)
    base.update(kw)
    return TD.DiffuMattingConfig(**base)


def test_resume_equals_uninterrupted(tmp_path, data):
    quiet = dict(log=lambda *a: None, export={"dtype": torch.float32})
    text = TD.HashTextEncoder(768)
    a = TD.train_diffumatting(_unet(), TD.tiny_vae(), text, data, data, _cfg(), tmp_path / "a", **quiet)
    TD.train_diffumatting(_unet(), TD.tiny_vae(), text, data, data, _cfg(steps=2, validate=False), tmp_path / "b",
                          **quiet)
    b = TD.train_diffumatting(_unet(), TD.tiny_vae(), text, data, data, _cfg(validate=False), tmp_path / "b",
                              resume="auto", **quiet)
    assert [r["loss"] for r in a["losses"][2:]] == pytest.approx([r["loss"] for r in b["losses"]], rel=1e-5)
    assert "latent" not in a["losses"][1] and "latent" in a["losses"][2]     # stage 2 starts at step 2
    ua, _ = load_unet_file(a["export"]["unet"])
    ub, _ = load_unet_file(b["export"]["unet"])
    u0 = _unet().state_dict()
    assert max((ua[k] - ub[k]).abs().max().item() for k in ua) < 1e-5
    assert max((ua[k] - u0[k]).abs().max().item() for k in ua) > 1e-4    # and training did change it
    ha, _ = load_matting_head(a["export"]["head"])
    hb, _ = load_matting_head(b["export"]["head"])
    assert all(torch.allclose(ha.state_dict()[k], hb.state_dict()[k], atol=1e-5) for k in ha.state_dict())
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 4 and log[-1]["val"] == a["final"]
    assert {"gsg", "gsg_data", "gsg_vae_recon", "green_loss", "head"} <= set(a["final"])
    assert 0 <= a["final"]["head"]["iou"] <= 1 and a["final"]["green_loss"] < a["initial"]["green_loss"]
    with pytest.raises(TD.UserError):
        TD.train_diffumatting(_unet(), TD.tiny_vae(), text, data, data, _cfg(validate=False), tmp_path / "none",
                              resume="auto", **quiet)


def test_lora_export_round_trip(tmp_path):
    from diffusion_matting.py.diffumatting_export import save_checkpoint_file, save_unet_file

    unet = _unet("sd2")
    params = TD.apply_lora(unet, rank=4, alpha=8)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if ".down." not in n and ".up." not in n)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 800])
    emb = torch.randn(2, 16, 1024, generator=g)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=emb).sample
    sd = merged_unet_state_dict(unet)
    plain = _unet("sd2", seed=11)
    assert set(sd) == set(plain.state_dict())
    save_unet_file(tmp_path / "u.safetensors", sd, plain.config)
    save_checkpoint_file(tmp_path / "c.safetensors", sd, plain.config, TD.tiny_vae().state_dict())
    for f in ("u.safetensors", "c.safetensors"):
        loaded, config = load_unet_file(tmp_path / f)
        fresh = M.build_unet(config)
        fresh.load_state_dict(loaded)
        with torch.no_grad():
            got = fresh(x, t, encoder_hidden_states=emb).sample
        assert (got - want).abs().max() < 1e-4
    from safetensors import safe_open
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys and "out.2.weight" in keys
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)


# ---------------------------------------------------------------------------------------- data + CLI
def test_green_canvas_dataset_cli_and_reader(tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"source": "procedural-0", "caption": "a red kite"}) + "\n"
                    + json.dumps({"caption": "a (pure green background:1.2) lamp"}) + "\n")
    out = tmp_path / "ds"
    args = ["dataset", "green-canvas", "--procedural", "2", "--per-item", "2", "--size", "48", "--captions",
            str(caps), "--out", str(out)]
    assert cli_main(args) == 0
    assert cli_main(args + ["--seed", "1"]) == 0          # appends; never overwrites
    recs = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in recs] == [f"{i:06d}" for i in range(8)]
    assert recs[0]["caption"] == "a red kite, pure green background"
    assert recs[2]["caption"] == "a (pure green background:1.2) lamp"
    from diffusion_matting.py.imageio import load_image, load_mask
    for r in recs[:2]:
        img = load_image(out / r["image"])[0][0]
        fg = load_image(out / r["fg"])[0][0]
        a = load_mask(out / r["alpha"])[0][..., None]
        comp = a * fg + (1 - a) * torch.tensor([0.0, 1.0, 0.0])
        assert (img - comp).abs().max() < 3 / 255 and 0.02 < a.mean() < 0.9
    ds = GreenFolder(out)
    assert len(ds) == 8
    img, al, cap = ds.load(0, 32, np.random.default_rng(0))
    assert img.shape == (3, 32, 32) and al.shape == (1, 32, 32) and "green" in cap
    assert cli_main(["dataset", "green-canvas", "--out", str(tmp_path / "x")]) == 2     # nothing to composite


def test_cli_train_tiny(tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["train", "diffumatting", "--base", "tiny-sd15", "--vae", "tiny", "--procedural", "6",
                   "--out", str(out), "--steps", "2", "--stage1-steps", "1", "--batch-size", "2", "--resolution",
                   "16", "--val-steps", "1", "--val-count", "1", "--lora-rank", "2", "--ema", "--export-dtype",
                   "float32"])
    assert rc == 0
    for f in ("diffumatting_unet.safetensors", "diffumatting.safetensors", "matting_head.safetensors",
              "checkpoint/train_state.pt", "log.jsonl"):
        assert (out / f).is_file(), f
    head, info = load_matting_head(out / "matting_head.safetensors")
    assert head.config.in_channels == 32 and info.metadata["latent_channels"] == "4"
    assert cli_main(["train", "diffumatting", "--base", "tiny-sd15", "--vae", "tiny", "--out", str(out),
                     "--resolution", "20"]) == 2


def test_clip_text_encoder_marks_every_subtoken_of_the_key_word(tmp_path):
    """transformers CLIP (when installed): a tiny random encoder and a tiny BPE vocabulary written here."""
    transformers = pytest.importorskip("transformers")
    words = ["a", "red", "kite", "pure", "green", "background", "lamp", ","]
    vocab: dict[str, int] = {}
    for c in sorted(set("".join(words))):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in words:                      # left-to-right merges: each word ends up as one or more pieces
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merges.append(f"{toks[0]} {toks[1]}")
            vocab.setdefault(toks[0] + toks[1], len(vocab))
            toks = [toks[0] + toks[1]] + toks[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                                     str(tmp_path / "tokenizer" / "merges.txt"), model_max_length=24)
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                      pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    transformers.CLIPTextModel(cfg).save_pretrained(str(tmp_path / "text_encoder"))
    enc = TD.ClipTextEncoder(tmp_path)
    caps = ["a red kite, pure green background", "a lamp"]
    emb, mask = enc.encode(caps)
    assert emb.shape == (2, 24, 64) and enc.width == 64
    ids = tok(caps[0]).input_ids
    key = tok("green", add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(key)] == key)
    want = torch.zeros(24)
    want[start:start + len(key)] = 1
    assert torch.equal(mask[0], want) and mask[1].sum() == 0
