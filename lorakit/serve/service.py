"""`Service`: the served base, its adapters and the engine, as the HTTP layer sees them.

Built once per server (`build_service` loads the base through `lorakit.models.load_base`;
`Service.from_model` wraps an already loaded model, which is what the tests do). It resolves a
request's `model` field to the base or an adapter, turns prompts and chat messages into token
ids (the tokenizer's chat template for chat), and runs the admin operations: register, load,
unload, pin, remove. Anything touching adapter slots runs on the engine thread (`Engine.call`).
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import AdapterError, ModelLoadError
from lorakit.adapters.check import BaseModules
from lorakit.serve.cache import AdapterCache
from lorakit.serve.config import ServeConfig
from lorakit.serve.engine import Engine
from lorakit.serve.grammar import GrammarCompiler
from lorakit.serve.layer import resident_bytes, wrap_for_serving
from lorakit.serve.packed import pack_linear_weights
from lorakit.serve.prefix import PrefixCache
from lorakit.serve.protocol import ApiError, shown
from lorakit.serve.registry import AdapterRecord, AdapterRegistry, check_name, resolve_under


def _check_batch_kv(model, tokenizer, base_name: str) -> None:
    """Refuse to serve a model the engine's KV cache would answer wrongly (another transformers
    version or model family than `BatchKV` was tested with); the check runs on the model."""
    from lorakit.serve.kvcache import TESTED_TRANSFORMERS, batch_kv_mismatch

    mismatch = batch_kv_mismatch(model, tokenizer.pad_token_id or 0)
    if mismatch:
        import transformers

        raise ModelLoadError(
            f"{base_name}: lorakit's serving KV cache does not decode this model as a plain "
            f"forward does under transformers {transformers.__version__} ({mismatch}); it was "
            f"tested with transformers {TESTED_TRANSFORMERS}: install the versions in "
            "requirements.lock")


class Service:
    def __init__(self, model, tokenizer, config: ServeConfig, base_name: str,
                 registry: AdapterRegistry | None = None):
        self.config = config
        self.base_name = base_name
        self.tokenizer = tokenizer
        self.identity = getattr(model, "lorakit_identity", None) or {"name": base_name}
        self.adapters_root = Path(config.adapters_root).resolve()
        self.adapters_root.mkdir(parents=True, exist_ok=True)
        self.registry = registry or AdapterRegistry()
        _check_batch_kv(model, tokenizer, base_name)
        batch, layers = wrap_for_serving(model, config.target_modules, config.max_loras,
                                         config.max_lora_rank)
        self.slot_bytes = resident_bytes(layers)
        self.packed_layers = pack_linear_weights(model) if config.pack_weights else 0
        self.cache = AdapterCache(layers, self.registry, self.identity, config.max_loras,
                                  config.max_cpu_loras, config.max_lora_rank, self.adapters_root,
                                  base_linears=BaseModules.of(model).linears)
        prefix = (PrefixCache(config.prefix_cache_mb * 2**20, config.prefix_block)
                  if config.prefix_cache_mb else None)
        self.engine = Engine(model, tokenizer, batch, self.cache,
                             max_running=config.limits.max_concurrent,
                             max_waiting=config.limits.max_queue, prefix_cache=prefix)
        self.vocab_size = len(tokenizer)
        self.grammar = GrammarCompiler(tokenizer, self.engine.eos_ids)  # response_format, tools

    @classmethod
    def from_model(cls, model, tokenizer, config: ServeConfig, base_name: str | None = None,
                   registry: AdapterRegistry | None = None) -> Service:
        return cls(model, tokenizer, config, base_name or config.model, registry)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    # -- models ------------------------------------------------------------------------------

    def fits_base(self, rec: AdapterRecord) -> bool:
        want = self.identity.get("weights_sha256")
        return not (want and rec.base_weights_sha256 and rec.base_weights_sha256 != want)

    def models(self) -> list[dict]:
        """The /v1/models entries: the base, then every registered adapter that fits it."""
        base = {"id": self.base_name, "object": "model", "created": 0, "owned_by": "lorakit",
                "root": self.base_name, "parent": None}
        adapters = [{"id": r.name, "object": "model", "created": int(r.created or 0),
                     "owned_by": "lorakit", "root": r.path, "parent": self.base_name}
                    for r in self.registry.list() if r.name != self.base_name and self.fits_base(r)]
        return [base] + adapters

    def resolve_model(self, name: str) -> str | None:
        """None for the base, the adapter name otherwise; 404 when neither exists."""
        if name == self.base_name:
            return None
        missing = ApiError(404, f"The model `{shown(name)}` does not exist.", param="model",
                           code="model_not_found")
        try:
            check_name(name)
        except AdapterError:
            raise missing from None
        if self.registry.get(name) is None:
            try:
                if not resolve_under(self.adapters_root, name).is_dir():
                    raise missing
            except AdapterError:
                raise missing from None
        if name not in self.cache.cpu:
            # Load before answering, so a bad adapter is a clean 400 even for a stream.
            try:
                self.engine.call(lambda: self.cache.load_cpu(name))
            except AdapterError as e:
                raise ApiError(400, f"adapter `{name}` cannot be loaded: {e}", param="model",
                               code="adapter_load_failed") from None
        return name

    # -- prompts -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} outside the vocabulary "
                               f"(0..{self.vocab_size - 1})", param="prompt")
            return list(prompt)
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The chat template's prompt; with `tools`, the family's own tool template where the
        template takes `tools=`, else lorakit/serve/tools.py's fallback."""
        from lorakit.serve.tools import chat_template_args

        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model {self.base_name} has no chat template; use "
                           "/v1/completions", param="messages")
        messages, extra = chat_template_args(self.tokenizer, messages, tools)
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, **extra)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        limit = self.config.limits.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise ApiError(413, f"the prompt has {len(prompt_ids)} tokens, above this server's "
                           f"limit of {limit}", param="prompt", code="prompt_too_long")
        if len(prompt_ids) + max_tokens > self.engine.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.engine.max_model_len} "
                           f"tokens; the prompt ({len(prompt_ids)}) plus max_tokens ({max_tokens}) "
                           "exceeds it", param="max_tokens", code="context_length_exceeded")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")

    # -- admin -------------------------------------------------------------------------------

    def register(self, name: str, path: str | None = None, replace: bool = False,
                 pin: bool = False) -> AdapterRecord:
        """Check the adapter under the adapters root against the base, then record it."""
        try:
            check_name(name)
            full = resolve_under(self.adapters_root, path or name)
            if not full.exists() and not full.is_symlink():  # nothing there: not found, not bad
                raise ApiError(404, f"adapter `{name}`: no folder `{shown(path or name)}` under "
                               "the adapters root", param="path" if path else "name",
                               code="adapter_not_found")
            files = self.cache.open(full, name)  # the one checker, against the served base
        except AdapterError as e:
            raise ApiError(400, str(e), code="adapter_rejected") from None
        if name == self.base_name:
            raise ApiError(400, f"`{name}` is the base model's name", param="name")
        if self.registry.get(name) is not None:
            if not replace:
                raise ApiError(409, f"adapter `{name}` is already registered (pass replace: true)",
                               code="adapter_exists")
            self.unload(name)
        rec = self.registry.add(name, full, files, replace=True)
        if pin:
            self.engine.call(lambda: self.cache.set_pinned(name, True))
            rec.pinned = True
        return rec

    def _registered(self, name: str) -> AdapterRecord:
        rec = self.registry.get(name) if isinstance(name, str) else None
        if rec is None:
            raise ApiError(404, f"adapter `{name}` is not registered", code="model_not_found")
        return rec

    def load(self, name: str, pin: bool = False) -> dict:
        self._registered(name)
        try:
            self.engine.call(lambda: self.cache.load_cpu(name))
            if pin:
                self.engine.call(lambda: self.cache.set_pinned(name, True))
        except AdapterError as e:
            raise ApiError(400, str(e), code="adapter_load_failed") from None
        return self.status(name)

    def unload(self, name: str) -> dict:
        self._registered(name)
        try:
            self.engine.call(lambda: self.cache.unload(name))
        except AdapterError as e:
            raise ApiError(409, str(e), code="adapter_in_use") from None
        return self.status(name)

    def set_pinned(self, name: str, pinned: bool) -> dict:
        self._registered(name)
        self.engine.call(lambda: self.cache.set_pinned(name, pinned))
        return self.status(name)

    def remove(self, name: str) -> None:
        self.unload(name)
        self.registry.remove(name)

    def snapshot(self) -> dict:
        return self.engine.call(self.cache.snapshot)

    def status(self, name: str) -> dict:
        rec = self._registered(name)
        snap = self.snapshot()
        return {**rec.to_json(), "slot": snap["slots"].get(name),
                "cpu_resident": name in snap["cpu_resident"], "fits_base": self.fits_base(rec),
                "error": rec.error or snap["errors"].get(name)}


def build_service(config: ServeConfig) -> Service:
    """Load the configured base model and wrap it for serving."""
    from lorakit.device import resolve_device, resolve_dtype
    from lorakit.models import load_base

    registry = AdapterRegistry()  # a corrupt registry stops the start before the model loads
    device = resolve_device(config.device)
    model, tokenizer = load_base(config.model, dtype=resolve_dtype(config.dtype, device), device=device)
    if config.quantize_base == "nf4":  # the base QLoRA adapters were trained on
        from lorakit.lora.quant import quantize_base_nf4

        quantize_base_nf4(model)
    model.eval()
    return Service.from_model(model, tokenizer, config, base_name=config.model, registry=registry)
