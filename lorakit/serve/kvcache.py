"""`BatchKV`: the running batch's KV cache in preallocated buffers, written in place each step.

The layout is the one transformers uses for batched generation, left padding: row b's tokens sit
in columns [start_b, c) of buffers (rows, H, cols, D) per layer, and every row writes its next
token at the same column c. Because all rows end at column c, a column distance is a token
distance in every row, so the attention mask is an ordinary 2-D padding mask over columns
[s, c] (s = the first column any row uses) and transformers builds its 4-D form for whatever
attention implementation and sliding window the model has. Positions are `c - start_b`, the
number of real tokens before the new one, as `generate` computes them from the mask.

What a decode step costs is what this layout is for. The previous cache held a
`DynamicCache`, whose `update` concatenates each layer's whole cache with the new column, and
re-padded and concatenated the whole cache again whenever rows joined or left: at batch 32 that
copied the cache about three times per step. Here a step writes one column per layer and hands
the attention a view; the mask and positions are built from host integers, without reading the
device. Joining copies only the newcomers' prefill cache into the rows after the running ones;
leaving moves the last rows into the holes (so rows stay 0..B-1 and the batch is a view), and
the caller reorders its requests by the order `retire` returns. Buffers grow geometrically
(rows up to `max_rows`, columns doubling) and the live columns are shifted back to the left
edge when the write column reaches the end, so copies of the whole cache are rare.

Columns a row does not use are masked and must hold finite numbers (a masked score still
multiplies its value by 0 in the attention kernel, and 0 x NaN is NaN): buffers start zeroed and
a joining row's columns left of its prompt are zeroed.

Prefill is unchanged: newcomers run as their own left-padded batch in a transformers
`DynamicCache`, which `join` then copies in.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) for a left-padded mask: 0, 1, 2... over real tokens, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids (B, L), mask (B, L)), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's buffers; `BatchKV` owns the row and column bookkeeping."""

    is_sliding = False

    def __init__(self, owner: BatchKV, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.owner = owner
        self.keys, self.values = keys, values  # (rows, H, cols, D)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("BatchKV layers are allocated by BatchKV.join")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys and values (B, H, 1, D) at column c; return columns [s, c]."""
        kv = self.owner
        if key_states.shape[0] != kv.rows or key_states.shape[2] != 1:
            raise ValueError(f"BatchKV takes one new token for each of its {kv.rows} rows, got "
                             f"keys of shape {tuple(key_states.shape)}; prefill goes through a "
                             f"DynamicCache")
        b, c = kv.rows, kv.end
        self.keys[:b, :, c:c + 1].copy_(key_states)
        self.values[:b, :, c:c + 1].copy_(value_states)
        return self.keys[:b, :, kv.first:c + 1], self.values[:b, :, kv.first:c + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.first

    def get_max_length(self) -> int:
        return -1


class BatchKV(Cache):
    """The running batch's keys and values; row i belongs to the i-th running sequence.

    Passed to the model as its cache for decode steps: transformers calls `update` per layer
    and `get_mask_sizes` / `get_query_offset` to size the mask.
    """

    def __init__(self, max_rows: int) -> None:
        super().__init__(layers=[])
        self.max_rows = max_rows
        self.starts: list[int] = []  # first column of each row's real tokens
        self.end = 0  # c: the column the next decode step writes
        self.first = 0  # s: min(starts), the first column attention reads

    @property
    def rows(self) -> int:
        return len(self.starts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for l in self.layers for t in (l.keys, l.values))

    # -- joining and leaving -----------------------------------------------------------------

    def join(self, prefill, lengths: list[int]) -> None:
        """Append rows prefilled on their own: `prefill` is the DynamicCache of that left-padded
        forward (J, H, L, D) per layer, `lengths` the J prompt lengths."""
        if not self.starts:
            self.end = self.first = 0
        layers = [(l.keys, l.values) for l in prefill.layers]
        joined, width = layers[0][0].shape[0], layers[0][0].shape[2]
        if not self.layers:
            self._allocate(layers, joined, 2 * (width + 1))
        self._reserve(self.rows + joined, left=width, right=1)
        b, c = self.rows, self.end
        for layer, (k, v) in zip(self.layers, layers):
            for buf, new in ((layer.keys, k), (layer.values, v)):
                buf[b:b + joined, :, self.first:c - width].zero_()
                buf[:b, :, c - width:self.first].zero_()  # now read, masked, by the old rows
                buf[b:b + joined, :, c - width:c].copy_(new)
        self.starts += [c - n for n in lengths]
        self.first = min(self.starts)

    def retire(self, keep: list[int]) -> list[int]:
        """Keep only rows `keep` (ascending). Returns the surviving rows' old indices in their
        new order: the last rows move into the holes, so at most one copy per leaving row."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(self.rows))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        order = order[:n]
        if holes:
            device = self.layers[0].keys.device
            dst = torch.tensor(holes, device=device)
            src = torch.tensor(movers, device=device)
            for layer in self.layers:
                for buf in (layer.keys, layer.values):
                    live = buf[:, :, self.first:self.end]
                    live.index_copy_(0, dst, live.index_select(0, src))
        self.starts = [self.starts[i] for i in order]
        self.first = min(self.starts) if self.starts else 0
        return order

    # -- one decode step ---------------------------------------------------------------------

    def step_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask (B, c+1-s) bool, position ids (B, 1)) for the next decode step, after
        making room for its column."""
        self._reserve(self.rows, left=0, right=1)
        offsets = torch.tensor([start - self.first for start in self.starts], device=device)
        positions = torch.tensor([[self.end - start] for start in self.starts], device=device)
        columns = torch.arange(self.end + 1 - self.first, device=device)
        return columns >= offsets[:, None], positions

    def advance(self) -> None:
        """The decode step wrote column c in every layer."""
        self.end += 1

    # -- storage -----------------------------------------------------------------------------

    def _allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]], rows: int, cols: int
                  ) -> None:
        self.layers = [
            _SlotLayer(self, k.new_zeros(rows, k.shape[1], cols, k.shape[3]),
                       v.new_zeros(rows, v.shape[1], cols, v.shape[3]))
            for k, v in like]

    def _reserve(self, rows: int, left: int, right: int) -> None:
        """Make room for `rows` rows, at least `left` columns before the write column c and
        `right` from it on. Moves the live columns [s, c) to the left edge (plus `left`) when
        they do not fit, into new, larger buffers when the old ones are too small."""
        if rows > self.max_rows:
            raise ValueError(f"BatchKV holds at most {self.max_rows} rows, asked for {rows}")
        keys = self.layers[0].keys
        cap_rows, cap_cols = keys.shape[0], keys.shape[2]
        if rows <= cap_rows and self.end >= left and self.end + right <= cap_cols:
            return
        live = self.end - self.first
        end = max(left, live)
        need = end + right
        if rows > cap_rows or 2 * need > cap_cols:
            cap_rows = min(self.max_rows, max(rows, 2 * cap_rows))
            cap_cols = max(2 * need, cap_cols)
        b, first = self.rows, end - live
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                span = old[:b, :, self.first:self.end].clone()
                if old.shape[0] != cap_rows or old.shape[2] != cap_cols:
                    new = old.new_zeros(cap_rows, old.shape[1], cap_cols, old.shape[3])
                    setattr(layer, name, new)
                new = getattr(layer, name)
                new[:b, :, :first].zero_()
                new[:b, :, first:end].copy_(span)
        self.starts = [start - self.first + first for start in self.starts]
        self.first, self.end = first, end


