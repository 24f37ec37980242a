"""The memory and parameter calculator: sizes of a LoRA (or full, freeze, QLoRA, DoRA) run from a
model's config alone. `run_calc` gives every figure as a dict; `lorakit calc` prints it."""

from lorakit.calc.cli import add_calc_arguments, calc_main, load_model_config, print_calc, run_calc
from lorakit.calc.params import ModelShape, ParamCounts, count_parameters, shape_from_config
from lorakit.calc.presets import PRESETS, get_preset

__all__ = ["PRESETS", "ModelShape", "ParamCounts", "add_calc_arguments", "calc_main",
           "count_parameters", "get_preset", "load_model_config", "print_calc", "run_calc",
           "shape_from_config"]
