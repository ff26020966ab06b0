"""Matting-data factory, tier 1: the dataset layout (py/matting_dataset.py), the UI->API converter on
/object_info schemas, and the ComfyUI client + orchestration (py/factory.py) against an in-process fake
ComfyUI (stdlib http.server + a server-side RFC 6455 WebSocket) that queues prompts, runs them on a worker
thread, reports events on /ws, keeps /history and /queue and serves files on /view like ComfyUI 0.3.64.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_matting.py import factory as F
from diffusion_matting.py import matting_dataset as D
from diffusion_matting.py.errors import UserError
from diffusion_matting.py.workflow_api import ui_to_api

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ dataset layout
def _sample(h=6, w=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, 3, generator=g), torch.rand(h, w, generator=g), torch.rand(h, w, 3, generator=g)


def test_save_sample_layout_values_and_manifest(tmp_path):
    img, alpha, fg = _sample()
    e = D.save_sample(tmp_path, "cat", img, alpha, fg, caption="a cat, green background", seed=7, prompt="a cat")
    assert e["name"] == "cat_00000" and (e["width"], e["height"]) == (9, 6)
    assert e["files"] == {"image": "image/cat_00000.png", "alpha": "alpha/cat_00000.png", "fg": "fg/cat_00000.png",
                          "caption": "captions/cat_00000.txt"}
    assert e["seed"] == 7 and e["prompt"] == "a cat"
    got_alpha = np.asarray(Image.open(tmp_path / "alpha/cat_00000.png"))
    assert got_alpha.dtype == np.uint8 and got_alpha.shape == (6, 9)
    np.testing.assert_array_equal(got_alpha, np.round(alpha.numpy() * 255).astype(np.uint8))
    got_fg = np.asarray(Image.open(tmp_path / "fg/cat_00000.png").convert("RGB"))
    np.testing.assert_array_equal(got_fg, np.round(fg.numpy() * 255).astype(np.uint8))
    assert (tmp_path / "captions/cat_00000.txt").read_text(encoding="utf-8") == "a cat, green background"
    lines = (tmp_path / D.MANIFEST).read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [e]
    assert e["sha256"]["image"] == hashlib.sha256((tmp_path / "image/cat_00000.png").read_bytes()).hexdigest()
    assert D.verify(tmp_path) == []
    # no caption -> no caption file (and the claimed caption name is released)
    e2 = D.save_sample(tmp_path, "cat", img, alpha, fg)
    assert e2["name"] == "cat_00001" and "caption" not in e2["files"]
    assert not (tmp_path / "captions/cat_00001.txt").exists()
    # a corrupted file is reported
    (tmp_path / "fg/cat_00001.png").write_bytes(b"junk")
    assert D.verify(tmp_path) == ["cat_00001: fg/cat_00001.png sha256 differs from the manifest"]


def test_never_overwrites_and_concurrent_writers(tmp_path):
    img, alpha, fg = _sample(4, 5)
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha/s_00000.png").write_bytes(b"someone else's")  # any kind taken -> name skipped
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions/s_00001.txt").write_bytes(b"old caption")
    names, errors = [], []

    def writer(k):
        try:
            for i in range(6):
                names.append(D.save_sample(tmp_path, "s", img, alpha, fg, caption=f"w{k} {i}")["name"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(names) == 24 and len(set(names)) == 24
    assert "s_00000" not in names and "s_00001" not in names
    assert (tmp_path / "alpha/s_00000.png").read_bytes() == b"someone else's"
    assert (tmp_path / "captions/s_00001.txt").read_bytes() == b"old caption"
    entries = D.read_manifest(tmp_path)
    assert sorted(e["name"] for e in entries) == sorted(names)
    assert D.verify(tmp_path) == []
    # every caption file holds its own writer's text (no two writers shared a name)
    assert sorted((tmp_path / e["files"]["caption"]).read_text() for e in entries) == \
        sorted(f"w{k} {i}" for k in range(4) for i in range(6))


def test_manifest_cut_short_is_ignored_then_repaired(tmp_path):
    D.append_manifest(tmp_path, [{"name": "a"}, {"name": "b"}])
    with open(tmp_path / D.MANIFEST, "ab") as f:
        f.write(b'{"name": "c", "wid')  # a kill in the middle of an append
    assert [e["name"] for e in D.read_manifest(tmp_path)] == ["a", "b"]
    assert D.repair_manifest(tmp_path) and not D.repair_manifest(tmp_path)
    D.append_manifest(tmp_path, {"name": "d"})
    assert [e["name"] for e in D.read_manifest(tmp_path)] == ["a", "b", "d"]
    (tmp_path / D.MANIFEST).write_text('{"name": "a"}\nnot json\n{"name": "b"}\n')
    with pytest.raises(UserError, match="line 2"):
        D.read_manifest(tmp_path)


def test_names_and_sizes_are_checked(tmp_path):
    for bad in ("", "../x", "a/b", "-x"):
        with pytest.raises(UserError):
            D.check_prefix(bad)
    for bad in ("../up", "/abs", "a/../../b"):
        with pytest.raises(UserError):
            D.check_subfolder(bad)
    assert D.check_subfolder("data\\set/./one/") == "data/set/one"
    img, alpha, fg = _sample(4, 5)
    with pytest.raises(UserError, match="sizes differ"):
        D.save_sample(tmp_path, "s", img, alpha[:3], fg)
    assert not (tmp_path / D.MANIFEST).exists()


# ============================================================================ a fake ComfyUI
def _spec(typ, **opts):
    return [typ, opts] if opts else [typ]


OBJECT_INFO = {
    "CLIPTextEncode": {"input": {"required": {"text": _spec("STRING", multiline=True), "clip": _spec("CLIP")}},
                       "input_order": {"required": ["text", "clip"]}, "display_name": "CLIP Text Encode (Prompt)",
                       "output": ["CONDITIONING"]},
    "FakeSampler": {"input": {"required": {
        "positive": _spec("CONDITIONING"), "seed": _spec("INT", default=0, min=0, control_after_generate=True),
        "width": _spec("INT", default=8), "height": _spec("INT", default=8), "batch_size": _spec("INT", default=1)}},
        "input_order": {"required": ["positive", "seed", "width", "height", "batch_size"]},
        "display_name": "Fake Sampler", "output": ["IMAGE", "MASK", "IMAGE"]},
    "DM_SaveMattingSample": {"input": {
        "required": {"image": _spec("IMAGE"), "alpha": _spec("MASK"), "foreground": _spec("IMAGE"),
                     "subfolder": _spec("STRING", default="matting_dataset"), "prefix": _spec("STRING", default="sample")},
        "optional": {"mask_convention": ["COMBO", {"options": ["alpha (1 = foreground)", "ComfyUI mask (1 = background)"]}],
                     "caption": _spec("STRING", forceInput=True), "prompt": _spec("STRING", forceInput=True),
                     "seed": _spec("INT", forceInput=True)}},
        "input_order": {"required": ["image", "alpha", "foreground", "subfolder", "prefix"],
                        "optional": ["mask_convention", "caption", "prompt", "seed"]},
        "display_name": "Save Matting Sample", "output": [], "output_node": True},
}


def fake_workflow(batch=1, size=(8, 6)):
    """UI format: CLIPTextEncode titled 'prompt' -> FakeSampler(seed, control) -> Save Matting Sample, plus a
    note; the save node's caption comes from nowhere (fake caption = prompt, written by the fake executor)."""
    w, h = size
    nodes = [
        {"id": 3, "type": "CLIPTextEncode", "title": "prompt", "mode": 0, "widgets_values": ["placeholder"],
         "inputs": [{"name": "clip", "type": "CLIP", "link": None}], "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [1]}]},
        {"id": 5, "type": "FakeSampler", "mode": 0, "widgets_values": [123, "randomize", w, h, batch],
         "inputs": [{"name": "positive", "type": "CONDITIONING", "link": 1}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}, {"name": "MASK", "type": "MASK", "links": [3]},
                     {"name": "IMAGE", "type": "IMAGE", "links": [4]}]},
        {"id": 7, "type": "DM_SaveMattingSample", "mode": 0,
         "widgets_values": ["factory_test", "smp", "alpha (1 = foreground)"],
         "inputs": [{"name": "image", "type": "IMAGE", "link": 2}, {"name": "alpha", "type": "MASK", "link": 3},
                    {"name": "foreground", "type": "IMAGE", "link": 4}], "outputs": []},
        {"id": 9, "type": "Note", "mode": 0, "widgets_values": ["made by the factory test"], "inputs": [], "outputs": []},
    ]
    links = [[1, 3, 0, 5, 0, "CONDITIONING"], [2, 5, 0, 7, 0, "IMAGE"], [3, 5, 1, 7, 1, "MASK"], [4, 5, 2, 7, 2, "IMAGE"]]
    return {"last_node_id": 9, "last_link_id": 4, "nodes": nodes, "links": links, "version": 0.4, "extra": {}}


