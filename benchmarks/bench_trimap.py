"""Trimap matting benchmark: ours (matrix-free closed form + multilevel foreground, torch) vs pymatting
(``estimate_alpha_cf`` + ``estimate_foreground_ml``), end to end on the same inputs. Prints JSON.

* Dev cases: ``--data`` (default ``<repo>/../shared/data/trimap``), ``<case>/{image,alpha,trimap}.png``;
  metrics over the trimap's unknown region (DIM conventions, ``diffusion_matting.py.metrics``).
* Large cases (``--big``): a dev case upscaled to ~2.5 MP with its unknown band dilated, each method run
  in a fresh subprocess that reports seconds and peak RSS (``VmHWM``; also the RSS right before the call).

Both methods are timed on already-loaded float arrays, after a warm-up (numba JIT for pymatting), with
wall-clock and process CPU seconds; each case runs ``--repeat`` times per method (default 3) and the
fastest run counts, one method at a time over all cases. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here: on a shared,
oversubscribed CPU, spin-waiting OpenMP threads make many-small-op torch code 10x slower (set the variable
yourself to override).
``python benchmarks/bench_trimap.py [--data DIR] [--cases a,b] [--no-pymatting] [--big] [--eps E] [--threads N]``

Ours runs with one torch thread by default (pymatting's closed-form solver and ML foreground are
single-threaded numba/scipy code, and on a shared CPU extra torch threads mostly add wake-up overhead);
``--threads 0`` keeps torch's default.

Output: ``cases`` (per case: size, unknown pixels, and per method seconds, cpu_seconds, sad, mse_x1e3, grad,
conn), ``summary`` (per-method means and totals, ``ratios_ours_over_pymatting`` of the mean metrics,
``speedup_total_time`` = pymatting total seconds / ours, the same on CPU time, and the median per-case
speedup) and, with ``--big``, ``large`` (per case and method: seconds, cpu_seconds, peak_rss_mb,
rss_before_mb, sad, mse_x1e3 against the upscaled ground truth; ``speedup``). Per-case lines go to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see the docstring)

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "trimap"
BIG_CASES = [("gt05", 2.4, 12), ("gt05", 2.4, 24)]  # (source case, scale, extra unknown band in px)


def rss_mb(field: str = "VmHWM") -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_case(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image [H,W,3] float64 0..1, gt alpha [H,W], trimap [H,W] as 0..1)."""
    img = np.asarray(Image.open(folder / "image.png").convert("RGB"), dtype=np.float64) / 255.0
    alpha = np.asarray(Image.open(folder / "alpha.png").convert("L"), dtype=np.float64) / 255.0
    tri = np.asarray(Image.open(folder / "trimap.png").convert("L"), dtype=np.float64) / 255.0
    return img, alpha, tri


def make_big_case(data: Path, case: str, scale: float, band: int, out: Path) -> dict:
    """Upscale ``case`` by ``scale`` (bicubic image/alpha, nearest trimap), dilate the unknown band by
    ``band`` px (square), write PNGs to ``out``."""
    from scipy import ndimage

    src = data / case
    im = Image.open(src / "image.png").convert("RGB")
    w, h = int(im.width * scale), int(im.height * scale)
    im.resize((w, h), Image.BICUBIC).save(out / "image.png")
    Image.open(src / "alpha.png").convert("L").resize((w, h), Image.BICUBIC).save(out / "alpha.png")
    t = np.asarray(Image.open(src / "trimap.png").convert("L").resize((w, h), Image.NEAREST))
    unknown = (t > 25) & (t < 230)
    unknown = ndimage.binary_dilation(unknown, np.ones((2 * band + 1, 2 * band + 1), bool))
    tri = np.where(unknown, 128, np.where(t >= 230, 255, 0)).astype(np.uint8)
    Image.fromarray(tri).save(out / "trimap.png")
    return {"size": [w, h], "megapixels": round(w * h / 1e6, 2), "unknown_pixels": int(unknown.sum())}


