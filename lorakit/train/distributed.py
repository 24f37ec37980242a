"""Training on several processes under `torchrun`: PyTorch's DDP and FSDP2, nothing of our own.

`torchrun --nproc_per_node N -m lorakit train CONFIG` starts N copies of `lorakit train`; each
reads `RANK`, `WORLD_SIZE` and `LOCAL_RANK` from its environment (torchrun's contract, also for
`--nnodes` / `--rdzv-endpoint` across machines), joins one process group (gloo on the CPU, nccl on
CUDA, one GPU per rank from `LOCAL_RANK`) and wraps the model in one of:

  * `ddp`: `torch.nn.parallel.DistributedDataParallel`, which all-reduces the gradients of the
    parameters that require grad, so for LoRA only the adapters travel (Li et al. 2020, "PyTorch
    Distributed: Experiences on Accelerating Data Parallel Training");
  * `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder block and on the whole,
    which shards weights, gradients and optimizer state across ranks and gathers one block's
    weights at a time (Zhao et al. 2023, "PyTorch FSDP"; the per-block recipe of torchtitan and
    torchtune).

What stays as in one process: `train.batch_size` is the global batch. Every rank builds the same
seeded batch plan and takes every N-th example of each micro-batch (`share`); the loss is divided
by the supervised tokens of the whole global step (every rank knows them, since every rank has the
plan) and multiplied by N, because DDP and FSDP average gradients over ranks. N ranks thus compute
the update one process computes for the same batch, up to the order of floating-point sums.

Both wrappers hook a module's `forward`, while lorakit's supervised-only loss calls the decoder and
the output head separately; `LossModule` makes "forward and loss" one module for them to wrap.
Rank 0 alone writes files; `full_weights` and `full_optimizer_state` gather FSDP's shards for it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp")


class LossModule(nn.Module):
    """`loss_fn(model, examples)` as a module: what DDP and FSDP wrap (forward and loss together)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, examples):
        return self.loss_fn(self.model, examples)


@dataclass
class Share:
    """This rank's part of a global micro-batch. A rank left without examples (a batch smaller
    than the world) runs the first example with weight 0, so its collectives still match."""

    examples: list
    weight: float


@dataclass
class Distributed:
    strategy: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    wrapped: nn.Module | None = None  # the DDP or FSDP module, once `wrap` has run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.strategy == "none":
            return "one process"
        return f"{self.strategy}, {self.world_size} rank{'s' if self.world_size > 1 else ''}"

    def share(self, examples: list) -> Share:
        """Every N-th example from this rank's index: batches grouped by length are sorted, so a
        strided share balances tokens across ranks better than contiguous halves."""
        mine = examples[self.rank::self.world_size]
        return Share(mine, 1.0) if mine else Share(examples[:1], 0.0)

    # -- wrapping --------------------------------------------------------------------------

    def wrap(self, loss_module: LossModule, device: torch.device) -> nn.Module:
        """The module the loop calls: DDP or FSDP around `loss_module`, or it as it is."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Every rank built the same weights from the same seed and files, so the initial
            # broadcast (the whole frozen base) is skipped; buffers (rotary tables) are constants.
            self.wrapped = DistributedDataParallel(
                loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False, init_sync=False)
        elif self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            from lorakit.train.methods import decoder_blocks

            _, blocks = decoder_blocks(loss_module.model)
            for block in blocks:
                fully_shard(block)
            # The root group holds what is left: embeddings, final norm and output head (tied
            # embeddings must share a group, which the root gives them).
            fully_shard(loss_module)
            self.wrapped = loss_module
        else:
            self.wrapped = loss_module
        return self.wrapped

    def sync_gradients(self, last_micro_batch: bool):
        """DDP all-reduces once per optimizer step, after the last micro-batch (`no_sync` before);
        FSDP reduce-scatters every micro-batch, which keeps only shards of the gradients."""
        if self.strategy == "ddp" and not last_micro_batch:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the loss is a sum over the global batch."""
        return float(self.world_size)

    # -- collectives -----------------------------------------------------------------------

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (fp64, so token counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- gathering FSDP shards for rank 0 to write -----------------------------------------

    @contextlib.contextmanager
    def full_weights(self, model: nn.Module):
        """Inside the block the model's parameters are whole on every rank (FSDP: all-gathered,
        a collective every rank enters); elsewhere a no-op."""
        if self.strategy != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        groups = [m for m in self.wrapped.modules() if isinstance(m, FSDPModule)]
        for m in groups:
            m.unshard()
        try:
            yield
        finally:
            for m in groups:
                m.reshard()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's state dict with FSDP shards gathered (on CPU); None when not sharded."""
        if self.strategy != "fsdp":
            return None
        return {k: _full(v).cpu() for k, v in model.state_dict().items()}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` with FSDP's sharded moments gathered (a collective)."""
        sd = optimizer.state_dict()
        if self.strategy != "fsdp":
            return sd
        state = {pid: {k: _full(v) for k, v in st.items()} for pid, st in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}

    def shard_optimizer_tensors(self, optimizer: torch.optim.Optimizer,
                                tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Saved whole moments (`<param id>.<name>`) cut to this rank's shard of each parameter."""
        if self.strategy != "fsdp":
            return tensors
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        out = {}
        for key, t in tensors.items():
            p = params[int(key.split(".", 1)[0])]
            if isinstance(p, DTensor) and t.shape == p.shape:
                # Every rank holds the whole tensor (read from the same file): no scatter needed.
                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            out[key] = t
        return out

    def close(self) -> None:
        """Wait for every rank (rank 0 is the last to finish: it writes), then leave the group."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def as_float(t) -> float:
    """A scalar tensor as a float; FSDP's gradient norm is a DTensor (gathered first)."""
    return float(_full(t))


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r}: expected an integer (set by torchrun)") from None


def setup(requested: str, device_name: str, quantize_base: str | None = None
          ) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group as `train.distributed` asks; returns (this rank, its device).

    Under `auto`, a launch with WORLD_SIZE > 1 means DDP; `none` with WORLD_SIZE > 1 is refused,
    since N independent runs would write the same output directory. One process under `ddp` or
    `fsdp` trains as a plain run.
    """
    from lorakit.device import resolve_device

    if requested not in STRATEGIES:
        raise ConfigError(f"train.distributed: got {requested!r} (expected one of {', '.join(STRATEGIES)})")
    world = launched_world_size()
    if world == 1:
        return Distributed(), resolve_device(device_name)
    if requested == "none":
        raise ConfigError(f"train.distributed: none, but torchrun started {world} processes "
                          "(WORLD_SIZE); use auto, ddp or fsdp, or launch one process")
    strategy = "ddp" if requested == "auto" else requested
    if strategy == "fsdp" and quantize_base:
        raise ConfigError("train.distributed: fsdp does not shard a quantized base "
                          "(model.quantize_base is set); use ddp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank}: this machine has {torch.cuda.device_count()} "
                              "CUDA devices (one per rank; lower --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Distributed(strategy, rank, world, local_rank), device


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's random stream (dropout) for one optimizer step in a distributed run.

    Ranks draw different amounts (their shares differ in tokens), so their generators drift apart;
    restarting each step from (seed, step, rank) makes a resumed run draw what an uninterrupted
    one does without saving N generator states."""
    return (seed * 1_000_003 + step) * 1_009 + rank
