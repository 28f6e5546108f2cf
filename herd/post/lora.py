"""LoRA: low-rank adapters swapped into a built herd model from outside, merged back, and saved or loaded as PEFT
adapters for transformers' Llama 4.

``apply_lora`` swaps each targeted module's class in place (herd.model's subclass swap), freezing every base
parameter: nn.Linear -> LoRALinear with lora_A [r, in], lora_B [out, r]; Experts -> LoRAExperts with one pair per
expert and weight, gate_up_A [E, r, D], gate_up_B [E, 2F, r], down_A [E, r, F], down_B [E, D, r]. Base parameter
names stay (``...q_proj.weight`` beside ``...q_proj.lora_A``). A forward adds scale * (x @ A.T) @ B.T, scale =
alpha / rank, never forming B @ A; the experts' low-rank products use the module's grouped-matmul backend, so
every backend and the per-expert row offsets work as for the base weights. B starts at zero: a fresh adapter
changes nothing.

PEFT's layout for Llama4ForCausalLM (keys ``base_model.model.`` + the HF module name, herd.checkpoint.names):
  linears  ``<module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r]: herd's pair as it is (herd.checkpoint
           copies q/k rows unpermuted, so no RoPE permutation applies).
  experts  target_parameters. HF stores experts in x out (gate_up_proj [E, D, 2F]) and peft's ParamWrapper then
           calls the *last* dim "in": its delta for expert e is lora_B[:, columns k*E + e] @ lora_A[rows e*r + k],
           [D, r] @ [r, 2F], the transpose of herd's B[e] @ A[e]. So peft's lora_A [E*r, N] holds herd's B
           transposed (expert-major) and peft's lora_B [K, r*E] holds herd's A transposed (rank-major), K and N
           being herd's in and out. With both weights targeted peft nests two wrappers in the HF module's
           parameter order: gate_up_proj's keys are ``experts.base_layer.lora_*``, down_proj's ``experts.lora_*``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from herd.checkpoint.names import hf_module, hf_to_herd
from herd.model import Transformer
from herd.model.moe import GROUPED_MM, Experts

# (base weight, A, B) names of each adapted weight: a Linear's one, then the Experts' two in HF's parameter order
_PAIRS = (("weight", "lora_A", "lora_B"), ("gate_up_proj", "gate_up_A", "gate_up_B"), ("down_proj", "down_A", "down_B"))
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0  # scale = alpha / rank (PEFT's lora_alpha / r)
    # nn.Linear names (or dotted suffixes) in the text decoder, and "experts": the routed experts' two weights, one
    # pair per expert each. Never the router, embeddings, lm_head or the vision tower.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts")

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class LoRALinear(nn.Linear):
    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_r = F.linear(x, self.lora_A.to(x.dtype)) * self.lora_scale
        return super().forward(x) + F.linear(low_r, self.lora_B.to(low_r.dtype))


class LoRAExperts(Experts):
    lora_scale: float

    def forward(self, x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        mm = GROUPED_MM[self.backend]
        gate_up_ENK, down_ENK = self.local_weights()

        def lora_mm(x_MK, w_ENK, A_ErK, B_ENr):
            A_ErK, B_ENr = _local(A_ErK), _local(B_ENr)
            if A_ErK.shape[0] != w_ENK.shape[0]:
                raise RuntimeError("expert parallelism sharded the experts' weights but not their LoRA stacks "
                                   "(gate_up_A/B, down_A/B): shard those with them")
            low_Mr = mm(x_MK, A_ErK.to(x_MK.dtype), offsets_E) * self.lora_scale
            return mm(x_MK, w_ENK, offsets_E) + mm(low_Mr, B_ENr.to(low_Mr.dtype), offsets_E)

        gate_RF, up_RF = lora_mm(x_RD, gate_up_ENK, self.gate_up_A, self.gate_up_B).chunk(2, dim=-1)
        return lora_mm(F.silu(gate_RF) * up_RF, down_ENK, self.down_A, self.down_B)


def _pairs(m: nn.Module) -> tuple[tuple[str, str, str], ...]:
    return _PAIRS[:1] if isinstance(m, nn.Linear) else _PAIRS[1:]


def _adaptable(name: str, m: nn.Module) -> bool:
    """Linears and routed experts of the text decoder (the router is no nn.Linear)."""
    return isinstance(m, (nn.Linear, Experts)) and not name.startswith("vision.") and name != "lm_head"


def _adapt(model: nn.Module, modules: dict[str, nn.Module], cfg: LoRAConfig, seed: int,
           dtype: torch.dtype | None) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, m in modules.items():
        if type(m) not in (nn.Linear, Experts):
            raise ValueError(f"{name} is a {type(m).__name__}, not a plain nn.Linear or Experts: apply LoRA once, "
                             "before other module swaps (FP8, decode modules)")
        for w, a, b in _pairs(m):
            weight = getattr(m, w)
            *E, N, K = weight.shape
            # PEFT's kaiming_uniform_(a=sqrt(5)) on [r, K]: U(-1/sqrt(K), 1/sqrt(K)), drawn on the CPU for any device
            A = torch.empty(*E, cfg.rank, K).uniform_(-K ** -0.5, K ** -0.5, generator=g)
            m.register_parameter(a, nn.Parameter(A.to(weight.device, dtype or weight.dtype)))
            m.register_parameter(b, nn.Parameter(weight.new_zeros(*E, N, cfg.rank, dtype=dtype or weight.dtype)))
        m.lora_scale = cfg.scale
        m.__class__ = LoRALinear if isinstance(m, nn.Linear) else LoRAExperts


def apply_lora(model: Transformer, cfg: LoRAConfig, seed: int = 0, dtype: torch.dtype | None = None) -> list[str]:
    """Adapt ``cfg.targets`` in place, freezing every base parameter; LoRA parameters in ``dtype`` (None: each base
    weight's). Returns the adapted modules' names."""
    found, hit = {}, set()
    for name, m in model.named_modules():
        for t in cfg.targets:
            if _adaptable(name, m) and (isinstance(m, Experts) if t == "experts" else
                                        isinstance(m, nn.Linear) and (name == t or name.endswith("." + t))):
                found[name] = m
                hit.add(t)
    missing = [t for t in cfg.targets if t not in hit]
    if missing:
        raise ValueError(f"LoRA target(s) {', '.join(map(repr, missing))} match no nn.Linear of the text decoder "
                         "(or, for 'experts', no routed experts); the router, embeddings, lm_head and vision tower "
                         "are never adapted")
    _adapt(model, found, cfg, seed, dtype)
    return list(found)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    leaves = {n for _, *ab in _PAIRS for n in ab}
    return [p for name, p in model.named_parameters() if name.rpartition(".")[2] in leaves]


def _merged(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A (batched over experts for 3-D weights), computed in fp32."""
    return (W.float() + scale * (B.float() @ A.float())).to(W.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and swap the plain class back (base parameters stay frozen)."""
    for m in model.modules():
        if isinstance(m, (LoRALinear, LoRAExperts)):
            for w, a, b in _pairs(m):
                getattr(m, w).copy_(_merged(getattr(m, w), getattr(m, a), getattr(m, b), m.lora_scale))
                delattr(m, a), delattr(m, b)
            del m.lora_scale
            m.__class__ = nn.Linear if isinstance(m, LoRALinear) else Experts


def merged_state_dict(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict -> the plain model's: adapters folded in, LoRA keys dropped, order kept."""
    out = dict(state)
    for key in state:
        prefix, _, leaf = key.rpartition(".")
        for w, a, b in _PAIRS:
            if leaf == a:
                out[f"{prefix}.{w}"] = _merged(state[f"{prefix}.{w}"], state[key], state[f"{prefix}.{b}"], cfg.scale)
                del out[key], out[f"{prefix}.{b}"]
    return out


def _peft_pair(m: nn.Module, a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A, lora_B) for the herd pair (a, b) of m (module doc)."""
    A, B = getattr(m, a).detach(), getattr(m, b).detach()
    if A.ndim == 2:
        return A, B
    return B.transpose(1, 2).reshape(-1, B.shape[1]), A.permute(2, 1, 0).reshape(A.shape[2], -1)


def _peft_entries(model: Transformer, expert_weights: tuple[str, ...] = ("gate_up_proj", "down_proj")):
    """(key prefix, module, A name, B name) of every adapted weight, keys as peft names them when its
    target_parameters are ``expert_weights``."""
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAExperts)):
            key = _PEFT_PREFIX + hf_module(name, model.vision is not None)
            pairs = [p for p in _pairs(m) if isinstance(m, nn.Linear) or p[0] in expert_weights]
            for depth, (_, a, b) in enumerate(reversed(pairs)):  # peft nests the last weight outermost
                yield key + ".base_layer" * depth, m, a, b


def save_peft_adapter(model: Transformer, cfg: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as peft writes them for Llama4ForCausalLM (or
    Llama4ForConditionalGeneration, for a model with a vision tower)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, m, a, b in _peft_entries(model):
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = _peft_pair(m, a, b)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors",
              metadata={"format": "pt"})
    linears = [t for t in cfg.targets if t != "experts"]
    if model.vision is not None and linears:  # the vision tower has q_proj etc. too: keep peft off them
        linears = rf"language_model\..*\.({'|'.join(map(re.escape, linears))})"
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "target_modules": linears or None,
        "target_parameters": ([f"feed_forward.experts.{w}" for w, _, _ in _PAIRS[1:]] if "experts" in cfg.targets
                              else None),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


@torch.no_grad()
def load_peft_adapter(model: Transformer, adapter_dir: str | Path) -> LoRAConfig:
    """Apply LoRA to ``model`` from a PEFT adapter directory (peft's, TRL's or save_peft_adapter's): exactly the
    modules it has tensors for. Returns its config, targets named by leaf. An adapter that does not fit raises
    ValueError, possibly with the model already adapted: load into a fresh model."""
    d = Path(adapter_dir)
    c = json.loads((d / "adapter_config.json").read_text())
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{d}: peft_type {c.get('peft_type')!r}, herd loads LORA adapters only")
    for option in ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        if c.get(option):
            raise ValueError(f"{d}: the adapter sets {option}, which herd's LoRA does not support")
    rank = c["r"]
    alpha = c["lora_alpha"] * (math.sqrt(rank) if c.get("use_rslora") else 1)  # rsLoRA's scale alpha / sqrt(r)
    targeted = tuple(w for w, _, _ in _PAIRS[1:]
                     if any(t.rpartition(".")[2] == w for t in c.get("target_parameters") or ()))
    halves: dict[str, dict[str, torch.Tensor]] = {}  # peft key prefix -> {"A": lora_A, "B": lora_B}
    modules, by_name = {}, dict(model.named_modules())
    for key, t in load_file(d / "adapter_model.safetensors").items():
        match = re.fullmatch(re.escape(_PEFT_PREFIX) + r"(.+?)(?:\.base_layer)*\.lora_([AB])\.weight", key)
        name = hf_to_herd(match[1] + ".weight") if match else None
        name = name and name.removesuffix(".weight")
        if name not in by_name or not _adaptable(name, by_name[name]):
            raise ValueError(f"{d}: adapter tensor {key} is for no module herd's LoRA adapts")
        modules[name] = by_name[name]
        halves.setdefault(key.removesuffix(f".lora_{match[2]}.weight"), {})[match[2]] = t
    cfg = LoRAConfig(rank, alpha, tuple(sorted({n.rpartition(".")[2] for n, m in modules.items()
                                                if isinstance(m, nn.Linear)})) +
                     (("experts",) if any(isinstance(m, Experts) for m in modules.values()) else ()))
    _adapt(model, modules, cfg, seed=0, dtype=None)
    for key, m, a, b in _peft_entries(model, targeted):
        if key not in halves:
            continue  # a weight the file has no tensors for: its B stays zero
        got, want = halves.pop(key), _peft_pair(m, a, b)
        if set(got) != {"A", "B"} or any(got[x].shape != w.shape for x, w in zip("AB", want)):
            raise ValueError(f"{d}: {key}.lora_A/B have shapes {[tuple(t.shape) for t in got.values()]}, herd "
                             f"expects {[tuple(w.shape) for w in want]} (r={rank})")
        A, B = getattr(m, a), getattr(m, b)
        if A.ndim == 2:
            A.copy_(got["A"]), B.copy_(got["B"])
        else:
            E, r, K = A.shape
            B.copy_(got["A"].reshape(E, r, -1).transpose(1, 2)), A.copy_(got["B"].reshape(K, r, E).permute(2, 1, 0))
    if halves:
        raise ValueError(f"{d}: tensors {', '.join(sorted(halves))} match none of the adapted weights "
                         f"(target_parameters {c.get('target_parameters')})")
    return cfg


__all__ = ["LoRAConfig", "LoRALinear", "LoRAExperts", "apply_lora", "lora_parameters", "merge_lora",
           "merged_state_dict", "save_peft_adapter", "load_peft_adapter"]