def fake_colour(text: str, seed: int, b: int) -> np.ndarray:
    d = hashlib.sha256(f"{text}|{seed}|{b}".encode()).digest()
    return np.array([d[0], d[1], d[2]], np.float32) / 255.0


class FakeComfy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, delay: float = 0.0, websocket: bool = True):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.root, self.delay, self.websocket = Path(root), delay, websocket
        self.output = self.root / "output"
        self.output.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Condition()
        self.pending: list[tuple] = []
        self.running: list[tuple] = []
        self.history: dict[str, dict] = {}
        self.sockets: dict[str, list] = {}
        self.submitted: list[str] = []
        self.executed: list[str] = []
        self.reject_prompts = False      # POST /prompt answers 400 (a prompt that fails validation)
        self.fail_execution = False      # the save node raises
        self.fail_next = 0               # ... for the next N executions only (a transient error: OOM)
        self.fail_text = None            # ... whenever the prompt text contains this (a deterministic error)
        self.closed = False
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.threads = [threading.Thread(target=self.serve_forever, daemon=True),
                        threading.Thread(target=self.worker, daemon=True)]
        for t in self.threads:
            t.start()

    def stop(self):
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.shutdown()
        self.server_close()
        for conns in self.sockets.values():
            for sock, _ in conns:
                try:
                    sock.close()
                except OSError:
                    pass

    # -- events ------------------------------------------------------------------------------------
    def send(self, event: str, data: dict, sid: str | None):
        payload = json.dumps({"type": event, "data": data}).encode()
        n = len(payload)
        head = bytes([0x81]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n) if n < 65536
                                else bytes([127]) + struct.pack("!Q", n))
        targets = self.sockets.get(sid, []) if sid else [c for v in self.sockets.values() for c in v]
        for sock, lock in list(targets):
            with lock:
                try:
                    sock.sendall(head + payload)
                except OSError:
                    pass

    # -- execution ---------------------------------------------------------------------------------
    def worker(self):
        while True:
            with self.lock:
                while not self.pending and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                item = self.pending.pop(0)
                self.running.append(item)
            pid, prompt, extra = item
            sid = extra.get("client_id")
            self.send("execution_start", {"prompt_id": pid}, sid)
            time.sleep(self.delay)
            outputs, messages, ok = {}, [], True
            try:
                outputs = self.execute(pid, prompt, sid)
                messages.append(["execution_success", {"prompt_id": pid}])
                self.send("execution_success", {"prompt_id": pid}, sid)
            except Exception as exc:
                ok = False
                err = {"prompt_id": pid, "node_id": "7", "node_type": "DM_SaveMattingSample",
                       "exception_message": str(exc), "exception_type": type(exc).__name__, "traceback": []}
                messages.append(["execution_error", err])
                self.send("execution_error", err, sid)
            with self.lock:
                self.running.remove(item)
                self.history[pid] = {"prompt": [0, pid, prompt, extra, []], "outputs": outputs,
                                     "status": {"status_str": "success" if ok else "error", "completed": ok,
                                                "messages": messages}}
                self.executed.append(pid)
            self.send("executing", {"node": None, "prompt_id": pid}, sid)

    def execute(self, pid, prompt, sid):
        outputs = {}
        for nid, node in prompt.items():
            if node["class_type"] != "DM_SaveMattingSample":
                continue
            self.send("executing", {"node": nid, "display_node": nid, "prompt_id": pid}, sid)
            inp = node["inputs"]
            samp = prompt[inp["image"][0]]["inputs"]
            text = prompt[samp["positive"][0]]["inputs"]["text"]
            with self.lock:
                transient = self.fail_next > 0
                self.fail_next -= transient
            if self.fail_execution or transient or (self.fail_text and self.fail_text in text):
                raise RuntimeError("out of green paint")
            w, h, seed = samp["width"], samp["height"], samp["seed"]
            yy, xx = np.mgrid[0:h, 0:w]
            alpha = torch.from_numpy(((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2).astype(np.float32))
            entries, root = [], self.output / inp["subfolder"]
            for b in range(samp["batch_size"]):
                fg = torch.from_numpy(np.broadcast_to(fake_colour(text, seed, b), (h, w, 3)).copy())
                img = fg * alpha[..., None] + torch.tensor([0.0, 1.0, 0.0]) * (1 - alpha[..., None])
                e = D.save_sample(root, inp["prefix"], img, alpha, fg, caption=text, batch_index=b)
                e["subfolder"] = inp["subfolder"]
                entries.append(e)
            ui = {"images": [], F.SAMPLES_KEY: entries}
            outputs[nid] = ui
            self.send("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid}, sid)
        return outputs


class FakeHandler(http.server.BaseHTTPRequestHandler):
    server: FakeComfy

    def log_message(self, *a):
        pass

    def _json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        s = self.server
        if u.path == "/object_info":
            return self._json(OBJECT_INFO)
        if u.path == "/queue":
            with s.lock:
                return self._json({"queue_running": [[0, p, {}, {}, []] for p, *_ in s.running],
                                   "queue_pending": [[1, p, {}, {}, []] for p, *_ in s.pending]})
        if u.path.startswith("/history/"):
            pid = urllib.parse.unquote(u.path[len("/history/"):])
            with s.lock:
                return self._json({pid: s.history[pid]} if pid in s.history else {})
        if u.path == "/view":
            path = s.output / q.get("subfolder", "") / q["filename"]
            if q.get("type", "output") != "output" or not path.is_file():
                return self._json({}, 404)
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if u.path == "/ws" and s.websocket and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket(q.get("clientId") or uuid.uuid4().hex)
        return self._json({}, 404)

    def _websocket(self, sid):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + F.WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        conn = (self.connection, threading.Lock())
        self.server.sockets.setdefault(sid, []).append(conn)
        self.server.send("status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}, sid)
        try:
            while True:  # read client frames until close (they are masked)
                head = self.rfile.read(2)
                if len(head) < 2 or head[0] & 0x0F == 8:
                    break
                n = head[1] & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self.rfile.read(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self.rfile.read(8))[0]
                self.rfile.read(4 + n)
        except OSError:
            pass
        finally:
            self.server.sockets[sid].remove(conn)
            self.close_connection = True

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/prompt":
            return self._json({}, 404)
        prompt = body["prompt"]
        unknown = [n["class_type"] for n in prompt.values() if n["class_type"] not in OBJECT_INFO]
        if s.reject_prompts or unknown:
            return self._json({"error": {"type": "prompt_outputs_failed_validation",
                                         "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                               "node_errors": {"5": {"errors": [{"type": "value_bigger_than_max",
                                                                 "message": "Value 4096 bigger than max of 64",
                                                                 "details": "width"}],
                                                     "class_type": "FakeSampler"}}}, 400)
        pid = str(body.get("prompt_id") or uuid.uuid4())
        extra = dict(body.get("extra_data") or {})
        extra["client_id"] = body.get("client_id")
        with s.lock:
            s.submitted.append(pid)
            s.pending.append((pid, prompt, extra))
            s.lock.notify_all()
        return self._json({"prompt_id": pid, "number": len(s.submitted), "node_errors": {}})


