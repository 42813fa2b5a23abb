"""Files in and out, the bottom floor every other module stands on.

- Writes are atomic: a file is written under a temporary name and renamed into place; a folder is
  assembled under a temporary name and renamed whole (``staged_folder``). A run killed at any
  moment never leaves a half-written file or folder under the final name. Every temporary name
  starts with :data:`TMP_PREFIX`, and only such names are ever cleaned up after a killed run:
  nothing mlx_dft did not create is removed.
- An output folder is locked (:func:`lock_folder`) while it is written, so two processes never
  write one folder; a staged folder replaces only what was there when it started.
- Reads of files that come from outside (JSON, JSONL, safetensors) are defensive: a missing,
  corrupt or truncated file is a one-line :class:`UserError` naming the file (and the line).
- ``local_or_hub`` turns "a local path or a Hugging Face repo id" into a local path, through
  huggingface_hub's cache (so ``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mlx.core as mx

from mlx_dft.errors import UserError

# ------------------------------------------------------------------ writing

# The start of every temporary file or folder name mlx_dft writes, and of nothing else: a killed
# run's leftovers are recognised by it (and removed), never by a bare leading dot.
TMP_PREFIX = ".mlx_dft-tmp."
# Held (flock) by the process writing a folder; its presence marks a folder mlx_dft writes.
LOCK_FILE = ".mlx_dft.lock"


def is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files and folders a killed mlx_dft process left in ``folder`` (names
    starting with :data:`TMP_PREFIX`; nothing else)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not is_temporary(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` other than mlx_dft's lock file and temporaries (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not is_temporary(p.name))


def lock_folder(folder: Path, what: str = "--output"):
    """An exclusive lock on ``folder`` held while the returned file stays open (the OS drops it
    when the process ends, however it ends). A folder locked by another process is refused."""
    import fcntl

    try:
        f = open(Path(folder) / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"{what} {folder}: cannot write in it ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        if holder == f"process {os.getpid()}":
            return f  # an earlier run of this same process (its lock lives until it is collected)
        f.close()
        raise UserError(
            f"{what} {folder} is in use by {holder}: wait for it to finish or choose another {what}"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()}")
    f.flush()
    return f


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved, links followed)."""
    try:
        path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return path == folder or folder in path.parents


def check_apart(out: Path, sources: dict[str, object], what: str = "--output", same_ok: tuple = ()) -> None:
    """Refuse an output that is one of the command's local inputs, lies inside one, or holds one
    (``sources``: {option: path, Hub id or None}; an option in ``same_ok`` may be the output
    itself, as a resumed run's folder is)."""
    for option, src in sources.items():
        if not src:
            continue
        try:
            src_path = Path(str(src)).expanduser()
            if not src_path.exists():
                continue  # a Hub id or a name, not a local path
        except (OSError, ValueError):
            continue
        out_in_src, src_in_out = inside(out, src_path), inside(src_path, out)
        if out_in_src and src_in_out:
            if option in same_ok:
                continue
            raise UserError(f"{what} {out} would overwrite the input {option} {src}: choose another output")
        if out_in_src:
            raise UserError(f"{what} {out} lies inside the input {option} {src}: choose an output outside it")
        if src_in_out:
            raise UserError(f"{what} {out} holds the input {option} {src}: choose an output that does not")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
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


# Arrays that stand for others fetched only when written (id -> fetch): a model sharded over
# several processes saves each whole tensor in turn, never all of them at once (mlx_dft.sharding).
DEFERRED: dict[int, Callable[[], mx.array]] = {}
_SAFETENSORS_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.float64: "F64", mx.int8: "I8",
    mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.uint8: "U8", mx.uint16: "U16",
    mx.uint32: "U32", mx.uint64: "U64", mx.bool_: "BOOL",
}  # fmt: skip


