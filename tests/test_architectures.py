# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""Every mlx-lm text architecture people bring (tiny random models of 13 model types, built with
mlx-lm's own classes): the hidden-state loss path checked against stock ``model(inputs)``, every
loss with LoRA, DoRA and full fine-tuning equal to its full-logits form (values and gradients,
compiled), the default LoRA targets, nested configs, the planner, and a short run of each."""

from __future__ import annotations

from contextlib import contextmanager

import mlx_dft.losses
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from tests.arch_models import TYPES, write_arch_model
from tests.conftest import run_cli
from mlx_dft import adapters, models
from mlx_dft.config import TrainConfig, loss_of
from mlx_dft.losses import LossConfig, loss_from_logits
from mlx_dft.trainer import model_loss_fn, run_loss_fns

_BUILT: dict = {}


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")

    def get(model_type: str):
        if model_type not in _BUILT:
            _BUILT[model_type] = write_arch_model(root / model_type, model_type)
        return _BUILT[model_type]

    return get


def _load(path):
    model, _, config, _ = models.load_model(str(path))
    return model, config


def _batch(vocab: int, rows: int = 2, length: int = 10, seed: int = 1):
    """inputs, targets and a mask that leaves out each row's first 3 positions (a prompt) and the
    second row's last 2 (padding)."""
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(3, vocab, (rows, length + 1)), dtype=mx.int32)
    mask = np.ones((rows, length), dtype=bool)
    mask[:, :3] = False
    mask[1, -2:] = False
    return tokens[:, :-1], tokens[:, 1:], mx.array(mask)


def _our_loss(model, loss_fn, inputs, targets, mask):
    """Our loss on a batch, as the trainer calls it: supervised positions gathered, mean over them."""
    flat = np.flatnonzero(np.array(mask).reshape(-1))
    positions = mx.array(flat, dtype=mx.int32)
    t = targets.reshape(-1)[positions]
    valid = mx.ones(t.shape, dtype=mx.bool_)
    objective, _, _, n, *_ = loss_fn(model, inputs, positions, t, valid)
    return objective / n


def _perturb_adapter(model, seed: int = 3) -> None:
    """Give the adapter's zero-initialised factors random values, so that it changes the model
    (ASFT's reference then differs from the policy)."""
    rng = np.random.default_rng(seed)
    params = model.trainable_parameters()
    model.update(tree_map(lambda v: mx.array(rng.normal(0, 0.05, v.shape), dtype=v.dtype), params))


@pytest.mark.parametrize("model_type", TYPES)
def test_split_is_verified_and_equals_stock_cross_entropy(arch_dir, model_type):
    """The hidden-state path is taken on every architecture, and its SFT loss is stock mlx-lm's
    cross-entropy of ``model(inputs)`` (the head's soft-capping and logit scaling included)."""
    model, _ = _load(arch_dir(model_type))
    split = models.split_model(model)
    assert split.fast, split.reason
    assert "hidden states" in split.describe()
    inputs, targets, mask = _batch(models.vocab_size(model))
    logits = model(inputs)  # stock
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    stock = float(ce.sum() / mask.sum())
    loss_fn = model_loss_fn(model, LossConfig("sft"), chunk_tokens=5)
    ours = float(_our_loss(model, loss_fn, inputs, targets, mask))
    assert ours == pytest.approx(stock, rel=1e-5)


def _cfg(**kw) -> TrainConfig:
    base = {"lora_rank": 4, "num_layers": -1}
    base.update(kw)
    return TrainConfig(**base)


LOSSES = list(mlx_dft.losses.LOSSES)  # every registered loss


