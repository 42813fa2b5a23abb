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
import rich_click

from mlx_dft._version import __version__
from mlx_dft.config import TrainConfig
from mlx_dft.errors import Interrupted, UserError
from mlx_dft.evaluation.options import EvalConfig, SampleConfig


def _note_deprecated(old: str, new: str, why: str = "") -> Callable:
    def note(ctx: click.Context, param: click.Parameter, value):
        if value not in (None, ()):
            click.echo(f"note: {old} is deprecated{why}; use {new}", err=True)
        return value

    return note


def deprecated_option(
    old: str, new: str, dest: str, why: str = "", flag: bool = False, **kw
) -> Callable[[Callable], Callable]:
    """A hidden option ``old`` that still works as ``new`` (with a note on stderr): its value arrives
    as ``__old__<dest>`` and :func:`_given` moves it to ``dest``. ``flag``: a boolean's old
    spelling, ``old``/``--no-old`` as the new one has."""
    kw.setdefault("default", None)
    decl = f"{old}/--no-{old[2:]}" if flag else old
    return click.option(decl, f"__old__{dest}", hidden=True, callback=_note_deprecated(old, new, why), **kw)


def _show_default(f: dataclasses.Field) -> str:
    if str(f.type).startswith("bool"):
        if f.default is None:
            return ""
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        return f"  [default: {flag if f.default else '--no-' + flag[2:]}]"
    if f.default in (None, ()) or f.default is dataclasses.MISSING:
        return ""
    shown = ",".join(f.default) if isinstance(f.default, (list, tuple)) else f.default
    return f"  [default: {shown}]"


