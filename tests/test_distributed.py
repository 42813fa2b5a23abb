"""Data-parallel training over mx.distributed (ring backend, 2 processes on loopback) gives the
weights of a single process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two processes over the ring backend

HERE = Path(__file__).parent


def launcher() -> str | None:
    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.exists() else shutil.which("mlx.launch")


@pytest.mark.skipif(launcher() is None, reason="mlx.launch is not installed")
@pytest.mark.parametrize(
    "loss",
    [
        {"loss": "dft"},
        {"loss": "asft", "sft_warmup_steps": 2},
        {"loss": "eaft"},
        {"loss": "dft", "pack": True, "max_seq_length": 256},
    ],
    ids=["dft", "asft-after-sft", "eaft", "dft-packed"],
)
def test_two_workers_match_one(tiny_model, arith_data, tmp_path, loss):
    opts = dict(
        **loss,
        model=str(tiny_model),
        data=str(arith_data),
        iters=6,
        batch_size=4,
        grad_accumulation_steps=2,
        optimizer="sgd",
        learning_rate=0.5,
        steps_per_report=3,
        save_every=3,
    )
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    worker = str(HERE / "dist_worker.py")
    one = subprocess.run(
        [sys.executable, worker, json.dumps({**opts, "output": str(tmp_path / "one")})],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            launcher(),
            "--backend",
            "ring",
            "-n",
            "2",
            "--starting-port",
            str(35000 + os.getpid() % 20000),
            "--",
            sys.executable,
            worker,
            json.dumps({**opts, "output": str(tmp_path / "two")}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 workers" in two.stdout
    listing = sorted(p.name for p in (tmp_path / "two").iterdir()) if (tmp_path / "two").exists() else None
    assert (tmp_path / "two" / "adapters.safetensors").is_file(), (listing, two.stdout, two.stderr)
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=2e-5)
    moved = max(float(mx.abs(v).max()) for k, v in a.items() if k.endswith("lora_b"))
    assert moved > 1e-3
    # only rank 0 wrote: one metrics file, each report once
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(map(str, steps))) or sorted(steps) == steps
    # the reported sums (objective, CE, the loss's parts) are the whole global batch's
    records = [
        [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    keys = {k for r in records[0] for k in r if k.startswith(("train_", "val_")) and "time" not in k}
    expected_parts = {"asft": {"train_kl", "val_kl", "train_dft"}, "eaft": {"train_eaft_weight"}}
    assert expected_parts.get(loss["loss"], set()) <= keys, keys
    assert len(records[0]) == len(records[1])
    for r1, r2 in zip(*records):
        assert r1["step"] == r2["step"]
        for k in keys & set(r1):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (r1["step"], k)
