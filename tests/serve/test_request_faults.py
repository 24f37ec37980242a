"""Requests that used to break the server, each against a live server (real uvicorn on a free
port, the tiny Llama): a tiny temperature, a seed beyond int64, a 100k-deep body, strings where
booleans go, a client that leaves before its answer, and the `/openapi.json` schema."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorakit.serve.app import ServerThread, create_app
from tests.serve.builders import http_service


@pytest.fixture
def server(llama, tokenizer, tmp_path):
    service = http_service(llama, tokenizer, tmp_path, max_tokens=200, max_body_bytes=1_000_000)
    with ServerThread(create_app(service)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            yield http, service


def _complete(http, **body):
    body = {"model": "ad0", "prompt": "the quick brown fox", "max_tokens": 6, "ignore_eos": True,
            **body}
    return http.post("/v1/completions", json=body)


def _error(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_tiny_temperature_fails_no_request(server):
    """temperature 1e-300 divided the logits to inf and the softmax to NaN: torch.multinomial
    raised and the whole batch failed, innocent requests with it. Now below 1e-5 is greedy and
    below 1e-2 samples at 1e-2 (vLLM), so all six concurrent requests answer as they do alone."""
    http, _ = server
    bodies = [{"temperature": 1e-300}, {"temperature": 0}, {"temperature": 0.8, "seed": 7},
              {"temperature": 3e-3, "seed": 1, "model": "ad1"}, {"temperature": 1.0, "seed": 2},
              {"temperature": 0, "model": "tiny-base"}]
    alone = [_complete(http, **b) for b in bodies]
    assert [r.status_code for r in alone] == [200] * 6, [r.text for r in alone]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: _complete(http, **b), bodies))
    assert [r.status_code for r in together] == [200] * 6
    texts = [r.json()["choices"][0]["text"] for r in together]
    assert texts == [r.json()["choices"][0]["text"] for r in alone]
    assert texts[0] == texts[1]  # 1e-300 is greedy
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in together)


def test_seed_must_fit_int64(server):
    """A seed beyond int64 made torch.Generator.manual_seed raise (HTTP 500); now 400."""
    http, _ = server
    for seed in [2**63, -(2**63) - 1, 2**64, 10**30]:
        err = _error(_complete(http, seed=seed, temperature=1), 400)
        assert err["param"] == "seed" and "seed: Input should be" in err["message"]
    for seed in [2**63 - 1, -(2**63)]:  # the ends of the range, n=2 adds k to the seed
        r = _complete(http, seed=seed, temperature=1, n=2)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2


def test_deep_and_non_json_bodies_are_400(server):
    """A 100k-deep body raised RecursionError in json.loads (HTTP 500); NaN, Infinity, 1e999 and
    lone surrogates parsed; every one is a 400 now, and the server keeps answering."""
    http, _ = server
    headers = {"Content-Type": "application/json"}
    deep = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            b'{"model": "ad0", "prompt": "hi", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    for body in deep:
        err = _error(http.post("/v1/completions", content=body, headers=headers), 400)
        assert err["message"] == "the request body is not valid JSON (nested too deeply)"
    cases = {b'{"model": "ad0", "prompt": "hi", "temperature": NaN}': "NaN is not a JSON value",
             b'{"model": "ad0", "prompt": "hi", "temperature": 1e999}': "the number 1e999 is too large",
             b'{"model": "ad0", "prompt": "hi", "top_p": -Infinity}': "-Infinity is not a JSON value",
             b'{"model": "ad0", "prompt": "\\ud800"}': "lone surrogate",
             b'{"model": "ad0", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}": "4300 digits",
             b"\xff\xfe\x00": "not valid JSON"}
    for body, why in cases.items():
        err = _error(http.post("/v1/completions", content=body, headers=headers), 400)
        assert why in err["message"], err
    # A nesting that parses but is no prompt: the message shows a clipped repr of it.
    err = _error(_complete(http, prompt=json.loads("[" * 500 + "]" * 500)), 400)
    assert err["message"].startswith("prompt: expected a string, a list of strings, or a list of "
                                     "token ids (got [[[[...]]]])")
    assert _complete(http).status_code == 200


@pytest.mark.parametrize("field,value,param", [
    ("ignore_eos", "no", "ignore_eos"), ("ignore_eos", 0, "ignore_eos"), ("stream", "false", "stream"),
    ("n", "2", "n"), ("n", True, "n"), ("max_tokens", 2.5, "max_tokens"),
    ("temperature", "0.5", "temperature"), ("seed", "7", "seed"), ("top_k", 1.5, "top_k"),
    ("stream_options", {"include_usage": "yes"}, "stream_options"), ("model", ["ad0"], "model"),
])
def test_no_coercion(server, field, value, param):
    """`"ignore_eos": "no"` meant true (bool("no")); strict types refuse every coercion (an
    integral float such as 2.0 is no coercion: JSON has one number type)."""
    http, _ = server
    err = _error(_complete(http, **{field: value}), 400)
    assert err["param"] == param
    assert err["message"].startswith(f"{param}") and "(got " in err["message"], err


def test_admin_bodies_are_strict(server):
    http, service = server
    err = _error(http.post("/admin/adapters", json={"name": "ad2", "replace": "no"}), 400)
    assert err["message"] == "replace: Input should be a valid boolean (got 'no')"
    err = _error(http.post("/admin/adapters/ad0/load", json={"pin": 1}), 400)
    assert err["message"] == "pin: Input should be a valid boolean (got 1)"
    err = _error(http.post("/v1/load_lora_adapter", json={"lora_path": "ad2"}), 400)
    assert err["message"] == "lora_name: required"
    assert service.registry.get("ad2") is not None  # registered: all three exist in http_service
    assert http.post("/admin/adapters/ad0/load").status_code == 200  # no body: pin false


def test_abandoned_request_gives_its_row_back(server):
    """A non-streaming client that leaves has its sequences cancelled (it used to decode to its
    end). The engine is held on a command so the request is still queued when the client goes."""
    http, service = server
    engine = service.engine
    gate = threading.Event()
    holder = threading.Thread(target=engine.call, args=(gate.wait,), daemon=True)
    holder.start()
    before = engine.generated_tokens
    try:
        with httpx.Client(base_url=str(http.base_url), timeout=1.0) as leaving:
            with pytest.raises(httpx.ReadTimeout):
                _complete(leaving, model="tiny-base", max_tokens=200)
        deadline = time.monotonic() + 10
        while not (engine.waiting and engine.waiting[0].cancelled):
            assert time.monotonic() < deadline, "the disconnect did not cancel the request"
            time.sleep(0.02)
    finally:
        gate.set()
        holder.join(10)
    deadline = time.monotonic() + 10
    while engine.finished["cancelled"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert engine.generated_tokens == before and not engine.running and not engine.waiting
    assert _complete(http).status_code == 200


def test_openapi_json_describes_the_requests(llama, tokenizer, tmp_path):
    """/openapi.json is served (without the key) and its bodies are the strict request models."""
    service = http_service(llama, tokenizer, tmp_path, adapters=0, api_key="sk-0123456789",
                           max_tokens=8, default_max_tokens=8)
    with ServerThread(create_app(service, run_engine=False)) as srv:
        r = httpx.get(srv.url + "/openapi.json")
        assert r.status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
    schema = r.json()
    assert schema["openapi"].startswith("3.")
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/CompletionRequest"}
    models = schema["components"]["schemas"]
    completion = models["CompletionRequest"]
    assert completion["additionalProperties"] is False and completion["required"] == ["model", "prompt"]
    props = completion["properties"]
    assert props["ignore_eos"]["anyOf"][0] == {"type": "boolean"}
    assert props["seed"]["anyOf"][0] == {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
    assert props["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    chat = models["ChatCompletionRequest"]["properties"]["messages"]
    assert chat["items"] == {"$ref": "#/components/schemas/Message"} and chat["minItems"] == 1
    assert models["Message"]["properties"]["role"]["enum"] == ["system", "user", "assistant",
                                                                "developer", "tool"]
    # What this server takes, so schemathesis's valid requests are valid here (it found each).
    assert props["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 8}
    assert props["n"]["anyOf"][0]["maximum"] == 2 and props["model"]["examples"] == ["tiny-base"]
    assert props["prompt"]["anyOf"][1] == {"type": "array", "items": {  # token ids: no maxItems
        "type": "integer", "minimum": 0, "maximum": service.vocab_size - 1}, "minItems": 1}
    assert props["prompt"]["anyOf"][2]["maxItems"] == 16 and props["stop"]["anyOf"][1]["maxItems"] == 4
    assert props["echo"]["enum"] == [False, None] and props["best_of"]["enum"] == [1, None]
    assert models["RegisterAdapter"]["properties"]["name"]["maxLength"] == 128
    paths = schema["paths"]
    stream = paths["/v1/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert stream["schema"]["properties"]["data"]["type"] == "string"
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain; version=0.0.4; charset=utf-8"]
    assert "415" in paths["/v1/chat/completions"]["post"]["responses"]
    assert schema["security"] == [{"bearer": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert set(schema["paths"]) >= {"/v1/models", "/v1/chat/completions", "/admin/adapters",
                                    "/admin/adapters/{name}/load", "/v1/load_lora_adapter"}


def test_integral_numbers_are_integers(server):
    """JSON (and JSON Schema's `integer`) does not tell 2.0 from 2: schemathesis sent
    `"max_tokens": 1094.0` and got a 400 for a request the schema allows."""
    http, _ = server
    whole = _complete(http, max_tokens=6.0, n=1.0, seed=7.0, top_k=0.0, temperature=1)
    assert whole.status_code == 200, whole.text
    assert whole.json() | {"id": 0, "created": 0} == _complete(
        http, max_tokens=6, n=1, seed=7, top_k=0, temperature=1).json() | {"id": 0, "created": 0}
    err = _error(_complete(http, seed=float(2**63)), 400)  # whole, but beyond int64
    assert err["param"] == "seed" and "less than or equal to 9223372036854775807" in err["message"]
    err = _error(_complete(http, prompt=[1.0, 2.5]), 400)
    assert err["param"] == "prompt"


def test_a_body_not_sent_as_json_is_415(server):
    """A form or text body was parsed as JSON whatever its Content-Type, so a web page could post
    a completion cross-site without a preflight; FastAPI refuses that too."""
    http, _ = server
    body = json.dumps({"model": "ad0", "prompt": "hi", "max_tokens": 2}).encode()
    for content_type in ["text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/xml"]:
        err = _error(http.post("/v1/completions", content=body,
                               headers={"Content-Type": content_type}), 415)
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    for ok in ("application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"):
        r = http.post("/v1/completions", content=body, headers={"Content-Type": ok})
        assert r.status_code == 200, (ok, r.text)


def test_a_body_not_in_utf8_is_400(server):
    """json.loads takes UTF-16 and UTF-32 bytes; RFC 8259 says JSON between systems is UTF-8."""
    http, _ = server
    body = json.dumps({"model": "ad0", "prompt": "hi", "max_tokens": 2})
    headers = {"Content-Type": "application/json"}
    for raw, why in [(body.encode("utf-16"), "not UTF-8"), (body.encode("utf-32-le"), "property name"),  # NULs are UTF-8
                     (b"\xef\xbb\xbf" + body.encode(), "BOM"),
                     (body.replace("hi", "h\xe9").encode("latin-1"), "not UTF-8")]:
        err = _error(http.post("/v1/completions", content=raw, headers=headers), 400)
        assert err["message"].startswith("the request body is not valid JSON") and why in err["message"]


def test_wrong_method_says_which_are_allowed(server):
    http, _ = server
    for method, path, allow in [("GET", "/v1/completions", "POST"), ("TRACE", "/v1/models", "GET"),
                                ("PUT", "/admin/adapters/ad0", "DELETE")]:
        r = http.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
        assert r.json()["error"]["message"] == f"method {method} not allowed on {path}"


def test_the_published_adapter_name_pattern_is_check_name():
    """schemathesis sent `{"name": ""}`, valid by the schema, refused by the server: the schema
    now publishes what `check_name` takes."""
    import random
    import re

    from lorakit.errors import AdapterError
    from lorakit.serve.protocol import ADAPTER_NAME_PATTERN
    from lorakit.serve.registry import check_name

    rng = random.Random(0)
    names = ["", ".", "..", "...", ".a", "..a", "a.", "a..b", "-", "_", "ad0", "a/b", "a b", "é",
             "a" * 128, "a" * 129, "..." + "a" * 125, "\n", "a\n"]
    names += ["".join(rng.choice("ab.-_/ ") for _ in range(rng.randint(0, 5))) for _ in range(500)]
    for name in names:
        try:
            check_name(name)
            taken = True
        except AdapterError:
            taken = False
        ecma = ADAPTER_NAME_PATTERN.removesuffix("$") + r"\Z"  # JSON Schema's $ is Python's \Z
        published = bool(re.search(ecma, name)) and 1 <= len(name) <= 128
        assert published == taken, name


def test_error_messages_are_one_line(server, llama):
    """A model name with a newline, or an adapter check's list of problems, made an error message
    of several lines (found by tests/serve/test_http_fuzz.py)."""
    from tests.adapters.test_check import MAG, edit_tensors
    from tests.serve.builders import make_dora_adapter

    http, service = server
    err = _error(_complete(http, model="ad0\nINFO: forged log line"), 404)
    assert err["message"] == "The model `ad0\\nINFO: forged log line` does not exist."
    err = _error(_complete(http, model="a" * 10_000), 404)
    assert len(err["message"]) < 200
    make_dora_adapter(llama, service.adapters_root / "short")
    edit_tensors(service.adapters_root / "short", lambda t: t.__setitem__(MAG, t[MAG][:-3].clone()))
    err = _error(_complete(http, model="short"), 400)
    assert "\n" not in err["message"] and "bad adapter tensors: base_model.model" in err["message"]
    assert err["message"].count("length 61 (expected 64") >= 1


def test_registering_a_folder_that_is_not_there_is_404(server):
    """schemathesis: `{"name": "0"}` is valid by the schema; no folder `0` is a missing resource
    (404, as an unknown model is), not a malformed request (400)."""
    http, service = server
    err = _error(http.post("/admin/adapters", json={"name": "nothere"}), 404)
    assert err["code"] == "adapter_not_found" and err["param"] == "name"
    assert err["message"] == "adapter `nothere`: no folder `nothere` under the adapters root"
    err = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "gone"}), 404)
    assert err["param"] == "path" and service.registry.get("x") is None
    assert _error(http.post("/admin/adapters", json={"name": "x", "path": "../ad0"}), 400)


def test_adapter_paths_the_os_cannot_take_are_400(server):
    """schemathesis sent `"lora_path": "..\\u0000..."`: `Path.resolve` raised ValueError (HTTP 500);
    a name too long for the OS and a symlink loop (RuntimeError on Python 3.11) did the same."""
    http, service = server
    (service.adapters_root / "loop").symlink_to("loop")
    for path, why in [("a\x00b", "a NUL character is refused"), ("x" * 300, "File name too long"),
                      ("x/" * 3000, "File name too long"), ("loop", "Symlink loop"),
                      ("loop/inner", "Symlink loop")]:
        for route, body in [("/admin/adapters", {"name": "x", "path": path}),
                            ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})]:
            err = _error(http.post(route, json=body), 400)
            assert why in err["message"] and err["code"] == "adapter_rejected", (route, path, err)
    err = _error(_complete(http, model="loop"), 404)  # found on demand: a loop is no adapter
    assert err["code"] == "model_not_found"
    assert service.registry.get("x") is None and _complete(http).status_code == 200


def test_response_format_of_a_type_that_is_no_string_is_400(server):
    """`"response_format": {"type": {}}` raised TypeError in the union's discriminator (HTTP 500,
    and uvicorn dropped the connection, so the client's next request on it failed too)."""
    http, _ = server
    for kind in [{}, [], 1, None, True]:
        body = {"model": "ad0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "response_format": {"type": kind}}
        err = _error(http.post("/v1/chat/completions", json=body), 400)
        assert err["message"].startswith("response_format: expected type text, json_object or "
                                         "json_schema"), err
