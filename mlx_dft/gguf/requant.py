"""GGUF block types MLX has no layout for, re-quantized to MLX's affine one (``--requantize``;
``--model FILE.gguf`` on a GPU), so that a 4-bit file stays 4-bit.

MLX's affine layout stores ``x = scale * q + bias`` for each group of 32 values, q an unsigned
integer of ``bits`` bits. Several of llama.cpp's types are exactly that, with other names:

- Q4_K and Q5_K: super-blocks of 256 in 8 sub-blocks of 32, each ``d * sc * q - dmin * m`` with
  4- or 5-bit q (sc and m the 6-bit sub-block scales and mins, read with gguf-py's own unpacker);
- Q5_0, Q5_1, and Q4_0, Q4_1, Q8_0 in files MLX cannot read itself: blocks of 32, ``d * (q - o)``
  or ``d * q + m``.

These keep their codes (:func:`exact_affine`): each group's scale and bias come from the block's
own, the codes from the file's values (``q = (x - bias) / scale``, integers), and only rounding the
scales and biases to float16 (as MLX's loader keeps them) moves a value. The others (Q6_K, Q3_K and
Q2_K, whose sub-blocks of 16 have scales of their own; the IQ codebooks; MXFP4) are fitted by
``mx.quantize`` at :func:`requantize_bits` (two bits more than they carry, so the rounding this
adds is about a quarter of the file's own). Either way the
error, relative RMS difference from the file's values, is measured per type and said in one line
(:class:`RequantizeError`).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

GROUP = 32
MLX_BITS = (2, 3, 4, 5, 6, 8)
# A type fitted afresh (not one of :data:`AFFINE`) gets this many bits more than it carries: a
# new affine grid laid over values already rounded to another one adds rounding of its own, about
# as large as the file's at the same width, a quarter of it with two more bits (Q6_K: 8-bit).
FIT_EXTRA_BITS = 2
MIN_BITS = 4  # (MLX's plain groups of 32 at 2-3 bits lose far more than llama.cpp's sub-block scales)


def requantize_bits(type_name: str) -> int:
    """The MLX affine bits a tensor of GGUF type ``type_name`` is re-quantized to: an affine type's
    own width; any other's (the digit in its name; MXFP4: 4) plus :data:`FIT_EXTRA_BITS`, at least
    :data:`MIN_BITS`, rounded up to one MLX has (at most 8)."""
    if type_name in AFFINE:
        return AFFINE[type_name][2]
    digits = [int(c) for c in type_name if c.isdigit()]
    nominal = digits[0] if type_name.startswith(("Q", "IQ", "TQ")) and digits else 4
    wanted = min(max(nominal + FIT_EXTRA_BITS, MIN_BITS), MLX_BITS[-1])
    return min(b for b in MLX_BITS if b >= wanted)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of each block, as float32 [blocks, 1]."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _offset(code_offset: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``d * (q - o)``: scale d, bias -o d (Q4_0, Q5_0, Q8_0 with its signed q as q + 128)."""

    def scales(blocks):
        d = _f16(blocks, 0)
        return d, -code_offset * d

    return scales


