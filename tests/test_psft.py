"""Proximal SFT (PSFT, arXiv 2508.17784): the clipped ratio to the previous policy against a
PyTorch reference of the official formula (values, gradients, parts, both clips), chunked against
whole, accumulation against one batch; the previous policy is the weights at the start of each
group of --psft-minibatches steps (1: SFT's update); resume inside a group is exact; LoRA, DoRA and
full fine-tuning; one-line errors."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from test_dft_family import _adapted, _batches, _perturb_lora_b, _tok, assert_same_weights, weights

import mlx_dft
from mlx_dft.checkpoint import PREVIOUS_FILE
from mlx_dft.data import DataConfig, iterate_batches, load_split
from mlx_dft.losses import PSFT, chunked_terms, loss_from_logits, loss_sums, make_loss, token_columns
from mlx_dft.trainer import PreviousPolicy, build_optimizer, make_step, model_loss_fn, optimizer_step

FAST = dict(batch_size=4, steps_per_report=1, progress=False)
# ln(p / p_old) per token: below the lower clip, inside, above the upper clip (far above: the
# ratio's cap), at 1 exactly
LOG_RATIOS = np.log([0.3, 0.7, 0.85, 1.0, 1.1, 1.25, 1.35, 2.0]).tolist() + [-40.0, 150.0]


# ------------------------------------------------------------------ the reference


def torch_psft(logits, targets, mask, old_ce, lo=0.2, hi=0.28):
    """(mean loss, d loss / d logits, parts) in float64 PyTorch, as the official code computes it
    (verl's vanilla PPO policy loss, advantage 1, token-mean): r = exp(log p - log p_old),
    loss = -min(r, clamp(r, 1 - lo, 1 + hi)); parts: mean r and the share of tokens whose clipped
    term is taken (r > 1 + hi, verl's pg_clipfrac for a positive advantage); the reported r is
    capped at e (1 + hi), beyond the clip (where the objective is constant), as ours is."""
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(targets, dtype=torch.long)
    m = torch.tensor(mask, dtype=torch.float64)
    logp = torch.log_softmax(z, dim=-1).gather(-1, t[..., None])[..., 0]
    r = torch.exp(logp - (-torch.tensor(old_ce, dtype=torch.float64)))
    loss = -torch.min(r, torch.clamp(r, 1 - lo, 1 + hi))
    value = (loss * m).sum() / m.sum()
    value.backward()
    rd = r.detach()
    parts = {
        "psft_ratio": ((torch.clamp(rd, max=math.e * (1 + hi)) * m).sum() / m.sum()).item(),
        "psft_clipped": (((rd > 1 + hi).double() * m).sum() / m.sum()).item(),
    }
    return value.item(), z.grad.numpy(), parts, rd.numpy()


def ce_of(logits, targets):
    z = logits.astype(np.float64)
    top = z.max(-1, keepdims=True)
    lse = (np.log(np.exp(z - top).sum(-1, keepdims=True)) + top)[..., 0]
    return lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def case(seed, shape=(3, 7, 30)):
    """Logits, targets, a mask and the previous policy's CE, set so that the ratios p / p_old are
    LOG_RATIOS' (each at least once among the supervised tokens)."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 3.0).astype(np.float32)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    mask = (rng.random(shape[:-1]) < 0.7).astype(np.float32)
    n = int(np.prod(shape[:-1]))
    log_r = np.array([LOG_RATIOS[i % len(LOG_RATIOS)] for i in range(n)]).reshape(shape[:-1])
    mask.reshape(-1)[: len(LOG_RATIOS)] = 1.0
    old_ce = (ce_of(logits, targets) + log_r).astype(np.float32)
    return logits, targets, mask, old_ce


@pytest.mark.parametrize("lo,hi", [(0.2, 0.28), (0.1, 0.05), (0.5, 1.5)])
def test_value_gradient_and_parts_match_torch(lo, hi):
    logits, targets, mask, old_ce = case(0)
    cfg = make_loss("psft", psft_epsilon_low=lo, psft_epsilon_high=hi)
    want, want_grad, want_parts, r = torch_psft(logits, targets, mask, old_ce, lo, hi)
    on = mask > 0
    assert (r[on] < 1 - lo).any() and (r[on] > 1 + hi).any() and ((r[on] > 1 - lo) & (r[on] < 1 + hi)).any()
    args = (mx.array(targets), mx.array(mask), cfg, None, mx.array(old_ce))

    value, metrics = loss_from_logits(mx.array(logits), *args)
    grad = np.array(mx.grad(lambda z: loss_from_logits(z, *args)[0])(mx.array(logits)))
    np.testing.assert_allclose(value.item(), want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    assert np.isfinite(grad).all()
    for name, v in want_parts.items():
        np.testing.assert_allclose(metrics[name].item(), v, rtol=1e-5)
    # Tokens above the upper clip get no gradient; those below the lower one keep theirs (advantage 1).
    above = on & (r > 1 + hi)
    assert np.abs(grad[above]).max() == 0
    assert np.abs(grad[on & (r < 1 - lo) & (r > 1e-3)]).min() > 0
    assert np.abs(grad[mask == 0]).max() == 0


def test_without_a_previous_policy_the_ratio_is_one_and_the_gradient_sfts():
    """old_ce None (validation; a group's first step): r = 1 exactly, the objective -1 a token, and
    the gradient exactly SFT's."""
    logits, targets, mask, _ = case(1)
    args = (mx.array(targets), mx.array(mask))
    value, metrics = loss_from_logits(mx.array(logits), *args, PSFT())
    assert value.item() == -1.0
    assert metrics["psft_ratio"].item() == 1.0 and metrics["psft_clipped"].item() == 0
    grads = [
        np.array(mx.grad(lambda z, c=c: loss_from_logits(z, *args, c)[0])(mx.array(logits)))
        for c in (PSFT(), make_loss("sft"))
    ]
    np.testing.assert_array_equal(grads[0], grads[1])


@pytest.mark.parametrize("chunk", [0, 5, 16])
@pytest.mark.parametrize("trained_head", [True, False], ids=["trained-head", "frozen-head"])
def test_chunked_terms_match_full_logits(chunk, trained_head):
    """From hidden states in chunks (old_ce sliced alongside; a frozen head keeps the softmax on the
    CPU) == from the full logits, in value and gradient."""
    rng = np.random.default_rng(3)
    n, d, v = 37, 8, 50
    h = mx.array(rng.normal(size=(n, d)).astype(np.float32))
    t = mx.array(rng.integers(0, v, size=n))
    valid = mx.array((rng.random(n) < 0.8).astype(np.float32))
    mx.random.seed(0)
    linear = nn.Linear(d, v, bias=True)
    head = linear
    if not trained_head:
        w = mx.array(rng.normal(size=(d, v)).astype(np.float32))

        def head(x):
            return x @ w

    logits = np.array(head(h))
    old = mx.array((ce_of(logits, np.array(t)) + np.resize(LOG_RATIOS, n)).astype(np.float32))
    cfg = PSFT()

    def via_chunks(h):
        return loss_sums(chunked_terms(head, h, t, chunk, cfg, None, old), valid).objective

    def via_logits(h):
        return loss_sums(token_columns(head(h), t, cfg, None, old), valid).objective

    np.testing.assert_allclose(via_chunks(h).item(), via_logits(h).item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(mx.grad(via_chunks)(h)), np.array(mx.grad(via_logits)(h)), atol=1e-5)
    if trained_head:
        g1 = nn.value_and_grad(linear, lambda _, x: via_chunks(x))(linear, h)[1]
        g2 = nn.value_and_grad(linear, lambda _, x: via_logits(x))(linear, h)[1]
        for k in ("weight", "bias"):
            np.testing.assert_allclose(np.array(g1[k]), np.array(g2[k]), atol=1e-5)


def test_accumulated_sums_equal_one_big_batch_at_the_logits():
    logits, targets, mask, old_ce = case(2, shape=(6, 5, 13))
    mask[3:, 2:] = 0
    cfg = PSFT()
    want, want_grad, _, _ = torch_psft(logits, targets, mask, old_ce)
    for split in ([slice(0, 6)], [slice(0, 3), slice(3, 6)], [slice(0, 1), slice(1, 4), slice(4, 6)]):

        def accumulated(z, split=split):
            total = n = 0.0
            for sl in split:
                cols = token_columns(z[sl].reshape(-1, 13), mx.array(targets[sl]).reshape(-1), cfg, None,
                                     mx.array(old_ce[sl]).reshape(-1))  # fmt: skip
                sums = loss_sums(cols, mx.array(mask[sl]).reshape(-1))
                total, n = total + sums.objective, n + sums.tokens
            return total / n

        z = mx.array(logits)
        np.testing.assert_allclose(accumulated(z).item(), want, rtol=1e-5)
        np.testing.assert_allclose(np.array(mx.grad(accumulated)(z)), want_grad, atol=1e-6)


# ------------------------------------------------------------------ on a model


def _old_ce(model, loss_fn, batches):
    return [mx.array(np.array(loss_fn.token_ce(model, *b.arrays()))) for b in batches]


def test_accumulation_equals_one_big_batch_in_the_trainer(tiny_model, arith_data):
    """One compiled optimizer step over 1, 2 or 3 micro-batches, each with its previous policy's CE
    (of other weights: ratios off 1, some clipped), gives the same update."""
    idx = list(range(6))
    results = []
    for groups in ([idx], [idx[:3], idx[3:]], [idx[:2], idx[2:4], idx[4:]]):
        model, _ = _adapted(tiny_model, "lora", first=1)
        loss_fn = model_loss_fn(model, PSFT(epsilon_high=0.05), 16)
        batches = _batches(arith_data, tiny_model, groups)
        _perturb_lora_b(model, seed=2)
        old = _old_ce(model, loss_fn, batches)  # the previous policy: other weights
        _perturb_lora_b(model, seed=1)
        opt = build_optimizer("sgd", 1e-1, "constant", 0, 10, weight_decay=0.0)
        step, state = make_step(model, opt, loss_fn, max_grad_norm=0.0)
        sums, _ = optimizer_step(step, state, batches, old)
        results.append((np.array(sums), dict(tree_flatten(model.trainable_parameters()))))
    (sums0, params0), *others = results
    assert sums0[4] / sums0[3] != pytest.approx(1.0, abs=1e-3) and 0 < sums0[5] < sums0[3]  # r, clipped
    for sums, params in others:
        np.testing.assert_allclose(sums, sums0, rtol=1e-5)
        for k in params0:
            np.testing.assert_allclose(np.array(params[k]), np.array(params0[k]), atol=1e-6)


def test_one_minibatch_a_group_is_sfts_gradient(tiny_model, arith_data):
    """--psft-minibatches 1: the previous policy is the current one, r = 1, and the gradient is
    exactly SFT's (LoRA perturbed: every parameter has one)."""
    model, _ = _adapted(tiny_model, "lora", first=0)
    _perturb_lora_b(model)
    b = _batches(arith_data, tiny_model, [[0, 1, 2, 3]])[0]
    grads = []
    for loss in (PSFT(minibatches=1), make_loss("sft")):
        loss_fn = model_loss_fn(model, loss, 16)
        sums, g = nn.value_and_grad(model, loss_fn)(model, *b.arrays())
        grads.append(dict(tree_flatten(g)))
        if loss.name == "psft":
            assert sums.objective.item() == -sums.tokens.item() and sums.parts[0].item() == sums.tokens.item()
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        np.testing.assert_array_equal(np.array(grads[0][k]), np.array(grads[1][k]))


def test_the_previous_policy_is_the_group_start_weights(tiny_model, arith_data):
    """Groups of 3 steps of 2 micro-batches: at a group's first step the CE of the group's later
    micro-batches (the same batches those steps would draw) is computed under the weights then;
    the later steps train against it, not against the weights before them."""
    model, _ = _adapted(tiny_model, "lora", first=0)
    loss_fn = model_loss_fn(model, PSFT(minibatches=3), 16)
    opt = build_optimizer("adam", 1e-2, "constant", 0, 10)
    step_fn, state = make_step(model, opt, loss_fn)
    ds = load_split(arith_data / "train.jsonl", "train", _tok(tiny_model), DataConfig())
    batches, plain = iterate_batches(ds, 4, seed=0), iterate_batches(ds, 4, seed=0)
    policy = PreviousPolicy(model, loss_fn, size=3, warmup=0, accum=2, total_steps=5)
    assert [policy.group_end(s) for s in range(1, 6)] == [3, 3, 3, 5, 5]

    def ce_now(micro):  # the CE of the targets under the model as it is, from its full logits
        out = []
        for b in micro:
            z = model(b.inputs).reshape(-1, 512)[b.positions]
            out.append(mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, b.targets[:, None], axis=-1)[:, 0])
        return out

    ratios, at_start = [], {}
    for step in range(1, 6):
        micro, old = policy.take(step, batches)
        expected = [next(plain) for _ in range(2)]
        for b, e in zip(micro, expected):
            np.testing.assert_array_equal(np.array(b.inputs), np.array(e.inputs))
        if policy.starts_group(step):
            assert old is None and sorted(policy.pending) == list(range(step + 1, policy.group_end(step) + 1))
            for later in policy.pending:
                at_start[later] = ce_now(policy.ahead[later])
        else:
            for o, want in zip(old, at_start[step]):
                np.testing.assert_allclose(np.array(o), np.array(want), atol=1e-5)
            drifted = ce_now(micro)  # the weights before this step: not the previous policy
            assert max(float(mx.abs(o - d).max()) for o, d in zip(old, drifted)) > 1e-3
        sums, _ = optimizer_step(step_fn, state, micro, old)
        ratios.append(float(sums[4] / sums[3]))
    assert ratios[0] == 1.0 and ratios[3] == 1.0  # the groups' first steps
    assert all(abs(r - 1.0) > 1e-4 for r in (ratios[1], ratios[2], ratios[4]))


# ------------------------------------------------------------------ runs


RUN = dict(
    loss="psft",
    psft_minibatches=3,
    iters=7,
    save_every=2,
    grad_accumulation_steps=2,
    lora_dropout=0.1,
    learning_rate=1e-2,
    warmup=0,
    steps_per_eval=7,
    **FAST,
)


@pytest.fixture(scope="module")
def straight(tiny_model, arith_data, tmp_path_factory):
    """Groups 1-3, 4-6 and 7; checkpoints at 2 and 4 (inside groups), 6 and 7 (at their ends)."""
    out = tmp_path_factory.mktemp("psft") / "straight"
    mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(out), **RUN)
    return out


def _train_records(folder):
    recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "train_loss" in r}, [r for r in recs if "val_loss" in r]


