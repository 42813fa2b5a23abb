"""Bundled tasks: data generators and answer checkers."""

from pathlib import Path

ARITH_DIR = Path(__file__).parent / "arith"
ARITH_SMALL_DIR = Path(__file__).parent / "arith_small"  # small numbers: SmolLM2-135M's task
