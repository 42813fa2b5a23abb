"""Gemma 4 (mlx-lm ``gemma4_text``) as llama.cpp's ``gemma4`` architecture.

What llama.cpp's ``src/models/gemma4.cpp`` (and its converter's ``Gemma4Model``) expect, against
mlx-lm's ``gemma4_text``, read with mlx-lm's own ``ModelArgs`` (its defaults included):

- **two head sizes**: full-attention layers use ``global_head_dim`` (``attention.key_length``,
  ``rope.dimension_count``), sliding ones ``head_dim`` (``attention.key_length_swa``,
  ``rope.dimension_count_swa``); ``attention.sliding_window_pattern`` is one bool per layer
  (true: sliding), so any ``layer_types`` is written as it is. Norms are stored as they are
  (Gemma 4's RMSNorm multiplies by w, not 1 + w); queries are not scaled (both scale by 1).
- **proportional RoPE** on full layers: mlx-lm rotates the first ``partial_rotary_factor`` of the
  frequencies of the whole head (exponents over the full head size) and leaves the rest; llama.cpp
  rotates the whole head with per-frequency factors ``rope_freqs`` (1, then 1e30 for the frequencies
  left unrotated), one tensor the full layers share. It is made from the config when written and
  read back into ``partial_rotary_factor``. Sliding layers: mlx-lm's default RoPE rotates the whole
  head (it ignores a sliding ``partial_rotary_factor``), so ``rope.dimension_count_swa`` is the head
  size; ``rope.freq_base`` / ``rope.freq_base_swa`` the two bases. Other RoPE types are refused.
- **shared KV** (``num_kv_shared_layers``, ``attention.shared_kv_layers``): llama.cpp's last
  ``n`` layers reuse the KV of the last layer that has one (full layers) or the one before it
  (sliding layers), a rule of its loader; mlx-lm's reuse the last earlier layer of their own type.
  A model where these differ is refused.
- **per-layer inputs** (``hidden_size_per_layer_input``, ``embedding_length_per_layer_input``: the
  per-layer embeddings, their model projection and norm, each block's gate, projection and norm),
  **K = V** full layers (``attention_k_eq_v``: no ``attn_v``, llama.cpp then takes V from K, and
  ``num_global_key_value_heads`` as per-layer key/value head counts), the double-wide MLP of the
  shared-KV layers (``use_double_wide_mlp``: per-layer ``feed_forward_length``), each block's
  ``layer_scalar`` (``layer_output_scale``) and final-logit soft-capping.
- **mixture of experts** (``enable_moe_block``, 26B-A4B): the router (``ffn_gate_inp`` with its
  ``.scale``), the per-expert scale (``ffn_down_exps.scale``), the experts' gate, up and down apart
  (``ffn_{gate,up,down}_exps``), ``pre_ffw_norm_2`` / ``post_ffw_norm_{1,2}``; ``expert_count``,
  ``expert_used_count``, ``expert_feed_forward_length``. A file with the experts' gate and up fused
  (``ffn_gate_up_exps``, as llama.cpp's converter writes them) is read too (:func:`unfused`).
- Refused by name: per-layer embeddings of another vocabulary size than the model's, and per-layer
  RoPE settings llama.cpp cannot hold.
"""

from __future__ import annotations

import re

import numpy as np
from gguf import Keys

from mlx_dft.errors import UserError

ROPE_FREQS = "rope_freqs.weight"
UNROTATED = 1e30  # llama.cpp's converter's factor for a frequency left out: the angle becomes ~0
FULL, SLIDING = "full_attention", "sliding_attention"


# mlx-lm's mixture-of-experts parameters that gguf-py's gemma4 table does not name, as llama.cpp's
# loader does (experts gate and up apart: its converter writes them fused, its loader reads both)
OWN_NAMES = [
    (re.compile(r"model\.layers\.(\d+)\.router\.scale"), "blk.{}.ffn_gate_inp.scale"),
    (re.compile(r"model\.layers\.(\d+)\.router\.per_expert_scale"), "blk.{}.ffn_down_exps.scale"),
    (re.compile(r"model\.layers\.(\d+)\.experts\.switch_glu\.(gate|up|down)_proj\.weight"),
     "blk.{}.ffn_{}_exps.weight"),
]


