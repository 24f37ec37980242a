"""Combine several LoRA adapters of one base into one adapter (`lorakit combine`).

Follows PEFT's `LoraModel.add_weighted_adapter` (peft/tuners/lora/model.py) and the merge rules of
`peft/utils/merge_utils.py`, written here from the papers' definitions:

- linear: task arithmetic, `sum_i w_i delta_i` (Ilharco et al. 2023).
- ties: keep each update's `density` largest-magnitude entries, elect a sign per entry ("total":
  sign of the sum; "frequency": sign of the count), average the weighted entries that agree with
  it (Yadav et al. 2023, TIES-Merging).
- dare_linear / dare_ties: keep each entry with probability `density` and rescale by 1/density,
  then linear / ties (Yu et al. 2024, DARE).
- magnitude_prune: the ties trim, then the weighted sum.
- cat: the adapters side by side, rank = sum of ranks; exact.

Every method but `cat` works on full updates `delta_i = scaling_i * B_i A_i` in fp32 and brings the
result back to rank R by truncated SVD, as PEFT's `*_svd` combination types do: `B = U_R S_R`,
`A = V_R^T` (PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`). R defaults to the largest
input rank (PEFT's default); the summary reports the relative Frobenius error of that truncation,
and `--rank` at the sum of the input ranks makes `linear` exact. The output is written with
`lora_alpha = r` and no rsLoRA, so its scaling is 1 whatever the inputs used.

DARE draws its masks from one `torch.Generator` seeded with `seed`, module by module in sorted
module-name order, adapter by adapter in the order given, one Bernoulli draw per update, in the
base weight's layout (transposed for Conv1D), as PEFT draws from the global RNG in model order.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.io import (
    CONFIG_NAME, HASH_KEY, NAME_KEY, AdapterFiles, read_adapter, write_adapter_files,
)
from lorakit.errors import AdapterError, ConfigError, MergeError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import PEFT_PREFIX

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")
_TRIMMED = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}  # need a density
_SIGN_ELECTED = {"ties", "dare_ties"}
_RANDOM = {"dare_linear", "dare_ties"}
COMBINE_KEY = "lorakit.combine"  # safetensors metadata: how the adapter was made


@dataclass
class CombineResult:
    out: Path
    method: str
    modules: int
    rank: int
    max_rel_error: float | None  # SVD methods: worst relative Frobenius error of the rank-R cut
    worst_module: str | None


# ---- per-module math (peft/utils/merge_utils.py semantics) -------------------------------------

def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude (TIES trim)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * keep.reshape(delta.shape)


def random_keep(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale by 1/density (DARE)."""
    if density >= 1:
        return delta  # nothing dropped and nothing drawn, as in PEFT
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """(n, ...) bool: where each update's sign agrees with the elected sign (zeros never do)."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return sign == elected


def combine_deltas(method: str, deltas: list[torch.Tensor], weights: torch.Tensor,
                   density: float | None = None, majority_sign_method: str = "total",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One module's combined update from the adapters' full updates (all the same shape)."""
    if method in ("ties", "magnitude_prune"):
        deltas = [keep_largest(d, density) for d in deltas]
    elif method in _RANDOM:
        deltas = [random_keep(d, density, generator) for d in deltas]
    stacked = torch.stack(deltas, dim=0)  # (n, d_out, d_in)
    weighted = stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1)))
    if method not in _SIGN_ELECTED:
        return weighted.sum(dim=0)
    # The sign is elected from the unweighted updates; the kept weighted entries are averaged.
    agree = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error): the best rank-`rank` `B @ A` of `delta` (d_out, d_in), fp32.

    B = U_R S_R (d_out, R), A = V_R^T (R, d_in), as PEFT. When R exceeds min(d_out, d_in) the
    extra rank is zero. The error ||delta - B A||_F / ||delta||_F comes from the dropped singular
    values (Eckart-Young).
    """
    d_out, d_in = delta.shape
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    k = min(rank, s.numel())
    b = delta.new_zeros(d_out, rank)
    a = delta.new_zeros(rank, d_in)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    total = s.square().sum()
    rel = math.sqrt(float(s[k:].square().sum() / total)) if total > 0 else 0.0
    return a, b, rel


def cat_factors(a_list: list[torch.Tensor], b_list: list[torch.Tensor], coeffs: list[float],
                rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stacked on rows, coeff_i * B_i on columns, zero-padded to `rank`: B A = sum c_i B_i A_i."""
    a = torch.cat(a_list, dim=0)  # (sum r_i, d_in)
    b = torch.cat([c * b_i for c, b_i in zip(coeffs, b_list)], dim=1)  # (d_out, sum r_i)
    pad = rank - a.shape[0]
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a, b


