"""The OpenAI wire format: request models, request checking, response and stream bodies, errors.

Field names, types, defaults and body shapes follow OpenAI's API reference for `/v1/completions`
and `/v1/chat/completions` (the `openai` Python client parses what we return), with vLLM's
`top_k` and `ignore_eos` extensions. The request models below are pydantic models in strict mode:
they are both the check and the schema `/openapi.json` publishes. Strict means no coercion, as
OpenAI's API does not coerce: `"ignore_eos": "no"` is an error, not `true`; `"n": "2"` and
`"max_tokens": true` are errors too. Unknown fields are errors, so a misspelt option is not
silently ignored.

Bodies are parsed by `parse_json`, which refuses what Python's `json` would accept but JSON does
not (NaN, Infinity, numbers that overflow to inf, lone surrogates) and answers nesting too deep to
parse with a 400 instead of a `RecursionError`.

Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status OpenAI uses:
400 bad request, 401 bad key, 404 unknown model, 413 too large, 422 over a limit, 500 a fault of
the server, 503 overloaded. Every problem is checked before anything is queued.
"""

from __future__ import annotations

import json
import math
import reprlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from lorakit.serve.config import Limits
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.tools import ResponseFormat, Tool, ToolCall, ToolChoice, check_tools

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # a seed is a signed 64-bit integer, as in OpenAI's API


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        message = one_line(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              500: "server_error", 503: "server_overloaded"}.get(
                                  status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def one_line(message: str) -> str:
    """A message of several lines (an adapter check's list of problems) as one line:
    `problems:\n  a\n  b` -> `problems: a; b`."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    head = lines[0] + ("" if lines[0].endswith(":") else ";")
    return head + " " + "; ".join(lines[1:])


def shown(text: str, n: int = 100) -> str:
    """A name the client sent, as an error message shows it: clipped, and escaped when it holds
    control characters (a newline in a model name must not break the message or a log line)."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= n else text[:n] + "..."


# -- JSON --------------------------------------------------------------------------------------

def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def parse_json(raw: bytes) -> object:
    """`raw` parsed as JSON, or a 400 `ApiError` saying why it is not JSON we take."""
    try:  # RFC 8259 8.1: JSON exchanged between systems is UTF-8 (json.loads also takes UTF-16/32)
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON (not UTF-8: {e.reason} at byte "
                       f"{e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError (a BOM included), an int of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON ({_clip(str(e))})") from None
    try:  # a lone surrogate (\ud800) parses, but is no Unicode text a tokenizer can take
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body is not valid JSON (a string holds a lone "
                       "surrogate, which is not Unicode text)") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
    return body


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 3, 60, 60, 4, 4


# -- request models ----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _whole(value: object) -> object:
    """JSON has one number type: `2.0` is the integer 2 (JSON Schema's `integer` says so too),
    `2.5` stays a float and is refused. Booleans and strings are not numbers and stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Integer(**bounds):  # noqa: N802 (a type)
    """An integer field type with `bounds` (ge, le) that also takes integral floats. The bounds
    come before the validator, else pydantic's schema shows them as `ge`/`le`, not JSON Schema's
    `minimum`/`maximum`."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


NonEmpty = Annotated[str, Field(min_length=1)]
TokenId = Integer(ge=0)
# What `registry.check_name` takes ([A-Za-z0-9._-]{1,128}, not "." or ".."), published in the
# schema without a lookahead; the check and its message stay check_name's.
ADAPTER_NAME_PATTERN = (r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*"
                        r"|\.\.[A-Za-z0-9._-]+)$")
_ADAPTER_NAME = {"pattern": ADAPTER_NAME_PATTERN, "minLength": 1, "maxLength": 128}


def _only(*values: object, description: str):
    """A field OpenAI's API has and this server takes only at `values` (or null); other values
    are refused in `parse_request` as "not supported", and the schema publishes only these."""
    return Field(None, description=description, json_schema_extra={"enum": [*values, None]})


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="text (null only for an assistant message with tool_calls)")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's tool calls")
    tool_call_id: str | None = Field(None, description="the call a role: tool message answers")


class _Sampling(_Strict):
    model: NonEmpty = Field(description="the base model's name or an adapter's name")
    max_tokens: Integer(ge=1) | None = Field(None, description="422 above the server's limit")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Integer(ge=-1) | None = Field(None, description="0 or -1 = off (vLLM)")
    n: Integer(ge=1) | None = Field(None, description="422 above the server's limit")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: NonEmpty | list[NonEmpty] | None = Field(
        None, description="a non-empty string or a list of them")
    seed: Integer(ge=INT64_MIN, le=INT64_MAX) | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias from -100 to 100")
    ignore_eos: bool | None = Field(False, description="keep generating past end of turn (vLLM)")


