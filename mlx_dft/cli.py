"""``mlx_dft`` command line: a thin layer over :mod:`mlx_dft.api`.

Every ``train`` option is generated from :class:`mlx_dft.config.TrainConfig`, so the CLI,
YAML configs and the Python API cannot drift apart. Errors end in one line on stderr and a
non-zero exit status (set ``MLX_DFT_DEBUG=1`` for tracebacks).
"""

from __future__ import annotations

import os
import sys

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
