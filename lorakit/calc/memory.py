"""Bytes of a training step and of serving, each term a small named formula.

Training memory is the sum Rajbhandari et al. 2020 (ZeRO, section 3.1) use for mixed-precision
Adam: weights + gradients + optimizer states (+ an fp32 master copy of 16-bit trainable weights),
plus activations (see `activations.py`, after Korthikanti et al. 2022) and, for QLoRA, the
quantization constants of Dettmers et al. 2023 (QLoRA, section 3). Serving is the base weights
plus each adapter's weights. Sizes are bytes; `GB` is 10^9 bytes, as the papers count.

The sum is the footprint when everything is resident together, which is what an optimizer step
after a backward pass sees with gradients kept (`zero_grad(set_to_none=False)`); when gradients
are freed between steps the measured peak is a little lower (tests/calc measures a real step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lorakit.calc.activations import Activations, activation_bytes
from lorakit.calc.params import LORA_METHODS, ModelShape, ParamCounts, block_param_count, linear_modules
from lorakit.errors import ConfigError

GB = 10**9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCK = 64  # weights per first-level absmax (QLoRA)
NF4_BLOCK2 = 256  # first-level constants per second-level fp32 constant (double quantization)


def dtype_bytes(dtype: str, what: str = "dtype") -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"{what}: got {dtype!r} (expected one of {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[dtype]


def weight_bytes(n_params: int, bytes_per_param: float) -> float:
    """Stored weights: one value per parameter."""
    return n_params * bytes_per_param


def gradient_bytes(n_trainable: int, bytes_per_param: float) -> float:
    """One gradient per trainable parameter, in the trainable weights' dtype."""
    return n_trainable * bytes_per_param


def adamw_state_bytes(n_trainable: int) -> int:
    """AdamW keeps two fp32 moments per trainable parameter (m and v): 2 * 4 = 8 bytes."""
    return 8 * n_trainable


def master_weight_bytes(n_trainable: int, trainable_bytes: int) -> int:
    """Mixed precision keeps an fp32 copy of 16-bit trainable weights for the update (ZeRO's
    "2 + 2 + 12 = 16 bytes per parameter"); fp32 trainable weights need no copy."""
    return 4 * n_trainable if trainable_bytes < 4 else 0


def nf4_weight_bytes(n_quantized: int) -> float:
    """NF4 stores each weight in 4 bits: 0.5 bytes per parameter."""
    return n_quantized / 2


def nf4_constant_bytes(n_quantized: int, double_quant: bool = True) -> float:
    """Quantization constants of NF4 weights (QLoRA, section 3, "Double Quantization").

    One absmax per block of 64 weights. Stored in fp32 that is 32/64 = 0.5 bits per parameter;
    double quantization stores the absmaxes in 8 bits with one fp32 constant per 256 of them:
    8/64 + 32/(64*256) = 0.127 bits per parameter.
    """
    bits = (8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_BLOCK2)) if double_quant else 32 / NF4_BLOCK
    return n_quantized * bits / 8


def adapter_file_bytes(n_adapter_params: int, bytes_per_param: int) -> int:
    """A safetensors adapter file is its tensors' bytes (plus a header of a few KB, not counted)."""
    return n_adapter_params * bytes_per_param


def serving_bytes(base_weight_bytes: float, n_adapters: int, adapter_params: int,
                  adapter_bytes: int) -> float:
    """A base served with N adapters resident: base weights + N * adapter weights.

    E.g. an 8B base in fp32 (8e9 * 4 = 32 GB) with 15 adapters of 20M fp32 parameters
    (0.08 GB each): 32 + 15 * 0.08 = 33.2 GB. The KV cache comes on top (`kv_cache_bytes`).
    """
    return base_weight_bytes + n_adapters * adapter_params * adapter_bytes


def base_weight_bytes(counts: ParamCounts, bytes_per_param: int, double_quant: bool = True) -> float:
    """The base model's weights: all in one dtype, or for QLoRA the block linears in NF4 with
    their constants and the rest (embeddings, norms, head, biases) in `bytes_per_param`."""
    return (weight_bytes(counts.base - counts.quantized, bytes_per_param)
            + nf4_weight_bytes(counts.quantized) + nf4_constant_bytes(counts.quantized, double_quant))


def kv_cache_bytes(shape: ModelShape, tokens: int, bytes_per_value: int) -> int:
    """Key and value per layer per token cached at inference: 2 * layers * kv_heads * head_dim."""
    return 2 * shape.num_layers * shape.kv_dim * tokens * bytes_per_value


