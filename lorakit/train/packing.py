"""Padding-free micro-batches: every example's tokens, and only those, go through the model.

A padded batch of 16 short chat rows is 10-15% padding (more for long, uneven answers), and every
linear layer, norm and MLP spends that share of its work on tokens nobody reads. Here a
micro-batch is one row of all its examples concatenated (`pack_batch`): positions restart at 0 for
each example, so rotary embeddings see what they would see alone, and the next-token targets are
shifted per example, so the last token of one example never predicts the first of the next.

Attention is the one place examples must stay apart. `packed_attention` (registered with
transformers' `AttentionInterface` under `PACKED_ATTENTION`) scatters the packed queries, keys and
values into a zero-padded (examples, longest, ...) grid, runs attention there with a causal +
key-padding mask (a grouped eager form for short rows, transformers' SDPA for long ones), and
gathers the valid rows back. Only the attention runs on padding, and it is a small part of the
work; the projections, norms and MLP run on valid tokens only. This is what transformers'
`DataCollatorWithFlattening` and TRL's `padding_free` do, relying on FlashAttention's
variable-length kernels on GPUs; on CPU the grid is the cheaper route.

A layer's sliding window (Mistral, Phi-3, Qwen2, Gemma's local layers) narrows the mask as
transformers' `sliding_window_overlay` does, and Gemma 2's attention soft-capping is applied to the
scores on the eager grid, so every family of `lorakit.models.families` packs. The loss is the same
as on the padded batch (tested to 1e-5 in fp32, gradients too, for every family); only the order
of floating-point sums differs. `train.padding_free` switches it off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from lorakit.data.render import IGNORE, Encoded
from lorakit.errors import LorakitError

PACKED_ATTENTION = "lorakit_packed"


@dataclass
class PackInfo:
    """Where each packed token sits in the (examples, longest) grid the attention runs on."""

    lengths: list[int]
    inner: str  # "eager" or "sdpa": the attention run on the grid
    index: torch.Tensor  # (N,) row-major grid position of each packed token
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    # Built on the first layer's call and reused by the others.
    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _allowed(self, device, window: int | None = None) -> torch.Tensor:
        """(B, T, T) bool: causal within each example, no key past its end, and with a sliding
        window only the last `window` keys (query i sees key j when i - j < window, as
        transformers' `sliding_window_overlay`)."""
        def build():
            t = self.longest
            lengths = torch.tensor(self.lengths, device=device)
            keys_valid = torch.arange(t, device=device)[None, :] < lengths[:, None]  # (B, T)
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            if window is not None:
                causal = causal.triu(1 - window)  # i - j <= window - 1
            return causal[None] & keys_valid[:, None, :]
        return self._cached(("allowed", device, window), build)

    def mask(self, device: torch.device, window: int | None = None) -> torch.Tensor:
        """(B, 1, T, T) bool mask for SDPA (True: attend)."""
        return self._allowed(device, window)[:, None]

    def grouped_bias(self, kv_heads: int, groups: int, dtype, device,
                     window: int | None = None) -> torch.Tensor:
        """(B * kv_heads, groups * T, T) additive mask: 0 where allowed, the dtype's minimum else."""
        def build():
            allowed = self._allowed(device, window)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)
            b, t = self.rows, self.longest
            return bias[:, None, None].expand(b, kv_heads, groups, t, t).reshape(
                b * kv_heads, groups * t, t)
        return self._cached(("bias", kv_heads, groups, dtype, device, window), build)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N), restarting at 0 for each example
    targets: torch.Tensor  # (N,) next-token label at each position, IGNORE at each example's end
    info: PackInfo

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> PackedBatch:
        info = PackInfo(self.info.lengths, self.info.inner, host_to_device(self.info.index, device))
        return PackedBatch(host_to_device(self.input_ids, device),
                           host_to_device(self.position_ids, device),
                           host_to_device(self.targets, device), info)


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU batch tensor on `device`; to a GPU through pinned memory, so the copy is a DMA that
    does not wait for the host (the `pin_memory` of PyTorch's DataLoader)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pack_batch(encoded: list[Encoded], inner: str = "eager") -> PackedBatch:
    """One packed row of the examples, with per-example positions and shifted targets."""
    if inner not in ("eager", "sdpa"):
        raise ValueError(f"inner attention: got {inner!r}; expected eager or sdpa")
    lengths = [len(e.input_ids) for e in encoded]
    longest = max(lengths)
    ids, positions, targets, index = [], [], [], []
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids += e.input_ids
        positions += range(n)
        targets += list(e.labels[1:]) + [IGNORE]
        index += range(row * longest, row * longest + n)
    return PackedBatch(torch.tensor([ids]), torch.tensor([positions]), torch.tensor(targets),
                       PackInfo(lengths, inner, torch.tensor(index)))


class _RowScatter(torch.autograd.Function):
    """(N, ...) rows -> (R, ...) zeros with row i at `index[i]`. Its gradient is a row gather: the
    index is one-to-one, so no accumulation (autograd's default would be a serial `index_add_`)."""

    @staticmethod
    def forward(ctx, src, index, rows: int):
        ctx.save_for_backward(index)
        return src.new_zeros(rows, *src.shape[1:]).index_copy_(0, index, src)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _RowGather(torch.autograd.Function):
    """(R, ...) -> (N, ...) rows `index`, the inverse of `_RowScatter`, with its gradient."""

    @staticmethod
    def forward(ctx, src, index):
        ctx.save_for_backward(index)
        ctx.rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


def _to_grid(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(1, H, N, D) packed -> (B, H, T, D) zero-padded grid."""
    flat = x[0].transpose(0, 1)  # (N, H, D)
    grid = _RowScatter.apply(flat, info.index, info.rows * info.longest)  # (B*T, H, D)
    return grid.view(info.rows, info.longest, *flat.shape[1:]).transpose(1, 2)


def _from_grid(out: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(B, T, H, D) attention output on the grid -> (N, H, D) packed."""
    return _RowGather.apply(out.reshape(info.rows * info.longest, *out.shape[2:]), info.index)


def _sdpa_on_grid(module, query, key, value, info: PackInfo, **kwargs):
    """transformers' SDPA attention on the zero-padded (B, H, T, D) grid; (N, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = (_to_grid(x, info) for x in (query, key, value))
    mask = info.mask(q.device, kwargs.get("sliding_window"))
    out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)  # (B, T, H, D)
    return _from_grid(out, info)


def _grouped_eager_on_grid(query, key, value, info: PackInfo, scaling: float,
                           window: int | None = None, softcap: float | None = None):
    """Eager attention on the grid with the query heads of each key/value head stacked along the
    rows, (B, Hkv, G*T, D) against (B, Hkv, T, D): one batched product per side, with the mask
    and the scaling folded into the first (`baddbmm`), instead of transformers' `repeat_kv` copies
    of K and V for every query head (and their summed gradients). With `softcap` (Gemma 2) the
    scaled scores are capped as `softcap * tanh(s / softcap)` before the mask is added, as
    transformers' eager attention does."""
    b, t = info.rows, info.longest
    n_q, n_kv, d = query.shape[1], key.shape[1], query.shape[-1]
    groups = n_q // n_kv
    q = _to_grid(query, info).reshape(b * n_kv, groups * t, d)
    k = _to_grid(key, info).reshape(b * n_kv, t, d)
    v = _to_grid(value, info).reshape(b * n_kv, t, d)
    bias = info.grouped_bias(n_kv, groups, q.dtype, q.device, window)  # (B*Hkv, G*T, T)
    if softcap is None:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling)
    else:
        scores = torch.tanh(torch.bmm(q, k.transpose(1, 2)) * (scaling / softcap)) * softcap + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs, v).view(b, n_q, t, d).transpose(1, 2)  # (B, T, Hq, D)
    return _from_grid(out, info)


