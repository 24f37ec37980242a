"""Engine: mixed-adapter batches equal each adapter merged and run alone; continuous batching;
sampling, stop strings, end of turn, length; a bad adapter fails only its own requests."""

import pytest
import torch

from lorakit.errors import AdapterError
from lorakit.serve.engine import Request
from lorakit.serve.sampling import SamplingParams
from tests.serve.builders import (PROMPTS, greedy, greedy_reference, make_adapter,
                                  make_dora_adapter, merged_model, run_all, served)


@pytest.fixture
def three(llama, tokenizer, tmp_path):
    dirs = {f"a{i}": make_adapter(llama, tmp_path / f"a{i}", seed=10 + i, r=2 + 2 * i)
            for i in range(3)}
    engine, cache, registry = served(llama, tokenizer, tmp_path)
    for name, d in dirs.items():
        registry.add(name, d)
    return engine, cache, dirs


def test_mixed_batch_equals_each_adapter_merged(three, llama, tokenizer):
    engine, _, dirs = three
    n = 10
    reqs = [engine.submit(Request(tokenizer(p)["input_ids"], a, greedy(n)))
            for p in PROMPTS for a in [None, "a0", "a1", "a2"]]
    run_all(engine, reqs)
    merged = {a: merged_model(llama, dirs[a] if a else None) for a in [None, "a0", "a1", "a2"]}
    for r in reqs:
        assert r.output_ids == greedy_reference(merged[r.adapter], r.prompt_ids, n), (r.adapter,)
    for i in range(len(PROMPTS)):  # four different answers per prompt: a mix-up cannot pass
        answers = {tuple(r.output_ids) for r in reqs[4 * i: 4 * i + 4]}
        assert len(answers) == 4


def test_bf16_base_mixed_batch_equals_each_request_alone(llama, tokenizer, tmp_path):
    """The server's default dtype on a bf16-capable CPU: bf16 base, fp32 adapter stacks. Rows of
    the base and three adapters in one left-padded batch give each request's tokens run alone
    (bf16 rounding differs from fp32's, so the fp32 merged model is not the oracle here; the
    layer test bounds the difference), and the adapters still change the answers."""
    dirs = {f"a{i}": make_adapter(llama, tmp_path / f"a{i}", seed=10 + i, r=2 + 2 * i)
            for i in range(3)}
    engine, cache, registry = served(llama, tokenizer, tmp_path, prepare=lambda m: m.to(torch.bfloat16))
    for name, d in dirs.items():
        registry.add(name, d)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert {l.lora_a.dtype for l in cache.layers.values()} == {torch.float32}
    n = 8
    jobs = [(tokenizer(p)["input_ids"], a) for p in PROMPTS for a in [None, "a0", "a1", "a2"]]
    alone = [run_all(engine, [engine.submit(Request(ids, a, greedy(n)))])[0].output_ids
             for ids, a in jobs]
    together = run_all(engine, [engine.submit(Request(ids, a, greedy(n))) for ids, a in jobs])
    assert [r.output_ids for r in together] == alone
    for i in range(len(PROMPTS)):
        assert len({tuple(t) for t in alone[4 * i: 4 * i + 4]}) == 4


def test_requests_join_and_leave_between_steps(three, tokenizer):
    engine, _, _ = three
    alone = {}
    for p, a, n in [(PROMPTS[0], "a0", 12), (PROMPTS[1], "a1", 4), (PROMPTS[2], None, 6)]:
        alone[(p, a)] = engine.generate(tokenizer(p)["input_ids"], a, greedy(n)).output_ids
    first = engine.submit(Request(tokenizer(PROMPTS[0])["input_ids"], "a0", greedy(12)))
    engine.step()
    engine.step()
    assert len(engine.running) == 1 and len(first.output_ids) == 3
    second = engine.submit(Request(tokenizer(PROMPTS[1])["input_ids"], "a1", greedy(4)))
    engine.step()  # joins: prefill gives its first token, the shared decode step its second
    assert len(engine.running) == 2 and len(second.output_ids) == 2
    third = engine.submit(Request(tokenizer(PROMPTS[2])["input_ids"], None, greedy(6)))
    engine.step()
    engine.step()
    assert second.finish_reason == "length" and len(engine.running) == 2  # second left
    run_all(engine, [first, third])
    assert engine.running == [] and engine.kv.rows == 0
    assert first.output_ids == alone[(PROMPTS[0], "a0")]
    assert second.output_ids == alone[(PROMPTS[1], "a1")]
    assert third.output_ids == alone[(PROMPTS[2], None)]


