"""DFT (Dynamic Fine-Tuning, arXiv 2508.05629): each token's cross-entropy scaled by its own
detached probability, ``sg(max(p^power, floor)) * -log p``; the paper's is power 1, floor 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, option, register


@register
@dataclass(frozen=True)
class DFT(Loss):
    name: ClassVar[str] = "dft"
    summary: ClassVar[str] = "sg(p) * -log p: cross-entropy scaled by the detached token probability"
    source: ClassVar[str] = "Dynamic Fine-Tuning, arXiv 2508.05629"
    uses_logits: ClassVar[bool] = False

    floor: float = option(
        0.0,
        "DFT weight floor s: weight = max(p, s). "
        "The DFT author suggests 0.1 when rare tokens must be learned.",
    )
    power: float = option(1.0, "DFT weight power a: weight = p^a.")

    def __post_init__(self):
        self._require(0.0 <= self.floor <= 1.0, "floor", "must be in [0, 1]")
        self._require(self.power > 0.0, "power", "must be positive")

    def weight(self, ce: mx.array) -> mx.array:
        """The detached per-token weight ``max(p^power, floor)`` of cross-entropies ``ce``."""
        logp = -mx.stop_gradient(ce)
        w = mx.exp(logp * self.power) if self.power != 1.0 else mx.exp(logp)
        return mx.maximum(w, self.floor) if self.floor > 0.0 else w

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        return self.weight(ce) * ce, ()
