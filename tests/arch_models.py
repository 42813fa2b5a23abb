"""Tiny random models of the mlx-lm architectures people fine-tune today, built on the fly with
mlx-lm's own ``Model``/``ModelArgs`` (no downloads) and saved so that ``mlx_lm.load`` opens them.

Each config keeps what makes its architecture different (hybrid layers, experts, sliding windows,
soft-capping, logit scaling, NoPE layers, shared KV, nested ``text_config``) at a size that runs in
milliseconds: hidden 64, 2-4 layers, the bundled tokenizer's 512 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}  # fmt: skip


def _cfg(model_type: str, hf: str | None, **kw) -> dict:
    out = {"model_type": model_type, **BASE, **kw}
    if hf:
        out["architectures"] = [hf]
    return out


CONFIGS: dict[str, dict] = {
    "llama": _cfg("llama", "LlamaForCausalLM", num_hidden_layers=2, tie_word_embeddings=False),
    "qwen3": _cfg("qwen3", "Qwen3ForCausalLM", num_hidden_layers=2, head_dim=16, tie_word_embeddings=True),
    "gemma3_text": _cfg(
        "gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, sliding_window_pattern=2, rope_local_base_freq=10000.0,
        final_logit_softcapping=None,
    ),
    "gemma4_text": _cfg(
        "gemma4_text", None, num_hidden_layers=4, head_dim=16, global_head_dim=32, num_key_value_heads=1,
        num_kv_shared_layers=1, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
        sliding_window=4, sliding_window_pattern=2, final_logit_softcapping=30.0,
        use_double_wide_mlp=False, tie_word_embeddings=True,
    ),
    "qwen3_5": {
        "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 1024, "linear_num_value_heads": 4,
            "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4, "full_attention_interval": 2, "tie_word_embeddings": False,
            "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
        },
    },
    "qwen3_moe": _cfg(
        "qwen3_moe", "Qwen3MoeForCausalLM", num_hidden_layers=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32,
        norm_topk_prob=True, tie_word_embeddings=False,
    ),
    "phi3": _cfg("phi3", "Phi3ForCausalLM", num_hidden_layers=2, tie_word_embeddings=False),
    "smollm3": _cfg(
        "smollm3", "SmolLM3ForCausalLM", num_hidden_layers=4, no_rope_layer_interval=2,
        tie_word_embeddings=True,
    ),
    "lfm2": _cfg(
        "lfm2", "Lfm2ForCausalLM", num_hidden_layers=3, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
        block_dim=64, block_multiple_of=16, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False,
        block_ff_dim=96, full_attn_idxs=[1],
    ),
    "granite": _cfg(
        "granite", "GraniteForCausalLM", num_hidden_layers=2, logits_scaling=3.0, attention_multiplier=0.2,
        embedding_multiplier=4.0, residual_multiplier=0.5, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=True,
    ),
    "olmo2": _cfg("olmo2", "Olmo2ForCausalLM", num_hidden_layers=2, tie_word_embeddings=False),
    "gpt_oss": _cfg(
        "gpt_oss", "GptOssForCausalLM", num_hidden_layers=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    ),
    "ministral3": _cfg(
        "ministral3", None, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                         "original_max_position_embeddings": 8},
        layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    ),
}  # fmt: skip

TYPES = list(CONFIGS)


def write_arch_model(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A random-weight ``model_type`` model folder (config.json, model.safetensors, the bundled
    tokenizer) that ``mlx_lm.load`` and :func:`mlx_dft.load_model` open."""
    from tests.conftest import write_model

    config = json.loads(json.dumps(CONFIGS[model_type]))
    config.update(overrides)
    return write_model(path, config, seed)


