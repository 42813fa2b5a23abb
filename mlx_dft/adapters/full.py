"""Full fine-tuning of the last ``num_layers`` blocks, saved as mlx-lm does
(``fine_tune_type: full``; the blocks' weights in ``adapters.safetensors``)."""

from __future__ import annotations

import mlx.nn as nn

from mlx_dft.adapters.base import AdapterMethod
from mlx_dft.errors import UserError
from mlx_dft.models import is_quantized, last_layers


class Full(AdapterMethod):
    """Every weight of the last ``num_layers`` blocks is trained."""

    name = "full"
    card_settings = ("num_layers",)

    def settings(self, cfg, model: nn.Module) -> dict:
        n = len(last_layers(len(model.layers), cfg.num_layers))
        return {"fine_tune_type": self.name, "num_layers": n}

    def settings_from_config(self, config: dict) -> dict:
        return {"fine_tune_type": self.name, "num_layers": int(config.get("num_layers", -1))}

    def apply(self, model: nn.Module, settings: dict) -> None:
        if is_quantized(model):
            raise UserError(
                "--adapter full cannot train a quantized model (its weights are packed integers); "
                "use --adapter lora or dora (QLoRA), or a non-quantized model"
            )
        model.freeze()
        for i in last_layers(len(model.layers), settings["num_layers"]):
            model.layers[i].unfreeze()

    def check_fusable(self) -> None:
        """Always: the trained blocks' weights are the model's own, nothing to merge."""

    def fuse(self, model: nn.Module, dequantize: bool) -> None:
        """Nothing to merge: the trained blocks' weights are the model's own."""

    def export(self, adapter_dir, config: dict, out, fmt: str, base_model: str | None) -> None:
        raise UserError("a full fine-tune is not an adapter: use `mlx_dft fuse` to write the whole model")
