"""Durability: a run stopped at any moment (SIGKILL, Ctrl-C, a NaN) leaves a folder whose resume
ends with the weights of the uninterrupted run, and every message names real paths."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_dft
from conftest import run_cli
from mlx_dft import api
from mlx_dft.trainer import Callback

FAST = dict(batch_size=4, steps_per_report=1, steps_per_eval=1000, val_batches=1, progress=False)


def _cmd(model, data, out, iters, *extra) -> list[str]:
    args = ["train", "--model", model, "--data", data, "--output", out, "--iters", iters,
            "--batch-size", 4, "--save-every", 1, "--steps-per-report", 1, "--steps-per-eval", 1000,
            "--val-batches", 1, *extra]  # fmt: skip
    return [sys.executable, "-m", "mlx_dft", *map(str, args)]


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before the moment came")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the moment never came")
        time.sleep(0.002)


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def _weights(folder: Path) -> dict:
    """The adapter's tensors, read now (mx.load reads lazily: the file may be replaced after)."""
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


# ------------------------------------------------------------------ SIGKILL anywhere


@pytest.mark.slow
def test_a_run_killed_at_ten_moments_resumes_to_the_uninterrupted_weights(tiny_model, arith_data, tmp_path):
    iters = 10
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(tiny_model, arith_data, ref, iters), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = _weights(ref)

    # Moments spread over the run: before the first checkpoint, then just after checkpoint k appears
    # (with save_every 1, the next checkpoint's and the top-level adapter's writes are under way).
    after = [(1, 0.0), (2, 0.003), (3, 0.01), (4, 0.0), (5, 0.02), (6, 0.001), (8, 0.005), (9, 0.0)]
    moments = [("config", 0.0), ("config", 0.05)] + [("step", k, delay) for k, delay in after]
    for i, moment in enumerate(moments):
        out = tmp_path / f"k{i}"
        proc = subprocess.Popen(_cmd(tiny_model, arith_data, out, iters),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if moment[0] == "config":
            _wait_for(lambda out=out: (out / "adapter_config.json").is_file(), proc)
        else:
            state = _checkpoint(out, moment[1]) / "trainer_state.json"
            _wait_for(state.is_file, proc)
        time.sleep(moment[-1])
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        # What a user does next: resume the folder (or, before any checkpoint, start it again).
        resumed = run_cli("train", "--resume", out)
        if resumed.returncode != 0:
            assert "before its first checkpoint" in resumed.stderr, resumed.stderr
            assert resumed.stderr.count("\n") == 1, resumed.stderr
            again = subprocess.run(_cmd(tiny_model, arith_data, out, iters, "--overwrite"),
                                   capture_output=True, text=True)  # fmt: skip
            assert again.returncode == 0, again.stderr
        got = _weights(out)
        assert set(got) == set(expected)
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], atol=1e-6, err_msg=moment[0])
        leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
        assert not leftovers, leftovers
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train_steps = [r["step"] for r in records if "train_loss" in r]
        assert train_steps == list(range(1, iters + 1)), (moment, train_steps)  # each report once


def test_a_kill_between_the_final_checkpoint_and_the_top_level_adapter_is_finished_by_resume(
    tiny_model, arith_data, tmp_path
):
    out = tmp_path / "r"
    mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(out), iters=4, save_every=2, **FAST)
    final = _weights(out)
    # What a kill after the final checkpoint's rename leaves: the top-level adapter one checkpoint behind.
    (out / "adapters.safetensors").write_bytes((_checkpoint(out, 2) / "adapters.safetensors").read_bytes())
    p = run_cli("train", "--resume", out)
    assert p.returncode == 0, p.stderr
    assert "already at step 4" in p.stdout
    got = _weights(out)
    assert all(np.array_equal(got[k], final[k]) for k in final)
    # Elsewhere a finished checkpoint is still refused: there is nothing left to train.
    p = run_cli("train", "--resume", out, "--output", tmp_path / "other")
    assert p.returncode == 1 and "already at or past" in p.stderr and not (tmp_path / "other").exists()


