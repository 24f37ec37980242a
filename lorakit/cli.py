"""The `lorakit` command: one table of subcommands, each a plain function (litgpt's __main__ style).

Every command ends a user error (a `LorakitError`, or the operating system refusing a path: a
full or read-only disk, a file where a folder belongs) with one line, `lorakit CMD: error: ...`,
and exit 2, with no traceback; `--debug` (or `LORAKIT_DEBUG=1`) shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from lorakit.errors import LorakitError

DEFAULT_MODEL = "smollm2-135m-instruct"
# errno -> what to do about it, for disk faults the CLI reports in one line.
_DISK_ERRNOS = {errno.ENOSPC: " (the disk is full; free space or choose another folder)",
                errno.EROFS: " (read-only file system; choose a writable folder)",
                errno.EACCES: " (permission denied; choose a folder you can write)",
                errno.EDQUOT: " (disk quota exceeded)"}


def _console():
    from rich.console import Console

    return Console()


def _load(model_spec: str, adapter: str | None = None, dtype: str = "auto", device: str = "auto",
          force: bool = False):
    from lorakit.adapters import load_adapter
    from lorakit.device import resolve_device, resolve_dtype
    from lorakit.models import load_base

    device = resolve_device(device)
    model, tokenizer = load_base(model_spec, dtype=resolve_dtype(dtype, device), device=device)
    cfg = load_adapter(model, adapter, force=force) if adapter else None
    return model, tokenizer, cfg


def cmd_info(args) -> int:
    """Parameter counts of a base model, its family and the features that family supports, and
    a LoRA on it when --r is given."""
    from lorakit.lora import LoraConfig, count_parameters, inject
    from lorakit.models.families import support_summary

    model, tokenizer, _ = _load(args.model, dtype="bf16")
    total, _ = count_parameters(model)
    report = {"model": args.model, "total_params": total, "trainable_params": 0, "adapted_modules": [],
              **support_summary(model, tokenizer)}
    if args.r:
        targets = args.target_modules
        targets = targets if targets in ("all-linear",) or not targets else targets.split(",")
        cfg = LoraConfig(r=args.r, lora_alpha=args.lora_alpha or 2 * args.r,
                         target_modules=targets or ["q_proj", "v_proj"])
        names = inject(model, cfg)
        total_with, trainable = count_parameters(model)
        report.update(total_params=total_with, base_params=total, trainable_params=trainable,
                      trainable_percent=100 * trainable / total_with, r=cfg.r,
                      target_modules=cfg.target_modules, adapted_modules=names,
                      adapter_file_bytes_fp32=4 * trainable)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = _console()
    console.print(f"[bold]{args.model}[/]: {report['total_params']:,} parameters")
    console.print(f"family: {report['family'] or 'not in the family table'} "
                  f"(model_type {report['model_type']!r}), chat template: {report['chat_template']}, "
                  f"end of turn: {report['end_of_turn']}",
                  highlight=False, markup=False, soft_wrap=True)
    if report["target_presets"]:
        console.print("target modules: " + "; ".join(f"{preset} = {','.join(names)}" for preset, names
                                                     in report["target_presets"].items()),
                      highlight=False, markup=False, soft_wrap=True)
    for feature, verdict in report["features"].items():
        console.print(f"  {feature}: {verdict}", highlight=False, markup=False, soft_wrap=True)
    if args.r:
        console.print(f"LoRA r={args.r} on {len(report['adapted_modules'])} modules "
                      f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in report['adapted_modules']}))}): "
                      f"{report['trainable_params']:,} trainable ({report['trainable_percent']:.4f}%)")
    return 0


def cmd_generate(args) -> int:
    """Answer a chat prompt with the model's chat template (and an adapter, if given)."""
    import torch

    model, tokenizer, _ = _load(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                force=args.force)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    from lorakit.data.render import encode_prompt

    ids = torch.tensor([encode_prompt(messages, tokenizer)], device=next(model.parameters()).device)
    sample = args.temperature > 0
    if sample:
        torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=sample, temperature=args.temperature if sample else None,
                             top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def cmd_train(args) -> int:
    """Train an adapter from a YAML config with dotted overrides."""
    from lorakit.config import load_config
    from lorakit.train.loop import train

    cfg = load_config(args.config, args.overrides)
    console = _console()
    result = train(cfg, resume=args.resume, console=console)
    if result.rank != 0:  # under torchrun rank 0 reports and evaluates, once
        return 0
    what = "adapter" if result.method == "lora" else "model"
    losses = "".join(f", {name} {value:.4f}" for name, value in
                     (("final loss", result.train_loss), ("validation loss", result.val_loss))
                     if value is not None)
    if result.already_finished:
        console.print(f"this run had already finished ({result.steps} steps{losses}); its {what} "
                      f"is in {result.adapter_dir}. Nothing to resume: to train again, set a new "
                      "train.output_dir or run without --resume")
    else:
        console.print(f"[green]{what} written to[/] {result.adapter_dir} "
                      f"({result.steps} steps, {result.seconds:.0f} s{losses})")
    console.print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    if cfg.eval.data:
        from lorakit.eval.study import evaluate_run

        evaluate_run(cfg, result.adapter_dir, console=console)
    return 0


