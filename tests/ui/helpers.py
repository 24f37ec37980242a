"""The UI's test bench: a tiny base saved to a folder (so a `lorakit train` process can load it),
toy classification data, and the real server (`build_service` + `create_app` + `mount_ui`) on a
free localhost port. The runs root is also the adapters root, so a run's adapter registers."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests import tiny
from tests.train.test_loop import write_toy_data


def make_workspace(root: Path) -> Path:
    """root/base (tiny Llama + tokenizer), root/data/train.jsonl and test.jsonl."""
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_toy_data(root / "data" / "train.jsonl", n=48)
    write_toy_data(root / "data" / "test.jsonl", n=12)
    return root


@contextlib.contextmanager
def ui_server(root: Path, api_key: str | None = None):
    """(url, service, runs) of the web UI over `root`, served until the block ends."""
    from lorakit.serve.app import ServerThread, create_app
    from lorakit.serve.config import Limits, ServeConfig
    from lorakit.serve.service import build_service
    from lorakit.ui.routes import mount_ui

    config = ServeConfig(model=str(root / "base"), adapters_root=str(root), device="cpu",
                         dtype="fp32", max_loras=4, max_cpu_loras=4, max_lora_rank=8,
                         api_key=api_key, limits=Limits(max_tokens=64, default_max_tokens=16))
    service = build_service(config)
    app = create_app(service)
    runs = mount_ui(app, service, root)
    try:
        with ServerThread(app) as server:
            yield server.url, service, runs
    finally:
        runs.shutdown()


def make_sweep(root: Path) -> Path:
    """A real two-trial sweep of tiny models (in this process) under root/sweep, plotted as
    `lorakit sweep` does; returns its results.jsonl."""
    import yaml

    from lorakit.sweep.plot import plot_results
    from lorakit.sweep.run import run_sweep
    from tests.sweep.test_run import TinyModels

    base = {"model": {"dtype": "fp32", "device": "cpu"},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": str(root / "data" / "train.jsonl"), "max_seq_len": 64,
                     "val_fraction": 0.25},
            "train": {"batch_size": 4, "max_steps": 4, "eval_every": 2, "save_every": 4}}
    sweep = root / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": base, "output_dir": str(root / "sweep"),
                                     "grid": {"train.lr": [3e-3, 1e-2]}}, sort_keys=False))
    result = run_sweep(sweep, model_factory=TinyModels(), progress=False)
    assert result.failed == 0
    plot_results(result.results_path)
    return result.results_path
