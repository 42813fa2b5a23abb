"""EAFT (Entropy-Adaptive Fine-Tuning, arXiv 2601.02151): each token's cross-entropy scaled by
``sg((H_k / ln k)^alpha)``, H_k the entropy of the softmax over its k largest logits; tokens the
model is confidently wrong about (low entropy) count less."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, option, register
from mlx_dft.losses.compute import eaft_weights


@register
@dataclass(frozen=True)
class EAFT(Loss):
    name: ClassVar[str] = "eaft"
    summary: ClassVar[str] = "sg((H_k / ln k)^alpha) * -log p: scaled by the normalised top-k entropy"
    source: ClassVar[str] = "Entropy-Adaptive Fine-Tuning, arXiv 2601.02151"
    parts: ClassVar[dict[str, str]] = {"eaft_weight": "w"}

    alpha: float = option(1.0, "EAFT: weight = (H_k / ln k)^alpha.")
    top_k: int = option(20, "EAFT: k, the number of largest logits whose softmax entropy H_k is used.")

    def __post_init__(self):
        self._require(self.alpha >= 0.0, "alpha", "must be >= 0")
        self._require(self.top_k >= 2, "top_k", "must be at least 2")

    def check_vocabulary(self, vocab_size: int) -> str:
        if self.top_k > vocab_size:
            return f"--eaft-top-k {self.top_k} is above the vocabulary size ({vocab_size})"
        return ""

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        w = mx.stop_gradient(eaft_weights(logits, self.top_k, self.alpha))
        return w * ce, (w,)
