"""UI-format ComfyUI workflows (what the front end saves) -> API-format prompts (what ``POST /prompt`` takes).

The node schemas come from a server's ``GET /object_info`` (a dict ``class_type -> info``), so no ComfyUI
import is needed; classes with ``INPUT_TYPES()`` work too. Same semantics as the front end's
``graphToPrompt`` (and the tier-2 harness, ``tests/comfy/harness.py``, which this follows): widget values
are matched to widget inputs in schema order, ``control_after_generate`` / ``control_filter_list`` /
upload widgets are skipped, links win over widget values, bypassed nodes (mode 4) pass their matching input
through, muted nodes (mode 2) drop out, Reroute / PrimitiveNode / Note / MarkdownNote are virtual, and
subgraphs are flattened into ``outer:inner`` ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .errors import UserError

# Widget constructors the 1.27 front end (the one ComfyUI 0.3.64 ships) knows. Other input types are sockets.
WIDGET_TYPES = {
    "INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
    "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
    "WEBCAM", "AUDIO_UI", "AUDIOUPLOAD", "AUDIO_RECORD",
}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
VIRTUAL_TYPES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
MODE_NEVER = 2   # "muted": not executed, links from it are dropped
MODE_BYPASS = 4  # outputs pass the first type-matching input through
SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20


class WorkflowError(UserError):
    """A workflow that cannot be converted (unknown node types, widget values that do not fit the schema)."""


class ObjectInfoSchema:
    """One ``/object_info`` entry with the ``INPUT_TYPES()`` face the converter reads (inputs in
    ``input_order`` when the server gives it)."""

    def __init__(self, info: dict):
        self.info = info

    def INPUT_TYPES(self) -> dict:  # noqa: N802 - ComfyUI's name
        inputs = self.info.get("input") or {}
        order = self.info.get("input_order") or {}
        out = {}
        for group in ("required", "optional"):
            specs = inputs.get(group) or {}
            names = [n for n in order.get(group) or [] if n in specs]
            names += [n for n in specs if n not in names]
            out[group] = {n: specs[n] for n in names}
        return out

    @property
    def display_name(self) -> str | None:
        return self.info.get("display_name")


def schemas_from_object_info(object_info: dict) -> dict[str, ObjectInfoSchema]:
    return {k: ObjectInfoSchema(v) for k, v in object_info.items() if isinstance(v, dict)}


def _split_spec(spec) -> tuple[Any, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return spec, {}
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], opts


def input_specs(cls) -> list[tuple[str, str, Any, dict]]:
    """(group, name, type, options) for every required then optional input, in the order the front end
    lays them out (``input_order``: required first, then optional; V3 schemas give the same dicts)."""
    types = cls.INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, spec in (types.get(group) or {}).items():
            typ, opts = _split_spec(spec)
            out.append((group, name, typ, opts))
    return out


def _widget_type(typ, opts) -> str | None:
    if isinstance(typ, (list, tuple)):
        return "COMBO"
    wtype = opts.get("widgetType") or typ
    if not isinstance(wtype, str) or wtype not in WIDGET_TYPES or opts.get("forceInput"):
        return None
    return wtype


def widget_layout(cls) -> list[tuple[str | None, str]]:
    """The widgets the front end creates for ``cls``, in ``widgets_values`` order.

    Each entry is ``(input_name, "value")`` for a widget whose value goes to the API, or
    ``(None, kind)`` for a front-end-only widget: ``control`` (control_after_generate: INT inputs that
    ask for it, or are named seed/noise_seed and don't say otherwise; COMBO inputs that ask for it),
    ``filter`` (the control_filter_list string a COMBO control adds) and ``upload`` (the upload button
    the UploadImage/UploadAudio extensions append after all inputs).
    """
    layout: list[tuple[str | None, str]] = []
    upload = False
    for group, name, typ, opts in input_specs(cls):
        wtype = _widget_type(typ, opts)
        if wtype is None:
            continue
        layout.append((name, "value"))
        if wtype == "INT":
            cag = opts.get("control_after_generate")
            if cag is None:
                cag = name in ("seed", "noise_seed")
            if cag:
                layout.append((None, "control"))
        elif wtype == "COMBO" and opts.get("control_after_generate"):
            layout += [(None, "control"), (None, "filter")]
        if group == "required" and wtype == "COMBO" and any(opts.get(k) is True for k in UPLOAD_FLAGS):
            upload = True
        if group == "required" and name == "audio" and opts.get("audio_upload") is True:
            upload = True
    if upload:
        layout.append((None, "upload"))
    return layout


def widget_default(cls, name: str):
    """The value a freshly created widget has (the front end's getDefaultValue)."""
    for _group, n, typ, opts in input_specs(cls):
        if n != name:
            continue
        if "default" in opts:
            return opts["default"]
        if isinstance(typ, (list, tuple)):
            return typ[0] if typ else None
        if typ == "COMBO":
            options = opts.get("options") or []
            return options[0] if options else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)
    return None


def map_widget_values(cls, values, strict: bool = True, where: str = "") -> dict[str, Any]:
    """Map a node's ``widgets_values`` onto its widget input names (see :func:`widget_layout`)."""
    if values is None:
        values = []
    if isinstance(values, dict):  # some nodes serialize a name -> value dict
        names = {n for n, k in widget_layout(cls) if k == "value"}
        return {k: v for k, v in values.items() if k in names}
    values = list(values)
    layout = widget_layout(cls)
    out: dict[str, Any] = {}
    i = 0
    prev = None
    for name, kind in layout:
        if kind == "value":
            prev = name
            if i >= len(values):
                if strict:
                    raise WorkflowError(f"{where}: widgets_values has {len(values)} entries, no value for "
                                       f"widget {name!r} (layout {[n or k for n, k in layout]})")
                default = widget_default(cls, name)  # the front end keeps the widget's default
                if default is not None:
                    out[name] = default
                continue
            if values[i] is not None:
                out[name] = values[i]
            i += 1
        elif kind == "control":
            # (old files saved KSampler's control as a boolean; the front end migrates True/False)
            if i < len(values) and (values[i] in CONTROL_VALUES or isinstance(values[i], bool)):
                i += 1
            elif strict and i < len(values):
                raise WorkflowError(f"{where}: expected a control_after_generate value after {prev!r}, "
                                   f"got {values[i]!r}")
        elif kind == "filter":
            if i < len(values) and (values[i] is None or isinstance(values[i], str)):
                i += 1
        elif kind == "upload":
            if i < len(values):
                i += 1
    if strict and i != len(values):
        raise WorkflowError(f"{where}: {len(values) - i} widgets_values left over after mapping "
                           f"{[n or k for n, k in layout]}: {values[i:]!r}")
    return out


def _type_str(t) -> str:
    if isinstance(t, (list, tuple)):
        return "COMBO"
    return "" if t is None else str(t)


def _valid_connection(a, b) -> bool:
    """LiteGraph.isValidConnection: '*' / empty match anything; comma lists match any member."""
    a, b = _type_str(a), _type_str(b)
    if not a or not b or a == "*" or b == "*" or a == b:
        return True
    a, b = a.lower(), b.lower()
    if "," not in a and "," not in b:
        return a == b
    return bool(set(a.split(",")) & set(b.split(",")))


@dataclass(frozen=True)
class _Ref:
    node_id: str
    slot: int


@dataclass(frozen=True)
class _Value:
    value: Any


class _Scope:
    """One graph level: the root graph or one instance of a subgraph definition."""

    def __init__(self, nodes: list[dict], links: Iterable, path: tuple[str, ...] = (),
                 instance: dict | None = None, parent: "_Scope | None" = None,
                 definition: dict | None = None):
        self.nodes = {str(n["id"]): n for n in nodes}
        self.links: dict[int, dict] = {}
        for link in links or []:
            if isinstance(link, dict):
                d = link
            else:
                d = dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
            self.links[int(d["id"])] = d
        self.path, self.instance, self.parent, self.definition = path, instance, parent, definition

    def exec_id(self, node: dict) -> str:
        return ":".join((*self.path, str(node["id"])))

    def node(self, node_id) -> dict | None:
        return self.nodes.get(str(node_id))


class _Converter:
    def __init__(self, workflow: dict, mappings: dict, strict: bool, display_names: dict | None = None):
        self.mappings, self.strict, self.display_names = mappings, strict, display_names or {}
        self.subgraphs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
        if (workflow.get("extra") or {}).get("groupNodes"):
            raise WorkflowError("legacy group nodes (extra.groupNodes) are not supported; use subgraphs")
        self.root = _Scope(workflow.get("nodes") or [], workflow.get("links"))
        self._children: dict[int, _Scope] = {}

    def child(self, scope: _Scope, node: dict) -> _Scope:
        key = id(node)
        if key not in self._children:
            sg = self.subgraphs[node["type"]]
            self._children[key] = _Scope(sg.get("nodes") or [], sg.get("links"), (*scope.path, str(node["id"])),
                                         instance=node, parent=scope, definition=sg)
        return self._children[key]

    # -- resolution (mirrors the front end's ExecutableNodeDTO.resolveInput / resolveOutput) ----------
    def runtime_inputs(self, node: dict) -> list[dict]:
        """The input slots the node has in the running front end, in order.

        Saved files drop unlinked widget-input slots (``compressWidgetInputSlots``), so for a known class
        the slots are rebuilt from its schema (every non-hidden input, spec order) and the saved entries
        are matched by name; anything else keeps its saved slots."""
        saved = node.get("inputs") or []
        cls = self.mappings.get(node.get("type"))
        if cls is None:
            return list(saved)
        by_name = {((i.get("widget") or {}).get("name") or i.get("name")): i for i in saved}
        slots = []
        for _group, name, typ, opts in input_specs(cls):
            entry = by_name.pop(name, None)
            slots.append(entry if entry is not None else {"name": name, "type": _type_str(typ), "link": None})
        slots.extend(by_name.values())
        return slots

    def resolve_input(self, scope: _Scope, node: dict, inp: dict, visited: set, type_=None):
        key = (scope.path, node["id"], "I", inp.get("name"))
        if key in visited:
            raise WorkflowError(f"circular link through node {scope.exec_id(node)} input {inp.get('name')!r}")
        visited.add(key)
        if inp.get("link") is None:
            return None
        link = scope.links.get(int(inp["link"]))
        if link is None:
            raise WorkflowError(f"node {scope.exec_id(node)} input {inp.get('name')!r}: link {inp['link']} not found")
        if scope.instance is not None and link["origin_id"] == SUBGRAPH_INPUT_NODE:
            return self._subgraph_input(scope, int(link["origin_slot"]), visited)
        origin = scope.node(link["origin_id"])
        if origin is None:
            raise WorkflowError(f"link {link['id']}: origin node {link['origin_id']} not found")
        return self.resolve_output(scope, origin, int(link["origin_slot"]),
                                   type_ if type_ is not None else inp.get("type"), visited)

    def _subgraph_input(self, scope: _Scope, def_slot: int, visited: set):
        """An inner link from the subgraph's input node: follow the instance's input of that name
        outside, or, unlinked, take the value of the widget the subgraph node shows for it."""
        def_inputs = scope.definition.get("inputs") or []
        name = def_inputs[def_slot]["name"]
        outer = scope.instance
        entry = next((i for i in outer.get("inputs") or [] if i.get("name") == name), None)
        if entry is not None and entry.get("link") is not None:
            return self.resolve_input(scope.parent, outer, entry, visited)
        # promoted widgets: one per widget-typed subgraph input, in definition order
        k = sum(1 for d in def_inputs[:def_slot] if _type_str(d.get("type")) in WIDGET_TYPES)
        vals = outer.get("widgets_values") or []
        if _type_str(def_inputs[def_slot].get("type")) in WIDGET_TYPES and k < len(vals) and vals[k] is not None:
            return _Value(vals[k])
        return None

    def resolve_output(self, scope: _Scope, node: dict, slot: int, type_, visited: set):
        key = (scope.path, node["id"], "O", slot)
        if key in visited:
            raise WorkflowError(f"circular link through node {scope.exec_id(node)} output {slot}")
        visited.add(key)
        if node.get("mode") == MODE_BYPASS:
            inputs = self.runtime_inputs(node)
            idx = self._bypass_index(node, inputs, slot, type_)
            return None if idx < 0 else self.resolve_input(scope, node, inputs[idx], visited)
        ntype = node.get("type")
        if ntype in self.subgraphs:
            inner = self.child(scope, node)
            out = (inner.definition.get("outputs") or [])[slot]
            for lid in out.get("linkIds") or []:
                link = inner.links.get(int(lid))
                if link is None:
                    continue
                if link["origin_id"] == SUBGRAPH_INPUT_NODE:  # passes an input straight through
                    return self._subgraph_input(inner, int(link["origin_slot"]), visited)
                origin = inner.node(link["origin_id"])
                if origin is not None:
                    return self.resolve_output(inner, origin, int(link["origin_slot"]), type_, visited)
            return None
        if ntype == "PrimitiveNode":
            vals = node.get("widgets_values") or []
            return _Value(vals[0]) if vals else None
        if ntype in VIRTUAL_TYPES:  # Reroute passes input N to output N; Notes have nothing
            inputs = node.get("inputs") or []
            if slot < len(inputs):
                return self.resolve_input(scope, node, inputs[slot], visited, type_)
            return None
        return _Ref(scope.exec_id(node), slot)

    @staticmethod
    def _bypass_index(node: dict, inputs: list[dict], slot: int, type_) -> int:
        """Which input a bypassed node passes to output ``slot`` (same slot if the types fit, else the
        first exact type match, else the first compatible input); -1 if none."""
        if not inputs:
            return -1
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else "*"
        t = _type_str(type_)
        if t in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs) and _valid_connection(inputs[slot].get("type"), out_type) \
                and _valid_connection(inputs[slot].get("type"), t):
            return slot
        for i, inp in enumerate(inputs):
            if _type_str(inp.get("type")) == t:
                return i
        for i, inp in enumerate(inputs):
            if _valid_connection(inp.get("type"), out_type) and _valid_connection(inp.get("type"), t):
                return i
        return -1

    # -- emission ---------------------------------------------------------------------------------
    def convert(self) -> dict:
        out: dict[str, dict] = {}
        unknown: set[str] = set()
        self._emit(self.root, out, unknown)
        if unknown:
            raise WorkflowError(f"unknown node types (not registered in ComfyUI): {sorted(unknown)}")
        for entry in out.values():  # drop links to nodes that are not in the prompt (muted)
            for k in [k for k, v in entry["inputs"].items()
                      if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in out]:
                del entry["inputs"][k]
        return out

    def _emit(self, scope: _Scope, out: dict, unknown: set) -> None:
        for node in scope.nodes.values():
            ntype, mode = node.get("type"), node.get("mode", 0)
            if mode in (MODE_NEVER, MODE_BYPASS) or ntype in VIRTUAL_TYPES:
                continue
            if ntype in self.subgraphs:
                self._emit(self.child(scope, node), out, unknown)
                continue
            cls = self.mappings.get(ntype)
            if cls is None:
                unknown.add(str(ntype))
                continue
            nid = scope.exec_id(node)
            where = f"node {nid} ({ntype})"
            inputs: dict[str, Any] = {}
            for name, value in map_widget_values(cls, node.get("widgets_values"), self.strict, where).items():
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            for inp in node.get("inputs") or []:
                if inp.get("link") is None:
                    continue
                name = (inp.get("widget") or {}).get("name") or inp["name"]
                res = self.resolve_input(scope, node, inp, set())
                if isinstance(res, _Ref):
                    inputs[name] = [res.node_id, res.slot]
                elif isinstance(res, _Value):
                    inputs[name] = {"__value__": res.value} if isinstance(res.value, list) else res.value
            title = node.get("title")
            if not title:
                title = self._display_name(ntype)
            out[nid] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}

    def _display_name(self, ntype: str) -> str:
        return (self.display_names.get(ntype) or getattr(self.mappings.get(ntype), "display_name", None)
                or ntype)


def ui_to_api(workflow: dict, schemas: dict, strict: bool = False, display_names: dict | None = None) -> dict:
    """Convert a UI-format workflow into an API-format prompt ``{id: {class_type, inputs, _meta}}``.

    ``schemas``: ``GET /object_info`` (``class_type -> info``) or ``class_type -> class``. ``strict`` fails
    on ``widgets_values`` that do not line up with the node schema; the default tolerates older files the
    way the front end does (missing control values, trailing extras). ``display_names`` (``class_type ->
    name``, e.g. ComfyUI's ``NODE_DISPLAY_NAME_MAPPINGS``) titles untitled nodes; otherwise the schema's
    ``display_name``, else the class type. An API-format prompt is returned unchanged (a copy)."""
    if "nodes" not in workflow:
        if workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return {str(k): dict(v) for k, v in workflow.items()}
        raise WorkflowError("neither a UI-format workflow (no 'nodes') nor an API-format prompt")
    mappings = {k: (ObjectInfoSchema(v) if isinstance(v, dict) else v) for k, v in schemas.items()}
    return _Converter(workflow, mappings, strict, display_names).convert()
