"""BatchKV: every row of a decode step gives the logits it gives alone, without a cache, while rows
join (prompts longer than the write column included), leave in any pattern, and the buffers grow
and shift; also under a sliding window."""

import pytest
import torch

from lorakit.models.load import with_cache
from lorakit.serve.kvcache import BatchKV, _SlotLayer, left_pad, positions_from_mask
from tests import tiny


def _tiny_mistral():
    """A 2-layer Mistral-style model whose sliding window (4) is shorter than the sequences."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=4, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


class _Batch:
    """Drives a BatchKV the way the engine does and checks each row against the model alone."""

    def __init__(self, model, max_rows: int = 8):
        self.model = model
        self.kv = BatchKV(max_rows)
        self.rows: list[list[int]] = []  # token ids, in the cache's row order
        self.gen = torch.Generator().manual_seed(1)

    def _tokens(self, n: int) -> list[int]:
        return torch.randint(1, 400, (n,), generator=self.gen).tolist()

    def _check(self, logits: torch.Tensor, rows: list[list[int]]) -> None:
        for got, ids in zip(logits, rows):
            want = self.model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    def join(self, *lengths: int) -> None:
        from transformers import DynamicCache

        prompts = [self._tokens(n) for n in lengths]
        ids, mask = left_pad(prompts, 0, "cpu")
        cache = DynamicCache()
        out = self.model(**with_cache(self.model, cache, dict(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
            use_cache=True)))
        self._check(out.logits[:, -1], prompts)
        self.kv.join(cache, list(lengths))
        self.rows += prompts

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            for row in self.rows:
                row += self._tokens(1)
            ids = torch.tensor([[row[-1]] for row in self.rows])
            mask, positions = self.kv.step_inputs("cpu")
            out = self.model(**with_cache(self.model, self.kv, dict(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)))
            self.kv.advance()
            self._check(out.logits[:, -1], self.rows)

    def leave(self, *rows: int) -> None:
        keep = [i for i in range(len(self.rows)) if i not in rows]
        order = self.kv.retire(keep)
        assert sorted(order) == keep
        self.rows = [self.rows[i] for i in order]
        assert self.kv.rows == len(self.rows)


@pytest.mark.parametrize("build", [tiny.tiny_llama, tiny.tiny_gpt2, _tiny_mistral],
                         ids=["llama", "gpt2", "sliding"])
@torch.no_grad()
def test_rows_equal_each_row_alone_while_joining_and_leaving(build):
    batch = _Batch(build())
    batch.join(3, 7, 5)
    batch.step(2)
    batch.join(15)  # longer than the write column: the running rows shift right
    batch.step(2)
    batch.leave(0, 2)  # the last row moves into the first hole
    batch.step()
    batch.join(2, 9, 4)
    batch.step(3)
    batch.leave(1, 3, 4)
    batch.step(20)  # past the columns allocated so far: the buffers grow
    batch.leave(0, 1)
    assert batch.kv.rows == 0
    batch.join(6)  # an emptied batch starts over
    batch.step(2)


@torch.no_grad()
def test_rows_grow_to_max_rows_and_no_further():
    batch = _Batch(tiny.tiny_llama(), max_rows=5)
    batch.join(4)
    batch.step()
    batch.join(3, 6)
    batch.join(5, 2)
    batch.step(2)
    assert batch.kv.layers[0].keys.shape[0] == 5
    with pytest.raises(ValueError, match="at most 5 rows"):
        batch.join(3)


def test_leaving_moves_only_the_last_rows():
    kv = BatchKV(8)
    kv.starts, kv.first, kv.end = [0, 1, 2, 3, 4, 5], 0, 6
    k = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 8, 1).contiguous()  # row i holds i
    kv.layers = [_SlotLayer(kv, k, k.clone())]
    order = kv.retire([0, 2, 4, 5])
    assert order == [0, 4, 2, 5]  # the holes 1 and 3 take rows 4 and 5; rows 0 and 2 stay
    assert kv.starts == [0, 4, 2, 5] and kv.first == 0
    assert kv.layers[0].keys[:4, 0, :6, 0].tolist() == [[v] * 6 for v in [0.0, 4.0, 2.0, 5.0]]


@pytest.mark.parametrize("make", [tiny.tiny_llama, tiny.tiny_gpt2, _tiny_mistral])
def test_the_start_up_check_passes_where_batch_kv_is_right(make):
    from lorakit.serve.kvcache import batch_kv_mismatch

    assert batch_kv_mismatch(make()) is None


def test_the_start_up_check_catches_a_cache_transformers_reads_differently(monkeypatch):
    """A cache whose layers report the wrong length (as a transformers release that sized the
    mask from another method would see it) is caught before serving, and the service refuses."""
    from lorakit.errors import ModelLoadError
    from lorakit.serve.config import ServeConfig
    from lorakit.serve.kvcache import batch_kv_mismatch
    from lorakit.serve.service import Service

    model = tiny.tiny_llama()
    monkeypatch.setattr(_SlotLayer, "get_mask_sizes", lambda self, *a, **k: (2, 0))
    assert batch_kv_mismatch(model) is not None
    with pytest.raises(ModelLoadError, match="serving KV cache"):
        Service.from_model(model, tiny.tiny_tokenizer(), ServeConfig(), base_name="tiny")
