"""The marketplace agent: adapters as an agent's skills (docs/agent.md).

`skills.py` holds the tools (intent classifier served as an adapter, an SQLite catalog, a price
policy) and the prompt-injection guard, `loop.py` the agent loop and its scoring, `tasks.jsonl`
the 50 scripted tasks, `make_data.py` and `toolchoice.yaml` the tool-choice adapter's data and
training config, `cli.py` the `lorakit agent` command.
"""
