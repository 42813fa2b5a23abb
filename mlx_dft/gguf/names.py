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


def unprefixed(name: str, model_type: str) -> str:
    """``name`` without mlx-lm's prefix of the text model (qwen3_5's ``language_model.``)."""
    prefix = ARCHS[model_type].prefix
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def to_gguf_name(name: str, model_type: str = "llama", n_blocks: int = 1024) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` in ``model_type``'s
    GGUF architecture; None if llama.cpp has no such tensor there."""
    arch = ARCHS[model_type]
    own = arch.name(name)
    if own is not None:
        return own
    name = unprefixed(name, model_type)
    for part, stand_in in arch.aliases.items():
        name = name.replace(part, stand_in)
    module, _, leaf = name.rpartition(".")
    if leaf not in LEAVES:  # a parameter of its own: llama.cpp's .weight (gpt-oss's attention
        module, leaf = name, "" if name.endswith(arch.bare) else "weight"  # sinks), or bare (ssm_a)
    for mlx_part, hf_part in MLX_ALIASES.items():
        module = module.replace(mlx_part, hf_part)
    gguf_module = _table(arch.gguf, n_blocks).get_name(module)
    if gguf_module is None:
        return None
    return f"{gguf_module}.{leaf}" if leaf else gguf_module


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


def stored_value(hf_name: str, config: dict):
    """(model to file, file to model) of a tensor llama.cpp stores as another value (qwen3_5's
    ``A_log`` as ``-exp(A_log)``), else None."""
    arch = ARCHS.get(config.get("model_type"))
    if arch is None:
        return None
    return next((fns for end, fns in arch.values.items() if hf_name.endswith(end)), None)


def gguf_order(hf_name: str, config: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """llama.cpp's (row order, column order) of a tensor (file = model[rows], model[:, cols]),
    each None where it keeps the model's (:data:`mlx_dft.gguf.archs.GGUFArch.order`)."""
    arch = ARCHS.get(config.get("model_type"))
    return (None, None) if arch is None else arch.order(hf_name, config)


def to_gguf_array(hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """A float tensor of the model as llama.cpp stores it: its value (Gemma's 1 + w, qwen3_5's
    -exp(A_log)), its shape (a convolution's 1-sized axis dropped), the q/k row order of "normal"
    RoPE, and the order of qwen3_5's value heads."""
    model_type = config["model_type"]
    if plus_one(hf_name, config):
        w = w + np.float32(1)
    if (fns := stored_value(hf_name, config)) is not None:
        w = fns[0](w).astype(np.float32)
    w = w.reshape(stored_shape(hf_name, w.shape, model_type))
    heads = reordered_heads(hf_name, config)
    if heads is not None:
        w = to_gguf_rows(w, heads)
    rows, cols = gguf_order(hf_name, config)
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    return w


def model_order(hf_name: str, config: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The inverse of :func:`gguf_order`: model = file[rows] (file[:, cols])."""
    return tuple(None if p is None else np.argsort(p) for p in gguf_order(hf_name, config))


def from_gguf_array(hf_name: str, w: mx.array, config: dict, shape: tuple[int, ...]) -> mx.array:
    """The inverse of :func:`to_gguf_array` for a float tensor read from a file: the model's order,
    ``shape`` and values (its dtype kept, but a value stored otherwise comes back float32)."""
    rows, cols = model_order(hf_name, config)
    if rows is not None:
        w = mx.take(w, mx.array(rows), axis=0)
    if cols is not None:
        w = mx.take(w, mx.array(cols), axis=1)
    heads = reordered_heads(hf_name, config)
    if heads is not None:
        w = to_hf_rows(w, heads)
    w = w.reshape(shape)
    if plus_one(hf_name, config):
        w = (w.astype(mx.float32) - 1).astype(w.dtype)
    if (fns := stored_value(hf_name, config)) is not None:
        w = mx.array(fns[1](np.array(w.astype(mx.float32))))
    return w


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
