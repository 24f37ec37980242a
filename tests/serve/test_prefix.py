"""Prefix cache: block matching and eviction; prefills from cached prefixes give the same tokens
as each adapter merged and run alone, and a reloaded adapter never meets its old blocks."""

import random

import torch

from lorakit.serve.engine import Request
from lorakit.serve.prefix import PrefixCache
from tests.serve.builders import (greedy, greedy_reference, make_adapter, merged_model, run_all,
                                  served)

BLOCK = 4


def _kv(n_tokens: int, fill: float = 1.0):
    """kv_of for a fake model of 2 layers, 1 head, head dim 3; token t's values are t * fill."""
    full = torch.arange(n_tokens, dtype=torch.float32)[None, None, None, :, None] * fill
    full = full.expand(2, 2, 1, n_tokens, 3).contiguous()
    return lambda start, end: full[:, :, :, start:end]


def test_match_is_the_longest_cached_whole_block_prefix_short_of_the_last_token():
    cache = PrefixCache(max_bytes=1 << 20, block=BLOCK)
    tokens = list(range(10, 21))  # 11 tokens: two whole blocks stored
    assert cache.insert("a", tokens, _kv(11)) == 2
    assert cache.insert("a", tokens, _kv(11)) == 0  # already there
    got = cache.match("a", tokens + [99])
    assert [b.shape for b in got] == [(2, 2, 1, BLOCK, 3)] * 2
    assert torch.equal(torch.cat(got, dim=3)[0, 0, 0, :, 0], torch.arange(8.0))
    assert len(cache.match("a", tokens[:8])) == 1  # the last token is always computed
    assert len(cache.match("a", tokens[:5])) == 1
    assert cache.match("a", tokens[:4]) == []
    assert cache.match("b", tokens) == []  # another adapter's weights: nothing shared
    changed = tokens[:5] + [0] + tokens[6:]  # differs inside block 1: only block 0 is shared
    assert len(cache.match("a", changed)) == 1
    changed = [0] + tokens[1:]  # differs in block 0: block 1's tokens alone do not match
    assert cache.match("a", changed) == []


def test_least_recently_used_blocks_go_first_when_over_budget():
    block_bytes = 2 * 2 * 1 * BLOCK * 3 * 4
    cache = PrefixCache(max_bytes=3 * block_bytes, block=BLOCK)
    first, second = list(range(8)) + [1], list(range(100, 108)) + [1]
    cache.insert("a", first, _kv(9))
    assert len(cache.match("a", first)) == 2  # first is now the most recently used
    cache.insert("a", second, _kv(9))
    assert cache.nbytes <= 3 * block_bytes and len(cache) == 3 and cache.evictions == 1
    assert len(cache.match("a", second)) == 2
    # the least recently used chain loses its deepest block first, not the one it extends
    assert len(cache.match("a", first)) == 1
    PrefixCache(max_bytes=0, block=BLOCK).insert("a", first, _kv(9))  # off: stores nothing




def test_cached_prefixes_give_each_adapters_merged_tokens(llama, tokenizer, tmp_path):
    rng = random.Random(0)
    dirs = {f"a{i}": make_adapter(llama, tmp_path / f"a{i}", seed=20 + i, r=4) for i in range(2)}
    prefix = PrefixCache(max_bytes=1 << 24, block=BLOCK)
    engine, _, registry = served(llama, tokenizer, tmp_path, prefix_cache=prefix)
    for name, d in dirs.items():
        registry.add(name, d)
    system = [rng.randrange(3, 400) for _ in range(13)]  # shared by every prompt

    def prompt(n):
        return system + [rng.randrange(3, 400) for _ in range(n)]

    adapters = [None, "a0", "a1"]
    warm = [engine.submit(Request(prompt(3), a, greedy(4))) for a in adapters]
    run_all(engine, warm)
    assert engine.prefix_hit_tokens == 0 and len(prefix) == 3 * 4  # 16 tokens each: 4 blocks
    # One step's joiners: short and long suffixes (a row with a long cached prefix and a short
    # suffix uses only part of it), a repeat of a whole prompt, and a prompt with no hit at all.
    prompts = [prompt(1), prompt(9), warm[2].prompt_ids, prompt(2),
               [rng.randrange(3, 400) for _ in range(11)]]
    reqs = [engine.submit(Request(p, adapters[i % 3], greedy(6))) for i, p in enumerate(prompts)]
    reqs.append(engine.submit(Request(warm[1].prompt_ids, "a1", greedy(6))))  # same tokens, other adapter
    run_all(engine, reqs)
    # Every row with the system prefix has its first 12 tokens cached; the group computes the
    # most new tokens any of them needs (10, for the 22-token prompt), each row reuses the rest.
    hit_rows = [r for r in reqs if r.prompt_ids[:13] == system]
    assert len(hit_rows) == 5
    assert engine.prefix_hit_tokens == sum(len(r.prompt_ids) - 10 for r in hit_rows)
    merged = {a: merged_model(llama, dirs[a] if a else None) for a in adapters}
    for r in warm + reqs:
        assert r.output_ids == greedy_reference(merged[r.adapter], r.prompt_ids,
                                                len(r.output_ids)), (r.adapter, len(r.prompt_ids))


def test_prefix_cache_changes_no_logit(llama, tokenizer, tmp_path):
    """The next-token logits after a cached-prefix prefill equal a full prefill's (fp32)."""
    d = make_adapter(llama, tmp_path / "a", seed=3, r=4)
    rng = random.Random(1)
    system = [rng.randrange(3, 400) for _ in range(17)]
    logits = {}
    for label, prefix in (("cached", PrefixCache(1 << 24, BLOCK)), ("plain", None)):
        engine, _, registry = served(llama, tokenizer, tmp_path / label, prefix_cache=prefix)
        registry.add("a", d)
        seen = []
        engine._take = lambda reqs, lg, take=engine._take: (seen.append(lg.clone()), take(reqs, lg))[1]
        run_all(engine, [engine.submit(Request(system + [5, 6], "a", greedy(1)))])
        run_all(engine, [engine.submit(Request(system + [7, 8, 9], "a", greedy(1)))])
        logits[label] = seen[-1]
        assert engine.prefix_hit_tokens == (16 if prefix else 0)
    torch.testing.assert_close(logits["cached"], logits["plain"], rtol=1e-5, atol=1e-5)


def test_a_reloaded_adapter_does_not_reuse_its_old_blocks(llama, tokenizer, tmp_path):
    first = make_adapter(llama, tmp_path / "first", seed=30, r=4)
    other = make_adapter(llama, tmp_path / "other", seed=31, r=4)
    prefix = PrefixCache(max_bytes=1 << 24, block=BLOCK)
    engine, cache, registry = served(llama, tokenizer, tmp_path, prefix_cache=prefix)
    registry.add("x", first)
    ids = list(range(40, 60))
    a = engine.generate(ids, "x", greedy(5)).output_ids
    cache.unload("x")
    registry.remove("x")
    registry.add("x", other)  # same name, other weights
    b = engine.generate(ids, "x", greedy(5)).output_ids
    assert engine.prefix_hit_tokens == 0
    assert a == greedy_reference(merged_model(llama, first), ids, 5)
    assert b == greedy_reference(merged_model(llama, other), ids, 5)
    assert engine.generate(ids, "x", greedy(5)).output_ids == b
    assert engine.prefix_hit_tokens == 16  # the same weights again: their blocks are used
