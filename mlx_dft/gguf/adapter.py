"""A LoRA adapter as llama.cpp's LoRA GGUF (``llama-cli --lora FILE``, ``llama-server --lora``).

    mlx (y = x W^T + scale * (x A) B)            llama.cpp (y = x W^T + alpha / r * x a^T b^T)
    model.layers.3.self_attn.q_proj.lora_a (in, r)   blk.3.attn_q.weight.lora_a = A^T  (r, in)
    ...lora_b (r, out)                               blk.3.attn_q.weight.lora_b = B^T  (out, r)
    scale                                            adapter.lora.alpha = scale * r

Names are the model writer's (:func:`mlx_dft.gguf.names.to_gguf_name`, for every architecture of
:data:`mlx_dft.gguf.archs.ARCHS`). The rows of ``lora_b`` (the output rows of q/k projections) are
reordered where the architecture reorders the base model's own q/k rows
(:func:`mlx_dft.gguf.names.to_gguf_rows`), and so are qwen3_5's value heads (the rows of
``lora_b``, the columns of ``lora_a`` for ``out_proj``: :func:`mlx_dft.gguf.names.gguf_order`).
Fused layers (phi3's ``qkv_proj``, ``gate_up_proj``) are one matrix to llama.cpp too; stacked
experts keep mlx-lm's (experts, r, in) / (experts, out, r)
tensors, which llama.cpp multiplies per token by its selected experts' slices. llama.cpp has one
alpha per file and divides it by each tensor's rank; a module whose scale or rank differs from
the adapter's (an import from PEFT's rank/alpha patterns) has the difference folded into its
``lora_b``, so every module computes exactly its own ``scale * (x A) B``. Tensors are F32.

DoRA's magnitude vector has no llama.cpp form: such adapters are refused (their method refuses
before this module is reached; a stray ``.m`` tensor is refused here too).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dft.errors import UserError
from mlx_dft.files import read_json, read_safetensors, staged_folder
from mlx_dft.gguf.archs import ARCHS, arch_of
from mlx_dft.gguf.names import gguf_order, reordered_heads, to_gguf_name, to_gguf_rows
from mlx_dft.gguf.writer import GGUFWriter

FILE = "adapter.gguf"


def _model_config(config: dict, base_model: str | None) -> dict:
    """The base model's config.json values the export needs: the run's recorded signature, else
    the base model's own config.json."""
    signature = config.get("model_signature") or {}
    entry = ARCHS.get(signature.get("model_type"))
    if {"model_type", "num_attention_heads", *(entry.order_keys if entry else ())} <= set(signature):
        return signature
    from mlx_dft.models import resolve_model_path, text_config

    base = base_model or config.get("base_model")
    if not base:
        raise UserError(
            "the adapter names no base model (needed for the GGUF architecture); pass --base-model"
        )
    return text_config(read_json(resolve_model_path(str(base)) / "config.json"))


def lora_tensors(weights: dict[str, mx.array], params: dict, model_config: dict) -> tuple[float, dict]:
    """(alpha, {gguf name: float32 array}) of an mlx LoRA adapter's tensors."""
    rank, scale = int(params["rank"]), float(params["scale"])
    ranks, scales = params.get("module_ranks") or {}, params.get("module_scales") or {}
    alpha = scale * rank
    modules: dict[str, dict[str, mx.array]] = {}
    for name, w in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "m":
            raise UserError(f"tensor {name} is a DoRA magnitude, which llama.cpp's LoRA format cannot hold")
        if leaf not in ("lora_a", "lora_b"):
            raise UserError(f"unexpected adapter tensor {name}")
        modules.setdefault(module, {})[leaf] = w
    out = {}
    for module, parts in sorted(modules.items()):
        target = to_gguf_name(module + ".weight", str(model_config.get("model_type")))
        if target is None or "lora_a" not in parts or "lora_b" not in parts:
            raise UserError(
                f"LoRA on {module} has no llama.cpp form (not a block linear layer, or A/B missing)"
            )
        a, b = _pair(parts["lora_a"], parts["lora_b"])
        r = a.shape[-2]
        _check_fits(module, a.shape, b.shape, model_config)
        if r != int(ranks.get(module, rank)):
            raise UserError(
                f"{module}: lora_a has rank {r}, the adapter config says {ranks.get(module, rank)}"
            )
        llama_scale = alpha / r if alpha else 1.0  # llama.cpp: alpha 0 means "no alpha", scale 1
        factor = float(scales.get(module, scale)) / llama_scale
        if factor != 1.0:
            b = b * np.float32(factor)
        heads = reordered_heads(module + ".weight", model_config)
        if heads is not None:
            b = to_gguf_rows(b, heads)
        rows, cols = gguf_order(module + ".weight", model_config)  # (qwen3_5's value heads)
        if rows is not None:
            b = b[..., rows, :]
        if cols is not None:
            a = a[..., cols]
        out[target + ".lora_a"] = np.ascontiguousarray(a)
        out[target + ".lora_b"] = np.ascontiguousarray(b)
    if not out:
        raise UserError("the adapter has no LoRA tensors")
    return alpha, out


