"""A defensive reader of GGUF files (versions 2 and 3, little-endian).

:func:`read_header` parses the header, every metadata key/value pair (all GGUF value types,
arrays included) and the tensor table, and checks all of it against the file before a byte of
tensor data is touched: magic, version, counts, string and array lengths, dimensions, tensor
types, alignment, and that every tensor lies inside the file without overlapping another. A
truncated, corrupt or unsupported file is one :class:`UserError` line naming the problem.

:func:`load_tensors` then reads the tensors. A file whose tensors are all of the types MLX
represents (F32, F16, BF16, Q4_0, Q4_1, Q8_0) is read with MLX's own GGUF reader, which hands
the quantized ones over already in MLX's affine-quantized layout (``X.weight`` packed into
uint32, ``X.scales``, ``X.biases``, groups of 32), checked against the table. Any other file
(the K-quants, IQ types, MXFP4, Q5_0/Q5_1... that Ollama and LM Studio users keep) is read tensor
by tensor from the checked offsets and dequantized with llama.cpp's own Python package, gguf-py
(:data:`DEQUANTIZED_TYPES`), every tensor to float: MLX has no layout for those blocks.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dft.errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0, and MLX's group size for them

# ggml type id -> name, for every type the format defines (so a refusal can name it).
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# The types mlx_dft reads: name -> (elements per block, bytes per block).
SUPPORTED_TYPES = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),  # float16 scale + 32 4-bit values
    "Q4_1": (32, 20),  # float16 scale and minimum + 32 4-bit values
    "Q8_0": (32, 34),  # float16 scale + 32 int8 values
}
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# The other types read, through gguf-py's numpy dequantizers (gguf 0.19; block sizes from its
# GGML_QUANT_SIZES). Integer tensors (I8...I64) and Q8_1/Q8_K (llama.cpp's activation formats) are
# not model weights and stay refused.
DEQUANTIZED_TYPES = (
    "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
    "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "F64",
)  # fmt: skip


def block_shape(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a type mlx_dft reads."""
    if type_name in SUPPORTED_TYPES:
        return SUPPORTED_TYPES[type_name]
    import gguf

    return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]])

# Metadata value type id -> (name, struct format of a scalar; None for string/array).
_VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<B"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}  # fmt: skip
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is in numpy order (GGUF lists dimensions
    innermost first); ``offset`` is absolute in the file; ``nbytes`` the stored size."""

    name: str
    shape: tuple[int, ...]
    type: str
    offset: int
    nbytes: int

    @property
    def quantized(self) -> bool:
        return self.type in QUANTIZED_TYPES


@dataclass
class GGUFHeader:
    """Everything before the tensor data, validated against the file."""

    path: Path
    version: int
    metadata: dict
    value_types: dict[str, str]  # metadata key -> GGUF value type name (ARRAY[STRING] for arrays)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    alignment: int = 32
    data_start: int = 0
    file_size: int = 0

    @property
    def native(self) -> bool:
        """Whether every tensor is of a type MLX represents (read by MLX, quantized ones kept)."""
        return all(t.type in SUPPORTED_TYPES for t in self.tensors.values())

    def dequantized_types(self) -> list[str]:
        """The types of this file that are read through gguf-py's dequantizers."""
        return sorted({t.type for t in self.tensors.values() if t.type not in SUPPORTED_TYPES})


class _Truncated(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every read checks the bytes remain."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or n > self.size - self.pos:
            raise _Truncated
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> bytes:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n])


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF file's header, metadata and tensor table (no tensor data read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, size)
            cur.pos = 4
            try:
                return _parse(path, cur)
            except _Truncated:
                raise UserError(
                    f"{path}: truncated or corrupt GGUF file (its header runs past the end of the "
                    f"file, {size} bytes, at byte {cur.pos})"
                ) from None


