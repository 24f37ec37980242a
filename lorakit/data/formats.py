"""Training and evaluation rows: JSONL, JSON or CSV files in Alpaca, chat or prompt/completion shape.

Every row becomes an `Example`: a conversation whose last message is the assistant's answer.
The shapes are the ones the field uses: Alpaca (Taori et al. 2023: `instruction`, optional
`input`, `output`, optional `system`), chat (OpenAI/ChatML `messages` of `{role, content}`,
multi-turn), ShareGPT (`conversations` of `{from, value}` with `human`/`gpt` turns and an optional
top-level `system`, as Axolotl's `sharegpt` and LLaMA-Factory's `formatting: sharegpt` read it), and
`prompt`/`completion`. Every bad row is collected and reported at once with its
file and line; extra keys such as ids are allowed (datasets carry them) and ignored.

Files are UTF-8 text (RFC 8259 requires it of JSON exchanged between systems); a byte-order mark
(UTF-8, UTF-16 or UTF-32, as Excel and Windows tools write) says the encoding and is honoured.
Anything else (binary data, another 8-bit encoding, UTF-16 without a mark, a lone surrogate
escape such as `"\ud800"`, JSON nested deeper than the parser's stack) is a DataError naming the
file and line and what was expected, never a traceback.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError

ROLES = ("system", "user", "assistant")
SHAPES = "Alpaca (instruction, output), chat (messages), ShareGPT (conversations) or prompt/completion"
# ShareGPT's `from` values (FastChat's dump, LLaMA-Factory's default tags) and the role each is.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
MAX_SHOWN = 10  # bad rows listed in full; the rest are counted
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


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
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    return None


def _string_problem(what: str, value) -> str | None:
    """Why `value` is not usable text for `what`, or None."""
    if not isinstance(value, str):
        return f"{what} is {type(value).__name__} (expected a string)"
    bad = _SURROGATE.search(value)
    if bad:
        return (f"{what} holds a lone surrogate escape \\u{ord(bad.group()):04x} at character "
                f"{bad.start()} (expected valid Unicode text: surrogates come in pairs)")
    return None


def _text(row: dict, key: str, problems: list[str], required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            problems.append(f"missing field {key!r}")
        return None
    value = row[key]
    problem = _string_problem(f"field {key!r}", value)
    if problem:
        problems.append(problem)
        return None
    return value


def _sharegpt_messages(row: dict) -> tuple[list[dict] | None, list[str]]:
    """A ShareGPT row's turns as chat messages (top-level `system` first), or the problems."""
    raw = row["conversations"]
    if not isinstance(raw, list) or not raw:
        return None, ["field 'conversations' must be a non-empty list of {from, value}"]
    problems: list[str] = []
    system = _text(row, "system", problems, required=False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            problems.append(f"conversations[{i}] is {type(turn).__name__} (expected an object "
                            "with from, value)")
            continue
        who = turn.get("from")
        role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            problems.append(f"conversations[{i}].from {_short(who)} (expected one of "
                            f"{', '.join(SHAREGPT_ROLES)})")
        problem = _string_problem(f"conversations[{i}].value", turn.get("value"))
        if problem:
            problems.append(problem)
        messages.append({"role": role, "content": turn.get("value")})
    return (None, problems) if problems else (messages, [])


def row_to_messages(row, system_prompt: str | None = None) -> tuple[list[dict] | None, list[str]]:
    """(messages, problems) for one parsed row; messages is None when the row is bad."""
    if not isinstance(row, dict):
        return None, [f"row is {type(row).__name__} (expected an object)"]
    problems: list[str] = []
    shape = _shape(row)
    messages: list[dict] = []
    if shape is None:
        return None, [f"no known fields (expected {SHAPES} fields)"]
    if shape == "sharegpt":  # checked as the chat messages it stands for
        converted, problems = _sharegpt_messages(row)
        if converted is None:
            return None, problems
        row, shape = {"messages": converted}, "chat"
    if shape == "chat":
        raw = row["messages"]
        if not isinstance(raw, list) or not raw:
            return None, ["field 'messages' must be a non-empty list of {role, content}"]
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                problems.append(f"messages[{i}] is {type(m).__name__} (expected an object)")
                continue
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or role not in ROLES:
                problems.append(f"messages[{i}].role {_short(role)} (expected one of {', '.join(ROLES)})")
            problem = _string_problem(f"messages[{i}].content", content)
            if problem:
                problems.append(problem)
            messages.append({"role": role, "content": content})
        if not problems:
            if "user" not in [m["role"] for m in messages]:
                problems.append("no user message (expected a user turn before the answer)")
            elif messages[-1]["role"] != "assistant":
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


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _line_of(data: bytes | str, index: int) -> int:
    return data[:index].count(b"\n" if isinstance(data, bytes) else "\n") + 1


def _utf16_without_bom(data: bytes) -> str | None:
    """"LE"/"BE" when the first bytes look like UTF-16 text with no byte-order mark."""
    head = data[:512]
    even, odd = head[0::2], head[1::2]
    if len(head) >= 4 and odd.count(0) >= 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
        return "LE"
    if len(head) >= 4 and even.count(0) >= 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "BE"
    return None


def read_text(path: Path) -> str:
    """The file's text: UTF-8, or the encoding its byte-order mark names; a DataError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\0" in data:
        order = _utf16_without_bom(data)
        if order:
            raise DataError(f"{path}: looks like UTF-16-{order} text without a byte-order mark "
                            "(expected UTF-8, or UTF-16 starting with a byte-order mark)")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_line_of(data, e.start)}: not {encoding.upper().replace('-SIG', '')} "
                        f"text (byte 0x{data[e.start]:02x} at offset {e.start}; expected UTF-8 text, "
                        "or UTF-16 with a byte-order mark)") from None
    if encoding == "utf-8-sig" or text.startswith("\ufeff"):
        text = text.removeprefix("\ufeff")
    nul = text.find("\0")
    if nul >= 0:
        raise DataError(f"{path}:{_line_of(text, nul)}: a NUL character: this looks like a binary "
                        "file (expected UTF-8 text: JSONL, JSON or CSV)")
    return text


def _parse_json(text: str) -> tuple[object, str | None, int]:
    """(value, None, 0) or (None, what is wrong with the text as JSON, the line it is on)."""
    try:
        return json.loads(text), None, 0
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg}; column {e.colno})", e.lineno
    except RecursionError:
        return None, "JSON nested too deeply (expected rows a few levels deep)", 1
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        return None, f"not valid JSON ({e})", 1


def _read_rows(path: Path) -> tuple[list[tuple[int, object]], list[str], str]:
    """((line, parsed row) pairs, parse problems as 'file:line: ...', what a line is called)."""
    text = read_text(path)
    suffix = path.suffix.lower()
    rows, problems = [], []
    if suffix == ".json":
        data, problem, line = _parse_json(text)
        if problem:
            raise DataError(f"{path}:{line}: {problem}")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return list(enumerate(data, start=1)), problems, "row"
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        try:
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items()
                                               if isinstance(k, str) and v not in ("", None)}))
        except csv.Error as e:
            problems.append(f"{path}:{reader.line_num + 1}: not valid CSV ({e})")
        return rows, problems, "line"
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row, problem, _ = _parse_json(line)
        if problem:
            problems.append(f"{path}:{n}: {problem}")
        else:
            rows.append((n, row))
    return rows, problems, "line"


def load_examples(path: str | Path, system_prompt: str | None = None) -> list[Example]:
    """Every row of a .jsonl, .json or .csv file as an `Example`; one DataError lists all bad rows."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder (expected a .jsonl, .json or .csv data file)")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown data format {path.suffix!r} (expected .jsonl, .json or .csv)")
    rows, problems, unit = _read_rows(path)
    unknown = [row for _, row in rows if isinstance(row, dict) and _shape(row) is None]
    if rows and len(unknown) == len(rows) and not problems:
        keys = ", ".join(map(str, list(unknown[0])[:8])) or "none"
        raise DataError(f"{path}: none of its {len(rows)} rows has a known shape (expected {SHAPES} "
                        f"fields; the first row's keys: {keys})")
    examples = []
    bad_rows = len(problems)  # lines that are not JSON
    for n, row in rows:
        messages, row_problems = row_to_messages(row, system_prompt)
        where = f"{path}:{n}" if unit == "line" else f"{path}: row {n}"
        problems += [f"{where}: {p}" for p in row_problems]
        bad_rows += bool(row_problems)
        if messages is not None:
            examples.append(Example(tuple(messages), n, str(path), messages[-1]["content"].strip()))
    if problems:
        shown = problems[:MAX_SHOWN]
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise DataError(f"{path}: {bad_rows} bad row(s):\n  " + "\n  ".join(shown) + more)
    if not examples:
        raise DataError(f"{path}: no rows (expected rows with {SHAPES} fields)")
    return examples