@pytest.mark.parametrize("adapter", ["lora", "dora", "full"])
@pytest.mark.parametrize("model_type", TYPES)
def test_every_loss_matches_its_full_logits_form(arch_dir, model_type, adapter):
    """Every loss (sft, dft, asft, eaft, prift, deft, bll) on the hidden-state path, in logits
    chunks and compiled, give the values and gradients of the same loss computed from the full
    logits of ``model(inputs)`` (and, for asft and prift, of the model with the adapter off)."""
    model, _ = _load(arch_dir(model_type))
    cfg = _cfg(adapter=adapter, reference_copy=adapter == "full")
    method = adapters.method(adapter)
    settings = method.settings(cfg, model)
    method.apply(model, settings)
    if adapter != "full":
        _perturb_adapter(model)
    inputs, targets, mask = _batch(models.vocab_size(model))
    for loss in LOSSES:
        cfg.loss = loss
        lcfg = loss_of(cfg)
        off = method.adapter_off(model, cfg.reference_copy) if lcfg.needs_reference else None
        loss_fn = model_loss_fn(model, lcfg, 4, off)

        def ours(params, loss_fn=loss_fn):
            model.update(params)
            return _our_loss(model, loss_fn, inputs, targets, mask)

        def reference(params, lcfg=lcfg, off=off):
            model.update(params)
            ref = None
            if lcfg.needs_reference:
                with off():
                    ref = mx.stop_gradient(model(inputs))
            return loss_from_logits(model(inputs), targets, mask, lcfg, ref)[0]

        params = model.trainable_parameters()
        compiled = mx.compile(mx.value_and_grad(ours), inputs=[model.state, loss_fn.state])
        v1, g1 = compiled(params)
        model.update(params)
        v2, g2 = mx.value_and_grad(reference)(params)
        assert float(v1) == pytest.approx(float(v2), rel=1e-5, abs=1e-6), (loss, adapter)
        g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
        assert g1.keys() == g2.keys()
        num = sum(float(mx.sum((g1[k] - g2[k]) ** 2)) for k in g1) ** 0.5
        den = sum(float(mx.sum(g2[k] ** 2)) for k in g1) ** 0.5
        assert num <= 1e-4 * max(den, 1e-8), (loss, adapter, num, den)
        model.update(params)


@pytest.mark.parametrize("model_type", TYPES)
def test_tiled_mlp_is_exact_under_checkpointing(arch_dir, model_type, monkeypatch):
    """--tiled-mlp (each recomputed block's MLP run over the sequence in tiles, each recomputed
    again in the backward pass) gives the loss and gradients of the untiled checkpointed step and
    of plain autodiff of ``model(inputs)``: the MLP sees each token alone (experts included)."""
    from mlx_dft import patches

    model, _ = _load(arch_dir(model_type))
    method = adapters.method("lora")
    method.apply(model, method.settings(_cfg(adapter="lora"), model))
    _perturb_adapter(model)
    inputs, targets, mask = _batch(models.vocab_size(model), length=13)
    lcfg = loss_of(_cfg(loss="dft"))
    loss_fn = model_loss_fn(model, lcfg, 4)
    tiles = []
    original = patches.tiled_feed_forward

    @contextmanager
    def counted(block, x, on=True):
        with original(block, x, on) as n:
            tiles.append(n)
            yield n

    monkeypatch.setattr(patches, "tiled_feed_forward", counted)
    # a tile of 4 tokens of the widest layer's width at this model's shape: 4 tiles of a 13-token row
    width = max(patches.feed_forward_width(b[n]) for b in models.split_model(model).body.layers
                for n in patches.FEED_FORWARD_NAMES if n in b)  # fmt: skip
    monkeypatch.setattr(patches, "FEED_FORWARD_TILE_BYTES", 2 * 4 * width * 4)

    def run(tiled: bool, checkpoint: bool = True):
        patches.set_checkpointing(model, checkpoint, tiled=tiled)

        def ours(params):
            model.update(params)
            return _our_loss(model, loss_fn, inputs, targets, mask)

        params = model.trainable_parameters()
        out = mx.compile(mx.value_and_grad(ours), inputs=[model.state])(params)
        model.update(params)
        patches.set_checkpointing(model, False)
        return out

    v_plain, g_plain = run(False, checkpoint=False)
    v0, g0 = run(False)
    v1, g1 = run(True)
    assert max(tiles) == 4, tiles  # every block of the tiled run, 1 elsewhere
    assert patches.feed_forward_tiles(2 * 13, width, patches.FEED_FORWARD_TILE_BYTES) == 4
    for v, g in ((v0, g0), (v_plain, g_plain)):
        assert float(v1) == pytest.approx(float(v), rel=1e-5, abs=1e-6)
        a, b = dict(tree_flatten(g1)), dict(tree_flatten(g))
        assert a.keys() == b.keys()
        num = sum(float(mx.sum((a[k] - b[k]) ** 2)) for k in a) ** 0.5
        den = sum(float(mx.sum(b[k] ** 2)) for k in a) ** 0.5
        assert num <= 1e-4 * max(den, 1e-8), (model_type, num, den)


def test_tiled_mlp_needs_grad_checkpoint(tiny_model, arith_data, tmp_path):
    from tests.test_cli import assert_one_line_error

    out = tmp_path / "o"
    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--output", out, "--iters", 1,
                "--tiled-mlp")  # fmt: skip
    assert_one_line_error(p, "--tiled-mlp needs --grad-checkpoint")
    assert not out.exists() or not any(out.iterdir())