def dataclass_options(cls: type) -> Callable[[Callable], Callable]:
    """Click options for the fields of the dataclass ``cls``: ``--field-name`` (or the field's
    ``flag`` metadata, plus its ``aliases``), typed by its annotation, ``--x/--no-x`` for booleans,
    ``choices`` from the metadata; a list is comma-separated text, or a repeated flag when the metadata
    says ``multiple``; ``deprecated`` old spellings work hidden, with a note. Options not given arrive
    as None (``()`` if repeatable) and fields without default are required, so the dataclass's
    defaults, shown in the help, are the only ones."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            aliases = list(f.metadata.get("aliases", ()))
            kind = str(f.type)
            help_ = f.metadata.get("help", "") + _show_default(f)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            kw: dict = {"help": help_, **({"required": True} if required else {"default": None})}
            if kind.startswith("bool"):
                flags = [f"{flag}/--no-{flag[2:]}"]
            else:
                flags = [flag, *aliases]
                if f.metadata.get("multiple"):
                    kw["multiple"] = True
                elif "choices" in f.metadata:
                    kw["type"] = click.Choice(f.metadata["choices"])
                else:
                    kw["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            for old, why in f.metadata.get("deprecated", {}).items():
                extra = {k: kw[k] for k in ("type", "multiple") if k in kw}
                fn = deprecated_option(old, flag, f.name, why, flag=kind.startswith("bool"), **extra)(fn)
            fn = click.option(*flags, f.name, **kw)(fn)
        return fn

    return decorate


def _given(options: dict) -> dict:
    """The options given: None (and an empty repeat) left out, deprecated spellings moved to theirs."""
    out = {k: v for k, v in options.items() if v not in (None, ()) and not k.startswith("__old__")}
    for k, v in options.items():
        if k.startswith("__old__") and v not in (None, ()):
            name = k[len("__old__") :]
            if name in out:
                raise UserError(f"--{name.replace('_', '-')} is given twice (once by a deprecated spelling)")
            out[name] = v
    return out


def _flags(cls: type, names: tuple[str, ...]) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return [fields[n].metadata.get("flag", "--" + n.replace("_", "-")) for n in names if n in fields]


def _help_panels() -> None:
    """rich-click's option panels: train's by :data:`mlx_dft.config.HELP_GROUPS`, eval's and sample's
    by theirs; options of no panel (--config, --help) come last."""
    from mlx_dft.config import HELP_GROUPS
    from mlx_dft.evaluation.options import EVAL_HELP_GROUPS, SAMPLE_HELP_GROUPS

    panels = {}
    for command, cls, groups in (
        ("train", TrainConfig, HELP_GROUPS),
        ("plan", TrainConfig, HELP_GROUPS),
        ("eval", EvalConfig, EVAL_HELP_GROUPS),
        ("sample", SampleConfig, SAMPLE_HELP_GROUPS),
    ):
        panels[f"mlx_dft {command}"] = [
            *({"name": name, "options": _flags(cls, fields)} for name, fields in groups.items()),
            {"name": "Other", "options": ["--config", "--help"]},
        ]
    rich_click.rich_click.OPTION_GROUPS = panels
    rich_click.rich_click.MAX_WIDTH = 100
    rich_click.rich_click.SHOW_ARGUMENTS = True
    # Types go after the help text, so that the option names have the room they need at 80 columns.
    rich_click.rich_click.OPTIONS_TABLE_COLUMN_TYPES = ["required", "opt_long", "opt_short", "help"]
    # the metavar after the help text (rich-click 1.9 spelling of the older APPEND_METAVARS_HELP)
    rich_click.rich_click.OPTIONS_TABLE_HELP_SECTIONS = [
        "help", "deprecated", "envvar", "default", "required", "metavar",
    ]  # fmt: skip


_help_panels()

config_option = click.option(
    "-c",
    "--config",
    "config",
    type=str,
    default=None,
    help="YAML file of options (keys spelled like the long options); flags override it.",
)


@click.group(
    cls=rich_click.RichGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="mlx_dft")
def cli():
    """Fine-tune language models on your own machine with DFT, SFT, LoRA, DoRA or full fine-tuning."""


@cli.command()
@config_option
@click.option("--train", "mlx_lm_train", is_flag=True, hidden=True, help="mlx-lm's flag (always so).")
@dataclass_options(TrainConfig)
def train(config, mlx_lm_train, **options):
    """Fine-tune a model (default: DFT + LoRA on the bundled tiny model and task)."""
    from mlx_dft import api

    try:
        api.train(config, **_given(options))
    except KeyboardInterrupt:  # outside the training loop (api.train names the folder inside it)
        raise Interrupted(
            "interrupted outside training steps; what was saved before stays as it was"
        ) from None


@cli.command("plan")
@config_option
@click.option(
    "--machines", type=int, default=None, help="FSDP: one machine's peak with the run sharded over N."
)
@click.option(
    "--memory", default=None, help="FSDP: each machine's memory (64GB): the fewest machines the run fits on."
)
@dataclass_options(TrainConfig)
def plan_cmd(config, machines, memory, **options):
    """Estimate a run's peak memory and step time before loading anything (the model's config.json
    only), say whether it fits this machine, and what to change if not. Takes train's options; with
    --machines/--memory (or --shard fsdp), the same for a run sharded over several machines."""
    from mlx_dft import plan
    from mlx_dft.config import resolve

    cfg, _, _ = resolve(config, _given(options))
    for line in plan.report(cfg, machines, memory)[1]:
        click.echo(line)


@cli.command()
@click.option(
    "--model",
    default=None,
    help="Base model folder or repo id (default: the adapter's base model, else the bundled model).",
)
@click.option(
    "--adapter-path",
    "adapter",
    default=None,
    help="Adapter folder written by mlx_dft train (or a checkpoint folder, or a Hub id).",
)
@deprecated_option("--adapter", "--adapter-path", "adapter")
@click.option("--prompt", "-p", required=True, help="Prompt text; '-' reads standard input.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int)
@click.option(
    "--temperature",
    "--temp",
    default=0.0,
    show_default=True,
    type=float,
    help="Sampling temperature (0: greedy).",
)
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
@click.option(
    "--keep-quantized",
    is_flag=True,
    help="Keep a quantized base quantized on a CPU (default: float32 there when it fits).",
)
def generate(**options):
    """Generate text from a model, with or without a trained adapter."""
    from mlx_dft import api

    options = _given(options)
    prompt = options.pop("prompt")
    if prompt == "-":
        prompt = _stdin_text(sys.stdin.buffer.read())
    click.echo(api.generate(prompt, **options))


def _stdin_text(raw: bytes) -> str:
    """Bytes from standard input as text: UTF-8, else a one-line error (not a traceback)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"standard input is not UTF-8 text (byte {e.start + 1})") from None


