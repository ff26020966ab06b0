"""DRIP core (tier 1, no ComfyUI): conversion, switcher codes, cross-domain attention, checkpoints,
key layouts and the reference sampler's scheduler mapping. Tiny random-weight UNets of the real SD
architectures; seconds on a CPU."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion_matting.py.drip import attention as AT  # noqa: E402
from diffusion_matting.py.drip import codes as C  # noqa: E402
from diffusion_matting.py.drip import convert as CV  # noqa: E402
from diffusion_matting.py.drip import model as M  # noqa: E402
from diffusion_matting.py.drip import sampling as S  # noqa: E402
from diffusion_matting.py.drip.checkpoint import DRIPFormatError, load_drip, read_metadata, save_drip  # noqa: E402

WIDTH = {"sd15": 768, "sd2": 1024}


@pytest.fixture(scope="module")
def bases():
    torch.manual_seed(0)
    return {f: M.build_unet(M.base_config(f, tiny=True)).eval() for f in ("sd15", "sd2")}


# ------------------------------------------------------------------------------------------ codes
def test_switcher_codes_are_posenc_of_onehot():
    fg, al = C.switcher_code(C.FG), C.switcher_code(C.ALPHA)
    s1, c1 = math.sin(1.0), math.cos(1.0)
    assert torch.allclose(fg, torch.tensor([s1, 0.0, c1, 1.0]))
    assert torch.allclose(al, torch.tensor([0.0, s1, 1.0, c1]))
    tiled = C.tiled_codes(3)
    assert tiled.shape == (6, 4)
    assert torch.equal(tiled[0::2], fg.expand(3, 4)) and torch.equal(tiled[1::2], al.expand(3, 4))
    with pytest.raises(ValueError):
        C.switcher_code(2)


def test_interleave_roundtrip_and_stretch():
    fg, al = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x = C.interleave(fg, al)
    assert torch.equal(x[0], fg[0]) and torch.equal(x[1], al[0]) and torch.equal(x[4], fg[2])
    f2, a2 = C.deinterleave(x)
    assert torch.equal(f2, fg) and torch.equal(a2, al)
    z = torch.randn(3, 8, 2, 2)
    st = C.stretch_pairs(z, 3)
    assert torch.equal(st[0], z[0]) and torch.equal(st[1], z[0]) and torch.equal(st[5], z[2])
    assert torch.equal(C.stretch_pairs(z[:1], 3)[5], z[0])
    with pytest.raises(ValueError):
        C.stretch_pairs(z[:2], 3)
    with pytest.raises(ValueError):
        C.deinterleave(torch.zeros(3, 1))


# ------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("fam", ["sd15", "sd2"])
def test_conv_in_init_reproduces_base(bases, fam):
    """repeat(W, 3)/3 on [z, z, z] == base conv on z; with the zero-initialised switcher projection the
    whole converted UNet computes the base UNet's output for either branch."""
    base = bases[fam]
    drip = M.convert_base_to_drip(base).eval()
    assert drip.config.in_channels == 12 and drip.config.class_embed_type == "projection"
    torch.manual_seed(1)
    z = torch.randn(2, 4, 16, 16)
    emb = torch.randn(1, 77, WIDTH[fam])
    with torch.no_grad():
        want = base(z, torch.tensor([400.0, 400.0]), encoder_hidden_states=emb.expand(2, -1, -1)).sample
        conv = drip.conv_in(torch.cat([z, z, z], 1))
        got_conv = base.conv_in(z)
        pairs = C.interleave(z, z)  # fg and alpha branches see the same latent
        got = M.drip_forward(drip, pairs, 400.0, z, z, emb)
    assert (conv - got_conv).abs().max() < 1e-5
    assert (got[0::2] - want).abs().max() < 1e-4 and (got[1::2] - want).abs().max() < 1e-4
    # a trained switcher makes the branches differ
    with torch.no_grad():
        drip.class_embedding.linear_2.weight.normal_(0, 0.5)
        got2 = M.drip_forward(drip, pairs, 400.0, z, z, emb)
    assert (got2[0::2] - got2[1::2]).abs().max() > 1e-3


def test_drip_config_rejects_non_sd_unets():
    cfg = M.base_config("sd15", tiny=True)
    cfg["down_block_types"] = ["SimpleCrossAttnDownBlock2D"] + cfg["down_block_types"][1:]
    with pytest.raises(CV.LayoutError):
        M.drip_config(cfg)


