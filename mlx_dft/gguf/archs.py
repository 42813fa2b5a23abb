"""Which mlx-lm model types GGUF covers, and what each needs beyond the llama family's layout.

One entry per model type (:data:`ARCHS`): its GGUF ``general.architecture`` (a name of gguf-py's
``MODEL_ARCH``, whose ``TensorNameMap`` names its tensors, :mod:`.names`), and the differences
llama.cpp's loader for that architecture expects (read in llama.cpp's ``src/models/<arch>.cpp``):

- ``reorders_qk``: llama.cpp's "normal" RoPE rotates adjacent pairs, so its converter reorders the
  q/k rows of these architectures (llama, mistral, smollm3, granite); the others use NEOX RoPE,
  which is Hugging Face's rotate-half, rows as they are.
- ``norm_plus_one``: the model's RMSNorm multiplies by ``1 + w`` (Gemma); llama.cpp multiplies by
  the stored weight, so the file holds ``1 + w``.
- ``write`` / ``read``: the architecture's own metadata (gguf-py's ``Keys``), from config.json and
  back, refusing in one line what llama.cpp would compute differently from mlx-lm (smollm3's
  RoPE-less layers are every 4th there, fixed; Gemma 3 scales queries by the head size; Qwen3-MoE
  always renormalises the top-k expert weights).
- ``prefix``, ``nested``, ``aliases``, ``bare``, ``values``, ``order``: what Qwen3.5 adds
  (:mod:`.arch_qwen35`): mlx-lm's ``language_model.`` prefix, a nested ``text_config``, tensors
  named or valued otherwise, and llama.cpp's order of its value heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import Keys

from mlx_dft.errors import UserError
from mlx_dft.gguf import arch_gemma4, arch_qwen35

# (key template, value) pairs: {arch} in the template is the GGUF architecture.
Metadata = dict[str, object]
# get(key template, type, default): one checked number from the file's metadata.
Getter = Callable[..., object]
# (a parameter's name, the model's flat config) -> llama.cpp's (row order, column order) of it:
# file = model[rows] (model[:, cols]); None where llama.cpp keeps the model's order.
Order = Callable[[str, dict], tuple["np.ndarray | None", "np.ndarray | None"]]


def _nothing(*_) -> dict:
    return {}


def _as_is(name: str, config: dict) -> tuple[None, None]:
    return None, None


@dataclass(frozen=True)
class GGUFArch:
    gguf: str
    hf_class: str
    reorders_qk: bool = False
    norm_plus_one: bool = False
    # convolutions: llama.cpp drops their 1-sized axis and reads them as F32 only (lfm2)
    squeezed: tuple[str, ...] = ()
    write: Callable[[dict], Metadata] = field(default=_nothing)
    read: Callable[[Getter, dict, dict], dict] = field(default=_nothing)  # (get, config so far, tensors)
    # mlx-lm's prefix of the text model's parameters, which llama.cpp's names leave out (qwen3_5)
    prefix: str = ""
    # config.json holds the text model's settings under ``text_config`` (the Hub's layout)
    nested: bool = False
    # parameter names llama.cpp knows under another (part of a name -> its stand-in)
    aliases: dict[str, str] = field(default_factory=dict)
    # parameters of their own that llama.cpp names without ``.weight`` (the end of their name)
    bare: tuple[str, ...] = ()
    # values llama.cpp stores otherwise: end of the name -> (model to file, file to model)
    values: dict[str, tuple[Callable, Callable]] = field(default_factory=dict)
    order: Order = field(default=_as_is)
    # config.json keys ``order`` reads (beyond the head counts every model records)
    order_keys: tuple[str, ...] = ()
    # tensors llama.cpp reads that mlx-lm computes from the config (gemma4's rope_freqs): written
    # from config.json; read back, the file's must equal those of the config read
    derived: Callable[[dict], dict] = field(default=_nothing)
    # llama.cpp's names of parameters gguf-py's table does not name (gemma4's experts); None: the table's
    name: Callable[[str], str | None] = field(default=lambda name: None)
    # the names a fused tensor of llama.cpp's holds, split evenly along its rows (gemma4's experts'
    # gate_up); () for the others
    unfused: Callable[[str], tuple[str, ...]] = field(default=lambda name: ())


def _biases(get: Getter, cfg: dict, tensors: dict) -> dict:
    return {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}


# smollm3: llama.cpp leaves RoPE out of every 4th layer (n_no_rope_layer_step = 4, not in the file).
SMOLLM3_NO_ROPE_STEP = 4


def _smollm3_write(config: dict) -> Metadata:
    n = int(config["num_hidden_layers"])
    interval = int(config.get("no_rope_layer_interval") or SMOLLM3_NO_ROPE_STEP)
    ours = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    theirs = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in range(n)]
    if [int(x) for x in ours] != theirs:
        raise UserError(
            "llama.cpp's smollm3 leaves RoPE out of every 4th layer; this model's no_rope_layers "
            f"{list(ours)} differ, so llama.cpp would compute another model"
        )
    return {}


def _smollm3_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    return {"no_rope_layer_interval": SMOLLM3_NO_ROPE_STEP}


def _gemma3_write(config: dict) -> Metadata:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if float(config.get("query_pre_attn_scalar", head_dim)) != float(head_dim):
        raise UserError(
            f"llama.cpp's gemma3 scales queries by the head size ({head_dim}); this model's "
            f"query_pre_attn_scalar is {config['query_pre_attn_scalar']}"
        )
    if config.get("final_logit_softcapping"):
        raise UserError("mlx-lm's gemma3_text computes no final logit soft-capping; llama.cpp would")
    if int(config.get("sliding_window_pattern", 6)) <= 1:
        return {}  # every layer global: llama.cpp then wants no window at all
    return {
        Keys.Attention.SLIDING_WINDOW: int(config.get("sliding_window", 512)),
        Keys.Attention.SLIDING_WINDOW_PATTERN: int(config.get("sliding_window_pattern", 6)),
        Keys.Rope.FREQ_BASE_SWA: float(config.get("rope_local_base_freq", 10000.0)),
    }


def _gemma3_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    if get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float, 0.0):
        raise UserError("the GGUF file soft-caps the final logits, which mlx-lm's gemma3_text does not")
    window = get(Keys.Attention.SLIDING_WINDOW, int, 0)
    local_base = get(Keys.Rope.FREQ_BASE_SWA, float, 10000.0)  # (llama.cpp's default)
    out = {"query_pre_attn_scalar": cfg["head_dim"], "rope_local_base_freq": local_base}
    if window:  # (llama.cpp's gemma3: every 6th layer global, unless the file says)
        pattern = get(Keys.Attention.SLIDING_WINDOW_PATTERN, int, 6)
        out.update(sliding_window=window, sliding_window_pattern=pattern)
    else:
        out.update(sliding_window=1, sliding_window_pattern=1)  # every layer global
    return out


def _qwen3_moe_write(config: dict) -> Metadata:
    n = int(config["num_hidden_layers"])
    step = int(config.get("decoder_sparse_step", 1))
    dense = [i for i in range(n) if i in (config.get("mlp_only_layers") or []) or (i + 1) % step]
    if dense:
        raise UserError(f"llama.cpp's qwen3moe has experts in every layer; layers {dense} are dense")
    if not config.get("norm_topk_prob", False):
        raise UserError("llama.cpp's qwen3moe renormalises the top-k expert weights; norm_topk_prob is false")
    return {
        Keys.LLM.EXPERT_COUNT: int(config["num_experts"]),
        Keys.LLM.EXPERT_USED_COUNT: int(config["num_experts_per_tok"]),
        Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: int(config["moe_intermediate_size"]),
    }


def _qwen3_moe_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    return {
        "num_experts": get(Keys.LLM.EXPERT_COUNT, int),
        "num_experts_per_tok": get(Keys.LLM.EXPERT_USED_COUNT, int),
        "moe_intermediate_size": get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int),
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    }  # fmt: skip


GRANITE_KEYS = {
    "attention_multiplier": Keys.Attention.SCALE,
    "embedding_multiplier": Keys.LLM.EMBEDDING_SCALE,
    "residual_multiplier": Keys.LLM.RESIDUAL_SCALE,
    "logits_scaling": Keys.LLM.LOGIT_SCALE,
}


def _granite_write(config: dict) -> Metadata:
    return {key: float(config[name]) for name, key in GRANITE_KEYS.items()}


def _granite_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    return {name: get(key, float, 1.0) for name, key in GRANITE_KEYS.items()} | _biases(get, cfg, tensors)


def _ministral3_write(config: dict) -> Metadata:
    sliding = [i for i, t in enumerate(config.get("layer_types") or []) if t == "sliding_attention"]
    if sliding and config.get("sliding_window"):
        raise UserError(f"llama.cpp's mistral3 has no sliding-window attention; layers {sliding} slide")
    rope = config.get("rope_parameters") or {}
    if not rope.get("llama_4_scaling_beta"):
        return {}
    # Llama 4's attention temperature: queries x 1 + beta * log(1 + floor(position / original))
    return {
        Keys.Attention.TEMPERATURE_SCALE: float(rope["llama_4_scaling_beta"]),
        Keys.Rope.SCALING_ORIG_CTX_LEN: int(rope["original_max_position_embeddings"]),
    }


def _ministral3_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    # mlx-lm's ministral3 takes its RoPE (scaling included) from rope_parameters alone
    rope = {"rope_type": "default", **(cfg.get("rope_scaling") or {}), "rope_theta": cfg["rope_theta"]}
    rope["llama_4_scaling_beta"] = get(Keys.Attention.TEMPERATURE_SCALE, float, 0.0)
    rope["original_max_position_embeddings"] = get(Keys.Rope.SCALING_ORIG_CTX_LEN, int,
                                                   cfg["max_position_embeddings"])  # fmt: skip
    return {"rope_parameters": rope}


def _lfm2_write(config: dict) -> Metadata:
    n = int(config["num_hidden_layers"])
    attn = config.get("full_attn_idxs")
    if attn is None:
        attn = [i for i, t in enumerate(config.get("layer_types") or []) if t == "full_attention"]
    kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    ff = int(config.get("block_ff_dim") or config["intermediate_size"])
    if config.get("block_auto_adjust_ff_dim"):  # the width mlx-lm's (and transformers') Lfm2MLP builds
        ff = int(2 * ff / 3)
        if config.get("block_ffn_dim_multiplier") is not None:
            ff = int(config["block_ffn_dim_multiplier"] * ff)
        ff = config["block_multiple_of"] * -(-ff // config["block_multiple_of"])
    return {
        # llama.cpp tells convolution layers from attention ones by a key/value head count of 0
        Keys.Attention.HEAD_COUNT_KV: [kv if i in attn else 0 for i in range(n)],
        Keys.LLM.FEED_FORWARD_LENGTH: ff,
        Keys.Attention.LAYERNORM_RMS_EPS: float(config.get("norm_eps", config.get("rms_norm_eps", 1e-5))),
        Keys.ShortConv.L_CACHE: int(config["conv_L_cache"]),
    }


def _lfm2_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    if get(Keys.Attention.SLIDING_WINDOW, int, 0):
        raise UserError("the GGUF lfm2 file has sliding-window attention, which mlx-lm's lfm2 does not")
    kv = get(Keys.Attention.HEAD_COUNT_KV, list)
    return {
        "norm_eps": cfg["rms_norm_eps"], "conv_bias": "blk.0.shortconv.in_proj.bias" in tensors,
        "conv_L_cache": get(Keys.ShortConv.L_CACHE, int), "block_dim": cfg["hidden_size"],
        "block_ff_dim": cfg["intermediate_size"], "block_auto_adjust_ff_dim": False,
        "block_multiple_of": 1, "block_ffn_dim_multiplier": 1.0, "tie_word_embeddings": True,
        "full_attn_idxs": [i for i, v in enumerate(kv) if v],
    }  # fmt: skip


def _gpt_oss_layers(n: int) -> list[str]:
    """llama.cpp's gpt-oss layers: sliding and full in turn, sliding first (its pattern 2)."""
    return ["full_attention" if i % 2 else "sliding_attention" for i in range(n)]


