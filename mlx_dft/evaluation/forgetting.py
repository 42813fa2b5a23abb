"""Forgetting: how much of the base model's own behaviour a tuned model keeps.

The base model answers a set of general prompts greedily (:func:`base_answers`, once). Every model,
the base included, is then scored by the mean per-token negative log-likelihood of those answers
given their prompts (teacher-forced, chat template, answer tokens only: :func:`answer_nll`). A
run's forgetting is its NLL minus the base model's: 0 when the base model's behaviour is kept,
larger when it is lost. The same forward pass gives the share of answers whose first
``prefix_tokens`` tokens the model would reproduce greedily (each of those tokens is its argmax
given the ones before it), with no generation.

The bundled prompts (``mlx_dft/tasks/general_prompts.jsonl``, one ``{"prompt": ...}`` a line) are
everyday questions and requests unrelated to the arithmetic tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlx_dft.data import chat_prompt

GENERAL_PROMPTS = Path(__file__).resolve().parents[1] / "tasks" / "general_prompts.jsonl"


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The ``prompt`` of every line of a jsonl file (default: the bundled general prompts)."""
    lines = Path(path or GENERAL_PROMPTS).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def _encode_prompt(tokenizer, text: str) -> list[int]:
    # As the evaluation's generator does: a chat template already writes BOS into the text.
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def base_answers(
    model, tokenizer, prompts: list[str], max_tokens: int = 48, chat: bool | None = None
) -> list[str]:
    """The model's greedy answers to ``prompts`` (each wrapped in the chat template when ``chat``,
    default: when the tokenizer has one), at most ``max_tokens`` tokens each."""
    from mlx_dft.evaluation.generation import model_generator

    generate = model_generator(model, tokenizer, max_tokens=max_tokens)
    return generate([chat_prompt(tokenizer, p, chat) for p in prompts])


def answer_nll(
    model,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    chat: bool | None = None,
    prefix_tokens: int = 16,
    batch_size: int = 8,
) -> dict:
    """Teacher-forced NLL of ``answers`` given ``prompts``, answer tokens only.

    Returns ``nll`` (mean over all answer tokens), ``per_prompt`` (each answer's mean), ``tokens``
    (answer tokens scored), ``reproduced`` (share of answers whose first ``prefix_tokens`` tokens
    are each the model's argmax: what greedy decoding would reproduce) and ``answers`` (how many
    were scored; empty answers are skipped)."""
    import mlx.core as mx
    import numpy as np

    pairs = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer.encode(answer, add_special_tokens=False)
        if ids:
            pairs.append((_encode_prompt(tokenizer, chat_prompt(tokenizer, prompt, chat)), ids))
    total, count, per_prompt, reproduced = 0.0, 0, [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [p + a for p, a in chunk]
        width = max(len(s) for s in seqs)
        # Right padding: the attention is causal, so padding never reaches a scored position.
        tokens = mx.array([s + [0] * (width - len(s)) for s in seqs])
        logits = model(tokens[:, :-1]).astype(mx.float32)
        targets = tokens[:, 1:]
        logp = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
        logp = logp - mx.logsumexp(logits, axis=-1)
        best = mx.argmax(logits, axis=-1) == targets
        mx.eval(logp, best)
        logp, best = np.array(logp), np.array(best)
        for row, (prompt_ids, answer_ids) in enumerate(chunk):
            first = len(prompt_ids) - 1  # the position that predicts the answer's first token
            nll = -logp[row, first : first + len(answer_ids)]
            total += float(nll.sum())
            count += len(answer_ids)
            per_prompt.append(float(nll.mean()))
            k = min(prefix_tokens, len(answer_ids))
            reproduced.append(bool(best[row, first : first + k].all()))
    return {
        "nll": total / count if count else math.nan,
        "per_prompt": per_prompt,
        "tokens": count,
        "reproduced": sum(reproduced) / len(reproduced) if reproduced else math.nan,
        "answers": len(pairs),
    }
