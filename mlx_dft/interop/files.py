"""Reading other tools' files defensively: missing, corrupt or truncated files are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlx_dft.errors import UserError


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Tensors of a safetensors file; a missing, corrupt or truncated file is a one-line error."""
    if not path.is_file():
        raise UserError(f"{path} not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, the header describes {8 + n + end}")
        return mx.load(str(path))
    except Exception as e:  # noqa: BLE001  (any parse failure is the same user-facing problem)
        raise UserError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
