"""Aligner: against a plain per-head numpy reference written from the paper's equations, the
N = 1 property, finite-difference gradients, generation with the KV cache, saving and loading."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes

import mlx_dft
from conftest import llama_config, write_model
from mlx_dft import adapters, api
from mlx_dft.adapters import aligner
from mlx_dft.config import TrainConfig
from mlx_dft.errors import UserError

ARCHS = {
    "llama-mha": llama_config(num_key_value_heads=4),
    "llama3-gqa": llama_config(
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": {**llama_config(num_key_value_heads=2), "model_type": "mistral"},
    "qwen2": {**llama_config(num_key_value_heads=2), "model_type": "qwen2"},
    "qwen3": {**llama_config(num_key_value_heads=2, head_dim=16), "model_type": "qwen3"},
}


def build(cfg: dict, seed: int = 0) -> nn.Module:
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    # random weights everywhere, biases and norms included (norm weights around 1)
    params = [
        (k, (1 + 0.3 * mx.random.normal(v.shape)) if "norm" in k else 0.2 * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    model.eval()
    return model


def with_aligner(model, tokens=3, start=1, gate="head", seed=1):
    cfg = TrainConfig(adapter="aligner", aligner_tokens=tokens, aligner_start_layer=start, aligner_gate=gate)
    adapters.apply_adapter(model, "aligner", aligner.settings(cfg, model))
    mx.random.seed(seed)
    for layer in model.layers[start:]:  # non-zero gates of both signs, as real checkpoints have
        g = layer.self_attn[aligner.GATE_LEAF]
        layer.self_attn[aligner.GATE_LEAF] = mx.random.uniform(-1, 1, g.shape)
    return model


def np_rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def reference_layer_output(attn, x, prefix):
    """Attention output of one adapted layer, written from aligner.md with per-head loops:
    y_h += g_h softmax(q_h k_h^T / sqrt(d)) v_h, k = P W_k (+b), v = P W_v (+b), Qwen3's k_norm on k,
    no RoPE on the prefix; each query head reads the prefix keys of its KV group."""
    b, length, _ = x.shape
    h, n_kv = attn.n_heads, attn.n_kv_heads
    gates = attn[aligner.GATE_LEAF]
    attn[aligner.GATE_LEAF] = mx.zeros_like(gates)
    base = np.array(attn(x, mask="causal"))  # mlx-lm's own attention, without the prefix term
    attn[aligner.GATE_LEAF] = gates
    # The layer's rotated queries, through mlx-lm's own modules.
    q = attn.q_proj(x).reshape(b, length, h, -1)
    if "q_norm" in attn:
        q = attn.q_norm(q)
    q = np.array(attn.rope(q.transpose(0, 2, 1, 3)), dtype=np.float64)  # [B, H, L, d]
    d = q.shape[-1]
    p = np.array(prefix, dtype=np.float64)
    wk, wv = np.array(attn.k_proj.weight, np.float64), np.array(attn.v_proj.weight, np.float64)
    k = p @ wk.T + (np.array(attn.k_proj.bias) if "bias" in attn.k_proj else 0)
    v = p @ wv.T + (np.array(attn.v_proj.bias) if "bias" in attn.v_proj else 0)
    k, v = k.reshape(len(p), n_kv, d), v.reshape(len(p), n_kv, d)
    if "k_norm" in attn:
        k = np_rms_norm(k, np.array(attn.k_norm.weight, np.float64), attn.k_norm.eps)
    gates = np.array(gates, np.float64)
    extra = np.zeros((b, length, h, d))
    for head in range(h):
        g = head // (h // n_kv)
        s = q[:, head] @ k[:, g].T / np.sqrt(d)  # [B, L, N]
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        extra[:, :, head] = (gates[head] if len(gates) > 1 else gates[0]) * (s @ v[:, g])
    wo = np.array(attn.o_proj.weight, np.float64)
    return base + extra.reshape(b, length, h * d) @ wo.T


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("gate", ["head", "layer"])
def test_fast_path_matches_the_reference(arch, tokens, gate):
    model = with_aligner(build(ARCHS[arch]), tokens=tokens, gate=gate)
    x = mx.random.normal((2, 7, 64))
    attn = model.layers[1].self_attn
    fast = np.array(attn(x, mask="causal"))
    ref = reference_layer_output(attn, x, model.aligner.prefix)
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fresh_aligner_leaves_logits_bit_identical(arch):
    model = build(ARCHS[arch])
    ids = mx.array([[1, 5, 9, 33, 2, 7]])
    before = model(ids)
    cfg = TrainConfig(adapter="aligner", aligner_tokens=2, aligner_start_layer=0)
    adapters.apply_adapter(model, "aligner", aligner.settings(cfg, model))
    assert bool(mx.array_equal(before, model(ids)))


def test_one_token_adds_a_constant_vector():
    """N = 1: the prefix softmax is 1, so the layer adds o_proj(g * W_v p) at every position,
    whatever the input (and the prefix key has no effect)."""
    model = with_aligner(build(ARCHS["qwen2"]), tokens=1, start=0)
    attn = model.layers[1].self_attn
    shift = np.array(aligner.constant_shift(model, 1))
    assert np.abs(shift).max() > 1e-3
    for seed in (0, 1):
        x = mx.random.normal((1, 5, 64), key=mx.random.key(seed))
        gates = attn[aligner.GATE_LEAF]
        attn[aligner.GATE_LEAF] = mx.zeros_like(gates)
        base = np.array(attn(x, mask="causal"))
        attn[aligner.GATE_LEAF] = gates
        diff = np.array(attn(x, mask="causal")) - base
        np.testing.assert_allclose(diff, np.broadcast_to(shift, diff.shape), atol=1e-5)


def test_gradients_match_finite_differences():
    """Central differences of a float32 loss (MLX's CPU float64 ops run at float32 precision, so
    eps = 1e-2 balances truncation and rounding: agreement to about 1e-3)."""
    model = with_aligner(build(ARCHS["llama3-gqa"]), tokens=3, start=1)
    ids = mx.array([[1, 7, 3, 9, 12, 4]])
    w = mx.random.normal((1, 6, 512), key=mx.random.key(3)) * 0.1

    def loss(m):
        return (m(ids) * w).sum()

    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert set(grads) == {"aligner.prefix", "model.layers.1.self_attn.aligner_gate"}
    params = dict(tree_flatten(model.trainable_parameters()))
    rng = np.random.default_rng(0)
    eps = 1e-2
    for name in grads:
        flat = np.array(params[name]).reshape(-1)
        for i in rng.choice(flat.size, size=4, replace=False):
            values = []
            for sign in (1, -1):
                bumped = flat.copy()
                bumped[i] += sign * eps
                model.update(tree_unflatten([(name, mx.array(bumped.reshape(params[name].shape)))]))
                values.append(loss(model).item())
            model.update(tree_unflatten([(name, params[name])]))
            fd = (values[0] - values[1]) / (2 * eps)
            np.testing.assert_allclose(np.array(grads[name]).reshape(-1)[i], fd, rtol=1e-2, atol=2e-3)


def test_parameter_count_llama2_7b_shape():
    """N*C + (L - S)*H = 5,056 for a LLaMA-2-7B-shaped model with one token (built lazily:
    its 7B weights are never materialised)."""
    cfg = llama_config(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    )
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    for gate, expected in (("head", 5056), ("layer", 4096 + 30)):
        m = model if gate == "head" else model_cls(args_cls.from_dict(cfg))
        c = TrainConfig(adapter="aligner", aligner_gate=gate)
        adapters.apply_adapter(m, "aligner", aligner.settings(c, m))
        assert adapters.count_parameters(m)[0] == expected
        assert aligner.parameter_count(1, 4096, 30, 32, gate) == expected


def test_cached_generation_equals_recomputation():
    """Greedy decoding with mlx-lm's KV cache equals re-running the whole sequence each step,
    and the cache holds the sequence's keys only (the prefix never enters it)."""
    from mlx_lm.models.cache import make_prompt_cache

    model = with_aligner(build(ARCHS["qwen3"]), tokens=3, start=0)
    prompt = [1, 5, 9, 33]
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    assert cache[0].offset == len(prompt) and cache[0].keys[..., : cache[0].offset, :].shape[2] == len(prompt)
    seq_cached, seq_full = list(prompt), list(prompt)
    for _ in range(8):
        nxt = int(mx.argmax(logits[0, -1]))
        seq_cached.append(nxt)
        logits = model(mx.array([[nxt]]), cache=cache)
        full = model(mx.array([seq_full]))
        seq_full.append(int(mx.argmax(full[0, -1])))
    assert seq_cached == seq_full
    assert cache[0].offset == len(seq_cached)  # every fed token, and nothing else


