"""Matting-dataset folders: the layout the ``Save Matting Sample`` node and ``diffusion-matting factory`` write.

    ROOT/image/<name>.png      composite (RGB, 8 bit)
    ROOT/alpha/<name>.png      alpha (L, 8 bit; 255 = foreground)
    ROOT/fg/<name>.png         straight (not premultiplied) foreground colour (RGB, 8 bit)
    ROOT/captions/<name>.txt   caption (UTF-8), only when one is given
    ROOT/manifest.jsonl        one JSON line per sample: name, width, height, files, sha256 of each file,
                               and prompt / seed / caption / whatever else the writer records

Names are never reused: :func:`reserve_name` claims every file of a new name with an exclusive create
(``O_CREAT | O_EXCL``) before anything is written, so several ComfyUI queues (or servers) sharing one
folder cannot overwrite each other. File contents go to a temporary file that is renamed over the claimed
one (readers never see half a PNG); the manifest line is appended last, in one ``write`` on an
``O_APPEND`` descriptor (under ``flock`` where available), so a sample is in the manifest only once
all its files are complete. A line cut short by a crash is ignored by :func:`read_manifest` and removed by
:func:`repair_manifest`.

ComfyUI-free (torch, numpy, PIL).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .imageio import to_uint8

MANIFEST = "manifest.jsonl"
# kind -> (folder, suffix); "caption" is optional per sample
KINDS: dict[str, tuple[str, str]] = {
    "image": ("image", ".png"),
    "alpha": ("alpha", ".png"),
    "fg": ("fg", ".png"),
    "caption": ("captions", ".txt"),
}
IMAGE_KINDS = ("image", "alpha", "fg")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,119}$")

try:  # POSIX advisory lock around manifest appends (O_APPEND alone is enough on local file systems)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


# ------------------------------------------------------------------------------------------ names
def check_prefix(prefix: str) -> str:
    prefix = (prefix or "").strip()
    if not _NAME_OK.match(prefix):
        raise UserError(f"prefix {prefix!r}: use letters, digits, '_', '-', '.' (starting with a letter or digit)")
    return prefix


def check_subfolder(subfolder: str) -> str:
    """A relative folder below the output folder ('' = the output folder itself); no '..', not absolute."""
    sub = (subfolder or "").strip().replace("\\", "/")
    parts = [p for p in sub.split("/") if p not in ("", ".")]
    if sub.startswith("/") or any(p == ".." for p in parts) or (parts and ":" in parts[0]):
        raise UserError(f"subfolder {subfolder!r} must be a relative path inside the output folder (no '..')")
    return "/".join(parts)


def sample_paths(root: str | os.PathLike, name: str, caption: bool = True) -> dict[str, Path]:
    """kind -> path of every file of sample ``name`` (``caption`` False leaves the caption out)."""
    root = Path(root)
    return {k: root / d / f"{name}{s}" for k, (d, s) in KINDS.items() if caption or k != "caption"}


def relative_files(name: str, caption: bool = True) -> dict[str, str]:
    """kind -> path relative to the dataset root, with '/' (as written in the manifest)."""
    return {k: f"{d}/{name}{s}" for k, (d, s) in KINDS.items() if caption or k != "caption"}


def _existing_counter(root: Path, prefix: str) -> int:
    """One past the largest ``<prefix>_<n>`` among the names in image/ (a starting guess only)."""
    pat = re.compile(re.escape(prefix) + r"_(\d+)$")
    best = -1
    folder = root / KINDS["image"][0]
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = pat.match(os.path.splitext(entry.name)[0])
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def reserve_name(root: str | os.PathLike, prefix: str, caption: bool = True, digits: int = 5,
                 max_tries: int = 100_000) -> str:
    """Claim a fresh ``<prefix>_<counter>`` under ``root`` and return it.

    Every file of the sample is created empty with ``O_CREAT | O_EXCL``; if any exists already (another
    writer, an old sample) the claims made are undone and the next counter is tried. Safe against
    concurrent writers in other threads or processes; never touches an existing file.
    """
    root = Path(root)
    prefix = check_prefix(prefix)
    for d, _ in KINDS.values():
        (root / d).mkdir(parents=True, exist_ok=True)
    n = _existing_counter(root, prefix)
    for _ in range(max_tries):
        name = f"{prefix}_{n:0{digits}d}"
        created: list[Path] = []
        try:
            for path in sample_paths(root, name, caption=True).values():  # claim the caption name too
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                created.append(path)
        except FileExistsError:
            for path in created:
                path.unlink(missing_ok=True)
            n += 1
            continue
        if not caption:
            sample_paths(root, name)["caption"].unlink(missing_ok=True)
        return name
    raise UserError(f"no free sample name for prefix {prefix!r} in {root} after {max_tries} tries")


# ------------------------------------------------------------------------------------------ files
def write_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (replaces)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)


def remove_stale_temp_files(root: str | os.PathLike) -> int:
    """Delete temporary files (``.<name>.<pid>.<ns>.tmp`` from :func:`write_atomic`) left in ``root``'s
    sample folders by a writer that was killed mid-write. Only call it while no other writer uses
    ``root`` (the factory holds its folder lock). Returns how many were removed."""
    removed = 0
    for d, _ in KINDS.values():
        folder = Path(root) / d
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def encode_sample(image: torch.Tensor, alpha: torch.Tensor, foreground: torch.Tensor,
                  caption: str | None = None) -> dict[str, bytes]:
    """One sample's file contents: composite ``[H,W,3]``, alpha ``[H,W]`` (1 = foreground), straight
    foreground ``[H,W,3]`` (all 0..1 float) -> kind -> bytes (PNG / UTF-8 caption)."""
    if image.shape[:2] != alpha.shape or foreground.shape[:2] != alpha.shape:
        raise UserError(f"sample sizes differ: image {tuple(image.shape[:2])}, alpha {tuple(alpha.shape)}, "
                        f"foreground {tuple(foreground.shape[:2])} (HxW)")
    files = {
        "image": png_bytes(to_uint8(image[..., :3]), "RGB"),
        "alpha": png_bytes(to_uint8(alpha), "L"),
        "fg": png_bytes(to_uint8(foreground[..., :3]), "RGB"),
    }
    if caption is not None and caption != "":
        files["caption"] = caption.encode("utf-8")
    return files


def manifest_entry(name: str, files: Mapping[str, bytes], **meta: Any) -> dict:
    """The manifest line for a sample whose file contents are ``files`` (kind -> bytes)."""
    w, h = png_size(files["image"])
    for kind in IMAGE_KINDS[1:]:
        if png_size(files[kind]) != (w, h):
            raise UserError(f"sample {name}: {kind} is {png_size(files[kind])} but image is {(w, h)} (WxH)")
    rel = relative_files(name, caption="caption" in files)
    entry = {"name": name, "width": w, "height": h, "files": rel,
             "sha256": {k: sha256(files[k]) for k in rel}}
    entry.update({k: v for k, v in meta.items() if v is not None})
    return entry


def write_files(root: str | os.PathLike, name: str, files: Mapping[str, bytes]) -> dict[str, Path]:
    """Write a sample's files (kind -> bytes) under ``root`` (replacing what is there: claim first with
    :func:`reserve_name`, or own the name, as the factory does with its index-derived names)."""
    unknown = set(files) - set(KINDS)
    missing = set(IMAGE_KINDS) - set(files)
    if unknown or missing:
        raise ValueError(f"sample {name}: unknown kinds {sorted(unknown)} / missing {sorted(missing)}")
    paths = sample_paths(root, name, caption="caption" in files)
    for kind, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, files[kind])
    return paths


def append_manifest(root: str | os.PathLike, entries: list[dict] | dict) -> None:
    """Append JSON line(s) to ``root/manifest.jsonl`` in one ``write`` (all or nothing for a batch)."""
    if isinstance(entries, dict):
        entries = [entries]
    data = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries).encode("utf-8")
    path = Path(root) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def read_manifest(root: str | os.PathLike) -> list[dict]:
    """Every complete line of ``root/manifest.jsonl`` (a missing file is empty; a trailing line cut short by
    a crash is skipped; a broken line in the middle is an error)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    entries = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line has no newline: an interrupted append
                break
            raise UserError(f"{path}: line {i + 1} is not JSON") from None
    return entries


