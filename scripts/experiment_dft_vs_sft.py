"""Does DFT generalise better than SFT? The DFT paper's central claim, at laptop scale.

    python scripts/experiment_dft_vs_sft.py                       # SmolLM2-135M-Instruct (real model)
    python scripts/experiment_dft_vs_sft.py --model tiny          # the bundled tiny LLaMA
    python scripts/experiment_dft_vs_sft.py --recipes sft-lora dft-lora asft-lora --seeds 0 1 2

A model is fine-tuned on a bundled arithmetic task (worked solutions of word problems ending in
"The answer is N.") with each recipe, for the same number of steps and batch size, once per seed.
Each run, and the untuned base model, is then scored by greedy decoding and exact answer checking
on the in-distribution test split and on the out-of-distribution split (more operations than
training ever shows). The report gives every recipe's accuracy and, paired by seed, its
difference from SFT with the same adapter: mean, standard deviation and a 95% t-interval.

Default: SmolLM2-135M-Instruct in float32 (``scripts/fetch_smollm2.py`` puts it in ``models/``)
on ``arith_small`` (numbers 1-20, 1-2 operations; test_ood 3-4 operations): the base model solves
some of these problems in its own words, which is the paper's setting (a model that can already
do the task, tuned on worked solutions). The bundled tiny model uses ``arith``.

Recipes (``--recipes``): sft-lora, dft-lora, asft-lora, eaft-lora, sft2dft-lora (plain SFT for the
first quarter of the steps, then DFT: ``--sft-warmup-steps``), and the same with ``-aligner``.
Runs and checkpoints go to --work (resumable: a rerun reuses finished runs whose settings are
unchanged); the report (report.md, results.json, curves.png, accuracy.png) is copied to --report.
Plan the budget from a measured step time: ``--iters`` steps per run, ``--limit`` problems per set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_dft  # noqa: E402,F401  (OpenBLAS under MLX)
from mlx_dft.evaluation.compare import run_compare  # noqa: E402
from mlx_dft.tasks import ARITH_DIR, ARITH_SMALL_DIR  # noqa: E402

MODELS = {
    "smollm2": (ROOT / "models" / "smollm2-135m-instruct" / "float32", ARITH_SMALL_DIR),
    "tiny": (ROOT / "models" / "tiny-llama", ARITH_DIR),
}
LOSSES = {
    "sft": {"loss": "sft"},
    "dft": {"loss": "dft"},
    "asft": {"loss": "asft"},
    "eaft": {"loss": "eaft"},
    "sft2dft": {"loss": "dft"},  # plus --sft-warmup-steps, set from --iters below
}
ADAPTERS = {"lora": {"fine_tune_type": "lora"}, "aligner": {"fine_tune_type": "aligner", "aligner_tokens": 1}}
# Two-sided 95% critical values of Student's t by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def recipe(name: str, iters: int) -> dict:
    loss, _, adapter = name.partition("-")
    if loss not in LOSSES or adapter not in ADAPTERS:
        raise SystemExit(f"unknown recipe {name!r}: LOSS-ADAPTER, LOSS in {list(LOSSES)}, "
                         f"ADAPTER in {list(ADAPTERS)}")
    opts = {**LOSSES[loss], **ADAPTERS[adapter]}
    if loss == "sft2dft":
        opts["sft_warmup_steps"] = max(1, iters // 4)
    return opts


def paired(diffs: list[float]) -> str:
    """``+0.030 ± 0.012 (95% CI -0.000 to +0.060)`` over seeds."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.3f} (one seed: no interval)"
    sd = statistics.stdev(diffs)
    half = T95.get(len(diffs) - 1, 1.96) * sd / math.sqrt(len(diffs))
    return f"{mean:+.3f} ± {sd:.3f} sd (95% CI {mean - half:+.3f} to {mean + half:+.3f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help=f"{' or '.join(MODELS)}, or a model folder")
    ap.add_argument("--task", default=None, help="task folder (default: the model's task)")
    ap.add_argument("--recipes", nargs="+", default=["sft-lora", "dft-lora"])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=None, help="(default: each adapter's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=100, help="problems per set")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eval-batch-size", type=int, default=50)
    ap.add_argument("--work", default=None, help="(default: runs/experiment-MODEL)")
    ap.add_argument("--report", default=None, help="(default: docs/experiment-MODEL)")
    args = ap.parse_args()

    model, task = MODELS.get(args.model, (Path(args.model).resolve(), ARITH_SMALL_DIR))
    task = Path(args.task).resolve() if args.task else task
    if not (model / "config.json").is_file():
        raise SystemExit(f"model {model} not found (SmolLM2: run `python scripts/fetch_smollm2.py`)")
    tag = args.model if args.model in MODELS else model.name
    work = Path(args.work or ROOT / "runs" / f"experiment-{tag}").resolve()
    report_dir = Path(args.report or ROOT / "docs" / f"experiment-{tag}").resolve()
    os.chdir(ROOT)
    work.mkdir(parents=True, exist_ok=True)

    problems = {
        "in-distribution": {"file": str(task / "test.jsonl"), "question_field": "prompt"},
        "out-of-distribution": {"file": str(task / "test_ood.jsonl"), "question_field": "prompt"},
    }
    common = {
        "model": str(model),
        "data": str(task),
        "iters": args.iters,
        "batch_size": args.batch_size,
        "num_layers": args.num_layers,
        "steps_per_report": max(1, args.iters // 20),
        "steps_per_eval": max(1, args.iters // 4),
        "val_batches": 4,
        "save_every": args.iters,
    }
    if args.learning_rate:
        common["learning_rate"] = args.learning_rate
    plan = {
        "common": common,
        "runs": {name: recipe(name, args.iters) for name in args.recipes},
        "seeds": args.seeds,
        "eval": {
            "problems": problems,
            "max_tokens": args.max_tokens,
            "batch_size": args.eval_batch_size,
            "limit": args.limit,
        },
    }
    cfg = work / "plan.yaml"
    cfg.write_text(json.dumps(plan, indent=2))

    result = run_compare(cfg, work, progress=False)
    summary = json.loads((work / "results.json").read_text())
    base = summary.get("base") or {}

    lines = ["", "## Each recipe against SFT with the same adapter, paired by seed", ""]
    for name in args.recipes:
        loss, _, adapter = name.partition("-")
        ref = f"sft-{adapter}"
        if loss == "sft" or ref not in plan["runs"]:
            continue
        for split in problems:
            ours = result["summary"][name][f"accuracy:{split}:all"]
            sft = result["summary"][ref][f"accuracy:{split}:all"]
            diffs = [a - b for a, b in zip(ours, sft)]
            lines.append(
                f"- {name} − {ref}, {split}: {statistics.fmean(ours):.3f} vs {statistics.fmean(sft):.3f}; "
                f"{paired(diffs)} over {len(diffs)} seeds (per seed {', '.join(f'{d:+.3f}' for d in diffs)})"
            )
    if base:
        lines += ["", "Base model (no fine-tuning): " + json.dumps(base.get("accuracy", base)), ""]
    text = "\n".join(lines)
    print(text)

    report_dir.mkdir(parents=True, exist_ok=True)
    for name in ("curves.png", "accuracy.png", "results.json"):
        if (work / name).is_file():
            shutil.copy(work / name, report_dir / name)
    (report_dir / "report.md").write_text((work / "report.md").read_text() + text + "\n")
    print(f"report: {report_dir / 'report.md'}")


if __name__ == "__main__":
    main()
