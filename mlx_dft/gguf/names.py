"""GGUF naming conventions (llama.cpp's), next to Hugging Face / mlx-lm ones.

Which architectures GGUF covers, and whether llama.cpp reorders their q/k rows, is in
:data:`mlx_dft.architectures.ARCHITECTURES`. Tensor names: ``blk.{i}.attn_q.weight`` <->
``model.layers.{i}.self_attn.q_proj.weight`` and so on
(:data:`BLOCK_TENSORS`, :data:`GLOBAL_TENSORS`); a tensor's ``.scales`` / ``.biases`` (MLX's
affine quantization) follow its ``.weight``. Architecture parameters live under
``{arch}.{key}`` metadata keys (:data:`CONFIG_KEYS`).

The one trap: llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` of llama and
mistral models for its rotary layout (HF rows viewed as [heads, 2, d/2] are stored as
[heads, d/2, 2]). :func:`to_hf_rows` undoes it, :func:`to_gguf_rows` redoes it; rows only, so
they apply unchanged to packed quantized weights and their scales and biases.
"""

from __future__ import annotations

import re
from typing import TypeVar

import mlx.core as mx
import numpy as np

from mlx_dft.architectures import ARCHITECTURES

GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LEAVES = ("weight", "bias", "scales", "biases")

# HF config.json key -> GGUF metadata key under the architecture's prefix.
CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
}

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(" + "|".join(LEAVES) + r")$")
_GLOBAL = re.compile(r"^([a-z_]+)\.(" + "|".join(LEAVES) + r")$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(" + "|".join(LEAVES) + r")$")
_HF_TO_BLOCK = {v: k for k, v in BLOCK_TENSORS.items()}
_HF_TO_GLOBAL = {v: k for k, v in GLOBAL_TENSORS.items()}


def to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    m = _BLOCK.match(name)
    if m and m.group(2) in BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL.match(name)
    if m and m.group(1) in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    return None


def to_gguf_name(name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None if unknown."""
    m = _HF_BLOCK.match(name)
    if m and m.group(2) in _HF_TO_BLOCK:
        return f"blk.{m.group(1)}.{_HF_TO_BLOCK[m.group(2)]}.{m.group(3)}"
    module, _, leaf = name.rpartition(".")
    if module in _HF_TO_GLOBAL and leaf in LEAVES:
        return f"{_HF_TO_GLOBAL[module]}.{leaf}"
    return None


def reordered_heads(hf_name: str, config: dict) -> int | None:
    """The head count whose rows llama.cpp reorders in this tensor (None: not reordered)."""
    arch = ARCHITECTURES.get(config.get("model_type"))
    if arch is None or not arch.gguf_reorders_qk:
        return None
    if ".self_attn.q_proj." in hf_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


# A numpy or an MLX array: the row reorders use only reshape and swapaxes, which both have.
Rows = TypeVar("Rows", np.ndarray, mx.array)


def to_hf_rows(w: Rows, heads: int) -> Rows:
    """GGUF row order -> HF row order of a q/k tensor [heads * d, ...] (weights, scales, biases)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_rows(w: Rows, heads: int) -> Rows:
    """HF row order -> GGUF row order (the inverse of :func:`to_hf_rows`)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