@pytest.fixture
def fake(tmp_path):
    servers = []

    def make(**kw):
        s = FakeComfy(tmp_path / f"server{len(servers)}", **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def _factory(servers, out, count, prompts=("a red fox", "a blue vase", "a tall lamp"), **kw):
    kw.setdefault("seed", 1000)
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("log", lambda msg: None)
    return F.Factory([s.url for s in servers], fake_workflow(batch=kw.pop("batch", 1)), list(prompts), count, out,
                     **kw)


def _check_dataset(out: Path, count: int, prompts, seed=1000, batch=1):
    """Every job exactly once, right prompt/seed (the colours prove what was injected), files complete."""
    entries = D.read_manifest(out)
    assert D.verify(out, entries) == []
    jobs = sorted(e["job"] for e in entries)
    assert jobs == sorted(j for j in range(count) for _ in range(batch))
    for e in entries:
        j = e["job"]
        assert e["prompt"] == prompts[j % len(prompts)] and e["seed"] == seed + j
        assert (out / e["files"]["caption"]).read_text() == e["prompt"]  # the node's caption file came along
        fg = np.asarray(Image.open(out / e["files"]["fg"]).convert("RGB")).astype(np.float32) / 255
        want = fake_colour(e["prompt"], e["seed"], e["batch_index"])
        assert np.abs(fg - want).max() <= 0.5 / 255 + 1e-6
        assert (e["width"], e["height"]) == (8, 6)
    names = [e["name"] for e in entries]
    assert len(set(names)) == len(names)
    on_disk = sorted(p.stem for p in (out / "image").iterdir())
    assert on_disk == sorted(names), "files outside the manifest (duplicates or leftovers)"
    return entries


# ============================================================================ converter + injection
def test_ui_to_api_with_object_info_and_injection():
    api = ui_to_api(fake_workflow(batch=2), OBJECT_INFO)
    assert api == {
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "placeholder"}, "_meta": {"title": "prompt"}},
        "5": {"class_type": "FakeSampler", "inputs": {"seed": 123, "width": 8, "height": 6, "batch_size": 2,
                                                      "positive": ["3", 0]}, "_meta": {"title": "Fake Sampler"}},
        "7": {"class_type": "DM_SaveMattingSample",
              "inputs": {"subfolder": "factory_test", "prefix": "smp", "mask_convention": "alpha (1 = foreground)",
                         "image": ["5", 0], "alpha": ["5", 1], "foreground": ["5", 2]},
              "_meta": {"title": "Save Matting Sample"}},
    }
    plan = F.plan_injection(api)
    assert plan.text_targets == [("3", "text")] and plan.seed_targets == [("5", "seed")]
    out = F.inject(api, plan, "a green cat", 77)
    assert out["3"]["inputs"]["text"] == "a green cat" and out["5"]["inputs"]["seed"] == 77
    assert api["3"]["inputs"]["text"] == "placeholder"  # the template is not modified
    # untitled: the CLIPTextEncode feeding `positive` is found; nothing to inject into -> user error
    api["3"]["_meta"]["title"] = "CLIP Text Encode (Prompt)"
    assert F.plan_injection(api).text_targets == [("3", "text")]
    del api["5"]["inputs"]["positive"]
    with pytest.raises(UserError, match="nowhere to put the prompts"):
        F.plan_injection(api)