def cmd_eval(args) -> int:
    """Evaluate a model (and adapter) on a data file; --compare puts the base beside the adapter."""
    from lorakit.eval.study import evaluate_files

    evaluate_files(args.model, args.adapter, args.data, out_dir=args.out, task=args.task,
                   compare=args.compare, batch_size=args.batch_size, max_examples=args.max_examples,
                   dtype=args.dtype, device=args.device, console=_console(),
                   quantize_base=args.quantize_base, baselines=args.baselines,
                   train_data=args.train_data, corpus=args.corpus, seed=args.seed,
                   baseline_rows=args.baseline_rows, forgetting=args.forgetting,
                   max_new_tokens=args.max_new_tokens)
    return 0


def cmd_merge(args) -> int:
    """Merge an adapter into its base and write a plain transformers model directory."""
    from lorakit.adapters.merge import merge_to_directory

    result = merge_to_directory(args.model, args.adapter, args.out, dtype=args.dtype,
                                force=args.force, quantize_base=args.quantize_base)
    print(f"merged model written to {result.path} (load it with "
          "AutoModelForCausalLM.from_pretrained)")
    if result.drift_vs_quantized is not None:
        print(f"max |logit| drift on {result.sample_tokens} sample tokens against the adapter on "
              f"the NF4 base: {result.drift_vs_quantized:.3g} (merged into the dequantized "
              f"weights, written); {result.drift_if_original:.3g} if merged into the original "
              "weights instead")
    return 0


def cmd_data_stats(args) -> int:
    """Counts, token lengths, duplicates and warnings for a data file."""
    from lorakit.data.formats import load_examples
    from lorakit.data.stats import data_stats, print_data_stats
    from lorakit.models import load_tokenizer

    examples = load_examples(args.file)  # a bad file is named before the tokenizer loads
    mix = []
    for spec in args.mix or []:
        path, sep, weight = spec.rpartition("=")
        try:
            mix.append({"path": path, "weight": float(weight)})
        except ValueError:
            sep = ""
        if not sep or not path:
            raise LorakitError(f"--mix {spec}: expected FILE=SHARE, e.g. general.jsonl=0.2")
    stats = data_stats(args.file, load_tokenizer(args.model), max_seq_len=args.max_seq_len,
                       examples=examples, mix=mix, replay=args.replay)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_data_stats(stats, console=_console())
    return 0


def cmd_sweep(args) -> int:
    """Run a sweep file's trials (one after another, or on Ray), resumable; then plot results.jsonl."""
    from lorakit.sweep.plot import plot_results
    from lorakit.sweep.run import run_sweep

    console = _console()
    result = run_sweep(args.sweep, args.overrides, console=console, backend=args.backend,
                       address=args.address)
    console.print(f"{result.ran} trial(s) run ({result.failed} failed), {result.skipped} already done; "
                  f"results: {result.results_path}")
    written = plot_results(result.results_path, result.output_dir / "plots", console=console)
    console.print(f"plots and summary: {written['summary.md'].parent}")
    return 0


def cmd_plot(args) -> int:
    """Plot a sweep's results.jsonl: loss curves, validation loss by rate and by target modules."""
    from lorakit.sweep.plot import plot_results

    written = plot_results(args.results, args.out, console=_console())
    for path in written.values():
        print(path)
    return 0


