"""A merged model and its tokenizer as one GGUF model file, as llama.cpp's converter writes it.

Follows `convert_hf_to_gguf.py` (`TextModel` / `LlamaModel` / `Qwen2Model` / `Qwen3Model` /
`Gemma2Model` / `Gemma3Model` / `Phi3MiniModel`, `_set_vocab_gpt2`, `_set_vocab_sentencepiece`,
`prepare_tensors`): hyperparameters under `<arch>.*` (the family table's llama.cpp architecture),
the vocabulary under `tokenizer.ggml.*` with the chat template (a GPT-2-style byte-level BPE as
merges, a SentencePiece one as scored tokens), tensors renamed by `gguf.get_tensor_name_map` in
llama.cpp's layout (`export_gguf.to_gguf_layout`: q/k rows permuted for the llama graph, Gemma's
norms as 1 + w), norms and other 1-D tensors kept in F32, q8_0 only
for 2-D weights whose rows split into 32-element blocks (the rest fall back to F16, as the
converter does), and no `output.weight` when the embeddings are tied. transformers' GGUF loader
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`) reads the result back; the tests
compare its logits with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lorakit.adapters.export_gguf import (
    ExportError,
    gguf_arch,
    gguf_tensor_name,
    progress_bar,
    tensor_name_map,
    to_gguf_layout,
)

# llama.cpp's Llama 3 split regex (its `llama-bpe` pre-tokenizer), as Llama 3's tokenizer.json has it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (and Qwen3's): Llama 3's with single digits; llama.cpp's `qwen2` pre-tokenizer.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def file_type(outtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def encode_tensor(gguf_name: str, data: np.ndarray, outtype: str):
    """(array to write, raw ggml type or None) for one fp32 tensor, by the converter's rules."""
    import gguf

    qtype = gguf.GGMLQuantizationType
    # Norms and other vectors are tiny and precision-sensitive: llama.cpp keeps them in F32.
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, qtype.Q8_0), qtype.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(data, qtype.BF16), qtype.BF16
    # f16, and q8_0's fallback for rows that do not split into 32-element blocks.
    return data.astype(np.float16), None


def write_hparams(writer, config) -> None:
    """`<arch>.*` keys from the HF config (`TextModel.set_gguf_parameters` and the family's own:
    `Gemma2Model` adds both soft-cappings and the window, `Gemma3Model` the final soft-capping,
    the window and the full-attention layers' rope base, `Phi3MiniModel` the original context
    and the window, 0 for none)."""
    from lorakit.models.families import family_of

    fam = family_of(config)
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one set per layer type; the file holds the global one
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    # llama.cpp otherwise assumes hidden_size / n_head per head (Gemma's converters always write it).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if fam.gguf_window_key:
        # gemma2/gemma3 slide on the pattern their graph fixes; phi3's converter writes 0 for none
        # (a phi3 with a window is refused: llama.cpp's phi3 graph does not slide).
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    if getattr(config, "original_max_position_embeddings", None):
        writer.add_rope_scaling_orig_ctx_len(int(config.original_max_position_embeddings))


def _pre_tokenizer_steps(tok: dict) -> list[dict]:
    pre = tok.get("pre_tokenizer")
    if pre is None:
        return []
    return list(pre["pretokenizers"]) if pre.get("type") == "Sequence" else [pre]


def infer_tokenizer_pre(tok: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, for the shapes we can recognise.

    llama.cpp names pre-tokenizers by hashing a test string's tokens; we match the structure of
    `pre_tokenizer` instead, for the shapes whose llama.cpp regex we know to be the same.
    """
    steps = _pre_tokenizer_steps(tok)
    kinds = [s.get("type") for s in steps]

    def byte_level(s, use_regex):
        return s.get("type") == "ByteLevel" and s.get("use_regex", True) == use_regex \
            and not s.get("add_prefix_space", False)

    if kinds == ["ByteLevel"] and byte_level(steps[0], True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1], True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False) \
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False) \
            and (steps[0].get("pattern") or {}).get("Regex") == _QWEN2_SPLIT:
        return "qwen2"
    raise ExportError(
        f"tokenizer: pre-tokenizer {kinds or 'none'} has no known llama.cpp name (recognised: a "
        "plain ByteLevel -> gpt-2, Digits + ByteLevel -> smollm, Llama 3's Split + ByteLevel -> "
        "llama-bpe, Qwen2's -> qwen2); pass the name llama.cpp uses with --tokenizer-pre")


def _is_sentencepiece_bpe(tok: dict) -> bool:
    """A SentencePiece vocabulary as transformers' tokenizer.json holds it (Gemma, Llama 2, Phi-3):
    BPE over `▁`-spelled text with byte fallback (`<0x41>` tokens) instead of byte-level BPE."""
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _adds_space_prefix(tok: dict) -> bool:
    """Whether the tokenizer puts a `▁` before the text (llama.cpp's `add_space_prefix`): a
    `Prepend` normalizer (Llama 2, Phi-3) or a `Metaspace` that prepends; Gemma's does neither."""
    norm = tok.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" for n in norms):
        return True
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
               for s in _pre_tokenizer_steps(tok))


def _vocab_by_id(tokenizer, vocab_size: int) -> dict[int, str]:
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size "
                          f"is {vocab_size} (expected every token id to have an embedding row)")
    return {i: t for t, i in vocab.items()}


