"""A native crash in a test fails that test, names the signal, the library and its version, and
the rest of the suite runs.

The suite runs under pytest-xdist (``-n``; pyproject's addopts): when a worker process dies (a
segmentation fault in torch, transformers' tokenizers, MLX, a ctypes binding...), xdist fails the
test it was running and starts a new worker for the rest. This plugin makes that failure say what
happened: each worker writes faulthandler's report of a fatal signal to a file of its own, and
when xdist reports the crash, the report's first line becomes

    torch 2.13.0 crashed with SIGSEGV in this test (worker gw1 died; the suite went on)

followed by the Python stack of the crash. The library is the distribution owning the innermost
Python frame outside the standard library and this project (the binding that called into the
native code). Code that is known to be fragile (llama.cpp) is also run in a child process of its
own (``isolated.py``), which names the library the same way without losing a worker.
"""

from __future__ import annotations

import faulthandler
import importlib.metadata
import os
import re
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ENV = "MLX_DFT_CRASH_DIR"
SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and not os.environ.get(ENV):
        os.environ[ENV] = tempfile.mkdtemp(prefix="mlx_dft_crash_")  # the workers inherit it


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    folder = os.environ.get(ENV)
    if hasattr(config, "workerinput") and folder:
        log = open(Path(folder) / f"{config.workerinput['workerid']}.log", "w")  # noqa: SIM115
        faulthandler.enable(file=log, all_threads=False)
        config.stash[_LOG] = log


_LOG = pytest.StashKey()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched) -> None:
    worker = getattr(getattr(report, "node", None), "gateway", None)
    worker_id = getattr(worker, "id", "?")
    folder = os.environ.get(ENV)
    text = ""
    if folder:
        try:
            text = (Path(folder) / f"{worker_id}.log").read_text(errors="replace")
        except OSError:
            pass
    report.longrepr = describe(text, worker_id) + (f"\n{text.strip()}" if text.strip() else "")


def describe(text: str, worker_id: str) -> str:
    """The first line of a crashed test's report, from faulthandler's output."""
    signal = next((name for words, name in SIGNALS.items() if f"Fatal Python error: {words}" in text), None)
    library = library_of(text)
    what = f"{library} crashed" if library else "native code crashed"
    how = f" with {signal}" if signal else " (the worker process died)"
    return f"{what}{how} in this test (worker {worker_id} died; the suite went on)"


def library_of(text: str) -> str | None:
    """'name version' of the distribution owning the innermost frame of the crashing thread that
    lies outside the standard library, this project and its tests."""
    paths = sysconfig.get_paths()
    stdlib = {paths[k] for k in ("stdlib", "platstdlib")}
    site = {paths[k] for k in ("purelib", "platlib")}  # (in a venv, under platstdlib's folder)
    here = str(Path(__file__).resolve().parents[1])
    owners = _file_owners()
    current = text.split("Current thread", 1)[-1] if "Current thread" in text else text
    for path in re.findall(r'File "([^"]+)", line \d+', current):  # innermost first
        in_site = any(path.startswith(s) for s in site)  # (the venv may lie inside the project)
        in_stdlib = any(path.startswith(s) for s in stdlib) and not in_site
        if in_stdlib or (path.startswith(here) and not in_site) or path.startswith("<"):
            continue
        for root, dist in owners:
            if path.startswith(root):
                return f"{dist} {importlib.metadata.version(dist)}"
    return None


def _file_owners() -> list[tuple[str, str]]:
    """(top-level package folder, distribution) for the installed distributions."""
    owners = []
    for top, dists in importlib.metadata.packages_distributions().items():
        for base in sys.path:
            folder = Path(base) / top
            if base and folder.is_dir():
                owners.append((str(folder.resolve()) + os.sep, dists[0]))
    return owners
