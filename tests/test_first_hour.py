"""What a new user sees: the end-of-run summary with held-out accuracy, the status line, report lines
within 80 columns, validation scaled to the run, option names that mean one thing (old spellings
working with a note, mlx-lm's spellings accepted), grouped help, a self-contained output folder."""

import dataclasses
import io
import json

import pytest

import mlx_dft
from conftest import run_cli
from mlx_dft.config import FIELDS, HELP_GROUPS, TrainConfig
from mlx_dft.evaluation.options import EVAL_HELP_GROUPS, SAMPLE_HELP_GROUPS, EvalConfig, SampleConfig
from mlx_dft.progress import Progress
from mlx_dft.trainer import _fmt, auto_val_batches


def test_a_run_ends_with_accuracy_before_and_after_and_what_to_do_next(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--output", out, "--iters", 4,
                "--accuracy-problems", 5, "--loss", "sft")  # fmt: skip
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = [r for r in recs if "accuracy" in r]
    assert [(r["step"], r["accuracy_problems"], r["accuracy_split"]) for r in acc] == [
        (0, 5, "test"),
        (4, 5, "test"),
    ]
    summary = p.stdout[p.stdout.index("done in ") :]
    first, last = (r for r in recs if "val_ce" in r and r["step"] in (0, 4))
    assert f"validation CE  {first['val_ce']:.3f} -> {last['val_ce']:.3f}" in summary
    assert f"accuracy       {acc[0]['accuracy']:.0%} -> {acc[1]['accuracy']:.0%}" in summary
    assert "on 5 held-out test problems" in summary and "tuned answer" in summary
    assert f"adapter        {out}" in summary
    for command in (
        "mlx_dft chat --adapter-path",
        "mlx_dft eval --adapter-path",
        "--loss dft",  # the run was SFT: the summary suggests DFT to compare
        "mlx_dft export",
    ):
        assert command in summary, command


