"""The status line of a run on a terminal: phase, steps, loss, tokens/s, memory (GB) and ETA.

One line of at most 80 columns, drawn with tqdm on stderr while report lines scroll above it. The
phase says what the run is doing (loading, evaluating, validating, compiling, training, saving).
The ETA is the remaining steps at the mean time of the training steps measured so far (the first
step of each compiled function, which compiles it, left out), plus the remaining validations at
the last one's duration; validation and compilation never inflate the step rate.
"""

from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 80
_BAR = "{desc}{percentage:3.0f}%|{bar:12}| {n_fmt}/{total_fmt} {postfix}"
_WAIT = "{desc}{elapsed}"


class Progress:
    """The run's status line; every method does nothing when ``enabled`` is False."""

    def __init__(self, enabled: bool = True, file: TextIO | None = None):
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.bar = None
        self.name = ""
        self.total = 0
        self.step_seconds = 0.0
        self.steps_timed = 0
        self.val_seconds: float | None = None
        self.remaining_vals = 0
        self.loss: float | None = None
        self.tokens_per_sec: float | None = None
        self.memory_gb: float | None = None

    @classmethod
    def for_terminal(cls, enabled: bool) -> Progress:
        """A status line only where stderr is a terminal (logs and pipes get report lines only)."""
        return cls(enabled and sys.stderr.isatty())

    def _ensure(self):
        if self.bar is None and self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, file=self.file, bar_format=_WAIT, ncols=WIDTH, leave=False)
        return self.bar

    def phase(self, name: str) -> None:
        """Show that the run is now ``name`` (loading, validating, compiling, training, ...)."""
        self.name = name
        bar = self._ensure()
        if bar is not None:
            bar.set_description_str(f"{name:<10} ", refresh=False)
            bar.refresh()

    def start(self, total: int, initial: int = 0) -> None:
        """Count steps from ``initial`` to ``total``."""
        self.total = total
        bar = self._ensure()
        if bar is not None:
            bar.bar_format = _BAR
            bar.reset(total=total)
            bar.update(initial)

    def step(self, seconds: float, timed: bool = True) -> None:
        """One optimizer step done in ``seconds``; ``timed=False`` for one that compiled."""
        if timed:
            self.step_seconds += seconds
            self.steps_timed += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def validated(self, seconds: float, remaining: int) -> None:
        """A validation took ``seconds``; ``remaining`` more are due before the end."""
        self.val_seconds, self.remaining_vals = seconds, remaining
        self._postfix()

    def metrics(self, loss: float, tokens_per_sec: float, memory_gb: float) -> None:
        self.loss, self.tokens_per_sec, self.memory_gb = loss, tokens_per_sec, memory_gb
        self._postfix()

    def eta(self) -> float | None:
        """Seconds left: remaining steps at the measured step time plus remaining validations."""
        if self.bar is None or self.steps_timed == 0:
            return None
        left = (self.total - self.bar.n) * self.step_seconds / self.steps_timed
        return left + self.remaining_vals * (self.val_seconds or 0.0)

    def postfix(self) -> str:
        """The text after the step count: loss, tok/s, peak memory, ETA (within 80 columns)."""
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_sec is not None:
            parts.append(f"{self.tokens_per_sec:,.0f} tok/s")
        if self.memory_gb is not None:
            parts.append(f"{self.memory_gb:.2f} GB")
        eta = self.eta()
        if eta is not None:
            m, s = divmod(int(eta + 0.5), 60)
            h, m = divmod(m, 60)
            parts.append(f"ETA {h}:{m:02d}:{s:02d}" if h else f"ETA {m}:{s:02d}")
        text = " ".join(parts)
        return text[: WIDTH - 40]

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(), refresh=True)

    def write(self, line: str) -> bool:
        """Print ``line`` above the status line; False when there is no status line."""
        if self.bar is None:
            return False
        self.bar.write(line)  # stdout, with the status line (stderr) cleared and redrawn
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
