"""The marketplace agent (lorakit/examples/agent/): its catalog and price policy, the guard, the
loop against a live tiny server through the `openai` client, scoring, and the adapter's data."""

import json

import pytest

from lorakit.examples.agent.loop import Agent, final_answer, load_tasks, score, summarize
from lorakit.examples.agent.skills import (
    TOOL_NAMES, TOOLS, check_availability, guard, lookup_item, make_offer, open_catalog,
)


@pytest.fixture
def db(tmp_path):
    return open_catalog(tmp_path)


def test_catalog_is_built_once_and_the_policy_holds(tmp_path, db):
    files = list((tmp_path / "agent").iterdir())
    assert len(files) == 1 and files[0].name.startswith("catalog-")  # no temporaries left
    assert open_catalog(tmp_path).execute("SELECT COUNT(*) FROM items").fetchone()[0] == 20
    assert lookup_item(db, "the trek bike")["items"][0]["id"] == 1
    assert lookup_item(db, "a hovercraft")["items"] == []
    assert check_availability(db, 5)["status"] == "sold" and "error" in check_availability(db, 99)
    assert make_offer(db, 1, 290)["decision"] == "accepted"  # 290 >= 0.9 * 320
    assert make_offer(db, 1, 240) == {"item_id": 1, "title": "Trek FX 2 hybrid bike",
                                      "asking": 320, "offered": 240, "decision": "counter",
                                      "counter": 280}
    assert make_offer(db, 1, 100)["decision"] == "declined"
    assert make_offer(db, 5, 500)["decision"] == "unavailable"
    assert "backup" in make_offer(db, 2, 640)["note"]  # reserved


def test_the_50_tasks_and_the_guard():
    tasks = load_tasks()
    assert len(tasks) == 50 and len({t["message"] for t in tasks}) == 50
    assert sum(bool(t.get("injection")) for t in tasks) == 10
    for t in tasks:
        assert bool(guard(t["message"])) == bool(t.get("injection")), t["message"]
        assert set(t["tools"]) <= set(TOOL_NAMES)


def test_scoring_counts_steps_and_expected_calls():
    task = {"tools": ["classify_intent", "lookup_item", "make_offer"], "expect": [
        {"name": "lookup_item", "found": 1}, {"name": "make_offer",
                                              "arguments": {"item_id": 1, "price": 280}}]}
    from lorakit.examples.agent.loop import Transcript

    good = Transcript("m", calls=[
        {"name": "classify_intent", "arguments": {}, "result": {"intent": "price negotiation"}},
        {"name": "lookup_item", "arguments": {"query": "trek"}, "result": {"items": [{"id": 1}]}},
        {"name": "make_offer", "arguments": {"item_id": 1, "price": 280}, "result": {}},
        {"name": "reply", "arguments": {}, "result": None}])
    assert score(task, good) == {"steps": 4, "correct_steps": 4, "success": True, "refused": False}
    wrong = Transcript("m", calls=good.calls[:2] + [
        {"name": "check_availability", "arguments": {"item_id": 1}, "result": {}}])
    assert score(task, wrong) == {"steps": 4, "correct_steps": 2, "success": False,
                                  "refused": False}
    refused = score({"injection": True}, Transcript("m", refused="pattern"))
    assert refused["success"] and summarize([score(task, good), refused]) == {
        "tasks": 2, "tool_choice_accuracy": 1.0, "task_success": 1.0,
        "injections_refused": 1, "injections": 1}



def test_final_answer_states_what_the_tools_found(db):
    calls = [{"name": "lookup_item", "arguments": {}, "result": lookup_item(db, "trek")},
             {"name": "make_offer", "arguments": {}, "result": make_offer(db, 1, 240)}]
    assert final_answer(calls) == "Trek FX 2 hybrid bike is 320; I can do 280."
    assert final_answer(calls[:1]) == "Trek FX 2 hybrid bike: 320, condition good."
    assert final_answer([{"name": "check_availability", "arguments": {},
                          "result": check_availability(db, 3)}]) == \
        "Kids balance bike is available; pickup in Portobello."


def test_agent_against_a_live_tiny_server(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from openai import OpenAI

    from lorakit.serve.app import ServerThread, create_app
    from tests.serve.builders import http_service
    from tests.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    model.config.max_position_embeddings = 4096  # room for the tools block (rotary positions)
    service = http_service(model, tiny_tokenizer(), tmp_path, adapters=1, max_tokens=120,
                           max_prompt_tokens=3500)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    tasks = {t["kind"]: t for t in load_tasks() if t["kind"] in ("offer", "other", "injection")}
    with ServerThread(create_app(service)) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        agent = Agent(client, "ad0", intent_model="tiny-base", max_steps=2,
                      catalog=open_catalog(tmp_path))
        for kind, task in tasks.items():
            t = agent.run(task["message"])
            if kind == "injection":
                assert t.refused and t.calls == [] and t.answer.startswith("I can only help")
                continue
            assert not t.refused and 1 <= t.steps <= 2 and t.answer
            for call in t.calls:
                jsonschema.validate(call["arguments"], schemas[call["name"]])
                if call["name"] == "classify_intent":
                    from lorakit.examples.intents import LABELS

                    assert call["result"]["intent"] in LABELS
            s = score(task, t)
            assert 0 <= s["correct_steps"] <= s["steps"]
        # `lorakit agent` prints the calls and the answer (or the guard's refusal)
        from lorakit.cli import main

        assert main(["agent", tasks["injection"]["message"], "--base-url", srv.url,
                     "--model", "ad0"]) == 0
        assert main(["agent", tasks["offer"]["message"], "--base-url", srv.url, "--model", "ad0",
                     "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("guard: refused") and printed[1].startswith("answer: I can only")
    assert printed[2].startswith("-> ") and printed[-1].startswith("answer: ")


def test_toolchoice_data_is_the_served_rendering_and_not_the_tasks():
    from lorakit.examples.agent.make_data import rows

    data = rows(40, seed=1)
    messages = {t["message"] for t in load_tasks()}
    for row in data:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and "<tools>" in row["messages"][0]["content"]
        assert row["messages"][1]["content"] not in messages
        calls = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert calls[0].startswith('<tool_call>\n{"name":"classify_intent"')
        assert calls[-1] == '<tool_call>\n{"name":"reply","arguments":{}}\n</tool_call>'
        for c in calls:
            json.loads(c.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    shipped = [json.loads(line) for line in open(
        __import__("lorakit.examples.agent", fromlist=["x"]).__path__[0]
        + "/toolchoice_train.jsonl")]
    assert shipped[:40] == rows(40, seed=0)  # the shipped file is the generator's output
