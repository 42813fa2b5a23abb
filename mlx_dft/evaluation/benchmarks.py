"""Problems with reference answers: the DFT paper's five math benchmarks, the bundled task, or any jsonl.

Benchmark files are read from a folder (``--benchmark-dir``, else ``$MLX_DFT_BENCHMARKS``, else
``~/.cache/mlx_dft/benchmarks``) holding ``math500.jsonl``, ``minerva_math.jsonl``,
``olympiadbench.jsonl``, ``aime24.jsonl``, ``amc23.jsonl`` as the DFT authors' evaluation harness has
them (``math_evaluation/data/<name>/test.jsonl``). MATH500 is fetched from the Hugging Face Hub
(``HuggingFaceH4/MATH-500``) when it is not found locally and the Hub is reachable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mlx_dft.errors import UserError
from mlx_dft.evaluation.answers import last_boxed
from mlx_dft.files import read_jsonl


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


def _olympiad_answer(rec: dict) -> str:
    ans = rec["final_answer"]
    if isinstance(ans, list):
        ans = ", ".join(a.strip().strip("$") for a in ans)
    return str(ans).strip().strip("$")


def _minerva_answer(rec: dict) -> str:
    ans = last_boxed(rec["solution"])
    if ans is None:
        raise ValueError("no \\boxed{} answer in the reference solution")
    return ans


BENCHMARKS = {
    "math500": ("problem", lambda r: str(r["answer"])),
    "minerva_math": ("problem", _minerva_answer),
    "olympiadbench": ("question", _olympiad_answer),
    "aime24": ("problem", lambda r: str(r["answer"])),
    "amc23": ("question", lambda r: str(r["answer"])),
}
HUB = {"math500": ("HuggingFaceH4/MATH-500", "test.jsonl")}


def benchmark_dir(folder: str | Path | None = None) -> Path:
    if folder:
        return Path(folder).expanduser()
    env = os.environ.get("MLX_DFT_BENCHMARKS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_dft" / "benchmarks"


def _locate(name: str, folder: str | Path | None) -> Path:
    d = benchmark_dir(folder)
    for candidate in (d / f"{name}.jsonl", d / name / "test.jsonl"):
        if candidate.is_file():
            return candidate
    if name in HUB:
        try:
            from huggingface_hub import hf_hub_download

            repo, fname = HUB[name]
            return Path(hf_hub_download(repo, fname, repo_type="dataset"))
        except Exception as e:  # offline, not cached
            raise UserError(
                f"benchmark {name} is not in {d} and the Hub copy could not be fetched "
                f"({type(e).__name__}); put {name}.jsonl in --benchmark-dir"
            ) from None
    raise UserError(
        f"benchmark {name} is not in {d}: put {name}.jsonl there (the DFT repository's "
        f"math_evaluation/data/{name}/test.jsonl) or pass --benchmark-dir"
    )


def load_benchmark(name: str, folder: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    path = _locate(name, folder)
    qkey, answer = BENCHMARKS[name]
    problems = []
    for lineno, rec in read_jsonl(path):
        try:
            q = rec.get(qkey) or rec.get("problem") or rec.get("question")
            if not q:
                raise KeyError(qkey)
            problems.append(
                Problem(
                    str(rec.get("id", rec.get("unique_id", lineno))), str(q), answer(rec), {"line": lineno}
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} line {lineno}: cannot read a {name} problem ({e})") from None
        if limit and len(problems) >= limit:
            break
    return problems


def load_jsonl(
    path: str | Path, question_field: str = "question", answer_field: str = "answer", limit: int | None = None
) -> list[Problem]:
    """Problems from any jsonl; the field names are configurable (``prompt``/``answer`` reads the
    bundled task's splits)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    problems = []
    for lineno, rec in read_jsonl(path):
        missing = [f for f in (question_field, answer_field) if f not in rec]
        if missing:
            raise UserError(
                f"{path} line {lineno}: no field {missing[0]!r} (set --question-field/--answer-field)"
            )
        problems.append(
            Problem(
                str(rec.get("id", lineno)), str(rec[question_field]), str(rec[answer_field]), {"line": lineno}
            )
        )
        if limit and len(problems) >= limit:
            break
    return problems
