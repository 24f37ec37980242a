"""Schedule, supervised-positions loss, batch plan and checkpoint completeness."""

import math

import pytest
import torch

from lorakit.train.batches import BatchPlan, epoch_batches
from lorakit.train.checkpoint import complete_checkpoints, latest_checkpoint, save_checkpoint
from lorakit.train.loss import causal_lm_loss_sum
from lorakit.train.schedule import lr_at
from tests import tiny


def test_schedule_at_known_steps():
    # 100 steps, 10 warmup, peak 1e-3, floor 10%.
    assert lr_at(0, 100, 10, 1e-3, 0.1) == pytest.approx(1e-4)
    assert lr_at(9, 100, 10, 1e-3, 0.1) == pytest.approx(1e-3)
    assert lr_at(10, 100, 10, 1e-3, 0.1) == pytest.approx(1e-3)
    mid = 10 + 45  # half way through the decay: cos(pi/2) = 0
    assert lr_at(mid, 100, 10, 1e-3, 0.1) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, 100, 10, 1e-3, 0.1) == pytest.approx(1e-4)
    assert lr_at(0, 10, 0, 2e-4) == pytest.approx(2e-4)
    assert lr_at(5, 10, 0, 2e-4) == pytest.approx(1e-4 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("make", [tiny.tiny_llama, tiny.tiny_gpt2])
def test_supervised_positions_loss_equals_full_masked_loss(make):
    model = make()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 10:] = -100
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    fast, n1 = causal_lm_loss_sum(model, ids, labels, mask, supervised_only=True)
    full, n2 = causal_lm_loss_sum(model, ids, labels, mask, supervised_only=False)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' own
    assert n1 == n2 == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast / n1, reference, atol=1e-5, rtol=1e-6)
    fast.backward()  # gradients flow through the picked positions

    # The chunked head (checkpointed, 5 positions per chunk) gives the same loss and gradients.
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    chunked, n3 = causal_lm_loss_sum(model, ids, labels, mask, supervised_only=True, chunk_rows=5)
    assert n3 == n1 and n1 > 10  # several chunks
    torch.testing.assert_close(chunked, fast, atol=1e-5, rtol=1e-6)
    chunked.backward()
    assert grads
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_epoch_batches_cover_every_example_once_and_are_seeded():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    for grouped in (False, True):
        batches = epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=grouped)
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert batches == epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=grouped)
        assert batches != epoch_batches(lengths, 8, seed=3, epoch=2, group_by_length=grouped)
    plan = BatchPlan(lengths, 8, seed=3, group_by_length=True)
    assert plan.per_epoch == 13
    assert plan[13 + 4] == epoch_batches(lengths, 8, 3, 1, True)[4]
    # Grouping by length cuts padding.
    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert padding(epoch_batches(lengths, 8, 3, 0, True)) < 0.5 * padding(epoch_batches(lengths, 8, 3, 0, False))


def _save(root, step):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    def write_adapter(path):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"x" * 10)
    return save_checkpoint(root, step, write_adapter, opt, {"micro_batch": step}, "a: 1\n", keep=3)


def test_checkpoint_without_manifest_or_with_changed_file_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _save(root, step)
    assert latest_checkpoint(root).name == "step-00000030"
    (root / "step-00000030" / "manifest.json").unlink()
    assert latest_checkpoint(root).name == "step-00000020"
    (root / "step-00000020" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(root).name == "step-00000010"
    # A leftover temporary directory is never picked.
    (root / ".step-00000040.tmp-abc").mkdir()
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000010"]


def test_keep_last_k(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        _save(root, step)
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000003", "step-00000004", "step-00000005"]
