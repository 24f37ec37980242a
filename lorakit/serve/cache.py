"""`AdapterCache`: adapters on demand, disk -> CPU (LRU, `max_cpu_loras`) -> slots (`max_loras`).

The two tiers follow vLLM's `LRUCacheWorkerLoRAManager` / `LRUCacheLoRAModelManager`: a request
for an adapter that is not in a slot takes a free slot, or evicts the least recently used slot
that no running request holds and that is not pinned; the weights come from the CPU tier when
they are there (a hit) and from disk otherwise (a miss), and the CPU tier evicts its own least
recently used adapter. When every slot is held by running requests, `acquire` returns None and
the scheduler leaves the request queued until one is released.

Every adapter is read by the one adapter checker (`lorakit.adapters.check.open_adapter`, the
same the CLI uses) against the served base before it reaches a slot: base weights hash (when both
sides know it), rank <= `max_lora_rank`, every tensor naming a served layer with the right shape
(DoRA magnitudes included), the config's targets, and files inside the adapters root for adapters
kept there. A bad adapter raises `AdapterError` with the reason, which is kept for the admin
listing (`errors`); nothing else is disturbed.

Only the engine thread calls the mutating methods (slots are written between forward passes);
`snapshot` is safe to read from other threads for /metrics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.check import AdapterFiles, BaseModules, open_adapter
from lorakit.errors import AdapterError
from lorakit.lora.inject import PEFT_PREFIX
from lorakit.serve.layer import MultiLoraLinear
from lorakit.serve.lru import LruTier, TierFull
from lorakit.serve.registry import AdapterRecord, AdapterRegistry, check_name, resolve_under


class UnknownAdapter(AdapterError):
    """No adapter of that name is registered or found under the adapters root."""


@dataclass
class CpuAdapter:
    """One adapter's checked weights in host memory, keyed by served module name."""

    name: str
    rank: int  # the largest module rank (rank_pattern may give modules their own)
    # module -> (A (r, d_in), B (d_out, r), scaling, DoRA magnitude (d_out,) or None); scaling
    # per module, as rank/alpha patterns say
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]
    nbytes: int


