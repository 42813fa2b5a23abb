"""`mlx_dft sample`: the DFT paper's offline-RL data (rejection sampling).

Generate K responses per prompt, score each with a verifier, keep the accepted ones (or the
best per prompt), and write prompt/completion jsonl that ``mlx_dft train`` takes directly.

Verifiers: ``math`` (the final answer checked against the record's reference answer), or a
user function ``module:function`` (a module on ``sys.path`` or a ``path/to/file.py``) called as
``fn(prompt=..., completion=..., record=...)`` and returning a number or a bool.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_dft.errors import UserError
from mlx_dft.evaluation.answers import EXTRACTORS, equivalent, extract
from mlx_dft.evaluation.options import SampleConfig
from mlx_dft.files import atomic_write_json, atomic_write_text, check_apart, read_jsonl

Verifier = Callable[[str, str, dict], float]


def load_verifier(
    spec: str, answer_field: str = "answer", extractors: Sequence[str] = EXTRACTORS
) -> Verifier:
    if spec == "math":

        def math_verifier(prompt: str, completion: str, record: dict) -> float:
            if answer_field not in record:
                raise UserError(f"the math verifier needs an {answer_field!r} field in every record")
            return float(equivalent(extract(completion, extractors), str(record[answer_field])))

        return math_verifier
    if ":" not in spec:
        raise UserError(f"--verifier {spec!r}: use 'math' or 'module:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(str(path))
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
        fn = getattr(module, fn_name)
    except Exception as e:  # noqa: BLE001  (import errors of user code, whatever they are)
        raise UserError(f"--verifier {spec}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"--verifier {spec}: {fn_name} is not a function")
    params = inspect.signature(fn).parameters

    def user_verifier(prompt: str, completion: str, record: dict) -> float:
        kwargs = {"prompt": prompt, "completion": completion, "record": record}
        try:
            if any(p.kind == p.VAR_KEYWORD for p in params.values()):
                out = fn(**kwargs)
            else:
                out = fn(**{k: v for k, v in kwargs.items() if k in params})
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--verifier {spec} raised {type(e).__name__}: {e}") from None
        try:
            return float(out)
        except (TypeError, ValueError):
            raise UserError(f"--verifier {spec} returned {out!r}, not a number or a bool") from None

    return user_verifier


@dataclass
class SampleResult:
    kept: list[dict]
    per_prompt: list[dict]

    @property
    def acceptance(self) -> float:
        n = sum(p["samples"] for p in self.per_prompt)
        return sum(p["accepted"] for p in self.per_prompt) / max(n, 1)


def select(
    records: Sequence[dict],
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    verifier: Verifier,
    keep: str = "accepted",
    min_reward: float = 0.5,
) -> SampleResult:
    """Score every completion and keep: every accepted one (``accepted``: reward >= min_reward),
    or the best per prompt when it is accepted (``best``)."""
    if keep not in ("accepted", "best"):
        raise UserError(f"--keep {keep!r}: choose accepted or best")
    kept, stats = [], []
    for rec, prompt, comps in zip(records, prompts, completions):
        rewards = [verifier(prompt, c, rec) for c in comps]
        accepted = [i for i, r in enumerate(rewards) if r >= min_reward]
        if keep == "best" and accepted:
            accepted = [max(accepted, key=lambda i: rewards[i])]
        for i in accepted:
            kept.append({"prompt": prompt, "completion": comps[i], "reward": rewards[i]})
        stats.append(
            {
                "prompt": prompt,
                "samples": len(comps),
                "accepted": sum(r >= min_reward for r in rewards),
                "kept": len(accepted),
                "rewards": rewards,
            }
        )
    return SampleResult(kept, stats)


def run_sample(
    data: str | None = None,
    output: str | None = None,
    *,
    config: SampleConfig | None = None,
    generate: Callable[[list[str]], list[str]] | None = None,
    loaded: tuple | None = None,
    **options: Any,
) -> SampleResult:
    """Sample, verify and write the kept responses as ``config`` says, ``data``, ``output`` and keyword
    ``options`` (its field names) overriding it. ``generate(prompts) -> completions`` replaces the
    model (prompts are then not chat-wrapped); ``loaded``: the ``(model, tokenizer)``, already loaded."""
    from mlx_dft.evaluation.generation import format_question, model_generator, render_prompt

    options |= {k: v for k, v in (("data", data), ("output", output)) if v is not None}
    cfg = SampleConfig.build(config, **options)
    cfg.validate()
    temperature = cfg.resolved_temperature()
    template = cfg.resolved_prompt_template()
    check = load_verifier(cfg.verifier, cfg.answer_field)  # fail before any generation
    path = Path(cfg.data).expanduser()
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    out = Path(cfg.output).expanduser()
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give the .jsonl file to write")
    inputs = {"--data": path, "--model": cfg.model, "--adapter": cfg.adapter}
    inputs["--chat-template"] = cfg.chat_template
    for written, what in ((out, "--output"), (out.with_suffix(".stats.json"), "--output's stats file")):
        check_apart(written, inputs, what=what)  # no file written is one of the inputs
    records = [r for _, r in read_jsonl(path)][: cfg.limit or None]
    for i, r in enumerate(records, 1):
        if cfg.question_field not in r:
            raise UserError(f"{path} record {i}: no field {cfg.question_field!r} (set --question-field)")
    tokenizer = None
    if generate is None:
        from mlx_dft import api

        net, tokenizer = loaded or api.load(
        cfg.model, cfg.adapter, chat_template=cfg.chat_template, keep_quantized=cfg.keep_quantized
    )
        generate = model_generator(net, tokenizer, cfg.max_tokens, temperature, cfg.top_p, cfg.seed)
    prompts = [
        render_prompt(r[cfg.question_field], template, tokenizer, cfg.chat if tokenizer else False)
        for r in records
    ]
    # Kept records hold the user text before any chat wrapping: `mlx_dft train` wraps it again.
    user_texts = [format_question(r[cfg.question_field], template) for r in records]
    flat = [p for p in prompts for _ in range(cfg.samples)]
    outs: list[str] = []
    for start in range(0, len(flat), cfg.batch_size):
        outs.extend(generate(flat[start : start + cfg.batch_size]))
    completions = [outs[i * cfg.samples : (i + 1) * cfg.samples] for i in range(len(records))]
    result = select(records, user_texts, completions, check, cfg.keep, cfg.min_reward)
    if not result.kept:
        raise UserError(
            f"no sample was accepted ({len(flat)} generated, acceptance 0%): nothing written; "
            "try more --samples, a higher --temperature, or a lower --min-reward"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out,
        "".join(
            json.dumps({"prompt": k["prompt"], "completion": k["completion"]}) + "\n" for k in result.kept
        ),
    )
    atomic_write_json(
        out.with_suffix(".stats.json"),
        {
            "data": str(path),
            "samples_per_prompt": cfg.samples,
            "temperature": temperature,
            "top_p": cfg.top_p,
            "verifier": cfg.verifier,
            "keep": cfg.keep,
            "min_reward": cfg.min_reward,
            "prompts": len(records),
            "generated": len(flat),
            "kept": len(result.kept),
            "acceptance_rate": result.acceptance,
            "per_prompt": [
                {k: v for k, v in p.items() if k != "prompt"} | {"prompt": p["prompt"][:200]}
                for p in result.per_prompt
            ],
        },
    )
    return result
