"""`lorakit inspect`: the rank of an adapter's update, its size against W, plots and the verdict."""

import copy
import json

import torch

from lorakit.adapters.io import save_adapter
from lorakit.adapters.spectrum import (dense_singular_values, energy_rank, inspect_adapter, inspect_full,
                                       lora_singular_values, plot_spectra)
from lorakit.lora import LoraConfig, inject, lora_layers
from tests import tiny


def _rank3_adapter(tmp_path, zero=False):
    """r=16 LoRA whose B A has rank 3: only 3 of the 16 rank-one terms are non-zero."""
    model = tiny.tiny_llama()
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    inject(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            A, B = layer.lora_A.weight, layer.lora_B.weight
            A.copy_(torch.randn(A.shape, generator=g))
            B.copy_(torch.zeros_like(B) if zero else torch.randn(B.shape, generator=g))
            A[3:] = 0
            B[:, 3:] = 0
    out = save_adapter(model, cfg, tmp_path / "adapter")
    return model, out


def test_energy_rank():
    assert energy_rank(torch.tensor([3.0, 0.0, 0.0]), 0.99) == 1
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.90) == 4
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.75) == 3
    assert energy_rank(torch.zeros(4), 0.95) == 0


def test_core_singular_values_equal_the_dense_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, 40, generator=g), torch.randn(24, 8, generator=g)
    expected = torch.linalg.svdvals(0.5 * B.double() @ A.double())
    assert torch.allclose(lora_singular_values(A, B, 0.5), expected[:8], rtol=1e-10, atol=1e-10)


def test_finds_rank_3_in_an_adapter_padded_to_16(tmp_path):
    model, adapter = _rank3_adapter(tmp_path)
    base = tiny.tiny_llama()
    report = inspect_adapter(adapter, base_model=base)
    assert len(report["modules"]) == len(list(lora_layers(model))) == 14
    for m in report["modules"]:
        assert m["rank"] == 16 and m["rank_99"] == 3 and m["rank_90"] <= 3
        assert m["singular_values"][3] < 1e-9 * m["singular_values"][0]
        layer = model.get_submodule(m["module"])
        assert abs(m["update_norm"] - float(layer.delta_weight().detach().double().norm())) < 1e-6 * m["update_norm"]
        w_norm = float(base.get_submodule(m["module"]).weight.detach().double().norm())
        assert abs(m["relative_update"] - m["update_norm"] / w_norm) < 1e-9 * m["relative_update"]
    assert report["verdict"] == "95% of the energy in 3 of 16 ranks in every module: r=4 would do"
    assert report["by_type"]["q_proj"]["modules"] == 2
    written = plot_spectra(report, tmp_path / "plots")
    assert sorted(p.name for p in written) == sorted(f"spectrum_{t}.png" for t in report["by_type"])
    assert all(p.stat().st_size > 1000 for p in written)


def test_untrained_adapter_says_so(tmp_path):
    _, adapter = _rank3_adapter(tmp_path, zero=True)
    report = inspect_adapter(adapter)
    assert report["verdict"] == "the update is zero in every module (untrained: B = 0)"
    assert all(m["rank_95"] == 0 and m["relative_update"] is None for m in report["modules"])


def test_full_run_spectrum_of_w_ft_minus_w():
    base = tiny.tiny_llama()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        w = tuned.model.layers[1].mlp.down_proj.weight
        w += torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    report = inspect_full("tuned", tuned, base)
    assert [m["module"] for m in report["modules"]] == ["model.layers.1.mlp.down_proj"]
    (m,) = report["modules"]
    assert m["rank_99"] == 2 and m["rank"] == min(w.shape)
    assert report["verdict"].endswith("a LoRA with r=2 would hold it")
    assert torch.allclose(torch.tensor(m["singular_values"]).double(),
                          dense_singular_values(w.double() - base.model.layers[1].mlp.down_proj.weight.double()))


def test_cli_prints_the_table_and_verdict(tmp_path, capsys):
    from lorakit.cli import main

    _, adapter = _rank3_adapter(tmp_path)
    assert main(["inspect", str(adapter), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "verdict: 95% of the energy in 3 of 16 ranks in every module: r=4 would do" in out
    assert (tmp_path / "plots" / "spectrum_q_proj.png").exists()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "neither an adapter directory" in capsys.readouterr().err


def test_sweep_summary_repeats_each_trials_verdict(tmp_path):
    from lorakit.sweep.plot import plot_results

    _rank3_adapter(tmp_path / "trials" / "t1")
    row = {"id": "t1", "status": "ok", "params": {"lora.r": 16}, "method": "lora", "r": 16, "lora_alpha": 32,
           "lr": 1e-3, "target_modules": "all-linear", "final_train_loss": 1.0, "final_val_loss": 1.1,
           "best_val_loss": 1.1, "steps": 2, "seconds": 1.0, "trainable_params": 10, "total_params": 100,
           "tokens": 5, "loss_curve": [[1, 1.2], [2, 1.0]], "val_curve": [[2, 1.1]],
           "output_dir": str(tmp_path / "trials" / "t1")}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    written = plot_results(tmp_path / "results.jsonl", tmp_path / "plots")
    assert ("- t1 (r=16): 95% of the energy in 3 of 16 ranks in every module: r=4 would do"
            in written["summary.md"].read_text())