class CompletionRequest(_Sampling):
    """The body of POST /v1/completions."""

    prompt: NonEmpty | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[NonEmpty], Field(min_length=1)] = Field(
            description="a string, a list of strings, or a list of token ids")
    logprobs: Integer(ge=0, le=5) | None = Field(None, description="0 to 5 most likely tokens")
    echo: bool | None = _only(False, description="not supported: null or false")
    suffix: str | None = _only(description="not supported: null")
    best_of: Integer(ge=1) | None = _only(1, description="not supported: null or 1")


class ChatCompletionRequest(_Sampling):
    """The body of POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)] = Field(
        description="a non-empty list of {role, content} objects")
    max_completion_tokens: Integer(ge=1) | None = Field(None, description="OpenAI's newer max_tokens")
    logprobs: bool | None = None
    top_logprobs: Integer(ge=0, le=20) | None = Field(
        None, description="0 to 20, with logprobs: true")
    response_format: ResponseFormat | None = Field(
        None, description="{type: text}, {type: json_object} or {type: json_schema, json_schema}")
    tools: list[Tool] | None = Field(None, description="a list of {type: function, function}")
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto, required, or {type: function, function: {name}}")
    parallel_tool_calls: bool | None = None
    guided_choice: Annotated[list[NonEmpty], Field(min_length=1, max_length=256)] | None = Field(
        None, description="the answer is exactly one of these strings (vLLM)")


class RegisterAdapter(_Strict):
    """The body of POST /admin/adapters."""

    name: str = Field(json_schema_extra=_ADAPTER_NAME)
    path: str | None = Field(None, description="relative to adapters_root; default: the name")
    replace: bool = False
    pin: bool = False


class LoadAdapter(_Strict):
    """The (optional) body of POST /admin/adapters/{name}/load."""

    pin: bool = False


class LoraAdapter(_Strict):
    """vLLM's body for /v1/load_lora_adapter and /v1/unload_lora_adapter."""

    lora_name: str = Field(json_schema_extra=_ADAPTER_NAME)
    lora_path: str | None = None


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, RegisterAdapter, LoadAdapter,
                  LoraAdapter)


def _where(loc: tuple) -> str:
    """A pydantic error location as a path (`messages[0].content`), without the union member
    tags pydantic adds (`str`, `list[int]`, ...)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part[:1].islower() and part.replace("_", "").isalnum() and part not in (
                "str", "int", "float", "bool", "list", "none"):
            out += f".{part}" if out else part
    return out or "body"


def validate(model: type[BaseModel], body: object) -> BaseModel:
    """`body` checked against `model`, or a 400 `ApiError` listing the first problems."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object (got {type(body).__name__})")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
    extra = [str(err["loc"][0]) for err in errors
             if err["type"] == "extra_forbidden" and len(err["loc"]) == 1]
    if extra:
        raise ApiError(400, f"unrecognized request argument(s): {_clip(', '.join(extra))}",
                       param=_clip(extra[0], 60))
    by_field: dict[object, list[dict]] = {}  # a union reports one error per member
    for err in errors:
        by_field.setdefault(err["loc"][0] if err["loc"] else None, []).append(err)
    problems = []
    for key, errs in by_field.items():
        described = model.model_fields.get(key) if isinstance(key, str) else None
        if len(errs) > 1 and described is not None and described.description:
            problems.append(f"{key}: expected {described.description} (got "
                            f"{_short.repr(body.get(key))})")
            continue
        by_path: dict[str, list[dict]] = {}
        for err in errs:
            by_path.setdefault(_where(err["loc"]), []).append(err)
        for path, same in by_path.items():
            if same[0]["type"] == "missing":
                problems.append(f"{path}: required")
                continue
            msgs = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same)
            problems.append(f"{path}: {', or '.join(msgs)} (got {_short.repr(same[0].get('input'))})")
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    problems = problems[:3]
    first = errors[0]["loc"]
    raise ApiError(400, "; ".join(problems) + more, param=str(first[0]) if first else None)


@dataclass
class GenerationRequest:
    """A checked request: the model name, what to generate from, and the sampling settings."""

    model: str
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    messages: list[dict] | None = None  # chat
    response_format: ResponseFormat | None = None  # chat: a JSON answer
    tools: list[Tool] | None = None  # chat: the functions offered (None when tool_choice is none)
    tool_choice: object = "auto"  # "auto", "required" or a named function (tools.ToolChoice)
    parallel_tool_calls: bool = True
    guided_choice: list[str] | None = None  # chat: the answer is one of these (vLLM's extension)


