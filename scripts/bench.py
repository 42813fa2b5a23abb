"""Time mlx_dft against stock ``mlx_lm lora`` on the same model, data, batch and iterations.

    python scripts/bench.py                      # bundled tiny LLaMA, bundled task
    python scripts/bench.py --shape llama-40m    # a random-weight 40M LLaMA with a 32k vocabulary
    python scripts/bench.py --model PATH --iters 100 --batch-size 8

Runs, each in its own process (so each gets the BLAS it would get for a user):
  stock/reference  `mlx_lm lora` as installed (MLX's bundled reference BLAS on Linux), through
                   scripts/stock_lora.py (mlx-lm's own parser and train_model, plus a callback
                   that reports the step rate and peak memory)
  stock/openblas   `mlx_lm lora` with OpenBLAS preloaded (LD_PRELOAD): the same BLAS as ours
  ours/sft, ours/dft  `mlx_dft train`, out of the box

With --alpaca-shaped the data is generated with lengths spread like an instruction dataset
(Alpaca: many short examples, a long tail), and with --pack a further run, ours/dft --pack,
trains on the same examples packed into rows of --max-seq-length tokens (--pack-batch-size rows
a step, by default about the tokens of a stock batch).

The machine's limit: the best float32 matrix-multiply rate measured here (through MLX, on the
BLAS ours uses) at the model's shapes, divided by the model's training FLOPs per token (about
4 per parameter the matmuls touch: the forward pass, and the backward pass to the activations;
LoRA's own products and attention add a little). Each run's share of that limit is reported.

Both tools train LoRA (same rank, scale, modules and layers), AdamW at the same constant
learning rate, the same batch size and maximum length, on the same prompt/completion data
with the prompt masked, for the same number of iterations; validation is reduced to one
batch. Throughput is measured from each tool's own per-report step rate, leaving out the
first report (compilation), and converted to tokens/s with the same average tokens per
batch for both (non-padding tokens, prompt included). Peak memory is MLX's peak as each tool
reports it. Writes a markdown table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_dft._blas import _find_openblas  # noqa: E402  (also puts OpenBLAS under MLX here)

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ bos_token }}{{ m['content'] }}{% endif %}{% endfor %}"
)
SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "llama-40m": (512, 8, 8, 4, 1408, 32000),
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, 151936),
}


def work_dir(prefix: str) -> Path:
    """A fresh folder for a benchmark's model copy, data, runs and logs. The model weights in it
    (``model*.safetensors``, ~2.4 GB at the 0.6B shape) are deleted when the script exits, however it
    exits short of a kill; the logs, metrics and adapters stay for reading."""
    work = Path(tempfile.mkdtemp(prefix=prefix))

    def drop_weights() -> None:
        for folder, _, files in os.walk(work):  # links are not followed: only our own copies go
            for name in files:
                f = Path(folder) / name
                if name.startswith("model") and name.endswith(".safetensors") and not f.is_symlink():
                    f.unlink(missing_ok=True)

    atexit.register(drop_weights)
    return work


def prepare_model(args, work: Path) -> Path:
    """A copy of the model whose tokenizer has a plain chat template (prompt + completion + EOS),
    so that stock mlx-lm can read prompt/completion data and mask the prompt."""
    src = Path(args.model) if args.model else ROOT / "models" / "tiny-llama"
    dst = work / "model"
    if args.shape:
        make_random_model(args.shape, src, dst)
    else:
        shutil.copytree(src, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


def make_random_model(shape: str, tokenizer_src: Path, dst: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen3

    h, n, heads, kv, inter, vocab = SHAPES[shape]
    cfg = {
        "model_type": "qwen3" if shape.startswith("qwen3") else "llama",
        "hidden_size": h,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "head_dim": h // heads,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    mod = qwen3 if cfg["model_type"] == "qwen3" else llama
    mx.random.seed(0)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    dst.mkdir(parents=True)
    weights = {
        k: mx.random.normal(v.shape) * 0.02 if v.ndim > 1 else v for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_src / f, dst / f)


WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live"
).split()


def make_alpaca_shaped(dst: Path, n: int = 2000, seed: int = 0) -> None:
    """prompt/completion records with word counts drawn like Alpaca's (log-normal: instructions
    median ~20 words, responses median ~60 with a long tail to ~800), deterministic."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS, size=max(1, words)))

    for split, count in (("train", n), ("valid", max(8, n // 20))):
        with open(dst / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                p = int(rng.lognormal(np.log(20), 0.6))
                c = min(int(rng.lognormal(np.log(60), 0.9)), 800)
                f.write(json.dumps({"prompt": text(p) + "\n", "completion": text(c)}) + "\n")


def prepare_data(args, work: Path) -> tuple[Path, float]:
    dst = work / "data"
    if getattr(args, "alpaca_shaped", False):
        make_alpaca_shaped(dst)
        return dst
    src = Path(args.data) if args.data else ROOT / "mlx_dft" / "tasks" / "arith"
    dst.mkdir()
    for split in ("train", "valid"):
        shutil.copy(src / f"{split}.jsonl", dst / f"{split}.jsonl")
    return dst


def avg_tokens(model: Path, data: Path, max_seq_length: int = 2048, pack: bool = False) -> float:
    """Mean non-padding tokens of an example (of a packed row with ``pack``), as training reads them."""
    from mlx_lm.utils import load_tokenizer

    from mlx_dft.data import DataConfig, load_split, pack_dataset

    tok = load_tokenizer(model)
    ds = load_split(data / "train.jsonl", "train", tok, DataConfig(max_seq_length=max_seq_length))
    if pack:
        ds = pack_dataset(ds, max_seq_length)
    return ds.n_tokens / len(ds)


def train_flops_per_token(model: Path) -> tuple[float, int]:
    """(FLOPs per trained token, parameters the matmuls touch): 4 per parameter of every linear
    layer and of the output projection (forward, and backward to the activations)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_dft.models import build_model, model_config

    cfg = model_config(model)
    net = build_model(cfg, str(model))  # lazy: nothing is materialised
    n = sum(m.weight.size for _, m in net.named_modules() if isinstance(m, nn.Linear))
    if cfg.get("tie_word_embeddings", False):
        n += dict(tree_flatten(net.parameters()))["model.embed_tokens.weight"].size
    return 4.0 * n, n


def sgemm_gflops(model: Path, tokens: int) -> float:
    """The best float32 matmul rate (GFLOP/s) through MLX at this model's layer shapes for a
    batch of ``tokens`` rows (``mlx_dft plan``'s measurement, over a second a shape)."""
    from mlx_dft.models import model_config
    from mlx_dft.plan import matmul_gflops

    cfg = model_config(model)
    return matmul_gflops(cfg["hidden_size"], cfg["intermediate_size"], tokens, seconds=1.0)


TIMEOUT: float | None = None  # seconds a benchmark run may take (None: no limit)


def run(cmd: list[str], env: dict, log: Path) -> str:
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        text = [s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (e.stdout, e.stderr)]
        log.write_text(text[0] + "\n--- stderr ---\n" + text[1])
        raise SystemExit(f"ran past the {TIMEOUT:.0f} s limit: see {log}") from None
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode < 0:
        import signal

        why = signal.Signals(-p.returncode).name + (" (out of memory)" if p.returncode == -9 else "")
        raise SystemExit(f"killed by {why}: see {log}")
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd[:4])} ...): see {log}")
    return p.stdout + p.stderr


def stock(args, model: Path, data: Path, work: Path, blas: str | None, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if blas:
        env["LD_PRELOAD"] = blas
    cfg = work / f"{name}.yaml"
    cfg.write_text(json.dumps({"lora_parameters": {"rank": args.rank, "scale": args.scale, "dropout": 0.0}}))
    out = run(
        [
            sys.executable,
            str(ROOT / "scripts" / "stock_lora.py"),
            "--model",
            str(model),
            "--train",
            "--data",
            str(data),
            "--iters",
            str(args.iters),
            "--batch-size",
            str(args.batch_size),
            "--num-layers",
            str(args.num_layers),
            "--learning-rate",
            str(args.learning_rate),
            "--optimizer",
            "adamw",
            "--mask-prompt",
            *(["--grad-checkpoint"] if getattr(args, "grad_checkpoint", False) else []),
            "--steps-per-report",
            str(args.report),
            "--steps-per-eval",
            str(10**6),
            "--val-batches",
            "1",
            "--save-every",
            str(10**6),
            "--max-seq-length",
            str(args.max_seq_length),
            "--adapter-path",
            str(work / name),
            "-c",
            str(cfg),
        ],
        env,
        work / f"{name}.log",
    )
    reports = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("REPORT ")]
    return {
        "steps_per_sec": steady([r["iterations_per_second"] for r in reports]),
        "peak_gb": max(r["peak_memory"] for r in reports),
        "final_train_ce": reports[-1]["train_loss"],
    }


def flags(**options) -> list[str]:
    out = []
    for k, v in options.items():
        flag = f"--{k.replace('_', '-')}"
        out += [flag] if v is True else [flag, str(v)]
    return out


def ours(args, model: Path, data: Path, work: Path, name: str, **options) -> dict:
    """One `mlx_dft train` run; ``options`` are extra long options (e.g. loss="dft")."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    common = dict(
        model=model,
        data=data,
        iters=args.iters,
        batch_size=args.batch_size,
        optimizer="adamw",
        lr_schedule="constant",
        warmup=0,
        steps_per_report=args.report,
        steps_per_eval=10**6,
        val_batches=1,
        save_every=10**6,
        accuracy_problems=0,
        max_seq_length=args.max_seq_length,
        output=work / name,
    )
    if getattr(args, "grad_checkpoint", False):
        common["grad_checkpoint"] = True
    common.update(options)
    cmd = [sys.executable, "-m", "mlx_dft", "train", *flags(**common), "--use-chat-template", "--overwrite"]
    run(cmd, env, work / f"{name}.log")
    recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "steps_per_sec" in r]
    return {
        "steps_per_sec": steady([r["steps_per_sec"] for r in train]),
        "peak_gb": max(r["peak_memory_gb"] for r in train),
        "final_train_ce": train[-1]["train_ce"],
    }


def lora_options(args, **extra) -> dict:
    return dict(
        num_layers=args.num_layers,
        lora_rank=args.rank,
        lora_scale=args.scale,
        learning_rate=args.learning_rate,
        **extra,
    )


def steady(rates: list[float]) -> float:
    """Mean step rate over the reports after the first (which includes compilation)."""
    later = rates[1:] or rates
    return len(later) / sum(1.0 / r for r in later)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the bundled tiny LLaMA)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="benchmark a random-weight model of this shape")
    ap.add_argument(
        "--data", help="folder with train/valid.jsonl of prompt/completion records (default: bundled task)"
    )
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-layers", type=int, default=-1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--report", type=int, default=10, help="steps per report")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each fast run (best kept)")
    ap.add_argument(
        "--skip-reference", action="store_true", help="skip stock mlx-lm on the reference BLAS (slow)"
    )
    ap.add_argument(
        "--alpaca-shaped", action="store_true", help="generate instruction-shaped data"
    )
    ap.add_argument("--pack", action="store_true", help="add a run of ours with --pack")
    ap.add_argument("--pack-batch-size", type=int, help="packed rows a step (default: about a stock batch)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    openblas = _find_openblas()
    work = work_dir("mlx_dft_bench_")
    model = prepare_model(args, work)
    data = prepare_data(args, work)
    tokens_per_step = avg_tokens(model, data, args.max_seq_length) * args.batch_size
    print(
        f"model {args.shape or args.model or 'bundled tiny-llama'}, batch {args.batch_size}, "
        f"{args.iters} iters, "
        f"{tokens_per_step:.0f} tokens/step; logs in {work}",
        flush=True,
    )
    flops_per_token, n_params = train_flops_per_token(model)
    gflops = sgemm_gflops(model, max(64, int(tokens_per_step)))
    limit = gflops * 1e9 / flops_per_token
    print(
        f"limit: float32 matmul {gflops:.0f} GFLOP/s here / {flops_per_token / 1e9:.2f} GFLOP per token "
        f"({n_params / 1e6:.0f}M parameters in matmuls) = {limit:,.0f} tokens/s",
        flush=True,
    )
    tokens_of = {}  # run name -> non-padding tokens a step, when not tokens_per_step
    if args.pack:
        row_tokens = avg_tokens(model, data, args.max_seq_length, pack=True)
        pack_batch = args.pack_batch_size or max(1, round(tokens_per_step / row_tokens))
        tokens_of["mlx_dft dft --pack"] = row_tokens * pack_batch
        print(f"packed: {row_tokens:.0f} tokens a row, {pack_batch} rows a step", flush=True)

    results = {}
    if not args.skip_reference:
        results["stock mlx_lm lora, as installed"] = stock(args, model, data, work, None, "stock-ref")
    # The fast runs are repeated, interleaved, and each keeps its best repeat: timing noise on
    # a shared machine only ever slows a run down.
    runs = {}
    if openblas:
        runs["stock mlx_lm lora, OpenBLAS"] = lambda i: stock(
            args, model, data, work, openblas, f"stock-openblas-{i}"
        )
    runs["mlx_dft sft"] = lambda i: ours(
        args, model, data, work, f"ours-sft-{i}", **lora_options(args, loss="sft")
    )
    runs["mlx_dft dft"] = lambda i: ours(
        args, model, data, work, f"ours-dft-{i}", **lora_options(args, loss="dft")
    )
    if args.pack:
        runs["mlx_dft dft --pack"] = lambda i: ours(
            args, model, data, work, f"ours-dft-pack-{i}", **lora_options(args, loss="dft"),
            pack=True, batch_size=pack_batch,
        )  # fmt: skip
    for i in range(args.repeats):
        for name, fn in runs.items():
            r = fn(i)
            best = results.get(name)
            if best is None or r["steps_per_sec"] > best["steps_per_sec"]:
                r["peak_gb"] = max(r["peak_gb"], best["peak_gb"]) if best else r["peak_gb"]
                results[name] = r
    for name, r in results.items():
        r["tokens_per_sec"] = r["steps_per_sec"] * tokens_of.get(name, tokens_per_step)
        r["share_of_limit"] = r["tokens_per_sec"] / limit

    ref = results.get("stock mlx_lm lora, OpenBLAS")
    print(
        "\n| run | real tokens/s | share of the matmul limit | peak memory (GB) | final train CE |"
        "\n|---|---:|---:|---:|---:|"
    )
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens_per_sec']:,.0f} | {r['share_of_limit']:.0%} | {r['peak_gb']:.3f} "
            f"| {r['final_train_ce']:.3f} |"
        )
    dft, sft = results["mlx_dft dft"], results["mlx_dft sft"]
    ratios = {}
    if ref:
        ratios["dft tokens/s vs stock (same BLAS)"] = dft["tokens_per_sec"] / ref["tokens_per_sec"]
        ratios["dft peak memory vs stock (same BLAS)"] = dft["peak_gb"] / ref["peak_gb"]
    if "stock mlx_lm lora, as installed" in results:
        ratios["dft tokens/s vs stock as installed"] = (
            dft["tokens_per_sec"] / results["stock mlx_lm lora, as installed"]["tokens_per_sec"]
        )
    if ref and "mlx_dft dft --pack" in results:
        packed = results["mlx_dft dft --pack"]
        speedup = packed["tokens_per_sec"] / ref["tokens_per_sec"]
        ratios["dft --pack real tokens/s vs stock (same BLAS)"] = speedup
        ratios["dft --pack peak memory vs stock (same BLAS)"] = packed["peak_gb"] / ref["peak_gb"]
    ratios["dft cost over sft (time per step)"] = sft["tokens_per_sec"] / dft["tokens_per_sec"] - 1.0
    print()
    for k, v in ratios.items():
        print(f"- {k}: {v * 100:+.1f}%" if "cost" in k else f"- {k}: {v:.2f}x")
    print(
        "  (separate runs drift by 10-20% on a shared machine; scripts/bench_loss.py measures the "
        "DFT cost with SFT and DFT steps interleaved in one process)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": results,
                    "ratios": ratios,
                    "limit": {"sgemm_gflops": gflops, "flops_per_token": flops_per_token, "tokens_s": limit},
                    "args": vars(args),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
