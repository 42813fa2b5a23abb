"""Exact packing: several examples in one row, each computed as if alone.

A packed row holds several examples one after another (:func:`mlx_dft.data.pack_dataset`);
``segments`` [B, T] numbers each position's example. For the loss to be the examples' own, in
every attention layer (:func:`mlx_dft.patches.wrapped_blocks` does both, for every block):

- no example sees another: the model's mask (plain causal, or a sliding window) is intersected
  with :func:`block_causal_mask`, so windows stay exact within each example; attention sinks
  (gpt_oss) need nothing more, their logit joins each query's own softmax;
- each example's RoPE positions start at 0. RoPE makes a query-key score depend on the distance
  between their positions only, so in exact arithmetic positions could run on across the row;
  in float32 they cannot: the rotation angle ``position x frequency`` is rounded more coarsely at
  larger positions, and LoRA gradients of examples placed a few hundred positions into a row
  differ from their unpacked gradients by ~1e-4 (relative norm; 0.0 with positions restarted,
  tests/test_packing.py). So each attention's RoPE module is applied at each token's position
  within its example (mlx-lm's own module, called with one offset per token).

Layers that carry state along the sequence (gated-delta linear attention, short convolutions,
state-space layers) and position-dependent attention scaling are refused by name
(:func:`mlx_dft.patches.packing_refusal`): a packed row could not be computed exactly there yet.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlx_dft import patches
from mlx_dft.errors import UserError
from mlx_dft.patches import block_causal_mask as block_causal_mask


def refusal(model: nn.Module) -> str:
    """'' when ``model`` trains on packed rows exactly; else why not (one clause)."""
    from mlx_dft.models import model_type, split_model

    split = split_model(model, probe=False)
    return patches.packing_refusal(model_type(model), model, split.body if split.fast else None)


def prepare(model: nn.Module) -> None:
    """Check that ``model`` can train on packed rows, or refuse it in one line naming the layer
    kind and why."""
    why = refusal(model)
    if why:
        raise UserError(f"--pack cannot train this model exactly: {why} (train it without --pack)")


@contextmanager
def packed_attention(body: nn.Module, segments: mx.array | None):
    """While it lasts, every block of ``body`` runs the packed way for ``segments`` (nothing
    changes when it is None); see :func:`mlx_dft.patches.wrapped_blocks`."""
    with patches.wrapped_blocks(body, segments):
        yield
