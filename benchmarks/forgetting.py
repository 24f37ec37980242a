"""Forgetting on the bundled study, with and without replay: the trade-off in one table.

    .venv/bin/python benchmarks/forgetting.py                  # replay 0 and 0.2 (about 35 min here)
    .venv/bin/python benchmarks/forgetting.py --replay 0 0.1 0.2 --set train.epochs=1

Trains the bundled study (lorakit/examples/intents.yaml: SmolLM2-135M-Instruct, LoRA r=16 on all
linear layers, 2 epochs) once per `--replay` share (`data.replay`: that share of every epoch's rows
is the base model's own greedy answers to the replay half of the shipped general prompts,
lorakit/data/mix.py), then for each adapter reports the task score on the 500 held-out rows
(accuracy, macro-F1; answers constrained to the 7 labels) and the forgetting probe
(lorakit/eval/forgetting.py: perplexity of the adapter on the base's greedy answers to the probe
half of the general prompts, relative to the base, and the share of greedy answers unchanged).
Same seed, same data, same steps per task row; only the replay share differs. Writes
benchmarks/results/forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="section.key=value for every run, e.g. train.epochs=1")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forgetting.json"))
    args = p.parse_args()

    from lorakit.config import load_config
    from lorakit.demo import STUDY_CONFIG
    from lorakit.device import dtype_of, resolve_device
    from lorakit.eval.study import evaluate_run
    from lorakit.models import load_base
    from lorakit.train.loop import train

    work = Path(tempfile.mkdtemp(prefix="forgetting-"))
    results = []
    for i, share in enumerate(args.replay):
        out_dir = work / f"replay-{share:g}"
        cfg = load_config(STUDY_CONFIG, [*args.overrides, f"data.replay={share}",
                                         f"train.output_dir={out_dir}", "eval.baselines=",
                                         "eval.forgetting=true", f"eval.compare={str(i == 0).lower()}"])
        model, tokenizer = load_base(cfg.model.name, dtype=dtype_of(cfg.model.dtype),
                                     device=resolve_device(cfg.model.device))
        t0 = time.perf_counter()
        result = train(cfg, model=model, tokenizer=tokenizer)
        train_s = time.perf_counter() - t0
        report = evaluate_run(cfg, result.adapter_dir, model=model, tokenizer=tokenizer)
        adapter = report["adapter"] if "adapter" in report else report
        f = report["forgetting"]
        row = {"replay": share, "steps": result.steps, "train_seconds": round(train_s, 1),
               "accuracy": adapter["report"]["accuracy"], "macro_f1": adapter["report"]["macro_f1"],
               "probe_prompts": f["prompts"], "perplexity_ratio": f["perplexity_ratio"],
               "drift": f["drift"], "unchanged": f["unchanged"], "run": str(out_dir)}
        if "base" in report:
            row["base_accuracy"] = report["base"]["report"]["accuracy"]
        results.append(row)

    print("\nBundled study (intents.yaml), the same recipe with and without data.replay:")
    print("| data.replay | steps | task accuracy | macro-F1 | probe ppl ratio | drift (nats/token) "
          "| greedy unchanged |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['replay']:g} | {r['steps']} | {100 * r['accuracy']:.1f}% | {100 * r['macro_f1']:.1f}% | "
              f"x{r['perplexity_ratio']:.3f} | {r['drift']:+.4f} | {100 * r['unchanged']:.1f}% |")
    if "base_accuracy" in results[0]:
        print(f"base model task accuracy: {100 * results[0]['base_accuracy']:.1f}% "
              f"(probe: {results[0]['probe_prompts']} general prompts)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": results, "overrides": args.overrides}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
