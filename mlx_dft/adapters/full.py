"""Full fine-tuning of the last ``num_layers`` blocks, saved as mlx-lm does
(``fine_tune_type: full``; the blocks' weights in ``adapters.safetensors``)."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dft.adapters.base import REFERENCE_COPY, AdapterMethod, AdapterOff
from mlx_dft.errors import UserError
from mlx_dft.models import last_layers, was_quantized


class Full(AdapterMethod):
    """Every weight of the last ``num_layers`` blocks is trained."""

    name = "full"
    card_settings = ("num_layers",)
    trains_base_weights = True

    def settings(self, cfg, model: nn.Module) -> dict:
        n = len(last_layers(len(model.layers), cfg.num_layers))
        return {"fine_tune_type": self.name, "num_layers": n}

    def settings_from_config(self, config: dict) -> dict:
        return {"fine_tune_type": self.name, "num_layers": int(config.get("num_layers", -1))}

    def apply(self, model: nn.Module, settings: dict) -> None:
        if was_quantized(model):
            raise UserError(
                "--fine-tune-type full cannot train a quantized model (its weights are packed integers, "
                "and weights trained on its float32 copy would not load on it); "
                "use --fine-tune-type lora or dora (QLoRA), or a non-quantized model"
            )
        model.freeze()
        for i in last_layers(len(model.layers), settings["num_layers"]):
            model.layers[i].unfreeze()

    def adapter_off(self, model: nn.Module, copy_weights: bool = False) -> AdapterOff:
        """The trained blocks' initial weights swapped in. They are the only reference, so this
        keeps them (``copy_weights``): training replaces the blocks' arrays rather than writing
        into them, so holding the current ones is the copy, and it doubles the blocks' memory."""
        if not copy_weights:
            raise UserError(
                "a loss with a reference model (asft, prift) under --fine-tune-type full needs "
                "--reference-copy: the reference is a frozen copy of the trained blocks' initial weights, "
                "which doubles their memory"
            )
        trained = [i for i, b in enumerate(model.layers) if tree_flatten(b.trainable_parameters())]
        blocks = [model.layers[i] for i in trained]
        initial = [b.parameters() for b in blocks]
        mx.eval(initial)
        # --shard fsdp shards the copy as it shards the blocks (mlx_dft.sharding), in this list.
        object.__setattr__(model, REFERENCE_COPY, initial)

        @contextmanager
        def off():
            current = [b.parameters() for b in blocks]
            for b, p in zip(blocks, initial):
                b.update(p)
            try:
                yield
            finally:
                for b, p in zip(blocks, current):
                    b.update(p)

        return AdapterOff(off, initial, first_layer=min(trained, default=0))

    def check_fusable(self) -> None:
        """Always: the trained blocks' weights are the model's own, nothing to merge."""

    def fuse(self, model: nn.Module, dequantize: bool) -> None:
        """Nothing to merge: the trained blocks' weights are the model's own."""

    def export(self, adapter_dir, config: dict, out, fmt: str, base_model: str | None) -> None:
        raise UserError("a full fine-tune is not an adapter: use `mlx_dft fuse` to write the whole model")
