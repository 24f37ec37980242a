"""Where lorakit keeps its own files: `$LORAKIT_HOME`, default `~/.cache/lorakit`."""

import os
from pathlib import Path


def lorakit_home() -> Path:
    """The folder for caches (converted GGUF models) and registries."""
    return Path(os.environ.get("LORAKIT_HOME", "~/.cache/lorakit")).expanduser()
