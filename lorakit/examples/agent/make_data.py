"""Training conversations for the tool-choice adapter: the agent's ideal tool sequence for
generated buyer messages, rendered exactly as `lorakit serve` renders them for a chat template
without tools (lorakit/serve/tools.py's fallback: the tools in the system message, calls as
`<tool_call>` blocks, results as `<tool_response>` turns).

The messages come from templates and the catalog, seeded with `random.Random` only; none of the
wordings of the 50 scripted tasks (tasks.jsonl) is used, and the test asserts no task message
appears here. Every assistant turn (each call) is supervised.

    python -m lorakit.examples.agent.make_data --out lorakit/examples/agent/toolchoice_train.jsonl --rows 400
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorakit.examples.agent.loop import SYSTEM
from lorakit.examples.agent.skills import (
    TOOLS, catalog_rows, check_availability, lookup_item, make_offer, open_catalog,
)

AVAILABLE = ["is the {name} still available", "hi! has the {name} sold yet?",
             "can i collect the {name} on saturday", "still selling the {name}?",
             "when could I pick up the {name}", "is your {name} still around"]
OFFER = ["would you let the {name} go for {price}", "{price} for the {name}?",
         "i can pay {price} cash for the {name}", "best i can do on the {name} is {price}",
         "will you accept {price} for your {name}", "offering {price} for the {name}, ok?"]
INFO = ["what shape is the {name} in", "any damage on the {name}?",
        "how heavy is the {name}", "tell me more about the {name}",
        "is the {name} from a smoke free home", "what are the dimensions of the {name}"]
OTHER = ["good morning", "do you ship abroad?", "what time is it", "you're a scammer",
         "cheers mate", "how do I reset my password", "can you recommend a good plumber"]
OPEN = ["", "", "hi, ", "hello! ", "hey there, ", "good evening. ", "morning, "]
CLOSE = ["", "", "?", " thanks", " cheers", ", ta", " :)"]
KINDS = ["availability", "offer", "info"] * 3 + ["other"]  # one message in ten has no listing
STOP = {"with", "and", "inch", "size", "two", "four", "three", "of", "the"}


def _name(rng: random.Random, title: str) -> str:
    words = [w for w in title.lower().split() if w not in STOP]
    n = rng.choice([1, 2]) if len(words) > 1 else 1
    start = rng.randrange(0, len(words) - n + 1)
    return " ".join(words[start:start + n])


def _call(name: str, args: dict) -> dict:
    return {"name": name, "arguments": args}


def conversation(rng: random.Random, db, kind: str) -> tuple[str, list[dict]]:
    """(buyer message, [(call, result)]) of the ideal sequence for one generated message."""
    item = rng.choice(catalog_rows())
    name = _name(rng, item["title"])
    wrap = rng.choice(OPEN) + "{}" + rng.choice(CLOSE)
    if kind == "other":
        return wrap.format(rng.choice(OTHER)), [(_call("classify_intent", {}),
                                                 {"intent": "irrelevant"})]
    price = max(1, round(item["price"] * rng.uniform(0.5, 1.0)))
    template = {"availability": AVAILABLE, "offer": OFFER, "info": INFO}[kind]
    message = wrap.format(rng.choice(template).format(name=name, price=price))
    intent = {"availability": "item availability", "offer": "price negotiation",
              "info": rng.choice(["item condition", "item aspects"])}[kind]
    found = lookup_item(db, name)
    steps = [(_call("classify_intent", {}), {"intent": intent}),
             (_call("lookup_item", {"query": name}), found)]
    top = found["items"][0]["id"] if found["items"] else item["id"]
    if kind == "availability":
        steps.append((_call("check_availability", {"item_id": top}), check_availability(db, top)))
    elif kind == "offer":
        steps.append((_call("make_offer", {"item_id": top, "price": price}),
                      make_offer(db, top, price)))
    return message, steps


def rows(n: int, seed: int = 0) -> list[dict]:
    from lorakit.serve.tools import Tool, call_block, fallback_messages

    rng = random.Random(seed)
    db = open_catalog()
    tools = [Tool.model_validate(t) for t in TOOLS]
    out = []
    for i in range(n):
        message, steps = conversation(rng, db, KINDS[i % len(KINDS)])
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
        for k, (call, result) in enumerate(steps):
            cid = f"call_{i}_{k}"
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": cid, "type": "function", "function": call}]})
            messages.append({"role": "tool", "tool_call_id": cid, "content": json.dumps(result)})
        rendered = fallback_messages(messages, tools)
        rendered.append({"role": "assistant", "content": call_block("reply", {})})
        out.append({"id": f"toolchoice-{i:04d}", "messages": rendered})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from lorakit.atomic import write_text

    write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows(args.rows, args.seed)))
    print(f"wrote {args.rows} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
