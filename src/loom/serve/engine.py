"""The serving engine: continuous batching over a paged KV cache, with chunked prefill.

Every step packs the next token of each decoding sequence and chunks of waiting prompts into one
row of at most `step_tokens` tokens (decodes first, so a long prompt never stalls them), runs
the model once, and samples for the sequences whose row reached their last known token. New
requests join at any step, finished ones leave at once and give their blocks back. When the
cache runs out, the most recently admitted sequence is preempted: its blocks are freed and it
is recomputed later from its prompt and the tokens it already produced (which are kept).

The engine runs in its own thread; the HTTP layer submits sequences and receives their events
through a callback (called from the engine thread).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tokenizers import Tokenizer

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.sampling import sample_next, sampling_probs, verify_draft
from loom.serve.kv_cache import BlockAllocator, PrefillChunk, StepLayout, block_hashes


class QueueFull(LoomError):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI's names); temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]


@dataclass
class SequenceEvent:
    """New text of one sequence (possibly empty), and why it ended once it has."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class StepBatch:
    """One forward pass: the packed row, its positions, where logits are wanted, the cache
    layout and the active adapter of each token (-1: the base model)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    logits_at: torch.Tensor
    layout: StepLayout
    adapters: torch.Tensor | None = None


class ModelRunner(Protocol):
    """Runs a step's forward pass: one process, or rank 0 of a tensor-parallel group."""

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits [len(logits_at), vocab] of the step."""
        ...


class TokenConstraint(Protocol):
    """What a sequence may generate next (a grammar: JSON schema, tool calls), consulted at
    every sampled token."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [vocab] with the tokens the constraint forbids now set to -inf."""
        ...

    def accept(self, token: int) -> bool:
        """Advance over the sampled token; True when the constrained text is complete (the
        sequence stops there)."""
        ...