def _pair(lora_a: mx.array, lora_b: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) as llama.cpp holds them: a linear layer's (r, in) and (out, r); stacked experts'
    (experts, r, in) and (experts, out, r), mlx-lm's own layout (llama.cpp multiplies each token
    by its experts' slices of both)."""
    a, b = (np.asarray(t.astype(mx.float32)) for t in (lora_a, lora_b))
    if a.ndim == 3 and b.ndim == 3:
        return a, b
    return a.T, b.T


def _check_fits(module: str, a_shape: tuple, b_shape: tuple, cfg: dict) -> None:
    """Refuse LoRA tensors that cannot belong to the model (llama.cpp would reject the file, or
    apply it to the wrong rows): A is (rank, in), B (out, rank) (experts: (experts, rank, in) and
    (experts, out, rank), as many of both), the block exists, and the sides the config fixes are
    the config's (hidden and intermediate sizes; whole heads)."""
    experts = len(a_shape) == len(b_shape) == 3 and a_shape[0] == b_shape[0]
    if not (len(a_shape) == len(b_shape) == 2 or experts) or b_shape[-1] != a_shape[-2]:
        pair = f"lora_a {tuple(a_shape)} and lora_b {tuple(b_shape)}"
        raise UserError(f"{module}: {pair} do not make a LoRA pair")
    out_f, in_f = b_shape[-2], a_shape[-1]
    block = re.search(r"layers\.(\d+)\.", module)
    layers = cfg.get("num_hidden_layers")
    if block and isinstance(layers, int) and int(block.group(1)) >= layers:
        raise UserError(f"{module}: the model has {layers} blocks")
    m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", module)
    if m is None or experts:
        return  # to_gguf_name already refused what has no llama.cpp name
    hidden, inter = cfg.get("hidden_size"), _mlp_width(cfg, int(m.group(1)), in_f, out_f, m.group(2))
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    expect_in = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "gate_proj": hidden, "up_proj": hidden,
                 "down_proj": inter}.get(m.group(2))  # fmt: skip
    expect_out = {"o_proj": hidden, "down_proj": hidden, "gate_proj": inter, "up_proj": inter}.get(m.group(2))
    per_head = {"q_proj": heads, "k_proj": kv, "v_proj": kv}.get(m.group(2))
    if m.group(2) == "o_proj" and isinstance(heads, int) and heads > 0 and in_f % heads:
        raise UserError(f"{module}: lora_a reads {in_f} features, not whole heads of the model's {heads}")
    if isinstance(expect_in, int) and in_f != expect_in:
        raise UserError(f"{module}: lora_a reads {in_f} features, the model's layer {expect_in}")
    if isinstance(expect_out, int) and out_f != expect_out:
        raise UserError(f"{module}: lora_b writes {out_f} features, the model's layer {expect_out}")
    if isinstance(per_head, int) and per_head > 0 and out_f % per_head:
        raise UserError(f"{module}: lora_b writes {out_f} features, not whole heads ({per_head} in all)")


def _mlp_width(cfg: dict, block: int, in_f: int, out_f: int, name: str):
    """The intermediate size of block ``block``'s MLP. gemma4's double-wide MLP is twice as wide in
    its shared-KV layers; a run's recorded signature does not say whether a model has one, and
    then either width fits (llama.cpp's loader checks the shapes against the base model's)."""
    inter = cfg.get("intermediate_size")
    if cfg.get("model_type") != "gemma4_text" or not isinstance(inter, int):
        return inter
    layers, shared = cfg.get("num_hidden_layers"), cfg.get("num_kv_shared_layers")
    if "use_double_wide_mlp" not in cfg or not isinstance(shared, int) or not isinstance(layers, int):
        side = in_f if name == "down_proj" else out_f
        return side if side in (inter, 2 * inter) else inter
    return 2 * inter if cfg["use_double_wide_mlp"] and block >= layers - shared > 0 else inter


def export_lora_gguf(adapter_dir: Path, config: dict, out: Path, base_model: str | None = None) -> Path:
    """Write ``out/adapter.gguf`` from an mlx_dft (or mlx-lm) LoRA folder."""
    adapter_dir = Path(adapter_dir)
    model_config = _model_config(config, base_model)
    model_type = str(model_config.get("model_type"))
    # every model type GGUF covers: llama.cpp applies their LoRA files as mlx computes them
    # (tests/test_gguf_export.py for llama, tests/test_gguf_archs.py for the others)
    arch = arch_of(model_type, "GGUF LoRA export").gguf
    weights = read_safetensors(adapter_dir / "adapters.safetensors")
    alpha, tensors = lora_tensors(weights, config["lora_parameters"], model_config)
    writer = GGUFWriter()
    writer.add_string("general.architecture", arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", adapter_dir.resolve().name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, array in tensors.items():
        writer.add_tensor(name, array.shape, "F32", lambda array=array: array)
    with staged_folder(out) as stage:
        writer.write(stage / FILE)
    return out
