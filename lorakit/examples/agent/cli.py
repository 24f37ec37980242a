"""`lorakit agent MESSAGE`: the marketplace agent answering one buyer message through a running
`lorakit serve` (the `openai` client; the transcript and the final answer are printed)."""

from __future__ import annotations

import json
import os


def cmd_agent(args) -> int:
    """Answer a buyer's message with the marketplace agent against a running `lorakit serve`."""
    from openai import OpenAI

    from lorakit.examples.agent.loop import Agent

    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1",
                    api_key=os.environ.get("LORAKIT_API_KEY") or "none", max_retries=0,
                    timeout=args.timeout)
    model = args.model or client.models.list().data[0].id  # the base is listed first
    agent = Agent(client, model, intent_model=args.intent_model, max_steps=args.max_steps)
    t = agent.run(args.message)
    if t.refused:
        print(f"guard: refused ({t.refused}); no tool ran")
    for c in t.calls:
        print(f"-> {c['name']}({json.dumps(c['arguments'])})")
        if c["result"] is not None:
            print(f"   {json.dumps(c['result'])}")
    print(f"answer: {t.answer}")
    return 0


def add_agent_parser(sub) -> None:
    sp = sub.add_parser("agent", help="the marketplace agent against lorakit serve",
                        description=cmd_agent.__doc__)
    sp.add_argument("message", help="the buyer's message")
    sp.add_argument("--base-url", default="http://127.0.0.1:8000",
                    help="the server (default http://127.0.0.1:8000); key from LORAKIT_API_KEY")
    sp.add_argument("--model", default=None,
                    help="the model choosing tools: the base or a tool-choice adapter (default: the base)")
    sp.add_argument("--intent-model", default=None,
                    help="the served intent adapter for classify_intent and the guard (default: --model)")
    sp.add_argument("--max-steps", type=int, default=6)
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    sp.set_defaults(fn=cmd_agent)
