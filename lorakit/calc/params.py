"""Parameter counts from a model's config alone: per tensor, per linear module, per method.

`param_table` lists every parameter tensor a transformers model of this config would have, under
the names `model.named_parameters()` gives (a tied output head counted once, under the embedding),
so a test can compare the two name by name. Every family of `lorakit.models.families` is
described by its row there (block linears with their sizes, norms, q/k norms, tying, biases),
following the transformers implementations: rotary decoders (`llama`, `mistral`, `qwen2`,
`qwen3`, `gemma2`, `gemma3_text`, `phi3`: RMSNorm, grouped-query attention, gated MLP) and
GPT-2-style decoders (`gpt2`: LayerNorm with bias, learned positions, fused QKV `Conv1D`).

Trainable counts per method follow the papers and our own `lorakit.lora.inject`:
  * LoRA (Hu et al. 2021): r * (d_in + d_out) per adapted linear module, which modules chosen by
    the same rules as `inject` (names list / regex / "all-linear" = every linear but the head);
  * DoRA (Liu et al. 2024): LoRA plus a magnitude vector of d_out per adapted module;
  * QLoRA (Dettmers et al. 2023): LoRA's trainable count over a base whose block linears are NF4;
  * freeze: every parameter of the last N decoder blocks;
  * full: every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.errors import ConfigError, ModelLoadError, TargetModulesError
from lorakit.models.families import FAMILIES, Family, family

METHODS = ("full", "lora", "dora", "qlora", "freeze")
LORA_METHODS = ("lora", "dora", "qlora")


@dataclass(frozen=True)
class ModelShape:
    """The config fields that decide parameter counts and activation sizes."""

    model_type: str
    family: str  # "llama" (rotary decoders) or "gpt2": which activation model calc uses
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k
    max_positions: int = 0  # learned position table rows (GPT-2); 0 for rotary models
    activation: str = "silu"
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    embd_dropout: float = 0.0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def row(self) -> Family:
        """The family table's row for this model type."""
        return FAMILIES[self.model_type]

    @property
    def block_prefix(self) -> str:
        return self.row.block_path

    def dim(self, expr: str) -> int:
        """A size from the table's symbols: `h`, `q`, `kv`, `i`, with multiples and sums
        (`3h`, `2i`, `q+2kv`)."""
        sizes = {"h": self.hidden_size, "q": self.q_dim, "kv": self.kv_dim, "i": self.intermediate_size}
        total = 0
        for term in expr.split("+"):
            digits = term[:len(term) - len(term.lstrip("0123456789"))]
            total += int(digits or 1) * sizes[term[len(digits):]]
        return total

    def has_bias(self, kind: str) -> bool:
        return {"qkv": self.qkv_bias, "o": self.o_bias, "mlp": self.mlp_bias,
                "always": True, "never": False}[kind]


