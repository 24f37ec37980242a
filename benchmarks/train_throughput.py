"""Training throughput and memory: lorakit against transformers `Trainer` + PEFT, in one run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--batch 16] [--r 16]

Both systems train the same model (SmolLM2-135M-Instruct, the bundled GGUF converted once), the
same LoRA (r=16, alpha=32, all linear layers), on the same examples in the same order, with the
same batch size and number of optimizer steps. The peer is the standard recipe: `get_peft_model`,
`Trainer`, `DataCollatorForSeq2Seq` padding; once in fp32 and once with `bf16=True`. Each system
runs in its own subprocess so its peak RSS is its own. The first optimizer step is warm-up and is
not timed. The script also measures this machine's fp32 and bf16 matmul peak and reports lorakit's
model-FLOPs utilisation, counting 4 x (linear parameters inside the transformer blocks) FLOPs per
valid token (forward 2, backward through the frozen weights 2).

Data: "short" is CLINC150 (real intent queries, from ../shared/data/clinc150 when present, else
the bundled intents), "long" is Alpaca-style rows with 100-300-token answers generated here.
Writes benchmarks/results/train_throughput.json and prints a table with ratios.

    .venv/bin/python benchmarks/train_throughput.py --ablate [--rounds 3] [--steps 8]

measures what each of lorakit's speed switches is worth: lorakit with its defaults, with each
switch off alone, and with all of them off, on the short data, each in its own process, the
variants interleaved round by round (this machine's speed drifts by 10-30% over minutes, more
than some switches are worth, so only runs made side by side compare). Reports the median
tokens/s and peak RSS per variant and their ratios to the defaults; writes
benchmarks/results/train_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"
MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = str(ROOT / "benchmarks" / "results" / "train_throughput.json")


# ----------------------------------------------------------------------------- data
def short_rows(n: int, seed: int = 0) -> list[dict]:
    """Short classification-style chat rows: CLINC150 when present, else the bundled intents."""
    rng = random.Random(seed)
    if CLINC.exists():
        data = json.loads(CLINC.read_text())["train"]
        rng.shuffle(data)
        return [{"instruction": "Classify the intent of this request.", "input": text,
                 "output": intent.replace("_", " ")} for text, intent in data[:n]]
    path = ROOT / "lorakit" / "examples" / "intents_train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rng.shuffle(rows)
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in rows[:n]]


_TOPICS = ["a second-hand road bike", "an oak dining table", "a mid-range laptop", "a winter coat",
           "a set of kitchen knives", "a child's car seat", "a used electric guitar", "a sofa bed",
           "a pair of hiking boots", "a robot vacuum", "a vintage record player", "a camping tent"]
_SENTENCES = [
    "Start by checking {t} in daylight, because small scratches and stains hide under indoor light.",
    "Ask the seller how long they have owned {t} and why they are selling it now.",
    "A fair price for {t} is usually between half and two thirds of the new price, less for visible wear.",
    "If {t} has moving parts, test each of them yourself rather than trusting a description.",
    "Compare the listing with two or three similar ones so you know what the market pays for {t}.",
    "Bring a friend when you collect {t}; it is safer and you get a second opinion on its condition.",
    "Check that {t} comes with its original accessories, manuals and any remaining warranty papers.",
    "Measure the space at home before you buy {t}, since returns are rare on second-hand sales.",
    "Pay only when you have {t} in front of you, and prefer a traceable payment method.",
    "Write down the serial number of {t} if it has one, and check it has not been reported stolen.",
    "Clean {t} with a mild product first; harsh cleaners can damage older finishes.",
    "If the seller will not let you inspect {t}, that alone is a reason to walk away.",
]


def long_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose answers run 100-300 tokens: buying advice assembled from sentences."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(_TOPICS)
        k = rng.randint(5, 14)
        answer = " ".join(s.format(t=topic) for s in rng.sample(_SENTENCES * 2, k))
        rows.append({"instruction": f"Give practical advice for buying {topic} second hand.",
                     "input": "", "output": answer})
    return rows


# ----------------------------------------------------------------------------- systems
def run_lorakit(rows_path: str, steps: int, batch: int, r: int, out_dir: str,
                overrides: list[str] = ()) -> dict:
    from lorakit.config import build_config
    from lorakit.train.loop import train

    cfg = build_config({
        "model": {"name": MODEL, "dtype": "bf16", "device": "cpu"},
        "lora": {"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear"},
        "data": {"train": rows_path, "max_seq_len": 512, "dedupe": False},
        "train": {"output_dir": out_dir, "max_steps": steps, "batch_size": batch, "lr": 2e-4,
                  "warmup_ratio": 0.0, "shuffle": False, "group_by_length": False,
                  "save_every": 0, "keep_checkpoints": 1},
    }, list(overrides))
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "loss" in x]
    first, last = rows[0], rows[-1]
    tokens = last["input_tokens"] - first["input_tokens"]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    return {"tokens_per_s": tokens / seconds, "final_loss": last["loss"], "timed_tokens": tokens,
            "timed_seconds": seconds}


def run_peer(rows_path: str, steps: int, batch: int, r: int, out_dir: str, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from lorakit.data.formats import load_examples
    from lorakit.data.render import encode_example
    from lorakit.models import load_tokenizer, resolve_model_dir

    # The same converted checkpoint lorakit uses, loaded the standard way.
    tokenizer = load_tokenizer(MODEL)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(MODEL)), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    encoded = [encode_example(ex, tokenizer, 512) for ex in load_examples(rows_path)]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0,
                             bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no",
                             report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
                             seed=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=dataset, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    # Valid tokens of steps 2..N (the same batches lorakit times).
    lengths = [len(d["input_ids"]) for d in dataset]
    tokens = sum(lengths[batch:steps * batch])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / (marks[-1] - marks[0]), "final_loss": losses[-1],
            "timed_tokens": tokens, "timed_seconds": marks[-1] - marks[0]}


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of a large square matmul in the given dtype."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def block_linear_params() -> int:
    """Parameters of the linear layers inside the transformer blocks (not embeddings/head)."""
    import torch

    from lorakit.lora.inject import linear_module_names
    from lorakit.models import load_base

    model, _ = load_base(MODEL, dtype=torch.bfloat16, device="cpu")
    return sum(model.get_submodule(n).weight.numel() for n in linear_module_names(model) if n != "lm_head")


# ----------------------------------------------------------------------------- ablation
SWITCHES = {  # each speed switch and the value that turns it off
    "train.padding_free": "false",
    "train.fused_lora": "false",
    "train.lean_activations": "false",
    "train.loss_on_supervised_only": "false",
}


def ablate(args) -> None:
    import statistics

    variants = {"defaults": []}
    variants.update({f"{k}={v}": [f"{k}={v}"] for k, v in SWITCHES.items()})
    variants["all off"] = [f"{k}={v}" for k, v in SWITCHES.items()]
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; expected some of {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants or k == "defaults"}
    rows = short_rows(args.steps * args.batch)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    runs = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, overrides in variants.items():
            res = spawn("lorakit", f.name, args, overrides=args.set + overrides)
            runs[name].append(res)
            print(f"round {round_ + 1}/{args.rounds} {name:36} {res['tokens_per_s']:6.0f} tok/s, "
                  f"peak RSS {res['peak_rss_mb']:5.0f} MB, loss {res['final_loss']:.4f}", flush=True)
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "final_loss": results[0]["final_loss"], "runs": results}
    base = summary["defaults"]
    print(f"\n{'variant':36} {'tok/s':>7} {'x defaults':>10} {'RSS MB':>7} {'x defaults':>10} {'loss':>7}")
    for name, r in summary.items():
        r["speed_vs_defaults"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["rss_vs_defaults"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"{name:36} {r['tokens_per_s']:7.0f} {r['speed_vs_defaults']:10.2f} "
              f"{r['peak_rss_mb']:7.0f} {r['rss_vs_defaults']:10.2f} {r['final_loss']:7.4f}")
    out = Path(args.out).with_name("train_ablation.json") if args.out == DEFAULT_OUT else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "r": args.r,
                               "rounds": args.rounds, "variants": summary}, indent=2))
    print(f"medians of {args.rounds} interleaved rounds, {args.steps} steps each (the first not "
          f"timed); wrote {out}")


# ----------------------------------------------------------------------------- driver
def child(args) -> None:
    out = tempfile.mkdtemp(prefix="bench-")
    if args.system == "lorakit":
        res = run_lorakit(args.rows, args.steps, args.batch, args.r, out, args.set)
    else:
        res = run_peer(args.rows, args.steps, args.batch, args.r, out, bf16=args.system == "peer-bf16")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def spawn(system: str, rows_path: str, args, overrides: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--rows", rows_path,
           "--steps", str(args.steps), "--batch", str(args.batch), "--r", str(args.r)]
    cmd += [f"--set={o}" for o in (args.set if overrides is None else overrides)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--data", nargs="*", default=["short", "long"])
    p.add_argument("--systems", nargs="*", default=["lorakit", "peer-fp32", "peer-bf16"])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for lorakit's run (repeatable), e.g. train.padding_free=false")
    p.add_argument("--ablate", action="store_true",
                   help="lorakit alone: defaults, each speed switch off, all off (short data)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --ablate")
    p.add_argument("--variants", nargs="*", help="--ablate only these (and the defaults), e.g. "
                   "'train.lean_activations=false'")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.ablate:
        return ablate(args)

    import torch

    peaks = {d: matmul_peak(d) for d in ("fp32", "bf16")}
    linear_params = block_linear_params()
    report = {"machine": {"threads": torch.get_num_threads(), "matmul_gflops": peaks},
              "block_linear_params": linear_params, "steps": args.steps, "batch": args.batch,
              "r": args.r, "results": {}}
    n_rows = args.steps * args.batch
    for data in args.data:
        rows = short_rows(n_rows) if data == "short" else long_rows(n_rows)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        results = {}
        for s in args.systems:
            results[s] = spawn(s, f.name, args)
            print(f"{data:6} {s:10} {results[s]['tokens_per_s']:8.0f} tok/s, "
                  f"peak RSS {results[s]['peak_rss_mb']:.0f} MB", flush=True)
        report["results"][data] = results
        if "lorakit" in results:
            lk = results["lorakit"]
            lk["mfu_bf16"] = 4 * linear_params * lk["tokens_per_s"] / (peaks["bf16"] * 1e9)
            for s in args.systems:
                if s != "lorakit":
                    results[s]["lorakit_speedup"] = lk["tokens_per_s"] / results[s]["tokens_per_s"]
                    results[s]["lorakit_rss_ratio"] = lk["peak_rss_mb"] / results[s]["peak_rss_mb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"block linear params {linear_params:,}; {args.steps} steps x batch {args.batch}, r={args.r}")
    print(f"{'data':6} {'system':10} {'tok/s':>8} {'peak RSS MB':>12} {'final loss':>11} "
          f"{'lorakit x':>10} {'RSS ratio':>10} {'MFU':>6}")
    for data, results in report["results"].items():
        for s, r in results.items():
            print(f"{data:6} {s:10} {r['tokens_per_s']:8.0f} {r['peak_rss_mb']:12.0f} {r['final_loss']:11.4f} "
                  f"{r.get('lorakit_speedup', float('nan')):10.2f} {r.get('lorakit_rss_ratio', float('nan')):10.2f} "
                  f"{r.get('mfu_bf16', float('nan')):6.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
