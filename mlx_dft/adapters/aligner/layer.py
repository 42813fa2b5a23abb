"""The Aligner in MLX (Zhou et al., arXiv 2312.05503): N prefix tokens shared by every adapted
layer, and zero-initialised gates, entering each layer's attention.

For an adapted layer l (index >= start_layer) and query head h with head size d::

    y_h += g_{l,h} * softmax(q_h k^T / sqrt(d)) v          k = K(P), v = V(P)

where q_h are the layer's own rotated queries, P [N, C] the shared prefix, and K, V the layer's
frozen key/value maps applied to P the way the layer applies them to a token, minus RoPE and the
input norm: the k/v projections (with Qwen2's biases), then Qwen3's per-head ``k_norm`` on keys.
The softmax over the N prefix keys is separate from the causal attention and unmasked; with
grouped-query attention each query head reads the prefix keys of its KV group. The gate is one
value per query head (``head``, the paper) or one per layer (``layer``, PEFT adaption-prompt's
flavour). The result is added to the attention output before ``o_proj``.

How it enters mlx-lm's attention without copying it (:func:`mlx_dft.patches.hook_attention`, where
every patch point of mlx_dft lives): the attention classes of the supported architectures get a
``__call__`` that marks which layer is running, and their modules' ``scaled_dot_product_attention``
a wrapper that adds the prefix term to the output of the real one. Both are pass-throughs for
layers without an Aligner. The queries are the ones the layer
already rotated: no second projection, no second attention pass. Prefix keys and values are
computed in each forward pass (N tokens) and never enter the KV cache.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlx_dft.errors import UserError
from mlx_dft.models import SHAPE_KEYS, architecture, model_type

GATES = ("head", "layer")
GATE_LEAF = "aligner_gate"

_OFF: contextvars.ContextVar = contextvars.ContextVar("mlx_dft_aligner_off", default=False)


class AlignerPrefix(nn.Module):
    """The N shared prefix tokens, an ``nn.Embedding(N, C)`` in the official code: N(0, 1) init."""

    def __init__(self, tokens: int, hidden_size: int):
        super().__init__()
        self.prefix = mx.random.normal((tokens, hidden_size))


class _Ref:
    """A plain reference from each attention layer to the shared prefix module. Not an
    nn.Module, so the prefix is one parameter of the model, not one per layer."""

    def __init__(self, module: nn.Module):
        self.module = module


# ------------------------------------------------------------------ the maths


def prefix_keys_values(attn: nn.Module, prefix: mx.array) -> tuple[mx.array, mx.array]:
    """Prefix keys and values [n_kv_heads, N, head_dim] through the layer's own maps.

    The one place that knows the architectures: k/v projections (biases included when the
    layer has them), and Qwen3's ``k_norm``; no RoPE, no input norm.
    """
    n = prefix.shape[0]
    keys = attn.k_proj(prefix).reshape(n, attn.n_kv_heads, -1)
    values = attn.v_proj(prefix).reshape(n, attn.n_kv_heads, -1)
    if "k_norm" in attn:  # qwen3
        keys = attn.k_norm(keys)
    return keys.transpose(1, 0, 2), values.transpose(1, 0, 2)


def prefix_term(attn: nn.Module, queries: mx.array, scale: float) -> mx.array:
    """g * softmax(q k^T * scale) v for queries [B, H, L, d]; same layout as the attention output."""
    prefix = attn._aligner_prefix.module.prefix.astype(queries.dtype)
    keys, values = prefix_keys_values(attn, prefix)
    b, h, length, d = queries.shape
    n_kv = keys.shape[0]
    gate = attn[GATE_LEAF].astype(queries.dtype)
    if keys.shape[1] == 1:
        # One prefix token: the softmax is 1, so every position receives g * v (broadcast).
        term = mx.repeat(values, h // n_kv, axis=0)[None]  # [1, H, 1, d]
    else:
        q = queries.reshape(b, n_kv, h // n_kv, length, d)
        scores = (q * scale) @ keys[None, :, None].swapaxes(-1, -2)  # [B, n_kv, rep, L, N]
        probs = mx.softmax(scores, axis=-1, precise=True)
        term = (probs @ values[None, :, None]).reshape(b, h, length, d)
    return term * gate.reshape(1, -1, 1, 1)


# ------------------------------------------------------------------ hooking mlx-lm


def _term(attn: nn.Module, queries: mx.array, scale: float) -> mx.array | None:
    """The prefix term of an attention layer with an Aligner (None for the others, and while the
    adapter is switched off): what :func:`mlx_dft.patches.hook_attention` adds to its output."""
    if GATE_LEAF not in attn or _OFF.get():
        return None
    return prefix_term(attn, queries, scale)


def _install(arch_module_name: str) -> None:
    """Hook one mlx-lm model module's attention (idempotent; :mod:`mlx_dft.patches` owns the patch)."""
    from mlx_dft.patches import hook_attention

    hook_attention(arch_module_name, "aligner", _term)


