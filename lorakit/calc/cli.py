"""`lorakit calc`: parameters, training memory, adapter size and serving memory from a config.

Reads only a model's config (a preset, a `config.json`, or an HF model directory's
`config.json`); no weights are loaded. `run_calc` returns a plain dict (what `--json` prints);
`print_calc` renders it with rich. The formulas live in `params.py`, `activations.py` and
`memory.py`; this file resolves the model, parses the arguments and lays out the numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.calc.memory import (
    DTYPE_BYTES,
    GB,
    adapter_file_bytes,
    base_weight_bytes,
    dtype_bytes,
    kv_cache_bytes,
    per_rank_memory,
    serving_bytes,
    training_memory,
)
from lorakit.calc.params import LORA_METHODS, METHODS, count_parameters, shape_from_config
from lorakit.calc.presets import BUNDLED_MODEL_PRESETS, PRESET_PREFIX, get_preset, preset_names
from lorakit.errors import ConfigError, ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
# Defaults match `lorakit train`'s (train.batch_size, data.max_seq_len), so a bare `calc` sizes
# the default training run.
DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 512
_REGEX_CHARS = set("*+?[](){}|\\^$")


def load_model_config(spec: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a preset, the bundled model, a config.json or a dir."""
    if spec.upper().startswith(PRESET_PREFIX):
        return get_preset(spec), f"preset {spec[len(PRESET_PREFIX):].lower()}"
    if spec in BUNDLED_MODEL_PRESETS:
        preset = BUNDLED_MODEL_PRESETS[spec]
        return get_preset(preset), f"bundled model, sized from preset {preset}"
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{spec}: directory has no config.json (calc reads only the config)")
    if path.is_file():
        if path.suffix == ".gguf":
            raise ModelLoadError(f"{spec}: calc reads a config.json, not GGUF weights; use the "
                                 "model's HF directory or a preset (PRESET:<name>)")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: not a readable JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{path}: expected a JSON object of config fields")
        return cfg, str(path)
    raise ModelLoadError(
        f"--model {spec!r}: not a preset, the bundled model or an existing config.json / model "
        f"directory (presets: {', '.join(PRESET_PREFIX + n for n in preset_names())}; "
        f"bundled: {', '.join(BUNDLED_MODEL_PRESETS)})")


def parse_target_modules(text: str) -> list[str] | str:
    """`q_proj,v_proj` -> a list of names; `all-linear` as is; text with regex characters
    (e.g. `.*\\.(q|v)_proj`) -> a regex string, matched with re.fullmatch as in PEFT."""
    text = text.strip()
    if text == "all-linear":
        return text
    if _REGEX_CHARS & set(text):
        try:
            re.compile(text)
        except re.error as e:
            raise ConfigError(f"--target-modules {text!r}: not a valid regex ({e})") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError("--target-modules: empty (expected names, a regex or 'all-linear')")
    return names