class Sequence:
    """One generated completion (a request with `n` > 1 has n of them)."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[SequenceEvent], None],
        adapter: int = -1,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.adapter = adapter
        self.constraint = constraint
        self.output_ids: list[int] = []
        self.stop_token: int | None = None  # the end-of-text token that ended it (not output)
        self.blocks: list[int] = []
        self.computed = 0  # tokens whose keys/values are in the cache
        self.block_hashes: list[bytes] = []  # of its full blocks' prefixes, as far as known
        self.registered = 0  # leading blocks offered to the prefix cache
        self.drafts: list[int] = []  # tokens proposed for this step, verified after it
        self.draft_room = 0  # how many a draft model proposes this step
        self.draft_probs: list[torch.Tensor | None] = []  # its distribution of each (sampled)
        self.draft_computed = 0  # tokens whose keys/values are in the draft model's cache
        self.text = ""
        self.sent = 0  # characters of `text` already sent
        self.pending_logprobs: list[TokenLogprob] = []
        self.pending_ids: list[int] = []
        self.finished = False
        self.arrived = time.perf_counter()
        self.admitted = False
        self.first_token_at: float | None = None
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else random.getrandbits(63)
        )

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences decoded together
    max_queue: int = 256  # waiting sequences before 429
    step_tokens: int = 256  # tokens of one forward pass (decodes + prompt chunks)
    block_size: int = 16
    num_blocks: int = 1024
    prefix_cache: bool = True  # reuse the cached blocks of a prompt's known prefix
    # Propose tokens to verify in one pass: "ngram" (prompt lookup) or "draft" (a small model)
    speculate: str | None = None
    speculate_tokens: int = 4  # proposed per sequence and step

    def __post_init__(self) -> None:
        names = ("max_batch", "max_queue", "step_tokens", "block_size", "num_blocks")
        for name in (*names, "speculate_tokens"):
            if getattr(self, name) < 1:
                raise LoomError(f"--{name.replace('_', '-')} must be at least 1")
        if self.speculate not in (None, "ngram", "draft"):
            raise LoomError(f"speculate={self.speculate!r}: use ngram or draft")


class EngineMetrics(Protocol):
    def step(self, running: int, waiting: int, blocks_used: int, tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def admitted(self, seconds: float) -> None: ...
    def prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None: ...
    def speculated(self, proposed: int, accepted: int) -> None: ...
    def finished(
        self, reason: str, seconds: float, prompt_tokens: int, completion_tokens: int
    ) -> None: ...
    def preempted(self) -> None: ...


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        stop_ids: set[int],
        max_seq_len: int,
        config: EngineConfig,
        metrics: EngineMetrics | None = None,
        draft: ModelRunner | None = None,
    ) -> None:
        if (config.speculate == "draft") != (draft is not None):
            raise LoomError("speculate='draft' needs a draft model's runner, and only it does")
        self.runner = runner
        self.draft = draft  # a smaller model over the same tokens and KV block ids
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_seq_len = max_seq_len
        self.config = config
        self.metrics = metrics
        self.allocator = BlockAllocator(config.num_blocks, config.prefix_cache)
        self.capacity = config.num_blocks * config.block_size  # tokens the cache holds
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborted: set[Sequence] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.preemptions = 0

    # -- called from other threads ---------------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse what could never be served: beyond the model's context or the whole cache."""
        total = prompt_tokens + max_tokens
        if total > self.max_seq_len:
            raise LoomError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{total} tokens, beyond the model's context of {self.max_seq_len}; shorten the "
                "prompt or lower max_tokens"
            )
        if total > self.capacity:
            raise LoomError(
                f"the prompt plus max_tokens ({total} tokens) exceeds the KV cache of "
                f"{self.capacity} tokens; lower max_tokens or start the server with a larger cache"
            )

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all or none: a request's `n` choices are admitted together)."""
        for seq in sequences:
            self.check_fits(len(seq.prompt_ids), seq.params.max_tokens)
        with self._lock:
            if len(self.waiting) + len(sequences) > self.config.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({len(self.waiting)} waiting); retry later"
                )
            self.waiting.extend(sequences)
        self._wake.set()

    def abort(self, sequences: list[Sequence]) -> None:
        """Stop sequences whose client went away; their blocks are freed at the next step."""
        with self._lock:
            self._aborted.update(s for s in sequences if not s.finished)
        self._wake.set()

    def start(self) -> None:
        """Run the engine in a background thread (`run_forever` keeps it in this thread)."""
        self._thread = threading.Thread(target=self.run_forever, name="loom-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # -- the engine thread -------------------------------------------------------------------

    def run_forever(self) -> None:
        """Step while there is work, until `stop`. `loom serve` runs it in the main thread:
        PyTorch's CPU kernels run ≈ 12 % slower when called from a second thread."""
        while not self._stop.is_set():
            if not self.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a failed step fails its sequences, never the server
                logger.exception("engine step failed")
                for seq in self.running + list(self.waiting):
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
                self.running.clear()
                with self._lock:
                    self.waiting.clear()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._aborted)

    def step(self) -> int:
        """One scheduling round and forward pass; returns the number of tokens it ran."""
        self._drop_aborted()
        self._admit()
        plan = self._schedule()
        if plan:
            batch, samplers = self._pack(plan)
            logits = self.runner.forward(batch)
            for seq, n in plan:
                seq.computed += n - len(seq.drafts)  # (drafts count once accepted)
                if not seq.drafts:
                    self._register_blocks(seq)
            row = 0
            for seq in samplers:
                if seq.drafts:
                    rows = len(seq.drafts) + 1
                    self._verify(seq, logits[row : row + rows])
                    row += rows
                else:
                    self._sample(seq, logits[row])
                    row += 1
            self.running = [s for s in self.running if not s.finished]
        tokens = sum(n for _, n in plan)
        if self.metrics is not None:
            used = self.allocator.num_blocks - self.allocator.num_free
            self.metrics.step(len(self.running), len(self.waiting), used, tokens)
        return tokens

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if aborted:
                self.waiting = deque(s for s in self.waiting if s not in aborted)
        for seq in aborted:
            self._finish(seq, "abort")
        if aborted:
            self.running = [s for s in self.running if s not in aborted]

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) < self.config.max_batch:
                seq = self.waiting.popleft()
                self.running.append(seq)
                if not seq.admitted:
                    seq.admitted = True
                    if self.metrics is not None:
                        self.metrics.admitted(time.perf_counter() - seq.arrived)

    # -- the prefix cache ------------------------------------------------------------------

    def _hashes(self, seq: Sequence, blocks: int) -> list[bytes]:
        """The prefix hashes of the first `blocks` full blocks of the sequence (extended as
        its tokens grow; the adapter is part of the key)."""
        known = seq.block_hashes
        if len(known) < blocks:
            bs = self.config.block_size
            tokens = seq.ids[len(known) * bs : blocks * bs]
            parent = known[-1] if known else b""
            known += block_hashes(tokens, bs, seq.adapter, parent)
        return known[:blocks]

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a sequence with no cache after the cached blocks of its longest known prefix
        (at least its last token is computed: its logits are needed)."""
        if not self.config.prefix_cache:
            return
        bs = self.config.block_size
        seq.blocks = self.allocator.lookup(self._hashes(seq, (len(seq.ids) - 1) // bs))
        seq.registered = len(seq.blocks)
        seq.computed = len(seq.blocks) * bs
        seq.draft_computed = 0  # (a draft model's keys in shared blocks are not known good)
        if self.metrics is not None:
            self.metrics.prefix_lookup(len(seq.ids), seq.computed)

    def _register_blocks(self, seq: Sequence) -> None:
        """Offer the blocks a step filled to the prefix cache."""
        full = seq.computed // self.config.block_size
        if not self.config.prefix_cache or full <= seq.registered:
            return
        hashes = self._hashes(seq, full)[seq.registered :]
        for block, h in zip(seq.blocks[seq.registered : full], hashes, strict=True):
            self.allocator.register(block, h)
        seq.registered = full

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.config.block_size)

    def _preempt(self, victim: Sequence) -> None:
        """Free a sequence's cache and queue it first; it is recomputed from its tokens."""
        self.allocator.free(victim.blocks)
        victim.blocks, victim.computed, victim.registered, victim.drafts = [], 0, 0, []
        victim.draft_room, victim.draft_probs, victim.draft_computed = 0, [], 0
        self.running.remove(victim)
        with self._lock:
            self.waiting.appendleft(victim)
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preempted()
        logger.debug("KV cache full: preempted a sequence of %d tokens", len(victim.ids))

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) for this step, with cache blocks allocated for them."""
        decoding = [s for s in self.running if s.computed == len(s.ids) - 1]
        prefilling = [s for s in self.running if s.computed < len(s.ids) - 1]
        budget = max(self.config.step_tokens - len(decoding), 0)
        wanted: list[tuple[Sequence, int]] = []
        for seq in decoding:
            room = self._room(seq, budget)
            if self.config.speculate == "ngram":
                seq.drafts = propose_ngram(seq.ids, room) if room else []
                room = len(seq.drafts)
            seq.draft_room = room if self.config.speculate == "draft" else 0
            budget -= room
            wanted.append((seq, 1 + room))
        for seq in prefilling:
            if budget == 0:
                break
            if not seq.blocks:  # new, or preempted: start after its cached prefix
                self._reuse_prefix(seq)
            n = min(len(seq.ids) - seq.computed, budget)
            wanted.append((seq, n))
            budget -= n
        plan: list[tuple[Sequence, int]] = []
        for seq, n in wanted:
            if seq not in self.running:  # preempted to make room for an earlier one
                continue
            need = self._blocks_for(seq.computed + n) - len(seq.blocks)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                plan = [(s, k) for s, k in plan if s is not victim]
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            if need > 0:
                seq.blocks += self.allocator.allocate(need)
            plan.append((seq, n))
        if self.draft is not None:
            self._draft([seq for seq, _ in plan if seq.draft_room])
        return plan

    def _pack(self, plan: list[tuple[Sequence, int]]) -> tuple[StepBatch, list[Sequence]]:
        rows: list[Row] = []
        samplers: list[Sequence] = []
        for seq, n in plan:
            ids = seq.ids + seq.drafts
            # Logits after its last token and each proposed one; else at its last known token.
            wanted = n if seq.drafts else int(seq.computed + n == len(ids))
            if wanted:
                samplers.append(seq)
            rows.append(Row(seq, ids[seq.computed : seq.computed + n], seq.computed, wanted))
        return self._batch(rows, with_adapters=True), samplers

    def _batch(self, rows: list[Row], with_adapters: bool) -> StepBatch:
        """One forward pass over `rows`, packed in one row of tokens."""
        bs = self.config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_at: list[int] = []
        adapters: list[int] = []
        decode_rows: list[int] = []
        decode_seqs: list[tuple[Sequence, int]] = []
        chunks: list[PrefillChunk] = []
        for row in rows:
            seq, n, start = row.seq, len(row.tokens), len(tokens)
            tokens += row.tokens
            for pos in range(row.start, row.start + n):
                positions.append(pos)
                slots.append(seq.blocks[pos // bs] * bs + pos % bs)
            adapters += [seq.adapter] * n
            logits_at += range(start + n - row.logits, start + n)
            if n == 1 and row.start > 0:
                decode_rows.append(start)
                decode_seqs.append((seq, row.start + 1))
            else:
                blocks = seq.blocks[: self._blocks_for(row.start + n)]
                chunks.append(PrefillChunk(start, n, row.start, torch.tensor(blocks)))
        return StepBatch(
            tokens=torch.tensor([tokens]),
            positions=torch.tensor(positions),
            logits_at=torch.tensor(logits_at, dtype=torch.long),
            layout=_step_layout(slots, decode_rows, decode_seqs, chunks),
            adapters=torch.tensor(adapters)
            if with_adapters and any(a >= 0 for a in adapters)
            else None,
        )

    # -- speculative decoding ----------------------------------------------------------------

    def _room(self, seq: Sequence, budget: int) -> int:
        """How many tokens may be proposed after a decoding sequence's last one this step."""
        if self.config.speculate is None or seq.constraint is not None or not seq.computed:
            return 0
        room = min(
            self.config.speculate_tokens,
            budget,
            seq.params.max_tokens - len(seq.output_ids) - 1,  # (one more comes with them)
            self.max_seq_len - len(seq.ids) - 1,
        )
        return max(room, 0)

    def _draft(self, seqs: list[Sequence]) -> None:
        """The draft model's proposals, one token per pass for every sequence at once; the
        first pass also gives it the tokens its cache lacks (the prompt, the last accepted
        ones). Its keys and values live in its own cache under the sequence's block ids."""
        assert self.draft is not None
        for _ in range(max((s.draft_room for s in seqs), default=0)):
            active = [s for s in seqs if len(s.drafts) < s.draft_room]
            rows = []
            for seq in active:
                ids = seq.ids + seq.drafts
                rows.append(Row(seq, ids[seq.draft_computed :], seq.draft_computed, 1))
                seq.draft_computed = len(ids)
            logits = self.draft.forward(self._batch(rows, with_adapters=False))
            for seq, row in zip(active, logits, strict=True):
                p = seq.params
                if p.temperature <= 0:
                    seq.drafts.append(int(row.argmax()))
                    seq.draft_probs.append(None)
                    continue
                probs = sampling_probs(row[None], p.temperature, 0, p.top_p)[0]
                seq.drafts.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
                seq.draft_probs.append(probs)

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Accept the proposed tokens while the target agrees ([proposed + 1, vocab] logits:
        after the last token and after each proposal), then add the target's own next token;
        the accepted ones' keys and values are already in the cache."""
        drafts, seq.drafts = seq.drafts, []
        probs = seq.draft_probs or [None] * len(drafts)  # (prompt lookup: certain proposals)
        seq.draft_probs, seq.draft_room = [], 0
        p = seq.params
        accepted = 0
        for row, draft in enumerate(drafts):
            ok, token = verify_draft(
                logits[row], draft, p.temperature, p.top_p, seq.generator, probs[row]
            )
            self._append(seq, token, logits[row])
            if not ok or seq.finished:
                break
            accepted += 1
            seq.computed += 1
        else:
            self._sample(seq, logits[len(drafts)])
        if self.metrics is not None:
            self.metrics.speculated(len(drafts), accepted)
        # The draft's cache holds what it was fed: valid up to the first rejected proposal.
        seq.draft_computed = min(seq.draft_computed, seq.computed)
        if not seq.finished:
            self._register_blocks(seq)

    # -- sampling and output ---------------------------------------------------------------

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.params
        if seq.constraint is not None:
            logits = seq.constraint.mask(logits)
        token = int(sample_next(logits[None], p.temperature, 0, p.top_p, seq.generator)[0])
        self._append(seq, token, logits)

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        """Add a sampled token: stop there (end of text, a stop string, the constraint
        complete, the length), or send the text that is certain."""
        p = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token(seq.first_token_at - seq.arrived)
        if token in self.stop_ids:
            seq.stop_token = token
            self._finish(seq, "stop")
            return
        complete = seq.constraint is not None and seq.constraint.accept(token)
        seq.output_ids.append(token)
        seq.pending_ids.append(token)
        if p.logprobs is not None:
            seq.pending_logprobs.append(self._logprob(logits, token, p.logprobs))
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=False)
        for stop in p.stop:
            at = text.find(stop, max(len(seq.text) - len(stop), 0))
            if at >= 0:
                seq.text = text[:at]
                self._finish(seq, "stop")
                return
        seq.text = text
        if complete:
            self._finish(seq, "stop")
            return
        if len(seq.output_ids) >= p.max_tokens or len(seq.ids) >= self.max_seq_len:
            self._finish(seq, "length")
            return
        # Hold back an unfinished UTF-8 character and what could be the start of a stop string.
        ready = len(text.rstrip("\ufffd"))
        ready -= max((len(s) for s in p.stop), default=1) - 1
        if ready > seq.sent:
            self._emit(seq, seq.text[seq.sent : ready])

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logp, top) if top else None
        alternatives = (
            {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(*best, strict=True)}
            if best is not None
            else {}
        )
        return TokenLogprob(self.tokenizer.decode([token]), float(logp[token]), alternatives)

    def _emit(self, seq: Sequence, text: str, finish_reason: str | None = None) -> None:
        seq.sent += len(text)
        event = SequenceEvent(
            text,
            seq.pending_ids,
            seq.pending_logprobs,
            finish_reason,
            len(seq.prompt_ids),
            len(seq.output_ids),
        )
        seq.pending_ids, seq.pending_logprobs = [], []
        seq.on_event(event)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        if self.metrics is not None:
            self.metrics.finished(
                reason, time.perf_counter() - seq.arrived, len(seq.prompt_ids), len(seq.output_ids)
            )
        text = seq.text[seq.sent :] if reason != "error" else ""
        if error is not None:
            logger.warning("sequence failed: %s", error)
        self._emit(seq, text, reason)


