"""Hyperparameter sweeps: grid or seeded random trials of ordinary training runs, a resumable
results.jsonl, and the plots and summary made from it (docs/sweeps.md)."""

from lorakit.sweep.config import SweepConfig, Trial, expand, load_sweep, plan
from lorakit.sweep.plot import plot_results
from lorakit.sweep.results import read_results
from lorakit.sweep.run import SweepResult, run_sweep

__all__ = ["SweepConfig", "SweepResult", "Trial", "expand", "load_sweep", "plan", "plot_results",
           "read_results", "run_sweep"]
