"""The HTTP server, live on 127.0.0.1 at a free port: the official `openai` client for the API
surface, raw httpx for the hostile inputs (traversal, pickles, huge bodies), plus admin and
metrics routes."""

import copy
import re
import shutil

import httpx
import pytest
import torch

from lorakit.serve.app import ServerThread, create_app
from lorakit.serve.config import Limits, ServeConfig
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.service import Service
from tests.serve.builders import TARGETS, greedy, make_adapter

KEY = "sk-test-0123456789"


@pytest.fixture
def server(llama, tokenizer, tmp_path):
    root = tmp_path / "adapters"
    for i in range(3):
        make_adapter(llama, root / f"ad{i}", seed=20 + i)
    config = ServeConfig(model="tiny-base", adapters_root=str(root), max_loras=2, max_cpu_loras=3,
                         max_lora_rank=8, target_modules=TARGETS, api_key=KEY,
                         limits=Limits(max_body_bytes=50_000, max_prompt_tokens=64, max_tokens=32,
                                       default_max_tokens=8, max_n=2, max_queue=64))
    service = Service.from_model(copy.deepcopy(llama), tokenizer, config,
                                 registry=AdapterRegistry(tmp_path / "reg.sqlite"))
    service.registry.add("ad0", root / "ad0")
    service.registry.add("ad1", root / "ad1")  # ad2 is only on disk: found on first use
    with ServerThread(create_app(service)) as srv:
        yield srv, service, root


def _client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_openai_client(server, tokenizer):
    import openai

    srv, service, _ = server
    client = _client(srv.url)
    models = client.models.list()
    assert [(m.id, getattr(m, "parent", None)) for m in models.data] == [
        ("tiny-base", None), ("ad0", "tiny-base"), ("ad1", "tiny-base")]

    prompt = "the quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    for model, adapter in [("tiny-base", None), ("ad0", "ad0"), ("ad2", "ad2")]:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        want = service.engine.generate(ids, adapter, greedy(6))
        assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 6)
    assert "ad2" in [m.id for m in client.models.list().data]  # registered on first use

    messages = [{"role": "user", "content": "is this bike still available?"}]
    chat = client.chat.completions.create(model="ad1", messages=messages, max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    want = service.engine.generate(chat_ids, "ad1", greedy(5))
    assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(chat_ids)

    stream = client.chat.completions.create(model="ad1", messages=messages, max_tokens=5,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="ad0", prompt=prompt, max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == service.engine.generate(ids, "ad0", greedy(6)).text

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nobody", prompt=prompt, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _client(srv.url, key="wrong-key-000").models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="above this server's limit of 32"):
        client.completions.create(model="ad0", prompt=prompt, max_tokens=33)
    with pytest.raises(openai.APIStatusError, match="limit of 64") as e:
        client.completions.create(model="ad0", prompt="the " * 100, max_tokens=2)
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="ad0", prompt=prompt, temperature=5)



def test_raw_http_hostile_inputs(server, llama):
    srv, service, root = server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=srv.url, headers=auth, timeout=30) as http:
        assert httpx.get(srv.url + "/health").status_code == 200  # no key needed
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # key missing
        for name, path in [("../evil", None), ("ok", "../outside"), ("ok", "/etc"),
                           ("a/b", None), ("..", None)]:
            r = http.post("/admin/adapters", json={"name": name, "path": path})
            assert r.status_code == 400, (name, path, r.text)
            assert "not allowed" in r.json()["error"]["message"] or "refused" in r.json()["error"]["message"]
        outside = root.parent / "outside"
        make_adapter(llama, outside, seed=5)
        (root / "escape").symlink_to(outside)
        r = http.post("/admin/adapters", json={"name": "escape"})
        assert r.status_code == 400 and "symlink" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "escape", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 404
        r = http.post("/v1/completions", json={"model": "../ad0", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        pickled = root / "pickled"
        shutil.copytree(root / "ad0", pickled)
        from safetensors.torch import load_file

        torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
        (pickled / "adapter_model.safetensors").unlink()
        r = http.post("/admin/adapters", json={"name": "pickled"})
        assert r.status_code == 400 and "pickled adapter weights are refused" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "pickled", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed"

        huge = b'{"model": "ad0", "prompt": "' + b"a" * 200_000 + b'"}'
        r = http.post("/v1/completions", content=huge, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = http.post("/v1/completions", content=iter([huge[:1000], huge[1000:]]))  # chunked
        assert r.status_code == 413
        r = http.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "ad0", "prompt": "hi", "n": 3})
        assert r.status_code == 422
        r = http.post("/v1/completions", json={"model": "ad0", "prompt": "hi", "frobnicate": 1})
        assert r.status_code == 400 and "frobnicate" in r.json()["error"]["message"]

        service.engine.max_waiting = 0  # a full queue answers 503 at once
        r = http.post("/v1/completions", json={"model": "ad1", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        service.engine.max_waiting = 64

        # The server kept serving everyone else.
        r = http.post("/v1/completions", json={"model": "ad1", "prompt": "hi", "max_tokens": 3,
                                               "temperature": 0, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert r.json()["choices"][0]["text"] == r.json()["choices"][1]["text"]


def test_admin_routes_and_metrics(server):
    srv, service, root = server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=srv.url, headers=auth, timeout=30) as http:
        shutil.copytree(root / "ad2", root / "fresh")
        r = http.post("/admin/adapters", json={"name": "fresh", "pin": True})
        assert r.status_code == 201 and r.json()["rank"] == 4 and r.json()["pinned"]
        assert http.post("/admin/adapters", json={"name": "fresh"}).status_code == 409
        r = http.post("/admin/adapters/fresh/load")
        assert r.status_code == 200 and r.json()["cpu_resident"]
        sampled = 0  # tokens the engine sampled: the answer's, plus the end-of-turn token on "stop"
        for model in ["fresh", "ad0", "ad1", "fresh"]:
            r = http.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 3})
            assert r.status_code == 200
            body = r.json()
            sampled += body["usage"]["completion_tokens"] + (body["choices"][0]["finish_reason"] == "stop")
        assert 4 <= sampled <= 12
        text = http.get("/metrics").text
        assert 'lorakit_adapter_cache_evictions_total{tier="slot"} 1' in text  # ad0 made room for ad1
        assert 'lorakit_adapter_memory_bytes{adapter="fresh"}' in text
        assert 'lorakit_http_requests_total{route="/v1/completions",status="200"} 4' in text
        assert f"lorakit_generation_tokens_total {sampled}\n" in text and "lorakit_queue_depth 0" in text
        assert "lorakit_prefix_cache_hit_tokens_total 0\n" in text  # prompts shorter than a block
        long = "is this bike still available? can you do 50 for it " * 2
        for _ in range(2):  # the second prefill reuses the first one's blocks
            r = http.post("/v1/completions", json={"model": "ad1", "prompt": long, "max_tokens": 1})
            assert r.status_code == 200
        hits = re.search(r"^lorakit_prefix_cache_hit_tokens_total (\d+)$", http.get("/metrics").text,
                         re.MULTILINE)
        assert int(hits.group(1)) >= 8
        r = http.post("/admin/adapters/fresh/unpin")
        assert r.status_code == 200 and not r.json()["pinned"]
        r = http.post("/admin/adapters/fresh/unload")
        assert r.status_code == 200 and r.json()["slot"] is None and not r.json()["cpu_resident"]
        assert http.delete("/admin/adapters/fresh").status_code == 200
        assert http.delete("/admin/adapters/fresh").status_code == 404
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "ad2"}).status_code == 200
        assert "again" in [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
