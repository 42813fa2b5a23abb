"""Loading mlx-lm models, and the architecture specifics the trainer needs, in one place.

The loss needs the final hidden states and the output projection separately (so logits
are computed at supervised positions only). For the LLaMA family in mlx-lm (llama,
mistral, qwen2, qwen3) that is ``model.model(inputs)`` and ``lm_head`` or the tied
embedding. Other mlx-lm architectures train through a generic path that takes the full
logits from ``model(inputs)``: correct, but without the memory saving.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_dft.errors import UserError

FAST_PATH_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "tiny-llama"


def resolve_model_path(model: str) -> Path:
    """A local model folder, or a Hugging Face repo id fetched (or found in the cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model not found: {model} (give a local folder or a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model,
                allow_patterns=[
                    "*.json",
                    "*.safetensors",
                    "*.py",
                    "tokenizer.model",
                    "*.tiktoken",
                    "*.txt",
                    "*.jinja",
                ],
            )
        )
    except Exception as e:  # offline, missing repo, gated...
        raise UserError(
            f"model not found: {model} is neither a local folder nor a reachable "
            f"Hugging Face repo ({type(e).__name__})"
        ) from None


def model_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def load_model(model: str, dtype: str = "auto", tokenizer_config: dict | None = None):
    """Load (model, tokenizer, config, path) with mlx-lm; cast floating weights per ``dtype``.

    ``auto`` computes in float32 on a CPU device (MLX's CPU half-precision matmuls skip BLAS
    and are ~30x slower) and keeps the checkpoint's dtype on a GPU.
    """
    from mlx_lm.utils import load_model as _load_model
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(model)
    config = model_config(path)
    if not list(path.glob("model*.safetensors")):
        raise UserError(f"model folder {path} has no model*.safetensors weights")
    try:
        net, config = _load_model(path)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"cannot load model {model}: {msg}") from None
    tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    cast_model(net, dtype)
    return net, tokenizer, config, path


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


def model_type(model: nn.Module) -> str:
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", "?")


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
    if model_type(model) in FAST_PATH_TYPES and inner is not None and hasattr(inner, "embed_tokens"):
        if getattr(model, "args", None) is not None and model.args.tie_word_embeddings:
            return inner, _TiedHead(inner.embed_tokens), True
        if hasattr(model, "lm_head"):
            return inner, model.lm_head, True
    return model, _identity, False


def vocab_size(model: nn.Module, config: dict) -> int:
    if "vocab_size" in config:
        return int(config["vocab_size"])
    return int(config.get("text_config", {}).get("vocab_size", 32000))
