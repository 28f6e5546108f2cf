"""Continuous batching: one loop steps the decode core (herd.infer.core) — the same core ``Engine.generate`` runs
— admitting waiting sequences as soon as a row is free; a sequence leaves the batch the step it finishes. The loop
runs on a thread of its own (``start``) or on the caller's (``run``: ``herd serve`` keeps it on the main thread).

Each iteration prefills up to ``prefill_chunk`` prompt tokens (a long prompt delays the running streams by a
chunk, not by the whole prompt; many short ones join in one iteration, batched where exact), then decodes one
token for every running sequence, through the engine's compiled step when it has one.

Every sequence keeps its own sampling parameters and random generator, so a request's output does not depend on
what else is in the batch: greedy rows are the same as ``Engine.generate`` gives alone, and so are seeded sampled
rows. Results leave the thread through each sequence's ``on_event`` callback (the server forwards them to its
event loop). Every sequence gets a last event, whatever fails: its own start (a bad seed), its prefill (an
image the vision tower rejects), or a whole step (a bug, out of memory: everything in flight fails, the
scheduler keeps serving). A cancelled sequence (client gone) frees its row at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from herd.infer import core
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams, TokenLogprob

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


class Sequence(core.Sequence):
    """A sequence of the server: where its events go, and what of it was already reported."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
                 pixels: torch.Tensor | None = None, prompt_logprobs: int | None = None):
        super().__init__(prompt, params, pixels, prompt_logprobs)
        self.on_event = on_event
        self.reported = 0  # tokens already in an event
        self.logprobs_sent = 0  # row.logprobs already in an event
        self.scored_sent = False
        self.prompt_counted = False  # its prompt tokens are in Stats
        self.ended = False  # its last event is out
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None


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
        self.core = engine.core(max_batch, self.max_len)
        self.waiting: deque[Sequence] = deque()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._updates: queue.Queue = queue.Queue()  # (weights, done event, [error]) for the scheduler thread
        self._thread: threading.Thread | None = None
        self._stop = False
        self._warm = False  # the compiled step's buckets are compiled

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

    def update_weights(self, weights: Mapping[str, torch.Tensor], timeout: float | None = None) -> None:
        """Load new weights into the live engine between two steps (``Engine.update_weights``): sequences in
        flight are prefilled again on the new weights and go on from there. Returns once applied; raises what
        the engine raised for a bad update (which then changed nothing)."""
        if self._thread is None or not self._thread.is_alive():
            self.engine.update_weights(weights)
            return
        done, error = threading.Event(), []
        self._updates.put((weights, done, error))
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError("the scheduler did not reach a step boundary in time")
        if error:
            raise error[0]

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> list[Sequence]:
        return self.core.running

    @property
    def n_running(self) -> int:
        return self.max_batch - self.core.free_rows

    def warmup(self) -> None:
        """With a compiled engine, compile every batch-size bucket now (once)."""
        if self.engine.compiled and not self._warm:
            t0 = time.monotonic()
            buckets = self.engine.warmup(self.core.cache)
            log.info("compiled the decode step for batch sizes %s in %.0f s", buckets, time.monotonic() - t0)
            self._warm = True

    def start(self) -> Scheduler:
        """Run the loop in a thread of its own (``run`` keeps it on the calling thread)."""
        self.warmup()
        self._stop = False
        self._thread = threading.Thread(target=self.run, name="herd-scheduler", daemon=True)
        self._thread.start()
        return self

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The scheduler loop, on the calling thread, until ``stop`` or ``until()``. ``herd serve`` runs it on the
        main thread, the one that loaded the model: a second thread running torch's CPU kernels starts a second
        OpenMP pool, and with more pool threads than cores GNU OpenMP stops spinning between parallel regions
        (decode steps were ~12% slower on 2 cores)."""
        self.warmup()
        while not self._stop and not until():
            try:
                busy = self.step()
            except Exception as e:  # a bug or an out-of-memory: fail what is in flight, keep serving
                log.exception("scheduler step failed; failing the %d sequences in flight", self.n_running)
                for s in self.core.fail_all(e):
                    self._end(s, "error", f"internal error: {type(e).__name__}: {e}")
                busy = True
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def request_stop(self) -> None:
        """Ask the loop to end after its current step (from any thread)."""
        self._stop = True
        self._wake.set()

    def stop(self) -> None:
        """End the loop and fail what is left: from any thread when the loop has its own (``start``), else from
        the thread that ran ``run``, after it returned."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for s in [*self.core.fail_all(RuntimeError("the server is shutting down")), *self.waiting]:
            self._end(s, "cancelled", "the server is shutting down")
        self.waiting.clear()

    # -- the scheduler thread ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: apply a pending weight update, drop cancelled sequences, admit waiting ones while rows
        are free, prefill up to ``prefill_chunk`` prompt tokens (reporting first tokens at once), then one decode
        step. Returns whether there was anything to do."""
        self._apply_updates()
        self._drop_cancelled()
        busy = self._admit()
        if not self.core.busy:
            return busy
        for seq in self.core.prefill(budget=self.engine.prefill_chunk):  # first tokens go out before the decode
            self._report(seq)
        for seq in self.core.decode():
            self._report(seq)
        self.stats.decode_steps, self.stats.prefill_chunks = self.core.decode_steps, self.core.prefill_forwards
        self.stats.max_running = max(self.stats.max_running, len(self.core.running))
        return True

    def _apply_updates(self) -> None:
        while not self._updates.empty():
            weights, done, error = self._updates.get()
            try:
                self.engine.update_weights(weights)
            except Exception as e:
                error.append(e)
            done.set()

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.waiting):
            with self._lock:
                gone = [s for s in self.waiting if s.cancelled]
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            for s in gone:
                self._end(s, "cancelled")

    def _admit(self) -> bool:
        admitted = False
        while self.waiting and self.core.free_rows:
            with self._lock:
                seq = self.waiting.popleft()
            admitted = True
            if seq.cancelled:
                self._end(seq, "cancelled")
            elif not self.core.add(seq):  # nothing to generate, or it could not start (seq.error)
                self._report(seq)
        return admitted

    def _report(self, seq: Sequence) -> None:
        """Send what is new of a sequence: text, logprobs, and its end when it ended."""
        if seq.ended:
            return
        if seq.cancelled:
            return self._end(seq, "cancelled")
        if seq.error is not None:
            log.warning("sequence failed: %s", seq.error)
            return self._end(seq, "error", f"{type(seq.error).__name__}: {seq.error}")
        row = seq.row
        new = len(row.ids) - seq.reported
        if new:
            self.stats.generated_tokens += new
            seq.reported = len(row.ids)
            if seq.first_token_at is None:
                seq.first_token_at = time.monotonic()
        if not seq.prompt_counted and seq.prefilled == len(seq.feed):
            self.stats.prompt_tokens += len(seq.prompt)
            seq.prompt_counted = True
        delta = row.delta()
        if not (row.done or delta):
            return
        logprobs = None
        if row.logprobs is not None:  # those since the last event, but a stop token's
            end = len(row.logprobs) - (row.reason == "stop_token")
            logprobs, seq.logprobs_sent = row.logprobs[seq.logprobs_sent:end], end
        if row.done:
            self.stats.finished += 1
        seq.ended = row.done
        self._send(seq, Event(delta, len(row.ids), FINISH[row.reason] if row.done else None, logprobs=logprobs))

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if not seq.ended:
            seq.ended = True
            self._send(seq, Event("", len(seq.row.ids) if seq.row is not None else 0, reason, error))

    def _send(self, seq: Sequence, ev: Event) -> None:
        if seq.scored is not None and not seq.scored_sent and seq.prefilled == len(seq.feed):
            ev.prompt_logprobs, seq.scored_sent = seq.scored, True
        try:
            seq.on_event(ev)
        except Exception:  # the receiver is gone: nothing left to tell
            log.debug("could not deliver an event", exc_info=True)
            seq.cancel()
