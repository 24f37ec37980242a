"""`lorakit adapters add|list|remove`: the adapter registry from the command line.

Plain functions over `AdapterRegistry` (lorakit/serve/registry.py), plus `add_adapters_parser`
which puts the three subcommands under one `adapters` command of the main parser (litgpt style:
a table of subcommands to plain functions). The one adapter checker (`lorakit.adapters.check`,
the same the server and `generate`/`eval`/`merge` use) runs when an adapter is added: files
present, safetensors only, config, key names, shapes against the rank, no NaN/inf; `--base` also
loads the base model and checks the adapter fits it (weights hash, modules, shapes, targets).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorakit.adapters.check import AdapterFiles, BaseModules, open_adapter
from lorakit.errors import AdapterError
from lorakit.serve.registry import AdapterRecord, AdapterRegistry, check_name
from lorakit.units import human_bytes


def _check_against_base(path: Path, base: str) -> AdapterFiles:
    """Load `base` and check the adapter against it: refuses a wrong base (hash), modules it
    does not have, shapes that do not fit, targets without tensors."""
    import torch

    from lorakit.models import load_base

    model, _ = load_base(base, dtype=torch.float32, device="cpu")
    return open_adapter(path, BaseModules.of(model), allow_pissa=True)


def add_adapter(name: str, path: str | Path, replace: bool = False, base: str | None = None,
                eval_results: str | Path | None = None,
                registry: AdapterRegistry | None = None) -> AdapterRecord:
    """Check the adapter directory and register it under `name`.

    `eval_results` is a JSON file (e.g. what `lorakit eval` wrote) stored with the entry.
    """
    check_name(name)
    path = Path(path)
    files = open_adapter(path) if base is None else _check_against_base(path, base)
    results = None
    if eval_results is not None:
        try:
            results = json.loads(Path(eval_results).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"{eval_results}: cannot read evaluation results ({e})") from None
    registry = registry or AdapterRegistry()
    return registry.add(name, path, files, eval_results=results, replace=replace)


def list_adapters(registry: AdapterRegistry | None = None) -> list[AdapterRecord]:
    return (registry or AdapterRegistry()).list()


def remove_adapter(name: str, registry: AdapterRegistry | None = None) -> None:
    """Forget `name` (its files are left in place)."""
    if not (registry or AdapterRegistry()).remove(name):
        raise AdapterError(f"adapter {name!r} is not registered (see `lorakit adapters list`)")


def cmd_adapters_add(args: argparse.Namespace) -> int:
    """Register an adapter directory under a name (checked before it is recorded)."""
    rec = add_adapter(args.name, args.path, replace=args.replace, base=args.base,
                      eval_results=args.eval_results)
    print(f"registered {rec.name}: {rec.path} (r={rec.rank}, base={rec.base_model}, "
          f"{human_bytes(rec.size_bytes)})")
    return 0


# Columns of `adapters list`, in the order they are shown; DROPPED_FIRST says which go first when
# the table does not fit the terminal (name, base, r and size always stay).
LIST_COLUMNS = ("name", "base", "r", "targets", "size", "created", "eval", "pinned", "path")
DROPPED_FIRST = ("path", "created", "targets", "eval", "pinned")


def _list_cells(r: AdapterRecord) -> dict[str, str]:
    tm = r.target_modules  # a row that cannot be read back has None fields and an error
    targets = tm if isinstance(tm, str) else ",".join(map(str, tm)) if isinstance(tm, list) else "?"
    evals = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in (r.eval_results or {}).items()
                      if isinstance(v, (int, float, str))) or "-"
    return {"name": r.name, "base": str(r.base_model), "r": str(r.rank), "targets": targets,
            "size": "?" if r.size_bytes is None else human_bytes(r.size_bytes),
            "created": "?" if r.created is None else
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), "eval": evals,
            "pinned": "yes" if r.pinned else "", "path": str(r.path)}


def adapters_table(records: list[AdapterRecord], width: int):
    """(rich table, columns left out): every column when the table fits `width` unwrapped, else
    without the columns of DROPPED_FIRST, one by one, until it does."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    rows = [_list_cells(r) for r in records]
    measure = Console(width=1 << 16)
    shown, dropped = list(LIST_COLUMNS), []
    while True:
        table = Table(*shown)
        for column in table.columns:
            column.no_wrap, column.overflow = True, "ellipsis"
        for row in rows:
            table.add_row(*(row[c] for c in shown))
        wide = Measurement.get(measure, measure.options, table).maximum
        if wide <= width or len(dropped) == len(DROPPED_FIRST):
            return table, dropped
        dropped.append(DROPPED_FIRST[len(dropped)])
        shown.remove(dropped[-1])


def cmd_adapters_list(args: argparse.Namespace) -> int:
    """List registered adapters with their base, rank, targets, size and evaluation results
    (what fits the terminal; everything with --json)."""
    records = list_adapters()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    if not records:
        print("no adapters registered (add one with `lorakit adapters add NAME PATH`)")
        return 0
    from rich.console import Console

    console = Console()
    table, dropped = adapters_table(records, console.width)
    console.print(table)
    if dropped:
        console.print(f"not shown at this width: {', '.join(reversed(dropped))} "
                      "(every field: `lorakit adapters list --json`)")
    for r in records:
        if r.error:
            console.print(f"{r.name}: {r.error}", markup=False, highlight=False)
    return 0


def cmd_adapters_remove(args: argparse.Namespace) -> int:
    """Remove an adapter from the registry (its files stay where they are)."""
    remove_adapter(args.name)
    print(f"removed {args.name}")
    return 0


def add_adapters_parser(sub) -> None:
    """Add `adapters add|list|remove` to the main parser's subcommands (`sub`)."""
    sp = sub.add_parser("adapters", help="the adapter registry used by `lorakit serve`",
                        description=__doc__.split("\n")[0])
    actions = sp.add_subparsers(dest="adapters_command", required=True)
    add = actions.add_parser("add", help="register an adapter", description=cmd_adapters_add.__doc__)
    add.add_argument("name", help="name clients use in the `model` field ([A-Za-z0-9._-]+)")
    add.add_argument("path", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    add.add_argument("--replace", action="store_true", help="replace an entry of the same name")
    add.add_argument("--base", default=None, help="load this base model and check the adapter fits it")
    add.add_argument("--eval-results", default=None, help="JSON file of evaluation results to store")
    add.set_defaults(fn=cmd_adapters_add)
    ls = actions.add_parser("list", help="list adapters", description=cmd_adapters_list.__doc__)
    ls.add_argument("--json", action="store_true", help="every field of every adapter, as JSON")
    ls.set_defaults(fn=cmd_adapters_list)
    rm = actions.add_parser("remove", help="forget an adapter", description=cmd_adapters_remove.__doc__)
    rm.add_argument("name")
    rm.set_defaults(fn=cmd_adapters_remove)
