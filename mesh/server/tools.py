"""Tool calling on any chat model: one format, a grammar to keep the model in it, a parser.

A chat template that renders ``tools`` itself gets them (and the conversation in the Hugging
Face shape); for any other, mesh describes the tools in the system message. Either way the
reply is Hermes-style calls, the format Qwen 2.5, Hermes and SmolLM3 were trained on::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

A grammar (mesh.engine.constraint) holds the model to it: with ``tool_choice: "auto"`` the
reply is either plain text (it must not start with ``<``) or one or more calls; with
``"required"`` or a named function it is calls only; in every call ``arguments`` follows the
function's JSON schema. So even a 135M model that has never seen a tool returns calls that
parse and validate. Without a tools-aware template, conversations feed back as the same
text: an assistant turn's ``tool_calls`` become its ``<tool_call>`` blocks, ``role: tool``
messages a user turn of ``<tool_response>`` blocks (Gemma 3's template has no tool role).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from mesh.engine.constraint import lark_grammar, lark_json
from mesh.errors import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r'<tool_call>\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_FN_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Tools:
    functions: list[dict]  # {"name", "description", "parameters"}
    mode: str  # "auto", "required" or "named"
    parallel: bool = True
    named: str | None = None

    @classmethod
    def from_request(cls, tools, tool_choice, parallel_tool_calls) -> "Tools | None":
        """None when the request uses no tools (none given, or ``tool_choice: "none"``)."""
        if tool_choice is not None and not tools and tool_choice != "none":
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        if not tools:
            return None
        functions = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
                raise InvalidRequest("each tool must be {\"type\": \"function\", \"function\": "
                                     "{...}}", param=f"tools[{i}]")
            name = fn.get("name")
            if not isinstance(name, str) or not _FN_NAME.match(name):
                raise InvalidRequest("a function name is 1-64 letters, digits, _ . : or -",
                                     param=f"tools[{i}].function.name")
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise InvalidRequest("function parameters must be a JSON schema object",
                                     param=f"tools[{i}].function.parameters")
            if any(f["name"] == name for f in functions):
                raise InvalidRequest(f"two tools are named {name!r}", param=f"tools[{i}]")
            functions.append({"name": name, "description": fn.get("description", ""),
                              "parameters": closed_objects(params)})
        named = None
        if tool_choice in (None, "auto"):
            mode = "auto"
        elif tool_choice == "none":
            return None
        elif tool_choice == "required":
            mode = "required"
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            named, mode = tool_choice["function"].get("name"), "named"
            if named not in [f["name"] for f in functions]:
                raise InvalidRequest(f"tool_choice names {named!r}, which is not in tools",
                                     param="tool_choice")
        else:
            raise InvalidRequest("tool_choice must be none, auto, required or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                                 param="tool_choice")
        return cls(functions, mode, parallel_tool_calls is not False, named)

    # ---- prompt -------------------------------------------------------------------------

    def for_template(self) -> list[dict]:
        """The tools as a chat template that renders them expects (OpenAI's shape)."""
        return [{"type": "function", "function": f} for f in self.functions]

    def system_text(self) -> str:
        lines = ["You can call these functions (JSON schemas of their arguments):"]
        for f in self.functions:
            lines.append(json.dumps({"name": f["name"], "description": f["description"],
                                     "parameters": f["parameters"]}))
        lines.append(f"To call a function, reply with {OPEN}{{\"name\": <function name>, "
                     f"\"arguments\": <arguments object>}}{CLOSE}"
                     + (", one block per call." if self.parallel else "."))
        if self.mode == "auto":
            lines.append("If no function is needed, answer normally.")
        return "\n".join(lines)

    def grammar(self) -> str:
        pool = [f for f in self.functions if self.mode != "named" or f["name"] == self.named]
        rules = []
        for i, f in enumerate(pool):
            schema = {"type": "object", "properties": {
                "name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}
            rules.append(f"fn{i}: {lark_json(schema)}")
        calls = 'call ("\\n" call)*' if self.parallel and self.mode != "named" else "call"
        start = "free | calls" if self.mode == "auto" else "calls"
        return lark_grammar("\n".join([
            f"start: {start}", f"calls: {calls}",
            f'call: "{OPEN}" ({" | ".join(f"fn{i}" for i in range(len(pool)))}) "{CLOSE}"',
            r"free: /[^<][\s\S]*/", *rules]))


def closed_objects(schema):
    """An object schema that lists its properties and says nothing about others gets
    ``additionalProperties: false`` (OpenAI's strict mode): otherwise a small model, free to
    add keys, pads a call with made-up ones."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("properties", "$defs", "definitions", "enum",
                                             "const", "default", "examples") else v
           for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _arguments(fn: dict):
    args = fn.get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def render_messages(messages: list[dict], tools: Tools | None,
                    native: bool = False) -> list[dict]:
    """OpenAI messages (with tool calls and results) -> what the chat template renders.

    ``native``: the template renders tools itself (it gets ``tools=`` and these messages in
    the Hugging Face shape: calls with their arguments as objects, ``role: tool`` turns).
    Otherwise plain role/content turns any template renders, the tools described in the
    system message."""
    if native:
        out = []
        for m in messages:
            turn = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                turn["tool_calls"] = [
                    {"id": c.get("id"), "type": "function", "function": {
                        "name": c.get("function", {}).get("name", ""),
                        "arguments": _arguments(c.get("function", {}))}}
                    for c in m["tool_calls"] if isinstance(c, dict)]
            if m.get("tool_call_id"):
                turn["tool_call_id"] = m["tool_call_id"]
            out.append(turn)
        return out
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for c in m["tool_calls"]:
                fn = c.get("function", {}) if isinstance(c, dict) else {}
                blocks.append(OPEN + json.dumps({"name": fn.get("name", ""),
                                                 "arguments": _arguments(fn)}) + CLOSE)
            content = "\n".join(([content] if content else []) + blocks)
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if tools is not None:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools.system_text()}
        else:
            out.insert(0, {"role": "system", "content": tools.system_text()})
    return out


@dataclass
class ToolCallParser:
    """Follows one choice's text as it streams: plain content, or tool calls as OpenAI streams
    them (a first delta with index, id and name, then fragments of the arguments)."""

    mode: str | None = None  # None until the first character decides: "content" / "calls"
    done: bool = False  # the model repeated a call it already made: a loop, stop it here
    buf: str = ""
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments"}
    _args_from: int = -1  # where the open call's arguments start in buf
    _sent: int = 0  # how much of the open call's arguments was emitted

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """-> (content to emit, tool-call deltas to emit)."""
        if self.mode is None:
            self.buf += text
            stripped = self.buf.lstrip()
            if not stripped and not final:
                return "", []
            self.mode = "calls" if stripped.startswith("<") else "content"
            text, self.buf = self.buf, ""
        if self.mode == "content":
            return text, []
        self.buf += text
        deltas = []
        while True:
            if self._args_from < 0:
                m = _NAME.search(self.buf)
                if m is None:
                    break
                self.calls.append({"id": _call_id(), "name": json.loads(f'"{m.group(1)}"'),
                                   "arguments": ""})
                self._args_from, self._sent = m.end(), 0
                deltas.append({"index": len(self.calls) - 1, "id": self.calls[-1]["id"],
                               "type": "function",
                               "function": {"name": self.calls[-1]["name"], "arguments": ""}})
            end = self.buf.find(CLOSE, self._args_from)
            if end >= 0:  # the call is complete: its arguments end before the closing "}"
                args = self.buf[self._args_from:end]
                args = args[:-1] if args.endswith("}") else args
                self.buf = self.buf[end + len(CLOSE):]
                self._args_from = -1
                done = self.calls[-1]["arguments"] + args[self._sent:]
                if any(c["name"] == self.calls[-1]["name"] and c["arguments"] == done
                       for c in self.calls[:-1]):
                    self.done = True
            else:  # hold back what may turn out to be the closing '}</tool_call>'
                args = self.buf[self._args_from:]
                if not final:
                    args = args[:max(self._sent, len(args) - len(CLOSE) - 1)]
            fragment = args[self._sent:]
            self._sent = len(args)
            if fragment:
                self.calls[-1]["arguments"] += fragment
                deltas.append({"index": len(self.calls) - 1,
                               "function": {"arguments": fragment}})
            if end < 0 or self.done:
                break
        return "", deltas

    def complete_calls(self) -> list[dict]:
        """The calls whose text closed (a reply cut by max_tokens may end inside one)."""
        return list(self.calls[:-1] if self._args_from >= 0 else self.calls)