def test_the_ratio_is_one_at_each_groups_first_step(straight):
    train, val = _train_records(straight)
    for step in (1, 4, 7):
        assert train[step]["train_psft_ratio"] == 1.0 and train[step]["train_psft_clipped"] == 0.0
        assert train[step]["train_loss"] == -1.0
    for step in (2, 3, 5, 6):
        assert abs(train[step]["train_psft_ratio"] - 1.0) > 1e-4, train[step]
    assert any(train[s]["train_psft_clipped"] > 0 for s in (2, 3, 5, 6))
    assert all(r["val_psft_ratio"] == 1.0 and r["val_loss"] == -1.0 for r in val)  # p_old = p
    ck = straight / "checkpoints"
    inside = [(ck / f"step-000000{s}" / PREVIOUS_FILE).is_file() for s in (2, 4, 6, 7)]
    assert inside == [True, True, False, False]
    saved = mx.load(str(ck / "step-0000004" / PREVIOUS_FILE))
    assert sorted(saved) == ["5.0.0", "5.1.0", "6.0.0", "6.1.0"]  # step.micro-batch.worker


@pytest.mark.parametrize("at", ["step-0000002", "step-0000004"])
def test_resume_inside_a_group_is_exact(straight, tmp_path, at):
    ck = straight / "checkpoints" / at
    resumed = mlx_dft.train(resume=str(ck), output=str(tmp_path / "r"), progress=False)
    assert resumed.step == 7
    assert_same_weights(straight, tmp_path / "r", atol=0)
    keys = ("train_loss", "train_ce", "train_psft_ratio", "train_psft_clipped")
    for step in range(int(at[-1]) + 1, 8):
        want, got = _train_records(straight)[0][step], _train_records(tmp_path / "r")[0][step]
        assert [got[k] for k in keys] == [want[k] for k in keys], step


