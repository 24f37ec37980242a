"""The marketplace agent's tools: what each one does, its JSON schema, and the guard before them.

A seller's assistant answers buyers' messages with four tools, in the function-calling shape of
OpenAI's API: `classify_intent` (the demo's intent adapter, served by `lorakit serve`, answering
one of its 7 labels under `guided_choice`), `lookup_item` and `check_availability` over an SQLite
catalog, and `make_offer` (the seller's price policy). `reply` ends the turn. The catalog is
built once from the shipped `catalog.json` into LORAKIT_HOME (lorakit/atomic.py writes it, so a
killed build leaves no half-made database), named by the JSON's hash so an edit rebuilds it.

The prompt-injection guard runs before any tool: patterns of the attacks the intent study names
(instructions to ignore, a system prompt asked for, role play, forged chat turns), and, when an
intent model is served, its "prompt injection" label. A refused message runs no tool at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from importlib import resources
from pathlib import Path

from lorakit.examples.intents import INSTRUCTION, LABELS

TOOLS = [
    {"type": "function", "function": {
        "name": "classify_intent",
        "description": "Classify the buyer's message into one marketplace intent.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "lookup_item",
        "description": "Find the seller's listing the buyer asks about, by words of its title.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "minLength": 2, "maxLength": 40}},
            "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "check_availability",
        "description": "Whether a listing is still available, and where to pick it up.",
        "parameters": {"type": "object", "properties": {
            "item_id": {"type": "integer", "minimum": 1, "maximum": 999}},
            "required": ["item_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "make_offer",
        "description": "Answer the buyer's price offer for a listing with the seller's policy.",
        "parameters": {"type": "object", "properties": {
            "item_id": {"type": "integer", "minimum": 1, "maximum": 999},
            "price": {"type": "integer", "minimum": 1, "maximum": 100000}},
            "required": ["item_id", "price"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "reply",
        "description": "Done: answer the buyer with what the tools found.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]

ACCEPT_AT = 0.9  # an offer of at least 90% of the asking price is accepted
COUNTER_AT = 0.7  # from 70%, the seller counters half way; below, declines


def catalog_rows() -> list[dict]:
    return json.loads(resources.files(__package__).joinpath("catalog.json").read_text("utf-8"))


def open_catalog(home: Path | None = None) -> sqlite3.Connection:
    """The catalog database, built from catalog.json on first use (atomically)."""
    from lorakit.atomic import atomic_file
    from lorakit.paths import lorakit_home

    raw = resources.files(__package__).joinpath("catalog.json").read_bytes()
    path = (home or lorakit_home()) / "agent" / f"catalog-{hashlib.sha256(raw).hexdigest()[:12]}.sqlite"
    if not path.exists():
        with atomic_file(path) as tmp:
            db = sqlite3.connect(tmp)
            db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, category TEXT, "
                       "price INTEGER, condition TEXT, status TEXT, pickup TEXT)")
            db.executemany("INSERT INTO items VALUES (:id, :title, :category, :price, :condition, "
                           ":status, :pickup)", json.loads(raw))
            db.commit()
            db.close()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1}


def lookup_item(db: sqlite3.Connection, query: str) -> dict:
    """The best-matching listings (words shared with the title and category), at most 3."""
    want = _words(query)
    scored = []
    for row in db.execute("SELECT * FROM items"):
        score = len(want & _words(f"{row['title']} {row['category']}"))
        if score:
            scored.append((-score, row["id"], dict(row)))
    scored.sort(key=lambda s: s[:2])
    items = [{k: r[k] for k in ("id", "title", "price", "condition")} for _, _, r in scored[:3]]
    return {"items": items} if items else {"items": [], "note": f"no listing matches {query!r}"}


def check_availability(db: sqlite3.Connection, item_id: int) -> dict:
    row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        return {"error": f"no listing {item_id}"}
    return {"item_id": item_id, "title": row["title"], "status": row["status"],
            "pickup": row["pickup"]}


def make_offer(db: sqlite3.Connection, item_id: int, price: int) -> dict:
    """The seller's policy: accept at 90% of the asking price or more, counter half way from 70%,
    decline below; a sold listing takes no offers, a reserved one takes them as a backup."""
    row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        return {"error": f"no listing {item_id}"}
    out = {"item_id": item_id, "title": row["title"], "asking": row["price"], "offered": price}
    if row["status"] == "sold":
        return {**out, "decision": "unavailable", "reason": "already sold"}
    if price >= ACCEPT_AT * row["price"]:
        decision = {"decision": "accepted"}
    elif price >= COUNTER_AT * row["price"]:
        decision = {"decision": "counter", "counter": round((price + row["price"]) / 2)}
    else:
        decision = {"decision": "declined", "lowest": round(COUNTER_AT * row["price"])}
    if row["status"] == "reserved":
        decision["note"] = "reserved for another buyer: kept as a backup offer"
    return {**out, **decision}


INJECTION = [re.compile(p, re.IGNORECASE) for p in (
    r"\bignore\b.{0,40}\b(instructions?|rules|prompt|messages?)\b",
    r"\b(disregard|forget|override)\b.{0,40}\b(instructions?|rules|prompt|guidelines)\b",
    r"\bsystem\s+prompt\b", r"\byou\s+are\s+now\b", r"\bpretend\s+(to\s+be|you)\b",
    r"\b(developer|admin|god|jailbreak)\s+mode\b", r"<\|?im_start\|?>|\[/?INST\]|^\s*system\s*:",
    r"\b(reveal|print|show|repeat)\b.{0,30}\b(instructions|prompt|api key|password)\b",
    r"\bact\s+as\b.{0,30}\b(unrestricted|assistant|admin|seller)\b",
    r"\blet'?s\s+play\s+a\s+game\b", r"\bnew\s+instructions?\b", r"\boverride\b",
    r"\byou'?re\s+not\b.{0,40}\banymore\b", r"\bno\s+restrictions\b",
)]


def classify_intent(client, model: str, message: str) -> str:
    """The served intent model's label for `message` (constrained to the 7 labels)."""
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"{INSTRUCTION}\n\n{message}"}],
        max_tokens=12, temperature=0, extra_body={"guided_choice": LABELS})
    return out.choices[0].message.content


def guard(message: str, client=None, intent_model: str | None = None) -> str | None:
    """Why `message` is refused as a prompt injection, or None: patterns first, then the served
    intent model when one is named."""
    for pattern in INJECTION:
        if pattern.search(message):
            return f"the message matches an injection pattern ({pattern.pattern[:40]}...)"
    if client is not None and intent_model is not None:
        if classify_intent(client, intent_model, message) == "prompt injection":
            return f"the intent model {intent_model} labels it a prompt injection"
    return None
