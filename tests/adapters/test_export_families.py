"""GGUF export for every family the table gives a llama.cpp architecture (Llama, Mistral as llama,
Qwen2, Qwen3): the merged file loads in transformers' GGUF reader with the merged model's logits,
the LoRA file's tensors rebuild each module's delta under the merged file's tensor names; the
other families are refused up front with the table's reason.

transformers' GGUF reader takes a Qwen3 file's head_dim as Qwen3Config's default 128 (it reads no
key_length for qwen3), so the tiny Qwen3 has head_dim 128, as every released Qwen3 has."""

import numpy as np
import pytest
import torch

from lorakit.adapters import save_adapter
from lorakit.adapters.export_gguf import ExportError, export
from lorakit.lora import LoraConfig, inject, lora_layers
from lorakit.models import load_base
from lorakit.models.families import FAMILIES
from tests import tiny
from tests.adapters.test_export_gguf import _load_gguf, _merged
from tests.lora.test_layer import randomize_b
from tests.models.test_families import tiny_family

gguf = pytest.importorskip("gguf")

EXPORTED = [t for t, f in FAMILIES.items() if f.gguf_arch]
REFUSED = [t for t, f in FAMILIES.items() if not f.gguf_arch]


def _base(model_type, path):
    tiny_family(model_type).save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


def _adapter(base, out):
    model, _ = load_base(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    inject(model, cfg)
    randomize_b(model, scale=0.3)
    return save_adapter(model, cfg, out), {n: (l.scaling * l.lora_B.weight @ l.lora_A.weight).detach()
                                           for n, l in lora_layers(model)}


def test_the_table_exports_llama_mistral_qwen2_qwen3():
    assert EXPORTED == ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("model_type", EXPORTED)
def test_merged_gguf_loads_in_transformers_with_the_merged_logits(model_type, tmp_path):
    base = _base(model_type, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter")
    merged, _ = _merged(base, adapter)
    x = torch.randint(1, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged(x).logits
        assert not torch.allclose(want, load_base(base)[0](x).logits, atol=1e-3)
    out = export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf", outtype="f32").path
    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"].contents()
    assert arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[FAMILIES[model_type].gguf_arch]]
    if model_type == "qwen2":  # transformers gives a Qwen2 folder Qwen2's pre-tokenizer regex
        assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    loaded = _load_gguf(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", EXPORTED)
def test_gguf_lora_rebuilds_each_delta_under_the_model_names(model_type, tmp_path):
    from lorakit.adapters.export_gguf import tensor_name_map, to_gguf_layout

    base = _base(model_type, tmp_path / "base")
    adapter, deltas = _adapter(base, tmp_path / "adapter")
    out = export(str(base), adapter, tmp_path / "l.gguf", fmt="gguf-lora", outtype="f32").path
    model_file = export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf", outtype="f32").path
    model_names = {t.name for t in gguf.GGUFReader(str(model_file)).tensors}
    reader = gguf.GGUFReader(str(out))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    config = load_base(base)[0].config
    names = tensor_name_map(config)
    assert len(tensors) == 2 * len(deltas)
    for module, delta in deltas.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        assert name in model_names, module
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        want = to_gguf_layout(f"{module}.weight", delta, config)
        torch.testing.assert_close(alpha / a.shape[0] * b @ a, want, atol=1e-5, rtol=0, msg=module)


@pytest.mark.parametrize("model_type", REFUSED)
def test_other_families_are_refused_with_the_reason(model_type, tmp_path):
    base = _base(model_type, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter")
    with pytest.raises(ExportError) as e:
        export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf")
    assert FAMILIES[model_type].gguf_refusal in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_a_configured_sliding_window_is_refused(tmp_path):
    model = tiny_family("mistral")
    model.config.sliding_window = 4096
    model.save_pretrained(tmp_path / "base")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "base")
    adapter, _ = _adapter(tmp_path / "base", tmp_path / "adapter")
    with pytest.raises(ExportError, match="sliding_window=4096"):
        export(str(tmp_path / "base"), adapter, tmp_path / "m.gguf", fmt="gguf")
