"""The bundled fine-tuning task: multi-step word problems with worked solutions.

A miniature of the DFT paper's setting (step-by-step math solutions ending in a checkable
final answer, tuned into a base model that can already work such problems out). The bundled
model was pretrained on stories like these followed by their arithmetic worked again in its own
words ("Let us count. She uses 20 toys. 26 - 20 = 6. So Lucy has 6 toys."), never on this
question/answer framing nor on any of these stories: fine-tuning teaches it to answer the
question, in this format, and to stop.

Splits (made by ``scripts/make_task.py``):
- train / valid / test: 1 to 3 operations, numbers below 100;
- test_ood: 4 or 5 operations (more steps than training ever shows), same number range.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = [
    ("Mia", "She"),
    ("Leo", "He"),
    ("Ava", "She"),
    ("Sam", "He"),
    ("Zoe", "She"),
    ("Max", "He"),
    ("Ivy", "She"),
    ("Ben", "He"),
    ("Lily", "She"),
    ("Tom", "He"),
    ("Emma", "She"),
    ("Noah", "He"),
    ("Ella", "She"),
    ("Jack", "He"),
    ("Ruby", "She"),
    ("Owen", "He"),
    ("Nora", "She"),
    ("Finn", "He"),
    ("Lucy", "She"),
    ("Adam", "He"),
]
OBJECTS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "pencils",
    "cookies",
    "shells",
    "stamps",
    "cards",
    "buttons",
    "flowers",
    "eggs",
    "balloons",
    "candies",
    "rocks",
    "beads",
    "toys",
    "cups",
    "boxes",
]
GAIN = [
    "buys {n} more",
    "finds {n} more",
    "gets {n} more",
    "picks up {n} more",
    "wins {n} more",
    "is given {n} more",
]
LOSS = [
    "gives away {n}",
    "loses {n}",
    "sells {n}",
    "uses {n}",
    "breaks {n}",
    "lends out {n}",
]
QUESTION = "How many {obj} does {name} have now?"
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int
    steps: int

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)

    @property
    def completion(self) -> str:
        return " " + self.solution


STYLES = ("story", "compact")


def make_problem(
    rng: random.Random, steps: int, low: int = 10, high: int = 99, style: str = "story"
) -> Problem:
    """One problem with ``steps`` operations; every intermediate value stays in [0, 999].

    ``story`` (the bundled task): one sentence per action, as the bundled model's pretraining
    stories tell them ("She uses 20 toys."), and a solution that takes the actions in turn, each
    followed by its equation. ``compact`` (arith_small): the actions in one sentence ("She uses
    20, then buys 5 more."), a solution of the start and the equations. The same ``rng`` draws
    give the same numbers in either style."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    start = value = rng.randint(low, high)
    clauses, equations = [], []
    for _ in range(steps):
        if value >= 2 and rng.random() < 0.5:
            n = rng.randint(1, min(high, value))
            clauses.append(rng.choice(LOSS).format(n=n))
            equations.append(f"{value} - {n} = {value - n}.")
            value -= n
        else:
            n = rng.randint(1, min(high, 999 - value))
            clauses.append(rng.choice(GAIN).format(n=n))
            equations.append(f"{value} + {n} = {value + n}.")
            value += n
    how_many = QUESTION.format(obj=obj, name=name)
    if style == "story":
        actions = [f"{pron} {clause} {obj}." for clause in clauses]
        question = " ".join([f"{name} has {start} {obj}.", *actions, how_many])
        worked = [part for pair in zip(actions, equations) for part in pair]
        return Problem(question, " ".join(worked) + f" The answer is {value}.", value, steps)
    actions = (
        ", then ".join(clauses)
        if len(clauses) < 3
        else (", ".join(clauses[:-1]) + " and then " + clauses[-1])
    )
    question = f"{name} has {start} {obj}. {pron} {actions}. " + how_many
    solution = " ".join([f"{name} starts with {start} {obj}.", *equations]) + f" The answer is {value}."
    return Problem(question, solution, value, steps)


_ANSWER = re.compile(r"The answer is (-?\d+)")
_NUMBER = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The final answer of a generation: 'The answer is N', else the last number."""
    m = _ANSWER.search(text)
    if m:
        return int(m.group(1))
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def make_split(
    seed: int,
    n: int,
    steps: tuple[int, ...],
    exclude: set[str] = frozenset(),
    low: int = 10,
    high: int = 99,
    style: str = "story",
) -> list:
    """``n`` distinct problems whose question is not in ``exclude``; numbers from ``low`` to ``high``."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = make_problem(rng, rng.choice(steps), low, high, style)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def to_record(p: Problem) -> dict:
    return {"prompt": p.prompt, "completion": p.completion, "answer": str(p.answer)}
