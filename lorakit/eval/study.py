"""Base beside adapter on the same held-out rows: the study the material asks every user to run.

`evaluate_model` evaluates one in-memory model twice when asked to compare: with its LoRA layers
switched off (the base model, prompted exactly as the adapter is) and on. A model trained with
`train.method` full or freeze has no LoRA layers to switch off, so its base column comes from a
separately loaded copy of the base (`base_model`); the report still calls the trained column
"adapter", meaning "the fine-tuned model" whatever the method. The result is written as JSON and
Markdown by `lorakit.eval.run.write_report` and printed as rich tables.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.data.formats import load_examples
from lorakit.errors import LorakitError
from lorakit.eval.run import compare, evaluate, print_report, write_report
from lorakit.lora import lora_layers, set_adapters_enabled


def evaluate_model(model, tokenizer, examples, out_dir: str | Path, task: str = "auto",
                   compare_base: bool = True, batch_size: int = 16, max_seq_len: int = 512,
                   console=None, base_model=None, fine_tuned: bool | None = None,
                   baselines: str | None = None, train_examples=None, corpus: str | None = None,
                   seed: int = 0, baseline_rows: int = 0, forgetting: bool = False,
                   system_prompt: str | None = None, max_new_tokens: int = 0) -> dict:
    """Evaluate the adapter (and the base, with `compare_base`) and write the report.

    `fine_tuned` says whether `model` is a trained model (default: it has LoRA layers). A trained
    model without LoRA layers (full or freeze fine-tuning) needs `base_model`, the untouched base
    with the same tokenizer, for the base column when `compare_base` is set.

    `baselines` ("zero-shot,few-shot:5,retrieval:5", `lorakit.eval.baselines`) adds the base model
    prompted with `train_examples` (or `corpus` passages) beside the adapter on a seeded subset of
    `baseline_rows` rows (0: all), written to baselines.json/.md and under "baselines" in the report.

    `forgetting` runs the forgetting probe (`lorakit.eval.forgetting`) of the fine-tuned model
    against its base and reports it beside the task score, under "forgetting".
    """
    from lorakit.eval.baselines import parse_baselines

    baseline_list = parse_baselines(baselines)  # a bad spec fails before any model runs
    has_adapter = any(True for _ in lora_layers(model))
    fine_tuned = has_adapter if fine_tuned is None else fine_tuned
    if fine_tuned and not has_adapter and compare_base and base_model is None:
        raise LorakitError("evaluate_model: the model has no LoRA layers to switch off; pass "
                           "base_model (the untouched base) to compare against it")
    results: dict = {}
    if compare_base or not fine_tuned:
        base = base_model if base_model is not None else model
        set_adapters_enabled(base, False)
        if console:
            console.print(f"[bold]evaluating the base model[/] on {len(examples)} rows")
        results["base"] = evaluate(base, tokenizer, examples, task=task, max_seq_len=max_seq_len,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens)
        set_adapters_enabled(base, True)
    if fine_tuned:
        if console:
            what = "the adapter" if has_adapter else "the fine-tuned model"
            console.print(f"[bold]evaluating {what}[/] on {len(examples)} rows")
        results["adapter"] = evaluate(model, tokenizer, examples, task=task, max_seq_len=max_seq_len,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens)
    if "base" in results and "adapter" in results:
        labels = results["adapter"].get("labels") or results["base"].get("labels")
        report = compare(results["base"], results["adapter"], labels)
    else:
        report = results
    if forgetting and fine_tuned:
        from lorakit.eval.forgetting import probe

        if console:
            console.print("[bold]forgetting probe[/]: base and adapter on the shipped general prompts")
        report["forgetting"] = probe(model, tokenizer, base_model=None if has_adapter else base_model,
                                     batch_size=batch_size, max_seq_len=max_seq_len,
                                     system_prompt=system_prompt)
    if baseline_list:
        report["baselines"] = _baselines(model, tokenizer, examples, report, baseline_list,
                                         train_examples, corpus, seed, baseline_rows, batch_size,
                                         out_dir, base_model, fine_tuned, console)
    json_path, md_path = write_report(report, out_dir, examples)
    if console:
        print_report(report, console=console, full_report=str(md_path))
        console.print(f"report: {md_path} and {json_path}")
    return report


def _baselines(model, tokenizer, examples, report, baseline_list, train_examples, corpus, seed,
               baseline_rows, batch_size, out_dir, base_model, fine_tuned, console) -> dict:
    from lorakit.eval.baselines import print_baselines, run_baselines, write_baselines
    from lorakit.eval.retrieval import read_corpus

    columns = [report[k] for k in ("adapter", "base") if isinstance(report.get(k), dict)] or [report]
    if columns[0]["task"] != "classification":
        raise LorakitError("baselines: need classification data (the answers a small label set); "
                           f"this data was evaluated as {columns[0]['task']}")
    study = run_baselines(model, tokenizer, examples, list(train_examples or []), baseline_list,
                          report.get("labels") or columns[0]["labels"], base_model=base_model,
                          adapter=fine_tuned, seed=seed, batch_size=batch_size, index_dir=out_dir,
                          corpus=read_corpus(corpus) if corpus else None, max_rows=baseline_rows,
                          console=console)
    write_baselines(study, out_dir)
    if console:
        print_baselines(study, console)
    return study


def evaluate_run(cfg, adapter_dir, model=None, tokenizer=None, console=None) -> dict:
    """The eval section of a run config, on what a run wrote (or the model in memory).

    `adapter_dir` is `TrainResult.adapter_dir`: an adapter for method lora, a whole model
    directory for full and freeze, whose base column (with `eval.compare`) is a freshly loaded
    `cfg.model.name`.
    """
    from lorakit.device import dtype_of, resolve_device
    from lorakit.models import load_base

    dtype, device = dtype_of(cfg.model.dtype), resolve_device(cfg.model.device)
    lora = cfg.train.method == "lora"
    if model is None and lora:
        from lorakit.adapters import load_adapter

        model, tokenizer = load_base(cfg.model.name, dtype=dtype, device=device)
        if cfg.model.quantize_base == "nf4":  # the base the adapter was trained on
            from lorakit.lora.quant import quantize_base_nf4

            quantize_base_nf4(model)
        load_adapter(model, adapter_dir)
    elif model is None:
        model, tokenizer = load_base(str(adapter_dir), dtype=dtype, device=device)
    base_model = None
    if not lora and (cfg.eval.compare or cfg.eval.forgetting):  # the probe needs the base too
        base_model, _ = load_base(cfg.model.name, dtype=dtype, device=next(model.parameters()).device)
    examples = load_examples(cfg.eval.data, system_prompt=cfg.data.system_prompt)
    if cfg.eval.max_examples:
        examples = examples[:cfg.eval.max_examples]
    out_dir = Path(cfg.train.output_dir) / "eval"
    report = evaluate_model(model, tokenizer, examples, out_dir, task=cfg.eval.task,
                          compare_base=cfg.eval.compare, batch_size=cfg.eval.batch_size,
                          max_seq_len=cfg.data.max_seq_len, console=console,
                          base_model=base_model, fine_tuned=True, baselines=cfg.eval.baselines,
                          train_examples=_train_rows(cfg) if cfg.eval.baselines else None,
                          corpus=cfg.eval.corpus, seed=cfg.data.seed,
                          baseline_rows=cfg.eval.baseline_rows, forgetting=cfg.eval.forgetting,
                          system_prompt=cfg.data.system_prompt, max_new_tokens=cfg.eval.max_new_tokens)
    if cfg.train.report_to:  # the evaluation table into the run's TensorBoard and MLflow run
        from lorakit.eval.run import REPORT_MD
        from lorakit.train.track import log_evaluation

        log_evaluation(cfg, Path(cfg.train.output_dir), report, [out_dir / REPORT_MD])
    return report


def _train_rows(cfg) -> list:
    """The training rows few-shot and retrieval baselines draw from (the run's data.train)."""
    return load_examples(cfg.data.train, system_prompt=cfg.data.system_prompt)


def evaluate_files(model_spec: str, adapter_dir: str | None, data: str, out_dir: str,
                   task: str = "auto", compare: bool = False, batch_size: int = 16,
                   max_examples: int = 0, dtype: str = "auto", device: str = "auto",
                   console=None, quantize_base: str | None = None, baselines: str | None = None,
                   train_data: str | None = None, corpus: str | None = None, seed: int = 0,
                   baseline_rows: int = 0, forgetting: bool = False, max_new_tokens: int = 0) -> dict:
    """`lorakit eval`: a model spec, an optional adapter, a data file (`quantize_base="nf4"`:
    on the NF4 base a QLoRA adapter was trained on); `baselines` draw from `train_data`."""
    from lorakit.eval.baselines import parse_baselines

    kinds = {b.kind for b in parse_baselines(baselines)}
    if kinds & {"few-shot", "retrieval"} and not train_data and not (kinds == {"retrieval"} and corpus):
        raise LorakitError("--baselines few-shot/retrieval: pass --train-data FILE (the labelled "
                           "rows the examples are drawn from)")
    from lorakit.adapters import load_adapter
    from lorakit.device import resolve_device, resolve_dtype
    from lorakit.models import load_base

    device = resolve_device(device)
    model, tokenizer = load_base(model_spec, dtype=resolve_dtype(dtype, device), device=device)
    if quantize_base == "nf4":
        from lorakit.lora.quant import quantize_base_nf4

        quantize_base_nf4(model)
    if adapter_dir:
        load_adapter(model, adapter_dir)
    examples = load_examples(data)
    if max_examples:
        examples = examples[:max_examples]
    return evaluate_model(model, tokenizer, examples, out_dir, task=task,
                          compare_base=compare or not adapter_dir, batch_size=batch_size,
                          console=console, baselines=baselines,
                          train_examples=load_examples(train_data) if train_data else None,
                          corpus=corpus, seed=seed, baseline_rows=baseline_rows,
                          forgetting=forgetting and bool(adapter_dir), max_new_tokens=max_new_tokens)
