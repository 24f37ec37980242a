"""`/metrics` in the Prometheus text exposition format (version 0.0.4).

Names follow Prometheus' conventions (`_total` for counters, base units: bytes, seconds) and
cover what an operator of a multi-adapter server watches, as vLLM's `/metrics` does: requests by
route and status, prompt and generated tokens, generation throughput over the last 10 s, queue
depth and running sequences, adapter cache hits, misses and evictions per tier, which adapters
are resident and the memory they take, the KV cache size, and prefix cache hits.
"""

from __future__ import annotations

import collections
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpCounters:
    """Requests by (route, status) and their latency sum; updated from the HTTP threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency_sum: collections.Counter[str] = collections.Counter()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency_sum[route] += seconds

    def copy(self) -> tuple[dict, dict]:
        with self._lock:
            return dict(self.requests), dict(self.latency_sum)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(engine, cache_snapshot: dict | None, http: HttpCounters, slot_bytes: int) -> str:
    """The whole exposition text from the engine's counters and the adapter cache's snapshot."""
    w = _Writer()
    requests, latency = http.copy()
    w.metric("lorakit_http_requests_total", "counter", "HTTP requests by route and status code",
             [({"route": r, "status": str(s)}, n) for (r, s), n in sorted(requests.items())])
    w.metric("lorakit_http_request_seconds_sum", "counter", "Total seconds spent answering, by route",
             [({"route": r}, s) for r, s in sorted(latency.items())])
    w.metric("lorakit_sequences_finished_total", "counter",
             "Generated sequences by finish reason (stop, length, cancelled, error)",
             [({"reason": r}, n) for r, n in sorted(engine.finished.items())])
    w.metric("lorakit_prompt_tokens_total", "counter", "Prompt tokens prefilled",
             [({}, engine.prompt_tokens)])
    w.metric("lorakit_generation_tokens_total", "counter", "Tokens generated",
             [({}, engine.generated_tokens)])
    w.metric("lorakit_generation_tokens_per_second", "gauge",
             "Tokens generated per second over the last 10 s", [({}, engine.tokens_per_second())])
    w.metric("lorakit_queue_depth", "gauge", "Sequences waiting to be scheduled",
             [({}, len(engine.waiting))])
    w.metric("lorakit_running_sequences", "gauge", "Sequences in the running batch",
             [({}, len(engine.running))])
    w.metric("lorakit_kv_cache_bytes", "gauge", "Bytes held by the running batch's KV cache",
             [({}, engine.kv.nbytes())])
    prefix = engine.prefix
    if prefix is not None:
        w.metric("lorakit_prefix_cache_hit_tokens_total", "counter",
                 "Prompt tokens whose keys and values came from the prefix cache (of "
                 "lorakit_prompt_tokens_total)", [({}, engine.prefix_hit_tokens)])
        w.metric("lorakit_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache",
                 [({}, prefix.nbytes)])
        w.metric("lorakit_prefix_cache_blocks", "gauge", "Blocks held by the prefix cache",
                 [({}, len(prefix))])
        w.metric("lorakit_prefix_cache_evictions_total", "counter",
                 "Prefix cache blocks evicted (least recently used first)", [({}, prefix.evictions)])
    if cache_snapshot is not None:
        s = cache_snapshot
        for what in ("hits", "misses", "evictions"):
            w.metric(f"lorakit_adapter_cache_{what}_total", "counter",
                     f"Adapter cache {what} by tier (slot: active slots, cpu: host memory)",
                     [({"tier": "slot"}, s[f"slot_{what}"]), ({"tier": "cpu"}, s[f"cpu_{what}"])])
        w.metric("lorakit_adapter_disk_loads_total", "counter", "Adapters read from disk",
                 [({}, s["disk_loads"])])
        w.metric("lorakit_adapters_resident", "gauge", "Adapters resident per tier",
                 [({"tier": "slot"}, len(s["slots"])), ({"tier": "cpu"}, len(s["cpu_resident"]))])
        w.metric("lorakit_adapter_slot", "gauge", "Slot index of each adapter in a slot",
                 [({"adapter": n}, slot) for n, slot in sorted(s["slots"].items())])
        w.metric("lorakit_adapter_memory_bytes", "gauge", "Host memory of each adapter in the CPU tier",
                 [({"adapter": n}, b) for n, b in sorted(s["cpu_resident"].items())])
        w.metric("lorakit_adapter_slot_memory_bytes", "gauge",
                 "Memory of the stacked adapter slots (allocated once for max_loras x max_lora_rank)",
                 [({}, slot_bytes)])
        w.metric("lorakit_adapter_slots", "gauge", "Configured slot and CPU tier capacities",
                 [({"tier": "slot"}, s["max_loras"]), ({"tier": "cpu"}, s["max_cpu_loras"])])
    return w.text()
