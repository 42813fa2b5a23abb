"""The "Beyond Log Likelihood" family (arXiv 2510.00526; official code GaotangLi/
Beyond-Log-Likelihood): per token ``(1 - p^alpha) / alpha`` (``-log p`` at alpha 0, ``1 - p`` at
alpha 1), optionally only where the token's probability is at least (``top``) or at most
(``bottom``) a threshold, the paper's ``OnlyTopP`` and ``OnlyBottomP`` forms.

Normalised as every loss here, by the supervised tokens of the optimizer step; the authors' code
divides the thresholded forms by the tokens kept instead, which scales each batch's gradient by
(supervised / kept) of that batch.

Its gradient is ``-sg(p)^alpha grad log p``, the gradient of ``--loss dft --dft-power alpha``:
the two train the same way and report different values (DFT reports ``sg(p^alpha) * -log p``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, option, register


@register
@dataclass(frozen=True)
class BLL(Loss):
    name: ClassVar[str] = "bll"
    summary: ClassVar[str] = "(1 - p^alpha) / alpha (-log p at alpha 0), optionally only above/below p = q"
    source: ClassVar[str] = "Beyond Log Likelihood, arXiv 2510.00526"
    parts: ClassVar[dict[str, str]] = {"bll_kept": "kept"}
    uses_logits: ClassVar[bool] = False

    alpha: float = option(1.0, "Beyond Log Likelihood: loss (1 - p^alpha) / alpha; 0 is -log p, 1 is 1 - p.")
    only: str = option(
        "all",
        "Beyond Log Likelihood: train on every token (all), or only where p >= --bll-threshold (top) or "
        "p <= it (bottom).",
        ("all", "top", "bottom"),
    )
    threshold: float = option(
        0.5, "Beyond Log Likelihood: the probability q that --bll-only top/bottom uses."
    )

    def __post_init__(self):
        self._require(self.alpha >= 0.0, "alpha", "must be >= 0")
        self._require(self.only in ("all", "top", "bottom"), "only", "must be all, top or bottom")
        self._require(0.0 <= self.threshold <= 1.0, "threshold", "must be in [0, 1]")
        only_all = self.only == "all"
        self._require(not only_all or self.threshold == 0.5, "threshold", "applies to --bll-only top/bottom")

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        value = ce if self.alpha == 0.0 else -mx.expm1(-self.alpha * ce) / self.alpha
        p = mx.exp(-mx.stop_gradient(ce))
        if self.only == "all":
            kept = mx.ones_like(p)
        else:
            kept = (p >= self.threshold) if self.only == "top" else (p <= self.threshold)
            kept = kept.astype(mx.float32)
        return kept * value, (kept,)
