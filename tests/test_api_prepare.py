"""The run in two calls: ``mlx_dft.prepare`` hands back its parts, ``mlx_dft.fit`` trains them; a
swapped loss or optimizer takes effect; a model already in memory trains as its folder does; and
the one-line errors of each."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dft
from mlx_dft.losses import DFT, EAFT

FAST = dict(
    batch_size=4, steps_per_report=1, progress=False, iters=3, learning_rate=1e-2, accuracy_problems=0
)


def weights(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def losses(run):
    return [rec["train_loss"] for rec in run.history if "train_loss" in rec]


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


@pytest.fixture
def common(tiny_model, arith_data):
    return dict(model=str(tiny_model), data=str(arith_data), **FAST)


def test_prepare_then_fit_is_train(common, tmp_path):
    straight = mlx_dft.train(output=str(tmp_path / "a"), **common)
    run = mlx_dft.prepare(output=str(tmp_path / "b"), **common)
    assert isinstance(run, mlx_dft.Prepared) and run.steps == 3 and run.start_step == 0
    assert run.config.loss == "dft" and run.loss.name == "dft" and run.val_set is not None
    assert not (tmp_path / "b" / "adapter_config.json").exists()  # nothing written before fit
    fitted = mlx_dft.fit(run)
    assert fitted.step == 3 and fitted.output == tmp_path / "b"
    assert losses(fitted) == losses(straight)
    assert_same_weights(straight.output, fitted.output)
    with pytest.raises(mlx_dft.UserError, match="fitted already") as e:
        mlx_dft.fit(run)
    assert one_line(e)


def test_a_swapped_optimizer_is_used_as_is(common, tmp_path, capsys):
    run = mlx_dft.prepare(output=str(tmp_path / "a"), **common)
    initial = {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())}
    run.optimizer = "adam"
    with pytest.raises(mlx_dft.UserError, match="run.optimizer is a str, not an mlx.optimizers.Optimizer"):
        mlx_dft.fit(run)
    run.optimizer = optim.SGD(learning_rate=0.0)  # nothing moves
    done = mlx_dft.fit(run)
    assert "note: this run's optimizer is your own" in capsys.readouterr().out
    assert done.step == 3 and weights(done.output).keys() == initial.keys()
    for k, v in weights(done.output).items():
        np.testing.assert_array_equal(v, initial[k], err_msg=k)


def test_a_swapped_loss_is_checked_built_and_recorded(common, tmp_path, monkeypatch):
    from mlx_dft.losses import compute

    monkeypatch.setattr(compute, "keeps_softmax", lambda head, loss: False)  # SFT on the logits path too

    def twice_ce(logits, targets):
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return 2 * ce

    sft = mlx_dft.train(output=str(tmp_path / "sft"), **{**common, "loss": "sft"})
    run = mlx_dft.prepare(output=str(tmp_path / "mine"), **{**common, "loss": "sft"})
    for bad, message in (
        (3, "loss must be a name, a Loss, a Loss class or a function, not int"),
        (EAFT(top_k=100_000), r"--eaft-top-k 100000 is above the vocabulary size \(512\)"),
    ):
        run.loss = bad
        with pytest.raises(mlx_dft.UserError, match=message) as e:
            mlx_dft.fit(run)
        assert one_line(e) and run.config.loss == "sft"  # a refused swap changes nothing
    run.loss = twice_ce
    mine = mlx_dft.fit(run)
    assert mine.config.loss == "twice_ce" and run.loss.name == "twice_ce"
    assert losses(mine)[0] == pytest.approx(2 * losses(sft)[0], rel=1e-5)  # step 1: the same weights
    training = json.loads((mine.output / "adapter_config.json").read_text())["training"]
    assert training["loss"] == "twice_ce"
    # a loss with a reference (the adapter switched off) swapped in by name, with its own options
    run = mlx_dft.prepare(output=str(tmp_path / "asft"), **{**common, "loss": DFT(floor=0.2)})
    run.loss = "asft"
    done = mlx_dft.fit(run)
    training = json.loads((done.output / "adapter_config.json").read_text())["training"]
    assert training["loss"] == "asft" and training["dft_floor"] == 0.0 and done.latest("train_kl") is not None


def test_swapped_data_is_checked(common, tmp_path):
    run = mlx_dft.prepare(output=str(tmp_path / "a"), **common)
    full = run.train_set
    run.train_set = [1, 2, 3]
    with pytest.raises(mlx_dft.UserError, match="run.train_set is a list, not an mlx_dft.data.Dataset"):
        mlx_dft.fit(run)
    from dataclasses import replace

    run.train_set = replace(full, tokens=full.tokens[:2], supervised=full.supervised[:2])
    with pytest.raises(mlx_dft.UserError, match="the train split has 2 examples, fewer than --batch-size 4"):
        mlx_dft.fit(run)
    run.train_set, run.val_set = replace(full, tokens=full.tokens[:8], supervised=full.supervised[:8]), None
    run.steps = 10
    with pytest.raises(mlx_dft.UserError, match="run.steps was changed: it is read only"):
        mlx_dft.fit(run)
    run.steps = 3
    done = mlx_dft.fit(run)
    assert done.step == 3 and done.latest("val_loss") is None
    with pytest.raises(mlx_dft.UserError, match="fit takes the run mlx_dft.prepare returns, not a Run"):
        mlx_dft.fit(done)


def test_a_model_in_memory_trains_as_its_folder(tiny_model, arith_data, tmp_path):
    """mlx_lm.load's (model, tokenizer) gives the adapter that the model's folder gives, bit for
    bit; the folder is an adapter folder stock mlx-lm loads; the model was changed in place, so
    giving it again is refused; its checkpoints resume with the model given again."""
    from mlx_lm import load as mlx_lm_load

    common = dict(data=str(arith_data), save_every=1, **FAST)
    by_path = mlx_dft.train(model=str(tiny_model), output=str(tmp_path / "path"), **common)
    loaded = mlx_lm_load(str(tiny_model))
    mine = mlx_dft.train(model=loaded, output=str(tmp_path / "mem"), **common)
    assert_same_weights(by_path.output, mine.output)
    assert losses(mine) == losses(by_path)
    config = json.loads((mine.output / "adapter_config.json").read_text())
    assert config["base_model"] is None and config["model_signature"]["hidden_size"] == 64
    assert config["fine_tune_type"] == "lora" and (mine.output / "tokenizer.json").is_file()

    net, _ = mlx_lm_load(str(tiny_model), adapter_path=str(mine.output))
    got = {k: np.array(v) for k, v in tree_flatten(net.trainable_parameters()) if "lora" in k}
    assert got.keys() == weights(mine.output).keys()
    for k, v in weights(mine.output).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)

    with pytest.raises(mlx_dft.UserError, match="model= holds adapter layers already") as e:
        mlx_dft.train(model=loaded, output=str(tmp_path / "again"), **common)
    assert one_line(e)
    with pytest.raises(mlx_dft.UserError, match="names no base model") as e:
        mlx_dft.load(adapter=str(mine.output))
    assert one_line(e)
    mlx_dft.load(model=str(tiny_model), adapter=str(mine.output))  # with the model named, it loads

    ck = mine.output / "checkpoints" / "step-0000001"
    with pytest.raises(mlx_dft.UserError, match="was trained on a model given in memory") as e:
        mlx_dft.train(resume=str(ck), output=str(tmp_path / "r0"), progress=False)
    assert one_line(e)
    net, tok = mlx_lm_load(str(tiny_model))
    resumed = mlx_dft.train(
        model=net, tokenizer=tok, resume=str(ck), output=str(tmp_path / "r"), progress=False
    )
    assert resumed.step == 3
    assert_same_weights(mine.output, resumed.output)


def test_a_model_in_memory_names_its_base_model_when_told(tiny_model, arith_data, tmp_path):
    from mlx_lm import load as mlx_lm_load

    net, tok, config = mlx_lm_load(str(tiny_model), return_config=True)
    run = mlx_dft.prepare(model=(net, tok, config), base_model=str(tiny_model), data=str(arith_data),
                          output=str(tmp_path / "a"), **FAST)  # fmt: skip
    assert run.model is net and run.model_config["vocab_size"] == 512
    done = mlx_dft.fit(run)
    assert json.loads((done.output / "adapter_config.json").read_text())["base_model"] == str(tiny_model)
    mlx_dft.load(adapter=str(done.output))  # the folder names its base model


def test_full_fine_tuning_of_a_model_in_memory_trains_its_blocks_in_place(tiny_model, arith_data, tmp_path):
    from mlx_lm import load as mlx_lm_load

    common = dict(data=str(arith_data), adapter="full", num_layers=1, **{**FAST, "iters": 2})
    by_path = mlx_dft.train(model=str(tiny_model), output=str(tmp_path / "path"), **common)
    net, tok = mlx_lm_load(str(tiny_model))
    before = np.array(net.layers[-1].mlp.down_proj.weight)
    # a transformers tokenizer is taken too (wrapped as mlx-lm's)
    mine = mlx_dft.train(model=net, tokenizer=tok._tokenizer, output=str(tmp_path / "mem"), **common)
    assert_same_weights(by_path.output, mine.output)
    after = np.array(net.layers[-1].mlp.down_proj.weight)
    np.testing.assert_array_equal(after, weights(mine.output)["model.layers.1.mlp.down_proj.weight"])
    assert not np.array_equal(after, before)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        (3, {}, r"model= is a int: give a folder, a Hub id or a GGUF file, or an mlx.nn.Module"),
        ("net", {}, r"model= is a Model without its tokenizer: give model=\(model, tokenizer\)"),
        (
            "net1",
            {},
            r"model= is a tuple of \(Model\): give \(model, tokenizer\) or \(model, tokenizer, config\)",
        ),
        ("pair", {"tokenizer": "tok"}, "the tokenizer is given twice"),
        ("path", {"tokenizer": "tok"}, "tokenizer= goes with a model object"),
        ("bad_tok", {}, r"the tokenizer is a str, not a tokenizer"),
        ("linear", {}, r"model= is a Linear with no config \(no .args naming its model_type\)"),
    ],
    ids=[
        "int",
        "no-tokenizer",
        "short-tuple",
        "tokenizer-twice",
        "path-and-tokenizer",
        "bad-tokenizer",
        "no-config",
    ],
)
def test_a_bad_model_object_is_one_line(tiny_model, arith_data, tmp_path, model, extra, message):
    from mlx_lm import load as mlx_lm_load

    net, tok = mlx_lm_load(str(tiny_model))
    model = {
        "net": net, "net1": (net,), "pair": (net, tok), "path": str(tiny_model), "bad_tok": (net, "tok"),
        "linear": (nn.Linear(2, 2), tok),
    }.get(model, model)  # fmt: skip
    with pytest.raises(mlx_dft.UserError, match=message) as e:
        mlx_dft.prepare(model=model, data=str(arith_data), output=str(tmp_path / "a"), **extra, **FAST)
    assert one_line(e)
