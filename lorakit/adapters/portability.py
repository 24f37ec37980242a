"""`lorakit check-adapter`: will vLLM, llama.cpp or PEFT compute what this adapter means?

The adapter directory is read raw (`adapter_config.json` with json, the safetensors file with
`safe_open`), not through `read_adapter`, so that what lorakit itself refuses (DoRA tensors,
modules_to_save, bias) can be reported. Each finding names the target, a severity (`error`: the
runtime refuses the adapter; `misread`: it loads and computes something else; `warning`: may
matter), the config key or tensor, and what to do. `--fix` writes an equivalent plain LoRA that
the targets read as PEFT does, when one exists.

What each runtime does, as read in its source (PEFT's semantics are the reference):
- vLLM, `vllm/lora/peft_helper.py` (`PEFTHelper`): keeps a few config fields (r, lora_alpha,
  bias, modules_to_save, use_rslora, use_dora, ...; no patterns); refuses DoRA, modules_to_save,
  bias != "none" and r > --max-lora-rank (one of 1, 8, 16, ... 512, default 16,
  `vllm/config/lora.py`); one scaling `lora_alpha / r` (`/ sqrt(r)` with rsLoRA) for every module
  (`lora_weights.py` `from_config`), so rank_pattern and alpha_pattern are ignored; a module's
  tensors are copied into a slot of rank max_lora_rank (`layers/base_linear.py` `set_lora`), so a
  larger per-module rank does not fit; a tensor other than lora_A/B or lora_embedding_A/B is
  refused (`utils.py` `parse_fine_tuned_lora_name`).
- llama.cpp, `convert_lora_to_gguf.py`: keeps only `lora_alpha` and exits on any tensor that is
  not lora_A/lora_B (or lora_embedding_A/B); `.base_layer.weight` is skipped. At run time
  (`llm_graph_context::build_lora_mm`) each tensor pair is scaled by `alpha / its own rank`:
  rank_pattern is read right, rsLoRA is read as alpha / r and alpha_pattern is dropped.
- PEFT, `peft/config.py` (`from_peft_type`): a config key the installed `LoraConfig` does not
  have is dropped with a warning (a file from a newer PEFT).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.adapters.check import FLOAT_DTYPES, WEIGHTS_NAME, read_config, read_tensors
from lorakit.adapters.io import write_adapter_files
from lorakit.errors import AdapterError
from lorakit.lora.config import LoraConfig

TARGETS = ("vllm", "llama.cpp", "peft")
ERROR, MISREAD, WARNING = "error", "misread", "warning"
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks

_PAIR_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\."
                      r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
# Config keys that change what a LoRA adapter computes, with their PEFT default (no effect).
_MEANING_DEFAULTS = {"use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
                     "bias": "none", "lora_bias": False, "modules_to_save": None,
                     "layer_replication": None, "trainable_token_indices": None,
                     "target_parameters": None, "alora_invocation_tokens": None}
# init_lora_weights values (PEFT) that also change the base weights: the adapter only fits the
# changed base unless it was converted to a plain LoRA when saved.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_NO_DORA = ("no exact LoRA equivalent (DoRA rescales each output row by m / ||W + sBA||, which "
            "depends on the base weights): merge it into the base and serve the merged model, or "
            "retrain without DoRA")
_NO_MTS = ("cannot be dropped without changing outputs (the saved module replaces the base's whole "
           "weight): merge into the base and serve the merged model, or retrain without it")
_FOLDABLE = ("use_rslora", "rank_pattern", "alpha_pattern")  # what --fix rewrites away exactly


@dataclass
class Finding:
    target: str  # a name in TARGETS, or "all"
    severity: str  # ERROR, MISREAD or WARNING
    key: str  # config key or tensor name
    message: str  # what the runtime does with it
    action: str  # what to do
    fix: str | None = None  # what --fix does: "exact", "lossy", or None (nothing it can)


@dataclass
class Report:
    path: Path
    cfg: LoraConfig
    targets: list[str]
    findings: list[Finding]

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity in (ERROR, MISREAD)]

    @property
    def exit_code(self) -> int:
        """1 when a target refuses or misreads the adapter, else 0."""
        return 1 if self.blocking else 0


@dataclass
class FixResult:
    written: bool
    out: Path | None
    message: str
    lossy: bool = False
    # module -> ||B'A' - BA||_F / ||BA||_F (scalings included) of each module truncated by SVD
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


@dataclass
class RawAdapter:
    path: Path
    config: dict  # adapter_config.json as written
    cfg: LoraConfig  # the parts LoraConfig takes: r, alpha, rsLoRA, patterns
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    pairs: dict[str, dict[str, str]]  # module -> {"A": key, "B": key}
    other: dict[str, list[str]]  # kind (dora, lora_bias, base_copy, bias, full) -> keys

    def rank(self, module: str) -> int | None:
        """The module's tensor rank, or None when its A and B do not agree."""
        keys = self.pairs[module]
        if set(keys) != {"A", "B"}:
            return None
        a, b = self.tensors[keys["A"]], self.tensors[keys["B"]]
        return a.shape[0] if a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] else None


