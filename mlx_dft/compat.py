"""The mlx and mlx-lm releases mlx_dft is tested with, checked before either is used.

mlx_dft extends mlx-lm from outside: it replaces modules inside mlx-lm's models (attention for
packing and the Aligner, the SwiGLU, the layer lists), calls private helpers and relies on how
each architecture builds its logits; MLX's compiler has had version-specific bugs that the trainer
works around. A release outside the tested range can change any of these silently, and the
failure is then not an error but wrong gradients. So an untested mlx or mlx-lm is refused, with
one line naming the tested range and the way out: ``MLX_DFT_ALLOW_UNTESTED=1`` runs anyway, with
a one-line warning (``scripts/setup.sh --test --latest`` installs the newest releases to try).

The ranges match ``pyproject.toml``'s dependency bounds (a test checks that they agree).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from mlx_dft.errors import UserError

ENV = "MLX_DFT_ALLOW_UNTESTED"

# distribution: (lowest tested, first release not tested); releases in [low, high) are accepted.
TESTED: dict[str, tuple[str, str]] = {
    "mlx": ("0.32.4", "0.33"),
    "mlx-lm": ("0.32.2", "0.33"),
}

_warned: set[str] = set()


def in_range(version: str, low: str, high: str) -> bool:
    """Whether ``version`` is in [low, high) under PEP 440 (``packaging``): a local build label
    (``+cpu``) is ignored, and ``<0.33`` excludes 0.33's pre-releases."""
    return Version(version) in SpecifierSet(f">={low},<{high}")


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def untested() -> list[str]:
    """The installed distributions outside their tested range, by name."""
    found = []
    for name, (low, high) in TESTED.items():
        version = installed(name)
        if version is not None and not in_range(version, low, high):
            found.append(name)
    return found


def require() -> None:
    """Refuse an untested mlx or mlx-lm in one line (UserError); with MLX_DFT_ALLOW_UNTESTED=1,
    warn once on stderr instead."""
    bad = untested()
    if not bad:
        return
    what = ", ".join(f"{n} {installed(n)} (tested: >={TESTED[n][0]},<{TESTED[n][1]})" for n in bad)
    if os.environ.get(ENV, "") not in ("", "0"):
        if what not in _warned:
            _warned.add(what)
            print(f"mlx_dft: warning: untested {what}; results may be wrong ({ENV}=1)", file=sys.stderr)
        return
    pins = " ".join(f"'{n}>={TESTED[n][0]},<{TESTED[n][1]}'" for n in bad)
    raise UserError(
        f"untested {what}: mlx_dft extends mlx-lm's models from outside and is tested with these "
        f"releases only; pip install {pins}, or set {ENV}=1 to run anyway"
    )
