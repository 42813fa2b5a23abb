"""--report-to: every metrics.jsonl record reaches wandb (offline) and TensorBoard, read back with
their own formats (wandb's protobuf records, TensorBoard's event reader)."""

import glob
import json
import struct
import time

import pytest

import mlx_dft
from conftest import run_cli


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(path):
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of CRC, length,
    type; a record may be split over blocks as FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + data
            continue
        rec = pb.Record()
        rec.ParseFromString(pending + data if kind == 4 else data)
        pending = b""
        yield rec


def _wandb_finished(path) -> bool:
    """Whether the .wandb file at ``path`` holds its exit record (a file still being written may
    end inside a record)."""
    from google.protobuf.message import DecodeError

    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path))
    except DecodeError:
        return False


@pytest.mark.slow
def test_wandb_offline_gets_every_metric_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    mlx_dft.train(output=str(out), iters=6, steps_per_report=2, steps_per_eval=3, accuracy_problems=2,
                  report_to="wandb", project_name="tests", progress=False)  # fmt: skip
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    # wandb (0.31) returns from finish() before its service process has written the whole
    # offline file (seen: 1 run in 4 here read back with no records): wait for the exit record.
    deadline = time.monotonic() + 60
    while not _wandb_finished(files[0]):
        assert time.monotonic() < deadline, "wandb wrote no exit record within 60 s"
        time.sleep(0.5)
    history, config = {}, {}
    for rec in _wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(item.get("_step", rec.history.step.num), {}).update(item)
        elif kind == "run":  # the config may come with the run record or in later config records
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            assert rec.run.project == "tests" and rec.run.display_name == "run"
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    assert config["loss"] == "dft" and config["iters"] == 6
    recorded = _metrics(out)
    assert {r["step"] for r in recorded} == set(history)
    for r in recorded:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)):
                assert history[r["step"]][key] == pytest.approx(value), (r["step"], key)
    assert (out / "wandb_id").read_text().strip() in files[0]


def test_tensorboard_event_files_hold_every_metric(tmp_path):
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    mlx_dft.train(output=str(out), iters=6, steps_per_report=2, steps_per_eval=3, accuracy_problems=0,
                  report_to="tensorboard", progress=False)  # fmt: skip
    acc = accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    recorded = _metrics(out)
    for r in recorded:
        for key, value in r.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            assert key in tags, key
            events = {e.step: e.value for e in acc.Scalars(key)}
            assert events[r["step"]] == pytest.approx(value, rel=1e-6), (r["step"], key)
    assert "config" in "".join(acc.Tags().get("tensors", [])) or acc.Tags().get("tensors")


def test_unknown_tracker_is_refused_in_one_line(tmp_path):
    p = run_cli("train", "--iters", 1, "--report-to", "mlflow", "--output", tmp_path / "x")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "mlx_dft: error: --report-to: unknown tracker 'mlflow'; choose from wandb, tensorboard"
    ]
    assert not (tmp_path / "x").exists()


def test_project_name_without_wandb_is_refused(tmp_path):
    p = run_cli("train", "--iters", 1, "--project-name", "x", "--output", tmp_path / "x")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "mlx_dft: error: --project-name names a wandb project: give it with --report-to wandb"
    ]
    assert not (tmp_path / "x").exists()


def test_a_missing_tracker_library_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import builtins

    from mlx_dft.errors import UserError

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UserError, match="install wandb"):
        mlx_dft.train(output=str(tmp_path / "x"), iters=1, report_to="wandb", progress=False)
    assert not (tmp_path / "x").exists()
