"""The Aligner on every attention variant of the first-class architectures (tests/arch_models.py):
grouped and multi-query attention, QK-norm per head (qwen3, gemma3, gemma4, lfm2, qwen3_5) or over
the whole projection (olmo2), fused QKV (phi3), sliding windows (gemma3/4, gpt_oss, ministral3),
attention sinks (gpt_oss), NoPE layers (smollm3), partial rotary dimensions and an output gate
(qwen3_5), KV-shared layers and K = V values with a scale-less value norm (gemma4), per-position
query scaling (ministral3), hybrids where only attention layers get a gate (qwen3_5, lfm2), experts.

The reference is written here, in numpy, from the paper's formula and each architecture's own
definition of its key and value maps (not from mlx_dft's code): it is checked against the term the
Aligner adds to the attention kernel's output, for the queries that kernel received.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from arch_models import TYPES, write_arch_model
from mlx_lm.models.cache import make_prompt_cache

import mlx_dft
from mlx_dft import adapters, models
from mlx_dft.adapters import aligner
from mlx_dft.adapters.aligner import layer as aligner_layer
from mlx_dft.config import TrainConfig
from mlx_dft.errors import UserError

_BUILT: dict = {}


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligner_archs")

    def get(model_type: str, **overrides):
        key = (model_type, json.dumps(overrides, sort_keys=True))
        if key not in _BUILT:
            _BUILT[key] = write_arch_model(root / f"{model_type}-{len(_BUILT)}", model_type, **overrides)
        return _BUILT[key]

    return get


def _with_aligner(path, tokens=3, start=1, gate="head", seed=1):
    model, *_ = models.load_model(str(path))
    cfg = TrainConfig(adapter="aligner", aligner_tokens=tokens, aligner_start_layer=start, aligner_gate=gate)
    settings = aligner.settings(cfg, model)
    adapters.apply_adapter(model, "aligner", settings)
    mx.random.seed(seed)
    for i in settings["aligner"]["layers"]:
        attn = aligner.attention_of(model.layers[i])
        attn[aligner.GATE_LEAF] = mx.random.uniform(-1, 1, attn[aligner.GATE_LEAF].shape)
    return model, settings


# ------------------------------------------------------------------ the numpy reference

# Each architecture's key/value maps as its model card defines them, written out here:
# which key norm (per head, or over the whole key projection), its weight offset (gemma's RMSNorm
# multiplies by 1 + w), a scale-less value norm, fused QKV, K = V.
PER_HEAD_KEY_NORM = {"qwen3", "qwen3_moe", "gemma3_text", "gemma4_text", "lfm2", "qwen3_5"}
WHOLE_KEY_NORM = {"olmo2"}
NORM_OFFSET = {"gemma3_text": 1.0}
VALUE_NORM = {"gemma4_text"}
FUSED_QKV = {"phi3"}


def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _norm_weight(norm, kind):
    return _np(norm.weight) + NORM_OFFSET.get(kind, 0.0)


def _linear(p, lin):
    y = p @ _np(lin.weight).T
    return y + _np(lin.bias) if "bias" in lin else y


def np_prefix_kv(kind: str, model, index: int, prefix: np.ndarray):
    """[n_kv, N, d] keys and values of the prefix for block ``index``, from the weights."""
    attn = model.layers[index].self_attn
    if kind == "gemma4_text" and "k_proj" not in attn:  # a KV-shared layer: the layer it shares with
        body = model.model
        attn = model.layers[body.previous_kvs[index]].self_attn
    n_kv = getattr(attn, "n_kv_heads", None) or attn.num_key_value_heads
    if kind in FUSED_QKV:  # [queries | keys | values], one head width for all
        qkv = _linear(prefix, attn.qkv_proj)
        d = qkv.shape[1] // (attn.n_heads + 2 * n_kv)
        q = attn.n_heads * d
        k, v = qkv[:, q : q + n_kv * d], qkv[:, q + n_kv * d :]
    else:
        k = _linear(prefix, attn.k_proj)
        v = k.copy() if getattr(attn, "use_k_eq_v", False) else _linear(prefix, attn.v_proj)
    d = k.shape[1] // n_kv
    if kind in WHOLE_KEY_NORM:
        k = _rms(k, _norm_weight(attn.k_norm, kind), attn.k_norm.eps)
    k, v = k.reshape(len(prefix), n_kv, d), v.reshape(len(prefix), n_kv, -1)
    if kind in PER_HEAD_KEY_NORM:
        norm = attn.k_layernorm if kind == "lfm2" else attn.k_norm
        k = _rms(k, _norm_weight(norm, kind), norm.eps)
    if kind in VALUE_NORM:
        v = _rms(v, 1.0, attn.v_norm.eps)
    return k.transpose(1, 0, 2), v.transpose(1, 0, 2)


def np_term(queries: np.ndarray, scale: float, keys, values, gates) -> np.ndarray:
    """sum over the prefix of g_h softmax(q_h k^T scale) v, head by head, each head reading its
    KV group; [B, H, L, d]."""
    b, h, length, _ = queries.shape
    n_kv = keys.shape[0]
    out = np.zeros((b, h, length, values.shape[-1]))
    for head in range(h):
        g = head // (h // n_kv)
        s = queries[:, head] @ keys[g].T * scale  # [B, L, N]
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        out[:, head] = (gates[head] if len(gates) > 1 else gates[0]) * (s @ values[g])
    return out


class _Recorder:
    """Records, for each call of an attention kernel, the queries, the scale and the term the
    Aligner added (the kernel's output with the Aligner minus the same call with it off)."""

    def __init__(self, model):
        self.calls: list[tuple[np.ndarray, float, np.ndarray]] = []
        self.patched = []
        modules = {type(a).__module__ for _, a in aligner_layer.attention_layers(model)}
        import sys

        for name in modules:
            mod = sys.modules[name]
            hooked = mod.scaled_dot_product_attention

            def record(q, k, v, cache, scale, mask, hooked=hooked, **kw):
                out = hooked(q, k, v, cache=cache, scale=scale, mask=mask, **kw)
                with aligner.switched_off():
                    base = hooked(q, k, v, cache=cache, scale=scale, mask=mask, **kw)
                self.calls.append((_np(q), float(np.asarray(scale).reshape(-1)[0]), _np(out - base)))
                return out

            self.patched.append((mod, hooked))
            mod.scaled_dot_product_attention = record

    def close(self):
        for mod, hooked in self.patched:
            mod.scaled_dot_product_attention = hooked


# gemma4's 26B/31B form: full-attention layers take values off the key projection (K = V) and have
# their own number of KV heads
VARIANTS = {t: {} for t in TYPES} | {
    "gemma4_text-k_eq_v": {"attention_k_eq_v": True, "num_global_key_value_heads": 2},
}


@pytest.mark.parametrize("gate", ["head", "layer"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_term_matches_the_numpy_reference(arch_dir, variant, gate):
    model_type = variant.split("-")[0]
    model, settings = _with_aligner(arch_dir(model_type, **VARIANTS[variant]), tokens=3, start=1, gate=gate)
    if variant.endswith("k_eq_v"):
        assert any(getattr(a, "use_k_eq_v", False) for _, a in aligner_layer.attention_layers(model))
    layers = settings["aligner"]["layers"]
    attention = [i for i, _ in aligner_layer.attention_layers(model)]
    ids = mx.array([[1, 5, 9, 33, 2, 7, 11, 40, 3, 8, 12]])  # longer than every sliding window (4)
    rec = _Recorder(model)
    try:
        model(ids)
    finally:
        rec.close()
    assert len(rec.calls) == len(attention)  # one kernel call per attention layer, none elsewhere
    prefix = _np(model.aligner.prefix)
    checked = 0
    for i, (q, scale, term) in zip(attention, rec.calls):
        if i not in layers:
            assert np.abs(term).max() == 0  # layers before the start pass through
            continue
        keys, values = np_prefix_kv(model_type, model, i, prefix)
        gates = _np(aligner.attention_of(model.layers[i])[aligner.GATE_LEAF])
        want = np_term(q, scale, keys, values, gates)
        np.testing.assert_allclose(term, want, atol=2e-5, rtol=1e-4)
        assert np.abs(want).max() > 1e-3  # the term is there to be wrong
        checked += 1
    assert checked == len(layers) >= 1


def check_zero_gates_and_cache(path) -> None:
    """A fresh Aligner leaves the logits bit-identical; with gates, decoding a token at a time with
    mlx-lm's KV cache gives the logits of recomputing the whole sequence."""
    base, *_ = models.load_model(str(path))
    ids = mx.array([[1, 5, 9, 33, 2, 7, 11, 40, 3, 8]])
    before = base(ids)
    model, *_ = models.load_model(str(path))
    cfg = TrainConfig(adapter="aligner", aligner_tokens=2, aligner_start_layer=0)
    adapters.apply_adapter(model, "aligner", aligner.settings(cfg, model))
    assert bool(mx.array_equal(before, model(ids)))

    model, _ = _with_aligner(path, tokens=3, start=0)
    full = model(ids)
    assert float(mx.abs(full - before).max()) > 1e-2
    cache = make_prompt_cache(model)
    steps = [model(ids[:, :6], cache=cache)[:, -1]]
    for j in range(6, ids.shape[1]):
        steps.append(model(ids[:, j : j + 1], cache=cache)[:, -1])
    np.testing.assert_allclose(np.array(mx.stack(steps, 1)), np.array(full[:, 5:]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_zero_gates_leave_logits_bit_identical_and_cache_decoding_equals_recomputation(arch_dir, model_type):
    check_zero_gates_and_cache(arch_dir(model_type))


def test_hybrids_gate_their_attention_layers_only_and_count_them(arch_dir):
    """qwen3_5 (gated-delta layers 0 and 2) and lfm2 (convolutions 0 and 2): gates on the
    attention layers alone, and the parameter count N*C + A*H says so."""
    for kind, attention in (("qwen3_5", [1, 3]), ("lfm2", [1])):
        model, settings = _with_aligner(arch_dir(kind), tokens=2, start=0)
        a = settings["aligner"]
        assert a["layers"] == attention
        gated = [
            i for i, b in enumerate(model.layers) if aligner.GATE_LEAF in (aligner.attention_of(b) or {})
        ]
        assert gated == attention
        expected = aligner.parameter_count(2, 64, len(attention), 4, "head")
        assert adapters.count_parameters(model)[0] == expected == 2 * 64 + len(attention) * 4
        assert a["parameters"] == expected
        assert f"{len(attention)} layers x 4 gates" in aligner.METHOD.describe(settings)


def test_kv_shared_layers_read_the_prefix_through_the_maps_they_share(arch_dir):
    """gemma4's last layer has no key/value projections: its prefix keys are those of the layer
    whose keys it shares (same type), so the two layers see the same prefix keys."""
    model, _ = _with_aligner(arch_dir("gemma4_text"), start=0)
    shared = model.model.previous_kvs
    last = len(model.layers) - 1
    assert "k_proj" not in model.layers[last].self_attn and shared[last] != last
    k1, v1 = aligner.prefix_keys_values(model.layers[last].self_attn, model.aligner.prefix)
    k0, v0 = aligner.prefix_keys_values(model.layers[shared[last]].self_attn, model.aligner.prefix)
    assert bool(mx.array_equal(k0, k1)) and bool(mx.array_equal(v0, v1))


def test_the_prefix_stays_visible_beyond_a_sliding_window(arch_dir):
    """gemma3's sliding layers see 4 tokens back, the prefix at every position: the term at the
    last position of a long input equals the term of the same queries with no window."""
    model, settings = _with_aligner(arch_dir("gemma3_text"), tokens=2, start=0)
    ids = mx.array([list(range(3, 40))])
    rec = _Recorder(model)
    try:
        model(ids)
    finally:
        rec.close()
    prefix = _np(model.aligner.prefix)
    for i, (q, scale, term) in enumerate(rec.calls):
        keys, values = np_prefix_kv("gemma3_text", model, i, prefix)
        gates = _np(aligner.attention_of(model.layers[i])[aligner.GATE_LEAF])
        want = np_term(q, scale, keys, values, gates)
        np.testing.assert_allclose(term[:, :, -1], want[:, :, -1], atol=2e-5)


# ------------------------------------------------------------------ refusals


def test_a_model_without_attention_layers_is_refused_by_name(arch_dir, arith_data, tmp_path):
    path = arch_dir("qwen3_5", text_config={**_qwen3_5_text(), "full_attention_interval": 8})
    model, *_ = models.load_model(str(path))
    with pytest.raises(UserError, match="qwen3_5.*no softmax attention layer"):
        aligner.settings(TrainConfig(adapter="aligner", aligner_start_layer=0), model)
    from conftest import run_cli

    out = tmp_path / "run"
    r = run_cli(
        "train", "--model", str(path), "--data", str(arith_data), "--fine-tune-type", "aligner",
        "--aligner-start-layer", "0", "--iters", "1", "--output", str(out),
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no softmax attention layer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def _qwen3_5_text() -> dict:
    from arch_models import CONFIGS

    return dict(CONFIGS["qwen3_5"]["text_config"])


def test_start_layer_past_the_last_attention_layer_is_refused(arch_dir):
    model, *_ = models.load_model(str(arch_dir("lfm2")))  # attention at layer 1 of 3
    with pytest.raises(UserError, match=r"no attention layer at or after aligner start layer 2.*\[1\]"):
        aligner.settings(TrainConfig(adapter="aligner", aligner_start_layer=2), model)


def test_an_attention_the_aligner_cannot_read_is_refused_by_name(tmp_path):
    """gpt2's blocks call their attention ``attn`` with one fused ``c_attn``: refused in one line
    naming it, rather than trained without effect."""
    from conftest import write_model

    cfg = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_ctx": 128, "n_positions": 128,
           "vocab_size": 512, "layer_norm_epsilon": 1e-5}  # fmt: skip
    model, *_ = models.load_model(str(write_model(tmp_path / "gpt2", cfg)))
    with pytest.raises(UserError, match=r"gpt2.*its attention \(attn\) is not a `self_attn` layer"):
        aligner.settings(TrainConfig(adapter="aligner", aligner_start_layer=0), model)


def test_an_adapter_for_other_attention_layers_is_refused(arch_dir):
    model, settings = _with_aligner(arch_dir("qwen3_5"), start=0)
    other, *_ = models.load_model(str(arch_dir("lfm2")))
    with pytest.raises(UserError, match="made for a 'qwen3_5' model; this model is 'lfm2'"):
        adapters.apply_adapter(other, "aligner", settings)


# ------------------------------------------------------------------ training


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_training_lowers_the_validation_loss(arch_dir, model_type, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(arch_dir(model_type)), data=str(arith_data), fine_tune_type="aligner",
        aligner_tokens=2, aligner_start_layer=0, loss="sft", iters=12, batch_size=4, learning_rate=3e-2,
        steps_per_eval=12, val_batches=2, max_seq_length=64, output=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    vals = [r["val_loss"] for r in run.history if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0] - 0.05, vals
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["aligner"]["layers"] == [i for i, _ in aligner_layer.attention_layers(run.model)]
    assert config["aligner"]["model_type"] == models.model_type(run.model)


# ------------------------------------------------------------------ soft-capped attention (gemma2)

GEMMA2 = {
    "model_type": "gemma2", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 512,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "query_pre_attn_scalar": 16,
    "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from conftest import write_model

    return write_model(tmp_path_factory.mktemp("gemma2") / "g2", GEMMA2)


def test_soft_capped_scores_match_the_numpy_reference(gemma2):
    """gemma2 computes its soft-capped scores itself (no kernel to hook): the layer's output moves
    by o_proj of g softmax(cap tanh(q k^T scale / cap)) v, the prefix scores capped as the layer's."""
    model, settings = _with_aligner(gemma2, tokens=3, start=0)
    model.aligner.prefix = model.aligner.prefix * 300  # scores past the cap, where capping matters
    attn = model.layers[1].self_attn
    x = mx.random.normal((2, 7, 64), key=mx.random.key(4)) * 30
    out = attn(x)  # (gemma2 takes no "causal" string; unmasked is as good a test)
    with aligner.switched_off():
        base = attn(x)
    # the layer's queries: its own projection and RoPE (mlx-lm's modules), the rest in numpy
    q = _np(attn.rope(attn.q_proj(x).reshape(2, 7, 4, 16).transpose(0, 2, 1, 3)))
    p = _np(model.aligner.prefix)
    k = (p @ _np(attn.k_proj.weight).T).reshape(3, 2, 16).transpose(1, 0, 2)
    v = (p @ _np(attn.v_proj.weight).T).reshape(3, 2, 16).transpose(1, 0, 2)
    gates, cap = _np(attn[aligner.GATE_LEAF]), GEMMA2["attn_logit_softcapping"]
    want = np.zeros((2, 4, 7, 16))
    for head in range(4):
        s = q[:, head] @ k[head // 2].T * 16**-0.5
        s = cap * np.tanh(s / cap)
        s = np.exp(s - s.max(-1, keepdims=True))
        want[:, head] = gates[head] * (s / s.sum(-1, keepdims=True)) @ v[head // 2]
    want = want.transpose(0, 2, 1, 3).reshape(2, 7, 64) @ _np(attn.o_proj.weight).T
    np.testing.assert_allclose(_np(out - base), want, atol=2e-5, rtol=1e-4)
    uncapped = want * 0  # the same without the cap differs: the test can fail
    for head in range(4):
        s = q[:, head] @ k[head // 2].T * 16**-0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        uncapped[:, :, head * 16 : head * 16 + 16] = gates[head] * s @ v[head // 2]
    assert np.abs(uncapped @ _np(attn.o_proj.weight).T - want).max() > 1e-3


@pytest.mark.parametrize("batch", [2, 3])
def test_soft_capped_grouped_attention_generates_in_batches_as_alone(gemma2, batch):
    """mlx-lm 0.32.2's gemma2 broadcast a batched [B, 1, L, S] mask over its kv heads: an error
    for 3 prompts, silently other tokens for 2 (= its kv heads). With mlx_dft's fix, each prompt
    of a left-padded batch decodes as it does alone."""
    from mlx_lm.generate import batch_generate, generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_dft.load(str(gemma2))
    prompts = [[1, 40, 41], [1, 50, 51, 52, 53, 54], [1, 60, 61, 62, 63]][:batch]
    greedy = make_sampler(temp=0.0)
    together = batch_generate(model, tok, prompts, max_tokens=6, sampler=greedy).texts
    alone = [generate(model, tok, p, max_tokens=6, sampler=greedy) for p in prompts]
    assert [t.strip() for t in together] == [t.strip() for t in alone]  # (a leading space differs)


def test_soft_capped_attention_zero_gates_cache_and_training(gemma2, arith_data, tmp_path):
    check_zero_gates_and_cache(gemma2)
    run = mlx_dft.train(
        model=str(gemma2), data=str(arith_data), fine_tune_type="aligner", aligner_tokens=2,
        aligner_start_layer=0, loss="sft", iters=12, batch_size=4, learning_rate=3e-2, steps_per_eval=12,
        val_batches=2, max_seq_length=64, output=str(tmp_path / "run"), progress=False,
        accuracy_problems=4,  # batched generation of gemma2 with grouped queries (mlx_dft.patches)
    )  # fmt: skip
    vals = [r["val_loss"] for r in run.history if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.05, vals
