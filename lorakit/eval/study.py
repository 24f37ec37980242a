"""Base beside adapter on the same held-out rows: the study the material asks every user to run.

`evaluate_model` evaluates one in-memory model twice when asked to compare: with its LoRA layers
switched off (the base model, prompted exactly as the adapter is) and on. The result is written as
JSON and Markdown by `lorakit.eval.run.write_report` and printed as rich tables.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.data.formats import load_examples
from lorakit.eval.run import compare, evaluate, print_report, write_report
from lorakit.lora import lora_layers, set_adapters_enabled


def evaluate_model(model, tokenizer, examples, out_dir: str | Path, task: str = "auto",
                   compare_base: bool = True, batch_size: int = 16, max_seq_len: int = 512,
                   console=None) -> dict:
    """Evaluate the adapter (and the base, with `compare_base`) and write the report."""
    has_adapter = any(True for _ in lora_layers(model))
    results: dict = {}
    if compare_base or not has_adapter:
        set_adapters_enabled(model, False)
        if console:
            console.print(f"[bold]evaluating the base model[/] on {len(examples)} rows")
        results["base"] = evaluate(model, tokenizer, examples, task=task, max_seq_len=max_seq_len,
                                   batch_size=batch_size)
        set_adapters_enabled(model, True)
    if has_adapter:
        if console:
            console.print(f"[bold]evaluating the adapter[/] on {len(examples)} rows")
        results["adapter"] = evaluate(model, tokenizer, examples, task=task, max_seq_len=max_seq_len,
                                      batch_size=batch_size)
    if "base" in results and "adapter" in results:
        labels = results["adapter"].get("labels") or results["base"].get("labels")
        report = compare(results["base"], results["adapter"], labels)
    else:
        report = results
    json_path, md_path = write_report(report, out_dir)
    if console:
        print_report(report, console=console)
        console.print(f"report: {md_path} and {json_path}")
    return report


def evaluate_run(cfg, adapter_dir, model=None, tokenizer=None, console=None) -> dict:
    """The eval section of a run config, on the adapter a run wrote (or the model in memory)."""
    from lorakit.device import dtype_of, resolve_device

    if model is None:
        from lorakit.adapters import load_adapter
        from lorakit.models import load_base

        model, tokenizer = load_base(cfg.model.name, dtype=dtype_of(cfg.model.dtype),
                                     device=resolve_device(cfg.model.device))
        load_adapter(model, adapter_dir)
    examples = load_examples(cfg.eval.data, system_prompt=cfg.data.system_prompt)
    if cfg.eval.max_examples:
        examples = examples[:cfg.eval.max_examples]
    out_dir = Path(cfg.train.output_dir) / "eval"
    return evaluate_model(model, tokenizer, examples, out_dir, task=cfg.eval.task,
                          compare_base=cfg.eval.compare, batch_size=cfg.eval.batch_size,
                          max_seq_len=cfg.data.max_seq_len, console=console)


def evaluate_files(model_spec: str, adapter_dir: str | None, data: str, out_dir: str,
                   task: str = "auto", compare: bool = False, batch_size: int = 16,
                   max_examples: int = 0, dtype: str = "fp32", device: str = "auto",
                   console=None) -> dict:
    """`lorakit eval`: a model spec, an optional adapter, a data file."""
    from lorakit.adapters import load_adapter
    from lorakit.device import dtype_of, resolve_device
    from lorakit.models import load_base

    model, tokenizer = load_base(model_spec, dtype=dtype_of(dtype), device=resolve_device(device))
    if adapter_dir:
        load_adapter(model, adapter_dir)
    examples = load_examples(data)
    if max_examples:
        examples = examples[:max_examples]
    return evaluate_model(model, tokenizer, examples, out_dir, task=task,
                          compare_base=compare or not adapter_dir, batch_size=batch_size,
                          console=console)
