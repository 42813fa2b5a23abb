"""The Aligner (Zhou et al., arXiv 2312.05503), all of it in this folder:

- :mod:`.layer`: the MLX implementation inside mlx-lm's attention (the maths is documented there);
- :mod:`.hf`: our Hugging Face folder format, and the official ``.pth`` checkpoints;
- :mod:`.peft`: export as PEFT's adaption prompt (layer gates, where PEFT supports the model);
- :mod:`.torch_runner`: run an exported Aligner on a transformers model (PyTorch);
- here: the adapter contract (:class:`Aligner`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn

from mlx_dft.adapters.aligner import hf, peft
from mlx_dft.adapters.aligner.layer import (
    GATE_LEAF,
    GATES,
    adapted_layers,
    apply_aligner,
    attention_of,
    constant_shift,
    parameter_count,
    prefix_keys_values,
    prefix_term,
    shape_of,
    switched_off,
)
from mlx_dft.adapters.base import AdapterMethod, AdapterOff, Card
from mlx_dft.adapters.lora.peft import PEFT_CONFIG
from mlx_dft.adapters.lora.peft import usage as peft_usage
from mlx_dft.errors import UserError
from mlx_dft.files import read_json, read_safetensors
from mlx_dft.models import layers_prefix, model_type

WEIGHTS_FILE = "aligner.safetensors"
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")

__all__ = [
    "GATE_LEAF",
    "GATES",
    "attention_of",
    "METHOD",
    "WEIGHTS_FILE",
    "Aligner",
    "constant_shift",
    "parameter_count",
    "prefix_keys_values",
    "prefix_term",
    "settings",
]


class Aligner(AdapterMethod):
    """Shared prefix tokens with zero-initialised per-head (or per-layer) gates in every adapted
    layer's attention, from ``start_layer`` on."""

    name = "aligner"
    keeps_layer_inputs = False

    def trained_blocks(self, cfg, n_layers: int) -> list[int]:
        return list(range(min(cfg.aligner_start_layer, n_layers - 1), n_layers))

    def plan_terms(self, model: nn.Module, blocks: list[int], kept_blocks: int, token_bytes: float) -> dict:
        """The prefix attention's own activations, per hidden unit of each block keeping them."""
        return {"aligner_hidden": kept_blocks * token_bytes * shape_of(model)["hidden_size"]}
    weight_files = (WEIGHTS_FILE,)
    export_formats = ("hf", "peft")
    card_settings = ("aligner_tokens", "aligner_start_layer", "aligner_gate")

    def settings(self, cfg, model: nn.Module) -> dict:
        check_supported(model)
        n_layers = len(model.layers)
        if cfg.aligner_tokens < 1:
            raise UserError(f"--aligner-tokens must be at least 1, got {cfg.aligner_tokens}")
        if not 0 <= cfg.aligner_start_layer < n_layers:
            raise UserError(
                f"--aligner-start-layer {cfg.aligner_start_layer} must be below the model's {n_layers} layers"
            )
        shape, layers = shape_of(model), adapted_layers(model, cfg.aligner_start_layer)
        per_layer = shape["num_attention_heads"]
        return {
            "fine_tune_type": self.name,
            "aligner": {
                "tokens": cfg.aligner_tokens,
                "start_layer": cfg.aligner_start_layer,
                "gate": cfg.aligner_gate,
                **shape,
                "layers": layers,
                "layers_prefix": layers_prefix(model),
                "model_type": model_type(model),
                "parameters": parameter_count(
                    cfg.aligner_tokens, shape["hidden_size"], len(layers), per_layer, cfg.aligner_gate
                ),
            },
        }

    def settings_from_config(self, config: dict) -> dict:
        if "aligner" not in config:
            raise UserError("adapter_config.json has no 'aligner' section")
        return {"fine_tune_type": self.name, "aligner": dict(config["aligner"])}

    def apply(self, model: nn.Module, settings: dict) -> None:
        check_supported(model)
        apply_aligner(model, settings)

    def adapter_off(self, model: nn.Module, copy_weights: bool = False) -> AdapterOff:
        """The prefix terms skipped (as gates of 0): exactly the base model."""
        adapted = [
            i for i, block in enumerate(model.layers) if GATE_LEAF in (attention_of(block) or {})
        ]
        return AdapterOff(switched_off, first_layer=min(adapted, default=0))

    def describe(self, settings: dict) -> str:
        a = settings["aligner"]
        per = a["num_attention_heads"] if a.get("gate", "head") == "head" else 1
        layers = len(a["layers"]) if "layers" in a else a["num_hidden_layers"] - a["start_layer"]
        gates = f"{per} gate{'s' if per > 1 else ''}"
        return f" = {a['tokens']} tokens x {a['hidden_size']} + {layers} layers x {gates}"

    def check_fusable(self) -> None:
        raise UserError(
            "an Aligner cannot be merged into the base weights: its prefix attention is not a weight "
            "change. Export it with `mlx_dft export` and load it with mlx_dft.torch_aligner instead"
        )

    def export(self, adapter_dir: Path, config: dict, out: Path, fmt: str, base_model: str | None) -> None:
        tensors = read_safetensors(adapter_dir / WEIGHTS_FILE)
        if fmt == "peft":
            peft.export_adaption_prompt(config, tensors, out, base_model)
        else:
            hf.export_hf(config, tensors, out, base_model)

    def read_foreign(self, path: Path, model: str | None) -> dict | None:
        if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
            return hf.import_official(path, model)
        if path.is_dir() and hf.is_hf_aligner(path):
            return hf.import_hf(path)
        return None

    def card(self, folder: Path, repo_id: str) -> Card | None:
        if hf.is_hf_aligner(folder):
            base = read_json(folder / hf.HF_CONFIG).get("base_model_name_or_path")
            usage = [
                "```python",
                "from transformers import AutoModelForCausalLM",
                "from mlx_dft.torch_aligner import attach_aligner",
                "",
                f'model = AutoModelForCausalLM.from_pretrained("{base}")',
                f'attach_aligner(model, "{repo_id}")',
                "```",
                "",
                "With MLX: `mlx_dft generate --adapter-path " + repo_id + " --prompt ...`.",
            ]
            return Card("aligner", "An Aligner adapter", "mlx_dft", ["aligner"], base, usage)
        if (folder / PEFT_CONFIG).is_file():
            cfg = read_json(folder / PEFT_CONFIG)
            if cfg.get("peft_type") == "ADAPTION_PROMPT":
                base = cfg.get("base_model_name_or_path")
                return Card(
                    "aligner-adaption-prompt",
                    "An Aligner (as a PEFT adaption prompt)",
                    "peft",
                    ["aligner", "adaption-prompt"],
                    base,
                    peft_usage(base, repo_id),
                )
        return None


def check_supported(model: nn.Module) -> None:
    """Refuse a model the Aligner cannot adapt, in one line naming the feature, the model type and
    why (:mod:`mlx_dft.support`, which asks :func:`.layer.refusal`)."""
    from mlx_dft import support

    support.require("aligner", model)


METHOD = Aligner()
settings = METHOD.settings  # module-level spelling, as `aligner.settings(cfg, model)`
