"""The Python API's extension points: a loss object or function, records as data, callbacks that
report, stop or fail; and the one-line errors of each."""

import json
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import numpy as np
import pytest

import mlx_dft
from mlx_dft.losses import DFT, Loss, option

FAST = dict(
    batch_size=4, steps_per_report=1, progress=False, iters=3, learning_rate=1e-2, accuracy_problems=0
)


def weights(folder):
    return mx.load(str(folder / "adapters.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=atol, rtol=0, err_msg=k)


@dataclass(frozen=True)
class Focal(Loss):
    """A loss of one's own, not registered: (1 - p)^gamma * CE."""

    name: ClassVar[str] = "focal"
    uses_logits: ClassVar[bool] = False
    parts: ClassVar[dict[str, str]] = {"focal_weight": "fw"}
    gamma: float = option(2.0, "focal exponent")

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        w = mx.stop_gradient(1 - mx.exp(-ce)) ** self.gamma
        return w * ce, (w,)


def test_a_function_loss_trains_as_the_loss_it_computes(tiny_model, arith_data, tmp_path, monkeypatch):
    """A per-token function of the chunk's logits and targets (here the cross-entropy, written by
    the user) trains as SFT does: the same losses at every step and the same weights (1e-6; SFT
    held to the logits path too, not the CPU's softmax-keeping one, whose rounding differs)."""
    from mlx_dft.losses import compute

    monkeypatch.setattr(compute, "keeps_softmax", lambda head, loss: False)

    def my_ce(logits, targets):
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]

    common = dict(model=str(tiny_model), data=str(arith_data), **FAST)
    mine = mlx_dft.train(output=str(tmp_path / "mine"), loss=my_ce, **common)
    sft = mlx_dft.train(output=str(tmp_path / "sft"), loss="sft", **common)
    assert mine.config.loss == "my_ce"
    for a, b in zip(mine.history, sft.history):
        if "train_loss" in a:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert_same_weights(mine.output, sft.output, atol=1e-6)


def test_a_registered_loss_object_records_its_options(tiny_model, arith_data, tmp_path):
    run = mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "r"),
                        loss=DFT(floor=0.2), **FAST)  # fmt: skip
    training = json.loads((run.output / "adapter_config.json").read_text())["training"]
    assert training["loss"] == "dft" and training["dft_floor"] == 0.2


def test_a_loss_class_of_ones_own_trains_reports_and_resumes(tiny_model, arith_data, tmp_path):
    """An unregistered Loss: its parts are reported; its run resumes to the same weights when the
    loss is given again, and names the way when it is not."""
    common = dict(model=str(tiny_model), data=str(arith_data), save_every=1, **FAST)
    straight = mlx_dft.train(output=str(tmp_path / "a"), loss=Focal(gamma=1.0), **common)
    assert 0 < straight.latest("train_focal_weight") < 1 and straight.latest("val_focal_weight") > 0
    ck = straight.output / "checkpoints" / "step-0000001"
    with pytest.raises(mlx_dft.UserError, match=r"unknown --loss 'focal'.*mlx_dft.train\(loss=\.\.\.\)"):
        mlx_dft.train(resume=str(ck), output=str(tmp_path / "b"), progress=False)
    resumed = mlx_dft.train(resume=str(ck), output=str(tmp_path / "c"), progress=False, loss=Focal(gamma=1.0))
    assert resumed.step == 3
    assert_same_weights(straight.output, resumed.output)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda logits, targets: logits.sum(), r"the custom loss returned \(\) for \d+ tokens"),
        (lambda logits, targets: logits[:, 0] * float("nan"), "the custom loss became nan at step 1"),
    ],
    ids=["shape", "nan"],
)
def test_a_broken_user_loss_is_one_line_naming_it(tiny_model, arith_data, tmp_path, loss, message):
    earlier = mlx_dft.train(
        model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "earlier"), **FAST
    )
    before = {p.name: p.read_bytes() for p in earlier.output.iterdir() if p.is_file()}
    with pytest.raises(mlx_dft.UserError, match=message):
        mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "earlier"),
                      overwrite=True, loss=loss, **FAST)  # fmt: skip
    after = {p.name: p.read_bytes() for p in earlier.output.iterdir() if p.is_file()}
    assert after["adapters.safetensors"] == before["adapters.safetensors"]  # the earlier run's adapter