def test_train_save_reload_and_freeze(tiny_model, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(tmp_path / "al"),
        adapter="aligner",
        aligner_tokens=2,
        aligner_start_layer=1,
        loss="dft",
        iters=4,
        batch_size=4,
        steps_per_report=2,
        progress=False,
    )
    out = run.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "aligner" and cfg["trainable_parameters"] == 2 * 64 + 1 * 4
    assert cfg["training"]["learning_rate"] == 9e-3 and cfg["training"]["weight_decay"] == 0.02
    assert (out / "aligner.safetensors").is_file() and not (out / "adapters.safetensors").exists()
    saved = mx.load(str(out / "aligner.safetensors"))
    assert set(saved) == {"aligner.prefix", "model.layers.1.self_attn.aligner_gate"}
    assert float(mx.abs(saved["model.layers.1.self_attn.aligner_gate"]).max()) > 0  # gates moved
    # base weights are bit-identical
    base = build_from(tiny_model)
    trained = dict(tree_flatten(run.model.parameters()))
    for k, v in tree_flatten(base.parameters()):
        assert mx.array_equal(trained[k], v), k
    # reload gives the trained model's logits
    ids = mx.array([[1, 40, 41, 42]])
    loaded, _ = api.load(str(tiny_model), out)
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(run.model(ids)))


