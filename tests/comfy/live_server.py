"""A real ComfyUI server (``main.py``, loopback only) for tier-2 tests: start it with every folder in a
scratch root and the pack linked into its ``custom_nodes``, wait until it answers, stop it.

Shared by the factory test (two servers) and the front-end test (one server and a browser)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("models", "input", "output", "temp", "user", "custom_nodes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process a test started (and its children: it leads its own process group)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def comfy_checkout(what: str) -> Path:
    """``COMFYUI_PATH`` resolved; skips (visible reason) when unset, fails when it is not a checkout."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip(f"COMFYUI_PATH not set: tier-2 {what} skipped")
    comfy_path = Path(comfy_path).resolve()
    if not (comfy_path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfy_path} has no main.py", pytrace=False)
    return comfy_path


def start(comfy_path: Path, root: Path) -> tuple[subprocess.Popen, str, Path, dict[str, Path]]:
    """Launch ``main.py`` (``--cpu`` unless ``COMFYUI_TIER2_DEVICE`` says otherwise) with its folders under
    ``root``; returns the process, its URL, its log file and the folders. Does not wait: see :func:`wait_up`."""
    dirs = {k: root / k for k in FOLDERS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["custom_nodes"] / harness.PACK_FOLDER_NAME).symlink_to(REPO, target_is_directory=True)
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(root), "--output-directory", str(dirs["output"]),
           "--input-directory", str(dirs["input"]), "--temp-directory", str(dirs["temp"]),
           "--user-directory", str(dirs["user"]), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    if os.environ.get("COMFYUI_TIER2_DEVICE", "cpu").lower() == "cpu":
        cmd.append("--cpu")
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path, dirs


def wait_up(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    """Wait until the server answers ``/system_stats``; fail with its log's tail if it exits, stays silent
    past ``timeout_s`` or reports that the pack failed to import."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{tail(log_path)}", pytrace=False)
        try:
            get_json(url + "/system_stats", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {timeout_s} s:\n{tail(log_path)}", pytrace=False)
            time.sleep(0.5)
    if re.search(r"IMPORT FAILED.*" + re.escape(harness.PACK_FOLDER_NAME), log_path.read_text(errors="replace")):
        pytest.fail("ComfyUI failed to import the pack:\n" + tail(log_path), pytrace=False)
