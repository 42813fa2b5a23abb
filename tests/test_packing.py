"""Exact packing (``--pack``): a packed batch is the same examples unpacked, to float32 rounding.

Several examples share a row; the loss makes attention block-diagonal from each position's
segment, and RoPE positions restart at each example (mlx_dft.packing says why). These tests
prove it numerically: per-token log-probabilities, loss sums and gradients of packed batches
against the same examples one per row, for every adapter and loss, and llama / qwen2 / qwen3.
"""

import json
from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_dft
from mlx_dft import adapters
from mlx_dft.config import TrainConfig
from mlx_dft.data import (
    DataConfig,
    collate,
    iterate_batches,
    load_split,
    pack_dataset,
    pack_rows,
)
from mlx_dft.errors import UserError
from mlx_dft.losses import LossConfig
from mlx_dft.models import load_model, split_model
from mlx_dft.packing import packed_attention, prepare
from mlx_dft.patches import set_checkpointing
from mlx_dft.trainer import model_loss_fn
from tests.conftest import llama_config, run_cli, write_model

ARCHS = {
    "llama": llama_config(),
    "qwen2": {**llama_config(), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {**llama_config(head_dim=16), "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
    # soft-capped scores computed by the layer itself, grouped queries as 5-D arrays: mlx-lm 0.32.2
    # broadcast a [B, 1, T, T] mask over its kv heads (silently wrong when B equals their number)
    "gemma2": {
        **llama_config(), "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0,
    },
}
TOL = dict(atol=1e-5, rtol=1e-5)


# mlx-lm architectures with what packing must keep exact: sliding windows (gemma3/4, gpt_oss),
# shared KV and soft-capping (gemma4), attention sinks and experts (gpt_oss), NoPE layers
# (smollm3), fused projections (phi3), scaled embeddings/residuals/logits (granite), QK-norm
# after projection (olmo2), experts (qwen3_moe).
MORE = (
    "gemma3_text", "gemma4_text", "gpt_oss", "smollm3", "phi3", "granite", "olmo2", "qwen3_moe",
    "qwen3_5", "lfm2", "ministral3",
)  # fmt: skip


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    from tests.arch_models import write_arch_model

    root = tmp_path_factory.mktemp("pack_models")
    out = {a: write_model(root / a, cfg, seed=3) for a, cfg in ARCHS.items()}
    out.update({a: write_arch_model(root / a, a, seed=3) for a in MORE})
    return out


def _split(arith_data, path, max_len=2048):
    _, tok, *_ = load_model(str(path))
    return load_split(arith_data / "train.jsonl", "train", tok, DataConfig(max_seq_length=max_len))


def _adapted(path, adapter, seed=0):
    mx.random.seed(seed)
    model, *_ = load_model(str(path))
    method = adapters.method(adapter)
    cfg = TrainConfig(adapter=adapter, num_layers=-1, aligner_start_layer=0, aligner_tokens=2)
    method.apply(model, method.settings(cfg, model))
    prepare(model)
    # move every trainable weight off its initial value (LoRA b and Aligner gates start at zero)
    rng = np.random.default_rng(seed + 1)
    model.update(
        tree_map(
            lambda x: x + mx.array(rng.normal(size=x.shape).astype(np.float32) * 0.05),
            model.trainable_parameters(),
        )
    )
    return model, method


# ------------------------------------------------------------------ rows


def test_pack_rows_puts_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 60, 300), rng.integers(200, 512, 20)])
    rows = pack_rows(lengths, 512)
    flat = np.sort(np.concatenate(rows))
    assert np.array_equal(flat, np.arange(len(lengths)))
    fills = [int(lengths[r].sum()) for r in rows]
    assert max(fills) <= 512
    assert len(rows) <= int(np.ceil(lengths.sum() / 512)) + 1  # best-fit: at most one row over the bound
    assert [list(r) for r in pack_rows(lengths, 512)] == [list(r) for r in rows]  # deterministic
    with pytest.raises(ValueError):
        pack_rows([10, 600], 512)


def test_pack_dataset_lays_out_examples_one_after_another(tiny_model, arith_data):
    ds = _split(arith_data, tiny_model)
    packed = pack_dataset(ds, 256)
    assert sum(len(r) for r in packed.rows) == len(ds)
    assert packed.n_tokens == ds.n_tokens
    assert packed.n_supervised == ds.n_supervised  # no target gained or lost
    for row, tokens, sup, seg in zip(packed.rows, packed.tokens, packed.supervised, packed.segments):
        assert len(tokens) <= 256
        assert np.array_equal(tokens, np.concatenate([ds.tokens[i] for i in row]))
        starts = np.cumsum([0] + [len(ds.tokens[i]) for i in row])[:-1]
        assert np.all(sup[starts] == 0)  # an example's first token is never a target
        assert np.array_equal(seg, np.repeat(np.arange(1, len(row) + 1), [len(ds.tokens[i]) for i in row]))


