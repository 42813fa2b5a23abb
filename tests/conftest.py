# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""Shared fixtures: tiny random models built on the fly, and small task data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx_dft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_dft.tasks import arith

pytest_plugins = ["crash_report"]  # a native crash fails one test, naming the library (xdist)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_model(path: Path, config: dict, seed: int = 0, tokenizer_from: Path = BUNDLED) -> Path:
    """A random-weight mlx-lm model in Hugging Face layout (with the bundled tokenizer)."""
    from mlx_lm.utils import _get_classes

    path.mkdir(parents=True, exist_ok=True)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = {
        k: (mx.random.normal(v.shape) * 0.05 if v.ndim > 1 else v)
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / f, path / f)
    return path


def llama_config(**kw) -> dict:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-5,
        "vocab_size": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny", llama_config())


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "arith"
    d.mkdir()
    for name, seed, n in (("train", 1, 48), ("valid", 2, 16), ("test", 3, 8)):
        with open(d / f"{name}.jsonl", "w") as f:
            for p in arith.make_split(seed, n, (1, 2)):
                f.write(json.dumps(arith.to_record(p)) + "\n")
    return d


def params_of(model: nn.Module) -> dict:
    return {k: v for k, v in tree_flatten(model.parameters())}


@pytest.fixture(scope="session")
def tiny_model_4bit(tiny_model, tmp_path_factory) -> Path:
    """The tiny model quantized to 4 bits, as mlx-lm stores quantized models."""
    from mlx_lm.utils import load_model

    model, config = load_model(tiny_model)
    nn.quantize(model, group_size=32, bits=4)
    out = tmp_path_factory.mktemp("models") / "tiny-4bit"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config["quantization"] = {"group_size": 32, "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER_FILES:
        shutil.copy(tiny_model / f, out / f)
    return out


SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> dict[str, Path]:
    """SmolLM2-135M-Instruct as ``scripts/fetch_smollm2.py`` leaves it: ``gguf`` (the Q4_1 file),
    ``4bit`` and ``float32`` (folders it converted). Skips when it was not fetched."""
    paths = {
        "gguf": SMOLLM2 / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "4bit": SMOLLM2 / "4bit",
        "float32": SMOLLM2 / "float32",
    }
    folders = all((paths[k] / "config.json").is_file() for k in ("4bit", "float32"))
    if not paths["gguf"].is_file() or not folders:
        pytest.skip(
            "SmolLM2-135M-Instruct is not fetched: run `.venv/bin/python scripts/fetch_smollm2.py` "
            "(`bash scripts/setup.sh --test` does)"
        )
    return paths


class CliResult:
    """What :func:`run_cli` returns: subprocess.CompletedProcess's fields."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(args={self.args!r}, returncode={self.returncode}, stderr={self.stderr[-500:]!r})"


def run_cli(*args, cwd=None, env=None, timeout=300, input_text=None, subprocess: bool | None = None):
    """Run ``mlx_dft ARGS`` (``input_text``, text or bytes, on its standard input) and return its exit status,
    standard output and standard error.

    By default the command runs in this process, through the same ``main`` the console script
    calls (one-line errors, exit statuses), with its streams and working folder swapped for the
    call: a subprocess would pay the import of MLX, mlx-lm and transformers again for every call.
    It runs in a child process (``python -m mlx_dft``) when ``subprocess=True`` or when ``env``
    sets variables, which mlx_dft and its libraries may read at import time; tests of signals,
    start-up and of what a fresh interpreter prints ask for one. In this process, library loggers
    and warnings write to the command's stderr (MLX's random state is not restored: tests that need
    one seed it), and a command that runs past ``timeout`` ends the worker with every thread's
    stack (the test fails, named by the crash report)."""
    if subprocess is None:
        subprocess = bool(env)
    if subprocess:
        return _run_subprocess(args, cwd, env, timeout, input_text)
    return _run_in_process([str(a) for a in args], cwd, input_text, timeout)


def _run_subprocess(args, cwd, env, timeout, input_text):
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "mlx_dft", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        timeout=timeout,
        input=input_text.encode() if isinstance(input_text, str) else input_text,
    )
    decode = lambda b: b.decode(errors="replace")  # noqa: E731
    return CliResult(p.args, p.returncode, decode(p.stdout), decode(p.stderr))


def _run_in_process(args: list[str], cwd, input_text, timeout) -> CliResult:
    import contextlib
    import faulthandler
    import io
    import logging
    import os
    import sys
    import warnings

    from mlx_dft.cli import main

    out, err = io.StringIO(), io.StringIO()
    raw = input_text if isinstance(input_text, bytes) else (input_text or "").encode()
    stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
    saved = os.getcwd(), sys.stdin, sys.argv
    # Library loggers (transformers', ...) made their handlers in some earlier run: this run's
    # messages go to this run's stderr, as they would in a process of its own.
    handlers = [
        h for name in [None, *logging.root.manager.loggerDict]
        for h in getattr(logging.getLogger(name), "handlers", [])
        if type(h) is logging.StreamHandler  # libraries' own; not pytest's capture, not lastResort
    ]  # fmt: skip
    streams = [h.stream for h in handlers]
    code = 0
    faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)  # a hang ends the worker
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.stdin, sys.argv = stdin, ["mlx_dft", *args]
        for h in handlers:
            h.setStream(err)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda msg, cat, file, line, f=None, ln=None: err.write(
                warnings.formatwarning(msg, cat, file, line, ln)
            )
            try:
                main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        faulthandler.cancel_dump_traceback_later()
        for h, stream in zip(handlers, streams):
            h.setStream(stream)
        os.chdir(saved[0])
        sys.stdin, sys.argv = saved[1], saved[2]
        mx.clear_cache()
    return CliResult(["mlx_dft", *args], code, out.getvalue(), err.getvalue())