@cli.command("chat")
@click.option("--model", default=None, help="Base model (default: the adapter's, else the bundled model).")
@click.option(
    "--adapter-path", "adapter", default=None, help="Adapter folder or any source generate accepts."
)
@deprecated_option("--adapter", "--adapter-path", "adapter")
@click.option("--chat-template", default=None, help="Chat template (text or file); default: the adapter's.")
@click.option("--system", default=None, help="System prompt of the conversation.")
@click.option("--max-tokens", "-m", default=512, show_default=True, type=int, help="Tokens per reply.")
@click.option("--temperature", "--temp", default=0.0, show_default=True, type=float, help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--keep-quantized",
    is_flag=True,
    help="Keep a quantized base quantized on a CPU (default: float32 there when it fits).",
)
def chat_cmd(**options):
    """Talk with a model and its adapter, turn after turn (the whole conversation goes through the
    chat template; earlier turns come from the KV cache). Type /reset to start over, /exit or
    Ctrl-D to leave. Reads standard input, so a file of messages works too."""
    from mlx_dft.chat import Chat

    o = _given(options)
    session = Chat.load(o.get("model"), o.get("adapter"), o.get("chat_template"), system=o.get("system"),
                        keep_quantized=o.get("keep_quantized", False),
                        max_tokens=o["max_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                        seed=o["seed"])  # fmt: skip
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("chat: /reset starts over, /exit or Ctrl-D leaves", err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = _stdin_text(sys.stdin.buffer.readline())
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
@click.option(
    "--requantize",
    is_flag=True,
    help="Re-quantize K-quant, IQ, MXFP4 and Q5 tensors to MLX's affine layout at their bits (4 at "
    "least; the added error is printed) instead of float16 (the default for --model FILE.gguf on a GPU).",
)
def convert_cmd(gguf_file, out, dequantize, requantize):
    """Convert a GGUF model (llama.cpp, Ollama, LM Studio) into a Hugging Face-layout folder that
    mlx-lm loads (Q4_0/Q4_1/Q8_0 tensors stay MLX-quantized unless --dequantize; other block types
    become float16, or MLX-quantized with --requantize)."""
    from mlx_dft.gguf.convert import convert_gguf

    path = convert_gguf(gguf_file, out, dequantize, requantize=requantize)
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
    """Offline-RL data: sample K responses per prompt, verify, keep the good ones for training.

    \b
    --verifier math checks the extracted final answer against the record's --answer-field;
    --verifier module:function imports your own, called once per response:
      def reward(prompt: str, completion: str, record: dict) -> float
    (record: the prompt's whole jsonl record). Rewards >= --min-reward are accepted."""
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
    """Train and evaluate several recipes side by side (YAML plan); writes report.md and plots.

    \b
    The plan (paths relative to it):
      common: {model: M, data: D, iters: 200, batch_size: 8}   # train options of every run
      runs:                                                    # name -> that run's options
        sft-lora: {loss: sft, fine_tune_type: lora}
        dft-lora: {loss: dft, fine_tune_type: lora}
      seeds: [0, 1, 2]                                         # every run once per seed
      eval:                                                    # accuracy after training
        problems:                                              # name -> jsonl and its fields
          in-distribution: {file: test.jsonl, question_field: prompt, answer_field: answer}
        max_tokens: 128                                        # and other `mlx_dft eval` options
      output: compare                                          # or --output

    Finished runs are reused and unfinished ones resumed while their settings are unchanged."""
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
    except OSError as e:
        if debug or e.errno is None:
            raise
        # The file system said no (no space left, read-only, permission, a name too long...):
        # atomic writes leave nothing half-written, so the line says what and where.
        where = f" ({e.filename})" if e.filename else ""
        print(f"mlx_dft: error: {e.strerror or os.strerror(e.errno)}{where}", file=sys.stderr)
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
