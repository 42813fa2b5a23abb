"""Model sizes checked wherever a config enters, and the one per-architecture fact mlx_dft cannot
read off a model (PEFT's adaption prompt), on the floor below everything that uses them
(:mod:`mlx_dft.models`, which re-exports the table, the adapters, and :mod:`mlx_dft.gguf`)."""

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
    """What one ``model_type`` needs beyond what mlx_dft reads off its layers.

    ``adaption_prompt``: Hugging Face PEFT's adaption prompt (the Aligner's PEFT export) implements
    it. Everything else per architecture is read off the model itself (:mod:`mlx_dft.support`: the
    Aligner's attention, packing, the loss path) or kept by the feature that needs it (GGUF:
    :mod:`mlx_dft.gguf.archs`).
    """

    adaption_prompt: bool


# The model types PEFT's adaption prompt knows (its TRANSFORMERS_MODEL_CONFIG), and the others the
# Aligner's PEFT export names when it refuses.
ARCHITECTURES = {
    "llama": Architecture(adaption_prompt=True),
    "mistral": Architecture(adaption_prompt=True),
    "qwen2": Architecture(adaption_prompt=False),
    "qwen3": Architecture(adaption_prompt=False),
}


def text_config(config: dict) -> dict:
    """A config.json with its nested ``text_config`` (qwen3_5, gemma3/4 multimodal checkpoints)
    read into the top level: the text model's sizes, the outer ``model_type``."""
    inner = config.get("text_config")
    if not isinstance(inner, dict):
        return config
    return {**config, **inner, "model_type": config.get("model_type", inner.get("model_type"))}