def gguf_name(name: str) -> str | None:
    """llama.cpp's name of an mlx-lm parameter gguf-py's table does not know (None: the table's)."""
    for pattern, template in OWN_NAMES:
        m = pattern.fullmatch(name)
        if m:
            return template.format(*m.groups())
    return None


FUSED_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_gate_up_exps\.weight")


def unfused(name: str) -> tuple[str, ...]:
    """llama.cpp's converter writes the experts' gate and up as one tensor, gate rows first
    (Hugging Face's ``gate_up_proj``, which mlx-lm splits so too): the tensors it holds."""
    m = FUSED_EXPERTS.fullmatch(name)
    return (f"blk.{m[1]}.ffn_gate_exps.weight", f"blk.{m[1]}.ffn_up_exps.weight") if m else ()


def _args(config: dict):
    """mlx-lm's own reading of the config (its defaults: layer_types, rope_parameters...)."""
    from mlx_lm.models.gemma4_text import ModelArgs

    return ModelArgs.from_dict(config)


def _kv_sources(layer_types: list[str], shared: int) -> tuple[dict[int, int], dict[int, int]]:
    """({shared layer: the layer whose KV mlx-lm reuses}, {...: the one llama.cpp reuses})."""
    n = len(layer_types)
    first = n - shared
    ours, theirs = {}, {}
    for j in range(first if shared else n, n):
        same = [i for i in range(first) if layer_types[i] == layer_types[j]]
        ours[j] = same[-1] if same else -1
        theirs[j] = first - (2 if layer_types[j] == SLIDING else 1)
    return ours, theirs


def _check_shared_kv(layer_types: list[str], shared: int, what: str) -> None:
    n = len(layer_types)
    if shared and n - shared < 2:
        raise UserError(f"llama.cpp's gemma4 needs 2 layers with a KV of their own; {what} has {n - shared}")
    ours, theirs = _kv_sources(layer_types, shared)
    if ours != theirs:
        raise UserError(
            f"llama.cpp's gemma4 shares the KV of layer {n - shared - 1} with full-attention and of layer "
            f"{n - shared - 2} with sliding layers; {what} shares {ours} (layer: source), llama.cpp would "
            "compute another model"
        )


