"""The training loop on a tiny model: it learns, it leaves the base alone, it resumes exactly."""

import json
import shutil

import torch

from lorakit.config import build_config
from lorakit.train.loop import train
from tests import tiny

COLOURS = ["red", "blue", "green", "black", "white"]


def write_toy_data(path, n=60):
    """A learnable task: the answer is the colour named in the question."""
    with open(path, "w") as f:
        for i in range(n):
            colour = COLOURS[i % len(COLOURS)]
            row = {"instruction": "what colour is the bike?", "input": f"the bike is {colour} {i}",
                   "output": colour}
            f.write(json.dumps(row) + "\n")
    return path


def config(tmp_path, **train):
    raw = {
        "model": {"dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1},
        "data": {"train": str(write_toy_data(tmp_path / "toy.jsonl")), "max_seq_len": 64,
                 "val_fraction": 0.1},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 3e-3,
                  "warmup_ratio": 0.1, "log_every": 1, **train},
    }
    return build_config(raw)


def test_loss_goes_down_and_base_weights_stay_bit_identical(tmp_path):
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    # A frozen head initialised at std 0.02 caps how far any logit can move (|h| * |w| ~ 1);
    # a wider head lets a tiny model show learning in a few dozen steps.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(config(tmp_path, max_steps=40, eval_every=20, lr=1e-2), model=model, tokenizer=tok,
                   progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 40 and len(vals) == 2
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert vals[-1] < vals[0]
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            original = name.replace(".base.", ".")
            assert torch.equal(tensor, base[original]), name
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


def leave_as_crashed_after(run_dir, step: int, output: str) -> None:
    """Make a finished run look as a crash right after `step` would leave it: later checkpoints
    and the final `output` folder (adapter or model) gone."""
    for ckpt in (run_dir / "checkpoints").iterdir():
        if ckpt.name != f"step-{step:08d}":
            shutil.rmtree(ckpt)
    shutil.rmtree(run_dir / output)


def test_resume_mid_epoch_with_accumulation_is_bitwise_identical(tmp_path):
    from safetensors.torch import load_file

    # 54 train rows, batch 4: 14 micro-batches per epoch; accumulation 2 -> step 3 ends mid-epoch.
    kw = dict(max_steps=10, grad_accum=2, save_every=3, keep_checkpoints=5)
    (tmp_path / "a").mkdir()
    full = train(config(tmp_path / "a", **kw), model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
    (tmp_path / "b").mkdir()
    cfg_b = config(tmp_path / "b", **kw)
    train(cfg_b, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
    run_b = tmp_path / "b" / "run"
    leave_as_crashed_after(run_b, step=3, output="adapter")
    resumed = train(cfg_b, resume=True, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
                    progress=False)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.steps == full.steps == 10
    steps = [json.loads(x)["step"] for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps] == sorted(steps) and steps.count(4) == 1


def test_fast_and_plain_paths_learn_the_same(tmp_path):
    """The speed switches (bf16 LoRA matmuls, eager attention, head at supervised positions only,
    padding-free micro-batches, lean RMSNorm/SwiGLU, fused LoRA function) against the plain path
    (fp32 LoRA matmuls, SDPA, full-sequence head, padded batches, transformers' modules, unfused
    LoRA) on a bf16 base: same seed,
    same data, final losses within 2%. LoRA dropout is off: a packed row draws other dropout masks
    than a padded batch, and at this learning rate two dropout streams alone end far apart."""
    finals = {}
    for name, switches in {
        "fast": dict(lora_compute="base", attn_implementation="eager", loss_on_supervised_only=True,
                     padding_free=True, lean_activations=True, fused_lora=True),
        "plain": dict(lora_compute="fp32", attn_implementation="sdpa", loss_on_supervised_only=False,
                      padding_free=False, lean_activations=False, fused_lora=False),
    }.items():
        (tmp_path / name).mkdir()
        model = tiny.tiny_llama()
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
        model.to(torch.bfloat16)
        cfg = config(tmp_path / name, max_steps=30, eval_every=0, lr=1e-2, **switches)
        cfg.model.dtype, cfg.lora.lora_dropout = "bf16", 0.0
        result = train(cfg, model=model, tokenizer=tiny.tiny_tokenizer(), progress=False)
        rows = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        finals[name] = (sum(losses[-5:]) / 5, result.val_loss)
        assert finals[name][0] < 0.5 * sum(losses[:5]) / 5  # both actually learn
    (fast_train, fast_val), (plain_train, plain_val) = finals["fast"], finals["plain"]
    assert abs(fast_train - plain_train) <= 0.02 * plain_train, finals
    assert abs(fast_val - plain_val) <= 0.02 * plain_val, finals
