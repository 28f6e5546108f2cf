"""The decode core: the one place where sequences run through the model. ``Engine.generate`` / ``stream`` drive it
to completion, the server's scheduler steps it from its thread, RL rollouts step it too. It owns the KV cache
rows, the prefill chunks, every sequence's sampling state (generator, penalty counts, logprobs) and calls the
runner's (compiled) decode step.

Rows of the cache:
  [0, n)   the running sequences, contiguous, so that a decode step is one forward over them (compiled: over a
           batch-size bucket, the rows past n riding along as padding); a finished row is filled by moving
           the last running row into it;
  others   free, or holding a sequence being prefilled, which moves to row n when its prompt is in.

A step prefills up to a budget of prompt tokens, then decodes one token for every running sequence. Prefill is
batched where that is exact: several prompts whose next chunks have the same length and sit in adjacent rows go
through one forward (every row keeps its own positions), and identical prompts (the n choices of a request, an
RL group) are prefilled once and the row copied.

Every sequence samples with its own parameters and generator, so its output does not depend on the batch: a
greedy sequence gives what it gives alone, and so does a seeded one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from herd.infer.runner import ModelRunner
from herd.infer.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from herd.tokenizer import Tokenizer


class Row:
    """A sequence's output so far: ids, incremental text, stop rules."""

    def __init__(self, prompt: list[int], tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: set[int]):
        self.prompt, self.ids, self.params, self.stop_ids = prompt, [], params, stop_ids
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.text, self.emitted, self.reason = "", 0, None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        self.ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.reason = "stop_token"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            for s in self.params.stop:
                cut = self.text.find(s)
                if cut >= 0:
                    self.text, self.reason = self.text[:cut], "stop_string"
        if self.reason is None and len(self.ids) >= self.params.max_new_tokens:
            self.reason = "length"
        if self.reason is not None and self.reason != "stop_string" and self.decoder is not None:
            self.text += self.decoder.flush()

    def delta(self) -> str:
        """New text safe to show: while generating, hold back a tail that may still become a stop string."""
        end = len(self.text)
        if not self.done:
            for s in self.params.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


class Sequence:
    """One completion to generate: a prompt (ids, image tiles [N, 3, H, W] for its <|patch|> spans) and its
    sampling parameters. ``prompt_logprobs``: also score the prompt tokens, with this many alternatives."""

    def __init__(self, prompt: list[int], params: SamplingParams, pixels: torch.Tensor | None = None,
                 prompt_logprobs: int | None = None):
        self.prompt, self.params, self.pixels, self.prompt_logprobs = prompt, params, pixels, prompt_logprobs
        self.row: Row | None = None
        self.error: Exception | None = None  # why the core gave up on it
        self.cancelled = False
        self.scored: list[TokenLogprob] | None = None  # prompt logprobs, once the prompt is in
        # the core's bookkeeping
        self.slot: int | None = None
        self.feed: list[int] = prompt  # what to prefill: the prompt, or more after a weight update
        self.prefilled = 0
        self.pending = 0  # the sampled token the next decode step feeds
        self.resume = False  # re-prefilled after a weight update: its next token is already sampled
        self.features: torch.Tensor | None = None
        self.features_used = 0
        self.followers: list[Sequence] = []  # identical prompts waiting for this one's prefill
        self.generator: torch.Generator | None = None
        self.counts: torch.Tensor | None = None  # [V] times each token was generated (presence/frequency)
        self.seen: torch.Tensor | None = None  # [V] tokens of prompt or output (repetition penalty)

    def cancel(self) -> None:
        """Thread-safe: the core drops the sequence at its next step."""
        self.cancelled = True


