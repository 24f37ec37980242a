"""Seeded fuzz of the one adapter checker: malformed adapter folders mixed with good ones.

Each case is an adapter folder made from a good tiny adapter (plain LoRA r=2 on q/v, or DoRA r=4 on
q/v/down) by one mutation: config values of the wrong type, range or finiteness, bad JSON, files
missing, truncated, replaced by folders, FIFOs or symlinks (out of the adapters root, broken,
looping), tensors of the wrong shape, dtype, name or values, modules the base lacks or the config
does not select, a rank above the server's slots, another base's weights hash. Good cases change
nothing that matters (inert PEFT keys, other float dtypes, an equivalent regex, per-module ranks
and alphas, rsLoRA, a symlink inside the root).

Every case goes through `open_adapter` against the base as the server sees it (adapters root,
max_lora_rank 8) and through `check-adapter`'s reader: a bad one raises `AdapterError` naming the
adapter path (nothing else may escape); a good one loads with `load_adapter` and gives the logits
of an independent merge computed here from the raw files (W + s B A, DoRA's m / ||W + s B A||).
A subset goes into a live server through `POST /admin/adapters` and on-demand requests: no 5xx,
every good adapter answers as it does alone, and an adapter registered first keeps its answer.
The first `FAST` cases run in `make test`; the rest (to the end) are marked slow.
"""

import copy
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.adapters.check import BaseModules, open_adapter
from lorakit.adapters.io import load_adapter
from lorakit.adapters.portability import check_adapter
from lorakit.errors import AdapterError
from lorakit.serve.app import ServerThread, create_app
from tests import tiny
from tests.serve.builders import greedy_reference, http_service, make_adapter, make_dora_adapter, merged_model

SEED = 16
FAST = 50
PREFIX = "base_model.model."
IDENTITY = {"name": "tiny-llama", "weights_sha256": "a" * 64}
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"
D0 = "base_model.model.model.layers.0.mlp.down_proj"


@dataclass
class Case:
    label: str
    template: str  # "lora" or "dora"
    mutate: Callable[[Path, Path], None]  # (adapter folder, folder outside the root)
    good: bool = False


# -- mutations --------------------------------------------------------------------------------

def _config(d: Path) -> dict:
    return json.loads((d / "adapter_config.json").read_text())


def set_config(**changes):
    def mutate(d, _out):
        (d / "adapter_config.json").write_text(json.dumps({**_config(d), **changes}))
    return mutate


def drop_config(key):
    def mutate(d, _out):
        c = _config(d)
        del c[key]
        (d / "adapter_config.json").write_text(json.dumps(c))
    return mutate


def write_file(name, data: bytes | Callable[[bytes], bytes]):
    def mutate(d, _out):
        p = d / name
        p.write_bytes(data(p.read_bytes()) if callable(data) else data)
    return mutate


def edit_tensors(edit, metadata=None):
    def mutate(d, _out):
        p = d / "adapter_model.safetensors"
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
        edit(tensors)
        save_file(tensors, str(p), metadata=meta if metadata is None else metadata)
    return mutate


def both(*mutations):
    def mutate(d, out):
        for m in mutations:
            m(d, out)
    return mutate


def replace_with(name, kind):
    def mutate(d, out):
        p = d / name
        target = out / f"{d.name}-{name}"
        if kind in ("outside", "inside"):
            dest = target if kind == "outside" else d.parent / f"{d.name}-{name}"
            os.replace(p, dest)
            p.symlink_to(dest)
            return
        p.unlink()
        if kind == "folder":
            p.mkdir()
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "broken":
            p.symlink_to(out / "no-such-file")
        elif kind == "loop":
            p.symlink_to(p)
    return mutate


def _set(key, value):
    return edit_tensors(lambda t: t.__setitem__(key, value))


def _map(key, fn):
    return edit_tensors(lambda t: t.__setitem__(key, fn(t[key])))


def _pop(key):
    return edit_tensors(lambda t: t.pop(key))


def _poison(key, value, index=(0, 0)):
    def edit(t):
        t[key] = t[key].clone()
        t[key][index] = value
    return edit_tensors(edit)


