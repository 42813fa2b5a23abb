"""Answer checking, scoring, offline-RL sampling, eval and compare."""

import json
import math
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from conftest import run_cli
from mlx_dft.errors import UserError
from mlx_dft.evaluation.answers import equivalent, extract, last_boxed
from mlx_dft.evaluation.benchmarks import Problem, load_benchmark
from mlx_dft.evaluation.generation import pass_at_k, score
from mlx_dft.evaluation.sample import load_verifier, run_sample, select

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "math"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks/math is absent")


@needs_shared
def test_checker_agrees_with_math500_reference_answers():
    rows = [json.loads(x) for x in (SHARED / "math500.jsonl").read_text().splitlines() if x.strip()]
    agree = sum(equivalent(last_boxed(r["solution"]), r["answer"]) for r in rows)
    rate = agree / len(rows)
    print(f"MATH500: the checker accepts {agree}/{len(rows)} reference solutions ({rate:.1%})")
    assert len(rows) == 500 and rate >= 0.99


@needs_shared
def test_every_minerva_reference_solution_has_a_final_answer():
    problems = load_benchmark("minerva_math", SHARED)
    assert len(problems) == 272 and all(p.answer for p in problems)


@needs_shared
@pytest.mark.parametrize(
    "name,count", [("math500", 500), ("olympiadbench", 675), ("aime24", 30), ("amc23", 40)]
)
def test_benchmarks_load(name, count):
    problems = load_benchmark(name, SHARED)
    assert len(problems) == count and all(p.question and p.answer for p in problems)
    assert len(load_benchmark(name, SHARED, limit=3)) == 3


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("27.0", "27"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac12"),
        ("\\dfrac{3}{4}", "0.75"),
        ("1,000", "1000"),
        ("-3", "-3.0"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("x^2+2x", "2x+x^2"),
        ("(1, 2)", "(1,2)"),
        ("\\text{(C)}", "C"),
    ],
)
def test_equivalent_forms(pred, gold):
    assert equivalent(pred, gold)


@pytest.mark.parametrize("pred,gold", [("28", "27"), ("\\frac{1}{3}", "0.5"), (None, "1"), ("x^2", "x^3")])
def test_different_answers(pred, gold):
    assert not equivalent(pred, gold)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{{2}+1}", "{2}+1"),
        ("Mia starts with 23. 23 + 15 = 38. The answer is 38.", "38"),
        ("we get 12, then 14 and finally 15", "15"),
        ("no number here", None),
    ],
)
def test_extraction(text, expected):
    assert extract(text) == expected


def test_pass_at_k_matches_brute_force():
    for n, c in ((5, 0), (5, 2), (6, 6), (8, 3)):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert math.isclose(pass_at_k(n, c, k), brute)


PROBLEMS = [Problem(str(i), f"What is {i} + {i}?", str(2 * i)) for i in range(1, 9)]


def test_oracle_scores_100_and_wrong_scores_0():
    answers = {p.question: p.answer for p in PROBLEMS}
    right = score(
        PROBLEMS, lambda prompts: [f"Work... \\boxed{{{answers[p]}}}" for p in prompts], batch_size=3
    )
    wrong = score(PROBLEMS, lambda prompts: [f"\\boxed{{{int(answers[p]) + 1}}}" for p in prompts])
    assert right.accuracy == 1.0 and right.pass_at[1] == 1.0 and right.extracted_rate == 1.0
    assert wrong.accuracy == 0.0 and wrong.pass_at[1] == 0.0


def test_samples_give_mean_accuracy_and_pass_at_k():
    answers = {p.question: p.answer for p in PROBLEMS}
    calls = []

    def half_right(prompts):  # every second generation is right
        out = []
        for p in prompts:
            calls.append(p)
            out.append(f"The answer is {answers[p] if len(calls) % 2 else 0}.")
        return out

    r = score(PROBLEMS, half_right, samples=4, batch_size=5)
    assert len(calls) == 32 and r.accuracy == 0.5
    assert r.pass_at[1] == 0.5 and math.isclose(r.pass_at[2], 1 - 1 / 6) and r.pass_at[4] == 1.0


