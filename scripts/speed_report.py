"""Every speed figure of the README in one command, with the machine and versions named.

    python scripts/speed_report.py                   # all of it, into docs/speed.md (~35 min here)
    python scripts/speed_report.py --only qwen3-0.6b --out /tmp/speed.md

Runs, one after the other, each in its own process (so none shares a warm cache or a BLAS
setting with another), and writes what each printed under its command line:

  tiny         scripts/bench.py: stock `mlx_lm lora` (as installed, and on OpenBLAS) against
               `mlx_dft train` on the bundled model and task
  qwen3-0.6b   scripts/bench.py --shape qwen3-0.6b: the same at the Qwen3-0.6B shape, batch 4 of
               the bundled task, with a run of `--pack` (rows of 224 tokens)
  alpaca       scripts/bench.py --alpaca-shaped --pack: instruction-shaped lengths, packed rows
  dft-cost     scripts/bench_loss.py: DFT's cost over SFT, steps interleaved in one process
  profile      scripts/profile_step.py: where a step's time goes at the Qwen3-0.6B shape

A run that fails is reported as failed (its exit status and the end of its output), and the
script then exits with status 1; the report is written either way (atomically).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_dft.files import atomic_write_text  # noqa: E402  (imports mlx_dft first: OpenBLAS under MLX)

RUNS = {
    "tiny": ("The bundled tiny model against stock mlx-lm",
             ["scripts/bench.py", "--iters", "60", "--repeats", "2"]),
    "qwen3-0.6b": ("The Qwen3-0.6B shape against stock mlx-lm",
                   ["scripts/bench.py", "--shape", "qwen3-0.6b", "--iters", "6", "--batch-size", "4",
                    "--report", "2", "--repeats", "1", "--skip-reference",
                    "--pack", "--max-seq-length", "224"]),
    "alpaca": ("Instruction-shaped data, packed",
               ["scripts/bench.py", "--alpaca-shaped", "--pack", "--iters", "30", "--batch-size", "8",
                "--max-seq-length", "1024", "--report", "5", "--repeats", "1", "--skip-reference"]),
    "dft-cost": ("DFT's cost over SFT", ["scripts/bench_loss.py"]),
    "profile": ("Where a step's time goes, Qwen3-0.6B shape", ["scripts/profile_step.py", "--reps", "3"]),
}  # fmt: skip


def machine() -> list[str]:
    """Lines naming this machine and the versions that run."""
    import mlx.core as mx

    from mlx_dft import _blas

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    import mlx_lm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; mlx_dft at commit {commit}",
        f"- machine: {cpu}, {os.cpu_count()} cores{memory}; {platform.system()} {platform.release()}; "
        f"MLX device {mx.default_device()}",
        f"- versions: Python {platform.python_version()}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}",
        f"- {_blas.info().describe()}{_openblas_config()}",
    ]


def _openblas_config() -> str:
    """OpenBLAS's own description of its build (version, kernel, threads), when it is under MLX."""
    import ctypes

    from mlx_dft import _blas

    if _blas.info().name != "OpenBLAS":
        return ""
    try:
        lib = ctypes.CDLL(_blas.info().path) if _blas.info().path else ctypes.CDLL(None)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return f": {lib.openblas_get_config().decode().strip()}, {lib.openblas_get_num_threads()} threads"
    except (OSError, AttributeError):
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "speed.md"))
    ap.add_argument("--only", nargs="+", choices=sorted(RUNS), help="run these parts only")
    args = ap.parse_args()

    lines = ["# Speed report", "", "Written by `python scripts/speed_report.py`.", "", *machine(), ""]
    failed = []
    for key in args.only or RUNS:
        title, cmd = RUNS[key]
        shown = " ".join(["python", *cmd])
        print(f"== {key}: {shown}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        out = [x for x in p.stdout.splitlines() if x.strip()]
        lines += [f"## {title}", "", f"`{shown}` ({wall / 60:.1f} min)", ""]
        if p.returncode != 0:
            failed.append(key)
            tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
            lines += [f"**failed** (exit status {p.returncode}):", "", "```", *tail, "```", ""]
        else:
            lines += [*_markdown(out), ""]
        shown_out = out[-25:] if p.returncode == 0 else (p.stdout + p.stderr).splitlines()[-15:]
        print("\n".join(shown_out), flush=True)
    atomic_write_text(Path(args.out), "\n".join(lines).rstrip() + "\n")
    print(f"report: {args.out}")
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


def _markdown(out: list[str]) -> list[str]:
    """A script's output as markdown: its tables kept as tables, other lines as list items."""
    md, in_table = [], False
    for line in out:
        is_row = line.lstrip().startswith("|")
        if is_row and not in_table:
            md.append("")
        if not is_row and in_table:
            md.append("")
        md.append(line if is_row or line.lstrip().startswith("- ") else f"- {line.strip()}")
        in_table = is_row
    return md


if __name__ == "__main__":
    main()