def run_calc(model: str = DEFAULT_MODEL, method: str = "lora", r: int = 8,
             target_modules: list[str] | str = ("q_proj", "v_proj"), layers_to_train: int = 1,
             batch: int = DEFAULT_BATCH, seq_len: int = DEFAULT_SEQ_LEN, serve_adapters: int = 0,
             dtype: str = "bf16", adapter_dtype: str = "fp32", padded: bool = False,
             double_quant: bool = True, world_size: int = 1, strategy: str = "ddp") -> dict:
    """Every figure `lorakit calc` shows, as a JSON-ready dict (sizes in bytes)."""
    problems = []
    for name, value, low in (("batch", batch, 1), ("seq_len", seq_len, 1),
                             ("serve_adapters", serve_adapters, 0), ("world_size", world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            problems.append(f"{name}: got {value!r} (expected an integer >= {low})")
    for name, value in (("dtype", dtype), ("adapter_dtype", adapter_dtype)):
        if value not in DTYPE_BYTES:
            problems.append(f"{name}: got {value!r} (expected one of {', '.join(DTYPE_BYTES)})")
    if method not in METHODS:
        problems.append(f"method: got {method!r} (expected one of {', '.join(METHODS)})")
    if strategy not in ("ddp", "fsdp"):
        problems.append(f"strategy: got {strategy!r} (expected ddp or fsdp)")
    if problems:
        raise ConfigError("invalid calc arguments:\n  " + "\n  ".join(problems))
    if isinstance(target_modules, tuple):
        target_modules = list(target_modules)

    config, source = load_model_config(model)
    shape = shape_from_config(config, source)
    counts = count_parameters(shape, method, r, target_modules, layers_to_train)
    mem = training_memory(shape, counts, batch, seq_len, dtype, adapter_dtype, r, padded, double_quant)
    # Under torchrun (train.distributed) each rank holds a share; `batch` stays the global batch.
    rank_mem = per_rank_memory(shape, counts, batch, seq_len, world_size, strategy, dtype,
                               adapter_dtype, r, padded, double_quant) if world_size > 1 else None
    e = dtype_bytes(dtype)
    # What one trained task adds on disk and in a server: the adapter (LoRA methods) or the
    # trained weights themselves (full: a whole model; freeze: the trained blocks).
    per_task_bytes = dtype_bytes(adapter_dtype) if method in LORA_METHODS else e
    base_served = base_weight_bytes(counts, e, double_quant)
    report = {
        "model": model,
        "source": source,
        "model_type": shape.model_type,
        "config": {
            "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size, "num_layers": shape.num_layers,
            "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "tie_word_embeddings": shape.tie_word_embeddings,
        },
        "method": method,
        "dtype": dtype,
        "adapter_dtype": adapter_dtype if method in LORA_METHODS else None,
        "r": r if method in LORA_METHODS else None,
        "target_modules": target_modules if method in LORA_METHODS else None,
        "layers_to_train": layers_to_train if method == "freeze" else None,
        "batch": batch,
        "seq_len": seq_len,
        "padded": padded,
        "parameters": {
            "base": counts.base,
            "trainable": counts.trainable,
            "added": counts.added,
            "total": counts.total,
            "trainable_percent": 100 * counts.trainable / counts.total,
            "quantized_nf4": counts.quantized,
            "adapted_modules": len(counts.adapted_modules),
            "adapted_module_names": sorted({n.rsplit(".", 1)[-1] for n in counts.adapted_modules}),
            "trainable_layers": counts.trainable_layers if method == "freeze" else None,
        },
        "training_memory": mem.to_dict(),
        "distributed": {"strategy": strategy, "world_size": world_size,
                        "training_memory_per_rank": rank_mem.to_dict()} if rank_mem else None,
        "adapter_file_bytes": adapter_file_bytes(counts.trainable, per_task_bytes),
        "serving": {
            "adapters": serve_adapters,
            "base_bytes": base_served,
            "adapter_bytes_each": adapter_file_bytes(counts.trainable, per_task_bytes),
            "total_bytes": serving_bytes(base_served, serve_adapters, counts.trainable, per_task_bytes),
            "kv_cache_bytes": kv_cache_bytes(shape, batch * seq_len, e),
        },
    }
    return report


def _gb(n: float) -> str:
    return f"{n / GB:,.3f} GB" if n >= GB / 100 else f"{n / 10**6:,.2f} MB"


def print_calc(report: dict, console=None) -> None:
    """The report as three rich tables: parameters, training memory, adapter and serving."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    p, m, s = report["parameters"], report["training_memory"], report["serving"]
    method = report["method"]
    what = {"lora": f"LoRA r={report['r']}", "dora": f"DoRA r={report['r']}",
            "qlora": f"QLoRA r={report['r']} (NF4 base)", "full": "full fine-tuning",
            "freeze": f"freeze-tuning of the last {report['layers_to_train']} blocks"}[method]
    console.print(f"[bold]{report['model']}[/] ({report['source']}, {report['model_type']}): {what}, "
                  f"weights in {report['dtype']}, batch {report['batch']} x {report['seq_len']} tokens")

    t = Table(title="Parameters", title_justify="left")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_row("base model", f"{p['base']:,}")
    t.add_row("trainable", f"{p['trainable']:,} ({p['trainable_percent']:.4f}%)")
    if p["added"]:
        t.add_row("added by the adapter", f"{p['added']:,}")
        t.add_row(f"adapted modules ({', '.join(p['adapted_module_names'])})", f"{p['adapted_modules']:,}")
    if p["quantized_nf4"]:
        t.add_row("base parameters in NF4", f"{p['quantized_nf4']:,}")
    console.print(t)

    t = Table(title="Training memory (AdamW)", title_justify="left")
    t.add_column("")
    t.add_column("size", justify="right")
    rows = [("weights", m["weights"]), ("quantization constants", m["quantization_constants"]),
            ("gradients", m["gradients"]), ("optimizer states (2 x fp32)", m["optimizer_states"]),
            ("fp32 master weights", m["master_weights"]), ("activations", m["activations"]),
            ("total", m["total"]),
            ("activations, gradient checkpointing", m["activations_checkpointed"]),
            ("total, gradient checkpointing", m["total_checkpointed"])]
    d = report.get("distributed")
    if d:
        t.add_column(f"per rank, {d['strategy']} x {d['world_size']}", justify="right")
        rank = d["training_memory_per_rank"]
    keys = ["weights", "quantization_constants", "gradients", "optimizer_states", "master_weights",
            "activations", "total", "activations_checkpointed", "total_checkpointed"]
    for (name, value), key in zip(rows, keys):
        if value or name.startswith(("weights", "activations", "total")):
            cells = [_gb(value)] + ([_gb(rank[key])] if d else [])
            t.add_row(f"[bold]{name}[/]" if name.startswith("total") else name, *cells)
    console.print(t)

    t = Table(title="Adapter and serving", title_justify="left")
    t.add_column("")
    t.add_column("size", justify="right")
    t.add_row("adapter file" if method in LORA_METHODS else "trained weights file",
              _gb(report["adapter_file_bytes"]))
    t.add_row("base weights served", _gb(s["base_bytes"]))
    if s["adapters"]:
        t.add_row(f"base + {s['adapters']} adapters", _gb(s["total_bytes"]))
    t.add_row(f"KV cache for {report['batch']} x {report['seq_len']} tokens", _gb(s["kv_cache_bytes"]))
    console.print(t)


def add_calc_arguments(parser) -> None:
    """The `lorakit calc` options, added to an argparse (sub)parser."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="PRESET:<name> (" + ", ".join(preset_names()) + "), a config.json, "
                             "an HF model directory, or the bundled model name")
    parser.add_argument("--method", default="lora", choices=METHODS)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (lora, dora, qlora)")
    parser.add_argument("--target-modules", default="q_proj,v_proj",
                        help="comma-separated module names, all-linear, or a regex")
    parser.add_argument("--layers-to-train", type=int, default=1,
                        help="freeze: train the last N decoder blocks")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES),
                        help="base weights and compute (qlora: compute and unquantized parts)")
    parser.add_argument("--adapter-dtype", default="fp32", choices=list(DTYPE_BYTES))
    parser.add_argument("--padded", action="store_true",
                        help="batches have padding (attention mask materialised)")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="qlora: fp32 absmax constants instead of double quantization")
    parser.add_argument("--serve-adapters", type=int, default=0,
                        help="serving memory for the base plus N adapters")
    parser.add_argument("--world-size", type=int, default=1,
                        help="ranks under torchrun: adds a per-rank column (--batch stays global)")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                        help="with --world-size: ddp replicates the model, fsdp shards it")
    parser.add_argument("--json", action="store_true")


def calc_main(args) -> int:
    """Parameters, training memory, adapter size and serving memory from a model config."""
    report = run_calc(
        model=args.model, method=args.method, r=args.r,
        target_modules=parse_target_modules(args.target_modules),
        layers_to_train=args.layers_to_train, batch=args.batch, seq_len=args.seq_len,
        serve_adapters=args.serve_adapters, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
        padded=args.padded, double_quant=not args.no_double_quant,
        world_size=args.world_size, strategy=args.strategy)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_calc(report)
    return 0
