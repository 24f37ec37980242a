"""Distributed training on one machine: what N ranks cost and save against one process.

    .venv/bin/python benchmarks/distributed.py [--steps 20] [--rounds 3] [--ranks 2]

Two measurements, each system in its own processes, run side by side in interleaved rounds (this
machine's speed drifts by 10-30% over minutes, so only runs made together compare):

  1. Throughput, LoRA on the bundled model (SmolLM2-135M, bf16 on the CPU, r=16, all linear
     layers, the bundled intents, global batch 16): one process with `train.threads` = N against
     `torchrun --nproc_per_node N` with one thread per rank (DDP). Same threads in total, same
     batches, same update. On a CPU no gain is expected (the ranks share the cores and add an
     all-reduce); the point of the run is that the cost is small and the losses agree.
  2. Memory, full fine-tuning of the bundled model in fp32: DDP against FSDP2 on N ranks, peak
     memory per rank (RSS on the CPU, `torch.cuda.max_memory_allocated` on a GPU). DDP keeps the
     whole model, its gradients and both AdamW moments on every rank; FSDP2 keeps 1/N of each,
     plus one gathered block at a time.

Tokens/s count the input tokens of steps 2..last over their wall time (the first step is
warm-up). Writes benchmarks/results/distributed.json and prints a table with the ratios.
Run it alone on the machine: other work on the cores makes the timings meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "distributed.json"
DATA = ROOT / "lorakit" / "examples" / "intents_train.jsonl"


def write_config(folder: Path, steps: int, threads: int, **train) -> Path:
    method = train.pop("method", "lora")
    raw = {
        "model": {"name": "smollm2-135m-instruct", "dtype": "bf16" if method == "lora" else "fp32",
                  "device": "auto"},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": {"train": str(DATA), "max_seq_len": 256},
        "train": {"output_dir": str(folder / "run"), "method": method, "batch_size": 16,
                  "max_steps": steps, "lr": 1e-4, "threads": threads, "save_every": 0,
                  "eval_every": 0, **train},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    return folder / "run.yaml"


def launch(config: Path, ranks: int) -> list[dict]:
    """Train `config` on `ranks` processes (1: no torchrun); each rank's peak memory."""
    worker = [str(Path(__file__).resolve()), "--worker", str(config)]
    cmd = [sys.executable, *worker] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(ranks), *worker]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(config.parent.glob("rank*.json"))]


def throughput(run: Path) -> tuple[float, list[float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]
    tps = (last["input_tokens"] - first["input_tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    return tps, [r["loss"] for r in rows]


def worker(config: str) -> None:
    """One rank (or the one process): train, then record this process's peak memory."""
    from lorakit.cli import main

    code = main(["train", config])
    import torch

    rank = int(os.environ.get("RANK", "0"))
    peak = {"rank": rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (Path(config).parent / f"rank{rank}.json").write_text(json.dumps(peak))
    sys.exit(code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)

    n = args.ranks
    results: dict[str, list] = {"one_process": [], "ddp": [], "ddp_full": [], "fsdp_full": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            # Alternate which system goes first, so drift does not favour one.
            order = [("one_process", 1, n, {}), ("ddp", n, 1, {"distributed": "ddp"})]
            order += [("ddp_full", n, 1, {"distributed": "ddp", "method": "full"}),
                      ("fsdp_full", n, 1, {"distributed": "fsdp", "method": "full"})]
            if rnd % 2:
                order = order[1::-1] + order[:1:-1]
            for name, ranks, threads, train in order:
                folder = Path(tmp) / f"{name}-{rnd}"
                peaks = launch(write_config(folder, args.steps, threads, **train), ranks)
                tps, losses = throughput(folder / "run")
                results[name].append({"tokens_per_s": tps, "losses": losses,
                                      "peak_rss_mb": max(x["peak_rss_mb"] for x in peaks),
                                      "cuda_peak_mb": max((x.get("cuda_peak_mb", 0) for x in peaks),
                                                          default=0)})
                print(f"round {rnd + 1} {name:12s} {tps:8.0f} tok/s  peak/rank "
                      f"{results[name][-1]['peak_rss_mb']:6.0f} MB RSS", flush=True)

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    summary = {
        "ranks": n, "steps": args.steps, "rounds": args.rounds,
        "tokens_per_s": {k: med(k, "tokens_per_s") for k in results},
        "ddp_vs_one_process": med("ddp", "tokens_per_s") / med("one_process", "tokens_per_s"),
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in
                                 zip(results["ddp"][0]["losses"], results["one_process"][0]["losses"])),
        "peak_rss_mb_per_rank": {k: med(k, "peak_rss_mb") for k in ("ddp_full", "fsdp_full")},
        "cuda_peak_mb_per_rank": {k: med(k, "cuda_peak_mb") for k in ("ddp_full", "fsdp_full")},
        "runs": results,
    }
    summary["fsdp_vs_ddp_memory"] = (summary["peak_rss_mb_per_rank"]["fsdp_full"]
                                     / summary["peak_rss_mb_per_rank"]["ddp_full"])
    print(f"\nLoRA, {n} ranks x 1 thread vs 1 process x {n} threads: "
          f"{summary['tokens_per_s']['ddp']:.0f} / {summary['tokens_per_s']['one_process']:.0f} "
          f"tok/s = {summary['ddp_vs_one_process']:.2f}x; losses agree to "
          f"{summary['max_loss_rel_diff']:.1e} (relative)")
    print(f"full fine-tune fp32, peak per rank: DDP {summary['peak_rss_mb_per_rank']['ddp_full']:.0f} MB,"
          f" FSDP2 {summary['peak_rss_mb_per_rank']['fsdp_full']:.0f} MB RSS "
          f"(= {summary['fsdp_vs_ddp_memory']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
