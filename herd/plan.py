"""Memory and compute planner: does a model fit a set of GPUs, for inference or training, and at what cost?

    herd plan scout --gpus 1 --gpu-mem 80 --dtype int4 --context 131072
    herd plan maverick --gpus 8 --dtype fp8
    herd plan behemoth --gpus 32768 --dtype fp8 --train --context 8192 --tokens 30e12 --json

Per GPU it counts, from the config's parameter census (herd.info):

* **weights**: each component in the dtype's format, split over the layout. Inference: tensor parallel over
  ``tp`` GPUs for attention, dense/shared FFNs, embedding and head; routed experts over ``ep`` GPUs (expert
  parallel); norms and router replicated. Formats: bf16 = 2 bytes; int8 / int4 (herd quantize: attention,
  FFNs and experts; int4 adds one bf16 scale per 128 weights; embedding, head, norms, router, vision in bf16);
  fp8 = Meta's fp8_mixed (routed experts of every MoE layer but the first and last in FP8 with row scales, the
  rest bf16: the Llama-4-Maverick-FP8 layout).
* **KV cache** (inference), bf16: per sequence and layer 2 x KV heads x head_dim x tokens held, where iRoPE's
  chunked local layers hold min(context, chunk) tokens and the global NoPE layers the whole context. KV heads are
  split over ``tp`` (replicated when tp exceeds them).
* **activations**: inference: one prefill chunk's live tensors. Training: per token and layer, the block input
  (with full activation checkpointing, the default) or every saved tensor (attention q/k/v/out, norms, each
  active expert's gate/up/act: ``--no-ac``), plus one block being recomputed, plus the logits (bf16 + fp32 for
  the loss), split over ``tp``.
* **optimizer** (training): FSDP2 fully shards fp32 master weights, fp32 gradients and AdamW's two moments (16
  bytes per parameter) over all GPUs (dense parameters over the FSDP x TP grid, experts over EP x the expert-FSDP
  ranks, as torchtitan lays them out), plus two gathered blocks in flight (one computing, one prefetched).
* **reserve**: CUDA context, communication buffers and allocator slack, a fixed ``--reserve`` (default 2 GB).

FLOPs per token: 2 x active parameters + attention (4 x heads x head_dim x the average number of keys a query
sees: half the chunk on local layers, half the context on global ones); training is 3x the forward. With
``--tokens`` and ``--tflops`` (achieved per GPU) the plan also gives training throughput and days.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from herd.config import ModelConfig
from herd.errors import ConfigError
from herd.info import FORMAT_BYTES, Census, census

GB = 1e9
INT4_BYTES = FORMAT_BYTES["int4"]  # packed nibbles + one bf16 scale per group of 128
DTYPES = ("bf16", "fp8", "int8", "int4")
_TP_SPLIT = ("embedding", "lm_head", "attention", "dense_ffn", "shared_expert")  # tensor-parallel components
_QUANTIZED = ("attention", "dense_ffn", "shared_expert", "routed_experts")  # what herd quantize converts


@dataclass
class Plan:
    model: str
    mode: str  # "inference" or "train"
    dtype: str
    gpus: int
    gpu_mem_bytes: float
    layout: dict[str, int]
    context: int
    batch: int
    per_gpu: dict[str, float]  # bytes by kind
    flops_per_token: float
    notes: list[str] = field(default_factory=list)
    throughput: dict[str, float] = field(default_factory=dict)

    @property
    def per_gpu_bytes(self) -> float:
        return sum(self.per_gpu.values())

    @property
    def fits(self) -> bool:
        return self.per_gpu_bytes <= self.gpu_mem_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d |= {"per_gpu_bytes": self.per_gpu_bytes, "fits": self.fits}
        return d


def _weight_bytes(c: Census, dtype: str) -> dict[str, float]:
    """Bytes of each component in ``dtype``'s format."""
    cfg = c.config
    out = {k: 2.0 * n for k, n in c.by_component.items()}
    if dtype in ("int8", "int4"):
        per = 1.0 if dtype == "int8" else INT4_BYTES
        for k in _QUANTIZED:
            if k in c.by_component:
                out[k] = per * c.by_component[k]
    elif dtype == "fp8":
        moe = list(cfg.moe_layers)
        fp8_layers = [i for i in moe if i not in (0, cfg.n_layers - 1)]
        per_layer = c.by_component.get("routed_experts", 0) / max(1, len(moe))
        fp8 = per_layer * len(fp8_layers)
        # fp8 weight + one fp32 scale per output row (per expert)
        scale = 4.0 / cfg.dim
        out["routed_experts"] = (per_layer * (len(moe) - len(fp8_layers))) * 2.0 + fp8 * (1.0 + scale)
    elif dtype != "bf16":
        raise ConfigError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return out


