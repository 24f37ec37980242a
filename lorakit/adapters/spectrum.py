"""`lorakit inspect`: the spectrum of what training changed, module by module, and what r it needed.

LoRA rests on the observation that fine-tuning updates have a low "intrinsic rank" (Hu et al.
2021, "LoRA", section 7: the subspace similarity of the learned updates; Aghajanyan et al. 2020,
"Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning"). This module
measures it on a trained adapter: for each adapted module the singular values of its update

    delta W = s * B A            (d_out x d_in, rank <= r; s = lora_alpha / r, or / sqrt(r))

and, for a full or freeze run, of delta W = W_ft - W. The energy of an update is the sum of its
squared singular values (its squared Frobenius norm); the rank at 90/95/99% is the fewest
singular values holding that share of it. The size of the update is its Frobenius norm against
the norm of the base weight W it is added to (needs the base).

The singular values of s B A come from two thin QR factorisations instead of a d_out x d_in SVD:
with B = Q_B R_B and A^T = Q_A R_A, s B A = Q_B (s R_B R_A^T) Q_A^T, and Q_B, Q_A have orthonormal
columns, so s B A has the singular values of the r x r matrix s R_B R_A^T (computed in float64).

The verdict is one line: "95% of the energy in 6 of 16 ranks in every module: r=8 would do",
rounding the largest rank at 95% up to a power of two.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from lorakit.errors import LorakitError

ENERGY_LEVELS = (0.90, 0.95, 0.99)
VERDICT_LEVEL = 0.95


def lora_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values (descending, float64) of scaling * B @ A, from the r x r core."""
    qa_r = torch.linalg.qr(A.double().T, mode="reduced").R  # (r, r): A^T = Q_A R_A
    qb_r = torch.linalg.qr(B.double(), mode="reduced").R  # (r, r): B = Q_B R_B
    return torch.linalg.svdvals(scaling * qb_r @ qa_r.T)


def dense_singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of a full update matrix."""
    return torch.linalg.svdvals(delta.double())


def energy_rank(sv: torch.Tensor, level: float) -> int:
    """The fewest leading singular values whose squares hold `level` of the total; 0 for a zero update."""
    energy = sv.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    share = torch.cumsum(energy, 0) / total
    # A share a rounding error short of the level counts as reaching it.
    return int(torch.searchsorted(share, torch.tensor(level - 1e-12, dtype=share.dtype))) + 1


def layer_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def layer_index(module: str) -> int | None:
    found = re.search(r"\.(\d+)\.", module)
    return int(found.group(1)) if found else None


def module_report(module: str, sv: torch.Tensor, rank: int, weight: torch.Tensor | None) -> dict:
    update_norm = float(torch.sqrt((sv ** 2).sum()))
    weight_norm = float(weight.double().norm()) if weight is not None else None
    out = {"module": module, "layer_type": layer_type(module), "rank": rank,
           "singular_values": [float(x) for x in sv],
           "update_norm": update_norm, "weight_norm": weight_norm,
           "relative_update": update_norm / weight_norm if weight_norm else None}
    for level in ENERGY_LEVELS:
        out[f"rank_{round(100 * level)}"] = energy_rank(sv, level)
    return out


def _power_of_two_at_least(k: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(k, 1))))


def verdict(modules: list[dict], kind: str) -> str:
    """The one-line answer: how much of the rank the update uses, and the r that would do."""
    key = f"rank_{round(100 * VERDICT_LEVEL)}"
    if not modules:
        return "no modules"
    if all(m["update_norm"] == 0 for m in modules):
        return "the update is zero in every module (untrained: B = 0)"
    need = max(m[key] for m in modules)
    have = max(m["rank"] for m in modules)
    suggest = _power_of_two_at_least(need)
    pct = round(100 * VERDICT_LEVEL)
    if kind != "lora":
        return (f"{pct}% of the update's energy in at most {need} of {have} ranks in every module: "
                f"a LoRA with r={suggest} would hold it")
    if suggest < have:
        return f"{pct}% of the energy in {need} of {have} ranks in every module: r={suggest} would do"
    return (f"{pct}% of the energy needs up to {need} of {have} ranks: the adapter uses its rank "
            "(a larger r may help while validation loss still falls)")


def by_type(modules: list[dict]) -> dict:
    """Per layer type: modules, the largest ranks at each level, the mean relative update."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for m in modules:
        groups[m["layer_type"]].append(m)
    out = {}
    for name, ms in sorted(groups.items()):
        rel = [m["relative_update"] for m in ms if m["relative_update"] is not None]
        out[name] = {"modules": len(ms), "rank": max(m["rank"] for m in ms),
                     **{f"max_rank_{round(100 * lv)}": max(m[f"rank_{round(100 * lv)}"] for m in ms)
                        for lv in ENERGY_LEVELS},
                     "mean_update_norm": sum(m["update_norm"] for m in ms) / len(ms),
                     "mean_relative_update": sum(rel) / len(rel) if rel else None}
    return out


