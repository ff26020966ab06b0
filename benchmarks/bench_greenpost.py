"""Benchmark GreenPost against closed-form matting on green-screen composites with exact ground truth.

    python benchmarks/bench_greenpost.py [--data ../shared/data/greenscreen] [--no-4k] [--threads N] [--repeat N]

Prints one JSON object: per-case metrics (whole image: SAD/1000, MSE*1e3, Grad/1000, Conn/1000,
alpha-weighted foreground MSE*1e3; see ``diffusion_matting.py.metrics``), seconds (wall and CPU) per image,
the means, GreenPost / closed-form ratios, the per-image speed-up, each method's peak resident memory,
a 3840x2160 timing case, and a folder-streaming check (``key DIR --out DIR`` over ``--stream-frames``
1920x1080 frames in one process; peak resident memory per quarter of the frames, so growth shows).

Methods (each round runs each in its own fresh subprocess; peak memory = the largest VmHWM of its processes):

* ``greenpost``: :func:`diffusion_matting.py.greenpost.greenpost` with its defaults, fed ``image.png`` only.
* ``closed_form``: the classical pipeline a keyer would otherwise use: a colour-difference key
  ``cd = G - max(R, B)`` normalised by the median ``cd`` of the screen-like pixels
  (``cd > 0.5 * p99(cd)``), ``a_cd = 1 - clip(cd / ref)``; trimap = foreground where ``a_cd > 0.9``,
  background where ``a_cd < 0.1`` (both eroded by 2 px), unknown elsewhere; then pymatting's
  ``estimate_alpha_cf`` (Levin et al. closed-form matting) and ``estimate_foreground_ml``.

Only ``image.png`` is given to a method; ``alpha.png`` / ``fg.png`` are used for scoring only. Each method
is warmed up once on the first case (pymatting compiles with numba; torch allocates) before timing. The
methods run in ``--repeat`` rounds (default 3), alternating which goes first, each round keying every image
once per method; ``seconds`` is a case's best round, the same rule for both methods (on a shared CPU other
processes only ever add time, and interleaving makes a change in load hit both methods alike), and the
first round's time is reported beside it. The load average at the end is printed too.
The 4K case is an upscaled dev image keyed after a warm-up, timed over ``--repeat-4k`` runs (best and
median reported) in a fresh subprocess whose peak memory is reported alongside its baseline (python +
torch loaded, before the frame exists).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "greenscreen"
METRIC_KEYS = ["sad", "mse_x1e3", "grad", "conn", "fg_mse_x1e3"]


def _vm_hwm_mb() -> float:
    """Peak resident set size of this process (MiB) from /proc (covers torch's native allocations)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------- child: run one method
def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def _run_greenpost(image: np.ndarray):
    import torch
    from diffusion_matting.py.greenpost import greenpost
    res = greenpost(torch.from_numpy(image)[None])
    return res.alpha[0].numpy(), res.foreground[0].numpy(), res.warnings


def _run_closed_form(image: np.ndarray):
    import pymatting
    from scipy import ndimage
    img = image.astype(np.float64)
    cd = img[..., 1] - np.maximum(img[..., 0], img[..., 2])
    screen = cd > 0.5 * np.percentile(cd, 99)
    ref = float(np.median(cd[screen])) if screen.any() else 1.0
    a = 1.0 - np.clip(cd / max(ref, 1e-6), 0, 1)
    trimap = np.full(a.shape, 0.5)
    trimap[ndimage.binary_erosion(a > 0.9, iterations=2)] = 1.0
    trimap[ndimage.binary_erosion(a < 0.1, iterations=2)] = 0.0
    alpha = np.clip(pymatting.estimate_alpha_cf(img, trimap), 0, 1)
    fg = pymatting.estimate_foreground_ml(img, alpha)
    return alpha.astype(np.float32), np.clip(fg, 0, 1).astype(np.float32), []


def child_method(method: str, cases: list[str], data: Path, out: Path, threads: int | None, tag: str) -> None:
    import torch
    if threads:
        torch.set_num_threads(threads)
    run = {"greenpost": _run_greenpost, "closed_form": _run_closed_form}[method]
    report = {"threads": torch.get_num_threads(), "cases": {}}
    run(_load_rgb(data / cases[0] / "image.png"))  # warm-up (numba JIT, allocator)
    for case in cases:
        image = _load_rgb(data / case / "image.png")
        t0, c0 = time.perf_counter(), time.process_time()
        alpha, fg, warnings = run(image)
        report["cases"][case] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                 "warnings": warnings}
        if tag == "r0":
            np.savez_compressed(out / f"{method}_{case}.npz", alpha=alpha, fg=fg)
    report["peak_rss_mb"] = _vm_hwm_mb()
    (out / f"{method}_{tag}.json").write_text(json.dumps(report))


