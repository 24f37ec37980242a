"""A LoRA adapter as a GGUF LoRA file for llama.cpp (`llama-cli --lora`), as its converter writes it.

Follows llama.cpp's `convert_lora_to_gguf.py` and the reader in `src/llama-adapter.cpp`:
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32), and for
each adapted weight `<GGUF base tensor name>.lora_a` (torch (r, d_in)) and `.lora_b`
((d_out, r)), e.g. `blk.0.attn_q.weight.lora_a`. The converter runs B through the base model's
tensor transform, so q/k B rows get llama.cpp's permutation (`export_gguf.permute_qk`); A is
unchanged. Phi-3's fused `qkv_proj` / `gate_up_proj` pairs go on `attn_qkv` / `ffn_up` whole, as
their merged weights do (llama.cpp applies the pair before it splits the output).

llama.cpp scales every pair by `alpha / r`, one alpha for the file and r read from the tensor.
lorakit's scaling is per module (`cfg.scaling_for`: rank_pattern, alpha_pattern, rsLoRA's
alpha / sqrt(r)), so the difference is folded into B: B' = B * scaling_for(module) * r / alpha,
which makes alpha / r * B' A == scaling_for(module) * B A for every module. For a plain adapter
the factor is 1 and B is written as is. DoRA adapters are refused: llama.cpp applies no magnitude
vector, so the file would silently be a different adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorakit.adapters.export_gguf import (
    ExportError,
    gguf_arch,
    gguf_tensor_name,
    progress_bar,
    tensor_name_map,
    to_gguf_layout,
)
from lorakit.lora.inject import PEFT_PREFIX


def check_lora_exportable(files) -> None:
    """Refuse what a llama.cpp LoRA file cannot express (run before any model is loaded)."""
    magnitudes = [k for k in files.tensors if k.endswith(".lora_magnitude_vector")]
    if files.config.use_dora or magnitudes:
        raise ExportError(f"{files.path}: a DoRA adapter (use_dora / lora_magnitude_vector) cannot "
                          "be written as a llama.cpp LoRA file (llama.cpp has no DoRA); export it "
                          "merged instead: --format gguf")


def fold_factor(cfg, module: str, r: int, alpha: float) -> float:
    """What B is multiplied by so that llama.cpp's alpha / r equals lorakit's scaling_for(module)."""
    return cfg.scaling_for(module) * r / alpha


def lora_gguf_tensors(files, config) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(alpha to write, [(GGUF name, fp32 tensor in torch layout)]) for an adapter on an exported family's base."""
    check_lora_exportable(files)
    cfg = files.config
    alpha = float(cfg.lora_alpha)
    names = tensor_name_map(config)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for module in files.modules():
        if module == "lm_head" and tied:
            # The converter refuses it too: llama.cpp has no separate output tensor to adapt.
            raise ExportError(f"{files.path}: adapts lm_head, but this base ties it to the embeddings "
                              "(llama.cpp has no output.weight to put it on); export it merged: "
                              "--format gguf")
        hf_name = f"{module}.weight"
        base_name = gguf_tensor_name(names, hf_name)
        a = files.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].to(torch.float32)  # (r, d_in)
        b = files.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].to(torch.float32)  # (d_out, r)
        b = b * fold_factor(cfg, module, a.shape[0], alpha)
        # (permuted B) @ A == permuted (B @ A): the row permutation of the base weight carries over.
        b = to_gguf_layout(hf_name, b, config)
        out.append((f"{base_name}.lora_a", a))
        out.append((f"{base_name}.lora_b", b))
    return alpha, out


def write_lora_gguf(files, config, path: Path, outtype: str, name: str, progress: bool = False) -> int:
    """Write the adapter `files` (an `AdapterFiles`) for its base to `path`; return the tensor count."""
    import gguf

    alpha, tensors = lora_gguf_tensors(files, config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch(config)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with progress_bar(progress, f"encoding {len(tensors)} LoRA tensors ({outtype})", len(tensors)) as advance:
        for gguf_name, t in tensors:
            data = t.numpy()
            if outtype == "f16":
                writer.add_tensor(gguf_name, data.astype(np.float16))
            elif outtype == "bf16":
                bf16 = gguf.GGMLQuantizationType.BF16
                writer.add_tensor(gguf_name, gguf.quants.quantize(data, bf16), raw_dtype=bf16)
            else:
                writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
            advance()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tensors)
