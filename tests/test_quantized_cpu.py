"""A quantized base on the CPU computes in float32 (MLX's CPU has no fast quantized matmul),
with the values the quantized products use; ``keep_quantized`` keeps it as stored."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

import mlx_dft
from mlx_dft import api, models
from tests.conftest import run_cli

IDS = mx.array([[1, 40, 41, 42, 43, 44, 45, 46]])
FAST = dict(batch_size=4, steps_per_report=2, progress=False, learning_rate=1e-2, iters=4)


def _kinds(model: nn.Module) -> set[type]:
    return {type(m) for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}


def test_a_quantized_base_is_float32_on_the_cpu_with_the_same_logits(tiny_model_4bit, capsys):
    net, *_ = models.load_model(str(tiny_model_4bit))
    err = capsys.readouterr().err
    assert "is quantized; computing in float32 on the CPU" in err and "--keep-quantized" in err
    assert _kinds(net) == {nn.Linear}
    assert not models.is_quantized(net)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(net.parameters()))
    kept, *_ = models.load_model(str(tiny_model_4bit), keep_quantized=True)
    assert capsys.readouterr().err == ""
    assert nn.QuantizedLinear in _kinds(kept)
    stock, _ = mlx_lm_load(str(tiny_model_4bit))  # mlx-lm's own quantized model, as stored
    want = np.array(stock(IDS))
    np.testing.assert_allclose(np.array(kept(IDS)), want, atol=1e-6)
    np.testing.assert_allclose(np.array(net(IDS)), want, atol=1e-4)
    assert float(np.abs(want).max()) > 1


def test_a_float_base_loads_as_before(tiny_model, capsys):
    net, *_ = models.load_model(str(tiny_model))
    assert "quantized" not in capsys.readouterr().err
    assert _kinds(net) == {nn.Linear}


def test_a_float32_copy_that_does_not_fit_stays_quantized(tiny_model_4bit, monkeypatch, capsys):
    need = 4 * mlx_dft.adapters.count_parameters(mlx_lm_load(str(tiny_model_4bit))[0])[1]
    monkeypatch.setattr(models, "physical_memory", lambda: need)  # a copy may take half of it
    net, *_ = models.load_model(str(tiny_model_4bit))
    err = capsys.readouterr().err
    assert "would not fit" in err and "stays quantized" in err
    assert nn.QuantizedLinear in _kinds(net)
    monkeypatch.setattr(models, "physical_memory", lambda: 2 * need)
    assert not models.is_quantized(models.load_model(str(tiny_model_4bit))[0])


def test_an_adapter_trained_in_float32_is_the_qlora_adapter_of_the_quantized_base(
    tiny_model_4bit, arith_data, tmp_path
):
    """Trained on the float32 copy (the CPU default), the adapter applies to the stored 4-bit base
    as mlx-lm loads it, and gives the same logits there."""
    run = mlx_dft.train(model=str(tiny_model_4bit), data=str(arith_data), output=str(tmp_path / "r"), **FAST)
    assert not models.is_quantized(run.model)
    ours, _ = api.load(str(tiny_model_4bit), run.output)
    stock, _ = mlx_lm_load(str(tiny_model_4bit), adapter_path=str(run.output))
    assert models.is_quantized(stock)
    base, _ = mlx_lm_load(str(tiny_model_4bit))
    np.testing.assert_allclose(np.array(ours(IDS)), np.array(stock(IDS)), atol=1e-4)
    assert float(mx.abs(stock(IDS) - base(IDS)).max()) > 1e-3  # the adapter does something


@pytest.mark.parametrize("command", ["generate", "eval", "sample", "chat", "train"])
def test_every_command_that_computes_has_keep_quantized(command):
    p = run_cli(command, "--help")
    assert p.returncode == 0 and "--keep-quantized" in p.stdout


def test_generate_keep_quantized_on_the_cli(tiny_model_4bit):
    args = ("generate", "--model", tiny_model_4bit, "--prompt", "12 + 30 =", "--max-tokens", "4")
    kept = run_cli(*args, "--keep-quantized")
    default = run_cli(*args)
    assert kept.returncode == 0 and default.returncode == 0, (kept.stderr, default.stderr)
    assert "computing in float32" in default.stderr and "computing in float32" not in kept.stderr
    assert kept.stdout == default.stdout  # greedy: the same tokens either way
