"""Browser check: every shipped workflow (workflows/*.json) loads in ComfyUI's REAL front end.

ComfyUI's own server (``main.py``, loopback only, ``--cpu``) runs with every folder in a scratch
directory and this pack symlinked into its ``custom_nodes/``; it serves the front end that
ComfyUI pins (``comfyui-frontend-package`` from PyPI). Headless Chromium loads the page, driven over
the DevTools protocol by the small client below (aiohttp websockets: a ComfyUI dependency, so no new
package). For each workflow the test calls the front end's own ``app.loadGraphData`` and asserts:

* no missing-node dialog, no missing-models dialog, no warning/error toast (the workflow validator and
  link fixer report there), every node type registered (``LiteGraph.registered_node_types``) and no
  node with ``has_errors`` (LiteGraph's placeholder for an unknown type);
* no console error, warning or uncaught exception that mentions the pack (its node ids, display names,
  folder, module) at any time, and no console error at all while the workflow loads (except the page's
  failed requests to the internet, which tests do not have);
* every node of the pack shows the widgets its /object_info schema implies (names, in order), inside
  the node's box; every node's widget values are the ones the harness's ``map_widget_values`` reads
  from the file (so tier-2's UI->API conversion and the real front end agree);
* after fitting the graph to the view, every node lies in the viewport and the screenshot is not blank.

Front-end quirks handled: a fresh user gets the template browser on first load (closed before the
checks); the workflow tabs, minimap and canvas-info overlay are moved/hidden and the level-of-detail
threshold lowered for the screenshots only (``DISPLAY_SETTINGS``); the graph is fitted into the free
canvas area by the test (the front end's own fit zooms to 75 % of the window, menus ignored).

``DM_UPDATE_SCREENSHOTS=1`` writes the screenshots to ``docs/workflows/<name>.png`` and the
thumbnails next to the workflows (``workflows/<name>.jpg``, 480 px wide); otherwise nothing in the
repository is touched. Input images named by LoadImage widgets are generated (procedural samples) so
the previews show something; model files are not: a combo value that names a missing file is kept as
is by the front end (it is shown, not reset - ComfyUI only complains when the prompt is queued).

Skipped when ``COMFYUI_PATH`` is unset, when no Chromium is found (``DM_CHROMIUM`` or ``chromium`` /
``chromium-browser`` / ``google-chrome`` on PATH), or when aiohttp is missing. ``COMFYUI_PYTHON``
picks the interpreter that runs ComfyUI (default: this one).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness
import live_server
from diffusion_matting.py.workflow_api import ObjectInfoSchema  # an /object_info entry as a schema

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
VIEWPORT = (1280, 800)
THUMB_WIDTH = 480
THUMB_MAX_BYTES = 60_000
UPDATE = os.environ.get("DM_UPDATE_SCREENSHOTS", "") not in ("", "0")
SERVER_TIMEOUT_S = 150
PACK_MODULE = f"custom_nodes.{harness.PACK_FOLDER_NAME}"
# front-end-only widgets that are not inputs of the node (see harness.widget_layout)
EXTRA_WIDGETS = {"control_after_generate", "control_filter_list", "upload"}
# console noise that cannot come from a workflow: the page reaching for the internet (there is none in
# tests: the release-notes check against api.comfy.org fails with net::ERR_NAME_NOT_RESOLVED)
EXTERNAL_URL = re.compile(r"^https?://(?!127\.0\.0\.1[:/])", re.I)


# ---- environment -----------------------------------------------------------------------------------

def _find_chromium() -> str | None:
    cand = os.environ.get("DM_CHROMIUM")
    if cand:
        return cand if os.access(cand, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# ---- a minimal DevTools-protocol client ------------------------------------------------------------

class CDPError(RuntimeError):
    pass


class CDP:
    """One websocket to one page target: commands by id, events appended to ``events``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.session = None
        self.ws = None
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.phase = "start"  # tags the events that arrive (page start-up, then each workflow's name)
        self.reader = None

    def run(self, coro, timeout: float = 60.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def connect(self, ws_url: str) -> None:
        import aiohttp
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0, autoping=True)
        self.reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        import aiohttp
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self.pending.pop(data.get("id"), None) if "id" in data else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(data)
            elif "method" in data:
                data["phase"] = self.phase
                self.events.append(data)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(CDPError("DevTools websocket closed"))

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        fut = self.loop.create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        data = await fut
        if "error" in data:
            raise CDPError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def eval(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError("page JS failed: " + ((d.get("exception") or {}).get("description") or d.get("text", "")))
        return r["result"].get("value")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            try:
                await asyncio.wait_for(self.reader, 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort at teardown
                pass
        if self.session is not None:
            await self.session.close()


def console_messages(events: list[dict]) -> list[dict]:
    """Console errors/warnings, uncaught exceptions and browser log errors as {level, text, url, phase}."""
    out = []
    for ev in events:
        m, p = ev["method"], ev.get("params", {})
        n = len(out)
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            parts = []
            for a in p.get("args", []):
                v = a.get("value", a.get("description", a.get("unserializableValue", "")))
                parts.append(v if isinstance(v, str) else json.dumps(v))
            frames = (p.get("stackTrace") or {}).get("callFrames") or []
            out.append({"level": "error" if p["type"] != "warning" else "warning", "text": " ".join(parts),
                        "url": " ".join(f.get("url", "") for f in frames[:5])})
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            out.append({"level": "exception", "text": text, "url": d.get("url", "")})
        elif m == "Log.entryAdded":
            e = p.get("entry", {})
            if e.get("level") in ("error", "warning"):
                out.append({"level": e["level"] if e["level"] == "warning" else "error",
                            "text": e.get("text", ""), "url": e.get("url", "")})
        if len(out) > n:
            out[-1]["phase"] = ev.get("phase")
    return out


# ---- page-side JavaScript ----------------------------------------------------------------------------

JS_READY = """(() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
  && document.querySelector('#graph-canvas')))()"""

JS_DIALOGS = """(() => [...document.querySelectorAll('.global-dialog')].map(d => ({
  key: d.getAttribute('aria-labelledby'), text: (d.innerText || '').slice(0, 400)})))()"""

JS_CLOSE_DIALOGS = """(async () => {
  for (let i = 0; i < 5; i++) {
    const btns = [...document.querySelectorAll('.global-dialog .p-dialog-close-button')];
    if (!btns.length) break;
    btns.forEach(b => b.click());
    await new Promise(r => setTimeout(r, 150));
  }
  document.querySelectorAll('.p-toast-close-button').forEach(b => b.click());
  return document.querySelectorAll('.global-dialog').length;
})()"""

JS_LOAD = """(async (wf, name) => {
  const t0 = performance.now();
  await window.app.loadGraphData(wf, true, true, name);
  const frame = () => new Promise(r => requestAnimationFrame(() => r()));
  await frame(); await frame();
  await new Promise(r => setTimeout(r, 300));   // dialogs / toasts are mounted asynchronously
  await frame();
  return performance.now() - t0;
})(%s, %s)"""

JS_ADD_NODES = """(async (types) => {
  await window.app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                  config: {}, extra: {}, version: 0.4}, true, true, 'dm_all_nodes');
  const cols = Math.ceil(Math.sqrt(types.length)), made = [], colY = new Array(cols).fill(0);
  types.forEach((t, i) => {
    const n = window.LiteGraph.createNode(t);
    if (!n) return;
    const c = i %% cols;
    n.pos = [c * 460, colY[c]];
    colY[c] += n.size[1] + 90;
    window.app.graph.add(n);
    made.push(t);
  });
  const frame = () => new Promise(r => requestAnimationFrame(() => r()));
  await frame(); await frame();
  return made;
})(%s)"""

JS_INSPECT = """(() => {
  const reg = window.LiteGraph.registered_node_types;
  const plain = v => (v === null || ['string', 'number', 'boolean'].includes(typeof v)) ? v : String(v);
  const comboValues = w => {
    let v = w.options && w.options.values;
    if (typeof v === 'function') { try { v = v(); } catch (e) { v = null; } }
    return Array.isArray(v) ? v.map(String) : null;
  };
  const ds = window.app.canvas.ds;
  const nodes = window.app.graph.nodes.map(n => {
    const [x, y, w, h] = n.boundingRect;
    const [cx0, cy0] = ds.convertOffsetToCanvas([x, y]);
    const [cx1, cy1] = ds.convertOffsetToCanvas([x + w, y + h]);
    return {
      id: n.id, type: n.type, title: n.title, registered: n.type in reg, has_errors: !!n.has_errors,
      collapsed: !!(n.flags && n.flags.collapsed), size: [n.size[0], n.size[1]],
      screen: [cx0, cy0, cx1, cy1],
      widgets: (n.widgets || []).map(w => ({
        name: w.name, type: w.type, value: plain(w.value), y: w.y, hidden: !!w.hidden,
        height: (typeof w.computedHeight === 'number') ? w.computedHeight
              : (w.computeSize ? w.computeSize(n.size[0])[1] : window.LiteGraph.NODE_WIDGET_HEIGHT),
        options: w.type === 'combo' ? comboValues(w) : null,
      })),
    };
  });
  const toasts = [...document.querySelectorAll('.p-toast-message')].map(t => ({
    cls: t.className, text: (t.innerText || '').slice(0, 400)}));
  const dialogs = [...document.querySelectorAll('.global-dialog')].map(d => ({
    key: d.getAttribute('aria-labelledby'), text: (d.innerText || '').slice(0, 400)}));
  const canvas = document.querySelector('#graph-canvas').getBoundingClientRect();
  return {nodes, toasts, dialogs, registered: Object.keys(reg),
          canvas: [canvas.left, canvas.top, canvas.width, canvas.height]};
})()"""

# Display-only settings for the screenshots (the checks do not depend on them): workflow tabs in the
# sidebar (the top bar then names the loaded workflow), no minimap / canvas-info overlay over the graph,
# full node detail down to 4 px text (the default LOD threshold, 8 px, blanks titles and widgets below
# ~57 % zoom, which a seven-column graph needs at 1280 px).
DISPLAY_SETTINGS = {
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 4,
}
JS_SETTINGS = """(async (values) => {
  const s = window.app.extensionManager.setting;
  for (const [k, v] of Object.entries(values)) await s.set(k, v);
  return Object.fromEntries(Object.keys(values).map(k => [k, s.get(k)]));
})(%s)"""

# Fit every node and group into the part of the canvas the menus leave free.
JS_FIT = """(() => {
  const items = [...window.app.graph.nodes, ...(window.app.graph.groups || [])];
  if (!items.length) return null;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const it of items) {
    const [x, y, w, h] = it.boundingRect;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const pad = 24;
  x0 -= pad; y0 -= pad; x1 += pad; y1 += pad;
  const c = document.querySelector('#graph-canvas').getBoundingClientRect();
  // free area: below the top bar / tabs and right of the side toolbar, measured from the DOM
  let top = 0, left = 0, bottom = c.height;
  for (const sel of ['.comfyui-menu', '.workflow-tabs-container', '.comfy-menu-button-wrapper', '.top-menubar',
                     '.actionbar', '.comfyui-body-top']) {
    for (const el of document.querySelectorAll(sel)) {
      const r = el.getBoundingClientRect();
      if (r.height > 0 && r.top < c.height / 3) top = Math.max(top, r.bottom - c.top);
    }
  }
  for (const el of document.querySelectorAll('.side-tool-bar-container')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.left < c.width / 3) left = Math.max(left, r.right - c.left);
  }
  for (const el of document.querySelectorAll('.p-buttongroup, .graph-canvas-menu, .minimap-main-container')) {
    const r = el.getBoundingClientRect();
    if (r.height > 0 && r.top > c.height * 2 / 3) bottom = Math.min(bottom, r.top - c.top);
  }
  const aw = c.width - left - 8, ah = bottom - top - 8;
  const ds = window.app.canvas.ds;
  const scale = Math.min(aw / (x1 - x0), ah / (y1 - y0), 1.25);
  ds.scale = scale;
  if (typeof window.app.canvas.updateLowQualityThreshold === 'function') window.app.canvas.updateLowQualityThreshold();
  ds.offset[0] = (left + 4 + (aw - (x1 - x0) * scale) / 2) / scale - x0;
  ds.offset[1] = (top + 4 + (ah - (y1 - y0) * scale) / 2) / scale - y0;
  window.app.canvas.setDirty(true, true);
  window.app.canvas.draw(true, true);
  return {scale, top: top + c.top, left: left + c.left, bottom: bottom + c.top};
})()"""


# ---- schema helpers ----------------------------------------------------------------------------------

def expected_widgets(info: dict) -> list[str]:
    return [n for n, kind in harness.widget_layout(ObjectInfoSchema(info)) if kind == "value"]


def workflow_node_types(wf: dict) -> list[str]:
    subgraph_ids = {sg["id"] for sg in (wf.get("definitions") or {}).get("subgraphs") or []}
    types = [n.get("type") for n in wf.get("nodes") or []]
    for sg in (wf.get("definitions") or {}).get("subgraphs") or []:
        types += [n.get("type") for n in sg.get("nodes") or []]
    return sorted({t for t in types if t and t not in subgraph_ids})


# ---- the fixture: server + browser -------------------------------------------------------------------

class Frontend:
    def __init__(self, root: Path, url: str, object_info: dict, cdp: CDP, timings: dict,
                 initial_dialogs: list, pack_ids: list[str], pattern: re.Pattern):
        self.root, self.url, self.object_info, self.cdp = root, url, object_info, cdp
        self.timings, self.initial_dialogs = timings, initial_dialogs
        self.pack_ids, self.ours = pack_ids, pattern

    def eval(self, js: str, timeout: float = 60.0):
        return self.cdp.run(self.cdp.eval(js), timeout)

    def settle(self, seconds: float) -> None:
        self.cdp.run(asyncio.sleep(seconds))

    def screenshot(self) -> bytes:
        r = self.cdp.run(self.cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=False))
        return base64.b64decode(r["data"])


def _write_inputs(wf_paths: list[Path], object_info: dict, input_dir: Path) -> list[str]:
    """Procedural images for every file an upload combo (LoadImage's ``image``) names."""
    written = []
    for path in wf_paths:
        wf = json.loads(path.read_text())
        nodes = list(wf.get("nodes") or [])
        for sg in (wf.get("definitions") or {}).get("subgraphs") or []:
            nodes += sg.get("nodes") or []
        for node in nodes:
            info = object_info.get(node.get("type"))
            if not info:
                continue
            cls = ObjectInfoSchema(info)
            try:
                values = harness.map_widget_values(cls, node.get("widgets_values"), strict=False)
            except harness.HarnessError:
                continue
            for _g, name, _t, opts in harness.input_specs(cls):
                fname = values.get(name)
                if not (isinstance(fname, str) and opts.get("image_upload") is True):
                    continue
                dest = input_dir / fname
                if dest.exists() or not fname.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                _sample_image(fname).save(dest)
                written.append(fname)
    return written


def _sample_image(fname: str) -> Image.Image:
    seed = sum(fname.encode()) % 97
    keyed = any(k in fname.lower() for k in ("green", "screen", "key", "plate"))  # as test_workflows
    try:
        from diffusion_matting.py.samples import make_sample
        s = make_sample(height=256, width=256, seed=seed)
        a, fg, image = s.alpha, s.fg, s.image
    except ImportError:  # pragma: no cover - the pack is installed wherever the pack's tests run
        yy, xx = np.mgrid[0:256, 0:256]
        a = np.clip(1.0 - (np.hypot(yy - 128, xx - 128) - 80) / 3, 0, 1).astype(np.float32)
        fg = np.stack([0.8 * a + 0.1, 0.3 * np.ones_like(a), 0.5 * np.ones_like(a)], -1)
        image = a[..., None] * fg + (1 - a[..., None]) * np.array([0.16, 0.62, 0.26])
    u8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    if keyed:
        return Image.fromarray(u8(image))
    return Image.fromarray(np.concatenate([u8(fg), u8(a)[..., None]], -1), "RGBA")


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    comfy_path = live_server.comfy_checkout("front-end (browser) test")
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (set DM_CHROMIUM or install Debian `chromium`): front-end test skipped")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        pytest.skip("aiohttp (a ComfyUI dependency) not importable here: front-end test skipped")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("comfyui_frontend")
    server = browser = None
    cdp = CDP(asyncio.new_event_loop())
    try:
        server, url, server_log, dirs = live_server.start(comfy_path, root)
        live_server.wait_up(server, url, server_log, SERVER_TIMEOUT_S)
        timings["server_start_s"] = time.perf_counter() - t0

        object_info = live_server.get_json(url + "/object_info", timeout=60)
        pack_ids = sorted(k for k, v in object_info.items() if v.get("python_module") == PACK_MODULE)
        if not pack_ids:
            pytest.fail("the server registered no node of the pack:\n" + live_server.tail(server_log), pytrace=False)
        names = set(pack_ids) | {object_info[k].get("display_name") or k for k in pack_ids}
        names |= {harness.PACK_FOLDER_NAME, "diffusion_matting", "diffusion-matting"}
        pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True) if len(n) > 3))
        _write_inputs(WORKFLOWS, object_info, dirs["input"])

        t1 = time.perf_counter()
        profile = root / "chromium-profile"
        with open(root / "chromium.log", "wb") as log:
            browser = subprocess.Popen(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--lang=en-US",
                 "--force-device-scale-factor=1", "--remote-debugging-address=127.0.0.1",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}",
                 f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if browser.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start:\n{live_server.tail(root / 'chromium.log')}", pytrace=False)
            time.sleep(0.1)
        dport = int(port_file.read_text().split()[0])
        pages = [t for t in live_server.get_json(f"http://127.0.0.1:{dport}/json/list") if t.get("type") == "page"]
        cdp.run(cdp.connect(pages[0]["webSocketDebuggerUrl"]))
        for domain in ("Runtime", "Log", "Page"):
            cdp.run(cdp.send(f"{domain}.enable"))
        cdp.run(cdp.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                         deviceScaleFactor=1, mobile=False))
        cdp.run(cdp.send("Page.navigate", url=url + "/"))
        deadline = time.monotonic() + 60
        while not cdp.run(cdp.eval(JS_READY)):
            if time.monotonic() > deadline:
                pytest.fail("the front end did not start (window.app never appeared)", pytrace=False)
            cdp.run(asyncio.sleep(0.2))
        timings["app_ready_s"] = time.perf_counter() - t1
        # first start of a fresh user: the front end opens its template browser (once); wait for the
        # start-up workflow or that dialog, then close whatever dialog is open
        deadline = time.monotonic() + 15
        dialogs = []
        while time.monotonic() < deadline:
            dialogs = cdp.run(cdp.eval(JS_DIALOGS))
            if dialogs:
                break
            cdp.run(asyncio.sleep(0.25))
        cdp.run(asyncio.sleep(0.5))
        dialogs = cdp.run(cdp.eval(JS_DIALOGS))
        cdp.phase = "close start-up dialogs"
        left = cdp.run(cdp.eval(JS_CLOSE_DIALOGS))
        if left:
            pytest.fail(f"could not close the start-up dialogs: {cdp.run(cdp.eval(JS_DIALOGS))}", pytrace=False)
        cdp.phase = "display settings"
        applied = cdp.run(cdp.eval(JS_SETTINGS % json.dumps(DISPLAY_SETTINGS)))
        if applied != DISPLAY_SETTINGS:
            pytest.fail(f"display settings not applied: {applied}", pytrace=False)
        timings["page_ready_s"] = time.perf_counter() - t1
        yield Frontend(root, url, object_info, cdp, timings, dialogs, pack_ids, pattern)
    finally:
        try:
            cdp.run(cdp.close(), 10)
        except Exception:  # noqa: BLE001 - teardown
            pass
        cdp.loop.close()
        live_server.stop(browser)
        live_server.stop(server)


