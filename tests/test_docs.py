"""The README and the documentation site (docs/, mkdocs.yml): every `mlx_dft` command shown names a
command and options that exist, the quick start's first session runs as written on the bundled model
and task, the generated parts (support matrix, options reference) are current, and `mkdocs build
--strict` passes: no broken link or anchor, no page left out of the navigation."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from conftest import ROOT
from mlx_dft.cli import cli

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


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


def command_problems(text: str) -> tuple[list[str], int]:
    """What is wrong with the `mlx_dft` commands of a page's bash blocks (an unknown command, an
    option the command does not have), and how many commands were checked."""
    problems, seen = [], 0
    for _, body in bash_blocks(text):
        for words in commands(body):
            if not words or words[0].startswith("-"):
                continue
            name = words[0]
            if name not in cli.commands:
                problems.append(f"unknown command mlx_dft {name}")
                continue
            known = visible_options(cli.commands[name])
            for w in words[1:]:
                if w.startswith("--") and w.split("=")[0] not in known:
                    problems.append(f"mlx_dft {name} has no option {w.split('=')[0]}")
            seen += 1
    return problems, seen


def test_every_command_shown_names_a_command_and_options_that_exist():
    seen, problems = 0, []
    for page in PAGES:
        found, n = command_problems(page.read_text())
        problems += [f"{page.relative_to(ROOT)}: {p}" for p in found]
        seen += n
    assert not problems, "\n".join(problems)
    assert seen >= 45  # a parser that stopped finding commands would pass vacuously


def test_a_stale_option_in_a_page_is_named():
    text = "```bash\nmlx_dft train --loss dft --no-such-option 3\nmlx_dft trian --iters 2\n```\n"
    problems, _ = command_problems(text)
    assert problems == ["mlx_dft train has no option --no-such-option", "unknown command mlx_dft trian"]


def test_the_readme_stays_short():
    lines = README.count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move depth into docs/ (at most 200)"


@pytest.mark.slow
def test_first_session_block_runs_as_written(tmp_path):
    quickstart = (DOCS / "quickstart.md").read_text()
    marker = quickstart.index("<!-- docs-test: first-session -->")
    body = next(b for start, b in bash_blocks(quickstart) if start > marker)
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


def _script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_every_registered_loss_has_a_row_in_the_loss_tables():
    """A loss added as a class shows up in --help by itself; its row in the README's and the
    losses page's tables is the docs line it needs."""
    from mlx_dft.losses import LOSSES

    for page in (ROOT / "README.md", ROOT / "docs" / "losses.md"):
        text = page.read_text()
        missing = [name for name in LOSSES if f"| `{name}` |" not in text]
        assert not missing, f"{page.name} has no loss-table row for {missing}"


def test_the_support_matrix_is_what_the_code_says():
    """The model type x feature table (README, docs/architectures.md) is generated
    (scripts/support_matrix.py) from the features' own checks; a change to what a feature supports
    fails here until it is regenerated."""
    support_matrix = _script("support_matrix")
    section = support_matrix.section()
    for page in support_matrix.FILES:
        assert section in page.read_text(), f"{page.name}: run python scripts/support_matrix.py --write"


def test_the_options_reference_is_what_the_cli_says():
    options_reference = _script("options_reference")
    assert options_reference.OUT.read_text() == options_reference.reference(), (
        "docs/options.md is stale: run python scripts/options_reference.py --write"
    )


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", root / "mkdocs.yml", "-d", site],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_site_builds_strict(tmp_path):
    p = mkdocs_build(ROOT, tmp_path / "site")
    warnings = [line for line in p.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert p.returncode == 0 and not warnings, "\n".join(warnings) or p.stderr[-2000:]
    assert (tmp_path / "site" / "options" / "index.html").is_file()
    assert "mlx_dft.api.train" in (tmp_path / "site" / "api" / "index.html").read_text()


def _append(page: str, text: str):
    return lambda d: (d / page).write_text((d / page).read_text() + text)


@pytest.mark.parametrize("breakage,named", [
    (_append("losses.md", "\n[x](no-such-page.md)\n"), "no-such-page.md"),
    (_append("losses.md", "\n[x](data.md#no-such-anchor)\n"), "no-such-anchor"),
    (lambda d: (d / "orphan.md").write_text("# Orphan\n"), "orphan.md"),
])  # fmt: skip
def test_a_broken_site_fails_naming_the_problem(tmp_path, breakage, named):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copytree(ROOT / "mlx_dft", tmp_path / "mlx_dft")  # the API page's docstrings
    breakage(tmp_path / "docs")
    p = mkdocs_build(tmp_path, tmp_path / "site")
    assert p.returncode != 0 and named in p.stderr, p.stderr[-2000:]
