"""``mlx_dft`` command line: a thin layer over :mod:`mlx_dft.api`.

Every ``train`` option is generated from :class:`mlx_dft.config.TrainConfig`, so the CLI,
YAML configs and the Python API cannot drift apart. Errors end in one line on stderr and a
non-zero exit status (set ``MLX_DFT_DEBUG=1`` for tracebacks).
"""

from __future__ import annotations

import os
import sys
import time

import click

from mlx_dft import __version__
from mlx_dft.config import FIELDS
from mlx_dft.errors import UserError


class Interrupted(UserError):
    pass


def _train_options(fn):
    for name, f in reversed(list(FIELDS.items())):
        flag = "--" + name.replace("_", "-")
        kind = str(f.type)
        help_ = f.metadata.get("help", "")
        if f.default is not None and not kind.startswith("bool"):
            help_ += f"  [default: {f.default}]"
        if kind.startswith("bool"):
            opt = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_)
        elif "choices" in f.metadata:
            opt = click.option(flag, name, type=click.Choice(f.metadata["choices"]), default=None, help=help_)
        elif kind.startswith("int"):
            opt = click.option(flag, name, type=int, default=None, help=help_)
        elif kind.startswith("float"):
            opt = click.option(flag, name, type=float, default=None, help=help_)
        else:
            opt = click.option(flag, name, type=str, default=None, help=help_)
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mlx_dft")
def cli():
    """Fine-tune language models on your own machine with DFT, SFT, LoRA, DoRA or full fine-tuning."""


@cli.command()
@click.option(
    "-c",
    "--config",
    "config",
    type=str,
    default=None,
    help="YAML file of options (keys spelled like the long options); flags override it.",
)
@_train_options
def train(config, **options):
    """Fine-tune a model (default: DFT + LoRA on the bundled tiny model and task)."""
    from mlx_dft import api

    options = {k: v for k, v in options.items() if v is not None}
    try:
        api.train(config, **options)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted; the last checkpoint is intact: continue with --resume OUTPUT_FOLDER"
        ) from None


@cli.command()
@click.option(
    "--model",
    default=None,
    help="Base model folder or repo id (default: the adapter's base model, else the bundled model).",
)
@click.option(
    "--adapter", default=None, help="Adapter folder written by mlx_dft train (or a checkpoint folder)."
)
@click.option("--prompt", "-p", required=True, help="Prompt text; '-' reads standard input.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int)
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature (0: greedy).")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Wrap the prompt in the chat template (default: if the model has one).",
)
def generate(model, adapter, prompt, max_tokens, temp, top_p, seed, chat):
    """Generate text from a model, with or without a trained adapter."""
    from mlx_dft import api

    if prompt == "-":
        prompt = sys.stdin.read()
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    text = api.generate(
        prompt,
        model=model,
        adapter=adapter,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        chat=chat,
        seed=seed,
    )
    click.echo(text)


@cli.command("export")
@click.argument("adapter_dir")
@click.option("--out", required=True, help="Folder to write (must not exist, or be empty).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "peft", "hf"]),
    default="auto",
    show_default=True,
    help="auto: PEFT for LoRA/DoRA, our HF format for Aligner; peft: also Aligner as PEFT adaption "
    "prompt (layer gates, llama/mistral); hf: the HF Aligner format.",
)
@click.option(
    "--base-model", default=None, help="base_model_name_or_path to record (default: the run's model)."
)
def export_cmd(adapter_dir, out, fmt, base_model):
    """Write an adapter as a Hugging Face folder (PEFT LoRA/DoRA, or the HF Aligner format)."""
    from mlx_dft.interop.convert import export_adapter

    path = export_adapter(adapter_dir, out, fmt, base_model)
    click.echo(f"exported {adapter_dir} -> {path}")


