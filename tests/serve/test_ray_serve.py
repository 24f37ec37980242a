"""`lorakit serve --replicas 2` on Ray Serve (a local Ray runtime, 2 CPUs), over real HTTP on
127.0.0.1 with the official `openai` client: the answers of a single server, adapter affinity,
and a replica killed with requests queued on it."""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorakit.serve.app import ServerThread, create_app
from lorakit.serve.config import build_serve_config
from lorakit.serve.ray_serve import REPLICA_HEADER
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.service import build_service
from tests import tiny
from tests.ray_local import local_ray
from tests.serve.builders import TARGETS, make_adapter

KEY = "sk-test-0123456789"
ADAPTERS = [f"ad{i}" for i in range(6)]
PROMPT = "the quick brown fox"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(Ray Serve URL, single-server URL): the same tiny base, 6 registered adapters, one
    registry. Ray Serve is `lorakit serve --replicas 2` as a user runs it (its own process,
    joining the test's Ray runtime), each replica decoding one sequence at a time (so requests
    queue); the single server is `lorakit serve`'s service in this process."""
    address = local_ray()
    from ray import serve

    tmp = tmp_path_factory.mktemp("ray-serve")
    base = tiny.tiny_llama()
    base.save_pretrained(tmp / "tiny-base")
    tiny.tiny_tokenizer().save_pretrained(tmp / "tiny-base")
    home = tmp / "home"
    registry = AdapterRegistry(home / "adapters.sqlite")
    for i, name in enumerate(ADAPTERS):
        registry.add(name, make_adapter(base, tmp / "adapters" / name, seed=40 + i))
    settings = {"model": str(tmp / "tiny-base"), "adapters_root": str(tmp / "adapters"),
                "max_loras": 2, "max_cpu_loras": 6, "max_lora_rank": 8,
                "target_modules": f"[{','.join(TARGETS)}]", "api_key": KEY, "dtype": "fp32",
                "prefix_cache_mb": 0, "limits.max_tokens": 48, "limits.default_max_tokens": 8,
                "limits.max_concurrent": 1, "limits.max_queue": 64}
    port = _free_port()
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "serve", "--replicas", "2", "--address", address,
             "--port", str(port), *(f"{k}={v}" for k, v in settings.items())],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "LORAKIT_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LORAKIT_HOME", str(home))
            single = build_service(build_serve_config({}, [f"{k}={v}" for k, v in settings.items()]))
        deadline = time.monotonic() + 240
        while not _healthy(url):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.25)
        with ServerThread(create_app(single)) as reference:
            yield url, reference.url
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the application is deleted, the process ends
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        serve.shutdown()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _complete(client, model, max_tokens=6, prompt=PROMPT):
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True})
    return raw.parse().choices[0].text, raw.headers.get(REPLICA_HEADER)


def test_two_replicas_answer_as_one_server(servers):
    import openai

    url, single_url = servers
    ray_client, single = _client(url), _client(single_url)
    base_name = single.models.list().data[0].id
    models = [(m.id, getattr(m, "parent", None)) for m in ray_client.models.list().data]
    assert models == [(base_name, None)] + [(name, base_name) for name in ADAPTERS]  # each once

    answers, loader = {}, {}
    for model in [base_name, *ADAPTERS]:
        text, loader[model] = _complete(ray_client, model)
        assert text == _complete(single, model)[0], model
        answers[model] = text
        time.sleep(0.3)  # the replica reports what it holds every 0.1 s; let the router hear it
    assert len(set(answers.values())) == 7  # every adapter changes the answer: a mix-up shows
    # A new adapter goes to the replica holding the fewest: the 6 are spread over both.
    assert len({loader[name] for name in ADAPTERS}) == 2 and None not in loader.values(), loader

    messages = [{"role": "user", "content": "is this bike still available?"}]
    chat = [c.chat.completions.create(model="ad3", messages=messages, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].message.content
            for c in (ray_client, single)]
    assert chat[0] == chat[1]
    stream = ray_client.completions.create(model="ad1", prompt=PROMPT, max_tokens=6,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == answers["ad1"]

    # The API key and the limits are the single server's.
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong-key-000").models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="above this server's limit of 48"):
        ray_client.completions.create(model="ad0", prompt=PROMPT, max_tokens=49)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ray_client.completions.create(model="nobody", prompt=PROMPT, max_tokens=2)
    assert httpx.get(url + "/health").status_code == 200

    refused = httpx.post(url + "/v1/completions", json={"model": "ad2", "prompt": PROMPT})
    assert refused.status_code == 401 and httpx.get(url + "/metrics").status_code == 401
    scrape = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert scrape.status_code == 200
    named = scrape.headers[REPLICA_HEADER]
    assert f'lorakit_replica_info{{replica="{named}",deployment="Replica"}} 1' in scrape.text
    assert "lorakit_" in scrape.text.split("lorakit_replica_info")[0]  # the replica's own metrics


def test_repeats_of_an_adapter_go_to_the_replica_that_loaded_it(servers):
    url, _ = servers
    client = _client(url)
    loader = {}
    for name in ADAPTERS:  # the adapters were loaded by the test above: the replicas hold them
        loader[name] = _complete(client, name, max_tokens=1)[1]
    hits = total = 0
    for _ in range(5):
        for name in ADAPTERS:
            hits += _complete(client, name, max_tokens=1)[1] == loader[name]
            total += 1
    assert hits / total >= 0.9, (hits, total, loader)
    assert len(set(loader.values())) == 2, loader


def test_a_killed_replica_fails_its_queue_cleanly_and_the_other_answers(servers):
    import ray

    url, single_url = servers
    client = _client(url)
    want = _complete(_client(single_url), "ad0", max_tokens=32)[0]
    victim = _complete(client, "ad0", max_tokens=1)[1]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(victim)]
    assert len(actors) == 1, actors

    def ask(_):
        try:
            text, replica = _complete(client, "ad0", max_tokens=32)
            return 200, text, replica
        except Exception as e:  # noqa: BLE001 (the test sorts what came back)
            status = getattr(e, "status_code", None)
            code = getattr(e, "code", None)
            return status, code, type(e).__name__

    with ThreadPoolExecutor(8) as pool:
        queued = [pool.submit(ask, i) for i in range(8)]  # one at a time on the victim
        deadline = time.monotonic() + 60
        while not any(f.done() for f in queued):  # the first answered: the rest wait behind it
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]))
        results = [f.result(timeout=90) for f in queued]  # none hangs
    statuses = sorted(r[0] for r in results)
    for status, what, replica in results:
        assert (status, what, replica == victim) == (200, want, True) or \
            (status, what) == (503, "replica_unavailable"), (status, what, replica)
    assert 503 in statuses, statuses  # requests were queued on the replica when it died
    later = [_complete(client, "ad0", max_tokens=32) for _ in range(3)]
    assert all(text == want and replica != victim for text, replica in later), later


def test_replicas_below_one_are_refused_before_ray_starts(capsys):
    from lorakit.cli import main

    assert main(["serve", "--replicas", "0"]) == 2
    assert "lorakit serve: error: --replicas: got 0 (expected >= 1)" in capsys.readouterr().err