# ---------------------------------------------------------------------------------------------- methods
def run_ours(img: np.ndarray, tri: np.ndarray, eps: float | None, device: str | None = None):
    import torch
    from diffusion_matting.py import trimap_matting as T

    kwargs = {} if eps is None else {"eps": eps}
    t0, c0 = time.perf_counter(), time.process_time()
    alpha, fg, warnings = T.matte(torch.from_numpy(img).float()[None], torch.from_numpy(tri).float()[None],
                                  device=device, threads=None, **kwargs)  # threads: as set by --threads
    if alpha.is_cuda:
        torch.cuda.synchronize()
    timing = (time.perf_counter() - t0, time.process_time() - c0)
    return alpha[0].cpu().numpy().astype(np.float64), fg[0].cpu().numpy(), timing


def run_pymatting(img: np.ndarray, tri: np.ndarray, eps: float | None):
    from pymatting import estimate_alpha_cf, estimate_foreground_ml

    kwargs = {} if eps is None else {"laplacian_kwargs": {"epsilon": eps}}
    t0, c0 = time.perf_counter(), time.process_time()
    alpha = estimate_alpha_cf(img, tri, **kwargs)
    fg = estimate_foreground_ml(img, alpha)
    return alpha, fg, (time.perf_counter() - t0, time.process_time() - c0)


def warm_up(methods: list[str]) -> None:
    rng = np.random.default_rng(0)
    img = rng.random((40, 40, 3))
    tri = np.full((40, 40), 0.5)
    tri[:10], tri[30:] = 1.0, 0.0
    for m in methods:
        (run_ours if m == "ours" else run_pymatting)(img, tri, None)


def scores(alpha: np.ndarray, gt: np.ndarray, tri: np.ndarray, full: bool = True) -> dict:
    from diffusion_matting.py import metrics

    if full:
        r = metrics.evaluate(alpha, gt, trimap=tri)
        return {k: round(v, 5) for k, v in r.items() if k != "region"}
    region = metrics.unknown_region(tri)
    return {"sad": round(metrics.sad(alpha, gt, region), 5), "mse_x1e3": round(metrics.mse(alpha, gt, region) * 1e3, 5)}


# ----------------------------------------------------------------------------------------------- worker
def worker(args) -> int:
    """One method on one large case in this (fresh) process: prints JSON with seconds and peak RSS."""
    img, gt, tri = load_case(Path(args.worker_case))
    if args.worker == "ours":
        import torch  # noqa: F401  (imported before the baseline RSS is taken, as pymatting's imports are)
        from diffusion_matting.py import trimap_matting  # noqa: F401
    else:
        import pymatting  # noqa: F401
    warm_up([args.worker])
    before = rss_mb("VmRSS")
    fn = run_ours if args.worker == "ours" else run_pymatting
    alpha, _, (seconds, cpu) = fn(img, tri, args.eps, *([args.device] if args.worker == "ours" else []))
    peak = rss_mb("VmHWM")
    out = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "peak_rss_mb": round(peak, 1),
           "rss_before_mb": round(before, 1)}
    out.update(scores(alpha, gt, tri, full=False))
    print(json.dumps(out))
    return 0


