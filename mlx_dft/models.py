"""Models: loading mlx-lm models, and every architecture fact mlx_dft relies on, in one table.

The loss needs the final hidden states and the output projection separately (so logits
are computed at supervised positions only). For the architectures in :data:`ARCHITECTURES`
(mlx-lm's llama, mistral, qwen2, qwen3) that is ``model.model(inputs)`` and ``lm_head`` or the
tied embedding. Other mlx-lm architectures train LoRA/DoRA/full through a generic path that
takes the full logits from ``model(inputs)``: correct, but without the memory saving.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_dft import compat
from mlx_dft.architectures import ARCHITECTURES as ARCHITECTURES  # the table, one floor down
from mlx_dft.architectures import Architecture as Architecture
from mlx_dft.architectures import architecture as architecture
from mlx_dft.architectures import check_sizes
from mlx_dft.errors import UserError
from mlx_dft.files import check_safetensors, local_or_hub, read_json

compat.require()  # before mlx-lm is used: an untested mlx or mlx-lm is refused in one line

# config.json keys that fix the attention shapes an adapter is made for.
SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
# ... and those that identify the model a checkpoint belongs to.
SIGNATURE_KEYS = ("model_type", *SHAPE_KEYS, "intermediate_size", "vocab_size")
# LLaMA-2 base models by (hidden size, layers): the bases of the official Aligner checkpoints.
LLAMA2_BY_SHAPE = {(4096, 32): "meta-llama/Llama-2-7b-hf", (5120, 40): "meta-llama/Llama-2-13b-hf"}
# The tokenizer's JSON files, checked (UTF-8, a JSON object) before transformers reads them.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
MODEL_FILES = ("*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")


def model_type(model: nn.Module | dict) -> str:
    """``model_type`` of an mlx-lm model or of a config.json dict."""
    if not isinstance(model, nn.Module):  # (an nn.Module is a dict too)
        return str(model.get("model_type", "?"))
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", "?")


def model_signature(config: dict) -> dict:
    """The config.json values that identify a model (a resumed run must match them)."""
    return {k: config.get(k) for k in SIGNATURE_KEYS if k in config}


LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def block_linear_paths(model: nn.Module, layer_index: int = -1) -> list[str]:
    """Paths (relative to a block, ``self_attn.q_proj``) of the linear layers of one transformer block."""
    block = model.layers[layer_index]
    return sorted(p for p, m in block.named_modules() if isinstance(m, LINEAR_TYPES) or hasattr(m, "to_lora"))


def last_layers(n_layers: int, num_layers: int | None) -> list[int]:
    """Indices of the last ``num_layers`` blocks (all of them for -1, None, or more than exist)."""
    k = n_layers if num_layers in (-1, None) or num_layers > n_layers else num_layers
    return list(range(n_layers - k, n_layers))


def default_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "tiny-llama"


def resolve_model_path(model: str) -> Path:
    """A local model folder, a Hugging Face repo id fetched (or found in the cache), or a GGUF
    file converted once into a cached folder (:func:`mlx_dft.gguf.convert.cached_conversion`):
    float32 on a CPU device, where MLX's quantized products are slow (as ``--dtype auto``
    computes in float32 there), MLX-quantized elsewhere."""
    if str(model).lower().endswith(".gguf") and Path(model).expanduser().is_file():
        from mlx_dft.gguf.convert import cached_conversion

        return cached_conversion(model, dequantize=mx.default_device() == mx.cpu)
    path = local_or_hub(model, MODEL_FILES, "model")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {path} has no config.json")
    return path


def model_config(path: Path) -> dict:
    config = read_json(Path(path) / "config.json")
    check_sizes(config, Path(path) / "config.json")
    return config


def build_model(config: dict, name: str) -> nn.Module:
    """The mlx-lm model a config.json describes, with lazy (never materialised) weights: its
    layout without loading anything."""
    from mlx_lm.utils import _get_classes

    check_model_type(config.get("model_type"), name)
    try:
        model_cls, args_cls = _get_classes(config)
        return model_cls(args_cls.from_dict(config))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot build model {name}: {e}") from None


def check_model_type(value, where: Path | str) -> None:
    """Refuse a ``model_type`` that is not one of mlx-lm's architectures: mlx-lm imports
    ``mlx_lm.models.<model_type>``, so a file may name only a module of that package that defines
    a ``Model`` and its ``ModelArgs`` (not a helper module, nothing outside it)."""
    import importlib
    import pkgutil

    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(value, value) if isinstance(value, str) else value
    known = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    ok = isinstance(name, str) and name in known
    if ok:
        module = importlib.import_module(f"mlx_lm.models.{name}")  # one of mlx-lm's own modules
        ok = hasattr(module, "Model") and hasattr(module, "ModelArgs")
    if not ok:
        raise UserError(f"{where}: model_type {value!r} is not an architecture mlx-lm supports")


def load_model(
    model: str, dtype: str = "auto", chat_template: str | None = None, keep_quantized: bool = False
):
    """Load (model, tokenizer, config, path) with mlx-lm; cast floating weights per ``dtype``;
    ``chat_template`` (a template or a file holding one) replaces the tokenizer's.

    ``auto`` computes in float32 on a CPU device (MLX's CPU half-precision matmuls skip BLAS
    and are ~30x slower) and keeps the checkpoint's dtype on a GPU. A quantized model on a CPU
    device is dequantized to float32 when that copy fits in memory (:func:`dequantize_for_cpu`),
    unless ``keep_quantized``.
    """
    from mlx_lm.utils import load_model as _load_model
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(model)
    config = model_config(path)
    if "model_type" not in config:
        raise UserError(f"{path / 'config.json'} has no model_type: not a transformers model config")
    check_model_type(config["model_type"], path / "config.json")
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise UserError(f"model folder {path} has no model*.safetensors weights")
    for f in weights:
        check_safetensors(f)
    try:
        net, config = _load_model(path)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"cannot load model {model}: {msg}") from None
    for name in TOKENIZER_JSON:  # transformers' own errors on these are tracebacks, not lines
        if (path / name).exists():
            read_json(path / name)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (ValueError, TypeError, KeyError, AttributeError, OSError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot load the tokenizer of {path}: {type(e).__name__}: {first}") from None
    if chat_template:
        from mlx_dft.data import set_chat_template

        set_chat_template(tokenizer, chat_template)
    if not keep_quantized:
        net = dequantize_for_cpu(net, str(model))
    cast_model(net, dtype)
    return net, tokenizer, config, path


def logical_parameters(model: nn.Module) -> int:
    """The model's parameter count, quantized weights counted at their logical size."""
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits + sum(
                v.size
                for k, v in m.parameters().items()
                if k not in ("weight", "scales", "biases") and isinstance(v, mx.array)
            )
        else:
            total += sum(v.size for k, v in m.parameters().items() if isinstance(v, mx.array))
    return total


