"""Files in and out, the bottom floor every other module stands on.

- Writes are atomic: a file is written under a temporary name and renamed into place; a folder is
  assembled under a temporary name and renamed whole (``staged_folder``). A run killed at any
  moment never leaves a half-written file or folder under the final name.
- Reads of files that come from outside (JSON, JSONL, safetensors) are defensive: a missing,
  corrupt or truncated file is a one-line :class:`UserError` naming the file (and the line).
- ``local_or_hub`` turns "a local path or a Hugging Face repo id" into a local path, through
  huggingface_hub's cache (so ``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx

from mlx_dft.errors import UserError

# ------------------------------------------------------------------ writing


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file respects the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    path = Path(path)
    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp.safetensors"
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename, on failure
    it is removed, so ``out`` is never left half-written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists and is not empty (choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the finished folder respects the umask
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ reading


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; missing, invalid or non-object files are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_jsonl(path: Path, what: str = "data") -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSON-lines file of objects."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {lineno}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    if not records:
        raise UserError(f"{path} is empty: no records")
    return records


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or describes more bytes than it holds."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        if any(not (0 <= a <= b) for a, b in ends):
            raise ValueError("negative or reversed data offsets")
        end = max((b for _, b in ends), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, the header describes {8 + n + end}")
    except Exception as e:  # noqa: BLE001  (any parse failure is the same user-facing problem)
        raise UserError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Tensors of a safetensors file; a missing, corrupt or truncated file is a one-line error."""
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None


def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` strings of a safetensors header ({} when absent or unreadable)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > Path(path).stat().st_size - 8:
                return {}
            header = json.loads(f.read(n))
        meta = header.get("__metadata__", {})
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------ local path or Hub repo


def looks_like_repo_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and all(name.split("/"))


def local_or_hub(name: str | Path, patterns: Sequence[str], what: str) -> Path:
    """A local path as it is, else a Hugging Face repo id downloaded (or found in the cache)
    restricted to ``patterns``. ``what`` names the thing in the error ("model", "adapter")."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    name = str(name)
    if not looks_like_repo_id(name):
        raise UserError(f"{what} not found: {name} (give a local path or a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=list(patterns)))
    except Exception as e:  # offline, missing repo, gated...
        raise UserError(
            f"{what} not found: {name} is neither a local path nor a reachable "
            f"Hugging Face repo ({type(e).__name__})"
        ) from None
