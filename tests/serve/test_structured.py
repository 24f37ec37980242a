"""Structured outputs over HTTP with the official `openai` client: JSON-schema answers decoded
per row in batches shared with free-text rows and other adapters, and logprobs, penalties and
logit_bias served per row (each equal to a plain reference computed here)."""

import json
import threading

import pytest
import torch

from lorakit.serve.app import ServerThread, create_app
from lorakit.serve.grammar import GrammarCompiler, mask_logits, mask_logits_reference
from lorakit.serve.sampling import SamplingParams, adjust_logits, adjust_logits_reference
from tests.serve.builders import http_service

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"}},
     "required": ["name", "count", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "intent": {"enum": ["price", "availability", "condition", "other"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "price": {"type": "number", "minimum": 0, "maximum": 100}},
     "required": ["intent", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "item": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                          "maximum": 50}},
                 "required": ["id"], "additionalProperties": False},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]}},
     "required": ["item", "note"], "additionalProperties": False},
]


def long_context(model):
    """The tiny model with room for tool prompts (rotary positions: any length is computed)."""
    model.config.max_position_embeddings = 2048
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.tiny import tiny_llama, tiny_tokenizer

    tmp_path = tmp_path_factory.mktemp("structured")
    service = http_service(long_context(tiny_llama()), tiny_tokenizer(), tmp_path, adapters=3,
                           max_loras=3,
                           max_tokens=200, max_prompt_tokens=1500, max_concurrent=64)
    batches = []
    take = service.engine._take

    def recording_take(reqs, logits):  # which rows shared each sampling step
        batches.append([(r.adapter, r.constraint is not None) for r in reqs])
        return take(reqs, logits)

    service.engine._take = recording_take
    with ServerThread(create_app(service)) as srv:
        yield srv, service, batches


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_mixed_batches_all_validate(server):
    jsonschema = pytest.importorskip("jsonschema")
    srv, _, batches = server
    c = client(srv.url)
    models = ["tiny-base", "ad0", "ad1", "ad2"]
    results, errors = {}, []

    def one(k: int) -> None:
        try:
            kw = dict(model=models[k % 4], messages=[{"role": "user", "content": f"hello {k}"}],
                      max_tokens=160, temperature=1.0, seed=k)
            if k % 3 == 2:  # a free-text row beside the constrained ones
                out = c.chat.completions.create(**kw, max_completion_tokens=12)
            else:
                schema = SCHEMAS[k % len(SCHEMAS)]
                out = c.chat.completions.create(**kw, response_format={
                    "type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema}})
            results[k] = out.choices[0]
        except Exception as e:  # reported below with its request
            errors.append((k, e))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    constrained = [k for k in results if k % 3 != 2]
    assert len(constrained) == 100
    for k in constrained:
        choice = results[k]
        assert choice.finish_reason == "stop", (k, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[k % len(SCHEMAS)])
    # Constrained and free rows of different adapters shared forward passes.
    mixed = [b for b in batches if {c for _, c in b} == {True, False}
             and len({a for a, _ in b}) >= 3]
    assert mixed, "no step mixed constrained and free rows of three adapters"


def test_json_object_and_row_equals_alone(server):
    srv, service, _ = server
    c = client(srv.url)
    kw = dict(messages=[{"role": "user", "content": "the quick brown fox"}], max_tokens=120,
              temperature=0)
    alone = c.chat.completions.create(model="ad1", response_format={"type": "json_object"}, **kw)
    assert isinstance(json.loads(alone.choices[0].message.content), dict)
    # The same greedy constrained request beside free rows answers the same.
    outs = {}

    def run(k):
        if k == 0:
            outs[k] = c.chat.completions.create(model="ad1", response_format={
                "type": "json_object"}, **kw).choices[0].message.content
        else:
            outs[k] = c.chat.completions.create(model=f"ad{k % 3}", **{**kw, "max_tokens": 30})

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs[0] == alone.choices[0].message.content


def test_mask_logits_equals_reference(tokenizer):
    from lorakit.serve.engine import end_of_turn_ids
    from tests.tiny import tiny_llama

    compiler = GrammarCompiler(tokenizer, end_of_turn_ids(tiny_llama(), tokenizer))
    grammar = compiler.json_schema(SCHEMAS[1])
    rows = [compiler.constraint(grammar), None, compiler.constraint(grammar)]
    assert rows[2].accept(tokenizer.encode("{")[0]) is None
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(0))
    got = mask_logits(logits, rows)
    assert torch.equal(got, mask_logits_reference(logits, rows))
    assert torch.equal(got[1], logits[1])
    allowed = torch.isfinite(got[0]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)


def test_penalties_and_bias_equal_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=1.25),
              SamplingParams(), SamplingParams(logit_bias={3: -100.0, 7: 5.0},
                                               frequency_penalty=-0.5)]
    outputs = [[1, 1, 4, 9, 1], [2, 2], [7, 3, 3]]
    assert torch.allclose(adjust_logits(logits, params, outputs),
                          adjust_logits_reference(logits, params, outputs))
    assert adjust_logits(logits, [SamplingParams()] * 3, outputs) is logits


