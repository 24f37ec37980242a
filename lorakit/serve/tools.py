"""Tool calling and structured outputs in /v1/chat/completions: the request shapes, the prompt,
the grammar each answer is decoded under, and reading the calls back out of the answer.

The wire format is OpenAI's (`tools`, `tool_choice`, `parallel_tool_calls`, `response_format`,
assistant `tool_calls` with JSON-string `arguments`, `role: tool` messages with `tool_call_id`).
In the prompt a call is written the Hermes way that Qwen2.5, Qwen3 and SmolLM3's chat templates
use: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call. A
template that takes `tools=` (transformers' `apply_chat_template(tools=...)`) renders the tools
and the tool turns itself; for one that does not (ChatML without tools, e.g. SmolLM2's), the
tools go into the system message in the same words Qwen2.5's template uses, past calls become
`<tool_call>` blocks and tool results `<tool_response>` blocks in a user turn, as Qwen's do.

The answer is decoded under a grammar (lorakit/serve/grammar.py), as vLLM does with
`tool_choice: required` and named functions: `required` allows only calls, each one's arguments
valid under its function's `parameters` schema; a named function allows exactly one call to it;
`auto` allows either plain text (which may not begin with `<`) or calls, so once the model
starts a call its arguments are constrained too; `parallel_tool_calls: false` allows one call.
vLLM's `guided_choice` extension (the answer is exactly one of a list of strings) is taken too:
a classifier adapter answers with its own label text, with no JSON around it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from lorakit.serve.grammar import GrammarError

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              populate_by_name=True)


FunctionName = Annotated[str, Field(pattern=NAME_PATTERN, description="[A-Za-z0-9_-]{1,64}")]


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of type object")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class CallFunction(_Strict):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CallFunction


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    schema_: dict = Field(alias="schema", description="a JSON schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_type(value: object) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):  # {"type": {}} is a 400, not a TypeError (schemathesis)
        return None
    return {"text": "Text", "json_object": "JsonObject", "json_schema": "JsonSchema"}.get(kind)


# Tags in capitals, so an error's location reads response_format.json_schema.schema (protocol.py's
# `_where` drops them) rather than repeating the type.
ResponseFormat = Annotated[Union[Annotated[TextFormat, Tag("Text")],
                                 Annotated[JsonObjectFormat, Tag("JsonObject")],
                                 Annotated[JsonSchemaFormat, Tag("JsonSchema")]],
                           Discriminator(_format_type, custom_error_type="response_format",
                                         custom_error_message="expected type text, json_object "
                                         "or json_schema")]


def _error(message: str, param: str):
    from lorakit.serve.protocol import ApiError

    return ApiError(400, message, param=param)


def check_tools(req) -> None:
    """The checks pydantic cannot make: names unique and known, schemas of objects, tool turns
    well formed. Raises a 400 naming the field."""
    tools = req.tools or []
    names = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function"
        if tool.function.name in names:
            raise _error(f"{where}.name: {tool.function.name!r} is also tools"
                         f"[{names[tool.function.name]}]'s name (expected unique names)",
                         f"{where}.name")
        names[tool.function.name] = i
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise _error(f"{where}.parameters: expected a JSON schema of type object (got type "
                         f"{str(params.get('type'))[:40]!r})", f"{where}.parameters")
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise _error(f"tool_choice.function.name: {choice.function.name!r} is not one of "
                         f"the tools ({', '.join(names) or 'none given'})",
                         "tool_choice.function.name")
    elif choice == "required" and not tools:
        raise _error("tool_choice: required needs at least one tool in tools", "tool_choice")
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role == "tool" and (m.tool_call_id is None or m.content is None):
            raise _error(f"{where}: a role: tool message needs tool_call_id and content", where)
        if m.tool_calls and m.role != "assistant":
            raise _error(f"{where}.tool_calls: only assistant messages have tool calls",
                         f"{where}.tool_calls")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise _error(f"{where}.content: required (null only for an assistant message with "
                         "tool_calls)", f"{where}.content")
        for j, call in enumerate(m.tool_calls or []):
            try:
                args = json.loads(call.function.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise _error(f"{where}.tool_calls[{j}].function.arguments: expected a JSON object "
                             f"as a string (got {call.function.arguments[:60]!r})",
                             f"{where}.tool_calls[{j}].function.arguments")


# -- the grammar -------------------------------------------------------------------------------

def _compact(schema: dict) -> dict:
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}


def _call_schema(tool: Tool) -> dict:
    params = tool.function.parameters  # none: the function takes no arguments (OpenAI)
    if params is None:
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def answer_grammar(req, compiler) -> str | None:
    """The grammar a chat request's answer is decoded under (None: free text), compiled and
    checked against the served tokenizer; a 400 naming the schema that does not compile."""
    fmt = req.response_format
    answer = None  # the JSON schema of a non-tool answer
    if isinstance(fmt, JsonObjectFormat):
        answer = {"type": "object"}
    elif isinstance(fmt, JsonSchemaFormat):
        answer = fmt.json_schema.schema_
        try:
            compiler.json_schema(answer)
        except GrammarError as e:
            raise _error(f"response_format.json_schema.schema: cannot be compiled ({e})",
                         "response_format.json_schema.schema") from None
    tools = req.tools or []
    if req.guided_choice:
        if tools or answer is not None:
            raise _error("guided_choice: not with tools or a JSON response_format (choose one)",
                         "guided_choice")
        return compiler.lark("start: " + " | ".join(json.dumps(c) for c in req.guided_choice))
    if not tools:
        return None if answer is None else compiler.json_schema(answer)
    for i, tool in enumerate(tools):
        try:
            compiler.json_schema(_call_schema(tool))
        except GrammarError as e:
            raise _error(f"tools[{i}].function.parameters: cannot be compiled ({e})",
                         f"tools[{i}].function.parameters") from None
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        calls = "call"
    else:
        chosen = tools
        calls = 'call ("\\n" call)*' if req.parallel_tool_calls else "call"
    one = {"anyOf": [_call_schema(t) for t in chosen]} if len(chosen) > 1 else _call_schema(chosen[0])
    lines = [f"calls: {calls}",
             f'call: "<tool_call>\\n" %json {json.dumps(_compact(one))} "\\n</tool_call>"']
    if choice == "auto":
        if answer is None:
            lines = ["start: TEXT | calls", r"TEXT: /[^<][\s\S]*/"] + lines
        else:
            lines = ["start: answer | calls", f"answer: %json {json.dumps(_compact(answer))}"] + lines
    else:
        lines = ["start: calls"] + lines
    try:
        return compiler.lark("\n".join(lines) + "\n")
    except GrammarError as e:
        raise _error(f"tools: the tools' schemas cannot be compiled together ({e})",
                     "tools") from None


# -- the prompt --------------------------------------------------------------------------------

def template_takes_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template if isinstance(template, str) else False


def tools_json(tools: list[Tool]) -> list[dict]:
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)}
            for t in tools]


TOOLS_SYSTEM = (  # Qwen2.5's chat template's words for its tools block
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def call_block(name: str, arguments: dict) -> str:
    """A call as the model writes it under the grammar (compact JSON), so past calls in the
    prompt read as the model's own."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments},
                                         separators=(",", ":"), ensure_ascii=False) + "\n</tool_call>"


