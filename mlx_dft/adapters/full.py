"""Full fine-tuning of the last ``num_layers`` blocks, saved as mlx-lm does
(``fine_tune_type: full``; the blocks' weights in ``adapters.safetensors``)."""

from __future__ import annotations

import mlx.nn as nn

from mlx_dft.errors import UserError
from mlx_dft.models import is_quantized


def settings(cfg, model: nn.Module) -> dict:
    n = len(model.layers)
    return {
        "fine_tune_type": "full",
        "num_layers": n if cfg.num_layers == -1 or cfg.num_layers > n else cfg.num_layers,
    }


def settings_from_config(config: dict) -> dict:
    return {"fine_tune_type": "full", "num_layers": int(config.get("num_layers", -1))}


def apply(model: nn.Module, s: dict) -> None:
    if is_quantized(model):
        raise UserError(
            "--adapter full cannot train a quantized model (its weights are packed integers); "
            "use --adapter lora or dora (QLoRA), or a non-quantized model"
        )
    model.freeze()
    n = s["num_layers"]
    for layer in model.layers[-n:] if n > 0 else model.layers:
        layer.unfreeze()