def _held_tokens(cfg: ModelConfig, context: int) -> list[int]:
    chunk = cfg.attention_chunk_size
    return [min(context, chunk) if cfg.is_chunked(i) else context for i in range(cfg.n_layers)]


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, tp: int = 1, bytes_per: float = 2.0) -> float:
    """KV cache of ``batch`` sequences of ``context`` tokens on one of ``tp`` tensor-parallel GPUs."""
    heads = math.ceil(cfg.n_kv_heads / tp)
    return sum(_held_tokens(cfg, context)) * 2 * heads * cfg.head_dim * bytes_per * batch


def flops_per_token(c: Census, context: int, train: bool) -> float:
    cfg = c.config
    matmul = c.active_params - c.active_by_component.get("embedding", 0)  # the embedding is a lookup
    keys = sum(h / 2 for h in _held_tokens(cfg, context))  # average keys a query attends to, per layer
    forward = 2 * matmul + 4 * cfg.n_heads * cfg.head_dim * keys
    return 3 * forward if train else forward


def _ffn_width(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(hidden width, how many FFNs a token runs) of a layer: MoE = top_k routed + 1 shared."""
    return (cfg.expert_hidden_dim, cfg.top_k + 1) if cfg.is_moe(layer) else (cfg.dense_hidden_dim, 1)


def _layer_activation_elems(cfg: ModelConfig, layer: int, tp: int) -> float:
    """Elements saved for the backward per token of one block, no checkpointing, sequence-parallel over tp."""
    h, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    attn = 2 * h + (h + 2 * kv) + h  # two norm inputs, q/k/v, attention output
    width, n_ffn = _ffn_width(cfg, layer)
    ffn = n_ffn * (3 * width + h) + h  # per FFN: gate/up, act, its input; the combined output
    return (attn + ffn) / tp


def plan(cfg: ModelConfig, name: str, gpus: int, gpu_mem_gb: float = 80.0, dtype: str = "bf16",
         context: int = 8192, batch: int = 1, train: bool = False, tp: int | None = None, ep: int | None = None,
         micro_batch: int = 1, activation_checkpointing: bool = True, prefill_chunk: int = 8192,
         reserve_gb: float = 2.0, tokens: float | None = None, tflops: float | None = None) -> Plan:
    if gpus < 1 or context < 1 or batch < 1 or micro_batch < 1:
        raise ConfigError("gpus, context, batch and micro_batch must be >= 1")
    c = census(cfg)
    tp = tp or (1 if train else min(gpus, 8))
    ep = ep or (math.gcd(gpus, cfg.n_experts) if train else gpus)
    for n, v in (("tp", tp), ("ep", ep)):
        if v < 1 or gpus % v:
            raise ConfigError(f"--{n} {v} must divide --gpus {gpus}")
    if train and cfg.n_experts % ep:
        raise ConfigError(f"--ep {ep} must divide the {cfg.n_experts} experts (each EP rank trains whole experts)")
    w = _weight_bytes(c, "bf16" if train else dtype)
    per_gpu: dict[str, float] = {}
    notes: list[str] = []
    if not train:
        dense = sum(v for k, v in w.items() if k in _TP_SPLIT) / tp
        experts = (w.get("routed_experts", 0) * math.ceil(cfg.n_experts / ep) / cfg.n_experts  # whole experts per GPU
                   if cfg.n_experts else 0.0)
        replicated = sum(v for k, v in w.items() if k not in _TP_SPLIT and k != "routed_experts")
        per_gpu["weights"] = dense + experts + replicated
        per_gpu["kv_cache"] = kv_cache_bytes(cfg, context, batch, tp)
        chunk = min(prefill_chunk, context)
        width = max(max(_ffn_width(cfg, i)[0] * _ffn_width(cfg, i)[1] for i in range(cfg.n_layers)), cfg.dim)
        per_gpu["activations"] = chunk * (4 * cfg.dim + 3 * width / tp) * 2 + cfg.vocab_size * 4 * batch
        layout = {"tp": tp, "ep": ep, "replicas": gpus // tp}
    else:
        params = c.total_params
        per_gpu["weights"] = 4.0 * params / gpus  # fp32 master, fully sharded by FSDP2
        per_gpu["gradients"] = 4.0 * params / gpus
        per_gpu["optimizer"] = 8.0 * params / gpus  # AdamW moments
        block = max(sum(p for p in _block_params(c, i, tp, ep)) for i in range(cfg.n_layers))
        per_gpu["gathered_blocks"] = 2 * block * (1.0 if dtype == "fp8" else 2.0)
        tokens_per_gpu = micro_batch * context / tp
        if activation_checkpointing:
            saved = cfg.n_layers * cfg.dim * 2.0  # each block's input, bf16
            live = max(_layer_activation_elems(cfg, i, 1) for i in range(cfg.n_layers)) * 2.0
            per_gpu["activations"] = tokens_per_gpu * (saved + live)
        else:
            per_gpu["activations"] = tokens_per_gpu * sum(_layer_activation_elems(cfg, i, 1) * 2.0
                                                          for i in range(cfg.n_layers))
        per_gpu["logits"] = micro_batch * context * cfg.vocab_size * 6.0 / tp  # bf16 logits + fp32 for the loss
        layout = {"tp": tp, "ep": ep, "fsdp": gpus // tp, "expert_fsdp": gpus // ep, "micro_batch": micro_batch,
                  "activation_checkpointing": int(activation_checkpointing)}
        if dtype == "fp8":
            notes.append("fp8 training: matmuls in FP8 (torchao float8); master weights, gradients and optimizer "
                         "stay fp32, so memory is that of bf16 training but for the gathered blocks")
    per_gpu["reserve"] = reserve_gb * GB
    p = Plan(model=name, mode="train" if train else "inference", dtype=dtype, gpus=gpus,
             gpu_mem_bytes=gpu_mem_gb * GB, layout=layout, context=context, batch=micro_batch if train else batch,
             per_gpu=per_gpu, flops_per_token=flops_per_token(c, context, train), notes=notes)
    if train and tflops:
        tok_s = gpus * tflops * 1e12 / p.flops_per_token
        p.throughput = {"tflops_per_gpu": tflops, "tokens_per_s": tok_s}
        if tokens:
            p.throughput |= {"tokens": tokens, "days": tokens / tok_s / 86400}
    return p


def _block_params(c: Census, layer: int, tp: int, ep: int) -> list[float]:
    """Parameters of block ``layer`` one GPU gathers: its dense part over tp, its experts over ep."""
    cfg = c.config
    per_layer = {k: v / cfg.n_layers for k, v in c.by_component.items() if k in ("attention", "norms")}
    moe = list(cfg.moe_layers)
    if cfg.is_moe(layer):
        per_layer["shared_expert"] = c.by_component.get("shared_expert", 0) / len(moe)
        per_layer["router"] = c.by_component.get("router", 0) / len(moe)
        experts = c.by_component.get("routed_experts", 0) / len(moe) / ep
    else:
        dense_layers = cfg.n_layers - len(moe)
        per_layer["dense_ffn"] = c.by_component.get("dense_ffn", 0) / max(1, dense_layers)
        experts = 0.0
    return [v / tp for v in per_layer.values()] + [experts]


def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB"


def render(p: Plan) -> str:
    lay = ", ".join(f"{k} {v}" for k, v in p.layout.items())
    lines = [f"{p.model}: {p.mode}, {p.dtype}, {p.gpus} GPU(s) x {p.gpu_mem_bytes / GB:.0f} GB, context "
             f"{p.context:,}, {'micro-batch' if p.mode == 'train' else 'batch'} {p.batch}",
             f"  layout: {lay}", "", f"  {'per GPU':<18}{'memory':>14}"]
    for k, v in p.per_gpu.items():
        lines.append(f"  {k:<18}{_gb(v):>14}")
    verdict = "fits" if p.fits else "does NOT fit"
    lines += [f"  {'total':<18}{_gb(p.per_gpu_bytes):>14}   {verdict} in {p.gpu_mem_bytes / GB:.0f} GB", "",
              f"  FLOPs per token: {p.flops_per_token / 1e9:,.1f} GFLOP "
              f"({'forward + backward' if p.mode == 'train' else 'forward'})"]
    if p.throughput:
        t = p.throughput
        lines.append(f"  at {t['tflops_per_gpu']:.0f} TFLOP/s per GPU: {t['tokens_per_s'] / 1e6:,.2f}M tokens/s"
                     + (f", {t['tokens'] / 1e12:g}T tokens in {t['days']:.1f} days" if "days" in t else ""))
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)