def test_accuracy_needs_answers_and_can_be_turned_off(tiny_model, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": " b"}\n' * 8)
    (data / "test.jsonl").write_text('{"prompt": "a", "completion": " b"}\n' * 2)  # no answer field
    run = mlx_dft.train(
        model=str(tiny_model), data=str(data), output=str(tmp_path / "r"), iters=1, progress=False
    )
    assert not any("accuracy" in r for r in run.history)


def test_report_lines_fit_80_columns_for_every_loss():
    rec = {"step": 123456, "learning_rate": 1.234e-05, "grad_norm": 12.3456, "tokens_per_sec": 123456.7,
           "peak_memory_gb": 123.456}  # fmt: skip
    for prefix in ("train", "val"):
        full = {
            **rec,
            **{f"{prefix}_{k}": 0.123456 for k in ("loss", "ce", "prob", "dft", "kl", "eaft_weight")},
        }
        line = _fmt(full)
        assert len(line) <= 80, line
        assert line.startswith("step 123456 | ") and "loss 0.1235" in line


def test_status_line_shows_phase_metrics_and_an_eta_without_compile_or_validation():
    buf = io.StringIO()
    bar = Progress(enabled=True, file=buf)
    bar.phase("loading")
    bar.start(10)
    bar.phase("compiling")
    bar.step(30.0, timed=False)  # compilation: not in the rate
    bar.phase("training")
    for _ in range(3):
        bar.step(2.0)
    bar.validated(5.0, remaining=2)
    bar.metrics(0.1234, 1500.0, 0.25)
    assert bar.eta() == pytest.approx(6 * 2.0 + 2 * 5.0)
    text = bar.postfix()
    assert text == "loss 0.1234 1,500 tok/s 0.25 GB ETA 0:22"
    bar.close()
    screen = buf.getvalue()
    assert "loading" in screen and "compiling" in screen and "training" in screen
    assert max(len(part) for part in screen.replace("\r", "\n").splitlines()) <= 80


def test_validation_is_a_small_share_of_a_short_run():
    for steps in (20, 40, 100, 500, 5000):
        every = max(1, steps // 10)
        batches = auto_val_batches(steps, every)
        validations = 2 + steps // every
        assert 2 <= batches <= 25
        assert batches * validations <= max(0.3 * steps, 2 * validations)
    assert auto_val_batches(5000, 500) == 25  # long runs: mlx-lm's 25


def test_every_option_is_in_one_help_panel():
    for cls, groups in (
        (TrainConfig, HELP_GROUPS),
        (EvalConfig, EVAL_HELP_GROUPS),
        (SampleConfig, SAMPLE_HELP_GROUPS),
    ):
        listed = [name for names in groups.values() for name in names]
        assert sorted(listed) == sorted(f.name for f in dataclasses.fields(cls)), cls.__name__


def test_help_is_grouped_with_every_default():
    p = run_cli("train", "--help", env={"COLUMNS": "100"})
    assert p.returncode == 0
    for panel in HELP_GROUPS:
        assert f"─ {panel} " in p.stdout, panel
    assert "[default: --mask-prompt]" in p.stdout and "[default: --no-overwrite]" in p.stdout
    assert "[default: lora]" in p.stdout and "--fine-tune-type" in p.stdout
    top = run_cli("--help", env={"COLUMNS": "100"}).stdout
    words = " ".join(top.replace("│", " ").split())  # summaries whole, however rich wraps them
    assert "Ctrl-D to leave. Reads standard input, so a file of messages works too." in words
    assert "Fine-tune a model (default: DFT + LoRA on the bundled tiny model and task)." in words
    assert "fine_tune_type: lora" in run_cli("compare", "--help").stdout
    assert (
        "def reward(prompt: str, completion: str, record: dict) -> float"
        in run_cli("sample", "--help").stdout
    )


def test_old_spellings_work_with_a_note_and_mlx_lm_spellings_work(tiny_model, arith_data, tmp_path, capsys):
    common = ["--model", tiny_model, "--data", arith_data, "--iters", 1, "--accuracy-problems", 0]
    old = run_cli("train", *common, "--adapter", "dora", "--output", tmp_path / "old")
    assert old.returncode == 0, old.stderr
    assert "note: --adapter is deprecated in train" in old.stderr and "use --fine-tune-type" in old.stderr
    assert json.loads((tmp_path / "old" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    new = run_cli("train", *common, "--train", "--fine-tune-type", "dora", "--mask-prompt",
                  "--adapter-path", tmp_path / "new")  # fmt: skip
    assert new.returncode == 0 and "deprecated" not in new.stderr, new.stderr
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    gen = run_cli("generate", "--adapter", tmp_path / "new", "--temp", 0, "-p", "Question:", "-m", 2)
    assert gen.returncode == 0 and "note: --adapter is deprecated; use --adapter-path" in gen.stderr
    both = run_cli("generate", "--adapter", tmp_path / "new", "--adapter-path", tmp_path / "new", "-p", "Q")
    assert both.returncode == 1 and "given twice" in both.stderr
    yaml = tmp_path / "c.yaml"
    yaml.write_text("lora_layers: 2\nadapter: lora\n")
    cfg = mlx_dft.config.resolve(str(yaml), {})[0]
    assert cfg.num_layers == 2 and cfg.adapter == "lora"
    notes = capsys.readouterr().err
    assert "lora_layers is mlx-lm's old name for num_layers" in notes
    assert "'adapter' is deprecated for the adapter type; use fine_tune_type" in notes
    assert FIELDS["adapter"].metadata["flag"] == "--fine-tune-type"


def test_output_folder_is_self_contained(tiny_model, arith_data, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = tmp_path / "run"
    mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(out), iters=1, accuracy_problems=0,
                  chat_template=str(template), progress=False)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    template.unlink()  # the adapter folder has all it needs
    net, tok = mlx_dft.load(adapter=str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) == "<user>hi<assistant>"  # fmt: skip
    p = run_cli("generate", "--adapter-path", out, "--chat", "-p", "hi", "-m", 2)
    assert p.returncode == 0, p.stderr
    exported = run_cli("export", out, "--out", tmp_path / "peft")
    assert exported.returncode == 0, exported.stderr
    for name in ("adapter_config.json", "tokenizer.json", "chat_template.jinja", "README.md"):
        assert (tmp_path / "peft" / name).is_file(), name
