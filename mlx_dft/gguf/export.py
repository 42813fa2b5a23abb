"""A Hugging Face model folder (``config.json``, ``model*.safetensors``, tokenizer files: what
``mlx_dft fuse`` writes) as one GGUF file that llama.cpp, Ollama and LM Studio load.

- Metadata: ``general.*`` (architecture, type, name, file type), the architecture's parameters
  from config.json (:data:`mlx_dft.gguf.names.CONFIG_KEYS`, plus the rotary dimension count, the
  vocabulary size, key/value lengths), and the tokenizer (:mod:`mlx_dft.gguf.vocab`).
  and the architecture's own keys (:mod:`mlx_dft.gguf.archs`, which refuses what llama.cpp would
  compute differently).
- Tensors: renamed with :func:`~mlx_dft.gguf.names.to_gguf_name` (gguf-py's tables), stored as
  llama.cpp holds them (:func:`~mlx_dft.gguf.names.to_gguf_array`): the q/k rows of the
  architectures with llama.cpp's "normal" RoPE reordered to its rotary layout; Gemma's norms as
  1 + w; qwen3_5's ``A_log`` as ``-exp(A_log)`` and its value heads in llama.cpp's order; no
  ``output.weight`` when the embedding is tied (llama.cpp then uses ``token_embd``).
- Types (``gguf_type``): ``f32``; ``f16``; ``q8_0``; ``q4_0``. Norms, biases (of any shape) and
  other 1-D tensors, and convolutions, stay F32 in every type, and so does a matrix whose rows
  are not a multiple of 32 values when a quantized type is asked (llama.cpp's blocks are 32
  values). With ``q4_0`` the output projection (``output.weight``, or ``token_embd`` when tied)
  is Q8_0, as llama.cpp's quantizer keeps it at a higher precision (Q6_K there; K-quants are not
  written here).

MLX-quantized folders are refused: dequantize them first (``mlx_dft fuse --dequantize``).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dft.architectures import text_config
from mlx_dft.errors import UserError
from mlx_dft.files import check_safetensors, read_json
from mlx_dft.gguf.archs import LOG_MULTIPLIER_ARCHS, arch_of
from mlx_dft.gguf.names import CONFIG_KEYS, stored_shape, to_gguf_array, to_gguf_name, unprefixed
from mlx_dft.gguf.vocab import add_tokenizer
from mlx_dft.gguf.writer import GGUFWriter, ValueType

# --gguf-type -> llama.cpp's general.file_type (enum llama_ftype) and the type of 2-D tensors.
GGUF_TYPES = {"f32": (0, "F32"), "f16": (1, "F16"), "q8_0": (7, "Q8_0"), "q4_0": (2, "Q4_0")}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layouts written by mlx_dft.gguf.quants
FLOAT_KEYS = {"rms_norm_eps", "rope_theta"}
# Tensors of a checkpoint that carry no weights of their own.
SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r}; choose {', '.join(GGUF_TYPES)}")
    return gguf_type


def file_name(gguf_type: str) -> str:
    """The GGUF file ``mlx_dft fuse --gguf`` writes into its folder: ``model-f16.gguf`` and so on."""
    return f"model-{check_gguf_type(gguf_type)}.gguf"


def tensor_type(gguf_type: str, shape: tuple[int, ...], output: bool, f32: bool = False) -> str:
    """The stored type of one tensor (see the module docstring); ``f32``: F32 whatever its shape."""
    wanted = GGUF_TYPES[gguf_type][1]
    if len(shape) < 2 or wanted == "F32" or f32:
        return "F32"
    if wanted in ("Q8_0", "Q4_0") and shape[-1] % 32:
        return "F32"
    return "Q8_0" if wanted == "Q4_0" and output else wanted


def _rope(config: dict, arch: str) -> tuple[float | None, dict | None]:
    """(rope_theta, rope scaling) from config.json, in transformers 4's or 5's spelling."""
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    theta = config.get("rope_theta", params.get("rope_theta"))
    scaling = config.get("rope_scaling") or None
    kind = (scaling or params).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float((scaling or params)["factor"])}
    if kind == "yarn":
        return theta, _yarn(scaling or params, arch)
    raise UserError(
        f"config.json: rope scaling of type {kind!r} is not written to GGUF (default, linear and yarn are)"
    )


def _yarn(s: dict, arch: str) -> dict:
    """YaRN as llama.cpp computes it for every architecture: its correction range from beta_fast
    32 and beta_slow 1 (the keys are read by mistral3 alone) and the magnitude
    ``m(1) / m(mscale_all_dim)``, ``m(x) = 1 + 0.1 x ln(factor)``, which is mlx-lm's with mscale 1
    (llama.cpp reads ``mscale_all_dim`` from ``rope.scaling.yarn_log_multiplier``, and takes
    mscale as 1; without the key the magnitude is ``m(1)``, mlx-lm's with no mscale_all_dim). Other
    settings are refused."""
    fixed = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0}
    odd = {k: s[k] for k, v in fixed.items() if s.get(k) is not None and float(s[k]) != v}
    all_dims = float(s.get("mscale_all_dim") or 0.0)
    if all_dims < 0:
        odd["mscale_all_dim"] = s["mscale_all_dim"]
    if odd:
        raise UserError(
            f"config.json: YaRN with {odd} is not written to GGUF "
            f"(llama.cpp fixes {fixed}, mscale_all_dim >= 0)"
        )
    if all_dims and arch not in LOG_MULTIPLIER_ARCHS:
        raise UserError(
            f"config.json: YaRN with mscale_all_dim {all_dims} is not written to GGUF for {arch} (llama.cpp "
            f"reads its magnitude for {', '.join(sorted(LOG_MULTIPLIER_ARCHS))} only)"
        )
    out = {"type": "yarn", "factor": float(s["factor"]),
           "original_context_length": int(s["original_max_position_embeddings"])}  # fmt: skip
    if all_dims:
        out["yarn_log_multiplier"] = all_dims
    return out


def add_architecture(writer: GGUFWriter, config: dict, arch: str, n_vocab: int) -> None:
    """``{arch}.*`` parameters from a config.json (the architecture's own keys last, over the
    common ones: lfm2's per-layer key/value head counts, its ``norm_eps``)."""
    extra = arch_of(str(config.get("model_type")), "GGUF export").write(config)  # refusals first
    theta, scaling = _rope(config, arch)
    values = {**config, "rope_theta": theta}
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = config["num_attention_heads"]
    keys: dict[str, object] = {}
    for hf_key, gguf_key in CONFIG_KEYS.items():
        if values.get(hf_key) is not None:
            keys[gguf_key] = float(values[hf_key]) if hf_key in FLOAT_KEYS else int(values[hf_key])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim"):
        keys["attention.value_length"] = int(head_dim)
    rotary = head_dim * float(config.get("partial_rotary_factor") or 1.0)
    if rotary != int(rotary) or int(rotary) % 2:
        raise UserError(f"config.json: partial_rotary_factor gives {rotary} rotary dimensions (not even)")
    keys["rope.dimension_count"] = int(rotary)
    keys["vocab_size"] = n_vocab
    if scaling:
        keys["rope.scaling.type"] = scaling["type"]
        keys["rope.scaling.factor"] = float(scaling["factor"])
        if "original_context_length" in scaling:
            keys["rope.scaling.original_context_length"] = scaling["original_context_length"]
        if "yarn_log_multiplier" in scaling:
            keys["rope.scaling.yarn_log_multiplier"] = scaling["yarn_log_multiplier"]
    keys = {f"{arch}.{k}": v for k, v in keys.items()}
    keys.update({k.format(arch=arch): v for k, v in extra.items()})
    for key, value in keys.items():
        _add_value(writer, key, value)


def _add_value(writer: GGUFWriter, key: str, value) -> None:
    """A metadata value typed as llama.cpp reads it: floats FLOAT32, counts UINT32."""
    if isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        writer.add_array(key, ValueType.BOOL, value)  # (gemma4's sliding_window_pattern, one per layer)
    elif isinstance(value, list):
        writer.add_array(key, ValueType.UINT32, [int(v) for v in value])
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, value)


def _weights(folder: Path) -> dict[str, mx.array]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise UserError(f"model folder {folder} has no model*.safetensors weights")
    weights: dict[str, mx.array] = {}
    for f in files:
        check_safetensors(f)
        weights.update(mx.load(str(f)))
    return weights


def _numpy(w: mx.array) -> np.ndarray:
    return np.asarray(w.astype(mx.float32))


def write_model_gguf(
    folder: str | Path, out: str | Path, gguf_type: str = "f16", name: str | None = None
) -> Path:
    """Write the model in ``folder`` as the GGUF file ``out`` (``gguf_type``: f32, f16, q8_0, q4_0)."""
    folder, out = Path(folder), Path(out)
    check_gguf_type(gguf_type)
    config = read_json(folder / "config.json")
    if config.get("quantization") or config.get("quantization_config"):
        raise UserError(
            f"{folder} holds quantized weights; GGUF export needs float ones (fuse with --dequantize)"
        )
    model_type = str(config.get("model_type"))
    entry = arch_of(model_type, "GGUF export")
    arch = entry.gguf
    config = text_config(config)  # (qwen3_5's settings under text_config, its weights under a prefix)
    weights = {unprefixed(k, model_type): v for k, v in _weights(folder).items()}
    # (lfm2 ties without saying so: its config has tie_embedding, its weights no lm_head)
    tied = bool(config.get("tie_word_embeddings", "lm_head.weight" not in weights))
    if "model.embed_tokens.weight" not in weights:
        raise UserError(f"{folder}: no model.embed_tokens.weight tensor")
    if not tied and "lm_head.weight" not in weights:
        raise UserError(f"{folder}: no lm_head.weight, and config.json does not tie it to the embedding")
    n_vocab = int(weights["model.embed_tokens.weight"].shape[0])

    writer = GGUFWriter()
    writer.add_string("general.architecture", arch)
    writer.add_string("general.type", "model")
    writer.add_string("general.name", name or folder.resolve().name)
    writer.add_uint32("general.file_type", GGUF_TYPES[gguf_type][0])
    writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    add_architecture(writer, config, arch, n_vocab)
    add_tokenizer(writer, folder, n_vocab, config)

    for hf_name in sorted(weights, key=_order):
        if SKIPPED.search(hf_name) or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = to_gguf_name(hf_name, model_type, int(config["num_hidden_layers"]))
        if gguf_name is None:
            raise UserError(f"{folder}: tensor {hf_name} has no GGUF name (an unsupported layer?)")
        shape = stored_shape(hf_name, tuple(weights[hf_name].shape), model_type)
        output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        # F32 too: a convolution (llama.cpp's CPU one reads float32 only) and a bias of any shape
        # (gpt-oss's per-expert ones: llama.cpp adds them to float32 activations, F16 aborts it)
        f32 = hf_name.endswith(entry.squeezed) or hf_name.endswith(".bias")
        writer.add_tensor(
            gguf_name, shape, tensor_type(gguf_type, shape, output, f32), _reader(weights, hf_name, config)
        )
    for gguf_name, values in entry.derived(config).items():  # (gemma4's rope_freqs: F32 vectors)
        writer.add_tensor(gguf_name, values.shape, "F32", lambda values=values: values)
    return writer.write(out)


def _reader(weights: dict[str, mx.array], hf_name: str, config: dict):
    def read() -> np.ndarray:
        # dropped once written: one tensor in memory at a time
        return to_gguf_array(hf_name, _numpy(weights.pop(hf_name)), config)

    return read


def _order(hf_name: str) -> tuple:
    # token_embd, the blocks in order, then the final norm and the output (llama.cpp's order).
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    if m:
        return (1, int(m.group(1)), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)