class DecodeCore:
    def __init__(self, runner: ModelRunner, max_batch: int, max_len: int, min_bucket: int = 1):
        """``max_batch`` sequences at once, each at most ``max_len`` tokens (prompt + completion). A compiled
        decode step runs over at least ``min_bucket`` rows (a batch started together keeps one graph)."""
        self.runner, self.max_batch, self.min_bucket = runner, max_batch, min_bucket
        self.cache = runner.new_cache(max_batch, max_len)
        self.max_len = self.cache.max_len
        self.slots: list[Sequence | None] = [None] * max_batch
        self.running: list[Sequence] = []  # running[i] is in row i
        self.prefilling: list[Sequence] = []  # oldest first; followers are not listed (they wait on a leader)
        self.version = runner.weights_version
        self.decode_steps = self.prefill_forwards = 0

    # -- admission ------------------------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.slots.count(None)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.prefilling)

    def add(self, seq: Sequence) -> bool:
        """Take a sequence into a free row (ValueError when none is free); False when it ended at once (no
        token to generate, or it failed to start: ``seq.error``)."""
        slot = self.slots.index(None) if None in self.slots else None
        if slot is None:
            raise ValueError("the decode core has no free row")
        try:
            self._start(seq)
        except Exception as e:  # e.g. a seed torch refuses: this sequence fails, nothing else
            seq.error = e
            return False
        if seq.row.done and seq.prompt_logprobs is None:
            return False
        seq.slot, self.slots[slot] = slot, seq
        self.cache.reset_row(slot)
        leader = next((s for s in self.prefilling if s.prefilled == 0 and s.feed == seq.feed and s.pixels is None
                       and seq.pixels is None and s.prompt_logprobs == seq.prompt_logprobs), None)
        if leader is not None:
            leader.followers.append(seq)
        else:
            self.prefilling.append(seq)
        return True

    def _start(self, seq: Sequence) -> None:
        runner, p = self.runner, seq.params
        seq.row = Row(list(seq.prompt), runner.tokenizer, p, runner.stop_ids(p))
        if p.max_new_tokens == 0:
            seq.row.reason = "length"
        if p.seed is not None:
            seq.generator = torch.Generator(device=runner.device).manual_seed(p.seed)
        vocab = runner.model.cfg.vocab_size
        if p.counts_output:
            seq.counts = torch.zeros(vocab, dtype=torch.int32, device=runner.device)
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros(vocab, dtype=torch.bool, device=runner.device)
            seq.seen[torch.tensor(seq.prompt, device=runner.device)] = True
        if seq.prompt_logprobs is not None:
            seq.scored = []

    # -- one step -------------------------------------------------------------------------------------------------
    def step(self, budget: int | None = None, decode: bool = True) -> list[Sequence]:
        """``prefill(budget)``, then (``decode``) ``decode()``: the sequences that got a token or ended."""
        changed = self.prefill(budget)
        return changed + self.decode() if decode else changed

    @torch.inference_mode()
    def prefill(self, budget: int | None = None) -> list[Sequence]:
        """Drop cancelled sequences, then prefill up to ``budget`` prompt tokens (None: every waiting prompt).
        Returns the sequences that got their first token or ended (those that ended have left the core)."""
        changed: list[Sequence] = []
        self._drop_cancelled(changed)
        if self.version != self.runner.weights_version:
            self._restart()
        left = float("inf") if budget is None else budget
        while left > 0 and self.prefilling:
            left -= self._prefill(self._prefill_group(left), changed)
        return changed

    @torch.inference_mode()
    def decode(self) -> list[Sequence]:
        """One decode step of the running sequences: those that got a token (those that ended have left)."""
        changed: list[Sequence] = []
        if self.running:
            self._decode(changed)
        return changed

    def _drop_cancelled(self, changed: list[Sequence]) -> None:
        for seq in [s for s in self.slots if s is not None and s.cancelled]:
            self.release(seq)
            changed.append(seq)

    def release(self, seq: Sequence) -> None:
        """Take a sequence out of the core (finished, failed, cancelled) and free its row."""
        if seq.slot is None:
            return
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            if seq.followers:  # the first follower leads the rest
                lead, *rest = seq.followers
                lead.followers, seq.followers = rest, []
                self.prefilling.insert(0, lead)
        for s in self.prefilling:
            if seq in s.followers:
                s.followers.remove(seq)
        slot = seq.slot
        if seq in self.running:
            last = len(self.running) - 1
            if slot != last:  # keep [0, n) contiguous
                moved = self.running[last]
                self.cache.copy_row(last, slot)
                self.running[slot], moved.slot, self.slots[slot] = moved, slot, moved
            self.running.pop()
            slot = last
        self.slots[slot], seq.slot = None, None
        self.cache.reset_row(slot)

    def fail_all(self, error: Exception) -> list[Sequence]:
        """Give up on every sequence in the core (after an error inside a step): they all end with ``error``."""
        gone = [s for s in self.slots if s is not None]
        for s in gone:
            s.error = s.error or error
            s.slot, s.followers = None, []
        self.slots = [None] * self.max_batch
        self.running, self.prefilling = [], []
        for b in range(self.max_batch):
            self.cache.reset_row(b)
        return gone

    # -- prefill --------------------------------------------------------------------------------------------------
    def _chunk(self, seq: Sequence) -> int:
        return min(self.runner.prefill_chunk, len(seq.feed) - seq.prefilled)

    def _prefill_group(self, budget: float) -> list[Sequence]:
        """The oldest prefilling sequence, with those in adjacent rows whose next chunk has the same length,
        as many as the budget allows (at least one)."""
        head = self.prefilling[0]
        T = self._chunk(head)
        if head.pixels is not None or head.prompt_logprobs is not None:
            return [head]
        alike = {s.slot: s for s in self.prefilling
                 if s.pixels is None and s.prompt_logprobs is None and self._chunk(s) == T}
        lo = hi = head.slot
        while lo - 1 in alike:
            lo -= 1
        while hi + 1 in alike:
            hi += 1
        n = hi - lo + 1 if budget == float("inf") else max(1, min(hi - lo + 1, int(budget // T)))
        lo = max(lo, min(head.slot, hi - n + 1))  # keep the head in the group
        return [alike[s] for s in range(lo, lo + n)]

    def _prefill(self, group: list[Sequence], changed: list[Sequence]) -> int:
        """One prefill forward of the group's next chunks (rows group[0].slot ...): returns the tokens fed."""
        runner, T = self.runner, self._chunk(group[0])
        first, head = group[0].slot, group[0]
        view = self.cache.rows(first, first + len(group))
        ids = torch.tensor([s.feed[s.prefilled:s.prefilled + T] for s in group], device=runner.device)
        last_only = head.scored is None or head.resume
        try:
            if head.pixels is not None:
                if head.features is None:
                    head.features, head.features_used = runner.features(head.pixels), 0
                n = int((ids == runner.model.cfg.image_token_id).sum())
                embeds = runner.model.embed(ids, head.features[head.features_used:head.features_used + n])
                head.features_used += n
                logits = runner.model(embeds=embeds, cache=view, last_only=last_only)
            else:
                logits = runner.model(ids, cache=view, last_only=last_only)
        except Exception as e:  # e.g. an image the vision tower rejects: this group fails, not the batch
            for s in group:
                s.error = e
                self._end(s, changed)
            return T * len(group)
        self.prefill_forwards += 1
        if head.scored is not None and not head.resume:  # position t predicts prompt token t + 1
            start = head.prefilled
            targets = torch.tensor(head.feed[start + 1:start + 1 + T], device=runner.device)
            head.scored += token_logprobs(logits[0, :len(targets)], targets, head.prompt_logprobs)
        for b, s in enumerate(group):
            s.prefilled += T
            if s.prefilled == len(s.feed):
                self._prefilled(s, logits[b, -1].float(), changed)
        return T * len(group)

    def _prefilled(self, seq: Sequence, logits_V: torch.Tensor, changed: list[Sequence]) -> None:
        """The prompt is in: followers copy the row, then each samples its first token and joins the decode."""
        self.prefilling.remove(seq)
        seq.features = None
        followers, seq.followers = seq.followers, []
        for f in followers:
            self.cache.copy_row(seq.slot, f.slot)
            f.prefilled = len(f.feed)
            if seq.scored is not None:
                f.scored = list(seq.scored)
        for s in (seq, *followers):
            if s.resume:
                s.resume = False
            elif s.row.done:  # max_new_tokens == 0: only the prompt's logprobs were wanted
                self._end(s, changed)
                continue
            else:
                (token, lp), = self._sample(logits_V[None], [s])
                if self._push(s, token, lp, changed):
                    continue
            self._join(s)

    def _join(self, seq: Sequence) -> None:
        """Move a prefilled sequence to row n (swapping with whatever is there) and start decoding it."""
        n = len(self.running)
        if seq.slot != n:
            other = self.slots[n]
            if other is None:
                self.cache.copy_row(seq.slot, n)
                self.cache.reset_row(seq.slot)
            else:
                self.cache.swap_rows(seq.slot, n)
                other.slot, self.slots[seq.slot] = seq.slot, other
            self.slots[seq.slot] = other
            seq.slot, self.slots[n] = n, seq
        self.running.append(seq)

    # -- decode ---------------------------------------------------------------------------------------------------
    def _decode(self, changed: list[Sequence]) -> None:
        logits_BV = self.runner.decode(self.cache, [s.pending for s in self.running], self.min_bucket)
        self.decode_steps += 1
        seqs = list(self.running)
        for seq, (token, lp) in zip(seqs, self._sample(logits_BV, seqs)):
            self._push(seq, token, lp, changed)

    def _sample(self, logits_BV: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int | None, TokenLogprob | None]]:
        """Each row by its own parameters: plain greedy rows share one argmax, the others go through their own
        penalties, logit adjustments and generator. With each token, its logprobs when asked for. A row whose
        sampling fails gets None and its ``error`` set: the others go on."""
        out: list[int | None] = logits_BV.argmax(-1).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        for b, seq in enumerate(seqs):
            p = seq.params
            try:
                if not p.greedy or p.adjusts_logits or seq.seen is not None:
                    out[b] = sample(logits_BV[b:b + 1], p, seq.seen[None] if seq.seen is not None else None,
                                    seq.generator, seq.counts[None] if seq.counts is not None else None).item()
                if p.logprobs is not None:
                    chosen = torch.tensor([out[b]], device=logits_BV.device)
                    logprobs[b] = token_logprobs(logits_BV[b:b + 1], chosen, p.logprobs)[0]
            except Exception as e:  # e.g. probabilities torch refuses to draw from
                seq.error, out[b] = e, None
        return list(zip(out, logprobs))

    def _push(self, seq: Sequence, token: int | None, logprob: TokenLogprob | None, changed: list[Sequence]) -> bool:
        """Record a sampled token; True when the sequence is done or failed (and has left the core)."""
        if token is None:
            self._end(seq, changed)
            return True
        seq.row.push(token, logprob)
        seq.pending = token
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.seen is not None:
            seq.seen[token] = True
        changed.append(seq)
        if seq.row.done:
            self.release(seq)
        return seq.row.done

    def _end(self, seq: Sequence, changed: list[Sequence]) -> None:
        self.release(seq)
        changed.append(seq)

    # -- weights changed under us -----------------------------------------------------------------------------------
    def _restart(self) -> None:
        """After a weight update, what the cache holds was computed with the old weights: prefill every sequence
        again, a running one with its output so far (its next token is already sampled: it resumes decoding)."""
        self.version = self.runner.weights_version
        seqs = [s for s in self.slots if s is not None]
        for s in seqs:
            s.followers, s.features, s.prefilled = [], None, 0
            if s.row.ids:
                s.feed, s.resume = s.prompt + s.row.ids[:-1], True
            elif s.scored is not None:
                s.scored = []
            self.cache.reset_row(s.slot)
        self.running, self.prefilling = [], seqs

    # -- driving it to completion ---------------------------------------------------------------------------------
    def run(self, seqs: list[Sequence]) -> Iterator[list[Sequence]]:
        """Add the sequences (at most ``max_batch``), prefill them all, then decode until every one is done;
        yield after the prefill and after every decode step."""
        for s in seqs:
            self.add(s)
        while self.busy:
            self.step(decode=not self.prefilling)
            yield seqs
