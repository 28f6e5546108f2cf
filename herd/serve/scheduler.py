"""Continuous batching: one thread owns the model and a batch-shaped KV cache; requests join the running decode
batch as soon as a row is free and leave it the step they finish.

Layout of the cache rows (``max_batch + 1`` of them):
  [0, n)       the running sequences, kept contiguous so a decode step is one forward over ``cache.rows(0, n)``;
               a finished row is filled by moving the last running row into it;
  max_batch    the prefill row: waiting sequences are prefilled there one at a time, at most ``prefill_chunk``
               prompt tokens per scheduler iteration between decode steps (a long prompt delays the running
               streams by a chunk, not by the whole prompt; many short ones join in one iteration); a prefilled
               row is copied to slot n and starts decoding.

Every sequence keeps its own sampling parameters and random generator, so a request's output does not depend on
what else is in the batch: greedy rows are the same as ``Engine.generate`` gives alone, and so are seeded sampled
rows. Results leave the thread through each sequence's ``on_event`` callback (the server forwards them to its
event loop); a cancelled sequence (client gone) frees its row at the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from herd.infer.cache import KVCache
from herd.infer.engine import Engine, Row
from herd.infer.sampling import SamplingParams, TokenLogprob, sample, token_logprobs

log = logging.getLogger("herd.serve")

FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length"}  # herd stop reason -> OpenAI's


class QueueFull(Exception):
    """The waiting queue is at its bound: the server answers 429."""


@dataclass
class Event:
    """What a sequence reports: new text (safe to show), tokens generated so far, and on the last event why it
    ended ("stop", "length", "cancelled" or "error" with ``error`` set). ``logprobs``: of the tokens generated
    since the last event, when asked for (a stop token is not reported)."""

    text: str
    n_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first event, when asked for: prompt tokens 2..T


class Sequence:
    """One completion to generate: a prompt (ids, image tiles), its sampling parameters and where its events go."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
                 pixels: torch.Tensor | None = None, prompt_logprobs: int | None = None):
        """``prompt_logprobs``: also report the prompt tokens' logprobs with this many alternatives."""
        self.prompt, self.params, self.on_event, self.pixels = prompt, params, on_event, pixels
        self.prompt_logprobs = prompt_logprobs
        self.prompt_unsent: list[TokenLogprob] | None = None
        self.row: Row | None = None
        self.generator: torch.Generator | None = None
        self.chunks: Iterator[torch.Tensor | None] | None = None
        self.pending = 0  # the sampled token the next decode step feeds
        self.prefilled = 0  # prompt tokens in the cache so far
        self.cancelled = False
        self.counts: torch.Tensor | None = None  # [V] times each token was generated (presence/frequency penalty)
        self.logprobs_sent = 0  # row.logprobs already in an event
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        """Thread-safe: the scheduler drops the sequence at its next step."""
        self.cancelled = True


