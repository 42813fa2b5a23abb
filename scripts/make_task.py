"""Write the bundled task's splits (mlx_dft/tasks/arith/*.jsonl), deterministically.

    python scripts/make_task.py

train (2000), valid (200), test (200): 1 to 3 operations on numbers below 100.
test_ood (200): 4 or 5 operations, more steps than training ever shows.
No question appears in two splits. Records are prompt/completion with the reference
answer in an extra "answer" field (ignored by training, used by evaluation).
"""

import json
from pathlib import Path

from mlx_dft.tasks import ARITH_DIR, arith

SPLITS = [
    ("train", 1, 2000, (1, 2, 3)),
    ("valid", 2, 200, (1, 2, 3)),
    ("test", 3, 200, (1, 2, 3)),
    ("test_ood", 4, 200, (4, 5)),
]


def main(out: Path = ARITH_DIR) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for name, seed, n, steps in SPLITS:
        problems = arith.make_split(seed, n, steps, exclude=seen)
        seen.update(p.question for p in problems)
        with open(out / f"{name}.jsonl", "w") as f:
            for p in problems:
                f.write(json.dumps(arith.to_record(p)) + "\n")
        print(f"{name}: {len(problems)} problems with {steps} operations -> {out / name}.jsonl")


if __name__ == "__main__":
    main()