def _other_kind(key: str) -> str:
    if key.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
        return "dora"
    if key.endswith(".lora_B.bias"):
        return "lora_bias"
    if key.endswith(".base_layer.weight"):
        return "base_copy"
    return "bias" if key.endswith(".bias") else "full"


def read_raw(adapter_dir: str | Path) -> RawAdapter:
    """Read an adapter directory without judging what it holds (only that it is readable), with
    the file and config checks of the one adapter checker (`lorakit.adapters.check`)."""
    path = Path(adapter_dir)
    config, cfg_path, weights_path = read_config(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {config['peft_type']!r} (expected 'LORA'; only "
                           "LoRA adapters are checked)")
    problems = [f"{k}: missing (expected in every LoRA adapter_config.json)"
                for k in ("r", "lora_alpha") if k not in config]
    if not problems:
        cfg = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                         target_modules=config.get("target_modules") or ["-"],
                         use_rslora=config.get("use_rslora") or False,
                         rank_pattern=config.get("rank_pattern") or {},
                         alpha_pattern=config.get("alpha_pattern") or {})
        problems = cfg.problems()
    if problems:
        raise AdapterError(f"{cfg_path}: bad adapter config:\n  " + "\n  ".join(problems))
    tensors, metadata = read_tensors(weights_path)
    pairs: dict[str, dict[str, str]] = {}
    other: dict[str, list[str]] = {}
    for key in sorted(tensors):
        m = _PAIR_RE.match(key)
        if m:
            pairs.setdefault(m["module"], {})["A" if m["part"].startswith(("lora_A", "lora_embedding_A"))
                                             else "B"] = key
        else:
            other.setdefault(_other_kind(key), []).append(key)
    return RawAdapter(path, config, cfg, tensors, metadata, pairs, other)


def runtime_scaling(target: str, cfg: LoraConfig, module: str, rank: int) -> float:
    """The factor on B A that `target` uses for `module` whose tensors have rank `rank`."""
    if target == "vllm":  # PEFTHelper: one scaling from the global r and alpha
        return cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    if target == "llama.cpp":  # build_lora_mm: alpha / rank of this tensor, no rsLoRA
        return cfg.lora_alpha / rank
    return cfg.scaling_for(module)  # PEFT: the meaning of the file


