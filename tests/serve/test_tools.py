"""Tool calling over HTTP with the official `openai` client: `tool_choice` required, named and
auto on the tiny model, arguments valid under each tool's schema, streamed calls equal to the
non-streamed ones, tool turns in the conversation, and malformed tools refused naming the field."""

import json

import pytest

from lorakit.serve.tools import CallStream, chat_template_args, parse_answer, scan_calls
from tests.serve.test_structured import assert_400_naming, client, server  # noqa: F401

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_item", "description": "Find a listing by words of its title.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 8}}, "required": ["query"],
            "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "make_offer", "description": "Offer a price for an item.",
        "parameters": {"type": "object", "properties": {
            "item_id": {"type": "integer", "minimum": 1, "maximum": 40},
            "price": {"type": "number", "minimum": 1, "maximum": 500}},
            "required": ["item_id", "price"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "check_availability"}},  # no parameters
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"})
           for t in TOOLS}
ASK = [{"role": "user", "content": "is this bike still available? can you do 50"}]


def _valid_calls(message) -> list:
    jsonschema = pytest.importorskip("jsonschema")
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(c.function.name, c.function.arguments) for c in message.tool_calls]


def test_required_always_yields_valid_calls(server):
    from concurrent.futures import ThreadPoolExecutor

    c = client(server[0].url)
    names = set()

    def ask(k):
        return c.chat.completions.create(
            model=["tiny-base", "ad0", "ad1"][k % 3], messages=ASK, tools=TOOLS,
            tool_choice="required", parallel_tool_calls=k % 2 == 0, max_tokens=150,
            temperature=1.0, seed=k)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(12)))
    for k, out in enumerate(answers):
        calls = _valid_calls(out.choices[0].message)
        if k % 2:
            assert len(calls) == 1 and out.choices[0].finish_reason == "tool_calls"
        names.update(n for n, _ in calls)
    assert len(names) >= 2  # the grammar lets every tool be chosen, not one forced name


def test_named_tool_choice_calls_that_tool(server):
    c = client(server[0].url)
    out = c.chat.completions.create(model="ad2", messages=ASK, tools=TOOLS, max_tokens=100,
                                    tool_choice={"type": "function",
                                                 "function": {"name": "make_offer"}})
    assert [n for n, _ in _valid_calls(out.choices[0].message)] == ["make_offer"]


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_streamed_tool_calls_reassemble_to_the_non_streamed_call(server, choice):
    c = client(server[0].url)
    kw = dict(model="ad1", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=150,
              temperature=0)
    whole = c.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in c.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reason = chunk.choices[0].finish_reason or reason
        for d in delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert slot["id"] is None and d.function.name  # the id and name come first, once
                slot["id"], slot["name"] = d.id, d.function.name
            slot["arguments"] += d.function.arguments or ""
    assert reason == whole.finish_reason
    if whole.message.tool_calls:
        assert [(s["name"], s["arguments"]) for _, s in sorted(calls.items())] == \
            [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
        assert not content
    else:
        assert not calls and content == whole.message.content


def test_auto_may_answer_in_text_and_none_never_calls(server):
    c = client(server[0].url)
    out = c.chat.completions.create(model="ad0", messages=ASK, tools=TOOLS, tool_choice="none",
                                    max_tokens=20, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    # auto: either text that does not start a call, or calls that validate
    for k in range(4):
        msg = c.chat.completions.create(model="tiny-base", messages=ASK, tools=TOOLS,
                                        max_tokens=60, temperature=1.0, seed=k).choices[0].message
        if msg.tool_calls:
            _valid_calls(msg)
        else:
            assert not msg.content.lstrip().startswith("<")


def test_tool_turns_in_the_conversation(server, tokenizer):
    c = client(server[0].url)
    args = json.dumps({"query": "bike"})
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "lookup_item", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"id": 3, "price": 80}'}]
    out = c.chat.completions.create(model="ad0", messages=history, tools=TOOLS, max_tokens=8,
                                    temperature=0, tool_choice="none")
    assert out.choices[0].finish_reason in ("stop", "length")
    messages, extra = chat_template_args(tokenizer, [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "lookup_item", "arguments": {"query": "bike"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "found"}], None)
    assert extra == {}
    assert messages[1]["content"] == ('<tool_call>\n{"name":"lookup_item","arguments":'
                                      '{"query":"bike"}}\n</tool_call>')
    assert messages[2] == {"role": "user", "content": "<tool_response>\nfound\n</tool_response>"}


def test_a_template_with_tools_renders_them_itself(tokenizer):
    from lorakit.serve.tools import Tool

    tokenizer.chat_template = ("{% if tools %}TOOLS:{{ tools | map(attribute='function.name') "
                               "| join(',') }}\n{% endif %}{% for m in messages %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tools = [Tool.model_validate(t) for t in TOOLS]
    messages, extra = chat_template_args(tokenizer, ASK, tools)
    assert messages == ASK
    text = tokenizer.apply_chat_template(messages, tokenize=False, **extra)
    assert text.startswith("TOOLS:lookup_item,make_offer,check_availability\n")


def test_scan_and_stream_read_calls_back():
    text = ('<tool_call>\n{"name":"lookup_item","arguments":{"query":"a}b"}}\n</tool_call>\n'
            '<tool_call>\n{"name":"make_offer","arguments":{"item_id":3,"price":5}}\n</tool_call>')
    content, calls = parse_answer(text)
    assert content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("lookup_item", '{"query":"a}b"}'), ("make_offer", '{"item_id":3,"price":5}')]
    stream, deltas = CallStream(), []
    for i in range(0, len(text), 3):
        deltas += stream.feed(text[i:i + 3])[1]
    args = {}
    for d in deltas:
        args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    assert args == {0: '{"query":"a}b"}', 1: '{"item_id":3,"price":5}'}
    assert [c.complete for c in scan_calls(text[:-20])] == [True, False]
    assert parse_answer("plain words") == ("plain words", [])


def test_malformed_tools_are_400_naming_the_field(server):
    fn = {"name": "f", "parameters": {"type": "object"}}
    assert_400_naming(server[0].url, [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": fn}, {"type": "function", "function": fn}]},
         "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "string"}}}]}, "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "retrieval", "function": fn}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": fn}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": fn}], "tool_choice": "sometimes"},
         "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ])
