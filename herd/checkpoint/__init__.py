"""Hugging Face model directories <-> herd models, by concern:

  safetensors_io  reading tensors one at a time, writing shards + index atomically (HF names only)
  names           HF <-> herd tensor names: the one key table
  dense           unquantized models: meta-device loading tensor by tensor, saving
  quantized       herd's int8/int4 layout and compressed-tensors FP8; ``herd quantize``

``load`` reads either kind of directory. (A training run's own state is herd.train.run_state.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.dense import load_dense, parse_dtype, save
from herd.checkpoint.names import herd_to_hf, hf_to_herd, transposed_in_hf
from herd.checkpoint.quantized import load_quantized, quantization_config, quantize_directory, save_quantized
from herd.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, checkpoint_files, replace_dir, write_dir
from herd.config import load_config
from herd.model import Transformer


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
        return load_quantized(directory, cfg, qconfig, dtype, device, progress, skip_vision)
    return load_dense(directory, cfg, dtype, device, progress, skip_vision)


__all__ = ["load", "save", "parse_dtype", "save_quantized", "load_quantized", "quantize_directory",
           "quantization_config", "hf_to_herd", "herd_to_hf", "transposed_in_hf", "INDEX_FILE", "SINGLE_FILE",
           "checkpoint_files", "write_dir", "replace_dir"]
