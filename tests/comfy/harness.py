"""Tier-2 harness: run this pack inside a real ComfyUI checkout, in-process, on the CPU.

Nothing here is imported by the pack; the tests in ``tests/comfy`` use it through ``conftest.py``.

* :func:`boot` puts a ComfyUI checkout on ``sys.path`` (CPU mode), points every ComfyUI folder
  (models, input, output, temp, user, custom_nodes) at a scratch directory, loads ComfyUI's built-in
  node modules and then THIS pack through ComfyUI's own custom-node loader (``nodes.load_custom_node``,
  the function ``init_external_custom_nodes`` calls for every folder in ``custom_nodes/``).
* :func:`ui_to_api` converts a UI-format workflow (what the front end saves: ``nodes`` / ``links``)
  into the API-format prompt that ``POST /prompt`` takes, using the node schemas the way the front
  end (ComfyUI_frontend ``graphToPrompt``) does: widget values are matched to widget inputs in schema
  order, ``control_after_generate`` / ``control_filter_list`` / upload widgets are skipped, links win
  over widget values, bypassed nodes (mode 4) pass their matching input through, muted nodes (mode 2)
  and everything linked only to them drop out, Reroute / PrimitiveNode / Note / MarkdownNote are
  virtual, and subgraphs are flattened into ``outer:inner`` ids.
* :func:`validate` runs ComfyUI's ``execution.validate_prompt``; :func:`execute` validates and runs the
  prompt with ``execution.PromptExecutor`` (as the server's prompt worker does), returning the history
  outputs, the files written and access to every executed node's output values.
* Helpers for fixtures: :func:`model_path` / :func:`refresh_file_lists` (write model files where a
  folder type is listed), :func:`upload_files` (the input images a prompt's LoadImage-like nodes name).

ComfyUI 0.3.64 quirks handled here (see ``boot``): ``nodes.py`` inserts ``comfy/`` at ``sys.path[0]``,
so ComfyUI's top-level ``utils`` package must be imported first (as ``main.py`` does) or
``comfy/utils.py`` shadows it and ``comfy_extras/nodes_images.py`` fails to import; node loading,
``validate_prompt`` and ``PromptExecutor.execute_async`` are coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

PACK_FOLDER_NAME = "comfyui-diffusion-matting"

# The UI -> API conversion is the pack's own (``diffusion_matting.py.workflow_api``, also used by the
# ``factory`` CLI against a server's /object_info); the harness runs it on the in-process node classes.
from diffusion_matting.py import workflow_api as W  # noqa: E402
from diffusion_matting.py.workflow_api import input_specs, widget_layout  # noqa: E402,F401 - for the tests

class HarnessError(AssertionError):
    """A workflow that cannot be converted, validated or executed (raised as a test failure)."""


# --------------------------------------------------------------------------------------------------
# Booting ComfyUI
# --------------------------------------------------------------------------------------------------

@dataclass
class ComfyEnv:
    comfy_path: Path
    root: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    models_dir: Path
    custom_nodes_dir: Path
    pack_dir: Path
    pack_loaded: bool
    pack_node_ids: list[str]
    pack_module: str
    pack_load_log: list[str]
    builtin_import_failed: list[str]
    boot_seconds: float
    device: str
    nodes: Any = None
    execution: Any = None
    folder_paths: Any = None
    progress: list[tuple] = field(default_factory=list)

    @property
    def node_class_mappings(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS


_ENV: ComfyEnv | None = None


def env() -> ComfyEnv:
    if _ENV is None:
        raise RuntimeError("ComfyUI is not booted: call harness.boot() first (the `comfy` fixture does)")
    return _ENV


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def _redirect_folders(folder_paths, root: Path) -> dict[str, Path]:
    """Point every ComfyUI folder at ``root`` so tests never read or write the checkout."""
    dirs = {k: root / k for k in ("input", "output", "temp", "user", "models", "custom_nodes")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    old_models = os.path.abspath(folder_paths.models_dir)
    folder_paths.models_dir = str(dirs["models"])
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name == "custom_nodes":
            new = [str(dirs["custom_nodes"])]
        else:
            new = []
            for p in paths:
                p = os.path.abspath(p)
                rel = os.path.relpath(p, old_models) if p.startswith(old_models + os.sep) else name
                new.append(str(dirs["models"] / rel))
        folder_paths.folder_names_and_paths[name] = (new, exts)
    for p in {q for paths, _ in folder_paths.folder_names_and_paths.values() for q in paths}:
        os.makedirs(p, exist_ok=True)
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    folder_paths.filename_list_cache.clear()
    return dirs


def boot(comfy_path: str | os.PathLike, root: str | os.PathLike, pack_dir: str | os.PathLike,
         force_cpu: bool = True) -> ComfyEnv:
    """Import ComfyUI from ``comfy_path`` (once per process), load its built-in nodes and this pack."""
    global _ENV
    if _ENV is not None:
        return _ENV
    t0 = time.perf_counter()
    comfy_path = Path(comfy_path).resolve()
    root, pack_dir = Path(root).resolve(), Path(pack_dir).resolve()
    if not (comfy_path / "nodes.py").is_file() or not (comfy_path / "execution.py").is_file():
        raise HarnessError(f"COMFYUI_PATH={comfy_path} is not a ComfyUI checkout (no nodes.py / execution.py)")
    for mod in ("nodes", "execution", "folder_paths", "utils"):
        m = sys.modules.get(mod)
        if m is not None and not str(getattr(m, "__file__", "")).startswith(str(comfy_path)):
            raise HarnessError(f"module {mod!r} already imported from {getattr(m, '__file__', m)}; "
                               "tier-2 tests must run in their own pytest process")
    sys.path.insert(0, str(comfy_path))

    import comfy.options  # noqa: F401  (args parsing stays disabled: cli_args parses [] not pytest's argv)
    from comfy.cli_args import args
    if force_cpu:
        args.cpu = True
    # main.py imports ComfyUI's `utils` package before `nodes`, which puts comfy/ first on sys.path
    # (comfy/utils.py would then shadow it: nodes_images.py -> server -> utils.install_util fails).
    importlib.import_module("utils.extra_config")
    importlib.import_module("utils.install_util")
    import folder_paths
    dirs = _redirect_folders(folder_paths, root)

    import comfy.model_management as mm
    import comfy.utils
    import execution
    import nodes

    # The pack is installed the way a user installs it: a folder in custom_nodes/.
    link = dirs["custom_nodes"] / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(pack_dir, target_is_directory=True)

    handler = _ListHandler()

    async def _load():
        await nodes.init_public_apis()
        failed = await nodes.init_builtin_extra_nodes()
        base = set(nodes.NODE_CLASS_MAPPINGS)
        logging.getLogger().addHandler(handler)
        try:
            # exactly the call init_external_custom_nodes() makes for each custom_nodes/ entry
            ok = await nodes.load_custom_node(str(link), base, module_parent="custom_nodes")
        finally:
            logging.getLogger().removeHandler(handler)
        return failed, base, ok

    builtin_failed, base, ok = asyncio.run(_load())
    pack_module = f"custom_nodes.{PACK_FOLDER_NAME}"
    pack_ids = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                      if k not in base and getattr(v, "RELATIVE_PYTHON_MODULE", None) == pack_module)

    progress: list[tuple] = []

    def _progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        mm.throw_exception_if_processing_interrupted()
        progress.append((node_id, value, total))
        if node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)

    comfy.utils.set_progress_bar_global_hook(_progress_hook)

    _ENV = ComfyEnv(
        comfy_path=comfy_path, root=root, input_dir=dirs["input"], output_dir=dirs["output"],
        temp_dir=dirs["temp"], models_dir=dirs["models"], custom_nodes_dir=dirs["custom_nodes"],
        pack_dir=pack_dir, pack_loaded=bool(ok), pack_node_ids=pack_ids, pack_module=pack_module,
        pack_load_log=handler.lines, builtin_import_failed=list(builtin_failed),
        boot_seconds=time.perf_counter() - t0, device=str(mm.get_torch_device()),
        nodes=nodes, execution=execution, folder_paths=folder_paths, progress=progress,
    )
    return _ENV


def refresh_file_lists() -> None:
    """Forget ComfyUI's cached folder listings (call after writing model/input files)."""
    env().folder_paths.filename_list_cache.clear()


