"""A quantized base on the CPU: kept quantized vs computed in float32 (the CPU default).

    python scripts/bench_quantized.py      # SmolLM2-135M-Instruct 4-bit (scripts/fetch_smollm2.py)

MLX's CPU backend has no fast quantized matmul, so ``mlx_dft`` computes a quantized base in
float32 on the CPU when that copy fits in memory (``--keep-quantized`` keeps it). This times
both ways on the same model: greedy generation (tokens/s, after a warm-up), and LoRA + DFT
training (tokens/s and peak memory, each run in its own process, best of --repeats, as
scripts/bench.py does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import ROOT, avg_tokens, ours, prepare_data, prepare_model, work_dir  # noqa: E402

PROMPT = "Question: Mia has 12 apples. She buys 5 more. How many apples does Mia have now?\nAnswer:"


def generation_speed(model: Path, keep: bool, tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, greedy decoding tokens/s) of ``tokens`` new tokens (mlx-lm's own counts)."""
    from mlx_lm import stream_generate

    from mlx_dft import api

    net, tok = api.load(str(model), keep_quantized=keep)
    for _ in stream_generate(net, tok, PROMPT, max_tokens=8):  # warm-up
        pass
    last = None
    for response in stream_generate(net, tok, PROMPT, max_tokens=tokens):
        last = response
    return last.prompt_tps, last.generation_tps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct" / "4bit"))
    ap.add_argument("--data", default=str(ROOT / "mlx_dft" / "tasks" / "arith_small"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=-1)
    ap.add_argument("--report", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.shape = None
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: no model (run scripts/fetch_smollm2.py first)")

    work = work_dir("mlx_dft_bench_quantized_")
    model = prepare_model(args, work)
    data = prepare_data(args, work)
    tokens_per_step = avg_tokens(model, data) * args.batch_size
    print(f"model {args.model}, batch {args.batch_size}, {tokens_per_step:.0f} tokens/step; logs in {work}")
    ways = {"kept quantized (--keep-quantized)": True, "float32 (CPU default)": False}
    results: dict[str, dict] = {name: {} for name in ways}
    for name, keep in ways.items():
        prompt, gen = generation_speed(model, keep, args.gen_tokens)
        results[name].update(prompt_tokens_per_sec=prompt, generate_tokens_per_sec=gen)
    for i in range(args.repeats):
        for name, keep in ways.items():
            extra = {"keep_quantized": True} if keep else {}
            r = ours(args, model, data, work, f"{'q' if keep else 'f'}-{i}", loss="dft", adapter="lora",
                     num_layers=args.num_layers, **extra)  # fmt: skip
            best = results[name].get("train")
            if best is None or r["steps_per_sec"] > best["steps_per_sec"]:
                results[name]["train"] = r
    print("\n| base on the CPU | prompt tokens/s | generate tokens/s | train tokens/s | train peak (GB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        r["train_tokens_per_sec"] = r["train"]["steps_per_sec"] * tokens_per_step
        print(f"| {name} | {r['prompt_tokens_per_sec']:,.0f} | {r['generate_tokens_per_sec']:,.1f} "
              f"| {r['train_tokens_per_sec']:,.0f} "
              f"| {r['train']['peak_gb']:.2f} |")  # fmt: skip
    q, f = results.values()
    gen = f["generate_tokens_per_sec"] / q["generate_tokens_per_sec"]
    prompt = f["prompt_tokens_per_sec"] / q["prompt_tokens_per_sec"]
    print(f"\n- float32 vs quantized, prompt processing: {prompt:.1f}x, generation: {gen:.1f}x")
    print(f"- float32 vs quantized, training: {f['train_tokens_per_sec'] / q['train_tokens_per_sec']:.1f}x")
    mem = f["train"]["peak_gb"] / q["train"]["peak_gb"]
    print(f"- float32 vs quantized, training peak memory: {mem:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
