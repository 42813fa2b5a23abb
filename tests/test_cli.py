"""The command line: a working run, and one-line errors (no traceback) on bad input."""

import json

import pytest

from conftest import run_cli


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("mlx_dft: error:"), err[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in err[0], err[0]


def test_train_and_generate(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli(
        "train",
        "--model",
        tiny_model,
        "--data",
        arith_data,
        "--output",
        out,
        "--iters",
        4,
        "--batch-size",
        4,
        "--steps-per-report",
        2,
        "--loss",
        "sft",
    )
    assert p.returncode == 0, p.stderr
    assert "saved lora adapter" in p.stdout and "BLAS:" in p.stdout
    assert json.loads((out / "adapter_config.json").read_text())["training"]["loss"] == "sft"
    g = run_cli("generate", "--adapter-path", out, "--prompt", "Question: Mia has 3 apples.", "-m", 5)
    assert g.returncode == 0, g.stderr


def test_help_lists_every_option():
    p = run_cli("train", "--help")
    assert p.returncode == 0
    for flag in (
        "--loss",
        "--dft-floor",
        "--dft-power",
        "--fine-tune-type",
        "--num-layers",
        "--batch-size",
        "--iters",
        "--epochs",
        "--learning-rate",
        "--max-seq-length",
        "--grad-accumulation-steps",
        "--resume",
        "--config",
        "--mask-prompt",
        "--lora-rank",
        "--max-grad-norm",
    ):
        assert flag in p.stdout, flag


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"prompt": "Q: 1 + 1?", "completion": " 2"}'


@pytest.mark.parametrize(
    "setup,needles",
    [
        (lambda d: ["--model", d / "missing-model"], ["model not found"]),
        (lambda d: ["--data", d / "missing-data"], ["data not found"]),
        (
            lambda d: ["--data", write(d / "x" / "train.jsonl", [GOOD, '{"prompt": "oops"']).parent],
            ["train.jsonl line 2", "invalid JSON"],
        ),
        (
            lambda d: ["--data", write(d / "x" / "train.jsonl", ['{"question": "a", "answer": "b"}']).parent],
            ["line 1", "unknown record format"],
        ),
        (
            lambda d: ["--data", write(d / "x" / "train.jsonl", [GOOD, '{"text": "t"}']).parent],
            ["line 2", "mixed record formats"],
        ),
        (
            lambda d: [
                "--data",
                (write(d / "x" / "train.jsonl", [GOOD] * 8), write(d / "x" / "valid.jsonl", []))[0].parent,
            ],
            ["valid.jsonl is empty"],
        ),
        (
            lambda d: ["--data", write(d / "x" / "train.jsonl", [GOOD] * 2).parent, "--batch-size", 4],
            ["2 examples, fewer than --batch-size 4"],
        ),
        (lambda d: ["--config", write(d / "c.yaml", ["itres: 10"])], ["unknown option 'itres'"]),
        (lambda d: ["--lora-keys", "nonexistent_proj"], ["no adaptable layer 'nonexistent_proj'"]),
        (lambda d: ["--learning-rate", "-1"], ["--learning-rate must be positive"]),
        (lambda d: ["--resume", d / "nowhere"], ["resume path not found"]),
    ],
    ids=["model", "data", "json", "format", "mixed", "empty", "small", "config", "keys", "lr", "resume"],
)
def test_bad_input_is_one_line(tiny_model, arith_data, tmp_path, setup, needles):
    args = [
        "--model",
        tiny_model,
        "--data",
        arith_data,
        "--iters",
        2,
        "--batch-size",
        4,
        "--output",
        tmp_path / "o",
    ]
    p = run_cli("train", *args, *setup(tmp_path))
    assert_one_line_error(p, *needles)
    assert not (tmp_path / "o" / "adapters.safetensors").exists()


def test_full_fine_tuning_of_a_quantized_model_is_refused(tiny_model_4bit, arith_data, tmp_path):
    p = run_cli(
        "train",
        "--model",
        tiny_model_4bit,
        "--data",
        arith_data,
        "--fine-tune-type",
        "full",
        "--iters",
        2,
        "--batch-size",
        4,
        "--output",
        tmp_path / "o",
    )
    assert_one_line_error(p, "quantized")


def test_resume_with_another_model_is_refused(tiny_model, arith_data, tmp_path):
    from conftest import llama_config, write_model

    out = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--model",
            tiny_model,
            "--data",
            arith_data,
            "--output",
            out,
            "--iters",
            2,
            "--batch-size",
            4,
        ).returncode
        == 0
    )
    other = write_model(tmp_path / "other", llama_config(num_hidden_layers=3))
    before = (out / "adapters.safetensors").read_bytes()
    p = run_cli("train", "--resume", out, "--model", other, "--iters", 4)
    assert_one_line_error(p, "different model", "num_hidden_layers 2 vs 3")
    assert (out / "adapters.safetensors").read_bytes() == before


def test_generate_with_a_missing_adapter(tmp_path):
    p = run_cli("generate", "--adapter-path", tmp_path / "none", "--prompt", "hi")
    assert_one_line_error(p, "adapter not found")
