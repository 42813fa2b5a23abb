"""A GGUF version 3 writer (little-endian), the file format of llama.cpp.

Layout, as ``gguf.h`` reads it:

    magic "GGUF", version (u32) = 3, tensor count (u64), metadata count (u64)
    metadata: key (string), value type (u32), value   -- a string is a u64 length + UTF-8 bytes;
              an array is element type (u32), count (u64), elements
    tensor infos: name (string), dimension count (u32), dimensions (u64 each, innermost first:
              the reverse of numpy's shape), ggml type (u32), offset (u64) from the data start
    padding to the alignment (32 bytes, ``general.alignment`` when set), then each tensor's bytes,
    each padded to the alignment

Metadata values are typed explicitly (:class:`ValueType`): llama.cpp refuses a key stored with
another type than the one it reads (``block_count`` must be UINT32, not INT64). Tensors are
encoded one at a time as the file is written (:mod:`mlx_dft.gguf.quants`), so a model never sits in
memory twice; the file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import enum
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_dft.files import TMP_PREFIX
from mlx_dft.gguf import quants

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32


class ValueType(enum.IntEnum):
    """GGUF metadata value types (``enum gguf_type``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _scalar(vtype: ValueType, value) -> bytes:
    if vtype == ValueType.STRING:
        return _string(value)
    if vtype == ValueType.BOOL and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"a BOOL value must be a bool, got {value!r}")
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def _array(vtype: ValueType, values: Sequence) -> bytes:
    head = struct.pack("<IQ", vtype, len(values))
    if vtype == ValueType.STRING:
        return head + b"".join(_string(v) for v in values)
    if vtype == ValueType.ARRAY:
        raise TypeError("nested arrays are not written")
    # Numbers in bulk through numpy (a vocabulary's token types are 100k+ values).
    return head + np.asarray(values, dtype=np.dtype(_SCALAR_FORMATS[vtype].replace("?", "b1"))).tobytes()


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: ``shape`` in numpy order; ``data()`` returns its float values when the
    file is written (called once), encoded then as ``ggml_type``."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return quants.nbytes(self.ggml_type, self.shape)


def _pad(n: int, alignment: int = ALIGNMENT) -> int:
    return (alignment - n % alignment) % alignment


class GGUFWriter:
    """Collects metadata and tensors, then writes one GGUF file (:meth:`write`)."""

    def __init__(self) -> None:
        self._meta: dict[str, bytes] = {}
        self._tensors: dict[str, PlannedTensor] = {}

    def add(self, key: str, vtype: ValueType, value) -> None:
        """A scalar or string value."""
        if key in self._meta:
            raise ValueError(f"duplicate GGUF metadata key {key}")
        self._meta[key] = struct.pack("<I", vtype) + _scalar(vtype, value)

    def add_array(self, key: str, vtype: ValueType, values: Sequence) -> None:
        """An array of ``vtype`` elements (numbers, bools or strings)."""
        if key in self._meta:
            raise ValueError(f"duplicate GGUF metadata key {key}")
        self._meta[key] = struct.pack("<I", ValueType.ARRAY) + _array(vtype, values)

    def add_string(self, key: str, value: str) -> None:
        self.add(key, ValueType.STRING, value)

    def add_uint32(self, key: str, value: int) -> None:
        self.add(key, ValueType.UINT32, int(value))

    def add_float32(self, key: str, value: float) -> None:
        self.add(key, ValueType.FLOAT32, float(value))

    def add_bool(self, key: str, value: bool) -> None:
        self.add(key, ValueType.BOOL, bool(value))

    def add_tensor(
        self, name: str, shape: tuple[int, ...], ggml_type: str, data: Callable[[], np.ndarray]
    ) -> None:
        if name in self._tensors:
            raise ValueError(f"duplicate GGUF tensor {name}")
        if ggml_type not in quants.GGML_TYPES:
            raise ValueError(f"unknown tensor type {ggml_type}")
        planned = PlannedTensor(name, tuple(int(s) for s in shape), ggml_type, data)
        planned.nbytes  # noqa: B018  (checks the shape fits the type before anything is written)
        self._tensors[name] = planned

    @property
    def tensors(self) -> list[PlannedTensor]:
        return list(self._tensors.values())

    def _header(self) -> bytes:
        out = [MAGIC, struct.pack("<IQQ", VERSION, len(self._tensors), len(self._meta))]
        for key, value in self._meta.items():
            out += [_string(key), value]
        offset = 0
        for t in self._tensors.values():
            dims = tuple(reversed(t.shape))
            out += [_string(t.name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims)]
            out.append(struct.pack("<IQ", quants.GGML_TYPES[t.ggml_type], offset))
            offset += t.nbytes + _pad(t.nbytes)
        head = b"".join(out)
        return head + b"\0" * _pad(len(head))

    def write(self, path: str | Path) -> Path:
        """Write the file: under a temporary name beside ``path``, renamed into place once whole."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._header())
                for t in self._tensors.values():
                    values = np.asarray(t.data(), dtype=np.float32)
                    if values.shape != t.shape:
                        raise ValueError(f"tensor {t.name}: planned shape {t.shape}, got {values.shape}")
                    data = quants.encode(values, t.ggml_type)
                    f.write(data + b"\0" * _pad(len(data)))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
