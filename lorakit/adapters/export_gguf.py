"""`lorakit export`: an adapter as GGUF for llama.cpp, merged into its base or as a GGUF LoRA file.

Two formats, following llama.cpp's own converters:

- `gguf`: base + adapter merged (`merge_and_unload`, fp32 math) and written as a model file the way
  `convert_hf_to_gguf.py` writes it (`lorakit/adapters/gguf_writer.py`).
- `gguf-lora`: the adapter alone, the way `convert_lora_to_gguf.py` writes it
  (`lorakit/adapters/gguf_lora.py`), for `llama-cli --lora` / `llama-server --lora`.

This file holds what both share: the supported architectures, HF -> GGUF tensor names
(`gguf.get_tensor_name_map`), the tensor layout llama.cpp wants (q/k rows permuted for its llama
graph, Gemma's norms as 1 + w), the atomic file write, and the CLI subcommand. The families are
those `lorakit.models.families` gives a llama.cpp architecture: Llama (e.g. SmolLM2) and Mistral
as `llama` (q/k rows permuted), Qwen2 as `qwen2` (q/k/v biases), Qwen3 as `qwen3` (q/k norms),
Gemma 2 as `gemma2` and Gemma 3 as `gemma3` (norms stored as 1 + w, soft-capping and the sliding
window in the header), Phi-3 as `phi3` (fused `attn_qkv` and `ffn_up` written whole); each is
checked end to end against transformers' GGUF loader (`transformers/modeling_gguf_pytorch_utils.py`).
Other families, and configs llama.cpp's graph would compute differently
(`families.gguf_config_problems`), are refused with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.atomic import atomic_file
from lorakit.errors import ExportError
from lorakit.models.families import gguf_architectures, refusal

FORMATS = ("gguf", "gguf-lora")
MODEL_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp applies a LoRA as x A^T B^T next to the base matmul; q8_0 factors of rank r lose more
# than they save, and lorakit's adapters are small anyway.
LORA_OUTTYPES = ("f32", "f16", "bf16")
# The converters' defaults: f16 for models, f32 for LoRA files.
DEFAULT_OUTTYPE = {"gguf": "f16", "gguf-lora": "f32"}
# {transformers class: gguf.MODEL_ARCH member}, from the family table (Mistral is written as llama,
# as llama.cpp's converter writes it).
SUPPORTED_ARCHITECTURES = gguf_architectures()


@dataclass
class ExportResult:
    path: Path
    bytes: int
    tensors: int
    outtype: str


# ---------------------------------------------------------------------------------------------
# What both formats share: architecture check, tensor names, q/k permutation
# ---------------------------------------------------------------------------------------------

def check_architecture(model, source: str) -> None:
    """Refuse a base whose GGUF form we do not write (or would write wrongly): a family without a
    llama.cpp architecture, or a config llama.cpp's graph would compute differently
    (`families.gguf_config_problems`)."""
    from lorakit.models.families import gguf_config_problems

    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"{source}: architecture {arch} cannot be exported to GGUF "
                          f"({refusal(model, 'gguf')}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    problems = gguf_config_problems(model)
    if problems:
        raise ExportError(f"{source}: this {arch} cannot be exported to GGUF: " + "; ".join(problems))


def tensor_name_map(config):
    import gguf

    return gguf.get_tensor_name_map(gguf_arch(config), config.num_hidden_layers)


def gguf_arch(config):
    """llama.cpp's architecture for this config (`gguf.MODEL_ARCH`), from the family table."""
    import gguf

    from lorakit.models.families import require

    fam = require(config, "GGUF export")
    if fam.gguf_arch is None:
        raise ExportError(f"model_type {fam.model_type!r} ({fam.label}): {fam.gguf_refusal}")
    return gguf.MODEL_ARCH[fam.gguf_arch]