def _rank_pattern_v1():
    """v_proj at rank 1 (its first row of A, first column of B) with rank_pattern saying so."""
    def edit(t):
        for k in list(t):
            if k.endswith("v_proj.lora_A.weight"):
                t[k] = t[k][:1].clone()
            elif k.endswith("v_proj.lora_B.weight"):
                t[k] = t[k][:, :1].clone()
    return both(edit_tensors(edit), set_config(rank_pattern={"v_proj": 1}))


def _high_rank(d, _out):
    """A consistent r=16 adapter: above the server's max_lora_rank (8)."""
    def edit(t):
        for k in list(t):
            if k.endswith("lora_A.weight"):
                t[k] = t[k].repeat(8, 1)
            elif k.endswith("lora_B.weight"):
                t[k] = t[k].repeat(1, 8) / 8
    edit_tensors(edit)(d, _out)
    set_config(r=16)(d, _out)


def cases() -> list[Case]:
    """Every case, in a seeded order that mixes good and bad from the start."""
    good = [
        Case("original", "lora", lambda d, o: None, True),
        Case("original dora", "dora", lambda d, o: None, True),
        Case("inert PEFT keys", "lora", set_config(
            peft_version="0.99.0", task_type="SEQ_CLS", inference_mode=False, revision=None,
            auto_mapping=None, modules_to_save=None, layers_to_transform=None, loftq_config={},
            base_model_name_or_path=None, megatron_core="megatron.core"), True),
        Case("bf16 tensors", "lora", edit_tensors(lambda t: t.update(
            {k: v.to(torch.bfloat16) for k, v in t.items()})), True),
        Case("fp16 tensors", "dora", edit_tensors(lambda t: t.update(
            {k: v.to(torch.float16) for k, v in t.items()})), True),
        Case("fp64 tensors", "lora", edit_tensors(lambda t: t.update(
            {k: v.double() for k, v in t.items()})), True),
        Case("regex target", "lora", set_config(target_modules=r".*\.(q_proj|v_proj)"), True),
        Case("extra unmatched target", "lora", set_config(target_modules=["q_proj", "v_proj", "nope"]), True),
        Case("rank_pattern", "lora", _rank_pattern_v1(), True),
        Case("alpha_pattern", "lora", set_config(alpha_pattern={"v_proj": 3.0}), True),
        Case("rslora", "lora", set_config(use_rslora=True), True),
        Case("dropout", "dora", set_config(lora_dropout=0.25), True),
        Case("reformatted json", "lora", write_file("adapter_config.json", lambda b: json.dumps(
            dict(reversed(list(json.loads(b).items()))), indent=7).encode()), True),
        Case("no metadata", "lora", edit_tensors(lambda t: None, metadata={}), True),
        Case("weights linked inside root", "lora", replace_with("adapter_model.safetensors", "inside"), True),
        Case("config linked inside root", "dora", replace_with("adapter_config.json", "inside"), True),
        Case("integer alpha", "lora", set_config(lora_alpha=8), True),
    ]
    bad = []
    for key, values in {
        "r": [0, -1, 2.5, "2", True, None, 10 ** 9, float("nan"), [], 3, 1, 10 ** 30],
        "lora_alpha": [float("nan"), float("inf"), float("-inf"), -4, 0, "16", None, True, 10 ** 400,
                       [], {}],
        "target_modules": ["([", "", [], [""], [1], 5, None, {"q_proj": 1}, ["v_proj"], ["nonexistent"],
                           r"model\.layers\.0\..*", "all-linear", "*"],
        "use_dora": [True, "yes", 1],
        "use_rslora": ["no", 1, None],
        "rank_pattern": [[], {"q_proj": 0}, {"q_proj": 3}, {"([": 2}, {"q_proj": float("nan")},
                         {"q_proj": 2.5}],
        "alpha_pattern": [{"q_proj": -1}, {"q_proj": float("inf")}, {"(": 1}, "x"],
        "lora_dropout": [float("nan"), 1.5, -0.1, "0"],
        "bias": ["all", 1],
        "peft_type": ["IA3", 5],
        "init_lora_weights": ["olora", "loftq", "pissa_niter_4", "weird", 3],
        "foo": [1],
        "modules_to_save": [["lm_head"]],
        "layer_replication": [[[0, 1]]],
        "fan_in_fan_out": ["x"],
    }.items():
        for v in values:
            for template in ("lora", "dora") if key != "use_dora" else ("lora",):
                bad.append(Case(f"{template} config {key}={v!r:.40}", template, set_config(**{key: v})))
    bad.append(Case("config keys renamed", "lora", write_file("adapter_config.json", lambda b: b.replace(
        b'"r":', b'"R":').replace(b'"lora_alpha":', b'"alpha":'))))
    for key in ("r", "lora_alpha", "target_modules"):
        bad.append(Case(f"config without {key}", "lora", drop_config(key)))
    cfg = "adapter_config.json"
    for label, data in {
        "config '{'": b"{", "config truncated": lambda b: b[: len(b) // 2], "config empty": b"",
        "config list": b"[]", "config string": b'"r"', "config null": b"null", "config number": b"4",
        "config not utf-8": lambda b: b.replace(b'"r"', b'"\xff"'),
        "config utf-16": lambda b: b.decode().encode("utf-16"),
        "config deep": b"[" * 100_000 + b"]" * 100_000, "config deep object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
        "config NaN literal": lambda b: b.replace(b'"lora_alpha": 8.0', b'"lora_alpha": NaN'),
        "config huge": lambda b: b[:-2] + b', "pad": "' + b"x" * (2 << 20) + b'"}',
        "config with BOM": lambda b: b"\xef\xbb\xbf" + b, "config binary": bytes(range(256)),
        "config huge int": lambda b: b.replace(b'"r": 2', b'"r": ' + b"9" * 5000),
    }.items():
        bad.append(Case(label, "lora", write_file(cfg, data)))
    w = "adapter_model.safetensors"
    for label, data in {
        "weights empty": b"", "weights 8 bytes": lambda b: b[:8], "weights truncated": lambda b: b[:-7],
        "weights half": lambda b: b[: len(b) // 2], "weights header huge": (2 ** 62).to_bytes(8, "little") + b"{}",
        "weights header not json": (5).to_bytes(8, "little") + b"hello",
        "weights header lies": lambda b: b[:8] + b[8:].replace(b'"F32"', b'"I64"', 1),
        "weights garbage": bytes(random.Random(3).randrange(256) for _ in range(4096)),
        "weights pickle bytes": b"\x80\x04\x95not safetensors",
        "weights header offsets": lambda b: b.replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1),
    }.items():
        bad.append(Case(label, "lora", write_file(w, data)))
    for name in (cfg, w):
        for kind in ("folder", "fifo", "broken", "loop", "outside"):
            bad.append(Case(f"{name} {kind}", "lora", replace_with(name, kind)))
        bad.append(Case(f"{name} missing", "lora", lambda d, o, n=name: (d / n).unlink()))
    bad.append(Case("pickled weights", "lora", lambda d, o: os.replace(d / w, d / "adapter_model.bin")))
    a, b, m = f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight", f"{Q0}.lora_magnitude_vector"
    for template in ("lora", "dora"):
        tensor_cases = {
            "drop A": _pop(a), "drop B": _pop(b), "extra key": _set("foo", torch.zeros(2)),
            "extra untargeted module": edit_tensors(lambda t: t.update(
                {f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64),
                 f"{PREFIX}model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(128, 2)})),
            "adapter-named key": edit_tensors(lambda t: t.__setitem__(
                a.replace("lora_A.weight", "lora_A.default.weight"), t.pop(a))),
            "key without prefix": edit_tensors(lambda t: t.__setitem__(a[len(PREFIX):], t.pop(a))),
            "module not in base": edit_tensors(lambda t: t.update(
                {k.replace("layers.0.", "layers.9."): t.pop(k) for k in [k for k in list(t) if Q0 in k]})),
            "A extra row": _map(a, lambda x: torch.cat([x, x[:1]])),
            "A d_in 65": _map(a, lambda x: torch.cat([x, x[:, :1]], 1)),
            "B d_out 63": _map(b, lambda x: x[:-1].clone()),
            "B extra column": _map(b, lambda x: torch.cat([x, x[:, :1]], 1)),
            "A 1-d": _map(a, lambda x: x.flatten().clone()), "B 3-d": _map(b, lambda x: x[None].clone()),
            "A empty": _map(a, lambda x: x[:, :0].clone()), "A transposed": _map(a, lambda x: x.T.contiguous()),
            "B int32": _map(b, lambda x: x.to(torch.int32)), "A int8": _map(a, lambda x: x.to(torch.int8)),
            "B bool": _map(b, lambda x: x > 0), "A float8": _map(a, lambda x: x.to(torch.float8_e4m3fn)),
            "A NaN": _poison(a, float("nan")), "B inf": _poison(b, float("inf")),
            "B -inf": _poison(b, float("-inf"), (5, 1)), "no tensors": edit_tensors(lambda t: t.clear()),
            "hash of another base": edit_tensors(lambda t: None, metadata={
                "format": "pt", "lorakit.base_weights_sha256": "b" * 64, "lorakit.base_model": "other"}),
            "rank above the slots": _high_rank,
        }
        if template == "lora":
            tensor_cases["magnitude without DoRA"] = _set(m, torch.ones(64))
        else:
            tensor_cases.update({
                "magnitude short": _map(m, lambda x: x[:-3].clone()),
                "magnitude long": _map(m, lambda x: torch.cat([x, x[:5]])),
                "magnitude 2-d": _map(m, lambda x: x[None].clone()),
                "magnitude missing": _pop(m), "magnitude NaN": _poison(m, float("nan"), (7,)),
                "magnitude int": _map(m, lambda x: x.to(torch.int64)),
                "magnitude and B 70 rows": edit_tensors(lambda t: t.update(
                    {m: torch.ones(70), b: torch.ones(70, 4)})),
                "use_dora false": set_config(use_dora=False),
            })
        bad += [Case(f"{template} {label}", template, fn) for label, fn in tensor_cases.items()]
    out = good * 3 + bad
    random.Random(SEED).shuffle(out)
    return out


CASES = cases()
BAD = [c for c in CASES if not c.good]


def test_the_suite_has_enough_cases():
    assert len(BAD) >= 200 and len(CASES) - len(BAD) >= 40
    assert sum(not c.good for c in CASES[:FAST]) >= 30 and sum(c.good for c in CASES[:FAST]) >= 5


# -- running ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The base (with a weights hash), templates, and a prompt."""
    tmp = tmp_path_factory.mktemp("adapter_fuzz")
    base = tiny.tiny_llama()
    base.lorakit_identity = dict(IDENTITY)
    templates = {"lora": make_adapter(base, tmp / "templates" / "lora", seed=7, r=2, alpha=8.0,
                                      targets=("q_proj", "v_proj"), identity=IDENTITY),
                 "dora": make_dora_adapter(base, tmp / "templates" / "dora")}
    save_file(load_file(str(templates["dora"] / "adapter_model.safetensors")),
              str(templates["dora"] / "adapter_model.safetensors"),
              metadata={"format": "pt", "lorakit.base_weights_sha256": IDENTITY["weights_sha256"]})
    ids = torch.tensor([tiny.tiny_tokenizer()("the quick brown fox jumps")["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits
    return tmp, base, templates, ids, base_logits


def build(case: Case, index: int, root: Path, outside: Path, templates) -> Path:
    d = root / f"c{index:03d}"
    shutil.copytree(templates[case.template], d)
    case.mutate(d, outside)
    return d


@torch.no_grad()
def reference_logits(base, d: Path, ids) -> torch.Tensor:
    """Logits of `base` with the adapter merged by hand from the raw files (PEFT's meaning)."""
    cfg = json.loads(Path(os.path.realpath(d / "adapter_config.json")).read_text())
    tensors = load_file(os.path.realpath(d / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key[len(PREFIX):-len(".lora_A.weight")]
        a = tensors[key].double()
        b = tensors[f"{PREFIX}{module}.lora_B.weight"].double()
        leaf, r = module.rsplit(".", 1)[-1], a.shape[0]
        alpha = (cfg.get("alpha_pattern") or {}).get(leaf, cfg["lora_alpha"])
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        linear = model.get_submodule(module)
        w = linear.weight.double() + scaling * b @ a  # (d_out, d_in)
        magnitude = tensors.get(f"{PREFIX}{module}.lora_magnitude_vector")
        if magnitude is not None:  # DoRA: m * (W + sBA) / ||W + sBA|| per output row
            w = magnitude.double()[:, None] * w / w.norm(dim=1, keepdim=True)
        linear.weight.copy_(w.to(linear.weight.dtype))
    return model(ids).logits


def run_checker(cases: list[Case], offset: int, world) -> list[str]:
    tmp, base, templates, ids, base_logits = world
    root, outside = tmp / f"root{offset}", tmp / f"outside{offset}"
    root.mkdir()
    outside.mkdir()
    server_view = BaseModules.of(base, max_rank=8)
    failures = []
    for i, case in enumerate(cases, start=offset):
        d = build(case, i, root, outside, templates)
        try:
            open_adapter(d, server_view, root=root)
            accepted, message = True, None
        except AdapterError as e:
            accepted, message = False, str(e)
        except Exception as e:  # anything but AdapterError is a failure of the checker
            failures.append(f"{case.label}: {type(e).__name__}: {e}")
            continue
        try:  # check-adapter's reader: a report or an AdapterError, nothing else
            check_adapter(d, peft_fields=set())
        except AdapterError as e:
            assert str(d) in str(e), (case.label, str(e))
        except Exception as e:
            failures.append(f"{case.label} (check-adapter): {type(e).__name__}: {e}")
        if case.good != accepted:
            failures.append(f"{case.label}: {'refused' if message else 'accepted'} {message or ''}")
        elif message is not None and str(d) not in message:
            failures.append(f"{case.label}: the message does not name {d}: {message}")
        elif accepted:
            model = copy.deepcopy(base)
            load_adapter(model, d)
            model.eval()
            with torch.no_grad():
                got = model(ids).logits
            want = reference_logits(base, d, ids)
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                failures.append(f"{case.label}: logits differ from the hand merge by "
                                f"{(got - want).abs().max().item():.3g}")
            if torch.allclose(got, base_logits, atol=1e-3):
                failures.append(f"{case.label}: the adapter changes nothing")
    return failures


def test_checker_fast(world):
    failures = run_checker(CASES[:FAST], 0, world)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_checker_slow(world):
    failures = run_checker(CASES[FAST:], FAST, world)
    assert not failures, "\n".join(failures)


def run_server(cases: list[Case], world, tokenizer, tmp_path) -> list[str]:
    """Register each case through the admin API (bad ones also requested by name, on demand)
    into one live server: no 5xx, good ones answer as alone, ad0 keeps its answer."""
    _, base, templates, _, _ = world
    service = http_service(base, tokenizer, tmp_path, adapters=1, max_loras=2, max_cpu_loras=3)
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    outside.mkdir()
    prompt = "the quick brown fox"
    ask = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    ids = tokenizer(prompt)["input_ids"]
    want_ad0 = tokenizer.decode(greedy_reference(merged_model(base, root / "ad0"), ids, 4))
    failures = []
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        for i, case in enumerate(cases):
            d = build(case, i, root, outside, templates)
            r = http.post("/admin/adapters", json={"name": d.name})
            if r.status_code >= 500 or r.status_code != (201 if case.good else 400):
                failures.append(f"{case.label}: register {r.status_code} {r.text[:300]}")
            if not case.good:
                r = http.post("/v1/completions", json={"model": d.name, **ask})
                if r.status_code >= 500 or r.status_code not in (400, 404):
                    failures.append(f"{case.label}: on-demand request {r.status_code} {r.text[:300]}")
                continue
            r = http.post("/v1/completions", json={"model": d.name, **ask})
            want = tokenizer.decode(greedy_reference(merged_model(base, d), ids, 4))
            if r.status_code != 200 or r.json()["choices"][0]["text"] != want:
                failures.append(f"{case.label}: {r.status_code} {r.text[:200]} (alone: {want!r})")
            r = http.post("/v1/completions", json={"model": "ad0", **ask})
            if r.status_code != 200 or r.json()["choices"][0]["text"] != want_ad0:
                failures.append(f"after {case.label}: ad0 answered {r.status_code} {r.text[:200]}")
        assert http.get("/health").status_code == 200
        listed = http.get("/admin/adapters")
        assert listed.status_code == 200
        assert sorted(row["name"] for row in listed.json()["data"]) == sorted(
            ["ad0"] + [f"c{i:03d}" for i, c in enumerate(cases) if c.good])
        assert http.get("/v1/models").status_code == 200
    return failures


def test_live_server_fast(world, tokenizer, tmp_path):
    failures = run_server(CASES[:FAST][:24], world, tokenizer, tmp_path)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_live_server_slow(world, tokenizer, tmp_path):
    failures = run_server(CASES, world, tokenizer, tmp_path)
    assert not failures, "\n".join(failures)