# -------------------------------------------------------------------------------------- attention
def test_joint_attention_fast_equals_direct():
    torch.manual_seed(2)
    q, k, v = (torch.randn(4, 12, 32) for _ in range(3))
    assert (AT.joint_attention(q, k, v, 4) - AT.joint_attention_direct(q, k, v, 4)).abs().max() < 1e-5
    with pytest.raises(ValueError):
        AT.joint_attention(q[:3], k[:3], v[:3], 4)


def test_cross_domain_processor_equals_direct_computation():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(3)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    h = torch.randn(4, 10, 32)
    attn.set_processor(AT.CrossDomainAttnProcessor())
    with torch.no_grad():
        got = attn(h)
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        want = attn.to_out[0](AT.joint_attention_direct(q, k, v, 4))
    assert (got - want).abs().max() < 1e-5


def test_cross_domain_couples_only_the_pair(bases):
    """With cross-domain attention the fg output of pair 0 depends on its alpha partner, never on pair 1;
    without it the branches are independent."""
    drip = M.convert_base_to_drip(bases["sd15"]).eval()
    torch.manual_seed(4)
    x = torch.randn(4, 4, 16, 16)
    zi, zt = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    emb = torch.randn(1, 77, 768)
    x2 = x.clone()
    x2[1] += torch.randn(4, 16, 16)   # change alpha of pair 0
    x3 = x.clone()
    x3[2:] += torch.randn(2, 4, 16, 16)  # change pair 1
    assert AT.set_cross_domain(drip, True) == 10
    assert AT.cross_domain_enabled(drip)
    with torch.no_grad():
        a, b, c = (M.drip_forward(drip, t, 500.0, zi, zt, emb) for t in (x, x2, x3))
        AT.set_cross_domain(drip, False)
        d, e = (M.drip_forward(drip, t, 500.0, zi, zt, emb) for t in (x, x2))
    assert (a[0] - b[0]).abs().max() > 1e-4          # partner matters with cross-domain attention
    assert (a[:2] - c[:2]).abs().max() < 1e-5        # other samples never do
    assert (d[0] - e[0]).abs().max() < 1e-5          # branches independent without it
    assert (a[0] - d[0]).abs().max() > 1e-4


def test_cross_domain_context_restores_processors(bases):
    drip = M.convert_base_to_drip(bases["sd2"])
    before = {n: type(m.processor) for n, m in AT.attn1_modules(drip).items()}
    with AT.cross_domain(drip, True):
        assert AT.cross_domain_enabled(drip)
    assert {n: type(m.processor) for n, m in AT.attn1_modules(drip).items()} == before


# ------------------------------------------------------------------------------------ key layouts
SD15_LDM_KEYS = [  # names every SD1.x checkpoint has (model.diffusion_model. stripped)
    "input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "input_blocks.11.0.out_layers.3.weight",
    "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight",
    "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "output_blocks.11.1.proj_out.bias",
    "time_embed.2.weight", "out.0.weight", "out.2.bias",
]


@pytest.mark.parametrize("fam", ["sd15", "sd2"])
def test_full_size_key_layout(fam):
    """Real SD1.5/SD2 UNets (built on the meta device): diffusers -> LDM gives the well-known checkpoint
    names, 1:1, and LDM -> diffusers inverts it; the head rule matches ComfyUI's SD configs."""
    from diffusers import UNet2DConditionModel

    cfg = M.drip_config(M.base_config(fam))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    sd = unet.state_dict()
    ldm = CV.diffusers_to_ldm(sd, cfg)
    assert len(ldm) == len(sd) == 686 + 4  # the 686 tensors of an SD1.x/2.x UNet + the switcher projection
    for k in SD15_LDM_KEYS:
        assert k in ldm, k
    assert "label_emb.0.0.weight" in ldm and "label_emb.0.2.bias" in ldm
    back = CV.ldm_to_diffusers(ldm, cfg)
    assert set(back) == set(sd)
    assert CV.comfy_head_config(cfg) == ({"num_heads": 8, "num_head_channels": -1} if fam == "sd15"
                                         else {"num_heads": -1, "num_head_channels": 64})


