"""Write the bundled tasks' splits, deterministically.

    python scripts/make_task.py            # mlx_dft/tasks/arith/*.jsonl and arith_small/*.jsonl

arith (the bundled tiny model's task, "story" style: one sentence per action, each restated before
its equation in the solution): train (2000), valid (200), test (200): 1 to 3 operations on
numbers from 10 to 99; test_ood (200): 4 or 5 operations, more steps than training shows.
arith_small (SmolLM2-135M's task: the model can do small-number arithmetic in its own words but
not two-digit arithmetic; "compact" style, the actions in one sentence): the same splits with
numbers from 1 to 20, 1 or 2 operations in train/valid/test and 3 or 4 in test_ood.
No question appears in two splits. Records are prompt/completion with the reference
answer in an extra "answer" field (ignored by training, used by evaluation).
"""

import json
from pathlib import Path

from mlx_dft.tasks import ARITH_DIR, ARITH_SMALL_DIR, arith

SPLITS = [
    ("train", 1, 2000, (1, 2, 3)),
    ("valid", 2, 200, (1, 2, 3)),
    ("test", 3, 200, (1, 2, 3)),
    ("test_ood", 4, 200, (4, 5)),
]
SMALL_SPLITS = [
    ("train", 1, 2000, (1, 2)),
    ("valid", 2, 200, (1, 2)),
    ("test", 3, 200, (1, 2)),
    ("test_ood", 4, 200, (3, 4)),
]


def write(out: Path, splits: list, low: int, high: int, style: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for name, seed, n, steps in splits:
        problems = arith.make_split(seed, n, steps, exclude=seen, low=low, high=high, style=style)
        seen.update(p.question for p in problems)
        with open(out / f"{name}.jsonl", "w") as f:
            for p in problems:
                f.write(json.dumps(arith.to_record(p)) + "\n")
        print(f"{name}: {len(problems)} problems with {steps} operations -> {out / name}.jsonl")


def main() -> None:
    write(ARITH_DIR, SPLITS, 10, 99, "story")
    write(ARITH_SMALL_DIR, SMALL_SPLITS, 1, 20, "compact")


if __name__ == "__main__":
    main()
