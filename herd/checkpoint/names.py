"""HF tensor names <-> herd parameter names: one key table, read by loading and saving alike."""

from __future__ import annotations

from torch import nn

from herd.model.moe import Experts

# (herd prefix, HF prefix in Llama4ForCausalLM, HF prefix in Llama4ForConditionalGeneration); herd's module names
# equal HF's below these prefixes. The first row that matches wins, so the text decoder's catch-all comes last.
# herd keeps the vision tower (Llama4ForConditionalGeneration only) under its ``vision.`` module.
KEYS = (
    ("vision.vision_model.", "vision_model.", "vision_model."),
    ("vision.multi_modal_projector.", "multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head.", "language_model.lm_head."),  # lm_head.weight, and a quantized head's weight_scale
    ("", "model.", "language_model.model."),
)


def hf_to_herd(name: str) -> str | None:
    """HF tensor name (either layout) -> herd parameter name (None: not part of a Llama 4 model)."""
    for herd, causal, conditional in KEYS:
        for hf in (conditional, causal):
            if name.startswith(hf):
                return herd + name[len(hf):]
    return None


def herd_to_hf(name: str, multimodal: bool = False) -> str:
    """herd name -> HF name, in Llama4ForConditionalGeneration's layout when ``multimodal`` (text under
    ``language_model.``), else Llama4ForCausalLM's."""
    herd, causal, conditional = next(row for row in KEYS if name.startswith(row[0]))
    return (conditional if multimodal else causal) + name[len(herd):]


def hf_module(name: str, multimodal: bool) -> str:
    """herd module name -> HF module name."""
    return herd_to_hf(name + ".weight", multimodal).removesuffix(".weight")


def transposed_in_hf(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is stored transposed in HF files: routed experts are in x out there
    (gate_up_proj [E, D, 2F], down_proj [E, F, D]) and out x in in herd (herd.model.moe.Experts)."""
    module_name, _, leaf = name.rpartition(".")
    return leaf in ("gate_up_proj", "down_proj") and isinstance(model.get_submodule(module_name), Experts)


__all__ = ["KEYS", "hf_to_herd", "herd_to_hf", "hf_module", "transposed_in_hf"]
