"""Token losses: SFT, DFT and its relatives ASFT and EAFT, as pure functions of hidden states.

For supervised positions t with target y_t, logits z_t and reference logits r_t::

    CE_t = -log softmax(z_t)[y_t]             p_t = exp(-CE_t)
    sft:  w_t = 1                             L = sum_t w_t * CE_t / |M|
    dft:  w_t = sg(max(p_t ** power, floor))  (paper: power=1, floor=0)
    asft: L = sum_t [w_t(dft) * CE_t + alpha * KL(softmax(r_t) || softmax(z_t))] / |M|
    eaft: w_t = sg((H_k(z_t) / ln k) ** alpha) H_k: entropy of the softmax of the k largest logits

ASFT (Anchored SFT, arXiv 2509.23753) anchors DFT to a reference policy, the base model (the
adapter switched off), over the full vocabulary; EAFT (Entropy-Adaptive Fine-Tuning, arXiv
2601.02151) down-weights tokens the model is confidently wrong about (low top-k entropy).

Every function here returns *sums* over tokens, never means: the trainer divides by the
supervised-token count of the whole optimizer step (all micro-batches, all workers), so
gradient accumulation and data parallelism give exactly the one-big-batch update.

The logits are computed from the final hidden states at supervised positions only, in
chunks of tokens, so a batch never holds a float32 [batch, length, vocab] array; ASFT's
reference logits are computed from the reference hidden states in the same chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

LOSS_TYPES = ("sft", "dft", "asft", "eaft")
# The parts of each loss that reports show next to the objective (sums over tokens, like it).
LOSS_PARTS = {"asft": ("dft", "kl"), "eaft": ("eaft_weight",)}
# Logit elements per chunk of the chunked loss (32 MiB of float32; the backward pass holds
# a handful of chunk-sized temporaries, so peak memory is a few hundred MiB at any vocabulary).
DEFAULT_CHUNK_ELEMENTS = 8 * 1024 * 1024
# Supervised tokens x vocabulary up to which `mlx_dft plan` counts the kept-softmax loss's
# [N, V] temporaries as one block (a term of its fit; :func:`keep_tokens`). The loss itself never
# recomputes a kept-softmax chunk, at any N: nothing [N, V] of it outlives the forward pass.
DEFAULT_KEEP_ELEMENTS = 32 * 1024 * 1024


@dataclass(frozen=True)
class LossConfig:
    loss: str = "dft"
    dft_floor: float = 0.0
    dft_power: float = 1.0
    asft_alpha: float = 0.1
    eaft_alpha: float = 1.0
    eaft_top_k: int = 20

    def __post_init__(self):
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_TYPES)}")
        if not 0.0 <= self.dft_floor <= 1.0:
            raise ValueError(f"dft_floor must be in [0, 1], got {self.dft_floor}")
        if self.dft_power <= 0.0:
            raise ValueError(f"dft_power must be > 0, got {self.dft_power}")
        if self.asft_alpha < 0.0:
            raise ValueError(f"asft_alpha must be >= 0, got {self.asft_alpha}")
        if self.eaft_alpha < 0.0:
            raise ValueError(f"eaft_alpha must be >= 0, got {self.eaft_alpha}")
        if self.eaft_top_k < 2:
            raise ValueError(f"eaft_top_k must be at least 2, got {self.eaft_top_k}")

    @classmethod
    def from_options(cls, cfg) -> LossConfig:
        """The loss a :class:`~mlx_dft.config.TrainConfig` asks for."""
        return cls(cfg.loss, cfg.dft_floor, cfg.dft_power, cfg.asft_alpha, cfg.eaft_alpha, cfg.eaft_top_k)

    @property
    def parts(self) -> tuple[str, ...]:
        """Names of the sums :func:`loss_sums` returns after (objective, ce, prob, tokens)."""
        return LOSS_PARTS.get(self.loss, ())

    @property
    def needs_reference(self) -> bool:
        """Whether the loss needs the reference model's hidden states (ASFT)."""
        return self.loss == "asft"

    def describe(self) -> str:
        """``asft loss (alpha 0.1)``: the loss and the settings it uses."""
        settings = {
            "dft": [("floor", self.dft_floor, 0.0), ("power", self.dft_power, 1.0)],
            "asft": [("alpha", self.asft_alpha, None), ("dft floor", self.dft_floor, 0.0)],
            "eaft": [("alpha", self.eaft_alpha, None), ("top-k", self.eaft_top_k, None)],
        }.get(self.loss, [])
        shown = [f"{name} {value:g}" for name, value, default in settings if value != default]
        return f"{self.loss} loss" + (f" ({', '.join(shown)})" if shown else "")


