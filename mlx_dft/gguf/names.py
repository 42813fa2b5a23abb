"""GGUF naming conventions (llama.cpp's), next to Hugging Face / mlx-lm ones.

Which model types GGUF covers, and whether llama.cpp reorders their q/k rows, is in
:data:`mlx_dft.gguf.archs.ARCHS`. Tensor names come from gguf-py's ``TensorNameMap`` for the
file's architecture (``model.layers.3.self_attn.q_proj.weight`` <-> ``blk.3.attn_q.weight``, a
Gemma ``post_attention_layernorm`` <-> ``post_attention_norm`` but a llama one <-> ``ffn_norm``);
mlx-lm's stacked experts (``mlp.switch_mlp.gate_proj``) are named as Hugging Face's merged ones
(``mlp.experts.gate_proj``, llama.cpp's ``ffn_gate_exps``). A tensor's ``.scales`` / ``.biases``
(MLX's affine quantization) follow its ``.weight``. Architecture parameters live under
``{arch}.{key}`` metadata keys (:data:`CONFIG_KEYS`).

The one trap: llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` of llama and
mistral models for its rotary layout (HF rows viewed as [heads, 2, d/2] are stored as
[heads, d/2, 2]). :func:`to_hf_rows` undoes it, :func:`to_gguf_rows` redoes it; rows only, so
they apply unchanged to packed quantized weights and their scales and biases.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TypeVar

import gguf
import mlx.core as mx
import numpy as np

from mlx_dft.gguf.archs import ARCHS

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

# mlx-lm module names gguf-py's tables do not know -> the Hugging Face name they hold
MLX_ALIASES = {".mlp.switch_mlp.": ".mlp.experts."}


@functools.lru_cache(maxsize=32)
def _table(gguf_arch: str, n_blocks: int) -> gguf.TensorNameMap:
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch)
    return gguf.TensorNameMap(arch, n_blocks)


def to_gguf_name(name: str, model_type: str = "llama", n_blocks: int = 1024) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` in ``model_type``'s
    GGUF architecture; None if llama.cpp has no such tensor there."""
    own = ARCHS[model_type].name(name)
    if own is not None:
        return own
    module, _, leaf = name.rpartition(".")
    if leaf not in LEAVES:  # a parameter of its own (gpt-oss's attention sinks): llama.cpp's .weight
        module, leaf = name, "weight"
    for mlx_part, hf_part in MLX_ALIASES.items():
        module = module.replace(mlx_part, hf_part)
    gguf_module = _table(ARCHS[model_type].gguf, n_blocks).get_name(module)
    return None if gguf_module is None else f"{gguf_module}.{leaf}"


def gguf_names(hf_names: Iterable[str], model_type: str, n_blocks: int) -> dict[str, str]:
    """{GGUF name: HF name} of a model's parameters (those llama.cpp names)."""
    out = {}
    for hf in hf_names:
        name = to_gguf_name(hf, model_type, n_blocks)
        if name is not None:
            out[name] = hf
    return out


def reordered_heads(hf_name: str, config: dict) -> int | None:
    """The head count whose rows llama.cpp reorders in this tensor (None: not reordered)."""
    arch = ARCHS.get(config.get("model_type"))
    if arch is None or not arch.reorders_qk:
        return None
    if ".self_attn.q_proj." in hf_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def plus_one(hf_name: str, config: dict) -> bool:
    """Whether llama.cpp stores this tensor as 1 + the model's (Gemma's RMSNorm weights)."""
    arch = ARCHS.get(config.get("model_type"))
    return bool(arch and arch.norm_plus_one and hf_name.endswith("norm.weight"))


def stored_shape(hf_name: str, shape: tuple[int, ...], model_type: str) -> tuple[int, ...]:
    """The shape llama.cpp holds a tensor in (lfm2's convolution without its 1-sized axis)."""
    if hf_name.endswith(ARCHS[model_type].squeezed):
        return tuple(s for s in shape if s != 1)
    return tuple(shape)


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