def _weight_of(model, module: str) -> torch.Tensor | None:
    try:
        return model.get_submodule(module).weight.detach()
    except AttributeError:
        return None


def inspect_adapter(adapter_dir: str | Path, base_model=None) -> dict:
    """The spectrum report of a PEFT adapter directory (`base_model`: its base, for |W|)."""
    from lorakit.adapters.check import KEY_RE, read_adapter

    files = read_adapter(adapter_dir)
    cfg = files.config
    parts: dict[str, dict] = defaultdict(dict)
    for key, tensor in files.tensors.items():
        match = KEY_RE.match(key)
        if match and match.group("part"):
            parts[match.group("module")][match.group("part")] = tensor
    modules = []
    for module in sorted(parts, key=lambda m: (layer_type(m), layer_index(m) or 0, m)):
        A, B = parts[module]["lora_A"], parts[module]["lora_B"]
        sv = lora_singular_values(A, B, cfg.scaling_for(module))
        weight = _weight_of(base_model, module) if base_model is not None else None
        modules.append(module_report(module, sv, A.shape[0], weight))
    return {"kind": "lora", "path": str(adapter_dir), "r": cfg.r, "use_dora": bool(cfg.use_dora),
            "modules": modules, "by_type": by_type(modules), "verdict": verdict(modules, "lora")}


def inspect_full(model_dir: str | Path, tuned, base_model) -> dict:
    """The spectrum of W_ft - W for every 2-D linear weight a full or freeze run changed."""
    base_weights = {name: p for name, p in base_model.named_parameters()}
    modules = []
    for name, p in tuned.named_parameters():
        module = name.removesuffix(".weight")
        if p.dim() != 2 or not name.endswith(".weight") or name not in base_weights:
            continue
        if "embed" in name or "wte" in name or "lm_head" in name:  # lookups, not linear maps
            continue
        w = base_weights[name].detach().double()
        delta = p.detach().double() - w
        if not torch.any(delta):
            continue
        modules.append(module_report(module, dense_singular_values(delta), min(delta.shape), w))
    modules.sort(key=lambda m: (m["layer_type"], layer_index(m["module"]) or 0, m["module"]))
    return {"kind": "full", "path": str(model_dir), "r": None, "use_dora": False, "modules": modules,
            "by_type": by_type(modules), "verdict": verdict(modules, "full")}


