"""LoRA + DFT with mlx_dft against stock ``mlx_lm lora`` on today's architectures, at realistic
shapes with random weights: peak memory and tokens/s, one invocation, each run in its own process.

    python scripts/bench_architectures.py       # gemma3-1b at 4 x 512, qwen35-0.8b at 2 x 128
    python scripts/bench_architectures.py --shapes gemma3-1b:8:256 --iters 5 --json out.json

Shapes (random weights, the bundled 512-token tokenizer; the vocabulary is the model's):
  gemma3-1b    Gemma-3-1B: gemma3_text, hidden 1152, 26 layers (5 of 6 sliding-window), 4 heads
               of 256, 1 KV head, MLP 6912, vocabulary 262,144 (tied)
  qwen35-0.8b  Qwen3.5-0.8B: qwen3_5, hidden 1024, 24 layers (18 gated-delta linear attention, 6
               full attention), MLP 3584, vocabulary 248,320 (tied)
  qwen35-small a small hybrid: qwen3_5, hidden 256, 4 layers (3 gated-delta, 1 attention), MLP 768,
               the bundled 512-token vocabulary

Both tools: LoRA rank 8 scale 20 on the same layers (mlx-lm's default keys: every linear layer of
every block), AdamW at a constant rate, the same batch of rows of about LENGTH tokens
(synthetic prompt/completion records, the prompt masked), validation reduced to one batch. Stock
is ``mlx_lm lora``'s own train_model (scripts/stock_lora.py) with OpenBLAS preloaded (the BLAS
mlx_dft uses); tokens/s from each tool's own step rate, the first report (compilation) left out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (also puts OpenBLAS under MLX here)

SHAPES = {
    "gemma3-1b": {
        "model_type": "gemma3_text", "hidden_size": 1152, "num_hidden_layers": 26, "intermediate_size": 6912,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "vocab_size": 262144, "sliding_window": 512, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "max_position_embeddings": 32768,
        "final_logit_softcapping": None,
    },
    "qwen35-0.8b": {
        "model_type": "qwen3_5",
        "text_config": {
            "model_type": "qwen3_5_text", "hidden_size": 1024, "num_hidden_layers": 24,
            "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
            "vocab_size": 248320, "linear_num_value_heads": 16, "linear_num_key_heads": 16,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_theta": 10000000.0, "partial_rotary_factor": 0.25, "rope_type": "default",
            },
        },
    },
}  # fmt: skip
SHAPES["qwen35-small"] = {  # the 0.8B's layout, narrower and shallower
    "model_type": "qwen3_5",
    "text_config": {
        **SHAPES["qwen35-0.8b"]["text_config"], "hidden_size": 256, "num_hidden_layers": 4,
        "intermediate_size": 768, "num_attention_heads": 4, "head_dim": 64, "vocab_size": 512,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
    },
}  # fmt: skip


def make_model(shape: str, dst: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    cfg = {**SHAPES[shape], "bos_token_id": 1, "eos_token_id": 2}
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(cfg))
    dst.mkdir(parents=True)
    # Both shapes tie the output projection to the embedding, as the real checkpoints do (they hold
    # no lm_head.weight, so mlx-lm's gemma3_text ties it on load; qwen3_5 builds none when tied).
    weights = {
        k: mx.random.normal(v.shape) * 0.02 if v.ndim > 1 else v
        for k, v in tree_flatten(model.parameters())
        if not k.endswith("lm_head.weight")
    }
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    del weights, model
    (dst / "config.json").write_text(json.dumps(cfg))
    src = ROOT / "models" / "tiny-llama"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, dst / f)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["chat_template"] = bench.CHAT_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


def make_data(dst: Path, length: int, n: int = 64, seed: int = 0) -> Path:
    """prompt/completion records of about ``length`` tokens with the bundled tokenizer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    words = max(8, int(length * 0.38))  # the bundled BPE gives ~2.5 tokens a word of this list
    for split, count in (("train", n), ("valid", 8)):
        with open(dst / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                p = " ".join(rng.choice(bench.WORDS, size=words // 8))
                c = " ".join(rng.choice(bench.WORDS, size=words - words // 8))
                f.write(json.dumps({"prompt": p + "\n", "completion": c}) + "\n")
    return dst


def cpu_name() -> str:
    """The CPU's model name and core count (/proc/cpuinfo on Linux; platform's words elsewhere)."""
    import os

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes", default="gemma3-1b:4:512,qwen35-0.8b:2:128", help="SHAPE:BATCH:LENGTH,..."
    )
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--timeout", type=float, help="seconds a run may take (then reported as out of time)")
    ap.add_argument("--grad-checkpoint", action="store_true", help="both tools recompute blocks backward")
    ap.add_argument(
        "--tiled-mlp", action="store_true", help="also run mlx_dft with --tiled-mlp (and its checkpointing)"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    bench.TIMEOUT = args.timeout
    openblas = bench._find_openblas()
    results = []
    for item in args.shapes.split(","):
        shape, batch, length = (item.split(":") + ["4", "512"])[:3]
        batch_size, length = int(batch), int(length)
        work = bench.work_dir(f"mlx_dft_bench_{shape}_")
        model = make_model(shape, work / "model")
        data = make_data(work / "data", length)
        tokens = bench.avg_tokens(model, data, length) * batch_size
        run = argparse.Namespace(
            iters=args.iters, batch_size=batch_size, num_layers=-1, rank=8, scale=20.0,
            learning_rate=1e-4, max_seq_length=length, report=1, grad_checkpoint=args.grad_checkpoint,
        )  # fmt: skip
        print(f"{shape}: batch {batch_size}, {tokens:.0f} tokens a step; logs in {work}", flush=True)
        row = {"shape": shape, "batch": batch_size, "tokens_per_step": tokens}
        for name in ("stock", "mlx_dft") + (("mlx_dft_tiled",) if args.tiled_mlp else ()):
            t0 = time.time()
            try:
                if name == "stock":
                    r = bench.stock(run, model, data, work, openblas, "stock")
                else:
                    extra = {"tiled_mlp": True, "grad_checkpoint": True} if name == "mlx_dft_tiled" else {}
                    opts = {**bench.lora_options(run, loss="dft"), **extra}
                    r = bench.ours(run, model, data, work, name, **opts)
                row[name] = {"tokens_per_sec": r["steps_per_sec"] * tokens, "peak_gb": r["peak_gb"]}
            except SystemExit as e:
                row[name] = {"error": str(e)}
            row[name]["wall_s"] = round(time.time() - t0, 1)
            print(f"  {name}: {row[name]}", flush=True)
        if "peak_gb" in row["stock"] and "peak_gb" in row["mlx_dft"]:
            row["memory_ratio"] = row["mlx_dft"]["peak_gb"] / row["stock"]["peak_gb"]
            row["speed_ratio"] = row["mlx_dft"]["tokens_per_sec"] / row["stock"]["tokens_per_sec"]
        results.append(row)
        shutil.rmtree(work, ignore_errors=True)
    import mlx.core as mx
    import mlx_lm

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}  # fmt: skip
    print("\n| shape | batch x tokens | stock tokens/s | mlx_dft tokens/s | stock peak GB | "
          "mlx_dft peak GB | memory ratio |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in results:
        s, o = r["stock"], r["mlx_dft"]
        print(f"| {r['shape']} | {r['batch']} x {r['tokens_per_step'] / r['batch']:.0f} | "
              f"{s.get('tokens_per_sec', float('nan')):.0f} | {o.get('tokens_per_sec', float('nan')):.0f} | "
              f"{s.get('peak_gb', float('nan')):.2f} | {o.get('peak_gb', float('nan')):.2f} | "
              f"{r.get('memory_ratio', float('nan')):.2f} |")  # fmt: skip
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
