"""The one adapter checker (lorakit/adapters/check.py): the faults found in issue 16, each refused
alike by the CLI loader (`load_adapter`), `check-adapter`, the registry and the server, and the
registry file's own faults (a real SQLite file: garbage, another schema, a folder)."""

import copy
import json
import os
import sqlite3

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.adapters.check import BaseModules, open_adapter
from lorakit.adapters.io import load_adapter
from lorakit.cli import main
from lorakit.errors import AdapterError, RegistryError
from lorakit.serve.app import ServerThread, create_app
from lorakit.serve.registry import AdapterRegistry
from tests.serve.builders import (
    greedy, greedy_reference, http_service, make_adapter, make_dora_adapter, merged_model, served,
)

MAG = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(adapter, edit):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def refused_everywhere(model, adapter, match, cache=None):
    """The same refusal from the CLI loader (model untouched), check-adapter and the cache."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=match) as e:
        load_adapter(model, adapter)
    assert str(adapter) in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    if cache is not None:
        with pytest.raises(AdapterError, match=match):
            cache.open(adapter, adapter.name)
    return str(e.value)


def test_dora_magnitude_of_the_wrong_length_is_refused_and_the_engine_goes_on(llama, tokenizer, tmp_path):
    engine, cache, registry = served(llama, tokenizer, tmp_path)
    good = make_adapter(llama, tmp_path / "good", seed=1)
    short = make_dora_adapter(llama, tmp_path / "short")
    edit_tensors(short, lambda t: t.__setitem__(MAG, t[MAG][:-3].clone()))
    refused_everywhere(llama, short, rf"{MAG}: length 61 \(expected 64, the rows of its lora_B\)", cache)
    # Magnitude and B agree with each other but not with the base: refused against the base.
    wide = make_dora_adapter(llama, tmp_path / "wide")
    b_key = MAG.replace("lora_magnitude_vector", "lora_B.weight")
    edit_tensors(wide, lambda t: t.update({MAG: torch.ones(70), b_key: torch.ones(70, 4)}))
    refused_everywhere(llama, wide, r"lora_B.weight: shape \(70, 4\) \(expected \(64, 4\)", cache)
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        registry.add("short", short)
    prompt = tokenizer("the quick brown fox")["input_ids"]
    for name in ("short", "wide"):
        with pytest.raises(AdapterError, match=name):
            cache.acquire(name)  # found under the root on demand, refused before any slot
    assert cache.snapshot()["slots"] == {}
    want = greedy_reference(merged_model(llama, good), prompt, 4)
    assert engine.generate(prompt, "good", greedy(4)).output_ids == want


@pytest.mark.parametrize("key,value,why", [
    ("lora_alpha", float("nan"), r"lora_alpha: NaN or Infinity"),
    ("lora_alpha", float("inf"), r"lora_alpha: NaN or Infinity"),
    ("lora_alpha", -8, r"lora_alpha: got -8 \(expected a finite number > 0\)"),
    ("lora_alpha", 10 ** 400, r"lora_alpha: got 1000.* \(expected a finite number > 0\)"),
    ("r", 0, r"r: got 0 \(expected an integer in 1..65536\)"),
    ("r", 4.0, r"r: got 4.0 \(expected an integer"),
    ("r", 10 ** 9, r"r: got 1000000000 \(expected an integer in 1..65536\)"),
    ("lora_dropout", float("nan"), r"lora_dropout: NaN or Infinity"),
    ("alpha_pattern", {"q_proj": float("-inf")}, r"alpha_pattern.q_proj: NaN or Infinity"),
    ("target_modules", "([", r"target_modules: '\(\[' is not a valid regular expression"),
])
def test_bad_config_values_are_refused_at_add_and_load(llama, tmp_path, key, value, why):
    adapter = make_adapter(llama, tmp_path / "bad", seed=1)
    edit_config(adapter, **{key: value})
    refused_everywhere(llama, adapter, why)
    registry = AdapterRegistry(tmp_path / "reg.sqlite")
    with pytest.raises(AdapterError, match=why):
        registry.add("bad", adapter)
    assert registry.list() == []
    assert main(["check-adapter", str(adapter)]) == 2


def test_server_refuses_what_the_cli_refuses(llama, tokenizer, tmp_path):
    _, cache, _ = served(llama, tokenizer, tmp_path)
    cases = {  # adapter on q, v, down of both layers
        "untargeted": ({"target_modules": ["q_proj", "v_proj"]}, r"mlp\.down_proj: tensors for a "
                       r"module target_modules=\['q_proj', 'v_proj'\] does not select"),
        "layer0": ({"target_modules": r"model\.layers\.0\..*"}, r"layers\.1\..*: tensors for a "
                   "module target_modules="),
        "nothing": ({"target_modules": ["c_attn"]}, "does not select"),
        "regex": ({"target_modules": "*q"}, "not a valid regular expression"),
        "all_linear": ({"target_modules": "all-linear"}, r"missing tensors for 8 module\(s\) its "
                       "config targets"),
    }
    for name, (change, why) in cases.items():
        adapter = make_adapter(llama, tmp_path / name, seed=2)
        edit_config(adapter, **change)
        refused_everywhere(llama, adapter, why, cache)
    # A list entry that matches nothing beside ones that do is PEFT's rule: loaded by both.
    extra = make_adapter(llama, tmp_path / "extra", seed=2)
    edit_config(extra, target_modules=["q_proj", "v_proj", "down_proj", "no_such_proj"])
    assert cache.open(extra, "extra").modules() == open_adapter(extra, BaseModules.of(llama)).modules()


@pytest.mark.parametrize("make,why", [
    (lambda d: ((d / "adapter_config.json").unlink(), (d / "adapter_config.json").mkdir()),
     r"adapter_config.json: a directory \(expected a file\)"),
    (lambda d: ((d / "adapter_model.safetensors").unlink(), (d / "adapter_model.safetensors").mkdir()),
     r"adapter_model.safetensors: a directory \(expected a file\)"),
    (lambda d: ((d / "adapter_config.json").unlink(), os.mkfifo(d / "adapter_config.json")),
     r"adapter_config.json: not a regular file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), "header too small"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-10]), "not a readable safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((2 ** 62).to_bytes(8, "little") + b"{}"),
     "not a readable safetensors file"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "expected a JSON object, got a JSON list"),
    (lambda d: (d / "adapter_config.json").write_text("[" * 100_000), "nested too deeply"),
    (lambda d: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), r"not UTF-8 text \(byte 7\)"),
    (lambda d: (d / "adapter_config.json").write_text('{"r": 4,'), r"not valid JSON \(line 1"),
    (lambda d: (d / "adapter_config.json").write_text(" " * (2 << 20) + "{}"), "expected a JSON config under"),
])
def test_files_of_the_wrong_kind_are_adapter_errors(llama, tmp_path, capsys, make, why):
    adapter = make_adapter(llama, tmp_path / "bad", seed=3)
    make(adapter)
    refused_everywhere(llama, adapter, why)
    assert main(["check-adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit check-adapter: error: {adapter}") and "Traceback" not in err


def test_symlinks_out_of_the_adapters_root_are_refused(llama, tokenizer, tmp_path):
    service = http_service(llama, tokenizer, tmp_path, adapters=1)
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    outside.mkdir()
    for name, file in (("weights", "adapter_model.safetensors"), ("config", "adapter_config.json")):
        adapter = make_adapter(llama, root / name, seed=4)
        os.replace(adapter / file, outside / f"{name}-{file}")
        (adapter / file).symlink_to(outside / f"{name}-{file}")
    inside = make_adapter(llama, root / "inside", seed=5)  # a link that stays inside is fine
    os.replace(inside / "adapter_model.safetensors", root / "inside.safetensors")
    (inside / "adapter_model.safetensors").symlink_to(root / "inside.safetensors")
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for name, file in (("weights", "adapter_model.safetensors"), ("config", "adapter_config.json")):
            r = http.post("/admin/adapters", json={"name": name})
            assert r.status_code == 400, r.text
            assert f"{root / name / file}: resolves to {outside}" in r.json()["error"]["message"]
            r = http.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 400 and "outside the adapters root" in r.text
        assert http.post("/admin/adapters", json={"name": "inside"}).status_code == 201
        r = http.post("/v1/completions", json={"model": "inside", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    # A trusted local path registered from the command line, outside the root, still loads.
    assert open_adapter(tmp_path / "adapters" / "weights").path.name == "weights"


def test_a_row_that_turns_bad_fails_only_its_own_requests(llama, tokenizer, tmp_path):
    service = http_service(llama, tokenizer, tmp_path, adapters=2)
    root = tmp_path / "adapters"
    ask = {"prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0}
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        before = http.post("/v1/completions", json={"model": "ad0", **ask}).json()["choices"][0]["text"]
        assert http.post("/v1/completions", json={"model": "ad1", **ask}).status_code == 200
        assert http.post("/admin/adapters/ad1/unload").status_code == 200
        edit_config(root / "ad1", lora_alpha=float("nan"))  # changed on disk after registration
        for _ in range(2):
            r = http.post("/v1/completions", json={"model": "ad1", **ask})
            assert r.status_code == 400 and "lora_alpha: NaN or Infinity" in r.text
            r = http.post("/v1/completions", json={"model": "ad0", **ask})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == before
        # A row written by an older version with a non-finite alpha and broken JSON.
        with sqlite3.connect(tmp_path / "reg.sqlite") as db:
            db.execute("UPDATE adapters SET lora_alpha = ?, target_modules = '[' WHERE name = 'ad0'",
                       (float("inf"),))
        r = http.get("/admin/adapters")
        assert r.status_code == 200
        rows = {row["name"]: row for row in r.json()["data"]}
        assert "lora_alpha: NaN or Infinity" in rows["ad1"]["error"] and str(root / "ad1") in rows["ad1"]["error"]
        assert rows["ad0"]["lora_alpha"] is None and "lora_alpha: inf" in rows["ad0"]["error"]
        assert http.get("/v1/models").status_code == 200 and http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"model": "ad0", **ask})  # its files are still good
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == before
        edit_config(root / "ad1", lora_alpha=8.0)  # fixed on disk: served again, error cleared
        assert http.post("/v1/completions", json={"model": "ad1", **ask}).status_code == 200
        rows = {row["name"]: row for row in http.get("/admin/adapters").json()["data"]}
        assert rows["ad1"]["error"] is None


def _corrupt(kind, path):
    if kind == "garbage":
        path.write_bytes(b"this is not an SQLite file\n" * 200)
    elif kind == "schema":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE adapters (name TEXT, size INTEGER)")
    else:
        path.mkdir()


@pytest.mark.parametrize("kind,why", [
    ("garbage", r"the adapter registry cannot be used \(file is not a database\); move it aside"),
    ("schema", r"not a lorakit adapter registry \(its adapters table lacks the columns path, "
               r"base_model.*\); move it aside"),
    ("folder", r"not a file \(the adapter registry is an SQLite file\); move it aside"),
])
def test_a_corrupt_registry_is_one_error_with_the_fix(llama, tmp_path, monkeypatch, capsys, kind, why):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    db = home / "adapters.sqlite"
    _corrupt(kind, db)
    with pytest.raises(RegistryError, match=why):
        AdapterRegistry()
    adapter = make_adapter(llama, tmp_path / "a", seed=6)
    for argv in (["adapters", "list"], ["adapters", "add", "a", str(adapter)],
                 ["adapters", "remove", "a"], ["serve", "model=no-such-model-is-loaded"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lorakit {argv[0]}: error: {db}: ") and "\n" not in err, err
        assert f"mv {db} {db}.bad" in err and "lorakit adapters add NAME PATH" in err


def test_a_row_that_cannot_be_read_back_is_listed_with_its_error(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    for name in ("good", "odd"):
        assert main(["adapters", "add", name, str(make_adapter(llama, tmp_path / name, seed=7))]) == 0
    with sqlite3.connect(tmp_path / "home" / "adapters.sqlite") as db:  # an older version's row
        db.execute("UPDATE adapters SET lora_alpha = ?, size_bytes = 'big', created = 'x', "
                   "target_modules = '{' WHERE name = 'odd'", (float("-inf"),))
    capsys.readouterr()
    assert main(["adapters", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["error"] is None and rows["good"]["lora_alpha"] == 8.0
    assert rows["odd"]["lora_alpha"] is None and rows["odd"]["target_modules"] is None
    assert rows["odd"]["error"].startswith("registry row cannot be read back (lora_alpha: -inf; "
                                           "target_modules: not valid JSON; size_bytes: 'big'; "
                                           "created: 'x')")
    assert main(["adapters", "list"]) == 0
    out = capsys.readouterr().out
    assert "odd: registry row cannot be read back" in out and "good" in out
    assert main(["adapters", "remove", "odd"]) == 0


def test_a_bad_dora_adapter_over_http_fails_alone(llama, tokenizer, tmp_path):
    """The campaign's hang: a DoRA magnitude of the wrong length registered, then requested."""
    service = http_service(llama, tokenizer, tmp_path, adapters=1)
    root = tmp_path / "adapters"
    for name, cut in (("short", 3), ("shorter", 10)):
        make_dora_adapter(llama, root / name)
        edit_tensors(root / name, lambda t, c=cut: t.__setitem__(MAG, t[MAG][:-c].clone()))
    ask = {"prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    want = tokenizer.decode(greedy_reference(merged_model(llama, root / "ad0"),
                                             tokenizer(ask["prompt"])["input_ids"], 4))
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/admin/adapters", json={"name": "short"})
        assert r.status_code == 400 and "lora_magnitude_vector: length 61 (expected 64" in r.text
        r = http.post("/v1/completions", json={"model": "shorter", **ask})  # found on demand
        assert r.status_code == 400 and "length 54 (expected 64" in r.text
        r = http.post("/v1/completions", json={"model": "ad0", **ask})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert http.get("/health").status_code == 200
        assert [row["name"] for row in http.get("/admin/adapters").json()["data"]] == ["ad0"]
