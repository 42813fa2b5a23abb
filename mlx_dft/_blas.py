"""Point MLX's CPU backend at a fast BLAS on Linux.

The ``mlx[cpu]`` wheel links the netlib reference BLAS, 20-30x slower than OpenBLAS
for the matrix products training is made of. Loading a system ``libopenblas`` with
``RTLD_GLOBAL`` *before* ``mlx.core`` is imported makes MLX's ``cblas_*`` calls bind to
it. numpy's bundled OpenBLAS cannot serve: its symbols carry a suffix.

This module must stay free of MLX imports; ``mlx_dft/__init__.py`` runs it first.
Opt out with ``MLX_DFT_NO_OPENBLAS=1``; point at a library with ``MLX_DFT_OPENBLAS=PATH``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

DISABLE_ENV = "MLX_DFT_NO_OPENBLAS"
PATH_ENV = "MLX_DFT_OPENBLAS"
INSTALL_HINT = (
    "install OpenBLAS for a 10-30x faster CPU backend: "
    "`sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu) or "
    "`sudo dnf install openblas-threads` (Fedora)"
)
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "OpenBLAS", "reference BLAS", "Accelerate/Metal"
    path: str | None
    note: str = ""

    @property
    def fast(self) -> bool:
        return self.name != "reference BLAS"

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"BLAS: {self.name}{where}" + (f"; {self.note}" if self.note else "")


_INFO: BlasInfo | None = None


def _find_openblas() -> str | None:
    explicit = os.environ.get(PATH_ENV)
    if explicit:
        return explicit
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def setup() -> BlasInfo:
    """Load OpenBLAS globally if possible; idempotent. Returns what MLX will use."""
    global _INFO
    if _INFO is not None:
        return _INFO
    if sys.platform != "linux":
        _INFO = BlasInfo("Accelerate/Metal", None)
        return _INFO
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        _INFO = BlasInfo("OpenBLAS", os.environ["LD_PRELOAD"], "via LD_PRELOAD")
        return _INFO
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _INFO = BlasInfo("reference BLAS", None, f"OpenBLAS disabled by {DISABLE_ENV}")
        return _INFO
    path = _find_openblas()
    if path is None:
        _INFO = BlasInfo("reference BLAS", None, INSTALL_HINT)
        return _INFO
    if "mlx.core" in sys.modules:
        _INFO = BlasInfo(
            "reference BLAS",
            None,
            "mlx was imported before mlx_dft, so OpenBLAS could not be put under it; "
            "import mlx_dft first or run with LD_PRELOAD=" + path,
        )
        return _INFO
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as e:
        _INFO = BlasInfo("reference BLAS", None, f"could not load {path} ({e}); {INSTALL_HINT}")
        return _INFO
    _INFO = BlasInfo("OpenBLAS", path)
    return _INFO


def info() -> BlasInfo:
    return setup()


def set_threads(n: int) -> int:
    """Set the number of threads OpenBLAS uses from now on and return the previous count; for
    measurements (``scripts/profile_step.py`` times a step on 1 thread and on all of them).
    Raises RuntimeError when MLX is not running on an OpenBLAS mlx_dft can reach."""
    info_ = setup()
    if info_.name != "OpenBLAS":
        raise RuntimeError(f"set_threads needs OpenBLAS under MLX ({info_.describe()})")
    lib = ctypes.CDLL(info_.path) if info_.path and os.path.exists(info_.path) else ctypes.CDLL(None)
    try:
        get, put = lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except AttributeError:
        raise RuntimeError(f"{info_.path}: not an OpenBLAS (no openblas_set_num_threads)") from None
    previous = int(get())
    put(int(n))
    return previous
