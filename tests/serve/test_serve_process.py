"""`lorakit serve` as a user runs it: its own process, the engine on the main thread, uvicorn on
another; answered over HTTP with the `openai` client, then stopped with Ctrl-C (SIGINT)."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests import tiny

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command(tmp_path, port: int) -> list[str]:
    """`lorakit serve` on a tiny Llama saved as a Hugging Face directory."""
    base_dir = tmp_path / "tiny-base"
    tiny.tiny_llama().save_pretrained(base_dir)
    tiny.tiny_tokenizer().save_pretrained(base_dir)
    # dtype left at its default (auto), the policy `lorakit generate` shares.
    return [sys.executable, "-m", "lorakit", "serve", "--port", str(port), f"model={base_dir}",
            f"adapters_root={tmp_path / 'adapters'}"]


def test_serve_process_answers_and_stops_on_sigint(tmp_path):
    from openai import OpenAI

    port = _free_port()
    log = tmp_path / "serve.log"  # a file, not a pipe nobody drains while the server runs
    with open(log, "w") as out:
        proc = subprocess.Popen(_serve_command(tmp_path, port), stdout=out,
                                stderr=subprocess.STDOUT, env=ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=5,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
        # The same chat prompt, greedy, gets the same answer from `lorakit generate` (one dtype
        # policy: serve once answered in bf16 and generate in fp32).
        prompt = "is this bike still available?"
        chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": prompt}])
        generated = subprocess.run(
            [sys.executable, "-m", "lorakit", "generate", "--model", str(tmp_path / "tiny-base"),
             "--prompt", prompt, "--max-new-tokens", "8"],
            capture_output=True, text=True, env=ENV, timeout=120)
        assert generated.returncode == 0, generated.stderr
        assert generated.stdout.strip() == chat.choices[0].message.content.strip()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_process_fails_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(_serve_command(tmp_path, taken.getsockname()[1]),
                              capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    assert "address already in use" in (proc.stdout + proc.stderr).lower()
