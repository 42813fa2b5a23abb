"""LoRA and DoRA through mlx-lm's own layers (``LoRALinear``, ``DoRALinear``).

Folders are written the way ``mlx_lm lora`` writes them (``adapters.safetensors`` with
``...lora_a``/``lora_b``/``m`` tensors, and ``fine_tune_type``/``num_layers``/
``lora_parameters`` in the config), so stock mlx-lm can generate with and fuse them.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_dft.errors import UserError

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def block_linear_paths(model: nn.Module, layer_index: int = -1) -> list[str]:
    """Paths (relative to a block) of the linear layers of one transformer block."""
    block = model.layers[layer_index]
    return sorted(p for p, m in block.named_modules() if isinstance(m, LINEAR_TYPES) or hasattr(m, "to_lora"))


def resolve_keys(model: nn.Module, keys: list[str] | None) -> list[str]:
    """Full block-relative paths for ``keys`` given as paths or short names (``q_proj``)."""
    available = block_linear_paths(model)
    if not keys:
        return available
    out = []
    for k in keys:
        matches = [p for p in available if p == k or p.endswith("." + k)]
        if not matches:
            raise UserError(
                f"--lora-keys: no linear module '{k}' in the model's blocks; available: "
                + ", ".join(available)
            )
        out.extend(m for m in matches if m not in out)
    return out


def num_adapted_layers(model: nn.Module, num_layers: int) -> int:
    n = len(model.layers)
    return n if num_layers == -1 or num_layers > n else num_layers


def settings(cfg, model: nn.Module) -> dict:
    scale = cfg.lora_scale if cfg.lora_alpha is None else cfg.lora_alpha / cfg.lora_rank
    return {
        "fine_tune_type": cfg.adapter,
        "num_layers": num_adapted_layers(model, cfg.num_layers),
        "lora_parameters": {
            "rank": cfg.lora_rank,
            "scale": float(scale),
            "dropout": cfg.lora_dropout,
            "keys": resolve_keys(model, cfg.lora_keys),
        },
    }


def settings_from_config(config: dict) -> dict:
    try:
        return {
            "fine_tune_type": config.get("fine_tune_type", "lora"),
            "num_layers": int(config["num_layers"]),
            "lora_parameters": dict(config["lora_parameters"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"adapter_config.json lacks LoRA settings ({e})") from None


def apply(model: nn.Module, s: dict) -> None:
    model.freeze()
    params = s["lora_parameters"]
    try:
        linear_to_lora_layers(model, s["num_layers"], params, use_dora=s["fine_tune_type"] == "dora")
    except ValueError as e:
        raise UserError(f"cannot apply {s['fine_tune_type']} to this model: {e}") from None
    if not any(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(model.trainable_parameters())):
        raise UserError(f"{s['fine_tune_type']}: no module matched keys {params.get('keys')}")