def fallback_messages(messages: list[dict], tools: list[Tool] | None) -> list[dict]:
    """The conversation for a template without tools: the tools in the system message, calls as
    `<tool_call>` blocks, results as `<tool_response>` blocks in a user turn."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [call_block(c["function"]["name"], c["function"]["arguments"])
                      for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(
                ([m["content"]] if m["content"] else []) + blocks)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if tools:
        listed = "\n".join(json.dumps(t) for t in tools_json(tools))
        block = TOOLS_SYSTEM.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def chat_template_args(tokenizer, messages: list[dict], tools: list[Tool] | None
                       ) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template arguments) for this tokenizer's template."""
    if template_takes_tools(tokenizer):
        return messages, ({"tools": tools_json(tools)} if tools else {})
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return fallback_messages(messages, tools), {}
    return messages, {}


# -- reading calls back ------------------------------------------------------------------------

_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)"\s*,\s*"arguments"\s*:\s*')
_decoder = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # the model's own text of the arguments object
    complete: bool


def scan_calls(text: str) -> list[ParsedCall]:
    """The calls in `text` so far, in order: each `<tool_call>` whose name is written, with its
    arguments text (all of it up to the end of `text` while the object is still open)."""
    calls = []
    pos = 0
    while True:
        head = _HEAD.search(text, pos)
        if head is None:
            return calls
        start = head.end()
        try:
            _, end = _decoder.raw_decode(text, start)
        except ValueError:
            calls.append(ParsedCall(head.group(1), text[start:], False))
            return calls
        calls.append(ParsedCall(head.group(1), text[start:end], True))
        pos = end


def parse_answer(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer: the OpenAI `tool_calls` list when the answer
    is calls (content None), else the text and []."""
    if not text.lstrip().startswith("<tool_call>"):
        return text, []
    calls = [c for c in scan_calls(text) if c.complete]
    if not calls:
        return text, []
    return None, [{"id": new_call_id(), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


@dataclass
class CallStream:
    """Turns one choice's growing text into OpenAI stream deltas: content, or tool call deltas
    (the first with index, id, type and name, then argument fragments), as OpenAI streams them."""

    sent_content: int = 0
    ids: list[str] = field(default_factory=list)
    sent_args: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(content delta, tool call deltas) after `piece` of text."""
        self.text += piece
        stripped = self.text.lstrip()
        if not stripped:
            return "", []
        if not stripped.startswith("<tool_call>"[:len(stripped)]):  # plain text
            delta = self.text[self.sent_content:]
            self.sent_content = len(self.text)
            return delta, []
        deltas = []
        for k, call in enumerate(scan_calls(self.text)):
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append({"index": k, "id": self.ids[k], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            fresh = call.arguments[self.sent_args[k]:]
            if fresh:
                deltas.append({"index": k, "function": {"arguments": fresh}})
                self.sent_args[k] = len(call.arguments)
        return "", deltas

    def finish(self) -> str:
        """The content not yet sent, once the answer is done (an answer that began like a call
        but holds none is content after all)."""
        if self.called:
            return ""
        delta = self.text[self.sent_content:]
        self.sent_content = len(self.text)
        return delta
