"""Read PyTorch zip checkpoints (``torch.save``) without torch and without running pickled code.

The unpickler resolves exactly the globals a tensor state dict needs (tensor rebuilding,
typed storages, OrderedDict) and refuses every other one, so a malicious ``.pth`` cannot
execute anything. Every storage must hold exactly the bytes its element count says, and every
tensor's offset, sizes and strides must stay inside its storage, so a crafted file can neither
crash the process nor copy process memory into a tensor. Tensors come back as numpy arrays
(bfloat16 widened exactly to float32).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from mlx_dft.errors import UserError

_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype


# A broadcast tensor (a stride of 0) may have more elements than its storage; not this many.
MAX_ELEMENTS = 1 << 31


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int for v in values):
        raise pickle.UnpicklingError(f"tensor {what} {values!r} is not a tuple of integers")
    return tuple(values)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """The tensor ``storage[offset:]`` viewed with ``size`` and ``stride``, after checking that
    every element it addresses lies inside the storage."""
    if not isinstance(storage, np.ndarray) or type(offset) is not int:
        raise pickle.UnpicklingError("malformed tensor record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    numel = storage.size
    if len(size) != len(stride) or any(v < 0 for v in (*size, *stride)) or offset < 0:
        raise pickle.UnpicklingError(f"tensor with size {size}, stride {stride}, offset {offset} is invalid")
    elements = int(np.prod(size, dtype=object)) if size else 1
    if elements == 0:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= numel:
        raise pickle.UnpicklingError(
            f"tensor with size {size}, stride {stride}, offset {offset} reaches element {last} "
            f"of a storage of {numel}"
        )
    if elements > max(numel, MAX_ELEMENTS):
        raise pickle.UnpicklingError(f"tensor with size {size} has too many elements ({elements})")
    if not size:
        return storage[offset].copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride)
    )
    return np.array(view)


# What one checkpoint may inflate to (the official Aligner checkpoints hold a few MB): a zip member
# is read only up to the size its tensors need, and never past these, whatever the zip claims.
MAX_PICKLE_BYTES = 64 << 20
MAX_TENSOR_BYTES = 1 << 30


def _read_member(zf: zipfile.ZipFile, name: str, size: int) -> bytes:
    """Exactly ``size`` bytes of the member ``name``, decompressing at most ``size + 1``: a member
    that inflates to more (a zip bomb) or less is refused without holding more than it should."""
    with zf.open(name) as f:
        raw = f.read(size + 1)
    if len(raw) != size:
        more = "more" if len(raw) > size else f"{len(raw)}"
        raise pickle.UnpicklingError(f"{name} holds {more} bytes, {size} expected")
    return raw


def load(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path}: not a PyTorch zip checkpoint (legacy or corrupt file)") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise UserError(f"{path}: not a PyTorch checkpoint (no single data.pkl)")
        root = pkls[0][: -len("data.pkl")]
        cache: dict[str, np.ndarray] = {}
        total = [0]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor_v2
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if module == "torch" and name in _STORAGES:
                    return _Storage(_STORAGES[name])
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
                _, storage, key, _location, numel = pid
                if not isinstance(storage, _Storage) or type(numel) is not int or numel < 0:
                    raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
                if key not in cache:
                    itemsize = 2 if storage.dtype == "bfloat16" else np.dtype(storage.dtype).itemsize
                    total[0] += numel * itemsize
                    if total[0] > MAX_TENSOR_BYTES:
                        raise pickle.UnpicklingError(
                            f"its tensors claim {total[0]:,} bytes, over the {MAX_TENSOR_BYTES:,} allowed"
                        )
                    raw = _read_member(zf, f"{root}data/{key}", numel * itemsize)
                    if storage.dtype == "bfloat16":
                        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                        cache[key] = bits.view(np.float32)
                    else:
                        cache[key] = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
                return cache[key]

        try:
            size = zf.getinfo(pkls[0]).file_size
            if size > MAX_PICKLE_BYTES:
                raise pickle.UnpicklingError(f"data.pkl is {size:,} bytes, more than {MAX_PICKLE_BYTES:,}")
            obj = Unpickler(io.BytesIO(_read_member(zf, pkls[0], size))).load()
        except (
            pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, OverflowError,
            zipfile.BadZipFile,
        ) as e:  # fmt: skip
            raise UserError(f"{path}: cannot read checkpoint safely ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return dict(obj)