@contextmanager
def switched_off():
    """Inside: no layer adds its prefix term, so the model computes the base model exactly."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


# ------------------------------------------------------------------ applying it


def check_supported(model: nn.Module) -> str:
    """The mlx-lm module whose attention this model uses; refuses other architectures in one line
    naming the feature, the model type and why (:mod:`mlx_dft.support`)."""
    from mlx_dft import support

    support.require("aligner", model)
    return architecture(model_type(model), "--fine-tune-type aligner").mlx_module


def shape_of(model: nn.Module) -> dict:
    attn = model.layers[0].self_attn
    return {
        "hidden_size": int(model.args.hidden_size),
        "num_attention_heads": int(attn.n_heads),
        "num_key_value_heads": int(attn.n_kv_heads),
        "num_hidden_layers": len(model.layers),
    }


def parameter_count(tokens: int, hidden: int, layers: int, start: int, heads: int, gate: str) -> int:
    """N*C + (L - S)*H for head gates, N*C + (L - S) for layer gates (the paper's count)."""
    return tokens * hidden + (layers - start) * (heads if gate == "head" else 1)


def apply_aligner(model: nn.Module, s: dict) -> None:
    arch = check_supported(model)
    a = s["aligner"]
    tokens, start, gate = int(a["tokens"]), int(a["start_layer"]), a.get("gate", "head")
    if gate not in GATES:
        raise UserError(f"unknown aligner gate {gate!r}; choose head or layer")
    have = shape_of(model)
    for key in SHAPE_KEYS[:3]:
        if key in a and int(a[key]) != have[key]:
            raise UserError(
                f"this Aligner was made for a model with {key}={a[key]}; this model has {have[key]}"
            )
    if not 0 <= start < len(model.layers):
        raise UserError(f"aligner start layer {start} must be below the model's {len(model.layers)} layers")
    if tokens < 1:
        raise UserError(f"aligner tokens must be at least 1, got {tokens}")
    _install(arch)
    model.freeze()
    model.aligner = AlignerPrefix(tokens, have["hidden_size"])
    ref = _Ref(model.aligner)
    for layer in model.layers[start:]:
        attn = layer.self_attn
        attn[GATE_LEAF] = mx.zeros((attn.n_heads if gate == "head" else 1,))
        attn._aligner_prefix = ref
        attn.unfreeze(keys=[GATE_LEAF], recurse=False)
    model.aligner.unfreeze()


def constant_shift(model: nn.Module, layer: int) -> mx.array:
    """With one prefix token, the vector layer ``layer`` adds at every position:
    o_proj(g * v) without o_proj's bias (the N = 1 property)."""
    attn = model.layers[layer].self_attn
    _, values = prefix_keys_values(attn, model.aligner.prefix)  # [n_kv, 1, d]
    h = attn.n_heads
    v = mx.repeat(values, h // values.shape[0], axis=0)[:, 0, :]  # [H, d]
    y = (v * attn[GATE_LEAF].reshape(-1, 1)).reshape(1, -1)
    out = attn.o_proj(y)
    if "bias" in attn.o_proj:
        out = out - attn.o_proj.bias
    return out[0]
