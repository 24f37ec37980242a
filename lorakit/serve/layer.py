"""`MultiLoraLinear`: one frozen linear layer serving many LoRA adapters in one forward pass.

Follows vLLM's multi-LoRA layers (vllm/lora/layers, `BaseLinearLayerWithLoRA`): every adapted
linear layer owns stacked adapter slots, `lora_a` (max_loras, max_lora_rank, d_in) and `lora_b`
(max_loras, max_lora_rank, d_out), filled by `set_lora(slot, A, B, scaling)` and cleared by
`reset_lora(slot)`. B is stored transposed, `lora_b` (max_loras, max_lora_rank, d_out), so
that all slots side by side are one contiguous (max_loras * max_lora_rank, d_out) matrix. Ranks below `max_lora_rank` are zero-padded, and the LoRA scaling is folded
into B when a slot is set, so the forward needs no per-adapter scalars. Which slot each batch row
uses is a per-row index shared by every layer of the model (`SlotBatch`); `-1` means the base.

Meaning of the batched forward, as the plain loop `reference_forward` ships it (the test
reference, like vLLM's torch reference ops beside its Punica kernels):

    for b in range(B):
        y[b] = base(x[b])
        if slot[b] >= 0:
            y[b] += x[b] @ lora_a[slot[b]].T @ lora_b[slot[b]]      # (T, r) then (T, d_out)

A DoRA adapter's slot also holds its per-row factor f = m / ||W + s B A|| (constant once the
adapter is loaded), and its rows end as `f * (y - bias) + bias`: DoRA's output, merged or not.

Three batched forms compute it, chosen per step by how many adapters the batch mixes:
- every row on one slot: two skinny matmuls over the whole batch, no gather;
- a few slots (<= `GROUPED_MAX_SLOTS`): rows grouped by slot, two skinny matmuls per group;
- many slots: the rows gathered slot-major into a (max_loras, R, T, d_in) block, R = the busiest
  slot's row count (short slots padded with filler rows), then one batched matmul per factor
  over all slots, and each row's delta gathered back by its slot-major position and added
  (Punica's SGMV done with `torch.bmm`; base rows gather a filler's delta, zeroed only when
  base rows are in the batch). A fixed six or seven ops per layer however many adapters mix,
  each slot's A and B read once, and FLOPs for about R x max_loras rows instead of every row
  times every slot. The way back is a gather, not an `index_add_`: on CPU `index_add_` runs as a
  serial scatter that cost more than both matmuls.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import target_names
from lorakit.lora.layer import is_conv1d, linear_shape


GROUPED_MAX_SLOTS = 2


class SlotBatch:
    """The per-row slot indices of the batch about to run, shared by every `MultiLoraLinear`.

    The engine sets it once per forward; each layer reads the precomputed grouping or slot-major
    layout instead of re-deriving it 200 times per step.
    """

    def __init__(self, max_loras: int = 1, max_lora_rank: int = 1) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.row_slots: list[int] = []
        self.slots: list[int] = []  # distinct adapter slots in the batch
        self.device: torch.device | str = "cpu"
        self._row_index: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, row indices) for slot >= 0
        self.uniform_slot: int | None = None  # set when every row uses the same adapter slot
        # Set when many slots mix (see the module docstring): the slot-major row layout.
        self.rows_per_slot = 0
        self.slot_rows: torch.Tensor | None = None  # (max_loras * rows_per_slot,) row indices
        # (max_loras, rows_per_slot, 1, 1), 1 = real row; only when base rows read a filler
        # position's delta, which must then be zero (no one reads the other fillers' results).
        self.slot_valid: torch.Tensor | None = None
        self.row_pos: torch.Tensor | None = None  # (B,) each row's slot-major position

    def set(self, row_slots: list[int], device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> None:
        self.row_slots = list(row_slots)
        slots = sorted({s for s in row_slots if s >= 0})
        self.slots = slots
        self.device = device
        self._row_index = None  # built on first use (only DoRA slots need it)
        self.uniform_slot = slots[0] if len(slots) == 1 and all(s == slots[0] for s in row_slots) \
            else None
        self.groups, self.rows_per_slot, self.slot_rows, self.slot_valid = [], 0, None, None
        self.row_pos = None
        if self.uniform_slot is not None or not slots:
            return
        if len(slots) <= GROUPED_MAX_SLOTS:
            self.groups = [
                (s, torch.tensor([i for i, r in enumerate(row_slots) if r == s], device=device))
                for s in slots
            ]
            return
        # Rows laid out slot by slot, each slot padded to the busiest slot's row count R:
        # slot_rows[s * R + j] is the j-th row on slot s (row 0 as filler, zeroed by slot_valid).
        # Base rows read their (zero) delta from a filler position, so one more column is added
        # when base rows are present and every slot is full.
        by_slot = [[i for i, r in enumerate(row_slots) if r == s] for s in range(self.max_loras)]
        rows_per_slot = max(len(rows) for rows in by_slot)
        if -1 in row_slots and all(len(rows) == rows_per_slot for rows in by_slot):
            rows_per_slot += 1
        index = torch.zeros(self.max_loras, rows_per_slot, dtype=torch.long)
        valid = torch.zeros(self.max_loras, rows_per_slot, 1, 1, dtype=dtype)
        filler = next((s * rows_per_slot + len(rows) for s, rows in enumerate(by_slot)
                       if len(rows) < rows_per_slot), 0)  # 0 when no base row needs one
        pos = [filler] * len(row_slots)
        for s, rows in enumerate(by_slot):
            index[s, :len(rows)] = torch.tensor(rows, dtype=torch.long)
            valid[s, :len(rows)] = 1
            for j, row in enumerate(rows):
                pos[row] = s * rows_per_slot + j
        self.rows_per_slot = rows_per_slot
        self.slot_rows = index.flatten().to(device)  # (S * R,)
        self.slot_valid = valid.to(device) if -1 in row_slots else None  # (S, R, 1, 1)
        self.row_pos = torch.tensor(pos, dtype=torch.long).to(device)  # (B,)

    def row_index(self) -> torch.Tensor:
        """(B,) row -> slot, the base (-1) as index max_loras (a row of ones in a DoRA factor
        table); built once per batch, on the first layer that needs it."""
        if self._row_index is None:
            self._row_index = torch.tensor([s if s >= 0 else self.max_loras for s in self.row_slots],
                                           dtype=torch.long, device=self.device)
        return self._row_index

    def clear(self) -> None:
        self.set([])


class MultiLoraLinear(nn.Module):
    """A frozen linear layer (`self.base`) plus stacked LoRA slots selected per batch row."""

    def __init__(self, base: nn.Module, batch: SlotBatch, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if (batch.max_loras, batch.max_lora_rank) != (max_loras, max_lora_rank):
            raise ValueError("the SlotBatch and its layers must agree on max_loras and max_lora_rank")
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = linear_shape(base)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        weight = base.weight
        # Stacks are fp32 unless told otherwise, except over a floating base on an accelerator,
        # where they follow the base dtype. On the CPU the adapter's thin products run faster in
        # fp32 (MKL) than in bf16 (oneDNN) even with the casts in and out: over 60 q/v layers of
        # SmolLM2 on a bf16 base, 9.7 against 13.1 ms for one row, 16.6 against 19.2 ms for 32
        # rows of 16 adapters.
        follow_base = weight.is_floating_point() and weight.device.type != "cpu"
        dtype = dtype or (weight.dtype if follow_base else torch.float32)
        self.register_buffer("lora_a", torch.zeros(max_loras, max_lora_rank, self.in_features,
                                                   dtype=dtype, device=weight.device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, max_lora_rank, self.out_features,
                                                   dtype=dtype, device=weight.device),
                             persistent=False)
        # Rank held by each slot (0 = empty): forward slices to it instead of multiplying padding.
        self.slot_rank = [0] * max_loras
        # DoRA factors per slot, and a last row of ones for base rows; only read when a DoRA slot
        # is in the batch.
        self.register_buffer("dora_scale", torch.ones(max_loras + 1, self.out_features,
                                                      dtype=dtype, device=weight.device),
                             persistent=False)
        self.slot_dora = [False] * max_loras
        # Per slot, A^T (d_in, r) and B (r, d_out): views of the stacks at the slot's rank, so a
        # forward does not re-slice them (a decode step at one row is mostly such overheads).
        self.slot_factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * max_loras
        # All slots at the largest rank held: A^T (S, d_in, r) and B (S, r, d_out) views.
        self.stacked_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 magnitude: torch.Tensor | None = None) -> None:
        """Put one adapter's A (r, d_in) and B (d_out, r) into `slot`, with B pre-scaled; with a
        DoRA `magnitude` (d_out,), also its factor m / ||W + s B A|| (fp32)."""
        r = lora_a.shape[0]
        if not 0 <= slot < self.max_loras:
            raise AdapterError(f"slot {slot} out of range (expected 0..{self.max_loras - 1})")
        if r > self.max_lora_rank:
            raise AdapterError(f"adapter rank {r} exceeds max_lora_rank={self.max_lora_rank}")
        if tuple(lora_a.shape) != (r, self.in_features) or tuple(lora_b.shape) != (self.out_features, r):
            raise AdapterError(
                f"LoRA shapes A {tuple(lora_a.shape)} B {tuple(lora_b.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} layer (expected A (r, {self.in_features}), "
                f"B ({self.out_features}, r))")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :r].copy_(lora_a.to(self.lora_a.dtype))
        # Scaling folded in fp32, then cast, so a bf16 stack holds the rounded product once.
        self.lora_b[slot, :r].copy_((lora_b.float() * scaling).T.to(self.lora_b.dtype))
        self.slot_rank[slot] = r
        self._refresh_factors([slot])
        self.dora_scale[slot].fill_(1)
        self.slot_dora[slot] = magnitude is not None
        if magnitude is not None:
            w = self.base.weight
            w = w.get_original_weight() if hasattr(w, "get_original_weight") else w  # NF4
            w = w.T if is_conv1d(self.base) else w  # (d_out, d_in)
            w = w.float() + scaling * (lora_b.float().to(w.device) @ lora_a.float().to(w.device))
            norm = torch.linalg.vector_norm(w, dim=1)  # (d_out,)
            self.dora_scale[slot].copy_((magnitude.float().to(w.device) / norm).to(self.dora_scale.dtype))

    @torch.no_grad()
    def reset_lora(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.slot_rank[slot] = 0
        self._refresh_factors([slot])
        self.dora_scale[slot].fill_(1)
        self.slot_dora[slot] = False

    def _refresh_factors(self, slots) -> None:
        """Rebuild the views of `slots`, and the all-slots views (their rank may have changed)."""
        for slot in slots:
            r = self.slot_rank[slot]
            self.slot_factors[slot] = (self.lora_a[slot, :r].T, self.lora_b[slot, :r]) if r else None
        r = max(self.slot_rank)
        self.stacked_factors = (self.lora_a[:, :r].transpose(1, 2), self.lora_b[:, :r]) if r else None

    def _apply(self, fn, *args, **kwargs):
        """`.to()` and friends replace the stacks: the slot views follow them."""
        module = super()._apply(fn, *args, **kwargs)
        self._refresh_factors(range(self.max_loras))
        return module

    def _delta(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """(..., d_out) in the stack dtype: x @ A^T @ B for one slot (scaling folded into B)."""
        a_t, b = self.slot_factors[slot]  # (d_in, r), (r, d_out)
        h = torch.mm(x.reshape(-1, self.in_features).to(a_t.dtype), a_t)  # (n, r)
        return torch.mm(h, b).view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._lora_forward(x)  # (B, T, d_out)
        if not any(self.slot_dora[s] for s in self.batch.slots):
            return out
        # DoRA rows: f * (y - bias) + bias, f per row from its slot (ones for base and LoRA rows).
        f = self.dora_scale.index_select(0, self.batch.row_index()).unsqueeze(1).to(out.dtype)  # (B, 1, d_out)
        bias = self.base.bias
        return out * f if bias is None else (out - bias) * f + bias

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (B, T, d_out)
        batch = self.batch
        if batch.uniform_slot is not None:
            if self.slot_rank[batch.uniform_slot]:
                out.add_(self._delta(x, batch.uniform_slot).to(out.dtype))
            return out
        if batch.slot_rows is not None:
            if self.stacked_factors is None:  # no slot holds an adapter for this layer
                return out
            a_t, b = self.stacked_factors  # (S, d_in, r), (S, r, d_out)
            S, R, T, r = self.max_loras, batch.rows_per_slot, x.shape[1], b.shape[1]
            xs = x.index_select(0, batch.slot_rows).to(a_t.dtype)  # (S*R, T, d_in), slot-major
            h = torch.bmm(xs.view(S, R * T, self.in_features), a_t)  # (S, R*T, r)
            if batch.slot_valid is not None:  # zero the filler results base rows read
                # `where`, not a product: a filler copies row 0, and NaN x 0 would hand row 0's
                # NaN (an adapter whose weights overflow) to every base row.
                h = torch.where(batch.slot_valid != 0, h.view(S, R, T, r), 0).view(S, R * T, r)
            delta = torch.bmm(h, b).view(S * R, T, self.out_features)  # (S*R, T, d_out)
            return out.add_(delta.index_select(0, batch.row_pos).to(out.dtype))  # (B, T, d_out)
        for slot, rows in batch.groups:
            if self.slot_rank[slot]:
                delta = self._delta(x.index_select(0, rows), slot)  # (n_rows, T, d_out)
                out.index_add_(0, rows, delta.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        used = sum(1 for r in self.slot_rank if r)
        return (f"in={self.in_features}, out={self.out_features}, max_loras={self.max_loras}, "
                f"max_lora_rank={self.max_lora_rank}, slots_in_use={used}")


@torch.no_grad()
def reference_forward(layer: MultiLoraLinear, x: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """The batched forward's meaning, one row at a time over the full padded stacks."""
    rows = []
    for b, slot in enumerate(row_slots):
        y = layer.base(x[b])  # (T, d_out)
        if slot >= 0:
            a = layer.lora_a[slot].float()  # (max_rank, d_in)
            bb = layer.lora_b[slot].float()  # (max_rank, d_out)
            y = y + ((x[b].float() @ a.T) @ bb).to(y.dtype)
            if layer.slot_dora[slot]:
                bias = 0 if layer.base.bias is None else layer.base.bias
                y = (y - bias) * layer.dora_scale[slot].to(y.dtype) + bias
        rows.append(y)
    return torch.stack(rows)


def wrap_for_serving(model: nn.Module, target_modules: list[str] | str, max_loras: int,
                     max_lora_rank: int, dtype: torch.dtype | None = None
                     ) -> tuple[SlotBatch, dict[str, MultiLoraLinear]]:
    """Replace the targeted linear modules with `MultiLoraLinear`; return the shared batch index
    and the wrapped layers by full module name (PEFT's module paths, so adapter keys map 1:1)."""
    names = target_names(model, LoraConfig(target_modules=target_modules))
    batch = SlotBatch(max_loras, max_lora_rank)
    layers = {}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MultiLoraLinear(getattr(parent, leaf), batch, max_loras, max_lora_rank, dtype)
        setattr(parent, leaf, layer)
        layers[name] = layer
    return batch, layers


def resident_bytes(layers: dict[str, MultiLoraLinear]) -> int:
    """Memory the slot stacks take (allocated once, whatever the number of adapters loaded)."""
    return sum(l.lora_a.numel() * l.lora_a.element_size() + l.lora_b.numel() * l.lora_b.element_size()
               for l in layers.values())
