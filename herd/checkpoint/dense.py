"""Unquantized HF model directories <-> herd Transformers.

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped safetensors,
straight into the target dtype/device, so a checkpoint never needs twice its size in RAM. ``Filling`` is that
loop's parts, shared with herd.checkpoint.quantized. Saving writes the HF layout (config.json + sharded
safetensors + index) that transformers' ``from_pretrained`` reads, atomically (herd.checkpoint.safetensors_io).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from herd.checkpoint.names import herd_to_hf, hf_to_herd, transposed_in_hf
from herd.checkpoint.safetensors_io import checkpoint_files, read_tensors, write_dir
from herd.config import ModelConfig, to_hf_dict
from herd.errors import CheckpointError
from herd.model import Transformer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


def load_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor loads in: ``dtype`` for floating tensors (None: as stored)."""
    return dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype


class StoredTensor(NamedTuple):
    """One tensor of a checkpoint, under both names, with the file it came from (for errors)."""

    hf_name: str
    name: str  # herd's
    file: Path
    tensor: torch.Tensor

    def error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"tensor {self.hf_name} in {self.file} {problem}")


class Filling:
    """A meta-device ``model`` being filled from ``directory``: read ``tensors()``, ``check`` and ``put`` each,
    then ``finish`` checks that nothing is missing. ``skip_vision``: ignore the vision tower's tensors (a
    text-only load of a multimodal checkpoint)."""

    def __init__(self, model: Transformer, directory: Path, device: torch.device, progress: bool | None = None,
                 skip_vision: bool = False):
        self.model, self.directory, self.device = model, directory, device
        self.progress, self.skip_vision = progress, skip_vision
        self.expected = dict(model.named_parameters())
        self.loaded: set[str] = set()

    def tensors(self) -> Iterator[StoredTensor]:
        files = checkpoint_files(self.directory)
        show = self.progress if self.progress is not None else len(files) > 200
        for hf_name, file, tensor in tqdm(read_tensors(files), total=len(files), disable=not show,
                                          desc=f"loading {self.directory.name}", unit="tensor"):
            name = hf_to_herd(hf_name)
            if self.skip_vision and name is not None and name.startswith("vision."):
                continue
            if name is None:
                raise CheckpointError(f"unexpected tensor {hf_name} in {file}: not part of a Llama 4 model")
            yield StoredTensor(hf_name, name, file, tensor)

    def check(self, t: StoredTensor) -> torch.Tensor:
        """``t``'s tensor in herd's layout, once its name and shape are those of a parameter of the model."""
        if t.name not in self.expected:
            raise CheckpointError(f"unexpected tensor {t.hf_name} in {t.file} (config.json has no such parameter)")
        want = self.expected[t.name].shape
        transposed = transposed_in_hf(self.model, t.name)
        if transposed:
            want = (want[0], want[2], want[1])
        if tuple(t.tensor.shape) != tuple(want):
            raise t.error(f"has shape {tuple(t.tensor.shape)}, the config expects {tuple(want)}")
        return t.tensor.transpose(1, 2) if transposed else t.tensor

    def put(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        if tensor.is_contiguous():
            tensor = tensor.to(device=self.device, dtype=dtype)
        else:  # the transposed experts: one copy into herd's layout (.to() would keep the strides, or not copy)
            tensor = torch.empty(tensor.shape, dtype=dtype, device=self.device).copy_(tensor)
        assign(self.model, name, tensor)
        self.loaded.add(name)

    def finish(self, filled: Collection[str] = ()) -> None:
        """Tie the embeddings if the config says so; fail naming the parameters neither put nor in ``filled``."""
        loaded = self.loaded | set(filled)
        if self.model.cfg.tie_embeddings:
            self.model.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        missing = sorted(set(self.expected) - loaded)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            names = ", ".join(herd_to_hf(m, self.model.cfg.vision is not None) for m in missing[:3])
            raise CheckpointError(f"{self.directory}: missing tensor(s) {names}{more}")


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter ``name`` (a meta one, typically) by ``tensor``, keeping its requires_grad."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def load_dense(directory: Path, cfg: ModelConfig, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               progress: bool | None = None, skip_vision: bool = False) -> Transformer:
    """The Transformer of ``cfg`` filled from ``directory`` (a checkpoint without a quantization_config)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    filling = Filling(model, directory, torch.device(device), progress, skip_vision)
    for t in filling.tensors():
        filling.put(t.name, filling.check(t), load_dtype(t.tensor, dtype))
    filling.finish()
    return model


def save(model: Transformer, directory: str | Path, max_shard_bytes: int = 5 * 2**30,
         dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as an HF directory (config.json, safetensors shards, index): ``Llama4ForCausalLM`` for a
    text model, ``Llama4ForConditionalGeneration`` for one with a vision tower.

    The directory is built next to the target and renamed into place, replacing an older one only at the end."""
    dtype, multimodal = parse_dtype(dtype), model.vision is not None
    tensors = {}
    for name, p in model.named_parameters():  # named_parameters skips the tied lm_head, as HF expects
        t = p.detach().transpose(1, 2) if transposed_in_hf(model, name) else p.detach()
        tensors[herd_to_hf(name, multimodal)] = (t.to(dtype) if dtype is not None and t.is_floating_point()
                                                 else t).contiguous()
    return write_dir(directory, tensors, to_hf_dict(model.cfg, text_only=not multimodal), max_shard_bytes)


__all__ = ["parse_dtype", "load_dtype", "StoredTensor", "Filling", "assign", "load_dense", "save"]
