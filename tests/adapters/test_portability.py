"""`lorakit check-adapter`: each finding on an adapter built to have it, and `--fix` outputs
checked by loading them (lorakit and PEFT, logits against the original) and by recomputing the
update each module gets under the target runtime's own scaling rule."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.adapters import load_adapter, save_adapter
from lorakit.adapters.io import HASH_KEY, NAME_KEY
from lorakit.adapters.portability import check_adapter, fix_adapter, installed_peft_fields
from lorakit.cli import main
from lorakit.lora import LoraConfig, inject
from tests import tiny
from tests.lora.test_layer import randomize_b

P = "base_model.model."
IDENTITY = {"name": "tiny-llama", "weights_sha256": "ab" * 32}


def ids(seed=0):
    return torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(seed))


def lorakit_adapter(path, **kw):
    """An adapter saved by lorakit from the tiny Llama, with B != 0."""
    model = tiny.tiny_llama()
    cfg = LoraConfig(**kw)
    inject(model, cfg)
    randomize_b(model)
    save_adapter(model, cfg, path, base_identity=IDENTITY)
    return path


def read_files(path):
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return json.loads((path / "adapter_config.json").read_text()), tensors, metadata


def rewrite(path, config_update=None, extra_tensors=None, drop_keys=()):
    """Edit an adapter directory by hand (what our saver cannot produce)."""
    config, tensors, metadata = read_files(path)
    config.update(config_update or {})
    for k in drop_keys:
        config.pop(k, None)
    tensors.update(extra_tensors or {})
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata=metadata)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def keyed(report, target=None):
    return {(f.target, f.severity, f.key.split(" ")[0]) for f in report.findings
            if target is None or f.target == target}


def peft_logits(path, x):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny.tiny_llama(), str(path)).eval()
    with torch.no_grad():
        return model(x).logits


def lorakit_logits(path, x):
    model = tiny.tiny_llama()
    load_adapter(model, path)
    with torch.no_grad():
        return model(x).logits


# --- A hand-written adapter with per-module ranks and alphas (PEFT's rank/alpha_pattern) -------

Q1 = "model.layers.1.self_attn.q_proj"


def pattern_adapter(path, use_rslora=False):
    """r=4, alpha=8; every v_proj rank 8; layer 1's q_proj alpha 32. Returns (path, {module:
    (A, B, scaling)}) with the scaling worked out here by hand (PEFT's meaning)."""
    model = tiny.tiny_llama()
    g = torch.Generator().manual_seed(7)
    tensors, truth = {}, {}
    for name, module in model.named_modules():
        if not name.endswith(("q_proj", "v_proj")):
            continue
        rank = 8 if name.endswith("v_proj") else 4
        alpha = 32.0 if name == Q1 else 8.0
        a = torch.randn(rank, module.in_features, generator=g) * 0.2
        b = torch.randn(module.out_features, rank, generator=g) * 0.5
        tensors[f"{P}{name}.lora_A.weight"], tensors[f"{P}{name}.lora_B.weight"] = a, b
        truth[name] = (a, b, alpha / (math.sqrt(rank) if use_rslora else rank))
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt", HASH_KEY: IDENTITY["weights_sha256"], NAME_KEY: "tiny-llama"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama",
              "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "use_rslora": use_rslora, "bias": "none", "use_dora": False, "init_lora_weights": True,
              "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"layers.1.self_attn.q_proj": 32}}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path, truth


def merged_logits(truth, x):
    """The original adapter's meaning, computed by hand: W + s_m B A in every module."""
    model = tiny.tiny_llama()
    with torch.no_grad():
        for name, (a, b, s) in truth.items():
            model.get_submodule(name).weight += s * b @ a
        return model(x).logits


def updates_under_rule(path, rule):
    """Each module's update as the runtime computes it from the files alone: vLLM one
    lora_alpha/r (rsLoRA only if the config says so); llama.cpp lora_alpha / tensor rank."""
    config, tensors, _ = read_files(path)
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(P):-len(".lora_A.weight")]
        b = tensors[f"{P}{module}.lora_B.weight"]
        if rule == "vllm":
            r = config["r"]
            s = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        else:
            s = config["lora_alpha"] / b.shape[1]
        out[module] = s * b.double() @ a.double()
    return out


