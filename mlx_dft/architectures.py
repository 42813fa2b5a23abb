"""The table of the architectures the Aligner and GGUF cover, on the floor below everything that
uses it (:mod:`mlx_dft.models`, which re-exports it, the adapters, and :mod:`mlx_dft.gguf`, which
:mod:`mlx_dft.models` calls to open GGUF files)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlx_dft.errors import UserError

# The largest value a model config may give each size. Past these no model exists (today's largest
# open models have ~128 layers, a hidden size near 25k, 262k tokens, 128 heads); a crafted file
# asking for 10^9 layers would make the planner, the loader or an adapter reader allocate without
# end before anything else noticed.
SIZE_LIMITS = {
    "num_hidden_layers": 2048, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20, "num_attention_heads": 2048, "num_key_value_heads": 2048,
    "head_dim": 1 << 13, "vocab_size": 1 << 24, "num_experts": 1 << 13, "num_local_experts": 1 << 13,
    "num_experts_per_tok": 1 << 13,
}  # fmt: skip
POSITIVE_REALS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "rope_theta")


def check_sizes(config: dict, where: object) -> None:
    """Refuse a model config (or its nested ``text_config``) whose sizes are not integers in
    [1, SIZE_LIMITS] or whose epsilons and RoPE base are not finite positive numbers: one line
    naming the file and the key, before anything is allocated from them."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key, high in SIZE_LIMITS.items():
            value = cfg.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise UserError(f"{where}: {key} {value!r} must be an integer from 1 to {high:,}")
        for key in POSITIVE_REALS:
            value = cfg.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise UserError(f"{where}: {key} {value!r} must be a finite positive number")


@dataclass(frozen=True)
class Architecture:
    """What mlx_dft knows about one ``model_type``.

    ``mlx_module``: the ``mlx_lm.models`` module whose ``Attention`` the model's layers use (the
    Aligner extends it). ``adaption_prompt``: Hugging Face PEFT's adaption prompt supports it.
    ``gguf``: its GGUF ``general.architecture``; ``gguf_reorders_qk``: llama.cpp stores its q/k
    projection rows in rotary order (see :mod:`mlx_dft.gguf.names`). ``hf_class``: the
    transformers class a config.json names in ``architectures``.
    Every listed architecture has the Aligner, the PyTorch Aligner runner and GGUF (the
    hidden-state loss, LoRA and packing cover every mlx-lm architecture: :mod:`mlx_dft.support`);
    keys/values may carry biases (qwen2) and keys a per-head norm (qwen3), which the code reads off
    the layers themselves.
    """

    mlx_module: str
    adaption_prompt: bool
    gguf: str
    gguf_reorders_qk: bool
    hf_class: str


ARCHITECTURES = {
    "llama": Architecture("llama", True, "llama", gguf_reorders_qk=True, hf_class="LlamaForCausalLM"),
    "mistral": Architecture("llama", True, "llama", gguf_reorders_qk=True, hf_class="MistralForCausalLM"),
    "qwen2": Architecture("qwen2", False, "qwen2", gguf_reorders_qk=False, hf_class="Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", False, "qwen3", gguf_reorders_qk=False, hf_class="Qwen3ForCausalLM"),
}


def architecture(model_type: str, what: str) -> Architecture:
    """The table entry for ``model_type``; ``what`` names the feature in the error."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{what} supports model types {', '.join(ARCHITECTURES)}; this model is {model_type!r}"
        )
    return ARCHITECTURES[model_type]
