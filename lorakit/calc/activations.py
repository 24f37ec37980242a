"""Activation memory of one training step: what autograd keeps between forward and backward.

The accounting follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (section 4.1): walk one transformer block, and for every operation add the
tensors its backward needs. For GPT-3-style blocks in 16-bit with 1-byte dropout masks they get
s*b*h*(34 + 5*a*s/h) bytes per layer (attention 11sbh + 5as^2b, MLP 19sbh, two LayerNorms 4sbh).

We redo that walk for the blocks transformers actually runs, since that is what lorakit trains:

  * attention runs in PyTorch's fused `scaled_dot_product_attention`, which keeps q, k, v, the
    output and a per-head log-sum-exp instead of the (a x s x s) probability matrix; only with
    attention dropout > 0 does it fall back to the math kernel and keep Korthikanti's s^2 terms
    (in fp32: the CPU math kernel upcasts 16-bit inputs);
  * with padded batches transformers passes a float mask (b x 1 x s x s per layer) and expands
    grouped k/v heads to all query heads first (`repeat_kv`);
  * Llama-style RMSNorm is written in Python: it keeps an fp32 copy of its input (4 bytes per
    element whatever the compute dtype), a per-token fp32 scale, and its normalised input when
    its weight trains;
  * SwiGLU keeps gate, SiLU(gate), up and their product (4 x intermediate); GPT-2's `gelu_new` is
    written in Python and keeps 4 intermediate-sized tensors, native GELU one;
  * PyTorch only saves what the backward needs for inputs that require grad, so frozen linear
    layers keep nothing, blocks below the first trainable parameter keep nothing (freeze), and
    a LoRA layer keeps its input (in the adapter dtype: one copy per adapted module when that
    differs from the compute dtype) and its r-wide `lora_A` output;
  * the loss upcasts logits to fp32 and log-softmax keeps its fp32 output: 4 * vocab per token;
  * dropout on CPU keeps its scaled mask in the activation dtype (the CUDA kernel keeps 1 byte).

These are PyTorch's CPU kernels, where lorakit's tests run. On CUDA, dropout masks are 1 byte,
LayerNorm statistics fp32 and fused attention supports dropout (no s^2 terms), so for models with
dropout (GPT-2 style) the figure is somewhat high there; dropout-free Llama-style models match.

Every term is bytes per token (b*s tokens) unless it says otherwise; `tests/calc` checks the total
against the tensors autograd actually saves (`torch.autograd.graph.saved_tensors_hooks`).
Gradient checkpointing (transformers' per-block `torch.utils.checkpoint`) keeps each block's input
(h values per token per layer, Korthikanti's "2sbhL" in 16-bit) and recomputes one block at a time
during backward, so its peak is that plus one block's full activations plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.calc.params import LORA_METHODS, ModelShape, ParamCounts

FP32 = 4
INDEX_BYTES = 8  # int64 token ids / labels kept by the embedding and the loss


@dataclass(frozen=True)
class BlockPlan:
    """What trains in one block: its own weights (full / freeze), and which linears carry LoRA
    (names relative to the block, e.g. `self_attn.q_proj`, `mlp.c_proj`)."""

    weights_train: bool
    lora: frozenset[str]


@dataclass
class Activations:
    """Activation bytes of one step, split where the split helps to read it."""

    blocks: int  # all decoder blocks, without checkpointing
    largest_block: int  # the block recomputed at once under checkpointing
    block_inputs: int  # what checkpointing keeps instead: each block's input
    head: int  # final norm, output head, loss, embedding indices and dropout
    rope_tables: int  # rotary cos/sin, kept by the blocks (under checkpointing: while recomputing)

    @property
    def total(self) -> int:
        return self.blocks + self.rope_tables + self.head

    @property
    def total_checkpointed(self) -> int:
        """Peak under per-block checkpointing: every block's input and the head are kept through
        the forward; backward recomputes one block at a time (the largest bounds it)."""
        return self.block_inputs + self.largest_block + self.rope_tables + self.head


def _linear_inputs(d_in: int, weight_trains: bool, n_lora: int, e: int, ea: int, r: int,
                   input_kept: bool = False) -> int:
    """Bytes per token kept by linear layers sharing one input (q/k/v, gate/up).

    A trainable weight needs its input for dW = dY^T X (kept once: the layers share the tensor,
    and nothing more when an earlier op already keeps it). Each LoRA layer casts the input to the
    adapter dtype (a no-op, so shared, when equal) and keeps it for lora_A's gradient, then keeps
    lora_A's r-wide output for lora_B's gradient.
    """
    shares_input = weight_trains or (n_lora and ea == e)
    kept = d_in * e if shares_input and not input_kept else 0
    if n_lora and ea != e:
        kept += n_lora * d_in * ea
    return kept + n_lora * r * ea


def _rms_norm(width: int, grad_in: bool, weight_trains: bool, e: int, rows: int = 1) -> int:
    """transformers' Python RMSNorm: x32 = x.float(); y = w * (x32 * rsqrt(mean(x32^2) + eps)).

    For the input's gradient it keeps x32 (fp32) and the per-row rsqrt (one fp32 per row; Qwen3's
    q/k norms have a row per head); for the weight's gradient, the normalised x in compute dtype.
    """
    return ((width + rows) * FP32 if grad_in else 0) + (width * e if weight_trains else 0)


def _attention_core(shape: ModelShape, seq_len: int, e: int, padded: bool, q_storage: int,
                    q_grad: bool = True, k_grad: bool = True, v_grad: bool = True) -> int:
    """scaled_dot_product_attention's saved tensors, per token.

    Fused kernels keep q (its whole storage: GPT-2's q is a view of the fused (3h) c_attn output),
    contiguous k and v, the output and a log-sum-exp per head; the output is the storage the output
    projection keeps too. Padded batches first expand grouped k and v to all query heads
    (`repeat_kv`) and pass a (b, 1, s, s) float mask: s values per token. With attention dropout
    the CPU math kernel runs instead, in fp32 whatever the input dtype: it keeps scaled copies of
    q and k, v, the softmax, the dropout mask and the dropped probabilities (a*s values each per
    token: Korthikanti's 5as^2b, there at 2+1+2 bytes), but not its output (the output projection
    keeps that when its weight trains), the mask or a log-sum-exp; it expands grouped k and v to
    all query heads itself. Being a chain of plain ops, it keeps only what the inputs that require
    grad need (scaled q for dk, scaled k for dq, the probabilities for dv, v for dq and dk).
    """
    if shape.attn_dropout > 0:
        probs = shape.num_heads * seq_len
        qk = q_grad or k_grad
        kept = (shape.q_dim if k_grad else 0) + (shape.q_dim if q_grad else 0)
        kept += (shape.q_dim + 2 * probs if qk else 0) + (probs if v_grad else 0)
        return kept * FP32
    kv = shape.q_dim if (padded and shape.num_kv_heads != shape.num_heads) else shape.kv_dim
    kept = (q_storage + 2 * kv + shape.q_dim) * e + shape.num_heads * FP32
    return kept + (seq_len * e if padded else 0)


def llama_block_bytes(shape: ModelShape, plan: BlockPlan, grad_in: bool, seq_len: int, e: int,
                      ea: int, r: int, padded: bool) -> tuple[int, bool, bool]:
    """(bytes per token, does the output require grad, did attention need grads) for one
    Llama-style decoder block."""
    h, i, t, lora = shape.hidden_size, shape.intermediate_size, plan.weights_train, plan.lora
    n_qkv = len({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} & lora)
    o_lora = int("self_attn.o_proj" in lora)
    gate_lora, up_lora = "mlp.gate_proj" in lora, "mlp.up_proj" in lora
    down_lora = int("mlp.down_proj" in lora)

    kept = _rms_norm(h, grad_in, t, e)
    norm_grad = grad_in or t
    kept += _linear_inputs(h, t, n_qkv, e, ea, r)
    attn_grad = norm_grad or n_qkv > 0
    if attn_grad:
        q_grad = norm_grad or "self_attn.q_proj" in lora
        k_grad = norm_grad or "self_attn.k_proj" in lora
        v_grad = norm_grad or "self_attn.v_proj" in lora
        if shape.qk_norm:  # Qwen3 normalises each head's q and k (one rsqrt per head)
            kept += _rms_norm(shape.q_dim, q_grad, t, e, rows=shape.num_heads)
            kept += _rms_norm(shape.kv_dim, k_grad, t, e, rows=shape.num_kv_heads)
        # Rotary embedding multiplies by constant cos/sin tables: it keeps only those (see head).
        kept += _attention_core(shape, seq_len, e, padded, shape.q_dim, q_grad, k_grad, v_grad)
    out_kept = attn_grad and shape.attn_dropout == 0  # the fused kernel keeps its output
    kept += _linear_inputs(shape.q_dim, t, o_lora, e, ea, r, input_kept=out_kept)
    mid_grad = grad_in or attn_grad or o_lora > 0  # the residual sum

    kept += _rms_norm(h, mid_grad, t, e)
    norm_grad = mid_grad or t
    kept += _linear_inputs(h, t, int(gate_lora) + int(up_lora), e, ea, r)
    gate_grad, up_grad = norm_grad or gate_lora, norm_grad or up_lora
    kept += i * e if gate_grad else 0  # SiLU keeps its input
    kept += i * e if up_grad else 0  # the product keeps SiLU(gate) for d(up)
    kept += i * e if gate_grad else 0  # and up for d(SiLU(gate))
    kept += _linear_inputs(i, t, down_lora, e, ea, r)
    return kept, mid_grad or gate_grad or up_grad or down_lora > 0, attn_grad


def _layer_norm(width: int, grad_in: bool, weight_trains: bool, e: int) -> int:
    """ATen's layer_norm keeps its input and a per-row mean and rstd (on CPU in the input dtype)."""
    return width * e + 2 * e if (grad_in or weight_trains) else 0


def _dropout(width: int, p: float, grad: bool, e: int) -> int:
    """CPU dropout multiplies by a scaled mask in the activation dtype and keeps the mask."""
    return width * e if (p > 0 and grad) else 0


def gpt2_block_bytes(shape: ModelShape, plan: BlockPlan, grad_in: bool, seq_len: int, e: int,
                     ea: int, r: int, padded: bool) -> tuple[int, bool, bool]:
    """(bytes per token, does the output require grad, did attention need grads) for one
    GPT-2-style block."""
    h, i, t, lora = shape.hidden_size, shape.intermediate_size, plan.weights_train, plan.lora
    qkv_lora, proj_lora = int("attn.c_attn" in lora), int("attn.c_proj" in lora)
    fc_lora, out_lora = int("mlp.c_fc" in lora), int("mlp.c_proj" in lora)

    kept = _layer_norm(h, grad_in, t, e)
    norm_grad = grad_in or t
    kept += _linear_inputs(h, t, qkv_lora, e, ea, r)
    attn_grad = norm_grad or qkv_lora > 0
    if attn_grad:
        kept += _attention_core(shape, seq_len, e, padded, q_storage=3 * h)
    out_kept = attn_grad and shape.attn_dropout == 0  # the fused kernel keeps its output
    kept += _linear_inputs(h, t, proj_lora, e, ea, r, input_kept=out_kept)
    proj_grad = attn_grad or proj_lora > 0
    kept += _dropout(h, shape.resid_dropout, proj_grad, e)
    mid_grad = grad_in or proj_grad

    kept += _layer_norm(h, mid_grad, t, e)
    norm_grad = mid_grad or t
    kept += _linear_inputs(h, t, fc_lora, e, ea, r)
    fc_grad = norm_grad or fc_lora > 0
    if fc_grad:
        # gelu_new = 0.5*x*(1 + tanh(c*(x + 0.044715*x^3))) keeps x, tanh(.), 0.5*x and 1 + tanh;
        # ATen's gelu keeps x alone.
        kept += (4 if shape.activation == "gelu_new" else 1) * i * e
    kept += _linear_inputs(i, t, out_lora, e, ea, r)
    out_grad = fc_grad or out_lora > 0
    kept += _dropout(h, shape.resid_dropout, out_grad, e)
    return kept, mid_grad or out_grad, attn_grad


def block_plans(shape: ModelShape, counts: ParamCounts) -> list[BlockPlan]:
    """Per block: does it train its own weights, and which of its linears carry LoRA."""
    plans = []
    for layer in range(shape.num_layers):
        prefix = f"{shape.block_prefix}.{layer}."
        lora = frozenset(n[len(prefix):] for n in counts.adapted_modules if n.startswith(prefix))
        plans.append(BlockPlan(layer in counts.trainable_layers and counts.method in ("full", "freeze"),
                               lora if counts.method in LORA_METHODS else frozenset()))
    return plans


def activation_bytes(shape: ModelShape, counts: ParamCounts, batch: int, seq_len: int,
                     e: int, ea: int = FP32, r: int = 8, padded: bool = False) -> Activations:
    """Activation bytes of one step of `counts.method` on `batch` sequences of `seq_len` tokens.

    `e` is the compute dtype's bytes per element, `ea` the adapter weights' (LoRA layers cast
    their input to it). `padded` says the batch has padding, so the attention mask is passed.
    """
    tokens = batch * seq_len
    full = counts.method == "full"
    block = llama_block_bytes if shape.family == "llama" else gpt2_block_bytes
    # Embedding output requires grad only when the embedding trains (full fine-tuning).
    g = full
    per_block = []
    any_attn_grad = False
    for plan in block_plans(shape, counts):
        kept, g, attn_grad = block(shape, plan, g, seq_len, e, ea, r, padded)
        any_attn_grad |= attn_grad
        per_block.append(kept * tokens)
    h, v = shape.hidden_size, shape.vocab_size
    head_lora = int(counts.method in LORA_METHODS and "lm_head" in counts.adapted_modules)
    if shape.family == "llama":
        head = _rms_norm(h, g, full, e)
    else:
        head = _layer_norm(h, g, full, e)
    # lm_head trains in full fine-tuning (tied: through the embedding it shares).
    head += _linear_inputs(h, full, head_lora, e, ea, r)
    head += v * FP32 + INDEX_BYTES  # log-softmax output in fp32, and the labels
    head += INDEX_BYTES if full else 0  # the embedding keeps the token ids for its gradient
    head_bytes = head * tokens + FP32  # + the loss's fp32 total-weight scalar
    rope = 0
    if shape.family == "llama" and any_attn_grad:
        # Rotary cos and sin tables (one per position, not per sequence): q * cos keeps cos.
        rope = 2 * seq_len * shape.head_dim * e
    if shape.family == "gpt2" and full:
        # Embedding dropout's mask, and the position ids the position table needs (one row).
        head_bytes += _dropout(h, shape.embd_dropout, True, e) * tokens + INDEX_BYTES * seq_len
    # transformers' checkpointing keeps every block's input, even a frozen block's (measured), so
    # freeze-tuning a few top blocks keeps more with checkpointing than without.
    block_inputs = shape.num_layers * h * e * tokens
    return Activations(blocks=sum(per_block), largest_block=max(per_block),
                       block_inputs=block_inputs, head=head_bytes,
                       rope_tables=rope)
