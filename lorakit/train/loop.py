"""The training loop, written out top to bottom: forward, backward, step, log, evaluate, save.

In the spirit of nanoGPT's `train.py` and torchtune's recipes: no callback framework. AdamW on the
trainable parameters (LoRA adapters by default; every weight, or the last blocks, for the full
and freeze baselines of `lorakit.train.methods`); linear warmup then cosine (`schedule.lr_at`);
gradient accumulation where every supervised token of an optimizer step weighs the same (the
step's loss is the sum of token losses over all its micro-batches divided by their total token
count); gradient clipping; evaluation on the validation split; optional early stopping;
checkpoints that resume exactly. Under `torchrun` the same loop runs on every rank, each on its
share of the global batch, with DDP or FSDP2 around the model (`lorakit.train.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.adapters import save_adapter
from lorakit.atomic import clean_temps, make_folder, write_text, writing
from lorakit.config import RunConfig, dump_config
from lorakit.data.collate import pad_batch
from lorakit.data.mix import mixed_rows, replay_examples
from lorakit.data.render import supervised_count
from lorakit.device import dtype_of
from lorakit.errors import ConfigError, LorakitError
from lorakit.lora import count_parameters, lora_layers
from lorakit.lora.inject import PEFT_PREFIX
from lorakit.train.batches import BatchPlan
from lorakit.train.checkpoint import (
    MANIFEST, latest_checkpoint, load_checkpoint, optimizer_from_files, save_checkpoint,
    set_rng_state,
)
from lorakit.train.distributed import LossModule, as_float, setup, step_seed
from lorakit.train.lean_ops import lean_modules
from lorakit.train.loss import causal_lm_loss_sum, packed_loss_sum
from lorakit.train.methods import (
    TRAINABLE_DIR, TRAINABLE_FILE, load_trainable, make_trainable, save_model_dir, save_trainable,
    trainable_parameters,
)
from lorakit.train.packing import host_to_device, pack_batch, packed_attention_mode, packing_supported
from lorakit.train.prepare import check_model_fits, encode_rows, prepare_data
from lorakit.train.overfit import OverfitWatch
from lorakit.train.progress import TrainProgress
from lorakit.train.track import open_tracker
from lorakit.train.schedule import lr_at


class TrainingError(LorakitError):
    """Training cannot go on (non-finite loss, nothing to resume)."""


@dataclass
class TrainResult:
    output_dir: Path
    # What the run wrote: the PEFT adapter directory (output_dir/adapter) for method lora, the
    # whole fine-tuned model directory (output_dir/model, loadable with from_pretrained) for
    # full and freeze. Kept under one name so callers hand it on without asking which it is.
    adapter_dir: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    tokens: int  # supervised (answer) tokens seen
    input_tokens: int  # non-padding tokens processed
    seconds: float
    trainable_params: int
    total_params: int
    stopped_early: bool = False
    method: str = "lora"
    rank: int = 0  # under torchrun, this process's rank; only rank 0 wrote the outputs
    already_finished: bool = False  # resumed a run that had finished: nothing was trained


def _append_metrics(path: Path, row: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _metric_rows(path: Path) -> tuple[list[dict], bool]:
    """(rows, torn) of metrics.jsonl. A kill in the middle of an append leaves a torn last line,
    which is left out (torn=True); a bad line anywhere else is an error naming it."""
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows, torn = [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if i == len(lines):
                torn = True
                continue
            raise TrainingError(f"{path}: line {i} is not a JSON object ({line[:40]!r}); expected "
                                "one JSON object per line (fix or delete the line, then resume)")
        rows.append(row)
    return rows, torn


def _keep_metrics_up_to(path: Path, step: int) -> bool:
    """On resume, drop rows the interrupted run logged after its checkpoint and a torn last line
    (rewritten atomically). Returns whether a torn line was dropped."""
    rows, torn = _metric_rows(path)
    if path.exists():
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))
    return torn


def _last_losses(path: Path) -> tuple[float | None, float | None]:
    """(last training loss, last validation loss) logged in metrics.jsonl."""
    rows, _ = _metric_rows(path)
    train_loss = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    val_loss = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
    return train_loss, val_loss


def _output_is_current(output: Path, ckpt: Path) -> bool:
    """The final adapter (or model) folder was written after the run's last checkpoint. It is
    renamed into place whole (lorakit.atomic), so existing means complete; an older one is left
    from an earlier run in the same output_dir."""
    return output.is_dir() and output.stat().st_mtime_ns >= (ckpt / MANIFEST).stat().st_mtime_ns


def micro_batch_loss(model, examples, pad_id, device, supervised_only, packed_inner):
    """(loss sum, supervised tokens, input tokens) of one micro-batch, padding-free when
    `packed_inner` names the attention to run inside `packed_attention_mode`, else padded."""
    if packed_inner:
        batch = pack_batch(examples, packed_inner).to(device)
        loss_sum, n = packed_loss_sum(model, batch, supervised_only)
        return loss_sum, n, batch.tokens
    batch = {k: host_to_device(v, device) for k, v in pad_batch(examples, pad_id).items()}
    loss_sum, n = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"],
                                     batch["attention_mask"], supervised_only)
    return loss_sum, n, int(batch["attention_mask"].sum())


@torch.no_grad()
def validation_loss(forward, encoded, batch_size, dist=None) -> float:
    """Mean cross-entropy per supervised token over a validation set; `forward(examples)` is the
    loop's (loss sum, tokens, input tokens) module. Under torchrun each rank takes its share of
    every batch (so FSDP's collectives match) and the sums are added across ranks."""
    was_training = forward.training
    forward.eval()
    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        examples = [encoded[i] for i in order[start:start + batch_size]]
        share = dist.share(examples) if dist else None
        loss_sum, n, _ = forward(share.examples if share else examples)
        weight = share.weight if share else 1.0
        total, count = total + weight * float(loss_sum), count + weight * n
    forward.train(was_training)
    if dist:
        total, count = dist.sum(total, count)
    return total / max(count, 1)


EAGER_MAX_TOKENS = 256  # attn_implementation auto: eager when 90% of rows are at most this long


def _apply_speed_settings(model, t, device, lengths: list[int]) -> str:
    """`train.lora_compute`, `train.fused_lora` and `train.attn_implementation` (measured in
    benchmarks/train_throughput.py); returns the attention implementation chosen."""
    base_dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
    for _, layer in lora_layers(model):
        layer.compute_dtype = base_dtype if t.lora_compute == "base" else torch.float32
        layer.fused = t.fused_lora
    attn = t.attn_implementation
    if attn == "auto":
        # On CPU, eager attention trains short rows faster than SDPA's flash kernel, whose
        # backward is slow here (about 4x the eager backward at 128 tokens, bf16, 2 cores); eager
        # keeps (B, heads, T, T) probabilities per layer, so long rows go to SDPA.
        p90 = sorted(lengths)[int(0.9 * (len(lengths) - 1))] if lengths else 0
        short = p90 <= EAGER_MAX_TOKENS
        attn = "eager" if torch.device(device).type == "cpu" and short else "sdpa"
    if hasattr(model, "set_attn_implementation") and model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return attn


def _gradient_checkpointing(model) -> None:
    """`train.gradient_checkpointing`: transformers' per-block `torch.utils.checkpoint` keeps each
    block's input and recomputes the block in the backward pass (Chen et al. 2016, "Training Deep
    Nets with Sublinear Memory Cost"). Non-reentrant, so frozen embeddings (LoRA) need no
    `enable_input_require_grads` and keyword arguments (packed attention) pass through."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support "
                          "it in transformers (set it to false)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], t) -> list[dict]:
    """AdamW groups: one at the base rate; with LoRA+ (Hayou et al. 2024) a second for the B
    matrices and other 1-d adapter parameters (DoRA magnitudes) at `loraplus_lr_ratio` x the
    rate, as PEFT's `create_loraplus_optimizer` groups them. `lr_scale` is read by the schedule."""
    ratio = t.loraplus_lr_ratio
    if not ratio or t.method != "lora":
        return [{"params": [p for _, p in named_params], "lr_scale": 1.0}]
    fast = [p for n, p in named_params if "lora_B" in n or p.ndim == 1]
    slow = [p for n, p in named_params if not ("lora_B" in n or p.ndim == 1)]
    return [{"params": slow, "lr_scale": 1.0}, {"params": fast, "lr_scale": float(ratio)}]


def train(cfg: RunConfig, resume: bool = False, model=None, tokenizer=None, console=None,
          progress: bool = True, on_validation=None) -> TrainResult:
    """Train as `cfg` says; write the adapter (or model), metrics and checkpoints to output_dir.

    `model`/`tokenizer` may be passed in (tests, sweeps); otherwise the base is loaded from
    `cfg.model`. With `resume`, training continues from the latest complete checkpoint.
    `on_validation(step, val_loss, total_steps)` is called on rank 0 after each evaluation, once
    its line is in metrics.jsonl (a Ray Tune trial reports it to its early-stopping scheduler).
    """
    t = cfg.train
    out = Path(t.output_dir)
    ckpt_root, metrics_path = out / "checkpoints", out / "metrics.jsonl"
    if t.threads:
        torch.set_num_threads(t.threads)
    # One process, or this rank of a torchrun launch (its device from LOCAL_RANK).
    dist, device = setup(t.distributed, cfg.model.device, cfg.model.quantize_base)

    # Model: the base in the configured dtype; for lora frozen, with fp32 adapters on top.
    if model is None:
        from lorakit.models import load_base

        model, tokenizer = load_base(cfg.model.name, dtype=dtype_of(cfg.model.dtype), device=device)
    else:
        device = next(model.parameters()).device
    if getattr(model, "lorakit_identity", None) is None:
        from lorakit.models.identity import base_identity

        model.lorakit_identity = base_identity(model, cfg.model.name)
    check_model_fits(cfg, model)
    # Replay rows (data.replay): the untouched base answers the general prompts (data/mix.py).
    replay = replay_examples(cfg, model, tokenizer, out, say=console.print if console is not None
                             and progress and dist.is_main else None) if cfg.data.replay else None
    torch.manual_seed(t.seed)  # seeds the adapter init, dropout and everything after
    make_trainable(model, cfg)
    total_params, trainable_params = count_parameters(model)
    if t.gradient_checkpointing:
        _gradient_checkpointing(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # Data: encoded once; the batch plan decides the order from (seed, epoch) alone.
    data = prepare_data(cfg, tokenizer)
    # data.mix and data.replay rows follow the task rows; each epoch draws its share (data/mix.py).
    mixed = mixed_rows(cfg, len(data.train), lambda ex: encode_rows(ex, tokenizer, cfg), replay) \
        if cfg.data.mix or cfg.data.replay else None
    rows = data.train + (mixed.rows if mixed else [])
    attn = _apply_speed_settings(model, t, device, [len(e.input_ids) for e in rows])
    not_packable = packing_supported(model) if t.padding_free else "train.padding_free is off"
    packed_inner = None if not_packable else attn
    plan = BatchPlan([len(e.input_ids) for e in rows], t.batch_size, t.seed, t.group_by_length,
                     t.shuffle, members=mixed.members if mixed else None)
    total_steps = t.max_steps or math.ceil(t.epochs * plan.per_epoch / t.grad_accum)
    warmup_steps = int(t.warmup_ratio * total_steps)

    # Temporaries of a writer killed mid-write (lorakit.atomic) in this run's folders.
    notices = []
    if dist.is_main:
        stale = clean_temps(out) + clean_temps(ckpt_root)
        if stale:
            notices.append(f"removed {len(stale)} unfinished write(s) of an interrupted run: "
                           + ", ".join(p.name for p in stale[:3]) + (" ..." if len(stale) > 3 else ""))

    # Resume: the trained weights go in before FSDP shards them; the rest after the optimizer.
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"{ckpt_root}: no complete checkpoint to resume from")
    if ckpt is not None:
        state, opt_tensors, rng_tensors = load_checkpoint(ckpt)
        from safetensors.torch import load_file

        if t.method == "lora":  # read by the one adapter checker, as every adapter load is
            from lorakit.adapters.check import read_adapter

            load_trainable(model, read_adapter(ckpt / "adapter").tensors, prefix=PEFT_PREFIX)
        else:
            load_trainable(model, load_file(str(ckpt / TRAINABLE_DIR / TRAINABLE_FILE)))
    # A run that finished (every step, or stopped early) has nothing left to train; when its final
    # output is in place too, resuming it only says where that is.
    finished = ckpt is not None and (state.get("stopped_early") or state["step"] >= total_steps)
    adapter_dir = out / ("adapter" if t.method == "lora" else "model")
    if finished and _output_is_current(adapter_dir, ckpt):
        dist.close()
        train_loss, val_loss = _last_losses(metrics_path)
        return TrainResult(out, adapter_dir, state["step"], train_loss, val_loss, state["tokens"],
                           state["input_tokens"], 0.0, trainable_params, total_params,
                           bool(state.get("stopped_early")), t.method, dist.rank,
                           already_finished=True)

    # What the loop calls: forward and loss as one module, wrapped in DDP or FSDP under torchrun.
    forward = dist.wrap(LossModule(model, lambda m, examples: micro_batch_loss(
        m, examples, pad_id, device, t.loss_on_supervised_only, packed_inner)), device)
    named_params = trainable_parameters(model)  # after wrapping: FSDP replaces them by shards
    params = [p for _, p in named_params]
    # The fused AdamW kernel (CPU and CUDA) updates every tensor in one pass: ~8 ms against ~40 ms
    # for the default for-each path on the bundled study's 420 adapter tensors, same arithmetic.
    fused = torch.device(device).type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups(named_params, t), lr=t.lr, weight_decay=t.weight_decay,
                                  fused=fused)
    # A distributed run records what it ran as, so its saved config says "ddp" rather than "auto".
    config_yaml = dump_config(cfg if dist.world_size == 1 else
                              replace(cfg, train=replace(t, distributed=dist.strategy)))

    step, micro, tokens_seen, input_tokens = 0, 0, 0, 0
    best_val, evals_without_gain, best_weights = math.inf, 0, None
    if ckpt is not None:
        optimizer_from_files(optimizer, dist.shard_optimizer_tensors(optimizer, opt_tensors),
                             state["optimizer"])
        set_rng_state(rng_tensors, state["rng"])
        step, micro, tokens_seen = state["step"], state["micro_batch"], state["tokens"]
        input_tokens = state["input_tokens"]
        best_val = state.get("best_val_loss") or math.inf
        evals_without_gain = state.get("evals_without_gain", 0)
        if dist.is_main and _keep_metrics_up_to(metrics_path, step):
            notices.append(f"{metrics_path}: dropped a torn last line (the run was killed while "
                           "writing it)")
    elif dist.is_main:
        make_folder(out, "train.output_dir")
        write_text(metrics_path, "")
    if dist.is_main:  # rank 0 alone writes files
        write_text(out / "config.yaml", config_yaml)

    def write_weights(path):
        if t.method == "lora":  # PiSSA stays in its raw form: resuming recomputes the residual
            save_adapter(model, cfg.lora, path, pissa_as_lora=False)
        else:
            save_trainable(model, path)

    def checkpoint():
        # Under FSDP every rank takes part in gathering the shards; rank 0 writes them.
        with dist.full_weights(model):
            optimizer_state = dist.full_optimizer_state(optimizer)
            if dist.is_main:
                save_checkpoint(ckpt_root, step, write_weights, optimizer_state,
                                {"micro_batch": micro, "tokens": tokens_seen,
                                 "input_tokens": input_tokens,
                                 "best_val_loss": None if math.isinf(best_val) else best_val,
                                 "evals_without_gain": evals_without_gain,
                                 "stopped_early": stopped_early,
                                 "distributed": dist.strategy, "world_size": dist.world_size},
                                config_yaml, t.keep_checkpoints,
                                weights_dir="adapter" if t.method == "lora" else TRAINABLE_DIR)

    # Validation loss up twice while training loss falls: said at that step (train/overfit.py).
    overfit = OverfitWatch.from_metrics_file(metrics_path) if step else OverfitWatch()
    # train.report_to: the same rows to TensorBoard and MLflow (train/track.py).
    tracker = open_tracker(cfg, out, dist.is_main, resume=step > 0)
    bar = TrainProgress(total_steps, step, console=console, enabled=progress and dist.is_main)
    bar.note(f"{len(data.train)} train / {len(data.validation)} validation examples, "
             f"{trainable_params:,} trainable of {total_params:,} parameters "
             f"({100 * trainable_params / total_params:.3f}%), {total_steps} steps, "
             f"{dist.describe()}")
    if ckpt is not None and state.get("world_size", 1) != dist.world_size:
        bar.note(f"resuming a run saved with {state.get('world_size', 1)} rank(s) on "
                 f"{dist.world_size}: the global batch and the update are the same; dropout draws differ")
    if mixed:
        bar.note(mixed.summary())
    for w in data.warnings:
        bar.warn(w)
    for n in notices:
        bar.note(n)
    if finished:
        bar.note(f"the run had finished at step {step}; writing its missing {adapter_dir.name} "
                 "from the last checkpoint" + (" (its last weights: early stopping held the best "
                                               "ones in memory only)" if state.get("stopped_early")
                                               else ""))
    if t.padding_free and not_packable:
        bar.note(f"padded micro-batches: padding-free training needs a supported model ({not_packable})")

    forward.train()
    start_time, start_tokens = time.perf_counter(), input_tokens
    train_loss = val_loss = None
    stopped_early = False
    with bar, (packed_attention_mode(model) if packed_inner else contextlib.nullcontext()), \
            (lean_modules(model, note=bar.note) if t.lean_activations else contextlib.nullcontext()):
        while step < total_steps and not finished:
            if dist.world_size > 1:
                torch.manual_seed(step_seed(t.seed, step, dist.rank))
            # Forward and backward over this step's micro-batches, weighting every token alike:
            # the global batch's supervised tokens divide each rank's share of the loss sum.
            micro_batches = [[rows[i] for i in plan[micro + k]] for k in range(t.grad_accum)]
            step_tokens = sum(supervised_count(e.labels) for mb in micro_batches for e in mb)
            loss_total, step_input_tokens = 0.0, 0
            for k, examples in enumerate(micro_batches):
                share = dist.share(examples)
                with dist.sync_gradients(last_micro_batch=k == len(micro_batches) - 1):
                    loss_sum, _, n_input = forward(share.examples)
                    if not torch.isfinite(loss_sum):
                        last = latest_checkpoint(ckpt_root)
                        raise TrainingError(
                            f"step {step + 1}: the loss is {float(loss_sum)}; training stopped. "
                            f"Last good checkpoint: {last or 'none'}. Lower train.lr "
                            f"(now {t.lr:g}) or use model.dtype=fp32")
                    (loss_sum * (share.weight * dist.loss_scale) / max(step_tokens, 1)).backward()
                loss_total += share.weight * loss_sum.item()
                step_input_tokens += int(share.weight) * n_input
            loss_total, step_input_tokens = dist.sum(loss_total, step_input_tokens)
            step_input_tokens = int(step_input_tokens)
            micro += t.grad_accum

            # Step: clip, set this step's rate, update, clear.
            grad_norm = as_float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)) \
                if t.max_grad_norm > 0 else 0.0
            lr = lr_at(step, total_steps, warmup_steps, t.lr, t.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            input_tokens += step_input_tokens
            train_loss = loss_total / max(step_tokens, 1)
            overfit.train(train_loss)

            # Log.
            elapsed = time.perf_counter() - start_time
            tok_per_s = (input_tokens - start_tokens) / max(elapsed, 1e-9)
            if dist.is_main and (step % t.log_every == 0 or step == total_steps):
                row = {"step": step, "epoch": round(plan.epoch_of(micro), 4), "loss": train_loss,
                       "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                       "input_tokens": input_tokens,
                       "tokens_per_s": round(tok_per_s, 1), "elapsed_s": round(elapsed, 2)}
                _append_metrics(metrics_path, row)
                tracker.log(row)
            bar.update(step, loss=train_loss, lr=lr, tok_per_s=tok_per_s)

            # Evaluate.
            if data.validation and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
                val_loss = validation_loss(forward, data.validation, t.batch_size, dist)
                if dist.is_main:
                    row = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
                    _append_metrics(metrics_path, row)
                    tracker.log(row)
                    if on_validation is not None:
                        on_validation(step, val_loss, total_steps)
                bar.note(f"step {step}: validation loss {val_loss:.4f}")
                if warning := overfit.validation(step, val_loss):
                    bar.warn(warning.message(ckpt_root))
                    if dist.is_main:
                        _append_metrics(metrics_path, warning.record(ckpt_root))
                        tracker.log({"step": step, "overfitting_warning": 1.0})
                if val_loss < best_val:
                    best_val, evals_without_gain = val_loss, 0
                    if t.early_stopping_patience:
                        best_weights = {n: p.detach().clone() for n, p in model.named_parameters()
                                        if p.requires_grad}
                else:
                    evals_without_gain += 1
                if t.early_stopping_patience and evals_without_gain >= t.early_stopping_patience:
                    stopped_early = True
                    bar.note(f"early stop at step {step}: no validation gain in "
                             f"{evals_without_gain} evaluations; keeping the best weights "
                             f"(validation loss {best_val:.4f})")

            # Save.
            if (t.save_every and step % t.save_every == 0) or step == total_steps or stopped_early:
                checkpoint()
            if stopped_early:
                break

    if stopped_early and best_weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_weights:
                    p.copy_(best_weights[n])
        val_loss = best_val
    if finished:
        train_loss, val_loss = _last_losses(metrics_path)
        stopped_early = bool(state.get("stopped_early"))
    if t.method == "lora":
        with dist.full_weights(model):
            if dist.is_main:
                save_adapter(model, cfg.lora, adapter_dir)
    else:
        full_state = dist.full_state_dict(model)  # FSDP: the shards gathered; else None
        if dist.is_main:
            save_model_dir(model, tokenizer, adapter_dir, state_dict=full_state)
    forward.eval()
    tracker.close()
    dist.close()  # waits for rank 0's files, then leaves the process group
    return TrainResult(out, adapter_dir, step, train_loss, val_loss, tokens_seen, input_tokens,
                       time.perf_counter() - start_time, trainable_params, total_params, stopped_early,
                       t.method, dist.rank)
