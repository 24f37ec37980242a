"""The model families lorakit knows, and what each feature needs from them, in one table.

A family is a transformers `model_type` (`config.json`'s `model_type`): Llama 3.x, Qwen2/2.5,
Qwen3, Mistral, Gemma 2, Gemma 3 (text), Phi-3/3.5/4, and GPT-2 (the `Conv1D` case). Each row
says, from the transformers implementation of that type:

  * module names: the attention and MLP linear layers of a decoder block (the `attention` and
    `mlp` target presets; `all-linear` is both, PEFT's `INCLUDE_LINEAR_LAYERS_SHORTHAND`), which
    of them are fused (Phi-3's `qkv_proj` and `gate_up_proj` hold q|k|v and gate|up in one weight;
    PEFT targets them whole and so does lorakit, so an adapter is the same tensors in both; vLLM
    splits them into packed slices only inside its kernels), and the parameter tensors of a block
    (for `calc`);
  * padding-free packing: whether `lorakit.train.packing`'s attention computes what the family's
    own attention computes (it honours sliding windows and Gemma 2's score soft-capping; it has
    no attention dropout);
  * lean ops: the RMSNorm and SiLU-gated MLP classes `lorakit.train.lean_ops` restates
    (Gemma's `(1 + w)` RMSNorm and GELU MLP, Phi-3's fused MLP are not restated);
  * GGUF: llama.cpp's architecture (`gguf.MODEL_ARCH`, as `convert_hf_to_gguf.py` registers the
    transformers class) when lorakit's exporter writes it, else why not; and what the converter
    and llama.cpp's graph for it fix that a config could set otherwise (Gemma's norms stored as
    `1 + w`, its GELU, the sliding-layer pattern, the query scale, which soft-cappings apply);
  * the chat template's end-of-turn token, the token that closes an assistant turn and is the
    last supervised token of an answer.

Features ask this table (`family_of(model)`, `refusal(model, feature)`), never a substring of a
model name. A `model_type` not in the table is refused up front by the features that need it,
with the reason; plain LoRA on any `nn.Linear` / `Conv1D` model does not need it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lorakit.errors import LorakitError

# Features a family may or may not support; `lora` (inject, train, save, PEFT parity, merge,
# serve) needs only linear layers and works on any causal LM transformers builds.
FEATURES = ("lora", "packing", "lean_ops", "gguf", "calc", "chat_template")


class UnsupportedFamilyError(LorakitError):
    """A feature was asked of a model family that cannot do it (the message says why)."""


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block, for `calc`: dims are symbols a `ModelShape` resolves
    (`h` hidden, `q` heads * head_dim, `kv` kv heads * head_dim, `i` intermediate, sums with `+`
    and multiples such as `3h`); `bias` names the config switch that gives it a bias
    (`qkv`, `o`, `mlp`, `always`, `never`)."""

    path: str  # relative to the block, e.g. "self_attn.q_proj"
    d_in: str
    d_out: str
    bias: str = "never"

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