def float32_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights in float32 (quantized weights at their logical size)."""
    return 4 * logical_parameters(model)


def physical_memory() -> int:
    """This machine's memory in bytes (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# A float32 copy of the weights may take this share of memory: training adds the activations,
# the adapter's optimizer state and the logits of a batch.
DEQUANTIZE_MEMORY_SHARE = 0.5


def dequantize_for_cpu(model: nn.Module, name: str) -> nn.Module:
    """On a CPU device, where MLX has no fast quantized matmul (SmolLM2-135M 4-bit generates
    ~4 tokens/s there against ~58 in float32), a quantized model's weights become float32
    when that copy fits in :data:`DEQUANTIZE_MEMORY_SHARE` of memory; the values are those the
    quantized products compute with, so an adapter trained either way is the same adapter.
    Says what it did (or why not) once on standard error. GPU devices keep it quantized."""
    if mx.default_device() != mx.cpu or not is_quantized(model):
        return model
    from mlx_lm.utils import dequantize_model

    need, have = float32_bytes(model), physical_memory()
    gb = f"{need / 1e9:.2f} GB" if need >= 1e8 else f"{need / 1e6:.1f} MB"
    if have and need > DEQUANTIZE_MEMORY_SHARE * have:
        print(
            f"note: {name} is quantized and its float32 copy ({gb}) would not fit in this machine's "
            f"{have / 1e9:.0f} GB; it stays quantized (slow on the CPU)",
            file=sys.stderr,
        )
        return model
    print(
        f"note: {name} is quantized; computing in float32 on the CPU ({gb}), where MLX has no fast "
        "quantized matmul (--keep-quantized keeps it)",
        file=sys.stderr,
    )
    model = dequantize_model(model)
    model.set_dtype(mx.float32, lambda t: mx.issubdtype(t, mx.floating))
    model._mlx_dft_dequantized = True  # a plain attribute (see :func:`was_quantized`)
    return model


def was_quantized(model: nn.Module) -> bool:
    """The model is quantized, or is the float32 copy of a quantized one (:func:`dequantize_for_cpu`)."""
    return is_quantized(model) or bool(getattr(model, "_mlx_dft_dequantized", False))


def cast_model(model: nn.Module, dtype: str) -> None:
    if dtype == "auto":
        if mx.default_device() != mx.cpu:
            return
        dtype = "float32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    model.set_dtype(target, lambda t: mx.issubdtype(t, mx.floating))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules())


class _TiedHead(nn.Module):
    """The output projection of a model whose head is its input embedding."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def __call__(self, h: mx.array) -> mx.array:
        return self.embedding.as_linear(h)


def _identity(h: mx.array) -> mx.array:
    return h


def split_model(model: nn.Module) -> tuple[Callable, nn.Module | Callable, bool]:
    """(body, head, fast): ``head(body(inputs))`` equals ``model(inputs)``.

    ``fast`` is True when ``body`` yields hidden states (so logits can be restricted to
    supervised positions); otherwise ``body`` is the whole model and ``head`` the identity.
    """
    inner = getattr(model, "model", None)
    if model_type(model) in ARCHITECTURES and inner is not None and hasattr(inner, "embed_tokens"):
        if getattr(model, "args", None) is not None and model.args.tie_word_embeddings:
            return inner, _TiedHead(inner.embed_tokens), True
        if hasattr(model, "lm_head"):
            return inner, model.lm_head, True
    return model, _identity, False


def vocab_size(model: nn.Module) -> int:
    """The output vocabulary size (rows of the output projection)."""
    args = getattr(model, "args", None)
    if getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    inner = getattr(model, "model", model)
    return int(inner.embed_tokens.weight.shape[0])


def grad_checkpoint(model: nn.Module) -> None:
    """Recompute each block in the backward pass (mlx-lm's mechanism: patches the block class)."""
    from mlx_lm.tuner.trainer import grad_checkpoint as patch

    cls = type(model.layers[0])
    if not getattr(cls, "_mlx_dft_checkpointed", False):
        patch(model.layers[0])
        cls._mlx_dft_checkpointed = True
