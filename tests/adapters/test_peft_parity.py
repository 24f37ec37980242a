"""PEFT is the oracle: our adapters load in PEFT with the same logits, and PEFT's load in ours."""

import json

import pytest
import torch

from lorakit.adapters import load_adapter, save_adapter
from lorakit.lora import LoraConfig, inject, lora_layers
from tests import tiny
from tests.lora.test_layer import randomize_b

peft = pytest.importorskip("peft")

CASES = [
    (tiny.tiny_llama, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])),
    (tiny.tiny_llama, dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    (tiny.tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
]


def ids(seed=0):
    return torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(seed))


def peft_model_from(make, adapter_dir):
    """Load an adapter directory with PEFT's own loader; return the model and its load result."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = PeftLoraConfig.from_pretrained(str(adapter_dir))
    model = get_peft_model(make(), config)
    result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)))
    return model.eval(), result


@pytest.mark.parametrize("make, kw", CASES)
def test_our_adapter_loads_in_peft_with_same_logits(make, kw, tmp_path):
    x = ids()
    base = make()
    with torch.no_grad():
        base_logits = base(x).logits
    inject(base, LoraConfig(**kw))
    randomize_b(base)
    with torch.no_grad():
        ours = base(x).logits
    save_adapter(base, LoraConfig(**kw), tmp_path / "adapter")

    with _no_peft_warnings():
        pm, result = peft_model_from(make, tmp_path / "adapter")
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert result.unexpected_keys == []
    with torch.no_grad():
        theirs = pm(x).logits
    assert not torch.allclose(ours, base_logits, atol=1e-3), "adapter must change the output"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # The high-level entry point agrees too.
    from peft import PeftModel

    pm2 = PeftModel.from_pretrained(make(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(x).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make, kw", CASES)
def test_peft_adapter_loads_in_lorakit_with_same_logits(make, kw, tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    x = ids(1)
    torch.manual_seed(3)
    # init_lora_weights=False: PEFT leaves B random, so the adapter matters.
    pm = get_peft_model(make(), PeftLoraConfig(init_lora_weights=False, **kw)).eval()
    with torch.no_grad():
        theirs = pm(x).logits
        base_logits = make()(x).logits
    pm.save_pretrained(str(tmp_path / "peft"))

    ours_model = make()
    cfg = load_adapter(ours_model, tmp_path / "peft")
    assert cfg.r == kw["r"] and cfg.use_rslora == kw.get("use_rslora", False)
    with torch.no_grad():
        ours = ours_model(x).logits
    assert not torch.allclose(theirs, base_logits, atol=1e-3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # Scaling equals PEFT's for every layer (rsLoRA included).
    peft_scaling = {n.removeprefix("base_model.model."): m.scaling["default"]
                    for n, m in pm.named_modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)}
    for name, layer in lora_layers(ours_model):
        assert layer.scaling == pytest.approx(peft_scaling[name], rel=1e-12)


def test_saved_config_is_peft_readable_json(tmp_path, llama):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inject(llama, cfg)
    save_adapter(llama, cfg, tmp_path / "a", base_identity={"name": "tiny", "weights_sha256": "ab" * 32})
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["target_modules"] == ["q_proj", "v_proj"]
    assert data["base_model_name_or_path"] == "tiny"


class _no_peft_warnings:
    """Fail if PEFT warns while loading (missing/unexpected keys, unknown config fields)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        bad = [str(r.message) for r in self.records
               if "peft" in (r.filename or "") or "adapter" in str(r.message).lower()]
        assert not bad, bad
        return False
