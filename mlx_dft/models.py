"""Models: loading mlx-lm models, their layout, and the split the loss needs.

The loss needs the final hidden states and the output computation separately (so logits are
computed at supervised positions only): :func:`split_model` gives both for every mlx-lm text
architecture (the body ``model.model``, and the model's own ``__call__`` run on given hidden states
as the head), checked on a probe batch; a model that fails the probe trains on full logits.
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
from mlx_dft.architectures import check_sizes
from mlx_dft.architectures import text_config as text_config  # (one floor down: gguf reads it)
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
    """The config.json values that identify a model (a resumed run must match them), read through
    a nested ``text_config``."""
    flat = text_config(config)
    return {k: flat.get(k) for k in SIGNATURE_KEYS if k in flat}


LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def expert_types() -> tuple[type, ...]:
    """mlx-lm's mixture-of-experts linear layers (one weight per expert), which its LoRA adapts."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (SwitchLinear, QuantizedSwitchLinear)


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRA can wrap: a linear layer, an expert layer, or one with mlx-lm's ``to_lora``."""
    return isinstance(module, LINEAR_TYPES + expert_types()) or hasattr(module, "to_lora")


def routers(block: nn.Module) -> set[str]:
    """Paths of the block's expert routers: a linear layer beside expert layers (in the same
    module) whose outputs number the experts (qwen3_moe's ``mlp.gate``, gpt_oss's ``mlp.router``).
    PEFT recipes for mixture-of-experts models leave them frozen, and so does the default here."""
    experts = expert_types()
    out = set()
    for path, module in block.named_modules():
        counts = {m.weight.shape[0] for m in module.modules() if isinstance(m, experts)}
        if not counts:
            continue
        for key, child in module.children().items():
            if isinstance(child, LINEAR_TYPES) and child.weight.shape[0] in counts:
                out.add(f"{path}.{key}" if path else key)
    return out


def block_linear_paths(model: nn.Module, with_routers: bool = False) -> list[str]:
    """Paths (relative to a block, ``self_attn.q_proj``) of the layers LoRA can adapt, gathered
    over every block (as mlx-lm does: hybrid models have linear-attention or convolution blocks
    beside attention ones), expert layers included, routers only ``with_routers``."""
    found: set[str] = set()
    skip: set[str] = set()
    for block in model.layers:
        found.update(p for p, m in block.named_modules() if p and is_adaptable(m))
        skip |= routers(block)
    return sorted(found if with_routers else found - skip)


def layers_prefix(model: nn.Module) -> str:
    """The path of the model's block list in its parameter names: ``model.layers``, or
    ``language_model.model.layers`` (qwen3_5)."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first and path.endswith(".0"):
            return path[:-2]
    return "layers"


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
    computes in float32 there), MLX-quantized elsewhere (block types MLX has no layout for
    re-quantized to its affine one: a 4-bit file stays 4-bit)."""
    if str(model).lower().endswith(".gguf") and Path(model).expanduser().is_file():
        from mlx_dft.gguf.convert import cached_conversion

        cpu = mx.default_device() == mx.cpu
        return cached_conversion(model, dequantize=cpu, requantize=not cpu)
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
        import mlx_lm

        raise UserError(
            f"{where}: model_type {value!r} is not an architecture mlx-lm {mlx_lm.__version__} supports"
        )


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