def run_worker(method: str, case_dir: Path, eps: float | None, device: str | None, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--worker-case", str(case_dir)]
    if eps is not None:
        cmd += ["--eps", str(eps)]
    if device:
        cmd += ["--device", device]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--no-pymatting", action="store_true")
    p.add_argument("--big", action="store_true", help="also run the ~2.5 MP cases (fresh subprocess per method)")
    p.add_argument("--eps", type=float, default=None, help="epsilon for both methods (default: each one's own)")
    p.add_argument("--device", default=None, help="torch device for ours (default: cpu)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case and method; the fastest counts (3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for ours (default 1, like pymatting's single-threaded solver; "
                        "0 = torch's default)")
    p.add_argument("--worker", choices=["ours", "pymatting"], help=argparse.SUPPRESS)
    p.add_argument("--worker-case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    data = Path(args.data)
    if not data.is_dir():
        print(json.dumps({"error": f"no data folder {data}"}))
        return 2
    names = args.cases.split(",") if args.cases else sorted(d.name for d in data.iterdir() if d.is_dir())
    methods = ["ours"] + ([] if args.no_pymatting else ["pymatting"])
    report: dict = {"cases": {}, "methods": methods, "repeat": args.repeat,
                    "eps": args.eps if args.eps is not None
                    else {"ours": "default (1e-6)", "pymatting": "default (1e-7)"}}
    import torch
    report["torch_threads"] = torch.get_num_threads()
    report["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    cases = {name: load_case(data / name) for name in names}
    for name, (img, gt, tri) in cases.items():
        report["cases"][name] = {"size": [img.shape[1], img.shape[0]],
                                 "unknown_pixels": int(((tri > 0.5 / 255) & (tri < 1 - 0.5 / 255)).sum())}
    # one method at a time over all cases (pymatting's numba worker threads must not spin during ours), each
    # case run --repeat times, keeping the fastest run (the machine may be shared)
    for m in methods:
        fn = run_ours if m == "ours" else run_pymatting
        warm_up([m])
        for name, (img, gt, tri) in cases.items():
            best = None
            for _ in range(max(1, args.repeat)):
                alpha, _, (seconds, cpu) = fn(img, tri, args.eps, *([args.device] if m == "ours" else []))
                if best is None or seconds < best[1]:
                    best = (alpha, seconds, cpu)
            alpha, seconds, cpu = best
            report["cases"][name][m] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                                        **scores(alpha, gt, tri)}
    for name in names:
        entry = report["cases"][name]
        print(f"{name}: " + "  ".join(f"{m} sad {entry[m]['sad']:.3f} mse*1e3 {entry[m]['mse_x1e3']:.2f} "
                                      f"{entry[m]['seconds']:.3f}s" for m in methods), file=sys.stderr)
    summary = {}
    for m in methods:
        rows = [report["cases"][n][m] for n in names]
        summary[m] = {"mean_" + k: round(float(np.mean([r[k] for r in rows])), 5) for k in rows[0]}
        summary[m]["total_seconds"] = round(float(np.sum([r["seconds"] for r in rows])), 3)
        summary[m]["total_cpu_seconds"] = round(float(np.sum([r["cpu_seconds"] for r in rows])), 3)
    if "pymatting" in methods:
        o, b = summary["ours"], summary["pymatting"]
        summary["ratios_ours_over_pymatting"] = {
            k: round(o["mean_" + k] / b["mean_" + k], 4) for k in ("sad", "mse_x1e3", "grad", "conn")}
        summary["speedup_total_time"] = round(b["total_seconds"] / o["total_seconds"], 2)
        summary["speedup_total_cpu_time"] = round(b["total_cpu_seconds"] / o["total_cpu_seconds"], 2)
        summary["speedup_median_per_case"] = round(float(np.median(
            [report["cases"][n]["pymatting"]["seconds"] / report["cases"][n]["ours"]["seconds"] for n in names])), 2)
    report["summary"] = summary

    if args.big:
        big = {}
        with tempfile.TemporaryDirectory() as tmp:
            for case, scale, band in BIG_CASES:
                key = f"{case}_x{scale}_band{band}"
                folder = Path(tmp) / key
                folder.mkdir()
                info = make_big_case(data, case, scale, band, folder)
                for m in methods:
                    info[m] = run_worker(m, folder, args.eps, args.device, args.threads)
                    print(f"{key}: {m} {info[m]}", file=sys.stderr)
                if "pymatting" in methods and "seconds" in info["ours"] and "seconds" in info["pymatting"]:
                    info["speedup"] = round(info["pymatting"]["seconds"] / info["ours"]["seconds"], 2)
                big[key] = info
        report["large"] = big
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
