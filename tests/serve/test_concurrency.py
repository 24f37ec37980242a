"""64 requests at once through the official `openai` client, over the base and six adapters that
share two adapter slots, with bad requests and a bad adapter (finite weights that overflow, so
its rows fail inside the mixed batch) among them: every good request gets exactly the answer it
gets alone, sent sequentially; every bad one gets its 4xx; the server stays healthy.

Two adapter slots and a batch of 2 sequences in `make test` (requests wait in the queue and for
a slot); a batch of 8 under slow (adapters wait for a slot while others decode)."""

import threading

import httpx
import pytest
import safetensors.torch as st

from lorakit.serve.app import ServerThread, create_app
from tests.serve.builders import http_service, make_adapter
from tests.serve.http_storm import LogWatch

ADAPTERS = [f"ad{i}" for i in range(6)]
MODELS = ["tiny-base"] + ADAPTERS
PROMPTS = ["the quick brown fox", "is this bike still available? can you do 50", "hello",
           "what colour is it and how big is the table", "classify the intent of this message",
           "what condition is the sofa in"]


def _overflowing(base, root):
    """Finite B entries of +-3e38: B(Ax) is inf for any prompt, so the adapter's logits are NaN
    (the engine fails its rows alone); every load check passes."""
    d = make_adapter(base, root / "overflow", seed=50)
    weights = d / "adapter_model.safetensors"
    st.save_file({k: (t.sign() * 3e38 if ".lora_B." in k else t)
                  for k, t in st.load_file(str(weights)).items()}, str(weights))
    return d


def _good(i: int) -> dict:
    """Request i of the good ones: completion or chat, streamed or not, greedy, 4-9 tokens."""
    model = MODELS[i % len(MODELS)]
    req = {"kind": "chat" if i % 3 == 0 else "completion", "stream": i % 4 == 1, "model": model,
           "max_tokens": 4 + i % 6, "prompt": PROMPTS[i % len(PROMPTS)], "n": 2 if i % 11 == 5 else 1}
    return req


# Bad requests as the client sends them: (kwargs for the call, the status it must get).
BAD = [
    ({"model": "overflow"}, 400), ({"model": "overflow", "kind": "chat"}, 400),
    ({"model": "overflow", "n": 2}, 400), ({"model": "overflow", "prompt": PROMPTS[2]}, 400),
    ({"model": "nobody"}, 404), ({"model": "../ad0"}, 404), ({"temperature": 5}, 400),
    ({"n": 3}, 422), ({"max_tokens": 10**6}, 422), ({"extra": {"ignore_eos": "no"}}, 400),
    ({"extra": {"seed": 2**64}}, 400), ({"stop": [""]}, 400), ({"prompt": [10**6]}, 400),
    ({"kind": "chat", "messages": []}, 400), ({"extra": {"frobnicate": 1}}, 400),
    ({"prompt": "the " * 100}, 413),
]


def _call(client, req: dict):
    """(status, [(text, finish_reason)] per choice) for one request; an HTTP error's status and
    message instead of the choices."""
    import openai

    extra = {"ignore_eos": True, **req.get("extra", {})}
    common = dict(model=req.get("model", "ad0"), max_tokens=req.get("max_tokens", 4),
                  temperature=req.get("temperature", 0), n=req.get("n", 1), extra_body=extra,
                  stop=req.get("stop"))
    try:
        if req.get("kind") == "chat":
            messages = req.get("messages", [{"role": "user", "content": req.get("prompt", PROMPTS[0])}])
            if req.get("stream"):
                texts = {}
                for chunk in client.chat.completions.create(messages=messages, stream=True, **common):
                    for c in chunk.choices:
                        t = texts.setdefault(c.index, ["", None])
                        t[0] += c.delta.content or ""
                        t[1] = c.finish_reason or t[1]
                return 200, [tuple(texts[k]) for k in sorted(texts)]
            out = client.chat.completions.create(messages=messages, **common)
            return 200, [(c.message.content, c.finish_reason) for c in out.choices]
        prompt = req.get("prompt", PROMPTS[0])
        if req.get("stream"):
            texts = {}
            for chunk in client.completions.create(prompt=prompt, stream=True, **common):
                for c in chunk.choices:
                    t = texts.setdefault(c.index, ["", None])
                    t[0] += c.text
                    t[1] = c.finish_reason or t[1]
            return 200, [tuple(texts[k]) for k in sorted(texts)]
        out = client.completions.create(prompt=prompt, **common)
        return 200, [(c.text, c.finish_reason) for c in out.choices]
    except openai.APIStatusError as e:
        return e.status_code, str(e)[:300]


@pytest.mark.parametrize("max_concurrent", [2, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_64_concurrent_requests_get_their_sequential_answers(llama, tokenizer, tmp_path,
                                                             max_concurrent):
    from openai import OpenAI

    service = http_service(llama, tokenizer, tmp_path, adapters=6, max_loras=2, max_cpu_loras=3,
                           max_concurrent=max_concurrent, max_tokens=32)
    service.registry.add("overflow", _overflowing(llama, tmp_path / "adapters"))
    good = [_good(i) for i in range(64 - len(BAD))]
    calls = good + [req for req, _ in BAD]
    order = list(range(len(calls)))
    order = order[::2] + order[1::2]  # bad ones spread among the good
    with LogWatch() as log, ServerThread(create_app(service)) as srv:
        def client():
            return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        alone = [_call(client(), req) for req in good]
        assert all(status == 200 for status, _ in alone), alone
        answers = {model: {a[1][0][0] for req, a in zip(good, alone) if req["model"] == model}
                   for model in MODELS}
        assert len({frozenset(texts) for texts in answers.values()}) == len(MODELS)  # all differ

        results = [None] * len(calls)
        start = threading.Barrier(len(calls))

        def run(k):
            c = client()
            start.wait()
            results[k] = _call(c, calls[k])

        threads = [threading.Thread(target=run, args=(k,)) for k in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a request hung"
        with httpx.Client(base_url=srv.url) as http:
            assert http.get("/health").status_code == 200
            metrics = http.get("/metrics").text
        engine = service.engine
        assert not engine.running and not engine.waiting
        assert all(service.cache.slots.in_use(name) == 0 for name in ADAPTERS + ["overflow"])
    for k, req in enumerate(good):
        assert results[k] == alone[k], (k, req, results[k], alone[k])
    for k, (req, status) in enumerate(BAD):
        got = results[len(good) + k]
        assert got[0] == status, (req, got)
    assert 'status="5' not in metrics
    evictions = next(line for line in metrics.splitlines()
                     if line.startswith('lorakit_adapter_cache_evictions_total{tier="slot"}'))
    assert int(evictions.split()[-1]) > 0  # six adapters went through two slots
    assert not log.problems(), log.problems()
