# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""The chunked gated delta rule (mlx_dft.gated_delta) against mlx-lm's step-by-step recurrence
(``gated_delta_ops``): values and gradients of every input, in float32 against a float64 run of
the recurrence (the float32 recurrence's own error is the yardstick), lengths that are and are not
multiples of the chunk, grouped heads, strong decays, an initial state; the gate variants mlx-lm's
models use through the patched ``gated_delta_update``; packed rows; a whole qwen3_5 model's loss
and LoRA gradients against stock mlx-lm."""

from __future__ import annotations

import mlx_dft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import gated_delta as gd

from mlx_dft import adapters, models
from mlx_dft.config import TrainConfig
from mlx_dft.gated_delta import LOG_ZERO, chunk_gated_delta
from mlx_dft.losses import LossConfig
from mlx_dft.patches import _gated_delta_update, _log_gates, chunked_gated_delta
from mlx_dft.trainer import model_loss_fn
from tests.arch_models import write_arch_model


def _inputs(seed, B, T, Hk, Hv, Dk, Dv, strong=False):
    """Normalised queries and keys as the models make them, gates from Qwen3.5's initialisation
    (A in [0, 16]), betas in (0, 1), a random initial state."""
    mx.random.seed(seed)
    q, k = mx.random.normal((B, T, Hk, Dk)), mx.random.normal((B, T, Hk, Dk))
    q, k = gd.normalize_qk(q, k, inv_scale=Dk**-0.5, eps=1e-6)
    v = mx.random.normal((B, T, Hv, Dv))
    A = mx.random.uniform(0, 16, (Hv,))
    a = mx.random.normal((B, T, Hv)) * (3.0 if strong else 1.0)
    log_g = -A * mx.logaddexp(a + 1.0, 0.0)
    beta = mx.sigmoid(mx.random.normal((B, T, Hv)))
    state = mx.random.normal((B, Hv, Dv, Dk)) * 0.1
    return q, k, v, log_g, beta, state


def _objective(run):
    def f(q, k, v, log_g, beta, state):
        y, s = run(q, k, v, log_g, beta, state)
        return (y * y).sum() + 0.1 * (s * s).sum()

    return f


def _recurrence(q, k, v, log_g, beta, state):
    return gd.gated_delta_ops(q, k, v, mx.exp(log_g), beta, state)


def _rel(x, ref) -> float:
    return float(mx.linalg.norm((x.astype(mx.float64) - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1)))


@pytest.mark.parametrize("shape,chunk", [
    ((2, 37, 2, 4, 16, 8, False), 8),     # not a multiple of the chunk; grouped heads
    ((1, 64, 2, 2, 32, 16, False), 16),   # a multiple
    ((2, 50, 1, 2, 16, 16, True), 8),     # strong decays (gates down to e^-200 and below)
    ((1, 5, 1, 1, 8, 8, False), 64),      # shorter than one chunk
    ((1, 130, 2, 4, 32, 32, False), 64),  # the default chunk, three of them
])  # fmt: skip
def test_values_and_gradients_equal_the_recurrence(shape, chunk):
    xs = _inputs(0, *shape)
    x64 = [x.astype(mx.float64) for x in xs]
    with mx.stream(mx.cpu):  # float64 runs on the CPU only
        ref_y, ref_s = _recurrence(*x64)
        ref_g = mx.grad(_objective(_recurrence), argnums=tuple(range(6)))(*x64)
        base_g = mx.grad(_objective(_recurrence), argnums=tuple(range(6)))(*xs)
    chunked = _objective(lambda *a: chunk_gated_delta(*a, chunk=chunk))
    y, s = chunk_gated_delta(*xs, chunk=chunk)
    grads = mx.grad(chunked, argnums=tuple(range(6)))(*xs)
    assert _rel(y, ref_y) < 1e-5 and _rel(s, ref_s) < 1e-5
    names = ("q", "k", "v", "log_g", "beta", "state")
    for name, g, r, base in zip(names, grads, ref_g, base_g):
        # within 1e-5 of the exact value, and no worse than 4x the float32 recurrence's own error
        assert _rel(g, r) < max(1e-5, 4 * _rel(base, r)), (name, _rel(g, r), _rel(base, r))
    assert y.dtype == xs[0].dtype and s.dtype == mx.float32


def _aligned(seed, T, H, D, cos, beta, log_g, per_dimension):
    """Hard inputs for a chunked solver: unit keys and queries sharing a direction (cosine ``cos``
    with it), slow or no decay, large betas (2: OLMo hybrid's negative eigenvalues). A series
    solution of the chunk's triangular system overflows float32 here; the recurrence does not."""
    mx.random.seed(seed)
    common = mx.random.normal((D,))
    common = common / mx.linalg.norm(common)

    def unit(shape):
        x = mx.random.normal(shape)
        x = cos * common + (1 - cos**2) ** 0.5 * x / mx.linalg.norm(x, axis=-1, keepdims=True)
        return x / mx.linalg.norm(x, axis=-1, keepdims=True)

    q, k, v = unit((1, T, H, D)), unit((1, T, H, D)), mx.random.normal((1, T, H, D))
    lg = mx.full((1, T, H, D) if per_dimension else (1, T, H), log_g)
    return q, k, v, lg, mx.full((1, T, H), beta), mx.zeros((1, H, D, D))


@pytest.mark.parametrize("per_dimension", [False, True])
@pytest.mark.parametrize("cos,beta,log_g", [
    (0.5, 0.7, -0.01), (0.84, 0.7, -0.05), (0.5, 1.0, 0.0), (0.9, 2.0, 0.0),
])  # fmt: skip
def test_aligned_keys_and_slow_decays_stay_exact(cos, beta, log_g, per_dimension):
    xs = _aligned(0, 192, 2, 32, cos, beta, log_g, per_dimension)
    x64 = [x.astype(mx.float64) for x in xs]
    with mx.stream(mx.cpu):
        ref_y, ref_s = _recurrence(*x64)
        ref_g = mx.grad(_objective(_recurrence), argnums=(0, 1, 2, 4))(*x64)
        base_g = mx.grad(_objective(_recurrence), argnums=(0, 1, 2, 4))(*xs)
    y, s = chunk_gated_delta(*xs)
    grads = mx.grad(_objective(chunk_gated_delta), argnums=(0, 1, 2, 4))(*xs)
    assert _rel(y, ref_y) < 1e-5 and _rel(s, ref_s) < 1e-5, (_rel(y, ref_y), _rel(s, ref_s))
    for name, g, r, f32 in zip(("q", "k", "v", "beta"), grads, ref_g, base_g):
        assert _rel(g, r) < max(1e-5, 10 * _rel(f32, r)), (name, _rel(g, r), _rel(f32, r))


def test_a_nan_gate_spoils_its_chunk_and_after_not_before():
    """A NaN gate at position 20 (chunk 16-31) makes the outputs NaN from its chunk on (the
    recurrence's from 20 on: the training loss is NaN either way, and the run stops), and leaves the
    earlier chunks as the recurrence computes them."""
    q, k, v, log_g, beta, _ = _inputs(5, 1, 40, 1, 1, 8, 8)
    log_g = mx.where((mx.arange(40) == 20)[None, :, None], mx.nan, log_g)
    y, _ = chunk_gated_delta(q, k, v, log_g, beta, None, chunk=16)
    ref, _ = _recurrence(q, k, v, log_g, beta, None)
    assert mx.allclose(y[:, :16], ref[:, :16], rtol=1e-5, atol=1e-6)
    assert bool(mx.isnan(y[:, 20:]).all()) and bool(mx.isnan(ref[:, 20:]).all())


def test_bfloat16_inputs_stay_within_their_precision():
    xs = _inputs(1, 1, 100, 2, 2, 16, 16)
    half = [x.astype(mx.bfloat16) if i < 3 else x for i, x in enumerate(xs)]
    ref_y, _ = _recurrence(*[x.astype(mx.float32) for x in half])
    y, _ = chunk_gated_delta(*half)
    assert y.dtype == mx.bfloat16
    assert _rel(y.astype(mx.float32), ref_y.astype(mx.float64)) < 1e-2  # bfloat16 keeps 8 bits


@pytest.mark.parametrize("variant", [{}, {"lower_bound": -5.0}, {"allow_neg_eigval": True}])
def test_the_patched_update_is_mlx_lms_with_every_gate_variant(variant):
    """The update the trainer puts in a model's module: the same gates and betas as mlx-lm's
    ``gated_delta_update`` (Qwen3.5's, Bailing's lower-bounded gates, OLMo hybrid's negative
    eigenvalues), the same outputs and gradients."""
    q, k, v, _, _, state = _inputs(2, 2, 40, 2, 4, 16, 16)
    mx.random.seed(5)
    a, b = mx.random.normal((2, 40, 4)) * 2, mx.random.normal((2, 40, 4))
    A_log, dt_bias = mx.log(mx.random.uniform(0.5, 16, (4,))), mx.random.normal((4,))

    def run(update):
        def f(q, k, v, a, b, state):
            y, s = update(q, k, v, a, b, A_log, dt_bias, state, None, use_kernel=False, **variant)
            return (y * y).sum() + (s * s).sum()

        return mx.value_and_grad(f, argnums=tuple(range(6)))(q, k, v, a, b, state)

    (v0, g0), (v1, g1) = run(gd.gated_delta_update), run(_gated_delta_update())
    assert float(v1) == pytest.approx(float(v0), rel=1e-5)
    for x, r in zip(g1, g0):
        assert _rel(x, r.astype(mx.float64)) < 1e-4


@pytest.mark.parametrize("shape,strong", [((2, 37, 2, 4, 16, 8), False), ((1, 100, 2, 2, 32, 16), True)])
def test_per_dimension_gates_equal_the_recurrence(shape, strong):
    """Kimi-style gates, one per key dimension (``A_log`` per head, ``dt_bias`` per dimension),
    through the patched update: values and every gradient as the float64 recurrence's."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, _, _, state = _inputs(3, B, T, Hk, Hv, Dk, Dv)
    mx.random.seed(6)
    a, b = mx.random.normal((B, T, Hv, Dk)) * (3.0 if strong else 1.0), mx.random.normal((B, T, Hv))
    A_log, dt_bias = mx.log(mx.random.uniform(0.5, 8, (Hv, 1))), mx.random.normal((Hv, Dk))

    def objective(update):
        def f(q, k, v, a, b, state):
            y, s = update(q, k, v, a, b, A_log, dt_bias, state, None, use_kernel=False)
            return (y * y).sum() + 0.1 * (s * s).sum()

        return f

    xs = (q, k, v, a, b, state)
    with mx.stream(mx.cpu):
        x64 = [x.astype(mx.float64) for x in xs]
        ref = mx.grad(objective(gd.gated_delta_update), argnums=tuple(range(6)))(*x64)
        base = mx.grad(objective(gd.gated_delta_update), argnums=tuple(range(6)))(*xs)
    ours = mx.grad(objective(_gated_delta_update()), argnums=tuple(range(6)))(*xs)
    for name, g, r, f32 in zip(("q", "k", "v", "a", "b", "state"), ours, ref, base):
        assert _rel(g, r) < max(1e-5, 4 * _rel(f32, r)), (name, _rel(g, r), _rel(f32, r))


def test_a_padding_mask_keeps_the_recurrence():
    """Inputs with a padding mask (generation's left padding; training has none) go to mlx-lm's
    recurrence unchanged: its numbers exactly."""
    q, k, v, _, _, state = _inputs(3, 1, 12, 2, 2, 8, 8)
    mx.random.seed(6)
    a, b = mx.random.normal((1, 12, 2)), mx.random.normal((1, 12, 2))
    A_log, dt_bias = mx.log(mx.random.uniform(1, 8, (2,))), mx.random.normal((2,))
    mask = mx.array([[False] * 3 + [True] * 9])
    y0, s0 = gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, mask, use_kernel=False)
    y1, s1 = _gated_delta_update()(q, k, v, a, b, A_log, dt_bias, state, mask)
    assert mx.allclose(y0, y1, rtol=1e-6, atol=1e-7) and mx.allclose(s0, s1, rtol=1e-6, atol=1e-7)


def test_a_zero_gate_restarts_the_state_exactly():
    """Packed rows set the log-gate to LOG_ZERO at each example's first token: the second example's
    outputs are those it has alone, from a zero state, across chunk boundaries too."""
    q, k, v, log_g, beta, _ = _inputs(4, 1, 45, 1, 2, 16, 16)
    cut = 19
    packed_g = mx.where((mx.arange(45) == cut)[None, :, None], LOG_ZERO, log_g)
    y, _ = chunk_gated_delta(q, k, v, packed_g, beta, None, chunk=8)
    alone, _ = chunk_gated_delta(*(x[:, cut:] for x in (q, k, v, log_g, beta)), None, chunk=8)
    first, _ = chunk_gated_delta(*(x[:, :cut] for x in (q, k, v, log_g, beta)), None, chunk=8)
    assert mx.allclose(y[:, cut:], alone, rtol=1e-5, atol=1e-6)
    assert mx.allclose(y[:, :cut], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 3, 48])
def test_a_chunk_that_is_not_a_power_of_two_is_refused(chunk):
    xs = _inputs(0, 1, 8, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="power of two"):
        chunk_gated_delta(*xs, chunk=chunk)


def test_log_gates_are_mlx_lms_gates():
    mx.random.seed(7)
    a, dt = mx.random.normal((2, 9, 4)) * 3, mx.random.normal((4,))
    A_log = mx.log(mx.random.uniform(0.1, 16, (4,)))
    assert mx.allclose(mx.exp(_log_gates(a, A_log, dt, None)), gd.compute_g(A_log, a, dt), rtol=1e-6, atol=0)
    bounded = gd.compute_lower_bound_g(A_log, a, dt, -5.0)
    assert mx.allclose(mx.exp(_log_gates(a, A_log, dt, -5.0)), bounded, rtol=1e-6, atol=0)


def test_a_qwen3_5_model_trains_with_stock_mlx_lms_loss_and_gradients(tmp_path, monkeypatch):
    """A tiny qwen3_5 (gated-delta and attention blocks) on rows of 150 tokens, three chunks of its
    gated-delta layers: our LoRA + SFT loss and gradients (the chunked recurrence inside) equal
    stock mlx-lm's cross-entropy of ``model(inputs)`` (its step-by-step recurrence)."""
    model, _, _, _ = models.load_model(str(write_arch_model(tmp_path / "q", "qwen3_5")))
    method = adapters.method("lora")
    cfg = TrainConfig(lora_rank=4, num_layers=-1)
    method.apply(model, method.settings(cfg, model))
    rng = np.random.default_rng(0)
    params = model.trainable_parameters()
    model.update(tree_map(lambda p: mx.array(rng.normal(0, 0.05, p.shape), dtype=p.dtype), params))
    tokens = mx.array(rng.integers(3, models.vocab_size(model), (2, 151)), dtype=mx.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss_fn = model_loss_fn(model, LossConfig("sft"), chunk_tokens=64)
    positions = mx.arange(inputs.size, dtype=mx.int32)
    valid = mx.ones((inputs.size,), dtype=mx.bool_)

    def ours(p):
        model.update(p)
        objective, _, _, n, *_ = loss_fn(model, inputs, positions, targets.reshape(-1), valid)
        return objective / n

    def stock(p):
        model.update(p)
        return nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets).mean()

    params = model.trainable_parameters()
    v1, g1 = mx.value_and_grad(ours)(params)
    model.update(params)
    v0, g0 = mx.value_and_grad(stock)(params)
    assert float(v1) == pytest.approx(float(v0), rel=1e-5)
    flat0, flat1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert any("linear_attn" in name for name in flat0)  # the gated-delta layers are adapted
    for name, ref in flat0.items():
        assert _rel(flat1[name], ref.astype(mx.float64)) < 1e-4, name
    models.grad_checkpoint(model)  # blocks recomputed: the chunked recurrence inside a checkpoint

    def step_by_step(*args, **kwargs):
        raise AssertionError("mlx-lm's step-by-step recurrence ran in training")

    monkeypatch.setattr(gd, "gated_delta_ops", step_by_step)  # the backward pass's recomputation too
    v2, g2 = mx.value_and_grad(ours)(params)
    assert float(v2) == pytest.approx(float(v1), rel=1e-6)
    for name, g in tree_flatten(g2):
        assert _rel(g, flat1[name].astype(mx.float64)) < 1e-5, name
    with chunked_gated_delta(model) as any_layer:
        assert any_layer
    from mlx_lm.models import qwen3_5

    assert qwen3_5.gated_delta_update is gd.gated_delta_update  # restored afterwards


def test_plan_counts_the_chunked_layers(tmp_path):
    """``mlx_dft plan`` counts what a gated-delta layer's chunked recurrence holds in its backward
    pass, and no attention scores for those layers."""
    from mlx_dft import plan

    folder = write_arch_model(tmp_path / "q", "qwen3_5")  # 4 blocks: gated-delta and attention in turn
    short = plan.estimate(TrainConfig(model=str(folder), batch_size=2, num_layers=-1), 128, gflops=100.0)
    long = plan.estimate(TrainConfig(model=str(folder), batch_size=2, num_layers=-1), 1024, gflops=100.0)
    # qwen3_5 tiny: 4 value heads of 16; rows padded to 128 (2 chunks of 64) and 1,024 (16)
    counted = 4.0 * 2 * 4 * (16 * 2 * 64 * 64 + 8 * 128 * 16 + 2 * 16 * 16)
    assert short.terms["gated_delta"] == pytest.approx(2.8 * counted)
    assert long.terms["gated_delta"] > 7 * short.terms["gated_delta"]  # linear in the length
    scores = 4.0 * 2 * 4 * 128**2  # float32, batch 2, 4 attention heads: one attention block's
    assert short.terms["kept_scores"] == 2 * scores
    # 2 gated-delta blocks, each keeping 2 x conv 128 + 4 x keys 32 + 4 x values 64 per token
    assert short.terms["gated_delta_kept"] == 2 * (2 * 128 + 4 * 32 + 4 * 64) * 4.0 * 2 * 128


@pytest.mark.parametrize("per_dimension", [False, True])
def test_plan_of_one_layer_is_within_a_fifth_of_its_measured_peak(per_dimension):
    """The plan's term for one gated-delta layer against MLX's measured peak over the layer's
    inputs, for its backward pass (batch 1, 512 tokens, 4 heads of 64)."""
    from mlx_dft.plan import _gated_delta_bytes

    B, T, H, D = 1, 512, 4, 64
    q, k, v, log_g, beta, _ = _inputs(8, B, T, H, H, D, D)
    if per_dimension:
        log_g = mx.broadcast_to(log_g[..., None], (B, T, H, D)) * mx.linspace(0.5, 1.5, D)
    mx.eval(q, k, v, log_g, beta)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(mx.grad(_objective(chunk_gated_delta), argnums=(0, 1, 2, 3, 4))(q, k, v, log_g, beta, None))
    measured = mx.get_peak_memory() - base

    class Layer(nn.Module):
        num_v_heads, head_k_dim, head_v_dim = H, D, D

        def __init__(self):
            super().__init__()
            self.dt_bias = mx.zeros(H * D if per_dimension else H)

    planned = _gated_delta_bytes(Layer(), B, T)
    assert 0.8 < planned / measured < 1.25, (planned, measured)
