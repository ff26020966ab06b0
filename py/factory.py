"""The matting-data factory: drive running ComfyUI servers over their HTTP/WebSocket API to make a dataset.

* :class:`ComfyClient` - a small client for ComfyUI's API (stdlib only): ``GET /object_info``,
  ``POST /prompt`` (with ``client_id`` and our own ``prompt_id``), ``GET /queue``, ``GET /history/{id}``,
  ``GET /view`` and the ``/ws?clientId=`` event stream (an RFC 6455 client in :class:`WebSocket`; when the
  socket is unavailable the client polls ``/history``).
* :func:`inject` puts a job's prompt text and seed into an API prompt: the node titled ``prompt`` (its
  text/value input; else the CLIPTextEncode feeding a sampler's ``positive``) and the node titled ``seed``
  plus every literal ``seed`` / ``noise_seed`` input.
* :class:`Factory` runs jobs ``0..count-1`` (prompt ``prompts[j % len]``, seed ``base + j``) on one worker
  thread per server, downloads what the workflow's ``Save Matting Sample`` node(s) wrote and stores it in
  the dataset layout of :mod:`matting_dataset` under the job's own names (``<prefix>_<job>`` and, for a
  batch, ``_<item>``). Resuming: ``factory.json`` pins the run (workflow, prompts, seed); the manifest
  lists the finished jobs (all lines of a job are appended in one write, after its files). Each job has a
  fixed ``prompt_id`` (derived from the run id), so a restarted factory finds jobs a killed one had queued
  (``/queue``) or finished (``/history``) and waits for / downloads them instead of queueing them again.
  Failures: a job that fails while running on a server (an execution error such as running out of memory,
  an interruption, a download that does not match its sha256) is queued again, on any server, up to
  ``retries`` times, each retry under a new ``prompt_id`` (``job-<j>-retry<n>``; tries an earlier run saw
  fail are skipped, not counted); a rejected prompt (HTTP 400: the workflow does not validate) or a timeout
  stops the run. A job that fails every try stops the run, or with ``keep_going`` is set aside while the
  others go on; the run then ends with an error that lists those jobs, and running it again tries just them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import random
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import matting_dataset as D
from .errors import UserError

STATE_FILE = "factory.json"
LOCK_FILE = ".factory.lock"
SAMPLES_KEY = "matting_samples"  # the ui key Save Matting Sample reports its samples under
SAVE_NODE = "DM_SaveMattingSample"
TEXT_INPUTS = ("text", "text_g", "text_l", "value", "prompt", "string")
SEED_INPUTS = ("seed", "noise_seed")
SEED_MODULUS = 2 ** 48
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock against two factories on one folder
    fcntl = None


class ServerError(UserError):
    """The server refused a request (HTTP error status) or a prompt failed; the message says why."""


class JobFailed(ServerError):
    """A queued prompt failed while it ran (execution error, interruption, bad download): worth a retry."""


class ServerUnavailable(OSError):
    """The server could not be reached (connection refused/reset, timeout)."""


# ------------------------------------------------------------------------------------------ WebSocket
class WebSocket:
    """Minimal RFC 6455 client: handshake, masked text frames out, text/binary/ping/pong/close in."""

    def __init__(self, url: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {url}")
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock, self.buf, self.closed = sock, b"", False
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("WebSocket handshake: connection closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if len(lines[0].split()) < 2 or lines[0].split()[1] != "101":
            raise ConnectionError(f"WebSocket handshake refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        expect = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expect:
            raise ConnectionError("WebSocket handshake: bad Sec-WebSocket-Accept")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                self.closed = True
                raise ConnectionError("WebSocket closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, payload: bytes, opcode: int = 1) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        mask = self._read(4) if b1 & 0x80 else None
        data = self._read(n)
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return bool(b0 & 0x80), b0 & 0x0F, data

    def recv(self, timeout: float | None) -> tuple[int, bytes] | None:
        """Next data message ``(opcode, payload)`` (1 = text, 2 = binary); None if nothing arrived within
        ``timeout`` seconds. Pings are answered; a close frame raises ``ConnectionError``."""
        if not self.buf:
            self.sock.settimeout(timeout)
            try:
                self.buf = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            if not self.buf:
                self.closed = True
                raise ConnectionError("WebSocket closed by the server")
        self.sock.settimeout(30.0)  # a message has started: the rest must follow
        parts, first_op = [], None
        while True:
            fin, op, data = self._frame()
            if op == 8:
                self.closed = True
                try:
                    self.send(data[:2], opcode=8)
                except OSError:
                    pass
                raise ConnectionError("WebSocket closed by the server")
            if op == 9:
                self.send(data, opcode=10)
                continue
            if op == 10:
                continue
            if op != 0:
                first_op = op
            parts.append(data)
            if fin:
                return first_op or 1, b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            try:
                self.send(struct.pack("!H", 1000), opcode=8)
            except OSError:
                pass
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ HTTP client
def _error_text(body: bytes) -> str:
    """A one-line reason from ComfyUI's JSON error body ({"error": {...}, "node_errors": {...}})."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:300]
    if not isinstance(data, dict):
        return str(data)[:300]
    err = data.get("error")
    parts = []
    if isinstance(err, dict):
        parts.append(": ".join(str(x) for x in (err.get("message"), err.get("details")) if x))
    elif err:
        parts.append(str(err))
    for nid, info in (data.get("node_errors") or {}).items():
        for e in (info or {}).get("errors") or []:
            parts.append(f"node {nid} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p) or json.dumps(data)[:300]


class ComfyClient:
    """One ComfyUI server. Plain HTTP requests are independent (thread-safe); the WebSocket belongs to the
    thread that calls :meth:`wait`."""

    def __init__(self, url: str, client_id: str | None = None, timeout: float = 60.0, use_websocket: bool = True,
                 poll_interval: float = 1.0):
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UserError(f"--server {url}: expected http(s)://host:port")
        self.url, self.timeout, self.poll_interval = url, timeout, poll_interval
        self.client_id = client_id or uuid.uuid4().hex
        self.use_websocket = use_websocket
        self.ws: WebSocket | None = None
        self.events: list[dict] = []  # every WebSocket JSON message seen (for progress and tests)

    def __repr__(self) -> str:
        return f"ComfyClient({self.url!r})"

    # -- plain requests ----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:  # noqa: S310 - user's server
                return r.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{self.url}{path.split('?')[0]}: HTTP {exc.code}: {_error_text(exc.read())}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnavailable(f"{self.url}: {reason}") from None

    def get_json(self, path: str) -> Any:
        raw = self.request("GET", path)
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"{self.url}{path}: not JSON: {raw[:120]!r}") from None

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def submit(self, prompt: dict, prompt_id: str | None = None, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = extra_data
        raw = self.request("POST", "/prompt", body)
        try:
            data = json.loads(raw)
        except ValueError:
            raise ServerError(f"{self.url}/prompt: not JSON: {raw[:120]!r}") from None
        if not data.get("prompt_id"):
            raise ServerError(f"{self.url}/prompt: no prompt_id in the answer: {_error_text(raw)}")
        return str(data["prompt_id"])

    def history(self, prompt_id: str) -> dict | None:
        data = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return data.get(prompt_id) if isinstance(data, dict) else None

    def queued(self) -> set[str]:
        """prompt ids running or waiting on the server."""
        data = self.get_json("/queue")
        return {str(item[1]) for key in ("queue_running", "queue_pending") for item in data.get(key) or []
                if isinstance(item, (list, tuple)) and len(item) > 1}

    def view(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        return self.request("GET", f"/view?{q}")

    # -- events ------------------------------------------------------------------------------------
    def connect(self) -> bool:
        """Open the event WebSocket (before submitting, so no event is missed); False if it cannot."""
        if not self.use_websocket:
            return False
        if self.ws is not None and not self.ws.closed:
            return True
        u = urllib.parse.urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        try:
            self.ws = WebSocket(f"{scheme}://{u.netloc}{u.path}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, ValueError):
            self.ws = None
            return False
        return True

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def _event(self, timeout: float) -> dict | None:
        if self.ws is None or self.ws.closed:
            time.sleep(timeout)
            return None
        try:
            msg = self.ws.recv(timeout)
        except (OSError, ValueError):
            self.ws.close()
            self.ws = None
            return None
        if msg is None or msg[0] != 1:  # binary messages are previews
            return None
        try:
            event = json.loads(msg[1])
        except ValueError:
            return None
        if isinstance(event, dict):
            self.events.append(event)
            return event
        return None

    def wait(self, prompt_id: str, timeout: float = 3600.0,
             on_event: Callable[[dict], None] | None = None) -> dict:
        """Wait until ``prompt_id`` has finished; return its history entry. Raises :class:`ServerError` when
        it failed (naming the node and the exception) and ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self.connect()
        next_poll = time.monotonic() + (5 * self.poll_interval if self.ws is not None else 0)
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{self.url}: prompt {prompt_id} not finished after {timeout:.0f} s")
            done = False
            event = self._event(min(self.poll_interval, max(0.01, deadline - now)))
            if event is not None:
                data = event.get("data") or {}
                if data.get("prompt_id") == prompt_id:
                    if on_event is not None:
                        on_event(event)
                    kind = event.get("type")
                    if kind == "execution_error":
                        raise JobFailed(_execution_error_text(self.url, prompt_id, data))
                    if kind == "execution_interrupted":
                        raise JobFailed(f"{self.url}: prompt {prompt_id} was interrupted on the server")
                    done = kind == "execution_success" or (kind == "executing" and data.get("node") is None)
            if done or time.monotonic() >= next_poll:
                entry = self.history(prompt_id)
                if entry is not None:
                    return _check_history(self.url, prompt_id, entry)
                next_poll = time.monotonic() + (0.05 if done else
                                                 (5 * self.poll_interval if self.ws is not None else self.poll_interval))


def _execution_error_text(url: str, prompt_id: str, data: dict) -> str:
    return (f"{url}: prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
            f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}")


def _check_history(url: str, prompt_id: str, entry: dict) -> dict:
    status = entry.get("status") or {}
    if status.get("status_str") == "error":
        for event, data in status.get("messages") or []:
            if event == "execution_error":
                raise JobFailed(_execution_error_text(url, prompt_id, data))
        raise JobFailed(f"{url}: prompt {prompt_id} failed (status error)")
    return entry


# ------------------------------------------------------------------------------------------ workflows
def load_workflow(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--workflow: no such file: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--workflow {path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--workflow {path}: expected a JSON object")
    if "nodes" not in data and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # a saved POST /prompt body
    return data


def to_api(workflow: dict, client: ComfyClient) -> dict:
    """The API prompt of a UI- or API-format workflow (UI format is converted with the server's schemas)."""
    from .workflow_api import ui_to_api

    if "nodes" not in workflow:
        return ui_to_api(workflow, {})
    return ui_to_api(workflow, client.object_info())


def load_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompts: no such file: {path}") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (one per line; '#' lines are comments)")
    return prompts


def _title(node: dict) -> str:
    return str((node.get("_meta") or {}).get("title") or "").strip().casefold()


def _literal(v) -> bool:
    return not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str))


@dataclass
class InjectionPlan:
    text_targets: list[tuple[str, str]] = field(default_factory=list)   # (node id, input)
    seed_targets: list[tuple[str, str]] = field(default_factory=list)


def plan_injection(prompt: dict, prompt_title: str = "prompt", seed_title: str = "seed") -> InjectionPlan:
    """Where :func:`inject` writes the prompt text and the seed (errors if the text has nowhere to go)."""
    plan = InjectionPlan()
    pt, st = prompt_title.strip().casefold(), seed_title.strip().casefold()
    for nid, node in prompt.items():
        inputs = node.get("inputs") or {}
        if _title(node) == pt:
            for name in TEXT_INPUTS:
                if isinstance(inputs.get(name), str):
                    plan.text_targets.append((nid, name))
        if _title(node) == st:
            for name in ("value", *SEED_INPUTS):
                if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool):
                    plan.seed_targets.append((nid, name))
    if not plan.text_targets:  # the positive CLIPTextEncode of a sampler
        for node in prompt.values():
            link = (node.get("inputs") or {}).get("positive")
            if isinstance(link, list) and len(link) == 2 and str(link[0]) in prompt:
                src = prompt[str(link[0])]
                if src.get("class_type", "").startswith("CLIPTextEncode"):
                    for name in TEXT_INPUTS:
                        if isinstance(src["inputs"].get(name), str):
                            plan.text_targets.append((str(link[0]), name))
    if not plan.text_targets:
        raise UserError(f"the workflow has no node titled {prompt_title!r} with a text input and no CLIPTextEncode "
                        "feeding a sampler's positive input: nowhere to put the prompts")
    for nid, node in prompt.items():
        for name in SEED_INPUTS:
            v = (node.get("inputs") or {}).get(name)
            if isinstance(v, int) and not isinstance(v, bool) and (nid, name) not in plan.seed_targets:
                plan.seed_targets.append((nid, name))
    plan.text_targets = list(dict.fromkeys(plan.text_targets))
    return plan