def gguf_tensor_name(name_map, hf_name: str) -> str:
    """`blk.0.attn_q.weight` for `model.layers.0.self_attn.q_proj.weight`, as llama.cpp names it."""
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"{hf_name}: no GGUF name for this tensor in llama.cpp's tensor map")
    return name


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: each head's rows from HF's rotate-half order (first half,
    second half) to ggml's interleaved pairs. transformers' GGUF loader undoes it on load
    (`LlamaTensorProcessor._reverse_permute_weights`). Works on any (d_out, ...) tensor: a weight,
    or a LoRA B whose rows are the weight's rows."""
    d_out = w.shape[0]
    head_dim = d_out // n_head
    # (n_head, 2, head_dim/2, ...) -> swap the halves axis inward -> (d_out, ...)
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf_layout(hf_name: str, w: torch.Tensor, config) -> torch.Tensor:
    """The tensor as llama.cpp stores it: for the llama graph, q rows permuted per query head, k
    per key/value head (graphs that take rotate-half order, qwen2/qwen3/gemma/phi3, take them as
    they are); for the gemma graphs, every norm weight w as 1 + w (the family's `gguf_norm_shift`,
    as the converter's `Gemma2Model` / `Gemma3Model.modify_tensors` write them)."""
    from lorakit.models.families import family_of

    fam = family_of(config)
    if fam is None:
        return w
    if fam.gguf_norm_shift and hf_name.endswith("norm.weight"):
        return w + fam.gguf_norm_shift
    if not fam.gguf_permute_qk:
        return w
    if hf_name.endswith("self_attn.q_proj.weight"):
        return permute_qk(w, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return permute_qk(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return w


def progress_bar(enabled: bool, description: str, total: int) -> contextlib.AbstractContextManager:
    """A rich progress bar yielding an `advance()` callable (a no-op when disabled)."""

    @contextlib.contextmanager
    def bar() -> Iterator[Callable[[], None]]:
        if not enabled:
            yield lambda: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True) as p:
            task = p.add_task(description, total=total)
            yield lambda: p.advance(task)

    return bar()


# ---------------------------------------------------------------------------------------------
# The output file: checked up front (written with lorakit.atomic.atomic_file)
# ---------------------------------------------------------------------------------------------

def check_out_path(out: Path) -> None:
    """The folder must exist; an existing file there is replaced (atomically), a folder is not."""
    if out.is_dir():
        raise ExportError(f"{out}: is a directory (expected a file path such as {out / 'model.gguf'})")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: folder {out.parent} does not exist (expected the output file's "
                          "folder to exist; create it first)")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _source_gguf_info(model_spec: str) -> dict:
    """`general.name` and `tokenizer.ggml.pre` of the base when it is itself a GGUF file.

    The pre-tokenizer name is llama.cpp's own label, found by hashing the tokenizer's output; it
    does not survive the trip through transformers, so we take it from the original file.
    """
    from lorakit.models.load import resolve_spec

    kind, path = resolve_spec(model_spec)
    if kind != "gguf":
        return {"name": path.name}
    # transformers' header reader skips over the vocabulary arrays (~20 ms); gguf.GGUFReader
    # builds a field for each of the 100k tokens and merges first (~8 s for SmolLM2).
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    info = {"name": path.stem}
    for key, field in (("name", "general.name"), ("tokenizer_pre", "tokenizer.ggml.pre")):
        if isinstance(metadata.get(field), str):
            info[key] = metadata[field]
    return info


def export(model_spec: str, adapter_dir: str | Path, out: str | Path, fmt: str = "gguf",
           outtype: str | None = None, force: bool = False, progress: bool = False,
           tokenizer_pre: str | None = None) -> ExportResult:
    """Export `adapter_dir` (on base `model_spec`) to the GGUF file `out`.

    `fmt` is "gguf" (merged model) or "gguf-lora" (adapter file); `outtype` one of
    `MODEL_OUTTYPES` / `LORA_OUTTYPES` (default f16 / f32, as llama.cpp's converters).
    `force` loads the adapter onto a base other than the one it was trained on.
    `tokenizer_pre` overrides llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`).
    Cheap checks (format, type, output path, DoRA) run before the base model is loaded.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    outtype = outtype or DEFAULT_OUTTYPE[fmt]
    allowed = MODEL_OUTTYPES if fmt == "gguf" else LORA_OUTTYPES
    if outtype not in allowed:
        why = " (llama.cpp LoRA files are kept in float; quantize the merged model instead)" \
            if fmt == "gguf-lora" and outtype in MODEL_OUTTYPES else ""
        raise ExportError(f"outtype {outtype!r} for format {fmt}: expected one of "
                          f"{', '.join(allowed)}{why}")
    out = Path(out).expanduser()
    check_out_path(out)

    from lorakit.adapters.io import load_adapter, read_adapter
    from lorakit.models import load_base

    files = read_adapter(adapter_dir)
    if fmt == "gguf-lora":
        from lorakit.adapters.gguf_lora import check_lora_exportable

        check_lora_exportable(files)
    model, tokenizer = load_base(model_spec, dtype=torch.float32, device="cpu")
    check_architecture(model, str(model_spec))
    # Loads onto the base: checks the base hash, every module and every shape before we write.
    load_adapter(model, adapter_dir, force=force)
    info = _source_gguf_info(model_spec)

    if fmt == "gguf":
        from lorakit.adapters.gguf_writer import write_model_gguf
        from lorakit.lora import merge_and_unload

        merge_and_unload(model, safe=True)
        pre = tokenizer_pre or info.get("tokenizer_pre")
        with atomic_file(out) as tmp:  # GGUFWriter creates the file, with the umask's mode
            count = write_model_gguf(model, tokenizer, tmp, outtype, name=info["name"],
                                     tokenizer_pre=pre, progress=progress)
    else:
        from lorakit.adapters.gguf_lora import write_lora_gguf

        with atomic_file(out) as tmp:
            count = write_lora_gguf(files, model.config, tmp, outtype,
                                    name=f"{info['name']} LoRA {Path(adapter_dir).name}",
                                    progress=progress)
    return ExportResult(path=out, bytes=out.stat().st_size, tensors=count, outtype=outtype)


def cmd_export(args: argparse.Namespace) -> int:
    """Write an adapter as GGUF for llama.cpp: merged into its base (gguf) or as a LoRA file (gguf-lora)."""
    from lorakit.units import human_bytes

    result = export(args.model, args.adapter, args.out, fmt=args.format, outtype=args.outtype,
                    force=args.force, progress=True, tokenizer_pre=args.tokenizer_pre)
    what = "merged model" if args.format == "gguf" else "LoRA adapter"
    print(f"{what} written to {result.path} ({result.outtype}, {result.tensors} tensors, "
          f"{human_bytes(result.bytes)})")
    return 0


def add_export_parser(sub) -> None:
    """Add `export` to the main parser's subcommands (`sub`)."""
    from lorakit.models import DEFAULT_MODEL

    sp = sub.add_parser("export", help="write an adapter as GGUF for llama.cpp (merged or LoRA)",
                        description=cmd_export.__doc__)
    sp.add_argument("--model", default=DEFAULT_MODEL, help="base: bundled name, HF directory or .gguf file")
    sp.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    sp.add_argument("--format", required=True, choices=FORMATS,
                    help="gguf: base + adapter merged into one model file; "
                         "gguf-lora: the adapter alone (llama.cpp --lora)")
    sp.add_argument("--outtype", choices=MODEL_OUTTYPES, default=None,
                    help="tensor type (default f16 for gguf, f32 for gguf-lora; q8_0 only for gguf)")
    sp.add_argument("--out", required=True, help="output .gguf file (its folder must exist)")
    sp.add_argument("--force", action="store_true", help="load the adapter onto a different base anyway")
    sp.add_argument("--tokenizer-pre", default=None,
                    help="llama.cpp pre-tokenizer name to write (default: from the base GGUF, or "
                         "inferred from tokenizer.json)")
    sp.set_defaults(fn=cmd_export)