def cmd_demo(args) -> int:
    """The bundled study: intent detection on marketplace messages, base vs LoRA."""
    from lorakit.demo import run_demo

    run_demo(args.overrides, console=_console())
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=fn.__doc__)
        sp.set_defaults(fn=fn)
        return sp

    def model_args(sp, adapter=True):
        sp.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, HF directory or .gguf file")
        if adapter:
            sp.add_argument("--adapter", help="adapter directory (PEFT format)")
            sp.add_argument("--force", action="store_true", help="load onto a different base anyway")
        # One dtype policy with `lorakit serve`: auto is bf16 where the device multiplies bf16
        # natively, else fp32, so a prompt gets the same answer from generate, eval and serve.
        sp.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        sp.add_argument("--device", default="auto")

    sp = add("info", cmd_info, "parameter counts, with and without a LoRA")
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--r", type=int, default=0)
    sp.add_argument("--lora-alpha", type=float, default=0)
    sp.add_argument("--target-modules", default="q_proj,v_proj",
                    help="comma-separated names, or all-linear")
    sp.add_argument("--json", action="store_true")

    sp = add("generate", cmd_generate, "answer a prompt")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--system")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--seed", type=int, default=0)

    sp = add("train", cmd_train, "train an adapter from a YAML config")
    sp.add_argument("config")
    sp.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    sp.add_argument("--resume", action="store_true", help="continue the latest complete checkpoint")

    sp = add("eval", cmd_eval, "evaluate base and/or adapter on a data file")
    model_args(sp)
    sp.add_argument("--data", required=True)
    sp.add_argument("--task", default="auto", choices=["auto", "classification", "generation"])
    sp.add_argument("--compare", action="store_true", help="evaluate the base model beside the adapter")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--max-examples", type=int, default=0)
    sp.add_argument("--out", default="eval_report", help="folder for report.json and report.md")
    sp.add_argument("--quantize-base", choices=["nf4"],
                    help="evaluate on the NF4 base a QLoRA adapter was trained on")
    sp.add_argument("--baselines", help="base-model baselines beside the adapter, e.g. "
                    "zero-shot,few-shot:5,retrieval:5")
    sp.add_argument("--train-data", help="labelled rows few-shot and retrieval draw examples from")
    sp.add_argument("--corpus", help="passages (.jsonl with \"text\", or text) for retrieval:K as context")
    sp.add_argument("--baseline-rows", type=int, default=0, help="seeded subset of rows for the baselines")
    sp.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw and the subset")
    sp.add_argument("--max-new-tokens", type=int, default=0, help="generation: greedy answer "
                    "length (0: twice the longest expected answer + 16)")
    sp.add_argument("--forgetting", action="store_true", help="forgetting probe: the adapter against "
                    "the base on the shipped general prompts (lorakit/eval/forgetting.py)")

    sp = add("merge", cmd_merge, "merge an adapter into its base")
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--adapter", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    sp.add_argument("--force", action="store_true")
    sp.add_argument("--quantize-base", choices=["nf4"],
                    help="the adapter was trained on an NF4 base (QLoRA): merge into that base, "
                         "dequantized, and report the logit drift")

    sp = add("data", None, "data tools")
    data_sub = sp.add_subparsers(dest="data_command", required=True)
    st = data_sub.add_parser("stats", help="counts, token lengths, duplicates", description=cmd_data_stats.__doc__)
    st.set_defaults(fn=cmd_data_stats)
    st.add_argument("file")
    st.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer counts tokens")
    st.add_argument("--max-seq-len", type=int, default=2048)
    st.add_argument("--json", action="store_true")
    st.add_argument("--mix", action="append", metavar="FILE=SHARE",
                    help="count each epoch's rows with data.mix (repeatable), e.g. general.jsonl=0.2")
    st.add_argument("--replay", type=float, default=0.0, help="count each epoch's rows with data.replay")

    from lorakit.adapters.combine import add_combine_parser
    from lorakit.adapters.export_gguf import add_export_parser
    from lorakit.adapters.portability import add_check_adapter_parser
    from lorakit.adapters.spectrum import add_inspect_parser
    from lorakit.examples.agent.cli import add_agent_parser
    from lorakit.calc.cli import add_calc_arguments, calc_main
    from lorakit.serve.app import add_serve_parser
    from lorakit.serve.cli_adapters import add_adapters_parser
    from lorakit.ui.cli import add_ui_parser

    sp = add("calc", calc_main, "parameters and memory for training and serving, from the config alone")
    add_calc_arguments(sp)
    add_serve_parser(sub)
    add_adapters_parser(sub)
    add_check_adapter_parser(sub)
    add_export_parser(sub)
    add_combine_parser(sub)
    add_inspect_parser(sub)
    add_agent_parser(sub)
    add_ui_parser(sub)

    sp = add("sweep", cmd_sweep, "run a hyperparameter sweep (grid or random) of training runs")
    sp.add_argument("sweep", help="sweep YAML (docs/sweeps.md)")
    sp.add_argument("--backend", choices=["sequential", "ray"], default="sequential",
                    help="ray: each trial a Ray Tune trial (docs/cluster.md)")
    sp.add_argument("--address", default=None,
                    help="with --backend ray: join this Ray cluster (auto or HOST:PORT); "
                         "default a local Ray runtime")
    sp.add_argument("overrides", nargs="*",
                    help="section.key=value for every trial; sweep.key=value for the sweep file")

    sp = add("plot", cmd_plot, "plots and a summary table from a sweep's results.jsonl")
    sp.add_argument("results", help="results.jsonl of a sweep")
    sp.add_argument("--out", help="output folder (default: plots/ beside the results file)")

    sp = add("demo", cmd_demo, "run the bundled intent-detection study")
    sp.add_argument("overrides", nargs="*", help="section.key=value overrides of the study config")
    return p


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a bug. A `LorakitError`
    names what was wrong itself; an `OSError` on a path (read-only or full disk, a file where a
    folder is needed) is the machine's answer about that path."""
    if isinstance(e, LorakitError):
        return str(e)
    if isinstance(e, OSError) and (e.filename or e.errno in _DISK_ERRNOS):
        what = e.strerror or type(e).__name__
        where = f"{e.filename}: " if e.filename else ""
        hint = _DISK_ERRNOS.get(e.errno, "")
        return f"{where}{what}{hint}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug anywhere on the line shows the traceback of an error (as LORAKIT_DEBUG=1 does).
    debug = "--debug" in argv or bool(os.environ.get("LORAKIT_DEBUG"))
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return args.fn(args)
    except (LorakitError, OSError) as e:
        message = _user_error(e)
        if debug or message is None:
            raise
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