# ---- options and inputs ------------------------------------------------------------------------

def check_options(method: str, n_adapters: int, weights: list[float], density: float | None,
                  rank: int | None, majority_sign_method: str | None, seed: int | None) -> None:
    """Every problem with the options at once, as one ConfigError."""
    problems = []
    if method not in METHODS:
        problems.append(f"--method: got {method!r} (expected one of {', '.join(METHODS)})")
    if n_adapters < 1:
        problems.append("--adapters: none given (expected one or more adapter directories)")
    if len(weights) != n_adapters:
        problems.append(f"--weights: got {len(weights)} value(s) for {n_adapters} adapter(s) "
                        "(expected one weight per adapter, in the same order)")
    if not all(math.isfinite(w) for w in weights):
        problems.append(f"--weights: got {weights} (expected finite numbers)")
    if method in _TRIMMED:
        if density is None:
            problems.append(f"--density: required by {method} (the fraction of each update kept, "
                            "0 < density <= 1)")
        elif not 0 < density <= 1:
            problems.append(f"--density: got {density} (expected 0 < density <= 1)")
    elif density is not None:
        problems.append(f"--density: {method} keeps every entry (expected no --density; it is for "
                        "ties, dare_linear, dare_ties and magnitude_prune)")
    if method == "cat" and rank is not None:
        problems.append("--rank: cat's rank is the sum of the input ranks (expected no --rank)")
    elif rank is not None and (not isinstance(rank, int) or rank < 1):
        problems.append(f"--rank: got {rank!r} (expected an integer >= 1)")
    if majority_sign_method is not None:
        if method not in _SIGN_ELECTED:
            problems.append(f"--majority-sign-method: {method} elects no sign (expected it only "
                            "with ties or dare_ties)")
        elif majority_sign_method not in ("total", "frequency"):
            problems.append(f"--majority-sign-method: got {majority_sign_method!r} "
                            "(expected total or frequency)")
    if seed is not None and method not in _RANDOM:
        problems.append(f"--seed: {method} draws nothing at random (expected it only with "
                        "dare_linear or dare_ties)")
    if problems:
        raise ConfigError("combine: bad options:\n  " + "\n  ".join(problems))


def _describe_base(files: AdapterFiles) -> str:
    sha = files.base_weights_sha256
    return f"{files.base_model!r}" + (f" (weights {sha[:12]})" if sha else "")


def _same_base(x: AdapterFiles, y: AdapterFiles) -> bool:
    """The weights hash decides when both carry one; else the base name when both carry one."""
    if x.base_weights_sha256 and y.base_weights_sha256:
        return x.base_weights_sha256 == y.base_weights_sha256
    if x.base_model and y.base_model:
        return x.base_model == y.base_model
    return True