@dataclass(frozen=True)
class LinearModule:
    """One linear layer: full module name as in `model.named_modules()`, and its sizes."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    layer: int | None  # decoder block index; None for the output head

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass
class ParamCounts:
    """What a method trains, and how big the model is with it."""

    method: str
    base: int  # base model parameters (tied tensors once)
    trainable: int  # parameters the optimizer updates
    added: int  # parameters the method adds beside the base (LoRA A/B, DoRA magnitudes)
    quantized: int = 0  # base parameters stored in NF4 (QLoRA: block linear weights)
    adapted_modules: list[str] = field(default_factory=list)
    trainable_layers: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.base + self.added


def _get(cfg: dict, key: str, default, problems: list[str], source: str, kind=int):
    value = cfg.get(key, default)
    if value is None and default is None:
        return None
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        problems.append(f"{source}: {key}: got {value!r} (expected a positive integer)")
        return 1
    if kind is float and (not isinstance(value, (int, float)) or not 0 <= value < 1):
        problems.append(f"{source}: {key}: got {value!r} (expected a probability 0 <= p < 1)")
        return 0.0
    return value


def shape_from_config(cfg: dict, source: str = "config") -> ModelShape:
    """Read a transformers `config.json` dict; every missing or bad field reported at once.

    Defaults for absent fields are the transformers config classes' defaults for that model type
    (e.g. Llama unties the output head, GPT-2 ties it), so a trimmed config reads as the real one.
    """
    model_type = cfg.get("model_type")
    row = family(model_type)
    if row is None:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not one calc can size (expected one of "
            f"{', '.join(FAMILIES)})")
    problems: list[str] = []
    if row.conv1d:
        required = ("vocab_size", "n_embd", "n_layer", "n_head")
        problems += [f"{source}: {k}: missing (needed to count parameters)" for k in required if k not in cfg]
        hidden = _get(cfg, "n_embd", 768, problems, source)
        heads = _get(cfg, "n_head", 12, problems, source)
        inner = _get(cfg, "n_inner", None, problems, source) or 4 * hidden
        shape = ModelShape(
            model_type=model_type, family="gpt2",
            vocab_size=_get(cfg, "vocab_size", 50257, problems, source),
            hidden_size=hidden, num_layers=_get(cfg, "n_layer", 12, problems, source),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=inner,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=True, o_bias=True, mlp_bias=True,
            max_positions=_get(cfg, "n_positions", 1024, problems, source),
            activation=cfg.get("activation_function", "gelu_new"),
            resid_dropout=_get(cfg, "resid_pdrop", 0.1, problems, source, float),
            attn_dropout=_get(cfg, "attn_pdrop", 0.1, problems, source, float),
            embd_dropout=_get(cfg, "embd_pdrop", 0.1, problems, source, float),
        )
        if hidden % heads:
            problems.append(f"{source}: n_embd {hidden} is not a multiple of n_head {heads}")
    else:
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        problems += [f"{source}: {k}: missing (needed to count parameters)" for k in required if k not in cfg]
        hidden = _get(cfg, "hidden_size", 4096, problems, source)
        heads = _get(cfg, "num_attention_heads", 32, problems, source)
        kv_heads = _get(cfg, "num_key_value_heads", None, problems, source) or heads
        head_dim = _get(cfg, "head_dim", row.default_head_dim, problems, source) or hidden // heads
        # The table says which config switch gives biases (Qwen2 hard-codes them on q/k/v).
        attention_bias = bool(cfg.get("attention_bias", False)) and row.attention_bias == "config"
        shape = ModelShape(
            model_type=model_type, family="llama",
            vocab_size=_get(cfg, "vocab_size", 32000, problems, source),
            hidden_size=hidden, num_layers=_get(cfg, "num_hidden_layers", 32, problems, source),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=_get(cfg, "intermediate_size", 11008, problems, source),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", row.tie_default)),
            qkv_bias=row.attention_bias == "qkv" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) and row.mlp_bias == "config",
            qk_norm=row.qk_norm,
            activation=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
            attn_dropout=_get(cfg, "attention_dropout", 0.0, problems, source, float),
        )
        if heads % kv_heads:
            problems.append(f"{source}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv_heads}")
    if problems:
        raise ModelLoadError("cannot size this model:\n  " + "\n  ".join(problems))
    return shape


def linear_modules(shape: ModelShape) -> list[LinearModule]:
    """Every linear layer with (d_in, d_out), in `named_modules()` order, the head last."""
    out = []
    h, p = shape.hidden_size, shape.block_prefix
    rows = [(lin.path, shape.dim(lin.d_in), shape.dim(lin.d_out), shape.has_bias(lin.bias))
            for lin in shape.row.block_linears]
    for i in range(shape.num_layers):
        out += [LinearModule(f"{p}.{i}.{name}", d_in, d_out, bias, i) for name, d_in, d_out, bias in rows]
    out.append(LinearModule("lm_head", h, shape.vocab_size, False, None))
    return out


def param_table(shape: ModelShape) -> dict[str, int]:
    """{parameter name: numel}, as `dict((n, p.numel()) for n, p in model.named_parameters())`."""
    h, p, row = shape.hidden_size, shape.block_prefix, shape.row
    table: dict[str, int] = {f"{row.embedding}.weight": shape.vocab_size * h}
    if shape.max_positions:
        table["transformer.wpe.weight"] = shape.max_positions * h
    for lin in linear_modules(shape):
        if lin.name == "lm_head" and shape.tie_word_embeddings:
            continue  # the same tensor as the input embedding: named_parameters lists it once
        table[f"{lin.name}.weight"] = lin.d_in * lin.d_out
        if lin.bias:
            table[f"{lin.name}.bias"] = lin.d_out
    # GPT-2's LayerNorms have a bias; the RMSNorms of the rotary families do not.
    norm_tensors = ("weight", "bias") if row.conv1d else ("weight",)
    for i in range(shape.num_layers):
        for norm in row.block_norms:
            for t in norm_tensors:
                table[f"{p}.{i}.{norm}.{t}"] = h
        if shape.qk_norm:
            table[f"{p}.{i}.self_attn.q_norm.weight"] = shape.head_dim
            table[f"{p}.{i}.self_attn.k_norm.weight"] = shape.head_dim
    for t in norm_tensors:
        table[f"{row.final_norm}.{t}"] = h
    return table


def block_param_count(shape: ModelShape, layer: int) -> int:
    """Parameters of decoder block `layer` (what freeze-tuning trains per block)."""
    prefix = f"{shape.block_prefix}.{layer}."
    return sum(n for name, n in param_table(shape).items() if name.startswith(prefix))


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> list[LinearModule]:
    """The linear modules `target_modules` selects, by `lorakit.lora.inject`'s rules.

    A list entry matches a module whose full name equals it or ends with `.entry`; a string is
    a regex for `re.fullmatch` on the full name; "all-linear" is every linear but the head.
    """
    from lorakit.lora.config import ALL_LINEAR
    # inject's own matcher, so calc and training can never disagree on which modules adapt.
    from lorakit.lora.inject import matches_target

    linears = linear_modules(shape)
    if target_modules == ALL_LINEAR:
        return [lin for lin in linears if lin.name != "lm_head"]
    chosen = [lin for lin in linears if matches_target(lin.name, target_modules)]
    if not chosen:
        linear_names = {lin.name for lin in linears}
        others = sorted({name.rsplit(".", 1)[0] for name in param_table(shape)} - linear_names)
        non_linear = [n for n in others if matches_target(n, target_modules)]
        if non_linear:
            raise TargetModulesError(
                f"target_modules {target_modules!r} matches {non_linear[:3]} which are not linear "
                "layers; LoRA adapts nn.Linear and Conv1D modules")
        leaves = sorted({lin.leaf for lin in linears})
        raise TargetModulesError(
            f"target_modules {target_modules!r} matches no linear module of this model; "
            f"its linear modules are named: {', '.join(leaves)} (or use 'all-linear')")
    return chosen


def lora_param_count(modules: list[LinearModule], r: int) -> int:
    """LoRA's added parameters: A is (r x d_in) and B is (d_out x r), so r * (d_in + d_out) each."""
    return sum(r * (m.d_in + m.d_out) for m in modules)


