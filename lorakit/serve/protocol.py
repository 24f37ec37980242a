"""The OpenAI wire format: request checking, response and stream-chunk bodies, JSON errors.

Field names, defaults and body shapes follow OpenAI's API reference for `/v1/completions` and
`/v1/chat/completions` (the `openai` Python client parses what we return), with vLLM's `top_k`
extension. Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status
OpenAI uses: 400 bad request, 401 bad key, 404 unknown model, 413 too large, 422 over a limit,
503 overloaded. Every problem is checked before anything is queued.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from lorakit.serve.config import Limits
from lorakit.serve.sampling import SamplingParams


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              503: "server_overloaded"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
           "stop", "seed", "user", "presence_penalty", "frequency_penalty", "logprobs",
           "ignore_eos"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


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


def _number(body, key, lo, hi, default, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key}: got {value!r} (expected {kind} in [{lo}, {hi}])", param=key)
    return value


def parse_request(body: object, chat: bool, limits: Limits) -> GenerationRequest:
    """Check a /v1/completions or /v1/chat/completions body against the API and the limits."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required (the base model's name or an adapter's name)",
                       param="model")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key}: not supported (expected 0 or absent)", param=key)
    for key in ("logprobs", "echo", "suffix", "top_logprobs"):
        if body.get(key) not in (None, False, 0):
            raise ApiError(400, f"{key}: not supported by this server", param=key)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of: not supported (expected 1 or absent)", param="best_of")

    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, max_key, 1, 2**31, limits.default_max_tokens, integer=True)
    if max_tokens > limits.max_tokens:
        raise ApiError(422, f"{max_key}: {max_tokens} is above this server's limit of "
                       f"{limits.max_tokens}", param=max_key, code="max_tokens_over_limit")
    n = _number(body, "n", 1, 2**31, 1, integer=True)
    if n > limits.max_n:
        raise ApiError(422, f"n: {n} is above this server's limit of {limits.max_n}", param="n",
                       code="n_over_limit")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: expected a non-empty string or a list of them", param="stop")
    if len(stop) > limits.max_stop:
        raise ApiError(422, f"stop: {len(stop)} stop strings, above the limit of {limits.max_stop}",
                       param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"seed: got {seed!r} (expected an integer)", param="seed")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0, 2, 1.0)),
        top_p=float(_number(body, "top_p", 1e-9, 1, 1.0)),
        top_k=max(0, _number(body, "top_k", -1, 2**31, 0, integer=True)),
        seed=seed, stop=stop, ignore_eos=bool(body.get("ignore_eos", False)))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream: got {stream!r} (expected true or false)", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: expected an object", param="stream_options")
    req = GenerationRequest(model=model, params=params, n=n, stream=stream,
                            include_usage=bool(options.get("include_usage", False)))
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        req.prompts = _prompts(body.get("prompt"), limits)
    return req


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}]: expected an object with role system, user or "
                           "assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are meaningful here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: expected a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _prompts(prompt: object, limits: Limits) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > limits.max_prompts:
            raise ApiError(422, f"prompt: {len(prompt)} prompts, above the limit of "
                           f"{limits.max_prompts}", param="prompt")
        return list(prompt)
    raise ApiError(400, "prompt: expected a string, a list of strings, or a list of token ids",
                   param="prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    """`choices` = [(text, finish_reason)] in index order."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": use}


def chat_body(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": use}


def chunk_body(rid: str, model: str, chat: bool, index: int, text: str | None,
               finish_reason: str | None, first: bool = False) -> dict:
    """One server-sent event's JSON: a text delta and/or the finish reason of one choice."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use}
