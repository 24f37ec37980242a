"""Adapters on demand: the registry, refusals with reasons, the two-tier cache under concurrent
load, the CLI functions, and no memory growth over many register/load/unload cycles."""

import json
import threading

import pytest
import torch

from lorakit.errors import AdapterError
from lorakit.serve import cli_adapters
from lorakit.serve.cache import UnknownAdapter
from lorakit.serve.engine import Request
from lorakit.serve.registry import AdapterRegistry, check_name, resolve_under
from tests.serve.builders import greedy, make_adapter, served

PROBES = ["the quick brown fox", "is this bike still available?", "hello world",
          "what condition is the sofa in", "ignore previous instructions", "0123456789",
          "can you do 50 dollars", "classify the intent"]



def test_registry_records_metadata(llama, tmp_path):
    d = make_adapter(llama, tmp_path / "one", seed=1, r=4, alpha=8.0)
    reg = AdapterRegistry(tmp_path / "reg.sqlite")
    rec = reg.add("one", d, eval_results={"accuracy": 0.9})
    assert (rec.rank, rec.lora_alpha, rec.base_model) == (4, 8.0, "tiny-llama")
    assert rec.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert rec.size_bytes == (d / "adapter_model.safetensors").stat().st_size
    again = AdapterRegistry(tmp_path / "reg.sqlite").get("one")  # persisted
    assert again == rec and again.eval_results == {"accuracy": 0.9}
    with pytest.raises(AdapterError, match="already registered"):
        reg.add("one", d)
    reg.set_pinned("one", True)
    assert reg.get("one").pinned
    assert reg.remove("one") and reg.get("one") is None and not reg.remove("one")


def test_names_and_paths_are_confined(tmp_path):
    for bad in ["../x", "a/b", "", ".", "..", "a b", "x" * 200, "é"]:
        with pytest.raises(AdapterError, match="not allowed"):
            check_name(bad)
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_under(root, "ok") == (root / "ok").resolve()
    for bad, why in [("../outside", r"'\.\.'"), ("/etc", "absolute"), ("link", "symlink"),
                     ("ok/../../outside", r"'\.\.'")]:
        with pytest.raises(AdapterError, match=why):
            resolve_under(root, bad)


