"""Training throughput and peak GPU memory on CUDA: lorakit against Trainer + PEFT (bf16).

    .venv/bin/python benchmarks/gpu_train.py [--models bundled llama-1b] [--steps 20] [--batch 16]

The CUDA twin of `train_throughput.py`: the same LoRA (r=16, alpha=32, all linear layers), the
same rows in the same order (Alpaca-style rows with 100-300-token answers from
`train_throughput.long_rows`), the same batch and steps, bf16 weights on one GPU. Models:

  * `bundled`: SmolLM2-135M-Instruct (the bundled GGUF, converted once);
  * `llama-1b`: a randomly initialised Llama with Llama-3.2-1B's shape (hidden 2048, 16 blocks,
    32/8 heads, MLP 8192, vocabulary 128,256), written to a temporary folder with the bundled
    tokenizer. Nothing is downloaded; throughput does not depend on the weights' values.

The peer is the standard recipe: `get_peft_model`, `Trainer(bf16=True)`, `DataCollatorForSeq2Seq`
padding. Each system runs in its own subprocess; peak memory is `torch.cuda.max_memory_allocated`.
Tokens/s count the non-padding tokens of steps 2..N over their wall time (step 1 is warm-up).
Writes benchmarks/results/gpu_train.json and prints a table with ratios. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT_OUT = str(ROOT / "benchmarks" / "results" / "gpu_train.json")
BUNDLED = "smollm2-135m-instruct"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)


def random_llama_1b(folder: Path) -> Path:
    """A 1B-shaped Llama with random weights (bf16) and the bundled tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(BUNDLED)
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_lorakit(model: str, rows_path: str, steps: int, batch: int, out_dir: str) -> dict:
    from lorakit.config import build_config
    from lorakit.train.loop import train

    cfg = build_config({
        "model": {"name": model, "dtype": "bf16", "device": "cuda"},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"train": rows_path, "max_seq_len": 512, "dedupe": False},
        "train": {"output_dir": out_dir, "max_steps": steps, "batch_size": batch, "lr": 2e-4,
                  "warmup_ratio": 0.0, "shuffle": False, "group_by_length": False,
                  "save_every": 0, "keep_checkpoints": 1},
    })
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "loss" in x]
    first, last = rows[0], rows[-1]
    tokens = last["input_tokens"] - first["input_tokens"]
    return {"tokens_per_s": tokens / (last["elapsed_s"] - first["elapsed_s"]),
            "final_loss": last["loss"]}


def run_peer(model: str, rows_path: str, steps: int, batch: int, out_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from lorakit.data.formats import load_examples
    from lorakit.data.render import encode_example
    from lorakit.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(model)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(model)), dtype=torch.bfloat16,
                                                attn_implementation="sdpa").to("cuda")
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    encoded = [encode_example(ex, tokenizer, 512) for ex in load_examples(rows_path)]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0,
                             bf16=True, logging_steps=1, save_strategy="no", report_to=[],
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0,
                             disable_tqdm=True)
    trainer = InOrder(model=peft_model, args=args, train_dataset=dataset, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                           label_pad_token_id=-100))
    trainer.train()
    lengths = [len(d["input_ids"]) for d in dataset]
    tokens = sum(lengths[batch:steps * batch])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / (marks[-1] - marks[0]), "final_loss": losses[-1]}


def child(args) -> None:
    import torch

    out = tempfile.mkdtemp(prefix="gpu-bench-")
    run = run_lorakit if args.system == "lorakit" else run_peer
    res = run(args.model, args.rows, args.steps, args.batch, out)
    res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))


def spawn(system: str, model: str, rows_path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--model", model,
           "--rows", rows_path, "--steps", str(args.steps), "--batch", str(args.batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} on {model} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["bundled", "llama-1b"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from train_throughput import long_rows

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "long.jsonl"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in long_rows(args.steps * args.batch)))
        for name in args.models:
            model = BUNDLED if name == "bundled" else str(random_llama_1b(Path(tmp) / name))
            results[name] = {system: spawn(system, model, str(rows_path), args)
                             for system in ("lorakit", "peer-bf16")}
    print(f"\n{'model':10s} {'system':10s} {'tok/s':>9s} {'peak GPU MB':>12s} {'loss':>7s}")
    for name, by_system in results.items():
        for system, r in by_system.items():
            print(f"{name:10s} {system:10s} {r['tokens_per_s']:9.0f} {r['peak_gpu_mb']:12.0f} "
                  f"{r['final_loss']:7.4f}")
        ours, peer = by_system["lorakit"], by_system["peer-bf16"]
        by_system["speed_ratio"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        by_system["memory_ratio"] = ours["peak_gpu_mb"] / peer["peak_gpu_mb"]
        print(f"{name:10s} lorakit / peer: {by_system['speed_ratio']:.2f}x tokens/s, "
              f"{by_system['memory_ratio']:.2f}x peak memory")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