def test_resume_without_the_saved_previous_policy_says_so_and_differs(straight, tmp_path, capsys):
    """The saved previous policy is what makes the resume exact: without it the rest of the group
    takes the resumed weights as its previous policy, with a note."""
    import shutil

    ck = tmp_path / "copy" / "checkpoints" / "step-0000004"
    shutil.copytree(straight / "checkpoints" / "step-0000004", ck)
    (ck / PREVIOUS_FILE).unlink()
    mlx_dft.train(resume=str(ck), output=str(tmp_path / "r"), progress=False)
    assert "no saved previous policy fits steps 5-6" in capsys.readouterr().out
    a, b = weights(straight), weights(tmp_path / "r")
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) > 1e-6


def test_one_minibatch_a_group_trains_as_sft(tiny_model, arith_data, tmp_path):
    common = dict(model=str(tiny_model), data=str(arith_data), iters=3, warmup=0, learning_rate=1e-2, **FAST)
    mlx_dft.train(output=str(tmp_path / "psft"), loss="psft", psft_minibatches=1, **common)
    mlx_dft.train(output=str(tmp_path / "sft"), loss="sft", **common)
    assert_same_weights(tmp_path / "psft", tmp_path / "sft", atol=0)
    assert not list((tmp_path / "psft" / "checkpoints").glob(f"*/{PREVIOUS_FILE}"))


