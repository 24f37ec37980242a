"""`lorakit serve --replicas N`: N copies of the server behind Ray Serve, routed by adapter.

Ray Serve (https://docs.ray.io/en/latest/serve/) runs two deployments of one application:

- `Replica` (N of them): each builds today's `Service` (lorakit/serve/service.py: base model,
  engine, its own LRU tiers of adapters) and answers requests with today's FastAPI app
  (lorakit/serve/app.py, unchanged), called in-process over ASGI, so the routes, the API key, the
  limits and the error bodies are the single server's. Each response carries `x-lorakit-replica`
  and `/metrics` gains `lorakit_replica_info{replica=...}`, naming the replica that answered.
- `Ingress` (one, no CPU): Ray Serve's HTTP proxy hands it every request; it reads the body's
  `model` and forwards the request to a replica with that name as the multiplexed model id
  (Ray Serve's model multiplexing, the `serve_multiplexed_model_id` a client could send as a
  header). Serve's router sends a request to a replica that already holds that adapter when
  one does, else to the replica holding the fewest, which is adapter affinity; each replica
  reports what it holds through `Replica.adapter` (`@serve.multiplexed`). Requests for the base
  model, `/v1/models`, `/health` and `/metrics` go to any replica.

Registered adapters live in the registry (SQLite in LORAKIT_HOME) and the adapters root, which
every replica reads, so `/v1/models` lists each adapter once whichever replica answers. Admin
`load`, `unload` and `pin` act on the replica that answers (named in `x-lorakit-replica`);
`register` and `remove` reach every replica through the registry. On a cluster, the adapters
root, LORAKIT_HOME and the base model must be at the same path on every node (docs/cluster.md).

A replica that dies fails the requests it held with a clean 503 (`replica_unavailable`); Serve
sends the later ones to the other replicas and starts a new one. A stream that has begun ends
with an error event instead, as a single server's stream does when generation fails.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import threading
from pathlib import Path

from lorakit.serve.config import ServeConfig
from lorakit.serve.protocol import ApiError

APP_NAME = "lorakit"
REPLICA_HEADER = "x-lorakit-replica"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Scope keys that travel from the ingress to the replica (the rest are Serve's or the socket's).
SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string",
              "headers", "client", "server")


def model_of(path: str, body: bytes) -> str | None:
    """The adapter a request is for, as the router should see it: the body's `model` of a
    generation request, the `{name}` of an admin route on one adapter; None otherwise."""
    if path in GENERATION_PATHS:
        try:
            model = json.loads(body).get("model") if body else None
        except (ValueError, AttributeError, RecursionError):
            return None
        return model if isinstance(model, str) and model else None
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["admin", "adapters"]:
        return parts[2]
    return None


async def asgi_messages(app, scope: dict, body: bytes):
    """Call the ASGI `app` on one request whose body is `body`; yield the messages it sends.

    The app may wait for the client to go away (lorakit's server cancels abandoned requests):
    that happens when the caller stops iterating, and the app is then told so."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _t: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            yield message
        task.result()  # the app's own exception, if it raised one past its handlers
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 (the client is gone anyway)
                task.cancel()


def _replica_metrics(text: bytes, replica: str, deployment: str) -> bytes:
    line = (f"# HELP lorakit_replica_info The Ray Serve replica that answered this scrape.\n"
            f"# TYPE lorakit_replica_info gauge\n"
            f'lorakit_replica_info{{replica="{replica}",deployment="{deployment}"}} 1\n')
    return text + line.encode()


class Replica:
    """One copy of the server: the Service and the FastAPI app of a single `lorakit serve`."""

    def __init__(self, config: ServeConfig):
        from ray import serve

        from lorakit.serve.app import create_app
        from lorakit.serve.service import build_service

        context = serve.get_replica_context()
        self.name = context.replica_tag
        self.deployment = context.deployment
        self.service = build_service(config)
        self.service.start()  # the engine on a thread of its own
        self.app = create_app(self.service, run_engine=False)

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()

    def _authorized(self, scope: dict) -> bool:
        key = self.service.config.resolved_api_key()
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        return key is None or hmac.compare_digest(given, f"Bearer {key}".encode())

    async def adapter(self, name: str) -> str:
        """Load `name` into this replica's CPU tier (Serve then records that this replica holds
        it); an `ApiError` when it cannot be loaded, so that Serve records nothing."""
        from starlette.concurrency import run_in_threadpool

        for attempt in range(2):  # two replicas registering one new adapter at once: one retries
            try:
                await run_in_threadpool(self.service.resolve_model, name)
                return name
            except ApiError:
                if attempt:
                    raise
        return name

    async def held_adapter(self, name: str) -> str:
        """`adapter` as Serve's multiplexed loader (build_app wraps it with the replica's limit)."""
        return await self.adapter(name)

    async def handle(self, scope: dict, body: bytes):
        """Answer one HTTP request: ("start", status, headers), then ("body", bytes, more)."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id and self._authorized(scope):  # no adapter loads for a client without the key
            try:
                await self.held_adapter(model_id)
            except ApiError:
                pass  # not held here: the app answers it (404, 400) as a single server does
        scope = {**scope, "root_path": "", "state": {}}
        metrics = scope["path"] == "/metrics"
        held = []
        async for message in asgi_messages(self.app, scope, body):
            if message["type"] == "http.response.start":
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                headers.append((REPLICA_HEADER.encode(), self.name.encode()))
                start = ("start", message["status"], headers)
                if not metrics:
                    yield start
            elif message["type"] == "http.response.body":
                chunk, more = message.get("body", b""), message.get("more_body", False)
                if not metrics:
                    yield ("body", chunk, more)
                    continue
                held.append(chunk)
                if not more:  # the scrape, with this replica's name added
                    text = b"".join(held)
                    if start[1] == 200:
                        text = _replica_metrics(text, self.name, self.deployment)
                    status, headers = start[1], [(k, v) for k, v in start[2]
                                                 if k.lower() != b"content-length"]
                    yield ("start", status, headers + [(b"content-length", str(len(text)).encode())])
                    yield ("body", text, False)


def _error_response(status: int, message: str, code: str):
    from starlette.responses import JSONResponse

    return JSONResponse(ApiError(status, message, code=code).body(), status_code=status)


class Ingress:
    """Ray Serve's HTTP entry: reads the body, names the adapter for the router, forwards."""

    def __init__(self, replicas, base_name: str, max_body_bytes: int):
        self.replicas = replicas
        self.base_name = base_name
        self.max_body_bytes = max_body_bytes

    async def _body(self, request) -> bytes | None:
        """The body, or None above the limit (the replica's own check, done before forwarding)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    async def __call__(self, request):
        from ray.exceptions import RayError
        from starlette.responses import Response, StreamingResponse

        body = await self._body(request)
        if body is None:
            return _error_response(413, f"the request body is above the limit of "
                                   f"{self.max_body_bytes} bytes", "body_too_large")
        scope = {k: request.scope[k] for k in SCOPE_KEYS if k in request.scope}
        scope["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
        model = model_of(scope["path"], body)
        model_id = model if model and model != self.base_name else ""
        stream = self.replicas.options(stream=True, multiplexed_model_id=model_id).handle.remote(
            scope, body)
        try:
            _, status, headers = await stream.__anext__()
        except (RayError, StopAsyncIteration) as e:
            return _error_response(503, f"the replica answering this request failed "
                                   f"({type(e).__name__}); retry", "replica_unavailable")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_body_chunks(stream), status_code=status, headers=headers)
        chunks = []
        try:
            async for _, chunk, _more in stream:
                chunks.append(chunk)
        except RayError as e:
            return _error_response(503, f"the replica answering this request failed "
                                   f"({type(e).__name__}); retry", "replica_unavailable")
        headers.pop("content-length", None)
        return Response(b"".join(chunks), status_code=status, headers=headers)


async def _body_chunks(stream):
    """A stream's chunks; a replica lost midway ends it with an error event, as a generation
    that fails midway ends a single server's stream."""
    from ray.exceptions import RayError

    try:
        async for _, chunk, _more in stream:
            yield chunk
    except RayError as e:
        error = ApiError(503, f"the replica answering this stream failed ({type(e).__name__})",
                         code="replica_unavailable")
        yield f"data: {json.dumps(error.body())}\n\n".encode()
    finally:  # the client went away: the replica's app cancels its sequences
        stream.cancel()


def build_app(config: ServeConfig, replicas: int, replica_cpus: float = 1.0,
              replica_gpus: float = 0.0, env: dict | None = None):
    """The Ray Serve application: `replicas` Replicas behind one Ingress."""
    from ray import serve

    limits = config.limits
    runtime_env = {"env_vars": env} if env else None

    class LorakitReplica(Replica):
        # Serve keeps as many adapter names per replica as the replica's CPU tier holds adapters.
        @serve.multiplexed(max_num_models_per_replica=config.max_cpu_loras)
        async def held_adapter(self, name: str) -> str:
            return await self.adapter(name)

    replica = serve.deployment(
        LorakitReplica, name="Replica", num_replicas=replicas,
        # The engine queues and answers 503 itself once full: Serve hands it what it can hold.
        max_ongoing_requests=limits.max_concurrent + limits.max_queue,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus,
                           **({"runtime_env": runtime_env} if runtime_env else {})},
        health_check_period_s=2, graceful_shutdown_timeout_s=5)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1,
                               max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(config), config.model, limits.max_body_bytes)


