"""The Aligner in MLX (Zhou et al., arXiv 2312.05503): N prefix tokens shared by every adapted
layer, and zero-initialised gates, entering each layer's attention.

For an adapted attention layer l (a block index >= start_layer that has softmax attention) and
query head h::

    y_h += g_{l,h} * softmax(q_h k^T * scale) v          k = K(P), v = V(P)

where q_h are the layer's own queries exactly as it hands them to mlx-lm's attention kernel
(projected, q-normed, rotated or not: NoPE layers, partial rotary dimensions and ministral3's
position scale included), ``scale`` the scaling it passes there (gemma's query_pre_attn_scalar,
granite's attention multiplier), P [N, C] the shared prefix, and K, V the layer's frozen key/value
maps applied to P the way the layer applies them to a token, minus RoPE and the block's input norm:

- the key and value projections (biases included; phi3's fused ``qkv_proj`` split as the layer
  splits it);
- the key norm as the layer applies it: per head (qwen3, qwen3_5, gemma3/4 ``k_norm``, lfm2
  ``k_layernorm``) or over the whole projection (olmo2); gemma4's scale-less ``v_norm`` on values;
  gemma4's K = V layers read values off the key projection;
- gemma4's KV-shared layers (no projections of their own) use the maps of the layer whose keys
  they share.

The softmax over the N prefix keys is separate from the causal one and unmasked: a sliding window
does not hide the prefix (it is a global memory for every position), attention sinks do not enter
it. With grouped-query attention each query head reads the prefix keys of its KV group. The gate is
one value per query head (``head``, the paper) or one per layer (``layer``, PEFT adaption-prompt's
flavour). The term is added to the attention kernel's output, so whatever the layer does next
(qwen3_5's output gate, ``o_proj``) applies to it as to the rest of the attention. Hybrid models
(qwen3_5's gated-delta layers, lfm2's convolutions) adapt their attention layers only.

How it enters mlx-lm's attention without copying it (:func:`mlx_dft.patches.hook_attention`, where
every patch point of mlx_dft lives): the attention classes of the adapted layers get a ``__call__``
that marks which layer is running, and their modules' ``scaled_dot_product_attention`` a wrapper
that adds the prefix term to the output of the real one. Both are pass-throughs for layers without
an Aligner. No second projection of the queries, no second attention pass. Prefix keys and values
are computed in each forward pass (N tokens) and never enter the KV cache.

gemma2 computes its soft-capped scores itself, without the kernel: its queries are recomputed as
it computes them (:data:`OWN_SCORES`), the prefix scores are soft-capped as the layer's, and the
term reaches the output through ``o_proj`` (one more query projection a layer). Other attentions
that call no kernel, or are not a block's ``self_attn`` (gpt2's ``attn``...), are refused by name.
"""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlx_dft.errors import UserError
from mlx_dft.models import SHAPE_KEYS, model_type

GATES = ("head", "layer")
GATE_LEAF = "aligner_gate"
KEY_NORMS = ("k_norm", "k_layernorm")
OUTPUT_MAPS = ("o_proj", "out_proj", "dense")

_OFF: contextvars.ContextVar = contextvars.ContextVar("mlx_dft_aligner_off", default=False)


class AlignerPrefix(nn.Module):
    """The N shared prefix tokens, an ``nn.Embedding(N, C)`` in the official code: N(0, 1) init."""

    def __init__(self, tokens: int, hidden_size: int):
        super().__init__()
        self.prefix = mx.random.normal((tokens, hidden_size))


class _Ref:
    """A plain reference from an attention layer to a module it reads (the shared prefix, the
    layer whose key/value maps it uses). Not an nn.Module, so the prefix is one parameter of the
    model, not one per layer, and no layer's weights appear twice."""

    def __init__(self, module: nn.Module):
        self.module = module


# ------------------------------------------------------------------ reading a layer


