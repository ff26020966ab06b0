"""Green100K-style training folders for DiffuMatting (ComfyUI-free).

DiffuMatting (ECCV 2024, Sec. 3.1) trains on Green100K: matting-dataset foregrounds (and salient-object
masks) composited onto a fixed green canvas, each with a caption that mentions the green background.

**Folder layout** (written by :func:`build_green_folder`, read by :class:`GreenFolder`)::

    OUT/image/<name>.png    composite  I = alpha * F + (1 - alpha) * canvas   (RGB)
    OUT/alpha/<name>.png    alpha, 1 = foreground (8-bit grey)
    OUT/fg/<name>.png       straight foreground colour F (0 where alpha = 0)
    OUT/captions.jsonl      one line per sample: {"name", "image", "alpha", "fg", "caption", "source"}

The reader also accepts a ``manifest.jsonl`` with the same fields (``prompt`` for ``caption``), or
per-image caption sidecars ``image/<name>.txt`` / ``captions/<name>.txt``. Nothing is ever overwritten: new samples get the next free number.

**Caption files** for the builder (``--captions``): ``.jsonl`` lines ``{"source": <item name or stem>,
"caption": ...}`` (matched to an item by name/stem) or ``{"caption": ...}``; ``.txt`` lines
``<stem>\\t<caption>`` or plain captions. Unmatched items take the plain captions in turn. Every caption
gets ``", pure green background"`` appended unless it already says so (:func:`green_canvas.ensure_canvas_phrase`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .green_canvas import CANVAS_PHRASE, DIFFUMATTING_GREEN, ensure_canvas_phrase
from .imageio import IMAGE_EXTS, load_image, load_mask, save_gray, save_rgb
from .train_matting_head import MatteItem, _find, _shrink, load_matte_items, procedural_items

CAPTIONS_FILE = "captions.jsonl"


# -------------------------------------------------------------------------------------- sources
def load_salient_items(folders, max_side: int = 1024) -> list[MatteItem]:
    """Salient-object data: case folders with ``image.*`` + ``mask.*``, or a folder holding an image folder
    (``image``/``images``/``*Image*``) and a mask folder (``mask``/``masks``/``*Mask*``) paired by stem
    (DUTS layout). The (binary) mask is used as alpha and the image as foreground colour."""
    items: list[MatteItem] = []
    for folder in folders or []:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"--salient: no such folder: {root}")
        found = 0
        for d in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
            img, msk = _find(d, "image"), _find(d, "mask")
            if img is not None and msk is not None:
                items.append(_salient_item(img, msk, max_side))
                found += 1
        subs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
        img_dir = next((p for n, p in subs.items() if n in ("image", "images") or "image" in n), None)
        mask_dir = next((p for n, p in subs.items() if n in ("mask", "masks") or "mask" in n), None)
        if not found and img_dir is not None and mask_dir is not None:
            masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
            for p in sorted(img_dir.iterdir()):
                if p.suffix.lower() in IMAGE_EXTS and p.stem in masks:
                    items.append(_salient_item(p, masks[p.stem], max_side))
                    found += 1
        if not found:
            raise UserError(f"--salient {root}: no image + mask pairs (case folders with image.* and mask.*, "
                            "or image/ and mask/ folders with matching names)")
    return items


def _salient_item(img: Path, msk: Path, max_side: int) -> MatteItem:
    fg = load_image(img)[0][0].numpy()
    alpha = load_mask(msk)[0].numpy()
    if fg.shape[:2] != alpha.shape:
        raise UserError(f"{img} and {msk} differ in size")
    return MatteItem(_shrink(fg, max_side), _shrink(alpha, max_side), str(img))


def read_captions(path: str | os.PathLike | None) -> tuple[dict[str, str], list[str]]:
    """``(by_source, plain)`` from a ``.jsonl`` or ``.txt`` caption file (see the module docstring)."""
    if path is None:
        return {}, []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--captions: no such file: {p}")
    by_source, plain = {}, []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p}:{n}: not JSON ({exc})") from None
            cap = rec.get("caption") or rec.get("prompt") if isinstance(rec, dict) else None
            if not isinstance(cap, str) or not cap.strip():
                raise UserError(f"{p}:{n}: needs a non-empty \"caption\"")
            src = rec.get("source") or rec.get("name") or rec.get("image")
            if src:
                by_source[Path(str(src)).stem] = cap.strip()
            else:
                plain.append(cap.strip())
        elif "\t" in line:
            src, cap = line.split("\t", 1)
            by_source[Path(src.strip()).stem] = cap.strip()
        else:
            plain.append(line)
    if not by_source and not plain:
        raise UserError(f"--captions {p}: no captions")
    return by_source, plain


def _source_keys(name: str) -> list[str]:
    p = Path(name)
    keys = [p.stem, p.name]
    if p.stem.lower() in ("alpha", "fg", "image", "mask", "foreground"):
        keys.insert(0, p.parent.name)
    return keys


# --------------------------------------------------------------------------------------- builder
def composite_on_canvas(item: MatteItem, size: int, rng: np.random.Generator, canvas=DIFFUMATTING_GREEN,
                        scale: tuple[float, float] = (0.6, 0.95)):
    """Place ``item`` on a ``size`` x ``size`` canvas: its longer side scaled to ``U(scale) * size``, at a
    random position, random horizontal flip. Returns ``(image, alpha, fg)`` tensors ``[3|1,S,S]`` in 0..1."""
    fg = torch.from_numpy(np.ascontiguousarray(item.fg)).permute(2, 0, 1).float()
    al = torch.from_numpy(np.ascontiguousarray(item.alpha)).float()[None]
    H, W = al.shape[-2:]
    s = rng.uniform(*scale) * size / max(H, W)
    h, w = max(1, min(size, round(H * s))), max(1, min(size, round(W * s)))
    fg = F.interpolate(fg[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    al = F.interpolate(al[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    if rng.random() < 0.5:
        fg, al = fg.flip(-1), al.flip(-1)
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    A = torch.zeros(1, size, size)
    Fg = torch.zeros(3, size, size)
    A[:, y:y + h, x:x + w] = al
    Fg[:, y:y + h, x:x + w] = fg * (al > 0)
    bg = torch.tensor(canvas, dtype=torch.float32).view(3, 1, 1)
    return (A * Fg + (1 - A) * bg).clamp(0, 1), A, Fg


def next_index(out: Path) -> int:
    """First free sample number in ``out`` (one past the largest numeric name in image/, alpha/, fg/)."""
    hi = -1
    for sub in ("image", "alpha", "fg"):
        d = out / sub
        if d.is_dir():
            for p in d.iterdir():
                if p.stem.isdigit():
                    hi = max(hi, int(p.stem))
    return hi + 1


def build_green_folder(items: list[MatteItem], out: str | os.PathLike, captions: tuple[dict, list] = ({}, []),
                       per_item: int = 1, size: int = 512, seed: int = 0, canvas=DIFFUMATTING_GREEN,
                       default_caption: str = "an object", phrase: str = CANVAS_PHRASE, log=print) -> list[dict]:
    """Composite every item ``per_item`` times onto the canvas and append the samples to ``out``.

    Never overwrites: names continue after the largest existing number, and a file that appears meanwhile
    is skipped over (exclusive creation). Returns the new caption records (also appended to captions.jsonl)."""
    if not items:
        raise UserError("no foregrounds to composite (give --fg-data and/or --salient folders)")
    if per_item < 1 or size < 8:
        raise UserError("--per-item must be >= 1 and --size >= 8")
    out = Path(out)
    for sub in ("image", "alpha", "fg"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    by_source, plain = captions
    rng = np.random.default_rng(seed)
    idx = next_index(out)
    records, k_plain = [], 0
    with open(out / CAPTIONS_FILE, "a", encoding="utf-8") as fh:
        for it in items:
            cap = next((by_source[k] for k in _source_keys(it.name) if k in by_source), None)
            if cap is None:
                cap = plain[k_plain % len(plain)] if plain else default_caption
                k_plain += 1 if plain else 0
            cap = ensure_canvas_phrase(cap, phrase)
            for _ in range(per_item):
                image, alpha, fg = composite_on_canvas(it, size, rng, canvas)
                while True:
                    name = f"{idx:06d}"
                    paths = {s: out / s / f"{name}.png" for s in ("image", "alpha", "fg")}
                    made = []
                    try:
                        for p in paths.values():
                            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                            made.append(p)
                        break
                    except FileExistsError:   # taken (by an earlier run or a concurrent writer)
                        for p in made:
                            p.unlink()
                        idx += 1
                save_rgb(paths["image"], image.permute(1, 2, 0))
                save_gray(paths["alpha"], alpha[0])
                save_rgb(paths["fg"], fg.permute(1, 2, 0))
                rec = {"name": name, "image": f"image/{name}.png", "alpha": f"alpha/{name}.png",
                       "fg": f"fg/{name}.png", "caption": cap, "source": it.name}
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                records.append(rec)
                idx += 1
    log(f"wrote {len(records)} samples to {out}")
    return records


# ---------------------------------------------------------------------------------------- reader
@dataclass
class GreenSample:
    image: Path
    alpha: Path
    caption: str


class GreenFolder:
    """A Green100K-style folder: samples loaded lazily, resized/cropped per batch."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not (self.root / "image").is_dir() or not (self.root / "alpha").is_dir():
            raise UserError(f"{self.root}: a green training folder needs image/ and alpha/ sub-folders")
        caps: dict[str, str] = {}
        for fname in (CAPTIONS_FILE, "manifest.jsonl"):
            f = self.root / fname
            if f.is_file():
                for line in f.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        key = Path(str(rec.get("image") or rec.get("name"))).stem
                        cap = rec.get("caption") or rec.get("prompt")
                        if key and cap:
                            caps.setdefault(key, cap)
        self.samples: list[GreenSample] = []
        alphas = {p.stem: p for p in (self.root / "alpha").iterdir() if p.suffix.lower() in IMAGE_EXTS}
        missing = []
        for p in sorted((self.root / "image").iterdir()):
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            cap = caps.get(p.stem)
            for side in (p.with_suffix(".txt"), self.root / "captions" / f"{p.stem}.txt"):
                if cap is None and side.is_file():
                    cap = side.read_text(encoding="utf-8").strip()
            if p.stem not in alphas or cap is None:
                missing.append(p.name)
                continue
            self.samples.append(GreenSample(p, alphas[p.stem], cap))
        if missing:
            raise UserError(f"{self.root}: {len(missing)} images lack an alpha or a caption (first: {missing[0]})")
        if not self.samples:
            raise UserError(f"{self.root}: no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int, res: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        s = self.samples[i]
        img = load_image(s.image)[0][0].permute(2, 0, 1)
        al = load_mask(s.alpha)
        if img.shape[-2:] != al.shape[-2:]:
            raise UserError(f"{s.image} and {s.alpha} differ in size")
        return (*_square_crop(img, al, res, rng), s.caption)


def _square_crop(img: torch.Tensor, al: torch.Tensor, res: int, rng: np.random.Generator):
    """Shorter side resized to ``res``, random ``res`` x ``res`` crop along the longer side."""
    H, W = al.shape[-2:]
    s = res / min(H, W)
    h, w = max(res, round(H * s)), max(res, round(W * s))
    x = torch.cat([img, al], 0)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    y0, x0 = int(rng.integers(0, h - res + 1)), int(rng.integers(0, w - res + 1))
    x = x[:, y0:y0 + res, x0:x0 + res].clamp(0, 1)
    return x[:3], x[3:]


class ProceduralGreen:
    """In-memory procedural subjects (:func:`samples.render_subject`) on the pure green canvas with
    captions ``"a <colour> object, pure green background"``: the CPU proof / test data set."""

    COLOURS = ("red", "blue", "orange", "purple", "white", "dark")

    def __init__(self, n: int, size: int = 64, seed: int = 0, canvas=DIFFUMATTING_GREEN):
        rng = np.random.default_rng(seed)
        self.images, self.alphas, self.captions = [], [], []
        for it in procedural_items(n, size=size, seed=seed):
            image, alpha, _fg = composite_on_canvas(it, size, rng, canvas, scale=(0.8, 1.0))
            self.images.append(image)
            self.alphas.append(alpha)
            self.captions.append(ensure_canvas_phrase(f"a {self.COLOURS[int(rng.integers(6))]} object"))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int, res: int, rng: np.random.Generator):
        return (*_square_crop(self.images[i], self.alphas[i], res, rng), self.captions[i])