def model_path(folder_name: str, filename: str) -> Path:
    """Where a model file named ``filename`` of ComfyUI folder type ``folder_name`` is looked up."""
    paths = env().folder_paths.folder_names_and_paths[folder_name][0]
    return Path(paths[0]) / filename


# --------------------------------------------------------------------------------------------------
# UI workflow -> API prompt (diffusion_matting.py.workflow_api; its errors become test failures here)
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _as_harness_error():
    try:
        yield
    except W.WorkflowError as e:
        raise HarnessError(str(e)) from e


def map_widget_values(cls, values, strict: bool = True, where: str = "") -> dict[str, Any]:
    """:func:`diffusion_matting.py.workflow_api.map_widget_values`, raising :class:`HarnessError`."""
    with _as_harness_error():
        return W.map_widget_values(cls, values, strict=strict, where=where)


def ui_to_api(workflow: dict, node_class_mappings: dict | None = None, strict: bool = True) -> dict:
    """Convert a UI-format workflow into an API-format prompt ``{id: {class_type, inputs, _meta}}`` with
    the booted ComfyUI's node classes (or ``node_class_mappings``) and display names.

    ``strict`` (default) fails on ``widgets_values`` that do not line up with the node schema (a
    workflow file that is out of date with its nodes); ``strict=False`` tolerates older files the way
    the front end does (missing control values, trailing extras).
    """
    if node_class_mappings is None:
        node_class_mappings = env().node_class_mappings
    if "nodes" not in workflow:
        raise HarnessError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
    try:
        display_names = env().nodes.NODE_DISPLAY_NAME_MAPPINGS
    except RuntimeError:  # ComfyUI not booted: class names
        display_names = {}
    with _as_harness_error():
        return W.ui_to_api(workflow, node_class_mappings, strict=strict, display_names=display_names)