def _with_min(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d * q + m`` (Q4_1, Q5_1)."""
    return _f16(blocks, 0), _f16(blocks, 2)


def _k_quant(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d * sc_j * q - dmin * m_j`` per sub-block j of 32 (Q4_K, Q5_K)."""
    import gguf

    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return _f16(blocks, 0) * sc.astype(np.float32), -(_f16(blocks, 2) * m.astype(np.float32))


# type: (values a block, bytes a block, bits, the blocks' group scales and biases)
AFFINE: dict[str, tuple[int, int, int, Callable]] = {
    "Q4_0": (32, 18, 4, _offset(8)), "Q4_1": (32, 20, 4, _with_min), "Q5_0": (32, 22, 5, _offset(16)),
    "Q5_1": (32, 24, 5, _with_min), "Q8_0": (32, 34, 8, _offset(128)), "Q4_K": (256, 144, 4, _k_quant),
    "Q5_K": (256, 176, 5, _k_quant),
}  # fmt: skip


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packed layout of unsigned codes [rows, cols]: one little-endian bit stream a row, code
    i at bits [i * bits, (i + 1) * bits), read as uint32 (tested against ``mx.dequantize``)."""
    rows, cols = codes.shape
    planes = (codes.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    stream = planes.astype(np.uint8).reshape(rows, cols * bits // 8, 8)
    return np.packbits(stream, axis=-1, bitorder="little").reshape(rows, -1).view(np.uint32)


def exact_affine(type_name: str, raw: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """(packed, scales, biases, bits) of a tensor of an affine block type, its codes kept; None for
    other types. ``raw``: the tensor's bytes, ``values`` [..., cols]: gguf-py's float32 values."""
    spec = AFFINE.get(type_name)
    if spec is None:
        return None
    per_block, nbytes, bits, scales_of = spec
    cols = values.shape[-1]
    v = values.reshape(-1, cols // GROUP, GROUP)
    scale, bias = scales_of(raw.reshape(-1, nbytes))
    scale, bias = scale.reshape(v.shape[:2]), bias.reshape(v.shape[:2])
    safe = np.where(scale == 0, 1, scale)
    codes = np.where(scale[..., None] == 0, 0, np.rint((v - bias[..., None]) / safe[..., None]))
    codes = np.clip(codes, 0, (1 << bits) - 1).reshape(-1, cols)
    lead = values.shape[:-1]
    return (
        pack_codes(codes, bits).reshape(*lead, -1),
        scale.astype(np.float16).reshape(*lead, -1),
        bias.astype(np.float16).reshape(*lead, -1),
        bits,
    )


class RequantizeError:
    """Relative RMS difference re-quantizing makes, per GGUF type: sqrt(sum (W_mlx - W)^2 / sum W^2)
    over every re-quantized tensor of the type, W the file's own values."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.kept: set[str] = set()  # types whose codes were kept

    def add(self, type_name: str, exact: mx.array, approx: mx.array) -> None:
        diff = (approx.astype(mx.float32) - exact).astype(mx.float32)
        acc = self.sums.setdefault(type_name, [0.0, 0.0])
        acc[0] += float(mx.sum(diff * diff).item())
        acc[1] += float(mx.sum(exact.astype(mx.float32) ** 2).item())

    def relative(self) -> dict[str, float]:
        return {t: (d / r) ** 0.5 if r > 0 else 0.0 for t, (d, r) in sorted(self.sums.items())}

    def line(self, file: str) -> str:
        parts = [
            f"{t} {requantize_bits(t)}-bit "
            f"({'codes kept, ' if t in self.kept else ''}error {e:.1e})"
            for t, e in self.relative().items()
        ]
        return (
            f"note: {file}: {', '.join(parts)}: re-quantized to MLX's affine layout (groups of {GROUP}); "
            "error: relative RMS difference from the file's own values"
        )


def requantize(info, values: mx.array, raw: np.ndarray | None, errors: RequantizeError) -> tuple:
    """MLX affine (weight, scales, biases, bits) of one tensor of a block type, from gguf-py's float32
    ``values`` and, for the affine types, the tensor's ``raw`` bytes (their codes kept)."""
    exact = exact_affine(info.type, raw, np.array(values, copy=False)) if raw is not None else None
    if exact is not None:
        packed, scales, biases, bits = (mx.array(a) if isinstance(a, np.ndarray) else a for a in exact)
        errors.kept.add(info.type)
    else:
        bits = requantize_bits(info.type)
        packed, scales, biases = mx.quantize(values, GROUP, bits)
        scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    errors.add(info.type, values, mx.dequantize(packed, scales, biases, GROUP, bits))
    mx.eval(packed, scales, biases)
    return packed, scales, biases, bits
