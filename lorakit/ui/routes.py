"""The web UI's JSON routes (`/ui/api/...`) and its page (`/ui/`), mounted on the serving app.

`mount_ui(app, service, runs_root)` adds them to the FastAPI app of lorakit/serve/app.py, so they
share its API key check, its error body (`{"error": {"message", "type", "param", "code"}}`), its
limits and its engine. The page's chat goes through the server's own `/v1/chat/completions` and
its adapter buttons through `/admin/adapters...`; the routes here add what only the page needs:
runs and their processes, the form's validation and memory estimate, evaluation reports, sweeps
and `check-adapter` findings. Every path the page names passes `Roots.resolve` first.

The page (index.html and its script and style, package data in lorakit/ui/static/) holds no data
and is served without the key, as `/health` is; every route that reads or changes anything needs
the key when one is set, and the page asks for it on the first 401.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import Request  # a module name: FastAPI resolves the routes' annotations here

from lorakit.errors import LorakitError
from lorakit.eval.run import json_ready
from lorakit.serve.protocol import ApiError
from lorakit.ui.roots import Roots
from lorakit.ui.runs import RunManager

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_FILE_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}  # what /ui/api/file serves
MAX_SCAN_DEPTH = 4  # folders below the runs root searched for reports and sweeps


class PageShell:
    """ASGI middleware answering GET /ui, /ui/ and /ui/static/<file> from the package's static
    folder before the key check (the page holds no data); everything else passes through."""

    def __init__(self, app):
        self.app = app
        self.files = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD") or \
                not (path in ("/ui", "/ui/") or path.startswith("/ui/static/")):
            await self.app(scope, receive, send)
            return
        from starlette.responses import PlainTextResponse, RedirectResponse, Response

        if path == "/ui":
            response = RedirectResponse("/ui/")
        else:
            name = "index.html" if path == "/ui/" else path.removeprefix("/ui/static/")
            file = self.files.get(name)
            if file is None:
                response = PlainTextResponse(f"no file {name!r} in the UI", status_code=404)
            else:
                response = Response(file.read_bytes(), media_type=_TYPES[file.suffix],
                                    headers={"cache-control": "no-cache"})
        await response(scope, receive, send)


def _report_inputs(report_path: Path, roots: Roots, rows: int) -> list[str] | None:
    """The user text of each evaluated row, when the report is a run's (its config names the
    eval data) and the data file lies inside the roots; else None (the page shows row numbers)."""
    import yaml

    from lorakit.data.formats import load_examples

    config = report_path.parent.parent / "config.yaml"
    if report_path.parent.name != "eval" or not config.is_file():
        return None
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
        data = roots.resolve((cfg.get("eval") or {}).get("data"), "eval.data")
        examples = load_examples(str(data), system_prompt=(cfg.get("data") or {}).get("system_prompt"))
    except (ApiError, LorakitError, OSError, yaml.YAMLError, AttributeError):
        return None
    max_examples = (cfg.get("eval") or {}).get("max_examples") or 0
    examples = examples[:max_examples] if max_examples else examples
    if len(examples) != rows:
        return None
    return [next((m["content"] for m in reversed(ex.messages[:-1]) if m.get("role") == "user"), "")
            for ex in examples]


def _scan(root: Path, name: str) -> list[Path]:
    """Files called `name` under `root`, at most MAX_SCAN_DEPTH folders down, sorted."""
    found, level = [], [root]
    for _ in range(MAX_SCAN_DEPTH + 1):
        found += [d / name for d in level if (d / name).is_file()]
        level = [c for d in level for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")
                 and not c.is_symlink()]
    return sorted(found)


def _calc_args(cfg: dict, model: str) -> dict:
    """`run_calc` arguments for a run config's sections (the form's fields)."""
    lora, train, data = cfg.get("lora") or {}, cfg.get("train") or {}, cfg.get("data") or {}
    m = cfg.get("model") or {}
    method = train.get("method", "lora")
    if method == "lora":
        method = "qlora" if m.get("quantize_base") == "nf4" else \
            "dora" if lora.get("use_dora") else "lora"
    targets = lora.get("target_modules", ["q_proj", "v_proj"])
    if isinstance(targets, str) and targets != "all-linear" and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return {"model": model, "method": method, "r": lora.get("r", 8), "target_modules": targets,
            "layers_to_train": train.get("layers_to_train", 1), "batch": train.get("batch_size", 16),
            "seq_len": data.get("max_seq_len", 512), "dtype": m.get("dtype", "bf16")}


def mount_ui(app, service, runs_root: str | Path, adapters_root: str | Path | None = None) -> RunManager:
    """Add the UI's routes and page to `app` (create_app's FastAPI app over `service`).

    Returns the RunManager of the training processes the page starts (its `shutdown` stops
    them; `lorakit ui` calls it when the server ends)."""
    from fastapi.responses import FileResponse

    roots = Roots.of(runs_root, adapters_root or service.adapters_root)
    runs = RunManager(roots)
    app.state.ui_runs = runs

    async def body(request: Request) -> dict:
        from lorakit.serve.app import _read_json

        data = await _read_json(request, service.config.limits.max_body_bytes)
        if not isinstance(data, dict):
            raise ApiError(400, "expected a JSON object")
        return data

    @app.get("/ui/api/info")
    def info():
        from lorakit.config import DTYPES, TRAIN_METHODS, RunConfig

        return {"runs_root": str(roots.runs), "adapters_root": str(roots.adapters),
                "base": service.base_name, "defaults": RunConfig().to_dict(),
                "choices": {"model.dtype": list(DTYPES), "train.method": list(TRAIN_METHODS)},
                "limits": {"max_tokens": service.config.limits.max_tokens}}

    @app.get("/ui/api/runs")
    def list_runs():
        return {"data": json_ready(runs.runs())}

    @app.get("/ui/api/runs/{name}")
    def run_detail(name: str):
        return json_ready(runs.detail(name))

    @app.get("/ui/api/runs/{name}/metrics")
    def run_metrics(name: str, since: int = 0):
        from lorakit.ui.runs import read_metrics

        run = roots.run_dir(name)
        rows = read_metrics(run / "metrics.jsonl", max(since, 0))
        return {"since": since, "rows": json_ready(rows), **runs.status(run)}

    @app.post("/ui/api/validate")
    async def validate_form(request: Request):
        data = await body(request)
        cfg = runs.build(data.get("name") or "new-run", data.get("config"),
                         data.get("overrides") or [])
        return {"ok": True, "config": cfg.to_dict()}

    @app.post("/ui/api/calc")
    async def calc(request: Request):
        from starlette.concurrency import run_in_threadpool

        from lorakit.calc.cli import run_calc

        data = await body(request)
        from lorakit.config import parse_override

        cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
        for line in data.get("overrides") or []:
            try:
                section, key, value = parse_override(str(line))
            except LorakitError:
                continue  # the validator reports it beside the estimate
            if isinstance(cfg.setdefault(section, {}), dict):
                cfg[section][key] = value
        model = runs._model_name((cfg.get("model") or {}).get("name", "smollm2-135m-instruct"))
        try:
            return await run_in_threadpool(run_calc, **_calc_args(cfg, model))
        except (LorakitError, TypeError) as e:
            raise ApiError(400, f"calc: {e}", code="invalid_config") from None

    @app.post("/ui/api/runs", status_code=201)
    async def start_run(request: Request):
        from starlette.concurrency import run_in_threadpool

        data = await body(request)
        return json_ready(await run_in_threadpool(runs.start, data.get("name"), data.get("config"),
                                                   data.get("overrides") or []))

    @app.post("/ui/api/runs/{name}/stop")
    def stop_run(name: str):
        return json_ready(runs.stop(name))

    @app.post("/ui/api/runs/{name}/resume")
    def resume_run(name: str):
        return json_ready(runs.resume(name))

    @app.get("/ui/api/reports")
    def reports():
        return {"data": [roots.relative(p) for p in _scan(roots.runs, "report.json")]}

    @app.get("/ui/api/report")
    def report(path: str):
        full = roots.resolve(path, "path")
        if full.name != "report.json" or not full.is_file():
            raise ApiError(404 if full.name == "report.json" else 400,
                           f"path: {path!r} is not a report.json of `lorakit eval` or a run",
                           param="path")
        try:
            data = json.loads(full.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ApiError(400, f"{full}: not a readable report ({e})") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        inputs = _report_inputs(full, roots, rows) if isinstance(rows, int) else None
        return json_ready({"path": roots.relative(full), "report": data, "inputs": inputs})

    @app.get("/ui/api/sweeps")
    def sweeps():
        from lorakit.sweep.results import read_results

        out = []
        for results in _scan(roots.runs, "results.jsonl"):
            plots = results.parent / "plots"
            summary = plots / "summary.md"
            out.append({"path": roots.relative(results), "rows": read_results(results),
                        "summary": summary.read_text() if summary.is_file() else None,
                        "plots": [roots.relative(p) for p in sorted(plots.glob("*.png"))]
                        if plots.is_dir() else []})
        return json_ready({"data": out})

    @app.get("/ui/api/file")
    def file(path: str):
        full = roots.resolve(path, "path")
        if full.suffix not in _FILE_TYPES or not full.is_file():
            raise ApiError(400, f"path: {path!r} is not a plot ({', '.join(_FILE_TYPES)}) inside "
                           "the roots", param="path")
        return FileResponse(full, media_type=_FILE_TYPES[full.suffix])

    @app.get("/ui/api/adapters/{name}/check")
    def check(name: str):
        from lorakit.adapters.portability import check_adapter

        rec = service.registry.get(name)
        if rec is None:
            raise ApiError(404, f"adapter `{name}` is not registered", code="model_not_found")
        path = roots.resolve(str(rec.path), "adapter path")
        try:
            report = check_adapter(path, max_lora_rank=service.config.max_lora_rank)
        except LorakitError as e:
            raise ApiError(400, str(e), code="adapter_rejected") from None
        return {"name": name, "path": str(path), "targets": report.targets,
                "findings": [f.__dict__ for f in report.findings],
                "blocking": len(report.blocking)}

    app.add_middleware(PageShell)
    return runs
