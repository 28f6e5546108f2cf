"""Safetensors model directories: reading tensors one at a time, writing shards + index atomically.

Names here are the files' own (HF names); the mapping to herd's lives in herd.checkpoint.names."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from herd.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# -- reading ----------------------------------------------------------------------------------------------------
def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from the index when sharded."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise CheckpointError(f"{index} lists {file.name}, which does not exist")
        return files
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None


def read_tensors(files: dict[str, Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (name, file, tensor) for ``checkpoint_files``' tensors, one at a time, file by file (memory-mapped:
    a tensor is read when yielded)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name} is listed for {file.name} but not stored in it")
                try:
                    tensor = f.get_tensor(name)
                except SafetensorError as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None
                yield name, file, tensor


# -- writing ----------------------------------------------------------------------------------------------------
def write_dir(directory: str | Path, tensors: dict[str, torch.Tensor], hf_config: dict,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """Atomically write config.json + ``tensors`` (HF names) as one safetensors file or shards + index."""
    directory = Path(directory)
    shards = _shard(tensors, max_shard_bytes)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map |= {name: file for name in shard}
                total += sum(t.numel() * t.element_size() for t in shard.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        _readable_by_all(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _readable_by_all(tmp: Path) -> None:
    # mkdtemp makes a 0700 directory and safetensors writes 0600 files; a model directory should have the
    # permissions of any other new directory (umask applied)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def replace_dir(tmp: Path, directory: Path) -> None:
    """Put the finished ``tmp`` at ``directory``. An older checkpoint there is swapped out whole; its other files
    (tokenizer, README...) are carried over."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, aside / "old")
    os.replace(tmp, directory)
    for old in (aside / "old").iterdir():
        if not (directory / old.name).exists() and not old.name.endswith(".safetensors") and old.name != INDEX_FILE:
            os.replace(old, directory / old.name)
    shutil.rmtree(aside)


__all__ = ["INDEX_FILE", "SINGLE_FILE", "checkpoint_files", "read_tensors", "write_dir", "replace_dir"]