# ------------------------------------------------------------------ the numbers


def _token_logprobs(model, batch, segments):
    """log p(target) at each supervised position of ``batch``, the packed way or not."""
    body, head, _ = split_model(model)
    with packed_attention(body, segments):
        h = body(batch.inputs)
    logits = head(mx.take(h.reshape(-1, h.shape[-1]), batch.positions, axis=0))
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    got = mx.take_along_axis(lp, batch.targets[:, None], axis=-1)[:, 0]
    return np.array(got)[: batch.n_supervised]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_rows_give_each_example_its_own_logprobs(arch_models, arith_data, arch):
    path = arch_models[arch]
    ds = _split(arith_data, path)
    packed = pack_dataset(ds, 300)
    model, _ = _adapted(path, "lora")
    for r in range(min(3, len(packed))):
        rows = packed.rows[r]
        assert len(rows) > 1
        pb = collate([packed.tokens[r]], [packed.supervised[r]], [packed.segments[r]])
        got = _token_logprobs(model, pb, pb.segments)
        want = np.concatenate(
            [_token_logprobs(model, collate([ds.tokens[i]], [ds.supervised[i]]), None) for i in rows]
        )
        np.testing.assert_allclose(got, want, **TOL)
        # without the mask the later examples see the earlier ones: the test can fail
        leaky = _token_logprobs(model, pb, None)
        assert np.abs(leaky - want).max() > 1e-3


def _sums_and_grads(model, loss_fn, batch):
    vg = nn.value_and_grad(model, loss_fn)
    sums, grads = vg(model, *batch.arrays())
    return np.array(sums.stacked()), dict(tree_flatten(grads))


@pytest.mark.parametrize(
    "arch,adapter,loss",
    [
        ("llama", "lora", "dft"),
        ("llama", "dora", "sft"),
        ("llama", "full", "dft"),
        ("llama", "aligner", "dft"),
        ("llama", "lora", "asft"),
        ("llama", "aligner", "asft"),
        ("llama", "lora", "eaft"),
        ("llama", "lora", "prift"),
        ("llama", "full", "deft"),
        ("llama", "dora", "bll"),
        ("qwen2", "aligner", "dft"),
        ("qwen3", "lora", "dft"),
        ("qwen3", "aligner", "sft"),
        ("gemma2", "lora", "dft"),  # two rows, two kv heads: the case mlx-lm got silently wrong
        ("gemma2", "aligner", "sft"),
        *[(a, "lora", "dft") for a in MORE],
        *[(a, "aligner", "dft") for a in MORE],
        ("gemma4_text", "lora", "asft"),
        ("gpt_oss", "full", "sft"),
        ("llama", "lora", "dft-checkpointed"),
        ("gemma4_text", "lora", "dft-checkpointed"),
        ("qwen3_5", "lora", "asft"),
        ("qwen3_5", "full", "sft"),
        ("lfm2", "lora", "dft-checkpointed"),
    ],
)
def test_a_packed_batch_has_the_losses_and_gradients_of_the_same_examples_unpacked(
    arch_models, arith_data, arch, adapter, loss
):
    """Also with gradient checkpointing: the recomputed blocks mask and rotate as the forward did."""
    path = arch_models[arch]
    ds = _split(arith_data, path)
    packed = pack_dataset(ds, 400)
    model, method = _adapted(path, adapter)
    if loss.endswith("-checkpointed"):
        loss = loss.removesuffix("-checkpointed")
        set_checkpointing(model)
    cfg = LossConfig(loss, asft_alpha=0.1) if loss == "asft" else LossConfig(loss)
    off = method.adapter_off(model, copy_weights=True) if cfg.needs_reference else None
    loss_fn = model_loss_fn(model, cfg, 0, off)
    rows = [r for r in range(len(packed)) if len(packed.rows[r]) > 1][:2]
    pb = collate([packed.tokens[r] for r in rows], [packed.supervised[r] for r in rows],
                 [packed.segments[r] for r in rows])  # fmt: skip
    members = [i for r in rows for i in packed.rows[r]]
    ub = collate([ds.tokens[i] for i in members], [ds.supervised[i] for i in members])
    assert pb.n_supervised == ub.n_supervised and len(members) > len(rows)
    ps, pg = _sums_and_grads(model, loss_fn, pb)
    us, ug = _sums_and_grads(model, loss_fn, ub)
    np.testing.assert_allclose(ps, us, **TOL)
    assert pg.keys() == ug.keys() and pg
    for k in ug:
        scale = max(1.0, float(mx.abs(ug[k]).max()))
        # float32 sums in another order: gemma4's layer-0 k_proj gradients were up to 2.3e-5 (5e-5
        # relative) off on an AMD EPYC (AVX-512 kernels), within 1e-5 on the Intel Xeon first used;
        # a leak across examples moves them by more than 1e-3
        np.testing.assert_allclose(np.array(pg[k]) / scale, np.array(ug[k]) / scale, atol=3e-5, rtol=1e-4,
                                   err_msg=k)  # fmt: skip


