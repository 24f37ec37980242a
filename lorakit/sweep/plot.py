"""Plots and a summary table from a sweep's results.jsonl alone (matplotlib, Agg backend).

`plot_results(results_path, out_dir)` writes

- `loss_curves.png`: training loss against step (log x), one colour per rank (or per method for
  full / freeze trials); each rank's best trial (lowest final validation loss) drawn solid and
  labelled with its learning rate (and target modules, when the sweep varies them), the rank's
  other trials faint.
- `val_loss_vs_lr.png`: final validation loss against learning rate (log x), one line per rank
  (and per target-module setting when the sweep varies it).
- `target_modules.png`: final validation loss of attention-only, MLP-only, all-linear (or any
  other target-module settings) as bars, at the rank and learning rate where the most settings
  were tried; each bar is annotated with its trainable parameter count.
- `summary.md`: every successful trial sorted by final validation loss (best first), then the
  ones the Ray backend's ASHA scheduler stopped early, then the failed ones with their errors.

A plot without the data it needs (no validation loss, a single learning rate, a single
target-module setting) is skipped with a printed note; only summary.md is always written.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.sweep.results import read_results

ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def target_label(target_modules) -> str:
    """attention-only, MLP-only, all-linear, or the names joined with commas."""
    if target_modules is None:
        return "-"
    if isinstance(target_modules, str):
        return target_modules
    names = set(target_modules)
    if names == ATTENTION:
        return "attention-only"
    if names == MLP:
        return "MLP-only"
    return ",".join(target_modules)


def rank_label(row: dict) -> str:
    if row.get("method", "lora") == "lora":
        return f"r={row['r']}"
    if row["method"] == "freeze":
        return f"freeze ({row.get('layers_to_train')} blocks)"
    return row["method"]


def _sort_key(row: dict):
    val, train = row.get("final_val_loss"), row.get("final_train_loss")
    return (val is None, val if val is not None else 0.0, train is None, train or 0.0)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)  # Agg, with no pyplot state and no display
    return fig, fig.add_subplot()


def _save_lines(fig, ax, path: Path) -> None:
    """The line plots' common finish: grid, legend, layout, PNG."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _log_x(ax) -> None:
    """Log x axis labelled with plain numbers (1, 2, 5, 10, ... or 0.001, 0.002, 0.005, ...)."""
    from matplotlib.ticker import FuncFormatter

    def minor(x, _):
        return f"{x:g}" if f"{x:.0e}"[0] in "25" else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by rank label, ranks in numeric order, then the full / freeze methods."""
    groups = defaultdict(list)
    for row in rows:
        groups[rank_label(row)].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[1][0].get("r") is None,
                                                        kv[1][0].get("r") or 0, kv[0])))


def plot_loss_curves(rows: list[dict], path: Path) -> str | None:
    rows = [r for r in rows if r.get("loss_curve")]
    if not rows:
        return "no training loss curves"
    several_targets = len({target_label(r.get("target_modules")) for r in rows}) > 1
    fig, ax = _figure()
    for k, (label, group) in enumerate(_groups(rows).items()):
        colour = f"C{k % 10}"
        best = min(group, key=_sort_key)
        for row in group:
            steps = [s for s, loss in row["loss_curve"] if loss is not None]
            losses = [loss for _, loss in row["loss_curve"] if loss is not None]
            if row is best:
                what = f"lr {row['lr']:g}" + (f", {target_label(row.get('target_modules'))}"
                                              if several_targets else "")
                ax.plot(steps, losses, color=colour, lw=1.6, label=f"{label} (best: {what})")
            else:
                ax.plot(steps, losses, color=colour, lw=0.8, alpha=0.3)
    _log_x(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per step: each rank's best trial solid, its others faint", fontsize=10)
    _save_lines(fig, ax, path)
    return None


def plot_val_vs_lr(rows: list[dict], path: Path) -> str | None:
    rows = [r for r in rows if r.get("final_val_loss") is not None]
    if not rows:
        return "no validation losses (set data.validation or data.val_fraction)"
    several_targets = len({target_label(r.get("target_modules")) for r in rows}) > 1
    lines: dict[tuple, dict] = defaultdict(dict)  # (rank order, label) -> {lr: val loss}
    for row in sorted(rows, key=_sort_key):
        label = rank_label(row)
        if several_targets and row.get("method", "lora") == "lora":
            label += f", {target_label(row['target_modules'])}"
        key = (row.get("r") is None, row.get("r") or 0, label)
        lines[key].setdefault(row["lr"], row["final_val_loss"])  # the best of repeated settings
    if not any(len(points) > 1 for points in lines.values()):
        return "every setting was tried at a single learning rate"
    fig, ax = _figure()
    for k, key in enumerate(sorted(lines)):
        lrs = sorted(lines[key])
        ax.plot(lrs, [lines[key][lr] for lr in lrs], marker="o", color=f"C{k % 10}", label=key[2])
    _log_x(ax)
    tried = sorted({lr for points in lines.values() for lr in points})
    ax.set_xticks(tried, [f"{lr:g}" for lr in tried])  # label exactly the rates tried
    ax.set_xticks([], minor=True)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("Final validation loss against learning rate")
    _save_lines(fig, ax, path)
    return None


def plot_target_modules(rows: list[dict], path: Path) -> str | None:
    rows = [r for r in rows if r.get("final_val_loss") is not None and r.get("method", "lora") == "lora"]
    settings = defaultdict(dict)  # (r, lr) -> target label -> best row
    for row in sorted(rows, key=_sort_key):
        settings[(row["r"], row["lr"])].setdefault(target_label(row["target_modules"]), row)
    if not settings or max(len(v) for v in settings.values()) < 2:
        return "a single target-module setting"
    (r, lr), bars = max(settings.items(), key=lambda kv: len(kv[1]))
    order = sorted(bars, key=lambda t: (["attention-only", "MLP-only", "all-linear"] + [t]).index(t))
    fig, ax = _figure()
    values = [bars[t]["final_val_loss"] for t in order]
    drawn = ax.bar(order, values, color=[f"C{k % 10}" for k in range(len(order))])
    for bar, t in zip(drawn, order):
        ax.annotate(f"{bars[t]['trainable_params']:,} params", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Which layers to adapt (r={r}, lr {lr:g})")
    ax.set_ylim(0, max(values) * 1.15)
    fig.tight_layout()
    fig.savefig(path)
    return None


def _num(x, fmt="{:.4f}") -> str:
    return "" if x is None else fmt.format(x)


def summary_markdown(rows: list[dict], results_path: str) -> str:
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=_sort_key)
    stopped = sorted((r for r in rows if r.get("status") == "stopped"), key=_sort_key)
    failed = [r for r in rows if r.get("status") not in ("ok", "stopped")]
    early = f", {len(stopped)} stopped early" if stopped else ""
    lines = ["# Sweep summary", "", f"{len(rows)} trials from `{results_path}`: {len(ok)} finished"
             f"{early}, {len(failed)} failed. Sorted by final validation loss, best first.", "",
             "| # | trial | method | r | alpha | lr | target modules | final val loss | best val loss "
             "| final train loss | steps | trainable params | seconds |",
             "|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in enumerate(ok, 1):
        lines.append(f"| {k} | {r['id']} | {r['method']} | {_num(r.get('r'), '{}')} | "
                     f"{_num(r.get('lora_alpha'), '{:g}')} | {r['lr']:g} | "
                     f"{target_label(r.get('target_modules'))} | {_num(r.get('final_val_loss'))} | "
                     f"{_num(r.get('best_val_loss'))} | {_num(r.get('final_train_loss'))} | "
                     f"{r['steps']} | {r['trainable_params']:,} | {r['seconds']:.0f} |")
    if stopped:
        lines += ["", "## Stopped early (ASHA)", ""]
        lines += [f"- {r['id']} ({', '.join(f'{k}={v}' for k, v in r['params'].items())}): "
                  f"stopped at step {r.get('steps')}, validation loss {_num(r.get('final_val_loss'))}"
                  for r in stopped]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {r['id']} ({', '.join(f'{k}={v}' for k, v in r['params'].items())}): "
                  f"{r.get('error', '').replace('|', '/')}" for r in failed]
    return "\n".join(lines) + "\n"


def plot_results(results_path: str | Path, out_dir: str | Path | None = None,
                 console=None) -> dict[str, Path]:
    """Write the plots and summary.md into `out_dir` (default: `plots/` beside results.jsonl).

    Returns {name: path} of what was written; skipped plots are printed with the reason.
    """
    results_path = Path(results_path)
    if not results_path.is_file():
        raise LorakitError(f"{results_path}: no such results file (expected a sweep's results.jsonl)")
    rows = read_results(results_path)
    out = Path(out_dir) if out_dir is not None else results_path.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else print
    ok = [r for r in rows if r.get("status") == "ok"]
    written = {}
    for name, fn in (("loss_curves.png", plot_loss_curves), ("val_loss_vs_lr.png", plot_val_vs_lr),
                     ("target_modules.png", plot_target_modules)):
        skipped = fn(ok, out / name)
        if skipped:
            say(f"{name} skipped: {skipped}")
        else:
            written[name] = out / name
    from lorakit.adapters.spectrum import sweep_verdicts  # each trial's rank verdict

    (out / "summary.md").write_text(summary_markdown(rows, str(results_path)) + sweep_verdicts(ok))
    written["summary.md"] = out / "summary.md"
    return written