def _examples(keys: list[str]) -> str:
    return keys[0] + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def _consistency(raw: RawAdapter) -> list[Finding]:
    """Problems every runtime has: half pairs, ranks that disagree, non-finite values."""
    problems: dict[str, list[str]] = {}
    for module, keys in raw.pairs.items():
        rank = raw.rank(module)
        if set(keys) != {"A", "B"}:
            problems.setdefault("has lora_A or lora_B without the other", []).append(module)
        elif rank is None:
            problems.setdefault("lora_A rows differ from lora_B columns", []).append(module)
        elif rank != raw.cfg.r_for(module):
            problems.setdefault("tensor rank differs from the config's r for the module "
                                "(r / rank_pattern)", []).append(module)
    dtypes = [k for k, t in raw.tensors.items() if t.dtype not in FLOAT_DTYPES]
    if dtypes:
        problems["dtype other than float16, bfloat16, float32 or float64"] = dtypes
    bad = [k for k, t in raw.tensors.items() if t.dtype in FLOAT_DTYPES and not torch.isfinite(t).all()]
    if bad:
        problems["holds NaN or inf"] = bad
    if not raw.pairs:
        problems["no lora_A/lora_B tensors"] = [str(raw.path / WEIGHTS_NAME)]
    return [Finding("all", ERROR, _examples(keys), f"{len(keys)} module(s)/tensor(s): {what}; "
                    "runtimes refuse it or compute a wrong update", "re-export the adapter from "
                    "its training run") for what, keys in problems.items()]


def _rank_limit(raw: RawAdapter, target: str, limit: int | None, explicit: bool) -> list[Finding]:
    if limit is None:
        return []
    over = {m: raw.rank(m) for m in raw.pairs if (raw.rank(m) or 0) > limit}
    if not over:
        return []
    top, key = max(over.values()), ("r" if raw.cfg.r > limit else "rank_pattern")
    lossy = ("pass --fix OUT with --max-lora-rank N to truncate each module to rank N by SVD "
             "(lossy; the relative error is reported per module)")
    if target == "vllm" and not explicit:
        fit = next((v for v in VLLM_MAX_LORA_RANKS if v >= top), None)
        return [Finding(target, ERROR, key, f"{len(over)} module(s) have rank up to {top}, above "
                        f"vLLM's default --max-lora-rank {limit}: vLLM refuses the adapter",
                        (f"start vLLM with --max-lora-rank {fit}, or " if fit else
                         "vLLM's largest --max-lora-rank is 512; ") + lossy)]
    runtime = f"vLLM started with --max-lora-rank {limit}" if target == "vllm" else "the limit given"
    return [Finding(target, ERROR, key, f"{len(over)} module(s) have rank up to {top}, above "
                    f"{runtime}", "--fix truncates them to rank "
                    f"{limit} by SVD (lossy; relative Frobenius error reported per module)", "lossy")]


def _scaling(raw: RawAdapter, target: str) -> list[Finding]:
    """Modules whose scaling under `target`'s rule differs from PEFT's, grouped by config key."""
    cfg, causes = raw.cfg, {}
    for module in raw.pairs:
        rank = raw.rank(module)
        if rank is None or rank != cfg.r_for(module):
            continue
        want, got = cfg.scaling_for(module), runtime_scaling(target, cfg, module, rank)
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        keys = [k for k, hit in (("alpha_pattern", cfg.alpha_for(module) != cfg.lora_alpha),
                                 ("rank_pattern", target == "vllm" and rank != cfg.r),
                                 ("use_rslora", target == "llama.cpp" and cfg.use_rslora)) if hit]
        for k in keys or ["rank_pattern" if rank != cfg.r else "r"]:
            causes.setdefault(k, []).append(f"{module}: {got:.6g} instead of {want:.6g}")
    rule = ("vLLM scales every module by one lora_alpha/r" + (" (/sqrt(r))" if cfg.use_rslora else "")
            if target == "vllm" else "llama.cpp scales each module by lora_alpha / its own rank")
    what = {"alpha_pattern": "ignores alpha_pattern", "use_rslora": "ignores use_rslora"}
    how = {"use_rslora": "--fix folds sqrt(r) into lora_alpha (alpha*sqrt(r), use_rslora false)",
           "alpha_pattern": "--fix folds each module's scaling into its lora_B under one alpha/r"}
    return [Finding(target, MISREAD, k, f"{what.get(k, 'ignores rank_pattern')}: {rule}, so {len(v)} "
                    f"module(s) get another scaling, e.g. {v[0]}", how.get(k, "--fix pads every "
                    "module to the largest rank with zeros and folds its scaling into lora_B under "
                    "one alpha/r"), "exact") for k, v in causes.items()]


