"""Qwen3.5 (mlx-lm ``qwen3_5``) as llama.cpp's ``qwen35`` architecture.

What llama.cpp's ``src/models/qwen35.cpp`` (and its converter's ``Qwen3_5TextModel``, through
``_LinearAttentionVReorderBase`` and ``Qwen3NextModel``) expect, against mlx-lm's ``qwen3_5``, read
with mlx-lm's own ``TextModelArgs`` (its defaults included):

- **names**: mlx-lm keeps the text model under ``language_model.`` (the file's names leave it
  out); config.json nests its settings under ``text_config``; ``linear_attn.dt_bias`` is
  ``ssm_dt.bias``, ``linear_attn.A_log`` is ``ssm_a`` (no ``.weight``), stored as ``-exp(A_log)``;
  the convolution drops its 1-sized axis ([channels, kernel]) and stays F32 (ggml's CPU
  ``ssm_conv`` reads float32). The RMSNorm weights are stored as they are: mlx-lm holds Qwen3.5's
  ``1 + w`` norms already added up (its ``sanitize`` adds the 1 to a Hub checkpoint), which is
  what llama.cpp's converter writes; the gated norm of the gated-delta output is a plain ``w``
  in all three.
- **value heads**: with fewer key heads than value heads, mlx-lm gives value head ``j`` key head
  ``j // (values / keys)`` (heads grouped by key head); llama.cpp's ``ggml_repeat`` and its fused
  gated-delta kernel give it ``j % keys`` (tiled). So the file holds the value heads in tiled
  order: the value rows of ``in_proj_qkv`` and of the convolution, the rows of ``in_proj_z``,
  ``in_proj_a``, ``in_proj_b``, ``A_log`` and ``dt_bias``, and the columns of ``out_proj``
  (:func:`order`; a LoRA's B rows and A columns alike).
- **metadata**: ``ssm.conv_kernel``, ``ssm.state_size`` (the key head size), ``ssm.group_count``
  (key heads), ``ssm.time_step_rank`` (value heads), ``ssm.inner_size``,
  ``full_attention_interval``; and ``rope.dimension_sections``: llama.cpp runs Qwen3.5's
  interleaved M-RoPE, which for text (the same position in its first three sections) is
  mlx-lm's plain partial RoPE when every rotary dimension falls in those sections; written from
  ``mrope_section``, else the interleaved split of the rotary dimensions (Qwen3.5's [11, 11, 10]).
- **refused** (llama.cpp would compute another model): experts (llama.cpp's ``qwen35moe``),
  attention biases, key and value heads of different sizes, an ``rms_norm_eps`` other than 1e-6
  (llama.cpp l2-normalises the gated-delta q/k with it, mlx-lm with 1e-6), RoPE scaling, and
  M-RoPE sections that leave a rotary dimension to the fourth (position 0) section.
- **read**: llama.cpp's multi-token-prediction block (``nextn_predict_layers``, written by its
  converter by default) is left out, with a note: mlx-lm's ``qwen3_5`` has none.
"""

from __future__ import annotations

import copy

import numpy as np
from gguf import Keys

from mlx_dft.architectures import text_config
from mlx_dft.errors import UserError

QWEN35_L2_EPS = 1e-6  # mlx-lm's l2 norm of the gated-delta q/k; llama.cpp takes the RMSNorm epsilon
QWEN35_RECURRENT = "{arch}.attention.recurrent_layers"  # (not among gguf-py 0.19's Keys)


def _qwen3_5_args(config: dict):
    """mlx-lm's own reading of a qwen3_5 config (its defaults where config.json says nothing)."""
    from mlx_lm.models.qwen3_5 import TextModelArgs

    return TextModelArgs.from_dict(copy.deepcopy(text_config(config)))  # (it edits rope_parameters)


