"""`mlx_dft compare`: train and evaluate several recipes on the same data, side by side.

A YAML file describes the comparison::

    common: {model: ..., data: ..., iters: 200, batch_size: 8}   # mlx_dft train options for every run
    runs:                                                         # name -> options of that run
      sft-lora: {loss: sft, fine_tune_type: lora}
      dft-lora: {loss: dft, fine_tune_type: lora}
    seeds: [0, 1, 2]                                              # every run once per seed
    eval:                                                         # generation accuracy after training
      problems:                                                   # name -> a jsonl and its fields
        in-distribution: {file: test.jsonl, question_field: prompt, answer_field: answer}
      max_tokens: 128

The ``eval:`` options (``max_tokens``, ``batch_size``, ``samples``, ``temperature``, ``top_p``,
``limit``, ``prompt_template``, ``chat``) are ``mlx_dft eval``'s, with its defaults; a problem set
may set its own ``question_field``, ``answer_field`` and ``prompt_template``.

The whole plan is checked before the first run trains (errors name the plan key); relative paths
(``model``, ``data``, ``chat_template``, ``adapter_from``, problem ``file``s, ``output``) are
relative to the plan file; ``seed`` and ``output`` are compare's to set, per run.

Each run trains into ``OUTPUT/runs/<name>-seed<k>`` and writes ``results.json`` there when its
evaluation is done. A rerun reuses a finished run, and resumes an unfinished one from its last
checkpoint, only while the run's resolved settings (training configuration, seed, evaluation) are
those it was made with (``compare_settings.json``); a run whose settings changed starts again.
``OUTPUT/report.md`` gets a table (mean ± std over seeds) and ``curves.png`` / ``accuracy.png`` the
curves from every run's ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import statistics
import time
from pathlib import Path

import yaml

from mlx_dft.checkpoint import list_checkpoints
from mlx_dft.config import build_config, normalise, read_yaml
from mlx_dft.errors import UserError
from mlx_dft.evaluation.benchmarks import load_jsonl
from mlx_dft.evaluation.options import EvalConfig
from mlx_dft.files import (
    LOCK_FILE,
    atomic_write_json,
    atomic_write_text,
    check_apart,
    foreign_entries,
    lock_folder,
)

# EvalConfig options an ``eval:`` block sets for all its problem sets (its defaults otherwise); a
# problem set may override the SET_OPTIONS. Model, adapter, seed and output come from each run.
EVAL_OPTIONS = (
    "max_tokens",
    "batch_size",
    "samples",
    "temperature",
    "top_p",
    "limit",
    "prompt_template",
    "chat",
)
SET_OPTIONS = ("question_field", "answer_field", "prompt_template")
EVAL_KEYS = {"problems", *EVAL_OPTIONS}


# Training options a plan's runs may not set: compare decides them per run.
RUN_DECIDES = ("seed", "output", "resume", "overwrite")
# Options whose relative paths are relative to the plan file.
PATH_OPTIONS = ("model", "data", "chat_template", "adapter_from")


def load_plan(path: str | Path) -> dict:
    """The plan, checked whole before anything trains: every key known, every run's options a
    valid training configuration, every problem set readable; errors name the plan key. Relative
    paths are made relative to the plan file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"compare config not found: {p}")
    plan = read_yaml(p) or {}
    if not isinstance(plan, dict):
        raise UserError(f"{p}: expected a mapping with common, runs, seeds, eval, output")
    unknown = set(plan) - {"common", "runs", "seeds", "eval", "output", "baseline"}
    if unknown:
        raise UserError(
            f"{p}: unknown key(s) {', '.join(sorted(unknown))} "
            "(expected common, runs, seeds, eval, output, baseline)"
        )
    if not isinstance(plan.get("baseline", True), bool):
        raise UserError(f"{p}: 'baseline' must be true or false")
    if not isinstance(plan.get("runs"), dict) or not plan["runs"]:
        raise UserError(f"{p}: 'runs' must map run names to their options")
    seeds = plan.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(x) is int and x >= 0 for x in seeds):
        raise UserError(
            f"{p}: 'seeds' must be a list of non-negative integers, e.g. [0, 1, 2], not {seeds!r}"
        )
    plan["seeds"] = seeds
    base = p.parent
    common = plan.get("common") or {}
    if not isinstance(common, dict):
        raise UserError(f"{p}: 'common' must map training options to values")
    for key in RUN_DECIDES:
        if key in common:
            raise UserError(f"{p}: common.{key}: compare sets it for each run; remove it")
    plan["common"] = _relative_to(base, common)
    for name, opts in list(plan["runs"].items()):
        _check_name(p, "runs", name)
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise UserError(f"{p}: runs.{name} must map training options to values, not {opts!r}")
        for key in RUN_DECIDES:
            if key in opts:
                raise UserError(f"{p}: runs.{name}.{key}: compare sets it for each run; remove it")
        plan["runs"][name] = _relative_to(base, opts)
        _check_run(p, f"runs.{name}", {**plan["common"], **plan["runs"][name]})
    block = plan.get("eval") or {}
    if not isinstance(block, dict):
        raise UserError(f"{p}: 'eval' must be a mapping")
    bad_eval = set(block) - EVAL_KEYS
    if bad_eval:
        raise UserError(f"{p}: unknown eval key(s) {', '.join(sorted(bad_eval))}")
    problems = block.get("problems") or {}
    if not isinstance(problems, dict):
        raise UserError(f"{p}: eval.problems must map set names to {{file: ..., question_field: ...}}")
    for set_name, spec in problems.items():
        _check_name(p, "eval.problems", set_name)
        if not isinstance(spec, dict) or "file" not in spec:
            raise UserError(f"{p}: eval.problems.{set_name} must be a mapping with a 'file'")
        unknown = set(spec) - {"file", *SET_OPTIONS}
        if unknown:
            raise UserError(f"{p}: eval.problems.{set_name}: unknown key(s) {', '.join(sorted(unknown))}")
        f = Path(str(spec["file"])).expanduser()
        spec["file"] = str(f if f.is_absolute() else base / f)
        try:
            load_jsonl(
                spec["file"],
                spec.get("question_field", "question"),
                spec.get("answer_field", "answer"),
                limit=1,
            )
        except UserError as e:
            raise UserError(f"{p}: eval.problems.{set_name}: {_plan_words(str(e))}") from None
    plan["eval"] = block
    if plan.get("output") is not None:
        o = Path(str(plan["output"])).expanduser()
        plan["output"] = str(o if o.is_absolute() else base / o)
    return plan