def _gpt_oss_write(config: dict) -> Metadata:
    n = int(config["num_hidden_layers"])
    if (config.get("layer_types") or _gpt_oss_layers(n)) != _gpt_oss_layers(n):
        raise UserError("llama.cpp's gpt-oss alternates sliding and full attention layers, sliding first; "
                        f"this model's layer_types are {config['layer_types']}")  # fmt: skip
    return {
        Keys.LLM.EXPERT_COUNT: int(config["num_local_experts"]),
        Keys.LLM.EXPERT_USED_COUNT: int(config["num_experts_per_tok"]),
        Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: int(config["intermediate_size"]),
        Keys.Attention.SLIDING_WINDOW: int(config.get("sliding_window", 128)),
    }


def _gpt_oss_read(get: Getter, cfg: dict, tensors: dict) -> dict:
    if get(Keys.Attention.SLIDING_WINDOW_PATTERN, int, 2) != 2:
        raise UserError("the GGUF gpt-oss file has another sliding-window pattern than every other layer")
    return {
        "num_local_experts": get(Keys.LLM.EXPERT_COUNT, int),
        "num_experts_per_tok": get(Keys.LLM.EXPERT_USED_COUNT, int),
        "intermediate_size": get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int),
        "sliding_window": get(Keys.Attention.SLIDING_WINDOW, int),
        "layer_types": _gpt_oss_layers(cfg["num_hidden_layers"]),
    }


