"""Pretraining data: tokenise text into memory-mapped token shards, then serve packed, resumable batches.

On disk (``tokenize_to_shards``), a shard set is a directory holding

* ``shard_00000.bin``, ...: the token ids of whole documents, back to back, raw little-endian uint32;
* ``shard_00000.docs.npy``, ...: int64 offsets (in tokens, within that shard) where each document starts;
* ``index.json``: per-shard token and document counts, the tokenizer's special ids used, and the counts of
  bad records skipped. It is written last, atomically, and is what marks the set complete.

A document never spans two shards (a document longer than ``shard_tokens`` gets a shard of its own).

Documents are: a whole ``.txt`` file (one document per file); one line of a ``.jsonl`` file (field
``text_key``); one row of a ``.parquet`` file (column ``text_key``, needs pyarrow). Each document is
stored as ``[bos_id] + tokenizer.encode(text) + [eos_id]`` (bos/eos only when given). Bad records
(a line that is not JSON or not an object, bytes that are not UTF-8, a missing or non-string text
field, an empty or blank document) are counted, skipped, and reported in one warning per file.

``PackedLoader`` serves batches of ``seq_len + 1``-token windows cut at a stride of ``seq_len`` from
each shard (windows never cross shards but do cross documents: that is packing). Each batch is a dict
of int64 [B, T] tensors:

* ``tokens``: the inputs, ``window[:-1]``; ``targets``: ``window[1:]``;
* ``positions``: 0 at the window start and at every document start inside the window, then 1, 2, ...
  Use them as RoPE positions, so each document piece is positioned as if it stood alone;
* ``doc_ids``: 0 for the first document piece in the window, +1 at each document start. Attention is
  allowed from query i to key j iff ``j <= i and doc_ids[i] == doc_ids[j]`` (document masking);
* ``loss_mask``: 1 where the target belongs to the same document as its input token, 0 where the
  target is the first token of the next document (nothing in the current document predicts it). With an
  EOS separator the model still learns to emit EOS: EOS ends its own document and is a normal target.

Which source each batch row comes from is drawn with the source weights by a generator seeded by
(seed, step), and within a source the windows follow a permutation seeded by (seed, source, epoch),
so everything is a function of (seed, step, per-source cursor): ``state_dict()`` is a small JSON-able
dict and ``load_state_dict`` makes a fresh loader yield exactly the batches the saved one would have.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

INDEX_FILE = "index.json"
TOKEN_DTYPE = np.uint32
BAD_KINDS = ("invalid_json", "undecodable", "missing_text", "empty")
_MAX_LINES_IN_WARNING = 5


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class ShardSetInfo:
    """What ``index.json`` holds."""

    shards: list[dict[str, Any]]  # {"file", "docs_file", "tokens", "documents"} per shard
    total_tokens: int
    total_documents: int
    bad_records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))
    bos_id: int | None = None
    eos_id: int | None = None
    short_documents: int = 0  # left out for being under min_tokens
    version: int = 1


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class BadLog:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))
    where: dict[str, list[str]] = field(default_factory=dict)  # kind -> first few locations

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        locs = self.where.setdefault(kind, [])
        if len(locs) < _MAX_LINES_IN_WARNING:
            locs.append(where)

    def warn(self, path: Path) -> None:
        if not any(self.counts.values()):
            return
        parts = []
        for kind, n in self.counts.items():
            if n:
                more = ", ..." if n > len(self.where[kind]) else ""
                parts.append(f"{n} {kind} ({', '.join(self.where[kind])}{more})")
        warnings.warn(f"{path}: skipped bad records: {'; '.join(parts)}", stacklevel=3)


def check_text(text: object, where: str, bad: BadLog) -> str | None:
    if not isinstance(text, str):
        bad.add("missing_text", where)
        return None
    if not text.strip():
        bad.add("empty", where)
        return None
    return text


def _read_txt(path: Path, bad: BadLog) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add("undecodable", f"byte {e.start}")
        return
    if (text := check_text(text, "file", bad)) is not None:
        yield text


def read_jsonl_records(path: Path, bad: BadLog) -> Iterator[tuple[str, dict]]:
    """(location, record) for each line of a JSONL file that is a JSON object; the rest is counted in ``bad``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"line {lineno}"
            if not raw.strip():
                continue  # blank lines separate nothing in JSONL; not a record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.add("undecodable", where)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.add("invalid_json", where)
                continue
            if not isinstance(record, dict):
                bad.add("invalid_json", where)
                continue
            yield where, record


def _read_jsonl(path: Path, text_key: str, bad: BadLog) -> Iterator[str]:
    for where, record in read_jsonl_records(path, bad):
        if (text := check_text(record.get(text_key), where, bad)) is not None:
            yield text