_LLAMA_BLOCK = (
    Linear("self_attn.q_proj", "h", "q", "qkv"), Linear("self_attn.k_proj", "h", "kv", "qkv"),
    Linear("self_attn.v_proj", "h", "kv", "qkv"), Linear("self_attn.o_proj", "q", "h", "o"),
    Linear("mlp.gate_proj", "h", "i", "mlp"), Linear("mlp.up_proj", "h", "i", "mlp"),
    Linear("mlp.down_proj", "i", "h", "mlp"),
)
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
# Gemma 2/3 normalise before and after both the attention and the MLP ("sandwich" norms).
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str  # the name users know
    causal_lm: str  # the transformers class that loads it
    attention: tuple[str, ...]  # leaf names of a block's attention linears
    mlp: tuple[str, ...]  # ... and of its MLP linears
    block_linears: tuple[Linear, ...]
    block_norms: tuple[str, ...]  # norm modules of a block (one weight each; GPT-2's have bias)
    end_of_turn: str | None  # the chat template's end-of-turn token (None: no chat template)
    chat_format: str  # the family's chat template, in words
    block_path: str = "model.layers"
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    fused: tuple[str, ...] = ()  # linears holding several projections in one weight
    conv1d: bool = False  # linears are transformers' Conv1D (weight stored (d_in, d_out))
    qk_norm: bool = False  # a per-head RMSNorm on q and k (Qwen3, Gemma 3)
    # Which config switches give biases: "config" (`attention_bias` on q/k/v/o), "qkv" (q/k/v
    # always, o never: Qwen2), "never"; the MLP follows `mlp_bias` only where `mlp_bias` is "config".
    attention_bias: str = "config"
    mlp_bias: str = "never"
    default_head_dim: int | None = None  # the config class's head_dim default (None: hidden / heads)
    tie_default: bool = False  # transformers' default for tie_word_embeddings
    packing: str | None = None  # None: packs padding-free; else why it cannot
    lean_rms_norm: str | None = None  # RMSNorm class lean_ops restates
    lean_gated_mlp: str | None = None  # SiLU-gated MLP class lean_ops restates
    gguf_arch: str | None = None  # gguf.MODEL_ARCH member the exporter writes
    gguf_refusal: str | None = None  # why not, when gguf_arch is None
    # llama.cpp's llama graph wants q/k rows in interleaved rope order (`LlamaModel.permute`);
    # its qwen2/qwen3/gemma/phi3 graphs take transformers' rotate-half order as it is.
    gguf_permute_qk: bool = False
    # Added to every `*norm.weight` on export: Gemma's RMSNorm computes x * (1 + w) and llama.cpp's
    # gemma graphs x * w, so the converter stores 1 + w (transformers' reader subtracts it again).
    gguf_norm_shift: float = 0.0
    gguf_hidden_act: str = "silu"  # the MLP activation llama.cpp's graph computes
    gguf_output: bool = True  # the graph has an output tensor (gemma2's reuses the embeddings)
    # llama.cpp's graph fixes which layers slide: layer i slides when i % n < n - 1 (gemma2: 2,
    # gemma3: 6), reading the window from the file; None: no sliding layers.
    gguf_swa_pattern: int | None = None
    gguf_window_key: bool = False  # the converter writes `attention.sliding_window` (0: none)
    gguf_swa_rope_theta: float | None = None  # the sliding layers' rope base llama.cpp fixes
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads) for a model of
    # this layer count (its "27B" type); a config's query_pre_attn_scalar must agree.
    gguf_hidden_scale_layers: int | None = None
    gguf_required: tuple[str, ...] = ()  # config fields the graph always applies (must be set)
    gguf_unsupported: tuple[str, ...] = ()  # config fields the graph ignores (must be unset)
    notes: str = ""

    @property
    def all_linear(self) -> tuple[str, ...]:
        """Leaf names `all-linear` adapts in a block (the output head never)."""
        return self.attention + self.mlp

    def targets(self, preset: str) -> list[str]:
        """The leaf names of a target preset: `attention`, `mlp` or `all-linear`."""
        presets = {"attention": self.attention, "mlp": self.mlp, "all-linear": self.all_linear}
        if preset not in presets:
            raise UnsupportedFamilyError(f"target preset {preset!r}: expected one of {', '.join(presets)}")
        return list(presets[preset])


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", "LlamaForCausalLM", _ATTENTION, _MLP, _LLAMA_BLOCK, _LLAMA_NORMS,
           end_of_turn="<|eot_id|>", chat_format="Llama 3 headers",
           mlp_bias="config", lean_rms_norm="LlamaRMSNorm", lean_gated_mlp="LlamaMLP",
           gguf_arch="LLAMA", gguf_permute_qk=True),
    Family("qwen2", "Qwen2 / Qwen2.5", "Qwen2ForCausalLM", _ATTENTION, _MLP, _LLAMA_BLOCK,
           _LLAMA_NORMS, end_of_turn="<|im_end|>", chat_format="ChatML", attention_bias="qkv",
           lean_rms_norm="Qwen2RMSNorm", lean_gated_mlp="Qwen2MLP", gguf_arch="QWEN2",
           notes="q/k/v have biases, o_proj none"),
    Family("qwen3", "Qwen3", "Qwen3ForCausalLM", _ATTENTION, _MLP, _LLAMA_BLOCK, _LLAMA_NORMS,
           end_of_turn="<|im_end|>", chat_format="ChatML", qk_norm=True,
           lean_rms_norm="Qwen3RMSNorm", lean_gated_mlp="Qwen3MLP", gguf_arch="QWEN3"),
    Family("mistral", "Mistral", "MistralForCausalLM", _ATTENTION, _MLP, _LLAMA_BLOCK, _LLAMA_NORMS,
           end_of_turn="</s>", chat_format="[INST] ... [/INST]", attention_bias="never",
           lean_rms_norm="MistralRMSNorm", lean_gated_mlp="MistralMLP", gguf_arch="LLAMA",
           gguf_permute_qk=True,
           notes="exports to GGUF only with sliding_window null (Mistral 7B v0.2+); llama.cpp runs "
                 "it as llama"),
    Family("gemma2", "Gemma 2", "Gemma2ForCausalLM", _ATTENTION, _MLP, _LLAMA_BLOCK, _GEMMA_NORMS,
           end_of_turn="<end_of_turn>", chat_format="Gemma turns", tie_default=True,
           default_head_dim=256,
           gguf_arch="GEMMA2", gguf_norm_shift=1.0, gguf_hidden_act="gelu_pytorch_tanh",
           gguf_output=False, gguf_swa_pattern=2, gguf_window_key=True,
           gguf_hidden_scale_layers=46,
           gguf_required=("attn_logit_softcapping", "final_logit_softcapping"),
           notes="embeddings scaled by sqrt(hidden), tied head, final logit soft-capping, "
                 "(1 + w) RMSNorm, GELU-tanh MLP"),
    Family("gemma3_text", "Gemma 3 (text)", "Gemma3ForCausalLM", _ATTENTION, _MLP, _LLAMA_BLOCK,
           _GEMMA_NORMS, end_of_turn="<end_of_turn>", chat_format="Gemma turns", qk_norm=True,
           tie_default=True, default_head_dim=256,
           gguf_arch="GEMMA3", gguf_norm_shift=1.0, gguf_hidden_act="gelu_pytorch_tanh",
           gguf_swa_pattern=6, gguf_window_key=True, gguf_swa_rope_theta=10000.0,
           gguf_hidden_scale_layers=62,
           gguf_unsupported=("attn_logit_softcapping",),
           notes="embeddings scaled by sqrt(hidden), tied head, (1 + w) RMSNorm, q/k norms, "
                 "local/global rope, GELU-tanh MLP"),
    Family("phi3", "Phi-3 / Phi-4", "Phi3ForCausalLM", ("qkv_proj", "o_proj"),
           ("gate_up_proj", "down_proj"),
           (Linear("self_attn.qkv_proj", "h", "q+2kv"), Linear("self_attn.o_proj", "q", "h"),
            Linear("mlp.gate_up_proj", "h", "2i"), Linear("mlp.down_proj", "i", "h")),
           _LLAMA_NORMS, end_of_turn="<|end|>", chat_format="Phi <|user|> / <|assistant|>",
           fused=("qkv_proj", "gate_up_proj"), attention_bias="never", lean_rms_norm="Phi3RMSNorm",
           gguf_arch="PHI3", gguf_window_key=True,
           notes="fused qkv_proj and gate_up_proj are adapted whole, as PEFT does"),
    Family("gpt2", "GPT-2", "GPT2LMHeadModel", ("c_attn", "c_proj"), ("c_fc", "c_proj"),
           (Linear("attn.c_attn", "h", "3h", "always"), Linear("attn.c_proj", "h", "h", "always"),
            Linear("mlp.c_fc", "h", "i", "always"), Linear("mlp.c_proj", "i", "h", "always")),
           ("ln_1", "ln_2"), end_of_turn=None, chat_format="none (Alpaca-style text)",
           block_path="transformer.h", embedding="transformer.wte", final_norm="transformer.ln_f",
           fused=("c_attn",), conv1d=True, tie_default=True, attention_bias="always",
           gguf_refusal="llama.cpp's gpt2 graph (Conv1D, learned positions) is not written yet",
           notes="Conv1D linears (weight stored transposed); c_proj names both the attention "
                 "output and the MLP output"),
)}


