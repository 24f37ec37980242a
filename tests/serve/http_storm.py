"""Sending `Call`s (tests/serve/http_fuzz.py) to a live server at once and checking the answers:
a good call's answer against its answer alone, a malformed call's status against its set, no
5xx, no hang (client timeout), no broken connection, and the server's log free of tracebacks."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from tests.serve.http_fuzz import Call


@dataclass
class Outcome:
    status: int
    answer: object  # a good call's canonical answer; a bad call's error body
    seconds: float


# -- sending ------------------------------------------------------------------------------------

def _sse_answer(text: str) -> dict:
    """A stream's answer: per choice index its text and finish reason, the usage, errors, and
    whether it ended in [DONE]."""
    choices: dict[int, list] = {}
    out = {"usage": None, "errors": [], "done": False}
    for line in text.split("\n"):
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            out["done"] = True
            continue
        obj = json.loads(data)
        if "error" in obj:
            out["errors"].append(obj["error"]["code"])
            continue
        if obj.get("usage"):
            out["usage"] = obj["usage"]
        for c in obj["choices"]:
            text_part = c["delta"].get("content") if "delta" in c else c["text"]
            slot = choices.setdefault(c["index"], ["", None])
            slot[0] += text_part or ""
            slot[1] = c["finish_reason"] or slot[1]
    out["choices"] = [tuple(choices[i]) for i in sorted(choices)]
    return out


def _answer(call: Call, response: httpx.Response) -> object:
    if response.status_code != 200:
        try:
            return response.json()
        except ValueError:  # a redirect, or a body that is not JSON (`check` reports it)
            return {"not json": response.text[:300], "headers": dict(response.headers)}
    if call.stream:
        return _sse_answer(response.text)
    body = response.json()
    return {"choices": [(c.get("text", (c.get("message") or {}).get("content")), c["finish_reason"])
                        for c in body["choices"]], "usage": body["usage"]}


def _send_raw(url: str, raw: bytes, timeout: float) -> Outcome:
    start = time.monotonic()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first: an answer, not a hang
            pass
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return Outcome(status, data[:200], time.monotonic() - start)


def send(client: httpx.Client, call: Call, timeout: float) -> Outcome:
    """One call; a client timeout raises `httpx.TimeoutException` (a hang)."""
    if call.raw is not None:
        return _send_raw(str(client.base_url), call.raw, timeout)
    start = time.monotonic()
    if call.walk_away is not None:
        return _walk_away(client, call, start)
    content = call.body
    if call.chunked and content is not None:
        content = iter([content[:len(content) // 2], content[len(content) // 2:]])
    r = client.request(call.method, call.path, content=content, headers=call.headers,
                       timeout=timeout)
    return Outcome(r.status_code, _answer(call, r), time.monotonic() - start)


def _walk_away(client: httpx.Client, call: Call, start: float) -> Outcome:
    """Send, wait `call.walk_away` seconds (reading a stream's first bytes), then close the
    connection without reading the answer."""
    with httpx.Client(base_url=client.base_url, timeout=call.walk_away + 0.01) as own:
        try:
            with own.stream(call.method, call.path, content=call.body, headers=call.headers) as r:
                status = r.status_code
                if status == 200 and call.walk_away:
                    next(r.iter_raw(), None)
        except httpx.TimeoutException:  # left before the answer began: nobody will read it
            status = 200
    return Outcome(status, None, time.monotonic() - start)


class LogWatch(logging.Handler):
    """Collects the server's log records at WARNING and above (root, uvicorn, lorakit)."""

    NAMES = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "lorakit", "fastapi", "starlette")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)

    def problems(self) -> list[str]:
        """Records with a traceback or at ERROR and above ("Invalid HTTP request received." is a
        warning uvicorn logs for a framing error, with no traceback: not a problem)."""
        return [f"{r.name} {r.levelname}: {r.getMessage()[:300]}"
                + (f" [{r.exc_info[0].__name__}]" if r.exc_info else "")
                for r in self.records if r.exc_info or r.levelno >= logging.ERROR]


def storm(url: str, calls: list[Call], workers: int = 8, timeout: float = 60.0) -> list[Outcome | str]:
    """Send `calls` from `workers` threads at once (in list order as far as threads allow);
    an outcome per call, or the string "hang" where the client timed out."""
    local = threading.local()

    def one(call: Call):
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=timeout)
        try:
            return send(local.client, call, timeout)
        except (httpx.TimeoutException, socket.timeout, TimeoutError):
            return "hang"
        except httpx.TransportError as e:  # the connection broke: `check` says when that is fine
            local.client = httpx.Client(base_url=url, timeout=timeout)
            return Outcome(-1, f"{type(e).__name__}: {e}", 0.0)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, calls))


def check(calls: list[Call], outcomes: list, alone: dict[int, object]) -> list[str]:
    """Every failure of the storm, one line each: a hang, a 5xx, a status outside a bad call's
    set, a bad call's error body not in the OpenAI shape, a good answer unlike its answer alone."""
    failures = []
    for i, (call, got) in enumerate(zip(calls, outcomes)):
        where = f"#{i} {call.label} {call.method} {call.path[:60]} {(call.body or call.raw or b'')[:120]!r}"
        if got == "hang":
            failures.append(f"{where}: no answer (client timeout)")
            continue
        if got.status == -1:
            # A server may close the connection once it has refused a body too large, while the
            # client still sends it (uvicorn does): the client sees a reset, not the 413.
            if call.label != "oversized body":
                failures.append(f"{where}: the connection broke ({got.answer})")
            continue
        if got.status >= 500:
            failures.append(f"{where}: {got.status} {str(got.answer)[:300]}")
        elif call.good:
            if got.answer != alone[i]:
                failures.append(f"{where}: answered {str(got.answer)[:300]}, alone "
                                f"{str(alone[i])[:300]}")
        elif got.status not in call.expect:
            failures.append(f"{where}: {got.status} (expected {call.expect}) {str(got.answer)[:300]}")
        elif call.error_event:
            if not (got.answer["errors"] and got.answer["done"]):
                failures.append(f"{where}: a stream that failed without an error event {got.answer}")
        elif call.raw is None and got.status not in (200, 307):
            err = got.answer.get("error") if isinstance(got.answer, dict) else None
            if not (isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]
                    and "\n" not in err["message"] and set(err) == {"message", "type", "param", "code"}):
                failures.append(f"{where}: error body not in OpenAI's shape: {str(got.answer)[:300]}")
    return failures