VERIFIER = """
def reward(prompt, completion, record):
    return 1.0 if completion.strip().endswith(record["answer"]) else 0.0

def broken(prompt, completion):
    raise RuntimeError("boom")
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sample_keeps_exactly_what_the_verifier_accepts(tmp_path):
    (tmp_path / "myverifier.py").write_text(VERIFIER)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(4)])
    counter = {"n": 0}

    def generate(prompts):  # deterministic: sample j of prompt i ends with i when j is even
        out = []
        for p in prompts:
            j = counter["n"] % 3
            counter["n"] += 1
            out.append(f"guess {p[1:] if j % 2 == 0 else 'x'}")
        return out

    res = run_sample(
        str(data),
        str(tmp_path / "kept.jsonl"),
        samples=3,
        verifier=f"{tmp_path}/myverifier.py:reward",
        generate=generate,
    )
    kept = [json.loads(x) for x in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 8 and all(k["completion"].endswith(k["prompt"][1:]) for k in kept)
    assert all(p["accepted"] == 2 and p["samples"] == 3 for p in res.per_prompt)
    stats = json.loads((tmp_path / "kept.stats.json").read_text())
    assert stats["acceptance_rate"] == pytest.approx(8 / 12) and stats["kept"] == 8


def test_sample_best_and_math_verifier():
    records = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    comps = [["\\boxed{2}", "\\boxed{3}", "The answer is 2.0"], ["\\boxed{5}", "four?"]]
    res = select(records, ["1+1", "2+2"], comps, load_verifier("math"), keep="best")
    assert [k["completion"] for k in res.kept] == ["\\boxed{2}"]
    res = select(records, ["1+1", "2+2"], comps, load_verifier("math"))
    assert [k["completion"] for k in res.kept] == ["\\boxed{2}", "The answer is 2.0"]


def test_sample_errors(tmp_path):
    (tmp_path / "myverifier.py").write_text(VERIFIER)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "q1", "answer": "1"}])
    with pytest.raises(UserError, match="cannot import"):
        run_sample(str(data), str(tmp_path / "o.jsonl"), verifier="no_such_module:fn", generate=lambda p: p)
    with pytest.raises(UserError, match="raised RuntimeError: boom"):
        run_sample(
            str(data),
            str(tmp_path / "o.jsonl"),
            verifier=f"{tmp_path}/myverifier.py:broken",
            generate=lambda p: ["x"] * len(p),
        )
    with pytest.raises(UserError, match="no sample was accepted"):
        run_sample(
            str(data),
            str(tmp_path / "o.jsonl"),
            samples=2,
            verifier=f"{tmp_path}/myverifier.py:reward",
            generate=lambda p: ["nope"] * len(p),
        )
    assert not (tmp_path / "o.jsonl").exists()


def test_eval_cli_writes_reports(tiny_model, arith_data, tmp_path):
    out = tmp_path / "ev"
    p = run_cli(
        "eval",
        "--model",
        tiny_model,
        "--data",
        arith_data,
        "--problems",
        arith_data / "test.jsonl",
        "--question-field",
        "prompt",
        "--limit",
        3,
        "--max-tokens",
        6,
        "--output",
        out,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert {"ce", "ppl", "prob", "dft_loss"} <= set(report["loss"])
    gen = report["generation"]["test"]
    assert gen["problems"] == 3 and 0.0 <= gen["accuracy"] <= 1.0
    rows = [json.loads(x) for x in (out / "test.generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["generations"]) == 1 and "correct" in r for r in rows)
    sampled = run_cli(
        "eval",
        "--model",
        tiny_model,
        "--problems",
        arith_data / "test.jsonl",
        "--question-field",
        "prompt",
        "--limit",
        2,
        "--max-tokens",
        4,
        "--samples",
        3,
        "--output",
        tmp_path / "ev2",
    )
    assert sampled.returncode == 0, sampled.stderr
    assert json.loads((tmp_path / "ev2" / "report.json").read_text())["generation"]["test"]["samples"] == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--benchmark", "gsm9k"], "unknown benchmark 'gsm9k'"),
        (
            ["--benchmark", "aime24", "--benchmark-dir", "/nonexistent"],
            "benchmark aime24 is not in /nonexistent",
        ),
        (["--problems", "FILE", "--question-field", "nope"], "no field 'nope'"),
        ([], "nothing to evaluate"),
    ],
)
def test_eval_bad_input(tiny_model, arith_data, tmp_path, args, message):
    args = [str(arith_data / "test.jsonl") if a == "FILE" else a for a in args]
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "report.json").write_text('{"finished": true}')
    p = run_cli("eval", "--model", tiny_model, *args, "--output", tmp_path / "ev")
    assert p.returncode == 1 and message in p.stderr and p.stderr.count("\n") == 1
    assert json.loads((tmp_path / "ev" / "report.json").read_text()) == {"finished": True}


def test_math500_from_the_hub_cache_offline(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("../shared/benchmarks/math is absent")
    base = tmp_path / "hub" / "datasets--HuggingFaceH4--MATH-500"
    commit = "0" * 40
    (base / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(SHARED / "math500.jsonl", base / "snapshots" / commit / "test.jsonl")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    code = (
        "from mlx_dft.evaluation.benchmarks import load_benchmark; "
        f"print(len(load_benchmark('math500', {str(tmp_path / 'empty')!r})))"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    import os

    p = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0 and p.stdout.strip() == "500", p.stderr


def test_compare_trains_evaluates_reports_and_resumes(tiny_model, arith_data, tmp_path):
    from mlx_dft.evaluation.compare import run_compare

    plan = {
        "common": {
            "model": str(tiny_model),
            "data": str(arith_data),
            "iters": 2,
            "batch_size": 4,
            "steps_per_report": 1,
        },
        "runs": {
            "sft-lora": {"loss": "sft"},
            "dft-aligner": {"loss": "dft", "adapter": "aligner", "aligner_start_layer": 0},
        },
        "seeds": [0, 1],
        "eval": {
            "problems": {"id": {"file": str(arith_data / "test.jsonl"), "question_field": "prompt"}},
            "max_tokens": 4,
            "limit": 3,
        },
    }
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(json.dumps(plan))
    logs = []
    res = run_compare(cfg, tmp_path / "cmp", progress=False, log=logs.append)
    out = tmp_path / "cmp"
    assert len(res["runs"]) == 4 and {"report.md", "curves.png", "accuracy.png", "results.json"} <= {
        p.name for p in out.iterdir()
    }
    report = (out / "report.md").read_text()
    assert (
        "| sft-lora | sft | lora |" in report
        and "accuracy id" in report
        and "![curves.png](curves.png)" in report
    )
    assert res["summary"]["dft-aligner"]["trainable_parameters"] == 64 + 2 * 4
    # rerun: finished runs are not trained again; a missing one is
    (out / "runs" / "sft-lora-seed1" / "results.json").unlink()
    logs.clear()
    run_compare(cfg, out, progress=False, log=logs.append)
    status = [x for x in logs if x.startswith("[")]
    assert sum("cached" in x for x in status) == 3 and sum("training" in x for x in status) == 1
    (tmp_path / "bad.yaml").write_text("runs: {a: {}}\nbogus: 1\n")
    with pytest.raises(UserError, match="unknown key"):
        run_compare(tmp_path / "bad.yaml", tmp_path / "x", progress=False)
