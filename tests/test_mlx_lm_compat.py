"""Our LoRA/DoRA/full folders are mlx-lm folders: stock load, generate and fuse accept them."""

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load

import mlx_dft
from mlx_dft import api

FAST = dict(batch_size=4, steps_per_report=2, progress=False, learning_rate=1e-2)
IDS = mx.array([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(scope="module", params=["lora", "dora", "full"])
def trained(request, tiny_model, arith_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / request.param
    mlx_dft.train(
        model=str(tiny_model), data=str(arith_data), output=str(out), adapter=request.param, iters=4, **FAST
    )
    return out


def test_stock_mlx_lm_loads_our_adapter(tiny_model, trained):
    ours, _ = api.load(str(tiny_model), trained)
    stock, _ = mlx_lm_load(str(tiny_model), adapter_path=str(trained))
    base, _ = mlx_lm_load(str(tiny_model))
    a, b, c = ours(IDS), stock(IDS), base(IDS)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    assert float(mx.abs(a - c).max()) > 1e-4  # the adapter changes the model


@pytest.mark.slow
def test_stock_mlx_lm_fuses_and_generates(tiny_model, trained, tmp_path):
    fused = tmp_path / "fused"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(tiny_model),
            "--adapter-path",
            str(trained),
            "--save-path",
            str(fused),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    ours, _ = api.load(str(tiny_model), trained)
    f, _ = mlx_lm_load(str(fused))
    np.testing.assert_allclose(np.array(ours(IDS)), np.array(f(IDS)), atol=1e-4)
    g = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(tiny_model),
            "--adapter-path",
            str(trained),
            "--prompt",
            "Question:",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert g.returncode == 0, g.stderr


def test_generate_matches_stock_mlx_lm(tiny_model, trained):
    from mlx_lm import generate

    model, tok = mlx_lm_load(str(tiny_model), adapter_path=str(trained))
    expected = generate(model, tok, "Question: Leo has", max_tokens=8, verbose=False)
    assert api.generate("Question: Leo has", model=str(tiny_model), adapter=trained, max_tokens=8) == expected


def test_qlora_on_a_4bit_model(tiny_model_4bit, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(tiny_model_4bit),
        data=str(arith_data),
        output=str(tmp_path / "q"),
        iters=4,
        keep_quantized=True,
        **FAST,
    )
    losses = [r["train_loss"] for r in run.history if "train_loss" in r]
    assert all(np.isfinite(losses))
    ours, _ = api.load(str(tiny_model_4bit), run.output, keep_quantized=True)
    stock, _ = mlx_lm_load(str(tiny_model_4bit), adapter_path=str(run.output))
    np.testing.assert_allclose(np.array(ours(IDS)), np.array(stock(IDS)), atol=1e-5)
    assert any(isinstance(m, nn.QuantizedLinear) for m in ours.modules())
