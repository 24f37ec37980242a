"""Device and dtype names from configs and flags to torch objects. Never hard-coded elsewhere."""

import torch

from lorakit.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    return device


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r}: expected one of fp32, bf16, fp16") from None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA device with bf16 support, or a CPU
    with AVX-512 BF16 or AMX tiles (there oneDNN's bf16 matmuls run at about twice fp32's rate)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the device multiplies bf16 natively (`native_bf16`), else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return dtype_of(name)
