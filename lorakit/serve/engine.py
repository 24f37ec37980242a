"""`Engine`: continuous batching of generation requests over one base model and many adapters.

Scheduling is iteration-level, as in Orca (Yu et al., OSDI 2022) and vLLM's scheduler: every
step admits waiting requests up to `max_running` (a request whose adapter cannot get a slot
because every slot is held by running requests stays queued), prefills the newcomers as one
left-padded batch (two when some of them start with a prefix the `PrefixCache` holds: those
compute only the rest of their prompt), joins them to the running batch's cache, runs one
decode step for every row, and retires the rows that finished. A request that arrives while
others decode therefore joins at the next step, and a finished one leaves at once. Rows of
different adapters share each forward pass through the per-row slot index of `MultiLoraLinear`
(lorakit/serve/layer.py). Rows with a grammar (`Request.constraint`: a JSON schema, tool calls)
share it too: their logits are masked per row before sampling (lorakit/serve/grammar.py), and a
row whose grammar is complete ends as if it had drawn its end of turn.

One engine thread owns the model, the KV cache and the adapter slots. Other threads `submit`
requests and receive events through each request's `on_event` callback; admin operations that
touch slots run on the engine thread through `call`, between forward passes.

A fault belongs to the request that caused it, as in vLLM and llama.cpp's server: an adapter
that cannot be loaded or put in a slot, a prompt the model cannot run (a prefill that fails is
retried one newcomer at a time to find it), non-finite output from a row's adapter, or a draw that
fails fails that request alone, with its error, and the batch goes on. Only a fault no single
request explains (a decode step failing for every row) fails the running batch. A step that runs
longer than `stall_timeout` seconds marks the engine unhealthy (`healthy`, `/health`).

Which thread that is matters on the CPU. PyTorch's CPU builds run their parallel regions on GNU
OpenMP, whose idle workers spin between regions only while the process has no more OpenMP
threads than CPUs; past that (and the process's main thread always counts as one) they sleep, and
every small operation pays a wake-up. A decode step is hundreds of small operations: on a
2-core machine a batch-1 forward of SmolLM2-135M took 18 ms on the main thread and 42 ms on a
second thread. So `lorakit serve` runs the engine on the main thread (`run`) and the HTTP server
on another; `start` (a thread of its own) is for tests and embedding.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from lorakit.errors import AdapterError, LorakitError
from lorakit.models.head import contiguous_head_input
from lorakit.models.load import cache_of, with_cache
from lorakit.serve.cache import AdapterCache
from lorakit.serve.kvcache import BatchKV, left_pad, positions_from_mask
from lorakit.serve.layer import SlotBatch
from lorakit.serve.prefix import PrefixCache
from lorakit.serve.grammar import mask_logits
from lorakit.serve.sampling import (
    SamplingError, SamplingParams, adjust_logits, find_stop, make_generator, next_tokens,
    safe_prefix_len, top_logprobs,
)


class Overloaded(LorakitError):
    """The waiting queue is full; the client should retry later (HTTP 503)."""


_ids = itertools.count()


class Request:
    """One generation: its prompt ids, adapter (None = base), sampling, and what it produced."""

    def __init__(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                 on_event: Callable[[str, object], None] | None = None, constraint=None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.params = params
        self.on_event = on_event  # called on the engine thread: ("text", str) / ("done", reason)
        self.generator = make_generator(params.seed)
        self.constraint = constraint  # a grammar.Constraint: the tokens this row may draw
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []  # with params.logprobs
        self.slot = -1
        self.output_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.done = threading.Event()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> Request:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def _emit(self, kind: str, payload: object) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)


class Engine:
    def __init__(self, model, tokenizer, batch: SlotBatch, adapters: AdapterCache | None,
                 max_running: int = 32, max_waiting: int = 256, max_model_len: int | None = None,
                 prefix_cache: PrefixCache | None = None, stall_timeout: float = 60.0):
        contiguous_head_input(model)  # else each prefill's head product is a batched copy (bf16: seconds)
        self.model = model
        self.tokenizer = tokenizer
        self.batch = batch
        self.adapters = adapters
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", 2048)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = end_of_turn_ids(model, tokenizer)
        self.kv = BatchKV(max_running)
        self.prefix = prefix_cache
        self.running: list[Request] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None  # the thread `start` made
        self._owner: threading.Thread | None = None  # the thread running the loop, if any
        self._running = threading.Event()  # set while the loop runs
        self._stopped = threading.Event()  # set when the loop has returned
        self._stop = False
        self.stall_timeout = stall_timeout
        self._step_started: float | None = None  # monotonic time the step in progress began
        # Counters read by /metrics.
        self.prompt_tokens = 0
        self.prefix_hit_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.generated_tokens = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # -- submission (any thread) ------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"the server queue is full ({self.max_waiting} waiting requests); "
                                 "retry later")
            self.waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt_ids: list[int], adapter: str | None = None,
                 params: SamplingParams | None = None, timeout: float | None = None) -> Request:
        """Submit and wait: the finished request (or the engine steps inline when not running)."""
        req = self.submit(Request(prompt_ids, adapter, params or SamplingParams()))
        if self._owner is None:
            while not req.done.is_set():
                self.step()
        return req.wait(timeout)

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread between steps (inline when the engine is not running)."""
        if self._owner is None or threading.current_thread() is self._owner:
            return fn()
        fut: Future = Future()
        with self._cv:
            self._commands.append((fn, fut))
            self._cv.notify()
        return fut.result()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    # -- the loop ----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the scheduler loop is running (on any thread)."""
        return self._running.is_set()

    def stalled_for(self) -> float:
        """Seconds the step in progress has run (0 between steps): a step holds the whole batch,
        so one that does not return is an engine that serves nobody."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def healthy(self) -> bool:
        """The loop runs and no step has run longer than `stall_timeout` seconds."""
        return self.alive and self.stalled_for() <= self.stall_timeout

    def run(self) -> None:
        """Run the scheduler on the calling thread until `stop` is called from another one (a
        `stop` that came before `run` ends it at once, so a caller cannot miss it).

        On the CPU, call it from the process's main thread (see the module docstring)."""
        with self._cv:
            if self._owner is not None:
                raise RuntimeError("the engine is already running")
            self._owner = threading.current_thread()
            self._stopped.clear()
            self._running.set()
        try:
            self._loop()
        finally:
            with self._cv:
                self._owner = None
                self._stop = False
                self._running.clear()
                self._stopped.set()

    def start(self) -> None:
        """Run the scheduler on a thread of its own (slower on the CPU than `run` on the main
        thread; see the module docstring)."""
        if self._owner is None:
            self._stop = False
            self._stopped.clear()
            self._thread = threading.Thread(target=self.run, name="lorakit-engine", daemon=True)
            self._thread.start()
            # Return once the loop runs, so that `call` from here on goes to it (or has ended).
            while not (self._running.wait(0.01) or self._stopped.is_set()):
                pass

    def stop(self, timeout: float | None = None) -> None:
        """End the loop (requests still running fail as the server shutting down) and wait for
        it to return, unless called from the loop's own thread."""
        with self._cv:
            owner = self._owner
            self._stop = True
            self._cv.notify()
        if owner is not None and owner is not threading.current_thread():
            self._stopped.wait(timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.waiting or self.running or self._commands or self._stop):
                    self._cv.wait()
                if self._stop:
                    break
            try:
                progressed = self.step()
            except Exception as e:  # a bug or OOM must not kill the server: fail the batch
                self._fail_running(e)
                progressed = True
            if not progressed:
                # Queued requests wait for a slot that only pinned adapters hold: do not spin.
                with self._cv:
                    self._cv.wait(0.05)
        self._fail_running(LorakitError("the server is shutting down"))

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration; True if it did any work."""
        self._step_started = time.monotonic()
        try:
            did = self._run_commands()
            joiners = self._admit()
            if joiners:
                self._prefill(joiners)
                self._retire()
            if self.running:
                self._decode()
                self._retire()
                did = True
            return did or bool(joiners)
        finally:
            self._step_started = None

    def _run_commands(self) -> bool:
        did = False
        while True:
            with self._cv:
                if not self._commands:
                    return did
                fn, fut = self._commands.popleft()
            did = True
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _admit(self) -> list[Request]:
        with self._cv:
            candidates = list(self.waiting)
        joiners = []
        for req in candidates:
            if len(self.running) + len(joiners) >= self.max_running:
                break
            if req.cancelled:
                self._dequeue(req)
                self._finish(req, "cancelled")
                continue
            if req.adapter is not None:
                try:
                    slot = self.adapters.acquire(req.adapter)
                except Exception as e:  # a bad adapter fails its own requests only
                    self._dequeue(req)
                    self._fail(req, e if isinstance(e, AdapterError) else AdapterError(
                        f"adapter {req.adapter!r} cannot be loaded: {type(e).__name__}: {e}"))
                    continue
                if slot is None:
                    continue
                req.slot = slot
            self._dequeue(req)
            joiners.append(req)
        return joiners

    def _dequeue(self, req: Request) -> None:
        with self._cv:
            self.waiting.remove(req)

    def _forward(self, ids, mask, positions, cache, slots: list[int]):
        self.batch.set(slots, self.device)
        try:
            out = self.model(**with_cache(self.model, cache, dict(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)))
        finally:
            self.batch.clear()
        return out.logits[:, -1], cache_of(out)  # (B, V)

    def _prefill(self, joiners: list[Request]) -> None:
        """Prefill the newcomers and join them to the running batch. With a prefix cache, the
        ones with a cached prefix run as their own group, from the end of that prefix."""
        if self.prefix is None:
            self._prefill_group(joiners, [[] for _ in joiners], [None] * len(joiners))
            return
        keys = [self._prefix_key(r) for r in joiners]
        found = [self.prefix.match(k, r.prompt_ids) for k, r in zip(keys, joiners)]
        hit = [i for i, f in enumerate(found) if f]
        miss = [i for i, f in enumerate(found) if not f]
        for group in (hit, miss):
            if group:
                self._prefill_group([joiners[i] for i in group], [found[i] for i in group],
                                    [keys[i] for i in group])

    def _prefix_key(self, req: Request):
        return None if req.adapter is None else self.adapters.weights_key(req.adapter)

    def _prefill_group(self, joiners: list[Request], cached: list[list[torch.Tensor]], keys: list
                       ) -> None:
        """One left-padded forward over the joiners' uncached tokens (`cached`: each one's
        prefix cache blocks).

        Every row computes the same number S of new tokens (the most any row needs); a row with
        a longer cached prefix than it then needs uses only its first L - S cached tokens. So the
        cached part, right-aligned before the new tokens, and the new tokens form one contiguous
        left-padded row, the layout `BatchKV.join` takes, and no row is padded inside.
        """
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in joiners]
        have = [sum(b.shape[3] for b in blocks) for blocks in cached]
        new = max(n - h for n, h in zip(lengths, have))
        used = [max(n - new, 0) for n in lengths]
        past = max(used)
        ids, mask = left_pad([r.prompt_ids[u:] for r, u in zip(joiners, used)], self.pad_id,
                             self.device)
        cache = DynamicCache()
        if past:
            mask = torch.cat([self._past_mask(used, past), mask], dim=1)
            for layer, (k, v) in enumerate(self._past_kv(cached, used, past)):
                cache.update(k, v, layer)
        positions = positions_from_mask(mask)[:, past:]
        try:
            logits, cache = self._forward(ids, mask, positions, cache, [r.slot for r in joiners])
        except Exception as e:  # the running batch is untouched; find the newcomer at fault
            if len(joiners) > 1:
                for r, blocks, key in zip(joiners, cached, keys):
                    self._prefill_group([r], [blocks], [key])
                return
            r = joiners[0]
            self._fail(r, e)
            if r.adapter is not None:
                self.adapters.release(r.adapter)
            return
        self.prompt_tokens += sum(lengths)
        self.prefix_hit_tokens += sum(used)
        if self.prefix is not None:
            self._remember(joiners, keys, cache)
        self.kv.join(cache, lengths)
        self.running.extend(joiners)
        self._take(joiners, logits)

    def _past_mask(self, used: list[int], past: int) -> torch.Tensor:
        cols = torch.arange(past, device=self.device)
        return (cols[None] >= torch.tensor([past - u for u in used], device=self.device)[:, None]
                ).long()

    def _past_kv(self, cached: list[list[torch.Tensor]], used: list[int], past: int):
        """Per layer (keys, values) (J, kv heads, past, head dim): row i's first used[i] cached
        tokens, copied from its blocks, right-aligned, zeros (masked) before them."""
        like = next(blocks[0] for blocks, u in zip(cached, used) if u)
        n_layers, _, heads, _, dim = like.shape
        kv = like.new_zeros(n_layers, 2, len(cached), heads, past, dim)
        for i, (blocks, u) in enumerate(zip(cached, used)):
            col = past - u
            for block in blocks:
                n = min(block.shape[3], past - col)
                if n <= 0:
                    break
                kv[:, :, i, :, col:col + n] = block[:, :, :, :n]
                col += n
        return [(kv[layer, 0], kv[layer, 1]) for layer in range(n_layers)]

    def _remember(self, joiners: list[Request], keys: list, cache) -> None:
        """Store the whole blocks of each joiner's prompt in the prefix cache."""
        layers = cache.layers
        width = layers[0].keys.shape[2]
        for row, (req, key) in enumerate(zip(joiners, keys)):
            first = width - len(req.prompt_ids)

            def kv_of(start, end, row=row, first=first):
                cols = slice(first + start, first + end)
                return torch.stack([torch.stack([l.keys[row, :, cols], l.values[row, :, cols]])
                                    for l in layers])

            self.prefix.insert(key, req.prompt_ids, kv_of)

    def _decode(self) -> None:
        ids = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)
        mask, positions = self.kv.step_inputs(self.device)
        logits, _ = self._forward(ids, mask, positions, self.kv, [r.slot for r in self.running])
        self.kv.advance()
        self._take(self.running, logits)

    def _take(self, reqs: list[Request], logits: torch.Tensor) -> None:
        params = [r.params for r in reqs]
        raw = logits
        logits = adjust_logits(logits, params, [r.output_ids for r in reqs])
        logits = mask_logits(logits, [r.constraint for r in reqs])
        tokens = next_tokens(logits, params, [r.generator for r in reqs])
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = dict(zip(wanted, raw[wanted].float().log_softmax(-1))) if wanted else {}
        now = time.monotonic()
        self.generated_tokens += len(tokens)
        self._recent.append((now, len(tokens)))
        for row, (req, token) in enumerate(zip(reqs, tokens)):
            if isinstance(token, SamplingError):  # this row alone; `_retire` drops it
                self._fail(req, token if req.adapter is None else AdapterError(
                    f"adapter {req.adapter!r} failed on this request: {token}"))
                continue
            if req.first_token_at is None:
                req.first_token_at = now
            end = token in self.eos_ids and (not req.params.ignore_eos or req.constraint is not None)
            if row in logprobs and not end:
                req.logprobs.append((token, *top_logprobs(logprobs[row], token,
                                                          req.params.logprobs)))
            if req.constraint is not None and not end:
                refused = req.constraint.accept(token)
                if refused is not None:
                    self._fail(req, SamplingError(f"the grammar refused token {token}: {refused}"))
                    continue
            self._append(req, token, end)
            if req.constraint is not None and not req.finished and req.constraint.finished:
                self._stream(req, final=True)  # the grammar is complete: nothing may follow
                self._finish(req, "stop")

    def _append(self, req: Request, token: int, end: bool | None = None) -> None:
        """Add one token; decide whether the request ends (end of turn, stop string, length).
        `end`: the token ends the turn (default: an end-of-turn token, unless ignore_eos)."""
        req.output_ids.append(token)
        p = req.params
        if end if end is not None else (token in self.eos_ids and not p.ignore_eos):
            req.output_ids.pop()  # the end-of-turn token is not part of the answer
            self._stream(req, final=True)
            self._finish(req, "stop")
            return
        before = len(req.text)
        req.text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if p.stop:
            cut = find_stop(req.text, p.stop, before)
            if cut != -1:
                req.text = req.text[:cut]
                self._stream(req, final=True)
                self._finish(req, "stop")
                return
        total = len(req.prompt_ids) + len(req.output_ids)
        if len(req.output_ids) >= p.max_tokens or total >= self.max_model_len:
            self._stream(req, final=True)
            self._finish(req, "length")
            return
        if req.cancelled:
            self._finish(req, "cancelled")
            return
        self._stream(req, final=False)

    def _stream(self, req: Request, final: bool) -> None:
        upto = len(req.text) if final else safe_prefix_len(req.text, req.params.stop)
        if upto > req.sent:
            req._emit("text", req.text[req.sent:upto])
            req.sent = upto

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.finished[reason] += 1
        req._emit("done", reason)
        req.done.set()

    def _fail(self, req: Request, error: Exception) -> None:
        req.error = error
        req.finish_reason = "error"
        self.finished["error"] += 1
        req._emit("error", error)
        req.done.set()

    def _retire(self) -> None:
        """Drop finished rows from the batch and give their slots back. The cache fills the holes
        with the last rows, and `running` follows its new row order."""
        keep = [i for i, r in enumerate(self.running) if not r.finished]
        if len(keep) == len(self.running):
            return
        for r in self.running:
            if r.finished and r.adapter is not None:
                self.adapters.release(r.adapter)
        self.running = [self.running[i] for i in self.kv.retire(keep)]

    def _fail_running(self, error: Exception) -> None:
        for r in self.running:
            if not r.finished:
                self._fail(r, error)
        self._retire()

    # -- reporting ---------------------------------------------------------------------------

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - window:
            self._recent.popleft()
        recent = list(self._recent)
        return sum(n for _, n in recent) / window if recent else 0.0


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Token ids that end a turn: the tokenizer's eos, every family's end-of-turn token
    (lorakit.models.families: <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|> ...), <|endoftext|>,
    and whatever the model's generation config names."""
    from lorakit.models.families import end_of_turn_tokens

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for tok in end_of_turn_tokens() + ("<|endoftext|>",):
        if tok in vocab:
            ids.add(vocab[tok])
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    return ids
