"""Bundled tasks: data generators and answer checkers."""

from pathlib import Path

ARITH_DIR = Path(__file__).parent / "arith"
