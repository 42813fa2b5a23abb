"""Atomic files and resumable checkpoints.

Layout of an output folder::

    adapter_config.json        everything needed to reload the adapter and to resume
    adapters.safetensors       the newest adapter weights (final ones when the run ends)
    metrics.jsonl              one JSON object per report
    checkpoints/step-0000100/  adapter weights + optimizer.safetensors + trainer_state.json
                               + adapter_config.json (so a checkpoint is itself an adapter folder)

Every file is written to a temporary name and renamed into place, and a checkpoint
folder is assembled under a temporary name and renamed whole, so a run killed at any
moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dft.errors import UserError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINTS = "checkpoints"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    output: Path,
    step: int,
    weight_files: dict[str, dict[str, mx.array]],
    optimizer_state: dict,
    state: dict,
    adapter_config: dict,
    keep: int = 0,
) -> Path:
    """Write ``checkpoints/step-N`` atomically; returns its path."""
    final = Path(output) / CHECKPOINTS / checkpoint_name(step)
    with staged_folder(final, overwrite=True) as tmp:
        for fname, arrays in weight_files.items():
            mx.save_safetensors(str(tmp / fname), arrays)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer_state)))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    if keep > 0:
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output: Path) -> list[Path]:
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of an output folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"resume path not found: {p}")
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise UserError(f"{p} holds no checkpoint to resume from (no checkpoints/step-*/{STATE_FILE})")
    return found[-1]


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint / STATE_FILE}: unreadable checkpoint state ({e})") from None


def load_optimizer_state(checkpoint: Path) -> dict:
    path = checkpoint / OPTIMIZER_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} has no {OPTIMIZER_FILE}")
    try:
        flat = mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    return tree_unflatten(list(flat.items()))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run writes them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
