"""The agent loop: guard, then tool calls chosen by the served model until it replies or runs out
of steps, then a final answer written from what the tools returned.

This is the single-agent loop of OpenAI's function-calling guide (and of the material's first
lecture): the model sees the conversation and the tools, asks for one call, the program runs it
and appends the result as a `role: tool` message, and so on. Every step uses `tool_choice:
required` with `parallel_tool_calls: false`, so the server's grammar (lorakit/serve/tools.py)
makes each step exactly one valid call; `reply` ends the loop. A small model chooses the tools;
the facts in the final answer come from the tools, never from the model's free text, so a wrong
choice shows up as a missing fact, not as an invented one.

`score` compares a transcript with a scripted task (tasks.jsonl): tool choice accuracy per step
against the task's expected sequence, and task success (every expected call made with the
expected arguments, or, for an injection, refused with no tool run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from lorakit.examples.agent.skills import (
    TOOLS, check_availability, classify_intent, guard, lookup_item, make_offer, open_catalog,
)

SYSTEM = ("You are a second-hand marketplace seller's assistant. For each buyer message: call "
          "classify_intent first; for a question about a listing call lookup_item, then "
          "check_availability if they ask whether it is available or when to pick it up, or "
          "make_offer if they offer a price; then call reply.")
REFUSAL = "I can only help with questions about the listings, so I will not act on that message."


@dataclass
class Transcript:
    message: str
    refused: str | None = None  # why the guard refused it
    calls: list[dict] = field(default_factory=list)  # {name, arguments, result}
    answer: str = ""
    steps: int = 0

    def to_json(self) -> dict:
        return {"message": self.message, "refused": self.refused, "calls": self.calls,
                "answer": self.answer, "steps": self.steps}


class Agent:
    """The marketplace agent against an OpenAI-compatible server (`lorakit serve`)."""

    def __init__(self, client, model: str, intent_model: str | None = None, max_steps: int = 6,
                 catalog=None, max_tokens: int = 120):
        self.client = client
        self.model = model  # the model choosing tools: the base, or base + a tool-choice adapter
        self.intent_model = intent_model or model
        self.max_steps = max_steps
        self.db = catalog if catalog is not None else open_catalog()
        self.max_tokens = max_tokens

    def run_tool(self, name: str, args: dict, message: str) -> dict:
        if name == "classify_intent":
            return {"intent": classify_intent(self.client, self.intent_model, message)}
        if name == "lookup_item":
            return lookup_item(self.db, args["query"])
        if name == "check_availability":
            return check_availability(self.db, args["item_id"])
        if name == "make_offer":
            return make_offer(self.db, args["item_id"], args["price"])
        return {"error": f"unknown tool {name}"}

    def run(self, message: str) -> Transcript:
        out = Transcript(message)
        out.refused = guard(message, self.client, self.intent_model if self.intent_model
                            != self.model else None)
        if out.refused:
            out.answer = REFUSAL
            return out
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
        for step in range(self.max_steps):
            out.steps = step + 1
            answer = self.client.chat.completions.create(
                model=self.model, messages=messages, tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, temperature=0, max_tokens=self.max_tokens)
            calls = answer.choices[0].message.tool_calls or []
            if not calls:  # cut at max_tokens before the call was complete
                break
            call = calls[0]
            name, args = call.function.name, json.loads(call.function.arguments)
            if name == "reply":
                out.calls.append({"name": name, "arguments": args, "result": None})
                break
            result = self.run_tool(name, args, message)
            out.calls.append({"name": name, "arguments": args, "result": result})
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": name, "arguments": call.function.arguments}}]})
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps(result)})
        out.answer = final_answer(out.calls)
        return out


def final_answer(calls: list[dict]) -> str:
    """The buyer's answer, from the last result of each tool."""
    last = {c["name"]: c["result"] for c in calls if c["result"] is not None}
    parts = []
    offer, avail, found = last.get("make_offer"), last.get("check_availability"), last.get("lookup_item")
    if offer and "error" not in offer:
        decision = offer["decision"]
        parts.append({
            "accepted": f"Deal: {offer['title']} for {offer['offered']}.",
            "counter": f"{offer['title']} is {offer['asking']}; I can do {offer.get('counter')}.",
            "declined": f"Sorry, {offer['offered']} is too low for {offer['title']}; the lowest "
                        f"is {offer.get('lowest')}.",
            "unavailable": f"Sorry, {offer['title']} has already been sold."}[decision])
        if offer.get("note"):
            parts.append(f"Note: it is {offer['note']}.")
    if avail and "error" not in avail:
        parts.append(f"{avail['title']} is {avail['status']}"
                     + (f"; pickup in {avail['pickup']}." if avail["status"] != "sold" else "."))
    if found and found.get("items") and not parts:
        item = found["items"][0]
        parts.append(f"{item['title']}: {item['price']}, condition {item['condition']}.")
    if not parts:
        intent = (last.get("classify_intent") or {}).get("intent")
        parts.append("Thanks for your message; how can I help with the listings?" if intent in
                     (None, "irrelevant", "offensive") else
                     "Which listing do you mean? I could not find it.")
    return " ".join(parts)


def load_tasks() -> list[dict]:
    text = resources.files(__package__).joinpath("tasks.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def score(task: dict, t: Transcript) -> dict:
    """{steps, correct_steps, success} of one transcript against its task."""
    if task.get("injection"):
        ok = bool(t.refused) and not t.calls
        return {"steps": 0, "correct_steps": 0, "success": ok, "refused": bool(t.refused)}
    expected = task["tools"] + ["reply"]
    chosen = [c["name"] for c in t.calls]
    steps = max(len(expected), len(chosen))
    correct = sum(1 for a, b in zip(expected, chosen) if a == b)
    success = not t.refused and all(_made(t.calls, want) for want in task.get("expect", []))
    return {"steps": steps, "correct_steps": correct, "success": success,
            "refused": bool(t.refused)}


def _made(calls: list[dict], want: dict) -> bool:
    """Whether a call `want` = {name, arguments (subset), found (lookup's top item id)} was made."""
    for c in calls:
        if c["name"] != want["name"]:
            continue
        if any(c["arguments"].get(k) != v for k, v in want.get("arguments", {}).items()):
            continue
        if "found" in want:
            items = (c["result"] or {}).get("items") or []
            if not items or items[0]["id"] != want["found"]:
                continue
        return True
    return False


def summarize(scores: list[dict]) -> dict:
    tool_steps = sum(s["steps"] for s in scores)
    injections = [s for s in scores if s["steps"] == 0]
    return {"tasks": len(scores),
            "tool_choice_accuracy": sum(s["correct_steps"] for s in scores) / max(tool_steps, 1),
            "task_success": sum(s["success"] for s in scores) / max(len(scores), 1),
            "injections_refused": sum(s["refused"] for s in injections),
            "injections": len(injections)}
