"""Evaluation and sampling options: one dataclass each, and their defaults, the only ones.

``mlx_dft eval`` and ``mlx_dft sample`` generate their flags from :class:`EvalConfig` and
:class:`SampleConfig` (``max_tokens`` -> ``--max-tokens``), as ``train`` does from
:class:`~mlx_dft.config.TrainConfig`; :func:`~mlx_dft.evaluation.run.run_eval`,
:func:`~mlx_dft.evaluation.sample.run_sample` and the ``eval:`` block of ``mlx_dft compare`` plans
take the same options by field name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar

from mlx_dft.config import option
from mlx_dft.errors import UserError
from mlx_dft.evaluation.answers import EXTRACTORS
from mlx_dft.evaluation.benchmarks import BENCHMARKS

C = TypeVar("C", bound="GenerationConfig")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class GenerationConfig:
    """What ``eval`` and ``sample`` share: the model, the prompts and the decoding."""

    model: str | None = option(None, "Base model (default: the adapter's, else the bundled model).")
    adapter: str | None = option(
        None,
        "Adapter folder or Hub id (any source `generate` accepts).",
        flag="--adapter-path",
        deprecated={"--adapter": ""},
    )
    question_field: str = option("question", "Question key of --problems/--data records.")
    answer_field: str = option("answer", "Reference-answer key.")
    prompt_template: str | None = option(
        None,
        "raw, qa, boxed (the Qwen2.5-Math harness' instruction) or text with {question} "
        "(default: boxed for --benchmark, raw otherwise).",
    )
    chat: bool | None = option(None, "Wrap prompts in the chat template (default: if the model has one).")
    chat_template: str | None = option(
        None,
        "Chat template (a .jinja file or a template string; default: the adapter's, else the model's).",
    )
    keep_quantized: bool = option(
        False, "Keep a quantized base quantized on a CPU (default: float32 there when it fits)."
    )
    temperature: float | None = option(
        None,
        "Sampling temperature (0: greedy; default: 1 in `sample` and with `eval --samples` > 1, else 0).",
        aliases=("--temp",),
    )
    top_p: float = option(
        1.0, "Nucleus sampling: only the likeliest tokens of this total probability (1: off)."
    )
    max_tokens: int = option(512, "Generated tokens per answer.")
    batch_size: int = option(32, "Generations per batch.")
    limit: int | None = option(None, "Only the first N problems.")
    seed: int = option(0, "Seed for sampling.")

    @classmethod
    def build(cls: type[C], config: C | None = None, **options: Any) -> C:
        """``config`` (default: the defaults) with ``options``, field names, replacing its values;
        a list option may be one comma-separated string."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in options.items():
            if name not in fields:
                raise UserError(f"unknown option '{name}'")
            if str(fields[name].type).startswith(("tuple", "list")) and value is not None:
                items = value.split(",") if isinstance(value, str) else value
                options[name] = tuple(str(v).strip() for v in items if str(v).strip())
        if config is not None:
            return dataclasses.replace(config, **options)
        for name, f in fields.items():
            if f.default is MISSING and f.default_factory is MISSING and name not in options:
                raise UserError(f"{_flag(name)} is required")
        return cls(**options)

    def resolved_prompt_template(self, benchmark: bool = False) -> str:
        return self.prompt_template or ("boxed" if benchmark else "raw")

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first invalid option."""
        from mlx_dft.evaluation.generation import format_question

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"{_flag(f.name)} {value!r}: choose {' or '.join(choices)}")
        if self.prompt_template is not None:
            format_question("", self.prompt_template)
        check_decoding(self.temperature, self.top_p, self.seed, self.max_tokens)
        checks = (
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.limit is None or self.limit >= 0, "--limit must be >= 0 (0: all)"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def check_decoding(temperature: float | None, top_p: float, seed: int, max_tokens: int) -> None:
    """Refuse decoding settings outside their domain, NaN included (a NaN passes every comparison
    but ``==``), in one line naming the option. Shared by generate, chat, eval and sample."""
    import math

    checks = (
        (temperature is None or (math.isfinite(temperature) and temperature >= 0), "--temperature", ">= 0"),
        (math.isfinite(top_p) and 0 < top_p <= 1, "--top-p", "in (0, 1]"),
        (0 <= seed < 2**64, "--seed", "in [0, 2^64)"),
        (max_tokens >= 1, "--max-tokens", "at least 1"),
    )
    values = {"--temperature": temperature, "--top-p": top_p, "--seed": seed, "--max-tokens": max_tokens}
    for ok, flag, domain in checks:
        if not ok:
            raise UserError(f"{flag} must be {domain}, not {values[flag]}")


@dataclass(kw_only=True)
class EvalConfig(GenerationConfig):
    """``mlx_dft eval``: supervised-token losses on a dataset, answer accuracy on problem sets."""

    data: str | None = option(
        None, "Dataset for supervised-token losses (a .jsonl, or a folder: test.jsonl, else valid.jsonl)."
    )
    benchmarks: tuple[str, ...] = option(
        (), f"{', '.join(BENCHMARKS)} (repeatable).", flag="--benchmark", multiple=True
    )
    benchmark_dir: str | None = option(
        None, "Folder of the benchmark jsonl files (default: $MLX_DFT_BENCHMARKS)."
    )
    problems: str | None = option(None, "Any jsonl of questions with reference answers.")
    samples: int = option(1, "Samples per problem (mean accuracy and pass@k).")
    extract: tuple[str, ...] = option(EXTRACTORS, "Answer extractors, in order.")
    output: str | None = option(
        None, "Folder for report.json and the per-problem generations (default: evals/<time>)."
    )

    def resolved_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.samples > 1 else 0.0

    def validate(self) -> None:
        if not self.data and not self.benchmarks and not self.problems:
            raise UserError("nothing to evaluate: give --data, --benchmark or --problems")
        super().validate()
        if self.samples < 1:
            raise UserError("--samples must be at least 1")
        if self.samples > 1 and self.resolved_temperature() <= 0:
            raise UserError("--samples > 1 needs --temperature > 0 (greedy decoding repeats itself)")
        for name in self.extract:
            if name not in EXTRACTORS:
                raise UserError(f"--extract: unknown extractor {name!r}; choose from {', '.join(EXTRACTORS)}")


@dataclass(kw_only=True)
class SampleConfig(GenerationConfig):
    """``mlx_dft sample``: K responses per prompt, verified; the accepted ones become training data."""

    data: str = option(MISSING, "jsonl of prompts (with reference answers for the math verifier).")
    output: str = option(MISSING, "jsonl to write: prompt/completion records `mlx_dft train` takes.")
    samples: int = option(16, "Responses per prompt (the DFT paper: 16).")
    verifier: str = option("math", "math, or module:function returning a reward.")
    keep: str = option(
        "accepted", "Keep every accepted response, or the best per prompt.", ("accepted", "best")
    )
    min_reward: float = option(0.5, "Rewards from here up are accepted.")

    def resolved_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    def validate(self) -> None:
        super().validate()
        if self.samples < 1:
            raise UserError("--samples must be at least 1")


# The panels of `mlx_dft eval --help` and `mlx_dft sample --help` (every field in one).
_MODEL = ("model", "adapter", "chat", "chat_template", "keep_quantized")
_DECODING = ("temperature", "top_p", "max_tokens", "batch_size", "seed")
EVAL_HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "What to evaluate": ("data", "benchmarks", "benchmark_dir", "problems", "limit"),
    "Model and adapter": _MODEL,
    "Prompts and answers": ("question_field", "answer_field", "prompt_template", "extract"),
    "Decoding": (*_DECODING, "samples"),
    "Output": ("output",),
}
SAMPLE_HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "Prompts": ("data", "question_field", "answer_field", "prompt_template", "limit"),
    "Model and adapter": _MODEL,
    "Decoding": (*_DECODING, "samples"),
    "Verifying and keeping": ("verifier", "keep", "min_reward"),
    "Output": ("output",),
}