@dataclass
class TrainingMemory:
    """The bytes of one training step, by kind."""

    weights: float
    quantization_constants: float
    gradients: float
    optimizer_states: float
    master_weights: float
    activations: int
    activations_checkpointed: int

    @property
    def static(self) -> float:
        """Everything but activations: what sits in memory between steps."""
        return (self.weights + self.quantization_constants + self.gradients
                + self.optimizer_states + self.master_weights)

    @property
    def total(self) -> float:
        return self.static + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.static + self.activations_checkpointed

    def to_dict(self) -> dict:
        return {**asdict(self), "static": self.static, "total": self.total,
                "total_checkpointed": self.total_checkpointed}


def dora_extra_activation_bytes(shape: ModelShape, counts: ParamCounts, tokens: int, e: int) -> int:
    """DoRA (Liu et al. 2024) rescales each adapted output by m / ||W + BA||: the product keeps
    the base and the LoRA outputs (2 * d_out per token) for the magnitude's gradient. A lower
    bound: PEFT's implementation also keeps weight-sized tensors for the norm."""
    d_out = {m.name: m.d_out for m in linear_modules(shape)}
    return sum(2 * d_out[name] * e for name in counts.adapted_modules) * tokens


def training_memory(shape: ModelShape, counts: ParamCounts, batch: int, seq_len: int,
                    dtype: str = "bf16", adapter_dtype: str = "fp32", r: int = 8,
                    padded: bool = False, double_quant: bool = True) -> TrainingMemory:
    """Bytes of one AdamW step of `counts.method`.

    `dtype` holds the base weights and the compute (for QLoRA, the compute dtype and the
    unquantized parts: embeddings, norms, head); `adapter_dtype` holds LoRA/DoRA weights (lorakit
    keeps them in fp32 by default). Full and freeze tuning train the base weights in `dtype`.
    """
    e = dtype_bytes(dtype)
    ea = dtype_bytes(adapter_dtype, "adapter_dtype")
    if counts.method in LORA_METHODS:
        trainable_bytes = ea
        weights = (weight_bytes(counts.base - counts.quantized, e) + nf4_weight_bytes(counts.quantized)
                   + weight_bytes(counts.added, ea))
    else:
        trainable_bytes = e
        weights = weight_bytes(counts.base, e)
    acts: Activations = activation_bytes(shape, counts, batch, seq_len, e, ea, r, padded)
    extra = dora_extra_activation_bytes(shape, counts, batch * seq_len, e) if counts.method == "dora" else 0
    largest_extra = extra // shape.num_layers if extra else 0
    return TrainingMemory(
        weights=weights,
        quantization_constants=nf4_constant_bytes(counts.quantized, double_quant),
        gradients=gradient_bytes(counts.trainable, trainable_bytes),
        optimizer_states=adamw_state_bytes(counts.trainable),
        master_weights=master_weight_bytes(counts.trainable, trainable_bytes),
        activations=acts.total + extra,
        activations_checkpointed=acts.total_checkpointed + largest_extra,
    )


def per_rank_memory(shape: ModelShape, counts: ParamCounts, batch: int, seq_len: int,
                    world_size: int, strategy: str, dtype: str = "bf16", adapter_dtype: str = "fp32",
                    r: int = 8, padded: bool = False, double_quant: bool = True) -> TrainingMemory:
    """One rank's bytes when `world_size` ranks train a global batch of `batch` rows (lorakit's
    `train.distributed`). Every strategy splits the batch, so activations are those of
    ceil(batch / N) rows. DDP keeps everything else whole on every rank. FSDP2 keeps 1/N of the
    weights, gradients, optimizer states and master weights (Zhao et al. 2023, "PyTorch FSDP",
    ZeRO-3's partitioning), plus the largest decoder block gathered whole during its forward and
    backward (its weights and, when they train, its gradients before the reduce-scatter)."""
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"strategy: got {strategy!r} (expected ddp or fsdp)")
    mem = training_memory(shape, counts, -(-batch // world_size), seq_len, dtype, adapter_dtype, r,
                          padded, double_quant)
    if strategy == "ddp" or world_size == 1:
        return mem
    e = dtype_bytes(dtype)
    block = max(block_param_count(shape, i) for i in range(shape.num_layers))
    block_grads = block * e if counts.method not in LORA_METHODS else 0
    return TrainingMemory(
        weights=mem.weights / world_size + block * e,
        quantization_constants=mem.quantization_constants / world_size,
        gradients=mem.gradients / world_size + block_grads,
        optimizer_states=mem.optimizer_states / world_size,
        master_weights=mem.master_weights / world_size,
        activations=mem.activations,
        activations_checkpointed=mem.activations_checkpointed,
    )


def bytes_per_parameter_full(dtype: str) -> int:
    """Full fine-tuning with AdamW, per parameter: weights + gradients + 8 (Adam) + master copy.

    fp32: 4 + 4 + 8 = 16; bf16/fp16: 2 + 2 + 8 + 4 = 16 (ZeRO's mixed-precision figure).
    """
    e = dtype_bytes(dtype)
    return e + e + adamw_state_bytes(1) + master_weight_bytes(1, e)

