"""``mlx_dft`` command line: a thin layer over :mod:`mlx_dft.api`.

The options of ``train``, ``eval`` and ``sample`` are generated from their dataclasses
(:class:`mlx_dft.config.TrainConfig`, :mod:`mlx_dft.evaluation.options`), so the CLI, YAML configs
and the Python API cannot drift apart. Errors end in one line on stderr and a non-zero exit status
(set ``MLX_DFT_DEBUG=1`` for tracebacks).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import click

from mlx_dft._version import __version__
from mlx_dft.config import TrainConfig
from mlx_dft.errors import Interrupted, UserError
from mlx_dft.evaluation.options import EvalConfig, SampleConfig


def dataclass_options(cls: type) -> Callable[[Callable], Callable]:
    """Click options for the fields of the dataclass ``cls``: ``--field-name`` (or the field's
    ``flag`` metadata), typed by its annotation, ``--x/--no-x`` for booleans, ``choices`` from the
    metadata; a list is comma-separated text, or a repeated flag when the metadata says ``multiple``.
    Options not given arrive as None (``()`` if repeatable) and fields without default are required,
    so the dataclass's defaults, shown in the help, are the only ones."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            kind = str(f.type)
            help_ = f.metadata.get("help", "")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if not required and f.default not in (None, ()) and not kind.startswith("bool"):
                shown = ",".join(f.default) if isinstance(f.default, (list, tuple)) else f.default
                help_ += f"  [default: {shown}]"
            kw: dict = {"help": help_, **({"required": True} if required else {"default": None})}
            if kind.startswith("bool"):
                flag = f"{flag}/--no-{flag[2:]}"
            elif f.metadata.get("multiple"):
                kw["multiple"] = True
            elif "choices" in f.metadata:
                kw["type"] = click.Choice(f.metadata["choices"])
            else:
                kw["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            fn = click.option(flag, f.name, **kw)(fn)
        return fn

    return decorate


def _given(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}


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
@dataclass_options(TrainConfig)
def train(config, **options):
    """Fine-tune a model (default: DFT + LoRA on the bundled tiny model and task)."""
    from mlx_dft import api

    try:
        api.train(config, **_given(options))
    except KeyboardInterrupt:  # outside the training loop (api.train names the folder inside it)
        raise Interrupted(
            "interrupted outside training steps; what was saved before stays as it was"
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
@click.option(
    "--chat-template",
    default=None,
    help="Chat template (a .jinja file or a template string; default: the adapter's, else the model's).",
)
def generate(model, adapter, prompt, max_tokens, temp, top_p, seed, chat, chat_template):
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
        chat_template=chat_template,
    )
    click.echo(text)


@cli.command("chat")
@click.option("--model", default=None, help="Base model (default: the adapter's, else the bundled model).")
@click.option("--adapter", default=None, help="Adapter folder or any source generate accepts.")
@click.option("--chat-template", default=None, help="Chat template (text or file); default: the adapter's.")
@click.option("--system", default=None, help="System prompt of the conversation.")
@click.option("--max-tokens", "-m", default=512, show_default=True, type=int, help="Tokens per reply.")
@click.option("--temperature", "--temp", default=0.0, show_default=True, type=float, help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
def chat_cmd(model, adapter, chat_template, system, max_tokens, temperature, top_p, seed):
    """Talk with a model and its adapter, turn after turn (the whole conversation goes through the
    chat template; earlier turns come from the KV cache). Type /reset to start over, /exit or
    Ctrl-D to leave. Reads standard input, so a file of messages works too."""
    from mlx_dft.chat import Chat

    session = Chat.load(model, adapter, chat_template, system=system, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, seed=seed)  # fmt: skip
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("chat: /reset starts over, /exit or Ctrl-D leaves", err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        for piece in session.send(text):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()


@cli.command("export")
@click.argument("adapter_dir")
@click.option("--out", required=True, help="Folder to write (must not exist, or be empty).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "peft", "hf", "gguf"]),
    default="auto",
    show_default=True,
    help="auto: PEFT for LoRA/DoRA, our HF format for Aligner; peft: also Aligner as PEFT adaption "
    "prompt (layer gates, llama/mistral); hf: the HF Aligner format; gguf: LoRA as llama.cpp's "
    "OUT/adapter.gguf.",
)
@click.option(
    "--base-model", default=None, help="base_model_name_or_path to record (default: the run's model)."
)
def export_cmd(adapter_dir, out, fmt, base_model):
    """Write an adapter as a Hugging Face folder (PEFT LoRA/DoRA, or the HF Aligner format), or a
    LoRA as a llama.cpp GGUF adapter."""
    from mlx_dft.interop.convert import export_adapter
    from mlx_dft.interop.hub import write_card

    path = export_adapter(adapter_dir, out, fmt, base_model)
    if fmt != "gguf":  # a Hugging Face folder gets its model card (a GGUF adapter is one file for llama.cpp)
        write_card(path)
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


@cli.command("convert")
@click.argument("gguf_file")
@click.option("--out", required=True, help="Model folder to write (must not exist, or be empty).")
@click.option(
    "--dequantize", is_flag=True, help="Write float32 weights (transformers needs them; fast on CPU)."
)
def convert_cmd(gguf_file, out, dequantize):
    """Convert a GGUF model (llama.cpp, Ollama, LM Studio) into a Hugging Face-layout folder that
    mlx-lm loads (quantized tensors stay MLX-quantized unless --dequantize)."""
    from mlx_dft.gguf.convert import convert_gguf

    path = convert_gguf(gguf_file, out, dequantize)
    click.echo(f"converted {gguf_file} -> {path}")


@cli.command("fuse")
@click.argument("adapter")
@click.option("--out", required=True, help="Hugging Face model folder to write.")
@click.option("--model", default=None, help="Base model (default: the adapter's).")
@click.option(
    "--dequantize", is_flag=True, help="Write float weights (needed for transformers) from a quantized base."
)
@click.option(
    "--gguf",
    is_flag=True,
    help="Also write the model as OUT/model-<type>.gguf for llama.cpp (implies --dequantize).",
)
@click.option(
    "--gguf-type",
    type=click.Choice(["f32", "f16", "q8_0", "q4_0"]),
    default=None,
    help="Tensor type of the GGUF file (implies --gguf).  [default: f16]",
)
def fuse_cmd(adapter, out, model, dequantize, gguf, gguf_type):
    """Merge a LoRA/DoRA adapter into the base weights and save the model (and a GGUF file)."""
    from mlx_dft.interop.fuse import fuse

    path = fuse(adapter, out, model, dequantize, gguf=gguf_type or ("f16" if gguf else None))
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


@cli.command("eval")
@dataclass_options(EvalConfig)
def eval_cmd(**options):
    """Evaluate a model: losses on a dataset, and answer accuracy on math benchmarks or any jsonl."""
    from mlx_dft.evaluation.run import format_report, run_eval

    options["output"] = options["output"] or f"evals/{time.strftime('%Y%m%d-%H%M%S')}"
    report = run_eval(**_given(options))
    click.echo(format_report(report))
    click.echo(f"report: {options['output']}")


@cli.command("sample")
@dataclass_options(SampleConfig)
def sample_cmd(**options):
    """Offline-RL data: sample K responses per prompt, verify, keep the good ones for training."""
    from mlx_dft.evaluation.sample import run_sample

    result = run_sample(**_given(options))
    rates = sorted(p["accepted"] / p["samples"] for p in result.per_prompt)
    click.echo(
        f"kept {len(result.kept)} responses from {len(result.per_prompt)} prompts; acceptance "
        f"{result.acceptance:.1%} (per prompt: min {rates[0]:.0%}, median {rates[len(rates) // 2]:.0%}, "
        f"max {rates[-1]:.0%}, none accepted for {sum(r == 0 for r in rates)} prompts) -> {options['output']}"
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
    except click.UsageError as e:  # one line, naming the command's help, not click's usage block
        where = (
            f"mlx_dft {e.ctx.command_path.split(' ', 1)[1]}"
            if e.ctx and " " in e.ctx.command_path
            else "mlx_dft"
        )
        print(f"mlx_dft: error: {e.format_message()} (see `{where} --help`)", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as e:
        print(f"mlx_dft: error: {e.format_message()}", file=sys.stderr)
        sys.exit(1)
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
