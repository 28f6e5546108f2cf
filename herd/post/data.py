"""Post-training data in TRL's dataset formats, tokenized exactly as inference lays a prompt out.

Formats (TRL's names; a record's keys decide which):
  conversational      {"messages": [{"role", "content", ...}, ...]}
  prompt-completion   {"prompt": str | messages, "completion": str | messages}
  preference          {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                      (or without "prompt": chosen and rejected are whole conversations sharing their start)

Messages are herd's chat messages (herd.chat.ChatFormat): system, user, assistant (with ``tool_calls``), tool;
content as a string or a list of parts. A conversation is tokenized message by message with ChatFormat, so its
ids are ``ChatFormat.encode_dialog(messages, add_generation_prompt=False)``; the loss mask covers what the model
must produce: every assistant message's content, tool calls and closing ``<|eot|>`` / ``<|eom|>``, not its
header. A plain-text prompt-completion pair is ``<|begin_of_text|>`` + prompt + completion + ``<|end_of_text|>``,
the loss on the completion and the end token (TRL's completion-only loss).

Image and video parts that carry pixels ("path", "url", "image"; herd.chat) are laid out as inference lays them
out (the same tile grid, the same <|patch|> runs); an example keeps its image sources, not their tiles, and the
loader tiles them when it serves a batch, so a dataset of many images does not sit in memory as pixels.
A relative "path" is read relative to the data file's folder.

Files are JSONL or Parquet. A record that is not one of the formats, or that ChatFormat rejects (an unknown
role, a conversation without an assistant turn), is counted, skipped, and named in one warning per file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.chat import ChatFormat, has_pixels, lay_out_images
from herd.errors import HerdError
from herd.images import ImageConfig
from herd.train.data import BadLog, read_jsonl_records

FORMATS = ("conversational", "prompt_completion", "preference")
IGNORE = -100  # label of a position that carries no loss (PyTorch's cross_entropy ignore_index)


class RecordError(HerdError):
    """A record that is not one of the formats, or that ChatFormat cannot lay out."""


@dataclass
class Example:
    """One tokenized training example: ids and, per id, whether the model is trained to produce it."""

    ids: list[int]
    loss_mask: list[bool]
    where: str = ""  # file:line, for errors
    images: list[Any] = field(default_factory=list)  # the sources of its <|image_start|> spans, in order


def record_format(record: dict) -> str:
    """The TRL format of a record, from its keys; RecordError when it is none of them."""
    if "messages" in record:
        return "conversational"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise RecordError(f"keys {sorted(record)} are none of TRL's formats: 'messages'; 'prompt' + 'completion'; "
                      f"'chosen' + 'rejected' (+ 'prompt')")


def _messages(value: object, what: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise RecordError(f"{what} must be a non-empty list of messages (objects with 'role' and 'content')")
    return value


def encode_conversation(fmt: ChatFormat, messages: list[dict], trained: range | None = None,
                        image_config: ImageConfig | None = None, base_dir: Path | None = None) -> Example:
    """Ids of a conversation (as ``encode_dialog`` without a generation prompt) and its loss mask: the content and
    end token of every assistant message whose index is in ``trained`` (default: all of them). Images with
    pixels are read once here for their tile grid (``image_config``: the model's); relative paths start at
    ``base_dir``."""
    trained = range(len(messages)) if trained is None else trained
    if not any(m.get("role") == "assistant" for i, m in enumerate(messages) if i in trained):
        raise RecordError("the conversation has no assistant message to train on")
    images: list[Any] = []
    if has_pixels(messages):
        messages = _lay_out(messages, images, image_config or ImageConfig(), base_dir)
    ids, mask = [fmt.tokenizer.bos_id], [False]
    for i, message in enumerate(messages):
        try:
            body = fmt.encode_message(message)
        except HerdError as e:
            raise RecordError(f"messages[{i}]: {e}") from None
        header = len(fmt.encode_header(message["role"]))
        learn = message["role"] == "assistant" and i in trained
        ids += body
        mask += [False] * header + [learn] * (len(body) - header)
    return Example(ids, mask, images=images)


def _lay_out(messages: list[dict], images: list[Any], cfg: ImageConfig, base_dir: Path | None) -> list[dict]:
    from herd.images import load_image, tile_grid  # torchvision: ~1 s, load late

    def grid(source: Any) -> tuple[int, int]:
        if isinstance(source, str) and base_dir is not None and not Path(source).is_absolute() \
                and (base_dir / source).is_file():
            source = str(base_dir / source)
        images.append(source)
        return tile_grid(load_image(source), cfg)

    try:
        return lay_out_images(messages, grid)
    except HerdError as e:
        raise RecordError(str(e)) from None


def encode_prompt_completion(fmt: ChatFormat, prompt: object, completion: object, **images: Any) -> Example:
    """A prompt-completion pair, plain text or conversational; the loss on the completion only. ``images``:
    encode_conversation's image_config and base_dir."""
    if isinstance(prompt, str) and isinstance(completion, str):
        tok = fmt.tokenizer
        p, c = [tok.bos_id, *tok.encode(prompt)], [*tok.encode(completion), tok.eos_id]
        return Example(p + c, [False] * len(p) + [True] * len(c))
    prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
    messages = prompt + completion
    return encode_conversation(fmt, messages, range(len(prompt), len(messages)), **images)


def encode_preference(fmt: ChatFormat, record: dict, **images: Any) -> tuple[Example, Example]:
    """(chosen, rejected), each a prompt-completion example. Without a "prompt" key, chosen and rejected are
    whole conversations: their shared leading messages are the prompt, and they must differ only in the end."""
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        return (encode_prompt_completion(fmt, record["prompt"], chosen, **images),
                encode_prompt_completion(fmt, record["prompt"], rejected, **images))
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise RecordError("chosen and rejected must share their prompt messages and differ after them "
                          f"(they share {shared} of {len(chosen)} / {len(rejected)} messages)")
    return (encode_prompt_completion(fmt, chosen[:shared], chosen[shared:], **images),
            encode_prompt_completion(fmt, rejected[:shared], rejected[shared:], **images))


def read_records(path: Path, bad: BadLog) -> Iterator[tuple[str, dict]]:
    """(location, record) of each record of a JSONL or Parquet file; unreadable lines are counted in ``bad``."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow (pip install 'herd[parquet]', or pyarrow)") from e
        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield f"row {row}", record
        return
    yield from read_jsonl_records(path, bad)


def load_examples(path: str | Path, fmt: ChatFormat, kind: str = "sft",
                  image_config: ImageConfig | None = None) -> list[Example] | list[tuple[Example, Example]]:
    """Every usable record of a file, tokenized: ``kind`` "sft" takes conversational and prompt-completion
    records (Examples), "preference" takes preference records ((chosen, rejected) pairs). The rest is counted,
    skipped and named in one warning; a file with no usable record is an error. ``image_config``: the model's
    (its tile size), for records with images."""
    path, bad, out = Path(path), BadLog(), []
    images = {"image_config": image_config, "base_dir": path.parent}
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    for where, record in read_records(path, bad):
        try:
            found = record_format(record)
            if kind == "preference":
                if found != "preference":
                    raise RecordError(f"a {found.replace('_', '-')} record where preference pairs are expected")
                chosen, rejected = encode_preference(fmt, record, **images)
                chosen.where = rejected.where = f"{path}:{where}"
                out.append((chosen, rejected))
                continue
            if found == "conversational":
                example = encode_conversation(fmt, _messages(record["messages"], "messages"), **images)
            elif found == "prompt_completion":
                example = encode_prompt_completion(fmt, record["prompt"], record["completion"], **images)
            else:
                raise RecordError("a preference record where SFT examples are expected (use it with DPO)")
        except RecordError as e:
            bad.add("bad_record", f"{where}: {e}")
            continue
        example.where = f"{path}:{where}"
        out.append(example)
    bad.warn(path)
    if not out:
        raise RecordError(f"{path}: no usable {kind} record ({sum(bad.counts.values())} skipped)")
    return out


def pack(examples: list[Example], seq_len: int) -> list[dict[str, Any]]:
    """Rows of ``seq_len`` tokens holding whole examples (best fit, longest first; a text example longer than a
    row is cut to it, one with images is left out with a warning: a cut image span no longer matches its
    tiles), with document masking: per row ``tokens``, ``labels`` (the next token where it carries loss, else
    IGNORE), ``positions`` restarting at each example and ``doc_ids`` (-1 on padding), as
    ``Transformer(tokens, positions=..., doc_ids=...)`` takes them, and ``images``: the row's image sources
    in the order of its <|image_start|> spans."""
    too_long = [ex.where for ex in examples if ex.images and len(ex.ids) > seq_len]
    if too_long:
        warnings.warn(f"left out {len(too_long)} examples with images longer than seq_len={seq_len} tokens "
                      f"({', '.join(too_long[:5])}{', ...' if len(too_long) > 5 else ''})", stacklevel=2)
        examples = [ex for ex in examples if not (ex.images and len(ex.ids) > seq_len)]
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        n = min(len(ex.ids), seq_len)
        fits = [r for r, free in enumerate(room) if free >= n]
        if fits:
            r = min(fits, key=lambda r: room[r])
            rows[r].append(ex)
            room[r] -= n
        else:
            rows.append([ex])
            room.append(seq_len - n)
    out = []
    for row in rows:
        tokens = np.zeros(seq_len, dtype=np.int64)
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        positions = np.zeros(seq_len, dtype=np.int64)
        doc_ids = np.full(seq_len, -1, dtype=np.int64)
        start = 0
        for d, ex in enumerate(row):
            ids, mask = ex.ids[:seq_len], ex.loss_mask[:seq_len]
            n = len(ids)
            tokens[start:start + n] = ids
            positions[start:start + n] = np.arange(n)
            doc_ids[start:start + n] = d
            # position t predicts token t + 1, which carries loss when its mask says so
            target = np.array(ids[1:], dtype=np.int64)
            labels[start:start + n - 1] = np.where(np.array(mask[1:], dtype=bool), target, IGNORE)
            start += n
        out.append({"tokens": tokens, "labels": labels, "positions": positions, "doc_ids": doc_ids,
                    "images": [src for ex in row for src in ex.images]})
    return out


def collate(rows: list[dict[str, Any]], image_config: ImageConfig | None = None) -> dict[str, torch.Tensor]:
    """A batch as the trainer takes it: tokens, targets (IGNORE labels as 0), loss_mask, positions, doc_ids and,
    when the rows have images, pixel_values (their tiles in row order: the order the model fills <|patch|>es)."""
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("tokens", "labels", "positions",
                                                                          "doc_ids")}
    labels = batch.pop("labels")
    batch["loss_mask"] = labels != IGNORE
    batch["targets"] = labels.clamp(min=0)
    sources = [src for r in rows for src in r.get("images", ())]
    if sources:
        from herd.images import load_image, tile_image

        cfg = image_config or ImageConfig()
        batch["pixel_values"] = torch.cat([tile_image(load_image(src), cfg).pixel_values for src in sources])
    return batch


class EpochLoader:
    """Endless, deterministic, resumable batches of ``n`` items (rows, pairs) served in a fresh seeded order each
    epoch, with the PackedLoader interface (next_batch, state_dict, load_state_dict). A subclass makes a batch
    of the items at some indices (``batch``)."""

    def __init__(self, n: int, seq_len: int, batch_size: int, seed: int = 0):
        self.n, self.seq_len, self.batch_size, self.seed = n, seq_len, batch_size, seed
        self.step, self.epoch, self.cursor = 0, 0, 0
        self._order = (0, np.random.default_rng([seed, 0]).permutation(n))

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
            if self._order[0] != self.epoch:
                self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
            picked.append(int(self._order[1][self.cursor]))
            self.cursor += 1
        self.step += 1
        return self.batch(picked)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every item once, in order, the last batch short (evaluation)."""
        for i in range(0, self.n, self.batch_size):
            yield self.batch(list(range(i, min(i + self.batch_size, self.n))))

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "items": self.n, "step": self.step, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "batch_size", "items"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={state.get(key)}, this loader {mine[key]} (the data or "
                                 f"its packing changed since the checkpoint)")
        self.step, self.epoch, self.cursor = int(state["step"]), int(state["epoch"]), int(state["cursor"])


class SFTLoader(EpochLoader):
    """Packed SFT rows: the examples are packed once (best fit), then the rows are served by EpochLoader."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int = 0,
                 image_config: ImageConfig | None = None):
        self.rows = pack(examples, seq_len)
        if not self.rows:
            raise RecordError("no example left to train on")
        super().__init__(len(self.rows), seq_len, batch_size, seed)
        self.image_config = image_config
        self.examples = len(examples)
        self.tokens = sum(int((r["labels"] != IGNORE).sum()) for r in self.rows)  # trained tokens per epoch

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.rows[i] for i in indices], self.image_config)
