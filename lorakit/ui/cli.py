"""`lorakit ui`: the serving app with the web UI mounted, on port 7860 by default.

The same process as `lorakit serve --ui`: one base model loaded once, one engine (the Compare
screen's chats batch together with every other request), one API key. Runs started from the
page are stopped (Ctrl-C, resumable) when the server ends.
"""

from __future__ import annotations

import atexit


def ui_mount(runs_root: str):
    """The `mount` argument of lorakit.serve.app.serve that adds the UI over `runs_root`."""

    def mount(app, service) -> None:
        from lorakit.ui.routes import mount_ui

        runs = mount_ui(app, service, runs_root)
        atexit.register(runs.shutdown)
        print(f"web UI on /ui/ (runs: {runs.roots.runs}, adapters: {runs.roots.adapters})")

    return mount


def cmd_ui(args) -> int:
    """The web UI: runs, a new run, evaluation, compare and chat, adapters (docs/ui.md)."""
    from lorakit.serve.app import serve
    from lorakit.serve.config import load_serve_config

    overrides = list(args.overrides or [])
    overrides += [f"host={args.host}", f"port={args.port}"]
    if args.model:
        overrides.append(f"model={args.model}")
    if args.adapters:
        overrides.append(f"adapters_root={args.adapters}")
    return serve(load_serve_config(args.config, overrides), mount=ui_mount(args.runs))


def add_ui_parser(sub) -> None:
    """Add `ui [--host H] [--port P] [--runs DIR] [--model M] [--config serve.yaml] [k=v ...]`."""
    sp = sub.add_parser("ui", help="web UI for runs, evaluation, chat and adapters",
                        description=cmd_ui.__doc__)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=7860)
    sp.add_argument("--runs", default="runs", help="folder of training runs (default ./runs)")
    sp.add_argument("--adapters", default=None, help="adapters root (default: the serve config's)")
    sp.add_argument("--model", default=None, help="base model served for chat (default: the "
                    "serve config's)")
    sp.add_argument("--config", default=None, help="serve YAML (ServeConfig fields)")
    sp.add_argument("overrides", nargs="*", help="dotted serve overrides, e.g. limits.max_tokens=256")
    sp.set_defaults(fn=cmd_ui)
