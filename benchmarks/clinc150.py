"""CLINC150 (Larson et al., 2019): prompting and retrieval baselines beside a LoRA adapter.

    .venv/bin/python benchmarks/clinc150.py                      # the full study (hours on a CPU)
    .venv/bin/python benchmarks/clinc150.py --per-intent 20 --test-per-intent 10 --no-oos \
        --baselines ""                                           # the short run of earlier sessions

Reads ../shared/data/clinc150/data_full.json (150 in-scope intents and the out-of-scope queries;
not copied into the project) and trains a LoRA on SmolLM2-135M-Instruct with the bundled study's
recipe (r=16, alpha=32, all-linear, lr 1e-3, 2 epochs, batch 16) on `--per-intent` training
queries per intent (0 = all 100, the paper's full training set) plus, with `--oos` (default), the
100 out-of-scope training queries as a 151st class `oos`.

Then one table, every answer decoded constrained to the same closed label set:
- the base model zero-shot, few-shot (K=5 balanced training rows in the prompt) and retrieval
  (the K=5 most similar training rows, BM25 over SQLite FTS5) and the adapter, on a seeded subset
  of `--baseline-rows` in-scope test queries (1,500 of 4,500 by default, to keep the prompted
  baselines within about an hour on a CPU);
- the adapter on every in-scope test query (`--test-per-intent` 0 = all 4,500), and its
  out-of-scope recall on the 1,000 out-of-scope test queries (the share answered `oos`).
Columns: accuracy, macro-F1 (over the in-scope intents) and prompt tokens per row. Writes
benchmarks/results/clinc150.json.

Published in-scope test accuracy (the paper's Table 2, full training set of 100 queries per
intent): BERT 96.9, MLP on USE 93.5, SVM 91.0, FastText 89.0.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"
INSTRUCTION = "Classify the intent of this request. Answer with the intent name only."


def rows(pairs: list[list[str]]) -> list[dict]:
    return [{"instruction": INSTRUCTION, "input": text, "output": intent.replace("_", " ")}
            for text, intent in pairs]


def pick(pairs, per_intent: int, seed: int) -> list[list[str]]:
    """`per_intent` rows of every intent (all when 0), in a seeded order."""
    rng = random.Random(seed)
    by_intent: dict[str, list] = {}
    for pair in pairs:
        by_intent.setdefault(pair[1], []).append(pair)
    chosen = []
    for intent in sorted(by_intent):
        group = by_intent[intent][:]
        rng.shuffle(group)
        chosen += group[:per_intent] if per_intent else group
    rng.shuffle(chosen)
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-intent", type=int, default=0, help="training queries per intent (0 = all 100)")
    p.add_argument("--test-per-intent", type=int, default=0, help="in-scope test queries per intent (0 = all 30)")
    p.add_argument("--oos", action=argparse.BooleanOptionalAction, default=True,
                   help="train the out-of-scope class and report its recall")
    p.add_argument("--baselines", default="zero-shot,few-shot:5,retrieval:5")
    p.add_argument("--baseline-rows", type=int, default=1500, help="seeded in-scope subset for the baselines")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "clinc150.json"))
    args = p.parse_args()
    if not CLINC.exists():
        raise SystemExit(f"{CLINC}: not found (CLINC150 is read from the shared data folder)")

    from lorakit.config import build_config
    from lorakit.data.formats import load_examples
    from lorakit.device import dtype_of, resolve_device
    from lorakit.eval.baselines import parse_baselines, run_baselines, write_baselines
    from lorakit.eval.metrics import classification_report
    from lorakit.models import load_base
    from lorakit.train.loop import train

    data = json.loads(CLINC.read_text())
    work = Path(tempfile.mkdtemp(prefix="clinc150-"))
    train_pairs = pick(data["train"], args.per_intent, args.seed)
    if args.oos:
        train_pairs = train_pairs + [[text, "oos"] for text, _ in data["oos_train"]]
        random.Random(args.seed).shuffle(train_pairs)
    paths = {"train": work / "train.jsonl", "test": work / "test.jsonl", "oos": work / "oos_test.jsonl"}
    tables = {"train": train_pairs, "test": pick(data["test"], args.test_per_intent, args.seed),
              "oos": [[text, "oos"] for text, _ in data["oos_test"]]}
    for name, path in paths.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(tables[name])))
    train_rows, test_rows = load_examples(paths["train"]), load_examples(paths["test"])
    oos_rows = load_examples(paths["oos"]) if args.oos else []
    in_scope = sorted({ex.label for ex in test_rows})
    labels = in_scope + (["oos"] if args.oos else [])

    cfg = build_config({
        "model": {"dtype": "bf16", "device": args.device},
        "lora": {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": "all-linear"},
        "data": {"train": str(paths["train"]), "max_seq_len": 128},
        "train": {"output_dir": str(work / "run"), "epochs": args.epochs, "batch_size": args.batch,
                  "lr": args.lr, "seed": args.seed},
    })
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_base(cfg.model.name, dtype=dtype_of(cfg.model.dtype), device=device)
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tokenizer)
    train_s = time.perf_counter() - t0

    # The prompted baselines and the adapter on the same seeded in-scope subset.
    t0 = time.perf_counter()
    study = run_baselines(model, tokenizer, test_rows, train_rows, parse_baselines(args.baselines),
                          labels, seed=args.seed, batch_size=args.eval_batch, index_dir=work,
                          max_rows=args.baseline_rows)
    write_baselines(study, work / "eval")
    baselines_s = time.perf_counter() - t0
    # The adapter on every in-scope test query, and on the out-of-scope ones.
    from lorakit.eval.baselines import score_rows

    t0 = time.perf_counter()
    full = score_rows(model, tokenizer, test_rows + oos_rows, labels, batch_size=args.eval_batch)
    full_s = time.perf_counter() - t0
    n_in = len(test_rows)
    y_in, p_in = full["y_true"][:n_in], full["predictions"][:n_in]
    in_report = classification_report(y_in, p_in, in_scope)
    oos_recall = (sum(p == "oos" for p in full["predictions"][n_in:]) / len(oos_rows)) if oos_rows else None

    def macro_in_scope(col):
        return classification_report(col["y_true"], col["predictions"], in_scope)["macro_f1"]

    table = [{"model": c["name"], "rows": c["rows"], "accuracy": c["report"]["accuracy"],
              "macro_f1": macro_in_scope(c), "prompt_tokens_per_row": c["prompt_tokens_per_row"]}
             for c in study["columns"]]
    table.append({"model": "adapter, all in-scope test queries", "rows": n_in,
                  "accuracy": in_report["accuracy"], "macro_f1": in_report["macro_f1"],
                  "prompt_tokens_per_row": full["prompt_tokens_per_row"]})
    print(f"\nCLINC150, SmolLM2-135M-Instruct; training {len(train_rows)} rows "
          f"({args.per_intent or 100} per intent{', + 100 oos' if args.oos else ''}), {args.epochs:g} epochs; "
          f"baselines on a seeded {study['rows']}-row in-scope subset (seed {args.seed})")
    print(f"| {'model':<36} | {'rows':>5} | {'accuracy':>8} | {'macro-F1':>8} | {'prompt tokens/row':>17} |")
    print(f"|{'-' * 38}|{'-' * 6}:|{'-' * 9}:|{'-' * 9}:|{'-' * 18}:|")
    for r in table:
        print(f"| {r['model']:<36} | {r['rows']:>5} | {100 * r['accuracy']:>7.1f}% | "
              f"{100 * r['macro_f1']:>7.1f}% | {r['prompt_tokens_per_row']:>17.0f} |")
    if oos_recall is not None:
        print(f"out-of-scope recall (adapter, {len(oos_rows)} oos test queries answered oos): "
              f"{100 * oos_recall:.1f}%")
    summary = {
        "per_intent": args.per_intent or 100, "oos_trained": args.oos, "train_rows": len(train_rows),
        "test_rows_in_scope": n_in, "test_rows_oos": len(oos_rows), "baseline_rows": study["rows"],
        "epochs": args.epochs, "r": args.r, "lr": args.lr, "seed": args.seed, "table": table,
        "in_scope_accuracy": in_report["accuracy"], "in_scope_macro_f1": in_report["macro_f1"],
        "oos_recall": oos_recall, "train_seconds": round(train_s, 1),
        "baselines_seconds": round(baselines_s, 1), "full_eval_seconds": round(full_s, 1),
        "train_steps": result.steps, "device": str(device), "work_dir": str(work),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
