"""Adapters: what is trained. One :class:`~mlx_dft.adapters.base.AdapterMethod` per method:

- ``lora``, ``dora``: :mod:`mlx_dft.adapters.lora` (mlx-lm's layers; PEFT format in ``lora/peft.py``)
- ``full``: :mod:`mlx_dft.adapters.full`
- ``aligner``: :mod:`mlx_dft.adapters.aligner` (MLX layer, HF format, PEFT export, PyTorch runner)

An adapter folder is ``adapter_config.json`` (the method's settings, plus the run's) and the
method's ``weight_files``; this module reads such folders back onto a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dft.adapters import aligner
from mlx_dft.adapters.base import WEIGHTS_FILE, AdapterMethod, Card
from mlx_dft.adapters.full import Full
from mlx_dft.adapters.lora import DoRA, LoRA
from mlx_dft.errors import UserError
from mlx_dft.models import logical_parameters

METHODS: dict[str, AdapterMethod] = {
    "lora": LoRA(),
    "dora": DoRA(),
    "full": Full(),
    "aligner": aligner.METHOD,
}
CONFIG_FILE = "adapter_config.json"

__all__ = [
    "CONFIG_FILE",
    "METHODS",
    "WEIGHTS_FILE",
    "AdapterMethod",
    "Card",
    "adopt_source",
    "apply_adapter",
    "apply_saved",
    "count_parameters",
    "load_adapter",
    "load_weights",
    "method",
    "method_of",
    "read_adapter_config",
    "read_weights",
    "summary",
]


def method(name: str) -> AdapterMethod:
    if name not in METHODS:
        raise UserError(f"unknown adapter {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(config: dict) -> AdapterMethod:
    """The method of a saved ``adapter_config.json`` (mlx-lm's folders say ``fine_tune_type``)."""
    return method(config.get("adapter") or config.get("fine_tune_type") or "lora")


def adopt_source(cfg, source: dict, asked: str | None) -> None:
    """Training from an existing adapter (``--adapter-from``): its method is the run's (``asked``,
    the method the user named, must agree), and its base model the run's unless one was given."""
    kind = method_of(source).name
    if asked is not None and asked != kind:
        raise UserError(f"--adapter-from {cfg.adapter_from} holds a {kind} adapter, not {asked}")
    cfg.adapter = kind
    if cfg.model is None and source.get("base_model"):
        cfg.model = source["base_model"]


def apply_adapter(model: nn.Module, name: str, settings: dict) -> None:
    method(name).apply(model, settings)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights counted as their logical size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, logical_parameters(model)


def summary(model: nn.Module, m: AdapterMethod, settings: dict) -> str:
    """``lora trains 73,728 (2.2%)``: what the applied adapter trains, out of the model's total."""
    trainable, total = count_parameters(model)
    return (
        f"{total:,} parameters; {m.name} trains {trainable:,}{m.describe(settings)} "
        f"({100 * trainable / max(total, 1):.3f}%)"
    )


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


def read_weights(m: AdapterMethod, folder: Path) -> dict[str, dict[str, mx.array]]:
    """{file name: tensors} of the method's weight files in ``folder``."""
    out = {}
    for fname in m.weight_files:
        path = Path(folder) / fname
        if not path.is_file():
            raise UserError(f"adapter weights not found: {path}")
        try:
            out[fname] = mx.load(str(path))
        except Exception as e:
            raise UserError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    return out


def load_weights(model: nn.Module, files: dict[str, dict[str, mx.array]], source: str | Path) -> None:
    """Load every file's tensors into the model's trainable parameters, refusing any mismatch."""
    params = dict(tree_flatten(model.trainable_parameters()))
    for fname, weights in files.items():
        where = f"{source}/{fname}"
        for name, w in weights.items():
            if name not in params:
                raise UserError(f"{where}: tensor {name} is not a parameter of this adapter on this model")
            if tuple(w.shape) != tuple(params[name].shape):
                raise UserError(
                    f"{where}: tensor {name} has shape {tuple(w.shape)}, the model expects "
                    f"{tuple(params[name].shape)} (adapter made for another model?)"
                )
        missing = sorted(set(params) - set(weights))
        if missing:
            raise UserError(f"{where}: missing {len(missing)} adapter tensors, e.g. {missing[0]}")
        model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)


def apply_saved(model: nn.Module, config: dict, files: dict[str, dict[str, mx.array]], source: str) -> None:
    """Apply the adapter a saved config describes and load its tensors ({file name: tensors})."""
    m = method_of(config)
    m.apply(model, m.settings_from_config(config))
    load_weights(model, files, source)


def load_adapter(model: nn.Module, folder: str | Path, weights_dir: str | Path | None = None) -> dict:
    """Apply the adapter described by ``folder/adapter_config.json`` and load its weights
    (from ``weights_dir`` if given, e.g. a checkpoint). Returns the config."""
    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    src = Path(weights_dir) if weights_dir else folder
    apply_saved(model, config, read_weights(method_of(config), src), str(src))
    return config
