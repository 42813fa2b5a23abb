# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""Where a training step's time goes: LoRA + DFT at a model shape, each part timed on its own.

    python scripts/profile_step.py                      # random weights shaped like Qwen3-0.6B
    python scripts/profile_step.py --shape llama-40m --batch-size 8

One process, the bundled task's examples (the bundled tokenizer), LoRA rank 8 on every linear
layer of every block, float32. Timed, each compiled and the median of --reps runs:

- step: one whole optimizer step, as `mlx_dft train` runs it;
- forward: the loss alone (no gradient);
- block matmuls: every product of the frozen linear layers at the step's shapes, forward and
  the backward to the activations (the two LoRA does), by themselves;
- LoRA products: the adapters' own small products, forward and backward;
- attention: MLX's scaled-dot-product attention, forward and backward, at every block's shape;
- loss: the output projection and DFT loss at the supervised positions, with the gradient (and,
  for comparison, the same loss with its chunks recomputed and autodiff's softmax);
- optimizer: AdamW's update of the trained parameters;
- graph building: calling the compiled step without evaluating it (Python and dispatch);
- exponentials: MLX's CPU exp per value, times the values the step exponentiates at least once
  (attention's softmax, the SiLU's sigmoid, the loss's softmax), a part of the others above.

The remainder of the step (step minus the parts) is the elementwise work: norms, RoPE, SiLU,
residual additions, copies. The matmul limit is the best float32 matmul rate measured at the
same shapes; the report says what share of it the step reaches.

With OpenBLAS under MLX, the step and the block products are then timed again on one BLAS thread
and on all of them, interleaved: from the two step times and the products' own speed-up, the
report splits the step into the work the BLAS spreads over the cores and the work that runs on
one core (everything MLX's CPU backend does outside the BLAS runs on its stream's one thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_dft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from bench import ROOT, SHAPES, make_random_model, work_dir  # noqa: E402
from mlx_dft import _blas, adapters
from mlx_dft.config import TrainConfig
from mlx_dft.data import DataConfig, collate, load_split
from mlx_dft.losses import DFT, auto_chunk_tokens, chunked_terms, compute, loss_sums
from mlx_dft.models import load_model, split_model
from mlx_dft.plan import matmul_gflops
from mlx_dft.trainer import make_step, model_loss_fn, optimizer_step


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` (which evaluates what it computes), after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    work = work_dir("mlx_dft_profile_")
    path = work / args.shape
    make_random_model(args.shape, ROOT / "models" / "tiny-llama", path)
    model, tok, config, _ = load_model(str(path))
    cfg = TrainConfig(adapter="lora", num_layers=-1, lora_rank=8)
    method = adapters.method("lora")
    method.apply(model, method.settings(cfg, model))
    ds = load_split(ROOT / "mlx_dft" / "tasks" / "arith" / "train.jsonl", "train", tok, DataConfig())
    batch = collate(ds.tokens[: args.batch_size], ds.supervised[: args.batch_size])
    b, t = batch.inputs.shape
    tokens, supervised = batch.n_tokens, batch.n_supervised
    h, n_layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    print(f"{args.shape}: batch {b} x {t} (padded), {tokens} tokens, {supervised} supervised", flush=True)

    loss_fn = model_loss_fn(model, DFT())
    opt = optim.AdamW(learning_rate=1e-5)
    step, state = make_step(model, opt, loss_fn)
    parts: dict[str, float] = {}
    parts["step"] = timed(lambda: optimizer_step(step, state, [batch]), args.reps)

    fwd = mx.compile(lambda *a: loss_fn(model, *a).stacked()[:4], inputs=[model.state])
    forward = timed(lambda: mx.eval(fwd(*batch.arrays())), args.reps)

    # the frozen products: x W^T forward, g W backward (to the activations), per linear layer
    shapes: dict[tuple[int, int], int] = {}
    lora_shapes: dict[tuple[int, int], int] = {}
    for _, m in model.named_modules():
        base = getattr(m, "linear", None)
        if isinstance(base, nn.Linear) and hasattr(m, "lora_a"):
            out_dim, in_dim = base.weight.shape
            shapes[(in_dim, out_dim)] = shapes.get((in_dim, out_dim), 0) + 1
            lora_shapes[(in_dim, out_dim)] = lora_shapes.get((in_dim, out_dim), 0) + 1
    rows = b * t

    def block_matmuls(reps: int = args.reps) -> float:
        mm = 0.0
        for (i, o), count in shapes.items():
            x, w, g = mx.random.normal((rows, i)), mx.random.normal((o, i)), mx.random.normal((rows, o))
            mx.eval(x, w, g)
            mm += count * timed(lambda x=x, w=w, g=g: mx.eval(x @ w.T, g @ w), reps)
        return mm

    parts["block matmuls"] = block_matmuls()
    # The same step and products on one BLAS thread: how much of the step the BLAS spreads over
    # the cores, and how much runs on one (MLX's CPU backend runs every other operation on the
    # one thread of its stream).
    threads = serial = None
    if _blas.info().name == "OpenBLAS":
        threads = _blas.set_threads(1)
        one: dict[str, list[float]] = {"step": [], "mm": []}
        both: dict[str, list[float]] = {"step": [], "mm": []}
        try:
            for _ in range(args.reps):  # interleaved, so that drift hits both alike
                for n, into in ((1, one), (threads, both)):
                    _blas.set_threads(n)
                    t0 = time.perf_counter()
                    optimizer_step(step, state, [batch])
                    into["step"].append(time.perf_counter() - t0)
                    into["mm"].append(block_matmuls(1))
        finally:
            _blas.set_threads(threads)
        t1, t2 = statistics.median(one["step"]), statistics.median(both["step"])
        # what more threads do for the products, measured next to the steps
        speedup = statistics.median(one["mm"]) / statistics.median(both["mm"])
        spread = max(0.0, (t1 - t2) / max(speedup - 1.0, 1e-6))
        serial = {"threads": threads, "step_1": t1, "step_n": t2, "mm_speedup": speedup,
                  "spread_s": min(spread, t2), "serial_s": max(0.0, t2 - spread)}  # fmt: skip
    lo, r = 0.0, cfg.lora_rank
    for (i, o), count in lora_shapes.items():
        x, a, bb, g = (mx.random.normal(s) for s in ((rows, i), (i, r), (r, o), (rows, o)))
        mx.eval(x, a, bb, g)

        def lora_fb(x=x, a=a, bb=bb, g=g):
            xa = x @ a
            gb = g @ bb.T
            mx.eval(xa @ bb, gb @ a.T, xa.T @ g, x.T @ gb)

        lo += count * timed(lora_fb, args.reps)
    parts["LoRA products"] = lo

    q, k, v = (mx.random.normal((b, n, t, d)) for n in (heads, kv, kv))
    mx.eval(q, k, v)
    scale = d**-0.5

    def attn(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal").sum()

    attn_vg = mx.compile(mx.value_and_grad(attn, argnums=(0, 1, 2)))
    parts["attention"] = n_layers * timed(lambda: mx.eval(attn_vg(q, k, v)), args.reps)

    body, head, _ = split_model(model)
    hs = mx.random.normal((supervised, h)) * 0.1
    targets = batch.targets[:supervised]
    valid = batch.valid[:supervised]
    dft = DFT()

    def loss_only(hs):
        return loss_sums(chunked_terms(head, hs, targets, auto_chunk_tokens(vocab), dft), valid).objective

    mx.eval(hs)
    loss_vg = mx.compile(mx.value_and_grad(loss_only))
    parts["loss (output projection + DFT)"] = timed(lambda: mx.eval(loss_vg(hs)), args.reps)
    # The same loss as the GPU path computes it: chunks recomputed in the backward pass, autodiff's
    # softmax (not part of the step: a comparison).
    keeps = compute.keeps_softmax
    compute.keeps_softmax = lambda *a: False
    try:
        recomputed_vg = mx.compile(mx.value_and_grad(loss_only))
        recomputed = timed(lambda: mx.eval(recomputed_vg(hs)), args.reps)
    finally:
        compute.keeps_softmax = keeps

    params = model.trainable_parameters()
    grads = {k: v for k, v in params.items()}
    opt2 = optim.AdamW(learning_rate=1e-5)
    opt2.init(params)

    def update():
        out = opt2.apply_gradients(grads, params)
        mx.eval(out)

    parts["optimizer (AdamW)"] = timed(update, args.reps)

    t0 = time.perf_counter()
    out = step(batch.arrays(), None, None, True)  # traced and dispatched, not evaluated
    parts["graph building (Python)"] = time.perf_counter() - t0
    mx.eval(out, state)

    total = parts["step"]
    accounted = sum(v for k, v in parts.items() if k != "step")
    parts["elementwise and the rest"] = max(0.0, total - accounted)
    gflops = matmul_gflops(h, config["intermediate_size"], rows)
    matmul_params = sum(
        m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.ndim == 2
    )
    flops = 4 * matmul_params * tokens + 4 * vocab * h * supervised
    limit = gflops * 1e9 / (flops / tokens)
    print("\n| part | ms | share of the step |\n|---|---:|---:|")
    for k, v in parts.items():
        print(f"| {k} | {v * 1e3:,.0f} | {'' if k == 'step' else f'{v / total:.0%}'} |")
    print(f"\n- forward alone: {forward * 1e3:,.0f} ms ({forward / total:.0%} of the step)")
    print(f"- loss as trained (kept softmax): {parts['loss (output projection + DFT)'] * 1e3:,.0f} ms; "
          f"with the chunks recomputed and autodiff's softmax (the GPU path): {recomputed * 1e3:,.0f} ms")
    print(f"- tokens/s: {tokens / total:,.0f}; matmul limit {limit:,.0f} tokens/s ({gflops:.0f} GFLOP/s, "
          f"{flops / tokens / 1e9:.2f} GFLOP a token): {tokens / total / limit:.0%} of it")  # fmt: skip
    print(f"- trained parameters: {sum(v.size for _, v in tree_flatten(params)):,}")
    if serial:
        n = serial["threads"]
        one_core = serial["serial_s"]
        print(f"- on 1 BLAS thread the step takes {serial['step_1'] * 1e3:,.0f} ms, on {n} "
              f"{serial['step_n'] * 1e3:,.0f} ms (interleaved medians); the block products run "
              f"{serial['mm_speedup']:.2f}x faster on {n} threads. So the work the BLAS spreads "
              f"over the cores takes {serial['spread_s'] * 1e3:,.0f} ms of the {n}-thread step, and "
              f"{one_core * 1e3:,.0f} ms ({one_core / serial['step_n']:.0%}) runs on one core "
              "(MLX's CPU backend runs all but the BLAS calls on its stream's one thread)")  # fmt: skip
    # The exponentials, the largest one-core item: MLX's CPU exp on this build, per value, times
    # the values the step exponentiates (attention's softmax over every head's scores, the SiLU's
    # sigmoid of the MLP's gate, the loss's softmax over the vocabulary at the supervised tokens).
    xs = mx.random.normal((1 << 22,))
    mx.eval(xs)
    exp_ns = timed(lambda: mx.eval(mx.exp(xs)), args.reps) / xs.size * 1e9
    counts = {
        "attention softmax": b * heads * t * t * n_layers,
        "SiLU sigmoid": b * t * config["intermediate_size"] * n_layers,
        "loss softmax": supervised * vocab,
    }
    exps_s = sum(counts.values()) * exp_ns * 1e-9
    print(f"- exponentials (forward, at least once each): {sum(counts.values()) / 1e6:,.0f} M a step "
          f"({', '.join(f'{k} {v / 1e6:,.0f} M' for k, v in counts.items())}) at {exp_ns:.1f} ns each "
          f"(MLX's CPU exp, one core): {exps_s * 1e3:,.0f} ms "
          f"({exps_s / total:.0%} of the step)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"parts_s": parts, "forward_s": forward, "loss_recomputed_s": recomputed, "gflops": gflops,
                 "tokens": tokens, "serial": serial,
                 "exp_ns": exp_ns, "exps": counts},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
