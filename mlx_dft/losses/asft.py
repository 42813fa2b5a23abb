"""ASFT (Anchored SFT, arXiv 2509.23753): DFT plus ``alpha`` times KL(reference || model) over the
full vocabulary, per token; the reference is the base model (the adapter switched off), so DFT
cannot drift far from it. Its DFT term reads DFT's options (``--dft-floor``, ``--dft-power``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, option, register
from mlx_dft.losses.compute import kl_to_reference
from mlx_dft.losses.dft import DFT


@register
@dataclass(frozen=True)
class ASFT(Loss):
    name: ClassVar[str] = "asft"
    summary: ClassVar[str] = "DFT + alpha * KL(base model || model) over the vocabulary"
    source: ClassVar[str] = "Anchored SFT, arXiv 2509.23753"
    parts: ClassVar[dict[str, str]] = {"dft": "dft", "kl": "kl"}
    needs_reference: ClassVar[bool] = True
    borrows: ClassVar[tuple[str, ...]] = ("dft",)

    alpha: float = option(
        0.1,
        "ASFT: weight of each token's KL(base || model), added to its DFT term; the base is the model "
        "with the adapter switched off.",
    )
    dft: DFT = field(default_factory=DFT, metadata={"borrowed": "dft"})

    def __post_init__(self):
        self._require(self.alpha >= 0.0, "alpha", "must be >= 0")

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        if ref_logits is None:
            raise ValueError("the asft loss needs reference logits")
        kl = kl_to_reference(logits, ref_logits)
        dft_term = self.dft.weight(ce) * ce
        return dft_term + self.alpha * kl, (mx.stop_gradient(dft_term), mx.stop_gradient(kl))