def test_seeded_sampling_is_independent_of_the_batch(three, tokenizer):
    engine, _, _ = three
    ids = tokenizer(PROMPTS[3])["input_ids"]
    params = dict(max_tokens=12, temperature=1.3, top_p=0.9, top_k=50, ignore_eos=True)
    alone = engine.generate(ids, "a1", SamplingParams(seed=7, **params)).output_ids
    reqs = [engine.submit(Request(ids, a, SamplingParams(seed=s, **params)))
            for a, s in [("a0", 1), ("a1", 7), (None, 3), ("a1", 8)]]
    run_all(engine, reqs)
    assert reqs[1].output_ids == alone
    assert reqs[3].output_ids != alone  # another seed draws another sequence
    greedy_ids = engine.generate(ids, "a1", greedy(12)).output_ids
    top1 = engine.generate(ids, "a1", SamplingParams(max_tokens=12, temperature=0.7, top_k=1,
                                                      seed=5, ignore_eos=True)).output_ids
    assert top1 == greedy_ids


def test_stop_string_end_of_turn_and_length(three, tokenizer):
    engine, _, _ = three
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = engine.generate(ids, "a2", greedy(10))
    assert full.finish_reason == "length" and len(full.output_ids) == 10
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    stopped = engine.generate(ids, "a2", SamplingParams(max_tokens=10, temperature=0, stop=[stop],
                                                        ignore_eos=True))
    assert stopped.finish_reason == "stop" and stopped.text == text[:cut]
    eot = full.output_ids[3]
    engine.eos_ids = {eot}
    ended = engine.generate(ids, "a2", SamplingParams(max_tokens=10, temperature=0))
    assert ended.finish_reason == "stop" and ended.output_ids == full.output_ids[:3]


def test_streamed_text_adds_up(three, tokenizer):
    engine, _, _ = three
    pieces = []
    req = Request(tokenizer(PROMPTS[1])["input_ids"], "a0", greedy(15),
                  on_event=lambda kind, x: pieces.append(x) if kind == "text" else None)
    run_all(engine, [engine.submit(req)])
    assert len(pieces) > 1 and "".join(pieces) == req.text


def test_bad_adapter_fails_only_its_requests(three, llama, tokenizer, tmp_path):
    engine, cache, dirs = three
    from safetensors.torch import load_file, save_file

    bad = make_adapter(llama, tmp_path / "bad", seed=99)  # fine when registered ...
    cache.registry.add("bad", bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")  # ... and corrupted before it is first loaded
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    ids = tokenizer(PROMPTS[0])["input_ids"]
    good = engine.submit(Request(ids, "a0", greedy(5)))
    broken = engine.submit(Request(ids, "bad", greedy(5)))
    base = engine.submit(Request(ids, None, greedy(5)))
    run_all(engine, [good, broken, base])
    with pytest.raises(AdapterError, match="NaN"):
        broken.wait()
    assert good.wait().finish_reason == "length" and base.wait().finish_reason == "length"
    assert "bad" not in cache.slot_of


def test_requests_wait_when_every_slot_is_busy(llama, tokenizer, tmp_path):
    engine, cache, registry = served(llama, tokenizer, tmp_path, max_loras=1, max_cpu_loras=2)
    for i in range(2):
        registry.add(f"s{i}", make_adapter(llama, tmp_path / f"s{i}", seed=i))
    ids = tokenizer(PROMPTS[0])["input_ids"]
    r0 = engine.submit(Request(ids, "s0", greedy(4)))
    r1 = engine.submit(Request(ids, "s1", greedy(4)))
    r2 = engine.submit(Request(ids, "s0", greedy(4)))
    engine.step()
    assert [r.adapter for r in engine.running] == ["s0", "s0"] and list(engine.waiting) == [r1]
    run_all(engine, [r0, r1, r2])
    assert r0.output_ids == r2.output_ids != r1.output_ids
    snap = cache.snapshot()
    assert snap["slot_evictions"] == 1 and snap["slots"] == {"s1": 0}
    assert torch.equal(engine.model.model.layers[0].self_attn.q_proj.lora_a[0, :4],
                       cache._cpu["s1"].weights["model.layers.0.self_attn.q_proj"][0])


def test_per_module_rank_and_alpha_served_as_merged(llama, tokenizer, tmp_path):
    """rank_pattern / alpha_pattern adapters: each module served with its own rank and scaling."""
    import copy

    from lorakit.adapters.io import save_adapter
    from lorakit.lora import LoraConfig, inject
    from tests.lora.test_layer import randomize_b

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
                     alpha_pattern={"q_proj": 40.0})
    model = copy.deepcopy(llama)
    inject(model, cfg)
    randomize_b(model, seed=3, scale=0.6)
    path = save_adapter(model, cfg, tmp_path / "pat", base_identity={"name": "tiny-llama"})
    engine, cache, registry = served(llama, tokenizer, tmp_path)
    registry.add("pat", path)
    n = 8
    reqs = run_all(engine, [engine.submit(Request(tokenizer(p)["input_ids"], a, greedy(n)))
                         for p in PROMPTS for a in [None, "pat"]])
    merged = {a: merged_model(llama, path if a else None) for a in [None, "pat"]}
    for r in reqs:
        assert r.output_ids == greedy_reference(merged[r.adapter], r.prompt_ids, n)
    assert any(a.output_ids != b.output_ids for a, b in zip(reqs[::2], reqs[1::2]))


