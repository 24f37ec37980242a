"""`torchrun -m lorakit train` on this CPU: two gloo ranks compute what one process computes.

Each distributed run is a real `python -m torch.distributed.run --nproc_per_node 2 -m lorakit
train CONFIG` on a tiny Llama saved to disk; the one-process reference trains the same config
in-process. A `sitecustomize` put on the children's PYTHONPATH records, per rank, every file
operation under the run folder (Python's audit hooks, PEP 578), so "only rank 0 wrote" is
observed, not assumed; the same file injects a crash on one rank for the failure test.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.config import load_config
from lorakit.train.distributed import Distributed, setup
from lorakit.train.loop import train
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "black", "white"]

SITECUSTOMIZE = textwrap.dedent('''
    import os
    import sys

    _run, _log = os.environ.get("LORAKIT_TEST_RUN_DIR"), os.environ.get("LORAKIT_TEST_WRITE_LOG")
    _rank = os.environ.get("RANK", "launcher")
    _EVENTS = ("open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir",
               "shutil.rmtree", "os.truncate")

    def _writes(event, args):
        if event != "open":
            return True
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def _hook(event, args):
        if event not in _EVENTS or not args or not isinstance(args[0], (str, os.PathLike)):
            return
        path = os.fspath(args[0])
        if path.startswith(_run) and _writes(event, args):
            with open(f"{_log}.{_rank}", "a") as f:
                f.write(f"{event} {path}\\n")

    if _run and _log:
        sys.addaudithook(_hook)

    if os.environ.get("LORAKIT_TEST_FAIL_RANK") == _rank:
        import torch

        _step, _calls = torch.optim.AdamW.step, [0]

        def _failing_step(self, *args, **kwargs):
            _calls[0] += 1
            if _calls[0] == 3:
                raise RuntimeError(f"injected failure on rank {_rank} at step 3")
            return _step(self, *args, **kwargs)

        torch.optim.AdamW.step = _failing_step
''')


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and tokenizer saved as a transformers folder (what `model.name` points to)."""
    path = tmp_path_factory.mktemp("tiny_base")
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a wider head, so a few steps move the loss visibly
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_config(folder: Path, base_dir: Path, method: str = "lora", **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "toy.jsonl", "w") as f:
        for i in range(60):
            colour = COLOURS[i % len(COLOURS)]
            f.write(json.dumps({"instruction": "what colour is the bike?",
                                "input": f"the bike is {colour} {i}", "output": colour}) + "\n")
    raw = {
        "model": {"name": str(base_dir), "dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": {"train": "toy.jsonl", "max_seq_len": 64, "val_fraction": 0.1},
        "train": {"output_dir": str(folder / "run"), "method": method, "batch_size": 4,
                  "grad_accum": 2, "lr": 3e-3, "warmup_ratio": 0.1, "max_steps": 4,
                  "eval_every": 2, "save_every": 2, "threads": 1, **train},
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    return folder / "run.yaml"


def torchrun(config: Path, *extra: str, fail_rank: str | None = None, background: bool = False):
    """Two gloo ranks of `lorakit train`, with per-rank write logs beside the config."""
    site = config.parent / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "OMP_NUM_THREADS": "1", "LORAKIT_TEST_RUN_DIR": str(config.parent / "run"),
           "LORAKIT_TEST_WRITE_LOG": str(config.parent / "writes")}
    if fail_rank is not None:
        env["LORAKIT_TEST_FAIL_RANK"] = fail_rank
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lorakit", "train", str(config), *extra]
    if background:
        return subprocess.Popen(cmd, env=env, cwd=config.parent, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, cwd=config.parent, capture_output=True, text=True,
                          timeout=300)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_close(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)
        assert diff < rel, (k, float(diff))


DDP = dict(max_steps=12, save_every=1, eval_every=6, keep_checkpoints=20)


@pytest.fixture(scope="module")
def ddp_runs(base_dir, tmp_path_factory):
    """(one-process run, 2-rank DDP run folder, its process): same config, global batch 4 x 2."""
    root = tmp_path_factory.mktemp("ddp")
    one = write_config(root / "one", base_dir, **DDP)
    train(load_config(one), progress=False)
    two = write_config(root / "two", base_dir, **DDP)
    return root / "one" / "run", root / "two", torchrun(two)


def test_ddp_two_ranks_write_the_adapter_one_process_writes(ddp_runs):
    one, two, proc = ddp_runs
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ddp, 2 ranks" in proc.stdout + proc.stderr
    assert yaml.safe_load((two / "run" / "config.yaml").read_text())["train"]["distributed"] == "ddp"
    state = json.loads((two / "run" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert (state["distributed"], state["world_size"]) == ("ddp", 2)
    a = load_file(str(two / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # the adapter trained
    assert_close(a, b)
    assert len(losses(two / "run")) == 12
    assert losses(two / "run") == pytest.approx(losses(one), rel=1e-5)
    # Rank 0 wrote the run folder; rank 1 touched nothing in it; one summary line was printed.
    assert "adapter" in (two / "writes.0").read_text()
    assert not (two / "writes.1").exists()
    assert (proc.stdout + proc.stderr).count("adapter written to") == 1


def test_ddp_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(ddp_runs, base_dir, tmp_path):
    _, two, _ = ddp_runs
    config = write_config(tmp_path, base_dir, **DDP)
    proc = torchrun(config, background=True)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts / "step-00000002" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "adapter").exists(), "the run finished before it was killed"
    resumed = torchrun(config, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "run" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "run") == losses(two / "run")


def test_fsdp_full_fine_tune_on_two_ranks_equals_one_process(base_dir, tmp_path):
    # batch 3: rank 0 takes two examples of each micro-batch, rank 1 one. Blocks are recomputed
    # in the backward pass on both sides (the usual FSDP recipe for big models), so the test also
    # covers FSDP's all-gather inside the recomputation.
    kw = dict(method="full", distributed="fsdp", batch_size=3, lr=1e-3, max_steps=3,
              gradient_checkpointing=True)
    train(load_config(write_config(tmp_path / "one", base_dir, **kw)), progress=False)
    proc = torchrun(write_config(tmp_path / "two", base_dir, **kw))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fsdp, 2 ranks" in proc.stdout + proc.stderr
    a = load_file(str(tmp_path / "two" / "run" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "run" / "model" / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert_close(a, b)
    assert losses(tmp_path / "two" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-5)
    assert not (tmp_path / "two" / "writes.1").exists()


def test_a_failing_rank_fails_the_job_with_its_error(base_dir, tmp_path):
    config = write_config(tmp_path, base_dir, max_steps=6)
    start = time.monotonic()
    proc = torchrun(config, fail_rank="1")
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 120  # torchrun tore down the waiting rank; nothing hung
    assert not (tmp_path / "run" / "adapter").exists()


def test_strategy_choice_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = setup("auto", "cpu")
    assert (dist.strategy, dist.world_size, device.type) == ("none", 1, "cpu")
    assert dist.describe() == "one process"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="train.distributed: none, but torchrun started 2"):
        setup("none", "cpu")
    with pytest.raises(Exception, match="fsdp does not shard a quantized base"):
        setup("fsdp", "cpu", quantize_base="nf4")


def test_share_splits_every_example_once_and_never_leaves_a_rank_empty():
    batch = list(range(5))
    shares = [Distributed("ddp", r, 2).share(batch) for r in range(2)]
    assert sorted(shares[0].examples + shares[1].examples) == batch
    assert [s.weight for s in shares] == [1.0, 1.0]
    short = [Distributed("fsdp", r, 4).share([7, 8]) for r in range(4)]
    assert [s.examples for s in short] == [[7], [8], [7], [7]]
    assert [s.weight for s in short] == [1.0, 1.0, 0.0, 0.0]  # run for the collectives, weigh nothing