def dora_param_count(modules: list[LinearModule], r: int) -> int:
    """DoRA = LoRA plus one magnitude per output feature (the column norms m, length d_out)."""
    return lora_param_count(modules, r) + sum(m.d_out for m in modules)


def count_parameters(shape: ModelShape, method: str, r: int = 8,
                     target_modules: list[str] | str = ("q_proj", "v_proj"),
                     layers_to_train: int = 1) -> ParamCounts:
    """Base, trainable and added parameters of `method` on this model."""
    problems = []
    if method not in METHODS:
        problems.append(f"method: got {method!r} (expected one of {', '.join(METHODS)})")
    if method in LORA_METHODS and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        problems.append(f"r: got {r!r} (expected an integer >= 1)")
    if method == "freeze" and not (isinstance(layers_to_train, int)
                                   and 1 <= layers_to_train <= shape.num_layers):
        problems.append(f"layers_to_train: got {layers_to_train!r} (expected 1..{shape.num_layers}, "
                        f"the model has {shape.num_layers} blocks)")
    if problems:
        raise ConfigError("invalid calc arguments:\n  " + "\n  ".join(problems))
    table = param_table(shape)
    base = sum(table.values())
    if method == "full":
        return ParamCounts(method, base, trainable=base, added=0,
                           trainable_layers=list(range(shape.num_layers)))
    if method == "freeze":
        layers = list(range(shape.num_layers - layers_to_train, shape.num_layers))
        return ParamCounts(method, base, trainable=sum(block_param_count(shape, i) for i in layers),
                           added=0, trainable_layers=layers)
    if isinstance(target_modules, tuple):
        target_modules = list(target_modules)
    modules = lora_targets(shape, target_modules)
    added = dora_param_count(modules, r) if method == "dora" else lora_param_count(modules, r)
    quantized = 0
    if method == "qlora":
        # bitsandbytes (through transformers) converts every linear layer but the output head;
        # biases, norms and embeddings stay in the compute dtype.
        quantized = sum(m.d_in * m.d_out for m in linear_modules(shape) if m.name != "lm_head")
    return ParamCounts(method, base, trainable=added, added=added, quantized=quantized,
                       adapted_modules=[m.name for m in modules])
