"""Does DFT generalise better than SFT? The DFT paper's central claim, at laptop scale.

    python scripts/experiment_dft_vs_sft.py                       # SmolLM2-135M-Instruct (real model)
    python scripts/experiment_dft_vs_sft.py --model tiny          # the bundled tiny LLaMA
    python scripts/experiment_dft_vs_sft.py --recipes sft-lora dft-lora asft-lora --seeds 0 1 2
    python scripts/experiment_dft_vs_sft.py --recipes family --one-seed asft-lora sft2dft-lora \
        prift-lora deft-lora --iters 16 --limit 50 --work runs/experiment-family \
        --report docs/experiment-smollm2-family        # the family, with forgetting

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
first quarter of the steps, then DFT: ``--sft-warmup-steps``), prift-lora, deft-lora, psft-lora
(PSFT with ``psft_minibatches`` 4, not the default 8, so that a short run has several groups), and
the same with ``-aligner``; ``--recipes family`` is all eight losses with LoRA. ``--one-seed``
names recipes to run with the first seed only (a smaller budget for the secondary rows).

Forgetting (``--forgetting-tokens``, default 48; 0 skips it): the base model answers the bundled
general prompts (``mlx_dft/tasks/general_prompts.jsonl``) greedily, once; the base model and every
run are scored by the mean per-token NLL of those answers given the prompt (teacher-forced, chat
template, answer tokens only; :mod:`mlx_dft.evaluation.forgetting`). A run's forgetting is its NLL
minus the base model's (0: the base model's behaviour kept), reported per recipe and paired by seed
against SFT, with forgetting.png (accuracy against forgetting, one point per run).

Runs and checkpoints go to --work (resumable: a rerun reuses finished runs whose settings are
unchanged); the report (report.md, results.json, curves.png, accuracy.png, forgetting.png) is
copied to --report. Plan the budget from a measured step time: ``--iters`` steps per run,
``--limit`` problems per set.
"""

from __future__ import annotations

import argparse
import hashlib
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
from mlx_dft.evaluation.forgetting import answer_nll, base_answers, load_prompts  # noqa: E402
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
    "prift": {"loss": "prift"},
    "deft": {"loss": "deft"},
    # PSFT's previous policy is refreshed every 4 optimizer steps (default 8), so that a short run
    # has several groups: 16 steps are 4 groups.
    "psft": {"loss": "psft", "psft_minibatches": 4},
}
# Named recipe lists for --recipes.
PRESETS = {
    "family": [f"{loss}-lora" for loss in ("sft", "dft", "asft", "eaft", "sft2dft", "prift", "deft", "psft")],
}
ADAPTERS = {"lora": {"fine_tune_type": "lora"}, "aligner": {"fine_tune_type": "aligner", "aligner_tokens": 1}}
# Two-sided 95% critical values of Student's t by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def recipe(name: str, iters: int) -> dict:
    loss, _, adapter = name.partition("-")
    if loss not in LOSSES or adapter not in ADAPTERS:
        raise SystemExit(
            f"unknown recipe {name!r}: LOSS-ADAPTER, LOSS in {list(LOSSES)}, ADAPTER in {list(ADAPTERS)}"
        )
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