# ------------------------------------------------------------------ training with --pack


FAST = dict(batch_size=2, steps_per_report=1, progress=False, learning_rate=1e-2, max_seq_length=256)


def test_train_pack_resumes_from_a_checkpoint_to_the_same_weights(tiny_model, arith_data, tmp_path):
    out = tmp_path / "a"
    full = mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(out), pack=True,
                         iters=6, save_every=2, **FAST)  # fmt: skip
    assert json.loads((out / "adapter_config.json").read_text())["training"]["pack"] is True
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    resumed = mlx_dft.train(resume=str(out / "checkpoints" / "step-0000002"), output=str(tmp_path / "b"),
                            progress=False)  # fmt: skip
    assert resumed.step == 6 and resumed.config.pack is True
    with pytest.raises(UserError, match="was trained with --pack: resume it the same way"):
        mlx_dft.train(resume=str(out / "checkpoints" / "step-0000002"), output=str(tmp_path / "c"),
                      pack=False, progress=False)  # fmt: skip
    a = dict(tree_flatten(full.model.trainable_parameters()))
    b = dict(tree_flatten(resumed.model.trainable_parameters()))
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_the_cli_says_how_it_packed(tiny_model, arith_data, tmp_path):
    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--adapter-path", tmp_path / "o",
                "--pack", "--max-seq-length", "256", "--iters", "2", "--batch-size", "2",
                "--accuracy-problems", "0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = p.stdout + p.stderr
    assert "packed train: 48 examples into" in text and "packed rows" in text, text


def test_packed_batches_are_rows_and_split_across_workers(tiny_model, arith_data):
    packed = pack_dataset(_split(arith_data, tiny_model), 256)
    whole = next(iterate_batches(packed, 2, seed=0))
    halves = [next(iterate_batches(packed, 2, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert whole.inputs.shape[0] == 2 and all(h.inputs.shape[0] == 1 for h in halves)
    assert whole.n_supervised == sum(h.n_supervised for h in halves)
    assert whole.segments is not None and int(mx.max(whole.segments)) > 1


# What a packed row needs beyond the block-diagonal mask, and the patch point that provides it
# (switched off in the control): per-example convolution and gated-delta state (qwen3_5, lfm2);
# ministral3's query scale 1 + beta log(1 + floor(pos / original_max)) at each example's own
# positions (original_max is 8 in the test model, so the scale grows within an example).
CONTROLS = {
    "qwen3_5": ("_segmented", lambda block, packed: nullcontext()),
    "lfm2": ("_segmented", lambda block, packed: nullcontext()),
    "ministral3": ("position_scale", lambda block, body, positions: None),
}


@pytest.mark.parametrize("arch", sorted(CONTROLS))
def test_packed_rows_would_leak_across_examples_without_their_patch(
    arch_models, arith_data, arch, monkeypatch
):
    """Packed = unpacked; with the patch point switched off, later examples' log-probabilities
    change (the patch is what makes it exact)."""
    from mlx_dft import patches

    path = arch_models[arch]
    ds = _split(arith_data, path)
    packed = pack_dataset(ds, 300)
    model, _ = _adapted(path, "lora")
    r = next(r for r in range(len(packed)) if len(packed.rows[r]) > 1)
    pb = collate([packed.tokens[r]], [packed.supervised[r]], [packed.segments[r]])
    want = np.concatenate(
        [_token_logprobs(model, collate([ds.tokens[i]], [ds.supervised[i]]), None) for i in packed.rows[r]]
    )
    np.testing.assert_allclose(_token_logprobs(model, pb, pb.segments), want, **TOL)
    monkeypatch.setattr(patches, *CONTROLS[arch])
    assert np.abs(_token_logprobs(model, pb, pb.segments) - want).max() > 1e-3
