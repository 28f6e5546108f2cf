"""Hugging Face checkpoints <-> herd models.

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped safetensors,
straight into the target dtype/device, so a checkpoint never needs twice its size in RAM. Saving writes the
HF layout (config.json + sharded safetensors + index) that transformers' ``from_pretrained`` reads, into a
temporary directory renamed into place at the end: an interrupted save leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from herd.config import load_config, to_hf_dict
from herd.errors import CheckpointError
from herd.model import Transformer
from herd.model.moe import Experts

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The one key map. herd's module names equal HF's below these prefixes; the text decoder sits under
# "model." in Llama4ForCausalLM and under "language_model.model." in Llama4ForConditionalGeneration.
_TEXT_PREFIXES = ("language_model.model.", "model.")
_HEAD_PREFIXES = ("language_model.", "")
# Tensors of the vision tower (Llama4ForConditionalGeneration): herd keeps them under its ``vision.`` module.
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


def hf_to_herd(name: str) -> str | None:
    """HF tensor name -> herd parameter name (None: not part of a Llama 4 model)."""
    if name.startswith(_VISION_PREFIXES):
        return "vision." + name
    for head in _HEAD_PREFIXES:
        if name.startswith(head + "lm_head."):  # lm_head.weight, and a quantized head's lm_head.weight_scale
            return name[len(head):]
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def transposed_in_hf(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is stored transposed in HF files: routed experts are in x out there
    (gate_up_proj [E, D, 2F], down_proj [E, F, D]) and out x in in herd (herd.model.moe.Experts)."""
    module_name, _, leaf = name.rpartition(".")
    return leaf in ("gate_up_proj", "down_proj") and isinstance(model.get_submodule(module_name), Experts)


def herd_to_hf(name: str, multimodal: bool = False) -> str:
    """herd name -> HF name, in Llama4ForConditionalGeneration's layout when ``multimodal`` (text under
    ``language_model.``), else Llama4ForCausalLM's."""
    if name.startswith("vision."):
        return name.removeprefix("vision.")
    prefix = "language_model." if multimodal else ""
    return prefix + (name if name.startswith("lm_head.") else "model." + name)


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


def load_state_dict(directory: str | Path) -> Iterator[tuple[str, str, Path, torch.Tensor]]:
    """Yield (HF name, herd name or None, file, tensor) one tensor at a time, file by file."""
    directory = Path(directory)
    files = checkpoint_files(directory)
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
                yield name, hf_to_herd(name), file, tensor


def load(directory: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         progress: bool | None = None, strict_config: bool = True, text_only: bool = False) -> Transformer:
    """Load an HF Llama 4 model directory (config.json + single or sharded safetensors) into a herd Transformer.

    dtype: target dtype of floating tensors (None: as stored). A multimodal checkpoint loads with its vision
    tower, unless ``text_only`` (its vision tensors are then skipped and the config loses its vision_config).
    Any unknown, missing or mis-shaped tensor is an error naming it.
    A config.json with a ``quantization_config`` (herd's int8/int4 formats, compressed-tensors FP8 such as
    Llama-4-Maverick-FP8) loads the quantized model; ``dtype`` then applies to the tensors left unquantized."""
    directory = Path(directory)
    cfg = load_config(directory, strict=strict_config)
    skip_vision = text_only and cfg.vision is not None
    if skip_vision:
        cfg = cfg.replace(vision=None)
    dtype, device = parse_dtype(dtype), torch.device(device)
    qconfig = quantization_config(directory)
    if qconfig is not None:
        from herd.infer.quant_checkpoint import load_quantized  # the formats live with the quantized modules

        return load_quantized(directory, cfg, qconfig, dtype=dtype, device=device, progress=progress,
                              skip_vision=skip_vision)
    with torch.device("meta"):
        model = Transformer(cfg)
    fill(model, directory, dtype, device, progress, skip_vision=skip_vision)
    return model


def quantization_config(directory: Path) -> dict | None:
    """The ``quantization_config`` entry of config.json (top level or in text_config), if any."""
    try:
        d = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_config has already reported a missing or broken config.json
    return d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config")


# (HF name, herd name, file, tensor) -> True when the tensor was placed (tensors with no parameter of their own)
ExtraTensor = Callable[[str, str, Path, torch.Tensor], bool]


def fill(model: Transformer, directory: Path, dtype: torch.dtype | None, device: torch.device,
         progress: bool | None = None, target_dtype: Callable[[str, str, torch.Tensor], torch.dtype] | None = None,
         extra: ExtraTensor | None = None, filled: Collection[str] = (), skip_vision: bool = False) -> None:
    """Fill the meta-device ``model`` tensor by tensor from ``directory`` and check that nothing is missing.

    target_dtype(herd name, HF name, tensor) picks the stored dtype (default: ``dtype`` for floating tensors) and may
    raise ValueError to reject a tensor; ``extra`` is offered tensors that have no parameter of their own
    name; ``filled``: parameters the caller (its ``extra``) has placed itself, read after the last tensor;
    ``skip_vision``: ignore the vision tower's tensors (a text-only load of a multimodal checkpoint)."""
    cfg = model.cfg
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    files = checkpoint_files(directory)
    show = progress if progress is not None else len(files) > 200
    for hf_name, name, file, tensor in tqdm(load_state_dict(directory), total=len(files), disable=not show,
                                            desc=f"loading {directory.name}", unit="tensor"):
        if skip_vision and name is not None and name.startswith("vision."):
            continue
        if name is None:
            raise CheckpointError(f"unexpected tensor {hf_name} in {file}: not part of a Llama 4 model")
        if name not in expected:
            if extra is not None and extra(hf_name, name, file, tensor):
                continue
            raise CheckpointError(f"unexpected tensor {hf_name} in {file} (config.json has no such parameter)")
        param = expected[name]
        want = param.shape
        if transposed_in_hf(model, name):
            want = (want[0], want[2], want[1])
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(f"tensor {hf_name} in {file} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {tuple(want)}")
        if transposed_in_hf(model, name):
            tensor = tensor.transpose(1, 2)
        if target_dtype is None:
            target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        else:
            try:
                target = target_dtype(name, hf_name, tensor)
            except ValueError as e:
                raise CheckpointError(f"tensor {hf_name} in {file} {e}") from None
        if tensor.is_contiguous():
            tensor = tensor.to(device=device, dtype=target)
        else:  # the transposed experts: one copy into herd's layout (.to() would keep the strides, or not copy)
            tensor = torch.empty(tensor.shape, dtype=target, device=device).copy_(tensor)
        _assign(model, name, tensor)
        loaded.add(name)
    loaded |= set(filled)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        names = ", ".join(herd_to_hf(m, cfg.vision is not None) for m in missing[:3])
        raise CheckpointError(f"{directory}: missing tensor(s) {names}{more}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


# -- writing ----------------------------------------------------------------------------------------------------
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


__all__ = ["load", "save", "load_state_dict", "hf_to_herd", "herd_to_hf", "parse_dtype", "fill", "write_dir",
           "quantization_config"]
