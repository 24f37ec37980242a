"""Fault isolation in the engine: a request whose adapter cannot be loaded, whose adapter's
weights overflow at run time, whose prompt the model cannot run, or whose sampling raises fails
alone with its error, and every other request in the batch gets exactly the tokens it gets alone.
A step that does not return marks the engine unhealthy. Real faults, no mocks: files broken on
disk, weights that pass every load check and overflow in the forward, token ids past the
vocabulary, a NaN temperature given to the engine directly (HTTP refuses it)."""

import threading
import time

import pytest
import torch

from lorakit.errors import AdapterError
from lorakit.serve.engine import Request
from lorakit.serve.sampling import SamplingError, SamplingParams
from tests.serve.builders import PROMPTS, greedy, make_adapter, run_all, served


@pytest.fixture
def engine(llama, tokenizer, tmp_path):
    engine, cache, registry = served(llama, tokenizer, tmp_path, max_loras=2)
    for i in range(3):
        registry.add(f"a{i}", make_adapter(llama, tmp_path / f"a{i}", seed=10 + i))
    return engine


def overflowing_adapter(base, out_dir, seed=50):
    """Finite weights (so every load check passes) so large that B·(A·x) overflows fp32: the
    adapter's rows come out NaN/inf at run time."""
    return make_adapter(base, out_dir, seed=seed, b_std=1e37)


def _good_jobs(tokenizer):
    """(prompt ids, adapter, params): greedy and seeded sampled rows on the base and adapters."""
    jobs = []
    for i, p in enumerate(PROMPTS):
        ids = tokenizer(p)["input_ids"]
        jobs.append((ids, [None, "a0", "a1", "a2"][i], greedy(6)))
        jobs.append((ids, ["a1", None, "a0", "a2"][i],
                     SamplingParams(max_tokens=6, temperature=0.9, seed=i, ignore_eos=True)))
    return jobs


def _alone(engine, jobs):
    return [run_all(engine, [engine.submit(Request(ids, a, p))])[0].output_ids for ids, a, p in jobs]


def _mixed(engine, jobs, bad):
    """Submit the good jobs with the bad ones spread among them; both lists of requests back."""
    good = [Request(ids, a, p) for ids, a, p in jobs]
    broken = [Request(ids, a, p) for ids, a, p in bad]
    order = list(good)
    for k, req in enumerate(broken):
        order.insert(1 + 3 * k, req)
    for req in order:
        engine.submit(req)
    run_all(engine, order)
    return good, broken


def test_overflowing_adapter_fails_alone(engine, llama, tokenizer, tmp_path):
    """Its rows' logits are NaN; the other rows, base rows included (which read a filler row's
    delta in the slot-major path), are untouched, in prefill and in every decode step."""
    engine.adapters.registry.add("huge", overflowing_adapter(llama, tmp_path / "huge"))
    jobs = _good_jobs(tokenizer)
    alone = _alone(engine, jobs)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    bad = [(ids, "huge", greedy(6)), (tokenizer(PROMPTS[3])["input_ids"], "huge", greedy(6))]
    good, broken = _mixed(engine, jobs, bad)
    assert [r.output_ids for r in good] == alone
    assert len({tuple(t) for t in alone}) >= 6  # the adapters matter: a mix-up cannot pass
    for r in broken:
        assert r.finish_reason == "error" and r.output_ids == []
        assert isinstance(r.error, AdapterError)
        assert str(r.error) == ("adapter 'huge' failed on this request: the model's output "
                                "(logits) for this request is not finite (NaN or inf)")
    assert engine.adapters.slots.in_use("huge") == 0 and not engine.running


def test_adapter_broken_on_disk_fails_alone(engine, tokenizer, tmp_path):
    """Registered fine, then its weights file is truncated before its first load (inside the
    engine's step, at admission): its requests fail with the reason, the rest run."""
    weights = tmp_path / "a2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    jobs = [j for j in _good_jobs(tokenizer) if j[1] != "a2"]
    alone = _alone(engine, jobs)
    good, broken = _mixed(engine, jobs, [(tokenizer("hello")["input_ids"], "a2", greedy(4))] * 2)
    assert [r.output_ids for r in good] == alone
    for r in broken:
        assert r.finish_reason == "error" and isinstance(r.error, AdapterError)
        assert "'a2'" in str(r.error), r.error
    assert "a2" not in engine.adapters.slot_of