@dataclass
class Row:
    """A sequence's tokens in one forward pass: from position `start`, with logits wanted at
    the last `logits` of them."""

    seq: Sequence
    tokens: list[int]
    start: int
    logits: int


def _step_layout(
    slots: list[int],
    decode_rows: list[int],
    decode_seqs: list[tuple[Sequence, int]],
    chunks: list[PrefillChunk],
) -> StepLayout:
    """The cache layout of one packed step: where each token's key/value goes, and which
    rows decode against which block table (padded to the longest) and how many keys each
    sees."""
    width = max((len(s.blocks) for s, _ in decode_seqs), default=0)
    decode_blocks = torch.tensor(
        [s.blocks + [0] * (width - len(s.blocks)) for s, _ in decode_seqs], dtype=torch.long
    ).view(len(decode_seqs), width)
    return StepLayout(
        write_slots=torch.tensor(slots),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long),
        decode_blocks=decode_blocks,
        decode_lengths=torch.tensor([seen for _, seen in decode_seqs], dtype=torch.long),
        chunks=chunks,
    )


def propose_ngram(ids: list[int], k: int, longest: int = 3) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the
    sequence's last n tokens, for the longest n ≤ `longest` that occurred before."""
    for n in range(min(longest, len(ids) - 1), 0, -1):
        suffix = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == suffix:
                return ids[start + n : start + n + k]
    return []
