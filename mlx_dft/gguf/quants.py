"""Tensor encodings a GGUF file can hold, written in numpy: F32, F16, and llama.cpp's Q8_0 and Q4_0.

Both quantized types cut each row into blocks of 32 values with one float16 scale ``d``
(llama.cpp's reference quantizers, ``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``):

- Q8_0, 34 bytes a block: ``d = max|x| / 127``, ``q = round(x / d)`` (half away from zero) as
  int8; the value is ``d * q``.
- Q4_0, 18 bytes a block: ``d = m / -8`` where ``m`` is the value of largest magnitude (sign
  kept), ``q = min(15, floor(x / d + 8.5))``; byte ``j`` holds element ``j`` in its low nibble and
  element ``j + 16`` in its high one; the value is ``d * (q - 8)``.

The scale is computed in float32 and stored as float16, as llama.cpp does (the quantized values
use the float32 scale, the stored one is its float16 rounding).
"""

from __future__ import annotations

import numpy as np

from mlx_dft.errors import UserError

# ggml's type ids (ggml.h) for the types written here.
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8}
BLOCK = 32  # values per Q8_0 / Q4_0 block
BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2}
ELEMENT_BYTES = {"F32": 4, "F16": 2}


def nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Stored size of a tensor of ``shape`` (numpy order) in ``ggml_type``."""
    n = int(np.prod(shape, dtype=np.int64))
    if ggml_type in ELEMENT_BYTES:
        return n * ELEMENT_BYTES[ggml_type]
    if shape[-1] % BLOCK:
        raise UserError(f"a {ggml_type} tensor needs rows that are a multiple of {BLOCK}; got shape {shape}")
    return n // BLOCK * BLOCK_BYTES[ggml_type]


def _blocks(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, BLOCK)


def _scale_inverse(d: np.ndarray) -> np.ndarray:
    # llama.cpp multiplies by 1/d (0 for an all-zero block), it does not divide by d.
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _q8_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    v = b * _scale_inverse(d)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)  # C's roundf
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def _q4_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    at = np.abs(b).argmax(axis=1)[:, None]  # the first value of largest magnitude, as llama.cpp
    d = (np.take_along_axis(b, at, axis=1) / np.float32(-8)).astype(np.float32)
    q = np.minimum(np.floor(b * _scale_inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    packed = q[:, : BLOCK // 2] | (q[:, BLOCK // 2 :] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)


def encode(x: np.ndarray, ggml_type: str) -> bytes:
    """The bytes of ``x`` (any float array) stored as ``ggml_type``, rows of the last axis."""
    if ggml_type == "F32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if ggml_type == "F16":
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    nbytes(ggml_type, x.shape)  # checks the row length
    return (_q8_0 if ggml_type == "Q8_0" else _q4_0)(x).tobytes()


def decode(data: bytes, ggml_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a tensor stored as ``ggml_type`` (the inverse of :func:`encode`,
    up to its rounding): what a reader of the file computes with."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if ggml_type in ELEMENT_BYTES:
        return raw.view("<f4" if ggml_type == "F32" else "<f2").astype(np.float32).reshape(shape)
    blocks = raw.reshape(-1, BLOCK_BYTES[ggml_type])
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if ggml_type == "Q8_0":
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        low, high = blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4
        q = np.concatenate([low, high], axis=1).astype(np.float32) - 8
    return (d * q).reshape(shape)