# The transformers-made counterparts (tests/test_architectures_peft.py): sliding windows where
# mlx-lm and transformers 5.25 disagree on these tiny shapes are set so that the base models
# agree (gemma3_text at window 4, ministral3 at any window below the input's length differ by
# 0.15 and 0.95 of the logits' scale: noted in docs/architectures.md).
HF_OVERRIDES = {
    "gemma3_text": {"sliding_window": 5},
    "ministral3": {"layer_types": None, "sliding_window": None},
    # transformers builds gemma4's shared-KV layers only when each reuses a layer of its own type
    "gemma4_text": {
        "num_kv_shared_layers": 2, "sliding_window": 5,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
}  # fmt: skip


def write_hf_model(path: Path, model_type: str, seed: int = 0) -> Path:
    """A random-weight ``model_type`` model made and saved by transformers (torch), with the
    bundled tokenizer: the folder both transformers and ``mlx_lm.load`` read."""
    import shutil

    import torch
    import transformers

    from tests.conftest import BUNDLED, TOKENIZER_FILES

    cfg = {**json.loads(json.dumps(CONFIGS[model_type])), **HF_OVERRIDES.get(model_type, {})}
    cfg.pop("architectures", None)
    kind = cfg.pop("model_type")
    cfg.setdefault("pad_token_id", 0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(kind, **cfg), dtype=torch.float32
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    if model_type == "qwen3_5":
        _as_hub_qwen3_5(path)
    saved = json.loads((path / "config.json").read_text())
    for k, v in {**CONFIGS[model_type], **HF_OVERRIDES.get(model_type, {})}.items():
        saved.setdefault(k, v)  # keys transformers 5 moved (rope_theta) that mlx-lm reads
    if model_type == "gpt_oss":
        # mlx-lm reads gpt_oss's YaRN from ``rope_scaling`` (as the Hub's configs spell it) and
        # always truncates its correction range; transformers 5 writes ``rope_parameters`` with
        # truncate false (gpt-oss's own value): 1e-3 apart on these logits (docs/architectures.md)
        saved["rope_scaling"] = {**saved["rope_parameters"], "truncate": True}
    (path / "config.json").write_text(json.dumps(saved))
    for f in TOKENIZER_FILES:
        shutil.copy(BUNDLED / f, path / f)
    return path


def _as_hub_qwen3_5(path: Path) -> None:
    """transformers saves a text-only Qwen3.5 as ``qwen3_5_text`` (``model.layers``), which mlx-lm
    does not read; the Hub's checkpoints are the multimodal ``qwen3_5`` layout
    (``model.language_model.layers``), which both read (transformers' ``AutoModelForCausalLM``
    maps it back to ``model.layers``). Rewrite the folder into that layout, same values."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    hub = {("model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in weights.items()}
    save_file(hub, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**CONFIGS["qwen3_5"], "pad_token_id": 0}))


def mlx_gpt_oss(hf_path: Path, dst: Path) -> Path:
    """The mlx-lm (mlx-community) form of a gpt_oss folder saved by transformers, same values:
    mlx-lm reads the experts as the original checkpoint lays them out, or already split into
    ``gate_proj``/``up_proj``/``down_proj`` [experts, out, in]; transformers saves
    ``gate_up_proj`` [experts, in, 2 x inter] (gate and up interleaved) and ``down_proj``
    [experts, inter, hidden]."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf_path, dst)
    out = {}
    for k, v in load_file(hf_path / "model.safetensors").items():
        if k.endswith("experts.gate_up_proj"):
            w = v.transpose(0, 2, 1)
            out[k.replace("gate_up_proj", "gate_proj.weight")] = np.ascontiguousarray(w[:, 0::2])
            out[k.replace("gate_up_proj", "up_proj.weight")] = np.ascontiguousarray(w[:, 1::2])
        elif k.endswith("experts.gate_up_proj_bias"):
            out[k.replace("gate_up_proj_bias", "gate_proj.bias")] = np.ascontiguousarray(v[:, 0::2])
            out[k.replace("gate_up_proj_bias", "up_proj.bias")] = np.ascontiguousarray(v[:, 1::2])
        elif k.endswith("experts.down_proj"):
            out[k + ".weight"] = np.ascontiguousarray(v.transpose(0, 2, 1))
        elif k.endswith("experts.down_proj_bias"):
            out[k.replace("down_proj_bias", "down_proj.bias")] = v
        else:
            out[k] = v
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
