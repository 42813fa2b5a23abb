"""The bundled model and task: what `mlx_dft train` runs with no arguments."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dft
from conftest import BUNDLED
from mlx_dft.tasks import ARITH_DIR, arith


def test_bundled_model_is_small_pretrained_and_loads_in_mlx_lm():
    from mlx_lm import load

    size = sum(f.stat().st_size for f in BUNDLED.iterdir())
    assert size < 20e6
    info = json.loads((BUNDLED / "pretraining.json").read_text())
    assert info["heldout_perplexity"] < 4.0  # a random model's is ~512
    model, tok = load(str(BUNDLED))
    assert type(model).__module__.endswith("llama") and not tok.has_chat_template


def test_bundled_model_loads_in_transformers_with_the_same_logits():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mlx_lm import load

    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(BUNDLED)
    model, tok = load(str(BUNDLED))
    text = "Mia has 23 apples. 23 + 15 = 38."
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(text)
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids.numpy()))), expected, atol=1e-4)


def read(split):
    return [json.loads(x) for x in (ARITH_DIR / f"{split}.jsonl").read_text().splitlines()]


def test_bundled_task_splits():
    splits = {s: read(s) for s in ("train", "valid", "test", "test_ood")}
    assert [len(v) for v in splits.values()] == [2000, 200, 200, 200]
    prompts = [r["prompt"] for v in splits.values() for r in v]
    assert len(set(prompts)) == len(prompts)  # no problem in two splits
    for name, recs in splits.items():
        steps = {r["completion"].count(" = ") for r in recs}
        assert steps == ({4, 5} if name == "test_ood" else {1, 2, 3}), name
        for r in recs:
            assert arith.extract_answer(r["completion"]) == int(r["answer"])


@pytest.mark.slow
def test_the_first_command_teaches_the_task(tmp_path):
    """`mlx_dft train` with no arguments (DFT + LoRA, one epoch, about 1.5 minutes here): held-out
    answer accuracy up by at least 20 points, and validation CE down, on the bundled model."""
    run = mlx_dft.train(output=str(tmp_path / "first"), progress=False)
    acc = [r["accuracy"] for r in run.history if "accuracy" in r]
    val = [r["val_ce"] for r in run.history if "val_ce" in r]
    assert len(acc) == 2 and acc[1] - acc[0] >= 0.2, acc
    assert val[-1] < 0.5 * val[0], val


@pytest.mark.slow
def test_the_base_model_recaps_task_stories_in_its_own_format():
    """What the task builds on: the pretrained model works a task story out in its own words (the
    pretraining probe, recomputed), which it could not before its corpus had recaps."""
    import importlib.util

    from mlx_lm import load

    script = BUNDLED.parents[1] / "scripts" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", script)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    model, tok = load(str(BUNDLED))
    correct, _ = make.recap_probe(model, tok, n=20)
    info = json.loads((BUNDLED / "pretraining.json").read_text())
    assert correct >= 10 and info["recap_probe_accuracy"] >= 0.5


@pytest.mark.slow
def test_default_run_lowers_validation_loss(tmp_path):
    run = mlx_dft.train(output=str(tmp_path / "default"), iters=40, steps_per_eval=20, progress=False)
    val = [r["val_loss"] for r in run.history if "val_loss" in r]
    assert run.config.loss == "dft" and run.config.adapter == "lora"
    assert len(val) == 3 and val[-1] < 0.8 * val[0]


@pytest.mark.slow
def test_aligner_with_dft_lowers_validation_loss(tmp_path):
    run = mlx_dft.train(
        output=str(tmp_path / "al"),
        adapter="aligner",
        loss="dft",
        iters=100,
        steps_per_eval=50,
        batch_size=8,
        val_batches=10,
        progress=False,
    )
    val = [r["val_loss"] for r in run.history if "val_loss" in r]
    config = json.loads((run.output / "adapter_config.json").read_text())
    assert config["trainable_parameters"] == 256 + 2 * 8  # one hidden-size token, 8 head gates in 2 layers
    assert len(val) == 3 and val[-1] < 0.9 * val[0]
