"""Adapters: what is trained. One module per method, each with the same three functions:

- ``settings(cfg) -> dict``: the method's part of ``adapter_config.json`` (mlx-lm's keys where
  mlx-lm has the concept, so stock ``mlx_lm generate --adapter-path`` and ``mlx_lm fuse`` load it);
- ``apply(model, settings)``: freeze the base model and add/unfreeze the trainable parameters;
- optionally ``weights(model) -> {file name: tensors}`` and ``weight_files()``; by default
  the trainable parameters go to ``adapters.safetensors``.

``load_adapter`` reads a folder back onto a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dft.adapters import aligner, full, lora
from mlx_dft.errors import UserError

METHODS = {"lora": lora, "dora": lora, "full": full, "aligner": aligner}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"


def method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown adapter {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def apply_adapter(model: nn.Module, name: str, settings: dict) -> None:
    method(name).apply(model, settings)


def adapter_weights(model: nn.Module, name: str) -> dict[str, dict[str, mx.array]]:
    m = method(name)
    if hasattr(m, "weights"):
        return m.weights(model)
    return {WEIGHTS_FILE: dict(tree_flatten(model.trainable_parameters()))}


def weight_files(name: str) -> list[str]:
    m = method(name)
    return m.weight_files() if hasattr(m, "weight_files") else [WEIGHTS_FILE]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights counted as their logical size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
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
    return trainable, total


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an adapter folder: it has no {CONFIG_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg})") from None


def load_weights_file(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise UserError(f"adapter weights not found: {path}")
    try:
        return mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None


def set_weights(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Load ``weights`` into the model's trainable parameters, refusing any mismatch by name."""
    params = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name not in params:
            raise UserError(f"{source}: tensor {name} is not a parameter of this adapter on this model")
        if tuple(w.shape) != tuple(params[name].shape):
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(w.shape)}, the model expects "
                f"{tuple(params[name].shape)} (adapter made for another model?)"
            )
    missing = sorted(set(params) - set(weights))
    if missing:
        raise UserError(f"{source}: missing {len(missing)} adapter tensors, e.g. {missing[0]}")
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)


def load_adapter(model: nn.Module, folder: str | Path, weights_dir: str | Path | None = None) -> dict:
    """Apply the adapter described by ``folder/adapter_config.json`` and load its weights
    (from ``weights_dir`` if given, e.g. a checkpoint). Returns the config."""
    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    name = config.get("adapter") or config.get("fine_tune_type", "lora")
    m = method(name)
    m.apply(model, m.settings_from_config(config))
    src = Path(weights_dir) if weights_dir else folder
    for fname in weight_files(name):
        set_weights(model, load_weights_file(src / fname), str(src / fname))
    return config
