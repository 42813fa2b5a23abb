"""The README's commands: every `mlx_dft` line names a command and options that exist, and the
first-session block runs as written on the bundled model and task."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from conftest import ROOT
from mlx_dft.cli import cli

README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(offset, body) of every ```bash block."""
    return [(m.start(), m.group(1)) for m in re.finditer(r"```bash\n(.*?)```", text, re.S)]


def commands(body: str) -> list[list[str]]:
    """The `mlx_dft ...` commands of a block, as argument lists (quoted newlines joined, comments
    and optional [brackets] dropped, 'a|b' alternatives as their first)."""
    out = []
    for words in _statements(body):
        if "--" in words and words[words.index("--") + 1 :][:1] == ["mlx_dft"]:  # mlx.launch ... -- mlx_dft
            words = words[words.index("--") + 1 :]
        if words[0] != "mlx_dft":
            continue
        words = words[1:]
        clean = []
        for w in words:
            w = w.strip("[]")
            if w and w != "...":
                clean.append(w.split("|")[0])
        out.append(clean)
    return out


def _statements(body: str) -> list[list[str]]:
    """Shell statements of a block: lines joined while a quote is open or a line ends in a
    backslash, comments dropped, split at && and ;."""
    logical, buf = [], ""
    for line in body.splitlines():
        buf = f"{buf}\n{line}" if buf else line
        if buf.count('"') % 2 == 0 and not buf.endswith("\\"):
            logical.append(buf)
            buf = ""
        elif buf.endswith("\\"):
            buf = buf[:-1]
    statements = []
    for line in logical:
        current: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", ";", "||"):
                statements.append(current)
                current = []
            else:
                current.append(token.removeprefix(".venv/bin/"))
        statements.append(current)
    return [st for st in statements if st]


def visible_options(command: click.Command) -> set[str]:
    names = set()
    for p in command.params:
        if isinstance(p, click.Option) and not p.hidden:
            names.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
    return names | {"--help"}


def test_every_readme_command_names_a_command_and_options_that_exist():
    seen = 0
    for _, body in bash_blocks(README):
        for words in commands(body):
            if not words or words[0].startswith("-"):
                continue
            name = words[0]
            assert name in cli.commands, f"README: unknown command mlx_dft {name}"
            known = visible_options(cli.commands[name])
            for w in words[1:]:
                if w.startswith("--"):
                    flag = w.split("=")[0]
                    assert flag in known, f"README: mlx_dft {name} has no option {flag}"
            seen += 1
    assert seen >= 30


def test_first_session_block_runs_as_written(tmp_path):
    marker = README.index("<!-- readme-test: first-session -->")
    body = next(b for start, b in bash_blocks(README) if start > marker)
    tasks = str(ROOT / "mlx_dft" / "tasks")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for words in _statements(body):
        words = [w.replace("mlx_dft/tasks", tasks) for w in words]
        p = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (words, p.stderr)
        outputs.append(p.stdout)
    train = outputs[0]
    assert "done in " in train and "accuracy " in train and "next:" in train
    assert (tmp_path / "runs" / "first" / "adapters.safetensors").is_file()
    assert (tmp_path / "evals" / "first" / "report.json").is_file()
    assert (tmp_path / "evals" / "first-sft" / "report.json").is_file()
    assert (tmp_path / "first-peft" / "adapter_config.json").is_file()


@pytest.mark.parametrize("text,expected", [
    ("mlx_dft train --loss dft   # a comment\n", [["train", "--loss", "dft"]]),
    ('mlx_dft generate -p "a\nb" [--chat]\n', [["generate", "-p", "a\nb", "--chat"]]),
    ("mlx_dft fuse x --gguf-type f32|f16\n", [["fuse", "x", "--gguf-type", "f32"]]),
])  # fmt: skip
def test_command_extraction(text, expected):
    assert commands(text) == expected


def test_the_support_matrix_is_what_the_code_says():
    """The README's model type x feature table is generated (scripts/support_matrix.py) from the
    features' own checks; a change to what a feature supports fails here until it is regenerated."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import support_matrix
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    readme = (ROOT / "README.md").read_text()
    assert support_matrix.section() in readme, "run: python scripts/support_matrix.py --write"
