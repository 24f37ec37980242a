"""Training and evaluation rows: JSONL, JSON or CSV files in Alpaca, chat or prompt/completion shape.

Every row becomes an `Example`: a conversation whose last message is the assistant's answer.
The shapes are the ones the field uses: Alpaca (Taori et al. 2023: `instruction`, optional
`input`, `output`, optional `system`), chat (OpenAI/ChatML `messages` of `{role, content}`,
multi-turn), and `prompt`/`completion`. Every bad row is collected and reported at once with its
file and line; extra keys such as ids are allowed (datasets carry them) and ignored.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_SHOWN = 50


@dataclass(frozen=True)
class Example:
    """One conversation; the last message is the assistant answer that is learned or scored."""

    messages: tuple[dict, ...]
    line: int
    source: str
    label: str | None = None  # the final answer's text, used by classification tasks


def _shape(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    return None


def _text(row: dict, key: str, problems: list[str], required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            problems.append(f"missing field {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.append(f"field {key!r} is {type(value).__name__} (expected a string)")
        return None
    return value


def row_to_messages(row, system_prompt: str | None = None) -> tuple[list[dict] | None, list[str]]:
    """(messages, problems) for one parsed row; messages is None when the row is bad."""
    if not isinstance(row, dict):
        return None, [f"row is {type(row).__name__} (expected an object)"]
    problems: list[str] = []
    shape = _shape(row)
    messages: list[dict] = []
    if shape is None:
        return None, ["no known fields (expected instruction/output, messages, or prompt/completion)"]
    if shape == "chat":
        raw = row["messages"]
        if not isinstance(raw, list) or not raw:
            return None, ["field 'messages' must be a non-empty list of {role, content}"]
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                problems.append(f"messages[{i}] is {type(m).__name__} (expected an object)")
                continue
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                problems.append(f"messages[{i}].role {role!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                problems.append(f"messages[{i}].content is {type(content).__name__} (expected a string)")
            messages.append({"role": role, "content": content})
        if not problems:
            if messages[-1]["role"] != "assistant":
                problems.append("last message is not from the assistant (expected the answer last)")
            elif not messages[-1]["content"].strip():
                problems.append("empty answer (last assistant message)")
            if system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
    elif shape == "alpaca":
        instruction = _text(row, "instruction", problems)
        inp = _text(row, "input", problems, required=False)
        output = _text(row, "output", problems)
        system = _text(row, "system", problems, required=False) or system_prompt
        if instruction is not None and not instruction.strip():
            problems.append("empty field 'instruction'")
        if output is not None and not output.strip():
            problems.append("empty answer (field 'output')")
        if not problems:
            user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        prompt = _text(row, "prompt", problems)
        completion = _text(row, "completion", problems)
        if completion is not None and not completion.strip():
            problems.append("empty answer (field 'completion')")
        if not problems:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return (None, problems) if problems else (messages, [])


def _read_rows(path: Path) -> tuple[list[tuple[int, object]], list[str], str]:
    """((line, parsed row) pairs, parse problems as 'file:line: ...', what a line is called)."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    rows, problems = [], []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return list(enumerate(data, start=1)), problems, "row"
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        for row in reader:
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None and v != ""}))
        return rows, problems, "line"
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
    return rows, problems, "line"


def load_examples(path: str | Path, system_prompt: str | None = None) -> list[Example]:
    """Every row of a .jsonl, .json or .csv file as an `Example`; one DataError lists all bad rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown data format {path.suffix!r} (expected .jsonl, .json or .csv)")
    rows, problems, unit = _read_rows(path)
    examples = []
    for n, row in rows:
        messages, row_problems = row_to_messages(row, system_prompt)
        where = f"{path}:{n}" if unit == "line" else f"{path}: row {n}"
        problems += [f"{where}: {p}" for p in row_problems]
        if messages is not None:
            examples.append(Example(tuple(messages), n, str(path), messages[-1]["content"].strip()))
    if problems:
        shown = problems[:MAX_SHOWN]
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise DataError(f"{path}: {len(problems)} bad row(s):\n  " + "\n  ".join(shown) + more)
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples
