"""Tier-2 tests: the pack inside a real ComfyUI (in-process, CPU).

Run:  COMFYUI_PATH=/path/to/ComfyUI  <python with ComfyUI's requirements + this pack>  -m pytest tests/comfy
Without COMFYUI_PATH every test here is skipped (tier 1 / CI stays ComfyUI-free).
Set COMFYUI_TIER2_DEVICE=auto to let ComfyUI pick its device instead of forcing --cpu.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # lets the test modules `import harness`

import harness  # noqa: E402

SKIP_REASON = "COMFYUI_PATH not set: tier-2 ComfyUI tests skipped"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> harness.ComfyEnv:
    """ComfyUI booted once per session: built-in nodes loaded, this pack loaded through ComfyUI's own
    custom-node loader, every ComfyUI folder (models/input/output/temp/user/custom_nodes) in a scratch
    directory. Does not require the pack import to have succeeded (see ``comfy_pack``)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(SKIP_REASON)
    force_cpu = os.environ.get("COMFYUI_TIER2_DEVICE", "cpu").lower() == "cpu"
    return harness.boot(path, tmp_path_factory.mktemp("comfyui"), REPO, force_cpu=force_cpu)


@pytest.fixture(scope="session")
def comfy_pack(comfy) -> harness.ComfyEnv:
    """``comfy``, asserting ComfyUI imported the pack without failure."""
    if not comfy.pack_loaded:
        pytest.fail("ComfyUI failed to import the pack (IMPORT FAILED):\n" + "\n".join(comfy.pack_load_log),
                    pytrace=False)
    return comfy