def links_into(prompt: dict, node_id: str) -> dict[str, tuple[str, int]]:
    """The linked inputs of ``node_id``: input name -> (origin node id, origin slot)."""
    return {k: (v[0], int(v[1])) for k, v in prompt[node_id]["inputs"].items()
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}


# --------------------------------------------------------------------------------------------------
# Validation and execution
# --------------------------------------------------------------------------------------------------

def _validate_raw(prompt: dict):
    return asyncio.run(env().execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def validate(prompt: dict) -> list[dict]:
    """ComfyUI's own ``execution.validate_prompt``; returns its errors (empty list = valid).

    Each error: ``{node_id, class_type, type, message, details}`` (``node_id`` None for prompt-level).
    """
    ok, err, _outputs, node_errors = _validate_raw(prompt)
    return _errors(ok, err, node_errors)


def _errors(ok, err, node_errors) -> list[dict]:
    errors = []
    for nid, info in node_errors.items():
        for e in info.get("errors") or []:
            errors.append({"node_id": nid, "class_type": info.get("class_type"), "type": e.get("type"),
                           "message": e.get("message"), "details": e.get("details")})
    if not ok and (not errors or err.get("type") != "prompt_outputs_failed_validation"):
        errors.append({"node_id": None, "class_type": None, "type": err.get("type"),
                       "message": err.get("message"), "details": err.get("details")})
    return errors


def format_errors(errors: list[dict]) -> str:
    return "\n".join(f"  node {e['node_id']} ({e['class_type']}): [{e['type']}] {e['message']}: {e['details']}"
                     for e in errors)


class _Server:
    """The parts of server.PromptServer that PromptExecutor and the progress handlers touch."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def queue_updated(self):
        pass


@dataclass
class Run:
    prompt: dict
    prompt_id: str
    success: bool
    outputs: dict            # history "outputs": node id -> ui dict (images, text, ...)
    messages: list           # (event, data) the executor sent
    seconds: float
    executor: Any = None

    @property
    def error(self) -> dict | None:
        for event, data in self.messages:
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None

    def raise_for_error(self) -> None:
        if not self.success:
            e = self.error or {}
            raise HarnessError(f"execution failed in node {e.get('node_id')} ({e.get('node_type')}): "
                               f"{e.get('exception_type')}: {e.get('exception_message')}\n"
                               + "".join(e.get("traceback") or []))

    def node_outputs(self, node_id: str) -> list | None:
        """Every output slot of an executed node: ``[slot][list_index]`` (None if it did not run)."""
        return self.executor.caches.outputs.get(str(node_id))

    def output(self, node_id: str, slot: int = 0, index: int = 0):
        data = self.node_outputs(node_id)
        if data is None:
            raise KeyError(f"node {node_id} produced no cached outputs (not executed?)")
        return data[slot][index]

    def files(self, node_id: str | None = None, key: str = "images") -> list[Path]:
        """Files an output node reported in its UI result (SaveImage -> output/, PreviewImage -> temp/)."""
        e = env()
        base = {"output": e.output_dir, "temp": e.temp_dir, "input": e.input_dir}
        found = []
        for nid, ui in self.outputs.items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for item in ui.get(key) or []:
                if isinstance(item, dict) and "filename" in item:
                    found.append(base[item.get("type", "output")] / item.get("subfolder", "") / item["filename"])
        return found


def execute(prompt: dict, extra_data: dict | None = None, capture: Iterable[str] = ()) -> Run:
    """Validate (failing on any error) and execute ``prompt`` the way the server's prompt worker does.

    Every output node that validates is executed, plus the node ids in ``capture`` (so their outputs
    are computed and can be read with :meth:`Run.output` even if no output node needs them).
    """
    e = env()
    ok, err, good_outputs, node_errors = _validate_raw(prompt)
    errors = _errors(ok, err, node_errors)
    if errors:
        raise HarnessError("prompt failed validation:\n" + format_errors(errors))
    server = _Server()
    try:
        import server as comfy_server  # only to give nodes that call PromptServer.instance something
        if getattr(comfy_server.PromptServer, "instance", None) is None:
            comfy_server.PromptServer.instance = server
    except Exception:  # pragma: no cover - server import problems surface in the load test
        pass
    executor = e.execution.PromptExecutor(server)
    prompt_id = str(uuid.uuid4())
    targets = list(dict.fromkeys([*map(str, good_outputs), *map(str, capture)]))
    t0 = time.perf_counter()
    executor.execute(prompt, prompt_id, dict(extra_data or {}), targets)
    seconds = time.perf_counter() - t0
    return Run(prompt=prompt, prompt_id=prompt_id, success=bool(executor.success),
               outputs=executor.history_result.get("outputs", {}),
               messages=list(executor.status_messages) + server.messages, seconds=seconds, executor=executor)


def upstream(prompt: dict, node_id: str, input_name: str) -> tuple[str, int] | None:
    """(origin id, slot) feeding ``input_name`` of ``node_id`` in an API prompt, or None."""
    return links_into(prompt, node_id).get(input_name)


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def upload_files(prompt: dict, flags: Iterable[str] = ("image_upload",)) -> list[str]:
    """Input-folder filenames an API prompt's upload combos name (LoadImage's ``image``, ...)."""
    mappings = env().node_class_mappings
    names = []
    for n in prompt.values():
        cls = mappings.get(n["class_type"])
        if cls is None:
            continue
        for _group, name, typ, opts in input_specs(cls):
            value = n["inputs"].get(name)
            if isinstance(value, str) and any(opts.get(f) is True for f in flags):
                names.append(value)
    return list(dict.fromkeys(names))