def replica_env() -> dict:
    """What replicas must share with this process: where the registry is (LORAKIT_HOME) and
    that no model hub is reached."""
    from lorakit.paths import lorakit_home

    return {"LORAKIT_HOME": str(Path(lorakit_home()).resolve()),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


def start(config: ServeConfig, replicas: int, address: str | None = None,
          replica_cpus: float = 1.0, replica_gpus: float = 0.0) -> str:
    """Start (or update) the application on Ray and return its URL; Serve's HTTP proxy listens
    on config.host:config.port. Returns once every replica is up."""
    from lorakit.cluster import connect

    connect(address, what="lorakit serve --replicas")
    from ray import serve

    config.adapters_root = str(Path(config.adapters_root).resolve())
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config, replicas, replica_cpus, replica_gpus, replica_env()),
              name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def serve_on_ray(config: ServeConfig, replicas: int, address: str | None = None,
                 replica_cpus: float = 1.0, replica_gpus: float = 0.0) -> int:
    """`lorakit serve --replicas N`: serve until Ctrl-C or SIGTERM, then delete the application."""
    from lorakit.errors import ConfigError

    if replicas < 1:
        raise ConfigError(f"--replicas: got {replicas} (expected >= 1)")
    if config.resolved_api_key() is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {config.host} without an API key (set api_key or LORAKIT_API_KEY)")
    url = start(config, replicas, address, replica_cpus, replica_gpus)
    print(f"serving {config.model} on {replicas} Ray Serve replica(s) at {url}")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        from ray import serve

        serve.delete(APP_NAME)
    return 0
