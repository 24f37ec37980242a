"""`lorakit combine` against PEFT's `add_weighted_adapter` as the oracle, plus its errors.

Our `linear` / `ties` / `dare_linear` / `dare_ties` / `magnitude_prune` are PEFT's `svd` /
`ties_svd` / `dare_linear_svd` / `dare_ties_svd` / `magnitude_prune_svd` (full updates combined,
then a rank-R SVD); our `cat` is PEFT's `cat`. Both sides are compared on each module's full update
`scaling * B A`, which is unique even where the SVD factors differ in sign.

DARE: PEFT draws its masks with `torch.bernoulli` from the global RNG, module by module in model
order and adapter by adapter; we draw from a generator seeded with `seed` in sorted module order.
The DARE cases target q_proj and v_proj only, whose model order is their sorted order, and re-seed
the global RNG with the same seed right after PEFT has created the combined adapter's layers
(creating them draws from the RNG too) and before its per-module loop, so both sides draw the
same masks from the same stream.
"""

import json

import pytest
import torch

from lorakit.adapters import load_adapter, read_adapter, save_adapter
from lorakit.adapters.combine import COMBINE_KEY, combine_adapters, combine_deltas
from lorakit.cli import main
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora import LoraConfig, inject
from tests import tiny
from tests.lora.test_layer import randomize_b

peft = pytest.importorskip("peft")

BASE = {"name": "tiny", "weights_sha256": "1" * 64}
TARGETS = ["q_proj", "v_proj", "down_proj"]
DARE_TARGETS = ["q_proj", "v_proj"]  # model order == sorted order, so PEFT draws in our order
# (r, lora_alpha, use_rslora): different ranks and scalings; rsLoRA not first (see the report on
# PEFT carrying the first adapter's use_rslora into the combined config).
SHAPES = [(4, 8, False), (4, 16, True), (2, 4, False)]
WEIGHTS = [0.7, -0.4, 1.2]


def ids(seed=0):
    return torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(seed))


def make_adapter(out, r, alpha, rslora=False, targets=TARGETS, seed=0, identity=BASE, make=tiny.tiny_llama):
    model = make()
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
    torch.manual_seed(100 + seed)  # a different A per adapter
    inject(model, cfg)
    randomize_b(model, seed=seed)
    return save_adapter(model, cfg, out, base_identity=identity)


def make_adapters(tmp_path, targets=TARGETS, make=tiny.tiny_llama):
    return [make_adapter(tmp_path / f"in{i}", r, a, rs, targets, seed=i, make=make)
            for i, (r, a, rs) in enumerate(SHAPES)]


