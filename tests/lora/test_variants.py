"""DoRA, per-module rank/alpha patterns, PiSSA and LoRA+, with PEFT as the oracle (tiny, fp32)."""

import json
import math

import pytest
import torch

from lorakit.adapters import load_adapter, read_adapter, save_adapter
from lorakit.lora import LoraConfig, inject, lora_layers, merge, unmerge
from tests import tiny
from tests.lora.test_layer import ids, randomize_b

peft = pytest.importorskip("peft")

DORA_CASES = [
    (tiny.tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    (tiny.tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    (tiny.tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
]
PATTERN_KW = dict(r=4, lora_alpha=8, target_modules="all-linear",
                  rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
                  alpha_pattern={"v_proj": 3.0, "up_proj": 32})


def randomize_dora(model, seed=2):
    """B random (as randomize_b) and every magnitude moved off ||W||, so DoRA's terms matter."""
    randomize_b(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))


def peft_load(make, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(make(), str(adapter_dir)).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("make, kw", DORA_CASES)
def test_dora_starts_at_base_and_matches_peft_both_ways(make, kw, tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    x = ids()
    base = logits(make(), x)
    ours = make()
    inject(ours, LoraConfig(use_dora=True, **kw))
    torch.testing.assert_close(logits(ours, x), base, atol=1e-5, rtol=0)
    randomize_dora(ours)
    ours_out = logits(ours, x)
    assert not torch.allclose(ours_out, base, atol=1e-3), "the adapter must change the output"
    save_adapter(ours, LoraConfig(use_dora=True, **kw), tmp_path / "ours")
    torch.testing.assert_close(logits(peft_load(make, tmp_path / "ours"), x), ours_out,
                               atol=1e-5, rtol=0)

    # PEFT's DoRA adapter (B random) read by us.
    torch.manual_seed(4)
    pm = get_peft_model(make(), PeftLoraConfig(use_dora=True, init_lora_weights=False, **kw)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = logits(pm, x)
    back = make()
    load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(logits(back, x), theirs, atol=1e-5, rtol=0)


def test_dora_merge_equals_peft_merge_and_unmerge_restores_base(tmp_path):
    kw = DORA_CASES[0][1]
    x = ids()
    model = tiny.tiny_llama()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, LoraConfig(use_dora=True, **kw))
    randomize_dora(model)
    unmerged = logits(model, x)
    save_adapter(model, LoraConfig(use_dora=True, **kw), tmp_path / "a")
    merge(model)
    merge(model)  # idempotent
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    # PEFT's merge_and_unload gives the same weights.
    merged_peft = peft_load(tiny.tiny_llama, tmp_path / "a").merge_and_unload()
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base.weight, merged_peft.get_submodule(name).weight,
                                   atol=1e-6, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base.weight, base_weights[name + ".weight"], atol=1e-5, rtol=0)


def test_dora_training_step_matches_peft():
    """One backward pass: the same gradients for A, B and the magnitude (norm held constant)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    x = ids()
    ours = tiny.tiny_llama()
    inject(ours, LoraConfig(use_dora=True, **kw))
    randomize_dora(ours)
    pm = get_peft_model(tiny.tiny_llama(), PeftLoraConfig(use_dora=True, **kw))
    pm.load_state_dict({("base_model.model." + k.replace(".lora_A.", ".lora_A.default.")
                         .replace(".lora_B.", ".lora_B.default.")
                         .replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")): v
                        for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    for m in (ours, pm):
        m.zero_grad()
        m(x, labels=x).loss.backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace(
        "lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
        for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and any("magnitude" in k for k in mine)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=1e-4)


def test_rank_and_alpha_patterns_match_peft_both_ways(tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    x = ids()
    cfg = LoraConfig(**PATTERN_KW)
    model = tiny.tiny_llama()
    inject(model, cfg)
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].r == 8
    assert layers["model.layers.1.mlp.down_proj"].r == 2
    assert layers["model.layers.0.mlp.down_proj"].r == 4
    assert layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(3.0 / 4)
    assert layers["model.layers.0.mlp.up_proj"].scaling == pytest.approx(32 / 4)
    randomize_b(model)
    ours = logits(model, x)
    save_adapter(model, cfg, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == PATTERN_KW["rank_pattern"]
    pm = peft_load(tiny.tiny_llama, tmp_path / "ours")
    torch.testing.assert_close(logits(pm, x), ours, atol=1e-5, rtol=0)
    peft_r = {n.removeprefix("base_model.model."): m.r["default"]
              for n, m in pm.named_modules() if isinstance(getattr(m, "r", None), dict)}
    assert peft_r == {n: layer.r for n, layer in layers.items()}

    torch.manual_seed(5)
    pm2 = get_peft_model(tiny.tiny_llama(), PeftLoraConfig(init_lora_weights=False, **PATTERN_KW)).eval()
    pm2.save_pretrained(str(tmp_path / "peft"))
    back = tiny.tiny_llama()
    load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(logits(back, x), logits(pm2, x), atol=1e-5, rtol=0)


def test_bad_patterns_listed():
    cfg = LoraConfig(rank_pattern={"q_proj": 0, "(": 4}, alpha_pattern={"v_proj": -1})
    problems = "\n".join(cfg.problems())
    assert "rank_pattern.q_proj: got 0" in problems
    assert "rank_pattern.(: not a valid regular expression" in problems
    assert "alpha_pattern.v_proj: got -1" in problems


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_initial_model_equals_base_and_matches_peft_init(init):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    x = ids()
    base = logits(tiny.tiny_llama(), x)
    torch.manual_seed(7)
    ours = tiny.tiny_llama()
    inject(ours, LoraConfig(init_lora_weights=init, **kw))
    torch.testing.assert_close(logits(ours, x), base, atol=1e-5, rtol=0)
    original = dict(tiny.tiny_llama().named_modules())
    for name, layer in lora_layers(ours):
        # The adapter holds the principal part: s B A is W's best rank-r approximation (up to
        # the randomised SVD's error with niter), and the base keeps the rest.
        u, s, vh = torch.linalg.svd(original[name].weight.detach(), full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        if init == "pissa":
            torch.testing.assert_close(layer.delta_weight(), best, atol=1e-5, rtol=0)
        else:  # randomised: within 2% of the best rank-r residual (random weights: flat spectrum)
            w = original[name].weight.detach()
            assert (w - layer.delta_weight()).norm() <= 1.02 * (w - best).norm()
    if init == "pissa":  # the deterministic form equals PEFT's factor for factor
        pm = get_peft_model(tiny.tiny_llama(), PeftLoraConfig(init_lora_weights=init, **kw))
        for name, layer in lora_layers(ours):
            theirs = pm.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.lora_A.weight, theirs.lora_A["default"].weight,
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.lora_B.weight, theirs.lora_B["default"].weight,
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.base.weight, theirs.base_layer.weight, atol=1e-5, rtol=0)


def test_pissa_adapter_is_written_as_lora_on_the_original_base(tmp_path):
    """After training moves A and B, the saved rank-2r LoRA on the untouched base gives the same
    outputs as the trained residual model; PEFT reads it too; PEFT's raw PiSSA form loads in ours."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True)
    cfg = LoraConfig(init_lora_weights="pissa", **kw)
    x = ids()
    model = tiny.tiny_llama()
    inject(model, cfg)
    with torch.no_grad():  # a stand-in for training: move every A and B
        g = torch.Generator().manual_seed(3)
        for _, layer in lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    trained = logits(model, x)
    assert not torch.allclose(trained, logits(tiny.tiny_llama(), x), atol=1e-3)
    save_adapter(model, cfg, tmp_path / "lora")
    files = read_adapter(tmp_path / "lora")
    assert files.config.r == 8 and files.config.init_lora_weights is True
    assert files.config.scaling == pytest.approx(cfg.scaling)
    fresh = tiny.tiny_llama()
    load_adapter(fresh, tmp_path / "lora")
    torch.testing.assert_close(logits(fresh, x), trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(peft_load(tiny.tiny_llama, tmp_path / "lora"), x), trained,
                               atol=1e-5, rtol=0)

    # The raw form (as PEFT's save_pretrained writes PiSSA by default) loads by redoing the SVD.
    save_adapter(model, cfg, tmp_path / "raw", pissa_as_lora=False)
    assert read_adapter(tmp_path / "raw").config.init_lora_weights == "pissa"
    again = tiny.tiny_llama()
    load_adapter(again, tmp_path / "raw")
    torch.testing.assert_close(logits(again, x), trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(peft_load(tiny.tiny_llama, tmp_path / "raw"), x), trained,
                               atol=1e-5, rtol=0)


def test_loraplus_groups_b_and_magnitudes_at_ratio():
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.config import TrainSection
    from lorakit.train.loop import param_groups

    model = tiny.tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = param_groups(named, TrainSection(loraplus_lr_ratio=16.0))
    fast = {id(p) for p in groups[1]["params"]}
    assert groups[1]["lr_scale"] == 16.0 and groups[0]["lr_scale"] == 1.0
    assert {n for n, p in named if id(p) in fast} == {n for n, _ in named
                                                      if "lora_B" in n or "magnitude" in n}
    # PEFT puts the same parameters in its faster groups.
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    peft_fast = {id(p) for g in opt.param_groups if g["lr"] == pytest.approx(16e-3) for p in g["params"]}
    assert peft_fast == fast
    assert len(param_groups(named, TrainSection())) == 1


def test_loraplus_and_dora_train_end_to_end(tmp_path):
    """A short real run with DoRA and LoRA+ writes an adapter PEFT loads with the same logits."""
    from lorakit.config import build_config
    from lorakit.train.loop import train

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"say {w}", "output": w} for w in ("price", "condition", "hello") * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config({
        "model": {"dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "max_seq_len": 64},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8, "lr": 1e-2,
                  "loraplus_lr_ratio": 8.0, "warmup_ratio": 0.0},
    })
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    result = train(cfg, model=model, tokenizer=tok, progress=False)
    x = ids()
    trained = logits(model.eval(), x)
    assert math.isfinite(result.train_loss)
    m = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"].lora_magnitude_vector
    assert not torch.allclose(m, m.detach().clone().fill_(0))
    torch.testing.assert_close(logits(peft_load(tiny.tiny_llama, result.adapter_dir), x), trained,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("make, kw", [
    (tiny.tiny_llama, PATTERN_KW),
    (tiny.tiny_llama, dict(DORA_CASES[1][1], use_dora=True)),
    (tiny.tiny_gpt2, dict(DORA_CASES[2][1], use_dora=True)),
])
def test_pure_merged_state_dict_equals_layer_merge(make, kw, tmp_path):
    """`merged_state_dict` (export's pure form) gives the weights `merge` gives, per-module
    scaling and DoRA magnitudes included."""
    from lorakit.adapters.merge import merged_state_dict
    from lorakit.lora.layer import is_conv1d

    base = make()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    conv1d = {n for n, m in base.named_modules() if is_conv1d(m)}
    cfg = LoraConfig(**kw)
    inject(base, cfg)
    randomize_dora(base) if cfg.use_dora else randomize_b(base)
    save_adapter(base, cfg, tmp_path / "a")
    pure = merged_state_dict(state, read_adapter(tmp_path / "a"), conv1d)
    merge(base)
    for name, layer in lora_layers(base):
        torch.testing.assert_close(pure[f"{name}.weight"], layer.base.weight, atol=1e-6, rtol=0)
        assert not torch.allclose(pure[f"{name}.weight"], state[f"{name}.weight"], atol=1e-4)


@pytest.mark.parametrize("lora", [{"init_lora_weights": "pissa"}, {"use_dora": True}])
def test_variant_resume_is_bitwise_identical(lora, tmp_path):
    """PiSSA checkpoints keep the raw A, B (the residual base is recomputed on resume) and DoRA
    checkpoints carry the magnitudes; with LoRA+ groups, a resumed run equals an uninterrupted one
    and writes the same final adapter (PiSSA: as its rank-2r LoRA)."""
    from safetensors.torch import load_file

    from lorakit.lora.config import LoraConfig as _Cfg
    from lorakit.train.loop import train
    from tests.train.test_loop import config, leave_as_crashed_after

    kw = dict(max_steps=6, save_every=3, keep_checkpoints=5, loraplus_lr_ratio=4.0)
    runs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = config(tmp_path / name, **kw)
        cfg.lora = _Cfg(**{**vars(cfg.lora), "lora_dropout": 0.0, **lora})
        runs[name] = (cfg, train(cfg, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
                                 progress=False))
    cfg_b, _ = runs["b"]
    leave_as_crashed_after(tmp_path / "b" / "run", step=3, output="adapter")
    resumed = train(cfg_b, resume=True, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
                    progress=False)
    a = load_file(str(runs["a"][1].adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if "init_lora_weights" in lora:
        assert read_adapter(resumed.adapter_dir).config.r == 8  # written as a rank-2r LoRA
