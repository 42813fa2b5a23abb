"""End-to-end training on a tiny random model: outputs, resume, accumulation, adapters."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dft
from conftest import params_of
from mlx_dft import adapters, api
from mlx_dft.data import DataConfig, collate, load_split
from mlx_dft.errors import UserError
from mlx_dft.losses import LossConfig
from mlx_dft.models import load_model, split_model
from mlx_dft.trainer import Callback, build_optimizer, make_loss_fn, make_step, optimizer_step

FAST = dict(batch_size=4, steps_per_report=2, progress=False)


def weights(folder):
    return mx.load(str(folder / "adapters.safetensors"))


def test_train_writes_adapter_checkpoints_and_metrics(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    run = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(out),
        iters=6,
        steps_per_eval=3,
        save_every=3,
        test=True,
        **FAST,
    )
    assert run.step == 6 and run.output == out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["rank"] == 8
    assert cfg["training"]["loss"] == "dft" and cfg["trainable_parameters"] > 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000003", "step-0000006"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "train_loss" in r]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in val] == [0, 3, 6]
    for key in ("train_loss", "train_ce", "train_prob", "tokens_per_sec", "peak_memory_gb", "learning_rate"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert all({"val_loss", "val_ce", "val_prob"} <= set(r) for r in val)
    assert any("test_loss" in r for r in recs)
    final = weights(out)
    last = weights(out / "checkpoints" / "step-0000006")
    assert all(mx.array_equal(final[k], last[k]) for k in final)


def test_resume_reproduces_the_straight_run(tiny_model, arith_data, tmp_path):
    common = dict(
        model=str(tiny_model),
        data=str(arith_data),
        iters=20,
        save_every=10,
        lora_dropout=0.1,
        grad_accumulation_steps=2,
        steps_per_eval=10,
        **FAST,
    )
    mlx_dft.train(output=str(tmp_path / "straight"), **common)
    ck = tmp_path / "straight" / "checkpoints" / "step-0000010"
    resumed = mlx_dft.train(resume=str(ck), output=str(tmp_path / "resumed"), progress=False)
    assert resumed.step == 20
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, rtol=0)
    # metrics of a run resumed in place are not duplicated
    shutil.copytree(tmp_path / "straight", tmp_path / "inplace")
    shutil.rmtree(tmp_path / "inplace" / "checkpoints" / "step-0000020")
    mlx_dft.train(resume=str(tmp_path / "inplace"), progress=False)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "inplace" / "metrics.jsonl").read_text().splitlines()
        if "train_loss" in x
    ]
    assert steps == sorted(set(steps))


def test_resume_refuses_another_model_or_adapter(tiny_model, arith_data, tmp_path):
    from conftest import llama_config, write_model

    mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "a"), iters=2, **FAST)
    other = write_model(tmp_path / "other", llama_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(UserError, match="different model"):
        mlx_dft.train(
            resume=str(tmp_path / "a"), model=str(other), iters=4, output=str(tmp_path / "b"), progress=False
        )
    with pytest.raises(UserError, match="holds a lora adapter"):
        mlx_dft.train(
            resume=str(tmp_path / "a"), adapter="full", iters=4, output=str(tmp_path / "c"), progress=False
        )
    with pytest.raises(UserError, match="rank"):
        mlx_dft.train(
            resume=str(tmp_path / "a"), lora_rank=4, iters=4, output=str(tmp_path / "d"), progress=False
        )


def _setup_step(tiny_model, lr=1e-2):
    mx.random.seed(0)
    model, tok, cfg, _ = load_model(str(tiny_model))
    adapters.apply_adapter(
        model,
        "lora",
        {
            "fine_tune_type": "lora",
            "num_layers": 2,
            "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": None},
        },
    )
    body, head, fast = split_model(model)
    loss_fn = make_loss_fn(body, head, fast, LossConfig("dft"), 0)
    opt = build_optimizer("sgd", lr, "constant", 0, 10, weight_decay=0.0)
    return model, tok, loss_fn, opt


def test_accumulation_equals_one_big_batch(tiny_model, arith_data):
    """One step over micro-batches of 2+2 (unequal token counts, different padding) gives the
    same update as one step over the batch of 4."""
    results = []
    ds = load_split(arith_data / "train.jsonl", "train", _tok(tiny_model), DataConfig())
    idx = [0, 1, 2, 3]
    assert len({int(ds.supervised[i].sum()) for i in idx}) > 1
    for groups in ([idx], [idx[:2], idx[2:]], [[0], [1], [2], [3]]):
        model, _, loss_fn, opt = _setup_step(tiny_model)
        step, state = make_step(model, opt, loss_fn, max_grad_norm=0.0)
        batches = [collate([ds.tokens[i] for i in g], [ds.supervised[i] for i in g]) for g in groups]
        optimizer_step(step, state, batches)
        results.append(dict(tree_flatten(model.trainable_parameters())))
    for other in results[1:]:
        for k in results[0]:
            np.testing.assert_allclose(np.array(other[k]), np.array(results[0][k]), atol=1e-6)
    moved = [k for k in results[0] if k.endswith("lora_b") and float(mx.abs(results[0][k]).max()) > 0]
    assert moved


def _tok(path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path)


def test_chunked_loss_trains_like_the_unchunked_one(tiny_model, arith_data, tmp_path):
    a = mlx_dft.train(
        model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "a"), iters=3, **FAST
    )
    b = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(tmp_path / "b"),
        iters=3,
        loss_chunk_tokens=16,
        **FAST,
    )
    wa, wb = weights(a.output), weights(b.output)
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-5)


@pytest.mark.parametrize("adapter", ["dora", "full"])
def test_other_adapters_train(tiny_model, arith_data, tmp_path, adapter):
    run = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(tmp_path / adapter),
        adapter=adapter,
        iters=4,
        num_layers=1,
        **FAST,
    )
    cfg = json.loads((run.output / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == adapter
    w = weights(run.output)
    if adapter == "full":
        assert all(k.startswith("model.layers.1.") for k in w) and len(w) > 5
    else:
        assert any(k.endswith(".m") for k in w)


def test_base_weights_stay_frozen_under_lora(tiny_model, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "r"), iters=3, **FAST
    )
    base, *_ = load_model(str(tiny_model))
    trained = params_of(run.model)
    for k, v in params_of(base).items():
        key = k if k in trained else k.replace(".weight", ".linear.weight")
        assert mx.array_equal(trained[key], v), k


def test_callbacks_add_metrics(tiny_model, arith_data, tmp_path):
    class Custom(Callback):
        def on_val_report(self, metrics, run):
            return {"my_metric": run.step * 10}

    run = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(tmp_path / "r"),
        iters=2,
        steps_per_eval=2,
        callbacks=[Custom()],
        **FAST,
    )
    recs = [json.loads(x) for x in (run.output / "metrics.jsonl").read_text().splitlines()]
    assert [r["my_metric"] for r in recs if "my_metric" in r] == [0, 20]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model, arith_data, tmp_path):
    class Poison(Callback):
        def on_checkpoint(self, path, run):
            if run.step == 2:
                run.model.update(_nan_tree(run.model))

    with pytest.raises(api.UserError, match="loss became nan at step 3"):
        mlx_dft.train(
            model=str(tiny_model),
            data=str(arith_data),
            output=str(tmp_path / "r"),
            iters=6,
            save_every=2,
            callbacks=[Poison()],
            **FAST,
        )
    w = weights(tmp_path / "r")
    assert all(bool(mx.isfinite(v).all()) for v in w.values())
    ck = weights(tmp_path / "r" / "checkpoints" / "step-0000002")
    assert all(mx.array_equal(w[k], ck[k]) for k in w)


def _nan_tree(model):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, v * float("nan")) for k, v in tree_flatten(model.trainable_parameters())])


def test_yaml_config_with_cli_override(tiny_model, arith_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model}\ndata: {arith_data}\nloss: sft\nlearning-rate: 3e-4\niters: 2\n"
        "lora_parameters: {{rank: 4, scale: 8.0}}\n".replace("{{", "{").replace("}}", "}")
    )
    run = mlx_dft.train(config=str(cfg), iters=3, output=str(tmp_path / "r"), **FAST)
    saved = json.loads((run.output / "adapter_config.json").read_text())
    assert run.step == 3 and saved["training"]["loss"] == "sft"
    assert saved["training"]["learning_rate"] == 3e-4 and saved["lora_parameters"]["rank"] == 4
    (tmp_path / "bad.yaml").write_text("lerning_rate: 1e-4\n")
    with pytest.raises(UserError, match="unknown option 'lerning_rate'"):
        mlx_dft.train(config=str(tmp_path / "bad.yaml"), progress=False)


def test_output_folder_is_not_overwritten(tiny_model, arith_data, tmp_path):
    mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "r"), iters=2, **FAST)
    before = (tmp_path / "r" / "adapters.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        mlx_dft.train(
            model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "r"), iters=2, **FAST
        )
    assert (tmp_path / "r" / "adapters.safetensors").read_bytes() == before