def _write_special_ids(writer, tokenizer) -> None:
    """Special token ids, whether encoding adds BOS/EOS, and the chat template (`SpecialVocab`)."""
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    # Whether encoding adds BOS/EOS, read from what the tokenizer does rather than its config.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def sentencepiece_scores(tok: dict, by_id: dict[int, str], vocab_size: int) -> list[float]:
    """A score per token for llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`), which merges
    the adjacent pair whose joined text is the highest-scoring token: the token a merge makes
    scores minus that merge's rank, so llama.cpp merges in the tokenizer's merge order; a token no
    merge makes scores below every merge (single characters, bytes and specials never compete)."""
    merges = (tok.get("model") or {}).get("merges", [])
    scores = [-float(len(merges) + i) for i in range(vocab_size)]
    ids = {t: i for i, t in by_id.items()}
    seen = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = ids.get(left + right)
        if token_id is not None and token_id not in seen:
            seen.add(token_id)
            scores[token_id] = -float(rank)
    return scores


def write_sentencepiece_tokenizer(writer, tokenizer, tok: dict, vocab_size: int) -> None:
    """`tokenizer.ggml.*` for a SentencePiece vocabulary (`_set_vocab_sentencepiece`): model
    `llama`, each token with a score and a type (normal, unknown, control, user-defined, unused,
    byte), and `add_space_prefix` as the tokenizer does it."""
    import gguf

    by_id = _vocab_by_id(tokenizer, vocab_size)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")  # embedding rows past the tokenizer, as the converter names them
            types.append(gguf.TokenType.UNUSED)
        elif i == tokenizer.unk_token_id:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            types.append(gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(sentencepiece_scores(tok, by_id, vocab_size))
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tok))
    _write_special_ids(writer, tokenizer)


def write_tokenizer(writer, tokenizer, vocab_size: int, tokenizer_pre: str | None) -> None:
    """`tokenizer.ggml.*`: a byte-level BPE (`_set_vocab_gpt2` + `SpecialVocab`) or a SentencePiece
    vocabulary (`write_sentencepiece_tokenizer`), whichever the tokenizer is."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__}: expected a fast tokenizer "
                          "(tokenizer.json) to read the vocabulary and merges from")
    tok = json.loads(backend.to_str())
    model = tok.get("model") or {}
    decoder = tok.get("decoder") or {}
    if _is_sentencepiece_bpe(tok):
        write_sentencepiece_tokenizer(writer, tokenizer, tok, vocab_size)
        return
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ExportError(
            f"tokenizer: model {model.get('type')!r} with decoder {decoder.get('type')!r}; expected "
            "a byte-level BPE (GPT-2 style, as SmolLM2, Llama 3 and Qwen) or a SentencePiece BPE "
            "with byte fallback (Gemma, Llama 2, Phi-3)")
    pre = tokenizer_pre or infer_tokenizer_pre(tok)

    by_id = _vocab_by_id(tokenizer, vocab_size)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            # Embedding rows past the tokenizer: llama.cpp's converter names them [PAD<id>].
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _write_special_ids(writer, tokenizer)


def write_model_gguf(model, tokenizer, path: Path, outtype: str, name: str,
                     tokenizer_pre: str | None = None, progress: bool = False) -> int:
    """Write a (merged) model of an exported family and its tokenizer to `path`; return the tensor count."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch(config)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_hparams(writer, config)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)

    names = tensor_name_map(config)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        # llama.cpp reads a missing output.weight as tied to token_embd (the converter skips it).
        state.pop("lm_head.weight", None)
    with progress_bar(progress, f"encoding {len(state)} tensors ({outtype})", len(state)) as advance:
        for hf_name, tensor in state.items():
            gguf_name = gguf_tensor_name(names, hf_name)
            data = to_gguf_layout(hf_name, tensor.detach().to("cpu", torch.float32), config).numpy()
            encoded, raw_dtype = encode_tensor(gguf_name, data, outtype)
            writer.add_tensor(gguf_name, encoded, raw_dtype=raw_dtype)
            advance()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(state)