def test_tiled_mlp_says_how_many_tiles_a_block_gets(tiny_model, arith_data, tmp_path, monkeypatch, capsys):
    """The start-up line: a note when one tile holds the whole batch (the option changes nothing),
    else the tile count at the longest batch."""
    import mlx_dft
    from mlx_dft import patches

    common = dict(model=str(tiny_model), data=str(arith_data), iters=1, batch_size=2, grad_checkpoint=True,
                  tiled_mlp=True, accuracy_problems=0, progress=False)  # fmt: skip
    mlx_dft.train(**common, output=str(tmp_path / "a"))
    assert "note: --tiled-mlp has no effect here: a batch of up to 2 x" in capsys.readouterr().out
    monkeypatch.setattr(patches, "FEED_FORWARD_TILE_BYTES", 4096)
    mlx_dft.train(**common, output=str(tmp_path / "b"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiled MLP:"))
    assert "runs in" in line and "tiles of at most" in line and "(2 x" in line


def test_probe_falls_back_when_the_head_is_not_per_position(arch_dir):
    """A model whose output mixes positions after its body (no mlx-lm model does; a crafted one
    here) fails the probe: full logits, with the reason, and the loss is still right."""
    model, _ = _load(arch_dir("llama"))

    class Mixing(type(model)):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            out = super().__call__(inputs, cache, input_embeddings)
            return out + 0.1 * mx.cumsum(out, axis=1)

    model.__class__ = Mixing
    split = models.split_model(model)
    assert not split.fast
    assert "differs from model(x)" in split.reason and "full logits" in split.describe()
    inputs, targets, mask = _batch(models.vocab_size(model))
    ce = nn.losses.cross_entropy(model(inputs), targets) * mask
    ours = _our_loss(model, model_loss_fn(model, LossConfig("sft")), inputs, targets, mask)
    assert float(ours) == pytest.approx(float(ce.sum() / mask.sum()), rel=1e-5)


def _adapted(model) -> set[str]:
    """Block-relative paths of the LoRA/DoRA layers, over every block."""
    return {p for b in model.layers for p, m in b.named_modules() if hasattr(m, "lora_a")}


@pytest.mark.parametrize("model_type", TYPES)
def test_default_lora_targets_cover_every_block_kind(arch_dir, model_type):
    """Keys are gathered over all blocks (hybrid models' linear-attention and convolution
    projections adapted), experts adapted as mlx-lm does, routers frozen."""
    model, _ = _load(arch_dir(model_type))
    every = models.block_linear_paths(model, with_routers=True)
    routers = set().union(*(models.routers(b) for b in model.layers))
    method = adapters.method("lora")
    method.apply(model, method.settings(_cfg(), model))
    assert _adapted(model) == set(every) - routers
    for i, block in enumerate(model.layers):  # each block: all of its own adaptable layers
        own = {p for p, m in block.named_modules() if p and models.is_adaptable(m)}
        own |= {p for p, m in block.named_modules() if hasattr(m, "lora_a")}
        wrapped = {p for p, m in block.named_modules() if hasattr(m, "lora_a")}
        assert wrapped == {p for p in own if p not in routers and not p.endswith(".linear")} - _inner(own), i
    expected = {
        "qwen3_5": {"linear_attn.in_proj_qkv", "linear_attn.out_proj", "self_attn.q_proj"},
        "lfm2": {"conv.in_proj", "conv.out_proj", "self_attn.out_proj"},
        "qwen3_moe": {"mlp.switch_mlp.up_proj"},
        "gpt_oss": {"mlp.experts.down_proj"},
        "gemma4_text": {"self_attn.k_proj", "self_attn.v_proj"},
    }.get(model_type, set())
    assert expected <= _adapted(model)
    assert not routers & _adapted(model)


def _inner(paths: set[str]) -> set[str]:
    """Paths inside an adapter layer (``q_proj.linear``) or holding experts, not layers themselves."""
    return {p for p in paths if any(p.startswith(q + ".") for q in paths)}


def test_lora_keys_are_matched_over_every_block_and_errors_list_them(arch_dir):
    model, _ = _load(arch_dir("qwen3_5"))
    keys = adapters.method("lora").settings(_cfg(lora_keys=["in_proj_qkv"]), model)["lora_parameters"]["keys"]
    assert keys == ["linear_attn.in_proj_qkv"]
    with pytest.raises(mlx_dft.UserError, match=r"no adaptable layer 'nothing'.*linear_attn\.in_proj_qkv"):
        adapters.method("lora").settings(_cfg(lora_keys=["nothing"]), model)


def test_routers_adapted_only_when_asked(arch_dir):
    model, _ = _load(arch_dir("qwen3_moe"))
    method = adapters.method("lora")
    settings = method.settings(_cfg(lora_keys=["mlp.gate", "q_proj"]), model)
    method.apply(model, settings)
    assert _adapted(model) == {"mlp.gate", "self_attn.q_proj"}


def test_dora_leaves_experts_frozen_and_refuses_them_by_name(arch_dir, capsys):
    model, _ = _load(arch_dir("gpt_oss"))
    method = adapters.method("dora")
    method.apply(model, method.settings(_cfg(adapter="dora"), model))
    assert "dora leaves the expert layers" in capsys.readouterr().err
    assert _adapted(model) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    model, _ = _load(arch_dir("gpt_oss"))
    settings = method.settings(_cfg(adapter="dora", lora_keys=["experts.up_proj"]), model)
    with pytest.raises(mlx_dft.UserError, match="dora cannot adapt mlp.experts.up_proj: it is a mixture"):
        method.apply(model, settings)


def test_nested_text_config_is_read_for_the_signature(arch_dir):
    _, config = _load(arch_dir("qwen3_5"))
    sig = models.model_signature(config)
    assert sig["model_type"] == "qwen3_5"
    assert sig["hidden_size"] == 64 and sig["num_hidden_layers"] == 4 and sig["vocab_size"] == 512


def test_asft_reference_pass_compiles_on_gated_delta_models(arch_dir):
    """ASFT's adapter-off pass runs the gated-delta layers a second time inside the compiled step;
    the trainer gives that pass a distinct input array (see the next test)."""
    model, _ = _load(arch_dir("qwen3_5"))
    cfg = _cfg(loss="asft")
    method = adapters.method("lora")
    method.apply(model, method.settings(cfg, model))
    loss_fn, _ = run_loss_fns(model, cfg, method)
    inputs, targets, mask = _batch(512)
    step = mx.compile(lambda: _our_loss(model, loss_fn, inputs, targets, mask), inputs=[model.state])
    assert np.isfinite(float(step()))


def test_stock_mlx_compile_fails_on_a_gated_delta_layer_run_twice_on_one_array(arch_dir):
    """The MLX bug the trainer works around, with stock mlx-lm alone: a compiled function that
    runs a GatedDeltaNet layer twice on the same array fails ("_Map_base::at", MLX 0.32.4). When
    this test fails, MLX has fixed it: the ``+ 0.0`` in ``trainer._policy_and_reference`` can go."""
    from mlx_lm import load

    model, _ = load(str(arch_dir("qwen3_5")))
    layer = model.layers[0].linear_attn
    h = mx.random.normal((1, 8, 64), key=mx.random.key(0))
    mx.eval(mx.compile(lambda x: layer(x) + layer(x + 0.0))(h))  # distinct arrays: fine
    with pytest.raises(Exception, match="_Map_base::at"):
        mx.eval(mx.compile(lambda x: layer(x) + layer(x))(h))


@pytest.mark.parametrize("model_type", TYPES)
def test_plan_describes_the_architecture(arch_dir, model_type):
    from mlx_dft.plan import report

    _, lines = report(TrainConfig(model=str(arch_dir(model_type)), max_seq_length=64))
    layout = lines[1]
    assert "vocabulary 512" in layout and "loss path: hidden states" in layout
    if model_type == "qwen3_5":
        assert "2 linear-attention" in layout and "2 attention" in layout
    if model_type == "lfm2":
        assert "2 convolution" in layout
    if model_type in ("qwen3_moe", "gpt_oss"):
        assert "4 experts a layer" in layout


@pytest.mark.parametrize("model_type", TYPES)
def test_train_runs_and_names_its_loss_path(arch_dir, model_type, arith_data, tmp_path):
    """``mlx_dft train`` on each architecture: SFT warm-up then DFT, validation, a saved adapter
    that loads back onto the model."""
    out = tmp_path / "run"
    r = run_cli(
        "train", "--model", str(arch_dir(model_type)), "--data", str(arith_data), "--iters", "3",
        "--batch-size", "2", "--sft-warmup-steps", "1", "--steps-per-eval", "3", "--val-batches", "1",
        "--max-seq-length", "64", "--output", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "loss path: hidden states" in r.stdout
    model, _ = _load(arch_dir(model_type))
    adapters.load_adapter(model, out)