def inject(prompt: dict, plan: InjectionPlan, text: str, seed: int) -> dict:
    """A copy of ``prompt`` with ``text`` and ``seed`` written where ``plan`` says."""
    out = json.loads(json.dumps(prompt))
    for nid, name in plan.text_targets:
        out[nid]["inputs"][name] = text
    for nid, name in plan.seed_targets:
        out[nid]["inputs"][name] = int(seed)
    return out


def save_nodes(prompt: dict) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") == SAVE_NODE]


# ------------------------------------------------------------------------------------------ the factory
@dataclass
class JobResult:
    job: int
    names: list[str]
    server: str
    seconds: float
    reused: str = ""  # "" (submitted now), "queued" or "history" (found from an earlier run)


class Factory:
    """Make ``count`` jobs' samples in ``out`` (see the module docstring). ``run()`` returns the results of
    the jobs done in this call; jobs already in the manifest are skipped."""

    def __init__(self, servers: list[str], workflow: dict, prompts: list[str], count: int, out: str | os.PathLike,
                 seed: int | None = None, prefix: str = "sample", prompt_title: str = "prompt",
                 seed_title: str = "seed", job_timeout: float = 3600.0, poll_interval: float = 1.0,
                 use_websocket: bool = True, log: Callable[[str], None] | None = None,
                 workflow_id: str | None = None, retries: int = 2, keep_going: bool = False):
        if not servers:
            raise UserError("give at least one --server")
        if count < 0:
            raise UserError("--count must be >= 0")
        if retries < 0:
            raise UserError("--retries must be >= 0")
        self.retries, self.keep_going = int(retries), bool(keep_going)
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} exists and is not a folder")
        self.prefix = D.check_prefix(prefix)
        self.clients = [ComfyClient(s, use_websocket=use_websocket, poll_interval=poll_interval) for s in servers]
        if len({c.url for c in self.clients}) != len(self.clients):
            raise UserError("--server: the same server is listed twice")
        self.workflow, self.prompts, self.count = workflow, list(prompts), int(count)
        self.seed, self.prompt_title, self.seed_title = seed, prompt_title, seed_title
        self.job_timeout = job_timeout
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.workflow_id = workflow_id or hashlib.sha256(
            json.dumps(workflow, sort_keys=True).encode()).hexdigest()
        self._manifest_lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.results: list[JobResult] = []
        self.attempts: dict[int, int] = {}  # job -> failed tries so far (this call)
        self._next_try: dict[int, int] = {}  # job -> the try number (prompt_id) to use next
        self.failed: dict[int, str] = {}    # job -> last error, jobs given up on (keep_going)

    # -- state ---------------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        path = self.out / STATE_FILE
        prompts_sha = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()
        if path.exists():
            state = json.loads(path.read_text())
            diffs = [what for what, ok in (
                ("--workflow", state.get("workflow_sha256") == self.workflow_id),
                ("--prompts", state.get("prompts_sha256") == prompts_sha),
                ("--seed", self.seed is None or state.get("seed") == self.seed),
                ("--prefix", state.get("prefix") == self.prefix)) if not ok]
            if diffs:
                raise UserError(f"{self.out} holds a factory run with other {', '.join(diffs)}: resume with the "
                                "same arguments or use another --out")
            return state
        state = {"version": 1, "run_id": uuid.uuid4().hex,
                 "seed": self.seed if self.seed is not None else random.randrange(SEED_MODULUS),
                 "workflow_sha256": self.workflow_id, "prompts_sha256": prompts_sha, "prefix": self.prefix,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        D.write_atomic(path, (json.dumps(state, indent=1) + "\n").encode())
        return state

    def done_jobs(self) -> set[int]:
        return {int(e["job"]) for e in D.read_manifest(self.out) if "job" in e}

    def job_prompt_id(self, job: int, attempt: int = 0) -> str:
        """Fixed per job and try, so a restarted run finds what an earlier one queued or finished."""
        return str(uuid.uuid5(uuid.UUID(self.state["run_id"]), f"job-{job}" + (f"-retry{attempt}" if attempt else "")))

    def job_seed(self, job: int) -> int:
        return (int(self.state["seed"]) + job) % SEED_MODULUS

    def job_text(self, job: int) -> str:
        return self.prompts[job % len(self.prompts)]

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> list[JobResult]:
        self.out.mkdir(parents=True, exist_ok=True)
        lock = open(self.out / LOCK_FILE, "a+")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise UserError(f"another factory is writing to {self.out}") from None
            return self._run()
        finally:
            lock.close()

    def _run(self) -> list[JobResult]:
        self.state = self._load_state()
        if D.repair_manifest(self.out):
            self.log("manifest: dropped a line cut short by an interruption")
        stale = D.remove_stale_temp_files(self.out)  # safe: we hold the folder lock
        if stale:
            self.log(f"removed {stale} temporary file(s) left by an interrupted write")
        done = self.done_jobs()
        todo = [j for j in range(self.count) if j not in done]
        if not todo:
            self.log(f"all {self.count} job(s) already in {self.out / D.MANIFEST}")
            return []
        prompt = None
        for client in self.clients:  # the API prompt (schemas from the first server that answers)
            try:
                prompt = to_api(self.workflow, client)
                break
            except ServerUnavailable as exc:
                self.log(f"{client.url}: unreachable ({exc}); trying the next server")
        if prompt is None:
            raise UserError("no --server could be reached")
        if not save_nodes(prompt):
            raise UserError(f"the workflow has no (enabled) Save Matting Sample node ({SAVE_NODE})")
        self.plan = plan_injection(prompt, self.prompt_title, self.seed_title)
        self.prompt = prompt
        if not self.plan.seed_targets:
            self.log("warning: the workflow has no seed input to vary (no node titled "
                     f"{self.seed_title!r}, no seed/noise_seed widget)")
        self.log(f"{len(todo)} job(s) to run ({len(done)} already done) on {len(self.clients)} server(s); "
                 f"prompt into {self.plan.text_targets}, seed into {self.plan.seed_targets}")
        jobs: queue.Queue[int] = queue.Queue()
        for j in todo:
            jobs.put(j)
        self._alive = len(self.clients)
        threads = [threading.Thread(target=self._worker, args=(c, jobs), daemon=True, name=f"factory-{i}")
                   for i, c in enumerate(self.clients)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self._stop.set()
            raise
        if self._errors:
            raise self._errors[0]
        if self.failed:
            jobs_ = sorted(self.failed)
            raise UserError(f"{len(jobs_)} job(s) failed {self.retries + 1} time(s) and were set aside: {jobs_[:10]}"
                            f"{' ...' if len(jobs_) > 10 else ''}; last error: {self.failed[jobs_[-1]]}. "
                            "Run the same command again to try just those")
        missing = sorted(set(range(self.count)) - self.done_jobs())
        if missing:
            raise UserError(f"{len(missing)} job(s) not done (every server failed): {missing[:10]}")
        return sorted(self.results, key=lambda r: r.job)

    def _worker(self, client: ComfyClient, jobs: queue.Queue) -> None:
        try:
            while not self._stop.is_set():
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    res = self._do_job(client, job)
                except JobFailed as exc:
                    with self._manifest_lock:
                        tries = self.attempts[job] = self.attempts.get(job, 0) + 1
                        self._next_try[job] = self._next_try.get(job, 0) + 1  # a retry gets a new prompt_id
                    if tries <= self.retries:
                        self.log(f"job {job}: {exc}; retry {tries}/{self.retries}")
                        jobs.put(job)
                        continue
                    if not self.keep_going:
                        raise
                    self.log(f"job {job}: {exc}; failed {tries} time(s), set aside (--keep-going)")
                    with self._manifest_lock:
                        self.failed[job] = str(exc)
                    continue
                except ServerUnavailable as exc:
                    jobs.put(job)  # another server takes it
                    with self._manifest_lock:
                        self._alive -= 1
                        last = self._alive == 0
                    self.log(f"{client.url}: unreachable ({exc}); {'no server left' if last else 'dropping it'}")
                    return
                with self._manifest_lock:
                    self.results.append(res)
                    n = len(self.results)
                how = f", {res.reused} on the server" if res.reused else ""
                self.log(f"[{n}] job {job}: {len(res.names)} sample(s) {', '.join(res.names)} from {res.server} "
                         f"in {res.seconds:.1f} s{how}")
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self._errors.append(exc)
            self._stop.set()
        finally:
            client.close()

    def _find_elsewhere(self, pid: str) -> tuple[ComfyClient, str] | None:
        """A server that already has this job's prompt (an earlier, interrupted run): finished ("history"),
        finished with an error ("failed") or queued."""
        for c in self.clients:
            try:
                entry = c.history(pid)
                if entry is not None:
                    return c, "failed" if (entry.get("status") or {}).get("status_str") == "error" else "history"
                if pid in c.queued():
                    return c, "queued"
            except ServerUnavailable:
                continue
        return None

    def _do_job(self, client: ComfyClient, job: int) -> JobResult:
        t0 = time.perf_counter()
        text, seed = self.job_text(job), self.job_seed(job)
        attempt = self._next_try.get(job, 0)
        while True:  # tries that an earlier run saw fail are skipped, not counted as this run's retries
            pid = self.job_prompt_id(job, attempt)
            found = self._find_elsewhere(pid)
            if found is None or found[1] != "failed":
                break
            attempt += 1
        self._next_try[job] = attempt
        reused = ""
        if found is None:
            client.connect()
            client.submit(inject(self.prompt, self.plan, text, seed), prompt_id=pid,
                          extra_data={"diffusion_matting_factory": {"job": job, "run_id": self.state["run_id"]}})
            owner = client
        else:  # its events go to the killed run's client id: poll the history of the server that has it
            owner, reused = found
            owner = ComfyClient(owner.url, use_websocket=False, poll_interval=owner.poll_interval)
        entry = owner.wait(pid, timeout=self.job_timeout)
        samples = [s for nid in save_nodes(self.prompt)
                   for s in ((entry.get("outputs") or {}).get(nid) or {}).get(SAMPLES_KEY) or []]
        if not samples:
            raise ServerError(f"{owner.url}: job {job} (prompt {pid}) finished without Save Matting Sample output")
        names = self._store(owner, job, pid, text, seed, samples)
        return JobResult(job, names, owner.url, time.perf_counter() - t0, reused)

    def _store(self, client: ComfyClient, job: int, pid: str, text: str, seed: int, samples: list[dict]) -> list[str]:
        entries, names = [], []
        for b, s in enumerate(samples):
            name = f"{self.prefix}_{job:06d}" if len(samples) == 1 else f"{self.prefix}_{job:06d}_{b:02d}"
            files = {}
            for kind, rel in (s.get("files") or {}).items():
                if kind not in D.KINDS:
                    continue
                folder, filename = rel.rsplit("/", 1)
                sub = "/".join(p for p in (s.get("subfolder", ""), folder) if p)
                data = client.view(filename, sub, "output")
                want = (s.get("sha256") or {}).get(kind)
                if want and D.sha256(data) != want:
                    raise JobFailed(f"{client.url}: {sub}/{filename} differs from its sha256 in the node's report")
                files[kind] = data
            missing = set(D.IMAGE_KINDS) - set(files)
            if missing:
                raise ServerError(f"{client.url}: sample {s.get('name')} reports no {sorted(missing)} file(s)")
            meta = {k: v for k, v in s.items() if k not in ("name", "width", "height", "files", "sha256", "subfolder")}
            meta.update(job=job, prompt=text, seed=seed, server=client.url, prompt_id=pid,
                        source=f"{s.get('subfolder', '')}/{s.get('name')}".lstrip("/"))
            entries.append(D.manifest_entry(name, files, **meta))
            D.write_files(self.out, name, files)
            names.append(name)
        with self._manifest_lock:
            D.append_manifest(self.out, entries)  # all of the job's lines in one write: the job is done
        return names
