# ruff: noqa: E501  (a table of cases reads best one case a line)
"""Bad input to every command: exit status != 0, one line on stderr naming the problem, no traceback,
and what was already on disk (an earlier run, a finished report) byte-identical afterwards.

Each case is (command line, text the error must contain); ``D`` in a command line stands for the
case's scratch folder, ``M`` for the tiny model, ``A`` for the task data, ``RUN`` for a finished
run (shared, so every case also proves that it left that run untouched), ``REPORT`` for a finished
evaluation report folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

GOOD = '{"prompt": "Q: 1 + 1?", "completion": " 2"}'


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _data(d: Path, lines: list[str | bytes], name: str = "train.jsonl") -> Path:
    body = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    return _write(d / "data" / name, body).parent


def _model_copy(d: Path, model: Path, edit) -> Path:
    out = d / "model"
    shutil.copytree(model, out)
    edit(out)
    return out


def _drop_model_type(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["model_type"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(path: Path, keep: int = -100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _checkpoint_copy(d: Path, run: Path, edit) -> Path:
    out = d / "run"
    shutil.copytree(run, out)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    edit(ckpt)
    return out


def _drop_state_field(ckpt: Path) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["rng"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


TRAIN = ["train", "--model", "M", "--data", "A", "--iters", "2", "--batch-size", "4", "--output", "D/out"]

def _no_iters() -> list[str]:
    i = TRAIN.index("--iters")
    return TRAIN[:i] + TRAIN[i + 2 :]


CASES = {
    # ---- train: data
    "data missing": (lambda d: [*TRAIN, "--data", d / "nope"], "data not found"),
    "data not utf-8": (
        lambda d: [*TRAIN, "--data", _data(d, [GOOD, b'{"text": "\xff\xfe"}'])],
        "line 2: not UTF-8",
    ),
    "data invalid json": (
        lambda d: [*TRAIN, "--data", _data(d, [GOOD, '{"prompt"'])],
        "line 2: invalid JSON",
    ),
    "data not an object": (lambda d: [*TRAIN, "--data", _data(d, ["[1, 2]"])], "expected a JSON object"),
    "data unknown keys": (
        lambda d: [*TRAIN, "--data", _data(d, ['{"q": 1}'])],
        "unknown record format (keys: q)",
    ),
    "data mixed formats": (
        lambda d: [*TRAIN, "--data", _data(d, [GOOD, '{"text": "t"}'])],
        "mixed record formats",
    ),
    "data empty": (lambda d: [*TRAIN, "--data", _data(d, [])], "is empty"),
    "data no train split": (
        lambda d: [*TRAIN, "--data", _data(d, [GOOD], "valid.jsonl")],
        "has no train.jsonl",
    ),
    "data fewer than a batch": (
        lambda d: [*TRAIN, "--data", _data(d, [GOOD] * 2)],
        "fewer than --batch-size 4",
    ),
    "data mixed prompt kinds": (
        lambda d: [
            *TRAIN,
            "--data",
            _data(d, ['{"prompt": "a", "completion": [{"role": "assistant"}]}'] * 8),
        ],
        "must both be strings",
    ),
    "chat data without template": (
        lambda d: [*TRAIN, "--data", _data(d, ['{"messages": [{"role": "user", "content": "a"}]}'] * 8)],
        "needs a chat template",
    ),
    "chat template syntax error": (
        lambda d: [
            *TRAIN,
            "--data",
            _data(d, ['{"messages": [{"role": "user", "content": "a"}]}'] * 8),
            "--chat-template",
            "{% for m in messages %}{{ m",
        ],  # fmt: skip
        "the chat template failed",
    ),
    "chat template raises": (
        lambda d: [
            *TRAIN,
            "--data",
            _data(d, ['{"messages": [{"role": "user", "content": "a"}]}'] * 8),
            "--chat-template",
            "{{ raise_exception('no system role here') }}",
        ],  # fmt: skip
        "no system role here",
    ),
    # ---- train: options and configs
    "unknown flag": (lambda d: [*TRAIN, "--itres", "3"], "No such option '--itres'"),
    "bad int": (lambda d: [*TRAIN, "--iters", "three"], "'three' is not a valid integer"),
    "bad choice": (lambda d: [*TRAIN, "--loss", "ppo"], "'ppo' is not one of"),
    "negative lr": (lambda d: [*TRAIN, "--learning-rate", "-1"], "--learning-rate must be positive"),
    "zero batch": (lambda d: [*TRAIN, "--batch-size", "0"], "--batch-size must be at least 1"),
    "iters and epochs": (lambda d: [*TRAIN, "--epochs", "1"], "give --iters or --epochs, not both"),
    "warmup inf": (lambda d: [*TRAIN, "--warmup", "inf"], "--warmup must be a finite number"),
    "epochs nan": (lambda d: [*_no_iters(), "--epochs", "nan"], "--epochs must be a finite number"),
    "epochs below one step": (lambda d: [*_no_iters(), "--epochs", "1e-9"], "less than one optimizer step"),
    "negative seed": (lambda d: [*TRAIN, "--seed", "-1"], "--seed must be >= 0"),
    "asft option with dft": (lambda d: [*TRAIN, "--asft-alpha", "0.5"], "applies to --loss asft only"),
    "eaft option with sft": (lambda d: [*TRAIN, "--loss", "sft", "--eaft-top-k", "5"], "--loss eaft only"),
    "decay with constant lr": (
        lambda d: [*TRAIN, "--lr-schedule", "constant", "--min-learning-rate", "1e-6"],
        "not --lr-schedule constant",
    ),
    "warmup init without warmup": (
        lambda d: [*TRAIN, "--warmup", "0", "--warmup-init", "1e-6"],
        "--warmup-init needs a warmup",
    ),
    "yaml scalar betas": (
        lambda d: [*TRAIN, "--config", _write(d / "c.yaml", "optimizer_config: {adamw: {betas: 0.9}}\n")],
        "betas must be a list of two numbers",
    ),
    "yaml hf_dataset": (
        lambda d: [*TRAIN, "--config", _write(d / "c.yaml", "hf_dataset: [{path: a/b}, {path: c/d}]\n")],
        "hf_dataset lists 2 datasets",
    ),
    "yaml unknown key": (
        lambda d: [*TRAIN, "--config", _write(d / "c.yaml", "itres: 3\n")],
        "unknown option 'itres'",
    ),
    "yaml not a mapping": (
        lambda d: [*TRAIN, "--config", _write(d / "c.yaml", "- 1\n")],
        "expected a mapping",
    ),
    "yaml invalid": (lambda d: [*TRAIN, "--config", _write(d / "c.yaml", "a: [1\n")], "invalid YAML"),
    "yaml missing": (lambda d: [*TRAIN, "--config", d / "none.yaml"], "config file not found"),
    "lora keys": (lambda d: [*TRAIN, "--lora-keys", "nothing_proj"], "no adaptable layer 'nothing_proj'"),
    "aligner start layer": (
        lambda d: [*TRAIN, "--fine-tune-type", "aligner", "--aligner-start-layer", "9"],
        "--aligner-start-layer 9 must be below",
    ),
    # ---- train: model, output, resume
    "model missing": (lambda d: [*TRAIN, "--model", d / "none"], "model not found"),
    "model hub id offline": (lambda d: [*TRAIN, "--model", "nobody/not-cached-anywhere"], "model not found"),
    "model without model_type": (
        lambda d: [*TRAIN, "--model", _model_copy(d, M_PATH[0], _drop_model_type)],
        "has no model_type",
    ),
    "model truncated weights": (
        lambda d: [
            *TRAIN,
            "--model",
            _model_copy(d, M_PATH[0], lambda f: _truncate(f / "model.safetensors")),
        ],
        "corrupt or truncated safetensors",
    ),
    "output is a file": (lambda d: [*TRAIN, "--output", _write(d / "f", "x")], "exists and is not a folder"),
    "output below a file": (lambda d: [*TRAIN, "--output", _write(d / "f", "x") / "sub"], "cannot create it"),
    "output holds a run": (lambda d: [*TRAIN, "--output", "RUN"], "already holds a run"),
    "resume missing": (lambda d: ["train", "--resume", d / "nowhere"], "resume path not found"),
    "resume without checkpoints": (lambda d: ["train", "--resume", _data(d, [GOOD])], "holds no checkpoint"),
    "resume at the end": (
        lambda d: ["train", "--resume", "RUN", "--output", d / "out"],
        "already at or past",
    ),
    "resume incomplete state": (
        lambda d: ["train", "--resume", _checkpoint_copy(d, RUN_PATH[0], _drop_state_field), "--iters", "5"],
        "incomplete checkpoint state",
    ),
    "resume into another run": (
        lambda d: [
            "train",
            "--resume",
            _checkpoint_copy(d, RUN_PATH[0], lambda c: None),
            "--output",
            "RUN",
            "--iters",
            "5",
        ],  # fmt: skip
        "already holds a run",
    ),
    "adapter-from missing": (lambda d: [*TRAIN, "--adapter-from", d / "none"], "adapter not found"),
    # ---- generate
    "generate adapter missing": (
        lambda d: ["generate", "--model", "M", "--adapter-path", d / "x", "-p", "hi"],
        "not found",
    ),
    "generate max tokens": (
        lambda d: ["generate", "--model", "M", "-p", "hi", "-m", "0"],
        "--max-tokens must be",
    ),
    "generate chat without template": (
        lambda d: ["generate", "--model", "M", "-p", "hi", "--chat"],
        "has no chat template",
    ),
    # ---- eval
    "eval nothing": (lambda d: ["eval", "--model", "M", "--output", "REPORT"], "nothing to evaluate"),
    "eval batch size": (
        lambda d: [
            "eval",
            "--model",
            "M",
            "--problems",
            "A/test.jsonl",
            "--batch-size",
            "0",
            "--output",
            "REPORT",
        ],
        "--batch-size",
    ),
    "eval max tokens": (
        lambda d: [
            "eval",
            "--model",
            "M",
            "--problems",
            "A/test.jsonl",
            "--max-tokens",
            "0",
            "--output",
            "REPORT",
        ],
        "--max-tokens",
    ),
    "eval negative temperature": (
        lambda d: [
            "eval",
            "--model",
            "M",
            "--problems",
            "A/test.jsonl",
            "--temperature",
            "-1",
            "--output",
            "REPORT",
        ],  # fmt: skip
        "--temperature",
    ),
    "eval unknown benchmark": (
        lambda d: ["eval", "--model", "M", "--benchmark", "gsm9k", "--output", "REPORT"],
        "unknown benchmark",
    ),  # fmt: skip
    "eval missing field": (
        lambda d: [
            "eval",
            "--model",
            "M",
            "--problems",
            "A/test.jsonl",
            "--question-field",
            "q",
            "--output",
            "REPORT",
        ],  # fmt: skip
        "no field 'q'",
    ),
    "eval output is a file": (
        lambda d: ["eval", "--model", "M", "--problems", "A/test.jsonl", "--output", _write(d / "f", "x")],
        "exists and is not a folder",
    ),
    # ---- sample
    "sample output is data": (
        lambda d: ["sample", "--model", "M", "--data", "A/test.jsonl", "--output", "A/test.jsonl"],
        "would overwrite the input",
    ),
    "sample verifier import": (
        lambda d: [
            "sample",
            "--model",
            "M",
            "--data",
            "A/test.jsonl",
            "--output",
            d / "o.jsonl",
            "--verifier",
            "no_such_module:fn",
        ],  # fmt: skip
        "cannot import it",
    ),
    "sample verifier spec": (
        lambda d: [
            "sample",
            "--model",
            "M",
            "--data",
            "A/test.jsonl",
            "--output",
            d / "o.jsonl",
            "--verifier",
            "nonsense",
        ],  # fmt: skip
        "use 'math' or 'module:function'",
    ),
    # ---- export / import / fuse / push
    "export missing": (lambda d: ["export", d / "none", "--out", d / "x"], "adapter folder not found"),
    "export of a peft folder": (
        lambda d: [
            "export",
            _write(d / "p" / "adapter_config.json", '{"peft_type": "LORA"}').parent,
            "--out",
            d / "x",
        ],  # fmt: skip
        "already a Hugging Face PEFT folder",
    ),
    "export format": (
        lambda d: ["export", "RUN", "--out", d / "x", "--format", "hf"],
        "a lora adapter exports as",
    ),
    "export onto existing folder": (
        lambda d: ["export", "RUN", "--out", "REPORT"],
        "already exists and is not empty",
    ),
    "import not an adapter": (
        lambda d: ["import", _write(d / "x.txt", "hi"), "--out", d / "o"],
        "not an adapter",
    ),
    "import corrupt pth": (
        lambda d: ["import", _write(d / "x.pth", "garbage"), "--out", d / "o"],
        "not a PyTorch",
    ),
    "fuse missing": (lambda d: ["fuse", d / "none", "--out", d / "o"], "adapter not found"),
    "push nothing to push": (lambda d: ["push", _data(d, [GOOD]), "--repo", "me/x"], "nothing to push"),
    "push bad repo": (lambda d: ["push", "RUN", "--repo", "no-slash"], "expected USER/NAME"),
    # ---- compare
    "compare missing plan": (lambda d: ["compare", d / "none.yaml"], "compare config not found"),
    "compare unknown key": (
        lambda d: ["compare", _write(d / "p.yaml", "runs: {a: {}}\nbogus: 1\n")],
        "unknown key",
    ),
    "compare no runs": (lambda d: ["compare", _write(d / "p.yaml", "common: {}\n")], "'runs' must map"),
    # ---- the command line itself
    "unknown command": (lambda d: ["frobnicate"], "No such command 'frobnicate'"),
}

M_PATH: list[Path] = []
RUN_PATH: list[Path] = []


@pytest.fixture(scope="module")
def world(tiny_model, arith_data, tmp_path_factory):
    """A finished run and a finished report, shared by every case (and checked untouched)."""
    base = tmp_path_factory.mktemp("bad-inputs")
    run = base / "run"
    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--iters", 2, "--batch-size", 4,
                "--save-every", 1, "--steps-per-eval", 100, "--val-batches", 1, "--output", run)  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = base / "report"
    _write(report / "report.json", '{"finished": true}')
    M_PATH[:] = [tiny_model]
    RUN_PATH[:] = [run]
    return {"M": tiny_model, "A": arith_data, "RUN": run, "REPORT": report}


def _snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def _expand(arg, world: dict) -> str:
    s = str(arg)
    for key in ("RUN", "REPORT"):
        if s == key:
            return str(world[key])
    if s == "M":
        return str(world["M"])
    if s == "A" or s.startswith("A/"):
        return str(world["A"]) + s[1:]
    if s.startswith("D/"):
        return s
    return s


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(world, tmp_path, name):
    build, needle = CASES[name]
    args = [_expand(a, world).replace("D/", f"{tmp_path}/", 1) for a in build(tmp_path)]
    before = _snapshot(world["RUN"], world["REPORT"], world["A"])
    p = run_cli(*args)
    assert p.returncode != 0, (name, p.stdout)
    assert needle in p.stderr, (name, p.stderr)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (name, p.stderr)
    assert _snapshot(world["RUN"], world["REPORT"], world["A"]) == before, name


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