def from_memory(
    net: nn.Module,
    tokenizer,
    config: dict | None = None,
    dtype: str = "auto",
    chat_template: str | None = None,
    keep_quantized: bool = False,
):
    """:func:`load_model`'s (model, tokenizer, config) for a model already in memory, as
    ``mlx_lm.load`` returns it. Its config.json is ``config``, else what the model's ``args``
    hold (every mlx-lm model has them); a transformers tokenizer is wrapped as mlx-lm's. The chat
    template is set, and the model dequantized and cast as :func:`load_model` does: in place,
    the model being the caller's object (dequantizing replaces its layers in it)."""
    import dataclasses

    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerBase

    if config is None:
        args = getattr(net, "args", None)
        config = args if isinstance(args, dict) else getattr(args, "__dict__", None)
        if dataclasses.is_dataclass(args):
            config = dataclasses.asdict(args)
    if not isinstance(config, dict) or not config.get("model_type"):
        raise UserError(
            f"model= is a {type(net).__name__} with no config (no .args naming its model_type): give "
            "model=(model, tokenizer, config), config.json as a dict, as "
            "mlx_lm.load(path, return_config=True) returns"
        )
    config = dict(config)
    check_model_type(config["model_type"], "model=")
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = TokenizerWrapper(tokenizer, eos_token_ids=config.get("eos_token_id"))
    elif not isinstance(tokenizer, TokenizerWrapper):
        raise UserError(
            f"the tokenizer is a {type(tokenizer).__name__}, not a tokenizer (mlx-lm's, as mlx_lm.load "
            "returns it, or a transformers one)"
        )
    if chat_template:
        from mlx_dft.data import set_chat_template

        set_chat_template(tokenizer, chat_template)
    if not keep_quantized:
        net = dequantize_for_cpu(net, f"the {model_type(config)} model given")
    cast_model(net, dtype)
    return net, tokenizer, config


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


class _Given:
    """Stands in for a model's body while its head runs: returns the hidden states it was given,
    and reads as the body otherwise (a tied head reads ``body.embed_tokens``)."""

    def __init__(self, body: nn.Module, hidden: mx.array):
        self.body, self.hidden = body, hidden

    def __call__(self, *args, **kwargs) -> mx.array:
        return self.hidden

    def __getattr__(self, name: str):
        return getattr(self.body, name)


class Head(nn.Module):
    """The model's own output computation (projection, tied or scaled embeddings, soft-capping,
    logit scaling: whatever its ``__call__`` does after the body), applied to given hidden states.

    Runs the model's ``__call__`` with the body swapped for :class:`_Given`, so no architecture
    needs its head written out here; :func:`split_model` checks the result against ``model(x)``.
    Its children are the modules outside the body (the output projection) and the body's input
    embedding (a tied head's weights), so that full fine-tuning sees what the head trains."""

    def __init__(self, model: nn.Module, parent: nn.Module, key: str, parts: dict[str, nn.Module]):
        super().__init__()
        for k, m in parts.items():
            self[k] = m
        object.__setattr__(self, "_where", (model, parent, key))  # references, not parameters

    def __call__(self, hidden: mx.array) -> mx.array:
        model, parent, key = self._where
        shape = hidden.shape
        h3 = hidden.reshape(1, -1, shape[-1]) if hidden.ndim == 2 else hidden
        body = parent[key]
        parent[key] = _Given(body, h3)
        try:
            out = model(mx.zeros(h3.shape[:-1], dtype=mx.int32))
        finally:
            parent[key] = body
        return out.reshape(*shape[:-1], out.shape[-1])


def _identity(h: mx.array) -> mx.array:
    return h


def _locate_body(model: nn.Module) -> tuple[nn.Module, nn.Module, str] | None:
    """(body, its parent module, its key there): the module ``model.model`` names (an attribute or
    a property, as qwen3_5's ``language_model.model``) when it has ``layers`` and ``embed_tokens``."""
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module) or not isinstance(getattr(body, "layers", None), list):
        return None
    if not hasattr(body, "embed_tokens"):
        return None
    for path, module in model.named_modules():
        if module is body and path:
            parent_path, _, key = path.rpartition(".")
            parent = model
            for part in filter(None, parent_path.split(".")):
                parent = parent[part]
            return body, parent, key
    return None


