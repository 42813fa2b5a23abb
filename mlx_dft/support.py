"""Which model types each feature supports, and why not: each feature answers for itself.

A feature's check takes the model (an mlx-lm model; lazily built ones do: no check computes with
the weights) and its config.json, and returns '' when the feature supports it, else the reason,
one clause. Every refusal a user meets names the feature, the model type and that reason
(:func:`require`); the README's support matrix is generated from the same checks
(``scripts/support_matrix.py``, checked by tests/test_readme.py), so it cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.nn as nn

from mlx_dft.errors import UserError

# Model types whose PEFT LoRA/DoRA export is proven against transformers + PEFT (the pinned
# version) computing our logits (tests/test_architectures.py): mlx-lm's module names are
# transformers' for them. Others are refused by name until a test proves them.
PEFT_PROVEN = {
    "llama": "", "mistral": "", "qwen2": "", "qwen3": "", "qwen3_moe": "", "phi3": "", "smollm3": "",
    "lfm2": "", "granite": "", "olmo2": "", "gemma3_text": "", "ministral3": "", "gemma4_text": "",
    "qwen3_5": "", "gpt_oss": "",
}  # fmt: skip


@dataclass(frozen=True)
class Feature:
    name: str
    option: str
    check: Callable[[nn.Module, dict], str]


def _kind(model: nn.Module) -> str:
    from mlx_dft.models import model_type

    return model_type(model)


def _loss_path(model: nn.Module, config: dict) -> str:
    from mlx_dft.models import split_model

    split = split_model(model, probe=False)
    return "" if split.fast else split.reason


def _packing(model: nn.Module, config: dict) -> str:
    from mlx_dft.packing import refusal

    return refusal(model)


def _aligner(model: nn.Module, config: dict) -> str:
    from mlx_dft.adapters.aligner.layer import refusal

    return refusal(model)


def _gguf(model: nn.Module, config: dict) -> str:
    from mlx_dft.gguf.archs import ARCHS

    if _kind(model) in ARCHS:
        return ""
    return f"the GGUF reader and writer cover {', '.join(ARCHS)} only so far"


def _peft(model: nn.Module, config: dict) -> str:
    kind = _kind(model)
    if kind not in PEFT_PROVEN:
        return "not yet proven against transformers + PEFT"
    return PEFT_PROVEN[kind]


FEATURES = {
    "loss": Feature("hidden-state loss", "(automatic)", _loss_path),
    "lora": Feature("LoRA", "--fine-tune-type lora", lambda m, c: ""),
    # (under DoRA expert layers stay frozen, with a note: mlx-lm's DoRA has no expert form)
    "dora": Feature("DoRA", "--fine-tune-type dora", lambda m, c: ""),
    "full": Feature("full", "--fine-tune-type full", lambda m, c: ""),
    "pack": Feature("packing", "--pack", _packing),
    "aligner": Feature("Aligner", "--fine-tune-type aligner", _aligner),
    "peft": Feature("PEFT export", "mlx_dft export", _peft),
    "gguf": Feature("GGUF", "convert / --gguf", _gguf),
}


def reason(feature: str, model: nn.Module, config: dict | None = None) -> str:
    """'' when ``feature`` supports ``model``, else why not."""
    return FEATURES[feature].check(model, config or {})


def require(feature: str, model: nn.Module, config: dict | None = None) -> None:
    """Refuse ``model`` for ``feature`` in one line naming both and the reason."""
    why = reason(feature, model, config)
    if why:
        f = FEATURES[feature]
        raise UserError(f"{f.option} ({f.name}) does not support model type {_kind(model)!r}: {why}")


def matrix(models: dict[str, tuple[nn.Module, dict]]) -> str:
    """The Markdown support matrix (model type x feature) of ``models`` ({type: (model, config)})."""
    head = "| model type | " + " | ".join(f.name for f in FEATURES.values()) + " |"
    rule = "|---|" + "---|" * len(FEATURES)
    rows = []
    for kind, (model, config) in models.items():
        cells = ["yes" if not f.check(model, config) else "no" for f in FEATURES.values()]
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def reasons(models: dict[str, tuple[nn.Module, dict]]) -> list[str]:
    """One line per feature and reason of the 'no's of :func:`matrix`, naming the model types."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for kind, (model, config) in models.items():
        for f in FEATURES.values():
            why = f.check(model, config)
            if why:
                grouped.setdefault((f.name, why), []).append(kind)
    return [f"- {name} ({', '.join(kinds)}): {why}" for (name, why), kinds in grouped.items()]
