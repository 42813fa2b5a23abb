"""Run by tests/test_distributed.py under ``mlx.launch``: one training run, options as JSON argv[1]."""

import json
import sys

import mlx_dft

if __name__ == "__main__":
    mlx_dft.train(progress=False, **json.loads(sys.argv[1]))
