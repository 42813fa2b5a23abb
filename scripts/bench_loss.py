# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""What DFT costs over SFT per training step, measured step by step in one process.

    python scripts/bench_loss.py [--model PATH] [--steps 200] [--batch-size 8]

scripts/bench.py times whole runs in separate processes; on a shared 2-core machine their
speed drifts by 10-20% from one minute to the next, more than the few percent a loss can cost.
Here one model with LoRA (mlx_dft's defaults) gets two compiled training steps, SFT and DFT,
and the two alternate on the same batches: each pair of steps sees the same machine state.
Prints the median step time of each and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_dft  # noqa: F401

from mlx_dft import adapters
from mlx_dft.config import TrainConfig
from mlx_dft.data import DataConfig, iterate_batches, load_datasets
from mlx_dft.losses import auto_chunk_tokens, make_loss
from mlx_dft.models import default_model_path, load_model, split_model, vocab_size
from mlx_dft.tasks import ARITH_DIR
from mlx_dft.trainer import build_optimizer, make_loss_fn, make_step, optimizer_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--data", default=str(ARITH_DIR))
    ap.add_argument("--steps", type=int, default=200, help="pairs of steps timed")
    ap.add_argument("--warmup", type=int, default=10, help="pairs of steps not timed (compilation)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    model, tokenizer, model_cfg, _ = load_model(args.model)
    train = load_datasets(args.data, tokenizer, DataConfig())["train"]
    cfg = TrainConfig(adapter="lora")
    method = adapters.method("lora")
    method.apply(model, method.settings(cfg, model))
    body, head, fast = split_model(model)
    chunk = auto_chunk_tokens(vocab_size(model))
    steps = {}
    for loss in ("sft", "dft"):
        opt = build_optimizer("adamw", 1e-5, "constant", 0, 1)
        fn = make_loss_fn(body, head, fast, make_loss(loss), chunk)
        steps[loss] = make_step(model, opt, fn)

    times = {"sft": [], "dft": []}
    batches = iterate_batches(train, args.batch_size, seed=0)
    for i in range(args.warmup + args.steps):
        batch = next(batches)
        order = ("sft", "dft") if i % 2 == 0 else ("dft", "sft")  # neither always goes first
        for loss in order:
            step_fn, state = steps[loss]
            t = time.perf_counter()
            optimizer_step(step_fn, state, [batch])
            if i >= args.warmup:
                times[loss].append(time.perf_counter() - t)
    sft, dft = (statistics.median(times[k]) * 1000 for k in ("sft", "dft"))
    ratio = statistics.median(d / s for s, d in zip(times["sft"], times["dft"]))
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} pairs of steps")
    print(f"SFT step {sft:.2f} ms, DFT step {dft:.2f} ms (medians)")
    print(f"DFT cost over SFT: {100 * (ratio - 1):+.1f}% (median of per-pair ratios)")


if __name__ == "__main__":
    main()