@cli.command("import")
@click.argument("src")
@click.option("--out", required=True, help="mlx_dft adapter folder to write.")
@click.option("--model", default=None, help="Base model (default: the one the adapter names).")
def import_cmd(src, out, model):
    """Convert a PEFT LoRA/DoRA folder, an exported Aligner, an official Aligner .pth or a Hub repo
    into an mlx_dft adapter folder."""
    from mlx_dft.interop.convert import import_adapter

    path = import_adapter(src, out, model)
    click.echo(f"imported {src} -> {path}")


@cli.command("fuse")
@click.argument("adapter")
@click.option("--out", required=True, help="Hugging Face model folder to write.")
@click.option("--model", default=None, help="Base model (default: the adapter's).")
@click.option(
    "--dequantize", is_flag=True, help="Write float weights (needed for transformers) from a quantized base."
)
def fuse_cmd(adapter, out, model, dequantize):
    """Merge a LoRA/DoRA adapter into the base weights and save the model."""
    from mlx_dft.interop.fuse import fuse

    path = fuse(adapter, out, model, dequantize)
    click.echo(f"fused {adapter} -> {path}")


@cli.command("push")
@click.argument("folder")
@click.option("--repo", required=True, help="Hub repository, USER/NAME.")
@click.option("--private", is_flag=True, help="Create the repository private.")
def push_cmd(folder, repo, private):
    """Upload an exported folder to the Hugging Face Hub with a generated model card
    (token: HF_TOKEN or `hf auth login`)."""
    from mlx_dft.interop.hub import push

    url = push(folder, repo, private)
    click.echo(f"pushed {folder} -> {url}")


def _generation_options(fn):
    opts = [
        click.option(
            "--model", default=None, help="Base model (default: the adapter's, else the bundled model)."
        ),
        click.option("--adapter", default=None, help="Adapter (any source `generate` accepts)."),
        click.option(
            "--question-field",
            default="question",
            show_default=True,
            help="Question key of --problems/--data records.",
        ),
        click.option("--answer-field", default="answer", show_default=True, help="Reference-answer key."),
        click.option(
            "--prompt-template",
            default=None,
            help="raw, qa, boxed (the Qwen2.5-Math harness' instruction) or text with {question} "
            "(default: boxed for --benchmark, raw otherwise).",
        ),
        click.option(
            "--chat/--no-chat",
            default=None,
            help="Wrap prompts in the chat template (default: if the model has one).",
        ),
        click.option("--temperature", default=None, type=float, help="Sampling temperature (0: greedy)."),
        click.option("--top-p", default=1.0, show_default=True, type=float),
        click.option(
            "--max-tokens", default=512, show_default=True, type=int, help="Generated tokens per answer."
        ),
        click.option("--batch-size", default=32, show_default=True, type=int, help="Generations per batch."),
        click.option("--limit", default=None, type=int, help="Only the first N problems."),
        click.option("--seed", default=0, show_default=True, type=int),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command("eval")
@_generation_options
@click.option(
    "--data",
    default=None,
    help="Dataset for supervised-token losses (a .jsonl, or a folder: test.jsonl, else valid.jsonl).",
)
@click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    help="math500, minerva_math, olympiadbench, aime24 or amc23 (repeatable).",
)
@click.option(
    "--benchmark-dir",
    default=None,
    help="Folder of the benchmark jsonl files (default: $MLX_DFT_BENCHMARKS).",
)
@click.option("--problems", default=None, help="Any jsonl of questions with reference answers.")
@click.option(
    "--samples",
    default=1,
    show_default=True,
    type=int,
    help="Samples per problem (mean accuracy and pass@k).",
)
@click.option(
    "--extract",
    default=",".join(("boxed", "answer_is", "last_number")),
    show_default=True,
    help="Answer extractors, in order.",
)
@click.option("--output", default=None, help="Folder for report.json and the per-problem generations.")
def eval_cmd(
    model,
    adapter,
    question_field,
    answer_field,
    prompt_template,
    chat,
    temperature,
    top_p,
    max_tokens,
    batch_size,
    limit,
    seed,
    data,
    benchmarks,
    benchmark_dir,
    problems,
    samples,
    extract,
    output,
):
    """Evaluate a model: losses on a dataset, and answer accuracy on math benchmarks or any jsonl."""
    from mlx_dft.evaluation.run import format_report, run_eval

    if temperature is None:
        temperature = 1.0 if samples > 1 else 0.0
    report = run_eval(
        model,
        adapter,
        data,
        benchmarks,
        problems,
        question_field,
        answer_field,
        prompt_template,
        chat,
        samples,
        temperature,
        top_p,
        max_tokens,
        batch_size,
        limit,
        seed,
        [e.strip() for e in extract.split(",") if e.strip()],
        benchmark_dir,
        output or f"evals/{time.strftime('%Y%m%d-%H%M%S')}",
    )
    click.echo(format_report(report))
    click.echo(f"report: {output or 'evals/'}")


