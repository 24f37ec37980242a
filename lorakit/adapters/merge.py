"""Merge an adapter into its base for deployment: `W' = W + scaling * B A`, computed in fp32.

`merged_state_dict` is the pure form (base state dict + adapter files -> merged state dict) that
export uses; `merge_to_directory` writes a plain transformers model directory (safetensors,
config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no lorakit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.io import AdapterFiles
from lorakit.atomic import atomic_dir
from lorakit.errors import MergeError


def merged_state_dict(base: dict[str, torch.Tensor], adapter: AdapterFiles,
                      conv1d_modules: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A copy of `base` with every adapted weight replaced by W + scaling * B A (fp32 math).

    `conv1d_modules` names modules whose weight is stored (d_in, d_out) (transformers' Conv1D).
    Non-finite merged weights are refused.
    """
    cfg = adapter.config
    out = dict(base)
    for module in adapter.modules():
        key = f"{module}.weight"
        if key not in base:
            raise MergeError(f"{adapter.path}: module {module} has no weight {key} in the base")
        a, b = (t.float() for t in adapter.lora_pair(module))  # (r, d_in), (d_out, r)
        w = base[key]
        conv1d = module in conv1d_modules
        merged = (w.T if conv1d else w).float() + cfg.scaling_for(module) * (b @ a)  # (d_out, d_in)
        if cfg.use_dora:  # DoRA: each output row rescaled to its trained magnitude
            m = adapter.tensors[f"base_model.model.{module}.lora_magnitude_vector"].float()
            merged = (m / torch.linalg.vector_norm(merged, dim=1)).view(-1, 1) * merged
        merged = (merged.T if conv1d else merged).to(w.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(f"{adapter.path}: merging into {key} gives non-finite weights")
        out[key] = merged
    return out


SAMPLE_PROMPTS = ("Is this bike still available?", "What is the capital of France?",
                  "Write one sentence about the sea.", "Can you do 50 dollars for the sofa?")


@dataclass
class MergeResult:
    path: Path
    # From an NF4 base only: the largest |logit| difference on sample prompts between the merged
    # model written (dequantized NF4 weights + update) and the adapter on the NF4 base it was
    # trained on, and the same for a merge into the original full-precision weights (not written).
    drift_vs_quantized: float | None = None
    drift_if_original: float | None = None
    sample_tokens: int = 0


def _sample_logits(model, tokenizer, device) -> tuple[torch.Tensor, int]:
    ids = [tokenizer(p)["input_ids"] for p in SAMPLE_PROMPTS]
    n = min(len(x) for x in ids)
    batch = torch.tensor([x[:n] for x in ids], device=device)
    with torch.no_grad():
        return model(batch).logits.float(), batch.numel()


def merge_to_directory(model_spec: str, adapter_dir: str | Path, out_dir: str | Path,
                       dtype: str = "fp32", force: bool = False,
                       quantize_base: str | None = None, quantize_from: str = "bf16") -> MergeResult:
    """Load base + adapter, merge, and save a standalone model directory atomically.

    With `quantize_base="nf4"` (an adapter trained with QLoRA) the base is first quantized as in
    training (from `quantize_from` weights), then dequantized, and the update merged into the
    dequantized weights: the merged model is the trained one. The logit drift against the adapter
    on the NF4 base is measured on sample prompts, beside the drift of merging into the original
    weights instead (the usual QLoRA merge mistake).
    """
    from lorakit.adapters.io import load_adapter
    from lorakit.device import dtype_of
    from lorakit.lora import merge_and_unload
    from lorakit.models import load_base

    drift = drift_original = None
    n_tokens = 0
    if quantize_base is None:
        # Merge in fp32 whatever the output dtype, then cast once.
        model, tokenizer = load_base(model_spec, dtype=torch.float32, device="cpu")
        load_adapter(model, adapter_dir, force=force)
        merge_and_unload(model, safe=True)
    elif quantize_base == "nf4":
        from lorakit.lora.quant import dequantize_base, quantize_base_nf4

        model, tokenizer = load_base(model_spec, dtype=dtype_of(quantize_from), device="cpu")
        quantize_base_nf4(model)
        load_adapter(model, adapter_dir, force=force)
        reference, n_tokens = _sample_logits(model, tokenizer, "cpu")
        dequantize_base(model, torch.float32)
        model.float()
        merge_and_unload(model, safe=True)
        drift = float((_sample_logits(model, tokenizer, "cpu")[0] - reference).abs().max())
        original, _ = load_base(model_spec, dtype=torch.float32, device="cpu")
        load_adapter(original, adapter_dir, force=force)
        merge_and_unload(original, safe=True)
        drift_original = float((_sample_logits(original, tokenizer, "cpu")[0] - reference).abs().max())
        del original
    else:
        raise MergeError(f"quantize_base: got {quantize_base!r} (expected nf4 or none)")
    model = model.to(dtype_of(dtype))
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return MergeResult(out, drift, drift_original, n_tokens)