# ---- tests -------------------------------------------------------------------------------------------

def test_workflows_exist():
    assert WORKFLOWS, "no workflows/*.json shipped"


def test_page_start_has_no_errors_from_the_pack(frontend):
    msgs = [m for m in console_messages(frontend.cdp.events)
            if m["level"] in ("error", "exception") and frontend.ours.search(m["text"] + " " + m["url"])]
    assert not msgs, f"console errors mentioning the pack while the page started: {msgs}"
    print(f"\nfront end: start-up dialogs closed: {[d['key'] for d in frontend.initial_dialogs]}; "
          f"timings: {frontend.timings}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_frontend(frontend, path, tmp_path):
    wf = json.loads(path.read_text())
    name = path.stem
    assert frontend.eval(JS_CLOSE_DIALOGS) == 0
    frontend.cdp.phase = name
    mark = len(frontend.cdp.events)
    t0 = time.perf_counter()
    load_ms = frontend.eval(JS_LOAD % (json.dumps(wf), json.dumps(name)))
    # fit the graph to the view first: every node is then drawn, so its widgets are laid out
    fit = frontend.eval(JS_FIT)
    frontend.settle(0.3)
    state = frontend.eval(JS_INSPECT)
    problems: list[str] = []

    # 1. no missing node types, no placeholder nodes, no dialogs or warning toasts
    registered = set(state["registered"])
    missing = [t for t in workflow_node_types(wf) if t not in registered]
    if missing:
        problems.append(f"node types not registered in the front end: {missing}")
    for n in state["nodes"]:
        if n["has_errors"] or not n["registered"]:
            problems.append(f"node {n['id']} ({n['type']}) loaded as a missing-node placeholder")
    if state["dialogs"]:
        problems.append(f"dialogs opened by loading: {state['dialogs']}")
    bad_toasts = [t for t in state["toasts"] if re.search(r"p-toast-message-(warn|error)", t["cls"])]
    if bad_toasts:
        problems.append(f"warning/error toasts: {bad_toasts}")
    if len(state["nodes"]) != len(wf.get("nodes") or []):
        problems.append(f"{len(state['nodes'])} nodes in the graph, {len(wf.get('nodes') or [])} in the file")

    # 2. widgets: ours show their schema's widgets inside the node; every node's values match the file
    by_id = {str(n["id"]): n for n in state["nodes"]}
    missing_values: list[str] = []
    for node in wf.get("nodes") or []:
        info = frontend.object_info.get(node.get("type"))
        live = by_id.get(str(node["id"]))
        if info is None or live is None:
            continue
        widgets = {w["name"]: w for w in live["widgets"]}
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in frontend.pack_ids:
            problems += check_pack_widgets(live, info, where)
        try:
            values = harness.map_widget_values(ObjectInfoSchema(info), node.get("widgets_values"), strict=True,
                                               where=where)
        except harness.HarnessError as e:
            problems.append(str(e))
            continue
        for wname, value in values.items():
            w = widgets.get(wname)
            if w is None:
                problems.append(f"{where}: no widget {wname!r} in the front end")
            elif w["value"] != value and not (isinstance(value, float) and isinstance(w["value"], (int, float))
                                              and abs(w["value"] - value) <= 1e-6 * max(1.0, abs(value))):
                problems.append(f"{where}: widget {wname!r} = {w['value']!r} in the front end, {value!r} in the file")
            elif w["options"] is not None and str(value) not in w["options"]:
                missing_values.append(f"{node['type']}.{wname}={value!r}")

    # 3. console: nothing from the pack, and no error at all while this workflow loaded
    msgs = console_messages(frontend.cdp.events[mark:])
    errors = [m for m in msgs if m["level"] in ("error", "exception")]
    ours = [m for m in msgs if frontend.ours.search(m["text"] + " " + m["url"])]
    if ours:
        problems.append(f"console errors/warnings mentioning the pack: {ours}")
    other = [m for m in errors if m not in ours and not EXTERNAL_URL.match(m["url"])]
    if other:
        problems.append(f"console errors while loading: {other}")

    # 4. every node on screen, the screenshot shows the graph
    _left, _top, cw, ch = state["canvas"]
    for n in state["nodes"]:
        sx0, sy0, sx1, sy1 = n["screen"]
        if sx0 < -1 or sy0 < -1 or sx1 > cw + 1 or sy1 > ch + 1:
            problems.append(f"node {n['id']} ({n['type']}) off screen after fitting: {n['screen']}")
    png = frontend.screenshot()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    arr = np.asarray(img, dtype=np.float32)
    if img.size != VIEWPORT:
        problems.append(f"screenshot is {img.size}, expected {VIEWPORT}")
    # rendered nodes: many distinct colours and contrast (a blank canvas or an overlay is nearly flat)
    colours = len(np.unique(arr[::4, ::4].reshape(-1, 3), axis=0))
    if arr.std() < 8 or colours < 64:
        problems.append(f"screenshot looks blank (std {arr.std():.1f}, {colours} colours)")
    (tmp_path / f"{name}.png").write_bytes(png)

    assert not problems, f"{path.name} in the real front end:\n  " + "\n  ".join(problems)

    if UPDATE:
        docs = REPO / "docs" / "workflows"
        docs.mkdir(parents=True, exist_ok=True)
        # a palette PNG keeps the doc image small and sharp (UI flats + text)
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            docs / f"{name}.png", optimize=True)
        # the thumbnail shows the graph: the canvas area the menus leave free (see JS_FIT)
        box = (int(fit["left"]), int(fit["top"]), img.width, int(fit["bottom"])) if fit else (0, 0, *img.size)
        graph = img.crop(box)
        thumb = graph.resize((THUMB_WIDTH, round(graph.height * THUMB_WIDTH / graph.width)), Image.Resampling.LANCZOS)
        for q in (85, 75, 65, 55, 45):
            buf = io.BytesIO()
            thumb.save(buf, "JPEG", quality=q, optimize=True, progressive=True)
            if buf.tell() < THUMB_MAX_BYTES:
                break
        (REPO / "workflows" / f"{name}.jpg").write_bytes(buf.getvalue())
    print(f"\n{name}: loadGraphData {load_ms:.0f} ms, check {time.perf_counter() - t0:.1f} s, "
          f"{len(state['nodes'])} nodes, zoom {(fit or {}).get('scale', 0):.2f}; "
          f"combo values not among the options (kept by the front end): {missing_values or 'none'}")


