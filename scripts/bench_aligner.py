"""Aligner vs LoRA: training step time and peak memory on the same model, data and batch.

    python scripts/bench_aligner.py                      # the bundled tiny LLaMA
    python scripts/bench_aligner.py --shape qwen3-0.6b   # random weights shaped like Qwen3-0.6B

LoRA: rank 8 on mlx-lm's default modules (every linear layer of a block) of the layers from
--start-layer on; Aligner: --tokens prefix tokens, head gates, from the same layer on. Same
loss (DFT), batch, maximum length and iterations; validation reduced to one batch. Each run in
its own process, repeated and interleaved, best repeat kept (see scripts/bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SHAPES, avg_tokens, ours, prepare_data, prepare_model, work_dir  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the bundled tiny LLaMA)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="benchmark a random-weight model of this shape")
    ap.add_argument("--data", help="folder with train/valid.jsonl (default: bundled task)")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--start-layer", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--report", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    work = work_dir("mlx_dft_bench_aligner_")
    model = prepare_model(args, work)
    data = prepare_data(args, work)
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    tokens_per_step = avg_tokens(model, data) * args.batch_size
    print(
        f"model {args.shape or args.model or 'bundled tiny-llama'} ({n_layers} layers), batch "
        f"{args.batch_size}, {args.iters} iters, {tokens_per_step:.0f} tokens/step; logs in {work}",
        flush=True,
    )
    runs = {
        "lora (rank 8, all linear layers)": dict(
            adapter="lora", lora_rank=8, num_layers=n_layers - args.start_layer
        ),
        f"aligner ({args.tokens} token, head gates)": dict(
            adapter="aligner", aligner_tokens=args.tokens, aligner_start_layer=args.start_layer
        ),
    }
    results = {}
    for i in range(args.repeats):
        for name, opts in runs.items():
            r = ours(args, model, data, work, f"{opts['adapter']}-{i}", loss="dft", **opts)
            best = results.get(name)
            if best is None or r["steps_per_sec"] > best["steps_per_sec"]:
                results[name] = r
    for r in results.values():
        r["tokens_per_sec"] = r["steps_per_sec"] * tokens_per_step
        r["step_ms"] = 1000.0 / r["steps_per_sec"]
    print("\n| adapter | step time (ms) | tokens/s | peak memory (GB) |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['step_ms']:,.1f} | {r['tokens_per_sec']:,.0f} | {r['peak_gb']:.3f} |")
    lora, al = results.values()
    print(f"\n- aligner step time vs lora: {al['step_ms'] / lora['step_ms']:.2f}x")
    print(f"- aligner peak memory vs lora: {al['peak_gb'] / lora['peak_gb']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
