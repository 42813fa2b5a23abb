"""The adapter contract: what every fine-tuning method (LoRA, DoRA, full, Aligner) implements.

One instance per method lives in :data:`mlx_dft.adapters.METHODS`. Code outside ``adapters/``
asks the method (``method.fuse(...)``, ``method.export(...)``, ``method.card(...)``) and never
branches on its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dft.errors import UserError

if TYPE_CHECKING:
    from mlx_dft.config import TrainConfig

WEIGHTS_FILE = "adapters.safetensors"


@dataclass
class Card:
    """What a model card says about an exported folder of this method."""

    kind: str  # e.g. "lora", "aligner-adaption-prompt"
    what: str  # "A LoRA adapter"
    library: str  # the Hub's library_name: "peft", "mlx_dft"
    tags: list[str] = field(default_factory=list)
    base_model: str | None = None
    usage: list[str] = field(default_factory=list)  # markdown lines of a "Use" section


# On a model whose adapter switches off by a copy of the initial weights (full fine-tuning with
# --reference-copy): the copy, a list of the trained blocks' parameter trees.
REFERENCE_COPY = "_mlx_dft_reference_copy"


@dataclass
class AdapterOff:
    """How to run a model with its adapter switched off (:meth:`AdapterMethod.adapter_off`):
    inside ``with off():`` the model computes the base model. ``state``: arrays the switch swaps in,
    which a function compiled with ``mx.compile`` must take as inputs. ``first_layer``: the first
    block the adapter changes; the blocks before it compute the same on or off, so a reference pass
    may start from the input of that block in the adapted pass."""

    context: Callable[[], AbstractContextManager]
    state: list = field(default_factory=list)
    first_layer: int = 0

    def __call__(self) -> AbstractContextManager:
        return self.context()


class AdapterMethod(ABC):
    """One fine-tuning method. Settings are the method's part of ``adapter_config.json`` (mlx-lm's
    keys where mlx-lm has the concept, so stock ``mlx_lm generate/fuse`` load our folders)."""

    name: ClassVar[str]
    # Files holding the trained tensors, in an output folder and in each checkpoint.
    weight_files: ClassVar[tuple[str, ...]] = (WEIGHTS_FILE,)
    # Export formats (`mlx_dft export --format`), the first being the default.
    export_formats: ClassVar[tuple[str, ...]] = ()
    # TrainConfig keys of this method that a model card lists.
    card_settings: ClassVar[tuple[str, ...]] = ()
    # It trains the base model's own weights (so it needs them as stored, never a quantized base).
    trains_base_weights: ClassVar[bool] = False
    # Its trained layers keep their inputs for their weight gradients (the planner counts them).
    keeps_layer_inputs: ClassVar[bool] = True

    def trained_blocks(self, cfg: TrainConfig, n_layers: int) -> list[int]:
        """The blocks a run of ``cfg`` trains (for :mod:`mlx_dft.plan`): the last ``num_layers``."""
        from mlx_dft.models import last_layers

        return last_layers(n_layers, cfg.num_layers)

    def plan_terms(self, model: nn.Module, blocks: list[int], kept_blocks: int, token_bytes: float) -> dict:
        """Memory terms of this method's own for :mod:`mlx_dft.plan` (bytes before the planner's
        fitted constants): ``blocks`` trained, ``kept_blocks`` keeping activations, ``token_bytes``
        one activation value's bytes times the batch's tokens."""
        return {}

    @abstractmethod
    def settings(self, cfg: TrainConfig, model: nn.Module) -> dict:
        """Settings from training options, checked against ``model``."""

    @abstractmethod
    def settings_from_config(self, config: dict) -> dict:
        """Settings from a saved ``adapter_config.json``."""

    @abstractmethod
    def apply(self, model: nn.Module, settings: dict) -> None:
        """Freeze the base model and add or unfreeze the trainable parameters."""

    def weights(self, model: nn.Module) -> dict[str, dict[str, mx.array]]:
        """{file name: tensors} of the trained parameters."""
        return {self.weight_files[0]: dict(tree_flatten(model.trainable_parameters()))}

    def adapter_off(self, model: nn.Module, copy_weights: bool = False) -> AdapterOff:
        """The switch inside which ``model`` (with this method applied) computes the base model, the
        adapter switched off: ASFT's reference policy, without a second model.

        Entering and leaving only rebinds modules, parameters or flags, so a loss function may use it
        inside a function that ``mx.compile`` traces or ``nn.value_and_grad`` differentiates: the
        trace records the forward pass that ran inside it. Call this after :meth:`apply` and before
        trained weights are loaded. A method that can only switch off by keeping the initial weights
        (full fine-tuning) copies them now when ``copy_weights`` is True, and refuses otherwise.
        """
        raise UserError(f"a {self.name} adapter cannot be switched off to give a reference model")

    def describe(self, settings: dict) -> str:
        """How the trainable count decomposes (`` = 1 tokens x 576 + ...``), or ``""``."""
        return ""

    def check_fusable(self) -> None:
        """Raise a UserError saying why this method cannot be merged into the base weights, if so."""
        raise UserError(f"a {self.name} adapter cannot be merged into the base weights")

    def fuse(self, model: nn.Module, dequantize: bool) -> None:
        """Merge the applied adapter into the base weights, in place."""
        self.check_fusable()

    def export(self, adapter_dir: Path, config: dict, out: Path, fmt: str, base_model: str | None) -> None:
        """Write the Hugging Face folder ``out`` for format ``fmt`` (one of ``export_formats``)."""
        raise UserError(f"a {self.name} adapter has no Hugging Face export")

    def read_foreign(self, path: Path, model: str | None) -> dict | None:
        """If ``path`` is this method's adapter in another tool's format, an mlx_dft adapter config
        with its tensors under ``weights`` ({file name: tensors}); else None."""
        return None

    def card(self, folder: Path, repo_id: str) -> Card | None:
        """If ``folder`` is an export of this method, what its model card says when it is
        published as ``repo_id``; else None."""
        return None
