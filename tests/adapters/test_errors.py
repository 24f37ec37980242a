"""Every bad adapter input raises AdapterError naming the file, key and what was expected."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.adapters import load_adapter, read_adapter, save_adapter
from lorakit.errors import AdapterError
from lorakit.lora import LoraConfig, inject
from tests import tiny
from tests.lora.test_layer import randomize_b

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def adapter_dir(tmp_path):
    model = tiny.tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inject(model, cfg)
    randomize_b(model)
    return save_adapter(model, cfg, tmp_path / "adapter",
                        base_identity={"name": "tiny-a", "weights_sha256": "1" * 64})


def rewrite_tensors(adapter_dir, edit):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def rewrite_config(adapter_dir, edit):
    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_round_trip_restores_weights(adapter_dir):
    model = tiny.tiny_llama()
    load_adapter(model, adapter_dir)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert torch.equal(model.get_submodule("model.layers.0.self_attn.q_proj").lora_B.weight, saved[KEY_B])


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        read_adapter(tmp_path / "nope")


def test_missing_config(adapter_dir):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config.json: missing"):
        read_adapter(adapter_dir)


def test_pickled_weights_refused_with_conversion_hint(adapter_dir):
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model.bin: pickled adapter weights are refused.*save_file"):
        read_adapter(adapter_dir)


def test_corrupt_safetensors(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(adapter_dir)


def test_unknown_tensor_key(adapter_dir):
    rewrite_tensors(adapter_dir, lambda t: t.__setitem__("base_model.model.extra.weight", torch.zeros(2, 2)))
    with pytest.raises(AdapterError, match=r"base_model.model.extra.weight: unexpected key"):
        read_adapter(adapter_dir)


def test_missing_tensor_of_a_pair(adapter_dir):
    rewrite_tensors(adapter_dir, lambda t: t.pop(KEY_B))
    with pytest.raises(AdapterError, match=rf"{KEY_B}: missing"):
        read_adapter(adapter_dir)


def test_missing_module_the_config_targets(adapter_dir):
    def drop_pair(t):
        t.pop(KEY_A)
        t.pop(KEY_B)
    rewrite_tensors(adapter_dir, drop_pair)
    with pytest.raises(AdapterError, match=r"missing tensors for 1 module.*layers.0.self_attn.q_proj"):
        load_adapter(tiny.tiny_llama(), adapter_dir)


def test_shape_that_does_not_fit_the_base(adapter_dir):
    rewrite_tensors(adapter_dir, lambda t: t.__setitem__(KEY_A, torch.zeros(4, 65)))
    with pytest.raises(AdapterError, match=rf"{KEY_A}: shape \(4, 65\) \(expected \(4, 64\)"):
        load_adapter(tiny.tiny_llama(), adapter_dir)


def test_rank_disagreeing_with_config(adapter_dir):
    rewrite_tensors(adapter_dir, lambda t: t.__setitem__(KEY_A, torch.zeros(3, 64)))
    with pytest.raises(AdapterError, match=rf"{KEY_A}: shape \(3, 64\) \(expected \(4, d_in\)"):
        read_adapter(adapter_dir)


def test_module_not_in_base(adapter_dir):
    def rename(t):
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = t.pop(KEY_A)
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = t.pop(KEY_B)
    rewrite_tensors(adapter_dir, rename)
    with pytest.raises(AdapterError, match=r"layers.9.self_attn.q_proj.lora_A.weight: no such module"):
        load_adapter(tiny.tiny_llama(), adapter_dir)


def test_non_finite_values(adapter_dir):
    rewrite_tensors(adapter_dir, lambda t: t[KEY_B].fill_(float("nan")))
    with pytest.raises(AdapterError, match=rf"{KEY_B}: holds NaN or inf"):
        read_adapter(adapter_dir)


def test_integer_dtype(adapter_dir):
    rewrite_tensors(adapter_dir, lambda t: t.__setitem__(KEY_B, t[KEY_B].to(torch.int32)))
    with pytest.raises(AdapterError, match=rf"{KEY_B}: dtype torch.int32 \(expected a floating-point"):
        read_adapter(adapter_dir)


def test_unknown_config_key(adapter_dir):
    rewrite_config(adapter_dir, lambda d: d.__setitem__("lora_alhpa", 3))
    with pytest.raises(AdapterError, match=r"adapter_config.json: bad adapter config:\n  lora_alhpa: unknown key"):
        read_adapter(adapter_dir)


def test_unsupported_peft_feature_refused(adapter_dir):
    rewrite_config(adapter_dir, lambda d: d.__setitem__("lora_bias", True))
    with pytest.raises(AdapterError, match=r"lora_bias: got True"):
        read_adapter(adapter_dir)


def test_dora_config_without_magnitudes_refused(adapter_dir):
    rewrite_config(adapter_dir, lambda d: d.__setitem__("use_dora", True))
    with pytest.raises(AdapterError, match=r"q_proj\.lora_magnitude_vector: missing"):
        read_adapter(adapter_dir)


def test_base_changing_init_refused(adapter_dir):
    rewrite_config(adapter_dir, lambda d: d.__setitem__("init_lora_weights", "olora"))
    with pytest.raises(AdapterError, match=r"init_lora_weights: got 'olora'.*changes the base"):
        read_adapter(adapter_dir)


def test_different_base_refused_unless_forced(adapter_dir):
    other = tiny.tiny_llama(seed=5)
    other.lorakit_identity = {"name": "tiny-b", "weights_sha256": "2" * 64}
    with pytest.raises(AdapterError, match=r"trained on base 'tiny-a'.*this base is 'tiny-b'.*force"):
        load_adapter(other, adapter_dir)
    load_adapter(other, adapter_dir, force=True)
    assert other.get_submodule("model.layers.0.self_attn.q_proj").r == 4


def test_save_replaces_existing_dir_atomically(adapter_dir):
    model = tiny.tiny_llama()
    cfg = LoraConfig(r=2, target_modules=["k_proj"])
    inject(model, cfg)
    save_adapter(model, cfg, adapter_dir)
    assert read_adapter(adapter_dir).config.r == 2
    assert sorted(p.name for p in adapter_dir.parent.iterdir()) == ["adapter"]
