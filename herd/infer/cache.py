"""Chunk-aware, preallocated KV cache.

iRoPE makes long contexts cheap: a chunked local layer only ever attends inside the current chunk of
``attention_chunk_size`` positions, so it keeps a ring buffer of that many slots (slot = position % chunk; a new
chunk simply overwrites the old one, and the position-based mask hides what is stale). Only the NoPE global
layers keep the full history. Memory is O(global_layers x context + local_layers x chunk).

Every row of the batch has its own length. ``row(b)`` gives a view of one row (sharing storage) so prompts of
different lengths are prefilled one by one and then decoded together.
"""

from __future__ import annotations

import torch

from herd.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", chunked: bool = True):
        self.max_len, self.chunk = max_len, cfg.attention_chunk_size
        device = torch.device(device)
        # a layer gets a ring only when its chunk is shorter than the context it must hold
        self.ring = [chunked and cfg.is_chunked(i) and self.chunk < max_len for i in range(cfg.n_layers)]
        shape = lambda n: (batch, cfg.n_kv_heads, n, cfg.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(self.chunk if r else max_len), dtype=dtype, device=device) for r in self.ring]
        self.v = [torch.zeros_like(k) for k in self.k]
        # position held by each ring slot (-1: empty); all ring layers are written in lockstep, so they share it
        self.ring_pos = torch.full((batch, self.chunk if any(self.ring) else 1), -1, dtype=torch.long, device=device)
        self.slot_pos = torch.arange(max_len, device=device).expand(batch, max_len)  # position of each full slot
        self.lengths = [0] * batch  # positions seen per row (host side: no device sync to plan a step)
        self._rows = slice(0, batch)
        self._step = None
        self._static: dict[tuple[int, int], StaticRows] = {}

    # -- views -------------------------------------------------------------------------------------------------
    def row(self, b: int) -> KVCache:
        """A view of row ``b`` (shares the buffers): prefill one prompt without touching the others."""
        return self.rows(b, b + 1)

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop) (shares the buffers): decode the running part of a batch."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view._rows, view._step = slice(start, stop), None
        return view

    # -- slot management (continuous batching: rows are reused by new sequences) ------------------------------
    def reset_row(self, b: int) -> None:
        """Empty row ``b`` for a new sequence. Its old keys need no zeroing: the position mask hides a full
        layer's slots past the new length and a ring's slots marked -1."""
        self.lengths[b] = 0
        self.ring_pos[b] = -1

    def static(self, rows: int, slots: int) -> StaticRows:
        """Rows [0, rows) over full-layer slots [0, slots), as a compiled decode step sees them (one object per
        shape, so a CUDA graph always finds the same tensors)."""
        key = (rows, slots)
        if key not in self._static:
            self._static[key] = StaticRows(self, rows, slots)
        return self._static[key]

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``dst`` becomes a copy of row ``src`` (the used part of every layer, the ring, the length)."""
        n = self.lengths[src]
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            used = k.shape[2] if self.ring[layer] else n
            k[dst, :, :used] = k[src, :, :used]
            v[dst, :, :used] = v[src, :, :used]
        self.ring_pos[dst] = self.ring_pos[src]
        self.lengths[dst] = n

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows ``a`` and ``b`` (every layer, the ring, the length)."""
        if a == b:
            return
        for k, v in zip(self.k, self.v):
            k[[a, b]] = k[[b, a]]
            v[[a, b]] = v[[b, a]]
        self.ring_pos[[a, b]] = self.ring_pos[[b, a]]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def _lengths(self) -> list[int]:
        return self.lengths[self._rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.ring_pos))

    # -- the decoder's interface (herd.model.transformer.ModelCache) ------------------------------------------
    def positions(self, T: int) -> torch.Tensor:
        """[B, T] positions continuing each row."""
        start = torch.tensor(self._lengths(), device=self.ring_pos.device)
        return start[:, None] + torch.arange(T, device=start.device)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor):
        lengths = self._lengths()
        T = k_new.shape[2]
        if max(lengths) + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {max(lengths) + T}")
        k_buf, v_buf = self.k[layer][self._rows], self.v[layer][self._rows]
        if not self.ring[layer]:
            S = max(lengths) + T
            _write(k_buf, v_buf, positions, k_new, v_new)
            return k_buf[:, :, :S], v_buf[:, :, :S], self.slot_pos[self._rows, :S]
        if self._step is None:  # the first ring layer of this step plans slots and positions for all of them
            self._step = self._plan_ring_step(positions, max(lengths))
        slots, keep, k_pos = self._step
        if T == 1:  # decode: write first, then attend over the ring (the slot it overwrote is out of chunk)
            _write(k_buf, v_buf, slots, k_new, v_new)
            S = k_pos.shape[1]
            return k_buf[:, :, :S], v_buf[:, :, :S], k_pos
        # prefill: the new queries may need keys of the previous chunk that writing the new ones would
        # overwrite, so attend over (ring so far + new) and store only the last chunk's worth afterwards
        used = k_pos.shape[1] - T
        k_all = torch.cat((k_buf[:, :, :used], k_new), dim=2)
        v_all = torch.cat((v_buf[:, :, :used], v_new), dim=2)
        _write(k_buf, v_buf, slots, k_new[:, :, -keep:], v_new[:, :, -keep:])
        return k_all, v_all, k_pos

    def _plan_ring_step(self, positions: torch.Tensor, longest: int):
        """(slots to write, how many new tokens to keep, key positions to attend); updates ring_pos."""
        ring_pos = self.ring_pos[self._rows]
        T = positions.shape[1]
        used = min(self.chunk, longest)
        keep = min(T, self.chunk)
        slots = positions[:, -keep:] % self.chunk
        if T == 1:
            ring_pos.scatter_(1, slots, positions)
            k_pos = ring_pos[:, :min(self.chunk, used + 1)]
        else:
            # what the ring holds from before this step; a slot at or past the first new position can only be a
            # padding row's write from a batched decode step that ran while this row was prefilling: hide it
            held = ring_pos[:, :used]
            held = held.masked_fill(held >= positions[:, :1], -1)
            k_pos = torch.cat((held, positions), dim=1)  # a copy: taken before the write below
            ring_pos.scatter_(1, slots, positions[:, -keep:])
        return slots, keep, k_pos

    def advance(self, T: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lengths[i] += T
        self._step = None


def _write(k_buf: torch.Tensor, v_buf: torch.Tensor, slots_BT: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor) -> None:
    """k_buf[b, :, slots[b, t]] = k[b, :, t] (and v). An index_put_ costs what it writes; scatter_ with an
    expanded index copied the whole buffer on CPU (a decode step over a 1024-slot cache took 3x one over 256)."""
    rows = torch.arange(slots_BT.shape[0], device=slots_BT.device)[:, None]
    k_buf[rows, :, slots_BT] = k.transpose(1, 2)  # the indexed dims lead: [B, T, KV, hd]
    v_buf[rows, :, slots_BT] = v.transpose(1, 2)


class StaticRows:
    """Rows [0, B) of a cache over full-layer slots [0, L), for a compiled decode step: fixed shapes, tensor-only
    updates, no host bookkeeping (the caller advances the lengths of the rows that really decoded). Attends over
    every slot and lets the position mask hide the unwritten and stale ones.

    Rows past the running ones ride along as padding (a batch-size bucket): their write lands at their own
    next position, which a free row ignores and a row in mid-prefill overwrites with its next chunk (the ring
    hides it meanwhile, see ``KVCache._plan_ring_step``)."""

    def __init__(self, cache: KVCache, rows: int, slots: int):
        self.ring, self.chunk = cache.ring, cache.chunk
        self.k = [k[:rows] if ring else k[:rows, :, :slots] for k, ring in zip(cache.k, cache.ring)]
        self.v = [v[:rows] if ring else v[:rows, :, :slots] for v, ring in zip(cache.v, cache.ring)]
        self.ring_pos, self.slot_pos = cache.ring_pos[:rows], cache.slot_pos[:rows, :slots]
        self.static_marked = False  # the runner marks the tensors as static addresses for CUDA graphs, once

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.ring_pos]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor):
        k_buf, v_buf = self.k[layer], self.v[layer]
        if self.ring[layer]:
            slots = positions % self.chunk
            _write(k_buf, v_buf, slots, k_new, v_new)
            self.ring_pos.scatter_(1, slots, positions)  # the same write from every ring layer: harmless
            return k_buf, v_buf, self.ring_pos
        _write(k_buf, v_buf, positions, k_new, v_new)
        return k_buf, v_buf, self.slot_pos

    def advance(self, T: int) -> None:
        pass
