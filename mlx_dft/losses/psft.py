"""Proximal SFT (PSFT, arXiv 2508.17784; official code zwhong714/PSFT, a verl recipe): SFT as a
policy gradient with advantage 1, trained with PPO's clipped objective. Per token

    r = p / p_old,    loss = -min(r, clip(r, 1 - epsilon_low, 1 + epsilon_high))

with p the trained model's probability of the target and p_old the previous policy's: the weights
at the start of a group of ``--psft-minibatches`` optimizer steps (the trainer computes p_old for
the micro-batches of the group's steps at its start, without gradient; the official recipe's
batch is the group, its mini-batch our ``--batch-size``). Within a group r drifts from 1, and a
token whose ratio passed 1 + epsilon_high stops receiving gradient: the trust region.

With advantage 1 the lower clip never binds (below 1 - epsilon_low, min(r, clip(r)) = r), as in
the official code; ``epsilon_low`` is kept for its settings. With one step per group (or at a
group's first step) r is 1 in value and the gradient is exactly SFT's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_dft.losses.base import Loss, option, register


@register
@dataclass(frozen=True)
class PSFT(Loss):
    name: ClassVar[str] = "psft"
    summary: ClassVar[str] = (
        "-min(r, clip(r, 1 - eps_low, 1 + eps_high)), r = p / p_old, p_old the policy at the start of "
        "each group of --psft-minibatches steps"
    )
    source: ClassVar[str] = "Proximal SFT, arXiv 2508.17784"
    parts: ClassVar[dict[str, str]] = {"psft_ratio": "r", "psft_clipped": "clip"}
    uses_logits: ClassVar[bool] = False  # a function of the target's cross-entropy (and p_old's)
    needs_previous: ClassVar[bool] = True

    minibatches: int = option(
        8,
        "PSFT: optimizer steps (mini-batches of --batch-size) per previous policy: p_old is computed at "
        "the start of each group of this many steps for all of its micro-batches; 1 is SFT's update.",
    )
    epsilon_low: float = option(
        0.2, "PSFT: the ratio's lower clip 1 - epsilon_low (with PSFT's advantage of 1 it never binds)."
    )
    epsilon_high: float = option(
        0.28, "PSFT: the ratio's upper clip 1 + epsilon_high: tokens above it get no gradient."
    )

    def __post_init__(self):
        self._require(self.minibatches >= 1, "minibatches", "must be at least 1")
        self._require(0.0 <= self.epsilon_low < 1.0, "epsilon_low", "must be in [0, 1)")
        self._require(self.epsilon_high >= 0.0, "epsilon_high", "must be >= 0")

    @property
    def group_steps(self) -> int:
        return self.minibatches

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None, old_ce=None):
        old = mx.stop_gradient(ce if old_ce is None else old_ce.astype(mx.float32))
        high = 1.0 + self.epsilon_high
        # r = exp(old - ce), capped at e (1 + epsilon_high): beyond the upper clip the objective is
        # the constant 1 + epsilon_high, and the cap keeps exp finite (an inf there would turn the
        # masked branch's zero gradient into nan) and the reported mean ratio readable.
        r = mx.exp(mx.minimum(old - ce, math.log(high) + 1.0))
        clipped = r > high
        # -min(r, clip(r, 1 - lo, 1 + hi)) for advantage 1: -(1 + hi) above the upper clip, else -r.
        objective = -mx.where(clipped, mx.array(high, mx.float32), r)
        return objective, (r, clipped.astype(mx.float32))
