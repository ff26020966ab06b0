"""Tier 2: the matting-data factory against REAL ComfyUI servers (``main.py``, loopback, ``--cpu``).

Two ComfyUI servers run with every folder in a scratch directory and this pack symlinked into their
``custom_nodes/`` (as a user installs it). The workflow makes a sample without model weights: a green
EmptyImage with a feathered, seeded-noise subject composited on it (ImageCompositeMasked) -> GreenPost ->
Save Matting Sample; a String (Multiline) node titled "prompt" feeds the caption and the manifest, an Int
node titled "seed" feeds ImageAddNoise and the manifest. The ``diffusion-matting factory`` verb runs in a
subprocess, is SIGKILLed mid-run and restarted: every job is in the dataset exactly once with all files,
sizes and sha256 agree, each server ran each job it got once, and the server-side manifests (written by
the node) record the injected prompt and seed. The /object_info-based converter (py/workflow_api.py) is
also checked against the harness's converter on the shipped workflows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness
import live_server

REPO = Path(__file__).resolve().parents[2]
SERVER_TIMEOUT_S = 150
COUNT, BATCH = 6, 2
PROMPTS = ["a red fox, pure green background", "a blue vase, pure green background", "a brass lamp"]
ALPHA = "alpha (1 = foreground)"


def _graph_module():
    spec = importlib.util.spec_from_file_location("dm_build_workflows", REPO / "scripts" / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def procedural_factory_workflow() -> dict:
    """UI-format workflow (as the front end saves it): no model weights needed."""
    g = _graph_module().Graph("Matting-data factory test (procedural)")
    prompt = g.node("PrimitiveStringMultiline", ["placeholder prompt"], outputs=[("STRING", "STRING")], title="prompt")
    seed = g.node("PrimitiveInt", [0, "fixed"], outputs=[("INT", "INT")], title="seed")
    bg = g.node("EmptyImage", [64, 48, BATCH, 0x00FF00], outputs=[("IMAGE", "IMAGE")], title="green backdrop")
    subj = g.node("EmptyImage", [32, 24, 1, 0xC04020], outputs=[("IMAGE", "IMAGE")], title="subject colour")
    noisy = g.node("ImageAddNoise", [0, "fixed", 0.25], {"image": ("IMAGE", (subj, 0)), "seed": ("INT", (seed, 0))},
                   [("IMAGE", "IMAGE")])
    solid = g.node("SolidMask", [1.0, 32, 24], outputs=[("MASK", "MASK")])
    feather = g.node("FeatherMask", [6, 6, 6, 6], {"mask": ("MASK", (solid, 0))}, [("MASK", "MASK")])
    comp = g.node("ImageCompositeMasked", [16, 12, False],
                  {"destination": ("IMAGE", (bg, 0)), "source": ("IMAGE", (noisy, 0)), "mask": ("MASK", (feather, 0))},
                  [("IMAGE", "IMAGE")])
    gp = g.node("DM_GreenPost", ["auto (K-Means)", "#00ff00", 1.0, 1.0, 1.0, False, ALPHA],
                {"image": ("IMAGE", (comp, 0))},
                [("foreground", "IMAGE"), ("alpha", "MASK"), ("rgba", "IMAGE"), ("clean_plate", "IMAGE"),
                 ("key", "STRING")])
    save = g.node("DM_SaveMattingSample", ["factory_t2", "gen", ALPHA],
                  {"image": ("IMAGE", (comp, 0)), "alpha": ("MASK", (gp, 1)), "foreground": ("IMAGE", (gp, 0)),
                   "caption": ("STRING", (prompt, 0)), "prompt": ("STRING", (prompt, 0)), "seed": ("INT", (seed, 0))})
    for entry in g.nodes[save - 1]["inputs"]:  # socket-only (force_input) STRING/INT inputs: no widget
        if entry["name"] in ("caption", "prompt", "seed"):
            entry.pop("widget", None)
    return g.to_json()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    comfy_path = live_server.comfy_checkout("factory test (real ComfyUI servers)")
    started = []
    try:
        for i in range(2):  # start both, then wait: they boot in parallel
            root = tmp_path_factory.mktemp(f"comfyui_factory{i}")
            started.append(live_server.start(comfy_path, root))
        for proc, url, log_path, _dirs in started:
            live_server.wait_up(proc, url, log_path, SERVER_TIMEOUT_S)
        yield [{"url": url, "output": dirs["output"], "log": log_path} for _p, url, log_path, dirs in started]
    finally:
        for proc, *_ in started:
            live_server.stop(proc)


def test_object_info_converter_matches_harness(servers):
    """py/workflow_api.ui_to_api on /object_info == the harness's converter (same schemas) on every shipped
    workflow and the factory workflows (titles aside: the harness falls back to class names offline)."""
    from diffusion_matting.py.workflow_api import schemas_from_object_info, ui_to_api

    info = live_server.get_json(servers[0]["url"] + "/object_info", timeout=120)
    schemas = schemas_from_object_info(info)
    flows = {p.name: json.loads(p.read_text()) for p in sorted((REPO / "workflows").glob("*.json"))}
    flows["procedural"] = procedural_factory_workflow()
    factory_wf = flows["matting_data_factory.json"]  # shipped (scripts/build_workflows.py)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    for name, wf in flows.items():
        ours = ui_to_api(wf, info, strict=True)
        theirs = harness.ui_to_api(wf, schemas, strict=True)
        assert strip(ours) == strip(theirs), name
        for nid, node in ours.items():  # ours carries the server's display names
            if ":" in nid:
                continue
            want = next(n.get("title") for n in wf["nodes"] if str(n["id"]) == nid) or info[node["class_type"]]["display_name"]
            assert node["_meta"]["title"] == want
    # the factory finds where the prompt and the seed go, and the save node is wired as documented
    from diffusion_matting.py import factory as F

    api = ui_to_api(factory_wf, info, strict=True)
    plan = F.plan_injection(api)
    assert [api[n]["class_type"] for n, _ in plan.text_targets] == ["PrimitiveStringMultiline"]
    assert [api[n]["class_type"] for n, _ in plan.seed_targets] == ["PrimitiveInt"]
    save = api[F.save_nodes(api)[0]]["inputs"]
    assert api[save["caption"][0]]["class_type"] == "DM_GreenCanvasSample" and save["caption"][1] == 3
    assert api[save["foreground"][0]]["class_type"] == "DM_GreenPost"
    assert "DM_MattingHeadLoader" not in {n["class_type"] for n in api.values()}  # bypassed


def _run_factory(args, **kw):
    cmd = [sys.executable, "-m", "diffusion_matting.py.cli", "factory", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kw)


def _manifest(path: Path) -> list[dict]:
    from diffusion_matting.py import matting_dataset as D

    return D.read_manifest(path)


def test_factory_kill_and_resume_on_two_real_servers(servers, tmp_path):
    from diffusion_matting.py import matting_dataset as D

    wf, prompts, out = tmp_path / "factory.json", tmp_path / "prompts.txt", tmp_path / "dataset"
    wf.write_text(json.dumps(procedural_factory_workflow(), indent=1))
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--workflow", str(wf), "--prompts", str(prompts), "--count", str(COUNT), "--out", str(out),
            "--seed", "4242", "--poll", "0.2"]
    for s in servers:
        args += ["--server", s["url"]]

    proc = _run_factory(args)
    try:
        deadline = time.monotonic() + 240
        while len(_manifest(out)) < 2 * BATCH and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.fail(f"the factory ended before it could be killed (rc {proc.returncode}):\n{proc.stderr.read()}")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    before = {e["job"] for e in _manifest(out)}
    assert 2 <= len(before) < COUNT, f"killed too late to prove anything: {sorted(before)}"

    proc = _run_factory(args)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        live_server.stop(proc)
    assert proc.returncode == 0, stderr
    assert f"{COUNT}/{COUNT} in" in stdout

    entries = _manifest(out)
    assert D.verify(out, entries) == []
    assert sorted(e["job"] for e in entries) == sorted(j for j in range(COUNT) for _ in range(BATCH))
    names = [e["name"] for e in entries]
    assert len(set(names)) == len(names)
    for kind, (folder, suffix) in D.KINDS.items():
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(n + suffix for n in names), kind
    for e in entries:
        j = e["job"]
        assert (e["width"], e["height"]) == (64, 48)
        assert e["prompt"] == PROMPTS[j % len(PROMPTS)] and e["seed"] == 4242 + j
        assert e["name"] == f"sample_{j:06d}_{e['batch_index']:02d}" and e["batch_size"] == BATCH
        assert (out / e["files"]["caption"]).read_text(encoding="utf-8") == e["prompt"]
        for kind in D.IMAGE_KINDS:
            with Image.open(out / e["files"][kind]) as im:
                assert im.size == (64, 48) and im.mode == ("L" if kind == "alpha" else "RGB")
        a = np.asarray(Image.open(out / e["files"]["alpha"]), np.float32) / 255
        assert a[24, 32] > 0.9 and a[2, 2] < 0.1, "GreenPost keyed the subject"
    # the seed reached ImageAddNoise: different seeds, different subjects
    by_job = {e["job"]: e["sha256"]["image"] for e in entries if e["batch_index"] == 0}
    assert len(set(by_job.values())) == COUNT

    # server side: each job queued and run once in all (the restart collected, not re-queued, what the
    # killed run had sent), both servers worked, the node recorded the injected prompt and seed
    ran = {}
    for s in servers:
        hist = live_server.get_json(s["url"] + "/history", timeout=60)
        for pid, h in hist.items():
            if "diffusion_matting_factory" not in h["prompt"][3]:
                continue  # another test's prompt
            job = h["prompt"][3]["diffusion_matting_factory"]["job"]
            assert job not in ran, f"job {job} ran twice"
            ran[job] = s["url"]
            assert h["status"]["status_str"] == "success"
        node_entries = D.read_manifest(s["output"] / "factory_t2")
        assert len(node_entries) == BATCH * sum(1 for u in ran.values() if u == s["url"])
        for ne in node_entries:
            mine = next(e for e in entries if e["source"] == f"factory_t2/{ne['name']}" and e["server"] == s["url"])
            assert ne["sha256"] == mine["sha256"] and ne["prompt"] == mine["prompt"] and ne["seed"] == mine["seed"]
    assert sorted(ran) == list(range(COUNT))
    assert len(set(ran.values())) == 2, "the second server got no work"


def test_client_events_and_errors_from_a_real_server(servers):
    """The stdlib client against real ComfyUI: WebSocket events for our prompt, history outputs with the
    node's samples, /view bytes matching the node's sha256, and ComfyUI's own validation error as a
    one-line ServerError."""
    from diffusion_matting.py import factory as F
    from diffusion_matting.py import matting_dataset as D
    from diffusion_matting.py.workflow_api import ui_to_api

    url = servers[1]["url"]
    client = F.ComfyClient(url, poll_interval=0.2)
    api = ui_to_api(procedural_factory_workflow(), client.object_info())
    api = F.inject(api, F.plan_injection(api), "a lone test prompt", 99)
    assert client.connect(), "no WebSocket to ComfyUI"
    try:
        pid = client.submit(api, prompt_id="dm-factory-client-test")
        entry = client.wait(pid, timeout=120)
        kinds = [e["type"] for e in client.events if (e.get("data") or {}).get("prompt_id") == pid]
        assert "execution_start" in kinds and "executed" in kinds and "execution_success" in kinds
        samples = entry["outputs"][F.save_nodes(api)[0]][F.SAMPLES_KEY]
        assert len(samples) == BATCH and all(s["prompt"] == "a lone test prompt" and s["seed"] == 99 for s in samples)
        for s in samples:
            folder, name = s["files"]["alpha"].split("/")
            assert D.sha256(client.view(name, f"{s['subfolder']}/{folder}")) == s["sha256"]["alpha"]
        bad = json.loads(json.dumps(api))
        bg = next(n for n, v in bad.items() if v["_meta"]["title"] == "green backdrop")
        bad[bg]["inputs"]["width"] = 0
        with pytest.raises(F.ServerError, match=r"HTTP 400: .*EmptyImage.*width"):
            client.submit(bad)
    finally:
        client.close()