def _relative_to(base: Path, options: dict) -> dict:
    out = dict(options)
    for key in PATH_OPTIONS:
        value = out.get(key)
        if isinstance(value, str) and not Path(value).expanduser().is_absolute() and (base / value).exists():
            out[key] = str((base / value).resolve())
    return out


def _plan_words(message: str) -> str:
    """A message about CLI flags (``--learning-rate``), in the plan's spelling (``learning_rate``)."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def _check_run(plan_path: Path, where: str, options: dict) -> None:
    try:
        build_config(normalise(options, where))
    except UserError as e:
        raise UserError(f"{plan_path}: {where}: {_plan_words(str(e))}") from None


def run_settings(options: dict, seed: int, evals: dict[str, EvalConfig]) -> dict:
    """Everything that decides a run's results: its resolved training configuration, its seed and
    its evaluation settings. A finished run is reused only while this is unchanged."""
    cfg = build_config(normalise({**options, "seed": seed}, "plan")).to_dict()
    return json.loads(
        json.dumps({"training": cfg, "eval": {k: dataclasses.asdict(v) for k, v in evals.items()}})
    )


def eval_configs(block: dict) -> dict[str, EvalConfig]:
    """The checked :class:`EvalConfig` of every problem set of a plan's ``eval:`` block."""
    shared = {k: block[k] for k in EVAL_OPTIONS if k in block}
    configs = {}
    for name, spec in (block.get("problems") or {}).items():
        own = {k: spec[k] for k in SET_OPTIONS if k in spec}
        try:
            configs[name] = EvalConfig.build(**{**shared, **own, "problems": spec["file"]})
            configs[name].validate()
        except UserError as e:
            raise UserError(f"eval {name}: {e}") from None
    return configs


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _history(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


SETTINGS_FILE = "compare_settings.json"


def _same_settings(path: Path, settings: dict) -> bool:
    """True when the run folder was made with ``settings`` (or holds nothing yet)."""
    if not path.parent.exists():
        return True
    try:
        return json.loads(path.read_text()) == settings
    except (OSError, ValueError):
        return False


def run_one(
    name: str, seed: int, options: dict, evals: dict[str, EvalConfig], run_dir: Path, progress: bool
) -> dict:

    done, settings_file = run_dir / "results.json", run_dir / SETTINGS_FILE
    settings = run_settings(options, seed, evals)
    if not _same_settings(settings_file, settings):
        shutil.rmtree(run_dir, ignore_errors=True)  # made under another plan: start it again
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(run_dir)  # marks the folder as mlx_dft's for the run trained into it
    try:
        return _run_one(name, seed, options, evals, run_dir, progress, settings)
    finally:
        lock.close()


def _run_one(
    name: str, seed: int, options: dict, evals: dict[str, EvalConfig], run_dir: Path, progress: bool,
    settings: dict,
) -> dict:
    from mlx_dft import api
    from mlx_dft.evaluation.run import run_eval

    done, settings_file = run_dir / "results.json", run_dir / SETTINGS_FILE
    atomic_write_json(settings_file, settings)
    from mlx_dft.checkpoint import read_state

    tic = time.perf_counter()
    ckpts = list_checkpoints(run_dir)
    state = read_state(ckpts[-1]) if ckpts else {}
    if ckpts and state.get("step", 0) >= state.get("total_steps", float("inf")):
        # trained before; only its evaluation is missing
        loaded = api.load(None, run_dir, keep_quantized=bool(options.get("keep_quantized")))
    else:
        run = (
            api.train(resume=str(run_dir), progress=progress)
            if ckpts
            else api.train(**options, seed=seed, output=str(run_dir), overwrite=True, progress=progress)
        )
        loaded = (run.model, run.tokenizer)
    train_seconds = time.perf_counter() - tic
    hist = _history(run_dir)
    train = [r for r in hist if "train_loss" in r]
    val = [r for r in hist if "val_ce" in r]
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    result = {
        "name": name,
        "seed": seed,
        "loss": cfg["training"]["loss"],
        "adapter": cfg["adapter"],
        "trainable_parameters": cfg.get("trainable_parameters"),
        "train_seconds": train_seconds,
        "final_train_loss": train[-1]["train_loss"] if train else None,
        "final_train_ce": train[-1]["train_ce"] if train else None,
        "final_val_ce": val[-1]["val_ce"] if val else None,
        "final_val_prob": val[-1]["val_prob"] if val else None,
        "tokens_per_sec": (
            statistics.fmean(r["tokens_per_sec"] for r in train[1:] or train) if train else None
        ),
        "peak_memory_gb": max((r["peak_memory_gb"] for r in train), default=None),
        "accuracy": {},
    }
    for set_name, eval_cfg in evals.items():
        report = run_eval(
            eval_cfg,
            seed=seed,
            output=str(run_dir / "eval" / set_name),
            progress=progress,
            loaded=loaded,
        )
        result["accuracy"][set_name] = next(iter(report["generation"].values()))["accuracy"]
    atomic_write_json(done, result)
    return result


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _check_name(plan: Path, where: str, name) -> None:
    """Run and problem-set names become folder names under the output: plain names only (letters,
    digits, '.', '_', '+', '-'; no '/', '..', leading dot or absolute path)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise UserError(
            f"{plan}: {where}: {name!r} is not a valid name (letters, digits, '.', '_', '+' and '-', "
            "starting with a letter or digit, at most 100 characters)"
        )


def run_compare(
    config: str | Path, output: str | Path | None = None, progress: bool = True, log=print
) -> dict:
    plan = load_plan(config)
    evals = eval_configs(plan.get("eval") or {})
    out = Path(output or plan.get("output") or "compare").expanduser()
    common = plan.get("common") or {}
    check_apart(out, {"plan": config, "model": common.get("model"), "data": common.get("data")})
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    others = foreign_entries(out)
    if others and not (out / LOCK_FILE).is_file():  # compare's own folders hold its lock file
        raise UserError(
            f"--output {out} holds files that are not a compare run's ({', '.join(others[:3])}): "
            "choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(out)
    try:
        return _run_compare(plan, evals, out, progress, log)
    finally:
        lock.close()


def _run_compare(plan: dict, evals: dict, out: Path, progress: bool, log) -> dict:
    seeds = plan.get("seeds") or [0]
    common = plan.get("common") or {}
    results = []
    total = len(plan["runs"]) * len(seeds)
    for name, opts in plan["runs"].items():
        for seed in seeds:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            # compare evaluates every run itself: no held-out accuracy in training unless asked
            options = {"accuracy_problems": 0, **common, **(opts or {})}
            settings = run_settings(options, seed, evals)
            fresh = (run_dir / "results.json").is_file() and _same_settings(run_dir / SETTINGS_FILE, settings)
            status = "cached" if fresh else "training"
            log(f"[{len(results) + 1}/{total}] {name} seed {seed}: {status}")
            r = run_one(name, seed, options, evals, run_dir, progress)
            acc = ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items())
            log(f"    val ce {r['final_val_ce']:.4f}{' | ' + acc if acc else ''}")
            results.append(r)
    base = evaluate_base(plan, evals, out, progress, log) if plan.get("baseline", True) and evals else None
    summary = summarise(results)
    atomic_write_json(out / "results.json", {"runs": results, "summary": summary, "base": base})
    plots = make_plots(out, plan, seeds, base)
    atomic_write_text(out / "report.md", report_markdown(summary, results, plots, plan, base))
    log(f"report: {out / 'report.md'}")
    return {"runs": results, "summary": summary, "output": str(out)}


def evaluate_base(plan: dict, evals: dict[str, EvalConfig], out: Path, progress: bool, log) -> dict:
    """Accuracy of the untuned model (the plan's common model, no adapter) on every problem set:
    the row every recipe is measured against. Reused while its settings are unchanged."""
    from mlx_dft.evaluation.run import run_eval

    common = plan.get("common") or {}
    model = common.get("model")
    folder = out / "base"
    evaluation = {k: dataclasses.asdict(v) for k, v in evals.items()}
    settings = json.loads(
        json.dumps({"model": model, "chat_template": common.get("chat_template"), "eval": evaluation})
    )
    done = folder / "results.json"
    if done.is_file() and _same_settings(folder / SETTINGS_FILE, settings):
        log("base model: cached")
        return json.loads(done.read_text())
    log("base model: evaluating")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    atomic_write_json(folder / SETTINGS_FILE, settings)
    from mlx_dft import api

    loaded = api.load(
        model, None, chat_template=common.get("chat_template"),
        keep_quantized=bool(common.get("keep_quantized")),
    )
    accuracy = {}
    for set_name, cfg in evals.items():
        report = run_eval(cfg, output=str(folder / set_name), progress=progress, loaded=loaded)
        accuracy[set_name] = next(iter(report["generation"].values()))["accuracy"]
    atomic_write_json(done, accuracy)
    return accuracy


def summarise(results: list[dict]) -> dict:
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    summary = {}
    for name, rs in by_name.items():
        row = {
            "loss": rs[0]["loss"],
            "adapter": rs[0]["adapter"],
            "seeds": len(rs),
            "trainable_parameters": rs[0]["trainable_parameters"],
        }
        for key in (
            "final_train_loss",
            "final_train_ce",
            "final_val_ce",
            "final_val_prob",
            "tokens_per_sec",
            "peak_memory_gb",
        ):
            row[key] = _mean_std([r[key] for r in rs])
        for set_name in rs[0]["accuracy"]:
            row[f"accuracy:{set_name}"] = _mean_std([r["accuracy"][set_name] for r in rs])
            row[f"accuracy:{set_name}:all"] = [r["accuracy"][set_name] for r in rs]
        summary[name] = row
    return summary


def _pm(ms: tuple[float, float], fmt: str = ".3f") -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else (f"{m:{fmt}} ± {s:{fmt}}" if s else f"{m:{fmt}}")


def report_markdown(
    summary: dict, results: list[dict], plots: list[str], plan: dict, base: dict | None = None
) -> str:
    sets = _sets(summary)
    head = [
        "run",
        "loss",
        "adapter",
        "trainable params",
        "seeds",
        "train CE",
        "val CE",
        "val p",
        *[f"accuracy {s}" for s in sets],
        "tokens/s",
        "peak GB",
    ]
    common = plan.get("common") or {}
    lines = [
        "# Comparison",
        "",
        f"Model `{common.get('model') or 'the bundled model'}`, "
        f"data `{common.get('data') or 'the bundled task'}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    if base:
        cells = ["base model (no fine-tuning)", "-", "-", "0", "-", "-", "-", "-"]
        cells += [f"{base[s]:.3f}" if s in base else "n/a" for s in sets] + ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in summary.items():
        cells = [
            name,
            row["loss"],
            row["adapter"],
            f"{row['trainable_parameters']:,}",
            str(row["seeds"]),
            _pm(row["final_train_ce"]),
            _pm(row["final_val_ce"]),
            _pm(row["final_val_prob"]),
            *[_pm(row[f"accuracy:{s}"]) for s in sets],
            _pm(row["tokens_per_sec"], ",.0f"),
            _pm(row["peak_memory_gb"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over seeds. Per seed:", ""]
    lines += [
        "| run | seed | " + " | ".join(f"accuracy {s}" for s in sets) + " | val CE | training time |",
        "|" + "---|" * (4 + len(sets)),
    ]
    for r in results:
        val_ce = "n/a" if r["final_val_ce"] is None else f"{r['final_val_ce']:.4f}"
        lines.append(
            f"| {r['name']} | {r['seed']} | "
            + " | ".join(f"{r['accuracy'][s]:.3f}" for s in sets)
            + f" | {val_ce} | {r['train_seconds']:.0f} s |"
        )
    lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "Settings:",
        "",
        "```yaml",
        yaml.safe_dump({k: plan[k] for k in plan if k != "output"}, sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def make_plots(out: Path, plan: dict, seeds: list[int], base: dict | None = None) -> list[str]:
    """curves.png (training objective and CE, validation CE and target probability per step) and
    accuracy.png (per problem set, value-labelled bars, seeds as dots, the base model as a dashed
    line); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan["runs"])
    common = plan.get("common") or {}
    title = f"{_short(common.get('model'), 'bundled model')} on {_short(common.get('data'), 'bundled task')}"
    panels = (
        ("train_loss", "training objective (the run's loss)"),
        ("train_ce", "training cross-entropy"),
        ("val_ce", "validation cross-entropy"),
        ("val_prob", "validation mean target probability"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.4))
    for i, name in enumerate(names):
        for j, seed in enumerate(seeds):
            hist = _history(out / "runs" / f"{name}-seed{seed}")
            for ax, (key, _) in zip(axes, panels):
                pts = [(r["step"], r[key]) for r in hist if key in r]
                if pts:
                    few = len(pts) <= 30
                    ax.plot(*zip(*pts), color=f"C{i}", alpha=0.75, marker="o" if few else None, ms=3,
                            label=name if j == 0 else None)  # fmt: skip
    for ax, (_, label) in zip(axes, panels):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(names)), frameon=False)
    fig.suptitle(f"{title}: one line per run and seed")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    files = ["curves.png"]
    results = json.loads((out / "results.json").read_text())["summary"]
    sets = _sets(results)
    if sets:
        fig, ax = plt.subplots(figsize=(max(8.5, 2.2 + 1.8 * len(names) * len(sets)), 4.6))
        width = 0.8 / len(names)
        top = 0.0
        for i, name in enumerate(names):
            means = [results[name][f"accuracy:{s}"][0] for s in sets]
            stds = [results[name][f"accuracy:{s}"][1] for s in sets]
            xs = [k + i * width for k in range(len(sets))]
            bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=name, color=f"C{i}")
            ax.bar_label(bars, labels=[f"{m:.1%}" for m in means], padding=3, fontsize=8)
            for x, s in zip(xs, sets):
                values = results[name][f"accuracy:{s}:all"]
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
                top = max(top, *values)
            top = max(top, *[m + sd for m, sd in zip(means, stds)])
        for k, s in enumerate(sets):
            if base and s in base:
                ax.hlines(base[s], k - width / 2, k + width * (len(names) - 0.5), colors="black",
                          linestyles="dashed", label="base model" if k == 0 else None)  # fmt: skip
                top = max(top, base[s])
        ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(sets))], sets)
        ax.set_ylabel("accuracy (greedy)")
        ax.set_ylim(0, min(1.0, top * 1.2 + 0.05))
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_title(
            f"{title}\naccuracy, mean ± sd over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", fontsize=10
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=110)
        plt.close(fig)
        files.append("accuracy.png")
    return files


def _short(path: str | None, default: str) -> str:
    """The last two parts of a path (``smollm2-135m-instruct/float32``), or a Hub id as it is."""
    return "/".join(Path(str(path)).parts[-2:]) if path else default


def _sets(summary: dict) -> list[str]:
    first = next(iter(summary.values()))
    return [k.split(":", 1)[1] for k in first if k.startswith("accuracy:") and not k.endswith(":all")]
