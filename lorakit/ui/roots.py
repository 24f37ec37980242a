"""The two folders the web UI may touch, and the one check every path from the page goes through.

A path from the page is taken relative to the runs root (or the adapters root), resolved with
symlinks followed, and refused with a 400 unless it stays inside one of the two roots: `..`,
absolute paths outside them and symlinks pointing out all get the same clear error. Nothing the
page sends is opened before it passes `Roots.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.serve.protocol import ApiError


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class Roots:
    runs: Path
    adapters: Path

    @classmethod
    def of(cls, runs: str | Path, adapters: str | Path) -> Roots:
        runs, adapters = Path(runs).resolve(), Path(adapters).resolve()
        runs.mkdir(parents=True, exist_ok=True)
        adapters.mkdir(parents=True, exist_ok=True)
        return cls(runs, adapters)

    def resolve(self, text: object, what: str, base: Path | None = None) -> Path:
        """`text` (relative to `base`, default the runs root; or absolute) as a resolved path
        inside the runs or adapters root, else ApiError 400 naming `what` and the roots."""
        if not isinstance(text, str) or not text.strip() or "\x00" in text:
            raise ApiError(400, f"{what}: expected a path inside the runs folder ({self.runs}) "
                           f"or the adapters folder ({self.adapters})", param=what)
        path = Path(text.strip()).expanduser()
        full = (path if path.is_absolute() else (base or self.runs) / path).resolve()
        if not (_inside(full, self.runs) or _inside(full, self.adapters)):
            raise ApiError(400, f"{what}: {text!r} is outside the runs folder ({self.runs}) and "
                           f"the adapters folder ({self.adapters}); the UI reads and writes only "
                           "inside them", param=what, code="path_outside_roots")
        return full

    def run_dir(self, name: object) -> Path:
        """The folder of run `name`: one plain folder name directly under the runs root."""
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
                or "\\" in name or name.startswith("."):
            raise ApiError(400, f"run name {name!r}: expected a folder name under the runs "
                           f"folder ({self.runs}), without '/' or a leading '.'", param="name")
        path = (self.runs / name).resolve()
        if path.parent != self.runs:
            raise ApiError(400, f"run name {name!r}: resolves outside the runs folder "
                           f"({self.runs})", param="name", code="path_outside_roots")
        return path

    def relative(self, path: Path) -> str:
        """`path` as the page names it: relative to the runs root, else to the adapters root."""
        for root in (self.runs, self.adapters):
            if _inside(path, root):
                return str(path.relative_to(root)) if path != root else "."
        return str(path)
