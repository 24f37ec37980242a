"""The web UI: one static page (HTML, plain JavaScript, CSS; no build step, no CDN) over JSON
routes of our own, mounted on the serving app (`lorakit ui`, `lorakit serve --ui`).

`lorakit.ui.routes.mount_ui(app, service, runs_root)` adds the `/ui/api/...` routes and the page
itself; lorakit/ui/runs.py runs the training processes, lorakit/ui/roots.py keeps every path
inside the runs and adapters roots. Why a static page rather than Gradio: docs/ui.md.
"""