def plot_spectra(report: dict, out_dir: str | Path) -> list[Path]:
    """One log-scale plot of singular values per layer type (a line per module, coloured by
    depth), written as out_dir/spectrum_<type>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = defaultdict(list)
    for m in report["modules"]:
        groups[m["layer_type"]].append(m)
    written = []
    what = "s·BA" if report["kind"] == "lora" else "W_ft − W"
    for name, ms in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        depths = [layer_index(m["module"]) or 0 for m in ms]
        top = max(depths) or 1
        for m, depth in zip(ms, depths):
            sv = [x for x in m["singular_values"] if x > 0]
            if sv:
                ax.plot(range(1, len(sv) + 1), sv, color=plt.cm.viridis(depth / top), lw=1, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        info = report["by_type"][name]
        ax.set_title(f"{name}: singular values of {what} ({info['modules']} modules; "
                     f"95% energy in <= {info['max_rank_95']})", fontsize=9)
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, top))
        fig.colorbar(sm, ax=ax, label="layer")
        fig.tight_layout()
        path = out / f"spectrum_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def is_adapter_dir(path: str | Path) -> bool:
    from lorakit.adapters.check import CONFIG_NAME

    return (Path(path) / CONFIG_NAME).is_file()


def inspect_path(path: str | Path, base_spec: str | None = None, device: str = "cpu") -> dict:
    """An adapter directory, or a full/freeze run's model directory (which needs `base_spec`)."""
    from lorakit.models import load_base

    path = Path(path)
    base = load_base(base_spec, dtype=torch.float32, device=device)[0] if base_spec else None
    if is_adapter_dir(path):
        return inspect_adapter(path, base)
    if (path / "config.json").is_file():
        if base is None:
            raise LorakitError(f"{path}: a whole model directory (a full or freeze run): pass --base "
                               "SPEC, the model it was trained from, to inspect W_ft - W")
        tuned, _ = load_base(str(path), dtype=torch.float32, device=device)
        return inspect_full(path, tuned, base)
    raise LorakitError(f"{path}: neither an adapter directory (adapter_config.json) nor a model "
                       "directory (config.json)")


def print_inspect(report: dict, console) -> None:
    from rich.table import Table

    what = "s*B@A" if report["kind"] == "lora" else "W_ft - W"
    table = Table(title=f"{report['path']}: singular values of {what}, by layer type", title_justify="left")
    for col in ("layer type", "modules", "rank", "90%", "95%", "99%", "|update|", "|update|/|W|"):
        table.add_column(col, justify="left" if col == "layer type" else "right")
    for name, t in report["by_type"].items():
        rel = t["mean_relative_update"]
        table.add_row(name, str(t["modules"]), str(t["rank"]), str(t["max_rank_90"]),
                      str(t["max_rank_95"]), str(t["max_rank_99"]), f"{t['mean_update_norm']:.4g}",
                      f"{rel:.4g}" if rel is not None else "(--base)")
    console.print(table)
    console.print("ranks at 90/95/99% of the energy: the largest over the modules of that type; "
                  "norms: Frobenius, mean over the modules", highlight=False)
    console.print(f"verdict: {report['verdict']}", highlight=False, soft_wrap=True)


def cmd_inspect(args) -> int:
    """Singular values of each module's update, the rank holding 90/95/99% of its energy, the
    update's norm against W's, a log-scale plot per layer type, and a one-line verdict."""
    import json

    from rich.console import Console

    report = inspect_path(args.adapter, args.base, device=args.device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_inspect(report, Console())
    if args.plot:
        for path in plot_spectra(report, args.plot):
            print(f"plot: {path}")
    return 0


def add_inspect_parser(sub) -> None:
    sp = sub.add_parser("inspect", help="the spectrum of an adapter's update and the rank it needs",
                        description=cmd_inspect.__doc__)
    sp.set_defaults(fn=cmd_inspect)
    sp.add_argument("adapter", help="adapter directory, or a full/freeze run's model directory")
    sp.add_argument("--base", help="the base model (bundled name, HF directory or .gguf): |W| and, "
                    "for a model directory, W_ft - W")
    sp.add_argument("--plot", metavar="DIR", help="write a log-scale plot per layer type into DIR")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true", help="the whole report, every module, as JSON")


def sweep_verdicts(rows: list[dict]) -> str:
    """The verdict of each finished LoRA trial of a sweep (its `output_dir`/adapter), as the
    Markdown section the sweep summary ends with; empty when no trial has an adapter folder."""
    lines = []
    for r in rows:
        adapter = Path(r.get("output_dir") or "") / "adapter"
        if r.get("method", "lora") != "lora" or not r.get("output_dir") or not is_adapter_dir(adapter):
            continue
        try:
            lines.append(f"- {r['id']} (r={r.get('r')}): {inspect_adapter(adapter)['verdict']}")
        except LorakitError as e:
            lines.append(f"- {r['id']}: not inspected ({e})")
    if not lines:
        return ""
    return "\n## Adapter spectra (lorakit inspect)\n\n" + "\n".join(lines) + "\n"