class AdapterCache:
    def __init__(self, layers: dict[str, MultiLoraLinear], registry: AdapterRegistry,
                 base_identity: dict | None, max_loras: int, max_cpu_loras: int,
                 max_lora_rank: int, adapters_root: str | Path | None = None,
                 base_linears: dict[str, tuple[int, int]] | None = None):
        """`base_linears`: (d_in, d_out) of every linear layer of the served base by name
        (`BaseModules.of(model).linears`), so an adapter's config selects modules as it would on
        the whole base; default: the served layers only."""
        if max_cpu_loras < max_loras:
            raise AdapterError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})")
        self.layers = layers
        self.registry = registry
        self.base_identity = base_identity or {}
        self.max_lora_rank = max_lora_rank
        self.adapters_root = Path(adapters_root).resolve() if adapters_root else None
        linears = base_linears or {n: (l.in_features, l.out_features) for n, l in layers.items()}
        self.base = BaseModules(linears, served=frozenset(layers), identity=self.base_identity,
                                max_rank=max_lora_rank)
        self.errors: dict[str, str] = {}  # adapter name -> why its last load failed
        self.cpu = LruTier(max_cpu_loras)
        self.slots = LruTier(max_loras)
        self._cpu: dict[str, CpuAdapter] = {}
        self.slot_of: dict[str, int] = {}
        self._loads = itertools.count(1)
        self._slot_load: dict[str, int] = {}  # which load put each slotted adapter's weights there
        self._free_slots = list(range(max_loras))
        self.disk_loads = 0

    # -- checks -------------------------------------------------------------------------------

    def root_for(self, path: str | Path) -> Path | None:
        """The adapters root when `path` lies in it (its files must stay inside), else None: an
        adapter registered from the command line elsewhere is a trusted local path."""
        root = self.adapters_root
        return root if root is not None and (Path(path) == root or root in Path(path).parents) else None

    def open(self, path: str | Path, name: str) -> AdapterFiles:
        """The adapter at `path` checked against the served base (`open_adapter`), or an
        `AdapterError` naming the adapter."""
        try:
            return open_adapter(path, self.base, root=self.root_for(path))
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None

    def to_cpu(self, files: AdapterFiles, name: str) -> CpuAdapter:
        """The checked adapter's weights by served module, with each module's scaling."""
        cfg = files.config
        weights = {m: (*(t.contiguous() for t in files.lora_pair(m)), cfg.scaling_for(m),
                       files.magnitude(m)) for m in files.modules()}
        nbytes = sum(t.numel() * t.element_size() for m in files.modules() for t in
                     (*files.lora_pair(m), files.magnitude(m)) if t is not None)
        return CpuAdapter(name, files.rank, weights, nbytes)

    def record(self, name: str) -> AdapterRecord:
        """The registry row for `name`; an unregistered name found as a directory under the
        adapters root is registered on first use (vLLM's filesystem resolver does the same)."""
        rec = self.registry.get(name)
        if rec is not None:
            return rec
        check_name(name)
        if self.adapters_root is not None:
            path = resolve_under(self.adapters_root, name)
            if path.is_dir():
                return self.registry.add(name, path, self.open(path, name))
        raise UnknownAdapter(f"the model {name!r} does not exist (not the base and not a "
                             "registered adapter)")

    # -- tiers --------------------------------------------------------------------------------

    def load_cpu(self, name: str) -> CpuAdapter:
        """The adapter's weights from the CPU tier, reading them from disk on a miss."""
        if self.cpu.touch(name):
            return self._cpu[name]
        rec = self.record(name)
        try:
            adapter = self.to_cpu(self.open(rec.path, name), name)
        except AdapterError as e:  # e.g. the files changed on disk since it was registered
            self.errors[name] = str(e)
            raise
        self.errors.pop(name, None)
        self.disk_loads += 1
        try:
            evicted = self.cpu.add(name)
        except TierFull:
            raise AdapterError(f"cannot load adapter {name!r}: all {self.cpu.capacity} CPU cache "
                               "entries are pinned (unpin one or raise max_cpu_loras)") from None
        if evicted is not None:
            del self._cpu[evicted]
        self._cpu[name] = adapter
        if rec.pinned:
            self.cpu.pin(name)
        return adapter

    def acquire(self, name: str) -> int | None:
        """A slot holding `name` for one running request, or None while every slot is busy.

        Raises `AdapterError` (or `UnknownAdapter`) when the adapter cannot be served at all.
        """
        if self.slots.touch(name):
            self.slots.acquire(name)
            return self.slot_of[name]
        if len(self.slots) >= self.slots.capacity and self.slots.victim() is None:
            return None
        adapter = self.load_cpu(name)
        evicted = self.slots.add(name)
        if evicted is not None:
            slot = self.slot_of.pop(evicted)
            self._slot_load.pop(evicted, None)
            for layer in self.layers.values():
                layer.reset_lora(slot)
        else:
            slot = self._free_slots.pop(0)
        try:
            for module, (a, b, scaling, magnitude) in adapter.weights.items():
                self.layers[module].set_lora(slot, a, b, scaling, magnitude)
        except BaseException as e:  # leave the slot empty and the tiers as if it never came
            for layer in self.layers.values():
                layer.reset_lora(slot)
            self.slots.remove(name)
            self._free_slots.append(slot)
            self.cpu.remove(name)
            self._cpu.pop(name, None)
            self.errors[name] = f"adapter {name!r}: cannot be put in a slot ({e})"
            raise
        self.slot_of[name] = slot
        self._slot_load[name] = next(self._loads)
        if self.cpu.pinned(name):
            self.slots.pin(name)
        self.slots.acquire(name)
        return slot

    def release(self, name: str) -> None:
        self.slots.release(name)

    def weights_key(self, name: str) -> tuple[str, int]:
        """Names the weights `name`'s slot holds now: its name and the load that wrote them, new
        each time the adapter enters a slot (the prefix cache keys keys and values by it)."""
        return name, self._slot_load[name]

    def unload(self, name: str) -> bool:
        """Drop `name` from both tiers; refused while running requests use it."""
        if self.slots.in_use(name):
            raise AdapterError(f"adapter {name!r} is in use by {self.slots.in_use(name)} running "
                               "request(s); retry when they finish")
        was = name in self.slots or name in self.cpu
        if name in self.slots:
            slot = self.slot_of.pop(name)
            self._slot_load.pop(name, None)
            for layer in self.layers.values():
                layer.reset_lora(slot)
            self._free_slots.append(slot)
            self.slots.remove(name)
        self.cpu.remove(name)
        self._cpu.pop(name, None)
        return was

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.registry.set_pinned(name, pinned)
        for tier in (self.cpu, self.slots):
            if name in tier:
                tier.pin(name) if pinned else tier.unpin(name)

    # -- reporting ----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Counters and residency for /metrics and the admin routes."""
        cpu = {n: self._cpu[n].nbytes for n in list(self._cpu)}
        return {
            "slot_hits": self.slots.hits, "slot_misses": self.slots.misses,
            "slot_evictions": self.slots.evictions,
            "cpu_hits": self.cpu.hits, "cpu_misses": self.cpu.misses,
            "cpu_evictions": self.cpu.evictions, "disk_loads": self.disk_loads,
            "cpu_resident": cpu,
            "slots": dict(self.slot_of),
            "max_loras": self.slots.capacity, "max_cpu_loras": self.cpu.capacity,
            "errors": dict(self.errors),
        }