# --- tests -----------------------------------------------------------------------------------

def test_clean_adapter_has_no_findings_and_exits_0(tmp_path, capsys):
    path = lorakit_adapter(tmp_path / "a", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    report = check_adapter(path)
    assert report.findings == [] and report.exit_code == 0
    assert main(["check-adapter", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vllm: nothing found" in out and "llama.cpp: nothing found" in out
    assert main(["check-adapter", str(path), "--json", "--target", "vllm"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["findings"] == [] and data["exit_code"] == 0 and data["targets"] == ["vllm"]


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["check-adapter", "--help"])
    out = capsys.readouterr().out
    assert "exit code: 0" in out and "1 error or misread" in out and "2 bad input" in out


def test_bad_input_is_one_line_error_exit_2(tmp_path, capsys):
    assert main(["check-adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such adapter directory" in err and len(err.strip().splitlines()) == 1


def test_dora_is_refused_by_vllm_and_llamacpp_and_has_no_fix(tmp_path, capsys):
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _, tensors, _ = read_files(path)
    mags = {k.replace("lora_B.weight", "lora_magnitude_vector"): torch.rand(t.shape[0]) + 0.5
            for k, t in tensors.items() if k.endswith("lora_B.weight")}
    rewrite(path, {"use_dora": True}, mags)
    report = check_adapter(path)
    assert ("vllm", "error", "use_dora") in keyed(report)
    assert any(f.target == "llama.cpp" and f.severity == "error" and "lora_magnitude_vector" in f.key
               for f in report.findings)
    assert keyed(report, "peft") == set()  # PEFT wrote it and reads it
    assert main(["check-adapter", str(path), "--fix", str(tmp_path / "out")]) == 1
    assert "no exact LoRA equivalent" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_modules_to_save_is_refused_and_cannot_be_dropped(tmp_path):
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    rewrite(path, {"modules_to_save": ["lm_head"]}, {f"{P}lm_head.weight": torch.randn(400, 64)})
    report = check_adapter(path)
    assert ("vllm", "error", "modules_to_save") in keyed(report)
    assert ("vllm", "error", f"{P}lm_head.weight") in keyed(report)
    assert ("llama.cpp", "error", f"{P}lm_head.weight") in keyed(report)
    _, fix = fix_adapter(path, tmp_path / "out", ["llama.cpp"])
    assert not fix.written and "cannot be dropped without changing outputs" in fix.message


def test_bias_and_lora_bias(tmp_path):
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    rewrite(path, {"bias": "all"})
    report = check_adapter(path)
    assert ("vllm", "error", "bias") in keyed(report)
    # No bias tensors in the file: the converter only sees tensors, so llama.cpp just ignores it.
    assert ("llama.cpp", "warning", "bias") in keyed(report) and report.exit_code == 1
    bias = f"{P}model.layers.0.self_attn.q_proj.bias"
    rewrite(path, extra_tensors={bias: torch.randn(64)})
    assert ("llama.cpp", "error", bias) in keyed(check_adapter(path))
    lb = tmp_path / "lb"
    lorakit_adapter(lb, r=4, lora_alpha=8, target_modules=["q_proj"])
    rewrite(lb, {"lora_bias": True}, {f"{P}model.layers.0.self_attn.q_proj.lora_B.bias": torch.randn(64)})
    found = keyed(check_adapter(lb, ["vllm", "llama.cpp"]))
    assert {("vllm", "error", f"{P}model.layers.0.self_attn.q_proj.lora_B.bias"),
            ("llama.cpp", "error", f"{P}model.layers.0.self_attn.q_proj.lora_B.bias")} <= found


def test_rslora_is_misread_by_llamacpp_only_and_fix_folds_it_into_alpha(tmp_path):
    x = ids()
    path = lorakit_adapter(tmp_path / "a", r=8, lora_alpha=16, target_modules="all-linear",
                           use_rslora=True)
    report = check_adapter(path)
    assert keyed(report) == {("llama.cpp", "misread", "use_rslora")}  # vLLM reads rsLoRA right
    _, fix = fix_adapter(path, tmp_path / "fixed", ["llama.cpp"])
    assert fix.written and not fix.lossy
    config, _, metadata = read_files(tmp_path / "fixed")
    assert config["use_rslora"] is False and config["r"] == 8
    assert config["lora_alpha"] == pytest.approx(16 * math.sqrt(8), rel=1e-12)
    assert metadata[HASH_KEY] == IDENTITY["weights_sha256"] and metadata[NAME_KEY] == "tiny-llama"
    assert check_adapter(tmp_path / "fixed").findings == []

    ours = lorakit_logits(path, x)
    assert not torch.allclose(ours, tiny.tiny_llama()(x).logits, atol=1e-3)
    torch.testing.assert_close(lorakit_logits(tmp_path / "fixed", x), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(peft_logits(tmp_path / "fixed", x), ours, atol=1e-5, rtol=0)
    # llama.cpp's rule (alpha / rank, rsLoRA ignored) on the fixed files gives the original update.
    _, orig, _ = read_files(path)
    for module, update in updates_under_rule(tmp_path / "fixed", "llama.cpp").items():
        a, b = orig[f"{P}{module}.lora_A.weight"].double(), orig[f"{P}{module}.lora_B.weight"].double()
        torch.testing.assert_close(update, 16 / math.sqrt(8) * b @ a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_and_their_fix(tmp_path, use_rslora):
    x = ids(1)
    path, truth = pattern_adapter(tmp_path / "a", use_rslora)
    reference = merged_logits(truth, x)
    # PEFT (the reference semantics) reads the hand-written adapter as worked out above.
    torch.testing.assert_close(peft_logits(path, x), reference, atol=1e-5, rtol=0)

    report = check_adapter(path)
    expected = {("vllm", "misread", "rank_pattern"), ("vllm", "misread", "alpha_pattern"),
                ("llama.cpp", "misread", "alpha_pattern")}
    if use_rslora:  # llama.cpp reads per-tensor ranks right, but not rsLoRA
        expected.add(("llama.cpp", "misread", "use_rslora"))
    assert keyed(report) == expected
    # The rules really do misread the original: v_proj (rank 8 != r=4) under vLLM's one alpha/r.
    v0 = "model.layers.0.self_attn.v_proj"
    a, b, s = truth[v0]
    assert not torch.allclose(updates_under_rule(path, "vllm")[v0], s * b.double() @ a.double())

    _, fix = fix_adapter(path, tmp_path / "fixed")  # all targets at once
    assert fix.written and not fix.lossy
    config, tensors, metadata = read_files(tmp_path / "fixed")
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"], config["use_rslora"]) == \
        (8, {}, {}, False)
    assert all(t.shape[0] == 8 for k, t in tensors.items() if k.endswith("lora_A.weight"))
    assert metadata[HASH_KEY] == IDENTITY["weights_sha256"]
    for rule in ("vllm", "llama.cpp"):
        updates = updates_under_rule(tmp_path / "fixed", rule)
        assert set(updates) == set(truth)
        for module, (a, b, s) in truth.items():
            torch.testing.assert_close(updates[module], s * b.double() @ a.double(), atol=1e-6, rtol=0)
    assert check_adapter(tmp_path / "fixed").findings == []
    torch.testing.assert_close(lorakit_logits(tmp_path / "fixed", x), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(peft_logits(tmp_path / "fixed", x), reference, atol=1e-5, rtol=0)


def test_rank_above_vllm_default_limit(tmp_path, capsys):
    path = lorakit_adapter(tmp_path / "a", r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"])
    report = check_adapter(path)
    assert keyed(report) == {("vllm", "error", "r")}
    assert "--max-lora-rank 32" in report.findings[0].action
    # Truncation is only done when the user names the rank to truncate to.
    assert main(["check-adapter", str(path), "--target", "vllm", "--fix", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()
    capsys.readouterr()
    assert main(["check-adapter", str(path), "--target", "vllm", "--max-lora-rank", "32"]) == 0
    # A per-module rank above the limit (rank_pattern) does not fit vLLM's slot either.
    p2, _ = pattern_adapter(tmp_path / "p")
    assert ("vllm", "error", "rank_pattern") in keyed(check_adapter(p2, ["vllm"], max_lora_rank=4))


def test_rank_truncation_by_svd_reports_the_loss(tmp_path, capsys):
    path = lorakit_adapter(tmp_path / "a", r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "fixed"
    assert main(["check-adapter", str(path), "--target", "vllm", "--max-lora-rank", "8",
                 "--fix", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fix"]["written"] and data["fix"]["lossy"]
    errors = data["fix"]["relative_errors"]
    _, orig, _ = read_files(path)
    fixed = updates_under_rule(out, "vllm")
    assert set(errors) == set(fixed) and len(errors) == 4
    for module, update in fixed.items():
        a = orig[f"{P}{module}.lora_A.weight"].double()
        b = orig[f"{P}{module}.lora_B.weight"].double()
        want = 64 / 32 * b @ a
        measured = ((update - want).norm() / want.norm()).item()
        sv = torch.linalg.svdvals(want)
        optimal = (sv[8:].square().sum() / sv.square().sum()).sqrt().item()  # Eckart-Young
        assert errors[module] == pytest.approx(measured, abs=1e-9)
        assert measured == pytest.approx(optimal, abs=1e-9) and measured > 0.05
    assert data["fix"]["max_relative_error"] == pytest.approx(max(errors.values()))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert check_adapter(out, ["vllm"], max_lora_rank=8).findings == []
    lorakit_logits(out, ids())  # loads in lorakit


def test_tensor_rank_disagreeing_with_config_is_an_error_everywhere(tmp_path):
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    rewrite(path, {"r": 8})
    report = check_adapter(path)
    assert [(f.target, f.severity) for f in report.findings] == [("all", "error")]
    assert "tensor rank differs" in report.findings[0].message


def test_base_changing_init_and_lm_head(tmp_path):
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    found = keyed(check_adapter(path))
    assert {("llama.cpp", "warning", "lm_head"), ("vllm", "warning", "lm_head")} <= found
    # PEFT saves a full copy of an adapted embedding's base layer: both runtimes skip it.
    copy = f"{P}model.embed_tokens.base_layer.weight"
    rewrite(path, extra_tensors={copy: torch.randn(400, 64)})
    report = check_adapter(path)
    assert {("vllm", "warning", copy), ("llama.cpp", "warning", copy)} <= keyed(report)
    assert report.exit_code == 0  # warnings only
    rewrite(path, {"init_lora_weights": "pissa"})
    found = keyed(check_adapter(path))
    assert {("vllm", "misread", "init_lora_weights"),
            ("llama.cpp", "misread", "init_lora_weights")} <= found
    _, fix = fix_adapter(path, tmp_path / "o", ["vllm"])
    assert not fix.written and "plain LoRA" in fix.message


def test_peft_version_and_unknown_keys(tmp_path):
    fields, version = installed_peft_fields()
    assert fields is not None and "use_dora" in fields
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    rewrite(path, {"future_option": None, "peft_version": "99.0.0"})
    report = check_adapter(path, ["peft"])
    assert keyed(report) == {("peft", "warning", "future_option"), ("peft", "warning", "peft_version")}
    assert report.exit_code == 0
    # A PEFT older than alpha_pattern drops it with a warning: the adapter is misread, and the
    # fix (the same adapter without patterns) is exact.
    p2, truth = pattern_adapter(tmp_path / "p")
    older = fields - {"alpha_pattern"}
    report = check_adapter(p2, ["peft"], peft_fields=older)
    assert keyed(report) == {("peft", "misread", "alpha_pattern")}
    _, fix = fix_adapter(p2, tmp_path / "fixed", ["peft"], peft_fields=older)
    assert fix.written
    for module, update in updates_under_rule(tmp_path / "fixed", "vllm").items():
        a, b, s = truth[module]
        torch.testing.assert_close(update, s * b.double() @ a.double(), atol=1e-6, rtol=0)


def test_fix_with_nothing_to_fix_writes_nothing_and_refuses_its_own_input(tmp_path):
    path = lorakit_adapter(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    _, fix = fix_adapter(path, tmp_path / "o")
    assert not fix.written and "nothing to fix" in fix.message and not (tmp_path / "o").exists()
    assert main(["check-adapter", str(path), "--fix", str(path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left behind
