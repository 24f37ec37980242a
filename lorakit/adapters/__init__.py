"""Adapter files in PEFT's on-disk format."""

from lorakit.adapters.io import AdapterFiles, adapter_size_bytes, load_adapter, read_adapter, save_adapter

__all__ = ["AdapterFiles", "adapter_size_bytes", "load_adapter", "read_adapter", "save_adapter"]
