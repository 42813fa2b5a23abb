"""Measure the peak memory and step time of short training runs, for `mlx_dft plan` to be checked
against (tests/test_plan.py reads the file this writes).

    python scripts/plan_grid.py [--out tests/data/plan_measurements.json]
    python scripts/plan_grid.py --fit      # the constants of mlx_dft/plan.py for those runs

Each run: `mlx_dft train` in its own process, on a random-weight model of a named shape (or the
bundled tiny model), data whose every example is exactly --max-seq-length tokens long (so each
batch is batch x length tokens), 3 steps, one validation batch, no held-out accuracy; the peak
is MLX's peak over the training steps as the run records it, the step time the mean of the
steps after the first (compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import ROOT, WORDS, make_random_model, work_dir  # noqa: E402

# (name, shape or None for the bundled model, options)
GRID = [
    ("tiny lora b4 l128", None, dict(batch_size=4, max_seq_length=128)),
    ("tiny lora b16 l256", None, dict(batch_size=16, max_seq_length=256)),
    ("tiny full b8 l256", None, dict(batch_size=8, max_seq_length=256, fine_tune_type="full")),
    ("tiny aligner b8 l512", None, dict(batch_size=8, max_seq_length=512, fine_tune_type="aligner")),
    ("40m lora b4 l256", "llama-40m", dict(batch_size=4, max_seq_length=256)),
    ("40m lora b8 l512", "llama-40m", dict(batch_size=8, max_seq_length=512)),
    ("40m dora b4 l512", "llama-40m", dict(batch_size=4, max_seq_length=512, fine_tune_type="dora")),
    ("40m full b2 l256", "llama-40m", dict(batch_size=2, max_seq_length=256, fine_tune_type="full")),
    ("40m aligner b8 l256", "llama-40m", dict(batch_size=8, max_seq_length=256, fine_tune_type="aligner")),
    ("40m lora ckpt b8 l512", "llama-40m", dict(batch_size=8, max_seq_length=512, grad_checkpoint=True)),
    ("40m lora 2 layers b8 l256", "llama-40m", dict(batch_size=8, max_seq_length=256, num_layers=2)),
    ("tiny dora b8 l256", None, dict(batch_size=8, max_seq_length=256, fine_tune_type="dora")),
    ("tiny aligner b4 l256", None, dict(batch_size=4, max_seq_length=256, fine_tune_type="aligner")),
    ("tiny full b16 l128", None, dict(batch_size=16, max_seq_length=128, fine_tune_type="full")),
    ("tiny lora ckpt b16 l512", None, dict(batch_size=16, max_seq_length=512, grad_checkpoint=True)),
    ("40m aligner b4 l512", "llama-40m", dict(batch_size=4, max_seq_length=512, fine_tune_type="aligner")),
    ("40m dora b8 l256", "llama-40m", dict(batch_size=8, max_seq_length=256, fine_tune_type="dora")),
    ("40m full b4 l128", "llama-40m", dict(batch_size=4, max_seq_length=128, fine_tune_type="full")),
    ("40m lora ckpt b4 l256", "llama-40m", dict(batch_size=4, max_seq_length=256, grad_checkpoint=True)),
    ("0.6b lora b1 l128", "qwen3-0.6b", dict(batch_size=1, max_seq_length=128)),
    ("0.6b lora b2 l256", "qwen3-0.6b", dict(batch_size=2, max_seq_length=256)),
    ("0.6b lora ckpt b2 l256", "qwen3-0.6b", dict(batch_size=2, max_seq_length=256, grad_checkpoint=True)),
    ("0.6b aligner b2 l128", "qwen3-0.6b", dict(batch_size=2, max_seq_length=128, fine_tune_type="aligner")),
]


def write_data(dst: Path, length: int) -> None:
    """Text records long enough to be cut at ``length`` tokens, all of them."""
    import random

    rng = random.Random(length)
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 64), ("valid", 8)):
        with open(dst / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(length * 2))}) + "\n")


def measure(model: Path, data: Path, out: Path, options: dict) -> dict:
    cmd = [sys.executable, "-m", "mlx_dft", "train", "--model", str(model), "--data", str(data),
           "--adapter-path", str(out), "--iters", "3", "--steps-per-report", "1", "--val-batches", "1",
           "--steps-per-eval", "1000", "--save-every", "1000", "--accuracy-problems", "0",
           "--learning-rate", "1e-5"]  # fmt: skip
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        cmd += [flag] if v is True else [flag, str(v)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{p.stderr}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "steps_per_sec" in r]
    later = train[1:] or train
    return {
        "peak_gb": max(r["peak_memory_gb"] for r in train),
        "step_seconds": sum(1.0 / r["steps_per_sec"] for r in later) / len(later),
    }


def nnls(a, b, iters: int = 200):
    """Non-negative least squares (Lawson and Hanson's active-set method)."""
    import numpy as np

    n = a.shape[1]
    x, active = np.zeros(n), np.zeros(n, bool)
    for _ in range(iters):
        w = a.T @ (b - a @ x)
        if active.all() or w[~active].max() <= 1e-12 * max(1.0, abs(w).max()):
            break
        active[np.argmax(np.where(active, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            if (z[active] > 0).all():
                x = z
                break
            neg = active & (z <= 0)
            x = x + np.min(x[neg] / (x[neg] - z[neg])) * (z - x)
            active &= x > 1e-15
    return x


def fit(path: Path) -> None:
    """Non-negative least-squares coefficients of mlx_dft/plan.py's terms for the recorded runs, each
    run weighted by its measured peak (so the fit minimises relative errors), their in-sample and
    leave-one-out errors, and the step-time efficiency."""
    import numpy as np

    from mlx_dft import plan
    from mlx_dft.config import TrainConfig

    record = json.loads(path.read_text())
    work = work_dir("mlx_dft_plan_fit_")
    rows, known, measured, flops, seconds, names = [], [], [], [], [], []
    keys = [k for k in plan.COEFFICIENTS if k not in plan.COUNTED]  # counted terms stay as they are
    for r in record["runs"]:
        folder = work / r["name"].replace(" ", "-")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(r["config"]))
        options = dict(r["options"])
        options["adapter"] = options.pop("fine_tune_type", "lora")
        cfg = TrainConfig(model=str(folder), **options)
        p = plan.estimate(cfg, cfg.max_seq_length, gflops=record["gflops"][str(r["shape"])])
        rows.append([p.terms[k] for k in keys])
        known.append(p.known + sum(plan.COEFFICIENTS[k] * p.terms[k] for k in plan.COUNTED))
        measured.append(r["peak_gb"] * 1e9)
        flops.append(p.flops / (p.gflops * 1e9))
        seconds.append(r["step_seconds"])
        names.append(r["name"])
    a, peak = np.array(rows), np.array(measured)
    y, w = peak - np.array(known), 1.0 / peak
    coef = nnls(a * w[:, None], y * w)
    print("COEFFICIENTS = {")
    for k, c in zip(keys, coef):
        print(f'    "{k}": {c:.4g},')
    print("}")
    loo = []
    for j in range(len(y)):
        keep = np.arange(len(y)) != j
        cj = nnls((a * w[:, None])[keep], (y * w)[keep])
        loo.append((peak[j] - y[j] + a[j] @ cj) / peak[j] - 1)
    for n, e, lo in zip(names, (peak - y + a @ coef) / peak - 1, loo):
        print(f"{n:28s} in-sample {e:+.1%}  left out {lo:+.1%}")
    b = np.stack([np.array(flops), np.ones(len(flops))], axis=1) / np.array(seconds)[:, None]
    (inv_eff, overhead), *_ = np.linalg.lstsq(b, np.ones(len(flops)), rcond=None)
    print(f"MATMUL_EFFICIENCY = {1 / inv_eff:.3g}\nSTEP_OVERHEAD_S = {overhead:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "plan_measurements.json"))
    ap.add_argument(
        "--only", help="run only the grid entries whose name contains this (merged into --out if it exists)"
    )
    ap.add_argument("--missing", action="store_true", help="run only the entries --out does not hold yet")
    ap.add_argument("--fit", action="store_true", help="fit plan's constants to --out instead of measuring")
    args = ap.parse_args()
    if args.fit:
        fit(Path(args.out))
        return
    work = work_dir("mlx_dft_plan_grid_")
    models: dict[str | None, Path] = {None: ROOT / "models" / "tiny-llama"}
    out = Path(args.out)
    kept = json.loads(out.read_text())["runs"] if (args.only or args.missing) and out.is_file() else []
    have = {r["name"] for r in kept}
    rows = []
    for name, shape, options in GRID:
        if (args.only and args.only not in name) or (args.missing and name in have):
            continue
        if shape not in models:
            models[shape] = work / shape
            make_random_model(shape, ROOT / "models" / "tiny-llama", models[shape])
        data = work / f"data-{options['max_seq_length']}"
        if not data.exists():
            write_data(data, options["max_seq_length"])
        t0 = time.perf_counter()
        got = measure(models[shape], data, work / name.replace(" ", "-"), options)
        config = json.loads((models[shape] / "config.json").read_text())
        row = {"name": name, "shape": shape, "config": config, "options": options, **got}
        rows.append(row)
        print(f"{name}: peak {got['peak_gb']:.3f} GB, step {got['step_seconds']:.3f} s "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    import mlx.core as mx

    import mlx_dft  # noqa: F401  (OpenBLAS under MLX, as the runs had)
    from mlx_dft.plan import matmul_gflops

    order = [name for name, _, _ in GRID]
    new = {r["name"] for r in rows}
    rows = sorted([r for r in kept if r["name"] not in new] + rows, key=lambda r: order.index(r["name"]))
    record = {
        "gflops": {
            str(shape): matmul_gflops(c["hidden_size"], c["intermediate_size"], 1024)
            for shape, c in {r["shape"]: r["config"] for r in rows}.items()
        },
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "mlx": mx.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