def _read_parquet(path: Path, text_key: str, bad: BadLog) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow (pip install 'herd[parquet]', or pyarrow)") from e
    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise KeyError(f"{path}: no column {text_key!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[text_key]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, bytes):  # a binary column: decode it like any other bytes
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    bad.add("undecodable", f"row {row}")
                    continue
            if (text := check_text(text, f"row {row}", bad)) is not None:
                yield text


def iter_documents(path: Path, text_key: str = "text", bad: BadLog | None = None) -> Iterator[str]:
    """The documents of one source file, bad records skipped (and counted in ``bad``)."""
    path = Path(path)
    bad = bad if bad is not None else BadLog()
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _read_txt(path, bad)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text_key, bad)
    elif suffix == ".parquet":
        yield from _read_parquet(path, text_key, bad)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (want .txt, .jsonl or .parquet)")


# ---------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Buffers documents into shards written as ``*.tmp`` files; ``commit`` renames them into place."""

    def __init__(self, out_dir: Path, shard_tokens: int):
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buf_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.tmp_files: list[tuple[Path, Path]] = []  # (tmp, final)

    def add(self, ids: np.ndarray) -> None:
        if self.buf and self.buf_tokens + len(ids) > self.shard_tokens:
            self.flush()
        self.buf.append(ids)
        self.buf_tokens += len(ids)

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"shard_{len(self.shards):05d}"
        tokens = np.concatenate(self.buf).astype(TOKEN_DTYPE)
        starts = np.cumsum([0] + [len(d) for d in self.buf[:-1]], dtype=np.int64)
        bin_final, docs_final = self.out_dir / f"{name}.bin", self.out_dir / f"{name}.docs.npy"
        for final, write in ((bin_final, tokens.tofile), (docs_final, lambda f: np.save(f, starts))):
            tmp = final.with_name(final.name + ".tmp")
            self.tmp_files.append((tmp, final))
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        self.shards.append({"file": bin_final.name, "docs_file": docs_final.name,
                            "tokens": int(len(tokens)), "documents": len(self.buf)})
        self.buf, self.buf_tokens = [], 0

    def commit(self, info: ShardSetInfo) -> None:
        for tmp, final in self.tmp_files:
            os.replace(tmp, final)
        atomic_write_text(self.out_dir / INDEX_FILE, json.dumps(asdict(info), indent=1))

    def abort(self) -> None:
        for tmp, _ in self.tmp_files:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tokenize_to_shards(
    sources: list[Path],
    out_dir: Path,
    tokenizer: Encoder,
    shard_tokens: int = 2**24,
    text_key: str = "text",
    eos_id: int | None = None,
    bos_id: int | None = None,
    min_tokens: int = 0,
) -> ShardSetInfo:
    """Tokenise the documents of ``sources`` into a shard set in ``out_dir`` (see the module docstring).

    All or nothing: shards are written as temporary files and renamed into place, then ``index.json``
    is written atomically; on any error the temporary files are removed and nothing is left behind.
    ``out_dir`` must not already hold a shard set. Documents of fewer than ``min_tokens`` tokens are left out
    (long-context mid-training keeps only long documents); ``short_documents`` counts them.
    """
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if (out_dir / INDEX_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a shard set ({INDEX_FILE})")
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = [bos_id] if bos_id is not None else []
    suffix = [eos_id] if eos_id is not None else []
    writer = _ShardWriter(out_dir, shard_tokens)
    total_bad = dict.fromkeys(BAD_KINDS, 0)
    n_docs = n_short = 0
    try:
        for path in sources:
            path = Path(path)
            bad = BadLog()
            for text in iter_documents(path, text_key, bad):
                ids = np.asarray(prefix + list(tokenizer.encode(text)) + suffix, dtype=np.int64)
                if len(ids) == 0:
                    bad.add("empty", "encoded to no tokens")
                    continue
                if len(ids) < min_tokens:
                    n_short += 1
                    continue
                if ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max:
                    raise ValueError(f"{path}: token id out of uint32 range")
                writer.add(ids)
                n_docs += 1
            bad.warn(path)
            for k, v in bad.counts.items():
                total_bad[k] += v
        writer.flush()
        info = ShardSetInfo(shards=writer.shards, total_tokens=sum(s["tokens"] for s in writer.shards),
                            total_documents=n_docs, bad_records=total_bad, bos_id=bos_id, eos_id=eos_id,
                            short_documents=n_short)
        writer.commit(info)
    except BaseException:
        writer.abort()
        raise
    return info


# ---------------------------------------------------------------------------------------------- shards


class TokenShards:
    """A read-only view of a shard set: memory-mapped token arrays plus document starts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if not index.exists():
            raise FileNotFoundError(f"{self.path}: no {INDEX_FILE} (not a shard set, or an unfinished one)")
        self.info = ShardSetInfo(**json.loads(index.read_text()))
        self.tokens: list[np.ndarray] = []
        self.doc_starts: list[np.ndarray] = []
        for s in self.info.shards:
            f = self.path / s["file"]
            size = f.stat().st_size
            if size != s["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
                raise ValueError(f"{f}: {size} bytes, index says {s['tokens']} tokens")
            self.tokens.append(np.memmap(f, dtype=TOKEN_DTYPE, mode="r", shape=(s["tokens"],)))
            self.doc_starts.append(np.load(self.path / s["docs_file"], mmap_mode="r"))

    @property
    def total_tokens(self) -> int:
        return self.info.total_tokens

    @property
    def num_documents(self) -> int:
        return self.info.total_documents

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, seq_len: int) -> _SourceWindows:
        """The loader's view: packed windows of ``seq_len + 1`` tokens."""
        return _SourceWindows(self, seq_len)

    def documents(self) -> Iterator[np.ndarray]:
        """Every document's token ids (views into the memory maps), in order."""
        for toks, starts in zip(self.tokens, self.doc_starts):
            ends = np.append(starts[1:], len(toks))
            for a, b in zip(starts, ends):
                yield toks[a:b]


# ---------------------------------------------------------------------------------------------- loader


def _window_fields(window: np.ndarray, starts_in: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs, targets, positions, doc ids and loss mask of one (T+1)-token window.

    ``starts_in``: offsets (within the window, > 0) where a document starts.
    """
    n = len(window)
    is_start = np.zeros(n, dtype=bool)
    is_start[0] = True
    is_start[starts_in] = True
    idx = np.arange(n)
    last_start = np.maximum.accumulate(np.where(is_start, idx, 0))
    return {
        "tokens": window[:-1],
        "targets": window[1:],
        "positions": (idx - last_start)[:-1],
        "doc_ids": (np.cumsum(is_start) - 1)[:-1],
        "loss_mask": ~is_start[1:],
    }


class _SourceWindows:
    """The (shard, start) windows of one shard set, and their per-epoch shuffled order."""

    def __init__(self, shards: TokenShards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        counts = [max(0, (len(t) - 1) // seq_len) for t in shards.tokens]
        self.cum = np.cumsum([0] + counts)
        self.n = int(self.cum[-1])

    def window(self, w: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self.cum, w, side="right") - 1)
        start = (w - int(self.cum[shard])) * self.seq_len
        end = start + self.seq_len + 1
        toks = np.asarray(self.shards.tokens[shard][start:end], dtype=np.int64)
        ds = self.shards.doc_starts[shard]
        lo, hi = np.searchsorted(ds, [start + 1, end])
        return _window_fields(toks, ds[lo:hi] - start)


_MIXTURE_STREAM = 0x6D6978  # keeps the mixture generator's seed apart from the per-source permutations


class PackedLoader:
    """Endless, deterministic, resumable batches of packed windows from a weighted mixture of shard sets."""

    def __init__(self, sources: list[tuple[Any, float]], seq_len: int, batch_size: int, seed: int = 0):
        """sources: (TokenShards or herd.train.image_text.ImageTextSet, weight) pairs."""
        if not sources:
            raise ValueError("no sources")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        weights = np.array([float(w) for _, w in sources])
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise ValueError(f"source weights must be finite and > 0, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.sources = [s.rows(seq_len) for s, _ in sources]
        self._perm: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its window order)
        for i, src in enumerate(self.sources):
            if src.n == 0:
                raise ValueError(f"source {i} ({src.shards.path}) has no shard of more than {seq_len} tokens")
        self.step = 0
        self.epoch = [0] * len(self.sources)
        self.cursor = [0] * len(self.sources)

    def _next_window(self, i: int) -> dict[str, np.ndarray]:
        src = self.sources[i]
        if self.cursor[i] == src.n:
            self.epoch[i] += 1
            self.cursor[i] = 0
        w = int(self._order(i)[self.cursor[i]])
        self.cursor[i] += 1
        return src.window(w)

    def _order(self, i: int) -> np.ndarray:
        epoch = self.epoch[i]
        if self._perm.get(i, (None,))[0] != epoch:
            self._perm[i] = (epoch, np.random.default_rng([self.seed, i, epoch]).permutation(self.sources[i].n))
        return self._perm[i][1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, _MIXTURE_STREAM, self.step])
        picks = rng.choice(len(self.sources), size=self.batch_size, p=self.weights)
        rows = [self._next_window(int(i)) for i in picks]
        self.step += 1
        pixels = [r.pop("pixel_values") for r in rows if "pixel_values" in r]  # image-text rows
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        batch = {k: v if k == "loss_mask" else v.long() for k, v in batch.items()}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # row order = the order the model fills <|patch|>es
        batch["source"] = torch.from_numpy(picks.astype(np.int64))
        return batch

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "step": self.step, "weights": self.weights.tolist(),
            "sources": [{"epoch": e, "cursor": c, "windows": s.n}
                        for e, c, s in zip(self.epoch, self.cursor, self.sources)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "batch_size"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {mine[key]}")
        if [s["windows"] for s in state["sources"]] != [s["windows"] for s in mine["sources"]]:
            raise ValueError("loader state was saved over different sources (window counts differ)")
        if not np.allclose(state["weights"], self.weights):
            raise ValueError(f"loader state has weights {state['weights']}, this loader {self.weights.tolist()}")
        self.step = int(state["step"])
        self.epoch = [int(s["epoch"]) for s in state["sources"]]
        self.cursor = [int(s["cursor"]) for s in state["sources"]]
