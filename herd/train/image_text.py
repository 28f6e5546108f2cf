"""Image+text training samples: the early-fusion data that goes through the same loader as text.

Source: JSONL records ``{"text": "...", "images": ["a.png", ...]}`` (image paths relative to the JSONL file).
A sample is laid out as herd lays out a plain prompt with images: ``<|begin_of_text|>``, each image's placeholder
span (``<|image_start|>``, one ``<|patch|>`` per vision token of each tile, tile separators, ``<|image|>`` and
the thumbnail's patches, ``<|image_end|>``: herd.chat.image_token_ids), then the text and ``<|end_of_text|>``.

On disk (``tokenize_image_text``), a directory holding ``tokens.bin`` (uint32, samples back to back),
``samples.npy`` (int64 [n + 1] token offsets), ``tiles.bin`` (uint8 [tiles, 3, S, S]: the tiles before
normalisation, a quarter of float32's bytes), ``tile_offsets.npy`` (int64 [n + 1]) and ``index.json``, written
last. Records whose image cannot be read, or whose images alone do not fit in a row, are counted and skipped.

Rows are one sample each (never packed: a row must hold all of an image's placeholders for its tiles to line
up), cut to ``seq_len + 1`` tokens after the images and padded. The loss covers the text only: targets inside
the image span and padding are masked. ``pixel_values`` of a batch are its rows' tiles in row order, which is
the order in which the model fills the ``<|patch|>`` placeholders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.chat import image_token_ids
from herd.errors import HerdError
from herd.images import ImageConfig, load_image, normalize_tiles, tile_image_uint8
from herd.tokenizer import Tokenizer
from herd.train.data import INDEX_FILE, TOKEN_DTYPE, BadLog, atomic_write_text, check_text, read_jsonl_records


def tokenize_image_text(sources: list[Path], out_dir: Path, tokenizer: Tokenizer, patches_per_tile: int,
                        image_cfg: ImageConfig, seq_len: int, text_key: str = "text",
                        images_key: str = "images") -> dict[str, Any]:
    """Tokenise and tile the samples of ``sources`` (JSONL) into ``out_dir`` (all or nothing; see module doc)."""
    out_dir = Path(out_dir)
    if (out_dir / INDEX_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds an image-text set ({INDEX_FILE})")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in ("tokens.bin", "tiles.bin", "samples.npy", "tile_offsets.npy")}
    tmp = {name: f.with_name(f.name + ".tmp") for name, f in files.items()}
    sample_offsets, tile_offsets, bad_total = [0], [0], {}
    try:
        with open(tmp["tokens.bin"], "wb") as tok_f, open(tmp["tiles.bin"], "wb") as tile_f:
            for path in sources:
                path, bad = Path(path), BadLog()
                for where, record in read_jsonl_records(path, bad):
                    text = check_text(record.get(text_key), where, bad)
                    images = record.get(images_key, [])
                    if text is None:
                        continue
                    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                        bad.add("bad_image", f"{where} ({images_key} must be a list of paths)")
                        continue
                    try:
                        tiled = [tile_image_uint8(load_image(str(path.parent / p)), image_cfg) for p in images]
                    except HerdError as e:
                        bad.add("bad_image", f"{where} ({e})")
                        continue
                    ids = [tokenizer.bos_id]
                    for _, (rows, cols) in tiled:
                        ids += image_token_ids(tokenizer, rows, cols, patches_per_tile)
                    if len(ids) + 1 > seq_len:  # the images and one text token must fit in a row
                        bad.add("too_long", f"{where} ({len(ids)} image tokens, seq_len {seq_len})")
                        continue
                    ids += tokenizer.encode(text) + [tokenizer.eos_id]
                    np.asarray(ids, dtype=TOKEN_DTYPE).tofile(tok_f)
                    for tiles, _ in tiled:
                        tile_f.write(tiles.contiguous().numpy().tobytes())
                    sample_offsets.append(sample_offsets[-1] + len(ids))
                    tile_offsets.append(tile_offsets[-1] + sum(t.shape[0] for t, _ in tiled))
                bad.warn(path)
                for k, v in bad.counts.items():
                    bad_total[k] = bad_total.get(k, 0) + v
            for f in (tok_f, tile_f):
                f.flush()
                os.fsync(f.fileno())
        for name, offsets in (("samples.npy", sample_offsets), ("tile_offsets.npy", tile_offsets)):
            with open(tmp[name], "wb") as f:
                np.save(f, np.asarray(offsets, dtype=np.int64))
        for name, f in files.items():
            os.replace(tmp[name], f)
        info = {"kind": "image_text", "samples": len(sample_offsets) - 1, "tokens": sample_offsets[-1],
                "tiles": tile_offsets[-1], "tile_size": image_cfg.tile_size, "patches_per_tile": patches_per_tile,
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                "image_end_id": tokenizer.token_id("<|image_end|>"),
                "bad_records": bad_total, "version": 1}
        if info["samples"] == 0:
            raise ValueError(f"{[str(s) for s in sources]}: no usable image-text sample")
        atomic_write_text(out_dir / INDEX_FILE, json.dumps(info, indent=1))
    except BaseException:
        for f in [*tmp.values(), *files.values()]:
            f.unlink(missing_ok=True)
        raise
    return info


class ImageTextSet:
    """A read-only view of an image-text set: memory-mapped tokens and uint8 tiles."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if not index.is_file():
            raise FileNotFoundError(f"{self.path}: no {INDEX_FILE} (not an image-text set, or an unfinished one)")
        self.info = json.loads(index.read_text())
        if self.info.get("kind") != "image_text":
            raise ValueError(f"{self.path} is not an image-text set")
        self.samples = np.load(self.path / "samples.npy")
        self.tile_offsets = np.load(self.path / "tile_offsets.npy")
        s = self.info["tile_size"]
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(self.info["tokens"],))
        self.tiles = np.memmap(self.path / "tiles.bin", dtype=np.uint8, mode="r", shape=(self.info["tiles"], 3, s, s))

    def __len__(self) -> int:
        return self.info["samples"]

    def rows(self, seq_len: int) -> ImageTextRows:
        return ImageTextRows(self, seq_len)


class ImageTextRows:
    """One loader row per sample (the loader's source interface: ``n`` rows, ``window(i)`` -> row fields)."""

    def __init__(self, data: ImageTextSet, seq_len: int):
        self.shards, self.seq_len, self.n = data, seq_len, len(data)
        self.pad_id, self.image_end_id = data.info["pad_id"], data.info["image_end_id"]

    def window(self, i: int) -> dict[str, Any]:
        d, T = self.shards, self.seq_len
        ids = np.asarray(d.tokens[d.samples[i]:d.samples[i + 1]], dtype=np.int64)[:T + 1]
        ends = np.flatnonzero(ids == self.image_end_id)
        image_end = int(ends[-1]) if len(ends) else 0  # index of the last image token (0: just <bos>)
        n = len(ids)
        window = np.full(T + 1, self.pad_id, dtype=np.int64)
        window[:n] = ids
        idx = np.arange(T + 1)
        tiles = torch.from_numpy(np.array(d.tiles[d.tile_offsets[i]:d.tile_offsets[i + 1]]))
        return {"tokens": window[:-1], "targets": window[1:], "positions": idx[:-1],
                "doc_ids": (idx[:-1] >= n).astype(np.int64),  # padding is a document of its own
                "loss_mask": (idx[1:] > image_end) & (idx[1:] < n),  # text targets only
                "pixel_values": normalize_tiles(tiles)}
