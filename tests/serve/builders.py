"""Helpers for the serve tests: adapters built in code, a served tiny model, and the references.

Adapters start with B != 0 (random, seeded, large) so each one changes the greedy answer; the
tests assert that the answers of different adapters differ, so a mix-up between rows cannot pass.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lorakit.adapters.check import BaseModules
from lorakit.adapters.io import load_adapter, save_adapter
from lorakit.lora import LoraConfig, inject, lora_layers, merge_and_unload
from lorakit.serve.cache import AdapterCache
from lorakit.serve.engine import Engine
from lorakit.serve.layer import wrap_for_serving
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.sampling import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["the quick brown fox", "is this bike still available? can you do 50",
           "hello", "what colour is it and how big is the table"]


def make_adapter(base, out_dir: str | Path, seed: int, r: int = 4, alpha: float = 8.0,
                 targets=("q_proj", "v_proj", "down_proj"), b_std: float = 0.6,
                 identity: dict | None = None) -> Path:
    """A LoRA adapter for `base` with random A and B (seeded), saved in PEFT format."""
    model = copy.deepcopy(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets))
    inject(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * b_std)
    return save_adapter(model, cfg, out_dir, base_identity=identity or {"name": "tiny-llama"})


def make_dora_adapter(base, out_dir: str | Path, seed: int = 4) -> Path:
    """A DoRA adapter (r=4 on q, v, down) with random B and magnitudes moved off their init."""
    from tests.lora.test_layer import randomize_b

    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    model = copy.deepcopy(base)
    inject(model, cfg)
    randomize_b(model, seed=seed, scale=0.6)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(layer.out_features, generator=g))
    return save_adapter(model, cfg, out_dir, base_identity={"name": "tiny-llama"})


def merged_model(base, adapter_dir: str | Path | None):
    """A copy of `base` with the adapter merged in (or the plain base when None)."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        merge_and_unload(model)
    return model.eval()


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens by re-running the whole sequence each step: no cache, no padding, batch 1."""
    ids = list(prompt_ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
    return out


def served(base, tokenizer, root: Path, max_loras: int = 4, max_cpu_loras: int = 8,
           max_lora_rank: int = 8, max_running: int = 64, targets=TARGETS, identity=None,
           prepare=None, prefix_cache=None):
    """(engine, cache, registry) around a copy of `base` (passed to `prepare` first, e.g. to
    quantize it), registry under `root`."""
    model = copy.deepcopy(base)
    if prepare is not None:
        prepare(model)
    if identity is not None:
        model.lorakit_identity = identity
    batch, layers = wrap_for_serving(model, list(targets), max_loras, max_lora_rank)
    registry = AdapterRegistry(root / "adapters.sqlite")
    cache = AdapterCache(layers, registry, identity, max_loras, max_cpu_loras, max_lora_rank,
                         adapters_root=root, base_linears=BaseModules.of(model).linears)
    engine = Engine(model, tokenizer, batch, cache, max_running=max_running,
                    prefix_cache=prefix_cache)
    return engine, cache, registry


def http_service(base, tokenizer, tmp_path: Path, adapters: int = 3, registered: int | None = None,
                 max_loras: int = 2, max_cpu_loras: int = 3, api_key: str | None = None,
                 **limits):
    """A `Service` over a copy of `base` with `adapters` adapters ad0.. under tmp_path/adapters
    (the first `registered` of them registered, default all), for `ServerThread(create_app(..))`."""
    from lorakit.serve.config import Limits, ServeConfig
    from lorakit.serve.service import Service

    root = tmp_path / "adapters"
    for i in range(adapters):
        make_adapter(base, root / f"ad{i}", seed=20 + i)
    limits = {"max_body_bytes": 50_000, "max_prompt_tokens": 64, "max_tokens": 32,
              "default_max_tokens": 8, "max_n": 2, "max_queue": 256, **limits}
    config = ServeConfig(model="tiny-base", adapters_root=str(root), max_loras=max_loras,
                         max_cpu_loras=max_cpu_loras, max_lora_rank=8, target_modules=TARGETS,
                         api_key=api_key, limits=Limits(**limits))
    service = Service.from_model(copy.deepcopy(base), tokenizer, config,
                                 registry=AdapterRegistry(tmp_path / "reg.sqlite"))
    for i in range(adapters if registered is None else registered):
        service.registry.add(f"ad{i}", root / f"ad{i}")
    return service


def greedy(n: int) -> SamplingParams:
    """Exactly n greedy tokens (end of turn ignored)."""
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run_all(engine, reqs):
    """Step an engine that was not started until every request is done."""
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    return reqs
