"""The typed errors lorakit raises for bad input.

Each carries a one-line message that names what was wrong (file, line, key, field) and what was
expected. The CLI prints the message without a traceback; library users catch the class.
"""


class LorakitError(Exception):
    """Base of every error lorakit raises on purpose."""


class ModelLoadError(LorakitError):
    """A base model spec could not be resolved or built."""


class AdapterError(LorakitError):
    """An adapter directory or file is missing, malformed, or does not fit the base."""


class TargetModulesError(LorakitError):
    """A LoRA target list matched no module of the model."""


class MergeError(LorakitError):
    """A merge would produce non-finite weights, or cannot be done."""


class ConfigError(LorakitError):
    """A config file or override has unknown keys or bad values (all problems listed)."""


class DataError(LorakitError):
    """A data file has bad rows (every bad row listed with its file and line)."""


class ExportError(LorakitError):
    """An export that cannot be done: unsupported model or adapter, bad output path or type."""


class RegistryError(LorakitError):
    """The adapter registry file cannot be opened or used: not an SQLite database, a wrong schema,
    locked, or not writable (the file and the fix are named)."""


class StorageError(LorakitError):
    """A file or folder cannot be written: read-only or full disk, no permission, or a file where
    a folder is expected (the path and the reason are named)."""
