"""Exact packing in mlx-lm's own attention, extended from outside.

A packed row holds several examples one after another (:func:`mlx_dft.data.pack_dataset`);
``segments`` [B, T] numbers each position's example. For the loss to be the examples' own, two
things must hold in every attention layer:

- no example sees another: :func:`block_causal_mask` replaces the causal mask (passed to each
  block by :func:`packed_attention`, so blocks recomputed by gradient checkpointing get it too);
- each example's RoPE positions start at 0. RoPE makes a query-key score depend on the distance
  between their positions only, so in exact arithmetic positions could run on across the row;
  in float32 they cannot: the rotation angle ``position x frequency`` is rounded more coarsely at
  larger positions, and LoRA gradients of examples placed a few hundred positions into a row
  differ from their unpacked gradients by ~1e-4 (relative norm; 0.0 with positions restarted,
  tests/test_packing.py). So the attention of a packed model rotates queries and keys by each
  token's position within its example, which it reads off the mask it is given (a row of a
  block-causal mask holds position + 1 visible keys): mlx-lm's own RoPE module, called with one
  offset per token.

Models whose layers use sliding-window attention are refused (their masks are windowed, and a
window's row count is not a position).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlx_dft.architectures import ARCHITECTURES
from mlx_dft.errors import UserError

_PATCHED: set[str] = set()
FLAG = "_mlx_dft_packed"  # set on the attention modules of a model that trains packed


def block_causal_mask(segments: mx.array) -> mx.array:
    """[B, 1, T, T] boolean attention mask of packed rows: position i sees position j when j <= i
    and both belong to the same example (padding, segment 0, sees only padding, so no row of the
    mask is empty)."""
    t = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = mx.arange(t)[:, None] >= mx.arange(t)[None, :]
    return (same & causal)[:, None]


class _TokenPositions(nn.Module):
    """A RoPE module applied at one position per token: ``rope`` (mlx-lm's, any variant) sees
    each token as a one-token sequence at its own offset."""

    def __init__(self, rope: nn.Module, positions: mx.array):
        super().__init__()
        self.rope = rope
        object.__setattr__(self, "_positions", positions)  # an input, not a parameter

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        b, h, t, d = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(b * t, h, 1, d)
        y = self.rope(y, offset=self._positions.reshape(-1) + offset)
        return y.reshape(b, t, h, d).transpose(0, 2, 1, 3)


def _install(module_name: str) -> None:
    """Patch one mlx-lm model module's Attention (idempotent): a flagged attention module given an
    array mask and no cache rotates by the positions that mask implies."""
    if module_name in _PATCHED:
        return
    cls = importlib.import_module(f"mlx_lm.models.{module_name}").Attention
    original = cls.__call__

    def __call__(self, x, mask=None, cache=None):
        if cache is not None or not isinstance(mask, mx.array) or not getattr(self, FLAG, False):
            return original(self, x, mask, cache)
        positions = mask[:, 0].sum(axis=-1).astype(mx.int32) - 1  # [B, T]
        rope = self["rope"]
        self["rope"] = _TokenPositions(rope, positions)
        try:
            return original(self, x, mask, cache)
        finally:
            self["rope"] = rope

    cls.__call__ = __call__
    _PATCHED.add(module_name)


def prepare(model: nn.Module) -> None:
    """Make ``model`` train on packed rows, or refuse it in one line: an architecture of
    :data:`~mlx_dft.architectures.ARCHITECTURES` (the hidden-state path and mlx-lm attention
    modules with a ``rope``), without sliding-window layers."""
    from mlx_dft.models import model_type, split_model

    kind = model_type(model)
    body, _, fast = split_model(model)
    layers = getattr(body, "layers", None)
    ok = fast and isinstance(layers, list) and all("rope" in getattr(b, "self_attn", {}) for b in layers)
    if not ok:
        raise UserError(
            f"--pack supports model types {', '.join(ARCHITECTURES)}; this model is {kind!r} "
            "(train it without --pack)"
        )
    if any(getattr(b, "use_sliding", False) for b in layers):
        raise UserError("--pack does not support sliding-window attention layers (train without --pack)")
    _install(ARCHITECTURES[kind].mlx_module)
    for b in layers:
        setattr(b.self_attn, FLAG, True)


class _StandIn:
    """Takes a block's place in the body's list of blocks: calls ``fn`` instead, and reads as the
    block otherwise (mlx-lm's models read attributes such as ``use_sliding`` off their blocks)."""

    def __init__(self, block: nn.Module, fn):
        self.block, self.fn = block, fn

    def __call__(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.block, name)


class _Masked(nn.Module):
    """A block called with a fixed mask. A module holding the block, so the model's module tree
    still reaches the block's layers while it stands in (an adapter's switch walks that tree)."""

    def __init__(self, block: nn.Module, mask: mx.array):
        super().__init__()
        self.block = block
        object.__setattr__(self, "_mask", mask)  # an input, not a parameter

    def __call__(self, x, mask=None, cache=None):
        return self.block(x, self._mask, cache)

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if "block" not in self:
            raise AttributeError(name)
        return getattr(self["block"], name)


@contextmanager
def packed_attention(body: nn.Module, segments: mx.array | None):
    """While it lasts, every block of ``body`` gets :func:`block_causal_mask` of ``segments`` as
    its mask (instead of mlx-lm's ``"causal"``); a model :func:`prepare` d for packing then also
    restarts RoPE positions per example. Nothing changes when ``segments`` is None."""
    if segments is None:
        yield
        return
    layers = body.layers
    mask = block_causal_mask(segments)
    original = list(layers)
    layers[:] = [_Masked(b, mask) for b in original]
    try:
        yield
    finally:
        layers[:] = original
