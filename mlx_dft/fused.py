"""A leaner SwiGLU for training, put into mlx-lm's MLPs from outside.

mlx-lm's MLPs compute ``down(swiglu(gate(x), up(x)))`` with ``swiglu(g, u) = silu(g) * u``.
Differentiated by autodiff, that keeps three [tokens, intermediate] arrays per layer for the
backward pass (measured at the Qwen3-0.6B shape: 0.20 GB more peak memory than keeping two).
:func:`swiglu` computes the same forward values with the same operations, and has its own
vector-Jacobian product that keeps only its two inputs, recomputing the sigmoid:

    d/dg [g s(g) u] = u (s + g s (1 - s)),    d/du [g s(g) u] = g s

:func:`lean_swiglu` puts it in place of ``swiglu`` in the mlx-lm module of a model's
architecture (:data:`~mlx_dft.architectures.ARCHITECTURES`) while the training loss runs (the
step is compiled inside it); generation keeps mlx-lm's compiled one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn

from mlx_dft.architectures import ARCHITECTURES


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * up


@_swiglu.vjp
def _swiglu_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    gate, up = primals
    s = mx.sigmoid(gate)
    silu = gate * s
    return cotangent * up * (s + silu * (1 - s)), cotangent * silu


#: ``silu(gate) * up``, whose backward pass keeps only ``gate`` and ``up``.
swiglu = _swiglu


def _module_of(model: nn.Module) -> ModuleType | None:
    """The mlx-lm module of ``model``'s architecture, where it has a ``swiglu`` to replace."""
    from mlx_dft.models import model_type

    arch = ARCHITECTURES.get(model_type(model))
    if arch is None:
        return None
    module = importlib.import_module(f"mlx_lm.models.{arch.mlx_module}")
    return module if hasattr(module, "swiglu") else None


@contextmanager
def lean_swiglu(model: nn.Module) -> Iterator[bool]:
    """While it lasts, ``model``'s MLPs call :func:`swiglu` (a training step traced inside keeps
    it); yields whether they do (architectures outside
    :data:`~mlx_dft.architectures.ARCHITECTURES` keep mlx-lm's)."""
    module = _module_of(model)
    if module is None:
        yield False
        return
    previous, module.swiglu = module.swiglu, swiglu
    try:
        yield True
    finally:
        module.swiglu = previous
