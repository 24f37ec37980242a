"""Measure the peak memory of a training step, for tests/calc/test_memory.py.

Run as a subprocess (`python tests/calc/peak_step.py CONFIG_JSON DTYPE BATCH SEQ_LEN METHOD...`),
it prints one JSON line {method: bytes the step used}. PyTorch has no allocator statistics for
CPU tensors, so this reads the process's resident memory (Linux /proc): after torch, transformers
and their kernels are loaded and warmed up on a throwaway model, each method starts from the
current RSS with the high-water mark reset (`/proc/self/clear_refs` <- 5), and its figure is the
high-water mark (VmHWM) after its steps minus that starting RSS. The parent sets
MALLOC_MMAP_THRESHOLD_ so that every large tensor is its own mmap, returned to the system when
freed: RSS then follows live tensors rather than glibc's heap high-water mark.

A first step on a short batch creates AdamW's states, so the measured step (full batch) runs
with weights, gradients, optimizer states and activations resident together, as every step
after the first does (gradients are zeroed, not freed, so they stay resident too).
"""

import gc
import json
import re
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def start_measuring() -> int:
    """Reset the RSS high-water mark; return the current RSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def measure_step(config, method: str, dtype, ids, mask) -> int:
    """Bytes used by building the model and running a short step then a full-batch step."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.lora import LoraConfig, inject

    baseline = start_measuring()
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    if method == "lora":
        inject(model, LoraConfig(r=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, seq_len = ids.shape
    for b, t in ((1, 8), (batch, seq_len)):
        loss = model(input_ids=ids[:b, :t], attention_mask=mask[:b, :t], labels=ids[:b, :t]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        del loss
    return peak_bytes() - baseline


def main() -> None:
    config_json, dtype_name, batch, seq_len, *methods = sys.argv[1:]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    raw = json.loads(config_json)
    config = AutoConfig.for_model(**raw)
    ids = torch.randint(0, config.vocab_size, (int(batch), int(seq_len)))
    mask = torch.ones_like(ids)

    # Warm-up on a 1-block copy: thread pools and kernel workspaces go into the baseline.
    small = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**raw, "num_hidden_layers": 1}))
    small = small.to(dtype).train()
    small(input_ids=ids[:1, :16], attention_mask=mask[:1, :16], labels=ids[:1, :16]).loss.backward()
    del small
    print(json.dumps({method: measure_step(config, method, dtype, ids, mask) for method in methods}))


if __name__ == "__main__":
    main()
