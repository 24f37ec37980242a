"""Ray Serve replicas: throughput and latency of 1 against 2 replicas at concurrency 16.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ray_serve.py [--requests 128] [--tokens 32]

On the bundled SmolLM2-135M-Instruct (or `--model DIR`), with `--adapters` LoRA adapters (r=16,
alpha=32, q_proj and v_proj, random non-zero B) built here and registered in a throwaway
LORAKIT_HOME, the same chat requests (round-robin over the adapters, exactly `--tokens` output
tokens each, greedy) are answered over real HTTP on 127.0.0.1 by

  (a) plain    `lorakit serve` in its own process (no Ray), the engine on its main thread;
  (b) ray-1    `lorakit serve --replicas 1`: one replica behind Ray Serve's proxy and ingress;
  (c) ray-2    `lorakit serve --replicas 2`: two replicas, requests routed by adapter.

Each system gets `--concurrency` closed-loop clients (each sends its next request when the last
one is answered; 16 by default) after a warm-up of one request per adapter, not timed. Each
replica holds `--replica-cpus` CPUs (its torch threads follow). Reported: requests/s, output
tokens/s, p50 and p95 latency, and the ratios (c)/(b) and (b)/(a) of tokens/s. On a machine with
fewer cores than replicas x replica CPUs + 1, the replicas share cores with each other, Ray's
proxy and the clients, and 2 replicas cannot beat 1 by much; the table says what it measured.
Writes benchmarks/results/ray_serve.json. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Is this bike still available?", "Can you do 50 dollars for the sofa?",
    "What condition is the table in, any scratches?", "How big is the wardrobe?",
    "Does the laptop come with a charger?", "Can I pick it up tomorrow evening?",
    "Why are you selling the guitar?", "Is the price negotiable?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_adapters(model_name: str, root: Path, n: int, r: int) -> tuple[str, list[str]]:
    """n adapters for the base in `root`, registered; returns (base name, adapter names)."""
    import torch

    from lorakit.adapters.io import save_adapter
    from lorakit.lora import LoraConfig, inject, lora_layers
    from lorakit.models import load_base
    from lorakit.serve.registry import AdapterRegistry

    base, _ = load_base(model_name, dtype=torch.float32, device="cpu")
    registry = AdapterRegistry()
    names = []
    for i in range(n):
        model = copy.deepcopy(base)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
        inject(model, cfg)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.01)
        name = f"adapter{i:02d}"
        registry.add(name, save_adapter(model, cfg, root / name))
        names.append(name)
    return model_name, names


def wait_healthy(url: str, proc=None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def load(url: str, adapters: list[str], requests: int, concurrency: int, tokens: int) -> dict:
    """`concurrency` closed-loop clients send `requests` chat requests in all."""
    jobs = [(adapters[i % len(adapters)], QUESTIONS[i % len(QUESTIONS)]) for i in range(requests)]
    latencies, replicas, lock = [], {}, threading.Lock()
    cursor = iter(range(requests))

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                model, question = jobs[i]
                start = time.perf_counter()
                r = http.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": question}],
                    "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == tokens
                with lock:
                    latencies.append(time.perf_counter() - start)
                    name = r.headers.get("x-lorakit-replica", "-")
                    replicas[name] = replicas.get(name, 0) + 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return {"requests": requests, "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "tokens_per_s": round(requests * tokens / wall, 1),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(q[18], 3),
            "answered_by": replicas}


def warm_up(url: str, adapters: list[str], tokens: int) -> None:
    load(url, adapters, len(adapters), 1, min(tokens, 4))


def run_plain(args, model: str, adapters: list[str], root: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--port", str(port),
                             f"model={model}", f"adapters_root={root}", f"dtype={args.dtype}",
                             f"max_cpu_loras={max(args.adapters, 4)}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        warm_up(url, adapters, args.tokens)
        return load(url, adapters, args.requests, args.concurrency, args.tokens)
    finally:
        proc.terminate()
        proc.wait(60)


def run_ray(args, model: str, adapters: list[str], root: Path, replicas: int) -> dict:
    from ray import serve

    from lorakit.serve.config import build_serve_config
    from lorakit.serve.ray_serve import APP_NAME, start

    config = build_serve_config({"model": model, "adapters_root": str(root), "dtype": args.dtype,
                                 "max_cpu_loras": max(args.adapters, 4), "port": args.port})
    url = start(config, replicas, replica_cpus=args.replica_cpus)
    try:
        wait_healthy(url)
        warm_up(url, adapters, args.tokens)
        return load(url, adapters, args.requests, args.concurrency, args.tokens)
    finally:
        serve.delete(APP_NAME)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base: bundled name or HF folder")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=None, help="Ray Serve's HTTP port (default: a free one)")
    ap.add_argument("--skip-plain", action="store_true", help="only the Ray Serve runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_serve.json"))
    args = ap.parse_args()
    args.port = args.port or free_port()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-ray-bench-"))
    os.environ["LORAKIT_HOME"] = str(tmp / "home")  # a throwaway registry, for every process
    root = tmp / "adapters"
    model, adapters = build_adapters(args.model, root, args.adapters, args.r)
    cores = os.cpu_count()

    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    results = {}
    if not args.skip_plain:
        results["plain"] = run_plain(args, model, adapters, root)
    for n in (1, 2):
        results[f"ray-{n}"] = run_ray(args, model, adapters, root, n)
    ray.shutdown()

    print(f"\n{args.requests} chat requests, {args.tokens} tokens each, concurrency "
          f"{args.concurrency}, {len(adapters)} adapters, {args.replica_cpus:g} CPU(s) per "
          f"replica, {cores} cores")
    print(f"{'system':8} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}  answered by")
    for name, r in results.items():
        print(f"{name:8} {r['requests_per_s']:7.2f} {r['tokens_per_s']:8.1f} {r['p50_s']:7.3f} "
              f"{r['p95_s']:7.3f}  {r['answered_by']}")
    ratios = {"ray2_over_ray1_tokens_per_s": round(results["ray-2"]["tokens_per_s"]
                                                   / results["ray-1"]["tokens_per_s"], 3)}
    if "plain" in results:
        ratios["ray1_over_plain_tokens_per_s"] = round(results["ray-1"]["tokens_per_s"]
                                                       / results["plain"]["tokens_per_s"], 3)
    print("ratios:", ratios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cores": cores, "results": results,
                               "ratios": ratios}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