def _count(attn: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(attn, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def heads(attn: nn.Module) -> int:
    """The layer's number of query heads."""
    return _count(attn, ("n_heads", "num_attention_heads", "num_heads")) or 0


def kv_heads(attn: nn.Module) -> int:
    """The layer's number of key/value heads."""
    return _count(attn, ("n_kv_heads", "num_key_value_heads", "num_kv_heads")) or 0


def head_dim(attn: nn.Module) -> int:
    d = _count(attn, ("head_dim",))
    if d:
        return d
    width = _out_features(attn["k_proj"]) if "k_proj" in attn else 0
    return width // max(kv_heads(attn), 1)


def _out_features(linear: nn.Module) -> int:
    """Output width of a (possibly quantized, possibly LoRA-wrapped) linear layer."""
    inner = linear["linear"] if "linear" in linear else linear
    return int(inner.weight.shape[0])


def attention_of(block: nn.Module) -> nn.Module | None:
    """The block's softmax attention (``self_attn``), None for a block without one (qwen3_5's
    gated-delta layers, lfm2's convolutions)."""
    attn = block.get("self_attn") if isinstance(block, dict) else None
    return attn if isinstance(attn, nn.Module) else None


def _kv_source(model: nn.Module, index: int, attn: nn.Module) -> nn.Module:
    """The attention whose key/value maps layer ``index`` uses: its own, or for a KV-shared layer
    (gemma4) the layer it shares keys and values with (the body's ``previous_kvs``)."""
    if _has_kv_maps(attn):
        return attn
    for _, m in model.named_modules():
        shared = getattr(m, "previous_kvs", None)
        if isinstance(shared, list) and "layers" in m and index < len(shared):
            source = attention_of(m.layers[shared[index]])
            if source is not None and _has_kv_maps(source):
                return source
    return attn


def _has_kv_maps(attn: nn.Module) -> bool:
    values = "v_proj" in attn or bool(getattr(attn, "use_k_eq_v", False))
    return "qkv_proj" in attn or ("k_proj" in attn and values)


# Attention classes that compute their scores themselves instead of calling mlx-lm's kernel, whose
# queries :func:`_own_queries` recomputes as they do (read from their source): q_proj, heads,
# RoPE at the cache's offset, then ``* scale``; scores soft-capped by ``attn_logit_softcapping``.
OWN_SCORES = {"mlx_lm.models.gemma2.Attention"}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_queries(attn: nn.Module, x: mx.array, cache) -> tuple[mx.array, float]:
    """The queries [B, H, L, d] and scale of an attention of :data:`OWN_SCORES`, before it runs."""
    b, length, _ = x.shape
    q = attn.q_proj(x).reshape(b, length, heads(attn), -1).transpose(0, 2, 1, 3)
    q = attn.rope(q, offset=cache.offset if cache is not None else 0)
    return q, attn.scale


def _refusal(model: nn.Module, index: int, attn: nn.Module) -> str:
    """'' when the Aligner can adapt attention layer ``index``, else why not."""
    cls = type(attn)
    kernel = getattr(sys.modules.get(cls.__module__), "scaled_dot_product_attention", None)
    if not callable(kernel) and _class_name(cls) not in OWN_SCORES:
        return f"its attention ({cls.__name__}) computes its scores itself instead of calling mlx-lm's kernel"
    if not any(k in attn for k in OUTPUT_MAPS):
        return f"its attention ({cls.__name__}) has no output projection named {' or '.join(OUTPUT_MAPS)}"
    if not heads(attn) or not kv_heads(attn):
        return f"its attention ({cls.__name__}) does not name its numbers of heads"
    if not _has_kv_maps(_kv_source(model, index, attn)):
        return f"its attention ({cls.__name__}) has no key/value projections the prefix can go through"
    return ""


def attention_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(block index, attention) of every block with softmax attention."""
    return [(i, a) for i, block in enumerate(model.layers) if (a := attention_of(block)) is not None]


def refusal(model: nn.Module) -> str:
    """'' when the Aligner supports ``model``, else why not (:mod:`mlx_dft.support`)."""
    layers = attention_layers(model)
    if not layers:
        others = sorted(
            {k for block in model.layers for k, m in block.items() if "Attention" in type(m).__name__}
        )
        if others:
            return f"its attention ({', '.join(others)}) is not a `self_attn` layer the Aligner reads"
        return "the model has no softmax attention layer for the prefix to enter"
    for i, attn in layers:
        why = _refusal(model, i, attn)
        if why:
            return why
    return ""


# ------------------------------------------------------------------ the maths


def prefix_keys_values(attn: nn.Module, prefix: mx.array) -> tuple[mx.array, mx.array]:
    """Prefix keys and values [n_kv_heads, N, head_dim] through the layer's own maps (or those of
    the layer it shares keys and values with): no RoPE, no input norm."""
    src = attn._aligner_kv.module if hasattr(attn, "_aligner_kv") else attn
    n, n_kv, d = prefix.shape[0], kv_heads(src), head_dim(src)
    if "qkv_proj" in src:  # phi3: [queries | keys | values]
        qkv = src.qkv_proj(prefix)
        start = heads(src) * d
        keys, values = qkv[:, start : start + n_kv * d], qkv[:, start + n_kv * d :]
    else:
        keys = src.k_proj(prefix)
        values = keys if getattr(src, "use_k_eq_v", False) else src.v_proj(prefix)
    norm = next((src[name] for name in KEY_NORMS if name in src), None)
    whole = norm is not None and "weight" in norm and norm.weight.shape[-1] != d
    if whole:  # olmo2: one norm over all key heads together
        keys = norm(keys)
    keys, values = keys.reshape(n, n_kv, d), values.reshape(n, n_kv, -1)
    if norm is not None and not whole:
        keys = norm(keys)
    if "v_norm" in src:  # gemma4
        values = src.v_norm(values)
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
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap:  # the layer soft-caps its scores (gemma2): the prefix's are capped alike
            scores = mx.tanh(scores / cap) * cap
        probs = mx.softmax(scores, axis=-1, precise=True)
        term = (probs @ values[None, :, None]).reshape(b, h, length, -1)
    return term * gate.reshape(1, -1, 1, 1)


# ------------------------------------------------------------------ hooking mlx-lm


def _term(attn: nn.Module, queries: mx.array, scale: float) -> mx.array | None:
    """The prefix term of an attention layer with an Aligner (None for the others, and while the
    adapter is switched off): what :func:`mlx_dft.patches.hook_attention` adds to its output."""
    if GATE_LEAF not in attn or _OFF.get():
        return None
    return prefix_term(attn, queries, scale)


def _install(attention_classes: set[type]) -> None:
    """Hook the attention classes of the adapted layers (idempotent; :mod:`mlx_dft.patches` owns
    the patch)."""
    from mlx_dft.patches import hook_attention

    for cls in sorted(attention_classes, key=_class_name):
        hook_attention(cls, "aligner", _term, _own_queries if _class_name(cls) in OWN_SCORES else None)


@contextmanager
def switched_off():
    """Inside: no layer adds its prefix term, so the model computes the base model exactly."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


# ------------------------------------------------------------------ applying it


def adapted_layers(model: nn.Module, start: int) -> list[int]:
    """The block indices from ``start`` on that have softmax attention (refused when none)."""
    layers = [i for i, _ in attention_layers(model) if i >= start]
    if not layers:
        every = [i for i, _ in attention_layers(model)]
        raise UserError(
            f"no attention layer at or after aligner start layer {start}: this {model_type(model)!r} "
            f"model's attention layers are {every}"
        )
    return layers


def shape_of(model: nn.Module) -> dict:
    attn = attention_layers(model)[0][1]
    return {
        "hidden_size": _out_features(next(attn[k] for k in OUTPUT_MAPS if k in attn)),
        "num_attention_heads": heads(attn),
        "num_key_value_heads": kv_heads(attn),
        "num_hidden_layers": len(model.layers),
    }


def parameter_count(tokens: int, hidden: int, adapted: int, heads_per_layer: int, gate: str) -> int:
    """N*C + A*H for head gates, N*C + A for layer gates, A the adapted attention layers (the
    paper's N*C + (L - S)*H when every block has attention)."""
    return tokens * hidden + adapted * (heads_per_layer if gate == "head" else 1)


def apply_aligner(model: nn.Module, s: dict) -> None:
    """Give ``model`` the Aligner ``s`` describes (a model :func:`refusal` accepts: the adapter's
    :meth:`~mlx_dft.adapters.aligner.Aligner.apply` checks it first)."""
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
    if a.get("model_type") not in (None, model_type(model)):
        raise UserError(
            f"this Aligner was made for a {a['model_type']!r} model; this model is {model_type(model)!r}"
        )
    if not 0 <= start < len(model.layers):
        raise UserError(f"aligner start layer {start} must be below the model's {len(model.layers)} layers")
    if tokens < 1:
        raise UserError(f"aligner tokens must be at least 1, got {tokens}")
    layers = adapted_layers(model, start)
    if "layers" in a and [int(i) for i in a["layers"]] != layers:
        raise UserError(
            f"this Aligner adapts layers {list(a['layers'])}; this model's attention layers from "
            f"{start} on are {layers}"
        )
    attentions = {i: attention_of(model.layers[i]) for i in layers}
    _install({type(attn) for attn in attentions.values()})
    model.freeze()
    model.aligner = AlignerPrefix(tokens, have["hidden_size"])
    ref = _Ref(model.aligner)
    for i, attn in attentions.items():
        attn[GATE_LEAF] = mx.zeros((heads(attn) if gate == "head" else 1,))
        attn._aligner_prefix = ref
        source = _kv_source(model, i, attn)
        if source is not attn:
            attn._aligner_kv = _Ref(source)
        attn.unfreeze(keys=[GATE_LEAF], recurse=False)
    model.aligner.unfreeze()


def constant_shift(model: nn.Module, layer: int) -> mx.array:
    """With one prefix token, the vector layer ``layer`` adds at every position:
    o_proj(g * v) without o_proj's bias (the N = 1 property)."""
    attn = attention_of(model.layers[layer])
    _, values = prefix_keys_values(attn, model.aligner.prefix)  # [n_kv, 1, d]
    h = heads(attn)
    v = mx.repeat(values, h // values.shape[0], axis=0)[:, 0, :]  # [H, d]
    y = (v * attn[GATE_LEAF].reshape(-1, 1)).reshape(1, -1)
    out = attn.o_proj(y)
    if "bias" in attn.o_proj:
        out = out - attn.o_proj.bias
    return out[0]
