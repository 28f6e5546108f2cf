"""Quantized checkpoints: herd's int8/int4 layout and compressed-tensors FP8 (the Llama-4-Maverick-FP8 layout).

``save_quantized`` writes a quantized model (see herd.infer.quantize) as an HF directory whose config.json has a
``quantization_config``; ``herd.checkpoint.load`` reads such directories through ``load_quantized``;
``quantize_directory`` is ``herd quantize``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from herd.checkpoint.dense import Filling, StoredTensor, assign, load_dense, load_dtype, parse_dtype
from herd.checkpoint.names import herd_to_hf, hf_module, hf_to_herd
from herd.checkpoint.safetensors_io import INDEX_FILE, checkpoint_files, write_dir
from herd.config import ModelConfig, load_config, to_hf_dict
from herd.errors import CheckpointError
from herd.infer.quantize import (
    PACKED_DTYPES,
    QUANT_MODULES,
    SCHEMES,
    STORAGE,
    QuantExperts,
    QuantizationInfo,
    QuantLinear,
    aligned,
    cast_unquantized,
    check_scheme,
    quantizable,
    quantize,
)
from herd.model import Transformer
from herd.model.moe import Experts


def quantization_config(directory: Path) -> dict | None:
    """The ``quantization_config`` entry of config.json (top level or in text_config), if any."""
    try:
        d = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_config reports a missing or broken config.json
    return d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config")


# -- writing ----------------------------------------------------------------------------------------------------
def save_quantized(model: Transformer, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a quantized model as an HF directory whose config.json has a ``quantization_config``: herd's layout
    for int8/int4, compressed-tensors (Llama-4-Maverick-FP8 layout) for fp8. Atomic, like checkpoint.save."""
    info: QuantizationInfo | None = getattr(model, "quantization", None)
    if info is None:
        raise ValueError("model is not quantized (use herd.infer.quantize.quantize, or checkpoint.save)")
    mm = model.vision is not None
    hf_config = to_hf_dict(model.cfg, text_only=not mm)
    if info.scheme == "fp8":
        tensors = _unfused_tensors(model)
        hf_config["quantization_config"] = _compressed_tensors_config(model)
    else:
        tensors = {herd_to_hf(n, mm): p.detach().contiguous() for n, p in model.named_parameters()}
        hf_config["quantization_config"] = _herd_config(info, mm)
    return write_dir(directory, tensors, hf_config, max_shard_bytes)


