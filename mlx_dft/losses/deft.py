"""DEFT (arXiv 2602.11424): per token ``-(p^a - 1) / a`` with ``a = sg(sum_v p_v^2)``, the
model's own concentration at that position. Its gradient is ``-p^a grad log p``: the
cross-entropy's where the distribution is flat (a near 0), DFT-like where it is peaked (a near 1).
No option (official code: luludus/DEFT, ``objective_trans=DEFT``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, register


def concentration(logits: mx.array) -> mx.array:
    """Detached ``sum_v softmax(z)_v^2`` per row of float32 ``logits`` [N, V], as
    ``exp(logsumexp(2z) - 2 logsumexp(z))`` (no [N, V] softmax kept)."""
    z = mx.stop_gradient(logits)
    return mx.exp(mx.logsumexp(2.0 * z, axis=-1) - 2.0 * mx.logsumexp(z, axis=-1))


@register
@dataclass(frozen=True)
class DEFT(Loss):
    name: ClassVar[str] = "deft"
    summary: ClassVar[str] = "(1 - p^a) / a with a = sg(sum_v p_v^2): NLL where flat, DFT-like where peaked"
    source: ClassVar[str] = "DEFT, arXiv 2602.11424"
    parts: ClassVar[dict[str, str]] = {"deft_alpha": "a"}

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        a = concentration(logits)  # in [1/V, 1]: never 0
        return -mx.expm1(-a * ce) / a, (a,)
