"""Device and dtype names: `auto` picks bf16 only where the device multiplies it natively."""

import pytest
import torch

from lorakit.device import dtype_of, native_bf16, resolve_dtype
from lorakit.errors import ConfigError


def test_explicit_names_map_whatever_the_device():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    with pytest.raises(ConfigError, match="dtype 'half': expected one of fp32, bf16, fp16"):
        dtype_of("half")


def test_auto_follows_the_cpu_s_bf16_support(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert not native_bf16(cpu) and resolve_dtype("auto", cpu) is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16(cpu) and resolve_dtype("auto", cpu) is torch.bfloat16