# transformers versions whose cache API (`Cache(layers=...)`, `CacheLayerMixin`, per-layer
# `update`/`get_mask_sizes`) `BatchKV` was written against and tested with.
TESTED_TRANSFORMERS = "5.0-5.25"


def batch_kv_mismatch(model, pad_id: int = 0) -> str | None:
    """None when `BatchKV` decodes on `model` as a plain forward does, else what differs.

    `BatchKV` restates how transformers reads and writes a cache, so it is checked on the
    model in hand before serving: two rows of different lengths are prefilled left-padded,
    joined, and stepped once; each row's logits must match the model run on that row alone,
    without a cache (to the tolerance of the dtype: the kernels differ)."""
    from transformers import DynamicCache

    from lorakit.models.load import cache_of, with_cache

    weight = next(model.parameters())
    device, vocab = weight.device, model.config.vocab_size
    rows = [[(7 * i + 3) % vocab for i in range(6)], [(5 * i + 1) % vocab for i in range(3)]]
    step = [[(11 % vocab)], [(13 % vocab)]]
    tol = 1e-3 if weight.dtype == torch.float32 else 5e-2
    try:
        with torch.no_grad():
            ids, mask = left_pad(rows, pad_id, device)
            out = model(**with_cache(model, DynamicCache(), dict(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                use_cache=True)))
            kv = BatchKV(max_rows=len(rows))
            kv.join(cache_of(out), [len(r) for r in rows])
            step_mask, step_positions = kv.step_inputs(device)
            got = model(**with_cache(model, kv, dict(
                input_ids=torch.tensor(step, device=device), attention_mask=step_mask,
                position_ids=step_positions, use_cache=True))).logits[:, -1].float()
            kv.advance()
            for i, (row, token) in enumerate(zip(rows, step)):
                want = model(torch.tensor([row + token], device=device)).logits[0, -1].float()
                err = (got[i] - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
                if not err <= tol:
                    return f"row {i}: relative logit difference {err:.3g} (tolerance {tol:g})"
    except (RuntimeError, TypeError, AttributeError, ValueError, IndexError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