def repair_manifest(root: str | os.PathLike) -> bool:
    """Cut an unterminated last line (an append killed half-way) off the manifest; True if it did."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return False
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return False
    keep = raw[: raw.rfind(b"\n") + 1]
    write_atomic(path, keep)
    return True


def save_sample(root: str | os.PathLike, prefix: str, image: torch.Tensor, alpha: torch.Tensor,
                foreground: torch.Tensor, caption: str | None = None, **meta: Any) -> dict:
    """Write one sample under a fresh name (never overwriting) and append its manifest line; returns it.

    ``image``/``foreground``: ``[H,W,3]`` float 0..1 (foreground straight); ``alpha``: ``[H,W]``, 1 = fg."""
    files = encode_sample(image, alpha, foreground, caption)
    name = reserve_name(root, prefix, caption="caption" in files)
    entry = manifest_entry(name, files, caption=caption or None, **meta)
    write_files(root, name, files)
    append_manifest(root, entry)
    return entry


def verify(root: str | os.PathLike, entries: list[dict] | None = None) -> list[str]:
    """Problems with a dataset folder: manifest entries whose files are missing, differ from their
    sha256, or have other sizes; duplicate names. Empty list = consistent."""
    root = Path(root)
    entries = read_manifest(root) if entries is None else entries
    problems, seen = [], set()
    for e in entries:
        name = e.get("name")
        if name in seen:
            problems.append(f"{name}: listed twice")
        seen.add(name)
        for kind, rel in (e.get("files") or {}).items():
            path = root / rel
            if not path.is_file():
                problems.append(f"{name}: {rel} missing")
                continue
            data = path.read_bytes()
            if sha256(data) != (e.get("sha256") or {}).get(kind):
                problems.append(f"{name}: {rel} sha256 differs from the manifest")
            elif kind in IMAGE_KINDS and png_size(data) != (e.get("width"), e.get("height")):
                problems.append(f"{name}: {rel} is {png_size(data)}, manifest says {(e.get('width'), e.get('height'))}")
    return problems
