"""PriFT (arXiv 2606.09396; official code wang-kee/PriFT ``prift_weights.py``): each token's
cross-entropy weighted by what a frozen reference model thinks of it, not the model being trained:

- ``prob``: ``w = q_ref(target)``;
- ``mass``: ``w = 1[u >= tau]`` with ``u = sum_v q_ref(v) 1[q_ref(v) < q_ref(target)] + q_ref(target)``
  (the target lies roughly inside the reference's top-p nucleus).

The reference is the model with the adapter switched off, as for ASFT: no second copy of the
weights (full fine-tuning keeps one with ``--reference-copy``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, option, register


@register
@dataclass(frozen=True)
class PriFT(Loss):
    name: ClassVar[str] = "prift"
    summary: ClassVar[str] = (
        "w * -log p with w from the frozen base model: q_ref(target), or 1 inside its nucleus"
    )
    source: ClassVar[str] = "PriFT, arXiv 2606.09396"
    parts: ClassVar[dict[str, str]] = {"prift_weight": "w"}
    needs_reference: ClassVar[bool] = True

    weight: str = option(
        "prob",
        "PriFT weight: prob (the base model's probability of the target) or mass (1 where the target "
        "lies inside the base model's top-p nucleus at --prift-tau).",
        ("prob", "mass"),
    )
    tau: float = option(0.5, "PriFT mass: the nucleus threshold tau.")

    def __post_init__(self):
        self._require(self.weight in ("prob", "mass"), "weight", "must be prob or mass")
        self._require(0.0 <= self.tau <= 1.0, "tau", "must be in [0, 1]")
        self._require(self.weight == "mass" or self.tau == 0.5, "tau", "applies to --prift-weight mass only")

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        if ref_logits is None:
            raise ValueError("the prift loss needs reference logits")
        ref = mx.stop_gradient(ref_logits)
        logq = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
        logq_target = mx.take_along_axis(logq, targets[:, None], axis=-1)  # [N, 1]
        q_target = mx.exp(logq_target[:, 0])
        if self.weight == "prob":
            w = q_target
        else:
            below = mx.where(logq < logq_target, mx.exp(logq), 0.0).sum(axis=-1)
            w = ((below + q_target) >= self.tau).astype(mx.float32)
        return w * ce, (w,)
