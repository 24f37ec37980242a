"""The one adapter checker: every path that loads an adapter directory goes through `open_adapter`.

The CLI (`generate`, `eval`, `merge --adapter`, `adapters add`), `check-adapter` (its file reading),
and the server (registry add, the CPU cache's loads from disk) all read an adapter here, so what
one refuses the others refuse with the same message. A directory is refused with an
`AdapterError` that names the adapter path, the file, the key and what was expected, before
anything is changed:

- files: the folder, `adapter_config.json` and `adapter_model.safetensors` are there and are
  regular files (not folders, FIFOs or devices); a pickled `adapter_model.bin` is refused (loading
  a pickle can run code); with `root`, their real paths (symlinks resolved) stay inside it.
- config: UTF-8 JSON object of bounded size and depth, no NaN/Infinity anywhere, `r` an integer in
  1..MAX_RANK, alphas finite and > 0, then PEFT's `LoraConfig` fields and their checks
  (`LoraConfig.from_peft_dict`: unknown keys, types, a `target_modules` regex that compiles).
- tensors: a readable safetensors file; PEFT key names (`base_model.model.<module>.lora_A.weight`,
  `.lora_B.weight`, `.lora_magnitude_vector` with `use_dora`); fp16/bf16/fp32/fp64 only, finite;
  A (r, d_in), B (d_out, r), magnitude (d_out,) with r from `r` / `rank_pattern`; every module has
  its A and B (and magnitude with DoRA); every module is one `target_modules` selects.
- against a base (`BaseModules`): every module is a linear layer of the base (and one a server has
  slots for), shapes fit it, the modules `target_modules` selects in the base are exactly the ones
  with tensors (PEFT's `check_target_module_exists` rule), the rank fits a server's slots, the
  base weights hash matches (unless forced), and a PiSSA adapter is one the loader can rebuild.

Tensor and config names follow PEFT (peft/utils/save_and_load.py, peft/tuners/lora/config.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.config import ALL_LINEAR, LoraConfig
from lorakit.lora.inject import PEFT_PREFIX, is_linear, matches_target
from lorakit.lora.layer import linear_shape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
HASH_KEY = "lorakit.base_weights_sha256"
NAME_KEY = "lorakit.base_model"
MAX_CONFIG_BYTES = 1 << 20  # PEFT's configs are a few KB; a bigger file is not a config
MAX_RANK = 1 << 16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\."
                    r"(?:(?P<part>lora_A|lora_B)\.weight|(?P<magnitude>lora_magnitude_vector))$")


@dataclass
class AdapterFiles:
    """What an adapter directory holds, read and checked on its own (without a base)."""

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # PEFT key -> tensor
    base_model: str | None
    base_weights_sha256: str | None

    def modules(self) -> list[str]:
        """Module paths that carry an A and a B, sorted."""
        return sorted({KEY_RE.match(k)["module"] for k in self.tensors})

    def lora_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) of one module."""
        return (self.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"],
                self.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"])

    def magnitude(self, module: str) -> torch.Tensor | None:
        """The DoRA magnitude (d_out,) of one module, or None for plain LoRA."""
        return self.tensors.get(f"{PEFT_PREFIX}{module}.lora_magnitude_vector")

    @property
    def rank(self) -> int:
        """The largest module rank (rank_pattern may give modules their own)."""
        return max(self.config.r_for(m) for m in self.modules())


@dataclass(frozen=True)
class BaseModules:
    """What an adapter is checked against: the base's linear layers and the loader's limits.

    `linears`: full module name -> (d_in, d_out) of every linear layer (a layer already wrapped
    for LoRA or serving counts as the linear it wraps); `heads`: the output head's names (not
    selected by 'all-linear'); `served`: the layers a server has slots for (None: any);
    `identity`: the base's {name, weights_sha256}; `max_rank`: a server's slot width.
    """

    linears: dict[str, tuple[int, int]]
    heads: frozenset[str] = frozenset({"lm_head"})
    served: frozenset[str] | None = None
    identity: dict | None = None
    max_rank: int | None = None

    @classmethod
    def of(cls, model: nn.Module, served=None, max_rank: int | None = None) -> BaseModules:
        linears, wrapped = {}, []
        for name, module in model.named_modules():
            if any(name.startswith(w + ".") for w in wrapped):
                continue  # the inside of a wrapper: its base and its LoRA factors
            inner = getattr(module, "base", None)
            if isinstance(inner, nn.Module) and is_linear(inner):
                linears[name] = linear_shape(inner)
                wrapped.append(name)
            elif is_linear(module):
                linears[name] = linear_shape(module)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = {"lm_head"} | {n for n, m in model.named_modules() if head is not None and m is head}
        return cls(linears, frozenset(heads), None if served is None else frozenset(served),
                   getattr(model, "lorakit_identity", None), max_rank)

    def targeted(self, cfg: LoraConfig) -> list[str]:
        """The linear layers `cfg.target_modules` selects in this base (PEFT's rule)."""
        if cfg.target_modules == ALL_LINEAR:
            return [n for n in self.linears if n not in self.heads]
        return [n for n in self.linears if matches_target(n, cfg.target_modules)]


# -- files ------------------------------------------------------------------------------------

def _inside(path: Path, root: Path) -> bool:
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real == top or top in real.parents


def adapter_paths(adapter_dir: str | Path, root: str | Path | None = None) -> tuple[Path, Path, Path]:
    """(folder, config path, weights path) after the checks every reader needs: both files are
    there and are regular files, no pickled weights, and with `root` nothing leads outside it."""
    path = Path(adapter_dir)
    try:
        if not path.exists():
            raise AdapterError(f"{path}: no such adapter directory")
        if not path.is_dir():
            raise AdapterError(f"{path}: not a directory (expected a folder with {CONFIG_NAME} "
                               f"and {WEIGHTS_NAME})")
        cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not weights_path.exists() and not weights_path.is_symlink() \
                and (path / PICKLE_NAME).exists():
            raise AdapterError(
                f"{path / PICKLE_NAME}: pickled adapter weights are refused (loading a pickle can "
                "run code). Convert it once, in an environment you trust: "
                "`python -c \"import torch, safetensors.torch as s; "
                f"s.save_file(torch.load('{path / PICKLE_NAME}', weights_only=True), "
                f"'{weights_path}')\"`")
        for p in (path, cfg_path, weights_path):
            if root is not None and not _inside(p, Path(root)):
                raise AdapterError(f"{p}: resolves to {os.path.realpath(p)}, outside the adapters "
                                   f"root {root} (a symlink pointing out is refused)")
        for p in (cfg_path, weights_path):
            if not p.exists():
                what = "a broken symlink" if p.is_symlink() else "missing"
                raise AdapterError(f"{p}: {what} (an adapter directory needs {CONFIG_NAME} and "
                                   f"{WEIGHTS_NAME})")
            if not stat.S_ISREG(p.stat().st_mode):
                kind = "a directory" if p.is_dir() else "not a regular file"
                raise AdapterError(f"{p}: {kind} (expected a file)")
    except OSError as e:  # permissions, a symlink loop, a name too long
        raise AdapterError(f"{path}: cannot read the adapter directory ({e.strerror or e})") from None
    return path, cfg_path, weights_path


def _non_finite(value, where: str) -> list[str]:
    """Paths of NaN / Infinity numbers in a parsed JSON value (Python's json accepts them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def _number_problem(value, what: str, integer: bool) -> str | None:
    """Why `value` is not a usable rank (integer) or alpha (finite number > 0), or None."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"got {value!r} (expected {what})"
    try:
        ok = math.isfinite(float(value)) and value > 0 and (not integer or value <= MAX_RANK)
    except OverflowError:
        ok = False
    return None if ok else f"got {value!r} (expected {what})"


def config_problems(raw: dict) -> list[str]:
    """What in an adapter_config.json dict would break arithmetic later, before `LoraConfig`
    reads it: NaN/Infinity anywhere (Python's json accepts them), ranks above MAX_RANK, alphas
    that are not finite as a float (an integer too large for one)."""
    non_finite = _non_finite(raw, "")
    problems = [f"{p}: NaN or Infinity (expected a finite number)" for p in non_finite]
    rank, alpha = f"an integer in 1..{MAX_RANK}", "a finite number > 0"
    for key, what, integer in (("r", rank, True), ("lora_alpha", alpha, False)):
        if key in raw and key not in non_finite:
            why = _number_problem(raw[key], what, integer)
            if why:
                problems.append(f"{key}: {why}")
    if not isinstance(raw.get("fan_in_fan_out", False), bool):
        problems.append(f"fan_in_fan_out: got {raw['fan_in_fan_out']!r} (expected true or false)")
    for key, what, integer in (("rank_pattern", rank, True), ("alpha_pattern", alpha, False)):
        if isinstance(raw.get(key), dict):
            for k, v in raw[key].items():
                why = _number_problem(v, what, integer)
                if why and f"{key}.{k}" not in non_finite:
                    problems.append(f"{key}.{k}: {why}")
    return problems


def read_config(adapter_dir: str | Path, root: str | Path | None = None) -> tuple[dict, Path, Path]:
    """(adapter_config.json as a dict, its path, the weights path): the file checks, then a JSON
    object of bounded size with finite numbers, sane ranks and alphas, and a valid regex."""
    _, cfg_path, weights_path = adapter_paths(adapter_dir, root)
    try:
        if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{cfg_path}: {cfg_path.stat().st_size} bytes (expected a JSON "
                               f"config under {MAX_CONFIG_BYTES} bytes)")
        data = cfg_path.read_bytes()
    except OSError as e:
        raise AdapterError(f"{cfg_path}: cannot read ({e.strerror or e})") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterError(f"{cfg_path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except ValueError as e:  # an integer past Python's 4300-digit conversion limit
        raise AdapterError(f"{cfg_path}: not a usable JSON config ({e})") from None
    except RecursionError:
        raw = RecursionError
    if not isinstance(raw, dict):
        got = ("JSON nested too deeply" if raw is RecursionError else
               f"a JSON {'null' if raw is None else type(raw).__name__}")
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {got}")
    try:
        problems = config_problems(raw)
    except RecursionError:
        problems = ["JSON nested too deeply (expected a flat config object)"]
    if problems:
        raise AdapterError(f"{cfg_path}: bad adapter config:\n  " + "\n  ".join(problems))
    return raw, cfg_path, weights_path


def read_tensors(weights_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, or `AdapterError` naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


# -- the adapter on its own -------------------------------------------------------------------

def _tensor_problems(cfg: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    problems, seen, d_out = [], {}, {}
    for key, t in sorted(tensors.items()):
        m = KEY_RE.match(key)
        if m is None or (m["magnitude"] and not cfg.use_dora):
            problems.append(f"{key}: unexpected key (expected "
                            "base_model.model.<module>.lora_A.weight or .lora_B.weight"
                            f"{', and .lora_magnitude_vector with use_dora' if m is None else ''})")
            continue
        module, part = m["module"], m["part"] or m["magnitude"]
        seen.setdefault(module, set()).add(part)
        r = cfg.r_for(module)
        if t.dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {t.dtype} (expected a floating-point tensor: "
                            "float16, bfloat16, float32 or float64)")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: holds NaN or inf values")
        if part == "lora_magnitude_vector":
            if t.dim() != 1 or t.numel() == 0:
                problems.append(f"{key}: shape {tuple(t.shape)} (expected (d_out,))")
            else:
                d_out.setdefault(module, {})["magnitude"] = t.shape[0]
        elif t.dim() != 2 or t.numel() == 0:
            problems.append(f"{key}: shape {tuple(t.shape)} (expected a non-empty 2-d tensor)")
        elif part == "lora_A" and t.shape[0] != r:
            problems.append(f"{key}: shape {tuple(t.shape)} (expected ({r}, d_in) for r={r})")
        elif part == "lora_B" and t.shape[1] != r:
            problems.append(f"{key}: shape {tuple(t.shape)} (expected (d_out, {r}) for r={r})")
        elif part == "lora_B":
            d_out.setdefault(module, {})["B"] = t.shape[0]
    wanted = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if cfg.use_dora else set())
    for module, parts in sorted(seen.items()):
        for part in sorted(wanted - parts):
            suffix = part if part == "lora_magnitude_vector" else f"{part}.weight"
            problems.append(f"{PEFT_PREFIX}{module}.{suffix}: missing (the file has the module's "
                            "other tensors)")
        sizes = d_out.get(module, {})
        if len(sizes) == 2 and sizes["B"] != sizes["magnitude"]:
            problems.append(f"{PEFT_PREFIX}{module}.lora_magnitude_vector: length "
                            f"{sizes['magnitude']} (expected {sizes['B']}, the rows of its lora_B)")
        if cfg.target_modules != ALL_LINEAR and not matches_target(module, cfg.target_modules):
            problems.append(f"{PEFT_PREFIX}{module}: tensors for a module target_modules="
                            f"{cfg.target_modules!r} does not select")
    if not tensors:
        problems.append("no tensors")
    return problems


def read_adapter(adapter_dir: str | Path, root: str | Path | None = None) -> AdapterFiles:
    """Read and check an adapter directory on its own: files, config, key names, values, shapes.
    With `root`, refuse files whose real path leads outside it."""
    path = Path(adapter_dir)
    raw, cfg_path, weights_path = read_config(path, root)
    cfg = LoraConfig.from_peft_dict(raw, str(cfg_path))
    tensors, metadata = read_tensors(weights_path)
    problems = _tensor_problems(cfg, tensors)
    if problems:
        raise AdapterError(f"{weights_path}: bad adapter tensors:\n  " + "\n  ".join(problems))
    base_model = metadata.get(NAME_KEY) or raw.get("base_model_name_or_path")
    return AdapterFiles(path=path, config=cfg, tensors=tensors,
                        base_model=base_model if isinstance(base_model, str) else None,
                        base_weights_sha256=metadata.get(HASH_KEY))


# -- the adapter against a base ---------------------------------------------------------------

def check_fits(files: AdapterFiles, base: BaseModules, force: bool = False,
               allow_pissa: bool = False) -> None:
    """`AdapterError` unless the adapter fits `base`: same weights (unless `force`), rank within
    the slots, every module a (served) linear layer of the right shape, and the modules its
    config selects in this base are exactly those it has tensors for. `allow_pissa`: the loader
    can rebuild a full-SVD PiSSA base (`load_adapter` can, a server cannot)."""
    cfg, weights_path = files.config, files.path / WEIGHTS_NAME
    want = (base.identity or {}).get("weights_sha256")
    if not force and want and files.base_weights_sha256 and files.base_weights_sha256 != want:
        raise AdapterError(
            f"{files.path}: trained on base {files.base_model!r} (weights "
            f"{files.base_weights_sha256[:12]}), but this base is {base.identity.get('name')!r} "
            f"(weights {want[:12]}); pass force=True (--force) to load anyway")
    if cfg.pissa_niter is not None and (cfg.pissa_niter or not allow_pissa):
        raise AdapterError(
            f"{files.path / CONFIG_NAME}: init_lora_weights is {cfg.init_lora_weights!r}: the "
            "adapter was trained on a residual base " + (
                "from a randomised SVD that cannot be recomputed" if cfg.pissa_niter else
                "that this loader does not rebuild") + ". Write it as a plain LoRA where it "
            "was trained (PEFT: save_pretrained with path_initial_model_for_weight_conversion;"
            " lorakit writes that form itself)")
    if base.max_rank is not None and files.rank > base.max_rank:
        raise AdapterError(f"{files.path}: rank {files.rank}, above this server's "
                           f"max_lora_rank={base.max_rank}")
    problems = []
    for module in files.modules():
        key = f"{PEFT_PREFIX}{module}.lora_A.weight"
        if module not in base.linears:
            problems.append(f"{key}: no such module in this base model (expected the name of "
                            "one of its linear layers)")
            continue
        if base.served is not None and module not in base.served:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in base.served})
            problems.append(f"{PEFT_PREFIX}{module}: not a layer this server adapts (served "
                            f"layers end in {leaves})")
            continue
        d_in, d_out = base.linears[module]
        r = cfg.r_for(module)
        (a, b), m = files.lora_pair(module), files.magnitude(module)
        for name, t, shape in (("lora_A.weight", a, (r, d_in)), ("lora_B.weight", b, (d_out, r)),
                               ("lora_magnitude_vector", m, (d_out,))):
            if t is not None and tuple(t.shape) != shape:
                problems.append(f"{PEFT_PREFIX}{module}.{name}: shape {tuple(t.shape)} "
                                f"(expected {shape} for this base)")
    if problems:
        raise AdapterError(f"{weights_path}: does not fit this base model:\n  " + "\n  ".join(problems))
    targeted = set(base.targeted(cfg))
    if not targeted:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in base.linears})
        raise AdapterError(f"{files.path / CONFIG_NAME}: target_modules {cfg.target_modules!r} "
                           f"matches no linear module of this base (its linear modules are named: "
                           f"{', '.join(leaves)})")
    missing = sorted(targeted - set(files.modules()))
    if missing:
        raise AdapterError(
            f"{weights_path}: missing tensors for {len(missing)} module(s) its config targets, "
            f"e.g. {PEFT_PREFIX}{missing[0]}.lora_A.weight")
    extra = sorted(set(files.modules()) - targeted)
    if extra:
        raise AdapterError(f"{weights_path}: tensors for modules its config does not target "
                           f"(target_modules={cfg.target_modules!r}), e.g. {PEFT_PREFIX}{extra[0]}")


def open_adapter(adapter_dir: str | Path, base: BaseModules | None = None,
                 root: str | Path | None = None, force: bool = False,
                 allow_pissa: bool = False) -> AdapterFiles:
    """The adapter's checked config and tensors, or one `AdapterError` naming the adapter path,
    the file and key, and what was expected. `base`: also check it fits that base (see
    `check_fits`); `root`: refuse files whose real path leads outside that folder."""
    files = read_adapter(adapter_dir, root)
    if base is not None:
        check_fits(files, base, force, allow_pissa)
    return files