def test_records_are_data_saved_with_the_run(tiny_model, arith_data, tmp_path):
    rows = [json.loads(x) for x in (arith_data / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (arith_data / "valid.jsonl").read_text().splitlines()]
    records = {"train": iter(rows), "valid": valid}
    run = mlx_dft.train(model=str(tiny_model), output=str(tmp_path / "r"), data=records, save_every=1, **FAST)
    saved = run.output / "data"
    assert [json.loads(x) for x in (saved / "train.jsonl").read_text().splitlines()] == rows
    training = json.loads((run.output / "adapter_config.json").read_text())["training"]
    assert training["data"] == str(saved) and run.latest("val_loss") is not None
    same = mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "s"), **FAST)
    assert_same_weights(run.output, same.output)
    ck = run.output / "checkpoints" / "step-0000002"
    resumed = mlx_dft.train(resume=str(ck), output=str(tmp_path / "t"), progress=False)
    assert_same_weights(run.output, resumed.output)
    # ... and in its own folder, whose data/ it reads
    again = mlx_dft.train(resume=str(ck), progress=False)
    assert again.output == run.output and again.step == 3
    assert_same_weights(resumed.output, again.output)
    with pytest.raises(mlx_dft.UserError, match="data record 0 of train is not JSON"):
        mlx_dft.train(model=str(tiny_model), output=str(tmp_path / "u"), data=[{"prompt": object()}], **FAST)
    with pytest.raises(mlx_dft.UserError, match="needs a 'train' split"):
        mlx_dft.train(model=str(tiny_model), output=str(tmp_path / "v"), data={"valid": valid}, **FAST)


class StopAt(mlx_dft.Callback):
    def __init__(self, step):
        self.step, self.seen = step, []

    def on_train_report(self, metrics, run):
        self.seen.append(metrics["step"])
        if metrics["step"] == self.step:
            run.stop(f"enough at {self.step}")
        return {"seen": len(self.seen)}


class Boom(mlx_dft.Callback):
    def on_checkpoint(self, path, run):
        raise RuntimeError("no space left\nsecond line")


def test_a_callback_stops_the_run_with_a_checkpoint_that_resumes(tiny_model, arith_data, tmp_path, capsys):
    common = dict(model=str(tiny_model), data=str(arith_data), **{**FAST, "iters": 4})
    stop = StopAt(2)
    run = mlx_dft.train(output=str(tmp_path / "a"), callbacks=[stop], **common)
    assert run.step == 2 and run.stopped == "enough at 2" and stop.seen == [1, 2]
    assert run.latest("seen") == 2  # what a callback returns is recorded
    assert "stopped at step 2 of 4: enough at 2" in capsys.readouterr().out
    resumed = mlx_dft.train(resume=str(run.output), output=str(run.output), progress=False)
    assert resumed.step == 4
    straight = mlx_dft.train(output=str(tmp_path / "b"), **common)
    assert_same_weights(resumed.output, straight.output)


def test_a_callback_that_raises_is_one_line_naming_it(tiny_model, arith_data, tmp_path):
    with pytest.raises(
        mlx_dft.UserError, match=r"^callback Boom.on_checkpoint raised RuntimeError: no space left$"
    ):
        mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "a"),
                      callbacks=[Boom()], save_every=1, **FAST)  # fmt: skip
    assert (tmp_path / "a" / "checkpoints" / "step-0000001").is_dir()  # what it saved stays


def test_not_a_loss_is_refused(tiny_model, arith_data, tmp_path):
    with pytest.raises(mlx_dft.UserError, match="loss must be a name, a Loss, a Loss class or a function"):
        mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "a"), loss=3, **FAST)

    def dft(logits, targets):  # a function named as a built-in loss would resume as that loss
        return logits[:, 0]

    with pytest.raises(mlx_dft.UserError, match="a loss of your own is named 'dft', as a built-in one"):
        mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "b"), loss=dft,
                      **FAST)  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_the_old_reference_copy_flag_still_works_with_a_note(tiny_model, arith_data, tmp_path):
    from conftest import run_cli

    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--adapter-path", tmp_path / "o",
                "--loss", "asft", "--fine-tune-type", "full", "--num-layers", "1", "--asft-reference-copy",
                "--iters", "1", "--batch-size", "2", "--accuracy-problems", "0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "--asft-reference-copy is deprecated; use --reference-copy" in p.stderr
    training = json.loads((tmp_path / "o" / "adapter_config.json").read_text())["training"]
    assert training["reference_copy"] is True