# llama.cpp architectures whose loader reads rope.scaling.yarn_log_multiplier as mscale_all_dim
# (deepseek2 reads it too, differently; others ignore it: tested with llama and qwen3)
LOG_MULTIPLIER_ARCHS = {"mistral3"}

ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", reorders_qk=True, read=_biases),
    "mistral": GGUFArch("llama", "MistralForCausalLM", reorders_qk=True, read=_biases),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM"),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM"),
    "smollm3": GGUFArch("smollm3", "SmolLM3ForCausalLM", reorders_qk=True, write=_smollm3_write,
                        read=_smollm3_read),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM"),
    "gemma3_text": GGUFArch("gemma3", "Gemma3ForCausalLM", norm_plus_one=True, write=_gemma3_write,
                            read=_gemma3_read),
    "qwen3_moe": GGUFArch("qwen3moe", "Qwen3MoeForCausalLM", write=_qwen3_moe_write, read=_qwen3_moe_read),
    "olmo2": GGUFArch("olmo2", "Olmo2ForCausalLM"),
    "granite": GGUFArch("granite", "GraniteForCausalLM", reorders_qk=True, write=_granite_write,
                        read=_granite_read),
    "ministral3": GGUFArch("mistral3", "Ministral3ForCausalLM", reorders_qk=True, write=_ministral3_write,
                           read=_ministral3_read),
    "lfm2": GGUFArch("lfm2", "Lfm2ForCausalLM", squeezed=("conv.conv.weight",), write=_lfm2_write,
                     read=_lfm2_read),
    "gpt_oss": GGUFArch("gpt-oss", "GptOssForCausalLM", write=_gpt_oss_write, read=_gpt_oss_read),
    "qwen3_5": GGUFArch("qwen35", "Qwen3_5ForConditionalGeneration", squeezed=("conv1d.weight",),
                        write=arch_qwen35.write, read=arch_qwen35.read, **arch_qwen35.NAMING),
    "gemma4_text": GGUFArch("gemma4", "Gemma4ForCausalLM", write=arch_gemma4.write, read=arch_gemma4.read,
                            derived=arch_gemma4.derived, name=arch_gemma4.gguf_name,
                            unfused=arch_gemma4.unfused),
}  # fmt: skip


def arch_of(model_type: str, what: str = "GGUF") -> GGUFArch:
    """The entry for ``model_type``; refuses another in one line naming it."""
    if model_type not in ARCHS:
        raise UserError(f"{what} supports model types {', '.join(ARCHS)}; this model is {model_type!r}")
    return ARCHS[model_type]


def model_type_of(gguf_arch: str) -> str:
    """The ``model_type`` for a GGUF ``general.architecture`` (the entry named like it first: a
    llama-architecture file is a llama model, whatever model it was converted from)."""
    matches = [mt for mt, a in ARCHS.items() if a.gguf == gguf_arch]
    if not matches:
        supported = sorted({a.gguf for a in ARCHS.values()})
        raise UserError(
            f"GGUF architecture {gguf_arch!r} is not supported (supported: {', '.join(supported)})"
        )
    return gguf_arch if gguf_arch in matches else matches[0]
