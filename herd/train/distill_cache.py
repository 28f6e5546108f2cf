"""The offline teacher cache: ``herd distill-cache TEACHER DATA --top-k K --seq-len T --out DIR``.

A teacher's forward pass costs as much as a step of a model its size; run once over the training data and
stored, it serves every epoch and every student with no teacher in memory. The cache holds, for each token of a
shard set (herd.train.data's format), the teacher's prediction of that token from the window the loader serves
it in: ``PackedLoader`` cuts shard ``s`` into windows ``[w·T, w·T + T]`` (T = ``data.seq_len``), whose targets are
the shard's tokens ``w·T + 1 ... w·T + T``, each the target of exactly one window. The writer runs the teacher
over those windows with the loader's positions and document masking, so the cached targets are the ones an online
teacher would give on the same batch (with K = V the cached loss equals the online loss). The cache is therefore
tied to T: the manifest records it and a loader with another ``seq_len`` is refused.

On disk (``DIR``)::

    distill_cache.json             the manifest (written atomically; ``complete`` once every shard is done)
    shard_00000.ids.npy            int32   [N, K]  the teacher's top-K ids of each token's prediction
    shard_00000.logprobs.npy       fp16/32 [N, K]  their log-probabilities at the cache's temperature τ
    shard_00000.tail_logprob.npy   fp32    [N]     log of the probability mass outside the K ids (−inf when K = V)
    shard_00000.target_logprob.npy fp32    [N]     log p¹(token) at τ = 1 (exact: the dynamic weights use it)
    shard_00000.entropy.npy        fp32    [N]     the entropy of the teacher's prediction at τ = 1, nats
    ...

N = the shard's token count; row j is the prediction of the shard's token j, rows no window predicts (row 0, the
tail after the last whole window) are zeros. The ``.npy`` files are memory-mapped by the reader. Bytes per token:
K·(4 + 2) + 12 with fp16 (K = 32: 204 B, against 2·V for full bf16 logits: 404 KB for Llama 4's vocabulary).

The manifest: version, teacher (path), teacher_id (a fingerprint of its weights' files / state), tokenizer (the
teacher tokenizer's fingerprint, herd.train.distill.tokenizer_fingerprint), vocab_size, data (path),
data_fingerprint (index.json + samples of every shard's tokens), seq_len, top_k, dtype, temperature,
bytes_per_token, and per shard: tokens, windows, done, tail-mass mean and max over the predicted tokens.

Resumable per shard: a shard is written into ``*.npy.tmp`` files, renamed into place when finished, and the
manifest then lists it done; a rerun with the same teacher, data and options skips the done shards and redoes
an unfinished one. A rerun with different ones is refused (``--overwrite`` starts over).

Training reads it with ``DistillLoader`` (a ``PackedLoader`` whose batches carry ``teacher_*`` fields) and
``TeacherTargets.from_batch``; ``measure_cache_error`` measures the loss from the cache against the online teacher
on a few batches (the bound: herd.train.distill's docstring).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError
from herd.train.data import INDEX_FILE, PackedLoader, TokenShards, atomic_write_text
from herd.train.distill import (
    DIVERGENCES,
    DistillSpec,
    TeacherTargets,
    distill_loss,
    teacher_forward,
    token_weights,
    tokenizer_fingerprint,
    topk_error_bound,
)

MANIFEST = "distill_cache.json"
VERSION = 1
DTYPES = {"fp16": np.float16, "fp32": np.float32}
# field -> (dtype or None for the log-probs' chosen dtype, per-token width: "k" or 1)
FIELDS: dict[str, tuple[Any, str | int]] = {
    "ids": (np.int32, "k"), "logprobs": (None, "k"), "tail_logprob": (np.float32, 1),
    "target_logprob": (np.float32, 1), "entropy": (np.float32, 1)}
_KEY = ("version", "teacher_id", "tokenizer", "vocab_size", "data_fingerprint", "seq_len", "top_k", "dtype",
        "temperature")
DESCRIPTION = ("Write a teacher's top-k log-probabilities (plus the tail mass) for every token of a shard set, "
               "aligned token for token with the shards, so that a student distils from them with no teacher in "
               "memory. Resumable: rerun the same command to finish an interrupted cache.")


def bytes_per_token(top_k: int, dtype: str) -> int:
    return top_k * (4 + np.dtype(DTYPES[dtype]).itemsize) + 3 * 4


def _shard_file(out: Path, shard: int, field: str) -> Path:
    return out / f"shard_{shard:05d}.{field}.npy"


def data_fingerprint(shards: TokenShards) -> str:
    """index.json plus the first, middle and last 1024 tokens of every shard (cheap, and catches another corpus
    with the same counts)."""
    h = hashlib.sha256((shards.path / INDEX_FILE).read_bytes())
    for toks in shards.tokens:
        n = len(toks)
        for a in (0, max(0, n // 2 - 512), max(0, n - 1024)):
            h.update(np.ascontiguousarray(toks[a:a + 1024]).tobytes())
    return h.hexdigest()[:16]


def teacher_fingerprint(teacher: str | Path | nn.Module) -> str:
    """A model directory: its config.json and the names and sizes of its weight files. An in-memory model: its
    parameters' bytes."""
    h = hashlib.sha256()
    if isinstance(teacher, nn.Module):
        for name, p in sorted(teacher.state_dict().items()):
            h.update(name.encode() + p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
    path = Path(teacher)
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _hidden_only(model: nn.Module) -> Iterator[nn.Module]:
    """The model returns its final normed hidden states; yields the lm_head, applied in chunks by the caller (a
    [B, T, V] logits tensor of a large vocabulary would not fit)."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def _load_manifest(out: Path) -> dict | None:
    f = out / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else None


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def _remove_cache_files(out: Path) -> None:
    for f in list(out.glob("shard_*.npy")) + list(out.glob("shard_*.npy.tmp")):
        f.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


def _check_data_for_teacher(shards: TokenShards, vocab_size: int, tokenizer: Any) -> None:
    top = max((int(t.max()) for t in shards.tokens if len(t)), default=-1)
    if top >= vocab_size:
        raise ConfigError(f"{shards.path} holds token id {top}, outside the teacher's vocabulary of {vocab_size}: "
                          f"it was tokenised with another tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        for name in ("bos_id", "eos_id"):
            ours, theirs = getattr(shards.info, name), getattr(tokenizer, name)
            if ours is not None and ours != theirs:
                raise ConfigError(f"{shards.path} was tokenised with {name}={ours} but the teacher's tokenizer has "
                                  f"{name}={theirs}: the data and the teacher use different tokenizers")


@torch.no_grad()
def write_cache(teacher: str | Path | nn.Module, data: str | Path | TokenShards, out: str | Path, top_k: int,
                seq_len: int, *, tokenizer: Any = None, batch_size: int = 4, dtype: str = "fp16",
                temperature: float = 1.0, teacher_dtype: str | torch.dtype | None = None,
                device: str | torch.device = "cpu", teacher_id: str | None = None, overwrite: bool = False,
                progress: bool | None = None, stop_after_shards: int | None = None,
                chunk_bytes: int = 2**28) -> dict:
    """Write (or finish) the cache of ``teacher`` over the shard set ``data`` into ``out``; returns the manifest.

    ``teacher``: a model directory (loaded text-only, in ``teacher_dtype``; its tokenizer is the cache's) or an
    in-memory herd Transformer (then ``tokenizer``, a herd Tokenizer or a fingerprint string, is required).
    ``seq_len``: the training run's ``data.seq_len``. ``dtype``: fp16 or fp32 log-probs. ``temperature``: τ of
    the stored log-probs (the training temperature). ``chunk_bytes``: the logits computed at once.
    ``stop_after_shards``: return after finishing that many shards in this call (tests; resumption)."""
    from tqdm import tqdm

    from herd.tokenizer import Tokenizer

    out = Path(out)
    shards = data if isinstance(data, TokenShards) else TokenShards(Path(data))
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose fp16 or fp32")
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature={temperature} must be > 0")
    if isinstance(teacher, nn.Module):
        if tokenizer is None:
            raise ValueError("an in-memory teacher needs its tokenizer (a herd Tokenizer or a fingerprint string)")
        model, label = teacher, type(teacher).__name__
        teacher_id = teacher_id or teacher_fingerprint(teacher)
    else:
        from herd.checkpoint import load

        path = Path(teacher)
        teacher_id = teacher_id or teacher_fingerprint(path)
        tokenizer = Tokenizer.for_model(path) if tokenizer is None else tokenizer
        model, label = load(path, dtype=teacher_dtype, device=device, text_only=True), str(path)
    vocab = model.cfg.vocab_size
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k {top_k} must be in [1, {vocab}] (the teacher's vocabulary)")
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the teacher's max_seq_len ({model.cfg.max_seq_len})")
    _check_data_for_teacher(shards, vocab, tokenizer)
    rows = shards.rows(seq_len)
    fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
    manifest = {
        "version": VERSION, "teacher": label, "teacher_id": teacher_id, "tokenizer": fp, "vocab_size": vocab,
        "data": str(shards.path), "data_fingerprint": data_fingerprint(shards), "seq_len": seq_len,
        "top_k": top_k, "dtype": dtype, "temperature": float(temperature),
        "bytes_per_token": bytes_per_token(top_k, dtype), "complete": False,
        "shards": [{"shard": i, "tokens": int(len(t)), "windows": int(rows.cum[i + 1] - rows.cum[i]), "done": False}
                   for i, t in enumerate(shards.tokens)]}
    out.mkdir(parents=True, exist_ok=True)
    old = _load_manifest(out)
    if old is not None and overwrite:
        _remove_cache_files(out)
        old = None
    if old is not None:
        for key in _KEY:
            if old.get(key) != manifest[key]:
                raise ConfigError(f"{out} holds a cache with {key}={old.get(key)!r}, not {manifest[key]!r}: choose "
                                  f"another --out, or pass --overwrite to start over")
        for new, prev in zip(manifest["shards"], old["shards"]):
            if prev.get("done") and all(_shard_file(out, new["shard"], f).is_file() for f in FIELDS):
                new.update({k: prev[k] for k in prev if k.startswith("tail_mass")}, done=True)
    _write_manifest(out, manifest)
    for f in out.glob("shard_*.npy.tmp"):  # an interrupted shard: redone from its start
        f.unlink()

    todo = [s for s in manifest["shards"] if not s["done"]]
    model.eval()
    log_dtype = DTYPES[dtype]
    chunk_tokens = max(1, chunk_bytes // (4 * vocab))
    bar = tqdm(total=sum(s["windows"] for s in todo) * seq_len, desc="distill-cache", unit="tok",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    finished = 0
    try:
        for s in todo:
            if stop_after_shards is not None and finished >= stop_after_shards:
                break
            i, n = s["shard"], s["tokens"]
            arrays = {}
            for field, (dt, width) in FIELDS.items():
                shape = (n, top_k) if width == "k" else (n,)
                arrays[field] = np.lib.format.open_memmap(_tmp(_shard_file(out, i, field)), mode="w+",
                                                          dtype=dt or log_dtype, shape=shape)
            tail_sum, tail_max = 0.0, 0.0
            first = int(rows.cum[i])
            for b0 in range(first, int(rows.cum[i + 1]), batch_size):
                ws = list(range(b0, min(b0 + batch_size, int(rows.cum[i + 1]))))
                fields = [rows.window(w) for w in ws]
                batch = {k: torch.from_numpy(np.stack([f[k] for f in fields])).long().to(device)
                         for k in ("tokens", "targets", "positions", "doc_ids")}
                with _hidden_only(model) as head:
                    hidden = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
                for r, w in enumerate(ws):
                    start = (w - first) * seq_len
                    for a in range(0, seq_len, chunk_tokens):
                        e = min(seq_len, a + chunk_tokens)
                        logits = head(hidden[r, a:e]).float()
                        tt = TeacherTargets.topk(logits, batch["targets"][r, a:e], top_k, temperature,
                                                 dtype=torch.float16 if dtype == "fp16" else torch.float32)
                        lo, hi = start + 1 + a, start + 1 + e
                        arrays["ids"][lo:hi] = tt.ids.cpu().numpy()
                        arrays["logprobs"][lo:hi] = tt.logprobs.cpu().numpy().astype(log_dtype)
                        for f in ("tail_logprob", "target_logprob", "entropy"):
                            arrays[f][lo:hi] = getattr(tt, f).cpu().numpy()
                        tail = tt.tail_logprob.exp()
                        tail_sum += float(tail.sum())
                        tail_max = max(tail_max, float(tail.max()))
                    bar.update(seq_len)
            for arr in arrays.values():
                arr.flush()
            arrays.clear()  # unmaps them
            for field in FIELDS:
                final = _shard_file(out, i, field)
                with open(_tmp(final), "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(_tmp(final), final)
            predicted = s["windows"] * seq_len
            s.update(done=True, tail_mass_mean=tail_sum / predicted if predicted else 0.0, tail_mass_max=tail_max)
            manifest["complete"] = all(x["done"] for x in manifest["shards"])
            _write_manifest(out, manifest)
            finished += 1
    finally:
        bar.close()
    manifest["complete"] = all(x["done"] for x in manifest["shards"])
    _write_manifest(out, manifest)
    return manifest


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


# ---------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A finished cache, memory-mapped. ``window(shard, start)`` gives the teacher targets of the window the loader
    cuts at ``start`` of ``shard`` (its T targets)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = _load_manifest(self.path)
        if manifest is None:
            raise FileNotFoundError(f"{self.path}: no {MANIFEST} (not a distill cache)")
        if not manifest.get("complete"):
            done = sum(s["done"] for s in manifest["shards"])
            raise ConfigError(f"{self.path}: unfinished distill cache ({done} of {len(manifest['shards'])} shards); "
                              f"rerun herd distill-cache with the same arguments to finish it")
        if manifest.get("version") != VERSION:
            raise ConfigError(f"{self.path}: distill cache version {manifest.get('version')}, herd reads {VERSION}")
        self.manifest = manifest
        self.top_k, self.seq_len = int(manifest["top_k"]), int(manifest["seq_len"])
        self.temperature, self.dtype = float(manifest["temperature"]), manifest["dtype"]
        self.tokenizer, self.vocab_size = manifest["tokenizer"], int(manifest["vocab_size"])
        self.arrays: list[dict[str, np.ndarray]] = []
        for s in manifest["shards"]:
            arrays = {}
            for field, (_, width) in FIELDS.items():
                f = _shard_file(self.path, s["shard"], field)
                arr = np.load(f, mmap_mode="r")
                want = (s["tokens"], self.top_k) if width == "k" else (s["tokens"],)
                if arr.shape != want:
                    raise ConfigError(f"{f}: shape {arr.shape}, the manifest says {want}")
                arrays[field] = arr
            self.arrays.append(arrays)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.top_k, self.dtype)

    def check_data(self, shards: TokenShards, seq_len: int) -> None:
        """Refuse a shard set or window length other than the ones the cache was written for."""
        if seq_len != self.seq_len:
            raise ConfigError(f"{self.path} was written for seq_len {self.seq_len} (its windows), not {seq_len}")
        fp = data_fingerprint(shards)
        if fp != self.manifest["data_fingerprint"]:
            raise ConfigError(f"{self.path} was written for the shards {self.manifest['data']} (fingerprint "
                              f"{self.manifest['data_fingerprint']}), not {shards.path} ({fp})")

    def check_student(self, student: Any) -> None:
        """Refuse a student whose tokenizer or vocabulary is not the teacher's (as distill.check_compatible; the
        student: a model directory, a Tokenizer, (Tokenizer, vocab_size) or a herd LLM)."""
        from herd.train.distill import describe_side

        label, fp, n_ids, vocab = describe_side(student, "student")
        if fp != self.tokenizer:
            raise ConfigError(f"the tokenizers differ: {label} (tokenizer {fp}, {n_ids} ids) vs the teacher "
                              f"{self.manifest['teacher']} of the cache {self.path} (tokenizer {self.tokenizer})")
        if vocab is not None and vocab != self.vocab_size:
            raise ConfigError(f"the vocabulary sizes differ: {label} has {vocab} logits per token, the teacher "
                              f"{self.manifest['teacher']} of the cache {self.path} {self.vocab_size}")

    def window(self, shard: int, start: int) -> dict[str, np.ndarray]:
        """The teacher fields of the targets ``start + 1 ... start + seq_len`` of ``shard``."""
        a = self.arrays[shard]
        lo, hi = start + 1, start + 1 + self.seq_len
        return {f: np.asarray(a[f][lo:hi]) for f in FIELDS}


class _CachedWindows:
    """A source's windows (herd.train.data._SourceWindows) that also queue each window's teacher fields."""

    def __init__(self, inner: Any, cache: TeacherCache | None, top_k: int, pending: list):
        self.inner, self.cache, self.top_k, self.pending = inner, cache, top_k, pending
        self.shards, self.n, self.seq_len = inner.shards, inner.n, inner.seq_len

    def window(self, w: int) -> dict[str, np.ndarray]:
        fields = self.inner.window(w)
        if self.cache is None:
            T, K = self.seq_len, self.top_k
            self.pending.append({"ids": np.zeros((T, K), np.int32), "logprobs": np.zeros((T, K), np.float32),
                                 **{f: np.zeros(T, np.float32) for f in ("tail_logprob", "target_logprob", "entropy")},
                                 "valid": np.zeros(T, bool)})
        else:
            shard = int(np.searchsorted(self.inner.cum, w, side="right") - 1)
            start = (w - int(self.inner.cum[shard])) * self.seq_len
            self.pending.append({**self.cache.window(shard, start), "valid": np.ones(self.seq_len, bool)})
        return fields


class DistillLoader(PackedLoader):
    """``PackedLoader`` whose batches also carry the teacher targets of every row from the caches: int64
    ``teacher_ids`` [B, T, K], float32 ``teacher_logprobs`` [B, T, K], ``teacher_tail_logprob``,
    ``teacher_target_logprob``, ``teacher_entropy`` [B, T], bool ``teacher_valid`` [B, T] (false for rows of a
    source without a cache: those train on cross entropy alone). Same batches, state and resumption as the plain
    loader (``TeacherTargets.from_batch(batch, loader.temperature)``)."""

    def __init__(self, sources: list[tuple[TokenShards, float]], seq_len: int, batch_size: int, seed: int = 0,
                 caches: list[TeacherCache | str | Path | None] | None = None):
        super().__init__(sources, seq_len, batch_size, seed)
        caches = [None] * len(sources) if caches is None else list(caches)
        if len(caches) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(caches)} caches")
        caches = [TeacherCache(c) if isinstance(c, str | Path) else c for c in caches]
        found = [c for c in caches if c is not None]
        if not found:
            raise ValueError("no teacher cache (give one per source, None for a source without)")
        for key in ("top_k", "temperature", "tokenizer", "vocab_size"):
            values = {getattr(c, key) for c in found}
            if len(values) > 1:
                raise ConfigError(f"the teacher caches disagree on {key}: {sorted(map(str, values))}")
        for (shards, _), cache in zip(sources, caches):
            if cache is not None:
                cache.check_data(shards, seq_len)
        self.top_k, self.temperature = found[0].top_k, found[0].temperature
        self.caches = caches
        self._pending: list[dict[str, np.ndarray]] = []
        self.sources = [_CachedWindows(s, c, self.top_k, self._pending) for s, c in zip(self.sources, caches)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        self._pending.clear()
        batch = super().next_batch()
        rows, self._pending[:] = list(self._pending), []
        for f in ("ids", "logprobs", "tail_logprob", "target_logprob", "entropy", "valid"):
            t = torch.from_numpy(np.stack([r[f] for r in rows]))
            batch[f"teacher_{f}"] = t.long() if f == "ids" else t if f == "valid" else t.float()
        return batch


# ---------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def measure_cache_error(student: nn.Module, teacher: nn.Module, cache: TeacherCache | str | Path,
                        data: TokenShards | str | Path, spec: DistillSpec | None = None, batches: int = 4,
                        batch_size: int = 4, seed: int = 0) -> dict[str, float]:
    """The loss from the cache vs from the online teacher on the same ``batches`` (student ``student``): both
    losses, their absolute and relative difference, the soft terms', the documented bound of the soft difference
    (Σ m a τ² bound / n; inf for reverse KL), the mean tail mass, and the cache's bytes per token."""
    cache = TeacherCache(cache) if not isinstance(cache, TeacherCache) else cache
    shards = data if isinstance(data, TokenShards) else TokenShards(Path(data))
    spec = spec or DistillSpec(temperature=cache.temperature, weight="fixed", alpha=1.0)
    loader = DistillLoader([(shards, 1.0)], cache.seq_len, batch_size, seed, [cache])
    was = student.training
    student.eval()
    sums = dict.fromkeys(("loss_online", "loss_cache", "soft_online", "soft_cache", "bound", "tail"), 0.0)
    n_total = 0.0
    for _ in range(batches):
        batch = loader.next_batch()
        n = float(batch["loss_mask"].sum())
        logits = student(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"]).float()
        online = teacher_forward(teacher, batch)
        cached = TeacherTargets.from_batch(batch, cache.temperature)
        l_on, p_on = distill_loss(logits, batch["targets"], batch["loss_mask"], online, spec)
        l_ca, p_ca = distill_loss(logits, batch["targets"], batch["loss_mask"], cached, spec)
        m = batch["loss_mask"].flatten().float()
        targets = batch["targets"].flatten()
        ce = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        a = token_weights(spec, 0, 1, cached, targets, ce, logits.shape[-1])
        weighted = torch.where(m * a > 0, m * a * topk_error_bound(logits, cached, spec), 0.0)
        for k, v in (("loss_online", l_on), ("loss_cache", l_ca), ("soft_online", p_on["soft"]),
                     ("soft_cache", p_ca["soft"])):
            sums[k] += float(v) * n
        sums["bound"] += float(weighted.sum())
        sums["tail"] += float((batch["teacher_tail_logprob"].flatten().exp() * m).sum())
        n_total += n
    student.train(was)
    n_total = max(n_total, 1.0)
    r = {k: v / n_total for k, v in sums.items()}
    diff = abs(r["loss_cache"] - r["loss_online"])
    return {"loss_online": r["loss_online"], "loss_cache": r["loss_cache"], "abs_diff": diff,
            "rel_diff": diff / max(abs(r["loss_online"]), 1e-12), "soft_online": r["soft_online"],
            "soft_cache": r["soft_cache"], "soft_abs_diff": abs(r["soft_cache"] - r["soft_online"]),
            "bound": r["bound"], "tail_mass_mean": r["tail"], "bytes_per_token": float(cache.bytes_per_token),
            "tokens": n_total, "top_k": float(cache.top_k)}


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", type=Path, help="the teacher's model directory (its tokenizer must be the student's)")
    p.add_argument("data", type=Path, help="a token shard set (a directory with index.json, as herd train writes "
                                           "under RUN/data/ or reads from a source's shards)")
    p.add_argument("--top-k", type=int, default=32, help="log-probs kept per token (default 32)")
    p.add_argument("--out", type=Path, required=True, help="the cache directory")
    p.add_argument("--seq-len", type=int, required=True, help="the training run's data.seq_len (the cache is "
                                                               "aligned with its windows)")
    p.add_argument("--temperature", type=float, default=1.0, help="τ of the stored log-probs: the training "
                                                                  "distill.temperature (default 1)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="stored log-probs (default fp16)")
    p.add_argument("--teacher-dtype", default=None, help="load the teacher in bf16 | fp32 (default: as stored)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per teacher forward (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="start over when OUT holds another cache")
    p.add_argument("--measure", type=Path, default=None, metavar="STUDENT",
                   help="then measure the loss from the cache vs the online teacher with this student model")
    p.add_argument("--measure-batches", type=int, default=4)
    p.add_argument("--divergence", default="forward_kl", choices=DIVERGENCES, help="for --measure")
    p.add_argument("--beta", type=float, default=0.5, help="jsd's beta, for --measure")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the manifest (and measurement) as JSON")


def main(args: argparse.Namespace) -> int:
    from herd.checkpoint import load
    from herd.train.distill import check_compatible

    if args.measure is not None:  # refuse a mismatched student before the teacher's long pass
        check_compatible(args.measure, args.teacher)
    manifest = write_cache(args.teacher, args.data, args.out, args.top_k, args.seq_len, batch_size=args.batch_size,
                           dtype=args.dtype, temperature=args.temperature, teacher_dtype=args.teacher_dtype,
                           device=args.device, overwrite=args.overwrite, progress=not args.no_progress)
    result: dict[str, Any] = {"manifest": manifest}
    if args.measure is not None:
        spec = DistillSpec(divergence=args.divergence, beta=args.beta, temperature=args.temperature,
                           weight="fixed", alpha=1.0)
        student = load(args.measure, dtype=torch.float32, text_only=True)
        teacher = load(args.teacher, dtype=torch.float32, text_only=True)
        result["measure"] = measure_cache_error(student, teacher, args.out, args.data, spec, args.measure_batches)
    if args.json:
        print(json.dumps(result))
        return 0
    done = manifest["shards"]
    tokens = sum(s["windows"] for s in done) * manifest["seq_len"]
    tail = max((s.get("tail_mass_max", 0.0) for s in done), default=0.0)
    mean = sum(s.get("tail_mass_mean", 0.0) * s["windows"] for s in done) / max(1, sum(s["windows"] for s in done))
    print(f"wrote {args.out}: {len(done)} shards, {tokens:,} predicted tokens, top-{manifest['top_k']} "
          f"{manifest['dtype']}, {manifest['bytes_per_token']} bytes/token; tail mass mean {mean:.4g}, max {tail:.4g}")
    if "measure" in result:
        m = result["measure"]
        print(f"loss from the cache {m['loss_cache']:.6f} vs the online teacher {m['loss_online']:.6f}: "
              f"|diff| {m['abs_diff']:.3g} ({100 * m['rel_diff']:.3g}%), bound {m['bound']:.3g}")
    return 0
