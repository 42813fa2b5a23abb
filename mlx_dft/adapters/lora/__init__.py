"""LoRA and DoRA through mlx-lm's own layers (``LoRALinear``, ``DoRALinear``).

Folders are written the way ``mlx_lm lora`` writes them (``adapters.safetensors`` with
``...lora_a``/``lora_b``/``m`` tensors, and ``fine_tune_type``/``num_layers``/
``lora_parameters`` in the config), so stock mlx-lm can generate with and fuse them. They
export to and import from Hugging Face PEFT (:mod:`.peft`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_dft.adapters.base import AdapterMethod, AdapterOff, Card
from mlx_dft.adapters.lora import peft
from mlx_dft.errors import UserError
from mlx_dft.models import (
    LINEAR_TYPES,
    block_linear_paths,
    expert_types,
    is_adaptable,
    last_layers,
    layers_prefix,
)


def resolve_keys(model: nn.Module, keys: list[str] | None) -> list[str]:
    """Full block-relative paths for ``keys`` given as paths or short names (``q_proj``),
    matched over every block; the default is every adaptable layer but expert routers."""
    if not keys:
        return block_linear_paths(model)
    available = block_linear_paths(model, with_routers=True)
    out = []
    for k in keys:
        matches = [p for p in available if p == k or p.endswith("." + k)]
        if not matches:
            raise UserError(
                f"--lora-keys: no adaptable layer '{k}' in any of the model's blocks; available: "
                + ", ".join(available)
            )
        out.extend(m for m in matches if m not in out)
    return out


def expert_paths(model: nn.Module) -> set[str]:
    """Block-relative paths of the mixture-of-experts layers of any block."""
    return {p for b in model.layers for p, m in b.named_modules() if isinstance(m, expert_types())}


def adapted_layers(model: nn.Module, s: dict) -> list[int]:
    """Indices of the adapted blocks: ``lora_parameters.layers`` when given (an mlx_dft
    extension, for adapters imported from PEFT's ``layers_to_transform``), else the last
    ``num_layers`` blocks as mlx-lm does."""
    n = len(model.layers)
    explicit = s["lora_parameters"].get("layers")
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= int(i) < n]
        if bad:
            raise UserError(f"adapter layers {bad} do not exist in this {n}-layer model")
        return sorted(int(i) for i in explicit)
    return last_layers(n, s["num_layers"])


def _lora_classes() -> tuple[type, ...]:
    """mlx-lm's adapter layers: LoRA and DoRA on linear layers, LoRA on expert layers."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    return (LoRALinear, DoRALinear, LoRASwitchLinear)


def apply_lora(model: nn.Module, s: dict) -> None:
    """Replace the selected layers by mlx-lm's LoRALinear/DoRALinear (LoRASwitchLinear on the
    experts of a mixture-of-experts block, as mlx-lm does; DoRA has none there).

    ``lora_parameters`` holds mlx-lm's rank/scale/dropout/keys, and optionally (mlx_dft
    extensions, from PEFT imports) ``layers`` and per-module ``module_ranks`` /
    ``module_scales`` keyed by full module name (``model.layers.3.self_attn.q_proj``).
    """
    # mlx-lm is imported here, not at module level: importing mlx_lm imports transformers (and
    # torch where installed), which `mlx_dft --help` and the PyTorch Aligner runner need not pay for.
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    model.freeze()
    p = s["lora_parameters"]
    dora = s["fine_tune_type"] == "dora"
    keys = p.get("keys") or block_linear_paths(model)
    ranks, scales = p.get("module_ranks") or {}, p.get("module_scales") or {}
    count = 0
    prefix = layers_prefix(model)
    for i in adapted_layers(model, s):
        block = model.layers[i]
        updates = []
        for path, module in block.named_modules():
            if path not in keys:
                continue
            if not is_adaptable(module):
                raise UserError(
                    f"cannot apply {s['fine_tune_type']} to {path} ({type(module).__name__}): only linear "
                    "and expert layers are supported"
                )
            if isinstance(module, expert_types()):
                if dora:
                    raise UserError(
                        f"dora cannot adapt {path}: it is a mixture-of-experts layer "
                        f"({type(module).__name__}), which mlx-lm's DoRA does not support; use "
                        "--fine-tune-type lora, or --lora-keys without the expert layers"
                    )
                cls = LoRASwitchLinear
            elif isinstance(module, LINEAR_TYPES):
                cls = DoRALinear if dora else LoRALinear
            else:
                raise UserError(
                    f"cannot apply {s['fine_tune_type']} to {path} ({type(module).__name__}): mlx_dft adapts "
                    "linear and expert layers only"
                )
            full = f"{prefix}.{i}.{path}"
            updates.append(
                (
                    path,
                    cls.from_base(
                        module,
                        r=int(ranks.get(full, p["rank"])),
                        dropout=float(p.get("dropout", 0.0)),
                        scale=float(scales.get(full, p["scale"])),
                    ),
                )
            )
        if updates:
            block.update_modules(tree_unflatten(updates))
            count += len(updates)
    if count == 0:
        raise UserError(f"{s['fine_tune_type']}: no module matched keys {keys}")


@contextmanager
def base_linears(model: nn.Module):
    """Inside: every LoRA/DoRA layer of ``model`` is replaced by its base layer (``.linear``)."""
    classes = _lora_classes()
    sites = [
        (parent, key, child)
        for parent in model.modules()
        for key, child in parent.items()
        if isinstance(child, classes)
    ]
    for parent, key, child in sites:
        parent[key] = child.linear
    try:
        yield
    finally:
        for parent, key, child in sites:
            parent[key] = child


class LoRA(AdapterMethod):
    """Low-rank updates ``scale * (x A) B`` on the linear layers of the last ``num_layers`` blocks."""

    name = "lora"
    export_formats = ("peft", "gguf")
    card_settings = ("num_layers", "lora_rank", "lora_scale")

    def settings(self, cfg, model: nn.Module) -> dict:
        scale = cfg.lora_scale if cfg.lora_alpha is None else cfg.lora_alpha / cfg.lora_rank
        keys = resolve_keys(model, cfg.lora_keys)
        if self.name == "dora" and not cfg.lora_keys:
            experts = expert_paths(model)
            if experts:
                keys = [k for k in keys if k not in experts]
                print(
                    f"note: dora leaves the expert layers ({', '.join(sorted(experts))}) frozen: mlx-lm's "
                    "DoRA has no expert (SwitchLinear) form; --fine-tune-type lora adapts them",
                    file=sys.stderr,
                )
        return {
            "fine_tune_type": self.name,
            "num_layers": len(last_layers(len(model.layers), cfg.num_layers)),
            "lora_parameters": {
                "rank": cfg.lora_rank,
                "scale": float(scale),
                "dropout": cfg.lora_dropout,
                "keys": keys,
            },
        }

    def settings_from_config(self, config: dict) -> dict:
        try:
            return {
                "fine_tune_type": self.name,
                "num_layers": int(config["num_layers"]),
                "lora_parameters": dict(config["lora_parameters"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"adapter_config.json lacks LoRA settings ({e})") from None

    def apply(self, model: nn.Module, settings: dict) -> None:
        apply_lora(model, settings)

    def adapter_off(self, model: nn.Module, copy_weights: bool = False) -> AdapterOff:
        """Each LoRA/DoRA layer replaced by the frozen base linear it wraps (quantized for QLoRA):
        exactly the base model, also for DoRA once its magnitude has trained (m W/|W| != W)."""
        classes = _lora_classes()
        adapted = [
            i for i, block in enumerate(model.layers) if any(isinstance(m, classes) for m in block.modules())
        ]
        return AdapterOff(lambda: base_linears(model), first_layer=min(adapted, default=0))

    def check_fusable(self) -> None:
        """LoRA/DoRA merge exactly (mlx-lm's ``fuse``)."""

    def fuse(self, model: nn.Module, dequantize: bool) -> None:
        fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
        if fused:
            model.update_modules(tree_unflatten(fused))

    def export(self, adapter_dir, config: dict, out, fmt: str, base_model: str | None) -> None:
        if fmt == "gguf":
            from mlx_dft.gguf.adapter import export_lora_gguf

            export_lora_gguf(adapter_dir, config, out, base_model)
        else:
            peft.export_lora(adapter_dir, config, out, base_model)

    def read_foreign(self, path, model: str | None) -> dict | None:
        return peft.import_folder(path, model) if peft.is_peft_folder(path) else None

    def card(self, folder, repo_id: str) -> Card | None:
        cfg = peft.lora_config(folder)
        if cfg is None or bool(cfg.get("use_dora")) != (self.name == "dora"):
            return None
        base = cfg.get("base_model_name_or_path")
        what = "A DoRA adapter" if self.name == "dora" else "A LoRA adapter"
        tags = ["lora", "dora"] if self.name == "dora" else ["lora"]
        return Card(self.name, what, "peft", tags, base, peft.usage(base, repo_id))


class DoRA(LoRA):
    """LoRA with a learned per-output magnitude (weight-decomposed LoRA)."""

    name = "dora"

    def plan_terms(self, model: nn.Module, blocks: list[int], kept_blocks: int, token_bytes: float) -> dict:
        """Every adapted linear's W + scale B A exists in float32 for its norm, in each trained block."""
        linears = (m for i in blocks for _, m in model.layers[i].named_modules() if hasattr(m, "lora_a"))
        return {"dora_weights": 4.0 * sum(m.linear.weight.size for m in linears)}

    def export(self, adapter_dir, config: dict, out, fmt: str, base_model: str | None) -> None:
        if fmt == "gguf":  # llama.cpp's LoRA adds b a; DoRA rescales every row of W + b a
            raise UserError(
                "a DoRA adapter has no llama.cpp LoRA (GGUF) form: its magnitude vector rescales the "
                "whole weight; merge it instead: `mlx_dft fuse ADAPTER --out DIR --gguf`"
            )
        super().export(adapter_dir, config, out, fmt, base_model)
