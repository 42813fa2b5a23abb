"""Dataclass fields that are also command-line options (``TrainConfig``'s, each loss's)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    """A dataclass field that is also a command-line option: ``help`` and ``choices`` become the
    flag's help and choices, other keywords its settings (see ``cli.dataclass_options``)."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    meta.update(kw)
    return field(default=default, metadata=meta)
