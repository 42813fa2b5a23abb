"""The DFT family (every registered loss) and the SFT warm-up: losses and gradients against a
PyTorch reference written from the papers' formulas, chunking, accumulation, the adapter switched
off as the reference model, resume across the warm-up switch, reports, and one-line errors."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

import mlx_dft
from conftest import run_cli
from mlx_dft import adapters
from mlx_dft.config import TrainConfig
from mlx_dft.data import DataConfig, collate, load_split
from mlx_dft.errors import UserError
from mlx_dft.interop.convert import run_summary
from mlx_dft.losses import (
    LOSSES,
    Loss,
    LossConfig,
    chunked_terms,
    loss_from_logits,
    loss_sums,
    make_loss,
    token_columns,
)
from mlx_dft.models import load_model
from mlx_dft.trainer import build_optimizer, make_step, model_loss_fn, optimizer_step, run_loss_fns

FAST = dict(batch_size=4, steps_per_report=1, progress=False)


# ------------------------------------------------------------------ the reference, from the papers


def torch_reference(logits, targets, mask, loss, ref_logits=None, **kw):
    """(mean loss, d loss / d logits, {part: mean}) in float64 PyTorch, written from the formulas
    (../shared/docs/dft.md, the authors' code), with p the target's probability and sg detach:

    sft:   sum_t CE_t / |M|
    dft:   sum_t sg(max(p_t^power, floor)) CE_t / |M|
    asft:  sum_t [sg(max(p_t^power, floor)) CE_t + alpha KL(softmax(r_t) || softmax(z_t))] / |M|
    eaft:  sum_t sg((H_k(z_t) / ln k)^alpha) CE_t / |M|, H_k the entropy of the softmax of the
           k largest logits of z_t
    prift: sum_t w_t CE_t / |M|, q = softmax(r_t): w = q[y] (prob), or w = 1[u >= tau] with
           u = sum_v q_v 1[q_v < q_y] + q_y (mass)
    deft:  sum_t -(p_t^a - 1) / a / |M|, a = sg(sum_v softmax(z_t)_v^2)
    bll:   sum_t keep_t (1 - p_t^alpha) / alpha / |M| (-log p_t at alpha 0), keep_t = 1, or
           1[p_t >= q] (only top), or 1[p_t <= q] (only bottom)
    psft:  sum_t -r_t / |M| with r_t = p_t / sg(p_t) (no previous policy given: the current one;
           tests/test_psft.py tests the clipped ratio to another)
    """
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(targets, dtype=torch.long)
    m = torch.tensor(mask, dtype=torch.float64)
    n = m.sum()
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    ce = -logp.gather(-1, t[..., None])[..., 0]
    p = torch.exp(-ce.detach())
    parts = {}
    if loss in ("dft", "asft"):
        w = torch.clamp(p ** kw.get("power", 1.0), min=kw.get("floor", 0.0))
        dft = (w * ce * m).sum()
        value = dft / n
        if loss == "asft":
            r = torch.softmax(torch.tensor(ref_logits, dtype=torch.float64), dim=-1)
            kl = ((r * (torch.log(r) - logp)).sum(-1) * m).sum()
            value = (dft + kw.get("alpha", 0.1) * kl) / n
            parts = {"dft": (dft / n).item(), "kl": (kl / n).item()}
    elif loss == "eaft":
        k = kw.get("k", 20)
        top = torch.topk(z.detach(), k, dim=-1).values
        q = torch.softmax(top, dim=-1)
        entropy = -(q * torch.log(q)).sum(-1)
        w = (entropy / math.log(k)) ** kw.get("alpha", 1.0)
        value = (w * ce * m).sum() / n
        parts = {"eaft_weight": ((w * m).sum() / n).item()}
    elif loss == "prift":
        q = torch.softmax(torch.tensor(ref_logits, dtype=torch.float64), dim=-1)
        qy = q.gather(-1, t[..., None])[..., 0]
        if kw.get("weight", "prob") == "prob":
            w = qy
        else:
            u = (q * (q < qy[..., None])).sum(-1) + qy
            w = (u >= kw.get("tau", 0.5)).double()
        value = (w * ce * m).sum() / n
        parts = {"prift_weight": ((w * m).sum() / n).item()}
    elif loss == "deft":
        a = (torch.softmax(z.detach(), dim=-1) ** 2).sum(-1)
        value = (-(torch.exp(-ce) ** a - 1) / a * m).sum() / n
        parts = {"deft_alpha": ((a * m).sum() / n).item()}
    elif loss == "bll":
        alpha, only, q = kw.get("alpha", 1.0), kw.get("only", "all"), kw.get("threshold", 0.5)
        f = ce if alpha == 0 else (1 - torch.exp(-ce) ** alpha) / alpha
        keep = torch.ones_like(p) if only == "all" else ((p >= q) if only == "top" else (p <= q)).double()
        value = (keep * f * m).sum() / n
        parts = {"bll_kept": ((keep * m).sum() / n).item()}
    elif loss == "psft":
        r = torch.exp(ce.detach() - ce)
        value = (-r * m).sum() / n
        parts = {"psft_ratio": 1.0, "psft_clipped": 0.0}
    else:
        value = (ce * m).sum() / n
    value.backward()
    return value.item(), z.grad.numpy(), parts


def random_case(seed, shape=(3, 7, 30), spread=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * spread).astype(np.float32)
    ref = (logits + rng.normal(size=shape) * 1.5).astype(np.float32)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    mask = (rng.random(shape[:-1]) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0
    return logits, ref, targets, mask


CASES = {
    "sft": [{}],
    "dft": [{}, dict(floor=0.1, power=2.0)],
    "asft": [dict(alpha=0.1), dict(alpha=1.0), dict(alpha=0.0), dict(alpha=0.5, floor=0.1, power=2.0)],
    "eaft": [dict(k=20, alpha=1.0), dict(k=2, alpha=1.0), dict(k=5, alpha=0.5), dict(k=30, alpha=2.0)],
    "prift": [dict(weight="prob"), dict(weight="mass", tau=0.5), dict(weight="mass", tau=0.9)],
    "deft": [{}],
    "bll": [dict(alpha=1.0), dict(alpha=0.0), dict(alpha=10.0), dict(alpha=1.0, only="top", threshold=0.02),
            dict(alpha=0.5, only="bottom", threshold=0.1)],
    "psft": [{}],
}  # fmt: skip
ALL_CASES = [(loss, kw) for loss, cases in CASES.items() for kw in cases]
# the reference's keyword -> the loss's option
OPTION = {
    "alpha": "{loss}_alpha", "floor": "dft_floor", "power": "dft_power", "k": "eaft_top_k",
    "weight": "prift_weight", "tau": "prift_tau", "only": "bll_only", "threshold": "bll_threshold",
}  # fmt: skip


def mlx_cfg(loss, kw) -> Loss:
    return make_loss(loss, **{OPTION[k].format(loss=loss): v for k, v in kw.items()})


def test_every_registered_loss_has_a_reference_here():
    assert set(CASES) == set(LOSSES)


@pytest.mark.parametrize("loss,kw", ALL_CASES, ids=str)
def test_value_gradient_and_parts_match_torch(loss, kw):
    logits, ref, targets, mask = random_case(0)
    cfg = mlx_cfg(loss, kw)
    want, want_grad, want_parts = torch_reference(logits, targets, mask, loss, ref, **kw)
    r = mx.array(ref) if cfg.needs_reference else None

    def f(z):
        return loss_from_logits(z, mx.array(targets), mx.array(mask), cfg, r)[0]

    value, metrics = loss_from_logits(mx.array(logits), mx.array(targets), mx.array(mask), cfg, r)
    grad = np.array(mx.grad(f)(mx.array(logits)))
    np.testing.assert_allclose(value.item(), want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    assert set(metrics) >= set(cfg.parts) and tuple(cfg.parts) == tuple(want_parts)
    for name, v in want_parts.items():
        np.testing.assert_allclose(metrics[name].item(), v, rtol=1e-5)
    assert np.abs(grad[mask == 0]).max() == 0  # masked positions get no gradient


def test_asft_is_dft_plus_alpha_kl_and_kl_of_identical_logits_is_zero():
    logits, ref, targets, mask = random_case(1)
    args = (mx.array(targets), mx.array(mask))
    dft, _ = loss_from_logits(mx.array(logits), *args, LossConfig("dft"))
    asft0, parts = loss_from_logits(
        mx.array(logits), *args, LossConfig("asft", asft_alpha=0.0), mx.array(ref)
    )
    np.testing.assert_allclose(asft0.item(), dft.item(), rtol=1e-6)
    assert parts["kl"].item() > 0.1
    same = loss_from_logits(mx.array(logits), *args, LossConfig("asft"), mx.array(logits))[1]
    assert same["kl"].item() == 0.0


def test_eaft_weight_is_one_for_a_flat_top_k_and_falls_with_confidence():
    v = 50
    flat = np.zeros((1, v), np.float32)
    flat[0, :20] = 5.0  # the 20 largest logits are equal: H_k = ln k
    peaked = flat.copy()
    peaked[0, 0] = 15.0
    cfg = LossConfig("eaft")
    w = [token_columns(mx.array(z), mx.array([0]), cfg)[0, 2].item() for z in (flat, peaked)]
    np.testing.assert_allclose(w[0], 1.0, rtol=1e-6)
    assert w[1] < 0.01


def test_bll_trains_as_dft_with_the_same_power_and_deft_between_nll_and_dft():
    """"Beyond Log Likelihood"'s (1 - p^a) / a has --dft-power a's gradient (its value differs);
    DEFT's gradient is p^a times the NLL's, with a = sum_v p_v^2: 1/V for a flat distribution."""
    logits, _, targets, mask = random_case(4)
    args = (mx.array(targets), mx.array(mask))

    def grad(loss, **options):
        return np.array(mx.grad(lambda z: loss_from_logits(z, *args, make_loss(loss, **options))[0])(
            mx.array(logits)))  # fmt: skip

    for a in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(grad("bll", bll_alpha=a), grad("dft", dft_power=a), atol=1e-7)
    v = 1000
    flat = mx.zeros((1, 4, v))
    t, ones = mx.zeros((1, 4), mx.int32), mx.ones((1, 4))
    deft, sft = (
        mx.grad(lambda z, k=k: loss_from_logits(z, t, ones, make_loss(k))[0])(flat) for k in ("deft", "sft")
    )
    np.testing.assert_allclose(np.array(deft), (1 / v) ** (1 / v) * np.array(sft), rtol=1e-5)


@pytest.mark.parametrize("loss,kw", [(k, c[-1]) for k, c in CASES.items()], ids=str)
@pytest.mark.parametrize("chunk", [0, 5, 16])
def test_chunked_terms_match_full_logits(loss, kw, chunk):
    """From hidden states in chunks (checkpointed, reference logits chunked alongside) == from the
    full logits, in value and in gradient w.r.t. the hidden states and a trainable head."""
    rng = np.random.default_rng(3)
    n, d, v = 37, 8, 50
    h = mx.array(rng.normal(size=(n, d)).astype(np.float32))
    ref_h = mx.array(rng.normal(size=(n, d)).astype(np.float32))
    t = mx.array(rng.integers(0, v, size=n))
    valid = mx.array((rng.random(n) < 0.8).astype(np.float32))
    cfg = mlx_cfg(loss, {**kw, "k": 7} if loss == "eaft" else kw)
    mx.random.seed(0)
    head = nn.Linear(d, v, bias=True)
    r = ref_h if cfg.needs_reference else None

    def via_chunks(head, h):
        return loss_sums(chunked_terms(head, h, t, chunk, cfg, r), valid).objective

    def via_logits(head, h):
        ref_logits = head(r) if r is not None else None
        return loss_sums(token_columns(head(h), t, cfg, ref_logits), valid).objective

    v1, g1 = nn.value_and_grad(head, via_chunks)(head, h)
    v2, g2 = nn.value_and_grad(head, via_logits)(head, h)
    np.testing.assert_allclose(v1.item(), v2.item(), rtol=1e-5)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(np.array(g1[k]), np.array(g2[k]), atol=1e-5)
    gh1 = mx.grad(lambda h: via_chunks(head, h))(h)
    gh2 = mx.grad(lambda h: via_logits(head, h))(h)
    np.testing.assert_allclose(np.array(gh1), np.array(gh2), atol=1e-5)


@pytest.mark.parametrize("loss,kw", [(k, c[-1]) for k, c in CASES.items()], ids=str)
def test_accumulated_sums_equal_one_big_batch_at_the_logits(loss, kw):
    """1, 2 or 3 micro-batches of unequal token counts: their summed loss over the total count
    gives the big-batch loss and gradient of the reference."""
    logits, ref, targets, mask = random_case(2, shape=(6, 5, 13))
    mask[3:, 2:] = 0
    kw = {**kw, "k": 6} if loss == "eaft" else kw
    cfg = mlx_cfg(loss, kw)
    want, want_grad, _ = torch_reference(logits, targets, mask, loss, ref, **kw)
    for split in ([slice(0, 6)], [slice(0, 3), slice(3, 6)], [slice(0, 1), slice(1, 4), slice(4, 6)]):

        def accumulated(z, split=split):
            total = n = 0.0
            for sl in split:
                r = mx.array(ref[sl]).reshape(-1, 13) if cfg.needs_reference else None
                cols = token_columns(z[sl].reshape(-1, 13), mx.array(targets[sl]).reshape(-1), cfg, r)
                sums = loss_sums(cols, mx.array(mask[sl]).reshape(-1))
                total, n = total + sums.objective, n + sums.tokens
            return total / n

        z = mx.array(logits)
        np.testing.assert_allclose(accumulated(z).item(), want, rtol=1e-5)
        np.testing.assert_allclose(np.array(mx.grad(accumulated)(z)), want_grad, atol=1e-6)


# ------------------------------------------------------------------ on a model


def _tok(path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path)


def _adapted(path, adapter, first=0):
    """A model with ``adapter`` applied through its method from block ``first`` of the fixture's two
    blocks on, and the method's switch."""
    mx.random.seed(0)
    model, *_ = load_model(str(path), keep_quantized=True)
    method = adapters.method(adapter)
    cfg = TrainConfig(adapter=adapter, num_layers=2 - first, aligner_start_layer=first)
    method.apply(model, method.settings(cfg, model))
    return model, method.adapter_off(model, copy_weights=True)


def _batches(data, path, groups):
    ds = load_split(data / "train.jsonl", "train", _tok(path), DataConfig())
    return [collate([ds.tokens[i] for i in g], [ds.supervised[i] for i in g]) for g in groups]


def _perturb_lora_b(model, seed=1):
    rng = np.random.default_rng(seed)
    model.update(
        tree_map(
            lambda x: mx.array(rng.normal(size=x.shape).astype(np.float32) * 0.02),
            model.trainable_parameters(),
        )
    )


@pytest.mark.parametrize("loss", ["asft", "eaft"])
def test_accumulation_equals_one_big_batch_in_the_trainer(tiny_model, arith_data, loss):
    """One compiled optimizer step over 1, 2 or 3 micro-batches (unequal token counts) gives the
    same update, with the ASFT reference forward inside the compiled step."""
    idx = list(range(6))
    results = []
    for groups in ([idx], [idx[:3], idx[3:]], [idx[:2], idx[2:4], idx[4:]]):
        model, off = _adapted(tiny_model, "lora", first=1)
        assert off.first_layer == 1
        _perturb_lora_b(model)  # B != 0: the KL and its gradient are not zero
        loss_fn = model_loss_fn(model, LossConfig(loss, eaft_top_k=5), 16, off)
        opt = build_optimizer("sgd", 1e-2, "constant", 0, 10, weight_decay=0.0)
        step, state = make_step(model, opt, loss_fn, max_grad_norm=0.0)
        sums, _ = optimizer_step(step, state, _batches(arith_data, tiny_model, groups))
        results.append((np.array(sums), dict(tree_flatten(model.trainable_parameters()))))
    (sums0, params0), *others = results
    assert sums0[4] > 0  # the KL / the EAFT weight
    for sums, params in others:
        np.testing.assert_allclose(sums, sums0, rtol=1e-5)
        for k in params0:
            np.testing.assert_allclose(np.array(params[k]), np.array(params0[k]), atol=1e-6)


def _logits(model, inputs):
    return np.array(model(inputs).astype(mx.float32))


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("adapter", ["lora", "dora", "qlora", "aligner", "full"])
def test_adapter_off_is_the_base_model_after_training(
    tiny_model, tiny_model_4bit, arith_data, adapter, first
):
    """After a few ASFT steps (DoRA's m != |W|, Aligner gates != 0), the model inside the switch
    computes what the base model loaded on its own computes, and the compiled loss's KL term is
    KL(base || model) computed from the two models' logits (with ``first`` = 1, its reference pass
    starts from the adapted pass's input of block 1)."""
    path = tiny_model_4bit if adapter == "qlora" else tiny_model
    method = "lora" if adapter == "qlora" else adapter
    model, off = _adapted(path, method, first)
    assert off.first_layer == first
    loss_fn = model_loss_fn(model, LossConfig("asft", asft_alpha=1.0), 16, off)
    opt = build_optimizer("adam", 2e-2 if method != "full" else 2e-3, "constant", 0, 10)
    step, state = make_step(model, opt, loss_fn)
    batches = _batches(arith_data, path, [[0, 1], [2, 3], [4, 5], [6, 7]])
    for b in batches[:3]:
        optimizer_step(step, state, [b])
    base, *_ = load_model(str(path), keep_quantized=True)
    inputs = batches[3].inputs
    want = _logits(base, inputs)
    with off():
        got = _logits(model, inputs)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    adapted = _logits(model, inputs)  # switched back on
    assert np.abs(adapted - want).max() > 1e-3
    if method == "dora":
        dora = model.layers[-1].self_attn.q_proj
        assert float(mx.abs(dora.m - mx.linalg.norm(dora.linear.weight, axis=1)).max()) > 1e-3
    if method == "aligner":
        assert float(mx.abs(model.layers[1].self_attn.aligner_gate).max()) > 1e-3

    # The KL part of the compiled loss is KL(base || adapted) at the supervised positions.
    b = batches[3]
    compiled = mx.compile(lambda *a: loss_fn(model, *a).stacked(), inputs=[model.state, loss_fn.state])
    sums = compiled(*b.arrays())
    pos, valid = np.array(b.positions), np.array(b.valid)
    z = adapted.reshape(-1, adapted.shape[-1])[pos].astype(np.float64)
    r = want.reshape(-1, want.shape[-1])[pos].astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    logr = r - np.log(np.exp(r - r.max(-1, keepdims=True)).sum(-1, keepdims=True)) - r.max(-1, keepdims=True)
    kl = (np.exp(logr) * (logr - logp)).sum(-1)
    np.testing.assert_allclose(
        float(sums[5]) / float(sums[3]), (kl * valid).sum() / valid.sum(), rtol=1e-4, atol=1e-7
    )


def test_the_warmup_loss_is_sft_and_the_run_loss_asft(tiny_model, arith_data):
    """The run's two loss functions on a model, against the reference on its logits (and on the
    separately loaded base model's for the KL)."""
    model, _ = _adapted(tiny_model, "lora", first=1)
    _perturb_lora_b(model)
    method = adapters.method("lora")
    assert run_loss_fns(model, TrainConfig(loss="asft"), method)[1] is None
    main, warmup = run_loss_fns(model, TrainConfig(loss="asft", asft_alpha=0.3, sft_warmup_steps=2), method)
    b = _batches(arith_data, tiny_model, [[0, 1, 2]])[0]
    pos, valid, targets = np.array(b.positions), np.array(b.valid), np.array(b.targets)
    base, *_ = load_model(str(tiny_model))
    z = _logits(model, b.inputs).reshape(-1, 512)[pos]
    r = _logits(base, b.inputs).reshape(-1, 512)[pos]
    for fn, loss in ((warmup, "sft"), (main, "asft")):
        sums = np.array(fn(model, *b.arrays()).stacked())
        want, _, parts = torch_reference(z, targets, valid, loss, r, alpha=0.3)
        np.testing.assert_allclose(sums[0] / sums[3], want, rtol=1e-5)
        assert len(sums) == 4 + len(parts) and fn.parts == tuple(parts)
        for i, v in enumerate(parts.values()):
            np.testing.assert_allclose(sums[4 + i] / sums[3], v, rtol=1e-4)


def test_full_fine_tuning_needs_the_explicit_copy(tiny_model):
    model, *_ = load_model(str(tiny_model))
    method = adapters.method("full")
    method.apply(model, method.settings(TrainConfig(adapter="full", num_layers=1), model))
    with pytest.raises(UserError, match="--reference-copy"):
        method.adapter_off(model)


def test_fresh_lora_kl_is_exactly_zero(tiny_model, arith_data, tmp_path, capsys):
    """At step 0 (B = 0) the adapted model is the base model: the KL is exactly 0. Reports carry
    the DFT and KL parts, in metrics.jsonl and in the printed line."""
    run = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(tmp_path / "r"),
        loss="asft",
        asft_alpha=0.5,
        iters=2,
        steps_per_eval=2,
        lora_dropout=0.1,
        **FAST,
    )
    recs = [json.loads(x) for x in (run.output / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    train = [r for r in recs if "train_loss" in r]
    assert val[0]["step"] == 0 and val[0]["val_kl"] == 0.0
    assert train[0]["step"] == 1 and train[0]["train_kl"] == 0.0  # step 1's forward pass: B = 0
    assert val[0]["val_loss"] == pytest.approx(val[0]["val_dft"], rel=1e-6)
    assert val[1]["val_kl"] > 0
    for r in train + val[1:]:
        pre = "train_" if "train_loss" in r else "val_"
        assert r[pre + "loss"] == pytest.approx(r[pre + "dft"] + 0.5 * r[pre + "kl"], rel=1e-5)
    out = capsys.readouterr().out
    train_line = next(line for line in out.splitlines() if line.startswith("step 2 | loss "))
    val_line = next(line for line in out.splitlines() if line.startswith("step 2 | val loss "))
    assert "| dft " in train_line and "| kl " in train_line and len(train_line) <= 80, train_line
    assert "| dft " in val_line and "| kl " in val_line, val_line
    cfg = json.loads((run.output / "adapter_config.json").read_text())
    assert cfg["training"]["loss"] == "asft" and cfg["training"]["asft_alpha"] == 0.5
    card = run_summary(run.output, cfg)["training"]
    assert card["loss"] == "asft" and card["asft_alpha"] == 0.5 and "sft_warmup_steps" in card


def weights(folder):
    return mx.load(str(folder / "adapters.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=atol, rtol=0)


@pytest.mark.slow
def test_sft_warmup_switches_and_resume_crosses_the_switch(tiny_model, arith_data, tmp_path):
    """Steps 1..N are plain SFT, then EAFT: a run resumed before or after the switch ends with the
    weights of the uninterrupted run; the warm-up steps equal an SFT run's, and the steps after
    them equal an SFT run's checkpoint continued with EAFT."""
    common = dict(
        model=str(tiny_model),
        data=str(arith_data),
        iters=6,
        save_every=2,
        lora_dropout=0.1,
        grad_accumulation_steps=2,
        steps_per_eval=3,
        **FAST,
    )
    mlx_dft.train(output=str(tmp_path / "straight"), loss="eaft", eaft_top_k=5, sft_warmup_steps=3, **common)
    ck = tmp_path / "straight" / "checkpoints"
    for at in ("step-0000002", "step-0000004"):  # before and after the switch at step 3
        resumed = mlx_dft.train(resume=str(ck / at), output=str(tmp_path / f"from-{at}"), progress=False)
        assert resumed.step == 6
        assert_same_weights(tmp_path / "straight", tmp_path / f"from-{at}")

    recs = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in recs if "train_loss" in r}
    for s in (1, 2, 3):  # SFT: the objective is the cross-entropy, and no EAFT part is computed
        assert train[s]["train_loss"] == pytest.approx(train[s]["train_ce"], rel=1e-6)
        assert "train_eaft_weight" not in train[s]
    for s in (4, 5, 6):
        assert 0 < train[s]["train_eaft_weight"] < 1 and train[s]["train_loss"] < train[s]["train_ce"]
    assert all("val_eaft_weight" in r for r in recs if "val_loss" in r)  # validation: always EAFT

    sft = mlx_dft.train(output=str(tmp_path / "sft"), loss="sft", **common)
    assert_same_weights(
        tmp_path / "straight" / "checkpoints" / "step-0000002", sft.output / "checkpoints" / "step-0000002"
    )
    assert not np.allclose(
        np.array(weights(tmp_path / "straight")["model.layers.1.mlp.down_proj.lora_b"]),
        np.array(weights(sft.output)["model.layers.1.mlp.down_proj.lora_b"]),
        atol=1e-6,
    )
    # An SFT run's state after step 3, continued with EAFT: the warm-up run.
    mlx_dft.train(output=str(tmp_path / "sft4"), loss="sft", **{**common, "save_every": 3})
    cont = mlx_dft.train(
        resume=str(tmp_path / "sft4" / "checkpoints" / "step-0000003"),
        output=str(tmp_path / "cont"),
        loss="eaft",
        eaft_top_k=5,
        progress=False,
    )
    assert cont.step == 6
    assert_same_weights(tmp_path / "straight", tmp_path / "cont")


def test_full_asft_resumes_against_the_initial_weights(tiny_model, arith_data, tmp_path):
    """Full fine-tuning's reference is the weights before training, also in a resumed run (the copy
    is taken before the checkpoint's weights load)."""
    common = dict(
        model=str(tiny_model),
        data=str(arith_data),
        loss="asft",
        asft_alpha=1.0,
        adapter="full",
        reference_copy=True,
        num_layers=1,
        learning_rate=1e-3,
        iters=4,
        save_every=2,
        **FAST,
    )
    mlx_dft.train(output=str(tmp_path / "straight"), **common)
    ck = tmp_path / "straight" / "checkpoints" / "step-0000002"
    mlx_dft.train(resume=str(ck), output=str(tmp_path / "resumed"), progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


ARGS = ["--iters", 3, "--batch-size", 4]


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--loss", "asft", "--asft-alpha", "-0.1"], ["--asft-alpha must be >= 0"]),
        (["--loss", "eaft", "--eaft-top-k", "1"], ["--eaft-top-k must be at least 2"]),
        (["--loss", "eaft", "--eaft-top-k", "513"], ["--eaft-top-k 513 is above the vocabulary size (512)"]),
        (["--loss", "eaft", "--eaft-alpha", "-1"], ["--eaft-alpha must be >= 0"]),
        (["--sft-warmup-steps", "-1"], ["--sft-warmup-steps must be >= 0"]),
        (["--sft-warmup-steps", "3"], ["--sft-warmup-steps 3 must be below the run's 3 steps"]),
        (["--loss", "sft", "--sft-warmup-steps", "1"], ["--sft-warmup-steps", "--loss sft"]),
        (["--loss", "asft", "--fine-tune-type", "full"], ["--reference-copy", "doubles their memory"]),
        (["--loss", "prift", "--fine-tune-type", "full"], ["--reference-copy", "doubles their memory"]),
        (["--loss", "prift", "--prift-tau", "1.5"], ["--prift-tau must be in [0, 1], got 1.5"]),
        (["--loss", "bll", "--bll-alpha", "-1"], ["--bll-alpha must be >= 0"]),
        (["--loss", "dft", "--prift-tau", "0.3"], ["--prift-tau applies to --loss prift only"]),
        (["--loss", "deft", "--dft-floor", "0.1"], ["--dft-floor applies to --loss dft only"]),
        (["--loss", "dft", "--reference-copy"], ["--reference-copy applies to losses with a reference"]),
        (["--loss", "prift", "--prift-tau", "0.3"], ["--prift-tau applies to --prift-weight mass only"]),
        (["--loss", "bll", "--bll-threshold", "0.3"], ["--bll-threshold applies to --bll-only top/bottom"]),
        (["--loss", "psft", "--psft-minibatches", "0"], ["--psft-minibatches must be at least 1, got 0"]),
        (["--loss", "dft", "--psft-minibatches", "4"], ["--psft-minibatches applies to --loss psft only"]),
        (["--loss", "psft", "--psft-epsilon-high", "-0.1"], ["--psft-epsilon-high must be >= 0"]),
        (["--loss", "psft", "--psft-epsilon-low", "1"], ["--psft-epsilon-low must be in [0, 1)"]),
    ],
    ids=[
        "asft-alpha",
        "top-k-low",
        "top-k-vocab",
        "eaft-alpha",
        "warmup-neg",
        "warmup-long",
        "warmup-sft",
        "full",
        "prift-full",
        "prift-tau",
        "bll-alpha",
        "other-loss-option",
        "borrowed-by-another",
        "reference-copy",
        "prift-tau-with-prob",
        "bll-threshold-with-all",
        "psft-minibatches-0",
        "psft-with-other-loss",
        "psft-epsilon-high",
        "psft-epsilon-low",
    ],  # fmt: skip
)
def test_bad_loss_options_are_one_line_errors(tiny_model, arith_data, tmp_path, extra, needles):
    from test_cli import assert_one_line_error

    out = tmp_path / "o"
    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--output", out, *ARGS, *extra)
    assert_one_line_error(p, *needles)
    assert not (out / "adapter_config.json").exists()


def test_warmup_beyond_an_epoch_run_is_refused(tiny_model, arith_data, tmp_path):
    # 48 examples, batch 4: a one-epoch run is 12 steps (known only once the data is read)
    with pytest.raises(UserError, match="below the run's 12 steps"):
        mlx_dft.train(
            model=str(tiny_model),
            data=str(arith_data),
            output=str(tmp_path / "o"),
            sft_warmup_steps=12,
            **FAST,
        )
    assert not (tmp_path / "o").exists()
