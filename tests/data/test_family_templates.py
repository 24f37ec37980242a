"""Each family's own chat template decides rendering, loss masking and the serving prompt.

The templates below are the Jinja text of the families' `tokenizer_config.json` (Meta-Llama-3-8B-
Instruct, gemma-2-2b-it, gemma-3-1b-it, Qwen2.5-Instruct and Qwen3 without their tool branches,
Mistral-7B-Instruct-v0.2, Phi-3-mini-4k-instruct), written into the tiny tokenizer with each
family's special tokens. For a two-turn conversation exactly the assistant tokens and the family's end-of-turn token are
supervised, asserted token by token against the template's pieces tokenized one by one.
"""

import pytest

from lorakit.data.formats import Example
from lorakit.data.render import IGNORE, encode_example, encode_prompt
from lorakit.models.families import FAMILIES
from lorakit.serve.engine import end_of_turn_ids
from tests import tiny

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nyou are a helpful assistant<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen3: no default system turn; reasoning before </think> is dropped from assistant turns.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
# Gemma 3: Gemma 2's turns; a system message is folded into the first user turn.
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

Q1, A1 = "is this bike still available?", "the bike is available"
Q2, A2 = "what condition is the sofa in", "no scratches or stains"
MESSAGES = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]

# model_type -> (template, bos, eos, special tokens, the render as (text, supervised) pieces).
# eos is not the end-of-turn token where the real tokenizer's is not (Llama 3 base, Qwen base,
# Phi-3), so the family's own end-of-turn token must be what ends the answer.
CASES = {
    "llama": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>",
              ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              [("<|begin_of_text|>", 0), ("<|start_header_id|>", 0), ("user", 0),
               ("<|end_header_id|>", 0), ("\n\n", 0), (Q1, 0), ("<|eot_id|>", 0),
               ("<|start_header_id|>", 0), ("assistant", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
               (A1, 1), ("<|eot_id|>", 1),
               ("<|start_header_id|>", 0), ("user", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
               (Q2, 0), ("<|eot_id|>", 0),
               ("<|start_header_id|>", 0), ("assistant", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
               (A2, 1), ("<|eot_id|>", 1)]),
    "gemma2": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"],
               [("<bos>", 0), ("<start_of_turn>", 0), ("user\n" + Q1, 0), ("<end_of_turn>", 0),
                ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0), (A1, 1), ("<end_of_turn>", 1),
                ("\n", 0), ("<start_of_turn>", 0), ("user\n" + Q2, 0), ("<end_of_turn>", 0),
                ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0), (A2, 1), ("<end_of_turn>", 1),
                ("\n", 0)]),
    "qwen2": (QWEN, None, "<|endoftext|>", [],
              [("<|im_start|>", 0), ("system\nyou are a helpful assistant", 0), ("<|im_end|>", 0),
               ("\n", 0), ("<|im_start|>", 0), ("user\n" + Q1, 0), ("<|im_end|>", 0), ("\n", 0),
               ("<|im_start|>", 0), ("assistant\n", 0), (A1, 1), ("<|im_end|>", 1), ("\n", 0),
               ("<|im_start|>", 0), ("user\n" + Q2, 0), ("<|im_end|>", 0), ("\n", 0),
               ("<|im_start|>", 0), ("assistant\n", 0), (A2, 1), ("<|im_end|>", 1), ("\n", 0)]),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"],
                [("<s>", 0), ("[INST]", 0), (" " + Q1 + " ", 0), ("[/INST]", 0), (A1, 1),
                 ("</s>", 1), ("[INST]", 0), (" " + Q2 + " ", 0), ("[/INST]", 0), (A2, 1),
                 ("</s>", 1)]),
    "phi3": (PHI3, None, "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
             [("<|user|>", 0), ("\n" + Q1, 0), ("<|end|>", 0), ("\n", 0), ("<|assistant|>", 0),
              ("\n", 0), (A1, 1), ("<|end|>", 1), ("\n", 0), ("<|user|>", 0), ("\n" + Q2, 0),
              ("<|end|>", 0), ("\n", 0), ("<|assistant|>", 0), ("\n", 0), (A2, 1), ("<|end|>", 1),
              ("\n", 0), ("<|endoftext|>", 0)]),
}

# Qwen3: ChatML without Qwen2.5's default system turn; Gemma 3: Gemma 2's pieces.
CASES["qwen3"] = (QWEN3, None, "<|im_end|>", [], CASES["qwen2"][4][4:])
CASES["gemma3_text"] = (GEMMA3, *CASES["gemma2"][1:])


def test_every_family_with_a_chat_template_is_covered():
    assert set(CASES) == {t for t, f in FAMILIES.items() if f.end_of_turn}


def family_tokenizer(model_type: str):
    """The tiny BPE with the family's special tokens, bos/eos and chat template."""
    template, bos, eos, specials, _ = CASES[model_type]
    tok = tiny.tiny_tokenizer()
    extra = [t for t in [bos, eos, *specials] if t and t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    return tok


def pieces_ids(tok, pieces):
    ids, labels = [], []
    for text, supervised in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if supervised else [IGNORE] * len(part)
    return ids, labels


@pytest.mark.parametrize("model_type", list(CASES))
def test_exactly_the_answers_and_end_of_turn_are_supervised(model_type):
    tok = family_tokenizer(model_type)
    pieces = CASES[model_type][4]
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == "".join(t for t, _ in pieces)
    enc = encode_example(Example(tuple(MESSAGES), 1, "conv.jsonl"), tok, max_seq_len=512)
    want_ids, want_labels = pieces_ids(tok, pieces)
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels  # token by token
    eot = tok.convert_tokens_to_ids(FAMILIES[model_type].end_of_turn)
    assert [t for t in enc.labels if t != IGNORE].count(eot) == 2  # one per answer


@pytest.mark.parametrize("model_type", list(CASES))
def test_serving_prompt_and_stop_token_come_from_the_family(model_type):
    tok = family_tokenizer(model_type)
    pieces = CASES[model_type][4]
    # The prompt for the second answer: everything before it, generation prompt included.
    cut = max(i for i, (_, supervised) in enumerate(pieces) if supervised) - 1
    assert encode_prompt(MESSAGES[:3], tok) == pieces_ids(tok, pieces[:cut])[0]
    eot = tok.convert_tokens_to_ids(FAMILIES[model_type].end_of_turn)
    assert eot in end_of_turn_ids(None, tok)
