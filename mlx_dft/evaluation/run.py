"""`mlx_dft eval`: supervised-token losses on a dataset, and generation accuracy on benchmarks.

Writes ``report.json`` (everything measured) and, per problem set, ``<name>.generations.jsonl``
(prompts, generations, extracted answers, verdicts). Files appear whole at the end: an
interrupted evaluation never replaces a finished report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mlx_dft.errors import UserError
from mlx_dft.evaluation.benchmarks import load_benchmark, load_jsonl
from mlx_dft.evaluation.generation import model_generator, render_prompt, score
from mlx_dft.evaluation.options import EvalConfig
from mlx_dft.files import staged_folder

REPORT = "report.json"


def loss_metrics(model, tokenizer, data: str | Path, batch_size: int = 8, max_seq_length: int = 2048) -> dict:
    """Objective (DFT), cross-entropy, perplexity and mean target probability on supervised tokens
    of ``data`` (a .jsonl, or a folder: its test.jsonl, else valid.jsonl)."""
    from mlx_dft.data import DataConfig, load_split
    from mlx_dft.losses import DFT
    from mlx_dft.trainer import evaluate, model_loss_fn

    path = Path(data).expanduser()
    if path.is_dir():
        path = next(
            (path / f for f in ("test.jsonl", "valid.jsonl") if (path / f).is_file()), path / "test.jsonl"
        )
    ds = load_split(path, path.stem, tokenizer, DataConfig(max_seq_length=max_seq_length))
    m = evaluate(model, model_loss_fn(model, DFT()), ds, batch_size)
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
    config: EvalConfig | None = None, *, progress: bool = True, loaded: tuple | None = None, **options: Any
) -> dict:
    """Evaluate a model (with an optional adapter) as ``config`` says, keyword ``options`` (its field
    names) overriding it; returns the report, also written to ``output`` when that is set.
    ``loaded``: the ``(model, tokenizer)`` to evaluate, already loaded."""
    from mlx_dft import api

    cfg = EvalConfig.build(config, **options)
    cfg.validate()
    out = Path(cfg.output).expanduser() if cfg.output else None
    if out is not None:
        check_report_folder(out)
    temperature = cfg.resolved_temperature()
    template = cfg.resolved_prompt_template(benchmark=True)
    sets = [(name, load_benchmark(name, cfg.benchmark_dir, cfg.limit), template) for name in cfg.benchmarks]
    if cfg.problems:
        sets.append(
            (
                Path(cfg.problems).stem,
                load_jsonl(cfg.problems, cfg.question_field, cfg.answer_field, cfg.limit),
                cfg.resolved_prompt_template(),
            )
        )
    model_obj, tokenizer = loaded or api.load(
        cfg.model, cfg.adapter, chat_template=cfg.chat_template, keep_quantized=cfg.keep_quantized
    )
    report: dict = {
        "model": cfg.model,
        "adapter": str(cfg.adapter) if cfg.adapter else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if cfg.data:
        report["loss"] = loss_metrics(model_obj, tokenizer, cfg.data)
    files: dict[str, str] = {}
    gen = model_generator(model_obj, tokenizer, cfg.max_tokens, temperature, cfg.top_p, cfg.seed)
    for name, items, template in sets:
        prompts = [render_prompt(p.question, template, tokenizer, cfg.chat) for p in items]
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items) * cfg.samples, desc=name, unit="gen", leave=False)
        try:
            result = score(
                items, gen, prompts, cfg.samples, cfg.extract, cfg.batch_size, bar.update if bar else None
            )
        finally:
            if bar is not None:
                bar.close()
        report.setdefault("generation", {})[name] = {
            **result.summary(),
            "template": template,
            "temperature": temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
        }
        files[f"{name}.generations.jsonl"] = "".join(json.dumps(s.record()) + "\n" for s in result.items)
    if out is not None:  # the whole folder at once: one evaluation's files, never a mix of two
        with staged_folder(out, overwrite=True) as tmp:
            for fname, text in files.items():
                (tmp / fname).write_text(text)
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_report_folder(out: Path) -> None:
    """``out`` may be new, empty, or an earlier report folder (replaced whole); nothing else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise UserError(f"--output {out} holds other files, not an earlier report: choose another folder")


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