def parse_request(body: object, chat: bool, limits: Limits) -> GenerationRequest:
    """Check a /v1/completions or /v1/chat/completions body against the API and the limits."""
    req = validate(ChatCompletionRequest if chat else CompletionRequest, body)
    for key in ("echo", "suffix"):
        if getattr(req, key, None) not in (None, False, 0):
            raise ApiError(400, f"{key}: not supported by this server", param=key)
    logit_bias = {}
    for key, bias in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise ApiError(400, f"logit_bias: key {_short.repr(key)} is not a token id (expected "
                           "a decimal token id as a string)", param="logit_bias")
        logit_bias[int(key)] = bias
    if chat:
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    if getattr(req, "best_of", None) not in (None, 1):
        raise ApiError(400, "best_of: not supported (expected 1 or absent)", param="best_of")

    max_key = "max_completion_tokens" if chat and req.max_completion_tokens is not None \
        else "max_tokens"
    max_tokens = getattr(req, max_key)
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(422, f"{max_key}: {_short.repr(max_tokens)} is above this server's limit "
                       f"of {limits.max_tokens}", param=max_key, code="max_tokens_over_limit")
    n = 1 if req.n is None else req.n
    if n > limits.max_n:
        raise ApiError(422, f"n: {_short.repr(n)} is above this server's limit of {limits.max_n}",
                       param="n", code="n_over_limit")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > limits.max_stop:
        raise ApiError(422, f"stop: {len(stop)} stop strings, above the limit of {limits.max_stop}",
                       param="stop")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0), seed=req.seed, stop=stop, ignore_eos=bool(req.ignore_eos),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, logit_bias=logit_bias, logprobs=logprobs)
    options = req.stream_options or StreamOptions()
    out = GenerationRequest(model=req.model, params=params, n=n, stream=bool(req.stream),
                            include_usage=options.include_usage)
    if chat:
        check_tools(req)  # tools, tool_choice, response_format and the tool messages agree
        out.messages = [_message(m) for m in req.messages]
        out.response_format = req.response_format
        out.guided_choice = req.guided_choice
        out.tool_choice = req.tool_choice or "auto"
        out.tools = None if out.tool_choice == "none" else req.tools
        out.parallel_tool_calls = req.parallel_tool_calls is not False
    elif isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
        if len(req.prompt) > limits.max_prompts:
            raise ApiError(422, f"prompt: {len(req.prompt)} prompts, above the limit of "
                           f"{limits.max_prompts}", param="prompt")
        out.prompts = list(req.prompt)
    else:
        out.prompts = [req.prompt if isinstance(req.prompt, str) else list(req.prompt)]
    return out


def _message(m: Message) -> dict:
    """A checked message as the chat template takes it (tool calls with parsed arguments)."""
    content = m.content if isinstance(m.content, str) or m.content is None \
        else "".join(p.text for p in m.content)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": json.loads(c.function.arguments)}}
            for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None and m.role == "tool":
        out["name"] = m.name
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[tuple], use: dict) -> dict:
    """`choices` = [(text, finish_reason)] or [(text, finish_reason, extra)] in index order;
    `extra` may hold `logprobs`."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": c[0], "logprobs": (c[2] if len(c) > 2 else {}).get(
                "logprobs"), "finish_reason": c[1]} for i, c in enumerate(choices)],
            "usage": use}


def chat_body(rid: str, model: str, choices: list[tuple], use: dict) -> dict:
    """`choices` as `completion_body`'s; `extra` may also hold `tool_calls` (the message's
    content is then null unless the model also wrote text, as OpenAI answers a call)."""
    out = []
    for i, c in enumerate(choices):
        extra = c[2] if len(c) > 2 else {}
        message = {"role": "assistant", "content": c[0]}
        if extra.get("tool_calls"):
            message = {"role": "assistant", "content": c[0] or None,
                       "tool_calls": extra["tool_calls"]}
        out.append({"index": i, "message": message, "logprobs": extra.get("logprobs"),
                    "finish_reason": c[1]})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": use}


def chunk_body(rid: str, model: str, chat: bool, index: int, text: str | None,
               finish_reason: str | None, first: bool = False, logprobs: dict | None = None,
               tool_calls: list[dict] | None = None) -> dict:
    """One server-sent event's JSON: a text delta, tool call deltas and/or the finish reason of
    one choice."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use}
