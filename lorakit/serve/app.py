"""The HTTP server: OpenAI-compatible routes, admin routes, health and metrics (FastAPI + uvicorn).

Routes follow OpenAI's API (`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
with `stream: true` as server-sent events ending in `data: [DONE]`) and vLLM's extensions
(`top_k`, models listing adapters with `parent` = the base, `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`). `/admin/adapters...` registers, loads, unloads, pins and removes
adapters; `/health` needs no key; `/metrics` is Prometheus text.

Every route but `/health` requires `Authorization: Bearer <key>` when a key is configured. Bodies
are read with a size cap before parsing, requests are checked completely before anything is
queued, and a full queue answers 503 at once rather than holding the connection.

`serve(config)` is the `lorakit serve` entry point; `ServerThread` runs the same server in a
background thread (tests, benchmarks).
"""


import asyncio
import hmac
import json
import threading
import time

from lorakit.serve.config import ServeConfig
from lorakit.serve.engine import Overloaded, Request
from lorakit.serve.metrics import CONTENT_TYPE, HttpCounters, render
from lorakit.serve.protocol import (
    ApiError, chat_body, chunk_body, completion_body, new_id, parse_request, usage, usage_chunk,
)
from lorakit.serve.service import Service, build_service


async def _read_json(request, limit: int) -> object:
    """The body parsed as JSON, refusing more than `limit` bytes (chunked bodies included)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, above the limit of {limit}",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is above the limit of {limit} bytes",
                           code="body_too_large")
    if not body:
        return {}
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


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
                  openapi_url=None)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def auth_and_count(request: HttpRequest, call_next):
        start = time.monotonic()
        path = request.url.path
        if api_key is not None and path != "/health":
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

    @app.exception_handler(404)
    async def not_found(request, _e):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}",
                                       code="not_found"))

    @app.exception_handler(405)
    async def bad_method(request, _e):
        return error_response(ApiError(405, f"method {request.method} not allowed on "
                                       f"{request.url.path}"))

    @app.get("/health")
    async def health():
        alive = service.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        snapshot = await run_in_threadpool(service.snapshot)
        text = render(service.engine, snapshot, http, service.slot_bytes)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": await run_in_threadpool(service.models)}

    async def generate(request: HttpRequest, chat: bool):
        body = await _read_json(request, limits.max_body_bytes)
        req = parse_request(body, chat, limits)
        adapter = await run_in_threadpool(service.resolve_model, req.model)
        if chat:
            prompts = [await run_in_threadpool(service.encode_chat, req.messages)]
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
                jobs.append(Request(ids, adapter, params, on_event=lambda kind, x, i=index:
                                    loop.call_soon_threadsafe(events.put_nowait, (i, kind, x))))
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
        pending = set(range(len(jobs)))
        while pending:
            i, kind, x = await events.get()
            if kind == "error":
                for job in jobs:
                    service.engine.cancel(job)
                raise ApiError(400, f"generation failed: {x}", code="generation_failed")
            if kind == "done":
                pending.discard(i)
        choices = [(job.text, job.finish_reason) for job in jobs]
        use = usage(prompt_tokens * req.n, sum(len(j.output_ids) for j in jobs))
        return (chat_body if chat else completion_body)(rid, req.model, choices, use)

    async def _stream(rid, req, chat, jobs, events, prompt_tokens):
        pending = set(range(len(jobs)))
        try:
            if chat:
                for i in range(len(jobs)):
                    yield _sse(chunk_body(rid, req.model, True, i, None, None, first=True))
            while pending:
                i, kind, x = await events.get()
                if kind == "text":
                    yield _sse(chunk_body(rid, req.model, chat, i, x, None))
                elif kind == "done":
                    pending.discard(i)
                    yield _sse(chunk_body(rid, req.model, chat, i, None, x))
                else:
                    pending.discard(i)
                    yield _sse(ApiError(400, f"generation failed: {x}",
                                        code="generation_failed").body())
            if req.include_usage:
                use = usage(prompt_tokens * req.n, sum(len(j.output_ids) for j in jobs))
                yield _sse(usage_chunk(rid, req.model, chat, use))
            yield _sse("[DONE]")
        finally:  # the client went away, or we are done: free the rows either way
            for job in jobs:
                if not job.finished:
                    service.engine.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await generate(request, chat=True)

    # -- admin -------------------------------------------------------------------------------

    def field(body, key, kind, default=None, required=False):
        value = body.get(key, default) if isinstance(body, dict) else None
        if (required and value is None) or (value is not None and not isinstance(value, kind)):
            raise ApiError(400, f"{key}: expected {kind.__name__}" + (" (required)" if required else ""),
                           param=key)
        return value

    @app.get("/admin/adapters")
    async def admin_list():
        snap = await run_in_threadpool(service.snapshot)
        data = [{**r.to_json(), "slot": snap["slots"].get(r.name),
                 "cpu_resident": r.name in snap["cpu_resident"], "fits_base": service.fits_base(r)}
                for r in service.registry.list()]
        return {"object": "list", "data": data, "cache": snap}

    @app.post("/admin/adapters", status_code=201)
    async def admin_register(request: HttpRequest):
        body = await _read_json(request, limits.max_body_bytes)
        rec = await run_in_threadpool(
            service.register, field(body, "name", str, required=True), field(body, "path", str),
            bool(field(body, "replace", bool, False)), bool(field(body, "pin", bool, False)))
        return JSONResponse(rec.to_json(), status_code=201)

    @app.delete("/admin/adapters/{name}")
    async def admin_remove(name: str):
        await run_in_threadpool(service.remove, name)
        return {"name": name, "removed": True}

    @app.post("/admin/adapters/{name}/{action}")
    async def admin_action(name: str, action: str, request: HttpRequest):
        body = await _read_json(request, limits.max_body_bytes)
        if action == "load":
            return await run_in_threadpool(service.load, name, bool(field(body, "pin", bool, False)))
        if action == "unload":
            return await run_in_threadpool(service.unload, name)
        if action in ("pin", "unpin"):
            return await run_in_threadpool(service.set_pinned, name, action == "pin")
        raise ApiError(404, f"unknown admin action {action!r} (expected load, unload, pin, unpin)")

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: HttpRequest):
        body = await _read_json(request, limits.max_body_bytes)
        name = field(body, "lora_name", str, required=True)
        await run_in_threadpool(service.register, name, field(body, "lora_path", str), True)
        await run_in_threadpool(service.load, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: HttpRequest):
        body = await _read_json(request, limits.max_body_bytes)
        name = field(body, "lora_name", str, required=True)
        await run_in_threadpool(service.remove, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

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


def serve(config: ServeConfig) -> int:
    """`lorakit serve`: load the base, then answer HTTP on config.host:config.port until stopped.

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
    return serve(load_serve_config(getattr(args, "config", None), overrides))


def add_serve_parser(sub) -> None:
    """Add `serve [--config serve.yaml] [--host H] [--port P] [key=value ...]` to the main parser."""
    sp = sub.add_parser("serve", help="OpenAI-compatible multi-adapter server",
                        description=cmd_serve.__doc__)
    sp.add_argument("--config", default=None, help="serve YAML (ServeConfig fields)")
    sp.add_argument("--host", default=None, help="default 127.0.0.1")
    sp.add_argument("--port", type=int, default=None, help="default 8000")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. limits.max_tokens=256")
    sp.set_defaults(fn=cmd_serve)
