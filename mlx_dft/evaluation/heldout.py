"""Held-out answer accuracy before and after a run, and the summary `mlx_dft train` ends with.

A run whose data holds prompt/completion records with a reference ``answer`` (the bundled tasks,
GSM8K-style sets) measures greedy answer accuracy on the first ``--accuracy-problems`` of its test
split (else its valid split) before the first step and after the last, prompted exactly as in
training (the chat template when training used it). The summary sets that beside the validation
CE and mean token probability at the run's first and last validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_dft.data import find_splits, is_hub_dataset
from mlx_dft.evaluation.answers import EXTRACTORS
from mlx_dft.evaluation.benchmarks import Problem
from mlx_dft.evaluation.generation import Report, model_generator, render_prompt, score
from mlx_dft.files import read_jsonl


@dataclass
class HeldOut:
    """The fixed problems a run is scored on: where they come from, and how long answers may be."""

    split: str
    problems: list[Problem]
    max_tokens: int


def heldout_problems(cfg, tokenizer) -> HeldOut | None:
    """The first ``cfg.accuracy_problems`` records with an ``answer`` of the test (else valid) split
    of local completions data; None when there are none (or the data is a Hub dataset)."""
    if cfg.accuracy_problems == 0 or is_hub_dataset(cfg.data):
        return None
    splits = find_splits(cfg.data)
    for split in ("test", "valid"):
        if split not in splits:
            continue
        problems, longest = [], 0
        for lineno, rec in read_jsonl(splits[split]):
            if len(problems) == cfg.accuracy_problems:
                break
            prompt, completion = rec.get(cfg.prompt_feature), rec.get(cfg.completion_feature)
            if not (isinstance(prompt, str) and isinstance(completion, str) and "answer" in rec):
                return None  # not a set of answerable problems
            problems.append(Problem(str(lineno), prompt, str(rec["answer"])))
            longest = max(longest, len(tokenizer.encode(completion, add_special_tokens=False)))
        if problems:
            return HeldOut(split, problems, min(512, max(16, longest + longest // 2 + 8)))
    return None


def accuracy(model, tokenizer, held: HeldOut, chat: bool | None, batch_size: int = 32) -> Report:
    """Greedy answer accuracy of ``model`` on ``held``'s problems."""
    was_training = model.training
    model.eval()
    try:
        prompts = [render_prompt(p.question, "raw", tokenizer, chat) for p in held.problems]
        generate = model_generator(model, tokenizer, max_tokens=held.max_tokens)
        return score(held.problems, generate, prompts, extractors=EXTRACTORS, batch_size=batch_size)
    finally:
        if was_training:
            model.train()


def _validations(path: Path) -> list[dict]:
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_ce" in rec:
            recs.append(rec)
    return recs


def summary(
    output: Path,
    recipe: str,
    before: float | None,
    after: Report | None,
    held: HeldOut | None,
    seconds: float,
    data: str,
    loss: str = "dft",
) -> list[str]:
    """The lines a finished run prints: what changed, one example, where the adapter is, what next.
    ``before``: the accuracy before training; ``after``: the report after it."""
    lines = [f"done in {_duration(seconds)}: {recipe}"]
    vals = _validations(output / "metrics.jsonl") if (output / "metrics.jsonl").is_file() else []
    if len(vals) >= 2:
        a, b = vals[0], vals[-1]
        lines.append(
            f"  validation CE  {a['val_ce']:.3f} -> {b['val_ce']:.3f}   "
            f"mean p {a['val_prob']:.3f} -> {b['val_prob']:.3f}  (steps {a['step']} -> {b['step']})"
        )
    if before is not None and after is not None and held is not None:
        gain = 100 * (after.accuracy - before)
        lines.append(
            f"  accuracy       {before:.0%} -> {after.accuracy:.0%} ({gain:+.0f} points) on "
            f"{after.n_problems} held-out {held.split} problems"
        )
        item = next((s for s in after.items if s.correct[0]), after.items[0])
        question = item.problem.question.strip().replace("\n", " ")
        answer = item.generations[0].strip().replace("\n", " ")
        lines.append(f"  example        {_cut(question, 64)}")
        mark = "correct" if item.correct[0] else f"wrong; the answer is {item.problem.answer}"
        lines.append(f"  tuned answer   {_cut(answer, 64)} ({mark})")
    lines.append(f"  adapter        {output}")
    lines.append("next:")
    lines.append(f"  mlx_dft chat --adapter-path {output}")
    if held is not None:
        problems = find_splits(data)[held.split]
        lines.append(f"  mlx_dft eval --adapter-path {output} --problems {problems} --question-field prompt")
    other, name = ("dft", "DFT") if loss == "sft" else ("sft", "plain SFT")
    lines.append(f"  mlx_dft train --loss {other} --data {data}    ({name}, to compare)")
    lines.append(
        f"  mlx_dft export {output} --out my-adapter    (then mlx_dft push my-adapter --repo USER/NAME)"
    )
    return lines


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
