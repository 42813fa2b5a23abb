"""Generation accuracy: prompt, generate (greedy or K samples), extract the final answer, check it.

The scorer takes any ``generate(prompts) -> completions`` function, so it is tested with oracle
generators independently of a model. ``model_generator`` builds the real one on mlx-lm's batched
generation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlx_dft.data import chat_prompt
from mlx_dft.errors import UserError
from mlx_dft.evaluation.answers import EXTRACTORS, equivalent, extract
from mlx_dft.evaluation.benchmarks import Problem

TEMPLATES = {
    "raw": "{question}",
    "qa": "Question: {question}\nAnswer:",
    # The Qwen2.5-Math evaluation harness' chain-of-thought instruction (the DFT paper's setting).
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
}


def format_question(question: str, template: str) -> str:
    """``template`` (a name from TEMPLATES or a string with ``{question}``) applied to ``question``."""
    fmt = TEMPLATES.get(template, template)
    if "{question}" not in fmt:
        raise UserError(
            f"--prompt-template {template!r}: a template name ({', '.join(TEMPLATES)}) "
            "or text with {question}"
        )
    return fmt.replace("{question}", question).replace("{{", "{").replace("}}", "}")


def render_prompt(question: str, template: str, tokenizer=None, chat: bool | None = None) -> str:
    """The text a model sees: the templated question, wrapped in the tokenizer's chat template
    when ``chat`` (default: when it has one)."""
    return chat_prompt(tokenizer, format_question(question, template), chat)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class Scored:
    problem: Problem
    prompt: str
    generations: list[str]
    extracted: list[str | None]
    correct: list[bool]

    def record(self) -> dict:
        return {
            "id": self.problem.id,
            "question": self.problem.question,
            "answer": self.problem.answer,
            "prompt": self.prompt,
            "generations": self.generations,
            "extracted": self.extracted,
            "correct": self.correct,
        }


@dataclass
class Report:
    n_problems: int
    samples: int
    accuracy: float  # mean over problems of the fraction of correct samples
    pass_at: dict[int, float]
    extracted_rate: float
    seconds: float
    items: list[Scored] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "problems": self.n_problems,
            "samples": self.samples,
            "accuracy": self.accuracy,
            **{f"pass@{k}": v for k, v in self.pass_at.items()},
            "extracted_rate": self.extracted_rate,
            "seconds": self.seconds,
        }


def score(
    problems: Sequence[Problem],
    generate: Callable[[list[str]], list[str]],
    prompts: Sequence[str] | None = None,
    samples: int = 1,
    extractors: Sequence[str] = EXTRACTORS,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Generate ``samples`` completions per problem (in batches) and check each final answer."""
    if samples < 1:
        raise UserError("--samples must be at least 1")
    if not problems:
        raise UserError("no problems to evaluate")
    prompts = list(prompts) if prompts is not None else [p.question for p in problems]
    tic = time.perf_counter()
    flat = [(i, prompts[i]) for i in range(len(problems)) for _ in range(samples)]
    outputs: list[str] = []
    for start in range(0, len(flat), batch_size):
        chunk = [p for _, p in flat[start : start + batch_size]]
        got = generate(chunk)
        if len(got) != len(chunk):
            raise RuntimeError(f"generator returned {len(got)} completions for {len(chunk)} prompts")
        outputs.extend(got)
        if progress:
            progress(len(chunk))
    items = []
    for i, problem in enumerate(problems):
        gens = outputs[i * samples : (i + 1) * samples]
        ext = [extract(g, extractors) for g in gens]
        items.append(Scored(problem, prompts[i], gens, ext, [equivalent(e, problem.answer) for e in ext]))
    ks = sorted({1, *[2**j for j in range(1, 8) if 2**j <= samples], samples})
    n = len(items)
    return Report(
        n_problems=n,
        samples=samples,
        accuracy=sum(sum(s.correct) / samples for s in items) / n,
        pass_at={k: sum(pass_at_k(samples, sum(s.correct), k) for s in items) / n for k in ks},
        extracted_rate=sum(e is not None for s in items for e in s.extracted) / (n * samples),
        seconds=time.perf_counter() - tic,
        items=items,
    )


def model_generator(
    model, tokenizer, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
) -> Callable[[list[str]], list[str]]:
    """Batched generation with mlx-lm (greedy when ``temperature`` is 0)."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)

    bos = getattr(tokenizer, "bos_token", None)

    def encode(p: str) -> list[int]:
        # A chat template already writes BOS into the text: do not add a second one.
        return tokenizer.encode(p, add_special_tokens=not (bos and p.startswith(bos)))

    def generate(prompts: list[str]) -> list[str]:
        ids = [encode(p) for p in prompts]
        return batch_generate(
            model,
            tokenizer,
            ids,
            max_tokens=max_tokens,
            sampler=sampler,
            completion_batch_size=len(ids),
            prefill_batch_size=min(len(ids), 16),
        ).texts

    return generate