def peft_combined(dirs, combination_type, make=tiny.tiny_llama, reseed=None, **kw):
    """A PEFT model holding the inputs as a0.. and their combination as `combined`."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(make(), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        pm.load_adapter(str(d), adapter_name=f"a{i}")
    if reseed is not None:
        lora_model = pm.base_model
        create = lora_model.inject_adapter

        def create_then_seed(*args, **kwargs):
            out = create(*args, **kwargs)
            torch.manual_seed(reseed)
            return out
        lora_model.inject_adapter = create_then_seed
    pm.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], WEIGHTS, "combined",
                            combination_type=combination_type, **kw)
    return pm.eval()


def peft_updates(pm, adapter="combined"):
    """module -> scaling * B A of one PEFT adapter, (d_out, d_in)."""
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and adapter in m.lora_A:
            d = m.get_delta_weight(adapter).detach()
            out[name] = d.T if m.fan_in_fan_out else d
    return out


def our_updates(adapter_dir):
    files = read_adapter(adapter_dir)
    return {m: files.config.scaling_for(m) * (files.tensors[f"base_model.model.{m}.lora_B.weight"]
                                               @ files.tensors[f"base_model.model.{m}.lora_A.weight"])
            for m in files.modules()}


def assert_same_updates(ours, theirs, atol=1e-5):
    assert sorted(ours) == sorted(theirs)
    for m in ours:
        assert ours[m].abs().max() > 1e-2, m  # the combination is not empty
        torch.testing.assert_close(ours[m], theirs[m], atol=atol, rtol=0, msg=m)


# (our method, PEFT combination_type, extra options, targets)
PEFT_CASES = [
    ("linear", "svd", {}, TARGETS),
    ("ties", "ties_svd", {"density": 0.5}, TARGETS),
    ("ties", "ties_svd", {"density": 0.3, "majority_sign_method": "frequency"}, TARGETS),
    ("magnitude_prune", "magnitude_prune_svd", {"density": 0.4}, TARGETS),
    ("dare_linear", "dare_linear_svd", {"density": 0.6, "seed": 11}, DARE_TARGETS),
    ("dare_ties", "dare_ties_svd", {"density": 0.5, "seed": 5, "majority_sign_method": "frequency"},
     DARE_TARGETS),
    ("cat", "cat", {}, TARGETS),
]


@pytest.mark.parametrize("method, peft_type, options, targets", PEFT_CASES,
                         ids=[f"{c[0]}-{c[1]}" + ("-freq" if "majority_sign_method" in c[2] else "")
                              for c in PEFT_CASES])
def test_matches_peft_add_weighted_adapter(method, peft_type, options, targets, tmp_path):
    options = dict(options)
    dirs = make_adapters(tmp_path, targets)
    rank = None if method == "cat" else sum(r for r, _, _ in SHAPES)  # 10: exact for linear
    result = combine_adapters(dirs, WEIGHTS, method, tmp_path / "out", rank=rank, **options)
    seed = options.pop("seed", None)
    pm = peft_combined(dirs, peft_type, reseed=seed, svd_rank=rank, **options)
    assert result.rank == 10
    assert_same_updates(our_updates(tmp_path / "out"), peft_updates(pm))
    inputs = [peft_updates(pm, f"a{i}") for i in range(3)]
    linear = {m: sum(w * u[m] for w, u in zip(WEIGHTS, inputs)) for m in inputs[0]}
    if method in ("linear", "cat"):
        # Rank 10 holds the weighted sum exactly: compare with a reference written out here.
        assert_same_updates(our_updates(tmp_path / "out"), linear)
        if method == "cat":
            assert result.max_rel_error is None
        else:
            assert result.max_rel_error < 1e-5
    else:
        # Trimming makes the update full-rank: the rank-10 cut loses something, and says so.
        assert 1e-3 < result.max_rel_error < 1
        ours = our_updates(tmp_path / "out")
        assert all(not torch.allclose(ours[m], linear[m], atol=1e-3) for m in ours)


def test_dare_on_gpt2_conv1d_matches_peft(tmp_path):
    """Conv1D stores weights (d_in, d_out): masks are drawn in that layout on both sides."""
    dirs = make_adapters(tmp_path, ["c_attn"], make=tiny.tiny_gpt2)
    combine_adapters(dirs, WEIGHTS, "dare_ties", tmp_path / "out", density=0.5, rank=10, seed=3)
    pm = peft_combined(dirs, "dare_ties_svd", make=tiny.tiny_gpt2, reseed=3, svd_rank=10, density=0.5)
    assert_same_updates(our_updates(tmp_path / "out"), peft_updates(pm))


def test_ties_math_on_a_hand_example():
    """Trim to the top half by magnitude, elect signs by total, average the agreeing weighted entries."""
    d1 = torch.tensor([[4.0, -1.0], [0.5, 3.0]])
    d2 = torch.tensor([[-1.5, 5.0], [0.1, 2.0]])
    w = torch.tensor([1.0, 0.5])
    # Kept: d1 -> 4 at (0,0), 3 at (1,1); d2 -> 5 at (0,1), 2 at (1,1). All kept entries are
    # positive, so each entry is the mean of its kept weighted values: (1,1) = (3 + 0.5*2) / 2.
    got = combine_deltas("ties", [d1, d2], w, density=0.5)
    torch.testing.assert_close(got, torch.tensor([[4.0, 2.5], [0.0, (3.0 + 1.0) / 2]]))
    # Without the trim, (0,0) holds 4 and -1.5: the total elects +, only d1 agrees.
    got = combine_deltas("ties", [d1, d2], w, density=1.0)
    assert got[0, 0] == 4.0 and got[1, 0] == pytest.approx((0.5 + 0.05) / 2)


def test_default_rank_is_the_largest_input_rank_with_its_error(tmp_path):
    dirs = make_adapters(tmp_path)
    result = combine_adapters(dirs, WEIGHTS, "linear", tmp_path / "out")
    assert result.rank == 4
    exact = combine_adapters(dirs, WEIGHTS, "linear", tmp_path / "exact", rank=10)
    ours, full = our_updates(tmp_path / "out"), our_updates(tmp_path / "exact")
    worst = max(float((full[m] - ours[m]).norm() / full[m].norm()) for m in full)
    assert result.max_rel_error == pytest.approx(worst, rel=1e-3)
    assert 0.05 < result.max_rel_error < 1 and exact.max_rel_error < 1e-5


def test_dare_seed_decides_the_masks(tmp_path):
    dirs = make_adapters(tmp_path)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        combine_adapters(dirs, WEIGHTS, "dare_linear", tmp_path / name, density=0.5, seed=seed)
    a, b, c = (our_updates(tmp_path / n) for n in "abc")
    for m in a:
        assert torch.equal(a[m], b[m])
        assert not torch.allclose(a[m], c[m], atol=1e-3)


def test_written_adapter_loads_in_lorakit_and_peft_with_same_logits(tmp_path):
    from peft import PeftModel

    dirs = make_adapters(tmp_path)
    combine_adapters(dirs, WEIGHTS, "cat", tmp_path / "cat")
    combine_adapters(dirs, WEIGHTS, "ties", tmp_path / "ties", density=0.5)
    x = ids()
    with torch.no_grad():
        base_logits = tiny.tiny_llama()(x).logits
        # PEFT's own cat combination, as the model it would serve.
        pm = peft_combined(dirs, "cat")
        pm.set_adapter("combined")
        peft_cat = pm(x).logits
    for out in ("cat", "ties"):
        ours = tiny.tiny_llama()
        cfg = load_adapter(ours, tmp_path / out)
        assert cfg.scaling == 1.0 and not cfg.use_rslora
        theirs = PeftModel.from_pretrained(tiny.tiny_llama(), str(tmp_path / out)).eval()
        with torch.no_grad():
            ours_logits, theirs_logits = ours(x).logits, theirs(x).logits
        assert not torch.allclose(ours_logits, base_logits, atol=1e-3)
        torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-5, rtol=0)
        if out == "cat":
            torch.testing.assert_close(ours_logits, peft_cat, atol=1e-5, rtol=0)
    files = read_adapter(tmp_path / "ties")
    assert files.base_weights_sha256 == BASE["weights_sha256"] and files.base_model == "tiny"
    assert files.config.r == 4 and files.config.target_modules == sorted(TARGETS)


def test_cli_combine_prints_summary_and_records_how(tmp_path, capsys):
    from safetensors import safe_open

    dirs = make_adapters(tmp_path)
    code = main(["combine", "--method", "dare_ties", "--adapters", *map(str, dirs),
                 "--weights", *map(str, WEIGHTS), "--density", "0.5", "--seed", "4",
                 "--rank", "6", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "dare_ties: 6 modules, rank 6 (scaling 1)" in out and "SVD error" in out
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()[COMBINE_KEY])
    assert recorded["weights"] == WEIGHTS and recorded["seed"] == 4 and recorded["rank"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1", "in2", "out"]


# ---- errors ------------------------------------------------------------------------------------

def test_different_bases_refused(tmp_path):
    a = make_adapter(tmp_path / "a", 4, 8)
    b = make_adapter(tmp_path / "b", 4, 8, identity={"name": "other", "weights_sha256": "2" * 64})
    with pytest.raises(AdapterError, match=r"b: trained on base 'other' \(weights 222222222222\), "
                                           r"but .*a on 'tiny' \(weights 111111111111\)"):
        combine_adapters([a, b], [1, 1], "linear", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_different_module_sets_refused(tmp_path):
    a = make_adapter(tmp_path / "a", 4, 8)
    b = make_adapter(tmp_path / "b", 4, 8, targets=["q_proj", "v_proj"])
    with pytest.raises(AdapterError, match=r"b: has no module model.layers.0.mlp.down_proj "
                                           r"\(which .*a adapts\)"):
        combine_adapters([a, b], [1, 1], "cat", tmp_path / "out")


def test_dora_adapter_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    a = make_adapter(tmp_path / "a", 4, 8)
    b = make_adapter(tmp_path / "b", 4, 8)
    config = json.loads((b / "adapter_config.json").read_text())
    config["use_dora"] = True
    (b / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(b / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        module = key.removesuffix(".lora_B.weight")
        tensors[f"{module}.lora_magnitude_vector"] = torch.ones(tensors[key].shape[0])
    save_file(tensors, str(b / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"b/adapter_config.json: use_dora is true; DoRA adapters "
                                           r"cannot be combined"):
        combine_adapters([a, b], [1, 1], "linear", tmp_path / "out")


def test_wrong_weights_count_refused(tmp_path):
    dirs = make_adapters(tmp_path)
    with pytest.raises(ConfigError, match=r"--weights: got 2 value\(s\) for 3 adapter\(s\)"):
        combine_adapters(dirs, [1, 1], "linear", tmp_path / "out")


def test_option_problems_listed_together_and_cli_prints_one_error(tmp_path, capsys):
    dirs = make_adapters(tmp_path)
    with pytest.raises(ConfigError) as e:
        combine_adapters(dirs, WEIGHTS, "ties", tmp_path / "out", seed=1, majority_sign_method="sum")
    assert [p.split(":")[0].strip() for p in str(e.value).splitlines()[1:]] == [
        "--density", "--majority-sign-method", "--seed"]
    code = main(["combine", "--method", "cat", "--adapters", *map(str, dirs), "--weights", "1",
                 "--rank", "4", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit combine: error: combine: bad options:") and "--weights" in err