def _rotated(head_dim: int, rope: dict, kind: str) -> int:
    """How many of a full layer's ``head_dim`` dimensions mlx-lm rotates (its RoPE checked)."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if float(rope.get("factor", 1.0)) != 1.0 or rope_type not in ("default", "proportional"):
        raise UserError(
            f"gemma4 {kind} RoPE {rope_type!r} with factor {rope.get('factor', 1.0)} is not written to GGUF "
            "(llama.cpp's gemma4 has default RoPE on sliding and proportional RoPE on full layers)"
        )
    if rope_type == "default":
        return head_dim
    rotated = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    if rotated % 2:
        raise UserError(f"gemma4 proportional RoPE rotates {rotated} dimensions of {head_dim} (not even)")
    return rotated


def write(config: dict) -> dict:
    """The ``gemma4.*`` metadata of a ``gemma4_text`` config.json (over the common keys)."""
    a = _args(config)
    n, types = a.num_hidden_layers, list(a.layer_types)
    if len(types) != n or set(types) - {FULL, SLIDING}:
        raise UserError(f"gemma4 layer_types {types} are not one of full/sliding attention per layer")
    _check_shared_kv(types, a.num_kv_shared_layers, "this model")
    per_layer = a.hidden_size_per_layer_input or 0
    if per_layer and a.vocab_size_per_layer_input != a.vocab_size:
        raise UserError(
            f"llama.cpp's gemma4 reads per-layer embeddings of the model's vocabulary ({a.vocab_size}); "
            f"this model's have {a.vocab_size_per_layer_input} rows"
        )
    rope = a.rope_parameters
    _rotated(a.head_dim, rope.get(SLIDING, {}), "sliding")  # (a sliding layer rotates its whole head)
    if FULL in types:
        _rotated(a.global_head_dim or a.head_dim, rope.get(FULL, {}), "full")
    full_dim = a.global_head_dim or a.head_dim
    first_shared = n - a.num_kv_shared_layers
    kv = [
        a.num_global_key_value_heads
        if t == FULL and a.attention_k_eq_v and a.num_global_key_value_heads is not None
        else a.num_key_value_heads
        for t in types
    ]
    out: dict[str, object] = {
        Keys.Attention.KEY_LENGTH: full_dim,
        Keys.Attention.VALUE_LENGTH: full_dim,
        Keys.Attention.KEY_LENGTH_SWA: a.head_dim,
        Keys.Attention.VALUE_LENGTH_SWA: a.head_dim,
        Keys.Rope.DIMENSION_COUNT: full_dim,
        Keys.Rope.DIMENSION_COUNT_SWA: a.head_dim,
        Keys.Rope.FREQ_BASE: float(rope.get(FULL, {}).get("rope_theta", 10000.0)),
        Keys.Rope.FREQ_BASE_SWA: float(rope.get(SLIDING, {}).get("rope_theta", 10000.0)),
        Keys.Attention.SLIDING_WINDOW: int(a.sliding_window),
        Keys.Attention.SLIDING_WINDOW_PATTERN: [t == SLIDING for t in types],
        Keys.Attention.SHARED_KV_LAYERS: int(a.num_kv_shared_layers),
        Keys.LLM.EMBD_LENGTH_PER_LAYER_INP: int(per_layer),
        Keys.Attention.HEAD_COUNT_KV: kv if len(set(kv)) > 1 else int(kv[0]),
    }
    if a.use_double_wide_mlp and a.num_kv_shared_layers:
        ff = a.intermediate_size
        out[Keys.LLM.FEED_FORWARD_LENGTH] = [ff if i < first_shared else 2 * ff for i in range(n)]
    if a.final_logit_softcapping:
        out[Keys.LLM.FINAL_LOGIT_SOFTCAPPING] = float(a.final_logit_softcapping)
    if a.enable_moe_block:  # (every block: the dense MLP beside the experts, as llama.cpp's)
        out[Keys.LLM.EXPERT_COUNT] = int(a.num_experts)
        out[Keys.LLM.EXPERT_USED_COUNT] = int(a.top_k_experts)
        out[Keys.LLM.EXPERT_FEED_FORWARD_LENGTH] = int(a.moe_intermediate_size)
    return out


def derived(config: dict) -> dict[str, np.ndarray]:
    """llama.cpp's ``rope_freqs`` for the full layers' proportional RoPE: a factor per frequency of
    the full head, 1 where mlx-lm rotates and 1e30 where it does not (none without full layers)."""
    a = _args(config)
    if FULL not in a.layer_types:
        return {}
    full_dim = a.global_head_dim or a.head_dim
    rotated = _rotated(full_dim, a.rope_parameters.get(FULL, {}), "full")
    values = [1.0] * (rotated // 2) + [UNROTATED] * ((full_dim - rotated) // 2)
    return {ROPE_FREQS: np.array(values, np.float32)}


def _count(get, key: str) -> int:
    """A count that may be 0 (``get``'s int refuses those: it reads sizes)."""
    value = get(key, float, 0.0)
    if value != int(value) or value < 0:
        raise UserError(f"GGUF metadata {key.format(arch='gemma4')} = {value} is not a count")
    return int(value)


def read(get, cfg: dict, tensors: dict) -> dict:
    """config.json values of a ``gemma4`` GGUF (after the common ones), refusing what mlx-lm's
    ``gemma4_text`` would compute differently."""
    moe = {}
    if "blk.0.ffn_gate_inp.weight" in tensors:
        moe = {"enable_moe_block": True, "num_experts": get(Keys.LLM.EXPERT_COUNT, int),
               "top_k_experts": get(Keys.LLM.EXPERT_USED_COUNT, int),
               "moe_intermediate_size": get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int)}  # fmt: skip
    if cfg.pop("rope_scaling", None) or cfg.pop("partial_rotary_factor", None):
        raise UserError("the GGUF gemma4 file scales or shortens its full layers' RoPE (mlx-lm does not)")
    n = cfg["num_hidden_layers"]
    pattern = get(Keys.Attention.SLIDING_WINDOW_PATTERN, list)
    if len(pattern) != n:
        raise UserError(f"GGUF gemma4 sliding_window_pattern has {len(pattern)} entries for {n} layers")
    types = [SLIDING if s else FULL for s in pattern]
    shared = _count(get, Keys.Attention.SHARED_KV_LAYERS)
    if shared >= n:
        raise UserError(f"GGUF gemma4 shares the KV of {shared} of its {n} layers")
    _check_shared_kv(types, shared, "the GGUF file")
    full_dim, head_dim = cfg["head_dim"], get(Keys.Attention.KEY_LENGTH_SWA, int)
    if get(Keys.Attention.VALUE_LENGTH_SWA, int, head_dim) != head_dim or head_dim % 2:
        raise UserError(f"GGUF gemma4 sliding layers' key and value sizes differ (or are odd: {head_dim})")
    if get(Keys.Rope.DIMENSION_COUNT_SWA, int, full_dim) != head_dim:
        raise UserError("the GGUF gemma4 file rotates part of its sliding layers' heads (mlx-lm does not)")
    rope = {"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": cfg["rope_theta"]}
    if FULL in types:
        if ROPE_FREQS not in tensors:
            raise UserError("the GGUF gemma4 file has no rope_freqs tensor, which its full layers need")
        freqs = get(ROPE_FREQS, np.ndarray)
        ones = int(np.argmin(freqs == 1.0)) if not np.all(freqs == 1.0) else freqs.size
        if freqs.shape != (full_dim // 2,) or not np.all(freqs[ones:] >= UNROTATED / 2):
            raise UserError(
                "the GGUF gemma4 rope_freqs are not 1 then 1e30 per frequency (proportional RoPE): "
                "other per-frequency factors are not supported"
            )
        rope["partial_rotary_factor"] = 2 * ones / full_dim
    sliding_rope = {"partial_rotary_factor": 1.0, "rope_theta": get(Keys.Rope.FREQ_BASE_SWA, float, 10000.0),
                    "rope_type": "default"}  # fmt: skip
    own = range(n - shared)  # (the layers with a KV of their own, so with k/v projections)
    no_v = [i for i in own if f"blk.{i}.attn_v.weight" not in tensors]
    full = [i for i in own if types[i] == FULL]
    if no_v and no_v != full:
        raise UserError(
            f"the GGUF gemma4 file takes V from K in layers {no_v}; mlx-lm's attention_k_eq_v does in "
            f"every full-attention layer alone ({full})"
        )
    kv = get(Keys.Attention.HEAD_COUNT_KV, object, cfg["num_key_value_heads"])
    kv = kv if isinstance(kv, list) else [kv] * n
    swa_kv = {kv[i] for i in range(n) if types[i] == SLIDING} or {cfg["num_key_value_heads"]}
    full_kv = {kv[i] for i in range(n) if types[i] == FULL} or swa_kv
    if len(swa_kv) != 1 or len(full_kv) != 1 or (full_kv != swa_kv and not no_v):
        raise UserError(
            f"GGUF gemma4 key/value head counts {kv} are not one for sliding layers and one for K=V layers"
        )
    ff = get(Keys.LLM.FEED_FORWARD_LENGTH, object, cfg["intermediate_size"])
    base = cfg["intermediate_size"]
    double = isinstance(ff, list)
    if double and (not shared or ff != [base if i < n - shared else 2 * base for i in range(n)]):
        raise UserError(
            f"GGUF gemma4 feed_forward_length {ff} is not mlx-lm's double-wide MLP (twice as wide in the "
            "shared-KV layers alone)"
        )
    per_layer = _count(get, Keys.LLM.EMBD_LENGTH_PER_LAYER_INP)
    softcap = get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float, 0.0)
    return {
        "head_dim": head_dim, "global_head_dim": full_dim, "layer_types": types,
        "sliding_window": get(Keys.Attention.SLIDING_WINDOW, int),
        "num_kv_shared_layers": shared, "num_key_value_heads": swa_kv.pop(),
        "num_global_key_value_heads": full_kv.pop(), "attention_k_eq_v": bool(no_v),
        "rope_parameters": {FULL: rope, SLIDING: sliding_rope},
        "hidden_size_per_layer_input": per_layer, "vocab_size_per_layer_input": cfg["vocab_size"],
        "final_logit_softcapping": softcap or None, "use_double_wide_mlp": double, **moe,
    }  # fmt: skip