def _runtime_features(raw: RawAdapter, target: str) -> list[Finding]:
    """DoRA, modules_to_save, bias, other tensors and base-changing inits, for vLLM / llama.cpp."""
    c, other, out = raw.config, raw.other, []
    vllm = target == "vllm"
    name = "vLLM" if vllm else "llama.cpp"
    refuses = ("vLLM refuses it (parse_fine_tuned_lora_name: unsupported LoRA weight)" if vllm
               else "convert_lora_to_gguf.py exits on it (not a lora_A/lora_B tensor)")

    def add(severity, key, message, action):
        out.append(Finding(target, severity, key, message, action))

    if c.get("use_dora") and vllm:
        add(ERROR, "use_dora", "DoRA adapter: vLLM refuses it (PEFTHelper: does not support DoRA)",
            _NO_DORA)
    if other.get("dora") and not vllm:
        add(ERROR, _examples(other["dora"]), f"DoRA magnitude vectors: {refuses}", _NO_DORA)
    elif c.get("use_dora") and not vllm:
        add(MISREAD, "use_dora", "use_dora is true but the file has no lora_magnitude_vector: "
            "llama.cpp applies it as plain LoRA", _NO_DORA)
    full = [k for k in other.get("full", []) if vllm or "norm" not in k]
    norms = [k for k in other.get("full", []) if k not in full]
    if full:
        add(ERROR, _examples(full), f"{len(full)} full weight tensor(s) (modules_to_save or "
            f"other non-LoRA weights): {refuses}", _NO_MTS)
    if norms:
        add(WARNING, _examples(norms), "norm weights: the converter passes them through as full "
            "replacements (as for mergekit adapters); how llama.cpp applies them is not checked",
            "compare outputs after conversion")
    if c.get("modules_to_save") and (vllm or not other.get("full")):
        add(ERROR if vllm else WARNING, "modules_to_save", f"modules_to_save="
            f"{c['modules_to_save']!r}: " + ("vLLM only supports modules_to_save being None" if vllm
                                             else "ignored, and the file holds no full weights"), _NO_MTS)
    bias_keys = other.get("bias", []) + other.get("lora_bias", [])
    if bias_keys:
        add(ERROR, _examples(bias_keys), f"{len(bias_keys)} bias tensor(s) (bias / lora_bias "
            f"training): {refuses}", "no LoRA-only equivalent (a trained bias shifts outputs): "
            "merge into the base, or retrain with bias='none' and lora_bias=false")
    if c.get("bias", "none") != "none":
        add(ERROR if vllm else WARNING, "bias", f"bias={c['bias']!r}: " + (
            "vLLM refuses bias != 'none' (PEFTHelper.validate_legal)" if vllm else
            "llama.cpp ignores the key" + ("" if bias_keys else "; the file holds no bias tensors")),
            "retrain with bias='none'; if no bias was trained, set bias to 'none'")
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        add(MISREAD, "init_lora_weights", f"init_lora_weights={init!r}: trained on a base changed "
            f"at init; {name} applies it to the original base", "save it as a plain LoRA where it "
            "was trained (PEFT: path_initial_model_for_weight_conversion; lorakit writes that form)")
    if c.get("layer_replication"):
        add(MISREAD, "layer_replication", f"{name} ignores layer_replication (PEFT duplicates base "
            "layers)", "merge into the base and serve the merged model")
    emb = [m for m, k in raw.pairs.items() if m.endswith("lm_head") or "embedding" in k.get("A", "")]
    if any(m.endswith("lm_head") for m in emb) and not vllm:
        add(WARNING, "lm_head", "LoRA on lm_head: the converter raises 'lm_head is present in "
            "adapter, but is ignored in base model' when the base ties its embeddings",
            "fine for an untied base; otherwise retrain without lm_head")
    if emb and vllm:
        add(WARNING, "lm_head" if emb[0].endswith("lm_head") else _examples(emb), "LoRA on "
            "embeddings or lm_head: vLLM takes it only for models that list the module as a LoRA "
            "module (varies by model and version; not checked here)",
            "try loading it in the vLLM version you deploy")
    if other.get("base_copy"):
        add(WARNING, _examples(other["base_copy"]), f"{name} skips these full copies of base "
            "layers (PEFT saves them with adapted embeddings and loads them over the base)",
            "outputs differ only if they differ from the base, e.g. after resizing the vocabulary")
    return out


