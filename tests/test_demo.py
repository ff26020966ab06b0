"""README command 1: the demo keys the shipped samples and its mattes match their exact ground truth."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_matting.py import metrics
from diffusion_matting.py.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_demo_keys_shipped_samples(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    report = json.loads(printed[: printed.rindex("}") + 1])
    samples = sorted((REPO / "samples").glob("*.png"))
    assert len(samples) == 4 and set(report) == {p.stem for p in samples}
    for p in samples:
        rgba = np.asarray(Image.open(out / f"{p.stem}.png"))
        src = np.asarray(Image.open(p))
        assert rgba.shape == (*src.shape[:2], 4)
        gt = np.asarray(Image.open(REPO / "samples" / "gt" / f"{p.stem}_alpha.png"), dtype=np.float64) / 255
        pred = rgba[..., 3].astype(np.float64) / 255
        # the printed metrics are the real ones for the written file (8-bit quantisation aside)
        assert abs(metrics.sad(pred, gt) - report[p.stem]["sad"]) < 0.05 * report[p.stem]["sad"] + 0.05
        # a keyed matte, far better than the trivial all-foreground / all-background answers
        trivial = min(metrics.sad(np.ones_like(gt), gt), metrics.sad(np.zeros_like(gt), gt))
        assert metrics.sad(pred, gt) < 0.25 * trivial, p.stem
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] > sheet.size[0] and sheet.mode == "RGB"  # 4 rows x 3 columns
