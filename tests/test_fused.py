"""The lean SwiGLU (mlx_dft.fused): the values and gradients of mlx-lm's own, with a backward
pass of its own."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import activations

from mlx_dft import adapters, fused, patches
from mlx_dft.config import TrainConfig
from mlx_dft.data import DataConfig, collate, load_split
from mlx_dft.losses import LossConfig
from mlx_dft.models import load_model, split_model
from mlx_dft.trainer import make_loss_fn
from tests.conftest import llama_config, write_model

ARCHS = {
    "llama": llama_config(),
    "qwen2": {**llama_config(), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {**llama_config(head_dim=16), "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
}


def _reference(g: np.ndarray, u: np.ndarray, c: np.ndarray):
    """silu(g) * u and its vector-Jacobian product with ``c``, in float64 numpy."""
    s = 1 / (1 + np.exp(-g))
    return g * s * u, c * u * s * (1 + g * (1 - s)), c * g * s


def test_values_and_vjp_match_numpy_and_mlx_lm():
    mx.random.seed(3)
    g, u, c = (mx.random.normal((7, 33)) * 4 for _ in range(3))  # wide range: saturated sigmoids too
    want, dg, du = _reference(*(np.array(a, dtype=np.float64) for a in (g, u, c)))

    (out,), (vg, vu) = mx.vjp(lambda a, b: fused.swiglu(a, b), [g, u], [c])
    _, (sg, su) = mx.vjp(lambda a, b: activations.swiglu(a, b), [g, u], [c])
    np.testing.assert_allclose(np.array(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(vg), dg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(vu), du, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(out), np.array(activations.swiglu(g, u)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(vg), np.array(sg), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(vu), np.array(su), rtol=1e-6, atol=1e-6)


def test_inside_compiled_gradients():
    """Compiled (as a training step is), with a shape the first call did not have."""
    step = mx.compile(mx.grad(lambda g, u: (fused.swiglu(g, u) ** 2).sum(), argnums=(0, 1)))
    for shape in [(4, 16), (3, 5, 24)]:
        g, u = mx.random.normal(shape), mx.random.normal(shape)
        want = mx.grad(lambda g, u: ((nn.silu(g) * u) ** 2).sum(), argnums=(0, 1))(g, u)
        for got, ref in zip(step(g, u), want):
            np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_model_loss_and_lora_gradients_unchanged(arch, tmp_path, arith_data, monkeypatch):
    """A LoRA model's DFT loss and every LoRA gradient, with mlx-lm's SwiGLU and with ours."""
    model, tok, _, _ = load_model(str(write_model(tmp_path / arch, ARCHS[arch])))
    method = adapters.method("lora")
    method.apply(model, method.settings(TrainConfig(adapter="lora", num_layers=-1, lora_rank=4), model))
    # B away from zero, so the gradients reach every LoRA matrix through the MLPs
    for layer in model.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            proj.lora_b = mx.random.normal(proj.lora_b.shape) * 0.05
    ds = load_split(arith_data / "train.jsonl", "train", tok, DataConfig())
    batch = collate(ds.tokens[:3], ds.supervised[:3])
    body, head, fast = split_model(model)
    loss_fn = make_loss_fn(body, head, fast, LossConfig("dft"), 0)

    def loss_and_grads():
        value_and_grad = nn.value_and_grad(model, lambda *a: loss_fn(model, *a)[0])
        loss, grads = value_and_grad(*batch.arrays())
        return float(loss), dict(tree_flatten(grads))

    module = importlib.import_module(f"mlx_lm.models.{'llama' if arch == 'mistral' else arch}")
    monkeypatch.setattr(fused, "swiglu", activations.swiglu)  # the loss with mlx-lm's own
    want_loss, want = loss_and_grads()
    calls = []

    def counted(g, u):
        calls.append(g.shape)
        return fused._swiglu(g, u)

    monkeypatch.setattr(fused, "swiglu", counted)
    with patches.lean_swiglu(model) as lean:
        assert lean and module.swiglu is counted
    assert module.swiglu is activations.swiglu  # put back
    got_loss, got = loss_and_grads()
    assert len(calls) == len(model.model.layers) and module.swiglu is activations.swiglu
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys() and any("mlp" in k for k in got)
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_only_mlx_lms_own_swiglu_is_replaced(tmp_path):
    """gemma3 (a GeGLU) keeps its MLP; gpt_oss's own clamped function (also named swiglu) is never
    replaced, though the mlx-lm SwiGLU its expert layers reach is."""
    from tests.arch_models import write_arch_model

    gemma, *_ = load_model(str(write_arch_model(tmp_path / "g", "gemma3_text")))
    with patches.lean_swiglu(gemma) as lean:
        assert lean is False
    oss, *_ = load_model(str(write_arch_model(tmp_path / "o", "gpt_oss")))
    module = importlib.import_module("mlx_lm.models.gpt_oss")
    own = module.__dict__.get("swiglu")
    with patches.lean_swiglu(oss):
        assert module.__dict__.get("swiglu") is own
        assert activations.swiglu is fused.swiglu
    assert activations.swiglu is not fused.swiglu
