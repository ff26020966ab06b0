"""``diffusion-matting eval``: JSON numbers equal the metrics computed directly; bad input exits 2."""

import json

import numpy as np
import pytest
from PIL import Image

from diffusion_matting.py import metrics as M
from diffusion_matting.py.cli import main


def _matte(seed, h=20, w=24):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    gt = np.clip(1.4 - np.hypot(yy - h / 2, xx - w / 2) / 6, 0, 1)
    pred = np.clip(gt + rng.normal(0, 0.15, gt.shape), 0, 1)
    q = lambda a: (a * 255).round().astype(np.uint8)
    return q(pred), q(gt)


def _trimap(gt8):
    return np.where(gt8 == 0, 0, np.where(gt8 == 255, 255, 128)).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path):
    d = {k: tmp_path / k for k in ("pred", "gt", "trimap", "gt_fg")}
    for p in d.values():
        p.mkdir()
    cases = {}
    for i, stem in enumerate(["a", "b"]):
        pred8, gt8 = _matte(i)
        rng = np.random.default_rng(10 + i)
        fg8 = rng.integers(0, 256, gt8.shape + (3,), dtype=np.uint8)
        pfg8 = np.clip(fg8.astype(int) + 20, 0, 255).astype(np.uint8)
        if stem == "a":  # RGBA prediction: scored on its alpha channel, its RGB is the predicted fg
            Image.fromarray(np.dstack([pfg8, pred8]), "RGBA").save(d["pred"] / f"{stem}.png")
        else:            # grayscale prediction (and a separate straight-fg file)
            Image.fromarray(pred8, "L").save(d["pred"] / f"{stem}.png")
        Image.fromarray(gt8, "L").save(d["gt"] / f"{stem}.png")
        Image.fromarray(_trimap(gt8), "L").save(d["trimap"] / f"{stem}.png")
        Image.fromarray(fg8, "RGB").save(d["gt_fg"] / f"{stem}.png")
        cases[stem] = (pred8, gt8, fg8, pfg8)
    Image.fromarray(_matte(5)[0], "L").save(d["pred"] / "unmatched.png")
    d["pred_fg"] = tmp_path / "pred_fg"
    d["pred_fg"].mkdir()
    Image.fromarray(np.dstack([cases["a"][3], cases["a"][0]]), "RGBA").save(d["pred_fg"] / "a.png")
    Image.fromarray(cases["b"][3], "RGB").save(d["pred_fg"] / "b.png")
    return d, cases


def _run(capsys, argv):
    rc = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_matches_direct_metrics(dataset, capsys):
    d, cases = dataset
    rc, out, err = _run(capsys, ["--pred", d["pred"], "--gt", d["gt"], "--trimap", d["trimap"]])
    assert rc == 0
    report = json.loads(out)
    assert report["count"] == 2 and set(report["cases"]) == {"a", "b"}
    assert "skipped" in err  # the unmatched prediction
    for stem, (pred8, gt8, _, _) in cases.items():
        expect = M.evaluate(pred8, gt8, _trimap(gt8))
        got = report["cases"][stem]
        assert got["region"] == "unknown"
        for k in ("sad", "mse_x1e3", "grad", "conn"):
            assert got[k] == pytest.approx(expect[k], rel=1e-5), (stem, k)
        assert got["sad"] > 0 and got["conn"] > 0
    for k in ("sad", "mse_x1e3", "grad", "conn"):
        assert report["mean"][k] == pytest.approx((report["cases"]["a"][k] + report["cases"]["b"][k]) / 2)


def test_eval_without_trimap_and_with_foreground(dataset, capsys):
    d, cases = dataset
    rc, out, _ = _run(capsys, ["--pred", d["pred"], "--gt", d["gt"], "--pred-fg", d["pred_fg"],
                               "--gt-fg", d["gt_fg"]])
    assert rc == 0
    report = json.loads(out)
    for stem, (pred8, gt8, fg8, pfg8) in cases.items():
        expect = M.evaluate(pred8, gt8, pred_fg=pfg8, gt_fg=fg8)
        got = report["cases"][stem]
        assert got["region"] == "image"
        for k in ("sad", "mse_x1e3", "grad", "conn", "fg_mse_x1e3", "fg_sad"):
            assert got[k] == pytest.approx(expect[k], rel=1e-5), (stem, k)
        assert got["fg_mse_x1e3"] > 0
    assert report["mean"]["region"] == "image"


def test_eval_dataset_folder_layout(tmp_path, capsys):
    pred8, gt8 = _matte(3)
    (tmp_path / "pred").mkdir()
    Image.fromarray(pred8, "L").save(tmp_path / "pred" / "case1.png")
    (tmp_path / "data" / "case1").mkdir(parents=True)
    Image.fromarray(gt8, "L").save(tmp_path / "data" / "case1" / "alpha.png")
    Image.fromarray(_trimap(gt8), "L").save(tmp_path / "data" / "case1" / "trimap.png")
    rc, out, _ = _run(capsys, ["--pred", tmp_path / "pred", "--gt", tmp_path / "data",
                               "--trimap", tmp_path / "data"])
    assert rc == 0
    got = json.loads(out)["cases"]["case1"]
    assert got["sad"] == pytest.approx(M.sad(pred8, gt8, M.unknown_region(_trimap(gt8))), rel=1e-5)


def test_eval_bad_input_exits_2(dataset, tmp_path, capsys):
    d, _ = dataset
    rc, out, err = _run(capsys, ["--pred", tmp_path / "nope", "--gt", d["gt"]])
    assert rc == 2 and out == "" and "nope" in err and len(err.strip().splitlines()) == 1

    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(other / "zzz.png")
    rc, _, err = _run(capsys, ["--pred", d["pred"], "--gt", other])
    assert rc == 2 and "no file stems in common" in err

    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((10, 12), np.uint8), "L").save(small / "a.png")
    rc, _, err = _run(capsys, ["--pred", d["pred"], "--gt", small])
    assert rc == 2 and "24x20" in err and "12x10" in err

    rc, _, err = _run(capsys, ["--pred", d["pred"], "--gt", d["gt"], "--pred-fg", d["pred_fg"]])
    assert rc == 2 and "together" in err

    rc, _, err = _run(capsys, ["--pred", d["pred"], "--gt", d["gt"], "--trimap", small])
    assert rc == 2 and "'b'" in err  # trimap folder lacks case b