def token_weights(ce: mx.array, cfg: LossConfig, eaft_weight: mx.array | None = None) -> mx.array:
    """Detached per-token weights of the cross-entropies ``ce`` (DFT's for dft and asft; EAFT's
    weight, computed from the logits by :func:`eaft_weights`, passed in as ``eaft_weight``)."""
    if cfg.loss == "sft":
        return mx.ones_like(ce)
    if cfg.loss == "eaft":
        if eaft_weight is None:
            raise ValueError("the eaft loss needs its per-token weights (eaft_weights of the logits)")
        return mx.stop_gradient(eaft_weight.astype(mx.float32))
    logp = -mx.stop_gradient(ce)
    w = mx.exp(logp * cfg.dft_power) if cfg.dft_power != 1.0 else mx.exp(logp)
    if cfg.dft_floor > 0.0:
        w = mx.maximum(w, cfg.dft_floor)
    return w


def loss_sums(
    ce: mx.array, valid: mx.array, cfg: LossConfig, extra: mx.array | None = None
) -> tuple[mx.array, ...]:
    """(objective, ce, probability, token count, *parts) summed over the valid tokens.

    ``extra`` holds the per-token term the loss adds to the cross-entropy: KL(ref || model) for
    asft (differentiable), the EAFT weight for eaft; ``cfg.parts`` names the part sums (detached):
    asft's DFT term and KL term, eaft's weight.
    """
    ce = ce.astype(mx.float32)
    valid = valid.astype(mx.float32)
    w = token_weights(ce, cfg, extra if cfg.loss == "eaft" else None)
    weighted = (w * ce * valid).sum()
    ce_sum = (mx.stop_gradient(ce) * valid).sum()
    prob_sum = (mx.exp(-mx.stop_gradient(ce)) * valid).sum()
    if cfg.loss == "asft":
        if extra is None:
            raise ValueError("the asft loss needs the per-token KL to its reference")
        kl = (extra.astype(mx.float32) * valid).sum()
        objective = weighted + cfg.asft_alpha * kl
        return objective, ce_sum, prob_sum, valid.sum(), mx.stop_gradient(weighted), mx.stop_gradient(kl)
    if cfg.loss == "eaft":
        return weighted, ce_sum, prob_sum, valid.sum(), (w * valid).sum()
    return weighted, ce_sum, prob_sum, valid.sum()


def eaft_weights(logits: mx.array, top_k: int, alpha: float) -> mx.array:
    """Detached (H_k / ln k) ** alpha per row of ``logits`` [N, V]: H_k is the entropy of the
    softmax over the row's ``top_k`` largest logits, so the ratio lies in [0, 1]."""
    top = mx.topk(mx.stop_gradient(logits).astype(mx.float32), top_k, axis=-1)
    logq = top - mx.logsumexp(top, axis=-1, keepdims=True)
    ratio = -(mx.exp(logq) * logq).sum(axis=-1) / math.log(top_k)
    if alpha == 1.0:
        return ratio
    return mx.power(mx.maximum(ratio, 0.0), alpha)


def kl_to_reference(logits: mx.array, ref_logits: mx.array) -> mx.array:
    """KL(softmax(ref_logits) || softmax(logits)) per row over the full vocabulary; no gradient
    reaches the reference."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref = mx.stop_gradient(ref_logits)
    ref_logp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    return (mx.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)


def fused_cross_entropy_available() -> bool:
    """Whether ``mx.fast.cross_entropy`` runs fused here: on a GPU (Metal, CUDA). On the CPU it
    falls back to an unfused version that reduces in the logits' dtype, so the CPU keeps ours."""
    return hasattr(mx.fast, "cross_entropy") and mx.default_device().type == mx.DeviceType.gpu