def test_dora_adapter_in_a_mixed_batch_equals_it_merged(llama, tokenizer, tmp_path):
    """A DoRA slot (its factor m / ||W + sBA|| held per slot) beside a LoRA slot and the base."""
    dora = make_dora_adapter(llama, tmp_path / "dora")
    plain = make_adapter(llama, tmp_path / "plain", seed=21)
    engine, _, registry = served(llama, tokenizer, tmp_path)
    registry.add("dora", dora)
    registry.add("plain", plain)
    n = 8
    names = [None, "dora", "plain"]
    reqs = run_all(engine, [engine.submit(Request(tokenizer(p)["input_ids"], a, greedy(n)))
                         for p in PROMPTS for a in names])
    merged = {a: merged_model(llama, {"dora": dora, "plain": plain}.get(a)) for a in names}
    for r in reqs:
        assert r.output_ids == greedy_reference(merged[r.adapter], r.prompt_ids, n), r.adapter
    assert any(a.output_ids != b.output_ids for a, b in zip(reqs[::3], reqs[1::3]))


def test_nf4_base_serves_qlora_adapters_as_lora_on_that_base(llama, tokenizer, tmp_path):
    """`quantize_base: nf4`: the server's NF4 base plus slots answers as LoraLinear on that base."""
    import copy

    from lorakit.adapters.io import load_adapter
    from lorakit.lora.quant import quantize_base_nf4

    pytest.importorskip("torchao")
    path = make_adapter(llama, tmp_path / "q", seed=30)
    # torchao's NF4Tensor does not survive deepcopy with a second-level block other than 256,
    # so each model is copied first and quantized after.
    engine, _, registry = served(llama, tokenizer, tmp_path, prepare=quantize_base_nf4)
    registry.add("q", path)
    reference = copy.deepcopy(llama)
    quantize_base_nf4(reference)
    load_adapter(reference, path)
    n = 8
    reqs = run_all(engine, [engine.submit(Request(tokenizer(p)["input_ids"], "q", greedy(n)))
                         for p in PROMPTS])
    for r in reqs:
        assert r.output_ids == greedy_reference(reference.eval(), r.prompt_ids, n)


def test_run_on_the_calling_thread_until_stopped(three, tokenizer):
    """`run` (how `lorakit serve` drives the engine, on the main thread): other threads submit
    and admin `call`s reach the loop; `stop` from another thread ends it; a `stop` that comes
    before `run` is not lost."""
    import threading

    engine, cache, _ = three
    ids = tokenizer(PROMPTS[0])["input_ids"]
    want = {a: run_all(engine, [engine.submit(Request(ids, a, greedy(6)))])[0].output_ids
            for a in [None, "a0", "a1"]}
    got, seen = {}, {}

    def client():
        reqs = {a: engine.submit(Request(ids, a, greedy(6))) for a in want}
        got.update({a: r.wait(60).output_ids for a, r in reqs.items()})
        seen["loop"] = engine.call(threading.current_thread)  # runs on the loop's thread
        engine.stop()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run()
    thread.join()
    assert got == want and len({tuple(t) for t in want.values()}) == 3  # a mix-up would show
    assert seen["loop"] is threading.current_thread()
    assert not engine.alive
    engine.stop()  # stop first, run after: run returns at once
    engine.run()
    assert not engine.alive