def packed_attention(module, query, key, value, attention_mask, lorakit_packing: PackInfo | None = None,
                     **kwargs):
    """Attention over packed rows: (1, H, N, D) in, (1, N, H, D) out, examples kept apart."""
    if lorakit_packing is None:
        raise LorakitError(f"attention implementation {PACKED_ATTENTION!r} needs the packing of "
                           "the batch (lorakit sets it only while training)")
    info = lorakit_packing
    # SDPA has no soft-capping: a model that caps its attention scores takes the eager grid.
    if info.inner == "sdpa" and kwargs.get("softcap") is None:
        out = _sdpa_on_grid(module, query, key, value, info, **kwargs)
    else:
        if kwargs.get("dropout") and module.training:
            raise LorakitError("attention dropout is not supported with train.padding_free; "
                               "set train.padding_free: false")
        out = _grouped_eager_on_grid(query, key, value, info, kwargs["scaling"],
                                     kwargs.get("sliding_window"), kwargs.get("softcap"))
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def packing_supported(model) -> str | None:
    """None when the model can train padding-free, else the reason it cannot."""
    # The family table says whose attention is plain causal self-attention through
    # transformers' AttentionInterface (no sliding window, soft-capping or sinks to honour).
    from lorakit.models.families import refusal

    why = refusal(model, "packing")
    if why is not None:
        return why
    if not getattr(model, "_supports_attention_backend", False):
        return "the model does not take transformers' attention functions"
    return None


@contextlib.contextmanager
def packed_attention_mode(model):
    """Route the model's attention through `packed_attention`; restore the previous one after."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