# ============================================================================ client against the fake
def test_client_submit_wait_view_with_websocket(fake):
    s = fake()
    c = F.ComfyClient(s.url, poll_interval=0.05)
    api = F.inject(ui_to_api(fake_workflow(), c.object_info()), F.plan_injection(ui_to_api(fake_workflow(), OBJECT_INFO)),
                   "a white owl", 5)
    assert c.connect()
    pid = c.submit(api, prompt_id="my-own-id")
    assert pid == "my-own-id" and s.submitted == ["my-own-id"]
    entry = c.wait(pid, timeout=20)
    kinds = [e["type"] for e in c.events if (e.get("data") or {}).get("prompt_id") == pid]
    assert kinds[0] == "execution_start" and "executed" in kinds and "execution_success" in kinds
    sample = entry["outputs"]["7"][F.SAMPLES_KEY][0]
    data = c.view(sample["files"]["fg"].split("/")[1], "factory_test/fg")
    assert D.sha256(data) == sample["sha256"]["fg"]
    assert c.queued() == set() and c.history("nope") is None
    with pytest.raises(F.ServerError, match="HTTP 404"):
        c.view("missing.png", "factory_test/fg")
    c.close()


def test_factory_two_servers_spread_jobs(fake, tmp_path):
    a, b = fake(delay=0.05), fake(delay=0.05, websocket=False)  # the second one is polled
    res = _factory([a, b], tmp_path / "ds", 8, batch=2).run()
    assert sorted(r.job for r in res) == list(range(8))
    assert len(a.executed) + len(b.executed) == 8 and a.executed and b.executed
    assert set(a.executed).isdisjoint(b.executed)
    entries = _check_dataset(tmp_path / "ds", 8, ("a red fox", "a blue vase", "a tall lamp"), batch=2)
    assert {e["name"] for e in entries if e["job"] == 3} == {"sample_000003_00", "sample_000003_01"}
    assert {e["server"] for e in entries} == {a.url, b.url}
    # running again does nothing
    assert _factory([a, b], tmp_path / "ds", 8, batch=2).run() == []
    assert len(a.executed) + len(b.executed) == 8