def forgetting(model: Path, work: Path, runs: list[dict], max_tokens: int) -> dict:
    """Each run's NLL of the base model's own greedy answers to the bundled general prompts, and the
    base model's: forgetting = run - base. Cached in the work folder (the base answers) and in each
    run's folder, keyed by the answers and the run's adapter file."""
    from mlx_dft import api

    prompts = load_prompts()
    key = {"model": str(model), "max_tokens": max_tokens, "prompts": prompts}
    cache = work / "forgetting-base.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") != key:
        net, tok = api.load(str(model))
        answers = base_answers(net, tok, prompts, max_tokens=max_tokens)
        score = answer_nll(net, tok, prompts, answers)
        saved = {"key": key, "answers": answers, "score": score}
        cache.write_text(json.dumps(saved, indent=1))
    answers, base = saved["answers"], saved["score"]
    digest = hashlib.sha256(json.dumps(answers).encode()).hexdigest()
    out = {"base": base, "runs": []}
    for r in runs:
        run_dir = work / "runs" / f"{r['name']}-seed{r['seed']}"
        weights = run_dir / "adapters.safetensors"
        stamp = [weights.stat().st_mtime_ns, weights.stat().st_size] if weights.is_file() else None
        path = run_dir / "forgetting.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        if done.get("answers") != digest or done.get("adapter") != stamp:
            net, tok = api.load(str(model), run_dir)
            done = {"answers": digest, "adapter": stamp, "score": answer_nll(net, tok, prompts, answers)}
            path.write_text(json.dumps(done))
        score = done["score"]
        out["runs"].append(
            {
                "name": r["name"],
                "seed": r["seed"],
                "nll": score["nll"],
                "forgetting": score["nll"] - base["nll"],
                "reproduced": score["reproduced"],
                "accuracy": r["accuracy"],
            }
        )
        print(
            f"forgetting {r['name']} seed {r['seed']}: NLL {score['nll']:.3f} "
            f"({score['nll'] - base['nll']:+.3f}), reproduced {score['reproduced']:.2f}",
            flush=True,
        )
    return out


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else ""
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def forgetting_report(f: dict, recipes: list[str], splits: list[str], base_acc: dict) -> list[str]:
    base = f["base"]
    by = {name: [r for r in f["runs"] if r["name"] == name] for name in recipes}
    lines = [
        "",
        "## Forgetting: the base model's own answers to general prompts",
        "",
        f"{base['answers']} bundled general prompts (`mlx_dft/tasks/general_prompts.jsonl`), answered by the "
        f"base model greedily ({base['tokens']} answer tokens). NLL: mean per-token negative log-likelihood "
        "of those answers given the prompt (teacher-forced, chat template); forgetting: NLL − the base "
        f"model's ({base['nll']:.3f}); 0 = the base model's behaviour kept. Reproduced: share of answers "
        "whose first 16 tokens the model reproduces greedily. Mean ± sd over seeds.",
        "",
        "| recipe | seeds | "
        + " | ".join(f"accuracy {s}" for s in splits)
        + " | NLL of base answers | forgetting | reproduced |",
        "|---|---:|" + "---:|" * (len(splits) + 3),
        "| base model | | "
        + " | ".join(f"{base_acc.get(s, float('nan')):.3f}" for s in splits)
        + f" | {base['nll']:.3f} | 0 | {base['reproduced']:.3f} |",
    ]
    for name, rs in by.items():
        if not rs:
            continue
        lines.append(
            f"| {name} | {len(rs)} | "
            + " | ".join(_ms([r["accuracy"][s] for r in rs]) for s in splits)
            + f" | {_ms([r['nll'] for r in rs])} | {_ms([r['forgetting'] for r in rs])}"
            f" | {_ms([r['reproduced'] for r in rs])} |"
        )
    lines += [
        "",
        "Forgetting against SFT with the same adapter, paired by seed (negative: forgets less):",
        "",
    ]
    for name, rs in by.items():
        loss, _, adapter = name.partition("-")
        ref = {r["seed"]: r for r in by.get(f"sft-{adapter}", [])}
        pairs = [(r, ref[r["seed"]]) for r in rs if r["seed"] in ref]
        if loss == "sft" or not pairs:
            continue
        diffs = [a["forgetting"] - b["forgetting"] for a, b in pairs]
        lines.append(
            f"- {name} − sft-{adapter}: {paired(diffs)} over {len(diffs)} seed(s) "
            f"(per seed {', '.join(f'{d:+.3f}' for d in diffs)})"
        )
    return lines