def test_tiny_key_roundtrip_keeps_tensors(bases):
    drip = M.convert_base_to_drip(bases["sd2"])
    sd = drip.state_dict()
    back = CV.ldm_to_diffusers(CV.diffusers_to_ldm(sd, drip.config), drip.config)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_save_load_roundtrip(tmp_path, bases, layout):
    drip = M.convert_base_to_drip(bases["sd2"])
    emb = torch.randn(1, 77, 1024)
    p = tmp_path / f"d_{layout}.safetensors"
    save_drip(p, drip.state_dict(), drip.config, base_family="sd2", prediction_type="v_prediction",
              text_embedding=emb, layout=layout)
    meta = read_metadata(p)
    assert meta["format"] == "drip" and meta["layout"] == layout and meta["in_channels"] == "12"
    ck = load_drip(p)
    assert ck.base_family == "sd2" and ck.prediction_type == "v_prediction" and ck.layout == layout
    assert torch.equal(ck.text_embedding, emb)
    sd = ck.diffusers_state_dict()
    ref = drip.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    rebuilt = M.build_unet(ck.config)
    rebuilt.load_state_dict(sd)  # strict


def test_load_rejects_bad_files(tmp_path, bases):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(plain))
    with pytest.raises(DRIPFormatError, match="not a DRIP checkpoint"):
        load_drip(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DRIPFormatError, match="not a safetensors file"):
        load_drip(junk)
    drip = M.convert_base_to_drip(bases["sd15"])
    p = tmp_path / "d.safetensors"
    save_drip(p, drip.state_dict(), drip.config, base_family="sd15", prediction_type="epsilon",
              text_embedding=torch.zeros(1, 77, 768))
    from safetensors.torch import load_file
    t = load_file(str(p))
    meta = read_metadata(p)
    t.pop("drip.text_embedding")
    save_file(t, str(tmp_path / "noemb.safetensors"), metadata=meta)
    with pytest.raises(DRIPFormatError, match="text embedding"):
        load_drip(tmp_path / "noemb.safetensors")
    save_file(load_file(str(p)), str(tmp_path / "fam.safetensors"), metadata={**meta, "base_family": "sdxl"})
    with pytest.raises(DRIPFormatError, match="unsupported base family 'sdxl'"):
        load_drip(tmp_path / "fam.safetensors")
    save_file(load_file(str(p)), str(tmp_path / "fam2.safetensors"), metadata={**meta, "base_family": "sd2"})
    with pytest.raises(DRIPFormatError, match="cross-attention width is 768"):
        load_drip(tmp_path / "fam2.safetensors")
    with pytest.raises(ValueError):  # a base (4-channel) UNet is not a DRIP UNet
        save_drip(tmp_path / "x.safetensors", bases["sd15"].state_dict(), bases["sd15"].config,
                  base_family="sd15", prediction_type="epsilon", text_embedding=torch.zeros(1, 77, 768))


# -------------------------------------------------------------------------------------- sampling
def test_comfy_equivalent_schedulers():
    """ComfyUI 'simple' timesteps 999, 899, ... == diffusers trailing; deterministic DDIM == Euler."""
    for name in S.COMFY_EQUIVALENT:
        sch = S.make_scheduler(name)
        sch.set_timesteps(10)
        assert [int(t) for t in sch.timesteps] == list(range(999, 0, -100)), name
    assert S.steps_match_comfy(10) and S.steps_match_comfy(25) and not S.steps_match_comfy(3)


def test_reference_sampler_euler_equals_ddim(bases):
    """Two independent diffusers schedulers that are the same ODE method give the same DRIP samples."""
    drip = M.convert_base_to_drip(bases["sd15"]).eval()
    with torch.no_grad():
        drip.class_embedding.linear_2.weight.normal_(0, 0.2)
    torch.manual_seed(5)
    zi, zt = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16)
    emb = torch.randn(1, 77, 768) * 0.5
    outs = [S.drip_sample_reference(drip, zi, zt, noise, S.make_scheduler(n), 4, emb) for n in ("euler", "ddim")]
    (f1, a1), (f2, a2) = outs
    assert f1.shape == (1, 4, 16, 16)
    scale = max(f1.abs().max().item(), a1.abs().max().item())
    assert max((f1 - f2).abs().max().item(), (a1 - a2).abs().max().item()) < 1e-4 * scale
    assert (f1 - a1).abs().max() > 1e-3  # the two branches differ
    with pytest.raises(ValueError):
        S.drip_sample_reference(drip, zi, zt, noise[:1], S.make_scheduler("euler"), 4, emb)