def _write_streamed(path: str, arrays: dict, metadata: dict | None) -> None:
    """A safetensors file written one tensor at a time (those in :data:`DEFERRED` fetched as they
    come): what ``mx.save_safetensors`` writes, without every tensor in memory at once."""
    import numpy as np

    names = sorted(arrays)
    header: dict = {"__metadata__": metadata} if metadata else {}
    start = 0
    for k in names:
        a = arrays[k]
        end = start + a.size * a.dtype.size
        header[k] = {"dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape)}
        header[k]["data_offsets"] = [start, end]
        start = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in names:
            a = arrays[k]
            fetch = DEFERRED.get(id(a))
            whole = fetch() if fetch is not None else a
            if whole.shape != a.shape or whole.dtype != a.dtype:
                raise ValueError(f"{k}: fetched {whole.shape} {whole.dtype} for {a.shape} {a.dtype}")
            raw = whole.view(mx.uint16) if whole.dtype == mx.bfloat16 else whole
            f.write(np.ascontiguousarray(np.asarray(raw)).data)
            del whole, raw


def save_safetensors(path: Path | str, arrays: dict, metadata: dict | None = None) -> None:
    """``mx.save_safetensors``, whose write failures (a full disk, a read-only file system) are
    RuntimeErrors, as a one-line error naming the file."""
    try:
        if any(id(a) in DEFERRED for a in arrays.values()):
            name = str(path) if str(path).endswith(".safetensors") else f"{path}.safetensors"
            _write_streamed(name, arrays, metadata)
        else:
            mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except (RuntimeError, OSError) as e:
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(".")
        free = shutil.disk_usage(Path(path).parent).free if Path(path).parent.is_dir() else None
        hint = f"; {free:,} bytes free there" if free is not None else ""
        raise UserError(f"cannot write {path}: {msg}{hint}") from None


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    path = Path(path)
    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    tmp = path.parent / f"{TMP_PREFIX}{path.stem}.{os.getpid()}.safetensors"
    try:
        save_safetensors(tmp, arrays, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename, on failure
    it is removed, so ``out`` is never left half-written.

    ``out`` is made (if new) and locked for the duration, so a second process writing the same
    ``out`` is refused instead of both exiting 0 with one result lost. Unless ``overwrite``, ``out``
    must be new or empty, at the start and still at the end: what appears in it meanwhile is not
    deleted (the result is discarded with an error instead). With ``overwrite``, what ``out`` held
    at the start is replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} exists and is not a folder")
    if not overwrite and foreign_entries(out):
        raise UserError(f"{what} {out} already exists and is not empty (choose another {what})")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {out}: cannot create it ({e.strerror})") from None
    lock = lock_folder(out, what)
    done = False
    try:
        if not overwrite and foreign_entries(out):  # filled between the check and the lock
            raise UserError(f"{what} {out} already exists and is not empty (choose another {what})")
        _remove_stale_stages(out)
        started = out.stat()
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{TMP_PREFIX}{out.name}."))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the finished folder respects the umask
        try:
            yield tmp
            now = out.stat() if out.is_dir() else None
            if now is None or (now.st_ino, now.st_dev) != (started.st_ino, started.st_dev):
                raise UserError(f"{what} {out} was moved or replaced meanwhile; the result was discarded")
            if not overwrite and foreign_entries(out):
                raise UserError(
                    f"{what} {out}: {', '.join(foreign_entries(out)[:3])} appeared in it while this ran; "
                    "nothing was replaced and the result was discarded"
                )
            old = out.parent / f"{TMP_PREFIX}{out.name}.old.{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            done = True
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.close()
        if created and not done and out.is_dir() and not foreign_entries(out):
            # made here only to hold the lock: a failed run leaves no empty folder under the name
            (out / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()


def _remove_stale_stages(out: Path) -> None:
    """Remove the staging folders a killed writer of ``out`` left beside it. Called with ``out``
    locked, so any such folder's writer is gone; other outputs' stages are never touched."""
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{out.name}.") + r"(?:[a-z0-9_]{8}|old\.\d+)")
    for p in out.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def time_limit(seconds: float, message: str) -> Iterator[None]:
    """Raise :class:`UserError` (``message``) if the block runs longer than ``seconds``: for code
    that a file from outside drives (a chat template). Uses SIGALRM, so it bounds the main thread
    on POSIX; elsewhere the block runs unbounded."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise UserError(message)

    import time

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))


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
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
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
            except RecursionError:
                raise UserError(f"{path} line {lineno}: invalid JSON (nested too deeply)") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    if not records:
        raise UserError(f"{path} is empty: no records")
    return records


# Bytes per element of the safetensors dtypes MLX reads.
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable, describes more bytes than it holds,
    gives a tensor a byte range that does not match its dtype and shape, or lets two tensors share
    bytes: checked from the header alone, before any tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > size - 8 or n > 100 << 20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ranges = []
        for name, v in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (a, b) = v["dtype"], v["shape"], v["data_offsets"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (*shape, a, b)):
                raise ValueError(f"tensor {name}: non-integer shape or offsets")
            if dtype not in SAFETENSORS_ITEMSIZE:
                raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
            if not (0 <= a <= b) or any(d < 0 for d in shape):
                raise ValueError(f"tensor {name}: negative or reversed data offsets or shape")
            count = 1
            for d in shape:
                count *= d
            if b - a != count * SAFETENSORS_ITEMSIZE[dtype]:
                raise ValueError(
                    f"tensor {name}: {b - a} bytes for {dtype} {list(shape)} "
                    f"({count * SAFETENSORS_ITEMSIZE[dtype]} expected)"
                )
            ranges.append((a, b, name))
        ranges.sort()
        for (_, b1, first), (a2, b2, second) in zip(ranges, ranges[1:]):
            if a2 < b1 and b2 > a2:
                raise ValueError(f"tensors {first} and {second} share bytes")
        end = max((b for _, b, _ in ranges), default=0)
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


def link_root(folder: Path) -> Path:
    """Where the links of a model or adapter folder may point: inside the folder, or, for a folder
    in huggingface_hub's cache (``models--ORG--NAME/snapshots/REV``), anywhere in that repository's
    own cache (its ``blobs``)."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return folder


def check_links(folder: Path, what: str) -> None:
    """Refuse a model or adapter folder holding a link (at any depth) that points outside it: a
    folder from a stranger must not make mlx_dft read another file of this machine (a template,
    weights, a tokenizer) and copy its text into an output."""
    folder = Path(folder)
    root = link_root(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if not p.is_symlink():
                continue
            try:
                target = p.resolve(strict=True)
            except (OSError, RuntimeError):
                raise UserError(f"{what} folder {folder}: {p.relative_to(folder)} is a broken link") from None
            if not inside(target, root):
                raise UserError(
                    f"{what} folder {folder}: {p.relative_to(folder)} links outside the folder "
                    f"(to {target}); refusing to read it"
                )


def read_member(folder: Path, name: str, what: str, limit: int = 1 << 20) -> str | None:
    """The text of the file ``name`` in ``folder`` (None if absent): a file of the folder itself,
    never a link out of it, at most ``limit`` bytes of UTF-8."""
    p = Path(folder) / name
    if not (p.exists() or p.is_symlink()):
        return None
    if p.is_symlink() and not inside(p.resolve(), link_root(folder)):
        raise UserError(f"{what} {p} links outside its folder; refusing to read it")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a file")
    size = p.stat().st_size
    if size > limit:
        raise UserError(f"{what} {p} is {size:,} bytes; the limit is {limit:,}")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p}: not UTF-8 text (byte {e.start + 1})") from None
    except OSError as e:
        raise UserError(f"{what} {p}: unreadable ({e.strerror})") from None


def local_or_hub(name: str | Path, patterns: Sequence[str], what: str) -> Path:
    """A local path as it is, else a Hugging Face repo id downloaded (or found in the cache)
    restricted to ``patterns``. ``what`` names the thing in the error ("model", "adapter"). A
    folder holding links out of itself is refused (:func:`check_links`)."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            check_links(path, what)
        return path
    name = str(name)
    if not looks_like_repo_id(name):
        raise UserError(f"{what} not found: {name} (give a local path or a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, allow_patterns=list(patterns)))
    except Exception as e:  # offline, missing repo, gated...
        raise UserError(
            f"{what} not found: {name} is neither a local path nor a reachable "
            f"Hugging Face repo ({type(e).__name__})"
        ) from None
    check_links(path, what)
    return path