def check_pack_widgets(node: dict, info: dict, where: str) -> list[str]:
    """The widgets a live node of the pack shows against its /object_info schema."""
    problems = []
    want = expected_widgets(info)
    shown = [w["name"] for w in node["widgets"] if w["name"] not in EXTRA_WIDGETS]
    if shown != want:
        problems.append(f"{where}: widgets {shown}, schema implies {want}")
    for w in node["widgets"]:
        if w["hidden"]:
            problems.append(f"{where}: widget {w['name']!r} is hidden")
        elif not (0 < w["y"] and w["y"] + w["height"] <= node["size"][1] + 1):
            problems.append(f"{where}: widget {w['name']!r} at y={w['y']} (+{w['height']}) "
                            f"outside the node (height {node['size'][1]})")
    if node["collapsed"]:
        problems.append(f"{where}: collapsed")
    return problems


def test_every_pack_node_shows_its_widgets(frontend, tmp_path):
    """Every node of the pack (shipped in a workflow or not), created fresh from the search box's
    factory (``LiteGraph.createNode``), shows the widgets its schema implies, with their defaults."""
    frontend.cdp.phase = "all pack nodes"
    mark = len(frontend.cdp.events)
    made = frontend.eval(JS_ADD_NODES % json.dumps(frontend.pack_ids))
    assert made == frontend.pack_ids, f"createNode failed for {sorted(set(frontend.pack_ids) - set(made))}"
    frontend.eval(JS_FIT)
    frontend.settle(0.3)
    state = frontend.eval(JS_INSPECT)
    problems = []
    for node in state["nodes"]:
        info = frontend.object_info[node["type"]]
        where = f"{node['type']}"
        problems += check_pack_widgets(node, info, where)
        widgets = {w["name"]: w for w in node["widgets"]}
        for _g, name, _t, opts in harness.input_specs(ObjectInfoSchema(info)):
            w = widgets.get(name)
            if w is not None and "default" in opts and w["value"] != opts["default"] \
                    and not (w["options"] is not None and not w["options"]):
                problems.append(f"{where}: widget {name!r} = {w['value']!r}, schema default {opts['default']!r}")
    msgs = [m for m in console_messages(frontend.cdp.events[mark:])
            if m["level"] in ("error", "exception") and not EXTERNAL_URL.match(m["url"])]
    if msgs:
        problems.append(f"console errors while creating the pack's nodes: {msgs}")
    (tmp_path / "dm_all_nodes.png").write_bytes(frontend.screenshot())
    assert not problems, "the pack's nodes in the real front end:\n  " + "\n  ".join(problems)