class SimulatedKill(BaseException):
    pass


def test_resume_after_kill_loses_and_duplicates_nothing(fake, tmp_path, monkeypatch):
    s = fake(delay=0.02)
    out = tmp_path / "ds"
    prompts = ("a red fox", "a blue vase", "a tall lamp")
    real_append = D.append_manifest
    calls = []

    def dying_append(root, entries):  # the 4th job dies after its files, before its manifest line
        calls.append(Path(root) == out)  # (the fake server's node writes manifests too)
        if sum(calls) == 4 and calls[-1]:
            raise SimulatedKill()
        real_append(root, entries)

    monkeypatch.setattr(F.D, "append_manifest", dying_append)
    with pytest.raises(SimulatedKill):
        _factory([s], out, 7, prompts).run()
    monkeypatch.setattr(F.D, "append_manifest", real_append)
    assert len(D.read_manifest(out)) == 3
    with open(out / D.MANIFEST, "ab") as f:
        f.write(b'{"job": 99, "na')  # plus a line cut short
    stale = out / "image" / ".sample_000003_00.png.12345.678.tmp"  # and a write cut short
    stale.write_bytes(b"half a png")
    state = json.loads((out / F.STATE_FILE).read_text())
    res = _factory([s], out, 7, prompts).run()
    _check_dataset(out, 7, prompts)
    assert not stale.exists()
    assert json.loads((out / F.STATE_FILE).read_text()) == state
    # the killed job was found finished on the server: downloaded, not queued again
    assert len(s.submitted) == 7 and len(set(s.submitted)) == 7 and len(s.executed) == 7
    assert [r.reused for r in res if r.job == 3] == ["history"]
    # resuming with other arguments is refused
    with pytest.raises(UserError, match="--prompts"):
        _factory([s], out, 7, ("something else",)).run()
    with pytest.raises(UserError, match="--seed"):
        _factory([s], out, 7, prompts, seed=5).run()