@cli.command("sample")
@_generation_options
@click.option(
    "--data", required=True, help="jsonl of prompts (with reference answers for the math verifier)."
)
@click.option(
    "--output", required=True, help="jsonl to write: prompt/completion records `mlx_dft train` takes."
)
@click.option(
    "--samples", default=16, show_default=True, type=int, help="Responses per prompt (the DFT paper: 16)."
)
@click.option(
    "--verifier", default="math", show_default=True, help="math, or module:function returning a reward."
)
@click.option(
    "--keep",
    type=click.Choice(["accepted", "best"]),
    default="accepted",
    show_default=True,
    help="Keep every accepted response, or the best per prompt.",
)
@click.option(
    "--min-reward", default=0.5, show_default=True, type=float, help="Rewards from here up are accepted."
)
def sample_cmd(
    model,
    adapter,
    question_field,
    answer_field,
    prompt_template,
    chat,
    temperature,
    top_p,
    max_tokens,
    batch_size,
    limit,
    seed,
    data,
    output,
    samples,
    verifier,
    keep,
    min_reward,
):
    """Offline-RL data: sample K responses per prompt, verify, keep the good ones for training."""
    from mlx_dft.evaluation.sample import run_sample

    result = run_sample(
        data,
        output,
        model,
        adapter,
        samples,
        1.0 if temperature is None else temperature,
        top_p,
        max_tokens,
        verifier,
        keep,
        min_reward,
        question_field,
        answer_field,
        prompt_template or "raw",
        chat,
        batch_size,
        limit,
        seed,
    )
    rates = sorted(p["accepted"] / p["samples"] for p in result.per_prompt)
    click.echo(
        f"kept {len(result.kept)} responses from {len(result.per_prompt)} prompts; acceptance "
        f"{result.acceptance:.1%} (per prompt: min {rates[0]:.0%}, median {rates[len(rates) // 2]:.0%}, "
        f"max {rates[-1]:.0%}, none accepted for {sum(r == 0 for r in rates)} prompts) -> {output}"
    )


@cli.command("compare")
@click.argument("config")
@click.option(
    "--output",
    default=None,
    help="Folder for the runs and report.md (default: the config's, else ./compare).",
)
def compare_cmd(config, output):
    """Train and evaluate several recipes side by side (YAML plan); writes report.md and plots."""
    from mlx_dft.evaluation.compare import run_compare

    run_compare(config, output, progress=True)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("MLX_DFT_DEBUG", "") not in ("", "0")
    try:
        cli.main(args=argv, prog_name="mlx_dft", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("mlx_dft: interrupted", file=sys.stderr)
        sys.exit(130)
    except Interrupted as e:
        print(f"mlx_dft: {e}", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if debug:
            raise
        print(f"mlx_dft: error: {e}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print(
            "mlx_dft: error: out of memory: lower --batch-size or --max-seq-length, or use --grad-checkpoint",
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as e:  # a bug or an unforeseen failure: still one line
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(
            f"mlx_dft: error: {type(e).__name__}: {msg} (set MLX_DFT_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