def target_ce(logits: mx.array, targets: mx.array, fused: bool | None = None) -> mx.array:
    """Per-row cross-entropy ``logsumexp(z) - z[y]`` of ``logits`` [N, V], in float32.

    ``fused`` (default: where it is fused, :func:`fused_cross_entropy_available`) uses MLX's fused
    kernel, which accumulates in float32 without a float32 copy of half-precision logits; otherwise
    the logits are cast to float32 and reduced."""
    if fused is None:
        fused = fused_cross_entropy_available()
    if fused:
        return mx.fast.cross_entropy(logits, targets).astype(mx.float32)
    logits = logits.astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def keeps_softmax(head: nn.Module | Callable, cfg: LossConfig) -> bool:
    """Whether the loss of ``cfg`` under ``head`` uses :func:`kept_softmax_ce`: SFT and DFT where
    MLX has no fused cross-entropy (the CPU), with a head that trains nothing (every method but
    full fine-tuning; the hand-written backward gives the hidden states' gradient only)."""
    if cfg.loss not in ("sft", "dft") or fused_cross_entropy_available():
        return False
    return not (isinstance(head, nn.Module) and tree_flatten(head.trainable_parameters()))


def kept_softmax_ce(head: nn.Module | Callable) -> Callable[[mx.array, mx.array], mx.array]:
    """``(hidden [N, D], targets [N]) -> CE [N]`` of ``head(hidden)``, float32, whose gradient
    comes from the forward pass's softmax: each logit is exponentiated once, and the gradient
    ``(softmax - onehot(y)) @ W`` (times each token's ``g``) costs one product back through the
    head. Autodiff of
    ``logsumexp`` instead exponentiates again in the backward pass, and the checkpointed chunks a
    third time; on the CPU, where MLX's exponential runs at about 75M values/s, that is most of the
    loss at a 152k vocabulary.

    Written with autodiff, not a custom VJP (a Python callback that MLX calls while it traces a
    step): the forward pass forms the hidden states' gradient ``G = (softmax - onehot) @ W`` itself
    (a vjp of the head at detached inputs), and the value is the detached CE plus the surrogate
    ``sum(h * sg(G)) - sg(...)``, zero, whose derivative in ``h`` is exactly ``G``. Nothing of size
    [N, V] outlives the forward pass: the backward pass holds ``G`` [N, D] only."""

    def ce(h: mx.array, t: mx.array) -> mx.array:
        hs = mx.stop_gradient(h)
        z = head(hs).astype(mx.float32)
        top = mx.max(z, axis=-1, keepdims=True)
        e = mx.exp(z - top)
        total = e.sum(axis=-1, keepdims=True)
        at_target = mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
        value = mx.stop_gradient((top + mx.log(total))[:, 0] - at_target)
        onehot = mx.arange(z.shape[-1])[None, :] == t[:, None]
        cotangent = e / total - onehot.astype(mx.float32)
        _, (grad_h,) = mx.vjp(lambda x: head(x).astype(mx.float32), [hs], [cotangent])
        grad_h = mx.stop_gradient(grad_h).astype(h.dtype)
        surrogate = (h * grad_h).sum(axis=-1).astype(mx.float32)
        return value + (surrogate - mx.stop_gradient(surrogate))  # zero, with the gradient G
    return ce


def token_terms(
    logits: mx.array, targets: mx.array, cfg: LossConfig, ref_logits: mx.array | None = None
) -> tuple[mx.array, mx.array | None]:
    """(CE, extra) per row of ``logits`` [N, V]: ``extra`` is the KL to ``ref_logits`` for asft,
    the EAFT weight for eaft, None otherwise (see :func:`loss_sums`). SFT and DFT need only the
    cross-entropy: :func:`target_ce`, fused where MLX fuses it."""
    if cfg.loss in ("sft", "dft"):
        return target_ce(logits, targets), None
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    ce = lse - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    if cfg.loss == "asft":
        if ref_logits is None:
            raise ValueError("the asft loss needs reference logits")
        return ce, kl_to_reference(logits, ref_logits.astype(mx.float32))
    if cfg.loss == "eaft":
        return ce, eaft_weights(logits, cfg.eaft_top_k, cfg.eaft_alpha)
    return ce, None


