"""The machinery every token loss shares: logits from hidden states at supervised positions, in
chunks; the targets' cross-entropy (fused, or keeping its softmax, where a loss needs nothing
else); per-token terms summed over valid tokens into :class:`~mlx_dft.losses.base.LossSums`.

For supervised positions t with target y_t and logits z_t, ``CE_t = -log softmax(z_t)[y_t]`` and
``p_t = exp(-CE_t)``; a loss (:class:`~mlx_dft.losses.base.Loss`) turns them (and, where it asks,
the chunk's logits and the reference's) into a per-token objective and parts.

Every function here returns *sums* over tokens, never means: the trainer divides by the
supervised-token count of the whole optimizer step (all micro-batches, all workers), so
gradient accumulation and data parallelism give exactly the one-big-batch update.

The logits are computed from the final hidden states at supervised positions only, in
chunks of tokens, so a batch never holds a float32 [batch, length, vocab] array; a reference's
logits are computed from the reference hidden states in the same chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dft.errors import UserError
from mlx_dft.losses.base import LOSSES, Loss, LossSums

# Logit elements per chunk of the chunked loss (32 MiB of float32; the backward pass holds
# a handful of chunk-sized temporaries, so peak memory is a few hundred MiB at any vocabulary).
DEFAULT_CHUNK_ELEMENTS = 8 * 1024 * 1024
# Supervised tokens x vocabulary up to which `mlx_dft plan` counts the kept-softmax loss's
# [N, V] temporaries as one block (a term of its fit; :func:`keep_tokens`). The loss itself never
# recomputes a kept-softmax chunk, at any N: nothing [N, V] of it outlives the forward pass.
DEFAULT_KEEP_ELEMENTS = 32 * 1024 * 1024


def loss_sums(columns: mx.array, valid: mx.array) -> LossSums:
    """Sums over the valid tokens of per-token ``columns`` [N, 2 + parts] (objective, CE, parts;
    :func:`chunked_terms`): the objective with its gradient, the rest detached."""
    valid = valid.astype(mx.float32)
    ce = mx.stop_gradient(columns[:, 1])
    parts = tuple(mx.stop_gradient((columns[:, k] * valid).sum()) for k in range(2, columns.shape[1]))
    return LossSums(
        (columns[:, 0] * valid).sum(), (ce * valid).sum(), (mx.exp(-ce) * valid).sum(), valid.sum(), parts
    )


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


def keeps_softmax(head: nn.Module | Callable, loss: Loss) -> bool:
    """Whether ``loss`` under ``head`` uses :func:`kept_softmax_ce`: a loss of the cross-entropy
    alone (SFT, DFT, ...) where MLX has no fused cross-entropy (the CPU), with a head that trains
    nothing (every method but full fine-tuning; the hand-written backward gives the hidden
    states' gradient only)."""
    if not loss.ce_only or fused_cross_entropy_available():
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


def token_columns(
    logits: mx.array,
    targets: mx.array,
    loss: Loss,
    ref_logits: mx.array | None = None,
    old_ce: mx.array | None = None,
) -> mx.array:
    """[N, 2 + parts] per-token (objective, CE, *parts) of ``logits`` [N, V] under ``loss``:
    the cross-entropy in float32 (:func:`target_ce`, fused where MLX fuses it, for a loss of the
    cross-entropy alone), then the loss's :meth:`~mlx_dft.losses.base.Loss.token_loss` (given the
    previous policy's ``old_ce`` [N] where the loss needs it)."""
    if loss.ce_only:
        return columns_of(target_ce(logits, targets), loss, old_ce)
    logits = logits.astype(mx.float32)
    ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    ref = None if ref_logits is None else ref_logits.astype(mx.float32)
    objective, parts = _token_loss(loss, ce, logits, targets, ref, old_ce)
    return _stack(loss, objective, ce, parts)


def columns_of(ce: mx.array, loss: Loss, old_ce: mx.array | None = None) -> mx.array:
    """[N, 2 + parts] columns of a loss of the cross-entropy alone, from ``ce`` [N] (and the previous
    policy's ``old_ce`` [N] where the loss needs it)."""
    objective, parts = _token_loss(loss, ce.astype(mx.float32), old_ce=old_ce)
    return _stack(loss, objective, ce, parts)


def _token_loss(loss: Loss, ce, logits=None, targets=None, ref=None, old_ce=None):
    # Only a loss that needs the previous policy is given old_ce: the others keep their signature.
    if loss.needs_previous:
        return loss.token_loss(ce, logits, targets, ref, old_ce=old_ce)
    return loss.token_loss(ce, logits, targets, ref) if logits is not None else loss.token_loss(ce)


def _stack(loss: Loss, objective: mx.array, ce: mx.array, parts: tuple) -> mx.array:
    if len(parts) != len(loss.parts) or objective.shape != ce.shape:
        raise UserError(
            f"the {loss.name} loss returned a per-token objective of shape {objective.shape} and "
            f"{len(parts)} parts; expected shape {ce.shape} and {len(loss.parts)} ({', '.join(loss.parts)})"
        )
    return mx.stack([objective.astype(mx.float32), ce.astype(mx.float32),
                     *(mx.stop_gradient(x).astype(mx.float32) for x in parts)], axis=-1)  # fmt: skip


def loss_from_logits(
    logits: mx.array,
    targets: mx.array,
    mask: mx.array,
    loss: Loss,
    ref_logits: mx.array | None = None,
    old_ce: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """Mean loss over ``mask`` from full logits [..., V] (and the reference's, and the previous
    policy's cross-entropy [...], where the loss needs them): the plain reference form of the loss.
    The metrics hold the means of ce, prob and the loss's parts."""
    v = logits.shape[-1]
    flat_ref = None if ref_logits is None else ref_logits.reshape(-1, v)
    flat_old = None if old_ce is None else old_ce.reshape(-1)
    sums = loss_sums(
        token_columns(logits.reshape(-1, v), targets.reshape(-1), loss, flat_ref, flat_old), mask.reshape(-1)
    )
    n = mx.maximum(sums.tokens, 1)
    metrics = {"ce": sums.ce / n, "prob": sums.prob / n, "ntoks": n}
    metrics.update({name: s / n for name, s in zip(loss.parts, sums.parts)})
    return sums.objective / n, metrics


def chunked_terms(
    head: nn.Module | Callable,
    hidden: mx.array,
    targets: mx.array,
    chunk_tokens: int,
    loss: Loss,
    ref_hidden: mx.array | None = None,
    old_ce: mx.array | None = None,
) -> mx.array:
    """[N, 2 + parts] per-token (objective, CE, *parts) of ``targets`` [N] under ``head(hidden)``
    [N, V] (see :func:`token_columns`); where the loss needs a reference, its logits are
    ``head(ref_hidden)``, detached; where it needs the previous policy, ``old_ce`` [N] is its
    cross-entropy of the targets (each chunk gets its slice; None: the current policy's).

    Splits the N tokens into chunks of ``chunk_tokens``; with more than one chunk each is
    wrapped in ``mx.checkpoint`` so its [chunk, V] logits (and reference logits) are recomputed
    in the backward pass instead of kept, and chained to the previous chunk so they are
    evaluated in turn: peak memory holds a few chunks of logits, not N (measured: 2048 tokens
    x 152k vocab, 3.7 GB unchunked, 0.3 GB in chunks of 64). Where the loss keeps its softmax
    (:func:`keeps_softmax`) the chunks are never checkpointed, at any N: each forms its gradient
    in the forward pass and keeps only that ([chunk, D]), so recomputing it would cost the head's
    two products and the exponentials again for no memory (measured at the Qwen3-0.6B shape, 224
    targets: 11.5-11.7 s a step against 13.2-14.9 s checkpointed, peak 4.17 against 4.24 GB).
    A loss of the cross-entropy alone gets its objective from the chunks' cross-entropies (and the
    whole ``old_ce``, which has no vocabulary dimension).
    """
    if loss.needs_reference and ref_hidden is None:
        raise ValueError(f"the {loss.name} loss needs reference hidden states")
    with_ref = loss.needs_reference
    old_ce = mx.stop_gradient(old_ce) if old_ce is not None and loss.needs_previous else None
    n = hidden.shape[0]
    kept = kept_softmax_ce(head) if keeps_softmax(head, loss) else None

    def terms(h: mx.array, t: mx.array, ref_h: mx.array | None, old: mx.array | None) -> mx.array:
        if kept is not None:
            return kept(h, t)[:, None]
        if loss.ce_only:
            return target_ce(head(h), t)[:, None]
        ref_logits = mx.stop_gradient(head(ref_h)) if with_ref else None
        return token_columns(head(h), t, loss, ref_logits, old)

    if chunk_tokens <= 0 or n <= chunk_tokens:
        out = terms(hidden, targets, ref_hidden, old_ce)
    else:
        trainable = head.trainable_parameters() if isinstance(head, nn.Module) else {}

        def piece(t: mx.array, ref_h: mx.array | None, old: mx.array | None):
            # Targets, reference states and the previous policy's CE need no gradient: close over
            # them (checkpoint differentiates its inputs).
            def fn(params, h):
                if params:
                    head.update(params)
                return terms(h, t, ref_h, old)

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
            old = old_ce[i : i + chunk_tokens] if old_ce is not None else None
            chunks.append(piece(targets[i : i + chunk_tokens], ref_h, old)(trainable, h))
        out = mx.concatenate(chunks)
    return columns_of(out[:, 0], loss, old_ce) if loss.ce_only else out


def chunked_ce(
    head: nn.Module | Callable,
    hidden: mx.array,
    targets: mx.array,
    chunk_tokens: int,
) -> mx.array:
    """Per-token cross-entropy of ``targets`` [N] under ``head(hidden)`` [N, V], in chunks
    (:func:`chunked_terms` of the plain cross-entropy)."""
    return chunked_terms(head, hidden, targets, chunk_tokens, LOSSES["sft"]())[:, 1]


def detached_ce(
    head: nn.Module | Callable,
    hidden: mx.array,
    targets: mx.array,
    chunk_tokens: int,
) -> mx.array:
    """Per-token cross-entropy [N] float32 of ``targets`` under ``head(hidden)``, without gradient
    (the previous policy's, for PSFT): chunk by chunk, one after another, never a whole [N, V]
    logits array; nothing is kept for a backward pass (unlike :func:`chunked_ce` on the CPU, whose
    kept softmax forms the hidden states' gradient in its forward pass)."""
    hidden, n = mx.stop_gradient(hidden), hidden.shape[0]
    step = chunk_tokens if chunk_tokens > 0 else max(n, 1)
    chunks: list[mx.array] = []
    for i in range(0, n, step):
        h = hidden[i : i + step]
        if chunks:  # evaluated in turn (see chunked_terms)
            h = h + 0.0 * chunks[-1].sum()
        chunks.append(target_ce(head(h), targets[i : i + step]))
    return mx.stop_gradient(mx.concatenate(chunks)) if chunks else mx.zeros((0,), mx.float32)


def auto_chunk_tokens(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk of float32 logits holds ``chunk_elements`` values."""
    return max(16, chunk_elements // max(vocab_size, 1))


def keep_tokens(head: nn.Module | Callable, loss: Loss, vocab_size: int) -> int:
    """Supervised tokens per batch up to which `mlx_dft plan` counts the kept-softmax loss's
    temporaries as one [N, V] block: :data:`DEFAULT_KEEP_ELEMENTS` of them where
    :func:`keeps_softmax`, else 0. (The loss recomputes no kept chunk at any N.)"""
    return DEFAULT_KEEP_ELEMENTS // max(vocab_size, 1) if keeps_softmax(head, loss) else 0