def test_missing_node_is_detected(frontend):
    """Negative control: an unknown node type is seen by the checks test_workflow_loads_in_frontend makes
    (the missing-node dialog, the unregistered type, LiteGraph's placeholder node)."""
    wf = json.loads(WORKFLOWS[0].read_text()) if WORKFLOWS else {"nodes": [], "links": []}
    wf = json.loads(json.dumps(wf))
    bogus = {"id": 9999, "type": "DM_NoSuchNode", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 0,
             "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}
    wf["nodes"] = list(wf.get("nodes") or []) + [bogus]
    wf["last_node_id"] = max(int(wf.get("last_node_id") or 0), 9999)
    frontend.cdp.phase = "negative control"
    mark = len(frontend.cdp.events)
    frontend.eval(JS_LOAD % (json.dumps(wf), json.dumps("dm_negative_control")))
    state = frontend.eval(JS_INSPECT)
    keys = [d["key"] for d in state["dialogs"]]
    assert "global-load-workflow-warning" in keys, f"no missing-node dialog for an unknown type: {state['dialogs']}"
    bad = [n for n in state["nodes"] if n["id"] == 9999]
    assert bad and bad[0]["has_errors"] and not bad[0]["registered"]
    assert "DM_NoSuchNode" not in state["registered"]
    assert frontend.eval(JS_CLOSE_DIALOGS) == 0
    del frontend.cdp.events[mark:]  # the errors this provoked are expected


def test_no_console_errors_from_the_pack(frontend):
    """Whole session (runs last): no console error/exception mentioning the pack at any point."""
    msgs = [m for m in console_messages(frontend.cdp.events)
            if m["level"] in ("error", "exception") and frontend.ours.search(m["text"] + " " + m["url"])]
    assert not msgs, f"console errors mentioning the pack: {msgs}"
