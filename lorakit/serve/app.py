"""The HTTP server: OpenAI-compatible routes, admin routes, health and metrics (FastAPI + uvicorn).

Routes follow OpenAI's API (`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
with `stream: true` as server-sent events ending in `data: [DONE]`) and vLLM's extensions
(`top_k`, models listing adapters with `parent` = the base, `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`). `/admin/adapters...` registers, loads, unloads, pins and removes
adapters; `/health` needs no key; `/metrics` is Prometheus text; `/openapi.json` is the OpenAPI
schema FastAPI builds, with the request models of lorakit/serve/protocol.py as the bodies.

Every route but `/health` and `/openapi.json` requires `Authorization: Bearer <key>` when a key is
configured. Bodies are read with a size cap before parsing, requests are checked completely before
anything is queued, and a full queue answers 503 at once rather than holding the connection. A
client that goes away, streaming or not, has its sequences cancelled at the next step, as vLLM's
server does, so an abandoned request does not hold a batch row to its end.

`serve(config)` is the `lorakit serve` entry point; `ServerThread` runs the same server in a
background thread (tests, benchmarks).
"""


import asyncio
import hmac
import json
import logging
import threading
import time

from lorakit.errors import AdapterError, LorakitError
from lorakit.serve.config import ServeConfig
from lorakit.serve.engine import Overloaded, Request
from lorakit.serve.metrics import CONTENT_TYPE, HttpCounters, render
from lorakit.serve.protocol import (
    REQUEST_MODELS, ApiError, ChatCompletionRequest, CompletionRequest, LoadAdapter, LoraAdapter,
    RegisterAdapter, chat_body, chunk_body, completion_body, new_id, parse_json, parse_request,
    usage, usage_chunk, validate,
)
from lorakit.serve.logprobs import chat_logprobs, completion_logprobs
from lorakit.serve.service import Service, build_service
from lorakit.serve.tools import CallStream, answer_grammar, parse_answer

log = logging.getLogger("lorakit.serve")


