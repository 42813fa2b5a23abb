"""The DFT/SFT loss against an independent numpy reference of the formula."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dft.losses import LossConfig, chunked_ce, columns_of, loss_from_logits, loss_sums


def np_reference(logits, targets, mask, loss="dft", floor=0.0, power=1.0):
    """(loss, mean ce, mean p, d loss / d logits) written from the paper's equations."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp_t = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ce, p = -lp_t, np.exp(lp_t)
    w = np.ones_like(p) if loss == "sft" else np.maximum(p**power, floor)
    n = mask.sum()
    value = (w * ce * mask).sum() / n
    onehot = np.eye(logits.shape[-1])[targets]
    grad = (w * mask / n)[..., None] * (np.exp(logp) - onehot)  # w is a constant: no d w / d z
    return value, (ce * mask).sum() / n, (p * mask).sum() / n, grad


CASES = [("sft", 0.0, 1.0), ("dft", 0.0, 1.0), ("dft", 0.1, 1.0), ("dft", 0.0, 2.0), ("dft", 0.2, 0.5)]


@pytest.mark.parametrize("loss,floor,power", CASES)
def test_loss_and_gradient_match_numpy(loss, floor, power):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 7))
    mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
    cfg = LossConfig(loss, dft_floor=floor, dft_power=power)
    ref, ref_ce, ref_p, ref_grad = np_reference(logits, targets, mask, loss, floor, power)

    def f(z):
        return loss_from_logits(z, mx.array(targets), mx.array(mask), cfg)[0]

    value, metrics = loss_from_logits(mx.array(logits), mx.array(targets), mx.array(mask), cfg)
    grad = mx.grad(f)(mx.array(logits))
    np.testing.assert_allclose(value.item(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce"].item(), ref_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["prob"].item(), ref_p, rtol=1e-5)
    np.testing.assert_allclose(np.array(grad), ref_grad, atol=1e-6)
    # masked positions get no gradient at all
    assert np.abs(np.array(grad)[mask == 0]).max() == 0


def test_dft_gradient_is_minus_grad_p():
    """d/dz [sg(p) * CE] = -d p / d z: the paper's statement of the DFT gradient."""
    z = mx.array(np.random.default_rng(1).normal(size=(5, 9)).astype(np.float32))
    t = mx.array([1, 4, 0, 8, 2])
    ones = mx.ones((5,))
    g_dft = mx.grad(lambda z: loss_from_logits(z, t, ones, LossConfig("dft"))[0] * 5)(z)
    g_p = mx.grad(lambda z: -mx.exp(-nn.losses.cross_entropy(z, t)).sum())(z)
    np.testing.assert_allclose(np.array(g_dft), np.array(g_p), atol=1e-6)


def test_accumulated_sums_equal_one_big_batch():
    """Two micro-batches with different token counts: sum of their loss sums over the total
    count gives the big-batch loss and gradient; averaging per-micro-batch means does not."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6, 13)).astype(np.float32) * 2
    targets = rng.integers(0, 13, size=(4, 6))
    mask = np.ones((4, 6), np.float32)
    mask[2:, 2:] = 0  # second micro-batch has fewer supervised tokens
    cfg = LossConfig("dft")
    ref, _, _, ref_grad = np_reference(logits, targets, mask)

    def accumulated(z):
        total, n = 0.0, 0.0
        for sl in (slice(0, 2), slice(2, 4)):
            cols = columns_of(ce_of(z[sl], targets[sl]).reshape(-1), cfg)
            obj, _, _, cnt, _ = loss_sums(cols, mx.array(mask[sl]).reshape(-1))
            total, n = total + obj, n + cnt
        return total / n

    def naive(z):  # mean of per-micro-batch means (what the official DFT code does)
        return (
            sum(
                loss_from_logits(z[sl], mx.array(targets[sl]), mx.array(mask[sl]), cfg)[0]
                for sl in (slice(0, 2), slice(2, 4))
            )
            / 2
        )

    z = mx.array(logits)
    np.testing.assert_allclose(accumulated(z).item(), ref, rtol=1e-5)
    np.testing.assert_allclose(np.array(mx.grad(accumulated)(z)), ref_grad, atol=1e-6)
    assert not np.allclose(np.array(mx.grad(naive)(z)), ref_grad, atol=1e-4)


def ce_of(z, targets):
    return nn.losses.cross_entropy(z, mx.array(targets), reduction="none")


@pytest.mark.parametrize("chunk", [0, 5, 16, 64])
def test_chunked_ce_matches_full_logits(chunk):
    """Chunked (checkpointed) per-token CE from hidden states == CE of the full logits, in value
    and in gradient w.r.t. the hidden states and a trainable head."""
    rng = np.random.default_rng(3)
    n, d, v = 37, 8, 50
    h = mx.array(rng.normal(size=(n, d)).astype(np.float32))
    t = mx.array(rng.integers(0, v, size=n))
    w = mx.array(rng.random(n).astype(np.float32))
    mx.random.seed(0)
    head = nn.Linear(d, v, bias=True)

    def via_chunks(head, h):
        return (chunked_ce(head, h, t, chunk) * w).sum()

    def via_logits(head, h):
        return (nn.losses.cross_entropy(head(h), t, reduction="none") * w).sum()

    for fn in (via_chunks, via_logits):
        fn.value_and_grad = nn.value_and_grad(head, fn)
    v1, g1 = via_chunks.value_and_grad(head, h)
    v2, g2 = via_logits.value_and_grad(head, h)
    np.testing.assert_allclose(v1.item(), v2.item(), rtol=1e-5)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(np.array(g1[k]), np.array(g2[k]), atol=1e-5)
    gh1 = mx.grad(lambda h: via_chunks(head, h))(h)
    gh2 = mx.grad(lambda h: via_logits(head, h))(h)
    np.testing.assert_allclose(np.array(gh1), np.array(gh2), atol=1e-5)


def test_invalid_loss_settings():
    with pytest.raises(ValueError):
        LossConfig("ppo")
    with pytest.raises(ValueError):
        LossConfig("dft", dft_floor=1.5)
    with pytest.raises(ValueError):
        LossConfig("dft", dft_power=0)


@pytest.mark.parametrize("loss", ["sft", "dft"])
def test_the_fused_cross_entropy_path_matches_ours_and_numpy(loss, monkeypatch):
    """mx.fast.cross_entropy (fused on Metal/CUDA; here its CPU fallback) inside the chunked loss:
    the same values and gradients as the unfused path and as the numpy reference."""
    from mlx_dft import losses
    from mlx_dft.losses import compute

    rng = np.random.default_rng(3)
    n, c, v = 37, 16, 301
    w = mx.array(rng.normal(size=(c, v)).astype(np.float32) * 0.5)
    hidden = mx.array(rng.normal(size=(n, c)).astype(np.float32))
    targets = mx.array(rng.integers(0, v, size=(n,)))
    valid = mx.array((rng.random(n) < 0.8).astype(np.float32))
    cfg = LossConfig(loss)

    def objective(h):
        return loss_sums(losses.chunked_terms(lambda x: x @ w, h, targets, 8, cfg), valid).objective

    results = {}
    for fused in (False, True):
        monkeypatch.setattr(compute, "fused_cross_entropy_available", lambda fused=fused: fused)
        value, grad = mx.value_and_grad(objective)(hidden)
        results[fused] = (value.item(), np.array(grad))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    np.testing.assert_allclose(results[True][1], results[False][1], atol=1e-6)
    logits = np.array(hidden) @ np.array(w)
    ref, *_ = np_reference(logits, np.array(targets), np.array(valid), loss)
    assert results[True][0] / float(np.array(valid).sum()) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(
        np.array(losses.target_ce(mx.array(logits), targets, fused=True)),
        np.array(losses.target_ce(mx.array(logits), targets, fused=False)),
        atol=1e-5,
    )


@pytest.mark.parametrize("loss,floor,power", CASES)
@pytest.mark.parametrize("chunk", [0, 8])
def test_kept_softmax_path_matches_numpy(loss, floor, power, chunk):
    """SFT/DFT under a frozen head on the CPU: the loss keeps the forward pass's softmax and
    differentiates by hand (one exponential per logit); value and gradient w.r.t. the hidden
    states equal the numpy reference's, whole and in chunks (never checkpointed)."""
    from mlx_dft import losses

    rng = np.random.default_rng(5)
    n, d, v = 29, 12, 53
    h = rng.normal(size=(n, d)).astype(np.float32)
    targets = rng.integers(0, v, size=n)
    valid = (rng.random(n) < 0.7).astype(np.float32)
    mx.random.seed(1)
    head = nn.Linear(d, v, bias=True)
    head.freeze()
    cfg = LossConfig(loss, dft_floor=floor, dft_power=power)
    assert losses.keeps_softmax(head, cfg)

    def objective(x):
        cols = losses.chunked_terms(head, x, mx.array(targets), chunk, cfg)
        return loss_sums(cols, mx.array(valid)).objective / float(valid.sum())

    value, grad = mx.value_and_grad(objective)(mx.array(h))
    logits = h @ np.array(head.weight).T + np.array(head.bias)
    ref, _, _, ref_grad = np_reference(logits, targets, valid, loss, floor, power)
    np.testing.assert_allclose(value.item(), ref, rtol=1e-5)
    np.testing.assert_allclose(np.array(grad), ref_grad @ np.array(head.weight), atol=1e-6)


def test_kept_softmax_path_only_where_it_is_exact():
    """Only for losses of the cross-entropy alone (SFT, DFT, "Beyond Log Likelihood"); not for a
    head that trains (its gradient would be lost), not for losses that need the logits themselves
    (ASFT, EAFT, PriFT, DEFT), not where MLX fuses the cross-entropy (GPUs)."""
    from mlx_dft import losses

    head = nn.Linear(4, 9)
    assert not losses.keeps_softmax(head, LossConfig("dft"))
    head.freeze()
    assert losses.keeps_softmax(head, LossConfig("sft"))
    assert losses.keeps_softmax(lambda x: x, LossConfig("dft"))
    assert not losses.keeps_softmax(head, LossConfig("asft"))
    assert not losses.keeps_softmax(head, LossConfig("eaft"))
    assert losses.keeps_softmax(head, LossConfig("bll"))
    assert not any(losses.keeps_softmax(head, LossConfig(k)) for k in ("prift", "deft"))
    keep = losses.keep_tokens(head, LossConfig("dft"), 151_936)
    assert 0 < keep * 151_936 <= losses.DEFAULT_KEEP_ELEMENTS
    assert losses.keep_tokens(head, LossConfig("asft"), 151_936) == 0


def test_kept_softmax_half_precision_head():
    """A bfloat16 head: the kept path's float32 CE and gradient equal autodiff's."""
    from mlx_dft import losses

    rng = np.random.default_rng(6)
    h = mx.array(rng.normal(size=(17, 16)).astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.integers(0, 40, size=17))
    head = nn.Linear(16, 40, bias=False)
    head.set_dtype(mx.bfloat16)
    head.freeze()
    kept = losses.kept_softmax_ce(head)
    ref = lambda x: losses.target_ce(head(x), t, fused=False).sum()  # noqa: E731
    (a, ga), (b, gb) = mx.value_and_grad(ref)(h), mx.value_and_grad(lambda x: kept(x, t).sum())(h)
    assert b.dtype == mx.float32
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(gb.astype(mx.float32)), np.array(ga.astype(mx.float32)), atol=2e-2)