def _head_parts(node: nn.Module, body: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The modules of ``node`` outside ``body`` (keys joined by ``_``), plus the body's input
    embedding: the parameters a head can use."""
    out: dict[str, nn.Module] = {}
    for key, child in node.children().items():
        if child is body:
            out[f"{prefix}embed_tokens"] = body.embed_tokens
        elif isinstance(child, nn.Module):
            if any(m is body for m in child.modules()):
                out.update(_head_parts(child, body, f"{prefix}{key}_"))
            else:
                out[f"{prefix}{key}"] = child
    return out


class Split:
    """How the loss reaches a model's logits: ``head(body(inputs))`` equals ``model(inputs)``.

    ``fast``: ``body`` yields the final hidden states, so logits are computed at supervised
    positions only, in chunks; otherwise ``body`` is the whole model and ``head`` the identity
    (full logits), and ``reason`` says why."""

    def __init__(self, body: Callable, head: nn.Module | Callable, fast: bool, reason: str = ""):
        self.body, self.head, self.fast, self.reason = body, head, fast, reason
        self.probed = False

    def __iter__(self):  # body, head, fast = split_model(model)
        return iter((self.body, self.head, self.fast))

    def describe(self) -> str:
        if self.fast:
            return "loss path: hidden states, logits at supervised positions only (checked on a probe batch)"
        return f"loss path: full logits ({self.reason})"


# A probe batch: 2 rows of this many tokens, drawn from a fixed key.
PROBE_TOKENS = 12


def _probe(model: nn.Module, body: Callable, head: Head) -> str:
    """'' when ``head(body(x))`` gives ``model(x)`` on a short random batch, at every position and
    with the positions gathered out of order (as the loss gathers them); else why not."""
    vocab = vocab_size(model)
    x = mx.random.randint(0, vocab, (2, PROBE_TOKENS), key=mx.random.key(0))
    was_training = model.training
    model.eval()
    try:
        full = model(x)
        hidden = body(x)
        if hidden.ndim != 3 or hidden.shape[:2] != x.shape:
            return f"the body gives shape {tuple(hidden.shape)}, not hidden states"
        order = mx.arange(x.size - 1, -1, -1)
        want = full.reshape(-1, full.shape[-1])[order].astype(mx.float32)
        got = head(hidden.reshape(-1, hidden.shape[-1])[order]).astype(mx.float32)
        if got.shape != want.shape:
            return f"the head gives shape {tuple(got.shape)}, the model {tuple(want.shape)}"
        scale = max(float(mx.abs(want).max()), 1e-6)
        err = float(mx.abs(got - want).max()) / scale
    except Exception as e:  # an architecture whose head does not run on given states
        return f"its head does not run apart from its body ({type(e).__name__}: {str(e)[:80]})"
    finally:
        if was_training:
            model.train()
    tol = 1e-5 if full.dtype == mx.float32 else 2e-2
    if not err <= tol:
        return f"head(body(x)) differs from model(x) by {err:.1e} of the logits' scale on a probe batch"
    return ""


def split_model(model: nn.Module, probe: bool = True) -> Split:
    """The model's :class:`Split`: its body (``model.model``, the final hidden states) and
    :class:`Head`, verified on a probe batch (``probe``; once per model), for every mlx-lm text
    architecture; the whole model and full logits where that cannot be done or verified."""
    cached = getattr(model, "_mlx_dft_split", None)
    if cached is not None and (cached.probed or not probe):
        return cached
    where = _locate_body(model)
    if where is None:
        split = Split(model, _identity, False, f"{model_type(model)} has no model.model with layers")
    else:
        body, parent, key = where
        head = Head(model, parent, key, _head_parts(model, body))
        reason = _probe(model, body, head) if probe else ""
        split = Split(model, _identity, False, reason) if reason else Split(body, head, True)
    split.probed = probe
    object.__setattr__(model, "_mlx_dft_split", split)
    return split


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


def grad_checkpoint(model: nn.Module, tiled_mlp: bool = False) -> None:
    """Recompute each block in the backward pass of the training loss (see
    :func:`mlx_dft.patches.wrapped_blocks`; no class of mlx-lm is patched); with ``tiled_mlp``
    each block's MLP runs in tiles of the sequence (:func:`mlx_dft.patches.tiled_feed_forward`)."""
    from mlx_dft.patches import set_checkpointing

    set_checkpointing(model, tiled=tiled_mlp)
