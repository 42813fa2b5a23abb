"""Final answers: extracting them from generated text, and checking them for mathematical equivalence.

Extraction tries, in order (configurable): the last ``\\boxed{...}`` (or ``\\fbox{...}``), then a
phrase such as "The answer is 31" / "final answer: 31", then the last number. Equivalence uses
Hugging Face's math-verify (LaTeX and plain expressions, ``\\frac{1}{2}`` = ``0.5``, ``27.0`` = ``27``,
sets, intervals...) and falls back to normalised exact match when math-verify is not installed or
cannot parse either side.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

EXTRACTORS = ("boxed", "answer_is", "last_number")
_ANSWER_IS = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (braces matched), or \\boxed x."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = (m.start(), text[m.end() : i - 1])
    spaced = [(m.start(), m.group(1)) for m in re.finditer(r"\\boxed\s+([^\s$]+)", text)]
    candidates = [c for c in (best, *(spaced[-1:] if spaced else ())) if c is not None]
    return max(candidates)[1].strip() if candidates else None


def answer_is(text: str) -> str | None:
    found = _ANSWER_IS.findall(text)
    if not found:
        return None
    ans = found[-1].strip().strip("$ ").rstrip(".")
    return ans or None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract(text: str, order: Sequence[str] = EXTRACTORS) -> str | None:
    for name in order:
        if name not in EXTRACTORS:
            raise ValueError(f"unknown answer extractor {name!r}; choose from {', '.join(EXTRACTORS)}")
        ans = {"boxed": last_boxed, "answer_is": answer_is, "last_number": last_number}[name](text)
        if ans:
            return ans
    return None


def normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace(" ", "")
    s = s.rstrip(".")
    s = re.sub(r"^\\dfrac|^\\tfrac", r"\\frac", s)
    return s.lower()


def _as_number(s: str) -> float | None:
    s = normalise(s).replace(",", "")
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            return float(m.group(1)) / float(m.group(2))
        if re.fullmatch(r"-?\d+(?:\.\d+)?/\d+(?:\.\d+)?", s):
            a, b = s.split("/")
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify(pred: str, gold: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        g = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
        p = parse(pred if "$" in pred or "\\boxed" in pred else f"${pred}$")
        if not g or not p:
            return None
        return bool(verify(g, p))
    except Exception:  # noqa: BLE001  (a parser failure means: undecided)
        return None


def equivalent(pred: str | None, gold: str) -> bool:
    """Whether the extracted answer ``pred`` equals the reference ``gold`` mathematically."""
    if pred is None:
        return False
    if normalise(pred) == normalise(gold):
        return True
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    verdict = _math_verify(pred, gold)
    return bool(verdict)