def child_4k(data: Path, case: str, out: Path, threads: int | None, repeat: int) -> None:
    import torch
    import torch.nn.functional as F
    from diffusion_matting.py.greenpost import greenpost
    if threads:
        torch.set_num_threads(threads)
    small = torch.from_numpy(_load_rgb(data / case / "image.png"))[None]
    greenpost(small)  # warm-up on the small frame
    del small
    baseline = _vm_rss_mb()
    frame = torch.from_numpy(_load_rgb(data / case / "image.png")).permute(2, 0, 1)[None]
    frame = F.interpolate(frame, size=(2160, 3840), mode="bilinear", align_corners=False)
    frame = frame.clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        res = greenpost(frame)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del res
    (out / "4k.json").write_text(json.dumps({
        "size": "3840x2160", "source": f"{case} upscaled", "threads": torch.get_num_threads(),
        "seconds_best": min(walls), "seconds_median": statistics.median(walls),
        "cpu_seconds_best": min(cpus), "peak_rss_mb": _vm_hwm_mb(), "baseline_rss_mb": baseline,
        "frame_mb": frame.numel() * 4 / 2 ** 20}))


def child_stream(data: Path, case: str, out: Path, frames: int) -> None:
    """Key a folder of ``frames`` 1920x1080 PNGs through the CLI (``key DIR --out DIR``) in this process while
    a thread samples its resident memory; reports the peak RSS over each quarter of the frames."""
    import threading

    import torch
    import torch.nn.functional as F
    from PIL import Image

    from diffusion_matting.py.cli import main as cli
    src, dst = out / "stream_in", out / "stream_out"
    src.mkdir()
    base = torch.from_numpy(_load_rgb(data / case / "image.png")).permute(2, 0, 1)[None]
    base = F.interpolate(base, size=(1080, 1920), mode="bilinear", align_corners=False).clamp(0, 1)[0]
    for i in range(frames):  # the subject moves across the frames, so every frame differs
        frame = torch.roll(base, shifts=37 * i, dims=2).permute(1, 2, 0).mul(255).round().byte().numpy()
        Image.fromarray(frame).save(src / f"frame_{i:04d}.png", compress_level=1)
    del base
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            n = len(list(dst.glob("*.png"))) if dst.is_dir() else 0
            samples.append((n, _vm_rss_mb()))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    cli(["key", str(src), "--out", str(dst)])
    done.set()
    thread.join()
    seconds = time.perf_counter() - t0
    q = max(1, frames // 4)
    quarters = [max([r for n, r in samples if k * q <= n < (k + 1) * q] or [float("nan")]) for k in range(4)]
    (out / "stream.json").write_text(json.dumps({
        "frames": frames, "size": "1920x1080", "written": len(list(dst.glob("*.png"))),
        "seconds_per_frame": seconds / frames, "peak_rss_mb_by_quarter": quarters,
        "growth_mb_second_to_last_quarter": quarters[-1] - quarters[1], "peak_rss_mb": _vm_hwm_mb()}))


# --------------------------------------------------------------------------- parent
def _spawn(args: list[str]) -> None:
    env = dict(os.environ)
    subprocess.run([sys.executable, __file__, *args], check=True, env=env, stdout=sys.stderr)  # stdout: JSON only


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="greenscreen/<case>/{image,alpha,fg}.png")
    ap.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    ap.add_argument("--no-4k", action="store_true", help="skip the 3840x2160 timing case")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds; each round runs both methods (alternating which goes first) on every image; "
                         "seconds = the best round (the first round also reported)")
    ap.add_argument("--tag", default="r0", help=argparse.SUPPRESS)
    ap.add_argument("--repeat-4k", type=int, default=3)
    ap.add_argument("--stream-frames", type=int, default=24,
                    help="frames (1920x1080) in the folder-streaming memory check; 0 skips it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    data = args.data
    if not data.is_dir():
        print(json.dumps({"error": f"no data folder {data}"}))
        return 2
    cases = args.cases or sorted(p.name for p in data.iterdir() if (p / "image.png").is_file())
    if args.child == "stream":
        child_stream(data, cases[-1] if "lemur" not in cases else "lemur", args.out, args.stream_frames)
        return 0
    if args.child == "4k":
        child_4k(data, cases[-1] if "lemur" not in cases else "lemur", args.out, args.threads, args.repeat_4k)
        return 0
    if args.child:
        child_method(args.child, cases, data, args.out, args.threads, args.tag)
        return 0

    from diffusion_matting.py import metrics
    from diffusion_matting.py.imageio import load_image, load_mask

    extra = ["--data", str(data), "--cases", *cases] + (["--threads", str(args.threads)] if args.threads else [])
    methods = ("greenpost", "closed_form")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rounds = max(1, args.repeat)
        reports = {m: [] for m in methods}
        for r in range(rounds):  # interleaved, so a change in the machine's load hits both methods alike
            for method in (methods if r % 2 == 0 else methods[::-1]):
                _spawn(["--child", method, "--out", str(out), "--tag", f"r{r}", *extra])
                reports[method].append(json.loads((out / f"{method}_r{r}.json").read_text()))
        runs = {}
        for method, reps in reports.items():
            runs[method] = {"threads": reps[0]["threads"], "peak_rss_mb": max(x["peak_rss_mb"] for x in reps),
                            "cases": {case: {"seconds": min(x["cases"][case]["seconds"] for x in reps),
                                             "cpu_seconds": min(x["cases"][case]["cpu_seconds"] for x in reps),
                                             "seconds_first": reps[0]["cases"][case]["seconds"],
                                             "warnings": reps[0]["cases"][case]["warnings"]} for case in cases}}
        four_k = None
        if not args.no_4k:
            _spawn(["--child", "4k", "--out", str(out), "--repeat-4k", str(args.repeat_4k), *extra])
            four_k = json.loads((out / "4k.json").read_text())
        stream = None
        if args.stream_frames > 0:
            _spawn(["--child", "stream", "--out", str(out), "--stream-frames", str(args.stream_frames), *extra])
            stream = json.loads((out / "stream.json").read_text())
        per_case = {}
        for case in cases:
            gt_alpha = load_mask(data / case / "alpha.png")[0].numpy()
            gt_fg = load_image(data / case / "fg.png")[0][0].numpy()
            per_case[case] = {}
            for method, run in runs.items():
                pred = np.load(out / f"{method}_{case}.npz")
                m = metrics.evaluate(pred["alpha"], gt_alpha, pred_fg=pred["fg"], gt_fg=gt_fg)
                entry = {k: round(float(m[k]), 5) for k in METRIC_KEYS}
                entry.update({k: round(run["cases"][case][k], 4) for k in ("seconds", "cpu_seconds", "seconds_first")})
                if run["cases"][case]["warnings"]:
                    entry["warnings"] = run["cases"][case]["warnings"]
                per_case[case][method] = entry

    means = {m: {k: float(np.mean([per_case[c][m][k] for c in cases])) for k in METRIC_KEYS + ["seconds", "cpu_seconds"]}
             for m in runs}
    gp, cf = means["greenpost"], means["closed_form"]
    ratios = {k: gp[k] / cf[k] if cf[k] > 0 else None for k in METRIC_KEYS}
    speed = {
        "mean_of_per_image_ratios_wall": float(np.mean([per_case[c]["closed_form"]["seconds"] /
                                                         per_case[c]["greenpost"]["seconds"] for c in cases])),
        "ratio_of_mean_seconds_wall": cf["seconds"] / gp["seconds"],
        "mean_of_per_image_ratios_cpu": float(np.mean([per_case[c]["closed_form"]["cpu_seconds"] /
                                                        max(per_case[c]["greenpost"]["cpu_seconds"], 1e-6) for c in cases])),
        "mean_of_per_image_ratios_wall_first_run": float(np.mean([
            per_case[c]["closed_form"]["seconds_first"] / per_case[c]["greenpost"]["seconds_first"] for c in cases])),
    }
    targets = {
        "sad_ratio<=0.5": ratios["sad"] <= 0.5, "mse_ratio<=0.5": ratios["mse_x1e3"] <= 0.5,
        "fg_mse_ratio<=0.5": ratios["fg_mse_x1e3"] <= 0.5,
        "speedup>=30": speed["mean_of_per_image_ratios_wall"] >= 30,
    }
    if four_k:
        targets["4k<1.5s"] = four_k["seconds_best"] < 1.5
        targets["4k<1.5GB"] = four_k["peak_rss_mb"] < 1536
    if stream:  # no growth: the last quarter's peak within 5% (and 32 MB) of the second quarter's
        targets["stream_no_memory_growth"] = (stream["written"] == stream["frames"] and
                                              stream["growth_mb_second_to_last_quarter"] <=
                                              max(32.0, 0.05 * stream["peak_rss_mb_by_quarter"][1]))
    result = {
        "data": str(data), "region": "whole image", "units": "sad, grad, conn: /1000; mse, fg_mse: x1e3",
        "per_case": per_case,
        "means": {m: {k: round(v, 5) for k, v in d.items()} for m, d in means.items()},
        "ratios_greenpost_over_closed_form": {k: round(v, 4) for k, v in ratios.items()},
        "speedup_closed_form_over_greenpost": {k: round(v, 2) for k, v in speed.items()},
        "peak_rss_mb": {m: round(r["peak_rss_mb"], 1) for m, r in runs.items()},
        "threads": {m: r["threads"] for m, r in runs.items()},
        "note": ("greenpost keys with 1 torch thread by default (cpu_threads=1); closed_form uses all threads; "
                 f"seconds = best of {max(1, args.repeat)} interleaved rounds per image for both methods "
                 "(each round a fresh process per method, warmed up on the first image)"),
        "load_average": os.getloadavg(),
        "four_k": four_k and {k: (round(v, 4) if isinstance(v, float) else v) for k, v in four_k.items()},
        "stream": stream and {k: (round(v, 4) if isinstance(v, float) else
                                  [round(x, 1) for x in v] if isinstance(v, list) else v) for k, v in stream.items()},
        "targets_met": targets,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
