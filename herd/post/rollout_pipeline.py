"""Rollout batches for RL steps, made synchronously or on a background thread with a bounded policy lag.

With ``lag`` L, the batch of step k is generated with the policy's weights after step k - L (the weights after
step 0 for the first L steps), so generation of the next L batches runs while step k trains: L = 0 is the
synchronous loop, L = 1 overlaps one step. The lag is exact, not "at most": which weights make which batch never
depends on thread timing, so a run is reproducible and resumes exactly. Samples from older weights are
corrected in the loss with truncated importance weights on the sampler's log-probs (herd.post.grpo).

At most L batches wait ahead of the trainer (the bounded queue). A checkpoint after step k holds the L batches
already made for steps k + 1 .. k + L (their weights are older than the checkpoint's) and the rollout state after
them; a resumed run serves those first. The trainer publishes its weights after every step (``publish``); the
engine is one object, so generation and evaluation take turns on it (``lock``), each setting the weights it
needs first.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch


class RolloutPipeline:
    """The RL trainer's loader: ``next_batch`` for steps 0, 1, 2, ... of ``rollouts`` (herd.post.rl.Rollouts),
    ``lag`` steps behind the trainer's weights."""

    def __init__(self, rollouts, lag: int = 0):
        if lag < 0:
            raise ValueError(f"rollout lag must be >= 0 steps, got {lag}")
        self.rollouts, self.lag = rollouts, lag
        self.lock = threading.Lock()  # the engine's: one generation (or evaluation) at a time
        self._cv = threading.Condition()
        self._weights: dict[int, dict[str, torch.Tensor]] = {}  # version (steps done) -> state
        self._ready: dict[int, tuple[dict, dict]] = {}  # step -> (batch, info)
        self._take = self._make = 0  # next step to serve / to make
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.last: dict[str, float] = {}  # the served batch's rollout metrics
        self.idle = False  # the served batch has no group to learn from
        self.state: dict[str, Any] | None = None  # the rollout state after the last batch made

    # -- weights ------------------------------------------------------------------------------------------------
    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """The policy after ``version`` optimizer steps; versions no future batch needs are dropped."""
        with self._cv:
            self._weights[version] = state
            for v in [v for v in self._weights if v < version - self.lag]:
                del self._weights[v]
            self._cv.notify_all()

    def _make_batch(self, step: int) -> tuple[dict, dict]:
        state = self._weights[max(0, step - self.lag)]
        with self.lock:
            self.rollouts.llm.engine.update_weights(state)
            batch, info = self.rollouts.produce(step)
        info["weights"] = max(0, step - self.lag)
        return batch, info

    # -- serving --------------------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        step, start = self._take, time.perf_counter()
        if self.lag == 0:
            batch, info = self._make_batch(step)
            self._make = step + 1
        else:
            self._start()
            with self._cv:
                self._cv.wait_for(lambda: step in self._ready or self._error is not None)
                if self._error is not None:
                    raise self._error
                batch, info = self._ready.pop(step)
                self._take += 1
                self._cv.notify_all()
        if self.lag == 0:
            self._take += 1
            self.state = info["state"]
        # rollout_wait_s: what the step spent waiting for (or, in turn, making) its batch
        self.last = info["metrics"] | {"policy_lag": step - info["weights"],
                                       "rollout_wait_s": time.perf_counter() - start}
        self.idle = info["idle"]
        return batch

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._closed or (self._make < self._take + self.lag and
                                                               max(0, self._make - self.lag) in self._weights))
                    if self._closed:
                        return
                    step = self._make
                batch, info = self._make_batch(step)
                with self._cv:
                    self._ready[step] = (batch, info)
                    self.state = info["state"]
                    self._make = step + 1
                    self._cv.notify_all()
        except BaseException as e:  # surfaced by the trainer's next next_batch
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def pending(self) -> dict[int, tuple[dict, dict]]:
        """The batches made ahead of the trainer, once all ``lag`` of them are (a checkpoint waits for them)."""
        if self.lag == 0 or self._closed:
            return dict(self._ready)
        self._start()
        with self._cv:
            self._cv.wait_for(lambda: self._make >= self._take + self.lag or self._error is not None)
            if self._error is not None:
                raise self._error
            return dict(self._ready)

    def state_dict(self) -> dict[str, Any]:
        self.pending()  # the state after the batches a checkpoint keeps
        return {"version": 1, "lag": self.lag, "take": self._take, "rollouts": self.state or
                self.rollouts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["lag"] != self.lag:
            raise ValueError(f"the run was checkpointed with rollout lag {state['lag']}, not {self.lag}")
        self.rollouts.load_state_dict(state["rollouts"])
        self._take = self._make = int(state["take"])

    def restore(self, pending: dict[int, tuple[dict, dict]]) -> None:
        """The batches a checkpoint kept (``pending()`` when it was saved), served before any new one."""
        self._ready = dict(pending)
        self._make = self._take + len(pending)