def test_server_error_responses(fake, tmp_path):
    s = fake()
    s.reject_prompts = True
    with pytest.raises(F.ServerError, match=r"HTTP 400: Prompt outputs failed validation.*node 5 \(FakeSampler\): "
                                             r"Value 4096 bigger than max of 64"):
        _factory([s], tmp_path / "a", 2).run()
    s.reject_prompts, s.fail_execution = False, True
    with pytest.raises(F.ServerError, match=r"failed in node 7 \(DM_SaveMattingSample\): RuntimeError: out of green paint"):
        _factory([s], tmp_path / "b", 2).run()
    assert D.read_manifest(tmp_path / "b") == []
    # no server reachable
    dead = f"http://127.0.0.1:{s.server_address[1]}"
    s.stop()
    with pytest.raises(UserError, match="no --server could be reached"):
        F.Factory([dead], fake_workflow(), ["x"], 1, tmp_path / "c", log=lambda m: None).run()


def test_failed_jobs_are_retried_under_new_prompt_ids(fake, tmp_path):
    s = fake()
    s.fail_next = 3  # the first three executions fail (a transient server error)
    prompts = ("a red fox", "a blue vase", "a tall lamp")
    out = tmp_path / "ds"
    f = _factory([s], out, 4, prompts, retries=3)
    f.run()
    _check_dataset(out, 4, prompts)  # every job once, with its own prompt and seed
    assert len(s.submitted) == 4 + 3 and len(set(s.submitted)) == 7  # each retry under its own prompt_id
    assert sum(f.attempts.values()) == 3
    # with no retries the first failure stops the run, naming the node and the error
    s.fail_next = 1
    with pytest.raises(F.JobFailed, match=r"node 7 \(DM_SaveMattingSample\): RuntimeError: out of green paint"):
        _factory([s], tmp_path / "ds2", 2, prompts, retries=0).run()


