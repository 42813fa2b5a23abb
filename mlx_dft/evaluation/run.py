"""`mlx_dft eval`: supervised-token losses on a dataset, and generation accuracy on benchmarks.

Writes ``report.json`` (everything measured) and, per problem set, ``<name>.generations.jsonl``
(prompts, generations, extracted answers, verdicts). Files appear whole at the end: an
interrupted evaluation never replaces a finished report.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mlx_dft.checkpoint import atomic_write_json, atomic_write_text
from mlx_dft.errors import UserError
from mlx_dft.evaluation.answers import EXTRACTORS
from mlx_dft.evaluation.benchmarks import load_benchmark, load_jsonl
from mlx_dft.evaluation.generation import model_generator, render_prompt, score


def loss_metrics(model, tokenizer, data: str | Path, batch_size: int = 8, max_seq_length: int = 2048) -> dict:
    """Objective (DFT), cross-entropy, perplexity and mean target probability on supervised tokens
    of ``data`` (a .jsonl, or a folder: its test.jsonl, else valid.jsonl)."""
    from mlx_dft.data import DataConfig, load_split
    from mlx_dft.losses import LossConfig, auto_chunk_tokens
    from mlx_dft.models import split_model
    from mlx_dft.trainer import evaluate, make_loss_fn

    path = Path(data).expanduser()
    if path.is_dir():
        path = next(
            (path / f for f in ("test.jsonl", "valid.jsonl") if (path / f).is_file()), path / "test.jsonl"
        )
    ds = load_split(path, path.stem, tokenizer, DataConfig(max_seq_length=max_seq_length))
    body, head, fast = split_model(model)
    loss_fn = make_loss_fn(
        body,
        head,
        fast,
        LossConfig("dft"),
        auto_chunk_tokens(model.args.vocab_size) if hasattr(model, "args") else 0,
    )
    m = evaluate(model, loss_fn, ds, batch_size)
    return {
        "data": str(path),
        "examples": len(ds),
        "tokens": m["tokens"],
        "ce": m["ce"],
        "ppl": m["ppl"],
        "prob": m["prob"],
        "dft_loss": m["loss"],
    }


def run_eval(
    model: str | None = None,
    adapter: str | None = None,
    data: str | None = None,
    benchmarks: Sequence[str] = (),
    problems: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    prompt_template: str | None = None,
    chat: bool | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 512,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    extractors: Sequence[str] = EXTRACTORS,
    benchmark_dir: str | None = None,
    output: str | Path | None = None,
    progress: bool = True,
    loaded: tuple | None = None,
) -> dict:
    """Evaluate a model (with an optional adapter); returns the report (also written to ``output``)."""
    from mlx_dft import api

    if not data and not benchmarks and not problems:
        raise UserError("nothing to evaluate: give --data, --benchmark or --problems")
    if samples > 1 and temperature <= 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy decoding repeats itself)")
    for name in extractors:
        if name not in EXTRACTORS:
            raise UserError(f"--extract: unknown extractor {name!r}; choose from {', '.join(EXTRACTORS)}")
    sets = [
        (name, load_benchmark(name, benchmark_dir, limit), prompt_template or "boxed") for name in benchmarks
    ]
    if problems:
        sets.append(
            (
                Path(problems).stem,
                load_jsonl(problems, question_field, answer_field, limit),
                prompt_template or "raw",
            )
        )
    model_obj, tokenizer = loaded or api.load(model, adapter)
    report: dict = {
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if data:
        report["loss"] = loss_metrics(model_obj, tokenizer, data)
    files: dict[str, str] = {}
    gen = model_generator(model_obj, tokenizer, max_tokens, temperature, top_p, seed)
    for name, items, template in sets:
        prompts = [render_prompt(p.question, template, tokenizer, chat) for p in items]
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items) * samples, desc=name, unit="gen", leave=False)
        try:
            result = score(items, gen, prompts, samples, extractors, batch_size, bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        report.setdefault("generation", {})[name] = {
            **result.summary(),
            "template": template,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        files[f"{name}.generations.jsonl"] = "".join(json.dumps(s.record()) + "\n" for s in result.items)
    if output:
        out = Path(output).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            atomic_write_text(out / fname, text)
        atomic_write_json(out / "report.json", report)
    return report


def format_report(report: dict) -> str:
    lines = []
    if "loss" in report:
        m = report["loss"]
        lines.append(
            f"{Path(m['data']).name}: ce {m['ce']:.4f} | ppl {m['ppl']:.3f} | p {m['prob']:.3f} | "
            f"dft loss {m['dft_loss']:.4f} ({m['tokens']:,} tokens)"
        )
    for name, g in report.get("generation", {}).items():
        passes = " | ".join(f"{k} {v:.3f}" for k, v in g.items() if k.startswith("pass@") and k != "pass@1")
        lines.append(
            f"{name}: accuracy {g['accuracy']:.3f} over {g['problems']} problems x {g['samples']} "
            f"sample{'s' if g['samples'] > 1 else ''}{' | ' + passes if passes else ''} | answers "
            f"extracted {g['extracted_rate']:.0%}"
        )
    return "\n".join(lines)