async def _read_json(request, limit: int) -> object:
    """The body parsed as JSON, refusing more than `limit` bytes (chunked bodies included)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, above the limit of {limit}",
                       code="body_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is above the limit of {limit} bytes",
                               code="body_too_large")
    except ClientDisconnect:  # nobody reads the answer; the status is for the access log
        raise ApiError(400, "the client went away before sending the whole body") from None
    if not body:
        return {}
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):  # as FastAPI: a form or text body is not read as JSON (CSRF)
        raise ApiError(415, f"Content-Type {content_type[:60]!r} is not JSON: send "
                       "`Content-Type: application/json`", code="unsupported_media_type")
    return parse_json(bytes(body))


def _is_json(content_type: str | None) -> bool:
    """No Content-Type, `application/json` or `application/*+json` (parameters aside), as FastAPI
    decides whether to read a body as JSON."""
    if not content_type:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def generation_error(error: Exception) -> ApiError:
    """The HTTP error for a request the engine failed: its adapter's fault 400, shutting down 503,
    anything else a fault of the server, 500, with its message."""
    if isinstance(error, AdapterError):
        return ApiError(400, f"generation failed: {error}", param="model", code="adapter_failed")
    if isinstance(error, LorakitError):
        return ApiError(503, f"generation failed: {error}", code="unavailable")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}",
                    code="generation_failed")


def _json_body(model) -> dict:
    """`openapi_extra` naming `model` (a protocol.py request model) as a route's JSON body."""
    return {"requestBody": {"required": model is not LoadAdapter, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


_ERRORS = {status: {"description": text, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/ErrorResponse"}}}}
    for status, text in [(400, "bad request"), (401, "missing or wrong API key"),
                         (404, "unknown model, adapter or route"), (409, "adapter exists or in use"),
                         (413, "body or prompt too large"), (415, "body not sent as JSON"),
                         (422, "over a limit"),
                         (500, "a fault of the server"), (503, "overloaded or unhealthy")]}
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


# One server-sent event, as OpenAPI 3.1 documents a stream's events (3.2 calls it itemSchema).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk as JSON text; the last event's data is [DONE]"}}}


def _publish_limits(components: dict, base_name: str, limits, vocab_size: int) -> None:
    """The server's own limits in the request schemas, so a client (or a schema-driven fuzzer)
    knows that `max_tokens: 10000` or token id 10**6 is refused here, and a model that exists."""
    strings = {"type": "array", "items": {"minLength": 1, "type": "string"}}
    token_ids = {"type": "array", "items": {"minimum": 0, "type": "integer"}}
    bounds = [("max_tokens", {"type": "integer"}, {"maximum": limits.max_tokens}),
              ("max_completion_tokens", {"type": "integer"}, {"maximum": limits.max_tokens}),
              ("n", {"type": "integer"}, {"maximum": limits.max_n}),
              ("stop", strings, {"maxItems": limits.max_stop}),
              ("prompt", strings, {"maxItems": limits.max_prompts}),  # not the token id list
              ("prompt", token_ids, {"items": {"minimum": 0, "maximum": vocab_size - 1,
                                               "type": "integer"}})]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        props["model"]["examples"] = [base_name]
        for key, like, bound in bounds:
            for member in props.get(key, {}).get("anyOf", []):
                if all(member.get(k) == v for k, v in like.items()):
                    member.update(bound)


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def create_app(service: Service, run_engine: bool = True):
    """The FastAPI app over `service`. With `run_engine`, the app's lifespan starts the engine on
    a thread of its own and stops it; `serve` runs the engine on the main thread instead."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from contextlib import asynccontextmanager

    config = service.config
    limits = config.limits
    api_key = config.resolved_api_key()
    http = HttpCounters()

    @asynccontextmanager
    async def lifespan(_app):
        if not run_engine:
            yield
            return
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")

    def openapi() -> dict:
        """FastAPI's schema, with the request models and the error body as components."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            from pydantic.json_schema import models_json_schema

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                         ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs["$defs"])
            components["ErrorResponse"] = _ERROR_SCHEMA
            _publish_limits(components, service.base_name, limits, service.vocab_size)
            if api_key is not None:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                      "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                for path in ("/health", "/openapi.json"):
                    for op in schema["paths"].get(path, {}).values():
                        op["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def auth_and_count(request: HttpRequest, call_next):
        start = time.monotonic()
        path = request.url.path
        if api_key is not None and path not in ("/health", "/openapi.json"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = error_response(ApiError(
                    401, "Missing or incorrect API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key"))
                http.observe(path, 401, time.monotonic() - start)
                return response
        try:
            response = await call_next(request)
        except ApiError as e:
            response = error_response(e)
        route = request.scope.get("route")
        http.observe(getattr(route, "path", "unmatched"), response.status_code, time.monotonic() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return error_response(e)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(ApiError(400, f"{where}: {first.get('msg', 'invalid request')}"))

    @app.exception_handler(Exception)
    async def server_fault(_request, e: Exception):  # logged with its traceback by Starlette
        return error_response(ApiError(500, f"internal server error: {type(e).__name__}: {e}",
                                       code="internal_error"))

    @app.exception_handler(404)
    async def not_found(request, _e):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}",
                                       code="not_found"))

    @app.exception_handler(405)
    async def bad_method(request, _e):
        response = error_response(ApiError(405, f"method {request.method} not allowed on "
                                            f"{request.url.path}"))
        # RFC 9110 15.5.6: Allow lists every method of the path (Starlette's names one route's).
        from starlette.routing import Match

        methods = set()
        for route in app.router.routes:
            if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                methods |= route.methods
        response.headers["Allow"] = ", ".join(sorted(methods))
        return response

    @app.get("/health")
    async def health():
        engine = service.engine
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        status = ("engine stopped" if not engine.alive else
                  f"engine stalled: one step has run for {engine.stalled_for():.0f} s "
                  f"(limit {engine.stall_timeout:g} s)")
        return JSONResponse({"status": status}, status_code=503)

    class PrometheusText(PlainTextResponse):  # its media type is what /openapi.json shows
        media_type = CONTENT_TYPE

    @app.get("/metrics", response_class=PrometheusText)
    async def metrics():
        snapshot = await run_in_threadpool(service.snapshot)
        text = render(service.engine, snapshot, http, service.slot_bytes)
        return PrometheusText(text)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": await run_in_threadpool(service.models)}

    async def generate(request: HttpRequest, chat: bool):
        body = await _read_json(request, limits.max_body_bytes)
        req = parse_request(body, chat, limits)
        adapter = await run_in_threadpool(service.resolve_model, req.model)
        grammar = None
        if chat:
            grammar = await run_in_threadpool(answer_grammar, req, service.grammar)
            prompts = [await run_in_threadpool(service.encode_chat, req.messages, req.tools)]
        else:
            prompts = [service.encode_prompt(p) for p in req.prompts]
        for ids in prompts:
            service.check_length(ids, req.params.max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for ids in prompts:
            for k in range(req.n):
                params = req.params
                if req.n > 1 and params.seed is not None:  # n seeded choices must still differ
                    params = type(params)(**{**params.__dict__, "seed": params.seed + k})
                index = len(jobs)
                constraint = service.grammar.constraint(grammar) if grammar else None
                jobs.append(Request(ids, adapter, params, on_event=lambda kind, x, i=index:
                                    loop.call_soon_threadsafe(events.put_nowait, (i, kind, x)),
                                    constraint=constraint))
        try:
            for job in jobs:
                service.engine.submit(job)
        except Overloaded as e:
            for job in jobs:
                service.engine.cancel(job)
            raise ApiError(503, str(e), code="overloaded") from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return StreamingResponse(_stream(rid, req, chat, jobs, events, prompt_tokens),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs))
        pending = set(range(len(jobs)))
        try:
            while pending:
                i, kind, x = await events.get()
                if kind == "error":
                    raise generation_error(x)
                if kind == "done":
                    pending.discard(i)
        finally:  # done, failed, or the client went away: free the rows either way
            watcher.cancel()
            for job in jobs:
                if not job.finished:
                    service.engine.cancel(job)
        choices = [_choice(job, req, chat) for job in jobs]
        use = usage(prompt_tokens * req.n, sum(len(j.output_ids) for j in jobs))
        return (chat_body if chat else completion_body)(rid, req.model, choices, use)

    def _choice(job: Request, req, chat: bool) -> tuple:
        """(text, finish_reason, extra) of a finished job: tool calls read out of the answer
        when tools were offered, logprobs when asked for."""
        extra, text, reason = {}, job.text, job.finish_reason
        if job.params.logprobs is not None:
            extra["logprobs"] = chat_logprobs(service.tokenizer, job.logprobs,
                                              service.grammar.token_bytes) if chat else \
                completion_logprobs(service.tokenizer, job.logprobs)
        if chat and req.tools:
            text, calls = parse_answer(job.text)
            if calls:
                extra["tool_calls"], reason = calls, "tool_calls"
        return text, reason, extra

    def _stream_logprobs(job: Request, chat: bool, sent: list[int], i: int):
        """The logprobs of the job's tokens not yet streamed (None when not asked for)."""
        if job.params.logprobs is None:
            return None
        entries = job.logprobs[sent[i]:]
        offset = len(service.tokenizer.decode([e[0] for e in job.logprobs[:sent[i]]])) \
            if not chat and sent[i] else 0
        sent[i] += len(entries)
        return (chat_logprobs(service.tokenizer, entries, service.grammar.token_bytes) if chat
                else completion_logprobs(service.tokenizer, entries, offset))

    async def _cancel_on_disconnect(request: HttpRequest, jobs: list[Request]) -> None:
        """Wait for the client to go away (the body is read: what comes next is the disconnect),
        then cancel its sequences; the engine drops them at its next step."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in jobs:
            service.engine.cancel(job)

    async def _stream(rid, req, chat, jobs, events, prompt_tokens):
        pending = set(range(len(jobs)))
        calls = [CallStream() for _ in jobs] if chat and req.tools else None
        sent = [0] * len(jobs)  # logprob entries streamed per choice
        try:
            if chat:
                for i in range(len(jobs)):
                    yield _sse(chunk_body(rid, req.model, True, i, None, None, first=True))
            while pending:
                i, kind, x = await events.get()
                if kind == "text":
                    deltas = None
                    if calls is not None:
                        x, deltas = calls[i].feed(x)
                    if x or deltas or jobs[i].params.logprobs is not None:
                        yield _sse(chunk_body(rid, req.model, chat, i, x, None,
                                              logprobs=_stream_logprobs(jobs[i], chat, sent, i),
                                              tool_calls=deltas))
                elif kind == "done":
                    pending.discard(i)
                    rest = calls[i].finish() if calls is not None else None
                    if x == "stop" and calls is not None and calls[i].called:
                        x = "tool_calls"
                    last = _stream_logprobs(jobs[i], chat, sent, i)
                    if rest or (last and (last.get("content") or last.get("tokens"))):
                        yield _sse(chunk_body(rid, req.model, chat, i, rest, None, logprobs=last))
                    yield _sse(chunk_body(rid, req.model, chat, i, None, x))
                else:
                    pending.discard(i)
                    yield _sse(generation_error(x).body())
            if req.include_usage:
                use = usage(prompt_tokens * req.n, sum(len(j.output_ids) for j in jobs))
                yield _sse(usage_chunk(rid, req.model, chat, use))
            yield _sse("[DONE]")
        finally:  # the client went away, or we are done: free the rows either way
            for job in jobs:
                if not job.finished:
                    service.engine.cancel(job)

    generation_responses = {200: {"description": "the completion (JSON), or server-sent events "
                                  "with `stream: true`", "content": {
                                      "application/json": {"schema": {"type": "object"}},
                                      "text/event-stream": {"schema": _SSE_EVENT}}},
                            **_ERRORS}

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest),
              responses=generation_responses)
    async def completions(request: HttpRequest):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest),
              responses=generation_responses)
    async def chat_completions(request: HttpRequest):
        return await generate(request, chat=True)

    # -- admin -------------------------------------------------------------------------------

    @app.get("/admin/adapters")
    async def admin_list():
        snap = await run_in_threadpool(service.snapshot)
        data = [{**r.to_json(), "slot": snap["slots"].get(r.name),
                 "cpu_resident": r.name in snap["cpu_resident"], "fits_base": service.fits_base(r),
                 "error": r.error or snap["errors"].get(r.name)}
                for r in await run_in_threadpool(service.registry.list)]
        return {"object": "list", "data": data, "cache": snap}

    @app.post("/admin/adapters", status_code=201, openapi_extra=_json_body(RegisterAdapter),
              responses=_ERRORS)
    async def admin_register(request: HttpRequest):
        body = validate(RegisterAdapter, await _read_json(request, limits.max_body_bytes))
        rec = await run_in_threadpool(service.register, body.name, body.path, body.replace,
                                      body.pin)
        return JSONResponse(rec.to_json(), status_code=201)

    @app.delete("/admin/adapters/{name}", responses=_ERRORS)
    async def admin_remove(name: str):
        await run_in_threadpool(service.remove, name)
        return {"name": name, "removed": True}

    @app.post("/admin/adapters/{name}/load", openapi_extra=_json_body(LoadAdapter),
              responses=_ERRORS)
    async def admin_load(name: str, request: HttpRequest):
        body = validate(LoadAdapter, await _read_json(request, limits.max_body_bytes))
        return await run_in_threadpool(service.load, name, body.pin)

    @app.post("/admin/adapters/{name}/unload", responses=_ERRORS)
    async def admin_unload(name: str):
        return await run_in_threadpool(service.unload, name)

    @app.post("/admin/adapters/{name}/pin", responses=_ERRORS)
    async def admin_pin(name: str):
        return await run_in_threadpool(service.set_pinned, name, True)

    @app.post("/admin/adapters/{name}/unpin", responses=_ERRORS)
    async def admin_unpin(name: str):
        return await run_in_threadpool(service.set_pinned, name, False)

    @app.post("/v1/load_lora_adapter", openapi_extra=_json_body(LoraAdapter), responses=_ERRORS)
    async def vllm_load(request: HttpRequest):
        body = validate(LoraAdapter, await _read_json(request, limits.max_body_bytes))
        await run_in_threadpool(service.register, body.lora_name, body.lora_path, True)
        await run_in_threadpool(service.load, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", openapi_extra=_json_body(LoraAdapter), responses=_ERRORS)
    async def vllm_unload(request: HttpRequest):
        body = validate(LoraAdapter, await _read_json(request, limits.max_body_bytes))
        await run_in_threadpool(service.remove, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


class ServerThread:
    """A uvicorn server for `app` on host:port in a background thread (port 0 = a free port)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="lorakit-http", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server failed to start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(config: ServeConfig, mount=None) -> int:
    """`lorakit serve`: load the base, then answer HTTP on config.host:config.port until stopped.

    `mount(app, service)`, when given, adds routes to the app before it starts (the web UI,
    lorakit/ui/routes.py).

    The engine runs on this (the main) thread and uvicorn on another: on the CPU the engine's
    many small operations run about twice as fast on the main thread (lorakit/serve/engine.py).
    Ctrl-C or SIGTERM shuts uvicorn down gracefully (a second Ctrl-C forces it), then the engine.
    """
    import signal

    import uvicorn

    service = build_service(config)
    weights = next(service.engine.model.parameters())
    packed = f", {service.packed_layers} linear layers prepacked" if service.packed_layers else ""
    print(f"serving {config.model} ({str(weights.dtype).removeprefix('torch.')} on {weights.device}; "
          f"dtype {config.dtype}{packed})")
    app = create_app(service, run_engine=False)
    if mount is not None:
        mount(app, service)
    if config.resolved_api_key() is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {config.host} without an API key (set api_key or LORAKIT_API_KEY)")
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info"))

    def http() -> None:
        try:
            server.run()
        finally:  # shut down, or failed to start (port in use): the engine ends too
            service.engine.stop()

    thread = threading.Thread(target=http, name="lorakit-http", daemon=True)
    # uvicorn installs no signal handlers off the main thread: these stand in for its own.
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        service.engine.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def cmd_serve(args) -> int:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API."""
    from lorakit.serve.config import load_serve_config

    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "host", None):
        overrides.append(f"host={args.host}")
    if getattr(args, "port", None) is not None:
        overrides.append(f"port={args.port}")
    if getattr(args, "replicas", None) is not None:  # N copies on Ray Serve (docs/cluster.md)
        from lorakit.serve.ray_serve import serve_on_ray

        return serve_on_ray(load_serve_config(getattr(args, "config", None), overrides),
                            args.replicas, args.address, args.replica_cpus, args.replica_gpus)
    mount = None
    if getattr(args, "ui", False):
        from lorakit.ui.cli import ui_mount

        mount = ui_mount(args.runs)
    return serve(load_serve_config(getattr(args, "config", None), overrides), mount=mount)


def add_serve_parser(sub) -> None:
    """Add `serve [--config serve.yaml] [--host H] [--port P] [key=value ...]` to the main parser."""
    sp = sub.add_parser("serve", help="OpenAI-compatible multi-adapter server",
                        description=cmd_serve.__doc__)
    sp.add_argument("--config", default=None, help="serve YAML (ServeConfig fields)")
    sp.add_argument("--host", default=None, help="default 127.0.0.1")
    sp.add_argument("--port", type=int, default=None, help="default 8000")
    sp.add_argument("--ui", action="store_true", help="also serve the web UI at /ui/ (docs/ui.md)")
    sp.add_argument("--runs", default="runs", help="with --ui: the runs folder it shows")
    sp.add_argument("--replicas", type=int, default=None,
                    help="serve N replicas behind Ray Serve, routed by adapter (docs/cluster.md)")
    sp.add_argument("--address", default=None,
                    help="with --replicas: join this Ray cluster (auto or HOST:PORT)")
    sp.add_argument("--replica-cpus", type=float, default=1.0, help="with --replicas: CPUs per replica")
    sp.add_argument("--replica-gpus", type=float, default=0.0, help="with --replicas: GPUs per replica")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. limits.max_tokens=256")
    sp.set_defaults(fn=cmd_serve)