def _parse(path: Path, cur: _Cursor) -> GGUFHeader:
    version = cur.scalar("<I")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and version >> 16:
            raise UserError(f"{path} is a big-endian GGUF file, which mlx_dft does not read")
        raise UserError(f"{path} is GGUF version {version}, which mlx_dft does not read (supported: 2, 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    # Each key/value pair takes at least 12 bytes, each tensor entry at least 24: a count the
    # file cannot hold is corruption, caught before it sizes anything.
    if n_kv * 12 > cur.size or n_tensors * 24 > cur.size:
        raise UserError(
            f"{path}: corrupt GGUF file ({n_tensors} tensors, {n_kv} metadata keys in {cur.size} bytes)"
        )
    header = GGUFHeader(path, version, {}, {}, file_size=cur.size)
    for _ in range(n_kv):
        key = _decode(path, cur.string(), "metadata key")
        if key in header.metadata:
            raise UserError(f"{path}: metadata key {key} appears twice")
        vtype = cur.scalar("<I")
        header.metadata[key], header.value_types[key] = _value(path, cur, vtype, key)
    for _ in range(n_tensors):
        info = _tensor_info(path, cur)
        if info.name in header.tensors:
            raise UserError(f"{path}: tensor {info.name} appears twice")
        header.tensors[info.name] = info
    header.alignment = _alignment(path, header)
    header.data_start = -(-cur.pos // header.alignment) * header.alignment
    _place_tensors(path, header)
    return header


def _decode(path: Path, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: corrupt GGUF file ({what} {raw[:40]!r} is not UTF-8)") from None


def _value(path: Path, cur: _Cursor, vtype: int, key: str):
    """(value, type name) of one metadata value; arrays become lists."""
    if vtype not in _VALUE_TYPES:
        raise UserError(f"{path}: metadata key {key} has unknown value type {vtype} (corrupt GGUF file?)")
    name, fmt = _VALUE_TYPES[vtype]
    if vtype == _STRING:
        return _decode(path, cur.string(), f"the value of {key}"), name
    if vtype != _ARRAY:
        value = cur.scalar(fmt)
        if name == "FLOAT32":  # the shortest decimal that is this float32: 1e-05, not 9.99999974e-06
            value = float(str(np.float32(value)))
        if vtype == _BOOL:
            if value not in (0, 1):
                raise UserError(f"{path}: metadata key {key} is a bool of value {value} (corrupt GGUF file?)")
            value = bool(value)
        return value, name
    etype, count = cur.scalar("<I"), cur.scalar("<Q")
    if etype not in _VALUE_TYPES or etype == _ARRAY:
        what = "arrays of arrays" if etype == _ARRAY else f"unknown element type {etype}"
        raise UserError(f"{path}: metadata key {key} is an array of {what}, which mlx_dft does not read")
    ename, efmt = _VALUE_TYPES[etype]
    if etype == _STRING:
        if count * 8 > cur.size - cur.pos:  # every string takes at least its 8-byte length
            raise _Truncated
        return [_decode(path, cur.string(), f"an element of {key}") for _ in range(count)], f"ARRAY[{ename}]"
    itemsize = struct.calcsize(efmt)
    start = cur.take(count * itemsize)
    values = np.frombuffer(cur.buf, dtype=np.dtype(efmt), count=count, offset=start)
    if etype == _BOOL:
        if values.size and values.max() > 1:
            raise UserError(
                f"{path}: metadata key {key} holds a bool that is neither 0 nor 1 (corrupt GGUF file?)"
            )
        values = values.astype(bool)
    return values.tolist(), f"ARRAY[{ename}]"


def _tensor_info(path: Path, cur: _Cursor) -> TensorInfo:
    name = _decode(path, cur.string(), "tensor name")
    n_dims = cur.scalar("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise UserError(f"{path}: tensor {name} has {n_dims} dimensions (corrupt GGUF file?)")
    dims = [cur.scalar("<Q") for _ in range(n_dims)]  # innermost first
    type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
    if min(dims) < 1 or max(dims) >= 2**40:
        raise UserError(f"{path}: tensor {name} has dimensions {dims} (corrupt GGUF file?)")
    type_name = GGML_TYPE_NAMES.get(type_id, f"{type_id}")
    if type_name not in SUPPORTED_TYPES and type_name not in DEQUANTIZED_TYPES:
        known = "" if type_id in GGML_TYPE_NAMES else " (a type id unknown to mlx_dft)"
        raise UserError(
            f"{path}: tensor {name} has type {type_name}{known}, which mlx_dft does not read (it reads "
            f"{', '.join(SUPPORTED_TYPES)} and, through gguf-py, {', '.join(DEQUANTIZED_TYPES)})"
        )
    block, block_bytes = block_shape(type_name)
    if dims[0] % block:
        raise UserError(
            f"{path}: tensor {name} of type {type_name} has rows of {dims[0]} values, "
            f"not a multiple of {block}"
        )
    if type_name in QUANTIZED_TYPES and not name.endswith(".weight"):
        raise UserError(
            f"{path}: tensor {name} is quantized ({type_name}) but is not a .weight, "
            "which mlx_dft does not read"
        )
    nbytes = int(np.prod(dims, dtype=object)) // block * block_bytes
    return TensorInfo(name, tuple(reversed(dims)), type_name, offset, nbytes)


def _alignment(path: Path, header: GGUFHeader) -> int:
    if "general.alignment" not in header.metadata:
        return 32
    value, vtype = header.metadata["general.alignment"], header.value_types["general.alignment"]
    if vtype != "UINT32" or value < 1 or value & (value - 1):
        raise UserError(
            f"{path}: general.alignment is {value} ({vtype}), not a power of two (corrupt GGUF file?)"
        )
    return value


def _place_tensors(path: Path, header: GGUFHeader) -> None:
    """Make offsets absolute; check alignment, bounds and overlaps."""
    end_of_previous, previous = header.data_start, None
    placed = {}
    for info in sorted(header.tensors.values(), key=lambda t: t.offset):
        if info.offset % header.alignment:
            raise UserError(
                f"{path}: tensor {info.name} is not aligned to {header.alignment} bytes (corrupt GGUF file?)"
            )
        start = header.data_start + info.offset
        end = start + info.nbytes
        if end > header.file_size:
            raise UserError(
                f"{path}: truncated GGUF file (tensor {info.name} ends at byte {end}, "
                f"the file has {header.file_size} bytes)"
            )
        if start < end_of_previous:
            raise UserError(f"{path}: tensors {previous} and {info.name} overlap (corrupt GGUF file?)")
        end_of_previous, previous = end, info.name
        placed[info.name] = TensorInfo(info.name, info.shape, info.type, start, info.nbytes)
    header.tensors = {name: placed[name] for name in header.tensors}


def expected_arrays(info: TensorInfo) -> dict[str, tuple[int, ...]]:
    """The arrays (name -> shape) MLX's reader returns for one tensor: the tensor itself, or the
    packed weight, scales and biases of a quantized one."""
    if not info.quantized:
        return {info.name: info.shape}
    bits = 8 if info.type == "Q8_0" else 4
    *rows, cols = info.shape
    base = info.name[: -len(".weight")]
    return {
        info.name: (*rows, cols * bits // 32),
        f"{base}.scales": (*rows, cols // GROUP_SIZE),
        f"{base}.biases": (*rows, cols // GROUP_SIZE),
    }


def load_tensors(header: GGUFHeader, dtype: mx.Dtype = mx.float16, each=None) -> dict[str, mx.array]:
    """The tensors of a file :func:`read_header` validated: keyed as :func:`expected_arrays` says
    where :attr:`GGUFHeader.native`; else each tensor as floats (:func:`load_dequantized`, which
    passes each through ``each``).

    BF16 tensors are read here, exactly: MLX's reader narrows them to float16, which cannot hold
    bfloat16's range."""
    if not header.native:
        return load_dequantized(header, dtype, each)
    expected: dict[str, tuple[int, ...]] = {}
    for info in header.tensors.values():
        arrays = expected_arrays(info)
        if expected.keys() & arrays.keys():
            raise UserError(
                f"{header.path}: tensor {info.name} collides with another tensor's quantization arrays"
            )
        expected.update(arrays)
    try:
        arrays = mx.load(str(header.path)) if header.tensors else {}
    except Exception as e:  # noqa: BLE001  (MLX's reader raises plain runtime errors)
        raise UserError(f"{header.path}: cannot read the tensors ({str(e).splitlines()[0]})") from None
    if arrays.keys() != expected.keys():
        odd = sorted(arrays.keys() ^ expected.keys())[:3]
        raise UserError(f"{header.path}: MLX's GGUF reader returned unexpected tensors ({', '.join(odd)})")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise UserError(
                f"{header.path}: tensor {name} read with shape {arrays[name].shape}, expected {shape}"
            )
    for info in header.tensors.values():
        if info.type == "BF16":
            raw = np.fromfile(header.path, dtype="<u2", count=info.nbytes // 2, offset=info.offset)
            arrays[info.name] = mx.array(raw).view(mx.bfloat16).reshape(info.shape)
    return arrays


def load_dequantized(header: GGUFHeader, dtype: mx.Dtype = mx.float16, each=None) -> dict[str, mx.array]:
    """Every tensor of the file as floats, read from the offsets :func:`read_header` checked:
    F32, F16 and BF16 as stored, every block type dequantized by gguf-py (llama.cpp's reference
    dequantizers, in float32) and then cast to ``dtype`` (float32 keeps the values exactly).
    ``each(info, array, raw)``, when given, replaces each tensor as it is read, ``raw`` its bytes
    (re-quantization: the file's float values are never all held at once)."""
    import gguf

    out = {}
    for info in header.tensors.values():
        raw = np.fromfile(header.path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if raw.size != info.nbytes:
            raise UserError(f"{header.path}: tensor {info.name} could not be read whole (the file changed?)")
        if info.type == "F32":
            arr = mx.array(raw.view("<f4").reshape(info.shape))
        elif info.type == "F16":
            arr = mx.array(raw.view("<f2").reshape(info.shape))
        elif info.type == "BF16":
            arr = mx.array(raw.view("<u2").reshape(info.shape)).view(mx.bfloat16)
        elif info.type == "F64":  # (gguf-py has no dequantizer for it: a plain cast)
            arr = mx.array(raw.view("<f8").astype(np.float32).reshape(info.shape))
        else:
            block, block_bytes = block_shape(info.type)
            rows = raw.reshape(-1, info.shape[-1] // block * block_bytes)
            values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[info.type])
            arr = mx.array(values.astype(np.float32, copy=False).reshape(info.shape)).astype(dtype)
        if each is not None:
            arr = each(info, arr, raw)
        out[info.name] = arr
        mx.eval(arr)  # one tensor at a time: the file's bytes are not all held twice
    return out
