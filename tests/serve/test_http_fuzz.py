"""A seeded storm of malformed HTTP requests mixed with good ones, against a live server (real
uvicorn on 127.0.0.1, the tiny Llama, four adapters in two slots, one adapter refused at load and
one that overflows at run time): no traceback in the server's log, no 5xx, no hang, and every
good request answered exactly as it is answered alone. The cases come from tests/serve/
http_fuzz.py, the sending and checking from http_storm.py; `make test` sends about a hundred, `make test-slow` over five hundred malformed."""

import random

import httpx
import pytest

from lorakit.serve.app import ServerThread, create_app
from tests.serve.builders import http_service, make_adapter, make_dora_adapter
from tests.serve.http_fuzz import good_calls, malformed_calls
from tests.serve.http_storm import LogWatch, check, send, storm

LIMITS = {"max_body_bytes": 100_000, "max_prompt_tokens": 64, "max_tokens": 250,
          "default_max_tokens": 8, "max_n": 2, "max_queue": 1024}


def _world(llama, tokenizer, tmp_path):
    """The service, and the bad adapters with the status a request for each gets: `broken` (a
    DoRA magnitude of the wrong length, on disk only: 400 at load) and `overflow` (registered;
    finite weights whose product overflows: its rows fail in the batch)."""
    import safetensors.torch as st

    service = http_service(llama, tokenizer, tmp_path, adapters=4, max_loras=2, max_cpu_loras=3,
                           **LIMITS)
    root = tmp_path / "adapters"
    make_dora_adapter(llama, root / "broken")
    weights = root / "broken" / "adapter_model.safetensors"
    tensors = st.load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:-3].clone()
    st.save_file(tensors, str(weights))
    # B entries of +-3e38 (finite, near fp32's largest): B(Ax) is inf for any prompt, so its rows'
    # logits are NaN; with smaller weights some prompts only saturate a norm and answer garbage.
    overflow = make_adapter(llama, root / "overflow", seed=50)
    weights = overflow / "adapter_model.safetensors"
    tensors = {k: (t.sign() * 3e38 if ".lora_B." in k else t)
               for k, t in st.load_file(str(weights)).items()}
    st.save_file(tensors, str(weights))
    service.registry.add("overflow", overflow)
    (root / "loop").symlink_to("loop")
    return service, {"broken": 400, "overflow": 200}


def run_storm(llama, tokenizer, tmp_path, seed: int, n_bad: int, n_good: int) -> list[str]:
    """Send the storm; check the server's invariants; return the calls answered wrongly."""
    service, bad = _world(llama, tokenizer, tmp_path)
    models = ["tiny-base", "ad0", "ad1", "ad2", "ad3"]
    rng = random.Random(seed)
    good = good_calls(rng, n_good, models)
    calls = good + malformed_calls(rng, n_bad, models, bad, service.vocab_size, LIMITS)
    rng.shuffle(calls)
    assert sum(not c.good for c in calls) == n_bad
    with LogWatch() as log, ServerThread(create_app(service)) as srv:
        with httpx.Client(base_url=srv.url) as http:
            alone = {i: send(http, c, 60).answer for i, c in enumerate(calls) if c.good}
            assert all(isinstance(a, dict) and "choices" in a for a in alone.values()), alone
            outcomes = storm(srv.url, calls, workers=8, timeout=60)
            failures = check(calls, outcomes, alone)
            assert http.get("/health").status_code == 200
            metrics = http.get("/metrics").text
        engine = service.engine
        assert not engine.running and not engine.waiting
        if sum(c.walk_away == 0.0 for c in calls) >= 2:  # clients that left before any answer
            assert engine.finished["cancelled"] >= 1, engine.finished
        assert all(service.cache.slots.in_use(name) == 0 for name in models[1:] + ["overflow"])
    assert 'status="5' not in metrics
    assert not log.problems(), log.problems()[:10]
    answered = [o for o in outcomes if o != "hang"]
    assert sum(o.status == 200 for o in answered) >= n_good  # the good ones, answered
    assert len({str(a) for a in alone.values()}) > n_good // 2  # the answers differ
    return failures


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_http_fuzz_fast(llama, tokenizer, tmp_path):
    failures = run_storm(llama, tokenizer, tmp_path, seed=16, n_bad=100, n_good=30)
    assert not failures, "\n".join(failures[:40])


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_http_fuzz_slow(llama, tokenizer, tmp_path):
    failures = run_storm(llama, tokenizer, tmp_path, seed=1616, n_bad=600, n_good=150)
    assert not failures, "\n".join(failures[:40])