def loss_from_logits(
    logits: mx.array,
    targets: mx.array,
    mask: mx.array,
    cfg: LossConfig,
    ref_logits: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """Mean loss over ``mask`` from full logits [..., V] (and, for asft, the reference's): the plain
    reference form of the loss. The metrics hold the means of ce, prob and the loss's parts."""
    v = logits.shape[-1]
    flat_ref = None if ref_logits is None else ref_logits.reshape(-1, v)
    ce, extra = token_terms(logits.reshape(-1, v), targets.reshape(-1), cfg, flat_ref)
    objective, ce_sum, prob_sum, n, *parts = loss_sums(ce, mask.reshape(-1), cfg, extra)
    n = mx.maximum(n, 1)
    metrics = {"ce": ce_sum / n, "prob": prob_sum / n, "ntoks": n}
    metrics.update({name: s / n for name, s in zip(cfg.parts, parts)})
    return objective / n, metrics


def chunked_terms(
    head: nn.Module | Callable,
    hidden: mx.array,
    targets: mx.array,
    chunk_tokens: int,
    cfg: LossConfig,
    ref_hidden: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Per-token (CE, extra) of ``targets`` [N] under ``head(hidden)`` [N, V] (see
    :func:`token_terms`); for asft the reference logits are ``head(ref_hidden)``, detached.

    Splits the N tokens into chunks of ``chunk_tokens``; with more than one chunk each is
    wrapped in ``mx.checkpoint`` so its [chunk, V] logits (and reference logits) are recomputed
    in the backward pass instead of kept, and chained to the previous chunk so they are
    evaluated in turn: peak memory holds a few chunks of logits, not N (measured: 2048 tokens
    x 152k vocab, 3.7 GB unchunked, 0.3 GB in chunks of 64). Where the loss keeps its softmax
    (:func:`keeps_softmax`) the chunks are never checkpointed, at any N: each forms its gradient
    in the forward pass and keeps only that ([chunk, D]), so recomputing it would cost the head's
    two products and the exponentials again for no memory (measured at the Qwen3-0.6B shape, 224
    targets: 11.5-11.7 s a step against 13.2-14.9 s checkpointed, peak 4.17 against 4.24 GB).
    """
    if cfg.needs_reference and ref_hidden is None:
        raise ValueError(f"the {cfg.loss} loss needs reference hidden states")
    with_ref = cfg.needs_reference
    n = hidden.shape[0]
    kept = kept_softmax_ce(head) if keeps_softmax(head, cfg) else None

    def terms(h: mx.array, t: mx.array, ref_h: mx.array | None) -> mx.array:
        if kept is not None:
            return kept(h, t)[:, None]
        ref_logits = mx.stop_gradient(head(ref_h)) if with_ref else None
        ce, extra = token_terms(head(h), t, cfg, ref_logits)
        return ce[:, None] if extra is None else mx.stack([ce, extra], axis=-1)

    if chunk_tokens <= 0 or n <= chunk_tokens:
        out = terms(hidden, targets, ref_hidden)
    else:
        trainable = head.trainable_parameters() if isinstance(head, nn.Module) else {}

        def piece(t: mx.array, ref_h: mx.array | None):
            # Targets and reference states need no gradient: close over them (checkpoint
            # differentiates its inputs).
            def fn(params, h):
                if params:
                    head.update(params)
                return terms(h, t, ref_h)

            return mx.checkpoint(fn) if checkpoint else fn

        checkpoint = kept is None
        chunks = []
        for i in range(0, n, chunk_tokens):
            h = hidden[i : i + chunk_tokens]
            if chunks:
                # A (zero) data dependency on the previous chunk makes MLX evaluate the chunks one
                # after another, forward and backward, instead of holding all their logits at once.
                h = h + 0.0 * chunks[-1].sum()
            ref_h = ref_hidden[i : i + chunk_tokens] if with_ref else None
            chunks.append(piece(targets[i : i + chunk_tokens], ref_h)(trainable, h))
        out = mx.concatenate(chunks)
    return out[:, 0], (out[:, 1] if out.shape[1] > 1 else None)


def chunked_ce(
    head: nn.Module | Callable,
    hidden: mx.array,
    targets: mx.array,
    chunk_tokens: int,
) -> mx.array:
    """Per-token cross-entropy of ``targets`` [N] under ``head(hidden)`` [N, V], in chunks
    (:func:`chunked_terms` of the plain cross-entropy)."""
    return chunked_terms(head, hidden, targets, chunk_tokens, LossConfig("sft"))[0]


def auto_chunk_tokens(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk of float32 logits holds ``chunk_elements`` values."""
    return max(16, chunk_elements // max(vocab_size, 1))


def keep_tokens(head: nn.Module | Callable, cfg: LossConfig, vocab_size: int) -> int:
    """Supervised tokens per batch up to which `mlx_dft plan` counts the kept-softmax loss's
    temporaries as one [N, V] block: :data:`DEFAULT_KEEP_ELEMENTS` of them where
    :func:`keeps_softmax`, else 0. (The loss recomputes no kept chunk at any N.)"""
    return DEFAULT_KEEP_ELEMENTS // max(vocab_size, 1) if keeps_softmax(head, cfg) else 0
