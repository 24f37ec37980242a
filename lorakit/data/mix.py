"""Other data mixed into every epoch against forgetting: `data.mix` files and `data.replay` rows.

The material's remedy for catastrophic forgetting is to keep general data in the training mix
(about 1:4, or 5-10% of the rows). Two sources, both seeded and both counted:

- `data.mix: [{path: general.jsonl, weight: 0.2}]`: rows of another file. `weight` is the share
  of each epoch's rows drawn from that file: 0.2 is one general row per four task rows (1:4).
- `data.replay: 0.2`: self-distillation replay (as in Huang et al. 2024, "Mitigating Catastrophic
  Forgetting in Large Language Models with Self-Synthesized Rehearsal"): the base model's own
  greedy answers to the replay half of the shipped general prompts (`lorakit.eval.forgetting`;
  the probe prompts are never replayed), generated once before the first step and kept as
  replay.jsonl in the run folder, for users with no general data of their own.

With task rows N and shares w_1..w_k (mix weights and replay), an epoch holds every task row once
plus round(w_j * N / (1 - sum w)) rows of source j, so source j is w_j of the epoch. The rows of a
source are drawn afresh each epoch from (data.seed, epoch, j) alone: a seeded permutation of the
source, repeated whole when the source is smaller than its count. Mixed rows are training rows
only: validation and the task's evaluation never see them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

MIX_KEYS = ("path", "weight")
REPLAY_FILE = "replay.jsonl"
REPLAY_MAX_NEW_TOKENS = 128


def mix_problems(mix: list, replay: float) -> list[str]:
    """Problems of `data.mix` and `data.replay`, one line each (the config validator calls this)."""
    p = []
    total = 0.0
    for i, entry in enumerate(mix):
        where = f"data.mix[{i}]"
        if not isinstance(entry, dict):
            p.append(f"{where}: got {type(entry).__name__} (expected a mapping {{path: FILE, weight: SHARE}})")
            continue
        for key in entry:
            if key not in MIX_KEYS:
                p.append(f"{where}.{key}: unknown key (expected path and weight)")
        path, weight = entry.get("path"), entry.get("weight")
        if not isinstance(path, str) or not path:
            p.append(f"{where}.path: got {path!r} (expected a JSONL, JSON or CSV file)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1:
            p.append(f"{where}.weight: got {weight!r} (expected the share of each epoch's rows, 0 < x < 1; "
                     "0.2 = one row of this file per four task rows)")
        else:
            total += weight
    if isinstance(replay, (int, float)) and not 0 <= replay < 1:
        p.append(f"data.replay: got {replay} (expected 0 <= x < 1; the share of each epoch's rows)")
    elif not p and total + replay >= 1:
        p.append(f"data.mix: the weights and data.replay add up to {total + replay:g} (expected < 1: "
                 "the task rows are the rest of each epoch)")
    return p


def epoch_counts(n_task: int, shares: list[float]) -> list[int]:
    """Rows of each source in one epoch beside `n_task` task rows (see the module docstring)."""
    rest = 1.0 - sum(shares)
    return [round(w * n_task / rest) for w in shares]


def draw(pool_size: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into a pool: whole seeded permutations, then a part of one more."""
    out = []
    while len(out) < count:
        order = list(range(pool_size))
        rng.shuffle(order)
        out += order[:count - len(out)]
    return out


@dataclass
class MixedRows:
    """The mixed sources after the task's rows: `rows` is what follows the N task rows in the
    training list, `members(epoch)` the indices (into task + rows) one epoch trains on."""

    n_task: int
    seed: int
    names: list[str] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    pools: list[list] = field(default_factory=list)  # encoded rows per source
    counts: list[int] = field(default_factory=list)  # rows per epoch per source

    @property
    def rows(self) -> list:
        return [row for pool in self.pools for row in pool]

    def members(self, epoch: int) -> list[int]:
        out = list(range(self.n_task))
        offset = self.n_task
        for j, (pool, count) in enumerate(zip(self.pools, self.counts)):
            rng = random.Random(self.seed * 1_000_003 + epoch * 1_009 + j)
            out += [offset + i for i in draw(len(pool), count, rng)]
            offset += len(pool)
        return out

    def summary(self) -> str:
        """`each epoch: N task rows + k from FILE (w%) + ...` (the training note)."""
        per_epoch = self.n_task + sum(self.counts)
        parts = [f"{self.n_task} task rows"] + [
            f"{c} {name} ({100 * c / per_epoch:.1f}%, drawn from {len(pool)})"
            for name, c, pool in zip(self.names, self.counts, self.pools)]
        return "each epoch: " + " + ".join(parts) + f" = {per_epoch} rows"

    def as_dict(self) -> dict:
        per_epoch = self.n_task + sum(self.counts)
        return {"task_rows": self.n_task, "rows_per_epoch": per_epoch,
                "sources": [{"source": n, "share": s, "rows_per_epoch": c, "pool": len(p)}
                            for n, s, c, p in zip(self.names, self.shares, self.counts, self.pools)]}


def replay_examples(cfg, model, tokenizer, out_dir: Path, batch_size: int = 16,
                    max_new_tokens: int = REPLAY_MAX_NEW_TOKENS, say=None) -> list:
    """The replay rows: the base's greedy answers to the replay prompts, read from the run's
    replay.jsonl when a previous start wrote it (resume), else generated now and written
    (`say(text)` announces it: it takes a while on a CPU)."""
    import json

    from lorakit.atomic import write_text
    from lorakit.eval.forgetting import answered, prompt_ids, replay_prompts

    path = Path(out_dir) / REPLAY_FILE
    prompts = replay_prompts()
    if path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        answers = [r.get("answer") for r in rows]
        if [r.get("prompt") for r in rows] == prompts and all(isinstance(a, str) for a in answers):
            return answered(prompts, answers, str(path), cfg.data.system_prompt)
    from lorakit.eval.generate import greedy_answers

    if say is not None:
        say(f"data.replay: the base answers {len(prompts)} general prompts (greedy, up to "
            f"{max_new_tokens} tokens) once; kept in {path}")
    answers = greedy_answers(model, tokenizer, prompt_ids(prompts, tokenizer, cfg.data.system_prompt),
                             max_new_tokens, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n"
                             for p, a in zip(prompts, answers)))
    return answered(prompts, answers, str(path), cfg.data.system_prompt)


def mixed_rows(cfg, n_task: int, encode, replay: list | None = None) -> MixedRows:
    """The `data.mix` files (read with `lorakit.data.formats`) and the replay rows, encoded with
    `encode(examples) -> encoded rows` (the task's own truncation rules), with their counts."""
    from lorakit.data.formats import load_examples
    from lorakit.errors import DataError

    mixed = MixedRows(n_task, cfg.data.seed)
    sources = [(e["path"], float(e["weight"]), None) for e in cfg.data.mix]
    if cfg.data.replay:
        sources.append(("replay rows", cfg.data.replay, replay or []))
    for name, share, examples in sources:
        if examples is None:
            examples = load_examples(name, system_prompt=cfg.data.system_prompt)
        pool = encode(examples)
        if not pool:
            raise DataError(f"{name}: no usable rows to mix in (expected at least one row that "
                            f"fits data.max_seq_len={cfg.data.max_seq_len})")
        mixed.names.append(name if name == "replay rows" else f"from {Path(name).name}")
        mixed.shares.append(share)
        mixed.pools.append(pool)
    mixed.counts = epoch_counts(n_task, mixed.shares)
    return mixed