def test_prompt_the_model_cannot_run_fails_alone(engine, tokenizer):
    """Token ids past the vocabulary (the HTTP layer refuses them; the engine API does not) make
    the newcomers' prefill raise: it is retried one newcomer at a time, so only that one fails."""
    jobs = _good_jobs(tokenizer)
    alone = _alone(engine, jobs)
    vocab = engine.model.config.vocab_size
    good, broken = _mixed(engine, jobs, [([5, vocab + 7, 9], "a0", greedy(4)),
                                         ([vocab * 10], None, greedy(4))])
    assert [r.output_ids for r in good] == alone
    for r in broken:
        assert r.finish_reason == "error" and isinstance(r.error, IndexError), r.error
    assert engine.adapters.slots.in_use("a0") == 0


def test_sampling_that_raises_fails_alone(engine, tokenizer):
    """A NaN temperature makes torch.multinomial raise for that row only."""
    jobs = _good_jobs(tokenizer)
    alone = _alone(engine, jobs)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    nan = SamplingParams(max_tokens=5, temperature=float("nan"), seed=3, ignore_eos=True)
    good, broken = _mixed(engine, jobs, [(ids, None, nan), (ids, "a1", nan)])
    assert [r.output_ids for r in good] == alone
    assert isinstance(broken[0].error, SamplingError)
    assert str(broken[0].error).startswith("the model's output (logits)") is False
    assert "sampling failed" in str(broken[0].error)
    assert isinstance(broken[1].error, AdapterError) and "sampling failed" in str(broken[1].error)


def test_tiny_temperatures_are_greedy_or_clamped(engine, tokenizer):
    """Below 1e-5 a row is greedy; below 1e-2 it samples at 1e-2 (vLLM's thresholds), finite."""
    ids = tokenizer(PROMPTS[0])["input_ids"]
    want = run_all(engine, [engine.submit(Request(ids, "a0", greedy(6)))])[0].output_ids
    for t in (1e-300, 5e-324, 9e-6):
        params = SamplingParams(max_tokens=6, temperature=t, seed=1, ignore_eos=True)
        assert run_all(engine, [engine.submit(Request(ids, "a0", params))])[0].output_ids == want
    for t in (1e-5, 3e-3):
        params = SamplingParams(max_tokens=6, temperature=t, seed=1, ignore_eos=True)
        r = run_all(engine, [engine.submit(Request(ids, "a0", params))])[0]
        assert r.finish_reason == "length" and len(r.output_ids) == 6


def test_a_step_that_does_not_return_marks_the_engine_unhealthy(engine, tokenizer):
    """A command that blocks the loop (as a hung forward would) while a request waits: the
    engine stays alive but not healthy after stall_timeout, and healthy again once it moves."""
    engine.stall_timeout = 0.3
    engine.start()
    try:
        assert engine.healthy
        gate = threading.Event()
        holder = threading.Thread(target=engine.call, args=(gate.wait,), daemon=True)
        holder.start()
        req = engine.submit(Request(tokenizer("hello")["input_ids"], None, greedy(3)))
        time.sleep(0.6)
        assert engine.alive and not engine.healthy and engine.stalled_for() > 0.3
        gate.set()
        holder.join(10)
        assert req.wait(30).finish_reason == "length"
        assert engine.healthy and engine.stalled_for() < 0.3
    finally:
        engine.stop(30)
    assert not engine.healthy


def test_a_stuck_engine_turns_health_503(llama, tokenizer, tmp_path):
    """Over HTTP: while one step does not return, /health answers 503 saying so (a load
    balancer stops sending), requests wait rather than fail, and all is well once it moves."""
    import httpx

    from lorakit.serve.app import ServerThread, create_app
    from tests.serve.builders import http_service

    service = http_service(llama, tokenizer, tmp_path, adapters=1)
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        service.engine.stall_timeout = 0.3
        assert http.get("/health").json() == {"status": "ok"}
        gate = threading.Event()
        holder = threading.Thread(target=service.engine.call, args=(gate.wait,), daemon=True)
        holder.start()
        body = {"model": "ad0", "prompt": "hello", "max_tokens": 3, "temperature": 0}
        waiting = threading.Thread(target=lambda: results.append(http.post("/v1/completions",
                                                                           json=body)))
        results = []
        waiting.start()
        time.sleep(0.6)
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"].startswith("engine stalled: one step "
                                                                      "has run for")
        assert not results  # waiting, not failed
        gate.set()
        holder.join(10)
        waiting.join(30)
        assert results[0].status_code == 200 and http.get("/health").status_code == 200