def _shapes(files: AdapterFiles) -> dict[str, tuple[int, int]]:
    """module -> (d_out, d_in) of its update."""
    return {m: (files.tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"].shape[0],
                files.tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"].shape[1]) for m in files.modules()}


def check_compatible(inputs: list[AdapterFiles]) -> None:
    """Same base, same modules with the same shapes, same layout, plain-LoRA initialisation."""
    for f in inputs:
        if f.config.use_dora:
            raise AdapterError(
                f"{f.path / CONFIG_NAME}: use_dora is true; DoRA adapters cannot be combined (a "
                "combination of their magnitude vectors is not defined). Merge it into its base instead")
        if f.config.init_lora_weights is not True:
            raise AdapterError(
                f"{f.path / CONFIG_NAME}: init_lora_weights is {f.config.init_lora_weights!r}; such "
                "an adapter is relative to PiSSA's residual base, not the base, so it cannot be "
                "combined (convert it to a plain LoRA first)")
    first = inputs[0]
    for i, x in enumerate(inputs):
        for y in inputs[i + 1:]:
            if not _same_base(x, y):
                raise AdapterError(
                    f"{y.path}: trained on base {_describe_base(y)}, but {x.path} on "
                    f"{_describe_base(x)}; only adapters of the same base can be combined")
    shapes0 = _shapes(first)
    for f in inputs[1:]:
        shapes = _shapes(f)
        only_first = sorted(set(shapes0) - set(shapes))
        only_this = sorted(set(shapes) - set(shapes0))
        if only_first or only_this:
            missing = (f"has no module {only_first[0]} (which {first.path} adapts)" if only_first
                       else f"adapts module {only_this[0]} (which {first.path} does not)")
            raise AdapterError(f"{f.path}: {missing}; combined adapters must adapt the same modules")
        for module in sorted(shapes):
            if shapes[module] != shapes0[module]:
                raise AdapterError(
                    f"{f.path}: module {module} has an update of shape {shapes[module]} (d_out, "
                    f"d_in) but {shapes0[module]} in {first.path}; are they for the same base?")
        if f.config.fan_in_fan_out != first.config.fan_in_fan_out:
            raise AdapterError(f"{f.path}: fan_in_fan_out is {f.config.fan_in_fan_out} but "
                               f"{first.config.fan_in_fan_out} in {first.path}")


# ---- writing -----------------------------------------------------------------------------------

@contextmanager
def _module_progress(enabled: bool, description: str, total: int):
    """A transient rich bar over modules; yields a callable that advances it (no-op when off)."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # On stderr, so stdout holds only the summary.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def combine_adapters(adapter_dirs: list[str | Path], weights: list[float], method: str,
                     out_dir: str | Path, density: float | None = None, rank: int | None = None,
                     majority_sign_method: str | None = None, seed: int | None = None,
                     progress: bool = False) -> CombineResult:
    """Combine the adapters with `method` and write the result as a PEFT adapter directory."""
    weights = [float(w) for w in weights]
    check_options(method, len(adapter_dirs), weights, density, rank, majority_sign_method, seed)
    paths = [Path(d) for d in adapter_dirs]
    out = Path(out_dir)
    if any(out.resolve() == p.resolve() for p in paths):
        raise ConfigError(f"--out: {out} is one of the input adapters (expected a new directory)")
    inputs = [read_adapter(p) for p in paths]
    check_compatible(inputs)

    first = inputs[0]
    modules = first.modules()  # sorted: also the order DARE draws its masks in
    transposed = first.config.fan_in_fan_out
    ranks = {m: [f.tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"].shape[0] for f in inputs] for m in modules}
    out_rank = (max(sum(r) for r in ranks.values()) if method == "cat"
                else rank or max(max(r) for r in ranks.values()))
    weight_t = torch.tensor(weights, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0 if seed is None else seed) if method in _RANDOM else None
    sign_method = majority_sign_method or "total"
    dtypes = {t.dtype for f in inputs for t in f.tensors.values()}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    tensors: dict[str, torch.Tensor] = {}
    worst_error, worst_module = 0.0, None
    with _module_progress(progress, f"combine ({method})", len(modules)) as advance:
        for module in modules:
            a_list = [f.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].float() for f in inputs]  # (r_i, d_in)
            b_list = [f.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].float() for f in inputs]  # (d_out, r_i)
            scalings = [f.config.scaling_for(module) for f in inputs]
            if method == "cat":
                a, b = cat_factors(a_list, b_list, [w * s for w, s in zip(weights, scalings)], out_rank)
            else:
                # Full updates in the base weight's layout, as PEFT's get_delta_weight gives them,
                # so DARE's masks fall on the same entries.
                deltas = [(b_i @ a_i) * s for a_i, b_i, s in zip(a_list, b_list, scalings)]  # (d_out, d_in)
                if transposed:
                    deltas = [d.T for d in deltas]
                merged = combine_deltas(method, deltas, weight_t, density, sign_method, generator)
                if transposed:
                    merged = merged.T
                a, b, rel = truncate(merged, out_rank)
                if worst_module is None or rel > worst_error:
                    worst_error, worst_module = rel, module
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise MergeError(f"combining module {module} gives non-finite values")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(out_dtype)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(out_dtype)
            advance()

    # Identity of the common base: the hash from any input that has one, the name beside it.
    with_hash = [f for f in inputs if f.base_weights_sha256]
    named = [f for f in with_hash + inputs if f.base_model]
    base_name = named[0].base_model if named else None
    metadata = {"format": "pt", COMBINE_KEY: json.dumps({
        "method": method, "adapters": [str(p) for p in paths], "weights": weights,
        "density": density, "rank": out_rank, "majority_sign_method": majority_sign_method,
        "seed": seed})}
    if with_hash:
        metadata[HASH_KEY] = with_hash[0].base_weights_sha256
    if base_name:
        metadata[NAME_KEY] = str(base_name)
    # alpha = r and no rsLoRA: scaling 1, since the inputs' scalings are already in B A.
    cfg = LoraConfig(r=out_rank, lora_alpha=out_rank, lora_dropout=first.config.lora_dropout,
                     target_modules=first.config.target_modules, fan_in_fan_out=transposed)
    config = cfg.to_peft_dict([], base_name)
    tm = first.config.target_modules
    config["target_modules"] = tm if isinstance(tm, str) else sorted(tm)
    write_adapter_files(tensors, config, metadata, out)
    return CombineResult(out=out, method=method, modules=len(modules), rank=out_rank,
                         max_rel_error=None if method == "cat" else worst_error,
                         worst_module=None if method == "cat" else worst_module)


# ---- command line ------------------------------------------------------------------------------

def cmd_combine(args) -> int:
    """Combine several LoRA adapters of one base into one (PEFT's add_weighted_adapter methods)."""
    result = combine_adapters(args.adapters, args.weights, args.method, args.out,
                              density=args.density, rank=args.rank,
                              majority_sign_method=args.majority_sign_method, seed=args.seed,
                              progress=True)
    line = (f"combined {len(args.adapters)} adapter(s) with {result.method}: {result.modules} "
            f"modules, rank {result.rank} (scaling 1)")
    if result.max_rel_error is not None:
        line += (f"; rank-{result.rank} SVD error (relative Frobenius) max "
                 f"{result.max_rel_error:.3g} at {result.worst_module}")
    print(line)
    print(f"adapter written to {result.out}")
    return 0


def add_combine_parser(sub) -> None:
    """Add `combine` to the main parser's subcommands (`sub`)."""
    sp = sub.add_parser("combine", help="combine several LoRA adapters into one",
                        description=cmd_combine.__doc__)
    sp.add_argument("--method", required=True, choices=METHODS)
    sp.add_argument("--adapters", required=True, nargs="+", help="adapter directories (same base)")
    sp.add_argument("--weights", required=True, nargs="+", type=float,
                    help="one weight per adapter, same order (may be negative)")
    sp.add_argument("--density", type=float, default=None,
                    help="fraction of each update kept (ties, dare_*, magnitude_prune)")
    sp.add_argument("--rank", type=int, default=None,
                    help="output rank for the SVD methods (default: the largest input rank)")
    sp.add_argument("--majority-sign-method", default=None, choices=["total", "frequency"],
                    help="sign election for ties and dare_ties (default: total)")
    sp.add_argument("--seed", type=int, default=None, help="DARE's mask seed (default: 0)")
    sp.add_argument("--out", required=True, help="output adapter directory")
    sp.set_defaults(fn=cmd_combine)
