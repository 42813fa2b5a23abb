# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""The support matrix (model type x feature) of the README and of docs/architectures.md, generated
from the features' own checks (:mod:`mlx_dft.support`) on models of each type built lazily (no
weights computed).

    python scripts/support_matrix.py            # print it
    python scripts/support_matrix.py --write    # replace the section in both files

tests/test_docs.py checks that both files hold what this prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_dft  # noqa: F401,E402
from mlx_dft import support  # noqa: E402
from mlx_dft.models import build_model  # noqa: E402
from tests.arch_models import CONFIGS  # noqa: E402

FILES = (ROOT / "README.md", ROOT / "docs" / "architectures.md")
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
EXTRA = {  # the older types the suite covers with llama-shaped configs
    "mistral": {**CONFIGS["llama"], "model_type": "mistral", "sliding_window": None},
    "qwen2": {**CONFIGS["llama"], "model_type": "qwen2"},
}


def section() -> str:
    configs = {"llama": CONFIGS["llama"], **EXTRA, **{k: v for k, v in CONFIGS.items() if k != "llama"}}
    built = {kind: (build_model(cfg, kind), cfg) for kind, cfg in configs.items()}
    lines = [
        START,
        support.matrix(built),
        "",
        "Where not (generated from the same checks):",
        "",
        *support.reasons(built),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the section in both files")
    args = ap.parse_args()
    text = section()
    if not args.write:
        print(text)
        return
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    for page in FILES:
        old = page.read_text()
        if not pattern.search(old):
            sys.exit(f"{page} has no {START} ... {END} section")
        page.write_text(pattern.sub(lambda _: text, old))


if __name__ == "__main__":
    main()
