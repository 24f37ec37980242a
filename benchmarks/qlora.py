"""QLoRA against plain LoRA on the bundled intents study: base memory, training speed, accuracy.

    .venv/bin/python benchmarks/qlora.py [--variants lora,qlora] [--max-steps 0]

Trains the shipped study (lorakit/examples/intents.yaml: SmolLM2-135M, r=16 all-linear, 2 epochs,
bf16) once per variant in one run, on the same data, seed and config, and evaluates each adapter
on the 500 held-out messages with constrained decoding. Variants: `lora` (the study as shipped),
`qlora` (model.quantize_base=nf4: the frozen linear weights in NF4 with double quantization),
`dora` (lora.use_dora=true). Reports the base's linear-weight bytes (bf16 vs NF4) and the whole
model's parameter bytes, training tokens/s, accuracy and macro-F1, and the ratios against `lora`.
Writes benchmarks/results/qlora.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "lorakit" / "examples" / "intents.yaml"
VARIANTS = {"lora": [], "qlora": ["model.quantize_base=nf4"], "dora": ["lora.use_dora=true"]}


def param_bytes(model) -> int:
    """Bytes of every parameter as stored (an NF4 weight counts its codes and scales)."""
    from lorakit.lora.quant import is_nf4, nf4_nbytes

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += nf4_nbytes(p) if is_nf4(p) else p.numel() * p.element_size()
    return total


def run_variant(name: str, overrides: list[str], work: Path, max_steps: int,
                max_examples: int) -> dict:
    import torch

    from lorakit.config import load_config
    from lorakit.eval.study import evaluate_run
    from lorakit.train.loop import train

    extra = [f"train.output_dir={work / name}", "train.save_every=0",
             f"eval.compare={'true' if name == 'lora' else 'false'}"]
    if max_steps:
        extra.append(f"train.max_steps={max_steps}")
    if max_examples:
        extra.append(f"eval.max_examples={max_examples}")
    cfg = load_config(str(STUDY), overrides + extra)
    from lorakit.device import dtype_of
    from lorakit.models import load_base

    model, tokenizer = load_base(cfg.model.name, dtype=dtype_of(cfg.model.dtype))
    bytes_before = param_bytes(model)
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tokenizer)
    train_s = time.perf_counter() - t0
    quant = getattr(model, "lorakit_quant", None)
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    report = evaluate_run(cfg, result.adapter_dir, model=model, tokenizer=tokenizer)
    eval_s = time.perf_counter() - t0
    out = {
        "variant": name, "overrides": overrides,
        "model_param_bytes_bf16": bytes_before,
        "model_param_bytes": param_bytes(model) - adapter_bytes,
        "train_tokens_per_s": round(result.input_tokens / result.seconds, 1),
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "steps": result.steps, "final_loss": result.train_loss, "val_loss": result.val_loss,
        "accuracy": report["adapter"]["report"]["accuracy"],
        "macro_f1": report["adapter"]["report"]["macro_f1"],
    }
    if "base" in report:
        out["base_accuracy"] = report["base"]["report"]["accuracy"]
        out["base_macro_f1"] = report["base"]["report"]["macro_f1"]
    if quant is not None:
        out.update(linear_weight_bytes_bf16=quant.bf16_bytes, linear_weight_bytes_nf4=quant.bytes_after,
                   linear_ratio_to_bf16=round(quant.ratio_to_bf16, 4),
                   quantized_modules=len(quant.modules), scaler_blocks=quant.scaler_blocks)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="lora,qlora")
    p.add_argument("--max-steps", type=int, default=0, help="cap each run (0 = the study's 2 epochs)")
    p.add_argument("--max-examples", type=int, default=0, help="cap the test rows (0 = all 500)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora.json"))
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} (expected some of {', '.join(VARIANTS)})")
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    results = [run_variant(n, VARIANTS[n], work, args.max_steps, args.max_examples) for n in names]
    ref = next((r for r in results if r["variant"] == "lora"), None)
    print(f"\n{'variant':8} {'base MB':>8} {'vs bf16':>8} {'tok/s':>7} {'speed':>6} "
          f"{'acc':>6} {'F1':>6} {'d acc':>6}")
    for r in results:
        ratio = r["model_param_bytes"] / r["model_param_bytes_bf16"]
        speed = r["train_tokens_per_s"] / ref["train_tokens_per_s"] if ref else float("nan")
        dacc = 100 * (r["accuracy"] - ref["accuracy"]) if ref else float("nan")
        r.update(model_ratio_to_bf16=round(ratio, 4), speed_vs_lora=round(speed, 3),
                 accuracy_points_vs_lora=round(dacc, 2))
        print(f"{r['variant']:8} {r['model_param_bytes'] / 2**20:8.1f} {ratio:8.3f} "
              f"{r['train_tokens_per_s']:7.0f} {speed:6.2f} {100 * r['accuracy']:6.1f} "
              f"{100 * r['macro_f1']:6.1f} {dacc:+6.1f}")
        if "linear_ratio_to_bf16" in r:
            print(f"         linear weights: {r['linear_weight_bytes_bf16'] / 2**20:.1f} MB bf16 -> "
                  f"{r['linear_weight_bytes_nf4'] / 2**20:.1f} MB NF4 "
                  f"({r['linear_ratio_to_bf16']:.3f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "benchmarks/qlora.py --variants " + args.variants
                                          + (f" --max-steps {args.max_steps}" if args.max_steps else "")
                                          + (f" --max-examples {args.max_examples}"
                                             if args.max_examples else ""),
                                          "results": results}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