def _herd_config(info: QuantizationInfo, multimodal: bool) -> dict:
    int4 = STORAGE[info.scheme] == torch.uint8
    weights = ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": info.group_size,
                "packing": "uint8 [N, K/2], low nibble = even input index, nibble = q + 8"} if int4 else
               {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"})
    acts = ({"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}
            if info.scheme == "int4_weight_int8_dynamic_activation" else None)
    return {"quant_method": "herd", "scheme": info.scheme, "group_size": info.group_size,
            "targets": "experts" if info.experts_only else "linear+experts", "quantize_lm_head": info.quantize_lm_head,
            "modules_to_not_convert": [hf_module(n, multimodal) for n in info.skipped], "weights": weights,
            "input_activations": acts}


def _unfused_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """HF tensors with each expert's gate/up/down as its own [out, in] Linear weight (+ [out, 1] scale)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Experts, QuantExperts)):
            F_ = m.hidden_dim if isinstance(m, QuantExperts) else m.down_proj.shape[2]
            for e in range(m.gate_up_proj.shape[0]):
                prefix = herd_to_hf(f"{name}.{e}", model.vision is not None)
                if isinstance(m, QuantExperts):  # clones: safetensors refuses tensors sharing storage
                    gu, gu_s, d, d_s = m.gate_up_proj[e], m.gate_up_proj_scale[e], m.down_proj[e], m.down_proj_scale[e]
                    parts = {"gate_proj": (gu[:F_], gu_s[:F_]), "up_proj": (gu[F_:], gu_s[F_:]), "down_proj": (d, d_s)}
                    for proj, (w, s) in parts.items():
                        out[f"{prefix}.{proj}.weight"] = w.detach().clone()
                        out[f"{prefix}.{proj}.weight_scale"] = s.detach().clone()
                else:
                    gu, d = m.gate_up_proj[e].detach(), m.down_proj[e].detach()
                    out[f"{prefix}.gate_proj.weight"] = gu[:F_].clone()
                    out[f"{prefix}.up_proj.weight"] = gu[F_:].clone()
                    out[f"{prefix}.down_proj.weight"] = d.clone()
    for name, p in model.named_parameters():
        if ".experts." not in name:
            out[herd_to_hf(name, model.vision is not None)] = p.detach().contiguous()
    return out


def _compressed_tensors_config(model: Transformer) -> dict:
    """compressed-tensors FP8 (float-quantized): channel-wise static weights, dynamic per-token activations."""
    def args(strategy: str, dynamic: bool) -> dict:
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
                "group_size": None, "block_structure": None, "actorder": None,
                "observer": None if dynamic else "minmax", "observer_kwargs": {}}

    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args("channel", False),
                                          "input_activations": args("token", True), "output_activations": None}},
            "ignore": _ct_ignore(model), "kv_cache_scheme": None, "global_compression_ratio": None}


def _ct_ignore(model: Transformer) -> list[str]:
    """compressed-tensors ``ignore`` for the HF Linear modules left unquantized: one regex for a module kind when
    no layer quantizes it, names (one regex per layer for experts) otherwise."""
    units: list[tuple[str, str, bool]] = []  # (kind regex, this module's entry, quantized)
    for name, m in model.named_modules():
        hf = hf_module(name, model.vision is not None)
        if isinstance(m, (Experts, QuantExperts)):
            units.append((r"re:.*feed_forward\.experts\..*", "re:" + re.escape(hf) + r"\..*",
                          isinstance(m, QuantExperts)))
        elif isinstance(m, (nn.Linear, QuantLinear)) or name.endswith(".router"):  # HF's router is a Linear
            kind = re.escape(re.sub(r"^.*layers\.\d+\.", "", hf))
            units.append((r"re:.*layers\.\d+\." + kind + "$" if "layers." in hf else hf, hf,
                          isinstance(m, QuantLinear)))
    ignore: list[str] = []
    for kind in dict.fromkeys(k for k, _, _ in units):
        members = [(entry, q) for k, entry, q in units if k == kind]
        if not any(q for _, q in members):
            ignore.append(kind)
        else:
            ignore += [entry for entry, q in members if not q]
    return ignore


# -- reading ------------------------------------------------------------------------------------------------
_UNFUSED = re.compile(r"(?P<module>layers\.\d+\.feed_forward\.experts)\.(?P<e>\d+)\."
                      r"(?P<proj>gate|up|down)_proj\.(?P<kind>weight|weight_scale)$")


def load_quantized(directory: str | Path, cfg: ModelConfig, qconfig: dict, dtype: str | torch.dtype | None = None,
                   device: str | torch.device = "cpu", progress: bool | None = None,
                   skip_vision: bool = False) -> Transformer:
    """Build the model on the meta device, swap in the quantized modules the checkpoint holds, and fill it tensor
    by tensor (``herd.checkpoint.load`` calls this for a config.json with a ``quantization_config``).

    herd's layout: the modules come from the config (scheme, targets, modules_to_not_convert).
    compressed-tensors FP8: every module with a ``weight_scale`` is FP8; experts may be fused or per expert."""
    directory, dtype, device = Path(directory), parse_dtype(dtype), torch.device(device)
    config_file = directory / "config.json"
    with torch.device("meta"):
        model = Transformer(cfg)
    hf_names = list(checkpoint_files(directory))
    method = qconfig.get("quant_method")
    if method == "herd":
        info = _read_herd_config(qconfig, config_file)
        try:
            names = quantizable(model, info.experts_only, info.quantize_lm_head)
        except ValueError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        skipped = {(hf_to_herd(n + ".weight") or "").removesuffix(".weight"): n for n in info.skipped}
        unknown = [n for herd_name, n in skipped.items() if herd_name not in names]
        if unknown:
            raise CheckpointError(f"{config_file}: quantization_config.modules_to_not_convert names {unknown[0]}, "
                                  "which is no quantizable module of this model")
        targets = [n for n in names if n not in skipped]
        info.skipped = sorted(skipped)
    elif method == "compressed-tensors":
        _check_compressed_tensors(qconfig, config_file)
        targets = _scaled_modules(model, hf_names, directory)
        info = QuantizationInfo("fp8", experts_only=all(isinstance(model.get_submodule(t), Experts) for t in targets))
        info.skipped = [n for n in quantizable(model, info.experts_only, False) if n not in targets]
    else:
        raise CheckpointError(f"{config_file}: quantization_config.quant_method={method!r} is not supported "
                              "(herd reads its own 'herd' layout and compressed-tensors FP8)")
    _check_unfused_complete(model, hf_names, set(targets))

    storage: dict[str, torch.dtype] = {}
    scales: set[str] = set()
    with torch.device("meta"):
        for name in targets:
            m = model.get_submodule(name)
            if isinstance(m, Experts):
                new = QuantExperts(cfg.n_experts, cfg.dim, cfg.expert_hidden_dim, info.scheme, info.group_size)
            else:
                new = QuantLinear(m.in_features, m.out_features, info.scheme, info.group_size)
            model.set_submodule(name, new)
            for p_name, p in new.named_parameters(prefix=name):
                if p_name.endswith("_scale"):
                    scales.add(p_name)
                else:
                    storage[p_name] = p.dtype

    def target_dtype(name: str, t: StoredTensor) -> torch.dtype:
        """The dtype parameter ``name`` loads in from ``t``: exactly the format's storage, fp32 scales."""
        if name in storage:
            if t.tensor.dtype != storage[name]:
                raise t.error(f"has dtype {t.tensor.dtype}; the {info.scheme} format stores {storage[name]}")
            return t.tensor.dtype
        if name in scales:
            return torch.float32
        if t.tensor.dtype in PACKED_DTYPES:
            raise t.error(f"is stored as {t.tensor.dtype} but its scale {t.hf_name}_scale is missing")
        return load_dtype(t.tensor, dtype)

    filling = Filling(model, directory, device, progress, skip_vision)
    unfused = _UnfusedExperts(model, target_dtype, device)
    for t in filling.tensors():
        if not unfused.take(t):
            filling.put(t.name, filling.check(t), target_dtype(t.name, t))
    filling.finish(filled=unfused.complete)
    for m in model.modules():  # packed weights straight from safetensors may sit at any 8-byte offset; kernels
        if isinstance(m, QUANT_MODULES):  # with aligned vector loads want torch's 64-byte alignment
            for p in m.parameters():
                if not aligned(p):
                    p.data = p.data.clone()
    model.quantization = info
    return model


def _read_herd_config(qc: dict, config_file: Path) -> QuantizationInfo:
    scheme = qc.get("scheme")
    if scheme not in SCHEMES:
        raise CheckpointError(f"{config_file}: unknown quantization scheme {scheme!r} "
                              f"(herd knows {', '.join(SCHEMES)})")
    return QuantizationInfo(scheme, int(qc.get("group_size", 128)), qc.get("targets") == "experts",
                            bool(qc.get("quantize_lm_head", False)), list(qc.get("modules_to_not_convert", [])))


def _check_compressed_tensors(qc: dict, config_file: Path) -> None:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise CheckpointError(f"{config_file}: compressed-tensors format {fmt!r} is not supported "
                              "(herd reads 'float-quantized' FP8)")
    for group_name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        got = (w.get("type"), w.get("num_bits"), w.get("strategy"))
        if got != ("float", 8, "channel"):
            raise CheckpointError(f"{config_file}: compressed-tensors {group_name} stores weights as "
                                  f"{got[0]}{got[1]} per {got[2]}; herd reads FP8 per channel only")


def _scaled_modules(model: Transformer, hf_names: list[str], directory: Path) -> list[str]:
    """Modules with a ``weight_scale`` in the checkpoint (per-expert scales name their experts module)."""
    targets: dict[str, None] = {}
    for hf_name in hf_names:
        name = hf_to_herd(hf_name)
        if name is None or not name.endswith(".weight_scale"):
            continue
        match = _UNFUSED.match(name)
        module = match["module"] if match else name.removesuffix(".weight_scale")
        try:
            m = model.get_submodule(module)
        except AttributeError:
            m = None
        if not isinstance(m, (nn.Linear, Experts)):
            raise CheckpointError(f"unexpected tensor {hf_name} in {directory}: {module} is not a quantizable module")
        targets[module] = None
    return list(targets)


def _check_unfused_complete(model: Transformer, hf_names: list[str], quantized: set[str]) -> None:
    """Every expert of a per-expert checkpoint has its three weights (and scales when quantized): checked on the
    names, before any tensor is read, so the error names the missing per-expert tensor."""
    seen: dict[str, tuple[str, set[tuple[int, str, str]]]] = {}
    for hf_name in hf_names:
        name = hf_to_herd(hf_name)
        match = _UNFUSED.match(name or "")
        if match:
            prefix = hf_name[: len(hf_name) - len(name)]
            seen.setdefault(match["module"], (prefix, set()))[1].add((int(match["e"]), match["proj"], match["kind"]))
    for module, (prefix, have) in seen.items():
        kinds = ("weight", "weight_scale") if module in quantized else ("weight",)
        for e in range(model.cfg.n_experts):
            for proj in ("gate", "up", "down"):
                for kind in kinds:
                    if (e, proj, kind) not in have:
                        raise CheckpointError(f"missing tensor {prefix}{module}.{e}.{proj}_proj.{kind} "
                                              f"(the checkpoint stores the experts of {prefix}{module} one by one)")


class _UnfusedExperts:
    """Gathers per-expert ``experts.{e}.{gate,up,down}_proj.weight[_scale]`` tensors into the fused parameters,
    allocated on first use and filled slice by slice (stacking them would hold a layer's experts twice)."""

    def __init__(self, model: Transformer, target_dtype: Callable[[str, StoredTensor], torch.dtype],
                 device: torch.device):
        self.model, self.target_dtype, self.device = model, target_dtype, device
        self.parts: dict[str, int] = {}
        self.complete: set[str] = set()

    def take(self, t: StoredTensor) -> bool:
        """Place ``t`` if it is one expert's part; False for any other tensor."""
        match = _UNFUSED.match(t.name)
        if not match:
            return False
        try:
            m = self.model.get_submodule(match["module"])
        except AttributeError:  # no such layer, or a dense one: the caller reports the tensor as unexpected
            return False
        if not isinstance(m, (Experts, QuantExperts)):
            return False
        e, proj, kind = int(match["e"]), match["proj"], match["kind"]
        E, F_ = self.model.cfg.n_experts, self.model.cfg.expert_hidden_dim
        fused = "down_proj" if proj == "down" else "gate_up_proj"
        p_name = f"{match['module']}.{fused}" + ("_scale" if kind == "weight_scale" else "")
        if e >= E:
            raise CheckpointError(f"unexpected tensor {t.hf_name} in {t.file}: the config has {E} experts")
        target = self.target_dtype(p_name, t)
        param = self.model.get_parameter(p_name)
        rows = {"gate": slice(0, F_), "up": slice(F_, 2 * F_), "down": slice(None)}[proj]
        dst = lambda full: full[e, rows]  # noqa: E731  (herd's experts are out x in, like the file's Linears)
        want = tuple(dst(param).shape)
        if tuple(t.tensor.shape) != want:
            raise t.error(f"has shape {tuple(t.tensor.shape)}, the config expects {want}")
        if param.is_meta:
            assign(self.model, p_name, torch.empty(param.shape, dtype=target, device=self.device))
            param = self.model.get_parameter(p_name)
        with torch.no_grad():
            dst(param).copy_(t.tensor.to(device=self.device, dtype=target))
        self.parts[p_name] = self.parts.get(p_name, 0) + 1
        if self.parts[p_name] == (E if proj == "down" else 2 * E):
            self.complete.add(p_name)
        return True


# -- the CLI's entry point --------------------------------------------------------------------------------------
_NOT_COPIED = {"config.json", INDEX_FILE}


def quantize_directory(src_dir: str | Path, out_dir: str | Path, scheme: str, *, group_size: int = 128,
                       skip: Iterable[str] | None = None, quantize_lm_head: bool = False,
                       experts_only: bool | None = None, dtype: str | torch.dtype | None = "bf16",
                       max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Load an unquantized HF directory, quantize it (from the stored precision), keep the other tensors in
    ``dtype`` (None: as stored), save to ``out_dir`` with the source's tokenizer and other side files."""
    check_scheme(scheme)
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if quantization_config(src_dir) is not None:
        raise ValueError(f"{src_dir} is already quantized; quantize an unquantized (bf16/fp32) checkpoint")
    model = load_dense(src_dir, load_config(src_dir), progress=progress)
    quantize(model, scheme, group_size, skip, quantize_lm_head, experts_only, progress=progress)
    if dtype is not None:
        cast_unquantized(model, parse_dtype(dtype))
    save_quantized(model, out_dir, max_shard_bytes)
    for f in src_dir.iterdir():  # tokenizer.model, tokenizer_config.json, generation_config.json, ...
        if f.is_file() and f.name not in _NOT_COPIED and f.suffix != ".safetensors" and not (out_dir / f.name).exists():
            shutil.copy2(f, out_dir / f.name)
    return out_dir


__all__ = ["quantization_config", "save_quantized", "load_quantized", "quantize_directory"]