# ------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def test_ctrl_c_names_the_real_output_folder_to_resume(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    # Ctrl-C as a terminal sends it: with SIGINT's default disposition (a test runner started in
    # the background of a non-interactive shell ignores SIGINT, and its children inherit that)
    proc = subprocess.Popen(_cmd(tiny_model, arith_data, out, 100000),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    _wait_for(lambda: (_checkpoint(out, 2) / "trainer_state.json").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"continue with --resume {out}" in err and "OUTPUT_FOLDER" not in err, err
    p = run_cli("train", "--resume", out, "--iters", 5)  # the command it names works
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------ NaN


def _poisoned(model):
    return tree_unflatten([(k, v * float("nan")) for k, v in tree_flatten(model.trainable_parameters())])


def _nan_after_checkpoint_4(model, data, out: Path, **options) -> str:
    """The message of a run (checkpoints every 2 steps) whose weights turn NaN right after the
    checkpoint of step 4, so that step 5's loss is NaN."""

    class Poison(Callback):
        def on_checkpoint(self, path, run):
            if run.step == 4:
                run.model.update(_poisoned(run.model))

    with pytest.raises(api.UserError) as e:
        mlx_dft.train(model=str(model), data=str(data), output=str(out), iters=8, save_every=2,
                      callbacks=[Poison()], **FAST, **options)  # fmt: skip
    return str(e.value)


def test_a_nan_names_a_checkpoint_whose_weights_did_not_fail(tiny_model, arith_data, tmp_path):
    """The loss at step 5 comes from the weights saved at step 4: that checkpoint is not good."""

    out = tmp_path / "r"
    msg = _nan_after_checkpoint_4(tiny_model, arith_data, out)
    good = _checkpoint(out, 2)
    assert "loss became nan at step 5" in msg and f"last good checkpoint is {good}" in msg, msg
    assert "the one at step 4 holds the weights that failed" in msg, msg
    assert f"--resume {good}" in msg
    # Resuming from the named checkpoint trains on with finite losses (no poison this time).
    run = mlx_dft.train(resume=str(good), output=str(tmp_path / "again"), progress=False)
    assert all(np.isfinite(r["train_loss"]) for r in run.history if "train_loss" in r)


def test_non_finite_weights_are_never_saved(tiny_model, arith_data, tmp_path):
    class Poison(Callback):
        def on_train_report(self, rec, run):
            if run.step == 4:  # after step 4's update, before its checkpoint
                run.model.update(_poisoned(run.model))

    out = tmp_path / "r"
    with pytest.raises(api.UserError) as e:
        mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(out), iters=8, save_every=2,
                      callbacks=[Poison()], **FAST)  # fmt: skip
    msg = str(e.value)
    assert "weights became non-finite at step 4" in msg, msg
    assert f"last good checkpoint is {_checkpoint(out, 2)}" in msg, msg
    assert not _checkpoint(out, 4).exists()
    assert all(np.isfinite(v).all() for v in _weights(out).values())


def test_keep_checkpoints_never_removes_the_last_good_one(tiny_model, arith_data, tmp_path):
    out = tmp_path / "r"
    msg = _nan_after_checkpoint_4(tiny_model, arith_data, out, keep_checkpoints=1)
    good = _checkpoint(out, 2)
    assert f"last good checkpoint is {good}" in msg and (good / "trainer_state.json").is_file()


def test_resume_past_the_end_and_the_test_report_of_a_finished_kill(tiny_model, arith_data, tmp_path):
    out = tmp_path / "r"
    mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(out), iters=4, save_every=2,
                  test=True, **FAST)  # fmt: skip
    with pytest.raises(api.UserError, match="already at or past --iters 2"):
        mlx_dft.train(resume=str(out), iters=2, progress=False)  # fewer steps than it has: refused
    # killed before its test report: resuming finishes it, test report included, once
    metrics = out / "metrics.jsonl"
    metrics.write_text("".join(x + "\n" for x in metrics.read_text().splitlines() if "test_loss" not in x))
    mlx_dft.train(resume=str(out), progress=False)
    mlx_dft.train(resume=str(out), progress=False)
    assert metrics.read_text().count("test_loss") == 1


def test_the_ctrl_c_message_for_a_run_resumed_into_another_folder():
    from mlx_dft.api import _interrupted
    from mlx_dft.trainer import Run

    out, elsewhere = Path("/runs/b"), Path("/runs/a/checkpoints/step-0000002")
    msg = _interrupted(Run(None, None, None, out, step=3, last_checkpoint=elsewhere), out)
    assert msg.endswith(f"continue with --resume {elsewhere} --output /runs/b --overwrite")
    own = Path("/runs/b/checkpoints/step-0000004")
    msg = _interrupted(Run(None, None, None, out, step=5, last_checkpoint=own), out)
    assert msg.endswith("continue with --resume /runs/b")
