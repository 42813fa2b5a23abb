"""The gated delta rule in chunks, for training (Qwen3.5, Qwen3-Next, OLMo hybrid, Kimi Linear).

mlx-lm trains its gated-delta layers with ``gated_delta_ops``: a Python loop over every position,
each step a few small operations on a [batch, heads, d_v, d_k] state, and autodiff keeps every
step's state for the backward pass, so memory and graph grow with the sequence. This module
computes the same recurrence a chunk of ``C`` positions at a time (the chunk-parallel algorithm of
flash-linear-attention's ``chunk_gated_delta_rule``, written here in MLX operations, so it runs on
every backend and autodiff differentiates it):

    S_t = g_t S_{t-1} + u_t k_tᵀ,   u_t = β_t (v_t - g_t S_{t-1} k_t),   y_t = S_t q_t

Within a chunk, with Γ_ij = g_{j+1} ⋯ g_i (the decay from position j to i) and γ_i = Γ_i0 (from
the chunk's start state S), the pseudo-values solve a unit lower-triangular system

    u_i + Σ_{j<i} β_i Γ_ij (k_i·k_j) u_j = β_i (v_i - γ_i S k_i)

so U = T (β ⊙ V) - T (βγ ⊙ K) Sᵀ with T = (I + A)⁻¹, computed for every chunk at once by forward
substitution (a row at a time; a series in A is not stable: with keys in similar directions and
slow decays its partial sums overflow float32). Only the chunk boundaries are sequential:

    Y = (γ ⊙ Q) Sᵀ + (Γ ⊙ Q Kᵀ) U,   S ← γ_C S + Uᵀ ((Γ_Cj) ⊙ K)

Gates come in as their logarithms, which the models compute without rounding (``-exp(A_log) ·
softplus(a + dt_bias)``); a gate of exp(-200) or less is 0 in float32 and is taken as 0 (a packed
row's example starts use it to reset the state exactly). The log-decay between two positions is
summed over exactly the positions between them (each pair's own running sum), not taken as a
difference of prefix sums: a chunk of strong decays does not cost the weak ones their precision, in
the values or in the gates' gradients, and no matrix product (TF32 on CUDA) rounds it.
Per-dimension gates (one decay per key dimension: ``S_t = S_{t-1} diag(g_t) + ...``) make every
Γ_ij a vector over the key dimensions; their chunks are shorter so that the [chunk, chunk, d_k]
decays stay small.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

CHUNK = 64  # positions a chunk; a power of two
VECTOR_CHUNK = 16  # ... with per-dimension gates, whose decays are [chunk, chunk, d_k] per head
LOG_ZERO = -200.0  # exp of it, and of anything below it, is 0 in float32


def chunk_gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    log_g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """The gated delta rule over a whole sequence, by chunks; what mlx-lm's ``gated_delta_ops``
    returns for ``g = exp(log_g)`` (without a mask).

    Shapes: ``q``, ``k`` [B, T, Hk, Dk]; ``v`` [B, T, Hv, Dv]; ``beta`` [B, T, Hv]; ``log_g``
    [B, T, Hv] (one gate per head and position: Qwen3.5) or [B, T, Hv, Dk] (one per key dimension:
    Kimi's delta attention, in chunks of at most :data:`VECTOR_CHUNK`); ``state`` [B, Hv, Dv, Dk]
    (float32; zeros if None).
    Returns y [B, T, Hv, Dv] in ``q``'s dtype and the final state (float32). Hv must be a multiple
    of Hk (grouped heads share their keys and queries, as mlx-lm repeats them); T need not be a
    multiple of the chunk (the last chunk is padded with steps that change nothing)."""
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two of at least 2, not {chunk}")
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if log_g.shape not in ((B, T, Hv), (B, T, Hv, Dk)) or beta.shape != (B, T, Hv):
        raise ValueError(f"gates of shape {log_g.shape} and {beta.shape} for [B, T, Hv] = {(B, T, Hv)}")
    if log_g.ndim == 4:
        chunk = min(chunk, VECTOR_CHUNK)
    if Hv % Hk:
        raise ValueError(f"{Hv} value heads are not a multiple of {Hk} key heads")
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    y, state = _recomputed(chunk)(q, k, v, log_g, beta, state)
    return y.astype(q.dtype), state


@lru_cache(maxsize=8)
def _recomputed(chunk: int):
    """The chunked rule for ``chunk``, recomputed in the backward pass (:func:`mx.checkpoint`):
    the backward pass keeps a layer's inputs only, not its chunk matrices, for a second forward
    computation that costs little beside the model's matrix products."""
    return mx.checkpoint(lambda q, k, v, log_g, beta, state: _chunked(q, k, v, log_g, beta, state, chunk))


def _chunked(q, k, v, log_g, beta, state, chunk: int) -> tuple[mx.array, mx.array]:
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv > Hk:
        q, k = mx.repeat(q, Hv // Hk, -2), mx.repeat(k, Hv // Hk, -2)

    C = min(chunk, max(2, 1 << (T - 1).bit_length()))  # a short sequence needs no 64-wide chunk
    N = -(-T // C)
    pad = N * C - T

    def heads_first(x: mx.array, fill: float = 0.0) -> mx.array:  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = x.astype(mx.float32)
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = mx.moveaxis(x, 1, 2)
        return x.reshape(*x.shape[:2], N, C, *x.shape[3:])

    Q, K, V = heads_first(q), heads_first(k), heads_first(v)
    b = heads_first(beta)  # padded steps: beta 0 and gate 1 change nothing
    lg = mx.maximum(heads_first(log_g), LOG_ZERO)  # below it the gate is 0 in float32 anyway

    # Log-decays summed over exactly the positions they span (j < s <= i), each pair's own running
    # sum, not a difference of prefix sums: no cancellation in the values or in the gates'
    # gradients, no matrix product (TF32 on CUDA would round it), a NaN gate reaching only later
    # positions.
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    after = mx.triu(mx.ones((C, C), dtype=mx.bool_), k=1)  # [j, s]: s > j
    if lg.ndim == 4:  # scalar gates: [B, H, N, C]
        span = mx.swapaxes(mx.cumsum(mx.where(after, lg[..., None, :], 0.0), axis=-1), -1, -2)  # [.., i, j]
        decay = mx.exp(mx.where(causal, span, -mx.inf))  # Γ_ij for j <= i, else 0
        gamma = mx.exp(mx.cumsum(lg, axis=-1))[..., None]  # γ_i: from the chunk's start state to i
        to_end = decay[..., -1, :][..., None]  # Γ_Cj: from position j to the chunk's end
        keys = decay * (K @ mx.swapaxes(K, -1, -2))  # Γ_ij (k_i·k_j)
        scores = decay * (Q @ mx.swapaxes(K, -1, -2))  # Γ_ij (q_i·k_j), lower triangular
    else:  # per-dimension gates: [B, H, N, C, Dk], every decay a vector over the key dimensions
        spans = mx.cumsum(mx.where(after[..., None], lg[..., None, :, :], 0.0), axis=-2)  # [.., j, i, d]
        decay = mx.exp(mx.where(causal[..., None], mx.swapaxes(spans, -2, -3), -mx.inf))  # [.., i, j, d]
        gamma = mx.exp(mx.cumsum(lg, axis=-2))  # [.., i, d]
        to_end = decay[..., -1, :, :]  # [.., j, d]
        keys = ((K[..., :, None, :] * K[..., None, :, :]) * decay).sum(-1)  # Σ_d k_id Γ_ijd k_jd
        scores = ((Q[..., :, None, :] * K[..., None, :, :]) * decay).sum(-1)

    # T = (I + A)^-1 for the strictly lower triangular A_ij = β_i Γ_ij (k_i·k_j), by forward
    # substitution a row at a time (T_i = e_i - A_i,<i T_<i): stable where a series in A is not
    # (keys in similar directions with slow decays make its partial sums overflow float32).
    a = mx.where(mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1), b[..., :, None] * keys, 0.0)
    eye = mx.eye(C)
    inverse = mx.broadcast_to(eye[:1], (*a.shape[:-2], 1, C))
    for i in range(1, C):
        row = eye[i : i + 1] - a[..., i : i + 1, :i] @ inverse
        inverse = mx.concatenate([inverse, row], axis=-2)
    w_v = inverse @ (b[..., None] * V)  # [B, H, N, C, Dv]
    w_k = inverse @ (b[..., None] * gamma * K)  # [B, H, N, C, Dk]
    q_start = gamma * Q
    k_end = to_end * K

    ys = []
    for n in range(N):  # the only sequential part: the state across chunk boundaries
        u = w_v[:, :, n] - w_k[:, :, n] @ mx.swapaxes(state, -1, -2)
        ys.append(q_start[:, :, n] @ mx.swapaxes(state, -1, -2) + scores[:, :, n] @ u)
        state = gamma[:, :, n, -1][..., None, :] * state + mx.swapaxes(u, -1, -2) @ k_end[:, :, n]
    y = mx.stack(ys, axis=2).reshape(B, Hv, N * C, Dv)[:, :, :T]
    return mx.moveaxis(y, 1, 2), state
