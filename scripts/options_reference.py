"""The options reference (docs/options.md), generated from the command line itself: every command of
``mlx_dft``, every option it shows in ``--help``, with its type, default, YAML spelling and meaning.

    python scripts/options_reference.py            # print it
    python scripts/options_reference.py --write    # write docs/options.md

``train``'s and ``plan``'s options are the fields of :class:`mlx_dft.config.TrainConfig`, grouped in
the panels of ``--help``; ``eval``'s and ``sample``'s those of their dataclasses. tests/test_docs.py
checks that docs/options.md is what this prints, so the reference and ``--help`` cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_dft.cli import cli  # noqa: E402
from mlx_dft.config import HELP_GROUPS, TrainConfig  # noqa: E402
from mlx_dft.evaluation.compare import EVAL_OPTIONS, SET_OPTIONS  # noqa: E402
from mlx_dft.evaluation.options import (  # noqa: E402
    EVAL_HELP_GROUPS,
    SAMPLE_HELP_GROUPS,
    EvalConfig,
    SampleConfig,
)

OUT = ROOT / "docs" / "options.md"
ORDER = ("train", "plan", "generate", "chat", "eval", "sample", "compare", "export", "import", "convert",
         "fuse", "push")  # fmt: skip
PANELS = {"train": (TrainConfig, HELP_GROUPS), "plan": (TrainConfig, HELP_GROUPS),
          "eval": (EvalConfig, EVAL_HELP_GROUPS), "sample": (SampleConfig, SAMPLE_HELP_GROUPS)}  # fmt: skip
DEFAULT = re.compile(r"\s*\[default: (.*?)\]\s*$")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(p: click.Parameter) -> str:
    if isinstance(p, click.Option) and p.is_flag:
        return "flag"
    if isinstance(p.type, click.Choice):
        return " \\| ".join(f"`{c}`" for c in p.type.choices)
    name = {"integer": "integer", "float": "number", "text": "text", "path": "path", "file": "file"}
    kind = name.get(p.type.name, p.type.name)
    return f"{kind}, repeatable" if getattr(p, "multiple", False) else kind


def _default(p: click.Parameter, help_text: str) -> tuple[str, str]:
    """(default, help without the ``[default: ...]`` the dataclass options carry)."""
    m = DEFAULT.search(help_text)
    if m:
        return f"`{m.group(1)}`", help_text[: m.start()]
    if p.required:
        return "required", help_text
    d = p.default
    if d in (None, (), False) or callable(d) or type(d).__name__ == "Sentinel":  # click's UNSET
        return "", help_text
    if d is True and isinstance(p, click.Option) and p.secondary_opts:
        return f"`{p.opts[0]}`", help_text
    return f"`{d}`", help_text


def _names(p: click.Option) -> str:
    opts = [o for o in p.opts if o.startswith("-")]
    flags = ", ".join(f"`{o}`" for o in opts)
    if p.secondary_opts:
        flags += " / " + ", ".join(f"`{o}`" for o in p.secondary_opts)
    return flags


def _yaml(command: str, p: click.Option, fields: set[str]) -> str:
    if command in ("train", "plan") and p.name in fields:
        long = next(o for o in [*p.opts, *p.secondary_opts] if o.startswith("--"))
        return f"`{long[2:].replace('-', '_')}:`"
    if command == "eval" and p.name in EVAL_OPTIONS + SET_OPTIONS:
        return f"`eval: {p.name}:`"
    return ""


def _row(command: str, p: click.Option, fields: set[str], yaml: bool) -> str:
    default, help_text = _default(p, p.help or "")
    cells = [_names(p), _type(p), default]
    if yaml:
        cells.append(_yaml(command, p, fields))
    cells.append(_cell(help_text))
    return "| " + " | ".join(cells) + " |"


def _table(command: str, params: list[click.Option], fields: set[str], yaml: bool) -> list[str]:
    head = ["option", "type", "default", *(["YAML"] if yaml else []), "meaning"]
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *(_row(command, p, fields, yaml) for p in params),
    ]


def _arguments(cmd: click.Command) -> str:
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    return " ".join(f"{p.name.upper()}" + ("..." if p.nargs == -1 else "") for p in args)


def section(name: str) -> list[str]:
    cmd = cli.commands[name]
    usage = f"mlx_dft {name} [OPTIONS] {_arguments(cmd)}".rstrip()
    first = (cmd.help or "").strip().split("\n\n")[0]
    out = [f"## `mlx_dft {name}`", "", _cell(first), "", f"    {usage}", ""]
    options = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
    cls, groups = PANELS.get(name, (None, {}))
    fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
    yaml = name in ("train", "plan", "eval")
    if groups:
        by_name = {p.name: p for p in options}
        placed: set[str] = set()
        for panel, members in groups.items():
            params = [by_name[m] for m in members if m in by_name]
            if not params:
                continue
            placed.update(p.name for p in params)
            out += [f"### {panel}", "", *_table(name, params, fields, yaml), ""]
        rest = [p for p in options if p.name not in placed]
        if rest:
            out += ["### Other", "", *_table(name, rest, fields, yaml), ""]
    else:
        out += [*_table(name, options, fields, yaml), ""]
    return out


def reference() -> str:
    missing = set(cli.commands) - set(ORDER)
    if missing:
        raise SystemExit(f"scripts/options_reference.py: add {sorted(missing)} to ORDER")
    lines = [
        "# Options reference",
        "",
        "Every command and every option, generated from the command line itself by",
        "`python scripts/options_reference.py --write` (a test fails when this page is stale).",
        "`mlx_dft COMMAND --help` prints the same. An option has one name everywhere: on the command line",
        "(`--learning-rate`), in a YAML file given to `train -c` or in a `compare` plan's `runs`",
        "(`learning_rate:`, or `learning-rate:`), and in Python (`mlx_dft.train(learning_rate=...)`).",
        "The YAML column gives the spelling; `eval: ...` is a key of a `compare` plan's `eval:` block.",
        "mlx-lm's YAML keys are read too (see [training runs](training.md#options)).",
        "",
        "Commands: " + ", ".join(f"[`{n}`](#mlx_dft-{n})" for n in ORDER) + ".",
        "",
    ]
    for name in ORDER:
        lines += section(name)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(ROOT)}")
    args = ap.parse_args()
    text = reference()
    if args.write:
        OUT.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
