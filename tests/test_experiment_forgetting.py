"""Forgetting (mlx_dft.evaluation.forgetting) on the bundled tiny model: the base model scores 0
against its own answers, so does a LoRA whose update is zero, and a changed LoRA scores above 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_dft.evaluation.forgetting import GENERAL_PROMPTS, answer_nll, base_answers, load_prompts

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"


def test_bundled_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    assert all(json.loads(line)["prompt"] for line in GENERAL_PROMPTS.read_text().splitlines())


@pytest.fixture(scope="module")
def tiny():
    if not (TINY / "config.json").is_file():
        pytest.skip("the bundled tiny model is missing")
    from mlx_dft import api

    model, tokenizer = api.load(str(TINY))
    prompts = load_prompts()[:8]
    answers = base_answers(model, tokenizer, prompts, max_tokens=16)
    return model, tokenizer, prompts, answers


def test_base_model_forgets_nothing_and_a_changed_adapter_forgets(tiny):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer, prompts, answers = tiny
    assert any(answers)
    base = answer_nll(model, tokenizer, prompts, answers)
    assert base["answers"] > 0 and base["tokens"] > 0 and base["nll"] > 0
    assert answer_nll(model, tokenizer, prompts, answers)["nll"] == base["nll"]  # deterministic
    # The base model's greedy answers are its argmax, token by token.
    assert base["reproduced"] >= 0.75

    # A LoRA as initialised (B = 0) changes nothing: forgetting 0.
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    model.eval()
    zero = answer_nll(model, tokenizer, prompts, answers)
    assert zero["nll"] - base["nll"] == pytest.approx(0.0, abs=1e-4)

    # A deliberately changed adapter (random B) moves the model away from its own answers.
    mx.random.seed(0)
    updates = [
        (k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.parameters()) if "lora_b" in k
    ]
    assert updates
    model.load_weights(updates, strict=False)
    changed = answer_nll(model, tokenizer, prompts, answers)
    assert changed["nll"] - base["nll"] > 0.05
    assert changed["reproduced"] <= base["reproduced"]