def forgetting_plot(f: dict, recipes: list[str], splits: list[str], base_acc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, split in zip(axes[0], splits):
        for i, name in enumerate(recipes):
            rs = [r for r in f["runs"] if r["name"] == name]
            ax.scatter(
                [r["forgetting"] for r in rs],
                [r["accuracy"][split] for r in rs],
                color=colours(i % 10),
                label=name,
                alpha=0.8,
            )
        ax.scatter(
            [0], [base_acc.get(split, float("nan"))], color="black", marker="*", s=150, label="base model"
        )
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("forgetting: NLL of the base model's answers − base (nats/token)")
        ax.set_ylabel(f"accuracy {split}")
        ax.set_title(f"{split}: one point per run")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help=f"{' or '.join(MODELS)}, or a model folder")
    ap.add_argument("--task", default=None, help="task folder (default: the model's task)")
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=["sft-lora", "dft-lora"],
        help=f"LOSS-ADAPTER names, or a preset: {', '.join(PRESETS)} (all 8 losses with LoRA)",
    )
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=None, help="(default: each adapter's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=100, help="problems per set")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eval-batch-size", type=int, default=50)
    ap.add_argument(
        "--forgetting-tokens",
        type=int,
        default=48,
        help="new tokens of the base model's answers to the general prompts (0: no forgetting)",
    )
    ap.add_argument(
        "--one-seed",
        nargs="*",
        default=[],
        help="recipes (or a preset) of --recipes to run with the first of --seeds only (a smaller budget)",
    )
    ap.add_argument("--work", default=None, help="(default: runs/experiment-MODEL)")
    ap.add_argument("--report", default=None, help="(default: docs/experiment-MODEL)")
    args = ap.parse_args()
    args.recipes = [r for name in args.recipes for r in PRESETS.get(name, [name])]
    args.one_seed = [r for name in args.one_seed for r in PRESETS.get(name, [name])]

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
    evaluation = {
        "problems": problems,
        "max_tokens": args.max_tokens,
        "batch_size": args.eval_batch_size,
        "limit": args.limit,
    }
    # Two compare plans into the same work folder when --one-seed names recipes: the others with
    # every seed, those with the first seed only. Finished runs are reused either way.
    one = [r for r in args.recipes if r in args.one_seed]
    groups = [([r for r in args.recipes if r not in one], args.seeds, ""), (one, args.seeds[:1], "-one-seed")]
    result = {"runs": [], "summary": {}}
    compare_reports, base = [], {}
    for recipes, seeds, suffix in groups:
        if not recipes:
            continue
        plan = {
            "common": common,
            "runs": {name: recipe(name, args.iters) for name in recipes},
            "seeds": seeds,
            "eval": evaluation,
        }
        # Beside the work folder, not in it: compare refuses an output folder that holds its input.
        cfg = work.parent / f"{work.name}{suffix}.plan.yaml"
        cfg.write_text(json.dumps(plan, indent=2))
        part = run_compare(cfg, work, progress=False)
        result["runs"] += part["runs"]
        result["summary"].update(part["summary"])
        base = json.loads((work / "results.json").read_text()).get("base") or base
        text = (work / "report.md").read_text()
        for png in ("curves", "accuracy"):
            if suffix and (work / f"{png}.png").is_file():
                shutil.copy(work / f"{png}.png", work / f"{png}{suffix}.png")
                text = text.replace(f"{png}.png", f"{png}{suffix}.png")
        if suffix:
            shutil.copy(work / "results.json", work / f"results{suffix}.json")
            text = f"\n## Recipes run with seed {seeds[0]} only\n\n" + text
        elif (work / "results.json").is_file():
            for name in ("curves.png", "accuracy.png", "results.json"):
                if (work / name).is_file():
                    shutil.copy(work / name, work / f"{name}.all-seeds")
        compare_reports.append(text)
    for name in ("curves.png", "accuracy.png", "results.json"):  # the all-seeds group's under the plain names
        if one and groups[0][0] and (work / f"{name}.all-seeds").is_file():
            shutil.copy(work / f"{name}.all-seeds", work / name)
    lines = ["", "## Each recipe against SFT with the same adapter, paired by seed", ""]
    for name in args.recipes:
        loss, _, adapter = name.partition("-")
        ref = f"sft-{adapter}"
        if loss == "sft" or ref not in args.recipes:
            continue
        for split in problems:
            ours = result["summary"][name][f"accuracy:{split}:all"]
            sft = result["summary"][ref][f"accuracy:{split}:all"]
            diffs = [a - b for a, b in zip(ours, sft)]
            lines.append(
                f"- {name} − {ref}, {split}: {statistics.fmean(ours):.3f} vs {statistics.fmean(sft):.3f}; "
                f"{paired(diffs)} over {len(diffs)} seed(s) (seeds {', '.join(f'{d:+.3f}' for d in diffs)})"
            )
    if base:
        lines += ["", "Base model (no fine-tuning): " + json.dumps(base.get("accuracy", base)), ""]
    if args.forgetting_tokens:
        f = forgetting(model, work, result["runs"], args.forgetting_tokens)
        base_acc = base.get("accuracy", base) if base else {}
        lines += forgetting_report(f, args.recipes, list(problems), base_acc)
        (work / "forgetting.json").write_text(json.dumps(f, indent=1))
        forgetting_plot(f, args.recipes, list(problems), base_acc, work / "forgetting.png")
        lines += ["", "![accuracy against forgetting](forgetting.png)", ""]
    text = "\n".join(lines)
    print(text)

    report_dir.mkdir(parents=True, exist_ok=True)
    names = ["curves.png", "accuracy.png", "results.json", "forgetting.png", "forgetting.json"]
    names += ["curves-one-seed.png", "accuracy-one-seed.png", "results-one-seed.json"] if one else []
    for name in names:
        if (work / name).is_file():
            shutil.copy(work / name, report_dir / name)
    (report_dir / "report.md").write_text("".join(compare_reports) + text + "\n")
    print(f"report: {report_dir / 'report.md'}")


if __name__ == "__main__":
    main()
