"""Native parity code (llama.cpp through ctypes or cffi, torch) run in a child Python.

A crash inside another project's native library (a segmentation fault in llama.cpp, an abort in
torch) must fail the one test that called it, not kill pytest and every test after it. `call`
runs a function of a module in tests/ in a fresh interpreter, passes its arguments and result by
pickle, and turns what happened there into what the calling test sees:

- a return value comes back as the value;
- `pytest.skip` in the child skips the calling test with the same reason;
- an exception (an assertion included) fails the calling test with the child's traceback;
- a signal (the child died: SIGSEGV, SIGABRT, ...) or a time-out fails the calling test with one
  line naming the signal, the library and its installed version, then the child's last stderr lines
  (faulthandler's Python stack of the crash).
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def library_version(*distributions: str) -> str:
    """'name version' of the first installed distribution, else 'name (not installed)'."""
    for name in distributions:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{distributions[0]} (not installed)"


def call(target: str, *args, library: str, timeout: float = 600, **kwargs):
    """Call `module:function` (a module in tests/) with args and kwargs in a child Python.

    `library` names what the call exercises ("llama-cpp-python 0.3.16"), for the failure line."""
    with tempfile.TemporaryDirectory(prefix="mlx_dft_isolated_") as tmp:
        inp, out = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        inp.write_bytes(pickle.dumps((target, args, kwargs)))
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import isolated; isolated._child()"
        cmd = [sys.executable, "-X", "faulthandler", "-c", code, str(inp), str(out)]
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            tail = _tail(e.stderr)
            pytest.fail(f"{library}: {target} timed out after {timeout:g} s in a child process{tail}", False)
        if proc.returncode < 0:
            try:
                name = signal.Signals(-proc.returncode).name
            except ValueError:
                name = f"signal {-proc.returncode}"
            tail = _tail(proc.stderr)
            pytest.fail(f"{library} crashed with {name} in {target} (child process){tail}", False)
        if not out.exists():
            pytest.fail(
                f"{library}: {target} ended with exit status {proc.returncode} and no result"
                f"{_tail(proc.stderr)}",
                False,
            )
        kind, value = pickle.loads(out.read_bytes())
    if kind == "ok":
        return value
    if kind == "skip":
        pytest.skip(value)
    pytest.fail(f"{target} raised in its child process ({library}):\n{value}", False)


def _tail(stderr: str | bytes | None, lines: int = 25) -> str:
    if not stderr:
        return ""
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    return "\n--- child stderr (last lines) ---\n" + "\n".join(stderr.splitlines()[-lines:])


def _child() -> None:
    """The child's side: run the target, write ('ok'|'skip'|'error', payload) to the output file."""
    inp, out = Path(sys.argv[1]), Path(sys.argv[2])
    target, args, kwargs = pickle.loads(inp.read_bytes())
    module, _, func = target.partition(":")
    try:
        fn = getattr(__import__(module, fromlist=[func]), func)
        result = ("ok", fn(*args, **kwargs))
    except pytest.skip.Exception as e:
        result = ("skip", str(e.msg))
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test with it)
        result = ("error", traceback.format_exc())
    tmp = out.with_suffix(".part")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, out)


def segfault() -> None:
    """A segmentation fault in native code reached through ctypes (for the isolation's own test)."""
    import ctypes

    ctypes.string_at(0)