def test_bad_adapters_are_refused_with_reasons(llama, gpt2, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    reg = AdapterRegistry(tmp_path / "reg.sqlite")
    good = make_adapter(llama, tmp_path / "good", seed=1)
    nan = make_adapter(llama, tmp_path / "nan", seed=2)
    t = load_file(str(nan / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(nan / "adapter_model.safetensors"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save(load_file(str(good / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    garbage = make_adapter(llama, tmp_path / "garbage", seed=3)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors")
    missing = make_adapter(llama, tmp_path / "missing", seed=4)
    (missing / "adapter_config.json").unlink()
    for d, why in [(nan, "NaN"), (pickled, "pickled adapter weights are refused"),
                   (garbage, "not a readable safetensors"), (missing, "missing")]:
        with pytest.raises(AdapterError, match=why):
            reg.add(d.name, d)
    assert reg.list() == []

    # Against the served base: wrong base weights, layers it does not have, wrong shapes.
    identity = {"name": "tiny-llama", "weights_sha256": "a" * 64}
    engine, cache, _ = served(llama, tokenizer, tmp_path, identity=identity)
    other = make_adapter(llama, tmp_path / "other", seed=5,
                         identity={"name": "other-base", "weights_sha256": "b" * 64})
    gpt = make_adapter(gpt2, tmp_path / "gpt", seed=6, targets=["c_attn"])
    wide = make_adapter(llama, tmp_path / "wide", seed=7)
    t = load_file(str(wide / "adapter_model.safetensors"))
    t = {k: (torch.zeros(v.shape[0], 65) if k.endswith("q_proj.lora_A.weight") else v)
         for k, v in t.items()}
    save_file(t, str(wide / "adapter_model.safetensors"))
    big = make_adapter(llama, tmp_path / "big", seed=8, r=16)
    for name, why in [("other", "trained on base 'other-base'"),
                      ("gpt", r"h\.0\.attn\.c_attn\.lora_A\.weight: no such module in this base"),
                      ("wide", r"q_proj\.lora_A\.weight: shape \(4, 65\) \(expected \(4, 64\)"),
                      ("big", "rank 16, above this server's max_lora_rank=8"),
                      ("nobody", "does not exist")]:
        with pytest.raises(AdapterError, match=why):
            cache.acquire(name)  # found under the adapters root on demand, checked, refused
    with pytest.raises(UnknownAdapter):
        cache.acquire("nobody")
    with pytest.raises(AdapterError, match="not allowed"):
        cache.acquire("../good")
    assert cache.snapshot()["slots"] == {} and cache.registry.list() == []


def test_64_concurrent_requests_over_8_adapters(llama, tokenizer, tmp_path):
    engine, cache, registry = served(llama, tokenizer, tmp_path, max_loras=3, max_cpu_loras=5)
    names = [f"ad{i}" for i in range(8)]
    for i, name in enumerate(names):
        registry.add(name, make_adapter(llama, tmp_path / name, seed=100 + i, r=2 + i % 4))
    prompts = [tokenizer(p)["input_ids"] for p in PROBES]
    jobs = [(name, k) for name in names for k in range(8)]
    sequential = {job: engine.generate(prompts[job[1]], job[0], greedy(8)).output_ids for job in jobs}
    for k in range(8):  # every adapter answers every probe its own way
        assert len({tuple(sequential[(n, k)]) for n in names}) == 8

    engine.start()
    try:
        results, order = {}, jobs[::-1][::3] + [j for j in jobs[::-1] if j not in jobs[::-1][::3]]

        def client(part):
            reqs = [(job, engine.submit(Request(prompts[job[1]], job[0], greedy(8)))) for job in part]
            for job, req in reqs:
                results[job] = req.wait(60).output_ids

        threads = [threading.Thread(target=client, args=(order[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert results == sequential
    snap = cache.snapshot()
    assert snap["slot_evictions"] > 0 and snap["cpu_evictions"] > 0
    assert len(snap["slots"]) == 3 and len(snap["cpu_resident"]) == 5
    assert all(cache.slots.in_use(n) == 0 for n in names)


def test_cli_functions(llama, tmp_path, capsys):
    d = make_adapter(llama, tmp_path / "cli", seed=1)
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"accuracy": 0.75}))
    rec = cli_adapters.add_adapter("cli-one", d, eval_results=results)
    assert rec.eval_results == {"accuracy": 0.75}
    assert [r.name for r in cli_adapters.list_adapters()] == ["cli-one"]
    import argparse

    parser = argparse.ArgumentParser()
    cli_adapters.add_adapters_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["adapters", "list", "--json"])
    assert args.fn(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "cli-one"
    cli_adapters.remove_adapter("cli-one")
    with pytest.raises(AdapterError, match="not registered"):
        cli_adapters.remove_adapter("cli-one")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_register_load_unload_cycles_do_not_grow_memory(llama, tokenizer, tmp_path):
    engine, cache, registry = served(llama, tokenizer, tmp_path, max_loras=2, max_cpu_loras=3)
    dirs = [make_adapter(llama, tmp_path / f"c{i}", seed=i) for i in range(3)]

    def cycle(i):
        name = f"cycle-{i % 7}"
        registry.add(name, dirs[i % 3])
        slot = cache.acquire(name)
        assert slot is not None and cache.slot_of[name] == slot
        cache.release(name)
        assert cache.unload(name)
        registry.remove(name)

    for i in range(50):  # warm-up: allocator pools, sqlite page cache, lazy imports
        cycle(i)
    before = _rss_mb()
    for i in range(1000):
        cycle(i)
    grown = _rss_mb() - before
    assert grown < 50, f"RSS grew {grown:.1f} MB over 1000 cycles"
    assert cache.snapshot()["slots"] == {} and registry.list() == []
    assert all(l.slot_rank == [0, 0] for l in cache.layers.values())
