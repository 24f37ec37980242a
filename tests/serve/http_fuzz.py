"""Seeded HTTP traffic for the fuzz tests: good requests and malformed ones (tests/serve/
http_storm.py sends them to a live server and checks what came back).

A `Call` is one HTTP exchange: method, path, headers and body bytes (or a raw byte string sent
on a socket for framing errors the client library will not produce). Good calls are greedy
(or seeded) completions and chats over the base and the adapters, streaming or not; each is
answered first alone, then again inside the storm, and the two answers must be equal. Malformed
calls carry the statuses they may get (a 4xx set); any other status, a 5xx, a hang (client
timeout), a traceback in the server's log or an unhandled exception on one of its threads fails
the run. The case list is built from one `random.Random(seed)`, so a failure replays exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from urllib.parse import quote

JSON = {"Content-Type": "application/json"}
WORDS = ("the quick brown fox jumps over lazy dog is this bike still available can you do 50 "
         "dollars what condition sofa colour table hello world classify intent price label "
         "answer question").split()


@dataclass
class Call:
    label: str  # the case family, for the failure report
    method: str = "POST"
    path: str = "/v1/completions"
    body: bytes | None = None
    headers: dict = field(default_factory=lambda: dict(JSON))
    expect: tuple[int, ...] = (200,)  # statuses a malformed call may get
    good: bool = False  # answered as it is alone
    stream: bool = False
    chunked: bool = False  # send the body without a Content-Length
    raw: bytes | None = None  # bytes written to a socket as they are (framing errors)
    error_event: bool = False  # a stream whose generation fails: 200, then an error event
    walk_away: float | None = None  # the client leaves after this many seconds (any answer)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _words(rng: random.Random, lo: int = 1, hi: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


# -- good requests ----------------------------------------------------------------------------

def good_calls(rng: random.Random, n: int, models: list[str], sampled: bool = True) -> list[Call]:
    """n valid requests over `models` (the base's name first): greedy unless `sampled` adds a
    seeded draw now and then (a seeded row draws the same tokens whatever shares its batch)."""
    out = []
    for _ in range(n):
        model = rng.choice(models)
        body: dict = {"model": model, "max_tokens": rng.randint(1, 10), "temperature": 0}
        if sampled and rng.random() < 0.2:
            body.update(temperature=rng.choice([0.5, 0.9, 1.3]), seed=rng.randint(0, 2**40),
                        top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]))
        if rng.random() < 0.7:
            body["ignore_eos"] = True
        if rng.random() < 0.15:
            body["stop"] = [rng.choice(["e", "o ", "th", "\n"])]
        if rng.random() < 0.15:
            body["n"] = 2
        chat = rng.random() < 0.4
        if chat:
            messages = [{"role": "user", "content": _words(rng)}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": rng.choice(["system", "developer"]), "content": _words(rng)})
            if rng.random() < 0.2:
                messages[-1]["content"] = [{"type": "text", "text": _words(rng)},
                                           {"type": "text", "text": " " + _words(rng)}]
            body["messages"] = messages
            if rng.random() < 0.3:
                body["max_completion_tokens"] = body.pop("max_tokens")
            if rng.random() < 0.1:  # decoded under a grammar (lorakit/serve/grammar.py)
                body["guided_choice"] = rng.sample(["yes", "no", "maybe so", "the dog"], 2)
        else:
            kind = rng.random()
            if kind < 0.6:
                body["prompt"] = _words(rng)
            elif kind < 0.8:
                body["prompt"] = [rng.randrange(3, 400) for _ in range(rng.randint(1, 12))]
            else:
                body["prompt"] = [_words(rng) for _ in range(2)]
        stream = rng.random() < 0.35
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        out.append(Call("good", path="/v1/chat/completions" if chat else "/v1/completions",
                        body=_json(body), good=True, stream=stream))
    return out


# -- malformed requests -------------------------------------------------------------------------

def _base_body(rng: random.Random, chat: bool, model: str) -> dict:
    body = {"model": model, "max_tokens": rng.randint(1, 4), "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": _words(rng)}]
    else:
        body["prompt"] = _words(rng)
    return body


def _path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def _nest(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# Per field: values that are wrong for it on every version of the API this server has had (a
# field a later version accepts more of gets only values outside every range: e.g. a penalty of
# 3, not 0.5). Each maps to the statuses allowed: 400 (malformed), 422 (over a server limit).
_WRONG = {
    "model": [(1, 400), (None, 400), ([], 400), ({}, 400), (True, 400), ("", 400), (["ad0"], 400)],
    "max_tokens": [("8", 400), (True, 400), (1.5, 400), (-1, 400), (0, 400), ([], 400),
                   ({}, 400), (10**6, 422), (10**30, 422), (2**64, 422), (1e300, 422)],
    "temperature": [("0", 400), (True, 400), (-0.1, 400), (2.01, 400), (1e308, 400), ([], 400),
                    (-1e-300, 400), ({"t": 1}, 400)],
    "top_p": [(0, 400), (1.01, 400), (-1, 400), ("1", 400), (True, 400), (1e300, 400)],
    "top_k": [(-2, 400), (1.5, 400), ("5", 400), (True, 400), ([5], 400), (-(10**20), 400)],
    "n": [(0, 400), (-1, 400), (3, 422), (10**9, 422), ("2", 400), (1.5, 400), (True, 400)],
    "stream": [("true", 400), (1, 400), (0, 400), ([], 400), ({}, 400)],
    "stream_options": [({"include_usage": 1}, 400), ([], 400), ("x", 400), ({"foo": True}, 400),
                       ({"include_usage": "yes"}, 400)],
    "stop": [("", 400), ([""], 400), (1, 400), ([1], 400), ([["a"]], 400), ({}, 400),
             (["a", "b", "c", "d", "e"], 422), ([None], 400)],
    "seed": [(2**63, 400), (-(2**63) - 1, 400), (1.5, 400), ("1", 400), (True, 400),
             (10**100, 400), ([1], 400)],
    "user": [(1, 400), ([], 400), ({}, 400), (True, 400)],
    "presence_penalty": [(3, 400), (-2.5, 400), ("0", 400), (True, 400), ([0], 400)],
    "frequency_penalty": [(3, 400), (-2.5, 400), ("0", 400), (True, 400), ({}, 400)],
    "ignore_eos": [("no", 400), (0, 400), (1, 400), ("false", 400), ([], 400), ("true", 400)],
    "logit_bias": [({"5": 101}, 400), ({"5": "1"}, 400), ([], 400), ({"5": None}, 400),
                   ("x", 400), ({"5": -1e9}, 400)],
}
_WRONG_COMPLETION = {
    "prompt": [(1, 400), (None, 400), ({}, 400), ([], 400), ([1, "a"], 400), ([[1]], 400),
               (True, 400), ("", 400), ([-1], 400), ([1.5], 400), ([""], 400), ([400], 400),
               ([10**9], 400), ([None], 400), ([2**64], 400), (["a"] * 17, 422)],
    "logprobs": [(-1, 400), ("1", 400), (10**6, 400), ([], 400)],
    "echo": [(True, 400), ("x", 400), (1, 400)],
    "suffix": [("x", 400), (1, 400), ([], 400)],
    "best_of": [(2, 400), (0, 400), ("1", 400), (True, 400)],
}
_WRONG_CHAT = {
    "messages": [([], 400), ({}, 400), ("hi", 400), ([{}], 400), ([{"role": "user"}], 400),
                 ([{"role": "robot", "content": "x"}], 400),
                 ([{"role": "user", "content": 1}], 400),
                 ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 400),
                 ([{"role": "user", "content": [{"type": "text"}]}], 400),
                 ([{"role": "user", "content": [{"type": "text", "text": 5}]}], 400),
                 ([{"role": "user", "content": "x", "extra": 1}], 400),
                 ([{"role": "USER", "content": "x"}], 400), ([None], 400), ([["user", "x"]], 400),
                 ([{"role": "user", "content": "x", "name": 5}], 400),
                 ([{"role": 1, "content": "x"}], 400), (None, 400), ([{"role": "tool"}], 400),
                 ([{"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function",
                   "function": {"name": "f", "arguments": "{}"}}]}], 400),
                 ([{"role": "assistant", "content": None}], 400),
                 ([{"role": "tool", "content": "x", "tool_call_id": 5}], 400)],
    "max_completion_tokens": [(0, 400), ("1", 400), (10**6, 422), (True, 400), (2.5, 400)],
    "logprobs": [("x", 400), (2, 400), ([], 400)],
    "top_logprobs": [(-1, 400), ("3", 400), (10**6, 400)],
    "response_format": [({"type": {}}, 400), ({"type": "xml"}, 400), ("json", 400), ([], 400),
                        ({"type": "json_schema"}, 400), ({}, 400), ({"type": None}, 400),
                        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "["}}, 400),
                        ({"type": "json_schema", "json_schema": {"schema": {}}}, 400)],
    "tools": [("x", 400), ([{"type": "function"}], 400), ([{}], 400), ([None], 400),
              ([{"type": "function", "function": {"name": "bad name!"}}], 400),
              ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], 400),
              ([{"type": "retrieval", "function": {"name": "f"}}], 400)],
    "tool_choice": [(5, 400), ("sometimes", 400), ({"type": "function"}, 400), ([], 400),
                    ({"type": "function", "function": {"name": "nope"}}, 400)],
    "parallel_tool_calls": [("yes", 400), (1, 400), ([], 400)],
    "guided_choice": [([], 400), ([""], 400), ("a", 400), ([1], 400), ({}, 400)],
}
_UNKNOWN_KEYS = ["temprature", "max_token", "foo", "x" * 100, "", "__proto__", "model ", "Model",
                 "prompt\u0000", "stream_option", "\ud7ff", "ignoreEos", "n_choices"]
_BAD_MODELS = ["nonexistent", "../ad0", "ad0/..", "/etc/passwd", "ad0\u0000", "AD0", " ad0",
               "ad0 ", "..", ".", "ad0/", "%2e%2e", "tiny-base/ad0", "\U0001d51e\U0001d521", "a" * 129,
               "a" * 10_000, "ad0;rm -rf", "ad0\n", "~", "adapters.sqlite", "C:\\ad0", "ad0\\..\\ad1",
               "$HOME", "ad0*", "ad?", "-", "loop"]  # loop: a symlink to itself in the root
_CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/xml", "text/json", "application/jsonx", "json", "*/*", "image/png",
                  "application/octet-stream"]


def _json_syntax(rng: random.Random, text: str) -> bytes:
    """`text` (a JSON object) made invalid, in one of several ways that cannot stay valid."""
    k = rng.randrange(11)
    if k == 0:
        return text[:rng.randrange(1, len(text))].encode()  # a proper prefix of an object
    if k == 1:
        return (text + rng.choice(["x", "}", "]", ",", "{}", " 1", "\u0000"])).encode()
    if k == 2:
        i = rng.choice([i for i, c in enumerate(text) if c == '"'])
        return (text[:i] + "'" + text[i + 1:]).encode()
    if k == 3:
        return (text[:-1] + ",}").encode()  # a trailing comma
    if k == 4:
        return text.replace('"temperature": 0', '"temperature": ' + rng.choice(
            ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "0x10", "+1", ".5", "01", "1.",
             "true1", "None", "nan"])).encode()
    if k == 5:
        i = rng.randrange(1, len(text) - 1)
        return text[:i].encode() + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                               b"\xc0\xaf", b"\x80"]) + text[i:].encode()
    if k == 6:
        return rng.choice([b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"),
                           text.encode("utf-16-be"), text.encode("utf-32")])
    if k == 7:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    if k == 8:
        return rng.choice([b"null", b"true", b"1", b'"x"', b"[]", b"[{}]", b" ", b"\n\n", b"{",
                           b"}", b"{{}}", b"{\"model\"}", b"{\"model\": }", b"[" * 3])
    if k == 9:
        return (text[:-1] + ', "prompt": "\\ud800"}').encode() if '"prompt"' not in text else \
            text.replace('"prompt": "', '"prompt": "\\udfff').encode()
    return text.replace('"model"', '"model', 1).encode()


def malformed_calls(rng: random.Random, n: int, models: list[str], bad_adapters: dict[str, int],
                    vocab_size: int, limits: dict) -> list[Call]:
    """n malformed requests. `bad_adapters`: adapter name -> the status a request for it gets
    (400: refused at load; 200 with an error event in a stream when it fails in the batch)."""
    families = [_syntax, _top_level, _missing, _unknown_field, _wrong_field, _wrong_field,
                _wrong_field, _deep, _bad_model, _bad_adapter, _bad_prompt, _content_type,
                _oversized, _route, _admin, _raw, _walk_away]
    out = []
    while len(out) < n:
        make = rng.choice(families)
        out.append(make(rng, models, bad_adapters, vocab_size, limits))
    return out


def _pick(rng):
    chat = rng.random() < 0.5
    return chat, _path(chat)


def _syntax(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    text = json.dumps(_base_body(rng, chat, rng.choice(models)))
    return Call("json syntax", path=path, body=_json_syntax(rng, text), expect=(400,))


def _top_level(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    value = rng.choice([[body], "x", 1, None, True, [], 1.5, [[body]]])
    return Call("top level", path=path, body=_json(value), expect=(400,))


def _missing(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    for key in rng.sample(["model", "messages" if chat else "prompt"], rng.randint(1, 2)):
        body.pop(key)
    return Call("missing field", path=path, body=_json(body), expect=(400,))


def _unknown_field(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    body[rng.choice(_UNKNOWN_KEYS)] = rng.choice([1, "x", None, [], {}])
    if rng.random() < 0.3:  # a misspelt key among the messages' keys
        chat, path = True, _path(True)
        body = _base_body(rng, True, rng.choice(models))
        body["messages"][0][rng.choice(["contents", "Role", "text"])] = "x"
    return Call("unknown field", path=path, body=_json(body), expect=(400,))


def _wrong_field(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    table = {**_WRONG, **(_WRONG_CHAT if chat else _WRONG_COMPLETION)}
    keys = rng.sample(sorted(table), rng.choice([1, 1, 1, 2, 3]))
    statuses = set()
    for key in keys:
        value, status = rng.choice(table[key])
        body[key] = value
        statuses.add(status)
    # Several wrong fields: which is found first depends on where each is checked (the schema,
    # the limits, the vocabulary), so any of their statuses.
    expect = tuple(sorted(statuses))
    return Call(f"wrong {'/'.join(keys)}", path=path, body=_json(body), expect=expect)


def _deep(rng, models, _bad, _vocab, limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    depth = rng.choice([2, 50, 999, 1000, 5000, 20_000, limits["max_body_bytes"] // 2 - 64])
    key = rng.choice(["stop", "user", "seed", "messages" if chat else "prompt", "zzz"])
    text = json.dumps({**body, key: "@@"}).replace('"@@"', _nest(depth, rng.choice(["1", '"a"', "{}"])))
    if rng.random() < 0.3:
        text = '{"a":' * depth + "1" + "}" * depth
    status = (413,) if len(text) > limits["max_body_bytes"] else (400,)
    return Call("deep nesting", path=path, body=text.encode(), expect=status)


def _bad_model(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(_BAD_MODELS))
    if rng.random() < 0.3:
        body["stream"] = True
    return Call("bad model name", path=path, body=_json(body), expect=(404,))


def _bad_adapter(rng, _models, bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    name = rng.choice(sorted(bad))
    body = _base_body(rng, chat, name)
    body["ignore_eos"] = True
    stream = rng.random() < 0.3
    if stream:
        body["stream"] = True
    failing_late = bad[name] == 200  # found only when it runs: a stream has begun by then
    return Call(f"bad adapter {name}", path=path, body=_json(body),
                expect=(200,) if stream and failing_late else (400,), stream=stream,
                error_event=stream and failing_late)


def _bad_prompt(rng, models, _bad, vocab, limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    k = rng.randrange(6)
    if k == 0:  # a token id past the vocabulary (the schema cannot know it)
        body = _base_body(rng, False, rng.choice(models))
        body["prompt"] = [5, rng.randrange(vocab, vocab * 4)]
        return Call("token id past vocab", body=_json(body), expect=(400,))
    if k == 1:  # too many tokens
        long = " ".join(WORDS) * 3
        if chat:
            body["messages"][0]["content"] = long
        else:
            body["prompt"] = long
        return Call("prompt too long", path=path, body=_json(body), expect=(413,))
    if k == 2:  # prompt plus max_tokens past the model's positions
        body["max_tokens"] = limits["max_tokens"]
        if chat:
            body["messages"][0]["content"] = " ".join(WORDS[:12])
        else:
            body["prompt"] = " ".join(WORDS[:12])
        return Call("context exceeded", path=path, body=_json(body), expect=(400,))
    if k == 3:  # a string with a lone surrogate escaped
        key_text = "\\ud83d" if rng.random() < 0.5 else "\\udc00x"
        text = json.dumps(body).replace('"temperature": 0', f'"user": "{key_text}", "temperature": 0')
        return Call("lone surrogate", path=path, body=text.encode(), expect=(400,))
    if k == 4:  # an empty chat content gives a template-only prompt: valid; an empty role is not
        body = _base_body(rng, True, rng.choice(models))
        body["messages"] = [{"role": "", "content": "x"}]
        return Call("empty role", path=_path(True), body=_json(body), expect=(400,))
    body = _base_body(rng, False, rng.choice(models))
    body["prompt"] = rng.choice([[[1, 2]], [1, [2]], [{"a": 1}], ["a", 1], [True], [1.0, 2.5]])
    return Call("mixed prompt list", body=_json(body), expect=(400,))


def _content_type(rng, models, _bad, _vocab, _limits) -> Call:
    chat, path = _pick(rng)
    body = _json(_base_body(rng, chat, rng.choice(models)))
    return Call("content type", path=path, body=body, headers={"Content-Type": rng.choice(_CONTENT_TYPES)},
                expect=(415,))


def _oversized(rng, models, _bad, _vocab, limits) -> Call:
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    size = limits["max_body_bytes"] + rng.choice([1, 100, 10_000, limits["max_body_bytes"]])
    body["user"] = "u" * size
    return Call("oversized body", path=path, body=_json(body), expect=(413,), chunked=rng.random() < 0.4)


def _route(rng, models, _bad, _vocab, _limits) -> Call:
    k = rng.randrange(6)
    if k == 0:
        return Call("wrong method", method=rng.choice(["GET", "PUT", "DELETE", "PATCH"]),
                    path=rng.choice(["/v1/completions", "/v1/chat/completions"]), body=None,
                    expect=(405,))
    if k == 1:
        return Call("wrong method", method=rng.choice(["POST", "PUT", "DELETE"]),
                    path=rng.choice(["/v1/models", "/health", "/metrics"]), body=None, expect=(405,))
    if k == 2:
        return Call("no route", method=rng.choice(["GET", "POST"]),
                    path=rng.choice(["/v1/completion", "/v2/completions", "/v1/chat", "/admin",
                                     "/v1/models/ad0/x", "/%00", "/" + "a" * 5000, "/v1/../etc/passwd",
                                     "/admin/adapters/ad0/frobnicate", "/openapi.yaml", "/docs"]),
                    body=b"{}", expect=(404,))
    if k == 3:  # a trailing slash: redirected (FastAPI) or not found
        return Call("trailing slash", path=rng.choice(["/v1/completions/", "/v1/chat/completions/"]),
                    body=_json(_base_body(rng, False, rng.choice(models))), expect=(307, 404))
    if k == 4:
        return Call("odd method", method=rng.choice(["TRACE", "OPTIONS", "PROPFIND"]),
                    path=rng.choice(["/v1/completions", "/admin/adapters"]), body=None,
                    expect=(405,))
    return Call("query string", path="/v1/completions?model=ad0&" + "x=" * rng.randint(1, 500),
                body=b"", expect=(400,))  # an empty body is {}: model and prompt are missing


def _admin(rng, _models, bad, _vocab, _limits) -> Call:
    """Admin requests that must fail and change nothing (no good adapter is replaced or removed)."""
    k = rng.randrange(9)
    name = rng.choice(["nothere", "..", "a/b", "%2e%2e", "ad0\u0000", "x" * 129, "\u00e9"])
    if k == 0:  # a name that is not allowed 400, an allowed one with no folder 404
        bad_name = rng.choice(["nothere", "../evil", "", "a b", ".", "x" * 129])
        return Call("admin register", path="/admin/adapters", body=_json({"name": bad_name}),
                    expect=(404,) if bad_name == "nothere" else (400,))
    if k == 1:
        bad_path = rng.choice(["/etc", "../outside", "..", "", "ad0/../../x", "\\ad0", "missing",
                               "a\x00b", "x" * 300, "x/" * 3000, "loop", "loop/x"])
        return Call("admin register", path="/admin/adapters",
                    body=_json({"name": "fresh", "path": bad_path}),
                    expect=(404,) if bad_path in ("", "missing") else (400,))
    if k == 2:
        return Call("admin register exists", path="/admin/adapters", body=_json({"name": "ad0"}),
                    expect=(409,))
    if k == 3:
        return Call("admin register broken", path="/admin/adapters",
                    body=_json({"name": rng.choice([b for b, s in bad.items() if s == 400])}),
                    expect=(400,))
    if k == 4:
        return Call("admin bad body", path="/admin/adapters",
                    body=_json(rng.choice([{"name": 1}, {"name": "x", "replace": "no"}, {},
                                           {"name": "x", "pin": 1}, [], {"name": None}])),
                    expect=(400,))
    if k == 5:
        verb = rng.choice(["load", "unload", "pin", "unpin"])
        return Call("admin unknown", path=f"/admin/adapters/{quote(name, safe='')}/{verb}", body=None,
                    expect=(404,))
    if k == 6:
        return Call("admin delete unknown", method="DELETE",
                    path=f"/admin/adapters/{quote(name, safe='')}", body=None, expect=(404,))
    if k == 7:
        return Call("vllm load", path="/v1/load_lora_adapter",
                    body=_json(rng.choice([{"lora_name": "x", "lora_path": "/etc"},
                                           {"lora_name": "../x", "lora_path": "ad0"},
                                           {"lora_path": "ad0"}, {"lora_name": 5}])),
                    expect=(400,))
    return Call("vllm unload", path="/v1/unload_lora_adapter",
                body=_json(rng.choice([{"lora_name": "nothere"}, {"lora_name": 1}, {}])),
                expect=(400, 404))


_RAW = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"POST /v1/completions HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS hello
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{\"a\":1}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 8\r\n\r\n\x00\x00\x00\x00\x00\x00\x00\x00",
]


def _raw(rng, _models, _bad, _vocab, _limits) -> Call:
    return Call("raw http", raw=rng.choice(_RAW), expect=(400, 404, 405, 413, 415, 0))


def _walk_away(rng, models, _bad, _vocab, limits) -> Call:
    """A long request whose client leaves early, streaming or not: its rows must be cancelled
    and its adapter slot given back (checked after the storm), nobody else disturbed."""
    chat, path = _pick(rng)
    body = _base_body(rng, chat, rng.choice(models))
    body.update(max_tokens=limits["max_tokens"] // 2, ignore_eos=True, stream=rng.random() < 0.5)
    return Call("client walks away", path=path, body=_json(body), expect=(200,),
                walk_away=rng.choice([0.0, 0.05, 0.3]))
