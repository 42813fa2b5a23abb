"""A leaner SwiGLU (and GeGLU activation) for training, put into mlx-lm's MLPs from outside.

mlx-lm's MLPs compute ``down(swiglu(gate(x), up(x)))`` with ``swiglu(g, u) = silu(g) * u``.
Differentiated by autodiff, that keeps three [tokens, intermediate] arrays per layer for the
backward pass (measured at the Qwen3-0.6B shape: 0.20 GB more peak memory than keeping two).
:func:`swiglu` computes the same forward values with the same operations, and has its own
vector-Jacobian product that keeps only its two inputs, recomputing the sigmoid:

    d/dg [g s(g) u] = u (s + g s (1 - s)),    d/du [g s(g) u] = g s

:func:`mlx_dft.patches.lean_swiglu` puts it in place of mlx-lm's ``swiglu`` in the modules of a
model's layers while the training loss runs (the step is compiled inside it); generation keeps
mlx-lm's compiled one.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

_mlx_gelu_approx = nn.gelu_approx  # MLX's own, kept before anything swaps it


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


_ROOT_2_PI = math.sqrt(2 / math.pi)


@mx.custom_function
def _gelu_approx(x: mx.array) -> mx.array:
    return _mlx_gelu_approx(x)


@_gelu_approx.vjp
def _gelu_approx_vjp(primals, cotangent: mx.array, output: mx.array):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    t = mx.tanh(_ROOT_2_PI * (x + 0.044715 * x**3))
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _ROOT_2_PI * (1 + 3 * 0.044715 * x * x)
    return (cotangent * d,)


#: MLX's ``gelu_approx`` (gemma's GeGLU), the same forward values (it calls MLX's), with a
#: backward pass that keeps only its input and recomputes the tanh: autodiff of MLX's keeps its
#: intermediates, ~0.12 GB a layer more at the Gemma-3-1B shape and 1,710 tokens.
gelu_approx = _gelu_approx