def _imrope_plain(sections: list[int], rotary: int, head_dim: int) -> bool:
    """Whether llama.cpp's interleaved M-RoPE with these sections rotates every one of the
    ``rotary`` dimensions of a text token by its position, as mlx-lm's plain RoPE does (llama.cpp
    gives text the same position in the first three sections, 0 in the fourth)."""
    s = [int(v) for v in sections] + [0] * (4 - len(sections))
    total = sum(s)
    if len(s) != 4 or min(s) < 0 or not 0 < total <= head_dim:  # (ggml asserts the total fits)
        return False
    for pair in range(rotary // 2):
        sector = pair % total
        if not any(sector % 3 == i and sector < 3 * s[i] for i in range(3)):
            return False  # (rotated by the fourth section's position, 0)
    return True


def write(config: dict) -> dict:
    """``qwen35.*`` metadata of a qwen3_5 config.json (mlx-lm's values, its defaults included);
    refuses in one line what llama.cpp would compute otherwise."""
    a = _qwen3_5_args(config)
    if a.num_experts:
        raise UserError("a qwen3_5 model with experts is llama.cpp's qwen35moe, which is not written yet")
    if a.attention_bias:
        raise UserError("llama.cpp's qwen35 has no attention biases; this model has attention_bias")
    if a.rms_norm_eps != QWEN35_L2_EPS:
        raise UserError(
            f"llama.cpp's qwen35 l2-normalises the gated-delta q/k with the RMSNorm epsilon; mlx-lm with "
            f"{QWEN35_L2_EPS}, and this model's rms_norm_eps is {a.rms_norm_eps}"
        )
    if a.linear_key_head_dim != a.linear_value_head_dim:
        raise UserError(
            f"llama.cpp's qwen35 has one gated-delta head size; this model's keys have "
            f"{a.linear_key_head_dim}, its values {a.linear_value_head_dim}"
        )
    rope = a.rope_parameters or {}
    if rope.get("type", "default") != "default":
        raise UserError(f"a qwen3_5 model with RoPE scaling {rope.get('type')!r} is not written to GGUF")
    rotary = int(a.head_dim * a.partial_rotary_factor)
    sections = list(rope.get("mrope_section") or [len(range(i, rotary // 2, 3)) for i in range(3)])
    if not _imrope_plain(sections, rotary, a.head_dim):
        raise UserError(
            f"llama.cpp's interleaved M-RoPE with mrope_section {sections} would not rotate all "
            f"{rotary} rotary dimensions of a text token by its position, as mlx-lm does"
        )
    return {
        Keys.LLM.EMBEDDING_LENGTH: a.hidden_size,
        Keys.LLM.FEED_FORWARD_LENGTH: a.intermediate_size,
        Keys.LLM.BLOCK_COUNT: a.num_hidden_layers,
        Keys.LLM.CONTEXT_LENGTH: a.max_position_embeddings,
        Keys.Attention.HEAD_COUNT: a.num_attention_heads,
        Keys.Attention.HEAD_COUNT_KV: a.num_key_value_heads,
        Keys.Attention.KEY_LENGTH: a.head_dim,
        Keys.Attention.VALUE_LENGTH: a.head_dim,
        Keys.Attention.LAYERNORM_RMS_EPS: float(a.rms_norm_eps),
        Keys.Rope.FREQ_BASE: float(a.rope_theta),
        Keys.Rope.DIMENSION_COUNT: rotary,
        Keys.Rope.DIMENSION_SECTIONS: [*sections, 0][:4],
        Keys.SSM.CONV_KERNEL: a.linear_conv_kernel_dim,
        Keys.SSM.STATE_SIZE: a.linear_key_head_dim,
        Keys.SSM.GROUP_COUNT: a.linear_num_key_heads,
        Keys.SSM.TIME_STEP_RANK: a.linear_num_value_heads,
        Keys.SSM.INNER_SIZE: a.linear_value_head_dim * a.linear_num_value_heads,
        Keys.LLM.FULL_ATTENTION_INTERVAL: a.full_attention_interval,
    }


def read(get, cfg: dict, tensors: dict) -> dict:
    """mlx-lm's qwen3_5 settings from a ``qwen35`` file's metadata (``get``, checked numbers) and
    the settings read so far; refuses in one line what mlx-lm would compute otherwise."""
    if cfg["rms_norm_eps"] != QWEN35_L2_EPS:
        raise UserError(
            f"the GGUF qwen35 file's RMSNorm epsilon {cfg['rms_norm_eps']} is llama.cpp's l2-norm epsilon "
            f"too, mlx-lm's is {QWEN35_L2_EPS}"
        )
    heads_k, heads_v = get(Keys.SSM.GROUP_COUNT, int), get(Keys.SSM.TIME_STEP_RANK, int)
    size = get(Keys.SSM.STATE_SIZE, int)
    inner = get(Keys.SSM.INNER_SIZE, int)
    if inner != size * heads_v or heads_v % heads_k:
        raise UserError(
            f"the GGUF qwen35 file's gated-delta sizes do not fit (inner size {inner}, "
            f"{heads_v} value heads of {size}, {heads_k} key heads)"
        )
    interval = get(Keys.LLM.FULL_ATTENTION_INTERVAL, int, 4)  # (llama.cpp's default)
    n = cfg["num_hidden_layers"]
    recurrent = [bool((i + 1) % interval) for i in range(n)]
    given = get(QWEN35_RECURRENT, list, [])
    if given and [bool(v) for v in given[:n]] != recurrent:
        raise UserError(
            f"the GGUF qwen35 file's gated-delta layers {[i for i, v in enumerate(given) if v][:12]} are not "
            f"every layer but each {interval}th, the only pattern mlx-lm's qwen3_5 builds"
        )
    rotary = round(cfg["head_dim"] * cfg.get("partial_rotary_factor", 1.0))
    sections = get(Keys.Rope.DIMENSION_SECTIONS, list)
    if not _imrope_plain(sections, rotary, cfg["head_dim"]):
        raise UserError(
            f"the GGUF qwen35 file's M-RoPE sections {sections} rotate some of its {rotary} rotary "
            "dimensions of a text token by another position than the token's, which mlx-lm's qwen3_5 does not"
        )
    if "rope_scaling" in cfg:
        raise UserError("a GGUF qwen35 file with RoPE scaling is not supported")
    return {
        "linear_num_key_heads": heads_k, "linear_num_value_heads": heads_v, "linear_key_head_dim": size,
        "linear_value_head_dim": size, "linear_conv_kernel_dim": get(Keys.SSM.CONV_KERNEL, int),
        "full_attention_interval": interval,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"],
                            "partial_rotary_factor": rotary / cfg["head_dim"],
                            "mrope_section": sections[:3], "mrope_interleaved": True},
    }  # fmt: skip


def _tiled(groups: int, per_group: int, size: int) -> np.ndarray:
    """llama.cpp's order of value heads, grouped by key head in mlx-lm ([G0 v0, G0 v1, G1 v0...]),
    taken in turn ([G0 v0, G1 v0, G0 v1...]): the indices of ``size``-long heads."""
    return np.arange(groups * per_group * size).reshape(groups, per_group, size).swapaxes(0, 1).reshape(-1)


def order(name: str, config: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """llama.cpp's (row order, column order) of a parameter (file = model[rows], model[:, cols]):
    the value heads tiled where mlx-lm groups them; None where the order is the model's."""
    if ".linear_attn." not in name:
        return None, None
    a = _qwen3_5_args(config)
    nk, nv = a.linear_num_key_heads, a.linear_num_value_heads
    if nk == nv:
        return None, None
    per, dk, dv = nv // nk, a.linear_key_head_dim, a.linear_value_head_dim
    if name.endswith((".in_proj_qkv.weight", ".conv1d.weight")):  # q, k as they are, then v
        return np.concatenate([np.arange(2 * nk * dk), 2 * nk * dk + _tiled(nk, per, dv)]), None
    if name.endswith(".in_proj_z.weight"):
        return _tiled(nk, per, dv), None
    if name.endswith((".in_proj_a.weight", ".in_proj_b.weight", ".A_log", ".dt_bias")):
        return _tiled(nk, per, 1), None
    if name.endswith(".out_proj.weight"):
        return None, _tiled(nk, per, dv)
    return None, None


def _neg_exp(a: np.ndarray) -> np.ndarray:
    return -np.exp(a)


def _log_neg(a: np.ndarray) -> np.ndarray:
    if (a > 0).any():
        raise UserError("the GGUF qwen35 file has a positive ssm_a (a growing state), which mlx-lm's "
                        "A_log cannot hold")  # fmt: skip
    with np.errstate(divide="ignore"):
        return np.log(-a)


NAMING = {
    "prefix": "language_model.",
    "nested": True,
    "aliases": {".linear_attn.dt_bias": ".linear_attn.dt_proj.bias"},
    "bare": (".linear_attn.A_log",),
    "values": {".linear_attn.A_log": (_neg_exp, _log_neg)},
    "order": order,
    "order_keys": ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                   "linear_value_head_dim"),
}
