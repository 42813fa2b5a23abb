# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""--shard fsdp against one process at the same global batch: each process's peak memory and the
step time, on a random-weight model (ring backend, N processes on this machine).

    python scripts/bench_sharding.py                          # full fine-tuning, 1 vs 2 processes
    python scripts/bench_sharding.py --procs 2 4 --adapter lora --grad-checkpoint

Each configuration is one ``mlx_dft train`` run; every process reports MLX's peak memory over its
training steps (``mx.get_peak_memory``, reset when the loop starts: the model, gradients, optimizer
state and activations, not the loading before), the peak over the whole run from there (the
validation, the final checkpoint and the whole weights gathered back after training included), and
the median time of its steps after the first (which compiles). The default shape is Qwen3-0.6B's
width (hidden 1024, 16 heads, 8 KV heads, MLP 3072) with 12 of its 28 blocks and a 16k
vocabulary: 168M parameters, whose full fine-tuning with AdamW (about 16 bytes a parameter,
2.7 GB) fits one process of a 24 GB machine next to two or four sharded ones. A Qwen3-1.7B
shape does not fit here (27 GB in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mlx_dft  # noqa: F401,E402

SHAPE = ("qwen3-fsdp-bench", (1024, 12, 16, 8, 3072, 16384))  # hidden, layers, heads, kv, mlp, vocab
TAG = "BENCH "


def worker(opts: dict) -> None:
    """One process of a run: train, then print this process's figures on one line."""
    import mlx.core as mx

    from mlx_dft.trainer import Callback

    seen = []

    class Figures(Callback):
        def on_train_report(self, metrics, run):
            seen.append((metrics["step"], metrics["steps_per_sec"], metrics["peak_memory_gb"]))

    mlx_dft.train(progress=False, callbacks=[Figures()], **opts)
    world = mx.distributed.init()
    times = [1.0 / s for step, s, _ in seen if step > 1]
    print(TAG + json.dumps({
        "rank": world.rank(), "size": world.size(), "peak_gb": max(p for *_, p in seen),
        "run_peak_gb": mx.get_peak_memory() / 1e9, "step_s": statistics.median(times) if times else None,
    }), flush=True)  # fmt: skip


def run(opts: dict, n: int, port: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(opts)]
    if n > 1:
        launch = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launch), "--backend", "ring", "-n", str(n), "--starting-port", str(port), "--", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    figures = [json.loads(x[len(TAG):]) for x in done.stdout.splitlines() if x.startswith(TAG)]
    if len(figures) != n:
        raise SystemExit(f"the run on {n} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return sorted(figures, key=lambda f: f["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--procs", type=int, nargs="+", default=[2], help="sharded process counts (default 2)")
    ap.add_argument("--adapter", default="full", choices=("full", "lora", "dora"))
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8, help="the global batch")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--work", default="/tmp/mlx_dft_bench_sharding", help="folder for the model and runs")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import bench

    work = Path(args.work)
    model = work / "model"
    if not (model / "model.safetensors").is_file():
        bench.SHAPES[SHAPE[0]] = SHAPE[1]
        work.mkdir(parents=True, exist_ok=True)
        bench.make_random_model(SHAPE[0], ROOT / "models" / "tiny-llama", model)
    opts = dict(
        model=str(model), adapter=args.adapter, iters=args.iters, batch_size=args.batch_size,
        steps_per_report=1, steps_per_eval=10**6, val_batches=1, save_every=10**6, learning_rate=1e-5,
        grad_checkpoint=args.grad_checkpoint, overwrite=True, accuracy_problems=0,
    )  # fmt: skip
    rows = [("1 process", run({**opts, "output": str(work / "one")}, 1, 0))]
    for k, n in enumerate(args.procs):
        out = str(work / f"fsdp{n}")
        rows.append((f"fsdp x{n}", run({**opts, "output": out, "shard": "fsdp"}, n, 38000 + 10 * k)))
    one = rows[0][1][0]["peak_gb"]
    checkpointed = " + grad checkpoint" if args.grad_checkpoint else ""
    what = f"{args.adapter}{checkpointed}, global batch {args.batch_size}"
    whole = rows[0][1][0]["run_peak_gb"]
    print(f"| run ({what}) | steps' peak GB per process | x one | whole run's peak GB | x one | step s |")
    print("|---|---|---|---|---|---|")
    for name, figures in rows:
        peaks = ", ".join(f"{f['peak_gb']:.2f}" for f in figures)
        worst = max(f["peak_gb"] for f in figures)
        run_worst = max(f["run_peak_gb"] for f in figures)
        step = max(f["step_s"] or 0 for f in figures)
        ratios = f"{worst / one:.2f} | {run_worst:.2f} | {run_worst / whole:.2f}"
        print(f"| {name} | {peaks} | {ratios} | {step:.2f} |")


if __name__ == "__main__":
    main()