class Mixture:
    """Several data sources (:class:`GreenFolder`, :class:`ProceduralGreen`) seen as one indexable set."""

    def __init__(self, sources):
        self.sources = [s for s in sources if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def load(self, i: int, res: int, rng):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[k].load(i - int(self.offsets[k]), res, rng)

    def subset(self, indices) -> "Subset":
        return Subset(self, list(indices))


class Subset:
    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int, res: int, rng):
        return self.base.load(self.indices[i], res, rng)


def make_batch(data, n: int, res: int, rng: np.random.Generator, flip: bool = True):
    """``n`` random samples: ``(images [n,3,R,R] 0..1, alpha [n,1,R,R], captions list[str])``."""
    if len(data) == 0:
        raise UserError("empty training set")
    imgs, als, caps = [], [], []
    for _ in range(n):
        img, al, cap = data.load(int(rng.integers(len(data))), res, rng)
        if flip and rng.random() < 0.5:
            img, al = img.flip(-1), al.flip(-1)
        imgs.append(img)
        als.append(al)
        caps.append(cap)
    return torch.stack(imgs), torch.stack(als), caps


def fixed_batch(data, n: int, res: int, seed: int):
    """Deterministic samples ``0..n-1`` (cycled), centre-ish crops: the validation set."""
    rng = np.random.default_rng(seed)
    out = [data.load(i % len(data), res, rng) for i in range(n)]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]), [o[2] for o in out]


__all__ = ["build_green_folder", "GreenFolder", "ProceduralGreen", "Mixture", "make_batch", "fixed_batch",
           "load_salient_items", "load_matte_items", "read_captions", "composite_on_canvas"]