def installed_peft_fields() -> tuple[set[str] | None, str | None]:
    """The keyword fields of the installed PEFT's LoraConfig and its version, or (None, None)."""
    import inspect

    from lorakit.lora.quant import quiet_torchao

    try:
        with quiet_torchao():  # PEFT imports torchao when it is installed
            import peft
            from peft import LoraConfig as PeftLoraConfig
    except ImportError:
        return None, None
    return set(inspect.signature(PeftLoraConfig.__init__).parameters) - {"self"}, peft.__version__


def _peft(raw: RawAdapter, peft_fields: set[str] | None, peft_version: str | None) -> list[Finding]:
    if peft_fields is None:
        return [Finding("peft", WARNING, "peft", "PEFT is not installed here: its config fields "
                        "were not checked", "install the PEFT version you deploy and check again")]
    out = []
    for key in sorted(set(raw.config) - peft_fields):
        value = raw.config[key]
        meaningful = key in _MEANING_DEFAULTS and value != _MEANING_DEFAULTS[key]
        fix = "exact" if meaningful and key in _FOLDABLE else None
        out.append(Finding("peft", MISREAD if meaningful else WARNING, key, f"{key}={value!r}: PEFT "
                           f"{peft_version or '(given fields)'} does not know the key and drops it "
                           "with a warning" + ("; the adapter means something else without it"
                                               if meaningful else ""),
                           "upgrade PEFT" + (" or --fix (same adapter without it)" if fix else ""), fix))
    written = raw.config.get("peft_version")
    if written and peft_version:
        from packaging.version import InvalidVersion, Version

        try:
            if Version(str(written).split("@")[0]) > Version(peft_version):
                out.append(Finding("peft", WARNING, "peft_version", f"written by PEFT {written}, "
                                   f"newer than the installed {peft_version}", "upgrade PEFT"))
        except InvalidVersion:
            pass
    return out


def check_raw(raw: RawAdapter, targets: list[str] | None = None, max_lora_rank: int | None = None,
              peft_fields: set[str] | None = None) -> Report:
    """Findings for each target. `peft_fields`: the LoraConfig fields of the PEFT that will load
    the adapter (default: the installed PEFT's)."""
    targets = list(targets or TARGETS)
    peft_version = None
    if peft_fields is None and "peft" in targets:
        peft_fields, peft_version = installed_peft_fields()
    findings = _consistency(raw)
    for target in targets:
        limit = max_lora_rank or (VLLM_DEFAULT_MAX_LORA_RANK if target == "vllm" else None)
        if target == "vllm" and limit not in VLLM_MAX_LORA_RANKS:
            findings.append(Finding(target, WARNING, "--max-lora-rank", f"vLLM refuses "
                                    f"--max-lora-rank {limit} (one of {VLLM_MAX_LORA_RANKS})",
                                    "start vLLM with the next allowed value above it"))
        findings += _rank_limit(raw, target, limit, explicit=max_lora_rank is not None)
        if target == "peft":
            findings += _peft(raw, peft_fields, peft_version)
        else:
            findings += _runtime_features(raw, target) + _scaling(raw, target)
    return Report(raw.path, raw.cfg, targets, findings)


def check_adapter(adapter_dir: str | Path, targets: list[str] | None = None,
                  max_lora_rank: int | None = None, peft_fields: set[str] | None = None) -> Report:
    return check_raw(read_raw(adapter_dir), targets, max_lora_rank, peft_fields)


