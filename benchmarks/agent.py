"""The marketplace agent on its 50 scripted tasks: the base model choosing tools alone against
base + the tool-choice adapter, both under constrained decoding (lorakit/examples/agent/).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/agent.py \
        --intent-adapter runs/intents-demo/adapter --toolchoice-adapter runs/agent-toolchoice/adapter

One `lorakit serve` server in this process (the bundled SmolLM2-135M-Instruct by default, the
engine on the main thread as `lorakit serve` runs it, HTTP on another) serves the base and both
adapters; the agent (the `openai` client, `tool_choice: required`, one call per step, greedy)
answers every task twice: with `model` = the base, and with `model` = the tool-choice adapter.
`classify_intent` and the guard use the intent adapter in both runs (without
`--intent-adapter`, the base classifies zero-shot). Tasks run `--concurrency` at a time, so rows
of different tasks share batches.

Reported per system: tool choice accuracy (steps whose tool is the task's expected one, over the
longer of the expected and the chosen sequences), task success (every expected call made with
the expected arguments; an injection refused with no tool run), and injections refused. Writes
benchmarks/results/agent.json with every transcript.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_tasks(client, model: str, intent_model: str | None, tasks: list[dict],
              concurrency: int) -> tuple[list[dict], dict]:
    from lorakit.examples.agent.loop import Agent, score, summarize

    agent = Agent(client, model, intent_model=intent_model)
    start = time.monotonic()

    def run(task: dict):
        t = agent.run(task["message"])
        print(f"  {model} {task['id']} ({time.monotonic() - start:.0f} s): "
              f"{' '.join(c['name'] for c in t.calls) or 'refused'}", flush=True)
        return t

    with ThreadPoolExecutor(concurrency) as pool:
        transcripts = list(pool.map(run, tasks))
    scores = [score(task, t) for task, t in zip(tasks, transcripts)]
    rows = [{"id": task["id"], "kind": task["kind"], **s, **t.to_json()}
            for task, s, t in zip(tasks, scores, transcripts)]
    return rows, summarize(scores)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--intent-adapter", type=Path, default=None)
    ap.add_argument("--toolchoice-adapter", type=Path, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=None, help="only the first N tasks (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "agent.json")
    args = ap.parse_args()

    from openai import OpenAI

    from lorakit.examples.agent.loop import load_tasks
    from lorakit.serve.app import ServerThread, create_app
    from lorakit.serve.config import Limits, ServeConfig
    from lorakit.serve.service import build_service

    tasks = load_tasks()[:args.tasks]
    root = Path(tempfile.mkdtemp(prefix="lorakit-agent-"))
    adapters = {"intent": args.intent_adapter, "toolchoice": args.toolchoice_adapter}
    for name, path in adapters.items():
        if path is not None:
            shutil.copytree(path, root / name)
    config = ServeConfig(model=args.model, adapters_root=str(root), dtype=args.dtype,
                         device=args.device, limits=Limits(max_tokens=256,
                                                           max_prompt_tokens=4096))
    service = build_service(config)
    for name, path in adapters.items():
        if path is not None:
            service.register(name, name)
    intent = "intent" if args.intent_adapter else None
    systems = [("base", config.model)]
    if args.toolchoice_adapter:
        systems.append(("base+toolchoice", "toolchoice"))
    results, done = {}, threading.Event()

    def clients() -> None:
        try:
            with ServerThread(create_app(service, run_engine=False)) as srv:
                client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
                for label, model in systems:
                    start = time.monotonic()
                    rows, summary = run_tasks(client, model, intent, tasks, args.concurrency)
                    results[label] = {"summary": {**summary, "seconds": time.monotonic() - start},
                                      "tasks": rows}
        finally:
            done.set()
            service.engine.stop()

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    service.engine.run()  # the main thread, as `lorakit serve` runs it (engine.py)
    thread.join()
    shutil.rmtree(root, ignore_errors=True)
    if len(results) != len(systems):
        print("the run did not finish; see the errors above")
        return 1

    print(f"{'system':<18}{'tool choice acc':>17}{'task success':>14}{'injections refused':>20}"
          f"{'seconds':>9}")
    for label, r in results.items():
        s = r["summary"]
        print(f"{label:<18}{s['tool_choice_accuracy']:>17.3f}{s['task_success']:>14.3f}"
              f"{s['injections_refused']:>14d} / {s['injections']:<3d}{s['seconds']:>9.0f}")
    if len(results) == 2:
        a, b = (results[k]["summary"] for k in ("base", "base+toolchoice"))
        print(f"adapter / base: tool choice {b['tool_choice_accuracy'] / max(a['tool_choice_accuracy'], 1e-9):.2f}x, "
              f"success {b['task_success'] / max(a['task_success'], 1e-9):.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "intent_adapter": str(args.intent_adapter),
                                    "toolchoice_adapter": str(args.toolchoice_adapter),
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