@pytest.mark.parametrize("adapter", ["lora", "dora", "full"])
def test_trains_with_each_method(tiny_model, arith_data, tmp_path, adapter):
    run = mlx_dft.train(
        model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "o"), adapter=adapter,
        num_layers=1, loss="psft", psft_minibatches=2, iters=2, warmup=0,
        learning_rate=1e-2 if adapter != "full" else 1e-3, **FAST,
    )  # fmt: skip
    train, _ = _train_records(run.output)
    assert train[1]["train_psft_ratio"] == 1.0
    assert math.isfinite(train[2]["train_loss"]) and abs(train[2]["train_psft_ratio"] - 1.0) > 1e-6


@pytest.mark.slow  # three runs, two of them of two processes over the ring backend
def test_two_workers_match_one_and_resume_inside_a_group(tiny_model, arith_data, tmp_path):
    """Each worker's previous policy is its own micro-batches': the checkpoint keeps every worker's
    (gathered to the writer), and two workers resumed inside a group end where they would have."""
    import os
    import subprocess
    import sys

    from test_distributed import HERE, launcher

    if launcher() is None:
        pytest.skip("mlx.launch is not installed")
    opts = dict(
        model=str(tiny_model), data=str(arith_data), loss="psft", psft_minibatches=3, iters=7, batch_size=4,
        grad_accumulation_steps=2, optimizer="sgd", learning_rate=0.5, save_every=2,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    worker = [sys.executable, str(HERE / "dist_worker.py")]
    port = 35000 + os.getpid() % 20000

    def run(workers: int, **kw):
        two = [launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(port + 100 * len(kw)), "--"]
        cmd = (two if workers == 2 else []) + [*worker, json.dumps(kw)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stdout + p.stderr

    run(1, **opts, output=str(tmp_path / "one"))
    run(2, **opts, output=str(tmp_path / "two"))
    saved = mx.load(str(tmp_path / "two" / "checkpoints" / "step-0000004" / PREVIOUS_FILE))
    assert sorted(saved) == [f"{s}.{k}.{r}" for s in (5, 6) for k in (0, 1) for r in (0, 1)]
    run(2, resume=str(tmp_path / "two" / "checkpoints" / "step-0000004"), output=str(tmp_path / "resumed"))
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=2e-5)
    assert_same_weights(tmp_path / "two", tmp_path / "resumed", atol=0)
