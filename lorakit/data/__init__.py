"""Training data: reading files, rendering with chat templates, splits, batches and stats."""

from lorakit.data.formats import Example, load_examples
from lorakit.data.render import Encoded, encode_example, encode_prompt

__all__ = ["Encoded", "Example", "encode_example", "encode_prompt", "load_examples"]