@dataclass
class Stats:
    decode_steps: int = 0
    prefill_chunks: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    max_running: int = 0  # the largest decode batch seen


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 256, max_len: int | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        cfg = engine.model.cfg
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.cache = KVCache(cfg, max_batch + 1, self.max_len, engine.dtype, engine.device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self.stats = Stats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- the caller's side (any thread) -----------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (the n choices of one request go in together, or none do). ValueError for a bad
        input, QueueFull when the queue cannot take them all."""
        for s in seqs:
            self.engine.check_inputs([s.prompt], [s.pixels])
            need = len(s.prompt) + s.params.max_new_tokens
            if need > self.max_len:
                raise ValueError(f"prompt ({len(s.prompt)} tokens) + max_new_tokens ({s.params.max_new_tokens}) = "
                                 f"{need} exceeds the server's context of {self.max_len} tokens")
        with self._lock:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
            self.waiting.extend(seqs)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def n_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    def start(self) -> Scheduler:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="herd-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for s in [*self.running, *self.waiting, *([self.prefilling] if self.prefilling else [])]:
            self._finish(s, "cancelled", error="the server is shutting down")
        self.running, self.prefilling = [], None
        self.waiting.clear()

    def _loop(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except Exception as e:  # a bug or an out-of-memory: fail what is in flight, keep serving
                log.exception("scheduler step failed; failing the %d sequences in flight", self.n_running)
                for s in [*self.running, *([self.prefilling] if self.prefilling else [])]:
                    self._finish(s, "error", error=f"internal error: {type(e).__name__}: {e}")
                self.running, self.prefilling = [], None
                busy = True
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    # -- the scheduler thread ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: drop cancelled sequences, prefill up to ``prefill_chunk`` prompt tokens (admitting
        waiting sequences while rows are free: many short prompts join in one iteration), then one decode step.
        Returns whether there was anything to do."""
        self._drop_cancelled()
        busy, budget = False, self.engine.prefill_chunk
        while budget > 0:
            if self.prefilling is None:
                if len(self.running) >= self.max_batch or not self.waiting:
                    break
                with self._lock:
                    seq = self.waiting.popleft()
                self._start_prefill(seq)
            seq, busy = self.prefilling, True
            n = min(self.engine.prefill_chunk, len(seq.prompt) - seq.prefilled)
            self._prefill_chunk()
            seq.prefilled += n
            budget -= n
        if self.running:
            self._decode_step()
            busy = True
        return busy

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.waiting):
            with self._lock:
                gone = [s for s in self.waiting if s.cancelled]
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            for s in gone:
                self._finish(s, "cancelled")
        if self.prefilling is not None and self.prefilling.cancelled:
            self._finish(self.prefilling, "cancelled")
            self.prefilling = None
        for s in [s for s in self.running if s.cancelled]:
            self._retire(s, "cancelled")

    def _start_prefill(self, seq: Sequence) -> None:
        engine, slot = self.engine, self.max_batch
        seq.row = Row(seq.prompt, engine.tokenizer, seq.params, engine.stop_ids(seq.params))
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=engine.device).manual_seed(seq.params.seed)
        if seq.params.counts_output:
            seq.counts = torch.zeros(engine.model.cfg.vocab_size, dtype=torch.int32, device=engine.device)
        self.cache.reset_row(slot)
        want = None
        if seq.prompt_logprobs is not None:
            seq.prompt_unsent = []
            want = (seq.prompt_logprobs, seq.prompt_unsent)
        seq.chunks = engine.prefill_chunks(self.cache.row(slot), seq.prompt, seq.pixels, want)
        self.prefilling = seq

    def _prefill_chunk(self) -> None:
        seq = self.prefilling
        try:
            logits = next(seq.chunks)
        except Exception as e:  # e.g. an image the vision tower rejects: this request fails, not the batch
            log.warning("prefill failed: %s", e)
            self.prefilling = None
            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return
        self.stats.prefill_chunks += 1
        if logits is None:
            return
        self.prefilling, seq.chunks = None, None
        self.stats.prompt_tokens += len(seq.prompt)
        if seq.params.max_new_tokens == 0:
            self._finish(seq, "length")
            return
        (token, logprob), = self._sample(logits[None], [seq])
        if self._push(seq, token, logprob):
            self.stats.finished += 1
            return
        slot = len(self.running)
        self.cache.copy_row(self.max_batch, slot)
        self.running.append(seq)
        self.stats.max_running = max(self.stats.max_running, len(self.running))

    def _decode_step(self) -> None:
        n = len(self.running)
        ids = torch.tensor([[s.pending] for s in self.running], device=self.engine.device)
        logits = self.engine.model(ids, cache=self.cache.rows(0, n), last_only=True)[:, -1].float()
        self.stats.decode_steps += 1
        for seq, (token, logprob) in zip(list(self.running), self._sample(logits, self.running)):
            if self._push(seq, token, logprob):
                self._retire(seq, None)

    def _sample(self, logits_BV: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        """Each row by its own parameters: plain greedy rows share one argmax, the others go through their own
        logit adjustments and generator (the draws equal what ``Engine.generate`` makes for that request alone).
        With each token, its logprobs when the row asked for them."""
        out = logits_BV.argmax(-1).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        for b, seq in enumerate(seqs):
            p = seq.params
            if not p.greedy or p.adjusts_logits:
                counts = seq.counts[None] if seq.counts is not None else None
                out[b] = sample(logits_BV[b:b + 1], p, generator=seq.generator, counts_BV=counts).item()
            if p.logprobs is not None:
                chosen = torch.tensor([out[b]], device=logits_BV.device)
                logprobs[b] = token_logprobs(logits_BV[b:b + 1], chosen, p.logprobs)[0]
        return list(zip(out, logprobs))

    def _push(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a sampled token and report the new text; True when the sequence is done."""
        row = seq.row
        row.push(token, logprob)
        seq.pending = token
        if seq.counts is not None:
            seq.counts[token] += 1
        self.stats.generated_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        delta = row.delta()
        if row.done or delta:
            logprobs = None
            if row.logprobs is not None:  # those since the last event, but a stop token's
                end = len(row.logprobs) - (row.reason == "stop_token")
                logprobs, seq.logprobs_sent = row.logprobs[seq.logprobs_sent:end], end
            seq.on_event(Event(delta, len(row.ids), FINISH[row.reason] if row.done else None, logprobs=logprobs,
                               prompt_logprobs=self._take_prompt_logprobs(seq)))
        return row.done

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        out, seq.prompt_unsent = seq.prompt_unsent, None
        return out

    def _retire(self, seq: Sequence, reason: str | None) -> None:
        """Free a running sequence's row: the last running row moves into it, keeping [0, n) contiguous."""
        slot, last = self.running.index(seq), len(self.running) - 1
        if slot != last:
            self.cache.copy_row(last, slot)
            self.running[slot] = self.running[last]
        self.running.pop()
        if reason is not None:
            self._finish(seq, reason)
        else:
            self.stats.finished += 1

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        n = len(seq.row.ids) if seq.row is not None else 0
        try:
            seq.on_event(Event("", n, reason, error, prompt_logprobs=self._take_prompt_logprobs(seq)))
        except Exception:  # the receiver is gone: nothing left to tell
            log.debug("could not deliver the end of a sequence", exc_info=True)