def _truncate(a: torch.Tensor, b: torch.Tensor, scaling: float, rank: int):
    """(A', B', relative error): B' A' is the best rank-`rank` approximation of scaling * B A.

    scaling * B A = Q_B (scaling R_B R_A^T) Q_A^T from B = Q_B R_B and A^T = Q_A R_A, so only the
    small core needs an SVD (Eckart-Young: dropping its smallest singular values is optimal).
    """
    q_b, r_b = torch.linalg.qr(b)  # (d_out, k), (k, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (d_in, k'), (k', r)
    u, s, vh = torch.linalg.svd(scaling * r_b @ r_a.T, full_matrices=False)  # core (k, k')
    total = s.square().sum()
    err = (s[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    root = s[:rank].sqrt()
    b_new = q_b @ (u[:, :rank] * root)  # (d_out, rank)
    a_new = (root[:, None] * vh[:rank]) @ q_a.T  # (rank, d_in)
    return a_new, b_new, err


def normalize(raw: RawAdapter, max_rank: int | None = None):
    """(tensors, config, relative errors) of the same adapter as a plain LoRA.

    Every module gets rank r_g (the largest, after truncating ranks above `max_rank`) by zero
    padding, lora_alpha' = s0 * r_g with s0 the adapter's default scaling, use_rslora false and no
    patterns; lora_B carries s_m / s0. Then alpha'/r_g * B'A' = s_m B A for every module under
    PEFT's, vLLM's (one alpha/r) and llama.cpp's (alpha / tensor rank = r_g) rules alike.
    """
    cfg, s0 = raw.cfg, raw.cfg.scaling
    pairs, errors = {}, {}
    for module, keys in raw.pairs.items():
        a, b = raw.tensors[keys["A"]].double(), raw.tensors[keys["B"]].double()
        s = cfg.scaling_for(module)
        if max_rank is not None and a.shape[0] > max_rank:
            a, b, errors[module] = _truncate(a, b, s, max_rank)
            b = b / s0
        else:
            b = b * (s / s0)
        pairs[module] = (a, b)
    r_g = max((a.shape[0] for a, _ in pairs.values()), default=cfg.r)
    tensors = dict(raw.tensors)
    for module, (a, b) in pairs.items():
        keys, pad = raw.pairs[module], r_g - a.shape[0]
        tensors[keys["A"]] = F.pad(a, (0, 0, 0, pad)).to(raw.tensors[keys["A"]].dtype).contiguous()
        tensors[keys["B"]] = F.pad(b, (0, pad)).to(raw.tensors[keys["B"]].dtype).contiguous()
    config = {**raw.config, "r": r_g, "lora_alpha": s0 * r_g, "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    return tensors, config, errors


def fix_adapter(adapter_dir: str | Path, out_dir: str | Path, targets: list[str] | None = None,
                max_lora_rank: int | None = None,
                peft_fields: set[str] | None = None) -> tuple[Report, FixResult]:
    """Check the adapter; when every error/misread has a fix, write the equivalent adapter."""
    raw = read_raw(adapter_dir)
    report = check_raw(raw, targets, max_lora_rank, peft_fields)
    out = Path(out_dir)
    if out.resolve() == raw.path.resolve():
        raise AdapterError(f"{out}: --fix OUT must be another directory than the adapter checked")
    if not report.blocking:
        return report, FixResult(False, None, "nothing to fix: no error or misread finding; "
                                 "nothing written")
    unfixable = [f for f in report.blocking if f.fix is None]
    if unfixable:
        return report, FixResult(False, None, "no equivalent adapter the target(s) read correctly; "
                                 "nothing written:\n" + "\n".join(
                                     f"  {f.target}: {f.key}: {f.action}" for f in unfixable))
    tensors, config, errors = normalize(raw, max_lora_rank)
    write_adapter_files(tensors, config, raw.metadata, out)
    after = check_adapter(out, report.targets, max_lora_rank, peft_fields)
    if after.blocking:
        raise AdapterError(f"{out}: the written adapter still has findings (a lorakit bug): "
                           + "; ".join(f"{f.target}: {f.key}" for f in after.blocking))
    what = (f"lossy: {len(errors)} module(s) truncated to rank {max_lora_rank} by SVD, max relative "
            f"Frobenius error {max(errors.values()):.3g}" if errors else "exact: same update in every module")
    return report, FixResult(True, out, f"written to {out} (r={config['r']}, lora_alpha="
                             f"{config['lora_alpha']:.6g}; {what})", bool(errors), errors)


def _format(report: Report, fix: FixResult | None) -> str:
    raw_cfg = report.cfg
    lines = [f"{report.path}: r={raw_cfg.r}, lora_alpha={raw_cfg.lora_alpha:g}"
             + (", rsLoRA" if raw_cfg.use_rslora else "")
             + (", rank_pattern" if raw_cfg.rank_pattern else "")
             + (", alpha_pattern" if raw_cfg.alpha_pattern else "")]
    for target in ["all", *report.targets]:
        found = [f for f in report.findings if f.target == target]
        if not found and target == "all":
            continue
        lines.append(f"{target}: " + ("nothing found" if not found else f"{len(found)} finding(s)"))
        for f in found:
            lines.append(f"  {f.severity.upper():8} {f.key}: {f.message}")
            lines.append(f"  {'':8} do: {f.action}")
    counts = {s: sum(f.severity == s for f in report.findings) for s in (ERROR, MISREAD, WARNING)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    if fix is not None:
        lines.append(f"fix: {fix.message}")
        lines += [f"  {m}: relative error {e:.3g}" for m, e in sorted(fix.relative_errors.items())]
    return "\n".join(lines)


def cmd_check_adapter(args: argparse.Namespace) -> int:
    """What vLLM, llama.cpp or PEFT refuse or misread in an adapter; --fix writes an equivalent one."""
    targets = [args.target] if args.target else list(TARGETS)
    fix = None
    if args.fix:
        report, fix = fix_adapter(args.adapter, args.fix, targets, args.max_lora_rank)
    else:
        report = check_adapter(args.adapter, targets, args.max_lora_rank)
    code = 0 if fix is not None and fix.written else report.exit_code
    if args.json:
        fixed = None if fix is None else {**asdict(fix), "out": fix.out and str(fix.out),
                                          "max_relative_error": fix.max_relative_error}
        print(json.dumps({"adapter": str(report.path), "targets": report.targets, "exit_code": code,
                          "findings": [asdict(f) for f in report.findings], "fix": fixed}, indent=2))
    else:
        print(_format(report, fix))
    return code


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r} (expected an integer >= 1)")
    return int(text)


_EPILOG = """\
severity: error = the runtime refuses the adapter; misread = it loads and computes something
else; warning = may matter. --max-lora-rank N: the rank limit to check (vLLM's default is 16);
with --fix it also truncates larger modules to rank N by SVD and reports the error.

exit code: 0 no error or misread finding (or --fix wrote an adapter without them);
1 error or misread findings (with --fix: no equivalent adapter exists, nothing written);
2 bad input (unreadable adapter directory or config)."""


def add_check_adapter_parser(sub) -> None:
    """Add `check-adapter` to the main parser's subcommands (`sub`)."""
    sp = sub.add_parser("check-adapter", help="what vLLM / llama.cpp / PEFT would refuse or misread",
                        description=cmd_check_adapter.__doc__, epilog=_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("adapter", metavar="DIR", help="adapter directory (PEFT format)")
    sp.add_argument("--target", choices=TARGETS, help="one runtime (default: all three)")
    sp.add_argument("--max-lora-rank", type=_positive, metavar="N",
                    help="rank limit to check against (vLLM: its --max-lora-rank, default 16)")
    sp.add_argument("--fix", metavar="OUT", help="write an equivalent adapter the target(s) read correctly")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_check_adapter)