def family(model_type: str | None) -> Family | None:
    """The table's row for a `model_type`, or None for a type lorakit has no row for."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def model_type_of(model_or_config) -> str | None:
    """`model_type` of a transformers model, config object or `config.json` dict."""
    if isinstance(model_or_config, dict):
        return model_or_config.get("model_type")
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "model_type", None)


def family_of(model_or_config) -> Family | None:
    return family(model_type_of(model_or_config))


def require(model_or_config, feature: str) -> Family:
    """The family of a model for a feature that needs the table; an error naming the known
    types when it has no row."""
    model_type = model_type_of(model_or_config)
    fam = family(model_type)
    if fam is None:
        raise UnsupportedFamilyError(
            f"model_type {model_type!r}: {feature} needs a model family lorakit knows "
            f"(expected one of {', '.join(FAMILIES)})")
    return fam


def _config_attr(model_or_config, name: str):
    if isinstance(model_or_config, dict):
        return model_or_config.get(name)
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, name, None)


def sliding_window(model_or_config) -> int | None:
    """The attention window the config switches on, or None: Mistral and Phi-3 use
    `sliding_window` when it is set, Qwen2/Qwen3 only with `use_sliding_window`; Gemma's
    sliding layers follow `layer_types` (its row's `gguf_swa_pattern` for llama.cpp)."""
    fam = family_of(model_or_config)
    window = _config_attr(model_or_config, "sliding_window")
    if fam is not None and fam.model_type.startswith("qwen"):
        return window if _config_attr(model_or_config, "use_sliding_window") else None
    return window


def _rope_sets(model_or_config) -> list[dict]:
    """The rope parameter sets of a config: one, or one per layer type (Gemma 3)."""
    rope = _config_attr(model_or_config, "rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def gguf_config_problems(model_or_config) -> list[str]:
    """What in this config llama.cpp's graph for the family would compute differently (empty when
    the GGUF file would be the same model). The graph fixes things a transformers config leaves
    open: the activation, biases, rope scaling, the sliding-layer pattern and window, the query
    scale, which soft-cappings apply, a separate output head."""
    fam = family_of(model_or_config)
    if fam is None or fam.gguf_arch is None:
        return []
    get = functools.partial(_config_attr, model_or_config)
    graph = fam.gguf_arch.lower()
    problems = []
    act = get("hidden_activation") or get("hidden_act") or "silu"
    if act != fam.gguf_hidden_act:
        problems.append(f"hidden_act={act!r} (llama.cpp's {graph} graph computes {fam.gguf_hidden_act!r})")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag):
            problems.append(f"{flag}=True (llama.cpp's {graph} graph has no such biases)")
    for rope in _rope_sets(model_or_config):
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type={rope.get('rope_type')!r} (expected 'default'; rope scaling "
                            "is not exported yet)")
            break
    if fam.gguf_swa_pattern is None:
        window = sliding_window(model_or_config)
        if window is not None:
            problems.append(f"the config sets sliding_window={window} (llama.cpp's {graph} graph "
                            "has no window)")
    else:
        n = fam.gguf_swa_pattern
        layers = get("num_hidden_layers") or 0
        want = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(layers)]
        types = get("layer_types")
        if types is not None and list(types) != want:
            problems.append(f"layer_types={list(types)} (llama.cpp's {graph} graph fixes them "
                            f"as {want})")
        if not get("sliding_window"):
            problems.append(f"sliding_window={get('sliding_window')!r} (llama.cpp's {graph} graph "
                            "has sliding layers; expected a window)")
        if fam.gguf_swa_rope_theta is not None:
            local = (get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
            if local is not None and float(local) != fam.gguf_swa_rope_theta:
                problems.append(f"sliding layers' rope_theta={local} (llama.cpp's {graph} graph "
                                f"fixes {fam.gguf_swa_rope_theta})")
    scalar = get("query_pre_attn_scalar")
    if scalar is not None:
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = get("head_dim") or hidden // heads
        by_hidden = fam.gguf_hidden_scale_layers == get("num_hidden_layers")
        want = hidden // heads if by_hidden else head_dim
        if scalar != want:
            problems.append(f"query_pre_attn_scalar={scalar} (llama.cpp's {graph} graph scales "
                            f"queries by 1/sqrt({want}): " +
                            ("hidden / heads at this layer count)" if by_hidden else "head_dim)"))
    for key in fam.gguf_required:
        if get(key) is None:
            problems.append(f"{key}=None (llama.cpp's {graph} graph always applies it)")
    for key in fam.gguf_unsupported:
        if get(key) is not None:
            problems.append(f"{key}={get(key)} (llama.cpp's {graph} graph has none)")
    if not fam.gguf_output and get("tie_word_embeddings") is False:
        problems.append(f"tie_word_embeddings=False (llama.cpp's {graph} graph reuses the embeddings "
                        "as the output head)")
    return problems


def refusal(model_or_config, feature: str) -> str | None:
    """None when the model can use `feature`, else the reason it cannot (one line).

    Besides the family's row, the instance's config decides a few cases: Mistral and Phi-3
    configs may switch sliding-window attention on (`sliding_window`), Qwen2 off again
    (`use_sliding_window`)."""
    if feature not in FEATURES:
        raise ValueError(f"feature {feature!r}: expected one of {', '.join(FEATURES)}")
    model_type = model_type_of(model_or_config)
    fam = family(model_type)
    if feature == "lora":
        return None
    if fam is None:
        return f"model_type {model_type!r} is not in lorakit's family table ({', '.join(FAMILIES)})"
    who = f"model_type {model_type!r} ({fam.label})"
    if feature == "packing":
        if fam.packing:
            return f"{who}: {fam.packing}"
        for key in ("attention_dropout", "attn_pdrop"):  # GPT-2 defaults attn_pdrop to 0.1
            p = _config_attr(model_or_config, key)
            if isinstance(p, (int, float)) and p > 0:
                return f"{who}: the config sets {key}={p} (the packed attention has no dropout)"
        return None
    if feature == "lean_ops":
        if fam.lean_rms_norm is None and fam.lean_gated_mlp is None:
            return f"{who}: no RMSNorm or SiLU-gated MLP that lean_ops restates"
        return None
    if feature == "gguf":
        if fam.gguf_arch is None:
            return f"{who}: {fam.gguf_refusal}"
        problems = gguf_config_problems(model_or_config)
        return f"{who}: " + "; ".join(problems) if problems else None
    if feature == "chat_template":
        return None if fam.end_of_turn else f"{who}: chat template {fam.chat_format}"
    return None  # calc: every row describes its tensors


def end_of_turn_tokens() -> tuple[str, ...]:
    """Every family's end-of-turn token, for code that has a tokenizer but no model."""
    return tuple(dict.fromkeys(f.end_of_turn for f in FAMILIES.values() if f.end_of_turn))


def lean_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(RMSNorm class names, SiLU-gated MLP class names) lean_ops restates."""
    return (tuple(f.lean_rms_norm for f in FAMILIES.values() if f.lean_rms_norm),
            tuple(f.lean_gated_mlp for f in FAMILIES.values() if f.lean_gated_mlp))


def gguf_architectures() -> dict[str, str]:
    """{transformers class: gguf.MODEL_ARCH member} for the families the GGUF exporter writes."""
    return {f.causal_lm: f.gguf_arch for f in FAMILIES.values() if f.gguf_arch}


def template_end_of_turn(tokenizer) -> str | None:
    """The end-of-turn token a tokenizer's own chat template writes: the first of the table's
    tokens in its text, else its eos when the template writes `eos_token` (Mistral's), else None.
    A model's template may be another family's (SmolLM2 is a Llama with ChatML)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if not isinstance(template, str):
        return None
    found = sorted((template.find(t), t) for t in end_of_turn_tokens() if t in template)
    if found:
        return found[0][1]
    return getattr(tokenizer, "eos_token", None) if "eos_token" in template else None


def support_summary(model_or_config, tokenizer=None) -> dict:
    """What `lorakit info` prints: the family, the chat template's end-of-turn token (the
    tokenizer's own template when given, else the family's), and per feature "yes" or the reason."""
    fam = family_of(model_or_config)
    own = template_end_of_turn(tokenizer) if tokenizer is not None else None
    return {
        "model_type": model_type_of(model_or_config),
        "family": fam.label if fam else None,
        "chat_template": ("the tokenizer's" if own else fam.chat_format if fam else None),
        "end_of_turn": own or (fam.end_of_turn if fam else None),
        "target_presets": {p: fam.targets(p) for p in ("attention", "mlp", "all-linear")} if fam else None,
        "features": {feat: refusal(model_or_config, feat) or "yes" for feat in FEATURES},
    }