def _greedy_reference(model, ids, n, bias=None, presence=0.0, frequency=0.0):
    """n greedy tokens with OpenAI's penalties and bias, re-running the sequence each step."""
    ids, out, logprobs = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            logprobs.append(logits.log_softmax(-1))
            for tok in range(logits.shape[0]):
                count = out.count(tok)
                logits[tok] += (bias or {}).get(tok, 0.0) - frequency * count - presence * (count > 0)
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
    return out, logprobs


def test_logprobs_penalties_logit_bias_over_http(server, tokenizer):
    srv, service, _ = server
    c = client(srv.url)
    messages = [{"role": "user", "content": "is this bike still available?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    model = service.engine.model
    want, lps = _greedy_reference(model, ids, 8, bias={5: 4.0}, presence=0.7, frequency=1.5)
    out = c.chat.completions.create(model="tiny-base", messages=messages, max_tokens=8,
                                    temperature=0, logprobs=True, top_logprobs=3,
                                    presence_penalty=0.7, frequency_penalty=1.5,
                                    logit_bias={"5": 4.0}, extra_body={"ignore_eos": True})
    got = out.choices[0]
    assert got.message.content == tokenizer.decode(want, skip_special_tokens=True)
    plain, _ = _greedy_reference(model, ids, 8)
    assert want != plain  # the penalties and bias changed the answer
    raw = b"".join(bytes(e.bytes) for e in got.logprobs.content)
    assert raw.decode("utf-8", errors="replace") == got.message.content  # whole bytes per token
    for entry, tok, lp in zip(got.logprobs.content, want, lps):
        assert entry.logprob == pytest.approx(float(lp[tok]), abs=1e-4)
        top = lp.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                         abs=1e-4)
    stream = c.chat.completions.create(model="tiny-base", messages=messages, max_tokens=8,
                                       temperature=0, logprobs=True, stream=True,
                                       presence_penalty=0.7, frequency_penalty=1.5,
                                       logit_bias={"5": 4.0}, extra_body={"ignore_eos": True})
    entries = [e for ch in stream if ch.choices and ch.choices[0].logprobs
               for e in ch.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in got.logprobs.content])
    comp = c.completions.create(model="tiny-base", prompt="the quick brown fox", max_tokens=4,
                                temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


MALFORMED = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
]


def assert_400_naming(url: str, cases: list[tuple[dict, str]]) -> None:
    import httpx

    for body, field in cases:
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"].startswith(field), (body, r.json())


def test_malformed_structured_requests_are_400_naming_the_field(server):
    assert_400_naming(server[0].url, MALFORMED)


def test_guided_choice_answers_one_of_the_strings(server):
    c = client(server[0].url)
    labels = ["price negotiation", "item availability", "prompt injection"]
    for k, model in enumerate(["tiny-base", "ad0", "ad1"]):
        out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=30, temperature=1.0, seed=k,
                                        extra_body={"guided_choice": labels})
        assert out.choices[0].message.content in labels
        assert out.choices[0].finish_reason == "stop"
