"""Hugging Face repo ids resolve through huggingface_hub's cache, offline (no network in tests)."""

import os
import shutil
import subprocess
import sys

import pytest


def fill_cache(cache, repo, src, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a model as huggingface_hub's cache holds a downloaded snapshot."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    shutil.copytree(src, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return snap


SCRIPT = """
import sys
import mlx_dft
from mlx_dft.models import resolve_model_path
from mlx_dft.errors import UserError
try:
    print(resolve_model_path(sys.argv[1]))
except UserError as e:
    print("ERROR", e)
"""


@pytest.mark.parametrize("repo,found", [("someone/tiny-model", True), ("someone/not-cached", False)])
def test_repo_id_resolves_from_the_offline_cache(tiny_model, tmp_path, repo, found):
    snap = fill_cache(tmp_path / "hub", "someone/tiny-model", tiny_model)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path),
    }
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, repo], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    if found:
        assert p.stdout.strip() == str(snap)
    else:
        assert p.stdout.startswith("ERROR model not found: someone/not-cached")
