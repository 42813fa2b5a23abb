"""Inputs that used to be misread, reused or overwritten: each works as meant or is refused in one line."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from conftest import run_cli
from mlx_dft.errors import UserError
from mlx_dft.evaluation.run import run_eval
from mlx_dft.evaluation.sample import run_sample
from mlx_dft.files import atomic_write_text, staged_folder


def test_staged_folders_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_push_without_a_token_says_so_before_the_network(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run(
        [sys.executable, "-m", "mlx_dft", "push", str(folder), "--repo", "me/x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 1 and "HF_TOKEN" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_sample_refuses_to_overwrite_its_input(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    before = data.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input"):
        run_sample(str(data), str(data), generate=lambda p: ["2"] * len(p))
    assert data.read_bytes() == before


def test_eval_output_that_is_a_file_fails_before_any_work(tmp_path, arith_data):
    (tmp_path / "report").write_text("mine")
    p = run_cli("eval", "--model", "no/such-model", "--problems", arith_data / "test.jsonl",
                "--output", tmp_path / "report")  # fmt: skip
    assert p.returncode == 1 and "exists and is not a folder" in p.stderr and p.stderr.count("\n") == 1
    assert (tmp_path / "report").read_text() == "mine"


def test_eval_output_of_other_files_is_refused(tmp_path, arith_data):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files"):
        run_eval(
            model="no/such-model", problems=str(arith_data / "test.jsonl"), output=str(tmp_path / "notes")
        )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_a_reused_report_folder_holds_one_evaluation(tiny_model, arith_data, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text((arith_data / "test.jsonl").read_text())
    out = tmp_path / "ev"
    common = {
        "model": str(tiny_model),
        "question_field": "prompt",
        "limit": 2,
        "max_tokens": 3,
        "progress": False,
    }
    run_eval(problems=str(arith_data / "test.jsonl"), output=str(out), **common)
    assert (out / "test.generations.jsonl").is_file()
    run_eval(problems=str(other), output=str(out), **common)
    assert sorted(p.name for p in out.iterdir()) == ["other.generations.jsonl", "report.json"]
    assert list(json.loads((out / "report.json").read_text())["generation"]) == ["other"]


CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _chat_tokenizer():
    from mlx_lm.utils import load_tokenizer

    from conftest import BUNDLED
    from mlx_dft.data import set_chat_template

    tok = load_tokenizer(BUNDLED)
    set_chat_template(tok, CHAT)
    return tok


def test_trl_conversational_prompt_completion_is_rendered_and_masked_like_chat(tmp_path):
    from mlx_dft.data import DataConfig, load_split

    tok = _chat_tokenizer()
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sam has 3 pens."}]
    answer = [{"role": "assistant", "content": "The answer is 3."}]
    (tmp_path / "trl.jsonl").write_text(json.dumps({"prompt": user, "completion": answer}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": user + answer}) + "\n")
    trl = load_split(tmp_path / "trl.jsonl", "train", tok, DataConfig())
    chat = load_split(tmp_path / "chat.jsonl", "train", tok, DataConfig())
    assert trl.tokens[0].tolist() == chat.tokens[0].tolist()
    assert trl.supervised[0].tolist() == chat.supervised[0].tolist()
    supervised = tok.decode([int(t) for t, m in zip(trl.tokens[0], trl.supervised[0]) if m])
    assert "The answer is 3." in supervised and "Sam" not in supervised
    assert "{'role'" not in tok.decode(trl.tokens[0].tolist())  # not the Python text of the lists


def test_prompt_completion_of_mixed_kinds_is_refused(tmp_path):
    from mlx_dft.data import DataConfig, load_split

    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}) + "\n"
    )
    with pytest.raises(UserError, match=r"bad.jsonl line 1: .*must both be strings"):
        load_split(tmp_path / "bad.jsonl", "train", _chat_tokenizer(), DataConfig())


def _train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--output", out, "--iters", 2, "--batch-size", 4,
            "--save-every", 1, "--steps-per-eval", 100, "--val-batches", 1, *extra]  # fmt: skip


@pytest.mark.slow
def test_a_folder_in_use_by_another_process_is_refused(tiny_model, arith_data, tmp_path):
    from mlx_dft.files import lock_folder

    out = tmp_path / "busy"
    out.mkdir()
    held = lock_folder(out)
    try:  # a lock is per process: the run must be another one
        p = run_cli(*_train_args(tiny_model, arith_data, out), subprocess=True)
    finally:
        held.close()
    assert p.returncode == 1 and f"in use by process {os.getpid()}" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and not (out / "adapter_config.json").exists()


def test_resuming_into_a_folder_of_another_run_is_refused(tiny_model, arith_data, tmp_path):
    for name in ("a", "b"):
        assert run_cli(*_train_args(tiny_model, arith_data, tmp_path / name)).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()}
    p = run_cli("train", "--resume", tmp_path / "a", "--output", tmp_path / "b", "--iters", 3)
    assert p.returncode == 1 and "already holds a run" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()} == before


def test_the_next_run_removes_what_a_killed_run_left(tiny_model, arith_data, tmp_path):
    out = tmp_path / "r"
    assert run_cli(*_train_args(tiny_model, arith_data, out)).returncode == 0
    junk = [out / ".mlx_dft-tmp.adapters.999.safetensors", out / ".mlx_dft-tmp.metrics.jsonl.abc.tmp"]
    for j in junk:
        j.write_text("partial")
    stage = out / "checkpoints" / ".mlx_dft-tmp.step-0000003.xyz"
    stage.mkdir()
    kept = [out / ".adapters.999.tmp.safetensors", out / "checkpoints" / ".step-0000003.xyz"]
    kept[0].write_text("not named as mlx_dft names its temporaries: not ours to delete")
    kept[1].mkdir()
    p = run_cli("train", "--resume", out, "--iters", 3)
    assert p.returncode == 0, p.stderr
    assert not any(j.exists() for j in junk) and not stage.exists()
    assert all(k.exists() for k in kept)
    assert (out / "checkpoints" / "step-0000003").is_dir()


def test_a_run_made_with_relative_paths_resumes_and_loads_from_elsewhere(tiny_model, arith_data, tmp_path):
    import shutil

    import mlx_dft

    work = tmp_path / "work"
    shutil.copytree(tiny_model, work / "base")
    shutil.copytree(arith_data, work / "data")
    p = run_cli(*_train_args("base", "data", "out"), cwd=work)
    assert p.returncode == 0, p.stderr
    cfg = json.loads((work / "out" / "adapter_config.json").read_text())
    assert cfg["base_model"] == str((work / "base").resolve())
    assert cfg["training"]["data"] == str((work / "data").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = run_cli("train", "--resume", work / "out", "--iters", 3, cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    net, _ = mlx_dft.load(adapter=str(work / "out"))
    assert net is not None


def _plan(tmp_path, tiny_model, arith_data, **over):
    plan = {
        "common": {
            "model": str(tiny_model),
            "data": str(arith_data),
            "iters": 2,
            "batch_size": 4,
            "steps_per_eval": 100,
            "val_batches": 1,
        },  # fmt: skip
        "runs": {"a": {"loss": "sft"}},
        "seeds": [0],
        "eval": {
            "problems": {"id": {"file": str(arith_data / "test.jsonl"), "question_field": "prompt"}},
            "max_tokens": 3,
            "limit": 2,
        },  # fmt: skip
    }
    for key, value in over.items():
        plan[key] = value
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(plan))
    return path


def test_compare_reuses_a_run_only_if_its_settings_are_unchanged(tiny_model, arith_data, tmp_path):
    from mlx_dft.evaluation.compare import run_compare

    logs = []
    run_compare(_plan(tmp_path, tiny_model, arith_data), tmp_path / "c", progress=False, log=logs.append)
    logs.clear()
    run_compare(_plan(tmp_path, tiny_model, arith_data), tmp_path / "c", progress=False, log=logs.append)
    assert any("cached" in x for x in logs if x.startswith("["))
    assert "base model: cached" in logs
    logs.clear()
    changed = {"a": {"loss": "sft", "adapter": "dora"}}
    res = run_compare(_plan(tmp_path, tiny_model, arith_data, runs=changed), tmp_path / "c", progress=False,
                      log=logs.append)  # fmt: skip
    runs = [x for x in logs if x.startswith("[")]
    assert any("training" in x for x in runs) and not any("cached" in x for x in runs)
    assert res["runs"][0]["adapter"] == "dora"


@pytest.mark.parametrize(
    "over,message",
    [
        ({"seeds": 3}, "'seeds' must be a list"),
        ({"runs": {"a": "sft"}}, "runs.a must map training options"),
        ({"runs": {"a": {"iters": 0}}}, "runs.a: iters must be at least 1"),
        ({"runs": {"a": {"lossy": "sft"}}}, "runs.a: unknown option 'lossy'"),
        ({"common": {"seed": 1}}, "common.seed: compare sets it"),
        ({"eval": {"problems": {"id": "test.jsonl"}}}, "eval.problems.id must be a mapping"),
        ({"eval": {"problems": {"id": {"file": "test.jsonl", "question_field": "q"}}}}, "eval.problems.id:"),
        ({"eval": {"problems": {"id": {"file": "nope.jsonl"}}}}, "eval.problems.id: data file not found"),
    ],
)
def test_compare_plans_are_checked_whole_before_training(tiny_model, arith_data, tmp_path, over, message):
    from mlx_dft.evaluation.compare import run_compare

    with pytest.raises(UserError, match=re.escape(message)):
        run_compare(_plan(tmp_path, tiny_model, arith_data, **over), tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "runs").exists()


def test_compare_paths_are_relative_to_the_plan(tiny_model, arith_data, tmp_path):
    import shutil

    from mlx_dft.evaluation.compare import load_plan

    shutil.copytree(arith_data, tmp_path / "plans" / "task")
    plan = _plan(tmp_path, tiny_model, arith_data)
    text = json.loads(plan.read_text())
    text["common"]["data"] = "task"
    text["eval"]["problems"]["id"]["file"] = "task/test.jsonl"
    (tmp_path / "plans" / "p.yaml").write_text(json.dumps(text))
    loaded = load_plan(tmp_path / "plans" / "p.yaml")
    assert loaded["common"]["data"] == str((tmp_path / "plans" / "task").resolve())
    assert loaded["eval"]["problems"]["id"]["file"] == str(tmp_path / "plans" / "task" / "test.jsonl")


def test_a_chat_template_given_to_train_travels_with_the_adapter(tiny_model, tmp_path):
    """The template's text is stored with the adapter and used by generate and eval, also after
    the template file is gone."""
    template = tmp_path / "t.jinja"
    template.write_text(CHAT)
    data = tmp_path / "chat"
    data.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add {i} and 1."},
                {"role": "assistant", "content": f"{i + 1}"},
            ]
        }
        for i in range(8)
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "q.jsonl").write_text(json.dumps({"question": "Add 2 and 1.", "answer": "3"}) + "\n")
    p = run_cli(*_train_args(tiny_model, data, tmp_path / "out", "--chat-template", template))
    assert p.returncode == 0, p.stderr
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["training"]["chat_template"] == CHAT
    template.unlink()
    gen = run_cli("generate", "--adapter-path", tmp_path / "out", "-p", "Add 2 and 1.", "--chat", "-m", 2)
    assert gen.returncode == 0, gen.stderr
    ev = run_cli("eval", "--adapter-path", tmp_path / "out", "--problems", data / "q.jsonl",
                 "--max-tokens", 2,
                 "--chat", "--output", tmp_path / "ev")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    row = json.loads((tmp_path / "ev" / "q.generations.jsonl").read_text())
    assert row["prompt"].endswith("<s>user: Add 2 and 1.</s>\n<s>assistant:")


def test_a_long_chat_template_string_is_text_not_a_file_name(tiny_model, arith_data, tmp_path):
    long = "{% for m in messages %}" + " " * 300 + "{{ m['content'] }}{% endfor %}"
    p = run_cli(*_train_args(tiny_model, arith_data, tmp_path / "o", "--chat-template", long))
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------ mlx-lm YAML keys


def _schedule_values(cfg, total_steps: int) -> list[float]:
    from mlx_dft.trainer import optimizer_for

    sched = optimizer_for(cfg, total_steps)._schedulers["learning_rate"]
    return [float(sched(mx_array(s))) for s in range(total_steps + 2)]


def mx_array(x):
    import mlx.core as mx

    return mx.array(x)


@pytest.mark.parametrize(
    "block",
    [
        {"name": "cosine_decay", "warmup": 5, "warmup_init": 1e-7, "arguments": [1e-4, 40, 1e-6]},
        {"name": "cosine_decay", "arguments": [3e-4, 30]},
        {"name": "linear_schedule", "warmup": 3, "arguments": [2e-4, 1e-5, 20]},
    ],
)
def test_an_mlx_lm_lr_schedule_block_gives_mlx_lms_own_schedule(tmp_path, block):
    """Against mlx-lm's build_schedule: the same rates, except that mlx-lm holds the peak one step
    longer (its decay starts at step warmup + 1, ours right after the warmup)."""
    from mlx_lm.tuner.utils import build_schedule

    from mlx_dft.config import resolve

    path = tmp_path / "mlx_lm.yaml"
    path.write_text(json.dumps({"learning_rate": 5.0, "lr_schedule": block, "iters": 60}))
    cfg, _, _ = resolve(str(path), {})
    ours = _schedule_values(cfg, 60)
    theirs_fn = build_schedule(block)
    theirs = [float(theirs_fn(mx_array(s))) for s in range(64)]
    warmup = block.get("warmup", 0)
    for s in range(60):
        expected = theirs[s] if s < warmup else theirs[s + 1 if warmup else s]
        assert ours[s] == pytest.approx(expected, rel=1e-5, abs=1e-12), (s, ours[s], expected)


def test_mlx_lm_keys_are_understood_noted_or_refused(tmp_path, capsys):
    from mlx_dft.config import resolve

    noted = tmp_path / "noted.yaml"
    noted.write_text("train: true\ntest_batches: 10\nwandb: my-project\nlora_parameters: {rank: 4}\n")
    cfg, _, _ = resolve(str(noted), {})
    err = capsys.readouterr().err.splitlines()
    assert cfg.lora_rank == 4
    assert cfg.report_to == ["wandb"] and cfg.project_name == "my-project"  # mlx-lm's older wandb: key
    assert [line.split(":")[0] for line in err] == ["note"] * 2, err
    assert all("ignored" in line for line in err), err
    for text, needle in [
        ("hf_dataset: [{path: a/b}, {path: c/d}]\n", "hf_dataset lists 2 datasets"),
        ("hf_dataset: {path: a/b, revision: main}\n", "unknown key hf_dataset.revision"),
        ("report_every: 3\n", "unknown option 'report_every'"),
        ("lr_schedule: {name: exponential_decay, arguments: [1e-4, 0.9]}\n", "exponential_decay"),
        ("lr_schedule: {name: cosine_decay, warmup_steps: 3}\n", "lr_schedule.warmup_steps"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(needle)):
            resolve(str(bad), {})
