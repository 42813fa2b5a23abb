"""Read PyTorch zip checkpoints (``torch.save``) without torch and without running pickled code.

The unpickler resolves exactly the globals a tensor state dict needs (tensor rebuilding,
typed storages, OrderedDict) and refuses every other one, so a malicious ``.pth`` cannot
execute anything. Tensors come back as numpy arrays (bfloat16 widened exactly to float32).
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


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    flat = storage
    itemsize = flat.dtype.itemsize
    if not size:
        return flat[offset].copy()
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


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
                if key not in cache:
                    raw = zf.read(f"{root}data/{key}")
                    if storage.dtype == "bfloat16":
                        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                        cache[key] = bits.view(np.float32)
                    else:
                        cache[key] = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
                return cache[key]

        try:
            obj = Unpickler(io.BytesIO(zf.read(pkls[0]))).load()
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
            raise UserError(f"{path}: cannot read checkpoint safely ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return dict(obj)
