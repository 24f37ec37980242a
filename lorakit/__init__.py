"""lorakit: the whole life of a LoRA adapter in one tool.

Train an adapter on a base model, evaluate it beside the base, merge, combine and export it,
and serve many adapters over one shared base.
"""

__version__ = "0.1.0"
