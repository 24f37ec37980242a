"""Multi-adapter serving: one base model, many LoRA adapters in each batch, an OpenAI-style API.

layer.py (stacked-slot `MultiLoraLinear`), engine.py (continuous batching), kvcache.py,
sampling.py, lru.py + cache.py (disk -> CPU -> slot adapter tiers), registry.py (SQLite),
config.py (`ServeConfig`), protocol.py, service.py, app.py (FastAPI routes, `serve`),
metrics.py, cli_adapters.py (`lorakit adapters add|list|remove`). Heavy imports (FastAPI,
uvicorn) happen inside the functions that need them.
"""

from lorakit.serve.cache import AdapterCache, UnknownAdapter
from lorakit.serve.config import Limits, ServeConfig, build_serve_config, load_serve_config
from lorakit.serve.engine import Engine, Overloaded, Request
from lorakit.serve.layer import MultiLoraLinear, SlotBatch, reference_forward, wrap_for_serving
from lorakit.serve.registry import AdapterRecord, AdapterRegistry
from lorakit.serve.sampling import SamplingParams


def serve(config: ServeConfig) -> int:
    """`lorakit serve`: load `config.model` and answer HTTP on config.host:config.port."""
    from lorakit.serve.app import serve as _serve

    return _serve(config)


__all__ = [
    "AdapterCache", "AdapterRecord", "AdapterRegistry", "Engine", "Limits", "MultiLoraLinear",
    "Overloaded", "Request", "SamplingParams", "ServeConfig", "SlotBatch", "UnknownAdapter",
    "build_serve_config", "load_serve_config", "reference_forward", "serve", "wrap_for_serving",
]
