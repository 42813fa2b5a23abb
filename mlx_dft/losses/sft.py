"""SFT: the plain cross-entropy of the supervised tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlx_dft.losses.base import Loss, register


@register
@dataclass(frozen=True)
class SFT(Loss):
    name: ClassVar[str] = "sft"
    summary: ClassVar[str] = "cross-entropy: -log p"
    source: ClassVar[str] = "supervised fine-tuning"
    uses_logits: ClassVar[bool] = False

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        return ce, ()
