"""GPU check: the training-free paths on CUDA agree with the CPU, and their time / memory at 4K.

    python benchmarks/bench_gpu.py            # needs a CUDA device; prints JSON

GreenPost and trimap matting on the procedural samples (CUDA vs CPU max abs difference of alpha and
foreground), GreenPost on a 3840x2160 frame, BackgroundMattingV2 (random weights, public layout) at
3840x2160 in sampling mode, each with its best time of a few runs and the peak CUDA memory.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))
if importlib.util.find_spec("diffusion_matting") is None:  # a checkout under another name: link it
    import tempfile

    link = Path(tempfile.mkdtemp()) / "diffusion_matting"
    link.symlink_to(Path(__file__).resolve().parents[1])
    sys.path.insert(0, str(link.parent))

from diffusion_matting.py import background_matting as BM  # noqa: E402
from diffusion_matting.py.greenpost import greenpost  # noqa: E402
from diffusion_matting.py.samples import DEMO_SAMPLES, make_sample  # noqa: E402
from diffusion_matting.py.trimap_matting import matte  # noqa: E402
from diffusion_matting.py.alpha import trimap_from_mask  # noqa: E402


def timed(fn, runs: int = 3) -> tuple[float, float, object]:
    """Best seconds of ``runs`` (after one warm-up), peak CUDA MB of the last run, last result."""
    out = fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, torch.cuda.max_memory_allocated() / 2**20, out


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return
    cuda = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    gp, tm = {}, {}
    for name, kw in DEMO_SAMPLES:
        s = make_sample(**kw)
        img = torch.from_numpy(s.image)[None]
        a_cpu = greenpost(img)
        a_gpu = greenpost(img.to(cuda))
        gp[name] = {"alpha_max_abs_diff": (a_gpu.alpha.cpu() - a_cpu.alpha).abs().max().item(),
                    "fg_max_abs_diff": (a_gpu.foreground.cpu() - a_cpu.foreground).abs().max().item()}
        tri, _ = trimap_from_mask((torch.from_numpy(s.alpha)[None] > 0.5).float(), 6, 6)
        al_c, fg_c, _ = matte(img, tri)
        al_g, fg_g, _ = matte(img.to(cuda), tri.to(cuda))
        tm[name] = {"alpha_max_abs_diff": (al_g.cpu() - al_c).abs().max().item(),
                    "alpha_mean_abs_diff": (al_g.cpu() - al_c).abs().mean().item(),
                    "fg_max_abs_diff": (fg_g.cpu() - fg_c).abs().max().item()}
    res["greenpost_cuda_vs_cpu"] = gp
    res["trimap_matting_cuda_vs_cpu"] = tm

    big = make_sample(height=2160, width=3840, seed=5, style="uneven")
    frame = torch.from_numpy(big.image)[None].to(cuda)
    sec, mb, r = timed(lambda: greenpost(frame))
    alpha_gt = torch.from_numpy(big.alpha).to(cuda)
    res["greenpost_4k"] = {"seconds": round(sec, 4), "peak_cuda_mb": round(mb), "sad": (r.alpha[0] - alpha_gt).abs().sum().item() / 1000}

    tri_big, _ = trimap_from_mask((alpha_gt[None] > 0.5).float(), 10, 10)
    sec, mb, _ = timed(lambda: matte(frame, tri_big, foreground=True), runs=1)
    res["trimap_matting_4k"] = {"seconds": round(sec, 3), "peak_cuda_mb": round(mb),
                                "unknown_px": int(((tri_big > 0.1) & (tri_big < 0.9)).sum())}

    torch.manual_seed(0)
    model = BM.build_bmv2("mobilenetv2").eval().to(cuda)
    plate = r.plate
    with torch.no_grad():
        sec, mb, _ = timed(lambda: BM.refine_with_bmv2(model, frame, plate))
        small = frame[:, :512, :512]
        a_g, f_g = BM.refine_with_bmv2(model, small, plate[:, :512, :512], refine_mode="full")
        a_c, f_c = BM.refine_with_bmv2(model.cpu(), small.cpu(), plate[:, :512, :512].cpu(), refine_mode="full")
    res["bmv2_mobilenetv2_4k_sampling"] = {"seconds": round(sec, 4), "peak_cuda_mb": round(mb)}
    res["bmv2_cuda_vs_cpu_512_full"] = {"alpha_max_abs_diff": (a_g.cpu() - a_c).abs().max().item(),
                                        "fg_max_abs_diff": (f_g.cpu() - f_c).abs().max().item()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