def build_from(path):
    from mlx_dft.models import load_model

    return load_model(str(path))[0]


def test_resume_aligner(tiny_model, arith_data, tmp_path):
    common = dict(
        model=str(tiny_model),
        data=str(arith_data),
        adapter="aligner",
        iters=6,
        save_every=3,
        batch_size=4,
        progress=False,
        aligner_start_layer=0,
    )
    mlx_dft.train(output=str(tmp_path / "a"), **common)
    mlx_dft.train(
        resume=str(tmp_path / "a" / "checkpoints" / "step-0000003"),
        output=str(tmp_path / "b"),
        progress=False,
    )
    a, b = (mx.load(str(tmp_path / x / "aligner.safetensors")) for x in "ab")
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6)


def test_aligner_on_a_4bit_model(tiny_model_4bit, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(tiny_model_4bit),
        data=str(arith_data),
        output=str(tmp_path / "q"),
        adapter="aligner",
        iters=3,
        batch_size=4,
        aligner_start_layer=0,
        keep_quantized=True,
        progress=False,
    )
    assert all(np.isfinite(r["train_loss"]) for r in run.history if "train_loss" in r)
    assert any(isinstance(m, nn.QuantizedLinear) for m in run.model.modules())


def test_unsupported_and_mismatched(tmp_path, arith_data):
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_ctx": 128, "n_positions": 128,
            "vocab_size": 512, "layer_norm_epsilon": 1e-5}  # fmt: skip
    other = write_model(tmp_path / "gpt2", gpt2)
    refused = r"\(Aligner\) does not support model type .gpt2.: its attention \(attn\)"
    with pytest.raises(UserError, match=refused):
        mlx_dft.train(
            model=str(other),
            data=str(arith_data),
            adapter="aligner",
            aligner_start_layer=0,
            iters=1,
            batch_size=4,
            output=str(tmp_path / "x"),
            progress=False,
        )
    small = write_model(tmp_path / "small", llama_config())
    with pytest.raises(UserError, match="--aligner-start-layer 2 must be below the model's 2 layers"):
        mlx_dft.train(
            model=str(small),
            data=str(arith_data),
            adapter="aligner",
            iters=1,
            batch_size=4,
            output=str(tmp_path / "y"),
            progress=False,
        )
    with pytest.raises(UserError, match="--aligner-tokens must be at least 1"):
        mlx_dft.train(
            model=str(small), data=str(arith_data), adapter="aligner", aligner_tokens=0, progress=False
        )
    run = mlx_dft.train(
        model=str(small),
        data=str(arith_data),
        adapter="aligner",
        aligner_start_layer=0,
        iters=1,
        batch_size=4,
        output=str(tmp_path / "z"),
        progress=False,
    )
    wide = write_model(
        tmp_path / "wide", llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    )
    with pytest.raises(UserError, match="hidden_size=64; this model has 96"):
        api.load(str(wide), run.output)


def test_cli_trains_and_generates_with_an_aligner(tiny_model, arith_data, tmp_path):
    from conftest import run_cli

    out = tmp_path / "al"
    p = run_cli(
        "train",
        "--model",
        tiny_model,
        "--data",
        arith_data,
        "--fine-tune-type",
        "aligner",
        "--aligner-tokens",
        2,
        "--aligner-start-layer",
        0,
        "--iters",
        3,
        "--batch-size",
        4,
        "--output",
        out,
    )
    assert p.returncode == 0, p.stderr
    assert "aligner trains 136 = 2 tokens x 64 + 2 layers x 4 gates" in p.stdout
    g = run_cli("generate", "--adapter-path", out, "--prompt", "Question: Mia has", "--max-tokens", 4)
    assert g.returncode == 0, g.stderr
    bad = run_cli(
        "train",
        "--model",
        tiny_model,
        "--data",
        arith_data,
        "--fine-tune-type",
        "aligner",
        "--aligner-start-layer",
        5,
        "--iters",
        1,
        "--output",
        tmp_path / "bad",
    )
    assert (
        bad.returncode == 1
        and bad.stderr.count("\n") == 1
        and "must be below the model's 2 layers" in bad.stderr
    )