def test_keep_going_sets_failing_jobs_aside_and_a_rerun_tries_just_those(fake, tmp_path):
    s = fake()
    s.fail_text = "vase"  # jobs 1 and 4 (prompt j % 3 == 1) fail every time
    prompts = ("a red fox", "a blue vase", "a tall lamp")
    out = tmp_path / "ds"
    with pytest.raises(UserError, match=r"2 job\(s\) failed 2 time\(s\) and were set aside: \[1, 4\]"):
        _factory([s], out, 6, prompts, retries=1, keep_going=True).run()
    assert sorted(e["job"] for e in D.read_manifest(out)) == [0, 2, 3, 5]
    assert len(s.submitted) == 4 + 2 * 2
    # without --keep-going the first job that fails every try stops the run
    with pytest.raises(F.JobFailed, match="out of green paint"):
        _factory([s], tmp_path / "ds2", 6, prompts, retries=1).run()
    # fixed server: the rerun queues only jobs 1 and 4, skipping (not counting) the tries that failed before
    s.fail_text = None
    before = len(s.submitted)
    f = _factory([s], out, 6, prompts, retries=0)
    f.run()
    _check_dataset(out, 6, prompts)
    new = s.submitted[before:]
    assert len(new) == 2 and f.attempts == {}
    assert set(new) == {f.job_prompt_id(1, 2), f.job_prompt_id(4, 2)}  # tries 0 and 1 failed in the first run


def test_cli_sigkill_and_restart(fake, tmp_path, capsys):
    """The real verb in a subprocess, killed with SIGKILL mid-run, then run again to completion."""
    s = fake(delay=0.25)
    wf, prompts, out = tmp_path / "wf.json", tmp_path / "prompts.txt", tmp_path / "ds"
    wf.write_text(json.dumps(fake_workflow()))
    prompts.write_text("# three prompts\na red fox\n\na blue vase\na tall lamp\n")
    cmd = [sys.executable, "-m", "diffusion_matting.py.cli", "factory", "--server", s.url, "--workflow", str(wf),
           "--prompts", str(prompts), "--count", "6", "--out", str(out), "--seed", "1000", "--poll", "0.05"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(D.read_manifest(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    done_before = len(D.read_manifest(out))
    assert 2 <= done_before < 6
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_dataset(out, 6, ("a red fox", "a blue vase", "a tall lamp"))
    deadline = time.monotonic() + 5
    while len(s.executed) < len(set(s.submitted)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(s.submitted) == len(set(s.submitted)) == 6, "a job was queued twice"
    # bad input: exit code 2 with a one-line reason (in-process: the same entry point)
    from diffusion_matting.py.cli import main

    assert main([*cmd[3:-4], "--seed", "5"]) == 2
    assert "other --seed" in capsys.readouterr().err
